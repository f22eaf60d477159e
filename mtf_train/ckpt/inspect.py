"""`mtf-train ckpt inspect DIR`: what a checkpoint holds, read from its files (no tensor data is loaded).

Works on mtf-train's checkpoints and on the bigscience Megatron-DeepSpeed layout (2022 client states are read
by `client.ClientState`). The step is verified first (`client.read_checkpoint`): a missing or damaged file is
an error, never a smaller model.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from mtf_train.ckpt.errors import CkptError
from mtf_train.ckpt.layout import Checkpoint, human
from mtf_train.ckpt.torchzip import TorchFile


@dataclass
class Info:
    path: str
    tag: str
    iteration: int | None
    tp: int
    pp: int
    dp: int
    dtype: str
    parameters: int
    num_layers: int | None
    hidden_size: int | None
    num_attention_heads: int | None
    padded_vocab_size: int | None
    original_vocab_size: int | None
    optimizer_states: bool
    optimizer: str | None           # "zero1/2" | "bf16" | None
    zero_stage: int | None
    universal_info: bool            # universal_checkpoint_info saved with the checkpoint
    universal: str | None           # folder of the universal form, when one exists
    consumed_train_samples: int | None
    form: str = "mtf-train"         # client state: "mtf-train" | "megatron-deepspeed-2022"
    sizes: dict = field(default_factory=dict)  # bytes: layers, optimizer, client, total

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def text(self) -> str:
        s = self.sizes
        lines = [
            f"checkpoint   {self.path} ({self.tag}, {self.form} client state)",
            f"iteration    {self.iteration}" + (f", {self.consumed_train_samples:,} samples consumed"
                                                 if self.consumed_train_samples is not None else ""),
            f"shape        tp {self.tp} x pp {self.pp} x dp {self.dp} (world {self.tp * self.pp * self.dp})",
            f"model        {self.parameters:,} parameters, {self.dtype}"
            + (f", {self.num_layers} layers, hidden {self.hidden_size}, {self.num_attention_heads} heads"
               if self.num_layers else "")
            + (f", vocab {self.original_vocab_size} padded to {self.padded_vocab_size}"
               if self.padded_vocab_size else ""),
            "optimizer    " + (f"{self.optimizer} states (ZeRO stage {self.zero_stage})" if self.optimizer_states
                               else "none (model weights only)"),
            "universal    " + (self.universal if self.universal else "none")
            + ("" if self.universal_info else " (no universal_checkpoint_info: BLOOM patterns are supplied on "
                                               "conversion)"),
            f"size         {human(s['total'])}: layers {human(s['layers'])}, optimizer {human(s['optimizer'])}, "
            f"client state {human(s['client'])}",
        ]
        return "\n".join(lines)


def count_parameters(ck: Checkpoint, torch_free: bool) -> tuple[int, str]:
    """Parameters of the full model (TP shards summed, replicated ones once) and the weights' dtype."""
    from mtf_train.train.hf_names import tp_partition_dim

    total, dtype = 0, None
    for (layer, tp_rank), path in sorted(ck.layer_files.items()):
        with TorchFile(path) as tf:
            sd = tf.load(torch_free=torch_free)
        if not isinstance(sd, dict):
            raise CkptError(str(path), "not a layer state dict")
        for name, t in sd.items():
            if not hasattr(t, "numel"):
                continue
            dtype = dtype or str(t.dtype).replace("torch.", "")
            try:
                dim = tp_partition_dim(name)
            except KeyError:
                dim = 0
            if dim is not None or tp_rank == 0:
                total += t.numel()
    return total, dtype or "?"


def optimizer_kind(ck: Checkpoint, torch_free: bool) -> tuple[str | None, int | None]:
    if not ck.optim_files:
        return None, None
    with TorchFile(next(iter(ck.optim_files.values()))) as tf:
        sd = tf.load(torch_free=torch_free)
    osd = sd.get("optimizer_state_dict", {}) if isinstance(sd, dict) else {}
    stage = osd.get("zero_stage")
    stage = int(getattr(stage, "value", stage)) if stage is not None else (0 if ck.bf16_optim else None)
    return ("bf16" if ck.bf16_optim or "loss_scaler" not in osd else "zero"), stage


def inspect_checkpoint(folder, step: int | None = None, check: bool = True) -> Info:
    """Read without torch (seconds of import on a login node); a file that names a torch global the torch-free
    reader has no stand-in for is read with torch."""
    from mtf_train.ckpt.torchzip import NeedsTorch

    try:
        return _inspect(folder, step, check, torch_free=True)
    except NeedsTorch:
        from mtf_train.ckpt.accelerator import prepare_deepspeed

        prepare_deepspeed()
        return _inspect(folder, step, check, torch_free=False)


def _inspect(folder, step: int | None, check: bool, torch_free: bool) -> Info:
    from mtf_train.ckpt.client import read_checkpoint

    ck, client = read_checkpoint(folder, step, check=check, torch_free=torch_free)
    args = client.args
    params, dtype = count_parameters(ck, torch_free)
    opt, stage = optimizer_kind(ck, torch_free)
    sizes = {"layers": sum(p.stat().st_size for p in ck.layer_files.values()),
             "optimizer": sum(p.stat().st_size for p in ck.optim_files.values()),
             "client": sum(p.stat().st_size for p in ck.mp_files.values())}
    sizes["total"] = sum(sizes.values())
    uni = ck.universal_path
    return Info(
        path=str(ck.path), tag=ck.tag, iteration=client.iteration if client.iteration is not None else ck.iteration,
        tp=ck.tp, pp=ck.pp, dp=ck.dp, dtype=dtype, parameters=params,
        num_layers=args.get("num_layers"), hidden_size=args.get("hidden_size"),
        num_attention_heads=args.get("num_attention_heads"),
        padded_vocab_size=client.padded_vocab_size, original_vocab_size=client.original_vocab_size,
        optimizer_states=bool(ck.optim_files), optimizer=opt, zero_stage=stage,
        universal_info=bool(client.raw.get("universal_checkpoint_info")),
        universal=str(uni) if uni else None,
        consumed_train_samples=client.consumed_train_samples, form=client.form,
        sizes=sizes,
    )
