"""`python -m mtf_train.train ARGS`: the built-in trainer (run it under torch.distributed.run, or
`python -m mtf_train.ranks --nproc_per_node N -m mtf_train.train ARGS` on one machine)."""
from __future__ import annotations

import sys

from mtf_train.errors import UserError
from mtf_train.process import one_write_per_line
from mtf_train.train.args import parse_args

# What mtf_train.ranks imports once before it forks the ranks: everything `run` needs, and torch._dynamo, which
# torch.optim imports when the optimizer is built.
PRELOAD = ("mtf_train.train.loop", "torch._dynamo")


def main(argv: list[str] | None = None) -> int:
    one_write_per_line()
    try:
        args = parse_args(argv)  # before torch, DeepSpeed and megatron are imported: a bad command fails at once
        from mtf_train.train.loop import run

        return run(args)
    except UserError as err:
        print(f"mtf_train.train: error: {err.line()}", file=sys.stderr, flush=True)
        return err.exit_code


if __name__ == "__main__":
    from mtf_train.process import exit_now

    exit_now(main())
