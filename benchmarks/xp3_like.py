"""Packed rows shaped like xP3 for the benchmarks: examples of 128-768 tokens (an input followed by a target
that is a given share of it) packed greedily into rows of seq+1 tokens, as `mtf_train.data.packing` does.
The target share is an assumption (prompts with passages and short answers), not a measurement of xP3."""
from __future__ import annotations

TARGET_FRACTION = 0.25


def packed_batch(micro: int, seq: int, vocab: int, fraction: float = TARGET_FRACTION, seed: int = 0,
                 min_len: int = 128, max_len: int = 768):
    """`[micro, seq+1]` (input_ids, segment_ids, is_input) as the trainer's data loader yields them."""
    import torch

    g = torch.Generator().manual_seed(seed)
    min_len, max_len = min(min_len, seq + 1), min(max_len, seq + 1)
    ids = torch.randint(0, vocab, (micro, seq + 1), generator=g)
    seg = torch.zeros(micro, seq + 1, dtype=torch.long)
    is_input = torch.ones(micro, seq + 1, dtype=torch.bool)
    for row in range(micro):
        pos, k = 0, 1
        while pos < seq + 1:
            length = min(int(torch.randint(min_len, max_len + 1, (1,), generator=g)), seq + 1 - pos)
            n_target = max(1, round(fraction * length)) if length > 1 else 0
            seg[row, pos:pos + length] = k
            is_input[row, pos + length - n_target:pos + length] = False
            pos, k = pos + length, k + 1
    return ids, seg, is_input
