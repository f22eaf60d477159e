"""Preprocessing xP3 jsonl into indexed datasets: round trip, bad rows, merging, interruption, the sample."""
from __future__ import annotations

import json
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mtf_train.data import jsonl
from mtf_train.data.errors import DataError
from mtf_train.data.indexed import MTFPair
from mtf_train.data.preprocess import preprocess
from mtf_train.data.testing import SAMPLE_DIR, SAMPLE_TOKENIZER, write_jsonl, write_mtf_dataset
from tests.helpers import ROOT, mtf, mtf_imports, one_line_error

TOK = str(SAMPLE_TOKENIZER)
ROWS = [
    {"inputs": "Translate to English: Le chat dort sur la chaise.", "targets": "The cat sleeps on the chair."},
    {"inputs": "下面哪个数字最大：12、7、30？", "targets": "30"},
    {"inputs": "Maoni: Simu hii ni nzuri sana.\nJe, maoni haya ni chanya au hasi?", "targets": "chanya"},
    {"inputs": "", "targets": "an empty input is allowed", "extra": [1, 2]},
    {"inputs": "Write a Python function `add_3(x)`.", "targets": "def add_3(x):\n    return x + 3"},
]


def _tokenizer():
    from tokenizers import Tokenizer
    return Tokenizer.from_file(str(SAMPLE_TOKENIZER / "tokenizer.json"))


def _outputs(prefix) -> list[Path]:
    p = Path(prefix)
    return sorted(x for x in p.parent.iterdir() if x.name.startswith(p.name + "_") and "_document." in x.name)


def _read(prefix):
    pair = MTFPair(str(prefix))
    n = pair.check()
    return [pair.inputs[i].tolist() for i in range(n)], [pair.targets[i].tolist() for i in range(n)]


@pytest.mark.parametrize("workers", [0, 2])
def test_round_trip_equals_tokenizing_by_hand(tmp_path, workers):
    write_jsonl(tmp_path / "in/fr/a.jsonl", ROWS[:3])
    write_jsonl(tmp_path / "in/fr/b.jsonl", ROWS[3:])
    res = preprocess([str(tmp_path / "in")], str(tmp_path / "out/xp3_fr"), TOK, workers=workers, progress=False)
    tok = _tokenizer()
    eod = tok.token_to_id("</s>")
    want_in = [tok.encode(r["inputs"], add_special_tokens=False).ids for r in ROWS]
    want_tg = [tok.encode(" " + r["targets"], add_special_tokens=False).ids + [eod] for r in ROWS]
    got_in, got_tg = _read(tmp_path / "out/xp3_fr")
    assert got_in == want_in and got_tg == want_tg
    assert got_in[3] == [] and got_tg[3][-1] == eod
    assert res.rows_written == res.rows_read == 5 and not res.skipped
    assert res.input_tokens == sum(map(len, want_in)) and res.target_tokens == sum(map(len, want_tg))
    # The .idx is megatron's mmap index format: uint16 (code 8) under 65500 vocabulary entries.
    head = (tmp_path / "out/xp3_fr_inputs_document.idx").read_bytes()[:34]
    assert head[:9] == b"MMIDIDX\x00\x00"
    assert struct.unpack("<QBQQ", head[9:34]) == (1, 8, 5, 6)
    assert res.dtype == "uint16"
    assert [p.name for p in _outputs(tmp_path / "out/xp3_fr")] == [
        "xp3_fr_inputs_document.bin", "xp3_fr_inputs_document.idx",
        "xp3_fr_targets_document.bin", "xp3_fr_targets_document.idx"]
    assert_written_as_megatron_does(tmp_path / "out/xp3_fr", got_in, got_tg, np.uint16)


def assert_written_as_megatron_does(prefix: Path, inputs: list, targets: list, dtype) -> None:
    """Our numpy writer's files equal, byte for byte, what megatron-core's IndexedDatasetBuilder writes for the
    same documents."""
    ref = write_mtf_dataset(prefix.parent / "megatron" / prefix.name, inputs, targets, dtype)
    for kind in ("inputs", "targets"):
        for ext in (".bin", ".idx"):
            ours, theirs = Path(f"{prefix}_{kind}_document{ext}"), Path(f"{ref}_{kind}_document{ext}")
            assert ours.read_bytes() == theirs.read_bytes(), ours


def test_large_vocabulary_is_written_as_int32(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(70000)}
    vocab.update({"</s>": 70000, "[UNK]": 70001})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    (tmp_path / "tok").mkdir()
    tok.save(str(tmp_path / "tok/tokenizer.json"))
    write_jsonl(tmp_path / "a.jsonl", [{"inputs": "w1 w69999", "targets": "w65535"}])
    res = preprocess([str(tmp_path / "a.jsonl")], str(tmp_path / "x"), str(tmp_path / "tok"), workers=0, progress=False)
    assert res.dtype == "int32"
    got_in, got_tg = _read(tmp_path / "x")
    assert got_in == [[1, 69999]] and got_tg == [[65535, 70000]]
    assert_written_as_megatron_does(tmp_path / "x", got_in, got_tg, np.int32)


BAD = [
    ROWS[0],
    "{not json",
    b'{"inputs": "caf\xe9", "targets": "x"}',
    '["a", "list"]',
    {"inputs": "no target"},
    {"targets": "no inputs"},
    {"inputs": 3, "targets": "x"},
    {"inputs": "x", "targets": ["x"]},
    {"inputs": "x", "targets": "   "},
    "",
    ROWS[1],
]


def test_bad_rows_are_skipped_counted_and_reported_by_line(tmp_path):
    f = write_jsonl(tmp_path / "bad.jsonl", BAD)
    res = preprocess([str(f)], str(tmp_path / "o"), TOK, workers=0, progress=False)
    assert res.rows_written == 2 and res.rows_read == 10  # the blank line is not a row
    assert dict(res.skipped) == {"not JSON": 2, "not a JSON object": 1, "missing targets": 1, "missing inputs": 1,
                                 "inputs not a string": 1, "targets not a string": 1, "empty target": 1}
    lines = Path(res.report).read_text().splitlines()
    assert res.report == str(tmp_path / "o_skipped.txt")
    assert [ln.split(": ")[0] for ln in lines] == [f"{f}:{n}" for n in range(2, 10)]
    assert lines[1] == f"{f}:3: not JSON (not valid UTF-8)" and lines[7] == f"{f}:9: empty target"
    got_in, _ = _read(tmp_path / "o")
    assert len(got_in) == 2
    assert "8 skipped" in res.summary() and "empty target: 1" in res.summary()


def test_strict_fails_on_first_bad_row_and_leaves_nothing(tmp_path):
    good = write_jsonl(tmp_path / "a.jsonl", ROWS * 300)
    bad = write_jsonl(tmp_path / "b.jsonl", ROWS + [{"inputs": "x", "targets": ""}])
    with pytest.raises(DataError) as e:
        preprocess([str(good), str(bad)], str(tmp_path / "out/o"), TOK, workers=2, strict=True, progress=False)
    assert str(e.value).startswith(f"{bad}:6: empty target")
    assert list((tmp_path / "out").iterdir()) == []  # no .bin/.idx, no temporary files, no report


def test_failed_run_keeps_previous_outputs_whole(tmp_path):
    f = write_jsonl(tmp_path / "a.jsonl", ROWS)
    preprocess([str(f)], str(tmp_path / "o"), TOK, workers=0, progress=False)
    before = {p.name: p.read_bytes() for p in _outputs(tmp_path / "o")}
    assert len(before) == 4
    bad = write_jsonl(tmp_path / "b.jsonl", ["oops"] * 3)
    with pytest.raises(DataError, match="no usable rows"):
        preprocess([str(bad)], str(tmp_path / "o"), TOK, workers=0, progress=False)
    assert {p.name: p.read_bytes() for p in _outputs(tmp_path / "o")} == before
    assert not list(tmp_path.glob("*.tmp-*"))


def test_stale_temporary_files_of_a_killed_run_are_removed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f"o_inputs_document.bin.tmp-{dead.pid}"
    stale.write_bytes(b"half")
    f = write_jsonl(tmp_path / "a.jsonl", ROWS)
    preprocess([str(f)], str(tmp_path / "o"), TOK, workers=0, progress=False)
    assert not stale.exists()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_interrupted_run_leaves_no_half_written_files(tmp_path, sig):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "mtf_train.data.cli", "data", "preprocess", "--input", "-",
                             "-o", str(out / "p"), "-t", TOK, "--workers", "0"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
                            # as a terminal's foreground command has it, even when pytest runs in the background
                            # (where a shell without job control leaves SIGINT ignored, and Python keeps it so)
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    line = (json.dumps(ROWS[0]) + "\n").encode()
    proc.stdin.write(line * 3000)  # more than a chunk: rows reach the temporary .bin files
    proc.stdin.flush()
    deadline = time.time() + 90
    while time.time() < deadline:  # stdin stays open: the run is mid-way until we signal it
        if out.is_dir() and any(p.stat().st_size > 0 for p in out.glob("p_inputs_document.bin.tmp-*")):
            break
        time.sleep(0.1)
    else:
        proc.kill()
        pytest.fail("the run never started writing")
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.decode().strip() == "interrupted: no output written"
    assert list(out.iterdir()) == []


def _rows_of(prefix) -> list[tuple]:
    got_in, got_tg = _read(prefix)
    return list(zip(map(tuple, got_in), map(tuple, got_tg)))


def test_dedup_shuffle_and_merged_jsonl(tmp_path, monkeypatch):
    monkeypatch.setattr(jsonl, "BUCKET_BYTES", 2000)  # several buckets even for this small input
    rows = [{"inputs": f"row {i}", "targets": f"t {i}"} for i in range(200)]
    a = write_jsonl(tmp_path / "in/a.jsonl", rows[:120])
    b = write_jsonl(tmp_path / "in/b.jsonl", rows[100:] + rows[:10])  # 30 rows repeat rows of a.jsonl
    assert jsonl.n_buckets(jsonl.total_bytes([str(a), str(b)])) > 3

    def run(name, **kw):
        kw.setdefault("workers", 0)
        res = preprocess([str(tmp_path / "in")], str(tmp_path / name), TOK, progress=False, **kw)
        return res, _rows_of(tmp_path / name)

    _, plain = run("plain")
    res, dedup = run("dedup", dedup=True)
    assert len(plain) == 230 and res.duplicates == 30
    assert dedup == list(dict.fromkeys(plain))  # first occurrences, in input order
    res, shuf = run("shuf", shuffle=True, seed=1, merged_jsonl=str(tmp_path / "merged.jsonl"))
    assert sorted(shuf) == sorted(plain) and shuf != plain and res.duplicates == 0
    _, shuf_again = run("shuf2", shuffle=True, seed=1)
    _, shuf_other = run("shuf3", shuffle=True, seed=2)
    assert shuf_again == shuf and shuf_other != shuf
    merged = [json.loads(x) for x in (tmp_path / "merged.jsonl").read_text().splitlines()]
    tok = _tokenizer()
    assert [tuple(tok.encode(m["inputs"]).ids) for m in merged] == [s[0] for s in shuf]
    res, both = run("both", dedup=True, shuffle=True, seed=1, workers=2)
    assert sorted(both) == sorted(set(plain)) and res.rows_written == 200


def test_dedup_reports_bad_rows_at_their_original_line(tmp_path, monkeypatch):
    monkeypatch.setattr(jsonl, "BUCKET_BYTES", 200)
    f = write_jsonl(tmp_path / "a.jsonl", ROWS + ["{broken"] + ROWS)
    res = preprocess([str(f)], str(tmp_path / "o"), TOK, workers=0, dedup=True, shuffle=True, progress=False)
    assert res.rows_written == 5 and res.duplicates == 5
    assert Path(res.report).read_text() == f"{f}:6: not JSON (Expecting property name enclosed in double quotes)\n"


def test_progress_bar_shows_rows_and_tokens_per_second(tmp_path, capsys, monkeypatch):
    from mtf_train.data import preprocess as pre

    monkeypatch.setattr(pre._Progress, "MININTERVAL", 0)
    f = write_jsonl(tmp_path / "a.jsonl", ROWS * 10)
    preprocess([str(f)], str(tmp_path / "o"), TOK, workers=0, progress=True)
    err = capsys.readouterr().err
    assert "tokenizing" in err and "rows/s" in err and "tok/s" in err


def test_tokenizer_resolution_is_offline_and_errors_are_one_line(tmp_path, monkeypatch):
    from mtf_train.data.tokenizer import load_tokenizer

    _, info = load_tokenizer(TOK)
    assert (info.eod_token, info.eod_id, info.pad_token, info.pad_id) == ("</s>", 2, "<pad>", 3)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(DataError, match="not in the Hugging Face cache"):
        load_tokenizer("bigscience/tokenizer")
    with pytest.raises(DataError, match="no tokenizer.json"):
        load_tokenizer(str(tmp_path))
    # A name found in the local cache is used without a network.
    snap = tmp_path / "hf/hub/models--someone--tok/snapshots/0123456789abcdef0123456789abcdef01234567"
    snap.mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (snap / name).write_bytes((SAMPLE_TOKENIZER / name).read_bytes())
    (tmp_path / "hf/hub/models--someone--tok/refs").mkdir()
    (tmp_path / "hf/hub/models--someone--tok/refs/main").write_text(snap.name)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf/hub"))
    _, info = load_tokenizer("someone/tok")
    assert info.vocab_size == _tokenizer().get_vocab_size()


def test_cli_bad_input_is_one_line_exit_2(tmp_path):
    err = one_line_error(mtf("data", "preprocess", "-i", str(tmp_path / "nope.jsonl"), "-o", str(tmp_path / "o"),
                             "-t", TOK))
    assert err.endswith("nope.jsonl: no such file or folder")
    (tmp_path / "empty").mkdir()
    err = one_line_error(mtf("data", "preprocess", "-i", str(tmp_path / "empty"), "-o", str(tmp_path / "o"), "-t", TOK))
    assert "folder holds no *.jsonl file" in err
    f = write_jsonl(tmp_path / "a.jsonl", ["[1]"])
    err = one_line_error(mtf("data", "preprocess", "-i", str(f), "-o", str(tmp_path / "o"), "-t", TOK, "--strict"))
    assert f"{f}:1: not a JSON object (list)" in err


def test_data_cli_module_is_light():
    code = ("import sys, argparse; from mtf_train.data import cli; p = argparse.ArgumentParser(); "
            "cli.register(p.add_subparsers()); heavy = [m for m in ('torch', 'megatron', 'numpy', 'tokenizers') "
            "if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert out.strip() == "[]"


def test_shipped_sample_is_reproduced_byte_for_byte(tmp_path):
    """The generator gives the shipped jsonl, and preprocessing it with the shipped tokenizer the shipped datasets."""
    from mtf_train.data.sample import DATASETS, SEED, write_jsonl as write_sample

    write_sample(tmp_path)
    shipped = sorted(p.relative_to(SAMPLE_DIR) for p in (SAMPLE_DIR / "jsonl").rglob("*.jsonl"))
    assert shipped == sorted(p.relative_to(tmp_path) for p in (tmp_path / "jsonl").rglob("*.jsonl"))
    for rel in shipped:
        assert (tmp_path / rel).read_bytes() == (SAMPLE_DIR / rel).read_bytes(), rel
    for ds in DATASETS:
        preprocess([str(tmp_path / "jsonl" / ds)], str(tmp_path / f"xp3_{ds}"), TOK, workers=0, dedup=True,
                   shuffle=True, seed=SEED, progress=False)
        for suffix in ("_inputs_document.bin", "_inputs_document.idx", "_targets_document.bin", "_targets_document.idx"):
            name = f"xp3_{ds}{suffix}"
            assert (tmp_path / name).read_bytes() == (SAMPLE_DIR / name).read_bytes(), name
        n = MTFPair(str(SAMPLE_DIR / f"xp3_{ds}")).check()
        assert 200 <= n <= 400


def test_rows_longer_than_the_bound_are_skipped_and_listed(tmp_path):
    """The long-row policy: rows over --max-tokens are skipped and listed; a row far over it (more bytes than any
    text of that many tokens) is skipped without being tokenized. Typed as a user would, from the data folder."""
    long_text = "word " * 60                      # about 60 tokens: tokenized, then skipped
    huge = "x" * (40 * 32 + 100)                # over 32 bytes per allowed token: never tokenized
    rows = ROWS + [{"inputs": long_text, "targets": "ok"}, {"inputs": huge, "targets": "ok"}]
    write_jsonl(tmp_path / "in.jsonl", rows)
    proc, imported = mtf_imports("data", "preprocess", "-i", "in.jsonl", "-o", "out/o", "-t", TOK, "--workers", "0",
                                 "--max-tokens", "40", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert imported == []  # no torch or megatron: the indexes are written with numpy
    assert "7 read, 5 written, 2 skipped (longer than 40 tokens: 2)" in proc.stdout
    lines = (tmp_path / "out" / "o_skipped.txt").read_text().splitlines()
    assert len(lines) == 2 and lines[0].startswith("in.jsonl:6: longer than 40 tokens (") and "tokens)" in lines[0]
    size = int(lines[1].split("(")[1].split()[0].replace(",", ""))
    assert lines[1] == f"in.jsonl:7: longer than 40 tokens ({size:,} bytes, not tokenized)" and size > len(huge)
    got_in, _ = _read(tmp_path / "out" / "o")
    assert len(got_in) == 5
    # 0 lifts the bound; the default (131072) keeps both rows of this file.
    for extra in (["--max-tokens", "0"], []):
        out = mtf("data", "preprocess", "-i", "in.jsonl", "-o", "all/o", "-t", TOK, "--workers", "0", *extra,
                  cwd=tmp_path, check=True).stdout
        assert "7 read, 7 written, 0 skipped" in out
    assert "must be 0 (no bound) or more" in one_line_error(
        mtf("data", "preprocess", "-i", "in.jsonl", "-o", "x/o", "-t", TOK, "--max-tokens", "-1", cwd=tmp_path))


def test_mixture_output_onto_a_file_is_one_line(tmp_path):
    (tmp_path / "f").write_text("")
    line = one_line_error(mtf("data", "mixture", str(ROOT / "data_paths" / "sample_mixture.yaml"), "-o", "f",
                              cwd=tmp_path))
    assert line == "mtf-train: error: f: -o: is a file; the path files are written into a folder"
