"""In-plane translations as phase ramps on the half transforms of :mod:`cryocli.imaging.fourier`.

Sign convention: :func:`phase_shift` by ``s = (sx, sy)`` pixels multiplies the spectrum by
``exp(-2 pi i (kx sx + ky sy))`` (k in cycles per pixel), which translates the real-space image by
``+s``: the content at pixel ``p`` moves to ``p + s``. RELION origins (``rlnOriginX/YAngst``) put the
particle centre at ``box centre - origin``, so centring an experimental image shifts it by ``+origin``
(:func:`shift_to_center`, what ``relion_reconstruct`` and ``relion_refine`` do) and simulating a
particle at its recorded position shifts a centred projection by ``-origin`` (:func:`shift_from_center`,
what ``relion_project`` does).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from cryocli.imaging.fourier import rfft_frequencies


def phase_ramp(shifts_px: Tensor, n: int) -> Tensor:
    """``exp(-2 pi i (kx sx + ky sy))`` on the half-transform grid of box ``n``.

    shifts_px: ``(B, 2)`` translations ``[x, y]`` in pixels (float). Returns ``(B, n, n // 2 + 1)``
    complex, in the complex dtype matching ``shifts_px`` (float64 -> complex128, else complex64).
    """
    ky, kx = rfft_frequencies(n, device=shifts_px.device, dtype=torch.float64)
    s = shifts_px.to(torch.float64)
    phase = -2.0 * math.pi * (kx * s[:, 0, None, None] + ky * s[:, 1, None, None])
    ramp = torch.polar(torch.ones_like(phase), phase)
    return ramp.to(torch.complex128 if shifts_px.dtype == torch.float64 else torch.complex64)


def phase_shift(spectra: Tensor, shifts_px: Tensor, n: int) -> Tensor:
    """Translate images, given as half transforms ``(B, n, n // 2 + 1)``, by ``+shifts_px`` pixels.

    shifts_px: ``(B, 2)`` ``[x, y]`` in pixels; x is the column (fast) axis, y the row axis.
    """
    ramp = phase_ramp(shifts_px.to(spectra.real.dtype), n)
    return spectra * ramp.to(spectra.dtype)


def shift_to_center(spectra: Tensor, origins_angstrom: Tensor, pixel_size: float) -> Tensor:
    """Centre experimental images: translate by ``+origin`` (RELION origins in Angstrom, ``(B, 2)`` [x, y])."""
    n = spectra.shape[-2]
    return phase_shift(spectra, origins_angstrom.to(spectra.real.dtype) / pixel_size, n)


def shift_from_center(spectra: Tensor, origins_angstrom: Tensor, pixel_size: float) -> Tensor:
    """Place centred projections at their recorded position: translate by ``-origin`` (Angstrom, ``(B, 2)``)."""
    n = spectra.shape[-2]
    return phase_shift(spectra, -origins_angstrom.to(spectra.real.dtype) / pixel_size, n)
