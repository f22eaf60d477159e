"""The trainer's command line: Megatron-DeepSpeed's finetune_t0 argument set, as recipes render it.

Unknown or contradictory arguments are refused with one line. Importing this module imports no torch, so
rendered jobs can be checked against it before they are submitted.

Defaults are Megatron-DeepSpeed's, so that a finetune_t0 command line means the same here as there. A recipe
never relies on them: the rendered command passes every recipe value explicitly. Where they differ from the
recipe schema's defaults (both checked by tests/test_train_args.py):

    argument                    default here (Megatron)   recipe schema default
    --adam-beta2                0.999                     optimizer.beta2 0.95
    --weight-decay              0.01                      optimizer.weight_decay 1e-4
    --seed                      1234                      training.seed 42
    --lr-decay-style            linear                    optimizer.schedule constant
    --init-method-std           0.02                      model.init_method_std 0.0048
    --log-interval              100                       logging.log_interval 1
    --eval-interval             1000                      eval.interval 125
    --eval-iters                100                       eval.iters 10
    --tensorboard-queue-size    1000                      logging.tensorboard_queue_size 5
    --embed-layernorm, --sync-tp-duplicated-parameters, --norm-target-loss: off here, on in the schema
"""
from __future__ import annotations

import argparse
import sys

from mtf_train.errors import UserError


class TrainerArgsError(UserError):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse prints usage and exits; we want one line and no traceback
        raise TrainerArgsError("mtf_train.train", message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m mtf_train.train", allow_abbrev=False,
                description="The built-in MTF trainer (finetune_t0 arguments on megatron-core + DeepSpeed).")

    g = p.add_argument_group("model")
    g.add_argument("--num-layers", type=int, required=True)
    g.add_argument("--hidden-size", type=int, required=True)
    g.add_argument("--num-attention-heads", type=int, required=True)
    g.add_argument("--seq-length", type=int, required=True)
    g.add_argument("--max-position-embeddings", type=int)
    g.add_argument("--position-embedding-type", choices=["alibi", "absolute"], default="alibi")
    g.add_argument("--embed-layernorm", action="store_true")
    g.add_argument("--init-method-std", type=float, default=0.02)
    g.add_argument("--hidden-dropout", type=float, default=0.0)
    g.add_argument("--attention-dropout", type=float, default=0.0)
    g.add_argument("--layernorm-epsilon", type=float, default=1e-5)
    g.add_argument("--pad-vocab-size-to", type=int)
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    g.add_argument("--attention-impl", choices=["auto", "reference", "flex"], default="auto",
                   help="packed-row attention: flex (fused, CUDA) or reference; auto picks flex on CUDA")

    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--pp-partition-method", default="type:transformer|embedding")
    g.add_argument("--sync-tp-duplicated-parameters", action="store_true")
    g.add_argument("--distributed-backend", choices=["nccl", "gloo"], default=None)

    g = p.add_argument_group("batch and length")
    g.add_argument("--micro-batch-size", type=int, required=True)
    g.add_argument("--global-batch-size", type=int, required=True)
    g.add_argument("--rampup-batch-size", type=int, nargs=3, metavar=("START", "INCREMENT", "SAMPLES"))
    g.add_argument("--train-samples", type=int)
    g.add_argument("--train-iters", type=int)

    g = p.add_argument_group("precision")
    g.add_argument("--fp16", action="store_true")
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--checkpoint-activations", action="store_true",
                   help="finetune_t0's flag: recompute every block in backward (the same as --recompute full)")
    g.add_argument("--recompute", choices=["none", "selective", "full"], default=None,
                   help="activation recomputation per block: none, selective (layer norms, GeLU and the attention "
                        "core from the saved GEMM outputs) or full (default: full with --checkpoint-activations, "
                        "else none)")
    g.add_argument("--compile", dest="compile", action="store_true", default=None,
                   help="torch.compile each transformer block (default on GPUs)")
    g.add_argument("--no-compile", dest="compile", action="store_false",
                   help="run the blocks eagerly (default on CPU, where compiling costs minutes per run)")
    g.add_argument("--abort-on-unmet-fused-kernel-constraints", action="store_true")

    g = p.add_argument_group("optimizer")
    g.add_argument("--optimizer", choices=["adam"], default="adam")
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--lr", type=float, required=True)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-decay-style", choices=["constant", "linear", "cosine"], default="linear")
    g.add_argument("--lr-warmup-samples", type=int, default=0)
    g.add_argument("--lr-decay-samples", type=int)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--norm-target-loss", action="store_true")
    g.add_argument("--seed", type=int, default=1234)

    g = p.add_argument_group("data")
    g.add_argument("--train-weighted-split-paths-path")
    g.add_argument("--valid-weighted-split-paths-path")
    g.add_argument("--tokenizer-type", choices=["PretrainedFromHF"], default="PretrainedFromHF")
    g.add_argument("--tokenizer-name-or-path", required=True)
    g.add_argument("--dataloader-type", choices=["single", "cyclic"], default="single")
    g.add_argument("--data-impl", choices=["mmap"], default="mmap")
    g.add_argument("--num-workers", type=int, default=2)
    g.add_argument("--data-cache-dir", help="packing index caches (default: next to the data)")

    g = p.add_argument_group("checkpoints and exits")
    g.add_argument("--save")
    g.add_argument("--load")
    g.add_argument("--save-interval", type=int)
    g.add_argument("--universal-checkpoint", action="store_true")
    g.add_argument("--no-load-optim", action="store_true")
    g.add_argument("--no-load-rng", action="store_true")
    g.add_argument("--reset-progress", action="store_true")
    g.add_argument("--kill-switch-path")
    g.add_argument("--exit-duration-in-mins", type=float)
    g.add_argument("--exit-interval", type=int)

    g = p.add_argument_group("logging and evaluation")
    g.add_argument("--log-interval", type=int, default=100)
    g.add_argument("--eval-interval", type=int, default=1000)
    g.add_argument("--eval-iters", type=int, default=100)
    g.add_argument("--tensorboard-dir")
    g.add_argument("--tensorboard-queue-size", type=int, default=1000)
    g.add_argument("--log-timers-to-tensorboard", action="store_true")
    g.add_argument("--log-batch-size-to-tensorboard", action="store_true")
    g.add_argument("--log-validation-ppl-to-tensorboard", action="store_true")
    g.add_argument("--no-loss-curve", action="store_true", help="do not draw loss_curve.png at the end")
    g.add_argument("--tflops-per-gpu-peak", type=float, default=None,
                   help="peak TFLOP/s per device for MFU in the log (default: the GPU's dense bf16/fp16 peak "
                        "from its name, e.g. 989 on H100/H200, 312 on A100; none on CPU)")

    g = p.add_argument_group("DeepSpeed")
    g.add_argument("--deepspeed", action="store_true")
    g.add_argument("--deepspeed_config", "--deepspeed-config", dest="deepspeed_config")
    g.add_argument("--zero-stage", type=int, choices=[0, 1], default=1)
    g.add_argument("--deepspeed-activation-checkpointing", action="store_true")
    g.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def check(args: argparse.Namespace) -> argparse.Namespace:
    """Contradictions argparse cannot see."""
    def bad(msg: str):
        raise TrainerArgsError("mtf_train.train", msg)

    if (args.train_samples is None) == (args.train_iters is None):
        bad("give exactly one of --train-samples and --train-iters")
    if args.fp16 and args.bf16:
        bad("--fp16 and --bf16 are exclusive")
    if args.checkpoint_activations and args.recompute not in (None, "full"):
        bad(f"--checkpoint-activations means --recompute full, not {args.recompute}")
    if args.recompute is None:
        args.recompute = "full" if args.checkpoint_activations else "none"
    if args.max_position_embeddings is None:
        args.max_position_embeddings = args.seq_length
    if args.seq_length > args.max_position_embeddings:
        bad(f"--seq-length {args.seq_length} exceeds --max-position-embeddings {args.max_position_embeddings}")
    if args.position_embedding_type != "alibi":
        bad("--position-embedding-type absolute: packed MTF rows need alibi (positions are not reset per example)")
    if args.hidden_size % args.num_attention_heads:
        bad(f"--hidden-size {args.hidden_size} is not divisible by --num-attention-heads {args.num_attention_heads}")
    if args.num_attention_heads % args.tensor_model_parallel_size:
        bad(f"--num-attention-heads {args.num_attention_heads} is not divisible by --tensor-model-parallel-size "
            f"{args.tensor_model_parallel_size}")
    if args.train_weighted_split_paths_path is None:
        bad("--train-weighted-split-paths-path is required")
    if args.save is not None and args.save_interval is None:
        bad("--save needs --save-interval")
    if args.deepspeed_activation_checkpointing and not args.checkpoint_activations:
        bad("--deepspeed-activation-checkpointing needs --checkpoint-activations (it picks how recomputation is done; "
            "the built-in trainer recomputes with torch.utils.checkpoint and megatron-core's RNG tracker)")
    if args.universal_checkpoint and args.load is None:
        bad("--universal-checkpoint needs --load")
    if args.rampup_batch_size is not None:
        start, inc, _ = args.rampup_batch_size
        if start > args.global_batch_size or (args.global_batch_size - start) % inc:
            bad("--rampup-batch-size: START must not exceed the global batch and (GLOBAL - START) must be a "
                "multiple of INCREMENT")
    return args


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return check(build_parser().parse_args(sys.argv[1:] if argv is None else argv))
