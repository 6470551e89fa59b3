"""The root ``cryocli`` typer app: global options, the run contract, and the registered subcommands.

Each subcommand lives in its own module of :mod:`cryocli.cli` and exposes ``register(app)``. Only
commands that work are registered here.

The run contract, kept here in one place for every subcommand (:class:`CryocliGroup`):

* the global options (``--device``, ``--threads``, ``--seed``, ``--quiet/-q``, ``--json``) are defined once,
  on the root callback, and are accepted before or after the subcommand (``cryocli simulate m.pdb -o s/
  --seed 3``): they are moved in front of the subcommand before parsing;
* usage errors (a bad option value, an unknown option, a missing argument) are one line,
  ``cryocli: error: <problem>``, exit code 2, as every other error;
* Ctrl-C and SIGTERM print one line (``cryocli: interrupted; <hint>``) and exit 130 and 143, after the
  commands' ``finally`` blocks have removed their temporaries (SIGTERM raises :class:`Interrupted`);
* a run broken off through no fault of its input (memory that ran out, a read or write the system refused, a
  failed collective under torchrun) is one line ``cryocli: error: ...`` and exit code 1
  (:func:`cryocli.cli.common.guarded`).
"""

from __future__ import annotations

import importlib
import inspect
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any

import typer
from rich.markup import escape
from typer import _click as click
from typer.core import TyperGroup

from cryocli import __version__
from cryocli.cli import common
from cryocli.cli.common import EXIT_BAD_INPUT, EXIT_INTERRUPTED, EXIT_TERMINATED, STATE, Interrupted, error_line

# Parameter names of the root callback's options that every subcommand also accepts after its name.
GLOBAL_OPTIONS = ("device", "threads", "seed", "quiet", "json_out")
GLOBAL_OPTIONS_NOTE = ("Global options, before or after the command: --device, --threads, --seed, --quiet/-q, "
                       "--json (see cryocli --help).")


def _option_arity(params: Sequence[Any], only: Sequence[str] | None = None) -> dict[str, int]:
    """``{"--seed": 1, "--quiet": 0, ...}``: how many values follow each option string of ``params``."""
    arity: dict[str, int] = {}
    for param in params:
        if param.param_type_name != "option" or (only is not None and param.name not in only):
            continue
        takes = 0 if (getattr(param, "is_flag", False) or getattr(param, "count", False)) else max(param.nargs, 1)
        for opt in [*param.opts, *param.secondary_opts]:
            arity[opt] = takes
    return arity


class CryocliGroup(TyperGroup):
    """The root command: global options anywhere, one-line usage errors, clean interrupts."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        return super().parse_args(ctx, self.hoist_global_options(ctx, list(args)))

    def hoist_global_options(self, ctx: click.Context, args: list[str]) -> list[str]:
        """Move the global options (and their values) found after the subcommand's name in front of it.

        The subcommand's own options are skipped with their values, so a value is never taken for an option;
        nothing after ``--`` moves.
        """
        root = _option_arity(self.params)
        i = 0
        while i < len(args):
            token = args[i]
            if token == "--":
                return args
            if token.startswith("-") and token != "-":
                i += 1 + (root.get(token, 0) if "=" not in token else 0)
                continue
            break
        if i >= len(args):
            return args
        command = self.get_command(ctx, args[i])
        if command is None:
            return args
        hoisted = _option_arity(self.params, GLOBAL_OPTIONS)
        own = _option_arity(command.params)
        moved: list[str] = []
        kept: list[str] = []
        rest = args[i + 1:]
        j = 0
        while j < len(rest):
            token = rest[j]
            if token == "--":
                kept += rest[j:]
                break
            key = token.split("=", 1)[0] if token.startswith("--") else token
            if key in hoisted:
                width = 1 + (hoisted[key] if key == token else 0)
                moved += rest[j:j + width]
                j += width
                continue
            width = 1 + (own.get(token, 0) if token.startswith("-") else 0)
            kept += rest[j:j + width]
            j += width
        return [*args[:i], *moved, args[i], *kept]

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt as exc:  # Ctrl-C, and SIGTERM through Interrupted
            code = exc.exit_code if isinstance(exc, Interrupted) else EXIT_INTERRUPTED
            _report_interrupt(exc)
            raise typer.Exit(code) from None

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, windows_expand_args: bool = True, **extra: Any) -> Any:
        common.set_interrupt_hint(None)
        restore = _install_sigterm_handler()
        try:
            code = self._run(args, prog_name, complete_var, windows_expand_args, extra)
        finally:
            restore()
        if standalone_mode:
            sys.exit(code)
        return code

    def _run(self, args: Any, prog_name: Any, complete_var: Any, windows_expand_args: bool, extra: dict) -> int:
        try:
            rv = super().main(args=args, prog_name=prog_name, complete_var=complete_var, standalone_mode=False,
                              windows_expand_args=windows_expand_args, **extra)
        except click.exceptions.NoArgsIsHelpError as exc:
            return exc.exit_code  # the help is already printed
        except click.exceptions.UsageError as exc:
            error_line(_usage_message(exc))
            return EXIT_BAD_INPUT
        except click.exceptions.ClickException as exc:
            error_line(exc.format_message())
            return EXIT_BAD_INPUT
        except typer.Abort:  # EOF on a prompt
            error_line("aborted")
            return 1
        except KeyboardInterrupt as exc:  # outside a command (while parsing)
            _report_interrupt(exc)
            return exc.exit_code if isinstance(exc, Interrupted) else EXIT_INTERRUPTED
        return rv if isinstance(rv, int) else 0


def _usage_message(exc: Any) -> str:
    message = exc.format_message().rstrip().rstrip(".")
    ctx = getattr(exc, "ctx", None)
    if ctx is not None:
        message = f"{message} (see '{ctx.command_path} --help')"
    return message


def _report_interrupt(exc: BaseException) -> None:
    name = f" ({exc.signal_name})" if isinstance(exc, Interrupted) and exc.signal_name != "SIGINT" else ""
    try:
        sys.stderr.flush()
    except Exception:  # pragma: no cover
        pass
    error_line(common.INTERRUPT_HINT, prefix=f"cryocli: interrupted{name};")


def _install_sigterm_handler():
    """SIGTERM raises :class:`Interrupted` (exit 143) in the main thread; returns the function that restores the
    previous handler. A second SIGTERM during the clean-up is ignored (``kill -9`` still works)."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def on_sigterm(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Interrupted(EXIT_TERMINATED, "SIGTERM")

    try:
        previous = signal.signal(signal.SIGTERM, on_sigterm)
    except (ValueError, OSError):  # pragma: no cover - not the main interpreter
        return lambda: None
    return lambda: signal.signal(signal.SIGTERM, previous)

# Modules of cryocli.cli that define a working subcommand, in the order `--help` lists them.
COMMAND_MODULES: list[str] = ["info", "simulate", "reconstruct", "postprocess", "fsc", "abinitio", "refine", "report"]

app = typer.Typer(
    name="cryocli",
    cls=CryocliGroup,
    help="Cryo-EM single-particle reconstruction from the command line. Reads and writes RELION STAR "
    "(3.0 and 3.1+) and MRC files; runs on CUDA when present and on the CPU otherwise.",
    rich_markup_mode="rich",
    no_args_is_help=True,
    add_completion=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"cryocli {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    ctx: typer.Context,
    device: str = typer.Option("auto", "--device", help="Where engines run: auto, cpu, cuda or cuda:N."),
    threads: int | None = typer.Option(None, "--threads", min=1, help="CPU threads for torch (default: torch's choice)."),
    seed: int = typer.Option(0, "--seed", min=0, help="Random seed for everything that draws numbers (0 or more)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or tables; errors only."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON summary on stdout instead of tables."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """Global options apply to every subcommand; they may also follow the subcommand's name."""
    STATE.device, STATE.threads, STATE.seed, STATE.quiet, STATE.json = device, threads, seed, quiet, json_out
    # Checked here, for every subcommand: commands that never use a torch device (info, fsc without --align,
    # report) would otherwise accept any --device in silence. Before the subcommand parses its arguments.
    with common.guarded():
        common.check_device(device)
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    _join_torchrun(ctx.invoked_subcommand)


#: Subcommands that run data-parallel under torchrun (the others refuse to start there).
DATA_PARALLEL_COMMANDS = ("reconstruct", "refine", "abinitio")


def _join_torchrun(command: str | None) -> None:
    """Under ``torchrun`` with several ranks: join the process group on this rank's device; ranks other than 0
    run quietly (rank 0 prints and writes). Commands that are not data-parallel yet stop with one error line
    (from rank 0) rather than run N copies that write the same outputs."""
    import atexit
    import os

    from cryocli import distributed
    from cryocli.cli.common import guarded, resolve_device
    from cryocli.errors import CryocliError

    if not distributed.launched() or command is None:
        return
    with guarded():
        if command not in DATA_PARALLEL_COMMANDS:
            if os.environ.get("RANK", "0") != "0":
                raise typer.Exit(EXIT_BAD_INPUT)
            raise CryocliError(f"cryocli {command} does not run under torchrun (these do: "
                               f"{', '.join(DATA_PARALLEL_COMMANDS)}); run it as one process")
        ranks, dev = distributed.setup(resolve_device())
    atexit.register(distributed.teardown)
    STATE.device = str(dev)
    if not ranks.main:
        STATE.quiet, STATE.json = True, False


for _name in COMMAND_MODULES:
    importlib.import_module(f"cryocli.cli.{_name}").register(app)


def _escape_parameter_help(typer_app: typer.Typer) -> None:
    """Escape square brackets in the options' help: rich would take ``[default: 25]`` for a markup tag
    and drop it. The commands' own help keeps its markup (``[bold]``)."""
    for info in typer_app.registered_commands:
        assert info.callback is not None  # every command is registered through app.command(...)(function)
        for parameter in inspect.signature(info.callback).parameters.values():
            default = parameter.default
            if isinstance(default, typer.models.ParameterInfo) and default.help and "\\[" not in default.help:
                default.help = escape(default.help)


_escape_parameter_help(app)


def _note_global_options(typer_app: typer.Typer) -> None:
    """One line at the end of every subcommand's --help: the global options work after it too."""
    for info in typer_app.registered_commands:
        if not info.epilog:
            info.epilog = GLOBAL_OPTIONS_NOTE


_note_global_options(app)


def main() -> None:
    """Console-script entry point."""
    app()
