"""Per-shell noise power spectra (RELION's sigma^2) for the Gaussian likelihood in Fourier space.

Images are compared through their half transforms ``rfft2(ifftshift(img))`` (``(n, n // 2 + 1)``,
unnormalised, :mod:`cryocli.imaging.fourier`). The noise at each Fourier pixel is modelled as complex
Gaussian with variance ``sigma^2(shell)`` per real and per imaginary component, so the negative log
likelihood of a residual ``d`` is ``|d|^2 / (2 sigma^2)`` and ``sigma^2 = E|d|^2 / 2`` (RELION's
``wsum_sigma2_noise / (2 * count)``). Shells are ``round(|k|)`` in Fourier pixels, ``0 .. n // 2``; one
spectrum per optics group, shape ``(G, n // 2 + 1)``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from cryocli.imaging.fourier import image_to_rfft, rfft_radius

if TYPE_CHECKING:
    from cryocli.engines.particles import StreamedImages


def pixel_shells(n: int, device: torch.device | str | None = None) -> Tensor:
    """Shell ``round(|k|)`` (Fourier pixels) of every half-transform pixel, ``(n, n // 2 + 1)`` long, capped
    at ``n // 2`` (the corners beyond Nyquist share the last shell)."""
    return torch.floor(rfft_radius(n, device, torch.float64) + 0.5).long().clamp(max=n // 2)


def shell_power(power: Tensor, n: int, groups: Tensor, n_groups: int) -> tuple[Tensor, Tensor]:
    """Sum ``power`` ``(B, n, n // 2 + 1)`` over shells and optics groups -> ``(sums, counts)`` ``(G, n//2+1)``.

    groups: ``(B,)`` 0-based optics group per image. Counts are pixels (images x pixels per shell).
    """
    shells = pixel_shells(n, power.device).reshape(-1)
    nshell = n // 2 + 1
    flat = power.reshape(power.shape[0], -1).to(torch.float64)
    per_image = torch.zeros((power.shape[0], nshell), dtype=torch.float64, device=power.device)
    per_image.index_add_(1, shells, flat)
    ones = torch.zeros(nshell, dtype=torch.float64, device=power.device).index_add_(
        0, shells, torch.ones_like(shells, dtype=torch.float64))
    sums = torch.zeros((n_groups, nshell), dtype=torch.float64, device=power.device)
    sums.index_add_(0, groups.to(power.device), per_image)
    counts = torch.zeros(n_groups, dtype=torch.float64, device=power.device).index_add_(
        0, groups.to(power.device), torch.ones(power.shape[0], dtype=torch.float64, device=power.device))
    return sums, counts[:, None] * ones[None, :]


class NoiseAccumulator:
    """Streams residual power ``|X - CTF P|^2`` batch by batch and returns ``sigma^2`` per group and shell."""

    def __init__(self, n: int, n_groups: int, device: torch.device | str | None = None) -> None:
        self.n, self.n_groups = int(n), int(n_groups)
        nshell = self.n // 2 + 1
        self.sums = torch.zeros((n_groups, nshell), dtype=torch.float64, device=device)
        self.counts = torch.zeros((n_groups, nshell), dtype=torch.float64, device=device)

    def add(self, residual_power: Tensor, groups: Tensor, weights: Tensor | None = None) -> None:
        """Add ``|d|^2`` ``(B, n, n // 2 + 1)`` of images in optics ``groups`` ``(B,)``; ``weights`` ``(B,)``
        (posterior mass, default 1) scale each image's contribution and count."""
        if weights is not None:
            residual_power = residual_power * weights.to(residual_power.dtype)[:, None, None]
        sums, counts = shell_power(residual_power, self.n, groups, self.n_groups)
        if weights is not None:
            w = torch.zeros(self.n_groups, dtype=torch.float64, device=sums.device).index_add_(
                0, groups.to(sums.device), weights.to(torch.float64))
            base = torch.zeros(self.n_groups, dtype=torch.float64, device=sums.device).index_add_(
                0, groups.to(sums.device), torch.ones_like(weights, dtype=torch.float64))
            counts = counts * (w / base.clamp_min(1))[:, None]
        self.sums += sums.to(self.sums.device)
        self.counts += counts.to(self.counts.device)

    def add_pixels(self, residual_power: Tensor, shells: Tensor, groups: Tensor) -> None:
        """Add ``|d|^2`` ``(B, M)`` of a pixel subset whose shells (Fourier pixels, ``round(|k|)``) are
        ``shells`` ``(M,)`` long, for images in optics ``groups`` ``(B,)``; shells the subset does not reach
        get no count (and keep their previous value in :meth:`sigma2`)."""
        nshell = self.n // 2 + 1
        dev = self.sums.device
        shells = shells.to(dev).clamp(max=nshell - 1)
        g = groups.to(dev)
        per_image = torch.zeros((residual_power.shape[0], nshell), dtype=torch.float64, device=dev)
        per_image.index_add_(1, shells, residual_power.to(device=dev, dtype=torch.float64))
        self.sums.index_add_(0, g, per_image)
        ones = torch.zeros(nshell, dtype=torch.float64, device=dev).index_add_(
            0, shells, torch.ones(shells.shape, dtype=torch.float64, device=dev))
        images = torch.zeros(self.n_groups, dtype=torch.float64, device=dev).index_add_(
            0, g, torch.ones(g.shape, dtype=torch.float64, device=dev))
        self.counts += images[:, None] * ones[None, :]

    def sum_over_ranks(self) -> NoiseAccumulator:
        """Add every rank's sums and counts (torchrun, :mod:`cryocli.distributed`); a no-op for one rank."""
        from cryocli import distributed

        distributed.all_reduce_sum(self.sums)
        distributed.all_reduce_sum(self.counts)
        return self

    def sigma2(self, previous: Tensor | None = None) -> Tensor:
        """``sigma^2`` ``(G, n // 2 + 1)`` = mean ``|d|^2 / 2``; shells without data keep ``previous`` (or the
        nearest lower shell's value)."""
        est = torch.where(self.counts > 0, self.sums / (2.0 * self.counts.clamp_min(1)), torch.zeros_like(self.sums))
        empty = self.counts <= 0
        if previous is not None:
            est = torch.where(empty, previous.to(est), est)
        else:
            for s in range(1, est.shape[1]):
                est[:, s] = torch.where(empty[:, s], est[:, s - 1], est[:, s])
        return est.clamp_min(1e-12 * float(est.max().clamp_min(1e-30)))


def sigma2_on_pixels(sigma2: Tensor, n: int, groups: Tensor) -> Tensor:
    """Spread ``sigma2`` ``(G, n // 2 + 1)`` onto the half transform for each image: ``(B, n, n // 2 + 1)``."""
    shells = pixel_shells(n, sigma2.device)
    return sigma2[groups.to(sigma2.device)][:, shells]


def initial_sigma2(images: Tensor | StreamedImages, groups: Tensor, n_groups: int, batch_size: int = 512,
                   across_ranks: bool = False) -> Tensor:
    """Starting noise spectrum from the particles' own power (``|X|^2 / 2`` per shell and group), ``(G, n//2+1)``.

    images: real particle images ``(N, n, n)`` (centred layout of :mod:`cryocli.imaging.fourier`; a tensor or
    images streamed from the stacks), read
    ``batch_size`` at a time; groups: optics group index ``(N,)``. At the low SNR of cryo-EM the image
    power is dominated by noise at all but the lowest shells; the first M-step replaces it with
    residual-based estimates, as RELION does after its first iteration. ``across_ranks``: ``images`` are this
    rank's share (torchrun); the spectrum is that of all ranks' particles.
    """
    acc = NoiseAccumulator(images.shape[-1], n_groups, images.device)
    for start in range(0, images.shape[0], batch_size):
        ft = image_to_rfft(images[start:start + batch_size])
        acc.add(ft.abs() ** 2, groups[start:start + batch_size].to(images.device))
    if across_ranks:
        acc.sum_over_ranks()
    return acc.sigma2()
