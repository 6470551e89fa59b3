"""Cryo2SSNet: each part on its own (S2S2 head, the grid hierarchy, the beam search and its polishing, the unbiased
loss, the SNR estimate, the denoiser), option checks, the run contract (checkpoints, --resume, --halves, real RELION
files) and the done-means reconstruction of simulated 4AKE from a random start."""

from __future__ import annotations

import json
import math
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cryocli.cli.app import app
from cryocli.engines.abinitio.cryo2ssnet import Cryo2SSNetConfig, Schedule
from cryocli.engines.abinitio.cryospin import ImageModel
from cryocli.engines.abinitio.denoiser import MLPDenoiser, circular_mask, train_denoiser
from cryocli.engines.abinitio.dhbs import BeamSearch, identity, pairwise_cost
from cryocli.engines.abinitio.s2s2 import S2S2Encoder
from cryocli.engines.abinitio.unbiased_loss import estimate_snr, normalise, unbiased_l2
from cryocli.engines.abinitio.voxel_decoder import SUPPORT_EDGE, DensityConstraint, VoxelDecoder
from cryocli.engines.particles import background_mask
from cryocli.errors import OptionError
from cryocli.geometry.rotations import axis_angle_to_matrix, geodesic_distance, random_rotations
from cryocli.geometry.so3grid import SO3Grid
from cryocli.imaging.ctf import CTFParams
from cryocli.imaging.fourier import radius_3d
from cryocli.imaging.projector import Projector
from cryocli.imaging.simulate import render_clean
from cryocli.io.dataset import ParticleStack
from cryocli.io.models import demo_model_path
from cryocli.io.mrc import read_map
from cryocli.io.star import read_star
from cryocli.io.volumes import load_volume

from .conftest import ASPIRE, CRYODRGN, DEVICES, need, simulate_4ake

runner = CliRunner()


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def ake32() -> tuple[torch.Tensor, float]:
    """The bundled 4AKE model as a 32 px map at 2.4 A/px."""
    vol, _ = load_volume(demo_model_path(), 32, 2.4)
    return torch.tensor(vol), 2.4


def _clean(volume: torch.Tensor, apix: float, count: int, seed: int, shifts_px: torch.Tensor | None = None
           ) -> tuple[torch.Tensor, torch.Tensor, CTFParams]:
    """Noise-free CTF-modulated projections (the shared projector), their rotations and CTFs; ``shifts_px`` moves
    each particle off centre by ``-shift`` (RELION origin ``shift * apix``)."""
    g = torch.Generator().manual_seed(seed)
    rot = random_rotations(count, generator=g, dtype=torch.float32)
    defocus = 15000 + 5000 * torch.rand(count, generator=g)
    ctf = CTFParams.build(defocus + 150, defocus - 150, torch.full((count,), 40.0), 300.0, 2.7, 0.07, 0.0, 0.0, 1.0)
    origins = torch.zeros(count, 2) if shifts_px is None else shifts_px * apix
    images = render_clean(Projector(volume), rot, origins, ctf, apix).to(torch.float32)
    return images, rot, ctf


_simulate = partial(simulate_4ake, apix=2.4)


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    return _simulate(tmp_path_factory.mktemp("small") / "sim", 160)


# ------------------------------------------------------------------------------------------------ parts


@pytest.mark.parametrize("device", DEVICES)
def test_s2s2_head_returns_rotations(device: str) -> None:
    torch.manual_seed(0)
    encoder = S2S2Encoder(32, predict_shifts=True, max_shift=4.0).to(device)
    rot, shift = (t.cpu() for t in encoder(normalise(torch.randn(16, 32, 32).to(device))))
    eye = torch.eye(3).expand(16, 3, 3)
    assert torch.allclose(rot @ rot.transpose(1, 2), eye, atol=1e-5)
    assert torch.allclose(torch.linalg.det(rot), torch.ones(16), atol=1e-5)
    assert shift.shape == (16, 2) and bool((shift.abs() <= 4.0).all())
    # Different images, different poses (the head is not constant).
    assert float(geodesic_distance(rot[0], rot[1]).detach()) > 1e-4


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("level", [0, 1, 2])
def test_base_grid_and_subdivision_tile_the_cells(level, device: str) -> None:
    grid = SO3Grid(0, device=device)
    assert grid.n_cells(0) == 72
    ids = torch.arange(grid.n_cells(level), device=device)
    children = grid.children(level, ids)
    assert children.shape == (grid.n_cells(level), 8)
    # The children of all cells are the next level, each exactly once.
    assert torch.equal(torch.sort(children.reshape(-1)).values.cpu(), torch.arange(grid.n_cells(level + 1)))
    # Every child is nearer its parent than the parent's cell radius (its covering radius).
    parent_rot = grid.rotations(level, ids, checked=False).to(torch.float64)[:, None].expand(-1, 8, -1, -1)
    child_rot = grid.rotations(level + 1, children).to(torch.float64)
    dist = geodesic_distance(child_rot, parent_rot).cpu()
    assert float(dist.max()) < grid.covering_radius(level)
    assert torch.equal(grid.parent(level + 1, children).cpu(), ids[:, None].expand(-1, 8).cpu())


@pytest.mark.parametrize("device", DEVICES)
def test_beam_search_finds_clean_poses_and_polishing_lowers_the_cost(ake32, device: str) -> None:
    """Noise-free projections of the known map, encoder poses 20 degrees off, particles shifted by up to 1.5 px:
    the beam lands within the last level's cell of the true pose for nearly all particles (measured 62 of 64) and
    gradient descent lowers every particle's cost."""
    volume, apix = ake32
    n = 32
    g = torch.Generator().manual_seed(3)
    true_shift = (torch.rand(64, 2, generator=g) - 0.5) * 3.0
    images, rot, ctf_params = _clean(volume, apix, 64, seed=1, shifts_px=true_shift)
    model = ImageModel(n, apix, torch.device(device))
    decoder = VoxelDecoder(n, 10.0, g, device)
    with torch.no_grad():
        decoder.density.copy_(volume.to(device))
    grid = decoder.grid().detach()
    spectra, ctf = model.spectra(images.to(device)), model.ctf(ctf_params.to(device))
    search = BeamSearch(model, width=4, depth=5, gd_steps=20, gd_lr=0.05, max_shift=4.0, radius=10.0)
    guess = axis_angle_to_matrix(torch.randn(64, 3, generator=g) * math.radians(20) / math.sqrt(3)) @ rot
    found, shift, beam_cost = search.beam(grid, spectra, ctf, guess.to(device), torch.zeros(64, 2, device=device),
                                          identity)
    err = geodesic_distance(found.cpu(), rot)
    within = (err <= search.final_cell_size()).float().mean()
    print(f"beam: {float(within):.3f} within the final cell ({math.degrees(search.final_cell_size()):.2f} deg), "
          f"median {math.degrees(float(err.median())):.2f} deg; shift error median "
          f"{float((shift.cpu() - true_shift).norm(dim=1).median()):.3f} px")
    assert within >= 0.9
    assert float((shift.cpu() - true_shift).norm(dim=1).median()) < 0.5
    before = search.cost(grid, spectra, ctf, found, shift, identity).cpu()
    assert torch.allclose(before, beam_cost.cpu(), atol=1e-4)
    polished, polished_shift = search.polish(grid, spectra, ctf, found, shift, identity)
    after = search.cost(grid, spectra, ctf, polished, polished_shift, identity).cpu()
    print(f"polishing: cost {float(before.mean()):.5f} -> {float(after.mean()):.5f}, median error "
          f"{math.degrees(float(geodesic_distance(polished.cpu(), rot).median())):.2f} deg")
    assert bool((after <= before + 1e-7).all()) and float(after.mean()) < 0.5 * float(before.mean())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("band", [3, 9, None])
def test_hartley_scoring_equals_pixel_scoring(ake32, band, device: str) -> None:
    """Without a denoiser the beam scores with Hartley coefficients (Parseval): the costs of every rendering against
    every translated particle equal those of the normalised images over pixels, band-limited or not, and so does
    the polishing cost and its gradient in the pose."""
    volume, apix = ake32
    n = 32
    g = torch.Generator().manual_seed(5)
    images, rot, ctf_params = _clean(volume, apix, 6, seed=2)
    images = images + 0.3 * torch.randn(images.shape, generator=g)
    model = ImageModel(n, apix, torch.device(device))
    decoder = VoxelDecoder(n, 10.0, g, device)
    grid = decoder.grid().detach()
    spectra, ctf = model.spectra(images.to(device)), model.ctf(ctf_params.to(device))
    search = BeamSearch(model, max_shift=4.0, radius=10.0)
    pixels = lambda x: x  # noqa: E731 - any function but `identity` takes the pixel path
    poses = random_rotations(6 * 5, generator=g, dtype=torch.float32).reshape(6, 5, 3, 3).to(device)
    shifts = ((torch.rand(6, 4, 2, generator=g) - 0.5) * 6).to(device)
    fast = pairwise_cost(search.models(grid, poses, ctf, band, identity), *search.observed(spectra, shifts, band, identity))
    slow = pairwise_cost(search.models(grid, poses, ctf, band, pixels), *search.observed(spectra, shifts, band, pixels))
    assert fast.shape == slow.shape == (6, 5, 4)
    assert torch.allclose(fast.cpu(), slow.cpu(), rtol=1e-4, atol=1e-5)
    omega = torch.zeros(6, 3, device=device, requires_grad=True)
    costs = []
    for denoise in (identity, pixels):
        c = search.cost(grid, spectra, ctf, axis_angle_to_matrix(omega) @ poses[:, 0], shifts[:, 0], denoise)
        costs.append((c.detach().cpu(), torch.autograd.grad(c.sum(), omega)[0].cpu()))
    assert torch.allclose(costs[0][0], costs[1][0], rtol=1e-4, atol=1e-5)
    assert torch.allclose(costs[0][1], costs[1][1], rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_global_start_finds_poses_without_an_encoder(ake32, device: str) -> None:
    """From the identity pose for every particle (an untrained encoder), the global start still finds them."""
    volume, apix = ake32
    images, rot, ctf_params = _clean(volume, apix, 32, seed=5)
    model = ImageModel(32, apix, torch.device(device))
    decoder = VoxelDecoder(32, 10.0, torch.Generator().manual_seed(0), device)
    with torch.no_grad():
        decoder.density.copy_(volume.to(device))
    search = BeamSearch(model, max_shift=0.0, gd_steps=0)
    found, _, _ = search.beam(decoder.grid().detach(), model.spectra(images.to(device)),
                              model.ctf(ctf_params.to(device)), torch.eye(3, device=device).expand(32, 3, 3),
                              torch.zeros(32, 2, device=device), identity, global_start=True)
    assert float((geodesic_distance(found.cpu(), rot) <= search.final_cell_size()).float().mean()) >= 0.9


@pytest.mark.parametrize("device", DEVICES)
def test_unbiased_loss_expectation_is_the_clean_l2(device: str) -> None:
    """Monte Carlo over the noise: the mean of eq. 12 on noisy images equals the plain L2 of the clean image
    against the same model image, within three standard errors."""
    g = torch.Generator().manual_seed(0)
    n, snr, draws = 32, 0.1, 4000
    clean = torch.nn.functional.avg_pool2d(torch.randn(1, 1, n + 7, n + 7, generator=g), 8, 1)[0, 0]
    clean = clean - clean.mean()
    model = normalise(clean + 0.8 * clean.std() * torch.randn(n, n, generator=g))  # a model image near the truth
    sigma = float(clean.std(unbiased=False)) / math.sqrt(snr)
    noisy = clean + sigma * torch.randn(draws, n, n, generator=g)
    losses = unbiased_l2(normalise(noisy.to(device)), model.to(device), snr).cpu()
    truth = float((normalise(clean) - model).square().mean())
    mean, se = float(losses.mean()), float(losses.std() / math.sqrt(draws))
    print(f"E[unbiased l2] {mean:.4f} +- {se:.4f}, clean l2 {truth:.4f}, plain l2 of noisy "
          f"{float((normalise(noisy) - model).square().mean()):.4f}")
    assert abs(mean - truth) <= 3 * se
    # The plain L2 on noisy images is far off: the correction is what makes it unbiased.
    assert abs(float((normalise(noisy) - model).square().mean((-2, -1)).mean()) - truth) > 10 * se


@pytest.mark.parametrize("device", DEVICES)
def test_snr_estimate(ake32, device: str) -> None:
    volume, apix = ake32
    images, _, _ = _clean(volume, apix, 600, seed=2)
    g = torch.Generator().manual_seed(1)
    signal = float(images.var(dim=(-2, -1), unbiased=False).mean())
    for snr in (0.05, 0.1, 1.0):
        noisy = images + math.sqrt(signal / snr) * torch.randn(images.shape, generator=g)
        est = estimate_snr(noisy.to(device), background_mask(32, device=device))
        print(f"SNR {snr}: estimated {est:.4f}")
        assert 0.85 * snr <= est <= 1.05 * snr  # measured 0.91-0.97 x: signal left in the noise estimate


@pytest.mark.parametrize("device", DEVICES)
def test_denoiser_output_correlates_better_with_the_clean_images(ake32, device: str) -> None:
    volume, apix = ake32
    images, _, _ = _clean(volume, apix, 2000, seed=4)
    g = torch.Generator().manual_seed(2)
    sigma = math.sqrt(float(images.var(dim=(-2, -1), unbiased=False).mean()) / 0.1)
    noisy = images + sigma * torch.randn(images.shape, generator=g)
    mask = circular_mask(32, 11.0)
    torch.manual_seed(0)
    denoiser = MLPDenoiser(32, 27, mask).to(device)
    train_denoiser(denoiser, lambda idx: noisy[idx].to(device), len(noisy), 0.1, 400, torch.Generator().manual_seed(3),
                   lr=1e-3)

    def corr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (normalise(a) * normalise(b)).mean((-2, -1))

    test = slice(0, 200)
    with torch.no_grad():
        denoised = denoiser(normalise(noisy[test].to(device))).cpu()
    target = images[test] * mask
    raw, den = float(corr(noisy[test] * mask, target).mean()), float(corr(denoised, target).mean())
    print(f"correlation with the clean images: noisy {raw:.3f}, denoised {den:.3f}")
    assert den > raw + 0.1


# ------------------------------------------------------------------------------------------------ options


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("positive", [True, False])
def test_density_constraint_projects_onto_the_support_and_positivity(positive, device: str) -> None:
    n, radius = 24, 7.0
    before = torch.randn(n, n, n, generator=torch.Generator().manual_seed(0))
    density = before.to(device, copy=True)
    DensityConstraint.of(n, radius, positive=positive, device=device).apply_(density)
    density = density.cpu()
    r = radius_3d(n)
    inside, outside = r <= radius, r >= radius + SUPPORT_EDGE
    assert torch.all(density[outside] == 0)
    kept = before[inside].clamp(min=0) if positive else before[inside]
    assert torch.equal(density[inside], kept)
    assert (density.min() >= 0) == positive
    # the edge only shrinks values towards 0
    assert torch.all(density.abs() <= before.abs())
    # a radius beyond the box keeps the whole edge inside it
    wide = torch.ones(n, n, n, device=device)
    DensityConstraint.of(n, 100.0, device=device).apply_(wide)
    wide = wide.cpu()
    assert float(wide[0, 0, 0]) == 0.0 and float(wide[n // 2, n // 2, 1]) > 0


def test_schedule_keeps_the_step_budget():
    cfg = Cryo2SSNetConfig()
    s = Schedule.of(cfg, 10000)  # the paper's 4AKE: 24 epochs of 313 steps
    assert s.epochs == 24 and s.per_epoch == 313 and s.stage1 == round(24 * 313 / 2) and s.denoise == round(s.stage1 / 3)
    assert Schedule.of(cfg, 40000).epochs == 6  # 5A1A
    assert Schedule.of(Cryo2SSNetConfig(dhbs=False), 10000).stage1 == 0


@pytest.mark.parametrize("field,value", [("beam_width", 0), ("beam_depth", 9), ("gd", "sgd"), ("gd_steps", -1),
                                         ("denoiser_fraction", 1.5), ("snr", -1.0), ("stage1_fraction", 2.0),
                                         ("beam_start", "nearest"), ("agreement", 200.0), ("denoiser_factor", 0),
                                         ("max_shift", -1.0), ("steps", 0), ("gd_lr", 0.0)])
def test_bad_values_are_refused(field, value):
    with pytest.raises(OptionError) as err:
        Cryo2SSNetConfig(**{field: value}).validate()
    assert err.value.option == field


def test_bad_options_name_the_flag(small, tmp_path):
    star = str(small / "particles.star")
    r = runner.invoke(app, ["abinitio", star, "-m", "cryo2ssnet", "-o", str(tmp_path / "a"), "--beam-width", "0"])
    assert r.exit_code == 2 and "--beam-width 0" in r.output
    r = runner.invoke(app, ["abinitio", star, "-m", "cryo2ssnet", "-o", str(tmp_path / "b"), "--snr", "abc"])
    assert r.exit_code == 2 and "SNR" in r.output
    r = runner.invoke(app, ["abinitio", star, "-m", "cryospin", "-o", str(tmp_path / "c"), "--beam-depth", "3"])
    assert r.exit_code == 2 and "no such option" in r.output


# ------------------------------------------------------------------------------------------------ runs

FAST = ["--steps", "10", "--batch-size", "40", "--beam-depth", "2", "--gd-steps", "2", "--denoiser-steps", "20"]


def test_streamed_particles_give_the_run_of_preloaded_ones(small, tmp_path):
    """--preload no reads every batch from the stacks and estimates the settings on the same particles (fewer than
    SETUP_SAMPLE): the same run, to float32 round-off of the streamed normalisation."""
    star = str(small / "particles.star")
    for preload in ("yes", "no"):
        r = runner.invoke(app, ["--quiet", "abinitio", star, "-m", "cryo2ssnet", "-o", str(tmp_path / preload),
                                "--epochs", "2", "--preload", preload, *FAST])
        assert r.exit_code == 0, r.output
    held, streamed = (read_map(tmp_path / k / "map_unfil.mrc").data for k in ("yes", "no"))
    assert float(np.abs(held - streamed).max()) <= 1e-3 * float(np.abs(held).max())
    setups = [next(json.loads(x) for x in (tmp_path / k / "log.jsonl").read_text().splitlines()
                   if json.loads(x)["event"] == "cryo2ssnet_setup") for k in ("yes", "no")]
    assert setups[0]["denoiser_factor"] == setups[1]["denoiser_factor"]
    assert setups[0]["snr"] == pytest.approx(setups[1]["snr"], rel=1e-4)


def test_checkpoint_resume_and_snr_log(small, tmp_path):
    star = str(small / "particles.star")
    run = tmp_path / "run"
    r = runner.invoke(app, ["--quiet", "abinitio", star, "-m", "cryo2ssnet", "-o", str(run), "--epochs", "2", *FAST])
    assert r.exit_code == 0, r.output
    assert (run / "checkpoint.pt").is_file()
    events = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    setup = next(e for e in events if e["event"] == "cryo2ssnet_setup")
    assert setup["snr_source"] == "estimated" and 0.03 < setup["snr"] < 0.2 and setup["denoiser_factor"] >= 2
    # the shipped --constrain-density: the fitted map is non-negative and empty beyond its support
    fitted = read_map(run / "map_unfil.mrc").data
    assert fitted.min() >= 0 and fitted.max() > 0 and fitted[0, 0, 0] == 0
    resumed = runner.invoke(app, ["--quiet", "abinitio", star, "-m", "cryo2ssnet", "-o", str(run), "--epochs", "3",
                                  "--resume", *FAST])
    assert resumed.exit_code == 0, resumed.output
    lines = (run / "metrics.csv").read_text().splitlines()
    assert [int(line.split(",")[1]) for line in lines[1:]] == [1, 2, 3]
    events = [json.loads(x)["event"] for x in (run / "log.jsonl").read_text().splitlines()]
    assert "resume" in events and events.count("denoiser_trained") == 1
    posed = read_star(run / "particles.star")
    assert len(posed) == 160 and np.isfinite(posed.euler_angles).all()


def test_halves_and_ground_truth(small, tmp_path):
    run = tmp_path / "run"
    r = runner.invoke(app, ["--json", "abinitio", str(small / "particles.star"), "-m", "cryo2ssnet", "-o", str(run),
                            "--epochs", "1", "--halves", "--snr", "-10dB", "--no-shifts", "--ground-truth",
                            str(small / "ground_truth.mrc"), *FAST])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.output.strip().splitlines()[-1])
    for name in ("map.mrc", "half1_unfil.mrc", "half2_unfil.mrc", "particles.star", "fsc.star", "metrics.csv"):
        assert (run / name).is_file(), name
    assert summary["gold_standard_resolution_A"] > 0 and "final_rot_err_median" in summary
    posed = read_star(run / "particles.star")
    # --no-shifts, the paper's centred setting: half 1 keeps zero origins (half 2's carry its alignment onto half 1).
    first = posed.particles["rlnRandomSubset"].to_numpy() == 1
    assert np.allclose(posed.origins_angstrom[first], 0.0)


@pytest.mark.parametrize("star", [CRYODRGN / "relion31.star", CRYODRGN / "empiar_10076_7.star",
                                  ASPIRE / "sample_particles_relion31.star"], ids=lambda p: p.name)
def test_runs_on_real_relion_files(star, tmp_path):
    source = read_star(need(star))
    stack = ParticleStack(source)
    run = tmp_path / "run"
    r = runner.invoke(app, ["--quiet", "abinitio", str(star), "-m", "cryo2ssnet", "-o", str(run), "--epochs", "1",
                            "--box", "32", *FAST])
    assert r.exit_code == 0, r.output
    m = read_map(run / "map.mrc")
    assert m.data.shape == (32, 32, 32) and np.isfinite(m.data).all()
    assert m.voxel_size == pytest.approx(stack.pixel_size * stack.box / 32, rel=1e-4)
    posed = read_star(run / "particles.star")
    assert len(posed) == len(source)
    assert np.isfinite(posed.euler_angles).all() and np.isfinite(posed.origins_angstrom).all()


# ------------------------------------------------------------------------------------------------ reconstruction

# Simulated 4AKE as in the issue: bundled model, CTF on, SNR 0.1, box 48 at 2.4 A/px (Nyquist 4.8 A; 2x Nyquist is
# shell 12, 9.6 A). 48 px rather than 32: at 32 px the same search against the true map places the particles only to
# 5.5 degrees median (the CTF's delocalised signal leaves the 77 A box), at 48 px to 2.6.
E2E_BOX, E2E_APIX, E2E_PARTICLES, E2E_SEED = 48, 2.4, 2000, 1
#: The step budget of the test (the shipped default is the paper's 7,500): 5 epochs of 63 steps.
E2E_STEPS = 313


def _run_scored(sim: Path, run: Path, *args: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Run cryo2ssnet with shipped defaults plus ``args``; FSC vs truth after alignment, pose errors after global
    alignment (hand flip allowed), and metrics.csv."""
    from cryocli.analysis.align import pose_errors_after_alignment
    from cryocli.geometry.rotations import euler_to_matrix

    r = runner.invoke(app, ["--quiet", "abinitio", str(sim / "particles.star"), "--method", "cryo2ssnet", "-o", str(run),
                            "--ground-truth", str(sim / "ground_truth.mrc"), "--score-every", "1000", *args])
    assert r.exit_code == 0, r.output
    fsc = runner.invoke(app, ["--json", "fsc", str(sim / "ground_truth.mrc"), str(run / "map.mrc"), "--align"])
    assert fsc.exit_code == 0, fsc.output
    curve = np.asarray(json.loads(fsc.output.strip().splitlines()[-1])["curve"]["fsc"])

    def angles(star: Path) -> torch.Tensor:
        a = torch.from_numpy(read_star(star).euler_angles)
        return euler_to_matrix(a[:, 0], a[:, 1], a[:, 2])

    errors = pose_errors_after_alignment(angles(run / "particles.star"), angles(sim / "particles.star"))
    return curve, np.asarray(errors), (run / "metrics.csv").read_text().splitlines()


def test_cryo2ssnet_reconstructs_4ake_from_a_random_start(tmp_path):
    """The issue's done-means: a random start on simulated 4AKE (2,000 particles of 48 px at 2.4 A/px, CTF, SNR 0.1,
    centred but searched for shifts as the shipped defaults do) with every option at its default except the step
    budget (313 steps, 5 epochs): median rotation error below 5 degrees after global alignment (hand flip allowed)
    and FSC against the truth at least 0.5 to 2x Nyquist.

    The budget was 250 steps (4 epochs) until 2026-12-07 16:00. On another machine of the same kind (an AVX-512 AMD
    EPYC, 2 cores) the same run then gave 6.38 degrees median (79, 13.8, 7.1, 6.4 by epoch; FSC 0.5 at 6.7 A): float
    rounding alone moved it from the 4.1 below to a failure, with the error still falling. With 313 steps on that
    machine: 77.0, 5.6, 3.9, 3.8, 3.7 degrees by epoch, FSC 0.5 at 4.8 A (Nyquist), 216 s on 2 threads; 3.67 degrees
    and 4.8 A on 1 thread (as scripts/test.sh runs it), 324 s. Other random starts there (``abinitio.py ... --steps
    313 --variants default --seed 1`` and ``--seed 2``, one thread each): 4.77 and 3.86 degrees, FSC 0.5 at 5.6 and
    4.8 A, so the margin under 5 degrees stays thin for some starts.

    Measured with ``cd benchmarks && python abinitio.py --method cryo2ssnet --cases 48:2000 --apix 2.4 --steps 250
    --variants default no-dhbs free-density`` (the same set and settings; 2 idle cores, 2026-12-07): median error by
    epoch 79.5, 6.3, 4.2, 4.1 degrees (mean 7.4), FSC 0.5 against the truth at 5.1 A, 169 s (201 s before
    sample_grid used both cores). Other random starts (``--seed 1``, ``--seed 2``): 4.85 and 3.71 degrees, FSC 0.5 at
    6.1 and 4.9 A: the margin under 5 degrees is thin for some starts. With DHBS off (``--no-dhbs``, twice the steps:
    the paper's ablation) 115.4 degrees and 30.3 A; with the decoder's density unconstrained (``--free-density``, the
    paper's decoder) 26.7 degrees and 21.1 A."""
    sim = _simulate(tmp_path / "sim", E2E_PARTICLES, box=E2E_BOX, apix=E2E_APIX, seed=E2E_SEED)
    curve, errors, metrics = _run_scored(sim, tmp_path / "run", "--steps", str(E2E_STEPS))
    print("\n".join(metrics))
    print(f"median rotation error {np.median(errors):.2f} deg, mean {np.mean(errors):.2f}; FSC vs truth "
          f"{np.round(curve, 3).tolist()}")
    assert np.median(errors) < 5.0
    assert curve[1:E2E_BOX // 4 + 1].min() >= 0.5
