"""Atomic models (PDB, mmCIF) -> electron-scattering potential on a cubic grid, through gemmi.

The potential is gemmi's ``DensityCalculatorE``: each atom is the sum of five Gaussians of the
International Tables (vol. C, table 4.3.2.2) electron scattering factors, summed on the grid and
sampled at the voxel centres. gemmi returns the inverse Fourier transform of the scattering factor
(Angstrom^-2); :data:`VOLT_ANGSTROM2` (h^2 / (2 pi m0 e), Kirkland's 2 pi a0 e) turns it into the
Coulomb potential in volts, so the maps this module returns are in volts and positive where the
protein is.

Placement: voxel ``[k, j, i]`` of the returned ``[z, y, x]`` array is at ``(i, j, k) * apix`` Angstrom
from voxel 0, and the box centre is voxel ``n // 2`` on each axis (the cryocli and RELION centre). An
atom at model position ``p`` (Angstrom, ``(x, y, z)``) lands at voxel ``n // 2 + (p - c) / apix`` with
``c`` the centre of scattering mass (``center=True``) or the model origin ``(0, 0, 0)``
(``center=False``).
"""

from __future__ import annotations

import gzip
import math
from importlib import resources
from pathlib import Path

import gemmi
import numpy as np

from cryocli.errors import CryocliError

# h^2 / (2 pi m0 e) in V * Angstrom^2: V(r) = VOLT_ANGSTROM2 * (inverse FT of f_e)(r), f_e in Angstrom.
_H = 6.62607015e-34
_M0 = 9.1093837015e-31
_E = 1.602176634e-19
VOLT_ANGSTROM2 = _H**2 / (2.0 * math.pi * _M0 * _E) * 1e20

DEMO_MODEL = "4ake_adk_open.pdb"

# Residue names of water in PDB, CHARMM, AMBER and GROMACS files.
WATER_RESIDUES = frozenset({"HOH", "WAT", "H2O", "DOD", "D2O", "TIP", "TIP3", "TIP4", "TIP5", "TP3", "T3P",
                            "T4P", "SPC", "SOL"})

# CHARMM writes monatomic ions as ATOM records whose atom and residue names are these codes.
CHARMM_IONS = {"SOD": "Na", "POT": "K", "CLA": "Cl", "CAL": "Ca", "CES": "Cs", "LIT": "Li", "RUB": "Rb",
               "ZN2": "Zn", "BAR": "Ba", "CD2": "Cd"}

# Elements whose symbol is the first letter of the atom name in protein and nucleic-acid residues.
_ORGANIC = frozenset("CNOSHP")

# gemmi drops density below this (Angstrom^-2); 1e-7 keeps the integral of every atom to < 1e-6 relative.
_CUTOFF = 1e-7


def infer_element(atom_name: str, residue_name: str, is_hetatm: bool) -> str:
    """Element symbol (``"C"``, ``"Ca"``, ... or ``"X"`` when unknown) from an atom's name and residue.

    For files without an element column. Organic atoms take the first letter of the name after
    leading digits (``CA`` -> C, ``1HB`` -> H, ``OT1`` -> O, ``SD`` -> S). A two-letter name is read as
    an element (``CA`` calcium, ``HG`` mercury, ``ZN`` zinc) only for a one-atom HETATM residue of the
    same name; CHARMM ion codes (``SOD``, ``CLA``, ``POT``, ``CAL``...) name their ion in any record.
    """
    name = atom_name.strip().upper()
    residue = residue_name.strip().upper()
    if not name:
        return "X"
    if residue in CHARMM_IONS and name == residue:
        return CHARMM_IONS[residue]
    if is_hetatm and name == residue:
        element = gemmi.Element(name)
        if element.atomic_number > 0:
            return element.name
    if residue == "MSE" and name == "SE":
        return "Se"
    letters = name.lstrip("0123456789")
    if letters and letters[0] in _ORGANIC:
        return letters[0]
    return "X"


def _pdb_has_element_column(path: Path) -> bool:
    """True when any ATOM/HETATM record of a PDB file fills columns 77-78 (the element symbol)."""
    opener = gzip.open if path.suffix.lower() == ".gz" else open
    with opener(path, "rt", errors="replace") as handle:
        for line in handle:
            if line.startswith(("ATOM", "HETATM")) and line[76:78].strip():
                return True
    return False


def _assign_elements(structure: gemmi.Structure, all_atoms: bool) -> None:
    """Set each atom's element from its name: every atom, or only those gemmi left unknown (X)."""
    for model in structure:
        for chain in model:
            for residue in chain:
                hetatm = residue.het_flag == "H"
                for atom in residue:
                    if all_atoms or atom.element.atomic_number == 0:
                        atom.element = gemmi.Element(infer_element(atom.name, residue.name, hetatm))


def read_model(path: str | Path) -> gemmi.Structure:
    """Read a PDB or mmCIF file (optionally gzipped) with gemmi, with elements fixed for CHARMM-style files.

    A PDB file with no element column has every element inferred by :func:`infer_element` (gemmi would
    read ``CA`` as calcium and ``HG`` as mercury); otherwise the file's elements are used and only atoms
    gemmi could not type are inferred. Raises :class:`CryocliError` for a missing or unreadable file
    or a model without atoms.
    """
    path = Path(path)
    if not path.is_file():
        raise CryocliError("atomic model file not found", path)
    try:
        structure = gemmi.read_structure(str(path))
    except (RuntimeError, ValueError, OSError) as exc:
        raise CryocliError(f"cannot read atomic model: {exc}", path) from exc
    structure.remove_empty_chains()
    if len(structure) == 0 or structure[0].count_atom_sites() == 0:
        raise CryocliError("no atoms in the atomic model", path)
    no_column = structure.input_format == gemmi.CoorFormat.Pdb and not _pdb_has_element_column(path)
    _assign_elements(structure, all_atoms=no_column)
    return structure


def demo_model_path() -> Path:
    """Path of the bundled demo model: adenylate kinase, PDB 4AKE, CHARMM style with hydrogens (3,341 atoms)."""
    return Path(str(resources.files("cryocli") / "data" / DEMO_MODEL))


def _as_structure(model: str | Path | gemmi.Structure) -> gemmi.Structure:
    return model if isinstance(model, gemmi.Structure) else read_model(model)


def _is_water(residue: gemmi.Residue) -> bool:
    return residue.name.strip().upper() in WATER_RESIDUES or residue.is_water()


def select_atoms(model: str | Path | gemmi.Structure, hydrogens: bool = True,
                 keep_waters: bool = False) -> gemmi.Structure:
    """A copy of the first model holding the atoms that scatter in a simulation.

    Hydrogens are kept unless ``hydrogens`` is False; waters are dropped unless ``keep_waters`` (the
    particles sit in vitreous ice, which the noise stands for); ligands and ions are kept. Atoms of
    unknown element are dropped. B-factors are zeroed because one resolution-dependent blur replaces
    them (CHARMM files carry 0 for hydrogens; crystal B-factors do not describe a single particle).
    Occupancies are kept as the file gives them, so alternate conformations add up to one atom and
    atoms given occupancy 0 (such as the riding hydrogens of some deposited files) do not scatter.
    """
    structure = _as_structure(model)
    out = gemmi.Structure()
    out.name = structure.name
    first = structure[0].clone()
    for chain in first:
        for r in reversed(range(len(chain))):
            if not keep_waters and _is_water(chain[r]):
                del chain[r]
                continue
            residue = chain[r]
            for a in reversed(range(len(residue))):
                atom = residue[a]
                if atom.element.atomic_number == 0 or (not hydrogens and atom.element.is_hydrogen):
                    del residue[a]
                    continue
                atom.b_iso = 0.0
                atom.aniso = gemmi.SMat33f(0, 0, 0, 0, 0, 0)
    out.add_model(first)
    out.remove_empty_chains()
    return out


def scattering_at_zero(element: gemmi.Element) -> float:
    """Electron scattering factor f_e(s = 0) of an element in Angstrom (sum of its five Gaussian amplitudes)."""
    return float(sum(element.c4322.get_coefs()[:5]))


def _positions_and_weights(structure: gemmi.Structure) -> tuple[np.ndarray, np.ndarray]:
    """Atom positions ``(N, 3)`` (x, y, z) in Angstrom and occupancy x f_e(0) ``(N,)`` in Angstrom."""
    positions, weights = [], []
    f0: dict[str, float] = {}
    for cra in structure[0].all():
        atom = cra.atom
        symbol = atom.element.name
        if symbol not in f0:
            f0[symbol] = scattering_at_zero(atom.element)
        positions.append((atom.pos.x, atom.pos.y, atom.pos.z))
        weights.append(atom.occ * f0[symbol])
    return np.asarray(positions, dtype=np.float64).reshape(-1, 3), np.asarray(weights, dtype=np.float64)


def scattering_centre(model: str | Path | gemmi.Structure, hydrogens: bool = True,
                      keep_waters: bool = False) -> np.ndarray:
    """Centre of scattering mass ``(3,)`` (x, y, z) in Angstrom: atoms weighted by occupancy x f_e(0).

    This is the first moment of the potential, so a map centred on it has its centre of mass on the box
    centre. The atoms are those :func:`select_atoms` keeps.
    """
    positions, weights = _positions_and_weights(select_atoms(model, hydrogens, keep_waters))
    if weights.sum() <= 0:
        raise CryocliError("the atomic model has no scattering atoms left")
    return (positions * weights[:, None]).sum(axis=0) / weights.sum()


def model_extent(model: str | Path | gemmi.Structure, center: bool = True, hydrogens: bool = True,
                 keep_waters: bool = False) -> float:
    """Largest distance (Angstrom) of an atom from the point placed on the box centre.

    That point is the centre of scattering mass (``center=True``) or the model origin. A caller warns
    when this exceeds ``box * apix / 2`` (the particle leaves the inscribed sphere that masks use).
    """
    selected = select_atoms(model, hydrogens, keep_waters)
    positions, _ = _positions_and_weights(selected)
    origin = scattering_centre(selected) if center else np.zeros(3)
    return float(np.sqrt(((positions - origin) ** 2).sum(axis=1)).max())


def resolution_blur(resolution: float) -> float:
    """Isotropic B-factor (Angstrom^2) added to every atom for a map of ``resolution`` Angstrom.

    B = 4 * resolution^2 multiplies the transform by exp(-B s^2 / 4), which is 1/e at s = 1/resolution:
    a Gaussian of standard deviation resolution / (pi sqrt 2), the convention of ChimeraX's molmap.
    """
    return 4.0 * resolution**2


def _check_fits(voxels: np.ndarray, box: int, path_note: str) -> None:
    """Every atom centre (voxel coordinates (N, 3)) must lie inside the box."""
    low, high = voxels.min(axis=0), voxels.max(axis=0)
    if (low < -0.5).any() or (high > box - 0.5).any():
        raise CryocliError(f"the atomic model does not fit in a {box}-voxel box{path_note}: atoms reach voxel "
                           f"coordinates {np.round(low, 1).tolist()} to {np.round(high, 1).tolist()} "
                           f"(x, y, z); use a larger --box or pixel size")


def model_potential(model: str | Path | gemmi.Structure, box: int, apix: float, resolution: float | None = None,
                    center: bool = True, hydrogens: bool = True, keep_waters: bool = False) -> np.ndarray:
    """Electron-scattering potential of an atomic model in volts, float32 ``(box, box, box)`` ``[z, y, x]``.

    ``apix`` is the voxel size in Angstrom; ``resolution`` (Angstrom, default ``2 * apix``) sets the
    Gaussian blur :func:`resolution_blur` that replaces the atoms' B-factors. With ``center=True`` the
    centre of scattering mass sits on voxel ``box // 2``; with ``center=False`` the model origin
    ``(0, 0, 0)`` Angstrom does. Only the first model of a multi-model file is used. Raises
    :class:`CryocliError` when an atom falls outside the box (gemmi's grid is periodic and would wrap it).
    The integral of the map (sum times ``apix**3``) is ``VOLT_ANGSTROM2 * sum(occupancy * f_e(0))``.
    """
    if box < 2 or apix <= 0:
        raise CryocliError(f"invalid grid for an atomic model: box {box} px, {apix} A/px")
    resolution = 2.0 * apix if resolution is None else float(resolution)
    if resolution <= 0:
        raise CryocliError(f"model resolution must be positive, got {resolution} A")
    selected = select_atoms(model, hydrogens, keep_waters)
    positions, _ = _positions_and_weights(selected)
    if len(positions) == 0:
        raise CryocliError("the atomic model has no scattering atoms left")
    origin = scattering_centre(selected) if center else np.zeros(3)
    note = "" if isinstance(model, gemmi.Structure) else f" ({model})"
    _check_fits((positions - origin) / apix + box // 2, box, note)

    calc = gemmi.DensityCalculatorE()
    calc.blur = resolution_blur(resolution)
    calc.cutoff = _CUTOFF
    # A margin as wide as the widest atom keeps gemmi's periodic grid from wrapping density across the box.
    widest = max(calc.estimate_radius(cra.atom) for cra in selected[0].all())
    pad = int(math.ceil(widest / apix)) + 1
    size = box + 2 * pad
    length = size * apix
    shift = (box // 2 + pad) * apix - origin
    transform = gemmi.Transform(gemmi.Mat33(), gemmi.Vec3(*shift))
    selected[0].transform_pos_and_adp(transform)
    calc.grid.set_unit_cell(gemmi.UnitCell(length, length, length, 90, 90, 90))
    calc.grid.spacegroup = gemmi.find_spacegroup_by_name("P 1")
    calc.grid.set_size(size, size, size)
    calc.put_model_density_on_grid(selected[0])
    density = np.array(calc.grid, copy=False)[pad:pad + box, pad:pad + box, pad:pad + box]
    # gemmi's grid is indexed [x, y, z]; cryocli's maps are [z, y, x].
    return np.ascontiguousarray(density.transpose(2, 1, 0) * VOLT_ANGSTROM2, dtype=np.float32)
