"""Attention over packed rows with ALiBi: a reference implementation and a fused FlexAttention one.

A packed row holds several examples; `segment_ids [b, s]` numbers them 1..k and marks padding with 0.
A query attends causally and only to keys of its own segment, so examples never see each other. Padding
positions form "segment 0" and attend to earlier padding (always at least themselves): their rows never
become all -inf, so no NaN appears, and no real token ever attends to them.

ALiBi. Megatron and HF BLOOM add `slope_h * key_position` to the scores. Softmax is shift-invariant per
row, so that equals `slope_h * (key_position - query_position)`, which is what both paths here add: it
depends only on the distance inside a segment, so an example gives the same output wherever it sits in a
row (and is the numerically tamer of the two forms). Slopes are computed for the full head count and each
tensor-parallel rank takes its contiguous slice of heads.

Both functions take q, k, v as [b, heads, s, head_dim] and return the context in the same layout.
"""
from __future__ import annotations

import math
import weakref
from typing import Callable

import torch


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """ALiBi slopes (float32, [num_heads]) as BLOOM defines them, also for head counts that are not powers of 2
    (e.g. 112 for BLOOM-176B): geometric 2^(-8/n) for the closest power of two n, then the odd powers of
    2^(-4/n) for the remaining heads."""
    closest = 2 ** math.floor(math.log2(num_heads))
    base = 2.0 ** (-8.0 / closest)
    slopes = [base ** (i + 1) for i in range(closest)]
    if closest != num_heads:
        extra_base = 2.0 ** (-4.0 / closest)
        remaining = min(closest, num_heads - closest)
        slopes += [extra_base ** (2 * i + 1) for i in range(remaining)]
    return torch.tensor(slopes, dtype=torch.float32)


def packed_causal_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """[b, 1, s, s] bool, True where query i may attend key j: j <= i and same segment (padding = segment 0)."""
    s = segment_ids.shape[-1]
    causal = torch.ones(s, s, dtype=torch.bool, device=segment_ids.device).tril_()
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return (same & causal)[:, None]


class _PerSegmentIds:
    """One-entry cache keyed on the segment-id tensor object. All blocks of a forward (and their recomputation
    under activation checkpointing) get the same tensor, so a mask is built once per micro batch, not per
    block. A weak reference, so a freed tensor is never mistaken for a new one, and the version counter, so a
    buffer refilled in place (`copy_`) is not either."""

    def __init__(self, build: Callable[[torch.Tensor], object]):
        self._build = build
        self._key: tuple[weakref.ref, int] | None = None
        self._value = None

    def __call__(self, segment_ids: torch.Tensor):
        try:
            version = segment_ids._version
        except RuntimeError:  # inference-mode tensors have no version counter: build without caching
            return self._build(segment_ids)
        key = self._key
        if key is None or key[0]() is not segment_ids or key[1] != version:
            self._value = self._build(segment_ids)
            self._key = (weakref.ref(segment_ids), version)
        return self._value


_cached_mask = _PerSegmentIds(packed_causal_mask)


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_ids: torch.Tensor,
    slopes: torch.Tensor,
    dropout_p: float = 0.0,
    training: bool = False,
    dropout_rng: Callable = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain matmul attention; bias, mask and softmax in float32 (like Megatron's fused softmax and HF BLOOM).

    `dropout_rng` is a context-manager factory entered around the attention dropout (the model passes the
    model-parallel RNG tracker's `fork`, so each TP rank drops independently on its own heads).
    `mask`: `packed_causal_mask(segment_ids)` when the caller already has it (the model looks it up outside
    its compiled region: the cache's identity/version check is Python state torch.compile cannot trace).
    """
    b, h, s, d = q.shape
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * (1.0 / math.sqrt(d))
    pos = torch.arange(s, device=q.device, dtype=torch.float32)
    distance = pos[None, :] - pos[:, None]  # key - query, <= 0 where attended
    scores = scores + slopes.to(device=q.device, dtype=torch.float32).view(1, h, 1, 1) * distance
    if mask is None:
        mask = _cached_mask(segment_ids)
    # where(), not masked_fill(~mask): it saves the shared cached mask for backward, not a new inverted copy.
    scores = torch.where(mask, scores, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    if dropout_p > 0.0 and training:
        if dropout_rng is None:
            probs = torch.nn.functional.dropout(probs, dropout_p, training=True)
        else:
            with dropout_rng():
                probs = torch.nn.functional.dropout(probs, dropout_p, training=True)
    return torch.matmul(probs, v)


_compiled_flex = None


def _flex_fn(compiled: bool):
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    if not compiled:
        return flex_attention
    if _compiled_flex is None:
        # Compiled once per process; shapes are static within a run (fixed sequence length).
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


def packed_block_mask(segment_ids: torch.Tensor):
    """FlexAttention BlockMask for `packed_causal_mask` (batch-specific, shared by all heads)."""
    from torch.nn.attention.flex_attention import create_block_mask

    b, s = segment_ids.shape

    def mask_mod(batch, head, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (segment_ids[batch, q_idx] == segment_ids[batch, kv_idx])

    return create_block_mask(mask_mod, b, None, s, s, device=segment_ids.device)


_cached_block_mask = _PerSegmentIds(packed_block_mask)


def flex_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_ids: torch.Tensor,
    slopes: torch.Tensor,
    compiled: bool | None = None,
    block_mask=None,
) -> torch.Tensor:
    """FlexAttention with a block mask from the segment ids and ALiBi as a score_mod (no dropout support).

    `compiled=None` compiles on CUDA (the fused kernel) and runs eagerly elsewhere (unfused, forward only
    on CPU: torch has no FlexAttention backward on CPU). `block_mask`: `packed_block_mask(segment_ids)` when the
    caller already has it. Inside a compiled block the kernel is traced into the block's graph, so the
    separately compiled function is not used there.
    """
    if compiled is None:
        compiled = q.is_cuda
    slopes = slopes.to(device=q.device, dtype=torch.float32)
    if block_mask is None:
        block_mask = _cached_block_mask(segment_ids)

    def alibi(score, batch, head, q_idx, kv_idx):
        return score + slopes[head] * (kv_idx - q_idx)

    if torch.compiler.is_compiling():
        from torch.nn.attention.flex_attention import flex_attention as flex
        return flex(q, k, v, score_mod=alibi, block_mask=block_mask)
    return _flex_fn(compiled)(q, k, v, score_mod=alibi, block_mask=block_mask)


def attention_mask(impl: str, segment_ids: torch.Tensor):
    """The mask object `impl` ('reference' or 'flex') uses for these segment ids, built once per micro batch."""
    return _cached_block_mask(segment_ids) if impl == "flex" else _cached_mask(segment_ids)


def resolve_impl(impl: str, device: torch.device, dropout_active: bool) -> str:
    """'auto' -> 'flex' on CUDA without active attention dropout, else 'reference'."""
    if impl == "auto":
        return "flex" if device.type == "cuda" and not dropout_active else "reference"
    if impl == "flex" and dropout_active:
        raise ValueError("attention 'flex' has no attention dropout: set attention_dropout=0 or use 'reference'")
    if impl not in ("reference", "flex"):
        raise ValueError(f"unknown attention implementation {impl!r} (auto, reference, flex)")
    return impl
