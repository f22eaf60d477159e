"""Wall time of `mtf-train plan recipes/bloomz-176b.yaml` against `python -c "import torch"`, same machine.

The plan path must stay free of torch/DeepSpeed/megatron imports; this shows what that buys.
Usage: .venv/bin/python benchmarks/cli_startup.py [--repeats N]
"""
from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def timed(cmd: list[str], repeats: int) -> list[float]:
    subprocess.run(cmd, cwd=ROOT, capture_output=True, check=True)  # warm the page cache
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run(cmd, cwd=ROOT, capture_output=True, check=True)
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    bin_dir = Path(sys.executable).parent
    plan = timed([str(bin_dir / "mtf-train"), "plan", "recipes/bloomz-176b.yaml"], args.repeats)
    torch = timed([sys.executable, "-c", "import torch"], args.repeats)
    p, t = statistics.median(plan), statistics.median(torch)
    print(f"machine: {platform.machine()} {platform.processor() or ''} python {platform.python_version()}")
    print(f"mtf-train plan bloomz-176b : median {p * 1000:.0f} ms (min {min(plan) * 1000:.0f}) over {args.repeats}")
    print(f"python -c 'import torch'   : median {t * 1000:.0f} ms (min {min(torch) * 1000:.0f}) over {args.repeats}")
    print(f"ratio plan / import torch  : {p / t:.2f}")


if __name__ == "__main__":
    main()
