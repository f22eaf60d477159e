"""The LM head + loss alone, forward + backward, on CPU: the full-logits path against the chunked one.

Shapes default to the bloom-1b1 head at the BLOOMZ batch shape: hidden 1536, vocabulary 250880 (tied head
weight, TP=1), seq 2048, micro batch 4, float32 (the CPU training dtype), `--norm-target-loss`.
- old: `F.linear(hidden, weight)` -> megatron's `vocab_parallel_cross_entropy` over every position
  (`mtf_train.train.loss.logits_loss`), what the trainer did before.
- new: `head_token_losses` (logits only at target positions, a chunk of rows at a time, recomputed in
  backward), what `BloomLoss` does now.
Rows are packed like xP3: examples of 128-768 tokens, each an input followed by a target that is
`--target-fraction` of it (default 0.25, an assumed xP3-like share: prompts with passages and short answers;
real xP3 was not available to measure). `--target-fraction 1` makes every position a target (the worst case).

Each variant runs in a fresh Python process so that its peak resident set (`ru_maxrss`) is its own; "loss
path" memory is that peak minus the resident set once the inputs (weight, hidden states) exist, i.e. what
the loss and its backward allocate, the weight's gradient included. Losses and gradients are compared between
the processes: the hidden-state gradient in full, the weight gradient by its norm and 4096 sampled rows.

Usage: .venv/bin/python benchmarks/loss_path.py [--micro 4] [--seq 2048] [--target-fraction 0.25 1.0]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from xp3_like import TARGET_FRACTION, packed_batch

ROOT = Path(__file__).resolve().parents[1]


def rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_one(variant: str, a) -> dict:
    import torch
    import torch.nn.functional as F

    from mtf_train.train import parallel
    from mtf_train.train.loss import default_chunk_rows, head_token_losses, logits_loss, masked_loss, prepare_batch

    torch.manual_seed(0)
    parallel.init_parallel(tp=1, pp=1)  # megatron's kernel asks for its TP group
    tokens, labels, mask, seg = prepare_batch(*packed_batch(a.micro, a.seq, a.vocab, a.fraction, a.seed))
    g = torch.Generator().manual_seed(a.seed)
    hidden = torch.randn(a.micro, a.seq, a.hidden, generator=g).requires_grad_()
    weight = (torch.randn(a.vocab, a.hidden, generator=g) * 0.02).requires_grad_()
    start_rss = rss_mib()
    t0 = time.perf_counter()
    if variant == "old":
        loss = logits_loss(F.linear(hidden, weight), (labels, mask, seg), True)
    else:
        loss = masked_loss(head_token_losses(hidden, weight, labels, mask), mask, seg, True)
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rows = torch.randperm(a.vocab, generator=torch.Generator().manual_seed(1))[:4096]
    torch.save({"grad_hidden": hidden.grad, "grad_weight_rows": weight.grad[rows].clone()}, a.out + ".pt")
    return {"variant": variant, "loss": loss.item(), "forward_s": t1 - t0, "backward_s": t2 - t1,
            "start_rss_mib": start_rss, "peak_rss_mib": peak, "loss_path_mib": peak - start_rss,
            "grad_weight_norm": weight.grad.norm().item(), "targets": int(mask.sum()), "positions": mask.numel(),
            "chunk_rows": default_chunk_rows(a.vocab), "threads": torch.get_num_threads(),
            "torch": torch.__version__}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=1536)
    ap.add_argument("--vocab", type=int, default=250880)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--micro", type=int, default=4)
    ap.add_argument("--target-fraction", type=float, nargs="+", default=[TARGET_FRACTION])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--run-one", choices=["old", "new"], help=argparse.SUPPRESS)
    ap.add_argument("--fraction", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.run_one:
        print(json.dumps(run_one(a.run_one, a)), flush=True)
        return

    import torch

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for fraction in a.target_fraction:
            by_variant = {}
            for variant in ("old", "new"):
                out = os.path.join(tmp, f"{variant}-{fraction}")
                cmd = [sys.executable, __file__, "--run-one", variant, "--fraction", str(fraction), "--out", out,
                       "--hidden", str(a.hidden), "--vocab", str(a.vocab), "--seq", str(a.seq),
                       "--micro", str(a.micro), "--seed", str(a.seed)]
                proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                                      env=dict(os.environ, PYTHONPATH=str(ROOT)))
                if proc.returncode != 0:
                    raise SystemExit(f"{variant} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                r["fraction_asked"] = fraction
                r["grads"] = torch.load(out + ".pt")
                by_variant[variant] = r
            old, new = by_variant["old"], by_variant["new"]
            diff_h = (new["grads"]["grad_hidden"] - old["grads"]["grad_hidden"]).abs().max().item()
            scale_h = old["grads"]["grad_hidden"].abs().max().item()
            diff_w = (new["grads"]["grad_weight_rows"] - old["grads"]["grad_weight_rows"]).abs().max().item()
            scale_w = old["grads"]["grad_weight_rows"].abs().max().item()
            for r in (old, new):
                del r["grads"]
            results.append({"old": old, "new": new, "loss_abs_diff": abs(new["loss"] - old["loss"]),
                            "grad_hidden_rel": diff_h / scale_h, "grad_weight_rows_rel": diff_w / scale_w,
                            "grad_weight_norm_rel": abs(new["grad_weight_norm"] - old["grad_weight_norm"])
                            / old["grad_weight_norm"]})

    print(f"machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} CPUs, python "
          f"{platform.python_version()}, torch {results[0]['old']['torch']}, threads {results[0]['old']['threads']}, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"shape: hidden {a.hidden}, vocab {a.vocab}, seq {a.seq}, micro batch {a.micro}, float32, "
          f"norm-target-loss; chunk rows {results[0]['new']['chunk_rows']}")
    print("| targets | variant | loss | forward s | backward s | total s | peak RSS MiB | loss path MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for res in results:
        for name in ("old", "new"):
            r = res[name]
            share = f"{r['targets']}/{r['positions']} ({r['targets'] / r['positions']:.1%})"
            print(f"| {share} | {name} | {r['loss']:.6f} | {r['forward_s']:.2f} | {r['backward_s']:.2f} | "
                  f"{r['forward_s'] + r['backward_s']:.2f} | {r['peak_rss_mib']:.0f} | {r['loss_path_mib']:.0f} |")
        o, n = res["old"], res["new"]
        print(f"  fraction {o['fraction_asked']}: loss path memory new/old {n['loss_path_mib'] / o['loss_path_mib']:.3f}, "
              f"peak RSS new/old {n['peak_rss_mib'] / o['peak_rss_mib']:.3f}, time new/old "
              f"{(n['forward_s'] + n['backward_s']) / (o['forward_s'] + o['backward_s']):.3f}; |loss diff| "
              f"{res['loss_abs_diff']:.2e}, grad hidden max rel diff {res['grad_hidden_rel']:.2e}, grad weight "
              f"rows max rel diff {res['grad_weight_rows_rel']:.2e}, norm rel diff {res['grad_weight_norm_rel']:.2e}")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
