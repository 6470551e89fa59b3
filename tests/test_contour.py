"""Contour levels: the threshold encloses the volume asked for, the mass gives the protein's volume."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from cryocli.analysis.contour import (
    PROTEIN_VOLUME_A3_PER_DA,
    contour_level,
    enclosing_level,
    molecular_volume_A3,
    sphere_volume_A3,
)
from cryocli.errors import CryocliError

DEMO_MODEL = Path(__file__).resolve().parents[1] / "cryocli" / "data" / "4ake_adk_open.pdb"
DALTON_G = 1.66053907e-24      # grams per Dalton
CM3_A3 = 1e24                  # A^3 per cm^3


def _soft_ball(n: int, radius: float, width: float) -> tuple[np.ndarray, np.ndarray]:
    """A ball of value 1 falling smoothly to 0 (logistic, ``width`` px) and the distance of each voxel from its
    centre; the centre is off the grid by irrational amounts, so no two voxels share a distance (no ties)."""
    centre = n // 2 + np.array([math.sqrt(2) - 1.5, math.sqrt(3) - 2, math.pi - 3.5])
    z, y, x = np.meshgrid(*(np.arange(n, dtype=np.float64),) * 3, indexing="ij")
    r = np.sqrt((z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2)
    ball = 1.0 / (1.0 + np.exp((r - radius) / width))
    assert np.unique(ball).size == ball.size
    return ball, r


def test_level_of_a_soft_ball_encloses_the_ball() -> None:
    """On a ball of radius R with a smooth edge, the level enclosing 4/3 pi R^3 voxels encloses exactly that
    many voxels and sits at the middle of the edge (0.5): the surface is drawn where the ball ends."""
    apix, radius = 2.0, 12.0
    ball, r = _soft_ball(64, radius, 1.5)
    diameter_A = 2 * radius * apix
    level = enclosing_level(ball, apix, sphere_volume_A3(diameter_A))
    expected_voxels = round(4 / 3 * math.pi * radius ** 3)
    assert int((ball > level).sum()) == expected_voxels
    assert abs(level - 0.5) < 0.02
    # The voxels inside are those within R of the centre, to a voxel's width.
    inside = ball > level
    assert r[inside].max() < radius + 1 and r[~inside].min() > radius - 1
    # The same through contour_level by the diameter, and from a tensor.
    assert contour_level(ball, apix, diameter_A=diameter_A)[0] == level
    assert enclosing_level(torch.from_numpy(ball).float(), apix, sphere_volume_A3(diameter_A)) == pytest.approx(level, abs=1e-6)


def test_level_of_a_blob_of_known_voxel_count() -> None:
    """A binary blob of 1,000 voxels (ties everywhere): the level between 0 and 1 encloses exactly the blob."""
    rng = np.random.default_rng(0)
    blob = np.zeros((32, 32, 32), dtype=np.float32)
    blob.reshape(-1)[rng.choice(blob.size, 1000, replace=False)] = 1.0
    apix = 2.5
    level = enclosing_level(blob, apix, 1000 * apix ** 3)
    assert level == 0.5 and int((blob > level).sum()) == 1000
    # Half a voxel more or less rounds to the same count; the map's maximum encloses nothing.
    assert enclosing_level(blob, apix, 1000.4 * apix ** 3) == 0.5
    assert enclosing_level(blob, apix, 0.2 * apix ** 3) == 1.0


def test_enclosed_volume_follows_the_requested_volume_to_a_voxel() -> None:
    """For any volume asked, the voxels above the level times voxel_size^3 give it to within half a voxel."""
    ball, _ = _soft_ball(48, 10.0, 2.0)
    apix = 1.7
    for volume in (1.0, 5e3, 3.3e4, 1.2e5, 3.9e5):
        level = enclosing_level(ball, apix, volume)
        assert abs(float((ball > level).sum()) * apix ** 3 - volume) <= 0.5 * apix ** 3


def test_impossible_requests_are_refused() -> None:
    ball, _ = _soft_ball(16, 4.0, 1.0)
    with pytest.raises(CryocliError, match="whole map"):
        enclosing_level(ball, 1.0, 16 ** 3)
    with pytest.raises(CryocliError, match="voxel size"):
        enclosing_level(ball, 0.0, 100.0)
    bad = ball.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(CryocliError, match="NaN"):
        enclosing_level(bad, 1.0, 100.0)
    with pytest.raises(CryocliError):
        molecular_volume_A3(0.0)
    with pytest.raises(CryocliError):
        sphere_volume_A3(-3.0)


def test_mass_to_volume_matches_the_standard_values_for_adenylate_kinase() -> None:
    """4AKE (E. coli adenylate kinase): the bundled model's atoms weigh 23.6 kDa (UniProt P69441: 23,586 Da);
    its volume at 1.21 A^3/Da is within 2% of the volume at the protein partial specific volume 0.74 cm^3/g
    (Matthews 1968) and at the density 1.35 g/cm^3 (Chimera, EMAN), and equals Erickson's (2009)
    V = 1.21e-3 nm^3/Da x M."""
    from cryocli.io.models import read_model

    structure = read_model(DEMO_MODEL)
    mass_da = sum(atom.element.weight for residue in structure[0][0] for atom in residue)
    assert mass_da == pytest.approx(23586, rel=0.002)
    volume = molecular_volume_A3(mass_da / 1000)
    assert volume == pytest.approx(mass_da * 0.74 * DALTON_G * CM3_A3, rel=0.02)
    assert volume == pytest.approx(mass_da * DALTON_G / 1.35 * CM3_A3, rel=0.02)
    assert volume == pytest.approx(1.21e-3 * mass_da * 1000, rel=1e-3)   # nm^3 -> A^3
    assert volume == pytest.approx(28_540, rel=0.005)
    assert PROTEIN_VOLUME_A3_PER_DA == pytest.approx(0.73 * DALTON_G * CM3_A3, rel=0.005)


def test_contour_level_by_mass_diameter_and_default() -> None:
    ball, _ = _soft_ball(40, 8.0, 1.0)
    apix = 3.0
    level, how = contour_level(ball, apix, mass_kda=20.0)
    assert level == enclosing_level(ball, apix, 20_000 * 1.21)
    assert how == "mass 20 kDa (24,200 A^3 at 1.21 A^3/Da)"
    # The mass wins over a diameter.
    assert contour_level(ball, apix, mass_kda=20.0, diameter_A=50.0) == (level, how)
    level_d, how_d = contour_level(ball, apix, diameter_A=50.0)
    assert level_d == enclosing_level(ball, apix, math.pi * 50.0 ** 3 / 6)
    assert how_d.startswith("sphere of diameter 50 A, the particle diameter") and "floor" in how_d
    level_0, how_0 = contour_level(ball, apix)
    assert level_0 == enclosing_level(ball, apix, math.pi * (0.8 * 40 * apix) ** 3 / 6)
    assert how_0.startswith("sphere of diameter 96 A, 0.8 x the box, no mass given")
    # More volume enclosed, lower level.
    assert level_0 < level_d < level


def test_mass_level_of_the_4ake_potential_encloses_its_atoms() -> None:
    """On the 4AKE potential map (2 A/px, blurred to 4 A), the level enclosing 23.6 kDa of protein holds most
    of the heavy atoms inside the surface; the default sphere's level is far lower (a floor)."""
    from cryocli.io.models import model_potential, read_model, scattering_centre

    box, apix = 48, 2.0
    volume = model_potential(DEMO_MODEL, box, apix, resolution=4.0, center=True)
    level, _ = contour_level(volume, apix, mass_kda=23.6)
    assert abs(float((volume > level).sum()) * apix ** 3 - molecular_volume_A3(23.6)) <= 0.5 * apix ** 3
    structure = read_model(DEMO_MODEL)
    xyz = np.array([a.pos.tolist() for r in structure[0][0] for a in r if not a.element.is_hydrogen])
    centred = xyz - scattering_centre(DEMO_MODEL)
    idx = np.clip(np.rint(centred[:, ::-1] / apix).astype(int) + box // 2, 0, box - 1)   # [z, y, x]
    inside = volume[idx[:, 0], idx[:, 1], idx[:, 2]] > level
    assert inside.mean() > 0.98, inside.mean()
    assert contour_level(volume, apix)[0] < 0.2 * level


def test_a_sparse_map_gets_chimeraxs_initial_level_not_zero() -> None:
    """A map whose positive density fills less than the sphere (sparse-tv's exact zeros with negative specks,
    a solvent-flattened map with negative solvent) had level 0 or below from the sphere, where ChimeraX wraps
    noise or the solvent. It gets the level enclosing 1% of the grid, positive, and says why. A map without
    negative values keeps level 0, which wraps its support."""
    ball, _ = _soft_ball(40, 6.0, 1.0)
    clean = np.where(ball > 0.05 * ball.max(), ball, 0.0)
    assert (clean > 0).mean() < math.pi * 0.8 ** 3 / 6
    assert contour_level(clean, 3.0)[0] == 0
    specks = np.random.default_rng(0).random(clean.shape) < 0.03
    sparse = np.where((clean == 0) & specks, -0.01, clean)
    level, how = contour_level(sparse, 3.0)
    assert enclosing_level(sparse, 3.0, math.pi * (0.8 * 40 * 3.0) ** 3 / 6) == 0
    assert level > 0 and level == enclosing_level(sparse, 3.0, 0.01 * 40 ** 3 * 27.0)
    assert how.startswith("1% of the grid, ChimeraX's initial level") and "not above 0" in how
    flattened = clean - 0.01 * (clean == 0)
    level_f, how_f = contour_level(flattened, 3.0, diameter_A=100.0)
    assert level_f > 0 and "the particle diameter" in how_f
