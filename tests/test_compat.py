"""mtf_train/compat.py: the installed DeepSpeed and megatron-core are versions its private APIs were checked
against, and every probed name still exists."""
import importlib
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


def test_pyproject_bounds_admit_only_checked_minors():
    """Each bound admits every checked version, and the upper one stops before the next unchecked minor."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for package in compat.ENFORCED:
        spec = next(d for d in deps if re.match(rf"{package}(?![\w-])", d))
        lower, upper = re.search(r">=\s*([\d.]+)", spec), re.search(r"<\s*([\d.]+)", spec)
        assert lower and upper, f"pyproject.toml: {spec} needs a lower and an upper bound (see mtf_train/compat.py)"
        checked = sorted(_version(v) for v in compat.CHECKED[package])
        assert _version(lower.group(1)) <= checked[0] and checked[-1] < _version(upper.group(1)), \
            f"pyproject.toml: {spec} excludes a version in compat.CHECKED {compat.CHECKED[package]}"
        assert _version(upper.group(1)) <= (checked[-1][0], checked[-1][1] + 1), \
            f"pyproject.toml: {spec} admits minor releases newer than compat.CHECKED {compat.CHECKED[package]}"


def test_megatron_jit_stub_matches_megatron_and_keeps_dynamo_out_of_the_trainer():
    """The stand-in for megatron/core/jit.py defines what the real file defines, and with it importing the model
    and DeepSpeed leaves torch.compile's machinery (torch._dynamo, inductor) unimported."""
    import ast
    import importlib.util
    import subprocess
    import sys
    from pathlib import Path

    real = Path(importlib.util.find_spec("megatron").submodule_search_locations[0]) / "core" / "jit.py"
    tree = ast.parse(real.read_text())
    defined = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    defined |= {t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
    assert defined == set(compat.MEGATRON_JIT_NAMES), f"{real} now defines {sorted(defined)}"

    probe = ("import sys, mtf_train.train.model, deepspeed, megatron.core.jit as jit\n"
             "from mtf_train.data.indexed import megatron_indexed; megatron_indexed()\n"
             "f = lambda: 1\n"
             "print(jit.jit_fuser(f) is f, 'torch._dynamo' in sys.modules, 'torch._inductor' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.split()
    assert out[-3:] == ["True", "False", "False"], out
