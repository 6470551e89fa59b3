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
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from cryocli.engines.abinitio.cryospin import ImageModel
from cryocli.engines.abinitio.unbiased_loss import normalise
from cryocli.imaging.hartley import hartley_to_image, hartley_volume, project_hartley

#: Zero padding of the Hartley grid (RELION's default oversampling of the reference).
PAD = 2
#: The paper's initial density range (B.2).
INIT_HIGH = 0.1


class VoxelDecoder(nn.Module):
    """Learnable density ``(n, n, n)`` for images of box ``n``; ``radius`` (pixels) bounds its random start."""

    def __init__(self, n: int, radius: float, generator: torch.Generator,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        from cryocli.imaging.masks import soft_sphere

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
