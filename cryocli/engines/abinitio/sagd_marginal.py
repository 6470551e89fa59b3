"""The importance-sampled marginal likelihood of a batch of particles (Punjani et al. eq. 2, 4, 12-13, 18-19).

For particle ``b`` with unitary half transform ``X`` (``rfft2 / n``: the real-space noise ``sigma`` holds per
Fourier pixel, ``E|noise_k|^2 = sigma^2``), CTF ``C`` and the compared half-plane pixels ``0 < |k| <= omega``
(Friedel mates and the zero frequency left out, :class:`~cryocli.engines.common.pose_search.SearchPixels`),

    log p(X | R, t, V) = - sum_k |X_k e_t(k) - C_k P_R(k) / n|^2 / sigma^2

up to a constant (each independent complex pixel carries two real values of variance ``sigma^2 / 2``), with
``P_R`` the shared projector's central slice of ``V`` (:func:`~cryocli.engines.common.pose_search.project_pixels`,
the unnormalised DFT of the projection, hence ``/ n``) and ``e_t`` the phase ramp that moves the image by ``t``
(the particle's RELION origin is ``t``). The cross and power terms are the batched products of
:mod:`~cryocli.engines.common.pose_search`: one matrix product of all shifted images with all projections when every
point is evaluated (the first visit; projections shared by the batch, the paper's footnote 1), and per particle
a batched product with its gathered projections otherwise.

:func:`marginal` returns per particle ``log p_hat = logsumexp(log L + log v_dir + log v_psi + log v_shift)``
(eq. 12, with the Gaussian's normaliser ``-M log(pi sigma^2)``), each sampler's ``log phi`` (eq. 13 and its
analogues), the most probable evaluated point and the self-normalised expected squared error of eq. 18-19
(unitary units, summed over the compared pixels).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from cryocli.engines.abinitio.importance_sampling import SampleSet
from cryocli.engines.common.log_weights import exp_floored
from cryocli.engines.common.pose_search import SearchPixels, project_pixels
from cryocli.imaging.ctf import CTFParams, ctf_at
from cryocli.imaging.projector import fourier_volume

#: Padding of the shared projector's Fourier grid (RELION's 2).
PAD = 2.0

#: Bytes of the largest temporaries of one particle chunk.
CHUNK_BYTES = 96 * 2**20
#: Cost of a gathered projection relative to one column of the shared product (measured on CPU at 32 px: 2.2 s for
#: 200 particles x 4,608 gathered rotations against 0.45 s for the shared product with 13 shifts). Where a batch draws
#: more than ``R / GATHER_COST`` rotations per particle the drawn terms are read from the shared product over all
#: ``R`` rotations instead: the same terms, the same estimate, computed the cheaper way.
GATHER_COST = 5


@dataclass
class BatchPixels:
    """A batch on the compared pixels: ``xr, xi (B, M)`` the unitary spectra, ``ctf (B, M)``, ``inv`` = 2 / sigma^2."""

    xr: Tensor
    xi: Tensor
    ctf: Tensor
    inv: float


@dataclass
class Marginal:
    """Per particle: log_p ``(B,)``; log_phi_dir/psi/shift ``(B, K_*)`` in the sample sets' slot order; best_dir,
    best_psi, best_shift ``(B,)`` quadrature indices of the most probable evaluated point; expected_sq_error
    ``(B,)``; evaluated ``(B,)`` distinct points evaluated."""

    log_p: Tensor
    log_phi_dir: Tensor
    log_phi_psi: Tensor
    log_phi_shift: Tensor
    best_dir: Tensor
    best_psi: Tensor
    best_shift: Tensor
    expected_sq_error: Tensor
    evaluated: Tensor


def ctf_on_pixels(params: CTFParams | None, pixels: SearchPixels, batch: int, pixel_size: float,
                  device: torch.device) -> Tensor:
    """CTFs ``(B, M)`` at the compared pixels (ones without CTF); pixel size in A."""
    if params is None:
        return torch.ones((batch, pixels.index.numel()), device=device)
    scale = 1.0 / (pixels.n * pixel_size)
    return ctf_at(params.to(pixels.kx.device), pixels.kx * scale, pixels.ky * scale).to(torch.float32)


def batch_pixels(spectra: Tensor, ctf: Tensor, pixels: SearchPixels, sigma: float) -> BatchPixels:
    """A batch's unitary half transforms ``(B, n, n // 2 + 1)`` and CTFs ``(B, M)`` on the compared pixels, noise
    ``sigma`` per real-space pixel."""
    x = pixels.take(spectra)
    return BatchPixels(x.real.contiguous(), x.imag.contiguous(), ctf, 2.0 / sigma**2)


def project_quadrature(volume: Tensor, rotations: Tensor, pixels: SearchPixels, radius: int) -> tuple[Tensor, Tensor]:
    """Unitary central slices ``(R, M)`` (real, imaginary) of the real map ``volume (n, n, n)`` at ``rotations
    (R, 3, 3)`` on the compared pixels (``|k| <= radius``) with the shared projector; differentiable in ``volume``."""
    vft = fourier_volume(volume, PAD, radius + 1)
    proj = project_pixels(vft, rotations, pixels, PAD) / pixels.n
    return proj.real.contiguous(), proj.imag.contiguous()


def _chunk_log_lik(data: BatchPixels, proj: tuple[Tensor, Tensor], power: Tensor, ramps: tuple[Tensor, Tensor],
                   sets: tuple[SampleSet, SampleSet, SampleSet], n_psi: int) -> Tensor:
    """``log L (b, K_t, K_d, K_p)`` of a chunk (padded slots included; masked by the caller). ``power``: ``|P|^2``
    ``(R, M)`` of the projections."""
    d, p, t = sets
    c = data.ctf
    wr, wi = data.xr * c * data.inv, data.xi * c * data.inv
    c2inv = c * c * data.inv
    x2 = (data.inv * (data.xr**2 + data.xi**2)).sum(1)
    b = wr.shape[0]
    if t.full:
        rr, ri = ramps[0][None], ramps[1][None]
    else:
        rr, ri = ramps[0][t.index], ramps[1][t.index]  # (b, K_t, M)
    sr = wr[:, None, :] * rr - wi[:, None, :] * ri
    si = wr[:, None, :] * ri + wi[:, None, :] * rr
    pr, pi = proj
    norm = c2inv @ power.T  # (b, R): one product, read at the drawn rotations below
    kt = sr.shape[1]
    if d.full and p.full:
        cross = sr @ pr.T + si @ pi.T  # (b, K_t, R)
    else:
        ids = (d.index[:, :, None] * n_psi + p.index[:, None, :]).reshape(b, -1)
        norm = norm.gather(1, ids)
        if ids.shape[1] * GATHER_COST >= pr.shape[0]:
            # Most rotations drawn: the shared product over all of them is cheaper than gathering projections.
            cross = (sr @ pr.T + si @ pi.T).gather(2, ids[:, None, :].expand(b, kt, ids.shape[1]))
        else:
            gr, gi = pr[ids], pi[ids]  # (b, K, M)
            cross = torch.bmm(sr, gr.transpose(1, 2)) + torch.bmm(si, gi.transpose(1, 2))
    loglik = cross - 0.5 * norm[:, None, :] - 0.5 * x2[:, None, None]
    return loglik.reshape(b, kt, d.index.shape[1], p.index.shape[1])


def _take(s: SampleSet, q: slice) -> SampleSet:
    return SampleSet(s.index[q], s.log_v[q], s.size, s.full)


def marginal(data: BatchPixels, proj: tuple[Tensor, Tensor], ramps: tuple[Tensor, Tensor],
             sets: tuple[SampleSet, SampleSet, SampleSet], log_w: tuple[Tensor, Tensor, Tensor]) -> Marginal:
    """The batch's marginal likelihoods and sampler statistics (see the module docstring).

    proj: real and imaginary projections ``(R, M)`` of the quadrature rotations (``R = M_d * M_psi``, already
    divided by ``n``); ramps: real and imaginary shift ramps ``(M_t, M)``; sets: direction, in-plane, shift draws;
    log_w: the three quadrature log weights. Differentiable in ``proj`` through ``log_p``.
    """
    b, m = data.xr.shape
    d, p, t = sets
    n_rot = proj[0].shape[0]
    k_rot = d.index.shape[1] * p.index.shape[1]
    dense = (d.full and p.full) or k_rot * GATHER_COST >= n_rot
    k = t.index.shape[1] * (n_rot if dense else k_rot)
    per_particle = 4 * k * (8 if dense else 6 + 3 * m // max(1, t.index.shape[1]))
    power = proj[0] * proj[0] + proj[1] * proj[1]
    chunk = max(1, CHUNK_BYTES // max(1, per_particle))
    parts = []
    for s in range(0, b, chunk):
        q = slice(s, s + chunk)
        sub = BatchPixels(data.xr[q], data.xi[q], data.ctf[q], data.inv)
        sub_sets = (_take(d, q), _take(p, q), _take(t, q))
        loglik = _chunk_log_lik(sub, proj, power, ramps, sub_sets, p.size)
        parts.append(_reduce(loglik, sub_sets, log_w, data.inv))
    out = Marginal(*(torch.cat([part[i] for part in parts]) for i in range(9)))
    # The Gaussian's normaliser, 1 / (pi sigma^2) per compared complex pixel: a constant, so that log_p is the
    # log density of the compared pixels (the figure whose relative error the paper's Fig. 6 shows).
    out.log_p = out.log_p - m * math.log(2.0 * math.pi / data.inv)
    return out


def _reduce(loglik: Tensor, sets: tuple[SampleSet, SampleSet, SampleSet], log_w: tuple[Tensor, Tensor, Tensor],
            inv: float) -> tuple[Tensor, ...]:
    """Every per-particle figure from one pass of ``exp`` over the chunk's terms (the CPU's cost is there)."""
    d, p, t = sets
    lv_d, lv_p, lv_t = d.log_v[:, None, :, None], p.log_v[:, None, None, :], t.log_v[:, :, None, None]
    total = loglik + lv_t + lv_d + lv_p  # (b, K_t, K_d, K_p), -inf in padded slots
    b = loglik.shape[0]
    with torch.no_grad():
        flat = total.detach().reshape(b, -1)
        top = flat.max(1).values
        terms = exp_floored(flat - top[:, None]).reshape(total.shape)
        mass = terms.sum((1, 2, 3))
        log_p_value = top + torch.log(mass)
        weights = terms / mass[:, None, None, None]  # the posterior over the evaluated terms (eq. 18-19)
        ll = loglik.detach()
        e2 = (weights * ll).sum((1, 2, 3)) * (-2.0 / inv)
        wd, wp, wt = log_w[0][d.index], log_w[1][p.index], log_w[2][t.index]

        def marginal_of(axes: tuple[int, ...], own_v: Tensor, own_w: Tensor) -> Tensor:
            # log sum over the other two variables of (L v v) times the point's own weight: log phi (eq. 13).
            s = torch.log(terms.sum(axes)) + top[:, None] - own_v + own_w
            return torch.where(torch.isfinite(own_v), s, torch.full_like(s, -math.inf))

        phi_d = marginal_of((1, 3), d.log_v, wd)
        phi_p = marginal_of((1, 2), p.log_v, wp)
        phi_t = marginal_of((2, 3), t.log_v, wt)
        valid = torch.isfinite(total.detach())
        posterior = ll + wt[:, :, None, None] + wd[:, None, :, None] + wp[:, None, None, :]
        best_flat = torch.where(valid, posterior, torch.full_like(posterior, -math.inf)).reshape(b, -1).argmax(1)
        kd, kp = ll.shape[2], ll.shape[3]
        jt, rest = best_flat // (kd * kp), best_flat % (kd * kp)
        jd, jp = rest // kp, rest % kp
        evaluated = valid.reshape(b, -1).sum(1)
        best = (d.index.gather(1, jd[:, None])[:, 0], p.index.gather(1, jp[:, None])[:, 0],
                t.index.gather(1, jt[:, None])[:, 0])
    # log p with the gradient of logsumexp (the posterior weights) without a second pass of exp.
    finite = torch.where(valid, total, torch.zeros_like(total))
    log_p = (weights * finite).sum((1, 2, 3)) + (log_p_value - (weights * finite.detach()).sum((1, 2, 3)))
    return log_p, phi_d, phi_p, phi_t, best[0], best[1], best[2], e2, evaluated
