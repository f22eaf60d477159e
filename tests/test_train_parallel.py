"""Tensor and pipeline parallelism on gloo: the scripts under tests/dist run on several ranks (mtf_train.ranks,
as the trainer on one machine; torchrun itself is exercised by the SLURM tests) and compare TP/PP runs against
the TP=1, PP=1 model with the same weights (fp32, tolerance 1e-5)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

DIST = Path(__file__).parent / "dist"
ROOT = Path(__file__).resolve().parents[1]


def run_ranks(nproc: int, script: str, *args: str, timeout: float = 240) -> None:
    """tests/dist/`script`'s main(args) on `nproc` ranks."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), str(DIST)]))
    cmd = [sys.executable, "-m", "mtf_train.ranks", "--nproc_per_node", str(nproc), "-m", Path(script).stem, *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (
        f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}")


# The scripts of a world size run one after another on the same ranks (tests/dist/in_sequence.py): one start for
# all of them; a test that runs alone starts only its own.
PIPES = {"pp2": (1, 2, 1, False), "tp2xpp2+universal": (2, 2, 1, True), "pp2xdp2": (1, 2, 2, False)}


def _pipe_args(name: str, folder: Path) -> list[str]:
    tp, pp, _, universal = PIPES[name]
    return ["pipe_parity", str(tp), str(pp), str(folder / f"pipe-{name}.json"), *(["universal"] if universal else [])]


@pytest.fixture(scope="module")
def reports(request, tmp_path_factory) -> Path:
    """The JSON reports of the scripts the selected tests of this module need, in one folder."""
    folder = tmp_path_factory.mktemp("parity")
    wanted = {item.callspec.params.get("name", item.originalname) if hasattr(item, "callspec") else item.originalname
              for item in request.session.items if item.module is request.module}
    by_world: dict[int, list[str]] = {}
    if "test_tp2_matches_tp1" in wanted:
        by_world.setdefault(2, []).append(["tp_parity", str(folder / "tp.json")])
    if "test_chunked_head_loss_matches_logits_path_tp1_tp2" in wanted:
        by_world.setdefault(2, []).append(["loss_parity", str(folder / "loss.json")])
    for name, (tp, pp, dp, _) in PIPES.items():
        if name in wanted:
            by_world.setdefault(tp * pp * dp, []).append(_pipe_args(name, folder))
    for world, scripts in sorted(by_world.items()):
        run_ranks(world, "in_sequence.py", *[a for i, s in enumerate(scripts) for a in (["--"] if i else []) + s],
                  timeout=240 * len(scripts))
    return folder


def test_tp2_matches_tp1(reports):
    report = json.loads((reports / "tp.json").read_text())
    assert report["ok"]
    assert report["local_vocab"] == 128  # each rank really holds half the vocabulary
    assert report["logits_max_diff"] < 1e-5
    assert report["loss"] == pytest.approx(report["ref_loss"], abs=1e-5)
    assert report["grad_max_diff"] < 1e-5 < report["grad_max_abs"]
    assert report["replicated_grad_spread"] == 0.0
    # DeepSpeed engine + MegatronMPU, clipping active (norm > 0.05): same step as clipped SGD at TP=1.
    assert report["ref_grad_norm"] > 0.05
    assert report["step_max_diff"] < 1e-6 < report["step_max_update"]


@pytest.mark.parametrize("name", list(PIPES))
def test_pipeline_matches_plain_model(reports, name):
    tp, pp, dp, universal = PIPES[name]
    world = tp * pp * dp
    ranks = json.loads((reports / f"pipe-{name}.json").read_text())
    assert len(ranks) == world and all(r["ok"] for r in ranks)
    for r in ranks:
        # Rank order: TP fastest, then DP, then PP (megatron-core default = DeepSpeed's pipe/data/model).
        assert r["coords"] == [r["rank"] // (tp * dp), (r["rank"] // tp) % dp, r["rank"] % tp]
        # 4 blocks + 2 embeddings over 2 stages: layers 0-4 | 5-9 (type:transformer|embedding).
        assert r["parts"] == [0, 5, 10]
        assert len(r["losses"]) == 2 and max(abs(a - b) for a, b in zip(r["losses"], r["ref_losses"])) < 1e-5
        assert r["losses"][0] != r["losses"][1]  # the optimizer step changed the model
        assert all(r["mpu"].values()), r["mpu"]
    # Layer files with the model axis, bigscience indices and keys, no _extra_state.
    layer_files = ranks[0]["layer_files"]
    expected = {f"layer_{i:02d}-model_{t:02d}-model_states.pt" for i in (1, 3, 4, 5, 6, 8) for t in range(tp)}
    assert set(layer_files) == expected
    assert layer_files["layer_01-model_00-model_states.pt"] == [
        "word_embeddings.norm.bias", "word_embeddings.norm.weight", "word_embeddings.weight"]
    assert layer_files["layer_08-model_00-model_states.pt"] == ["bias", "weight"]
    assert len(layer_files["layer_03-model_00-model_states.pt"]) == 12
    assert not any("_extra_state" in k for keys in layer_files.values() for k in keys)
    if universal:
        # DeepSpeed's ds_to_universal (strict: every pattern used) merged TP2xPP2 ZeRO-1 shards exactly as
        # hf_names.merge_tp does, stripped the vocabulary padding, and took the tied embedding's layer norm
        # from stage 0 (the last stage's copy is stale: PIPELINE_REPLICATED_PARAMETER_PATTERNS).
        assert ranks[0]["universal"]["stale_norm_differs"]
        assert ranks[0]["universal"]["max_diff"] == 0.0, ranks[0]["universal"]


def test_chunked_head_loss_matches_logits_path_tp1_tp2(reports):
    """The training loss (LM head inside the loss, logits only at target positions, chunked) equals the
    full-logits path in loss and every parameter's gradient at TP=1 and TP=2, fp32 and bf16, with and without
    --norm-target-loss; the pipeline engine's last stage then keeps hidden states, not logits."""
    report = json.loads((reports / "loss.json").read_text())
    assert report["ok"], report
    cases = {(c["tp"], c["dtype"], c["norm"]): c for c in report["cases"]}
    assert len(cases) == 8
    for (tp, dtype, norm), c in cases.items():
        if dtype == "torch.float32":
            assert c["loss_rel"] < 1e-5 and c["grad_rel"] < 1e-5, c
        else:
            assert c["grad_dtype"] == "torch.bfloat16" and c["loss_rel"] < 2e-3 and c["grad_rel"] < 1e-2, c
    # The two normalisations are different losses (the comparison is not trivially of one number).
    assert cases[(2, "torch.float32", True)]["loss"] != pytest.approx(cases[(2, "torch.float32", False)]["loss"])
    assert report["pipe_outputs"] and all(s[-1] == report["hidden_size"] for s in report["pipe_outputs"])
