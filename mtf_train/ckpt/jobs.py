"""Reshapes too large for this machine, rendered as a batch job for a recipe's cluster.

The job runs `mtf-train ckpt reshape ... --here` inside an allocation sized for the larger of the two shapes
(its verification runs start one process per GPU), with the recipe's SLURM settings and environment set-up.
"""
from __future__ import annotations

import shlex
import sys
from pathlib import Path

from mtf_train.ckpt.layout import CkptError
from mtf_train.files import write_atomic


def render_reshape_job(src, *, tp: int, pp: int, dp: int, out: Path, method: str, verify: bool, recipe: str | None,
                       sets, job: str | None) -> Path:
    from mtf_train.recipe.directives import directives
    from mtf_train.recipe.load import load_recipe
    from mtf_train.render.job import job_env

    if not recipe:
        raise CkptError("--job", "needs --recipe RECIPE (its cluster settings run the job)")
    r = load_recipe(recipe, list(sets))
    c = r.cluster
    world = max(tp * pp * dp, src.ck.tp * src.ck.pp * src.ck.dp)
    if world > c.gpus_per_node:
        raise CkptError("--job", f"the verification runs need {world} processes on one node; the recipe's nodes have "
                        f"{c.gpus_per_node} GPUs (verification runs are single-node): reshape to a smaller dp")
    path = Path(job) if job else out.parent / f"reshape-{out.name}.sbatch"
    d = directives(r, job_name=f"reshape-{out.name}", nodes=1, output=f"{out.parent}/reshape-{out.name}-%j.out")
    lines = ["#!/bin/bash", f"# Rendered by mtf-train ckpt reshape: {src.ck.path} -> {out}",
             *(f"#SBATCH {x}" for x in d.lines())]
    lines += ["", "set -euo pipefail"]
    for k, v in job_env(r):
        lines.append(f"export {k}={shlex.quote(str(v))}")
    lines += list(r.environment.setup)
    cmd = [sys.executable, "-m", "mtf_train.cli", "ckpt", "reshape", str(src.ck.path), "--tp", str(tp), "--pp", str(pp),
           "--dp", str(dp), "-o", str(out), "--method", method, "--here"]
    if not verify:
        cmd.append("--no-verify")
    lines += ["", " ".join(shlex.quote(x) for x in cmd), ""]
    return write_atomic(path, "\n".join(lines), mode=0o755)

