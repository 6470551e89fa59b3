"""A contour level for a map: the density threshold that encloses the volume of the molecule.

This is the number a user types into ChimeraX's ``volume #1 level X`` (or Chimera's Volume Viewer): the
surface drawn at ``X`` encloses every voxel whose value is above ``X``, so the level that encloses the
particle's molecular volume draws the particle at its true size.

The molecular volume comes from the mass (``mass_kda``): a protein occupies
:data:`PROTEIN_VOLUME_A3_PER_DA` = 1.21 A^3 per Dalton, from the usual partial specific volume of proteins,
0.73 cm^3/g (1 Da = 1.66054e-24 g and 1 cm^3 = 1e24 A^3, so 0.73 cm^3/g = 0.73 x 1.66054 = 1.212 A^3/Da;
Erickson 2009, Biol. Proced. Online 11:32, "V (nm^3) = 1.21e-3 x M (Da)"). The other values in use are
within 2%: 0.74 cm^3/g gives 1.229 A^3/Da, and a density of 1.35 g/cm^3 (Chimera's and EMAN's default)
1.230 A^3/Da. Nucleic acids are denser (about 0.55 cm^3/g, 0.91 A^3/Da): for a nucleoprotein the level from
the total mass encloses too much, so it is a little low.

Without a mass, a diameter gives a sphere (``diameter_A``, or 0.8 x the box when nothing is given): the
level enclosing the sphere's volume. That volume is the molecule's only for a spherical, solid particle;
for any other shape the smallest sphere around the particle is several times its volume (4x for adenylate
kinase, 4AKE: 28,600 A^3 of protein, 62 A between its farthest atoms, a sphere of 123,000 A^3), so a level from a
diameter encloses too much: it is a floor for the level, a surface drawn larger than the molecule, labelled
as such (:func:`contour_level`'s second value). Give the mass for the level to use.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from cryocli.errors import CryocliError

PROTEIN_VOLUME_A3_PER_DA = 1.21
"""Molecular volume of protein per unit mass in A^3/Da: partial specific volume 0.73 cm^3/g (Erickson 2009)."""

DEFAULT_DIAMETER_FRACTION = 0.8
"""Without a mass or a diameter, the particle is taken to fill a sphere of this fraction of the box."""

CHIMERAX_ENCLOSED_FRACTION = 0.01
"""Share of the grid ChimeraX's initial contour level encloses; the level used when a sphere's is not above 0."""


def molecular_volume_A3(mass_kda: float) -> float:
    """Volume in A^3 of a protein of ``mass_kda`` kDa: mass x 1.21 A^3/Da (:data:`PROTEIN_VOLUME_A3_PER_DA`)."""
    if not (math.isfinite(mass_kda) and mass_kda > 0):
        raise CryocliError(f"a mass of {mass_kda:g} kDa: must be a positive number")
    return float(mass_kda) * 1000.0 * PROTEIN_VOLUME_A3_PER_DA


def sphere_volume_A3(diameter_A: float) -> float:
    """Volume in A^3 of a sphere of diameter ``diameter_A`` A: pi d^3 / 6."""
    if not (math.isfinite(diameter_A) and diameter_A > 0):
        raise CryocliError(f"a diameter of {diameter_A:g} A: must be a positive number")
    return math.pi * float(diameter_A) ** 3 / 6.0


def _as_array(volume: np.ndarray | Tensor) -> np.ndarray:
    if isinstance(volume, Tensor):
        return volume.detach().to(device="cpu", dtype=torch.float64).numpy()
    return np.asarray(volume, dtype=np.float64)


def enclosing_level(volume: np.ndarray | Tensor, voxel_size: float, enclosed_A3: float) -> float:
    """The density threshold above which ``enclosed_A3`` A^3 of the map lie.

    ``volume`` is a 3-D map (``(n, n, n)``, any shape works) with voxels of ``voxel_size`` A. The number of
    voxels to enclose is ``k = round(enclosed_A3 / voxel_size^3)``; the level is halfway between the k-th
    and the (k+1)-th largest values, so exactly ``k`` voxels lie above it (fewer where those two values are
    equal: a map with plateaus cannot be cut between equal voxels). ``k = 0`` gives the map's maximum.
    Raises :class:`CryocliError` when the volume to enclose is the whole map or more, or the map is not
    finite.
    """
    data = _as_array(volume).reshape(-1)
    if data.size == 0 or not np.isfinite(data).all():
        raise CryocliError("the map is empty or holds NaN or Inf values: no contour level")
    if not (math.isfinite(voxel_size) and voxel_size > 0):
        raise CryocliError(f"voxel size {voxel_size:g} A: must be a positive number for a contour level")
    voxel_A3 = float(voxel_size) ** 3
    k = int(round(enclosed_A3 / voxel_A3))
    if k < 0:
        raise CryocliError(f"cannot enclose a negative volume ({enclosed_A3:g} A^3)")
    if k >= data.size:
        raise CryocliError(f"{enclosed_A3:,.0f} A^3 to enclose is at least the whole map ({data.size * voxel_A3:,.0f} A^3): "
                           "no contour level encloses it")
    if k == 0:
        return float(data.max())
    n = data.size
    # Ascending order: the k largest values sit at n-k..n-1; the (k+1)-th largest at n-k-1.
    part = np.partition(data, (n - k - 1, n - k))
    below, above = float(part[n - k - 1]), float(part[n - k])
    return below + 0.5 * (above - below)


def contour_level(volume: np.ndarray | Tensor, voxel_size: float, mass_kda: float | None = None,
                  diameter_A: float | None = None) -> tuple[float, str]:
    """The contour level of ``volume`` and how it was chosen: ``(level, how)``.

    By the mass when given (``how`` = ``"mass 23.6 kDa (28,556 A^3 at 1.21 A^3/Da)"``), else by a sphere of
    ``diameter_A`` A, else by a sphere of 0.8 x the box (its smallest edge). A sphere's level encloses
    the whole sphere, more than any non-spherical molecule inside it: ``how`` says it is a floor for the
    level (see the module's text). When that level is below 0, or 0 in a map with negative values (a
    solvent-flattened or sparse map), the level enclosing 1% of the grid, as ChimeraX opens a map, and ``how``
    says why. The mass wins when both
    are given.
    """
    if mass_kda is not None:
        enclosed = molecular_volume_A3(mass_kda)
        how = f"mass {mass_kda:g} kDa ({enclosed:,.0f} A^3 at {PROTEIN_VOLUME_A3_PER_DA:g} A^3/Da)"
        return enclosing_level(volume, voxel_size, enclosed), how
    if diameter_A is None:
        box = min(int(s) for s in _shape(volume))
        diameter_A = DEFAULT_DIAMETER_FRACTION * box * voxel_size
        where = f"{DEFAULT_DIAMETER_FRACTION:g} x the box, no mass given"
    else:
        where = "the particle diameter"
    enclosed = sphere_volume_A3(diameter_A)
    level = enclosing_level(volume, voxel_size, enclosed)
    # Level 0 on a map without negative values (a clean potential) wraps its support: a floor, drawn. With
    # negative values (noise) a level of 0 or below wraps noise, and a lower one the solvent.
    if level > 0 or (level == 0 and float(_as_array(volume).min()) >= 0):
        how = (f"sphere of diameter {diameter_A:.4g} A, {where} ({enclosed:,.0f} A^3): a floor for the level, "
               "as a molecule fills less than its sphere")
        return level, how
    # A solvent-flattened or sparse map (a soft-masked viewing map, sparse-tv's zeros) holds less positive
    # density than the sphere.
    grid = _as_array(volume).size * float(voxel_size) ** 3
    fallback = enclosing_level(volume, voxel_size, CHIMERAX_ENCLOSED_FRACTION * grid)
    how = (f"{100 * CHIMERAX_ENCLOSED_FRACTION:g}% of the grid, ChimeraX's initial level: the sphere of diameter "
           f"{diameter_A:.4g} A ({where}) gives {level:.4g}, not above 0, as the map is solvent-flattened or "
           "sparse; give the mass for the level enclosing the molecule")
    return fallback, how


def _shape(volume: np.ndarray | Tensor) -> tuple[int, ...]:
    return tuple(int(s) for s in volume.shape)
