"""`mtf-train ckpt reshape DIR --tp T --pp P [--dp D] -o OUT`: a checkpoint at another shape, verified.

The direct method writes the ordinary checkpoint the trainer would save at the new shape, tensor by tensor:
for every parameter and every state (fp32 master weights, Adam's exp_avg and exp_avg_sq) it reads the source
fragments out of the ZeRO shards (`layout.TorchFile`, no whole-file loads), merges them over tensor ranks with
BLOOM's rules (`hf_names`: replicated ones averaged, row-parallel on dim 1, the rest on dim 0; vocabulary
padding re-cut when the padded size changes), splits them for the new tensor ranks and writes each piece into
its place in the new ZeRO shards, which were laid out first as reserved, sparse files (`layout.SkeletonFile`).
The layout of the new shards is DeepSpeed's own (stage partitioning by `partition_balanced`, the optimizer's
parameter groups, flat groups aligned to 2 x dp and split in dp partitions); before writing anything, the
same code must reproduce the source checkpoint's recorded layout exactly, or it refuses. Memory stays at about
twice the largest parameter, whatever the checkpoint's size.

The universal method is DeepSpeed's route: `to-universal` into a scratch folder, then the model loads it at
the new shape (`worker resave`) and saves an ordinary checkpoint.

Either way OUT resumes plainly (`--load OUT`, no universal flag): `latest`, the client state's iteration and
consumed samples, and its args with the new shape. Verification then runs the real model at both shapes on a
fixed batch (`verify.py`): loss and logits equal within the dtype's tolerance, and after one training step on
the same batch with the same learning rate the loss and logits still agree, which only holds if the
optimizer's states came along. OUT appears (renamed from a scratch sibling) only after all of it passed.
"""
from __future__ import annotations

import math
import os
import shutil
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from mtf_train import rules
from mtf_train.ckpt.layout import (Checkpoint, CkptError, SkeletonFile, TorchFile, VerifyError,
                                   empty_like_shape, human, load_small, mem_available, staged)
from mtf_train.train import hf_names

STATES = ("fp32", "exp_avg", "exp_avg_sq")
# what the trainer itself puts in the client state (checkpoint.save); DeepSpeed adds the rest
RECUT_TOLERANCE = (1e-3, 1e-2)  # losses, logits: when the padded vocabulary size changes with TP
TRAINER_KEYS = ("iteration", "consumed_train_samples", "consumed_valid_samples", "args", "padded_vocab_size",
                "original_vocab_size")


# --- what the checkpoint is -------------------------------------------------------------------------------


@dataclass
class Source:
    ck: Checkpoint
    client: dict                    # mp_rank_00's full state (small), as saved
    state: "ClientState"            # the same, read (either form)
    args: dict
    num_layers: int
    hidden_size: int
    num_heads: int
    padded_vocab: int
    original_vocab: int
    dtype: str                      # "float32" | "bfloat16" | "float16": what the model computes in
    full_shapes: dict = field(default_factory=dict)   # module name -> full (TP-merged) shape
    layer_keys: dict = field(default_factory=dict)    # layer -> [keys] in file order

    @property
    def partition_method(self) -> str:
        return self.args.get("pp_partition_method") or "type:transformer|embedding"

    def model_spec(self, padded_vocab: int | None = None) -> dict:
        a = self.args
        return dict(num_layers=self.num_layers, hidden_size=self.hidden_size, num_heads=self.num_heads,
                    padded_vocab_size=padded_vocab or self.padded_vocab, original_vocab_size=self.original_vocab,
                    layernorm_epsilon=a.get("layernorm_epsilon", 1e-5), init_std=a.get("init_method_std", 0.02))


def read_source(folder, step: int | None = None) -> Source:
    from mtf_train.ckpt.client import read_checkpoint

    ck, state = read_checkpoint(folder, step)
    client = load_small(ck.mp_files[0])
    args = state.args
    missing = [k for k in ("num_layers", "hidden_size", "num_attention_heads") if not isinstance(args.get(k), int)]
    if missing:
        raise CkptError(str(ck.mp_files[0]), f"the saved args lack {', '.join(missing)}")
    L = args["num_layers"]
    # Shapes from the layer files (every layer at every tensor rank; only the pickles are read).
    shapes: dict[str, list] = {}
    layer_keys: dict[int, list] = {}
    for (layer, tp_rank), path in sorted(ck.layer_files.items()):
        with TorchFile(path) as tf:
            sd = tf.load()
        if not isinstance(sd, dict):
            raise CkptError(str(path), "not a layer state dict")
        if tp_rank == 0:
            layer_keys[layer] = list(sd)
        for key, t in sd.items():
            shapes.setdefault(hf_names.layer_key_to_module_name(layer, key, L), []).append(tuple(t.shape))
    full = {}
    for name, per_tp in shapes.items():
        dim = hf_names.tp_partition_dim(name)
        shape = list(per_tp[0])
        if dim is not None:
            shape[dim] = sum(s[dim] for s in per_tp)
        full[name] = tuple(shape)
    expected = set(hf_names.expected_module_names(L))
    if set(full) != expected:
        odd = sorted(set(full) ^ expected)[:3]
        raise CkptError(str(ck.path), f"not a BLOOM checkpoint of {L} layers (unexpected or missing: {odd})")
    padded = full[hf_names.TIED_PREFIX + "word_embeddings.weight"][0]
    original = state.original_vocab_size or padded
    ds_cfg = client.get("ds_config") or {}
    dtype = ("bfloat16" if (ds_cfg.get("bf16") or {}).get("enabled") or args.get("bf16") else
             "float16" if (ds_cfg.get("fp16") or {}).get("enabled") or args.get("fp16") else "float32")
    return Source(ck=ck, client=client, state=state, args=args, num_layers=L, hidden_size=args["hidden_size"],
                  num_heads=args["num_attention_heads"], padded_vocab=padded, original_vocab=int(original),
                  dtype=dtype, full_shapes=full, layer_keys=layer_keys)


def target_padded_vocab(src: Source, tp: int) -> int:
    """What the trainer computes at TP `tp` (rules.padded_vocab), from the saved args."""
    a = src.args
    pad_to = int(a["pad_vocab_size_to"]) if a.get("pad_vocab_size_to") else None
    if pad_to is None and (src.original_vocab == src.padded_vocab or not a.get("make_vocab_size_divisible_by")):
        padded = src.padded_vocab  # no tokenizer size known: keep the rows as they are
    else:
        padded = rules.padded_vocab(src.original_vocab, tp, int(a.get("make_vocab_size_divisible_by") or 1), pad_to)
    if padded % tp:
        raise CkptError("--tp", f"the padded vocabulary ({padded}) does not split over {tp} tensor ranks")
    return padded


def check_shape(src: Source, tp: int, pp: int, dp: int) -> None:
    for name, v in (("--tp", tp), ("--pp", pp), ("--dp", dp)):
        if v < 1:
            raise CkptError(name, f"must be at least 1, not {v}")
    if src.num_heads % tp:
        raise CkptError("--tp", f"{src.num_heads} attention heads are not divisible by tensor parallel size {tp}")
    for name, shape in src.full_shapes.items():
        dim = hf_names.tp_partition_dim(name)
        if dim is not None and "word_embeddings" not in name and shape[dim] % tp:
            raise CkptError("--tp", f"{name} ({shape[dim]} on dim {dim}) does not split over {tp} tensor ranks")
    units = rules.partition_units(src.num_layers, src.partition_method)
    if pp > units:
        raise CkptError("--pp", f"{pp} pipeline stages exceed the {units} units partitioned by "
                        f"{src.partition_method!r}")


# --- DeepSpeed's layout, reproduced -------------------------------------------------------------------------


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


# --- reading the source's optimizer fragments ----------------------------------------------------------------


class SourceStates:
    """Full (TP-merged) fp32 master weights and Adam states of each parameter, read fragment by fragment."""

    def __init__(self, src: Source):
        self.src = src
        ck = src.ck
        if not ck.optim_files:
            raise CkptError(str(ck.path), "no optimizer states (a ZeRO-0 or weights-only checkpoint): reshape "
                            "carries them; use export-hf / import-hf for weights only")
        self.files, self.sd = {}, {}
        for (d, mp), path in ck.optim_files.items():
            tf = TorchFile(path)
            sd = tf.load()
            osd = sd.get("optimizer_state_dict") if isinstance(sd, dict) else None
            if not isinstance(osd, dict) or "param_slice_mappings" not in osd:
                raise CkptError(str(path), "not a DeepSpeed ZeRO-1/2 or BF16 optimizer shard (no param_slice_mappings)")
            self.files[(d, mp)] = tf
            self.sd[(d, mp)] = sd
        first = self.sd[(0, 0)]["optimizer_state_dict"]
        self.bf16 = "loss_scaler" not in first
        # where each parameter lives: its first pipeline stage (the tied embedding: stage 0)
        self.home: dict[str, tuple[int, int]] = {}
        for stage in range(ck.pp):
            osd = self.sd[(0, ck.mp_rank(stage, 0))]["optimizer_state_dict"]
            for g, mapping in enumerate(osd["param_slice_mappings"]):
                for name in mapping:
                    self.home.setdefault(name, (stage, g))
        for stage in range(ck.pp):  # a parameter split over dp ranks may be absent from dp rank 0's mapping
            for d in range(ck.dp):
                osd = self.sd[(d, ck.mp_rank(stage, 0))]["optimizer_state_dict"]
                for g, mapping in enumerate(osd["param_slice_mappings"]):
                    for name in mapping:
                        self.home.setdefault(name, (stage, g))

    def close(self):
        for tf in self.files.values():
            tf.close()

    def step(self, group: int):
        st = self.sd[(0, 0)]["optimizer_state_dict"]["base_optimizer_state"].get("state") or {}
        s = st.get(group, {}).get("step")
        return s.load() if hasattr(s, "load") else s

    def _flat(self, osd: dict, state: str, group: int):
        if state == "fp32":
            return osd["single_partition_of_fp32_groups"][group]
        st = osd["base_optimizer_state"].get("state") or {}
        return st[group][state] if group in st else None

    def shard(self, name: str, state: str, tp_rank: int, shape: tuple):
        """One TP rank's shard of a parameter's state, from all dp partitions."""
        import torch

        stage, g = self.home[name]
        mp = self.src.ck.mp_rank(stage, tp_rank)
        pieces = []
        for d in range(self.src.ck.dp):
            osd = self.sd[(d, mp)]["optimizer_state_dict"]
            frag = osd["param_slice_mappings"][g].get(name)
            if frag is None:
                continue
            flat = self._flat(osd, state, g)
            if flat is None:
                return None
            pieces.append(flat.read(frag.start, frag.numel))
        data = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
        if data.numel() != math.prod(shape):
            raise CkptError(str(self.src.ck.path), f"{name}: optimizer fragments hold {data.numel()} elements, "
                            f"the parameter {math.prod(shape)}")
        return data.view(shape)

    def full(self, name: str, state: str, shard_shapes: list):
        """The TP-merged state (None when the optimizer has not stepped yet)."""
        shards = [self.shard(name, state, t, shard_shapes[t]) for t in range(self.src.ck.tp)]
        if shards[0] is None:
            return None
        return hf_names.merge_tensor(name, shards)


def check_source_layout(src: Source, states: SourceStates) -> None:
    """Our layout model must reproduce the source's recorded layout, else the direct method refuses."""
    ck = src.ck
    lay = layout(src, ck.tp, ck.pp, ck.dp, src.padded_vocab)
    for (stage, t), sl in lay.items():
        mp = ck.mp_rank(stage, t)
        for d in range(ck.dp):
            osd = states.sd[(d, mp)]["optimizer_state_dict"]
            recorded = [[(n, f.start, f.numel) for n, f in m.items()] for m in osd["param_slice_mappings"]]
            ours = [[(n, s.part_start, s.numel) for n, s in
                     sorted(((n, sl.slots[(d, n)]) for n, _ in grp if (d, n) in sl.slots),
                            key=lambda x: x[1].part_start)] for grp in sl.groups]
            if recorded != ours or list(osd["group_paddings"]) != sl.padding[d]:
                raise CkptError(str(ck.optim_file(d, stage, t)),
                                "its ZeRO layout is not the one mtf-train's model gives at this shape; use "
                                "--method universal")


# --- writing ---------------------------------------------------------------------------------------------------


def vocab_rows(t, padded: int, original: int):
    """Re-cut the padding rows of a vocabulary tensor: keep them when the padded size is unchanged, else keep
    the real rows and pad with zeros (what DeepSpeed's universal loading does)."""
    import torch

    if t.shape[0] == padded:
        return t
    t = t[:original]
    return torch.cat([t, t.new_zeros((padded - original, *t.shape[1:]))]) if padded > original else t[:padded]


def new_args(src: Source, tp: int, pp: int, out: Path, padded: int) -> dict:
    a = {k: v for k, v in src.args.items()  # progress lives at the top level in our form
         if k not in ("consumed_train_samples", "consumed_valid_samples", "consumed_train_tokens")}
    a.update(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, load=str(out), save=str(out),
             universal_checkpoint=False)
    if "padded_vocab_size" in a:
        a["padded_vocab_size"] = padded
    return a


def client_state(src: Source, tp: int, pp: int, dp: int, out: Path, padded: int) -> dict:
    """The trainer's client state at the new shape (mp_rank files), in mtf-train's form whatever the source's:
    progress kept, RNG states dropped (the new ranks seed themselves, as after a universal load)."""
    from mtf_train.ckpt.client import ClientState

    c = ClientState.read(src.client).ours()
    c.pop("rng_state", None)
    c["args"] = new_args(src, tp, pp, out, padded)
    c["padded_vocab_size"] = padded
    c["original_vocab_size"] = src.original_vocab
    if not c.get("universal_checkpoint_info"):
        from types import SimpleNamespace

        from mtf_train.train.model import universal_checkpoint_info

        c["universal_checkpoint_info"] = universal_checkpoint_info(
            SimpleNamespace(original_vocab_size=src.original_vocab, padded_vocab_size=padded))
    return c


def write_direct(src: Source, tp: int, pp: int, dp: int, dest: Path, final_out: Path, progress=None) -> dict:
    """Write the checkpoint at (tp, pp, dp) into `dest` (a checkpoint root); returns byte counts."""
    import torch

    from mtf_train.ckpt.layout import materialize
    from mtf_train.train import checkpoint as trainer_ckpt

    ck = src.ck
    padded = target_padded_vocab(src, tp)
    states = SourceStates(src)
    try:
        check_source_layout(src, states)
        lay = layout(src, tp, pp, dp, padded)
        step_dir = dest / ck.tag
        step_dir.mkdir(parents=True)
        written = 0
        L = src.num_layers

        # 1. layer files: weights as the module holds them (from the source layer files).
        for layer in ck.layers:
            shards = [load_small(ck.layer_files[(layer, t)]) for t in range(ck.tp)]
            merged = {}
            for key in shards[0]:
                full = hf_names.merge_tensor(key, [s[key] for s in shards])
                if key == "word_embeddings.weight":
                    full = vocab_rows(full, padded, src.original_vocab)
                merged[key] = full
            del shards
            for t in range(tp):
                out = {k: hf_names.split_tensor(k, v, tp, t).clone() for k, v in merged.items()}
                path = step_dir / f"layer_{layer:02d}-model_{t:02d}-model_states.pt"
                torch.save(out, path)
                written += path.stat().st_size
            if progress:
                progress(f"layer {layer:02d}")

        # 2. client state per (stage, tp rank)
        client = client_state(src, tp, pp, dp, final_out, padded)
        for (stage, t), sl in lay.items():
            c = dict(client)
            c["param_shapes"] = [OrderedDict((n, torch.Size(s)) for n, s in grp) for grp in sl.groups]
            c["mp_world_size"] = tp * pp
            c["dp_world_size"] = dp
            if "checkpoint_parallel_dimensions" in c:
                c["checkpoint_parallel_dimensions"] = {"pp_degree": pp, "tp_degree": tp}
            path = step_dir / f"mp_rank_{stage * tp + t:02d}_model_states.pt"
            torch.save(c, path)
            written += path.stat().st_size

        # 3. optimizer shards: skeletons first (sparse, nothing in memory), then every state tensor by tensor.
        from deepspeed.utils.tensor_fragment import fragment_address

        first = states.sd[(0, 0)]
        fosd = first["optimizer_state_dict"]
        base_groups = fosd["base_optimizer_state"]["param_groups"]
        has_state = bool(fosd["base_optimizer_state"].get("state"))
        prefix = "bf16_" if ck.bf16_optim else ""
        files: dict[tuple[int, int, int], SkeletonFile] = {}
        try:
            for (stage, t), sl in lay.items():
                if len(sl.groups) != len(base_groups):
                    raise CkptError(str(ck.path), f"stage {stage} at the new shape has {len(sl.groups)} optimizer "
                                    f"groups, the source {len(base_groups)}")
                for d in range(dp):
                    osd = {k: materialize(v) for k, v in fosd.items()
                           if k not in ("base_optimizer_state", "single_partition_of_fp32_groups",
                                        "param_slice_mappings")}
                    osd["base_optimizer_state"] = {
                        "state": ({g: {"step": states.step(g).clone() if torch.is_tensor(states.step(g))
                                       else states.step(g),
                                       "exp_avg": empty_like_shape([sl.partition[g]], torch.float32),
                                       "exp_avg_sq": empty_like_shape([sl.partition[g]], torch.float32)}
                                   for g in range(len(sl.groups))} if has_state else {}),
                        "param_groups": [dict(pg, params=[g]) for g, pg in enumerate(base_groups)],
                    }
                    unpadded = [sl.partition[g] - (0 if states.bf16 else sl.padding[d][g])
                                for g in range(len(sl.groups))]
                    osd["single_partition_of_fp32_groups"] = [empty_like_shape([n], torch.float32) for n in unpadded]
                    osd["group_paddings"] = list(sl.padding[d])
                    if "param_alignment_paddings" in fosd:
                        osd["param_alignment_paddings"] = [[0] * len(grp) for grp in sl.groups]
                    osd["partition_count"] = [dp] * len(sl.groups)
                    mappings = [OrderedDict() for _ in sl.groups]
                    for g, grp in enumerate(sl.groups):
                        for name, _ in grp:
                            s = sl.slots.get((d, name))
                            if s is not None:
                                mappings[g][name] = fragment_address(numel=s.numel, start=s.part_start)
                    osd["param_slice_mappings"] = mappings
                    obj = {k: (osd if k == "optimizer_state_dict" else materialize(v)) for k, v in first.items()}
                    path = step_dir / f"{prefix}zero_pp_rank_{d}_mp_rank_{stage * tp + t:02d}_optim_states.pt"
                    files[(stage, t, d)] = SkeletonFile(path, obj)
                    if has_state:  # the step counts (skip_data reserved them too)
                        lz = files[(stage, t, d)].lazy["optimizer_state_dict"]["base_optimizer_state"]["state"]
                        for g in lz:
                            if hasattr(lz[g]["step"], "read"):
                                files[(stage, t, d)].write(lz[g]["step"], 0, osd["base_optimizer_state"]["state"][g]["step"])

            where = {}  # name -> [(stage, t)] at the new shape
            for (stage, t), sl in lay.items():
                for grp in sl.groups:
                    for name, _ in grp:
                        where.setdefault(name, []).append((stage, t))
            for name in hf_names.expected_module_names(L):
                shapes_src = [shard_shape(src.full_shapes[name], name, ck.tp) for _ in range(ck.tp)]
                for state in STATES:
                    full = states.full(name, state, shapes_src)
                    if full is None:
                        continue
                    if name.endswith("word_embeddings.weight"):
                        full = vocab_rows(full, padded, src.original_vocab)
                    for t in range(tp):
                        piece = hf_names.split_tensor(name, full, tp, t).reshape(-1)
                        for stage, t2 in where[name]:
                            if t2 != t:
                                continue
                            sl = lay[(stage, t)]
                            for d in range(dp):
                                s = sl.slots.get((d, name))
                                if s is None:
                                    continue
                                f = files[(stage, t, d)]
                                osd = f.lazy["optimizer_state_dict"]
                                dst = (osd["single_partition_of_fp32_groups"][s.group] if state == "fp32"
                                       else osd["base_optimizer_state"]["state"][s.group][state])
                                f.write(dst, s.part_start, piece[s.shard_start:s.shard_start + s.numel])
                        del piece
                    del full
                if progress:
                    progress(name)
        finally:
            for f in files.values():
                f.close()
        written += sum(p.stat().st_size for p in step_dir.glob("*optim_states.pt"))
        trainer_ckpt.write_latest(dest, ck.tag)
        return {"written": written, "padded_vocab": padded}
    finally:
        states.close()


# --- orchestration -----------------------------------------------------------------------------------------


def verify_spec(src: Source, mode: str, folder: Path, tag: str, tp: int, pp: int, dp: int, rows: int,
                padded: int, universal: bool = False, **extra) -> dict:
    a = src.args
    ds_cfg = dict(src.client.get("ds_config") or {})
    if src.dtype == "bfloat16" and not (ds_cfg.get("zero_optimization") or {}).get("stage"):
        # 2022's bf16 + ZeRO-0 (BF16_Optimizer) does not reload with current DeepSpeed; ZeRO-1 with fp32
        # gradient accumulation builds the same optimizer and reads the same files
        ds_cfg = {}
    if not ds_cfg:
        ds_cfg = {"zero_optimization": {"stage": 1}, "gradient_clipping": a.get("clip_grad", 1.0)}
        if src.dtype == "bfloat16":
            ds_cfg.update(bf16={"enabled": True}, data_types={"grad_accum_dtype": "fp32"})
    return dict(
        mode=mode, load=str(folder) if folder else None, tag=tag, universal=universal, tp=tp, pp=pp, dp=dp,
        model=src.model_spec(padded), norm_target_loss=bool(a.get("norm_target_loss")),
        partition_method=src.partition_method, seed=int(a.get("seed") or 1234), ds_config=ds_cfg,
        optimizer=dict(lr=float(a.get("lr") or 1e-4), weight_decay=float(a.get("weight_decay", 0.01)),
                       beta1=float(a.get("adam_beta1", 0.9)), beta2=float(a.get("adam_beta2", 0.999)),
                       eps=float(a.get("adam_eps", 1e-8))),
        step_lr=float(a.get("lr") or 1e-4),
        batch=dict(rows=rows, seq=min(int(a.get("seq_length") or 128), 128), vocab=src.original_vocab, seed=1234),
        **extra)


def estimate_fits(src: Source, tp: int, pp: int, dp: int) -> tuple[bool, str]:
    """Can both verification runs happen on this machine? Each holds the whole model and optimizer state
    (about the checkpoint's size, more at dp > 1) plus a process per rank."""
    size = sum(p.stat().st_size for p in src.ck.files())
    per_process = 600 << 20
    need = int(size * 1.6) * max(1, dp, src.ck.dp) + per_process * max(tp * pp * dp, src.ck.tp * src.ck.pp * src.ck.dp)
    avail = mem_available()
    cpus = os.cpu_count() or 1
    world = max(tp * pp * dp, src.ck.tp * src.ck.pp * src.ck.dp)
    if need > avail * 0.8:
        return False, f"verification needs about {human(need)} of memory, {human(avail)} is available"
    if world > max(8, 4 * cpus):
        return False, f"verification needs {world} processes, this machine has {cpus} CPUs"
    return True, ""


def reshape(folder, *, tp: int, pp: int, dp: int = 1, output, step: int | None = None, method: str = "direct",
            verify: bool = True, recipe: str | None = None, sets=(), job: str | None = None,
            here: bool = False) -> int:
    from mtf_train.ckpt.layout import check_output

    out = Path(output).resolve()
    src = read_source(folder, step)
    check_shape(src, tp, pp, dp)
    check_output(out)
    padded = target_padded_vocab(src, tp)
    ck = src.ck
    shape_from = f"tp {ck.tp} x pp {ck.pp} x dp {ck.dp}"
    shape_to = f"tp {tp} x pp {pp} x dp {dp}"
    fits, why = (True, "") if here else estimate_fits(src, tp, pp, dp)
    if job or (not fits and (verify or method == "universal")):
        if not job and not recipe:
            raise CkptError(str(ck.path), f"too large for this machine ({why}): pass --recipe RECIPE (and --job "
                            "FILE) to render the reshape as a job for the recipe's cluster, or --no-verify with "
                            "--method direct")
        from mtf_train.ckpt.jobs import render_reshape_job

        path = render_reshape_job(src, tp=tp, pp=pp, dp=dp, out=out, method=method, verify=verify, recipe=recipe,
                                  sets=sets, job=job)
        print(f"{ck.path} ({shape_from}) -> {out} ({shape_to}): {why or 'job requested'}; rendered {path}\n"
              f"submit it with: sbatch {path}")
        return 0

    size = sum(p.stat().st_size for p in ck.files())
    print(f"reshape {ck.path} ({shape_from}, iteration {src.client.get('iteration', ck.iteration)}, "
          f"{human(size)}) -> {out} ({shape_to}), method {method}", flush=True)
    t0 = time.perf_counter()
    import tempfile

    scratch = Path(tempfile.mkdtemp(prefix="mtf-ckpt-"))  # logs of the runs: kept only when one fails
    with staged(out) as tmp:
        if method == "direct":
            bar = _Progress(len(ck.layers) + len(src.full_shapes))
            stats = write_direct(src, tp, pp, dp, tmp, out, progress=bar)
            bar.close()
            took = time.perf_counter() - t0
            print(f"wrote {human(stats['written'])} in {took:.1f} s ({size / took / 1e9:.3f} GB/s read)", flush=True)
        else:
            import torch

            from mtf_train.ckpt.universal import to_universal

            uni = to_universal(ck.path, output_root=scratch / "universal", quiet=True,
                               keep_vocab_padding=padded == src.padded_vocab)
            client = {k: v for k, v in client_state(src, tp, pp, dp, out, padded).items() if k in TRAINER_KEYS}
            torch.save(client, scratch / "client.pt")
            spec = verify_spec(src, "resave", uni.parent, uni.name, tp, pp, dp, rows=2 * math.lcm(dp, ck.dp),
                               padded=padded, universal=True, save=str(tmp), client=str(scratch / "client.pt"))
            spec["save_tag"] = ck.tag
            from mtf_train.ckpt.verify import run_worker

            run_worker(dict(spec, steps=False), scratch, label="resave")
            print(f"loaded the universal form at {shape_to} and saved in {time.perf_counter() - t0:.1f} s",
                  flush=True)
        if verify:
            rows = 2 * math.lcm(dp, ck.dp)
            print(f"verifying with the model at {shape_from} and at {shape_to} ...", flush=True)
            ref = run_probe(src, ck.root, ck.tag, ck.tp, ck.pp, ck.dp, rows, src.padded_vocab, scratch, "source")
            got = run_probe(src, tmp, ck.tag, tp, pp, dp, rows, padded, scratch, "reshaped")
            from mtf_train.ckpt.verify import compare

            recut = padded != src.padded_vocab
            if recut:
                print(f"  the padded vocabulary changes ({src.padded_vocab} -> {padded}): its padding rows are re-cut, "
                      f"which moves the softmax a little; losses are compared at {RECUT_TOLERANCE[0]:.0e}")
            lines = compare(ref, got, src.dtype, src.original_vocab, str(out),
                            tolerance=RECUT_TOLERANCE if recut else None)
            print("\n".join(lines))
            if got.get("iteration") != ref.get("iteration"):
                raise VerifyError(str(out), f"iteration {got.get('iteration')} after loading, expected "
                                  f"{ref.get('iteration')}")
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"done: {out} resumes with --load {out} at {shape_to} ({time.perf_counter() - t0:.1f} s)")
    return 0


def run_probe(src: Source, folder: Path, tag: str, tp: int, pp: int, dp: int, rows: int, padded: int,
              scratch: Path, label: str) -> dict:
    from mtf_train.ckpt.verify import run_worker

    spec = verify_spec(src, "probe", folder, tag, tp, pp, dp, rows=rows, padded=padded)
    return run_worker(spec, scratch, label=label)


class _Progress:
    """A one-line progress bar on stderr (only when it is a terminal)."""

    def __init__(self, total: int):
        self.total, self.done, self.t0 = total, 0, time.perf_counter()
        self.on = sys.stderr.isatty()

    def __call__(self, what: str):
        self.done += 1
        if self.on:
            n = int(30 * self.done / max(1, self.total))
            sys.stderr.write(f"\r[{'#' * n}{'.' * (30 - n)}] {self.done}/{self.total} {what[:40]:40s}")
            sys.stderr.flush()

    def close(self):
        if self.on:
            sys.stderr.write("\n")
