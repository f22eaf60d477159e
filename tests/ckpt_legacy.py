"""Build a checkpoint in the form 2022 Megatron-DeepSpeed (`t0loading`, DeepSpeed 0.7) wrote, from one of ours.

The weights, optimizer states and layout stay the same; what changes is how the client state is pickled
(`mp_rank_*_model_states.pt`):
- `args` is an `argparse.Namespace` whose `position_embedding_type` is `megatron.enums.PositionEmbeddingType.alibi`
  and `attn_mask_type` `megatron.enums.AttnMaskType.custom` (enums of a module megatron-core does not ship), with
  `params_dtype = torch.bfloat16` and the progress counters (`consumed_train_samples`, `consumed_valid_samples`,
  `consumed_train_tokens`) on it;
- beside it `checkpoint_version` 3.0, `iteration`, `tokens`, `checkpoint_info` {padded, original vocabulary} and
  the RNG states as `random_rng_state`, `np_rng_state`, `torch_rng_state`, `cuda_rng_state`,
  `rng_tracker_states`; no `universal_checkpoint_info`, none of our top-level keys;
- DeepSpeed 0.7's keys (`sparse_tensor_module_names`, no `frozen_param_*`, `shared_params`, `data_sampler`,
  `random_ltd`, `checkpoint_parallel_dimensions`), `ds_version` 0.7.x and the 2022 bf16 ZeRO-0 config.
Optimizer files keep DeepSpeed's BF16_Optimizer records (`bf16_zero_pp_rank_*`), with `ds_version` 0.7.x.
"""
from __future__ import annotations

import argparse
import enum
import shutil
import sys
import types
from pathlib import Path

DS_07_DROPPED = ("frozen_param_shapes", "shared_params", "frozen_param_fragments", "data_sampler", "random_ltd",
                 "checkpoint_parallel_dimensions", "universal_checkpoint_info")
OURS = ("consumed_train_samples", "consumed_valid_samples", "padded_vocab_size", "original_vocab_size",
        "rng_state", "args")
DS_CONFIG_2022 = {"train_micro_batch_size_per_gpu": 1, "train_batch_size": 8, "gradient_clipping": 1.0,
                  "zero_optimization": {"stage": 0}, "bf16": {"enabled": True}, "steps_per_print": 2000,
                  "wall_clock_breakdown": False}


def _megatron_enums():
    """A `megatron.enums` module as the 2022 code had it, registered only while pickling."""
    mod = types.ModuleType("megatron.enums")

    class PositionEmbeddingType(enum.Enum):
        rotary = 1
        absolute = 2
        alibi = 3

    class AttnMaskType(enum.Enum):
        padding = 1
        causal = 2
        prefix = 3
        custom = 4

    for cls in (PositionEmbeddingType, AttnMaskType):
        cls.__module__, cls.__qualname__ = "megatron.enums", cls.__name__
        setattr(mod, cls.__name__, cls)
    return mod


def to_legacy(step_dir: Path, out_root: Path) -> Path:
    """Copy checkpoint step `step_dir` (ours) into `out_root/<tag>` in the 2022 form; returns `out_root`."""
    import torch

    out_root.mkdir(parents=True)
    dst = out_root / step_dir.name
    shutil.copytree(step_dir, dst)
    (out_root / "latest").write_text(step_dir.name)
    enums = _megatron_enums()
    sys.modules["megatron.enums"] = enums
    try:
        for f in sorted(dst.glob("mp_rank_*_model_states.pt")):
            sd = torch.load(f, weights_only=False)
            ours = {k: sd.pop(k, None) for k in OURS}
            if ours["rng_state"] is None:  # a reshaped checkpoint's ranks seed themselves: make some states
                import random

                import numpy as np

                ours["rng_state"] = {"random": random.getstate(), "numpy": np.random.get_state(),
                                     "torch": torch.get_rng_state()}
            for k in DS_07_DROPPED:
                sd.pop(k, None)
            a = dict(ours["args"])
            a.update(position_embedding_type=enums.PositionEmbeddingType.alibi,
                     attn_mask_type=enums.AttnMaskType.custom, params_dtype=torch.bfloat16,
                     consumed_train_samples=ours["consumed_train_samples"],
                     consumed_valid_samples=sum(ours["consumed_valid_samples"].values()),
                     consumed_train_tokens=ours["consumed_train_samples"] * a["seq_length"],
                     padded_vocab_size=ours["padded_vocab_size"])
            rng = ours["rng_state"]
            sd.update(args=argparse.Namespace(**a), checkpoint_version=3.0,
                      tokens=ours["consumed_train_samples"] * a["seq_length"],
                      checkpoint_info={"padded_vocab_size": ours["padded_vocab_size"],
                                       "original_vocab_size": ours["original_vocab_size"]},
                      random_rng_state=rng["random"], np_rng_state=rng["numpy"], torch_rng_state=rng["torch"],
                      cuda_rng_state=rng.get("cuda", torch.ByteTensor(16)),
                      rng_tracker_states=rng.get("tracker", {}), sparse_tensor_module_names=set(),
                      ds_version="0.7.3", ds_config=dict(DS_CONFIG_2022))
            torch.save(sd, f)
        for f in sorted(dst.glob("*optim_states.pt")):
            sd = torch.load(f, weights_only=False)
            sd["ds_version"] = sd["optimizer_state_dict"]["ds_version"] = "0.7.3"
            sd["ds_config"] = dict(DS_CONFIG_2022)
            torch.save(sd, f)
    finally:
        del sys.modules["megatron.enums"]
    return out_root
