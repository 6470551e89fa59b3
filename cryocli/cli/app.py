"""The root ``cryocli`` typer app: global options and the registered subcommands.

Each subcommand lives in its own module of :mod:`cryocli.cli` and exposes ``register(app)``. Only
commands that work are registered here.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Optional

import typer
from rich.markup import escape

from cryocli import __version__
from cryocli.cli.common import STATE

# Modules of cryocli.cli that define a working subcommand, in the order `--help` lists them.
COMMAND_MODULES: list[str] = ["info", "simulate", "reconstruct", "postprocess", "fsc", "abinitio", "refine"]

app = typer.Typer(
    name="cryocli",
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
    device: str = typer.Option("auto", "--device", help="Where engines run: auto, cpu, cuda or cuda:N."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="CPU threads for torch (default: torch's choice)."),
    seed: int = typer.Option(0, "--seed", help="Random seed for everything that draws numbers."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or tables; errors only."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON summary on stdout instead of tables."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """Global options apply to every subcommand."""
    STATE.device, STATE.threads, STATE.seed, STATE.quiet, STATE.json = device, threads, seed, quiet, json_out
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


for _name in COMMAND_MODULES:
    importlib.import_module(f"cryocli.cli.{_name}").register(app)


def _escape_parameter_help(typer_app: typer.Typer) -> None:
    """Escape square brackets in the options' help: rich would take ``[default: 25]`` for a markup tag
    and drop it. The commands' own help keeps its markup (``[bold]``)."""
    for info in typer_app.registered_commands:
        for parameter in inspect.signature(info.callback).parameters.values():
            default = parameter.default
            if isinstance(default, typer.models.ParameterInfo) and default.help and "\\[" not in default.help:
                default.help = escape(default.help)


_escape_parameter_help(app)


def main() -> None:
    """Console-script entry point."""
    app()
