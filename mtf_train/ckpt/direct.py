"""The direct method's writing: the checkpoint the trainer would save at the new shape, tensor by tensor. Layer
files from the merged source layers; client states; optimizer shards laid out first as reserved, sparse files
(`torchzip.SkeletonFile`) and then filled state by state, parameter by parameter."""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

from mtf_train.ckpt.errors import CkptError
from mtf_train.ckpt.fragments import SourceStates, check_source_layout
from mtf_train.ckpt.source import Source, target_padded_vocab
from mtf_train.ckpt.torchzip import SkeletonFile, empty_like_shape, load_small, materialize
from mtf_train.ckpt.zero import layout, shard_shape
from mtf_train.train import hf_names

STATES = ("fp32", "exp_avg", "exp_avg_sq")


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

