"""Verification runs: the real model (megatron-core layers, DeepSpeed pipeline engine), one process per rank
started by mtf_train.ranks, at a checkpoint's shape, on a fixed batch.

`run_worker(spec)` writes the spec, launches `python -m mtf_train.ckpt.worker` with tp*pp*dp processes and
returns the worker's results: the loss and the logits of a fixed row after loading, the loss of one training
step on the fixed batch and the loss and logits after that step. Comparing two runs (two shapes, or ours and
transformers') is `compare`. Tolerances depend on the dtype the model computes in. `verify_spec` makes the
spec for a source checkpoint, `estimate_fits` says whether both runs fit on this machine.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

from mtf_train import ranks
from mtf_train.ckpt.errors import VerifyError
from mtf_train.ckpt.layout import human, mem_available
from mtf_train.ckpt.source import Source
from mtf_train.files import atomic_path

# (relative tolerance of losses, absolute tolerance of logits relative to their largest magnitude)
TOLERANCE = {"float32": (2e-5, 1e-4), "bfloat16": (1e-3, 2e-2), "float16": (1e-3, 1e-2)}
# Logits are compared against their scale: TP and PP change summation orders, nothing else.


def fixed_batch(rows: int, seq: int, vocab: int, seed: int = 1234, single_segment: bool = False):
    """`rows` packed rows of `seq + 1` ids in [0, vocab): a few examples per row, each an input part then a
    target part (so the target-only loss has terms). Deterministic and independent of the shape."""
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (rows, seq + 1), generator=g)
    segs = torch.ones(rows, seq + 1, dtype=torch.long)
    is_input = torch.zeros(rows, seq + 1, dtype=torch.bool)
    for r in range(rows):
        if single_segment:
            is_input[r, : (seq + 1) // 3] = True
            continue
        pos, seg = 0, 1
        while pos < seq + 1:
            n = int(torch.randint(8, max(9, (seq + 1) // 2), (1,), generator=g))
            end = min(seq + 1, pos + n)
            segs[r, pos:end] = seg
            is_input[r, pos:pos + max(1, (end - pos) // 2)] = True
            pos, seg = end, seg + 1
    return ids, segs, is_input


def world_of(spec: dict) -> int:
    return spec["tp"] * spec["pp"] * spec.get("dp", 1)


def cache_dir() -> Path:
    return Path(os.environ.get("MTF_CKPT_CACHE") or Path.home() / ".cache" / "mtf-train" / "ckpt-verify")


def _cache_key(spec: dict) -> str | None:
    """Probes of an unchanged checkpoint are cached (keyed by the spec and the files' sizes and mtimes), so
    that reshaping or exporting the same checkpoint twice measures the source once."""
    import hashlib

    if spec["mode"] != "probe" or not spec.get("load"):
        return None
    step = Path(spec["load"]) / spec["tag"]
    try:
        files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in step.iterdir() if p.is_file())
    except OSError:
        return None
    blob = json.dumps([{k: v for k, v in spec.items() if k != "result"}, str(step.resolve()), files], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def run_worker(spec: dict, workdir: Path, timeout: float | None = None, label: str = "") -> dict:
    """Run the worker for `spec` on this machine; its results (with logits tensors loaded)."""
    import shutil

    import torch

    key = _cache_key(spec)
    cached = cache_dir() / f"{key}.pt" if key else None
    if cached is not None and cached.exists():
        try:
            return torch.load(cached, weights_only=True)
        except Exception:  # a damaged cache entry: measure again
            cached.unlink(missing_ok=True)
    result = _run_worker(spec, workdir, timeout, label)
    if cached is not None:
        try:
            with atomic_path(cached) as tmp:
                shutil.copyfile(workdir / f"{label or spec['mode']}.result.pt", tmp)
        except OSError:
            pass
    return result


def _run_worker(spec: dict, workdir: Path, timeout: float | None, label: str) -> dict:
    import torch

    workdir.mkdir(parents=True, exist_ok=True)
    name = label or spec["mode"]
    spec = dict(spec, result=str(workdir / f"{name}.result.pt"))
    spec_path = workdir / f"{name}.spec.json"
    spec_path.write_text(json.dumps(spec, indent=1))
    world = world_of(spec)
    env = {"PYTHONUNBUFFERED": "1", "CUDA_DEVICE_MAX_CONNECTIONS": os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS", "1")}
    log = workdir / f"{name}.log"
    log.write_bytes(b"")
    # Forked from this process where it can (its imports then serve every run of this command); on a timeout or
    # Ctrl-C the ranks are killed.
    code = ranks.run(world, "mtf_train.ckpt.worker", [str(spec_path)], log, cwd=workdir, env=env, timeout=timeout)
    if code != 0 or not Path(spec["result"]).exists():
        tail = _error_line(log.read_text(errors="replace"))
        raise VerifyError(name, f"the {world}-process run at tp {spec['tp']} x pp {spec['pp']} x dp "
                          f"{spec.get('dp', 1)} failed: {tail} (log: {log})")
    return torch.load(spec["result"], weights_only=True)


def _error_line(text: str) -> str:
    lines = [x.strip() for x in text.splitlines() if x.strip()]
    for line in reversed(lines):
        for key in ("Error:", "Error ", "error:", "Exception:"):
            if key in line:
                return line.split("]:", 1)[-1].strip()[:300]
    return (lines[-1] if lines else "no output")[:300]


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def logits_diff(a, b, vocab: int) -> float:
    """Max |a - b| over the first `vocab` columns, relative to the largest |b| (at least 1)."""
    a, b = a[..., :vocab].float(), b[..., :vocab].float()
    return float((a - b).abs().max()) / max(1.0, float(b.abs().max()))


def check(name: str, diff: float, tolerance: float, got: float | None = None,
          expected: float | None = None) -> dict:
    """One verified quantity, as `--json` prints it."""
    out = {"name": name, "max_rel_diff": diff, "tolerance": tolerance, "ok": diff <= tolerance and math.isfinite(diff)}
    if got is not None:
        out.update(got=got, expected=expected)
    return out


def check_status(c: dict) -> str:
    """`ok   max rel diff 1.2e-06 (tolerance 1e-04)`: a check's outcome as every human line shows it."""
    vals = f" ({c['got']:.6f} vs {c['expected']:.6f})" if "got" in c else ""
    return (f"{'ok  ' if c['ok'] else 'FAIL'} max rel diff {c['max_rel_diff']:.2e} (tolerance {c['tolerance']:.0e})"
            f"{vals}")


def check_line(c: dict, label: str | None = None) -> str:
    return f"  {label or c['name']:17s} {check_status(c)}"


def compare(reference: dict, got: dict, dtype: str, vocab: int, what: str, steps: bool = True,
            tolerance: tuple | None = None) -> list[dict]:
    """The checks (see `check`), each printed; raises VerifyError when a quantity is out of tolerance."""
    loss_tol, logit_tol = TOLERANCE.get(dtype, TOLERANCE["float32"])
    if tolerance:
        loss_tol, logit_tol = max(loss_tol, tolerance[0]), max(logit_tol, tolerance[1])
    checks = [check("loss", rel(got["loss0"], reference["loss0"]), loss_tol, got["loss0"], reference["loss0"]),
              check("logits", logits_diff(got["logits0"], reference["logits0"], vocab), logit_tol)]
    if steps:
        checks += [check("next-step loss", rel(got["loss1"], reference["loss1"]), loss_tol, got["loss1"],
                         reference["loss1"]),
                   check("next-step logits", logits_diff(got["logits1"], reference["logits1"], vocab), logit_tol)]
    print("\n".join(check_line(c) for c in checks))
    bad = [f"{c['name']} differs by {c['max_rel_diff']:.2e} (tolerance {c['tolerance']:.0e})"
           for c in checks if not c["ok"]]
    if bad:
        raise VerifyError(what, "verification failed: " + "; ".join(bad))
    return checks


def verify_spec(src: Source, mode: str, folder: Path, tag: str, tp: int, pp: int, dp: int, rows: int,
                padded: int, universal: bool = False, **extra) -> dict:
    a = src.args
    ds_cfg = dict(src.client.get("ds_config") or {})
    if src.dtype == "bfloat16" and not (ds_cfg.get("zero_optimization") or {}).get("stage"):
        # 2022's bf16 + ZeRO-0 (BF16_Optimizer) does not reload with current DeepSpeed; ZeRO-1 with fp32
        # gradient accumulation builds the same optimizer and reads the same files
        ds_cfg = {}
    if not ds_cfg:
        ds_cfg = {"zero_optimization": {"stage": 1}, "gradient_clipping": a.get("clip_grad", 1.0)}
        if src.dtype == "bfloat16":
            ds_cfg.update(bf16={"enabled": True}, data_types={"grad_accum_dtype": "fp32"})
    return dict(
        mode=mode, load=str(folder) if folder else None, tag=tag, universal=universal, tp=tp, pp=pp, dp=dp,
        model=src.model_spec(padded), norm_target_loss=bool(a.get("norm_target_loss")),
        partition_method=src.partition_method, seed=int(a.get("seed") or 1234), ds_config=ds_cfg,
        optimizer=dict(lr=float(a.get("lr") or 1e-4), weight_decay=float(a.get("weight_decay", 0.01)),
                       beta1=float(a.get("adam_beta1", 0.9)), beta2=float(a.get("adam_beta2", 0.999)),
                       eps=float(a.get("adam_eps", 1e-8))),
        step_lr=float(a.get("lr") or 1e-4),
        batch=dict(rows=rows, seq=min(int(a.get("seq_length") or 128), 128), vocab=src.original_vocab, seed=1234),
        **extra)


def estimate_fits(src: Source, tp: int, pp: int, dp: int) -> tuple[bool, str]:
    """Can both verification runs happen on this machine? Each holds the whole model and optimizer state
    (about the checkpoint's size, more at dp > 1) plus a process per rank."""
    size = sum(p.stat().st_size for p in src.ck.files())
    per_process = 600 << 20
    need = int(size * 1.6) * max(1, dp, src.ck.dp) + per_process * max(tp * pp * dp, src.ck.tp * src.ck.pp * src.ck.dp)
    avail = mem_available()
    cpus = os.cpu_count() or 1
    world = max(tp * pp * dp, src.ck.tp * src.ck.pp * src.ck.dp)
    if need > avail * 0.8:
        return False, f"verification needs about {human(need)} of memory, {human(avail)} is available"
    if world > max(8, 4 * cpus):
        return False, f"verification needs {world} processes, this machine has {cpus} CPUs"
    return True, ""


def run_probe(src: Source, folder: Path, tag: str, tp: int, pp: int, dp: int, rows: int, padded: int,
              scratch: Path, label: str) -> dict:
    spec = verify_spec(src, "probe", folder, tag, tp, pp, dp, rows=rows, padded=padded)
    return run_worker(spec, scratch, label=label)

