"""mtf_train/compat.py: the installed DeepSpeed and megatron-core are versions its private APIs were checked
against, and every probed name still exists."""
import importlib
import os
import re
import tomllib

import pytest

from mtf_train import compat
from tests.helpers import ROOT

pytestmark = pytest.mark.unit


def test_installed_versions_were_checked():
    problems = compat.version_problems()
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("use", [u for u in compat.USES if u.probe], ids=lambda u: ".".join(u.probe))
def test_probed_private_names_exist(use):
    module, attribute = use.probe
    assert hasattr(importlib.import_module(module), attribute), (
        f"{module}.{attribute} is gone ({use.package}): {use.where} relies on it to {use.why}")


def test_every_use_names_real_files_and_tests():
    for use in compat.USES:
        assert use.package in compat.CHECKED
        for path in [f"mtf_train/{p}" for p in use.where.split(", ")] + use.tested_by.split(", "):
            assert (ROOT / path).is_file(), f"compat.USES: {path} does not exist ({use.api})"


def _version(text: str) -> tuple:
    return tuple(int(x) for x in text.split("."))


# Every Python that requires-python admits, and one past the newest release, for the environment markers.
PYTHONS = ("3.10", "3.11", "3.12", "3.13", "3.14")


def test_pyproject_bounds_admit_only_checked_minors():
    """Each Python gets one range per enforced package (environment markers split them); each range admits a
    checked version and no minor release without one; together they admit every checked version."""
    from packaging.markers import Marker

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for package in compat.ENFORCED:
        specs = [d for d in deps if re.match(rf"{package}(?![\w-])", d)]
        checked = sorted(_version(v) for v in compat.CHECKED[package])
        ranges = []
        for spec in specs:
            requirement, _, marker = spec.partition(";")
            lower, upper = re.search(r">=\s*([\d.]+)", requirement), re.search(r"<\s*([\d.]+)", requirement)
            assert lower and upper, f"pyproject.toml: {spec} needs a lower and an upper bound (see mtf_train/compat.py)"
            lower, upper = _version(lower.group(1)), _version(upper.group(1))
            assert lower[0] == upper[0] and upper[2:] in ((), (0,)), \
                f"pyproject.toml: {spec}: the upper bound must be a minor release (X.Y) of the lower bound's major"
            inside = [v for v in checked if lower <= v < upper]
            assert inside, f"pyproject.toml: {spec} admits none of compat.CHECKED {compat.CHECKED[package]}"
            unchecked = set(range(lower[1], upper[1])) - {v[1] for v in inside}
            assert not unchecked, (f"pyproject.toml: {spec} admits minor releases "
                                   f"{', '.join(f'{lower[0]}.{m}' for m in sorted(unchecked))} that compat.CHECKED "
                                   f"{compat.CHECKED[package]} lacks")
            ranges.append((marker.strip() and Marker(marker.strip()), lower, upper))
        for python in PYTHONS:
            applying = [r for r in ranges if not r[0] or r[0].evaluate({"python_version": python})]
            assert len(applying) == 1, f"pyproject.toml: {len(applying)} {package} ranges apply to Python {python}"
        for version in checked:
            assert any(lower <= version < upper for _, lower, upper in ranges), \
                f"pyproject.toml: no {package} range admits {'.'.join(map(str, version))} (compat.CHECKED)"


def test_import_time_compiles_are_deferred_and_keep_dynamo_out_of_the_trainer():
    """Importing the model, DeepSpeed, the data module and DeepSpeed's Muon optimizer leaves torch.compile's
    machinery (torch._dynamo, inductor) unimported; megatron's jit_fuser still compiles a kernel when called,
    lazily; torch.compile is torch's own again afterwards."""
    import subprocess
    import sys

    probe = ("import sys, mtf_train.train.model, deepspeed, megatron.core.jit as jit\n"
             "from mtf_train.data.indexed import megatron_indexed; megatron_indexed()\n"
             # DeepSpeed's engine imports its Muon optimizer in every optimizer check: its kernels stay uncompiled
             "import deepspeed.runtime.zero.muon.muon_optimizer\n"
             "import torch\n"
             "print('torch._dynamo' in sys.modules, 'torch._inductor' in sys.modules, torch.compile.__module__,\n"
             "      jit.jit_fuser is not torch.compile)\n"
             "def f(x): return x + 1\n"
             "print(jit.jit_fuser(f)(torch.ones(2)).tolist(), 'torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                         env=dict(os.environ, DS_ACCELERATOR="cpu")).stdout.split("\n")
    assert out[-3].split() == ["False", "False", "torch", "True"], out
    assert out[-2] == "[2.0, 2.0] True", out  # the deferred kernel compiles (and runs) when called
