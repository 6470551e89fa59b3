"""The relative root expected mean squared error on held-out particles (Punjani et al. supplement C, eq. 15-20).

``E^2(I)`` (eq. 15) is the posterior expectation over poses and shifts of the squared error between a particle and
its model image; it is estimated with the same importance samples as the likelihood, self-normalised (eq. 18-19),
over the compared pixels (half plane, ``0 < |k| <= omega``, unitary transform: see
:mod:`~cryocli.engines.abinitio.sagd_marginal`).

Eq. 20 as printed, ``sqrt(sum_I E^2 / (sigma^2 N_test))``, lacks a per-pixel normalisation: for the true map
``E^2`` is about the noise energy, ``M sigma^2`` for ``M`` compared complex pixels (``E|noise_k|^2 = sigma^2`` with
the unitary transform), so it would report about ``sqrt(M)``. cryocli divides by the pixel count:

    RREMSE = sqrt( sum_I E^2(I) / (sigma^2 M N_test) ),

which is about 1 when the map explains the data down to the noise (the paper's reported 0.96-0.99) and above 1
by the unexplained signal otherwise. ``M`` changes with ``omega``; the ratio does not.
"""

from __future__ import annotations

import math

from torch import Tensor


def rremse(expected_sq_error: Tensor, sigma2: float, pixels: int) -> float:
    """RREMSE of held-out particles from their ``E^2`` estimates ``(N_test,)`` (unitary units summed over ``pixels``
    compared complex pixels), with noise variance ``sigma2`` per real-space pixel. One host sync."""
    return math.sqrt(float(expected_sq_error.mean()) / (sigma2 * pixels))
