"""Model FLOPs utilisation: the peak dense bf16/fp16 tensor TFLOP/s of a GPU from its name, and the log's
one-time explanation of how MFU and TFLOP/s are computed. Imports no torch (the table is unit-tested alone).

MFU = model TFLOP/s per GPU / peak, where model FLOPs per token are `rules.flops_per_token` without
recomputation (Narayanan et al. 2021: the LM head counted at every position, as is customary), so MFU does
not reward recomputing or penalise skipping work. Hardware TFLOP/s add the activation recomputation.
"""
from __future__ import annotations

import re

# Dense (no structured sparsity) bf16 tensor-core TFLOP/s per GPU, fp16 where the GPU has no bf16 (V100, T4),
# from the vendors' data sheets (SXM/OAM parts unless the name says otherwise). First match wins: specific
# names come before the names they contain.
PEAK_TFLOPS: list[tuple[str, float]] = [
    ("GB200", 2500.0),
    ("B200", 2250.0),
    ("B100", 1750.0),
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),
    ("H800", 989.0),
    ("H20", 148.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("A30", 165.0),
    ("A40", 150.0),
    ("A10", 125.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("V100", 125.0),
    ("T4", 65.0),
    ("MI300X", 1307.0),
    ("MI250X", 383.0),
]

FORMULA = "72*l*h^2*(1 + s/(6*h)) + 6*h*V"
FORMULA_RECOMPUTE = {"none": FORMULA, "full": "96*l*h^2*(1 + s/(6*h)) + 6*h*V",
                     "selective": FORMULA + " + 4*l*s*h (attention core repeated; 0 with FlexAttention)"}


def peak_tflops(device_name: str) -> float | None:
    """Peak dense bf16/fp16 TFLOP/s for a device name such as torch.cuda.get_device_name() gives
    ("NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB", "Tesla V100-SXM2-32GB"); None when unknown."""
    for key, tflops in PEAK_TFLOPS:
        # Whole-word match: "A10" must not match "A100", nor "H200" "GH200", nor "L40" "L40S".
        pattern = r"(?<![A-Za-z0-9])" + re.escape(key).replace(r"\ ", r"[\s-]+") + r"(?![A-Za-z0-9])"
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            return tflops
    return None


def resolve_peak(override: float | None, device_type: str, device_name: str | None) -> tuple[float | None, str]:
    """(peak TFLOP/s or None, where it comes from / why there is none), for the log."""
    if override is not None:
        return override, "--tflops-per-gpu-peak"
    if device_type != "cuda":
        return None, "n/a on CPU"
    peak = peak_tflops(device_name or "")
    if peak is None:
        return None, f"n/a: no peak known for GPU '{device_name}' (pass --tflops-per-gpu-peak)"
    return peak, f"dense bf16/fp16 peak of {device_name}"


def mfu(model_tflops_per_gpu: float, peak: float | None) -> float | None:
    return model_tflops_per_gpu / peak if peak else None


def describe(num_layers: int, hidden: int, seq: int, vocab: int, recompute: str, fpt_model: float,
             fpt_hw: float, peak: float | None, source: str) -> list[str]:
    """The lines the trainer prints once before the first step."""
    lines = [f"FLOPs per token: model {FORMULA} = {fpt_model / 1e9:.3f} GFLOP "
             f"(l={num_layers}, h={hidden}, s={seq}, V={vocab}); hardware "
             f"{FORMULA_RECOMPUTE[recompute]} = {fpt_hw / 1e9:.3f} GFLOP (recompute {recompute}); "
             f"TFLOP/s per GPU = FLOPs per token x "
             f"tokens/s / GPUs"]
    if peak:
        lines.append(f"MFU = model TFLOP/s per GPU / {peak:g} TFLOP/s ({source})")
    else:
        lines.append(f"MFU: {source}")
    return lines
