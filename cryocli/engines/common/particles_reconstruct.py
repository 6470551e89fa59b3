"""Direct Fourier reconstruction of the particles of a STAR file at their recorded poses.

Glue between :class:`cryocli.io.dataset.ParticleStack` (lazy, batched image access) and
:func:`cryocli.engines.common.reconstruct.reconstruct` (``relion_reconstruct``'s algorithm), so that
commands and engines reconstruct a subset of particles in one call, streaming from the stacks.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import Tensor

from cryocli.engines.common.reconstruct import DEFAULT_GRIDDING_ITERATIONS, reconstruct
from cryocli.errors import CryocliError
from cryocli.io.dataset import ParticleStack


def reconstruct_particles(stack: ParticleStack, indices: np.ndarray | None = None, use_ctf: bool = True,
                          maxres: float | None = None, sym_ops: Tensor | None = None,
                          device: torch.device | str = "cpu", batch_size: int = 256,
                          progress: Callable[[int], None] | None = None,
                          gridding_iterations: int = DEFAULT_GRIDDING_ITERATIONS) -> Tensor:
    """Map ``(n, n, n)`` float32 from the particles ``indices`` (0-based; all when None) at their STAR poses.

    use_ctf: correct for the CTF (CryocliError naming the missing column when the STAR file has none);
    maxres in Angstrom; sym_ops ``(K, 3, 3)`` including the identity; ``progress(k)`` is called with
    the number of particles done in each batch.
    """
    table = stack.table
    if stack.rotations is None:
        raise CryocliError("no rlnAngleRot/rlnAngleTilt/rlnAnglePsi columns: poses are needed to reconstruct",
                           table.path)
    idx = np.arange(len(stack)) if indices is None else np.asarray(indices)
    if idx.size == 0:
        raise CryocliError("no particles selected to reconstruct from", table.path)
    ctf = None
    premultiplied = False
    if use_ctf:
        ctf = table.ctf_params(require=True)
        merged = table.optics_per_particle()
        if "rlnCtfDataAreCtfPremultiplied" in merged.columns:
            flags = merged["rlnCtfDataAreCtfPremultiplied"].to_numpy()[idx].astype(int)
            if len(set(flags)) > 1:
                raise CryocliError("optics groups mix CTF-premultiplied and plain images", table.path)
            premultiplied = bool(flags[0])
        ctf = ctf.index(torch.as_tensor(idx))
    rotations = stack.rotations[torch.as_tensor(idx)]
    origins = stack.shifts_angstrom[torch.as_tensor(idx)] if stack.shifts_angstrom is not None else None

    def batches():
        for start in range(0, idx.size, batch_size):
            chunk = idx[start:start + batch_size]
            yield stack.images(chunk)

    reported = 0

    def report(done: int, total: int) -> None:
        nonlocal reported
        if progress is not None:
            progress(done - reported)
        reported = done

    return reconstruct(batches(), rotations, origins, ctf, stack.pixel_size, maxres=maxres, sym_ops=sym_ops,
                       device=device, batch_size=batch_size, progress=report, ctf_premultiplied=premultiplied,
                       gridding_iterations=gridding_iterations)
