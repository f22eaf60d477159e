"""Shared test helpers: run the CLI as a user types it."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
BIN = Path(sys.executable).parent


def mtf(*args: str, cwd: str | os.PathLike | None = None, env: dict | None = None, timeout: float = 120,
        check: bool = False) -> subprocess.CompletedProcess:
    """Run the installed `mtf-train` console script."""
    full_env = dict(os.environ, **(env or {}))
    proc = subprocess.run([str(BIN / "mtf-train"), *args], cwd=cwd or ROOT, env=full_env, capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"mtf-train {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    """Assert the CLI failed the way bad input must: exit 2, one stderr line, no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]
