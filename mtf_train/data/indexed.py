"""megatron-core's indexed (.bin/.idx) datasets, imported quietly, and the inputs/targets pair of an MTF dataset."""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from mtf_train.data.errors import DataError

KINDS = ("inputs", "targets")


def megatron_indexed():
    """The megatron-core module; its import warns about missing Transformer Engine/Apex, which is noise here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


def optimal_dtype(vocab_size: int):
    """uint16 under 65500 vocabulary entries, else int32 (the rule of megatron's preprocess_data)."""
    return megatron_indexed().DType.optimal_dtype(vocab_size)


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

    def check(self) -> int:
        """Number of documents; raises DataError unless both halves agree."""
        n_in, n_tg = len(self.inputs), len(self.targets)
        if n_in != n_tg:
            raise DataError(self.prefix, f"inputs hold {n_in} documents but targets hold {n_tg}")
        if self.inputs.index.dtype != self.targets.index.dtype:
            raise DataError(self.prefix, f"inputs are {np.dtype(self.inputs.index.dtype).name} but targets are "
                            f"{np.dtype(self.targets.index.dtype).name}")
        return n_in

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
