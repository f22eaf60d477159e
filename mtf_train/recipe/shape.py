"""The shape a recipe implies: parallel degrees, batch arithmetic, length and time, before any rule is checked.

Validation checks it, the plan builds on it, the data caches and the job take their sizes from it. The
arithmetic is `mtf_train.rules`'; this module only reads the recipe (and a local tokenizer's size). No torch.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from mtf_train import rules
from mtf_train.recipe.runtime import runtime
from mtf_train.recipe.schema import Recipe


def tokenizer_vocab_size(path: str) -> int | None:
    """Vocabulary size of a local HF tokenizer folder, read from tokenizer.json without importing transformers."""
    tj = Path(path) / "tokenizer.json"
    if not tj.is_file():
        return None
    try:
        data = json.loads(tj.read_text())
        vocab = data["model"]["vocab"]
    except (ValueError, KeyError, TypeError):
        return None
    ids = set(vocab.values()) if isinstance(vocab, dict) else set(range(len(vocab)))
    ids.update(t["id"] for t in data.get("added_tokens", []))
    return max(ids) + 1


@dataclass
class Shape:
    """Degrees and batch arithmetic: what validation checks and everything else builds on."""
    world_size: int
    tp: int
    pp: int
    dp: int | None           # None when world_size is not a multiple of tp*pp
    micro: int
    global_batch: int
    grad_accum: int | None
    vocab_size: int | None
    padded_vocab: int | None
    seq_length: int
    max_positions: int
    train_iters: int | None
    train_samples: int | None
    exit_minutes: float | None
    time_minutes: int | None
    device: str              # "gpu" or "cpu"
    zero_stage: int          # the stage the runtime will really use
    units: int               # partitioned units (blocks, plus 2 embedding units for type:transformer|embedding)


def derive_shape(r: Recipe) -> Shape:
    world = r.cluster.nodes * r.cluster.gpus_per_node
    tp, pp = r.parallel.tp, r.parallel.pp
    dp = r.parallel.dp if r.parallel.dp is not None else rules.data_parallel(world, tp, pp)
    micro, gbs = r.batch.micro, r.batch.global_
    accum = rules.grad_accum(gbs, micro, dp)

    m = r.model
    vocab = m.vocab_size or tokenizer_vocab_size(r.data.tokenizer)
    padded = (rules.padded_vocab(vocab or 0, tp, m.make_vocab_size_divisible_by, m.pad_vocab_size_to)
              if vocab is not None or m.pad_vocab_size_to is not None else None)

    # The trainer's own schedule, so that plan, data caches and training agree on the length.
    ru = r.batch.rampup
    batches = rules.BatchSchedule(gbs, (ru.start, ru.increment, ru.samples) if ru else None)
    iters, samples = batches.length(r.training.train_iters, r.training.train_samples)

    time_min = rules.parse_time_minutes(r.cluster.time)
    exit_min = r.training.exit_duration_in_mins
    if exit_min is None and time_min is not None:
        exit_min = max(1, time_min - r.cluster.save_margin_mins)

    zero = r.precision.zero_stage
    if runtime(r).bf16_as_zero1 and r.precision.dtype == "bf16":
        zero = 1  # current DeepSpeed: BF16_Optimizer resumes only as ZeRO-1 + fp32 grad accumulation

    units = rules.partition_units(m.num_layers, r.parallel.partition_method)
    return Shape(world, tp, pp, dp, micro, gbs, accum, vocab, padded, m.seq_length,
                 m.max_position_embeddings or m.seq_length, iters, samples, exit_min, time_min,
                 r.cluster.accelerator, zero, units)
