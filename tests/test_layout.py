"""The package layout: imports follow the flow recipe -> plan -> render -> launch, with data and train below and
ckpt beside; rules, files, errors, compat, process and plots are leaves. Read from the source (ast), so it costs no import and sees the
imports inside functions too."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

PKG = Path(__file__).resolve().parents[1] / "mtf_train"

# What each part of mtf_train may import from the others (its own modules always). A name is a package or a
# module (`recipe.schema`); `mtf_train` itself (its __version__) is open to all. Top-level modules count as parts.
LEAVES = {"errors": (), "files": (), "rules": (), "compat": (), "process": (), "plots": ("files",)}
ALLOWED = {
    **LEAVES,
    # one machine's ranks of a program: it imports the program by name, not by an import statement
    "ranks": ("process",),
    # the recipe and its derived shape; data for path files and the data check, the eval task catalogue for names
    "recipe": ("errors", "files", "rules", "data.pathfile", "data.indexed", "data.errors", "eval.tasks"),
    "plan": ("errors", "rules", "recipe"),
    "render": ("errors", "files", "rules", "recipe", "plan", "data.pathfile", "eval.job"),
    "launch": ("errors", "files", "rules", "process", "recipe", "plan", "render", "eval.report"),
    # below: the recipe's schema and shape, never the plan, rendering or launching
    "data": ("errors", "files", "rules", "compat", "process", "recipe.schema", "recipe.shape", "recipe.load", "recipe.yamlio",
             "eval.tasks"),
    # the trainer writes and reads checkpoints in the format ckpt/ defines
    "train": ("errors", "files", "plots", "rules", "compat", "process", "recipe.schema", "data", "ckpt.client", "ckpt.errors", "ckpt.layout",
              "ckpt.safe", "ckpt.torchzip"),
    # beside the trainer: the model, its names and its data; a recipe only for its cluster's job directives
    "ckpt": ("errors", "files", "rules", "process", "ranks", "train", "data", "recipe.schema", "recipe.load", "recipe.directives"),
    "eval": ("errors", "files", "plots", "rules", "recipe.schema", "recipe.yamlio", "recipe.directives", "plan", "ckpt"),
    "cli": ("*",),
}
# Known edges against the table, each with why it is still there; remove an entry once its import is gone.
EXCEPTIONS = {
    ("ckpt.jobs", "render.job"): "job_env: the reshape job's environment lines, until render hands them lower",
}
# Parts the CLI's plan and render paths load: no torch, DeepSpeed, megatron or transformers at any level.
LIGHT = ("errors", "files", "rules", "recipe", "plan", "render")
HEAVY = ("torch", "deepspeed", "megatron", "transformers")


def _modules():
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG).with_suffix("")
        parts = [p for p in rel.parts if p != "__init__"]
        yield ".".join(parts), path


def _imports(path: Path):
    """(imported module, line) for every import in the file (the project imports absolutely)."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            assert not node.level, f"{path}:{node.lineno}: relative import; mtf_train imports absolutely"
            for alias in node.names:
                # `from mtf_train.train import checkpoint` imports a module; `from x import name`, x
                sub = Path(*node.module.split(".")[1:], alias.name)
                is_module = (PKG / sub).is_dir() or (PKG / sub).with_suffix(".py").is_file()
                yield (f"{node.module}.{alias.name}" if node.module.startswith("mtf_train") and is_module
                       else node.module), node.lineno


def _part(module: str) -> str:
    return module.split(".")[0]


def _allowed(src: str, dst: str) -> bool:
    rule = ALLOWED[_part(src)]
    return "*" in rule or any(dst == a or dst.startswith(a + ".") for a in rule)


def test_every_part_is_in_the_table():
    parts = {_part(name) for name, _ in _modules() if name}
    assert parts <= set(ALLOWED), f"add {sorted(parts - set(ALLOWED))} to ALLOWED in tests/test_layout.py"


def test_imports_follow_the_flow():
    wrong = []
    for name, path in _modules():
        for target, line in _imports(path):
            if not target.startswith("mtf_train.") or not name:
                continue
            dst = target.removeprefix("mtf_train.")
            if _part(dst) == _part(name) or (name, dst) in EXCEPTIONS or _allowed(name, dst):
                continue
            wrong.append(f"mtf_train/{path.relative_to(PKG)}:{line}: {_part(name)} may not import {dst} "
                         f"(allowed: {', '.join(ALLOWED[_part(name)]) or 'nothing from mtf_train'})")
    assert not wrong, "imports against the flow (see ALLOWED in tests/test_layout.py):\n" + "\n".join(wrong)


def test_the_light_parts_import_no_heavy_library():
    wrong = [f"mtf_train/{path.relative_to(PKG)}:{line}: imports {target}"
             for name, path in _modules() if _part(name) in LIGHT
             for target, line in _imports(path) if target.split(".")[0] in HEAVY]
    assert not wrong, "the plan/render path must stay free of torch & co:\n" + "\n".join(wrong)


def test_rules_and_files_use_the_standard_library_only():
    for name in ("rules", "files", "errors"):
        third = {t for t, _ in _imports(PKG / f"{name}.py")
                 if t.split(".")[0] not in sys.stdlib_module_names and t != "__future__"}
        assert not third, f"mtf_train/{name}.py imports {sorted(third)}: it must stay standard library only"


def test_exceptions_name_real_modules():
    names = {name for name, _ in _modules()}
    for src, dst in EXCEPTIONS:
        assert src in names and dst in names, f"stale entry in EXCEPTIONS: {src} -> {dst}"

