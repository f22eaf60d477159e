"""Pure-numpy index building: greedy packing of examples into rows, and blending of datasets by weight.

Packing follows Megatron-DeepSpeed's finetune_t0 (t0loading branch): each epoch shuffles the usable examples with a seeded
RandomState (whose streams numpy keeps stable across versions, so a rebuilt map is the same map) and packs
them in that order, next-fit, into rows of `row_len` = seq_length + 1 tokens. An example longer than a row
is skipped. Epochs follow one another until the requested number of rows exists; each epoch starts a fresh
row, so that no row holds the same example twice.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_WINDOW = 1 << 20


def next_fit_starts(lengths: np.ndarray, row_len: int, limit: int | None = None) -> tuple[np.ndarray, int]:
    """Row starts (positions into `lengths`) of next-fit packing, and the end of the last row.

    Every length must be in [1, row_len]. Row r holds examples [starts[r], starts[r+1]) (the last one
    ends at the returned end). At most `limit` rows are made.
    """
    n = len(lengths)
    if n == 0:
        return np.zeros(0, dtype=np.int64), 0
    cum = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=cum[1:])
    # A row starting at example i ends before the first example that would overflow it.
    nxt = np.searchsorted(cum, cum[:-1] + row_len, side="right") - 1
    limit = n if limit is None else min(limit, n)
    parts, made, i = [], 0, 0
    while i < n and made < limit:  # follow the chain 0 -> nxt[0] -> ..., one window of nxt at a time
        base = i
        window = nxt[base:base + _WINDOW].tolist()
        stop = base + len(window)
        out = []
        while i < stop and made < limit:
            out.append(i)
            made += 1
            i = window[i - base]
        parts.append(np.asarray(out, dtype=np.int64))
    return np.concatenate(parts), i


@dataclass
class PackIndex:
    row_offsets: np.ndarray   # int64 [rows + 1]: row r holds doc_ids[row_offsets[r]:row_offsets[r+1]]
    doc_ids: np.ndarray       # int32: document indices in the indexed dataset, in packing order
    skipped: int              # documents of the range longer than a row (left out of every epoch)
    epochs: int               # epochs started (the last one may be partial)
    rows_per_epoch: int       # rows of one full epoch (of the first)

    @property
    def rows(self) -> int:
        return len(self.row_offsets) - 1


def build_pack_index(lengths: np.ndarray, first_doc: int, row_len: int, num_rows: int, seed: int) -> PackIndex:
    """Pack documents `first_doc + i` (i over `lengths`) into exactly `num_rows` rows."""
    usable = np.flatnonzero(lengths <= row_len)
    skipped = len(lengths) - len(usable)
    if len(usable) == 0:
        raise ValueError(f"all {len(lengths)} examples are longer than a row of {row_len} tokens")
    offsets, docs = [np.zeros(1, dtype=np.int64)], []
    made = used = epoch = 0
    rows_per_epoch = 0
    while made < num_rows:
        order = usable[np.random.RandomState([seed, epoch]).permutation(len(usable))]
        # The first epoch is packed whole, to report its size; later ones only as far as needed.
        starts, end = next_fit_starts(lengths[order], row_len, None if epoch == 0 else num_rows - made + 1)
        if epoch == 0:
            rows_per_epoch = len(starts)
        take = min(len(starts), num_rows - made)
        stop = end if take == len(starts) else int(starts[take])
        offsets.append(starts[1:take] + used)
        offsets.append(np.array([used + stop], dtype=np.int64))
        docs.append((order[:stop] + first_doc).astype(np.int32))
        used += stop
        made += take
        epoch += 1
    return PackIndex(np.concatenate(offsets), np.concatenate(docs), skipped, epoch, rows_per_epoch)


def samples_per_dataset(weights: list[float], num_samples: int) -> list[int]:
    """Megatron's sizing: each dataset builds ceil(N * w * 1.005) rows, weights normalised."""
    total = float(sum(weights))
    return [int(np.ceil(num_samples * (w / total) * 1.005)) for w in weights]


def blend_index(weights: list[float], sizes: list[int], num_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """(dataset index, sample index within it) for each of `num_samples` blended samples.

    Dataset k's j-th sample is placed at (j + 0.5) / w_k on a common axis and the first `num_samples`
    places are taken (a divisor method): every prefix of the blend holds each dataset within about one
    sample of its weight, and samples of a dataset come in order.
    """
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    if sum(sizes) < num_samples:
        raise ValueError(f"datasets hold {sum(sizes)} samples, fewer than {num_samples}")
    keys = np.concatenate([(np.arange(s, dtype=np.float64) + 0.5) / wk for s, wk in zip(sizes, w)])
    # Stable: equal places go to the dataset listed first.
    order = np.argsort(keys, kind="stable")[:num_samples]
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    ds = (np.searchsorted(starts, order, side="right") - 1).astype(np.int32)
    return ds, order - starts[ds]
