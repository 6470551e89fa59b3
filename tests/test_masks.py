"""Soft spheres and relion_mask_create-style masks, checked against RELION's own mask."""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

from cryocli.imaging.masks import auto_mask, dilate, distance_within, erode, mask_agreement, soft_edge, soft_sphere
from cryocli.io.mrc import read_map
from tests.conftest import RELION_SET, need


def test_soft_sphere_profile():
    m = soft_sphere(33, 8.0, 4.0, dtype=torch.float64)
    c = 16
    line = m[c, c, c:].numpy()
    np.testing.assert_allclose(line[:9], 1.0)            # r <= 8
    assert line[10] == np.float64(0.5)                   # r = 10: halfway down the raised cosine
    np.testing.assert_allclose(line[12:], 0.0)            # r >= 12
    assert torch.equal(m, m.flip(0)) and torch.equal(m, m.transpose(0, 2))
    hard = soft_sphere(20, 5.0)
    assert int(hard.sum()) == int(((np.indices((20,) * 3) - 10) ** 2).sum(0).__le__(25).sum())


def test_dilation_uses_strict_distance_like_relion():
    seed = torch.zeros(15, 15, 15, dtype=torch.bool)
    seed[7, 7, 7] = True
    d = dilate(seed, 3.0)
    offsets = (np.indices((15,) * 3) - 7) ** 2
    np.testing.assert_array_equal(d.numpy(), offsets.sum(0) < 9)
    # Shrinking is dilation of the complement; the box edge does not count as solvent.
    full = torch.ones(9, 9, 9, dtype=torch.bool)
    assert bool(erode(full, 2.0).all())
    block = torch.zeros(15, 15, 15, dtype=torch.bool)
    block[3:12, 3:12, 3:12] = True
    np.testing.assert_array_equal(erode(block, 2.0).numpy()[3:12, 3:12, 3:12][1:-1, 1:-1, 1:-1], True)
    assert not bool(erode(block, 2.0)[3, 7, 7])


def test_distance_matches_exact_euclidean_transform():
    g = torch.Generator().manual_seed(3)
    binary = torch.rand(24, 24, 24, generator=g) > 0.995
    d = distance_within(binary, 6.0).numpy()
    exact = ndimage.distance_transform_edt(~binary.numpy())
    near = exact < 6.0
    assert near.sum() > 1000
    np.testing.assert_allclose(d[near], exact[near], atol=1e-12)
    assert np.isinf(d[~near]).all()
    edge = soft_edge(binary, 6.0).numpy()
    np.testing.assert_allclose(edge[near], 0.5 + 0.5 * np.cos(np.pi * exact[near] / 6.0), atol=1e-12)
    assert (edge[~near] == 0).all()


def test_auto_mask_reproduces_relion_mask_create():
    """relion_mask_create --lowpass 15 --ini_threshold 5.12697e-05 --extend_inimask 3 --width_soft_edge 5."""
    vol = read_map(need(RELION_SET / "map.mrc"))
    relion = read_map(need(RELION_SET / "mask.mrc")).data
    ours = auto_mask(vol.data, vol.voxel_size, 5.12697e-05, extend=3, soft_edge_width=5, lowpass=15)
    agree = mask_agreement(ours, relion)
    assert agree["dice"] == 1.0
    assert agree["correlation"] > 0.999999
    assert agree["max_abs_difference"] < 1e-5
    # The low-pass needs the real voxel size: at 1 A/voxel (relion_mask_create's old default) it differs.
    wrong = mask_agreement(auto_mask(vol.data, 1.0, 5.12697e-05, 3, 5, 15), relion)
    assert wrong["dice"] < 0.95
