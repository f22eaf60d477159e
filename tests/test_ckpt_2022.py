"""2022 bigscience checkpoints and damaged ones, through the CLI as a user types it.

A bf16 run of a 6-layer tiny BLOOM is trained once (TP1, BF16_Optimizer files); `ckpt reshape` moves its
step 2 to TP2 x PP2 (split both ways, as the pretrained bloom's TP4 x PP12; 4 ranks rather than 8 on two cores)
and `ckpt_legacy.to_legacy` rewrites that copy the way 2022 Megatron-DeepSpeed pickled it (argparse Namespace
with `megatron.enums`, progress on the args, `checkpoint_info`, 2022 RNG keys, DeepSpeed 0.7 keys). Every tool
and the trainer must give the same numbers on the 2022 form as on ours. Damaged copies (flipped bytes, truncation, a missing or extra layer file, a
zero-byte optimizer file) must be one line naming the file and exit 2 in every tool and in the trainer.

Six layers, because at TP1 x PP4 a 4-layer model's last stage holds nothing but the tied embedding's copy,
and DeepSpeed 0.19's BF16_Optimizer then fails its first step (`stack expects a non-empty TensorList`).
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

from tests.ckpt_legacy import to_legacy
from tests.helpers import RECIPES, assert_torch_free_read_equal, mtf, mtf_imports, one_line_error

TINY = str(RECIPES / "tiny-local.yaml")
TP, PP = 2, 2  # the shape of the 2022-form fixture


def sets(*items: str) -> list[str]:
    return [x for item in items for x in ("--set", item)]


def train_sets(tp: int, pp: int, iters: int, *more: str) -> list[str]:
    return sets(f"parallel.tp={tp}", f"parallel.pp={pp}", f"cluster.gpus_per_node={tp * pp}", "eval.iters=0",
                "logging.log_interval=1", "checkpoint.interval=2", f"training.train_iters={iters}", "batch.micro=2",
                "batch.global=8", "precision.dtype=bf16", "model.num_layers=6", "logging.loss_curve=false", *more)


def only_run(runs: Path) -> Path:
    (run,) = [p for p in (runs / "tiny-local").iterdir() if not p.name.startswith(".")]
    return run


def train_records(run: Path) -> dict[int, dict]:
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["iteration"]: r for r in recs if r["kind"] == "train"}


def unsafe_globals(path: Path) -> set[str]:
    """Every global the pickle names, whatever this process has allowlisted (torch's own helper leaves out the
    globals registered with add_safe_globals, which importing DeepSpeed or our loader may have done)."""
    import pickletools
    import zipfile

    with zipfile.ZipFile(path) as z:
        data = z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))
    found, strings = set(), []
    for op, arg, _ in pickletools.genops(data):
        if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE"):
            strings.append(arg)
        elif op.name == "GLOBAL":
            found.add(arg.replace(" ", "."))
        elif op.name == "STACK_GLOBAL":
            found.add(f"{strings[-2]}.{strings[-1]}")
    return {g for g in found if not g.startswith(("torch.", "collections.OrderedDict", "_codecs."))}


def tensors(path: Path) -> dict:
    """name -> tensor of a torch file (nested dicts/lists flattened), read weights-only with our allowlist."""
    import torch

    from mtf_train.ckpt.safe import load

    out = {}

    def walk(prefix, obj):
        if torch.is_tensor(obj):
            out[prefix] = obj
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(f"{prefix}/{k}", v)
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(f"{prefix}/{i}", v)

    walk("", load(path))
    return out


def assert_same_tensors(a: Path, b: Path, pattern: str = "*.pt") -> int:
    import torch

    files = sorted(p.relative_to(a) for p in a.rglob(pattern))
    assert files and files == sorted(p.relative_to(b) for p in b.rglob(pattern))
    for f in files:
        ta, tb = tensors(a / f), tensors(b / f)
        assert ta.keys() == tb.keys(), f
        for k in ta:
            assert torch.equal(ta[k], tb[k]), (f, k)
    return len(files)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return {"MTF_CKPT_CACHE": str(tmp_path_factory.mktemp("probe-cache"))}


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory) -> Path:
    """A 3-step bf16 run at TP1 (checkpoints at steps 2 and 3)."""
    runs = tmp_path_factory.mktemp("train-bf16")
    proc = mtf("run", TINY, "--runs-dir", str(runs), *train_sets(1, 1, 3), timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return only_run(runs)


@pytest.fixture(scope="module")
def pair(bf16_run, tmp_path_factory, env) -> dict[str, Path]:
    """Step 2 at TP x PP (2 x 2) in our form and, the same files, in the 2022 form."""
    base = tmp_path_factory.mktemp("pair")
    # a run folder with --step, relative paths, from another working directory
    rel = os.path.relpath(bf16_run, base)
    proc = mtf("ckpt", "reshape", rel, "--step", "2", "--tp", str(TP), "--pp", str(PP), "-o", "ours", "--no-verify",
               cwd=base, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    to_legacy(base / "ours" / "global_step2", base / "legacy")
    return {"base": base, "ours": base / "ours", "legacy": base / "legacy"}


def test_the_fixture_is_in_the_2022_form(pair):
    mp = pair["legacy"] / "global_step2" / "mp_rank_00_model_states.pt"
    assert {"argparse.Namespace", "megatron.enums.PositionEmbeddingType"} <= unsafe_globals(mp)
    assert len(list((pair["legacy"] / "global_step2").glob("bf16_zero_pp_rank_0_mp_rank_*_optim_states.pt"))) == TP * PP


def test_inspect_reads_the_2022_form_like_ours(pair, env):
    from mtf_train.ckpt.inspect import _inspect

    got = {}
    for name in ("legacy", "ours"):
        proc, imported = mtf_imports("ckpt", "inspect", name, "--json", cwd=pair["base"], env=env)
        assert proc.returncode == 0 and imported == [], (name, imported, proc.stderr)  # no torch, no DeepSpeed
        got[name] = json.loads(proc.stdout)
        assert _inspect(pair[name], None, True, torch_free=False) == _inspect(pair[name], None, True, torch_free=True)
    for path in sorted(pair["legacy"].rglob("*.pt")):  # 2022 pickles: Namespace, megatron.enums, dtypes
        assert_torch_free_read_equal(path)
    assert got["legacy"]["form"] == "megatron-deepspeed-2022" and got["ours"]["form"] == "mtf-train"
    for key in ("iteration", "tp", "pp", "dp", "dtype", "parameters", "num_layers", "hidden_size",
                "padded_vocab_size", "original_vocab_size", "optimizer", "consumed_train_samples"):
        assert got["legacy"][key] == got["ours"][key], key
    assert (got["legacy"]["tp"], got["legacy"]["pp"], got["legacy"]["iteration"]) == (TP, PP, 2)
    assert (got["legacy"]["original_vocab_size"], got["legacy"]["consumed_train_samples"]) == (2531, 16)
    assert not got["legacy"]["universal_info"]


universal: dict[str, Path] = {}


def test_to_universal_of_the_2022_form_equals_ours_and_keeps_the_padding(pair, env):
    import torch

    for name in ("legacy", "ours"):
        proc = mtf("ckpt", "to-universal", name, "-o", f"u-{name}", cwd=pair["base"], env=env, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "all 2560 rows kept (the 29 padding rows" in proc.stdout
        universal[name] = pair["base"] / f"u-{name}"
    a, b = (universal[n] / "global_step2_universal" for n in ("legacy", "ours"))
    assert assert_same_tensors(a / "zero", b / "zero") > 100
    emb = tensors(a / "zero" / "tied_modules.embed.word_embeddings.weight" / "fp32.pt")["/param"]
    src = torch.cat([tensors(pair["ours"] / "global_step2" / f"layer_01-model_{t:02d}-model_states.pt")
                     ["/word_embeddings.weight"] for t in range(TP)])
    assert emb.shape[0] == src.shape[0] == 2560  # the padding rows are there, with their values
    assert torch.equal(emb.bfloat16(), src) and src[2531:].abs().sum() > 0
    for mp in a.glob("mp_rank_*"):  # what we write keeps our form: no 2022 classes
        assert not {g for g in unsafe_globals(mp) if g.startswith(("megatron.", "argparse."))}, mp


def test_reshape_of_the_2022_form_is_verified_and_equals_ours(pair, env):
    base = pair["base"]
    proc = mtf("ckpt", "reshape", "legacy", "--tp", "1", "--pp", "4", "-o", "r-legacy", "--json", cwd=base, env=env,
               timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    checks = json.loads(proc.stdout)["checks"]
    assert [c["name"] for c in checks if c["ok"]] == ["loss", "logits", "next-step loss", "next-step logits"], checks
    proc = mtf("ckpt", "reshape", "ours", "--tp", "1", "--pp", "4", "-o", "r-ours", "--no-verify", cwd=base,
               env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert_same_tensors(base / "r-legacy", base / "r-ours", "layer_*.pt")
    assert_same_tensors(base / "r-legacy", base / "r-ours", "*optim_states.pt")
    info = json.loads(mtf("ckpt", "inspect", "r-legacy", "--json", cwd=base, env=env, check=True).stdout)
    assert (info["tp"], info["pp"], info["iteration"], info["consumed_train_samples"]) == (1, 4, 2, 16)
    assert (info["original_vocab_size"], info["padded_vocab_size"], info["form"]) == (2531, 2560, "mtf-train")
    for mp in (base / "r-legacy" / "global_step2").glob("mp_rank_*"):
        assert not {g for g in unsafe_globals(mp) if g.startswith(("megatron.", "argparse."))}, mp


def test_export_hf_of_the_2022_form_is_verified_and_equals_ours(pair, env, tmp_path):
    rel = os.path.relpath(pair["legacy"], tmp_path)  # relative DIR and -o from another working directory
    proc = mtf("ckpt", "export-hf", rel, "-o", "hf-legacy", "--json", cwd=tmp_path, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    checks = json.loads(proc.stdout)["checks"]
    assert [(c["name"], c["ok"], c["transformers_class"]) for c in checks] == \
        [("transformers logits", True, "BloomForCausalLM")], checks
    assert re.search(rf"transformers BloomForCausalLM loads it; logits vs ours at tp {TP} x pp {PP}: ok", proc.stderr)
    proc = mtf("ckpt", "export-hf", str(pair["ours"]), "-o", str(tmp_path / "hf-ours"), "--no-verify", env=env,
               timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "hf-legacy" / "model.safetensors"), load_file(tmp_path / "hf-ours" / "model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "hf-legacy" / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask


def test_trainer_resumes_the_2022_form_plainly(pair, bf16_run, tmp_path):
    """A plain resume at the checkpoint's shape (TP x PP) continues from its progress (sample 16, the lr of
    step 3) with the loss the TP1 run had at step 3."""
    proc = mtf("run", TINY, "--runs-dir", str(tmp_path), *train_sets(TP, PP, 3, f"checkpoint.load={pair['legacy']}"),
               timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"loaded {pair['legacy']}/global_step2 (iteration 2)" in proc.stdout
    got, ref = train_records(only_run(tmp_path)), train_records(bf16_run)
    assert list(got) == [3]
    assert (got[3]["consumed_samples"], got[3]["lr"]) == (ref[3]["consumed_samples"], ref[3]["lr"]) == (24, ref[3]["lr"])
    assert got[3]["loss"] == pytest.approx(ref[3]["loss"], rel=2e-3), (got[3], ref[3])


def test_trainer_loads_the_universal_form_of_the_2022_checkpoint(pair, bf16_run, env, tmp_path):
    """Universal load with optimizer and progress (padding rows kept): step 3 equals the original run's."""
    u = universal.get("legacy")
    if u is None:  # run alone, or before the to-universal test (checked there): convert here
        u = tmp_path / "u-legacy"
        proc = mtf("ckpt", "to-universal", str(pair["legacy"]), "-o", str(u), env=env, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    proc = mtf("run", TINY, "--runs-dir", str(tmp_path / "a"),
               *train_sets(1, 1, 3, f"checkpoint.load={u}", "checkpoint.universal=true"), timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got, ref = train_records(only_run(tmp_path / "a")), train_records(bf16_run)
    assert list(got) == [3] and got[3]["consumed_samples"] == 24
    assert got[3]["loss"] == pytest.approx(ref[3]["loss"], rel=1e-3), (got[3], ref[3])
    # the first job of a finetuning run: universal form, no optimizer states, progress reset
    proc = mtf("run", TINY, "--runs-dir", str(tmp_path / "b"),
               *train_sets(1, 1, 1, f"checkpoint.load={u}", "checkpoint.universal=true",
                           "checkpoint.no_load_optim=true", "checkpoint.reset_progress=true"), timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "progress reset, optimizer states not loaded" in proc.stdout
    got = train_records(only_run(tmp_path / "b"))
    assert list(got) == [1] and got[1]["consumed_samples"] == 8


# --- damaged checkpoints: one line naming the file, exit 2, in every tool and the trainer ------------------


def damage(ck: Path, case: str) -> Path:
    """Damage checkpoint root `ck` in place; returns the file the error must name."""
    step = ck / (ck / "latest").read_text().strip()
    layer = step / "layer_03-model_00-model_states.pt"
    if case == "flipped":
        data = bytearray(layer.read_bytes())
        mid = len(data) // 2
        data[mid:mid + 4000] = bytes(b ^ 0x5A for b in data[mid:mid + 4000])
        layer.write_bytes(bytes(data))
        return layer
    if case == "truncated":
        mp = step / "mp_rank_00_model_states.pt"
        with open(mp, "r+b") as fh:
            fh.truncate(mp.stat().st_size - 1000)
        return mp
    if case == "missing-layer":
        (step / "layer_04-model_00-model_states.pt").unlink()
        return step
    if case == "extra-layer":
        extra = step / "layer_12-model_00-model_states.pt"
        shutil.copy(layer, extra)
        return extra
    if case == "empty-optimizer":
        (opt,) = step.glob("*optim_states.pt")
        opt.write_bytes(b"")
        return opt
    raise ValueError(case)


CASES = ["flipped", "truncated", "missing-layer", "extra-layer", "empty-optimizer"]


@pytest.mark.parametrize("case", CASES)
def test_damaged_checkpoints_are_refused_by_every_tool(bf16_run, env, tmp_path, case):
    ck = tmp_path / "ck"
    shutil.copytree(bf16_run / "checkpoints", ck)
    named = damage(ck, case)
    before = sorted(p.name for p in (ck / "global_step3").iterdir())
    commands = {"inspect": ["ckpt", "inspect", str(ck)],
                "to-universal": ["ckpt", "to-universal", str(ck)],
                "reshape": ["ckpt", "reshape", str(ck), "--tp", "1", "--pp", "2", "-o", str(tmp_path / "out")],
                "export-hf": ["ckpt", "export-hf", str(ck), "-o", str(tmp_path / "out")]}
    for tool, cmd in commands.items():
        proc, imported = mtf_imports(*cmd, env=env, timeout=300)
        line = one_line_error(proc)
        assert str(named) in line, (tool, line)
        assert imported == [], (tool, imported)  # refused before torch's import
        assert not (tmp_path / "out").exists() and not (ck / "latest_universal").exists(), tool
    assert sorted(p.name for p in (ck / "global_step3").iterdir()) == before


def test_a_checkpoint_that_would_run_code_is_refused(bf16_run, env, tmp_path):
    import torch

    ck = tmp_path / "ck"
    shutil.copytree(bf16_run / "checkpoints", ck)
    mp = ck / "global_step3" / "mp_rank_00_model_states.pt"
    sd = torch.load(mp, weights_only=False)
    marker = tmp_path / "ran"
    sd["args"]["hook"] = Evil(marker)
    torch.save(sd, mp)
    for cmd in (["ckpt", "inspect", str(ck)], ["ckpt", "reshape", str(ck), "--tp", "1", "--pp", "2", "-o",
                                                 str(tmp_path / "out")]):
        proc, imported = mtf_imports(*cmd, env=env, timeout=300)
        line = one_line_error(proc)
        assert str(mp) in line and "refused to unpickle" in line and "posix.system" in line, line
        assert imported == [], imported
    assert not marker.exists()


class Evil:
    """Unpickling it would run a shell command (what `weights_only=False` allows any checkpoint to do)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_trainer_refuses_damaged_and_misshaped_checkpoints(bf16_run, tmp_path):
    """The trainer checks what it loads: changed bytes (as DeepSpeed reads the file), a missing layer file,
    and a checkpoint of another shape (one line naming both shapes and `ckpt reshape`)."""
    ck = tmp_path / "ck"
    shutil.copytree(bf16_run / "checkpoints", ck)
    named = damage(ck, "flipped")
    cases = [("flipped", 1, 1, str(named), "CRC"),
             ("shape", 2, 1, str(ck / "global_step3"), "saved at tp 1 x pp 1, this run is tp 2 x pp 1: convert it "
              "with `mtf-train ckpt reshape")]
    for name, tp, pp, where, why in cases:
        runs = tmp_path / f"runs-{name}"
        proc = mtf("run", TINY, "--runs-dir", str(runs), *train_sets(tp, pp, 4, f"checkpoint.load={ck}"),
                   timeout=900)
        assert proc.returncode != 0, name
        errors = [x for x in (proc.stdout + proc.stderr).splitlines() if "mtf_train.train: error:" in x]
        assert errors and all(where in x and why in x for x in errors), (name, errors, proc.stderr[-2000:])
