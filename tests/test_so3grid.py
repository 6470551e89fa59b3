"""HEALPix and the hierarchical SO(3) grid (cryocli.geometry.so3grid), checked against RELION's sampling."""

from __future__ import annotations

import math

import numpy as np
import pytest
import starfile
import torch
from scipy import stats

from cryocli.errors import CryocliError
from cryocli.geometry.rotations import euler_to_matrix, geodesic_distance, projection_direction, random_rotations
from cryocli.geometry.so3grid import (
    SO3Grid,
    healpix_ang2pix,
    healpix_max_pixrad,
    healpix_npix,
    healpix_pix2ang,
    healpix_pix2vec,
    healpix_vec2pix,
)

from .conftest import DEVICES, STARFILE_DATA, need

RELION_SAMPLING = STARFILE_DATA / "relion_tutorial" / "run_it025_sampling_3D.star"


def _unit_vectors(n: int, seed: int) -> torch.Tensor:
    v = torch.randn(n, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return v / v.norm(dim=-1, keepdim=True)


def _haar(n: int, seed: int) -> torch.Tensor:
    return random_rotations(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ------------------------------------------------------------------------------------------------ HEALPix


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("order", range(6))
def test_healpix_pix2ang_ang2pix_round_trip(order, device: str):
    pix = torch.arange(healpix_npix(order))
    theta, phi = healpix_pix2ang(order, pix.to(device))
    back = healpix_ang2pix(order, theta, phi).cpu()
    theta, phi = theta.cpu(), phi.cpu()
    assert (theta > 0).all() and (theta < math.pi).all() and (phi >= 0).all() and (phi < 2 * math.pi).all()
    # Each centre lies in its own pixel (so centres are distinct too).
    assert torch.equal(back, pix)
    # The nested children of p, 4p .. 4p+3, lie inside p.
    if order > 0:
        child_dirs = healpix_pix2vec(order, pix.to(device))
        assert torch.equal(healpix_vec2pix(order - 1, child_dirs).cpu(), pix // 4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("order", range(5))
def test_healpix_pixels_equal_area_and_max_radius(order, device: str):
    v = _unit_vectors(100_000, seed=order)
    pix = healpix_vec2pix(order, v.to(device))
    centres = healpix_pix2vec(order, pix).cpu()
    pix = pix.cpu()
    counts = torch.bincount(pix, minlength=healpix_npix(order)).numpy()
    chi2 = stats.chisquare(counts)  # equal-area pixels: uniform points fall evenly
    assert chi2.pvalue > 1e-3, chi2
    dist = torch.acos((v * centres).sum(-1).clamp(-1, 1))
    bound = healpix_max_pixrad(order)
    # Every point lies within the bound of its own pixel's centre, and the bound is tight.
    assert dist.max() <= bound and dist.max() > 0.95 * bound, (float(dist.max()), bound)


@pytest.mark.parametrize("device", DEVICES)
def test_directions_match_relion_sampling_file_in_nested_order(device: str):
    star = starfile.read(need(RELION_SAMPLING))
    general, dirs = star["sampling_general"], star["sampling_directions"]
    order, psi_step = int(general["rlnHealpixOrder"]), float(general["rlnPsiStep"])
    assert (order, psi_step) == (2, 15.0)
    grid = SO3Grid(base_order=order, device=device, dtype=torch.float64)
    assert grid.n_directions(0) == len(dirs) == 192
    assert math.degrees(grid.psi_step(0)) == pytest.approx(psi_step)
    first_psi = torch.arange(192, device=device) * grid.n_psi(0)  # psi index 0 of every direction
    euler = grid.euler(0, first_psi).cpu().numpy()
    # Index by index: RELION lists the directions in HEALPix *nested* order, rot wrapped to (-180, 180].
    assert np.abs(euler[:, 0] - dirs["rlnAngleRot"].to_numpy()).max() < 1e-3
    assert np.abs(euler[:, 1] - dirs["rlnAngleTilt"].to_numpy()).max() < 1e-3
    # The same as sets of unit vectors (independent of listing order and angle wrapping).
    ref = projection_direction(euler_to_matrix(torch.tensor(dirs["rlnAngleRot"].to_numpy()),
                                               torch.tensor(dirs["rlnAngleTilt"].to_numpy()), 0.0))
    ours = projection_direction(grid.rotations(0, first_psi)).cpu()
    angle = torch.acos((ref @ ours.T).clamp(-1, 1)).min(1).values
    assert angle.max() < math.radians(1e-3)
    # Level 0 psi values are RELION's k * psi_step.
    psi = grid.euler(0, torch.arange(grid.n_psi(0), device=device))[:, 2].cpu().numpy() % 360
    assert np.abs(psi - psi_step * np.arange(24)).max() < 1e-9


# ------------------------------------------------------------------------------------------------- SO(3)


@pytest.mark.parametrize("device", DEVICES)
def test_cell_counts_and_scales(device: str):
    grid = SO3Grid(device=device)
    for level in range(4):
        assert grid.n_directions(level) == 12 * 4**level
        assert grid.n_psi(level) == 6 * 2**level
        assert grid.n_cells(level) == 72 * 8**level  # Cryo2SSNet's |G_k|
        assert grid.cell_size(level) == pytest.approx(math.radians(60 / 2**level))
    assert SO3Grid(base_order=2).n_cells(0) == 192 * 24 == 4608
    assert grid.rotations(1).shape == (576, 3, 3) and grid.rotations(1).dtype == torch.get_default_dtype()


@pytest.mark.parametrize("device", DEVICES)
def test_rotations_agree_with_euler_and_directions(device: str):
    grid = SO3Grid(device=device, dtype=torch.float64)
    ids = torch.arange(grid.n_cells(2), device=device)
    e = grid.euler(2, ids).cpu()
    assert (grid.rotations(2, ids).cpu() - euler_to_matrix(e[:, 0], e[:, 1], e[:, 2])).abs().max() < 1e-12
    view = projection_direction(grid.rotations(2, ids)).cpu()
    assert (view - grid.directions(2)[ids // grid.n_psi(2)].cpu()).abs().max() < 1e-12
    # Within one direction the poses are a comb of in-plane turns, one psi step apart.
    first = grid.rotations(2, torch.arange(grid.n_psi(2), device=device)).cpu()
    steps = geodesic_distance(first[1:], first[:-1])
    assert (steps - grid.psi_step(2)).abs().max() < 1e-12
    with pytest.raises(CryocliError):
        grid.rotations(0, torch.tensor([72], device=device))


@pytest.mark.parametrize("device", DEVICES)
def test_children_and_parent_partition_the_ids(device: str):
    grid = SO3Grid(device=device)
    for level in range(3):
        ids = torch.arange(grid.n_cells(level))
        kids = grid.children(level, ids.to(device))
        assert kids.shape == (len(ids), 8)
        assert torch.equal(torch.sort(kids.flatten()).values.cpu(), torch.arange(grid.n_cells(level + 1)))
        assert torch.equal(grid.parent(level + 1, kids).cpu(), ids[:, None].expand(-1, 8))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("level", [0, 1, 2])
def test_children_lie_in_their_parent_cell(level, device: str):
    grid = SO3Grid(device=device, dtype=torch.float64)
    ids = torch.arange(grid.n_cells(level))
    if level == 2:
        ids = ids[torch.randperm(len(ids), generator=torch.Generator().manual_seed(0))[:600]]
    kids = grid.children(level, ids.to(device)).flatten()
    child_rot = grid.rotations(level + 1, kids)
    parents = ids.repeat_interleave(8)
    # Every child is nearer to its own parent than to any other cell of the parent level.
    nearest, _ = grid.nearest(child_rot, level)
    assert torch.equal(nearest[:, 0].cpu(), parents)
    # And within the derived step: direction inside the parent's pixel, psi = parent's +- step / 4.
    d = geodesic_distance(child_rot, grid.rotations(level, parents.to(device))).cpu()
    a = healpix_max_pixrad(grid.order(level))
    assert d.max() <= 2 * math.acos(math.cos(a / 2) * math.cos(grid.psi_step(level) / 8))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("level", [0, 1, 2, 3])
def test_grid_covers_so3(level, device: str):
    grid = SO3Grid(device=device, dtype=torch.float64)
    rotations = _haar(2000, seed=10 + level).to(device)
    ids, dist = grid.nearest(rotations, level)
    direct = geodesic_distance(rotations, grid.rotations(level, ids[:, 0])).cpu()
    ids, dist = ids.cpu(), dist.cpu()
    assert (ids[:, 0] >= 0).all()
    assert torch.allclose(dist[:, 0], direct, atol=1e-12)
    # Derived bound: cos(w/2) = cos(max_pixrad/2) cos(step/4); about 1.1 cell sizes.
    assert dist.max() <= grid.covering_radius(level)
    assert grid.covering_radius(level) < 1.12 * grid.cell_size(level)
    if level <= 2:  # the exact distances make the nearest cell the true nearest one (brute force)
        sample = rotations[:300]
        brute = geodesic_distance(sample[:, None], grid.rotations(level)[None]).min(1).values.cpu()
        assert (brute - dist[:300, 0]).abs().max() < 1e-12


@pytest.mark.parametrize("device", DEVICES)
def test_cells_within_is_exact_against_brute_force(device: str):
    grid = SO3Grid(device=device, dtype=torch.float64)
    level, radius = 2, 0.4
    centres = _haar(40, seed=3).to(device)
    ids, dist = grid.cells_within(centres, level, radius)
    brute = geodesic_distance(centres[:, None], grid.rotations(level)[None]).cpu()  # (40, 4608)
    ids, dist = ids.cpu(), dist.cpu()
    for b in range(len(centres)):
        found = set(ids[b][ids[b] >= 0].tolist())
        assert found == set(torch.nonzero(brute[b] <= radius)[:, 0].tolist())
    valid = ids >= 0
    assert torch.allclose(dist[valid], brute.gather(1, ids.clamp(min=0))[valid], atol=1e-12)
    assert (torch.diff(dist, dim=1)[valid[:, 1:]] >= 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_cell_neighbourhoods_symmetric_and_self_first(device: str):
    grid = SO3Grid(device=device, dtype=torch.float64)
    level, radius = 2, 1.5 * grid.cell_size(2)
    ids = torch.randperm(grid.n_cells(level), generator=torch.Generator().manual_seed(1))[:200]
    nb, valid, dist = grid.local_cells(grid.rotations(level, ids.to(device)), level, radius)
    nb, valid, dist = nb.cpu(), valid.cpu(), dist.cpu()
    assert torch.equal(nb[:, 0], ids) and (dist[:, 0] < 1e-12).all()
    assert (valid.sum(1) >= 9).all()  # at least the adjacent directions and in-plane steps
    pairs = [(int(a), int(b)) for a, row, ok in zip(ids, nb, valid) for b in row[ok]]
    back, back_ok, _ = grid.local_cells(grid.rotations(level, torch.tensor([b for _, b in pairs], device=device)),
                                        level, radius)
    back, back_ok = back.cpu(), back_ok.cpu()
    assert all(a in set(row[ok].tolist()) for (a, _), row, ok in zip(pairs, back, back_ok))
    knn, kd = grid.nearest(grid.rotations(level, ids[:20].to(device)), level, k=7)
    knn, kd = knn.cpu(), kd.cpu()
    assert knn.shape == (20, 7) and torch.equal(knn[:, 0], ids[:20])
    assert (kd[:, -1] <= dist[:20, 6] + 1e-12).all()
    with pytest.raises(CryocliError):
        grid.nearest(grid.rotations(level, ids.to(device)), level, k=0)


@pytest.mark.parametrize("device", DEVICES)
def test_local_cells_around_arbitrary_poses(device: str):
    grid = SO3Grid(base_order=1, device=device, dtype=torch.float32)
    centres = _haar(16, seed=5)
    radius = 2 * grid.cell_size(2)
    ids, valid, dist = grid.local_cells(centres.to(device), 2, radius)
    rot = grid.rotations(2, ids).cpu()
    ids, valid, dist = ids.cpu(), valid.cpu(), dist.cpu()
    assert rot.shape == (*ids.shape, 3, 3) and rot.dtype == torch.float32
    d = geodesic_distance(rot.double(), centres[:, None])
    assert (d[valid] <= radius + 1e-6).all()
    assert torch.allclose(dist[valid], d[valid], atol=1e-6) and torch.isinf(dist[~valid]).all()
    brute = geodesic_distance(centres[:, None], grid.rotations(2).double().cpu()[None]) <= radius
    assert torch.equal(valid.sum(1), brute.sum(1))
    # Padding repeats the nearest cell so that it can be evaluated and masked.
    assert torch.equal(ids[~valid], ids[:, :1].expand_as(ids)[~valid])
