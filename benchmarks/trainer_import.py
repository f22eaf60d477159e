"""Wall time of what every trainer rank and checkpoint worker imports before it does anything: the model module
and DeepSpeed, as mtf-train imports them (megatron-core's torch.compile decorators deferred or off,
mtf_train/compat.py) against the same imports made plainly (megatron.core first, so its jit.py runs as shipped),
with `import torch` alone as the floor. Each is a fresh process, alternated, on the same machine.

Usage: .venv/bin/python benchmarks/trainer_import.py [--repeats N]
"""
from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = "; print('torch._dynamo' in sys.modules)"
CASES = {
    "mtf-train (compat)": "import sys, mtf_train.train.model, deepspeed" + PROBE,
    "plain megatron.core": "import sys, megatron.core.tensor_parallel, mtf_train.train.model, deepspeed" + PROBE,
    "import torch (floor)": "import sys, torch" + PROBE,
}


def once(code: str) -> tuple[float, bool]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                          env={"DS_ACCELERATOR": "cpu", "PATH": "/usr/bin:/bin"})
    return time.perf_counter() - t0, proc.stdout.split()[-1] == "True"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    for code in CASES.values():
        once(code)  # warm the page cache
    times = {name: [] for name in CASES}
    dynamo = {}
    for _ in range(args.repeats):
        for name, code in CASES.items():
            t, d = once(code)
            times[name].append(t)
            dynamo[name] = d
    print(f"machine: {platform.machine()} {platform.processor() or ''} python {platform.python_version()}, "
          f"torch {metadata.version('torch')}, megatron-core {metadata.version('megatron-core')}, "
          f"deepspeed {metadata.version('deepspeed')}")
    med = {name: statistics.median(ts) for name, ts in times.items()}
    for name, ts in times.items():
        print(f"{name:22s}: median {med[name] * 1000:5.0f} ms (min {min(ts) * 1000:5.0f}) over {args.repeats}; "
              f"torch._dynamo imported: {dynamo[name]}")
    ours, plain = med["mtf-train (compat)"], med["plain megatron.core"]
    print(f"ratio mtf-train / plain: {ours / plain:.2f} (saves {(plain - ours) * 1000:.0f} ms per process)")


if __name__ == "__main__":
    main()
