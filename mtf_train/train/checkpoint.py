"""Checkpoints in the bigscience layout, written through DeepSpeed's pipeline engine.

    <save>/latest                                   "global_stepN", written last and atomically
    <save>/global_stepN/layer_XX-model_YY-model_states.pt
    <save>/global_stepN/mp_rank_MM_model_states.pt  client state: iteration, consumed samples, RNG, args
    <save>/global_stepN/[bf16_]zero_pp_rank_D_mp_rank_MM_optim_states.pt

`latest` moves only after every rank has finished writing, so an interrupted save leaves the previous
checkpoint in charge. Loading trusts nothing: the step must be complete and at this run's shape, every file
DeepSpeed reads is CRC-checked and unpickled weights-only with `mtf_train.ckpt.safe`'s allowlist, and the client
state is read in either form (ours or 2022 Megatron-DeepSpeed's, `mtf_train.ckpt.client`).
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from mtf_train.errors import UserError
from mtf_train.files import write_atomic


class CheckpointError(UserError):
    """A checkpoint that cannot be loaded as given (missing, damaged, another shape): one line, exit 2."""


@dataclass
class Progress:
    iteration: int = 0
    consumed_train_samples: int = 0
    consumed_valid_samples: dict[str, int] = field(default_factory=dict)


def rng_state() -> dict:
    state = {"random": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    try:
        from megatron.core import tensor_parallel
        tracker = tensor_parallel.get_cuda_rng_tracker()
        if tracker.is_initialized():
            state["tracker"] = tracker.get_states()
    except Exception:  # no tracker in this process: nothing to restore later either
        pass
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if "tracker" in state:
        from megatron.core import tensor_parallel
        tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def read_latest(folder: str | os.PathLike, universal: bool = False) -> str | None:
    path = Path(folder) / ("latest_universal" if universal else "latest")
    try:
        tag = path.read_text().strip()
    except OSError:
        return None
    return tag or None


def write_latest(folder: str | os.PathLike, tag: str) -> None:
    write_atomic(Path(folder) / "latest", tag)


def save(engine, folder: str, progress: Progress, args, extra: dict) -> str:
    """The trainer's checkpoint of step `progress.iteration`: its client state holds the progress, every
    generator's state and the command line. Returns the tag."""
    tag = f"global_step{progress.iteration}"
    client = {"iteration": progress.iteration, "consumed_train_samples": progress.consumed_train_samples,
              "consumed_valid_samples": dict(progress.consumed_valid_samples), "rng_state": rng_state(),
              "args": vars(args), **extra}
    save_step(engine, folder, tag, client)
    return tag


def save_step(engine, folder: str, tag: str, client: dict) -> None:
    """Every rank writes its files of `folder/tag`; rank 0 moves `latest` only once all of them have."""
    engine.save_checkpoint(folder, tag=tag, client_state=client, save_latest=False)
    dist.barrier()
    if dist.get_rank() == 0:
        write_latest(folder, tag)
    dist.barrier()


def load(engine, args, *, universal: bool, load_optimizer: bool, restore_rng: bool) -> tuple[Progress, str] | None:
    """Load the checkpoint `args.load` points to; None when there is none (a fresh start)."""
    folder = args.load
    if folder is None:
        return None
    tag = read_latest(folder, universal=universal)
    if tag is None:
        if universal:
            raise CheckpointError(folder, "--universal-checkpoint: no latest_universal file (convert with "
                                  "`mtf-train ckpt to-universal`)")
        return None
    if not (Path(folder) / tag).is_dir():
        raise CheckpointError(folder, f"latest{'_universal' if universal else ''} names {tag}, which does not exist")
    if not universal:
        check_step(Path(folder) / tag, args)
    from mtf_train.ckpt.client import ClientState
    from mtf_train.ckpt.safe import UnsafeCheckpoint, guard_torch_load

    try:
        with guard_torch_load():  # DeepSpeed's torch.load(weights_only=False) calls, checked and allowlisted
            path, client = engine.load_checkpoint(folder, tag=tag, load_optimizer_states=load_optimizer,
                                                  load_lr_scheduler_states=False,
                                                  load_module_only=not load_optimizer)
    except UnsafeCheckpoint as err:
        raise CheckpointError(err.where, err.reason) from None
    if path is None:
        raise CheckpointError(folder, f"DeepSpeed could not load {tag}")
    state = ClientState.read(client or {})
    progress = Progress(state.iteration or 0, state.consumed_train_samples,
                        state.consumed_valid_samples if isinstance(state.consumed_valid_samples, dict)
                        else AllGroups(state.consumed_valid_samples))
    if restore_rng and state.rng and {"random", "numpy", "torch"} <= set(state.rng):
        set_rng_state(state.rng)
    return progress, str(Path(folder) / tag)


class AllGroups(dict):
    """A 2022 checkpoint's one consumed-validation-samples counter, standing for every validation group."""

    def __init__(self, n: int):
        super().__init__()
        self.n = n

    def get(self, key, default=None):
        return super().get(key, self.n)


def check_step(step: Path, args) -> None:
    """The step holds every file this run's model needs, at this run's shape (else DeepSpeed fails later
    with a page of "key not found"); the files' bytes are checked as DeepSpeed reads them."""
    from mtf_train.ckpt.layout import CkptError, locate

    try:
        ck = locate(step)
        ck.check(args.num_layers, crc=False)
    except CkptError as err:
        raise CheckpointError(err.where, err.reason) from None
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    if (ck.tp, ck.pp) != (tp, pp):
        raise CheckpointError(str(step), f"saved at tp {ck.tp} x pp {ck.pp}, this run is tp {tp} x pp {pp}: "
                              f"convert it with `mtf-train ckpt reshape {step} --tp {tp} --pp {pp} -o NEW` and "
                              "load NEW (or use its universal form)")
