"""How a run is laid over the particles: once over all of them, or twice, independently, on the two half sets.

:func:`run_engine` applies ``max_particles``, runs the engine once or on each ``rlnRandomSubset`` half
(each half its own checkpointed run, with its own seed), and for two halves aligns the second map onto
the first (rotation, shift, hand) so that their FSC is a gold-standard one.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from cryocli.engines.progress import Reporter
from cryocli.engines.protocol import Engine, EngineConfig
from cryocli.engines.result import HalfAlignment, Reconstruction
from cryocli.errors import CryocliError
from cryocli.io.dataset import ParticleStack

# Seeds of the second half run are offset by this prime, so the two random starts share nothing.
HALF_SEED_OFFSET = 1_000_003


def select_rows(data: ParticleStack, max_particles: int | None) -> np.ndarray:
    """0-based rows an engine uses: all, or the first ``max_particles``."""
    n = len(data)
    if max_particles is not None and max_particles < n:
        return np.arange(max_particles)
    return np.arange(n)


def half_rows(data: ParticleStack, rows: np.ndarray, seed: int) -> list[np.ndarray]:
    """The rows of each ``rlnRandomSubset`` half among ``rows`` (halves drawn with ``seed`` when absent);
    :class:`CryocliError` when a half has fewer than 2 particles."""
    subset = data.ensure_half_sets(seed).numpy()[rows]
    picked = [rows[subset == half] for half in (1, 2)]
    for half, p in enumerate(picked, start=1):
        if len(p) < 2:
            raise CryocliError(f"half set {half} has {len(p)} particles; two independent halves need at least 2 "
                               "in each", data.table.path)
    return picked


def run_engine(engine: Engine, data: ParticleStack, config: EngineConfig, reporter: Reporter,
               halves: bool = False) -> Reconstruction:
    """Run ``engine`` on ``data`` (``config.max_particles`` first), once or on each ``rlnRandomSubset`` half.

    With ``halves`` the two halves are reconstructed independently (each its own checkpointed run), the
    second map is aligned onto the first (:func:`cryocli.analysis.align.align_maps`) and its poses moved into
    the first map's frame; the returned map is the mean of the aligned halves, ``gold_standard_fsc`` their FSC.
    """
    rows = select_rows(data, config.max_particles)
    if not halves:
        return _single_run(engine, data, config, reporter, rows, "full")
    from cryocli.analysis.align import align_maps, poses_to_reference
    from cryocli.analysis.fsc import fsc_curve, threshold_crossing

    results = []
    for half, picked in enumerate(half_rows(data, rows, config.seed), start=1):
        # Independent runs: a different seed per half, or a shared random start would correlate the half maps.
        half_config = replace(config, seed=config.seed + HALF_SEED_OFFSET * (half - 1))
        results.append(_single_run(engine, data, half_config, reporter, picked, f"half{half}"))
    first, second = results
    assert first.particle_rows is not None and second.particle_rows is not None
    alignment = align_maps(first.volume, second.volume, first.voxel_size, device=first.volume.device)
    aligned = torch.as_tensor(alignment.aligned_map)
    rot2_ref, origins2_ref = poses_to_reference(second.rotations, second.origins_angstrom, alignment)
    rot2 = torch.as_tensor(np.asarray(rot2_ref), dtype=first.rotations.dtype)
    origins2 = torch.as_tensor(np.asarray(origins2_ref), dtype=first.origins_angstrom.dtype)
    rows_both = np.concatenate([first.particle_rows, second.particle_rows])
    order = np.argsort(rows_both, kind="stable")
    fsc = fsc_curve(first.volume, aligned)
    columns = {k: np.concatenate([v, second.particle_columns[k]])[order] for k, v in first.particle_columns.items()
               if k in second.particle_columns}
    return Reconstruction(
        volume=0.5 * (first.volume + aligned), voxel_size=first.voxel_size,
        rotations=torch.cat([first.rotations, rot2])[order],
        origins_angstrom=torch.cat([first.origins_angstrom, origins2])[order],
        particle_rows=rows_both[order], half_volumes=(first.volume, aligned), particle_columns=columns,
        metrics=[{**m, "half": 1} for m in first.metrics] + [{**m, "half": 2} for m in second.metrics],
        gold_standard_fsc=np.asarray(fsc),
        resolution_A=threshold_crossing(np.asarray(fsc), first.box, first.voxel_size, 0.143).resolution,
        converged=None if first.converged is None or second.converged is None
        else bool(first.converged and second.converged),
        inverted=first.inverted, half_alignment=HalfAlignment(float(alignment.score), bool(alignment.flipped)),
        method_summary=first.method_summary)


def _single_run(engine: Engine, data: ParticleStack, config: EngineConfig, reporter: Reporter,
                rows: np.ndarray, run_name: str) -> Reconstruction:
    """One checkpointed run of ``engine`` on the particles at ``rows`` (a finished one is taken from the
    checkpoint when resuming)."""
    reporter.begin_run(run_name, rows)
    finished = reporter.finished_result(config.epochs)
    if finished is not None:
        return finished
    everything = len(rows) == len(data) and bool((rows == np.arange(len(data))).all())
    subset = data if everything else ParticleStack(data.table.subset(rows), data.datadir)
    result = engine.run(subset, config, reporter)
    result.particle_rows = rows
    reporter.finish_run(result, config.epochs)
    return result
