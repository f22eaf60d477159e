"""Learning rate as a function of consumed samples (Megatron's convention; the batch size's is rules.BatchSchedule).

A pure function of training progress, so a resumed run picks it up exactly where it stopped.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class LRSchedule:
    lr: float
    min_lr: float
    style: str                 # constant | linear | cosine
    warmup_samples: int
    decay_samples: int         # samples over which lr decays from lr to min_lr (after warm-up)

    def __call__(self, consumed: int) -> float:
        if self.warmup_samples > 0 and consumed < self.warmup_samples:
            return self.lr * consumed / self.warmup_samples
        if self.style == "constant":
            return self.lr
        span = max(1, self.decay_samples - self.warmup_samples)
        progress = min(1.0, (consumed - self.warmup_samples) / span)
        if self.style == "linear":
            coeff = 1.0 - progress
        else:
            coeff = 0.5 * (math.cos(math.pi * progress) + 1.0)
        return self.min_lr + coeff * (self.lr - self.min_lr)
