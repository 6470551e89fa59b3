"""The particle images every engine starts from: read, Fourier-cropped, background-normalised, protein bright.

* :func:`prepare_particles`: the prepared particles of a stack (:class:`PreparedParticles`), with their CTFs,
  on the engine's device.
* :func:`protein_is_dark`: the contrast sign of a dataset from its mean image.
* :func:`select_rows`: the rows a run uses (``max_particles``).

Units: pixel sizes in Angstrom, boxes in pixels.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from cryocli.engines.protocol import EngineConfig
from cryocli.errors import CryocliError, OptionError
from cryocli.imaging.ctf import CTFParams
from cryocli.imaging.fourier import fourier_crop_images, radius_2d, rfft_frequencies
from cryocli.io.dataset import ParticleStack


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
    rows = np.arange(len(data))
    if len(rows) == 0:
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
    std, mean_image = _background_std_and_mean(images, mask, across_ranks)
    if not math.isfinite(std) or std <= 0:
        raise CryocliError("the particle images have no variance in their background", data.table.path)
    images = images / std
    inverted = config.invert if config.invert is not None else protein_is_dark(mean_image / std, pixel_size)
    if inverted:
        images = -images
    ctf = data.ctf_params.index(torch.from_numpy(rows)).to(device) if config.use_ctf and data.ctf_params is not None \
        else None
    return PreparedParticles(images=images.contiguous(), ctf=ctf, pixel_size=float(pixel_size), box=box,
                             inverted=bool(inverted), rows=rows)


def _background_std_and_mean(images: Tensor, mask: Tensor, across_ranks: bool) -> tuple[float, Tensor]:
    """The standard deviation of the background pixels (``mask`` ``(n, n)``) of ``images`` ``(N, n, n)`` and
    their mean image ``(n, n)``; ``across_ranks``: of every rank's images together (one collective each)."""
    if not across_ranks:
        return float(images[:, mask].std()), images.mean(0)
    from cryocli import distributed

    background = images[:, mask].to(torch.float64)
    total, squares, count = distributed.sum_over_ranks(
        [float(background.sum()), float((background * background).sum()), float(background.numel())], images.device)
    std = math.sqrt(max(squares - total * total / count, 0.0) / max(count - 1.0, 1.0))
    particles = distributed.sum_over_ranks([float(len(images))], images.device)[0]
    mean_image = distributed.all_reduce_sum(images.sum(0).to(torch.float64).contiguous()) / particles
    return std, mean_image.to(images.dtype)


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


