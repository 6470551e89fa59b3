"""The engine framework shared by every ``abinitio`` and ``refine`` method.

* :class:`Engine`: the protocol (``name``, ``summary``, ``config_class``, ``run(data, config, reporter)``).
* A registry by method name (:func:`register_engine`, :func:`get_engine`, :func:`engine_summaries`).
* :class:`EngineConfig`: the options every engine shares; each engine subclasses it with its own
  fields, whose defaults are its paper's.
* :class:`Reconstruction`: what an engine returns (map, optional half maps, per-particle poses and
  origins, metric history). Engines never print and never write files: progress, logs and checkpoints
  go through the :class:`~cryocli.engines.reporter.Reporter`, files through
  :class:`~cryocli.engines.reporter.RunDirectory`.
* :func:`prepare_particles`: the images every engine starts from (Fourier-cropped to ``--box``,
  background-normalised, protein made bright), with their CTFs on the device.
* :func:`run_engine`: ``--max-particles`` and ``--halves`` (two independent runs on the
  ``rlnRandomSubset`` halves, the second aligned onto the first).

Units: pixel sizes and origins in Angstrom, boxes in pixels, rotations are RELION ``A`` matrices.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import numpy as np
import torch
from torch import Tensor

from cryocli.errors import CryocliError
from cryocli.imaging.ctf import CTFParams
from cryocli.imaging.fourier import fourier_crop_images, radius_2d, rfft_frequencies
from cryocli.io.dataset import ParticleStack

if TYPE_CHECKING:
    from cryocli.engines.reporter import Reporter


# ------------------------------------------------------------------------------------------------ configs


@dataclass
class EngineConfig:
    """Options shared by every engine.

    epochs: passes over the particles. batch_size: particles per step. lr: the engine's main learning
    rate (``None``: the engine's default). box: Fourier-crop the particles to this box in pixels
    (``None``: keep the data's box); the map comes out at that box and its pixel size.
    max_particles: use only the first N particles. invert: ``True`` multiplies the images by -1 (dark
    protein data), ``False`` keeps them, ``None`` detects the sign. seed: every random draw.
    """

    epochs: int = 20
    batch_size: int = 64
    lr: float | None = None
    box: int | None = None
    max_particles: int | None = None
    invert: bool | None = None
    seed: int = 0

    def as_dict(self) -> dict[str, Any]:
        """The configuration as plain values (for logs and checkpoints)."""
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    return value


# ------------------------------------------------------------------------------------------------ results


@dataclass
class Reconstruction:
    """What an engine returns.

    volume: map ``(n, n, n)`` float32 ``[z, y, x]`` at ``voxel_size`` Angstrom (the engine's box).
    rotations: ``(N, 3, 3)`` RELION ``A`` of the particles the engine saw, in their order.
    origins_angstrom: ``(N, 2)`` ``[x, y]`` RELION origins (rlnOriginX/YAngst) in Angstrom.
    half_volumes: the two half maps when the run made them. metrics: one dict per epoch.
    particle_rows: ``(N,)`` 0-based rows of the input table the poses belong to. info: anything else
    worth a line in the summary (e.g. whether the data were inverted).
    """

    volume: Tensor
    voxel_size: float
    rotations: Tensor
    origins_angstrom: Tensor
    half_volumes: tuple[Tensor, Tensor] | None = None
    metrics: list[dict[str, Any]] = field(default_factory=list)
    particle_rows: np.ndarray | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def state(self) -> dict[str, Any]:
        """Tensors and values for a checkpoint."""
        return {"volume": self.volume, "voxel_size": self.voxel_size, "rotations": self.rotations,
                "origins_angstrom": self.origins_angstrom, "half_volumes": self.half_volumes,
                "metrics": self.metrics, "particle_rows": self.particle_rows, "info": self.info}

    @staticmethod
    def from_state(state: dict[str, Any]) -> "Reconstruction":
        return Reconstruction(**state)


# ------------------------------------------------------------------------------------------------ protocol


class Engine(Protocol):
    """A reconstruction method. ``run`` reads the particles, reports through ``reporter`` and returns the
    result; it neither prints nor writes files."""

    name: ClassVar[str]
    kind: ClassVar[str]          # "abinitio" or "refine"
    summary: ClassVar[str]       # one line for ``--help``
    config_class: ClassVar[type[EngineConfig]]

    def run(self, data: ParticleStack, config: EngineConfig, reporter: "Reporter") -> Reconstruction: ...


_REGISTRY: dict[str, type] = {}


def register_engine(cls: type) -> type:
    """Class decorator: make an engine available by its ``name``."""
    _REGISTRY[cls.name] = cls
    return cls


def engine_names(kind: str | None = None) -> list[str]:
    """Registered method names (of one ``kind`` when given), in registration order."""
    _load_builtin_engines(kind)
    return [n for n, c in _REGISTRY.items() if kind is None or c.kind == kind]


def engine_summaries(kind: str | None = None) -> dict[str, str]:
    """``{name: one-line summary}`` of the registered methods."""
    _load_builtin_engines(kind)
    return {n: _REGISTRY[n].summary for n in engine_names(kind)}


def get_engine(name: str, kind: str | None = None, **options: Any) -> Engine:
    """An instance of the engine called ``name`` (``options`` go to its constructor, e.g. ``device``);
    :class:`CryocliError` listing the choices otherwise."""
    names = engine_names(kind)
    if name not in names:
        raise CryocliError(f"--method {name}: unknown method; choose from {', '.join(names) or 'none'}")
    return _REGISTRY[name](**options)


def _load_builtin_engines(kind: str | None = None) -> None:
    """Import the engine packages of ``kind`` (both when ``None``): their @register_engine decorators run."""
    import importlib

    for package in ("abinitio", "refine"):
        if kind is None or kind == package:
            importlib.import_module(f"cryocli.engines.{package}")


# ------------------------------------------------------------------------------------------------ particles


@dataclass
class PreparedParticles:
    """Particles ready for an engine.

    images: ``(N, box, box)`` float32, background mean 0 and standard deviation 1 (over all particles),
    protein bright at low frequency. ctf: per-particle parameters ``(N,)`` or ``None``. pixel_size:
    Angstrom after cropping. inverted: whether the images were multiplied by -1. rows: ``(N,)``
    0-based positions in the stack given to :func:`prepare_particles`.
    """

    images: Tensor
    ctf: CTFParams | None
    pixel_size: float
    box: int
    inverted: bool
    rows: np.ndarray

    def __len__(self) -> int:
        return int(self.images.shape[0])


def background_mask(n: int, radius_fraction: float = 0.4, device: torch.device | str | None = None) -> Tensor:
    """Boolean ``(n, n)``: pixels farther than ``radius_fraction * n`` from the centre ``n // 2``."""
    return radius_2d(n, device) > radius_fraction * n


def protein_is_dark(mean_image: Tensor, pixel_size: float, lowpass_angstrom: float = 40.0) -> bool:
    """Whether the protein is dark in a dataset's mean image ``(n, n)`` (pixel size in Angstrom).

    The mean over many particles is the average projection seen through the average CTF; below the
    first CTF zero the transfer is positive (``CTF(0) = +Q0``), so after a low-pass to
    ``lowpass_angstrom`` the centre is brighter than the background for cryocli's (relion_project's) sign
    and darker for raw-micrograph contrast.
    """
    n = mean_image.shape[-1]
    sigma_k = pixel_size / lowpass_angstrom  # cycles per pixel
    ky, kx = rfft_frequencies(n, dtype=torch.float64)
    filt = torch.exp(-(ky**2 + kx**2) / (2 * sigma_k**2))
    img = mean_image.to(torch.float64).cpu()
    smooth = torch.fft.irfft2(torch.fft.rfft2(img) * filt, s=(n, n))
    centre = smooth[radius_2d(n, dtype=torch.float64) <= max(1.5, n / 10)].mean()
    ring = smooth[background_mask(n, 0.4)].mean()
    return bool(centre < ring)


def prepare_particles(data: ParticleStack, config: EngineConfig, device: torch.device,
                      progress: Callable[[int], None] | None = None, chunk: int = 1024) -> PreparedParticles:
    """Read, Fourier-crop (``config.box``), normalise and sign-correct every particle of ``data``.

    Per image the background (pixels beyond 0.4 box from the centre) is brought to mean 0; all images are
    divided by the background standard deviation over the dataset, so white noise has unit variance.
    The sign is ``config.invert`` when set, otherwise detected by :func:`protein_is_dark`.
    Images are kept on ``device``. ``progress(k)`` is called with the number of particles read.
    """
    rows = np.arange(len(data))
    if len(rows) == 0:
        raise CryocliError("no particles to process", data.table.path)
    box = int(config.box) if config.box else data.box
    if box > data.box:
        raise CryocliError(f"--box {box} is larger than the particle box {data.box} px")
    if box % 2:
        raise CryocliError(f"--box {box}: the box must be even")
    if data.ctf_params is not None and _premultiplied(data):
        raise CryocliError("CTF-premultiplied particles (rlnCtfDataAreCtfPremultiplied = 1) are not supported",
                           data.table.path)
    pixel_size = data.pixel_size * data.box / box
    mask = background_mask(box, device=device)
    parts = []
    for start in range(0, len(rows), chunk):
        imgs = data.images(rows[start:start + chunk]).to(device)
        imgs = fourier_crop_images(imgs, box) if box != data.box else imgs
        imgs = imgs - imgs[:, mask].mean(1)[:, None, None]
        parts.append(imgs)
        if progress is not None:
            progress(len(imgs))
    images = torch.cat(parts)
    std = float(images[:, mask].std())
    if not math.isfinite(std) or std <= 0:
        raise CryocliError("the particle images have no variance in their background", data.table.path)
    images = images / std
    inverted = config.invert if config.invert is not None else protein_is_dark(images.mean(0), pixel_size)
    if inverted:
        images = -images
    ctf = data.ctf_params.index(torch.from_numpy(rows)).to(device) if data.ctf_params is not None else None
    return PreparedParticles(images=images.contiguous(), ctf=ctf, pixel_size=float(pixel_size), box=box,
                             inverted=bool(inverted), rows=rows)


def _premultiplied(data: ParticleStack) -> bool:
    optics = data.table.optics
    col = "rlnCtfDataAreCtfPremultiplied"
    return col in optics.columns and bool((optics[col].astype(float) != 0).any())


# ------------------------------------------------------------------------------------------------ runs


def select_rows(data: ParticleStack, max_particles: int | None) -> np.ndarray:
    """0-based rows an engine uses: all, or the first ``max_particles``."""
    n = len(data)
    if max_particles is not None and max_particles < n:
        return np.arange(max_particles)
    return np.arange(n)


def run_engine(engine: Engine, data: ParticleStack, config: EngineConfig, reporter: "Reporter",
               halves: bool = False) -> Reconstruction:
    """Run ``engine`` on ``data`` (``config.max_particles`` first), once or on each ``rlnRandomSubset`` half.

    With ``halves`` the two halves are reconstructed independently (each its own checkpointed run),
    the second map is aligned onto the first (rotation, shift, hand; :func:`cryocli.analysis.align.align_maps`)
    and its poses moved into the first map's frame; the returned map is the mean of the aligned halves and
    ``info["gold_standard_fsc"]`` holds the half-map FSC.
    """
    rows = select_rows(data, config.max_particles)
    if not halves:
        return _single_run(engine, data, config, reporter, rows, "full")
    from cryocli.analysis.align import align_maps, poses_to_reference
    from cryocli.analysis.fsc import fsc_curve

    subset = data.ensure_half_sets(config.seed).numpy()[rows]
    results = []
    for half in (1, 2):
        picked = rows[subset == half]
        if len(picked) < 2:
            raise CryocliError(f"half set {half} has {len(picked)} particles; --halves needs at least 2 in each",
                               data.table.path)
        # Independent runs: a different seed per half, or a shared random start would correlate the half maps.
        half_config = replace(config, seed=config.seed + 1_000_003 * (half - 1))
        results.append(_single_run(engine, data, half_config, reporter, picked, f"half{half}"))
    first, second = results
    alignment = align_maps(first.volume, second.volume, first.voxel_size, device=first.volume.device)
    aligned = torch.as_tensor(alignment.aligned_map)
    rot2, origins2 = poses_to_reference(second.rotations, second.origins_angstrom, alignment)
    rot2 = torch.as_tensor(np.asarray(rot2), dtype=first.rotations.dtype)
    origins2 = torch.as_tensor(np.asarray(origins2), dtype=first.origins_angstrom.dtype)
    order = np.argsort(np.concatenate([first.particle_rows, second.particle_rows]), kind="stable")
    fsc = fsc_curve(first.volume, aligned)
    info = {**first.info, "half_alignment_score": alignment.score, "half_alignment_flipped": alignment.flipped,
            "gold_standard_fsc": fsc.tolist()}
    metrics = [{**m, "half": 1} for m in first.metrics] + [{**m, "half": 2} for m in second.metrics]
    return Reconstruction(
        volume=0.5 * (first.volume + aligned), voxel_size=first.voxel_size,
        rotations=torch.cat([first.rotations, rot2])[order],
        origins_angstrom=torch.cat([first.origins_angstrom, origins2])[order],
        half_volumes=(first.volume, aligned), metrics=metrics,
        particle_rows=np.concatenate([first.particle_rows, second.particle_rows])[order], info=info)


def _single_run(engine: Engine, data: ParticleStack, config: EngineConfig, reporter: "Reporter",
                rows: np.ndarray, run_name: str) -> Reconstruction:
    """One checkpointed run of ``engine`` on the particles at ``rows`` (a finished one is taken from the
    checkpoint when resuming)."""
    reporter.begin_run(run_name, rows)
    finished = reporter.finished_result(config.epochs)
    if finished is not None:
        return finished
    everything = len(rows) == len(data) and bool((rows == np.arange(len(data))).all())
    subset = data if everything else ParticleStack(data.table.subset(rows), data.datadir)
    result = engine.run(subset, config, reporter)
    result.particle_rows = rows
    reporter.finish_run(result, config.epochs)
    return result
