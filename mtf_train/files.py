"""File writing every stage shares: nothing the project writes is ever seen half-written."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary name in `path`'s folder for any writer (torch.save, savefig, copyfile) to write; renamed to
    `path` when the block ends, removed if it raises, so a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # still there only when the block failed


def write_atomic(path: Path, text: str, mode: int | None = None, encoding: str = "utf-8") -> Path:
    """Write `text` under a temporary name in the same folder and rename (see atomic_path)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding=encoding)
        if mode is not None:
            tmp.chmod(mode)
    return Path(path)
