"""The `mtf-train` command line.

`mtf-train RECIPE` validates, plans, renders into a new run folder and submits. Subcommands import what
they need when they run: `plan`, `render`, `validate` and `--help` never import torch, DeepSpeed or
megatron-core.
"""
from __future__ import annotations

import argparse
import sys

from mtf_train.errors import UserError

SUBMIT_HELP = """\
mtf-train RECIPE [--dry-run] [--executor {slurm,submitit,local}] [--set KEY=VALUE ...] [--runs-dir DIR]
  Validate RECIPE, print its plan, render it into a new run folder and submit it with its executor.
"""


def _recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="recipe YAML file")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe field, YAML-typed (repeatable), e.g. --set parallel.tp=2")


def _load(args, check_data: bool = False):
    from mtf_train.plan import build_plan
    from mtf_train.recipe.load import load_recipe
    from mtf_train.recipe.validate import validate

    recipe = load_recipe(args.recipe, args.sets)
    shape = validate(recipe, check_data=check_data)
    return recipe, shape, build_plan(recipe, shape)


def cmd_plan(args) -> int:
    from mtf_train.plan import format_plan

    _, _, plan = _load(args, check_data=args.check_data)
    print(plan.to_json() if args.json else format_plan(plan))
    return 0


def cmd_validate(args) -> int:
    recipe, shape, plan = _load(args, check_data=args.check_data)
    print(f"{args.recipe}: valid (world {shape.world_size} = pp {shape.pp} x tp {shape.tp} x dp {shape.dp}, "
          f"gradient accumulation {shape.grad_accum}, {shape.train_iters} steps)")
    return 0


def cmd_render(args) -> int:
    from mtf_train.render.job import render_job

    from pathlib import Path

    out = Path(args.output)
    if out.exists() and not out.is_dir():  # checked before anything is written
        raise UserError(args.output, "-o: is a file; render writes a folder of files")
    recipe, shape, plan = _load(args, check_data=args.check_data)
    try:
        rendered = render_job(recipe, shape, plan, args.output)
    except OSError as err:
        raise UserError(str(err.filename or args.output), f"-o: cannot write: {err.strerror or err}") from None
    print(f"rendered {len(rendered.files)} files into {rendered.run_dir}")
    for f in rendered.files:
        print(f"  {f}")
    return 0


def cmd_submit(args) -> int:
    from mtf_train.launch.submit import submit

    recipe, shape, plan = _load(args, check_data=args.check_data)
    return submit(recipe, shape, plan, executor=args.executor, dry_run=args.dry_run, runs_dir=args.runs_dir,
                  chain=getattr(args, "chain", None))


def cmd_schema(args) -> int:
    from mtf_train.recipe.docs import recipe_reference

    print(recipe_reference(), end="")
    return 0


def _version() -> str:
    from mtf_train import __version__

    return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mtf-train", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Multitask finetuning of BLOOM models, from recipe to checkpoint.\n\n" + SUBMIT_HELP)
    parser.add_argument("--version", action="version", version=f"mtf-train {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("submit", help="validate, render into a run folder and submit (same as `mtf-train RECIPE`)")
    _recipe_args(p)
    p.add_argument("--dry-run", action="store_true", help="render the run folder only; submit nothing")
    p.add_argument("--executor", choices=["slurm", "submitit", "local"], help="override the recipe's executor")
    p.add_argument("--runs-dir", help="root of run folders (default $MTF_RUNS_DIR or ./runs)")
    p.add_argument("--chain", type=int, metavar="N", help="submit N jobs, each starting when the one before ends "
                   "(slurm: afterany); each resumes from the latest checkpoint (submitit: up to N-1 requeues)")
    p.add_argument("--check-data", action="store_true", help="also check that every dataset file exists")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("run", help="train on this machine (executor local): `mtf-train RECIPE --executor local`")
    _recipe_args(p)
    p.add_argument("--runs-dir", help="root of run folders (default $MTF_RUNS_DIR or ./runs)")
    p.add_argument("--check-data", action="store_true", help="also check that every dataset file exists")
    p.set_defaults(func=cmd_submit, executor="local", dry_run=False)

    p = sub.add_parser("plan", help="print the plan: shape, batch, memory, FLOPs, time")
    _recipe_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--check-data", action="store_true", help="also check that every dataset file exists")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("validate", help="check a recipe without rendering anything")
    _recipe_args(p)
    p.add_argument("--check-data", action="store_true", help="also check that every dataset file exists")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("render", help="write the job files (job.sbatch, ds_config.json, ...) into a folder")
    _recipe_args(p)
    p.add_argument("-o", "--output", required=True, help="folder to write into")
    p.add_argument("--check-data", action="store_true", help="also check that every dataset file exists")
    p.set_defaults(func=cmd_render)

    p = sub.add_parser("schema", help="print the recipe reference (every field, type, default) as Markdown")
    p.set_defaults(func=cmd_schema)

    from mtf_train.data.cli import register as register_data
    register_data(sub)
    from mtf_train.ckpt.cli import register as register_ckpt
    register_ckpt(sub)
    from mtf_train.launch.cli import register as register_launch
    register_launch(sub)
    from mtf_train.eval.cli import register as register_eval
    register_eval(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    commands = set(parser._subparsers._group_actions[0].choices)  # type: ignore[union-attr]
    if argv and not argv[0].startswith("-") and argv[0] not in commands:
        argv.insert(0, "submit")  # `mtf-train RECIPE ...`
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args) or 0
    except UserError as err:
        print(f"mtf-train: error: {err.line()}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("mtf-train: interrupted", file=sys.stderr)
        return 130


def entry() -> None:
    """The `mtf-train` console script: `main`, then the process ends without the interpreter's teardown
    (mtf_train/process.py)."""
    from mtf_train.process import exit_now

    exit_now(main())


if __name__ == "__main__":
    entry()
