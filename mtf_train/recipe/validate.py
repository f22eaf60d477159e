"""Every rule a recipe must pass before anything is rendered or submitted.

Each rule raises a RecipeError naming the file that set the field, the field and the reason, so that shape
and batch mistakes surface here instead of inside a job after the queue wait.
"""
from __future__ import annotations

import os
import re

from mtf_train.errors import RecipeError
from mtf_train.recipe.directives import directives
from mtf_train.recipe.runtime import runtime
from mtf_train.recipe.schema import Recipe
from mtf_train.recipe.shape import Shape, derive_shape
from mtf_train.rules import parse_time_minutes

PARTITION_METHODS = ("type:transformer|embedding", "type:transformer", "uniform", "parameters")
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def validate(r: Recipe, check_data: bool = False) -> Shape:
    """Check every rule; return the derived shape."""
    s = derive_shape(r)

    def fail(dotted: str | list[str], reason: str):
        """Blame one field; of several conflicting ones, the one set last."""
        if isinstance(dotted, list):
            dotted = r.origin.latest(dotted)
        raise RecipeError(r.origin.of(dotted), reason, field=dotted)

    world_fields = ["cluster.nodes", "cluster.gpus_per_node", "parallel.pp", "parallel.tp"]

    m, par, b = r.model, r.parallel, r.batch

    # Parallel shape.
    if s.dp is None:
        fail(world_fields, f"world size {s.world_size} (nodes {r.cluster.nodes} x gpus_per_node "
                              f"{r.cluster.gpus_per_node}) is not divisible by pp {s.pp} x tp {s.tp}")
    if s.pp * s.tp * s.dp != s.world_size:
        fail(["parallel.dp"] + world_fields, f"pp {s.pp} x tp {s.tp} x dp {s.dp} = {s.pp * s.tp * s.dp} but nodes x gpus_per_node "
                            f"= {s.world_size}")
    if par.partition_method not in PARTITION_METHODS:
        fail("parallel.partition_method", f"must be one of {', '.join(PARTITION_METHODS)}; got "
                                          f"{par.partition_method!r}")
    if par.partition_method.startswith("type:"):
        what = "layers + 2 embedding units" if par.partition_method.endswith("embedding") else "layers"
        if s.units % s.pp:
            fail(["parallel.pp", "model.num_layers", "parallel.partition_method"], f"{what} = {s.units} cannot be split evenly among pp {s.pp} stages "
                                f"(partition_method {par.partition_method})")
    elif s.pp > m.num_layers:
        fail("parallel.pp", f"pp {s.pp} exceeds num_layers {m.num_layers}")

    # Batch arithmetic.
    if b.global_ % (b.micro * s.dp):
        fail(["batch.global", "batch.micro"] + world_fields, f"{b.global_} is not divisible by micro {b.micro} x dp {s.dp} = {b.micro * s.dp}")
    if b.rampup is not None:
        unit = b.micro * s.dp
        for name in ("start", "increment"):
            v = getattr(b.rampup, name)
            if v % unit:
                fail(f"batch.rampup.{name}", f"{v} is not divisible by micro x dp = {unit}")
        if b.rampup.start > b.global_:
            fail("batch.rampup.start", f"{b.rampup.start} exceeds batch.global {b.global_}")
        if (b.global_ - b.rampup.start) % b.rampup.increment:
            fail("batch.rampup.increment", f"global - start = {b.global_ - b.rampup.start} is not a multiple "
                                           f"of {b.rampup.increment}")

    # Model geometry.
    if m.hidden_size % m.num_attention_heads:
        fail(["model.hidden_size", "model.num_attention_heads"], f"{m.hidden_size} is not divisible by num_attention_heads {m.num_attention_heads}")
    if m.num_attention_heads % s.tp:
        fail(["model.num_attention_heads", "parallel.tp"], f"{m.num_attention_heads} heads are not divisible by tp {s.tp}")
    tok = r.data.tokenizer
    if tok.startswith(("/", "./", "../", "~")) and not os.path.isdir(tok):
        fail("data.tokenizer", f"folder not found: {tok} (a local tokenizer folder, or a hub name such as "
                               "bigscience/tokenizer)")
    if s.padded_vocab is None:
        fail("model.vocab_size", f"unknown: tokenizer {r.data.tokenizer!r} is not a local folder with "
                                 "tokenizer.json; set model.vocab_size or model.pad_vocab_size_to")
    if s.vocab_size is not None and s.padded_vocab < s.vocab_size:
        fail("model.pad_vocab_size_to", f"{s.padded_vocab} is smaller than the vocabulary ({s.vocab_size})")
    if s.padded_vocab % s.tp:
        fail("model.pad_vocab_size_to", f"padded vocabulary {s.padded_vocab} is not divisible by tp {s.tp}")
    if m.seq_length > s.max_positions:
        fail("model.seq_length", f"{m.seq_length} exceeds max_position_embeddings {s.max_positions}")
    # Settings the recipe's trainer does not have: refused rather than ignored.
    for field, reason in runtime(r).refusals():
        fail(field, reason)
    for name in ("hidden_dropout", "attention_dropout"):
        if getattr(m, name) >= 1:
            fail(f"model.{name}", f"must be < 1, got {getattr(m, name)}")

    # Fused softmax kernel limits (Megatron's scaled masked softmax), only when they are required.
    if r.training.fused_kernels:
        sl, heads = m.seq_length, m.num_attention_heads
        if not 16 < sl <= 4096 or sl % 4:
            fail("model.seq_length", f"{sl} breaks the fused softmax limits (16 < seq <= 4096, seq % 4 == 0); "
                                     "set training.fused_kernels: false to allow it")
        if (b.micro * heads // s.tp) % 4:
            fail("batch.micro", f"micro {b.micro} x heads {heads} / tp {s.tp} must be a multiple of 4 for the "
                                "fused softmax; set training.fused_kernels: false to allow it")

    # Precision, ZeRO and runtime.
    p = r.precision
    if p.dtype == "fp16" and r.cluster.accelerator == "cpu":
        fail("precision.dtype", "fp16 needs GPUs (no loss-scaled fp16 on CPU); use bf16 or fp32")
    t = r.training
    if t.checkpoint_activations is not None and t.recompute != "auto" \
            and t.recompute != ("full" if t.checkpoint_activations else "none"):
        fail(["training.recompute", "training.checkpoint_activations"],
             f"recompute {t.recompute} contradicts checkpoint_activations {str(t.checkpoint_activations).lower()} "
             "(true means full, false none); set only recompute")
    if s.pp > 1 and p.zero_stage > 1:
        fail("precision.zero_stage", "pipeline parallelism supports ZeRO 0 and 1 only")

    # Length and time.
    t = r.training
    if (t.train_samples is None) == (t.train_iters is None):
        fail("training.train_samples", "give exactly one of training.train_samples and training.train_iters")
    if t.train_samples is not None and b.rampup is None and t.train_samples % b.global_:
        fail("training.train_samples", f"{t.train_samples} is not a whole number of steps of {b.global_} samples "
                                       f"({t.train_samples / b.global_:.2f}); use "
                                       f"{s.train_iters * b.global_}")
    ck = r.checkpoint
    first_run = [name for name in ("universal", "no_load_optim", "reset_progress") if getattr(ck, name)]
    if ck.load is None and first_run and not ck.from_scratch:
        fail(["checkpoint.load"] + [f"checkpoint.{n}" for n in first_run],
             f"a finetune ({', '.join(first_run)}) must name the checkpoint it starts from: set checkpoint.load "
             f"(e.g. --set checkpoint.load=DIR; `mtf-train ckpt import-hf` makes one from a transformers model), "
             f"or checkpoint.from_scratch: true to train from random weights")
    if ck.load is not None and ck.from_scratch:
        fail(["checkpoint.from_scratch", "checkpoint.load"], "contradicts checkpoint.load: give one of them")
    if s.time_minutes is None:
        fail("cluster.time", f"{r.cluster.time!r} is not a SLURM time ([D-]HH:MM:SS, MM:SS or MM)")
    if t.exit_duration_in_mins is not None and t.exit_duration_in_mins > s.time_minutes - r.cluster.save_margin_mins:
        fail(["training.exit_duration_in_mins", "cluster.time", "cluster.save_margin_mins"], f"{t.exit_duration_in_mins} min leaves less than save_margin_mins "
                                               f"{r.cluster.save_margin_mins} before the {s.time_minutes} min limit")
    if r.cluster.signal_margin_s >= s.time_minutes * 60:
        fail(["cluster.signal_margin_s", "cluster.time"], f"signal_margin_s {r.cluster.signal_margin_s} s is not "
             f"shorter than the time limit {r.cluster.time}")

    # What reaches the job script: #SBATCH values (checked where they are made), variable names.
    directives(r)
    for key in r.environment.env:
        if not ENV_NAME.match(key):
            fail(f"environment.env.{key}", "is not a valid environment variable name")

    # Zero-shot evaluation: names and the job's time limit, checked before a run folder exists.
    zs = r.eval.zero_shot
    from mtf_train.eval.tasks import FAMILIES
    for t in zs.tasks:
        if t not in FAMILIES:
            fail("eval.zero_shot.tasks", f"unknown task {t!r} (known: {', '.join(FAMILIES)})")
    known = sorted({lang for t in (zs.tasks or FAMILIES) for lang in FAMILIES[t].languages})
    for lang in zs.languages:
        if lang not in known:
            fail("eval.zero_shot.languages", f"unknown language {lang!r} (known: {', '.join(known)})")
    if zs.job != "none" and parse_time_minutes(zs.time) is None:
        fail("eval.zero_shot.time", f"{zs.time!r} is not a SLURM time ([D-]HH:MM:SS, MM:SS or MM)")

    # Data.
    d = r.data
    if d.train_path is None and d.train_groups is None:
        fail("data.train_path", "set data.train_path (a weighted split-paths file) or data.train_groups")
    if d.train_path is not None and d.train_groups is not None:
        fail("data.train_groups", "give data.train_path or data.train_groups, not both")
    if d.valid_path is not None and d.valid_groups is not None:
        fail("data.valid_groups", "give data.valid_path or data.valid_groups, not both")
    for name in ("train_path", "valid_path"):
        path = getattr(d, name)
        if path is not None and not os.path.isfile(path):
            fail(f"data.{name}", f"file not found: {path}")
    from mtf_train.recipe.load import path_groups  # parses the files: grammar errors say where
    groups = path_groups(r)
    if check_data:
        check_recipe_data(r, groups, fail)
    return s


def check_recipe_data(r: Recipe, groups, fail) -> None:
    """Every dataset's four files exist and each .idx fits its .bin (headers only: no torch, seconds at most)."""
    from mtf_train.data.errors import DataError
    from mtf_train.data.indexed import KINDS, check_sizes, doc_prefix
    from mtf_train.data.pathfile import missing_files

    d = r.data
    if d.root is not None and not os.path.isdir(d.root):
        fail("data.root", f"folder not found: {d.root}")
    for kind, gs in zip(("train", "valid"), groups):
        field = f"data.{kind}_groups" if getattr(d, f"{kind}_groups") is not None else f"data.{kind}_path"
        # Blame the path file or data.root, whichever was set last (a `--set data.root=...` is likelier at fault).
        field = r.origin.latest([field, "data.root"]) if d.root is not None else field
        missing = missing_files(gs)
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            fail(field, f"dataset file missing: {missing[0]}{more}")
        for prefix in dict.fromkeys(e.prefix for g in gs for e in g.entries):
            for half in KINDS:
                try:
                    check_sizes(doc_prefix(prefix, half))
                except DataError as err:
                    fail(field, err.line())
