"""The checkpoint tools' errors: one line naming the file and the reason, never a traceback."""
from __future__ import annotations

from mtf_train.errors import UserError


class CkptError(UserError):
    """Bad checkpoint input: one line, exit 2."""


class VerifyError(UserError):
    """A conversion whose verification failed: one line, exit 1 (nothing written)."""

    exit_code = 1
