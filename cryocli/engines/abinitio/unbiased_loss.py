"""Cryo2SSNet's image normalisation ``N(.)`` and its unbiased L2 loss (eq. 12, appendix A.3), and the SNR it needs.

* :func:`normalise` is ``N(y) = (y - M(y)) / S(y)`` per image (eq. 16): zero mean, unit standard deviation
  over the ``n^2`` pixels (population standard deviation).
* :func:`unbiased_l2` is ``l2^{gamma,c}(I, I~) = mean_xy (gamma I - I~)^2 - c`` with ``gamma = sqrt(1 + 1/s)``,
  ``c = 1/s`` for the data's SNR ``s`` (eq. 12). For a normalised noisy image ``I = N(d + e)`` its expectation
  over the noise is the plain L2 between the normalised *clean* image ``N(d)`` and ``I~`` (Theorem 1).
  Since both images are normalised, ``mean (gamma I - I~)^2 = gamma^2 + 1 - 2 gamma rho`` with ``rho`` their
  Pearson correlation, and ``gamma^2 - c = 1``: the loss is ``2 - 2 gamma rho``. The SNR only scales the
  gradient, which is why a slightly overestimated SNR is harmless (section 4.4) and why Adam (scale
  invariant) trains the same with any ``s``; the value still sets the loss reported.
* :func:`estimate_snr`: the SNR of prepared particles when the user gives none.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

#: Smallest SNR an estimate returns (a dataset whose images carry no measurable signal).
MIN_SNR = 1e-3


def normalise(images: Tensor, eps: float = 1e-8) -> Tensor:
    """``N(.)`` over the last two axes: ``(..., n, n)`` -> zero mean, unit (population) standard deviation."""
    mean = images.mean((-2, -1), keepdim=True)
    centred = images - mean
    std = torch.sqrt(centred.square().mean((-2, -1), keepdim=True) + eps)
    return centred / std


def loss_constants(snr: float) -> tuple[float, float]:
    """``(gamma, c) = (sqrt(1 + 1/s), 1/s)`` of eq. 12 for the SNR ``s`` (linear, > 0); ``s = inf`` gives ``(1, 0)``."""
    if not snr > 0:
        raise ValueError(f"the SNR must be positive (got {snr})")
    if math.isinf(snr):
        return 1.0, 0.0
    return math.sqrt(1.0 + 1.0 / snr), 1.0 / snr


def unbiased_l2(observed: Tensor, model: Tensor, snr: float) -> Tensor:
    """Eq. 12 per image: ``mean_xy (gamma * observed - model)^2 - c``.

    observed: normalised noisy images ``N(I)`` ``(..., n, n)``; model: normalised model images ``(..., n, n)``
    (broadcast against ``observed``); snr: the data's SNR (linear). Returns ``(...)``; its expectation over
    the noise is ``mean_xy (N(clean) - model)^2``.
    """
    gamma, c = loss_constants(snr)
    return (gamma * observed - model).square().mean((-2, -1)) - c


@torch.no_grad()
def estimate_snr(images: Tensor, background: Tensor) -> float:
    """SNR of particles ``(N, n, n)`` as the paper defines it (eq. 20): variance of the clean image over the whole
    box divided by the noise variance.

    The noise variance is the smaller of two estimates that signal can only raise: the pixel variance of the
    ``background`` (boolean ``(n, n)``, pixels beyond the particle, where the tails of its CTF fringes remain) and
    the mean power of the outer Fourier shells (``|k| >= 0.8 n / 2``, where the signal has faded). The clean
    variance is the mean per-image variance over the box minus that. What signal is left in the noise estimate
    makes the SNR slightly low. Returns at least :data:`MIN_SNR`. One host sync (called once per run).
    """
    from cryocli.imaging.noise import radial_power_spectrum

    n = images.shape[-1]
    outer = radial_power_spectrum(images)[int(math.ceil(0.8 * (n // 2))):].mean()
    noise = torch.minimum(images[:, background].var(), outer.to(images.dtype))
    total = images.var(dim=(-2, -1), unbiased=False).mean()
    snr = float((total - noise) / noise)
    return snr if math.isfinite(snr) and snr > MIN_SNR else MIN_SNR
