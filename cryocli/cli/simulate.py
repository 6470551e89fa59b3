"""`cryocli simulate MODEL -o DIR`: particle stacks and a RELION STAR file with ground truth."""

from __future__ import annotations

import math
from pathlib import Path

import typer

from cryocli.cli.common import (
    STATE,
    check_number,
    claim_outputs,
    emit_json,
    err_console,
    guarded,
    out_console,
    parse_range,
    progress_bar,
    resolve_device,
)
from cryocli.errors import CryocliError


def simulate(
    model: Path = typer.Argument(..., help="Atomic model (.pdb, .cif, .mmcif, .ent) or map (.mrc, .map)."),
    out: Path = typer.Option(..., "-o", "--out", help="Output directory (particles.star, Particles/, "
                             "ground_truth.mrc, simulate.json, and particles.png: the first particles without "
                             "CTF, with it, and with noise, to see what the SNR and defocus look like)."),
    n_particles: int = typer.Option(10000, "--n-particles", "-n", min=1, help="Number of particles."),
    box: int | None = typer.Option(None, "--box", min=8, help="Box size in pixels [default: the "
                                      "--poses-from STAR file's; for a map, its own box, or its field of view at "
                                      "--apix; 128 for an atomic model]."),
    apix: float | None = typer.Option(None, "--apix", help="Pixel size in Angstrom [default: "
                                         "the --poses-from STAR file's; for a map, its own voxel size; 0.8 for an "
                                         "atomic model]. A map whose header has no voxel size is taken to have this "
                                         "one."),
    snr: str = typer.Option("0.1", "--snr", help="Signal-to-noise ratio, linear (0.1), in decibels (-10dB) or "
                            "inf (no noise). SNR = variance of the clean CTF-modulated projection over the whole "
                            "box / noise variance, averaged over the dataset."),
    defocus: str = typer.Option("15000:20000", "--defocus", help="Mean defocus range in Angstrom (uniform); "
                                "positive is underfocus, as in RELION."),
    astigmatism: str = typer.Option("100:500", "--astigmatism", help="DefocusU - DefocusV range in Angstrom "
                                    "(uniform); U = d + a/2, V = d - a/2."),
    astig_angle: str = typer.Option("0.2:1.4", "--astig-angle", help="Astigmatism angle range in radians "
                                    "(uniform); written as rlnDefocusAngle in degrees."),
    voltage: float = typer.Option(300.0, "--voltage", help="Acceleration voltage in kV (positive)."),
    cs: float = typer.Option(2.7, "--cs", help="Spherical aberration in mm (0 or more)."),
    amp_contrast: float = typer.Option(0.07, "--amp-contrast", min=0.0, max=0.99, help="Amplitude contrast Q0."),
    bfactor: float = typer.Option(0.0, "--bfactor", help="CTF B-factor envelope in A^2 (rlnCtfBfactor)."),
    shift_sigma: float = typer.Option(0.0, "--shift-sigma", min=0.0, help="Standard deviation of the in-plane "
                                      "origins in Angstrom (Gaussian)."),
    views: str = typer.Option("uniform", "--views", help="uniform (Haar on SO(3)) or belt (tilt near 90 "
                              "degrees: the preferred-orientation case)."),
    no_ctf: bool = typer.Option(False, "--no-ctf", help="No CTF (and no CTF columns in the STAR file)."),
    resolution: float | None = typer.Option(None, "--resolution", help="Blur the atomic model's potential "
                                               "to this resolution in Angstrom [default: 2 x apix]."),
    no_center: bool = typer.Option(False, "--no-center", help="Keep the model's coordinates instead of centring "
                                   "its centre of mass in the box."),
    poses_from: Path | None = typer.Option(None, "--poses-from", help="Take poses, shifts, CTF and optics "
                                              "from this STAR file instead of drawing them."),
    invert: bool = typer.Option(False, "--invert", help="Write dark protein (as on raw micrographs). By default "
                                "images have relion_project's sign: protein bright at low frequency, as RELION "
                                "particles extracted with --invert_contrast."),
    stack_size: int = typer.Option(1000, "--stack-size", min=1, help="Particles per .mrcs file."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing output directory."),
) -> None:
    """Simulate particle images of an atomic model or a map, with RELION's image formation (projection,
    CTF, origins) and white noise, and write them with their ground truth.

    Atomic models are read with gemmi and turned into an electron-scattering potential with gemmi's
    electron form factors. Files without an element column (CHARMM style) get their elements inferred
    from the atom names (CA is carbon unless it is a calcium ion)."""
    from cryocli.imaging.noise import parse_snr

    with guarded():
        _check_values(n_particles, apix, defocus, astigmatism, astig_angle, voltage, cs, amp_contrast, bfactor,
                      shift_sigma, resolution, views, no_ctf)
        snr_value = parse_snr(snr)
        device = resolve_device()
        with claim_outputs([out], is_dir=True, force=force, command="simulate"):
            summary, config = _simulate(model, out, device, n_particles, box, apix, snr_value, defocus, astigmatism,
                                        astig_angle, voltage, cs, amp_contrast, bfactor, shift_sigma, views, no_ctf,
                                        resolution, no_center, poses_from, invert, stack_size)
    con = out_console()
    achieved = summary["snr_achieved"]
    snr_text = "no noise" if achieved == "inf" else f"SNR {achieved:.4g} ({10 * math.log10(achieved):.2f} dB)"
    con.print(f"wrote {summary['n_particles']} particles of {config.box} px at {config.apix:g} A/px to "
              f"{out}/particles.star ({snr_text}); how they look: {out}/particles.png")
    emit_json({"command": "simulate", "out": str(out), **summary})


def _check_values(n_particles: int, apix: float | None, defocus: str, astigmatism: str, astig_angle: str,
                  voltage: float, cs: float, amp_contrast: float, bfactor: float, shift_sigma: float,
                  resolution: float | None, views: str, no_ctf: bool) -> None:
    """Refuse values the physics does not allow, before any work (one line, exit 2)."""
    check_number("--apix", apix, gt=0, why="Angstrom per pixel")
    check_number("--resolution", resolution, gt=0, why="Angstrom")
    check_number("--shift-sigma", shift_sigma, ge=0, why="Angstrom")
    check_number("--voltage", voltage, gt=0, why="kV")
    check_number("--cs", cs, ge=0, why="mm")
    check_number("--amp-contrast", amp_contrast, ge=0, lt=1)
    check_number("--bfactor", bfactor)
    if views not in ("uniform", "belt"):
        raise CryocliError(f"--views {views}: expected uniform or belt")
    low, _ = parse_range(defocus, "--defocus")
    if low < 0 and not no_ctf:
        raise CryocliError(f"--defocus {defocus}: the mean defocus must not be negative (RELION's defocus is "
                           "positive for underfocus)")
    parse_range(astigmatism, "--astigmatism")
    parse_range(astig_angle, "--astig-angle")


def _simulate(model: Path, out: Path, device, n_particles: int, box: int | None, apix: float | None, snr: float,
              defocus: str, astigmatism: str, astig_angle: str, voltage: float, cs: float, amp_contrast: float,
              bfactor: float, shift_sigma: float, views: str, no_ctf: bool, resolution: float | None,
              no_center: bool, poses_from: Path | None, invert: bool, stack_size: int):
    """Draw or read the geometry, build the volume and write the dataset; returns (summary, config)."""
    import numpy as np

    from cryocli.imaging.simulate import SimulationConfig, draw_geometry, geometry_from_star, simulate_dataset
    from cryocli.io.volumes import load_volume

    geometry = None
    if poses_from is not None:
        geometry = geometry_from_star(poses_from, use_ctf=not no_ctf)
        source = geometry.source
        assert source is not None  # geometry_from_star always records the table it read
        if box is None:
            box = int(source.box_size) if source.box_size else None
            if box is None:
                raise CryocliError("no rlnImageSize in the optics table: pass --box", poses_from)
        if apix is None:
            apix = float(source.pixel_size[0])
            check_number("the pixel size of --poses-from", apix, gt=0, why="Angstrom; pass --apix")
        n_particles = len(geometry)
    volume, source_info = load_volume(model, box, apix, resolution=resolution, center=not no_center)
    box, apix = source_info.pop("box"), source_info.pop("apix")
    _warn_if_cropped(source_info, box, apix)
    config = SimulationConfig(
        n_particles=n_particles, box=box, apix=apix, snr=snr,
        defocus=parse_range(defocus, "--defocus"), astigmatism=parse_range(astigmatism, "--astigmatism"),
        astig_angle=parse_range(astig_angle, "--astig-angle"), voltage=voltage, cs=cs,
        amp_contrast=amp_contrast, bfactor=bfactor, shift_sigma=shift_sigma, views=views, ctf=not no_ctf,
        invert=invert, seed=STATE.seed, stack_size=stack_size)
    if geometry is None:
        geometry = draw_geometry(config)
    if not np.isfinite(volume).all():
        raise CryocliError("the map holds NaN or Inf values", model)
    if not np.any(volume):
        raise CryocliError(f"the map is empty (all zero in the {config.box} px box at {config.apix:g} A/px)", model)
    with progress_bar(len(geometry), "simulate") as advance:
        summary = simulate_dataset(volume, geometry, config, out, device=device, progress=advance,
                                   extra_info={"model": str(model), "poses_from": str(poses_from or ""),
                                               **source_info})
    return summary, config


# A map cropped by more than this share of its squared density loses part of the molecule, not only solvent noise.
CROPPED_WARNING_FRACTION = 0.01


def _warn_if_cropped(source_info: dict, box: int, apix: float) -> None:
    """Say when the requested grid cuts off part of a map (an atomic model that does not fit is an error instead)."""
    outside = source_info.get("map_fraction_outside_box", 0.0)
    if outside > CROPPED_WARNING_FRACTION:
        extent = source_info["map_box"] * source_info["map_voxel_size_A"]
        err_console().print(f"[yellow]warning:[/] the {box} px box at {apix:g} A/px ({box * apix:g} A) crops the "
                            f"{extent:g} A map: {100 * outside:.1f}% of its squared density is cut off; leave out "
                            "--box and --apix to keep the map's own grid")


def register(app: typer.Typer) -> None:
    app.command("simulate")(simulate)
