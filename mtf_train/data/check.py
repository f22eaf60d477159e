"""`mtf-train data check`: a path file's datasets, their files, sizes and shares, and the epochs a recipe implies."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from mtf_train.data.errors import DataError
from mtf_train.data.pathfile import Group


@dataclass
class DatasetReport:
    group: str
    prefix: str
    split: str
    weight: float                   # normalised within its group
    documents: int | None = None    # all documents of the dataset
    doc_range: tuple[int, int] | None = None
    tokens: int | None = None       # inputs + targets tokens of the split
    samples: int | None = None      # rows the recipe's length asks of this dataset
    rows_per_epoch: int | None = None
    too_long: int | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def epochs(self) -> float | None:
        if self.samples is None or not self.rows_per_epoch:
            return None
        return self.samples / self.rows_per_epoch


def check_groups(groups: list[Group], *, seq_length: int | None = None, num_samples: int | None = None,
                 seed: int = 42) -> list[DatasetReport]:
    """One report per entry. With seq_length and num_samples, the rows one epoch packs into and the epochs."""
    from mtf_train.data import packing
    from mtf_train.data.indexed import pair_index

    reports = []
    for g in groups:
        weights = g.normalised_weights()
        sizes = packing.samples_per_dataset(weights, num_samples) if num_samples else [None] * len(weights)
        for e, w, n in zip(g.entries, weights, sizes):
            r = DatasetReport(g.name, e.prefix, e.split_text, w, samples=n)
            reports.append(r)
            missing = [f for f in e.files() if not os.path.isfile(f)]
            if missing:
                r.problems += [f"{f}: missing" for f in missing]
                continue
            try:
                all_lengths = pair_index(e.prefix)
            except DataError as err:
                r.problems.append(str(err))
                continue
            r.documents = len(all_lengths)
            lo, hi = e.doc_range(r.documents)
            r.doc_range = (lo, hi)
            if hi <= lo:
                r.problems.append(f"{e.prefix}: split {e.split_text} of {r.documents} documents is empty")
                continue
            lengths = all_lengths[lo:hi]
            r.tokens = int(lengths.sum())
            if seq_length is not None:
                row_len = seq_length + 1
                r.too_long = int((lengths > row_len).sum())
                usable = np.flatnonzero(lengths <= row_len)
                if len(usable) == 0:
                    r.problems.append(f"{e.prefix}: every example of the split is longer than {row_len} tokens")
                    continue
                # The first epoch exactly as the trainer packs it.
                order = usable[np.random.RandomState([seed, 0]).permutation(len(usable))]
                r.rows_per_epoch = len(packing.next_fit_starts(lengths[order], row_len)[0])
    return reports


def _n(x) -> str:
    return "-" if x is None else f"{x:,}"


def format_reports(reports: list[DatasetReport]) -> str:
    with_epochs = any(r.samples is not None for r in reports)
    head = ["group", "dataset", "split", "documents (split)", "tokens (split)", "share"]
    if with_epochs:
        head += ["samples", "rows/epoch", "epochs", "too long"]
    rows = []
    for r in reports:
        docs = "-" if r.documents is None else (
            f"{r.documents:,} ({r.doc_range[1] - r.doc_range[0]:,})" if r.doc_range else f"{r.documents:,}")
        row = [r.group, os.path.basename(r.prefix), r.split, docs, _n(r.tokens), f"{100 * r.weight:.2f}%"]
        if with_epochs:
            row += [_n(r.samples), _n(r.rows_per_epoch), "-" if r.epochs is None else f"{r.epochs:.2f}",
                    _n(r.too_long)]
        rows.append(row)
    for g in dict.fromkeys(r.group for r in reports):
        mine = [r for r in reports if r.group == g]
        tot = [g, f"total ({len(mine)} datasets)", "", _n(sum(r.documents or 0 for r in mine)),
               _n(sum(r.tokens or 0 for r in mine)), "100.00%"]
        if with_epochs:
            tot += [_n(sum(r.samples or 0 for r in mine)), "", "", _n(sum(r.too_long or 0 for r in mine))]
        rows.append(tot)
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    right = {3, 4, 5, 6, 7, 8, 9}
    lines = []
    for row in [head] + rows:
        lines.append("  ".join(str(c).rjust(w) if i in right else str(c).ljust(w)
                               for i, (c, w) in enumerate(zip(row, widths))).rstrip())
    return "\n".join(lines)
