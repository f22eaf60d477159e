"""Micro batches for this data-parallel rank, in Megatron's global sample order.

Global sample k of the run is `dataset[k]`; a step takes the next global batch of consecutive samples and
data-parallel rank r takes, of every `micro * dp` consecutive samples, the r-th slice of `micro`. The order
depends only on the number of samples consumed, so a resumed run reads exactly what an uninterrupted one
would, and every (TP, PP, DP) shape sees the same micro batches.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from mtf_train.train.loss import prepare_batch


class MicroBatchSampler(Sampler):
    def __init__(self, start: int, micro: int, dp: int, dp_rank: int, total: int):
        self.start, self.micro, self.dp, self.dp_rank, self.total = start, micro, dp, dp_rank, total

    def __iter__(self) -> Iterator[list[int]]:
        first = self.start + self.dp_rank * self.micro
        for base in range(first, self.total - self.micro + 1, self.micro * self.dp):
            yield list(range(base, base + self.micro))

    def __len__(self) -> int:
        return max(0, (self.total - self.start) // (self.micro * self.dp))


def collate(rows: list[dict]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ids = torch.from_numpy(np.stack([r["input_ids"] for r in rows]).astype(np.int64))
    seg = torch.from_numpy(np.stack([r["segment_ids"] for r in rows]).astype(np.int64))
    is_input = torch.from_numpy(np.stack([r["is_input"] for r in rows]))
    return ids, seg, is_input


def to_pipe_batch(batch, device: torch.device):
    """(inputs, labels) as DeepSpeed's pipeline engine takes them: first stage reads inputs, last reads labels."""
    tokens, labels, loss_mask, segment_ids = prepare_batch(*batch)
    tokens, labels, loss_mask, segment_ids = (t.to(device, non_blocking=True)
                                              for t in (tokens, labels, loss_mask, segment_ids))
    return (tokens, segment_ids), (labels, loss_mask, segment_ids)


class Feed:
    """An endless-until-exhausted iterator of pipeline micro batches starting at global sample `start`."""

    def __init__(self, dataset, *, start: int, micro: int, dp: int, dp_rank: int, device: torch.device,
                 num_workers: int = 0):
        total = len(dataset)
        sampler = MicroBatchSampler(start, micro, dp, dp_rank, total)
        self.loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=num_workers,
                                 pin_memory=device.type == "cuda", persistent_workers=False)
        self.device = device
        self._it = iter(self.loader)

    def __iter__(self):
        return self

    def __next__(self):
        return to_pipe_batch(next(self._it), self.device)
