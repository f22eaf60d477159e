"""The evaluation job a recipe's `eval.zero_shot.job` renders (`eval.sbatch` in the run folder), and its size.

Sizing: lm-eval's HF backend with parallelize=True places whole layers on the node's GPUs, so the job asks
for as few GPUs as hold the weights in the evaluation dtype with a margin for activations and the logits of a
batch. Pure Python (the render path must not import torch).
"""
from __future__ import annotations

import math
import shlex
import sys

import mtf_train
from mtf_train.eval.tasks import select
from mtf_train.plan import Plan
from mtf_train.recipe.directives import directives
from mtf_train.recipe.schema import Recipe

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
HEADROOM = 1.3  # activations, the batch's logits over the vocabulary, CUDA context


def eval_gpus(r: Recipe, plan: Plan) -> tuple[int, float]:
    """(GPUs for the evaluation job, GB of weights per GPU) from the plan's parameter count."""
    zs = r.eval.zero_shot
    weights_gb = plan.parameters * DTYPE_BYTES[zs.dtype] / 1024 ** 3
    if r.cluster.accelerator == "cpu":
        return 1, weights_gb
    need = max(1, math.ceil(weights_gb * HEADROOM / r.cluster.gpu_memory_gb))
    gpus = zs.gpus or min(need, r.cluster.gpus_per_node)
    return gpus, weights_gb / gpus


def eval_args(r: Recipe) -> list[str]:
    zs = r.eval.zero_shot
    args = []
    if zs.tasks:
        args += ["--tasks", ",".join(zs.tasks)]
    if zs.languages:
        args += ["--languages", ",".join(zs.languages)]
    if zs.data_dir:
        args += ["--data-dir", zs.data_dir]
    if zs.job == "every_step":
        args.append("--all-steps")
    args += ["--batch-size", str(zs.batch_size)]
    if r.cluster.accelerator == "gpu":
        args += ["--device", "cuda", "--dtype", zs.dtype, "--parallelize"]
    else:
        args += ["--device", "cpu", "--dtype", "float32"]
    return args


def render_eval_job(r: Recipe, plan: Plan, run_dir: str, srun_options: list[str], template_env) -> str:
    zs = r.eval.zero_shot
    select(zs.tasks or None, zs.languages or None, where="eval.zero_shot.tasks")  # names checked at render time
    gpus, _ = eval_gpus(r, plan)
    lines, current = [], []
    for a in eval_args(r):  # one flag and its value per line, for a readable script
        if a.startswith("--") and current:
            lines.append(" ".join(current))
            current = []
        current.append(shlex.quote(a))
    if current:
        lines.append(" ".join(current))
    what = "every saved step" if zs.job == "every_step" else "the last checkpoint"
    return template_env.get_template("eval.sbatch.j2").render(
        version=mtf_train.__version__, recipe_path=str(r.origin.path), gpus=gpus, run_dir=run_dir,
        directives=directives(r, job_name=f"{r.name}-eval", nodes=1, gpus=gpus, time=zs.time,
                              time_field="eval.zero_shot.time", output=f"{run_dir}/logs/%x-%j.out").lines(),
        setup=r.environment.setup,
        env=sorted(r.environment.env.items()), python=r.runtime.python or sys.executable, eval_lines=lines,
        srun_options=srun_options, what=what)
