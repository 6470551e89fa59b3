"""What every subcommand shares: global options, the console, error handling, JSON output, devices.

The CLI layer only parses, validates and calls the library. Errors from the library arrive as
:class:`~cryocli.errors.CryocliError` and leave as one line on stderr with exit code 2.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape

from cryocli.errors import CryocliError, RunBrokenOff, broken_off

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130   # Ctrl-C (SIGINT): 128 + 2
EXIT_TERMINATED = 143    # SIGTERM: 128 + 15

# The sentence after "cryocli: interrupted; " when a run is stopped. A command that keeps something useful
# (a run directory with checkpoints) says so with set_interrupt_hint(); the root app resets it for every run.
DEFAULT_INTERRUPT_HINT = "partial results were not written"
INTERRUPT_HINT = DEFAULT_INTERRUPT_HINT


def set_interrupt_hint(text: str | None) -> None:
    """What the interrupt line says after ``cryocli: interrupted;`` (None: the default, "partial results were
    not written"). E.g. ``set_interrupt_hint(f"checkpoints kept in {out}; run again with --resume to continue")``."""
    global INTERRUPT_HINT
    INTERRUPT_HINT = text or DEFAULT_INTERRUPT_HINT


class Interrupted(KeyboardInterrupt):
    """Raised by the SIGTERM handler of the root app, so that ``finally`` blocks and ``except KeyboardInterrupt``
    clean-up code run as for Ctrl-C; ``exit_code`` is 143 (SIGTERM) or 130 (SIGINT)."""

    def __init__(self, exit_code: int = EXIT_INTERRUPTED, signal_name: str = "SIGINT") -> None:
        super().__init__(signal_name)
        self.exit_code = exit_code
        self.signal_name = signal_name


@dataclass
class GlobalOptions:
    """Options given before the subcommand (``cryocli --quiet fsc ...``) or after it."""

    device: str = "auto"
    threads: int | None = None
    seed: int = 0
    quiet: bool = False
    json: bool = False


STATE = GlobalOptions()


#: Width of stdout when it goes to a file or a pipe. rich would use 80 columns there and cut table cells short
#: ("16003-1..."), so `cryocli info X > log.txt` lost values; a log wants every value whole, one row per line.
PIPED_WIDTH = 200


def out_console() -> Console:
    """Console for normal output (stdout); silent under --quiet or --json. :data:`PIPED_WIDTH` wide when stdout is
    not a terminal and COLUMNS does not say otherwise."""
    con = Console(quiet=STATE.quiet or STATE.json, highlight=False)
    if not con.is_terminal and not os.environ.get("COLUMNS"):
        con.width = max(con.width, PIPED_WIDTH)
    return con


def err_console() -> Console:
    """Console for progress and warnings (stderr); silent under --quiet or --json."""
    return Console(stderr=True, quiet=STATE.quiet or STATE.json, highlight=False)


def fail(message: str, path: str | Path | None = None) -> typer.Exit:
    """Print one error line and return the exit to raise (code 2)."""
    text = CryocliError(message, path).line()
    rank = os.environ.get("RANK", "0") if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "0"
    error_line(text, "cryocli: error:" if rank == "0" else f"cryocli: error (rank {rank}):")
    return typer.Exit(code=EXIT_BAD_INPUT)


def error_line(text: str, prefix: str = "cryocli: error:") -> None:
    """Print ``prefix text`` as one line on stderr (the text is never read as rich markup)."""
    text = " ".join(str(text).split())
    console = Console(stderr=True, highlight=False, soft_wrap=True, emoji=False)
    console.print(f"[bold red]{prefix}[/] {escape(text)}", markup=True)


@contextmanager
def guarded() -> Iterator[None]:
    """Turn CryocliError into one clear line and exit code 2, a run broken off (RunBrokenOff, a failed collective, an
    allocation that failed, a read or write the system refused) into one line and exit code 1; let typer's own exits
    pass."""
    try:
        yield
    except CryocliError as exc:
        raise fail(exc.message, exc.path) from None
    except RunBrokenOff as exc:
        fail(f"the run stopped: {exc.line()}")
        raise typer.Exit(code=1) from None  # not bad input: the run broke off
    except (RuntimeError, OSError) as exc:
        # Outside a run that keeps checkpoints (those raise RunBrokenOff): another rank stopped (its own error line
        # says why) or stalled past CRYOCLI_COLLECTIVE_TIMEOUT, memory ran out, or the system refused a read or write.
        why = broken_off(exc)
        if why is None:
            raise
        fail(f"the run stopped: {why[0]}" + (f"; {why[1]}" if why[1] else ""))
        raise typer.Exit(code=1) from None  # not bad input: the run broke off


def emit_json(payload: dict[str, Any]) -> None:
    """Print the one machine-readable summary of a command (only with --json)."""
    if STATE.json:
        sys.stdout.write(json.dumps(_without_non_finite(payload), indent=None, default=_json_default) + "\n")
        sys.stdout.flush()


def _without_non_finite(obj: Any) -> Any:
    """``obj`` with every infinite or NaN float replaced by None: JSON has no Infinity or NaN, and a script's
    parser (jq, JSON.parse) refuses the ``Infinity`` Python writes. None reads as "no such number"."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _without_non_finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_without_non_finite(v) for v in obj]
    return obj


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


def _device_text(spec: str | None) -> str:
    """``spec`` (default: the global --device) as it is matched and shown in messages: stripped, lower case."""
    return (spec or STATE.device or "auto").strip().lower()


def parse_device(spec: str | None = None) -> tuple[str, int]:
    """``spec`` (default: the global --device) as ``("auto", 0)``, ``("cpu", 0)`` or ``("cuda", N)``.

    Refuses any other text with resolve_device's line. Needs no torch, so the root command checks the spelling
    of --device for every subcommand at no cost.
    """
    text = _device_text(spec)
    if text in ("auto", "cpu"):
        return text, 0
    match = re.fullmatch(r"cuda(?::(\d+))?", text)
    if match is None:
        raise CryocliError(f"--device {text}: expected auto, cpu, cuda or cuda:N")
    return "cuda", int(match.group(1) or 0)


def _check_cuda(text: str, index: int) -> None:
    """Refuse ``--device cuda:index`` (shown as ``text``) on a machine without CUDA or without that device."""
    import torch

    if not torch.cuda.is_available():
        raise CryocliError(f"--device {text}: CUDA is not available on this machine")
    count = torch.cuda.device_count()
    if index >= count:
        raise CryocliError(f"--device {text}: this machine has {count} CUDA device(s), numbered from 0")


def check_device(spec: str | None = None) -> None:
    """Refuse a ``spec`` (default: the global --device) that resolve_device would refuse, with the same line.

    Run by the root command for every subcommand, also those that never use a torch device (info, fsc
    without --align), so a bad --device is never silently ignored. torch is imported only for ``cuda`` and
    ``cuda:N`` (auto and cpu are always possible): the spelling check alone costs nothing.
    """
    kind, index = parse_device(spec)
    if kind == "cuda":
        _check_cuda(_device_text(spec), index)


def resolve_device(spec: str | None = None):
    """``auto`` -> CUDA when present, else CPU; ``cpu``; ``cuda`` or ``cuda:N``. Returns a torch.device."""
    import torch

    kind, index = parse_device(spec)
    if kind == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cpu":
        return torch.device("cpu")
    _check_cuda(_device_text(spec), index)
    return torch.device("cuda", index)


def check_new_output(path: Path, force: bool) -> None:
    """Refuse to overwrite an existing output file or a non-empty output directory without --force."""
    if path.exists() and not force:
        if path.is_dir() and not any(path.iterdir()):
            return
        raise CryocliError("output exists; pass --force to overwrite it", path)


def check_writable_output(path: Path, is_dir: bool, force: bool) -> None:
    """Refuse, before any work, an output that cannot be written; one :class:`CryocliError` naming the path.

    ``is_dir``: the output is a folder (``simulate -o``, a run directory) rather than a file. Refused: an existing
    output without ``force`` (an empty folder is fine), an existing output of the wrong type (a file where a
    folder is wanted and the reverse), a path under a regular file, and a folder where nothing can be created
    (read-only, or a missing parent that cannot be created). Writability is tested with ``os.access`` and by
    creating and removing a probe file, so it also holds for root on read-only file systems. Creates nothing
    that stays.
    """
    path = Path(path)
    if path.is_symlink() and not path.exists():
        raise CryocliError("output is a broken symbolic link", path)
    if path.exists():
        if is_dir and not path.is_dir():
            raise CryocliError("output exists and is not a folder", path)
        if not is_dir and path.is_dir():
            raise CryocliError("output exists and is a folder, not a file", path)
        if not is_dir and not path.is_file():
            raise CryocliError("output exists and is not a regular file", path)
        check_new_output(path, force)
    parent = Path(os.path.abspath(path)).parent
    anchor = parent
    while not anchor.exists():
        if anchor.is_symlink():
            raise CryocliError(f"cannot create the output: {anchor} is a broken symbolic link", path)
        anchor = anchor.parent
    if not anchor.is_dir():
        raise CryocliError(f"cannot create the output: {anchor} is not a folder", path)
    _probe_writable(anchor, path, created=anchor != parent)
    if path.is_dir():
        _probe_writable(path, path, created=False)


def _probe_writable(folder: Path, output: Path, created: bool) -> None:
    what = f"cannot create the output's folder in {folder}" if created else f"cannot write in {folder}"
    if not os.access(folder, os.W_OK | os.X_OK):
        raise CryocliError(f"{what} (permission denied)", output)
    try:
        fd, probe = tempfile.mkstemp(prefix=".cryocli-probe.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise CryocliError(f"{what} ({exc.strerror or exc})", output) from None
    os.close(fd)
    try:
        os.unlink(probe)
    except OSError:
        pass


@contextmanager
def claim_outputs(paths: Sequence[Path], is_dir: bool, force: bool, command: str) -> Iterator[None]:
    """Check the outputs can be written, hold their locks and clear what killed runs left, for a ``with`` block.

    Every path gets :func:`check_writable_output` first (nothing is created when one fails), then its lock
    (:func:`cryocli.io.locks.output_lock`; a second run on the same output is refused with one line naming the
    holder) and :func:`cryocli.io.locks.remove_stale_temporaries`; the checks are repeated under the locks (a
    run that held them may have written the output meanwhile).
    """
    from cryocli.io.locks import output_lock, remove_stale_temporaries

    paths = [Path(p) for p in paths]
    for p in paths:
        check_writable_output(p, is_dir, force)
    with ExitStack() as stack:
        for p in paths:
            stack.enter_context(output_lock(p, command))
            full = Path(os.path.abspath(p))
            remove_stale_temporaries(full.parent, full.name)
        for p in paths:
            check_new_output(p, force)
        yield


def same_file(a: str | Path, b: str | Path) -> bool:
    """Whether ``a`` and ``b`` name one file: the same path once symbolic links, ``.`` and ``..`` are resolved,
    or, both existing, the same inode (which also catches hard links and bind mounts)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet): only the path comparison applies
        return False


def refuse_inputs_as_outputs(outputs: Mapping[str, str | Path | None],
                             inputs: Mapping[str, str | Path | None]) -> None:
    """Refuse an output that is also an input of the same command, even with --force, and two outputs that are
    one file: one :class:`CryocliError` naming the output.

    Keys are the names the user knows (``"--output"``, ``"MAP1"``); ``None`` values (options not given) are
    skipped. Call it before :func:`claim_outputs`: an output that is an input exists, so without --force the
    claim would only say "pass --force", and with it the input would be replaced before it is read.
    """
    given_in = [(name, Path(p)) for name, p in inputs.items() if p is not None]
    given_out = [(name, Path(p)) for name, p in outputs.items() if p is not None]
    for out_name, out in given_out:
        for in_name, source in given_in:
            if same_file(out, source):
                raise CryocliError(f"{out_name} is the input {in_name} ({source}); an input is never overwritten, "
                                   "even with --force: choose another output file", out)
    for i, (name_a, a) in enumerate(given_out):
        for name_b, b in given_out[i + 1:]:
            if same_file(a, b):
                raise CryocliError(f"{name_a} and {name_b} name the same file; they must differ", b)


def check_suffix(option: str, path: Path | None, suffixes: Sequence[str], what: str = "") -> None:
    """Refuse an output ``path`` of ``option`` whose name does not end in one of ``suffixes`` (lower case, with
    the dot; the name's case does not matter), as reconstruct refuses a map not named .mrc or .map: a file named
    for another format is a mistake (``fsc -o map.mrc`` wrote STAR text into a map's name). ``what``: the
    format, shown in brackets."""
    if path is None or path.suffix.lower() in suffixes:
        return
    names = " or ".join(suffixes)
    raise CryocliError(f"{option} must end in {names}" + (f" ({what})" if what else ""), path)


def check_datadir(datadir: Path | None, option: str = "--datadir") -> None:
    """``--datadir`` must be an existing folder when given."""
    if datadir is None:
        return
    if not datadir.exists():
        raise CryocliError(f"{option}: folder not found", datadir)
    if not datadir.is_dir():
        raise CryocliError(f"{option}: not a folder", datadir)


def check_number(option: str, value: float | None, *, gt: float | None = None, ge: float | None = None,
                 lt: float | None = None, le: float | None = None, why: str = "") -> None:
    """Refuse a non-finite ``value`` of ``option``, or one outside the given bounds (None: not given, fine).

    ``check_number("--voltage", v, gt=0)`` -> "--voltage 0: must be greater than 0 (kV)" with ``why="kV"``.
    """
    if value is None:
        return
    shown = f"{option} {value:g}"
    tail = f" ({why})" if why else ""
    if not math.isfinite(value):
        raise CryocliError(f"{shown}: must be a finite number{tail}")
    for bound, ok, words in ((gt, lambda b: value > b, "greater than"), (ge, lambda b: value >= b, "at least"),
                             (lt, lambda b: value < b, "less than"), (le, lambda b: value <= b, "at most")):
        if bound is not None and not ok(bound):
            raise CryocliError(f"{shown}: must be {words} {bound:g}{tail}")


def check_finite_output(data: Any, what: str, cause: str) -> None:
    """Refuse to write an array that holds NaN or Inf, or only zeros: ``what`` names the output, ``cause`` the
    options or inputs that lead there (one line, exit 2)."""
    import numpy as np

    arr = np.asarray(data)
    if not np.isfinite(arr).all():
        raise CryocliError(f"{what} would contain NaN or Inf values; not written (check {cause})")
    if not np.any(arr):
        raise CryocliError(f"{what} would be all zero; not written (check {cause})")


@contextmanager
def progress_bar(total: int, description: str, unit: str = "particles") -> Iterator[Any]:
    """A rich progress bar on stderr with a throughput column; yields ``advance(k)``.

    Silent under --quiet and --json (the callable still works, so library code needs no branches).
    """
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

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
    if not all(math.isfinite(v) for v in values):
        raise CryocliError(f"{option} {text}: expected finite numbers")
    if len(values) == 1:
        return values[0], values[0]
    if len(values) != 2 or values[0] > values[1]:
        raise CryocliError(f"{option} {text}: expected LOW:HIGH with LOW <= HIGH")
    return values[0], values[1]


def angpix_option(writes_particles: bool) -> Any:
    """The ``--angpix`` option of the commands that read particle images (``writes_particles``: the command writes
    a particles.star, which then carries the pixel size)."""
    written = " written into particles.star," if writes_particles else ""
    return typer.Option(None, "--angpix", help="Pixel size of the images in Angstrom, for a STAR file that gives "
                        "none (as relion_reconstruct --angpix): used instead of the stack headers," + written +
                        " and refused if the STAR file gives a different one.")
