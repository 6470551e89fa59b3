"""Denoised heuristic beam search (Cryo2SSNet section 4.3, Algorithm 1), batched over particles.

For each particle with image ``I`` and encoder pose ``r``:

1. ``S_0``: the ``width`` (c) cells of the base grid ``G_0`` nearest to ``r`` by quaternion distance (eq. 10).
   ``G_0`` is :class:`~cryocli.geometry.so3grid.SO3Grid` level 0 (HEALPix order 0 x 6 psi = 72 cells).
2. ``depth`` times: every kept cell is split into its 8 children (``SubDiv``, eq. 6, :meth:`SO3Grid.children`),
   the ``8c`` children are scored with ``cost = l2[De(I), De(D_phi(e))]`` and the ``c`` lowest are kept.
3. The best of the last ``c`` is polished by ``gd_steps`` steps of gradient descent on the cost (eq. 9).

The cost is the mean squared difference between the denoised normalised particle and the denoised
normalised rendering (:func:`~cryocli.engines.abinitio.voxel_decoder.render`); ``De`` is the trained
denoiser (:class:`~cryocli.engines.abinitio.denoiser.MLPDenoiser`) or the identity. With the identity the same
cost is computed from Hartley coefficients (:func:`~cryocli.engines.abinitio.voxel_decoder.render_coefficients`,
Parseval): the slices are read only at the compared frequencies and no image is transformed back (the beam of a
batch of 32 from a global start, on one core of a loaded machine: 0.47 s instead of 0.79 s at 32 px, 0.87 s instead
of 2.32 s at 48 px).

In-plane translations (cryocli's addition; the paper omits them, and real particles are not centred): each
level also tries the particle's current shift plus ``{-1, 0, 1}^2`` times a step that halves with the level
(from ``max_shift / 2``), in the spirit of cryoDRGN's branch and bound, where translations are refined with
the rotations. The translation moves the observed image (as everywhere in cryocli: a particle whose RELION
origin is ``t * pixel_size`` is centred by translating it by ``+t``), so the ``8c`` renderings and the 9
translated particles are denoised separately and every (rotation, translation) cost comes from one batched
matrix product. Each rotation keeps its best translation; the best candidate's translation is the centre of
the next level's shifts. The reach of the levels adds up to ``max_shift``; shifts are kept within
``+-max_shift`` pixels.

Gradient descent (eq. 9) moves an axis-angle perturbation ``omega`` (radians) of the pose,
``R = exp([omega]_x) R0``, folded into ``R0`` after every step (the tangent-space form of a step on the
rotation), and the translation measured in particle radii, ``t = radius * u``: a step of ``u`` moves the
particle's edge as far as the same step of ``omega``, so one learning rate suits both. ``gd="gd"`` is the
paper's vanilla gradient descent (lr 0.05, 20 steps, B.2); ``gd="adam"`` the Adam variant it found better
(5.3), with moments per particle over the polishing steps.

Two more additions, both about search from a poor start: with ``global_start`` the beam starts from the best
``4c`` cells of all of ``G_0`` (eq. 8 at level 0) instead of the encoder's neighbourhood, which holds the true pose
for only ``c / 72`` of the particles while the encoder is untrained; and each level compares only the frequencies
its cell size can resolve (:meth:`BeamSearch.band`, RELION's coarse image size).

No Python loop runs over particles or candidates: a level is one batch of ``(B, 8c)`` renderings.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from cryocli.engines.abinitio.cryospin import ImageModel
from cryocli.engines.abinitio.voxel_decoder import (
    observed_coefficients,
    observed_images,
    render,
    render_coefficients,
)
from cryocli.geometry.rotations import axis_angle_to_matrix, matrix_to_quaternion, quaternion_distance
from cryocli.geometry.so3grid import SO3Grid

Denoise = Callable[[Tensor], Tensor]

#: A global start (the c best cells of all of G_0, cryocli's addition) keeps this many times c cells of G_0: the
#: 60-degree cells are too coarse for their centres to rank the right one among the best 4 (measured on 64
#: noise-free 32 px 4AKE projections against the true map: 73% of the particles end within the last cell from the 4
#: best base cells, 92% from the 16 best; at SNR 0.1, 61% and 81% within 10 degrees).
GLOBAL_START_FACTOR = 4


def identity(images: Tensor) -> Tensor:
    """The denoiser replaced by the identity (after the first third of stage 1, B.2)."""
    return images


@dataclass
class SearchResult:
    """DHBS output for a batch: poses ``(B, 3, 3)``, shifts ``(B, 2)`` pixels, and the cost ``(B,)`` after the beam
    search and after polishing (detached)."""

    rotations: Tensor
    shifts: Tensor
    beam_cost: Tensor
    cost: Tensor


def pairwise_cost(model: Tensor, observed: Tensor, observed_norm: Tensor) -> Tensor:
    """Squared distance of every model feature vector ``(B, K, F)`` to every observed one ``(B, T, F)`` of the same
    particle -> ``(B, K, T)`` (one batched matrix product). ``observed_norm`` ``(B, T)``: the observed vectors'
    squared norms, which may hold more than their ``F`` entries (the frequencies the model does not reach)."""
    cross = torch.bmm(model, observed.transpose(1, 2))
    return model.square().sum(-1)[:, :, None] + observed_norm[:, None, :] - 2 * cross


def shift_offsets(step: float, device: torch.device) -> Tensor:
    """The 9 translations ``{-1, 0, 1}^2 * step`` ``(9, 2)`` pixels ``[x, y]``, the zero first."""
    r = torch.tensor([0.0, -1.0, 1.0], device=device) * step
    gy, gx = torch.meshgrid(r, r, indexing="ij")
    return torch.stack([gx.reshape(-1), gy.reshape(-1)], -1)


class BeamSearch:
    """DHBS with width ``width`` (c), ``depth`` subdivisions, ``gd_steps`` polishing steps of rate ``gd_lr``
    (``gd``: "gd" or "adam"), translations searched when ``max_shift > 0`` (pixels); ``radius``: the particle
    radius in pixels (the unit of the translation in gradient descent). ``model``: the box's image model.
    """

    def __init__(self, model: ImageModel, width: int = 4, depth: int = 5, gd_steps: int = 20, gd_lr: float = 0.05,
                 gd: str = "gd", max_shift: float = 0.0, radius: float = 10.0, band_limit: bool = True) -> None:
        self.model = model
        self.n = model.n
        self.width, self.depth, self.gd_steps, self.gd_lr, self.gd = width, depth, gd_steps, gd_lr, gd
        self.max_shift = float(max_shift)
        self.radius = float(radius)
        self.band_limit = bool(band_limit)
        # A global start has no encoder hint: it keeps GLOBAL_START_FACTOR x c of the 72 base cells.
        self.start_width = min(72, GLOBAL_START_FACTOR * width)
        dev = model.kx.device
        self.grid = SO3Grid(0, device=dev, dtype=torch.float32)
        # G_0 as quaternions, for the nearest cells of eq. 10.
        self.base_quaternions = matrix_to_quaternion(self.grid.rotations(0).to(torch.float64)).to(torch.float32)

    @property
    def shifts(self) -> bool:
        return self.max_shift > 0

    def band(self, level: int) -> int | None:
        """Fourier radius (pixels) compared when scoring cells of ``level`` (``None``: up to Nyquist).

        RELION's coarse image size: the frequency at which turning by the level's cell size moves the particle's
        edge by 1.2 resolution elements, ``res = (step / 360) pi diameter / 1.2``; finer detail cannot tell a cell's
        centre from a pose inside it. The ranking is the same as with the full band (measured on 64 noise-free 32 px
        4AKE projections from a global start: 73% of the particles within the last cell either way) and the coarse
        levels cost less (the beam of a 32 x 48 px batch: 0.71 s instead of 1.19 s on one core). The last level and
        the polishing compare up to Nyquist.
        """
        if not self.band_limit or level >= self.depth:
            return None
        diameter_px = 2 * self.radius
        step_deg = math.degrees(self.grid.cell_size(level))
        r = math.ceil(self.n * 1.2 * 360 / (step_deg * math.pi * diameter_px))
        return None if r >= self.n // 2 else max(2, r)

    def final_cell_size(self) -> float:
        """Angular size (radians) of the cells of the last level searched."""
        return self.grid.cell_size(self.depth)

    def models(self, grid: Tensor, rotations: Tensor, ctf: Tensor | None, band: int | None,
               denoise: Denoise) -> Tensor:
        """Feature vectors ``(B, K, F)`` of the renderings at poses ``(B, K, 3, 3)`` whose squared distances are the
        cost: Hartley coefficients without a denoiser, denoised pixels divided by ``n`` with one."""
        if denoise is identity:
            return render_coefficients(grid, rotations, ctf, self.n, band)
        return denoise(render(grid, rotations, ctf, self.n, band)).flatten(-2) / self.n

    def observed(self, spectra: Tensor, shifts: Tensor | None, band: int | None,
                 denoise: Denoise) -> tuple[Tensor, Tensor]:
        """Feature vectors ``(B, T, F)`` of the particles translated by ``shifts`` ``(B, T, 2)`` pixels (``None``:
        ``T = 1``, untranslated) and their squared norms ``(B, T)`` (see :meth:`models`)."""
        if denoise is identity:
            return observed_coefficients(self.model, spectra, shifts, band)
        feats = denoise(observed_images(self.model, spectra, shifts, band)).flatten(-2) / self.n
        return feats, feats.square().sum(-1)

    # ------------------------------------------------------------------------------------------- search
    def start_cells(self, rotations: Tensor) -> Tensor:
        """``S_0``: ids ``(B, c)`` of the ``c`` cells of ``G_0`` nearest to ``rotations`` ``(B, 3, 3)`` (eq. 10)."""
        q = matrix_to_quaternion(rotations.detach().to(torch.float32))
        dist = quaternion_distance(q[:, None, :], self.base_quaternions[None])
        return torch.topk(dist, self.width, dim=1, largest=False).indices

    @torch.no_grad()
    def beam(self, grid: Tensor, spectra: Tensor, ctf: Tensor | None, rotations: Tensor, shifts: Tensor,
             denoise: Denoise, global_start: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        """Steps 1-2 of Algorithm 1 for a batch: the best cell's rotation ``(B, 3, 3)``, its shift ``(B, 2)`` and cost
        ``(B,)``. grid: the decoder's Hartley grid; spectra ``(B, n, n)``; ctf ``(B, n, n)`` or ``None``;
        rotations / shifts: the encoder's poses and translations (pixels)."""
        b = rotations.shape[0]
        rows = torch.arange(b, device=rotations.device)
        centre = shifts.detach().clamp(-self.max_shift, self.max_shift) if self.shifts else None
        if global_start:
            # Score all of G_0 (eq. 8 at k = 0) and start from its c best cells.
            base = torch.arange(self.grid.n_cells(0), device=rotations.device).expand(b, -1)
            band = self.band(0)
            models = self.models(grid, self.grid.rotations(0, base, checked=False), ctf, band, denoise)
            here = self.observed(spectra, None if centre is None else centre[:, None], band, denoise)
            ids = torch.topk(pairwise_cost(models, *here)[..., 0], self.start_width, dim=1, largest=False).indices
        else:
            ids = self.start_cells(rotations)
        best_cost = torch.zeros(b, device=rotations.device)
        best_rot = rotations
        for level in range(self.depth):
            children = self.grid.children(level, ids, checked=False).reshape(b, -1)  # (B, 8c) at level + 1
            rots = self.grid.rotations(level + 1, children, checked=False)
            band = self.band(level + 1)
            models = self.models(grid, rots, ctf, band, denoise)
            if centre is not None:
                cand = centre[:, None] + shift_offsets(0.5 * self.max_shift / 2**level, centre.device)
                cand = cand.clamp(-self.max_shift, self.max_shift)
                observed = self.observed(spectra, cand, band, denoise)
            else:
                observed = self.observed(spectra, None, band, denoise)
            cost, which_t = pairwise_cost(models, *observed).min(2)  # each rotation's best translation
            kept_cost, kept = torch.topk(cost, self.width, dim=1, largest=False)  # sorted, best first
            ids = torch.gather(children, 1, kept)
            best_cost = kept_cost[:, 0]
            best_rot = rots[rows, kept[:, 0]]
            if centre is not None:
                centre = cand[rows, which_t[rows, kept[:, 0]]]
        final_shift = centre if centre is not None else torch.zeros(b, 2, device=rotations.device)
        return best_rot, final_shift, best_cost

    # ------------------------------------------------------------------------------------------- polish
    def cost(self, grid: Tensor, spectra: Tensor, ctf: Tensor | None, rotations: Tensor, shifts: Tensor | None,
             denoise: Denoise) -> Tensor:
        """The search cost ``(B,)`` of one pose ``(B, 3, 3)`` and shift ``(B, 2)`` (or ``None``) per particle."""
        models = self.models(grid, rotations[:, None], ctf, None, denoise)
        observed, norm = self.observed(spectra, None if shifts is None else shifts[:, None], None, denoise)
        return (models[:, 0] - observed[:, 0]).square().sum(-1) + norm[:, 0] - observed[:, 0].square().sum(-1)

    def polish(self, grid: Tensor, spectra: Tensor, ctf: Tensor | None, rotations: Tensor, shifts: Tensor,
               denoise: Denoise) -> tuple[Tensor, Tensor]:
        """Step 3 of Algorithm 1: ``gd_steps`` steps of eq. 9 from ``rotations`` ``(B, 3, 3)`` and ``shifts`` ``(B, 2)``;
        returns the polished rotations and shifts (detached).

        A step that raises a particle's cost is taken back and that particle's rate halved (a monotone safeguard,
        cryocli's addition): the cost's curvature grows with the correlation of the two images, so the paper's
        rate, which descends on noisy images, overshoots on clean or well-denoised ones (measured on noise-free
        32 px 4AKE projections at their true poses: vanilla steps of 0.05 raised the cost from 0.005 to 0.27 and
        the error from 0.9 to 2.1 degrees). Where the plain steps descend, the safeguard never acts.
        """
        r = rotations.detach()
        u = shifts.detach() / self.radius
        grid = grid.detach()
        b, dev = r.shape[0], r.device
        lr = torch.full((b, 1), self.gd_lr, device=dev)
        m = torch.zeros(b, 5, device=dev)
        v = torch.zeros(b, 5, device=dev)
        prev: tuple[Tensor, Tensor, Tensor, Tensor] | None = None
        bound = self.max_shift / self.radius
        for step in range(1, self.gd_steps + 2):
            omega = torch.zeros(b, 3, device=dev, requires_grad=True)
            du = torch.zeros(b, 2, device=dev, requires_grad=self.shifts)
            with torch.enable_grad():
                rot = axis_angle_to_matrix(omega) @ r
                t = (u + du) * self.radius if self.shifts else None
                cost = self.cost(grid, spectra, ctf, rot, t, denoise)
                wanted = [omega, du] if self.shifts else [omega]
                grads = torch.autograd.grad(cost.sum(), wanted)
            g = torch.cat([grads[0], grads[1] if self.shifts else torch.zeros(b, 2, device=dev)], 1)
            cost = cost.detach()
            if prev is not None:
                worse = (cost > prev[2])[:, None]
                r = torch.where(worse[:, :, None], prev[0], r)
                u = torch.where(worse, prev[1], u)
                cost = torch.where(worse[:, 0], prev[2], cost)
                g = torch.where(worse, prev[3], g)
                lr = torch.where(worse, lr / 2, lr)
            if step > self.gd_steps:  # the last pass only checks the last step
                break
            prev = (r, u, cost, g)
            if self.gd == "adam":
                m = 0.9 * m + 0.1 * g
                v = 0.999 * v + 0.001 * g * g
                update = -lr * (m / (1 - 0.9**step)) / (torch.sqrt(v / (1 - 0.999**step)) + 1e-8)
            else:
                update = -lr * g
            r = axis_angle_to_matrix(update[:, :3]) @ r
            u = (u + update[:, 3:]).clamp(-bound, bound)
        return r.detach(), (u * self.radius).detach()

    def search(self, grid: Tensor, spectra: Tensor, ctf: Tensor | None, rotations: Tensor, shifts: Tensor,
               denoise: Denoise, global_start: bool = False) -> SearchResult:
        """Algorithm 1 for a batch (see :meth:`beam` and :meth:`polish`)."""
        rot, shift, beam_cost = self.beam(grid, spectra, ctf, rotations, shifts, denoise, global_start)
        if self.gd_steps > 0:
            rot, shift = self.polish(grid, spectra, ctf, rot, shift, denoise)
            with torch.no_grad():
                cost = self.cost(grid, spectra, ctf, rot, shift if self.shifts else None, denoise)
        else:
            cost = beam_cost
        return SearchResult(rot, shift, beam_cost, cost)


def adam_lr(depth: int) -> float:
    """Default Adam rate (radians) for ``gd="adam"``: a quarter of the last level's cell size. Adam moves every
    parameter by about its rate per step whatever the gradient's scale, so 20 steps then cover 5 cells,
    enough to reach the minimum from the searched cell, and the last steps are finer than the grid."""
    return SO3Grid(0).cell_size(depth) / 4 if depth >= 0 else math.radians(1.0)
