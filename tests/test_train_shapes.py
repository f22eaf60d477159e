"""Every parallel shape gives the numbers of the simplest one, and checkpoints move between shapes.

The same tiny model, data and seed at (TP, PP, DP) = (1,1,1), (2,1,1), (1,2,1), (1,1,2), (2,2,1) on CPU
(gloo): the loss trajectories agree, and each shape's checkpoint, converted to DeepSpeed's universal form,
loads at every other shape and gives the same next-step loss.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import RECIPES, mtf

TINY = str(RECIPES / "tiny-local.yaml")
SHAPES = [(1, 1, 1), (2, 1, 1), (1, 2, 1), (1, 1, 2), (2, 2, 1)]
STEPS = 4       # trained straight; the checkpoint at step 3 is the one moved between shapes
RTOL = 2e-5     # fp32. Each shape sums some things in another order (row-parallel matmuls under TP, the tied
                # embedding's gradient from two stages under PP, micro-batch means over DP ranks): the last bits
                # differ, nothing else. Seen: at most ~1e-7 relative.


def shape_sets(tp: int, pp: int, dp: int) -> list[str]:
    out = []
    for s in (f"parallel.tp={tp}", f"parallel.pp={pp}", f"cluster.gpus_per_node={tp * pp * dp}", "eval.iters=0",
              "logging.log_interval=1", "checkpoint.interval=3", f"training.train_iters={STEPS}",
              "batch.micro=2", "batch.global=8"):
        out += ["--set", s]
    return out


def train_losses(run: Path) -> list[float]:
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in recs if r["kind"] == "train"]


def new_run(runs: Path) -> Path:
    (run,) = [p for p in runs.glob("tiny-local/*") if not p.name.startswith(".")]
    return run


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[tuple, Path]:
    out = {}
    for shape in SHAPES:
        runs = tmp_path_factory.mktemp("shape-" + "x".join(map(str, shape)))
        proc = mtf("run", TINY, "--runs-dir", str(runs), *shape_sets(*shape), timeout=600)
        assert proc.returncode == 0, f"{shape}: {proc.stdout[-3000:]}{proc.stderr[-3000:]}"
        out[shape] = new_run(runs)
    return out


def test_every_shape_gives_the_same_losses(trained):
    reference = train_losses(trained[(1, 1, 1)])
    assert len(reference) == STEPS and reference[-1] < reference[0]
    for shape, run in trained.items():
        got = train_losses(run)
        assert got == pytest.approx(reference, rel=RTOL), (shape, got, reference)


def to_universal(run: Path) -> Path:
    ckpt = run / "checkpoints"
    if not (ckpt / "latest_universal").exists():
        src, dst = ckpt / "global_step3", ckpt / "global_step3_universal"
        subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(src),
                        "--output_folder", str(dst), "--num_extract_workers", "1", "--num_merge_workers", "1"],
                       check=True, capture_output=True, timeout=300)
        (ckpt / "latest_universal").write_text("global_step3_universal")
    return ckpt


@pytest.mark.parametrize("source", SHAPES, ids=["x".join(map(str, s)) for s in SHAPES])
def test_universal_checkpoints_load_at_every_other_shape(trained, tmp_path, source):
    ckpt = to_universal(trained[source])
    expected = train_losses(trained[source])[3]  # step 4, after resuming from step 3
    for target in SHAPES:
        if target == source:
            continue
        runs = tmp_path / ("to-" + "x".join(map(str, target)))
        proc = mtf("run", TINY, "--runs-dir", str(runs), *shape_sets(*target), "--set", f"checkpoint.load={ckpt}",
                   "--set", "checkpoint.universal=true", timeout=600)
        assert proc.returncode == 0, f"{source}->{target}: {proc.stdout[-3000:]}{proc.stderr[-3000:]}"
        assert "global_step3_universal (iteration 3" in proc.stdout
        got = train_losses(new_run(runs))
        assert len(got) == 1, got  # one step, from iteration 3 to 4
        assert got[0] == pytest.approx(expected, rel=RTOL), (source, target, got[0], expected)
