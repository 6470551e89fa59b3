"""ParticleStack: lazy, batched access to the particles of a STAR file, wherever their stacks are.

``rlnImageName`` is ``index@path`` (1-based index). Each distinct stack path is resolved once, against
the STAR file's folder, the current directory, the data directory (as given and by bare file name) and
the STAR file's parent folder (RELION writes paths relative to its project folder, which is often the
parent of the folder holding the STAR file, e.g. ``set/noisy/noisy.star`` naming ``noisy/noisy.mrcs``).
Stacks are memory-mapped; a batch reads only its own images, with one read per stack file.
The data directory is remembered on the table (``table.datadir``), so that a STAR file written from it
names the same stacks, relative to the current directory (:func:`cryocli.io.star.write_star`).

Units: pixel size and shifts in Angstrom, box in pixels, rotations are RELION ``A`` matrices.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from cryocli.errors import CryocliError
from cryocli.geometry.rotations import euler_to_matrix
from cryocli.imaging.ctf import CTFParams
from cryocli.io.mrc import MapData, open_stack, release_stack_pages, stack_images, stack_info
from cryocli.io.paths import resolve_stack, star_folder
from cryocli.io.star import ParticleTable, check_pixel_size

MAX_OPEN_STACKS = 128


def resolve_stack_paths(table: ParticleTable, datadir: str | Path | None = None) -> list[dict[str, Any]]:
    """Every distinct stack named in ``rlnImageName``, in order of first use, resolved once.

    Each entry: ``name`` (as written in the STAR file), ``resolved`` (existing :class:`Path` or ``None``),
    ``tried`` (every path looked at, in order) and ``first_particle`` (0-based row of its first particle).
    """
    star_dir = star_folder(table.path)
    folder = datadir if datadir is not None else table.datadir
    folder = Path(folder) if folder is not None else None
    _, names = table.image_names
    codes, uniques = pd.factorize(pd.Series(names, dtype=object), sort=False)
    first = np.unique(codes, return_index=True)[1]
    entries = []
    for code, name in enumerate(uniques):
        found, tried = resolve_stack(str(name), star_dir, folder)
        entries.append({"name": str(name), "resolved": found, "tried": tried, "first_particle": int(first[code])})
    return entries


def half_set_split(count: int, seed: int = 0) -> np.ndarray:
    """A deterministic balanced split of ``count`` particles into half sets 1 and 2, ``(count,)`` int64.

    The split alternates 1, 2, 1, 2... along a permutation drawn with ``numpy.random.default_rng(seed)``, so
    the halves differ in size by at most one particle.
    """
    subset = np.empty(count, dtype=np.int64)
    subset[np.random.default_rng(seed).permutation(count)] = 1 + np.arange(count) % 2
    return subset


@dataclass
class ParticleBatch:
    """One batch of particles on a device.

    indices: ``(B,)`` int64 positions in the stack. images: ``(B, box, box)`` float32. ctf: per-particle
    parameters (float64) or ``None``. rotations: ``(B, 3, 3)`` RELION ``A`` matrices or ``None``.
    shifts_angstrom: ``(B, 2)`` ``[x, y]`` origins in Angstrom or ``None``. subset: ``(B,)`` half set 1/2 or ``None``.
    """

    indices: Tensor
    images: Tensor
    ctf: CTFParams | None
    rotations: Tensor | None
    shifts_angstrom: Tensor | None
    subset: Tensor | None


class ParticleStack:
    """The particles of a :class:`ParticleTable` with their images, read lazily from MRC stacks.

    ``datadir``: an extra folder to look for stacks in (default: ``table.datadir``; a folder given here is
    stored there, for writers). ``allow_box_mismatch``: accept stacks whose box differs from
    ``rlnImageSize`` in the optics table (otherwise :class:`CryocliError`).
    The STAR file's pixel size wins over the stack headers; the header is used only when the table has none.
    """

    def __init__(self, table: ParticleTable, datadir: str | Path | None = None, *,
                 allow_box_mismatch: bool = False) -> None:
        self.table = table
        if datadir is not None:
            self.datadir: Path | None = Path(datadir)
            table.datadir = str(self.datadir.absolute())
        else:
            self.datadir = Path(table.datadir) if table.datadir is not None else None
        local, names = table.image_names
        self._local = local
        self._file_code = pd.factorize(pd.Series(names, dtype=object), sort=False)[0].astype(np.int64)
        self._names = self.table.particles["rlnImageName"].astype(str).to_numpy(dtype=object)
        self._files: list[Path] = []
        self._tried: list[list[Path]] = []
        counts, boxes, rows, voxels = [], [], [], []
        for entry in resolve_stack_paths(table, self.datadir):
            if entry["resolved"] is None:
                self._raise_for_particle(entry["first_particle"], "stack not found", entry["tried"])
            info = stack_info(entry["resolved"])
            self._files.append(entry["resolved"])
            self._tried.append(entry["tried"])
            counts.append(info.count)
            boxes.append(info.box)
            rows.append(info.ny)
            voxels.append(info.voxel_size)
        self._counts = np.asarray(counts, dtype=np.int64)
        self._header_voxel = float(voxels[0])
        past_end = self._local >= self._counts[self._file_code]
        if past_end.any():
            row = int(np.flatnonzero(past_end)[0])
            code = int(self._file_code[row])
            self._raise_for_particle(row, f"image {self._local[row] + 1} is past the end of {self._files[code]} "
                                          f"({self._counts[code]} images)", self._tried[code])
        self._box = self._check_boxes(np.asarray(boxes), np.asarray(rows), allow_box_mismatch)
        self._handles: OrderedDict[int, Any] = OrderedDict()
        # A read-ahead thread (cryocli.io.read_ahead) and the caller may read at once; the handles are shared.
        self._read_lock = threading.Lock()

    # ----- validation ----------------------------------------------------------------------------------
    def _raise_for_particle(self, row: int, problem: str, tried: list[Path]) -> None:
        name = self._names[row]
        paths = ", ".join(str(p) for p in tried)
        raise CryocliError(f"particle {self.table.file_row(row)} (rlnImageName {name}): {problem}; paths tried: {paths}",
                           self.table.path)

    def _check_boxes(self, boxes: np.ndarray, rows: np.ndarray, allow_mismatch: bool) -> int:
        if (boxes != rows).any():
            k = int(np.flatnonzero(boxes != rows)[0])
            raise CryocliError(f"images are not square: {boxes[k]} x {rows[k]} px", self._files[k])
        if (boxes != boxes[0]).any():
            k = int(np.flatnonzero(boxes != boxes[0])[0])
            raise CryocliError(f"stacks have different box sizes: {boxes[0]} px ({self._files[0]}) vs "
                               f"{boxes[k]} px ({self._files[k]})", self.table.path)
        box = int(boxes[0])
        declared = self.table.box_size
        if declared is not None and declared != box and not allow_mismatch:
            raise CryocliError(f"rlnImageSize in the STAR file is {declared} px but the stacks hold {box} px "
                               f"images ({self._files[0]})", self.table.path)
        return box

    # ----- facts ---------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.table)

    @property
    def box(self) -> int:
        """Image side length in pixels (from the stack headers)."""
        return self._box

    @property
    def files(self) -> list[Path]:
        """The resolved stack files, in order of first use."""
        return list(self._files)

    @cached_property
    def pixel_size(self) -> float:
        """The pixel size of every particle in Angstrom (STAR file first, else the stack header).

        Raises :class:`CryocliError` when optics groups differ by more than 0.5% or no pixel size is known.
        """
        if self.table.has_pixel_size:
            return self.table.common_pixel_size()
        if self._header_voxel > 0:
            return self._header_voxel
        raise CryocliError("no pixel size in the STAR file or the stack headers: give the images' pixel size with "
                           "--angpix", self.table.path)

    @cached_property
    def ctf_params(self) -> CTFParams | None:
        """CTF parameters of all particles ``(N,)`` (float64), or ``None`` when the file has no CTF columns."""
        return self.table.ctf_params(require=False)

    @cached_property
    def rotations(self) -> Tensor | None:
        """RELION rotation matrices ``A`` ``(N, 3, 3)`` float32 from rlnAngleRot/Tilt/Psi, or ``None``."""
        angles = self.table.euler_angles
        if angles is None:
            return None
        a = torch.from_numpy(angles)
        return euler_to_matrix(a[:, 0], a[:, 1], a[:, 2]).to(torch.float32)

    @cached_property
    def shifts_angstrom(self) -> Tensor | None:
        """In-plane origins ``(N, 2)`` ``[x, y]`` in Angstrom (float32), or ``None`` when the file has none."""
        if not self.table.has_shifts:
            return None
        return torch.from_numpy(self.table.origins_angstrom).to(torch.float32)

    @property
    def random_subset(self) -> Tensor | None:
        """Half set (1 or 2) of each particle ``(N,)`` int64, or ``None`` without rlnRandomSubset
        (see :meth:`ensure_half_sets`)."""
        values = self.table.random_subset
        if values is None:
            return None
        bad = (values != 1) & (values != 2)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise CryocliError(f"rlnRandomSubset must be 1 or 2, found {values[row]} for particle "
                               f"{self.table.file_row(row)}",
                               self.table.path)
        return torch.from_numpy(values)

    def ensure_half_sets(self, seed: int = 0) -> Tensor:
        """Return the half sets, writing a deterministic balanced split into ``rlnRandomSubset`` if absent.

        The split alternates 1, 2, 1, 2... along a permutation drawn with ``numpy.random.default_rng(seed)``,
        so the halves differ in size by at most one particle.
        """
        existing = self.random_subset
        if existing is not None:
            return existing
        subset = half_set_split(len(self), seed)
        self.table.particles["rlnRandomSubset"] = subset
        return torch.from_numpy(subset.copy())

    # ----- images --------------------------------------------------------------------------------------
    def _handle(self, code: int):
        handle = self._handles.get(code)
        if handle is None:
            handle = open_stack(self._files[code])
            self._handles[code] = handle
            if len(self._handles) > MAX_OPEN_STACKS:
                self._handles.popitem(last=False)[1].close()
        else:
            self._handles.move_to_end(code)
        return handle

    def images(self, indices: Any) -> Tensor:
        """Images of the particles at 0-based ``indices`` as float32 ``(B, box, box)``, in the given order.

        Reads only those images, one fancy-indexed read per stack file. NaN/Inf pixels raise
        :class:`CryocliError` naming the stack. Safe to call from several threads (one read at a time).
        """
        with self._read_lock:
            return self._read_images(indices)

    def _read_images(self, indices: Any) -> Tensor:
        idx = _as_index(indices, len(self))
        out = np.empty((len(idx), self._box, self._box), dtype=np.float32)
        if len(idx) == 0:
            return torch.from_numpy(out)
        codes = self._file_code[idx]
        order = np.argsort(codes, kind="stable")
        starts = np.flatnonzero(np.r_[True, np.diff(codes[order]) != 0])
        for start, stop in zip(starts, np.r_[starts[1:], len(order)], strict=False):
            chosen = order[start:stop]
            code = int(codes[chosen[0]])
            handle = self._handle(code)
            block = stack_images(handle, self._local[idx[chosen]])
            # Streaming must not grow the resident set with the particle count: the images read are copied
            # into ``block``, so their mapped pages can go.
            release_stack_pages(handle)
            if not np.isfinite(block).all():
                bad = chosen[np.flatnonzero(~np.isfinite(block).reshape(len(chosen), -1).all(axis=1))[0]]
                raise CryocliError(f"NaN or Inf pixels in image {self._local[idx[bad]] + 1} "
                                   f"(particle {self.table.file_row(int(idx[bad]))})", self._files[code])
            out[chosen] = block
        return torch.from_numpy(out)

    def batch(self, indices: Any, device: torch.device | str = "cpu") -> ParticleBatch:
        """Images and per-particle parameters of the particles at 0-based ``indices``, on ``device``."""
        idx = _as_index(indices, len(self))
        t = torch.from_numpy(idx)
        subset = self.random_subset
        return ParticleBatch(
            indices=t.to(device),
            images=self.images(idx).to(device),
            ctf=self.ctf_params.index(t).to(device) if self.ctf_params is not None else None,
            rotations=self.rotations[t].to(device) if self.rotations is not None else None,
            shifts_angstrom=self.shifts_angstrom[t].to(device) if self.shifts_angstrom is not None else None,
            subset=subset[t].to(device) if subset is not None else None,
        )

    def iter_batches(self, batch_size: int, indices: Any = None,
                     device: torch.device | str = "cpu") -> Iterator[ParticleBatch]:
        """Consecutive batches of at most ``batch_size`` particles (all particles, or ``indices`` in order)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        order = np.arange(len(self)) if indices is None else _as_index(indices, len(self))
        for start in range(0, len(order), batch_size):
            yield self.batch(order[start:start + batch_size], device)

    def close(self) -> None:
        """Close the memory-mapped stacks (they reopen on the next read)."""
        while self._handles:
            self._handles.popitem()[1].close()

    def __enter__(self) -> ParticleStack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _as_index(indices: Any, n: int) -> np.ndarray:
    """0-based particle positions as an int64 array ``(B,)``; IndexError outside ``[0, n)``."""
    if isinstance(indices, Tensor):
        indices = indices.detach().cpu().numpy()
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    if len(idx) and (idx.min() < 0 or idx.max() >= n):
        raise IndexError(f"particle index out of range [0, {n}): {idx.min()}..{idx.max()}")
    return idx


def check_map_compatible(map_data: MapData, stack: ParticleStack) -> None:
    """Raise :class:`CryocliError` unless the map's box equals the particle box and the voxel size agrees
    with the particle pixel size within 0.5% (both values in the message)."""
    shape = tuple(int(s) for s in map_data.data.shape)
    if shape != (stack.box,) * 3:
        raise CryocliError(f"map grid {shape[2]} x {shape[1]} x {shape[0]} px does not match the particle box "
                           f"{stack.box} px", map_data.path)
    check_pixel_size(stack.pixel_size, map_data.voxel_size, "particles vs map", map_data.path)
