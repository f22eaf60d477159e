"""Every parallel shape gives the numbers of the simplest one, and checkpoints move between shapes.

The same tiny model, data and seed at (TP, PP, DP) = (1,1,1), (2,1,1), (1,2,1), (1,1,2), (2,2,1) on CPU
(gloo): the loss trajectories agree, and each shape's checkpoint, converted to DeepSpeed's universal form,
loads at the next shape of a ring (every shape is a source once and a target once: each TP, PP and DP change
both ways) and gives the same next-step loss.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures import SHAPE_STEPS, shape_sets, view
from tests.helpers import RECIPES, mtf

TINY = str(RECIPES / "tiny-local.yaml")
SHAPES = [(1, 1, 1), (2, 1, 1), (1, 2, 1), (1, 1, 2), (2, 2, 1)]
STEPS = 4       # trained straight; the checkpoint at step 3 is the one moved between shapes
RTOL = 2e-5     # fp32. Each shape sums some things in another order (row-parallel matmuls under TP, the tied
                # embedding's gradient from two stages under PP, micro-batch means over DP ranks): the last bits
                # differ, nothing else. Seen: at most ~1e-7 relative.


def train_losses(run: Path) -> list[float]:
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in recs if r["kind"] == "train"]


def new_run(runs: Path) -> Path:
    (run,) = [p for p in runs.glob("tiny-local/*") if not p.name.startswith(".")]
    return run


# DeepSpeed's own converter (deepspeed.checkpoint.ds_to_universal, as its command line runs it) for each
# (input, output) pair of argv, in one process: it imports torch and DeepSpeed once for all of them.
_TO_UNIVERSAL = """import sys
from deepspeed.checkpoint import ds_to_universal
pairs = sys.argv[1:]
for src, dst in zip(pairs[::2], pairs[1::2]):
    sys.argv = ["ds_to_universal", "--input_folder", src, "--output_folder", dst, "--num_extract_workers", "1",
                "--num_merge_workers", "1"]
    ds_to_universal.main(ds_to_universal.parse_arguments())
"""


@pytest.fixture(scope="module")
def trained(shape_run, tmp_path_factory) -> dict[tuple, Path]:
    """Each shape's shared 4-step run (tests/fixtures.py), copied with its step-3 checkpoint and, next to it,
    that checkpoint in DeepSpeed's universal form (`latest_universal`)."""
    assert SHAPE_STEPS == STEPS
    runs = {shape: view(shape_run(*shape), tmp_path_factory.mktemp("shape-" + "x".join(map(str, shape))) / "run", [3])
            for shape in SHAPES}
    pairs = [str(run / "checkpoints" / name) for run in runs.values()
             for name in ("global_step3", "global_step3_universal")]
    subprocess.run([sys.executable, "-c", _TO_UNIVERSAL, *pairs], check=True, capture_output=True, timeout=600)
    for run in runs.values():
        (run / "checkpoints" / "latest_universal").write_text("global_step3_universal")
    return runs


def test_every_shape_gives_the_same_losses(trained):
    reference = train_losses(trained[(1, 1, 1)])
    assert len(reference) == STEPS and reference[-1] < reference[0]
    for shape, run in trained.items():
        got = train_losses(run)
        assert got == pytest.approx(reference, rel=RTOL), (shape, got, reference)


RING = [(SHAPES[i], SHAPES[(i + 1) % len(SHAPES)]) for i in range(len(SHAPES))]


@pytest.mark.parametrize("source,target", RING, ids=["x".join(map(str, s)) + "-to-" + "x".join(map(str, t))
                                                     for s, t in RING])
def test_universal_checkpoint_loads_at_the_next_shape(trained, tmp_path, source, target):
    ckpt = trained[source] / "checkpoints"
    expected = train_losses(trained[source])[3]  # step 4, after resuming from step 3
    runs = tmp_path / ("to-" + "x".join(map(str, target)))
    proc = mtf("run", TINY, "--runs-dir", str(runs), *shape_sets(*target), "--set", f"checkpoint.load={ckpt}",
               "--set", "checkpoint.universal=true", timeout=600)
    assert proc.returncode == 0, f"{source}->{target}: {proc.stdout[-3000:]}{proc.stderr[-3000:]}"
    assert "global_step3_universal (iteration 3" in proc.stdout
    got = train_losses(new_run(runs))
    assert len(got) == 1, got  # one step, from iteration 3 to 4
    assert got[0] == pytest.approx(expected, rel=RTOL), (source, target, got[0], expected)
