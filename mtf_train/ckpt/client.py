"""The client state of a checkpoint (`mp_rank_*_model_states.pt`), in either form, read one way.

Two forms exist:
- mtf-train's: top-level `iteration`, `consumed_train_samples`, `consumed_valid_samples` (per validation
  group), `padded_vocab_size`, `original_vocab_size`, `rng_state` {random, numpy, torch, cuda, tracker} and
  `args` as a plain dict;
- 2022 Megatron-DeepSpeed's (`t0loading`): `args` is the trainer's `argparse.Namespace` and carries the
  progress (`consumed_train_samples`, `consumed_valid_samples`, `consumed_train_tokens`); beside it
  `checkpoint_version`, `iteration`, `tokens`, `checkpoint_info` {`padded_vocab_size`, `original_vocab_size`}
  and the RNG states as `random_rng_state`, `np_rng_state`, `torch_rng_state`, `cuda_rng_state`,
  `rng_tracker_states`.
`ClientState.read` gives progress, RNG, vocabulary sizes and the model's shape from either; `ours()` is the
mtf-train form of the same facts (what every tool writes).
"""
from __future__ import annotations

import enum
from argparse import Namespace
from dataclasses import dataclass, field

LEGACY_RNG_KEYS = {"random_rng_state": "random", "np_rng_state": "numpy", "torch_rng_state": "torch",
                   "cuda_rng_state": "cuda", "rng_tracker_states": "tracker"}
LEGACY_KEYS = ("checkpoint_version", "tokens", "checkpoint_info", *LEGACY_RNG_KEYS)


def plain(value):
    """Enums by name and dtypes by name, so that what we write back unpickles without the 2022 classes."""
    if isinstance(value, enum.Enum):
        return value.name
    if type(value).__name__ == "dtype" and type(value).__module__ == "torch":
        return str(value).replace("torch.", "")
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(plain(v) for v in value)
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


@dataclass
class ClientState:
    raw: dict
    form: str                                   # "mtf-train" | "megatron-deepspeed-2022"
    args: dict = field(default_factory=dict)    # plain values
    iteration: int | None = None
    consumed_train_samples: int = 0
    consumed_valid_samples: dict | int = field(default_factory=dict)  # int: one counter for every group (2022)
    consumed_train_tokens: int | None = None
    padded_vocab_size: int | None = None
    original_vocab_size: int | None = None
    rng: dict | None = None                     # {random, numpy, torch, cuda, tracker}

    @classmethod
    def read(cls, raw: dict) -> "ClientState":
        raw = dict(raw or {})
        args = raw.get("args")
        legacy = isinstance(args, Namespace) or "checkpoint_info" in raw or "random_rng_state" in raw
        args = plain(dict(vars(args)) if isinstance(args, Namespace) else dict(args or {}))
        st = cls(raw=raw, form="megatron-deepspeed-2022" if legacy else "mtf-train", args=args)
        it = raw.get("iteration")
        st.iteration = int(it) if isinstance(it, int) else None
        info = raw.get("checkpoint_info") or {}
        uci = raw.get("universal_checkpoint_info") or {}

        def first(*values):
            return next((v for v in values if v is not None), None)

        st.consumed_train_samples = int(first(raw.get("consumed_train_samples"),
                                              args.get("consumed_train_samples"), 0))
        valid = first(raw.get("consumed_valid_samples"), args.get("consumed_valid_samples"), {})
        st.consumed_valid_samples = dict(valid) if isinstance(valid, dict) else int(valid)
        st.consumed_train_tokens = first(raw.get("consumed_train_tokens"), args.get("consumed_train_tokens"),
                                         raw.get("tokens"))
        st.padded_vocab_size = first(raw.get("padded_vocab_size"), info.get("padded_vocab_size"),
                                     args.get("padded_vocab_size"))
        st.original_vocab_size = first(raw.get("original_vocab_size"), info.get("original_vocab_size"),
                                       uci.get("original_vocab_size"))
        if isinstance(raw.get("rng_state"), dict):
            st.rng = dict(raw["rng_state"])
        elif any(k in raw for k in LEGACY_RNG_KEYS):
            st.rng = {ours: raw[k] for k, ours in LEGACY_RNG_KEYS.items() if raw.get(k) is not None}
        return st

    @property
    def tp(self) -> int | None:
        return self.args.get("tensor_model_parallel_size")

    @property
    def pp(self) -> int | None:
        return self.args.get("pipeline_model_parallel_size")

    def valid_samples_for(self, groups) -> dict:
        if isinstance(self.consumed_valid_samples, dict):
            return dict(self.consumed_valid_samples)
        return {g: self.consumed_valid_samples for g in groups}

    def ours(self) -> dict:
        """The raw state rewritten in mtf-train's form (DeepSpeed's own keys kept as they are)."""
        out = {k: v for k, v in self.raw.items() if k not in LEGACY_KEYS and k != "rng_state"}
        args = dict(self.args)
        for k in ("consumed_train_samples", "consumed_valid_samples", "consumed_train_tokens"):
            args.pop(k, None)
        out.update(args=args, iteration=self.iteration, consumed_train_samples=self.consumed_train_samples,
                   consumed_valid_samples=self.consumed_valid_samples,
                   padded_vocab_size=self.padded_vocab_size, original_vocab_size=self.original_vocab_size)
        if self.consumed_train_tokens is not None:
            out["consumed_train_tokens"] = self.consumed_train_tokens
        if self.rng is not None:
            out["rng_state"] = self.rng
        return out


def read_checkpoint(folder, step: int | None = None, check: bool = True, torch_free: bool = False):
    """(Checkpoint, ClientState) of a step, verified before it is trusted: the client-state file's CRCs first,
    then (from its args) that every layer file the model's depth needs is there and nothing else, and, with
    `check`, every file's CRCs. `torch_free`: read without importing torch (the RNG states stay unread
    `LazyTensor`s; `torchzip.NeedsTorch` when the file needs torch to be read)."""
    from mtf_train.ckpt.errors import CkptError
    from mtf_train.ckpt.layout import locate
    from mtf_train.ckpt.torchzip import TorchFile, check_archive, materialize

    ck = locate(folder, step)
    first = ck.mp_files[0]
    if check:
        check_archive(first)
    with TorchFile(first) as tf:
        raw = tf.load(torch_free=torch_free)
    if not isinstance(raw, dict):
        raise CkptError(str(first), "not a DeepSpeed model-states file")
    if not torch_free:
        raw = {k: (materialize(v) if k in ("args", "param_shapes", "iteration") or k in LEGACY_KEYS
                   or k == "rng_state" else v) for k, v in raw.items()}
    st = ClientState.read(raw)
    num_layers = st.args.get("num_layers")
    for name, files_say in (("tensor_model_parallel_size", ck.tp), ("pipeline_model_parallel_size", ck.pp)):
        saved = st.args.get(name)
        if isinstance(saved, int) and saved != files_say:
            raise CkptError(str(ck.path), f"the saved args say {name} {saved}, the files give {files_say}: "
                            "files are missing or do not belong together")
    dp = raw.get("dp_world_size")
    if ck.optim_files and isinstance(dp, int) and dp != ck.dp:
        raise CkptError(str(ck.path), f"DeepSpeed saved it at data-parallel size {dp}, the optimizer files give "
                        f"{ck.dp}: optimizer files are missing or do not belong together")
    ck.check(num_layers if isinstance(num_layers, int) else None, crc=check)
    return ck, st
