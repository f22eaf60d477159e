"""User-facing errors: one line that names where the problem is and why, never a traceback."""
from __future__ import annotations


class UserError(Exception):
    """Bad input from the user. The CLI prints `str(err)` on one line and exits with `exit_code`."""

    exit_code = 2

    def __init__(self, where: str, reason: str, field: str | None = None):
        self.where, self.field, self.reason = where, field, reason
        super().__init__(self.line())

    def line(self) -> str:
        parts = [p for p in (self.where, self.field) if p]
        return ": ".join(parts + [self.reason])


class RecipeError(UserError):
    """A recipe that cannot be loaded or fails validation: `FILE: FIELD: REASON`."""
