"""How this project's processes end.

With torch, DeepSpeed and megatron-core loaded, the interpreter's own teardown (freeing every module and object,
after the atexit handlers) takes about a second of CPU: every trainer rank, checkpoint worker and torch-using CLI
call paid it after its work was done (benchmarks/process_exit.py). `exit_now` does what that teardown would still
do for us (non-daemon threads joined, atexit handlers run, logging handlers and the standard streams flushed) and
then ends the process with its exit code. Only entry points call it (`python -m ...` and the console script),
never code that a library user or a test calls in-process.
"""
from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
from typing import NoReturn


def one_write_per_line() -> None:
    """Make each line of stdout and stderr one write. The ranks of a job share one log file, and with
    PYTHONUNBUFFERED (the job script sets it) print() writes a line and its newline separately: another rank's
    line can land between them, and the next line then no longer starts a line (a local run's terminal view,
    which shows the trainer's lines by how they start, missed a "loaded ..." line that way)."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)  # absent when a caller replaced the stream
        if reconfigure is not None:
            reconfigure(line_buffering=True, write_through=False)


def exit_now(code: int | None) -> NoReturn:
    code = 0 if code is None else int(code)
    try:
        for t in threading.enumerate():
            if t is not threading.main_thread() and not t.daemon:
                t.join()
        atexit._run_exitfuncs()  # CPython's own call at shutdown: tensorboard, tempfile, multiprocessing hooks
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # closed, or a reader that went away (a pipe to `head`)
                pass
    finally:
        os._exit(code)
