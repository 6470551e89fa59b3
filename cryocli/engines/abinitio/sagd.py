"""SAGD: MAP ab initio reconstruction by stochastic average gradient descent with importance-sampled marginalisation
over poses (Punjani, Brubaker and Fleet, "Building proteins in a day"; the ancestor of cryoSPARC's ab initio).

The method (each part in its module):

* Objective (eq. 1-6): the MAP density ``V >= 0`` under white Gaussian noise, ``sigma`` the standard deviation of
  the pixels beyond 0.4 box from the centre (section 4), with a unitary transform so that it holds per Fourier
  pixel; poses and shifts marginalised by quadrature over directions x in-plane angles x shifts
  (:mod:`~cryocli.engines.abinitio.sagd_quadrature`), uniform ``p(R)``, a Gaussian shift prior counted once in the
  shift weights; frequencies beyond ``omega`` ignored (:mod:`~cryocli.engines.abinitio.sagd_marginal`).
* Priors (:mod:`~cryocli.engines.abinitio.sagd_priors`): exponential (default), CAR, uniform; negative voxels
  truncated to 0 after each step.
* SAGD (eq. 7-8, supplement A, Algorithm 1; :mod:`~cryocli.engines.abinitio.sagd_optimizer`): fixed minibatches of
  200, stored per-minibatch data gradients and their running sum, the prior's gradient fresh at every step, step
  ``eps / L``, ``L`` by bisection first and by doubling line search every 20 iterations.
* Importance sampling (eq. 9-14, supplement B; :mod:`~cryocli.engines.abinitio.importance_sampling`): three samplers
  per particle, every point evaluated at a particle's first visit, ``s0 = 10``, per-particle ``phi`` carried across
  quadrature levels by the kernels.
* Frequency marching: ``omega`` from 1/40 to 1/10 A^-1 (section 4), capped at Nyquist.
* Held-out RREMSE (supplement C; :mod:`~cryocli.engines.abinitio.rremse`) every pass over the data; the run stops
  when ``omega`` is at its maximum and the held-out error has stopped improving, or at ``max_iter``.

What the paper leaves open, and cryocli's choice (also in the README):

* ``omega`` schedule: geometric from ``1 / res_start`` to ``1 / res_final`` over ``march_iter`` iterations (2,000
  of the paper's ~5,000), then constant; in Fourier pixels ``round(omega n apix)``, at least 2.
* Quadrature and how it grows: HEALPix order ``l`` directions x ``6 * 2^l`` in-plane angles, ``l`` the coarsest
  level whose step turns the particle's edge by at most 1.2 resolutions (RELION's coarse-sampling rule), at most
  ``max_level`` (4: 3.75 degrees); particle diameter ``particle_diameter`` or 0.8 x box; shifts on a square grid
  of step ``angular step x D / 6`` within ``shift_extent`` (2.5) x ``shift_sigma`` of the centre.
* Shift prior: ``N(0, shift_sigma^2)`` per axis, ``shift_sigma`` 3% of the box's field of view by default.
* Kernels: bandwidth equal to the spacing of the level the ``phi`` come from (``kappa = 1 / spacing^2``).
* ``lambda`` (exponential): chosen so that the prior weighs ``prior_strength`` (1) nat per training particle at the
  density of the scaled random start (the mean density of a map with the data's low-resolution power):
  ``lambda sum(V0) = prior_strength N_train``, so that its weight against the data does not depend on the size of the
  set (a fixed lambda zeroes the map of a set of 5 particles). Measured on 3,000 simulated 4AKE particles (32 px, SNR
  0.1, 240 iterations): with a ten times stronger prior the background outside the particle is all but zero (std
  0.0006 against 0.0095 with the uniform prior) but the map and the poses degrade as the run goes on (FSC 0.5 vs
  truth 8.5 -> 21 A, median pose error 15 -> 69 degrees); at the default (an equivalent lambda) the background std is
  0.0069, 27% below the uniform prior's, and the run is as stable as with the uniform prior. ``sigma_CAR``: the
  random start's voxel standard deviation over ``prior_strength``.
* Random start: ``spheres`` (30) spheres of radius uniform in 5-15% of the particle diameter, centres uniform in the
  particle's sphere, summed; scaled so that its projections through the particles' CTFs carry the images' signal
  power at ``1 / res_start`` (seeded).
* ``L``: first by bisection from 1; between searches ``L <- L 2^(-1/150)`` (the printed rule is garbled).
* RREMSE normalised per compared pixel (the true map scores about 1).
* Held-out set: 100 particles, or 5% of sets under 2,000 (at least 1), drawn with the seed.
* Stopping: after ``omega`` reaches its maximum, ``patience`` (5) passes without a relative improvement of
  ``1e-3`` in the held-out RREMSE; the map returned is the one with the lowest held-out RREMSE at the maximum
  ``omega`` (the criterion of the stopping rule), the last one if none was scored there.
* Reported poses: the most probable evaluated quadrature point under the returned map, then a local search below
  the quadrature's spacing (:mod:`~cryocli.engines.abinitio.sagd_poses`; the map is not affected).

Departures from the paper: the shared projector (trilinear interpolation on a 2x padded grid with RELION's
gridding correction, :mod:`cryocli.imaging.projector`) instead of sinc interpolation; the density is the real-space
map and the gradient flows through the projector by automatic differentiation.

Host syncs: one per sampler per batch (the number of distinct points drawn sets the compacted shape), the line
search every 20 iterations; metrics are read back once per pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from cryocli import distributed
from cryocli.engines.abinitio.importance_sampling import (
    DEFAULT_S0,
    ParticlePhi,
    SampleSet,
    alpha_schedule,
    draw,
    full_set,
    proposal,
    scatter_log_phi,
    temperature_schedule,
)
from cryocli.engines.abinitio.rremse import rremse
from cryocli.engines.abinitio.sagd_marginal import (
    PAD,
    BatchPixels,
    Marginal,
    batch_pixels,
    ctf_on_pixels,
    marginal,
    project_quadrature,
)
from cryocli.engines.abinitio.sagd_optimizer import SAGD
from cryocli.engines.abinitio.sagd_poses import polish_poses
from cryocli.engines.abinitio.sagd_priors import PRIORS, DensityPrior, make_prior
from cryocli.engines.abinitio.sagd_quadrature import Quadrature, angular_step, build_quadrature, kernels, level_for
from cryocli.engines.common.pose_search import SearchPixels, project_pixels
from cryocli.engines.particles import (
    PRELOAD_CHOICES,
    ParticleSet,
    PreparedParticles,
    background_mask,
    background_moments,
    share_particles,
    std_from_moments,
)
from cryocli.engines.progress import Reporter
from cryocli.engines.protocol import EngineConfig, at_least, positive, register_engine, unknown_choice, within
from cryocli.engines.result import Reconstruction
from cryocli.errors import CryocliError, OptionError
from cryocli.geometry.rotations import random_rotations
from cryocli.imaging.fourier import image_to_rfft
from cryocli.imaging.projector import fourier_volume
from cryocli.io.dataset import ParticleStack

#: Largest held-out set, and the share of smaller sets (section 4: 100 images; the issue: 1-5% on small sets).
HELD_OUT_MAX, HELD_OUT_SHARE = 100, 0.05
#: Relative improvement of the held-out RREMSE that counts as improving.
STOP_TOLERANCE = 1e-3
#: Radii of the random spheres as fractions of the particle diameter.
SPHERE_RADII = (0.05, 0.15)


@dataclass
class SAGDConfig(EngineConfig):
    """SAGD's settings; defaults are the paper's (sections 3-4, supplements A-C) or cryocli's choices where it leaves
    them open (module docstring).

    max_iter: iterations (minibatches) at most (5,000, the paper's "around 5000"). epochs: passes over the data at
    most (``None``: no limit but ``max_iter``; stored as ``max_iter``). batch_size: 200. res_start / res_final: the
    omega march's ends in A (40, 10; capped at Nyquist). march_iter: iterations over which omega rises (2,000).
    prior: "exponential", "car" or "uniform". prior_lambda: the exponential's lambda per unit of density (``None``:
    from the data). car_sigma: sigma_CAR (``None``: from the data). prior_strength: multiplies the data-derived
    lambda (nats per training particle at the start's density) and divides sigma_CAR (1). importance_sampling:
    ``False`` evaluates every quadrature point. s0: 10. held_out: held-out particles (``None``: 100, or 5% under
    2,000; 0: none, and the run stops at ``max_iter``). spheres: 30. shift_sigma: the shift prior's sigma in A
    (``None``: 3% of the box's field of view). shift_extent: the shift points' radius in shift sigmas (2.5).
    max_level: the finest quadrature level (4). patience: passes without improvement that stop the run (5).
    preload: hold the prepared particles' transforms on the device (``yes``), read each minibatch from the stacks
    (``no``: memory does not grow with the particle count), or ``auto``: yes while images and transforms take at
    most :data:`~cryocli.engines.particles.PRELOAD_BYTES` (per torchrun rank).
    """

    epochs: int | None = None  # type: ignore[assignment]
    batch_size: int = 200
    max_iter: int = 5000
    res_start: float = 40.0
    res_final: float = 10.0
    march_iter: int = 2000
    prior: str = "exponential"
    prior_lambda: float | None = None
    car_sigma: float | None = None
    prior_strength: float = 1.0
    importance_sampling: bool = True
    s0: float = DEFAULT_S0
    held_out: int | None = None
    spheres: int = 30
    shift_sigma: float | None = None
    shift_extent: float = 2.5
    max_level: int = 4
    patience: int = 5
    preload: str = "auto"

    resume_may_change: ClassVar[frozenset[str]] = EngineConfig.resume_may_change | {"max_iter"}

    def __post_init__(self) -> None:
        # No pass limit but max_iter: each pass takes at least one iteration. The run's bookkeeping (a finished run
        # is taken from its checkpoint when the epochs match) then sees a larger --max-iter as a longer run.
        if self.epochs is None:
            self.epochs = self.max_iter

    def validate(self) -> None:
        if self.lr is not None:
            raise OptionError("lr", self.lr, "sagd takes its step from the line search (eps / L); it has no learning rate")
        at_least(self, "max_iter", 1)
        super().validate()  # epochs (max_iter unless given), batch size, seed, box, max_particles, diameter
        positive(self, "res_start")
        positive(self, "res_final")
        if self.res_final > self.res_start:
            raise OptionError("res_final", self.res_final, f"must not be coarser than res_start ({self.res_start} A)")
        at_least(self, "march_iter", 0)
        if self.prior not in PRIORS:
            raise unknown_choice("prior", self.prior, PRIORS)
        for name in ("prior_lambda", "car_sigma"):
            if getattr(self, name) is not None:
                positive(self, name)
        positive(self, "prior_strength")
        positive(self, "s0")
        if self.held_out is not None:
            at_least(self, "held_out", 0)
        at_least(self, "spheres", 1)
        if self.shift_sigma is not None:
            at_least(self, "shift_sigma", 0)
        positive(self, "shift_extent")
        within(self, "max_level", 0, 5)
        at_least(self, "patience", 1)
        if self.preload not in PRELOAD_CHOICES:
            raise unknown_choice("preload", self.preload, PRELOAD_CHOICES)


@dataclass
class Level:
    """What one (quadrature level, pixel radius) needs: pixels, quadrature, shift ramps (real, imaginary)."""

    radius: int
    pixels: SearchPixels
    quad: Quadrature
    ramps: tuple[Tensor, Tensor]


@dataclass
class SAGDState:
    """A run's state between passes. volume ``(n, n, n)``; rotations ``(N, 3, 3)`` and shifts ``(N, 2)`` (pixels) of
    the most probable evaluated point at each particle's last visit; batch_level: per minibatch (the held-out set
    last) the quadrature level of its particles' ``phi`` (-1: never seen)."""

    volume: Tensor
    sagd: SAGD
    phi: ParticlePhi
    rotations: Tensor
    shifts: Tensor
    batch_level: list[int]
    passes: int = 0
    best_rremse: float = math.inf
    stale: int = 0
    last_rremse: float = math.nan
    converged: bool = False
    best_volume: Tensor | None = None
    last_fraction: float = 1.0

    def checkpoint(self, setup: dict[str, Any], total: int) -> dict[str, Any]:
        """What ``--resume`` needs. Under torchrun every rank calls it: the per-particle state (poses, shifts, the
        samplers' ``phi``) of all ``total`` particles is gathered from the ranks."""
        def whole(t: Tensor) -> Tensor:
            return distributed.gather_shards(t, total)

        phi = {"level": whole(self.phi.level), "tau_prev": whole(self.phi.tau_prev),
               "log_phi": {k: tuple(whole(t) for t in v) for k, v in sorted(self.phi.log_phi.items())}}
        return {"setup": setup, "volume": self.volume, "sagd": self.sagd.state(), "phi": phi,
                "rotations": whole(self.rotations), "shifts": whole(self.shifts), "batch_level": list(self.batch_level),
                "passes": self.passes, "best_rremse": self.best_rremse, "stale": self.stale,
                "last_rremse": self.last_rremse, "converged": self.converged, "best_volume": self.best_volume}

    @staticmethod
    def restore(saved: dict[str, Any], device: torch.device, rows: Tensor) -> SAGDState:
        """Take back a :meth:`checkpoint`, for the particles at ``rows`` of the saved ones (this rank's)."""
        phi = saved["phi"]
        mine = {"level": phi["level"][rows], "tau_prev": phi["tau_prev"][rows],
                "log_phi": {k: tuple(t[rows] for t in v) for k, v in phi["log_phi"].items()}}
        return SAGDState(saved["volume"].to(device), SAGD.from_state(saved["sagd"], device),
                         ParticlePhi.from_state(mine, device), saved["rotations"][rows].to(device),
                         saved["shifts"][rows].to(device), list(saved["batch_level"]), int(saved["passes"]),
                         float(saved["best_rremse"]), int(saved["stale"]), float(saved["last_rremse"]),
                         bool(saved["converged"]),
                         None if saved.get("best_volume") is None else saved["best_volume"].to(device))


def random_spheres(n: int, diameter_px: float, count: int, generator: torch.Generator) -> Tensor:
    """The random start (Fig. 5): ``count`` solid spheres of radius uniform in :data:`SPHERE_RADII` x the diameter,
    centres uniform in the particle's sphere (radius ``diameter / 2`` minus the sphere's), summed. ``(n, n, n)``."""
    lo, hi = SPHERE_RADII
    radii = diameter_px * (lo + (hi - lo) * torch.rand(count, generator=generator, dtype=torch.float64))
    direction = torch.randn(count, 3, generator=generator, dtype=torch.float64)
    direction = direction / direction.norm(dim=1, keepdim=True)
    reach = (0.5 * diameter_px - radii).clamp_min(0.0)
    centres = direction * (reach * torch.rand(count, generator=generator, dtype=torch.float64) ** (1 / 3))[:, None]
    axis = torch.arange(n, dtype=torch.float64) - n // 2
    z, y, x = torch.meshgrid(axis, axis, axis, indexing="ij")
    grid = torch.stack([x, y, z], -1)  # (n, n, n, 3)
    volume = torch.zeros((n, n, n), dtype=torch.float64)
    for c, r in zip(centres, radii, strict=True):  # a handful of spheres, once per run
        volume += (((grid - c) ** 2).sum(-1) <= r * r).to(torch.float64)
    return volume.to(torch.float32)


@register_engine
class SAGDEngine:
    """SAGD: MAP by stochastic average gradient descent with importance-sampled pose marginalisation."""

    name: ClassVar[str] = "sagd"
    kind: ClassVar[str] = "abinitio"
    summary: ClassVar[str] = ("SAGD (Punjani, Brubaker and Fleet): MAP density under an exponential (or CAR, uniform) "
                              "prior by stochastic average gradient descent, poses and shifts marginalised by "
                              "importance-sampled quadrature, frequency marching 1/40 -> 1/10 A^-1, held-out RREMSE.")
    config_class: ClassVar[type[EngineConfig]] = SAGDConfig
    #: Shares its particles over torchrun's ranks (:mod:`cryocli.distributed`).
    data_parallel: ClassVar[bool] = True

    def __init__(self, device: torch.device | str | None = None) -> None:
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self._levels: dict[tuple[int, int], Level] = {}
        self._kernels: dict[tuple[int, int], tuple[Tensor, Tensor, Tensor]] = {}

    def check_inputs(self, data: ParticleStack, config: EngineConfig) -> None:
        """Nothing beyond the configuration and the particles to check before a sagd run."""

    # ------------------------------------------------------------------------------------------- run
    def run(self, data: ParticleStack, config: EngineConfig, reporter: Reporter) -> Reconstruction:
        cfg = config if isinstance(config, SAGDConfig) else SAGDConfig(**config.as_dict())
        cfg.validate()
        dev = self.device
        if len(data) < 2:
            raise CryocliError("sagd needs at least 2 particles", data.table.path)
        # Under torchrun each rank holds its share of the particles (and of every minibatch and the held-out set);
        # the data terms of the gradient, the line search's objective and the held-out error are summed over the
        # ranks, so every rank takes the same SAGD steps on the same map.
        # held: images (float32) and their half transforms (complex64)
        share = share_particles(data, cfg, dev, cfg.preload, lambda box: 4 * box * box + 8 * box * (box // 2 + 1))
        parts, rows, self.total = share.parts, share.rows, share.total
        self._levels, self._kernels = {}, {}
        self.parts, self.cfg = parts, cfg
        saved = reporter.resume_state()
        setup = saved["setup"] if saved is not None else self._setup(parts, cfg)
        setup = distributed.broadcast_object(setup)  # rank 0's random start and its scale, for every rank
        assert isinstance(setup, dict)
        reporter.event("sagd_setup", **_plain(setup))
        self.setup = setup
        self.spectra = (image_to_rfft(parts.images) / parts.box).to(torch.complex64) \
            if isinstance(parts, PreparedParticles) else None
        self.prior = self._prior(setup)
        self.held = self._mine(setup["held_out"])
        self.batches = [self._mine(b) for b in setup["batches"]]
        st = SAGDState.restore(saved, dev, torch.as_tensor(rows, dtype=torch.long)) if saved is not None \
            else self._new_state(setup)
        max_iter = cfg.max_iter if cfg.epochs is None else min(cfg.max_iter, cfg.epochs * len(self.batches))
        reporter.start(max_iter, "sagd", completed=st.sagd.tau)
        while st.sagd.tau < max_iter and not st.converged:
            self._pass(st, reporter, max_iter)
        if st.best_volume is not None:
            st.volume = st.best_volume  # the map with the lowest held-out error at the final omega
        self._final_poses(st)
        omega = self._omega(max(1, st.sagd.tau))
        return Reconstruction(
            volume=st.volume.detach().cpu().to(torch.float32), voxel_size=parts.pixel_size,
            rotations=distributed.gather_shards(st.rotations, self.total).detach().cpu(),
            origins_angstrom=(distributed.gather_shards(st.shifts, self.total) * parts.pixel_size).detach().cpu(),
            metrics=[r for r in reporter.history if r.get("run") == reporter.run_name], inverted=parts.inverted,
            converged=st.converged,
            method_summary={"sagd_iterations": st.sagd.tau, "sagd_passes": st.passes,
                            "final_resolution_A": 1.0 / omega,
                            "final_rremse": st.best_rremse if st.best_volume is not None else st.last_rremse,
                            "prior": cfg.prior, "importance_sampling": cfg.importance_sampling,
                            **_plain(setup)})

    # ------------------------------------------------------------------------------------------- setup
    def _setup(self, parts: ParticleSet, cfg: SAGDConfig) -> dict[str, Any]:
        """Settings from the data (host syncs, once): noise sigma, sizes, held-out set and minibatches, the scaled
        random start and the priors' parameters."""
        n, apix, n_all = parts.box, parts.pixel_size, self.total
        sigma = self._noise_sigma(parts)
        diameter_a = float(cfg.particle_diameter) if cfg.particle_diameter else 0.8 * n * apix
        shift_sigma_a = float(cfg.shift_sigma) if cfg.shift_sigma is not None else 0.03 * n * apix
        gen = torch.Generator().manual_seed(cfg.seed)
        order = torch.randperm(n_all, generator=gen)
        if cfg.held_out is not None:
            n_test = min(int(cfg.held_out), n_all - 1)
        else:
            n_test = HELD_OUT_MAX if n_all >= HELD_OUT_MAX / HELD_OUT_SHARE else max(1, int(HELD_OUT_SHARE * n_all))
        held, train = order[:n_test], order[n_test:]
        batches = [b.sort().values.tolist() for b in torch.split(train, cfg.batch_size)]
        setup: dict[str, Any] = {
            "sigma": sigma, "diameter_A": diameter_a, "shift_sigma_A": shift_sigma_a, "held_out_count": n_test,
            "minibatches": len(batches), "held_out": held.sort().values.tolist(), "batches": batches}
        start = random_spheres(n, diameter_a / apix, cfg.spheres, gen)
        scale = self._start_scale(parts, start, sigma, cfg, gen)
        start = start * scale
        mean, std = float(start.mean()), float(start.std())
        setup["start_scale"] = scale
        # The prior weighs prior_strength nats per training particle at the start's density (lambda sum(V0) =
        # prior_strength * N_train): its weight against the data does not change with the size of the set.
        setup["prior_lambda"] = float(cfg.prior_lambda) if cfg.prior_lambda is not None \
            else cfg.prior_strength * len(train) / (max(mean, 1e-30) * n**3)
        setup["car_sigma"] = float(cfg.car_sigma) if cfg.car_sigma is not None else max(std, 1e-30) / cfg.prior_strength
        setup["start"] = start
        return setup

    @staticmethod
    def _noise_sigma(parts: ParticleSet, chunk: int = 1024) -> float:
        """The standard deviation of the background pixels (beyond 0.4 box) over all particles (all ranks'; streamed
        ``chunk`` at a time when the particles are not held)."""
        mask = background_mask(parts.box, device=parts.images.device)
        if distributed.current().world_size == 1 and isinstance(parts, PreparedParticles):
            return float(parts.images[:, mask].std())
        moments = np.zeros(3)
        for start in range(0, len(parts), chunk):
            moments += background_moments(parts.images[start:start + chunk], mask)
        return std_from_moments(*distributed.sum_over_ranks(moments.tolist()))

    def _mine(self, ids: list[int]) -> Tensor:
        """This rank's positions (in its share of the particles) of the particles ``ids`` of the whole set."""
        return distributed.held_positions(torch.tensor(ids, dtype=torch.long))[1].to(self.device)

    def _start_scale(self, parts: ParticleSet, start: Tensor, sigma: float, cfg: SAGDConfig,
                     gen: torch.Generator) -> float:
        """The factor that gives the start's projections (through the particles' CTFs) the images' signal power at
        ``1 / res_start`` (the noise power ``sigma^2`` per pixel removed), over up to 512 particles drawn with
        ``gen`` from the whole set (under torchrun each rank measures those it holds and the sums are added)."""
        n, dev = parts.box, self.device
        radius = self._radius(self._omega_bounds(parts, cfg)[0], parts)
        pixels = SearchPixels.build(n, radius, dev)
        sample = torch.randperm(self.total, generator=gen)[:512]
        rotations = random_rotations(sample.numel(), generator=gen, dtype=torch.float32)
        held, local = distributed.held_positions(sample)
        local = local.to(dev)
        x = pixels.take(image_to_rfft(parts.images[local]) / n)
        vft = fourier_volume(start.to(dev), PAD, radius + 1)
        proj = project_pixels(vft, rotations[held].to(dev), pixels, PAD) / n
        ctf = self._ctf(local, pixels)
        signal_per = ((x.real**2 + x.imag**2) - sigma**2).sum(1)
        model_per = (ctf**2 * (proj.real**2 + proj.imag**2)).sum(1)
        if distributed.current().world_size == 1:
            signal, model = float(signal_per.mean()), float(model_per.mean())
        else:
            signal_sum, model_sum, count = distributed.sum_over_ranks(
                [float(signal_per.sum()), float(model_per.sum()), float(local.numel())], dev)
            signal, model = signal_sum / count, model_sum / count
        if not (signal > 0 and model > 0):
            return 1.0 / max(float(start.sum()), 1.0)
        return math.sqrt(signal / model)

    def _prior(self, setup: dict[str, Any]) -> DensityPrior:
        return make_prior(self.cfg.prior, setup["prior_lambda"], setup["car_sigma"])

    def _new_state(self, setup: dict[str, Any]) -> SAGDState:
        n, dev, n_all = self.parts.box, self.device, len(self.parts)  # this rank's particles
        volume = setup["start"].to(dev, torch.float32).clone()
        return SAGDState(volume=volume, sagd=SAGD.create(len(self.batches), (n, n, n), dev),
                         phi=ParticlePhi.empty(n_all, dev), rotations=torch.eye(3, device=dev).repeat(n_all, 1, 1),
                         shifts=torch.zeros(n_all, 2, device=dev), batch_level=[-1] * (len(self.batches) + 1))

    # ------------------------------------------------------------------------------------------- schedule
    def _omega_bounds(self, parts: ParticleSet, cfg: SAGDConfig) -> tuple[float, float]:
        nyquist = 1.0 / (2.0 * parts.pixel_size)
        end = min(1.0 / cfg.res_final, nyquist)
        return min(1.0 / cfg.res_start, end), end

    def _omega(self, tau: int) -> float:
        """The maximum frequency (1/A) at iteration ``tau`` (1-based), as compared (whole Fourier pixels)."""
        lo, hi = self._omega_bounds(self.parts, self.cfg)
        frac = 1.0 if self.cfg.march_iter == 0 else min(1.0, (tau - 1) / self.cfg.march_iter)
        omega = lo * (hi / lo) ** frac
        return self._radius(omega, self.parts) / (self.parts.box * self.parts.pixel_size)

    @staticmethod
    def _radius(omega: float, parts: ParticleSet) -> int:
        return int(min(parts.box // 2, max(2, round(omega * parts.box * parts.pixel_size))))

    def _level(self, omega: float) -> Level:
        parts, cfg = self.parts, self.cfg
        radius = self._radius(omega, parts)
        level = level_for(omega, self.setup["diameter_A"], cfg.max_level)
        key = (level, radius)
        if key not in self._levels:
            apix = parts.pixel_size
            sigma_px = self.setup["shift_sigma_A"] / apix
            quad = build_quadrature(level, self.setup["diameter_A"] / apix, sigma_px, cfg.shift_extent * sigma_px,
                                    self.device)
            pixels = SearchPixels.build(parts.box, radius, self.device)
            self._levels[key] = Level(radius, pixels, quad, pixels.ramp_parts(quad.shifts))
        return self._levels[key]

    def _kernel(self, old: int, new: Level) -> tuple[Tensor, Tensor, Tensor]:
        key = (old, new.quad.level)
        if key not in self._kernels:
            apix = self.parts.pixel_size
            sigma_px = self.setup["shift_sigma_A"] / apix
            source = build_quadrature(old, self.setup["diameter_A"] / apix, sigma_px,
                                      self.cfg.shift_extent * sigma_px, self.device)
            self._kernels[key] = kernels(source, new.quad)
        return self._kernels[key]

    # ------------------------------------------------------------------------------------------- pieces
    def _ctf(self, ids: Tensor, pixels: SearchPixels) -> Tensor:
        params = None if self.parts.ctf is None else self.parts.ctf.index(ids.to(self.parts.ctf.defocus_u.device))
        return ctf_on_pixels(params, pixels, ids.numel(), self.parts.pixel_size, self.device)

    def _batch_pixels(self, ids: Tensor, lv: Level) -> BatchPixels:
        spectra = self.spectra[ids] if self.spectra is not None else \
            (image_to_rfft(self.parts.images[ids]) / self.parts.box).to(torch.complex64)
        return batch_pixels(spectra, self._ctf(ids, lv.pixels), lv.pixels, self.setup["sigma"])

    def _project(self, volume: Tensor, lv: Level) -> tuple[Tensor, Tensor]:
        return project_quadrature(volume, lv.quad.rotations, lv.pixels, lv.radius)

    def _sets(self, ids: Tensor, old_level: int, lv: Level, phi: ParticlePhi, generator: torch.Generator
              ) -> tuple[SampleSet, SampleSet, SampleSet]:
        """Every point at a first visit (or without importance sampling), else eq. 14's proposals."""
        q = lv.quad
        b = ids.numel()
        if old_level < 0 or not self.cfg.importance_sampling:
            return full_set(q.log_w_dir, b), full_set(q.log_w_psi, b), full_set(q.log_w_shift, b)
        tau_prev = phi.tau_prev[ids]
        alpha, temp = alpha_schedule(tau_prev), temperature_schedule(tau_prev)
        tables = phi.log_phi[old_level]
        out = []
        for table, kernel, log_w in zip(tables, self._kernel(old_level, lv), (q.log_w_dir, q.log_w_psi, q.log_w_shift), strict=True):
            out.append(draw(proposal(table[ids], kernel, alpha, temp), log_w, self.cfg.s0, generator))
        return out[0], out[1], out[2]

    def _record(self, st: SAGDState, ids: Tensor, lv: Level, sets: tuple[SampleSet, SampleSet, SampleSet],
                res: Marginal, tau: int) -> None:
        q = lv.quad
        values = (scatter_log_phi(sets[0], res.log_phi_dir), scatter_log_phi(sets[1], res.log_phi_psi),
                  scatter_log_phi(sets[2], res.log_phi_shift))
        st.phi.store(ids, q.level, q.sizes, values, tau)
        st.rotations[ids] = q.rotations[res.best_dir * q.sizes[1] + res.best_psi]
        st.shifts[ids] = q.shifts[res.best_shift]

    def _generator(self, tau: int, salt: int = 0) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(self.cfg.seed * 1_000_003 + 7919 * salt + tau)

    # ------------------------------------------------------------------------------------------- iterations
    def _iteration(self, st: SAGDState, k: int) -> dict[str, Any]:
        """One SAGD iteration on minibatch ``k``; returns device and host figures for the metrics row. Under
        torchrun each rank works on its share of the minibatch (possibly none of it) and the data terms are summed."""
        tau = st.sagd.tau + 1
        omega = self._omega(tau)
        lv = self._level(omega)
        ids = self.batches[k]
        log_w = (lv.quad.log_w_dir, lv.quad.log_w_psi, lv.quad.log_w_shift)
        alone = distributed.current().world_size == 1
        n_batches = len(self.batches)
        if ids.numel() > 0:
            sets = self._sets(ids, st.batch_level[k], lv, st.phi, self._generator(tau))
            data = self._batch_pixels(ids, lv)
            volume = st.volume.detach().requires_grad_(True)
            res = marginal(data, self._project(volume, lv), lv.ramps, sets, log_w)
            loss = -res.log_p.sum()
            (grad,) = torch.autograd.grad(loss, volume)
            fraction = (res.evaluated.to(torch.float32) / lv.quad.points).sum()
        else:  # this rank holds none of the minibatch: it adds zeros to the sums
            grad, loss, fraction = torch.zeros_like(st.volume), torch.zeros((), device=self.device), \
                torch.zeros((), device=self.device)
        distributed.all_reduce_sum(grad)  # the minibatch's data term over every rank's share of it

        def objective(v: Tensor) -> float:
            with torch.no_grad():
                value = -marginal(data, self._project(v, lv), lv.ramps, sets, log_w).log_p.sum() if ids.numel() \
                    else torch.zeros((), device=v.device)
                if alone:
                    return float(value + self.prior.value(v) / n_batches)
                return distributed.sum_over_ranks([float(value)], v.device)[0] + float(self.prior.value(v) / n_batches)

        with torch.no_grad():
            prior_grad = self.prior.grad(st.volume)
            st.volume, info = st.sagd.step(st.volume.detach(), k, grad, prior_grad, objective)
            if ids.numel() > 0:
                self._record(st, ids, lv, sets, res, tau)
        st.batch_level[k] = lv.quad.level
        # sums over this rank's particles (the pass adds the ranks' once, at its end)
        return {"omega": omega, "level": lv.quad.level, "points": lv.quad.points, "fraction": fraction,
                "loss": loss.detach(), "count": ids.numel(), **info}

    def _evaluate(self, st: SAGDState, ids_all: Tensor, group: int, tau: int, salt: int) -> Tensor:
        """E-step without gradients over ``ids_all`` (batches of ``batch_size``); records poses and ``phi``; returns
        the expected squared errors ``(N,)``."""
        omega = self._omega(max(1, tau))
        lv = self._level(omega)
        errors = []
        with torch.no_grad():
            proj = self._project(st.volume, lv)
            log_w = (lv.quad.log_w_dir, lv.quad.log_w_psi, lv.quad.log_w_shift)
            for i, ids in enumerate(torch.split(ids_all, self.cfg.batch_size)):
                sets = self._sets(ids, st.batch_level[group], lv, st.phi, self._generator(tau, salt + i))
                res = marginal(self._batch_pixels(ids, lv), proj, lv.ramps, sets, log_w)
                self._record(st, ids, lv, sets, res, tau)
                errors.append(res.expected_sq_error)
        return torch.cat(errors) if errors else torch.zeros(0, device=self.device)

    def _held_out_rremse(self, st: SAGDState) -> float:
        if int(self.setup["held_out_count"]) == 0:
            return math.nan
        tau = st.sagd.tau
        errors = self._evaluate(st, self.held, len(self.batches), tau, salt=1)
        st.batch_level[len(self.batches)] = self._level(self._omega(max(1, tau))).quad.level
        pixels = self._level(self._omega(max(1, tau))).pixels.index.numel()
        if distributed.current().world_size == 1:
            return rremse(errors, self.setup["sigma"] ** 2, pixels)
        total, count = distributed.sum_over_ranks([float(errors.sum()), float(errors.numel())], errors.device)
        return math.sqrt(total / count / (self.setup["sigma"] ** 2 * pixels))

    def _pass(self, st: SAGDState, reporter: Reporter, max_iter: int) -> None:
        """One pass over the minibatches (in a seeded order), then the held-out RREMSE, the stopping rule, one metrics
        row per iteration and the checkpoint."""
        st.passes += 1
        order = torch.randperm(len(self.batches), generator=torch.Generator().manual_seed(self.cfg.seed * 7_919 + st.passes))
        rows: list[dict[str, Any]] = []
        for k in order.tolist():
            if st.sagd.tau >= max_iter:
                break
            row = self._iteration(st, k)
            rows.append(row)
            # The fraction shown is the previous pass's mean: no device-to-host sync per iteration.
            reporter.step(1, res=f"{1 / row['omega']:.1f}A", frac=st.last_fraction, L=row["L"], eps=row["eps"],
                          rremse=st.last_rremse)
        st.last_rremse = self._held_out_rremse(st)
        at_max = st.sagd.tau > self.cfg.march_iter
        if at_max and math.isfinite(st.last_rremse):
            if st.last_rremse < st.best_rremse:
                st.best_volume = st.volume.detach().clone()
            if st.last_rremse < st.best_rremse * (1.0 - STOP_TOLERANCE):
                st.stale = 0
            else:
                st.stale += 1
            if st.last_rremse < st.best_rremse:
                st.best_rremse = st.last_rremse
            st.converged = st.stale >= self.cfg.patience
        fractions, losses = [], []
        if rows:
            # per-iteration sums of every rank's share of the minibatch, then per-particle means (one collective)
            sums = distributed.all_reduce_sum(torch.stack(
                [torch.stack([r["fraction"] for r in rows]).to(torch.float64),
                 torch.stack([r["loss"] for r in rows]).to(torch.float64),
                 torch.tensor([float(r["count"]) for r in rows], dtype=torch.float64, device=self.device)]))
            fractions = (sums[0] / sums[2].clamp_min(1)).tolist()
            losses = (sums[1] / sums[2].clamp_min(1)).tolist()
        if fractions:
            st.last_fraction = sum(fractions) / len(fractions)
        first = st.sagd.tau - len(rows) + 1
        finished = st.converged or st.sagd.tau >= max_iter
        for i, row in enumerate(rows):
            tau = first + i
            end = i == len(rows) - 1
            metrics = {"pass": st.passes, "omega": row["omega"], "resolution_A": 1.0 / row["omega"],
                       "level": row["level"], "points": row["points"], "fraction_evaluated": fractions[i],
                       "L": row["L"], "eps": row["eps"], "loss": losses[i],
                       "rremse": st.last_rremse if end else math.nan}
            reporter.end_epoch(tau, metrics, volume=st.volume if end else None,
                               voxel_size=self.parts.pixel_size if end else None,
                               rotations=distributed.gather_shards(st.rotations, self.total) if end else None,
                               state=st.checkpoint(self.setup, self.total) if end else None, last=end and finished)

    def _final_poses(self, st: SAGDState) -> None:
        """The most probable poses of every particle under the returned map: one E-step without gradients (training
        particles; the held-out ones had theirs at the last RREMSE), then the local search of
        :func:`~cryocli.engines.abinitio.sagd_poses.polish_poses` for all."""
        tau = max(1, st.sagd.tau)
        for k, ids in enumerate(self.batches):
            self._evaluate(st, ids, k, tau, salt=2 + k)
            st.batch_level[k] = self._level(self._omega(tau)).quad.level
        lv = self._level(self._omega(tau))
        apix = self.parts.pixel_size
        with torch.no_grad():
            vft = fourier_volume(st.volume, PAD, lv.radius + 1)
            for ids in torch.split(torch.arange(len(self.parts), device=self.device), self.cfg.batch_size):
                st.rotations[ids], st.shifts[ids] = polish_poses(
                    vft, PAD, self._batch_pixels(ids, lv), lv.pixels, st.rotations[ids], st.shifts[ids],
                    angular_step(lv.quad.level), lv.quad.shift_spacing, self.setup["shift_sigma_A"] / apix)


def _plain(setup: dict[str, Any]) -> dict[str, Any]:
    """The setup's scalar figures (for the log and the summary)."""
    return {k: v for k, v in setup.items() if not isinstance(v, (list, Tensor))}
