"""Several tests/dist scripts one after another on the same ranks (one start of torch, DeepSpeed and megatron-core
for all of them): `main(["tp_parity", "A.json", "--", "pipe_parity", "1", "2", "B.json"])`.

Each script's main() ends with sys.exit(0) when its checks pass; any other exit stops the sequence there. The
process group stays up between scripts; each one initialises the model-parallel groups it needs (init_parallel
replaces those of the script before)."""
from __future__ import annotations

import importlib
import sys


def main(argv: list[str]) -> None:  # as mtf_train.ranks calls it
    steps, step = [], []
    for arg in argv + ["--"]:
        if arg == "--":
            steps.append(step)
            step = []
        else:
            step.append(arg)
    for name, *args in filter(None, steps):
        try:
            importlib.import_module(name).main(args)
        except SystemExit as end:
            if end.code not in (0, None):
                raise


if __name__ == "__main__":
    main(sys.argv[1:])
