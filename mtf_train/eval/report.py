"""Evaluation results as people read them: a Markdown table (task x language), a plot of accuracy against
training step, and the one-line summary `mtf-train status` prints. Reads only results.json files: no torch."""
from __future__ import annotations

import json
import re
import statistics
from importlib import metadata
from pathlib import Path

from mtf_train.files import atomic_path

STEP_DIR = re.compile(r"^step_(\d+)$")


def versions() -> dict:
    out = {}
    for pkg in ("lm-eval", "transformers", "torch", "mtf-train"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def markdown(results: dict) -> str:
    """One table: a row per task, a column per language; each cell the median over prompts (min-max)."""
    tasks = results["tasks"]
    langs = sorted({lang for cells in tasks.values() for lang in cells})
    head = f"Zero-shot accuracy (%) of {results['label']}"
    if results.get("step") is not None:
        head += f" (step {results['step']})"
    lines = [f"### {head}", "",
             "Rank classification; each cell: median over prompts (min-max); chance in the last column.", "",
             "| task | " + " | ".join(langs) + " | mean | chance |",
             "|---|" + "---:|" * (len(langs) + 2)]
    for task, cells in tasks.items():
        row = []
        for lang in langs:
            c = cells.get(lang)
            row.append(f"{_pct(c['median'])} ({_pct(c['min'])}-{_pct(c['max'])})" if c else "")
        mean = statistics.mean(c["median"] for c in cells.values())
        chance = next(iter(cells.values()))["chance"]
        lines.append(f"| {task} | " + " | ".join(row) + f" | {_pct(mean)} | {_pct(chance)} |")
    return "\n".join(lines) + "\n\n"


def read_results(eval_root: Path) -> list[dict]:
    """Every step's results.json under eval_root, by step."""
    out = []
    if not eval_root.is_dir():
        return out
    for d in eval_root.iterdir():
        m = STEP_DIR.match(d.name)
        if m and (d / "results.json").is_file():
            try:
                out.append(json.loads((d / "results.json").read_text()))
            except (OSError, ValueError):
                continue  # a file being replaced: the next status call sees it
    return sorted(out, key=lambda r: r.get("step") or 0)


def task_means(results: dict) -> dict[str, float]:
    """task -> mean over languages of the median over prompts."""
    return {t: statistics.mean(c["median"] for c in cells.values()) for t, cells in results["tasks"].items()}


def latest_scores(run_dir: Path) -> dict | None:
    """For `mtf-train status`: the latest evaluated step and its per-task means."""
    all_results = read_results(Path(run_dir) / "eval")
    if not all_results:
        return None
    last = all_results[-1]
    return {"step": last.get("step"), "tasks": {t: round(v, 4) for t, v in task_means(last).items()},
            "results": str(Path(run_dir) / "eval" / last["label"] / "results.json")}


def format_scores(s: dict) -> str:
    parts = " | ".join(f"{t} {_pct(v)}" for t, v in s["tasks"].items())
    return f"zero-shot   step {s['step']}: {parts} (% accuracy, median over prompts, mean over languages)"


def plot_steps(eval_root: Path) -> Path | None:
    """accuracy_vs_step.png: one line per task (mean over languages of the median over prompts), when more
    than one step has results."""
    all_results = [r for r in read_results(eval_root) if r.get("step") is not None]
    if len(all_results) < 2:
        return None
    from mtf_train.plots import figure, save_png

    steps = [r["step"] for r in all_results]
    tasks = sorted({t for r in all_results for t in r["tasks"]})
    fig, ax = figure(7, 4.2)
    for task in tasks:
        xs = [s for s, r in zip(steps, all_results) if task in r["tasks"]]
        ys = [100 * task_means(r)[task] for r in all_results if task in r["tasks"]]
        line, = ax.plot(xs, ys, marker="o", label=task)
        cells = next(r["tasks"][task] for r in all_results if task in r["tasks"])
        ax.axhline(100 * next(iter(cells.values()))["chance"], color=line.get_color(), ls=":", lw=1)
    ax.set_xlabel("training step")
    ax.set_ylabel("zero-shot accuracy (%)")
    ax.set_title("Held-out tasks: median over prompts, mean over languages (dotted: chance)")
    ax.grid(alpha=0.3)
    ax.legend()
    return save_png(fig, eval_root / "accuracy_vs_step.png", dpi=110)
