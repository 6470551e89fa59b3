"""Stochastic average gradient descent with a Lipschitz line search (Punjani et al. eq. 7-8, supplement A,
Algorithm 1; Le Roux, Schmidt and Bach 2012).

The objective is ``f(V) = sum_k f_k(V)`` over ``K`` fixed minibatches, ``f_k = D_k + R / K`` (``D_k``: the minibatch's
negative log marginal likelihood, ``R``: the negative log prior). Each iteration ``tau`` takes minibatch ``k``:

* its data gradient ``g_k`` replaces the stored one and updates the running sum ``G`` (both start at zero, so
  during the first pass ``G`` holds only the minibatches seen so far);
* the step is ``V <- max(0, V - eps / L * (G / m + grad R / K))`` with ``m`` the number of minibatches seen so far:
  the average of eq. 7 (the supplement divides by ``L`` only; the issue resolves this for the average), the prior's
  gradient fresh at every step and never stored, negative voxels truncated to 0;
* ``eps = max(1/16, 2^(1 - floor(tau / 150)))``.

``L``: the first one by bisection on the first minibatch (bracketed by doubling or halving from 1, then 8 geometric
bisections between the largest ``L`` that fails the condition and the smallest that passes); every
``line_search_every`` (20) iterations it is doubled until the current minibatch satisfies the sufficient decrease
``f_k(V) - f_k(V - g / L) >= |g|^2 / (2 L)`` (``g = grad f_k(V)``; Algorithm 1 prints the inequality reversed),
taken on the projected step ``V' = max(0, V - g / L)`` as ``f_k(V) - f_k(V') >= L |V - V'|^2 / 2`` (the same condition
where nothing is clipped; without the projection the exponential prior, linear in V, lets any small L pass).
The condition is checked at the point where the gradient was taken, before the step (Algorithm 1 checks after the
step with the gradient of the point before it). Between searches ``L <- L * 2^(-1/150)``: the printed rule
``L <- K / 2^150`` is garbled; cryocli reads it as the SAG paper's gentle decrease ``L <- L 2^(-1/n)`` with the
150 of the step schedule for ``n``, i.e. ``L`` halves over 150 iterations unless a search doubles it back.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

#: Iterations between line searches (Algorithm 1).
LINE_SEARCH_EVERY = 20
#: Per-iteration decrease of L between searches.
L_DECAY = 2.0 ** (-1.0 / 150.0)
#: Geometric bisection steps of the first L.
BISECTIONS = 8


def step_scale(tau: int) -> float:
    """``eps = max(1/16, 2^(1 - floor(tau / 150)))`` (section 3.2)."""
    return max(1.0 / 16.0, 2.0 ** (1 - tau // 150))


def sufficient_decrease(f: Callable[[Tensor], float], volume: Tensor, f0: float, grad: Tensor, lipschitz: float,
                        positive: bool = False) -> bool:
    """Whether ``f(V) - f(V') >= L |V - V'|^2 / 2`` for ``V' = V - grad / L`` (``|grad|^2 / 2L``, the paper's
    condition), or with ``positive`` ``V' = max(0, V - grad / L)``: the projected step the update takes. The
    projection matters: the exponential prior is linear, so ``f`` has no lower bound along unprojected steps into
    negative density and the plain condition passes for any small ``L``."""
    trial = volume - grad / lipschitz
    if positive:
        trial = trial.clamp_min(0.0)
    moved = float(((volume - trial) ** 2).sum())
    return f0 - f(trial) >= 0.5 * lipschitz * moved


def line_search(f: Callable[[Tensor], float], volume: Tensor, f0: float, grad: Tensor, lipschitz: float,
                positive: bool = False, max_doublings: int = 60) -> tuple[float, int]:
    """Double ``lipschitz`` until the sufficient decrease holds; returns ``(L, evaluations)``."""
    evals = 0
    for _ in range(max_doublings):
        evals += 1
        if sufficient_decrease(f, volume, f0, grad, lipschitz, positive):
            break
        lipschitz *= 2.0
    return lipschitz, evals


def bisect_lipschitz(f: Callable[[Tensor], float], volume: Tensor, f0: float, grad: Tensor, start: float = 1.0,
                     steps: int = BISECTIONS, positive: bool = False) -> tuple[float, int]:
    """The first ``L``: bracket from ``start`` by doubling / halving, then ``steps`` geometric bisections; returns
    the smallest passing ``L`` found and the evaluations."""
    evals = 1
    ok = sufficient_decrease(f, volume, f0, grad, start, positive)
    lo, hi = (None, start) if ok else (start, None)
    trial = start
    for _ in range(60):
        if lo is not None and hi is not None:
            break
        trial = trial / 2.0 if ok else trial * 2.0
        evals += 1
        if sufficient_decrease(f, volume, f0, grad, trial, positive):
            hi = trial
        else:
            lo = trial
        ok = lo is None
    if hi is None:
        return float(lo if lo is not None else start), evals
    if lo is None:
        return float(hi), evals
    for _ in range(steps):
        mid = math.sqrt(lo * hi)
        evals += 1
        if sufficient_decrease(f, volume, f0, grad, mid, positive):
            hi = mid
        else:
            lo = mid
    return float(hi), evals


@dataclass
class SAGD:
    """SAGD's memory: stored data gradients ``(K, ...)``, their running sum, which minibatches were seen, ``L``
    (``None`` until the first bisection) and the iteration count ``tau``."""

    grads: Tensor
    total: Tensor
    seen: list[bool]
    lipschitz: float | None = None
    tau: int = 0
    line_search_every: int = LINE_SEARCH_EVERY

    @staticmethod
    def create(n_batches: int, shape: tuple[int, ...], device: torch.device) -> SAGD:
        return SAGD(torch.zeros((n_batches, *shape), device=device), torch.zeros(shape, device=device),
                    [False] * n_batches)

    def step(self, volume: Tensor, k: int, data_grad: Tensor, prior_grad: Tensor, f_k: Callable[[Tensor], float],
             f0: float | None = None, positive: bool = True) -> tuple[Tensor, dict[str, float]]:
        """One iteration on minibatch ``k``: ``data_grad`` is ``grad D_k(V)``, ``prior_grad`` ``grad R(V)``,
        ``f_k`` evaluates ``D_k + R / K`` (for the line search; ``f0`` its value at ``V`` when known). Returns the
        new volume and ``{"L", "eps", "line_search_evals"}``."""
        self.tau += 1
        n_batches = self.grads.shape[0]
        fresh = data_grad + prior_grad / n_batches
        evals = 0
        if self.lipschitz is None or self.tau % self.line_search_every == 0:
            value = f_k(volume) if f0 is None else f0
            if self.lipschitz is None:
                self.lipschitz, evals = bisect_lipschitz(f_k, volume, value, fresh, positive=positive)
            else:
                self.lipschitz, evals = line_search(f_k, volume, value, fresh, self.lipschitz, positive)
        else:
            self.lipschitz *= L_DECAY
        self.total += data_grad - self.grads[k]
        self.grads[k] = data_grad
        self.seen[k] = True
        seen = sum(self.seen)
        eps = step_scale(self.tau)
        direction = self.total / max(1, seen) + prior_grad / n_batches
        new = volume - (eps / self.lipschitz) * direction
        if positive:
            new = new.clamp_min(0.0)
        return new, {"L": float(self.lipschitz), "eps": eps, "line_search_evals": float(evals)}

    def state(self) -> dict:
        return {"grads": self.grads, "total": self.total, "seen": list(self.seen), "lipschitz": self.lipschitz,
                "tau": self.tau}

    @staticmethod
    def from_state(state: dict, device: torch.device) -> SAGD:
        return SAGD(state["grads"].to(device), state["total"].to(device), list(state["seen"]),
                    state["lipschitz"], int(state["tau"]))
