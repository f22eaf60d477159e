"""Process groups for tensor (TP), pipeline (PP) and data (DP) parallelism, and DeepSpeed's view of them.

One call, `init_parallel(tp, pp)` (made by `engine.build_engine`, the one place where every kind of
parallelism is applied), sets up everything in this order:
  torch.distributed (gloo on CPU, nccl on GPU; env:// under torchrun, else a 1-process group)
  -> DeepSpeed's comm layer on top of it -> megatron-core `parallel_state` (the TP groups the model's layers use).

Rank layout. megatron-core's default order "tp-cp-ep-dp-pp" puts TP fastest, then DP, then PP:
    rank = tp_rank + TP * (dp_rank + DP * pp_rank)
DeepSpeed's `PipeModelDataParallelTopology` has axes (pipe, data, model) in row-major order, model fastest:
    rank = model + MP * (data + DP * pipe)
These are the same map; `init_parallel` checks it on every rank, so the TP groups megatron's layers reduce
over are exactly the "model" slices DeepSpeed's pipeline grid (and its checkpoint names) assume.
"""
from __future__ import annotations

import datetime
import os
import random
from dataclasses import dataclass

import torch
import torch.distributed as dist

from mtf_train.train import cpu


@dataclass(frozen=True)
class ParallelState:
    """Sizes and this process's coordinates. `device` is where the model and batches live."""

    tp: int
    pp: int
    dp: int
    rank: int
    world_size: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    device: torch.device

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1


def _init_torch_distributed(backend: str, timeout: datetime.timedelta) -> None:
    if dist.is_initialized():
        return
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # torchrun / srun-exported env
        dist.init_process_group(backend=backend, init_method="env://", timeout=timeout)
    else:
        # A lone process (tests, export tools): megatron's layers still want a TP group to exist.
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)


def init_parallel(tp: int = 1, pp: int = 1, backend: str | None = None, timeout_minutes: int = 30) -> ParallelState:
    """Initialise torch.distributed, DeepSpeed comm and megatron-core model parallel groups (TP x PP x DP)."""
    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        cpu.apply_cpu_shims()
    backend = backend or ("nccl" if on_gpu else "gloo")
    if on_gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    timeout = datetime.timedelta(minutes=timeout_minutes)
    _init_torch_distributed(backend, timeout)

    import deepspeed
    from megatron.core import parallel_state as ps

    # Wraps the existing process group; DeepSpeed's PipelineModule and engine talk through deepspeed.comm.
    deepspeed.init_distributed(dist_backend=backend, timeout=timeout)

    world = dist.get_world_size()
    if world % (tp * pp) != 0:
        raise ValueError(f"world size {world} is not divisible by tp*pp = {tp}*{pp}")
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)

    state = ParallelState(
        tp=tp,
        pp=pp,
        dp=world // (tp * pp),
        rank=dist.get_rank(),
        world_size=world,
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
        device=torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu"),
    )
    coord = pipe_topology(state).get_coord(state.rank)
    if (coord.pipe, coord.data, coord.model) != (state.pp_rank, state.dp_rank, state.tp_rank):
        raise RuntimeError(
            f"rank {state.rank}: megatron-core (pp, dp, tp) = {(state.pp_rank, state.dp_rank, state.tp_rank)} "
            f"differs from DeepSpeed's topology {tuple(coord)}"
        )
    return state


def destroy_parallel() -> None:
    """Drop megatron's model parallel groups (torch.distributed itself stays up)."""
    from megatron.core import parallel_state as ps

    ps.destroy_model_parallel()


def pipe_topology(state: ParallelState):
    """DeepSpeed topology with a model axis, as Megatron-DeepSpeed uses even at TP=1: it is what makes layer
    checkpoint files `layer_XX-model_YY-model_states.pt`."""
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    return PipeModelDataParallelTopology(num_pp=state.pp, num_mp=state.tp, num_dp=state.dp)


def seed_everything(seed: int, state: ParallelState) -> None:
    """Megatron's seeding: base seed offset by 100 * pipeline rank for the default generators (same across TP
    and DP ranks of a stage, as replicated hidden-state dropout needs), plus the model-parallel RNG tracker
    whose stream differs per TP rank (attention dropout on each rank's own heads)."""
    seed = seed + 100 * state.pp_rank
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:  # pragma: no cover - numpy is a dependency
        pass
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(seed)
    else:
        cpu.seed_cpu_rng_tracker(seed, state.tp_rank)


class MegatronMPU:
    """The `mpu` object DeepSpeed takes in `deepspeed.initialize(..., mpu=...)` (non-pipeline engines; the
    pipeline engine brings its own grid built from `pipe_topology`).

    DeepSpeed's names follow its `PipelineParallelGrid`: "model parallel" is every rank holding a different
    piece of one model replica (TP x PP), "slice"/"tensor" parallel is TP, "pipe" is PP. megatron-core's
    `parallel_state` cannot be passed directly: it lacks `get_model_parallel_rank/world_size` and the
    slice/pipe names. Sequence-parallel (Ulysses) methods are deliberately absent: DeepSpeed then assumes none.
    """

    def __init__(self):
        from megatron.core import parallel_state as ps

        self._ps = ps

    # model parallel = TP x PP
    def get_model_parallel_group(self):
        return self._ps.get_model_parallel_group()

    def get_model_parallel_world_size(self) -> int:
        return dist.get_world_size(group=self.get_model_parallel_group())

    def get_model_parallel_rank(self) -> int:
        return dist.get_rank(group=self.get_model_parallel_group())

    # tensor (slice) parallel
    def get_tensor_model_parallel_group(self):
        return self._ps.get_tensor_model_parallel_group()

    def get_tensor_model_parallel_world_size(self) -> int:
        return self._ps.get_tensor_model_parallel_world_size()

    def get_tensor_model_parallel_rank(self) -> int:
        return self._ps.get_tensor_model_parallel_rank()

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self._ps.get_tensor_model_parallel_src_rank()

    get_slice_parallel_group = get_tensor_model_parallel_group
    get_slice_parallel_world_size = get_tensor_model_parallel_world_size
    get_slice_parallel_rank = get_tensor_model_parallel_rank

    # pipeline parallel
    def get_pipe_parallel_group(self):
        return self._ps.get_pipeline_model_parallel_group()

    def get_pipe_parallel_world_size(self) -> int:
        return self._ps.get_pipeline_model_parallel_world_size()

    def get_pipe_parallel_rank(self) -> int:
        return self._ps.get_pipeline_model_parallel_rank()

    get_pipeline_model_parallel_group = get_pipe_parallel_group
    get_pipeline_model_parallel_world_size = get_pipe_parallel_world_size
    get_pipeline_model_parallel_rank = get_pipe_parallel_rank

    # data parallel
    def get_data_parallel_group(self):
        return self._ps.get_data_parallel_group()

    def get_data_parallel_world_size(self) -> int:
        return self._ps.get_data_parallel_world_size()

    def get_data_parallel_rank(self) -> int:
        return self._ps.get_data_parallel_rank()

    def get_data_parallel_group_ranks(self) -> list[int]:
        return dist.get_process_group_ranks(self.get_data_parallel_group())
