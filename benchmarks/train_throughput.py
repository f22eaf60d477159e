"""Training throughput: the trainer's step against transformers' BloomForCausalLM, same device, same run.

For each shape (bloom-560m: 24 x 1024, bloom-1b1: 24 x 1536; 16 heads, vocabulary 250880, seq 2048, bf16):
- ours: the trainer's step as a job runs it: the recipe (`recipes/bloomz-<shape>.yaml` at PP=TP=DP=1,
  bf16, ZeRO-1) rendered into its DeepSpeed config, `build_model` (DeepSpeed's pipeline engine, the loss at
  target positions only), the trainer's optimizer (fused AdamW on GPU), `engine.train_batch` on packed
  xP3-like rows (`xp3_like.py`: examples of 128-768 tokens, 25% of them targets, attention within examples);
- HF: `BloomForCausalLM` (its own attention, fp32 weights under bf16 autocast, fused AdamW, gradient
  clipping, no recomputation) on the same token rows, unpacked. Its micro batch starts at ours and halves
  until it fits.
Each (implementation, shape) runs in a fresh process (its own peak memory, no state shared). Reported per
case: micro batch, step time (mean over the timed steps, after warm-up steps that include compilation),
tokens/s (micro x seq / step), model and hardware TFLOP/s per GPU (`mtf_train.rules.flops_per_token`: model
72*l*h^2*(1 + s/6h) + 6*h*V per token; hardware adds recomputation), MFU (model TFLOP/s / the GPU's dense
bf16 peak, `mtf_train.train.mfu`), peak memory (CUDA allocator; peak RSS on CPU), and ours/HF tokens/s.

GPU (about 5 minutes on one H100/H200):  .venv/bin/python benchmarks/train_throughput.py
CI smoke test on CPU (timings meaningless): .venv/bin/python benchmarks/train_throughput.py --device cpu --tiny
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(ROOT))

SHAPES = {  # name: (recipe, layers, hidden, heads)
    "bloom-560m": ("bloomz-560m.yaml", 24, 1024, 16),
    "bloom-1b1": ("bloomz-1b1.yaml", 24, 1536, 16),
}
TINY = {"tiny": ("tiny-local.yaml", 2, 64, 4)}
OOM = 3  # exit code of a case that ran out of memory


def case_settings(a, shape: str) -> dict:
    recipe, layers, hidden, heads = (TINY if a.tiny else SHAPES)[shape]
    return dict(recipe=recipe, layers=layers, hidden=hidden, heads=heads,
                seq=128 if a.tiny else a.seq, vocab=1024 if a.tiny else 250880)


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_gb(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def timed_steps(step, device, warmup: int, steps: int) -> tuple[float, float]:
    loss = None
    for _ in range(warmup):
        loss = step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    sync(device)
    return (time.perf_counter() - t0) / steps, float(loss)


def run_ours(a, s: dict, micro: int) -> dict:
    from mtf_train.recipe.load import load_recipe
    from mtf_train.recipe.validate import validate
    from mtf_train.render.ds_config import ds_config
    from mtf_train.train.engine import EngineConfig, OptimizerConfig, build_engine
    from mtf_train.train.feed import to_pipe_batch
    from mtf_train.train.model import BloomModelConfig
    from xp3_like import packed_batch

    sets = ["parallel.pp=1", "parallel.tp=1", "cluster.nodes=1", "cluster.gpus_per_node=1", f"batch.micro={micro}",
            f"batch.global={micro}", "precision.dtype=bf16", "precision.zero_stage=1",
            f"training.recompute={a.recompute}", f"model.seq_length={s['seq']}"]
    if a.device == "cpu":
        sets.append("cluster.accelerator=cpu")
    r = load_recipe(ROOT / "recipes" / s["recipe"], sets)
    m, o = r.model, r.optimizer
    config = BloomModelConfig(num_layers=m.num_layers, hidden_size=m.hidden_size, num_heads=m.num_attention_heads,
                              padded_vocab_size=s["vocab"], init_std=m.init_method_std,
                              recompute=a.recompute, compile=a.device == "cuda")
    # As the trainer builds it, bf16's fused gradient accumulation included.
    engine, state = build_engine(EngineConfig(
        tp=1, pp=1, seed=1234, model=config, ds_config=ds_config(r, validate(r)),
        optimizer=OptimizerConfig(lr=1e-5, weight_decay=o.weight_decay, beta1=o.beta1, beta2=o.beta2, eps=o.eps)))
    batches = [to_pipe_batch(packed_batch(micro, s["seq"], s["vocab"], seed=i), state.device) for i in range(4)]
    targets = sum(int(b[1][1].sum()) for b in batches) / sum(b[1][1].numel() for b in batches)

    def step():
        return engine.train_batch(data_iter=iter(batches))

    step_s, loss = timed_steps(step, state.device, a.warmup, a.steps)
    return {"step_s": step_s, "loss": loss, "target_share": targets, "recompute": a.recompute,
            "precision": "bf16 (DeepSpeed BF16_Optimizer, ZeRO-1, fp32 grad accumulation)"}


def run_hf(a, s: dict, micro: int) -> dict:
    import torch
    from transformers import BloomConfig, BloomForCausalLM

    from mtf_train.train.model import BloomModelConfig
    from xp3_like import packed_batch

    device = torch.device(a.device)
    torch.manual_seed(1234)
    config = BloomModelConfig(num_layers=s["layers"], hidden_size=s["hidden"], num_heads=s["heads"],
                              padded_vocab_size=s["vocab"], init_std=0.0048)
    model = BloomForCausalLM(BloomConfig(**config.to_hf_kwargs())).to(device)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    rows = [packed_batch(micro, s["seq"], s["vocab"], seed=i)[0][:, :-1].to(device) for i in range(4)]
    it = iter(range(10**9))

    def step():
        ids = rows[next(it) % len(rows)]
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    step_s, loss = timed_steps(step, device, a.warmup, a.steps)
    return {"step_s": step_s, "loss": loss, "attention": getattr(model.config, "_attn_implementation", None),
            "precision": "fp32 weights, bf16 autocast"}


def child(a) -> None:
    import torch

    from mtf_train.rules import flops_per_token
    from mtf_train.train import mfu

    s = case_settings(a, a.shape)
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no GPU visible (use --device cpu --tiny for the smoke test)")
    try:
        res = (run_ours if a.impl == "ours" else run_hf)(a, s, a.micro)
    except torch.OutOfMemoryError:
        sys.exit(OOM)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    tokens_per_s = a.micro * s["seq"] / res["step_s"]
    recompute = res.get("recompute") or "none"
    model_tflops = flops_per_token(s["layers"], s["hidden"], s["seq"], s["vocab"], recompute=False) * tokens_per_s / 1e12
    hw_tflops = flops_per_token(s["layers"], s["hidden"], s["seq"], s["vocab"], recompute=recompute) * tokens_per_s / 1e12
    peak, source = mfu.resolve_peak(a.peak_tflops, device.type, name if device.type == "cuda" else None)
    res.update(impl=a.impl, shape=a.shape, micro=a.micro, seq=s["seq"], layers=s["layers"], hidden=s["hidden"],
               vocab=s["vocab"], device=name, tokens_per_s=tokens_per_s, model_tflops=model_tflops,
               hw_tflops=hw_tflops, mfu=mfu.mfu(model_tflops, peak), peak_tflops=peak, peak_source=source,
               peak_memory_gb=peak_memory_gb(device), torch=torch.__version__)
    print("RESULT " + json.dumps(res), flush=True)


def run_case(a, impl: str, shape: str, micro: int) -> dict | None:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--impl", impl, "--shape", shape,
           "--micro", str(micro), "--device", a.device, "--seq", str(a.seq), "--warmup", str(a.warmup),
           "--steps", str(a.steps)] + (["--tiny"] if a.tiny else []) + ["--recompute", a.recompute] \
        + (["--peak-tflops", str(a.peak_tflops)] if a.peak_tflops else [])
    # One process, no launcher: DeepSpeed's PipelineModule still reads LOCAL_RANK.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(BENCH)]), LOCAL_RANK="0")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode == OOM:
        return None
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{impl} {shape} micro {micro} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n"
                         f"{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def fmt(x, spec: str) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer, hidden-64 model at seq 128 (smoke test)")
    ap.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=sorted(SHAPES))
    ap.add_argument("--micro", type=int, default=None, help="micro batch (default 4; 2 with --tiny)")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; 1 with --tiny)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 10; 2 with --tiny)")
    ap.add_argument("--recompute", choices=["none", "selective", "full"], default="none",
                    help="our model's activation recomputation (default none; blocks are compiled on GPUs)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="override the GPU's peak for MFU")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--impl", choices=["ours", "hf"], help=argparse.SUPPRESS)
    ap.add_argument("--shape", help=argparse.SUPPRESS)
    a = ap.parse_args()
    a.micro = a.micro or (2 if a.tiny else 4)
    a.warmup = a.warmup if a.warmup is not None else (1 if a.tiny else 3)
    a.steps = a.steps or (2 if a.tiny else 10)
    if a.child:
        child(a)
        return
    t0 = time.time()
    shapes = ["tiny"] if a.tiny else a.shapes
    results, ratios = [], {}
    for shape in shapes:
        by_impl = {}
        for impl in ("ours", "hf"):
            micro = a.micro
            while micro >= 1:
                res = run_case(a, impl, shape, micro)
                if res is not None:
                    break
                print(f"{impl} {shape}: micro batch {micro} ran out of memory, trying {micro // 2}", flush=True)
                micro //= 2
            if res is None:
                raise SystemExit(f"{impl} {shape}: out of memory even at micro batch 1")
            by_impl[impl] = res
            results.append(res)
        ratios[shape] = by_impl["ours"]["tokens_per_s"] / by_impl["hf"]["tokens_per_s"]
    first = results[0]
    mfu_note = (f"MFU against {first['peak_tflops']:g} TFLOP/s ({first['peak_source']})" if first["peak_tflops"]
                else f"MFU: {first['peak_source']}")
    print(f"device: {first['device']}, torch {first['torch']}, python {platform.python_version()}; "
          f"seq {first['seq']}, vocab {first['vocab']}, bf16; warm-up {a.warmup} + {a.steps} timed steps; "
          f"{mfu_note}; {time.time() - t0:.0f} s")
    print("| shape | impl | micro | step ms | tokens/s | model TFLOP/s | hw TFLOP/s | MFU | peak memory GB | loss |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['shape']} | {r['impl']} | {r['micro']} | {r['step_s'] * 1e3:.1f} | {r['tokens_per_s']:,.0f} | "
              f"{r['model_tflops']:.3g} | {r['hw_tflops']:.3g} | {fmt(r['mfu'], '.1%')} | {r['peak_memory_gb']:.1f} | "
              f"{r['loss']:.3f} |")
    for shape, ratio in ratios.items():
        print(f"{shape}: ours / HF tokens/s = {ratio:.2f}")
    if a.json:
        Path(a.json).write_text(json.dumps({"results": results, "ratio": ratios, "seconds": time.time() - t0},
                                           indent=1) + "\n")


if __name__ == "__main__":
    main()
