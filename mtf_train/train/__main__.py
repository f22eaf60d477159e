"""`python -m mtf_train.train ARGS`: the built-in trainer (run it under torch.distributed.run)."""
import sys

from mtf_train.train.loop import main

sys.exit(main())
