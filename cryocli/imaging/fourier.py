"""Fourier-space helpers shared by every engine.

Layout used throughout cryocli: an image ``img[..., y, x]`` of box ``n`` has its centre (the rotation
origin) at pixel ``n // 2`` on each axis, as RELION. Its transform is ``rfft2(ifftshift(img))`` of shape
``(..., n, n // 2 + 1)``: rows follow ``fftfreq(n)`` order (ky), columns ``rfftfreq(n)`` (kx >= 0). Putting
the centre at index 0 before the FFT makes a centred, symmetric object real-valued in Fourier space and
makes in-plane translations pure phase ramps.
"""

from __future__ import annotations

import torch
from torch import Tensor


def image_to_rfft(images: Tensor) -> Tensor:
    """Real images ``(..., n, n)`` -> centred half transforms ``(..., n, n // 2 + 1)`` (complex)."""
    return torch.fft.rfft2(torch.fft.ifftshift(images, dim=(-2, -1)))


def rfft_to_image(spectra: Tensor, n: int) -> Tensor:
    """Inverse of :func:`image_to_rfft`: half transforms ``(..., n, n // 2 + 1)`` -> images ``(..., n, n)``."""
    return torch.fft.fftshift(torch.fft.irfft2(spectra, s=(n, n)), dim=(-2, -1))


def volume_to_fft(volume: Tensor) -> Tensor:
    """Real volume ``(n, n, n)`` ``[z, y, x]`` -> full centred transform, zero frequency at index ``n // 2``."""
    return torch.fft.fftshift(torch.fft.fftn(torch.fft.ifftshift(volume, dim=(-3, -2, -1)), dim=(-3, -2, -1)),
                              dim=(-3, -2, -1))


def fft_to_volume(spectrum: Tensor) -> Tensor:
    """Inverse of :func:`volume_to_fft` (returns the real part)."""
    return torch.fft.fftshift(torch.fft.ifftn(torch.fft.ifftshift(spectrum, dim=(-3, -2, -1)), dim=(-3, -2, -1)),
                              dim=(-3, -2, -1)).real


def rfft_frequencies(n: int, device: torch.device | str | None = None,
                     dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """Frequencies of the half-transform grid in cycles per pixel: ``(ky, kx)``, each ``(n, n // 2 + 1)``."""
    ky = torch.fft.fftfreq(n, device=device, dtype=dtype)
    kx = torch.fft.rfftfreq(n, device=device, dtype=dtype)
    gy, gx = torch.meshgrid(ky, kx, indexing="ij")
    return gy, gx


def rfft_radius(n: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """Radius of each half-transform pixel in Fourier pixels (``|k| * n``), shape ``(n, n // 2 + 1)``."""
    ky, kx = rfft_frequencies(n, device, dtype)
    return torch.sqrt(kx**2 + ky**2) * n


def centred_grid_2d(n: int, device: torch.device | str | None = None,
                    dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """Integer coordinates ``(y, x)`` relative to the centre pixel ``n // 2``, each ``(n, n)``.

    Also the centred (fftshifted) Fourier-pixel coordinates ``(ky, kx)`` of a full 2D transform.
    """
    r = torch.arange(n, device=device, dtype=dtype) - n // 2
    y, x = torch.meshgrid(r, r, indexing="ij")
    return y, x


def radius_2d(n: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """Distance of each pixel from the centre pixel ``n // 2`` in pixels, shape ``(n, n)``."""
    y, x = centred_grid_2d(n, device, dtype)
    return torch.sqrt(x**2 + y**2)


def centred_grid_3d(n: int, device: torch.device | str | None = None,
                    dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor, Tensor]:
    """Integer coordinates ``(z, y, x)`` relative to the centre voxel ``n // 2``, each ``(n, n, n)``."""
    r = torch.arange(n, device=device, dtype=dtype) - n // 2
    z, y, x = torch.meshgrid(r, r, r, indexing="ij")
    return z, y, x


def radius2_3d(n: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """Squared distance of each voxel from the centre voxel ``n // 2`` in voxels^2, shape ``(n, n, n)``.

    Also ``|k|^2`` (Fourier voxels) of a centred grid, e.g. the odd padded grids of
    :mod:`cryocli.imaging.projector`. Exact for integer dtypes, and for floating ones while ``3 (n / 2)^2``
    fits the mantissa (``n`` up to ~4700 in float32), so comparisons with ``r^2`` decide ties exactly.
    """
    k = torch.arange(n, device=device, dtype=dtype) - n // 2
    return k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2


def radius_3d(n: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """Distance of each voxel from the centre voxel ``n // 2`` in voxels, shape ``(n, n, n)``."""
    return torch.sqrt(radius2_3d(n, device, dtype))


def shell_index_3d(n: int, device: torch.device | str | None = None) -> Tensor:
    """RELION's Fourier shell of each voxel of a centred full transform: ``round(|k| in pixels)``, (n, n, n) long."""
    return torch.round(radius_3d(n, device, torch.float64)).long()


def fourier_crop_images(images: Tensor, new_n: int) -> Tensor:
    """Resample images ``(..., n, n)`` to ``(..., new_n, new_n)`` by cropping (or zero-padding) the spectrum.

    The physical field of view is kept, so the pixel size becomes ``apix * n / new_n``; amplitudes are
    scaled so real-space values (and their variance per pixel of signal) keep their meaning.
    """
    n = images.shape[-1]
    if new_n == n:
        return images
    spec = torch.fft.fftshift(torch.fft.fft2(torch.fft.ifftshift(images, dim=(-2, -1))), dim=(-2, -1))
    out = torch.zeros(*images.shape[:-2], new_n, new_n, dtype=spec.dtype, device=images.device)
    m = min(n, new_n)
    src0, dst0 = n // 2 - m // 2, new_n // 2 - m // 2
    out[..., dst0:dst0 + m, dst0:dst0 + m] = spec[..., src0:src0 + m, src0:src0 + m]
    res = torch.fft.fftshift(torch.fft.ifft2(torch.fft.ifftshift(out, dim=(-2, -1))), dim=(-2, -1)).real
    return res * (new_n / n) ** 2


def fourier_resample_volume(volume: Tensor, new_n: int) -> Tensor:
    """Resample a volume ``(n, n, n)`` to ``(new_n,)*3`` by cropping or zero-padding its spectrum.

    The field of view is kept (voxel size becomes ``apix * n / new_n``) and voxel values keep their scale.
    """
    n = volume.shape[-1]
    if new_n == n:
        return volume
    spec = volume_to_fft(volume)
    out = torch.zeros(new_n, new_n, new_n, dtype=spec.dtype, device=volume.device)
    m = min(n, new_n)
    s0, d0 = n // 2 - m // 2, new_n // 2 - m // 2
    out[d0:d0 + m, d0:d0 + m, d0:d0 + m] = spec[s0:s0 + m, s0:s0 + m, s0:s0 + m]
    return fft_to_volume(out) * (new_n / n) ** 3


def rfftn_radius(n: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float64) -> Tensor:
    """Radius in Fourier pixels of each voxel of the half transform ``rfftn(volume)``: shape ``(n, n, n // 2 + 1)``.

    Axes are ``[kz, ky, kx]`` with ``kz, ky`` in ``fftfreq`` order and ``kx = 0 .. n // 2``.
    """
    k = torch.fft.fftfreq(n, d=1.0 / n, device=device, dtype=dtype)
    kx = torch.arange(n // 2 + 1, device=device, dtype=dtype)
    return torch.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + kx[None, None, :] ** 2)


def rfftn_shells(n: int, device: torch.device | str | None = None) -> Tensor:
    """RELION's shell of each half-transform voxel, ``floor(|k| + 0.5)`` (its ``ROUND``), ``(n, n, n // 2 + 1)`` long."""
    return torch.floor(rfftn_radius(n, device) + 0.5).long()


def shell_sum(values: Tensor, shells: Tensor, nshell: int) -> Tensor:
    """Sum ``values (..., n, n, n//2+1)`` over shells ``0 .. nshell-1`` -> ``(..., nshell)``; higher shells are dropped."""
    lead = values.shape[: values.dim() - 3]
    flat = values.reshape(*lead, -1)
    idx = shells.reshape(-1)
    keep = idx < nshell
    flat, idx = flat[..., keep], idx[keep]
    out = torch.zeros(*lead, nshell, dtype=flat.dtype, device=flat.device)
    return out.index_add_(out.dim() - 1, idx, flat)
