"""megatron-core's indexed (.bin/.idx) datasets, imported quietly, and the inputs/targets pair of an MTF dataset."""
from __future__ import annotations

import logging
import os
import struct
import warnings
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from mtf_train.compat import defer_import_compiles
from mtf_train.data.errors import DataError

KINDS = ("inputs", "targets")


def megatron_indexed():
    """The megatron-core module, imported quietly: a data command's error stays one line. Its import warns about
    missing Transformer Engine/Apex; 0.17+ also imports torch's cpp_extension (which logs "No CUDA runtime" on a
    CUDA build without a GPU) and warns, for each dataset opened outside torch.distributed, that it assumes rank 0,
    which a data process is. Each is a no-op where megatron-core does not do it."""
    defer_import_compiles()
    warnings.filterwarnings("ignore", message="Could not determine rank", category=UserWarning)
    import torch  # megatron's first import anyway; before its loggers are quieted

    cpp_extension_log = logging.getLogger("torch.utils.cpp_extension")
    level = cpp_extension_log.level
    cpp_extension_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from megatron.core.datasets import indexed_dataset
    finally:
        cpp_extension_log.setLevel(level)
    return indexed_dataset


def optimal_dtype(vocab_size: int | None):
    """uint16 under 65500 vocabulary entries, else int32 (the rule of megatron's preprocess_data)."""
    return np.uint16 if vocab_size is not None and vocab_size < 65500 else np.int32


def doc_prefix(prefix: str, kind: str) -> str:
    return f"{prefix}_{kind}_document"


def open_indexed(path_prefix: str):
    for ext in (".bin", ".idx"):
        if not os.path.isfile(path_prefix + ext):
            raise DataError(path_prefix + ext, "missing")
    mod = megatron_indexed()
    ds = mod.IndexedDataset.__new__(mod.IndexedDataset)
    try:
        # An empty .bin (every document empty) cannot be memory-mapped; it has nothing to read anyway.
        ds.__init__(path_prefix, mmap=os.path.getsize(path_prefix + ".bin") > 0)
    except Exception as err:  # megatron asserts / struct errors on a damaged file
        _defuse(ds)
        raise DataError(path_prefix + ".idx", f"cannot read indexed dataset: {type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else 'malformed'}") from None
    return ds


def _defuse(ds) -> None:
    """A half-built IndexedDataset's __del__ trips over missing attributes and prints noise at exit."""
    for name in ("bin_reader", "index"):
        if not hasattr(ds, name):
            setattr(ds, name, None)
    reader = ds.bin_reader
    if reader is not None:
        for name in ("_bin_buffer_mmap", "_bin_file_reader"):
            if not hasattr(reader, name):
                setattr(reader, name, None)


@dataclass
class MTFPair:
    """`PREFIX_inputs_document` and `PREFIX_targets_document`: example i = inputs doc i + targets doc i."""
    prefix: str

    @cached_property
    def inputs(self):
        return open_indexed(doc_prefix(self.prefix, "inputs"))

    @cached_property
    def targets(self):
        return open_indexed(doc_prefix(self.prefix, "targets"))

    def check(self, documents: int | None = None) -> int:
        """Number of documents; raises DataError unless both halves agree and each .idx fits its .bin (read as
        `pair_index` does), and megatron's reader, which the trainer uses, opens both and counts the same.
        `documents`: what `pair_index` gave a caller that has read it already (its files are not read again)."""
        n = len(pair_index(self.prefix)) if documents is None else documents
        for kind, ds in (("inputs", self.inputs), ("targets", self.targets)):
            if len(ds) != n:
                raise DataError(doc_prefix(self.prefix, kind) + ".idx", f"megatron reads {len(ds)} documents, "
                                f"the index holds {n}")
        return n

    def __len__(self) -> int:
        return len(self.inputs)

    def lengths(self, lo: int = 0, hi: int | None = None) -> np.ndarray:
        """Example lengths (inputs + targets tokens) of documents [lo, hi), int64."""
        return (self.inputs.sequence_lengths[lo:hi].astype(np.int64)
                + self.targets.sequence_lengths[lo:hi].astype(np.int64))

    def __getstate__(self):
        return {"prefix": self.prefix}  # reopen (mmap) in the receiving process

    def __setstate__(self, state):
        self.prefix = state["prefix"]


# megatron-core's mmap index: a header, then int32 sequence lengths, int64 byte offsets into the .bin and int64
# document indices. Read and written here with numpy alone: recipe checks and preprocessing need no torch/megatron.
_IDX_MAGIC = b"MMIDIDX\x00\x00"
_IDX_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
               8: np.uint16}


class IndexWriter:
    """megatron-core's IndexedDatasetBuilder for documents of one sequence each, with numpy alone: the same .bin and
    .idx byte for byte (tests/test_data_preprocess.py compares), so `data preprocess` imports no torch or
    megatron. `add_documents(tokens, lengths)`: the rows of a chunk, concatenated; `finalize(idx_path)` writes
    the index and closes the .bin."""

    def __init__(self, bin_path: str, dtype):
        self.dtype = np.dtype(dtype)
        self.code = next(c for c, t in _IDX_DTYPES.items() if np.dtype(t) == self.dtype)
        self.data_file = open(bin_path, "wb")
        self._lengths: list[np.ndarray] = []

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        self.data_file.write(np.ascontiguousarray(tokens, dtype=self.dtype).tobytes())
        self._lengths.append(np.asarray(lengths, dtype=np.int32))

    def finalize(self, idx_path: str) -> None:
        self.data_file.close()
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.int32)
        pointers = np.zeros(len(lengths), dtype=np.int64)
        np.cumsum(lengths[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
        documents = np.arange(len(lengths) + 1, dtype=np.int64)  # each document ends after its one sequence
        with open(idx_path, "wb") as fh:
            fh.write(_IDX_MAGIC + struct.pack("<Q", 1) + struct.pack("<B", self.code))
            fh.write(struct.pack("<Q", len(lengths)) + struct.pack("<Q", len(documents)))
            fh.write(lengths.tobytes() + pointers.tobytes() + documents.tobytes())


def read_index(path_prefix: str) -> tuple[np.dtype, np.ndarray]:
    """(token dtype, int32 sequence lengths) of `path_prefix.idx`; raises DataError when the .idx is malformed or
    does not describe its .bin byte for byte (a copy cut short, a .bin from another run), which the trainer
    would otherwise meet as an error deep inside megatron, naming no file."""
    idx, bin_ = path_prefix + ".idx", path_prefix + ".bin"
    for f in (bin_, idx):
        if not os.path.isfile(f):
            raise DataError(f, "missing")
    try:
        with open(idx, "rb") as fh:
            head = fh.read(len(_IDX_MAGIC) + 8 + 1 + 8 + 8)
            if len(head) < len(_IDX_MAGIC) + 25 or head[:len(_IDX_MAGIC)] != _IDX_MAGIC:
                raise DataError(idx, "not a megatron indexed-dataset index (bad header)")
            code = head[len(_IDX_MAGIC) + 8]
            count = int.from_bytes(head[len(_IDX_MAGIC) + 9:len(_IDX_MAGIC) + 17], "little")
            if code not in _IDX_DTYPES:
                raise DataError(idx, f"unknown token dtype code {code}")
            lengths = np.fromfile(fh, dtype=np.int32, count=count)
            pointers = np.fromfile(fh, dtype=np.int64, count=count)
    except OSError as err:
        raise DataError(idx, f"cannot read: {err.strerror or err}") from None
    if len(lengths) != count or len(pointers) != count:
        raise DataError(idx, f"cut short: its header announces {count:,} sequences")
    dtype = np.dtype(_IDX_DTYPES[code])
    expected = int(pointers[-1]) + int(lengths[-1]) * dtype.itemsize if count else 0
    size = os.path.getsize(bin_)
    if size != expected:
        why = "cut short" if size < expected else "larger than its index says"
        raise DataError(bin_, f"holds {size:,} bytes but {os.path.basename(idx)} describes {expected:,} "
                        f"({count:,} sequences of {dtype.name}): {why}; copy it again or re-run preprocess")
    return dtype, lengths


def check_sizes(path_prefix: str) -> int:
    """Sequences in `path_prefix.idx`, checked against its .bin (see `read_index`)."""
    return len(read_index(path_prefix)[1])


def pair_index(prefix: str) -> np.ndarray:
    """Example lengths (inputs + targets tokens, int64) of an MTF pair, read from its two indexes with numpy alone
    (no torch or megatron import: `data check` runs on a login node in a fraction of a second); raises DataError
    unless each .idx fits its .bin and both halves hold as many documents of the same token type."""
    (dt_in, len_in), (dt_tg, len_tg) = (read_index(doc_prefix(prefix, kind)) for kind in KINDS)
    if len(len_in) != len(len_tg):
        raise DataError(prefix, f"inputs hold {len(len_in)} documents but targets hold {len(len_tg)}")
    if dt_in != dt_tg:
        raise DataError(prefix, f"inputs are {dt_in.name} but targets are {dt_tg.name}")
    return len_in.astype(np.int64) + len_tg.astype(np.int64)
