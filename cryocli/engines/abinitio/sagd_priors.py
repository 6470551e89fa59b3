"""Density priors of the SAGD engine (Punjani, Brubaker and Fleet, eq. 5 and section 4 "Comparing Priors").

Each prior is a negative log density ``R(V)`` of a real-space map ``V`` ``(n, n, n)`` (voxels in the units of the
particle images' projections) with its gradient; constants are dropped. The engine adds ``R / K`` (``K``: the
number of minibatches) to each minibatch's objective and truncates negative voxels to 0 after every step
(the positivity of eq. 6), so the priors never see the truncation.

* :class:`ExponentialPrior` (the paper's default): ``p(V) = prod lambda exp(-lambda V_i)``, ``R = lambda sum V_i``,
  gradient ``lambda`` everywhere.
* :class:`CARPrior`: the conditionally autoregressive prior ``V_i | V_-i ~ N(mean of its 26 neighbours,
  sigma_CAR^2)``. Its joint density is the Gaussian Markov random field ``R = V^T (I - W) V / (2 sigma^2)`` with
  ``W`` the 26-neighbour averaging operator (``1/26`` per neighbour, symmetric): its full conditionals are exactly
  the paper's. Voxels beyond the box are 0 (the solvent). Gradient ``(I - W) V / sigma^2``.
* :class:`UniformPrior`: the improper ``p(V_i) propto 1``; ``R = 0``.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor
from torch.nn import functional

PRIORS = ("exponential", "car", "uniform")


class DensityPrior(Protocol):
    """``value(V)``: the negative log prior (a 0-d tensor); ``grad(V)``: its gradient ``(n, n, n)``."""

    name: str

    def value(self, volume: Tensor) -> Tensor: ...

    def grad(self, volume: Tensor) -> Tensor: ...


class ExponentialPrior:
    """Independent exponential voxels with inverse scale ``lam`` (per unit of density)."""

    name = "exponential"

    def __init__(self, lam: float) -> None:
        self.lam = float(lam)

    def value(self, volume: Tensor) -> Tensor:
        return self.lam * volume.sum()

    def grad(self, volume: Tensor) -> Tensor:
        return torch.full_like(volume, self.lam)


def neighbour_mean(volume: Tensor) -> Tensor:
    """``W V``: the mean of each voxel's 26 neighbours (zeros beyond the box), ``(n, n, n)``."""
    kernel = torch.full((1, 1, 3, 3, 3), 1.0 / 26.0, dtype=volume.dtype, device=volume.device)
    kernel[0, 0, 1, 1, 1] = 0.0
    return functional.conv3d(volume[None, None], kernel, padding=1)[0, 0]


class CARPrior:
    """26-neighbour conditionally autoregressive Gaussian prior with conditional standard deviation ``sigma``."""

    name = "car"

    def __init__(self, sigma: float) -> None:
        self.sigma = float(sigma)

    def value(self, volume: Tensor) -> Tensor:
        return (volume * (volume - neighbour_mean(volume))).sum() / (2.0 * self.sigma**2)

    def grad(self, volume: Tensor) -> Tensor:
        return (volume - neighbour_mean(volume)) / self.sigma**2


class UniformPrior:
    """The improper uniform prior: no penalty."""

    name = "uniform"

    def value(self, volume: Tensor) -> Tensor:
        return torch.zeros((), dtype=volume.dtype, device=volume.device)

    def grad(self, volume: Tensor) -> Tensor:
        return torch.zeros_like(volume)


def make_prior(name: str, lam: float, sigma_car: float) -> DensityPrior:
    """The prior called ``name`` (one of :data:`PRIORS`) with its parameter."""
    if name == "exponential":
        return ExponentialPrior(lam)
    if name == "car":
        return CARPrior(sigma_car)
    if name == "uniform":
        return UniformPrior()
    raise ValueError(f"unknown prior {name}")
