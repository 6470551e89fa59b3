"""The sparse-TV M-step's pieces (Luo eq. 22): normal equations, TV adjoint, proximal solver.

The end-to-end refine runs are in test_refine_acceptance.py (marked `acceptance`)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cryocli.engines.refine.sparse_tv import (NormalEquations, SparseTVConfig, differences_adjoint,
                                              forward_differences, objective, scaled_parameters, solve_sparse_tv)
from cryocli.geometry.rotations import random_rotations
from cryocli.imaging.projector import BackProjector, Projector


def _normal_problem() -> tuple[NormalEquations, torch.Tensor]:
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
    return NormalEquations(data, weight, n, 2, env, n // 2), vol


def test_normal_equations_gradient_and_tv_adjoint() -> None:
    problem, vol = _normal_problem()
    g = torch.Generator().manual_seed(4)
    x = torch.randn(vol.shape, generator=g, dtype=torch.float64)
    d = torch.randn(vol.shape, generator=g, dtype=torch.float64)

    def f(v: torch.Tensor) -> float:
        ax = problem._forward(v)
        return 0.5 * float((problem.weights * ax.abs() ** 2).sum()) - float((v * problem.back).sum())

    h = 1e-3
    numeric = (f(x + h * d) - f(x - h * d)) / (2 * h)
    assert float((problem.gradient(x) * d).sum()) == pytest.approx(numeric, rel=1e-5)
    u = torch.randn((3, *vol.shape), generator=g, dtype=torch.float64)
    assert float((forward_differences(x) * u).sum()) == pytest.approx(float((x * differences_adjoint(u)).sum()),
                                                                       rel=1e-10)
    # The data term alone is minimised by the map that made the data (noise-free, well sampled).
    params = scaled_parameters(problem, vol.double(), SparseTVConfig(alpha=0.0, beta=0.0, gamma=0.0))
    solved = solve_sparse_tv(problem, torch.zeros_like(x), params, 150)
    cc = float(torch.corrcoef(torch.stack([solved.reshape(-1), vol.double().reshape(-1)]))[0, 1])
    assert cc > 0.95, cc


def test_sparse_tv_step_lowers_the_objective_and_sparsifies() -> None:
    problem, vol = _normal_problem()
    noisy = vol.double() + 0.3 * torch.randn(vol.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    params = scaled_parameters(problem, vol.double(), SparseTVConfig())
    x = solve_sparse_tv(problem, noisy, params, 60)
    assert objective(problem, x, noisy, params, x) < objective(problem, noisy, noisy, params, x)
    background = vol == 0
    assert float((x[background] == 0).double().mean()) > float((noisy[background] == 0).double().mean()) + 0.3
    cc_before = float(torch.corrcoef(torch.stack([noisy.reshape(-1), vol.double().reshape(-1)]))[0, 1])
    cc_after = float(torch.corrcoef(torch.stack([x.reshape(-1), vol.double().reshape(-1)]))[0, 1])
    assert cc_after > cc_before, (cc_before, cc_after)
    assert math.isfinite(params.mu) and params.step > 0
