"""One rank of `mtf-train preflight`, started by torch.distributed.run on every node of the allocation.

Each rank measures its device: GPU count and a bf16 matmul rate (TFLOP/s) on its GPU, or, on a node without
GPUs, an fp32 matmul rate (GFLOP/s) on the CPU; then all ranks time an all-reduce across the nodes (nccl on
GPUs, gloo otherwise). Rank 0 gathers every rank's record and writes `<out>/preflight.json`.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import time
from pathlib import Path


def matmul_rate(torch, device, dtype, n: int, seconds: float) -> tuple[float, int]:
    """FLOP/s of an n x n matmul, measured for about `seconds` after a warm-up."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(2):
        torch.mm(a, b)
    sync()
    iters, start = 0, time.perf_counter()
    while True:
        torch.mm(a, b)
        iters += 1
        if iters % 4 == 0:
            sync()
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                break
    return 2.0 * n ** 3 * iters / elapsed, iters


def allreduce_rate(torch, dist, device, megabytes: float, iters: int) -> dict:
    numel = max(1, int(megabytes * (1 << 20) / 4))
    x = torch.ones(numel, device=device, dtype=torch.float32)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    dist.all_reduce(x)
    sync()
    dist.barrier()
    start = time.perf_counter()
    for _ in range(iters):
        dist.all_reduce(x)
    sync()
    elapsed = (time.perf_counter() - start) / iters
    world = dist.get_world_size()
    algbw = numel * 4 / elapsed / 1e9
    return {"bytes": numel * 4, "seconds": elapsed, "algbw_gb_s": algbw,
            "busbw_gb_s": algbw * 2 * (world - 1) / world if world > 1 else algbw,
            "correct": bool(abs(x[0].item() / float(world) ** (iters + 1) - 1) < 1e-3)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", required=True, help="folder for preflight.json")
    p.add_argument("--seconds", type=float, default=3.0, help="matmul measurement time per device")
    p.add_argument("--size", type=int, default=0, help="matmul size (default 8192 on GPU, 1024 on CPU)")
    p.add_argument("--allreduce-mb", type=float, default=0, help="all-reduce size (default 256 on GPU, 16 on CPU)")
    p.add_argument("--allreduce-iters", type=int, default=5)
    a = p.parse_args(argv)

    import torch
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus:
        device = torch.device("cuda", local_rank % gpus)
        torch.cuda.set_device(device)
        backend, dtype, unit = "nccl", torch.bfloat16, "TFLOP/s"
        size, mb = a.size or 8192, a.allreduce_mb or 256
    else:
        device = torch.device("cpu")
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:
            cores = os.cpu_count() or 1
        torch.set_num_threads(max(1, cores // local_world))
        backend, dtype, unit = "gloo", torch.float32, "GFLOP/s"
        size, mb = a.size or 1024, a.allreduce_mb or 16
    dist.init_process_group(backend=backend)
    rank, world = dist.get_rank(), dist.get_world_size()

    flops, iters = matmul_rate(torch, device, dtype, size, a.seconds)
    rate = flops / (1e12 if gpus else 1e9)
    dist.barrier()
    ar = allreduce_rate(torch, dist, device, mb, a.allreduce_iters)
    record = {"rank": rank, "local_rank": local_rank, "node": os.environ.get("SLURMD_NODENAME") or socket.gethostname(),
              "hostname": socket.gethostname(), "gpus": gpus, "device": str(device),
              "device_name": torch.cuda.get_device_name(device) if gpus else "cpu",
              "threads": torch.get_num_threads(), "matmul": {"size": size, "dtype": str(dtype).split(".")[-1],
                                                             "iters": iters, "rate": rate, "unit": unit},
              "allreduce": ar}
    records: list = [None] * world
    dist.all_gather_object(records, record)
    if rank == 0:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        result = {"world_size": world, "backend": backend, "records": records}
        tmp = out / f".preflight.json.tmp{os.getpid()}"
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        os.replace(tmp, out / "preflight.json")
        print(f"preflight: {world} rank(s) measured; wrote {out / 'preflight.json'}", flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    from mtf_train.process import exit_now

    exit_now(main())
