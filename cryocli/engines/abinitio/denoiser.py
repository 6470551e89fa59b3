"""Cryo2SSNet's denoiser (appendix A.2, section 5.4): a 5-layer MLP auto-encoder on masked, normalised images.

``De(x) = N(MLP(mask * x))`` for a normalised image ``x`` ``(..., n, n)``: a circular mask of the particle
radius removes the noise outside the particle, the first linear layer reduces the ``n^2`` pixels to
``h = n^2 // f`` (``f`` the down-sampling factor), three more keep ``h`` and the last restores ``n^2`` (ReLU
between layers). The bottleneck passes what many images share (the particle's low-resolution views) and
filters the rest (the noise). It is trained once, before the reconstruction, on the masked normalised
particles with the unbiased L2 of eq. 12 (Adam 1e-4, batch 64), and only scores candidates in the beam
search: its outputs are never reconstructed.

What the paper leaves open (its Table 3 of per-protein factors and mask radii is lost), chosen from the data:

* :func:`estimate_particle_radius`: "a rough particle radius ... estimated by taking numerical average over
  the entire dataset" (5.4). The per-pixel variance over the dataset is the signal variance at that pixel
  plus the noise variance; its radial profile minus the background level is the particle's (rotationally
  averaged) signal. The radius is the one holding 95% of that signal, between 0.15 and 0.45 box.
* :func:`choose_factor`: the bottleneck keeps as many values as the images have Fourier pixels where the
  signal is at least as strong as the noise (spectral SNR >= 1 per shell, from the radial power spectrum
  of the particles minus the unit noise power): a linear code of that size can carry every component the
  data resolve per image and little else. ``f = n^2 // h``, between 2 and 256.
* :func:`denoiser_steps`: the paper trains 7,500 steps of 64 images on 10,000 (4AKE) particles, 48 passes
  over the data; smaller sets get 48 passes (at least 200 steps), larger ones at most 7,500 steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from cryocli.engines.abinitio.unbiased_loss import normalise, unbiased_l2
from cryocli.imaging.fourier import radius_2d
from cryocli.imaging.noise import radial_power_spectrum

#: The paper's denoiser schedule (A.2): steps, batch, learning rate, and the dataset it was set for.
PAPER_STEPS, PAPER_BATCH, PAPER_LR, PAPER_PARTICLES = 7500, 64, 1e-4, 10000
#: Passes over the data the paper's schedule makes (7,500 x 64 / 10,000).
PAPER_PASSES = PAPER_STEPS * PAPER_BATCH / PAPER_PARTICLES
MIN_STEPS = 200


class MLPDenoiser(nn.Module):
    """``De``: 5 linear layers ``n^2 -> h -> h -> h -> h -> n^2`` (ReLU between), on ``mask * x``, output normalised.

    n: box (pixels). factor: ``f``, ``h = max(1, n^2 // f)``. mask: ``(n, n)`` float (1 inside the particle radius).
    """

    mask: Tensor

    def __init__(self, n: int, factor: int, mask: Tensor) -> None:
        super().__init__()
        self.n = int(n)
        self.factor = int(factor)
        p = self.n * self.n
        h = max(1, p // self.factor)
        self.net = nn.Sequential(nn.Linear(p, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(),
                                 nn.Linear(h, h), nn.ReLU(), nn.Linear(h, p))
        self.register_buffer("mask", mask.to(torch.float32))

    def forward(self, images: Tensor) -> Tensor:
        """Normalised images ``(..., n, n)`` -> denoised, normalised images ``(..., n, n)``."""
        lead = images.shape[:-2]
        x = (images * self.mask).reshape(-1, self.n * self.n)
        return normalise(self.net(x).reshape(*lead, self.n, self.n))


def circular_mask(n: int, radius: float, device: torch.device | str | None = None) -> Tensor:
    """``(n, n)`` float: 1 within ``radius`` pixels of the centre ``n // 2``, 0 beyond."""
    return (radius_2d(n, device) <= radius).to(torch.float32)


@torch.no_grad()
def estimate_particle_radius(images: Tensor, background: Tensor, fraction: float = 0.8) -> float:
    """Particle radius in pixels from particles ``(N, n, n)`` (see the module docstring).

    background: boolean ``(n, n)``, the pixels whose variance is taken as the noise level. One host sync.
    """
    n = images.shape[-1]
    var = images.var(0)
    signal = torch.clamp(var - var[background].mean(), min=0)
    r = radius_2d(n, images.device)
    shells = torch.clamp(torch.round(r).long(), max=n // 2)
    profile = torch.zeros(n // 2 + 1, device=images.device).index_add_(0, shells.reshape(-1), signal.reshape(-1))
    cumulative = torch.cumsum(profile, 0)
    total = float(cumulative[-1])
    if not total > 0:
        return 0.35 * n
    radius = float(torch.searchsorted(cumulative, torch.tensor(fraction * total, device=images.device)))
    return min(max(radius, 0.15 * n), 0.45 * n)


@torch.no_grad()
def choose_factor(images: Tensor, noise_power: float = 1.0) -> int:
    """The down-sampling factor ``f`` of particles ``(N, n, n)`` whose noise has variance ``noise_power`` per pixel
    (1 for prepared particles): ``n^2 //`` the number of Fourier pixels in shells with spectral SNR >= 1."""
    n = images.shape[-1]
    power = radial_power_spectrum(images.to(torch.float64))
    ssnr = (power - noise_power) / noise_power
    shells = torch.round(radius_2d(n, images.device)).long().reshape(-1)
    count = torch.bincount(shells, minlength=n)[: n // 2 + 1].to(torch.float64)
    kept = float((count * (ssnr.to(count.device) >= 1.0)).sum())
    return int(min(256, max(2, n * n // max(1, int(kept)))))


def denoiser_steps(n_particles: int) -> int:
    """Training steps for ``n_particles``: the paper's 48 passes of batch 64, at least 200, at most 7,500."""
    return int(min(PAPER_STEPS, max(MIN_STEPS, math.ceil(PAPER_PASSES * n_particles / PAPER_BATCH))))


def train_denoiser(denoiser: MLPDenoiser, read_batch: Callable[[Tensor], Tensor], n_particles: int, snr: float,
                   steps: int, generator: torch.Generator, batch_size: int = PAPER_BATCH, lr: float = PAPER_LR,
                   on_step: Callable[[], None] | None = None,
                   sync_gradients: Callable[[Iterable[Tensor]], None] | None = None) -> Tensor:
    """Train ``denoiser`` in place on the particles; returns the mean loss of the last 10% of steps (a tensor).

    read_batch: particle ids ``(B,)`` -> prepared images ``(B, n, n)`` on the denoiser's device. Each step draws
    ``batch_size`` particles at random (``generator``, on the CPU), normalises them, and minimises eq. 12 between
    the normalised masked image (``N(mask * N(I))``, the target the network sees) and its output.
    ``sync_gradients(parameters)``, when given, is called between the backward pass and the step (under torchrun:
    :func:`cryocli.distributed.average_gradients`, each rank drawing from its own particles).
    """
    opt = torch.optim.Adam(denoiser.parameters(), lr=lr)
    denoiser.train()
    tail = max(1, steps // 10)
    total = torch.zeros((), device=denoiser.mask.device)
    for step in range(steps):
        idx = torch.randint(0, n_particles, (min(batch_size, n_particles),), generator=generator)
        x = normalise(read_batch(idx))
        target = normalise(x * denoiser.mask)
        loss = unbiased_l2(target, denoiser(x), snr).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if sync_gradients is not None:
            sync_gradients(denoiser.parameters())
        opt.step()
        if step >= steps - tail:
            total = total + loss.detach()
        if on_step is not None:
            on_step()
    denoiser.eval()
    return total / tail
