"""Rotations in RELION's convention, and the parameterisations the engines optimise.

Every rotation inside cryocli is RELION's matrix ``A`` (shape ``(..., 3, 3)``), which rotates the map
into the image frame: the projection is ``p(x, y) = integral V(A^T (x, y, z)) dz`` and the central slice
is ``F2(kx, ky) = F3(A^T (kx, ky, 0))``. Euler angles are RELION's ZYZ ``(rot, tilt, psi)``:
``A = Rz(psi) @ Ry(tilt) @ Rz(rot)`` with passive elementary matrices. Angles are degrees at the file
boundary (``euler_to_matrix`` / ``matrix_to_euler``) and radians everywhere else.

The other representations describe the same matrix ``A`` read as an ordinary (active) linear map
``v -> A @ v`` on column vectors:

* quaternion ``(w, x, y, z)``, unit norm, ``w >= 0``: ``A`` is the Hamilton rotation matrix of ``q``;
* axis-angle vector ``omega`` (radians): ``A = expm([omega]_x)``, a right-handed turn by ``|omega|``
  about ``omega``;
* 6D (Zhou et al. 2019): the first two *columns* of ``A`` (``A[..., :, 0]`` then ``A[..., :, 1]``),
  turned back into a matrix by Gram-Schmidt; S2S2 (Cryo2SSNet appendix A.1) is the same map written as
  two 3-vectors ``v_x, v_y`` that become the first two columns.

Every function is batched over leading dimensions, works in float32 and float64, and is differentiable
(gradients stay finite at the identity and at half turns).
"""

from __future__ import annotations

import torch
from torch import Tensor

# Below this rotation angle (radians) the Rodrigues coefficients switch to Taylor series (cryoSPIN,
# appendix A). The series kept to t^4 has a truncation error t^6/5040, under the dtype's epsilon here.
_TAYLOR_ANGLE = {torch.float64: 1e-2, torch.float32: 0.1, torch.float16: 0.3, torch.bfloat16: 0.3}


def _rz(a: Tensor) -> Tensor:
    c, s = torch.cos(a), torch.sin(a)
    o, z = torch.ones_like(a), torch.zeros_like(a)
    return torch.stack([torch.stack([c, s, z], -1), torch.stack([-s, c, z], -1), torch.stack([z, z, o], -1)], -2)


def _ry(a: Tensor) -> Tensor:
    c, s = torch.cos(a), torch.sin(a)
    o, z = torch.ones_like(a), torch.zeros_like(a)
    return torch.stack([torch.stack([c, z, -s], -1), torch.stack([z, o, z], -1), torch.stack([s, z, c], -1)], -2)


def _angles_as_tensors(*angles: Tensor | float) -> list[Tensor]:
    """Angles as tensors of one floating dtype: that of the floating torch tensors among them (promoted), or
    the default dtype when there are none (numbers, numpy arrays and integer tensors follow that choice)."""
    floats = [a for a in angles if isinstance(a, Tensor) and a.is_floating_point()]
    dtype = floats[0].dtype if floats else torch.get_default_dtype()
    for a in floats[1:]:
        dtype = torch.promote_types(dtype, a.dtype)
    device = next((a.device for a in floats + [a for a in angles if isinstance(a, Tensor)]), None)
    return [torch.as_tensor(a, dtype=dtype, device=device) for a in angles]


def euler_to_matrix(rot: Tensor, tilt: Tensor, psi: Tensor) -> Tensor:
    """RELION Euler angles (degrees, shape ``(...)``) -> rotation matrices ``A`` of shape ``(..., 3, 3)``.

    Floating torch tensors keep their dtype and device (mixed ones are promoted); when no argument is a
    floating tensor (numbers, numpy arrays, integer tensors) the default dtype is used.
    """
    rot, tilt, psi = torch.broadcast_tensors(*(torch.deg2rad(a) for a in _angles_as_tensors(rot, tilt, psi)))
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


def projection_direction(matrix: Tensor) -> Tensor:
    """Viewing direction of each pose in the map frame: the third row of ``A``, shape ``(..., 3)``.

    For RELION angles this is ``(sin(tilt) cos(rot), sin(tilt) sin(rot), cos(tilt))``.
    """
    return matrix[..., 2, :]


# ----------------------------------------------------------------------------------------------- quaternions


def quaternion_to_matrix(quaternion: Tensor) -> Tensor:
    """Quaternions ``(..., 4)`` as ``(w, x, y, z)`` -> rotation matrices ``(..., 3, 3)``.

    The input is normalised first, so any non-zero 4-vector is accepted; ``q`` and ``-q`` give the same matrix.
    """
    q = quaternion / torch.linalg.vector_norm(quaternion, dim=-1, keepdim=True)
    w, x, y, z = q.unbind(-1)
    rows = [
        torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)], -1),
        torch.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)], -1),
        torch.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1),
    ]
    return torch.stack(rows, -2)


def matrix_to_quaternion(matrix: Tensor) -> Tensor:
    """Rotation matrices ``(..., 3, 3)`` -> unit quaternions ``(..., 4)`` ``(w, x, y, z)`` with ``w >= 0``.

    Shepperd's method: of the four formulas, each dividing by one of ``4w, 4x, 4y, 4z``, the one with the
    largest divisor is used, so no cancellation occurs at any angle. When ``w`` is exactly 0 (half turns)
    the sign is fixed by making the first non-zero of ``x, y, z`` positive.
    """
    m = matrix
    m00, m01, m02 = m[..., 0, 0], m[..., 0, 1], m[..., 0, 2]
    m10, m11, m12 = m[..., 1, 0], m[..., 1, 1], m[..., 1, 2]
    m20, m21, m22 = m[..., 2, 0], m[..., 2, 1], m[..., 2, 2]
    # 4 q_i^2 for i = w, x, y, z.
    four_sq = torch.stack([1 + m00 + m11 + m22, 1 + m00 - m11 - m22, 1 - m00 + m11 - m22, 1 - m00 - m11 + m22], -1)
    # Clamped so that the unused branches stay finite (their gradients are multiplied by zero below).
    tiny = torch.finfo(m.dtype).tiny ** 0.5
    s = torch.sqrt(torch.clamp(four_sq, min=tiny))  # s_i = 2 |q_i|
    a, b, c = m21 - m12, m02 - m20, m10 - m01  # 4 w (x, y, z)
    d, e, f = m01 + m10, m02 + m20, m12 + m21  # 4 (xy, xz, yz)
    candidates = torch.stack([
        torch.stack([s[..., 0] ** 2, a, b, c], -1) / (2 * s[..., 0:1]),
        torch.stack([a, s[..., 1] ** 2, d, e], -1) / (2 * s[..., 1:2]),
        torch.stack([b, d, s[..., 2] ** 2, f], -1) / (2 * s[..., 2:3]),
        torch.stack([c, e, f, s[..., 3] ** 2], -1) / (2 * s[..., 3:4]),
    ], -2)  # (..., 4 branches, 4 components)
    best = torch.nn.functional.one_hot(four_sq.argmax(-1), 4).to(m.dtype)
    q = (candidates * best.unsqueeze(-1)).sum(-2)
    q = q / torch.linalg.vector_norm(q, dim=-1, keepdim=True)
    return canonical_quaternion(q)


def canonical_quaternion(quaternion: Tensor) -> Tensor:
    """Choose the sign of each quaternion ``(..., 4)`` so that ``w >= 0`` (ties: first non-zero of x, y, z > 0)."""
    q = quaternion
    key = q[..., 0]
    for i in (1, 2, 3):
        key = torch.where(key == 0, q[..., i], key)
    return torch.where((key < 0).unsqueeze(-1), -q, q)


def quaternion_multiply(p: Tensor, q: Tensor) -> Tensor:
    """Hamilton product ``p * q`` of quaternions ``(..., 4)``; ``matrix(p * q) = matrix(p) @ matrix(q)``."""
    pw, px, py, pz = p.unbind(-1)
    qw, qx, qy, qz = q.unbind(-1)
    return torch.stack([
        pw * qw - px * qx - py * qy - pz * qz,
        pw * qx + px * qw + py * qz - pz * qy,
        pw * qy - px * qz + py * qw + pz * qx,
        pw * qz + px * qy - py * qx + pz * qw,
    ], -1)


def quaternion_distance(p: Tensor, q: Tensor) -> Tensor:
    """Cryo2SSNet's quaternion distance ``min(|p - q|, |p + q|)`` for unit quaternions ``(..., 4)`` -> ``(...)``.

    Dimensionless; equals ``2 sin(t / 4)`` for a relative rotation angle ``t``.
    """
    return torch.minimum(torch.linalg.vector_norm(p - q, dim=-1), torch.linalg.vector_norm(p + q, dim=-1))


# ------------------------------------------------------------------------------------------------ axis-angle


def _skew(v: Tensor) -> Tensor:
    """Cross-product matrices ``[v]_x`` ``(..., 3, 3)`` of vectors ``(..., 3)``: ``[v]_x @ u = v x u``."""
    x, y, z = v.unbind(-1)
    o = torch.zeros_like(x)
    return torch.stack([torch.stack([o, -z, y], -1), torch.stack([z, o, -x], -1), torch.stack([-y, x, o], -1)], -2)


def _rodrigues_coefficients(theta_sq: Tensor) -> tuple[Tensor, Tensor]:
    """``sin(t)/t`` and ``(1 - cos t)/t^2`` from ``t^2``, with Taylor series near 0 (cryoSPIN appendix A)."""
    small = theta_sq < _TAYLOR_ANGLE.get(theta_sq.dtype, 0.1) ** 2
    # Double `where`: the closed forms are evaluated at t = 1 where small, so no 0/0 reaches autograd.
    t = torch.sqrt(torch.where(small, torch.ones_like(theta_sq), theta_sq))
    half = torch.sin(t / 2) / (t / 2)
    a_closed = torch.sin(t) / t
    b_closed = 0.5 * half * half  # (1 - cos t)/t^2 = 2 sin^2(t/2)/t^2, free of cancellation
    a_series = 1 - theta_sq / 6 + theta_sq * theta_sq / 120
    b_series = 0.5 - theta_sq / 24 + theta_sq * theta_sq / 720
    return torch.where(small, a_series, a_closed), torch.where(small, b_series, b_closed)


def axis_angle_to_matrix(omega: Tensor) -> Tensor:
    """Axis-angle vectors ``(..., 3)`` (direction = axis, norm = angle in radians) -> matrices ``(..., 3, 3)``.

    Rodrigues' formula ``I + a K + b K^2`` with ``K = [omega]_x``, ``a = sin(t)/t``, ``b = (1 - cos t)/t^2``.
    Both coefficients are computed from ``t^2``, switching to their Taylor series below a small angle, so the
    map and its gradient are smooth at ``omega = 0`` (where ``dA/d omega_i = [e_i]_x``).
    """
    k = _skew(omega)
    a, b = _rodrigues_coefficients((omega * omega).sum(-1))
    eye = torch.eye(3, dtype=omega.dtype, device=omega.device).expand(k.shape)
    return eye + a[..., None, None] * k + b[..., None, None] * (k @ k)


def matrix_to_axis_angle(matrix: Tensor) -> Tensor:
    """Rotation matrices ``(..., 3, 3)`` -> axis-angle vectors ``(..., 3)`` with angle in ``[0, pi]`` (radians).

    Goes through Shepperd's quaternion, then ``t = 2 atan2(|v|, w)`` and ``omega = v t / |v|``, with the
    series ``t / |v| = (2 / w) atan(r) / r = (2 / w)(1 - r^2/3 + r^4/5 - r^6/7)``, ``r = |v| / w``, near
    the identity: accurate near 0 and near pi.
    At exactly pi the sign of the axis is arbitrary (both describe the same rotation).
    """
    q = matrix_to_quaternion(matrix)
    w, v = q[..., :1], q[..., 1:]
    n_sq = (v * v).sum(-1, keepdim=True)
    small = n_sq < _TAYLOR_ANGLE.get(matrix.dtype, 0.1) ** 2 / 4
    n = torch.sqrt(torch.where(small, torch.ones_like(n_sq), n_sq))
    closed = 2 * torch.atan2(n, w) / n
    # w > 0.99 in the series branch; elsewhere w may be 0 (half turns), so it is replaced to keep the
    # unused branch (and its gradient) finite.
    w_s = torch.where(small, w, torch.ones_like(w))
    r2 = n_sq / (w_s * w_s)
    series = (2 / w_s) * (1 - r2 / 3 + r2 * r2 / 5 - r2 * r2 * r2 / 7)
    return v * torch.where(small, series, closed)


def rotation_about_axis(axis: Tensor, angle: Tensor) -> Tensor:
    """Right-handed rotation by ``angle`` (radians, ``(...)``) about ``axis`` (``(..., 3)``, any length > 0).

    Returns ``(..., 3, 3)`` matrices acting on column vectors. RELION's passive ``Rz(a)`` is
    ``rotation_about_axis(z, -a)``.
    """
    axis = axis / torch.linalg.vector_norm(axis, dim=-1, keepdim=True)
    return axis_angle_to_matrix(axis * torch.as_tensor(angle, dtype=axis.dtype, device=axis.device)[..., None])


# ------------------------------------------------------------------------------------------------ 6D / S2S2


def _normalise(v: Tensor) -> Tensor:
    norm = torch.linalg.vector_norm(v, dim=-1, keepdim=True)
    return v / torch.clamp(norm, min=torch.finfo(v.dtype).tiny ** 0.5)


def s2s2_to_matrix(v_x: Tensor, v_y: Tensor) -> Tensor:
    """Two vectors ``(..., 3)`` -> rotation matrices ``(..., 3, 3)`` by Gram-Schmidt (Cryo2SSNet's S2S2).

    Column 0 is ``v_x / |v_x|``; column 1 is ``v_y`` made orthogonal to it and normalised; column 2 is their
    cross product. ``v_x`` and ``v_y`` must not be parallel.
    """
    b1 = _normalise(v_x)
    b2 = _normalise(v_y - (b1 * v_y).sum(-1, keepdim=True) * b1)
    b3 = torch.linalg.cross(b1, b2, dim=-1)
    return torch.stack([b1, b2, b3], -1)


def matrix_to_s2s2(matrix: Tensor) -> tuple[Tensor, Tensor]:
    """Rotation matrices ``(..., 3, 3)`` -> their first two columns ``(v_x, v_y)``, each ``(..., 3)``."""
    return matrix[..., :, 0], matrix[..., :, 1]


def sixd_to_matrix(sixd: Tensor) -> Tensor:
    """6D vectors ``(..., 6)`` = first column then second column (Zhou et al.) -> matrices ``(..., 3, 3)``."""
    return s2s2_to_matrix(sixd[..., :3], sixd[..., 3:])


def matrix_to_sixd(matrix: Tensor) -> Tensor:
    """Rotation matrices ``(..., 3, 3)`` -> 6D vectors ``(..., 6)``: column 0 followed by column 1."""
    return torch.cat(matrix_to_s2s2(matrix), -1)


# ------------------------------------------------------------------------------------- distances, sampling


def geodesic_distance(a: Tensor, b: Tensor) -> Tensor:
    """Angle (radians, in ``[0, pi]``) of the rotation ``a @ b^T`` between matrices ``(..., 3, 3)``.

    Computed as ``atan2(|skew part|, (trace - 1) / 2)``, which keeps full precision near 0 and near pi
    where ``acos`` of the trace loses half the digits.
    """
    m = a @ b.transpose(-1, -2)
    sin_v = torch.stack([m[..., 2, 1] - m[..., 1, 2], m[..., 0, 2] - m[..., 2, 0], m[..., 1, 0] - m[..., 0, 1]], -1)
    # sqrt clamped away from 0 so that the gradient at identical rotations is 0, not NaN.
    sin_t = 0.5 * torch.sqrt(torch.clamp((sin_v * sin_v).sum(-1), min=torch.finfo(m.dtype).tiny))
    cos_t = 0.5 * (m[..., 0, 0] + m[..., 1, 1] + m[..., 2, 2] - 1)
    return torch.atan2(sin_t, cos_t)


def project_to_so3(matrix: Tensor) -> Tensor:
    """The rotation nearest (Frobenius norm) to each matrix ``(..., 3, 3)`` -> ``(..., 3, 3)``.

    ``U diag(1, 1, det(U V^T)) V^T`` from the SVD ``U S V^T``: the orthogonal polar factor, with the sign of
    its last column fixed so that the result is a proper rotation (det +1). For averaging rotations
    (chordal mean) and cleaning up accumulated rounding.
    """
    u, _, vh = torch.linalg.svd(matrix)
    d = torch.det(u @ vh)
    fix = torch.ones((*d.shape, 3), dtype=matrix.dtype, device=matrix.device)
    fix[..., 2] = d
    return (u * fix[..., None, :]) @ vh


def random_quaternions(n: int, generator: torch.Generator | None = None, dtype: torch.dtype | None = None,
                       device: torch.device | str | None = None) -> Tensor:
    """``n`` unit quaternions ``(n, 4)`` uniform on SO(3) (normalised 4D Gaussians), canonical sign ``w >= 0``."""
    dtype = dtype or torch.get_default_dtype()
    where = generator.device if generator is not None else device
    g = torch.randn(n, 4, generator=generator, dtype=dtype, device=where).to(device)
    return canonical_quaternion(g / torch.linalg.vector_norm(g, dim=-1, keepdim=True))


def random_rotations(n: int, generator: torch.Generator | None = None, dtype: torch.dtype | None = None,
                     device: torch.device | str | None = None) -> Tensor:
    """``n`` rotation matrices ``(n, 3, 3)`` drawn from the Haar (uniform) measure on SO(3).

    The rotation angle then has density ``(1 - cos t) / pi`` on ``[0, pi]`` and viewing directions are
    uniform on the sphere. A ``generator`` on another device than ``device`` is allowed (drawn there, moved).
    """
    return quaternion_to_matrix(random_quaternions(n, generator, dtype, device))
