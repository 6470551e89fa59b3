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


class OptionError(CryocliError):
    """A value of one option an engine or command does not accept, named by its configuration field.

    option: the field name (``epochs``, ``ini_lowpass``); value: the value given; problem: what is wrong.
    Library users read ``ini_lowpass = 0: must be positive``; the command line shows the option as typed
    (``--ini-lowpass 0: must be positive``), through the command's map of fields to flags.
    """

    def __init__(self, option: str, value: object, problem: str, path: str | Path | None = None) -> None:
        self.option = option
        self.value = value
        self.problem = problem
        super().__init__(f"{option} = {value}: {problem}", path)

    def as_flag(self, flag: str) -> CryocliError:
        """The same error in command-line terms: ``--flag value: problem``."""
        return CryocliError(f"{flag} {self.value}: {self.problem}", self.path)
