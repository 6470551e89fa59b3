"""Central-slice projection (forward, differentiable) and its exact adjoint, as RELION's Projector.

Fourier volumes
    A map of box ``n`` is divided by ``sinc^2(r / P)`` (RELION's ``griddingCorrect``; ``r`` is the voxel
    distance from the centre ``n // 2``), zero-padded to ``P = padded_box(n, pad)`` (``round(pad * n)``,
    made even) and Fourier transformed. The transform is kept, centred, on a cubic grid of odd size
    ``G = 2 * (R + 1) + 1`` with ``R = round(P / n * r_max)`` (RELION's ``pad_size``), holding the
    frequencies ``|k| <= R`` (in padded Fourier voxels) and zero elsewhere; index ``G // 2`` is the
    origin, so ``-k`` is ``flip`` of ``k`` on every axis. The values are the unnormalised DFT of the
    padded map, so a central slice is the unnormalised 2D DFT of the line integral of the map along z
    in voxel units: ``rfft_to_image(project(...))`` is ``sum_z`` of the rotated map. That holds
    exactly where the slice falls on grid points without the pre-correction (``A = I``); elsewhere
    trilinear interpolation attenuates by ``sinc^2(r / P)`` on average, which the pre-correction
    undoes, as in RELION (the projections equal ``relion_project``'s images, scale 1.0000, and a
    real-space rotate-and-sum to ~1%, the aliasing of the padded grid).

Slices
    A slice is an image half transform ``(B, n, n // 2 + 1)`` (layout of :mod:`cryocli.imaging.fourier`).
    Pixel ``(kx, ky)`` (Fourier pixels, ``|k| <= r_max``) reads the volume at ``s * A^T (kx, ky, 0)``
    with ``s = P / n`` (trilinear interpolation on the grid); pixels beyond ``r_max`` are zero. ``A`` is
    RELION's rotation matrix (``cryocli.geometry.rotations``), ``(B, 3, 3)``. Odd boxes: RELION's
    ``CenterFFT`` puts the origin of odd-sized *images* at ``n // 2 + 1`` (maps stay at ``n // 2``), so
    ``relion_project`` images of odd boxes sit one pixel further in x and y than cryocli's layout
    (measured on ASPIRE's 65 px sets; see ``tests/test_projector.py``). Even boxes agree exactly.

Sampling uses ``torch.nn.functional.grid_sample`` (trilinear, ``align_corners=True``) over all slices
at once (chunked only to bound memory), on CPU and GPU alike; the adjoint is a scatter-add
(``index_add_``) with the same trilinear weights and the same zero padding, so
``<P x, y> = <x, P* y>`` holds to rounding. :func:`project_volume_ft` is differentiable with respect
to the Fourier volume (a leaf an engine can optimise) and to the rotation matrices.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import Tensor
from torch.nn import functional

from cryocli.imaging.fourier import centred_grid_2d, radius2_3d, radius_3d, volume_to_fft

# Interpolation points per grid_sample call: bounds the temporary grids to ~100 MB.
DEFAULT_CHUNK_POINTS = 1 << 22
# Grid updates (points x kernel neighbours) per index_add_ of a scatter onto the grid on the CPU: a chunk whose
# temporaries stay in the core's cache is faster. Measured on 2 cores, 1.28 M pixels of 64 px slices: the trilinear
# kernel (8 neighbours) 177 / 143 / 134 / 139 / 171 ms in chunks of 2^13 ... 2^17 points, the 27-point Gaussian one
# 351 / 405 / 470 ms in chunks of 2^14 / 2^15 / 2^16 points. About 2^19 updates suits both.
SCATTER_CHUNK_UPDATES_CPU = 1 << 19
# Points per scatter on a GPU, whatever the kernel: large chunks keep the kernel launches few (~200 MB of
# temporaries for the Gaussian kernel).
SCATTER_CHUNK_POINTS_DEVICE = 1 << 18


def scatter_chunk_points(device: torch.device, neighbours: int = 8) -> int:
    """Points per scatter (``index_add_``) call on ``device`` for a kernel spreading each point over ``neighbours``
    grid points (8 trilinear, 27 Gaussian): cache-sized on the CPU, large elsewhere."""
    return max(1, SCATTER_CHUNK_UPDATES_CPU // neighbours) if device.type == "cpu" else SCATTER_CHUNK_POINTS_DEVICE


# ----------------------------------------------------------------------------------------------
# Grid geometry
# ----------------------------------------------------------------------------------------------

def padded_box(n: int, pad: float = 2) -> int:
    """Padded real-space box ``round(pad * n)``, made even as RELION does (pixels)."""
    p = int(round(pad * n))
    return p + p % 2


def default_r_max(n: int) -> int:
    """RELION's default maximum Fourier radius: ``n // 2`` pixels (Nyquist)."""
    return n // 2


def grid_radius(n: int, pad: float = 2, r_max: int | None = None) -> int:
    """Largest frequency kept on the Fourier grid, in padded Fourier voxels: ``round(P / n * r_max)``."""
    r_max = default_r_max(n) if r_max is None else r_max
    return int(round(padded_box(n, pad) / n * r_max))


def fourier_grid_size(n: int, pad: float = 2, r_max: int | None = None) -> int:
    """Odd size ``G = 2 * (R + 1) + 1`` of the centred Fourier grid (RELION's ``pad_size``)."""
    return 2 * (grid_radius(n, pad, r_max) + 1) + 1


def gridding_correct(volume: Tensor, padded: int) -> Tensor:
    """Divide a map ``(n, n, n)`` by ``sinc^2(r / padded)``, ``r`` = voxel distance from the centre.

    This is RELION's ``griddingCorrect`` for trilinear interpolation on a grid padded to ``padded``
    voxels: it pre-compensates the attenuation that trilinear interpolation in Fourier space causes.
    """
    r = radius_3d(volume.shape[-1], device=volume.device, dtype=torch.float64)
    sinc = torch.sinc(r / padded)
    return (volume.to(torch.float64) / sinc**2).to(volume.dtype)


def embed_spectrum(spectrum: Tensor, grid_size: int, radius: int) -> Tensor:
    """Put a centred full transform ``(P, P, P)`` on the centred grid ``(G, G, G)``, keeping ``|k| <= radius``.

    The DFT is periodic, so frequencies on the far edge (``+P / 2``) take the value of ``-P / 2``.
    """
    p = spectrum.shape[-1]
    half = grid_size // 2
    k = torch.arange(-half, half + 1, device=spectrum.device)
    idx = torch.remainder(k + p // 2, p)
    out = spectrum[idx][:, idx][:, :, idx]
    r2 = radius2_3d(grid_size, spectrum.device, torch.float64)
    return torch.where(r2 <= radius * radius, out, torch.zeros((), dtype=out.dtype, device=out.device))


def fourier_volume(volume: Tensor, pad: float = 2, r_max: int | None = None,
                   gridding_correction: bool = True) -> Tensor:
    """A real map ``(n, n, n)`` ``[z, y, x]`` -> its padded, centred Fourier grid ``(G, G, G)`` (complex).

    As RELION's ``Projector::computeFourierTransformMap``: gridding pre-correction (optional), zero
    padding to ``P = padded_box(n, pad)`` with the map centre ``n // 2`` at ``P // 2``, unnormalised
    DFT, frequencies beyond ``R = grid_radius(n, pad, r_max)`` set to zero. Precision follows the map
    (float32 -> complex64, float64 -> complex128).
    """
    n = volume.shape[-1]
    p = padded_box(n, pad)
    vol = gridding_correct(volume, p) if gridding_correction else volume
    padded = torch.zeros((p, p, p), dtype=vol.dtype, device=vol.device)
    o = p // 2 - n // 2
    padded[o:o + n, o:o + n, o:o + n] = vol
    return embed_spectrum(volume_to_fft(padded), fourier_grid_size(n, pad, r_max), grid_radius(n, pad, r_max))


# ----------------------------------------------------------------------------------------------
# Pixel sets of a slice
# ----------------------------------------------------------------------------------------------

@lru_cache(maxsize=64)
def _half_plane_cpu(n: int, r_max: int, skip_redundant: bool) -> tuple[Tensor, Tensor, Tensor]:
    ky = torch.fft.fftfreq(n, d=1.0 / n, dtype=torch.float64)
    kx = torch.fft.rfftfreq(n, d=1.0 / n, dtype=torch.float64)
    gy, gx = torch.meshgrid(ky, kx, indexing="ij")
    keep = gx**2 + gy**2 <= r_max * r_max
    if skip_redundant:
        # kx = 0, ky < 0 are the Friedel mates of kx = 0, ky > 0; RELION's backprojector skips them so
        # that Hermitian symmetrisation does not count them twice. The Nyquist row of an even box is
        # kept (RELION reads it as +n/2, it is its own mate).
        redundant = (gx == 0) & (gy < 0)
        if n % 2 == 0:
            redundant &= gy != -(n // 2)
        keep &= ~redundant
    pix = torch.nonzero(keep.reshape(-1)).reshape(-1)
    return pix, gx.reshape(-1)[pix], gy.reshape(-1)[pix]


def half_plane_pixels(n: int, r_max: int | None = None, skip_redundant: bool = False,
                      device: torch.device | str | None = None,
                      dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor, Tensor]:
    """Pixels of a half transform ``(n, n // 2 + 1)`` inside the circle ``|k| <= r_max`` (Fourier pixels).

    Returns ``(flat_index (M,) long, kx (M,), ky (M,))``; ``flat_index`` indexes the flattened
    ``n * (n // 2 + 1)`` half transform. ``skip_redundant`` drops ``kx = 0, ky < 0`` (see the backprojector).
    """
    r_max = default_r_max(n) if r_max is None else r_max
    pix, kx, ky = _half_plane_cpu(n, int(r_max), bool(skip_redundant))
    return pix.to(device), kx.to(device=device, dtype=dtype), ky.to(device=device, dtype=dtype)


@lru_cache(maxsize=64)
def _full_plane_cpu(n: int, r_max: int) -> tuple[Tensor, Tensor, Tensor]:
    gy, gx = centred_grid_2d(n, dtype=torch.float64)
    keep = gx**2 + gy**2 <= r_max * r_max
    pix = torch.nonzero(keep.reshape(-1)).reshape(-1)
    return pix, gx.reshape(-1)[pix], gy.reshape(-1)[pix]


def full_plane_pixels(n: int, r_max: int | None = None, device: torch.device | str | None = None,
                      dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor, Tensor]:
    """Pixels of a centred full 2D transform ``(n, n)`` (origin at ``n // 2``) with ``|k| <= r_max``.

    Returns ``(flat_index (M,) long, kx (M,), ky (M,))`` in Fourier pixels.
    """
    r_max = default_r_max(n) if r_max is None else r_max
    pix, kx, ky = _full_plane_cpu(n, int(r_max))
    return pix.to(device), kx.to(device=device, dtype=dtype), ky.to(device=device, dtype=dtype)


# ----------------------------------------------------------------------------------------------
# Trilinear sampling on a centred grid (grid_sample) and its adjoint
# ----------------------------------------------------------------------------------------------

def slice_coordinates(rotations: Tensor, kx: Tensor, ky: Tensor, scale: float) -> Tensor:
    """Grid coordinates ``scale * A^T (kx, ky, 0)``: ``(B, M, 3)`` as ``(x, y, z)`` voxels from the centre.

    rotations: ``(B, 3, 3)`` RELION ``A``; kx, ky: ``(M,)`` Fourier pixels. Differentiable in ``rotations``.
    """
    a = rotations.to(kx.dtype)
    # One batched matrix product: 4.8 x faster on the CPU than the same sum broadcast over the trailing axis of 3.
    return torch.matmul(torch.stack([kx, ky], 1) * scale, a[:, :2, :])


def _normalised_grid(coords: Tensor, grid: int) -> Tensor:
    """Voxel offsets from the centre index ``grid // 2`` -> ``grid_sample`` coordinates (align_corners=True)."""
    return (coords + (grid // 2)) * (2.0 / (grid - 1)) - 1.0


def channels_first(volume: Tensor) -> Tensor:
    """``(C, G, G, G)`` real view: complex -> (Re, Im) channels (no copy), real ``(G, G, G)`` -> one channel."""
    if volume.is_complex():
        return torch.view_as_real(volume).permute(3, 0, 1, 2)
    return volume[None] if volume.dim() == 3 else volume


def _chunk_rotations(n_rot: int, n_points: int, chunk_points: int) -> int:
    return max(1, min(n_rot, chunk_points // max(1, n_points)))


def sample_grid(channels: Tensor, coords: Tensor) -> Tensor:
    """Trilinear interpolation of ``channels (C, G, G, G)`` ``[z, y, x]`` at ``coords (N, 3)`` -> ``(C, N)``.

    coords are ``(x, y, z)`` voxel offsets from the centre index ``G // 2``; points whose neighbours
    fall outside the grid read zeros there. Differentiable in both arguments (``grid_sample``).
    """
    g, c, n = channels.shape[-1], channels.shape[0], coords.shape[0]
    grid = _normalised_grid(coords.to(channels.dtype), g)
    # PyTorch's CPU kernel for 3D grid_sample runs its batch in parallel and each batch entry on one thread: the
    # points are cut into `parts` batch entries that all read the same volume (expanded, not copied). Every point is
    # interpolated exactly as in one entry, so values and coordinate gradients are the same to the bit.
    parts = sampling_parts(channels, n)
    pad = (-n) % parts
    if pad:
        grid = torch.cat([grid, grid.new_zeros(pad, 3)])
    out = functional.grid_sample(channels[None].expand(parts, -1, -1, -1, -1), grid.reshape(parts, 1, 1, -1, 3),
                                 mode="bilinear", padding_mode="zeros", align_corners=True)
    return out.permute(1, 0, 2, 3, 4).reshape(c, -1)[:, :n]


#: Fewest points per batch entry worth a thread of :func:`sample_grid` (below it the threads' start-up dominates).
MIN_POINTS_PER_PART = 4096


def sampling_parts(channels: Tensor, n_points: int) -> int:
    """Batch entries :func:`sample_grid` cuts ``n_points`` into: the CPU's threads when the volume ``channels`` needs
    no gradient (an expanded volume's gradient would be summed from one copy per entry), else 1; always 1 on a GPU,
    whose kernel is parallel over the points."""
    if channels.device.type != "cpu" or channels.requires_grad:
        return 1
    return max(1, min(torch.get_num_threads(), n_points // MIN_POINTS_PER_PART))


def scatter_grid(values: Tensor, coords: Tensor, grid_size: int, out: Tensor | None = None,
                 chunk_points: int | None = None) -> Tensor:
    """Exact adjoint of :func:`sample_grid`: spread ``values (C, N)`` with the trilinear weights -> ``(C, G, G, G)``.

    coords ``(N, 3)`` as in :func:`sample_grid`; corners outside the grid are dropped, as ``grid_sample``'s
    zero padding reads them as zero. ``out`` (optional ``(C, G, G, G)``, contiguous) is added to in place
    and returned. One ``index_add_`` of the 8 corners of each point: on the CPU about twice as fast as
    ``grid_sample``'s own input-gradient kernel, which runs on one thread (measured on 64 px slices).
    """
    c, g = values.shape[0], grid_size
    chunk_points = scatter_chunk_points(values.device) if chunk_points is None else chunk_points
    if out is None:
        out = torch.zeros((c, g, g, g), dtype=values.dtype, device=values.device)
    flat_out = out.view(c, -1)
    d = torch.arange(2, device=values.device)
    offsets = ((d[:, None, None] * g + d[None, :, None]) * g + d[None, None, :]).reshape(-1)  # (z, y, x) corners
    for s in range(0, coords.shape[0], chunk_points):
        # Positions computed as grid_sample computes them (normalise, then unnormalise), so that the weights
        # are the forward's to the last bit and the adjoint identity holds to float32 rounding.
        pos = ((_normalised_grid(coords[s:s + chunk_points].to(values.dtype), g) + 1) / 2 * (g - 1)).T  # (3, N)
        # Lower corner at `base` in [0, G - 2], so that the 8 corners are base + offsets, all on the grid; the tent
        # max(0, 1 - |pos - corner|) is grid_sample's weight for each of them, also when the point lies off the
        # grid (its zero padding drops only the corners off the grid). A NaN point gets weight 0, as there.
        base = torch.nan_to_num(torch.floor(pos)).clamp(0, g - 2)
        w_low = torch.nan_to_num((1 - (pos - base).abs()).clamp_min(0))
        w_high = torch.nan_to_num((1 - (pos - base - 1).abs()).clamp_min(0))
        base = base.long()
        # Corner weights (8, N), (z, y, x) order: products of contiguous rows (broadcasting over small trailing
        # dimensions is several times slower on the CPU).
        wx, wy, wz = (torch.stack([w_low[i], w_high[i]]) for i in range(3))
        weights = ((wz[:, None, None] * wy[None, :, None]) * wx[None, None, :]).reshape(8, -1)
        flat = ((base[2] * g + base[1]) * g + base[0])[None] + offsets[:, None]
        contrib = values[:, None, s:s + chunk_points] * weights[None]  # (C, 8, N)
        flat_out.index_add_(1, flat.reshape(-1), contrib.reshape(c, -1))
    return out


def sample_slices(volume: Tensor, rotations: Tensor, kx: Tensor, ky: Tensor, scale: float,
                  chunk_points: int = DEFAULT_CHUNK_POINTS) -> Tensor:
    """Interpolate a centred grid at ``scale * A^T (kx, ky, 0)`` for every rotation.

    volume: complex ``(G, G, G)``, real ``(G, G, G)`` or real channels ``(C, G, G, G)``; rotations
    ``(B, 3, 3)``; kx, ky ``(M,)`` Fourier pixels. Returns ``(B, M)`` (complex or real) or ``(C, B, M)``
    for channel volumes. Differentiable in ``volume`` and ``rotations``.
    """
    _check_rotations(rotations)
    channels = channels_first(volume)
    g = channels.shape[-1]
    if channels.dim() != 4 or channels.shape[-3:] != (g, g, g):
        raise ValueError(f"volume must be a cube (G, G, G) or (C, G, G, G), got {tuple(volume.shape)}")
    kx, ky = kx.to(channels.dtype), ky.to(channels.dtype)
    b, m = rotations.shape[0], kx.shape[0]
    step = _chunk_rotations(b, m, chunk_points)
    parts = [sample_grid(channels, slice_coordinates(rotations[s:s + step], kx, ky, scale).reshape(-1, 3))
             for s in range(0, b, step)]
    vals = torch.cat(parts, dim=1).reshape(channels.shape[0], b, m)
    if volume.is_complex():
        return torch.complex(vals[0], vals[1])
    return vals[0] if volume.dim() == 3 else vals


def _check_rotations(rotations: Tensor) -> None:
    if rotations.dim() != 3 or rotations.shape[-2:] != (3, 3):
        raise ValueError(f"rotations must be (B, 3, 3), got {tuple(rotations.shape)}")


def project_volume_ft(volume_ft: Tensor, rotations: Tensor, n: int, pad: float = 2, r_max: int | None = None,
                      chunk_points: int = DEFAULT_CHUNK_POINTS) -> Tensor:
    """Central slices of a Fourier grid ``(G, G, G)`` (see :func:`fourier_volume`) -> ``(B, n, n // 2 + 1)``.

    rotations: ``(B, 3, 3)`` RELION ``A``. ``pad`` must be the padding the grid was made with (the slice
    is read at ``P / n`` grid voxels per Fourier pixel). Pixels with ``|k| > r_max`` (default ``n // 2``)
    are zero. Differentiable with respect to ``volume_ft`` and ``rotations``.
    """
    scale = padded_box(n, pad) / n
    pix, kx, ky = half_plane_pixels(n, r_max, device=volume_ft.device, dtype=volume_ft.real.dtype)
    vals = sample_slices(volume_ft, rotations, kx, ky, scale, chunk_points)
    h = n // 2 + 1
    out = torch.zeros((rotations.shape[0], n * h), dtype=vals.dtype, device=vals.device)
    return out.index_copy(1, pix, vals).reshape(-1, n, h)


def scatter_slices(values: Tensor, rotations: Tensor, kx: Tensor, ky: Tensor, scale: float, grid_size: int,
                   chunk_points: int = DEFAULT_CHUNK_POINTS, out: Tensor | None = None) -> Tensor:
    """Adjoint of :func:`sample_slices` for channel values ``(C, B, M)`` -> ``(C, G, G, G)`` (real); added to
    ``out`` in place when given (contiguous, same dtype)."""
    _check_rotations(rotations)
    c, b, m = values.shape
    kx, ky = kx.to(values.dtype), ky.to(values.dtype)
    if out is None:
        out = torch.zeros((c, grid_size, grid_size, grid_size), dtype=values.dtype, device=values.device)
    step = _chunk_rotations(b, m, chunk_points)
    for s in range(0, b, step):
        coords = slice_coordinates(rotations[s:s + step], kx, ky, scale).reshape(-1, 3)
        scatter_grid(values[:, s:s + step].reshape(c, -1), coords, grid_size, out)
    return out


def backproject_slices_ft(slices: Tensor, rotations: Tensor, n: int, pad: float = 2, r_max: int | None = None,
                          chunk_points: int = DEFAULT_CHUNK_POINTS) -> Tensor:
    """Exact adjoint of :func:`project_volume_ft`: slices ``(B, n, n // 2 + 1)`` -> complex grid ``(G, G, G)``.

    No Hermitian bookkeeping is done here (that is :class:`BackProjector`'s job).
    """
    grid = fourier_grid_size(n, pad, r_max)
    real_dtype = slices.real.dtype
    pix, kx, ky = half_plane_pixels(n, r_max, device=slices.device, dtype=real_dtype)
    picked = slices.reshape(slices.shape[0], -1)[:, pix]
    vals = torch.stack([picked.real, picked.imag])
    acc = scatter_slices(vals, rotations, kx, ky, padded_box(n, pad) / n, grid, chunk_points)
    return torch.complex(acc[0], acc[1])


# ----------------------------------------------------------------------------------------------
# Classes
# ----------------------------------------------------------------------------------------------

class Projector:
    """RELION's projector for one map: ``Projector(volume (n, n, n)).project(rotations) -> (B, n, n//2+1)``.

    volume: real map ``[z, y, x]`` (tensor or array; its dtype sets the precision). pad: padding factor
    (2 as RELION). r_max: largest Fourier radius in pixels (default ``n // 2``). The Fourier grid is
    ``self.volume_ft`` ``(G, G, G)``; engines that learn it use :func:`project_volume_ft` directly.
    """

    def __init__(self, volume: Tensor, pad: float = 2, gridding_correction: bool = True,
                 device: torch.device | str | None = None, r_max: int | None = None) -> None:
        vol = torch.as_tensor(volume)
        if vol.dim() != 3 or len(set(vol.shape)) != 1:
            raise ValueError(f"volume must be a cube (n, n, n), got {tuple(vol.shape)}")
        if not vol.is_floating_point():
            vol = vol.to(torch.float32)
        vol = vol.to(device) if device is not None else vol
        self.n = int(vol.shape[-1])
        self.pad = pad
        self.r_max = default_r_max(self.n) if r_max is None else int(r_max)
        self.volume_ft = fourier_volume(vol, pad, self.r_max, gridding_correction)

    @property
    def device(self) -> torch.device:
        return self.volume_ft.device

    def project(self, rotations: Tensor, chunk_points: int = DEFAULT_CHUNK_POINTS) -> Tensor:
        """Half-transform projections ``(B, n, n // 2 + 1)`` for rotations ``(B, 3, 3)``."""
        rot = rotations.to(device=self.device, dtype=self.volume_ft.real.dtype)
        return project_volume_ft(self.volume_ft, rot, self.n, self.pad, self.r_max, chunk_points)


class BackProjector:
    """Accumulates slices and weights on the padded Fourier grid, as RELION's ``BackProjector``.

    ``insert(slices, weights, rotations)`` adds ``trilinear * slice`` into :attr:`data` and
    ``trilinear * weight`` into :attr:`weight` (``(G, G, G)``, see :func:`fourier_grid_size`). With
    ``skip_redundant`` (the default, as RELION) the ``kx = 0, ky < 0`` pixels are left out: they are the
    Friedel mates of ``kx = 0, ky > 0``, and :meth:`symmetrised` adds every voxel's mate, so every
    image pixel then counts exactly once at ``k`` and once (conjugated) at ``-k``. Pixels with weight
    <= 0 are skipped, data included (as RELION). Accumulators are real tensors of ``dtype``.
    """

    def __init__(self, n: int, pad: float = 2, r_max: int | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> None:
        self.n = int(n)
        self.pad = pad
        self.r_max = default_r_max(self.n) if r_max is None else int(r_max)
        self.grid_size = fourier_grid_size(self.n, pad, self.r_max)
        self.scale = padded_box(self.n, pad) / self.n
        self.dtype = dtype
        g = self.grid_size
        # Channels: Re(data), Im(data), weight; one scatter fills all three.
        self._acc = torch.zeros((3, g, g, g), dtype=dtype, device=device)

    @property
    def device(self) -> torch.device:
        return self._acc.device

    def insert(self, slices: Tensor, weights: Tensor | None, rotations: Tensor, skip_redundant: bool = True,
               chunk_points: int = DEFAULT_CHUNK_POINTS) -> None:
        """Insert slices ``(B, n, n//2+1)`` complex with weights ``(B, n, n//2+1)`` (None: 1) at ``A (B, 3, 3)``."""
        _check_rotations(rotations)
        dev = self.device
        pix, kx, ky = half_plane_pixels(self.n, self.r_max, skip_redundant, device=dev, dtype=self.dtype)
        b = slices.shape[0]
        picked = slices.to(dev).reshape(b, -1)[:, pix]
        w = None if weights is None else weights.to(device=dev, dtype=self.dtype).reshape(b, -1)[:, pix]
        self.insert_pixels(picked, w, rotations, kx, ky, chunk_points)

    def insert_pixels(self, values: Tensor, weights: Tensor | None, rotations: Tensor, kx: Tensor, ky: Tensor,
                      chunk_points: int = DEFAULT_CHUNK_POINTS) -> None:
        """Insert the pixels ``(kx, ky)`` ``(M,)`` (Fourier pixels) of ``B`` slices: values ``(B, M)`` complex,
        weights ``(B, M)`` (None: 1), rotations ``(B, 3, 3)``; pixels with weight <= 0 are skipped, data included."""
        _check_rotations(rotations)
        dev, dt = self.device, self.dtype
        w = torch.ones(values.shape, dtype=dt, device=dev) if weights is None else weights.to(device=dev, dtype=dt)
        valid = (w > 0).to(dt)
        values = values.to(dev)
        packed = torch.stack([values.real.to(dt) * valid, values.imag.to(dt) * valid, w * valid])
        scatter_slices(packed, rotations.to(device=dev, dtype=dt), kx.to(device=dev, dtype=dt),
                       ky.to(device=dev, dtype=dt), self.scale, self.grid_size, chunk_points, out=self._acc)

    @property
    def data(self) -> Tensor:
        """Accumulated data ``(G, G, G)`` complex (a copy)."""
        return torch.complex(self._acc[0], self._acc[1])

    @property
    def weight(self) -> Tensor:
        """Accumulated weights ``(G, G, G)`` real (a copy)."""
        return self._acc[2].clone()

    def symmetrised(self) -> tuple[Tensor, Tensor]:
        """Hermitian-symmetrised ``(data, weight)``: ``D(k) + conj D(-k)``, ``W(k) + W(-k)``.

        The grid is odd and centred, so ``-k`` is a flip of every axis. The result is the accumulation
        one would get by inserting every image's full Fourier plane, and its inverse transform is real.
        """
        data, weight = self.data, self.weight
        dims = (0, 1, 2)
        return data + torch.flip(data, dims).conj(), weight + torch.flip(weight, dims)

    def merge(self, other: BackProjector) -> None:
        """Add another backprojector's accumulators (same grid), e.g. from another device."""
        if other.grid_size != self.grid_size:
            raise ValueError("backprojectors have different grids")
        self._acc += other._acc.to(device=self.device, dtype=self.dtype)

    @property
    def accumulators(self) -> Tensor:
        """The raw ``(3, G, G, G)`` accumulator (Re data, Im data, weight), e.g. for ``all_reduce`` in place."""
        return self._acc
