"""Checkpoint reshape throughput and peak memory against DeepSpeed's universal converter alone.

Trains a wider tiny BLOOM (hidden 768, 4 layers, 12 heads; ~30M parameters) one step at TP2 through the real
trainer, which saves a ~460 MB checkpoint (weights + fp32 Adam states), then times on the same checkpoint:
- `python -m deepspeed.checkpoint.ds_to_universal` alone (its defaults: 4 extract / 2 merge workers), the
  baseline; it produces the universal form only, not a checkpoint at another shape;
- `mtf-train ckpt reshape --tp 1 --pp 1 --no-verify` (direct method): the finished TP1 checkpoint;
- `mtf-train ckpt reshape --tp 1 --pp 2 --no-verify`;
- `mtf-train ckpt to-universal` (DeepSpeed's converter as a library, workers sized to memory);
- for context, `mtf-train ckpt reshape --tp 1 --pp 1` with its verification runs;
- the integrity check every tool and the trainer run before trusting a checkpoint (CRC-32 of every record of
  every file, `Checkpoint.check`), in-process on a warm page cache, and `ckpt inspect` with and without it.
Throughput is the input checkpoint's bytes over wall seconds. Peak memory is the largest summed RSS of the
command's whole process tree, sampled every 20 ms; "above start" subtracts the RSS of a process that has only
imported torch and DeepSpeed (what both the converter and the direct reshape import).

Usage: .venv/bin/python benchmarks/ckpt_reshape.py [--workdir DIR] [--repeats N] [--only-check]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def measure(cmd: list[str], env: dict | None = None) -> tuple[float, int]:
    """(wall seconds, peak summed RSS of the process tree)."""
    t0 = time.perf_counter()
    popen = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             env=dict(os.environ, **(env or {})))
    proc = psutil.Process(popen.pid)
    peak = 0
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            try:
                peak = max(peak, tree_rss(proc))
            except psutil.Error:
                pass
            time.sleep(0.02)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    _, err = popen.communicate()
    wall = time.perf_counter() - t0
    done.set()
    th.join()
    if popen.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err.decode()[-3000:]}")
    return wall, peak


def make_checkpoint(workdir: Path) -> Path:
    runs = workdir / "runs"
    found = sorted(runs.glob("tiny-local/*/checkpoints/latest"))
    if found:
        return found[-1].parent
    sets = ["model.hidden_size=768", "model.num_layers=4", "model.num_attention_heads=12", "model.seq_length=64",
            "parallel.tp=2", "cluster.gpus_per_node=2", "training.train_iters=1", "eval.iters=0",
            "checkpoint.interval=1", "batch.micro=1", "batch.global=2"]
    cmd = [str(BIN / "mtf-train"), "run", "recipes/tiny-local.yaml", "--runs-dir", str(runs)]
    for s in sets:
        cmd += ["--set", s]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    (latest,) = runs.glob("tiny-local/*/checkpoints/latest")
    return latest.parent


def largest_tensors(root: Path) -> tuple[int, int]:
    """(largest full parameter, largest tensor stored in any file) in bytes."""
    import math

    from mtf_train.ckpt.torchzip import TorchFile
    from mtf_train.ckpt.source import read_source

    src = read_source(root)
    largest_param = max(math.prod(s) for s in src.full_shapes.values()) * 4
    largest = 0
    for path in src.ck.files():
        with TorchFile(path) as tf:
            stack = [tf.load()]
        while stack:
            x = stack.pop()
            if hasattr(x, "nbytes") and hasattr(x, "storage"):
                largest = max(largest, x.nbytes)
            elif isinstance(x, dict):
                stack += list(x.values())
            elif isinstance(x, (list, tuple)):
                stack += list(x)
    return largest_param, largest


def check_cost(root: Path, size: int, repeats: int, env: dict) -> None:
    """The integrity check alone (in this process), and `ckpt inspect` with and without it."""
    from mtf_train.ckpt.layout import locate

    ck = locate(root)
    ck.check(4, crc=True)  # warm the page cache: the numbers are the check's CPU cost, not the disk's
    walls = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        ck.check(4, crc=True)
        walls.append(time.perf_counter() - t0)
    wall = statistics.median(walls)
    mtf = str(BIN / "mtf-train")
    inspect = statistics.median(measure([mtf, "ckpt", "inspect", str(root)], env)[0] for _ in range(repeats))
    no_check = statistics.median(measure([mtf, "ckpt", "inspect", str(root), "--no-check"], env)[0]
                                 for _ in range(repeats))
    print(f"integrity check (CRC-32 of {len(ck.files())} files, {size / (1 << 20):.0f} MiB, warm cache): "
          f"{wall:.3f} s = {size / wall / 1e9:.2f} GB/s; ckpt inspect {inspect:.2f} s, with --no-check "
          f"{no_check:.2f} s")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", help="keeps the generated checkpoint between runs (default: a temp folder)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only-check", action="store_true", help="measure the integrity check only")
    args = ap.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="ckpt-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    root = make_checkpoint(workdir)
    tag = (root / "latest").read_text().strip()
    step = root / tag
    size = sum(p.stat().st_size for p in step.iterdir())
    if args.only_check:
        check_cost(root, size, args.repeats, {"DS_ACCELERATOR": "cpu"})
        return
    largest_param, largest_flat = largest_tensors(root)
    env = {"DS_ACCELERATOR": "cpu", "MTF_CKPT_CACHE": str(workdir / "cache")}
    scratch = workdir / "out"

    def fresh():
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir()
        for p in root.glob(f"{tag}_universal"):
            shutil.rmtree(p)
        (root / "latest_universal").unlink(missing_ok=True)

    py = sys.executable
    mtf = str(BIN / "mtf-train")
    cases = [
        ("DeepSpeed ds_to_universal alone (baseline)",
         lambda: [py, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(step),
                  "--output_folder", str(scratch / "uni" / f"{tag}_universal")]),
        ("mtf-train ckpt reshape --tp 1 --pp 1 --no-verify",
         lambda: [mtf, "ckpt", "reshape", str(root), "--tp", "1", "--pp", "1", "-o", str(scratch / "r"), "--no-verify"]),
        ("mtf-train ckpt reshape --tp 1 --pp 2 --no-verify",
         lambda: [mtf, "ckpt", "reshape", str(root), "--tp", "1", "--pp", "2", "-o", str(scratch / "r"), "--no-verify"]),
        ("mtf-train ckpt to-universal",
         lambda: [mtf, "ckpt", "to-universal", str(root), "-o", str(scratch / "u")]),
    ]
    baseline_cmd = [py, "-c", "import torch, deepspeed"]
    rows = []
    _, start_rss = measure(baseline_cmd, env)
    for label, cmd in cases:
        walls, peaks = [], []
        for _ in range(args.repeats):
            fresh()
            w, p = measure(cmd(), env)
            walls.append(w)
            peaks.append(p)
        rows.append((label, statistics.median(walls), max(peaks)))
    fresh()
    shutil.rmtree(workdir / "cache", ignore_errors=True)  # measure the source too, not a cached probe
    w, p = measure([mtf, "ckpt", "reshape", str(root), "--tp", "1", "--pp", "1", "-o", str(scratch / "v")], env)
    rows.append(("mtf-train ckpt reshape --tp 1 --pp 1 (with verification)", w, p))
    fresh()

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(x.split(":", 1)[1].strip() for x in Path("/proc/cpuinfo").read_text().splitlines()
                   if x.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mb = 1 << 20
    print(f"machine: {os.cpu_count()} CPUs ({cpu}), {psutil.virtual_memory().total / (1 << 30):.0f} GiB, "
          f"python {platform.python_version()}; date {time.strftime('%Y-%m-%d')}")
    print(f"checkpoint: {step} ({size / mb:.0f} MiB, tp 2, ~30M parameters, fp32 + Adam); largest parameter "
          f"{largest_param / mb:.1f} MiB, largest tensor in a file (a flat optimizer partition) "
          f"{largest_flat / mb:.1f} MiB; imports alone: {start_rss / mb:.0f} MiB RSS")
    print(f"repeats: {args.repeats} (median wall time, max peak)\n")
    print("| command | wall | throughput | peak RSS (tree) | above start |")
    print("|---|---|---|---|---|")
    for label, wall, peak in rows:
        print(f"| `{label}` | {wall:.2f} s | {size / wall / 1e9:.3f} GB/s | {peak / mb:.0f} MiB | "
              f"{max(0, peak - start_rss) / mb:.0f} MiB |")
    check_cost(root, size, args.repeats, env)
    print(json.dumps({"size": size, "rows": rows, "start_rss": start_rss, "largest_param": largest_param,
                      "largest_flat": largest_flat}))


if __name__ == "__main__":
    main()
