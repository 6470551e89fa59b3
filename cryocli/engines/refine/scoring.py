"""Scoring refined poses against known ones when the map is (pseudo-)symmetric about z.

A map that is close to ``n``-fold symmetric about z projects almost identically at ``A`` and at
``A Rz(360 k / n)``: a refinement may put each particle on any of the ``n`` copies and still be right
modulo that rotation. :func:`rotation_errors_modulo_cn` scores such poses without any global alignment
(both pose sets must be in the same map frame, e.g. a refinement started from the true map low-passed):
the geodesic angle ``min_k angle(A_est, A_true Rz(360 k / n))``, and the copy ``k`` that attains it.
A refined map's frame may still turn slightly away from the reference's (by about a degree at 10 A);
:func:`rotation_errors_modulo_cn_aligned` removes that global turn once each particle's copy is fixed.
Rotations are RELION ``A`` matrices ``(N, 3, 3)`` (``Rz`` RELION's passive turn); angles in degrees.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from cryocli.analysis.align import pose_errors_after_alignment
from cryocli.geometry.rotations import euler_to_matrix, geodesic_distance


def _copies(n: int) -> Tensor:
    """RELION ``Rz(360 k / n)`` for ``k = 0 .. n - 1``: ``(n, 3, 3)`` float64."""
    angles = torch.arange(max(1, int(n)), dtype=torch.float64) * (360.0 / max(1, int(n)))
    return euler_to_matrix(angles, torch.zeros_like(angles), torch.zeros_like(angles))


def rotation_errors_modulo_cn(estimated: Tensor | np.ndarray, true: Tensor | np.ndarray,
                              n: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-particle rotation error (degrees) modulo ``Cn`` about z, and the copy ``k`` (0 = the true
    registration) that attains it: ``(errors (N,), copies (N,))``. ``n = 1`` gives the plain error."""
    a = torch.as_tensor(np.asarray(estimated), dtype=torch.float64)
    t = torch.as_tensor(np.asarray(true), dtype=torch.float64)
    rz = _copies(n)
    dist = torch.rad2deg(geodesic_distance(a[None], t[None] @ rz[:, None]))  # (n, N)
    best, copy = dist.min(0)
    return best.numpy(), copy.numpy()


def rotation_errors_modulo_cn_aligned(estimated: Tensor | np.ndarray, true: Tensor | np.ndarray,
                                      n: int) -> np.ndarray:
    """Per-particle rotation errors (degrees) ``(N,)`` modulo ``Cn`` about z after the best global rotation
    (no hand flip): each particle is first matched to its nearest copy ``A_true Rz(360 k / n)``."""
    _, copy = rotation_errors_modulo_cn(estimated, true, n)
    t = torch.as_tensor(np.asarray(true), dtype=torch.float64)
    return pose_errors_after_alignment(torch.as_tensor(np.asarray(estimated), dtype=torch.float64),
                                       t @ _copies(n)[torch.as_tensor(copy)], allow_flip=False)
