"""Tiny BLOOM shapes, weights and packed batches shared by the model tests and the multi-rank scripts."""
from __future__ import annotations

import torch

from mtf_train.train.loss import prepare_batch
from mtf_train.train.model import BloomModelConfig

VOCAB = 256


def tiny_config(**overrides) -> BloomModelConfig:
    kwargs = dict(num_layers=2, hidden_size=64, num_heads=4, padded_vocab_size=VOCAB, original_vocab_size=250,
                  init_std=0.02, attention="reference")
    kwargs.update(overrides)
    return BloomModelConfig(**kwargs)


@torch.no_grad()
def perturb_(module: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> None:
    """Make every parameter (biases and layer norms included) non-trivial, the same on every rank."""
    g = torch.Generator().manual_seed(seed)
    for _, p in sorted(module.named_parameters()):
        p.add_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * scale)


def packed_rows(batch: int = 2, seq: int = 16, seed: int = 0):
    """`[b, seq+1]` packed rows (input_ids, segment_ids, is_input): 2-3 examples per row, trailing padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, seq + 1), generator=g)
    seg = torch.zeros(batch, seq + 1, dtype=torch.long)
    is_input = torch.zeros(batch, seq + 1, dtype=torch.bool)
    layouts = [[(3, 2), (4, 3), (2, 2)], [(5, 4), (3, 4)]]  # (input length, target length) per example
    for row in range(batch):
        pos = 0
        for k, (n_in, n_tgt) in enumerate(layouts[row % len(layouts)], start=1):
            seg[row, pos:pos + n_in + n_tgt] = k
            is_input[row, pos:pos + n_in] = True
            pos += n_in + n_tgt
        is_input[row, pos:] = True  # padding is not a target
        ids[row, pos:] = 3  # pad id
    return ids, seg, is_input


def micro_batches(n: int, batch: int = 2, seq: int = 16, seed: int = 0):
    """`n` pipeline-engine batches `((tokens, segment_ids), (labels, loss_mask, segment_ids))`."""
    out = []
    for i in range(n):
        tokens, labels, loss_mask, seg = prepare_batch(*packed_rows(batch, seq, seed + i))
        out.append(((tokens, seg), (labels, loss_mask, seg)))
    return out
