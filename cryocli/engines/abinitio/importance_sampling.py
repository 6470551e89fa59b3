"""Importance sampling of the quadrature sums (Punjani et al. eq. 9-14, supplement B, Algorithm 2).

Three independent samplers per particle: viewing direction, in-plane angle, shift. For one sampler with ``M``
points of weights ``w`` (:class:`~cryocli.engines.abinitio.sagd_quadrature.Quadrature`):

* The first time a particle is seen every point is evaluated once (``c_j = 1``, ``N = M``, ``q = 1 / M``).
* Afterwards the proposal is eq. 14: ``q_j = (1 - alpha) phi_hat_j / Z + alpha / M`` with
  ``phi_hat_j = sum_i phi_i^(1/T) K_ij`` over the points ``i`` evaluated last time (kernels of
  :func:`~cryocli.engines.abinitio.sagd_quadrature.kernels`; they also carry ``phi`` from the quadrature level it was
  computed at onto the current one), ``alpha = max(0.05, 2^(-0.25 floor(tau_prev / 50)))``,
  ``T = max(1.25, 2^(10 / floor(tau_prev / 50)))`` (``T`` infinite for ``tau_prev < 50``, where ``alpha = 1``
  anyway), ``tau_prev`` the iteration at which the particle's ``phi`` were computed.
* ``N = ceil(s0 * ESS)`` draws with replacement, ``ESS = 1 / sum q^2``; each distinct point is evaluated once and
  counted ``c_j`` times: the estimate of a sum ``sum_j w_j f_j`` is ``sum_j c_j w_j f_j / (N q_j)`` (eq. 10), and
  the product of the three samplers' factors gives eq. 12.

``phi`` of a point is the estimated marginal posterior mass there: the estimate of the sum over the other two
variables times the point's own weight (proportional to the marginal probability, as section 3.3 says; with the
uniform orientation weights only the shift sampler's weights differ). The per-particle state lives in device
tensors indexed by particle id: ``log phi`` per level ``(N, M)`` (``-inf`` where not evaluated), the level it
belongs to and ``tau_prev`` ``(N,)``. Every operation is batched over particles.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from cryocli.engines.common.log_weights import exp_floored

#: The paper's s0 (section 4, Fig. 6).
DEFAULT_S0 = 10.0


def alpha_schedule(tau_prev: Tensor) -> Tensor:
    """``alpha = max(0.05, 2^(-0.25 floor(tau_prev / 50)))`` per particle (``tau_prev`` ``(B,)`` int)."""
    k = torch.div(tau_prev, 50, rounding_mode="floor").to(torch.float32)
    return torch.clamp(torch.pow(2.0, -0.25 * k), min=0.05)


def temperature_schedule(tau_prev: Tensor) -> Tensor:
    """``T = max(1.25, 2^(10 / floor(tau_prev / 50)))`` per particle, ``inf`` below ``tau_prev = 50``."""
    k = torch.div(tau_prev, 50, rounding_mode="floor").to(torch.float32)
    t = torch.clamp(torch.pow(2.0, 10.0 / k.clamp_min(1.0)), min=1.25)
    return torch.where(k >= 1, t, torch.full_like(t, math.inf))


@dataclass
class SampleSet:
    """One sampler's draws for a batch: ``index (B, K)`` distinct points (padded slots repeat a valid one),
    ``log_v (B, K)`` the log IS factor ``log(c w / (N q))`` of each (``-inf`` in padded slots), ``size`` ``M``,
    ``full``: every point of every particle, once (then ``index`` is ``arange(M)`` for all)."""

    index: Tensor
    log_v: Tensor
    size: int
    full: bool

    @property
    def evaluated(self) -> Tensor:
        """Distinct points evaluated per particle ``(B,)``."""
        return torch.isfinite(self.log_v).sum(1)


def full_set(log_w: Tensor, batch: int) -> SampleSet:
    """Every point once: ``c = 1, N = M, q = 1 / M`` so the factor is the weight ``w``."""
    m = log_w.shape[0]
    index = torch.arange(m, device=log_w.device).expand(batch, m)
    return SampleSet(index, log_w[None].expand(batch, m), m, True)


def proposal(log_phi: Tensor, kernel: Tensor, alpha: Tensor, temperature: Tensor) -> Tensor:
    """Eq. 14: ``q (B, J)`` from previous ``log_phi (B, I)`` (``-inf`` where not evaluated), a row-normalised
    kernel ``(I, J)``, ``alpha (B,)`` and ``temperature (B,)``."""
    m = kernel.shape[1]
    top = log_phi.max(1, keepdim=True).values
    safe_top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    t = temperature[:, None]
    scaled = torch.where(torch.isfinite(t), (log_phi - safe_top) / t.clamp(max=1e30), torch.zeros_like(log_phi))
    annealed = torch.where(torch.isfinite(log_phi), exp_floored(scaled), torch.zeros_like(log_phi))
    smoothed = annealed @ kernel
    z = smoothed.sum(1, keepdim=True)
    prior = torch.full_like(smoothed, 1.0 / m)
    shaped = torch.where(z > 0, smoothed / z.clamp_min(1e-300), prior)
    a = alpha[:, None]
    return (1.0 - a) * shaped + a * prior


def draw(q: Tensor, log_w: Tensor, s0: float, generator: torch.Generator | None) -> SampleSet:
    """``N = ceil(s0 * ESS)`` draws with replacement from each row of ``q (B, M)``; distinct points compacted.

    One host sync (the largest number of distinct points in the batch, for the compacted shape).
    """
    b, m = q.shape
    ess = 1.0 / (q * q).sum(1)
    n = torch.ceil(s0 * ess).clamp(1, math.ceil(s0 * m))
    cap = math.ceil(s0 * m)
    draws = torch.multinomial(q, cap, replacement=True, generator=generator)
    used = (torch.arange(cap, device=q.device)[None, :] < n[:, None]).to(q.dtype)
    counts = torch.zeros_like(q).scatter_add_(1, draws, used)
    hit = counts > 0
    k = int(hit.sum(1).max())
    order = torch.argsort(hit.to(torch.int8), dim=1, descending=True, stable=True)[:, :k]
    c = counts.gather(1, order)
    log_v = torch.log(c) + log_w[order] - torch.log(n)[:, None] - torch.log(q.gather(1, order))
    valid = c > 0
    index = torch.where(valid, order, order[:, :1])
    return SampleSet(index, torch.where(valid, log_v, torch.full_like(log_v, -math.inf)), m, False)


def scatter_log_phi(sample: SampleSet, log_phi_points: Tensor) -> Tensor:
    """Per-point ``log phi (B, K)`` of a sample set -> ``(B, M)`` with ``-inf`` at points not evaluated."""
    b = log_phi_points.shape[0]
    out = torch.full((b, sample.size), -math.inf, device=log_phi_points.device, dtype=log_phi_points.dtype)
    valid = torch.isfinite(sample.log_v)
    return out.scatter(1, sample.index, torch.where(valid, log_phi_points, out.gather(1, sample.index)))


@dataclass
class ParticlePhi:
    """Per-particle sampler state (device tensors indexed by particle id).

    level ``(N,)``: quadrature level of the stored ``phi`` (-1: never seen); tau_prev ``(N,)``: the iteration they
    were computed at; log_phi[level] = ``(directions (N, M_d), psi (N, M_psi), shifts (N, M_t))``.
    """

    level: Tensor
    tau_prev: Tensor
    log_phi: dict[int, tuple[Tensor, Tensor, Tensor]] = field(default_factory=dict)

    @staticmethod
    def empty(n: int, device: torch.device) -> ParticlePhi:
        return ParticlePhi(torch.full((n,), -1, dtype=torch.long, device=device),
                           torch.zeros(n, dtype=torch.long, device=device))

    def store(self, ids: Tensor, level: int, sizes: tuple[int, int, int], values: tuple[Tensor, Tensor, Tensor],
              tau: int) -> None:
        """Record the batch's ``log phi`` (each ``(B, M)``) at ``level`` and iteration ``tau``."""
        if level not in self.log_phi:
            n = self.level.shape[0]
            dev = self.level.device
            self.log_phi[level] = tuple(torch.full((n, m), -math.inf, device=dev) for m in sizes)  # type: ignore[assignment]
        for table, v in zip(self.log_phi[level], values, strict=True):
            table[ids] = v.detach().to(table.dtype)
        self.level[ids] = level
        self.tau_prev[ids] = tau

    def state(self) -> dict:
        return {"level": self.level, "tau_prev": self.tau_prev, "log_phi": self.log_phi}

    @staticmethod
    def from_state(state: dict, device: torch.device) -> ParticlePhi:
        return ParticlePhi(state["level"].to(device), state["tau_prev"].to(device),
                           {int(k): tuple(t.to(device) for t in v) for k, v in state["log_phi"].items()})
