"""The one error type cryocli raises for bad input.

The CLI turns a :class:`CryocliError` into one line on stderr, ``cryocli: error: <file>: <problem>``,
and exit code 2. Library users catch it like any exception.
"""

from __future__ import annotations

from pathlib import Path


class CryocliError(Exception):
    """Bad input or an impossible request, with the file it concerns when there is one."""

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        self.message = message
        self.path = str(path) if path is not None else None
        super().__init__(self.line())

    def line(self) -> str:
        """The single line shown to a user."""
        text = " ".join(self.message.split())
        return f"{self.path}: {text}" if self.path else text
