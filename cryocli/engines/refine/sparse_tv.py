"""``refine --method sparse-tv``: Luo's sparsity + total-variation regularised refinement.

The E-step, halves, auto-sampling and outputs are those of ``--method relion``
(:class:`~cryocli.engines.refine.relion.RelionRefineEngine`); the M-step replaces RELION's Fourier-shell
prior by the real-space problem of the paper's eq. 22 / 31 (Z. Luo, "Improving the resolution of Cryo-EM
single particle analysis"):

    min_x  1/2 x^T A^H N A x - x^T A^H b
           + alpha sum_j |x_j| / (|x_j^i| + eps) + beta sum_j |grad x_j|_mu / (|grad x_j^i| + eps')
           + gamma |x - x^{k-1}|^2

with ``b`` the backprojected data ``sum w CTF X / sigma^2`` and ``N`` the backprojected ``CTF^2 / sigma^2``
weights on the padded Fourier grid (eq. 28: the data term is the kernel-regression normal equations),
``A`` the padded Fourier transform of the map (after the kernel's real-space envelope), ``x^i`` the
previous inner iterate (reweighted L1 and TV, eq. 11), ``|.|_mu`` Nesterov's smoothed norm (eq. 14-16),
and ``x^{k-1}`` the previous EM iteration's map (the implicit-gradient term). It is solved by proximal
gradient with Nesterov (FISTA) momentum: a gradient step on the smooth terms (one FFT and one inverse FFT
of the padded box for the data term), then soft thresholding with ``lr * alpha / (|x^i| + eps)`` (eq. 21).

Parameter scales (section 2.5): ``eps`` = the density level of the molecule (default: the 99th percentile
of the current half map, i.e. the level of the few percent of voxels a molecule fills), ``eps' = eps / 3``,
``alpha = 0.45 * rms(A^H b) * eps``, ``beta = 1.7 * rms(A^H b) * eps'``, ``gamma = 0.05 * mean N`` (over the
Fourier voxels with data), where ``A^H b`` is the backprojected data in real space and ``N`` is in the
normalisation in which the data term's Hessian is ``A^H N A`` with a unitary ``A``. The scaled values
are logged in the metrics. The smoothing ``mu`` is set so that the smoothed TV's gradient is no stiffer
than the data term's (``mu = 12 beta / (eps' L_data)``), which keeps the step ``tv_lr / L`` useful. The
Gaussian kernel (``--kernel gaussian``) is this method's default backprojection.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from cryocli.engines.base import EngineConfig, register_engine
from cryocli.engines.common.kernel_backprojection import kernel_envelope
from cryocli.engines.refine.relion import RefineConfig, RelionRefineEngine
from cryocli.imaging.fourier import radius_3d
from cryocli.imaging.projector import grid_radius, padded_box


@dataclass
class SparseTVConfig(RefineConfig):
    """``RefineConfig`` plus Luo's parameters (None: the section-2.5 scales, see the module docstring).

    eps, eps_prime: map density units. alpha, beta, gamma: absolute values (None: scaled defaults).
    alpha_scale, beta_scale, gamma_scale: the multipliers of those defaults (0.45, 1.7, 0.05).
    tv_iters: proximal-gradient iterations per M-step. tv_lr: step as a fraction of 1 / Lipschitz.
    """

    kernel: str = "gaussian"
    eps: float | None = None
    eps_prime: float | None = None
    alpha: float | None = None
    beta: float | None = None
    gamma: float | None = None
    alpha_scale: float = 0.45
    beta_scale: float = 1.7
    gamma_scale: float = 0.05
    tv_iters: int = 100
    tv_lr: float = 1.0


# ------------------------------------------------------------------------------------------------ operators


def grid_to_padded(spectrum: Tensor, padded: int, radius: int) -> Tensor:
    """Centred odd grid ``(G, G, G)`` -> centred ``(P, P, P)`` layout (frequencies ``-P/2 .. P/2 - 1``),
    zero beyond ``radius`` padded voxels."""
    g = spectrum.shape[-1]
    k = torch.arange(padded, device=spectrum.device) - padded // 2
    src = (k + g // 2).clamp(0, g - 1)
    ok = (k + g // 2 >= 0) & (k + g // 2 < g)
    out = spectrum[src][:, src][:, :, src]
    kk = k.to(torch.float64)
    r2 = kk[:, None, None] ** 2 + kk[None, :, None] ** 2 + kk[None, None, :] ** 2
    keep = ok[:, None, None] & ok[None, :, None] & ok[None, None, :] & (r2 <= radius * radius)
    return torch.where(keep, out, torch.zeros((), dtype=out.dtype, device=out.device))


class NormalEquations:
    """The data term ``1/2 x^T A^H N A x - x^T A^H b`` of a map ``(n, n, n)`` on the padded grid.

    ``A x``: the map times the kernel's real-space ``envelope``, zero-padded to ``P``, orthonormal FFT.
    ``N``: the accumulated weights scaled to that normalisation (``P^3`` times the backprojector's, whose
    slices are unnormalised DFTs); ``A^H b`` the backprojected data in real space. Each :meth:`gradient`
    costs one FFT and one inverse FFT of the padded box.
    """

    def __init__(self, data: Tensor, weight: Tensor, n: int, pad: float, envelope: Tensor, r_max: int) -> None:
        self.n, self.p = int(n), padded_box(n, pad)
        radius = grid_radius(n, pad, r_max)
        p3 = float(self.p) ** 3
        centred_b = grid_to_padded(data.to(torch.complex128), self.p, radius)
        centred_n = grid_to_padded(weight.to(torch.float64), self.p, radius)
        self.weights = torch.fft.ifftshift(centred_n) * p3
        self.envelope = envelope.to(torch.float64)
        # U^H b with U the unnormalised DFT = sqrt(P^3) * orthonormal; here in the orthonormal form.
        self.back = self._adjoint(torch.fft.ifftshift(centred_b) * math.sqrt(p3))
        inside = self.weights > 0
        self.mean_weight = float(self.weights[inside].mean()) if bool(inside.any()) else 0.0
        self.lipschitz = float(self.weights.max())

    def _forward(self, x: Tensor) -> Tensor:
        o = self.p // 2 - self.n // 2
        padded = torch.zeros((self.p,) * 3, dtype=torch.float64, device=x.device)
        padded[o:o + self.n, o:o + self.n, o:o + self.n] = x * self.envelope
        return torch.fft.fftn(torch.fft.ifftshift(padded), norm="ortho")

    def _adjoint(self, spectrum: Tensor) -> Tensor:
        o = self.p // 2 - self.n // 2
        padded = torch.fft.fftshift(torch.fft.ifftn(spectrum, norm="ortho")).real
        return padded[o:o + self.n, o:o + self.n, o:o + self.n] * self.envelope

    def gradient(self, x: Tensor) -> Tensor:
        """``A^H N A x - A^H b`` ``(n, n, n)`` float64."""
        return self._adjoint(self.weights * self._forward(x)) - self.back


def forward_differences(x: Tensor) -> Tensor:
    """Discrete gradient (eq. 12, ``x[i] - x[i - 1]`` along z, y, x; 0 on the first plane): ``(3, n, n, n)``."""
    d = torch.zeros((3, *x.shape), dtype=x.dtype, device=x.device)
    d[0, 1:] = x[1:] - x[:-1]
    d[1, :, 1:] = x[:, 1:] - x[:, :-1]
    d[2, :, :, 1:] = x[:, :, 1:] - x[:, :, :-1]
    return d


def differences_adjoint(u: Tensor) -> Tensor:
    """Adjoint ``D^T`` of :func:`forward_differences`: ``(3, n, n, n)`` -> ``(n, n, n)``."""
    out = torch.zeros(u.shape[1:], dtype=u.dtype, device=u.device)
    out[1:] += u[0, 1:]
    out[:-1] -= u[0, 1:]
    out[:, 1:] += u[1, :, 1:]
    out[:, :-1] -= u[1, :, 1:]
    out[:, :, 1:] += u[2, :, :, 1:]
    out[:, :, :-1] -= u[2, :, :, 1:]
    return out


def soft_threshold(x: Tensor, threshold: Tensor) -> Tensor:
    """Proximal operator of the weighted L1 norm (eq. 21)."""
    return torch.sign(x) * (x.abs() - threshold).clamp_min(0)


@dataclass
class SparseTVParameters:
    """The scaled parameters of one M-step (map density units)."""

    eps: float
    eps_prime: float
    alpha: float
    beta: float
    gamma: float
    mu: float
    step: float
    rms_back: float
    mean_weight: float


def scaled_parameters(problem: NormalEquations, previous: Tensor, cfg: SparseTVConfig) -> SparseTVParameters:
    """Section 2.5's defaults from ``A^H b``, ``N`` and the previous map; explicit values win."""
    rms = float(problem.back.pow(2).mean().sqrt())
    eps = cfg.eps if cfg.eps is not None else float(torch.quantile(previous.reshape(-1).double().abs()[::7], 0.99))
    eps = max(eps, 1e-12)
    eps_p = cfg.eps_prime if cfg.eps_prime is not None else eps / 3.0
    alpha = cfg.alpha if cfg.alpha is not None else cfg.alpha_scale * rms * eps
    beta = cfg.beta if cfg.beta is not None else cfg.beta_scale * rms * eps_p
    gamma = cfg.gamma if cfg.gamma is not None else cfg.gamma_scale * problem.mean_weight
    lip_data = max(problem.lipschitz, 1e-30)
    mu = max(12.0 * beta / (eps_p * lip_data), 1e-3 * eps_p)
    lip = lip_data + 2.0 * gamma + 12.0 * beta / (eps_p * mu)
    return SparseTVParameters(eps, eps_p, alpha, beta, gamma, mu, cfg.tv_lr / lip, rms, problem.mean_weight)


def solve_sparse_tv(problem: NormalEquations, previous: Tensor, params: SparseTVParameters, iterations: int,
                    support: Tensor | None = None) -> Tensor:
    """Proximal gradient (FISTA) on eq. 22 starting from ``previous`` ``(n, n, n)``; returns float64.

    ``support`` (optional ``(n, n, n)`` in [0, 1]): voxels outside it are not penalised differently; it is
    only used to keep the solution inside the particle sphere, as RELION's solvent flattening does.
    """
    x_prev = previous.to(torch.float64)
    x = x_prev.clone()
    y = x.clone()
    t = 1.0
    for _ in range(iterations):
        w_l1 = 1.0 / (y.abs() + params.eps)
        grad_y = forward_differences(y)
        norm_y = grad_y.pow(2).sum(0).sqrt()
        w_tv = 1.0 / (norm_y + params.eps_prime)
        u = grad_y / norm_y.clamp_min(params.mu)
        g = problem.gradient(y) + params.beta * differences_adjoint(w_tv * u) + 2.0 * params.gamma * (y - x_prev)
        x_new = soft_threshold(y - params.step * g, params.step * params.alpha * w_l1)
        if support is not None:
            x_new = x_new * support
        t_new = 0.5 * (1.0 + math.sqrt(1.0 + 4.0 * t * t))
        y = x_new + ((t - 1.0) / t_new) * (x_new - x)
        x, t = x_new, t_new
    return x


def objective(problem: NormalEquations, x: Tensor, previous: Tensor, params: SparseTVParameters,
              reference: Tensor) -> float:
    """Value of eq. 22 at ``x`` with the weights taken at ``reference`` (for tests and logs)."""
    ax = problem._forward(x)
    data = 0.5 * float((problem.weights * ax.abs() ** 2).sum()) - float((x * problem.back).sum())
    l1 = float((x.abs() / (reference.abs() + params.eps)).sum())
    gx = forward_differences(x).pow(2).sum(0).sqrt()
    gr = forward_differences(reference).pow(2).sum(0).sqrt()
    tv = float((gx / (gr + params.eps_prime)).sum())
    return data + params.alpha * l1 + params.beta * tv + params.gamma * float(((x - previous) ** 2).sum())


# ------------------------------------------------------------------------------------------------ engine


@register_engine
class SparseTVRefineEngine(RelionRefineEngine):
    """Luo's refinement: the RELION E-step with a reweighted L1 + TV + implicit-gradient M-step."""

    name: ClassVar[str] = "sparse-tv"
    kind: ClassVar[str] = "refine"
    summary: ClassVar[str] = ("Sparsity + total-variation regularised refinement (Luo): RELION's E-step, M-step "
                              "solved in real space by proximal gradient with Gaussian-kernel backprojection.")
    config_class: ClassVar[type[EngineConfig]] = SparseTVConfig

    def reconstruct_half(self, data: Tensor, weight: Tensor, n: int, fsc: np.ndarray, previous: Tensor,
                         r_max: int, cfg: RefineConfig, info: dict[str, Any], joined: bool = False) -> Tensor:
        """Eq. 22 for one half (or the joined halves), warm-started from the previous map of that half."""
        assert isinstance(cfg, SparseTVConfig)
        pad = 2
        if cfg.kernel == "gaussian":
            envelope = kernel_envelope(n, pad, device=data.device)
        else:
            envelope = torch.sinc(radius_3d(n, data.device, torch.float64) / padded_box(n, pad)) ** 2
        problem = NormalEquations(data, weight, n, pad, envelope, r_max)
        params = scaled_parameters(problem, previous, cfg)
        x = solve_sparse_tv(problem, previous, params, cfg.tv_iters)
        tag = "join" if joined else f"h{len([k for k in info if k.startswith('eps_h')]) + 1}"
        info.update({f"eps_{tag}": params.eps, f"alpha_{tag}": params.alpha, f"beta_{tag}": params.beta,
                     f"gamma_{tag}": params.gamma, f"mu_{tag}": params.mu})
        return x.to(torch.float32)
