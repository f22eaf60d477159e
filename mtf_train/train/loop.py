"""The MTF training loop: finetune_t0 on megatron-core layers and DeepSpeed's pipeline engine.

Read top to bottom: the command line resolves to a `TrainConfig`; `run` sets up (engine, checkpoint, data,
logs), then calls `train_step` until the training length, an exit condition or a signal, with `evaluate`
and `save` at their intervals; every exit saves first. Every shape (TP, PP, DP) runs the same code: the
model is always a DeepSpeed PipelineModule (one stage at PP=1), which is also what gives the bigscience
checkpoint layout. How the engine is built, where each kind of parallelism is applied and what DeepSpeed's
`train_batch` does for us: engine.py.
"""
from __future__ import annotations

import argparse
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from mtf_train.data.packed import build_datasets
from mtf_train.data.pathfile import read_path_file
from mtf_train.data.tokenizer import load_tokenizer
from mtf_train.rules import BatchSchedule, eval_samples_per_group, flops_per_token, padded_vocab
from mtf_train.train import checkpoint as ckpt
from mtf_train.train import mfu
from mtf_train.train.engine import EngineConfig, OptimizerConfig, build_engine, read_ds_config
from mtf_train.train.feed import Feed
from mtf_train.train.metrics import Metrics
from mtf_train.train.model import BloomModelConfig
from mtf_train.train.parallel import ParallelState
from mtf_train.train.schedule import LRSchedule


@dataclass(frozen=True)
class TrainConfig:
    """What the command line resolves to, with the tokenizer: the engine to build and the run's numbers.
    `args` stays as given: every checkpoint keeps it (client state `args`)."""

    args: argparse.Namespace
    engine: EngineConfig
    vocab_size: int  # the tokenizer's; the embedding has `padded_vocab` rows
    padded_vocab: int
    pad_id: int
    batches: BatchSchedule  # global batch size at a number of consumed samples (ramp-up)
    lr_at: LRSchedule  # learning rate at a number of consumed samples
    train_iters: int
    train_samples: int
    eval_samples_per_group: int  # validation samples built per group, enough for every evaluation
    flops_model: float  # per token, without recomputation (MFU)
    flops_hw: float  # per token, as executed


def configure(args: argparse.Namespace, tok) -> TrainConfig:
    on_gpu = torch.cuda.is_available()
    padded = padded_vocab(tok.vocab_size, args.tensor_model_parallel_size, args.make_vocab_size_divisible_by,
                          args.pad_vocab_size_to)
    if padded < tok.vocab_size:
        raise ValueError(f"--pad-vocab-size-to {padded} is smaller than the tokenizer ({tok.vocab_size})")
    model = BloomModelConfig(
        num_layers=args.num_layers, hidden_size=args.hidden_size, num_heads=args.num_attention_heads,
        padded_vocab_size=padded, original_vocab_size=tok.vocab_size, layernorm_epsilon=args.layernorm_epsilon,
        init_std=args.init_method_std, hidden_dropout=args.hidden_dropout,
        attention_dropout=args.attention_dropout,
        params_dtype=torch.float32,  # DeepSpeed casts the module for fp16/bf16 and keeps fp32 master weights
        recompute=args.recompute, attention=args.attention_impl, init_seed=args.seed,
        # Compiling a block costs tens of seconds of CPU per shape, more than a CPU run gains: GPUs only by default.
        compile=on_gpu if args.compile is None else args.compile)
    engine = EngineConfig(
        tp=args.tensor_model_parallel_size, pp=args.pipeline_model_parallel_size, seed=args.seed, model=model,
        optimizer=OptimizerConfig(lr=args.lr, weight_decay=args.weight_decay, beta1=args.adam_beta1,
                                  beta2=args.adam_beta2, eps=args.adam_eps),
        ds_config=read_ds_config(args.deepspeed_config), norm_target_loss=args.norm_target_loss,
        partition_method=args.pp_partition_method, universal=args.universal_checkpoint,
        backend=args.distributed_backend)

    batches = BatchSchedule(args.global_batch_size, tuple(args.rampup_batch_size) if args.rampup_batch_size else None)
    train_iters, train_samples = batches.length(args.train_iters, args.train_samples)
    lr_at = LRSchedule(args.lr, args.min_lr, args.lr_decay_style, args.lr_warmup_samples,
                       args.lr_decay_samples or train_samples)
    eval_samples = eval_samples_per_group(train_iters, args.eval_interval, args.eval_iters, args.global_batch_size)

    fpt_model = flops_per_token(args.num_layers, args.hidden_size, args.seq_length, padded, recompute=False)
    fpt_hw = flops_per_token(args.num_layers, args.hidden_size, args.seq_length, padded,
                             recompute=args.recompute,
                             flex=args.attention_impl == "flex" or (args.attention_impl == "auto" and on_gpu
                                                                     and args.attention_dropout == 0))
    return TrainConfig(args, engine, vocab_size=tok.vocab_size, padded_vocab=padded, pad_id=tok.pad_id,
                       batches=batches, lr_at=lr_at, train_iters=train_iters, train_samples=train_samples,
                       eval_samples_per_group=eval_samples, flops_model=fpt_model, flops_hw=fpt_hw)


class ExitFlags:
    """Why training should stop now; agreed on by every rank (a file or a signal may reach only some)."""

    def __init__(self, args, start: float):
        self.args, self.start = args, start
        self.signal: str | None = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame):
        self.signal = signal.Signals(signum).name

    def reason(self, iteration: int, device: torch.device, stepped: bool) -> str | None:
        """`stepped`: this process has just completed step `iteration`. The exit interval and the exit duration
        count only then, as in Megatron (which checks both after each step): every job trains at least one
        step, even one resumed at a multiple of the interval or whose start-up outlasted the duration (it would
        otherwise save the step it loaded and exit, job after job)."""
        a = self.args
        local = 0
        if a.kill_switch_path and os.path.exists(a.kill_switch_path):
            local = 1
        elif self.signal:
            local = 2
        elif a.exit_duration_in_mins and stepped and (time.time() - self.start) / 60 > a.exit_duration_in_mins:
            local = 3
        elif a.exit_interval and stepped and iteration % a.exit_interval == 0:
            local = 4
        flag = torch.tensor([local], dtype=torch.int64, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return {0: None, 1: "kill switch", 2: f"signal {self.signal or ''}".strip(), 3: "exit duration",
                4: "exit interval"}[int(flag.item())]


@dataclass
class Trainer:
    """The live parts of a run, made by `setup`."""

    cfg: TrainConfig
    engine: object  # DeepSpeed's PipelineEngine
    state: ParallelState
    progress: ckpt.Progress
    resumed: bool  # `progress` is a checkpoint's (its step needs no new save)
    train_feed: Feed
    valid: dict  # validation group name -> dataset
    metrics: Metrics
    peak_tflops: float | None  # per GPU, for MFU
    peak_source: str | None


def run(args: argparse.Namespace) -> int:
    exits = ExitFlags(args, time.time())
    t = setup(args)
    announce(t)
    exit_reason = train(t, exits)
    finish(t, exit_reason)
    return 0


def setup(args: argparse.Namespace) -> Trainer:
    _, tok = load_tokenizer(args.tokenizer_name_or_path)
    cfg = configure(args, tok)
    engine, state = build_engine(cfg.engine)
    progress, resumed = load_checkpoint(engine, args)

    # Data: the training blend and one validation blend per group, sized like Megatron's.
    train_groups = read_path_file(args.train_weighted_split_paths_path)
    valid_groups = read_path_file(args.valid_weighted_split_paths_path) if args.valid_weighted_split_paths_path else []
    train_ds, valid_ds = build_datasets(train_groups, valid_groups, seq_length=args.seq_length,
                                        train_samples=cfg.train_samples,
                                        eval_samples_per_group=cfg.eval_samples_per_group,
                                        seed=args.seed, pad_id=cfg.pad_id, cache_dir=args.data_cache_dir)
    train_feed = micro_batches(train_ds, progress.consumed_train_samples, args, state, num_workers=args.num_workers)

    metrics = Metrics(Path.cwd(), args.tensorboard_dir, args.tensorboard_queue_size, enabled=state.rank == 0)
    on_gpu = state.device.type == "cuda"
    peak, peak_source = mfu.resolve_peak(args.tflops_per_gpu_peak, state.device.type,
                                         torch.cuda.get_device_name(state.device) if on_gpu else None)
    return Trainer(cfg, engine, state, progress, resumed, train_feed, valid_ds, metrics, peak, peak_source)


def micro_batches(dataset, start: int, args, state: ParallelState, num_workers: int = 0) -> Feed:
    """This DP rank's micro batches of `dataset` from global sample `start` on."""
    return Feed(dataset, start=start, micro=args.micro_batch_size, dp=state.dp, dp_rank=state.dp_rank,
                device=state.device, num_workers=num_workers)


def load_checkpoint(engine, args: argparse.Namespace) -> tuple[ckpt.Progress, bool]:
    """Progress from `--load`'s checkpoint (fresh without one or with --reset-progress); True when resumed."""
    loaded = ckpt.load(engine, args, universal=args.universal_checkpoint, load_optimizer=not args.no_load_optim,
                       restore_rng=not (args.universal_checkpoint or args.no_load_rng or args.reset_progress))
    if loaded is None:
        return ckpt.Progress(), False
    progress, where = loaded
    if dist.get_rank() == 0:
        print(f"loaded {where} (iteration {progress.iteration}"
              f"{', progress reset' if args.reset_progress else ''}"
              f"{', optimizer states not loaded' if args.no_load_optim else ''})", flush=True)
    if args.reset_progress:
        return ckpt.Progress(), False
    return progress, True


def announce(t: Trainer) -> None:
    cfg, args, s = t.cfg, t.cfg.args, t.state
    t.metrics.print(f"training {cfg.train_iters} steps ({cfg.train_samples} samples) from step "
                    f"{t.progress.iteration}: world {s.world_size} = pp {s.pp} x tp {s.tp} x dp {s.dp}, "
                    f"padded vocab {cfg.padded_vocab}")
    for line in mfu.describe(args.num_layers, args.hidden_size, args.seq_length, cfg.padded_vocab,
                             args.recompute, cfg.flops_model, cfg.flops_hw, t.peak_tflops, t.peak_source):
        t.metrics.print(line)


def train(t: Trainer, exits: ExitFlags) -> str | None:
    """Steps until the training length or an exit condition; returns the exit's reason (None: finished)."""
    cfg, args, progress = t.cfg, t.cfg.args, t.progress
    last_saved = progress.iteration if t.resumed else None
    window = Window()
    exit_reason = None
    stepped = False
    t.engine.train()
    while progress.iteration < cfg.train_iters:
        exit_reason = exits.reason(progress.iteration, t.state.device, stepped)
        if exit_reason:
            break
        stepped = True
        batch_size = cfg.batches(progress.consumed_train_samples)
        lr = cfg.lr_at(progress.consumed_train_samples)
        loss = train_step(t.engine, t.train_feed, batch_size, lr)
        progress.iteration += 1
        progress.consumed_train_samples += batch_size
        window.tokens += batch_size * args.seq_length

        if progress.iteration % args.log_interval == 0 or progress.iteration == cfg.train_iters:
            log_step(t, loss, lr, batch_size, window)
            window = Window()
        if t.valid and args.eval_interval and progress.iteration % args.eval_interval == 0 and args.eval_iters:
            evaluate(t)
        if args.save and args.save_interval and progress.iteration % args.save_interval == 0:
            save(t)
            last_saved = progress.iteration

    if args.save and last_saved != progress.iteration:
        save(t)
    return exit_reason


def train_step(engine, feed: Feed, batch_size: int, lr: float) -> float:
    """One optimizer step over `batch_size` samples at learning rate `lr`; returns the mean loss. What
    `train_batch` does (accumulation, 1F1B, reductions, clipping, ZeRO step): engine.py."""
    if batch_size != engine.train_batch_size():
        engine.set_train_batch_size(batch_size)  # batch ramp-up: more micro batches per step
    for group in engine.optimizer.param_groups:
        group["lr"] = lr
    return float(engine.train_batch(data_iter=feed))


def evaluate(t: Trainer) -> None:
    """`eval_iters` batches of each validation group, continuing where the last evaluation stopped."""
    args, progress = t.cfg.args, t.progress
    t.engine.eval()
    for name, ds in t.valid.items():
        start_at = progress.consumed_valid_samples.get(name, 0)
        feed = micro_batches(ds, start_at, args, t.state)
        losses = []
        for _ in range(args.eval_iters):
            losses.append(float(t.engine.eval_batch(feed)))
        progress.consumed_valid_samples[name] = start_at + args.eval_iters * args.global_batch_size
        loss = sum(losses) / max(1, len(losses))
        ppl = math.exp(min(loss, 20.0))
        t.metrics.log({"kind": "eval", "group": name, "iteration": progress.iteration, "loss": loss, "ppl": ppl})
        t.metrics.print(f"validation {name} | step {progress.iteration} | loss {loss:.4f} | ppl {ppl:.2f}")
    t.engine.train()


def save(t: Trainer) -> None:
    folder = t.cfg.args.save
    tag = ckpt.save(t.engine, folder, t.progress, t.cfg.args,
                    {"padded_vocab_size": t.cfg.padded_vocab, "original_vocab_size": t.cfg.vocab_size})
    t.metrics.print(f"saved checkpoint {folder}/{tag}")


class Window:
    """Tokens trained since the last log line, and since when."""

    def __init__(self):
        self.start, self.tokens = time.time(), 0


def log_step(t: Trainer, loss: float, lr: float, batch_size: int, window: Window) -> None:
    cfg, progress, world = t.cfg, t.progress, t.state.world_size
    interval = cfg.args.log_interval
    elapsed = max(time.time() - window.start, 1e-9)
    tps = window.tokens / elapsed
    grad_norm = t.engine.get_global_grad_norm()
    opt = t.engine.optimizer
    scale = getattr(opt, "cur_scale", None) or getattr(opt, "loss_scale", 1.0)
    model_tflops = cfg.flops_model * tps / world / 1e12
    rec = {"kind": "train", "iteration": progress.iteration, "consumed_samples": progress.consumed_train_samples,
           "loss": loss, "lr": lr, "grad_norm": float(grad_norm) if grad_norm is not None else None,
           "loss_scale": float(scale), "batch_size": batch_size, "tokens_per_s": tps,
           "model_tflops_per_gpu": model_tflops, "hw_tflops_per_gpu": cfg.flops_hw * tps / world / 1e12,
           "step_seconds": elapsed / interval}
    if t.peak_tflops:
        rec["mfu"] = mfu.mfu(model_tflops, t.peak_tflops)
    t.metrics.log(rec)
    t.metrics.print(
        f"step {progress.iteration}/{cfg.train_iters} | samples {progress.consumed_train_samples} | loss "
        f"{loss:.4f} | lr {lr:.3e} | grad norm {rec['grad_norm'] or 0:.3f} | loss scale {scale:g} | "
        f"{tps:,.0f} tokens/s | {model_tflops:.3g} model / {rec['hw_tflops_per_gpu']:.3g} hw TFLOP/s per GPU"
        + (f" | MFU {rec['mfu']:.1%}" if t.peak_tflops else ""))


def finish(t: Trainer, exit_reason: str | None) -> None:
    args, metrics, progress = t.cfg.args, t.metrics, t.progress
    png = metrics.close(loss_curve=not args.no_loss_curve)
    if exit_reason:
        # The job script runs the trainer in its run folder; `mtf-train resume` starts that folder's job again.
        run_dir = metrics.run_dir
        how = f"mtf-train resume {run_dir}" if (run_dir / "run.json").exists() else "the same command"
        metrics.print(f"exiting at step {progress.iteration} ({exit_reason}) after saving; resume with: {how}")
    else:
        metrics.print(f"training finished at step {progress.iteration}")
    if t.state.rank == 0:
        where = [f"checkpoint: {args.save}" if args.save else None, f"metrics: {metrics.path}",
                 f"loss curve: {png}" if png else None]
        print("\n".join(w for w in where if w), flush=True)
    dist.barrier()
