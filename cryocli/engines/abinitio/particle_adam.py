"""Adam for per-particle parameters that are updated a batch at a time.

A dense ``torch.optim.Adam`` over an ``(N, d)`` parameter would keep moving every particle with its
momentum whenever any batch is processed; here the moments and the step count live in tensors indexed
by particle id and only the rows of the current batch are touched (as ``SparseAdam``, with a bias
correction per particle). Everything is batched on the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class ParticleAdam:
    """Adam state for ``N`` particles with ``d`` parameters each: first and second moments ``(N, d)`` and
    per-particle step counts ``(N,)``. lr is in the parameter's units (radians for axis-angle poses)."""

    m: Tensor
    v: Tensor
    steps: Tensor
    lr: float
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    @staticmethod
    def zeros(n: int, d: int, lr: float, device: torch.device | str | None = None,
              dtype: torch.dtype = torch.float32) -> ParticleAdam:
        return ParticleAdam(torch.zeros(n, d, device=device, dtype=dtype), torch.zeros(n, d, device=device, dtype=dtype),
                            torch.zeros(n, device=device, dtype=dtype), lr)

    def step(self, indices: Tensor, grad: Tensor) -> Tensor:
        """Update the moments of the particles at ``indices (B,)`` with ``grad (B, d)``; return the Adam
        update ``(B, d)`` to add to their parameters (already multiplied by ``-lr``)."""
        b1, b2 = self.betas
        m = b1 * self.m[indices] + (1 - b1) * grad
        v = b2 * self.v[indices] + (1 - b2) * grad * grad
        t = self.steps[indices] + 1
        self.m[indices], self.v[indices], self.steps[indices] = m, v, t
        m_hat = m / (1 - b1 ** t)[:, None]
        v_hat = v / (1 - b2 ** t)[:, None]
        return -self.lr * m_hat / (torch.sqrt(v_hat) + self.eps)

    def reset(self, indices: Tensor, where: Tensor) -> None:
        """Zero the moments and step counts of the particles at ``indices (B,)`` where ``where (B,)`` is true (a
        particle moved to another pose starts afresh)."""
        keep = (~where).to(self.m.dtype)
        self.m[indices] *= keep[:, None]
        self.v[indices] *= keep[:, None]
        self.steps[indices] *= keep

    def state(self) -> dict[str, Tensor | float]:
        return {"m": self.m, "v": self.v, "steps": self.steps, "lr": self.lr}

    @staticmethod
    def from_state(state: dict, device: torch.device | str | None = None) -> ParticleAdam:
        return ParticleAdam(state["m"].to(device), state["v"].to(device), state["steps"].to(device), float(state["lr"]))
