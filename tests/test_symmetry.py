"""Point groups with RELION's axes (cryocli.geometry.symmetry)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from cryocli.errors import CryocliError
from cryocli.geometry.rotations import matrix_to_axis_angle, random_rotations, rotation_about_axis
from cryocli.geometry.symmetry import (
    RELION_AXES,
    equivalent_poses,
    parse_symmetry,
    symmetrize_volume,
    symmetry_operators,
    symmetry_order,
)
from cryocli.io.mrc import read_map

from .conftest import CRYOJAX, DEVICES, need

ORDERS = {"C1": 1, "C2": 2, "C7": 7, "C12": 12, "D1": 2, "D2": 4, "D7": 14, "T": 12, "O": 24,
          "I": 60, "I1": 60, "I2": 60, "I3": 60, "I4": 60}
PHI = (1 + math.sqrt(5)) / 2


def _contains(ops: torch.Tensor, m: torch.Tensor, tol: float) -> bool:
    return bool(((ops - m).abs().amax((-2, -1)) < tol).any())


def _axes(ops: torch.Tensor, angle_deg: float) -> set[tuple[float, ...]]:
    """Unit axes (sign-normalised, rounded) of the operators that turn by ``angle_deg``."""
    omega = matrix_to_axis_angle(ops)
    angle = omega.norm(dim=-1)
    found = set()
    for w in omega[(angle - math.radians(angle_deg)).abs() < 1e-9]:
        u = (w / w.norm()).numpy()
        u = -u if u[np.flatnonzero(np.abs(u) > 1e-9)[0]] < 0 else u
        found.add(tuple(np.round(u, 6) + 0.0))
    return found


def _normalised_set(vectors) -> set[tuple[float, ...]]:
    out = set()
    for v in vectors:
        u = np.asarray(v, dtype=float) / np.linalg.norm(v)
        u = -u if u[np.flatnonzero(np.abs(u) > 1e-9)[0]] < 0 else u
        out.add(tuple(np.round(u, 6) + 0.0))
    return out


def _signed_cyclic(a: float, b: float) -> list[tuple[float, float, float]]:
    """(0, +-a, +-b) and its cyclic permutations."""
    base = [(0.0, sa * a, sb * b) for sa in (1, -1) for sb in (1, -1)]
    return [v[k:] + v[:k] for v in base for k in range(3)]


@pytest.mark.parametrize("name", sorted(ORDERS))
def test_group_order_closure_and_proper_rotations(name):
    ops = symmetry_operators(name)
    assert ops.shape == (ORDERS[name], 3, 3) and symmetry_order(name) == ORDERS[name]
    assert torch.equal(ops[0], torch.eye(3, dtype=torch.float64))
    eye = torch.eye(3, dtype=torch.float64)
    assert (ops @ ops.transpose(-1, -2) - eye).abs().max() < 1e-13
    assert (torch.linalg.det(ops) - 1).abs().max() < 1e-13
    products = (ops[:, None] @ ops[None]).reshape(-1, 3, 3)
    distance_to_set = (products[:, None] - ops[None]).abs().amax((-2, -1)).min(1).values
    assert distance_to_set.max() < 1e-12  # closed under multiplication
    # All distinct.
    gaps = (ops[:, None] - ops[None]).abs().amax((-2, -1)) + 10 * torch.eye(len(ops), dtype=torch.float64)
    assert gaps.min() > 1e-3


def test_names_are_parsed_like_relion():
    assert parse_symmetry("c2") == ("C", 2)
    assert parse_symmetry(" D7 ") == ("D", 7)
    assert parse_symmetry("i") == ("I2", 0)  # RELION's default icosahedral setting
    assert parse_symmetry("I3") == ("I3", 0)
    assert torch.equal(symmetry_operators("i"), symmetry_operators("I2"))
    for bad in ("X3", "C0", "", "C", "I5", "D4h", "Oh", "Ci", "C2v", "S4", "I2h", "Td", "12"):
        with pytest.raises(CryocliError):
            symmetry_operators(bad)


def test_cyclic_and_dihedral_axes():
    z, x = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64), torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    c5 = symmetry_operators("C5")
    for k in range(5):
        assert _contains(c5, rotation_about_axis(z, torch.tensor(2 * math.pi * k / 5, dtype=torch.float64)), 1e-12)
    d3 = symmetry_operators("D3")
    assert _contains(d3, rotation_about_axis(x, torch.tensor(math.pi, dtype=torch.float64)), 1e-12)
    assert _axes(d3, 180) == _normalised_set([(1, 0, 0), (-0.5, math.sqrt(3) / 2, 0), (0.5, math.sqrt(3) / 2, 0)])


@pytest.mark.parametrize("name", sorted(RELION_AXES))
def test_every_axis_relion_lists_is_a_symmetry_axis(name):
    ops = symmetry_operators(name)
    # RELION's constants are good to ~2e-8 (the icosahedral ones, whatever digits are printed) and to
    # 6 decimals for T's 2-fold; the groups here come from the exact closed forms.
    tol = 1e-6 if name == "T" else 1e-7
    for fold, axis in RELION_AXES[name]:
        u = torch.tensor(axis, dtype=torch.float64)
        for k in range(1, fold):
            turn = rotation_about_axis(u, torch.tensor(2 * math.pi * k / fold, dtype=torch.float64))
            assert _contains(ops, turn, tol), (name, fold, axis, k)


def test_icosahedral_settings():
    # I2: 2-folds on x, y, z; 5-folds through the vertices (0, +-phi, +-1) and cyclic permutations,
    # among them RELION's (0.525731114, 0, 0.850650807) = (1, 0, phi) / |.|.
    vertices_i2 = _normalised_set(_signed_cyclic(PHI, 1.0))
    assert _axes(symmetry_operators("I2"), 72) == vertices_i2
    assert _normalised_set([(0.525731114, 0, 0.850650807)]) <= vertices_i2
    # I1 is I2 turned by 90 degrees about y: 5-folds through (0, +-1, +-phi) and cyclic permutations.
    assert _axes(symmetry_operators("I1"), 72) == _normalised_set(_signed_cyclic(1.0, PHI))
    for name in ("I1", "I2"):
        assert _normalised_set([(1, 0, 0), (0, 1, 0), (0, 0, 1)]) <= _axes(symmetry_operators(name), 180)
    # I3 has a 5-fold on z, I4 one on (2, 0, 1)/sqrt(5); each group has 6 five-fold, 10 three-fold and
    # 15 two-fold axes.
    assert (0.0, 0.0, 1.0) in _axes(symmetry_operators("I3"), 72)
    assert _normalised_set([(2, 0, 1)]) <= _axes(symmetry_operators("I4"), 72)
    for name in ("I1", "I2", "I3", "I4"):
        ops = symmetry_operators(name)
        assert (len(_axes(ops, 72)), len(_axes(ops, 120)), len(_axes(ops, 180))) == (6, 10, 15)


def test_tetrahedral_and_octahedral_settings():
    t = symmetry_operators("T")
    assert (0.0, 0.0, 1.0) in _axes(t, 120)  # RELION's T: 3-fold on z, not the 2-folds on x, y, z
    assert len(_axes(t, 120)) == 4 and len(_axes(t, 180)) == 3
    assert _normalised_set([(0, math.sqrt(2 / 3), math.sqrt(1 / 3))]) <= _axes(t, 180)
    # O with a 4-fold on z and a 3-fold on (1, 1, 1) is the group of signed permutation matrices.
    o = symmetry_operators("O")
    signed_perms = []
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product((1.0, -1.0), repeat=3):
            m = np.zeros((3, 3))
            m[range(3), perm] = signs
            if np.linalg.det(m) > 0:
                signed_perms.append(m)
    assert len(signed_perms) == 24
    assert all(_contains(o, torch.as_tensor(m), 1e-12) for m in signed_perms)


@pytest.mark.parametrize("device", DEVICES)
def test_trpv1_map_has_relion_c4_about_z(device: str):
    """TRPV1 (cryojax test map, a C4 tetramer) is invariant under RELION's C4 operators, not C3 or D4."""
    vol = np.asarray(read_map(need(CRYOJAX / "trpv1_volume.mrc")).data, dtype=np.float64)
    n = vol.shape[0]
    centre = np.full(3, n // 2)

    def turned(op: np.ndarray) -> np.ndarray:
        # V(R x) with x = (x, y, z) and arrays [z, y, x]: reverse the axis order around R.
        m = op[::-1, ::-1]
        return ndimage.affine_transform(vol, m, offset=centre - m @ centre, order=1, mode="grid-constant")

    def corr(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])

    c4 = [corr(vol, turned(op)) for op in symmetry_operators("C4").numpy()[1:]]
    c3 = [corr(vol, turned(op)) for op in symmetry_operators("C3").numpy()[1:]]
    d4_extra = [corr(vol, turned(op)) for op in symmetry_operators("D4").numpy()[4:]]
    assert min(c4) > 0.999, c4
    assert max(c3) < 0.7, c3
    assert max(d4_extra) < 0.5, d4_extra
    sym = symmetrize_volume(torch.as_tensor(vol).to(device), symmetry_operators("C4", device=device)).cpu().numpy()
    assert corr(sym, vol) > 0.999


@pytest.mark.parametrize("device", DEVICES)
def test_symmetrize_volume_matches_scipy_and_is_idempotent(device: str):
    gen = torch.Generator().manual_seed(0)
    vol = torch.rand(16, 16, 16, generator=gen, dtype=torch.float64)
    ops = symmetry_operators("I2")
    ours = symmetrize_volume(vol.to(device), ops.to(device)).cpu()
    centre = np.full(3, 8.0)
    ref = np.zeros((16, 16, 16))
    for op in ops.numpy():
        m = op[::-1, ::-1]
        ref += ndimage.affine_transform(vol.numpy(), m, offset=centre - m @ centre, order=1, mode="grid-constant")
    ref /= len(ops)
    assert np.abs(ours.numpy() - ref).max() < 1e-10
    # Batched input gives the same maps.
    assert torch.allclose(symmetrize_volume(torch.stack([vol, 2 * vol]).to(device), ops.to(device))[1].cpu(), 2 * ours)
    # O on an odd box moves voxels onto voxels: exactly idempotent and invariant.
    odd = torch.rand(15, 15, 15, generator=gen, dtype=torch.float64)
    o = symmetry_operators("O", device=device)
    once = symmetrize_volume(odd.to(device), o)
    assert (symmetrize_volume(once, o).cpu() - once.cpu()).abs().max() < 1e-12
    assert all((symmetrize_volume(once, op[None]).cpu() - once.cpu()).abs().max() < 1e-12 for op in o)
    assert (once.cpu() - odd).abs().max() > 0.1


def _project(volume: torch.Tensor, pose: torch.Tensor) -> torch.Tensor:
    """Real-space projection ``sum_z V(A^T (x, y, z))`` of a cubic map ``[z, y, x]`` (test helper)."""
    n = volume.shape[-1]
    r = torch.arange(n, dtype=volume.dtype) - n // 2
    z, y, x = torch.meshgrid(r, r, r, indexing="ij")
    src = torch.stack([x, y, z], -1) @ pose  # rows are (A^T x)^T = x^T A
    grid = ((src + n // 2) * (2.0 / (n - 1)) - 1)[None]
    sampled = torch.nn.functional.grid_sample(volume[None, None], grid, align_corners=True)[0, 0]
    return sampled.sum(0)


@pytest.mark.parametrize("device", DEVICES)
def test_equivalent_poses_give_identical_projections(device: str):
    gen = torch.Generator().manual_seed(1)
    o = symmetry_operators("O", device=device)
    vol = symmetrize_volume(torch.rand(15, 15, 15, generator=gen, dtype=torch.float64).to(device), o).cpu()
    poses = random_rotations(3, generator=gen, dtype=torch.float64)
    equivalents = equivalent_poses(poses.to(device), o).cpu()
    assert equivalents.shape == (3, 24, 3, 3)
    for pose, group in zip(poses, equivalents):
        reference = _project(vol, pose)
        for other in group:
            assert (_project(vol, other) - reference).abs().max() < 1e-10
    # A pose outside the orbit projects differently.
    off = poses[0] @ rotation_about_axis(torch.tensor([0.3, 0.5, 0.8], dtype=torch.float64),
                                         torch.tensor(0.4, dtype=torch.float64))
    assert (_project(vol, off) - _project(vol, poses[0])).abs().max() > 0.05
