"""Cryo2SSNet's decoder (section 4.2, eq. 3) and the observed images it is compared with.

``D_phi(r) = N(C_d * P_z(R phi))``: the decoder holds a real-space voxel density ``phi`` ``(n, n, n)``
``[z, y, x]``, initialised ``U(0, 0.1)`` inside a sphere of the estimated particle radius and 0 outside
(appendix B.2). Rendering goes through cryocli's one forward model: the 3D Hartley transform of the padded,
gridding-corrected map (:func:`cryocli.imaging.hartley.hartley_volume`, as RELION's projector), the
central slice at the RELION pose ``A`` (:func:`cryocli.imaging.hartley.project_hartley`), the particle's
CTF (:meth:`cryocli.engines.abinitio.cryospin.ImageModel.ctf`), the inverse Hartley transform, and the
per-image normalisation ``N``. Observed images are translated by a shift (phase ramp on their transform,
:meth:`~cryocli.engines.abinitio.cryospin.ImageModel.observed`) and normalised the same way. Everything is
batched: ``(B, K)`` poses or ``(B, T)`` shifts per call.

:func:`render_coefficients` and :func:`observed_coefficients` give the same normalised images as Hartley
coefficients, without the inverse transform: by Parseval, the mean squared difference of two normalised images
over their ``n^2`` pixels is the squared distance of their Hartley transforms divided by ``n^4`` (the mean is
the zero-frequency term, the variance the power of the others). The beam search scores with them whenever it
does not denoise (the MLP denoiser works on pixels): a slice is read only at the compared frequencies, and no
image is transformed back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from cryocli.engines.abinitio.cryospin import ImageModel
from cryocli.engines.abinitio.unbiased_loss import normalise
from cryocli.imaging.hartley import hartley_to_image, hartley_volume, project_hartley
from cryocli.imaging.masks import soft_sphere
from cryocli.imaging.projector import full_plane_pixels, padded_box, sample_slices

#: Zero padding of the Hartley grid (RELION's default oversampling of the reference).
PAD = 2
#: The paper's initial density range (B.2).
INIT_HIGH = 0.1
#: The support's radius over the estimated particle radius (which holds 80% of the images' signal variance, so lies
#: inside the particle's edge): on 2,000 simulated 4AKE particles of 32 px, 1.0 x gave 11.3 degrees median rotation
#: error against 9.9 for 1.25 x (the README's Cryo2SSNet section).
SUPPORT_SCALE = 1.25
#: Width of the support's raised-cosine edge, in voxels.
SUPPORT_EDGE = 3.0


class VoxelDecoder(nn.Module):
    """Learnable density ``(n, n, n)`` for images of box ``n``; ``radius`` (pixels) bounds its random start."""

    def __init__(self, n: int, radius: float, generator: torch.Generator,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.n = int(n)
        start = torch.rand((n, n, n), generator=generator) * INIT_HIGH * soft_sphere(n, radius)
        self.density = nn.Parameter(start.to(device=device, dtype=torch.float32))

    def grid(self) -> Tensor:
        """The padded, centred Hartley grid ``(G, G, G)`` of the density (differentiable)."""
        return hartley_volume(self.density, pad=PAD)

    @torch.no_grad()
    def to_map(self) -> Tensor:
        """The density ``(n, n, n)`` as a map (a detached copy)."""
        return self.density.detach().clone()


@dataclass(frozen=True)
class DensityConstraint:
    """What the decoder's density is projected onto after every optimiser step (cryocli's addition; the paper only
    starts the density at 0 outside a sphere, B.2): 0 outside a soft sphere (``support``, ``(n, n, n)`` weights in
    [0, 1]), and non-negative when ``positive``, as SAGD truncates negative density after each iteration
    (Punjani et al. 2017, "negative density is physically unrealistic").

    Why: Adam moves every voxel by about its learning rate per step whatever its gradient, so voxels that only noise
    reaches (the solvent, negative density) fill with it, and the beam search then matches noise. On simulated 4AKE
    from a random start (SNR 0.1, CTF, shipped defaults) the constraint took the median rotation error from 16.4 to
    9.9 degrees (2,000 particles of 32 px, 300 steps) and from 26.7 to 4.1 degrees (2,000 of 48 px, 250 steps).
    """

    support: Tensor
    positive: bool

    @staticmethod
    def of(n: int, radius: float, positive: bool = True, device: torch.device | str | None = None
           ) -> DensityConstraint:
        """The support of radius ``radius`` voxels (at most ``n / 2 - SUPPORT_EDGE``) with a :data:`SUPPORT_EDGE`
        soft edge, for a box of ``n`` voxels."""
        inner = min(float(radius), n / 2 - SUPPORT_EDGE)
        return DensityConstraint(soft_sphere(n, inner, edge=SUPPORT_EDGE, device=device), positive)

    @torch.no_grad()
    def apply_(self, density: Tensor) -> None:
        """Project ``density`` ``(n, n, n)`` in place."""
        density.mul_(self.support)
        if self.positive:
            density.clamp_(min=0.0)


def render(grid: Tensor, rotations: Tensor, ctf: Tensor | None, n: int, band: int | None = None) -> Tensor:
    """``D_phi``: normalised real-space model images ``(B, K, n, n)`` at RELION poses ``(B, K, 3, 3)`` of a Hartley
    grid (:meth:`VoxelDecoder.grid`); ctf ``(B, n, n)`` on the centred grid or ``None``; n: box (pixels); band:
    keep frequencies ``|k| <= band`` Fourier pixels only (``None``: up to ``n // 2``). Differentiable in the grid
    and the poses."""
    b, k = rotations.shape[:2]
    slices = project_hartley(grid, rotations.reshape(b * k, 3, 3), n, pad=PAD, r_max=band).reshape(b, k, n, n)
    if ctf is not None:
        slices = slices * ctf[:, None]
    return normalise(hartley_to_image(slices))


def observed_images(model: ImageModel, spectra: Tensor, shifts_px: Tensor | None, band: int | None = None) -> Tensor:
    """Normalised real-space particles ``(B, T, n, n)`` translated by ``+shifts_px`` ``(B, T, 2)`` pixels ``[x, y]``
    (which centres a particle whose RELION origin is ``shifts_px * pixel_size``); ``None``: untranslated,
    ``T = 1``. spectra: centred transforms ``(B, n, n)`` (:meth:`ImageModel.spectra`); band: as in :func:`render`.
    Differentiable in the shifts."""
    hartley = model.observed(spectra, shifts_px)
    if shifts_px is None:
        hartley = hartley[:, None]
    if band is not None:
        hartley = hartley * ((model.kx**2 + model.ky**2) <= band * band)
    return normalise(hartley_to_image(hartley))


def _unit_coefficients(hartley: Tensor, kx: Tensor, ky: Tensor, n: int, eps: float = 1e-8) -> tuple[Tensor, Tensor]:
    """Hartley values ``(..., M)`` at Fourier pixels ``kx, ky`` ``(M,)`` of images of box ``n`` -> the Hartley values
    of the images after :func:`normalise`, divided by ``n^2`` (the zero frequency set to 0: the mean), and their
    squared norm ``(...)``, which is 1 up to ``eps``."""
    hartley = hartley * ((kx != 0) | (ky != 0))
    power = hartley.square().sum(-1, keepdim=True)
    # normalise() divides by sqrt(var + eps), var = power / n^4 (Parseval); the n^2 makes pixel means sums.
    scale = torch.rsqrt(power + eps * float(n) ** 4)
    return hartley * scale, (power * scale.square())[..., 0]


def render_coefficients(grid: Tensor, rotations: Tensor, ctf: Tensor | None, n: int,
                        band: int | None = None) -> Tensor:
    """:func:`render` as Hartley coefficients: ``(B, K, M)`` over the ``M`` pixels of
    :func:`~cryocli.imaging.projector.full_plane_pixels` with ``|k| <= band`` (``None``: ``n // 2``), such that the
    squared distance of two of them is the mean squared difference over pixels of the images :func:`render` gives.
    rotations ``(B, K, 3, 3)``; ctf ``(B, n, n)`` or ``None``. Differentiable in the grid and the poses."""
    b, k = rotations.shape[:2]
    pix, kx, ky = full_plane_pixels(n, band, device=grid.device)
    vals = sample_slices(grid, rotations.reshape(b * k, 3, 3), kx, ky, padded_box(n, PAD) / n).reshape(b, k, -1)
    if ctf is not None:
        vals = vals * ctf.reshape(b, 1, n * n)[..., pix]
    return _unit_coefficients(vals, kx, ky, n)[0]


def observed_coefficients(model: ImageModel, spectra: Tensor, shifts_px: Tensor | None,
                          band: int | None = None) -> tuple[Tensor, Tensor]:
    """:func:`observed_images` as Hartley coefficients ``(B, T, M)`` over the pixels of :func:`render_coefficients`,
    and the squared norm ``(B, T)`` of the whole normalised image, which includes the frequencies outside those
    pixels (the plane's corners when ``band`` is ``None``). Differentiable in the shifts."""
    n = model.n
    hartley = model.observed(spectra, shifts_px)
    if shifts_px is None:
        hartley = hartley[:, None]
    b, t = hartley.shape[:2]
    pix, kx, ky = full_plane_pixels(n, band, device=spectra.device)
    flat = hartley.reshape(b, t, n * n)
    if band is not None:  # observed_images() cuts the image to the band before normalising it
        return _unit_coefficients(flat[..., pix], kx, ky, n)
    unit, norm = _unit_coefficients(flat, model.kx.reshape(-1), model.ky.reshape(-1), n)
    return unit[..., pix], norm
