"""RELION STAR particle files <-> :class:`ParticleTable`.

Reads RELION 3.0 files (one particle table with per-particle optics columns; origins ``rlnOriginX/Y`` in
pixels) and 3.1+ files (``data_optics`` + ``data_particles`` in any order, ``# version 30001`` or
``50001``; origins ``rlnOriginX/YAngst`` in Angstrom) through the ``starfile`` package. Writes the 3.1+
form. Every column cryocli does not interpret is carried through unchanged: values are kept as parsed and,
for unchanged numbers, the file's own text (``2.586789e+05`` stays ``2.586789e+05``) is written back.
New or changed numbers are written with the shortest text that reads back to the same float64.

Units: pixel sizes and origins in Angstrom (3.0 origins in pixels), angles in degrees, defocus in Angstrom,
voltage in kV, Cs in mm.
"""

from __future__ import annotations

import linecache
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import starfile

from cryocli.errors import CryocliError
from cryocli.imaging.ctf import CTFParams
from cryocli.io.paths import atomic_write_text, relion_image_path, resolve_stack, star_folder

# Labels that live in data_optics in 3.1+ files and per particle in 3.0 files.
OPTICS_LABELS = (
    "rlnOpticsGroupName", "rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast", "rlnImagePixelSize",
    "rlnPixelSize", "rlnMagnification", "rlnDetectorPixelSize", "rlnImageSize", "rlnImageDimensionality",
    "rlnCtfDataAreCtfPremultiplied", "rlnBeamTiltX", "rlnBeamTiltY", "rlnMicrographOriginalPixelSize",
    "rlnMtfFileName", "rlnOddZernike", "rlnEvenZernike", "rlnMagMat00", "rlnMagMat01", "rlnMagMat10",
    "rlnMagMat11",
)

# Labels RELION defines as numbers; a text value in one of them is an error, not a string column.
NUMERIC_LABELS = frozenset({
    "rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginX", "rlnOriginY", "rlnOriginXAngst",
    "rlnOriginYAngst", "rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnVoltage", "rlnSphericalAberration",
    "rlnAmplitudeContrast", "rlnPhaseShift", "rlnCtfBfactor", "rlnCtfScalefactor", "rlnImagePixelSize",
    "rlnPixelSize", "rlnMagnification", "rlnDetectorPixelSize", "rlnImageSize", "rlnImageDimensionality",
    "rlnOpticsGroup", "rlnRandomSubset", "rlnClassNumber", "rlnCoordinateX", "rlnCoordinateY", "rlnGroupNumber",
    "rlnNormCorrection", "rlnMicrographOriginalPixelSize", "rlnBeamTiltX", "rlnBeamTiltY",
    "rlnCtfDataAreCtfPremultiplied", "rlnMagMat00", "rlnMagMat01", "rlnMagMat10", "rlnMagMat11",
    "rlnCtfMaxResolution", "rlnCtfFigureOfMerit", "rlnLogLikeliContribution", "rlnMaxValueProbDistribution",
    "rlnNrOfSignificantSamples", "rlnAutopickFigureOfMerit",
})

# A loop holding at least one of these is a particle table (model, FSC, MTF and sampling tables hold none).
PARTICLE_MARKERS = ("rlnImageName", "rlnMicrographName", "rlnCoordinateX", "rlnDefocusU", "rlnAnglePsi",
                    "rlnOriginX", "rlnOriginXAngst", "rlnOpticsGroup")

#: The error for a particle table without ``rlnImageName`` where images are needed.
NO_IMAGE_NAMES = "no rlnImageName column: the STAR file does not say where the images are"
PIXEL_SIZE_TOLERANCE = 0.005
WRITE_VERSION = "30001"
_VERSION_RE = re.compile(r"^\s*#\s*version\s+(\d+)", re.MULTILINE)
_COLUMN_RE = re.compile(r"^\s*_(\S+)", re.MULTILINE)
_TOKEN_RE = re.compile(r'"[^"]*"|\'[^\']*\'|\S+')


def check_pixel_size(a: float, b: float, what: str, path: str | Path | None = None) -> None:
    """Raise :class:`CryocliError` when pixel sizes ``a`` and ``b`` (Angstrom) differ by more than 0.5%.

    The difference is taken relative to the smaller of the two, so the test is symmetric. ``what`` names
    the two things compared (e.g. ``"map vs particles"``) and appears in the message with both values.
    """
    a, b = float(a), float(b)
    if not (np.isfinite(a) and np.isfinite(b) and a > 0 and b > 0):
        raise CryocliError(f"{what}: invalid pixel size ({a:g} A vs {b:g} A)", path)
    if abs(a - b) > PIXEL_SIZE_TOLERANCE * min(a, b):
        raise CryocliError(f"{what}: pixel sizes differ by more than 0.5%: {a:.6g} A vs {b:.6g} A", path)


@dataclass(frozen=True)
class SourceStamp:
    """The file a table was read from (and its size and modification time then), so that a writer can
    fetch the file's own text of unchanged values as long as the file has not changed since."""

    path: str
    block: str
    mtime_ns: int
    size: int

    @staticmethod
    def of(path: Path, block: str) -> SourceStamp:
        """The stamp of ``path`` as it is now."""
        stat = path.stat()
        return SourceStamp(str(path), block, stat.st_mtime_ns, stat.st_size)

    def text_frames(self) -> dict[str, pd.DataFrame]:
        """The particle (``"particles"``) and optics (``"optics"``) loops as text; empty if the file changed."""
        path = Path(self.path)
        try:
            if SourceStamp.of(path, self.block) != self:
                return {}
            blocks = _parse_blocks(path, read_star_text(path), as_text=True)
        except (OSError, CryocliError):
            return {}
        frames = {"particles": _as_frame(blocks.get(self.block)), "optics": _as_frame(blocks.get("optics"))}
        return {k: v for k, v in frames.items() if v is not None}


@dataclass
class ParticleTable:
    """The particles of a RELION STAR file and their optics groups.

    ``particles``: one row per particle, the file's columns in the file's order (index = 0-based position
    in the file; kept by :meth:`subset`). ``optics``: one row per optics group (``rlnOpticsGroup``,
    ``rlnOpticsGroupName`` and optics columns); for 3.0 files it is built from the unique per-particle
    optics values. ``version``: ``"3.0"``, ``"3.1"`` or ``"5.0"`` as read from the header comment (or,
    without one, from the presence of ``data_optics``). ``optics_in_file``: whether ``data_optics``
    existed (otherwise the per-particle columns are the source of optics values). ``particle_block``: the
    block the particles came from. ``source``: the file read, used by :func:`write_star` to keep the
    original text of unchanged values. ``datadir``: the extra folder the stacks were looked up in
    (set by :class:`~cryocli.io.dataset.ParticleStack`), so that :func:`write_star` finds them again.
    """

    particles: pd.DataFrame
    optics: pd.DataFrame
    version: str
    path: str | None = None
    optics_in_file: bool = True
    particle_block: str = "particles"
    source: SourceStamp | None = field(default=None, repr=False, compare=False)
    datadir: str | None = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.particles)

    # ----- optics per particle -------------------------------------------------------------------------
    def file_row(self, position: int) -> int:
        """The 1-based row in the file (the particle number users see) of the particle at ``position``."""
        return _row_label(self.particles, position)

    def group_rows(self) -> np.ndarray:
        """Row of ``optics`` that applies to each particle, ``(N,)`` int."""
        if not self.optics_in_file:
            return _legacy_optics(self.particles)[1]
        groups = self.optics["rlnOpticsGroup"].to_numpy()
        if "rlnOpticsGroup" not in self.particles.columns:
            if len(groups) != 1:
                raise CryocliError(
                    f"particles have no rlnOpticsGroup but data_optics defines {len(groups)} groups", self.path)
            return np.zeros(len(self.particles), dtype=np.int64)
        rows = pd.Index(groups).get_indexer(self.particles["rlnOpticsGroup"].to_numpy())
        if (rows < 0).any():
            first = int(np.flatnonzero(rows < 0)[0])
            raise CryocliError(f"particle {self.file_row(first)} refers to optics group "
                               f"{self.particles['rlnOpticsGroup'].iloc[first]}, absent from data_optics "
                               f"(groups: {', '.join(map(str, groups))})", self.path)
        return rows

    def optics_per_particle(self) -> pd.DataFrame:
        """The particle table with each particle's optics-group values merged in (optics columns win).

        Same row order and index as ``particles``; for 3.0 files ``rlnOpticsGroup`` is the synthesised group
        and ``rlnImagePixelSize`` is derived when the file only gives magnification and detector pixel.
        """
        rows = self.group_rows()
        merged = self.particles.copy()
        per_group = self.optics.iloc[rows]
        for column in self.optics.columns:
            merged[column] = per_group[column].to_numpy()
        return merged

    def _per_particle(self, label: str) -> np.ndarray | None:
        """Values of ``label`` for every particle, from data_optics first, then the particle table."""
        if label in self.optics.columns and (self.optics_in_file or label not in self.particles.columns):
            return self.optics[label].to_numpy()[self.group_rows()]
        if label in self.particles.columns:
            return self.particles[label].to_numpy()
        return None

    # ----- derived accessors ---------------------------------------------------------------------------
    @property
    def has_pixel_size(self) -> bool:
        """Whether the file gives a pixel size (directly or through magnification and detector pixel)."""
        return _pixel_size_or_none(self) is not None

    @property
    def pixel_size(self) -> np.ndarray:
        """Pixel size of each particle's images in Angstrom, ``(N,)`` float64.

        From ``rlnImagePixelSize``, else ``rlnPixelSize``, else ``1e4 * rlnDetectorPixelSize /
        rlnMagnification`` (detector pixel in micrometres). Raises :class:`CryocliError` when none is given.
        """
        values = _pixel_size_or_none(self)
        if values is None:
            raise CryocliError("no pixel size in the STAR file (needs rlnImagePixelSize, rlnPixelSize or "
                               "rlnMagnification with rlnDetectorPixelSize)", self.path)
        valid = np.isfinite(values) & (values > 0)
        if not valid.all():
            first = int(np.flatnonzero(~valid)[0])
            raise CryocliError(f"particle {self.file_row(first)}: pixel size {values[first]:g} A is not positive", self.path)
        return values

    def common_pixel_size(self) -> float:
        """The one pixel size (Angstrom) of all particles; :class:`CryocliError` if groups differ by > 0.5%."""
        values = self.pixel_size
        low, high = float(values.min()), float(values.max())
        check_pixel_size(low, high, "optics groups", self.path)
        return float(values[0])

    def with_pixel_size(self, angpix: float) -> ParticleTable:
        """This table with ``angpix`` (Angstrom) as the pixel size of every optics group (``rlnImagePixelSize``),
        for a file that gives none, as ``relion_reconstruct --angpix`` supplies it. A file that gives one is
        returned as it is when it agrees within 0.5%, and refused when it does not: a pixel size given twice
        must be one pixel size."""
        if self.has_pixel_size:
            check_pixel_size(self.common_pixel_size(), angpix, "the STAR file's pixel size vs --angpix", self.path)
            return self
        if not (np.isfinite(angpix) and angpix > 0):
            raise CryocliError(f"--angpix {angpix:g}: a pixel size must be a positive number of Angstrom", self.path)
        return replace(self, optics=self.optics.assign(rlnImagePixelSize=float(angpix)))

    @property
    def has_shifts(self) -> bool:
        """Whether the file gives in-plane origins (``rlnOriginX/YAngst`` or 3.0 ``rlnOriginX/Y``)."""
        cols = self.particles.columns
        return ("rlnOriginXAngst" in cols and "rlnOriginYAngst" in cols) or ("rlnOriginX" in cols and
                                                                              "rlnOriginY" in cols)

    @property
    def origins_angstrom(self) -> np.ndarray:
        """In-plane origins ``(N, 2)`` ``[x, y]`` in Angstrom (3.0 pixel origins times the pixel size; zeros
        when the file has none). The particle centre sits at box centre minus origin (RELION's sign)."""
        cols = self.particles.columns
        if "rlnOriginXAngst" in cols and "rlnOriginYAngst" in cols:
            return self.particles[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy(dtype=np.float64, copy=True)
        if "rlnOriginX" in cols and "rlnOriginY" in cols:
            pixels = self.particles[["rlnOriginX", "rlnOriginY"]].to_numpy(dtype=np.float64)
            return pixels * self.pixel_size[:, None]
        return np.zeros((len(self), 2), dtype=np.float64)

    @property
    def has_poses(self) -> bool:
        """Whether all three Euler angles ``rlnAngleRot/Tilt/Psi`` are present."""
        return all(c in self.particles.columns for c in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"))

    @property
    def euler_angles(self) -> np.ndarray | None:
        """RELION Euler angles ``(N, 3)`` ``[rot, tilt, psi]`` in degrees, or ``None`` when absent."""
        if not self.has_poses:
            return None
        return self.particles[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy(dtype=np.float64, copy=True)

    @property
    def has_ctf(self) -> bool:
        """Whether the particles carry CTF parameters (``rlnDefocusU``)."""
        return "rlnDefocusU" in self.particles.columns

    def ctf_params(self, require: bool = True) -> CTFParams | None:
        """Per-particle CTF parameters as float64 tensors of shape ``(N,)``.

        Defocus in Angstrom, angles in degrees, voltage in kV, Cs in mm. Missing ``rlnDefocusV`` equals
        ``rlnDefocusU``; missing angle, phase shift and B-factor are 0, missing scale 1. Without
        ``rlnDefocusU`` returns ``None``, or raises when ``require``. Missing voltage, Cs or amplitude
        contrast always raises :class:`CryocliError` naming the column.
        """
        if not self.has_ctf:
            if require:
                raise CryocliError("the particles have no CTF parameters (rlnDefocusU is missing); pass --no-ctf to "
                                   "reconstruct without CTF correction", self.path)
            return None
        required = {}
        for label in ("rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast"):
            values = self._per_particle(label)
            if values is None:
                raise CryocliError(f"{label} is missing: cannot build the CTF (use --no-ctf to ignore the CTF)",
                                   self.path)
            required[label] = values.astype(np.float64)
        q0 = required["rlnAmplitudeContrast"]
        if ((q0 < 0) | (q0 >= 1)).any():
            raise CryocliError(f"rlnAmplitudeContrast must be in [0, 1), found {q0[(q0 < 0) | (q0 >= 1)][0]:g}",
                               self.path)
        if (required["rlnVoltage"] <= 0).any():
            raise CryocliError("rlnVoltage must be positive (kV)", self.path)

        def optional(label: str, default: float | np.ndarray) -> np.ndarray:
            values = self._per_particle(label)
            if values is None:
                return np.full(len(self), default, dtype=np.float64)
            return values.astype(np.float64)

        du = self.particles["rlnDefocusU"].to_numpy(dtype=np.float64, copy=True)
        return CTFParams.build(
            defocus_u=du, defocus_v=optional("rlnDefocusV", du), defocus_angle=optional("rlnDefocusAngle", 0.0),
            voltage=required["rlnVoltage"], cs=required["rlnSphericalAberration"], amplitude_contrast=q0,
            phase_shift=optional("rlnPhaseShift", 0.0), bfactor=optional("rlnCtfBfactor", 0.0),
            scale=optional("rlnCtfScalefactor", 1.0))

    @property
    def box_size(self) -> int | None:
        """``rlnImageSize`` in pixels, or ``None`` when the file does not give it (the stack decides)."""
        values = self._per_particle("rlnImageSize")
        if values is None:
            return None
        unique = np.unique(values.astype(np.int64))
        if len(unique) > 1:
            raise CryocliError(f"optics groups have different image sizes: {', '.join(map(str, unique))} px",
                               self.path)
        return int(unique[0])

    @property
    def image_names(self) -> tuple[np.ndarray, list[str]]:
        """``rlnImageName`` split into 0-based image indices ``(N,)`` int64 and stack paths (as written).

        ``000012@Extract/stack.mrcs`` is image 11 of ``Extract/stack.mrcs``; a name without ``@`` is a
        single-image file (index 0).
        """
        if "rlnImageName" not in self.particles.columns:
            raise CryocliError(NO_IMAGE_NAMES, self.path)
        names = self.particles["rlnImageName"].astype(str)
        parts = names.str.partition("@")
        left, sep, right = parts[0], parts[1], parts[2]
        has_at = (sep == "@").to_numpy()
        index_text = np.where(has_at, left.to_numpy(dtype=object), "1")
        paths = np.where(has_at, right.to_numpy(dtype=object), names.to_numpy(dtype=object))
        numbers = pd.to_numeric(pd.Series(index_text), errors="coerce").to_numpy(dtype=np.float64)
        bad = ~np.isfinite(numbers) | (numbers < 1) | (numbers != np.round(numbers)) | (paths == "")
        if bad.any():
            first = int(np.flatnonzero(bad)[0])
            raise CryocliError(f"particle {self.file_row(first)}: bad rlnImageName '{names.iloc[first]}' "
                               "(expected index@path with a 1-based index)", self.path)
        return numbers.astype(np.int64) - 1, [str(p) for p in paths]

    @property
    def random_subset(self) -> np.ndarray | None:
        """``rlnRandomSubset`` (half-set 1 or 2) per particle ``(N,)`` int64, or ``None`` when absent."""
        if "rlnRandomSubset" not in self.particles.columns:
            return None
        return self.particles["rlnRandomSubset"].to_numpy(dtype=np.int64, copy=True)

    # ----- new tables ----------------------------------------------------------------------------------
    def with_poses(self, rot: Any, tilt: Any, psi: Any, origins_angstrom: Any,
                   extra_columns: Mapping[str, Any] | None = None) -> ParticleTable:
        """A copy with new poses in RELION 3.1 columns.

        ``rot``, ``tilt``, ``psi``: ``(N,)`` degrees; ``origins_angstrom``: ``(N, 2)`` ``[x, y]`` Angstrom.
        Existing columns are overwritten in place, new ones appended; 3.0 ``rlnOriginX/Y`` (pixels) are
        removed. ``extra_columns`` maps further column names to ``(N,)`` values (e.g. ``rlnMaxValueProbDistribution``).
        """
        n = len(self)
        origins = _as_numpy(origins_angstrom, np.float64)
        if origins.shape != (n, 2):
            raise ValueError(f"origins_angstrom must have shape ({n}, 2), got {origins.shape}")
        columns: dict[str, np.ndarray] = {
            "rlnAngleRot": _as_numpy(rot, np.float64), "rlnAngleTilt": _as_numpy(tilt, np.float64),
            "rlnAnglePsi": _as_numpy(psi, np.float64), "rlnOriginXAngst": origins[:, 0],
            "rlnOriginYAngst": origins[:, 1],
        }
        for name, values in (extra_columns or {}).items():
            columns[name] = _as_numpy(values, None)
        particles = self.particles.drop(columns=[c for c in ("rlnOriginX", "rlnOriginY")
                                                 if c in self.particles.columns])
        for name, values in columns.items():
            if values.shape != (n,):
                raise ValueError(f"column {name} must have shape ({n},), got {values.shape}")
            particles[name] = values
        return replace(self, particles=particles)

    def subset(self, mask_or_indices: Any) -> ParticleTable:
        """A copy with only the selected particles: a boolean mask ``(N,)`` or 0-based positions, in order."""
        selector = _as_numpy(mask_or_indices, None)
        if selector.dtype == bool:
            if selector.shape != (len(self),):
                raise ValueError(f"mask must have shape ({len(self)},), got {selector.shape}")
            selector = np.flatnonzero(selector)
        particles = self.particles.iloc[selector.astype(np.int64)]
        optics = self.optics if self.optics_in_file else _legacy_optics(particles)[0]
        return replace(self, particles=particles, optics=optics)


def _as_numpy(values: Any, dtype: Any) -> np.ndarray:
    """Arrays, lists and torch tensors (any device) as a numpy array."""
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=dtype)


def _pixel_size_or_none(table: ParticleTable) -> np.ndarray | None:
    for label in ("rlnImagePixelSize", "rlnPixelSize"):
        values = table._per_particle(label)
        if values is not None:
            return values.astype(np.float64)
    magnification = table._per_particle("rlnMagnification")
    detector = table._per_particle("rlnDetectorPixelSize")
    if magnification is not None and detector is not None:
        with np.errstate(divide="ignore", invalid="ignore"):
            return 1e4 * detector.astype(np.float64) / magnification.astype(np.float64)
    return None


def _legacy_optics(particles: pd.DataFrame) -> tuple[pd.DataFrame, np.ndarray]:
    """Optics groups of a table without data_optics: one group per unique combination of optics values.

    Returns the optics table (``rlnOpticsGroup``, ``rlnOpticsGroupName``, the optics columns found, and
    ``rlnImagePixelSize`` derived from 3.0 columns when needed) and the optics row of each particle ``(N,)``.
    Existing ``rlnOpticsGroup`` numbers are kept when they label the combinations one to one.
    """
    keys = [c for c in particles.columns if c in OPTICS_LABELS and c != "rlnOpticsGroupName"]
    has_groups = "rlnOpticsGroup" in particles.columns
    by = keys + (["rlnOpticsGroup"] if has_groups else [])
    if by and len(particles):
        rows = particles.groupby(by, sort=False, dropna=False).ngroup().to_numpy(dtype=np.int64)
    else:
        rows = np.zeros(len(particles), dtype=np.int64)
    _, first = np.unique(rows, return_index=True)
    optics = particles.iloc[first][keys].reset_index(drop=True)
    numbers = np.arange(1, len(first) + 1)
    if has_groups:
        given = particles["rlnOpticsGroup"].to_numpy()[first]
        if len(np.unique(given)) == len(given):
            numbers = given
    optics.insert(0, "rlnOpticsGroup", numbers)
    optics.insert(1, "rlnOpticsGroupName", [f"opticsGroup{n}" for n in numbers])
    if "rlnImagePixelSize" not in optics.columns:
        if "rlnPixelSize" in optics.columns:
            optics["rlnImagePixelSize"] = optics["rlnPixelSize"].to_numpy(dtype=np.float64)
        elif "rlnMagnification" in optics.columns and "rlnDetectorPixelSize" in optics.columns:
            with np.errstate(divide="ignore", invalid="ignore"):
                optics["rlnImagePixelSize"] = (1e4 * optics["rlnDetectorPixelSize"].to_numpy(dtype=np.float64)
                                               / optics["rlnMagnification"].to_numpy(dtype=np.float64))
    return optics, rows


# ----- reading ---------------------------------------------------------------------------------------------
def read_star(path: str | Path, require_images: bool = False) -> ParticleTable:
    """Read a RELION particle STAR file (3.0, 3.1 or 5.0) into a :class:`ParticleTable`.

    Raises :class:`CryocliError` (with the file name) for a missing or unreadable file, a file without a
    particle table, an empty table, text in numeric RELION columns, NaN/Inf values, particles that refer to
    optics groups absent from data_optics, and (with ``require_images``) a missing ``rlnImageName``.
    """
    path = Path(path)
    stamp = SourceStamp.of(path, "") if path.is_file() else None
    text = read_star_text(path)
    blocks = _parse_blocks(path, text, as_text=False)
    name, particles = _find_particle_block(blocks, path)
    refuse_ragged_rows(text, (particles, blocks.get("optics")), path)
    validate_frame(particles, f"data_{name}", path)
    if len(particles) == 0:
        raise CryocliError(f"the particle table data_{name} is empty", path)
    if require_images and "rlnImageName" not in particles.columns:
        raise CryocliError(NO_IMAGE_NAMES, path)
    optics = _as_frame(blocks.get("optics"))
    version = star_version(text, optics is not None)
    source = replace(stamp, block=name) if stamp is not None else None
    if optics is not None:
        validate_frame(optics, "data_optics", path)
        check_optics(optics, path)
        table = ParticleTable(particles, optics, version, str(path), True, name, source)
    else:
        table = ParticleTable(particles, _legacy_optics(particles)[0], version, str(path), False, name, source)
    table.group_rows()  # raises for particles whose optics group is unknown
    return table


def read_star_text(path: str | Path) -> str:
    """The text of a STAR file; CryocliError when it is missing, binary, not UTF-8 or has no data_ block."""
    path = Path(path)
    if not path.exists():
        raise CryocliError("file not found", path)
    if not path.is_file():
        raise CryocliError("not a file", path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise CryocliError(f"cannot read file ({exc.strerror})", path) from exc
    if b"\x00" in raw:
        raise CryocliError("not a STAR file (binary content)", path)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CryocliError("not a STAR file (not UTF-8 text)", path) from exc
    if not re.search(r"^\s*data_", text, re.MULTILINE):
        raise CryocliError("not a STAR file (no data_ block)", path)
    return text


def _parse_blocks(path: Path, text: str, as_text: bool) -> dict[str, Any]:
    """All blocks of the file through ``starfile``: numbers parsed, or (``as_text``) every value as written."""
    names = sorted(set(_COLUMN_RE.findall(text))) if as_text else []
    linecache.clearcache()  # starfile reads lines through linecache; never see a stale copy of this file
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            blocks = starfile.read(path, always_dict=True, parse_as_string=names)
    except Exception as exc:  # starfile and pandas raise many types (ParserError, TypeError, ValueError...)
        raise unreadable_star(exc, path, text) from exc
    finally:
        linecache.clearcache()
    if not isinstance(blocks, dict):
        raise CryocliError("not a readable STAR file", path)
    return blocks


def unreadable_star(exc: Exception, path: Path, text: str | None = None) -> CryocliError:
    """The error for a file the STAR parser (``starfile``, pandas) could not read: the loop row whose number of
    values does not match its labels when ``text`` has one (the usual cause), else the parser's complaint."""
    ragged = ragged_row(text) if text is not None else None
    lines = str(exc).strip().splitlines()
    detail = ragged or f"{type(exc).__name__}: {lines[0][:200] if lines else ''}"
    return CryocliError(f"not a readable STAR file ({detail})", path)


def ragged_row(text: str) -> str | None:
    """Where a loop row has a different number of values than the loop has labels (``line 20 of data_x has 5
    values for 4 columns``), or None. Quoted values count as one, as in the STAR format."""
    block, labels, in_rows = "", 0, False
    for number, line in enumerate(text.splitlines(), start=1):
        word = line.strip()
        if not word or word.startswith("#"):
            continue
        if word.startswith("data_") or word.startswith("loop_"):
            block = word.split()[0] if word.startswith("data_") else block
            labels, in_rows = 0, word.startswith("loop_")
        elif word.startswith("_"):
            labels += 1 if in_rows else 0
        elif in_rows and labels and len(_TOKEN_RE.findall(word)) != labels:
            return f"line {number} of {block} has {len(_TOKEN_RE.findall(word))} values for {labels} columns"
    return None


def refuse_ragged_rows(text: str, frames: Iterable[Any], path: Path) -> None:
    """Refuse a loop row with too few values. pandas pads such a row with NaN, which would be reported as a NaN in
    some column; the file holds no NaN, so name the short row instead. The text is scanned only when a frame
    holds a missing value, so well-formed files cost nothing."""
    if not any(isinstance(f, pd.DataFrame) and f.isna().to_numpy().any() for f in frames):
        return
    ragged = ragged_row(text)
    if ragged is not None:
        raise CryocliError(f"not a readable STAR file ({ragged})", path)


def _as_frame(block: Any) -> pd.DataFrame | None:
    """A loop as it is, a key-value block as a one-row loop, anything else ``None``."""
    if isinstance(block, dict) and block:
        return pd.DataFrame([block])
    return block if isinstance(block, pd.DataFrame) else None


def _find_particle_block(blocks: Mapping[str, Any], path: Path) -> tuple[str, pd.DataFrame]:
    """The particle loop: ``data_particles``, else the first loop with ``rlnImageName``, else the first
    loop with any particle column. Key-value blocks count as one-row loops."""
    frames = {name: _as_frame(block) for name, block in blocks.items() if name != "optics"}
    tables = {name: frame for name, frame in frames.items() if frame is not None}
    if "particles" in tables:
        return "particles", tables["particles"]
    for name, table in tables.items():
        if "rlnImageName" in table.columns:
            return name, table
    for name, table in tables.items():
        if any(c in table.columns for c in PARTICLE_MARKERS):
            return name, table
    found = ", ".join(f"data_{n}" for n in blocks) or "none"
    raise CryocliError(f"no particle table in this STAR file (blocks: {found})", path)


def validate_frame(frame: pd.DataFrame, block: str, path: Path) -> None:
    """Refuse duplicated columns, text in RELION's numeric columns and NaN/Inf in any numeric column."""
    duplicated = frame.columns[frame.columns.duplicated()]
    if len(duplicated):
        raise CryocliError(f"column {duplicated[0]} appears twice in {block}", path)
    for position, column in enumerate(frame.columns):
        values = frame.iloc[:, position]
        if not pd.api.types.is_numeric_dtype(values):
            if column in NUMERIC_LABELS:
                coerced = pd.to_numeric(values, errors="coerce")
                bad = np.flatnonzero((coerced.isna() & values.notna()).to_numpy())
                first = int(bad[0]) if len(bad) else 0
                raise CryocliError(f"column {column} in {block}: non-numeric value '{values.iloc[first]}' "
                                   f"in row {_row_label(frame, first)}", path)
            continue
        if pd.api.types.is_bool_dtype(values):
            continue
        finite = np.isfinite(values.to_numpy(dtype=np.float64))
        if not finite.all():
            first = int(np.flatnonzero(~finite)[0])
            raise CryocliError(f"column {column} in {block}: NaN or Inf value in row {_row_label(frame, first)}", path)


def _row_label(frame: pd.DataFrame, position: int) -> int:
    """1-based row in the file of ``frame``'s row at ``position`` (its index, when that is the file's rows)."""
    label = frame.index[position]
    return int(label) + 1 if isinstance(label, (int, np.integer)) else position + 1


def check_optics(optics: pd.DataFrame, path: Path) -> None:
    if len(optics) == 0:
        raise CryocliError("data_optics has no optics group", path)
    if "rlnOpticsGroup" not in optics.columns:
        raise CryocliError("data_optics has no rlnOpticsGroup column", path)
    groups = optics["rlnOpticsGroup"]
    if groups.duplicated().any():
        raise CryocliError(f"data_optics lists optics group {groups[groups.duplicated()].iloc[0]} twice", path)


def star_version(text: str, has_optics: bool) -> str:
    match = _VERSION_RE.search(text)
    if match:
        number = int(match.group(1))
        if number >= 50000:
            return "5.0"
        if number >= 30001:
            return "3.1"
    return "3.1" if has_optics else "3.0"


# ----- writing ---------------------------------------------------------------------------------------------
def write_star(table: ParticleTable, path: str | Path, *, datadir: str | Path | None = None,
               rebase_images: bool = True) -> None:
    """Write ``table`` atomically as a RELION 3.1+ STAR file (``# version 30001``, data_optics, data_particles).

    Particle order and every column are kept. A table read from a 3.0 file gets an optics table built from
    its per-particle optics columns (which leave the particle table), ``rlnOpticsGroup`` per particle, and
    pixel origins ``rlnOriginX/Y`` converted to ``rlnOriginX/YAngst`` (Angstrom). Unchanged numbers are written
    with their original text, others with the shortest text that reads back to the same float64.

    Image names are written as RELION writes them, relative to the current directory (absolute for stacks
    outside it): for a table read from a file (``table.path`` set), each stack named in ``rlnImageName`` is
    found as the reader finds it (the table's STAR folder, the current directory, ``datadir`` or else the
    ``datadir`` the table's stacks were opened with, the STAR folder's parent) and renamed
    :func:`~cryocli.io.paths.relion_image_path` of that file (see :func:`image_names_from_cwd`), so the new
    file reads from this directory whichever folder it is written to. Stacks that are not found keep their
    name. ``rebase_images=False`` writes the names as they are in the table.
    """
    path = Path(path)
    if rebase_images and table.path is not None and "rlnImageName" in table.particles.columns:
        names = image_names_from_cwd(table, datadir)
        if names is not None:
            particles = table.particles.copy()
            particles["rlnImageName"] = names
            table = replace(table, particles=particles)
    optics, particles = _relion31_tables(table)
    texts = table.source.text_frames() if table.source is not None else {}
    source_particles = texts.get("particles")
    source_optics = texts.get("optics") if table.optics_in_file else _legacy_optics_text(table, source_particles)
    parts = [
        _format_block("optics", optics, source_optics, path),
        _format_block("particles", particles, source_particles, path),
    ]
    atomic_write_text(path, "".join(parts))


def image_names_from_cwd(table: ParticleTable, datadir: str | Path | None = None) -> np.ndarray | None:
    """``rlnImageName`` of every particle with its stack named from the current directory, as RELION does.

    Each distinct stack path (the part after ``@``, or the whole name of a single-image file) is resolved
    once, in the reader's order (:func:`~cryocli.io.paths.resolve_stack`: the STAR folder of
    ``table.path``, the current directory, ``datadir`` (else ``table.datadir``), the STAR folder's parent)
    and renamed :func:`~cryocli.io.paths.relion_image_path` of the file found; stacks not found keep their
    name, and the image index keeps its text (``000012@``). The file system is asked once per stack, never
    per particle; per particle there are only a split, a factorisation and a join (about 1 s for 10^6
    particles). Returns an object array ``(N,)``, or ``None`` when no name changes.
    """
    if "rlnImageName" not in table.particles.columns or len(table.particles) == 0:
        return None
    folder = datadir if datadir is not None else table.datadir
    search = Path(folder) if folder is not None else None
    star_dir = star_folder(table.path)
    names = table.particles["rlnImageName"].astype(str).to_numpy(dtype=object)
    # "000012@stack.mrcs" -> "stack.mrcs"; a name without "@" is all path (find gives -1).
    codes, uniques = pd.factorize(np.array([name[name.find("@") + 1:] for name in names], dtype=object),
                                  sort=False)
    renamed = np.empty(len(uniques), dtype=object)
    for k, stack in enumerate(uniques):
        found = resolve_stack(str(stack), star_dir, search)[0] if stack else None
        renamed[k] = relion_image_path(found) if found is not None else stack
    if (renamed == np.asarray(uniques, dtype=object)).all():
        return None
    heads = np.array([name[:name.find("@") + 1] for name in names], dtype=object)  # "000012@" or ""
    return heads + renamed[codes]


def _legacy_optics_text(table: ParticleTable, source: pd.DataFrame | None) -> pd.DataFrame | None:
    """File text of the optics values of a 3.0 table: that of the first particle of each group."""
    if source is None:
        return None
    rows = _legacy_optics(table.particles)[1]
    first = np.unique(rows, return_index=True)[1]
    labels = table.particles.index[first]
    if not labels.isin(source.index).all():
        return None
    keys = [c for c in source.columns if c in OPTICS_LABELS]
    return source.loc[labels, keys].reset_index(drop=True)


def _relion31_tables(table: ParticleTable) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The optics and particle tables in 3.1 form (3.0 per-particle optics moved into the optics table)."""
    particles = table.particles.copy()
    if table.optics_in_file:
        optics = table.optics
        if "rlnOpticsGroup" not in particles.columns:
            particles["rlnOpticsGroup"] = np.full(len(particles), optics["rlnOpticsGroup"].iloc[0])
    else:
        optics, rows = _legacy_optics(particles)
        particles = particles.drop(columns=[c for c in particles.columns if c in OPTICS_LABELS])
        particles["rlnOpticsGroup"] = optics["rlnOpticsGroup"].to_numpy()[rows]
    if "rlnOriginXAngst" not in particles.columns and "rlnOriginX" in particles.columns:
        angstrom = table.origins_angstrom
        for axis, (old, new) in enumerate((("rlnOriginX", "rlnOriginXAngst"), ("rlnOriginY", "rlnOriginYAngst"))):
            if old in particles.columns:
                position = particles.columns.get_loc(old)
                particles = particles.drop(columns=[old])
                particles.insert(position, new, angstrom[:, axis])
    return optics, particles


def _format_block(name: str, frame: pd.DataFrame, source: pd.DataFrame | None, path: Path) -> str:
    header = [f"\n# version {WRITE_VERSION}\n", f"\ndata_{name}\n", "\nloop_\n"]
    header += [f"_{column} #{i}\n" for i, column in enumerate(frame.columns, start=1)]
    if len(frame) == 0 or len(frame.columns) == 0:
        return "".join(header) + "\n"
    usable = source is not None and frame.index.is_unique and frame.index.isin(source.index).all()
    texts = [_format_column(frame[column], source[column].reindex(frame.index)
                            if usable and source is not None and column in source.columns else None, f"data_{name}", path)
             for column in frame.columns]
    rows = texts[0].str.cat(texts[1:], sep=" ") if len(texts) > 1 else texts[0]
    return "".join(header) + "\n".join(rows.tolist()) + "\n"


def _format_column(values: pd.Series, source: pd.Series | None, block: str, path: Path) -> pd.Series:
    """Text of one column: the original text where the value is unchanged, shortest round-trip text else."""
    values = values.reset_index(drop=True)
    if pd.api.types.is_bool_dtype(values):
        return values.astype(np.int64).astype(str)
    if not pd.api.types.is_numeric_dtype(values):
        return values.astype(str).map(_quote) if len(values) else values.astype(str)
    numbers = values.to_numpy(dtype=np.float64)
    finite = np.isfinite(numbers)
    if not finite.all():
        first = int(np.flatnonzero(~finite)[0])
        raise CryocliError(f"column {values.name} in {block}: NaN or Inf value in row {first + 1}; "
                           "RELION cannot read it", path)
    text = values.astype(str)
    if source is not None:
        source = source.reset_index(drop=True)
        original = pd.to_numeric(source, errors="coerce").to_numpy(dtype=np.float64)
        same = (original == numbers) & source.notna().to_numpy()
        text = text.where(~same, source.astype(str))
    return text


# Whitespace splits a token, '#' starts a comment anywhere in a row, reserved words start blocks.
_NEEDS_QUOTES = re.compile(r"""\s|#|^$|^["'_]|^(data_|loop_|save_|global_|stop_)""")


def _quote(value: str) -> str:
    """Quote a string token when a STAR reader would otherwise split or misread it."""
    return f'"{value}"' if _NEEDS_QUOTES.search(value) else value


# ----- STAR text of cryocli's own tables (fsc.star, model.star, postprocess.star) ----------------------

def _star_value(value: object) -> str:
    if isinstance(value, (bool, np.bool_)):
        return "1" if value else "0"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if v != 0.0 and (abs(v) < 1e-3 or abs(v) >= 1e7):
            return f"{v:.6e}"
        return f"{v:.6f}"
    text = str(value)
    return f'"{text}"' if (not text or any(c.isspace() for c in text)) else text


def format_star_list(name: str, values: Mapping[str, object]) -> str:
    """A RELION key-value block ``data_<name>`` (keys without the leading underscore, e.g. ``rlnFinalResolution``)."""
    width = max(len(k) for k in values) + 2
    lines = [f"data_{name}", ""]
    lines += [f"_{k:<{width}} {_star_value(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n\n"


def format_star_loop(name: str, columns: Mapping[str, Sequence[object] | np.ndarray]) -> str:
    """A RELION loop block ``data_<name>`` with numbered column labels, one row per element of the columns."""
    lines = [f"data_{name}", "", "loop_"]
    lines += [f"_{k} #{i + 1}" for i, k in enumerate(columns)]
    cols = [list(v) for v in columns.values()]
    for row in zip(*cols, strict=False):
        lines.append(" ".join(f"{_star_value(v):>12}" for v in row))
    return "\n".join(lines) + "\n\n"


def star_header(command: str) -> str:
    """The comment lines cryocli puts at the top of a STAR file (RELION 3.1+ dialect)."""
    return f"# Written by cryocli {command}\n\n# version 30001\n\n"


def fsc_star_text(fsc: np.ndarray, n: int, voxel_size: float, command: str = "fsc",
                  extra: Mapping[str, Iterable[float]] | None = None) -> str:
    """``data_fsc`` with RELION's columns rlnSpectralIndex, rlnResolution (1/A), rlnAngstromResolution (A),
    rlnFourierShellCorrelation, plus any ``extra`` per-shell columns. Shell 0 is written as 999 A, as RELION does."""
    shells = np.arange(n // 2 + 1)
    res_a = np.where(shells > 0, n * voxel_size / np.maximum(shells, 1), 999.0)
    cols: dict[str, Sequence[object]] = {
        "rlnSpectralIndex": shells.tolist(),
        "rlnResolution": (1.0 / res_a).tolist(),
        "rlnAngstromResolution": res_a.tolist(),
        "rlnFourierShellCorrelation": np.asarray(fsc, dtype=np.float64).tolist(),
    }
    for k, v in (extra or {}).items():
        cols[k] = list(v)
    return star_header(command) + format_star_loop("fsc", cols)


def model_star_text(history: Sequence[Any], n: int, voxel_size: float, resolution: float | None,
                    converged: bool | None, command: str, groups: Any = None) -> str:
    """RELION's ``run_model.star`` blocks for a refinement of box ``n`` at ``voxel_size`` Angstrom.

    ``history``: :class:`cryocli.engines.result.ModelIteration` per iteration. data_model_general (current
    resolution, iteration, pixel size, convergence), data_model_iterations (one row per iteration:
    resolution, image size compared, orientation and offset changes, HEALPix order), data_model_class_1 (the
    last iteration's gold-standard FSC, SSNR and tau^2 per shell), data_model_groups (``groups``, a
    :class:`cryocli.engines.result.GroupScales`, when given) and data_model_optics_group_<g> (sigma^2).
    """
    text = star_header(command)
    text += format_star_list("model_general", {
        "rlnCurrentResolution": float("nan") if resolution is None else resolution,
        "rlnCurrentIteration": len(history), "rlnPixelSize": voxel_size, "rlnOriginalImageSize": n,
        "rlnHasConverged": int(bool(converged))})
    if not history:
        return text
    text += format_star_loop("model_iterations", {
        "rlnCurrentIteration": [h.iteration for h in history],
        "rlnCurrentResolution": [h.resolution_A for h in history],
        "rlnCurrentImageSize": [2 * h.r_max_px for h in history],
        "rlnChangesOptimalOrientations": [h.rot_change_deg for h in history],
        "rlnChangesOptimalOffsets": [h.origin_change_px for h in history],
        "rlnHealpixOrderFine": [h.healpix_order for h in history]})
    last = history[-1]
    shells = np.arange(n // 2 + 1)
    res = np.where(shells > 0, n * voxel_size / np.maximum(shells, 1), 999.0)
    text += format_star_loop("model_class_1", {
        "rlnSpectralIndex": shells, "rlnResolution": 1.0 / res, "rlnAngstromResolution": res,
        "rlnGoldStandardFsc": np.asarray(last.fsc), "rlnSsnrMap": np.asarray(last.ssnr),
        "rlnReferenceTau2": np.asarray(last.tau2)})
    if groups is not None:
        text += format_star_loop("model_groups", {
            "rlnGroupNumber": np.arange(1, len(groups.names) + 1), "rlnGroupName": list(groups.names),
            "rlnGroupNrParticles": np.asarray(groups.particles, dtype=np.int64),
            "rlnGroupScaleCorrection": np.asarray(groups.scale, dtype=np.float64)})
    for g, spectrum in enumerate(np.atleast_2d(np.asarray(last.sigma2)), start=1):
        text += format_star_loop(f"model_optics_group_{g}", {
            "rlnSpectralIndex": shells, "rlnResolution": 1.0 / res, "rlnSigma2Noise": spectrum})
    return text
