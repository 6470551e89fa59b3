"""Scores of a run against a known answer (simulated data): map FSC after alignment, pose errors.

A developer and benchmark aid (``--ground-truth``): it never changes what a run computes.
Units: Angstrom for resolutions and voxel sizes; degrees for pose errors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from cryocli.errors import CryocliError


@dataclass
class GroundTruth:
    """A known map (and optionally known poses) to score a run against: a developer and benchmark aid.

    volume: ``(n, n, n)`` at ``voxel_size`` Angstrom. rotations: ``(N, 3, 3)`` true RELION ``A`` of every
    input particle (table order) or ``None``. every: score the map every this many epochs (and at the
    last one); map scoring aligns the maps (:func:`cryocli.analysis.align.align_maps`, a few seconds at
    small boxes), pose scoring is cheap and done every epoch.
    """

    volume: Tensor
    voxel_size: float
    rotations: Tensor | None = None
    every: int = 1

    def volume_at(self, box: int, voxel_size: float) -> Tensor:
        """The true map Fourier-resampled to an engine's box (same field of view required)."""
        from cryocli.imaging.fourier import fourier_resample_volume

        n = self.volume.shape[-1]
        if abs(n * self.voxel_size - box * voxel_size) > 0.01 * n * self.voxel_size:
            raise CryocliError(f"the ground truth covers {n * self.voxel_size:.1f} A but the particles cover "
                               f"{box * voxel_size:.1f} A; give a map of the same field of view")
        return fourier_resample_volume(self.volume.to(torch.float32), box)

    def score_map(self, volume: Tensor, voxel_size: float) -> dict[str, Any]:
        """FSC of ``volume`` against the truth after aligning it (rotation, shift, hand).

        Returns ``fsc`` (per shell), ``frequency`` (1/A), ``res_fsc05``/``res_fsc0143`` (Angstrom, the
        interpolated crossings; Nyquist when never crossed), ``aligned`` (the aligned map) and ``flipped``.
        """
        from cryocli.analysis.align import align_maps
        from cryocli.analysis.fsc import fsc_curve, shell_frequency, threshold_crossing

        n = volume.shape[-1]
        truth = self.volume_at(n, voxel_size)
        vol = volume.detach().to("cpu", torch.float32)
        alignment = align_maps(truth, vol, voxel_size)
        fsc = fsc_curve(truth, alignment.aligned_map)
        return {"fsc": fsc, "frequency": shell_frequency(n, voxel_size),
                "res_fsc05": threshold_crossing(fsc, n, voxel_size, 0.5).resolution,
                "res_fsc0143": threshold_crossing(fsc, n, voxel_size, 0.143).resolution,
                "aligned": alignment.aligned_map, "flipped": alignment.flipped}

    def score_poses(self, rotations: Tensor, rows: np.ndarray) -> dict[str, float]:
        """Rotation errors (degrees) of estimated poses of the particles at ``rows`` after the best global
        rotation and hand (:func:`cryocli.analysis.align.pose_errors_after_alignment`)."""
        from cryocli.analysis.align import pose_errors_after_alignment

        if self.rotations is None:
            return {}
        true = self.rotations[torch.as_tensor(rows)].to(torch.float64)
        err = pose_errors_after_alignment(rotations.detach().to("cpu", torch.float64), true)
        return {"rot_err_median": float(np.median(err)), "rot_err_mean": float(np.mean(err))}

    def check_matches(self, particles: int, box: int, voxel_size: float) -> None:
        """Refuse, before any work, a truth that cannot score a run on ``particles`` images of ``box``
        pixels at ``voxel_size`` Angstrom (another field of view, or poses for another number of particles)."""
        n = self.volume.shape[-1]
        if abs(n * self.voxel_size - box * voxel_size) > 0.01 * n * self.voxel_size:
            raise CryocliError(f"the ground truth covers {n * self.voxel_size:.1f} A but the particles cover "
                               f"{box * voxel_size:.1f} A; give a map of the same field of view")
        if self.rotations is not None and len(self.rotations) != particles:
            raise CryocliError(f"the ground-truth poses are for {len(self.rotations)} particles, the run has "
                               f"{particles}")
        if not bool(torch.isfinite(self.volume).all()) or not bool(self.volume.abs().sum() > 0):
            raise CryocliError("the ground-truth map is empty or not finite")
