"""`mtf-train RECIPE`: a new run folder, then the recipe's executor."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from mtf_train.errors import UserError
from mtf_train.launch.runfolder import RunInfo, create_run_folder, initial_info, runs_root
from mtf_train.plan import Plan, Shape, format_plan
from mtf_train.recipe.schema import Recipe
from mtf_train.render.job import render_job


class SubmitError(UserError):
    exit_code = 1


def resolve_executor(r: Recipe, override: str | None) -> str:
    executor = override or r.executor
    if executor == "auto":
        executor = "slurm" if shutil.which("sbatch") else "local"
    return executor


def submit(r: Recipe, shape: Shape, plan: Plan, *, executor: str | None, dry_run: bool,
           runs_dir: str | None) -> int:
    executor = resolve_executor(r, executor)
    if executor == "local" and shape.world_size > 1 and r.cluster.nodes > 1:
        raise UserError(str(r.origin.path), f"executor local runs on one machine; the recipe asks for "
                        f"{r.cluster.nodes} nodes", field="cluster.nodes")

    def fill(final: Path, staging: Path) -> None:
        render_job(r, shape, plan, final, write_to=staging)
        info = RunInfo(staging)
        info.write(initial_info(r.name, str(r.origin.path), executor))
        info.event(f"rendered for executor {executor}")

    run_dir = create_run_folder(runs_root(runs_dir), r.name, fill)
    print(format_plan(plan))
    print(f"run folder: {run_dir}")
    if dry_run:
        RunInfo(run_dir).event("dry run: nothing submitted")
        print(f"dry run: nothing submitted; the job script is {run_dir / 'job.sbatch'}")
        return 0
    if executor == "slurm":
        return _submit_slurm(run_dir)
    if executor == "local":
        return _run_local(run_dir)
    raise SubmitError(str(r.origin.path), f"executor {executor!r} is not available yet", field="executor")


def _submit_slurm(run_dir: Path) -> int:
    info = RunInfo(run_dir)
    if not shutil.which("sbatch"):
        info.update(state="failed", error="sbatch not found on PATH")
        info.event("submit failed: sbatch not found on PATH")
        raise SubmitError(str(run_dir), "sbatch not found on PATH (use --executor local on a single machine)")
    proc = subprocess.run(["sbatch", "--parsable", str(run_dir / "job.sbatch")], capture_output=True, text=True)
    if proc.returncode != 0:
        message = " ".join(proc.stderr.split()) or f"sbatch exited with {proc.returncode}"
        info.update(state="failed", error=message)
        info.event(f"submit failed: {message}")
        raise SubmitError(str(run_dir), f"sbatch failed: {message}")
    job_id = proc.stdout.strip().split(";")[0]
    info.update(state="submitted", job_ids=[job_id])
    info.event(f"submitted job {job_id}")
    print(f"submitted job {job_id}; follow it with: mtf-train status {run_dir}")
    return 0


def _run_local(run_dir: Path) -> int:
    info = RunInfo(run_dir)
    info.update(state="running")
    info.event("local run started")
    print(f"running on this machine: bash {run_dir / 'job.sbatch'}", flush=True)
    proc = subprocess.run(["bash", str(run_dir / "job.sbatch")], stdin=subprocess.DEVNULL)
    state = "completed" if proc.returncode == 0 else "failed"
    info.update(state=state, exit_code=proc.returncode)
    info.event(f"local run {state} (exit {proc.returncode})")
    print(f"local run {state} (exit {proc.returncode}); run folder: {run_dir}", file=sys.stderr if proc.returncode else sys.stdout)
    return proc.returncode
