"""Atomic models -> electron-scattering potential: element inference, placement, scale and blur."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import gemmi
import numpy as np
import pytest
import torch

from cryocli.errors import CryocliError
from cryocli.imaging.fourier import shell_index_3d, volume_to_fft
from cryocli.io.models import (VOLT_ANGSTROM2, demo_model_path, infer_element, model_extent, model_potential,
                               read_model, resolution_blur, scattering_centre)
from tests.conftest import MODELS, REPO, need

ADK = MODELS / "4ake_adk_open.pdb"
HVR = MODELS / "1hvr.pdb"

# Free amino acids (neutral), (C, H, N, O, S): textbook chemistry, independent of gemmi and of the file.
AMINO_ACIDS = {
    "GLY": (2, 5, 1, 2, 0), "ALA": (3, 7, 1, 2, 0), "VAL": (5, 11, 1, 2, 0), "LEU": (6, 13, 1, 2, 0),
    "ILE": (6, 13, 1, 2, 0), "PRO": (5, 9, 1, 2, 0), "PHE": (9, 11, 1, 2, 0), "TYR": (9, 11, 1, 3, 0),
    "TRP": (11, 12, 2, 2, 0), "SER": (3, 7, 1, 3, 0), "THR": (4, 9, 1, 3, 0), "CYS": (3, 7, 1, 2, 1),
    "MET": (5, 11, 1, 2, 1), "ASN": (4, 8, 2, 3, 0), "GLN": (5, 10, 2, 3, 0), "ASP": (4, 7, 1, 4, 0),
    "GLU": (5, 9, 1, 4, 0), "LYS": (6, 14, 2, 2, 0), "ARG": (6, 14, 4, 2, 0), "HIS": (6, 9, 3, 2, 0),
    "HSD": (6, 9, 3, 2, 0),  # CHARMM's neutral histidine (H on ND1)
}

# Kirkland's 2 pi a0 e: Bohr radius (A) x e / (4 pi eps0) (V A) -> V A^2, independent of the module's h, m0, e.
KIRKLAND_VA2 = 2 * math.pi * 0.529177210903 * 14.3996454784


def _elements(structure: gemmi.Structure) -> Counter:
    return Counter(cra.atom.element.name for cra in structure[0].all())


def _f0(symbol: str) -> float:
    """Electron scattering factor at s = 0 (Angstrom) from gemmi's International Tables coefficients."""
    return sum(gemmi.Element(symbol).c4322.get_coefs()[:5])


def _expected_charmm_protein(residues: Counter) -> dict[str, int]:
    """Element counts of one CHARMM chain: peptide bonds lose water, NH3+/COO- termini, Lys/Arg +H, Asp/Glu -H."""
    n = sum(residues.values())
    totals = np.sum([np.array(AMINO_ACIDS[name]) * count for name, count in residues.items()], axis=0)
    c, h, n_atoms, o, s = (int(x) for x in totals)
    h += -2 * (n - 1) + 1 - 1 + residues["LYS"] + residues["ARG"] - residues["ASP"] - residues["GLU"]
    return {"C": c, "H": h, "N": n_atoms, "O": o - (n - 1), "S": s}


# --- element inference ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name, residue, het, expected", [
    ("CA", "ALA", False, "C"), (" CA ", "MET", False, "C"), ("CA", "CA", True, "Ca"), ("CA", "CA", False, "C"),
    ("HG", "CYS", False, "H"), ("HG", "HG", True, "Hg"), ("CD", "ILE", False, "C"), ("CD", "CD", True, "Cd"),
    ("1HB", "ALA", False, "H"), ("2HG1", "VAL", False, "H"), ("OT1", "LYS", False, "O"), ("SD", "MET", False, "S"),
    ("SOD", "SOD", False, "Na"), ("CLA", "CLA", False, "Cl"), ("POT", "POT", False, "K"), ("ZN", "ZN", True, "Zn"),
    ("MG", "MG", True, "Mg"), ("SE", "MSE", True, "Se"), ("P", "DA", False, "P"), ("OP1", "DA", False, "O"),
    ("OH2", "TIP3", False, "O"), ("NE2", "GLN", False, "N"), ("XX", "UNK", True, "X"), ("", "ALA", False, "X"),
])
def test_infer_element(name: str, residue: str, het: bool, expected: str) -> None:
    assert infer_element(name, residue, het) == expected


def test_4ake_elements_match_its_sequence() -> None:
    """CHARMM 4AKE has no element column; inferred counts must equal the chemistry of its 214 residues."""
    structure = read_model(need(ADK))
    counts = _elements(structure)
    residues = Counter(residue.name for chain in structure[0] for residue in chain)
    assert sum(residues.values()) == 214
    expected = _expected_charmm_protein(residues)
    assert dict(counts) == expected
    assert expected == {"C": 1040, "H": 1685, "N": 289, "O": 320, "S": 7}
    assert residues["MET"] + residues["CYS"] == expected["S"]
    assert sum(counts.values()) == 3341


def test_bundled_demo_model_is_4ake() -> None:
    path = demo_model_path()
    assert path.read_bytes() == need(ADK).read_bytes()
    assert (REPO / "cryocli" / "data" / "SOURCE.md").read_text().count("4AKE") >= 1
    assert _elements(read_model(path)) == _elements(read_model(ADK))


def _column_elements(path: Path) -> Counter:
    """Element symbols read straight from columns 77-78 of the ATOM/HETATM records."""
    lines = need(path).read_text().splitlines()
    return Counter(gemmi.Element(line[76:78].strip()).name for line in lines if line.startswith(("ATOM", "HETATM")))


def test_1hvr_uses_its_element_column(tmp_path: Path) -> None:
    assert _elements(read_model(HVR)) == _column_elements(HVR)
    # The column wins over the name: relabel Met SD as selenium and the reader must follow.
    lines = need(HVR).read_text().splitlines(keepends=True)
    edited = [line[:76] + "SE" + line[78:] if line.startswith("ATOM") and line[12:16] == " SD " else line
              for line in lines]
    path = tmp_path / "1hvr_se.pdb"
    path.write_text("".join(edited))
    relabelled = sum(1 for line in edited if line.startswith("ATOM") and line[76:78] == "SE")
    counts = _elements(read_model(path))
    assert relabelled == 4  # two Met per protease chain
    assert counts["Se"] == 4 and counts["S"] == _column_elements(HVR)["S"] - 4


def test_mmcif_reads_like_pdb(tmp_path: Path) -> None:
    structure = read_model(HVR)
    cif = tmp_path / "1hvr.cif"
    structure.make_mmcif_document().write_file(str(cif))
    assert _elements(read_model(cif)) == _elements(structure)
    a = model_potential(HVR, 48, 1.5)
    b = model_potential(cif, 48, 1.5)
    assert np.allclose(a, b, atol=1e-5 * a.max())


@pytest.mark.parametrize("text", [None, "", "this is not a model\n", "END\n"])
def test_read_model_errors(tmp_path: Path, text: str | None) -> None:
    path = tmp_path / "bad.pdb"
    if text is not None:
        path.write_text(text)
    with pytest.raises(CryocliError):
        read_model(path)


# --- the potential ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def adk() -> gemmi.Structure:
    return read_model(need(ADK))


def test_4ake_potential_is_positive_centred_and_scaled(adk: gemmi.Structure) -> None:
    n, apix = 64, 1.5
    volume = model_potential(adk, n, apix)
    assert volume.shape == (n, n, n) and volume.dtype == np.float32
    assert volume.min() >= 0 and volume.max() > 10  # volts; protein bright
    total = volume.astype(np.float64).sum()
    centroid = [(np.indices(volume.shape)[axis] * volume).sum() / total for axis in range(3)]
    assert np.allclose(centroid, n // 2, atol=0.5)
    f0 = sum(count * _f0(symbol) for symbol, count in _elements(adk).items())
    assert total * apix**3 == pytest.approx(KIRKLAND_VA2 * f0, rel=5e-3)
    assert VOLT_ANGSTROM2 == pytest.approx(KIRKLAND_VA2, rel=1e-6)


def test_hydrogens_add_their_scattering(adk: gemmi.Structure) -> None:
    """With the model origin fixed on the box centre, hydrogens add f_e(H, 0) each and never subtract."""
    n, apix = 64, 1.5
    with_h = model_potential(adk, n, apix, center=False).astype(np.float64)
    without_h = model_potential(adk, n, apix, center=False, hydrogens=False).astype(np.float64)
    difference = with_h - without_h
    assert difference.min() >= -1e-6 * with_h.max()
    hydrogen_integral = difference.sum() * apix**3
    assert hydrogen_integral == pytest.approx(KIRKLAND_VA2 * 1685 * _f0("H"), rel=1e-2)
    heavy = without_h.sum() * apix**3
    expected_ratio = 1685 * _f0("H") / (1040 * _f0("C") + 289 * _f0("N") + 320 * _f0("O") + 7 * _f0("S"))
    assert hydrogen_integral / heavy == pytest.approx(expected_ratio, rel=1e-2)


def test_waters_are_dropped_unless_kept(tmp_path: Path) -> None:
    """Three crystal waters (HETATM HOH) beside 1HVR, and one CHARMM TIP3 water (ATOM, no element column)."""
    cx, cy, cz = scattering_centre(HVR)
    waters = [f"HETATM{9000 + i:5d}  O   HOH W{i:4d}    {cx + dx:8.3f}{cy + dy:8.3f}{cz + dz:8.3f}  1.00 20.00"
              f"           O  \n" for i, (dx, dy, dz) in enumerate([(1, 2, 3), (-2, 0.5, 1), (0, -3, 2)], start=1)]
    lines = [line for line in need(HVR).read_text().splitlines(keepends=True) if not line.startswith("END")]
    path = tmp_path / "1hvr_waters.pdb"
    path.write_text("".join(lines + waters) + "END\n")
    assert _elements(read_model(path))["O"] == _column_elements(HVR)["O"] + 3
    base = model_potential(HVR, 64, 1.5).astype(np.float64).sum()
    dropped = model_potential(path, 64, 1.5).astype(np.float64).sum()
    kept = model_potential(path, 64, 1.5, keep_waters=True).astype(np.float64).sum()
    assert dropped == pytest.approx(base, rel=1e-6)
    assert (kept - base) * 1.5**3 == pytest.approx(KIRKLAND_VA2 * 3 * _f0("O"), rel=1e-2)

    tip3 = tmp_path / "tip3.pdb"
    tip3.write_text("ATOM      1  N   ALA     1       0.000   0.000   0.000  1.00  0.00      PROT\n"
                    "ATOM      2  OH2 TIP3    2       3.000   0.000   0.000  1.00  0.00      SOLV\n"
                    "ATOM      3  H1  TIP3    2       3.957   0.000   0.000  1.00  0.00      SOLV\n"
                    "ATOM      4  H2  TIP3    2       2.760   0.927   0.000  1.00  0.00      SOLV\n"
                    "END\n")
    assert _elements(read_model(tip3)) == Counter({"N": 1, "O": 1, "H": 2})
    # 4 A blur: a single atom sampled at 1 A/voxel then integrates exactly (no aliasing of its tails).
    only_n = model_potential(tip3, 32, 1.0, resolution=4.0, center=False).astype(np.float64).sum()
    assert only_n == pytest.approx(KIRKLAND_VA2 * _f0("N"), rel=1e-2)


def _direct_sum(positions: np.ndarray, symbols: list[str], n: int, apix: float, origin: np.ndarray,
                b_factor: float) -> np.ndarray:
    """Independent potential (V) ``[z, y, x]``: sum of the 5 Gaussians of each atom at voxel centres."""
    axis = (np.arange(n) - n // 2) * apix
    z, y, x = np.meshgrid(axis + origin[2], axis + origin[1], axis + origin[0], indexing="ij")
    volume = np.zeros((n, n, n))
    for (px, py, pz), symbol in zip(positions, symbols):
        coefs = gemmi.Element(symbol).c4322.get_coefs()
        r2 = (x - px) ** 2 + (y - py) ** 2 + (z - pz) ** 2
        for a, b in zip(coefs[:5], coefs[5:]):
            width = b + b_factor
            volume += a * (4 * math.pi / width) ** 1.5 * np.exp(-4 * math.pi**2 * r2 / width)
    return volume * KIRKLAND_VA2


def test_potential_matches_a_direct_sum_of_gaussians() -> None:
    """First two residues of 4AKE (Met-Arg, hydrogens included) on a 24-px, 1 A box, against numpy."""
    full = read_model(ADK)
    part = gemmi.Structure()
    model = gemmi.Model("1")
    chain = gemmi.Chain("A")
    for residue in list(full[0][0])[:2]:
        chain.add_residue(residue)
    model.add_chain(chain)
    part.add_model(model)
    atoms = [cra.atom for cra in part[0].all()]
    positions = np.array([(a.pos.x, a.pos.y, a.pos.z) for a in atoms])
    symbols = [a.element.name for a in atoms]
    assert len(atoms) == 43 and set(symbols) == {"C", "H", "N", "O", "S"}
    assert all(a.occ == 1.0 for a in atoms)
    weights = np.array([_f0(s) for s in symbols])
    centre = (positions * weights[:, None]).sum(axis=0) / weights.sum()
    assert np.allclose(scattering_centre(part), centre, atol=1e-9)

    n, apix, resolution = 24, 1.0, 2.5
    ours = model_potential(part, n, apix, resolution=resolution)
    reference = _direct_sum(positions, symbols, n, apix, centre, 4 * resolution**2)
    assert resolution_blur(resolution) == 4 * resolution**2
    assert np.abs(ours - reference).max() < 1e-4 * reference.max()


def test_center_false_puts_the_model_origin_on_the_box_centre() -> None:
    structure = gemmi.Structure()
    model = gemmi.Model("1")
    chain = gemmi.Chain("A")
    residue = gemmi.Residue()
    residue.name = "ZN"
    residue.het_flag = "H"
    residue.seqid = gemmi.SeqId(1, " ")
    atom = gemmi.Atom()
    atom.name = "ZN"
    atom.element = gemmi.Element("Zn")
    atom.pos = gemmi.Position(3.0, -2.0, 5.0)
    atom.occ = 1.0
    residue.add_atom(atom)
    chain.add_residue(residue)
    model.add_chain(chain)
    structure.add_model(model)
    n = 32
    volume = model_potential(structure, n, 1.0, center=False)
    assert np.unravel_index(volume.argmax(), volume.shape) == (n // 2 + 5, n // 2 - 2, n // 2 + 3)
    centred = model_potential(structure, n, 1.0)
    assert np.unravel_index(centred.argmax(), centred.shape) == (n // 2,) * 3
    assert model_extent(structure, center=False) == pytest.approx(math.sqrt(38))
    with pytest.raises(CryocliError):
        model_potential(structure, 8, 1.0, center=False)  # z = +5 A is outside a box of 8 x 1 A


def _shell_power(volume: np.ndarray) -> np.ndarray:
    spectrum = volume_to_fft(torch.from_numpy(volume).double())
    shells = shell_index_3d(volume.shape[0])
    inside = shells <= volume.shape[0] // 2
    power = torch.zeros(volume.shape[0] // 2 + 1, dtype=torch.float64)
    power.index_add_(0, shells[inside], spectrum.abs().square()[inside])
    return power.numpy()


def test_resolution_blur_follows_the_gaussian(adk: gemmi.Structure) -> None:
    """Blurring from 3 A to 8 A scales Fourier amplitudes by exp(-(B8 - B3) s^2 / 4), B = 4 d^2."""
    n, apix = 64, 1.5
    sharp = _shell_power(model_potential(adk, n, apix, resolution=3.0))
    blurred = _shell_power(model_potential(adk, n, apix, resolution=8.0))
    s = np.arange(n // 2 + 1) / (n * apix)
    theory = np.exp(-(resolution_blur(8.0) - resolution_blur(3.0)) * s**2 / 4)
    low = s <= 0.25  # below 0.25 1/A; near Nyquist (0.33) sampling aliases both maps
    assert np.allclose(np.sqrt(blurred / sharp)[low], theory[low], rtol=0.03)
    beyond = s > 1 / 8.0
    assert blurred[beyond].sum() < 0.05 * sharp[beyond].sum()


def test_model_that_does_not_fit_is_an_error(adk: gemmi.Structure) -> None:
    radius = model_extent(adk)
    assert radius == pytest.approx(37, abs=1.5)  # PROVENANCE.md: about 37 A from the centroid
    with pytest.raises(CryocliError):
        model_potential(adk, 32, 1.5)  # 48 A box for a 74 A protein
    with pytest.raises(CryocliError):
        model_potential(adk, 64, 1.5, resolution=0.0)


def test_gzipped_charmm_file_still_gets_inferred_elements(tmp_path: Path) -> None:
    import gzip

    path = tmp_path / "adk.pdb.gz"
    path.write_bytes(gzip.compress(need(ADK).read_bytes()))
    assert _elements(read_model(path)) == _elements(read_model(ADK))
