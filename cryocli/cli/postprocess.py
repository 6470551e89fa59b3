"""`cryocli postprocess HALF1 HALF2 -o DIR`: masked, corrected FSC, sharpening and filtering as relion_postprocess."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from cryocli.cli.common import (
    STATE,
    check_finite_output,
    check_number,
    claim_outputs,
    emit_json,
    err_console,
    guarded,
    out_console,
    resolve_device,
)
from cryocli.cli.fsc import check_has_structure, load_mask, load_pair
from cryocli.errors import CryocliError


def postprocess(
    half1: Path = typer.Argument(..., help="First unfiltered half map (MRC)."),
    half2: Path = typer.Argument(..., help="Second unfiltered half map (MRC), same box and voxel size."),
    output: Path = typer.Option(..., "--output", "-o", help="Output folder (created; must be empty unless --force)."),
    mask: Path | None = typer.Option(None, "--mask", "-m", help="Solvent mask (MRC, values 0..1)."),
    auto_mask: bool = typer.Option(False, "--auto-mask", help="Make the mask from the average half map as "
                                   "relion_mask_create (low-pass, threshold, extend, soft edge); written as mask.mrc."),
    ini_threshold: float | None = typer.Option(None, "--ini-threshold", help="--auto-mask: density threshold in "
                                                  "map units (default: 10% of the low-passed average map's maximum)."),
    extend: float = typer.Option(3.0, "--extend", help="--auto-mask: extend the thresholded mask by this many voxels."),
    soft_edge: float = typer.Option(6.0, "--soft-edge", help="--auto-mask: raised-cosine edge width in voxels."),
    mask_lowpass: float = typer.Option(15.0, "--mask-lowpass", help="--auto-mask: low-pass (Angstrom) before "
                                       "thresholding; 0 for none."),
    bfactor: float | None = typer.Option(None, "--bfactor", help="B-factor in A^2 to apply (negative sharpens) "
                                            "instead of the automatic Guinier fit."),
    autob_lowres: float = typer.Option(10.0, "--autob-lowres", help="Lowest resolution (Angstrom) in the Guinier fit."),
    autob_highres: float = typer.Option(0.0, "--autob-highres", help="Highest resolution (Angstrom) in the Guinier "
                                        "fit; 0 fits to Nyquist, as RELION."),
    mtf: Path | None = typer.Option(None, "--mtf", help="Detector MTF (RELION STAR: rlnResolutionInversePixel, "
                                       "rlnMtfValue); the map is divided by it."),
    mtf_angpix: float | None = typer.Option(None, "--mtf-angpix", help="Pixel size (Angstrom) of the original "
                                               "micrographs, for --mtf (default: the map's voxel size)."),
    low_pass: float = typer.Option(-1.0, "--low-pass", help="Low-pass filter resolution in Angstrom; negative "
                                   "(default): the final resolution; 0: no filter (RELION 5's default)."),
    randomize_at_fsc: float = typer.Option(0.8, "--randomize-at-fsc", help="Randomise phases from the first shell "
                                           "where the unmasked FSC drops below this value."),
    force_mask: bool = typer.Option(False, "--force-mask", help="Use the mask even when the unmasked FSC reaches "
                                    "further than the corrected one."),
    angpix: float | None = typer.Option(None, "--angpix", help="Voxel size in Angstrom (default: the MRC headers)."),
    force: bool = typer.Option(False, "--force", help="Write into an existing, non-empty output folder."),
) -> None:
    """Postprocess two half maps as relion_postprocess: masked FSC corrected by phase randomisation,
    FSC weighting, optional MTF correction, B-factor sharpening (Guinier fit or given), low-pass.

    Writes postprocess.mrc, postprocess_masked.mrc, postprocess.star (RELION's data_general, data_fsc,
    data_guinier), fsc.png, guinier.png, and mask.mrc with --auto-mask. The phase randomisation uses
    the global --seed as RELION's --random_seed (default 0 in both gives the same numbers)."""
    with guarded():
        if mask is not None and auto_mask:
            raise CryocliError("give either --mask or --auto-mask, not both")
        summary = run_postprocess(half1, half2, output, mask, auto_mask, ini_threshold, extend, soft_edge, mask_lowpass,
                                  bfactor, autob_lowres, autob_highres, mtf, mtf_angpix, low_pass, randomize_at_fsc,
                                  force_mask, angpix, force)
    if STATE.json:
        emit_json(summary)
        return
    _print(summary)


def run_postprocess(half1: Path, half2: Path, out_dir: Path, mask_path: Path | None, auto_mask: bool,
                    ini_threshold: float | None, extend: float, soft_edge: float, mask_lowpass: float,
                    bfactor: float | None, autob_lowres: float, autob_highres: float, mtf_path: Path | None,
                    mtf_angpix: float | None, low_pass: float, randomize_at_fsc: float, force_mask: bool,
                    angpix: float | None, force: bool) -> dict[str, Any]:
    """Everything `cryocli postprocess` does; returns the JSON summary. Files appear in ``out_dir`` only at the end."""
    import numpy as np

    from cryocli.analysis.postprocess import postprocess as run
    from cryocli.analysis.postprocess import read_mtf

    _check_values(ini_threshold, extend, soft_edge, mask_lowpass, bfactor, autob_lowres, autob_highres, mtf_angpix,
                  low_pass, angpix)
    if not 0 <= STATE.seed < 2**31:
        raise CryocliError(f"--seed {STATE.seed}: the phase randomisation needs a seed in [0, 2^31)")
    if not 0 < randomize_at_fsc < 1:
        raise CryocliError(f"--randomize-at-fsc {randomize_at_fsc}: must lie between 0 and 1")
    if autob_lowres <= 0 or autob_highres < 0 or (autob_highres and autob_highres >= autob_lowres):
        raise CryocliError(f"Guinier fit range --autob-lowres {autob_lowres} A to --autob-highres {autob_highres} A "
                           "is empty")
    device = resolve_device()
    with claim_outputs([out_dir], is_dir=True, force=force, command="postprocess"):
        a, b, voxel = load_pair(half1, half2, angpix)
        for path, data in ((half1, a), (half2, b)):
            check_has_structure(data, path)
        mtf = read_mtf(mtf_path) if mtf_path is not None else None
        if mask_path is not None:
            mask = load_mask(mask_path, a.shape)
        elif auto_mask:
            mask = _make_auto_mask(a, b, voxel, ini_threshold, extend, soft_edge, mask_lowpass)
        else:
            mask = None

        result = run(a, b, voxel, mask, bfactor=bfactor, autob_lowres=autob_lowres, autob_highres=autob_highres,
                     mtf=mtf, mtf_angpix=mtf_angpix, low_pass=low_pass, randomize_below=randomize_at_fsc,
                     force_mask=force_mask, seed=STATE.seed, device=device)
        for w in result.warnings:
            err_console().print(f"[yellow]warning:[/] {w}")

        names = {"map": out_dir / "postprocess.mrc", "map_masked": out_dir / "postprocess_masked.mrc",
                 "star": out_dir / "postprocess.star", "fsc_plot": out_dir / "fsc.png",
                 "guinier_plot": out_dir / "guinier.png"}
        if auto_mask:
            names["mask"] = out_dir / "mask.mrc"
        if mask is None:
            del names["map_masked"]
        cause = _cause(result, bfactor, low_pass, mtf_path, half1, half2)
        check_finite_output(result.map, "postprocess.mrc", cause)
        if result.map_masked is not None:
            check_finite_output(result.map_masked, "postprocess_masked.mrc", cause)
        mask_name = str(names["mask"]) if auto_mask else (str(mask_path) if mask_path else None)
        _write_outputs(out_dir, names, result, mask if auto_mask else None, str(half1), str(half2), mask_name)
        _remove_previous_outputs(out_dir, names, [half1, half2, mask_path])

    fit = result.guinier_fit
    return {
        "half1": str(half1), "half2": str(half2), "box": result.box, "voxel_size": voxel,
        "resolution_A": result.resolution, "resolution_shell": result.resolution_shell,
        "bfactor_A2": result.bfactor,
        "guinier_fit": None if fit is None else {"slope": fit.slope, "intercept": fit.intercept,
                                                 "correlation": fit.correlation, "shells": fit.points,
                                                 "lowres_A": autob_lowres, "highres_A": autob_highres or None},
        "low_pass_A": result.low_pass, "mask": mask_name, "mask_fraction": result.mask_fraction,
        "randomise_from_A": (result.box * voxel / result.randomize_at) if result.randomize_at else None,
        "mtf": str(mtf_path) if mtf_path else None,
        "fsc": {"frequency_per_A": (np.arange(result.box // 2 + 1) / (result.box * voxel)).tolist(),
                "corrected": [float(x) for x in result.fsc_corrected],
                "unmasked": [float(x) for x in result.fsc_unmasked]},
        "warnings": result.warnings, "outputs": {k: str(v) for k, v in names.items()},
    }


def _check_values(ini_threshold: float | None, extend: float, soft_edge: float, mask_lowpass: float,
                  bfactor: float | None, autob_lowres: float, autob_highres: float, mtf_angpix: float | None,
                  low_pass: float, angpix: float | None) -> None:
    """Refuse values that make no sense, before any work (one line, exit 2)."""
    check_number("--ini-threshold", ini_threshold)
    check_number("--extend", extend, ge=0, why="voxels")
    check_number("--soft-edge", soft_edge, ge=0, why="voxels")
    check_number("--mask-lowpass", mask_lowpass, ge=0, why="Angstrom; 0 for none")
    check_number("--bfactor", bfactor, why="A^2")
    check_number("--autob-lowres", autob_lowres, gt=0, why="Angstrom")
    check_number("--autob-highres", autob_highres, ge=0, why="Angstrom; 0 for Nyquist")
    check_number("--mtf-angpix", mtf_angpix, gt=0, why="Angstrom per pixel")
    check_number("--low-pass", low_pass, why="Angstrom; negative: the final resolution, 0: none")
    check_number("--angpix", angpix, gt=0, why="Angstrom per voxel")


def _cause(result: Any, bfactor: float | None, low_pass: float, mtf_path: Path | None, half1: Path,
           half2: Path) -> str:
    """Which option or input to blame when the postprocessed map is not finite or is empty."""
    causes = []
    if bfactor is not None:
        causes.append(f"--bfactor {bfactor:g}")
    elif result.bfactor:
        causes.append(f"the fitted B-factor {result.bfactor:.4g} A^2 (give --bfactor or change --autob-lowres)")
    if low_pass > 0:
        causes.append(f"--low-pass {low_pass:g}")
    if mtf_path is not None:
        causes.append(f"--mtf {mtf_path}")
    causes.append(f"the half maps {half1} and {half2}")
    return ", ".join(causes)


def _make_auto_mask(a: Any, b: Any, voxel: float, threshold: float | None, extend: float, soft_edge: float,
                    lowpass: float) -> Any:
    from cryocli.analysis.postprocess import auto_mask_from_halves

    try:
        return auto_mask_from_halves(a, b, voxel, threshold, extend, soft_edge, lowpass)
    except CryocliError as exc:
        raise CryocliError(f"--auto-mask: {exc.message}; lower --ini-threshold") from None


def _write_outputs(out_dir: Path, names: dict[str, Path], result: Any, auto_mask: Any, half1: str, half2: str,
                   mask_name: str | None) -> None:
    """Build every file in a temporary folder next to ``out_dir``, then move them in."""
    from cryocli.analysis.fsc import shell_frequency
    from cryocli.analysis.postprocess import postprocess_star_text
    from cryocli.io.mrc import write_map
    from cryocli.io.paths import atomic_write_text, default_file_mode
    from cryocli.plots import plot_fsc, plot_guinier

    parent = out_dir.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=parent))
    try:
        staged = {k: tmp / p.name for k, p in names.items()}
        write_map(staged["map"], result.map, result.voxel_size, command="postprocess")
        if "map_masked" in staged:
            write_map(staged["map_masked"], result.map_masked, result.voxel_size, command="postprocess")
        if "mask" in staged:
            write_map(staged["mask"], auto_mask, result.voxel_size, command="postprocess --auto-mask")
        star = postprocess_star_text(result, half1, half2, str(names["map"]), mask_name,
                                     str(names["map_masked"]) if "map_masked" in names else None)
        atomic_write_text(staged["star"], star)
        freq = shell_frequency(result.box, result.voxel_size)
        curves = {"unmasked": (freq, result.fsc_unmasked)}
        if result.fsc_masked is not None:
            curves["masked"] = (freq, result.fsc_masked)
            curves["phase-randomised masked"] = (freq, result.fsc_random_masked)
            curves["corrected"] = (freq, result.fsc_corrected)
        plot_fsc(staged["fsc_plot"], curves, thresholds=(0.143,), resolutions={"resolution": result.resolution},
                 title=f"Final resolution {result.resolution:.2f} Å")
        guinier = {"original": result.guinier_original}
        if result.guinier_mtf is not None:
            guinier["MTF-corrected"] = result.guinier_mtf
        guinier["FSC-weighted"] = result.guinier_weighted
        guinier["sharpened"] = result.guinier_sharpened
        fit = result.guinier_fit
        plot_guinier(staged["guinier_plot"], result.guinier_x, guinier,
                     fit=(fit.slope, fit.intercept) if fit else None,
                     fit_range=_fit_range(result) if fit else None, title=f"Guinier plot, B = {result.bfactor:.0f} Å²")
        out_dir.mkdir(parents=True, exist_ok=True)
        mode = default_file_mode()
        for key, src in staged.items():
            os.chmod(src, mode)  # the plots are written through a private temporary; give them the umask's bits
            os.replace(src, names[key])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


#: Every file postprocess may write into its folder; one this run did not write is left from an earlier run.
OUTPUT_NAMES = ("postprocess.mrc", "postprocess_masked.mrc", "postprocess.star", "fsc.png", "guinier.png", "mask.mrc")


def _remove_previous_outputs(out_dir: Path, written: dict[str, Path], inputs: list[Path | None]) -> None:
    """Remove what an earlier postprocess left in ``out_dir`` (--force) and this run did not write: a
    postprocess_masked.mrc or mask.mrc beside a postprocess.star that no longer names them. An input of this
    run (a --mask kept as OUT/mask.mrc) is never removed."""
    from cryocli.cli.common import same_file

    kept = {p.name for p in written.values()}
    for name in OUTPUT_NAMES:
        path = out_dir / name
        if name in kept or not path.is_file() or any(i is not None and same_file(path, i) for i in inputs):
            continue
        path.unlink()


def _fit_range(result: Any) -> tuple[float, float]:
    import numpy as np

    x = result.guinier_x
    y = result.guinier_weighted
    used = (y > -99) & (x > 0)
    return (float(np.min(x[used])), float(np.max(x[used]))) if used.any() else (0.0, float(x.max()))


def _print(s: dict[str, Any]) -> None:
    con = out_console()
    con.print(f"[bold]postprocess[/] {s['half1']} + {s['half2']}: box {s['box']}, {s['voxel_size']:.4g} A/voxel")
    t = Table("quantity", "value")
    t.add_row("final resolution (FSC 0.143)", f"{s['resolution_A']:.3f} A")
    t.add_row("B-factor applied", f"{s['bfactor_A2']:.1f} A^2")
    fit = s["guinier_fit"]
    if fit:
        hi = f"{fit['highres_A']:g} A" if fit["highres_A"] else "Nyquist"
        t.add_row("Guinier fit", f"{fit['lowres_A']:g} A to {hi}, {fit['shells']} shells, r^2 {fit['correlation']:.3f}")
    t.add_row("low-pass", f"{s['low_pass_A']:.2f} A" if s["low_pass_A"] else "none")
    if s["mask"]:
        t.add_row("mask", s["mask"])
        t.add_row("mask fraction (> 0.5)", f"{100 * s['mask_fraction']:.1f} % of the box")
        t.add_row("phases randomised from", f"{s['randomise_from_A']:.2f} A")
    if s["mtf"]:
        t.add_row("MTF", s["mtf"])
    con.print(t)
    for kind, path in s["outputs"].items():
        con.print(f"wrote {kind}: {path}")


def register(app: typer.Typer) -> None:
    app.command("postprocess")(postprocess)
