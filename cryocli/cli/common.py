"""What every subcommand shares: global options, the console, error handling, JSON output, devices.

The CLI layer only parses, validates and calls the library. Errors from the library arrive as
:class:`~cryocli.errors.CryocliError` and leave as one line on stderr with exit code 2.
"""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import typer
from rich.console import Console

from cryocli.errors import CryocliError

EXIT_BAD_INPUT = 2


@dataclass
class GlobalOptions:
    """Options given before the subcommand (``cryocli --quiet fsc ...``) or after it."""

    device: str = "auto"
    threads: int | None = None
    seed: int = 0
    quiet: bool = False
    json: bool = False


STATE = GlobalOptions()


def out_console() -> Console:
    """Console for normal output (stdout); silent under --quiet or --json."""
    return Console(quiet=STATE.quiet or STATE.json, highlight=False)


def err_console() -> Console:
    """Console for progress and warnings (stderr); silent under --quiet or --json."""
    return Console(stderr=True, quiet=STATE.quiet or STATE.json, highlight=False)


def fail(message: str, path: str | Path | None = None) -> "typer.Exit":
    """Print one error line and return the exit to raise (code 2)."""
    text = CryocliError(message, path).line()
    Console(stderr=True, highlight=False, soft_wrap=True).print(f"[bold red]cryocli: error:[/] {text}", markup=True)
    return typer.Exit(code=EXIT_BAD_INPUT)


@contextmanager
def guarded() -> Iterator[None]:
    """Turn CryocliError into one clear line and exit code 2; let typer's own exits pass."""
    try:
        yield
    except CryocliError as exc:
        raise fail(exc.message, exc.path) from None


def emit_json(payload: dict[str, Any]) -> None:
    """Print the one machine-readable summary of a command (only with --json)."""
    if STATE.json:
        sys.stdout.write(json.dumps(payload, indent=None, default=_json_default) + "\n")
        sys.stdout.flush()


def _json_default(obj: Any) -> Any:
    try:
        import numpy as np

        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, np.ndarray):
            return obj.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def resolve_device(spec: str | None = None):
    """``auto`` -> CUDA when present, else CPU; ``cpu``; ``cuda`` or ``cuda:N``. Returns a torch.device."""
    import torch

    spec = (spec or STATE.device or "auto").lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise CryocliError(f"--device {spec}: CUDA is not available on this machine")
        return torch.device(spec)
    if spec == "cpu":
        return torch.device("cpu")
    raise CryocliError(f"--device {spec}: expected auto, cpu, cuda or cuda:N")


def check_new_output(path: Path, force: bool) -> None:
    """Refuse to overwrite an existing output file or a non-empty output directory without --force."""
    if path.exists() and not force:
        if path.is_dir() and not any(path.iterdir()):
            return
        raise CryocliError("output exists; pass --force to overwrite it", path)


@contextmanager
def progress_bar(total: int, description: str, unit: str = "particles") -> Iterator[Any]:
    """A rich progress bar on stderr with a throughput column; yields ``advance(k)``.

    Silent under --quiet and --json (the callable still works, so library code needs no branches).
    """
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)

    console = err_console()
    if console.quiet:
        yield lambda k=1: None
        return
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(),
               TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(description, total=total, rate="")

        def advance(k: int = 1) -> None:
            progress.advance(task, k)
            speed = progress.tasks[0].speed
            if speed:
                progress.update(task, rate=f"{speed:,.0f} {unit}/s")

        yield advance


def parse_range(text: str, option: str) -> tuple[float, float]:
    """``"15000:20000"`` -> (15000.0, 20000.0); a single number gives a zero-width range."""
    parts = text.split(":")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise CryocliError(f"{option} {text}: expected a number or a range LOW:HIGH") from None
    if len(values) == 1:
        return values[0], values[0]
    if len(values) != 2 or values[0] > values[1]:
        raise CryocliError(f"{option} {text}: expected LOW:HIGH with LOW <= HIGH")
    return values[0], values[1]
