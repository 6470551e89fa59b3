"""The shared E-step: likelihoods, posterior weights, grid/local searches on simulated 4AKE projections."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cryocli.engines.common.kernel_backprojection import (
    GaussianKernelBackProjector,
    grid_kernel_correction,
    kernel_gridding_correction,
    kernel_on_grid,
)
from cryocli.engines.common.noise_model import NoiseAccumulator, initial_sigma2
from cryocli.engines.common.pose_search import (
    PoseSearcher,
    SearchPixels,
    SliceCache,
    coarse_radius,
    expected_accuracy,
    merge_samples,
    pose_log_likelihoods,
    project_pixels,
    shift_grid,
    significant_samples,
)
from cryocli.engines.common.reconstruct import spectrum_to_map, weighted_spectrum
from cryocli.engines.refine.maps import backproject_samples
from cryocli.geometry.rotations import geodesic_distance, random_rotations
from cryocli.geometry.so3grid import SO3Grid
from cryocli.imaging.ctf import CTFParams, compute_ctf
from cryocli.imaging.projector import BackProjector, Projector
from cryocli.imaging.shifts import phase_shift
from cryocli.io.models import model_potential
from tests.conftest import DEVICES, MODELS, need

BOX, APIX = 48, 2.5


@pytest.fixture(scope="module")
def adk_map() -> torch.Tensor:
    vol = model_potential(need(MODELS / "4ake_adk_open.pdb"), BOX, APIX)
    return torch.as_tensor(vol / vol.std(), dtype=torch.float32)


def _ctf(b: int) -> CTFParams:
    g = np.random.default_rng(1)
    du = g.uniform(10000, 20000, b)
    return CTFParams.build(du, du - 200, g.uniform(0, 180, b), 300.0, 2.7, 0.1)


def _particles(vol: torch.Tensor, b: int, noise_sd: float, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    proj = Projector(vol)
    rot = random_rotations(b, generator=gen, dtype=torch.float32)
    shifts = (torch.rand((b, 2), generator=gen) - 0.5) * 6  # pixels, within the +-5 px search
    ctf = compute_ctf(_ctf(b), BOX, APIX)
    clean = proj.project(rot) * ctf
    # The image holds the particle at -shift (RELION origin = shift): centring moves it by +shift.
    images = phase_shift(clean, -shifts, BOX)
    noise = torch.randn(images.shape, generator=gen, dtype=torch.complex64) * noise_sd * math.sqrt(2 * BOX * BOX) / 2
    return proj, rot, shifts, ctf, images + noise


@pytest.mark.parametrize("device", DEVICES)
def test_shift_grid_is_relion_translational_sampling(device: str) -> None:
    grid = shift_grid(5, 2, device).cpu()
    assert grid.shape == (21, 2)
    assert torch.equal(grid[0], torch.zeros(2))
    assert float(grid.norm(dim=1).max()) <= 5.0
    assert torch.allclose(torch.remainder(grid, 2), torch.zeros_like(grid))


@pytest.mark.parametrize("device", DEVICES)
def test_likelihoods_match_direct_computation(adk_map: torch.Tensor, device: str) -> None:
    proj, rot, shifts, ctf, images = _particles(adk_map, 5, 1.0)
    pixels = SearchPixels.build(BOX, 12, device)
    x, c = pixels.take(images.to(device)), pixels.take(ctf.to(device))
    sigma2 = torch.rand(x.shape) + 0.5
    inv = (1 / sigma2).to(device)
    offsets = shift_grid(3, 1.5, device)
    cand = random_rotations(7, dtype=torch.float32).to(device)
    p = project_pixels(proj.volume_ft.to(device), cand, pixels, 2)
    weighted = (x * c * inv)[:, None, :] * pixels.ramp(offsets)[None]
    x2 = (inv * x.abs() ** 2).sum(1)
    got, _ = pose_log_likelihoods(weighted, p, c * c * inv, x2)
    got_local, _ = pose_log_likelihoods(weighted, p.expand(5, -1, -1), c * c * inv, x2)
    prof, scale = pose_log_likelihoods(weighted, p, c * c * inv, x2, profile_scale=True)
    got, got_local, prof, scale = got.cpu(), got_local.cpu(), prof.cpu(), scale.cpu()
    # The direct sums on the CPU, from the same pixels, images, CTFs, noise and slices.
    pixels, offsets = SearchPixels.build(BOX, 12), offsets.cpu()
    x, c, inv, p = x.cpu(), c.cpu(), inv.cpu(), p.cpu()
    for b in range(5):
        for t in range(offsets.shape[0]):
            xs = x[b] * pixels.ramp(offsets[t])
            for r in range(7):
                direct = -0.5 * float((inv[b] * (xs - c[b] * p[r]).abs() ** 2).sum())
                assert got[b, t, r].item() == pytest.approx(direct, rel=1e-4, abs=1e-2)
                assert got_local[b, t, r].item() == pytest.approx(direct, rel=1e-4, abs=1e-2)
    b, t, r = 2, 1, 3
    xs = x[b] * pixels.ramp(offsets[t])
    a = float(scale[b, t, r])
    best = -0.5 * float((inv[b] * (xs - a * c[b] * p[r]).abs() ** 2).sum())
    for trial in (0.9 * a, 1.1 * a):
        assert best >= -0.5 * float((inv[b] * (xs - trial * c[b] * p[r]).abs() ** 2).sum())
    assert prof[b, t, r].item() == pytest.approx(best, rel=1e-4, abs=1e-2)


@pytest.mark.parametrize("device", DEVICES)
def test_significant_samples_weights_sum_to_one(device: str) -> None:
    loglik = torch.randn(6, 500) * 5
    loglik[0] = -math.inf
    loglik[0, 3] = 0.0
    idx, w, count = significant_samples(loglik.to(device), 0.999, 64)
    idx, w, count = idx.cpu(), w.cpu(), count.cpu()
    assert torch.allclose(w.sum(1), torch.ones(6), atol=1e-6)
    assert int(count[0]) == 1 and int(idx[0, 0]) == 3
    prob = torch.softmax(loglik, 1)
    for b in range(1, 6):
        k = int(count[b])
        kept = prob[b].sort(descending=True).values[:k].sum()
        assert kept >= 0.999 or k == 64
        assert (w[b, :k] > 0).all() and (w[b, k:] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("noise_sd", [0.0, 1.0])
def test_global_search_finds_the_poses(adk_map: torch.Tensor, noise_sd: float, device: str) -> None:
    # noise_sd 1.0 in real-space units of the map's projections: about SNR 0.5 per image at this box.
    proj, rot, shifts, ctf, images = _particles(adk_map, 48, noise_sd)
    grid = SO3Grid(2, device=device, dtype=torch.float32)
    sigma2 = torch.full(images.shape, max(noise_sd, 0.05) ** 2 * BOX * BOX / 2)
    volume_ft, images, ctf, sigma2 = proj.volume_ft.to(device), images.to(device), ctf.to(device), sigma2.to(device)
    search = PoseSearcher(volume_ft, BOX, 2, grid, 0, BOX // 2, 5, 2)
    res = search.search(images, ctf, sigma2)
    err = torch.rad2deg(geodesic_distance(res.rotations.cpu().double(), rot.double()))
    fine_step = math.degrees(grid.psi_step(1))
    assert float(err.median()) < fine_step
    assert float((res.shifts.cpu() - shifts).norm(dim=1).median()) < 1.0
    assert torch.allclose(res.sample_weights.cpu().sum(1), torch.ones(48), atol=1e-5)
    assert (res.n_significant.cpu() >= 1).all() and (res.max_prob.cpu() <= 1).all()
    # Local search one level finer around the found poses (cells within two steps, uniform prior): errors
    # shrink to that level's scale.
    local = PoseSearcher(volume_ft, BOX, 2, grid, 1, BOX // 2, 2, 1, local_radius=2 * grid.cell_size(1),
                         prior_sigma=0)
    centred = phase_shift(images, res.shifts, BOX)
    res2 = local.search(centred, ctf, sigma2, previous=res.rotations)
    err2 = torch.rad2deg(geodesic_distance(res2.rotations.cpu().double(), rot.double()))
    assert float(err2.median()) < math.degrees(grid.psi_step(2))
    assert float(err2.median()) < float(err.median())


@pytest.mark.parametrize("device", DEVICES)
def test_noise_model_recovers_white_noise_variance(device: str) -> None:
    gen = torch.Generator().manual_seed(3)
    imgs = (torch.randn((1000, 32, 32), generator=gen) * 2.0).to(device)
    ft = torch.fft.rfft2(imgs)
    sigma2 = initial_sigma2(imgs, torch.zeros(1000, dtype=torch.long, device=device), 1)
    # Per real/imaginary component the variance of the unnormalised DFT of white noise is n^2 s^2 / 2.
    expect = 32 * 32 * 4.0 / 2
    assert np.allclose(sigma2[0, 2:16].cpu().numpy(), expect, rtol=0.05)
    acc = NoiseAccumulator(32, 2, device)
    acc.add(ft.abs() ** 2, torch.arange(1000, device=device) % 2)
    assert acc.sigma2().shape == (2, 17)


@pytest.mark.parametrize("device", DEVICES)
def test_gaussian_kernel_backprojection_reconstructs_the_map(adk_map: torch.Tensor, device: str) -> None:
    proj = Projector(adk_map)
    rot = random_rotations(3000, generator=torch.Generator().manual_seed(5), dtype=torch.float32)
    bp = GaussianKernelBackProjector(BOX, device=device)
    for s in range(0, 3000, 500):
        bp.insert(proj.project(rot[s:s + 500]).to(device), None, rot[s:s + 500].to(device))
    data, weight = bp.symmetrised()
    rec = spectrum_to_map(weighted_spectrum(data, weight, BOX, 2, BOX // 2), BOX, 2)
    rec = (rec * kernel_gridding_correction(BOX, device=device)).cpu()
    cc = float(torch.corrcoef(torch.stack([rec.reshape(-1), adk_map.reshape(-1)]))[0, 1])
    assert cc > 0.97, cc


@pytest.mark.parametrize("device", DEVICES)
def test_gaussian_kernel_on_the_grid_reconstructs_the_map(adk_map: torch.Tensor, device: str) -> None:
    """``--kernel gaussian``: trilinear accumulators convolved with the Gaussian's samples, corrected by that
    kernel's envelope, give the map, as the paper's inserted kernel does; from noisy projections the two maps
    agree with each other better than with the truth."""
    proj = Projector(adk_map)
    gen = torch.Generator().manual_seed(5)
    rot = random_rotations(3000, generator=gen, dtype=torch.float32)
    bp, inserted = BackProjector(BOX, device=device), GaussianKernelBackProjector(BOX, device=device)
    for s in range(0, 3000, 500):
        slices = proj.project(rot[s:s + 500])
        noisy = slices + 0.5 * slices.abs().mean() * torch.randn(slices.shape, generator=gen, dtype=slices.dtype)
        bp.insert(noisy.to(device), None, rot[s:s + 500].to(device))
        inserted.insert(noisy.to(device), None, rot[s:s + 500].to(device))
    data, weight = bp.symmetrised()
    rec = spectrum_to_map(weighted_spectrum(kernel_on_grid(data), kernel_on_grid(weight), BOX, 2, BOX // 2), BOX, 2)
    grid_map = (rec * grid_kernel_correction(BOX, device=device)).cpu()
    rec = rec.cpu()
    data, weight = inserted.symmetrised()
    insert_map = (spectrum_to_map(weighted_spectrum(data, weight, BOX, 2, BOX // 2), BOX, 2)
                  * kernel_gridding_correction(BOX, device=device)).cpu()

    def cc(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(torch.corrcoef(torch.stack([a.reshape(-1), b.reshape(-1)]))[0, 1])

    scores = {"uncorrected": cc(rec, adk_map), "grid": cc(grid_map, adk_map), "insert": cc(insert_map, adk_map),
              "grid_vs_insert": cc(grid_map, insert_map)}
    assert scores["grid"] > 0.97 and scores["grid"] > scores["uncorrected"], scores  # the right envelope divided out
    assert scores["grid"] >= scores["insert"] - 0.005, scores
    assert scores["grid_vs_insert"] > max(scores["grid"], scores["insert"]), scores


@pytest.mark.parametrize("device", DEVICES)
def test_gaussian_kernel_on_the_grid_is_the_interpolated_gaussian(device: str) -> None:
    """One pixel inserted trilinearly, then :func:`kernel_on_grid`: each grid point gets the product over the axes
    of the Gaussian's samples ``exp(-d^2 / h)`` (d = -1, 0, 1) interpolated linearly at its offset from the pixel,
    which is within 0.082 of the exact Gaussian on each axis and zero from 2 voxels on."""
    n, h = 8, 2.0
    rot = random_rotations(1, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(device)
    kx, ky = torch.tensor([2.3], dtype=torch.float64, device=device), torch.tensor([-1.6], dtype=torch.float64,
                                                                                    device=device)
    bp = BackProjector(n, dtype=torch.float64, device=device)
    bp.insert_pixels(torch.ones((1, 1), dtype=torch.complex128, device=device), None, rot, kx, ky)
    weight = kernel_on_grid(bp.weight, h).cpu()
    g = bp.grid_size
    c = (bp.scale * (kx[0] * rot[0, 0] + ky[0] * rot[0, 1])).cpu()  # (x, y, z) voxels from the centre
    axis = torch.arange(g, dtype=torch.float64) - g // 2
    samples = torch.tensor([math.exp(-1 / h), 1.0, math.exp(-1 / h)], dtype=torch.float64)

    def interpolated(x: torch.Tensor) -> torch.Tensor:
        # linear interpolation of the samples at -1, 0, 1, falling to zero at -2 and 2
        knots = torch.tensor([-2.0, -1.0, 0.0, 1.0, 2.0], dtype=torch.float64)
        values = torch.cat([torch.zeros(1, dtype=torch.float64), samples, torch.zeros(1, dtype=torch.float64)])
        x = x.clamp(-2, 2)
        i = torch.clamp(torch.searchsorted(knots, x, right=True) - 1, 0, 3)
        t = (x - knots[i]) / (knots[i + 1] - knots[i])
        return values[i] * (1 - t) + values[i + 1] * t

    wx, wy, wz = (interpolated(axis - c[k]) for k in range(3))
    expected = wz[:, None, None] * wy[None, :, None] * wx[None, None, :]
    assert torch.allclose(weight, expected, atol=1e-12)
    offsets = torch.linspace(-1.5, 1.5, 61, dtype=torch.float64)
    assert float((interpolated(offsets) - torch.exp(-offsets**2 / h)).abs().max()) < 0.082
    assert math.isclose(float(weight.sum()), float(samples.sum()) ** 3, rel_tol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_gaussian_kernel_insertion_matches_its_definition(device: str) -> None:
    """Every pixel lands on the 27 grid points round(c) + {-1, 0, 1}^3 with weight exp(-|c - g|^2 / h): the
    batched insertion against a direct loop over pixels and neighbours (float64)."""
    n, h = 8, 2.0
    gen = torch.Generator().manual_seed(11)
    rot = random_rotations(3, generator=gen, dtype=torch.float64)
    kx, ky = torch.meshgrid(torch.arange(0, 4.0, dtype=torch.float64), torch.arange(-3.0, 4.0, dtype=torch.float64),
                            indexing="xy")
    kx, ky = kx.reshape(-1), ky.reshape(-1)
    keep = kx**2 + ky**2 <= 16
    kx, ky = kx[keep], ky[keep]
    values = torch.randn(3, kx.numel(), generator=gen, dtype=torch.complex128)
    weights = torch.rand(3, kx.numel(), generator=gen, dtype=torch.float64) + 0.1
    bp = GaussianKernelBackProjector(n, dtype=torch.float64, bandwidth=h, device=device)
    bp.insert_pixels(values.to(device), weights.to(device), rot.to(device), kx.to(device), ky.to(device))
    g = bp.grid_size
    ref = torch.zeros((3, g, g, g), dtype=torch.float64)
    for b in range(3):
        for m in range(kx.numel()):
            c = bp.scale * (kx[m] * rot[b, 0] + ky[m] * rot[b, 1])  # (x, y, z) voxels from the centre
            centre = torch.round(c)
            if float(centre.abs().max()) > g // 2 - 1:
                continue
            for dz in (-1, 0, 1):
                for dy in (-1, 0, 1):
                    for dx in (-1, 0, 1):
                        p = centre + torch.tensor([dx, dy, dz], dtype=torch.float64)
                        k = math.exp(-float(((c - p) ** 2).sum()) / h)
                        ix, iy, iz = (int(v) + g // 2 for v in p)
                        ref[:, iz, iy, ix] += k * torch.stack([values[b, m].real, values[b, m].imag,
                                                               weights[b, m]])
    assert torch.allclose(bp.accumulators.cpu(), ref, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_slice_cache_projects_each_cell_once(adk_map: torch.Tensor, device: str) -> None:
    proj = Projector(adk_map)
    volume_ft = proj.volume_ft.to(device)
    grid = SO3Grid(1, device=device, dtype=torch.float32)
    pixels = SearchPixels.build(BOX, 12, device)
    cache = SliceCache(volume_ft, grid, 1, pixels, 2)
    ids = torch.tensor([[5, 17, 5], [900, 17, 3]], device=device)
    re, im, rot = cache.get(ids)
    direct = project_pixels(volume_ft, grid.rotations(1, ids), pixels, 2).cpu()
    assert torch.allclose(torch.complex(re, im).cpu(), direct, rtol=1e-5, atol=1e-3)
    assert torch.allclose(rot.cpu(), grid.rotations(1, ids).float().cpu())
    assert cache.projected == 4
    cache.get(torch.tensor([17, 900, 6], device=device))
    assert cache.projected == 5  # only cell 6 was new
    # A cache too small for a request projects it without keeping it, and still answers correctly.
    tiny = SliceCache(volume_ft, grid, 1, pixels, 2, max_bytes=1)
    re2, im2, _ = tiny.get(ids)
    assert torch.allclose(torch.complex(re2, im2).cpu(), direct, rtol=1e-5, atol=1e-3)


def test_coarse_radius_is_relions_coarse_image_size() -> None:
    # 15 degrees at the edge of an 80 A particle: (15 / 360) pi 80 / 1.2 = 8.73 A -> ceil(160 / 8.73) = 19 px.
    assert coarse_radius(64, 2.5, 15.0, 80.0, 32) == 19
    assert coarse_radius(64, 2.5, 7.5, 80.0, 32) == 32  # capped at the fine pass's radius
    assert coarse_radius(64, 2.5, 15.0, 80.0, 14) == 14


@pytest.mark.parametrize("device", DEVICES)
def test_merge_samples_groups_the_batch_by_rotation(adk_map: torch.Tensor, device: str) -> None:
    proj, rot, shifts, ctf, images = _particles(adk_map, 8, 2.0, seed=3)
    grid = SO3Grid(2, device=device, dtype=torch.float32)
    sigma2 = torch.full(images.shape, 4.0 * BOX * BOX / 2)
    res = PoseSearcher(proj.volume_ft.to(device), BOX, 2, grid, 0, 16, 5, 2).search(images.to(device), ctf.to(device),
                                                                                    sigma2.to(device))
    rotation, member = merge_samples(res)
    rotation, member = rotation.cpu(), member.cpu()
    weights, ids, rotations = res.sample_weights.cpu(), res.sample_ids.cpu(), res.sample_rotations.cpu()
    ok = weights > 0
    assert int((member >= 0).sum()) == int(ok.sum())
    # One row per distinct fine cell of the whole batch, and every sample maps to its own rotation.
    assert rotation.shape[0] == int(torch.unique(ids[ok]).numel())
    assert torch.allclose(rotation[member[ok]], rotations[ok])
    same = ids[ok][:, None] == ids[ok][None, :]
    assert torch.equal(same, member[ok][:, None] == member[ok][None, :])
    # Each particle's weights still sum to 1, so the rows' summed weights hold one unit per particle.
    assert torch.allclose(weights.sum(1), torch.ones(8), atol=1e-5)
    per_row = torch.zeros(rotation.shape[0]).index_add_(0, member[ok], weights[ok].float())
    assert float(per_row.sum()) == pytest.approx(8.0, abs=1e-4) and bool((per_row > 0).all())


@pytest.mark.parametrize("device", DEVICES)
def test_backprojecting_a_batch_equals_backprojecting_its_particles_one_by_one(adk_map: torch.Tensor,
                                                                               device: str) -> None:
    proj, rot, shifts, ctf, images = _particles(adk_map, 8, 2.0, seed=5)
    grid = SO3Grid(2, device=device, dtype=torch.float32)
    sigma2 = torch.full(images.shape, 4.0 * BOX * BOX / 2)
    images, ctf, sigma2 = images.to(device), ctf.to(device), sigma2.to(device)
    res = PoseSearcher(proj.volume_ft.to(device), BOX, 2, grid, 0, 16, 5, 2).search(images, ctf, sigma2)
    together, alone = BackProjector(BOX, device=device), BackProjector(BOX, device=device)
    backproject_samples([together], images, ctf, 1.0 / sigma2, res, 16)
    for i in range(8):
        q = slice(i, i + 1)
        backproject_samples([alone], images[q], ctf[q], 1.0 / sigma2[q], res.rows(q), 16)
    for a, b in zip((t.cpu() for t in together.symmetrised()), (t.cpu() for t in alone.symmetrised()), strict=True):
        assert torch.allclose(a, b, atol=1e-4 * float(b.abs().max()))


@pytest.mark.parametrize("device", DEVICES)
def test_posterior_mean_pose_is_a_rotation_near_the_best(adk_map: torch.Tensor, device: str) -> None:
    proj, rot, shifts, ctf, images = _particles(adk_map, 32, 3.0, seed=4)
    grid = SO3Grid(2, device=device, dtype=torch.float32)
    sigma2 = torch.full(images.shape, 9.0 * BOX * BOX / 2)
    res = PoseSearcher(proj.volume_ft.to(device), BOX, 2, grid, 0, BOX // 2, 5, 2).search(
        images.to(device), ctf.to(device), sigma2.to(device))
    m = res.mean_rotations.cpu().double()
    assert torch.allclose(m @ m.transpose(1, 2), torch.eye(3, dtype=torch.float64).expand(32, 3, 3), atol=1e-5)
    assert torch.allclose(torch.det(m), torch.ones(32, dtype=torch.float64), atol=1e-5)
    near = torch.rad2deg(geodesic_distance(m, res.rotations.cpu().double()))
    assert float(near.max()) <= math.degrees(grid.cell_size(0)) + 1e-3
    err_mean = torch.rad2deg(geodesic_distance(m, rot.double()))
    err_best = torch.rad2deg(geodesic_distance(res.rotations.cpu().double(), rot.double()))
    assert float(err_mean.median()) <= float(err_best.median()) + 0.5


@pytest.mark.parametrize("device", DEVICES)
def test_expected_accuracy_grows_with_the_noise(adk_map: torch.Tensor, device: str) -> None:
    proj, rot, _, ctf, _ = _particles(adk_map, 16, 1.0, seed=5)
    volume_ft, rot = proj.volume_ft.to(device), rot.to(device)
    pixels = SearchPixels.build(BOX, BOX // 2, device)
    c = pixels.take(ctf.to(device))
    gen = torch.Generator().manual_seed(0)
    low = expected_accuracy(volume_ft, pixels, 2, rot, c, torch.full(c.shape, 1.0 / BOX**2, device=device), gen)
    high = expected_accuracy(volume_ft, pixels, 2, rot, c, torch.full(c.shape, 1.0 / (100 * BOX**2), device=device),
                             gen)
    assert 0 < low[0] < high[0] and 0 < low[1] < high[1]


@pytest.mark.parametrize("device", DEVICES)
def test_noise_from_a_pixel_subset_matches_the_full_plane(device: str) -> None:
    gen = torch.Generator().manual_seed(7)
    ft = torch.fft.rfft2(torch.randn((50, 32, 32), generator=gen).to(device))
    groups = torch.arange(50, device=device) % 2
    full = NoiseAccumulator(32, 2, device)
    full.add(ft.abs() ** 2, groups)
    pixels = SearchPixels.build(32, 16, device)
    part = NoiseAccumulator(32, 2, device)
    shells = torch.floor(torch.sqrt(pixels.kx**2 + pixels.ky**2) + 0.5).long()
    part.add_pixels(pixels.take(ft).abs() ** 2, shells, groups)
    assert torch.allclose(part.sigma2()[:, 1:16].cpu(), full.sigma2()[:, 1:16].cpu(), rtol=0.15)


@pytest.mark.parametrize("device", DEVICES)
def test_a_particles_search_does_not_depend_on_its_batch(adk_map: torch.Tensor, device: str) -> None:
    """The fine pass scores only each particle's own significant samples: searched in a batch (padded to the
    batch's largest count) or alone, a particle gets the same samples, weights and poses, globally and locally."""
    proj, rot, shifts, ctf, images = _particles(adk_map, 8, 12.0, seed=6)
    grid = SO3Grid(2, device=device, dtype=torch.float32)
    sigma2 = torch.full(images.shape, 144.0 * BOX * BOX / 2)
    volume_ft, images, ctf, sigma2 = proj.volume_ft.to(device), images.to(device), ctf.to(device), sigma2.to(device)
    for level, previous in ((0, None), (1, rot.to(device))):
        searcher = PoseSearcher(volume_ft, BOX, 2, grid, level, 16, 5, 2)
        batch = searcher.search(images, ctf, sigma2, previous=previous)
        counts = batch.n_significant.cpu()
        assert int(counts.min()) < int(counts.max())  # the batch really pads some particles
        for i in range(8):
            q = slice(i, i + 1)
            alone = searcher.search(images[q], ctf[q], sigma2[q], previous=None if previous is None else previous[q])
            n = alone.sample_weights.shape[1]
            assert torch.equal(alone.sample_ids[0].cpu(), batch.sample_ids[i, :n].cpu())
            # The weights are a softmax of fine log-likelihoods that float32 rounds differently in a batch's bmm and
            # a lone particle's (3e-4 at |ll| ~ 370, 7 ulps, on an AVX-512 EPYC, where rtol 1e-4 failed). The
            # marginal is held to rtol 1e-5 below; moving every log-likelihood by at most d moves a weight by a
            # factor of at most e^(2d), so that is the weights' bound (a padded slot scored as a sample would move
            # them by tens of percent).
            d = 1e-5 * abs(float(alone.log_likelihood[0]))
            assert torch.allclose(alone.sample_weights[0].cpu(), batch.sample_weights[i, :n].cpu(),
                                  rtol=math.expm1(2 * d), atol=1e-5)
            assert bool((batch.sample_weights[i, n:].cpu() == 0).all())
            assert torch.allclose(alone.mean_rotations[0].cpu(), batch.mean_rotations[i].cpu(), atol=1e-5)
            assert torch.allclose(alone.log_likelihood[0].cpu(), batch.log_likelihood[i].cpu(), rtol=1e-5)
