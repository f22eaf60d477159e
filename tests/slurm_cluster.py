"""A real, local SLURM cluster for tests (see scripts/local-slurm).

Use it from a conftest or a test module::

    from tests.slurm_cluster import slurm_cluster  # noqa: F401  (a session-scoped fixture)

    def test_something(slurm_cluster, tmp_path):
        job = slurm_cluster.sbatch("--nodes=2", script="#!/bin/bash\\nsrun hostname\\n", cwd=tmp_path)
        assert slurm_cluster.wait_job(job, timeout=60) == "COMPLETED"

The fixture brings the cluster up once per session with ``scripts/local-slurm up --lease <pid>`` and,
at the end of the session, gives the lease back with ``scripts/local-slurm release <pid>``: the
cluster is taken down only if a fixture brought it up and no other live pytest session still holds
a lease (so a cluster started by hand, or one that a concurrent session is using, stays up).

It skips only when the machine cannot run a cluster: not Linux, not root, or the SLURM binaries
are missing and there is no apt-get to install them. Any other failure to start is a test error.

Environment: MTF_SLURM_NODES (nodes to ask for when the fixture starts the cluster, default 2),
MTF_SLURM_ROOT (passed through to the script), MTF_SLURM_UP_TIMEOUT (script's wait for idle nodes).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from mtf_train.launch.slurm import TERMINAL
from tests import local_slurm

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "local-slurm"

# Job states after which a job never runs again: mtf-train's own list (REQUEUED, COMPLETING are not final).
TERMINAL_STATES = TERMINAL

_START_TIMEOUT_S = 900  # includes apt-get update + install on a fresh machine


def unavailable_reason() -> str | None:
    """Why this machine cannot run the local cluster, or None when it can."""
    if not sys.platform.startswith("linux"):
        return f"local SLURM cluster needs Linux (this is {sys.platform})"
    if not SCRIPT.is_file():
        return f"{SCRIPT} is missing"
    if os.geteuid() != 0:
        return "local SLURM cluster needs root (it starts munged/slurmctld/slurmd and writes /etc/slurm, /etc/hosts)"
    missing = local_slurm.missing_binaries(accounting=False)
    if missing and local_slurm.which("apt-get") is None:
        return f"SLURM binaries missing ({' '.join(missing)}) and no apt-get to install them"
    return None


def parse_scontrol_record(line: str) -> dict[str, str]:
    """One `scontrol show ... -o` line as a dict; a token without '=' continues the previous value."""
    out: dict[str, str] = {}
    key = None
    for token in line.strip().split(" "):
        if not token:
            continue
        k, sep, v = token.partition("=")
        if sep and (k.replace("/", "").replace(":", "").replace("_", "").isalnum()):
            key = k
            out[key] = v
        elif key is not None:
            out[key] += " " + token
    return out


@dataclass
class SlurmCluster:
    """Handle on the running local cluster."""

    root: Path
    nodes: list[str]
    partition: str
    cpus_per_node: int
    gpus_per_node: int
    started_here: bool
    submitted: list[str] = field(default_factory=list)

    @property
    def log_dir(self) -> Path:
        return self.root / "log"

    # -- commands ----------------------------------------------------------------------------

    def run(self, *args: str, timeout: float = 30, check: bool = True, cwd: str | os.PathLike | None = None,
            input: str | None = None) -> subprocess.CompletedProcess:
        """Run a SLURM client command (bounded); raises with its output when check and it fails."""
        proc = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, env=local_slurm.ENV,
                              cwd=cwd, input=input)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}")
        return proc

    def sbatch(self, *args: str, script: str | None = None, cwd: str | os.PathLike | None = None,
               timeout: float = 30) -> str:
        """Submit a batch job (script text on stdin, or pass a script path / --wrap in args); returns its id."""
        proc = self.run("sbatch", "--parsable", *args, timeout=timeout, cwd=cwd, input=script)
        job_id = proc.stdout.strip().split(";")[0]
        if not job_id:
            raise RuntimeError(f"sbatch printed no job id: {proc.stdout!r} {proc.stderr!r}")
        self.submitted.append(job_id)
        return job_id

    def scancel(self, *job_ids: str, timeout: float = 30) -> None:
        if job_ids:
            self.run("scancel", *job_ids, timeout=timeout)

    def job_records(self, job_id: str) -> list[dict[str, str]]:
        """`scontrol show job -o ID` as dicts (several for an array); [] when slurmctld does not know it."""
        proc = self.run("scontrol", "show", "job", "-o", str(job_id), check=False)
        if proc.returncode != 0:
            if "Invalid job id" in proc.stderr:
                return []
            raise RuntimeError(f"scontrol show job {job_id} exited {proc.returncode}: {proc.stderr.strip()}")
        return [parse_scontrol_record(line) for line in proc.stdout.splitlines() if line.strip()]

    def job_state(self, job_id: str) -> str | None:
        """JobState of a job (the first non-COMPLETED one for an array); None when unknown."""
        records = self.job_records(job_id)
        if not records:
            return None
        states = [r.get("JobState", "UNKNOWN") for r in records]
        return next((s for s in states if s != "COMPLETED"), states[0])

    def wait_job(self, job_id: str, timeout: float = 120.0, poll: float = 0.2) -> str:
        """Poll until the job (every task, for an array) reaches a final state; return that state.

        Raises TimeoutError (with the job record) after `timeout` seconds, and LookupError when
        slurmctld does not know the job (MinJobAge=600 keeps finished jobs for 10 minutes).
        """
        return self.wait_state(job_id, TERMINAL_STATES, timeout=timeout, poll=poll, all_tasks=True)

    def wait_state(self, job_id: str, wanted: frozenset[str] | set[str] | str, timeout: float = 60.0,
                   poll: float = 0.2, all_tasks: bool = False) -> str:
        """Poll until the job's state is in `wanted` (e.g. "RUNNING"); bounded like wait_job."""
        if isinstance(wanted, str):
            wanted = {wanted}
        deadline = time.monotonic() + timeout
        misses = 0
        records: list[dict[str, str]] = []
        while True:
            records = self.job_records(job_id)
            if not records:
                misses += 1
                if misses >= 5:
                    raise LookupError(f"slurmctld does not know job {job_id}")
            else:
                misses = 0
                states = [r.get("JobState", "UNKNOWN") for r in records]
                if all_tasks:
                    if all(s in wanted for s in states):
                        return next((s for s in states if s != "COMPLETED"), states[0])
                elif states[0] in wanted:
                    return states[0]
            if time.monotonic() >= deadline:
                shown = "\n".join(" ".join(f"{k}={v}" for k, v in r.items()) for r in records) or "(none)"
                raise TimeoutError(
                    f"job {job_id} not in {sorted(wanted)} after {timeout:.0f}s; record:\n{shown}\n"
                    f"slurmctld log tail:\n{self.log_tail('slurmctld.log', 15)}"
                )
            time.sleep(poll)

    def cancel_unfinished(self, job_ids: list[str] | None = None) -> None:
        """scancel jobs (default: all submitted through this handle) that are not final yet."""
        ids = self.submitted if job_ids is None else job_ids
        live = []
        for j in ids:
            try:
                state = self.job_state(j)
            except (RuntimeError, subprocess.TimeoutExpired):
                continue
            if state is not None and state not in TERMINAL_STATES:
                live.append(j)
        if live:
            self.run("scancel", *live, check=False)

    def log_tail(self, name: str = "slurmctld.log", lines: int = 40) -> str:
        try:
            return "\n".join((self.log_dir / name).read_text(errors="replace").splitlines()[-lines:])
        except OSError as exc:
            return f"({exc})"

    # -- discovery ---------------------------------------------------------------------------

    @classmethod
    def from_running(cls, started_here: bool) -> "SlurmCluster":
        """Describe the running cluster from its state.json (written by scripts/local-slurm under its root)."""
        state = local_slurm.read_state()
        if state is None:
            raise RuntimeError("no local SLURM cluster is configured in /etc/slurm/slurm.conf")
        return cls(root=Path(state["root"]), nodes=list(state["nodes"]), partition=state["partition"],
                   cpus_per_node=state["cpus_per_node"], gpus_per_node=state["gpus_per_node"],
                   started_here=started_here)


@pytest.fixture(scope="session")
def slurm_cluster():
    """Session-scoped: a running local SLURM cluster (SlurmCluster), started if needed."""
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    lease = str(os.getpid())
    cmd = ["bash", str(SCRIPT), "up", "--lease", lease]
    if os.environ.get("MTF_SLURM_NODES"):
        cmd += ["--nodes", os.environ["MTF_SLURM_NODES"]]
    t0 = time.monotonic()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_START_TIMEOUT_S, env=local_slurm.ENV)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{' '.join(cmd)} did not finish in {_START_TIMEOUT_S}s:\n{exc.stdout}\n{exc.stderr}",
                    pytrace=False)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}",
                    pytrace=False)
    started_here = "already up" not in proc.stdout
    cluster = SlurmCluster.from_running(started_here=started_here)
    sys.stderr.write(f"\n[slurm_cluster] {'started' if started_here else 'reused'} {cluster.nodes} "
                     f"in {time.monotonic() - t0:.1f}s; logs in {cluster.log_dir}\n")
    try:
        yield cluster
    finally:
        cluster.cancel_unfinished()
        subprocess.run(["bash", str(SCRIPT), "release", lease], capture_output=True, text=True, timeout=120, env=local_slurm.ENV)
