"""cryoSPIN end to end: ab initio on simulated 4AKE particles scored against the ground truth, the
auto-decoding stage on its own, checkpoints and --resume, --halves, and real RELION STAR files."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cryocli.cli.app import app
from cryocli.engines.abinitio.cryospin import CryoSpinConfig, CryoSpinEngine, ImageModel
from cryocli.engines.common.hartley_volume import HartleyVolume
from cryocli.engines.particles import prepare_particles
from cryocli.engines.progress import Reporter
from cryocli.geometry.rotations import axis_angle_to_matrix, geodesic_distance
from cryocli.imaging.hartley import hartley_volume
from cryocli.io.dataset import ParticleStack
from cryocli.io.mrc import read_map
from cryocli.io.star import read_star

from .conftest import ASPIRE, CRYODRGN, DEVICES, need, simulate_4ake

runner = CliRunner()

# The done-means dataset: bundled 4AKE model, box 48 at 2.4 A/px (Nyquist 4.8 A), CTF on, SNR 0.1. Box 48
# rather than 32: at box 32 / 3.6 A/px and SNR 0.1 even the true map pins a single image's pose down only to
# 5.6 degrees median (see test_auto_decoding_refines_perturbed_poses), so the 5-degree target is out of
# reach of any method there; at box 48 / 2.4 A/px the same check gives 2.6 degrees.
DONE_BOX, DONE_APIX, DONE_PARTICLES = 48, 2.4, 3000
# The paper's schedule (20 epochs, switch after 7, 7 heads, decoder lr 0.05/0.02, pose lr 0.05, 5:1 steps)
# with cryocli's defaults on top (candidate grid of order 2, 12 A during encoding, 6-epoch march); on the CPU
# the default encoder is the slim one (16-32-64 filters, lr 1e-3), which trains in minutes. Shipped defaults.
DONE_ARGS: list[str] = []


_simulate = partial(simulate_4ake, apix=3.6)


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    return _simulate(tmp_path_factory.mktemp("small") / "sim", 200)


def _angles(star: Path) -> torch.Tensor:
    from cryocli.geometry.rotations import euler_to_matrix

    a = torch.from_numpy(read_star(star).euler_angles)
    return euler_to_matrix(a[:, 0], a[:, 1], a[:, 2])


# ------------------------------------------------------------------------------------------------ done means


def test_cryospin_recovers_4ake_ab_initio(tmp_path):
    """Issue 4's done-means run (about 2 minutes on 2 cores). Measured on 2026-12-07 (with the encoding band's
    march from 20 A): median rotation error 4.37 deg (mean 5.28), FSC 0.5 vs truth at 6.32 A for map.mrc and 7.86 A
    for map_unfil.mrc; without the candidate grid and frequency marching
    (``--grid-order -1 --encode-resolution 0 --decode-march-epochs 0``, the paper's method alone) the same run
    ends at ~106 deg and ~25 A.

    Random start, CTF, SNR 0.1: FSC vs truth >= 0.5 to 2x Nyquist after `fsc --align`, median rotation
    error < 5 degrees after global alignment (hand flip allowed)."""
    from cryocli.analysis.align import pose_errors_after_alignment

    sim = _simulate(tmp_path / "sim", DONE_PARTICLES, box=DONE_BOX, apix=DONE_APIX)
    run = tmp_path / "run"
    # --ground-truth only scores (pose errors every epoch, the map at the last): it does not steer the run.
    r = runner.invoke(app, ["--quiet", "abinitio", str(sim / "particles.star"), "--method", "cryospin", "-o", str(run),
                            "--ground-truth", str(sim / "ground_truth.mrc"), "--score-every", "1000", *DONE_ARGS])
    assert r.exit_code == 0, r.output
    print((run / "metrics.csv").read_text())
    fsc = runner.invoke(app, ["--json", "fsc", str(sim / "ground_truth.mrc"), str(run / "map.mrc"), "--align"])
    assert fsc.exit_code == 0, fsc.output
    curve = np.asarray(json.loads(fsc.output.strip().splitlines()[-1])["curve"]["fsc"])
    errors = pose_errors_after_alignment(_angles(run / "particles.star"), _angles(sim / "particles.star"))
    quarter = DONE_BOX // 4  # shell of 2x Nyquist (9.6 A)
    print(f"FSC vs truth by shell: {np.round(curve, 3).tolist()}; median rotation error {np.median(errors):.2f} deg, "
          f"mean {np.mean(errors):.2f} deg")
    assert curve[1:quarter + 1].min() >= 0.5
    assert np.median(errors) < 5.0
    # The map a user opens shows the molecule: FSC-weighted, low-passed, solvent-flattened (issue 18);
    # before that it correlated 0.29 with the truth and its background was as strong as the particle.
    corr, ratio = _viewing_figures(run / "map.mrc", sim / "ground_truth.mrc")
    corr_unfil, ratio_unfil = _viewing_figures(run / "map_unfil.mrc", sim / "ground_truth.mrc")
    print(f"map.mrc: correlation with the aligned truth {corr:.3f}, outside/inside std {ratio:.3f}; "
          f"map_unfil.mrc: {corr_unfil:.3f}, {ratio_unfil:.3f}")
    assert corr >= 0.7 and ratio <= 0.3
    assert corr > corr_unfil
    unfil = runner.invoke(app, ["--json", "fsc", str(sim / "ground_truth.mrc"), str(run / "map_unfil.mrc"), "--align"])
    unfil_res = _resolution_at(unfil.output, 0.5)
    res = _resolution_at(fsc.output, 0.5)
    print(f"FSC 0.5 vs truth: map.mrc {res}, map_unfil.mrc {unfil_res}")
    assert res <= unfil_res * 1.02  # no worse than the fitted volume's


def test_cryospin_with_shifts_recovers_particles_off_centre(tmp_path):
    """The done-means set with 5 A in-plane shifts (2.1 px standard deviation), run as a user with picked particles
    would: shipped defaults and --shifts. Measured on 2026-12-08: median rotation error 4.9 deg (mean 6.9), FSC 0.5
    vs truth 6.87 A. Without the auto-decoding search of the grid around each particle's origin and its mirror
    twin's (--search-epochs 0, the code before that day) 5.5 deg but mean 15.2 (6% of the particles far off, left
    there by the local steps) and 7.04 A, which fails the mean; before the grid searched origins (2026-12-07),
    69 deg."""
    from cryocli.analysis.align import pose_errors_after_alignment

    sim = _simulate(tmp_path / "sim", DONE_PARTICLES, box=DONE_BOX, apix=DONE_APIX, shift_sigma=5.0)
    run = tmp_path / "run"
    r = runner.invoke(app, ["--quiet", "abinitio", str(sim / "particles.star"), "--method", "cryospin", "-o", str(run),
                            "--shifts", "--ground-truth", str(sim / "ground_truth.mrc"), "--score-every", "1000"])
    assert r.exit_code == 0, r.output
    fsc = runner.invoke(app, ["--json", "fsc", str(sim / "ground_truth.mrc"), str(run / "map.mrc"), "--align"])
    assert fsc.exit_code == 0, fsc.output
    curve = np.asarray(json.loads(fsc.output.strip().splitlines()[-1])["curve"]["fsc"])
    errors = pose_errors_after_alignment(_angles(run / "particles.star"), _angles(sim / "particles.star"))
    print(f"FSC 0.5 vs truth {_resolution_at(fsc.output, 0.5):.2f} A; median rotation error {np.median(errors):.2f} "
          f"deg, mean {np.mean(errors):.2f} deg")
    assert curve[1:DONE_BOX // 4 + 1].min() >= 0.5
    assert np.median(errors) < 6.0 and np.mean(errors) < 10.0


def _resolution_at(fsc_json: str, threshold: float) -> float:
    rows = json.loads(fsc_json.strip().splitlines()[-1])["resolution"]
    return next(float(r["resolution_A"]) for r in rows if r["threshold"] == threshold)


def _viewing_figures(map_path: Path, truth_path: Path) -> tuple[float, float]:
    """Real-space correlation of a map with the truth after aligning it (rotation, shift, hand), and the
    standard deviation of the map outside radius 0.46 box over that inside (the particle's region)."""
    from cryocli.analysis.align import align_maps
    from cryocli.imaging.fourier import radius_3d

    m = read_map(map_path)
    truth = torch.tensor(read_map(truth_path).data, dtype=torch.float64)
    vol = torch.tensor(m.data, dtype=torch.float64)
    aligned = torch.as_tensor(align_maps(truth, vol, m.voxel_size).aligned_map, dtype=torch.float64)
    corr = float(torch.corrcoef(torch.stack([truth.flatten(), aligned.flatten()]))[0, 1])
    r = radius_3d(vol.shape[-1], dtype=torch.float64)
    outside = r >= 0.46 * vol.shape[-1]
    return corr, float(vol[outside].std() / vol[~outside].std())


# ------------------------------------------------------------------------------------------------ stage 2


@pytest.mark.parametrize("device", DEVICES)
def test_auto_decoding_refines_perturbed_poses(small, device: str) -> None:
    """From the true map and poses perturbed by 10 degrees, four epochs of five Adam steps per batch with the
    perturbation folded into R0 bring the poses back (the semi-amortized stage on its own).

    At SNR 0.1 and box 32 a single image of this 24 kDa protein pins its pose down only to a few degrees:
    measured 10.0 -> 5.6 degrees median after 20 steps, and still 5.6 after 60 (with noise-free images of the
    same set the error keeps falling, 0.7 degrees after 40 steps), so 5.6 is the per-image optimum here."""
    stack = ParticleStack(read_star(small / "particles.star"))
    cfg = CryoSpinConfig(batch_size=50)
    dev = torch.device(device)
    parts = prepare_particles(stack, cfg, dev)
    n = parts.box
    truth = torch.tensor(read_map(small / "ground_truth.mrc").data).to(device)
    model = ImageModel(n, parts.pixel_size, dev)
    vol = HartleyVolume(n, torch.ones(n // 2 + 3)).to(device)
    # The map in the units of the normalised images: scale by the least-squares fit to the data.
    grid = hartley_volume(truth, pad=1)
    with torch.no_grad():
        vol.mantissa.copy_(grid)
        vol.exponent.zero_()
        obs = model.observed(model.spectra(parts.images), None)
        ctf = model.ctf(parts.ctf)
        sl = vol.project(stack.rotations.to(device)) * ctf
        vol.mantissa.mul_(float((sl * obs * model.mask).sum() / (sl * sl * model.mask).sum()))
    g = torch.Generator().manual_seed(0)
    axis = torch.nn.functional.normalize(torch.randn(len(parts), 3, generator=g), dim=-1)
    start = axis_angle_to_matrix(axis * np.radians(10.0)) @ stack.rotations
    poses = start.to(device, copy=True)
    shifts = torch.zeros(len(parts), 2, device=device)
    engine = CryoSpinEngine(device)
    st = replace(engine._new_state(parts, replace(cfg, encoder_channels=(4,)), len(parts)), model=model, volume=vol,
                 vol_opt=torch.optim.Adam(vol.parameters(), lr=0.0),  # volume fixed: this test is about the poses
                 poses=poses, shifts=shifts)
    for epoch in range(4):
        order = torch.randperm(len(parts), generator=torch.Generator().manual_seed(epoch))
        engine._decoding_epoch(st, order, cfg, Reporter())
    before = np.degrees(geodesic_distance(start, stack.rotations).numpy())
    after = np.degrees(geodesic_distance(poses.cpu(), stack.rotations).numpy())
    print(f"median rotation error {np.median(before):.2f} -> {np.median(after):.2f} deg")
    assert np.median(after) < 6.5 and np.median(before) > 9.9


@dataclass
class _GridCase:
    """The first particles of a simulated set, prepared for the candidate grid, with the true map scaled to them."""

    model: ImageModel
    hartley: torch.Tensor
    spectra: torch.Tensor
    ctf: torch.Tensor
    rotations: torch.Tensor
    origins: torch.Tensor


def _grid_setup(sim: Path, device: str, count: int) -> _GridCase:
    """The first ``count`` particles of ``sim`` compared to a quarter of the box, their true rotations and origins
    (pixels), and the true map in the units of the normalised images (the least-squares scale at the true poses)."""
    from cryocli.engines.abinitio.cryospin import _project_grid

    stack = ParticleStack(read_star(sim / "particles.star"))
    dev = torch.device(device)
    parts = prepare_particles(stack, CryoSpinConfig(), dev)
    model = ImageModel(parts.box, parts.pixel_size, dev, radius=parts.box / 4)
    hartley = hartley_volume(torch.tensor(read_map(sim / "ground_truth.mrc").data).to(device), pad=1)
    idx = torch.arange(count)
    shifts = stack.shifts_angstrom
    origins = (shifts[idx] / parts.pixel_size if shifts is not None else torch.zeros(count, 2)).to(dev)
    spectra = model.spectra(parts.images[idx.to(dev)])
    ctf = model.ctf(parts.ctf.index(idx.to(dev)))
    observed = model.observed(spectra, origins)
    sl = _project_grid(hartley, stack.rotations[idx].to(dev), parts.box) * ctf
    hartley = hartley * float((sl * observed * model.mask).sum() / (sl * sl * model.mask).sum())
    return _GridCase(model, hartley, spectra, ctf, stack.rotations[idx], origins)


@pytest.mark.parametrize("device", DEVICES)
def test_candidate_grid_scores_equal_direct_losses_and_find_poses(small, device: str) -> None:
    """The grid's matrix-product scores equal the image model's loss evaluated pose by pose, the winner is the
    true minimum over the grid, and against the true map the winners lie within the grid's spacing of the
    true poses (order 2: 4,608 rotations about 15 degrees apart)."""
    from cryocli.engines.abinitio.cryospin import CandidateGrid, _project_grid

    t = _grid_setup(small, device, 64)
    model, hartley, spectra, ctf, true_rot, n = t.model, t.hartley, t.spectra, t.ctf, t.rotations, t.model.n
    observed = model.observed(spectra, None)
    grid = CandidateGrid(2, torch.device(device))
    loss, pose, origin = grid.best(model, hartley, spectra, ctf, None)
    assert origin is None
    direct = model.nll(_project_grid(hartley, pose, n, model.r_max), ctf, observed)
    assert torch.allclose(loss.cpu(), direct.cpu(), rtol=1e-4, atol=1e-6)
    every = model.nll(_project_grid(hartley, grid.rotations, n, model.r_max)[None].expand(8, -1, -1, -1), ctf[:8],
                      observed[:8, None])
    assert torch.allclose(every.min(1).values.cpu(), loss[:8].cpu(), rtol=1e-4, atol=1e-6)
    errors = np.degrees(geodesic_distance(pose.cpu(), true_rot).numpy())
    print(f"grid winners vs true poses: median {np.median(errors):.1f} deg")
    assert np.median(errors) < 15.0  # measured 11.6; random poses would give ~110


@pytest.mark.parametrize("device", DEVICES)
def test_candidate_grid_finds_origins_a_step_away(tmp_path_factory, device: str) -> None:
    """With origins estimated, the grid scores each rotation at the particle's origin and its 8 neighbours one
    shift step away, and returns the best pair: its loss is the image model's at that pose and origin, and from
    origins one step off the truth (2 px, beside origins of 2 px standard deviation) it moves most particles back
    onto the true origin, with the rotations still within the grid's spacing."""
    from cryocli.engines.abinitio.cryospin import CandidateGrid, _project_grid

    t = _grid_setup(_simulate(tmp_path_factory.mktemp("shifted") / "sim", 64, shift_sigma=7.2), device, 64)
    model, hartley, spectra, ctf, true_rot, n = t.model, t.hartley, t.spectra, t.ctf, t.rotations, t.model.n
    true_origin, dev = t.origins, torch.device(device)
    step = 2.0
    grid = CandidateGrid(2, dev, shift_step=step, max_shift=n / 4)
    assert len(grid.offsets) == 9
    away = torch.randint(-1, 2, (len(true_origin), 2), generator=torch.Generator().manual_seed(3)).float().to(dev) * step
    loss, pose, origin = grid.best(model, hartley, spectra, ctf, true_origin - away)
    direct = model.nll(_project_grid(hartley, pose, n, model.r_max), ctf, model.observed(spectra, origin))
    assert torch.allclose(loss.cpu(), direct.cpu(), rtol=1e-4, atol=1e-6)
    off_before = (away.norm(dim=1) > 0).float().mean()
    off_after = ((origin - true_origin).norm(dim=1) > 0.5 * step).float().mean()
    errors = np.degrees(geodesic_distance(pose.cpu(), true_rot).numpy())
    print(f"origins off the truth: {float(off_before):.2f} -> {float(off_after):.2f}; "
          f"rotations median {np.median(errors):.1f} deg")
    assert float(off_before) > 0.8 and float(off_after) < 0.25
    assert np.median(errors) < 15.0


def _plane_reflection(seed: int, offset_a: float) -> tuple[np.ndarray, np.ndarray]:
    """A reflection through a random plane ``offset_a`` Angstrom from the box centre, as an improper alignment
    ``(R, t)`` of :mod:`cryocli.analysis.align` (``x -> R F x + t``; an involution, as the best improper
    self-alignment of any map is)."""
    from cryocli.geometry.rotations import quaternion_to_matrix

    q = quaternion_to_matrix(torch.randn(4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)).numpy()
    f = np.diag([1.0, 1.0, -1.0])
    normal = q[:, 2]
    return q @ f @ q.T @ f, 2 * offset_a * normal


def test_mirror_twin_poses_give_the_mirror_images_projections(small) -> None:
    """Images of a map at poses and origins equal those of its mirror image through a plane 5 A off the centre at
    the twin poses and origins (images as RELION defines them, projection(x + origin), with test_align's
    projector), and not at the poses themselves."""
    from cryocli.analysis.align import Alignment, apply_alignment
    from cryocli.engines.abinitio.cryospin import MirrorSymmetry, mirror_twin_poses
    from cryocli.geometry.rotations import quaternion_to_matrix

    from .test_align import _project, _shift_images

    m = read_map(small / "ground_truth.mrc")
    vol, apix = torch.tensor(m.data, dtype=torch.float64), m.voxel_size
    rotation, shift_a = _plane_reflection(4, 5.0)
    mirrored = torch.tensor(apply_alignment(vol, Alignment(rotation, shift_a, True, np.zeros(0, np.float32), 0.0,
                                                           apix)), dtype=torch.float64)
    g = torch.Generator().manual_seed(2)
    poses = quaternion_to_matrix(torch.randn(6, 4, generator=g, dtype=torch.float64))
    origins_px = torch.randn(6, 2, generator=g, dtype=torch.float64)
    twin_r, twin_o = mirror_twin_poses(poses, origins_px, MirrorSymmetry(torch.tensor(rotation),
                                                                         torch.tensor(shift_a / apix), 0.0))
    images = _shift_images(_project(vol, poses), origins_px)
    twins = _shift_images(_project(mirrored, twin_r), twin_o)
    same_poses = _shift_images(_project(mirrored, poses), origins_px)
    for i in range(6):
        assert np.corrcoef(images[i].ravel(), twins[i].ravel())[0, 1] > 0.98
        assert np.corrcoef(images[i].ravel(), same_poses[i].ravel())[0, 1] < 0.9


@pytest.fixture(scope="module")
def small_shifted(tmp_path_factory) -> Path:
    return _simulate(tmp_path_factory.mktemp("small_shifted") / "sim", 200, box=DONE_BOX, apix=DONE_APIX, shift_sigma=2.4)


@pytest.mark.parametrize("device", DEVICES)
def test_search_epoch_gathers_particles_split_between_the_hands(small_shifted, device: str) -> None:
    """A run that split its particles between the two hands: the map is the truth (70%) plus its mirror image
    through a plane 5 A off the centre (30%), and a third of the particles sit at the poses and origins that fit
    the mirror image. :func:`mirror_symmetry` finds the plane; one auto-decoding epoch with the grid's search
    brings most of that third back to their true poses and keeps the rest; the paper's local steps alone leave
    them where they are."""
    from cryocli.analysis.align import Alignment, apply_alignment
    from cryocli.engines.abinitio.cryospin import MirrorSymmetry, mirror_symmetry, mirror_twin_poses

    stack = ParticleStack(read_star(small_shifted / "particles.star"))
    cfg = CryoSpinConfig(batch_size=50, shifts=True)
    dev = torch.device(device)
    parts = prepare_particles(stack, cfg, dev)
    n, apix = parts.box, parts.pixel_size
    truth = torch.tensor(read_map(small_shifted / "ground_truth.mrc").data, dtype=torch.float32)
    rotation, shift_a = _plane_reflection(7, 5.0)
    mirrored = apply_alignment(truth, Alignment(rotation, shift_a, True, np.zeros(0, np.float32), 0.0, apix))
    mixed = (0.7 * truth + 0.3 * torch.tensor(mirrored)).to(dev)
    found = mirror_symmetry(mixed, apix)
    plane_error = np.degrees(geodesic_distance(found.rotation.cpu().double()[None], torch.tensor(rotation)[None]))
    print(f"mirror plane found {float(plane_error[0]):.1f} deg, {found.shift_px.cpu().numpy() * apix} A "
          f"(planted {shift_a}), score {found.score:.3f}")
    assert float(plane_error[0]) < 3.0 and np.allclose(found.shift_px.cpu().numpy() * apix, shift_a, atol=1.0)

    model = ImageModel(n, apix, dev)
    vol = HartleyVolume(n, torch.ones(n // 2 + 3)).to(device)
    true_rot = stack.rotations.to(torch.float32)
    true_origin = (stack.shifts_angstrom / apix).to(torch.float32)
    with torch.no_grad():
        vol.mantissa.copy_(hartley_volume(mixed, pad=1))
        vol.exponent.zero_()
        obs = model.observed(model.spectra(parts.images), true_origin.to(dev))
        sl = vol.project(true_rot.to(dev)) * model.ctf(parts.ctf)
        vol.mantissa.mul_(float((sl * obs * model.mask).sum() / (sl * sl * model.mask).sum()))
    split = torch.arange(len(parts)) % 3 == 0
    twin_rot, twin_origin = mirror_twin_poses(true_rot, true_origin,
                                              MirrorSymmetry(torch.tensor(rotation, dtype=torch.float32),
                                                             torch.tensor(shift_a / apix, dtype=torch.float32), 0.0))
    start_rot = torch.where(split[:, None, None], twin_rot, true_rot)
    start_origin = torch.where(split[:, None], twin_origin, true_origin)
    engine = CryoSpinEngine(device)
    errors = {}
    for search in (False, True):
        st = replace(engine._new_state(parts, replace(cfg, encoder_channels=(4,)), len(parts)), model=model,
                     volume=vol, vol_opt=torch.optim.Adam(vol.parameters(), lr=0.0),  # the map stays as built
                     poses=start_rot.to(dev, copy=True), shifts=start_origin.to(dev, copy=True))
        metrics = engine._decoding_epoch(st, torch.randperm(len(parts), generator=torch.Generator().manual_seed(0)),
                                         cfg, Reporter(), search=search)
        errors[search] = np.degrees(geodesic_distance(st.poses.cpu(), true_rot).numpy())
        print(f"search {search}: {metrics}; back within 15 deg: {(errors[search][split.numpy()] < 15).mean():.2f}, "
              f"the others kept: {(errors[search][~split.numpy()] < 15).mean():.2f}")
    assert (errors[False][split.numpy()] < 15).mean() < 0.1
    assert (errors[True][split.numpy()] < 15).mean() > 0.75  # measured 0.91
    assert (errors[True][~split.numpy()] < 15).mean() > 0.9  # measured 0.97


def test_auto_encoding_band_marches_from_20_to_12_angstrom() -> None:
    """The compared band of auto-encoding epoch 1 reaches 20 A, that of the last (the switch epoch) 12 A, widening
    linearly in frequency; auto-decoding starts from 12 A; without a march every epoch compares to 12 A."""
    from cryocli.engines.abinitio.cryospin import _decode_radius, _encode_radius

    cfg = CryoSpinConfig()
    n, apix = 48, 2.4
    radii = [_encode_radius(cfg, n, apix, e) for e in range(1, cfg.switch_epoch + 1)]
    assert radii[0] == pytest.approx(n * apix / 20.0) and radii[-1] == pytest.approx(n * apix / 12.0)
    assert np.allclose(np.diff(radii), (radii[-1] - radii[0]) / (cfg.switch_epoch - 1))
    assert _encode_radius(cfg, n, apix) == pytest.approx(n * apix / 12.0)
    assert _decode_radius(cfg, n, apix, cfg.switch_epoch + 1) == pytest.approx(n * apix / 12.0 + (n / 2 - 9.6) / 6)
    fixed = replace(cfg, encode_start_resolution=0.0)
    assert all(_encode_radius(fixed, n, apix, e) == pytest.approx(9.6) for e in range(1, cfg.switch_epoch + 1))


# ------------------------------------------------------------------------------------------------ runs


FAST = ["--batch-size", "50"]


def test_streamed_particles_give_the_run_of_preloaded_ones(small, tmp_path):
    """--preload no reads every (random) batch from the stacks instead of holding the particles: the same run, both
    stages, to float32 round-off of the normalisation (one streamed pass of moments instead of one std)."""
    star = str(small / "particles.star")
    for preload in ("yes", "no"):
        r = runner.invoke(app, ["--quiet", "abinitio", star, "-o", str(tmp_path / preload), "--epochs", "2",
                                "--switch-epoch", "1", "--preload", preload, *FAST])
        assert r.exit_code == 0, r.output
    held, streamed = (read_map(tmp_path / k / "map_unfil.mrc").data for k in ("yes", "no"))
    assert float(np.abs(held - streamed).max()) <= 1e-3 * float(np.abs(held).max())
    turned = _angles(tmp_path / "yes" / "particles.star").transpose(1, 2) @ _angles(tmp_path / "no" / "particles.star")
    cos = ((turned.diagonal(dim1=1, dim2=2).sum(-1) - 1) / 2).clamp(-1, 1)
    assert float(torch.rad2deg(torch.arccos(cos)).median()) < 0.5


def test_checkpoint_resume_and_no_overwrite(small, tmp_path):
    star = str(small / "particles.star")
    run = tmp_path / "run"
    r = runner.invoke(app, ["--quiet", "abinitio", star, "-o", str(run), "--epochs", "2", "--switch-epoch", "1", *FAST])
    assert r.exit_code == 0, r.output
    assert (run / "checkpoint.pt").is_file()
    again = runner.invoke(app, ["--quiet", "abinitio", star, "-o", str(run), "--epochs", "2", *FAST])
    assert again.exit_code == 2 and "--force" in again.output
    resumed = runner.invoke(app, ["--quiet", "abinitio", star, "-o", str(run), "--epochs", "3", "--switch-epoch", "1",
                                  "--resume", *FAST])
    assert resumed.exit_code == 0, resumed.output
    lines = (run / "metrics.csv").read_text().splitlines()
    epochs = [int(line.split(",")[1]) for line in lines[1:]]
    assert epochs == [1, 2, 3]
    events = [json.loads(x)["event"] for x in (run / "log.jsonl").read_text().splitlines()]
    assert "resume" in events and events.count("epoch") == 3
    # Resuming a finished run only rewrites its results.
    done = runner.invoke(app, ["--quiet", "abinitio", star, "-o", str(run), "--epochs", "3", "--switch-epoch", "1",
                               "--resume", *FAST])
    assert done.exit_code == 0, done.output
    assert len((run / "metrics.csv").read_text().splitlines()) == 4


def test_halves_max_particles_and_ground_truth_outputs(small, tmp_path):
    run = tmp_path / "run"
    r = runner.invoke(app, ["--json", "abinitio", str(small / "particles.star"), "-o", str(run), "--epochs", "2",
                            "--switch-epoch", "1", "--halves", "--max-particles", "120", "--ground-truth",
                            str(small / "ground_truth.mrc"), "--score-every", "2", *FAST])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.output.strip().splitlines()[-1])
    for name in ("map.mrc", "half1_unfil.mrc", "half2_unfil.mrc", "particles.star", "fsc.star", "fsc.png",
                 "metrics.csv", "log.jsonl", "checkpoint.pt"):
        assert (run / name).is_file(), name
    assert summary["particles"] == 120 and summary["box"] == 32
    # The device it ran on; the peak GPU memory only where there is one (--device auto picks CUDA when present).
    assert summary["device"].split(":")[0] == DEVICES[-1]
    assert ("peak_device_memory_MB" in summary) == (DEVICES[-1] == "cuda")
    from tests.test_refine_cli import check_report_files

    check_report_files(run, 120)
    assert summary["gold_standard_resolution_A"] > 0 and summary["res_vs_truth_fsc05_A"] >= 7.2
    assert {"final_rot_err_median", "final_rot_err_mean"} <= set(summary)
    posed = read_star(run / "particles.star")
    source = read_star(small / "particles.star")
    assert len(posed) == 120
    assert (posed.particles["rlnImageName"].to_numpy() == source.particles["rlnImageName"].to_numpy()[:120]).all()
    assert set(posed.particles["rlnRandomSubset"]) == {1, 2}
    metrics = (run / "metrics.csv").read_text().splitlines()
    assert len(metrics) == 5 and "res_fsc05_A" in metrics[0] and "rot_err_median" in metrics[0]


@pytest.mark.parametrize("star", [CRYODRGN / "relion31.star", CRYODRGN / "empiar_10076_7.star",
                                  ASPIRE / "sample_particles_relion31.star"], ids=lambda p: p.name)
def test_runs_on_real_relion_files(star, tmp_path):
    source = read_star(need(star))
    stack = ParticleStack(source)
    run = tmp_path / "run"
    r = runner.invoke(app, ["--quiet", "abinitio", str(star), "-o", str(run), "--epochs", "1", "--box", "32",
                            "--switch-epoch", "0", "--shifts", "--final-map", "reconstruct", *FAST])
    assert r.exit_code == 0, r.output
    m = read_map(run / "map.mrc")
    assert m.data.shape == (32, 32, 32) and np.isfinite(m.data).all()
    assert m.voxel_size == pytest.approx(stack.pixel_size * stack.box / 32, rel=1e-4)
    posed = read_star(run / "particles.star")
    assert len(posed) == len(source)
    # 3.0 files come back as 3.1: per-particle optics columns move to data_optics, pixel origins to Angstrom.
    kept = set(posed.particles.columns) | set(posed.optics.columns)
    assert set(source.particles.columns) - {"rlnOriginX", "rlnOriginY"} <= kept
    assert {"rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst"} <= set(posed.particles.columns)
    assert np.isfinite(posed.euler_angles).all() and np.isfinite(posed.origins_angstrom).all()


def test_bad_options_are_one_line_errors(small, tmp_path):
    star = str(small / "particles.star")
    r = runner.invoke(app, ["abinitio", star, "-o", str(tmp_path / "a"), "--method", "nope"])
    assert r.exit_code == 2 and "unknown method" in r.output
    r = runner.invoke(app, ["abinitio", star, "-o", str(tmp_path / "b"), "--box", "64"])
    assert r.exit_code == 2 and "larger than the particle box" in r.output
    r = runner.invoke(app, ["abinitio", star, "-o", str(tmp_path / "c"), "--resume"])
    assert r.exit_code == 2 and "no checkpoint.pt" in r.output
    r = runner.invoke(app, ["abinitio", star, "-o", str(tmp_path / "d"), "--encode-start-resolution", "-1"])
    assert r.exit_code == 2 and "--encode-start-resolution" in r.output and "at least 0" in r.output
    assert not (tmp_path / "d").exists()
    r = runner.invoke(app, ["abinitio", star, "-o", str(tmp_path / "e"), "--method", "sagd",
                            "--encode-start-resolution", "30"])
    assert r.exit_code == 2 and "--encode-start-resolution" in r.output
    r = runner.invoke(app, ["abinitio", star, "-o", str(tmp_path / "f"), "--method", "sagd", "--search-epochs", "2"])
    assert r.exit_code == 2 and "--search-epochs" in r.output
    r = runner.invoke(app, ["abinitio", star, "-o", str(tmp_path / "g"), "--search-epochs", "-1"])
    assert r.exit_code == 2 and "--search-epochs" in r.output
    r = runner.invoke(app, ["abinitio", star, "-o", str(tmp_path / "h"), "--grid-order", "-1", "--search-epochs", "2"])
    assert r.exit_code == 2 and "--search-epochs" in r.output and "candidate grid" in r.output
    assert not any((tmp_path / name).exists() for name in "fgh")
