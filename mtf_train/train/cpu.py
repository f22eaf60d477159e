"""CPU shims: the only place where mtf-train works around CUDA assumptions of megatron-core and DeepSpeed.

Nothing here edits a library file. `apply_cpu_shims()` changes library state at runtime, from our code, and
does nothing when CUDA is available, so a GPU run never sees any of it. What it does and why:

1. megatron-core's model-parallel RNG tracker (`tensor_parallel.get_cuda_rng_tracker()`) stores and swaps
   `torch.cuda` generator states. We install `CPURNGStatesTracker`, the same interface over the CPU default
   generator, as megatron's global tracker, so `with get_cuda_rng_tracker().fork():` (attention dropout under
   tensor parallelism) works unchanged in the model. `seed_cpu_rng_tracker` seeds it like
   `model_parallel_cuda_manual_seed` does on GPU (which calls `torch.cuda` directly, so we do not use it on CPU).
2. DeepSpeed JIT-builds a shared-memory comm op on its first `init_distributed` on CPU (20-28 s, 1.5 GB RSS).
   Marking the op incompatible makes DeepSpeed fall back to plain torch.distributed (gloo) collectives.

Not shimmed, because the trainer does not use them: megatron's `GlobalMemoryBuffer` (only sequence parallel /
mcore attention), its pipeline schedules, FP32Optimizer, grad clipping and DistributedOptimizer (DeepSpeed
provides the pipeline engine and the optimizer). On CPU the DeepSpeed config should also say
`"torch_adam": true` (otherwise a CPU fused Adam is compiled, ~38 s); that is the engine config's business.
"""
from __future__ import annotations

import contextlib

import torch

# Names megatron-core uses for its tracked states (megatron/core/tensor_parallel/random.py).
MODEL_PARALLEL_RNG = "model-parallel-rng"
DATA_PARALLEL_RNG = "data-parallel-rng"
EXPERT_PARALLEL_RNG = "expert-parallel-rng"

_applied = False


class CPURNGStatesTracker:
    """megatron-core's `CudaRNGStatesTracker` interface, over the CPU default generator.

    `fork(name)` swaps the named state into torch's default CPU generator for the duration of the block and
    stores the advanced state back on exit, so dropout inside the block draws from a stream of its own.
    """

    def __init__(self):
        self.reset()

    def is_initialized(self) -> bool:
        return self._is_initialized

    def reset(self) -> None:
        self._is_initialized = False
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()

    def get_states(self) -> dict[str, torch.Tensor]:
        return dict(self.states_)

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self._is_initialized = True
        self.states_ = dict(states)

    def add(self, name: str, seed: int) -> None:
        self._is_initialized = True
        if seed in self.seeds_:
            raise RuntimeError(f"seed {seed} already exists")
        if name in self.states_:
            raise RuntimeError(f"rng state {name} already exists")
        self.seeds_.add(seed)
        generator = torch.Generator()
        generator.manual_seed(seed)
        self.states_[name] = generator.get_state()

    @contextlib.contextmanager
    def fork(self, name: str = MODEL_PARALLEL_RNG):
        if name not in self.states_:
            raise RuntimeError(f"rng state {name} is not added")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)


def install_cpu_rng_tracker() -> CPURNGStatesTracker:
    """Make megatron's `get_cuda_rng_tracker()` return a `CPURNGStatesTracker` (idempotent)."""
    from megatron.core.tensor_parallel import random as mpu_random

    tracker = getattr(mpu_random, "_CUDA_RNG_STATE_TRACKER", None)
    if not isinstance(tracker, CPURNGStatesTracker):
        tracker = CPURNGStatesTracker()
        # Both globals: `initialize_rng_tracker` returns early once the flag is set, so ours is kept.
        mpu_random._CUDA_RNG_STATE_TRACKER = tracker
        mpu_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    return tracker


def seed_cpu_rng_tracker(seed: int, tp_rank: int) -> None:
    """The CPU twin of `model_parallel_cuda_manual_seed`: same seeds per state (tp ranks differ by 1)."""
    tracker = install_cpu_rng_tracker()
    tracker.reset()
    tracker.add(DATA_PARALLEL_RNG, seed)
    tracker.add(MODEL_PARALLEL_RNG, seed + 2718 + tp_rank)
    tracker.add(EXPERT_PARALLEL_RNG, seed + 1024)


def skip_deepspeed_shm_comm() -> None:
    """Keep DeepSpeed from JIT-building its shared-memory comm op on CPU (must run before `init_distributed`)."""
    import deepspeed.ops

    # Reading the attribute runs DeepSpeed's (cheap) probe once and caches the dict; our edit then persists.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def apply_cpu_shims() -> bool:
    """Apply all CPU shims once; returns True when applied, False on a CUDA machine (nothing done)."""
    global _applied
    if torch.cuda.is_available():
        return False
    if not _applied:
        install_cpu_rng_tracker()
        skip_deepspeed_shm_comm()
        _applied = True
    return True
