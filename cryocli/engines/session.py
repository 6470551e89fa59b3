"""One engine run from a STAR file into a run directory: what `abinitio` and `refine` share.

Builds the engine's config from command-line options (refusing options the method does not have),
opens the particles and the run directory, scores against a ground truth when one is given, runs the
engine under a :class:`~cryocli.engines.reporter.Reporter` and writes the standard outputs.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console

from cryocli.engines.base import Engine, EngineConfig, Reconstruction, run_engine
from cryocli.engines.reporter import GroundTruth, Reporter, RunDirectory
from cryocli.errors import CryocliError
from cryocli.io.dataset import ParticleStack
from cryocli.io.mrc import read_map
from cryocli.io.star import ParticleTable, read_star


def build_config(engine: Engine, method: str, options: dict[str, Any]) -> EngineConfig:
    """The engine's config from options; ``None`` means "the paper's default". Unknown options are an error."""
    known = {f.name for f in dataclasses.fields(engine.config_class)}
    unsupported = [k for k, v in options.items() if v is not None and k not in known]
    if unsupported:
        names = ", ".join("--" + u.replace("_", "-") for u in unsupported)
        raise CryocliError(f"--method {method} has no option {names}")
    return engine.config_class(**{k: v for k, v in options.items() if v is not None})


@dataclass
class RunOutcome:
    """What a finished run leaves for the command to report: the result, its scores and where it went."""

    result: Reconstruction
    table: ParticleTable
    run_dir: RunDirectory
    reporter: Reporter
    truth: GroundTruth | None
    scores: dict[str, Any] | None
    elapsed_s: float
    files: dict[str, str]


def run_to_directory(engine: Engine, method: str, config: EngineConfig, particles: Path, out: Path, *,
                     command: str, console: Console, device: torch.device, datadir: Path | None = None,
                     force: bool = False, resume: bool = False, ground_truth: Path | None = None,
                     score_every: int = 1000, halves: bool = False) -> RunOutcome:
    """Run ``engine`` on the particles of ``particles`` and write map, STAR, metrics and figures to ``out``."""
    table = read_star(particles, require_images=True)
    stack = ParticleStack(table, datadir)
    truth = None
    if ground_truth is not None:
        gt = read_map(ground_truth)
        truth = GroundTruth(torch.as_tensor(np.array(gt.data)), gt.voxel_size, stack.rotations, every=score_every)
    created = not Path(out).exists()
    run_dir = RunDirectory(out, force=force, resume=resume)
    meta = {"method": method, "config": config.as_dict(), "particles": str(particles)}
    reporter = Reporter(console=console, run_dir=run_dir, ground_truth=truth, resume=resume, meta=meta)
    reporter.event("start", method=method, config=config.as_dict(), particles=str(particles), device=str(device))
    t0 = time.perf_counter()
    try:
        result = run_engine(engine, stack, config, reporter, halves=halves)
    except CryocliError:
        # Bad input found by the engine: leave no partial run behind (an interrupted run keeps its
        # checkpoints for --resume, so only this error type removes the folder).
        reporter.close()
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        reporter.close()
    elapsed = time.perf_counter() - t0
    scores = truth.score_map(result.volume, result.voxel_size) if truth is not None else None
    files = run_dir.write_result(result, table, command, scores)
    return RunOutcome(result, table, run_dir, reporter, truth, scores, elapsed, files)
