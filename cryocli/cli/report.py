"""`cryocli report PATH`: one picture of a result (report.png) and RELION's angdist.bild of its poses."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import typer

from cryocli.cli.common import STATE, check_number, claim_outputs, emit_json, guarded, out_console
from cryocli.errors import CryocliError


def report(
    path: Path = typer.Argument(..., help="A cryocli run directory (abinitio/refine -o) or a RELION Refine3D/Class3D "
                                "job directory."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Folder to write report.png and angdist.bild into "
                                       "(created; default: PATH itself)."),
    mass: float | None = typer.Option(None, "--mass", help="Mass of the molecule in kDa, for the ChimeraX contour level "
                                      "(default: the level enclosing a sphere of the particle diameter, a floor)."),
    sym: str | None = typer.Option(None, "--sym", help="Point group the viewing directions are folded with (C1, Cn, "
                                   "Dn, T, O, I; default: the run's own, else C1)."),
    force: bool = typer.Option(False, "--force", help="Replace report.png and angdist.bild in the -o folder."),
) -> None:
    """One picture of a result (report.png) and RELION's angdist.bild of its poses, from a cryocli run directory
    or a RELION Refine3D/Class3D job.

    report.png shows the map's central slices and projections (with the mask's outline), the FSC curves with
    their resolutions, the run's history (resolution, objective, pose change and every metric it logs, one
    line per half) and the distribution of viewing directions (equal-area, folded with --sym); its title gives
    the contour level to type into ChimeraX (volume #1 level X). angdist.bild is RELION's *_angdist.bild (open
    it in ChimeraX with the map); it is written when the particles have poses.

    Into PATH itself (the default) the two files are refreshed freely: they are drawn from the run's own files
    (a folder marked read-only is refused: give -o). Into another folder (-o) existing ones are replaced only
    with --force."""
    with guarded():
        summary = run_report(path, output, mass, sym, force)
    if STATE.json:
        emit_json(summary)
        return
    con = out_console()
    con.print(f"[bold]report[/] of {summary['source']} {path}")
    if summary["contour_level"] is not None:
        con.print(f"ChimeraX: volume #1 level {summary['contour_level']:.4g} ({summary['contour_basis']})")
    for kind, written in summary["files"].items():
        con.print(f"wrote {kind}: {written}")


def run_report(path: Path, output: Path | None, mass: float | None, sym: str | None, force: bool) -> dict[str, Any]:
    """Everything `cryocli report` does; returns the JSON summary. Raises CryocliError on bad input."""
    from cryocli.geometry.symmetry import parse_symmetry
    from cryocli.report import ANGDIST_BILD, REPORT_PNG, read_report, report_source, write_report

    check_number("--mass", mass, gt=0, why="kDa")
    if sym is not None:
        try:
            parse_symmetry(sym)
        except CryocliError as exc:
            raise CryocliError(f"--sym {sym}: {exc.message}") from None
    source = report_source(path)
    folder = output if output is not None else path
    own = output is None or os.path.abspath(output) == os.path.abspath(path)
    # The default output is the input folder: a folder marked read-only (no write bit, which root ignores) or not
    # writable is refused rather than written into.
    if own and (not os.access(path, os.W_OK | os.X_OK) or not stat.S_IMODE(os.stat(path).st_mode) & 0o222):
        raise CryocliError("the folder is read-only: give -o OUT to write the report elsewhere", path)
    targets = [folder / REPORT_PNG, folder / ANGDIST_BILD]
    # A run's own report is drawn from its files: refreshing it needs no --force.
    with claim_outputs(targets, is_dir=False, force=force or own, command="report"):
        data = read_report(path, mass_kda=mass, sym=sym)
        files = write_report(folder, data)
    return {"source": source, "path": str(path), "files": files, "title": data.title, "resolution_A": data.resolution_A,
            "contour_level": data.contour_level, "contour_basis": data.contour_basis, "sym": data.sym,
            "particles": data.n_particles}


def register(app: typer.Typer) -> None:
    app.command("report")(report)
