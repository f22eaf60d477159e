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
