"""The `eval` command: zero-shot rank classification of a run, a checkpoint or a transformers folder.

`register(subparsers)` adds it to the main CLI; the handler imports lm-eval and torch only after the
arguments have been checked, so bad input is refused quickly and on one line.
"""
from __future__ import annotations

import argparse

from mtf_train.eval.tasks import FAMILIES


def _list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "eval", help="zero-shot accuracy on held-out tasks (XCOPA, XNLI, XStoryCloze, XWinograd) with lm-eval",
        description="Score TARGET by rank classification on held-out task families, several English prompts each "
        "(median, min and max over prompts), with lm-evaluation-harness's HF backend. TARGET: a run folder "
        "(results in its eval/step_N/), a checkpoint folder of any TP/PP shape (exported to transformers first, "
        "cached in hf/step_N) or a transformers BLOOM folder. Datasets: local copies in their published schemas "
        "(--data-dir DIR/<task>/<language>/<split>.jsonl; the shipped sample: data/sample/eval), else the hub when "
        "it is reachable.")
    p.add_argument("target", metavar="TARGET")
    p.add_argument("--tasks", type=_list, help=f"comma-separated task families (default: all: {', '.join(FAMILIES)})")
    p.add_argument("--languages", type=_list, help="comma-separated languages (default: every language of each task)")
    p.add_argument("--data-dir", help="local dataset copies: DIR/<task>/<language>/<split>.{jsonl,parquet} "
                   "(default: the run's recipe eval.zero_shot.data_dir, else the hub)")
    steps = p.add_mutually_exclusive_group()
    steps.add_argument("--step", type=int, help="evaluate global_stepN (default: the latest)")
    steps.add_argument("--all-steps", action="store_true", help="evaluate every saved step (and plot accuracy "
                       "against step)")
    p.add_argument("-o", "--output", help="folder for eval/ and hf/ (default: the run folder; else ./mtf-eval/NAME)")
    p.add_argument("--batch-size", type=int, default=None, help="requests per batch (default: the recipe's "
                   "eval.zero_shot.batch_size, 16)")
    p.add_argument("--device", help="cpu, cuda, cuda:0 (default: cuda when available)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="model precision (default: bfloat16 on GPUs, float32 on CPU)")
    p.add_argument("--parallelize", action="store_true", help="spread the model over this node's GPUs "
                   "(lm-eval's HF backend, parallelize=True; what the rendered eval job uses)")
    p.add_argument("--verify-export", action="store_true", help="check the transformers export's logits against "
                   "the checkpoint with the real model (slower; `ckpt export-hf` always does)")
    p.set_defaults(func=cmd_eval)
    return p


def _recipe_defaults(target: str) -> dict:
    """eval.zero_shot of the run's resolved recipe, when TARGET is (inside) a run folder."""
    from pathlib import Path

    from mtf_train.recipe.yamlio import load_yaml

    path = Path(target).expanduser()
    runs = sorted(p for p in path.iterdir() if (p / "run.json").is_file()) if path.is_dir() else []
    for folder in (path, path.parent, path.parent.parent, *runs[-1:]):
        resolved = folder / "recipe.resolved.yaml"
        if (folder / "run.json").is_file() and resolved.is_file():
            try:
                data = load_yaml(resolved.read_text()) or {}
            except Exception:  # an unreadable resolved recipe only loses the defaults
                return {}
            return ((data.get("eval") or {}).get("zero_shot")) or {}
    return {}


def cmd_eval(args) -> int:
    from mtf_train.eval.run import evaluate
    from mtf_train.eval.tasks import EvalError

    zs = _recipe_defaults(args.target)
    if args.batch_size is not None and args.batch_size < 1:
        raise EvalError("--batch-size", f"must be at least 1, not {args.batch_size}")
    if args.data_dir is not None:
        from pathlib import Path

        if not Path(args.data_dir).is_dir():
            raise EvalError(args.data_dir, "no such folder", field="--data-dir")
    return evaluate(args.target, tasks=args.tasks or zs.get("tasks") or None,
                    languages=args.languages or zs.get("languages") or None,
                    data_dir=args.data_dir or zs.get("data_dir"), step=args.step, all_steps=args.all_steps,
                    output=args.output, batch_size=args.batch_size or zs.get("batch_size") or 16,
                    device=args.device, dtype=args.dtype, parallelize=args.parallelize,
                    verify_export=args.verify_export)
