"""Fourier shell correlation, in RELION's shells.

Shell ``s`` holds the Fourier voxels with ``round(|k| in pixels) == s``; its spatial frequency is
``s / (n * apix)`` 1/A and its resolution ``n * apix / s`` A. Shells run from 0 to ``n // 2`` (Nyquist).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from cryocli.imaging.fourier import shell_index_3d, volume_to_fft


def _as_tensor(volume: np.ndarray | Tensor) -> Tensor:
    return torch.as_tensor(np.asarray(volume) if not torch.is_tensor(volume) else volume).to(torch.float64)


def fsc_curve(map1: np.ndarray | Tensor, map2: np.ndarray | Tensor) -> np.ndarray:
    """FSC between two cubic maps of box ``n``: array of length ``n // 2 + 1`` indexed by shell.

    Shell 0 holds the zero frequency alone; shells with no signal power give 0.
    """
    a, b = _as_tensor(map1), _as_tensor(map2)
    if a.shape != b.shape:
        raise ValueError(f"maps differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    n = a.shape[-1]
    fa, fb = volume_to_fft(a), volume_to_fft(b)
    shells = shell_index_3d(n).reshape(-1)
    keep = shells <= n // 2
    idx = shells[keep]
    nshell = n // 2 + 1

    def shell_sum(values: Tensor) -> Tensor:
        return torch.zeros(nshell, dtype=values.dtype).index_add_(0, idx, values.reshape(-1)[keep])

    num = shell_sum((fa * fb.conj()).real)
    den = torch.sqrt(shell_sum(fa.abs() ** 2) * shell_sum(fb.abs() ** 2))
    curve = torch.where(den > 0, num / den.clamp_min(1e-300), torch.zeros_like(num))
    return curve.numpy()


def shell_resolution(n: int, voxel_size: float) -> np.ndarray:
    """Resolution in Angstrom of each shell 0..n//2 (shell 0 is reported as infinity)."""
    s = np.arange(n // 2 + 1, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return np.where(s > 0, n * voxel_size / np.maximum(s, 1e-12), np.inf)


def shell_frequency(n: int, voxel_size: float) -> np.ndarray:
    """Spatial frequency in 1/A of each shell 0..n//2."""
    return np.arange(n // 2 + 1, dtype=np.float64) / (n * voxel_size)
