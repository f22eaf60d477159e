"""What `mtf-train eval TARGET` evaluates: a run folder, a checkpoint folder of any shape, or a transformers
folder; and where its results go.

Checkpoints are exported to a transformers folder first with the `ckpt export-hf` code (TP shards merged),
cached as `<out>/hf/step_N` so that a second evaluation of the same step does not export again. No torch
import here: the export is imported only when a step has to be exported.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from mtf_train.eval.tasks import EvalError

STEP_RE = re.compile(r"^global_step(\d+)$")


@dataclass
class Model:
    label: str                   # step_N, or the transformers folder's name
    step: int | None
    hf_dir: Path | None          # set once exported (or given)
    ckpt_root: Path | None       # the checkpoint root to export from


@dataclass
class Target:
    kind: str                    # run | checkpoint | hf
    path: Path
    out: Path                    # results go to out/eval/<label>/
    models: list[Model]


def _bloom_config(folder: Path) -> dict:
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise EvalError(str(folder / "config.json"), f"unreadable ({err})") from None
    if cfg.get("model_type") != "bloom":
        raise EvalError(str(folder / "config.json"), f"model_type {cfg.get('model_type')!r}: not a BLOOM model "
                        "(mtf-train evaluates BLOOM checkpoints)")
    return cfg


def saved_steps(root: Path) -> list[int]:
    return sorted(int(m.group(1)) for p in root.iterdir() if p.is_dir() and (m := STEP_RE.match(p.name))
                  and any(p.glob("layer_*-model_*states.pt")))


def _latest(root: Path) -> int:
    try:
        tag = (root / "latest").read_text().strip()
    except OSError:
        steps = saved_steps(root)
        if not steps:
            raise EvalError(str(root), "no saved step (no `latest`, no global_stepN folder)") from None
        return steps[-1]
    m = STEP_RE.match(tag)
    if not m:
        raise EvalError(str(root / "latest"), f"names {tag!r}, not a global_stepN folder")
    return int(m.group(1))


def _checkpoint_root(path: Path) -> Path | None:
    if (path / "latest").is_file() or any(STEP_RE.match(p.name) for p in path.iterdir() if p.is_dir()):
        return path
    return None


def resolve(target: str, *, step: int | None, all_steps: bool, output: str | None) -> Target:
    path = Path(target).expanduser()
    if not path.exists():
        raise EvalError(target, "no such folder")
    if not path.is_dir():
        raise EvalError(target, "not a folder (give a run folder, a checkpoint folder or a transformers folder)")
    path = path.resolve()
    runs = sorted(p for p in path.iterdir() if (p / "run.json").is_file() and not p.name.startswith("."))
    if not (path / "run.json").is_file() and runs:
        path = runs[-1]  # a recipe's folder of runs (runs/<recipe>): its latest run, as `status` picks it
    if (path / "config.json").is_file() and not (path / "run.json").is_file():
        if step is not None or all_steps:
            raise EvalError(target, "a transformers folder has one model: --step/--all-steps do not apply")
        _bloom_config(path)
        out = Path(output).resolve() if output else Path.cwd() / "mtf-eval" / path.name
        return Target("hf", path, out, [Model(path.name, None, path, None)])

    run_dir = None
    if (path / "run.json").is_file():
        run_dir = path
        info = json.loads((path / "run.json").read_text() or "{}")
        root = Path(info["save"]) if info.get("save") else path / "checkpoints"
        if not root.is_dir():
            raise EvalError(str(root), "the run has no checkpoint folder yet")
    elif STEP_RE.match(path.name):
        if all_steps:
            raise EvalError(target, "a global_stepN folder is one step: --all-steps does not apply")
        root, step = path.parent, step if step is not None else int(STEP_RE.match(path.name).group(1))
    else:
        root = _checkpoint_root(path)
        if root is None:
            raise EvalError(target, "not a run folder, a checkpoint folder (with `latest` or global_stepN) or a "
                            "transformers folder (with config.json)")
    if run_dir is None and (root.parent / "run.json").is_file():
        run_dir = root.parent
    if all_steps:
        steps = saved_steps(root)
        if not steps:
            raise EvalError(str(root), "no saved step to evaluate")
    elif step is not None:
        if not (root / f"global_step{step}").is_dir():
            have = ", ".join(map(str, saved_steps(root))) or "none"
            raise EvalError(str(root), f"no global_step{step} (saved steps: {have})", field="--step")
        steps = [step]
    else:
        steps = [_latest(root)]
    if output:
        out = Path(output).resolve()
    elif run_dir is not None:
        out = run_dir
    else:
        out = Path.cwd() / "mtf-eval" / (root.name if root.name != "checkpoints" else root.parent.name)
    kind = "run" if (path / "run.json").is_file() else "checkpoint"
    return Target(kind, path, out, [Model(f"step_{s}", s, None, root) for s in steps])


def ensure_hf(model: Model, out: Path, *, verify: bool, say=print) -> Path:
    """The transformers folder of `model`: given, cached from an earlier export, or exported now (once: later
    evaluations of the step find it in out/hf/step_N)."""
    if model.hf_dir is not None:
        return model.hf_dir
    cached = out / "hf" / model.label
    if (cached / "config.json").is_file() and list(cached.glob("*.safetensors")):
        say(f"{model.label}: transformers export cached in {cached}")
    else:
        import time

        from mtf_train.ckpt.accelerator import prepare_deepspeed
        from mtf_train.ckpt.hf import export_hf

        prepare_deepspeed()

        t0 = time.perf_counter()
        cached.parent.mkdir(parents=True, exist_ok=True)
        export_hf(model.ckpt_root, cached, step=model.step, verify=verify)
        say(f"{model.label}: exported to transformers in {cached} ({time.perf_counter() - t0:.1f} s)")
    _bloom_config(cached)
    model.hf_dir = cached
    return cached
