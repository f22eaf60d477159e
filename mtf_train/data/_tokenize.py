"""Row parsing and tokenization, run in preprocessing worker processes (or in-process with 0 workers).

Kept free of torch/megatron imports so that spawned workers start in a fraction of a second.
"""
from __future__ import annotations

import json
import os
import signal
from dataclasses import dataclass
from itertools import chain

import numpy as np

_TOK = None
_EOD = None
_MAX_TOKENS = 0  # rows with more tokens (inputs + targets + end of document) are skipped; 0 = no bound
# A line this many bytes per allowed token is skipped without tokenizing: BLOOM's tokenizer averages about
# 4 bytes per token, and even JSON-escaped CJK text stays near 12, so such a row holds more tokens than the
# bound whatever its text, and tokenizing it (a 50 MB row: minutes and gigabytes) would only confirm it.
MAX_BYTES_PER_TOKEN = 32


@dataclass
class ChunkResult:
    """Tokens of the good rows of one chunk, in row order, plus (position in chunk, reason, detail) of bad ones."""
    input_tokens: np.ndarray    # int32, all good rows' inputs concatenated
    input_lengths: np.ndarray   # int64 per good row
    target_tokens: np.ndarray
    target_lengths: np.ndarray
    good: np.ndarray            # positions (in the chunk) of the good rows
    bad: list


def init_worker(tokenizer_json: str, eod_id: int, ignore_sigint: bool = True, max_tokens: int = 0) -> None:
    global _TOK, _EOD, _MAX_TOKENS
    from tokenizers import Tokenizer

    if ignore_sigint:
        # The parent owns interruption: it terminates the pool and removes its temporary files.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Worker count is the parallelism knob; the tokenizer's own thread pool would blur it.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _TOK = Tokenizer.from_str(tokenizer_json)
    _EOD = eod_id
    _MAX_TOKENS = max_tokens


def check_row(line: bytes):
    """(inputs, targets) or (None, (reason, detail)). Reasons are the summary's categories."""
    try:
        row = json.loads(line)
    except UnicodeDecodeError:
        return None, ("not JSON", "not valid UTF-8")
    except ValueError as err:
        return None, ("not JSON", str(err).split(":")[0])
    if not isinstance(row, dict):
        return None, ("not a JSON object", type(row).__name__)
    for key in ("inputs", "targets"):
        if key not in row:
            return None, (f"missing {key}", "")
        if not isinstance(row[key], str):
            return None, (f"{key} not a string", type(row[key]).__name__)
    if not row["targets"].strip():
        return None, ("empty target", "")
    return (row["inputs"], row["targets"]), None


def _flatten(id_lists, extra=None):
    lengths = np.fromiter((len(x) for x in id_lists), dtype=np.int64, count=len(id_lists))
    if extra is not None:
        lengths += 1
        flat = chain.from_iterable(chain(x, (extra,)) for x in id_lists)
    else:
        flat = chain.from_iterable(id_lists)
    tokens = np.fromiter(flat, dtype=np.int32, count=int(lengths.sum()))
    return tokens, lengths


def tokenize_chunk(lines: list) -> ChunkResult:
    inputs, targets, good, bad = [], [], [], []
    too_long = f"longer than {_MAX_TOKENS:,} tokens"
    for pos, line in enumerate(lines):
        if _MAX_TOKENS and len(line) > _MAX_TOKENS * MAX_BYTES_PER_TOKEN:
            bad.append((pos, too_long, f"{len(line):,} bytes, not tokenized"))
            continue
        pair, problem = check_row(line)
        if pair is None:
            bad.append((pos, *problem))
        else:
            inputs.append(pair[0])
            # Megatron's --prepend-space: the target continues the input text after a space.
            targets.append(" " + pair[1])
            good.append(pos)
    enc_in = [e.ids for e in _TOK.encode_batch_fast(inputs, add_special_tokens=False)] if inputs else []
    enc_tg = [e.ids for e in _TOK.encode_batch_fast(targets, add_special_tokens=False)] if targets else []
    if _MAX_TOKENS:
        sizes = [len(a) + len(b) + 1 for a, b in zip(enc_in, enc_tg)]  # + the end-of-document token
        keep = [i for i, n in enumerate(sizes) if n <= _MAX_TOKENS]
        if len(keep) < len(sizes):
            bad += [(good[i], too_long, f"{n:,} tokens") for i, n in enumerate(sizes) if n > _MAX_TOKENS]
            bad.sort()
            enc_in, enc_tg, good = [enc_in[i] for i in keep], [enc_tg[i] for i in keep], [good[i] for i in keep]
    in_tok, in_len = _flatten(enc_in)
    tg_tok, tg_len = _flatten(enc_tg, extra=_EOD)
    return ChunkResult(in_tok, in_len, tg_tok, tg_len, np.asarray(good, dtype=np.int64), bad)
