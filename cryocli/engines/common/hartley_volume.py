"""An explicit voxel decoder in the Hartley domain, stored as mantissa and exponent (cryoSPIN eq. 7-8).

The volume is the centred Hartley transform of a real map on the unpadded Fourier grid of
:mod:`cryocli.imaging.projector` with ``pad = 1``: a cube ``(G, G, G)``, ``G = n + 3`` for an even box
``n``, the zero frequency at index ``G // 2``, frequencies ``|k| <= n // 2 + 1`` Fourier pixels kept
(one shell beyond Nyquist so that trilinear reads at Nyquist have both neighbours). Each voxel is
``H(k) = M(k) * exp(E(k))``: Adam then moves the mantissa ``M`` and the exponent ``E`` by steps of
similar size whatever the amplitude of ``H``, which spans several decades from low to high frequency.

Values are in the units of :func:`cryocli.imaging.hartley.image_to_hartley` of a projection (the
unnormalised DFT of the line integral of the map in voxel units), so :meth:`HartleyVolume.to_map` gives
a map in the units of the images.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from cryocli.imaging.fourier import radius_2d, radius_3d
from cryocli.imaging.hartley import hartley_to_volume, project_hartley
from cryocli.imaging.projector import fourier_grid_size, grid_radius


class HartleyVolume(nn.Module):
    """Learnable Hartley volume ``H = M * exp(E)`` for images of box ``n`` (pixels).

    radial_amplitude: ``(n // 2 + 2,)`` expected ``|H|`` per integer Fourier shell (Fourier pixels), used
    for the exponent ``E = log(amplitude(|k|))`` (a smooth initialisation: the right power spectrum, no
    structure). The mantissa starts as white Gaussian noise of standard deviation ``mantissa_std`` (a
    random start); voxels beyond the kept radius are fixed at zero.
    """

    support: Tensor  # a buffer, registered in __init__

    def __init__(self, n: int, radial_amplitude: Tensor, mantissa_std: float = 1.0,
                 generator: torch.Generator | None = None, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.n = int(n)
        g = fourier_grid_size(self.n, pad=1)
        radius = radius_3d(g, device)  # Fourier pixels from the centre g // 2
        self.register_buffer("support", (radius <= grid_radius(self.n, pad=1) + 1).to(torch.float32))
        shells = torch.clamp(torch.round(radius).long(), max=radial_amplitude.numel() - 1)
        amp = torch.clamp(radial_amplitude.to(device=device, dtype=torch.float32), min=1e-12)
        self.exponent = nn.Parameter(torch.log(amp)[shells])
        noise = torch.randn((g, g, g), generator=generator, dtype=torch.float32,
                            device=generator.device if generator is not None else device)
        self.mantissa = nn.Parameter(noise.to(device) * mantissa_std)

    @property
    def grid_size(self) -> int:
        return int(self.mantissa.shape[-1])

    def hartley(self) -> Tensor:
        """The Hartley grid ``(G, G, G)`` (real), zero outside the support."""
        return self.mantissa * torch.exp(self.exponent) * self.support

    def project(self, rotations: Tensor) -> Tensor:
        """Centred Hartley transforms ``(B, n, n)`` of the projections at RELION rotations ``A`` ``(B, 3, 3)``.

        Pixel ``k`` (``|k| <= n // 2``) reads the grid at ``A^T (kx, ky, 0)`` by trilinear interpolation;
        differentiable in the volume and in ``rotations``.
        """
        return project_hartley(self.hartley(), rotations, self.n, pad=1)

    @torch.no_grad()
    def clear_beyond(self, radius: float) -> None:
        """Zero the mantissa of voxels farther than ``radius`` Fourier pixels from the centre."""
        far = radius_3d(self.grid_size, self.mantissa.device) > radius
        self.mantissa[far] = 0.0

    @torch.no_grad()
    def to_map(self) -> Tensor:
        """The real map ``(n, n, n)`` ``[z, y, x]`` (centre ``n // 2``) whose transform the grid holds, band-limited
        to the sphere ``|k| <= n / 2`` that the slices read.

        The cube of frequencies ``-n/2 .. n/2 - 1`` also holds the corners beyond Nyquist, among them the whole
        unpaired plane ``k = -n/2`` (radius ``>= n/2``, equal only on its axis): no slice pixel ever reads those
        voxels, so they keep what the random start put there. Left in, they made a spike of power at Nyquist
        (5x the shells below it on a 48 px run); they are zeroed here.
        """
        h = self.hartley()
        c, half = self.grid_size // 2, self.n // 2
        # Frequencies -n/2 .. n/2 - 1: the DFT grid of an n-box with its zero at n // 2.
        crop = h[c - half:c - half + self.n, c - half:c - half + self.n, c - half:c - half + self.n]
        crop = crop * (radius_3d(self.n, crop.device) <= half)
        return hartley_to_volume(crop)


def radial_amplitude_from_images(hartley_images: Tensor, ctf: Tensor | None, noise_power: float,
                                 n_shells: int, floor_fraction: float = 0.01) -> Tensor:
    """Expected ``|H|`` of a central slice per Fourier shell, from observed Hartley images.

    hartley_images: ``(B, n, n)`` centred Hartley transforms of the (normalised) particles; ctf:
    ``(B, n, n)`` on the same centred grid or ``None``; noise_power: the noise's expected ``H^2`` per
    Fourier pixel. Per shell the signal power is ``mean(H^2) - noise_power`` divided by ``mean(CTF^2)``;
    shells where that is not positive (pure noise) get ``floor_fraction`` of the largest amplitude, and
    the profile is made non-increasing beyond its peak so that noise never raises high frequencies.
    Returns ``(n_shells,)``.
    """
    n = hartley_images.shape[-1]
    shells = torch.round(radius_2d(n, hartley_images.device)).long().reshape(-1)
    shells = torch.clamp(shells, max=n_shells - 1)
    power = (hartley_images.to(torch.float32) ** 2).mean(0).reshape(-1)
    ctf2 = (ctf.to(torch.float32) ** 2).mean(0).reshape(-1) if ctf is not None else torch.ones_like(power)
    count = torch.zeros(n_shells, device=power.device).index_add_(0, shells, torch.ones_like(power))
    p_sum = torch.zeros(n_shells, device=power.device).index_add_(0, shells, power)
    c_sum = torch.zeros(n_shells, device=power.device).index_add_(0, shells, ctf2)
    count = torch.clamp(count, min=1)
    signal = (p_sum / count - noise_power) / torch.clamp(c_sum / count, min=1e-3)
    amp = torch.sqrt(torch.clamp(signal, min=0))
    peak = torch.clamp(amp.max(), min=1e-12)
    amp = torch.clamp(amp, min=floor_fraction * peak)
    # Non-increasing beyond the peak: a running minimum from the peak outwards.
    top = int(torch.argmax(amp))
    tail = torch.cummin(amp[top:], dim=0).values
    return torch.cat([amp[:top], tail])
