"""The `ckpt` command group: inspect, to-universal, reshape, export-hf, import-hf.

`register(subparsers)` adds it to the main CLI. Nothing here imports torch: handlers import what they need.
Every bad input is one line on stderr and a non-zero exit; outputs are written to a temporary sibling folder
and renamed into place only when complete (and verified).
"""
from __future__ import annotations

import argparse

from mtf_train.ckpt.accelerator import prepare_deepspeed


def register(subparsers) -> argparse.ArgumentParser:
    ckpt = subparsers.add_parser(
        "ckpt", help="checkpoints: inspect, universal form, reshape, HF export/import",
        description="Checkpoint tools for the bigscience Megatron-DeepSpeed layout (mtf-train's own checkpoints "
        "and 2022 BLOOM ones). Conversions verify themselves on a fixed batch with the real model.")
    sub = ckpt.add_subparsers(dest="ckpt_command", metavar="COMMAND", required=True)

    p = sub.add_parser("inspect", help="iteration, TP/PP/DP degrees, dtype, parameters, optimizer and universal "
                       "states, sizes",
                       description="Read a checkpoint's files (a checkpoint folder with `latest`, a run folder or "
                       "a global_stepN folder) and describe it. No tensor data is loaded.")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--step", type=int, help="global_stepN instead of the one `latest` names")
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.add_argument("--no-check", action="store_true", help="skip the CRC-32 check of every file (it reads every "
                   "byte once; the check that every layer file is there stays)")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("to-universal", help="DeepSpeed's universal converter, with BLOOM's TP patterns supplied",
                       description="Convert DIR's step to DeepSpeed's universal form (global_stepN_universal and "
                       "latest_universal next to it, or under -o). Uses deepspeed.checkpoint.ds_to_universal as a "
                       "library; 2022 checkpoints without universal_checkpoint_info get BLOOM's patterns.")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--step", type=int, help="global_stepN instead of the one `latest` names")
    p.add_argument("-o", "--output", metavar="ROOT", help="checkpoint root to write into (default: DIR's root)")
    p.add_argument("--workers", type=int, help="extract workers (default: sized to this host's memory and CPUs)")
    p.add_argument("--merge-workers", type=int, help="merge workers (default: sized to memory)")
    p.add_argument("--force", action="store_true", help="replace an existing universal form of this step")
    p.add_argument("--drop-vocab-padding", action="store_true",
                   help="drop the vocabulary's padding rows (DeepSpeed's default; they come back as zeros on load). "
                   "Kept by default, so that resuming from the universal form equals resuming from DIR; drop them "
                   "only to load at a smaller padded vocabulary")
    p.set_defaults(func=cmd_to_universal)

    p = sub.add_parser("reshape", help="move a checkpoint to another TP/PP/DP shape, verified",
                       description="Write DIR's step at the shape TP x PP x DP into OUT, an ordinary checkpoint "
                       "that resumes plainly (no universal flag). Then verify with the real model at both shapes: "
                       "loss and logits on a fixed batch, and the next step's loss (optimizer state carried). "
                       "Checkpoints too large for this machine are rendered as a job for a recipe's cluster.")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--tp", type=int, required=True, help="target tensor-parallel degree")
    p.add_argument("--pp", type=int, required=True, help="target pipeline-parallel degree")
    p.add_argument("--dp", type=int, default=1, help="target data-parallel degree (default: %(default)s)")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="new checkpoint folder (must not exist)")
    p.add_argument("--step", type=int, help="global_stepN instead of the one `latest` names")
    p.add_argument("--method", choices=["direct", "universal"], default="direct",
                   help="direct: stream tensors into the new layout (default); universal: DeepSpeed's converter, "
                   "then load at the new shape and save")
    p.add_argument("--no-verify", action="store_true", help="skip the verification runs")
    p.add_argument("--recipe", metavar="RECIPE", help="for --job: the recipe whose cluster runs the job")
    p.add_argument("--job", metavar="FILE", help="render the load-and-save + verification as a job script instead "
                   "of running it here (automatic when the checkpoint does not fit this machine)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="recipe override (with --recipe)")
    p.add_argument("--here", action="store_true", help="run here whatever the size (what a rendered job does)")
    _json_flag(p)
    p.set_defaults(func=cmd_reshape)

    p = sub.add_parser("export-hf", help="a transformers BloomForCausalLM folder, verified",
                       description="Merge TP shards into a transformers BloomForCausalLM folder (config.json, "
                       "safetensors shards, the tokenizer when the checkpoint names a local one), then check that "
                       "transformers' logits equal ours on a fixed batch and that AutoModelForCausalLM loads it.")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("-o", "--output", required=True, metavar="HFDIR")
    p.add_argument("--step", type=int, help="global_stepN instead of the one `latest` names")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="cast weights (default: as saved)")
    p.add_argument("--shard-size", default="5GB", help="largest safetensors file (default: %(default)s)")
    p.add_argument("--no-verify", action="store_true", help="skip the logits comparison")
    _json_flag(p)
    p.set_defaults(func=cmd_export_hf)

    p = sub.add_parser("import-hf", help="a transformers BLOOM folder into our layout, verified",
                       description="Split a local transformers BLOOM folder (e.g. bloom-560m) into an mtf-train "
                       "checkpoint at TP x PP (iteration 0, fresh optimizer), so that a run starts finetuning from "
                       "it with checkpoint.load=DIR. Verified: our logits at that shape equal transformers'.")
    p.add_argument("hfdir", metavar="HFDIR")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--dp", type=int, default=1)
    p.add_argument("-o", "--output", required=True, metavar="DIR")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="training precision the checkpoint is for (bfloat16: BF16 optimizer, ZeRO-1)")
    p.add_argument("--no-verify", action="store_true", help="skip the logits comparison")
    _json_flag(p)
    p.set_defaults(func=cmd_import_hf)
    return ckpt


def _json_flag(p) -> None:
    """The conversions' --json: what the tests and scripts read instead of the human lines."""
    p.add_argument("--json", action="store_true", help="print one JSON object (the checks with their numbers) on "
                   "stdout; progress goes to stderr")


def _report(args, run) -> int:
    """Run a conversion; with --json its human lines go to stderr and its result is the only thing on stdout."""
    import contextlib
    import json
    import sys

    if not args.json:
        run()
        return 0
    with contextlib.redirect_stdout(sys.stderr):
        result = run()
    print(json.dumps(result, indent=2))
    return 0


def _check_input(check) -> None:
    """Run `check` (the command's own reading and checks of its input, torch-free) before torch is imported: a
    missing, incomplete or damaged checkpoint or an impossible request is one line at once. The CRCs are not
    read twice (`safe.check_file`)."""
    from mtf_train.ckpt.torchzip import NeedsTorch

    try:
        check()
    except NeedsTorch:  # the command reads it with torch and says what is wrong, if anything
        pass


def cmd_inspect(args) -> int:
    from mtf_train.ckpt.inspect import inspect_checkpoint

    info = inspect_checkpoint(args.dir, args.step, check=not args.no_check)
    print(info.to_json() if args.json else info.text())
    return 0


def cmd_to_universal(args) -> int:
    from mtf_train.ckpt.client import read_checkpoint

    _check_input(lambda: read_checkpoint(args.dir, args.step, torch_free=True))
    prepare_deepspeed()
    from mtf_train.ckpt.universal import to_universal

    out = to_universal(args.dir, step=args.step, output_root=args.output, workers=args.workers,
                       merge_workers=args.merge_workers, force=args.force,
                       keep_vocab_padding=not args.drop_vocab_padding)
    print(f"universal checkpoint: {out}")
    return 0


def cmd_reshape(args) -> int:
    from pathlib import Path

    from mtf_train.ckpt.reshape import check_request, reshape

    _check_input(lambda: check_request(args.dir, args.step, args.tp, args.pp, args.dp, Path(args.output).resolve(),
                                       torch_free=True))
    prepare_deepspeed()

    return _report(args, lambda: reshape(
        args.dir, tp=args.tp, pp=args.pp, dp=args.dp, output=args.output, step=args.step, method=args.method,
        verify=not args.no_verify, recipe=args.recipe, sets=args.sets, job=args.job, here=args.here))


def cmd_export_hf(args) -> int:
    from mtf_train.ckpt.source import read_source

    _check_input(lambda: read_source(args.dir, args.step, torch_free=True))
    prepare_deepspeed()
    from mtf_train.ckpt.hf import export_hf

    return _report(args, lambda: export_hf(args.dir, args.output, step=args.step, dtype=args.dtype,
                                           shard_size=args.shard_size, verify=not args.no_verify))


def cmd_import_hf(args) -> int:
    prepare_deepspeed()
    from mtf_train.ckpt.hf import import_hf

    return _report(args, lambda: import_hf(args.hfdir, args.output, tp=args.tp, pp=args.pp, dp=args.dp,
                                           dtype=args.dtype, verify=not args.no_verify))
