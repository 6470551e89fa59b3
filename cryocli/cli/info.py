"""`cryocli info FILE...`: what is in a STAR or MRC file."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape
from rich.table import Table

from cryocli.cli.common import STATE, emit_json, guarded, out_console

YES_NO = {True: "yes", False: "no"}

# (summary key, label shown, unit) of the key-value lines of each STAR kind.
POSTPROCESS_LINES = (("final_resolution_A", "final resolution", "A"), ("bfactor_A2", "B-factor", "A^2"),
                     ("mask", "mask", ""), ("randomise_from_A", "phase randomisation from", "A"),
                     ("postprocessed_map", "postprocessed map", ""))
MODEL_LINES = (("resolution_A", "current resolution", "A"), ("pixel_size", "pixel size", "A"),
               ("box", "box", "px"), ("current_image_size", "current image size", "px"),
               ("reference_dimensionality", "reference dimensionality", ""), ("classes", "classes", ""),
               ("bodies", "bodies", ""), ("groups", "groups", ""), ("optics_groups", "optics groups", ""),
               ("sigma_offsets_A", "sigma offsets", "A"), ("sigma_offsets_px", "sigma offsets", "px"),
               ("tau2_fudge", "tau2 fudge", ""), ("log_likelihood", "log likelihood", ""),
               ("average_pmax", "average Pmax", ""), ("iteration", "iteration", ""),
               ("has_converged", "converged", ""))
OPTIMISER_LINES = (("output_root", "output root", ""), ("iteration", "iteration", ""),
                   ("iterations", "iterations asked", ""), ("has_converged", "converged", ""),
                   ("auto_refine", "auto-refine", ""), ("split_random_halves", "split random halves", ""),
                   ("best_resolution_A", "best resolution so far", "A"),
                   ("accuracy_rotations_deg", "accuracy rotations", "deg"),
                   ("accuracy_translations_A", "accuracy translations", "A"),
                   ("accuracy_translations_px", "accuracy translations", "px"),
                   ("changes_orientations", "changes of orientations", ""),
                   ("changes_offsets", "changes of offsets", ""), ("changes_classes", "changes of classes", ""),
                   ("particle_diameter_A", "particle diameter", "A"), ("random_seed", "random seed", ""),
                   ("adaptive_oversampling", "adaptive oversampling", ""),
                   ("auto_local_healpix_order", "local searches from HEALPix order", ""),
                   ("join_halves_until_A", "join halves until", "A"),
                   ("solvent_flattening", "solvent flattening", ""), ("zero_mask", "zero mask", ""),
                   ("solvent_mask", "solvent mask", ""), ("correct_ctf", "CTF correction", ""),
                   ("correct_norm", "norm correction", ""), ("correct_scale", "scale correction", ""),
                   ("model_star", "model", ""), ("data_star", "data", ""), ("sampling_star", "sampling", ""))
SAMPLING_LINES = (("is_3d", "3D sampling", ""), ("healpix_order", "HEALPix order", ""),
                  ("angular_sampling_deg", "angular sampling", "deg"), ("psi_step_deg", "psi step", "deg"),
                  ("offset_range", "offset range", "@unit"), ("offset_step", "offset step", "@unit"),
                  ("symmetry", "symmetry", ""), ("tilt_angle_limit_deg", "tilt angle limit", "deg"),
                  ("directions", "directions listed", ""), ("healpix_order_original", "HEALPix order at start", ""),
                  ("psi_step_original_deg", "psi step at start", "deg"),
                  ("offset_range_original", "offset range at start", "@unit"),
                  ("offset_step_original", "offset step at start", "@unit"))

ITERATION_COLUMNS = {"iteration": "iteration", "resolution_A": "res. A", "image_size": "image px",
                     "changes_orientations_deg": "rot. change deg", "changes_offsets_px": "shift change px",
                     "healpix_order": "HEALPix order"}
CLASS_COLUMNS = {"distribution": "fraction", "accuracy_rotations_deg": "acc. rot deg",
                 "accuracy_translations_A": "acc. shift A", "accuracy_translations_px": "acc. shift px",
                 "estimated_resolution_A": "res. A", "completeness": "complete", "reference": "reference"}


def _show(*items: Any) -> None:
    """Print text and tables; table cells fold onto more lines where the width runs out, never cut short with an
    ellipsis (rich's default), so that no number is lost however narrow the terminal."""
    con = out_console()
    for item in items:
        if isinstance(item, Table):
            for column in item.columns:
                column.overflow = "fold"
        con.print(item)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return YES_NO[value]
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return "-".join(f"{v:.0f}" if isinstance(v, float) and abs(v) >= 100 else _fmt(v) for v in value)
    return str(value)


def _exact(value: Any) -> str:
    """A value as the file wrote it (floats in their shortest exact form), yes/no for switches."""
    if isinstance(value, bool):
        return YES_NO[value]
    return "-" if value is None else escape(str(value) if value != "" else '""')


def _title(s: dict[str, Any], what: str) -> None:
    written = f" ({escape(s['written_by'])})" if s.get("written_by") else ""
    _show(f"[bold]{escape(s['file'])}[/]  {what}{written}")


def _fields_table(s: dict[str, Any], lines: Sequence[tuple[str, str, str]]) -> Table:
    """Two columns, name and value with its unit, for the fields of ``lines`` the summary has."""
    t = Table(show_header=False, box=None, padding=(0, 2, 0, 0))
    for key, label, unit in lines:
        if s.get(key) is None:
            continue
        unit = s.get("offset_unit", "") if unit == "@unit" else unit
        t.add_row(label, f"{_exact(s[key])} {unit}".rstrip())
    return t


def _print_particles(s: dict[str, Any]) -> None:
    _show(f"[bold]{escape(s['file'])}[/]  RELION STAR {s['star_version']}, {s['particles']} particles")
    t = Table("group", "name", "particles", "box px", "A/px", "kV", "Cs mm", "Q0", "defocus A")
    for g in s["optics_groups"]:
        t.add_row(*(_fmt(g[k]) for k in ("group", "name", "particles", "box", "pixel_size", "voltage", "cs",
                                          "amplitude_contrast", "defocus_range")))
    _show(t)
    _show(f"poses: {YES_NO[s['has_poses']]}   shifts: {YES_NO[s['has_shifts']]}   half sets: "
          f"{YES_NO[s['has_half_sets']]}   CTF: {YES_NO[s['has_ctf']]}")
    if not s["has_images"]:
        _show("no rlnImageName column: the file names no images")
        return
    # No stack read (all missing or unreadable): say so rather than leave "box " empty.
    box = f"box {_fmt(s['stack_boxes'])} px" if s["stack_boxes"] else "box unknown (no stack could be read)"
    stacks = f"{s['stacks']} stack file(s), {box}"
    if s["all_stacks_exist"]:
        _show(f"{stacks}: all found")
    else:
        _show(f"{stacks}: [red]{len(s['stacks_missing'])} missing[/]: " + escape(", ".join(s["stacks_missing"][:5])))
    for name, problem in s["stacks_unreadable"].items():
        _show(f"[red]error: stack {escape(name)} cannot be read: {escape(problem)}[/]")
    if s["all_stacks_exist"] and not s["stacks_unreadable"] and not s["pixel_size_known"]:
        _show("[bold yellow]warning:[/] [yellow]no pixel size in the STAR file or the stack headers[/]: give it "
              "to reconstruct, refine and abinitio with --angpix")
    for mismatch in s["box_mismatch"]:
        _show(f"[bold yellow]warning:[/] [yellow]{escape(mismatch['message'])}[/]: reconstruct and the other "
              "commands that read the images refuse this file until the two agree")
    _print_indices(s)


def _print_indices(s: dict[str, Any]) -> None:
    """The image-index check: one line, an error line when some index is past the end of its stack."""
    unchecked = s["particles"] - s["images_checked"]
    note = f" ({unchecked} particles in missing or unreadable stacks not checked)" if unchecked else ""
    bad = s["images_out_of_range"]
    if not s["images_checked"]:
        _show(f"image indices: not checked (all {s['particles']} particles are in missing or unreadable stacks)")
        return
    if not bad:
        _show(f"image indices: all {s['images_checked']} checked lie within their stacks{note}")
        return
    examples = ", ".join(f"particle {e['particle']} {e['image_name']} (stack holds {e['stack_images']})"
                         for e in s["out_of_range_examples"][:3])
    _show(f"[bold red]error:[/] [red]{bad} of {s['images_checked']} image indices are past the end of "
          f"their stack[/]: {escape(examples)}{note}")


def _print_postprocess(s: dict[str, Any]) -> None:
    _title(s, "RELION postprocess")
    _show(_fields_table(s, POSTPROCESS_LINES))
    if s["half_maps"]:
        _show(f"half maps: {escape(', '.join(s['half_maps']))}")
    if s["guinier_fit"]:
        _show("Guinier fit: " + ", ".join(f"{k} {_exact(v)}" for k, v in s["guinier_fit"].items()))
    fsc = s["fsc"]
    if fsc is None:
        _show("no FSC table")
        return
    crossings = ", ".join(f"{label} at {_exact(fsc[f'resolution_{key}_A'])} A (shell {fsc[f'shell_{key}']})"
                          if fsc[f"shell_{key}"] is not None else f"{label}: below already at shell 1"
                          for key, label in (("05", "0.5"), ("0143", "0.143")))
    _show(f"FSC (corrected, {fsc['shells']} shells): {crossings}")
    if not fsc["glance"]:
        return
    columns = [c for c in ("corrected", "unmasked", "masked", "phase_randomised") if c in fsc["glance"][0]]
    t = Table("shell", "resolution A", *(c.replace("_", " ") for c in columns))
    for row in fsc["glance"]:
        t.add_row(str(row["shell"]), f"{row['resolution_A']:.2f}", *(f"{row[c]:.4f}" for c in columns))
    _show(t)


def _print_model(s: dict[str, Any]) -> None:
    _title(s, "RELION model")
    _show(_fields_table(s, MODEL_LINES))
    if s["class_table"]:
        keys = [k for k in CLASS_COLUMNS if k in s["class_table"][0]]
        t = Table("class", *(CLASS_COLUMNS[k] for k in keys))
        for number, row in enumerate(s["class_table"], start=1):
            t.add_row(str(number), *(_fmt(row[k]) for k in keys))
        _show(t)
    if s["group_table"]:
        keys = [k for k in ("group", "name", "particles", "scale") if k in s["group_table"][0]]
        t = Table(*keys)
        for row in s["group_table"]:
            t.add_row(*(_exact(row[k]) for k in keys))
        _show(t)
    if s.get("iteration_table"):
        keys = [k for k in ITERATION_COLUMNS if k in s["iteration_table"][0]]
        t = Table(*(ITERATION_COLUMNS[k] for k in keys))
        for row in s["iteration_table"]:
            t.add_row(*(_fmt(row[k]) for k in keys))
        _show(t)


def _print_optimiser(s: dict[str, Any]) -> None:
    _title(s, "RELION optimiser")
    _show(_fields_table(s, OPTIMISER_LINES))
    if s.get("iteration") == -1:
        _show("(iteration -1: RELION's final, converged iteration of an auto-refine)")
    if s.get("command"):
        _show(f"command: {escape(s['command'])}")


def _print_sampling(s: dict[str, Any]) -> None:
    _title(s, "RELION sampling")
    _show(_fields_table(s, SAMPLING_LINES))


def _print_mtf(s: dict[str, Any]) -> None:
    _title(s, f"detector MTF (block data_{escape(s['block'])}), {s['points']} points")
    _show(f"frequency {_fmt(s['frequency_range'])} 1/px, MTF {_fmt(s['mtf_range'])}")
    t = Table("x Nyquist", "1/px", "MTF")
    for row in s["mtf_at"]:
        t.add_row(f"{row['nyquist_fraction']:g}", f"{row['frequency']:g}", _fmt(row["mtf"]))
    _show(t)


def _print_blocks(s: dict[str, Any]) -> None:
    _title(s, f"STAR file, {len(s['blocks'])} block(s)")
    t = Table("block", "type", "rows", "columns", "labels")
    for b in s["blocks"]:
        labels = ", ".join(b["labels"][:4]) + (", ..." if len(b["labels"]) > 4 else "")
        t.add_row(escape(f"data_{b['name']}"), b["type"], str(b["rows"]), str(b["columns"]), escape(labels))
    _show(t)


MRC_KINDS = {"map": "map", "image": "single image"}
# The grid column's heading: a map's axes are x, y, z after its axis order is applied; a stack's are x, y, images.
GRID_HEADINGS = {"map": "grid x,y,z", "stack": "grid x,y,images", "image": "grid x,y"}


def _print_mrc(s: dict[str, Any]) -> None:
    kind = f"stack of {s['images']} images" if s["type"] == "stack" else MRC_KINDS[s["type"]]
    _show(f"[bold]{escape(s['file'])}[/]  MRC {kind}")
    voxels = s.get("voxel_size_xyz") or [s["voxel_size"]]
    anisotropic = len(set(voxels)) > 1  # show all three rather than hide the anisotropy behind x's
    t = Table(GRID_HEADINGS[s["type"]], "A/voxel x,y,z" if anisotropic else "A/voxel", "mode", "MAPC,R,S",
              "min", "max", "mean", "std")
    t.add_row("x".join(map(str, s["shape_xyz"])), ",".join(_fmt(v) for v in voxels) if anisotropic
              else _fmt(s["voxel_size"]), str(s["mode"]), ",".join(map(str, s["axis_order"])),
              *(_fmt(s[k]) for k in ("min", "max", "mean", "std")))
    _show(t)
    if s["type"] == "map" and s["axis_order"] != [1, 2, 3]:
        x, y, z = ("xyz"[a - 1] for a in s["axis_order"])
        c, r, n = s["shape_crs"]
        _show(f"axis order: the file's {c} columns run along {x}, its {r} rows along {y} and its {n} sections "
              f"along {z}; the grid above is x,y,z")
    if s["label"]:
        _show(f"label: {escape(s['label'])}")
    if s.get("note"):
        _show(f"note: {escape(s['note'])}")
    if "contour_level" in s:
        _show(_contour_table(s))


def _contour_table(s: dict[str, Any]) -> Table:
    """The map's contour level, what it encloses, and the ChimeraX command; without --mass, the hint."""
    t = Table(show_header=False, box=None, padding=(0, 2, 0, 0))
    level = s["contour_level"]
    if level is None:
        t.add_row("contour level", escape(s["contour_basis"]))
        return t
    t.add_row("contour level", f"{level:.4g}")
    t.add_row("encloses", escape(s["contour_basis"]))
    t.add_row("ChimeraX", f"volume #1 level {level:.4g}")
    if not s["contour_basis"].startswith("mass"):
        t.add_row("", "pass --mass KDA for the level enclosing the molecule itself")
    return t


PRINTERS: dict[str, Callable[[dict[str, Any]], None]] = {
    "particles": _print_particles, "postprocess": _print_postprocess, "model": _print_model,
    "optimiser": _print_optimiser, "sampling": _print_sampling, "mtf": _print_mtf, "star": _print_blocks,
}


def info(
    files: list[Path] = typer.Argument(..., help="STAR (.star) or MRC (.mrc, .mrcs, .map) files."),
    datadir: Path | None = typer.Option(None, "--datadir", help="Extra folder to look for particle stacks in."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON: the summary object of the file; for "
                                  "several files, one object whose \"files\" key lists their summaries in order."),
    mass: float | None = typer.Option(None, "--mass", metavar="KDA", help="Mass of the molecule in kDa, for a "
                                      "map's contour level: the level enclosing its volume at 1.21 A^3/Da "
                                      "(protein). Without it the level encloses a sphere of 0.8 x the box, "
                                      "more than the molecule: a floor."),
) -> None:
    """What is in a file: particles, optics groups and columns of a STAR file; grid, voxel size and
    statistics of an MRC map or stack, and a map's contour level (the number for ChimeraX's
    volume level)."""
    from cryocli.cli.common import check_number
    from cryocli.io.summary import summarize

    STATE.json = STATE.json or json_out
    with guarded():
        check_number("--mass", mass, gt=0, why="kDa")
        summaries = [summarize(f, datadir, mass_kda=mass) for f in files]
    if STATE.json:
        emit_json(summaries[0] if len(summaries) == 1 else {"files": summaries})
        return
    for s in summaries:
        printer = PRINTERS[s["kind"]] if s["type"] == "star" else _print_mrc
        printer(s)


def register(app: typer.Typer) -> None:
    app.command("info")(info)
