"""Luo's Gaussian-kernel backprojection (local kernel regression, paper eq. 25-29).

Each Fourier pixel of an image, placed at the non-integer grid point ``c = s A^T (kx, ky, 0)`` (padded
voxels, ``s = P / n``), is spread over the 3 x 3 x 3 grid points ``round(c) + {-1, 0, 1}^3`` with weights
``K = exp(-|c - g|^2 / h)`` (bandwidth ``h = 2``, as the paper), instead of RELION's 8 trilinear
neighbours. Data and CTF^2 weights get the same kernel, so ``data / weight`` is the kernel-regression
estimate (eq. 28) and the accumulators plug into the same reconstruction as :class:`BackProjector`'s.

The kernel is separable, so the 27 weights of a pixel are the products of three per-axis weights
``exp(-(f - d)^2 / h)`` (``f`` the fractional offset, ``d`` in -1, 0, 1) and one ``index_add_`` places all of
them. In real space the kernel multiplies the map by the kernel's Fourier transform,
``exp(-pi^2 h r^2 / P^2)`` (``r`` in voxels from the centre, the 3 x 3 x 3 truncation ignored), which
:func:`kernel_gridding_correction` divides out (it replaces the trilinear ``sinc^2(r / P)`` correction).
That division amplifies the noise near the box edge (about 3 x at ``r = n / 2`` for ``n = 64``), so an
unmasked FSC of such maps comes out lower than of trilinear ones at the same poses; the refine engines
therefore take their gold-standard FSC from trilinear accumulators kept alongside.

Two forms of the kernel, the refine engines' ``--kernel`` choices:

* ``gaussian-insert`` (:class:`GaussianKernelBackProjector`): the paper's own form, every pixel spread over
  its 27 nearest grid points with the exact Gaussian weight; an ``index_add_`` of 27 x 3 values per pixel,
  the most expensive step of a sparse-tv E-step.
* ``gaussian`` (:func:`kernel_on_grid`, the default): the same Gaussian sampled at the integer offsets
  ``{-1, 0, 1}^3`` and interpolated trilinearly between them, ``K(c - g) = sum_d exp(-|d|^2 / h) T(c - g - d)``
  (``T`` the trilinear hat). Its accumulators are the trilinear ones convolved with the 3 x 3 x 3 samples,
  which the refine engines keep anyway, so it costs a separable 3-tap convolution of the grid (16 ms at
  64 px, 156 ms at 128 px on 2 cores, ``benchmarks/projector.py``) instead of a second insertion. Each
  axis's factor differs from the exact Gaussian's by at most 0.081 of its peak (at offsets near 0.43
  voxels, between the samples), and the kernel reaches half a voxel further on each axis than the paper's
  27 points (to 2 voxels instead of 1.5); its real-space envelope is the trilinear ``sinc^2(r / P)`` times
  the samples' transform, ``prod_axes (1 + 2 q cos(2 pi x / P)) / (1 + 2 q)``, ``q = exp(-1 / h)``
  (:func:`grid_kernel_envelope`).
"""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from cryocli.imaging.fourier import radius_3d
from cryocli.imaging.projector import (
    default_r_max,
    fourier_grid_size,
    half_plane_pixels,
    padded_box,
    scatter_chunk_points,
    slice_coordinates,
)

#: The paper's bandwidth (padded Fourier voxels^2 in ``exp(-d^2 / h)``).
DEFAULT_BANDWIDTH = 2.0


@runtime_checkable
class BackProjectorLike(Protocol):
    """What the M-step asks of a backprojector, implemented by the trilinear
    :class:`cryocli.imaging.projector.BackProjector` (RELION's) and :class:`GaussianKernelBackProjector`.

    Both accumulate ``data = sum K * value`` and ``weight = sum K * weight`` (``K`` the interpolation kernel)
    on the centred padded Fourier grid ``(G, G, G)``, ``G = grid_size``, of a box ``n`` with padding ``pad``
    and Fourier radius ``r_max`` (pixels); pixels with weight <= 0 are skipped, data included.
    """

    n: int
    pad: float
    r_max: int
    grid_size: int
    dtype: torch.dtype

    def insert(self, slices: Tensor, weights: Tensor | None, rotations: Tensor, skip_redundant: bool = True) -> None:
        """Slices ``(B, n, n // 2 + 1)`` complex with weights (same shape, None: 1) at rotations ``(B, 3, 3)``."""

    def insert_pixels(self, values: Tensor, weights: Tensor | None, rotations: Tensor, kx: Tensor,
                      ky: Tensor) -> None:
        """Pixels ``(kx, ky)`` ``(M,)`` of ``B`` slices: values ``(B, M)`` complex, weights ``(B, M)`` (None: 1)."""

    def symmetrised(self) -> tuple[Tensor, Tensor]:
        """Hermitian-symmetrised ``(data (G, G, G) complex, weight (G, G, G))``."""

    @property
    def data(self) -> Tensor:
        """Accumulated data ``(G, G, G)`` complex."""

    @property
    def weight(self) -> Tensor:
        """Accumulated weights ``(G, G, G)``."""

    @property
    def accumulators(self) -> Tensor:
        """The raw ``(3, G, G, G)`` accumulator (Re data, Im data, weight), e.g. for ``all_reduce`` in place."""


class GaussianKernelBackProjector:
    """A :class:`BackProjectorLike` with the Gaussian kernel instead of the trilinear one.

    n: box (pixels); pad: padding (2); r_max: Fourier radius in pixels (``n // 2``); bandwidth: ``h``;
    chunk_points: pixels placed per scatter call (None: :func:`~cryocli.imaging.projector.scatter_chunk_points`).
    """

    def __init__(self, n: int, pad: float = 2, r_max: int | None = None, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32, bandwidth: float = DEFAULT_BANDWIDTH,
                 chunk_points: int | None = None) -> None:
        self.n, self.pad = int(n), pad
        self.r_max = default_r_max(self.n) if r_max is None else int(r_max)
        self.grid_size = fourier_grid_size(self.n, pad, self.r_max)
        self.scale = padded_box(self.n, pad) / self.n
        self.dtype, self.bandwidth = dtype, float(bandwidth)
        g = self.grid_size
        self._acc = torch.zeros((3, g * g * g), dtype=dtype, device=device)
        # Pixels placed per index_add_ (27 grid points each)
        self.chunk_points = scatter_chunk_points(self._acc.device, 27) if chunk_points is None else int(chunk_points)

    @property
    def device(self) -> torch.device:
        return self._acc.device

    def insert(self, slices: Tensor, weights: Tensor | None, rotations: Tensor, skip_redundant: bool = True) -> None:
        """Insert slices ``(B, n, n // 2 + 1)`` (complex) with weights (same shape, None: 1) at ``A (B, 3, 3)``;
        pixels with weight <= 0 are skipped, data included."""
        pix, kx, ky = half_plane_pixels(self.n, self.r_max, skip_redundant, device=self.device, dtype=self.dtype)
        b = slices.shape[0]
        picked = slices.to(self.device).reshape(b, -1)[:, pix]
        w = None if weights is None else weights.to(self.device).reshape(b, -1)[:, pix]
        self.insert_pixels(picked, w, rotations, kx, ky)

    def insert_pixels(self, values: Tensor, weights: Tensor | None, rotations: Tensor, kx: Tensor,
                      ky: Tensor) -> None:
        """Insert the pixels ``(kx, ky)`` ``(M,)`` (Fourier pixels) of ``B`` slices: values ``(B, M)`` complex,
        weights ``(B, M)`` (None: 1), rotations ``(B, 3, 3)``; pixels with weight <= 0 are skipped."""
        dev, g = self.device, self.grid_size
        kx, ky = kx.to(device=dev, dtype=self.dtype), ky.to(device=dev, dtype=self.dtype)
        b, m = values.shape
        w = (torch.ones((b, m), dtype=self.dtype, device=dev) if weights is None
             else weights.to(device=dev, dtype=self.dtype))
        valid = (w > 0).to(self.dtype)
        values = values.to(dev)
        packed = torch.stack([values.real.to(self.dtype) * valid, values.imag.to(self.dtype) * valid, w * valid])
        # Flat offsets of the 27 neighbours, in the (z, y, x) order of the products below (int64: index_add_ with
        # int32 indices took twice as long on the CPU).
        d = torch.arange(-1, 2, device=dev)
        offsets = ((d[:, None, None] * g + d[None, :, None]) * g + d[None, None, :]).reshape(-1)
        h = self.bandwidth
        step = max(1, self.chunk_points // max(1, m))
        for s in range(0, b, step):
            coords = slice_coordinates(rotations[s:s + step].to(device=dev, dtype=self.dtype), kx, ky, self.scale)
            coords = coords.reshape(-1, 3).T  # (3, N) as (x, y, z) voxels from the centre
            base = torch.round(coords)
            frac = coords - base
            # The kernel is separable: per axis exp(-(frac - delta)^2 / h) for delta = -1, 0, 1, written as
            # exp(-frac^2 / h) * exp(2 delta frac / h) * exp(-delta^2 / h): two exponentials per axis instead of
            # three, |frac| <= 1/2 keeping both in range.
            centre = torch.exp(frac * frac * (-1.0 / h))
            ramp = torch.exp(frac * (2.0 / h))
            side = centre * math.exp(-1.0 / h)
            wx, wy, wz = torch.stack([side / ramp, centre, side * ramp], 1)  # each (3 deltas, N)
            # Products of contiguous rows: broadcasting over small trailing dimensions is slow on the CPU.
            kern = ((wz[:, None, None] * wy[None, :, None]) * wx[None, None, :]).reshape(27, -1)
            # Points whose 3 x 3 x 3 neighbourhood leaves the grid (beyond the backprojector's r_max) are dropped.
            inside = base.abs().amax(0) <= g // 2 - 1
            idx = (torch.where(inside[None], base, torch.zeros_like(base)) + g // 2).long()
            flat = ((idx[2] * g + idx[1]) * g + idx[0])[None] + offsets[:, None]  # (27, N)
            vals = packed[:, s:s + step].reshape(3, -1) * inside
            contrib = vals[:, None, :] * kern[None]  # (3, 27, N)
            self._acc.index_add_(1, flat.reshape(-1), contrib.reshape(3, -1))

    @property
    def data(self) -> Tensor:
        g = self.grid_size
        return torch.complex(self._acc[0], self._acc[1]).reshape(g, g, g)

    @property
    def weight(self) -> Tensor:
        g = self.grid_size
        return self._acc[2].reshape(g, g, g).clone()

    def symmetrised(self) -> tuple[Tensor, Tensor]:
        """Hermitian-symmetrised ``(data, weight)`` as :meth:`BackProjector.symmetrised`."""
        data, weight = self.data, self.weight
        dims = (0, 1, 2)
        return data + torch.flip(data, dims).conj(), weight + torch.flip(weight, dims)

    @property
    def accumulators(self) -> Tensor:
        g = self.grid_size
        return self._acc.reshape(3, g, g, g)


def kernel_envelope(n: int, pad: float = 2, bandwidth: float = DEFAULT_BANDWIDTH,
                    device: torch.device | str | None = None) -> Tensor:
    """Real-space attenuation ``exp(-pi^2 h r^2 / P^2)`` of the Gaussian kernel on a map ``(n, n, n)``."""
    p = padded_box(n, pad)
    r = radius_3d(n, device, torch.float64)
    return torch.exp(-(math.pi**2) * bandwidth * r**2 / p**2)


def kernel_gridding_correction(n: int, pad: float = 2, bandwidth: float = DEFAULT_BANDWIDTH, trilinear: bool = True,
                               device: torch.device | str | None = None) -> Tensor:
    """Factor ``(n, n, n)`` float32 that turns a map corrected for trilinear gridding (divided by
    ``sinc^2(r / P)``) into one corrected for the Gaussian kernel (``trilinear=False``: the plain inverse
    envelope, for maps with no correction yet)."""
    env = kernel_envelope(n, pad, bandwidth, device)
    if not trilinear:
        return (1.0 / env).to(torch.float32)
    p = padded_box(n, pad)
    sinc2 = torch.sinc(radius_3d(n, device, torch.float64) / p) ** 2
    return (sinc2 / env).to(torch.float32)


def kernel_on_grid(volume: Tensor, bandwidth: float = DEFAULT_BANDWIDTH) -> Tensor:
    """Accumulators ``(G, G, G)`` (complex data or real weights) convolved with the Gaussian's samples
    ``exp(-d^2 / h)`` at the offsets ``d`` in -1, 0, 1 on each axis (separable; zero beyond the grid).

    Applied to trilinear accumulators this gives the ``gaussian`` kernel's (the module docstring). The kernel
    is symmetric, so it commutes with the Hermitian symmetrisation: either may come first.
    """
    q = math.exp(-1.0 / bandwidth)
    out = volume
    for dim in range(volume.dim()):
        size = out.shape[dim]
        smoothed = out.clone()
        smoothed.narrow(dim, 1, size - 1).add_(out.narrow(dim, 0, size - 1), alpha=q)
        smoothed.narrow(dim, 0, size - 1).add_(out.narrow(dim, 1, size - 1), alpha=q)
        out = smoothed
    return out


def _samples_transform(n: int, pad: float, bandwidth: float, device: torch.device | str | None) -> Tensor:
    """The Gaussian's samples' part of :func:`grid_kernel_envelope`, ``(n, n, n)`` float64."""
    p = padded_box(n, pad)
    q = math.exp(-1.0 / bandwidth)
    x = torch.arange(n, device=device, dtype=torch.float64) - n // 2
    axis = (1.0 + 2.0 * q * torch.cos(2.0 * math.pi * x / p)) / (1.0 + 2.0 * q)
    return axis[:, None, None] * axis[None, :, None] * axis[None, None, :]


def grid_kernel_envelope(n: int, pad: float = 2, bandwidth: float = DEFAULT_BANDWIDTH,
                         device: torch.device | str | None = None) -> Tensor:
    """Real-space attenuation ``(n, n, n)`` float64 of the ``gaussian`` kernel (:func:`kernel_on_grid` after
    trilinear insertion) on a map: ``sinc^2(r / P)`` (the trilinear part, radial as RELION's gridding
    correction) times ``prod_axes (1 + 2 q cos(2 pi x / P)) / (1 + 2 q)``, ``x`` voxels from the centre."""
    sinc2 = torch.sinc(radius_3d(n, device, torch.float64) / padded_box(n, pad)) ** 2
    return sinc2 * _samples_transform(n, pad, bandwidth, device)


def grid_kernel_correction(n: int, pad: float = 2, bandwidth: float = DEFAULT_BANDWIDTH,
                           device: torch.device | str | None = None) -> Tensor:
    """Factor ``(n, n, n)`` float32 that turns a map corrected for trilinear gridding into one corrected for
    the ``gaussian`` kernel: one over the samples' part of :func:`grid_kernel_envelope`."""
    return (1.0 / _samples_transform(n, pad, bandwidth, device)).to(torch.float32)
