"""Weights from log posteriors without subnormal floats (cryocli.engines.common.log_weights)."""

from __future__ import annotations

import math

import pytest
import torch

from cryocli.engines.common.log_weights import LOG_FLOOR, exp_floored, softmax_floored

from .conftest import DEVICES

#: float32's smallest normal number.
TINY = torch.finfo(torch.float32).tiny


def _wide_rows(device: str) -> torch.Tensor:
    """Log posteriors spanning 400 nats (as a pose search's do), with -inf (invalid poses) in them."""
    g = torch.Generator().manual_seed(0)
    x = -400.0 * torch.rand(64, 5000, generator=g)
    x[:, 0] = 3.0
    x[::3, 7] = -math.inf
    return x.to(device)


@pytest.mark.parametrize("device", DEVICES)
def test_softmax_floored_is_softmax_without_subnormals(device: str) -> None:
    x = _wide_rows(device)
    exact = torch.softmax(x.double(), 1)
    got = softmax_floored(x, 1)
    reference = torch.softmax(x, 1)
    # torch's own softmax leaves subnormal weights, which the CPU computes on slowly.
    assert ((reference > 0) & (reference < TINY)).any()
    assert not ((got > 0) & (got < TINY)).any()
    # Equal to the exact weights to float32 precision (torch.softmax's own error here: 2.2e-6 of a weight, from the
    # rounding of x - max); only terms below e^LOG_FLOOR of the largest are dropped.
    assert torch.allclose(got.double(), exact, rtol=5e-6, atol=math.exp(LOG_FLOOR))
    relative = exact / exact.amax(1, keepdim=True)
    assert (got[relative > 1.01 * math.exp(LOG_FLOOR)] > 0).all()
    assert (got[relative < 0.99 * math.exp(LOG_FLOOR)] == 0).all()
    assert torch.allclose(got.sum(1).double(), torch.ones(64, dtype=torch.float64, device=device), atol=1e-6)
    assert (got[::3, 7] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_exp_floored_cuts_at_the_floor_only(device: str) -> None:
    x = torch.tensor([0.0, -1.0, LOG_FLOOR, LOG_FLOOR - 1e-3, -100.0, -math.inf], device=device)
    got = exp_floored(x)
    assert torch.equal(got[:3], torch.exp(x[:3]))
    assert (got[3:] == 0).all()
    assert exp_floored(torch.tensor([LOG_FLOOR])).item() > 1e9 * TINY  # normal even after dividing by 1e9 terms
