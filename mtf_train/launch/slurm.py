"""Thin, bounded wrappers around SLURM's client commands (sbatch, squeue, sacct, scontrol, scancel).

Nothing here imports torch; every command has a timeout, and a missing or failing command is reported as
data (None / an error message) rather than as a traceback.
"""
from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass

TIMEOUT_S = 60
# Final states (squeue/sacct spelling); anything else may still change.
TERMINAL = frozenset({"BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY",
                      "PREEMPTED", "TIMEOUT", "REVOKED", "SPECIAL_EXIT"})


@dataclass
class JobState:
    job_id: str
    state: str                  # RUNNING, PENDING, COMPLETED, ... or UNKNOWN
    elapsed: str = ""
    limit: str = ""
    nodes: str = ""
    reason: str = ""
    source: str = ""            # squeue, sacct or "" (unknown)

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL

    @property
    def active(self) -> bool:
        return self.state not in TERMINAL and self.state != "UNKNOWN"


def available(command: str = "sbatch") -> bool:
    return shutil.which(command) is not None


def run(args: list[str], timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess | None:
    """Run a client command; None when it is missing or does not answer in time."""
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return None


def one_line(text: str) -> str:
    return " ".join(text.split())


def sbatch(args: list[str]) -> tuple[str | None, str]:
    """`sbatch --parsable ARGS`: (job id, "") on success, (None, sbatch's own message) on failure."""
    if not available("sbatch"):
        return None, "sbatch not found on PATH"
    proc = run(["sbatch", "--parsable", *args])
    if proc is None:
        return None, f"sbatch did not answer within {TIMEOUT_S}s"
    job_id = proc.stdout.strip().split(";")[0].strip()
    if proc.returncode != 0 or not job_id.isdigit():
        return None, one_line(proc.stderr) or one_line(proc.stdout) or f"sbatch exited with {proc.returncode}"
    return job_id, ""


def job_states(job_ids: list[str]) -> dict[str, JobState]:
    """State of each job: squeue (jobs slurmctld still knows), then sacct (accounting) for the rest."""
    out: dict[str, JobState] = {}
    ids = [j for j in job_ids if j]
    if not ids:
        return out
    asked = ""
    if available("squeue"):
        proc = run(["squeue", "-h", "-t", "all", "-j", ",".join(ids), "-o", "%i|%T|%M|%l|%N|%r"])
        # squeue exits 1 for ids it no longer knows; a controller that does not answer prints nothing at all
        if proc is not None and (proc.returncode == 0 or "Invalid job id" in proc.stderr):
            asked = "squeue"
            for line in proc.stdout.splitlines():
                parts = line.split("|")
                if len(parts) >= 6:
                    jid = parts[0].strip()
                    out[jid] = JobState(jid, parts[1].strip(), parts[2], parts[3], parts[4], parts[5], "squeue")
    missing = [j for j in ids if j not in out]
    if missing and available("sacct"):
        proc = run(["sacct", "-n", "-P", "-X", "-j", ",".join(missing), "-o", "JobID,State,Elapsed,Timelimit,NodeList"])
        if proc is not None and proc.returncode == 0:
            asked = "sacct"
            for line in proc.stdout.splitlines():
                parts = line.split("|")
                if len(parts) >= 5 and parts[0] in missing:
                    state = parts[1].split()[0] if parts[1] else "UNKNOWN"  # "CANCELLED by 0"
                    out[parts[0]] = JobState(parts[0], state, parts[2], parts[3], parts[4], "", "sacct")
    for j in ids:
        # `source` stays empty when neither command answered: the job may well be alive (a busy controller)
        out.setdefault(j, JobState(j, "UNKNOWN", reason="not in the queue (and no accounting to ask)" if asked
                                   else "squeue/sacct did not answer", source="none" if asked else ""))
    return out


def cancel(job_ids: list[str], signal: str | None = None, batch_only: bool = False) -> tuple[bool, str]:
    if not job_ids:
        return True, ""
    if not available("scancel"):
        return False, "scancel not found on PATH"
    args = ["scancel"]
    if signal:
        args += ["--signal", signal]
    if batch_only:
        args.append("--batch")
    proc = run(args + list(job_ids))
    if proc is None:
        return False, f"scancel did not answer within {TIMEOUT_S}s"
    return proc.returncode == 0, one_line(proc.stderr)
