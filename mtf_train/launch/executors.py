"""Executors behind one interface: `submit` a rendered run folder, its jobs' `status`, `cancel` them.

- slurm: `sbatch` of the rendered job (a chain of N jobs linked by afterany); status from squeue/sacct; scancel.
- submitit: submitit's SLURM executor (its local one without srun); on SLURM its jobs are SLURM's, without it
  its job is a process here, watched and stopped like a local run.
- local: `bash job.sbatch` on this machine; status from its processes; cancel touches the kill switch.

`run_to_end` runs one short batch script and waits for it (preflight).

The executor is chosen once: from the recipe (`executor`, `--executor`) at submission, from run.json afterwards.
No torch import.
"""
from __future__ import annotations

import subprocess
import time
from pathlib import Path

from mtf_train.errors import UserError
from mtf_train.launch import slurm
from mtf_train.launch.runfolder import RunInfo, local_alive
from mtf_train.plan import Shape
from mtf_train.recipe.schema import Recipe


class Executor:
    name = ""
    chains = True      # --chain N means something (N jobs, or N-1 requeues)
    runs_here = False  # the job runs on this machine: one node only, its data checked before it starts

    def check(self, r: Recipe, shape: Shape, where: str) -> None:
        """What this executor cannot do with the recipe: one line before a run folder exists."""

    def check_chain(self, chain: int | None, where: str) -> None:
        if chain is not None and chain < 1:
            raise UserError(where, f"--chain must be at least 1, got {chain}")
        if chain is not None and chain > 1 and not self.chains:
            raise UserError(where, f"--chain needs executor slurm or submitit (a {self.name} run is one job)")

    def submit(self, r: Recipe | None, shape: Shape | None, run_dir: Path, chain: int | None,
               resumed: bool = False) -> int:
        """Start the run folder's job (`r` None: a resume); the exit code of `mtf-train` (a run here returns
        when it ends)."""
        raise NotImplementedError

    def status(self, info: dict) -> tuple[list[slurm.JobState], bool | None]:
        """(the run's scheduler jobs, whether its processes here are alive: None when it has none here)."""
        raise NotImplementedError

    def active(self, info: dict) -> bool:
        """Whether the run may still write to its log."""
        raise NotImplementedError

    def cancel(self, run_dir: Path, info: dict) -> int:
        raise NotImplementedError

    def run_to_end(self, script: Path, run: RunInfo, timeout_s: float, what: str) -> tuple[bool, str]:
        """Run one batch script and wait at most `timeout_s` for it: (completed, how it ended)."""
        raise NotImplementedError


class SlurmExecutor(Executor):
    name = "slurm"

    def submit(self, r, shape, run_dir, chain, resumed=False):
        from mtf_train.launch.submit import _submit_slurm
        return _submit_slurm(run_dir, chain or 1, resumed=resumed)

    def status(self, info):
        ids = job_ids(info)
        states = slurm.job_states(ids) if ids else {}
        return [states[j] for j in ids], None

    def active(self, info):
        # A job whose state could not be asked (a controller too busy to answer) counts as active; so does the
        # next job of a chain while it waits for the one before to end.
        jobs, _ = self.status(info)
        return any(s.active or (s.state == "UNKNOWN" and not s.source) for s in jobs)

    def cancel(self, run_dir, info):
        # The evaluation job too: it would otherwise run after a cancelled chain, only to find no finished run.
        ids = job_ids(info) + [str(j) for j in info.get("eval_job_ids") or []]
        if not ids:
            print(f"nothing to cancel: {run_dir} has no jobs (state {info.get('state', 'unknown')})")
            return 0
        states = slurm.job_states(ids)
        live = [j for j in ids if not states[j].terminal]  # UNKNOWN too: scancel tells
        if not live:
            print(f"nothing to cancel: jobs {' '.join(f'{j} {states[j].state}' for j in ids)}")
            return 0
        ok, message = slurm.cancel(live)
        if not ok:
            raise UserError(str(run_dir), f"scancel failed: {message}")
        run = RunInfo(run_dir)
        run.update(state="cancelled", cancelled=live)
        run.event(f"cancelled jobs {' '.join(live)}")
        print(f"cancelled job(s) {' '.join(live)} of {run_dir}")
        return 0

    def run_to_end(self, script, run, timeout_s, what):
        deadline = time.monotonic() + timeout_s
        job_id, error = slurm.sbatch([str(script)])
        if job_id is None:
            run.event(f"submit failed: {error}")
            return False, f"sbatch failed: {error}"
        run.update(state="submitted", job_ids=[job_id])
        run.event(f"submitted {what} job {job_id}")
        print(f"submitted {what} job {job_id}; waiting (at most {timeout_s:.0f}s)", flush=True)
        state = None
        while time.monotonic() < deadline:
            state = slurm.job_states([job_id])[job_id]
            if state.terminal:
                return state.state == "COMPLETED", f"job {job_id} {state.state}"
            time.sleep(1.0)
        slurm.cancel([job_id])
        last = state.state if state else "unknown"
        run.event(f"timed out after {timeout_s:.0f}s (job {last}); cancelled")
        return False, f"job {job_id} did not end within {timeout_s:.0f}s (last state {last}); cancelled it"


class LocalExecutor(Executor):
    name = "local"
    chains = False
    runs_here = True

    def check(self, r, shape, where):
        if shape.world_size > 1 and r.cluster.nodes > 1:
            raise UserError(where, f"executor local runs on one machine; the recipe asks for "
                            f"{r.cluster.nodes} nodes", field="cluster.nodes")

    def submit(self, r, shape, run_dir, chain, resumed=False):
        from mtf_train.launch.submit import _run_local
        return _run_local(run_dir)

    def status(self, info):
        return [], local_alive(info) if info.get("state") == "running" else None

    def active(self, info):
        return info.get("state") == "running" and local_alive(info) is not False

    def cancel(self, run_dir, info):
        run = RunInfo(run_dir)
        alive = local_alive(info) if info.get("state") == "running" else False
        if alive is False and info.get("state") == "running":
            from mtf_train.launch.watch import run_status
            s = run_status(run_dir)  # what its job recorded last, since its launcher could not
            run.update(state=s["recorded_state"], error=s["error"])
            run.event(f"cancel: the local run's processes have ended; recorded it as {s['recorded_state']}")
            print(f"nothing to cancel: the local run's processes have ended ({s['state']}); resume with: "
                  f"mtf-train resume {run_dir}")
            return 0
        if alive is not False:
            (run_dir / "kill-switch").touch()
            run.event("cancel: touched the kill switch (local run): save and exit")
            print(f"asked the local run to save and exit (touched {run_dir / 'kill-switch'})")
            return 0
        print(f"nothing to cancel: {run_dir} has no jobs (state {info.get('state', 'unknown')})")
        return 0

    def run_to_end(self, script, run, timeout_s, what):
        run.update(state="running")
        try:
            proc = subprocess.run(["bash", str(script)], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                  timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return False, f"timed out after {timeout_s:.0f}s"
        return proc.returncode == 0, f"exit {proc.returncode}"


class SubmititExecutor(Executor):
    """submitit's SLURM executor where sbatch and srun are, else its local one: its jobs are then SLURM's or a
    process here, and are watched and stopped as such."""
    name = "submitit"

    def __init__(self, on_slurm: bool | None = None):
        self.on_slurm = slurm.available("srun") and slurm.available("sbatch") if on_slurm is None else on_slurm
        self.runs_here = not self.on_slurm
        self._jobs: Executor = SlurmExecutor() if self.on_slurm else LocalExecutor()

    def submit(self, r, shape, run_dir, chain, resumed=False):
        from mtf_train.launch.submit import _submit_submitit
        if r is None:  # a resume: submitit's parameters are made again from the run's resolved recipe
            from mtf_train.plan import derive_shape
            from mtf_train.recipe.load import load_recipe

            r = load_recipe(run_dir / "recipe.resolved.yaml")
            shape = derive_shape(r)
        return _submit_submitit(r, shape, run_dir, chain, resumed=resumed)

    def status(self, info):
        return self._jobs.status(info)

    def active(self, info):
        return self._jobs.active(info)

    def cancel(self, run_dir, info):
        return self._jobs.cancel(run_dir, info)

    def run_to_end(self, script, run, timeout_s, what):  # a plain batch script: SLURM's, or a process here
        return self._jobs.run_to_end(script, run, timeout_s, what)


EXECUTORS = {cls.name: cls for cls in (SlurmExecutor, SubmititExecutor, LocalExecutor)}


def job_ids(info: dict) -> list[str]:
    return [str(j) for j in info.get("job_ids") or []]


def choose(r: Recipe, override: str | None) -> Executor:
    """The executor a submission uses: --executor, else the recipe's; auto = slurm when sbatch is on PATH or
    the recipe needs several nodes (a dry run on a laptop renders the cluster job it would submit)."""
    name = override or r.executor
    if name == "auto":
        name = "slurm" if slurm.available("sbatch") or r.cluster.nodes > 1 else "local"
    if name not in EXECUTORS:
        raise UserError(str(r.origin.path), f"unknown executor {name!r}", field="executor")
    return EXECUTORS[name]()


def of_run(info: dict) -> Executor:
    """The executor that holds a run's jobs, from its run.json: a run submitted through submitit has SLURM job
    ids, or ran here."""
    name = info.get("executor") or "local"
    if name == "submitit":
        return SubmititExecutor(on_slurm=bool(job_ids(info)))
    return EXECUTORS.get(name, LocalExecutor)()
