"""The refine engines' pieces: RELION's auto-sampling rules, the sparse-TV M-step (Luo eq. 22: normal
equations, TV adjoint, proximal solver, held-out beta choice), and pose scoring modulo a pseudo-symmetry
(checked on RELION's own set_3j9g refine).

The end-to-end refine runs are in test_refine_acceptance.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cryocli.engines.refine.relion import Sampling, euler_axes_distance, symmetric_distance, update_sampling
from cryocli.engines.refine.scoring import rotation_errors_modulo_cn, rotation_errors_modulo_cn_aligned
from cryocli.engines.refine.sparse_tv import (NormalEquations, SparseTVConfig, beta_candidates, differences_adjoint,
                                              forward_differences, objective, scaled_parameters, solve_sparse_tv)
from cryocli.geometry.rotations import euler_to_matrix, random_rotations
from cryocli.imaging.projector import BackProjector, Projector
from cryocli.io.star import read_star
from tests.conftest import DEVICES, RELION_SET, need


def _normal_problem(device: str = "cpu") -> tuple[NormalEquations, torch.Tensor]:
    """Normal equations of 300 noise-free projections of a box map, built on the CPU and set up on ``device``;
    the map (on the CPU)."""
    n = 24
    g = torch.Generator().manual_seed(2)
    vol = torch.zeros((n, n, n))
    vol[8:16, 9:15, 7:17] = 1.0
    proj = Projector(vol)
    rot = random_rotations(300, generator=g, dtype=torch.float32)
    bp = BackProjector(n)
    bp.insert(proj.project(rot), None, rot)
    data, weight = bp.symmetrised()
    env = torch.sinc(torch.as_tensor(np.indices((n, n, n)) - n // 2).double().norm(dim=0) / 48) ** 2
    return NormalEquations(data.to(device), weight.to(device), n, 2, env.to(device), n // 2), vol


@pytest.mark.parametrize("device", DEVICES)
def test_pruned_hessian_equals_the_padded_convolution(device: str) -> None:
    # A^H N A x by definition: the enveloped map zero-padded at the corner, one full real FFT of the padded
    # box, times the weights, the inverse, cropped, enveloped again (float64 here).
    problem, vol = _normal_problem(device)
    x = torch.randn(vol.shape, generator=torch.Generator().manual_seed(5))
    n, p = problem.n, problem.p
    envelope, weights = problem.envelope.cpu().double(), problem.weights.cpu().double()
    padded = torch.zeros((p,) * 3, dtype=torch.float64)
    padded[:n, :n, :n] = x.double() * envelope
    spec = torch.fft.rfftn(padded, norm="ortho") * weights
    expected = torch.fft.irfftn(spec, s=(p,) * 3, norm="ortho")[:n, :n, :n] * envelope
    x = x.to(device)
    got = problem.hessian(x).cpu()
    assert got.shape == (n, n, n) and got.dtype == torch.float32
    assert float((got.double() - expected).abs().max()) < 1e-5 * float(expected.abs().max())
    # The buffers are reused: a second, different call gives its own answer.
    assert not torch.allclose(problem.hessian(2 * x).cpu(), got)
    assert torch.allclose(problem.hessian(2 * x).cpu(), 2 * got, rtol=1e-5, atol=1e-6 * float(got.abs().max()))


@pytest.mark.parametrize("device", DEVICES)
def test_normal_equations_gradient_and_tv_adjoint(device: str) -> None:
    problem, vol = _normal_problem(device)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(vol.shape, generator=g).to(device)
    d = torch.randn(vol.shape, generator=g).to(device)
    # The data term is quadratic: its change along d is <gradient, d> + <d, Hessian d> / 2 exactly.
    change = problem.value(x + d) - problem.value(x)
    predicted = float((problem.gradient(x) * d).double().sum() + 0.5 * (d * problem.hessian(d)).double().sum())
    assert change == pytest.approx(predicted, rel=1e-4)
    # The Hessian is symmetric positive semi-definite.
    e = torch.randn(vol.shape, generator=g).to(device)
    assert float((e * problem.hessian(d)).double().sum()) == pytest.approx(
        float((d * problem.hessian(e)).double().sum()), rel=1e-4)
    assert float((d * problem.hessian(d)).double().sum()) >= 0
    u = torch.randn((3, *vol.shape), generator=g, dtype=torch.float64).to(device)
    xd = x.double()
    assert float((forward_differences(xd) * u).sum()) == pytest.approx(float((xd * differences_adjoint(u)).sum()),
                                                                        rel=1e-10)
    # The data term alone is minimised by the map that made the data (noise-free, well sampled).
    params = scaled_parameters(problem, vol.to(device), SparseTVConfig(alpha=0.0, beta=0.0, gamma=0.0))
    solved = solve_sparse_tv(problem, torch.zeros_like(x), params, 150).cpu()
    cc = float(torch.corrcoef(torch.stack([solved.reshape(-1), vol.reshape(-1)]))[0, 1])
    assert cc > 0.95, cc


@pytest.mark.parametrize("device", DEVICES)
def test_sparse_tv_step_lowers_the_objective_and_sparsifies(device: str) -> None:
    problem, vol = _normal_problem(device)
    noisy = vol + 0.3 * torch.randn(vol.shape, generator=torch.Generator().manual_seed(6))
    noisy_dev = noisy.to(device)
    params = scaled_parameters(problem, vol.to(device), SparseTVConfig())
    x = solve_sparse_tv(problem, noisy_dev, params, 60)
    assert objective(problem, x, noisy_dev, params, x) < objective(problem, noisy_dev, noisy_dev, params, x)
    x = x.cpu()
    background = vol == 0
    assert float((x[background] == 0).double().mean()) > float((noisy[background] == 0).double().mean()) + 0.3
    cc_before = float(torch.corrcoef(torch.stack([noisy.reshape(-1), vol.reshape(-1)]))[0, 1])
    cc_after = float(torch.corrcoef(torch.stack([x.reshape(-1), vol.reshape(-1)]))[0, 1])
    assert cc_after > cc_before, (cc_before, cc_after)
    assert math.isfinite(params.mu) and params.step > 0


def test_sampling_refines_only_after_no_gain_and_no_large_changes() -> None:
    s = Sampling(level=0, local=False, offset_range=5.0, offset_step=2.0)
    # Resolution improves: keep the sampling.
    assert not update_sampling(s, 10.0, 20, 30.0, 1.0, 6.0, 0.5, 7.5, 5, 1) and s.level == 0
    # No gain, but the poses still move a lot (more than 40% of the fine step and not within 3% of the
    # smallest change so far): keep the sampling.
    assert not update_sampling(s, 10.5, 19, 20.0, 0.9, 6.0, 0.5, 7.5, 5, 1) and s.level == 0
    # No gain and changes below 40% of the fine step: one HEALPix order finer, local, finer translations.
    assert not update_sampling(s, 10.4, 19, 2.0, 0.3, 6.0, 0.5, 7.5, 5, 1)
    assert s.level == 1 and s.local and s.offset_step < 2.0 and s.offset_range >= 1.5 * s.offset_step
    assert s.iters_without_gain == 0 and s.iters_without_change == 0
    # The fine step (3.75) is below 75% of the accuracy (6 deg): after one more quiet iteration, converged.
    assert not update_sampling(s, 9.0, 22, 1.0, 0.1, 6.0, 0.5, 3.75, 5, 1)
    assert update_sampling(s, 9.2, 21, 0.9, 0.1, 6.0, 0.5, 3.75, 5, 1)
    assert s.level == 1


def test_resolution_gain_is_counted_in_whole_shells_as_relion() -> None:
    """RELION's resolution is a whole Fourier shell: a crossing that creeps outwards within the previous
    iteration's shell is no gain, one shell further is, and the comparison is with the previous iteration."""
    s = Sampling(level=2, local=True, offset_range=2.0, offset_step=1.0)
    update_sampling(s, 10.50, 19, 0.1, 0.05, 0.8, 0.5, 0.47, 5, 1)
    assert s.iters_without_gain == 0 and s.last_shell == 19
    update_sampling(s, 10.45, 19, 0.1, 0.05, 0.8, 0.5, 0.47, 5, 1)
    assert s.iters_without_gain == 1 and s.best_resolution == 10.45
    s.iters_without_gain = 0
    update_sampling(s, 10.90, 18, 5.0, 0.05, 0.8, 0.5, 0.47, 5, 1)
    update_sampling(s, 10.60, 19, 5.0, 0.05, 0.8, 0.5, 0.47, 5, 1)  # back to shell 19: beyond the previous one
    assert s.iters_without_gain == 0


def test_minimum_angular_sampling_keeps_refining_past_the_accuracy_estimate() -> None:
    s = Sampling(level=1, local=True, offset_range=2.0, offset_step=1.0, best_resolution=9.0, last_shell=22,
                 iters_without_gain=1, iters_without_change=1)
    # 3.75 deg is below 75% of the 6 deg accuracy, but --minimum-angular-sampling 2 asks for a finer step.
    assert not update_sampling(s, 9.2, 21, 0.9, 0.1, 6.0, 0.5, 3.75, 5, 1, minimum_step_deg=2.0) and s.level == 2
    s.iters_without_gain = s.iters_without_change = 1
    assert update_sampling(s, 9.2, 21, 0.5, 0.1, 6.0, 0.5, 1.875, 5, 1, minimum_step_deg=2.0)


@pytest.mark.parametrize("device", DEVICES)
def test_pose_changes_use_relions_euler_axes_distance(device: str) -> None:
    """RELION measures pose changes by the mean angle between the rotation matrices' rows: a turn by t about
    z moves two rows by t and leaves the third, 2 t / 3; about a generic axis it lies between 2 t / 3 and t."""
    t = torch.tensor(9.0, dtype=torch.float64, device=device)
    zero = torch.zeros((), dtype=t.dtype, device=device)
    turn = euler_to_matrix(t, zero, zero)
    distance = euler_axes_distance(turn, torch.eye(3, dtype=turn.dtype, device=device)).cpu()
    assert math.degrees(float(distance)) == pytest.approx(6.0)
    a = random_rotations(200, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(device)
    axis = torch.nn.functional.normalize(torch.randn(200, 3, generator=torch.Generator().manual_seed(2),
                                                     dtype=torch.float64), dim=1).to(device)
    from cryocli.geometry.rotations import rotation_about_axis

    b = rotation_about_axis(axis, torch.full((200,), math.radians(9.0), dtype=torch.float64, device=device)) @ a
    d = torch.rad2deg(symmetric_distance(b, a, None)).cpu()
    assert (d >= 6.0 - 1e-6).all() and (d <= 9.0 + 1e-6).all() and d.std() > 0.1
    # Modulo C2 about z: a pose and its copy turned by 180 degrees about z are 0 apart.
    from cryocli.geometry.symmetry import symmetry_operators

    ops = symmetry_operators("C2", torch.float64, device)
    assert float(symmetric_distance(a @ ops[1], a, ops).max().cpu()) < 1e-6


def test_beta_candidates_bracket_the_kept_scale() -> None:
    assert beta_candidates(1.5) == pytest.approx([0.75, 1.5, 3.0])
    assert min(beta_candidates(0.06)) >= 0.05


def test_modulo_c6_errors_reproduce_relions_set_3j9g_readme() -> None:
    """README of set_3j9g: RELION's poses are 60.36 deg off the truth (median), 0.81 deg modulo the map's
    pseudo-C6 about z, with 134, 95, 86, 88, 97, 100 particles on the six copies and 3 beyond 20 deg;
    its map frame is turned by about half a degree: 0.57 deg once that turn is removed (cryocli's measure
    for the side-by-side table in benchmarks/refine.py)."""
    def rotations(path):
        table = read_star(need(path))
        a = torch.as_tensor(table.euler_angles)
        return table.particles["rlnImageName"].tolist(), euler_to_matrix(a[:, 0], a[:, 1], a[:, 2])

    names_est, est = rotations(RELION_SET / "refine" / "run_data.star")
    names_true, true = rotations(RELION_SET / "noisy" / "noisy.star")
    order = [names_true.index(name) for name in names_est]
    plain, _ = rotation_errors_modulo_cn(est, true[order], 1)
    err, copy = rotation_errors_modulo_cn(est, true[order], 6)
    assert np.median(plain) == pytest.approx(60.36, abs=0.01)
    assert np.median(err) == pytest.approx(0.81, abs=0.005)
    assert np.bincount(copy, minlength=6).tolist() == [134, 95, 86, 88, 97, 100]
    assert int((err > 20).sum()) == 3
    assert np.median(rotation_errors_modulo_cn_aligned(est, true[order], 6)) == pytest.approx(0.573, abs=0.001)


def test_modulo_cn_alignment_removes_a_turn_of_the_map_frame() -> None:
    """Poses on random C6 copies of the truth, in a map frame turned by 2 degrees: 2 degrees modulo C6,
    about 0 once the global turn is removed."""
    g = torch.Generator().manual_seed(4)
    true = random_rotations(300, generator=g).double()
    k = torch.randint(0, 6, (300,), generator=g).double() * 60.0
    copies = euler_to_matrix(k, torch.zeros_like(k), torch.zeros_like(k))
    turn = euler_to_matrix(torch.tensor([0.0]), torch.tensor([2.0]), torch.tensor([0.0])).double()
    est = true @ copies @ turn
    err, _ = rotation_errors_modulo_cn(est, true, 6)
    assert np.median(err) == pytest.approx(2.0, abs=0.01)
    assert np.max(rotation_errors_modulo_cn_aligned(est, true, 6)) < 1e-3


def _noisy_half(vol: torch.Tensor, seed: int, noise: float, device: str = "cpu") -> NormalEquations:
    """Normal equations of 300 noisy projections of ``vol`` (white noise of ``noise`` x the signal's rms), built on
    the CPU and set up on ``device``."""
    n = vol.shape[-1]
    g = torch.Generator().manual_seed(seed)
    proj = Projector(vol)
    rot = random_rotations(300, generator=g, dtype=torch.float32)
    clean = proj.project(rot)
    sd = noise * float(clean.abs().pow(2).mean().sqrt())
    noisy = clean + sd / math.sqrt(2) * torch.complex(torch.randn(clean.shape, generator=g),
                                                      torch.randn(clean.shape, generator=g))
    bp = BackProjector(n)
    bp.insert(noisy, None, rot)
    data, weight = bp.symmetrised()
    env = torch.sinc(torch.as_tensor(np.indices((n, n, n)) - n // 2).double().norm(dim=0) / 48) ** 2
    return NormalEquations(data.to(device), weight.to(device), n, 2, env.to(device), n // 2)


@pytest.mark.parametrize("device", DEVICES)
def test_held_out_data_prefer_the_regularised_map_when_the_data_are_noisy(device: str) -> None:
    """The beta search's criterion: a half's sparse + TV map predicts the other half's data better than the
    unregularised fit of its own noise does, and a moderate beta beats an extreme one."""
    _, vol = _normal_problem()
    half1, half2 = _noisy_half(vol, 11, 3.0, device), _noisy_half(vol, 12, 3.0, device)
    vol = vol.to(device)
    start = torch.zeros_like(vol)
    plain = solve_sparse_tv(half1, start, scaled_parameters(half1, vol, SparseTVConfig(alpha=0.0, beta=0.0,
                                                                                      gamma=0.0)), 150)
    scores = {}
    for beta_scale in (0.3, 1.0, 100.0):
        params = scaled_parameters(half1, plain, SparseTVConfig(), beta_scale)
        scores[beta_scale] = half2.value(solve_sparse_tv(half1, plain, params, 150, start=plain))
    assert min(scores[0.3], scores[1.0]) < half2.value(plain), (scores, half2.value(plain))
    assert min(scores[0.3], scores[1.0]) < scores[100.0], scores


@pytest.mark.parametrize("device", DEVICES)
def test_beta_still_matters_where_the_smoothing_covers_every_gradient(device: str) -> None:
    """With mu growing as beta, a beta large enough to put every |grad x| below mu made the smoothed TV the
    same quadratic for every beta: on a 32-px refine the beta search's held-out scores were equal to the last
    digit. mu now stops at eps', so beta scales 100 and 200 (mu 16 and 32 eps' before) give different maps,
    and the larger one smooths more."""
    from cryocli.engines.refine.sparse_tv import forward_differences

    _, vol = _normal_problem()
    half = _noisy_half(vol, 11, 3.0, device)
    start = solve_sparse_tv(half, torch.zeros_like(vol, device=device),
                            scaled_parameters(half, vol.to(device), SparseTVConfig(alpha=0.0, beta=0.0, gamma=0.0)), 150)
    maps, tv = {}, {}
    for scale in (100.0, 200.0):
        params = scaled_parameters(half, start, SparseTVConfig(), scale)
        assert params.mu <= params.eps_prime * (1 + 1e-9)
        maps[scale] = solve_sparse_tv(half, start, params, 30, start=start)
        tv[scale] = float(forward_differences(maps[scale]).pow(2).sum(0).sqrt().sum())
    change = float((maps[200.0] - maps[100.0]).norm() / maps[100.0].norm())
    assert change > 1e-3, change
    assert tv[200.0] < tv[100.0], tv


def _known_pose_halves() -> dict[str, Any]:
    """4AKE at 48 px / 2.4 A, 1,000 noisy projections per half at the true poses (noise rms 10 x the signal's),
    backprojected trilinearly and with the Gaussian kernel; the unregularised halves, their FSC, a mask."""
    from cryocli.engines.common.kernel_backprojection import GaussianKernelBackProjector
    from cryocli.engines.refine.maps import half_map_fsc, unregularised_map
    from cryocli.imaging.masks import auto_mask
    from cryocli.io.models import model_potential
    from tests.conftest import MODELS

    n, apix = 48, 2.4
    vol = model_potential(need(MODELS / "4ake_adk_open.pdb"), n, apix)
    vol = torch.as_tensor(vol / vol.std(), dtype=torch.float32)
    proj, g = Projector(vol), torch.Generator().manual_seed(5)
    trilinear, kernel = [], []
    for _ in range(2):
        rot = random_rotations(1000, generator=g, dtype=torch.float32)
        clean = proj.project(rot)
        sd = 10.0 * float(clean.abs().pow(2).mean().sqrt())
        noisy = clean + sd / math.sqrt(2) * torch.complex(torch.randn(clean.shape, generator=g),
                                                          torch.randn(clean.shape, generator=g))
        bt, bk = BackProjector(n), GaussianKernelBackProjector(n)
        bt.insert(noisy, None, rot)
        bk.insert(noisy, None, rot)
        trilinear.append(bt.symmetrised())
        kernel.append(bk.symmetrised())
    r_max = n // 2
    unreg = [unregularised_map(d, w, n, 2, r_max) for d, w in trilinear]
    return {"n": n, "apix": apix, "vol": vol, "trilinear": trilinear, "kernel": kernel, "r_max": r_max,
            "unreg": unreg, "fsc": half_map_fsc(unreg[0], unreg[1]),
            "mask": auto_mask(vol, apix, 0.05 * float(vol.max()), extend=3.0, soft_edge_width=3.0)}


@pytest.mark.parametrize("device", DEVICES)
def test_solvent_corrected_gold_standard_is_finer_than_the_spheres(device: str) -> None:
    """``--solvent-correct-fsc``: on the same unregularised half maps (4AKE, 48 px, 1,000 noisy projections per
    half at the true poses, white noise over the whole box), the gold-standard FSC inside a mask around the
    molecule, corrected by phase randomisation, crosses 0.143 at a finer resolution than the FSC inside
    refine's soft sphere, since the mask leaves out the solvent's noise. Measured: 7.65 A against 11.31 A."""
    from cryocli.analysis.fsc import threshold_crossing
    from cryocli.engines.refine.relion import RelionRefineEngine

    k = _known_pose_halves()
    n, apix, r_max = k["n"], k["apix"], k["r_max"]
    trilinear = [(d.to(device), w.to(device)) for d, w in k["trilinear"]]
    sphere = RelionRefineEngine._gold_standard_fsc(trilinear, n, r_max)
    masked = RelionRefineEngine._gold_standard_fsc(trilinear, n, r_max, k["mask"].to(device))
    res_sphere = threshold_crossing(sphere, n, apix, 0.143).resolution
    res_masked = threshold_crossing(masked, n, apix, 0.143).resolution
    assert res_masked < 0.85 * res_sphere, (res_masked, res_sphere)


@pytest.mark.parametrize("device", DEVICES)
def test_sparse_tv_map_is_closer_to_the_truth_than_relions_map_at_known_poses(device: str) -> None:
    """Luo's claim at the M-step: from the same backprojected data (4AKE, 48 px at 2.4 A/px, 1,000 noisy
    projections per half at the true poses, noise rms 10 x the signal's), the sparse + TV map with the
    automatic beta is closer to the ground truth than RELION's MAP map with tau^2 from the gold-standard
    FSC, inside a mask around the molecule (so not merely by flattening the solvent).
    Measured: masked mean FSC 0.54 (MAP) vs 0.71 (sparse-tv), FSC 0.5 at 9.8-9.9 A vs 7.0-7.6 A."""
    from cryocli.analysis.fsc import fsc_curve
    from cryocli.engines.refine.relion import RefineConfig, RelionRefineEngine
    from cryocli.engines.refine.sparse_tv import SparseTVRefineEngine

    k = _known_pose_halves()
    n, vol, kernel, r_max, fsc, mask = k["n"], k["vol"], k["kernel"], k["r_max"], k["fsc"], k["mask"]
    kernel = [(d.to(device), w.to(device)) for d, w in kernel]
    scores = {}
    for engine, cfg in ((RelionRefineEngine(), RefineConfig(ref="ref.mrc")),
                        (SparseTVRefineEngine(), SparseTVConfig(ref="ref.mrc"))):
        state = engine.new_m_step_state()
        engine.begin_m_step(state, kernel, n, r_max, cfg)
        maps = [engine.reconstruct_half(state, d, w, n, fsc, torch.zeros_like(vol, device=device), r_max, cfg,
                                        half=i + 1).cpu()
                for i, (d, w) in enumerate(kernel)]
        scores[engine.name] = [float(np.mean(fsc_curve(m * mask, vol * mask)[1:r_max])) for m in maps]
    assert min(scores["sparse-tv"]) > max(scores["relion"]) + 0.1, scores


@pytest.mark.parametrize("device", DEVICES)
def test_beta_ranked_after_a_third_of_the_iterations_picks_what_the_full_solves_pick(device: str) -> None:
    """The beta search ranks candidates after tv_iters / 3 inner iterations and carries only the best on.
    Continuing a FISTA state is the same as never stopping, and on the known-pose 4AKE halves the scale
    ranked best after 10 iterations is the one ranked best after all 30 (for both halves)."""
    from cryocli.engines.refine.sparse_tv import FistaState, SparseTVRefineEngine, fista_steps

    k = _known_pose_halves()
    n, kernel, r_max = k["n"], k["kernel"], k["r_max"]
    cfg = SparseTVConfig(ref="ref.mrc")
    env = SparseTVRefineEngine()._envelope(n, cfg, torch.device(device))
    problems = [NormalEquations(d.to(device), w.to(device), n, 2, env, r_max) for d, w in kernel]
    for h in (0, 1):
        start = problems[h].back.clone()
        params = {b: scaled_parameters(problems[h], start, cfg, b) for b in (0.1, 0.3, 1.0, 3.0)}
        third = {b: fista_steps(problems[h], start, p, FistaState.start(start), 10) for b, p in params.items()}
        full = {b: fista_steps(problems[h], start, params[b], third[b], 20) for b in params}
        straight = solve_sparse_tv(problems[h], start, params[1.0], 30, start=start)
        assert torch.allclose(full[1.0].x.cpu(), straight.cpu(), atol=1e-6 * float(straight.abs().max()))
        other = problems[1 - h]
        ranked_early = min(params, key=lambda b: other.value(third[b].x))
        ranked_full = min(params, key=lambda b: other.value(full[b].x))
        assert ranked_early == ranked_full, (h, ranked_early, ranked_full)


@pytest.mark.parametrize("device", DEVICES)
def test_shell_tau2_is_the_prior_map_reconstruct_applies(device: str) -> None:
    """``map_reconstruct`` with SSNR s is the data divided by ``weight + 1 / tau^2`` with ``tau^2 = s / <weight>``
    per shell: a single non-zero voxel on shell 3 comes back scaled by ``w / (w + 1 / tau^2)``."""
    from cryocli.engines.refine.maps import map_reconstruct, padded_shells, shell_tau2, unregularised_map

    n, pad = 16, 2
    g = 2 * n + 1
    weight = torch.full((g, g, g), 2.0, dtype=torch.float64)
    data = torch.zeros((g, g, g), dtype=torch.complex128)
    shells = padded_shells(g, n, pad, device)
    voxel = tuple(int(i) for i in (shells == 3).nonzero()[0])
    data[voxel] = 1.0
    data, weight = data.to(device), weight.to(device)
    ssnr = np.full(n // 2 + 1, 4.0)
    tau2 = shell_tau2(weight, n, pad, ssnr, n // 2)
    assert tau2[3] == pytest.approx(2.0)
    regularised = map_reconstruct(data, weight, n, pad, ssnr, n // 2).double().cpu()
    plain = unregularised_map(data, weight, n, pad, n // 2).double().cpu()
    assert torch.allclose(regularised, plain * (2.0 / (2.0 + 1.0 / tau2[3])), atol=1e-6 * float(plain.abs().max()))


@pytest.mark.parametrize("device", DEVICES)
def test_sparse_tv_written_half_maps_claim_no_more_than_its_map_has(device: str) -> None:
    """Issue 12 at the M-step, on the data above: the half maps sparse-tv writes for postprocess (the
    unregularised ones) give an FSC 0.143 resolution (inside the molecule's mask, as postprocess measures it)
    no better than 1.15 x what its map has against the truth (FSC 0.5, same mask).

    Measured: map vs truth 5.74 A, written halves 9.01 A (the data alone: conservative, the prior's gain is
    not counted), regularised halves 5.64 A. At known poses the regularised halves happen not to over-claim;
    in a full refinement, where each half's poses are found against its own regularised map, they claimed
    4.36 A for a map good to 7.38 A (issue 12), which this M-step test cannot reproduce."""
    from cryocli.analysis.fsc import fsc_curve, threshold_crossing
    from cryocli.engines.refine.sparse_tv import SparseTVRefineEngine

    k = _known_pose_halves()
    n, apix, vol, mask, r_max = k["n"], k["apix"], k["vol"], k["mask"], k["r_max"]
    kernel = [(d.to(device), w.to(device)) for d, w in k["kernel"]]
    trilinear = [(d.to(device), w.to(device)) for d, w in k["trilinear"]]
    engine, cfg = SparseTVRefineEngine(), SparseTVConfig(ref="ref.mrc")
    state = engine.new_m_step_state()
    engine.begin_m_step(state, kernel, n, r_max, cfg)
    refs = [engine.reconstruct_half(state, d, w, n, k["fsc"], torch.zeros_like(vol, device=device), r_max, cfg,
                                    half=i + 1)
            for i, (d, w) in enumerate(kernel)]
    data = kernel[0][0] + kernel[1][0]
    weight = kernel[0][1] + kernel[1][1]
    joined = engine.reconstruct_half(state, data, weight, n, k["fsc"], 0.5 * (refs[0] + refs[1]), r_max, cfg,
                                     joined=True)
    written, regularised = engine.written_half_maps(refs, trilinear, n, r_max, apix, cfg)
    assert regularised is not None

    def resolution(a: torch.Tensor, b: torch.Tensor, threshold: float) -> float:
        return threshold_crossing(fsc_curve(a.cpu() * mask, b.cpu() * mask), n, apix, threshold).resolution

    truth = resolution(joined, vol, 0.5)
    claimed = resolution(written[0], written[1], 0.143)
    inflated = resolution(regularised[0], regularised[1], 0.143)
    print(f"map vs truth (0.5) {truth:.2f} A; written halves (0.143) {claimed:.2f} A; regularised halves {inflated:.2f} A")
    assert claimed / truth >= 0.87
