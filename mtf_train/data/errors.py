"""Errors for bad data inputs (files, rows, tokenizers): one line, `WHERE: REASON`, exit code 2."""
from __future__ import annotations

from mtf_train.errors import UserError


class DataError(UserError):
    pass
