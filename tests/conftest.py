"""Shared fixtures and test tiers.

Fixtures: `slurm_cluster`, a real local SLURM cluster for the whole session (tests/slurm_cluster.py); trained
tiny checkpoints shared by every module that needs the same training run (tests/fixtures.py).

Tiers (markers registered in pyproject.toml; tests/test_tiers.py checks that every test has exactly one):
- `cluster`: uses the `slurm_cluster` fixture;
- `e2e`: starts the real trainer (its ranks + DeepSpeed, `mtf-train run`, a job script) or uses a trained
  checkpoint fixture; listed below by module (or by test, where a module mixes tiers);
- `unit`: everything else: in-process checks and short CLI calls (`pytest -m unit` runs in under 2 minutes).
A marker written on the test itself (or a module's `pytestmark`) wins over these rules.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

# One thread per process, for the suite and everything it starts (CLI, trainer ranks, checkpoint tools, lm-eval),
# as torchrun already gives each rank of a multi-process job: the models here are tiny, and two threads per
# process on a 2-core machine shared with other processes spin-wait (the transformers reference of test_eval
# took 67 s of CPU with 2 threads, 6 s with 1, at load ~10). Set before torch is first imported; a user's
# setting wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from tests.fixtures import SHARED_TRAINED, _shared, shape_run, tiny_default_run  # noqa: F401  (session fixtures)
from tests.slurm_cluster import slurm_cluster  # noqa: F401  (session-scoped fixture)

TIERS = ("unit", "e2e", "cluster")

# Tests that start the trainer: "*" for a whole module, else the test functions (parameters share the tier).
E2E: dict[str, str | set[str]] = {
    "test_ckpt_2022": "*",
    "test_ckpt_tools": "*",
    "test_eval": "*",
    "test_launch_local": "*",
    "test_train_run": "*",
    "test_train_shapes": "*",
    "test_train_parallel": "*",
    "test_train_blocks_tp2": "*",
    "test_benchmarks": "*",
    "test_launch_cli": {"test_submitit_without_slurm_runs_here_stops_on_ctrl_c_and_resumes",
                        "test_preflight_of_a_local_recipe_runs_here_not_through_sbatch"},
    "test_data_check": {"test_index_builds_ahead_and_the_trainer_reuses_it"},
}
# Tests of an e2e module that start nothing (no trainer, no trained fixture): unit.
UNIT_IN_E2E_MODULES = {
    "test_ckpt_tools": {"test_reshape_layout_names_follow_the_model", "test_input_errors_come_before_torch_is_imported"},
    "test_eval": {"test_eval_job_renders_sized_by_the_plan", "test_eval_section_is_validated"},
}
TIER_KEY = pytest.StashKey[dict]()


def tier_of(item: pytest.Item) -> str:
    fixtures = set(getattr(item, "fixturenames", ()))
    if "slurm_cluster" in fixtures:
        return "cluster"
    if fixtures & SHARED_TRAINED:
        return "e2e"
    module = item.module.__name__.rsplit(".", 1)[-1] if getattr(item, "module", None) else ""
    name = getattr(item, "originalname", item.name)
    if name in UNIT_IN_E2E_MODULES.get(module, ()):
        return "unit"
    rule = E2E.get(module)
    if rule == "*" or (rule and name in rule):
        return "e2e"
    return "unit"


def worker_groups(items: list[pytest.Item]) -> dict[str, str]:
    """Module -> pytest-xdist worker group (`--dist loadgroup`, pyproject's addopts). A module's tests stay
    together and in order (module fixtures, and tests that read what an earlier test of the module made); modules
    that share a session fixture (a trained run, the SLURM cluster) join one group, so it is made once."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        while parent.setdefault(x, x) != x:
            x = parent[x]
        return x

    for item in items:
        module = item.nodeid.split("::")[0]
        fixtures = set(getattr(item, "fixturenames", ()))
        for shared in sorted((fixtures & SHARED_TRAINED) | ({"slurm_cluster"} & fixtures)):
            parent[find(module)] = find(shared)
    return {item.nodeid.split("::")[0]: find(item.nodeid.split("::")[0]) for item in items}


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker and before pytest-xdist reads the groups
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if not any(item.get_closest_marker(t) for t in TIERS):
            item.add_marker(getattr(pytest.mark, tier_of(item)))
    groups = worker_groups(items)
    for item in items:
        item.add_marker(pytest.mark.xdist_group(groups[item.nodeid.split("::")[0]]))
    # What tests/test_tiers.py checks: every collected test's tier markers, before any deselection.
    config.stash[TIER_KEY] = {item.nodeid: [m.name for m in item.iter_markers() if m.name in TIERS]
                              for item in items}
    if os.environ.get("MTF_TEST_TIERS_DUMP"):  # the child collection of tests/test_tiers.py
        Path(os.environ["MTF_TEST_TIERS_DUMP"]).write_text(json.dumps(config.stash[TIER_KEY]))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_node_collection_finished(node, ids: list[str]) -> None:
    """The controller: each worker's tests, with the group its worker put into every node id, are all the
    scheduler sees. When that does nothing (pytest-xdist#1386, pytest 9.2), modules that share a trained fixture
    train it once per worker and a module's tests run out of order: refuse rather than run slowly."""
    if node.config.getvalue("dist") == "loadgroup" and ids and not all("@" in i for i in ids):
        pytest.exit(f"pytest-xdist did not group the tests ({next(i for i in ids if '@' not in i)} has no "
                    f"@group): pytest {pytest.__version__} with this pytest-xdist, see pytest-xdist#1386; "
                    "./scripts/setup installs a pytest that works with it", returncode=4)
