"""The DeepSpeed pipeline engine, built one way for the trainer and the checkpoint tools.

`build_engine(EngineConfig)` is also the one place where parallelism is applied, in this order:

    TP x PP x DP ranks  `init_parallel`: torch.distributed, DeepSpeed comm and megatron-core's process groups,
                        checked to be one rank map (see parallel.py)
    TP                  megatron-core's layers keep their shard of each weight as they are built (model.py)
    PP                  `BloomPipeline`, a DeepSpeed PipelineModule, builds only this stage's layers
    DP, ZeRO, dtype     `deepspeed.initialize` with the job's DeepSpeed config (rendered into ds_config.json):
                        micro and global batch, ZeRO stage, bf16/fp16, gradient clipping

What one `engine.train_batch(data_iter)` does for us (DeepSpeed's PipelineEngine):
  - pulls gradient_accumulation_steps = global batch / (micro batch x DP) micro batches from `data_iter` and
    runs them through the stages in DeepSpeed's 1F1B train schedule (forward and backward interleaved, sends
    and receives between neighbouring stages), accumulating gradients (fp32 buffers with bf16);
  - all-reduces the tied embedding's gradient between the first and the last stage, then every gradient over DP;
  - steps the optimizer: unscales fp16 gradients and skips the step on overflow (dynamic loss scale), clips the
    global gradient norm to `gradient_clipping`, steps AdamW on this rank's ZeRO-1 shard of the fp32 master
    weights (all of them at ZeRO-0) and all-gathers the updated shards into the model's weights;
  - steps an lr scheduler only if it was given one: the loop sets the learning rate itself before each step;
  - returns the mean loss of the micro batches, averaged over DP, on every stage.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable

import torch

from mtf_train.train.model import BloomModelConfig, build_model
from mtf_train.train.parallel import ParallelState, init_parallel, seed_everything


@dataclass(frozen=True)
class OptimizerConfig:
    lr: float
    weight_decay: float
    beta1: float
    beta2: float
    eps: float


@dataclass
class EngineConfig:
    tp: int
    pp: int
    seed: int
    model: BloomModelConfig
    optimizer: OptimizerConfig
    ds_config: dict  # DeepSpeed's JSON config, as rendered for the job
    norm_target_loss: bool = True
    partition_method: str = "type:transformer|embedding"
    universal: bool = False  # the checkpoint to load is a universal one
    backend: str | None = None  # torch.distributed backend; None: nccl on GPUs, gloo on CPU


def read_ds_config(path: str) -> dict:
    with open(path) as fh:
        return json.load(fh)


def make_optimizer(model: torch.nn.Module, o: OptimizerConfig, on_gpu: bool) -> torch.optim.Optimizer:
    # No weight decay on biases and layer norms (Megatron's grouping): the 1-D parameters.
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim == 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": o.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, fused=on_gpu)


def build_engine(cfg: EngineConfig, fill_weights: Callable[[torch.nn.Module, ParallelState], None] | None = None):
    """Process groups, seeds, this stage's layers, optimizer and DeepSpeed engine; returns (engine, state).

    `fill_weights(model, state)` runs before the optimizer copies the weights (importing a HF checkpoint)."""
    import deepspeed

    from mtf_train.train.bf16 import fuse_hp_grad_accumulation

    state = init_parallel(cfg.tp, cfg.pp, backend=cfg.backend)
    seed_everything(cfg.seed, state)
    model = build_model(cfg.model, state, pipeline=True, norm_target_loss=cfg.norm_target_loss,
                        partition_method=cfg.partition_method)
    if fill_weights is not None:
        fill_weights(model, state)
    optimizer = make_optimizer(model, cfg.optimizer, on_gpu=state.device.type == "cuda")
    ds_config = dict(cfg.ds_config)
    if cfg.universal:
        ds_config["checkpoint"] = {**ds_config.get("checkpoint", {}), "load_universal": True}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config,
                                           dist_init_required=False)
    fuse_hp_grad_accumulation(engine.optimizer)  # bf16 only; bitwise the same, without a Python call per parameter
    return engine, state
