"""Forward + backward of a stack of the trainer's BLOOM blocks per recompute mode, eager and compiled: time per
step and peak memory. On a GPU (bf16, FlexAttention, bloom-1b1 block shape by default) it reads CUDA's
allocator; on CPU (`--tiny`, fp32, reference attention) the profiler's allocation events. Run it beside its
baseline in one call: every mode and both eager and compiled are measured in the same process.

Usage:
  python benchmarks/blocks.py                      # GPU: 4 blocks, h=1536, 16 heads, seq 2048, micro 4, bf16
  python benchmarks/blocks.py --tiny               # CPU smoke run: 4 blocks, h=64, seq 128, micro 2, fp32
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true", help="CPU-sized shape")
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--no-compile", action="store_true", help="eager only")
    args = ap.parse_args()
    os.environ.setdefault("LOCAL_RANK", "0")
    import torch

    sys.path.insert(0, str(ROOT))
    from mtf_train.plan import block_activation_bytes
    from mtf_train.train import hf_names, parallel
    from mtf_train.train.model import BloomModelConfig, BloomTransformerLayer

    cuda = torch.cuda.is_available() and not args.tiny
    h, a, s, b = (64, 4, 128, 2) if args.tiny else (1536, 16, 2048, 4)
    dtype = torch.bfloat16 if cuda else torch.float32
    state = parallel.init_parallel(tp=1, pp=1)
    device = state.device
    seg = torch.ones(b, s, dtype=torch.long, device=device)
    seg[:, s // 2:] = 2  # two packed examples per row
    x0 = torch.randn(b, s, h, device=device, dtype=dtype)

    def measure(mode: str, compiled: bool) -> tuple[float, float]:
        config = BloomModelConfig(num_layers=args.blocks, hidden_size=h, num_heads=a, padded_vocab_size=256,
                                  recompute=mode, compile=compiled, attention="auto")
        layers = [BloomTransformerLayer(config, hf_names.FIRST_BLOCK_LAYER + i).to(device=device, dtype=dtype)
                  for i in range(args.blocks)]

        def step():
            x = x0.clone().requires_grad_()
            y = x
            for layer in layers:
                y = layer((y, seg))[0]
            y.float().square().mean().backward()

        step()  # warm-up (and compilation)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            step()
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        if cuda:
            peak = torch.cuda.max_memory_allocated() - base
        else:
            from torch.profiler import ProfilerActivity, profile
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                step()
            live = peak = 0
            for e in sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                            key=lambda e: e.start_ns()):
                live += e.nbytes()
                peak = max(peak, live)
        return min(times), peak

    where = torch.cuda.get_device_name() if cuda else "CPU"
    print(f"{where}, torch {torch.__version__}, {args.blocks} blocks, h={h}, heads={a}, seq {s}, micro {b}, "
          f"{str(dtype).replace('torch.', '')}; fastest of {args.steps} steps; peak = memory above the start")
    print("| mode | compiled | fwd+bwd ms | peak MiB | planned kept MiB (blocks x per block) |")
    print("|---|---|---|---|---|")
    flex = cuda
    for mode in ("none", "selective", "full"):
        planned = args.blocks * block_activation_bytes(mode, s, b, h, a, 1, dtype.itemsize, flex) / 2**20
        for compiled in ([False] if args.no_compile else [False, True]):
            t, peak = measure(mode, compiled)
            print(f"| {mode} | {'yes' if compiled else 'no'} | {t * 1e3:.1f} | {peak / 2**20:.1f} | {planned:.1f} |",
                  flush=True)


if __name__ == "__main__":
    main()
