"""The MTF training loop: finetune_t0 on megatron-core layers and DeepSpeed's pipeline engine.

Setup (parallel groups, tokenizer, model, optimizer, DeepSpeed engine, checkpoint), then steps until the
training length, an exit condition or a signal; every exit saves first. Every shape (TP, PP, DP) runs the
same code: the model is always a DeepSpeed PipelineModule (one stage at PP=1), which is also what gives the
bigscience checkpoint layout.
"""
from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from mtf_train.rules import BatchSchedule, eval_samples_per_group, flops_per_token, padded_vocab
from mtf_train.train import checkpoint as ckpt
from mtf_train.train import mfu
from mtf_train.train.feed import Feed
from mtf_train.train.metrics import Metrics
from mtf_train.train.schedule import LRSchedule


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
        """`stepped`: this process has just completed step `iteration` (the exit interval counts only then,
        so that a job resumed at a multiple of it still trains)."""
        a = self.args
        local = 0
        if a.kill_switch_path and os.path.exists(a.kill_switch_path):
            local = 1
        elif self.signal:
            local = 2
        elif a.exit_duration_in_mins and (time.time() - self.start) / 60 > a.exit_duration_in_mins:
            local = 3
        elif a.exit_interval and stepped and iteration % a.exit_interval == 0:
            local = 4
        flag = torch.tensor([local], dtype=torch.int64, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return {0: None, 1: "kill switch", 2: f"signal {self.signal or ''}".strip(), 3: "exit duration",
                4: "exit interval"}[int(flag.item())]


def make_optimizer(model: torch.nn.Module, args, on_gpu: bool) -> torch.optim.Optimizer:
    # No weight decay on biases and layer norms (Megatron's grouping): the 1-D parameters.
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim == 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": args.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_eps,
                             fused=on_gpu)


def ds_config(args) -> dict:
    with open(args.deepspeed_config) as fh:
        cfg = json.load(fh)
    if args.universal_checkpoint:
        cfg.setdefault("checkpoint", {})["load_universal"] = True
    return cfg


def run(args) -> int:
    start = time.time()
    from mtf_train.data.packed import build_datasets
    from mtf_train.data.pathfile import read_path_file
    from mtf_train.data.tokenizer import load_tokenizer
    from mtf_train.train.model import BloomModelConfig, build_model
    from mtf_train.train.parallel import init_parallel, seed_everything

    state = init_parallel(args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                          backend=args.distributed_backend)
    seed_everything(args.seed, state)
    rank0 = dist.get_rank() == 0
    on_gpu = state.device.type == "cuda"
    exits = ExitFlags(args, start)

    _, tok = load_tokenizer(args.tokenizer_name_or_path)
    padded = padded_vocab(tok.vocab_size, args.tensor_model_parallel_size, args.make_vocab_size_divisible_by,
                          args.pad_vocab_size_to)
    if padded < tok.vocab_size:
        raise ValueError(f"--pad-vocab-size-to {padded} is smaller than the tokenizer ({tok.vocab_size})")
    dtype = torch.float32  # DeepSpeed casts the module for fp16/bf16 and keeps fp32 master weights
    config = BloomModelConfig(
        num_layers=args.num_layers, hidden_size=args.hidden_size, num_heads=args.num_attention_heads,
        padded_vocab_size=padded, original_vocab_size=tok.vocab_size, layernorm_epsilon=args.layernorm_epsilon,
        init_std=args.init_method_std, hidden_dropout=args.hidden_dropout,
        attention_dropout=args.attention_dropout, params_dtype=dtype,
        recompute=args.recompute, attention=args.attention_impl, init_seed=args.seed,
        # Compiling a block costs tens of seconds of CPU per shape, more than a CPU run gains: GPUs only by default.
        compile=on_gpu if args.compile is None else args.compile)
    model = build_model(config, state, pipeline=True, norm_target_loss=args.norm_target_loss,
                        partition_method=args.pp_partition_method)

    import deepspeed
    optimizer = make_optimizer(model, args, on_gpu)
    cfg = ds_config(args)
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=cfg,
                                                   dist_init_required=False)
    if args.bf16:
        from mtf_train.train.bf16 import fuse_hp_grad_accumulation
        fuse_hp_grad_accumulation(engine.optimizer)  # no per-parameter Python call per micro batch

    batches = BatchSchedule(args.global_batch_size, tuple(args.rampup_batch_size) if args.rampup_batch_size else None)
    train_iters, train_samples = batches.length(args.train_iters, args.train_samples)
    lr_at = LRSchedule(args.lr, args.min_lr, args.lr_decay_style, args.lr_warmup_samples,
                       args.lr_decay_samples or train_samples)

    progress = ckpt.Progress()
    loaded = ckpt.load(engine, args, universal=args.universal_checkpoint, load_optimizer=not args.no_load_optim,
                       restore_rng=not (args.universal_checkpoint or args.no_load_rng or args.reset_progress))
    if loaded is not None:
        loaded_progress, where = loaded
        if not args.reset_progress:
            progress = loaded_progress
        if rank0:
            print(f"loaded {where} (iteration {loaded_progress.iteration}"
                  f"{', progress reset' if args.reset_progress else ''}"
                  f"{', optimizer states not loaded' if args.no_load_optim else ''})", flush=True)

    # Data: the training blend and one validation blend per group, sized like Megatron's.
    train_groups = read_path_file(args.train_weighted_split_paths_path)
    valid_groups = read_path_file(args.valid_weighted_split_paths_path) if args.valid_weighted_split_paths_path else []
    eval_samples = eval_samples_per_group(train_iters, args.eval_interval, args.eval_iters, args.global_batch_size)
    train_ds, valid_ds = build_datasets(train_groups, valid_groups, seq_length=args.seq_length,
                                        train_samples=train_samples, eval_samples_per_group=eval_samples,
                                        seed=args.seed, pad_id=tok.pad_id, cache_dir=args.data_cache_dir)
    feed_kw = dict(micro=args.micro_batch_size, dp=state.dp, dp_rank=state.dp_rank, device=state.device)
    train_feed = Feed(train_ds, start=progress.consumed_train_samples, num_workers=args.num_workers, **feed_kw)

    run_dir = Path.cwd()
    metrics = Metrics(run_dir, args.tensorboard_dir, args.tensorboard_queue_size, enabled=rank0)
    fpt_model = flops_per_token(args.num_layers, args.hidden_size, args.seq_length, padded, recompute=False)
    fpt_hw = flops_per_token(args.num_layers, args.hidden_size, args.seq_length, padded,
                             recompute=args.recompute,
                             flex=args.attention_impl == "flex" or (args.attention_impl == "auto" and on_gpu
                                                                     and args.attention_dropout == 0))
    world = dist.get_world_size()
    peak, peak_source = mfu.resolve_peak(args.tflops_per_gpu_peak, state.device.type,
                                         torch.cuda.get_device_name(state.device) if on_gpu else None)
    metrics.print(f"training {train_iters} steps ({train_samples} samples) from step {progress.iteration}: "
                  f"world {world} = pp {state.pp} x tp {state.tp} x dp {state.dp}, padded vocab {padded}")
    for line in mfu.describe(args.num_layers, args.hidden_size, args.seq_length, padded,
                             args.recompute, fpt_model, fpt_hw, peak, peak_source):
        metrics.print(line)

    def evaluate() -> None:
        engine.eval()
        for name, ds in valid_ds.items():
            start_at = progress.consumed_valid_samples.get(name, 0)
            feed = Feed(ds, start=start_at, **feed_kw)
            losses = []
            for _ in range(args.eval_iters):
                losses.append(float(engine.eval_batch(feed)))
            progress.consumed_valid_samples[name] = start_at + args.eval_iters * args.global_batch_size
            loss = sum(losses) / max(1, len(losses))
            ppl = math.exp(min(loss, 20.0))
            metrics.log({"kind": "eval", "group": name, "iteration": progress.iteration, "loss": loss, "ppl": ppl})
            metrics.print(f"validation {name} | step {progress.iteration} | loss {loss:.4f} | ppl {ppl:.2f}")
        engine.train()

    def save() -> str:
        tag = ckpt.save(engine, args.save, progress, args,
                        {"padded_vocab_size": padded, "original_vocab_size": tok.vocab_size})
        metrics.print(f"saved checkpoint {args.save}/{tag}")
        return tag

    last_saved = progress.iteration if loaded is not None and not args.reset_progress else None
    window_t, window_tokens = time.time(), 0
    exit_reason = None
    stepped = False
    engine.train()
    while progress.iteration < train_iters:
        exit_reason = exits.reason(progress.iteration, state.device, stepped)
        if exit_reason:
            break
        stepped = True
        gbs = batches(progress.consumed_train_samples)
        if gbs != engine.train_batch_size():
            engine.set_train_batch_size(gbs)
        lr = lr_at(progress.consumed_train_samples)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = float(engine.train_batch(data_iter=train_feed))
        progress.iteration += 1
        progress.consumed_train_samples += gbs
        window_tokens += gbs * args.seq_length

        if progress.iteration % args.log_interval == 0 or progress.iteration == train_iters:
            elapsed = max(time.time() - window_t, 1e-9)
            tps = window_tokens / elapsed
            grad_norm = engine.get_global_grad_norm()
            scale = getattr(engine.optimizer, "cur_scale", None) or getattr(engine.optimizer, "loss_scale", 1.0)
            model_tflops = fpt_model * tps / world / 1e12
            rec = {"kind": "train", "iteration": progress.iteration, "consumed_samples": progress.consumed_train_samples,
                   "loss": loss, "lr": lr, "grad_norm": float(grad_norm) if grad_norm is not None else None,
                   "loss_scale": float(scale), "batch_size": gbs, "tokens_per_s": tps,
                   "model_tflops_per_gpu": model_tflops, "hw_tflops_per_gpu": fpt_hw * tps / world / 1e12,
                   "step_seconds": elapsed / args.log_interval}
            if peak:
                rec["mfu"] = mfu.mfu(model_tflops, peak)
            metrics.log(rec)
            metrics.print(
                f"step {progress.iteration}/{train_iters} | samples {progress.consumed_train_samples} | loss "
                f"{loss:.4f} | lr {lr:.3e} | grad norm {rec['grad_norm'] or 0:.3f} | loss scale {scale:g} | "
                f"{tps:,.0f} tokens/s | {model_tflops:.3g} model / {rec['hw_tflops_per_gpu']:.3g} hw TFLOP/s per GPU"
                + (f" | MFU {rec['mfu']:.1%}" if peak else ""))
            window_t, window_tokens = time.time(), 0

        if valid_ds and args.eval_interval and progress.iteration % args.eval_interval == 0 and args.eval_iters:
            evaluate()
        if args.save and args.save_interval and progress.iteration % args.save_interval == 0:
            save()
            last_saved = progress.iteration

    if args.save and last_saved != progress.iteration:
        save()
    png = metrics.close()
    if exit_reason:
        # The job script runs the trainer in its run folder; `mtf-train resume` starts that folder's job again.
        how = f"mtf-train resume {run_dir}" if (run_dir / "run.json").exists() else "the same command"
        metrics.print(f"exiting at step {progress.iteration} ({exit_reason}) after saving; resume with: {how}")
    else:
        metrics.print(f"training finished at step {progress.iteration}")
    if rank0:
        where = [f"checkpoint: {args.save}" if args.save else None, f"metrics: {metrics.path}",
                 f"loss curve: {png}" if png else None]
        print("\n".join(w for w in where if w), flush=True)
    dist.barrier()
    return 0


def main(argv: list[str] | None = None) -> int:
    from mtf_train.errors import UserError
    from mtf_train.train.args import parse_args

    try:
        args = parse_args(argv)
        return run(args)
    except UserError as err:
        print(f"mtf_train.train: error: {err.line()}", file=sys.stderr, flush=True)
        return err.exit_code
