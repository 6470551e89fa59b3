"""Image encoders that predict poses: a VGG-style CNN backbone and multiple pose heads (cryoSPIN, cryoAI).

Input images are ``(B, n, n)`` real-space particles (any even ``n >= 16``). Optionally the image is
stacked with Gaussian-blurred copies of itself (a Gaussian pyramid kept at full size, as cryoAI's
low-pass filter bank) so that the first layers see the low-resolution signal at low SNR. The backbone
is blocks of 3x3 convolutions + ReLU (+ batch norm) followed by 2x2 max pooling, as VGG16; it stops at
a ``4 x 4`` feature map (adaptive average pooling makes it box independent). ``M`` heads, each a
fully-connected MLP with its own weights, turn the shared features into a 6D rotation (two 3-vectors
turned into a matrix by Gram-Schmidt, :func:`cryocli.geometry.rotations.sixd_to_matrix`) and,
optionally, an in-plane translation in pixels. All heads run as one batched matrix product.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from cryocli.geometry.rotations import sixd_to_matrix
from cryocli.imaging.fourier import rfft_frequencies

FEATURE_SIDE = 4


def gaussian_pyramid(images: Tensor, sigmas: Sequence[float]) -> Tensor:
    """``(B, n, n)`` -> ``(B, 1 + len(sigmas), n, n)``: the image and copies blurred by Gaussians of the given
    standard deviations (pixels), applied in Fourier space (periodic boundary)."""
    if not sigmas:
        return images[:, None]
    n = images.shape[-1]
    ky, kx = rfft_frequencies(n, images.device, images.dtype)
    k2 = ky**2 + kx**2
    spec = torch.fft.rfft2(images)
    s = torch.as_tensor(list(sigmas), device=images.device, dtype=images.dtype)
    filters = torch.exp(-2 * math.pi**2 * s[:, None, None] ** 2 * k2)
    blurred = torch.fft.irfft2(spec[:, None] * filters[None], s=(n, n))
    return torch.cat([images[:, None], blurred], 1)


class VGGBackbone(nn.Module):
    """VGG-style feature extractor: ``channels[i]`` filters in block ``i``, ``convs[i]`` 3x3 convolutions each,
    then 2x2 max pooling; as many blocks as halve ``n`` down to ``4`` (at most ``len(channels)``), then
    adaptive average pooling to ``4 x 4``. Output ``(B, channels[last] * 16)``."""

    def __init__(self, n: int, in_channels: int, channels: Sequence[int], convs: Sequence[int],
                 batch_norm: bool = True) -> None:
        super().__init__()
        n_blocks = max(1, min(len(channels), int(math.log2(max(n // FEATURE_SIDE, 1)))))
        layers: list[nn.Module] = []
        c_in = in_channels
        for c_out, k in zip(channels[:n_blocks], convs[:n_blocks], strict=False):
            for _ in range(k):
                layers.append(nn.Conv2d(c_in, c_out, 3, padding=1))
                if batch_norm:
                    layers.append(nn.BatchNorm2d(c_out))
                layers.append(nn.ReLU(inplace=True))
                c_in = c_out
            layers.append(nn.MaxPool2d(2))
        layers.append(nn.AdaptiveAvgPool2d(FEATURE_SIDE))
        self.features = nn.Sequential(*layers)
        self.out_features = c_in * FEATURE_SIDE * FEATURE_SIDE

    def forward(self, x: Tensor) -> Tensor:
        return self.features(x).flatten(1)


class MultiHeadLinear(nn.Module):
    """``M`` independent linear layers applied together: ``(B, M, i)`` or ``(B, i)`` -> ``(B, M, o)``."""

    def __init__(self, heads: int, in_features: int, out_features: int) -> None:
        super().__init__()
        bound = 1.0 / math.sqrt(in_features)
        self.weight = nn.Parameter(torch.empty(heads, in_features, out_features).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(heads, out_features).uniform_(-bound, bound))

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 2:
            return torch.einsum("bi,mio->bmo", x, self.weight) + self.bias
        return torch.einsum("bmi,mio->bmo", x, self.weight) + self.bias


class MultiHeadPoseEncoder(nn.Module):
    """Shared VGG backbone and ``heads`` pose heads.

    ``forward(images (B, n, n))`` returns ``(rotations (B, M, 3, 3), shifts (B, M, 2))``: RELION ``A``
    matrices and in-plane translations ``[x, y]`` in pixels (zeros when ``predict_shifts`` is off; at most
    ``max_shift`` pixels, through ``tanh``).
    """

    def __init__(self, n: int, heads: int = 7, channels: Sequence[int] = (64, 128, 256, 512),
                 convs: Sequence[int] = (2, 2, 3, 3), hidden: Sequence[int] = (256, 256),
                 pyramid_sigmas: Sequence[float] = (1.0, 2.0, 4.0), predict_shifts: bool = False,
                 max_shift: float | None = None, batch_norm: bool = True) -> None:
        super().__init__()
        self.n = int(n)
        self.heads = int(heads)
        self.pyramid_sigmas = tuple(float(s) for s in pyramid_sigmas)
        self.predict_shifts = predict_shifts
        self.max_shift = float(max_shift) if max_shift is not None else self.n / 8
        self.backbone = VGGBackbone(self.n, 1 + len(self.pyramid_sigmas), channels, convs, batch_norm)
        layers: list[nn.Module] = []
        width = self.backbone.out_features
        for h in hidden:
            layers += [MultiHeadLinear(self.heads, width, h), nn.ReLU(inplace=True)]
            width = h
        self.mlp = nn.Sequential(*layers)
        self.out = MultiHeadLinear(self.heads, width, 8 if predict_shifts else 6)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        x = gaussian_pyramid(images, self.pyramid_sigmas)
        feats = self.backbone(x)
        hidden = self.mlp(feats) if len(self.mlp) else feats[:, None].expand(-1, self.heads, -1)
        out = self.out(hidden)
        rotations = sixd_to_matrix(out[..., :6])
        if self.predict_shifts:
            shifts = self.max_shift * torch.tanh(out[..., 6:8])
        else:
            shifts = torch.zeros(*out.shape[:2], 2, dtype=out.dtype, device=out.device)
        return rotations, shifts
