"""The trainer's command line, in Megatron-DeepSpeed's finetune_t0 argument set.

The same list drives the built-in trainer (`python -m mtf_train.train`) and an external Megatron-DeepSpeed
checkout, so a recipe means the same thing on both. Arguments that hold only for the first job of a run
(universal checkpoint, no optimizer load, progress reset) are kept apart: the job script adds them only
while the run's checkpoint folder is still empty.
"""
from __future__ import annotations

from dataclasses import dataclass

from mtf_train.plan import Shape, choose_recompute
from mtf_train.recipe.runtime import runtime
from mtf_train.recipe.schema import Recipe


@dataclass
class TrainerArgs:
    first_run: list[str]        # only while the run has no checkpoint of its own
    common: list[str]
    first_load: str | None      # --load for the first job (checkpoint.load), else resume from --save


def _num(x: float) -> str:
    return repr(float(x))  # 2e-05, 0.0048, 1.0: the values argparse reads back exactly


def trainer_args(r: Recipe, s: Shape, *, save: str, tensorboard_dir: str | None, ds_config: str,
                 train_path: str, valid_path: str | None, kill_switch: str) -> TrainerArgs:
    m, o, t, c = r.model, r.optimizer, r.training, r.checkpoint
    recompute, _ = choose_recompute(r, s)  # auto resolved by the plan's memory model
    rt = runtime(r)
    first = []
    if c.universal:
        first.append("--universal-checkpoint")
    if c.no_load_optim:
        first.append("--no-load-optim")
    if c.reset_progress:
        first.append("--reset-progress")
    if c.first_interval is not None:
        first += ["--save-interval", str(c.first_interval)]

    a = ["--tensor-model-parallel-size", str(s.tp), "--pipeline-model-parallel-size", str(s.pp),
         "--pp-partition-method", r.parallel.partition_method,
         "--num-layers", str(m.num_layers), "--hidden-size", str(m.hidden_size),
         "--num-attention-heads", str(m.num_attention_heads), "--seq-length", str(m.seq_length),
         "--max-position-embeddings", str(s.max_positions),
         "--micro-batch-size", str(s.micro), "--global-batch-size", str(s.global_batch)]
    if r.batch.rampup is not None:
        ru = r.batch.rampup
        a += ["--rampup-batch-size", str(ru.start), str(ru.increment), str(ru.samples)]
    if t.train_samples is not None:
        a += ["--train-samples", str(t.train_samples)]
    else:
        a += ["--train-iters", str(t.train_iters)]
    a += ["--tokenizer-type", r.data.tokenizer_type, "--tokenizer-name-or-path", r.data.tokenizer,
          "--init-method-std", _num(m.init_method_std)]
    if m.embed_layernorm:
        a.append("--embed-layernorm")
    if r.parallel.sync_tp_duplicated_parameters:
        a.append("--sync-tp-duplicated-parameters")
    if r.precision.dtype != "fp32":
        a.append(f"--{r.precision.dtype}")
    a += ["--seed", str(t.seed), "--position-embedding-type", m.position_embedding_type]
    if recompute == "full":
        a.append("--checkpoint-activations")  # finetune_t0's spelling, which both runtimes read
    a += rt.own_args(recompute)
    if t.fused_kernels:
        a.append("--abort-on-unmet-fused-kernel-constraints")
    a += ["--kill-switch-path", kill_switch]
    if m.pad_vocab_size_to is not None:
        a += ["--pad-vocab-size-to", str(m.pad_vocab_size_to)]
    else:
        a += ["--make-vocab-size-divisible-by", str(m.make_vocab_size_divisible_by)]
    a += ["--hidden-dropout", _num(m.hidden_dropout), "--attention-dropout", _num(m.attention_dropout),
          "--layernorm-epsilon", _num(m.layernorm_epsilon)]
    a += ["--optimizer", o.name, "--adam-beta1", _num(o.beta1), "--adam-beta2", _num(o.beta2),
          "--adam-eps", _num(o.eps), "--lr", _num(o.lr), "--min-lr", _num(o.min_lr)]
    a += ["--lr-decay-style", o.schedule, "--lr-warmup-samples", str(o.warmup_samples)]
    if o.decay_samples is not None:
        a += ["--lr-decay-samples", str(o.decay_samples)]
    a += ["--clip-grad", _num(o.clip_grad), "--weight-decay", _num(o.weight_decay)]
    if t.norm_target_loss:
        a.append("--norm-target-loss")
    if s.exit_minutes is not None:
        a += ["--exit-duration-in-mins", f"{s.exit_minutes:g}"]
    if t.exit_interval is not None:
        a += ["--exit-interval", str(t.exit_interval)]
    a += ["--log-interval", str(r.logging.log_interval), "--save-interval", str(c.interval),
          "--eval-interval", str(r.eval.interval), "--eval-iters", str(r.eval.iters)]
    if tensorboard_dir is not None:
        a += ["--tensorboard-dir", tensorboard_dir, "--tensorboard-queue-size", str(r.logging.tensorboard_queue_size),
              "--log-timers-to-tensorboard", "--log-batch-size-to-tensorboard", "--log-validation-ppl-to-tensorboard"]
    if not r.logging.loss_curve:
        a.append("--no-loss-curve")
    # --load comes from the job script: checkpoint.load for a run's first job, --save for every later one.
    a += ["--save", save, "--train-weighted-split-paths-path", train_path]
    if valid_path is not None:
        a += ["--valid-weighted-split-paths-path", valid_path]
    backend = r.runtime.distributed_backend or ("gloo" if r.cluster.accelerator == "cpu" else "nccl")
    a += ["--dataloader-type", r.data.dataloader_type, "--data-impl", "mmap", "--distributed-backend", backend]
    a += rt.loader_args()
    a += ["--deepspeed", "--deepspeed_config", ds_config, "--zero-stage", str(s.zero_stage)]
    if recompute == "full":
        a.append("--deepspeed-activation-checkpointing")
    return TrainerArgs(first, a, c.load)
