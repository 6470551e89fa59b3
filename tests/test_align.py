"""Map alignment (rotation, shift, hand), its pose convention, and pose-set alignment."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cryocli.analysis.align import (FLIP, Alignment, align_maps, align_pose_sets, apply_alignment,
                                    pose_errors_after_alignment, poses_to_reference, resample_volume,
                                    sample_rotations)
from cryocli.analysis.fsc import fsc_curve
from cryocli.geometry.rotations import euler_to_matrix, geodesic_distance
from cryocli.imaging.fourier import fourier_resample_volume
from cryocli.imaging.masks import soft_sphere
from cryocli.io.mrc import read_map
from tests.conftest import CRYODRGN, RELION_SET, need


def _compact(path, crop: int, box: int, radius: float) -> tuple[torch.Tensor, float]:
    """Fourier-crop a map to ``crop`` voxels, keep a sphere of ``radius`` voxels, pad to ``box`` (room to rotate)."""
    m = read_map(need(path))
    vol = fourier_resample_volume(torch.tensor(m.data, dtype=torch.float64), crop).float()
    vol = vol * soft_sphere(crop, radius, 3)
    out = torch.zeros(box, box, box)
    o = box // 2 - crop // 2
    out[o:o + crop, o:o + crop, o:o + crop] = vol
    return out, m.voxel_size * m.data.shape[0] / crop


def _move(vol: torch.Tensor, rot: torch.Tensor, flipped: bool, shift_vox: list[float]) -> torch.Tensor:
    """The moving map: moving(y) = reference(R F y + t), so the alignment to find is (R, t, flipped)."""
    m = rot @ FLIP if flipped else rot
    return resample_volume(vol, m[None].float(), torch.tensor([shift_vox]))[0]


def _deg(a: np.ndarray | torch.Tensor, b: torch.Tensor) -> float:
    return math.degrees(float(geodesic_distance(torch.as_tensor(np.asarray(a), dtype=torch.float64), b)))


@pytest.fixture(scope="module")
def hand_case():
    vol, apix = _compact(CRYODRGN / "hand-vol.mrc", 32, 40, 13)
    rot = euler_to_matrix(torch.tensor(37.0), torch.tensor(71.0), torch.tensor(-128.0)).double()
    shift = [2.5, -1.5, 2.0]
    moving = _move(vol, rot, True, shift)
    return vol, apix, rot, shift, moving, align_maps(vol, moving, apix)


def test_hand_flip_rotation_and_shift_are_recovered(hand_case):
    vol, apix, rot, shift, moving, al = hand_case
    assert al.flipped
    assert _deg(al.rotation, rot) < 2.0
    np.testing.assert_allclose(al.shift_A, np.array(shift) * apix, atol=0.25 * apix)
    truth = apply_alignment(moving, Alignment(rot.numpy(), np.array(shift) * apix, True, np.zeros(0), 0.0, apix))
    f_found, f_truth = fsc_curve(vol.numpy(), al.aligned_map), fsc_curve(vol.numpy(), truth)
    # FSC > 0.95 up to 0.6 Nyquist; beyond, the two trilinear resamplings of this test (making the moving map,
    # then aligning it) limit any alignment, and the one found is as good as the exact inverse there.
    assert f_found[: int(0.6 * 20) + 1].min() > 0.95
    assert np.all(f_found > f_truth - 0.01)
    assert al.score > 0.98


def test_pseudo_symmetric_ring_is_aligned_without_flip():
    """3J9G is a near-6-fold ring with a near-2-fold: the search must still pick the true copy."""
    vol, apix = _compact(RELION_SET / "map.mrc", 32, 44, 16)
    rot = euler_to_matrix(torch.tensor(-100.0), torch.tensor(140.0), torch.tensor(20.0)).double()
    moving = _move(vol, rot, False, [1.0, 2.0, -1.5])
    al = align_maps(vol, moving, apix)
    assert not al.flipped
    assert _deg(al.rotation, rot) < 2.0
    f = fsc_curve(vol.numpy(), al.aligned_map)
    assert f[: int(0.6 * 22) + 1].min() > 0.95


def _project(vol: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """RELION projections p(x, y) = sum_z V(A^T (x, y, z)) for poses ``a (N, 3, 3)`` -> ``(N, n, n)``."""
    return resample_volume(vol, a.transpose(1, 2).float(), torch.zeros(a.shape[0], 3)).sum(1)


def _shift_images(img: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """``img(x + d)`` for shifts ``d (N, 2)`` in pixels (x, y), by a Fourier phase ramp."""
    n = img.shape[-1]
    k = torch.fft.fftfreq(n, dtype=torch.float64)
    ky, kx = torch.meshgrid(k, k, indexing="ij")
    ramp = torch.exp(2j * math.pi * (kx * d[:, 0, None, None] + ky * d[:, 1, None, None]))
    return torch.fft.ifft2(torch.fft.fft2(img.double()) * ramp).real


def test_poses_convert_into_the_reference_frame(hand_case):
    """Projections of the moving map at A_mov equal projections of the reference at the converted pose and origin."""
    vol, apix, _, _, moving, al = hand_case
    g = torch.Generator().manual_seed(5)
    q = torch.randn(6, 4, generator=g, dtype=torch.float64)
    from cryocli.geometry.rotations import quaternion_to_matrix

    a_mov = quaternion_to_matrix(q)
    origins = torch.randn(6, 2, generator=g, dtype=torch.float64) * 2.0  # Angstrom
    a_ref, o_ref = poses_to_reference(a_mov.numpy(), origins.numpy(), al)
    assert np.allclose(np.linalg.det(a_ref), 1.0)
    # Images as RELION defines them: image(x) = projection(x + origin).
    img_mov = _shift_images(_project(moving, a_mov), origins / apix)
    img_ref = _shift_images(_project(vol, torch.tensor(a_ref)), torch.tensor(o_ref) / apix)
    for i in range(6):
        c = np.corrcoef(img_mov[i].ravel(), img_ref[i].ravel())[0, 1]
        assert c > 0.99, (i, c)
    # A wrong hand convention fails clearly.
    wrong = _project(vol, torch.tensor(a_mov.numpy() @ al.rotation.T))
    assert np.corrcoef(img_mov[0].ravel(), wrong[0].ravel())[0, 1] < 0.9


def test_pose_set_alignment_finds_rotation_hand_and_outliers():
    g = torch.Generator().manual_seed(11)
    from cryocli.geometry.rotations import axis_angle_to_matrix, quaternion_to_matrix

    n = 400
    a_true = quaternion_to_matrix(torch.randn(n, 4, generator=g, dtype=torch.float64))
    r = euler_to_matrix(torch.tensor(50.0), torch.tensor(120.0), torch.tensor(-30.0)).double()
    # Estimated poses in a mirrored, rotated frame (A_true = F A_est F R^T), with 1.5 deg noise and 20% junk.
    noise = axis_angle_to_matrix(torch.randn(n, 3, generator=g, dtype=torch.float64) * math.radians(1.5) / math.sqrt(3))
    a_est = noise @ FLIP @ a_true @ r @ FLIP
    junk = torch.arange(n) % 5 == 0
    a_est[junk] = quaternion_to_matrix(torch.randn(int(junk.sum()), 4, generator=g, dtype=torch.float64))
    res = align_pose_sets(a_est, a_true)
    assert res.flipped
    assert _deg(res.rotation, r) < 0.3
    good = res.errors_deg[~junk.numpy()]
    assert np.median(good) < 2.0 and good.max() < 6.0
    assert np.median(res.errors_deg[junk.numpy()]) > 30.0
    np.testing.assert_allclose(pose_errors_after_alignment(a_est, a_true), res.errors_deg)
    # Without the mirror allowed the same poses cannot be matched.
    assert np.median(pose_errors_after_alignment(a_est, a_true, allow_flip=False)) > 20.0


def test_rotation_samples_cover_so3():
    grid = sample_rotations(2000)
    assert torch.allclose(grid @ grid.transpose(1, 2), torch.eye(3, dtype=grid.dtype).expand(2000, 3, 3), atol=1e-12)
    from cryocli.geometry.rotations import quaternion_to_matrix

    probes = quaternion_to_matrix(torch.randn(300, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64))
    nearest = geodesic_distance(probes[:, None], grid[None]).min(dim=1).values
    assert math.degrees(float(nearest.max())) < 16.0
