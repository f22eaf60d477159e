"""Every test has exactly one tier marker (unit, e2e or cluster; tests/conftest.py), and the tiers are registered
so that `--strict-markers` refuses a misspelt one."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib

from tests.conftest import TIER_KEY, TIERS
from tests.helpers import ROOT


def test_every_collected_test_has_exactly_one_tier(request, tmp_path):
    tiers = request.config.stash[TIER_KEY]
    modules = {nodeid.split("::")[0] for nodeid in tiers}
    if not {f"tests/{p.name}" for p in (ROOT / "tests").glob("test_*.py")} <= modules:
        # this session collected part of the suite: collect all of it in a child pytest
        dump = tmp_path / "tiers.json"
        proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                               str(ROOT / "tests")], cwd=ROOT, capture_output=True, text=True, timeout=300,
                              env=dict(os.environ, MTF_TEST_TIERS_DUMP=str(dump)))
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        tiers = json.loads(dump.read_text())
    assert len(tiers) > 250
    wrong = {nodeid: got for nodeid, got in tiers.items() if len(got) != 1}
    assert not wrong, wrong
    assert {got[0] for got in tiers.values()} == set(TIERS)


def test_tiers_are_registered_and_markers_strict():
    ini = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert {m.split(":")[0] for m in ini["markers"]} >= set(TIERS)
    assert "--strict-markers" in ini["addopts"].split() and "--durations=15" in ini["addopts"].split()
