"""SAGD (Punjani, Brubaker and Fleet): each part on its own (the SAGD step and its line search, importance sampling
against the exact quadrature sum, the kernels, RREMSE, the priors' gradients), option checks, real RELION files,
and the done-means reconstruction of simulated 4AKE from the random-spheres start through the command line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cryocli.cli.app import app
from cryocli.engines.abinitio.importance_sampling import (
    ParticlePhi,
    alpha_schedule,
    draw,
    full_set,
    proposal,
    scatter_log_phi,
    temperature_schedule,
)
from cryocli.engines.abinitio.rremse import rremse
from cryocli.engines.abinitio.sagd import SAGDConfig, random_spheres
from cryocli.engines.abinitio.sagd_marginal import batch_pixels, ctf_on_pixels, marginal, project_quadrature
from cryocli.engines.abinitio.sagd_optimizer import SAGD, bisect_lipschitz, line_search, step_scale, sufficient_decrease
from cryocli.engines.abinitio.sagd_priors import CARPrior, ExponentialPrior, UniformPrior
from cryocli.engines.abinitio.sagd_quadrature import build_quadrature, direction_kernel, kernels, level_for
from cryocli.engines.common.pose_search import SearchPixels
from cryocli.errors import OptionError
from cryocli.geometry.rotations import euler_to_matrix, random_rotations
from cryocli.imaging.ctf import CTFParams
from cryocli.imaging.fourier import image_to_rfft
from cryocli.imaging.projector import Projector
from cryocli.imaging.simulate import render_clean
from cryocli.io.dataset import ParticleStack
from cryocli.io.models import demo_model_path
from cryocli.io.mrc import read_map
from cryocli.io.star import read_star
from cryocli.io.volumes import load_volume

from .conftest import ASPIRE, CRYODRGN, DEVICES, need, simulate_4ake

runner = CliRunner()
BOX, APIX = 32, 2.4


# ------------------------------------------------------------------------------------------------ SAGD


def _quadratic(seed: int = 0, batches: int = 6, dim: int = 12, device: str = "cpu"
               ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Random least-squares minibatches ``A_k (8, dim)``, ``b_k (8,)``, drawn on the CPU and moved to ``device``."""
    g = torch.Generator().manual_seed(seed)
    a = [torch.randn(8, dim, generator=g, dtype=torch.float64) / math.sqrt(dim) for _ in range(batches)]
    b = [torch.randn(8, generator=g, dtype=torch.float64) for _ in range(batches)]
    return [ak.to(device) for ak in a], [bk.to(device) for bk in b]


@pytest.mark.parametrize("device", DEVICES)
def test_sagd_converges_to_the_minimiser_of_a_convex_problem(device: str) -> None:
    """f = sum_k 0.5 |A_k x - b_k|^2 + 0.5 mu |x|^2 (the ridge term as the prior, its gradient added fresh at each
    step), six minibatches in a seeded random order: SAGD with its line search reaches the closed-form minimiser."""
    a, b = _quadratic(device=device)
    mu, k = 0.5, len(a)
    h = sum(ak.T @ ak for ak in a) + mu * torch.eye(12, dtype=torch.float64, device=device)
    x_star = torch.linalg.solve(h, sum(ak.T @ bk for ak, bk in zip(a, b, strict=True))).cpu()
    opt = SAGD(torch.zeros((k, 12), dtype=torch.float64, device=device),
               torch.zeros(12, dtype=torch.float64, device=device), [False] * k)
    x = torch.zeros(12, dtype=torch.float64, device=device)
    order = torch.Generator().manual_seed(1)
    for _ in range(1500):
        j = int(torch.randint(k, (1,), generator=order))

        def f_j(v: torch.Tensor, j: int = j) -> float:
            return float(0.5 * ((a[j] @ v - b[j]) ** 2).sum() + 0.5 * mu * (v * v).sum() / k)

        grad = a[j].T @ (a[j] @ x - b[j])
        x, info = opt.step(x, j, grad, mu * x, f_j, positive=False)
    assert info["eps"] == 1.0 / 16.0
    assert float((x.cpu() - x_star).norm() / x_star.norm()) < 1e-4


@pytest.mark.parametrize("device", DEVICES)
def test_line_search_and_bisection_satisfy_the_sufficient_decrease(device: str) -> None:
    """For a quadratic the condition holds exactly when L >= g'Hg / |g|^2: the doubling search returns an L that
    satisfies it (and half of it does not), the bisection one within 1% of the threshold."""
    a, b = _quadratic(seed=3, batches=1, device=device)
    h = a[0].T @ a[0]

    def f(v: torch.Tensor) -> float:
        return float(0.5 * ((a[0] @ v - b[0]) ** 2).sum())

    x = torch.randn(12, dtype=torch.float64, generator=torch.Generator().manual_seed(4)).to(device)
    g = a[0].T @ (a[0] @ x - b[0])
    threshold = float(g @ h @ g / (g @ g))
    found, _ = line_search(f, x, f(x), g, 1e-3)
    assert sufficient_decrease(f, x, f(x), g, found) and not sufficient_decrease(f, x, f(x), g, found / 2)
    first, _ = bisect_lipschitz(f, x, f(x), g)
    assert sufficient_decrease(f, x, f(x), g, first)
    assert threshold <= first <= 1.01 * threshold
    assert [step_scale(t) for t in (1, 149, 150, 300, 449, 750, 5000)] == [2.0, 2.0, 1.0, 0.5, 0.5, 1 / 16, 1 / 16]


# ------------------------------------------------------------------------------------------------ priors


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("prior", [ExponentialPrior(3.0), CARPrior(0.7), UniformPrior()], ids=lambda p: p.name)
def test_prior_gradients_match_finite_differences(prior, device: str) -> None:
    g = torch.Generator().manual_seed(5)
    volume = (torch.rand((6, 6, 6), generator=g, dtype=torch.float64) + 0.1).to(device)
    grad = prior.grad(volume).cpu()
    h = 1e-6
    for idx in [(0, 0, 0), (2, 3, 1), (5, 5, 5), (3, 0, 4)]:
        up, down = volume.clone(), volume.clone()
        up[idx] += h
        down[idx] -= h
        numeric = float(prior.value(up) - prior.value(down)) / (2 * h)
        assert numeric == pytest.approx(float(grad[idx]), rel=1e-6, abs=1e-8)


# ------------------------------------------------------------------------------------------------ quadrature


@pytest.mark.parametrize("device", DEVICES)
def test_kernels_are_normalised_and_peak_at_the_nearest_point(device: str) -> None:
    coarse, fine = (build_quadrature(level, 25.0, 1.0, 2.5, torch.device(device)) for level in (1, 2))
    for old, new in ((coarse, fine), (fine, fine)):
        for k in (kernel.cpu() for kernel in kernels(old, new)):
            assert torch.allclose(k.sum(1), torch.ones(k.shape[0]), atol=1e-5)
            assert bool((k >= 0).all())
    k_dir = direction_kernel(coarse.directions, fine.directions, coarse.dir_spacing)
    nearest = (coarse.directions @ fine.directions.T).argmax(1)
    assert torch.equal(k_dir.argmax(1).cpu(), nearest.cpu())
    # The quadrature grows with omega: coarser levels for lower frequencies, capped.
    assert [level_for(w, 61.44, 4) for w in (1 / 40, 1 / 20, 1 / 10, 1 / 2)] == [0, 1, 2, 4]
    assert coarse.sizes == (48, 12, coarse.shifts.shape[0]) and fine.sizes[:2] == (192, 24)
    assert float(torch.exp(fine.log_w_shift).sum()) == pytest.approx(1.0, abs=1e-6)


# ------------------------------------------------------------------------------------------------ importance sampling


@pytest.fixture(scope="module")
def ake_particles():
    """200 CTF-modulated, shifted projections of 4AKE (32 px, 2.4 A/px) at SNR 0.1, noise sigma 1; the truth and a
    partly converged map (the truth low-passed to 15 A, a quarter of its power in random spheres added)."""
    vol, _ = load_volume(demo_model_path(), BOX, APIX)
    truth = torch.tensor(vol, dtype=torch.float32)
    g = torch.Generator().manual_seed(7)
    count = 200
    rot = random_rotations(count, generator=g, dtype=torch.float32)
    defocus = 15000 + 5000 * torch.rand(count, generator=g)
    ctf = CTFParams.build(defocus + 150, defocus - 150, torch.full((count,), 40.0), 300.0, 2.7, 0.07)
    origins = torch.randn(count, 2, generator=g) * 2.0
    clean = render_clean(Projector(truth), rot, origins, ctf, APIX).to(torch.float32)
    noise_sigma = math.sqrt(float(clean.var()) / 0.1)
    images = (clean + noise_sigma * torch.randn(clean.shape, generator=g)) / noise_sigma
    truth = truth / noise_sigma
    k = torch.fft.fftfreq(BOX)
    kz, ky, kx = torch.meshgrid(k, k, k, indexing="ij")
    low = torch.exp(-((kx**2 + ky**2 + kz**2) * (BOX * APIX / 15.0) ** 2))
    blurred = torch.fft.ifftn(torch.fft.fftn(truth) * low).real
    spheres = random_spheres(BOX, 25.0, 30, torch.Generator().manual_seed(8))
    partly = blurred + 0.5 * spheres * float(truth.std() / spheres.std())
    return images, ctf, truth, partly


def _setting(images, ctf, level: int = 1, radius: int = 8, device: str = "cpu"):
    """The quadrature, compared pixels, batch data and shift ramps of ``images`` and ``ctf`` (held on the CPU), all
    on ``device``."""
    dev = torch.device(device)
    quad = build_quadrature(level, 0.8 * BOX, 2.0 / APIX, 2.5 * 2.0 / APIX, dev)
    pixels = SearchPixels.build(BOX, radius, dev)
    on_pixels = ctf_on_pixels(ctf.to(dev), pixels, images.shape[0], APIX, dev)
    data = batch_pixels(image_to_rfft(images.to(dev)) / BOX, on_pixels, pixels, 1.0)
    return quad, pixels, data, pixels.ramp_parts(quad.shifts)


def _log_w(quad):
    return quad.log_w_dir, quad.log_w_psi, quad.log_w_shift


@pytest.mark.parametrize("device", DEVICES)
def test_importance_sampled_likelihood_matches_the_exact_sum(ake_particles, device: str) -> None:
    """The paper's Fig. 6 check, all frequencies to Nyquist: with s0 = 10 the importance-sampled log-likelihood is on
    average within 0.1% of the exact quadrature sum on a partly converged map, and for at least 95% of the particles
    (proposals from a first, exhaustive visit); the fraction of points evaluated falls as the proposal sharpens
    (later tau_prev: smaller alpha and T).

    Measured: log p about -881 nats per particle, median absolute error 0.19-0.25 nats, mean relative error
    0.025-0.032%, 96.5-100% of the 200 particles within 0.1%, the largest 0.09-0.15%; fractions evaluated 1.0, 0.96,
    0.70, 0.53, 0.51 at tau_prev 0, 300, 600, 1000, 3000. Even where every point is drawn (alpha = 1) the counts of the
    draws carry the estimator's noise. The draws come from a generator on ``device``, as the engine's (multinomial
    takes no generator of another device): on the CPU the same draws as before."""
    images, ctf, _, partly = ake_particles
    quad, pixels, data, ramps = _setting(images, ctf, radius=BOX // 2, device=device)
    proj = project_quadrature(partly.to(device), quad.rotations, pixels, BOX // 2)
    b = images.shape[0]
    full = tuple(full_set(w, b) for w in _log_w(quad))
    exact = marginal(data, proj, ramps, full, _log_w(quad))  # type: ignore[arg-type]
    exact_log_p = exact.log_p.cpu()
    ids = torch.arange(b, device=device)
    phi = ParticlePhi.empty(b, torch.device(device))
    phi.store(ids, quad.level, quad.sizes, tuple(scatter_log_phi(s, v) for s, v in zip(  # type: ignore[arg-type]
        full, (exact.log_phi_dir, exact.log_phi_psi, exact.log_phi_shift), strict=True)), 0)
    kern = kernels(quad, quad)
    fractions, errors = [], []
    for tau_prev in (0, 300, 600, 1000, 3000):
        tp = torch.full((b,), tau_prev, device=device)
        alpha, temp = alpha_schedule(tp), temperature_schedule(tp)
        gen = torch.Generator(device=device).manual_seed(tau_prev)
        sets = tuple(draw(proposal(table, k, alpha, temp), w, 10.0, gen)
                     for table, k, w in zip(phi.log_phi[quad.level], kern, _log_w(quad), strict=True))
        est = marginal(data, proj, ramps, sets, _log_w(quad))  # type: ignore[arg-type]
        rel = ((est.log_p.cpu() - exact_log_p).abs() / exact_log_p.abs())
        errors.append((float(rel.mean()), float((rel <= 1e-3).to(torch.float64).mean()), float(rel.max())))
        fractions.append(float((est.evaluated.cpu() / quad.points).to(torch.float64).mean()))
    print(f"fractions evaluated {np.round(fractions, 4).tolist()}; relative errors (mean, share within 0.1%, "
          f"largest) {errors}")
    assert all(mean < 1e-3 and within >= 0.95 for mean, within, _ in errors)
    assert fractions[0] > 0.95 and all(a >= b for a, b in zip(fractions, fractions[1:], strict=False))
    assert fractions[-1] < 0.6 * fractions[0]


@pytest.mark.parametrize("device", DEVICES)
def test_rremse_is_one_for_the_truth_and_above_for_a_wrong_map(ake_particles, device: str) -> None:
    images, ctf, truth, _ = ake_particles
    quad, pixels, data, ramps = _setting(images, ctf, level=2, device=device)
    b = images.shape[0]
    full = tuple(full_set(w, b) for w in _log_w(quad))
    scores = {}
    wrong = random_spheres(BOX, 25.0, 30, torch.Generator().manual_seed(9))
    for name, volume in (("truth", truth), ("spheres", wrong * float(truth.std() / wrong.std()))):
        proj = project_quadrature(volume.to(device), quad.rotations, pixels, 8)
        res = marginal(data, proj, ramps, full, _log_w(quad))  # type: ignore[arg-type]
        scores[name] = rremse(res.expected_sq_error, 1.0, pixels.index.numel())
    print(scores)
    assert 0.97 <= scores["truth"] <= 1.02
    assert scores["spheres"] > scores["truth"] + 0.03


# ------------------------------------------------------------------------------------------------ options


@pytest.mark.parametrize("field, value", [("prior", "laplace"), ("s0", 0), ("max_iter", 0), ("res_final", 50.0),
                                          ("max_level", 6), ("lr", 0.1), ("shift_extent", 0)])
def test_bad_values_are_refused(field, value):
    with pytest.raises(OptionError) as err:
        SAGDConfig(**{field: value}).validate()
    assert err.value.option == field


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    return _simulate(tmp_path_factory.mktemp("small") / "sim", 240)


def _simulate(out: Path, count: int, seed: int = 1, shift_sigma: float = 2.0) -> Path:
    """``cryocli simulate`` of the bundled 4AKE model (box 32, 2.4 A/px, SNR 0.1) with in-plane shifts."""
    return simulate_4ake(out, count, 0.1, BOX, seed, APIX, shift_sigma)


FAST = ["--max-iter", "4", "--march-iter", "2", "--batch-size", "60"]


def test_bad_options_name_the_flag(small, tmp_path):
    star = str(small / "particles.star")
    r = runner.invoke(app, ["abinitio", star, "-m", "sagd", "-o", str(tmp_path / "a"), "--prior", "laplace"])
    assert r.exit_code == 2 and "--prior laplace" in r.output
    r = runner.invoke(app, ["abinitio", star, "-m", "sagd", "-o", str(tmp_path / "b"), "--lr", "0.1"])
    assert r.exit_code == 2 and "--lr 0.1" in r.output
    r = runner.invoke(app, ["abinitio", star, "-m", "cryospin", "-o", str(tmp_path / "c"), "--s0", "3"])
    assert r.exit_code == 2 and "no such option" in r.output


def test_streamed_particles_give_the_run_of_preloaded_ones(small, tmp_path):
    """--preload no transforms every minibatch as it is read from the stacks instead of holding all transforms: the
    same map and poses (to float32 round-off of the streamed normalisation)."""
    star = str(small / "particles.star")
    for preload in ("yes", "no"):
        r = runner.invoke(app, ["--quiet", "abinitio", star, "-m", "sagd", "-o", str(tmp_path / preload), "--preload",
                                preload, *FAST])
        assert r.exit_code == 0, r.output
    held, streamed = (read_map(tmp_path / k / "map_unfil.mrc").data for k in ("yes", "no"))
    assert float(np.abs(held - streamed).max()) <= 1e-4 * float(np.abs(held).max())
    angles = [read_star(tmp_path / k / "particles.star").euler_angles for k in ("yes", "no")]
    assert float(np.median(np.abs(angles[0] - angles[1]))) < 1e-3


def test_checkpoint_resume_and_metrics(small, tmp_path):
    star = str(small / "particles.star")
    run = tmp_path / "run"
    r = runner.invoke(app, ["--quiet", "abinitio", star, "-m", "sagd", "-o", str(run), *FAST])
    assert r.exit_code == 0, r.output
    header, *rows = (run / "metrics.csv").read_text().splitlines()
    for column in ("omega", "fraction_evaluated", "L", "eps", "rremse"):
        assert column in header.split(","), column
    assert len(rows) == 4  # one row per iteration
    resumed = runner.invoke(app, ["--quiet", "abinitio", star, "-m", "sagd", "-o", str(run), "--resume",
                                  "--max-iter", "8", "--march-iter", "2", "--batch-size", "60"])
    assert resumed.exit_code == 0, resumed.output
    lines = (run / "metrics.csv").read_text().splitlines()
    assert [int(line.split(",")[1]) for line in lines[1:]] == list(range(1, 9))
    events = [json.loads(x)["event"] for x in (run / "log.jsonl").read_text().splitlines()]
    assert "resume" in events
    posed = read_star(run / "particles.star")
    assert len(posed) == 240 and np.isfinite(posed.euler_angles).all()


@pytest.mark.parametrize("star", [CRYODRGN / "relion31.star", CRYODRGN / "empiar_10076_7.star",
                                  ASPIRE / "sample_particles_relion31.star"], ids=lambda p: p.name)
def test_runs_on_real_relion_files(star, tmp_path):
    source = read_star(need(star))
    stack = ParticleStack(source)
    run = tmp_path / "run"
    r = runner.invoke(app, ["--quiet", "abinitio", str(star), "-m", "sagd", "-o", str(run), "--box", "32",
                            "--max-iter", "3", "--march-iter", "2"])
    assert r.exit_code == 0, r.output
    m = read_map(run / "map.mrc")
    assert m.data.shape == (32, 32, 32) and np.isfinite(m.data).all()
    assert m.voxel_size == pytest.approx(stack.pixel_size * stack.box / 32, rel=1e-4)
    posed = read_star(run / "particles.star")
    assert len(posed) == len(source)
    assert np.isfinite(posed.euler_angles).all() and np.isfinite(posed.origins_angstrom).all()


# ------------------------------------------------------------------------------------------------ done means

E2E_PARTICLES = 5000
#: Iteration counts of the test (the shipped defaults are 5,000 and 2,000): sizes, like the box and the particles.
#: eps = max(1/16, 2^(1 - floor(tau/150))) is the paper's: 2 for the first 150 iterations, 1 from 150 to 299.
#: 250 iterations rather than 300: the held-out error is lowest at iteration 225 and rises after it, so the map the
#: run keeps (and so every figure the test checks) is the same; 300 took 243 s against 190 s for the whole run
#: (2026-12-06).
E2E_ARGS = ["--max-iter", "250", "--march-iter", "100"]


def _angles(star: Path) -> torch.Tensor:
    a = torch.from_numpy(read_star(star).euler_angles)
    return euler_to_matrix(a[:, 0], a[:, 1], a[:, 2])


def test_sagd_recovers_4ake_from_random_spheres(tmp_path):
    """The issue's done-means run: 5,000 simulated 4AKE particles (32 px at 2.4 A/px, CTF, SNR 0.1, shifts of 2 A
    sigma) from the random-spheres start, every option at its shipped default but the iteration counts. FSC against
    the truth (after ``fsc --align``) >= 0.5 to 2.5x Nyquist (12 A), median rotation error of the most probable
    poses under 10 degrees (after the best global rotation, hand flip allowed), held-out RREMSE <= 1.02 at the end
    (the returned map's: the run keeps the map with the lowest held-out error, the stopping rule's criterion).

    Measured when it was added (106 s for the whole test with OMP_NUM_THREADS=2 on an otherwise idle 2-core machine;
    the run went to --max-iter 300): FSC vs truth 0.81 or more through shell 6 (12.8 A; 0.5 at about 8 A), median
    rotation error 8.84 degrees (mean 23.1), held-out RREMSE 1.0076 (iteration 225). The held-out error rises again
    after iteration ~250 (1.033 at 300, median error 20.5 degrees) as L decays between line searches: the map kept is
    the best one. Re-measured on 2026-12-06 with --max-iter 250 (the same kept map, iteration 225): FSC 0.81 or more
    through shell 6, 0.5 at 7.9 A, median 8.77 degrees (mean 22.6), RREMSE 1.0076; the run took 190 s (243 s to
    300 iterations the same hour). With 3,000 particles the same settings end at 10.1 degrees median (FSC 0.67 through shell 6,
    RREMSE 1.0175): the poses are limited by the information below omega = 1/9.6 A^-1 on 32 px. On 2026-12-07 the
    test took 169 s, then 75 s once the posterior weights carried no subnormal floats (log_weights), with the same
    figures (8.78 degrees median, RREMSE 1.0076)."""
    from cryocli.analysis.align import pose_errors_after_alignment

    sim = _simulate(tmp_path / "sim", E2E_PARTICLES)
    run = tmp_path / "run"
    r = runner.invoke(app, ["--json", "abinitio", str(sim / "particles.star"), "--method", "sagd", "-o", str(run),
                            "--ground-truth", str(sim / "ground_truth.mrc"), "--score-every", "1000", *E2E_ARGS])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.output.strip().splitlines()[-1])
    header, *lines = (run / "metrics.csv").read_text().splitlines()
    columns = header.split(",")
    rows = [dict(zip(columns, line.split(","), strict=True)) for line in lines]
    scored = [row for row in rows if row["rremse"] not in ("", "nan")]
    print("\n".join(f"iteration {row['epoch']}: res {float(row['resolution_A']):.1f} A, fraction "
                    f"{float(row['fraction_evaluated']):.3f}, L {float(row['L']):.4g}, eps {row['eps']}, RREMSE "
                    f"{float(row['rremse']):.4f}, median rotation error {row.get('rot_err_median')}" for row in scored))
    fsc = runner.invoke(app, ["--json", "fsc", str(sim / "ground_truth.mrc"), str(run / "map.mrc"), "--align"])
    assert fsc.exit_code == 0, fsc.output
    curve = np.asarray(json.loads(fsc.output.strip().splitlines()[-1])["curve"]["fsc"])
    errors = pose_errors_after_alignment(_angles(run / "particles.star"), _angles(sim / "particles.star"))
    shell = int(BOX * APIX / (2.5 * 2 * APIX))  # 2.5x Nyquist (12 A): shell 6
    final_rremse = float(summary["final_rremse"])  # the returned map's: the lowest held-out error at the final omega
    print(f"FSC vs truth by shell: {np.round(curve, 3).tolist()}; median rotation error {np.median(errors):.2f} deg, "
          f"mean {np.mean(errors):.2f}; held-out RREMSE {final_rremse:.4f}")
    assert curve[1:shell + 1].min() >= 0.5
    assert np.median(errors) < 10.0
    assert final_rremse <= 1.02
