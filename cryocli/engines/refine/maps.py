"""M-step pieces shared by the refine methods: weighted backprojection of significant samples, RELION's
MAP reconstruction with tau^2 from the gold-standard FSC, and the low-resolution join of the halves.

Accumulators live on the 2x padded Fourier grid of a
:class:`~cryocli.engines.common.kernel_backprojection.BackProjectorLike` (RELION's trilinear
:class:`cryocli.imaging.projector.BackProjector` or the Gaussian-kernel one): ``data = sum_i sum_s w_is CTF_i X_i e_s / sigma^2`` and
``weight = sum w_is CTF_i^2 / sigma^2`` (posterior weights ``w``, noise spectrum ``sigma^2`` per pixel).
Maps are ``(n, n, n)`` ``[z, y, x]``; resolutions in Angstrom; shells in Fourier pixels of the box ``n``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from cryocli.analysis.fsc import fsc_curve
from cryocli.engines.common.kernel_backprojection import BackProjectorLike
from cryocli.engines.common.pose_search import PoseSearchResult, SearchPixels, merge_samples
from cryocli.engines.common.reconstruct import spectrum_to_map, weighted_spectrum
from cryocli.imaging.filters import lowpass_weights
from cryocli.imaging.fourier import radius2_3d, radius_3d
from cryocli.imaging.projector import grid_radius, half_plane_pixels, padded_box

#: Bytes of the weighted, shifted images of one chunk of particles inserted together.
INSERT_BYTES = 256 * 2**20


def backproject_samples(backprojectors: list[BackProjectorLike], images_ft: Tensor, ctf: Tensor | None,
                        inv_sigma2: Tensor, result: PoseSearchResult, r_max: int) -> None:
    """Insert every significant sample of a batch with its posterior weight into each backprojector.

    images_ft ``(B, n, n // 2 + 1)`` centred on the search centre; ctf and inv_sigma2 the same shape;
    ``result`` from :class:`~cryocli.engines.common.pose_search.PoseSearcher`. Only the half-plane pixels
    with ``|k| <= r_max`` (Fourier pixels) are inserted. The samples of a particle that share a rotation
    (its sub-shifts), and those of all particles of the batch at the same rotation, are summed first,
    ``sum_is w_is CTF_i X_i e_s / sigma_i^2`` with weight ``sum_is w_is CTF_i^2 / sigma_i^2``, so each distinct
    rotation is inserted once per batch (insertion is linear at a fixed rotation). Point-group symmetry is
    applied to the accumulators afterwards (:func:`cryocli.imaging.point_group.symmetrise_accumulators`), as
    RELION does, not by inserting every operator's pose.
    """
    b, n, _ = images_ft.shape
    pix, kx, ky = half_plane_pixels(n, r_max, skip_redundant=True, device=images_ft.device, dtype=torch.float32)
    pixels = SearchPixels(pix, kx, ky, n)
    # Particles in chunks whose weighted, shifted copies ``(b, S, M)`` (complex64, with their float32 weights and
    # phase ramps) stay within INSERT_BYTES.
    per_particle = max(1, result.sample_weights.shape[1] * pix.numel() * 8 * 4)
    chunk = max(1, INSERT_BYTES // per_particle)
    for s in range(0, b, chunk):
        q = slice(s, s + chunk)
        _insert_chunk(backprojectors, pixels, images_ft[q], None if ctf is None else ctf[q], inv_sigma2[q],
                      result.rows(q))


def _insert_chunk(backprojectors: list[BackProjectorLike], pixels: SearchPixels, images_ft: Tensor,
                  ctf: Tensor | None, inv_sigma2: Tensor, result: PoseSearchResult) -> None:
    x = pixels.take(images_ft).to(torch.complex64)
    c = pixels.take(ctf).to(torch.float32) if ctf is not None else torch.ones(x.shape, device=x.device)
    inv = pixels.take(inv_sigma2).to(torch.float32)
    rotation, member = merge_samples(result)
    # Only the samples with weight: a particle's row is padded to the batch's largest count of samples.
    pb, ps = (member >= 0).nonzero(as_tuple=True)
    w = result.sample_weights.to(torch.float32)[pb, ps, None]
    rows = member[pb, ps]
    contrib = (x * c * inv)[pb] * pixels.ramp(result.sample_shifts[pb, ps]) * w  # (P, M)
    data = torch.zeros((rotation.shape[0], x.shape[1]), dtype=torch.complex64, device=x.device)
    data.index_add_(0, rows, contrib)
    weights = torch.zeros((rotation.shape[0], x.shape[1]), dtype=torch.float32, device=x.device)
    weights.index_add_(0, rows, (c * c * inv)[pb] * w)
    rot = rotation.to(torch.float32)
    for backprojector in backprojectors:
        backprojector.insert_pixels(data, weights, rot, pixels.kx, pixels.ky)


def padded_shells(grid_size: int, n: int, pad: float, device: torch.device) -> Tensor:
    """Shell (Fourier pixels of box ``n``, ``round(|k| / (P / n))``) of every voxel of the padded grid ``(G, G, G)``."""
    r = radius_3d(grid_size, device, torch.float64)
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


def _shell_mean_weight(weight: Tensor, n: int, pad: float, r_max: int) -> tuple[Tensor, Tensor, Tensor]:
    """Shell index of each padded-grid voxel ``(G, G, G)``, the voxels within ``r_max`` pixels, and the mean
    weight of each shell ``(n // 2 + 1,)`` float64 over those voxels."""
    g = weight.shape[-1]
    shells = padded_shells(g, n, pad, weight.device)
    big_r = grid_radius(n, pad, r_max)
    inside = radius2_3d(g, weight.device, torch.float64) <= big_r * big_r
    nshell = n // 2 + 1
    idx = shells.clamp(max=nshell - 1)[inside]
    w64 = weight.to(torch.float64)[inside]
    total = torch.zeros(nshell, dtype=torch.float64, device=weight.device).index_add_(0, idx, w64)
    count = torch.zeros(nshell, dtype=torch.float64, device=weight.device).index_add_(0, idx, torch.ones_like(w64))
    return shells, inside, total / count.clamp_min(1)


def shell_tau2(weight: Tensor, n: int, pad: float, ssnr: np.ndarray, r_max: int) -> np.ndarray:
    """The Fourier-shell prior variance ``tau^2 = SSNR / <weight>`` per shell ``(n // 2 + 1,)`` that
    :func:`map_reconstruct` regularises with (RELION's ``rlnReferenceTau2``, in the units of the map's
    padded Fourier transform); zero beyond ``r_max`` and where a shell has no weight."""
    _, _, avg = _shell_mean_weight(weight, n, pad, r_max)
    snr = np.asarray(ssnr, dtype=np.float64)
    mean = avg.cpu().numpy()
    out = np.where(mean > 0, snr / np.maximum(mean, 1e-300), 0.0)
    out[r_max + 1:] = 0.0
    return out


def map_reconstruct(data: Tensor, weight: Tensor, n: int, pad: float, ssnr: np.ndarray, r_max: int) -> Tensor:
    """RELION's MAP reconstruction ``V = data / (weight + 1 / tau^2)`` with ``1 / tau^2(shell) = mean
    weight of the shell / SSNR(shell)`` (``tau^2 = SSNR / <weight>``, the Fourier-shell Gaussian prior),
    then the same inverse transform, soft edge and gridding correction as ``relion_reconstruct``.

    data, weight: symmetrised accumulators ``(G, G, G)``; ssnr: ``(n // 2 + 1,)`` per shell. Voxels beyond
    ``r_max`` pixels are zero.
    """
    nshell = n // 2 + 1
    shells, inside, avg = _shell_mean_weight(weight, n, pad, r_max)
    snr = torch.as_tensor(np.asarray(ssnr, dtype=np.float64), device=data.device)
    inv_tau2 = avg / snr.clamp_min(1e-12)
    denom = weight.to(torch.float64) + inv_tau2[shells.clamp(max=nshell - 1)]
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
