"""One picture of a result: the map, its FSC, the run's history and the viewing directions (``report.png``),
and RELION's ``angdist.bild`` of the poses.

:class:`ReportData` holds what the picture shows, in the units cryocli uses everywhere (Angstrom, RELION ``A``
matrices, maps ``[z, y, x]``); :func:`write_report` draws it. The data comes from a finished run directory
(:func:`report_from_run_directory`), a RELION Refine3D / Class3D job (:func:`report_from_relion_job`), or a
run in progress (the run-directory writer builds a :class:`ReportData` from what it holds).

The figure, panels as the data has them:

* **map**: the central slices through the three axes (``z = n // 2`` seen down z, ``y = n // 2``, ``x = n // 2``)
  on one grey scale, the three projections (sums along z, y and x) on another, the mask's outline (its
  0.5 contour; the outline of its maximum along the ray on the projections) in red and the ChimeraX contour
  level marked in yellow on the slices' colour bar; :func:`report_arrays` gives the arrays drawn;
* **FSC**: every curve with the threshold it is read at (0.143 for half maps, 0.5 against a known map), each
  resolution written beside its crossing; bottom axis 1/A, top axis Angstrom (the style of
  :func:`cryocli.plots.plot_fsc`);
* **history**: resolution, the method's objective (loss, log-likelihood, held-out error), the pose change and
  every other numeric column of ``metrics.csv`` against the epoch or iteration, one line per ``run`` (half1,
  half2, full);
* **viewing directions**: an equal-area (Hammer) histogram of the projection directions ``(rot, tilt)``
  folded into the asymmetric unit of the symmetry (:mod:`cryocli.analysis.angdist`), with a colour bar.

The title names the run, its particles, box, pixel size and resolution and the contour level to type into
ChimeraX (``volume #1 level X``) with how it was chosen.

Files are written under a temporary name and renamed (umask permissions); the PNG carries no clock time or
version (fixed metadata), so the same data gives the same bytes.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from cryocli.errors import CryocliError  # noqa: E402

REPORT_PNG = "report.png"
ANGDIST_BILD = "angdist.bild"

GOLD_STANDARD_THRESHOLD = 0.143
TRUTH_THRESHOLD = 0.5

# Figure geometry (inches at DPI): the picture's size depends only on which panels exist and on the number of
# history columns, so that a test can compute it (report_figure_size).
DPI = 100
WIDTH_IN = 16.0
TITLE_IN = 0.85
TOP_IN = 6.6
HISTORY_ROW_IN = 2.05
HISTORY_HEADER_IN = 0.35
HISTORY_COLUMNS = 5
MAP_ONLY_WIDTH_IN = 9.5

# Columns that are never plotted as history: the row's labels.
_LABEL_COLUMNS = ("run", "epoch", "iteration", "stage", "event", "time")
_OBJECTIVE_WORDS = ("loss", "likelihood", "objective", "heldout", "held_out", "nll", "data_term")
_POSE_CHANGE_WORDS = ("pose_change", "rot_change", "orientation_change", "changes_orientations")

_PNG_METADATA = {"Software": "cryocli report", "Title": "cryocli report"}


# ------------------------------------------------------------------------------------------------ the data


@dataclass
class ReportData:
    """What :func:`write_report` draws.

    title: the run's command or method (``refine --method relion``, ``RELION Refine3D (refine)``).
    volume: the map ``(n, n, n)`` float32, ``[z, y, x]``; voxel_size in Angstrom. mask: ``(n, n, n)`` in [0, 1] or
    None. fsc: ``{label: (frequency in 1/A, fsc)}`` per shell; fsc_thresholds: ``{label: threshold}`` the curve
    is read at (0.143 for gold-standard half maps, masked and unmasked; 0.5 against the truth; a label
    missing here is read at 0.143); resolutions: ``{label: Angstrom}`` written on the plot beside each curve's
    crossing (the number the run reports, e.g. RELION's own). resolution_A: the run's resolution, for the
    title. history: one dict per epoch/iteration (the rows of ``metrics.csv``: ``run``, ``epoch`` and numeric
    columns, as numbers or as the CSV's strings); epoch_label names the x axis. rotations: RELION ``A`` of the
    particles ``(N, 3, 3)`` or None. box (px) and pixel_size (A/px) of the particles, for angdist.bild (the
    map's when None). n_particles: for the title (``len(rotations)`` when None). sym: point group the viewing
    directions are folded with. contour_level and contour_basis: the ChimeraX level and how it was chosen
    (:func:`cryocli.analysis.contour.contour_level`), or None.
    """

    title: str
    volume: np.ndarray
    voxel_size: float
    mask: np.ndarray | None = None
    fsc: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    fsc_thresholds: dict[str, float] = field(default_factory=dict)
    resolutions: dict[str, float] = field(default_factory=dict)
    resolution_A: float | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    epoch_label: str = "epoch"
    rotations: np.ndarray | None = None
    box: int | None = None
    pixel_size: float | None = None
    n_particles: int | None = None
    sym: str = "C1"
    contour_level: float | None = None
    contour_basis: str | None = None

    def __post_init__(self) -> None:
        self.volume = np.asarray(self.volume, dtype=np.float32)
        if self.volume.ndim != 3 or len(set(self.volume.shape)) != 1:
            raise CryocliError(f"the report needs a cubic 3D map, got an array of shape {self.volume.shape}")
        if not np.isfinite(self.volume).all():
            raise CryocliError("the map holds NaN or Inf values: no report")
        if not (math.isfinite(self.voxel_size) and self.voxel_size > 0):
            raise CryocliError(f"voxel size {self.voxel_size:g} A: must be a positive number")
        if self.mask is not None:
            self.mask = np.asarray(self.mask, dtype=np.float32)
            if self.mask.shape != self.volume.shape:
                raise CryocliError(f"the mask's box {self.mask.shape} differs from the map's {self.volume.shape}")
        if self.rotations is not None:
            self.rotations = np.asarray(self.rotations, dtype=np.float64)
            if self.rotations.ndim != 3 or self.rotations.shape[1:] != (3, 3):
                raise CryocliError(f"rotations must be RELION A matrices (N, 3, 3), got {self.rotations.shape}")
            if len(self.rotations) == 0:
                self.rotations = None
        if self.n_particles is None and self.rotations is not None:
            self.n_particles = len(self.rotations)

    @property
    def n(self) -> int:
        return int(self.volume.shape[0])


@dataclass
class ReportArrays:
    """The images of the map panel, as drawn (rows ``y``/``z`` up, columns ``x``/``y`` across).

    slices: ``{"z": volume[n//2], "y": volume[:, n//2], "x": volume[:, :, n//2]}`` (the planes seen down z, y
    and x); projections: ``{"z": volume.sum(0), "y": volume.sum(1), "x": volume.sum(2)}``; mask_slices and
    mask_projections: the mask's central slices and its maximum along each axis (None without a mask);
    slice_range and projection_range: the grey scale (low, high) shared by each row.
    """

    slices: dict[str, np.ndarray]
    projections: dict[str, np.ndarray]
    mask_slices: dict[str, np.ndarray] | None
    mask_projections: dict[str, np.ndarray] | None
    slice_range: tuple[float, float]
    projection_range: tuple[float, float]


AXES = ("z", "y", "x")
# (horizontal, vertical) axis names of the image seen down each axis: volume[z, y, x] without the axis.
_IMAGE_AXES = {"z": ("x", "y"), "y": ("x", "z"), "x": ("y", "z")}


def report_arrays(data: ReportData) -> ReportArrays:
    """The slices and projections the map panel draws, and their grey scales (see :class:`ReportArrays`)."""
    v = data.volume
    c = data.n // 2
    slices = {"z": v[c], "y": v[:, c], "x": v[:, :, c]}
    projections = {axis: v.sum(axis=i, dtype=np.float64).astype(np.float32) for i, axis in enumerate(AXES)}
    mask_slices = mask_projections = None
    if data.mask is not None:
        m = data.mask
        mask_slices = {"z": m[c], "y": m[:, c], "x": m[:, :, c]}
        mask_projections = {axis: m.max(axis=i) for i, axis in enumerate(AXES)}
    return ReportArrays(slices, projections, mask_slices, mask_projections, _range(slices.values()),
                        _range(projections.values()))


def _range(images: Any) -> tuple[float, float]:
    values = [np.asarray(a) for a in images]
    lo = float(min(a.min() for a in values))
    hi = float(max(a.max() for a in values))
    return (lo, hi) if hi > lo else (lo - 0.5, lo + 0.5)


# --------------------------------------------------------------------------------------------- the history


def _number(value: Any) -> float | None:
    """A history value as a float (NaN for an empty cell), or None when it is not a number (text)."""
    if value is None:
        return math.nan
    if isinstance(value, (bool, np.bool_)):
        return float(value)
    if isinstance(value, (int, float, np.integer, np.floating)):
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        if text in ("", "nan", "NaN", "None"):
            return math.nan
        if text in ("True", "False"):
            return float(text == "True")
        try:
            return float(text)
        except ValueError:
            return None
    return None


def history_series(rows: Sequence[Mapping[str, Any]]) -> tuple[list[str], dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]]:
    """The numeric columns of ``rows`` in the order the report draws them, and their lines.

    Returns ``(columns, series)``: ``columns`` = resolution columns first, then the objective (loss,
    log-likelihood, held-out error), then the pose change, then every other numeric column in the rows' order;
    ``series[column][run] = (epochs, values)`` (one line per ``run`` value, in order of appearance). A column is
    numeric when every non-empty value is a number (booleans count as 0/1) and one is finite.
    """
    order: list[str] = []
    for row in rows:
        order += [k for k in row if k not in order and k not in _LABEL_COLUMNS]
    x_key = "epoch" if any("epoch" in r for r in rows) else ("iteration" if any("iteration" in r for r in rows) else None)
    runs: list[str] = []
    for row in rows:
        run = str(row.get("run", "") or "")
        if run not in runs:
            runs.append(run)
    numeric: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
    for column in order:
        values = [_number(row.get(column)) for row in rows]
        if any(v is None for v in values) or not any(v is not None and math.isfinite(v) for v in values):
            continue
        lines: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for run in runs:
            xs, ys = [], []
            for i, row in enumerate(rows):
                if str(row.get("run", "") or "") != run:
                    continue
                x = _number(row.get(x_key)) if x_key else float(i + 1)
                xs.append(float(i + 1) if x is None or not math.isfinite(x) else x)
                ys.append(values[i])
            if any(math.isfinite(float(y)) for y in ys if y is not None):
                lines[run] = (np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64))
        numeric[column] = lines

    def rank(column: str) -> int:
        low = column.lower()
        if "resolution" in low or low.startswith("res_"):
            return 0
        if any(w in low for w in _OBJECTIVE_WORDS):
            return 1
        if any(w in low for w in _POSE_CHANGE_WORDS):
            return 2
        return 3

    columns = sorted(numeric, key=lambda c: (rank(c), order.index(c)))
    return columns, numeric


# ---------------------------------------------------------------------------------------------- the figure


def _history_rows(data: ReportData) -> int:
    columns, _ = history_series(data.history)
    return math.ceil(len(columns) / HISTORY_COLUMNS)


def report_figure_size(data: ReportData) -> tuple[int, int]:
    """``(width, height)`` in pixels of the ``report.png`` of ``data``."""
    width_in, height_in = _figure_inches(data, _history_rows(data))
    return round(width_in * DPI), round(height_in * DPI)


def _figure_inches(data: ReportData, history_rows: int) -> tuple[float, float]:
    side = bool(data.fsc) or data.rotations is not None
    width = WIDTH_IN if side else MAP_ONLY_WIDTH_IN
    height = TITLE_IN + TOP_IN + (HISTORY_HEADER_IN + HISTORY_ROW_IN * history_rows if history_rows else 0.0)
    return width, height


def _title_lines(data: ReportData) -> str:
    first = data.title or "cryocli report"
    facts = []
    if data.n_particles is not None:
        facts.append(f"{data.n_particles:,} particles")
    box = data.box if data.box is not None else data.n
    apix = data.pixel_size if data.pixel_size is not None else data.voxel_size
    facts.append(f"box {box} px")
    facts.append(f"{apix:.4g} Å/px")
    if data.resolution_A is not None and math.isfinite(data.resolution_A) and data.resolution_A > 0:
        facts.append(f"resolution {data.resolution_A:.2f} Å")
    if data.sym.upper() != "C1":
        facts.append(f"symmetry {data.sym}")
    lines = [first, ", ".join(facts)]
    if data.contour_level is not None and math.isfinite(data.contour_level):
        basis = f" ({data.contour_basis})" if data.contour_basis else ""
        lines.append(f"ChimeraX: volume #1 level {data.contour_level:.4g}{basis}")
    # About 0.09 inch per character at 11 points; at most four lines fit the title's band.
    columns = int(_figure_inches(data, 0)[0] / 0.09)
    wrapped = [part for line in lines for part in textwrap.wrap(line, columns, break_on_hyphens=False) or [""]]
    if len(wrapped) > 4:
        wrapped = wrapped[:3] + [textwrap.shorten(" ".join(wrapped[3:]), columns, placeholder=" ...")]
    return "\n".join(wrapped)


@dataclass
class _Box:
    """A rectangle of the figure in inches from its top-left corner, turned into figure fractions."""

    fig: Figure
    left: float
    top: float
    right: float
    bottom: float

    def frac(self) -> dict[str, float]:
        w, h = self.fig.get_size_inches()
        return {"left": self.left / w, "right": self.right / w, "top": 1 - self.top / h, "bottom": 1 - self.bottom / h}

    def text(self, y_in: float, text: str, **kwargs: Any) -> None:
        """Centred text ``y_in`` inches below the box's top edge."""
        w, h = self.fig.get_size_inches()
        self.fig.text((self.left + self.right) / 2 / w, 1 - (self.top + y_in) / h, text, ha="center", va="top", **kwargs)


def draw_report(data: ReportData) -> Figure:
    """The report figure of ``data`` (a matplotlib Figure on the Agg canvas; nothing is written).

    The panels sit at fixed places (inches; no automatic layout, which would cost most of the drawing time).
    """
    columns, series = history_series(data.history)
    history_rows = math.ceil(len(columns) / HISTORY_COLUMNS)
    width, height = _figure_inches(data, history_rows)
    fig = Figure(figsize=(width, height), dpi=DPI)
    fig.text(0.5, 1 - 0.06 / height, _title_lines(data), ha="center", va="top", fontsize=11, linespacing=1.3)
    top = TITLE_IN
    _draw_map(fig, _Box(fig, 0.45, top, 8.75, top + TOP_IN), data)
    panels = [p for p, present in (("fsc", bool(data.fsc)), ("angdist", data.rotations is not None)) if present]
    if panels:
        step = TOP_IN / len(panels)
        for i, panel in enumerate(panels):
            y0, y1 = top + i * step, top + (i + 1) * step
            if panel == "fsc":
                _draw_fsc(fig, _Box(fig, 9.9, y0, width - 0.55, y1), data)
            else:
                _draw_angdist(fig, _Box(fig, 9.5, y0, width - 0.2, y1), data)
    if history_rows:
        y0 = top + TOP_IN
        _draw_history(fig, _Box(fig, 0.65, y0, width - 0.25, height), data, columns, series, history_rows)
    return fig


def _draw_map(fig: Figure, box: _Box, data: ReportData) -> None:
    arrays = report_arrays(data)
    lo, hi = arrays.slice_range
    level_shown = data.contour_level is not None and lo < data.contour_level < hi
    notes = []
    if data.mask is not None:
        notes.append("red: mask at 0.5")
    if level_shown:
        notes.append("yellow bar: ChimeraX level")
    box.text(0.05, f"map: central slices and projections ({data.n}³ voxels of {data.voxel_size:.4g} Å)"
             + (f"; {', '.join(notes)}" if notes else ""), fontsize=10)
    grid = fig.add_gridspec(2, 3, **_Box(fig, box.left, box.top + 0.65, box.right, box.bottom - 0.3).frac(),
                            wspace=0.12, hspace=0.28)
    axes = np.array([[fig.add_subplot(grid[r, c]) for c in range(3)] for r in range(2)])
    c = data.n // 2
    rows = ((arrays.slices, arrays.mask_slices, arrays.slice_range, "slice"),
            (arrays.projections, arrays.mask_projections, arrays.projection_range, "sum"))
    for r, (images, masks, (lo, hi), kind) in enumerate(rows):
        shown = None
        for col, axis in enumerate(AXES):
            ax = axes[r, col]
            image = images[axis]
            shown = ax.imshow(image, cmap="gray", vmin=lo, vmax=hi, origin="lower", interpolation="nearest")
            h_name, v_name = _IMAGE_AXES[axis]
            ax.set_xlabel(h_name, fontsize=8, labelpad=1)
            ax.set_ylabel(v_name, fontsize=8, labelpad=1)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"slice {axis} = {c}" if kind == "slice" else f"sum along {axis}", fontsize=9, pad=3)
            if masks is not None and masks[axis].max() > 0.5 > masks[axis].min():
                ax.contour(masks[axis], levels=[0.5], colors="red", linewidths=0.8)
        assert shown is not None
        bar = fig.colorbar(shown, ax=list(axes[r]), shrink=0.9, pad=0.015, aspect=18)
        bar.ax.tick_params(labelsize=7)
        bar.set_label("density" if kind == "slice" else "projected density", fontsize=8)
        if kind == "slice" and level_shown and data.contour_level is not None:
            bar.ax.axhline(data.contour_level, color="gold", lw=2.0)


def _draw_fsc(fig: Figure, box: _Box, data: ReportData) -> None:
    from cryocli.plots import _angstrom_axis

    grid = fig.add_gridspec(1, 1, **_Box(fig, box.left, box.top + 0.6, box.right, box.bottom - 0.62).frac())
    ax = fig.add_subplot(grid[0, 0])
    fmax = 0.0
    thresholds: list[float] = []
    for i, (label, (freq_values, fsc_values)) in enumerate(data.fsc.items()):
        freq = np.asarray(freq_values, dtype=np.float64)
        fsc = np.asarray(fsc_values, dtype=np.float64)
        threshold = float(data.fsc_thresholds.get(label, GOLD_STANDARD_THRESHOLD))
        if threshold not in thresholds:
            thresholds.append(threshold)
        res = data.resolutions.get(label)
        shown = res is not None and math.isfinite(res) and res > 0
        legend = f"{label} (at {threshold:g})" + (f": {res:.2f} Å" if shown else "")
        (line,) = ax.plot(freq, fsc, lw=1.6, label=legend)
        fmax = max(fmax, float(freq.max()) if freq.size else 0.0)
        if shown:
            assert res is not None
            ax.axvline(1.0 / res, color=line.get_color(), ls=":", lw=1.0)
            ax.annotate(f"{res:.2f} Å", xy=(1.0 / res, threshold), xytext=(4, 6 + 11 * i), textcoords="offset points",
                        fontsize=8, color=line.get_color(), fontweight="bold")
    for t in thresholds:
        ax.axhline(t, color="0.5", ls="--", lw=0.8)
        ax.text(fmax, t, f" {t:g}", va="center", ha="left", fontsize=8, color="0.4")
    ax.set_xlim(0, fmax if fmax > 0 else 1)
    ax.set_ylim(min(-0.1, ax.get_ylim()[0]), 1.05)
    ax.set_xlabel("spatial frequency (1/Å)", fontsize=9)
    ax.set_ylabel("Fourier shell correlation", fontsize=9)
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.25)
    ax.legend(fontsize=8, loc="lower left")
    _angstrom_axis(ax)


def viewing_histogram(data: ReportData) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The equal-area histogram the viewing-direction panel draws: ``(counts (ny, nx), rot edges, latitude
    edges)`` in degrees, of the directions folded into the asymmetric unit of ``data.sym`` (latitude = 90 - tilt).
    The cells are fewer for fewer particles (about 4 particles per occupied cell, 18 x 9 to 72 x 36)."""
    from cryocli.analysis.angdist import equal_area_histogram, fold_directions, viewing_directions
    from cryocli.geometry.symmetry import symmetry_order

    assert data.rotations is not None
    rot, tilt = viewing_directions(data.rotations)
    rot, tilt, _ = fold_directions(rot.reshape(-1), tilt.reshape(-1), data.sym)
    effective = len(rot) * symmetry_order(data.sym)  # the unit is 1/|G| of the sphere
    ny = int(np.clip(round(math.sqrt(effective / 8.0)), 9, 36))
    return equal_area_histogram(rot, tilt, bins=(2 * ny, ny))


def _draw_angdist(fig: Figure, box: _Box, data: ReportData) -> None:
    counts, x_edges, y_edges = viewing_histogram(data)
    # The ellipse is twice as wide as high: a box of that shape (plus the colour bar) centred in the space given.
    top, bottom = box.top + 0.62, box.bottom - 0.3
    height = min(bottom - top, (box.right - box.left - 1.3) / 2.0)
    top += (bottom - top - height) / 2.0
    folded = f", folded into the {data.sym} asymmetric unit" if data.sym.upper() != "C1" else ""
    title = f"viewing directions (rot, tilt) of {int(counts.sum()):,} particles{folded}; equal-area (Hammer)"
    lines = textwrap.wrap(title, int((box.right - box.left) / 0.085))  # about 0.085 inch per character at 10 points
    box.text(top - box.top - 0.18 - 0.17 * len(lines), "\n".join(lines), fontsize=10)
    grid = fig.add_gridspec(1, 1, **_Box(fig, box.left, top, box.right, top + height).frac())
    ax = fig.add_subplot(grid[0, 0], projection="hammer")
    shown = ax.pcolormesh(np.radians(x_edges), np.radians(y_edges), np.ma.masked_equal(counts, 0), cmap="viridis",
                          shading="flat", vmin=0.5 if counts.max() >= 1 else 0)
    ax.grid(alpha=0.4, lw=0.5)
    lat_ticks = [-60, -30, 0, 30, 60]
    ax.set_yticks(np.radians(lat_ticks))
    ax.set_yticklabels([f"{90 - t}°" for t in lat_ticks], fontsize=7)
    ax.set_xticks(np.radians([-120, -60, 0, 60, 120]))  # meridians every 60 degrees, labelled below (not on the data)
    ax.set_xticklabels([])
    ax.set_xlabel("rot: −180° (left edge), 0° (centre), 180° (right edge); meridians every 60°", fontsize=8)
    ax.set_ylabel("tilt", fontsize=8)
    bar = fig.colorbar(shown, ax=ax, orientation="vertical", shrink=0.8, pad=0.02, aspect=20)
    bar.ax.tick_params(labelsize=7)
    bar.set_label(f"particles per cell\n(1/{counts.size} of the sphere each)", fontsize=8)


def _draw_history(fig: Figure, box: _Box, data: ReportData, columns: list[str],
                  series: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]], rows: int) -> None:
    runs: list[str] = []
    for column in columns:
        runs += [r for r in series[column] if r not in runs]
    per_run = f"; one line per run: {', '.join(runs)}" if len(runs) > 1 else ""
    box.text(0.05, f"history against {data.epoch_label}{per_run}", fontsize=10)
    grid = fig.add_gridspec(rows, HISTORY_COLUMNS, **_Box(fig, box.left, box.top + HISTORY_HEADER_IN + 0.3, box.right,
                                                          box.bottom - 0.45).frac(), wspace=0.28, hspace=0.6)
    colours = {run: f"C{i % 10}" for i, run in enumerate(runs)}
    epochs = np.concatenate([x for lines in series.values() for x, _ in lines.values()])
    lo, hi = float(epochs.min()), float(epochs.max())
    pad = max(0.5, 0.03 * (hi - lo))
    for k, column in enumerate(columns):
        ax = fig.add_subplot(grid[k // HISTORY_COLUMNS, k % HISTORY_COLUMNS])
        for run, (x, y) in series[column].items():
            # Columns scored now and then (a held-out error per pass, a ground-truth score every N epochs) are NaN in
            # between: drawn as they are, their isolated points would not show at all.
            ok = np.isfinite(y)
            ax.plot(x[ok], y[ok], color=colours[run], lw=1.3, marker="o" if ok.sum() <= 40 else None, ms=2.5,
                    label=run or "run")
        ax.set_title(column, fontsize=9, pad=3)
        ax.set_xlim(lo - pad, hi + pad)  # every panel on the same epochs
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.25)
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4), useOffset=False)
        ax.yaxis.get_offset_text().set_fontsize(7)
        if k + HISTORY_COLUMNS >= len(columns):
            ax.set_xlabel(data.epoch_label, fontsize=8, labelpad=1)
        if k == 0 and len(runs) > 1:
            ax.legend(fontsize=7, loc="best")


def write_report(folder: str | Path, data: ReportData) -> dict[str, str]:
    """Write ``report.png`` (and ``angdist.bild`` when the data has poses) into ``folder``; returns ``{kind: path}``
    (kinds ``report`` and ``angdist``).

    Each file is written under a temporary name and renamed (umask permissions); the same data gives the same
    bytes (the PNG's metadata is fixed). ``angdist.bild`` is RELION's (``*_angdist.bild``) for the poses,
    the box and pixel size of the particles and ``data.sym``.
    """
    from cryocli.analysis.angdist import write_angdist_bild
    from cryocli.geometry.symmetry import parse_symmetry
    from cryocli.io.paths import atomic_write_bytes

    parse_symmetry(data.sym)
    folder = Path(folder)
    fig = draw_report(data)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata=_PNG_METADATA)
    written: dict[str, str] = {}
    report = folder / REPORT_PNG
    atomic_write_bytes(report, buf.getvalue())
    written["report"] = str(report)
    if data.rotations is not None:
        box = data.box if data.box is not None else data.n
        apix = data.pixel_size if data.pixel_size is not None else data.voxel_size
        bild = folder / ANGDIST_BILD
        write_angdist_bild(bild, data.rotations, box, apix, sym=data.sym)
        written["angdist"] = str(bild)
    return written


# ------------------------------------------------------------------------------------------ reading results


def report_source(path: str | Path) -> str:
    """What ``path`` is: ``"cryocli"`` (a run directory of abinitio/refine: ``map.mrc`` with ``particles.star`` or
    ``metrics.csv``) or ``"relion"`` (a Refine3D/Class3D job: ``run_data.star`` or ``run_it*_data.star``).
    Anything else is a :class:`CryocliError` naming the path."""
    p = Path(path)
    if not p.exists():
        raise CryocliError("not found", p)
    if not p.is_dir():
        raise CryocliError("not a folder: give a cryocli run directory (abinitio/refine -o) or a RELION "
                           "Refine3D/Class3D job directory", p)
    if (p / "map.mrc").is_file() and ((p / "particles.star").is_file() or (p / "metrics.csv").is_file()):
        return "cryocli"
    if _relion_prefix(p, required=False) is not None:
        return "relion"
    raise CryocliError("neither a cryocli run directory (map.mrc with particles.star or metrics.csv) nor a RELION "
                       "Refine3D/Class3D job directory (run_data.star or run_it*_data.star)", p)


def read_report(path: str | Path, mass_kda: float | None = None, sym: str | None = None) -> ReportData:
    """:func:`report_from_run_directory` or :func:`report_from_relion_job`, as :func:`report_source` tells."""
    if report_source(path) == "cryocli":
        return report_from_run_directory(path, mass_kda=mass_kda, sym=sym)
    return report_from_relion_job(path, mass_kda=mass_kda, sym=sym)


def _check_sym(sym: str | None) -> None:
    if sym is not None:
        from cryocli.geometry.symmetry import parse_symmetry

        parse_symmetry(sym)


def _rotations_of(table: Any) -> np.ndarray | None:
    import torch

    from cryocli.geometry.rotations import euler_to_matrix

    angles = table.euler_angles
    if angles is None:
        return None
    t = torch.from_numpy(angles)
    return euler_to_matrix(t[:, 0], t[:, 1], t[:, 2]).numpy()


def _particle_geometry(table: Any, n: int, voxel_size: float) -> tuple[int, float]:
    try:
        box = table.box_size
    except CryocliError:
        box = None
    try:
        apix = table.common_pixel_size() if table.has_pixel_size else voxel_size
    except CryocliError:
        apix = voxel_size
    return (int(box) if box is not None else n), float(apix)


def _contour(volume: np.ndarray, voxel_size: float, mass_kda: float | None,
             diameter_A: float | None) -> tuple[float | None, str | None]:
    from cryocli.analysis.contour import contour_level

    try:
        level, basis = contour_level(volume, voxel_size, mass_kda=mass_kda,
                                     diameter_A=diameter_A if diameter_A and diameter_A > 0 else None)
    except CryocliError:
        if mass_kda is not None:
            raise
        return None, None
    return float(level), basis


def _masked_curves(half1: np.ndarray, half2: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
    """The unmasked and the masked (phase-randomisation corrected, as relion_postprocess) FSC of two half maps."""
    from cryocli.analysis.fsc import corrected_masked_fsc, fsc_curve

    try:
        curves = corrected_masked_fsc(half1, half2, mask)
    except ValueError:  # never below 0.8: nothing to randomise, the masked FSC as it is
        return {"half maps, unmasked": fsc_curve(half1, half2), "half maps, masked": fsc_curve(half1 * mask, half2 * mask)}
    return {"half maps, unmasked": curves.unmasked, "half maps, masked (corrected)": curves.corrected}


def _read_mask(path: Path, shape: tuple[int, ...]) -> np.ndarray | None:
    from cryocli.io.mrc import read_map

    mask = read_map(path).data
    if mask.shape != shape:
        raise CryocliError(f"the mask's box {mask.shape[::-1]} differs from the map's {shape[::-1]} (x, y, z voxels)", path)
    return np.clip(mask, 0.0, 1.0)


def _log_events(path: Path) -> dict[str, dict[str, Any]]:
    """The last ``start`` and ``finish`` records of a run's ``log.jsonl`` (empty when missing)."""
    events: dict[str, dict[str, Any]] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return events
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("event") in ("start", "finish"):
            events[record["event"]] = record
    return events


def _star_header_command(path: Path) -> str | None:
    """``refine --method relion`` from the ``# Written by cryocli ...`` line of a cryocli STAR file."""
    try:
        with open(path, encoding="utf-8") as fh:
            first = fh.readline()
    except OSError:
        return None
    match = re.match(r"#\s*Written by cryocli (.+)", first)
    return match.group(1).strip() if match else None


def _map_command(path: Path) -> str | None:
    import mrcfile

    try:
        with mrcfile.open(path, header_only=True, permissive=True) as mrc:
            labels = [str(label) for label in mrc.get_labels()]
    except Exception:  # an unreadable header: read_map reports it
        return None
    for label in labels:
        if label.startswith("cryocli "):
            return label[len("cryocli "):].strip()
    return None


def _finite(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) and number > 0 else None


def report_from_run_directory(path: str | Path, mass_kda: float | None = None, sym: str | None = None) -> ReportData:
    """The :class:`ReportData` of a cryocli run directory (``abinitio -o``, ``refine -o``).

    Reads ``map.mrc``, ``particles.star`` (poses), ``metrics.csv`` (history), ``fsc.star`` (the gold-standard
    FSC, read at 0.143), ``half1_unfil.mrc``/``half2_unfil.mrc`` with ``mask.mrc`` when present (masked and
    unmasked FSC), ``model.star`` and ``log.jsonl`` (the command, the symmetry, the particle diameter, the
    resolutions reported and the FSC against a ground truth, read at 0.5). ``mass_kda`` chooses the contour
    level (else the particle diameter, else 0.8 x the box); ``sym`` overrides the run's symmetry.
    """
    import starfile

    from cryocli.analysis.fsc import shell_frequency, threshold_crossing
    from cryocli.io.mrc import read_map
    from cryocli.io.star import read_star

    _check_sym(sym)
    folder = Path(path)
    if report_source(folder) != "cryocli":
        raise CryocliError("not a cryocli run directory (no map.mrc with particles.star or metrics.csv)", folder)
    volume = read_map(folder / "map.mrc")
    n, vs = int(volume.data.shape[0]), float(volume.voxel_size)
    events = _log_events(folder / "log.jsonl")
    start, finish = events.get("start", {}), events.get("finish", {})
    config = start.get("config") if isinstance(start.get("config"), dict) else {}
    assert isinstance(config, dict)
    command = (_star_header_command(folder / "model.star") or _star_header_command(folder / "fsc.star")
               or _map_command(folder / "map.mrc") or (str(start["method"]) if start.get("method") else "cryocli run"))

    fsc: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    thresholds: dict[str, float] = {}
    resolutions: dict[str, float] = {}
    resolution: float | None = None
    if (folder / "fsc.star").is_file():
        table = starfile.read(folder / "fsc.star", always_dict=True)
        frame = next(iter(table.values()))
        curve = np.asarray(frame["rlnFourierShellCorrelation"], dtype=np.float64)
        if len(curve) != n // 2 + 1:
            raise CryocliError(f"{len(curve)} shells, the map's box {n} has {n // 2 + 1}", folder / "fsc.star")
        label = "gold standard (half maps)"
        fsc[label] = (shell_frequency(n, vs), curve)
        thresholds[label] = GOLD_STANDARD_THRESHOLD
        resolution = _finite(finish.get("gold_standard_resolution_A"))
        if resolution is None:
            resolution = threshold_crossing(curve, n, vs, GOLD_STANDARD_THRESHOLD).resolution
        resolutions[label] = resolution
    mask = _read_mask(folder / "mask.mrc", volume.data.shape) if (folder / "mask.mrc").is_file() else None
    halves = [folder / f"half{i}_unfil.mrc" for i in (1, 2)]
    if mask is not None and all(h.is_file() for h in halves):
        a, b = (read_map(h).data for h in halves)
        for label, curve in _masked_curves(a, b, mask).items():
            fsc[label] = (shell_frequency(n, vs), curve)
            thresholds[label] = GOLD_STANDARD_THRESHOLD
            resolutions[label] = threshold_crossing(curve, n, vs, GOLD_STANDARD_THRESHOLD).resolution
    truth = finish.get("fsc_vs_truth")
    if isinstance(truth, list) and len(truth) == n // 2 + 1:
        label = "map vs ground truth"
        curve = np.asarray(truth, dtype=np.float64)
        fsc[label] = (shell_frequency(n, vs), curve)
        thresholds[label] = TRUTH_THRESHOLD
        res = _finite(finish.get("res_vs_truth_fsc05_A"))
        # Written on the FSC panel as "vs ground truth", never in the title: the title's resolution is the run's
        # own (gold-standard) figure.
        resolutions[label] = res if res is not None else threshold_crossing(curve, n, vs, TRUTH_THRESHOLD).resolution

    history: list[dict[str, Any]] = []
    if (folder / "metrics.csv").is_file():
        with open(folder / "metrics.csv", encoding="utf-8", newline="") as fh:
            history = [dict(row) for row in csv.DictReader(fh)]

    rotations = None
    box, apix, n_particles = n, vs, None
    if (folder / "particles.star").is_file():
        particles = read_star(folder / "particles.star")
        rotations = _rotations_of(particles)
        box, apix = _particle_geometry(particles, n, vs)
        n_particles = len(particles)
    run_sym = sym or str(config.get("sym") or "C1")
    level, basis = _contour(volume.data, vs, mass_kda, _finite(config.get("particle_diameter")))
    kind = command.split()[0] if command else ""
    return ReportData(title=f"cryocli {command} ({folder.name})", volume=volume.data, voxel_size=vs, mask=mask, fsc=fsc,
                      fsc_thresholds=thresholds, resolutions=resolutions, resolution_A=resolution, history=history,
                      epoch_label="iteration" if kind == "refine" else "epoch", rotations=rotations, box=box,
                      pixel_size=apix, n_particles=n_particles, sym=run_sym, contour_level=level, contour_basis=basis)


# ----- RELION jobs -------------------------------------------------------------------------------------------

_ITERATION = re.compile(r"^(?P<prefix>.+_it(?P<it>\d+))_data\.star$")


def _relion_prefix(folder: Path, required: bool = True) -> str | None:
    """The output prefix of a RELION job's last result: ``run`` (``run_data.star``), else the last iteration's
    (``run_it025``, ``run_ct3_it025``)."""
    if (folder / "run_data.star").is_file():
        return "run"
    finals = sorted(p.name[: -len("_data.star")] for p in folder.glob("*_data.star")
                    if not _ITERATION.match(p.name) and (folder / (p.name[: -len("_data.star")] + "_optimiser.star")).is_file())
    if finals:
        return finals[0]
    iterations = [(int(m.group("it")), m.group("prefix")) for p in folder.glob("*_it*_data.star")
                  if (m := _ITERATION.match(p.name)) is not None]
    if iterations:
        return max(iterations)[1]
    if required:
        raise CryocliError("not a RELION Refine3D/Class3D job directory (no run_data.star or run_it*_data.star)", folder)
    return None


def _read_blocks(path: Path, blocks: int | None = None) -> dict[str, Any]:
    import starfile

    try:
        data = starfile.read(path, read_n_blocks=blocks, always_dict=True)
    except Exception as exc:  # starfile raises many kinds for a broken file
        raise CryocliError(f"not a readable STAR file ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})",
                           path) from None
    return dict(data)


def _general(block: Any) -> dict[str, Any]:
    """A key-value STAR block as a dict (starfile gives a dict, or a one-row table for some files)."""
    if isinstance(block, dict):
        return block
    if block is not None and hasattr(block, "iloc") and len(block) == 1:
        return {str(k): v for k, v in block.iloc[0].items()}
    return {}


def _relion_sym(folder: Path, prefix: str) -> str | None:
    sampling = folder / f"{prefix}_sampling.star"
    if sampling.is_file():
        general = _general(_read_blocks(sampling, 1).get("sampling_general"))
        if general.get("rlnSymmetryGroup"):
            return str(general["rlnSymmetryGroup"]).strip()
    optimiser = folder / f"{prefix}_optimiser.star"
    if optimiser.is_file():
        with open(optimiser, encoding="utf-8", errors="replace") as fh:
            head = fh.read(4096)
        match = re.search(r"--sym\s+(\S+)", head)
        if match:
            return match.group(1)
    return None


def _relion_history(folder: Path, root: str, class_number: int) -> list[dict[str, Any]]:
    """One row per iteration and half (``run``: half1, half2, or all for Class3D) from ``<root>_it*_model.star``
    (resolution, log-likelihood, average Pmax, the class's accuracies and share) and ``<root>_it*_optimiser.star``
    (the changes of orientations, offsets and classes)."""
    models: dict[int, dict[str, Path]] = {}
    pattern = re.compile(rf"^{re.escape(root)}(?:_ct\d+)?_it(\d+)_(half1_|half2_)?model\.star$")
    for p in folder.glob(f"{root}*_it*_model.star"):
        m = pattern.match(p.name)
        if m:
            run = (m.group(2) or "all_").rstrip("_")
            models.setdefault(int(m.group(1)), {})[run] = p
    rows: list[dict[str, Any]] = []
    for it in sorted(models):
        changes: dict[str, Any] = {}
        optimisers = list(folder.glob(f"{root}*_it{it:03d}_optimiser.star"))
        if optimisers:
            general = _general(_read_blocks(optimisers[0], 1).get("optimiser_general"))
            changes = {"pose_change_deg": general.get("rlnChangesOptimalOrientations"),
                       "offset_change_A": general.get("rlnChangesOptimalOffsets"),
                       "class_change": general.get("rlnChangesOptimalClasses")}
        for run, path in sorted(models[it].items()):
            blocks = _read_blocks(path, 2)
            general = _general(blocks.get("model_general"))
            row: dict[str, Any] = {"run": run, "epoch": it,
                                   "resolution_A": general.get("rlnCurrentResolution"),
                                   "log_likelihood": general.get("rlnLogLikelihood")}
            row.update(changes)
            row["average_pmax"] = general.get("rlnAveragePmax")
            classes = blocks.get("model_classes")
            if classes is not None and hasattr(classes, "iloc") and len(classes) >= class_number:
                c = classes.iloc[class_number - 1]
                row["acc_rot_deg"] = c.get("rlnAccuracyRotations")
                row["acc_trans_A"] = c.get("rlnAccuracyTranslationsAngst", c.get("rlnAccuracyTranslations"))
                if len(classes) > 1:
                    row["class_fraction"] = c.get("rlnClassDistribution")
            row["sigma_offsets_A"] = general.get("rlnSigmaOffsetsAngst", general.get("rlnSigmaOffsets"))
            rows.append({k: v for k, v in row.items() if v is not None})
    if rows and all(r.get("class_change") in (0, 0.0, None) for r in rows) and not any("class_fraction" in r for r in rows):
        for r in rows:
            r.pop("class_change", None)
    return rows


def _relion_paths(folder: Path, prefix: str, class_number: int) -> tuple[Path | None, Path | None, Path | None]:
    """The map, half map 1 and half map 2 of the class (None when missing)."""
    c = f"class{class_number:03d}"
    full = folder / f"{prefix}_{c}.mrc"
    halves = [folder / f"{prefix}_half{i}_{c}_unfil.mrc" for i in (1, 2)]
    if not all(h.is_file() for h in halves):
        halves = [folder / f"{prefix}_half{i}_{c}.mrc" for i in (1, 2)]
    h1, h2 = (h if h.is_file() else None for h in halves)
    return (full if full.is_file() else None), h1, h2


def _relion_model(folder: Path, prefix: str) -> Path | None:
    for name in (f"{prefix}_model.star", f"{prefix}_half1_model.star"):
        if (folder / name).is_file():
            return folder / name
    return None


def _project_path(folder: Path, name: str) -> Path | None:
    """A file named relative to the RELION project (the job's grandparent), the job's parent, or the cwd."""
    if not name or name in ("None", '""'):
        return None
    for base in (folder.parent.parent, folder.parent, Path.cwd()):
        candidate = base / name
        if candidate.is_file():
            return candidate
    return Path(name) if Path(name).is_file() else None


def report_from_relion_job(path: str | Path, mass_kda: float | None = None, sym: str | None = None) -> ReportData:
    """The :class:`ReportData` of a RELION Refine3D or Class3D job directory.

    The last result: ``run_data.star`` (else the last ``run_it*_data.star``), the map ``run_class001.mrc`` (or
    the iteration's; for Class3D the most populated class), the half maps ``run_half1/2_class001_unfil.mrc``,
    ``run_model.star`` (``data_model_class_1``'s ``rlnGoldStandardFsc``, read at 0.143, and RELION's resolution
    ``rlnCurrentResolution``, written on the plot as RELION gives it), the solvent mask named in
    ``run_optimiser.star`` when it exists (then also the unmasked and the corrected masked FSC of the half maps),
    the symmetry of ``run_sampling.star`` (``sym`` overrides it), the particle diameter (contour level without
    ``mass_kda``) and the history from ``run_it*_model.star`` / ``run_it*_optimiser.star`` when present.
    """
    from cryocli.io.mrc import read_map
    from cryocli.io.star import read_star

    _check_sym(sym)
    folder = Path(path)
    if not folder.is_dir():
        raise CryocliError("not a RELION job directory", folder)
    prefix = _relion_prefix(folder)
    assert prefix is not None
    root = re.sub(r"(?:_ct\d+)?_it\d+$", "", prefix)
    model_path = _relion_model(folder, prefix)
    model: dict[str, Any] = {}
    general: dict[str, Any] = {}
    if model_path is not None:
        model = _read_blocks(model_path, 2)
        general = _general(model.get("model_general"))
        classes_total = int(general.get("rlnNrClasses", 1) or 1)
        model = _read_blocks(model_path, 2 + classes_total)
    classes = model.get("model_classes")
    class_number = 1
    if classes is not None and hasattr(classes, "iloc") and len(classes) > 1 and "rlnClassDistribution" in classes:
        class_number = int(np.argmax(np.asarray(classes["rlnClassDistribution"], dtype=np.float64))) + 1
    n_classes = len(classes) if classes is not None and hasattr(classes, "iloc") else 1
    map_path, h1, h2 = _relion_paths(folder, prefix, class_number)
    if map_path is not None:
        m = read_map(map_path)
        volume, vs = m.data, float(m.voxel_size)
    elif h1 is not None and h2 is not None:  # a refinement stopped between iterations: only half maps
        a, b = read_map(h1), read_map(h2)
        volume, vs = 0.5 * (a.data + b.data), float(a.voxel_size)
    else:
        raise CryocliError(f"no map of class {class_number} ({prefix}_class{class_number:03d}.mrc)", folder)
    n = int(volume.shape[0])
    if not vs > 0 and _finite(general.get("rlnPixelSize")):
        vs = float(general["rlnPixelSize"])  # a header without a voxel size

    optimiser_path = folder / f"{prefix}_optimiser.star"
    optimiser = _general(_read_blocks(optimiser_path, 1).get("optimiser_general")) if optimiser_path.is_file() else {}
    mask_file = _project_path(folder, str(optimiser.get("rlnSolventMaskName", "") or ""))
    mask = _read_mask(mask_file, volume.shape) if mask_file is not None else None

    fsc: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    thresholds: dict[str, float] = {}
    resolutions: dict[str, float] = {}
    resolution = _finite(general.get("rlnCurrentResolution"))
    shells = model.get(f"model_class_{class_number}")
    if shells is not None and hasattr(shells, "columns") and "rlnGoldStandardFsc" in shells.columns:
        curve = np.asarray(shells["rlnGoldStandardFsc"], dtype=np.float64)
        if np.any(curve[1:] != 0):
            label = "gold standard (RELION)"
            fsc[label] = (np.asarray(shells["rlnResolution"], dtype=np.float64), curve)
            thresholds[label] = GOLD_STANDARD_THRESHOLD
            if resolution is not None:
                resolutions[label] = resolution
    if mask is not None and h1 is not None and h2 is not None:
        from cryocli.analysis.fsc import shell_frequency, threshold_crossing

        a_data, b_data = read_map(h1).data, read_map(h2).data
        for label, curve in _masked_curves(a_data, b_data, mask).items():
            fsc[label] = (shell_frequency(n, vs), curve)
            thresholds[label] = GOLD_STANDARD_THRESHOLD
            resolutions[label] = threshold_crossing(curve, n, vs, GOLD_STANDARD_THRESHOLD).resolution

    particles = read_star(folder / f"{prefix}_data.star")
    if n_classes > 1 and "rlnClassNumber" in particles.particles.columns:
        members = np.asarray(particles.particles["rlnClassNumber"], dtype=np.int64) == class_number
        particles = particles.subset(members) if members.any() else particles
    rotations = _rotations_of(particles)
    box, apix = _particle_geometry(particles, n, vs)

    refine = (h1 is not None and h2 is not None) or bool(fsc)
    kind = "Refine3D" if refine and n_classes == 1 else "Class3D"
    which = f", class {class_number} of {n_classes}" if n_classes > 1 else ""
    if n_classes > 1 and classes is not None and "rlnEstimatedResolution" in classes:
        resolution = _finite(np.asarray(classes["rlnEstimatedResolution"])[class_number - 1])
    run_sym = sym or _relion_sym(folder, prefix) or "C1"
    level, basis = _contour(volume, vs, mass_kda, _finite(optimiser.get("rlnParticleDiameter")))
    return ReportData(title=f"RELION {kind} ({folder.name}/{prefix}{which})", volume=volume, voxel_size=vs, mask=mask,
                      fsc=fsc, fsc_thresholds=thresholds, resolutions=resolutions, resolution_A=resolution,
                      history=_relion_history(folder, root, class_number), epoch_label="iteration",
                      rotations=rotations, box=box, pixel_size=apix, n_particles=len(particles), sym=run_sym,
                      contour_level=level, contour_basis=basis)
