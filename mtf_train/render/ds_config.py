"""The DeepSpeed config a job runs with."""
from __future__ import annotations

from mtf_train.plan import Shape
from mtf_train.recipe.runtime import runtime
from mtf_train.recipe.schema import Recipe


def ds_config(r: Recipe, s: Shape) -> dict:
    p = r.precision
    cfg: dict = {
        "train_micro_batch_size_per_gpu": s.micro,
        "train_batch_size": s.global_batch,
        "gradient_clipping": r.optimizer.clip_grad,
        "zero_optimization": {"stage": s.zero_stage},
    }
    if p.dtype == "fp16":
        cfg["fp16"] = {"enabled": True, "loss_scale": p.loss_scale, "loss_scale_window": p.loss_scale_window,
                       "hysteresis": p.hysteresis, "min_loss_scale": p.min_loss_scale,
                       "initial_scale_power": p.initial_scale_power}
    elif p.dtype == "bf16":
        cfg["bf16"] = {"enabled": True}
        if runtime(r).bf16_as_zero1:
            # Current DeepSpeed picks BLOOM's BF16_Optimizer (fp32 master weights and gradient accumulation,
            # states sharded over dp) for bf16 + ZeRO-1 with fp32 accumulation; it is also the only bf16
            # pipeline setting whose checkpoints it loads again (resuming a bf16 + ZeRO-0 pipeline checkpoint fails
            # with `KeyError: 0` in bf16_optimizer._load_legacy_checkpoint).
            cfg["data_types"] = {"grad_accum_dtype": "fp32"}
    cfg["steps_per_print"] = 2000
    cfg["wall_clock_breakdown"] = False
    return cfg
