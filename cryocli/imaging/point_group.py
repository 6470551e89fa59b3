"""Point-group symmetry applied to backprojection accumulators, as RELION's ``BackProjector::symmetrise``.

A symmetric reconstruction could insert every image once per operator (``K`` insertions, 60 for I). RELION
instead inserts each image once and, before the map is computed, replaces the accumulated data ``D`` and
weights ``W`` on the padded Fourier grid by their sums over the group,

    ``D_sym(k) = sum_L D(L k)``,  ``W_sym(k) = sum_L W(L k)``,

with ``D(L k)`` read by trilinear interpolation of the grid (``symmetrise_nonhelical``), within the
grid's radius ``R`` (padded Fourier voxels). A contribution inserted at ``k`` reappears at ``L^T k`` for
every ``L``, which is where inserting at the pose ``A L`` would have put it
(:func:`cryocli.geometry.symmetry.equivalent_poses`), up to one trilinear interpolation of the
accumulated grid. The cost is ``K - 1`` interpolations of the grid per reconstruction instead of ``K``
insertions of every image.
"""

from __future__ import annotations

import torch
from torch import Tensor

from cryocli.imaging.fourier import radius2_3d
from cryocli.imaging.projector import channels_first, sample_grid

# Grid points interpolated per call: bounds the temporaries to ~100 MB.
_CHUNK_POINTS = 1 << 21


def non_identity_operators(sym_ops: Tensor | None) -> Tensor | None:
    """The operators ``(K', 3, 3)`` of ``sym_ops (K, 3, 3)`` other than the identity; None when none remain."""
    if sym_ops is None:
        return None
    eye = torch.eye(3, dtype=sym_ops.dtype, device=sym_ops.device)
    keep = (sym_ops - eye).abs().flatten(1).amax(1) > 1e-6
    ops = sym_ops[keep]
    return ops if ops.shape[0] else None


def symmetrise_accumulators(data: Tensor, weight: Tensor, sym_ops: Tensor | None,
                            radius: int) -> tuple[Tensor, Tensor]:
    """Sum Hermitian-symmetrised accumulators over a point group, as RELION does before reconstructing.

    data ``(G, G, G)`` complex and weight ``(G, G, G)`` real on the centred padded Fourier grid ``[z, y, x]``
    (see :mod:`cryocli.imaging.projector`); sym_ops ``(K, 3, 3)`` rotation matrices acting on ``(x, y, z)``,
    identity included or not (None: C1, returned unchanged); radius: ``R`` in padded Fourier voxels, beyond
    which the grid is left as it is. Returns new ``(data, weight)``.
    """
    ops = non_identity_operators(sym_ops)
    if ops is None:
        return data, weight
    g = data.shape[-1]
    real = weight.dtype
    channels = torch.cat([channels_first(data), channels_first(weight)]).contiguous()  # (Re, Im, W) (3, G, G, G)
    inside = (radius2_3d(g, data.device, torch.int64) <= radius * radius).reshape(-1)
    where = inside.nonzero().squeeze(1)
    summed = channels.reshape(3, -1).clone()
    ops = ops.to(device=data.device, dtype=real)
    for s in range(0, where.shape[0], _CHUNK_POINTS):
        flat = where[s:s + _CHUNK_POINTS]
        # (x, y, z) offsets from the centre of these voxels, made a chunk at a time to bound the memory
        points = (torch.stack([flat % g, (flat // g) % g, flat // (g * g)], 1) - g // 2).to(real)
        total = torch.zeros((3, points.shape[0]), dtype=real, device=data.device)
        for op in ops:
            total += sample_grid(channels, points @ op.T)  # D(L k) for the row vectors k
        summed[:, flat] += total
    summed = summed.reshape(3, g, g, g)
    return torch.complex(summed[0], summed[1]), summed[2]
