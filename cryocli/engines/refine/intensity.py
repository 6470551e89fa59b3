"""RELION's intensity corrections: per-particle normalisation (``--norm``) and per-group scale (``--scale``).

Both models are RELION's (``ml_optimiser``):

* **Normalisation correction** ``c_i`` (``rlnNormCorrection``): the whole image, signal and noise, is off by a
  factor (particles normalised on a background of varying ice, carbon or a neighbour in the box), so
  ``X_i = c_i (CTF P V + noise)``. The residual at the particle's pose then has ``c_i^2`` times the noise
  power of its optics group: ``c_i`` is updated from the residual power in units of ``sigma^2`` and the
  image divided by it before the next E-step (RELION: ``img *= avg_norm / norm``). The corrections are kept
  at mean 1, so only their ratios matter, as RELION's (it divides by the average as well); a RELION run
  continued from cryocli's particles.star reads them in the same way.
* **Scale correction** ``s_g`` (``rlnGroupScaleCorrection``): the signal of a group of particles (a
  micrograph, or ``rlnGroupNumber``/``rlnGroupName`` where the table sets them) is ``s_g`` times the
  reference's, ``X = s_g CTF P V + noise``; ``s_g`` multiplies the CTF in the E-step and the backprojection.
  It is the least-squares fit ``sum Re(X conj M) / sum |M|^2`` over the group's particles at their poses
  (``M = CTF P V``; the sums weighted by ``1 / sigma^2``, the maximum-likelihood estimate under the noise
  model, where RELION sums the same products unweighted up to the current resolution), kept at
  particle-weighted mean 1 so the reference keeps its grey scale.

Both are estimated from the residuals at each particle's most probable pose, over the pixels the search
compared, as the noise spectra are (:mod:`cryocli.engines.common.noise_model`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

#: Group columns in the order RELION reads them; without any of them every particle is in one group.
GROUP_COLUMNS = ("rlnGroupNumber", "rlnGroupName", "rlnMicrographName")


def intensity_groups(particles: pd.DataFrame) -> tuple[Tensor, list[str]]:
    """0-based group per particle ``(N,)`` long and the group names (RELION's ``rlnGroupName``), from the
    first of :data:`GROUP_COLUMNS` the table has."""
    for column in GROUP_COLUMNS:
        if column in particles.columns:
            codes, names = pd.factorize(particles[column].astype(str), sort=True)
            return torch.as_tensor(codes.astype(np.int64)), [str(n) for n in names]
    return torch.zeros(len(particles), dtype=torch.long), ["group_1"]


@dataclass
class IntensityCorrections:
    """Current corrections: ``norm`` ``(N,)`` per particle, ``scale`` ``(G,)`` per group, ``groups`` ``(N,)``
    long. ``do_norm``/``do_scale``: whether each is estimated (one left off stays 1). ``counts``: particles per
    group ``(G,)`` in the whole run, where ``norm`` and ``groups`` are one torchrun rank's share."""

    norm: Tensor
    scale: Tensor
    groups: Tensor
    names: list[str]
    do_norm: bool
    do_scale: bool
    counts: np.ndarray | None = None

    @staticmethod
    def start(groups: Tensor, names: list[str], do_norm: bool, do_scale: bool, device: torch.device | str,
              rows: np.ndarray | None = None) -> IntensityCorrections:
        """All corrections 1, for the particles at ``rows`` of those whose groups are ``groups`` (``None``: all
        of them; under torchrun this rank's share, while the group sizes stay those of the whole set)."""
        counts = np.bincount(groups.cpu().numpy(), minlength=len(names))
        mine = groups if rows is None else groups[torch.as_tensor(rows, dtype=torch.long)]
        return IntensityCorrections(torch.ones(len(mine), device=device), torch.ones(len(names), device=device),
                                    mine.to(device), names, do_norm, do_scale, counts)

    def apply(self, idx: Tensor, images_ft: Tensor, ctf: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Images ``(B, n, m)`` divided by their normalisation correction, CTFs ``(B, n, m)`` multiplied by
        their group's scale (a CTF of ones when there is none and the scale is estimated)."""
        if self.do_norm:
            images_ft = images_ft / self.norm[idx].to(images_ft.real.dtype)[:, None, None]
        if self.do_scale:
            s = self.scale[self.groups[idx]][:, None, None]
            ctf = s.expand(images_ft.shape).to(torch.float32) if ctf is None else ctf * s.to(ctf.dtype)
        return images_ft, ctf

    def group_counts(self) -> np.ndarray:
        """Particles per group ``(G,)``, over the whole set (``counts``; without them, those of ``groups``)."""
        if self.counts is not None:
            return self.counts
        return np.bincount(self.groups.cpu().numpy(), minlength=len(self.names))

    def as_state(self) -> dict[str, Any]:
        """For the checkpoint."""
        return {"norm": self.norm.cpu(), "scale": self.scale.cpu()}

    def restore(self, state: dict[str, Any], rows: np.ndarray | None = None) -> None:
        """Take back :meth:`as_state` (``--resume``); ``rows``: this rank's particles in the saved ones (torchrun;
        ``None``: all of them)."""
        norm = state["norm"] if rows is None else state["norm"][torch.as_tensor(rows, dtype=torch.long)]
        self.norm = norm.to(self.norm)
        self.scale = state["scale"].to(self.scale)


class IntensityAccumulator:
    """Streams, batch by batch, what the next corrections are estimated from."""

    def __init__(self, corrections: IntensityCorrections) -> None:
        dev = corrections.norm.device
        n, g = len(corrections.norm), len(corrections.scale)
        self.corrections = corrections
        self.residual = torch.zeros(n, dtype=torch.float64, device=dev)
        self.pixels = torch.zeros(n, dtype=torch.float64, device=dev)
        self.cross = torch.zeros(g, dtype=torch.float64, device=dev)
        self.power = torch.zeros(g, dtype=torch.float64, device=dev)

    def add(self, idx: Tensor, images: Tensor, model: Tensor, sigma2: Tensor) -> None:
        """Particles ``idx`` ``(B,)``: their corrected, shifted images and the model ``CTF P V`` at their most
        probable pose *before* the group scale, both ``(B, M)`` complex on the compared pixels, and the noise
        ``sigma^2`` there ``(B, M)`` (per real and imaginary component)."""
        c = self.corrections
        inv = 1.0 / sigma2.to(torch.float64)
        m = model.to(torch.complex128)
        x = images.to(torch.complex128)
        scale = c.scale[c.groups[idx]].to(torch.float64)[:, None] if c.do_scale else 1.0
        resid = (x - scale * m).abs() ** 2
        self.residual.index_add_(0, idx, 0.5 * (resid * inv).sum(1))
        self.pixels.index_add_(0, idx, torch.full((len(idx),), float(x.shape[1]), dtype=torch.float64,
                                                  device=x.device))
        g = c.groups[idx]
        self.cross.index_add_(0, g, ((x * m.conj()).real * inv).sum(1))
        self.power.index_add_(0, g, ((m.abs() ** 2) * inv).sum(1))

    def updated(self, scale_too: bool = True) -> IntensityCorrections:
        """The next corrections (means kept at 1); ``scale_too=False`` keeps the group scales (the first
        iteration, whose per-pose intensity fit already absorbs them). Under torchrun every rank calls it: the
        group sums and the mean correction are those of all ranks."""
        from cryocli import distributed

        c = self.corrections
        norm, scale = c.norm, c.scale
        cross = distributed.all_reduce_sum(self.cross.clone())
        power = distributed.all_reduce_sum(self.power.clone())
        if c.do_norm:
            seen = self.pixels > 0
            ratio = torch.where(seen, self.residual / self.pixels.clamp_min(1), torch.ones_like(self.residual))
            norm = (c.norm.to(torch.float64) * ratio.clamp_min(1e-6).sqrt())
            total, count = distributed.sum_over_ranks([float(norm.sum()), float(len(norm))], norm.device)
            norm = (norm / (total / count)).to(c.norm.dtype)
        if c.do_scale and scale_too:
            fitted = torch.where(power > 0, cross / power.clamp_min(1e-30),
                                 c.scale.to(torch.float64)).clamp_min(1e-3)
            counts = torch.as_tensor(c.group_counts(), dtype=torch.float64, device=fitted.device)
            scale = (fitted / ((fitted * counts).sum() / counts.sum())).to(c.scale.dtype)
        return IntensityCorrections(norm, scale, c.groups, c.names, c.do_norm, c.do_scale, c.counts)
