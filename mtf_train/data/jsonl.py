"""Reading xP3 jsonl inputs as a stream of rows, with an optional external de-duplicate/shuffle step.

Every row carries a global row id (its 0-based position among all lines of all inputs), so that a row
found bad after shuffling is still reported as `FILE:LINE`.

De-duplication and shuffling (the `sort -u | shuf` of the 2022 pipeline) are done out of core: rows are
spread over bucket files by a seeded hash of the line, each bucket is de-duplicated and shuffled in
memory, and the buckets are read one after the other. Identical lines always share a bucket, and hashing
the line with the seed spreads rows over buckets at random, so memory stays at about one bucket whatever
the input size.
"""
from __future__ import annotations

import bisect
import hashlib
import heapq
import os
import struct
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from mtf_train.data.errors import DataError

STDIN = "-"
BUCKET_BYTES = 64 << 20
MAX_BUCKETS = 512
STDIN_BUCKETS = 128
_REC = struct.Struct("<QI")  # row id, line length


def find_inputs(items: list[str]) -> list[str]:
    """Files from `--input` items: `-` (stdin), jsonl files, or folders searched recursively for *.jsonl."""
    out: list[str] = []
    seen: set[str] = set()
    for item in items:
        if item == STDIN:
            files = [STDIN]
        elif os.path.isdir(item):
            files = sorted(str(p) for p in Path(item).rglob("*.jsonl") if p.is_file())
            if not files:
                raise DataError(item, "folder holds no *.jsonl file")
        elif os.path.exists(item):
            if not os.access(item, os.R_OK):
                raise DataError(item, "file is not readable")
            files = [item]
        else:
            raise DataError(item, "no such file or folder")
        for f in files:
            key = f if f == STDIN else os.path.realpath(f)
            if key not in seen:
                seen.add(key)
                out.append(f)
    return out


def total_bytes(files: list[str]) -> int | None:
    """Total size of the inputs, or None when stdin (or a pipe) is among them."""
    total = 0
    for f in files:
        if f == STDIN or not os.path.isfile(f):
            return None
        total += os.path.getsize(f)
    return total


@dataclass
class RowSource:
    """All lines of all inputs, in order, as (row id, line bytes); blank lines are passed over."""
    files: list[str]
    starts: list[int] = field(default_factory=list)   # global row id of each file's first line
    rows_read: int = 0                                # non-blank lines
    bytes_read: int = 0

    def __iter__(self) -> Iterator[tuple[int, bytes]]:
        row_id = 0
        for f in self.files:
            self.starts.append(row_id)
            fh = sys.stdin.buffer if f == STDIN else _open(f)
            try:
                for line in fh:
                    self.bytes_read += len(line)
                    if line.strip():
                        self.rows_read += 1
                        yield row_id, line
                    row_id += 1
            finally:
                if fh is not sys.stdin.buffer:
                    fh.close()

    def where(self, row_id: int) -> tuple[str, int]:
        """(file, 1-based line) of a global row id."""
        i = bisect.bisect_right(self.starts, row_id) - 1
        f = self.files[i]
        return ("<stdin>" if f == STDIN else f), row_id - self.starts[i] + 1


def _open(path: str):
    try:
        return open(path, "rb", buffering=1 << 20)
    except OSError as err:
        raise DataError(path, f"cannot read: {err.strerror or err}") from None


def n_buckets(size: int | None) -> int:
    if size is None:
        return STDIN_BUCKETS
    return max(1, min(MAX_BUCKETS, -(-size // BUCKET_BYTES)))


@dataclass
class MergeStats:
    rows_in: int = 0
    duplicates: int = 0
    rows_out: int = 0
    bytes_out: int = 0


def merged(rows: Iterator[tuple[int, bytes]], *, dedup: bool, shuffle: bool, seed: int, buckets: int,
           tmp_dir: str, stats: MergeStats, on_read: Callable[[int], None] | None = None
           ) -> Iterator[tuple[int, bytes]]:
    """Rows de-duplicated (first occurrence kept) and/or shuffled with `seed`, through bucket files.

    Without shuffling the surviving rows come back in input order (a k-way merge of sorted buckets).
    Deterministic for the same inputs, seed and bucket count.
    """
    work = tempfile.mkdtemp(prefix="mtf-merge-", dir=tmp_dir)
    try:
        key = hashlib.blake2b(str(seed).encode(), digest_size=16).digest()
        paths = [os.path.join(work, f"b{i:04d}") for i in range(buckets)]
        outs = [open(p, "wb", buffering=1 << 16) for p in paths]
        try:
            for row_id, line in rows:
                body = line.strip()
                h = int.from_bytes(hashlib.blake2b(body, digest_size=8, key=key).digest(), "little")
                outs[h % buckets].write(_REC.pack(row_id, len(body)) + body)
                stats.rows_in += 1
                if on_read is not None:
                    on_read(len(line))
        finally:
            for o in outs:
                o.close()

        def load(path: str) -> list[tuple[int, bytes]]:
            data = Path(path).read_bytes()
            recs, pos = [], 0
            while pos < len(data):
                rid, n = _REC.unpack_from(data, pos)
                pos += _REC.size
                recs.append((rid, data[pos:pos + n]))
                pos += n
            if dedup:
                seen: set[bytes] = set()
                kept = []
                for rid, body in recs:  # already in row-id order: the first occurrence wins
                    if body not in seen:
                        seen.add(body)
                        kept.append((rid, body))
                stats.duplicates += len(recs) - len(kept)
                recs = kept
            return recs

        if shuffle:
            for b, path in enumerate(paths):
                recs = load(path)
                os.unlink(path)
                perm = np.random.RandomState([seed, b]).permutation(len(recs))
                for i in perm:
                    stats.rows_out += 1
                    stats.bytes_out += len(recs[i][1]) + 1
                    yield recs[i]
        else:
            for path in paths:  # rewrite each bucket de-duplicated, then merge them back into input order
                recs = load(path)
                with open(path, "wb") as o:
                    for rid, body in recs:
                        o.write(_REC.pack(rid, len(body)) + body)
            for rid, body in heapq.merge(*(_stream(p) for p in paths)):
                stats.rows_out += 1
                stats.bytes_out += len(body) + 1
                yield rid, body
    finally:
        for name in os.listdir(work):
            os.unlink(os.path.join(work, name))
        os.rmdir(work)


def _stream(path: str) -> Iterator[tuple[int, bytes]]:
    with open(path, "rb", buffering=1 << 16) as fh:
        while True:
            head = fh.read(_REC.size)
            if not head:
                return
            rid, n = _REC.unpack(head)
            yield rid, fh.read(n)
