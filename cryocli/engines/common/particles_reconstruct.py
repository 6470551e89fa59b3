"""Direct Fourier reconstruction of the particles of a STAR file at their recorded poses.

Glue between :class:`cryocli.io.dataset.ParticleStack` (lazy, batched image access) and
:class:`cryocli.engines.common.reconstruct.DirectFourierReconstructor` (``relion_reconstruct``'s
algorithm), streaming from the stacks. Half sets are accumulated in one pass over the particles and the
full map is made from the sum of the two half accumulators, as RELION does, so every image is read and
transformed once.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from cryocli import distributed
from cryocli.engines.common.reconstruct import DEFAULT_GRIDDING_ITERATIONS, DirectFourierReconstructor
from cryocli.errors import CryocliError
from cryocli.imaging.ctf import CTFParams
from cryocli.io.dataset import ParticleStack


def _ctf_inputs(stack: ParticleStack, idx: np.ndarray, use_ctf: bool) -> tuple[CTFParams | None, bool]:
    """CTF parameters of ``idx`` (None without CTF correction) and whether the images are CTF-premultiplied."""
    if not use_ctf:
        return None, False
    table = stack.table
    ctf = table.ctf_params(require=True)
    premultiplied = False
    merged = table.optics_per_particle()
    if "rlnCtfDataAreCtfPremultiplied" in merged.columns:
        flags = set(merged["rlnCtfDataAreCtfPremultiplied"].to_numpy()[idx].astype(int))
        if len(flags) > 1:
            raise CryocliError("optics groups mix CTF-premultiplied and plain images", table.path)
        premultiplied = bool(flags.pop())
    return ctf, premultiplied


def reconstruct_sets(stack: ParticleStack, sets: list[np.ndarray], use_ctf: bool = True,
                     maxres: float | None = None, sym_ops: Tensor | None = None,
                     device: torch.device | str = "cpu", batch_size: int = 256,
                     progress: Callable[[int], None] | None = None,
                     gridding_iterations: int = DEFAULT_GRIDDING_ITERATIONS,
                     with_union: bool = False) -> list[Tensor]:
    """Maps ``(n, n, n)`` float32 of disjoint particle ``sets`` (0-based indices) at their STAR poses.

    One pass over the union of the sets; with ``with_union`` the map of all of them together is
    appended, made from the summed accumulators (no second pass). use_ctf: correct for the CTF
    (CryocliError naming the missing column when the STAR file has none); maxres in Angstrom; sym_ops
    ``(K, 3, 3)`` including the identity; ``progress(k)`` is called with the particles done per batch.
    Under torchrun each rank reads its :func:`cryocli.distributed.shard` of the particles and the
    accumulators are summed over the ranks before the maps are made, so every rank returns the same maps
    (``progress`` then counts every rank's particles, assuming the ranks keep pace).
    """
    table = stack.table
    if stack.rotations is None:
        raise CryocliError("no rlnAngleRot/rlnAngleTilt/rlnAnglePsi columns: poses are needed to reconstruct",
                           table.path)
    if any(len(s) == 0 for s in sets):
        raise CryocliError("no particles selected to reconstruct from", table.path)
    label = np.full(len(stack), -1)
    for k, s in enumerate(sets):
        label[np.asarray(s)] = k
    idx = np.nonzero(label >= 0)[0]
    ranks = distributed.current()
    mine_all = distributed.shard(idx, ranks)
    ctf, premultiplied = _ctf_inputs(stack, idx, use_ctf)
    recs = [DirectFourierReconstructor(stack.box, stack.pixel_size, maxres=maxres, sym_ops=sym_ops, device=device,
                                       ctf_premultiplied=premultiplied) for _ in sets]
    for start in range(0, mine_all.size, batch_size):
        chunk = mine_all[start:start + batch_size]
        images = stack.images(chunk)
        for k, rec in enumerate(recs):
            mine = np.nonzero(label[chunk] == k)[0]
            if mine.size == 0:
                continue
            rows = torch.as_tensor(chunk[mine])
            rec.add(images[torch.as_tensor(mine)], stack.rotations[rows],
                    stack.shifts_angstrom[rows] if stack.shifts_angstrom is not None else None,
                    ctf.index(rows) if ctf is not None else None)
        if progress is not None:
            progress(int(chunk.size) * ranks.world_size)
    for rec in recs:
        distributed.all_reduce_sum(rec.backprojector.accumulators)
    maps = [rec.reconstruct(gridding_iterations) for rec in recs]
    if with_union:
        union = DirectFourierReconstructor(stack.box, stack.pixel_size, maxres=maxres, sym_ops=sym_ops,
                                           device=device, ctf_premultiplied=premultiplied)
        for rec in recs:
            union.backprojector.merge(rec.backprojector)
        maps.append(union.reconstruct(gridding_iterations))
    return maps

