"""Render a validated recipe into the files a job needs: sbatch script, DeepSpeed config, path files, plan."""
from __future__ import annotations

import json
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import jinja2

import mtf_train
from mtf_train.data.pathfile import format_groups
from mtf_train.errors import UserError
from mtf_train.files import write_atomic
from mtf_train.plan import Plan, Shape, format_plan
from mtf_train.recipe.directives import Directives, directives
from mtf_train.recipe.load import dump_recipe, path_groups
from mtf_train.recipe.runtime import runtime
from mtf_train.recipe.schema import Recipe
from mtf_train.render.ds_config import ds_config
from mtf_train.render.trainer_args import trainer_args

TEMPLATES = Path(__file__).resolve().parents[2] / "slurm"
MAX_FAILURES = 3


@dataclass(frozen=True)
class Rendered:
    """What `render_job` decided: where things are and what the scheduler is asked for (paths are the run
    folder's, even when the files were written elsewhere to be moved there)."""
    run_dir: Path
    job_script: Path
    files: list[Path]
    save_dir: Path
    directives: Directives
    eval_script: Path | None = None


def _arg_lines(args: list[str]) -> list[str]:
    """Quoted arguments, one flag and its values per line, for a readable script."""
    lines: list[list[str]] = []
    for a in args:
        if a.startswith("--") or not lines:
            lines.append([])
        lines[-1].append(shlex.quote(a))
    return [" ".join(x) for x in lines]


def template_env() -> jinja2.Environment:
    # Bash's `${#array[@]}` would open a Jinja comment: templates use `{#-- ... --#}` for comments instead.
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), undefined=jinja2.StrictUndefined,
                             keep_trailing_newline=True, autoescape=False,
                             comment_start_string="{#--", comment_end_string="--#}")
    env.filters["q"] = lambda v: shlex.quote(str(v))
    return env


def job_env(r: Recipe) -> list[tuple[str, str]]:
    """The variables the job exports: `environment.env`, plus the launch-blocking switch when it is on (an
    explicit `environment.env` entry wins)."""
    env = dict(r.environment.env)
    if r.cluster.cuda_launch_blocking:
        env.setdefault("CUDA_LAUNCH_BLOCKING", "1")
    return sorted(env.items())


def srun_options(r: Recipe) -> list[str]:
    """srun options for the launchers: the pyxis container, when the recipe names one."""
    ct = r.environment.container
    if not ct.image:
        return []
    out = [f"--container-image={ct.image}"]
    if ct.mounts:
        out.append("--container-mounts=" + ",".join(ct.mounts))
    if ct.workdir:
        out.append(f"--container-workdir={ct.workdir}")
    return out


def render_job(r: Recipe, shape: Shape, plan: Plan, run_dir: str | os.PathLike,
               write_to: str | os.PathLike | None = None) -> Rendered:
    """Render into `write_to` (default `run_dir`) files whose paths point into `run_dir`."""
    run_dir = Path(run_dir).resolve()
    if any(c.isspace() for c in str(run_dir)):
        raise UserError(str(run_dir), "the run folder's path must not contain whitespace (SLURM's --output)")
    out = Path(write_to).resolve() if write_to is not None else run_dir
    (out / "logs").mkdir(parents=True, exist_ok=True)  # SLURM opens --output there before the script runs
    files: list[Path] = []

    def put(rel: str, text: str, mode: int | None = None) -> Path:
        files.append(write_atomic(out / rel, text, mode))
        return run_dir / rel

    # Path files, rebased onto data.root so that the job reads absolute prefixes.
    train_groups, valid_groups = path_groups(r)
    train_name = Path(r.data.train_path).name if r.data.train_path else "train_groups.txt"
    train_file = put(f"data_paths/{train_name}", format_groups(train_groups))
    valid_file = None
    if valid_groups:
        valid_name = Path(r.data.valid_path).name if r.data.valid_path else "valid_groups.txt"
        valid_file = put(f"data_paths/{valid_name}", format_groups(valid_groups))

    save = Path(r.checkpoint.save)
    save = save if save.is_absolute() else run_dir / save
    ds_path = put("ds_config.json", json.dumps(ds_config(r, shape), indent=2) + "\n")
    ta = trainer_args(r, shape, save=str(save),
                      tensorboard_dir=str(run_dir / "tensorboard") if r.logging.tensorboard else None,
                      ds_config=str(ds_path), train_path=str(train_file),
                      valid_path=str(valid_file) if valid_file else None, kill_switch="$KILL_SWITCH_PATH")

    c = r.cluster
    # The kill-switch path is a variable of the job script: expanded there, not quoted as a literal.
    lines = [ln.replace("'$KILL_SWITCH_PATH'", '"$KILL_SWITCH_PATH"') for ln in _arg_lines(ta.common)]

    # SLURM's pre-timeout signal goes to the batch shell (B:), which turns it into the kill switch.
    d = directives(r, output=f"{run_dir}/logs/%x-%j.out", signal=f"B:USR1@{c.signal_margin_s}")
    python = r.runtime.python or sys.executable
    script = template_env().get_template("job.sbatch.j2").render(
        version=mtf_train.__version__, recipe_path=str(r.origin.path), directives=d.lines(), gpus_per_node=c.gpus_per_node,
        run_dir=str(run_dir), setup=r.environment.setup, env=job_env(r),
        max_failures=MAX_FAILURES, save=str(save), first_run=ta.first_run, first_load=ta.first_load or str(save),
        master_port=c.master_port, python=python, program=runtime(r).program(), common_lines=lines,
        standalone_launcher=runtime(r).standalone_launcher(python, c.gpus_per_node),
        srun_options=srun_options(r), train_iters=shape.train_iters)
    job = put("job.sbatch", script, mode=0o755)
    eval_script = None
    if r.eval.zero_shot.job != "none":
        from mtf_train.eval.job import render_eval_job

        eval_script = put("eval.sbatch", render_eval_job(r, plan, str(run_dir), srun_options(r), template_env()),
                          mode=0o755)
    put("recipe.resolved.yaml", dump_recipe(r))
    put("plan.txt", format_plan(plan) + "\n")
    put("plan.json", plan.to_json() + "\n")
    return Rendered(run_dir, job, files, save, d, eval_script)
