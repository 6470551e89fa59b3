"""The particle images every engine starts from: read, Fourier-cropped, background-normalised, protein bright.

* :func:`prepare_particles`: the prepared particles of a stack (:class:`PreparedParticles`), with their CTFs,
  on the engine's device.
* :func:`protein_is_dark`: the contrast sign of a dataset from its mean image.
* :func:`select_rows`: the rows a run uses (``max_particles``).

Units: pixel sizes in Angstrom, boxes in pixels.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from cryocli.engines.protocol import EngineConfig
from cryocli.errors import CryocliError, OptionError
from cryocli.imaging.ctf import CTFParams
from cryocli.imaging.fourier import fourier_crop_images, radius_2d, rfft_frequencies
from cryocli.io.dataset import ParticleStack

#: ``preload = "auto"``: engines hold their prepared particles while these take at most this (bytes, per process).
PRELOAD_BYTES = 2**30
#: Batches :meth:`StreamedImages.prefetch` keeps queued: the one being read and the next.
PREFETCH_DEPTH = 2


@dataclass
class ParticleInfo:
    """What prepared particles carry besides their images: per-particle CTF parameters ``(N,)`` or ``None``,
    pixel_size in Angstrom after cropping, box in pixels, inverted (whether the images were multiplied by -1),
    rows ``(N,)``: 0-based positions in the stack they were prepared from."""

    ctf: CTFParams | None
    pixel_size: float
    box: int
    inverted: bool
    rows: np.ndarray

    def __len__(self) -> int:
        return len(self.rows)


@dataclass
class PreparedParticles(ParticleInfo):
    """Particles ready for an engine, held: images ``(N, box, box)`` float32, background mean 0 and standard
    deviation 1 (over all particles), protein bright at low frequency."""

    images: Tensor


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


def _check_preparable(data: ParticleStack, config: EngineConfig) -> tuple[int, float]:
    """The box (pixels) and pixel size (Angstrom) the particles are prepared at; refuses what cannot be."""
    if len(data) == 0:
        raise CryocliError("no particles to process", data.table.path)
    box = int(config.box) if config.box else data.box
    if box > data.box:
        raise OptionError("box", box, f"larger than the particle box {data.box} px")
    if box % 2:
        raise OptionError("box", box, "the box must be even")
    if config.use_ctf and data.ctf_params is None:
        raise CryocliError("the particles have no CTF parameters (rlnDefocusU/V and the optics' rlnVoltage, "
                           "rlnSphericalAberration, rlnAmplitudeContrast); use_ctf=False runs without CTF "
                           "correction", data.table.path)
    if config.use_ctf and _premultiplied(data):
        raise CryocliError("CTF-premultiplied particles (rlnCtfDataAreCtfPremultiplied = 1) are not supported",
                           data.table.path)
    return box, data.pixel_size * data.box / box


def _centred_images(data: ParticleStack, rows: np.ndarray, box: int, mask: Tensor, device: torch.device) -> Tensor:
    """The particles at ``rows`` read, Fourier-cropped to ``box`` and with their background mean at 0,
    ``(B, box, box)`` float32 on ``device``."""
    return _centred(data.images(rows), data.box, box, mask, device)


def _centred(images: Tensor, data_box: int, box: int, mask: Tensor, device: torch.device) -> Tensor:
    """Images ``(B, data_box, data_box)`` as read, on ``device``, Fourier-cropped to ``box``, background mean 0."""
    imgs = images.to(device, non_blocking=images.is_pinned())
    imgs = fourier_crop_images(imgs, box) if box != data_box else imgs
    return imgs - imgs[:, mask].mean(1)[:, None, None]


def _sign(config: EngineConfig, mean_image: Tensor, pixel_size: float) -> bool:
    return bool(config.invert if config.invert is not None else protein_is_dark(mean_image, pixel_size))


def prepare_particles(data: ParticleStack, config: EngineConfig, device: torch.device,
                      progress: Callable[[int], None] | None = None, chunk: int = 1024,
                      across_ranks: bool = False) -> PreparedParticles:
    """Read, Fourier-crop (``config.box``), normalise and sign-correct every particle of ``data``.

    Per image the background (pixels beyond 0.4 box from the centre) is brought to mean 0; all images are
    divided by the background standard deviation over the dataset, so white noise has unit variance.
    The sign is ``config.invert`` when set, otherwise detected by :func:`protein_is_dark`.
    Images are kept on ``device``. ``progress(k)`` is called with the number of particles read.
    ``across_ranks``: ``data`` is this rank's share of a torchrun run (:mod:`cryocli.distributed`); the standard
    deviation and the mean image are then those of all ranks' particles, so every rank normalises alike.
    """
    box, pixel_size = _check_preparable(data, config)
    rows = np.arange(len(data))
    mask = background_mask(box, device=device)
    parts = []
    for start in range(0, len(rows), chunk):
        parts.append(_centred_images(data, rows[start:start + chunk], box, mask, device))
        if progress is not None:
            progress(len(parts[-1]))
    images = torch.cat(parts)
    std, mean_image = _background_std_and_mean(images, mask, across_ranks)
    if not math.isfinite(std) or std <= 0:
        raise CryocliError("the particle images have no variance in their background", data.table.path)
    images = images / std
    inverted = _sign(config, mean_image / std, pixel_size)
    if inverted:
        images = -images
    ctf = data.ctf_params.index(torch.from_numpy(rows)).to(device) if config.use_ctf and data.ctf_params is not None \
        else None
    return PreparedParticles(images=images.contiguous(), ctf=ctf, pixel_size=float(pixel_size), box=box,
                             inverted=bool(inverted), rows=rows)


class StreamedImages:
    """Prepared particle images read from the stacks when asked for, never all held: indexing by particle
    ``(B,)`` (tensor, array or slice) gives ``(B, box, box)`` float32 on ``device``, read, cropped, background
    centred, divided by ``std`` and sign-corrected as :func:`prepare_particles` does; ``shape`` is that of the whole
    ``(N, box, box)``. Reads come from the memory-mapped stacks (the page cache keeps what fits).

    :meth:`prefetch` starts reading a batch in a background thread (:mod:`cryocli.io.read_ahead`); indexing with
    the same particles next takes it, so a loop that announces its next batch (:func:`prefetching`) reads it while
    the device computes on the current one."""

    def __init__(self, data: ParticleStack, box: int, std: float, inverted: bool, device: torch.device) -> None:
        self.data, self.box, self.std, self.inverted, self.device = data, box, std, inverted, device
        self.shape = (len(data), box, box)
        self._mask = background_mask(box, device=device)
        self._pending: list[tuple[np.ndarray, Future[Tensor]]] = []
        self._reader: ThreadPoolExecutor | None = None

    def __len__(self) -> int:
        return self.shape[0]

    def _rows(self, index: Tensor | np.ndarray | slice) -> np.ndarray:
        """The rows of ``index`` on the host; indices on a GPU are copied back (a wait for the device: loops pass
        host indices, :func:`batches_with_images`)."""
        if isinstance(index, slice):
            return np.arange(len(self))[index]
        if isinstance(index, Tensor) and index.device.type != "cpu":
            index = index.cpu()
        return np.asarray(index)

    def _read(self, rows: np.ndarray) -> Tensor:
        """The images at ``rows`` as read from the stacks, on the host; pinned when they go to a GPU, so that
        the copy does not block."""
        images = self.data.images(rows)
        return images.pin_memory() if self.device.type == "cuda" else images

    def prefetch(self, index: Tensor | np.ndarray | slice) -> None:
        """Queue the images of ``index`` for reading in the background (read in turn, one thread); at most
        :data:`PREFETCH_DEPTH` batches wait, the oldest unclaimed one is dropped."""
        rows = self._rows(index)
        if self._reader is None:
            self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cryocli-read-ahead")
        self._pending.append((rows, self._reader.submit(self._read, rows)))
        del self._pending[:-PREFETCH_DEPTH]

    def __getitem__(self, index: Tensor | np.ndarray | slice) -> Tensor:
        rows = self._rows(index)
        match = next((k for k, (queued, _) in enumerate(self._pending) if np.array_equal(queued, rows)), None)
        read = self._pending.pop(match)[1].result() if match is not None else self._read(rows)
        images = _centred(read, self.data.box, self.box, self._mask, self.device) / self.std
        return -images if self.inverted else images


def prefetching(images: Tensor | StreamedImages, batches: Iterable[Tensor]) -> Iterator[Tensor]:
    """The ``batches`` (particle indices), each yielded after streamed ``images`` have been asked to read the next
    one (:meth:`StreamedImages.prefetch`); held images need no reading, and get the batches as they are."""
    if not isinstance(images, StreamedImages):
        yield from batches
        return
    upcoming = iter(batches)
    current = next(upcoming, None)
    if current is not None:
        images.prefetch(current)
    while current is not None:
        # queued behind ``current``: read while the caller computes on it
        following = next(upcoming, None)
        if following is not None:
            images.prefetch(following)
        yield current
        current = following


@dataclass
class StreamedParticles(ParticleInfo):
    """Particles ready for an engine, their images read per batch (:class:`StreamedImages`)."""

    images: StreamedImages


def batches_with_images(images: Tensor | StreamedImages, batches: Iterable[Tensor], device: torch.device
                        ) -> Iterator[tuple[Tensor, Tensor]]:
    """For each batch of particle indices ``(B,)`` held on the host: the indices on ``device`` (copied without
    waiting for the device) and their images ``(B, box, box)`` on ``device``, streamed ones read a batch ahead
    (:func:`prefetching`). Host indices let a streamed read start without asking the GPU where to read."""
    for batch in prefetching(images, batches):
        idx = batch.to(device, non_blocking=True)
        yield idx, (images[batch] if isinstance(images, StreamedImages) else images[idx])


#: Prepared particles, held or streamed.
ParticleSet = PreparedParticles | StreamedParticles
#: Values of the engines' ``preload`` option.
PRELOAD_CHOICES = ("auto", "yes", "no")


def stream_particles(data: ParticleStack, config: EngineConfig, device: torch.device, chunk: int = 1024,
                     across_ranks: bool = False) -> StreamedParticles:
    """:func:`prepare_particles` without holding the images: one pass over the stacks, ``chunk`` at a time, for
    the background's standard deviation and the mean image (the contrast sign), then images read per batch.
    Memory does not grow with the particle count beyond the per-particle CTF parameters."""
    box, pixel_size = _check_preparable(data, config)
    rows = np.arange(len(data))
    mask = background_mask(box, device=device)
    moments = np.zeros(3)
    mean_sum = torch.zeros((box, box), dtype=torch.float64, device=device)
    for start in range(0, len(rows), chunk):
        images = _centred_images(data, rows[start:start + chunk], box, mask, device)
        moments += background_moments(images, mask)
        mean_sum += images.sum(0).to(torch.float64)
    particles = float(len(rows))
    if across_ranks:
        from cryocli import distributed

        *summed, particles = distributed.sum_over_ranks([*moments.tolist(), particles], device)
        moments = np.asarray(summed)
        distributed.all_reduce_sum(mean_sum)
    std = std_from_moments(*moments.tolist())
    if not math.isfinite(std) or std <= 0:
        raise CryocliError("the particle images have no variance in their background", data.table.path)
    inverted = _sign(config, (mean_sum / (particles * std)).to(torch.float32), pixel_size)
    ctf = data.ctf_params.index(torch.from_numpy(rows)).to(device) if config.use_ctf and data.ctf_params is not None \
        else None
    return StreamedParticles(images=StreamedImages(data, box, std, inverted, device), ctf=ctf,
                             pixel_size=float(pixel_size), box=box, inverted=inverted, rows=rows)


def _background_std_and_mean(images: Tensor, mask: Tensor, across_ranks: bool) -> tuple[float, Tensor]:
    """The standard deviation of the background pixels (``mask`` ``(n, n)``) of ``images`` ``(N, n, n)`` and
    their mean image ``(n, n)``; ``across_ranks``: of every rank's images together (one collective each)."""
    if not across_ranks:
        return float(images[:, mask].std()), images.mean(0)
    from cryocli import distributed

    moments = distributed.sum_over_ranks([*background_moments(images, mask), float(len(images))], images.device)
    mean_image = distributed.all_reduce_sum(images.sum(0).to(torch.float64).contiguous()) / moments[3]
    return std_from_moments(*moments[:3]), mean_image.to(images.dtype)


def background_moments(images: Tensor, mask: Tensor) -> tuple[float, float, float]:
    """Sum, sum of squares and number of the background pixels (``mask``) of ``images`` ``(B, n, n)``."""
    background = images[:, mask].to(torch.float64)
    return float(background.sum()), float((background * background).sum()), float(background.numel())


def std_from_moments(total: float, squares: float, count: float) -> float:
    """The (unbiased) standard deviation of values with these sum, sum of squares and count."""
    return math.sqrt(max(squares - total * total / count, 0.0) / max(count - 1.0, 1.0))


def _premultiplied(data: ParticleStack) -> bool:
    optics = data.table.optics
    col = "rlnCtfDataAreCtfPremultiplied"
    return col in optics.columns and bool((optics[col].astype(float) != 0).any())



def select_rows(data: ParticleStack, max_particles: int | None) -> np.ndarray:
    """0-based rows an engine uses: all, or the first ``max_particles``."""
    n = len(data)
    if max_particles is not None and max_particles < n:
        return np.arange(max_particles)
    return np.arange(n)




@dataclass
class RankShare:
    """This process's particles: ``parts``, the particles at ``rows`` ``(N_rank,)`` of the ``total`` given to
    :func:`share_particles`; ``sharded``: under torchrun, where ``rows`` is this rank's :func:`~cryocli.distributed.shard`
    (alone: all of them)."""

    parts: ParticleSet
    rows: np.ndarray
    total: int
    sharded: bool


def share_particles(data: ParticleStack, config: EngineConfig, device: torch.device, preload: str,
                    bytes_per_particle: Callable[[int], int] = lambda box: 4 * box * box) -> RankShare:
    """This rank's share of ``data`` (all of it alone), prepared: held (:func:`prepare_particles`) when ``preload``
    is ``yes``, or ``auto`` and they take at most :data:`PRELOAD_BYTES` (``bytes_per_particle(box)`` each, box in
    pixels), else streamed (:func:`stream_particles`); normalised alike on every rank."""
    from cryocli import distributed

    ranks = distributed.current()
    rows = distributed.shard(np.arange(len(data)), ranks)
    sharded = ranks.world_size > 1
    local = ParticleStack(data.table.subset(rows), data.datadir) if sharded else data
    box = int(config.box) if config.box else data.box
    held = preload == "yes" or (preload == "auto" and len(local) * bytes_per_particle(box) <= PRELOAD_BYTES)
    parts: ParticleSet = (prepare_particles(local, config, device, across_ranks=sharded) if held
                          else stream_particles(local, config, device, across_ranks=sharded))
    return RankShare(parts, rows, len(data), sharded)


def require_batch_share(batch_size: int) -> None:
    """Refuse, under torchrun, a batch that leaves a rank fewer than 2 particles per step (batch norm needs 2)."""
    from cryocli import distributed

    world = distributed.current().world_size
    if world > 1 and batch_size < 2 * world:
        raise OptionError("batch_size", batch_size, f"at least 2 particles per rank under torchrun ({2 * world} for "
                          f"{world} ranks)")
