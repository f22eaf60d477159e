"""File writing every stage shares: nothing the project writes is ever seen half-written."""
from __future__ import annotations

import os
from pathlib import Path


def write_atomic(path: Path, text: str, mode: int | None = None, encoding: str = "utf-8") -> Path:
    """Write under a temporary name in the same folder and rename, so a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding=encoding)
    if mode is not None:
        tmp.chmod(mode)
    os.replace(tmp, path)
    return path
