"""One engine run from a STAR file into a run directory: what ``abinitio`` and ``refine`` share.

:func:`run_to_directory` reads the particles (and the ground truth), refusing bad input before any work,
opens the run directory (:class:`~cryocli.io.run_directory.RunDirectory`: locked, staged, cleaned), runs the
engine once or on two half sets (:func:`~cryocli.engines.halves.run_engine`) under a
:class:`~cryocli.engines.progress.Reporter`, has the run directory write every output, and returns the
result with its summary. A failed run leaves the directory as it was; an interrupted one keeps its
checkpoint for ``resume`` (the interrupt goes on; ``on_interrupt`` learns where the checkpoint stayed).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console

from cryocli import distributed
from cryocli.analysis.contour import contour_level
from cryocli.analysis.ground_truth import GroundTruth
from cryocli.device_memory import peak_device_memory_mb
from cryocli.engines.display_map import with_viewing_map
from cryocli.engines.halves import run_engine, select_rows
from cryocli.engines.progress import Reporter
from cryocli.engines.protocol import Engine, EngineConfig
from cryocli.engines.result import Reconstruction
from cryocli.errors import CryocliError, OptionError, RunBrokenOff, broken_off
from cryocli.io.dataset import ParticleStack
from cryocli.io.mrc import read_map
from cryocli.io.run_directory import RunDirectory
from cryocli.io.star import ParticleTable, read_star


@dataclass
class RunRequest:
    """Where a run reads and writes, and how.

    particles: the STAR file. out: the run directory. command: what runs (``abinitio --method cryospin``),
    for file labels and the lock. datadir: an extra folder to find stacks in. force: replace an existing run
    (only once the new one succeeds). resume: continue the run in ``out``. ground_truth: a known map to score
    against. score_every: score the map every this many epochs. halves: two independent half runs. mass_kda: the
    molecule's mass, for the contour level (``None``: from the particle diameter). angpix: the images' pixel size
    in Angstrom for a STAR file that gives none (:meth:`~cryocli.io.star.ParticleTable.with_pixel_size`).
    """

    particles: Path
    out: Path
    command: str
    datadir: Path | None = None
    force: bool = False
    resume: bool = False
    ground_truth: Path | None = None
    score_every: int = 1000
    halves: bool = False
    mass_kda: float | None = None
    angpix: float | None = None


@dataclass
class RunOutcome:
    """A finished run: its result, the scores against the truth (or ``None``), its files and summary."""

    result: Reconstruction
    scores: dict[str, Any] | None
    files: dict[str, str]
    summary: dict[str, Any]


def open_particles(request: RunRequest) -> tuple[ParticleTable, ParticleStack]:
    """The particle table and its stacks; every stack must exist, and a pixel size be known (checked before any
    work)."""
    if request.datadir is not None and not Path(request.datadir).is_dir():
        raise CryocliError("the data folder does not exist", request.datadir)
    table = read_star(request.particles, require_images=True)
    if request.angpix is not None:
        table = table.with_pixel_size(request.angpix)
    stack = ParticleStack(table, request.datadir)
    _ = stack.pixel_size  # refused here, before the run folder is made, when nothing gives one
    return table, stack


def load_ground_truth(path: Path, stack: ParticleStack, score_every: int) -> GroundTruth:
    """The ground truth of a run on ``stack``, checked against it before any work."""
    gt = read_map(path)
    truth = GroundTruth(torch.as_tensor(np.array(gt.data)), gt.voxel_size, stack.rotations, every=score_every)
    try:
        truth.check_matches(len(stack), stack.box, stack.pixel_size)
    except CryocliError as exc:
        raise CryocliError(exc.message, path) from None
    return truth


def refuse_diameter_beyond_box(stack: ParticleStack, config: EngineConfig) -> None:
    """Refuse a ``particle_diameter`` (Angstrom) wider than the particles' box (box x pixel size, which Fourier
    cropping with --box keeps): such a mask is no mask, and the summary would report the default sphere instead.

    relion_autopick refuses the same ("ERROR: the particle mask diameter is larger than the size of the box.",
    src/autopicker.cpp); relion_refine does not check it and masks with a sphere that covers the whole box.
    cryocli refuses it, as autopick does; a diameter equal to the box is accepted."""
    diameter = getattr(config, "particle_diameter", None)
    if diameter is None:
        return
    width = stack.box * stack.pixel_size
    if float(diameter) > width:
        raise OptionError("particle_diameter", f"{float(diameter):g}", f"larger than the box of the particles, "
                          f"{stack.box} px x {stack.pixel_size:.4g} A/px = {width:.4g} A")


def run_to_directory(engine: Engine, config: EngineConfig, request: RunRequest, console: Console | None,
                     device: torch.device, on_interrupt: Callable[[Path | None], None] | None = None) -> RunOutcome:
    """Run ``engine`` on ``request.particles`` and write map, STAR, metrics and figures to ``request.out``.

    Bad input (particles, ground truth, run directory) is refused before the run directory is touched.
    If the run fails, what it made is removed (the previous run, with ``force``, stays as it was); if it is
    interrupted (``KeyboardInterrupt``) after its first checkpoint, the checkpoint stays for ``resume``, and
    ``on_interrupt`` is called with the folder holding it (``None``: nothing was kept). A collective that fails
    under torchrun (another rank died or stalled), the device running out of memory, or a read or write the
    operating system refused (a full disk) keeps the checkpoint the same way and raises
    :class:`cryocli.errors.RunBrokenOff` naming the folder.
    """
    table, stack = open_particles(request)
    if config.use_ctf:
        if not table.has_ctf:
            raise OptionError("use_ctf", True, "the particles have no CTF parameters (rlnDefocusU is missing)",
                              request.particles)
        table.ctf_params(require=True)
    truth = load_ground_truth(request.ground_truth, stack, request.score_every) if request.ground_truth else None
    if len(select_rows(stack, config.max_particles)) < 2:
        raise CryocliError("a run needs at least 2 particles", request.particles)
    refuse_diameter_beyond_box(stack, config)
    engine.check_inputs(stack, config)
    if not distributed.current().main:
        return follow_rank_zero(engine, config, request, stack)
    run_dir = RunDirectory(request.out, force=request.force, resume=request.resume, command=request.command,
                           mass_kda=request.mass_kda)
    run_dir.open()
    keep = False
    reporter: Reporter | None = None
    try:
        meta = run_meta(engine, config, request, stack)
        reporter = Reporter(console=console, files=run_dir, ground_truth=truth, resume=request.resume, meta=meta,
                            check_saved=lambda saved: refuse_another_run(saved, config, stack, request.particles))
        if request.resume:  # the other ranks resume from the same checkpoint (see follow_rank_zero)
            distributed.broadcast_object(reporter.checkpoint)
        reporter.event("start", method=engine.name, config=config.as_dict(), particles=str(request.particles),
                       device=str(device))
        t0 = time.perf_counter()
        result = run_engine(engine, stack, config, reporter, halves=request.halves)
        reporter.close()
        if engine.kind == "abinitio":
            result = with_viewing_map(result, stack, config.particle_diameter, config.use_ctf, config.seed,
                                      device)
        scores = truth.score_map(result.volume, result.voxel_size) if truth is not None else None
        files = run_dir.write_result(result, table, request.command, scores)
        summary = run_summary(engine.name, request, result, scores, truth, time.perf_counter() - t0, device)
        reporter.event("finish", **summary)
        run_dir.commit()
        summary["files"] = files
        return RunOutcome(result, scores, files, summary)
    except KeyboardInterrupt:
        keep = reporter is not None and reporter.checkpointed
        if on_interrupt is not None:
            on_interrupt(run_dir.work if keep else None)
        raise
    except (RuntimeError, OSError) as exc:
        why = broken_off(exc)
        if why is None:
            raise
        # Like an interrupt, the run broke off through no fault of its input: a long run must be able to continue
        # from its last checkpoint (--resume) rather than start again.
        keep = reporter is not None and reporter.checkpointed
        raise RunBrokenOff(why[0], run_dir.work if keep else None, why[1]) from exc
    finally:
        if reporter is not None:
            reporter.close()
        run_dir.close(keep=keep)


def run_meta(engine: Engine, config: EngineConfig, request: RunRequest, stack: ParticleStack) -> dict[str, Any]:
    """What a run's checkpoint records of it: the method, its options, the STAR file and its particle count."""
    return {"method": engine.name, "config": config.as_dict(), "particles": str(request.particles),
            "particle_count": len(stack)}


def refuse_another_run(saved: dict[str, Any], config: EngineConfig, stack: ParticleStack, star: Path) -> None:
    """Refuse to resume the run whose checkpoint recorded ``saved`` (:func:`run_meta`) with other options
    (:meth:`~cryocli.engines.protocol.EngineConfig.check_resumes`) or on a STAR file of another number of particles
    (its poses and half sets are per particle row); ``star`` is the STAR file of ``stack``."""
    config.check_resumes(saved.get("config"))
    before = saved.get("particle_count")
    if before is not None and int(before) != len(stack):
        raise CryocliError(f"has {len(stack)} particles, the run to resume was made on {before}; --resume continues "
                           "a run on the particles it started with", star)


def follow_rank_zero(engine: Engine, config: EngineConfig, request: RunRequest, stack: ParticleStack) -> RunOutcome:
    """The run on a torchrun rank other than 0: the engine computes this rank's share and joins rank 0's
    collectives; it resumes from rank 0's checkpoint, and writes and prints nothing (rank 0 does)."""
    reporter = Reporter(meta=run_meta(engine, config, request, stack),
                        check_saved=lambda saved: refuse_another_run(saved, config, stack, request.particles))
    if request.resume:
        checkpoint = distributed.broadcast_object(None)
        assert isinstance(checkpoint, dict)
        reporter.adopt(checkpoint)
    result = run_engine(engine, stack, config, reporter, halves=request.halves)
    return RunOutcome(result, None, {}, {})


def run_summary(method: str, request: RunRequest, result: Reconstruction, scores: dict[str, Any] | None,
                truth: GroundTruth | None, elapsed_s: float, device: torch.device) -> dict[str, Any]:
    """The summary a run prints and logs: sizes, iterations, time, peak GPU memory (on CUDA, this process's),
    resolutions (gold standard, against the truth), pose errors against the truth, and the method's own figures."""
    s: dict[str, Any] = {"method": method, "out": str(request.out), "particles": int(result.rotations.shape[0]),
                         "box": result.box, "pixel_size": result.voxel_size, "iterations": result.iterations,
                         "converged": result.converged, "inverted": result.inverted,
                         "seconds": round(elapsed_s, 2), "device": str(device)}
    if (peak := peak_device_memory_mb(device)) is not None:
        s["peak_device_memory_MB"] = peak
    if result.metrics and "loss" in result.metrics[-1]:
        s["final_loss"] = result.metrics[-1]["loss"]
    if result.resolution_A is not None:
        s["gold_standard_resolution_A"] = result.resolution_A
    if result.halfmaps_resolution_A is not None:
        s["halfmaps_resolution_A"] = result.halfmaps_resolution_A
    if result.gold_standard_fsc is not None:
        s["fsc"] = np.asarray(result.gold_standard_fsc).round(4).tolist()
    diameter = result.map_filter.mask_diameter_A if result.map_filter is not None else None
    level, basis = contour_level(result.volume, result.voxel_size, mass_kda=request.mass_kda, diameter_A=diameter)
    s["contour_level"], s["contour_basis"] = level, basis
    if result.map_filter is not None:
        s["map_filter"] = {"fsc": result.map_filter.fsc_kind, "lowpass_A": result.map_filter.resolution_A,
                           "mask_diameter_A": result.map_filter.mask_diameter_A,
                           "signal": "reproducible" if result.map_filter.supported else
                           "none reproducible: the run did not converge; map.mrc is only low-passed"}
    if result.half_alignment is not None:
        s["half_alignment_score"] = result.half_alignment.score
        s["half_alignment_flipped"] = result.half_alignment.flipped
    s.update(result.method_summary)
    if scores is not None:
        s["res_vs_truth_fsc05_A"] = scores["res_fsc05"]
        s["res_vs_truth_fsc0143_A"] = scores["res_fsc0143"]
        s["fsc_vs_truth"] = np.asarray(scores["fsc"]).round(4).tolist()
        if truth is not None and truth.rotations is not None and result.particle_rows is not None:
            s.update({f"final_{k}": v for k, v in truth.score_poses(result.rotations, result.particle_rows).items()})
        if truth is not None and result.half_volumes is not None:
            try:
                s.update(postprocess_check(result, truth))
            except CryocliError as exc:  # e.g. no voxel above the automatic mask's threshold: say so, keep the run
                s["postprocess_check"] = f"not possible: {exc.message}"
    return s


def postprocess_check(result: Reconstruction, truth: GroundTruth) -> dict[str, float]:
    """What a user would publish, against what the map supports: the resolution ``cryocli postprocess
    --auto-mask`` reports from the written half maps (FSC 0.143, masked and corrected), the FSC = 0.5 resolution
    of that postprocessed (masked) map against the truth after alignment, and their ratio (< 0.87: the half maps
    claim more than the map has; a regulariser correlating the halves shows up here)."""
    from cryocli.analysis.postprocess import auto_mask_from_halves, postprocess

    assert result.half_volumes is not None
    a, b = (np.asarray(h.detach().cpu(), dtype=np.float64) for h in result.half_volumes)
    mask = auto_mask_from_halves(a, b, result.voxel_size)
    # The resolution does not depend on sharpening: no B-factor (a Guinier fit needs shells a small box lacks).
    pp = postprocess(a, b, result.voxel_size, mask, auto_bfactor=False)
    shown = pp.map_masked if pp.map_masked is not None else pp.map
    against = truth.score_map(torch.as_tensor(shown, dtype=torch.float32), result.voxel_size)["res_fsc05"]
    return {"postprocess_resolution_A": float(pp.resolution), "postprocessed_vs_truth_fsc05_A": float(against),
            "postprocess_over_truth": float(pp.resolution) / float(against)}
