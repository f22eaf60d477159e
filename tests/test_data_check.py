"""`data check` and `data index` through the CLI, and the trainer reusing what `data index` built."""
from __future__ import annotations

import re
import shutil

from mtf_train.data.cli import main
from mtf_train.data.packed import build_datasets, recipe_sample_counts
from mtf_train.data.testing import SAMPLE_DIR
from mtf_train.recipe.load import load_recipe, path_groups
from tests.helpers import RECIPES, ROOT, mtf, mtf_imports, one_line_error

TINY = str(RECIPES / "tiny-local.yaml")


def _copy_sample(tmp_path):
    """The sample's datasets in a scratch folder, so that caches are written there and not into the repo."""
    data = tmp_path / "data"
    data.mkdir()
    for p in SAMPLE_DIR.glob("xp3_*_document.*"):
        shutil.copy(p, data / p.name)
    return data


def test_check_sample_with_recipe_shows_shares_and_epochs(tmp_path):
    data = _copy_sample(tmp_path)
    proc = mtf("data", "check", str(ROOT / "data_paths/sample_train.txt"), "--recipe", TINY,
               "--set", f"data.root={data}", check=True)
    out = proc.stdout
    assert "seq_length 256, 1,920 train samples (120 steps), seed 42" in out
    rows = {ln.split()[1]: ln.split() for ln in out.splitlines() if ln.startswith("train  xp3_")}
    assert sorted(rows) == sorted(f"xp3_{d}" for d in ("en", "fr", "es", "zh", "ar", "hi", "sw", "code"))
    header = out.splitlines()[1].split()
    assert header[:3] == ["group", "dataset", "split"] and "epochs" in header
    en = rows["xp3_en"]  # group dataset split docs (split) tokens share samples rows/epoch epochs too-long
    assert en[2] == "0:0.900" and en[3] == "341" and en[4] == "(307)"
    assert float(en[9]) > 1 and en[10] == "0"
    shares = [float(r[6].rstrip("%")) for r in rows.values()]
    assert abs(sum(shares) - 100) < 0.05
    assert "all 8 datasets have their four files" in out


def test_check_reports_missing_files_and_grammar_errors(tmp_path):
    data = _copy_sample(tmp_path)
    (data / "xp3_zh_targets_document.idx").unlink()
    proc = mtf("data", "check", str(ROOT / "data_paths/sample_validation.txt"), "--root", str(data))
    err = one_line_error(proc)
    assert "1 problem(s)" in err
    assert f"problem: {data}/xp3_zh_targets_document.idx: missing" in proc.stdout
    bad = tmp_path / "bad.txt"
    bad.write_text('"train: 0.5 0:0.9 a, 0.5 0.9 b"\n')
    err = one_line_error(mtf("data", "check", str(bad)))
    assert err.endswith("bad.txt: group 'train', entry 2, column 22: split '0.9' must be S:E with 0 <= S < E <= 1")


def test_index_builds_ahead_and_the_trainer_reuses_it(tmp_path, capsys):
    data = _copy_sample(tmp_path)
    cache = tmp_path / "cache"
    args = ["data", "index", TINY, "--set", f"data.root={data}", "--cache-dir", str(cache)]
    proc, imported = mtf_imports(*args)  # the packing needs the lengths alone: read from the .idx with numpy
    assert proc.returncode == 0 and imported == [], (proc.stderr, imported)
    out = proc.stdout
    assert re.search(r"indexes: 16 built, 0 reused", out), out
    assert "train: 1,920 samples from 8 datasets" in out and "validation: 128 samples from 8 datasets" in out
    assert main(args) == 0  # again, in this process
    assert "indexes: 0 built, 16 reused" in capsys.readouterr().out
    # The trainer's call with the recipe's counts finds every index already there.
    recipe = load_recipe(TINY, [f"data.root={data}"])
    counts = recipe_sample_counts(recipe)
    train_groups, valid_groups = path_groups(recipe)
    train, valid = build_datasets(train_groups, valid_groups, seq_length=recipe.model.seq_length,
                                  train_samples=counts.train_samples,
                                  eval_samples_per_group=counts.eval_samples_per_group,
                                  seed=recipe.training.seed, pad_id=3, cache_dir=cache)
    assert not any(d.built for blend in [train, *valid.values()] for d in blend.datasets)
    assert train[1919]["input_ids"].shape == (257,)


def test_index_bad_recipe_is_one_line(tmp_path):
    err = one_line_error(mtf("data", "index", TINY, "--set", f"data.root={tmp_path}"))
    assert "missing" in err
    err = one_line_error(mtf("data", "index", str(tmp_path / "nope.yaml")))
    assert "nope.yaml" in err


def _cut(path, size):
    with open(path, "r+b") as fh:
        fh.truncate(size)


def test_a_bin_cut_short_is_one_line_in_every_check(tmp_path):
    """A .bin cut to half (or emptied) no longer fits its .idx: data check, validate --check-data, data index and
    a local run each say so in one line naming the file, before any trainer starts."""
    data = _copy_sample(tmp_path)
    bin_ = data / "xp3_fr_targets_document.bin"
    full = bin_.stat().st_size
    for size in (full // 2, 0):
        _cut(bin_, size)
        why = f"{bin_}: holds {size:,} bytes but xp3_fr_targets_document.idx describes {full:,}"
        proc = mtf("data", "check", "sample_train.txt", "--root", str(data), cwd=ROOT / "data_paths")
        assert "1 problem(s)" in one_line_error(proc)
        assert f"problem: {why}" in proc.stdout and "cut short" in proc.stdout
        # Relative recipe path from another folder.
        sets = ["--set", f"data.root={data}"]
        line = one_line_error(mtf("validate", "../recipes/tiny-local.yaml", "--check-data", *sets, cwd=ROOT / "docs"))
        assert line.startswith(f"mtf-train: error: --set data.root={data}: data.root: {why}"), line
        line = one_line_error(mtf("data", "index", TINY, *sets, "--cache-dir", str(tmp_path / "cache")))
        assert why in line
        runs = tmp_path / "runs"
        line = one_line_error(mtf("run", TINY, "--runs-dir", str(runs), *sets))
        assert why in line and not runs.exists()
    # Longer than its index: also refused.
    shutil.copy(SAMPLE_DIR / bin_.name, bin_)
    with open(bin_, "ab") as fh:
        fh.write(b"\0\0")
    assert "larger than its index says" in one_line_error(
        mtf("validate", TINY, "--check-data", "--set", f"data.root={data}"))


def test_a_local_run_checks_its_data_root_before_starting(tmp_path):
    runs = tmp_path / "runs"
    proc = mtf(TINY, "--runs-dir", str(runs), "--set", f"data.root={tmp_path / 'nowhere'}", timeout=60)
    line = one_line_error(proc)
    assert line == f"mtf-train: error: --set data.root={tmp_path / 'nowhere'}: data.root: folder not found: " \
                   f"{tmp_path / 'nowhere'}"
    assert not runs.exists()  # nothing rendered, no torchrun started


def test_check_reads_the_indexes_as_megatron_does_without_importing_it():
    """`data check` reads each .idx with numpy alone (a login node, a fraction of a second): its documents and
    example lengths are megatron's, and neither torch nor megatron is imported on the way."""
    import numpy as np

    from mtf_train.data.indexed import MTFPair, pair_index

    for p in sorted(SAMPLE_DIR.glob("xp3_*_inputs_document.idx")):
        prefix = str(p).removesuffix("_inputs_document.idx")
        lengths, pair = pair_index(prefix), MTFPair(prefix)
        assert len(lengths) == pair.check() and np.array_equal(lengths, pair.lengths())
    proc, imported = mtf_imports("data", "check", str(ROOT / "data_paths/sample_train.txt"), "--root", str(SAMPLE_DIR))
    assert proc.returncode == 0 and "all 8 datasets have their four files" in proc.stdout, proc.stdout + proc.stderr
    assert imported == [], imported
