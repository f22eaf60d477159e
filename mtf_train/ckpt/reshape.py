"""`mtf-train ckpt reshape DIR --tp T --pp P [--dp D] -o OUT`: a checkpoint at another shape, verified.

The direct method writes the ordinary checkpoint the trainer would save at the new shape, tensor by tensor:
for every parameter and every state (fp32 master weights, Adam's exp_avg and exp_avg_sq) it reads the source
fragments out of the ZeRO shards (`fragments`, through `torchzip.TorchFile`: no whole-file loads), merges them
over tensor ranks with BLOOM's rules (`hf_names`: replicated ones averaged, row-parallel on dim 1, the rest on
dim 0; vocabulary padding re-cut when the padded size changes), splits them for the new tensor ranks and writes
each piece into its place in the new ZeRO shards, which were laid out first as reserved, sparse files
(`direct`, through `torchzip.SkeletonFile`). The layout of the new shards is DeepSpeed's own (`zero`: stage
partitioning by `partition_balanced`, the optimizer's parameter groups, flat groups aligned to 2 x dp and split
in dp partitions); before writing anything, the same code must reproduce the source checkpoint's recorded
layout exactly, or it refuses. What the source is (shapes, vocabulary, saved arguments) is `source`; this
module only orchestrates. Memory stays at about twice the largest parameter, whatever the checkpoint's size.

The universal method is DeepSpeed's route: `to-universal` into a scratch folder, then the model loads it at
the new shape (`worker resave`) and saves an ordinary checkpoint.

Either way OUT resumes plainly (`--load OUT`, no universal flag): `latest`, the client state's iteration and
consumed samples, and its args with the new shape. Verification then runs the real model at both shapes on a
fixed batch (`verify.py`): loss and logits equal within the dtype's tolerance, and after one training step on
the same batch with the same learning rate the loss and logits still agree, which only holds if the
optimizer's states came along. OUT appears (renamed from a scratch sibling) only after all of it passed.
"""
from __future__ import annotations

import math
import shutil
import sys
import time
from pathlib import Path

from mtf_train.ckpt.direct import client_state, write_direct
from mtf_train.ckpt.errors import CkptError, VerifyError
from mtf_train.ckpt.layout import check_output, human, staged
from mtf_train.ckpt.source import check_shape, read_source, target_padded_vocab
from mtf_train.ckpt.verify import compare, estimate_fits, run_probe, run_worker, verify_spec

RECUT_TOLERANCE = (1e-3, 1e-2)  # losses, logits: when the padded vocabulary size changes with TP
# what the trainer itself puts in the client state (checkpoint.save); DeepSpeed adds the rest
TRAINER_KEYS = ("iteration", "consumed_train_samples", "consumed_valid_samples", "args", "padded_vocab_size",
                "original_vocab_size")


def check_request(folder, step: int | None, tp: int, pp: int, dp: int, out: Path,
                  torch_free: bool = False) -> tuple:
    """(source, target padded vocabulary) after every check of the input, the target shape and the output
    folder; `torch_free`: the same checks before torch is imported (`read_source`)."""
    src = read_source(folder, step, torch_free=torch_free)
    check_shape(src, tp, pp, dp)
    check_output(out)
    return src, target_padded_vocab(src, tp)


def reshape(folder, *, tp: int, pp: int, dp: int = 1, output, step: int | None = None, method: str = "direct",
            verify: bool = True, recipe: str | None = None, sets=(), job: str | None = None,
            here: bool = False) -> dict:
    """Reshape DIR's step into `output`; returns what was done (the `--json` object)."""
    out = Path(output).resolve()
    src, padded = check_request(folder, step, tp, pp, dp, out, torch_free=bool(job))  # a job reads no tensors here
    ck = src.ck
    shape_from = f"tp {ck.tp} x pp {ck.pp} x dp {ck.dp}"
    shape_to = f"tp {tp} x pp {pp} x dp {dp}"
    fits, why = (True, "") if here else estimate_fits(src, tp, pp, dp)
    if job or (not fits and (verify or method == "universal")):
        if not job and not recipe:
            raise CkptError(str(ck.path), f"too large for this machine ({why}): pass --recipe RECIPE (and --job "
                            "FILE) to render the reshape as a job for the recipe's cluster, or --no-verify with "
                            "--method direct")
        from mtf_train.ckpt.jobs import render_reshape_job

        path = render_reshape_job(src, tp=tp, pp=pp, dp=dp, out=out, method=method, verify=verify, recipe=recipe,
                                  sets=sets, job=job)
        print(f"{ck.path} ({shape_from}) -> {out} ({shape_to}): {why or 'job requested'}; rendered {path}\n"
              f"submit it with: sbatch {path}")
        return {"input": str(ck.path), "output": str(out), "job": str(path), "reason": why or "job requested"}

    size = sum(p.stat().st_size for p in ck.files())
    print(f"reshape {ck.path} ({shape_from}, iteration {src.client.get('iteration', ck.iteration)}, "
          f"{human(size)}) -> {out} ({shape_to}), method {method}", flush=True)
    t0 = time.perf_counter()
    checks = []
    import tempfile

    scratch = Path(tempfile.mkdtemp(prefix="mtf-ckpt-"))  # logs of the runs: kept only when one fails
    with staged(out) as tmp:
        if method == "direct":
            bar = _Progress(len(ck.layers) + len(src.full_shapes))
            stats = write_direct(src, tp, pp, dp, tmp, out, progress=bar)
            bar.close()
            took = time.perf_counter() - t0
            print(f"wrote {human(stats['written'])} in {took:.1f} s ({size / took / 1e9:.3f} GB/s read)", flush=True)
        else:
            import torch

            from mtf_train.ckpt.universal import to_universal

            uni = to_universal(ck.path, output_root=scratch / "universal", quiet=True,
                               keep_vocab_padding=padded == src.padded_vocab)
            client = {k: v for k, v in client_state(src, tp, pp, dp, out, padded).items() if k in TRAINER_KEYS}
            torch.save(client, scratch / "client.pt")
            spec = verify_spec(src, "resave", uni.parent, uni.name, tp, pp, dp, rows=2 * math.lcm(dp, ck.dp),
                               padded=padded, universal=True, save=str(tmp), client=str(scratch / "client.pt"))
            spec["save_tag"] = ck.tag
            run_worker(dict(spec, steps=False), scratch, label="resave")
            print(f"loaded the universal form at {shape_to} and saved in {time.perf_counter() - t0:.1f} s",
                  flush=True)
        if verify:
            rows = 2 * math.lcm(dp, ck.dp)
            print(f"verifying with the model at {shape_from} and at {shape_to} ...", flush=True)
            ref = run_probe(src, ck.root, ck.tag, ck.tp, ck.pp, ck.dp, rows, src.padded_vocab, scratch, "source")
            got = run_probe(src, tmp, ck.tag, tp, pp, dp, rows, padded, scratch, "reshaped")
            recut = padded != src.padded_vocab
            if recut:
                print(f"  the padded vocabulary changes ({src.padded_vocab} -> {padded}): its padding rows are re-cut, "
                      f"which moves the softmax a little; losses are compared at {RECUT_TOLERANCE[0]:.0e}")
            checks = compare(ref, got, src.dtype, src.original_vocab, str(out),
                             tolerance=RECUT_TOLERANCE if recut else None)
            if got.get("iteration") != ref.get("iteration"):
                raise VerifyError(str(out), f"iteration {got.get('iteration')} after loading, expected "
                                  f"{ref.get('iteration')}")
        shutil.rmtree(scratch, ignore_errors=True)
    took = time.perf_counter() - t0
    print(f"done: {out} resumes with --load {out} at {shape_to} ({took:.1f} s)")
    return {"input": str(ck.path), "output": str(out), "iteration": src.client.get("iteration", ck.iteration),
            "from": {"tp": ck.tp, "pp": ck.pp, "dp": ck.dp}, "to": {"tp": tp, "pp": pp, "dp": dp},
            "method": method, "verified": verify, "checks": checks, "seconds": round(took, 3)}


class _Progress:
    """A one-line progress bar on stderr (only when it is a terminal)."""

    def __init__(self, total: int):
        self.total, self.done, self.t0 = total, 0, time.perf_counter()
        self.on = sys.stderr.isatty()

    def __call__(self, what: str):
        self.done += 1
        if self.on:
            n = int(30 * self.done / max(1, self.total))
            sys.stderr.write(f"\r[{'#' * n}{'.' * (30 - n)}] {self.done}/{self.total} {what[:40]:40s}")
            sys.stderr.flush()

    def close(self):
        if self.on:
            sys.stderr.write("\n")

