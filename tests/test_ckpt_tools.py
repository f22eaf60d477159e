"""`mtf-train ckpt`: inspect, to-universal, reshape, export-hf, import-hf on tiny checkpoints trained through
the CLI (real DeepSpeed, megatron-core and transformers, CPU/gloo).

Each reshape verifies itself (the model at both shapes: loss and logits on a fixed batch, and the loss and
logits after one more training step, which needs the optimizer states); the tests check that it says so,
that the output resumes plainly in the trainer, and that every bad input is one line with nothing written.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from tests.fixtures import view
from tests.helpers import RECIPES, assert_torch_free_read_equal, mtf, mtf_imports, one_line_error

TINY = str(RECIPES / "tiny-local.yaml")
SHAPES = {"tp1": (1, 1), "tp2": (2, 1), "pp2": (1, 2), "tp2pp2": (2, 2)}


def sets(*items: str) -> list[str]:
    out = []
    for item in items:
        out += ["--set", item]
    return out


def train_sets(tp: int, pp: int, iters: int) -> list[str]:
    return sets(f"parallel.tp={tp}", f"parallel.pp={pp}", f"cluster.gpus_per_node={tp * pp}", "eval.iters=0",
                "logging.log_interval=1", "checkpoint.interval=2", f"training.train_iters={iters}", "batch.micro=2",
                "batch.global=8", "logging.loss_curve=false")


def only_run(runs: Path) -> Path:
    (run,) = [p for p in (runs / "tiny-local").iterdir() if not p.name.startswith(".")]
    return run


def losses(run: Path) -> dict[int, float]:
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["iteration"]: r["loss"] for r in recs if r["kind"] == "train"}


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def diffs(stdout: str) -> dict[str, float]:
    """The verified checks of a conversion's `--json` object (name -> max rel diff), all of them ok."""
    checks = json.loads(stdout)["checks"]
    assert all(c["ok"] and c["max_rel_diff"] <= c["tolerance"] for c in checks), checks
    return {c["name"]: c["max_rel_diff"] for c in checks}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return {"MTF_CKPT_CACHE": str(tmp_path_factory.mktemp("probe-cache"))}


@pytest.fixture(scope="module")
def trained(shape_run, tmp_path_factory) -> dict[str, Path]:
    """Checkpoint folders of the tiny model trained at each shape (tp1: 3 steps, saved at 2 and 3; the others
    2 steps): copies of the shared runs' first steps (tests/fixtures.py; the same numbers as runs that stop
    there)."""
    out = {}
    for name, (tp, pp) in SHAPES.items():
        steps = [2, 3] if name == "tp1" else [2]
        out[name] = view(shape_run(tp, pp, 1), tmp_path_factory.mktemp(f"train-{name}") / "run", steps) / "checkpoints"
    out["tp1-run"] = out["tp1"].parent
    return out


def test_reshape_layout_names_follow_the_model():
    """reshape partitions stages by `hf_names.layer_spec_names` without importing the model, which builds its
    specs from the same list: each name must be the class or function DeepSpeed's `type:` partitioning sees."""
    from deepspeed.pipe import LayerSpec

    from mtf_train.train.hf_names import layer_spec_names
    from mtf_train.train.model import BloomModelConfig, layer_specs

    specs = layer_specs(BloomModelConfig(num_layers=3, hidden_size=8, num_heads=2, padded_vocab_size=16))
    assert layer_spec_names(3) == [s.typename.__name__ if isinstance(s, LayerSpec) else s.__name__ for s in specs]


def test_inspect_reads_shape_and_sizes(trained, env):
    proc, imported = mtf_imports("ckpt", "inspect", str(trained["tp2pp2"]), "--json", env=env)
    assert proc.returncode == 0 and imported == [], (imported, proc.stderr)  # read without torch or DeepSpeed
    info = json.loads(proc.stdout)
    assert (info["tp"], info["pp"], info["dp"], info["iteration"]) == (2, 2, 1, 2)
    assert info["dtype"] == "float32" and info["optimizer_states"] and info["zero_stage"] == 1
    assert info["parameters"] == 264_064  # 2 layers, hidden 64, vocab 2560: the TP shards summed once
    assert info["padded_vocab_size"] == 2560 and info["original_vocab_size"] == 2531
    assert info["universal"] is None and info["universal_info"]
    assert info["sizes"]["total"] == sum(p.stat().st_size for p in (trained["tp2pp2"] / "global_step2").iterdir())
    text = mtf("ckpt", "inspect", str(trained["tp1-run"]), env=env, check=True).stdout  # a run folder works too
    assert "tp 1 x pp 1 x dp 1" in text and "iteration    3" in text


def test_torch_free_reads_equal_torchs(trained):
    """What inspect and the tools' input checks read without torch is what the torch reader gives, file by file:
    the same structure, tensors' dtypes, shapes and offsets, DeepSpeed's records' fields."""
    from mtf_train.ckpt.inspect import _inspect

    for name in SHAPES:
        files = sorted(trained[name].rglob("*.pt"))
        assert len(files) >= 6, files
        for path in files:
            assert_torch_free_read_equal(path)
        assert _inspect(trained[name], None, True, torch_free=True) == _inspect(trained[name], None, True,
                                                                                torch_free=False)


def test_a_torch_global_without_a_stand_in_is_read_with_torch(trained, env, tmp_path):
    """A global torch's allowlist has but the torch-free reader does not (here an fp8 dtype in the saved args):
    NeedsTorch, and inspect and the input checks read the file with torch instead, as before."""
    import torch

    from mtf_train.ckpt.torchzip import NeedsTorch, TorchFile

    ck = tmp_path / "ck"
    shutil.copytree(trained["tp2"], ck)
    mp = ck / "global_step2" / "mp_rank_00_model_states.pt"
    sd = torch.load(mp, weights_only=False)
    sd["args"]["fp8_dtype"] = torch.float8_e4m3fn
    torch.save(sd, mp)
    with TorchFile(mp) as tf, pytest.raises(NeedsTorch, match="torch.float8_e4m3fn"):
        tf.load(torch_free=True)
    proc, imported = mtf_imports("ckpt", "inspect", str(ck), "--json", env=env)
    assert proc.returncode == 0 and "torch" in imported, (imported, proc.stderr)
    assert json.loads(proc.stdout)["tp"] == 2
    assert "heads are not divisible by tensor parallel size 3" in one_line_error(
        mtf("ckpt", "reshape", str(ck), "--tp", "3", "--pp", "1", "-o", str(tmp_path / "out"), env=env))


RESHAPES = [("tp1", 2, 1), ("tp2", 1, 1), ("tp1", 1, 2), ("pp2", 1, 1), ("tp2pp2", 1, 1)]


@pytest.fixture(scope="session")
def reshaped() -> dict:
    """Outputs of the reshape tests, for the tests that use them (session-wide: under pytest-xdist a worker may
    run another module's tests in between, which would end a module fixture)."""
    return {}


@pytest.mark.parametrize("source,tp,pp", RESHAPES, ids=[f"{s}-to-tp{t}pp{p}" for s, t, p in RESHAPES])
def test_reshape_verifies_and_leaves_input_alone(trained, env, reshaped, tmp_path_factory, source, tp, pp):
    src = trained[source]
    before = snapshot(src)
    out = tmp_path_factory.mktemp("reshape") / f"{source}-to-tp{tp}pp{pp}"
    step = ["--step", "2"] if source == "tp1" else []
    proc = mtf("ckpt", "reshape", str(src), "--tp", str(tp), "--pp", str(pp), "-o", str(out), *step, "--json",
               env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    d = diffs(proc.stdout)
    assert set(d) == {"loss", "logits", "next-step loss", "next-step logits"}, proc.stdout
    assert d["loss"] <= 2e-5 and d["next-step loss"] <= 2e-5 and d["logits"] <= 1e-4, d
    result = json.loads(proc.stdout)
    assert (result["output"], result["to"], result["iteration"]) == (str(out), {"tp": tp, "pp": pp, "dp": 1}, 2)
    assert re.search(r"^\s+next-step loss\s+ok\s+max rel diff", proc.stderr, re.M)  # the human lines, on stderr
    assert snapshot(src) == before                                   # the input is never modified
    assert [p.name for p in out.parent.iterdir()] == [out.name]      # no scratch folder left next to it
    info = json.loads(mtf("ckpt", "inspect", str(out), "--json", env=env, check=True).stdout)
    assert (info["tp"], info["pp"], info["dp"], info["iteration"]) == (tp, pp, 1, 2)
    assert info["parameters"] == 264_064 and info["consumed_train_samples"] == 16
    reshaped[(source, tp, pp)] = (out, d)
    print(f"{source} -> tp{tp} pp{pp}: {d}")


def test_reshaped_checkpoint_resumes_plainly_in_the_trainer(trained, reshaped, env, tmp_path):
    """tp1's step-2 checkpoint reshaped to tp2 resumes with a plain --load (no universal flag) and its step 3
    has tp1's step-3 loss."""
    if ("tp1", 2, 1) in reshaped:
        out, _ = reshaped[("tp1", 2, 1)]
    else:  # run alone, or before the reshape test: reshape here (verified by that test, not again)
        out = tmp_path / "tp1-to-tp2pp1"
        mtf("ckpt", "reshape", str(trained["tp1"]), "--tp", "2", "--pp", "1", "-o", str(out), "--step", "2",
            "--no-verify", env=env, check=True, timeout=600)
    proc = mtf("run", TINY, "--runs-dir", str(tmp_path), *train_sets(2, 1, 3), *sets(f"checkpoint.load={out}"),
               timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"loaded {out}/global_step2 (iteration 2)" in proc.stdout
    got = losses(only_run(tmp_path))
    assert list(got) == [3]
    expected = losses(trained["tp1-run"])[3]
    assert got[3] == pytest.approx(expected, rel=2e-5), (got, expected)


def test_reshape_detects_lost_optimizer_state(trained, env, tmp_path):
    """The next-step comparison is what proves the optimizer states came along: zero them and it fails."""
    import torch

    from mtf_train.ckpt.errors import VerifyError
    from mtf_train.ckpt.direct import write_direct
    from mtf_train.ckpt.source import read_source
    from mtf_train.ckpt.verify import run_probe
    from mtf_train.ckpt.verify import compare

    src = read_source(trained["tp2"])
    out = tmp_path / "out"
    write_direct(src, 1, 1, 1, out, out)
    for f in (out / "global_step2").glob("*optim_states.pt"):
        sd = torch.load(f, weights_only=False)
        for state in sd["optimizer_state_dict"]["base_optimizer_state"]["state"].values():
            state["exp_avg"].zero_()
            state["exp_avg_sq"].zero_()
        torch.save(sd, f)
    import os

    os.environ.update(env)
    ref = run_probe(src, src.ck.root, "global_step2", 2, 1, 1, 2, 2560, tmp_path / "s", "source")
    got = run_probe(src, out, "global_step2", 1, 1, 1, 2, 2560, tmp_path / "s", "tampered")
    assert got["loss0"] == pytest.approx(ref["loss0"], rel=2e-5)   # weights alone agree ...
    with pytest.raises(VerifyError, match="next-step"):            # ... the next step does not
        compare(ref, got, "float32", 2531, "tampered")


def test_export_hf_then_import_hf(trained, env, tmp_path):
    hf_dir = tmp_path / "hf"
    proc = mtf("ckpt", "export-hf", str(trained["tp2pp2"]), "-o", str(hf_dir), env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert re.search(r"transformers BloomForCausalLM loads it; logits vs ours at tp 2 x pp 2: ok\s+max rel diff", proc.stdout)
    assert "{" not in proc.stdout  # without --json: human lines only
    cfg = json.loads((hf_dir / "config.json").read_text())
    assert cfg["vocab_size"] == 2560 and cfg["architectures"] == ["BloomForCausalLM"]
    assert (cfg["unk_token_id"], cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (0, 1, 2, 3)
    assert (hf_dir / "model.safetensors").exists() and (hf_dir / "tokenizer.json").exists()

    # back into our layout at another shape, then a run starts finetuning from it
    ours = tmp_path / "imported"
    proc = mtf("ckpt", "import-hf", str(hf_dir), "--tp", "1", "--pp", "2", "-o", str(ours), "--json", env=env,
               timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert diffs(proc.stdout).keys() == {"transformers logits"}
    assert json.loads(proc.stdout)["checks"][0]["transformers_class"] == "BloomForCausalLM"
    info = json.loads(mtf("ckpt", "inspect", str(ours), "--json", env=env, check=True).stdout)
    assert (info["tp"], info["pp"], info["iteration"], info["original_vocab_size"]) == (1, 2, 0, 2531)
    runs = tmp_path / "runs"
    proc = mtf("run", TINY, "--runs-dir", str(runs), *train_sets(1, 2, 1), *sets(f"checkpoint.load={ours}"),
               timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"loaded {ours}/global_step0 (iteration 0)" in proc.stdout
    assert list(losses(only_run(runs))) == [1]


def test_to_universal_supplies_bloom_patterns_for_2022_checkpoints(trained, env, tmp_path):
    """A checkpoint without universal_checkpoint_info (as 2022 Megatron-DeepSpeed wrote them) converts with
    BLOOM's patterns and gives the same universal tensors as one that has them."""
    import torch

    old = tmp_path / "old"
    shutil.copytree(trained["pp2"], old)
    for f in (old / "global_step2").glob("mp_rank_*"):
        sd = torch.load(f, weights_only=False)
        del sd["universal_checkpoint_info"]
        torch.save(sd, f)
    proc = mtf("ckpt", "to-universal", str(old), env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "BLOOM's patterns supplied" in proc.stdout
    assert (old / "latest_universal").read_text() == "global_step2_universal"
    ref = tmp_path / "ref"
    proc = mtf("ckpt", "to-universal", str(trained["pp2"]), "-o", str(ref), env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = sorted(p.relative_to(ref / "global_step2_universal")
                   for p in (ref / "global_step2_universal" / "zero").rglob("*.pt"))
    assert len(names) > 80
    for name in names:
        a = torch.load(ref / "global_step2_universal" / name, weights_only=False)
        b = torch.load(old / "global_step2_universal" / name, weights_only=False)
        if isinstance(a, dict) and "param" in a:
            assert torch.equal(a["param"], b["param"]), name
    info = json.loads(mtf("ckpt", "inspect", str(old), "--json", env=env, check=True).stdout)
    assert info["universal"].endswith("global_step2_universal") and not info["universal_info"]
    # DeepSpeed's route (universal form, loaded at the new shape, saved): the same weights as the tp2 run's own
    # checkpoint (every shape trains the same numbers); its verification is the one the other tests check
    out = tmp_path / "via-universal"
    proc = mtf("ckpt", "reshape", str(old), "--tp", "2", "--pp", "1", "-o", str(out), "--method", "universal",
               "--no-verify", env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for f in sorted((trained["tp2"] / "global_step2").glob("layer_*")):
        a, b = torch.load(f), torch.load(out / "global_step2" / f.name)
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)


def test_large_reshape_renders_a_cluster_job(trained, env, tmp_path):
    job = tmp_path / "reshape.sbatch"
    out = tmp_path / "out"
    proc, imported = mtf_imports("ckpt", "reshape", str(trained["tp2"]), "--tp", "1", "--pp", "1", "-o", str(out),
                                 "--job", str(job), "--recipe", TINY, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert imported == []  # rendering the job reads the checkpoint's structure, not its tensors
    text = job.read_text()
    assert "#SBATCH --nodes=1" in text and "#SBATCH --time=00:30:00" in text
    assert re.search(r"mtf_train\.cli ckpt reshape \S+ --tp 1 --pp 1 --dp 1 -o \S+ --method direct --here", text)
    assert not out.exists()


# --- bad input: one line, non-zero exit, nothing written -----------------------------------------------------


@pytest.fixture
def broken(trained, tmp_path):
    """A fresh copy of the tp2 checkpoint to damage."""
    ck = tmp_path / "ck"
    shutil.copytree(trained["tp2"], ck)
    return ck


def _fails(*args, env=None, out: Path | None = None) -> str:
    """The one line of a refused input, said before torch, DeepSpeed or transformers is imported."""
    proc, imported = mtf_imports(*args, env=env, timeout=120)
    line = one_line_error(proc)
    assert imported == [], (args, imported)
    if out is not None:
        assert not out.exists() and not list(out.parent.glob(f".{out.name}*")), list(out.parent.iterdir())
    return line


def test_bad_inputs_are_one_line_errors(broken, env, tmp_path):
    out = tmp_path / "out"
    assert "no such folder" in _fails("ckpt", "inspect", str(tmp_path / "nope"), env=env)
    assert "heads are not divisible by tensor parallel size 3" in _fails(
        "ckpt", "reshape", str(broken), "--tp", "3", "--pp", "1", "-o", str(out), env=env, out=out)
    assert "pipeline stages exceed" in _fails(
        "ckpt", "reshape", str(broken), "--tp", "1", "--pp", "9", "-o", str(out), env=env, out=out)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert "already exists" in _fails("ckpt", "reshape", str(broken), "--tp", "1", "--pp", "1", "-o",
                                      str(tmp_path / "full"), env=env)
    assert "global_step7, which does not exist" in _fails(
        "ckpt", "reshape", str(broken), "--step", "7", "--tp", "1", "--pp", "1", "-o", str(out), env=env, out=out)
    assert "no such folder" in _fails("ckpt", "import-hf", str(tmp_path / "nope"), "-o", str(out), env=env, out=out)
    assert "no config.json" in _fails("ckpt", "import-hf", str(broken), "-o", str(out), env=env, out=out)
    (tmp_path / "gpt").mkdir()
    (tmp_path / "gpt" / "config.json").write_text('{"model_type": "gpt2"}')
    assert "only BLOOM" in _fails("ckpt", "import-hf", str(tmp_path / "gpt"), "-o", str(out), env=env, out=out)


def test_input_errors_come_before_torch_is_imported(tmp_path):
    """A wrong folder or a model that is not BLOOM is refused at once (a login node, a typo): no torch, DeepSpeed
    or transformers import on the way to the one line, for every command."""
    (tmp_path / "gpt").mkdir()
    (tmp_path / "gpt" / "config.json").write_text('{"model_type": "gpt2"}')
    nope, out = str(tmp_path / "nope"), str(tmp_path / "out")
    commands = [["inspect", nope], ["to-universal", nope], ["reshape", nope, "--tp", "1", "--pp", "1", "-o", out],
                ["export-hf", nope, "-o", out], ["import-hf", nope, "-o", out],
                ["import-hf", str(tmp_path / "gpt"), "-o", out]]
    errors = []
    for argv in commands:
        proc, imported = mtf_imports("ckpt", *argv)
        assert imported == [], (argv, imported)
        errors.append(one_line_error(proc))
    assert all(e.startswith("mtf-train: error: ") for e in errors), errors
    assert errors[-1].endswith("only BLOOM is supported") and "no such folder" in errors[0]


def test_truncated_and_corrupt_files_are_one_line_errors(broken, env, tmp_path):
    out = tmp_path / "out"
    step = broken / "global_step2"
    optim = step / "zero_pp_rank_0_mp_rank_01_optim_states.pt"
    with open(optim, "r+b") as fh:
        fh.truncate(optim.stat().st_size // 2)
    for cmd in (["ckpt", "inspect", str(broken)],
                ["ckpt", "reshape", str(broken), "--tp", "1", "--pp", "1", "-o", str(out)],
                ["ckpt", "to-universal", str(broken)]):
        assert "truncated or corrupt" in _fails(*cmd, env=env, out=out), cmd
    assert not (broken / "global_step2_universal").exists() and not (broken / "latest_universal").exists()
    layer = step / "layer_03-model_00-model_states.pt"
    layer.write_bytes(b"not a torch file")
    assert "truncated or corrupt" in _fails("ckpt", "export-hf", str(broken), "-o", str(out), env=env, out=out)
    (broken / "latest").unlink()
    assert "no `latest` file" in _fails("ckpt", "reshape", str(broken), "--tp", "1", "--pp", "1", "-o", str(out),
                                        env=env, out=out)
