"""``refine --method relion``: RELION-style gold-standard 3D auto-refine (expectation-maximisation).

Per iteration, for each half set (``rlnRandomSubset``, drawn if absent) independently:

* E-step (:mod:`cryocli.engines.common.pose_search`): the half's reference, masked by a soft sphere of
  ``particle_diameter``, is compared with every particle at the candidate poses (global search on the
  SO3Grid coarse level at first, local searches around the previous pose once the sampling is refined)
  and in-plane shifts around the current origin; posterior weights over the significant samples.
* M-step: backprojection of ``CTF X / sigma^2`` with the posterior weights (``--kernel trilinear`` as
  RELION, or Luo's Gaussian kernel), the FSC of the two unregularised halves, and the MAP reconstruction
  with ``tau^2 = tau2_fudge * SSNR / <weight>`` from that FSC (``SSNR = FSC / (1 - FSC)``), as RELION's
  ``reconstruct`` with ``update_tau2_with_fsc``. The halves are averaged below ``low_resol_join_halves``
  (40 A) so they stay in one frame; above it they never share information.
* Noise: ``sigma^2`` per shell and optics group from the residuals at the best poses.

Auto-sampling (RELION's ``updateAngularSampling`` rule): when an iteration neither improves the
resolution nor moves the poses much (mean rotation change below twice the fine angular step, mean origin
change below the offset step), the angular sampling is refined one level (local searches from level
``local_from_level`` on, within two coarse cells of the previous pose) and the offset step halved, as
long as the fine angular step is coarser than the accuracy the resolution needs
(``degrees(resolution / (2 particle_diameter))``: a quarter of the resolution at the particle's edge); when that is already reached, the run has converged and a
final iteration joins the halves (accumulators summed, ``FSC -> 2 FSC / (1 + FSC)`` for tau^2).

The initial reference is low-pass filtered to ``ini_lowpass`` (40 A) and its grey scale is fitted in the
first iteration by the per-pose intensity scale of the likelihood (see ``profile_scale``). Units:
Angstrom for resolutions, diameters and origins; pixels for offsets (of the data's box, like RELION's
``--offset_range``/``--offset_step``); degrees for angles in the metrics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from cryocli.analysis.fsc import threshold_crossing
from cryocli.engines.base import EngineConfig, PreparedParticles, Reconstruction, prepare_particles, register_engine
from cryocli.engines.common.kernel_backprojection import GaussianKernelBackProjector, kernel_gridding_correction
from cryocli.engines.common.noise_model import NoiseAccumulator, initial_sigma2, sigma2_on_pixels
from cryocli.engines.common.pose_search import PoseSearcher, local_candidates
from cryocli.engines.refine.maps import (backproject_samples, fsc_to_ssnr, half_map_fsc, join_low_resolution,
                                         map_reconstruct, unregularised_map)
from cryocli.errors import CryocliError
from cryocli.geometry.rotations import geodesic_distance
from cryocli.geometry.so3grid import SO3Grid
from cryocli.geometry.symmetry import symmetry_operators
from cryocli.imaging.ctf import compute_ctf
from cryocli.imaging.filters import lowpass_filter
from cryocli.imaging.fourier import fourier_resample_volume, image_to_rfft
from cryocli.imaging.masks import soft_sphere
from cryocli.imaging.projector import BackProjector, Projector
from cryocli.imaging.shifts import phase_shift
from cryocli.io.dataset import ParticleStack
from cryocli.io.mrc import read_map


@dataclass
class RefineConfig(EngineConfig):
    """Options of the refine methods (defaults: RELION 5's auto-refine).

    ref: path of the initial reference map. epochs: most EM iterations before the final join (25).
    ini_lowpass: low-pass of the reference, Angstrom (40). tau2_fudge: RELION's ``--tau2_fudge`` (1).
    sym: point group (C1). healpix_order: HEALPix order of the coarse global search (2: 15 degrees
    coarse, 7.5 degrees after oversampling). offset_range, offset_step: translational search in pixels
    of the data (5, 2). particle_diameter: Angstrom (None: 0.8 x the box). low_resol_join_halves: Angstrom
    (40). kernel: backprojection kernel, trilinear or gaussian. fraction, max_significant: significant
    samples (0.999, 16). local_from_level: first grid level searched locally (1). incr_size: Fourier
    pixels compared beyond the current resolution (10).
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
    max_significant: int = 16
    local_from_level: int = 1
    incr_size: int = 10


@dataclass
class Sampling:
    """Auto-sampling state: coarse grid level, search kind and translational grid (pixels of the working box)."""

    level: int
    local: bool
    offset_range: float
    offset_step: float
    best_resolution: float
    iters_without_gain: int = 0
    iters_without_change: int = 0


@register_engine
class RelionRefineEngine:
    """RELION 3D auto-refine: gold-standard EM with the Fourier-shell (tau^2) prior."""

    name: ClassVar[str] = "relion"
    kind: ClassVar[str] = "refine"
    summary: ClassVar[str] = ("RELION 3D auto-refine: gold-standard expectation-maximisation over poses and "
                              "shifts, MAP reconstruction with tau^2 from the FSC (Scheres 2012).")
    config_class: ClassVar[type[EngineConfig]] = RefineConfig

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)

    # ------------------------------------------------------------------------------------------ M-step hooks
    def new_backprojector(self, n: int, cfg: RefineConfig):
        if cfg.kernel == "gaussian":
            return GaussianKernelBackProjector(n, device=self.device)
        return BackProjector(n, device=self.device)

    def gridding_fix(self, volume: Tensor, cfg: RefineConfig) -> Tensor:
        """Replace the trilinear (sinc^2) gridding correction by the Gaussian kernel's where that kernel is used."""
        if cfg.kernel != "gaussian":
            return volume
        n = volume.shape[-1]
        return volume * kernel_gridding_correction(n, trilinear=True, device=volume.device)

    def reconstruct_half(self, data: Tensor, weight: Tensor, n: int, fsc: np.ndarray, previous: Tensor,
                         r_max: int, cfg: RefineConfig, info: dict[str, Any], joined: bool = False) -> Tensor:
        """RELION's MAP reconstruction of one half (or, ``joined``, of the summed halves)."""
        ssnr = fsc_to_ssnr(fsc, cfg.tau2_fudge, joined)
        return self.gridding_fix(map_reconstruct(data, weight, n, 2, ssnr, r_max), cfg)

    # ------------------------------------------------------------------------------------------ run
    def run(self, data: ParticleStack, config: EngineConfig, reporter: Any) -> Reconstruction:
        cfg = config if isinstance(config, RefineConfig) else RefineConfig(**config.as_dict())
        if cfg.ref is None:
            raise CryocliError("--ref: a reference map is required")
        if cfg.kernel not in ("trilinear", "gaussian"):
            raise CryocliError(f"--kernel {cfg.kernel}: choose trilinear or gaussian")
        torch.manual_seed(cfg.seed)
        dev = self.device
        subset = data.ensure_half_sets(cfg.seed).numpy()
        parts = prepare_particles(data, cfg, dev)
        n, apix = parts.box, parts.pixel_size
        ref = self._reference(cfg, n, apix)
        sym_ops = None if cfg.sym.upper() == "C1" else symmetry_operators(cfg.sym, torch.float32, dev)
        diameter = cfg.particle_diameter or 0.8 * n * apix
        mask = soft_sphere(n, min(diameter / (2 * apix), n / 2 - 1), edge=min(5.0, n / 8), device=dev)
        groups = self._optics_groups(data)
        n_groups = int(groups.max()) + 1
        ctf_all = parts.ctf
        scale_px = data.box / n  # offsets are given in pixels of the data
        grid = SO3Grid(cfg.healpix_order, device=dev, dtype=torch.float32)
        halves = [torch.as_tensor(np.flatnonzero(subset == h), device=dev) for h in (1, 2)]
        if min(len(h) for h in halves) < 2:
            raise CryocliError("each half set needs at least 2 particles")

        saved = reporter.resume_state()
        if saved is None:
            refs = [ref.clone(), ref.clone()]
            rot = torch.eye(3, device=dev).expand(len(parts), 3, 3).clone()
            origins = (data.shifts_angstrom.to(dev) if data.shifts_angstrom is not None
                       else torch.zeros((len(parts), 2), device=dev))
            sigma2 = initial_sigma2(parts.images, groups, n_groups)
            sampling = Sampling(0, False, cfg.offset_range / scale_px, cfg.offset_step / scale_px, math.inf)
            start, fsc, history = 1, np.zeros(n // 2 + 1), []
        else:
            refs = [saved["refs"][0].to(dev), saved["refs"][1].to(dev)]
            rot, origins, sigma2 = saved["rot"].to(dev), saved["origins"].to(dev), saved["sigma2"].to(dev)
            sampling, fsc, history = Sampling(**saved["sampling"]), np.asarray(saved["fsc"]), saved["history"]
            start = int(saved["iteration"]) + 1
        stats = {"max_prob": torch.zeros(len(parts), device=dev), "n_sig": torch.zeros(len(parts), device=dev),
                 "loglik": torch.zeros(len(parts), device=dev)}
        reporter.start(cfg.epochs, self.name, completed=start - 1)
        accumulators: list[Any] = []
        r_max = self._r_max(n, apix, sampling.best_resolution, cfg)
        converged = False
        for it in range(start, cfg.epochs + 1):
            r_max = self._r_max(n, apix, min(sampling.best_resolution, cfg.ini_lowpass), cfg)
            noise = NoiseAccumulator(n, n_groups, dev)
            new_rot, new_origins = rot.clone(), origins.clone()
            accumulators = []
            for h, rows in enumerate(halves):
                bp = self.new_backprojector(n, cfg)
                proj = Projector(refs[h] * mask, device=dev)
                searcher = PoseSearcher(proj.volume_ft, n, 2, grid, sampling.level, r_max, sampling.offset_range,
                                        sampling.offset_step, cfg.fraction, cfg.max_significant,
                                        profile_scale=(it == 1))
                for s in range(0, len(rows), cfg.batch_size):
                    idx = rows[s:s + cfg.batch_size]
                    self._estep_batch(idx, parts, ctf_all, groups, sigma2, rot, origins, new_rot, new_origins,
                                      searcher, sampling, grid, bp, noise, proj, sym_ops, r_max, apix, stats, n)
                accumulators.append(bp.symmetrised())
            change_deg = float(torch.rad2deg(geodesic_distance(new_rot.double(), rot.double())).mean())
            change_px = float(((new_origins - origins).norm(dim=1) / apix).mean())
            rot, origins = new_rot, new_origins
            sigma2 = noise.sigma2(sigma2)
            unreg = [self.gridding_fix(unregularised_map(d, w, n, 2, r_max), cfg) for d, w in accumulators]
            fsc = half_map_fsc(unreg[0], unreg[1])
            fsc[r_max + 1:] = 0.0
            res = threshold_crossing(fsc, n, apix, 0.143).resolution
            info: dict[str, Any] = {}
            maps = [self.reconstruct_half(d, w, n, fsc, refs[i], r_max, cfg, info)
                    for i, (d, w) in enumerate(accumulators)]
            maps = list(join_low_resolution(maps[0], maps[1], apix, cfg.low_resol_join_halves))
            refs = maps
            metrics = {"resolution_A": res, "r_max_px": r_max, "level": sampling.level, "local": sampling.local,
                       "fine_step_deg": self._fine_step(grid, sampling.level), "offset_step_px": sampling.offset_step,
                       "rot_change_deg": change_deg, "origin_change_px": change_px,
                       "max_prob_mean": float(stats["max_prob"].mean()),
                       "n_significant_mean": float(stats["n_sig"].mean()), **info}
            converged = self._update_sampling(sampling, res, change_deg, change_px, grid, diameter, cfg)
            history.append({"iteration": it, "fsc": fsc.tolist(), "sigma2": sigma2.cpu().tolist(),
                            "ssnr": fsc_to_ssnr(fsc, cfg.tau2_fudge).tolist(), **metrics})
            state = {"refs": [m.cpu() for m in refs], "rot": rot.cpu(), "origins": origins.cpu(),
                     "sigma2": sigma2.cpu(), "sampling": sampling.__dict__.copy(), "fsc": fsc.tolist(),
                     "history": history, "iteration": it}
            reporter.step(1, res=round(res, 2), level=metrics["level"])
            reporter.end_epoch(it, metrics, volume=0.5 * (refs[0] + refs[1]), voxel_size=apix, rotations=rot,
                               state=state, last=converged or it == cfg.epochs)
            if converged:
                break
        if not accumulators:
            raise CryocliError("--resume: the run has no iteration left to finish; raise --epochs")
        data_sum = accumulators[0][0] + accumulators[1][0]
        weight_sum = accumulators[0][1] + accumulators[1][1]
        info = {}
        final = self.reconstruct_half(data_sum, weight_sum, n, fsc, 0.5 * (refs[0] + refs[1]), r_max, cfg, info,
                                      joined=True)
        columns = {"rlnMaxValueProbDistribution": stats["max_prob"].cpu().numpy(),
                   "rlnNrOfSignificantSamples": stats["n_sig"].cpu().numpy().astype(np.int64),
                   "rlnLogLikeliContribution": stats["loglik"].cpu().numpy()}
        return Reconstruction(
            volume=final.cpu(), voxel_size=apix, rotations=rot.cpu(), origins_angstrom=origins.cpu(),
            half_volumes=(refs[0].cpu(), refs[1].cpu()), metrics=list(reporter.history),
            info={"gold_standard_fsc": fsc.tolist(), "converged": converged, "iterations": len(history),
                  "inverted": parts.inverted, "particle_columns": columns, "model_history": history,
                  "resolution_A": threshold_crossing(fsc, n, apix, 0.143).resolution, **info})

    # ------------------------------------------------------------------------------------------ pieces
    def _reference(self, cfg: RefineConfig, n: int, apix: float) -> Tensor:
        ref_map = read_map(cfg.ref)
        vol = torch.as_tensor(np.array(ref_map.data, dtype=np.float32))
        if vol.shape[-1] != n:
            side_ref, side_data = vol.shape[-1] * ref_map.voxel_size, n * apix
            if abs(side_ref - side_data) > 0.01 * side_data:
                raise CryocliError(f"the reference covers {side_ref:.1f} A but the particles {side_data:.1f} A",
                                   cfg.ref)
            vol = fourier_resample_volume(vol, n)
        vol = lowpass_filter(vol, apix, cfg.ini_lowpass).to(torch.float32)
        return vol.to(self.device)

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

    def _update_sampling(self, s: Sampling, res: float, change_deg: float, change_px: float, grid: SO3Grid,
                         diameter: float, cfg: RefineConfig) -> bool:
        """RELION's auto-sampling bookkeeping; True when the run has converged."""
        gain = res < s.best_resolution - 1e-6
        s.best_resolution = min(s.best_resolution, res)
        s.iters_without_gain = 0 if gain else s.iters_without_gain + 1
        fine = self._fine_step(grid, s.level)
        small = change_deg < 2.0 * fine and change_px < max(s.offset_step, 0.5)
        s.iters_without_change = s.iters_without_change + 1 if small else 0
        if s.iters_without_gain < 1 or s.iters_without_change < 1:
            return False
        needed = math.degrees(s.best_resolution / (2.0 * diameter))
        if fine <= needed or grid.base_order + s.level + 2 > 8:
            return True
        s.level += 1
        s.local = s.level >= cfg.local_from_level
        s.offset_step = s.offset_step / 2
        s.offset_range = max(3 * s.offset_step, 1.0)
        s.iters_without_gain = s.iters_without_change = 0
        return False

    def _estep_batch(self, idx: Tensor, parts: PreparedParticles, ctf_all: Any, groups: Tensor, sigma2: Tensor,
                     rot: Tensor, origins: Tensor, new_rot: Tensor, new_origins: Tensor, searcher: PoseSearcher,
                     sampling: Sampling, grid: SO3Grid, bp: Any, noise: NoiseAccumulator, proj: Projector,
                     sym_ops: Tensor | None, r_max: int, apix: float, stats: dict[str, Tensor], n: int) -> None:
        """E-step of one batch, its backprojection and its noise residuals."""
        ft = phase_shift(image_to_rfft(parts.images[idx]), origins[idx] / apix, n)
        ctf = compute_ctf(ctf_all.index(idx.cpu()).to(self.device), n, apix, device=self.device) \
            if ctf_all is not None else None
        g = groups[idx.cpu()].to(self.device)
        sig = sigma2_on_pixels(sigma2, n, g).to(torch.float32)
        if sampling.local:
            radius = 2.0 * grid.cell_size(sampling.level)
            ids, valid = local_candidates(grid, sampling.level, rot[idx], radius)
            res = searcher.search(ft, ctf, sig, ids, valid)
        else:
            res = searcher.search(ft, ctf, sig)
        new_rot[idx] = res.rotations.to(rot.dtype)
        new_origins[idx] = origins[idx] + res.shifts * apix
        stats["max_prob"][idx] = res.max_prob
        stats["n_sig"][idx] = res.n_significant.to(torch.float32)
        stats["loglik"][idx] = res.log_likelihood.to(torch.float32)
        backproject_samples(bp, ft, ctf, 1.0 / sig, res, sym_ops, r_max)
        best = proj.project(res.rotations) * res.best_scale[:, None, None]
        model = best * ctf if ctf is not None else best
        resid = phase_shift(ft, res.shifts, n) - model
        noise.add(resid.abs() ** 2, g)
