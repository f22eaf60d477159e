"""The GPU throughput benchmark's CPU smoke run: the same script and code paths as the GPU measurement
(recipe -> DeepSpeed config -> the trainer's engine step; transformers' BloomForCausalLM), at a tiny shape.
Timings on CPU mean nothing and are not asserted; the output fields must be there and sane."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from tests.helpers import ROOT


def test_train_throughput_cpu_tiny_smoke(tmp_path):
    out = tmp_path / "tt.json"
    proc = subprocess.run([sys.executable, "benchmarks/train_throughput.py", "--device", "cpu", "--tiny",
                           "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    results = {r["impl"]: r for r in report["results"]}
    assert set(results) == {"ours", "hf"}
    for impl, r in results.items():
        assert r["shape"] == "tiny" and r["micro"] == 2 and r["seq"] == 128 and r["vocab"] == 1024, r
        for key in ("step_s", "tokens_per_s", "model_tflops", "hw_tflops", "peak_memory_gb"):
            assert math.isfinite(r[key]) and r[key] > 0, (impl, key, r[key])
        assert r["tokens_per_s"] * r["step_s"] == pytest.approx(2 * 128)
        # A freshly initialised model predicts close to uniformly: loss near ln(1024) = 6.93.
        assert abs(r["loss"] - math.log(1024)) < 0.5, r
        assert r["mfu"] is None and r["peak_source"] == "n/a on CPU"
    assert 0.1 < results["ours"]["target_share"] < 0.5  # packed xP3-like rows, mostly inputs
    assert report["ratio"]["tiny"] == results["ours"]["tokens_per_s"] / results["hf"]["tokens_per_s"]
    assert "| tiny | ours | 2 |" in proc.stdout and "tiny: ours / HF tokens/s =" in proc.stdout
    assert "MFU: n/a on CPU" in proc.stdout
