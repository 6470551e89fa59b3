"""A volume on a requested grid, from either an atomic model or an MRC map.

Used by ``simulate`` (and anywhere a user may give "a model or a map"). Maps are resampled in Fourier
space to the requested pixel size, then cropped or zero-padded in real space to the requested box,
keeping the centre voxel ``n // 2`` fixed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from cryocli.errors import CryocliError
from cryocli.imaging.fourier import fourier_resample_volume
from cryocli.io.mrc import read_map
from cryocli.io.star import check_pixel_size

MODEL_SUFFIXES = (".pdb", ".ent", ".cif", ".mmcif", ".pdb.gz", ".cif.gz", ".ent.gz", ".mmcif.gz")


def is_atomic_model(path: str | Path) -> bool:
    """True for PDB/mmCIF file names."""
    return str(path).lower().endswith(MODEL_SUFFIXES)


def crop_or_pad(volume: np.ndarray, box: int) -> np.ndarray:
    """Real-space crop or zero-pad of a cubic volume to ``box``, keeping voxel ``n // 2`` at ``box // 2``."""
    n = volume.shape[0]
    out = np.zeros((box, box, box), dtype=np.float32)
    m = min(n, box)
    s, d = n // 2 - m // 2, box // 2 - m // 2
    out[d:d + m, d:d + m, d:d + m] = volume[s:s + m, s:s + m, s:s + m]
    return out


MODEL_BOX = 128
MODEL_APIX = 0.8


def map_grid(voxel_size: float, map_box: int, box: int | None, apix: float | None) -> tuple[int, float]:
    """The grid (box in px, pixel size in A) to simulate a map of ``map_box`` voxels of ``voxel_size`` A on.

    What the user left out comes from the map itself, so that by default the map's own grid is used
    and, when only ``apix`` is given, its field of view is kept (box rounded to an even number, as
    RELION's boxes are). Resampling a map to an arbitrary default grid would crop or blur it.
    """
    if apix is None:
        # The header stores float32: 4.4 reads back as 4.400000095, which the STAR file should not carry.
        apix = voxel_size = float(str(np.float32(voxel_size)))
    if box is None:
        box = map_box if apix == voxel_size else max(8, 2 * int(round(map_box * voxel_size / apix / 2)))
    return box, apix


def resample_map(data: np.ndarray, voxel_size: float, box: int, apix: float,
                 path: str | Path | None = None) -> tuple[np.ndarray, float]:
    """A map of voxel size ``voxel_size`` (A) resampled to ``apix`` (A) in Fourier space and fitted to ``box`` px.

    Returns the volume ``(box, box, box)`` float32 and the fraction of the resampled map's squared
    density that lies outside the box (0 when the box holds the whole map), so a caller can say that
    the map was cropped.
    """
    n0 = data.shape[0]
    if voxel_size <= 0:
        raise CryocliError("map has no voxel size in its header", path)
    n1 = max(2, int(round(n0 * voxel_size / apix)))
    check_pixel_size(voxel_size * n0 / n1, apix, f"resampling the {n0}-voxel map of {voxel_size:g} A/voxel on "
                     f"the nearest grid ({n1} voxels) vs the requested pixel size", path)
    resampled = fourier_resample_volume(torch.from_numpy(np.array(data, dtype=np.float64)), n1).numpy()
    volume = crop_or_pad(resampled.astype(np.float32), box)
    total = float(np.square(resampled).sum())
    kept = float(np.square(volume, dtype=np.float64).sum())
    outside = max(0.0, 1.0 - kept / total) if total > 0 else 0.0
    return volume, outside


def load_volume(path: str | Path, box: int | None = None, apix: float | None = None, resolution: float | None = None,
                center: bool = True) -> tuple[np.ndarray, dict[str, Any]]:
    """The volume ``(box, box, box)`` float32 ``[z, y, x]`` at ``apix`` A/voxel from a model or a map.

    Atomic models become gemmi electron-scattering potentials blurred to ``resolution`` A (default
    2 x apix) and centred on their centre of mass unless ``center`` is False; ``box`` and ``apix``
    default to 128 px and 0.8 A. A map keeps its own grid for what is left out (:func:`map_grid`); a map
    whose header gives no voxel size is taken to have ``apix``, which must then be given.
    Returns the volume and a dictionary describing where it came from, with the ``box`` and ``apix``
    used; for a map also ``map_fraction_outside_box``, the share of its squared density cropped away.
    """
    path = Path(path)
    if not path.exists():
        raise CryocliError("file not found", path)
    if is_atomic_model(path):
        from cryocli.io.models import model_potential

        box, apix = box or MODEL_BOX, apix or MODEL_APIX
        res = resolution if resolution is not None else 2.0 * apix
        volume = model_potential(path, box, apix, resolution=res, center=center)
        return volume.astype(np.float32), {"source": "atomic model", "model_resolution_A": res, "box": box,
                                           "apix": apix}
    m = read_map(path)
    voxel_size = m.voxel_size
    if voxel_size <= 0:
        # ASPIRE and cryoDRGN write maps with a cell of 0: the user's pixel size is then the map's own.
        if apix is None:
            raise CryocliError("map has no voxel size in its header: give it with --apix", path)
        voxel_size = apix
    map_box = int(m.data.shape[0])
    box, apix = map_grid(voxel_size, map_box, box, apix)
    volume, outside = resample_map(m.data, voxel_size, box, apix, path)
    return volume, {"source": "map", "map_voxel_size_A": voxel_size, "map_box": map_box, "box": box, "apix": apix,
                    "map_fraction_outside_box": outside, "map_voxel_size_from": "header" if m.voxel_size > 0 else "--apix"}
