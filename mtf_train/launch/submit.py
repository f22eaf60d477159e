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
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from mtf_train.errors import UserError
from mtf_train.launch import executors, slurm
from mtf_train.launch.runfolder import RunInfo, create_run_folder, initial_info, launcher_identity, runs_root
from mtf_train.plan import Plan, Shape, format_plan
from mtf_train.recipe.schema import Recipe
from mtf_train.files import write_atomic
from mtf_train.recipe.directives import dependency, directives
from mtf_train.render.job import render_job, srun_options


class SubmitError(UserError):
    exit_code = 1


def submit(r: Recipe, shape: Shape, plan: Plan, *, executor: str | None, dry_run: bool,
           runs_dir: str | None, chain: int | None = None) -> int:
    ex = executors.choose(r, executor)
    executor = ex.name
    where = str(r.origin.path)
    ex.check(r, shape, where)
    ex.check_chain(chain, where)

    if not dry_run and ex.runs_here:
        # The job runs here: a missing data.root or a damaged dataset is one line now, not a traceback from
        # every rank after torchrun's start-up.
        from mtf_train.recipe.validate import validate
        validate(r, check_data=True)

    def fill(final: Path, staging: Path) -> None:
        rendered = render_job(r, shape, plan, final, write_to=staging)
        (staging / "logs").mkdir(exist_ok=True)
        info = RunInfo(staging)
        data = initial_info(r.name, where, executor)
        data.update(save=str(rendered.save_dir), train_iters=shape.train_iters,
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
    return ex.submit(r, shape, run_dir, chain)


def _fail(info: RunInfo, message: str, **extra) -> SubmitError:
    info.update(state="failed", error=message, **extra)
    info.event(f"submit failed: {message}")
    return SubmitError(str(info.dir), message)


def _submit_slurm(run_dir: Path, chain: int, resumed: bool = False) -> int:
    info = RunInfo(run_dir)
    before = [str(j) for j in info.read().get("job_ids") or []] if resumed else []
    commands_before = list(info.read().get("submit_commands") or []) if resumed else []
    if not slurm.available("sbatch"):
        raise _fail(info, "sbatch not found on PATH (use --executor local on a single machine)")
    job = str(run_dir / "job.sbatch")
    ids: list[str] = []
    commands: list[list[str]] = []
    for _ in range(chain):
        args = ([dependency("afterany", ids[-1])] if ids else []) + [job]
        commands.append(["sbatch", "--parsable", *args])
        job_id, error = slurm.sbatch(args)
        if job_id is None:
            if ids:
                slurm.cancel(ids)
                error += f" (job {len(ids) + 1} of the chain; cancelled the jobs already submitted: {' '.join(ids)})"
            raise _fail(info, f"sbatch failed: {error}", job_ids=before + ids,
                        submit_commands=commands_before + commands)
        ids.append(job_id)
        write_atomic(run_dir / "chain.jobs", "\n".join(ids) + "\n")
        info.update(state="submitted", error=None, job_ids=before + ids, submit_commands=commands_before + commands)
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
    args = [dependency(kind, ids[-1]), str(run_dir / "eval.sbatch")]
    if kind == "afterok":  # a failed training job: cancel the evaluation rather than leave it pending forever
        args.insert(1, "--kill-on-invalid-dep=yes")
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


def _submit_submitit(r: Recipe, shape: Shape, run_dir: Path, chain: int | None, resumed: bool = False) -> int:
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
            # The recipe's directives (submitit writes its own log paths and pre-timeout signal), time in minutes.
            params = directives(r).submitit_parameters() | dict(
                signal_delay_s=c.signal_margin_s, stderr_to_stdout=True, setup=list(r.environment.setup))
            if srun_options(r):
                params["srun_args"] = srun_options(r)
        else:
            if c.nodes > 1:
                raise _fail(info, f"submitit without SLURM (no srun/sbatch on PATH) runs on one machine; the recipe "
                            f"asks for {c.nodes} nodes")
            ex = submitit.LocalExecutor(folder=folder, max_num_timeout=max_requeues, python=python)
            params = dict(timeout_min=minutes, nodes=1, tasks_per_node=1, signal_delay_s=c.signal_margin_s,
                          setup=list(r.environment.setup))
        ex.update_parameters(**params)
        # A local job's processes inherit an ignored SIGINT: a Ctrl-C at the terminal is this process's to handle.
        sigint = signal.signal(signal.SIGINT, signal.SIG_IGN) if not on_slurm else None
        try:
            with contextlib.redirect_stderr(io.StringIO()):  # submitit echoes sbatch's stderr; we say it once
                job = ex.submit(task)
        finally:
            if sigint is not None:
                signal.signal(signal.SIGINT, sigint)
    except SubmitError:
        raise
    except Exception as err:  # submitit wraps sbatch's failure; report sbatch's own words on one line
        message = slurm.one_line(str(err)) or type(err).__name__
        m = re.search(r"(sbatch: error: .*)", message)
        raise _fail(info, f"submitit failed: {m.group(1) if m else message}") from None
    kind = "slurm" if on_slurm else "local"
    details = {"executor": kind, "folder": str(folder), "max_requeues": max_requeues}
    before = [str(j) for j in info.read().get("job_ids") or []] if resumed else []
    if on_slurm:
        info.update(state="submitted", error=None, job_ids=before + [str(job.job_id)], submitit=details)
    else:  # a process id, not a SLURM job: status must not ask squeue about it
        info.update(state="running", error=None, submitit=details | {"local_pid": str(job.job_id)},
                    **launcher_identity())
    info.event(f"submitted job {job.job_id} through submitit ({kind}; requeued at most {max_requeues} times)")
    if on_slurm:
        print(f"submitted job {job.job_id} through submitit; follow it with: mtf-train status {run_dir}")
        return 0
    # submitit's local executor: the job is a child of this process, so wait for it like executor local.
    print(f"running on this machine through submitit (job {job.job_id}); logs in {run_dir / 'logs'}", flush=True)
    stops: list[str] = []

    def on_signal(signum, frame):
        name = signal.Signals(signum).name
        stops.append(name)
        if len(stops) == 1:
            print(f"\nmtf-train: {name}: saving a checkpoint, then stopping (send it again to stop at once, "
                  f"without saving)", file=sys.stderr, flush=True)
            info.event(f"{name}: touched the kill switch: save and exit")
            (run_dir / "kill-switch").touch()
            return
        print(f"mtf-train: {name} again: killing the job without saving", file=sys.stderr, flush=True)
        info.event(f"{name} again: killed the job without saving")
        with contextlib.suppress(OSError, ValueError):
            os.killpg(int((run_dir / "job.pid").read_text()), signal.SIGKILL)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        job.result()
        state, code, error = ("completed" if (run_dir / "finished").exists() else "stopped"), 0, None
    except Exception as err:  # the task raised: its message names the exit code and the log
        state, code = "failed", 1
        error = last_failure(run_dir) or slurm.one_line(str(err).splitlines()[-1] if str(err) else "")
        print(f"mtf-train: error: {run_dir}: {error}", file=sys.stderr)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if stops and state == "failed" and len(stops) > 1:
        state, error = "stopped", f"killed by {stops[-1]} without saving"
    info.update(state=state, exit_code=code, error=error)
    info.event(f"submitit local job {state}")
    if state == "stopped":
        print(f"stopped at step {_saved_step(run_dir) or 0} of {info.read().get('train_iters')}"
              + (f" ({stops[0]})" if stops else "") + f"; resume with: mtf-train resume {run_dir}")
        return 128 + int(getattr(signal, stops[0])) if stops else 0
    return code


def _saved_step(run_dir: Path) -> str | None:
    """The step of the run's latest checkpoint, read from `latest` (None: no checkpoint yet)."""
    save = RunInfo(run_dir).read().get("save")
    try:
        tag = (Path(save) / "latest").read_text().strip() if save else ""
    except OSError:
        return None
    return tag.removeprefix("global_step") or None


def last_failure(run_dir: Path) -> str | None:
    """The error the job script recorded with its last `failed:` event (the trainer's first error line)."""
    try:
        lines = (run_dir / "events.log").read_text(errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        if " failed: exit " in line:
            _, _, rest = line.partition(" failed: ")
            return rest.partition(": ")[2] or rest
    return None


# What a local run shows on the terminal: the trainer's own lines (plan of the run, loads, steps and losses,
# validation, saves, exits, where things are, its one-line errors), without torchrun's rank prefix. Everything
# else (library warnings, launcher banners, tracebacks) stays in logs/main.log.
USER_LINE = re.compile(r"^(training \d+ steps|loaded |step \d+/\d+ \||validation |saved checkpoint |exiting at step "
                       r"|training finished at step |checkpoint: |metrics: |loss curve: |mtf_train\.train: error: "
                       r"|FLOPs per token: |MFU[ :])")
RANK_PREFIX = re.compile(r"^\[(?:default|rank)\d+\]:\s?")


class _LogView:
    """Prints the user lines that appear in main.log after `start`."""

    def __init__(self, path: Path, start: int):
        self.path, self.pos, self.rest, self.seen_errors = path, start, b"", set()

    def pump(self) -> None:
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self.pos)
                data = fh.read()
        except OSError:
            return
        self.pos += len(data)
        *lines, self.rest = (self.rest + data).split(b"\n")
        for raw in lines:
            line = RANK_PREFIX.sub("", raw.decode(errors="replace").rstrip("\r"))
            if not USER_LINE.match(line):
                continue
            if line.startswith("mtf_train.train: error: "):
                if line in self.seen_errors:  # every rank says it
                    continue
                self.seen_errors.add(line)
            print(line, flush=True)


def _run_local(run_dir: Path) -> int:
    """`bash job.sbatch` in a session of its own, its output going to logs/main.log, while this process shows the
    user lines of that log. Ctrl-C at the terminal reaches only this process, which passes a first Ctrl-C (or
    SIGTERM, SIGHUP) to the job script as the TERM it turns into the kill switch (save, then exit), and a second
    one as SIGKILL to the whole job. The job does not depend on this process: killed outright, it leaves the job
    training, and `status`/`cancel` find it."""
    info = RunInfo(run_dir)
    data = info.read()
    train_iters = data.get("train_iters")
    info.update(state="running", error=None, **launcher_identity())
    info.event("local run started")
    log = run_dir / "logs" / "main.log"
    log.parent.mkdir(exist_ok=True)
    print(f"running on this machine: bash {run_dir / 'job.sbatch'} (full log: {log})", flush=True)
    with open(log, "ab") as out:
        view = _LogView(log, out.tell())
        proc = subprocess.Popen(["bash", str(run_dir / "job.sbatch")], stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True, env=dict(os.environ, MTF_LOG_ONLY="1"))
    info.update(job_pid=proc.pid)
    stops: list[str] = []

    def on_signal(signum, frame):
        name = signal.Signals(signum).name
        stops.append(name)
        try:
            if len(stops) == 1:
                print(f"\nmtf-train: {name}: saving a checkpoint, then stopping (send it again to stop at once, "
                      f"without saving)", file=sys.stderr, flush=True)
                info.event(f"{name}: asked the job to save and exit")
                os.kill(proc.pid, signal.SIGTERM)
            else:
                print(f"mtf-train: {name} again: killing the job without saving", file=sys.stderr, flush=True)
                info.event(f"{name} again: killed the job without saving")
                os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.signal(sig, on_signal) for sig in handled}
    try:
        while (code := proc.poll()) is None:
            view.pump()
            time.sleep(0.2)
        view.pump()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    step = _saved_step(run_dir)
    resume = f"resume with: mtf-train resume {run_dir}"
    if code == 0 and (run_dir / "finished").exists():
        info.update(state="completed", exit_code=0)
        info.event("local run completed")
        print(f"local run completed; run folder: {run_dir}")
        return 0
    if code == 0:
        why = f" ({stops[0]})" if stops else ""
        info.update(state="stopped", exit_code=0, stopped_by=stops[0] if stops else None)
        info.event(f"local run stopped at step {step or 0} of {train_iters}{why}")
        print(f"local run stopped at step {step or 0} of {train_iters}{why}, checkpoint saved; {resume}")
        return 128 + int(getattr(signal, stops[0])) if stops else 0
    if stops and code < 0 or len(stops) > 1:
        info.update(state="stopped", exit_code=code, stopped_by=stops[0])
        info.event(f"local run killed by {stops[-1]} (latest checkpoint: step {step or 'none'})")
        print(f"mtf-train: local run killed without saving; the latest checkpoint is step {step or 'none'}; {resume}",
              file=sys.stderr)
        return 128 + int(getattr(signal, stops[-1]))
    error = last_failure(run_dir) or f"the job script exited {code}"
    info.update(state="failed", exit_code=code, error=error)
    info.event(f"local run failed (exit {code})")
    print(f"mtf-train: error: {run_dir}: {error}; the log is {run_dir / 'logs' / 'main.log'}"
          + (f"; {resume}" if step else ""), file=sys.stderr)
    return code if code > 0 else 1


def resume(run_dir: Path, chain: int | None = None) -> int:
    """`mtf-train resume RUN`: start the run's job again with its own executor; it resumes from the run's latest
    checkpoint (the job script decides that), so the losses continue as if it had never stopped."""
    from mtf_train.launch.watch import run_status

    info = RunInfo(run_dir)
    data = info.read()
    where = str(run_dir)
    if data.get("kind") == "preflight":
        raise UserError(where, "is a preflight run: run `mtf-train preflight RECIPE` again")
    status = run_status(run_dir)
    if status["finished"]:
        raise UserError(where, f"has finished (step {data.get('train_iters')} of {data.get('train_iters')}): "
                        f"nothing to resume")
    if status["state"] in ("running", "pending"):
        what = f" (jobs {' '.join(j['job_id'] for j in status['jobs'] if j['active'])})" if status["jobs"] else ""
        raise UserError(where, f"is still {status['state']}{what}: follow it with `mtf-train logs -f`, or stop it "
                        f"with `mtf-train cancel` first")
    ex = executors.EXECUTORS.get(data.get("executor"), executors.LocalExecutor)()
    executor = ex.name
    ex.check_chain(chain, where)
    # A resume is the user's decision to try again: the chain's failure count starts over.
    write_atomic(run_dir / "failures", "0\n")
    step = _saved_step(run_dir)
    info.update(resumes=int(data.get("resumes") or 0) + 1)
    info.event(f"resume ({executor}) from step {step or 0}: {' '.join(initial_info('', '', '')['command'])}")
    print(f"resuming {run_dir} from " + (f"step {step}" if step else "its start (no checkpoint yet)"), flush=True)
    return ex.submit(None, None, run_dir, chain or data.get("chain"), resumed=True)
