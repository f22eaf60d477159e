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

The LM head and the cross entropy run together (`chunked_vocab_parallel_cross_entropy`): logits are computed
only at the positions that count, a chunk of rows at a time, and recomputed chunk by chunk in backward, so the
full `[b, s, V]` float32 logits (about 8 GB at micro batch 4, seq 2048, V 250880) never exist. The per-token
losses and gradients are those of the logits path (`logits_loss`: megatron's `vocab_parallel_cross_entropy`
over the head's logits), which is kept for comparisons (tests, `benchmarks/loss_path.py`).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from mtf_train import rules


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


def default_chunk_rows(local_vocab: int, device_type: str = "cpu") -> int:
    """Rows per chunk: `rules.loss_chunk_rows`, which the plan's memory model counts too."""
    return rules.loss_chunk_rows(local_vocab, device_type)


class _ChunkedVocabParallelCrossEntropy(torch.autograd.Function):
    """Per-row cross entropy of `hidden @ weight.T` over a vocabulary sharded across the TP group, holding one
    chunk of logits at a time. Saves only the inputs and one log-sum-exp per row; backward recomputes each
    chunk's logits. The arithmetic follows megatron's `vocab_parallel_cross_entropy` (float32 logits, max and
    sum of exponentials all-reduced over the group, loss = log(sum) - (target logit - max))."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_rows, group):
        n, vocab_local = hidden.shape[0], weight.shape[0]
        tp = dist.get_world_size(group) if group is not None else 1
        first = dist.get_rank(group) * vocab_local if tp > 1 else 0
        local = labels - first
        in_shard = (local >= 0) & (local < vocab_local)
        local = torch.where(in_shard, local, 0)
        losses = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        for a in range(0, n, chunk_rows):
            b = min(n, a + chunk_rows)
            logits = F.linear(hidden[a:b], weight).float()
            row_max = logits.max(dim=-1).values
            if tp > 1:
                dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
            logits -= row_max[:, None]
            target = torch.where(in_shard[a:b], logits.gather(1, local[a:b, None]).squeeze(1), 0.0)
            sum_exp = logits.exp_().sum(dim=-1)
            del logits
            if tp > 1:
                both = torch.stack([sum_exp, target])  # one all-reduce for both sums
                dist.all_reduce(both, op=dist.ReduceOp.SUM, group=group)
                sum_exp, target = both[0], both[1]
            log_sum = sum_exp.log()
            losses[a:b] = log_sum - target
            lse[a:b] = log_sum + row_max
        ctx.save_for_backward(hidden, weight, local, in_shard, lse)
        ctx.chunk_rows = chunk_rows
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        hidden, weight, local, in_shard, lse = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        # Low-precision weights: sum the chunks' weight gradients in float32, round once at the end.
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        grad_losses = grad_losses.float()
        for a in range(0, hidden.shape[0], ctx.chunk_rows):
            b = min(hidden.shape[0], a + ctx.chunk_rows)
            h = hidden[a:b]
            probs = F.linear(h, weight).float()
            probs.sub_(lse[a:b, None]).exp_()  # softmax over the whole (all-rank) vocabulary
            rows = torch.nonzero(in_shard[a:b]).squeeze(1)
            probs[rows, local[a:b][rows]] -= 1.0
            probs.mul_(grad_losses[a:b, None])
            grad_logits = probs.to(weight.dtype)
            del probs
            if need_hidden:
                torch.mm(grad_logits, weight, out=grad_hidden[a:b])
            if need_weight:
                if weight.dtype == torch.float32:
                    grad_weight.addmm_(grad_logits.t(), h)
                else:
                    grad_weight += torch.mm(grad_logits.t(), h).float()
        if need_weight and grad_weight.dtype != weight.dtype:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None


def chunked_vocab_parallel_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                                         group=None, chunk_rows: int | None = None) -> torch.Tensor:
    """Cross entropy `[n]` (float32) of rows `hidden [n, h]` against this rank's vocabulary shard
    `weight [V/tp, h]` (rank r holds ids `r*V/tp ..`), labels `[n]` in the full vocabulary. `hidden` must be
    the same on every rank of `group` (the TP group; None = no tensor parallelism); its gradient is this
    shard's part, to be all-reduced over the group (megatron's `copy_to_tensor_model_parallel_region`)."""
    if chunk_rows is None:
        chunk_rows = default_chunk_rows(weight.shape[0], weight.device.type)
    return _ChunkedVocabParallelCrossEntropy.apply(hidden, weight, labels, chunk_rows, group)


def head_token_losses(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor,
                      tp_group=None, chunk_rows: int | None = None) -> torch.Tensor:
    """Per-token losses `[b, s]` (float32, 0 where `loss_mask` is off) of the tied LM head over final hidden
    states `[b, s, h]`, computing logits only at the positions where `loss_mask` is on."""
    b, s, h = hidden.shape
    where = loss_mask.reshape(-1).nonzero().squeeze(1)
    rows = hidden.reshape(b * s, h).index_select(0, where)
    if tp_group is not None:
        from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region

        # Identity forward; all-reduces the rows' gradient (each rank's vocabulary part) in backward.
        rows = copy_to_tensor_model_parallel_region(rows, group=tp_group)
    losses = chunked_vocab_parallel_cross_entropy(rows, weight, labels.reshape(-1).index_select(0, where),
                                                  tp_group, chunk_rows)
    full = torch.zeros(b * s, dtype=losses.dtype, device=losses.device)
    return full.index_copy(0, where, losses).view(b, s)


def logits_loss(vocab_parallel_logits: torch.Tensor, labels: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                norm_target_loss: bool) -> torch.Tensor:
    """The loss from full logits `[b, s, V/tp]` (megatron's kernel, which overwrites float32 logits): the
    reference that `BloomLoss` is compared against."""
    target, loss_mask, segment_ids = labels
    return masked_loss(vocab_parallel_token_losses(vocab_parallel_logits, target), loss_mask, segment_ids,
                       norm_target_loss)


class BloomLoss:
    """`loss_fn(hidden, (labels, loss_mask, segment_ids))`: the pipeline engine's loss signature, also used by
    the plain model. `hidden` are the final (layer-normed) hidden states `[b, s, h]`: the LM head runs inside
    the loss (`head_token_losses`), so the last pipeline stage outputs, and DeepSpeed's pipeline buffers keep,
    hidden states rather than logits. `lm_head()` returns the tied embedding module (`BloomEmbedding`)."""

    def __init__(self, norm_target_loss: bool, lm_head: Callable[[], torch.nn.Module], chunk_rows: int | None = None):
        self.norm_target_loss = norm_target_loss
        self.lm_head = lm_head
        self.chunk_rows = chunk_rows
        self.__name__ = "norm_target_loss" if norm_target_loss else "target_token_loss"

    def __call__(self, hidden: torch.Tensor, labels: tuple[torch.Tensor, torch.Tensor, torch.Tensor]):
        target, loss_mask, segment_ids = labels
        token_losses = self.lm_head().lm_token_losses(hidden, target, loss_mask, self.chunk_rows)
        return masked_loss(token_losses, loss_mask, segment_ids, self.norm_target_loss)
