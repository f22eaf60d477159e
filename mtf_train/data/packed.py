"""Packed MTF samples for the trainer: the datasets of Megatron-DeepSpeed's finetune_t0.

    train, valid = build_datasets(train_groups, valid_groups, seq_length=..., train_samples=...,
                                  eval_samples_per_group=..., seed=..., pad_id=...)
    row = train[i]   # {"input_ids": int64[s+1], "segment_ids": int32[s+1], "is_input": bool[s+1]}

Each path-file entry is one dataset: example i = inputs document i + targets document i of
`PREFIX_{inputs,targets}_document`, restricted to the entry's S:E split of documents. Its examples are
packed into rows (see packing.py) and the entries of a group are blended by normalised weight. Sample i
depends only on i, the data and the seed (never on what was read before), so a resumed run reads on.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mtf_train.data import cache, packing
from mtf_train.data.errors import DataError
from mtf_train.data.indexed import MTFPair, pair_index
from mtf_train.data.pathfile import Group
from mtf_train.rules import eval_samples_per_group

INDEX_VERSION = 1


def _index_name(prefix: str, lo: int, hi: int, seq_length: int, num_samples: int, seed: int,
                lengths: np.ndarray) -> str:
    """Cache file name: readable settings plus a digest of everything the packing depends on."""
    h = hashlib.blake2b(digest_size=8)
    h.update(np.asarray([INDEX_VERSION, lo, hi, seq_length, num_samples, seed], dtype="<i8").tobytes())
    h.update(np.ascontiguousarray(lengths, dtype="<i8").tobytes())  # the data, as far as packing sees it
    return f"{Path(prefix).name}_docs{lo}-{hi}_seq{seq_length}_n{num_samples}_seed{seed}_{h.hexdigest()}.packidx"


class PackedMTFDataset:
    """One dataset's rows: `num_samples` rows of seq_length + 1 tokens packed from documents [lo, hi).

    The packing reads the example lengths from the two .idx files with numpy; `open_reader` also opens megatron's
    reader, which reads the tokens, now (the trainer: a dataset it cannot read fails before the first step)
    rather than on first read (`data index`, which reads no tokens and so imports no torch or megatron)."""

    def __init__(self, prefix: str, doc_range=None, *, seq_length: int, num_samples: int,
                 seed: int, pad_id: int, cache_dir: str | os.PathLike | None = None, split: str = "",
                 open_reader: bool = True):
        self.prefix, self.seq_length, self.num_samples = prefix, seq_length, num_samples
        self.seed, self.pad_id = seed, pad_id
        all_lengths = pair_index(prefix)
        self.num_docs = len(all_lengths)
        self._pair = None
        if open_reader:
            self.pair  # opened and checked now
        # doc_range: (lo, hi), or a function of the document count such as Entry.doc_range, or None = all.
        if doc_range is None:
            doc_range = (0, self.num_docs)
        lo, hi = doc_range(self.num_docs) if callable(doc_range) else doc_range
        if not 0 <= lo < hi <= self.num_docs:
            raise DataError(prefix, f"split {split or f'{lo}:{hi}'} of {self.num_docs} documents selects "
                            f"documents [{lo}, {hi}), which is empty")
        self.doc_range = (lo, hi)
        lengths = all_lengths[lo:hi]
        folder = cache.cache_dir_for(prefix, cache_dir)
        self.index_path = folder / _index_name(prefix, lo, hi, seq_length, num_samples, seed, lengths)
        row_len = seq_length + 1

        def build() -> packing.PackIndex:
            try:
                return packing.build_pack_index(lengths, lo, row_len, num_samples, seed)
            except ValueError as err:
                raise DataError(prefix, f"documents [{lo}, {hi}): {err}") from None

        self._index, self.built = cache.get_or_build(self.index_path, build)
        self.skipped = self._index.skipped
        self.epochs = self._index.epochs
        self.rows_per_epoch = self._index.rows_per_epoch

    @property
    def pair(self) -> MTFPair:
        """megatron's reader of the inputs and targets, checked to count the documents the index holds."""
        if self._pair is None:
            pair = MTFPair(self.prefix)
            pair.check(self.num_docs)
            self._pair = pair
        return self._pair

    @property
    def index(self) -> packing.PackIndex:
        if self._index is None:  # unpickled in a data loader worker: map the cache file again
            self._index = cache.load_index(self.index_path)
            if self._index is None:
                raise DataError(str(self.index_path), "index cache file is missing or damaged")
        return self._index

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_index"] = None  # memory maps are reopened, not copied, in other processes
        return state

    def __len__(self) -> int:
        return self.num_samples

    def documents(self, i: int) -> np.ndarray:
        ix = self.index
        return np.asarray(ix.doc_ids[ix.row_offsets[i]:ix.row_offsets[i + 1]])

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range [0, {self.num_samples})")
        n = self.seq_length + 1
        ids = np.full(n, self.pad_id, dtype=np.int64)
        seg = np.zeros(n, dtype=np.int32)
        is_input = np.zeros(n, dtype=bool)
        pos = 0
        for s, d in enumerate(self.documents(i).tolist(), start=1):
            x, y = self.pair.inputs[d], self.pair.targets[d]
            end = pos + len(x) + len(y)
            ids[pos:pos + len(x)] = x
            ids[pos + len(x):end] = y
            is_input[pos:pos + len(x)] = True
            seg[pos:end] = s
            pos = end
        return {"input_ids": ids, "segment_ids": seg, "is_input": is_input}

    def describe(self) -> dict:
        lo, hi = self.doc_range
        return {"prefix": self.prefix, "documents": hi - lo, "doc_range": (lo, hi), "skipped_too_long": self.skipped,
                "rows_per_epoch": self.rows_per_epoch, "samples": self.num_samples,
                "epochs": self.num_samples / max(self.rows_per_epoch, 1), "index": str(self.index_path),
                "built": self.built}


class BlendedMTFDataset:
    """A group's datasets blended by normalised weight: `num_samples` samples."""

    def __init__(self, name: str, datasets: list[PackedMTFDataset], weights: list[float], num_samples: int):
        self.name, self.datasets, self.num_samples = name, datasets, num_samples
        total = float(sum(weights))
        self.weights = [w / total for w in weights]
        self.dataset_index, self.sample_index = packing.blend_index(self.weights, [len(d) for d in datasets],
                                                                    num_samples)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range [0, {self.num_samples})")
        return self.datasets[int(self.dataset_index[i])][int(self.sample_index[i])]

    def describe(self) -> list[dict]:
        counts = np.bincount(self.dataset_index, minlength=len(self.datasets))
        return [dict(d.describe(), weight=w, share=int(c) / max(self.num_samples, 1))
                for d, w, c in zip(self.datasets, self.weights, counts)]


# The trainer's names for the two roles.
TrainDataset = BlendedMTFDataset
ValidDataset = BlendedMTFDataset


def _group_dataset(group: Group, num_samples: int, *, seq_length: int, seed: int, pad_id: int,
                   cache_dir, open_readers: bool) -> BlendedMTFDataset:
    weights = [e.weight for e in group.entries]
    sizes = packing.samples_per_dataset(weights, num_samples)
    datasets = []
    for entry, size in zip(group.entries, sizes):
        datasets.append(PackedMTFDataset(entry.prefix, entry.doc_range, seq_length=seq_length,
                                         num_samples=size, seed=seed, pad_id=pad_id, cache_dir=cache_dir,
                                         split=entry.split_text, open_reader=open_readers))
    return BlendedMTFDataset(group.name, datasets, weights, num_samples)


def build_datasets(train_groups: list[Group], valid_groups: list[Group], *, seq_length: int, train_samples: int,
                   eval_samples_per_group: int, seed: int, pad_id: int, cache_dir=None, open_readers: bool = True
                   ) -> tuple[TrainDataset, dict[str, ValidDataset]]:
    """The training blend and one validation blend per validation group (none when no eval samples).
    `open_readers=False`: the packing indexes alone (see PackedMTFDataset)."""
    if len(train_groups) != 1:
        raise DataError("train path file", f"exactly one training group is expected, got {len(train_groups)}"
                        + (f" ({', '.join(g.name for g in train_groups)})" if train_groups else ""))
    if seq_length < 1 or train_samples < 1:
        raise DataError("build_datasets", f"seq_length and train_samples must be positive, got "
                        f"{seq_length} and {train_samples}")
    kw = dict(seq_length=seq_length, seed=seed, pad_id=pad_id, cache_dir=cache_dir, open_readers=open_readers)
    train = _group_dataset(train_groups[0], train_samples, **kw)
    valid = {}
    if eval_samples_per_group > 0:
        for g in valid_groups:
            valid[g.name] = _group_dataset(g, eval_samples_per_group, **kw)
    return train, valid


@dataclass(frozen=True)
class SampleCounts:
    train_samples: int
    train_iters: int
    eval_samples_per_group: int


def recipe_sample_counts(recipe) -> SampleCounts:
    """The sample counts a recipe implies, as the trainer passes them to build_datasets (same cache keys).

    Eval samples per group: rules.eval_samples_per_group, which the trainer calls with its arguments.
    """
    from mtf_train.recipe.shape import derive_shape

    shape = derive_shape(recipe)
    if shape.train_samples is None or shape.train_iters is None:
        raise DataError(str(getattr(getattr(recipe, "origin", None), "path", "recipe")),
                        "set training.train_samples or training.train_iters", field="training")
    ev = recipe.eval
    eval_samples = eval_samples_per_group(shape.train_iters, ev.interval, ev.iters, recipe.batch.global_)
    return SampleCounts(shape.train_samples, shape.train_iters, eval_samples)


__all__ = ["build_datasets", "TrainDataset", "ValidDataset", "PackedMTFDataset", "BlendedMTFDataset",
           "recipe_sample_counts", "SampleCounts"]
