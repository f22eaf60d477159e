"""Mixtures -> path files (the 2022 xP3 files byte for byte), measured sizes, per-dataset splits."""
from __future__ import annotations

import shutil

import pytest

from mtf_train.data.indexed import MTFPair
from mtf_train.data.mixture import MixtureError, load_mixture, write_path_files
from mtf_train.data.pathfile import read_path_file
from mtf_train.data.testing import SAMPLE_DIR, synthetic_mtf
from tests.helpers import ROOT, mtf, mtf_imports, one_line_error

PATHS = ROOT / "data_paths"


def test_xp3_path_files_are_regenerated_byte_for_byte(tmp_path):
    written = write_path_files(load_mixture(PATHS / "xp3capmixnewcodelong.yaml"), tmp_path)
    assert sorted(p.name for p in written) == ["xp3capmixnewcodelong_train.txt", "xp3capmixnewcodelong_validation.txt"]
    for p in written:
        assert p.read_bytes() == (PATHS / p.name).read_bytes(), p.name


def test_xp3_weights_are_the_2022_weights():
    train = read_path_file(PATHS / "xp3capmixnewcodelong_train.txt")[0]
    valid = read_path_file(PATHS / "xp3capmixnewcodelong_validation.txt")[0]
    assert (train.name, valid.name, len(train.entries)) == ("train", "validation", 46)
    w = {e.prefix.removeprefix("xp3_"): e.weight_text for e in train.entries}
    assert w["en"] == "0.3924620202" and w["zh"] == "0.048344327"  # the weights of bigscience's 2022 xp3capmixnewcodelong files
    assert round(sum(map(float, w.values())), 10) == pytest.approx(1.0136844229, abs=2e-10)
    order = [e.prefix for e in train.entries]
    assert order.index("xp3_pt") + 1 == order.index("xp3_code") == order.index("xp3_fr") - 1
    assert {e.split_text for e in train.entries} == {"0:0.950"} and {e.split_text for e in valid.entries} == {"0.950:1"}
    assert [(e.prefix, e.weight_text) for e in valid.entries] == [(e.prefix, e.weight_text) for e in train.entries]
    # Recomputed from the du sizes, every weight agrees with the file to 10 decimals.
    mix = load_mixture(PATHS / "xp3capmixnewcodelong.yaml")
    total = sum(d.size for d in mix.datasets)
    for d in mix.datasets:
        assert abs(d.size / total * d.upsample - float(w[d.name])) < 5.1e-11


def test_sample_path_files_match_the_shipped_data(tmp_path):
    mix = load_mixture(PATHS / "sample_mixture.yaml")
    for d in mix.datasets:  # measured: tokens of inputs and targets of the shipped indexed datasets
        pair = MTFPair(str(SAMPLE_DIR / f"xp3_{d.name}"))
        assert d.size == int(pair.lengths().sum()) and "tokens of" in d.measured
    for p in write_path_files(mix, tmp_path):
        assert p.read_bytes() == (PATHS / p.name).read_bytes(), p.name
    code = [e for e in read_path_file(PATHS / "sample_train.txt")[0].entries if e.prefix == "xp3_code"][0]
    sizes = {d.name: d.size for d in mix.datasets}
    assert code.weight == pytest.approx(round(sizes["code"] / sum(sizes.values()) * 1.3, 10))


def test_measure_bytes_of_merged_jsonl_and_per_dataset_splits(tmp_path):
    (tmp_path / "merged_a.jsonl").write_bytes(b"x" * 300)
    (tmp_path / "b").mkdir()
    (tmp_path / "b/1.jsonl").write_bytes(b"y" * 50)
    (tmp_path / "b/2.jsonl").write_bytes(b"y" * 50)
    synthetic_mtf(tmp_path / "tok_c", [(3, 2)] * 20)  # 100 tokens
    (tmp_path / "m.yaml").write_text(
        'prefix: "{name}"\nsplits: {train: "0:0.9", validation: "0.9:1"}\n'
        "outputs: {train: t.txt, validation: v.txt}\n"
        "datasets:\n"
        "  - {name: a, size: measure, jsonl: merged_a.jsonl}\n"
        "  - {name: b, size: measure, jsonl: b, upsample: 2}\n"
        "  - {name: c, size: measure, prefix: tok_c, splits: {train: '0:0.5', validation: null}}\n")
    mix = load_mixture(tmp_path / "m.yaml")
    assert [d.size for d in mix.datasets] == [300, 100, 100]
    files = mix.path_files()
    assert files["t.txt"] == '"train: 0.6 0:0.9 a, 0.4 0:0.9 b, 0.2 0:0.5 tok_c"\n'
    assert files["v.txt"] == '"validation: 0.6 0.9:1 a, 0.4 0.9:1 b"\n'
    # --root measures elsewhere; the written prefixes stay as they are.
    other = tmp_path / "elsewhere"
    shutil.copytree(tmp_path, other, ignore=shutil.ignore_patterns("elsewhere"))
    (other / "merged_a.jsonl").write_bytes(b"x" * 100)
    assert load_mixture(tmp_path / "m.yaml", root=other).path_files()["t.txt"] == \
        '"train: 0.6666666667 0:0.9 b, 0.3333333333 0:0.9 a, 0.3333333333 0:0.5 tok_c"\n'  # ties keep file order


@pytest.mark.parametrize("body, message", [
    ("datasets:\n  - {name: a, size: -1}\n", "datasets[0] (a).size: must be a positive number, got -1"),
    ("datasets:\n  - {name: a, size: measure}\n", "datasets[0] (a).size: cannot measure"),
    ("datasets:\n  - {name: a, size: 1, upsample: x}\n", "datasets[0] (a).upsample: must be a positive number"),
    ("splits: {train: '0.9:0.1'}\ndatasets:\n  - {name: a, size: 1}\n", "splits.train: split '0.9:0.1' must be S:E"),
    ("datasets:\n  - {name: a, size: 1, splits: {valid: '0:1'}}\n", "datasets[0] (a).splits.valid: no such split"),
    ("datasets:\n  - {name: a, size: 1, colour: red}\n", "datasets[0] (a): unknown key 'colour'"),
    ("datasets: [}\n", "invalid YAML"),
    ("sizes: 3\n", "datasets: a non-empty list is required"),
])
def test_mixture_errors_name_the_field(tmp_path, body, message):
    (tmp_path / "m.yaml").write_text(body)
    with pytest.raises(MixtureError) as e:
        load_mixture(tmp_path / "m.yaml")
    assert str(e.value).startswith(str(tmp_path / "m.yaml") + ": ") and message in str(e.value)
    assert "\n" not in str(e.value)


def test_mixture_cli_writes_and_checks(tmp_path):
    proc = mtf("data", "mixture", str(PATHS / "xp3capmixnewcodelong.yaml"), "-o", str(tmp_path), check=True)
    assert "wrote" in proc.stdout
    assert (tmp_path / "xp3capmixnewcodelong_train.txt").read_bytes() == (PATHS / "xp3capmixnewcodelong_train.txt").read_bytes()
    assert mtf("data", "mixture", str(PATHS / "xp3capmixnewcodelong.yaml"), "-o", str(PATHS), "--check").returncode == 0
    (tmp_path / "xp3capmixnewcodelong_validation.txt").write_text('"validation: 1 0:1 x"\n')
    proc = mtf("data", "mixture", str(PATHS / "xp3capmixnewcodelong.yaml"), "-o", str(tmp_path), "--check")
    assert proc.returncode == 1 and "xp3capmixnewcodelong_validation.txt: differs" in proc.stdout
    err = one_line_error(mtf("data", "mixture", str(tmp_path / "none.yaml"), "-o", str(tmp_path)))
    assert "none.yaml: cannot read" in err


def test_mixture_cli_measures_indexed_data_without_torch(tmp_path):
    """Measuring indexed datasets reads their .idx files with numpy: a login node writes a mixture in a fraction
    of a second, and `-o` onto a file is refused before anything is measured."""
    proc, imported = mtf_imports("data", "mixture", str(PATHS / "sample_mixture.yaml"), "-o", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    assert "code: size 9,489 (tokens of " in proc.stdout and imported == []
    for name in ("sample_train.txt", "sample_validation.txt"):
        assert (tmp_path / "out" / name).read_bytes() == (PATHS / name).read_bytes()
    (tmp_path / "f").write_text("")
    proc, imported = mtf_imports("data", "mixture", str(PATHS / "sample_mixture.yaml"), "-o", str(tmp_path / "f"))
    assert one_line_error(proc) == f"mtf-train: error: {tmp_path / 'f'}: -o: is a file; the path files are written " \
                                   "into a folder"
    assert imported == [] and "size" not in proc.stdout
