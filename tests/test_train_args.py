"""The trainer's command line keeps Megatron-DeepSpeed's defaults, and a recipe run never relies on them."""
from __future__ import annotations

import json

import pytest

from mtf_train.cli import main as mtf_cli
from mtf_train.recipe.load import load_recipe
from mtf_train.train.args import build_parser, parse_args
from tests.helpers import ROOT
from tests.test_plan_render import program_args

REQUIRED = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
            "--micro-batch-size", "1", "--global-batch-size", "2", "--lr", "1e-3", "--train-iters", "2",
            "--tokenizer-name-or-path", "t", "--train-weighted-split-paths-path", "p.txt"]

# finetune_t0's defaults (the table in mtf_train/train/args.py): a 2022 command line means the same here.
MEGATRON_DEFAULTS = {
    "adam_beta1": 0.9, "adam_beta2": 0.999, "adam_eps": 1e-8, "weight_decay": 0.01, "clip_grad": 1.0,
    "seed": 1234, "lr_decay_style": "linear", "min_lr": 0.0, "lr_warmup_samples": 0, "init_method_std": 0.02,
    "make_vocab_size_divisible_by": 128, "layernorm_epsilon": 1e-5, "log_interval": 100, "eval_interval": 1000,
    "eval_iters": 100, "tensorboard_queue_size": 1000, "embed_layernorm": False,
    "sync_tp_duplicated_parameters": False, "norm_target_loss": False, "tensor_model_parallel_size": 1,
    "pipeline_model_parallel_size": 1, "zero_stage": 1,
}

# Every trainer option a recipe decides, and the recipe's value for it.
FROM_RECIPE = {
    "num_layers": lambda r: r.model.num_layers,
    "hidden_size": lambda r: r.model.hidden_size,
    "num_attention_heads": lambda r: r.model.num_attention_heads,
    "seq_length": lambda r: r.model.seq_length,
    "max_position_embeddings": lambda r: r.model.max_position_embeddings,
    "position_embedding_type": lambda r: r.model.position_embedding_type,
    "embed_layernorm": lambda r: r.model.embed_layernorm,
    "init_method_std": lambda r: r.model.init_method_std,
    "hidden_dropout": lambda r: r.model.hidden_dropout,
    "attention_dropout": lambda r: r.model.attention_dropout,
    "layernorm_epsilon": lambda r: r.model.layernorm_epsilon,
    "pad_vocab_size_to": lambda r: r.model.pad_vocab_size_to,
    "make_vocab_size_divisible_by": lambda r: r.model.make_vocab_size_divisible_by,
    "tensor_model_parallel_size": lambda r: r.parallel.tp,
    "pipeline_model_parallel_size": lambda r: r.parallel.pp,
    "pp_partition_method": lambda r: r.parallel.partition_method,
    "sync_tp_duplicated_parameters": lambda r: r.parallel.sync_tp_duplicated_parameters,
    "micro_batch_size": lambda r: r.batch.micro,
    "global_batch_size": lambda r: r.batch.global_,
    "rampup_batch_size": lambda r: [r.batch.rampup.start, r.batch.rampup.increment, r.batch.rampup.samples]
    if r.batch.rampup else None,
    "train_samples": lambda r: r.training.train_samples,
    "train_iters": lambda r: r.training.train_iters,
    "fp16": lambda r: r.precision.dtype == "fp16",
    "bf16": lambda r: r.precision.dtype == "bf16",
    "zero_stage": lambda r: r.precision.zero_stage,
    "recompute": lambda r: r.training.recompute,
    "checkpoint_activations": lambda r: r.training.recompute == "full",
    "deepspeed_activation_checkpointing": lambda r: r.training.recompute == "full",
    "compile": lambda r: r.training.compile,
    "abort_on_unmet_fused_kernel_constraints": lambda r: r.training.fused_kernels,
    "optimizer": lambda r: r.optimizer.name,
    "lr": lambda r: r.optimizer.lr,
    "min_lr": lambda r: r.optimizer.min_lr,
    "adam_beta1": lambda r: r.optimizer.beta1,
    "adam_beta2": lambda r: r.optimizer.beta2,
    "adam_eps": lambda r: r.optimizer.eps,
    "weight_decay": lambda r: r.optimizer.weight_decay,
    "clip_grad": lambda r: r.optimizer.clip_grad,
    "lr_decay_style": lambda r: r.optimizer.schedule,
    "lr_warmup_samples": lambda r: r.optimizer.warmup_samples,
    "lr_decay_samples": lambda r: r.optimizer.decay_samples,
    "seed": lambda r: r.training.seed,
    "norm_target_loss": lambda r: r.training.norm_target_loss,
    "exit_duration_in_mins": lambda r: r.training.exit_duration_in_mins,
    "exit_interval": lambda r: r.training.exit_interval,
    "tokenizer_type": lambda r: r.data.tokenizer_type,
    "tokenizer_name_or_path": lambda r: r.data.tokenizer,
    "dataloader_type": lambda r: r.data.dataloader_type,
    "num_workers": lambda r: r.data.num_workers,
    "save_interval": lambda r: r.checkpoint.interval,
    "log_interval": lambda r: r.logging.log_interval,
    "eval_interval": lambda r: r.eval.interval,
    "eval_iters": lambda r: r.eval.iters,
    "tensorboard_queue_size": lambda r: r.logging.tensorboard_queue_size,
    "no_loss_curve": lambda r: not r.logging.loss_curve,
    "distributed_backend": lambda r: r.runtime.distributed_backend,
}
# The rest: paths and switches of the job itself (or of a run's first job), not recipe values.
NOT_FROM_RECIPE = {
    "save", "load", "kill_switch_path", "train_weighted_split_paths_path", "valid_weighted_split_paths_path",
    "tensorboard_dir", "log_timers_to_tensorboard", "log_batch_size_to_tensorboard",
    "log_validation_ppl_to_tensorboard", "data_cache_dir", "data_impl", "deepspeed", "deepspeed_config", "local_rank",
    "universal_checkpoint", "no_load_optim", "no_load_rng", "reset_progress", "attention_impl", "tflops_per_gpu_peak",
    "help",
}

DATA = ROOT / "data" / "sample"
# Two recipes whose every value differs from the trainer's default where the schema allows it (a value equal to
# the default still has to be on the command line: see the presence check).
BASE = {
    "executor": "local",
    "model": {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "seq_length": 64,
              "max_position_embeddings": 128, "init_method_std": 0.0048, "hidden_dropout": 0.05,
              "attention_dropout": 0.05, "layernorm_epsilon": 1e-6, "make_vocab_size_divisible_by": 64},
    "parallel": {"tp": 2, "pp": 1, "partition_method": "type:transformer"},
    "batch": {"micro": 2, "global": 16, "rampup": {"start": 4, "increment": 4, "samples": 64}},
    "precision": {"dtype": "bf16", "zero_stage": 1},
    "optimizer": {"lr": 1e-3, "min_lr": 1e-4, "beta1": 0.8, "beta2": 0.95, "eps": 1e-6, "weight_decay": 1e-4,
                  "clip_grad": 0.5, "schedule": "cosine", "warmup_samples": 32, "decay_samples": 320},
    "training": {"train_iters": 7, "seed": 42, "recompute": "selective", "compile": True, "fused_kernels": True,
                 "exit_duration_in_mins": 30, "exit_interval": 5},
    "eval": {"interval": 3, "iters": 2},
    "data": {"train_path": str(ROOT / "data_paths" / "sample_train.txt"),
             "valid_path": str(ROOT / "data_paths" / "sample_validation.txt"), "root": str(DATA),
             "tokenizer": str(DATA / "tokenizer"), "dataloader_type": "single", "num_workers": 1},
    "checkpoint": {"interval": 4},
    "cluster": {"accelerator": "cpu", "nodes": 1, "gpus_per_node": 2},
    "logging": {"log_interval": 2, "tensorboard_queue_size": 7},
    "runtime": {"distributed_backend": "gloo"},
}
OTHER = {  # the other length, padding and precision; the switches the built-in trainer can do without, off
    **BASE,
    "model": {**BASE["model"], "pad_vocab_size_to": 2560},
    "batch": {"micro": 2, "global": 16},
    "precision": {"dtype": "fp16", "zero_stage": 0},
    "optimizer": {**BASE["optimizer"], "min_lr": 0.0, "schedule": "linear"},
    "training": {"train_samples": 160, "seed": 7, "recompute": "full", "compile": False, "norm_target_loss": False,
                 "exit_duration_in_mins": 30},
    "cluster": {"accelerator": "gpu", "nodes": 1, "gpus_per_node": 2},
    "logging": {"log_interval": 2, "tensorboard_queue_size": 7, "loss_curve": False},
    "runtime": {"distributed_backend": "nccl"},
}


def test_megatron_defaults_are_kept():
    args = parse_args(REQUIRED)
    assert {k: getattr(args, k) for k in MEGATRON_DEFAULTS} == MEGATRON_DEFAULTS


def test_every_trainer_option_is_a_recipe_value_or_job_plumbing():
    dests = {a.dest for a in build_parser()._actions}
    assert dests - FROM_RECIPE.keys() - NOT_FROM_RECIPE == set(), "new option: say where its value comes from"
    assert (FROM_RECIPE.keys() | NOT_FROM_RECIPE) - dests == set()


@pytest.mark.parametrize("values", [BASE, OTHER], ids=["base", "other"])
def test_rendered_command_passes_every_recipe_value_explicitly(tmp_path, values):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps(values))  # YAML is a superset of JSON
    assert mtf_cli(["render", str(recipe), "-o", str(tmp_path / "job")]) == 0
    argv = program_args((tmp_path / "job" / "job.sbatch").read_text(), first_run=False)
    assert argv[:2] == ["-m", "mtf_train.train"]
    args = parse_args(argv[2:])
    r = load_recipe(recipe)
    options = {a.dest: a for a in build_parser()._actions}
    for dest, of in FROM_RECIPE.items():
        if dest == "make_vocab_size_divisible_by" and r.model.pad_vocab_size_to is not None:
            continue  # unused when the vocabulary is padded to a fixed size
        want = of(r)
        assert getattr(args, dest) == want, dest
        action = options[dest]
        if want is not None and action.nargs != 0 and action.default is not None:
            # A value option whose default could stand in for the recipe's: it must be on the command line.
            assert set(action.option_strings) & set(argv), f"{dest} is left to the trainer's default"
