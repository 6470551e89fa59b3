"""The error types cryocli raises: bad input, and a run broken off after it started.

The CLI turns a :class:`CryocliError` into one line on stderr, ``cryocli: error: <file>: <problem>``,
and exit code 2; a :class:`RunBrokenOff` into one line and exit code 1. Library users catch them like any
exception.
"""

from __future__ import annotations

import re
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


class RunBrokenOff(Exception):
    """A run that stopped after it started, through no fault of its input: another torchrun rank failed or
    stalled, the device ran out of memory, or the operating system refused a read or write (a full disk).

    reason, advice: :func:`broken_off`'s; kept: the folder whose checkpoint stays for ``--resume`` (None: the run had
    written none, and nothing was kept).
    """

    def __init__(self, reason: str, kept: Path | None, advice: str = "") -> None:
        self.reason, self.kept, self.advice = reason, kept, advice
        super().__init__(self.line())

    def line(self) -> str:
        """The single line shown to a user."""
        if self.kept is None:
            tail = "it stopped before its first checkpoint; nothing was kept"
            return f"{self.reason}; {tail}" + (f"; {self.advice}" if self.advice else "")
        resume = (f"{self.advice}, and add --resume to continue" if self.advice
                  else "run the same command with --resume to continue")
        return f"{self.reason}; the last checkpoint is kept in {self.kept}; {resume}"


def memory_shortage(exc: BaseException) -> str | None:
    """``exc`` as one line when it is PyTorch's report of an allocation that failed (a GPU's
    ``OutOfMemoryError``, or the CPU allocator's error), else None."""
    text = " ".join(str(exc).split())
    if type(exc).__name__ == "OutOfMemoryError":
        # "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of ..." : the first two
        # sentences say what and how much.
        return ". ".join(text.split(". ")[:2])[:200]
    cpu = re.search(r"can't allocate memory: you tried to allocate (\d+) bytes", text)
    if isinstance(exc, RuntimeError) and cpu:
        return f"out of memory on the CPU: an allocation of {int(cpu.group(1)) / 2**30:.2f} GiB failed"
    return None


def io_failure(exc: BaseException) -> str | None:
    """``exc`` as one line when it is the operating system's refusal of a read or write (a full disk, a quota
    exceeded, a file that went away), else None."""
    if not isinstance(exc, OSError):
        return None
    what = exc.strerror or " ".join(str(exc).split()) or type(exc).__name__
    return f"{what} ({exc.filename})" if exc.filename else what


#: What helps when memory ran out: every command that runs out of memory has --batch-size.
MEMORY_ADVICE = "a smaller --batch-size needs less memory"


def broken_off(exc: BaseException) -> tuple[str, str] | None:
    """Why a command broke off through no fault of its input, and what would help (``""``: nothing but trying
    again): a read or write the operating system refused (a full disk), a collective with the other torchrun ranks
    that failed, or memory that ran out. None for any other error."""
    from cryocli import distributed  # torch.distributed, read only when there is an error to explain

    failed_io = io_failure(exc)
    if failed_io is not None:
        return failed_io, ""
    if distributed.is_collective_failure(exc):
        return f"a collective with the other ranks failed ({' '.join(str(exc).split())[:200]})", ""
    shortage = memory_shortage(exc)
    if shortage is not None:
        return shortage, MEMORY_ADVICE
    return None
