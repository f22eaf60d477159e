"""Helpers for tests (here and in other packages): small MTF indexed datasets with known contents."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

SAMPLE_DIR = Path(__file__).resolve().parents[2] / "data" / "sample"
SAMPLE_TOKENIZER = SAMPLE_DIR / "tokenizer"


def write_mtf_dataset(prefix: str | Path, inputs: list, targets: list, dtype=np.uint16) -> str:
    """Write `PREFIX_{inputs,targets}_document.{bin,idx}` with megatron-core's builder; one document per item."""
    from mtf_train.data.indexed import doc_prefix, megatron_indexed

    mod = megatron_indexed()
    prefix = str(prefix)
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    for kind, docs in (("inputs", inputs), ("targets", targets)):
        p = doc_prefix(prefix, kind)
        builder = mod.IndexedDatasetBuilder(p + ".bin", dtype=dtype)
        for doc in docs:
            arr = np.asarray(doc, dtype=np.int64)
            builder.add_document(arr, [len(arr)])
        builder.finalize(p + ".idx")
    return prefix


def synthetic_mtf(prefix: str | Path, lengths: list[tuple[int, int]], dtype=np.uint16) -> str:
    """Document i: inputs = [10 + i % 1000] * a_i, targets = [2000 + i % 1000] * (b_i - 1) + [2] (eod).

    Token values tell a document's index and its half apart, which packing tests read back.
    """
    inputs = [[10 + i % 1000] * a for i, (a, _) in enumerate(lengths)]
    targets = [[2000 + i % 1000] * (b - 1) + [2] for i, (_, b) in enumerate(lengths)]
    return write_mtf_dataset(prefix, inputs, targets, dtype)


def write_jsonl(path: str | Path, rows: list) -> Path:
    """Rows are dicts (written as JSON) or str/bytes (written as they are, for bad-row tests)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        for r in rows:
            if isinstance(r, bytes):
                fh.write(r + b"\n")
            elif isinstance(r, str):
                fh.write(r.encode() + b"\n")
            else:
                fh.write(json.dumps(r, ensure_ascii=False).encode() + b"\n")
    return path
