"""MFU in the trainer's log: the peak table looked up by GPU name, and the FLOPs formula it divides."""
from __future__ import annotations

import pytest

from mtf_train.rules import flops_per_token
from mtf_train.train import mfu


@pytest.mark.parametrize("name,peak", [
    ("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756), ("NVIDIA H100 NVL", 835),
    ("NVIDIA H200", 989), ("NVIDIA GH200 480GB", 989), ("NVIDIA A100-SXM4-80GB", 312),
    ("NVIDIA A100-PCIE-40GB", 312), ("NVIDIA A10", 125), ("NVIDIA L40S", 362), ("NVIDIA L40", 181),
    ("NVIDIA L4", 121), ("Tesla V100-SXM2-32GB", 125), ("Tesla T4", 65), ("AMD Instinct MI300X", 1307),
    ("NVIDIA B200", 2250),
])
def test_peak_table_by_device_name(name, peak):
    assert mfu.peak_tflops(name) == peak


@pytest.mark.parametrize("name", ["NVIDIA GeForce RTX 4090", "", "cpu", "NVIDIA A1000"])
def test_unknown_devices_have_no_peak(name):
    assert mfu.peak_tflops(name) is None


def test_resolve_peak_override_cpu_and_unknown_gpu():
    assert mfu.resolve_peak(500.0, "cuda", "NVIDIA H100 80GB HBM3") == (500.0, "--tflops-per-gpu-peak")
    assert mfu.resolve_peak(None, "cpu", None) == (None, "n/a on CPU")
    assert mfu.resolve_peak(None, "cuda", "NVIDIA H200")[0] == 989
    peak, why = mfu.resolve_peak(None, "cuda", "Mystery GPU")
    assert peak is None and "--tflops-per-gpu-peak" in why


def test_flops_formula_and_mfu():
    # bloom-1b1 shape: 24 layers, h 1536, s 2048, V 250880. Per token: 6 FLOPs per weight of the blocks
    # (12*l*h^2 weights) and of the head (h*V), plus attention scores and context, 12*l*h*s.
    l, h, s, v = 24, 1536, 2048, 250880
    by_hand = 6 * 12 * l * h * h + 6 * h * v + 12 * l * h * s
    assert flops_per_token(l, h, s, v, recompute=False) == pytest.approx(by_hand)
    # Full recomputation repeats the blocks' forward (a third more block FLOPs), never the head: this is
    # Narayanan et al.'s 96*l*h^2*(1 + s/6h + V/16lh).
    narayanan = 96 * l * h * h * (1 + s / (6 * h) + v / (16 * l * h))
    assert flops_per_token(l, h, s, v, recompute=True) == pytest.approx(narayanan)
    assert narayanan == pytest.approx(by_hand + (by_hand - 6 * h * v) / 3)
    # 54.8k tokens/s on one H100 at this shape is 54.8e3 * by_hand / 1e12 model TFLOP/s.
    tflops = 54.8e3 * by_hand / 1e12
    assert mfu.mfu(tflops, 989) == pytest.approx(tflops / 989) and mfu.mfu(tflops, None) is None
    lines = mfu.describe(l, h, s, v, "full", by_hand, narayanan, None, "n/a on CPU")
    assert lines[0].startswith(f"FLOPs per token: model {mfu.FORMULA} = {by_hand / 1e9:.3f} GFLOP")
    assert lines[1] == "MFU: n/a on CPU"
