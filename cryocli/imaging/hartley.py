"""Hartley transforms in cryocli's centred layout, and central slices of Hartley volumes.

The Hartley transform is real: ``H(k) = sum_x f(x) cas(2 pi k.x / N)`` with ``cas = cos + sin``, i.e.
``H = Re(F) - Im(F)`` for the DFT ``F``. Layout: images ``(..., n, n)`` and volumes ``(n, n, n)``
``[z, y, x]`` have their centre at index ``n // 2``, and so do their Hartley transforms (zero
frequency at ``n // 2`` on every axis, full plane/volume since ``H(-k) != H(k)``). The transform is
its own inverse up to ``1 / N``. Neural engines (cryoSPIN-style decoders) learn real Hartley volumes;
:func:`project_hartley` reads their central slices, which are the Hartley transforms of the projections
because ``F2(k) = F3(A^T k)`` holds for real and imaginary parts separately.
"""

from __future__ import annotations

import torch
from torch import Tensor

from cryocli.imaging.fourier import rfft_to_image
from cryocli.imaging.projector import fourier_volume, full_plane_pixels, padded_box, sample_slices


def _cas(spectrum: Tensor) -> Tensor:
    return spectrum.real - spectrum.imag


def image_to_hartley(images: Tensor) -> Tensor:
    """Real images ``(..., n, n)`` -> centred Hartley transforms ``(..., n, n)`` (unnormalised)."""
    dims = (-2, -1)
    f = torch.fft.fft2(torch.fft.ifftshift(images, dim=dims))
    return torch.fft.fftshift(_cas(f), dim=dims)


def hartley_to_image(hartley: Tensor) -> Tensor:
    """Inverse of :func:`image_to_hartley`: ``(..., n, n)`` -> images."""
    dims = (-2, -1)
    n2 = hartley.shape[-1] * hartley.shape[-2]
    f = torch.fft.fft2(torch.fft.ifftshift(hartley, dim=dims))
    return torch.fft.fftshift(_cas(f), dim=dims) / n2


def volume_to_hartley(volume: Tensor) -> Tensor:
    """Real volume ``(n, n, n)`` -> centred Hartley transform ``(n, n, n)`` (unnormalised)."""
    dims = (-3, -2, -1)
    f = torch.fft.fftn(torch.fft.ifftshift(volume, dim=dims), dim=dims)
    return torch.fft.fftshift(_cas(f), dim=dims)


def hartley_to_volume(hartley: Tensor) -> Tensor:
    """Inverse of :func:`volume_to_hartley`."""
    dims = (-3, -2, -1)
    n3 = hartley.shape[-1] * hartley.shape[-2] * hartley.shape[-3]
    f = torch.fft.fftn(torch.fft.ifftshift(hartley, dim=dims), dim=dims)
    return torch.fft.fftshift(_cas(f), dim=dims) / n3


def hartley_from_rfft(spectra: Tensor, n: int) -> Tensor:
    """Half transforms ``(..., n, n // 2 + 1)`` of real images -> centred Hartley transforms ``(..., n, n)``."""
    return image_to_hartley(rfft_to_image(spectra, n))


def hartley_volume(volume: Tensor, pad: float = 2, r_max: int | None = None,
                   gridding_correction: bool = True) -> Tensor:
    """A map ``(n, n, n)`` -> its padded, centred Hartley grid ``(G, G, G)`` (real).

    Same padding, gridding pre-correction and radius limit as :func:`cryocli.imaging.projector.fourier_volume`.
    """
    return _cas(fourier_volume(volume, pad, r_max, gridding_correction))


def project_hartley(hartley: Tensor, rotations: Tensor, n: int, pad: float = 2, r_max: int | None = None) -> Tensor:
    """Central slices of a centred Hartley grid -> centred Hartley images ``(B, n, n)``.

    hartley: real ``(G, G, G)`` (e.g. :func:`hartley_volume`, or an unpadded learned volume with
    ``pad=1``); slice pixel ``k`` reads the grid at ``P / n * A^T (kx, ky, 0)``; pixels with
    ``|k| > r_max`` (default ``n // 2``) are zero. Differentiable in ``hartley`` and ``rotations``.
    """
    pix, kx, ky = full_plane_pixels(n, r_max, device=hartley.device, dtype=hartley.dtype)
    vals = sample_slices(hartley, rotations, kx, ky, padded_box(n, pad) / n)
    out = torch.zeros((rotations.shape[0], n * n), dtype=vals.dtype, device=vals.device)
    return out.index_copy(1, pix, vals).reshape(-1, n, n)
