"""Viewing-direction distribution: HEALPix counts with symmetry folding, equal-area cells, RELION's angdist.bild."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import starfile
import torch

from cryocli.analysis.angdist import (
    angdist_bild_text,
    asymmetric_unit_pixels,
    bild_text_from_counts,
    direction_histogram,
    equal_area_histogram,
    fold_directions,
    pixel_directions,
    viewing_directions,
    write_angdist_bild,
)
from cryocli.errors import CryocliError
from cryocli.geometry.rotations import euler_to_matrix, random_rotations
from cryocli.geometry.so3grid import healpix_ang2pix, healpix_max_pixrad, healpix_npix, healpix_pix2vec
from cryocli.geometry.symmetry import symmetry_operators, symmetry_order
from tests.conftest import RELION_SET, STARFILE_DATA, need

NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:e[-+]?\d+)?"
COLOR = re.compile(rf"^\.color ({NUMBER}) ({NUMBER}) ({NUMBER})$")
CYLINDER = re.compile(rf"^\.cylinder {' '.join([f'({NUMBER})'] * 7)}$")


def _vec(rot_deg, tilt_deg) -> np.ndarray:
    r, t = np.radians(rot_deg), np.radians(tilt_deg)
    return np.stack([np.sin(t) * np.cos(r), np.sin(t) * np.sin(r), np.cos(t)], -1)


def _random_poses(n: int, seed: int = 7) -> torch.Tensor:
    return random_rotations(n, torch.Generator().manual_seed(seed), dtype=torch.float64)


def _parse_bild(text: str) -> tuple[np.ndarray, np.ndarray]:
    """Colours (C, 3) and cylinders (C, 7); every line must be one of the two, in colour/cylinder pairs."""
    lines = text.splitlines()
    assert len(lines) % 2 == 0
    colours, cylinders = [], []
    for colour_line, cylinder_line in zip(lines[0::2], lines[1::2], strict=True):
        c, y = COLOR.match(colour_line), CYLINDER.match(cylinder_line)
        assert c is not None, colour_line
        assert y is not None, cylinder_line
        colours.append([float(g) for g in c.groups()])
        cylinders.append([float(g) for g in y.groups()])
    return np.array(colours).reshape(-1, 3), np.array(cylinders).reshape(-1, 7)


def _relion_poses() -> torch.Tensor:
    from cryocli.io.star import read_star

    table = read_star(need(RELION_SET / "refine" / "run_data.star"))
    angles = torch.as_tensor(table.euler_angles, dtype=torch.float64)
    return euler_to_matrix(angles[:, 0], angles[:, 1], angles[:, 2])


# ------------------------------------------------------------------------------------------ directions


def test_viewing_directions_are_relion_rot_and_tilt():
    rot = np.array([30.0, -120.0, 170.0, 0.0, 45.0])
    tilt = np.array([60.0, 100.0, 15.0, 90.0, 179.0])
    psi = np.array([77.0, -10.0, 123.0, 5.0, -170.0])
    a = euler_to_matrix(torch.tensor(rot), torch.tensor(tilt), torch.tensor(psi))
    got_rot, got_tilt = viewing_directions(a)
    np.testing.assert_allclose(got_rot, rot, atol=1e-9)
    np.testing.assert_allclose(got_tilt, tilt, atol=1e-9)
    # numpy input, and the third row of A is the direction
    r2, t2 = viewing_directions(a.numpy())
    np.testing.assert_allclose(_vec(r2, t2), a[:, 2, :].numpy(), atol=1e-12)


def test_viewing_directions_refuses_non_rotations():
    with pytest.raises(CryocliError):
        viewing_directions(np.ones((4, 3, 3)))
    with pytest.raises(CryocliError):
        viewing_directions(np.eye(4)[None])


@pytest.mark.parametrize(("path", "order"), [
    (STARFILE_DATA / "relion_tutorial" / "run_it025_sampling_3D.star", 2),
    (RELION_SET / "refine" / "run_sampling.star", 6),
])
def test_pixel_directions_match_relion_sampling_star(path, order):
    """RELION's run_sampling.star (C1) lists the HEALPix centres in nested order with rot in (-180, 180]."""
    table = starfile.read(need(path))["sampling_directions"]
    rot, tilt = pixel_directions(order)
    assert len(table) == healpix_npix(order) == len(asymmetric_unit_pixels("C1", order))
    # RELION prints 6 decimals, one fewer for negative numbers (-28.82812 for -28.828125)
    np.testing.assert_allclose(rot, table["rlnAngleRot"].to_numpy(), atol=6e-6)
    np.testing.assert_allclose(tilt, table["rlnAngleTilt"].to_numpy(), atol=6e-6)


# --------------------------------------------------------------------------------- HEALPix histogram


@pytest.mark.parametrize("order", [1, 3, 5])
def test_known_directions_land_in_their_healpix_pixel(order):
    rot = np.array([30.0, -120.0, 170.0, 45.0, -60.0])
    tilt = np.array([60.0, 100.0, 15.0, 90.0, 150.0])
    a = euler_to_matrix(torch.tensor(rot), torch.tensor(tilt), torch.tensor([3.0, 50.0, -80.0, 170.0, 0.0]))
    r, t = viewing_directions(a)
    counts = direction_histogram(r, t, "C1", order)
    expected = healpix_ang2pix(order, torch.tensor(np.radians(tilt)), torch.tensor(np.radians(rot))).numpy()
    assert counts.shape == (healpix_npix(order),) and counts.dtype == np.int64
    assert counts.sum() == 5
    np.testing.assert_array_equal(np.flatnonzero(counts), np.unique(expected))
    # each direction is within the largest pixel radius of its pixel centre
    centres = healpix_pix2vec(order, torch.tensor(expected)).numpy()
    angle = np.arccos(np.clip((centres * _vec(rot, tilt)).sum(-1), -1, 1))
    assert (angle <= healpix_max_pixrad(order) + 1e-12).all()
    # by hand, order 1: rot 45, tilt 90 is on the equator at the centre of base face 5 (pixels 20..23)
    if order == 1:
        assert expected[3] // 4 == 5


@pytest.mark.parametrize("sym", ["C1", "C2", "D2", "C3", "D7", "T", "O", "I"])
def test_histogram_counts_every_particle_once(sym):
    a = _random_poses(3000)
    r, t = viewing_directions(a)
    counts = direction_histogram(r, t, sym, 3)
    assert counts.sum() == 3000
    outside = np.setdiff1d(np.arange(healpix_npix(3)), asymmetric_unit_pixels(sym, 3))
    assert counts[outside].sum() == 0


@pytest.mark.parametrize(("sym", "order"), [("C2", 1), ("C2", 2), ("C2", 3), ("C2", 4), ("D2", 1), ("D2", 2),
                                            ("D2", 3), ("D2", 4), ("C1", 3)])
def test_asymmetric_unit_is_relion_bounds(sym, order):
    kept = asymmetric_unit_pixels(sym, order)
    # C2 and D2 units are bounded by meridians and the equator, which HEALPix respects: exactly npix / |G|
    assert len(kept) * symmetry_order(sym) == healpix_npix(order)
    rot, tilt = pixel_directions(order)
    if sym == "C2":
        assert (np.abs(rot[kept]) <= 90).all()
    if sym == "D2":
        assert ((rot[kept] >= 0) & (rot[kept] <= 180) & (tilt[kept] <= 90)).all()
    assert (np.diff(kept) > 0).all()


def test_asymmetric_unit_too_coarse_is_refused():
    with pytest.raises(CryocliError, match="too coarse"):
        asymmetric_unit_pixels("I", 1)


@pytest.mark.parametrize(("sym", "rot", "tilt", "folded"), [
    ("C2", 150.0, 40.0, (-30.0, 40.0)),   # Rz(180): rot - 180
    ("D2", -30.0, 120.0, (30.0, 60.0)),   # 2-fold about x: (x, -y, -z)
    ("D2", -150.0, 60.0, (30.0, 60.0)),   # 2-fold about z
    ("C2", 20.0, 130.0, (20.0, 130.0)),   # already inside
])
def test_fold_known_directions(sym, rot, tilt, folded):
    fr, ft, fp = fold_directions(np.array([rot]), np.array([tilt]), sym, 3)
    np.testing.assert_allclose([fr[0], ft[0]], folded, atol=1e-9)
    assert fp[0] == int(healpix_ang2pix(3, torch.tensor(math.radians(folded[1])), torch.tensor(math.radians(folded[0]))))


@pytest.mark.parametrize("sym", ["C2", "D2", "C3", "T", "O", "I1"])
@pytest.mark.parametrize("order", [2, 3, 5])
def test_symmetry_related_poses_fold_to_the_same_direction(sym, order):
    a = _random_poses(2000, seed=11)
    ops = symmetry_operators(sym)
    pick = torch.randint(len(ops), (len(a),), generator=torch.Generator().manual_seed(5))
    r1, t1 = viewing_directions(a)
    r2, t2 = viewing_directions(a @ ops[pick])
    f1, f2 = fold_directions(r1, t1, sym, order), fold_directions(r2, t2, sym, order)
    np.testing.assert_array_equal(f1[2], f2[2])
    np.testing.assert_allclose(_vec(f1[0], f1[1]), _vec(f2[0], f2[1]), atol=1e-9)
    # the folded direction is one of the original's symmetry mates, and sits in a sampled pixel
    mates = np.einsum("kji,nj->nki", ops.numpy(), _vec(r1, t1))
    assert (np.abs(mates - _vec(f1[0], f1[1])[:, None]).max(-1).min(-1) < 1e-9).all()
    assert np.isin(f1[2], asymmetric_unit_pixels(sym, order)).all()
    # the histograms agree too
    np.testing.assert_array_equal(direction_histogram(r1, t1, sym, order), direction_histogram(r2, t2, sym, order))


def test_folded_uniform_directions_fill_the_unit_evenly():
    a = _random_poses(40000, seed=3)
    r, t = viewing_directions(a)
    counts = direction_histogram(r, t, "D2", 2)
    kept = asymmetric_unit_pixels("D2", 2)
    expected = 40000 / len(kept)
    assert np.abs(counts[kept] / expected - 1).max() < 0.2


# --------------------------------------------------------------------------------- equal-area cells


def test_equal_area_histogram_cells_and_known_directions():
    rot = np.array([30.0, -179.0, 179.0, 0.0, -90.0])
    tilt = np.array([60.0, 1.0, 179.0, 90.0, 120.0])
    counts, x, y = equal_area_histogram(rot, tilt, bins=(36, 18))
    assert counts.shape == (18, 36) and x.shape == (37,) and y.shape == (19,)
    assert counts.sum() == 5
    lat = 90.0 - tilt
    for r, la in zip(rot, lat, strict=True):
        i = np.searchsorted(x, r, side="right") - 1
        j = np.searchsorted(y, la, side="right") - 1
        assert counts[j, i] >= 1
        assert x[i] <= r < x[i + 1] and y[j] <= la < y[j + 1]
    # rot 30, tilt 60: longitude step 21 (30..40 deg), sin(30 deg) = 0.5 -> band 13 of 18 (z in [0.444, 0.556))
    assert counts[13, 21] == 1
    # north pole (tilt 1) in the top band, south pole (tilt 179) in the bottom band
    assert counts[17].sum() == 1 and counts[0].sum() == 1
    # every cell covers the same solid angle, 4 pi / (nx ny)
    area = np.radians(np.diff(x))[None, :] * np.diff(np.sin(np.radians(y)))[:, None]
    np.testing.assert_allclose(area, 4 * np.pi / (36 * 18), rtol=1e-12)
    assert x[0] == -180 and x[-1] == 180 and y[0] == pytest.approx(-90) and y[-1] == pytest.approx(90)


def test_equal_area_histogram_of_uniform_directions_is_flat():
    r, t = viewing_directions(_random_poses(60000, seed=2))
    counts, _, _ = equal_area_histogram(r, t, bins=(12, 6))
    assert counts.sum() == 60000
    expected = 60000 / 72
    assert np.abs(counts / expected - 1).max() < 5 * math.sqrt(expected) / expected


# ------------------------------------------------------------------------------------------------- bild


def test_bild_text_format_lengths_and_colours():
    a = _random_poses(500, seed=4)
    box, apix, order = 64, 4.4, 2
    text = angdist_bild_text(a, box, apix, "C1", order)
    colours, cylinders = _parse_bild(text)
    r, t = viewing_directions(a)
    counts = direction_histogram(r, t, "C1", order)
    occupied = np.flatnonzero(counts)
    assert len(cylinders) == len(occupied)
    radius = centre = box * apix / 2
    start, end = cylinders[:, :3] - centre, cylinders[:, 3:6] - centre
    np.testing.assert_allclose(np.linalg.norm(start, axis=1), radius, rtol=1e-4)
    # cylinders point along their pixel's direction, in pixel order
    dirs = healpix_pix2vec(order, torch.tensor(occupied)).numpy()
    np.testing.assert_allclose(start / radius, dirs, atol=1e-4)
    lengths = np.linalg.norm(end - start, axis=1)
    c = counts[occupied]
    # coordinates are printed with 6 significant digits (C++ stream defaults): ~1e-3 A here
    np.testing.assert_allclose(lengths, 0.3 * radius * c / c.max(), atol=5e-3)
    # lengths (and colours, blue -> red) are ordered as the counts
    by_count = np.argsort(c, kind="stable")
    assert (np.diff(lengths[by_count]) >= -5e-3).all()
    assert (np.diff(lengths[by_count])[np.diff(c[by_count]) > 0] > 1).all()
    assert (np.diff(colours[by_count, 0]) >= -1e-6).all()
    np.testing.assert_allclose(colours[:, 1], 0)
    np.testing.assert_allclose(colours[:, 0] + colours[:, 2], 1, atol=2e-6)
    np.testing.assert_allclose(cylinders[:, 6], 0.5 * math.pi * radius * (360 / (6 * 2**order)) / 360, rtol=1e-5)


def test_bild_colour_ramp_is_relions():
    """colscale = (clip((p - mean) / sigma, -1, 5) + 1) / 6 with the population sigma over sampled directions."""
    order = 1
    counts = np.zeros(healpix_npix(order))
    counts[[3, 10, 40]] = [10, 1, 2]
    colours, cylinders = _parse_bild(bild_text_from_counts(counts, 100, 1.0, "C1", order))
    mean, sigma = counts.mean(), counts.std()  # numpy's std is the population one
    expected = (np.clip((counts[[3, 10, 40]] - mean) / sigma, -1, 5) + 1) / 6
    np.testing.assert_allclose(colours[:, 0], expected, atol=1e-6)
    assert colours[0, 0] == 1.0 and colours[0, 2] == 0.0  # 10 counts: beyond 5 sigma, pure red
    np.testing.assert_allclose(cylinders[0, 3:6] - 50, 65 * healpix_pix2vec(order, torch.tensor(3)).numpy(), atol=1e-3)
    assert bild_text_from_counts(np.zeros(healpix_npix(order)), 100, 1.0, "C1", order) == ""


def test_bild_with_symmetry_draws_only_the_asymmetric_unit(tmp_path):
    a = _random_poses(800, seed=9)
    text = angdist_bild_text(a, 80, 1.5, "D2", 2)
    _, cylinders = _parse_bild(text)
    r, t = viewing_directions(a)
    counts = direction_histogram(r, t, "D2", 2)
    assert len(cylinders) == np.count_nonzero(counts)
    start = cylinders[:, :3] - 60.0
    rot = np.degrees(np.arctan2(start[:, 1], start[:, 0]))
    assert ((rot >= -1e-3) & (rot <= 180 + 1e-3) & (start[:, 2] >= -1e-3)).all()
    path = tmp_path / "sub" / "run_class001_angdist.bild"
    write_angdist_bild(path, a, 80, 1.5, "D2", 2)
    assert path.read_text() == text


# ------------------------------------------------------------------------------------- real RELION data


def test_relion_run_data_histogram_and_bild():
    a = _relion_poses()
    assert a.shape == (600, 3, 3)
    r, t = viewing_directions(a)
    for sym, order in (("C1", 3), ("C1", 5), ("C6", 3), ("D2", 2)):
        counts = direction_histogram(r, t, sym, order)
        assert counts.sum() == 600
    counts = direction_histogram(r, t, "C1", 3)
    text = angdist_bild_text(a, 64, 4.4, "C1", 3)
    _, cylinders = _parse_bild(text)
    assert len(cylinders) == np.count_nonzero(counts)
    area, _, _ = equal_area_histogram(r, t)
    assert area.sum() == 600
