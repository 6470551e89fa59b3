"""Direct Fourier reconstruction of the particles of a STAR file at their recorded poses.

Glue between :class:`cryocli.io.dataset.ParticleStack` (lazy, batched image access) and
:class:`cryocli.engines.common.reconstruct.DirectFourierReconstructor` (``relion_reconstruct``'s
algorithm), streaming from the stacks and, through :func:`reconstruct_labelled`, from the STAR file in
chunks. Half sets are accumulated in one pass over the particles and the full map is made from the sum of
the two half accumulators, as RELION does, so every image is read and transformed once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from cryocli import distributed
from cryocli.engines.common.reconstruct import DEFAULT_GRIDDING_ITERATIONS, DirectFourierReconstructor
from cryocli.errors import CryocliError
from cryocli.imaging.ctf import CTFParams
from cryocli.io.dataset import ParticleStack, half_set_split
from cryocli.io.read_ahead import read_ahead
from cryocli.io.star import check_pixel_size
from cryocli.io.star_chunks import ChunkedParticles


def _require_poses(stack: ParticleStack) -> Tensor:
    """The particles' rotations ``(N, 3, 3)``; CryocliError when the STAR file has no angles."""
    if stack.rotations is None:
        raise CryocliError("no rlnAngleRot/rlnAngleTilt/rlnAnglePsi columns: poses are needed to reconstruct",
                           stack.table.path)
    return stack.rotations


def check_chunk(stack: ParticleStack, use_ctf: bool) -> None:
    """Refuse a chunk :func:`reconstruct_labelled` cannot use (no poses, no pixel size; with ``use_ctf``, no usable
    CTF), with the error the reconstruction itself would give. Every chunk of a file has the same columns, so a
    caller can check the first one before starting a progress bar."""
    _require_poses(stack)
    _ = stack.pixel_size  # refused when neither the STAR file nor the stack headers give one
    if use_ctf:
        stack.table.ctf_params(require=True)


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


@dataclass
class ReconstructedSets:
    """The maps of :func:`reconstruct_labelled`: ``maps`` ``(n, n, n)`` float32, one per set (then the union),
    ``counts``: particles in each set (all ranks), ``box`` in pixels, ``pixel_size`` in Angstrom."""

    maps: list[Tensor]
    counts: list[int]
    box: int
    pixel_size: float


@dataclass
class _Accumulation:
    """The reconstructors of a pass and what the first chunk fixed: box, pixel size, CTF premultiplication."""

    recs: list[DirectFourierReconstructor]
    box: int
    pixel_size: float
    premultiplied: bool
    path: str | None

    def check(self, stack: ParticleStack, premultiplied: bool) -> None:
        """Refuse a later chunk whose images differ from the first chunk's in box, pixel size or CTF state."""
        if stack.box != self.box:
            raise CryocliError(f"stacks have different box sizes: {self.box} and {stack.box} px", self.path)
        check_pixel_size(self.pixel_size, stack.pixel_size, "the particles' pixel sizes", self.path)
        if premultiplied != self.premultiplied:
            raise CryocliError("optics groups mix CTF-premultiplied and plain images", self.path)


def reconstruct_labelled(chunks: Iterable[tuple[ParticleStack, np.ndarray]], n_sets: int, use_ctf: bool = True,
                         maxres: float | None = None, sym_ops: Tensor | None = None,
                         device: torch.device | str = "cpu", batch_size: int = 256,
                         progress: Callable[[int], None] | None = None,
                         gridding_iterations: int = DEFAULT_GRIDDING_ITERATIONS,
                         with_union: bool = False, empty: str | None = None) -> ReconstructedSets:
    """Maps of ``n_sets`` disjoint particle sets at their STAR poses, in one pass over ``chunks``.

    Each chunk is a stack and ``labels`` ``(len(stack),)`` int: the set (0 .. n_sets-1) of each of its
    particles, -1 for particles left out; the chunks may be one whole stack or the successive chunks of a STAR
    file (:func:`cryocli.io.star_chunks.read_star_chunks`), so memory does not grow with the particle count.
    With ``with_union`` the map of all sets together is appended, made from the summed accumulators (no second
    pass). ``empty``: the error when a set has no particles (default: "no particles selected to reconstruct
    from"). use_ctf: correct for the CTF (CryocliError naming the missing column when the STAR file has none);
    maxres in Angstrom; sym_ops ``(K, 3, 3)`` including the identity; ``progress(k)`` is called with the
    particles done per batch (and with each chunk's particles left out, so that it counts every row). Under
    torchrun each rank takes the particles whose row in the file is its rank modulo the number of ranks, and the
    accumulators are summed over the ranks before the maps are made, so every rank returns the same maps
    (``progress`` then counts every rank's particles, assuming the ranks keep pace).
    """
    ranks = distributed.current()
    acc: _Accumulation | None = None
    counts = np.zeros(n_sets, dtype=np.int64)
    path = None
    for stack, labels in chunks:
        table = stack.table
        path = table.path
        rotations = _require_poses(stack)
        idx = np.nonzero(labels >= 0)[0]
        counts += np.bincount(labels[idx], minlength=n_sets)[:n_sets]
        if progress is not None and idx.size < len(labels):
            progress(int(len(labels) - idx.size))  # rows left out count as done: progress is over the file's rows
        if idx.size == 0:
            continue
        rows_in_file = table.particles.index.to_numpy()[idx].astype(np.int64)
        mine_all = idx[rows_in_file % ranks.world_size == ranks.rank]
        ctf, premultiplied = _ctf_inputs(stack, idx, use_ctf)
        if acc is None:
            recs = [DirectFourierReconstructor(stack.box, stack.pixel_size, maxres=maxres, sym_ops=sym_ops,
                                               device=device, ctf_premultiplied=premultiplied) for _ in range(n_sets)]
            acc = _Accumulation(recs, stack.box, stack.pixel_size, premultiplied, table.path)
        else:
            acc.check(stack, premultiplied)
        batches = (mine_all[start:start + batch_size] for start in range(0, mine_all.size, batch_size))
        for chunk, images in read_ahead(stack.images, batches):  # the next batch is read while this one is inserted
            for k, rec in enumerate(acc.recs):
                mine = np.nonzero(labels[chunk] == k)[0]
                if mine.size == 0:
                    continue
                rows = torch.as_tensor(chunk[mine])
                rec.add(images[torch.as_tensor(mine)], rotations[rows],
                        stack.shifts_angstrom[rows] if stack.shifts_angstrom is not None else None,
                        ctf.index(rows) if ctf is not None else None)
            if progress is not None:
                progress(int(chunk.size) * ranks.world_size)
    if acc is None or (counts == 0).any():
        raise CryocliError(empty or "no particles selected to reconstruct from", path)
    for rec in acc.recs:
        distributed.all_reduce_sum(rec.backprojector.accumulators)
    maps = [rec.reconstruct(gridding_iterations) for rec in acc.recs]
    if with_union:
        union = DirectFourierReconstructor(acc.box, acc.pixel_size, maxres=maxres, sym_ops=sym_ops,
                                           device=device, ctf_premultiplied=acc.premultiplied)
        for rec in acc.recs:
            union.backprojector.merge(rec.backprojector)
        maps.append(union.reconstruct(gridding_iterations))
    return ReconstructedSets(maps, [int(c) for c in counts], acc.box, acc.pixel_size)


def labelled_chunks(chunked: ChunkedParticles, datadir: str | Path | None = None, halves: bool = False,
                    subset: int | None = None, angpix: float | None = None) -> Iterator[tuple[ParticleStack, np.ndarray]]:
    """The chunks of a STAR file as (stack, set of each particle) for :func:`reconstruct_labelled`.

    ``halves``: sets 0 and 1 are half sets 1 and 2; ``subset``: set 0 is that half set, the rest left out (-1);
    neither: every particle in set 0. Without rlnRandomSubset the half sets are
    :func:`~cryocli.io.dataset.half_set_split` of the whole file (seed 0), as ``ParticleStack.ensure_half_sets``
    draws them, whatever the chunks. ``angpix``: the images' pixel size in Angstrom where the file gives none
    (:meth:`~cryocli.io.star.ParticleTable.with_pixel_size`).
    """
    split = None
    if (halves or subset is not None) and "rlnRandomSubset" not in chunked.columns:
        split = half_set_split(chunked.count, seed=0)
    for table in chunked.tables():
        stack = ParticleStack(table if angpix is None else table.with_pixel_size(angpix), datadir=datadir)
        if not halves and subset is None:
            yield stack, np.zeros(len(stack), dtype=np.int64)
            continue
        if split is not None:
            subsets = split[table.particles.index.to_numpy()]
        else:
            values = stack.random_subset
            assert values is not None  # the column is there, or the split was drawn
            subsets = values.numpy()
        if halves:
            yield stack, np.where(subsets == 1, 0, np.where(subsets == 2, 1, -1))
        else:
            yield stack, np.where(subsets == subset, 0, -1)


def reconstruct_sets(stack: ParticleStack, sets: list[np.ndarray], use_ctf: bool = True,
                     maxres: float | None = None, sym_ops: Tensor | None = None,
                     device: torch.device | str = "cpu", batch_size: int = 256,
                     progress: Callable[[int], None] | None = None,
                     gridding_iterations: int = DEFAULT_GRIDDING_ITERATIONS,
                     with_union: bool = False) -> list[Tensor]:
    """Maps ``(n, n, n)`` float32 of disjoint particle ``sets`` (0-based indices) of one ``stack`` at their STAR
    poses: :func:`reconstruct_labelled` of that stack."""
    if any(len(s) == 0 for s in sets):
        raise CryocliError("no particles selected to reconstruct from", stack.table.path)
    labels = np.full(len(stack), -1)
    for k, s in enumerate(sets):
        labels[np.asarray(s)] = k
    return reconstruct_labelled([(stack, labels)], len(sets), use_ctf=use_ctf, maxres=maxres, sym_ops=sym_ops,
                                device=device, batch_size=batch_size, progress=progress,
                                gridding_iterations=gridding_iterations, with_union=with_union).maps
