"""Real-space masks: soft spheres and ``relion_mask_create``-style automatic masks.

Volumes are ``(n, n, n)`` arrays ``[z, y, x]`` with the centre at voxel ``n // 2``; distances are in
voxels. An automatic mask is built as ``relion_mask_create --lowpass L --ini_threshold T
--extend_inimask E --width_soft_edge W``:

1. low-pass the map at ``L`` A (RELION's raised-cosine filter, 2 shells wide);
2. binary seed: voxels with value ``>= T``;
3. extend: a voxel joins when a seed voxel lies at distance ``< E`` (strictly, as RELION);
4. soft edge: a voxel outside the extended mask at distance ``d < W`` from it gets
   ``0.5 + 0.5 cos(pi d / W)``; beyond, 0.

Distances to a binary mask are found with FFT convolutions (zero-padded, so the box edge is a hard
wall as in RELION): one convolution per distinct squared integer distance below ``W^2``, in
increasing order, the first hit giving the nearest distance.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from cryocli.imaging.filters import lowpass_filter
from cryocli.imaging.fourier import radius2_3d, radius_3d


def soft_sphere(n: int, radius: float, edge: float = 0.0, device: torch.device | str | None = None,
                dtype: torch.dtype = torch.float32) -> Tensor:
    """Sphere of ``radius`` voxels about voxel ``n // 2``: 1 inside, a raised cosine over ``edge`` voxels, 0 beyond."""
    r = radius_3d(n, device, torch.float64)
    if edge <= 0:
        return (r <= radius).to(dtype)
    ramp = 0.5 + 0.5 * torch.cos(torch.pi * (r - radius) / edge)
    return torch.where(r <= radius, torch.ones_like(r), torch.where(r >= radius + edge, torch.zeros_like(r), ramp)).to(dtype)


def _fft_size(n: int) -> int:
    """Smallest size >= n whose prime factors are 2, 3 and 5 (fast FFTs)."""
    m = n
    while True:
        k = m
        for p in (2, 3, 5):
            while k % p == 0:
                k //= p
        if k == 1:
            return m
        m += 1


class _BinaryConvolver:
    """Counts of True voxels of a binary volume ``(n, n, n)`` under centred kernels ``(k, k, k)``, by FFT.

    The transform of the volume is computed once and kernels are transformed in batches (one FFT call
    each way per batch: the per-call cost of the FFT library dominates at these sizes). Zero padding
    keeps the sums from wrapping around the box. float32 is exact enough: counts are small integers
    compared with 0.5.
    """

    def __init__(self, binary: Tensor, reach: int) -> None:
        self.n = binary.shape[-1]
        self.k = 2 * reach + 1
        self.size = _fft_size(self.n + self.k)
        self.spectrum = torch.fft.rfftn(binary.float(), s=(self.size,) * 3)

    def any_within(self, kernels: Tensor) -> Tensor:
        """For kernels ``(K, k, k, k)`` (0/1 weights): voxels with a True voxel under each -> bool ``(K, n, n, n)``."""
        dims, s = (-3, -2, -1), (self.size,) * 3
        budget = max(1, int(2**26 // self.size**3))  # about 256 MB of float32 per batch
        c, n = self.k // 2, self.n
        out = []
        for start in range(0, kernels.shape[0], budget):
            fk = torch.fft.rfftn(kernels[start:start + budget].float(), s=s, dim=dims)
            full = torch.fft.irfftn(self.spectrum * fk, s=s, dim=dims)
            out.append(full[:, c:c + n, c:c + n, c:c + n] > 0.5)
        return torch.cat(out)


def dilate(binary: Tensor, distance: float) -> Tensor:
    """Voxels with a True voxel of ``binary (n, n, n)`` at distance ``< distance`` voxels (RELION's extension)."""
    if distance <= 0:
        return binary.bool()
    reach = int(np.ceil(distance))
    kernel = (radius2_3d(2 * reach + 1, binary.device, torch.float64) < distance**2).float()
    return _BinaryConvolver(binary.bool(), reach).any_within(kernel[None])[0]


def erode(binary: Tensor, distance: float) -> Tensor:
    """True voxels with no False voxel (inside the box) at distance ``< distance`` voxels (RELION's shrinking)."""
    return binary.bool() & ~dilate(~binary.bool(), distance)


def distance_within(binary: Tensor, reach: float) -> Tensor:
    """Euclidean distance (voxels) from each voxel to the nearest True voxel of ``binary``, for distances ``< reach``.

    Voxels of ``binary`` get 0; voxels with no True voxel closer than ``reach`` get ``inf``. One FFT
    convolution per distinct squared integer distance (batched); the smallest one that hits wins.
    """
    b = binary.bool()
    dist = torch.where(b, 0.0, float("inf")).double()
    found = b.clone()
    r = int(np.ceil(reach))
    d2 = radius2_3d(2 * r + 1, b.device, torch.float64)  # offsets -r .. r on each axis
    radii2 = torch.unique(d2[(d2 > 0) & (d2 < reach**2)])
    if radii2.numel() == 0:
        return dist
    hits = _BinaryConvolver(b, r).any_within((d2[None] == radii2[:, None, None, None]).float())  # (S, n, n, n)
    # The nearest squared distance is the first shell (in increasing order) that holds a True voxel.
    first = torch.argmax(hits.to(torch.uint8), dim=0)
    any_hit = hits.any(dim=0) & ~found
    return torch.where(any_hit, torch.sqrt(radii2.double())[first], dist)


def soft_edge(binary: Tensor, width: float) -> Tensor:
    """``binary`` with a raised-cosine edge ``0.5 + 0.5 cos(pi d / width)`` for voxels at distance ``d < width`` outside it."""
    if width <= 0:
        return binary.double()
    d = distance_within(binary, width)
    edge = 0.5 + 0.5 * torch.cos(torch.pi * d.clamp_max(width) / width)
    return torch.where(torch.isinf(d), torch.zeros_like(d), edge)


def auto_mask(volume: np.ndarray | Tensor, voxel_size: float, threshold: float, extend: float = 3.0,
              soft_edge_width: float = 6.0, lowpass: float | None = 15.0) -> Tensor:
    """A ``relion_mask_create`` mask of ``volume (n, n, n)``: low-pass at ``lowpass`` A (None: none), threshold
    at ``threshold`` (map units), extend by ``extend`` voxels (negative shrinks), soft edge of ``soft_edge_width`` voxels.

    Returns a float32 mask in [0, 1] on the volume's device.
    """
    v = volume.double() if torch.is_tensor(volume) else torch.tensor(np.asarray(volume), dtype=torch.float64)
    if lowpass is not None and lowpass > 0:
        v = lowpass_filter(v, voxel_size, lowpass)
    seed = v >= threshold
    if extend > 0:
        seed = dilate(seed, extend)
    elif extend < 0:
        seed = erode(seed, -extend)
    return soft_edge(seed, soft_edge_width).float()


def mask_agreement(a: np.ndarray | Tensor, b: np.ndarray | Tensor) -> dict[str, float]:
    """Agreement of two masks: Dice of the ``> 0.5`` regions, Pearson correlation and max |difference|."""
    x = (a if torch.is_tensor(a) else torch.tensor(np.asarray(a))).double().reshape(-1)
    y = (b if torch.is_tensor(b) else torch.tensor(np.asarray(b))).double().reshape(-1).to(x.device)
    bx, by = x > 0.5, y > 0.5
    dice = 2 * (bx & by).sum() / max(int(bx.sum() + by.sum()), 1)
    corr = torch.corrcoef(torch.stack([x, y]))[0, 1]
    return {"dice": float(dice), "correlation": float(corr), "max_abs_difference": float((x - y).abs().max())}
