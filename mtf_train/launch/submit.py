"""`mtf-train RECIPE`: a new run folder, then the recipe's executor.

- slurm: `sbatch` of the rendered job; `--chain N` submits N jobs, each `--dependency=afterany:` the one before
  (the job script skips once `finished` exists or after too many failures in a row, and then cancels what is
  still pending of the chain, listed in `chain.jobs`).
- submitit: submitit's SLURM executor (its local one without srun), one task per node running the node's
  launcher; submitit requeues the job at the pre-timeout signal (Checkpointable), up to N-1 times with
  `--chain N` (submitit's default of 3 otherwise).
- local: `bash job.sbatch` on this machine, in the foreground.

No torch/DeepSpeed/megatron import on this path.
"""
from __future__ import annotations

import contextlib
import io
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from mtf_train.errors import UserError
from mtf_train.launch import slurm
from mtf_train.launch.runfolder import RunInfo, create_run_folder, initial_info, runs_root
from mtf_train.plan import Plan, Shape, format_plan
from mtf_train.recipe.schema import Recipe
from mtf_train.render.job import render_job, write_atomic


class SubmitError(UserError):
    exit_code = 1


def resolve_executor(r: Recipe, override: str | None) -> str:
    executor = override or r.executor
    if executor == "auto":
        executor = "slurm" if shutil.which("sbatch") else "local"
    return executor


def rendered_save_dir(job_script: Path) -> str | None:
    """The checkpoint folder the rendered job saves into (its `SAVE=` line)."""
    m = re.search(r"^SAVE=(.*)$", job_script.read_text(), re.M)
    if not m:
        return None
    parts = shlex.split(m.group(1))
    return parts[0] if parts else None


def submit(r: Recipe, shape: Shape, plan: Plan, *, executor: str | None, dry_run: bool,
           runs_dir: str | None, chain: int | None = None) -> int:
    executor = resolve_executor(r, executor)
    where = str(r.origin.path)
    if executor == "local" and shape.world_size > 1 and r.cluster.nodes > 1:
        raise UserError(where, f"executor local runs on one machine; the recipe asks for "
                        f"{r.cluster.nodes} nodes", field="cluster.nodes")
    if chain is not None and chain < 1:
        raise UserError(where, f"--chain must be at least 1, got {chain}")
    if chain is not None and chain > 1 and executor == "local":
        raise UserError(where, "--chain needs executor slurm or submitit (a local run is one job)")

    def fill(final: Path, staging: Path) -> None:
        rendered = render_job(r, shape, plan, final, write_to=staging)
        (staging / "logs").mkdir(exist_ok=True)
        info = RunInfo(staging)
        data = initial_info(r.name, where, executor)
        data.update(save=rendered_save_dir(staging / rendered.job_script.name), train_iters=shape.train_iters,
                    nodes=r.cluster.nodes, processes_per_node=r.cluster.gpus_per_node, chain=chain or 1)
        info.write(data)
        info.event(f"rendered for executor {executor}")

    run_dir = create_run_folder(runs_root(runs_dir), r.name, fill)
    print(format_plan(plan))
    print(f"run folder: {run_dir}")
    if dry_run:
        RunInfo(run_dir).event("dry run: nothing submitted")
        print(f"dry run: nothing submitted; the job script is {run_dir / 'job.sbatch'}")
        return 0
    if executor == "slurm":
        return _submit_slurm(run_dir, chain or 1)
    if executor == "submitit":
        return _submit_submitit(r, shape, run_dir, chain)
    if executor == "local":
        return _run_local(run_dir)
    raise SubmitError(where, f"unknown executor {executor!r}", field="executor")


def _fail(info: RunInfo, message: str, **extra) -> SubmitError:
    info.update(state="failed", error=message, **extra)
    info.event(f"submit failed: {message}")
    return SubmitError(str(info.dir), message)


def _submit_slurm(run_dir: Path, chain: int) -> int:
    info = RunInfo(run_dir)
    if not slurm.available("sbatch"):
        raise _fail(info, "sbatch not found on PATH (use --executor local on a single machine)")
    job = str(run_dir / "job.sbatch")
    ids: list[str] = []
    commands: list[list[str]] = []
    for _ in range(chain):
        args = ([f"--dependency=afterany:{ids[-1]}"] if ids else []) + [job]
        commands.append(["sbatch", "--parsable", *args])
        job_id, error = slurm.sbatch(args)
        if job_id is None:
            if ids:
                slurm.cancel(ids)
                error += f" (job {len(ids) + 1} of the chain; cancelled the jobs already submitted: {' '.join(ids)})"
            raise _fail(info, f"sbatch failed: {error}", job_ids=ids, submit_commands=commands)
        ids.append(job_id)
        write_atomic(run_dir / "chain.jobs", "\n".join(ids) + "\n")
        info.update(state="submitted", job_ids=ids, submit_commands=commands)
        info.event(f"submitted job {job_id}" + (f" (after {ids[-2]} ends: afterany)" if len(ids) > 1 else ""))
    if (run_dir / "eval.sbatch").is_file():
        _submit_eval(run_dir, ids, commands)
    if chain == 1:
        print(f"submitted job {ids[0]}; follow it with: mtf-train status {run_dir}")
    else:
        print(f"submitted a chain of {chain} jobs: {' -> '.join(ids)} (each starts when the one before ends); "
              f"follow it with: mtf-train status {run_dir}")
    return 0


def _submit_eval(run_dir: Path, ids: list[str], commands: list[list[str]]) -> None:
    """The evaluation job after the chain: afterok on a single job; on a chain afterany on its last job, since
    the job that finishes training cancels the chain's later ones (eval.sbatch checks `finished` itself)."""
    info = RunInfo(run_dir)
    kind = "afterok" if len(ids) == 1 else "afterany"
    args = [f"--dependency={kind}:{ids[-1]}", str(run_dir / "eval.sbatch")]
    commands.append(["sbatch", "--parsable", *args])
    job_id, error = slurm.sbatch(args)
    if job_id is None:
        info.update(eval_error=f"sbatch failed: {error}", submit_commands=commands)
        info.event(f"eval job not submitted: {error}")
        print(f"mtf-train: warning: the evaluation job was not submitted: {error}", file=sys.stderr)
        return
    info.update(eval_job_ids=[job_id], submit_commands=commands)
    info.event(f"submitted evaluation job {job_id} ({kind}:{ids[-1]})")
    print(f"submitted evaluation job {job_id}, after job {ids[-1]} ({kind}); results in {run_dir / 'eval'}")


def _extra_sbatch(lines: list[str]) -> dict:
    """`extra_sbatch` lines (`--key=value`, `--key value`, `--flag`) as submitit's additional_parameters."""
    out: dict = {}
    for line in lines:
        text = line.strip().removeprefix("--")
        key, sep, value = text.partition("=")
        if not sep:
            key, _, value = text.partition(" ")
        out[key.strip().replace("-", "_")] = value.strip() if value.strip() else True
    return out


def _submit_submitit(r: Recipe, shape: Shape, run_dir: Path, chain: int | None) -> int:
    import submitit

    from mtf_train.launch.submitit_task import NodeLauncher

    info = RunInfo(run_dir)
    c = r.cluster
    on_slurm = slurm.available("srun") and slurm.available("sbatch")
    max_requeues = (chain - 1) if chain else 3
    stop_wait = max(10, c.signal_margin_s - 15)
    minutes = shape.time_minutes or 60
    folder = run_dir / "submitit"
    python = shlex.quote(r.runtime.python) if r.runtime.python else None
    task = NodeLauncher(str(run_dir), stop_wait_s=stop_wait)
    try:
        if on_slurm:
            ex = submitit.SlurmExecutor(folder=folder / "%j", max_num_timeout=max_requeues, python=python)
            params: dict = dict(job_name=r.name, nodes=c.nodes, ntasks_per_node=1, time=minutes,
                                signal_delay_s=c.signal_margin_s, stderr_to_stdout=True,
                                setup=list(r.environment.setup))
            for name in ("partition", "account", "qos", "constraint", "cpus_per_task"):
                if getattr(c, name):
                    params[name] = getattr(c, name)
            if c.accelerator == "gpu":
                params["gpus_per_node"] = c.gpus_per_node
            if c.exclude:
                params["exclude"] = ",".join(c.exclude)
            if c.exclusive:
                params["exclusive"] = True
            extra = _extra_sbatch(c.extra_sbatch)
            if c.hint:
                extra["hint"] = c.hint
            if extra:
                params["additional_parameters"] = extra
            ct = r.environment.container
            if ct.image:
                srun_args = [f"--container-image={ct.image}"]
                if ct.mounts:
                    srun_args.append("--container-mounts=" + ",".join(ct.mounts))
                if ct.workdir:
                    srun_args.append(f"--container-workdir={ct.workdir}")
                params["srun_args"] = srun_args
        else:
            if c.nodes > 1:
                raise _fail(info, f"submitit without SLURM (no srun/sbatch on PATH) runs on one machine; the recipe "
                            f"asks for {c.nodes} nodes")
            ex = submitit.LocalExecutor(folder=folder, max_num_timeout=max_requeues, python=python)
            params = dict(timeout_min=minutes, nodes=1, tasks_per_node=1, signal_delay_s=c.signal_margin_s,
                          setup=list(r.environment.setup))
        ex.update_parameters(**params)
        with contextlib.redirect_stderr(io.StringIO()):  # submitit echoes sbatch's stderr; we say it once
            job = ex.submit(task)
    except SubmitError:
        raise
    except Exception as err:  # submitit wraps sbatch's failure; report sbatch's own words on one line
        message = slurm.one_line(str(err)) or type(err).__name__
        m = re.search(r"(sbatch: error: .*)", message)
        raise _fail(info, f"submitit failed: {m.group(1) if m else message}") from None
    kind = "slurm" if on_slurm else "local"
    details = {"executor": kind, "folder": str(folder), "max_requeues": max_requeues}
    if on_slurm:
        info.update(state="submitted", job_ids=[str(job.job_id)], submitit=details)
    else:  # a process id, not a SLURM job: status must not ask squeue about it
        info.update(state="running", submitit=details | {"local_pid": str(job.job_id)})
    info.event(f"submitted job {job.job_id} through submitit ({kind}; requeued at most {max_requeues} times)")
    if on_slurm:
        print(f"submitted job {job.job_id} through submitit; follow it with: mtf-train status {run_dir}")
        return 0
    # submitit's local executor: the job is a child of this process, so wait for it like executor local.
    print(f"running on this machine through submitit (job {job.job_id}); logs in {run_dir / 'logs'}", flush=True)
    try:
        job.result()
        state, code = "completed", 0
    except Exception as err:  # the task raised: its message names the exit code and the log
        state, code = "failed", 1
        print(f"mtf-train: error: {run_dir}: {slurm.one_line(str(err).splitlines()[-1] if str(err) else '')}",
              file=sys.stderr)
    info.update(state=state, exit_code=code)
    info.event(f"submitit local job {state}")
    return code


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
