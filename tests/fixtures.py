"""Trained tiny checkpoints shared by the whole session (one training run per shape, started on first use).

- `shape_run(tp, pp, dp)`: the tiny recipe trained 4 steps at that shape (micro 2, global 8, fp32, checkpoint every
  step, no eval, no loss curve), as tests/test_train_shapes.py and tests/test_ckpt_tools.py train it. Their data
  and learning rate do not depend on the run's length (packing and blending are prefix-stable; all 4 steps are in
  warm-up), so a 2- or 3-step run is this run's prefix: the tests take the steps they need with `view()`.
- `tiny_default_run`: README's first command, `mtf-train recipes/tiny-local.yaml` (120 steps, checkpoints at
  60 and 120, evaluation every 40), shared by tests/test_train_run.py and tests/test_eval.py.

Shared runs are read-only: a test that writes copies (`view()` or `copy_run()`); the session checks at the end
that none of them changed.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.helpers import RECIPES, mtf

TINY = str(RECIPES / "tiny-local.yaml")
SHAPE_STEPS = 4
# Offline, as on a cluster node without internet; one thread each, as several tests share this machine's cores.
EVAL_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
# The fixtures that train: a test using one is e2e (tests/conftest.py).
SHARED_TRAINED = {"shape_run", "tiny_default_run"}


def shape_sets(tp: int, pp: int, dp: int) -> list[str]:
    out = []
    for s in (f"parallel.tp={tp}", f"parallel.pp={pp}", f"cluster.gpus_per_node={tp * pp * dp}", "eval.iters=0",
              "logging.log_interval=1", "checkpoint.interval=1", f"training.train_iters={SHAPE_STEPS}",
              "batch.micro=2", "batch.global=8", "logging.loss_curve=false"):
        out += ["--set", s]
    return out


def only_run(runs: Path) -> Path:
    (run,) = [p for p in (runs / "tiny-local").iterdir() if not p.name.startswith(".")]
    return run


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def view(run: Path, dest: Path, steps: list[int]) -> Path:
    """A writable copy of run folder `run` at `dest` holding only checkpoints `steps`, `latest` on the last:
    the run folder of a run that stopped there (its metrics.jsonl keeps every step)."""
    shutil.copytree(run, dest, ignore=lambda d, names: [n for n in names if Path(d).name == "checkpoints"
                                                        and n.startswith("global_step")
                                                        and n.removeprefix("global_step") not in map(str, steps)])
    (dest / "checkpoints" / "latest").write_text(f"global_step{steps[-1]}")
    return dest


def copy_run(run: Path, dest: Path) -> Path:
    """A writable copy of a run folder, its run.json pointing at the copy's checkpoints."""
    shutil.copytree(run, dest)
    info = json.loads((dest / "run.json").read_text())
    if info.get("save") == str(run / "checkpoints"):
        info["save"] = str(dest / "checkpoints")
        (dest / "run.json").write_text(json.dumps(info, indent=2))
    return dest


class _Shared:
    def __init__(self, base: Path):
        self.base, self.runs, self.before = base, {}, {}

    def train(self, key, *args: str, env: dict | None = None, timeout: float = 600):
        if key not in self.runs:
            runs = self.base / "-".join(map(str, key if isinstance(key, tuple) else (key,)))
            proc = mtf(*args, "--runs-dir", str(runs), env=env, timeout=timeout)
            assert proc.returncode == 0, f"{key}: {proc.stdout[-3000:]}{proc.stderr[-3000:]}"
            self.runs[key] = (only_run(runs), proc)
            self.before[key] = snapshot(self.runs[key][0])
        return self.runs[key]

    def check_unchanged(self):
        changed = [k for k, (run, _) in self.runs.items() if snapshot(run) != self.before[k]]
        assert not changed, f"tests changed the shared trained runs {changed}: copy them before writing"


@pytest.fixture(scope="session")
def _shared(tmp_path_factory):
    shared = _Shared(tmp_path_factory.mktemp("shared-runs"))
    yield shared
    shared.check_unchanged()


@pytest.fixture(scope="session")
def shape_run(_shared):
    """shape_run(tp, pp, dp) -> the run folder of the tiny recipe trained SHAPE_STEPS steps at that shape."""
    def get(tp: int, pp: int, dp: int = 1) -> Path:
        return _shared.train(("shape", tp, pp, dp), "run", TINY, *shape_sets(tp, pp, dp))[0]
    return get


@pytest.fixture(scope="session")
def tiny_default_run(_shared) -> tuple[Path, str]:
    """(run folder, stdout) of README's `mtf-train recipes/tiny-local.yaml`: read it, copy it to write."""
    run, proc = _shared.train("default", TINY, env=EVAL_ENV, timeout=900)
    return run, proc.stdout
