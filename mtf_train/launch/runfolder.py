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

from mtf_train.render.job import write_atomic

PACKAGES = ("torch", "deepspeed", "megatron-core", "transformers", "mtf-train")


def runs_root(cli_value: str | None) -> Path:
    return Path(cli_value or os.environ.get("MTF_RUNS_DIR") or "runs").resolve()


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
    parent.mkdir(parents=True, exist_ok=True)
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
