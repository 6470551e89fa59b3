"""MRC maps and particle stacks through ``mrcfile``.

Arrays in memory are ``[z, y, x]`` (stacks ``[n, y, x]``) whatever the file's MAPC/MAPR/MAPS axis order.
Voxel size is cell length / grid size. cryocli writes mode 2 (float32) with the voxel size set, origin 0,
and a label naming the command (no time stamp: the same run writes the same bytes); every write goes to
a temporary name first (``.{name}.XXXXXXXX.tmp`` beside it) and is renamed at the end, so an interrupted
run never leaves a half-written file under the final name.
"""

from __future__ import annotations

import mmap
import os
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import mrcfile
import numpy as np

from cryocli.errors import CryocliError
from cryocli.io.paths import default_file_mode

SUPPORTED_MODES = {0: "int8", 1: "int16", 2: "float32", 4: "complex64", 6: "uint16", 12: "float16"}


@dataclass
class MapData:
    """A 3D map: ``data`` float32 ``(nz, ny, nx)`` in ``[z, y, x]`` order, ``voxel_size`` in Angstrom."""

    data: np.ndarray
    voxel_size: float
    path: str | None = None
    mode: int = 2
    axis_order: tuple[int, int, int] = (1, 2, 3)
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)


def _open(path: str | Path, mmap: bool):
    path = Path(path)
    if not path.exists():
        raise CryocliError("file not found", path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if mmap:
                return mrcfile.mmap(path, mode="r", permissive=True)
            return mrcfile.open(path, mode="r", permissive=True)
    except Exception as exc:  # mrcfile raises ValueError and friends for corrupt headers
        raise CryocliError(f"not a readable MRC file ({exc})", path) from exc


def _axis_order(mrc) -> tuple[int, int, int]:
    h = mrc.header
    return int(h.mapc), int(h.mapr), int(h.maps)


def _to_zyx(data: np.ndarray, order: tuple[int, int, int], path: Path) -> np.ndarray:
    """Reorder a file array (sections, rows, columns) to ``[z, y, x]`` using MAPC/MAPR/MAPS."""
    if order == (1, 2, 3):
        return data
    if sorted(order) != [1, 2, 3]:
        raise CryocliError(f"invalid axis order MAPC/MAPR/MAPS = {order}", path)
    # File axis 0 is sections (axis maps), 1 rows (mapr), 2 columns (mapc); 1=x, 2=y, 3=z.
    file_axis_of = {order[2]: 0, order[1]: 1, order[0]: 2}
    return np.transpose(data, (file_axis_of[3], file_axis_of[2], file_axis_of[1]))


def _voxel_size(mrc, order: tuple[int, int, int]) -> float:
    vs = mrc.voxel_size
    sizes = [float(vs.x), float(vs.y), float(vs.z)]
    return sizes[0]


def read_map(path: str | Path, require_cubic: bool = True) -> MapData:
    """Read a 3D map as float32 ``[z, y, x]`` with its voxel size (Angstrom, from the header).

    Raises :class:`CryocliError` for missing or corrupt files, 2D images, non-cubic grids (when
    ``require_cubic``), unsupported modes and NaN/Inf values.
    """
    path = Path(path)
    with _open(path, mmap=False) as mrc:
        if mrc.data is None:
            raise CryocliError("MRC file holds no readable data (truncated or corrupt)", path)
        mode = int(mrc.header.mode)
        if mode not in SUPPORTED_MODES or mode == 4:
            raise CryocliError(f"unsupported MRC mode {mode} (cryocli reads modes 0, 1, 2, 6, 12)", path)
        order = _axis_order(mrc)
        raw = np.asarray(mrc.data)
        if raw.ndim != 3:
            raise CryocliError(f"expected a 3D map, found a {raw.ndim}D array of shape {raw.shape}", path)
        data = np.ascontiguousarray(_to_zyx(raw, order, path), dtype=np.float32)
        voxel = _voxel_size(mrc, order)
        origin = (float(mrc.header.origin.x), float(mrc.header.origin.y), float(mrc.header.origin.z))
    if require_cubic and len(set(data.shape)) != 1:
        raise CryocliError(f"map is not cubic: grid {data.shape[::-1]} (x, y, z); cryocli needs a cubic box", path)
    if not np.isfinite(data).all():
        raise CryocliError("map contains NaN or Inf values", path)
    return MapData(data=data, voxel_size=voxel, path=str(path), mode=mode, axis_order=order, origin=origin)


@dataclass
class StackInfo:
    """Header facts of a particle stack: ``count`` images of ``box`` x ``box`` pixels."""

    path: str
    count: int
    box: int
    ny: int
    mode: int
    voxel_size: float


def open_stack(path: str | Path):
    """Memory-map a particle stack (.mrcs or .mrc, modes 0/1/2/6/12). Returns the open ``mrcfile`` object.

    ``obj.data`` is ``(count, ny, nx)`` for a stack and ``(ny, nx)`` for a single image; use
    :func:`stack_images` to read a batch as float32 without loading the whole file.
    """
    mrc = _open(path, mmap=True)
    if mrc.data is None:
        # permissive mode hands back a header without data for truncated or corrupt files
        mrc.close()
        raise CryocliError("MRC file holds no readable data (truncated or corrupt)", path)
    mode = int(mrc.header.mode)
    if mode not in SUPPORTED_MODES or mode == 4:
        mrc.close()
        raise CryocliError(f"unsupported MRC mode {mode} for a particle stack", path)
    return mrc


def stack_info(path: str | Path) -> StackInfo:
    """Count, box and mode of a particle stack, read from its header."""
    with open_stack(path) as mrc:
        shape = mrc.data.shape
        count = 1 if len(shape) == 2 else int(shape[0])
        # A 3D .mrc written as a "volume" by some tools is a stack along z (ispg 0 or 1 alike).
        return StackInfo(path=str(path), count=count, box=int(shape[-1]), ny=int(shape[-2]),
                         mode=int(mrc.header.mode), voxel_size=float(mrc.voxel_size.x))


def stack_images(mrc, indices: np.ndarray) -> np.ndarray:
    """Images at 0-based ``indices`` of an open stack, as float32 ``(len(indices), ny, nx)``."""
    data = mrc.data
    if data.ndim == 2:
        data = data[None]
    return np.asarray(data[np.asarray(indices)], dtype=np.float32)


def release_stack_pages(mrc) -> None:
    """Unmap the pages of an open (memory-mapped) stack that reads have touched, so that streaming through a
    stack does not leave it all in this process's resident set. The pages stay in the system's page cache, so
    reading them again costs no disk access; a stack that is not memory-mapped is left alone."""
    mapping = getattr(mrc.data, "_mmap", None)  # numpy.memmap keeps its mmap.mmap here
    if mapping is not None and hasattr(mapping, "madvise"):
        mapping.madvise(mmap.MADV_DONTNEED)


def _label(command: str) -> str:
    """The MRC label: ``cryocli <command>``, without a clock time, so that the same run writes the same bytes."""
    return " ".join(f"cryocli {command}".split())[:80]


def _atomic_write(path: Path, data: np.ndarray, voxel_size: float, label: str, is_stack: bool,
                  notes: Sequence[str] = ()) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with mrcfile.new(tmp, overwrite=True) as mrc:
            mrc.set_data(np.ascontiguousarray(data, dtype=np.float32))
            if is_stack:
                mrc.set_image_stack()
            mrc.voxel_size = float(voxel_size)
            mrc.header.origin = (0.0, 0.0, 0.0)
            mrc.header.nxstart, mrc.header.nystart, mrc.header.nzstart = 0, 0, 0
            mrc.update_header_stats()
            lines = [label, *notes][:10]  # the MRC header holds 10 labels of 80 characters
            for i, line in enumerate(lines):
                mrc.header.label[i] = line.encode("ascii", "replace")[:80]
            mrc.header.nlabl = len(lines)
        os.chmod(tmp, default_file_mode())  # mkstemp makes the file private; give it the umask's permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_map(path: str | Path, data: np.ndarray, voxel_size: float, command: str = "",
              notes: Sequence[str] = ()) -> None:
    """Write a float32 map ``[z, y, x]`` atomically with its voxel size (Angstrom), a label naming ``command``
    and up to nine more ``notes`` labels (80 characters each; e.g. how the map was filtered)."""
    data = np.asarray(data)
    if data.ndim != 3:
        raise ValueError(f"write_map expects a 3D array, got shape {data.shape}")
    _atomic_write(Path(path), data, voxel_size, _label(command), is_stack=False, notes=notes)


def write_stack(path: str | Path, images: np.ndarray, pixel_size: float, command: str = "") -> None:
    """Write a particle stack ``(n, ny, nx)`` (float32, MRC image-stack convention) atomically."""
    images = np.asarray(images)
    if images.ndim == 2:
        images = images[None]
    _atomic_write(Path(path), images, pixel_size, _label(command), is_stack=True)
