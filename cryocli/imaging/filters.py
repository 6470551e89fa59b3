"""Fourier filters on cubic maps, as RELION applies them: low-pass with a raised-cosine edge and B-factors.

Maps are ``(n, n, n)`` ``[z, y, x]``; filters act on the half transform ``rfftn`` (``(n, n, n // 2 + 1)``).
Resolutions in Angstrom, B-factors in A^2, voxel sizes in Angstrom.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from cryocli.imaging.fourier import rfftn_radius


def as_float64_tensor(volume: np.ndarray | Tensor, device: torch.device | str | None = None) -> Tensor:
    """A float64 copy of a map (array or tensor) on ``device`` (default: where it is)."""
    t = volume if torch.is_tensor(volume) else torch.tensor(np.asarray(volume))
    return t.to(device=device if device is not None else t.device, dtype=torch.float64)


def map_spectrum(volume: Tensor) -> Tensor:
    """Half transform ``(n, n, n // 2 + 1)`` of a map, normalised so that shell 0 is the mean."""
    return torch.fft.rfftn(volume, norm="forward")


def spectrum_to_map(spectrum: Tensor, n: int) -> Tensor:
    """Inverse of :func:`map_spectrum`: half transform -> real map ``(n, n, n)``."""
    return torch.fft.irfftn(spectrum, s=(n, n, n), norm="forward")


def lowpass_weights(n: int, voxel_size: float, resolution: float, edge_shells: int = 2,
                    device: torch.device | str | None = None) -> Tensor:
    """RELION's low-pass filter on the half transform ``(n, n, n//2+1)``: 1 below, raised cosine across
    ``edge_shells`` shells around shell ``round(n * voxel_size / resolution)``, 0 beyond (resolution in A)."""
    shell = int(np.floor(n * voxel_size / resolution + 0.5))
    half = edge_shells // 2
    lo = max(0.0, (shell - half) / n)
    hi = (shell + half) / n
    r = rfftn_radius(n, device) / n
    width = max(hi - lo, 1e-12)
    ramp = 0.5 + 0.5 * torch.cos(torch.pi * (r - lo) / width)
    return torch.where(r < lo, torch.ones_like(r), torch.where(r > hi, torch.zeros_like(r), ramp))


def lowpass_filter(volume: np.ndarray | Tensor, voxel_size: float, resolution: float, edge_shells: int = 2) -> Tensor:
    """Low-pass a cubic map ``(n, n, n)`` at ``resolution`` (A) with RELION's raised-cosine edge (float64)."""
    v = as_float64_tensor(volume)
    n = v.shape[-1]
    return spectrum_to_map(map_spectrum(v) * lowpass_weights(n, voxel_size, resolution, edge_shells, v.device), n)


def bfactor_weights(n: int, voxel_size: float, bfactor: float, device: torch.device | str | None = None) -> Tensor:
    """``exp(-B |k|^2 / 4)`` (B in A^2, |k| in 1/A) inside the Nyquist sphere and 0 outside, on the half transform."""
    k = rfftn_radius(n, device) / (n * voxel_size)
    inside = k <= 1.0 / (2.0 * voxel_size)
    return torch.where(inside, torch.exp(-(bfactor / 4.0) * k**2), torch.zeros_like(k))


def apply_bfactor(volume: np.ndarray | Tensor, voxel_size: float, bfactor: float) -> Tensor:
    """Multiply the map's Fourier amplitudes by ``exp(-B |k|^2 / 4)`` (negative B sharpens); float64 ``(n, n, n)``."""
    v = as_float64_tensor(volume)
    n = v.shape[-1]
    return spectrum_to_map(map_spectrum(v) * bfactor_weights(n, voxel_size, bfactor, v.device), n)
