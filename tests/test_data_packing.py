"""Packed MTF samples: packing, segment ids and flags, skipped examples, blending, splits, caches."""
from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import numpy as np
import pytest

from mtf_train.data import cache, packing
from mtf_train.data.errors import DataError
from mtf_train.data.packed import PackedMTFDataset, build_datasets
from mtf_train.data.pathfile import parse_groups, rebase
from mtf_train.data.testing import synthetic_mtf, write_mtf_dataset

PAD = 3


def _lengths(n, seed, lo=1, hi=40, long_every=0, row_len=64):
    rng = np.random.RandomState(seed)
    out = []
    for i in range(n):
        a, b = int(rng.randint(lo, hi)), int(rng.randint(1, hi // 2))
        if long_every and i % long_every == 0:
            a = row_len  # with its target, longer than a row
        out.append((a, b))
    return out


def _groups(text, root):
    return rebase(parse_groups(text, "test"), str(root))


def _decode(row):
    """[(doc index, input length, target length)] of a row built from synthetic_mtf data, checking its layout."""
    ids, seg, is_in = row["input_ids"], row["segment_ids"], row["is_input"]
    k = int(seg.max())
    used = int((seg > 0).sum())
    assert (seg[:used] > 0).all() and (seg[used:] == 0).all(), "padding only at the end"
    assert (ids[used:] == PAD).all() and not is_in[used:].any()
    assert list(np.unique(seg[:used])) == list(range(1, k + 1)) and (np.diff(seg[:used]) >= 0).all()
    docs = []
    for s in range(1, k + 1):
        tok, flag = ids[seg == s], is_in[seg == s]
        n_in = int(flag.sum())
        assert flag[:n_in].all() and not flag[n_in:].any(), "inputs first, then targets"
        doc = int(tok[0]) - 10 if n_in else int(tok[-2]) - 2000 if len(tok) > 1 else None
        assert (tok[:n_in] == 10 + doc % 1000).all()
        assert (tok[n_in:-1] == 2000 + doc % 1000).all() and tok[-1] == 2, "target ends with eod"
        docs.append((doc, n_in, len(tok) - n_in))
    return docs


def test_next_fit_packing_is_greedy_and_in_order():
    rng = np.random.RandomState(0)
    lengths = rng.randint(1, 50, size=5000)
    starts, end = packing.next_fit_starts(lengths, 64)
    bounds = list(starts) + [end]
    assert end == len(lengths) and bounds[0] == 0
    for a, b in zip(bounds, bounds[1:]):
        assert lengths[a:b].sum() <= 64
        if b < len(lengths):
            assert lengths[a:b + 1].sum() > 64, "the next example would have fitted"
    assert len(packing.next_fit_starts(lengths, 64, limit=7)[0]) == 7


def test_rows_hold_whole_examples_with_right_segments_and_flags(tmp_path):
    lens = _lengths(300, 1, long_every=37)
    prefix = synthetic_mtf(tmp_path / "d", lens)
    ds = PackedMTFDataset(prefix, None, seq_length=63, num_samples=400, seed=5, pad_id=PAD, cache_dir=tmp_path / "c")
    long_docs = {i for i, (a, b) in enumerate(lens) if a + b > 64}
    assert ds.skipped == len(long_docs) == 9
    seen = []
    for i in range(len(ds)):
        row = ds[i]
        assert all(row[k].shape == (64,) for k in row)
        assert (row["input_ids"].dtype, row["segment_ids"].dtype, row["is_input"].dtype) == (np.int64, np.int32, bool)
        for doc, n_in, n_tg in _decode(row):
            assert (n_in, n_tg) == lens[doc], "an example is never split across rows"
            seen.append(doc)
    assert not long_docs & set(seen)
    # Epochs: every usable example once per full epoch, in a new order each time.
    per_epoch = 300 - len(long_docs)
    first, second = seen[:per_epoch], seen[per_epoch:2 * per_epoch]
    assert sorted(first) == sorted(second) == sorted(set(range(300)) - long_docs)
    assert first != second and ds.epochs >= 2
    assert ds.rows_per_epoch == len(packing.next_fit_starts(np.array([sum(lens[d]) for d in first]), 64)[0])


def test_samples_are_deterministic_and_independent_of_read_order(tmp_path):
    prefix = synthetic_mtf(tmp_path / "d", _lengths(200, 2))
    kw = dict(seq_length=63, num_samples=150, pad_id=PAD)
    a = PackedMTFDataset(prefix, None, seed=1, cache_dir=tmp_path / "c1", **kw)
    b = PackedMTFDataset(prefix, None, seed=1, cache_dir=tmp_path / "c2", **kw)
    c = PackedMTFDataset(prefix, None, seed=2, cache_dir=tmp_path / "c1", **kw)
    assert a.built and b.built
    order = np.random.RandomState(0).permutation(150)
    for i in order:
        assert all((a[int(i)][k] == b[int(i)][k]).all() for k in a[0])
    assert any((a[i]["input_ids"] != c[i]["input_ids"]).any() for i in range(10))
    assert Path(a.index_path).read_bytes() == Path(b.index_path).read_bytes()
    with pytest.raises(IndexError):
        a[150]


def test_blend_ratios_within_one_percent_on_a_large_sample():
    weights = [0.3924620202, 0.0797519865, 0.0592991658 * 1.3, 0.0011195, 0.2]
    n = 500_000
    sizes = packing.samples_per_dataset(weights, n)
    ds, local = packing.blend_index(weights, sizes, n)
    w = np.asarray(weights) / sum(weights)
    counts = np.bincount(ds, minlength=len(w))
    assert np.all(np.abs(counts / n - w) <= 0.01 * w)
    assert np.all(np.abs(counts - n * w) <= 1)  # in fact within one sample
    for k in range(len(w)):  # each dataset's samples in order, none beyond its size
        assert (local[ds == k] == np.arange(counts[k])).all() and counts[k] <= sizes[k]
    prefix = np.bincount(ds[:1000], minlength=len(w))  # every prefix is balanced too
    assert np.all(np.abs(prefix - 1000 * w) <= 1)
    assert sizes == [int(np.ceil(n * x * 1.005)) for x in w]


def test_build_datasets_blend_and_splits(tmp_path):
    for name, n in (("a", 200), ("b", 120), ("c", 80)):
        synthetic_mtf(tmp_path / f"xp3_{name}", _lengths(n, len(name) + n))
    train = _groups('"train: 0.6 0:0.9 xp3_a, 0.3 0:0.9 xp3_b, 0.1 0:0.9 xp3_c"', tmp_path)
    valid = _groups('"validation: 0.6 0.9:1 xp3_a, 0.3 0.9:1 xp3_b" "other: 1 0.9:1 xp3_c"', tmp_path)
    tr, va = build_datasets(train, valid, seq_length=63, train_samples=20_000, eval_samples_per_group=64, seed=42,
                            pad_id=PAD, cache_dir=tmp_path / "cache")
    assert len(tr) == 20_000 and set(va) == {"validation", "other"} and len(va["other"]) == 64
    counts = np.bincount(tr.dataset_index, minlength=3) / len(tr)
    assert np.allclose(counts, [0.6, 0.3, 0.1], rtol=0.01)
    # Split ranges: documents [round(S*n), round(E*n)): train and validation never share an example.
    assert [d.doc_range for d in tr.datasets] == [(0, 180), (0, 108), (0, 72)]
    assert [d.doc_range for d in va["validation"].datasets] == [(180, 200), (108, 120)]
    assert va["other"].datasets[0].doc_range == (72, 80)
    train_docs = {int(d) for d in np.asarray(tr.datasets[0].index.doc_ids)}
    assert train_docs == set(range(180))  # all of the split, nothing beyond it
    valid_docs = {doc for i in range(len(va["validation"])) if va["validation"].dataset_index[i] == 0
                  for doc, _, _ in _decode(va["validation"][i])}
    assert valid_docs == set(range(180, 200))
    assert tr.datasets[0][0]["input_ids"].shape == (64,)
    # No eval samples: no validation datasets.
    _, none = build_datasets(train, valid, seq_length=63, train_samples=100, eval_samples_per_group=0, seed=42,
                             pad_id=PAD, cache_dir=tmp_path / "cache")
    assert none == {}


def test_cache_is_reused_and_keyed_by_data_samples_length_and_seed(tmp_path):
    prefix = synthetic_mtf(tmp_path / "data/d", _lengths(100, 3))
    kw = dict(seq_length=63, num_samples=50, seed=1, pad_id=PAD)
    first = PackedMTFDataset(prefix, None, **kw)
    assert first.built and first.index_path.parent == tmp_path / "data" / cache.CACHE_SUBDIR  # next to the data
    stamp = first.index_path.stat().st_mtime_ns
    again = PackedMTFDataset(prefix, None, **kw)
    assert not again.built and again.index_path == first.index_path and first.index_path.stat().st_mtime_ns == stamp
    variants = [dict(kw, num_samples=51), dict(kw, seq_length=62), dict(kw, seed=2)]
    paths = {PackedMTFDataset(prefix, None, **v).index_path for v in variants} | {first.index_path}
    assert len(paths) == 4
    assert PackedMTFDataset(prefix, (0, 90), **kw).index_path not in paths
    # Different data (one example longer) gets a new key; a damaged cache file is rebuilt.
    synthetic_mtf(tmp_path / "data/d", _lengths(99, 3) + [(5, 5)])
    changed = PackedMTFDataset(prefix, None, **kw)
    assert changed.built and changed.index_path != first.index_path
    first.index_path.write_bytes(first.index_path.read_bytes()[:-4])
    assert PackedMTFDataset(synthetic_mtf(tmp_path / "data/d", _lengths(100, 3)), None, **kw).built
    assert not list(first.index_path.parent.glob("*.tmp*"))


def test_cache_falls_back_to_user_folder_when_data_folder_is_unusable(tmp_path, monkeypatch):
    prefix = synthetic_mtf(tmp_path / "data/d", _lengths(50, 4))
    (tmp_path / "data" / cache.CACHE_SUBDIR).write_text("a file where the cache folder would go")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user"))
    ds = PackedMTFDataset(prefix, None, seq_length=63, num_samples=10, seed=1, pad_id=PAD)
    assert ds.index_path.parent == tmp_path / "user/mtf-train/index"


def _start(args):
    prefix, cache_dir, barrier = args
    barrier.wait()  # all processes start building at the same moment
    ds = PackedMTFDataset(prefix, None, seq_length=63, num_samples=3000, seed=7, pad_id=PAD, cache_dir=cache_dir)
    return ds.built, str(ds.index_path), ds[2999]["input_ids"].tolist()


def test_concurrent_starts_build_once_and_agree(tmp_path):
    prefix = synthetic_mtf(tmp_path / "d", _lengths(3000, 5))
    ctx = mp.get_context("fork")  # this process has megatron imported already: forking is quick
    with ctx.Manager() as manager:
        barrier = manager.Barrier(4)
        with ctx.Pool(4) as pool:
            results = pool.map(_start, [(prefix, str(tmp_path / "c"), barrier)] * 4)
    assert sum(built for built, _, _ in results) == 1
    assert len({(p, tuple(r)) for _, p, r in results}) == 1
    assert [p.name for p in (tmp_path / "c").iterdir() if not p.name.startswith(".")] == [Path(results[0][1]).name]


def test_pickled_dataset_reopens_its_maps(tmp_path):
    import pickle

    prefix = synthetic_mtf(tmp_path / "d", _lengths(80, 6))
    ds = PackedMTFDataset(prefix, None, seq_length=63, num_samples=40, seed=1, pad_id=PAD, cache_dir=tmp_path / "c")
    blob = pickle.dumps(ds)
    assert len(blob) < 4000  # maps and token files are not copied
    other = pickle.loads(blob)
    assert (other[39]["input_ids"] == ds[39]["input_ids"]).all()


def test_bad_data_errors_name_the_dataset(tmp_path):
    prefix = synthetic_mtf(tmp_path / "d", [(70, 5)] * 10)
    with pytest.raises(DataError, match="longer than a row of 64 tokens"):
        PackedMTFDataset(prefix, None, seq_length=63, num_samples=5, seed=1, pad_id=PAD, cache_dir=tmp_path)
    prefix = synthetic_mtf(tmp_path / "e", [(5, 5)] * 10)
    g = _groups('"train: 1 0:0.01 e"', tmp_path)
    with pytest.raises(DataError, match=r"split 0:0.01 of 10 documents selects documents \[0, 0\)"):
        build_datasets(g, [], seq_length=63, train_samples=5, eval_samples_per_group=0, seed=1, pad_id=PAD)
    with pytest.raises(DataError, match="exactly one training group"):
        build_datasets(g + _groups('"x: 1 0:1 e"', tmp_path), [], seq_length=63, train_samples=5,
                       eval_samples_per_group=0, seed=1, pad_id=PAD)
    with pytest.raises(DataError, match="missing"):
        build_datasets(_groups('"train: 1 0:1 nowhere"', tmp_path), [], seq_length=63, train_samples=5,
                       eval_samples_per_group=0, seed=1, pad_id=PAD)
    odd = write_mtf_dataset(tmp_path / "odd", [[5, 6]] * 10, [[7, 2]] * 9)
    with pytest.raises(DataError, match="inputs hold 10 documents but targets hold 9"):
        PackedMTFDataset(odd, None, seq_length=63, num_samples=5, seed=1, pad_id=PAD, cache_dir=tmp_path)
    (tmp_path / "odd_inputs_document.idx").write_bytes(b"MMIDIDX\x00\x00garbage")
    with pytest.raises(DataError, match=r"odd_inputs_document\.idx: not a megatron indexed-dataset index"):
        PackedMTFDataset(odd, None, seq_length=63, num_samples=5, seed=1, pad_id=PAD, cache_dir=tmp_path)
