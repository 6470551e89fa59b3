"""`cryocli fsc MAP1 MAP2`: Fourier shell correlation of two maps, optionally after aligning MAP2 onto MAP1."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from cryocli.cli.common import (
    STATE,
    check_finite_output,
    check_number,
    check_suffix,
    check_writable_output,
    claim_outputs,
    emit_json,
    err_console,
    guarded,
    out_console,
    refuse_inputs_as_outputs,
    resolve_device,
)
from cryocli.errors import CryocliError

DEFAULT_THRESHOLDS = (0.143, 0.5)


def _voxel_size(v1: float, v2: float, angpix: float | None, p1: Path, p2: Path) -> float:
    """The voxel size to use (A): --angpix, else the headers, which must agree within 0.5%."""
    if angpix is not None:
        check_number("--angpix", angpix, gt=0, why="Angstrom per voxel")
        return angpix
    if v1 <= 0 or v2 <= 0:
        raise CryocliError(f"header voxel size is {v1:g} A ({p1}) and {v2:g} A ({p2}); give --angpix")
    from cryocli.io.star import check_pixel_size

    check_pixel_size(v1, v2, f"voxel sizes of {p1} and {p2} (resample one map or give --angpix)")
    return v1


def load_pair(path1: Path, path2: Path, angpix: float | None):
    """Read two maps, check they share a box and a voxel size; returns (data1, data2, voxel size in A)."""
    from cryocli.io.mrc import read_map

    m1, m2 = read_map(path1), read_map(path2)
    if m1.data.shape != m2.data.shape:
        raise CryocliError(f"maps differ in box: {m1.data.shape[::-1]} ({path1}) vs {m2.data.shape[::-1]} ({path2}) "
                           "(x, y, z voxels)")
    return m1.data, m2.data, _voxel_size(m1.voxel_size, m2.voxel_size, angpix, path1, path2)


def load_mask(path: Path, shape: tuple[int, ...]):
    """Read a mask (values in [0, 1]) of the given shape."""
    from cryocli.io.mrc import read_map

    m = read_map(path).data
    if m.shape != shape:
        raise CryocliError(f"mask box {m.shape[::-1]} differs from the maps' {shape[::-1]} (x, y, z voxels)", path)
    lo, hi = float(m.min()), float(m.max())
    if lo < -1e-6 or hi > 1 + 1e-6:
        raise CryocliError(f"mask values must lie in [0, 1]; found {lo:.4g} .. {hi:.4g}", path)
    return m


def check_has_structure(data: Any, path: Path, where: str = "") -> None:
    """Refuse a map with nothing to correlate: all zero, or one value in every voxel (``where``: e.g. " inside
    the mask m.mrc"). Its FSC is 0 at every shell but the origin, which read as a resolution of "inf"."""
    lo, hi = float(data.min()), float(data.max())
    if lo == hi == 0:
        raise CryocliError(f"the map is all zero{where}", path)
    if lo == hi:
        raise CryocliError(f"the map is constant{where} (every voxel {lo:g}): it has no structure to correlate", path)


def _check_outputs(inputs: dict[str, Path | None], outputs: dict[str, Path | None], force: bool) -> None:
    """Refuse, before reading anything, outputs that are inputs, cannot be written, or are named for another
    format. The type checks (a folder where a file is wanted) come before the names: "is a folder" is the
    more useful line for ``--plot out/``."""
    refuse_inputs_as_outputs(outputs, inputs)
    for path in outputs.values():
        if path is not None:
            check_writable_output(path, is_dir=False, force=force)
    check_suffix("--output", outputs["--output"], (".star",), "RELION's data_fsc table")
    # plot_fsc always writes PNG; a .pdf or .svg name would hold PNG bytes.
    check_suffix("--plot", outputs["--plot"], (".png",), "the plot is a PNG image")
    check_suffix("--aligned-map", outputs["--aligned-map"], (".mrc", ".map"), "MRC")


def _alignment_summary(al: Any) -> dict[str, Any]:
    import torch

    from cryocli.geometry.rotations import matrix_to_euler

    rot, tilt, psi = (float(a) for a in matrix_to_euler(torch.as_tensor(al.rotation)))
    return {"rotation_matrix": al.rotation.tolist(), "euler_rot_tilt_psi_deg": [rot, tilt, psi],
            "shift_A": [float(s) for s in al.shift_A], "flipped": bool(al.flipped), "correlation": float(al.score)}


def fsc(
    map1: Path = typer.Argument(..., help="Reference map (MRC)."),
    map2: Path = typer.Argument(..., help="Second map (MRC), same box as MAP1."),
    mask: Path | None = typer.Option(None, "--mask", "-m", help="Mask (MRC, values 0..1) applied to both maps."),
    align: bool = typer.Option(False, "--align", help="First align MAP2 onto MAP1: global rotation, translation and "
                               "hand-flip search, then local refinement."),
    no_flip: bool = typer.Option(False, "--no-flip", help="With --align, do not try the mirror image (hand flip)."),
    thresholds: list[float] | None = typer.Option(None, "--threshold", "-t", help="Extra FSC threshold to report "
                                                     "(repeatable); 0.143 and 0.5 are always reported."),
    plot: Path | None = typer.Option(None, "--plot", help="Write the FSC curve as a PNG, named .png (x: 1/A, top: A)."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Write RELION's data_fsc table (STAR), named .star."),
    aligned_out: Path | None = typer.Option(None, "--aligned-map", help="With --align, write MAP2 aligned onto "
                                               "MAP1 (MRC), named .mrc or .map."),
    angpix: float | None = typer.Option(None, "--angpix", help="Voxel size in Angstrom (default: the MRC headers)."),
    force: bool = typer.Option(False, "--force", help="Overwrite existing output files."),
) -> None:
    """Fourier shell correlation between two maps, in RELION's shells (1/A), with the resolution where it
    crosses 0.143 and 0.5 (interpolated between the last shell above and the first below).

    When the FSC stays above a threshold up to Nyquist, the resolution is Nyquist or finer ("beyond Nyquist";
    --json: reached false, resolution_A the Nyquist resolution nyquist_A). When it is below the threshold from
    the first shell, there is no resolution ("none"; --json: resolution_A null, frequency_per_A 0). Outputs
    never overwrite an input, even with --force; all-zero and constant maps are refused."""
    with guarded():
        result = run_fsc(map1, map2, mask, align, not no_flip, thresholds or [], plot, output, aligned_out, angpix,
                         force)
    if STATE.json:
        emit_json(result)
        return
    _print(result)


def run_fsc(map1: Path, map2: Path, mask: Path | None, align: bool, allow_flip: bool, extra: list[float],
            plot: Path | None, output: Path | None, aligned_out: Path | None, angpix: float | None,
            force: bool) -> dict[str, Any]:
    """Everything `cryocli fsc` does, returning the JSON summary; raises CryocliError on bad input."""
    import numpy as np

    from cryocli.analysis.fsc import fsc_curve, shell_frequency, threshold_crossing
    from cryocli.io.paths import atomic_write_text
    from cryocli.io.star import fsc_star_text

    for t in extra:
        if not -1.0 < t < 1.0:
            raise CryocliError(f"--threshold {t}: must lie between -1 and 1")
    check_number("--angpix", angpix, gt=0, why="Angstrom per voxel")
    if aligned_out is not None and not align:
        raise CryocliError("--aligned-map needs --align")
    named = {"--output": output, "--plot": plot, "--aligned-map": aligned_out}
    _check_outputs({"MAP1": map1, "MAP2": map2, "--mask": mask}, named, force)
    outputs = [p for p in named.values() if p is not None]
    with claim_outputs(outputs, is_dir=False, force=force, command="fsc"):
        a, b, voxel = load_pair(map1, map2, angpix)
        for path, data in ((map1, a), (map2, b)):
            check_has_structure(data, path)
        m = load_mask(mask, a.shape) if mask is not None else None
        if m is not None and not np.any(m):
            raise CryocliError("the mask is all zero", mask)
        n = a.shape[-1]
        freq = shell_frequency(n, voxel)

        summary: dict[str, Any] = {"map1": str(map1), "map2": str(map2), "box": n, "voxel_size": voxel,
                                   "nyquist_A": float(1.0 / freq[-1]), "mask": str(mask) if mask else None}
        if align:
            from cryocli.analysis.align import align_maps

            err_console().print("aligning MAP2 onto MAP1 (rotation, shift, hand) ...")
            al = align_maps(a, b, voxel, allow_flip=allow_flip, device=resolve_device())
            b = aligned = al.aligned_map
            summary["alignment"] = _alignment_summary(al)
        if m is not None:
            a, b = a * m, b * m
            for path, data in ((map1, a), (map2, b)):
                check_has_structure(data, path, f" inside the mask {mask}")
        curve = fsc_curve(a, b)
        levels = list(dict.fromkeys([*DEFAULT_THRESHOLDS, *extra]))
        crossings = [threshold_crossing(curve, n, voxel, t) for t in levels]
        # JSON has no Infinity: a curve below the threshold from the first shell has no resolution (null).
        summary["resolution"] = [{"threshold": c.threshold,
                                  "resolution_A": c.resolution if math.isfinite(c.resolution) else None,
                                  "frequency_per_A": c.frequency, "reached": c.reached} for c in crossings]
        summary["curve"] = {"shell": list(range(len(curve))), "frequency_per_A": freq.tolist(),
                            "fsc": [float(x) for x in curve]}

        written = {}
        if output is not None:
            atomic_write_text(output, fsc_star_text(curve, n, voxel, command="fsc"))
            written["star"] = str(output)
        if plot is not None:
            from cryocli.plots import plot_fsc

            label = "FSC (aligned)" if align else "FSC"
            plot_fsc(plot, {label: (freq, curve)}, thresholds=levels, title=f"{map1.name} vs {map2.name}",
                     resolutions={f"{c.threshold:g}": c.resolution for c in crossings if c.reached})
            from cryocli.io.paths import default_file_mode

            os.chmod(plot, default_file_mode())  # written through a private temporary: give it the umask's bits
            written["plot"] = str(plot)
        if aligned_out is not None:
            from cryocli.io.mrc import write_map

            check_finite_output(aligned, "the aligned map", f"{map2} and --align")
            write_map(aligned_out, np.asarray(aligned), voxel, command="fsc --align")
            written["aligned_map"] = str(aligned_out)
        summary["outputs"] = written
        return summary


def _print(s: dict[str, Any]) -> None:
    con = out_console()
    con.print(f"[bold]FSC[/] {s['map1']} vs {s['map2']}: box {s['box']}, {s['voxel_size']:.4g} A/voxel"
              + (f", mask {s['mask']}" if s["mask"] else ""))
    if "alignment" in s:
        al = s["alignment"]
        rot, tilt, psi = al["euler_rot_tilt_psi_deg"]
        con.print(f"alignment: rot {rot:.2f}, tilt {tilt:.2f}, psi {psi:.2f} deg; shift "
                  + ", ".join(f"{x:.2f}" for x in al["shift_A"]) + f" A; hand {'flipped' if al['flipped'] else 'kept'}; "
                  f"correlation {al['correlation']:.4f}")
    table = Table("FSC threshold", "resolution (A)", "frequency (1/A)")
    for r in s["resolution"]:
        table.add_row(f"{r['threshold']:g}", *_resolution_cells(r))
    con.print(table)
    for kind, path in s["outputs"].items():
        con.print(f"wrote {kind}: {path}")


def _resolution_cells(r: dict[str, Any]) -> tuple[str, str]:
    """The resolution and frequency cells of one threshold's row, saying what is a bound and what is none."""
    if r["resolution_A"] is None:
        return "none: below from the first shell", "-"
    if not r["reached"]:  # the curve stays above the threshold to the edge of the transform
        return f"<= {r['resolution_A']:.2f} (beyond Nyquist)", f">= {r['frequency_per_A']:.4f}"
    return f"{r['resolution_A']:.2f}", f"{r['frequency_per_A']:.4f}"


def register(app: typer.Typer) -> None:
    app.command("fsc")(fsc)
