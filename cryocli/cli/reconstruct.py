"""`cryocli reconstruct PARTICLES.star -o MAP.mrc`: direct Fourier reconstruction at known poses."""

from __future__ import annotations

from pathlib import Path

import typer

from cryocli.cli.common import (
    angpix_option,
    check_datadir,
    check_finite_output,
    check_number,
    check_writable_output,
    claim_outputs,
    emit_json,
    guarded,
    out_console,
    progress_bar,
    resolve_device,
)
from cryocli.device_memory import peak_device_memory_mb
from cryocli.engines.common.reconstruct import DEFAULT_GRIDDING_ITERATIONS
from cryocli.errors import CryocliError


def half_map_paths(out: Path) -> tuple[Path, Path]:
    """``map.mrc`` -> ``map_half1.mrc``, ``map_half2.mrc`` beside it."""
    return out.with_name(f"{out.stem}_half1{out.suffix}"), out.with_name(f"{out.stem}_half2{out.suffix}")


def reconstruct(
    particles: Path = typer.Argument(..., help="RELION STAR file with poses (rlnAngleRot/Tilt/Psi) and origins."),
    out: Path = typer.Option(..., "-o", "--out", help="Output map (.mrc)."),
    ctf: bool = typer.Option(True, "--ctf/--no-ctf", help="Correct for the CTF (Wiener-like division by the summed "
                             "CTF^2, as relion_reconstruct --ctf)."),
    subset: int | None = typer.Option(None, "--subset", min=1, max=2, help="Only particles with this "
                                         "rlnRandomSubset (1 or 2)."),
    halves: bool = typer.Option(False, "--halves", help="Also reconstruct both half sets (OUT_half1.mrc, "
                                "OUT_half2.mrc) and print their FSC. Half sets are made when rlnRandomSubset is absent."),
    maxres: float | None = typer.Option(None, "--maxres", help="Ignore frequencies beyond this "
                                           "resolution in Angstrom (positive)."),
    sym: str = typer.Option("C1", "--sym", help="Point group with RELION's axes: C1, Cn, Dn, T, O, I (= I2), I1-I4."),
    datadir: Path | None = typer.Option(None, "--datadir", help="Extra folder to look for particle stacks in."),
    angpix: float | None = angpix_option(writes_particles=False),
    batch_size: int = typer.Option(256, "--batch-size", min=1, help="Particles per batch on the device."),
    gridding_iterations: int = typer.Option(DEFAULT_GRIDDING_ITERATIONS, "--gridding-iterations", min=0,
                                            help="Iterations of RELION's density compensation (--use_gridding); 0 "
                                            "divides by max(weight, radial average / 1000), relion_reconstruct's "
                                            "default."),
    force: bool = typer.Option(False, "--force", help="Overwrite existing output maps."),
) -> None:
    """Reconstruct a map from particles at the poses in their STAR file, as relion_reconstruct: shift by
    +origin, multiply by the CTF, insert into a 2x padded Fourier grid, divide by the CTF^2 weights."""
    from contextlib import nullcontext
    from itertools import chain

    from cryocli import distributed
    from cryocli.analysis.fsc import fsc_curve, threshold_crossing
    from cryocli.engines.common.particles_reconstruct import (
        check_chunk,
        labelled_chunks,
        reconstruct_labelled,
    )
    from cryocli.geometry.symmetry import symmetry_operators
    from cryocli.io.mrc import write_map
    from cryocli.io.star_chunks import read_star_chunks

    outputs = [out, *half_map_paths(out)] if halves else [out]
    with guarded():
        if out.suffix.lower() not in (".mrc", ".map"):
            raise CryocliError("output map must end in .mrc or .map", out)
        check_number("--maxres", maxres, gt=0, why="Angstrom")
        check_number("--angpix", angpix, gt=0, why="Angstrom")
        if halves and subset is not None:
            raise CryocliError("--halves reconstructs both half sets and their union; drop --subset")
        check_datadir(datadir)
        device = resolve_device()
        ops = symmetry_operators(sym)
        sym_ops = None if ops.shape[0] == 1 else ops.float()
        # Under torchrun rank 0 alone claims and writes the outputs; the others compute their share.
        main = distributed.current().main
        if not main:  # the same refusal as rank 0's, before any collective, instead of a broken connection
            for path in outputs:
                check_writable_output(path, is_dir=False, force=force)
        claim = (claim_outputs(outputs, is_dir=False, force=force, command=f"reconstruct {particles.name}") if main
                 else nullcontext())
        with claim:
            chunked = read_star_chunks(particles, require_images=True)
            paths = [*half_map_paths(out), out] if halves else [out]
            # Open the first chunk's stacks and check its poses and CTF before the progress bar starts, so that a
            # bad input is one error line, not a "reconstruct 0/N 0%" line and then the error.
            chunks = labelled_chunks(chunked, datadir, halves=halves, subset=subset, angpix=angpix)
            first = next(chunks, None)
            if first is not None:
                check_chunk(first[0], ctf)
            # The progress bar counts rows of the file: a --subset run passes over all of them.
            with progress_bar(chunked.count, "reconstruct") as advance:
                result = reconstruct_labelled(
                    chain([first] if first is not None else [], chunks), 2 if halves else 1,
                    use_ctf=ctf, maxres=maxres, sym_ops=sym_ops, device=device, batch_size=batch_size,
                    progress=advance, gridding_iterations=gridding_iterations, with_union=halves,
                    empty=f"no particles with rlnRandomSubset {subset}" if subset is not None else None)
            maps = {path: volume.detach().cpu().numpy() for path, volume in zip(paths, result.maps, strict=True)}
            cause = f"the particles, poses and CTF parameters in {particles}" + (", --maxres" if maxres else "")
            for path, volume in maps.items():
                check_finite_output(volume, f"the map {path}", cause)
            for path, volume in maps.items():
                if main:
                    write_map(path, volume, result.pixel_size, command=f"reconstruct {particles.name}")
    selected = sum(result.counts)
    box, pixel_size = result.box, result.pixel_size
    con = out_console()
    summary = {"command": "reconstruct", "particles": selected, "box": box, "pixel_size": pixel_size,
               "sym": sym.upper(), "maps": [str(p) for p in maps], "device": str(device)}
    if (peak := peak_device_memory_mb(device)) is not None:
        summary["peak_device_memory_MB"] = peak
    con.print(f"reconstructed {selected} particles ({box} px, {pixel_size:g} A/px, {sym.upper()}) -> {out}")
    if halves:
        h1, h2 = half_map_paths(out)
        curve = fsc_curve(maps[h1], maps[h2])
        res = {t: threshold_crossing(curve, box, pixel_size, t) for t in (0.143, 0.5)}
        summary["half_map_fsc"] = {"fsc": curve.tolist(), "resolution_0143": res[0.143].resolution,
                                   "resolution_05": res[0.5].resolution}
        con.print(f"half maps {h1.name}, {h2.name}: FSC 0.143 at {res[0.143].resolution:.2f} A, "
                  f"0.5 at {res[0.5].resolution:.2f} A (unmasked)")
    emit_json(summary)


def register(app: typer.Typer) -> None:
    app.command("reconstruct")(reconstruct)
