"""Cryo2SSNet's pose encoder (appendix A.1): a small CNN with an S2S2 rotation head.

Three convolutional blocks (two 3x3 Conv-ReLU and a 2x2 max pool each; 32, 64, 128 channels by default),
two fully connected layers of 512 with ReLU, then two linear layers that give the 3-vectors ``v_x`` and
``v_y``; Gram-Schmidt and a cross product turn them into a rotation
(:func:`cryocli.geometry.rotations.s2s2_to_matrix`), read as a RELION ``A`` matrix. cryocli's addition for
uncentred particles: a third linear layer gives an in-plane translation ``[x, y]`` in pixels, bounded by
``max_shift`` through ``tanh`` (the search in :mod:`cryocli.engines.abinitio.dhbs` supervises it).
Inputs are images ``(B, n, n)`` normalised per image (:func:`~cryocli.engines.abinitio.unbiased_loss.normalise`),
any box of at least ``2^blocks`` pixels (pooling rounds down).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from cryocli.geometry.rotations import s2s2_to_matrix


class S2S2Encoder(nn.Module):
    """``forward(images (B, n, n)) -> (rotations (B, 3, 3), shifts (B, 2) pixels)``.

    n: box (pixels). channels: filters of the convolutional blocks. hidden: widths of the fully connected
    layers. predict_shifts: give translations (zeros otherwise). max_shift: their bound in pixels.
    """

    def __init__(self, n: int, channels: Sequence[int] = (32, 64, 128), hidden: Sequence[int] = (512, 512),
                 predict_shifts: bool = True, max_shift: float = 4.0) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in, side = 1, int(n)
        for c_out in channels:
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(inplace=True),
                       nn.Conv2d(c_out, c_out, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            c_in, side = c_out, side // 2
        if side < 1:
            raise ValueError(f"box {n} is too small for {len(channels)} pooling blocks")
        self.features = nn.Sequential(*layers)
        mlp: list[nn.Module] = []
        width = c_in * side * side
        for h in hidden:
            mlp += [nn.Linear(width, h), nn.ReLU(inplace=True)]
            width = h
        self.mlp = nn.Sequential(*mlp)
        self.head_x = nn.Linear(width, 3)
        self.head_y = nn.Linear(width, 3)
        self.predict_shifts = bool(predict_shifts)
        self.max_shift = float(max_shift)
        self.head_t = nn.Linear(width, 2) if predict_shifts else None

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        feats = self.mlp(self.features(images[:, None]).flatten(1))
        rotations = s2s2_to_matrix(self.head_x(feats), self.head_y(feats))
        if self.head_t is not None:
            shifts = self.max_shift * torch.tanh(self.head_t(feats))
        else:
            shifts = torch.zeros(images.shape[0], 2, dtype=images.dtype, device=images.device)
        return rotations, shifts
