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
gradient with Nesterov (FISTA) momentum: a gradient step on the smooth terms (one real FFT and one inverse
of the padded box for the data term), then soft thresholding with ``lr * alpha / (|x^i| + eps)`` (eq. 21).
Each solve starts from this iteration's RELION (MAP) reconstruction, which is close to the data term's
minimiser at every frequency, so that the few proximal iterations are spent on the penalties; in the
first iteration, whose previous map is the initial reference on an arbitrary grey scale, that MAP map
also stands in for ``x^{k-1}``.

Parameter scales (section 2.5): ``eps`` = the density level of the molecule (default: the 99th percentile
of the current half map, i.e. the level of the few percent of voxels a molecule fills), ``eps' = eps / 3``,
``alpha = 0.45 * rms(A^H b) * eps``, ``beta = beta_scale * rms(A^H b) * eps'``, ``gamma = 0.05 * mean N``
(over the Fourier voxels with data), where ``A^H b`` is the backprojected data in real space and ``N`` is
in the normalisation in which the data term's Hessian is ``A^H N A`` with a unitary ``A``. The smoothing
``mu`` is set so that the smoothed TV's gradient is no stiffer than the data term's
(``mu = 12 beta / (eps' L_data)``), which keeps the step ``tv_lr / L`` useful, but no larger than ``eps'``: a
larger mu makes the smoothed TV a quadratic on every voxel whose strength no longer depends on beta.

Automatic beta (when ``--beta`` is not given): each M-step solves each half for a few beta scales and
keeps the solution that best predicts the other half's data, i.e. with the lowest held-out data term
``1/2 x^T A^H N' A x - x^T A^H b'`` (the other half's negative log-likelihood up to a constant). The first
M-step tries 0.1, 0.3, 1 and 3 (the paper's 1.2-2.4 lie inside), later ones the kept scale and its
neighbours ``/ 2`` and ``x 2``, so the choice follows the data as the resolution improves. Candidates
are ranked after a third of the inner iterations and only the best one is carried on to ``tv_iters`` (its
FISTA state continues exactly), which makes the search cost about 1.7 solves per half instead of 3.
Only this one number per half is chosen from the other half's data. The scaled values (eps, eps',
alpha, beta, gamma, mu and the held-out scores) are logged in the metrics. The Gaussian kernel
(``--kernel gaussian``, applied on the grid to the trilinear accumulators; ``gaussian-insert`` for the paper's
27-point insertion, see :mod:`cryocli.engines.common.kernel_backprojection`) is this method's default backprojection.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from cryocli.engines.common.kernel_backprojection import grid_kernel_envelope, kernel_envelope
from cryocli.engines.protocol import EngineConfig, at_least, positive, register_engine
from cryocli.engines.refine.maps import fsc_to_ssnr, join_low_resolution, map_reconstruct, unregularised_map
from cryocli.engines.refine.relion import MStepState, RefineConfig, RelionRefineEngine
from cryocli.errors import OptionError
from cryocli.imaging.fourier import radius2_3d, radius_3d
from cryocli.imaging.projector import grid_radius, padded_box

#: Beta scales tried in a half's first M-step (multiples of rms(A^H b) eps'), the paper's range included.
FIRST_BETA_GRID = (0.1, 0.3, 1.0, 3.0)
#: Factor between the three beta scales tried in later M-steps.
BETA_STEP = 2.0
#: Range the automatic beta scale stays in (multiples of rms(A^H b) eps').
BETA_RANGE = (0.05, 50.0)
#: Largest Nesterov smoothing mu, in units of eps' (the paper's scale of the molecule's density gradients).
#: Where every |grad x| is below mu the smoothed TV is the quadratic ``beta / mu |grad x|^2 / 2``; with mu
#: growing with beta that is ``eps' L_data / 24 |grad x|^2`` (times the reweighting) for every beta, and
#: the beta search had nothing to choose (held-out scores equal to the last digit on a 32-px refine, where
#: mu reached 5 eps').
MU_MAX_FRACTION = 1.0


@dataclass
class SparseTVConfig(RefineConfig):
    """``RefineConfig`` plus Luo's parameters (None: the section-2.5 scales, see the module docstring).

    eps, eps_prime: map density units. alpha, beta, gamma: absolute values (None: scaled defaults; beta
    None also switches on the automatic search). alpha_scale, beta_scale, gamma_scale: the multipliers of
    those defaults (0.45, 1.7, 0.05; beta_scale applies when the search is off). tv_iters: proximal-gradient
    iterations per M-step (30). tv_lr: step as a fraction of 1 / Lipschitz (1). beta_search: the automatic
    search over beta when beta is None (True).
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
    tv_iters: int = 30
    tv_lr: float = 1.0
    beta_search: bool = True

    def validate(self) -> None:
        super().validate()
        for name in ("eps", "eps_prime", "alpha", "beta", "gamma"):
            if getattr(self, name) is not None:
                at_least(self, name, 0)
        if self.eps is not None and self.eps == 0:
            raise OptionError("eps", self.eps, "must be positive (the density level of the molecule)")
        for name in ("alpha_scale", "beta_scale", "gamma_scale"):
            at_least(self, name, 0)
        at_least(self, "tv_iters", 1)
        positive(self, "tv_lr")
        if self.tv_lr > 2:
            raise OptionError("tv_lr", self.tv_lr, "must be at most 2 (a step beyond 2 / Lipschitz diverges)")


@dataclass
class SparseTVState(MStepState):
    """What sparse-tv's M-step carries between iterations and between the two halves of one iteration.

    problems: this iteration's normal equations of each half (each half's beta is scored on the other's).
    beta_scale: the beta scale each half kept (``{1: s1, 2: s2}``), the centre of its next search.
    solved: whether a previous sparse-tv map exists (the first M-step starts from the MAP map instead).
    """

    problems: list[NormalEquations] = field(default_factory=list)
    beta_scale: dict[int, float] = field(default_factory=dict)
    solved: bool = False

    def as_state(self) -> dict[str, Any]:
        return {"beta_scale": dict(self.beta_scale), "solved": self.solved}

    def restore(self, state: dict[str, Any]) -> None:
        self.beta_scale = {int(k): float(v) for k, v in state.get("beta_scale", {}).items()}
        self.solved = bool(state.get("solved", False))


# ------------------------------------------------------------------------------------------------ operators


def grid_to_padded(spectrum: Tensor, padded: int, radius: int) -> Tensor:
    """Centred odd grid ``(G, G, G)`` -> centred ``(P, P, P)`` layout (frequencies ``-P/2 .. P/2 - 1``),
    zero beyond ``radius`` padded voxels."""
    g = spectrum.shape[-1]
    k = torch.arange(padded, device=spectrum.device) - padded // 2
    src = (k + g // 2).clamp(0, g - 1)
    ok = (k + g // 2 >= 0) & (k + g // 2 < g)
    out = spectrum[src][:, src][:, :, src]
    r2 = radius2_3d(padded, spectrum.device, torch.float64)
    keep = ok[:, None, None] & ok[None, :, None] & ok[None, None, :] & (r2 <= radius * radius)
    return torch.where(keep, out, torch.zeros((), dtype=out.dtype, device=out.device))


class NormalEquations:
    """The data term ``1/2 x^T A^H N A x - x^T A^H b`` of a map ``(n, n, n)`` on the padded grid.

    ``A x``: the map times the kernel's real-space ``envelope``, zero-padded to ``P`` around the centre,
    orthonormal FFT. ``N``: the accumulated weights scaled to that normalisation (``P^3`` times the
    backprojector's, whose slices are unnormalised DFTs); Hermitian-symmetrised, so a real FFT's half
    spectrum ``(P, P, P // 2 + 1)`` carries it exactly. ``A^H b``: the backprojected data in real space
    (computed once). ``A^H N A`` is a convolution, so :meth:`hessian` pads the map at the corner instead
    of the centre and needs no shifts: one real FFT and one inverse of the padded box (float32).
    """

    def __init__(self, data: Tensor, weight: Tensor, n: int, pad: float, envelope: Tensor, r_max: int) -> None:
        self.n, self.p = int(n), padded_box(n, pad)
        radius = grid_radius(n, pad, r_max)
        p3 = float(self.p) ** 3
        half = self.p // 2 + 1
        centred_b = grid_to_padded(data.to(torch.complex128), self.p, radius)
        centred_n = grid_to_padded(weight.to(torch.float64), self.p, radius)
        self.weights = (torch.fft.ifftshift(centred_n) * p3)[..., :half].to(torch.float32).contiguous()
        self.envelope = envelope.to(torch.float32)
        # A^H b = env * crop(centred inverse DFT of b); U^H b with U the unnormalised DFT = sqrt(P^3) * unitary.
        o = self.p // 2 - self.n // 2
        full_b = torch.fft.ifftshift(centred_b) * math.sqrt(p3)
        padded = torch.fft.fftshift(torch.fft.irfftn(full_b[..., :half].to(torch.complex64), s=(self.p,) * 3,
                                                     norm="ortho"))
        self.back = (padded[o:o + self.n, o:o + self.n, o:o + self.n] * self.envelope).contiguous()
        self._padded: tuple[Tensor, Tensor, Tensor] | None = None
        inside = self.weights > 0
        self.mean_weight = float(self.weights[inside].mean()) if bool(inside.any()) else 0.0
        self.lipschitz = float(self.weights.max())

    def hessian(self, x: Tensor) -> Tensor:
        """``A^H N A x`` ``(n, n, n)`` float32."""
        n, p = self.n, self.p
        if self._padded is None:
            # Explicit zero padding: torch's FFTs are several times slower when asked to pad (``n=``).
            dev, half = x.device, p // 2 + 1
            self._padded = (torch.zeros((n, n, p), dtype=torch.float32, device=dev),
                            torch.zeros((n, p, half), dtype=torch.complex64, device=dev),
                            torch.zeros((p, p, half), dtype=torch.complex64, device=dev))
        rows, planes, box = self._padded
        # The padded FFT one axis at a time, pruned: the map fills only the first n of each padded axis and
        # only the first n of each are read back, so 1-D transforms of all-zero or unread lines are skipped
        # (about 40% fewer than a full padded rfftn/irfftn pair, and the same result to float32 round-off).
        rows[..., :n] = x.to(torch.float32) * self.envelope
        planes[:, :n] = torch.fft.rfft(rows, dim=2, norm="ortho")
        box[:n] = torch.fft.fft(planes, dim=1, norm="ortho")
        spec = torch.fft.fft(box, dim=0, norm="ortho").mul_(self.weights)
        spec = torch.fft.ifft(torch.fft.ifft(spec, dim=0, norm="ortho")[:n], dim=1, norm="ortho")[:, :n]
        return torch.fft.irfft(spec, n=p, dim=2, norm="ortho")[..., :n] * self.envelope

    def gradient(self, x: Tensor) -> Tensor:
        """``A^H N A x - A^H b`` ``(n, n, n)`` float32."""
        return self.hessian(x) - self.back

    def value(self, x: Tensor) -> float:
        """The data term at ``x`` (the negative log-likelihood of the data up to a constant)."""
        x = x.to(torch.float32)
        return float(0.5 * (x * self.hessian(x)).double().sum() - (x * self.back).double().sum())


def forward_differences(x: Tensor) -> Tensor:
    """Discrete gradient (eq. 12, ``x[i] - x[i - 1]`` along z, y, x; 0 on the first plane): ``(3, n, n, n)``."""
    d = torch.empty((3, *x.shape), dtype=x.dtype, device=x.device)
    for axis in range(3):
        torch.diff(x, dim=axis, prepend=torch.zeros_like(x.narrow(axis, 0, 1)), out=d[axis])
        d[axis].narrow(axis, 0, 1).zero_()
    return d


def differences_adjoint(u: Tensor) -> Tensor:
    """Adjoint ``D^T`` of :func:`forward_differences`: ``(3, n, n, n)`` -> ``(n, n, n)``."""
    out = torch.zeros(u.shape[1:], dtype=u.dtype, device=u.device)
    for axis in range(3):
        v = u[axis]
        n = v.shape[axis]
        tail = v.narrow(axis, 1, n - 1)
        out.narrow(axis, 1, n - 1).add_(tail)
        out.narrow(axis, 0, n - 1).sub_(tail)
    return out


def soft_threshold(x: Tensor, threshold: Tensor) -> Tensor:
    """Proximal operator of the weighted L1 norm (eq. 21)."""
    return torch.sign(x) * (x.abs() - threshold).clamp_min(0)


@dataclass
class SparseTVParameters:
    """The scaled parameters of one M-step (map density units) and the scales they came from."""

    eps: float
    eps_prime: float
    alpha: float
    beta: float
    gamma: float
    mu: float
    step: float
    rms_back: float
    mean_weight: float
    beta_scale: float


def scaled_parameters(problem: NormalEquations, previous: Tensor, cfg: SparseTVConfig,
                      beta_scale: float | None = None) -> SparseTVParameters:
    """Section 2.5's defaults from ``A^H b``, ``N`` and the previous map; explicit values win.

    beta_scale: the multiplier of ``rms(A^H b) eps'`` (default ``cfg.beta_scale``).
    """
    rms = float(problem.back.double().pow(2).mean().sqrt())
    eps = cfg.eps if cfg.eps is not None else float(torch.quantile(previous.reshape(-1).double().abs()[::7], 0.99))
    eps = max(eps, 1e-12)
    eps_p = cfg.eps_prime if cfg.eps_prime is not None else eps / 3.0
    scale_b = cfg.beta_scale if beta_scale is None else beta_scale
    alpha = cfg.alpha if cfg.alpha is not None else cfg.alpha_scale * rms * eps
    beta = cfg.beta if cfg.beta is not None else scale_b * rms * eps_p
    gamma = cfg.gamma if cfg.gamma is not None else cfg.gamma_scale * problem.mean_weight
    lip_data = max(problem.lipschitz, 1e-30)
    mu = min(max(12.0 * beta / (eps_p * lip_data), 1e-3 * eps_p), MU_MAX_FRACTION * eps_p)
    lip = lip_data + 2.0 * gamma + 12.0 * beta / (eps_p * mu)
    return SparseTVParameters(eps, eps_p, alpha, beta, gamma, mu, cfg.tv_lr / lip, rms, problem.mean_weight,
                              beta / max(rms * eps_p, 1e-30))


@dataclass
class FistaState:
    """Where a proximal-gradient solve stands: the iterate ``x``, the extrapolated point ``y`` (both
    ``(n, n, n)`` float32) and the momentum counter ``t``; continuing from it is the same as never stopping."""

    x: Tensor
    y: Tensor
    t: float = 1.0

    @staticmethod
    def start(x: Tensor) -> FistaState:
        x = x.to(torch.float32).clone()
        return FistaState(x, x.clone())


def fista_steps(problem: NormalEquations, previous: Tensor, params: SparseTVParameters, state: FistaState,
                iterations: int, support: Tensor | None = None) -> FistaState:
    """``iterations`` proximal-gradient (FISTA) steps on eq. 22 from ``state``; returns the new state.

    previous: ``x^{k-1}`` of the implicit-gradient term. ``support`` (optional ``(n, n, n)`` in [0, 1]):
    the solution is multiplied by it after each step (a solvent mask).
    """
    x_prev = previous.to(torch.float32)
    x, y, t = state.x, state.y, state.t
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
    return FistaState(x, y, t)


def solve_sparse_tv(problem: NormalEquations, previous: Tensor, params: SparseTVParameters, iterations: int,
                    support: Tensor | None = None, start: Tensor | None = None) -> Tensor:
    """Proximal gradient (FISTA) on eq. 22 from ``start`` (default ``previous``), ``(n, n, n)``; float32.

    previous: ``x^{k-1}`` of the implicit-gradient term. ``support``: see :func:`fista_steps`.
    """
    state = FistaState.start(previous if start is None else start)
    return fista_steps(problem, previous, params, state, iterations, support).x


def objective(problem: NormalEquations, x: Tensor, previous: Tensor, params: SparseTVParameters,
              reference: Tensor) -> float:
    """Value of eq. 22 at ``x`` with the weights taken at ``reference`` (for tests and logs)."""
    l1 = float((x.abs() / (reference.abs() + params.eps)).double().sum())
    gx = forward_differences(x).pow(2).sum(0).sqrt()
    gr = forward_differences(reference).pow(2).sum(0).sqrt()
    tv = float((gx / (gr + params.eps_prime)).double().sum())
    return (problem.value(x) + params.alpha * l1 + params.beta * tv
            + params.gamma * float(((x - previous) ** 2).double().sum()))


def beta_candidates(centre: float) -> list[float]:
    """The three beta scales tried in one M-step: ``centre / 2, centre, 2 centre`` within BETA_RANGE."""
    lo, hi = BETA_RANGE
    return sorted({min(hi, max(lo, centre * f)) for f in (1.0 / BETA_STEP, 1.0, BETA_STEP)})


# ------------------------------------------------------------------------------------------------ engine


@register_engine
class SparseTVRefineEngine(RelionRefineEngine):
    """Luo's refinement: the RELION E-step with a reweighted L1 + TV + implicit-gradient M-step."""

    name: ClassVar[str] = "sparse-tv"
    kind: ClassVar[str] = "refine"
    summary: ClassVar[str] = ("Sparsity + total-variation regularised refinement (Luo): RELION's E-step, M-step "
                              "solved in real space by proximal gradient with Gaussian-kernel backprojection.")
    config_class: ClassVar[type[EngineConfig]] = SparseTVConfig

    def written_half_maps(self, refs: list[Tensor], trilinear: list[tuple[Tensor, Tensor]], n: int, r_max: int,
                          voxel_size: float, cfg: RefineConfig) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor] | None]:
        """The unregularised (relion_reconstruct-style) half maps at the final poses as ``half*_unfil.mrc``, and
        the sparse + TV half maps under their own names. The two regularised halves share the penalty's sparsity
        pattern and TV structure, so their FSC correlates the penalty, not the signal: fed to postprocess they
        gave 4.36 A for a map that agreed with the truth to 7.38 A. The unregularised halves measure the poses
        alone; their FSC is the gold standard the run reports. Below ``low_resol_join_halves`` (40 A) they are
        joined as RELION joins its half maps (and as the references were), so both methods' half maps follow
        one convention."""
        unreg = [unregularised_map(d, w, n, 2, r_max) for d, w in trilinear]
        joined = join_low_resolution(unreg[0], unreg[1], voxel_size, cfg.low_resol_join_halves)
        return joined, (refs[0], refs[1])

    def new_m_step_state(self) -> SparseTVState:
        """A run's M-step state (the checkpoint keeps each half's beta scale and whether a previous map exists,
        so a resumed run searches beta around the kept scale, as the uninterrupted run would)."""
        return SparseTVState()

    def _envelope(self, n: int, cfg: RefineConfig, device: torch.device) -> Tensor:
        if cfg.kernel == "gaussian":
            return grid_kernel_envelope(n, 2, device=device)
        if cfg.kernel == "gaussian-insert":
            return kernel_envelope(n, 2, device=device)
        return torch.sinc(radius_3d(n, device, torch.float64) / padded_box(n, 2)) ** 2

    def begin_m_step(self, state: MStepState, accumulators: list[tuple[Tensor, Tensor]], n: int, r_max: int,
                     cfg: RefineConfig) -> None:
        """Both halves' normal equations, so that each half's beta can be scored on the other's data."""
        assert isinstance(state, SparseTVState)
        state.metrics = {}
        env = self._envelope(n, cfg, accumulators[0][0].device)
        state.problems = [NormalEquations(d, w, n, 2, env, r_max) for d, w in accumulators]

    def reconstruct_half(self, state: MStepState, data: Tensor, weight: Tensor, n: int, fsc: np.ndarray,
                         previous: Tensor, r_max: int, cfg: RefineConfig, joined: bool = False,
                         half: int = 0) -> Tensor:
        """Eq. 22 for one half (or the joined halves), started from this iteration's MAP reconstruction."""
        assert isinstance(cfg, SparseTVConfig) and isinstance(state, SparseTVState)
        info = state.metrics
        start = self.gridding_fix(map_reconstruct(data, weight, n, 2, fsc_to_ssnr(fsc, cfg.tau2_fudge, joined),
                                                  r_max), cfg)
        # The first M-step's previous map is the initial reference on an arbitrary grey scale.
        prior = previous if state.solved else start
        if joined or not state.problems:
            problem = NormalEquations(data, weight, n, 2, self._envelope(n, cfg, data.device), r_max)
        else:
            problem = state.problems[half - 1]
        tag = "join" if joined else f"h{half}"
        searching = cfg.beta is None and cfg.beta_search and not joined and len(state.problems) == 2
        if joined:
            scales = [float(np.mean(list(state.beta_scale.values()))) if state.beta_scale else cfg.beta_scale]
        else:
            centre = state.beta_scale.get(half)
            if not searching:
                scales = [cfg.beta_scale if centre is None else centre]
            else:
                scales = list(FIRST_BETA_GRID) if centre is None else beta_candidates(centre)
        # With several candidates, each is ranked after a third of the inner iterations and only the best
        # is carried on (the FISTA state continues exactly), so the search costs about 1.7 solves, not 3.
        rank_iters = max(1, cfg.tv_iters // 3) if len(scales) > 1 else cfg.tv_iters
        best: tuple[float, FistaState, SparseTVParameters] | None = None
        for scale in scales:
            params = scaled_parameters(problem, prior, cfg, scale)
            solved = fista_steps(problem, prior, params, FistaState.start(start), rank_iters)
            score = state.problems[2 - half].value(solved.x) if searching else 0.0
            if searching:
                info[f"heldout_{tag}_b{params.beta_scale:.3g}"] = score
            if best is None or score < best[0]:
                best = (score, solved, params)
        assert best is not None
        _, solved, params = best
        x = fista_steps(problem, prior, params, solved, cfg.tv_iters - rank_iters).x
        if not joined:
            state.beta_scale[half] = params.beta_scale
        info.update({f"eps_{tag}": params.eps, f"eps_prime_{tag}": params.eps_prime, f"alpha_{tag}": params.alpha,
                     f"beta_{tag}": params.beta, f"beta_scale_{tag}": params.beta_scale,
                     f"gamma_{tag}": params.gamma, f"mu_{tag}": params.mu})
        if half == 2 or joined:
            state.solved = True
        return x.to(torch.float32)
