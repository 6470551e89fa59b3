"""cryoSPIN: ab initio reconstruction with semi-amortized pose inference (Shekarforoush et al., 2024).

Image model (cryoSPIN eq. 1-3, cryocli's one forward model): the observed image's centred Hartley
transform is compared with ``CTF * slice(H, A)``, the central slice at pose ``A`` (RELION matrix) of an
explicit Hartley volume ``H = M * exp(E)`` (eq. 7-8, :class:`~cryocli.engines.common.hartley_volume.HartleyVolume`)
multiplied by the particle's CTF; with ``shifts`` on, the image is first translated by the particle's
origin. The negative log-likelihood of white Gaussian noise is, up to a constant, the squared error
over the Fourier pixels ``|k| <= n / 2``, divided by ``n^2`` per pixel so that the noise alone
contributes 1 per pixel (particles are normalised to unit background variance).

Stage 1, auto-encoding (epochs ``1 .. switch_epoch``): a VGG-style CNN with ``heads`` pose heads
(:class:`~cryocli.engines.common.encoders.MultiHeadPoseEncoder`) predicts ``M`` poses per image; each
is rendered and only the head with the lowest loss is penalised (winner-takes-all, eq. 5). Encoder
(Adam, lr 1e-4) and decoder (Adam, lr 0.05) take one step per batch.

Stage 2, auto-decoding (from ``switch_epoch + 1``): each particle keeps its best head's pose
(eq. 6) as ``R0`` and its origin; per batch, ``pose_steps`` (5) Adam steps (lr 0.05, per-particle moments,
:class:`~cryocli.engines.abinitio.particle_adam.ParticleAdam`) on an axis-angle perturbation ``omega``
with ``R = exp([omega]_x) R0`` (eq. 9; the exponential map uses stable Taylor terms near 0,
:func:`cryocli.geometry.rotations.axis_angle_to_matrix`), the perturbation folded into ``R0`` after every
update, then ``volume_steps`` (1) decoder step (lr 0.02).

cryocli's additions (the paper trains on 50,000 particles for ~5,500 encoder steps; on the few thousand
particles a CPU run affords, the paper's stage 1 alone does not leave its random start):

- A fixed candidate grid (``grid_order``, HEALPix order 2: 4,608 rotations, ~15 degrees apart) is scored
  with the heads in every auto-encoding batch. The encoder still learns by the heads' winner-takes-all
  loss, against the current volume; the volume is fitted at the best candidate of heads and grid, and at
  the switch each particle starts from that best candidate. Without it, a fresh encoder maps every image
  to nearly the same few poses, the volume fits those, and the pair never leaves that self-consistent
  wrong solution: on 3,000 simulated 4AKE particles (box 48 / 24) the median rotation error stayed at
  85-105 degrees after 40 epochs, even on noise-free images, while the same encoder against the true,
  frozen volume reached 10 degrees. With the grid the error falls to 8.6 degrees by the switch. The
  encoder's share of winners is logged each epoch (``grid_win_fraction``); ``grid_order=-1`` is the
  paper's method exactly (with ``encode_resolution=0, decode_march_epochs=0``). With ``shifts`` on, each
  grid rotation is scored at the particle's origin and its 8 neighbours a step away (a quarter of the
  encoding band's finest period), so the grid's candidate follows particles off the box centre; keeping the
  particle's origin instead left the grid blind to it (3,000 particles of 48 px with 2 A shifts: median
  rotation error 6.4 degrees and FSC 0.5 vs truth 7.2 A, against 5.1 degrees and 6.8 A with the search).
- Frequency marching: auto-encoding compares frequencies up to ``1 / encode_start_resolution`` (20 A) in
  its first epoch, widened linearly in frequency to ``1 / encode_resolution`` (12 A, the maximum resolution
  of cryoSPARC's ab-initio, which marches there from 35 A) by its last; at the switch, shells never compared
  are cleared (they still hold the random start) and auto-decoding widens the band to Nyquist over
  ``decode_march_epochs`` (6) epochs. Measured on the same set: comparing to Nyquist from the start leaves
  the error at 83 degrees (the random high frequencies decide the winners), and keeping the uncleared shells
  at the switch leaves it at 7.5 instead of 4.4 degrees. The march from 20 A changes nothing measurable for
  centred particles (4.4 degrees, 6.3 A) or 2 A shifts; with 5 A shifts (``shifts`` on) it was better than 12 A
  throughout on three of five simulated sets and worse on two (5.5 against 19 degrees on one, 23 against 5.7
  on another; the README's cryospin section).
- A global search in the first ``search_epochs`` (3) auto-decoding epochs, with origins estimated. Runs on
  particles off centre (``shifts`` on) leave some particles far from their poses, and many of those at poses and
  origins that fit the mirror image of the map: a low-resolution volume looks much like its mirror image, so
  during auto-encoding some particles settle on the mirror image of the rest and the volume holds both; the
  paper's local steps never take them across (measured with 5 A shifts: 6% of 3,000 particles more than 30
  degrees off, median 5.5 degrees but mean 15; on four sets of 2,000, 13-47%, two thirds of them fitting the
  mirror image on the worst set). In each batch of these epochs every particle's best pose on the candidate grid
  is found around its origin and around the origin it would have under the map's best improper self-alignment
  (:func:`mirror_symmetry`, a reflection through a plane; :func:`mirror_twin_poses`); each candidate takes the
  same pose steps as the particle, from fresh moments, and replaces the particle's pose where it ends with a
  lower loss (3,000 particles: 4.9 degrees, mean 6.9; 8% more time). The grid alone, around the particle's
  origin, mended little (the worst set: mean 59 -> 55 degrees, against 26 with the mirror twin's origin).
  Centred particles did not split, so without origins the search is off by default.

Every particle-level operation is batched on the device; the per-particle state (poses, origins, Adam
moments) lives in ``(N, ...)`` tensors indexed by particle id. The map written is the decoder's
(``final_map="decoder"``) or a direct Fourier reconstruction at the recovered poses
(``final_map="reconstruct"``, :mod:`cryocli.engines.common.reconstruct`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from cryocli import distributed
from cryocli.engines.abinitio.particle_adam import ParticleAdam
from cryocli.engines.common.encoders import MultiHeadPoseEncoder
from cryocli.engines.common.hartley_volume import HartleyVolume, radial_amplitude_from_images
from cryocli.engines.particles import (
    PRELOAD_CHOICES,
    ParticleSet,
    batches_with_images,
    require_batch_share,
    share_particles,
)
from cryocli.engines.progress import Reporter
from cryocli.engines.protocol import EngineConfig, at_least, positive, register_engine, unknown_choice, within
from cryocli.engines.result import Reconstruction
from cryocli.errors import CryocliError, OptionError
from cryocli.geometry.rotations import axis_angle_to_matrix
from cryocli.imaging.ctf import CTFParams, ctf_at
from cryocli.imaging.fourier import centred_grid_2d
from cryocli.io.dataset import ParticleStack


@dataclass
class CryoSpinConfig(EngineConfig):
    """cryoSPIN's settings; defaults are the paper's synthetic-data settings (section 5, appendix A).

    heads: pose heads M (7; the paper uses 15 on real data). switch_epoch: last auto-encoding epoch (7 of
    20). lr: decoder learning rate in stage 1 (0.05). decoder_lr_decoding: decoder learning rate in
    stage 2 (0.02). encoder_lr: None: 1e-4 with the paper's encoder, 1e-3 with the slim one
    (:func:`default_encoder`). pose_lr: per-particle Adam learning rate in stage 2 (0.05 rad).
    shift_lr: the same for origins in stage 2 (pixels). pose_steps / volume_steps: 5 / 1 per batch.
    shifts: predict and refine in-plane origins (the paper's real-data setting; the candidate grid then also
    searches the 8 origins one step around each particle's, :func:`_grid_shift_step`). encoder_channels /
    encoder_convs: filters and convolutions per VGG block (None: VGG16's 64, 128, 256, 512 on CUDA at
    box >= 64, otherwise 16, 32, 64 (:func:`default_encoder`); 2, 2, 3, 3 convolutions; as many blocks as
    the box allows). head_hidden: widths of each head's hidden layers. pyramid_sigmas: Gaussian blurs
    (pixels) stacked with the image as encoder input channels. mantissa_std: standard deviation of the
    random initial mantissa. final_map: "decoder" or "reconstruct". grid_order: HEALPix order of the fixed
    SO(3) grid of candidate poses that joins the heads' candidates during auto-encoding (cryocli's addition,
    see the module docstring; 2 = 4,608 poses about 15 degrees apart; -1: the paper's heads alone).
    encode_resolution: during auto-encoding compare only frequencies up to 1 / this (Angstrom; 0: all,
    as the paper). encode_start_resolution: the band of the first auto-encoding epoch (Angstrom), widened
    to ``encode_resolution`` by the last (0: no march). decode_march_epochs: auto-decoding widens the
    compared band from there to Nyquist over this many epochs (0: Nyquist at once). search_epochs: the first
    auto-decoding epochs in which every particle's pose is also searched on the candidate grid, around its origin
    and its mirror twin's (cryocli's addition, see the module docstring; None: 3 with ``shifts``, 0 without;
    0: the paper's local steps alone). preload: hold the
    prepared images on the device (``yes``), read each batch from the stacks (``no``: memory does not grow
    with the particle count), or ``auto``: yes while they take at most
    :data:`~cryocli.engines.particles.PRELOAD_BYTES` (per torchrun rank).
    """

    epochs: int = 20
    batch_size: int = 64
    lr: float | None = 0.05
    heads: int = 7
    switch_epoch: int = 7
    decoder_lr_decoding: float = 0.02
    encoder_lr: float | None = None
    pose_lr: float = 0.05
    shift_lr: float = 0.05
    pose_steps: int = 5
    volume_steps: int = 1
    shifts: bool = False
    encoder_channels: tuple[int, ...] | None = None
    encoder_convs: tuple[int, ...] = (2, 2, 3, 3)
    head_hidden: tuple[int, ...] = (256, 256)
    pyramid_sigmas: tuple[float, ...] = (1.0, 2.0, 4.0)
    mantissa_std: float = 1.0
    final_map: str = "decoder"
    grid_order: int = 2
    encode_resolution: float = 12.0
    encode_start_resolution: float = 20.0
    decode_march_epochs: int = 6
    search_epochs: int | None = None
    preload: str = "auto"

    def validate(self) -> None:
        super().validate()
        at_least(self, "heads", 1)
        at_least(self, "switch_epoch", 0)
        positive(self, "lr")
        for name in ("decoder_lr_decoding", "pose_lr", "shift_lr", "mantissa_std"):
            positive(self, name)
        if self.encoder_lr is not None:
            positive(self, "encoder_lr")
        at_least(self, "pose_steps", 0)
        at_least(self, "volume_steps", 1)
        if self.preload not in PRELOAD_CHOICES:
            raise unknown_choice("preload", self.preload, PRELOAD_CHOICES)
        if self.final_map not in ("decoder", "reconstruct"):
            raise unknown_choice("final_map", self.final_map, ("decoder", "reconstruct"))
        within(self, "grid_order", -1, 3)  # order 3: 294,912 candidate poses; -1 turns the grid off
        at_least(self, "encode_resolution", 0)
        at_least(self, "encode_start_resolution", 0)
        at_least(self, "decode_march_epochs", 0)
        if self.search_epochs is not None:
            at_least(self, "search_epochs", 0)
            if self.search_epochs > 0 and self.grid_order < 0:
                raise OptionError("search_epochs", self.search_epochs, "the search needs the candidate grid, which a "
                                  "grid order of -1 turns off")
        if self.encoder_channels is not None and (not self.encoder_channels or min(self.encoder_channels) < 1):
            raise OptionError("encoder_channels", self.encoder_channels, "expected positive filter counts")
        if any(s <= 0 for s in self.pyramid_sigmas):
            raise OptionError("pyramid_sigmas", self.pyramid_sigmas, "expected positive blurs in pixels")


class ImageModel:
    """The comparison of observed particles with rendered slices, on the centred full Fourier plane.

    n: box (pixels); pixel_size: Angstrom. Builds the centred frequency grid, the circular mask
    ``|k| <= n / 2`` and, per batch, the CTFs and the observed Hartley transforms (after translating the
    images by their origins in pixels).
    """

    def __init__(self, n: int, pixel_size: float, device: torch.device, radius: float | None = None) -> None:
        self.n = n
        self.pixel_size = pixel_size
        self.ky, self.kx = centred_grid_2d(n, device)
        self.set_radius(radius)

    def set_radius(self, radius: float | None) -> None:
        """Compare pixels with ``|k| <= radius`` Fourier pixels (default and at most ``n / 2``)."""
        r = self.n // 2 if radius is None else min(float(radius), self.n // 2)
        # Slices need pixels up to this radius only (the projector skips the rest).
        self.r_max = min(self.n // 2, int(math.ceil(r)))
        self.mask = ((self.kx**2 + self.ky**2) <= r * r).to(torch.float32)
        self.n_mask = float(self.mask.sum())

    def spectra(self, images: Tensor) -> Tensor:
        """Centred full transforms ``(B, n, n)`` complex of images ``(B, n, n)`` (centre at ``n // 2``)."""
        dims = (-2, -1)
        return torch.fft.fftshift(torch.fft.fft2(torch.fft.ifftshift(images, dim=dims)), dim=dims)

    def observed(self, spectra: Tensor, shifts_px: Tensor | None) -> Tensor:
        """Hartley transforms of the images translated by ``+shifts_px`` (``(..., 2)`` [x, y] pixels, which
        centres a particle whose RELION origin is ``shifts_px * pixel_size``). spectra ``(B, n, n)``;
        shifts ``(B, 2)`` or ``(B, M, 2)``; returns ``(B, n, n)`` or ``(B, M, n, n)``."""
        if shifts_px is None:
            return spectra.real - spectra.imag
        if shifts_px.dim() == 3:
            spectra = spectra[:, None]
        phase = (-2 * math.pi / self.n) * (self.kx * shifts_px[..., 0, None, None] + self.ky * shifts_px[..., 1, None, None])
        shifted = spectra * torch.polar(torch.ones_like(phase), phase)
        return shifted.real - shifted.imag

    def ctf(self, params: CTFParams | None) -> Tensor | None:
        """CTFs ``(B, n, n)`` on the centred grid, or ``None`` without CTF."""
        if params is None:
            return None
        scale = 1.0 / (self.n * self.pixel_size)
        return ctf_at(params, self.kx * scale, self.ky * scale).to(torch.float32)

    def nll(self, slices: Tensor, ctf: Tensor | None, observed: Tensor) -> Tensor:
        """Per-image loss: mean over ``|k| <= n/2`` of ``(CTF * slice - observed)^2 / n^2``. Shapes
        ``(B, [M,] n, n)``; ``ctf`` ``(B, n, n)``; returns ``(B,)`` or ``(B, M)``."""
        model = slices if ctf is None else slices * (ctf[:, None] if slices.dim() == 4 else ctf)
        err = (model - observed) ** 2 * self.mask
        return err.sum((-2, -1)) / (self.n_mask * self.n * self.n)


#: VGG16's filters per block, the paper's encoder.
PAPER_CHANNELS = (64, 128, 256, 512)
#: A quarter of the first three: the encoder a CPU or a small box trains in minutes (the demo's and the
#: done-means test's measured setting).
SLIM_CHANNELS = (16, 32, 64)
#: Smallest box at which a CUDA run keeps the paper's encoder.
PAPER_ENCODER_MIN_BOX = 64


def default_encoder(box: int, device: torch.device) -> tuple[tuple[int, ...], float]:
    """The encoder's filters per VGG block and its learning rate when not given: the paper's network
    (VGG16 widths, Adam 1e-4) on a CUDA device at ``box >= 64`` pixels; otherwise a quarter of the widths
    with Adam 1e-3, and three blocks (the slim network learns in the few epochs a CPU run affords: on 4,000 particles of 48 px
    the paper's network took 666 s for 20 epochs on 2 cores, with its encoding epochs 12x slower than the
    decoding ones, and found the same poses; see the README's cryospin section)."""
    if device.type == "cuda" and box >= PAPER_ENCODER_MIN_BOX:
        return PAPER_CHANNELS, 1e-4
    return SLIM_CHANNELS, 1e-3


@dataclass
class CryoSpinState:
    """A cryospin run's state between epochs, updated in place by the stages.

    parts: the prepared particles. model: the image comparison. volume / encoder and their optimisers.
    poses ``(N, 3, 3)`` RELION ``A`` and shifts ``(N, 2)`` pixels per particle; pose_adam / shift_adam: their
    per-particle Adam moments (stage 2). head_of ``(N,)``: the winning head of each particle (-1: the grid).
    grid: the fixed candidate poses of stage 1 (``None``: off). total: particles in the run; under torchrun
    ``parts`` and the per-particle tensors are this rank's share of them.
    """

    parts: ParticleSet
    model: ImageModel
    volume: HartleyVolume
    encoder: MultiHeadPoseEncoder
    vol_opt: torch.optim.Optimizer
    enc_opt: torch.optim.Optimizer
    poses: Tensor
    shifts: Tensor
    pose_adam: ParticleAdam
    shift_adam: ParticleAdam
    head_of: Tensor
    grid: CandidateGrid | None
    encoder_channels: tuple[int, ...]
    total: int

    def checkpoint(self, epoch: int, encoding: bool) -> dict[str, Any]:
        """What ``--resume`` needs after ``epoch`` (the encoder only while it still trains). Under torchrun every
        rank calls it: the per-particle state of all ``total`` particles is gathered from the ranks."""
        def whole(t: Tensor) -> Tensor:
            return distributed.gather_shards(t, self.total)

        def whole_adam(adam: ParticleAdam) -> dict[str, Tensor | float]:
            return {"m": whole(adam.m), "v": whole(adam.v), "steps": whole(adam.steps), "lr": adam.lr}

        return {"epoch": epoch, "volume": self.volume.state_dict(), "vol_opt": self.vol_opt.state_dict(),
                "encoder": self.encoder.state_dict() if encoding else None,
                "enc_opt": self.enc_opt.state_dict() if encoding else None,
                "poses": whole(self.poses), "shifts": whole(self.shifts), "pose_adam": whole_adam(self.pose_adam),
                "shift_adam": whole_adam(self.shift_adam), "head_of": whole(self.head_of)}

    def restore(self, saved: dict[str, Any], rows: Tensor) -> None:
        """Take back a :meth:`checkpoint`, for the particles at ``rows`` of the saved ones (this rank's)."""
        dev = self.poses.device

        def mine(adam: dict[str, Any]) -> dict[str, Any]:
            return {**adam, "m": adam["m"][rows], "v": adam["v"][rows], "steps": adam["steps"][rows]}

        self.volume.load_state_dict(saved["volume"])
        self.vol_opt.load_state_dict(saved["vol_opt"])
        if saved.get("encoder") is not None:
            self.encoder.load_state_dict(saved["encoder"])
            self.enc_opt.load_state_dict(saved["enc_opt"])
        self.poses, self.shifts = saved["poses"][rows].to(dev), saved["shifts"][rows].to(dev)
        self.pose_adam = ParticleAdam.from_state(mine(saved["pose_adam"]), dev)
        self.shift_adam = ParticleAdam.from_state(mine(saved["shift_adam"]), dev)
        self.head_of = saved["head_of"][rows].to(dev)


@register_engine
class CryoSpinEngine:
    """cryoSPIN: multi-head encoder (winner-takes-all) then per-particle pose optimisation, explicit Hartley decoder."""

    name: ClassVar[str] = "cryospin"
    kind: ClassVar[str] = "abinitio"
    summary: ClassVar[str] = ("cryoSPIN (2024): multi-head CNN pose encoder with winner-takes-all loss, then "
                              "per-particle SGD on poses; explicit Hartley-space volume.")
    config_class: ClassVar[type[EngineConfig]] = CryoSpinConfig
    #: Shares its particles over torchrun's ranks (:mod:`cryocli.distributed`).
    data_parallel: ClassVar[bool] = True

    def __init__(self, device: torch.device | str | None = None) -> None:
        self.device = torch.device(device) if device is not None else torch.device("cpu")

    # ------------------------------------------------------------------------------------------- run
    def run(self, data: ParticleStack, config: EngineConfig, reporter: Reporter) -> Reconstruction:
        cfg = config if isinstance(config, CryoSpinConfig) else CryoSpinConfig(**config.as_dict())
        cfg.validate()
        if len(data) < 2:
            raise CryocliError("cryospin needs at least 2 particles", data.table.path)
        # Under torchrun each rank holds its share of the particles and their state; the volume and the encoder
        # are the same on every rank (rank 0's start, then gradients averaged over the ranks at every step).
        require_batch_share(cfg.batch_size)
        share = share_particles(data, cfg, self.device, cfg.preload)
        parts, rows, total = share.parts, share.rows, share.total
        st = self._new_state(parts, cfg, total)
        distributed.broadcast_module(st.volume)
        distributed.broadcast_module(st.encoder)
        start_epoch = 1
        saved = reporter.resume_state()
        if saved is not None:
            st.restore(saved, torch.as_tensor(rows, dtype=torch.long))
            start_epoch = int(saved["epoch"]) + 1
        n, n_part = parts.box, len(parts)
        steps_per_epoch = len(_batches(torch.arange(total), cfg.batch_size))
        reporter.start(cfg.epochs * steps_per_epoch, "cryospin", completed=(start_epoch - 1) * steps_per_epoch)
        for epoch in range(start_epoch, cfg.epochs + 1):
            generator = torch.Generator().manual_seed(distributed.rank_seed(cfg.seed * 1000 + epoch))
            order = torch.randperm(n_part, generator=generator)  # on the host: batches are read from it
            encoding = epoch <= cfg.switch_epoch
            st.model.set_radius(_encode_radius(cfg, n, parts.pixel_size, epoch if encoding else None))
            if encoding:
                metrics = self._encoding_epoch(st, order, cfg, reporter)
            else:
                if epoch == cfg.switch_epoch + 1 and not _switched(saved, cfg):
                    # Eq. 6: every particle starts from its best head's pose under the current volume.
                    self._assign_best_candidates(st, cfg)
                    if cfg.encode_resolution > 0:
                        # Shells never compared so far still hold the random start: clear them, so that the
                        # first pose updates follow the fitted low-resolution volume, not that noise.
                        st.volume.clear_beyond(st.model.r_max)
                    for group in st.vol_opt.param_groups:
                        group["lr"] = cfg.decoder_lr_decoding
                st.model.set_radius(_decode_radius(cfg, n, parts.pixel_size, epoch))
                search = st.grid is not None and epoch <= cfg.switch_epoch + _search_epochs(cfg)
                metrics = self._decoding_epoch(st, order, cfg, reporter, search)
            metrics["stage"] = "encode" if encoding else "decode"
            distributed.average_buffers(st.encoder)
            state = st.checkpoint(epoch, encoding)
            reporter.end_epoch(epoch, metrics, volume=st.volume.to_map(), voxel_size=parts.pixel_size,
                               rotations=state["poses"], state=state, last=epoch == cfg.epochs)
        if cfg.epochs <= cfg.switch_epoch:
            # Poses from the encoder only (a run stopped before the switch).
            self._assign_best_candidates(st, cfg)
        final = st.volume.to_map() if cfg.final_map == "decoder" else self._reconstruct(parts, st.poses, st.shifts)
        head_of = distributed.gather_shards(st.head_of, total)
        usage = torch.bincount(head_of[head_of >= 0], minlength=cfg.heads).cpu().numpy() / total
        return Reconstruction(volume=final.detach().cpu().to(torch.float32), voxel_size=parts.pixel_size,
                              rotations=distributed.gather_shards(st.poses, total).detach().cpu(),
                              origins_angstrom=(distributed.gather_shards(st.shifts, total)
                                                * parts.pixel_size).detach().cpu(),
                              metrics=[r for r in reporter.history if r.get("run") == reporter.run_name],
                              inverted=parts.inverted,
                              method_summary={"encoder_channels": list(st.encoder_channels),
                                              "encoder_lr": st.enc_opt.param_groups[0]["lr"],
                                              "head_usage": usage.round(4).tolist(),
                                              "grid_share": round(float((head_of < 0).float().mean()), 4)})

    def check_inputs(self, data: ParticleStack, config: EngineConfig) -> None:
        """Nothing beyond the configuration and the particles to check before a cryospin run."""

    def _new_state(self, parts: ParticleSet, cfg: CryoSpinConfig,
                   total: int) -> CryoSpinState:
        """The random start: volume, encoder, optimisers, identity poses, zero origins."""
        dev, n, n_part = self.device, parts.box, len(parts)
        model = ImageModel(n, parts.pixel_size, dev)
        gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
        volume = HartleyVolume(n, self._initial_amplitude(parts, model), cfg.mantissa_std, gen, dev)
        channels, encoder_lr = default_encoder(n, dev)
        channels = cfg.encoder_channels or channels
        encoder_lr = cfg.encoder_lr or encoder_lr
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            encoder = MultiHeadPoseEncoder(n, cfg.heads, channels, cfg.encoder_convs, cfg.head_hidden,
                                           cfg.pyramid_sigmas, cfg.shifts).to(dev)
        return CryoSpinState(
            parts=parts, model=model, volume=volume, encoder=encoder,
            vol_opt=torch.optim.Adam(volume.parameters(), lr=float(cfg.lr or 0.05)),
            enc_opt=torch.optim.Adam(encoder.parameters(), lr=encoder_lr),
            poses=torch.eye(3, device=dev).repeat(n_part, 1, 1), shifts=torch.zeros(n_part, 2, device=dev),
            pose_adam=ParticleAdam.zeros(n_part, 3, cfg.pose_lr, dev),
            shift_adam=ParticleAdam.zeros(n_part, 2, cfg.shift_lr, dev),
            head_of=torch.zeros(n_part, dtype=torch.long, device=dev),
            grid=CandidateGrid(cfg.grid_order, dev, _grid_shift_step(cfg, parts.pixel_size) if cfg.shifts else None,
                               encoder.max_shift) if cfg.grid_order >= 0 else None,
            encoder_channels=channels,
            total=total)

    # ------------------------------------------------------------------------------------------- stages
    def _encoding_epoch(self, st: CryoSpinState, order: Tensor, cfg: CryoSpinConfig,
                        reporter: Reporter) -> dict[str, Any]:
        """Stage 1: one pass of encoder and decoder steps over the particles in ``order``."""
        parts, model, volume, encoder, grid = st.parts, st.model, st.volume, st.encoder, st.grid
        vol_opt, enc_opt, poses, shifts, head_of = st.vol_opt, st.enc_opt, st.poses, st.shifts, st.head_of
        encoder.train()
        # Sums stay on the device: reading them per batch would wait for the GPU at every step.
        total, count = torch.zeros((), dtype=torch.float64, device=poses.device), 0
        grid_wins = torch.zeros((), dtype=torch.float64, device=poses.device)
        for idx, images in batches_with_images(parts.images, _rank_batches(order, cfg.batch_size, st.total),
                                               poses.device):
            spectra = model.spectra(images)
            ctf = model.ctf(parts.ctf.index(idx) if parts.ctf is not None else None)
            hartley = volume.hartley()
            # The encoder learns against the current volume (winner-takes-all over its heads, eq. 5) ...
            head_loss, rot, sh = _head_losses(model, hartley.detach(), encoder, images, spectra, ctf, cfg)
            best_head, winner = head_loss.min(1)
            rows = torch.arange(rot.shape[0], device=rot.device)
            pose, shift = rot[rows, winner].detach(), sh[rows, winner].detach()
            if grid is not None:
                # ... while the volume is fitted at the best candidate of the heads and the fixed grid.
                pose, shift, winner = grid.merge(model, hartley.detach(), spectra, ctf, shifts[idx], cfg.shifts,
                                                 best_head.detach(), pose, shift, winner)
                grid_wins += (winner < 0).sum()
            slices = _project_grid(hartley, pose, model.n, model.r_max)
            vol_loss = model.nll(slices, ctf, model.observed(spectra, shift if cfg.shifts else None)).mean()
            enc_opt.zero_grad(set_to_none=True)
            vol_opt.zero_grad(set_to_none=True)
            (best_head.mean() + vol_loss).backward()
            distributed.average_gradients([*encoder.parameters(), *volume.parameters()])
            enc_opt.step()
            vol_opt.step()
            with torch.no_grad():
                poses[idx] = pose
                shifts[idx] = shift
                head_of[idx] = winner
            b = len(idx)
            total += vol_loss.detach() * b
            count += b
            reporter.step(1, stage="encode", loss=vol_loss.detach())
        usage = distributed.all_reduce_sum(torch.bincount(head_of[head_of >= 0], minlength=cfg.heads).float())
        loss_sum, seen, wins, particles = distributed.sum_over_ranks(
            [float(total), float(count), float(grid_wins), float(len(head_of))], head_of.device)
        return {"loss": loss_sum / seen, "head_usage_max": float(usage.max()) / particles,
                "grid_win_fraction": wins / seen}

    @torch.no_grad()
    def _assign_best_candidates(self, st: CryoSpinState, cfg: CryoSpinConfig) -> None:
        """Eq. 6: every particle takes its best candidate (heads, and the grid when on) under the current volume."""
        parts, model, volume, encoder, grid = st.parts, st.model, st.volume, st.encoder, st.grid
        poses, shifts, head_of = st.poses, st.shifts, st.head_of
        encoder.eval()
        n_part = len(parts)
        hartley = volume.hartley()
        batches = (torch.arange(start, min(n_part, start + cfg.batch_size)) for start in range(0, n_part, cfg.batch_size))
        for idx, images in batches_with_images(parts.images, batches, poses.device):
            spectra = model.spectra(images)
            ctf = model.ctf(parts.ctf.index(idx) if parts.ctf is not None else None)
            losses, rot, sh = _head_losses(model, hartley, encoder, images, spectra, ctf, cfg)
            best, winner = losses.min(1)
            rows = torch.arange(rot.shape[0], device=poses.device)
            pose, shift = rot[rows, winner], sh[rows, winner]
            if grid is not None:
                pose, shift, winner = grid.merge(model, hartley, spectra, ctf, shifts[idx], cfg.shifts, best, pose,
                                                 shift, winner)
            poses[idx], shifts[idx], head_of[idx] = pose, shift, winner

    def _decoding_epoch(self, st: CryoSpinState, order: Tensor, cfg: CryoSpinConfig,
                        reporter: Reporter, search: bool = False) -> dict[str, Any]:
        """Stage 2: per-particle pose (and origin) steps then decoder steps, over the particles in ``order``.

        search: the candidate grid is scored too (cryocli's addition): each particle's best grid pose around its
        origin, and around the origin its mirror twin would have (:func:`mirror_symmetry`), takes the same
        pose steps (fresh moments) and replaces the particle's pose where it ends lower."""
        parts, model, volume, vol_opt = st.parts, st.model, st.volume, st.vol_opt
        poses, shifts, pose_adam, shift_adam = st.poses, st.shifts, st.pose_adam, st.shift_adam
        total, count = torch.zeros((), dtype=torch.float64, device=poses.device), 0
        moved = torch.zeros((), dtype=torch.float64, device=poses.device)
        taken = torch.zeros((), dtype=torch.float64, device=poses.device)
        searcher = DecodingSearch.start(st.grid, model, volume, parts.pixel_size, cfg.shifts) if search else None
        for idx, images in batches_with_images(parts.images, _rank_batches(order, cfg.batch_size, st.total),
                                               poses.device):
            spectra = model.spectra(images)
            ctf = model.ctf(parts.ctf.index(idx) if parts.ctf is not None else None)
            b = len(idx)
            with torch.no_grad():
                grid = volume.hartley()
            start_r = poses[idx].clone()
            r0, t0, loss0 = _pose_steps(model, grid, spectra, ctf, poses[idx], shifts[idx], cfg, pose_adam, shift_adam,
                                        idx)
            if searcher is not None:
                r1, t1, loss1 = searcher.refined_candidates(model, grid, spectra, ctf, poses[idx], shifts[idx], cfg)
                with torch.no_grad():
                    take = loss1 < loss0
                    r0 = torch.where(take[:, None, None], r1, r0)
                    t0 = torch.where(take[:, None], t1, t0)
                    # The moments were taken at the old pose: a particle that moved starts afresh.
                    pose_adam.reset(idx, take)
                    shift_adam.reset(idx, take)
                    taken += take.sum()
            poses[idx] = r0.detach()
            shifts[idx] = t0.detach()
            for _ in range(cfg.volume_steps):
                slices = volume.project(r0.detach())
                observed = model.observed(spectra, t0.detach() if cfg.shifts else None)
                loss = model.nll(slices, ctf, observed).mean()
                vol_opt.zero_grad(set_to_none=True)
                loss.backward()
                distributed.average_gradients(volume.parameters())
                vol_opt.step()
            with torch.no_grad():
                moved += _angles_deg(start_r, r0).sum()
            total += loss.detach() * b
            count += b
            reporter.step(1, stage="decode", loss=loss.detach())
        loss_sum, seen, turned, searched = distributed.sum_over_ranks(
            [float(total), float(count), float(moved), float(taken)], poses.device)
        metrics = {"loss": loss_sum / seen, "pose_change_deg": turned / seen}
        if search:
            metrics["search_win_fraction"] = searched / seen
        return metrics

    # ------------------------------------------------------------------------------------------- helpers
    @torch.no_grad()
    def _initial_amplitude(self, parts: ParticleSet, model: ImageModel,
                           sample: int = 2000) -> Tensor:
        """Expected slice amplitude per shell from up to ``sample`` particles (noise power = ``n^2`` per
        Fourier pixel for unit-variance white noise)."""
        take = torch.linspace(0, len(parts) - 1, min(sample, len(parts)), device=parts.images.device).long()
        images = parts.images[take]
        hartley = model.observed(model.spectra(images), None)
        ctf = model.ctf(parts.ctf.index(take) if parts.ctf is not None else None)
        return radial_amplitude_from_images(hartley, ctf, float(model.n**2), model.n // 2 + 3)

    @torch.no_grad()
    def _reconstruct(self, parts: ParticleSet, poses: Tensor, shifts: Tensor) -> Tensor:
        """The direct Fourier reconstruction at the poses (``final_map="reconstruct"``), streamed 256 particles at
        a time; under torchrun from every rank's particles."""
        from cryocli.engines.common.reconstruct import DirectFourierReconstructor

        origins = shifts * parts.pixel_size
        rec = DirectFourierReconstructor(parts.box, parts.pixel_size, device=parts.images.device)
        for start in range(0, len(parts), 256):
            rows = slice(start, start + 256)
            rec.add(parts.images[rows], poses[rows], origins[rows],
                    parts.ctf.index(rows) if parts.ctf is not None else None)
        distributed.all_reduce_sum(rec.backprojector.accumulators)
        return rec.reconstruct()


def _batches(order: Tensor, batch_size: int) -> list[Tensor]:
    """Consecutive batches of ``order``; a last batch of one particle joins the previous one (batch norm
    needs two samples in training mode)."""
    parts = list(torch.split(order, batch_size))
    if len(parts) > 1 and len(parts[-1]) == 1:
        parts[-2:] = [torch.cat(parts[-2:])]
    return parts


def _rank_batches(order: Tensor, batch_size: int, total: int) -> list[Tensor]:
    """This rank's batches of an epoch over its particles in ``order``. Alone: :func:`_batches`. Under torchrun
    every rank takes as many steps as one process would over all ``total`` particles, each with its share of the
    batch (about ``batch_size / world_size``), so the gradients averaged over the ranks are those of a batch of
    ``batch_size`` and the optimisers see the one-process schedule."""
    if distributed.current().world_size == 1:
        return _batches(order, batch_size)
    return list(torch.tensor_split(order, len(_batches(torch.arange(total), batch_size))))


def _pose_steps(model: ImageModel, hartley: Tensor, spectra: Tensor, ctf: Tensor | None, r0: Tensor, t0: Tensor,
                cfg: CryoSpinConfig, pose_adam: ParticleAdam, shift_adam: ParticleAdam, idx: Tensor
                ) -> tuple[Tensor, Tensor, Tensor]:
    """Stage 2's ``pose_steps`` Adam steps (eq. 9) from poses ``r0 (B, 3, 3)`` and origins ``t0 (B, 2)`` (pixels)
    against the grid ``hartley``, with the moments of ``idx (B,)`` in the two :class:`ParticleAdam`; returns the
    poses, the origins and the losses ``(B,)`` at the last evaluation (before the last update)."""
    b = r0.shape[0]
    loss = torch.zeros(b, device=r0.device)
    for _ in range(cfg.pose_steps):
        omega = torch.zeros(b, 3, device=r0.device, requires_grad=True)
        delta_t = torch.zeros(b, 2, device=r0.device, requires_grad=cfg.shifts)
        rot = axis_angle_to_matrix(omega) @ r0
        slices = _project_grid(hartley, rot, model.n, model.r_max)
        observed = model.observed(spectra, (t0 + delta_t) if cfg.shifts else None)
        losses = model.nll(slices, ctf, observed)
        wanted = [omega, delta_t] if cfg.shifts else [omega]
        grads = torch.autograd.grad(losses.sum(), wanted)
        with torch.no_grad():
            loss = losses.detach()
            # Fold the Adam update of the perturbation into R0 (its next evaluation is at omega = 0).
            r0 = axis_angle_to_matrix(pose_adam.step(idx, grads[0])) @ r0
            if cfg.shifts:
                t0 = t0 + shift_adam.step(idx, grads[1])
    if cfg.pose_steps == 0:
        with torch.no_grad():
            loss = model.nll(_project_grid(hartley, r0, model.n, model.r_max), ctf,
                             model.observed(spectra, t0 if cfg.shifts else None))
    return r0.detach(), t0.detach(), loss


def _head_losses(model: ImageModel, hartley: Tensor, encoder: MultiHeadPoseEncoder, images: Tensor, spectra: Tensor,
                 ctf: Tensor | None, cfg: CryoSpinConfig) -> tuple[Tensor, Tensor, Tensor]:
    """Negative log-likelihood of every head's pose for a batch: losses ``(B, M)``, rotations ``(B, M, 3, 3)``
    and shifts ``(B, M, 2)`` as the encoder predicted them. hartley: the volume's grid (detach it to train the
    encoder alone); images ``(B, n, n)`` and their centred spectra."""
    rot, sh = encoder(images)
    b, m = rot.shape[:2]
    slices = _project_grid(hartley, rot.reshape(b * m, 3, 3), model.n, model.r_max).reshape(b, m, model.n, model.n)
    observed = model.observed(spectra, sh if cfg.shifts else None)
    if observed.dim() == 3:
        observed = observed[:, None]
    return model.nll(slices, ctf, observed), rot, sh


class CandidateGrid:
    """A fixed set of candidate rotations (a HEALPix SO(3) grid) scored against every image of a batch.

    cryocli's addition to cryoSPIN's candidate set: the heads of a freshly initialised encoder map all images to
    nearly the same few poses, so on a few thousand particles the volume fits those and the winner-takes-all
    loss never leaves that self-consistent wrong solution (measured: median rotation error 85-105 degrees after
    40 epochs, even on noise-free images). Scoring a coarse grid as well gives the volume a global search to
    bootstrap from, after which the encoder learns against an informative volume. order: HEALPix order
    (``72 * 8^order`` rotations). shift_step: with origins estimated, each rotation is also scored at the
    particle's origin moved by ``-1, 0, +1`` of this step (pixels) along x and y (9 origins), as RELION's local
    offset search does, so that the grid's candidate can follow a particle off the box centre, a step per visit;
    max_shift: the largest origin component reached (pixels, the encoder's bound).
    """

    def __init__(self, order: int, device: torch.device, shift_step: float | None = None,
                 max_shift: float | None = None) -> None:
        from cryocli.geometry.so3grid import SO3Grid

        self.rotations = SO3Grid(0, device=device).rotations(order).to(torch.float32)
        steps = torch.tensor([-1.0, 0.0, 1.0], device=device) * (shift_step or 0.0)
        self.offsets = torch.cartesian_prod(steps, steps) if shift_step else torch.zeros(1, 2, device=device)
        self.max_shift = max_shift

    @torch.no_grad()
    def slices(self, model: ImageModel, hartley: Tensor) -> Tensor:
        """The grid's slices of ``hartley`` at the ``P`` pixels ``model`` compares: ``(K, P)``."""
        keep = model.mask.reshape(-1) > 0
        return _project_grid(hartley, self.rotations, model.n, model.r_max).reshape(len(self.rotations), -1)[:, keep]

    @torch.no_grad()
    def best(self, model: ImageModel, hartley: Tensor, spectra: Tensor, ctf: Tensor | None,
             shifts_px: Tensor | None, slices: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
        """Lowest loss over the grid per image ``(B,)``, its rotation ``(B, 3, 3)`` and origin ``(B, 2)``
        (pixels; ``None`` when ``shifts_px`` is, i.e. origins are not estimated).

        The squared error expands into ``sum(c^2 s^2) - 2 sum(c s o) + sum(o^2)``, two matrix products of the
        ``(B, P)`` CTF and ``(B, S, P)`` image terms (``S`` origins per image) with the ``(K, P)`` grid slices over the
        ``P`` compared pixels, so the ``(B, S, K)`` scores never materialise ``B * S * K`` images."""
        keep = model.mask.reshape(-1) > 0
        if slices is None:
            slices = self.slices(model, hartley)
        b, k = spectra.shape[0], len(self.rotations)
        origins = None
        if shifts_px is not None:
            origins = shifts_px[:, None, :] + self.offsets
            if self.max_shift is not None:
                origins = origins.clamp(-self.max_shift, self.max_shift)
        observed = model.observed(spectra, origins).reshape(b, -1, model.n * model.n)[..., keep]  # (B, S, P)
        c = ctf.reshape(b, -1)[:, keep] if ctf is not None else torch.ones_like(observed[:, 0])
        # The first term does not depend on the origin: one (B, K) product for all S origins.
        err = (((c * c) @ (slices * slices).T)[:, None] - 2 * (c[:, None] * observed) @ slices.T
               + (observed * observed).sum(-1, keepdim=True))
        loss, which = (err / (model.n_mask * model.n * model.n)).reshape(b, -1).min(1)
        rows = torch.arange(b, device=which.device)
        return loss, self.rotations[which % k], origins[rows, which // k] if origins is not None else None

    def merge(self, model: ImageModel, hartley: Tensor, spectra: Tensor, ctf: Tensor | None, current_shifts: Tensor,
              use_shifts: bool, head_loss: Tensor, pose: Tensor, shift: Tensor, winner: Tensor
              ) -> tuple[Tensor, Tensor, Tensor]:
        """Replace the heads' winners ``pose (B, 3, 3)``, ``shift (B, 2)``, ``winner (B,)`` (losses ``head_loss``)
        by the grid's best candidate where that scores lower; grid candidates take the best origin around the
        particle's current origin ``current_shifts`` (that origin itself when the grid has no shift step) and are
        marked ``winner = -1``."""
        grid_loss, grid_pose, grid_shift = self.best(model, hartley, spectra, ctf,
                                                     current_shifts if use_shifts else None)
        use_grid = grid_loss < head_loss
        pose = torch.where(use_grid[:, None, None], grid_pose, pose)
        shift = torch.where(use_grid[:, None], grid_shift if grid_shift is not None else current_shifts, shift)
        winner = torch.where(use_grid, torch.full_like(winner, -1), winner)
        return pose, shift, winner


@dataclass
class DecodingSearch:
    """One auto-decoding epoch's global search (``search_epochs``): the candidate grid, its slices ``(K, P)`` of the
    volume at the epoch's start (the volume moves little within an epoch, and every candidate is refined against
    the current one before it is compared), and the map's mirror symmetry (``None`` without origins)."""

    grid: CandidateGrid
    slices: Tensor
    mirror: MirrorSymmetry | None

    @staticmethod
    @torch.no_grad()
    def start(grid: CandidateGrid | None, model: ImageModel, volume: HartleyVolume, pixel_size: float,
              shifts: bool) -> DecodingSearch:
        """The search for an epoch compared by ``model``, from the current ``volume`` (pixel size in Angstrom)."""
        assert grid is not None, "the search needs the candidate grid"
        mirror = mirror_symmetry(volume.to_map(), pixel_size) if shifts else None
        return DecodingSearch(grid, grid.slices(model, volume.hartley()), mirror)

    def refined_candidates(self, model: ImageModel, hartley: Tensor, spectra: Tensor, ctf: Tensor | None,
                           poses: Tensor, shifts_px: Tensor, cfg: CryoSpinConfig) -> tuple[Tensor, Tensor, Tensor]:
        """The best grid pose around each particle's origin ``shifts_px (B, 2)`` (pixels) and, with a mirror, around
        its mirror twin's origin, each after ``pose_steps`` steps from fresh moments; returns the better of them per
        particle: poses ``(B, 3, 3)``, origins ``(B, 2)`` and losses ``(B,)``."""
        b = len(poses)
        centres = [shifts_px] if self.mirror is None else [shifts_px, mirror_twin_poses(poses, shifts_px, self.mirror)[1]]
        found = [self.grid.best(model, hartley, spectra, ctf, c if cfg.shifts else None, self.slices) for c in centres]
        c = len(found)
        rot = torch.cat([f[1] for f in found])
        origin = torch.cat([f[2] if f[2] is not None else centre for f, centre in zip(found, centres, strict=True)])
        dev = poses.device
        rot, origin, loss = _pose_steps(model, hartley, spectra.repeat(c, 1, 1), None if ctf is None else ctf.repeat(c, 1, 1),
                                        rot, origin, cfg, ParticleAdam.zeros(c * b, 3, cfg.pose_lr, dev),
                                        ParticleAdam.zeros(c * b, 2, cfg.shift_lr, dev), torch.arange(c * b, device=dev))
        best_loss, best = loss.reshape(c, b).min(0)
        rows = torch.arange(b, device=dev)
        return rot.reshape(c, b, 3, 3)[best, rows], origin.reshape(c, b, 2)[best, rows], best_loss


@dataclass
class MirrorSymmetry:
    """The improper rotation that best maps a map onto itself: ``map(x) ~ map(F R^T (x - t))`` with
    ``F = diag(1, 1, -1)``; rotation ``(3, 3)``, shift ``(3,)`` in pixels (x, y, z), and score, the correlation
    of the map with its image under it (:mod:`cryocli.analysis.align`'s convention, moving map = the map)."""

    rotation: Tensor
    shift_px: Tensor
    score: float


def mirror_symmetry(volume: Tensor, pixel_size: float) -> MirrorSymmetry:
    """Align the mirror image of ``volume (n, n, n)`` ``[z, y, x]`` (centre ``n // 2``) onto it: the improper
    self-alignment of the map (rotation and translation; global search, :func:`~cryocli.analysis.align.align_maps`)."""
    from cryocli.analysis.align import align_maps

    # map(F y) on the grid: z -> -z about the centre voxel n // 2.
    mirrored = torch.roll(torch.flip(volume, [0]), 1, 0)
    found = align_maps(volume, mirrored, pixel_size, allow_flip=False, device=volume.device)
    return MirrorSymmetry(torch.as_tensor(found.rotation, dtype=torch.float32, device=volume.device),
                          torch.as_tensor(found.shift_A / pixel_size, dtype=torch.float32, device=volume.device),
                          float(found.score))


def mirror_twin_poses(poses: Tensor, shifts_px: Tensor, mirror: MirrorSymmetry) -> tuple[Tensor, Tensor]:
    """The poses ``(N, 3, 3)`` (RELION ``A``) and origins ``(N, 2)`` (pixels) at which the map's mirror image under
    ``mirror`` gives the projections the map gives at ``poses`` and ``shifts_px``: ``F A F R^T`` and
    ``o + (A' t)[:2]`` (the map alignment's conversion for a flipped alignment of the map onto itself)."""
    from cryocli.analysis.align import poses_in_reference_frame

    return poses_in_reference_frame(poses, shifts_px, mirror.rotation, mirror.shift_px, flipped=True)


#: Auto-decoding epochs with the grid's search when origins are estimated (``search_epochs`` not given).
SEARCH_EPOCHS_WITH_SHIFTS = 3


def _search_epochs(cfg: CryoSpinConfig) -> int:
    """How many auto-decoding epochs search the candidate grid: ``search_epochs``, or by default
    :data:`SEARCH_EPOCHS_WITH_SHIFTS` with origins estimated and none without (centred particles did not split
    between the hands, and the search changed their run within its noise: 4.3 against 4.4 degrees median, for
    16% more time)."""
    if cfg.search_epochs is not None:
        return cfg.search_epochs
    return SEARCH_EPOCHS_WITH_SHIFTS if cfg.shifts else 0


def _grid_shift_step(cfg: CryoSpinConfig, pixel_size: float) -> float:
    """Step (pixels) of the candidate grid's origin search: a quarter of the finest period compared during
    auto-encoding (``encode_resolution``, or Nyquist when that is 0), so the origin's residual error is at most
    an eighth of that period, a phase error of at most 45 degrees at the band's edge."""
    return max(cfg.encode_resolution, 2 * pixel_size) / (4 * pixel_size)


def _encode_radius(cfg: CryoSpinConfig, n: int, pixel_size: float, epoch: int | None = None) -> float | None:
    """Fourier radius (pixels) compared in auto-encoding epoch ``epoch`` (1-based): from
    ``n * pixel_size / encode_start_resolution`` in the first to ``n * pixel_size / encode_resolution`` in the
    last (``switch_epoch``), linear in frequency; the latter without ``epoch`` or without a march
    (``encode_start_resolution`` 0 or not coarser). ``None``: Nyquist (``encode_resolution`` 0)."""
    if cfg.encode_resolution <= 0:
        return None
    end = n * pixel_size / cfg.encode_resolution
    if epoch is None or cfg.encode_start_resolution <= cfg.encode_resolution or cfg.switch_epoch <= 1:
        return end
    start = n * pixel_size / cfg.encode_start_resolution
    return start + (end - start) * min(1.0, (epoch - 1) / (cfg.switch_epoch - 1))


def _decode_radius(cfg: CryoSpinConfig, n: int, pixel_size: float, epoch: int) -> float | None:
    """Fourier radius compared in auto-decoding epoch ``epoch``: from the encoding radius up to Nyquist over
    ``decode_march_epochs`` epochs (``None``: Nyquist)."""
    start = _encode_radius(cfg, n, pixel_size)
    if start is None or cfg.decode_march_epochs <= 0:
        return None
    step = min(1.0, (epoch - cfg.switch_epoch) / cfg.decode_march_epochs)
    return start + (n / 2 - start) * step


def _project_grid(grid: Tensor, rotations: Tensor, n: int, r_max: int | None = None) -> Tensor:
    """Centred Hartley slices ``(B, n, n)`` of the decoder's grid, zero beyond ``r_max`` Fourier pixels."""
    from cryocli.imaging.hartley import project_hartley

    return project_hartley(grid, rotations, n, pad=1, r_max=r_max)


def _angles_deg(a: Tensor, b: Tensor) -> Tensor:
    from cryocli.geometry.rotations import geodesic_distance

    return torch.rad2deg(geodesic_distance(a, b))


def _switched(saved: dict[str, Any] | None, cfg: CryoSpinConfig) -> bool:
    """Whether a resumed state was saved after the switch (its poses already come from the best heads)."""
    return saved is not None and int(saved["epoch"]) > cfg.switch_epoch
