"""PNG figures through matplotlib's Agg backend: FSC curves, Guinier plots, pose-error histograms.

Every function writes one file atomically (temporary name, then rename) and returns nothing; they
never open a window, so they work on headless machines.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from cryocli.io.paths import default_file_mode  # noqa: E402


def _save(fig: Figure, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Named as cryocli's other temporaries (.NAME.<random>.tmp), so a killed run's leftover is cleaned.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=120, format="png")
        os.chmod(tmp, default_file_mode())  # mkstemp makes it private; outputs follow the umask
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    finally:
        plt.close(fig)


def _angstrom_axis(ax: plt.Axes) -> None:
    """A top x axis with ticks at round resolutions, labelled in Angstrom (frequency = 1 / resolution)."""
    top = ax.twiny()
    lo, hi = ax.get_xlim()
    top.set_xlim(lo, hi)
    ticks: list[float] = []
    for t in (200, 100, 50, 30, 20, 15, 12, 10, 8, 7, 6, 5, 4, 3.5, 3, 2.5, 2, 1.5):
        # Keep labels apart: at least 7% of the axis between neighbouring ticks.
        if lo < 1.0 / t <= hi and (not ticks or 1.0 / t - 1.0 / ticks[-1] >= 0.07 * (hi - lo)):
            ticks.append(t)
    top.set_xticks([1.0 / t for t in ticks])
    top.set_xticklabels([f"{t:g}" for t in ticks])
    top.set_xlabel("resolution (Å)")


def plot_fsc(path: str | Path, curves: Mapping[str, tuple[Sequence[float] | np.ndarray, Sequence[float] | np.ndarray]],
             thresholds: Sequence[float] = (0.143, 0.5), title: str = "",
             resolutions: Mapping[str, float] | None = None) -> None:
    """FSC curves ``{label: (frequency in 1/A, fsc)}`` with dashed threshold lines, to a PNG at ``path``.

    ``resolutions`` (label -> Angstrom) are marked by vertical dotted lines and listed in the legend.
    The bottom axis is spatial frequency (1/A), the top axis the matching resolution (A).
    """
    fig, ax = plt.subplots(figsize=(7.0, 4.6), layout="constrained")
    fmax = 0.0
    for label, (freq_values, fsc) in curves.items():
        freq = np.asarray(freq_values, dtype=float)
        ax.plot(freq, np.asarray(fsc, dtype=float), label=label, lw=1.6)
        fmax = max(fmax, float(freq.max()) if freq.size else 0.0)
    for t in thresholds:
        ax.axhline(t, color="0.5", ls="--", lw=0.8)
        ax.text(fmax, t, f" {t:g}", va="center", ha="left", fontsize=8, color="0.4")
    for label, res in (resolutions or {}).items():
        if np.isfinite(res) and res > 0:
            ax.axvline(1.0 / res, color="0.3", ls=":", lw=1.0)
            ax.plot([], [], " ", label=f"{label}: {res:.2f} Å")
    ax.set_xlim(0, fmax if fmax > 0 else 1)
    ax.set_ylim(min(-0.1, ax.get_ylim()[0]), 1.05)
    ax.set_xlabel("spatial frequency (1/Å)")
    ax.set_ylabel("Fourier shell correlation")
    ax.grid(alpha=0.25)
    ax.legend(fontsize=8, loc="lower left")
    if title:
        ax.set_title(title)
    _angstrom_axis(ax)
    _save(fig, path)


def plot_guinier(path: str | Path, res_squared: Sequence[float] | np.ndarray,
                 curves: Mapping[str, Sequence[float] | np.ndarray],
                 fit: tuple[float, float] | None = None, fit_range: tuple[float, float] | None = None,
                 title: str = "Guinier plot") -> None:
    """ln(amplitude) against 1/d^2 (1/A^2) for each curve; RELION's ``-99`` markers are skipped.

    ``fit`` = (slope A^2, intercept) draws the fitted line over ``fit_range`` = (1/d^2 low, high).
    """
    x = np.asarray(res_squared, dtype=float)
    fig, ax = plt.subplots(figsize=(7.0, 4.6), layout="constrained")
    for label, y_values in curves.items():
        y = np.asarray(y_values, dtype=float)
        ok = y > -99
        ax.plot(x[ok], y[ok], label=label, lw=1.4, marker=".", ms=3)
    if fit is not None:
        lo, hi = fit_range if fit_range else (float(x.min()), float(x.max()))
        xs = np.linspace(lo, hi, 50)
        ax.plot(xs, fit[1] + fit[0] * xs, "k--", lw=1.0, label=f"fit: B = {4 * fit[0]:.0f} Å²")
    ax.set_xlabel("1/d² (1/Å²)")
    ax.set_ylabel("ln(amplitude)")
    ax.grid(alpha=0.25)
    ax.legend(fontsize=8)
    ax.set_title(title)
    _save(fig, path)


def plot_particle_montage(path: str | Path, rows: Sequence[tuple[str, np.ndarray]], title: str = "",
                          column_labels: Sequence[str] = (), caption: str = "", panel_in: float = 1.2,
                          gap_in: float = 0.1, label_in: float = 1.5, title_in: float = 0.9,
                          caption_in: float = 0.6) -> None:
    """A grid of particle images to a PNG at ``path``: one row per ``(label, images (k, n, n))`` in ``rows``,
    one column per particle, each image on its own grey scale (its minimum black, its maximum white).

    The geometry is fixed, so the file's size and every panel's place follow from the arguments (inches
    at 120 dpi): panels of ``panel_in`` square, ``gap_in`` apart; ``label_in`` on the left for the row
    labels, ``title_in`` on top for the title and the ``column_labels``, ``caption_in`` below for the
    ``caption``, 0.1 on the right, and 8 inches wide at least (for the title and caption). Row 0 of each
    array ``[y, x]`` is the top of its panel.
    """
    n_rows = len(rows)
    n_cols = max((len(images) for _, images in rows), default=0)
    width = max(8.0, label_in + n_cols * panel_in + max(n_cols - 1, 0) * gap_in + 0.1)
    height = title_in + n_rows * panel_in + max(n_rows - 1, 0) * gap_in + caption_in
    fig = plt.figure(figsize=(width, height))
    panel_px = panel_in * 120
    for i, (label, images) in enumerate(rows):
        bottom = caption_in + (n_rows - 1 - i) * (panel_in + gap_in)
        for j, image in enumerate(np.asarray(images, dtype=np.float64)):
            left = label_in + j * (panel_in + gap_in)
            ax = fig.add_axes((left / width, bottom / height, panel_in / width, panel_in / height))
            lo, hi = float(image.min()), float(image.max())
            ax.imshow(image, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1, origin="upper",
                      interpolation="nearest" if image.shape[-1] <= panel_px else "antialiased")
            ax.set_axis_off()
            if i == 0 and j < len(column_labels):
                ax.set_title(column_labels[j], fontsize=8, pad=3)
        fig.text((label_in - 0.12) / width, (bottom + panel_in / 2) / height, label, ha="right", va="center",
                 fontsize=9)
    if title:
        fig.text(0.5, 1 - 0.12 / height, title, ha="center", va="top", fontsize=10)
    if caption:
        fig.text(0.1 / width, (caption_in - 0.12) / height, caption, ha="left", va="top", fontsize=7.5,
                 color="0.25", wrap=True)
    _save(fig, path)
