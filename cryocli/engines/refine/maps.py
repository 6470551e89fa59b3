"""M-step pieces shared by the refine methods: weighted backprojection of significant samples, RELION's
MAP reconstruction with tau^2 from the gold-standard FSC, and the low-resolution join of the halves.

Accumulators live on the 2x padded Fourier grid of :class:`cryocli.imaging.projector.BackProjector`
(or the Gaussian-kernel variant): ``data = sum_i sum_s w_is CTF_i X_i e_s / sigma^2`` and
``weight = sum w_is CTF_i^2 / sigma^2`` (posterior weights ``w``, noise spectrum ``sigma^2`` per pixel).
Maps are ``(n, n, n)`` ``[z, y, x]``; resolutions in Angstrom; shells in Fourier pixels of the box ``n``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from cryocli.analysis.fsc import fsc_curve
from cryocli.engines.common.pose_search import PoseSearchResult
from cryocli.engines.common.reconstruct import spectrum_to_map, weighted_spectrum
from cryocli.imaging.filters import lowpass_weights
from cryocli.imaging.projector import grid_radius, nyquist_mask, padded_box, rotations_with_symmetry
from cryocli.imaging.shifts import phase_ramp


def backproject_samples(backprojector, images_ft: Tensor, ctf: Tensor | None, inv_sigma2: Tensor,
                        result: PoseSearchResult, sym_ops: Tensor | None, r_max: int) -> None:
    """Insert every significant sample of a batch with its posterior weight.

    images_ft ``(B, n, n // 2 + 1)`` centred on the search centre; ctf and inv_sigma2 the same shape;
    ``result`` from :class:`~cryocli.engines.common.pose_search.PoseSearcher`; frequencies beyond ``r_max``
    Fourier pixels are not inserted (weight 0, which the backprojector skips).
    """
    b, n, h = images_ft.shape
    s = result.sample_weights.shape[1]
    c = ctf if ctf is not None else torch.ones(images_ft.shape, device=images_ft.device)
    inside = nyquist_mask(n, r_max, images_ft.device).to(inv_sigma2.dtype)
    base = (images_ft * c * inv_sigma2 * inside).to(torch.complex64)
    w = result.sample_weights.to(torch.float32)
    ramps = phase_ramp(result.sample_shifts.reshape(-1, 2).to(torch.float32), n).reshape(b, s, n, h)
    slices = (base[:, None] * ramps * w[:, :, None, None]).reshape(b * s, n, h)
    weights = ((c * c * inv_sigma2 * inside).to(torch.float32)[:, None] * w[:, :, None, None]).reshape(b * s, n, h)
    rot = result.sample_rotations.reshape(b * s, 3, 3).to(torch.float32)
    keep = w.reshape(-1) > 0
    slices, weights, rot = slices[keep], weights[keep], rot[keep]
    ops = [None] if sym_ops is None else list(sym_ops)
    for op in ops:
        posed = rot if op is None else rotations_with_symmetry(rot, op[None].to(rot))
        backprojector.insert(slices, weights, posed)


def padded_shells(grid_size: int, n: int, pad: float, device: torch.device) -> Tensor:
    """Shell (Fourier pixels of box ``n``, ``round(|k| / (P / n))``) of every voxel of the padded grid ``(G, G, G)``."""
    k = torch.arange(grid_size, device=device, dtype=torch.float64) - grid_size // 2
    r = torch.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2)
    return torch.floor(r / (padded_box(n, pad) / n) + 0.5).long()


def unregularised_map(data: Tensor, weight: Tensor, n: int, pad: float, r_max: int) -> Tensor:
    """``relion_reconstruct``'s map from symmetrised accumulators: data / max(weight, radial floor)."""
    return spectrum_to_map(weighted_spectrum(data, weight, n, pad, r_max), n, pad).to(torch.float32)


def fsc_to_ssnr(fsc: np.ndarray, tau2_fudge: float = 1.0, joined: bool = False) -> np.ndarray:
    """RELION's ``SSNR = fudge * FSC / (1 - FSC)`` per shell (FSC clamped to [0.001, 0.999]); ``joined``
    first turns the half-set FSC into the full-set one, ``2 FSC / (1 + FSC)`` (the final iteration)."""
    f = np.clip(np.asarray(fsc, dtype=np.float64), 0.001, 0.999)
    if joined:
        f = 2 * f / (1 + f)
    return tau2_fudge * f / (1 - f)


def map_reconstruct(data: Tensor, weight: Tensor, n: int, pad: float, ssnr: np.ndarray, r_max: int) -> Tensor:
    """RELION's MAP reconstruction ``V = data / (weight + 1 / tau^2)`` with ``1 / tau^2(shell) = mean
    weight of the shell / SSNR(shell)`` (``tau^2 = SSNR / <weight>``, the Fourier-shell Gaussian prior),
    then the same inverse transform, soft edge and gridding correction as ``relion_reconstruct``.

    data, weight: symmetrised accumulators ``(G, G, G)``; ssnr: ``(n // 2 + 1,)`` per shell. Voxels beyond
    ``r_max`` pixels are zero.
    """
    g = data.shape[-1]
    shells = padded_shells(g, n, pad, data.device)
    big_r = grid_radius(n, pad, r_max)
    k = torch.arange(g, device=data.device, dtype=torch.float64) - g // 2
    inside = (k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2) <= big_r * big_r
    nshell = n // 2 + 1
    idx = shells.clamp(max=nshell - 1)[inside]
    w64 = weight.to(torch.float64)
    total = torch.zeros(nshell, dtype=torch.float64, device=data.device).index_add_(0, idx, w64[inside])
    count = torch.zeros(nshell, dtype=torch.float64, device=data.device).index_add_(0, idx, torch.ones_like(w64[inside]))
    avg = total / count.clamp_min(1)
    snr = torch.as_tensor(np.asarray(ssnr, dtype=np.float64), device=data.device)
    inv_tau2 = avg / snr.clamp_min(1e-12)
    denom = w64 + inv_tau2[shells.clamp(max=nshell - 1)]
    spec = torch.where(inside & (denom > 0), data.to(torch.complex128) / denom.clamp_min(1e-300),
                       torch.zeros((), dtype=torch.complex128, device=data.device))
    return spectrum_to_map(spec, n, pad).to(torch.float32)


def join_low_resolution(map1: Tensor, map2: Tensor, voxel_size: float, resolution: float) -> tuple[Tensor, Tensor]:
    """Replace both halves' Fourier components below ``resolution`` (Angstrom) by their average (RELION's
    ``--low_resol_join_halves``), so the two independent refinements stay in one frame and hand."""
    n = map1.shape[-1]
    low = lowpass_weights(n, voxel_size, resolution, device=map1.device).to(torch.float64)
    f1 = torch.fft.rfftn(map1.to(torch.float64))
    f2 = torch.fft.rfftn(map2.to(torch.float64))
    mean = 0.5 * (f1 + f2)
    out1 = torch.fft.irfftn(f1 + low * (mean - f1), s=(n, n, n))
    out2 = torch.fft.irfftn(f2 + low * (mean - f2), s=(n, n, n))
    return out1.to(map1.dtype), out2.to(map2.dtype)


def half_map_fsc(map1: Tensor, map2: Tensor) -> np.ndarray:
    """FSC per shell of two half maps (RELION's half-transform sums)."""
    return fsc_curve(map1.detach().cpu(), map2.detach().cpu())
