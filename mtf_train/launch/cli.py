"""`mtf-train status|logs|cancel|preflight`: watching and stopping runs, and measuring nodes before a big job."""
from __future__ import annotations

import json

RUNS_HELP = "root of run folders (default $MTF_RUNS_DIR or ./runs)"
RUN_HELP = ("run folder: its path, <recipe>/<id> or <id> under the runs root, or a recipe name (its latest run); "
            "default: the latest run")


def cmd_status(args) -> int:
    from mtf_train.launch.runfolder import runs_root
    from mtf_train.launch.watch import find_run, format_run_list, format_status, run_status

    if args.all:
        print(format_run_list(runs_root(args.runs_dir), limit=args.limit))
        return 0
    status = run_status(find_run(args.run, args.runs_dir))
    print(json.dumps(status, indent=2) if args.json else format_status(status))
    return 0


def cmd_logs(args) -> int:
    from mtf_train.launch.watch import find_run, show_logs

    return show_logs(find_run(args.run, args.runs_dir), follow=args.follow)


def cmd_cancel(args) -> int:
    from mtf_train.launch.watch import cancel_run, find_run

    return cancel_run(find_run(args.run, args.runs_dir))


def cmd_resume(args) -> int:
    from mtf_train.launch.submit import resume
    from mtf_train.launch.watch import find_run

    return resume(find_run(args.run, args.runs_dir), chain=args.chain)


def cmd_preflight(args) -> int:
    from mtf_train.launch.preflight import preflight
    from mtf_train.recipe.load import load_recipe
    from mtf_train.recipe.validate import validate

    recipe = load_recipe(args.recipe, args.sets)
    validate(recipe)
    return preflight(recipe, executor=args.executor, runs_dir=args.runs_dir, timeout_s=args.timeout,
                     seconds=args.seconds, time_limit=args.time)


def register(sub) -> None:
    p = sub.add_parser("status", help="queue state and training progress of a run (step, loss, checkpoint)")
    p.add_argument("run", nargs="?", help=RUN_HELP)
    p.add_argument("--runs-dir", help=RUNS_HELP)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--all", action="store_true", help="list the recent runs under the runs root instead")
    p.add_argument("--limit", type=int, default=20, help="runs listed by --all (default 20)")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("logs", help="print a run's training log (-f: follow it until its jobs end)")
    p.add_argument("run", nargs="?", help=RUN_HELP)
    p.add_argument("-f", "--follow", action="store_true", help="keep printing until the run's jobs have ended")
    p.add_argument("--runs-dir", help=RUNS_HELP)
    p.set_defaults(func=cmd_logs)

    p = sub.add_parser("cancel", help="cancel a run's jobs (the whole chain); a local run: touch its kill switch")
    p.add_argument("run", help=RUN_HELP.replace("; default: the latest run", ""))
    p.add_argument("--runs-dir", help=RUNS_HELP)
    p.set_defaults(func=cmd_cancel)

    p = sub.add_parser("resume", help="start a stopped, cancelled or failed run again from its latest checkpoint, "
                                      "with its own executor (same losses as if it had not stopped)")
    p.add_argument("run", nargs="?", help=RUN_HELP)
    p.add_argument("--runs-dir", help=RUNS_HELP)
    p.add_argument("--chain", type=int, metavar="N", help="slurm: submit N jobs linked by afterany; submitit: up to "
                   "N-1 requeues")
    p.set_defaults(func=cmd_resume)

    p = sub.add_parser("preflight", help="a short job over the recipe's nodes: GPUs, matmul rate, all-reduce; "
                                         "names the slowest node")
    p.add_argument("recipe", help="recipe YAML file")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe field, YAML-typed (repeatable)")
    p.add_argument("--runs-dir", help=RUNS_HELP)
    p.add_argument("--executor", choices=["slurm", "local"], help="default: slurm when sbatch is on PATH")
    p.add_argument("--timeout", type=float, default=900, help="seconds to wait for the job, queue included "
                                                              "(default 900); then it is cancelled")
    p.add_argument("--seconds", type=float, default=3.0, help="matmul measurement per device (default 3)")
    p.add_argument("--time", default="00:10:00", help="the job's time limit (default 00:10:00)")
    p.set_defaults(func=cmd_preflight)
