"""bf16 gradient accumulation without a Python call per parameter per micro batch.

DeepSpeed's BF16_Optimizer (bf16 + ZeRO-1 + fp32 gradient accumulation) keeps an fp32 gradient buffer per
parameter and, after every micro batch's backward, `update_hp_grads` walks every parameter in Python: for each
one a method call that casts its bf16 gradient to fp32, adds it into the buffer and sets two pieces of
bookkeeping (~40 us per parameter on CPU, while the next micro batch waits). DeepSpeed's alternative,
`bf16.immediate_grad_update`, moves the same per-parameter work into a post-accumulate-grad hook and measured
twice as slow on the host (benchmarks/bf16_grad_accumulation.py, docs/benchmarks.md).

`fuse_hp_grad_accumulation` replaces the optimizer's `update_hp_grads` with one `torch._foreach_add_` per
parameter group: the same fp32 additions (bf16 -> fp32 is exact, then one fp32 add per element, as before), so
results stay bitwise equal, and the bookkeeping is set once per group. Anything unexpected (another optimizer,
a DeepSpeed version without these attributes, immediate updates, autoEP gradient folding) leaves DeepSpeed's
own method in place.
"""
from __future__ import annotations

import torch

_NEEDED = ("bf16_groups", "fp32_groups_gradients", "fp32_groups_has_gradients", "update_hp_grads")


def fuse_hp_grad_accumulation(optimizer) -> bool:
    """Install the fused `update_hp_grads` on a BF16_Optimizer instance; True when installed."""
    if type(optimizer).__name__ != "BF16_Optimizer" or not all(hasattr(optimizer, a) for a in _NEEDED):
        return False
    if getattr(optimizer, "immediate_grad_update", False) or getattr(optimizer, "autoep_folding_tp_group", None):
        return False
    groups = []
    for lps, hps in zip(optimizer.bf16_groups, optimizer.fp32_groups_gradients):
        if len(lps) != len(hps) or any(lp.numel() != hp.numel() for lp, hp in zip(lps, hps)):
            return False
        # Views of the fp32 buffers shaped like their parameters, made once (DeepSpeed views per call).
        groups.append((list(lps), [hp.view(lp.shape) for lp, hp in zip(lps, hps)]))
    for lps, hps in zip(optimizer.bf16_groups, optimizer.fp32_groups_gradients):
        for lp, hp in zip(lps, hps):
            lp._hp_grad = hp  # what DeepSpeed sets on every update; the buffers never move

    @torch.no_grad()
    def update_hp_grads(clear_lp_grads: bool = False) -> None:
        for i, (lps, hps) in enumerate(groups):
            grads = [lp.grad for lp in lps]
            if all(g is not None for g in grads):
                pairs = list(zip(hps, grads))
                dst, src = hps, grads
            else:
                pairs = [(hp, g) for hp, g in zip(hps, grads) if g is not None]
                if not pairs:
                    continue
                dst, src = [hp for hp, _ in pairs], [g for _, g in pairs]
            torch._foreach_add_(dst, src)  # fp32 += bf16: exact cast, one fp32 add per element
            flags = optimizer.fp32_groups_has_gradients[i]
            if len(pairs) == len(lps):
                flags[:] = [True] * len(lps)
            else:
                for j, lp in enumerate(lps):
                    if lp.grad is not None:
                        flags[j] = True
            if clear_lp_grads:
                torch._foreach_zero_([g for _, g in pairs])

    optimizer.update_hp_grads = update_hp_grads
    return True
