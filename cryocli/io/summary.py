"""What is in a file: the facts `cryocli info` reports, as plain dictionaries (JSON-ready).

Units: pixel sizes, resolutions, offsets and diameters in Angstrom (A), B-factors in A^2, voltage in kV,
Cs in mm, defocus in A, angles in degrees, MTF frequencies in 1/pixel (Nyquist = 0.5).

A STAR file is one of these kinds, told apart by its block names and column labels (never by the file
name), in this order:

* ``postprocess``: relion_postprocess output (a block with rlnFinalResolution; data_fsc, data_guinier).
* ``model``: a refine/classify ``*_model.star`` (a block with rlnCurrentResolution and rlnNrClasses), or the
  ``model.star`` cryocli's ``refine`` writes in the same format (rlnCurrentResolution, rlnOriginalImageSize and
  rlnPixelSize, with no class count).
* ``optimiser``: a ``*_optimiser.star`` (a block with rlnOutputRootName and rlnCurrentIteration).
* ``sampling``: a ``*_sampling.star`` (a block with rlnPsiStep and rlnOffsetRange).
* ``mtf``: a detector MTF curve (a loop with rlnResolutionInversePixel and rlnMtfValue).
* ``particles``: a non-empty loop with a particle column (rlnImageName, rlnCoordinateX, ...), read
  through :func:`cryocli.io.star.read_star`.
* ``star``: anything else; the summary lists its blocks.
"""

from __future__ import annotations

import linecache
import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cryocli.errors import CryocliError
from cryocli.io.mrc import (
    MRC_SUFFIXES,
    axis_order,
    check_mode,
    grid_kind,
    open_mrc,
    stack_info,
    to_zyx,
    voxel_sizes,
)
from cryocli.io.star import ragged_row, read_star_text

CTF_OPTICS_COLUMNS = ("rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast")
STAR_SUFFIXES = {".star"}
STAR_KINDS = ("particles", "postprocess", "model", "optimiser", "sampling", "mtf", "star")

# A kind matches when one block holds all of its labels (checked in this order, particles after these).
KIND_LABELS: tuple[tuple[str, frozenset[str]], ...] = (
    ("postprocess", frozenset({"rlnFinalResolution"})),
    ("model", frozenset({"rlnCurrentResolution", "rlnNrClasses"})),
    ("model", frozenset({"rlnCurrentResolution", "rlnOriginalImageSize", "rlnPixelSize"})),  # cryocli refine's
    ("optimiser", frozenset({"rlnOutputRootName", "rlnCurrentIteration"})),
    ("sampling", frozenset({"rlnPsiStep", "rlnOffsetRange"})),
    ("mtf", frozenset({"rlnResolutionInversePixel", "rlnMtfValue"})),
)
FSC_THRESHOLDS = (0.5, 0.143)
FSC_GLANCE_SHELLS = 6
MTF_NYQUIST_FRACTIONS = (0.25, 0.5, 0.75, 1.0)
OUT_OF_RANGE_EXAMPLES = 5

_VERSION_RE = re.compile(r"^\s*#\s*version\s+(\d+)", re.MULTILINE)


def file_kind(path: str | Path) -> str:
    """``"star"`` or ``"mrc"`` from the file name; CryocliError for a folder or any other name."""
    if Path(path).is_dir():
        raise CryocliError("is a directory; give the STAR or MRC files in it", path)
    suffix = Path(path).suffix.lower()
    if suffix in STAR_SUFFIXES:
        return "star"
    if suffix in MRC_SUFFIXES:
        return "mrc"
    raise CryocliError("not a STAR or MRC file (expected a name ending in .star, .mrc, .mrcs, .map or .st)", path)


def _range(values: np.ndarray) -> list[float] | None:
    return [float(np.min(values)), float(np.max(values))] if len(values) else None


def _py(value: Any) -> Any:
    """A numpy scalar as the plain Python value (JSON-ready); anything else unchanged."""
    return value.item() if isinstance(value, np.generic) else value


# ----- reading and recognising STAR files -------------------------------------------------------------------
@dataclass
class BlockOutline:
    """One ``data_`` block as seen by a text scan: its name (without ``data_``), whether it is a loop,
    its column labels (without ``_``) and its row count (1 for a key-value list)."""

    name: str
    loop: bool = False
    labels: list[str] = field(default_factory=list)
    rows: int = 0


def scan_blocks(text: str) -> list[BlockOutline]:
    """Block names, labels and row counts from the text alone (cheap: no values are parsed)."""
    blocks: list[BlockOutline] = []
    for line in text.splitlines():
        word = line.strip()
        if not word or word.startswith("#"):
            continue
        if word.startswith("data_"):
            blocks.append(BlockOutline(word.split()[0][5:]))
        elif not blocks:
            continue
        elif word.startswith("loop_"):
            blocks[-1].loop = True
        elif word.startswith("_"):
            blocks[-1].labels.append(word.split()[0][1:])
            if not blocks[-1].loop:
                blocks[-1].rows = 1
        elif blocks[-1].loop:
            blocks[-1].rows += 1
    return blocks


def star_kind(blocks: list[BlockOutline]) -> str:
    """The kind of a STAR file (one of :data:`STAR_KINDS`) from its block outlines."""
    from cryocli.io.star import PARTICLE_MARKERS

    for kind, labels in KIND_LABELS:
        if any(labels <= set(b.labels) for b in blocks):
            return kind
    for block in blocks:
        if block.name != "optics" and block.rows > 0 and any(c in block.labels for c in PARTICLE_MARKERS):
            return "particles"
    return "star"


def read_star_blocks(path: str | Path, text: str) -> dict[str, pd.DataFrame | dict[str, Any]]:
    """Every block of a STAR file through ``starfile``: a loop as a DataFrame, a key-value list as a dict."""
    import starfile

    linecache.clearcache()  # starfile reads lines through linecache; never see a stale copy of this file
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            blocks = starfile.read(path, always_dict=True)
    except Exception as exc:  # starfile and pandas raise many types (ParserError, TypeError, ValueError...)
        lines = str(exc).strip().splitlines()
        detail = ragged_row(text) or f"{type(exc).__name__}: {lines[0][:200] if lines else ''}"
        raise CryocliError(f"not a readable STAR file ({detail})", path) from exc
    finally:
        linecache.clearcache()
    if not isinstance(blocks, dict):
        raise CryocliError("not a readable STAR file", path)
    return blocks


def _find_block(blocks: Mapping[str, Any], labels: set[str], loop: bool | None = None) -> Any:
    """The first block holding every label in ``labels`` (a loop if ``loop``, a list if not ``loop``), or None."""
    for block in blocks.values():
        keys = set(block.columns) if isinstance(block, pd.DataFrame) else set(block)
        if loop is not None and isinstance(block, pd.DataFrame) != loop:
            continue
        if labels <= keys:
            return block
    return None


def _general(blocks: Mapping[str, Any], labels: set[str]) -> dict[str, Any]:
    """The key-value values of the block with ``labels`` (a one-row loop counts too), as plain Python."""
    block = _find_block(blocks, labels)
    if isinstance(block, pd.DataFrame):
        block = block.iloc[0].to_dict() if len(block) else {}
    return {k: _py(v) for k, v in (block or {}).items()}


def _header(text: str) -> dict[str, Any]:
    """RELION's header comments: the program line, the command-line options and the STAR version number."""
    program = command = None
    for line in text.splitlines()[:10]:
        word = line.strip().lstrip("#").strip()
        if line.strip().startswith("#") and word.startswith(("RELION", "Written by cryocli")) and program is None:
            program = word.removeprefix("Written by ")  # RELION's program line, or cryocli's star_header
        elif line.strip().startswith("#") and word.startswith("--") and command is None:
            command = word
    match = _VERSION_RE.search(text)
    return {"written_by": program, "command": command, "star_version_number": int(match.group(1)) if match else None}


# ----- postprocess ---------------------------------------------------------------------------------------------
def relion_resolution(fsc: np.ndarray, resolution: np.ndarray, threshold: float) -> tuple[int | None, float | None]:
    """RELION's rule: the last shell (from shell 1 on) before the FSC first drops below ``threshold``.

    ``fsc`` and ``resolution`` (A) are per shell, shell 0 first. Returns (shell, its resolution in A), or
    (None, None) when shell 1 is already below the threshold.
    """
    below = np.flatnonzero(np.asarray(fsc[1:], dtype=np.float64) < threshold)
    shell = int(below[0]) if below.size else len(fsc) - 1
    return (shell, float(resolution[shell])) if shell >= 1 else (None, None)


FSC_COLUMNS = (("corrected", "rlnFourierShellCorrelationCorrected"),
               ("unmasked", "rlnFourierShellCorrelationUnmaskedMaps"),
               ("masked", "rlnFourierShellCorrelationMaskedMaps"),
               ("phase_randomised", "rlnCorrectedFourierShellCorrelationPhaseRandomizedMaskedMaps"))


def _fsc_glance(fsc: pd.DataFrame) -> dict[str, Any]:
    """Shell count, RELION resolutions at FSC 0.5 / 0.143 (corrected curve) and a few shells of each curve."""
    curve = fsc["rlnFourierShellCorrelationCorrected"].to_numpy(np.float64)
    angstrom = fsc["rlnAngstromResolution"].to_numpy(np.float64)
    picked = {int(round(s)) for s in np.linspace(1, len(fsc) - 1, FSC_GLANCE_SHELLS)} if len(fsc) > 1 else set()
    out: dict[str, Any] = {"shells": int(len(fsc))}
    for threshold in FSC_THRESHOLDS:
        shell, resolution = relion_resolution(curve, angstrom, threshold)
        key = f"{threshold:g}".replace(".", "")
        out[f"shell_{key}"], out[f"resolution_{key}_A"] = shell, resolution
        picked |= {shell} if shell is not None else set()
    columns = [(name, label) for name, label in FSC_COLUMNS if label in fsc.columns]
    out["glance"] = [{"shell": s, "resolution_A": float(angstrom[s]),
                      **{name: float(fsc[label].iloc[s]) for name, label in columns}} for s in sorted(picked)]
    return out


def summarize_postprocess(blocks: Mapping[str, Any]) -> dict[str, Any]:
    """Final resolution (A), sharpening B-factor (A^2), mask, half maps, Guinier fit and the FSC at a glance,
    with the values exactly as written in the file."""
    general = _general(blocks, {"rlnFinalResolution"})
    fsc = _find_block(blocks, {"rlnAngstromResolution", "rlnFourierShellCorrelationCorrected"}, loop=True)
    guinier = _find_block(blocks, {"rlnResolutionSquared"}, loop=True)
    return {
        "final_resolution_A": general.get("rlnFinalResolution"),
        "bfactor_A2": general.get("rlnBfactorUsedForSharpening"),
        "mask": general.get("rlnMaskName"),
        "randomise_from_A": general.get("rlnRandomiseFrom"),
        "half_maps": [general[k] for k in ("rlnUnfilteredMapHalf1", "rlnUnfilteredMapHalf2") if k in general],
        "postprocessed_map": general.get("rlnPostprocessedMap"),
        "guinier_fit": {k: general[label] for k, label in (("slope", "rlnFittedSlopeGuinierPlot"),
                                                             ("intercept", "rlnFittedInterceptGuinierPlot"),
                                                             ("correlation", "rlnCorrelationFitGuinierPlot"))
                        if label in general} or None,
        "guinier_points": int(len(guinier)) if guinier is not None else 0,
        "fsc": _fsc_glance(fsc) if fsc is not None and len(fsc) else None,
        "general": general,
    }


# ----- model ---------------------------------------------------------------------------------------------------
MODEL_FIELDS = (("resolution_A", "rlnCurrentResolution"), ("pixel_size", "rlnPixelSize"),
                ("box", "rlnOriginalImageSize"), ("current_image_size", "rlnCurrentImageSize"),
                ("classes", "rlnNrClasses"), ("bodies", "rlnNrBodies"), ("groups", "rlnNrGroups"),
                ("optics_groups", "rlnNrOpticsGroups"), ("reference_dimensionality", "rlnReferenceDimensionality"),
                ("tau2_fudge", "rlnTau2FudgeFactor"), ("log_likelihood", "rlnLogLikelihood"),
                ("average_pmax", "rlnAveragePmax"), ("iteration", "rlnCurrentIteration"),
                ("has_converged", "rlnHasConverged"))
CLASS_FIELDS = (("reference", "rlnReferenceImage"), ("distribution", "rlnClassDistribution"),
                ("accuracy_rotations_deg", "rlnAccuracyRotations"),
                ("accuracy_translations_A", "rlnAccuracyTranslationsAngst"),
                ("accuracy_translations_px", "rlnAccuracyTranslations"),
                ("estimated_resolution_A", "rlnEstimatedResolution"),
                ("completeness", "rlnOverallFourierCompleteness"))
GROUP_FIELDS = (("group", "rlnGroupNumber"), ("name", "rlnGroupName"), ("particles", "rlnGroupNrParticles"),
                ("scale", "rlnGroupScaleCorrection"))
# cryocli refine's data_model_iterations: one row per iteration.
ITERATION_FIELDS = (("iteration", "rlnCurrentIteration"), ("resolution_A", "rlnCurrentResolution"),
                    ("image_size", "rlnCurrentImageSize"),
                    ("changes_orientations_deg", "rlnChangesOptimalOrientations"),
                    ("changes_offsets_px", "rlnChangesOptimalOffsets"), ("healpix_order", "rlnHealpixOrderFine"))


def _rows(frame: pd.DataFrame | None, fields: tuple[tuple[str, str], ...]) -> list[dict[str, Any]]:
    """Each row of ``frame`` as ``{name: value}`` for the ``(name, label)`` pairs whose label is a column."""
    if frame is None:
        return []
    present = [(name, label) for name, label in fields if label in frame.columns]
    # Records keep each column's own type (iterrows would turn a row of ints and floats into floats: 1.0).
    return [{name: _py(row[label]) for name, label in present} for row in frame.to_dict("records")]


def _model_general(blocks: Mapping[str, Any]) -> dict[str, Any]:
    """The model's key-value block: RELION's (with rlnNrClasses) or cryocli refine's (without a class count)."""
    for kind, labels in KIND_LABELS:
        if kind == "model" and _find_block(blocks, set(labels)) is not None:
            return _general(blocks, set(labels))
    return {}


def summarize_model(blocks: Mapping[str, Any]) -> dict[str, Any]:
    """Current resolution (A), pixel size (A), box (px), classes with their distribution and accuracies
    (rotations in degrees, translations in A or px as the file gives them), groups with their particles, and for
    cryocli refine's model.star the iteration, convergence and one row per iteration."""
    general = _model_general(blocks)
    summary: dict[str, Any] = {name: _flag(label, general.get(label)) for name, label in MODEL_FIELDS}
    summary["sigma_offsets_A"] = general.get("rlnSigmaOffsetsAngst")
    summary["sigma_offsets_px"] = general.get("rlnSigmaOffsets")
    summary["class_table"] = _rows(_find_block(blocks, {"rlnReferenceImage"}, loop=True), CLASS_FIELDS)
    summary["group_table"] = _rows(_find_block(blocks, {"rlnGroupNumber", "rlnGroupNrParticles"}, loop=True),
                                   GROUP_FIELDS)
    summary["iteration_table"] = _rows(_find_block(blocks, {"rlnCurrentIteration", "rlnChangesOptimalOrientations"},
                                                   loop=True), ITERATION_FIELDS)
    summary["general"] = general
    return summary


# ----- optimiser and sampling --------------------------------------------------------------------------------
OPTIMISER_FIELDS = (("output_root", "rlnOutputRootName"), ("iteration", "rlnCurrentIteration"),
                    ("iterations", "rlnNumberOfIterations"), ("auto_refine", "rlnDoAutoRefine"),
                    ("split_random_halves", "rlnDoSplitRandomHalves"), ("has_converged", "rlnHasConverged"),
                    ("particle_diameter_A", "rlnParticleDiameter"), ("random_seed", "rlnRandomSeed"),
                    ("accuracy_rotations_deg", "rlnOverallAccuracyRotations"),
                    ("accuracy_translations_A", "rlnOverallAccuracyTranslationsAngst"),
                    ("accuracy_translations_px", "rlnOverallAccuracyTranslations"),
                    ("changes_orientations", "rlnChangesOptimalOrientations"),
                    ("changes_offsets", "rlnChangesOptimalOffsets"), ("changes_classes", "rlnChangesOptimalClasses"),
                    ("adaptive_oversampling", "rlnAdaptiveOversampleOrder"),
                    ("auto_local_healpix_order", "rlnAutoLocalSearchesHealpixOrder"),
                    ("join_halves_until_A", "rlnJoinHalvesUntilThisResolution"),
                    ("solvent_flattening", "rlnDoSolventFlattening"), ("zero_mask", "rlnDoZeroMask"),
                    ("solvent_mask", "rlnSolventMaskName"), ("correct_ctf", "rlnDoCorrectCtf"),
                    ("correct_norm", "rlnDoCorrectNorm"), ("correct_scale", "rlnDoCorrectScale"),
                    ("model_star", "rlnModelStarFile"), ("data_star", "rlnExperimentalDataStarFile"),
                    ("sampling_star", "rlnOrientSamplingStarFile"))
SAMPLING_FIELDS = (("is_3d", "rlnIs3DSampling"), ("healpix_order", "rlnHealpixOrder"),
                   ("psi_step_deg", "rlnPsiStep"), ("offset_range", "rlnOffsetRange"),
                   ("offset_step", "rlnOffsetStep"), ("symmetry", "rlnSymmetryGroup"),
                   ("tilt_angle_limit_deg", "rlnTiltAngleLimit"), ("perturb_factor", "rlnSamplingPerturbFactor"),
                   ("healpix_order_original", "rlnHealpixOrderOriginal"),
                   ("psi_step_original_deg", "rlnPsiStepOriginal"),
                   ("offset_range_original", "rlnOffsetRangeOriginal"),
                   ("offset_step_original", "rlnOffsetStepOriginal"))


def _flag(label: str, value: Any) -> Any:
    """RELION's 0/1 switches (rlnDo..., rlnHas..., rlnIs...) as booleans; any other value unchanged."""
    if re.match(r"rln(Do|Has|Is)[A-Z0-9]", label) and isinstance(value, int) and value in (0, 1):
        return bool(value)
    return value


def summarize_optimiser(blocks: Mapping[str, Any]) -> dict[str, Any]:
    """Iteration and the key settings of a refinement or classification (diameters and resolutions in A).

    ``best_resolution_A`` is 1 / rlnBestResolutionThusFar (which RELION stores in 1/A), to 4 decimals.
    RELION writes the final iteration of an auto-refine as iteration -1.
    """
    general = _general(blocks, {"rlnOutputRootName", "rlnCurrentIteration"})
    summary: dict[str, Any] = {name: _flag(label, general.get(label)) for name, label in OPTIMISER_FIELDS}
    best = general.get("rlnBestResolutionThusFar")
    summary["best_resolution_A"] = round(1.0 / best, 4) if isinstance(best, (int, float)) and best > 0 else None
    summary["general"] = general
    return summary


def healpix_angular_sampling(order: int) -> float:
    """RELION's angular sampling of a HEALPix order in degrees: 360 / (6 * 2^order) (order 2: 15 deg)."""
    return 360.0 / (6 * 2 ** int(order))


def summarize_sampling(blocks: Mapping[str, Any], version: int | None) -> dict[str, Any]:
    """HEALPix order, angular sampling (degrees), psi step (degrees), offset range and step, symmetry and the
    number of listed directions.

    Offsets are in A in RELION 3.1+ files (``# version 30001`` or later) and in pixels in 3.0 files;
    ``offset_unit`` says which.
    """
    general = _general(blocks, {"rlnPsiStep", "rlnOffsetRange"})
    summary: dict[str, Any] = {name: _flag(label, general.get(label)) for name, label in SAMPLING_FIELDS}
    order = summary["healpix_order"]
    summary["angular_sampling_deg"] = healpix_angular_sampling(order) if order is not None else summary["psi_step_deg"]
    summary["offset_unit"] = "A" if version is not None and version >= 30001 else "px"
    directions = _find_block(blocks, {"rlnAngleRot", "rlnAngleTilt"}, loop=True)
    summary["directions"] = int(len(directions)) if directions is not None else 0
    summary["general"] = general
    return summary


# ----- MTF -----------------------------------------------------------------------------------------------------
def summarize_mtf(blocks: Mapping[str, Any]) -> dict[str, Any]:
    """Number of points, frequency range (1/pixel) and the MTF at 1/4, 1/2, 3/4 and 1 x Nyquist (0.5/pixel),
    interpolated linearly; None where the curve does not reach that frequency."""
    found = [(n, b) for n, b in blocks.items() if isinstance(b, pd.DataFrame)
             and {"rlnResolutionInversePixel", "rlnMtfValue"} <= set(b.columns)]
    if not found:
        raise ValueError("rlnResolutionInversePixel and rlnMtfValue are not columns of one loop")
    name, table = found[0]
    order = np.argsort(table["rlnResolutionInversePixel"].to_numpy(np.float64), kind="stable")
    freq = table["rlnResolutionInversePixel"].to_numpy(np.float64)[order]
    mtf = table["rlnMtfValue"].to_numpy(np.float64)[order]
    at = []
    for fraction in MTF_NYQUIST_FRACTIONS:
        f = 0.5 * fraction
        inside = len(freq) > 0 and freq[0] <= f <= freq[-1]
        at.append({"nyquist_fraction": fraction, "frequency": f,
                   "mtf": float(np.interp(f, freq, mtf)) if inside else None})
    return {"block": name, "points": int(len(table)), "frequency_range": _range(freq), "mtf_range": _range(mtf),
            "mtf_at": at}


# ----- any other STAR file -------------------------------------------------------------------------------------
def block_table(blocks: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Each block: name, ``loop`` or ``list`` (key-value), rows (1 for a list), columns and their labels."""
    table = []
    for name, block in blocks.items():
        loop = isinstance(block, pd.DataFrame)
        labels = [str(c) for c in (block.columns if loop else block)]
        table.append({"name": name, "type": "loop" if loop else "list", "rows": int(len(block)) if loop else 1,
                      "columns": len(labels), "labels": labels})
    return table


# ----- particles -----------------------------------------------------------------------------------------------
def _optics_groups(table: Any) -> list[dict[str, Any]]:
    """One entry per optics group: particles, box (px), pixel size (A), kV, Cs (mm), Q0, defocus range (A)."""
    merged = table.optics_per_particle()
    groups = []
    pixel = table.pixel_size if table.has_pixel_size else None
    group_col = "rlnOpticsGroup" if "rlnOpticsGroup" in merged.columns else None
    keys = merged[group_col].unique() if group_col else [None]
    for key in keys:
        rows = merged[merged[group_col] == key] if group_col else merged

        def first(col: str, rows: Any = rows) -> Any:
            return _py(rows[col].iloc[0]) if col in rows.columns else None

        defocus = None
        if "rlnDefocusU" in rows.columns and "rlnDefocusV" in rows.columns:
            defocus = _range(np.concatenate([rows["rlnDefocusU"].to_numpy(float), rows["rlnDefocusV"].to_numpy(float)]))
        groups.append({
            "group": _py(key),
            "name": first("rlnOpticsGroupName"),
            "particles": int(len(rows)),
            "box": first("rlnImageSize"),
            "pixel_size": float(pixel[rows.index.to_numpy()][0]) if pixel is not None and len(rows) else None,
            "voltage": first("rlnVoltage"),
            "cs": first("rlnSphericalAberration"),
            "amplitude_contrast": first("rlnAmplitudeContrast"),
            "defocus_range": defocus,
        })
    return groups


def _stack_counts(stacks: list[dict[str, Any]]) -> tuple[dict[str, int], dict[str, int], dict[str, str],
                                                         dict[str, float]]:
    """Image count, box (px) and header pixel size (Angstrom, 0: none) of every found stack by name, and why each
    unreadable one could not be read."""
    counts: dict[str, int] = {}
    boxes: dict[str, int] = {}
    pixels: dict[str, float] = {}
    unreadable: dict[str, str] = {}
    for stack in stacks:
        if stack["resolved"] is None:
            continue
        try:
            info = stack_info(stack["resolved"])
        except CryocliError as exc:
            unreadable[stack["name"]] = exc.message
            continue
        counts[stack["name"]], boxes[stack["name"]] = info.count, info.box
        pixels[stack["name"]] = float(info.voxel_size)
    return counts, boxes, unreadable, pixels


def check_image_indices(table: Any, counts: Mapping[str, int]) -> dict[str, Any]:
    """Compare each particle's image index (the N of ``N@stack``, 1-based) with the length of its stack.

    ``counts``: images per stack name, for the stacks that were found. Returns how many particles were
    checked, how many indices lie past the end of their stack, and the first few of them.
    """
    local, names = table.image_names
    length = np.array([counts.get(n, -1) for n in names], dtype=np.int64)
    checked = length >= 0
    bad = np.flatnonzero(checked & (local >= length))
    written = table.particles["rlnImageName"].astype(str).to_numpy(dtype=object)
    examples = [{"particle": int(i) + 1, "image_name": str(written[i]), "index": int(local[i]) + 1,
                 "stack_images": int(length[i])} for i in bad[:OUT_OF_RANGE_EXAMPLES]]
    return {"images_checked": int(checked.sum()), "images_out_of_range": int(len(bad)),
            "out_of_range_examples": examples}


def box_mismatches(table: Any, groups: list[dict[str, Any]], boxes: Mapping[str, int]) -> list[dict[str, Any]]:
    """Optics groups whose rlnImageSize differs from the box of the stacks their particles lie in.

    ``groups``: :func:`_optics_groups`; ``boxes``: box (px) per stack name, for the stacks that could be read. The
    stack headers hold the images, so reconstruct, refine and abinitio refuse such a file
    (:class:`cryocli.io.dataset.ParticleStack`: "rlnImageSize in the STAR file is ... px but the stacks hold ...
    px images"); ``info`` is where a user looks before a job, so it names both numbers. Each entry: ``group``,
    ``star_box`` (px) and ``stack_boxes`` (px, sorted), and ``message``, the warning in words.
    """
    if not boxes or "rlnImageName" not in table.particles.columns:
        return []
    _, names = table.image_names
    stack_box = np.array([boxes.get(n, -1) for n in names], dtype=np.int64)
    merged = table.optics_per_particle()
    group_of = merged["rlnOpticsGroup"].to_numpy() if "rlnOpticsGroup" in merged.columns else None
    found = []
    for g in groups:
        if g["box"] is None:
            continue
        rows = stack_box if group_of is None else stack_box[group_of == g["group"]]
        held = sorted({int(b) for b in rows if b >= 0})
        if held and held != [int(g["box"])]:
            which = f" (optics group {g['group']})" if group_of is not None and len(groups) > 1 else ""
            found.append({"group": g["group"], "star_box": int(g["box"]), "stack_boxes": held,
                          "message": f"rlnImageSize in the STAR file is {int(g['box'])} px but the stacks hold "
                                     f"{', '.join(map(str, held))} px images{which}"})
    return found


def summarize_particles(path: str | Path, datadir: str | Path | None = None) -> dict[str, Any]:
    """Particle count, optics groups, columns present, STAR version, whether every stack exists and whether
    every image index (the N of ``N@stack``) lies within its stack."""
    from cryocli.io.dataset import resolve_stack_paths
    from cryocli.io.star import read_star

    table = read_star(path)
    parts = table.particles
    merged = table.optics_per_particle()
    has_images = "rlnImageName" in parts.columns
    stacks = resolve_stack_paths(table, datadir=datadir) if has_images else []
    missing = [s["name"] for s in stacks if s["resolved"] is None]
    counts, boxes, unreadable, header_pixels = _stack_counts(stacks)
    indices = check_image_indices(table, counts) if has_images else {
        "images_checked": 0, "images_out_of_range": 0, "out_of_range_examples": []}
    groups = _optics_groups(table)
    return {
        "file": str(path),
        "type": "star",
        "kind": "particles",
        "star_version": table.version,
        "block": table.particle_block,
        "particles": int(len(parts)),
        "optics_groups": groups,
        "columns": list(parts.columns),
        "has_poses": table.has_poses,
        "has_shifts": table.has_shifts,
        "has_half_sets": "rlnRandomSubset" in parts.columns,
        # Usable for CTF correction: defocus per particle and the optics values the formula needs.
        "has_ctf": table.has_ctf and all(c in merged.columns for c in CTF_OPTICS_COLUMNS),
        "has_images": has_images,
        "stacks": len(stacks),
        "stacks_missing": missing,
        "stacks_unreadable": unreadable,
        "all_stacks_exist": not missing,
        "stack_boxes": sorted(set(boxes.values())),
        # [] when rlnImageSize agrees with the stacks (or either is unknown); see box_mismatches.
        "box_mismatch": box_mismatches(table, groups, boxes),
        # False when neither the STAR file nor the first stack's header gives one (ParticleStack reads that one):
        # the commands that read the images then need --angpix.
        "pixel_size_known": table.has_pixel_size or next(iter(header_pixels.values()), 0.0) > 0,
        **indices,
    }


# ----- dispatch ------------------------------------------------------------------------------------------------
def _summarizer(kind: str, version: int | None) -> Callable[[Mapping[str, Any]], dict[str, Any]]:
    if kind == "sampling":
        return lambda blocks: summarize_sampling(blocks, version)
    if kind == "star":
        return lambda blocks: {"blocks": block_table(blocks)}
    return {"postprocess": summarize_postprocess, "model": summarize_model, "optimiser": summarize_optimiser,
            "mtf": summarize_mtf}[kind]


def summarize_star(path: str | Path, datadir: str | Path | None = None) -> dict[str, Any]:
    """What a STAR file holds, by kind (see the module docstring); ``kind`` says which."""
    text = read_star_text(path)
    kind = star_kind(scan_blocks(text))
    if kind == "particles":
        return summarize_particles(path, datadir)
    blocks = read_star_blocks(path, text)
    header = _header(text)
    summary = {"file": str(path), "type": "star", "kind": kind, **header}
    try:
        summary.update(_summarizer(kind, header["star_version_number"])(blocks))
    except (ValueError, TypeError, KeyError, IndexError) as exc:  # text where RELION writes numbers, and such
        raise CryocliError(f"looks like a RELION {kind} file but cannot be summarised ({exc})", path) from exc
    if kind != "star":
        summary["blocks"] = block_table(blocks)
    return summary


# A "map" with this many times fewer sections (NZ) than rows or columns is more likely a few images written with
# a volume's header (cryoDRGN's empiar_10076_7.mrc: 320 x 320 x 7): info says so in a note.
SLAB_RATIO = 4
MODE_CONTEXT = {"map": "a map", "stack": "a particle stack", "image": "an image"}


def summarize_mrc(path: str | Path, mass_kda: float | None = None) -> dict[str, Any]:
    """Grid shape, voxel size, mode, axis order and value statistics of an MRC map, stack or single image; for a
    map, the contour level enclosing the molecule (``contour_level``, ``contour_basis``: by ``mass_kda`` when
    given, else a sphere of 0.8 x the box, see :func:`cryocli.analysis.contour.contour_level`).

    ``type`` is ``map``, ``stack`` or ``image`` by :func:`cryocli.io.mrc.grid_kind` (the name, NZ, ISPG and MZ,
    not ISPG alone: RELION writes maps with ISPG 0). For a map, ``shape_xyz`` is the grid along x, y and z after
    the file's axis order (MAPC,R,S) is applied, ``shape_crs`` the file's columns, rows and sections, and
    ``voxel_size_xyz`` the voxel size along each axis; ``voxel_size`` is the one along x (0: none in the header).
    """
    with open_mrc(path) as mrc:
        kind = grid_kind(mrc, path)
        check_mode(mrc, path, MODE_CONTEXT[kind])
        header = mrc.header
        order = axis_order(mrc)
        raw = np.asarray(mrc.data, dtype=np.float64)
        voxels = voxel_sizes(mrc)
        mode = int(header.mode)
        crs = [int(header.nx), int(header.ny), int(header.nz)]
        label = header.label[0].decode("ascii", "replace").strip() if int(header.nlabl) > 0 else ""
    data = to_zyx(raw, order, Path(path)) if kind == "map" else raw
    stats = {"min": float(data.min()), "max": float(data.max()), "mean": float(data.mean()), "std": float(data.std())}
    summary: dict[str, Any] = {
        "file": str(path), "type": kind, "shape_xyz": list(data.shape[::-1]), "voxel_size": voxels[0],
        "mode": mode, "axis_order": list(order), "label": label, **stats,
        "finite": bool(np.isfinite(stats["min"]) and np.isfinite(stats["max"])),
    }
    if kind != "map":
        summary["images"] = 1 if kind == "image" else int(data.shape[0])
        return summary
    summary.update(shape_crs=crs, voxel_size_xyz=list(voxels))
    if crs[2] * SLAB_RATIO <= min(crs[:2]):
        summary["note"] = (f"a {crs[0]} x {crs[1]} x {crs[2]} grid is thin for a map: if it holds {crs[2]} images, "
                           "name it .mrcs (or set ISPG 0 and MZ 1 in its header) to have it read as a stack")
    summary.update(_contour(data, voxels, mass_kda, path))
    return summary


def _contour(data: np.ndarray, voxels: tuple[float, float, float], mass_kda: float | None,
             path: str | Path) -> dict[str, Any]:
    """``contour_level`` and ``contour_basis`` of a map. A mass that does not fit the map is an error (the
    user's); a map with no level by the default sphere (no voxel size, NaN) gets ``None`` and the reason.

    With voxels of different sizes along x, y, z the level uses their geometric mean, the edge of a cube of the
    same volume: the volume enclosed (voxels counted x volume of one) is then exact.
    """
    from cryocli.analysis.contour import contour_level

    if data.ndim != 3:
        return {"contour_level": None, "contour_basis": f"none: a {data.ndim}-D array, not a 3-D map"}
    if min(voxels) <= 0:
        # Without a voxel size the grid has no size in A: neither a mass nor a sphere can be turned into voxels.
        return {"contour_level": None, "contour_basis": "none: the header gives no voxel size (its cell "
                "dimensions are 0), so no volume in A^3 can be enclosed"}
    voxel = float(np.prod(voxels)) ** (1.0 / 3.0) if len(set(voxels)) > 1 else voxels[0]
    try:
        level, how = contour_level(data, voxel, mass_kda=mass_kda)
    except CryocliError as exc:
        if mass_kda is not None:
            raise CryocliError(f"--mass {mass_kda:g}: {exc.message}", path) from exc
        return {"contour_level": None, "contour_basis": f"none: {exc.message}"}
    return {"contour_level": level, "contour_basis": how}


def summarize(path: str | Path, datadir: str | Path | None = None, mass_kda: float | None = None) -> dict[str, Any]:
    """Dispatch on the file type (``mass_kda``: the molecule's mass for a map's contour level)."""
    if not Path(path).exists():
        raise CryocliError("file not found", path)
    return summarize_star(path, datadir) if file_kind(path) == "star" else summarize_mrc(path, mass_kda)
