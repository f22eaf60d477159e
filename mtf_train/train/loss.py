"""Batch preparation and the target-only loss of finetune_t0.py.

Packed rows arrive as `input_ids, segment_ids, is_input` of length s+1. The model sees `tokens = ids[:, :-1]`
and predicts `labels = ids[:, 1:]`. A position counts in the loss when its LABEL is a target token of a real
example: `is_input[:, 1:] == False` and `segment_ids[:, 1:] != 0`.

Normalisation, per micro batch (exactly what finetune_t0 does):
- default: sum of masked token losses / number of masked tokens;
- `norm_target_loss`: every example gets the same weight: the mean over examples of that example's mean
  target-token loss. An example is a (row, segment id) pair, using the segment ids of the input tokens.
  finetune_t0 gets there by weighting each maximal run of consecutive target labels by 1/run length and
  dividing by the number of runs; that is the same thing whenever every example has a non-empty input (its
  input tokens then separate its targets from the previous example's). For an example with an empty input
  the two differ: finetune_t0 merges its targets into the previous example's run, we keep it separate.
The loss is a per-micro-batch mean. Gradient accumulation and data parallelism then average these means
(DeepSpeed scales each micro batch by 1/accumulation steps and averages gradients over DP ranks), so the
optimised quantity is the mean over all micro batches of the step of their per-micro-batch means, not a mean
over all examples (or tokens) of the global batch. With micro batch 1 (the BLOOMZ setting) that is: the mean
over packed rows of the mean over the row's examples.
A micro batch without any target token gives 0 (instead of finetune_t0's 0/0 = NaN).
"""
from __future__ import annotations

import torch


def prepare_batch(
    input_ids: torch.Tensor, segment_ids: torch.Tensor, is_input: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`[b, s+1]` packed rows -> `tokens, labels, loss_mask (bool), segment_ids`, each `[b, s]`."""
    input_ids = input_ids.long()
    segment_ids = segment_ids.long()
    tokens = input_ids[:, :-1].contiguous()
    labels = input_ids[:, 1:].contiguous()
    loss_mask = (~is_input[:, 1:].bool()) & (segment_ids[:, 1:] != 0)
    return tokens, labels, loss_mask.contiguous(), segment_ids[:, :-1].contiguous()


def masked_loss(
    token_losses: torch.Tensor,
    loss_mask: torch.Tensor,
    segment_ids: torch.Tensor,
    norm_target_loss: bool,
) -> torch.Tensor:
    """Scalar loss from per-token losses `[b, s]` (see the module docstring for the normalisation)."""
    mask = loss_mask.to(token_losses.dtype)
    if not norm_target_loss:
        return (token_losses * mask).sum() / mask.sum().clamp(min=1.0)
    b, s = segment_ids.shape
    # One bucket per (row, segment): count each example's target tokens and weight them by 1/count.
    # Segment ids are 0..k with k <= s, so s+1 buckets per row suffice (and need no host sync).
    num_segments = s + 1
    key = (torch.arange(b, device=segment_ids.device)[:, None] * num_segments + segment_ids).reshape(-1)
    counts = torch.zeros(b * num_segments, device=token_losses.device, dtype=token_losses.dtype)
    counts.index_add_(0, key, mask.reshape(-1))
    weights = mask.reshape(-1) / counts[key].clamp(min=1.0)
    num_examples = (counts > 0).sum().clamp(min=1).to(token_losses.dtype)
    return (token_losses.reshape(-1) * weights).sum() / num_examples


def vocab_parallel_token_losses(vocab_parallel_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token cross entropy `[b, s]` from logits sharded over TP ranks on the vocabulary dimension.

    megatron's kernel works in float32 and overwrites a float32 input in place, so pass a clone if the
    logits are needed afterwards.
    """
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    return vocab_parallel_cross_entropy(vocab_parallel_logits, labels)


class BloomLoss:
    """`loss_fn(logits, (labels, loss_mask, segment_ids))`: the pipeline engine's loss signature, also used by
    the plain model. Logits are this TP rank's vocabulary shard `[b, s, V/tp]`."""

    def __init__(self, norm_target_loss: bool):
        self.norm_target_loss = norm_target_loss
        self.__name__ = "norm_target_loss" if norm_target_loss else "target_token_loss"

    def __call__(self, logits: torch.Tensor, labels: tuple[torch.Tensor, torch.Tensor, torch.Tensor]):
        target, loss_mask, segment_ids = labels
        token_losses = vocab_parallel_token_losses(logits, target)
        return masked_loss(token_losses, loss_mask, segment_ids, self.norm_target_loss)
