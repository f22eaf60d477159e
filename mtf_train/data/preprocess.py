"""xP3 jsonl -> `P_inputs_document.{bin,idx}` and `P_targets_document.{bin,idx}` (megatron's mmap indexed format).

Inputs are tokenized as they are; targets with a leading space and the end-of-document token appended;
one document per row. The four files are written under temporary names and renamed only when all are
complete, so a failed or interrupted run leaves no half-written dataset.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mtf_train.data import jsonl
from mtf_train.data.errors import DataError
from mtf_train.data.indexed import KINDS, doc_prefix

CHUNK_ROWS = 1024
CHUNK_BYTES = 256 << 10  # per worker task: keeps a worker near 100 MB whatever the rows
# Rows longer than this (inputs + targets tokens) are skipped and listed: far beyond any sequence length a
# finetune packs (bloomz: 2048), such a row only costs tokenizing time and disk. --max-tokens sets it.
DEFAULT_MAX_TOKENS = 131072


class Interrupted(Exception):
    pass


@dataclass
class PreprocessResult:
    output_prefix: str
    files: list[str]
    rows_read: int = 0
    rows_written: int = 0
    duplicates: int = 0
    skipped: Counter = field(default_factory=Counter)
    input_tokens: int = 0
    target_tokens: int = 0
    seconds: float = 0.0            # the whole run
    work_seconds: float = 0.0       # from the first row read to the last file renamed (no start-up imports)
    dtype: str = ""
    vocab_size: int = 0
    report: str | None = None
    merged_jsonl: str | None = None

    @property
    def tokens(self) -> int:
        return self.input_tokens + self.target_tokens

    def summary(self) -> str:
        skipped = sum(self.skipped.values())
        why = ", ".join(f"{k}: {v:,}" for k, v in sorted(self.skipped.items()))
        lines = [
            f"rows: {self.rows_read:,} read, {self.rows_written:,} written, {skipped:,} skipped"
            + (f" ({why})" if why else "") + (f", {self.duplicates:,} duplicates removed" if self.duplicates else ""),
            f"tokens: {self.input_tokens:,} in inputs, {self.target_tokens:,} in targets "
            f"({self.dtype}, vocabulary {self.vocab_size:,})",
            f"time: {self.seconds:.1f} s ({self.work_seconds:.1f} s reading and tokenizing: "
            f"{self.tokens / max(self.work_seconds, 1e-9):,.0f} tokens/s, "
            f"{self.rows_read / max(self.work_seconds, 1e-9):,.0f} rows/s)",
            f"wrote: {self.output_prefix}_{{inputs,targets}}_document.{{bin,idx}}",
        ]
        if self.report:
            lines.append(f"skipped rows listed in {self.report}")
        if self.merged_jsonl:
            lines.append(f"merged jsonl: {self.merged_jsonl}")
        return "\n".join(lines)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _tmp_name(path: str) -> str:
    return f"{path}.tmp-{os.getpid()}"


def _remove_stale_temps(prefix: str) -> None:
    """Temporary files of an earlier run that was killed outright (SIGKILL, power loss)."""
    parent = Path(prefix).parent
    base = Path(prefix).name
    for p in parent.glob(f"{base}_*.tmp-*"):
        pid = p.name.rsplit(".tmp-", 1)[-1]
        if pid.isdigit() and not _pid_alive(int(pid)):
            with contextlib.suppress(OSError):
                p.unlink()


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM (a scheduler, `kill`) unwinds like Ctrl-C, so that temporary files are removed."""
    def handler(signum, frame):
        raise KeyboardInterrupt
    try:
        old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _chunks(rows, *, on_bytes=None):
    ids, lines, size = [], [], 0
    for rid, line in rows:
        ids.append(rid)
        lines.append(line)
        size += len(line)
        if len(lines) >= CHUNK_ROWS or size >= CHUNK_BYTES:
            yield ids, lines, size
            ids, lines, size = [], [], 0
    if lines:
        yield ids, lines, size


class _Progress:
    MININTERVAL = 0.5

    def __init__(self, enabled: bool, total: int | None, desc: str):
        from tqdm import tqdm

        # leave=False: the summary follows, and an error message must not share the screen with a bar.
        self.bar = tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=not enabled,
                        file=sys.stderr, mininterval=self.MININTERVAL, dynamic_ncols=True, leave=False)
        self.t0 = time.perf_counter()

    def update(self, nbytes: int, rows: int, tokens: int) -> None:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        self.bar.set_postfix_str(f"{rows:,} rows, {rows / dt:,.0f} rows/s, {tokens / dt:,.0f} tok/s", refresh=False)
        self.bar.update(nbytes)

    def close(self) -> None:
        self.bar.close()


def preprocess(inputs: list[str], output_prefix: str, tokenizer: str, *, workers: int = 1, dedup: bool = False,
               shuffle: bool = False, seed: int = 1234, strict: bool = False, progress: bool | None = None,
               report: str | None = None, merged_jsonl: str | None = None, tmp_dir: str | None = None,
               max_tokens: int = DEFAULT_MAX_TOKENS) -> PreprocessResult:
    """Tokenize xP3 rows into the two indexed datasets of `output_prefix`; see the module docstring.

    workers: tokenizer processes (0 = tokenize in this process). progress: None = when stderr is a terminal.
    max_tokens: rows with more tokens are skipped like bad rows (0: no bound).
    Bad rows are skipped and listed in `report` (default `P_skipped.txt`), or raise DataError naming
    FILE:LINE under `strict`. dedup/shuffle: the `sort -u | shuf` step, out of core (see jsonl.merged).
    """
    from mtf_train.data import _tokenize
    from mtf_train.data.indexed import IndexWriter, optimal_dtype
    from mtf_train.data.tokenizer import load_tokenizer

    t0 = time.perf_counter()
    if progress is None:
        progress = sys.stderr.isatty()
    if workers < 0:
        raise DataError("--workers", f"must be 0 or more, got {workers}")
    if max_tokens < 0:
        raise DataError("--max-tokens", f"must be 0 (no bound) or more, got {max_tokens}")
    files = jsonl.find_inputs(inputs)
    tok, info = load_tokenizer(tokenizer)
    dtype = optimal_dtype(info.vocab_size)

    out_dir = Path(output_prefix).parent
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(str(out_dir), f"cannot create output folder: {err.strerror or err}") from None
    if not os.access(out_dir, os.W_OK):
        raise DataError(str(out_dir), "output folder is not writable")
    _remove_stale_temps(output_prefix)
    report = report or f"{output_prefix}_skipped.txt"

    finals = {k: doc_prefix(output_prefix, k) for k in KINDS}
    temps: list[str] = []
    res = PreprocessResult(output_prefix, [f + e for f in finals.values() for e in (".bin", ".idx")],
                           dtype=np.dtype(dtype).name, vocab_size=info.vocab_size)
    source = jsonl.RowSource(files)
    size = jsonl.total_bytes(files)
    pool = None
    t_work = time.perf_counter()
    try:
        with _sigterm_as_interrupt(), contextlib.ExitStack() as stack:
            builders = {}
            for k, f in finals.items():
                temps += [_tmp_name(f + ".bin"), _tmp_name(f + ".idx")]
                builders[k] = IndexWriter(_tmp_name(f + ".bin"), dtype)
                stack.callback(builders[k].data_file.close)
            temps.append(_tmp_name(report))
            report_fh = stack.enter_context(open(_tmp_name(report), "w"))
            merged_fh = None
            if merged_jsonl:
                temps.append(_tmp_name(merged_jsonl))
                merged_fh = stack.enter_context(open(_tmp_name(merged_jsonl), "wb"))

            rows = iter(source)
            total = size
            stats = jsonl.MergeStats()
            scan = None
            if dedup or shuffle:
                scan = stack.enter_context(contextlib.closing(_Progress(progress, size, "reading")))
                rows = stack.enter_context(contextlib.closing(jsonl.merged(
                    rows, dedup=dedup, shuffle=shuffle, seed=seed, buckets=jsonl.n_buckets(size),
                    tmp_dir=tmp_dir or str(out_dir), stats=stats,
                    on_read=lambda n: scan.bar.update(n))))
                total = None  # known only once the read pass is over
            bar = None  # made when the first tokens arrive, after any read pass

            def results():
                if workers == 0:
                    _tokenize.init_worker(tok.to_str(), info.eod_id, ignore_sigint=False, max_tokens=max_tokens)
                    for ids, lines, nbytes in _chunks(rows):
                        yield ids, lines, nbytes, _tokenize.tokenize_chunk(lines)
                    return
                import multiprocessing as mp
                nonlocal pool
                ctx = mp.get_context("spawn")  # a forked tokenizers library turns its parallelism off (and warns)
                pool = ctx.Pool(workers, initializer=_tokenize.init_worker,
                                initargs=(tok.to_str(), info.eod_id, True, max_tokens))
                pending: deque = deque()
                for ids, lines, nbytes in _chunks(rows):
                    pending.append((ids, lines, nbytes, pool.apply_async(_tokenize.tokenize_chunk, (lines,))))
                    if len(pending) >= 2 * workers + 2:  # bounded read-ahead: memory stays flat
                        ids_, lines_, nb_, fut = pending.popleft()
                        yield ids_, lines_, nb_, fut.get()
                while pending:
                    ids_, lines_, nb_, fut = pending.popleft()
                    yield ids_, lines_, nb_, fut.get()

            for ids, lines, nbytes, r in results():
                if bar is None:
                    if scan is not None:  # the read pass is over: its bar gives way to the tokenizing one
                        scan.close()
                    bar = stack.enter_context(contextlib.closing(_Progress(progress, total, "tokenizing")))
                for pos, reason, detail in r.bad:
                    f, line_no = source.where(ids[pos])
                    if strict:
                        raise DataError(f"{f}:{line_no}", reason + (f" ({detail})" if detail else "")
                                        + "; rerun without --strict to skip such rows")
                    res.skipped[reason] += 1
                    report_fh.write(f"{f}:{line_no}: {reason}" + (f" ({detail})" if detail else "") + "\n")
                if merged_fh is not None:
                    for line in lines:
                        merged_fh.write(line.rstrip(b"\r\n") + b"\n")
                builders["inputs"].add_documents(r.input_tokens, r.input_lengths)
                builders["targets"].add_documents(r.target_tokens, r.target_lengths)
                res.rows_written += len(r.good)
                res.input_tokens += int(r.input_lengths.sum())
                res.target_tokens += int(r.target_lengths.sum())
                bar.update(nbytes, res.rows_written + sum(res.skipped.values()), res.tokens)

            res.rows_read = source.rows_read
            res.duplicates = stats.duplicates
            if res.rows_written == 0:
                why = ", ".join(f"{k}: {v}" for k, v in sorted(res.skipped.items()))
                raise DataError(", ".join(inputs), "no usable rows" + (f" (skipped: {why})" if why else ""))
            for k, f in finals.items():
                builders[k].finalize(_tmp_name(f + ".idx"))
        if pool is not None:
            pool.close()
            pool.join()
            pool = None
        # Complete: publish. Each rename is atomic, so no file is ever seen half-written.
        for f in finals.values():
            os.replace(_tmp_name(f + ".bin"), f + ".bin")
        for f in finals.values():
            os.replace(_tmp_name(f + ".idx"), f + ".idx")
        if res.skipped:
            os.replace(_tmp_name(report), report)
            res.report = report
        else:
            os.unlink(_tmp_name(report))
            with contextlib.suppress(FileNotFoundError):
                os.unlink(report)  # an old report would describe other data
        if merged_jsonl:
            os.replace(_tmp_name(merged_jsonl), merged_jsonl)
            res.merged_jsonl = merged_jsonl
    except KeyboardInterrupt:
        raise Interrupted() from None
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        for t in temps:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(t)
    res.seconds = time.perf_counter() - t0
    res.work_seconds = time.perf_counter() - t_work
    return res
