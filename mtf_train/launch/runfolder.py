"""Run folders: `runs/<recipe>/<timestamp>-<id>/`, created whole or not at all, never overwritten.

A run folder holds what is needed to reproduce and follow a launch: the resolved recipe, the rendered files,
the exact command, versions, job ids (run.json) and an append-only event log (events.log).
"""
from __future__ import annotations

import datetime as dt
import json
import os
import platform
import secrets
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Callable

from mtf_train.files import write_atomic

PACKAGES = ("torch", "deepspeed", "megatron-core", "transformers", "mtf-train")


def runs_root(cli_value: str | None) -> Path:
    where = "--runs-dir" if cli_value else "$MTF_RUNS_DIR" if os.environ.get("MTF_RUNS_DIR") else None
    root = Path(cli_value or os.environ.get("MTF_RUNS_DIR") or "runs").resolve()
    if root.exists() and not root.is_dir():
        from mtf_train.errors import UserError
        raise UserError(str(root), "is a file, not a folder" + (f" ({where} names the root of run folders)"
                                                                   if where else ""))
    return root


def process_alive(pid: int | None, group: bool = False) -> bool:
    """Whether process `pid` (or, with `group`, any process of the group it leads) still exists."""
    if not pid:
        return False
    try:
        os.killpg(pid, 0) if group else os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def start_time(pid: int) -> str | None:
    """The process's start time (Linux /proc, in clock ticks since boot): tells a reused pid from ours."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def launcher_identity() -> dict:
    """What run.json records about the mtf-train process that runs a job on this machine."""
    return {"host": platform.node(), "pid": os.getpid(), "pid_start": start_time(os.getpid())}


def local_alive(info: dict) -> bool | None:
    """For a run started on a machine (executor local, submitit's local executor): whether the launcher or any
    process of its job still runs. None when it ran on another host, where this one cannot look."""
    if info.get("host") and info["host"] != platform.node():
        return None
    job = info.get("job_pid") or (info.get("submitit") or {}).get("local_pid")
    if job and str(job).isdigit() and (process_alive(int(job), group=True) or process_alive(int(job))):
        return True
    pid = info.get("pid")
    if not pid or not process_alive(int(pid)):
        return False
    recorded, now = info.get("pid_start"), start_time(int(pid))
    return recorded is None or now is None or recorded == now


def versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in PACKAGES:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    src = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10)
        dirty = subprocess.run(["git", "-C", str(src), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        if commit.returncode == 0:
            out["git_commit"] = commit.stdout.strip()
            out["git_dirty"] = bool(dirty.stdout.strip())
    except (OSError, subprocess.TimeoutExpired):
        pass
    return out


def create_run_folder(root: Path, recipe_name: str, fill: Callable[[Path, Path], None]) -> Path:
    """Make a new run folder: `fill(final_path, staging_path)` writes into staging, then one rename publishes it."""
    parent = root / recipe_name
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # a file in the way, no permission: one line, not a traceback
        from mtf_train.errors import UserError
        raise UserError(str(err.filename or parent), f"cannot create the run folder's parent: "
                        f"{err.strerror or err}") from None
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    for _ in range(10):
        final = parent / f"{stamp}-{secrets.token_hex(3)}"
        if not final.exists():
            break
    staging = parent / f".staging-{final.name}"
    staging.mkdir()
    try:
        fill(final, staging)
        os.rename(staging, final)  # fails rather than overwrite if `final` appeared meanwhile
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final


class RunInfo:
    """run.json: written atomically on every change; events.log: appended."""

    def __init__(self, run_dir: Path):
        self.dir = Path(run_dir)
        self.path = self.dir / "run.json"

    def read(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def write(self, data: dict) -> None:
        write_atomic(self.path, json.dumps(data, indent=2) + "\n")

    def update(self, **changes) -> dict:
        data = self.read()
        data.update(changes)
        self.write(data)
        return data

    def event(self, text: str) -> None:
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        with open(self.dir / "events.log", "a") as fh:
            fh.write(f"{stamp} mtf-train {text}\n")


def initial_info(recipe_name: str, recipe_path: str, executor: str) -> dict:
    return {"recipe": recipe_name, "recipe_path": recipe_path, "executor": executor,
            "command": [Path(sys.argv[0]).name] + sys.argv[1:], "cwd": os.getcwd(),
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "versions": versions(), "state": "rendered", "job_ids": []}
