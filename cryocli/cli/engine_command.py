"""What ``abinitio`` and ``refine`` share on the command line: options to an engine config, errors in flag
terms, the run, the printed summary.

Engines name their options by config field (``ini_lowpass = 0: must be a positive number``); here the
field becomes the flag the user typed (``--ini-lowpass 0: must be a positive number``).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cryocli.cli.common import (
    STATE,
    check_number,
    check_writable_output,
    emit_json,
    err_console,
    guarded,
    out_console,
    resolve_device,
    set_interrupt_hint,
)
from cryocli.errors import CryocliError, OptionError


def option_flags(command: Callable[..., Any], renames: dict[str, str] | None = None) -> dict[str, str]:
    """``{config field: flag}`` from a typer command's options (its parameter names are the config fields,
    except ``renames``: ``{parameter name: config field}``)."""
    flags: dict[str, str] = {}
    for name, parameter in inspect.signature(command).parameters.items():
        default = parameter.default
        decls = getattr(default, "param_decls", None) or ()
        longs = [d for d in decls if d.startswith("--")]
        if longs:
            flags[(renames or {}).get(name, name)] = longs[0].split("/")[0]
    return flags


@contextmanager
def in_flag_terms(flags: dict[str, str]) -> Iterator[None]:
    """Re-raise an engine's :class:`OptionError` with the flag the user typed."""
    try:
        yield
    except OptionError as exc:
        if exc.option == "use_ctf":
            raise CryocliError(f"{exc.problem}; pass --no-ctf to run without CTF correction", exc.path) from None
        flag = flags.get(exc.option, "--" + exc.option.replace("_", "-"))
        raise exc.as_flag(flag) from None


def run_engine_command(kind: str, method: str, options: dict[str, Any], particles: Path, out: Path, *,
                       flags: dict[str, str], datadir: Path | None, force: bool, resume: bool,
                       ground_truth: Path | None, score_every: int = 1000, halves: bool = False,
                       mass_kda: float | None = None, angpix: float | None = None) -> dict[str, Any]:
    """Check everything, run ``method`` into the run directory ``out`` and return the run's summary."""
    from cryocli.engines.protocol import build_config, get_engine
    from cryocli.engines.runner import RunRequest, run_to_directory

    with guarded(), in_flag_terms(flags):
        for path, what in ((particles, "particles STAR file"), (ground_truth, "ground-truth map")):
            if path is not None and not Path(path).is_file():
                raise CryocliError(f"{what} not found", path)
        if out.is_dir() and any(out.iterdir()) and not (force or resume):
            raise CryocliError("output directory is not empty; pass --force to replace it or --resume to continue "
                               "the run in it", out)
        check_writable_output(out, is_dir=True, force=True)
        if mass_kda is not None and not (math.isfinite(mass_kda) and mass_kda > 0):
            raise CryocliError(f"--mass {mass_kda}: must be a positive number of kDa")
        check_number("--angpix", angpix, gt=0, why="Angstrom")
        device = resolve_device()
        engine = get_engine(method, kind, device=device)
        refuse_torchrun_without_data_parallel(engine, f"{kind} --method {method}")
        # Every rank has checked the output folder before rank 0 creates it (else a slower rank would find it).
        from cryocli import distributed

        distributed.barrier()
        config = build_config(engine, {**options, "seed": STATE.seed})
        request = RunRequest(particles=particles, out=out, command=f"{kind} --method {method}", datadir=datadir,
                             force=force, resume=resume, ground_truth=ground_truth, score_every=score_every,
                             halves=halves, mass_kda=mass_kda, angpix=angpix)

        def kept(folder: Path | None) -> None:
            set_interrupt_hint(f"the last checkpoint is kept in {folder}; run the same command with --resume to "
                               "continue" if folder is not None else "stopped before the first checkpoint; nothing "
                               "was kept")

        outcome = run_to_directory(engine, config, request, err_console(), device, on_interrupt=kept)
    return {"command": kind, **outcome.summary}


def refuse_torchrun_without_data_parallel(engine: Any, label: str) -> None:
    """Under torchrun, stop an engine that does not share its particles over the ranks (its ``data_parallel``
    is not set) instead of running one copy per rank: one error line from rank 0, exit 2 on every rank."""
    import typer

    from cryocli import distributed
    from cryocli.cli.common import EXIT_BAD_INPUT

    ranks = distributed.current()
    if ranks.world_size == 1 or getattr(engine, "data_parallel", False):
        return
    if not ranks.main:
        raise typer.Exit(EXIT_BAD_INPUT)
    raise CryocliError(f"cryocli {label} does not run under torchrun yet; run it as one process")


def print_summary(s: dict[str, Any]) -> None:
    """The run's summary as a few lines on stdout (nothing under --quiet or --json), and JSON with --json."""
    from cryocli import distributed

    if not distributed.current().main:  # under torchrun rank 0 prints
        return
    con = out_console()
    what = "iteration" if s["command"] == "refine" else "epoch"
    what += "" if s["iterations"] == 1 else "s"
    converged = f" (converged: {s['converged']})" if s.get("converged") is not None else ""
    con.print(f"{s['method']}: {s['particles']} particles, box {s['box']} px at {s['pixel_size']:.4g} A/px, "
              f"{s['iterations']} {what} in {s['seconds']:.1f} s{converged}; map written to {s['files']['map']}")
    if "gold_standard_resolution_A" in s:
        con.print(f"gold-standard FSC 0.143 (half maps): {s['gold_standard_resolution_A']:.2f} A")
    if "res_vs_truth_fsc05_A" in s:
        line = f"FSC 0.5 against the ground truth (after alignment): {s['res_vs_truth_fsc05_A']:.2f} A"
        if "final_rot_err_median" in s:
            line += (f"; rotation error after global alignment: median {s['final_rot_err_median']:.2f} deg, "
                     f"mean {s['final_rot_err_mean']:.2f} deg")
        con.print(line)
    if "postprocess_resolution_A" in s:
        con.print(f"check: postprocess of the half maps {s['postprocess_resolution_A']:.2f} A against the postprocessed "
                  f"map vs truth at FSC 0.5 {s['postprocessed_vs_truth_fsc05_A']:.2f} A (ratio "
                  f"{s['postprocess_over_truth']:.2f}; below 0.87 the half maps claim more than the map has)")
    if s.get("contour_level") is not None:
        con.print(f"ChimeraX: volume #1 level {s['contour_level']:.4g} ({s['contour_basis']})")
    emit_json(s)
