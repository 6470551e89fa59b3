"""MRC maps and particle stacks through ``mrcfile``.

Arrays in memory are ``[z, y, x]`` (stacks ``[n, y, x]``) whatever the file's MAPC/MAPR/MAPS axis order.
Voxel size is cell length / grid size. cryocli writes mode 2 (float32) with the voxel size set, origin 0,
and a label naming the command (no time stamp: the same run writes the same bytes); every write goes to
a temporary name first (``.{name}.XXXXXXXX.tmp`` beside it) and is renamed at the end, so an interrupted
run never leaves a half-written file under the final name.
"""

from __future__ import annotations

import math
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
#: Modes cryocli reads as real values (mode 4, complex, is known to mrcfile but is no density).
READ_MODES = (0, 1, 2, 6, 12)
#: File names that say "an MRC file" (maps, stacks, IMOD's tilt series and aligned stacks).
MRC_SUFFIXES = frozenset({".mrc", ".mrcs", ".map", ".st", ".ali"})
#: RELION's name for a particle stack: a 3D grid in such a file is images, whatever its header says.
STACK_SUFFIXES = frozenset({".mrcs"})


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
    if path.is_dir():
        raise CryocliError("is a directory, not an MRC file", path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if mmap:
                return mrcfile.mmap(path, mode="r", permissive=True)
            return mrcfile.open(path, mode="r", permissive=True)
    except Exception as exc:  # mrcfile raises ValueError and friends for corrupt headers
        if not _named_mrc(path):
            raise _not_mrc(path) from exc
        raise CryocliError(f"not a readable MRC file ({exc})", path) from exc


def _named_mrc(path: Path) -> bool:
    return path.suffix.lower() in MRC_SUFFIXES


def _not_mrc(path: Path) -> CryocliError:
    """The error for a file that is not MRC and is not named as one (a text file, say): calling it a corrupt MRC
    file would send the user looking for damage that is not there."""
    suffix = path.suffix or "no extension"
    return CryocliError(f"not an MRC file (its name ends in {suffix}, not .mrc, .mrcs, .map or .st, and it has no "
                        "valid MRC header)", path)


def _check_data(mrc, path: str | Path) -> None:
    """Refuse a file whose header mrcfile could not match with data (truncated, corrupt, not MRC at all) or whose
    grid is empty (a valid header of 0 x 0 x 0 voxels: nothing to summarise, filter or compare)."""
    path = Path(path)
    if mrc.data is None:
        # permissive mode hands back a header without data for truncated or corrupt files
        if not _named_mrc(path):
            raise _not_mrc(path)
        raise CryocliError("MRC file holds no readable data (truncated or corrupt)", path)
    if mrc.data.size == 0:
        h = mrc.header
        raise CryocliError(f"MRC file holds no data (its header gives a grid of {int(h.nx)} x {int(h.ny)} x "
                           f"{int(h.nz)} voxels)", path)


def check_mode(mrc, path: str | Path, what: str) -> None:
    """Refuse a mode cryocli does not read as real values; ``what`` names what the file was read as (``a map``,
    ``a particle stack``), so that the message fits the command."""
    mode = int(mrc.header.mode)
    if mode not in SUPPORTED_MODES or mode == 4:
        kind = " (complex values)" if mode in (3, 4) else ""
        raise CryocliError(f"unsupported MRC mode {mode}{kind} for {what} (cryocli reads modes "
                           f"{', '.join(map(str, READ_MODES))})", path)


def open_mrc(path: str | Path):
    """Memory-map any MRC file with data (a map, a stack or an image) without checking its mode; the caller
    calls :func:`check_mode` once it knows what the file holds. Returns the open ``mrcfile`` object."""
    mrc = _open(path, mmap=True)
    try:
        _check_data(mrc, path)
    except CryocliError:
        mrc.close()
        raise
    return mrc


def grid_kind(mrc, path: str | Path) -> str:
    """What an MRC file holds: ``"map"`` (a 3D volume), ``"stack"`` (2D images along z) or ``"image"`` (one).

    mrcfile's ``is_image_stack()`` looks at the space group (ISPG) alone, but RELION and ChimeraX write 3D maps
    with ISPG 0 and tell them from stacks by MZ, the sampling along z: a volume has MZ = NZ, a stack (MRC2014)
    MZ = 1. ASPIRE writes stacks as .mrcs with ISPG 1 and MZ = NZ, so the name comes first. The rule:

    1. a name ending in .mrcs: a stack (RELION's convention for particle stacks);
    2. NZ = 1: a single image;
    3. an axis order MAPC,R,S other than 1,2,3: a map (stacks are never stored with their axes swapped, and MZ
       then counts along z, not along the sections NZ counts, so rule 4 cannot be read);
    4. ISPG 0 with MZ != NZ (MZ = 1 by MRC2014, or any sampling that does not span the z extent): a stack;
    5. anything else (MZ = NZ > 1, or a crystallographic space group such as 1): a map.
    """
    h = mrc.header
    nz, mz, ispg = int(h.nz), int(h.mz), int(h.ispg)
    if Path(path).suffix.lower() in STACK_SUFFIXES:
        return "stack"
    if nz == 1 or mrc.data.ndim == 2:
        return "image"
    if axis_order(mrc) != (1, 2, 3):
        return "map"
    if ispg == 0 and mz != nz:
        return "stack"
    return "map"


def axis_order(mrc) -> tuple[int, int, int]:
    """MAPC, MAPR, MAPS: which of x (1), y (2), z (3) the file's columns, rows and sections run along."""
    h = mrc.header
    return int(h.mapc), int(h.mapr), int(h.maps)


def to_zyx(data: np.ndarray, order: tuple[int, int, int], path: Path) -> np.ndarray:
    """Reorder a file array (sections, rows, columns) to ``[z, y, x]`` using MAPC/MAPR/MAPS."""
    if order == (1, 2, 3):
        return data
    if sorted(order) != [1, 2, 3]:
        raise CryocliError(f"invalid axis order MAPC/MAPR/MAPS = {order}", path)
    # File axis 0 is sections (axis maps), 1 rows (mapr), 2 columns (mapc); 1=x, 2=y, 3=z.
    file_axis_of = {order[2]: 0, order[1]: 1, order[0]: 2}
    return np.transpose(data, (file_axis_of[3], file_axis_of[2], file_axis_of[1]))


def voxel_sizes(mrc) -> tuple[float, float, float]:
    """Voxel size along x, y and z in Angstrom (cell length / sampling MX, MY, MZ, as mrcfile computes it), 0 where
    the header gives none: a cell of 0 gives 0, and a sampling of 0 (a header-only file) would give NaN."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # mrcfile divides by MX, MY, MZ and warns when they are 0
        vs = mrc.voxel_size
        sizes = (float(vs.x), float(vs.y), float(vs.z))
    return tuple(v if math.isfinite(v) and v > 0 else 0.0 for v in sizes)  # type: ignore[return-value]


def read_map(path: str | Path, require_cubic: bool = True) -> MapData:
    """Read a 3D map as float32 ``[z, y, x]`` with its voxel size (Angstrom, from the header).

    Raises :class:`CryocliError` for missing or corrupt files, 2D images, non-cubic grids (when
    ``require_cubic``), unsupported modes and NaN/Inf values.
    """
    path = Path(path)
    # mrcfile warns (RuntimeWarning and its own) about odd headers while reading: the checks below say what
    # matters in one line, so its warnings never reach the user.
    with warnings.catch_warnings(), _open(path, mmap=False) as mrc:
        warnings.simplefilter("ignore")
        _check_data(mrc, path)
        check_mode(mrc, path, "a map")
        mode = int(mrc.header.mode)
        order = axis_order(mrc)
        raw = np.asarray(mrc.data)
        if raw.ndim != 3:
            raise CryocliError(f"expected a 3D map, found a {raw.ndim}D array of shape {raw.shape}", path)
        data = np.ascontiguousarray(to_zyx(raw, order, path), dtype=np.float32)
        voxel = voxel_sizes(mrc)[0]
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
    mrc = open_mrc(path)
    try:
        check_mode(mrc, path, "a particle stack")
    except CryocliError:
        mrc.close()
        raise
    return mrc


def stack_info(path: str | Path) -> StackInfo:
    """Count, box and mode of a particle stack, read from its header."""
    with open_stack(path) as mrc:
        shape = mrc.data.shape
        count = 1 if len(shape) == 2 else int(shape[0])
        # A 3D .mrc written as a "volume" by some tools is a stack along z (ispg 0 or 1 alike).
        return StackInfo(path=str(path), count=count, box=int(shape[-1]), ny=int(shape[-2]),
                         mode=int(mrc.header.mode), voxel_size=voxel_sizes(mrc)[0])


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
