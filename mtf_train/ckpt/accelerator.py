"""DeepSpeed's accelerator for the checkpoint tools and the evaluation's export, which run where there may be no
GPU (a login node, CI): without CUDA, DeepSpeed is told `cpu` before its import, else it warns on import, here
and in every worker."""
from __future__ import annotations

import os


def prepare_deepspeed() -> None:
    """Set DS_ACCELERATOR=cpu (unless set) without CUDA. A CPU build of torch is known from its files, so that a
    command which fails on its input says so before torch is imported at all."""
    from mtf_train.ranks import torch_has_gpu_build

    if torch_has_gpu_build():
        import torch

        if torch.cuda.is_available():
            return
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
