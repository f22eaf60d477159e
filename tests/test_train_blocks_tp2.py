"""Compiled blocks at TP=2 on two gloo ranks (see tests/dist/blocks_tp2.py)."""
from __future__ import annotations

import json

from tests.test_train_parallel import run_ranks


def test_tp2_blocks_are_one_graph_and_compile_to_eager_numerics(tmp_path):
    out = tmp_path / "blocks.json"
    run_ranks(2, "blocks_tp2.py", str(out), timeout=600)
    report = json.loads(out.read_text())
    assert report["tp"] == 2
    for mode, r in report["modes"].items():
        assert (r["graphs"], r["breaks"], r["compiled_graph_breaks"]) == (1, 0, 0), (mode, r)
        assert r["max_diff"] < 2e-5 < r["max_abs"], (mode, r)
