"""bf16 gradient accumulation: the trainer's fused update of DeepSpeed's BF16_Optimizer trains bitwise like
DeepSpeed's own per-parameter loop (and like `bf16.immediate_grad_update`), through the benchmark script."""
from __future__ import annotations

import subprocess
import sys

from tests.helpers import ROOT


def test_fused_bf16_accumulation_is_bitwise_equal_to_deepspeeds_loop():
    proc = subprocess.run([sys.executable, "benchmarks/bf16_grad_accumulation.py", "--layers", "2", "--steps", "2",
                           "--micro", "3"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "losses and weights bitwise equal across the three: True" in proc.stdout, proc.stdout
    assert "mtf-train's fused update (foreach)" in proc.stdout
