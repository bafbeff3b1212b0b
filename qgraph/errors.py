"""The one error type users see: what is wrong, and how to fix it."""

from __future__ import annotations


class QGraphError(Exception):
    """A user-facing error: the CLI prints it as one line and exits with code 2."""

    def __init__(self, what: str, fix: str | None = None):
        self.what = what
        self.fix = fix
        super().__init__(f"{what} -- {fix}" if fix else what)
