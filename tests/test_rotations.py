"""RELION rotation convention and the parameterisations built on it (cryocli.geometry.rotations)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats
from scipy.spatial.transform import Rotation
from torch.autograd import gradcheck

from cryocli.geometry.rotations import (
    axis_angle_to_matrix,
    canonical_quaternion,
    euler_to_matrix,
    geodesic_distance,
    matrix_to_axis_angle,
    matrix_to_euler,
    matrix_to_quaternion,
    matrix_to_s2s2,
    matrix_to_sixd,
    project_to_so3,
    projection_direction,
    quaternion_distance,
    quaternion_multiply,
    quaternion_to_matrix,
    random_rotations,
    rotation_about_axis,
    s2s2_to_matrix,
    sixd_to_matrix,
)
from tests.conftest import DEVICES

TOL = {torch.float64: 1e-12, torch.float32: 2e-6}


def _random(n: int, dtype: torch.dtype, seed: int = 0, device: str = "cpu") -> torch.Tensor:
    """Haar rotations drawn on the CPU from a generator seeded with ``seed``, made on ``device``."""
    return random_rotations(n, generator=torch.Generator().manual_seed(seed), dtype=dtype, device=device)


def _euler_samples(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    rot, psi = rng.uniform(-180, 180, (2, n))
    tilt = np.degrees(np.arccos(rng.uniform(-1, 1, n)))
    return tuple(torch.as_tensor(a, dtype=torch.float64) for a in (rot, tilt, psi))


@pytest.mark.parametrize("device", DEVICES)
def test_euler_matrix_is_relion_passive_zyz(device: str):
    rot, tilt, psi = _euler_samples(200)
    a = euler_to_matrix(rot.to(device), tilt.to(device), psi.to(device)).cpu()
    assert a.dtype == torch.float64
    # Independent construction: RELION's A is the transpose of scipy's active intrinsic ZYZ rotation.
    ref = Rotation.from_euler("ZYZ", np.stack([rot, tilt, psi], -1), degrees=True).as_matrix().transpose(0, 2, 1)
    assert np.abs(a.numpy() - ref).max() < 1e-13
    # RELION's Rz(psi) written out: [[c, s, 0], [-s, c, 0], [0, 0, 1]].
    c, s = math.cos(math.radians(30.0)), math.sin(math.radians(30.0))
    assert torch.allclose(euler_to_matrix(0.0, 0.0, 30.0), torch.tensor([[c, s, 0], [-s, c, 0], [0, 0, 1.0]]))


@pytest.mark.parametrize("device", DEVICES)
def test_third_row_is_viewing_direction(device: str):
    rot, tilt, psi = _euler_samples(500, seed=1)
    r, t = torch.deg2rad(rot), torch.deg2rad(tilt)
    expected = torch.stack([torch.sin(t) * torch.cos(r), torch.sin(t) * torch.sin(r), torch.cos(t)], -1)
    view = projection_direction(euler_to_matrix(rot.to(device), tilt.to(device), psi.to(device))).cpu()
    assert (view - expected).abs().max() < 1e-14


def test_numpy_and_python_inputs_use_the_default_dtype():
    a = euler_to_matrix(np.array([10.0, 20.0]), np.array([30.0, 40.0]), 50.0)
    assert a.dtype == torch.get_default_dtype() and a.shape == (2, 3, 3)
    assert euler_to_matrix(torch.tensor([10.0], dtype=torch.float64), 1, 2).dtype == torch.float64


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_round_trips(dtype, device: str):
    a = _random(500, dtype)
    ad = a.to(device)
    tol = TOL[dtype]
    rot, tilt, psi = matrix_to_euler(ad)
    assert (euler_to_matrix(rot, tilt, psi).cpu() - a).abs().max() < 10 * tol
    q = matrix_to_quaternion(ad)
    assert (q[:, 0].cpu() >= 0).all()
    assert ((q.cpu().norm(dim=-1) - 1).abs().max()) < tol
    assert (quaternion_to_matrix(q).cpu() - a).abs().max() < 4 * tol
    omega = matrix_to_axis_angle(ad)
    assert (omega.cpu().norm(dim=-1) <= math.pi + tol).all()
    assert (axis_angle_to_matrix(omega).cpu() - a).abs().max() < 4 * tol
    assert (sixd_to_matrix(matrix_to_sixd(ad)).cpu() - a).abs().max() < 4 * tol
    assert (s2s2_to_matrix(*matrix_to_s2s2(ad)).cpu() - a).abs().max() < 4 * tol
    # The whole chain euler -> matrix -> quaternion -> axis-angle -> 6D -> matrix -> euler.
    chain = sixd_to_matrix(matrix_to_sixd(axis_angle_to_matrix(
        matrix_to_axis_angle(quaternion_to_matrix(matrix_to_quaternion(euler_to_matrix(rot, tilt, psi)))))))
    assert (chain.cpu() - a).abs().max() < 20 * tol


@pytest.mark.parametrize("device", DEVICES)
def test_quaternions_match_scipy_and_compose(device: str):
    a = _random(300, torch.float64, seed=3)
    xyzw = Rotation.from_matrix(a.numpy()).as_quat()
    ref = canonical_quaternion(torch.as_tensor(np.concatenate([xyzw[:, 3:], xyzw[:, :3]], 1)))
    a = a.to(device)
    assert (matrix_to_quaternion(a).cpu() - ref).abs().max() < 1e-14
    b = _random(300, torch.float64, seed=4).to(device)
    qab = canonical_quaternion(quaternion_multiply(matrix_to_quaternion(a), matrix_to_quaternion(b))).cpu()
    assert (qab - matrix_to_quaternion(a @ b).cpu()).abs().max() < 1e-14
    # RELION's passive Rz(rot) is an active turn by -rot about z.
    rot = torch.tensor(70.0, dtype=torch.float64, device=device)
    q = matrix_to_quaternion(euler_to_matrix(rot, 0.0 * rot, 0.0 * rot)).cpu()
    half = math.radians(35.0)
    assert torch.allclose(q, torch.tensor([math.cos(half), 0, 0, -math.sin(half)], dtype=torch.float64))


@pytest.mark.parametrize("device", DEVICES)
def test_axis_angle_matches_scipy_and_relion_axes(device: str):
    a = _random(300, torch.float64, seed=5)
    omega = matrix_to_axis_angle(a.to(device)).cpu()
    assert np.abs(omega.numpy() - Rotation.from_matrix(a.numpy()).as_rotvec()).max() < 1e-13
    # RELION's passive Rz(a) = rotation_about_axis(z, -a).
    z = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64, device=device)
    assert torch.allclose(rotation_about_axis(z, torch.tensor(-0.7, dtype=torch.float64, device=device)).cpu(),
                          euler_to_matrix(torch.tensor(math.degrees(0.7), dtype=torch.float64, device=device), 0.0,
                                          0.0).cpu())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tilt", [0.0, 180.0])
def test_gimbal_lock(tilt, device: str):
    rot = torch.tensor([0.0, 33.0, -120.0, 179.0, 90.0], dtype=torch.float64, device=device)
    psi = torch.tensor([10.0, -45.0, 60.0, 180.0, -90.0], dtype=torch.float64, device=device)
    a = euler_to_matrix(rot, torch.full_like(rot, tilt), psi)
    r2, t2, p2 = matrix_to_euler(a)
    assert (r2.cpu() == 0).all() and (t2.cpu() == tilt).all()
    assert (euler_to_matrix(r2, t2, p2).cpu() - a.cpu()).abs().max() < 1e-14
    assert (quaternion_to_matrix(matrix_to_quaternion(a)).cpu() - a.cpu()).abs().max() < 1e-14
    assert (axis_angle_to_matrix(matrix_to_axis_angle(a)).cpu() - a.cpu()).abs().max() < 1e-14


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_axis_angle_near_zero_and_pi(dtype, device: str):
    axis = torch.nn.functional.normalize(torch.randn(50, 3, dtype=dtype), dim=-1)
    for angle in (0.0, 1e-12, 1e-8, 1e-4, 1e-2, 0.5):
        omega = axis * angle
        back = matrix_to_axis_angle(axis_angle_to_matrix(omega.to(device))).cpu()
        assert (back - omega).abs().max() <= max(angle * 1e-6, 1e-30) + (1e-7 if dtype == torch.float32 else 1e-15)
    assert (axis_angle_to_matrix(torch.zeros(3, dtype=dtype, device=device)).cpu() == torch.eye(3, dtype=dtype)).all()
    for angle in (math.pi, math.pi - 1e-6):
        a = axis_angle_to_matrix((axis * angle).to(device))
        back = matrix_to_axis_angle(a)
        assert (axis_angle_to_matrix(back).cpu() - a.cpu()).abs().max() < 20 * TOL[dtype]
        assert ((back.cpu().norm(dim=-1) - angle).abs() < 10 * TOL[dtype]).all()
    # Just below pi the axis sign is determined and must be recovered.
    omega = axis * (math.pi - 1e-3)
    assert (matrix_to_axis_angle(axis_angle_to_matrix(omega.to(device))).cpu() - omega).abs().max() < 1e-4


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("vector", [[0.0, 0.0, 0.0], [1e-8, -1e-8, 1e-8], [1e-3, 2e-3, -1e-3],
                                    [0.3, -1.0, 2.0], [0.0, 0.0, 3.1]])
def test_axis_angle_gradients(vector, device: str):
    omega = torch.tensor(vector, dtype=torch.float64, device=device, requires_grad=True)
    assert gradcheck(axis_angle_to_matrix, (omega,))
    assert gradcheck(lambda w: matrix_to_axis_angle(axis_angle_to_matrix(w)), (omega,))
    # Finite through Shepperd's method at an exact half turn too (w = 0 there).
    half_turn = axis_angle_to_matrix(torch.tensor([0.0, math.pi, 0.0], dtype=torch.float64,
                                                  device=device)).requires_grad_()
    matrix_to_axis_angle(half_turn).sum().backward()
    assert torch.isfinite(half_turn.grad.cpu()).all()
    # At the identity dA/d omega_i is the cross-product matrix [e_i]_x.
    if not any(vector):
        jac = torch.autograd.functional.jacobian(axis_angle_to_matrix, omega).cpu()  # (3, 3, 3): [row, col, i]
        e = torch.eye(3, dtype=torch.float64)
        for i in range(3):
            assert torch.allclose(jac[..., i], torch.linalg.cross(e[i].expand(3, 3), e, dim=-1).T)


@pytest.mark.parametrize("device", DEVICES)
def test_sixd_and_s2s2_gram_schmidt(device: str):
    gen = torch.Generator().manual_seed(6)
    v = torch.randn(200, 6, generator=gen, dtype=torch.float64)
    vd = v.to(device)
    a = sixd_to_matrix(vd).cpu()
    eye = torch.eye(3, dtype=torch.float64)
    assert (a @ a.transpose(-1, -2) - eye).abs().max() < 1e-14
    assert (torch.linalg.det(a) - 1).abs().max() < 1e-14
    # Column 0 is v_x normalised; column 1 lies in span(v_x, v_y) on v_y's side.
    assert (a[..., :, 0] - torch.nn.functional.normalize(v[:, :3], dim=-1)).abs().max() < 1e-14
    assert (a[..., :, 2] * v[:, 3:]).sum(-1).abs().max() < 1e-12
    assert ((a[..., :, 1] * v[:, 3:]).sum(-1) > 0).all()
    assert (s2s2_to_matrix(vd[:, :3], vd[:, 3:]).cpu() == a).all()
    assert gradcheck(sixd_to_matrix, (vd[:4].clone().requires_grad_(),))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_geodesic_distance(dtype, device: str):
    gen = torch.Generator().manual_seed(7)
    a = _random(100, dtype, seed=8).to(device)
    axis = torch.nn.functional.normalize(torch.randn(100, 3, generator=gen, dtype=dtype), dim=-1).to(device)
    angles = torch.tensor([0.0, 1e-7, 1e-5, 1e-3, 0.5, 2.0, math.pi - 1e-4, math.pi], dtype=dtype)
    for t in angles:
        b = axis_angle_to_matrix(axis * t.to(device)) @ a
        d = geodesic_distance(b, a).cpu()
        rel = 1e-10 if dtype == torch.float64 else 1e-6
        assert (d - t).abs().max() <= rel + 4 * t * TOL[dtype], float(t)
        assert torch.allclose(geodesic_distance(a, b).cpu(), d)
    # Invariance: d(C A, C B) = d(A C, B C) = d(A, B).
    b, c = _random(100, dtype, seed=9).to(device), _random(100, dtype, seed=10).to(device)
    d = geodesic_distance(a, b).cpu()
    assert (geodesic_distance(c @ a, c @ b).cpu() - d).abs().max() < 1e3 * TOL[dtype]
    assert (geodesic_distance(a @ c, b @ c).cpu() - d).abs().max() < 1e3 * TOL[dtype]
    # Finite gradient, also between identical rotations.
    x = a[:3].clone().requires_grad_()
    geodesic_distance(x, a[:3]).sum().backward()
    assert torch.isfinite(x.grad.cpu()).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_project_to_so3_is_the_nearest_rotation(dtype, device: str):
    a = _random(50, dtype, seed=7)
    ad = a.to(device)
    assert (project_to_so3(ad).cpu() - a).abs().max() < 4 * TOL[dtype]
    # A perturbed rotation comes back to a proper rotation close to it; a reflection to det +1.
    m = a + 0.05 * torch.randn(a.shape, generator=torch.Generator().manual_seed(8), dtype=dtype)
    m[:5] = -m[:5]
    r = project_to_so3(m.to(device)).cpu()
    eye = torch.eye(3, dtype=dtype).expand_as(r)
    assert (r @ r.transpose(-1, -2) - eye).abs().max() < 4 * TOL[dtype]
    assert torch.allclose(torch.det(r), torch.ones(50, dtype=dtype), atol=4 * TOL[dtype])
    assert (geodesic_distance(r[5:], a[5:]) < 0.2).all()
    # The chordal mean of two turns by +-w about one rotation projects back onto it.
    w = torch.tensor([0.3, -0.2, 0.5], dtype=dtype, device=device)
    mean = project_to_so3((axis_angle_to_matrix(torch.stack([w, -w])) @ ad[0]).sum(0)).cpu()
    assert geodesic_distance(mean, a[0]) < 4 * TOL[dtype]
    assert project_to_so3(ad.reshape(5, 10, 3, 3)).shape == (5, 10, 3, 3)


@pytest.mark.parametrize("device", DEVICES)
def test_quaternion_distance_is_chordal(device: str):
    a, b = _random(200, torch.float64, seed=11).to(device), _random(200, torch.float64, seed=12).to(device)
    t = geodesic_distance(a, b).cpu()
    d = quaternion_distance(matrix_to_quaternion(a), -matrix_to_quaternion(b)).cpu()
    assert (d - 2 * torch.sin(t / 4)).abs().max() < 1e-14


@pytest.mark.parametrize("device", DEVICES)
def test_random_rotations_are_haar_uniform(device: str):
    n = 20000
    a = _random(n, torch.float64, seed=2024, device=device).cpu()
    assert (a @ a.transpose(-1, -2) - torch.eye(3, dtype=torch.float64)).abs().max() < 1e-14
    angle = geodesic_distance(a, torch.eye(3, dtype=torch.float64)).numpy()
    # Haar measure: the rotation angle has density (1 - cos t)/pi, CDF (t - sin t)/pi.
    p_angle = stats.kstest(angle, lambda t: (t - np.sin(t)) / np.pi).pvalue
    # Viewing directions uniform on the sphere: cos(tilt) uniform on [-1, 1].
    p_dir = stats.kstest(projection_direction(a)[:, 2].numpy(), stats.uniform(-1, 2).cdf).pvalue
    assert p_angle > 0.01 and p_dir > 0.01, (p_angle, p_dir)
    # The mean of Haar rotations is the zero matrix.
    assert a.mean(0).abs().max() < 5 / math.sqrt(n)
    # The same tests reject uniform Euler angles, which crowd the poles.
    rng = np.random.default_rng(2024)
    bounds = ((-180, 180), (0, 180), (-180, 180))
    naive = euler_to_matrix(*(torch.as_tensor(rng.uniform(lo, hi, n)) for lo, hi in bounds))
    assert stats.kstest(projection_direction(naive)[:, 2].numpy(), stats.uniform(-1, 2).cdf).pvalue < 1e-6
    naive_angle = geodesic_distance(naive, torch.eye(3, dtype=naive.dtype)).numpy()
    assert stats.kstest(naive_angle, lambda t: (t - np.sin(t)) / np.pi).pvalue < 1e-6


@pytest.mark.parametrize("device", DEVICES)
def test_random_rotations_reproducible_and_typed(device: str):
    a = random_rotations(5, generator=torch.Generator().manual_seed(1), dtype=torch.float32, device=device).cpu()
    b = random_rotations(5, generator=torch.Generator().manual_seed(1), dtype=torch.float32, device=device).cpu()
    assert a.dtype == torch.float32 and a.shape == (5, 3, 3) and torch.equal(a, b)
    assert random_rotations(3, device="cpu").dtype == torch.get_default_dtype()
