"""Rotations in RELION's convention.

Every rotation inside cryocli is RELION's matrix ``A`` (shape ``(..., 3, 3)``), which rotates the map
into the image frame: the projection is ``p(x, y) = integral V(A^T (x, y, z)) dz`` and the central slice
is ``F2(kx, ky) = F3(A^T (kx, ky, 0))``. Euler angles are RELION's ZYZ ``(rot, tilt, psi)``:
``A = Rz(psi) @ Ry(tilt) @ Rz(rot)`` with passive elementary matrices. Angles are degrees at the file
boundary (``euler_to_matrix`` / ``matrix_to_euler``) and radians everywhere else.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _rz(a: Tensor) -> Tensor:
    c, s = torch.cos(a), torch.sin(a)
    o, z = torch.ones_like(a), torch.zeros_like(a)
    return torch.stack([torch.stack([c, s, z], -1), torch.stack([-s, c, z], -1), torch.stack([z, z, o], -1)], -2)


def _ry(a: Tensor) -> Tensor:
    c, s = torch.cos(a), torch.sin(a)
    o, z = torch.ones_like(a), torch.zeros_like(a)
    return torch.stack([torch.stack([c, z, -s], -1), torch.stack([z, o, z], -1), torch.stack([s, z, c], -1)], -2)


def euler_to_matrix(rot: Tensor, tilt: Tensor, psi: Tensor) -> Tensor:
    """RELION Euler angles (degrees, shape ``(...)``) -> rotation matrices ``A`` of shape ``(..., 3, 3)``."""
    rot, tilt, psi = (torch.deg2rad(torch.as_tensor(a, dtype=torch.get_default_dtype())) for a in (rot, tilt, psi))
    return _rz(psi) @ _ry(tilt) @ _rz(rot)


def matrix_to_euler(matrix: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Rotation matrices ``(..., 3, 3)`` -> RELION ``(rot, tilt, psi)`` in degrees, as ``Euler_matrix2angles``.

    tilt is in [0, 180]; at the gimbal-lock poles (tilt 0 or 180) rot is set to 0 and psi carries the
    whole in-plane angle, as RELION does.
    """
    a = matrix
    abs_sb = torch.sqrt(a[..., 0, 2] ** 2 + a[..., 1, 2] ** 2)
    regular = abs_sb > 16 * torch.finfo(a.dtype).eps
    tilt_r = torch.atan2(abs_sb, a[..., 2, 2])
    psi_r = torch.atan2(a[..., 1, 2], -a[..., 0, 2])
    rot_r = torch.atan2(a[..., 2, 1], a[..., 2, 0])
    # Gimbal lock: tilt is 0 or 180, only rot +- psi is defined.
    sign = torch.where(a[..., 2, 2] >= 0, torch.ones_like(abs_sb), -torch.ones_like(abs_sb))
    tilt_s = torch.where(a[..., 2, 2] >= 0, torch.zeros_like(abs_sb), torch.full_like(abs_sb, torch.pi))
    psi_s = torch.atan2(-sign * a[..., 1, 0], sign * a[..., 0, 0])
    rot = torch.where(regular, rot_r, torch.zeros_like(rot_r))
    tilt = torch.where(regular, tilt_r, tilt_s)
    psi = torch.where(regular, psi_r, psi_s)
    return torch.rad2deg(rot), torch.rad2deg(tilt), torch.rad2deg(psi)
