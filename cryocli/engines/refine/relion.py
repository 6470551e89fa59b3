"""``refine --method relion``: RELION-style gold-standard 3D auto-refine (expectation-maximisation).

Per iteration, for each half set (``rlnRandomSubset``, drawn if absent) independently:

* E-step (:mod:`cryocli.engines.common.pose_search`): the half's reference, masked by a soft sphere of
  ``particle_diameter``, is compared with every particle at the candidate poses (global search on the
  SO3Grid coarse level at first, local searches around the previous pose once the sampling is refined)
  and in-plane shifts around the current origin; posterior weights over the significant samples.
* M-step: backprojection of ``CTF X / sigma^2`` with the posterior weights (trilinear, as RELION; with
  ``--kernel gaussian`` the trilinear accumulators convolved with Luo's Gaussian kernel's samples make the
  maps, with ``--kernel gaussian-insert`` a second insertion with the paper's 27-point kernel; see
  :mod:`cryocli.engines.common.kernel_backprojection`), the
  gold-standard FSC of the two unregularised trilinear half reconstructions (``relion_reconstruct``'s
  maps at the current poses, so that the resolution measures the poses the same way for every method and
  kernel), and the MAP reconstruction with ``tau^2 = tau2_fudge * SSNR / <weight>`` from that FSC
  (``SSNR = FSC / (1 - FSC)``), as RELION's ``reconstruct`` with ``update_tau2_with_fsc``. The halves are
  averaged below ``low_resol_join_halves`` (40 A) so they stay in one frame; above it they never share
  information.
* Noise: ``sigma^2`` per shell and optics group from the residuals at the most probable poses; with
  ``norm``/``scale`` (RELION's ``--norm``/``--scale``, on by default) also each particle's normalisation
  correction and each group's intensity scale (:mod:`cryocli.engines.refine.intensity`).

Auto-sampling (RELION's ``updateAngularSampling``): each iteration counts whether the resolution
improved and whether the pose changes were large (not within 3% of the smallest so far and above 40% of
the fine sampling); after an iteration with neither, the sampling is refined one HEALPix order (local
searches from level ``local_from_level`` on, around the previous pose with RELION's Gaussian prior) and
the translational grid is set from the estimated accuracy (RELION's rules), unless the fine angular step
is already below 75% of the estimated angular accuracy (RELION's ``calculateExpectedAngularErrors``, see
:func:`~cryocli.engines.common.pose_search.expected_accuracy`): then the run has converged, and one more
iteration compares all frequencies up to Nyquist and joins the halves in its M-step (accumulators summed,
``FSC -> 2 FSC / (1 + FSC)`` for tau^2), as RELION's last iteration. A run that reaches ``epochs``
without converging joins the last iteration's halves.

Poses: ``pose_estimate = "mean"`` (default) keeps, per particle, the posterior mean around the most
probable sample (see :mod:`cryocli.engines.common.pose_search`); ``"best"`` keeps RELION's most probable
sample. The initial reference is low-pass filtered to ``ini_lowpass`` (40 A) and its grey scale is fitted
in the first iteration by the per-pose intensity scale of the likelihood (see ``profile_scale``). Units:
Angstrom for resolutions, diameters and origins; pixels for offsets (of the data's box, like RELION's
``--offset_range``/``--offset_step``); degrees for angles in the metrics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from cryocli import distributed
from cryocli.analysis.fsc import corrected_masked_fsc, relion_resolution_shell, threshold_crossing
from cryocli.engines.common.kernel_backprojection import (
    BackProjectorLike,
    GaussianKernelBackProjector,
    grid_kernel_correction,
    kernel_gridding_correction,
    kernel_on_grid,
)
from cryocli.engines.common.noise_model import NoiseAccumulator, initial_sigma2, sigma2_on_pixels
from cryocli.engines.common.pose_search import PoseSearcher, coarse_radius, particle_accuracies
from cryocli.engines.particles import PRELOAD_CHOICES, ParticleSet, PreparedParticles, prefetching, share_particles
from cryocli.engines.progress import Reporter
from cryocli.engines.protocol import EngineConfig, at_least, positive, register_engine, unknown_choice, within
from cryocli.engines.refine.intensity import IntensityAccumulator, IntensityCorrections, intensity_groups
from cryocli.engines.refine.maps import (
    backproject_samples,
    fsc_to_ssnr,
    half_map_fsc,
    join_low_resolution,
    map_reconstruct,
    shell_tau2,
    unregularised_map,
)
from cryocli.engines.result import GroupScales, ModelIteration, Reconstruction
from cryocli.errors import CryocliError, OptionError
from cryocli.geometry.so3grid import SO3Grid
from cryocli.geometry.symmetry import symmetry_operators
from cryocli.imaging.ctf import compute_ctf
from cryocli.imaging.filters import lowpass_filter
from cryocli.imaging.fourier import fourier_resample_volume, image_to_rfft
from cryocli.imaging.masks import soft_sphere
from cryocli.imaging.point_group import symmetrise_accumulators
from cryocli.imaging.projector import BackProjector, Projector, grid_radius
from cryocli.imaging.shifts import phase_shift
from cryocli.io.dataset import ParticleStack
from cryocli.io.mrc import read_map

#: RELION's MAX_NR_ITER_WO_RESOL_GAIN and MAX_NR_ITER_WO_LARGE_HIDDEN_VARIABLE_CHANGES.
PATIENCE = 1
#: Finest HEALPix order the auto-sampling goes to (0.47 degrees fine step).
MAX_ORDER = 8
#: Backprojection kernels (:mod:`cryocli.engines.common.kernel_backprojection`): RELION's trilinear one, Luo's
#: Gaussian applied on the grid to the trilinear accumulators, and Luo's Gaussian inserted at 27 points per pixel.
KERNELS = ("trilinear", "gaussian", "gaussian-insert")


@dataclass
class RefineConfig(EngineConfig):
    """Options of the refine methods (defaults: RELION 5's auto-refine).

    ref: path of the initial reference map. epochs: most EM iterations before the final join (25).
    ini_lowpass: low-pass of the reference, Angstrom (40). tau2_fudge: RELION's ``--tau2_fudge`` (1).
    sym: point group (C1). healpix_order: HEALPix order of the coarse global search (2: 15 degrees
    coarse, 7.5 degrees after oversampling). offset_range, offset_step: translational search in pixels
    of the data (5, 2). particle_diameter: Angstrom (None: 0.8 x the box). low_resol_join_halves: Angstrom
    (40). kernel: backprojection kernel, one of :data:`KERNELS`. fraction, max_significant: significant
    samples (0.999, 300; 0: no cap, as RELION's auto-refine ``--maxsig -1``; see below). local_from_level:
    first grid level searched locally (1: HEALPix order 3).
    incr_size: Fourier pixels compared beyond the current resolution (10). pose_estimate: ``mean`` (the
    posterior mean around the most probable pose) or ``best`` (RELION's most probable pose).
    accuracy_particles: particles used to estimate the angular accuracy each iteration (200).
    solvent_mask: path of a mask map in [0, 1] (RELION's ``--solvent_mask``) that replaces the soft sphere of
    ``particle_diameter`` on the references. solvent_correct_fsc: the gold-standard FSC is computed inside that
    mask, corrected by phase randomisation (RELION's ``--solvent_correct_fsc``), for the resolution and tau^2.
    norm, scale: RELION's per-particle normalisation correction and per-group intensity scale correction
    (``--norm``, ``--scale``; on, as in RELION's auto-refine job), see :mod:`cryocli.engines.refine.intensity`.
    minimum_angular_sampling: degrees (RELION's ``--minimum_angular_sampling``; 0: none): do not stop refining
    the angular sampling while the fine step is coarser than this, even when the accuracy estimate would.
    preload: hold the prepared images and their transforms on the device (``yes``), read them from the stacks
    every iteration (``no``: memory does not grow with the particle count), or ``auto``: yes while the images
    and their transforms take at most :data:`~cryocli.engines.particles.PRELOAD_BYTES` (per torchrun rank).

    Why a cap of 300 significant samples where RELION's auto-refine has none: with a 40 A reference the first
    global iterations have a nearly flat posterior (about 60,000 of 97,000 coarse samples significant per
    particle on simulated 4AKE at SNR 0.05), and inserting all of them costs far more than it gives. On 300
    such particles (``benchmarks/refine.py --max-significant N``, 2 idle cores) the median pose error was
    6.89 / 6.72 / 6.19 / 6.33 / 6.28 degrees at SNR 0.05 and 4.24 / 3.83 / 3.86 / 3.81 / 3.84 at SNR 0.1 for caps
    of 16 / 100 / 300 / 1000 / 3000 (bootstrap standard error of a median about 0.3 and 0.12 degrees), in 26 /
    - / 54 / 120 / 196 s at SNR 0.05: the gain stops by 300, and the samples that matter are those of the global
    iterations (capping only the local ones at 16 changes nothing). Memory does not grow with the cap (the fine
    pass and the insertion run in bounded chunks).
    """

    epochs: int = 25
    ref: str | None = None
    ini_lowpass: float = 40.0
    tau2_fudge: float = 1.0
    sym: str = "C1"
    healpix_order: int = 2
    offset_range: float = 5.0
    offset_step: float = 2.0
    particle_diameter: float | None = None
    low_resol_join_halves: float = 40.0
    kernel: str = "trilinear"
    fraction: float = 0.999
    max_significant: int = 300
    local_from_level: int = 1
    incr_size: int = 10
    pose_estimate: str = "mean"
    accuracy_particles: int = 200
    preload: str = "auto"
    solvent_mask: str | None = None
    solvent_correct_fsc: bool = False
    norm: bool = True
    scale: bool = True
    minimum_angular_sampling: float = 0.0

    def validate(self) -> None:
        super().validate()
        from cryocli.geometry.symmetry import parse_symmetry

        if self.ref is None:
            raise OptionError("ref", None, "a reference map is required")
        positive(self, "ini_lowpass")
        positive(self, "tau2_fudge")
        within(self, "healpix_order", 0, MAX_ORDER - 1)
        positive(self, "offset_step")
        at_least(self, "offset_range", 0)
        if self.offset_range > 0 and self.offset_step > self.offset_range:
            raise OptionError("offset_step", self.offset_step, f"larger than the offset range {self.offset_range:g}")
        if self.particle_diameter is not None:
            positive(self, "particle_diameter")
        positive(self, "low_resol_join_halves")
        if self.kernel not in KERNELS:
            raise unknown_choice("kernel", self.kernel, KERNELS)
        if self.preload not in PRELOAD_CHOICES:
            raise unknown_choice("preload", self.preload, PRELOAD_CHOICES)
        if self.pose_estimate not in ("mean", "best"):
            raise unknown_choice("pose_estimate", self.pose_estimate, ("mean", "best"))
        within(self, "fraction", 1e-6, 1.0)
        at_least(self, "max_significant", 0)
        at_least(self, "incr_size", 0)
        at_least(self, "accuracy_particles", 1)
        at_least(self, "minimum_angular_sampling", 0)
        try:
            parse_symmetry(self.sym)
        except CryocliError as exc:
            raise OptionError("sym", self.sym, exc.message) from None
        if self.solvent_correct_fsc and self.solvent_mask is None:
            raise OptionError("solvent_correct_fsc", True, "needs a solvent mask")


@dataclass
class MStepState:
    """What a method's M-step carries from one iteration to the next (nothing for RELION's MAP step).

    metrics: per-iteration figures of the M-step (they join the iteration's metrics row).
    """

    metrics: dict[str, float] = field(default_factory=dict)

    def as_state(self) -> dict[str, Any]:
        """For the checkpoint."""
        return {}

    def restore(self, state: dict[str, Any]) -> None:
        """Take back :meth:`as_state` from a checkpoint (``--resume``)."""


def euler_axes_distance(a: Tensor, b: Tensor) -> Tensor:
    """RELION's angular distance between poses ``a`` and ``b`` ``(..., 3, 3)`` (radians): the mean over the three
    rows of the rotation matrices (the Euler axes) of the angle between corresponding rows
    (``HealpixSampling::calculateAngularDistance``). For a turn by ``t`` it lies between ``2 t / 3`` (about
    one of the axes) and ``t``, below the geodesic angle ``t``; the auto-sampling's thresholds on pose changes
    (40% of the fine step) are set in this measure."""
    cos = (a * b).sum(-1).clamp(-1.0, 1.0)
    return torch.arccos(cos).mean(-1)


def symmetric_distance(a: Tensor, b: Tensor, sym_ops: Tensor | None) -> Tensor:
    """RELION's angular distance (:func:`euler_axes_distance`, radians) between poses ``a`` and ``b`` ``(N, 3, 3)``
    modulo the point group: a symmetric map projects alike at ``b`` and ``b L`` for every operator ``L``
    ``(K, 3, 3)``, and RELION takes the minimum over them too."""
    a64, b64 = a.double(), b.double()
    if sym_ops is None:
        return euler_axes_distance(a64, b64)
    ops = sym_ops.to(b64)
    return euler_axes_distance(a64[None], b64[None] @ ops[:, None]).min(0).values


@dataclass
class Sampling:
    """Auto-sampling state (RELION's ``HealpixSampling`` + convergence counters).

    level: coarse SO3Grid level; local: local searches; offset_range, offset_step: translational grid in
    pixels of the working box (the fine step is half the step); best_resolution: Angstrom; last_shell: the
    previous iteration's resolution shell (RELION's ``current_resolution``, in Fourier pixels).
    """

    level: int
    local: bool
    offset_range: float
    offset_step: float
    best_resolution: float = math.inf
    last_shell: int = -1
    iters_without_gain: int = 0
    iters_without_change: int = 0
    smallest_rot_change: float = 999.0
    smallest_offset_change: float = 999.0


def update_sampling(s: Sampling, resolution: float, shell: int, change_deg: float, change_px: float, acc_rot: float,
                    acc_trans: float, fine_step_deg: float, max_level: int, local_from_level: int,
                    minimum_step_deg: float = 0.0) -> bool:
    """RELION's auto-refine bookkeeping after one iteration (``updateOverallChangesInHiddenVariables``,
    ``updateAngularSampling``, ``checkConvergence``); refines ``s`` in place and returns True once converged.

    resolution: Angstrom; shell: the last Fourier shell (pixels) before the gold-standard FSC first drops below
    0.143 (:func:`~cryocli.analysis.fsc.relion_resolution_shell`). As RELION's ``updateCurrentResolution``, the
    resolution has improved only when this shell is beyond the previous iteration's: RELION's resolution is a
    whole shell, so a crossing creeping outwards within one shell is no gain (counting it as one kept
    sparse-tv on set_3j9g iterating to the epoch limit, 24 iterations where 13 reach the same map).
    change_deg: mean angular change of the poses; change_px: RMS change of the
    origins per coordinate (pixels); acc_rot (degrees), acc_trans (pixels): estimated accuracies;
    fine_step_deg: the current fine angular step. minimum_step_deg: RELION's ``--minimum_angular_sampling``
    (0: none): the sampling keeps being refined while the fine step is coarser than it, whatever the accuracy
    estimate says.
    """
    s.best_resolution = min(s.best_resolution, resolution)
    s.iters_without_gain = 0 if shell > s.last_shell else s.iters_without_gain + 1
    s.last_shell = shell
    fine_px = s.offset_step / 2.0
    small_rot = change_deg < 0.4 * fine_step_deg or 1.03 * change_deg >= s.smallest_rot_change
    small_trans = change_px < 0.4 * fine_px or 1.03 * change_px >= s.smallest_offset_change
    s.iters_without_change = s.iters_without_change + 1 if (small_rot and small_trans) else 0
    s.smallest_rot_change = min(s.smallest_rot_change, change_deg)
    s.smallest_offset_change = min(s.smallest_offset_change, change_px)
    if s.iters_without_gain < PATIENCE or s.iters_without_change < PATIENCE:
        return False
    fine_enough = fine_step_deg < 0.75 * acc_rot and not (minimum_step_deg > 0 and fine_step_deg > minimum_step_deg)
    if fine_enough or s.level >= max_level:
        return True
    # Translations as RELION: fine step at most 1.5 px and 75% of the accuracy; range five times the last
    # change, at most 30% wider than before, at least 1.5 steps and at most 4 steps.
    new_step = min(1.5, 0.75 * acc_trans) * 2.0
    new_range = max(min(1.3 * s.offset_range, 5.0 * change_px), 1.5 * new_step)
    if new_range > 4.0 * new_step:
        new_range /= 2.0
    if new_range > 4.0 * new_step:
        new_step = new_range / 4.0
    if new_step <= s.offset_step:
        s.offset_step, s.offset_range = new_step, new_range
    s.level += 1
    s.local = s.level >= local_from_level
    s.iters_without_gain = s.iters_without_change = 0
    s.smallest_rot_change = s.smallest_offset_change = 999.0
    return False


class ParticleSpectra:
    """The particles' half transforms and CTFs ``(B, n, n // 2 + 1)`` by index: computed once and kept when
    they fit in ``max_bytes`` (every EM iteration reads every particle), else computed per batch."""

    def __init__(self, parts: ParticleSet, device: torch.device,
                 max_bytes: int = 2**30) -> None:
        self.parts, self.device = parts, device
        n = parts.box
        self.n, self.apix = n, parts.pixel_size
        per_image = n * (n // 2 + 1) * (8 + (4 if parts.ctf is not None else 0))
        self._images: Tensor | None = None
        self._ctf: Tensor | None = None
        if len(parts) * per_image <= max_bytes:
            all_idx = torch.arange(len(parts), device=device)
            self._images, self._ctf = self._compute(all_idx)

    def _compute(self, idx: Tensor, host: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        read = idx if host is None else host  # streamed images are read by host indices (no wait for the GPU)
        images = torch.cat([image_to_rfft(self.parts.images[read[s:s + 1024]]) for s in range(0, len(idx), 1024)])
        ctf = None
        if self.parts.ctf is not None:
            ctf = torch.cat([compute_ctf(self.parts.ctf.index(idx[s:s + 1024]).to(self.device), self.n,
                                         self.apix, device=self.device).to(torch.float32)
                             for s in range(0, len(idx), 1024)])
        return images, ctf

    def get(self, idx: Tensor, host: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Half transforms (complex) and CTFs (float32, or None) of particles ``idx`` (on the device; ``host``:
        the same indices on the host, to read streamed images by)."""
        if self._images is None:
            return self._compute(idx, host)
        return self._images[idx], (self._ctf[idx] if self._ctf is not None else None)


@register_engine
class RelionRefineEngine:
    """RELION 3D auto-refine: gold-standard EM with the Fourier-shell (tau^2) prior."""

    name: ClassVar[str] = "relion"
    kind: ClassVar[str] = "refine"
    summary: ClassVar[str] = ("RELION 3D auto-refine: gold-standard expectation-maximisation over poses and "
                              "shifts, MAP reconstruction with tau^2 from the FSC (Scheres 2012).")
    config_class: ClassVar[type[EngineConfig]] = RefineConfig
    #: Shares its particles over torchrun's ranks (:mod:`cryocli.distributed`).
    data_parallel: ClassVar[bool] = True

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)

    # ------------------------------------------------------------------------------------------ M-step hooks
    def new_backprojectors(self, n: int, cfg: RefineConfig) -> list[BackProjectorLike]:
        """The trilinear backprojector (RELION's, whose unregularised halves give the gold-standard FSC),
        and the paper's 27-point Gaussian-kernel one when ``--kernel gaussian-insert`` makes the maps (``gaussian``
        makes them from the trilinear accumulators, :meth:`_map_accumulators`)."""
        bps: list[BackProjectorLike] = [BackProjector(n, device=self.device)]
        if cfg.kernel == "gaussian-insert":
            bps.append(GaussianKernelBackProjector(n, device=self.device))
        return bps

    def gridding_fix(self, volume: Tensor, cfg: RefineConfig) -> Tensor:
        """Replace the trilinear (sinc^2) gridding correction by the Gaussian kernel's where that kernel is used."""
        n = volume.shape[-1]
        if cfg.kernel == "gaussian":
            return volume * grid_kernel_correction(n, device=volume.device)
        if cfg.kernel == "gaussian-insert":
            return volume * kernel_gridding_correction(n, trilinear=True, device=volume.device)
        return volume

    def new_m_step_state(self) -> MStepState:
        """The M-step's state at the start of a run."""
        return MStepState()

    def begin_m_step(self, state: MStepState, accumulators: list[tuple[Tensor, Tensor]], n: int, r_max: int,
                     cfg: RefineConfig) -> None:
        """Hook called once per iteration before the halves are reconstructed (nothing for RELION)."""
        state.metrics = {}

    def reconstruct_half(self, state: MStepState, data: Tensor, weight: Tensor, n: int, fsc: np.ndarray,
                         previous: Tensor, r_max: int, cfg: RefineConfig, joined: bool = False,
                         half: int = 0) -> Tensor:
        """RELION's MAP reconstruction of one half (or, ``joined``, of the summed halves)."""
        ssnr = fsc_to_ssnr(fsc, cfg.tau2_fudge, joined)
        return self.gridding_fix(map_reconstruct(data, weight, n, 2, ssnr, r_max), cfg)

    # ------------------------------------------------------------------------------------------ run
    def run(self, data: ParticleStack, config: EngineConfig, reporter: Reporter) -> Reconstruction:
        cfg = config if isinstance(config, RefineConfig) else RefineConfig(**config.as_dict())
        cfg.validate()
        ctx = self._setup(data, cfg)
        m_state = self.new_m_step_state()
        dev, n, apix = self.device, ctx.n, ctx.apix
        saved = reporter.resume_state()
        mine = torch.as_tensor(ctx.rows, dtype=torch.long)
        if saved is None:
            ref = self._reference(cfg, n, apix)
            refs = [ref.clone(), ref.clone()]
            rot = torch.eye(3, device=dev).expand(len(ctx.parts), 3, 3).clone()
            origins = (data.shifts_angstrom[mine].to(dev) if data.shifts_angstrom is not None
                       else torch.zeros((len(ctx.parts), 2), device=dev))
            sigma2 = initial_sigma2(ctx.parts.images, ctx.groups, ctx.n_groups, across_ranks=ctx.sharded)
            intensity = self._intensity_start(data, cfg, ctx.rows)
            scale_px = data.box / n  # offsets are given in pixels of the data
            sampling = Sampling(0, False, cfg.offset_range / scale_px, cfg.offset_step / scale_px)
            start, fsc, final_pass = 1, np.zeros(n // 2 + 1), False
            history: list[ModelIteration] = []
        else:
            refs = [saved["refs"][0].to(dev), saved["refs"][1].to(dev)]
            # per-particle state is saved whole: each rank takes its share (any number of ranks may resume)
            rot, origins = saved["rot"][mine].to(dev), saved["origins"][mine].to(dev)
            sigma2 = saved["sigma2"].to(dev)
            sampling, fsc = Sampling(**saved["sampling"]), np.asarray(saved["fsc"])
            history = [ModelIteration.from_state(h) for h in saved["history"]]
            start, final_pass = int(saved["iteration"]) + 1, bool(saved.get("final_pass", False))
            m_state.restore(saved.get("m_step", {}))
            intensity = self._intensity_start(data, cfg, ctx.rows)
            if "intensity" in saved:  # checkpoints written before --norm/--scale start them at 1
                intensity.restore(saved["intensity"], ctx.rows)
        reporter.start(cfg.epochs, self.name, completed=start - 1)
        accumulators: list[tuple[Tensor, Tensor]] = []
        trilinear: list[tuple[Tensor, Tensor]] = []
        r_max = self._r_max(n, apix, sampling.best_resolution, cfg)
        converged = False
        it = start
        while it <= cfg.epochs or final_pass:
            # RELION's last iteration after convergence compares all frequencies up to Nyquist.
            r_max = n // 2 if final_pass else self._r_max(n, apix, min(sampling.best_resolution, cfg.ini_lowpass), cfg)
            e = self._e_step(ctx, refs, rot, origins, sigma2, intensity, sampling, r_max, first=(it == 1))
            turned = torch.rad2deg(symmetric_distance(e.rot, rot, ctx.sym_ops))
            moved = ((e.origins - origins) / apix).pow(2).sum(1)
            stats = distributed.sum_over_ranks(
                [float(turned.sum()), float(moved.sum()), float(ctx.stats["max_prob"].sum()),
                 float(ctx.stats["n_sig"].sum()), float(e.projected)], dev)
            change_deg, change_px = stats[0] / ctx.total, math.sqrt(stats[1] / ctx.total / 2)
            rot, origins, accumulators, trilinear = e.rot, e.origins, e.accumulators, e.trilinear
            sigma2 = e.noise.sigma2(sigma2)
            intensity = e.intensity.updated(scale_too=it > 1)
            fsc = self._gold_standard_fsc(e.trilinear, n, r_max, ctx.mask if cfg.solvent_correct_fsc else None)
            res = threshold_crossing(fsc, n, apix, 0.143).resolution
            self.begin_m_step(m_state, accumulators, n, r_max, cfg)
            maps = [self.reconstruct_half(m_state, d, w, n, fsc, refs[i], r_max, cfg, half=i + 1)
                    for i, (d, w) in enumerate(accumulators)]
            refs = list(join_low_resolution(maps[0], maps[1], apix, cfg.low_resol_join_halves))
            fine_step = self._fine_step(ctx.grid, sampling.level)
            whole_norm = distributed.gather_shards(intensity.norm, ctx.total)
            metrics = {"resolution_A": res, "r_max_px": r_max, "r_coarse_px": e.r_coarse, "level": sampling.level,
                       "local": sampling.local, "fine_step_deg": fine_step,
                       "offset_step_px": sampling.offset_step, "offset_range_px": sampling.offset_range,
                       "rot_change_deg": change_deg, "origin_change_px": change_px, "acc_rot_deg": e.acc_rot,
                       "acc_trans_px": e.acc_trans, "max_prob_mean": stats[2] / ctx.total,
                       "n_significant_mean": stats[3] / ctx.total, "slices_projected": int(stats[4]),
                       "norm_correction_sd": float(whole_norm.std()) if len(whole_norm) > 1 else 0.0,
                       "group_scale_min": float(intensity.scale.min()), "group_scale_max": float(intensity.scale.max()),
                       **m_state.metrics, "final_pass": final_pass}
            converged = final_pass or update_sampling(sampling, res, relion_resolution_shell(fsc), change_deg,
                                                      change_px, e.acc_rot, e.acc_trans, fine_step, ctx.max_level,
                                                      cfg.local_from_level, cfg.minimum_angular_sampling)
            ssnr = fsc_to_ssnr(fsc, cfg.tau2_fudge)
            tau2 = np.mean([shell_tau2(w, n, 2, ssnr, r_max) for _, w in accumulators], axis=0)
            history.append(ModelIteration(
                iteration=it, resolution_A=res, r_max_px=r_max, rot_change_deg=change_deg,
                origin_change_px=change_px, healpix_order=cfg.healpix_order + sampling.level + 1, fsc=fsc.copy(),
                ssnr=ssnr, tau2=tau2, sigma2=sigma2.cpu().numpy().astype(np.float64)))
            whole_rot = distributed.gather_shards(rot, ctx.total).cpu()
            state = {"refs": [m.cpu() for m in refs], "rot": whole_rot,
                     "origins": distributed.gather_shards(origins, ctx.total).cpu(),
                     "sigma2": sigma2.cpu(), "sampling": sampling.__dict__.copy(), "fsc": fsc.tolist(),
                     "history": [h.as_state() for h in history], "iteration": it,
                     "final_pass": converged and not final_pass, "m_step": m_state.as_state(),
                     "intensity": {**intensity.as_state(), "norm": whole_norm.cpu()}}
            reporter.step(1, res=round(res, 2), level=metrics["level"])
            reporter.end_epoch(it, metrics, volume=0.5 * (refs[0] + refs[1]), voxel_size=apix, rotations=whole_rot,
                               state=state, last=final_pass or (not converged and it >= cfg.epochs))
            if final_pass:
                break
            final_pass = converged
            it += 1
        if not accumulators:
            raise OptionError("epochs", cfg.epochs, "the resumed run has no iteration left to run; raise it")
        return self._finish(ctx, m_state, accumulators, trilinear, refs, rot, origins, fsc, r_max, converged, history,
                            intensity, reporter)

    def _setup(self, data: ParticleStack, cfg: RefineConfig) -> RunContext:
        """Check the options and prepare what every iteration reads: under torchrun
        (:mod:`cryocli.distributed`) only this rank's share of the particles, split into the half sets drawn
        over the whole set."""
        torch.manual_seed(cfg.seed)
        dev = self.device
        subset = data.ensure_half_sets(cfg.seed).numpy()
        for h in (1, 2):
            if (subset == h).sum() < 2:
                raise CryocliError(f"rlnRandomSubset: each half set needs at least 2 particles, found "
                                   f"{(subset == 1).sum()} in half 1 and {(subset == 2).sum()} in half 2",
                                   getattr(data.table, "path", None))
        # held: images (float32) and their half transforms (complex64) with CTFs (float32)
        share = share_particles(data, cfg, dev, cfg.preload, lambda box: 4 * box * box + 12 * box * (box // 2 + 1))
        parts, rows, sharded = share.parts, share.rows, share.sharded
        n, apix = parts.box, parts.pixel_size
        diameter = cfg.particle_diameter or 0.8 * n * apix
        halves = [torch.as_tensor(np.flatnonzero(subset[rows] == h), device=dev) for h in (1, 2)]
        groups = self._optics_groups(data)
        return RunContext(
            cfg=cfg, parts=parts,
            spectra=ParticleSpectra(parts, dev, max_bytes=(2**62 if isinstance(parts, PreparedParticles) else 0)),
            n=n, apix=apix, diameter=diameter,
            mask=(self._solvent_mask(cfg.solvent_mask, n, apix).to(dev) if cfg.solvent_mask is not None else
                  soft_sphere(n, min(diameter / (2 * apix), n / 2 - 1), edge=min(5.0, n / 8), device=dev)),
            sym_ops=None if cfg.sym.upper() == "C1" else symmetry_operators(cfg.sym, torch.float32, dev),
            groups=groups[torch.as_tensor(rows, dtype=torch.long)].to(dev), n_groups=int(groups.max()) + 1,
            grid=SO3Grid(cfg.healpix_order, device=dev, dtype=torch.float32),
            max_level=MAX_ORDER - cfg.healpix_order - 1, halves=halves,
            generator=torch.Generator().manual_seed(cfg.seed),
            stats={k: torch.zeros(len(parts), device=dev) for k in ("max_prob", "n_sig", "loglik")},
            rows=rows, total=len(data), sharded=sharded)

    def _e_step(self, ctx: RunContext, refs: list[Tensor], rot: Tensor, origins: Tensor, sigma2: Tensor,
                intensity: IntensityCorrections, sampling: Sampling, r_max: int, first: bool) -> EStepOutcome:
        """Both halves against their own references: new poses, accumulators, noise, accuracy estimate."""
        cfg, n, apix = ctx.cfg, ctx.n, ctx.apix
        r_coarse = coarse_radius(n, apix, math.degrees(ctx.grid.cell_size(sampling.level)), ctx.diameter, r_max)
        out = EStepOutcome(rot.clone(), origins.clone(), [], [], NoiseAccumulator(n, ctx.n_groups, self.device),
                           IntensityAccumulator(intensity), math.nan, math.nan, 0, r_coarse)
        for h, rows in enumerate(ctx.halves):
            bps = self.new_backprojectors(n, cfg)
            proj = Projector(refs[h] * ctx.mask, device=self.device)
            searcher = PoseSearcher(proj.volume_ft, n, 2, ctx.grid, sampling.level, r_max, sampling.offset_range,
                                    sampling.offset_step, cfg.fraction, cfg.max_significant, profile_scale=first,
                                    r_coarse=r_coarse)
            host_rows = rows.cpu()  # batches are cut on the host, so a streamed read needs nothing from the GPU
            batches = (host_rows[s:s + cfg.batch_size] for s in range(0, len(rows), cfg.batch_size))
            for batch in prefetching(ctx.parts.images, batches):
                self._estep_batch(batch.to(self.device, non_blocking=True), ctx, sigma2, intensity, rot, origins, out,
                                  searcher, sampling, bps, r_max, host=batch)
            if h == 0:
                # about the first accuracy_particles of half 1, shared between the ranks
                share = -(-cfg.accuracy_particles // distributed.current().world_size)
                out.acc_rot, out.acc_trans = self._accuracy(searcher, ctx, rows[:share], sigma2, intensity, out.rot)
            out.projected += searcher.coarse_cache.projected + searcher.fine_cache.projected
            trilinear = self._summed(bps[0].symmetrised())
            out.trilinear.append(self._point_group(trilinear, bps[0], ctx.sym_ops))
            out.accumulators.append(out.trilinear[-1] if cfg.kernel == "trilinear"
                                    else self._map_accumulators(trilinear, bps, ctx.sym_ops, cfg))
        out.noise.sum_over_ranks()
        return out

    @staticmethod
    def _point_group(accumulator: tuple[Tensor, Tensor], backprojector: BackProjectorLike,
                     sym_ops: Tensor | None) -> tuple[Tensor, Tensor]:
        """Hermitian-symmetrised accumulators summed over the point group (RELION's ``BackProjector::symmetrise``:
        each sample was inserted once, at its own pose)."""
        radius = grid_radius(backprojector.n, backprojector.pad, backprojector.r_max)
        return symmetrise_accumulators(accumulator[0], accumulator[1], sym_ops, radius)

    @classmethod
    def _map_accumulators(cls, trilinear: tuple[Tensor, Tensor], bps: list[BackProjectorLike],
                          sym_ops: Tensor | None, cfg: RefineConfig) -> tuple[Tensor, Tensor]:
        """The Gaussian kernel's accumulators the maps are made from, summed over the ranks and the point group:
        the ``trilinear`` ones (Hermitian-symmetrised, summed over the ranks) convolved with the Gaussian's samples
        for ``gaussian``, the second backprojector's for ``gaussian-insert``."""
        if cfg.kernel == "gaussian":
            return cls._point_group((kernel_on_grid(trilinear[0]), kernel_on_grid(trilinear[1])), bps[0], sym_ops)
        return cls._point_group(cls._summed(bps[-1].symmetrised()), bps[-1], sym_ops)

    @staticmethod
    def _summed(accumulator: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        """One half's backprojection ``(data, weight)`` summed over the ranks (torchrun; unchanged alone)."""
        return (distributed.all_reduce_sum(accumulator[0].contiguous()),
                distributed.all_reduce_sum(accumulator[1].contiguous()))

    @staticmethod
    def _gold_standard_fsc(trilinear: list[tuple[Tensor, Tensor]], n: int, r_max: int,
                           mask: Tensor | None = None) -> np.ndarray:
        """FSC of the relion_reconstruct-style (trilinear, unregularised) half maps: it measures the poses
        alone, the same way for every method and kernel; zero beyond ``r_max``. With a solvent ``mask``
        (``solvent_correct_fsc``), the FSC inside it, corrected by phase randomisation as relion_postprocess
        does (while the unmasked FSC never drops below 0.8 there is nothing to randomise: the masked FSC)."""
        unreg = [unregularised_map(d, w, n, 2, r_max) for d, w in trilinear]
        if mask is not None:
            try:
                corrected = np.nan_to_num(corrected_masked_fsc(unreg[0], unreg[1], mask).corrected)
                return np.where(np.arange(n // 2 + 1) <= r_max, corrected, 0.0)
            except ValueError:
                masked = half_map_fsc(unreg[0] * mask, unreg[1] * mask)
                masked[r_max + 1:] = 0.0
                return masked
        fsc = half_map_fsc(unreg[0], unreg[1])
        fsc[r_max + 1:] = 0.0
        return fsc

    def written_half_maps(self, refs: list[Tensor], trilinear: list[tuple[Tensor, Tensor]], n: int, r_max: int,
                          voxel_size: float, cfg: RefineConfig) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor] | None]:
        """The half maps written as ``half1_unfil.mrc`` / ``half2_unfil.mrc`` (what users postprocess), and the
        regularised half maps to write under their own names (``None``: they are the same). RELION's: the MAP
        half maps, as relion_refine writes its ``run_half*_unfil.mrc``."""
        return (refs[0], refs[1]), None

    def _finish(self, ctx: RunContext, m_state: MStepState, accumulators: list[tuple[Tensor, Tensor]],
                trilinear: list[tuple[Tensor, Tensor]], refs: list[Tensor], rot: Tensor, origins: Tensor,
                fsc: np.ndarray, r_max: int, converged: bool, history: list[ModelIteration],
                intensity: IntensityCorrections, reporter: Reporter) -> Reconstruction:
        """The joined map from both halves' accumulators, and the result."""
        n, apix = ctx.n, ctx.apix
        final = self.reconstruct_half(m_state, accumulators[0][0] + accumulators[1][0],
                                      accumulators[0][1] + accumulators[1][1], n, fsc, 0.5 * (refs[0] + refs[1]),
                                      r_max, ctx.cfg, joined=True)
        halves, regularised = self.written_half_maps(refs, trilinear, n, r_max, apix, ctx.cfg)
        halfmaps = threshold_crossing(half_map_fsc(halves[0], halves[1]), n, apix, 0.143).resolution

        def whole(t: Tensor) -> np.ndarray:
            return distributed.gather_shards(t, ctx.total).cpu().numpy()

        columns = {"rlnMaxValueProbDistribution": whole(ctx.stats["max_prob"]),
                   "rlnNrOfSignificantSamples": whole(ctx.stats["n_sig"]).astype(np.int64),
                   "rlnLogLikeliContribution": whole(ctx.stats["loglik"])}
        if intensity.do_norm:
            columns["rlnNormCorrection"] = whole(intensity.norm).astype(np.float64)
        return Reconstruction(
            volume=final.cpu(), voxel_size=apix, rotations=torch.as_tensor(whole(rot)),
            origins_angstrom=torch.as_tensor(whole(origins)),
            half_volumes=(halves[0].cpu(), halves[1].cpu()),
            regularised_half_volumes=None if regularised is None else (regularised[0].cpu(), regularised[1].cpu()),
            particle_columns=columns,
            metrics=[r for r in reporter.history if r.get("run") == reporter.run_name], model_history=history,
            gold_standard_fsc=fsc.copy(), resolution_A=threshold_crossing(fsc, n, apix, 0.143).resolution,
            halfmaps_resolution_A=halfmaps, converged=converged, inverted=ctx.parts.inverted, symmetry=ctx.cfg.sym,
            method_summary=dict(m_state.metrics),
            group_scales=GroupScales(intensity.names, intensity.group_counts(),
                                     intensity.scale.cpu().numpy().astype(np.float64)) if intensity.do_scale else None)

    # ------------------------------------------------------------------------------------------ pieces
    def check_inputs(self, data: ParticleStack, config: EngineConfig) -> None:
        """Refuse, before any work, a reference that cannot start this run: unreadable, empty or not finite, or
        covering another field of view than the particles (its pixel size times its box)."""
        assert isinstance(config, RefineConfig)
        self._reference_map(config, data.box, data.pixel_size)
        if config.solvent_mask is not None:
            self._solvent_mask(config.solvent_mask, data.box, data.pixel_size)

    def _reference_map(self, cfg: RefineConfig, n: int, apix: float) -> Tensor:
        """The reference as given ``(m, m, m)`` (CPU), checked against particles of box ``n`` at ``apix`` A."""
        if cfg.ref is None:  # validate() refuses this already; the same error for a config it did not see
            raise OptionError("ref", None, "a reference map is required")
        ref_map = read_map(cfg.ref)
        vol = torch.as_tensor(np.array(ref_map.data, dtype=np.float32))
        side_ref, side_data = vol.shape[-1] * ref_map.voxel_size, n * apix
        if abs(side_ref - side_data) > 0.01 * side_data:
            raise CryocliError(f"the reference covers {side_ref:.1f} A ({vol.shape[-1]} px at "
                               f"{ref_map.voxel_size:.4g} A/px) but the particles {side_data:.1f} A ({n} px at "
                               f"{apix:.4g} A/px)", cfg.ref)
        if not bool(torch.isfinite(vol).all()):
            raise CryocliError("the reference map has NaN or infinite values", cfg.ref)
        if float(vol.std()) == 0.0:
            raise CryocliError("the reference map is empty (constant)", cfg.ref)
        return vol

    @staticmethod
    def _solvent_mask(path: str, n: int, apix: float) -> Tensor:
        """The user's solvent mask on the run's grid (box ``n`` at ``apix`` A), values in [0, 1]; refused when it
        covers another field of view, is not finite, leaves [0, 1] or holds no voxel above 0.5."""
        mask_map = read_map(path)
        vol = torch.as_tensor(np.array(mask_map.data, dtype=np.float32))
        side_mask, side_data = vol.shape[-1] * mask_map.voxel_size, n * apix
        if abs(side_mask - side_data) > 0.01 * side_data:
            raise CryocliError(f"the solvent mask covers {side_mask:.1f} A but the particles {side_data:.1f} A", path)
        if not bool(torch.isfinite(vol).all()):
            raise CryocliError("the solvent mask has NaN or infinite values", path)
        lo, hi = float(vol.min()), float(vol.max())
        if lo < -1e-3 or hi > 1 + 1e-3:
            raise CryocliError(f"a solvent mask holds values in [0, 1], this one {lo:.4g} .. {hi:.4g}", path)
        if vol.shape[-1] != n:
            vol = fourier_resample_volume(vol, n).to(torch.float32)
        vol = vol.clamp(0.0, 1.0)
        if not bool((vol > 0.5).any()):
            raise CryocliError("the solvent mask has no voxel above 0.5", path)
        return vol

    def _reference(self, cfg: RefineConfig, n: int, apix: float) -> Tensor:
        """The starting reference on the run's grid (box ``n`` at ``apix`` A), low-passed to ``ini_lowpass``."""
        vol = self._reference_map(cfg, n, apix)
        if vol.shape[-1] != n:
            vol = fourier_resample_volume(vol, n)
        vol = lowpass_filter(vol, apix, cfg.ini_lowpass).to(torch.float32)
        return vol.to(self.device)

    def _intensity_start(self, data: ParticleStack, cfg: RefineConfig, rows: np.ndarray) -> IntensityCorrections:
        groups, names = intensity_groups(data.table.particles)
        return IntensityCorrections.start(groups, names, cfg.norm, cfg.scale, self.device, rows)

    @staticmethod
    def _optics_groups(data: ParticleStack) -> Tensor:
        merged = data.table.optics_per_particle()
        if "rlnOpticsGroup" not in merged.columns:
            return torch.zeros(len(data), dtype=torch.long)
        codes = np.unique(merged["rlnOpticsGroup"].to_numpy(), return_inverse=True)[1]
        return torch.as_tensor(codes.astype(np.int64))

    @staticmethod
    def _r_max(n: int, apix: float, resolution: float, cfg: RefineConfig) -> int:
        if not math.isfinite(resolution):
            resolution = cfg.ini_lowpass
        return int(min(n // 2, math.ceil(n * apix / resolution) + cfg.incr_size))

    @staticmethod
    def _fine_step(grid: SO3Grid, level: int) -> float:
        return math.degrees(grid.psi_step(level + 1))

    def _batch_inputs(self, idx: Tensor, ctx: RunContext, sigma2: Tensor, intensity: IntensityCorrections,
                      origins: Tensor, host: Tensor | None = None) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
        """Centred half transforms (divided by their normalisation correction), CTFs (times their group's
        scale) and noise variances ``(B, n, n // 2 + 1)``, and optics groups ``(B,)``; ``host``: ``idx`` on the
        host (:meth:`ParticleSpectra.get`)."""
        images, ctf = intensity.apply(idx, *ctx.spectra.get(idx, host))
        ft = phase_shift(images, origins[idx] / ctx.apix, ctx.n)
        g = ctx.groups[idx]
        return ft, ctf, sigma2_on_pixels(sigma2, ctx.n, g).to(torch.float32), g

    def _estep_batch(self, idx: Tensor, ctx: RunContext, sigma2: Tensor, intensity: IntensityCorrections,
                     rot: Tensor, origins: Tensor,
                     out: EStepOutcome, searcher: PoseSearcher, sampling: Sampling, bps: list[BackProjectorLike],
                     r_max: int, host: Tensor | None = None) -> None:
        """E-step of one batch, its backprojection and its noise residuals (at the most probable pose, on
        the pixels the search compared); ``host``: ``idx`` on the host."""
        ft, ctf, sig, g = self._batch_inputs(idx, ctx, sigma2, intensity, origins, host)
        res = searcher.search(ft, ctf, sig, previous=rot[idx] if sampling.local else None)
        mean = ctx.cfg.pose_estimate == "mean"
        out.rot[idx] = (res.mean_rotations if mean else res.rotations).to(rot.dtype)
        out.origins[idx] = origins[idx] + (res.mean_shifts if mean else res.shifts) * ctx.apix
        ctx.stats["max_prob"][idx] = res.max_prob
        ctx.stats["n_sig"][idx] = res.n_significant.to(torch.float32)
        ctx.stats["loglik"][idx] = res.log_likelihood.to(torch.float32)
        backproject_samples(bps, ft, ctf, 1.0 / sig, res, r_max)
        px = searcher.fine_pixels
        model = res.best_projection * res.best_scale[:, None]
        if ctf is not None:
            model = model * px.take(ctf)
        shifted = px.take(ft) * px.ramp(res.shifts)
        resid = shifted - model
        shells = torch.floor(torch.sqrt(px.kx**2 + px.ky**2) + 0.5).long()
        out.noise.add_pixels(resid.abs() ** 2, shells, g)
        scale = intensity.scale[intensity.groups[idx]][:, None] if intensity.do_scale else 1.0
        out.intensity.add(idx, shifted, model / scale, px.take(sig))

    def _accuracy(self, searcher: PoseSearcher, ctx: RunContext, idx: Tensor, sigma2: Tensor,
                  intensity: IntensityCorrections, rot: Tensor) -> tuple[float, float]:
        """RELION's expected angular (degrees) and translational (pixels) accuracy: the mean over particles
        ``idx`` of every rank."""
        _, ctf = intensity.apply(idx, *ctx.spectra.get(idx))
        sig = sigma2_on_pixels(sigma2, ctx.n, ctx.groups[idx]).to(torch.float32)
        px = searcher.fine_pixels
        acc_rot, acc_trans = particle_accuracies(searcher.volume_ft, px, 2, rot[idx],
                                                 None if ctf is None else px.take(ctf), 1.0 / px.take(sig),
                                                 ctx.generator)
        total_rot, total_trans, count = distributed.sum_over_ranks(
            [float(acc_rot.sum()), float(acc_trans.sum()), float(len(idx))], self.device)
        return total_rot / count, total_trans / count


@dataclass
class RunContext:
    """What every iteration of a refine run reads: options, particles, geometry, half sets, statistics.

    Under torchrun ``parts``, ``groups``, ``halves`` (positions in ``parts``) and ``stats`` are this rank's share:
    the particles at ``rows`` ``(N_rank,)`` of the ``total`` in the run (``sharded``); alone, all of them."""

    cfg: RefineConfig
    parts: ParticleSet
    spectra: ParticleSpectra
    n: int
    apix: float
    diameter: float
    mask: Tensor
    sym_ops: Tensor | None
    groups: Tensor
    n_groups: int
    grid: SO3Grid
    max_level: int
    halves: list[Tensor]
    generator: torch.Generator
    stats: dict[str, Tensor]
    rows: np.ndarray
    total: int
    sharded: bool


@dataclass
class EStepOutcome:
    """One E-step over both halves: new poses and origins, trilinear and map accumulators per half, noise
    residuals, estimated accuracies (degrees, pixels), slices projected and the coarse radius used."""

    rot: Tensor
    origins: Tensor
    trilinear: list[tuple[Tensor, Tensor]]
    accumulators: list[tuple[Tensor, Tensor]]
    noise: NoiseAccumulator
    intensity: IntensityAccumulator
    acc_rot: float
    acc_trans: float
    projected: int
    r_coarse: int
