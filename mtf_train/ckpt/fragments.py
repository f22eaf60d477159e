"""The source checkpoint's optimizer states (fp32 master weights, Adam's moments), read fragment by fragment out
of its ZeRO shards and merged over tensor ranks: memory stays at about one parameter."""
from __future__ import annotations

import math

from mtf_train.ckpt.errors import CkptError
from mtf_train.ckpt.source import Source
from mtf_train.ckpt.torchzip import TorchFile
from mtf_train.ckpt.zero import layout
from mtf_train.train import hf_names


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

