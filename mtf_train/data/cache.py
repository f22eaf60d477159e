"""On-disk caches of packing indexes: atomic writes, a file lock, and a fallback folder.

A cache file is written to a temporary name and renamed into place, so a reader sees either nothing or a
complete file. Builders take an exclusive lock (flock) on a per-file lock file first, so that of several
processes starting at once one builds and the others wait and then read; where locks are not supported
(some network file systems) each builds and the rename keeps the result whole.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import struct
from pathlib import Path
from typing import Callable

import numpy as np

from mtf_train.data.errors import DataError
from mtf_train.data.packing import PackIndex
from mtf_train.files import atomic_path

MAGIC = b"MTFPACK\x01"
_HEAD = struct.Struct("<8sqqqqqq")  # magic, rows, docs, skipped, epochs, rows_per_epoch, reserved
CACHE_SUBDIR = "mtf_index_cache"


def user_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mtf-train" / "index"


def _usable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(folder, os.W_OK | os.X_OK)


def cache_dir_for(prefix: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The given folder (must be writable), else `<data folder>/mtf_index_cache`, else the user cache."""
    if cache_dir is not None:
        folder = Path(cache_dir)
        if not _usable(folder):
            raise DataError(str(folder), "index cache folder cannot be created or written")
        return folder
    folder = Path(prefix).resolve().parent / CACHE_SUBDIR
    if _usable(folder):
        return folder
    folder = user_cache_dir()
    if not _usable(folder):
        raise DataError(str(folder), "neither the data folder nor the user cache folder is writable for the "
                        "index cache; give a cache folder")
    return folder


def save_index(path: Path, index: PackIndex) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(_HEAD.pack(MAGIC, index.rows, len(index.doc_ids), index.skipped, index.epochs,
                            index.rows_per_epoch, 0))
        fh.write(np.ascontiguousarray(index.row_offsets, dtype="<i8").tobytes())
        fh.write(np.ascontiguousarray(index.doc_ids, dtype="<i4").tobytes())
        fh.flush()
        os.fsync(fh.fileno())


def load_index(path: Path) -> PackIndex | None:
    """The index stored at `path` (memory-mapped), or None when missing or not a whole cache file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(_HEAD.size)
    except OSError:
        return None
    if len(head) != _HEAD.size:
        return None
    magic, rows, docs, skipped, epochs, per_epoch, _ = _HEAD.unpack(head)
    if magic != MAGIC or size != _HEAD.size + 8 * (rows + 1) + 4 * docs:
        return None
    offsets = np.memmap(path, dtype="<i8", mode="r", offset=_HEAD.size, shape=(rows + 1,))
    doc_ids = np.memmap(path, dtype="<i4", mode="r", offset=_HEAD.size + 8 * (rows + 1), shape=(docs,)) \
        if docs else np.zeros(0, dtype=np.int32)
    return PackIndex(offsets, doc_ids, skipped, epochs, per_epoch)


@contextlib.contextmanager
def _locked(lock_path: Path):
    fh = open(lock_path, "a+")
    try:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        except OSError as err:
            if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
        yield
    finally:
        fh.close()  # releases the lock


def get_or_build(path: Path, build: Callable[[], PackIndex]) -> tuple[PackIndex, bool]:
    """(index, whether this process built it)."""
    found = load_index(path)
    if found is not None:
        return found, False
    with _locked(path.with_name(f".{path.name}.lock")):
        found = load_index(path)  # another process may have built it while we waited
        if found is not None:
            return found, False
        save_index(path, build())
    built = load_index(path)
    if built is None:
        raise DataError(str(path), "index cache file vanished or is damaged right after writing it")
    return built, True
