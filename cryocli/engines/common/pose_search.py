"""The shared E-step: marginalisation over orientations and in-plane shifts with a Gaussian noise model.

For a batch of particles (half transforms ``X`` ``(B, n, n // 2 + 1)``, already centred on their current
origin), a reference (a padded Fourier grid, :class:`cryocli.imaging.projector.Projector`) and a set of
candidate poses, the log-likelihood of every (rotation, shift) pair is

    log p(X | r, t) = - sum_k |X_k e_t(k) - CTF_k P_r(k)|^2 / (2 sigma^2_k)

over the independent pixels of the half plane with ``0 < |k| <= r_max`` (Fourier pixels; the Friedel
duplicates ``kx = 0, ky < 0`` and the zero frequency are left out), ``e_t`` the phase ramp that moves the
image by ``+t`` pixels (RELION's sign: the refined origin is the current origin plus ``t``) and ``P_r``
the central slice at RELION rotation ``A_r``. Expanding the square,
``log p = Re <X e_t CTF / sigma^2, P_r> - 1/2 <CTF^2 / sigma^2, |P_r|^2> - 1/2 <1 / sigma^2, |X|^2>``:
the first term is one matrix product of all shifted images with all projections (real and imaginary parts
stacked), the second one of the CTF^2 weights with the slice powers. No Python loop runs over particles
or poses. ``profile_scale`` replaces the likelihood by its maximum over a per-(particle, pose) intensity
scale ``a >= 0`` (``-1/2 |X|^2 + 1/2 max(0, cross)^2 / norm``): the first iteration uses it because the
reference's grey scale is arbitrary (RELION's first-iteration scale correction plays that role).

Search strategy (RELION auto-refine): a coarse pass at SO3Grid ``level`` over either the whole grid
(global search) or, per particle, the cells near the previous best pose (local search), times a grid of
shifts (``offset_step`` pixels within ``offset_range``). The coarse posterior keeps its smallest set of
samples holding ``fraction`` (0.999) of the mass, at most ``max_significant`` ("significant samples");
each of them is oversampled once, as RELION's adaptive oversampling: its 8 children at ``level + 1`` times
4 sub-shifts at ``+-step / 4``, and the fine posterior over those decides the best pose and the weights
the M-step backprojects. Rotations are RELION ``A`` matrices; shifts in pixels ``[x, y]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from cryocli.geometry.so3grid import SO3Grid
from cryocli.imaging.projector import DEFAULT_CHUNK_POINTS, half_plane_pixels, padded_box, sample_slices


# ------------------------------------------------------------------------------------------------ pieces


@dataclass
class SearchPixels:
    """Half-plane pixels compared in the likelihood: flat indices into ``n * (n // 2 + 1)``, ``kx``, ``ky``
    (Fourier pixels), all ``(M,)``; ``0 < |k| <= r_max``, Friedel duplicates left out."""

    index: Tensor
    kx: Tensor
    ky: Tensor
    n: int

    @staticmethod
    def build(n: int, r_max: int, device: torch.device | str | None = None) -> "SearchPixels":
        pix, kx, ky = half_plane_pixels(n, r_max, skip_redundant=True, device=device, dtype=torch.float32)
        keep = (kx != 0) | (ky != 0)
        return SearchPixels(pix[keep], kx[keep], ky[keep], int(n))

    def take(self, spectra: Tensor) -> Tensor:
        """``(..., n, n // 2 + 1)`` -> ``(..., M)``."""
        return spectra.reshape(*spectra.shape[:-2], -1)[..., self.index]

    def ramp(self, shifts_px: Tensor) -> Tensor:
        """Phase ramps ``exp(-2 pi i (kx sx + ky sy) / n)`` that move an image by ``+shifts_px`` (``(..., 2)``
        pixels ``[x, y]``) -> ``(..., M)`` complex64."""
        s = shifts_px.to(torch.float32)
        phase = (-2.0 * math.pi / self.n) * (s[..., 0:1] * self.kx + s[..., 1:2] * self.ky)
        return torch.polar(torch.ones_like(phase), phase)


def shift_grid(offset_range: float, offset_step: float, device: torch.device | str | None = None) -> Tensor:
    """RELION's translational search grid: ``(T, 2)`` offsets ``[x, y]`` in pixels, multiples of
    ``offset_step`` with length ``<= offset_range`` (the zero shift first)."""
    if offset_step <= 0 or offset_range < offset_step:
        return torch.zeros((1, 2), device=device)
    k = int(math.floor(offset_range / offset_step + 1e-9))
    r = torch.arange(-k, k + 1, dtype=torch.float32, device=device) * offset_step
    gy, gx = torch.meshgrid(r, r, indexing="ij")
    pts = torch.stack([gx.reshape(-1), gy.reshape(-1)], -1)
    pts = pts[(pts**2).sum(-1) <= offset_range**2 + 1e-6]
    order = torch.argsort((pts**2).sum(-1), stable=True)
    return pts[order]


def sub_shifts(offset_step: float, device: torch.device | str | None = None) -> Tensor:
    """RELION's oversampled translations: the 4 points ``(+-step/4, +-step/4)`` of a shift cell, ``(4, 2)`` px."""
    q = offset_step / 4.0
    return torch.tensor([[-q, -q], [q, -q], [-q, q], [q, q]], dtype=torch.float32, device=device)


def project_pixels(volume_ft: Tensor, rotations: Tensor, pixels: SearchPixels, pad: float) -> Tensor:
    """Central slices of a padded Fourier grid at the search pixels: rotations ``(..., 3, 3)`` -> ``(..., M)``."""
    lead = rotations.shape[:-2]
    rot = rotations.reshape(-1, 3, 3).to(volume_ft.real.dtype)
    scale = padded_box(pixels.n, pad) / pixels.n
    vals = sample_slices(volume_ft, rot, pixels.kx, pixels.ky, scale, DEFAULT_CHUNK_POINTS)
    return vals.reshape(*lead, -1)


def pose_log_likelihoods(weighted: Tensor, projections: Tensor, ctf2_inv: Tensor, x2: Tensor,
                         profile_scale: bool = False) -> tuple[Tensor, Tensor]:
    """Log-likelihoods of every (shift, rotation) pair, and the intensity scale used.

    weighted: ``X e_t CTF / sigma^2`` ``(B, T, M)`` complex; projections ``(R, M)`` (shared by the batch) or
    ``(B, R, M)`` (per particle); ctf2_inv: ``CTF^2 / sigma^2`` ``(B, M)``; x2: ``sum |X|^2 / sigma^2`` ``(B,)``.
    Returns ``(loglik (B, T, R), scale (B, T, R))``; scale is 1 unless ``profile_scale``.
    """
    wr, wi = _parts(weighted)
    pr, pi = _parts(projections)
    if projections.dim() == 2:
        cross = wr @ pr.T + wi @ pi.T
        norm = ctf2_inv @ (pr * pr + pi * pi).T  # (B, R)
    else:
        cross = torch.bmm(wr, pr.transpose(1, 2)) + torch.bmm(wi, pi.transpose(1, 2))
        norm = torch.bmm(ctf2_inv[:, None, :], (pr * pr + pi * pi).transpose(1, 2))[:, 0]
    return _combine(cross, norm[:, None, :], x2[:, None, None], profile_scale)


def _parts(z: Tensor) -> tuple[Tensor, Tensor]:
    """Contiguous real and imaginary parts (strided views make CPU matrix products ~100x slower)."""
    return z.real.contiguous(), z.imag.contiguous()


def _combine(cross: Tensor, norm: Tensor, x2: Tensor, profile_scale: bool) -> tuple[Tensor, Tensor]:
    if profile_scale:
        pos = cross.clamp_min(0)
        scale = pos / norm.clamp_min(1e-30)
        return -0.5 * x2 + 0.5 * pos * scale, scale
    return cross - 0.5 * norm - 0.5 * x2, torch.ones_like(cross)


def significant_samples(log_lik: Tensor, fraction: float, max_count: int) -> tuple[Tensor, Tensor, Tensor]:
    """The smallest set of samples holding ``fraction`` of each row's posterior mass (at most ``max_count``).

    log_lik: ``(B, N)`` (``-inf`` for invalid samples). Returns ``(index (B, K), weight (B, K), count (B,))``
    with the samples sorted by decreasing weight; weights are renormalised over the kept samples and 0 in
    padded slots (``K = max count``).
    """
    prob = torch.softmax(log_lik, dim=1)
    k = min(max_count, log_lik.shape[1])
    top, idx = torch.topk(prob, k, dim=1)
    before = torch.cumsum(top, dim=1) - top
    keep = before < fraction
    keep[:, 0] = True
    count = keep.sum(1)
    kmax = int(count.max())
    top, idx, keep = top[:, :kmax], idx[:, :kmax], keep[:, :kmax]
    w = torch.where(keep, top, torch.zeros_like(top))
    return idx, w / w.sum(1, keepdim=True), count


# ------------------------------------------------------------------------------------------------ search


@dataclass
class PoseSearchResult:
    """E-step result for a batch of ``B`` particles.

    rotations ``(B, 3, 3)`` and shifts ``(B, 2)`` (pixels, relative to the search centre): the most probable
    fine sample. sample_rotations ``(B, S, 3, 3)``, sample_shifts ``(B, S, 2)``, sample_weights ``(B, S)``
    (posterior weights, 0 in padded slots, each row sums to 1) and sample_scales ``(B, S)``: the significant
    fine samples for the M-step. best_scale ``(B,)``: the intensity scale at the best pose (1 unless
    ``profile_scale``). max_prob ``(B,)``: the largest fine posterior weight (rlnMaxValueProbDistribution).
    n_significant ``(B,)``: coarse samples kept (rlnNrOfSignificantSamples). log_likelihood ``(B,)``: log of
    the coarse marginal likelihood under a uniform prior over the searched samples, without the Gaussian
    normalisation constant (rlnLogLikeliContribution). fine_ids ``(B,)``: SO3Grid cell id at ``level + 1``
    of the best rotation.
    """

    rotations: Tensor
    shifts: Tensor
    sample_rotations: Tensor
    sample_shifts: Tensor
    sample_weights: Tensor
    sample_scales: Tensor
    best_scale: Tensor
    max_prob: Tensor
    n_significant: Tensor
    log_likelihood: Tensor
    fine_ids: Tensor


class PoseSearcher:
    """Coarse-to-fine pose search against one reference.

    volume_ft: the reference's padded Fourier grid (``Projector(...).volume_ft``) for box ``n`` and ``pad``.
    grid: the SO3Grid; level: coarse level (the fine pass uses ``level + 1``). r_max: Fourier radius in
    pixels compared. offset_range, offset_step: the translational search in pixels. fraction,
    max_significant: the significant-sample rule. profile_scale: see the module docstring.
    """

    def __init__(self, volume_ft: Tensor, n: int, pad: float, grid: SO3Grid, level: int, r_max: int,
                 offset_range: float, offset_step: float, fraction: float = 0.999, max_significant: int = 32,
                 profile_scale: bool = False) -> None:
        self.volume_ft = volume_ft
        self.n, self.pad, self.grid, self.level = int(n), pad, grid, int(level)
        self.device = volume_ft.device
        self.pixels = SearchPixels.build(self.n, int(r_max), self.device)
        self.shifts = shift_grid(offset_range, offset_step, self.device)
        self.sub = sub_shifts(offset_step if offset_range >= offset_step > 0 else 1.0, self.device)
        if offset_step <= 0 or offset_range < offset_step:
            self.sub = torch.zeros((1, 2), device=self.device)
        self.fraction, self.max_significant = fraction, int(max_significant)
        self.profile_scale = profile_scale
        self._global: Tensor | None = None

    def global_projections(self) -> Tensor:
        """Slices at every cell of the coarse level ``(R, M)`` (computed once, reused by every batch)."""
        if self._global is None:
            self._global = project_pixels(self.volume_ft, self.grid.rotations(self.level).to(self.device),
                                          self.pixels, self.pad)
        return self._global

    def search(self, images_ft: Tensor, ctf: Tensor | None, sigma2: Tensor, candidate_ids: Tensor | None = None,
               candidate_valid: Tensor | None = None) -> PoseSearchResult:
        """Search one batch.

        images_ft ``(B, n, n // 2 + 1)`` complex, centred on the current origins; ctf ``(B, n, n // 2 + 1)``
        or None; sigma2 ``(B, n, n // 2 + 1)`` noise variance per pixel. candidate_ids ``(B, K)``: coarse
        cells to search per particle (local search; ``candidate_valid`` masks padding); None: all cells.
        """
        px = self.pixels
        x = px.take(images_ft).to(torch.complex64)
        c = px.take(ctf).to(torch.float32) if ctf is not None else torch.ones(x.shape, device=x.device)
        inv = 1.0 / px.take(sigma2).to(torch.float32)
        b = x.shape[0]
        x2 = (inv * (x.real**2 + x.imag**2)).sum(1)
        ctf2_inv = c * c * inv
        ramps = px.ramp(self.shifts)  # (T, M)
        weighted = (x * c * inv)[:, None, :] * ramps[None]
        if candidate_ids is None:
            proj = self.global_projections()
            n_rot = proj.shape[0]
            ids = None
        else:
            ids = torch.where(candidate_valid, candidate_ids, candidate_ids[:, :1].clamp_min(0))
            proj = project_pixels(self.volume_ft, self.grid.rotations(self.level, ids).to(self.device), px, self.pad)
            n_rot = ids.shape[1]
        loglik, _ = pose_log_likelihoods(weighted, proj, ctf2_inv, x2, self.profile_scale)  # (B, T, R)
        loglik = loglik.transpose(1, 2)  # (B, R, T)
        if candidate_valid is not None:
            loglik = loglik.masked_fill(~candidate_valid[:, :, None], -math.inf)
        n_t = self.shifts.shape[0]
        flat = loglik.reshape(b, -1)
        n_valid = (n_rot if candidate_valid is None else candidate_valid.sum(1)) * n_t
        log_marginal = torch.logsumexp(flat, 1) - torch.log(torch.as_tensor(n_valid, dtype=flat.dtype,
                                                                            device=flat.device))
        idx, _, count = significant_samples(flat, self.fraction, self.max_significant)
        coarse_rot, coarse_t = idx // n_t, idx % n_t
        cells = coarse_rot if ids is None else torch.gather(ids, 1, coarse_rot)
        return self._oversample(x, c, inv, x2, cells, coarse_t, count, log_marginal)

    def _oversample(self, x: Tensor, c: Tensor, inv: Tensor, x2: Tensor, cells: Tensor, coarse_t: Tensor,
                    count: Tensor, log_marginal: Tensor) -> PoseSearchResult:
        """Fine pass over the children of the significant coarse samples ``cells`` ``(B, K)`` (level ids)."""
        px = self.pixels
        b, k = cells.shape
        valid = torch.arange(k, device=cells.device)[None, :] < count[:, None]
        children = self.grid.children(self.level, cells.clamp_min(0))  # (B, K, 8)
        rot = self.grid.rotations(self.level + 1, children).to(self.device)  # (B, K, 8, 3, 3)
        proj = project_pixels(self.volume_ft, rot, px, self.pad)  # (B, K, 8, M)
        shifts = self.shifts[coarse_t][:, :, None, :] + self.sub[None, None]  # (B, K, 4, 2)
        weighted = (x * c * inv)[:, None, None, :] * px.ramp(shifts)  # (B, K, 4, M)
        m = proj.shape[-1]
        n_sub = weighted.shape[2]
        wr, wi = (t.reshape(b * k, n_sub, m) for t in _parts(weighted))
        pr, pi = (t.reshape(b * k, 8, m) for t in _parts(proj))
        cross = (torch.bmm(wr, pr.transpose(1, 2)) + torch.bmm(wi, pi.transpose(1, 2))).reshape(b, k, n_sub, 8)
        power = (pr * pr + pi * pi).reshape(b, k * 8, m)
        norm = torch.bmm(power, (c * c * inv)[:, :, None]).reshape(b, k, 8)
        loglik, scale = _combine(cross, norm[:, :, None, :], x2[:, None, None, None], self.profile_scale)
        loglik = loglik.masked_fill(~valid[:, :, None, None], -math.inf)
        flat = loglik.reshape(b, -1)
        idx, weights, _ = significant_samples(flat, self.fraction, self.max_significant)
        kk, rest = idx // (n_sub * 8), idx % (n_sub * 8)
        jj, ii = rest // 8, rest % 8
        bidx = torch.arange(b, device=idx.device)[:, None]
        sample_rot = rot[bidx, kk, ii]
        sample_shift = shifts[bidx, kk, jj]
        sample_scale = scale.reshape(b, -1).gather(1, idx)
        prob = torch.softmax(flat, 1)
        max_prob = prob.gather(1, idx[:, :1])[:, 0]
        return PoseSearchResult(
            rotations=sample_rot[:, 0], shifts=sample_shift[:, 0], sample_rotations=sample_rot,
            sample_shifts=sample_shift, sample_weights=weights, sample_scales=sample_scale,
            best_scale=sample_scale[:, 0], max_prob=max_prob, n_significant=count,
            log_likelihood=log_marginal, fine_ids=children[bidx, kk, ii][:, 0])


def local_candidates(grid: SO3Grid, level: int, previous: Tensor, radius: float) -> tuple[Tensor, Tensor]:
    """Cells at ``level`` within ``radius`` (radians) of each previous best pose ``(B, 3, 3)``: ``(ids, valid)``
    ``(B, K)`` (RELION's local searches around the previous orientation)."""
    ids, _ = grid.cells_within(previous.to(torch.float64), level, radius)
    valid = ids >= 0
    return ids.to(previous.device), valid.to(previous.device)
