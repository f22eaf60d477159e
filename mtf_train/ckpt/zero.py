"""DeepSpeed's ZeRO layout, reproduced without DeepSpeed's engine: which parameters each pipeline stage holds
(`partition_balanced` over the layer specs), the optimizer's parameter groups, and each parameter's place in the
flat groups (aligned to 2 x dp, split in dp partitions). `fragments.check_source_layout` proves it against a
source checkpoint before anything is written with it."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from mtf_train.ckpt.errors import CkptError
from mtf_train.ckpt.source import Source
from mtf_train.train import hf_names


def stage_parts(src: Source, pp: int, tp: int) -> list[int]:
    """DeepSpeed PipelineModule's `parts` (stage boundaries over the layer specs) for `pp` stages."""
    import regex
    from deepspeed.runtime import utils as ds_utils

    specs = hf_names.layer_spec_names(src.num_layers)
    method = src.partition_method.lower()
    if method == "uniform":
        return ds_utils.partition_uniform(num_items=len(specs), num_parts=pp)
    if method.startswith("type:"):
        rx = regex.compile(method.split(":", 1)[1], regex.IGNORECASE)
        weights = []
        for name in specs:
            weights.append(1 if rx.search(name) else 0)
        return ds_utils.partition_balanced(weights=weights, num_parts=pp)
    if method == "parameters":
        counts = [sum(math.prod(shape) // (tp if hf_names.tp_partition_dim(n) is not None else 1)
                      for n, shape in src.full_shapes.items() if hf_names.module_name_to_layer_key(n)[0] == i)
                  for i in range(len(specs))]
        return ds_utils.partition_balanced(weights=counts, num_parts=pp)
    raise CkptError(str(src.ck.path), f"partition method {src.partition_method!r} is not supported by the direct "
                    "method (use --method universal)")


@dataclass
class Slot:
    """One parameter's place in one ZeRO shard file: group, offset of its fragment in the dp partition, the
    range of the parameter's flat shard it holds."""

    group: int
    part_start: int     # offset in the dp partition
    shard_start: int    # offset in the parameter's flat TP shard
    numel: int


@dataclass
class StageLayout:
    stage: int
    tp_rank: int
    groups: list                    # [[(name, shard_shape)]] in optimizer group order
    partition: list = field(default_factory=list)   # per group: partition size
    padding: list = field(default_factory=list)     # per dp rank, per group: padding at the end
    slots: dict = field(default_factory=dict)        # (dp_rank, name) -> Slot


def stage_names(src: Source, parts: list[int], stage: int) -> list[str]:
    """Parameter names of one pipeline stage in module order (tied modules first, then layers)."""
    L = src.num_layers
    lo, hi = parts[stage], parts[stage + 1]
    names = []
    if any(lo <= i < hi for i in (hf_names.EMBED_LAYER, hf_names.lm_head_layer(L))):
        names += [hf_names.TIED_PREFIX + k for k in src.layer_keys[hf_names.EMBED_LAYER]]
    for layer in range(lo, hi):
        if layer in src.layer_keys and layer != hf_names.EMBED_LAYER:
            names += [f"{layer}.{k}" for k in src.layer_keys[layer]]
    return names


def shard_shape(full: tuple, name: str, tp: int, padded_vocab: int | None = None) -> tuple:
    shape = list(full)
    if padded_vocab is not None and name.endswith("word_embeddings.weight"):
        shape[0] = padded_vocab
    dim = hf_names.tp_partition_dim(name)
    if dim is not None:
        shape[dim] //= tp
    return tuple(shape)


def layout(src: Source, tp: int, pp: int, dp: int, padded_vocab: int) -> dict[tuple[int, int], StageLayout]:
    """(stage, tp rank) -> the ZeRO layout DeepSpeed builds for it at this shape."""
    parts = stage_parts(src, pp, tp)
    out = {}
    for stage in range(pp):
        names = stage_names(src, parts, stage)
        shapes = {n: shard_shape(src.full_shapes[n], n, tp, padded_vocab) for n in names}
        # make_optimizer: weight-decay group (matrices) first, then the 1-D parameters.
        groups = [[(n, shapes[n]) for n in names if len(shapes[n]) >= 2],
                  [(n, shapes[n]) for n in names if len(shapes[n]) < 2]]
        groups = [g for g in groups if g]
        for tp_rank in range(tp):
            lay = StageLayout(stage, tp_rank, groups)
            align = 2 * dp
            lay.padding = [[] for _ in range(dp)]
            for gi, group in enumerate(groups):
                total = sum(math.prod(s) for _, s in group)
                part = -(-total // align) * align // dp
                lay.partition.append(part)
                for d in range(dp):
                    left = d * part
                    lay.padding[d].append(part if total <= left else max(0, left + part - total))
                offset = 0
                for name, shape in group:
                    n = math.prod(shape)
                    for d in range(dp):
                        lo, hi = max(offset, d * part), min(offset + n, (d + 1) * part)
                        if lo < hi:
                            lay.slots[(d, name)] = Slot(gi, lo - d * part, lo - offset, hi - lo)
                    offset += n
            out[(stage, tp_rank)] = lay
    return out

