"""Learning rate and batch size as functions of consumed samples (Megatron's convention).

Both are pure functions of training progress, so a resumed run picks them up exactly where it stopped.
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


@dataclass(frozen=True)
class BatchSchedule:
    """Global batch size after `consumed` samples, with Megatron's linear ramp-up."""
    global_batch: int
    rampup: tuple[int, int, int] | None = None   # start, increment, ramp-up samples

    def __call__(self, consumed: int) -> int:
        if self.rampup is None:
            return self.global_batch
        start, inc, samples = self.rampup
        steps = max(1, (self.global_batch - start) // inc)
        return min(self.global_batch, start + int(consumed / (samples / steps)) * inc)

    def iterations(self, train_samples: int) -> int:
        consumed = iters = 0
        while consumed < train_samples:
            consumed += self(consumed)
            iters += 1
        return iters

    def samples(self, iters: int) -> int:
        consumed = 0
        for _ in range(iters):
            consumed += self(consumed)
        return consumed
