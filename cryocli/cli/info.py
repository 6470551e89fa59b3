"""`cryocli info FILE...`: what is in a STAR or MRC file."""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.table import Table

from cryocli.cli.common import STATE, emit_json, guarded, out_console


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return "-".join(f"{v:.0f}" if isinstance(v, float) and abs(v) >= 100 else _fmt(v) for v in value)
    return str(value)


def _print_star(s: dict[str, Any]) -> None:
    con = out_console()
    con.print(f"[bold]{s['file']}[/]  RELION STAR {s['star_version']}, {s['particles']} particles")
    t = Table("group", "name", "particles", "box px", "A/px", "kV", "Cs mm", "Q0", "defocus A")
    for g in s["optics_groups"]:
        t.add_row(*(_fmt(g[k]) for k in ("group", "name", "particles", "box", "pixel_size", "voltage", "cs",
                                          "amplitude_contrast", "defocus_range")))
    con.print(t)
    yes = {True: "yes", False: "no"}
    con.print(f"poses: {yes[s['has_poses']]}   shifts: {yes[s['has_shifts']]}   half sets: "
              f"{yes[s['has_half_sets']]}   CTF: {yes[s['has_ctf']]}")
    stacks = f"{s['stacks']} stack file(s), box {_fmt(s['stack_boxes'])}"
    if not s["has_images"]:
        con.print("no rlnImageName column: the file names no images")
    elif s["all_stacks_exist"]:
        con.print(f"{stacks}: all found")
    else:
        con.print(f"{stacks}: [red]{len(s['stacks_missing'])} missing[/]: " + ", ".join(s["stacks_missing"][:5]))


def _print_mrc(s: dict[str, Any]) -> None:
    con = out_console()
    kind = f"stack of {s['images']} images" if s["type"] == "stack" else "map"
    con.print(f"[bold]{s['file']}[/]  MRC {kind}")
    t = Table("grid x,y,z", "A/voxel", "mode", "MAPC,R,S", "min", "max", "mean", "std")
    t.add_row("x".join(map(str, s["shape_xyz"])), _fmt(s["voxel_size"]), str(s["mode"]),
              ",".join(map(str, s["axis_order"])), *(_fmt(s[k]) for k in ("min", "max", "mean", "std")))
    con.print(t)
    if s["label"]:
        con.print(f"label: {s['label']}")


def info(
    files: List[Path] = typer.Argument(..., help="STAR (.star) or MRC (.mrc, .mrcs, .map) files."),
    datadir: Optional[Path] = typer.Option(None, "--datadir", help="Extra folder to look for particle stacks in."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object (a list for several files)."),
) -> None:
    """What is in a file: particles, optics groups and columns of a STAR file; grid, voxel size and
    statistics of an MRC map or stack."""
    from cryocli.io.summary import summarize

    STATE.json = STATE.json or json_out
    with guarded():
        summaries = [summarize(f, datadir) for f in files]
    if STATE.json:
        emit_json(summaries[0] if len(summaries) == 1 else {"files": summaries})
        return
    for s in summaries:
        (_print_star if s["type"] == "star" else _print_mrc)(s)


def register(app: typer.Typer) -> None:
    app.command("info")(info)
