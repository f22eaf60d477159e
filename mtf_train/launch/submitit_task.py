"""What submitit runs: one task per node, each starting that node's launcher from the rendered job script.

The rendered `job.sbatch` holds everything a node needs (environment, first-run flags decided from the
checkpoint folder, the rendezvous on the first host, the chain's finished/failures files); run with
`MTF_JOB_ROLE=node` it starts only the calling node's `torch.distributed.run` (node rank = SLURM_PROCID).

Pre-timeout: submitit asks SLURM for its signal (`--signal=USR2@<cluster.signal_margin_s>`) to every task.
The launchers and trainers ignore it (it would kill them); submitit's handler on task 0 calls
`checkpoint()`, which touches the run's kill switch, waits for the trainer to save and exit, and hands
submitit this same callable to requeue: the requeued job resumes from the latest checkpoint.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from submitit.core.job_environment import JobEnvironment
from submitit.helpers import Checkpointable, DelayedSubmission


def _preempt_signal() -> int:
    return getattr(signal, "SIG" + JobEnvironment.USR_SIG, signal.SIGUSR2)


class NodeLauncher(Checkpointable):
    def __init__(self, run_dir: str, stop_wait_s: float = 240.0):
        self.run_dir = str(run_dir)
        self.stop_wait_s = float(stop_wait_s)
        self._proc: subprocess.Popen | None = None
        self._code: int | None = None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_proc"] = state["_code"] = None  # a live process does not travel into the requeued job
        return state

    def _reap(self) -> int | None:
        """The job script's exit code once it has ended, else None. Plain waitpid, no lock: the signal
        handler may call this while the main loop is in the middle of it."""
        if self._code is not None or self._proc is None:
            return self._code
        try:
            pid, status = os.waitpid(self._proc.pid, os.WNOHANG)
        except ChildProcessError:  # reaped by the other caller
            return self._code if self._code is not None else 0
        if pid == 0:
            return None
        self._code = os.waitstatus_to_exitcode(status)
        self._proc.returncode = self._code
        return self._code

    def __call__(self) -> dict:
        run_dir = Path(self.run_dir)
        rank = int(os.environ.get("SLURM_PROCID", "0"))
        env = dict(os.environ, MTF_JOB_ROLE="node")
        sig = _preempt_signal()
        # Without SLURM (submitit's local executor) the job gets a session of its own, so that a Ctrl-C at the
        # terminal reaches mtf-train alone, which turns it into the kill switch; job.pid lets it find the job.
        local = "SLURM_JOB_ID" not in os.environ
        self._proc = subprocess.Popen(["bash", str(run_dir / "job.sbatch")], env=env, cwd=run_dir,
                                      stdin=subprocess.DEVNULL, start_new_session=local,
                                      preexec_fn=lambda: signal.signal(sig, signal.SIG_IGN))
        if local:
            (run_dir / "job.pid").write_text(f"{self._proc.pid}\n")
        # Poll rather than wait(): submitit's signal handler (checkpoint) must be able to wait on it too.
        while (code := self._reap()) is None:
            time.sleep(0.5)
        if code != 0:
            raise RuntimeError(f"node {rank}: the job script exited {code}; see {run_dir / 'logs' / 'main.log'}")
        return {"node_rank": rank, "finished": (run_dir / "finished").exists()}

    def checkpoint(self, *args, **kwargs) -> DelayedSubmission:
        """Called by submitit on task 0 at the pre-timeout signal: save through the kill switch, then requeue."""
        run_dir = Path(self.run_dir)
        (run_dir / "kill-switch").touch()
        with open(run_dir / "events.log", "a") as fh:
            fh.write(f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} job={os.environ.get('SLURM_JOB_ID', '?')} "
                     f"submitit pre-timeout signal: save, exit and requeue\n")
        deadline = time.monotonic() + self.stop_wait_s
        while self._proc is not None and self._reap() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        return super().checkpoint(*args, **kwargs)
