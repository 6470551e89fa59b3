"""Cryo2SSNet: 2-stage search-supervised auto-encoder with denoised heuristic beam search (Zhang and Tang).

The paper ships no code; this follows its text and appendices A and B.

* Encoder (A.1, :class:`~cryocli.engines.abinitio.s2s2.S2S2Encoder`): 3 conv blocks (32, 64, 128 channels),
  2 fully connected layers of 512, S2S2 head; input images normalised per image.
* Decoder (4.2, eq. 3, :mod:`~cryocli.engines.abinitio.voxel_decoder`): real-space voxels, ``U(0, 0.1)`` inside
  the particle radius and 0 outside (B.2); Hartley slice, CTF, inverse transform, normalisation.
* Loss (eq. 12, :mod:`~cryocli.engines.abinitio.unbiased_loss`): the unbiased normalised L2 for the data's SNR.
* DHBS (4.3, Algorithm 1, :mod:`~cryocli.engines.abinitio.dhbs`): beam of width 4, depth 5 from the encoder's
  pose, then 20 steps of gradient descent at 0.05 (B.2), cost between denoised images.
* Denoiser (A.2, :mod:`~cryocli.engines.abinitio.denoiser`): 5-layer MLP trained before the reconstruction,
  used by DHBS for the first third of stage 1, then replaced by the identity (B.2, 5.4).
* Two stages (4.4, Algorithm 2): stage 1 cuts the gradient between encoder and decoder; the decoder learns
  ``l2^{gamma,c}(I, D(r~))`` at the searched pose ``r~``, the encoder ``lambda d_quat^2(r, r~)`` (eq. 11, 13,
  lambda = 1). Stage 2 trains both end to end on ``l2^{gamma,c}(I, D(E(I)))`` (eq. 14) with DHBS off. 7,500
  steps of batch 32 split equally (B.2); Adam 1e-4 (encoder) and 1e-2 (decoder), the decoder's rate divided
  by 10 at the switch.

What cryocli adds (each written down where it is made):

* Shifts (the paper omits them and says real data need them): DHBS also searches in-plane translations, a
  3 x 3 grid around the current shift whose step halves with the depth (from ``max_shift / 2``); the encoder
  has a translation output, supervised in stage 1 by the searched shift in units of the particle radius
  (``lambda |t - t~|^2 / radius^2``: a shift by one radius weighs as much as a large rotation error). On by
  default (``shifts=False`` is the paper's setting, for centred particles).
* SNR (``snr=None``): estimated from the particles (:func:`~cryocli.engines.abinitio.unbiased_loss.estimate_snr`)
  and logged. With the gradient cut and Adam the SNR only scales the loss (it is ``2 - 2 gamma rho``).
* Denoiser factor and mask radius: chosen from the data (:mod:`~cryocli.engines.abinitio.denoiser`).
* Step scaling: the paper fixes 7,500 steps of 32 whatever the dataset (24 epochs of 10,000 particles, 6 of
  40,000); ``steps`` keeps that budget and the epochs follow from it (``epochs`` overrides). The switch and the
  denoiser's third are counted in steps. The denoiser trains 48 passes over the data (7,500 x 64 / 10,000),
  at most 7,500 steps.
* Gradient descent keeps only steps that lower a particle's cost (see :meth:`BeamSearch.polish`).
* Search from a random start (``beam_start="auto"``, ``switch_waits``): the paper's beam starts at the 4 base cells
  nearest the encoder's pose, which from a random encoder hold the true pose for 4/72 of the particles; with it
  alone 2,000 simulated 4AKE particles of 32 px stayed at 113 degrees median error after 300 steps. Until the
  encoder agrees with the search (median distance between its poses and the searched ones over an epoch at most
  ``agreement``, 10 degrees), the beam starts from the 16 best of all 72 base cells, and stage 2, which trusts the
  encoder's poses (4.4), waits: switching on schedule with an encoder that had not learned took the median error
  from 22 to 129 degrees. The decoder's rate still drops at the scheduled step. ``beam_start="encoder",
  switch_waits=False`` is the paper as written.
* Coarse levels compare only the frequencies their cell size resolves (:meth:`BeamSearch.band`).
* The density is kept inside a soft sphere and non-negative after every step (``constrain_density``,
  :class:`~cryocli.engines.abinitio.voxel_decoder.DensityConstraint`): the sphere of the given particle diameter,
  or :data:`~cryocli.engines.abinitio.voxel_decoder.SUPPORT_SCALE` x the estimated radius.

Particles are prepared once in host memory (:func:`~cryocli.engines.particles.prepare_particles`) and go
to the device a batch at a time; per-particle poses ``(N, 3, 3)`` and shifts ``(N, 2)`` (pixels) live in
tensors indexed by particle id (the poses last used: the searched ones in stage 1, the encoder's in stage 2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch
from torch import Tensor

from cryocli import distributed
from cryocli.engines.abinitio import denoiser as denoiser_module
from cryocli.engines.abinitio.cryospin import ImageModel
from cryocli.engines.abinitio.denoiser import (
    MLPDenoiser,
    choose_factor,
    circular_mask,
    denoiser_steps,
    estimate_particle_radius,
    train_denoiser,
)
from cryocli.engines.abinitio.dhbs import BeamSearch, Denoise, adam_lr, identity
from cryocli.engines.abinitio.s2s2 import S2S2Encoder
from cryocli.engines.abinitio.unbiased_loss import estimate_snr, normalise, unbiased_l2
from cryocli.engines.abinitio.voxel_decoder import (
    SUPPORT_SCALE,
    DensityConstraint,
    VoxelDecoder,
    observed_images,
    render,
)
from cryocli.engines.particles import (
    PRELOAD_CHOICES,
    ParticleSet,
    PreparedParticles,
    background_mask,
    prefetching,
    require_batch_share,
    share_particles,
)
from cryocli.engines.progress import Reporter
from cryocli.engines.protocol import EngineConfig, at_least, positive, register_engine, unknown_choice, within
from cryocli.engines.result import Reconstruction
from cryocli.errors import CryocliError, OptionError
from cryocli.geometry.rotations import geodesic_distance, matrix_to_quaternion, quaternion_distance
from cryocli.io.dataset import ParticleStack

#: The paper's step budget and batch (B.2).
PAPER_STEPS, PAPER_BATCH = 7500, 32
#: Particles the data-derived settings (SNR, radius, denoiser factor) are estimated on when the particles stream.
SETUP_SAMPLE = 10_000
#: The decoder's learning rate is divided by this at the switch to stage 2 (B.2).
DECODER_DECAY = 10.0
#: Where the beam starts: "encoder" (the paper's c nearest cells of the encoder's pose), "global" (the c best of
#: all 72 cells of G_0), "auto" (global until the encoder agrees with the search, then the encoder's).
BEAM_STARTS = ("auto", "encoder", "global")


@dataclass
class Cryo2SSNetConfig(EngineConfig):
    """Cryo2SSNet's settings; defaults are the paper's (appendix B.2) unless said otherwise.

    epochs: passes over the particles (``None``: as many as ``steps`` take). steps: total optimiser steps
    (7,500). batch_size: 32. lr: the decoder's Adam rate (1e-2; divided by 10 in stage 2). encoder_lr: 1e-4.
    stage1_fraction: share of the steps in stage 1 (0.5). dhbs: ``False`` skips stage 1 (end to end only, the
    paper's ablation). beam_width / beam_depth: c = 4, depth 5. gd_steps / gd_lr: 20 steps at 0.05
    (``None``: 0.05 for ``gd="gd"``, a quarter of the last cell for ``gd="adam"``). gd: "gd" (vanilla, the paper's
    default) or "adam" (its better variant, 5.3). balance: lambda of eq. 13 (1). snr: linear SNR of the data
    (``None``: estimated). denoiser_factor: ``f`` (``None``: chosen from the data). denoiser_fraction: share of
    stage 1 during which the denoiser scores the beam (1/3; 0: never, 1: all of stage 1). denoiser_steps: its
    training steps (``None``: 48 passes over the data, at most 7,500). shifts: search and predict in-plane
    translations (cryocli's addition; ``False``: the paper's centred setting). max_shift: their bound in pixels
    of the working box (``None``: box / 8). encoder_channels: filters of the three conv blocks (32, 64, 128).
    beam_start: "auto", "encoder" (the paper) or "global" (see the module docstring). agreement: degrees of median
    encoder-to-search distance at which the encoder counts as trained (10). switch_waits: stage 2 waits for that
    (``False``: the paper's fixed switch). constrain_density: after every step, zero the density outside its support
    sphere and below 0 (``False``: the paper's unconstrained voxels). preload: hold the prepared images in host
    memory (``yes``), read each batch from the stacks (``no``: memory does not grow with the particle count; the
    data-derived settings are then estimated on :data:`SETUP_SAMPLE` particles spread over the set), or ``auto``: yes
    while they take at most :data:`~cryocli.engines.particles.PRELOAD_BYTES` (per torchrun rank).
    """

    epochs: int | None = None  # type: ignore[assignment]
    steps: int = PAPER_STEPS
    batch_size: int = PAPER_BATCH
    lr: float | None = 1e-2
    encoder_lr: float = 1e-4
    stage1_fraction: float = 0.5
    dhbs: bool = True
    beam_width: int = 4
    beam_depth: int = 5
    gd_steps: int = 20
    gd_lr: float | None = None
    gd: str = "gd"
    balance: float = 1.0
    snr: float | None = None
    denoiser_factor: int | None = None
    denoiser_fraction: float = 1.0 / 3.0
    denoiser_steps: int | None = None
    shifts: bool = True
    beam_start: str = "auto"
    agreement: float = 10.0
    switch_waits: bool = True
    constrain_density: bool = True
    max_shift: float | None = None
    encoder_channels: tuple[int, ...] = (32, 64, 128)
    preload: str = "auto"

    resume_may_change: ClassVar[frozenset[str]] = EngineConfig.resume_may_change | {"steps"}

    def validate(self) -> None:
        # The shared checks, with the epochs left to the step budget when not given.
        EngineConfig.validate(replace(self, epochs=1) if self.epochs is None else self)
        at_least(self, "steps", 1)
        positive(self, "lr")
        positive(self, "encoder_lr")
        within(self, "stage1_fraction", 0, 1)
        within(self, "beam_width", 1, 72)
        within(self, "beam_depth", 0, 8)  # depth 8: 72 x 8^8 cells, below 0.5 degrees
        at_least(self, "gd_steps", 0)
        if self.gd_lr is not None:
            positive(self, "gd_lr")
        if self.gd not in ("gd", "adam"):
            raise unknown_choice("gd", self.gd, ("gd", "adam"))
        if self.beam_start not in BEAM_STARTS:
            raise unknown_choice("beam_start", self.beam_start, BEAM_STARTS)
        within(self, "agreement", 0, 180)
        at_least(self, "balance", 0)
        if self.snr is not None:
            positive(self, "snr")
        if self.denoiser_factor is not None:
            at_least(self, "denoiser_factor", 1)
        within(self, "denoiser_fraction", 0, 1)
        if self.denoiser_steps is not None:
            at_least(self, "denoiser_steps", 1)
        if self.max_shift is not None:
            at_least(self, "max_shift", 0)
        if not self.encoder_channels or min(self.encoder_channels) < 1:
            raise OptionError("encoder_channels", self.encoder_channels, "expected positive filter counts")
        if self.preload not in PRELOAD_CHOICES:
            raise unknown_choice("preload", self.preload, PRELOAD_CHOICES)

    def resolved_gd_lr(self) -> float:
        """The polishing rate used: ``gd_lr``, or 0.05 (vanilla) / :func:`~cryocli.engines.abinitio.dhbs.adam_lr`."""
        if self.gd_lr is not None:
            return float(self.gd_lr)
        return 0.05 if self.gd == "gd" else adam_lr(self.beam_depth)


@dataclass
class Schedule:
    """Steps of a run: ``epochs`` of ``per_epoch`` steps; stage 1 for steps ``1 .. stage1``; the denoiser scores the
    beam for steps ``1 .. denoise``."""

    epochs: int
    per_epoch: int
    stage1: int
    denoise: int

    @staticmethod
    def of(cfg: Cryo2SSNetConfig, n_particles: int) -> Schedule:
        per_epoch = math.ceil(n_particles / cfg.batch_size)
        epochs = cfg.epochs if cfg.epochs is not None else max(1, round(cfg.steps / per_epoch))
        total = epochs * per_epoch
        stage1 = round(total * cfg.stage1_fraction) if cfg.dhbs else 0
        return Schedule(epochs, per_epoch, stage1, round(stage1 * cfg.denoiser_fraction))


@dataclass
class Cryo2SSNetState:
    """A run's state between epochs. poses ``(N, 3, 3)`` RELION ``A``; shifts ``(N, 2)`` pixels ``[x, y]``;
    denoiser ``None`` when the schedule never uses it; constraint: what the density is projected onto after each
    step (``None``: nothing; derived from the settings, not checkpointed)."""

    encoder: S2S2Encoder
    decoder: VoxelDecoder
    enc_opt: torch.optim.Optimizer
    dec_opt: torch.optim.Optimizer
    denoiser: MLPDenoiser | None
    poses: Tensor
    shifts: Tensor
    encoder_error: Tensor
    constraint: DensityConstraint | None = None
    agreed: bool = False

    def checkpoint(self, epoch: int, setup: dict[str, Any], total: int) -> dict[str, Any]:
        """What ``--resume`` needs after ``epoch`` (with the data-derived settings ``setup``). Under torchrun every
        rank calls it: the per-particle state of all ``total`` particles is gathered from the ranks."""
        def whole(t: Tensor) -> Tensor:
            return distributed.gather_shards(t, total)

        return {"epoch": epoch, "setup": setup, "encoder": self.encoder.state_dict(),
                "decoder": self.decoder.state_dict(), "enc_opt": self.enc_opt.state_dict(),
                "dec_opt": self.dec_opt.state_dict(),
                "denoiser": self.denoiser.state_dict() if self.denoiser is not None else None,
                "poses": whole(self.poses), "shifts": whole(self.shifts), "encoder_error": whole(self.encoder_error),
                "agreed": self.agreed}

    def restore(self, saved: dict[str, Any], rows: Tensor) -> None:
        """Take back a :meth:`checkpoint`, for the particles at ``rows`` of the saved ones (this rank's)."""
        dev = self.poses.device
        self.encoder.load_state_dict(saved["encoder"])
        self.decoder.load_state_dict(saved["decoder"])
        self.enc_opt.load_state_dict(saved["enc_opt"])
        self.dec_opt.load_state_dict(saved["dec_opt"])
        if self.denoiser is not None and saved.get("denoiser") is not None:
            self.denoiser.load_state_dict(saved["denoiser"])
        self.poses, self.shifts = saved["poses"][rows].to(dev), saved["shifts"][rows].to(dev)
        self.encoder_error = saved["encoder_error"][rows].to(dev)
        self.agreed = bool(saved["agreed"])


@register_engine
class Cryo2SSNetEngine:
    """Cryo2SSNet: S2S2 encoder supervised by a denoised beam search, then trained end to end; voxel decoder."""

    name: ClassVar[str] = "cryo2ssnet"
    kind: ClassVar[str] = "abinitio"
    summary: ClassVar[str] = ("Cryo2SSNet (Zhang and Tang): CNN pose encoder supervised by a denoised heuristic beam "
                              "search over a hierarchical SO(3) grid (stage 1), then trained end to end with a "
                              "real-space voxel decoder (stage 2); unbiased normalised L2 loss.")
    config_class: ClassVar[type[EngineConfig]] = Cryo2SSNetConfig
    #: Shares its particles over torchrun's ranks (:mod:`cryocli.distributed`).
    data_parallel: ClassVar[bool] = True

    def __init__(self, device: torch.device | str | None = None) -> None:
        self.device = torch.device(device) if device is not None else torch.device("cpu")

    def check_inputs(self, data: ParticleStack, config: EngineConfig) -> None:
        """Nothing beyond the configuration and the particles to check before a cryo2ssnet run."""

    # ------------------------------------------------------------------------------------------- run
    def run(self, data: ParticleStack, config: EngineConfig, reporter: Reporter) -> Reconstruction:
        cfg = config if isinstance(config, Cryo2SSNetConfig) else Cryo2SSNetConfig(**config.as_dict())
        cfg.validate()
        if len(data) < 2:
            raise CryocliError("cryo2ssnet needs at least 2 particles", data.table.path)
        # Under torchrun each rank holds its share of the particles and their state; the networks and the map are
        # the same on every rank (rank 0's start and settings, then gradients averaged over the ranks every step).
        require_batch_share(cfg.batch_size)
        # Host memory (or the stacks): the device sees one batch at a time.
        share = share_particles(data, cfg, torch.device("cpu"), cfg.preload)
        parts, rows, total = share.parts, share.rows, share.total
        n, n_part, dev = parts.box, len(parts), self.device
        if n < 16:
            raise OptionError("box", n, "cryo2ssnet needs a box of at least 16 px (three pooling blocks)")
        saved = reporter.resume_state()
        setup = saved["setup"] if saved is not None else self._setup(parts, cfg)
        setup = distributed.broadcast_object(setup)  # rank 0's estimates (from its share) for every rank
        assert isinstance(setup, dict)
        reporter.event("cryo2ssnet_setup", **setup)
        sched = Schedule.of(cfg, total)
        st = self._new_state(parts, cfg, setup, sched)
        for module in (st.encoder, st.decoder, st.denoiser):
            if module is not None:
                distributed.broadcast_module(module)
        start_epoch = 1
        if saved is not None:
            st.restore(saved, torch.as_tensor(rows, dtype=torch.long))
            start_epoch = int(saved["epoch"]) + 1
        elif st.denoiser is not None:
            self._train_denoiser(st.denoiser, parts, cfg, setup, reporter)
        model = ImageModel(n, parts.pixel_size, dev)
        beam = BeamSearch(model, cfg.beam_width, cfg.beam_depth, cfg.gd_steps, cfg.resolved_gd_lr(), cfg.gd,
                          setup["max_shift_px"] if cfg.shifts else 0.0, setup["radius_px"])
        reporter.start(sched.epochs * sched.per_epoch, "cryo2ssnet", completed=(start_epoch - 1) * sched.per_epoch)
        last_loss = float("nan")
        for epoch in range(start_epoch, sched.epochs + 1):
            generator = torch.Generator().manual_seed(distributed.rank_seed(cfg.seed * 1000 + epoch))
            order = torch.randperm(n_part, generator=generator)
            metrics = self._epoch(st, parts, model, beam, cfg, setup, sched, epoch, order, reporter, last_loss)
            last_loss = metrics["loss"]
            distributed.average_buffers(st.encoder)
            state = st.checkpoint(epoch, setup, total)
            reporter.end_epoch(epoch, metrics, volume=st.decoder.to_map(), voxel_size=parts.pixel_size,
                               rotations=state["poses"], state=state, last=epoch == sched.epochs)
        return Reconstruction(volume=st.decoder.to_map().cpu().to(torch.float32), voxel_size=parts.pixel_size,
                              rotations=distributed.gather_shards(st.poses, total).detach().cpu(),
                              origins_angstrom=(distributed.gather_shards(st.shifts, total)
                                                * parts.pixel_size).detach().cpu(),
                              metrics=[r for r in reporter.history if r.get("run") == reporter.run_name],
                              inverted=parts.inverted,
                              method_summary={**setup, "epochs": sched.epochs, "steps": sched.epochs * sched.per_epoch,
                                              "stage1_steps": sched.stage1, "denoiser_steps_in_search": sched.denoise})

    # ------------------------------------------------------------------------------------------- setup
    def _setup(self, parts: ParticleSet, cfg: Cryo2SSNetConfig) -> dict[str, Any]:
        """The settings taken from the data: SNR, particle radius, denoiser factor, shift bound (host syncs, once);
        from every particle held, or from :data:`SETUP_SAMPLE` spread over the set when they are streamed."""
        n = parts.box
        background = background_mask(n)
        if isinstance(parts, PreparedParticles):
            images = parts.images
        else:
            images = parts.images[torch.linspace(0, len(parts) - 1, min(len(parts), SETUP_SAMPLE)).long().unique()]
        snr = float(cfg.snr) if cfg.snr is not None else estimate_snr(images, background)
        if cfg.particle_diameter is not None:
            radius = min(0.5 * n, 0.5 * cfg.particle_diameter / parts.pixel_size)
            support = radius  # the user's mask diameter, as RELION masks its references
        else:
            radius = estimate_particle_radius(images, background)
            support = SUPPORT_SCALE * radius
        factor = int(cfg.denoiser_factor) if cfg.denoiser_factor is not None else choose_factor(images)
        max_shift = float(cfg.max_shift) if cfg.max_shift is not None else n / 8
        return {"snr": snr, "snr_source": "given" if cfg.snr is not None else "estimated",
                "radius_px": float(radius), "support_radius_px": float(support), "denoiser_factor": factor,
                "max_shift_px": max_shift}

    def _new_state(self, parts: ParticleSet, cfg: Cryo2SSNetConfig, setup: dict[str, Any],
                   sched: Schedule) -> Cryo2SSNetState:
        """The random start: encoder (PyTorch's default initialisation), decoder ``U(0, 0.1)`` in the particle
        radius, their optimisers, identity poses and zero shifts; the density's constraint."""
        dev, n, n_part = self.device, parts.box, len(parts)
        gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
        decoder = VoxelDecoder(n, setup["radius_px"], gen, dev)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            encoder = S2S2Encoder(n, cfg.encoder_channels, predict_shifts=cfg.shifts,
                                  max_shift=setup["max_shift_px"]).to(dev)
            denoiser = MLPDenoiser(n, setup["denoiser_factor"], circular_mask(n, setup["radius_px"])).to(dev) \
                if sched.denoise > 0 else None
        return Cryo2SSNetState(
            encoder=encoder, decoder=decoder, denoiser=denoiser,
            enc_opt=torch.optim.Adam(encoder.parameters(), lr=cfg.encoder_lr),
            dec_opt=torch.optim.Adam(decoder.parameters(), lr=float(cfg.lr or 1e-2)),
            poses=torch.eye(3, device=dev).repeat(n_part, 1, 1), shifts=torch.zeros(n_part, 2, device=dev),
            encoder_error=torch.full((n_part,), math.pi, device=dev),
            # Checkpoints from before the support radius was a setting: the estimate's scale.
            constraint=DensityConstraint.of(n, setup.get("support_radius_px", SUPPORT_SCALE * setup["radius_px"]),
                                            device=dev) if cfg.constrain_density else None)

    def _train_denoiser(self, denoiser: MLPDenoiser, parts: ParticleSet, cfg: Cryo2SSNetConfig,
                        setup: dict[str, Any], reporter: Reporter) -> None:
        world = distributed.current().world_size
        steps = cfg.denoiser_steps or denoiser_steps(int(distributed.sum_over_ranks([float(len(parts))])[0]))
        reporter.start(steps, "cryo2ssnet denoiser")
        gen = torch.Generator().manual_seed(distributed.rank_seed(cfg.seed + 17))
        with torch.random.fork_rng(devices=[]):
            # Under torchrun each rank draws its share of every batch from its particles; gradients are averaged.
            loss = train_denoiser(denoiser, lambda idx: parts.images[idx].to(self.device), len(parts), setup["snr"],
                                  steps, gen, batch_size=max(2, denoiser_module.PAPER_BATCH // world),
                                  on_step=lambda: reporter.step(1),
                                  sync_gradients=distributed.average_gradients if world > 1 else None)
        reporter.event("denoiser_trained", steps=steps, loss=float(loss))

    # ------------------------------------------------------------------------------------------- epochs
    def _epoch(self, st: Cryo2SSNetState, parts: ParticleSet, model: ImageModel, beam: BeamSearch,
               cfg: Cryo2SSNetConfig, setup: dict[str, Any], sched: Schedule, epoch: int, order: Tensor,
               reporter: Reporter, last_loss: float) -> dict[str, Any]:
        """One pass over the particles in ``order``; stage and denoiser follow the global step."""
        dev, n = self.device, parts.box
        snr, radius = setup["snr"], setup["radius_px"]
        base_lr = float(cfg.lr or 1e-2)
        zero = torch.zeros((), device=dev)
        sums = {"loss": zero, "encoder_loss": zero, "beam_cost": zero, "polished_cost": zero}
        count = {"stage1": 0, "all": 0}
        denoised = 0
        st.encoder.train()
        batches = torch.split(order, cfg.batch_size) if distributed.current().world_size == 1 else \
            torch.tensor_split(order, sched.per_epoch)  # every rank takes the one-process steps, a share of each batch
        for k, idx_cpu in enumerate(prefetching(parts.images, batches)):
            step = (epoch - 1) * sched.per_epoch + k + 1
            # Stage 2 assumes an encoder that has learned the poses (4.4): it waits for that when asked to.
            waiting = cfg.dhbs and cfg.switch_waits and not st.agreed
            stage1 = step <= sched.stage1 or waiting
            for group in st.dec_opt.param_groups:
                group["lr"] = base_lr if step <= sched.stage1 else base_lr / DECODER_DECAY
            idx = idx_cpu.to(dev, non_blocking=True)
            images = parts.images[idx_cpu].to(dev, non_blocking=True)
            ctf = model.ctf(parts.ctf.index(idx_cpu).to(dev)) if parts.ctf is not None else None
            spectra = model.spectra(images)
            rot_enc, t_enc = st.encoder(normalise(images))
            grid = st.decoder.grid()
            if stage1:
                use_denoiser = step <= sched.denoise and st.denoiser is not None
                denoise: Denoise = st.denoiser if use_denoiser and st.denoiser is not None else identity
                denoised += int(use_denoiser)
                global_start = cfg.beam_start == "global" or (cfg.beam_start == "auto" and not st.agreed)
                found = beam.search(grid.detach(), spectra, ctf, rot_enc.detach(), t_enc.detach(), denoise,
                                    global_start=global_start)
                rot, shift = found.rotations, found.shifts
                # Eq. 11 / 13: the encoder learns the searched pose (and shift, in particle radii) ...
                enc_loss = cfg.balance * quaternion_distance(matrix_to_quaternion(rot_enc),
                                                             matrix_to_quaternion(rot)).square().mean()
                if cfg.shifts:
                    enc_loss = enc_loss + cfg.balance * ((t_enc - shift) / radius).square().sum(1).mean()
                with torch.no_grad():
                    st.encoder_error[idx] = geodesic_distance(rot_enc.detach(), rot)
                sums["beam_cost"] = sums["beam_cost"] + found.beam_cost.sum()
                sums["polished_cost"] = sums["polished_cost"] + found.cost.sum()
                count["stage1"] += len(idx_cpu)
            else:
                # Eq. 14: end to end, the decoder renders at the encoder's pose.
                rot, shift = rot_enc, t_enc
                enc_loss = zero
            # ... and the decoder the image at that pose (eq. 12; in stage 1 no gradient reaches the encoder).
            observed = observed_images(model, spectra, shift[:, None] if cfg.shifts else None)
            loss = unbiased_l2(observed, render(grid, rot[:, None], ctf, n), snr).mean()
            st.enc_opt.zero_grad(set_to_none=True)
            st.dec_opt.zero_grad(set_to_none=True)
            (loss + enc_loss).backward()
            distributed.average_gradients([*st.encoder.parameters(), *st.decoder.parameters()])
            st.enc_opt.step()
            st.dec_opt.step()
            if st.constraint is not None:
                st.constraint.apply_(st.decoder.density)
            with torch.no_grad():
                st.poses[idx] = rot.detach()
                st.shifts[idx] = shift.detach()
            b = len(idx_cpu)
            sums["loss"] = sums["loss"] + loss.detach() * b
            sums["encoder_loss"] = sums["encoder_loss"] + enc_loss.detach() * b
            count["all"] += b
            # The live line shows the previous epoch's loss: no device-to-host sync per batch.
            reporter.step(1, stage="search" if stage1 else "end-to-end", loss=last_loss)
        loss_sum, encoder_sum, beam_sum, polished_sum, seen, searched = distributed.sum_over_ranks(
            [float(sums["loss"]), float(sums["encoder_loss"]), float(sums["beam_cost"]), float(sums["polished_cost"]),
             float(count["all"]), float(count["stage1"])], dev)
        metrics: dict[str, Any] = {
            "stage": "search" if searched == seen else "end-to-end" if searched == 0 else "switch",
            "loss": loss_sum / seen,
            "encoder_loss": encoder_sum / seen,
            "denoised_batches": denoised,
        }
        if searched:
            metrics["beam_cost"] = beam_sum / searched
            metrics["polished_cost"] = polished_sum / searched
            # The encoder's median distance to the searched poses (the paper's Fig. 3, as an angle), over all ranks'
            # particles, so that every rank decides the switch alike.
            errors = distributed.gather_shards(
                st.encoder_error, int(distributed.sum_over_ranks([float(len(st.encoder_error))])[0]))
            disagreement = math.degrees(float(errors.median()))
            metrics["encoder_vs_search_deg"] = disagreement
            if disagreement <= cfg.agreement and not st.agreed:
                st.agreed = True
                reporter.event("encoder_agrees", epoch=epoch, encoder_vs_search_deg=disagreement)
        return metrics
