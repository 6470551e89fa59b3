"""What an engine returns: one typed result that the run-directory writer turns into files.

Units: voxel sizes and origins in Angstrom, resolutions in Angstrom, boxes and radii in pixels,
rotations are RELION ``A`` matrices, pose changes in degrees.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
from torch import Tensor


@dataclass
class ModelIteration:
    """One iteration of a refinement's model, as RELION's ``run_model.star`` holds it.

    resolution_A: gold-standard FSC 0.143 (Angstrom). r_max_px: highest shell compared (pixels).
    rot_change_deg / origin_change_px: mean pose and origin changes from the previous iteration.
    healpix_order: HEALPix order of the finest angular sampling used. fsc, ssnr, tau2: per shell
    ``(n // 2 + 1,)``. sigma2: noise power per optics group and shell ``(groups, n // 2 + 1)``.
    """

    iteration: int
    resolution_A: float
    r_max_px: int
    rot_change_deg: float
    origin_change_px: float
    healpix_order: int
    fsc: np.ndarray
    ssnr: np.ndarray
    tau2: np.ndarray
    sigma2: np.ndarray

    def as_state(self) -> dict[str, Any]:
        """Plain values for a checkpoint."""
        return {f.name: np.asarray(getattr(self, f.name)).tolist() if f.name in _ARRAYS else getattr(self, f.name)
                for f in fields(self)}

    @staticmethod
    def from_state(state: dict[str, Any]) -> ModelIteration:
        values: dict[str, Any] = {k: np.asarray(v, dtype=np.float64) if k in _ARRAYS else v for k, v in state.items()}
        return ModelIteration(**values)


_ARRAYS = ("fsc", "ssnr", "tau2", "sigma2")


@dataclass
class HalfAlignment:
    """How the second of two independent ab initio half runs was brought onto the first: the
    correlation after alignment and whether its hand was flipped."""

    score: float
    flipped: bool


GOLD_STANDARD = "gold-standard FSC of independent half runs"
SHARED_POSES = "FSC of half-set reconstructions at shared poses (not independent: over-estimates)"


@dataclass
class MapFilter:
    """How the viewing map (``map.mrc``) was made from the fitted volume (``map_unfil.mrc``).

    fsc_kind: which FSC weighted it (:data:`GOLD_STANDARD` or :data:`SHARED_POSES`). resolution_A: that FSC's
    0.143 crossing, the low-pass (Angstrom). mask_diameter_A: diameter of the soft solvent mask (Angstrom).
    fsc: the FSC used ``(n // 2 + 1,)``. supported: False when that FSC showed no reproducible signal (a failed
    run), so the map was only low-passed to its lowest shells, unweighted.
    """

    fsc_kind: str
    resolution_A: float
    mask_diameter_A: float
    fsc: np.ndarray
    supported: bool = True

    def labels(self) -> list[str]:
        """MRC header labels (at most 80 characters each) describing the filter."""
        kind = "gold-standard FSC" if self.fsc_kind == GOLD_STANDARD else "shared-pose half-set FSC"
        if not self.supported:
            return [f"no reproducible signal by the {kind}: low-pass {self.resolution_A:.1f} A only"[:80],
                    f"solvent-flattened outside a {self.mask_diameter_A:.0f} A sphere; unfiltered: map_unfil.mrc"[:80]]
        return [f"FSC-weighted, low-pass {self.resolution_A:.2f} A ({kind})"[:80],
                f"solvent-flattened outside a {self.mask_diameter_A:.0f} A sphere; unfiltered: map_unfil.mrc"[:80]]


@dataclass
class GroupScales:
    """RELION's per-group intensity scale correction (``data_model_groups`` of ``model.star``): group names,
    particles per group ``(G,)`` and the scale ``(G,)`` (particle-weighted mean 1)."""

    names: list[str]
    particles: np.ndarray
    scale: np.ndarray


@dataclass
class Reconstruction:
    """What an engine returns.

    volume: map ``(n, n, n)`` float32 ``[z, y, x]`` at ``voxel_size`` Angstrom (the engine's box).
    rotations: ``(N, 3, 3)`` RELION ``A`` of the particles the engine saw, in their order.
    origins_angstrom: ``(N, 2)`` ``[x, y]`` RELION origins (rlnOriginX/YAngst) in Angstrom.
    particle_rows: ``(N,)`` 0-based rows of the input table the poses belong to (set by the run).
    half_volumes: the two half maps when the run made them (each from its own half of the data): the ones to
    postprocess, whose FSC the reported resolution is. regularised_half_volumes: a method's regularised half maps
    when they differ from those (sparse-tv), written under their own names.
    particle_columns: method-specific per-particle STAR columns ``{rlnName: (N,)}``.
    metrics: one row per epoch or iteration (what ``metrics.csv`` holds).
    model_history: per-iteration model (refinement only; ``model.star``).
    gold_standard_fsc: ``(n // 2 + 1,)`` FSC between independent half maps, or ``None``.
    resolution_A: gold-standard FSC 0.143 resolution (Angstrom), or ``None`` without half maps.
    halfmaps_resolution_A: FSC 0.143 between the written ``half_volumes`` (RELION's MAP halves for relion; the
    unregularised ones for sparse-tv), or ``None``.
    converged: whether the method's own convergence criterion was met (``None``: it has none).
    inverted: whether the images were multiplied by -1. half_alignment: how the second half run was aligned
    onto the first (ab initio ``--halves``). method_summary: method-specific figures for the run summary,
    printed and logged as they are (never read by the writer or the command line). unfiltered_volume: the
    fitted volume when ``volume`` is a filtered viewing map (ab initio), described by ``map_filter``. symmetry:
    the point group the map was reconstructed with. group_scales: the intensity scale per group (refine
    ``--scale``).
    """

    volume: Tensor
    voxel_size: float
    rotations: Tensor
    origins_angstrom: Tensor
    particle_rows: np.ndarray | None = None
    half_volumes: tuple[Tensor, Tensor] | None = None
    regularised_half_volumes: tuple[Tensor, Tensor] | None = None
    particle_columns: dict[str, np.ndarray] = field(default_factory=dict)
    metrics: list[dict[str, Any]] = field(default_factory=list)
    model_history: list[ModelIteration] = field(default_factory=list)
    gold_standard_fsc: np.ndarray | None = None
    resolution_A: float | None = None
    halfmaps_resolution_A: float | None = None
    converged: bool | None = None
    inverted: bool = False
    half_alignment: HalfAlignment | None = None
    method_summary: dict[str, Any] = field(default_factory=dict)
    unfiltered_volume: Tensor | None = None
    map_filter: MapFilter | None = None
    symmetry: str = "C1"
    group_scales: GroupScales | None = None

    @property
    def box(self) -> int:
        return int(self.volume.shape[-1])

    @property
    def iterations(self) -> int:
        """Epochs or iterations run (of the first half run, for two independent halves)."""
        return len({(m.get("run"), m.get("epoch")) for m in self.metrics if m.get("run") != "half2"})

    def as_state(self) -> dict[str, Any]:
        """Tensors and plain values for a checkpoint."""
        state = {f.name: getattr(self, f.name) for f in fields(self)}
        state["model_history"] = [m.as_state() for m in self.model_history]
        state["half_alignment"] = None if self.half_alignment is None else vars(self.half_alignment).copy()
        state["map_filter"] = None if self.map_filter is None else vars(self.map_filter).copy()
        state["group_scales"] = None if self.group_scales is None else vars(self.group_scales).copy()
        return state

    @staticmethod
    def from_state(state: dict[str, Any]) -> Reconstruction:
        values = dict(state)
        values["model_history"] = [ModelIteration.from_state(m) for m in values.get("model_history", [])]
        if values.get("half_alignment") is not None:
            values["half_alignment"] = HalfAlignment(**values["half_alignment"])
        if values.get("map_filter") is not None:
            values["map_filter"] = MapFilter(**values["map_filter"])
        if values.get("group_scales") is not None:
            values["group_scales"] = GroupScales(**values["group_scales"])
        return Reconstruction(**values)
