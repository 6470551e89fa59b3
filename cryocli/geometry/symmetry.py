"""Point-group symmetry with RELION's axis conventions.

RELION builds every group from a short list of rotation axes (``SymList::fill_symmetry_class`` in
``src/symmetries.cpp``, conventions inherited from Xmipp and Heymann, Chagoyen & Belnap 2005, J. Struct.
Biol. 151:196) and closes the set under multiplication (``SymList::compute_subgroup``):

======  ===========================================================================================
``Cn``  n-fold about z
``Dn``  n-fold about z, 2-fold about x
``T``   3-fold about z, 2-fold about (0, 0.816496, 0.577350)
``O``   3-fold about (1, 1, 1)/sqrt(3), 4-fold about z
``I``   = ``I2``: 2-fold about z, 5-fold about (0.525731114, 0, 0.850650807), 3-fold about
        (0, 0.356822076, 0.934172364)
``I1``  2-fold about x, 5-fold about (0.85065080702670, 0, -0.5257311142635), 3-fold about
        (0.9341723640, 0.3568220765, 0)
``I3``  2-fold about (-0.5257311143, 0, 0.8506508070), 5-fold about z, 3-fold about
        (-0.4911234778630044, 0.3568220764705179, 0.7946544753759428)
``I4``  2-fold about (0.5257311143, 0, 0.8506508070), 5-fold about (0.8944271932547096, 0, 0.4472135909903704),
        3-fold about (0.4911234778630044, 0.3568220764705179, 0.7946544753759428)
======  ===========================================================================================

(These are RELION's numbers, kept in :data:`RELION_AXES`.) The groups here are generated from the exact
closed forms of those axes (golden ratio ``phi``: ``0.5257 = 1/sqrt(1 + phi^2)``, ``0.8507 = phi/sqrt(1 + phi^2)``,
``0.8944 = 2/sqrt(5)``; ``0.8165 = sqrt(2/3)``); the tests check that they agree with RELION's decimals and
that every axis RELION lists is an axis of the group. I5 (recognised but not implemented by RELION) and
groups with mirrors or inversions (Ci, Cs, Cnv, Cnh, Sn, Dnv, Dnh, Td, Th, Oh, Ih, ...) are refused: a
molecule's map has no improper symmetry.

Operators act on map coordinates ``(x, y, z)`` (relative to the centre voxel ``n // 2``; arrays are
``[z, y, x]``). A map symmetric under the group satisfies ``V(R x) = V(x)`` for every operator ``R``;
a particle seen with pose ``A`` is seen identically with every pose ``A @ R``.
"""

from __future__ import annotations

import math
import re
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

from cryocli.errors import CryocliError
from cryocli.imaging.fourier import centred_grid_3d

_PHI = (1 + math.sqrt(5)) / 2
_A = 1 / math.sqrt(1 + _PHI**2)  # 0.5257311121
_B = _PHI / math.sqrt(1 + _PHI**2)  # 0.8506508084

# RELION's generators, copied as numbers from src/symmetries.cpp (fill_symmetry_class): (fold, axis).
RELION_AXES: dict[str, tuple[tuple[int, tuple[float, float, float]], ...]] = {
    "T": ((3, (0.0, 0.0, 1.0)), (2, (0.0, 0.816496, 0.577350))),
    "O": ((3, (0.5773502, 0.5773502, 0.5773502)), (4, (0.0, 0.0, 1.0))),
    "I1": ((2, (1.0, 0.0, 0.0)), (5, (0.85065080702670, 0.0, -0.5257311142635)),
           (3, (0.9341723640, 0.3568220765, 0.0))),
    "I2": ((2, (0.0, 0.0, 1.0)), (5, (0.525731114, 0.0, 0.850650807)), (3, (0.0, 0.356822076, 0.934172364))),
    "I3": ((2, (-0.5257311143, 0.0, 0.8506508070)), (5, (0.0, 0.0, 1.0)),
           (3, (-0.4911234778630044, 0.3568220764705179, 0.7946544753759428))),
    "I4": ((2, (0.5257311143, 0.0, 0.8506508070)), (5, (0.8944271932547096, 0.0, 0.4472135909903704)),
           (3, (0.4911234778630044, 0.3568220764705179, 0.7946544753759428))),
}

# The same groups from exact axes (two generators suffice; RELION's third axis is checked by the tests).
_EXACT_AXES: dict[str, tuple[tuple[int, tuple[float, float, float]], ...]] = {
    "T": ((3, (0.0, 0.0, 1.0)), (2, (0.0, math.sqrt(2 / 3), math.sqrt(1 / 3)))),
    "O": ((3, (1.0, 1.0, 1.0)), (4, (0.0, 0.0, 1.0))),
    "I1": ((2, (1.0, 0.0, 0.0)), (5, (_B, 0.0, -_A))),
    "I2": ((2, (0.0, 0.0, 1.0)), (5, (_A, 0.0, _B))),
    "I3": ((2, (-_A, 0.0, _B)), (5, (0.0, 0.0, 1.0))),
    "I4": ((2, (_A, 0.0, _B)), (5, (2.0, 0.0, 1.0))),
}

_IMPROPER = re.compile(r"^(CI|CS|C\d+[HV]|S\d+|D\d+[HV]|T[DH]|OH|I\d?H)$")


def _axis_rotation(axis: tuple[float, float, float], angle: float) -> np.ndarray:
    """Right-handed rotation matrix (3, 3) by ``angle`` radians about ``axis`` (float64)."""
    u = np.asarray(axis, dtype=np.float64)
    u = u / np.linalg.norm(u)
    k = np.array([[0, -u[2], u[1]], [u[2], 0, -u[0]], [-u[1], u[0], 0]])
    return np.eye(3) + math.sin(angle) * k + (1 - math.cos(angle)) * (k @ k)


def _close(generators: list[np.ndarray], tol: float = 1e-9) -> np.ndarray:
    """Identity, then the generators, then new products until the set is closed: (K, 3, 3).

    For a finite group, closing under left multiplication by the generators gives the whole group.
    """
    group = np.eye(3)[None]

    def add(m: np.ndarray) -> np.ndarray:
        known = np.abs(group - m).max(axis=(1, 2)).min() < tol
        return group if known else np.concatenate([group, m[None]])

    for g in generators:
        group = add(g)
    i = 0
    while i < len(group):
        for g in generators:
            group = add(g @ group[i])
        if len(group) > 1000:
            raise RuntimeError("symmetry closure did not terminate: the generators are inconsistent")
        i += 1
    return group


def _generators(axes: tuple[tuple[int, tuple[float, float, float]], ...]) -> list[np.ndarray]:
    return [_axis_rotation(axis, 2 * math.pi * j / fold) for fold, axis in axes for j in range(1, fold)]


def parse_symmetry(name: str) -> tuple[str, int]:
    """Symmetry name (case-insensitive, e.g. ``c2``, ``D7``, ``I``, ``i3``) -> ``(kind, n)``.

    ``kind`` is one of ``C, D, T, O, I1, I2, I3, I4`` (``I`` means ``I2``, as in RELION); ``n`` is the
    order of the principal axis for C and D (0 otherwise). Raises :class:`CryocliError` for anything else.
    """
    key = name.strip().upper()
    m = re.fullmatch(r"([CD])(\d+)", key)
    if m:
        n = int(m.group(2))
        if n < 1:
            raise CryocliError(f"symmetry {name!r}: the order must be at least 1")
        return m.group(1), n
    if key in ("T", "O", "I1", "I2", "I3", "I4"):
        return key, 0
    if key == "I":
        return "I2", 0
    if key in ("I5", "I5H"):
        raise CryocliError(f"symmetry {name!r} is not implemented (RELION does not implement I5 either)")
    if _IMPROPER.match(key):
        raise CryocliError(f"symmetry {name!r} contains mirrors or an inversion; only proper point groups "
                           "(C1, Cn, Dn, T, O, I, I1-I4) apply to a molecule's map")
    raise CryocliError(f"unknown symmetry {name!r}: expected C1, Cn, Dn, T, O, I, I1, I2, I3 or I4")


@lru_cache(maxsize=64)
def _operators(kind: str, n: int) -> np.ndarray:
    if kind == "C":
        gens = _generators(((n, (0.0, 0.0, 1.0)),))
    elif kind == "D":
        gens = _generators(((n, (0.0, 0.0, 1.0)), (2, (1.0, 0.0, 0.0))))
    else:
        gens = _generators(_EXACT_AXES[kind])
    ops = _close(gens)
    ops[np.abs(ops) < 1e-15] = 0.0
    return ops


def symmetry_operators(name: str, dtype: torch.dtype = torch.float64,
                       device: torch.device | str | None = None) -> Tensor:
    """Rotation matrices ``(K, 3, 3)`` of the point group ``name`` (RELION's axes), identity first.

    After the identity come the rotations about each generating axis (RELION's order of axes), then the
    products that close the group. ``K`` is n (Cn), 2n (Dn), 12 (T), 24 (O) or 60 (I, I1-I4).
    """
    kind, n = parse_symmetry(name)
    return torch.tensor(_operators(kind, n), dtype=dtype, device=device)  # a copy: the cache stays intact


def symmetry_order(name: str) -> int:
    """Number of operators of the point group ``name``."""
    kind, n = parse_symmetry(name)
    return len(_operators(kind, n))


def equivalent_poses(rotations: Tensor, operators: Tensor) -> Tensor:
    """Poses ``(..., 3, 3)`` -> all symmetry-equivalent poses ``(..., K, 3, 3)``: ``A @ R`` for each operator.

    For a map with ``V(R x) = V(x)``, ``V((A R)^T x) = V(R^T A^T x) = V(A^T x)``: the projections agree.
    """
    return rotations.unsqueeze(-3) @ operators.to(rotations)


def symmetrize_volume(volume: Tensor, operators: Tensor) -> Tensor:
    """Average of a map over a point group: ``mean_k V(R_k x)`` with trilinear interpolation.

    ``volume`` is ``(n, n, n)`` or ``(B, n, n, n)``, arrays ``[z, y, x]`` rotated about voxel ``n // 2``
    (coordinates in voxels); samples that fall outside the box count as 0, as in RELION's
    ``symmetriseMap`` without wrapping. The loop runs over the (at most 60) operators, each one a single
    batched ``grid_sample`` on the whole map.
    """
    squeeze = volume.ndim == 3
    vol = volume.unsqueeze(0) if squeeze else volume
    n = vol.shape[-1]
    if vol.ndim != 4 or vol.shape[-3:] != (n, n, n):
        raise CryocliError(f"expected a cubic map (n, n, n) or (B, n, n, n), got {tuple(volume.shape)}")
    ops = operators.to(device=vol.device, dtype=vol.dtype)
    z, y, x = centred_grid_3d(n, vol.device, vol.dtype)
    xyz = torch.stack([x, y, z], -1)  # (n, n, n, 3) as (x, y, z)
    scale = 2.0 / (n - 1)
    total = torch.zeros_like(vol)
    inp = vol.unsqueeze(1)  # (B, 1, n, n, n)
    for op in ops:
        src = xyz @ op.T  # R x for every voxel
        grid = ((src + n // 2) * scale - 1).expand(vol.shape[0], n, n, n, 3)
        total = total + torch.nn.functional.grid_sample(inp, grid, mode="bilinear", padding_mode="zeros",
                                                        align_corners=True)[:, 0]
    out = total / len(ops)
    return out[0] if squeeze else out
