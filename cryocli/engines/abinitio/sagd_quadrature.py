"""The quadrature of the SAGD engine's marginal likelihood (Punjani et al. eq. 4 and supplement B) and its kernels.

Orientations are split into viewing directions x in-plane angles (supplement B) and shifts are a third factor:

* directions: the centres of the HEALPix pixels of order ``level`` (``12 * 4^level``, equal areas, so equal weights
  ``1 / M_d``) as RELION's ``rot, tilt``;
* in-plane angles: ``6 * 2^level`` equally spaced ``psi`` (weights ``1 / M_psi``); the pose of (direction ``j``,
  angle ``p``) is ``euler_to_matrix(rot_j, tilt_j, psi_p)``, cell id ``j * M_psi + p`` (the same counts as
  :class:`~cryocli.geometry.so3grid.SO3Grid` level ``level``, whose step is ``60 / 2^level`` degrees);
* shifts: the points of a square grid of step ``shift_step(level)`` pixels within ``extent`` pixels of the box centre
  (:func:`~cryocli.engines.common.pose_search.shift_grid`), weighted by the Gaussian shift prior
  ``N(0, sigma_t^2 I)`` normalised over the points: the prior is counted once, in the weights.

The level follows the current maximum frequency ``omega`` (:func:`level_for`): the coarsest level whose angular
step turns the particle's edge by at most 1.2 x the resolution ``1 / omega`` (RELION's rule for its coarse
sampling, :func:`~cryocli.engines.common.pose_search.coarse_radius`): ``step <= 2.4 / (omega D)`` radians for a
particle of diameter ``D``. The shift step is a third of the distance one angular step moves the particle's
edge, ``step * D / 6``.

Kernels (supplement B) carry probability between the points of two levels: von Mises-Fisher on the sphere for
directions and on the circle for in-plane angles, Gaussian for shifts, with bandwidths equal to the spacing of the
level the values come from (the paper: "the Gaussian shift kernel bandwidth is set to be equal to the spacing"):
``kappa = 1 / spacing^2`` (vMF; its angular standard deviation is ``1 / sqrt(kappa)``) and
``exp(-|t_i - t_j|^2 / (2 spacing^2))``. Each row is normalised over the target points, so a kernel moves mass
without creating any.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor

from cryocli.engines.common.log_weights import softmax_floored
from cryocli.engines.common.pose_search import shift_grid
from cryocli.geometry.rotations import euler_to_matrix
from cryocli.geometry.so3grid import healpix_npix, healpix_pix2ang, healpix_pix2vec

#: RELION's coarse-sampling rule: one angular step moves the particle's edge by at most this many resolutions.
EDGE_RESOLUTIONS = 1.2
#: The shift step is the distance one angular step moves the particle's edge divided by this.
SHIFT_STEP_DIVISOR = 3.0


def angular_step(level: int) -> float:
    """In-plane step of ``level`` in radians, ``2 pi / (6 * 2^level)`` (~ the spacing of its directions)."""
    return 2.0 * math.pi / (6 * 2**level)


def level_for(omega: float, diameter_A: float, max_level: int) -> int:
    """The coarsest level whose angular step is at most ``2 * EDGE_RESOLUTIONS / (omega * diameter)`` (omega in
    1/A, diameter in A), at most ``max_level``."""
    limit = 2.0 * EDGE_RESOLUTIONS / (omega * diameter_A)
    level = 0
    while level < max_level and angular_step(level) > limit:
        level += 1
    return level


@dataclass
class Quadrature:
    """The quadrature points of one level (see the module docstring).

    directions ``(M_d, 3)`` unit vectors; psi ``(M_psi,)`` radians; rotations ``(M_d * M_psi, 3, 3)`` RELION ``A``
    (float32); shifts ``(M_t, 2)`` pixels ``[x, y]``; log weights ``(M_d,)``, ``(M_psi,)``, ``(M_t,)`` (each sums
    to 1); spacings: radians (directions, in-plane) and pixels (shifts).
    """

    level: int
    directions: Tensor
    psi: Tensor
    rotations: Tensor
    shifts: Tensor
    log_w_dir: Tensor
    log_w_psi: Tensor
    log_w_shift: Tensor
    dir_spacing: float
    psi_spacing: float
    shift_spacing: float

    @property
    def sizes(self) -> tuple[int, int, int]:
        return int(self.directions.shape[0]), int(self.psi.shape[0]), int(self.shifts.shape[0])

    @property
    def points(self) -> int:
        d, p, t = self.sizes
        return d * p * t


def build_quadrature(level: int, diameter_px: float, shift_sigma_px: float, shift_extent_px: float,
                     device: torch.device) -> Quadrature:
    """The quadrature of ``level`` for a particle of ``diameter_px`` pixels, shift prior ``shift_sigma_px`` and
    shift points within ``shift_extent_px`` of the centre."""
    return _cached(level, float(diameter_px), float(shift_sigma_px), float(shift_extent_px), str(device))


@lru_cache(maxsize=16)
def _cached(level: int, diameter_px: float, shift_sigma_px: float, shift_extent_px: float, device: str) -> Quadrature:
    n_dir, n_psi = healpix_npix(level), 6 * 2**level
    pix = torch.arange(n_dir)
    theta, phi = healpix_pix2ang(level, pix)
    directions = healpix_pix2vec(level, pix)
    psi = torch.arange(n_psi, dtype=torch.float64) * (2.0 * math.pi / n_psi)
    rot = torch.rad2deg(phi)[:, None].expand(n_dir, n_psi)
    tilt = torch.rad2deg(theta)[:, None].expand(n_dir, n_psi)
    rotations = euler_to_matrix(rot, tilt, torch.rad2deg(psi)[None].expand(n_dir, n_psi)).reshape(-1, 3, 3)
    step = angular_step(level) * diameter_px / (2.0 * SHIFT_STEP_DIVISOR)
    shifts = shift_grid(shift_extent_px, step).to(torch.float64)
    if shift_sigma_px > 0:
        log_prior = -(shifts**2).sum(1) / (2.0 * shift_sigma_px**2)
    else:
        shifts, log_prior = shifts[:1], torch.zeros(1, dtype=torch.float64)
    dev = torch.device(device)
    return Quadrature(
        level=level, directions=directions.to(dev, torch.float32), psi=psi.to(dev, torch.float32),
        rotations=rotations.to(dev, torch.float32), shifts=shifts.to(dev, torch.float32),
        log_w_dir=torch.full((n_dir,), -math.log(n_dir), device=dev),
        log_w_psi=torch.full((n_psi,), -math.log(n_psi), device=dev),
        log_w_shift=torch.log_softmax(log_prior, 0).to(dev, torch.float32),
        dir_spacing=math.sqrt(4.0 * math.pi / n_dir), psi_spacing=2.0 * math.pi / n_psi, shift_spacing=float(step))


def _row_normalise(log_k: Tensor) -> Tensor:
    return softmax_floored(log_k, dim=1)


def direction_kernel(source: Tensor, target: Tensor, spacing: float) -> Tensor:
    """von Mises-Fisher kernel on S^2 from unit vectors ``source (I, 3)`` to ``target (J, 3)``, ``kappa = 1 /
    spacing^2`` (radians); rows sum to 1. ``(I, J)``."""
    kappa = 1.0 / spacing**2
    return _row_normalise(kappa * (source @ target.T - 1.0))


def psi_kernel(source: Tensor, target: Tensor, spacing: float) -> Tensor:
    """von Mises kernel on S^1 from angles ``source (I,)`` to ``target (J,)`` (radians), ``kappa = 1 / spacing^2``;
    rows sum to 1. ``(I, J)``."""
    kappa = 1.0 / spacing**2
    return _row_normalise(kappa * (torch.cos(source[:, None] - target[None, :]) - 1.0))


def shift_kernel(source: Tensor, target: Tensor, spacing: float) -> Tensor:
    """Gaussian kernel ``exp(-|t_i - t_j|^2 / (2 spacing^2))`` from shifts ``source (I, 2)`` to ``target (J, 2)``
    (pixels); rows sum to 1. ``(I, J)``."""
    d2 = ((source[:, None, :] - target[None, :, :]) ** 2).sum(-1)
    return _row_normalise(-d2 / (2.0 * spacing**2))


def kernels(old: Quadrature, new: Quadrature) -> tuple[Tensor, Tensor, Tensor]:
    """The three kernels from the points of ``old`` to those of ``new`` (bandwidths: ``old``'s spacings)."""
    return (direction_kernel(old.directions, new.directions, old.dir_spacing),
            psi_kernel(old.psi, new.psi, old.psi_spacing),
            shift_kernel(old.shifts, new.shifts, old.shift_spacing))
