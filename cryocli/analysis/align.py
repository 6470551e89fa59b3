"""Align one map onto another (rotation, translation, hand) and compare pose sets in a common frame.

Convention of the transform found
---------------------------------
Coordinates ``x = (x, y, z)`` are in Angstrom relative to the box centre (voxel ``n // 2``; arrays are
``[z, y, x]``). ``F = diag(1, 1, -1)`` when the hand is flipped, else the identity. An
:class:`Alignment` ``(R, t, flipped)`` maps the moving map into the reference frame as::

    aligned(x) = moving(F R^T (x - t))          # a point y of the moving map lands at x = R F y + t

Poses: a particle with RELION pose ``A_mov`` and origin ``o_mov`` (Angstrom) estimated against the
moving map has, in the reference frame::

    A_ref = F A_mov F R^T                       # F on both sides only when flipped (then det stays +1)
    o_ref = o_mov + (A_ref t)[:2]

(:func:`poses_to_reference`). Rotation errors against true poses are then ``angle(A_true A_ref^T)``.
:func:`pose_errors_after_alignment` finds ``R`` and the hand from the poses alone, with the same
convention, so a map alignment and a pose alignment of the same run should agree.

Search
------
Both maps are masked by a soft sphere, normalised and cropped in real space to the box that holds
their density. A global search scores thousands of rotations (a super-Fibonacci sampling of SO(3))
times both hands in batches: the moving map, Fourier-cropped to a small box, is resampled for every
candidate with ``grid_sample`` (trilinear) and its best translation found by FFT cross-correlation.
The best distinct candidates are then refined together by Gauss-Newton steps on the real-space
correlation (rotation increment and shift, Jacobian by batched central differences) on larger and
larger boxes, keeping fewer candidates each time; enough are kept that the copies of a
pseudo-symmetric map are all refined before the best one is chosen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as nnf
from torch import Tensor

from cryocli.geometry.rotations import axis_angle_to_matrix, geodesic_distance, project_to_so3, quaternion_to_matrix
from cryocli.imaging.fourier import centred_grid_3d, fourier_resample_volume, radius_3d
from cryocli.imaging.masks import soft_sphere

FLIP = torch.diag(torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64))


@dataclass
class Alignment:
    """A map alignment (see the module docstring for the convention).

    ``rotation`` (3, 3) and ``shift_A`` (3,) in Angstrom (x, y, z) are float64; ``aligned_map`` is the
    moving map resampled into the reference frame, float32 ``(n, n, n)``; ``score`` is its real-space
    correlation with the reference inside the sphere of radius ``n / 2``.
    """

    rotation: np.ndarray
    shift_A: np.ndarray
    flipped: bool
    aligned_map: np.ndarray
    score: float
    voxel_size: float


# --- rotations ---------------------------------------------------------------------------------

def sample_rotations(count: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """``count`` rotations ``(count, 3, 3)`` spread near-uniformly over SO(3) (super-Fibonacci spiral, Alexa 2022)."""
    phi, psi = math.sqrt(2.0), 1.533751168755204288118041
    s = torch.arange(count, dtype=torch.float64) + 0.5
    t = s / count
    r, big_r = torch.sqrt(t), torch.sqrt(1.0 - t)
    alpha, beta = 2 * math.pi * s / phi, 2 * math.pi * s / psi
    q = torch.stack([r * torch.sin(alpha), r * torch.cos(alpha), big_r * torch.sin(beta), big_r * torch.cos(beta)], -1)
    return quaternion_to_matrix(q).to(dtype)


# --- resampling --------------------------------------------------------------------------------

def transform_volume(volume: Tensor, matrix: Tensor, offset: Tensor | None = None, out_box: int | None = None) -> Tensor:
    """Resample ``volume (n, n, n)`` at ``matrix @ x + offset`` for every voxel ``x`` of an output box.

    ``x`` and the sampling points are ``(x, y, z)`` in voxels from the box centres (``out_box // 2`` and
    ``n // 2``); ``matrix (B, 3, 3)``, ``offset (B, 3)``. Returns ``(B, out_box, out_box, out_box)``
    (``out_box`` defaults to ``n``) by trilinear interpolation with zeros outside the box.
    Differentiable in ``matrix`` and ``offset``.
    """
    n = volume.shape[-1]
    m_out = out_box or n
    b = matrix.shape[0]
    m = matrix.to(volume.dtype)
    off = offset.to(volume.dtype) if offset is not None else torch.zeros(b, 3, dtype=volume.dtype, device=volume.device)
    # affine_grid works in normalised coordinates g in [-1, 1] (align_corners=True): voxel x = a g + c.
    a_out, a_in = (m_out - 1) / 2.0, (n - 1) / 2.0
    c_out, c_in = a_out - m_out // 2, a_in - n // 2
    ones = torch.ones(b, 3, 1, dtype=m.dtype, device=m.device)
    trans = (c_out * (m @ ones)[..., 0] + off - c_in) / a_in
    theta = torch.cat([m * (a_out / a_in), trans[..., None]], dim=-1)
    lin = torch.linspace(-1.0, 1.0, m_out, dtype=m.dtype, device=m.device)
    gz, gy, gx = torch.meshgrid(lin, lin, lin, indexing="ij")
    base = torch.stack([gx, gy, gz, torch.ones_like(gx)], -1).reshape(-1, 4)
    # One batched matmul; faster on the CPU than affine_grid for the same grid.
    grid = (base @ theta.transpose(1, 2)).reshape(b, m_out, m_out, m_out, 3)
    vol = volume.expand(b, 1, n, n, n)
    return nnf.grid_sample(vol, grid, mode="bilinear", padding_mode="zeros", align_corners=True)[:, 0]


def resample_volume(volume: Tensor, matrix: Tensor, offset: Tensor | None = None, oversample: int = 2) -> Tensor:
    """As :func:`transform_volume` but accurate: the volume is first Fourier-padded ``oversample`` times
    (sinc interpolation onto a finer grid), so the trilinear step loses little of the high frequencies."""
    n = volume.shape[-1]
    if oversample <= 1:
        return transform_volume(volume, matrix, offset)
    fine = fourier_resample_volume(volume, oversample * n)
    off = offset * oversample if offset is not None else None
    return transform_volume(fine, matrix * oversample, off, out_box=n)


def _moving_matrix(rotation: Tensor, flipped: Tensor | bool) -> Tensor:
    """``F R^T`` (B, 3, 3) for rotations ``(B, 3, 3)`` and flip flags ``(B,)``."""
    rt = rotation.transpose(-1, -2)
    f = torch.as_tensor(flipped, device=rotation.device).reshape(-1, 1, 1)
    flipped_rt = rt * torch.tensor([1.0, 1.0, -1.0], dtype=rt.dtype, device=rt.device)[:, None]
    return torch.where(f.bool(), flipped_rt, rt)


def apply_alignment(volume: np.ndarray | Tensor, alignment: Alignment, oversample: int | None = None) -> np.ndarray:
    """Resample ``volume (n, n, n)`` (in the moving frame) into the reference frame: ``moving(F R^T (x - t))``; float32.

    ``oversample`` (default 2 up to a 192-voxel box, else 1) Fourier-pads before the trilinear step.
    """
    v = volume.float() if torch.is_tensor(volume) else torch.tensor(np.asarray(volume), dtype=torch.float32)
    r = torch.as_tensor(alignment.rotation, dtype=torch.float64)[None]
    m = _moving_matrix(r, alignment.flipped)
    t = torch.as_tensor(alignment.shift_A, dtype=torch.float64)[None] / alignment.voxel_size
    off = -(m @ t[..., None])[..., 0]
    if oversample is None:
        oversample = 2 if v.shape[-1] <= 192 else 1
    return resample_volume(v, m.to(v.device, v.dtype), off.to(v.device, v.dtype), oversample)[0].cpu().numpy()


def poses_in_reference_frame(rotations: Tensor, origins: Tensor, rotation: Tensor, shift: Tensor,
                             flipped: bool) -> tuple[Tensor, Tensor]:
    """The module's pose conversion on tensors of any device and dtype: RELION poses ``A (N, 3, 3)`` and origins
    ``(N, 2)`` from the moving map's frame to the reference's, for an alignment ``rotation (3, 3)``, ``shift (3,)``
    (the origins' unit: Angstrom or pixels) and hand: ``F A F R^T`` and ``o + (A_ref t)[:2]``."""
    if flipped:
        f = torch.tensor([1.0, 1.0, -1.0], dtype=rotations.dtype, device=rotations.device)
        rotations = f[:, None] * rotations * f
    a_ref = rotations @ rotation.T
    return a_ref, origins + (a_ref @ shift)[:, :2]


def poses_to_reference(rotations: np.ndarray | Tensor, origins_A: np.ndarray | Tensor | None,
                       alignment: Alignment) -> tuple[np.ndarray, np.ndarray | None]:
    """Convert RELION poses ``A (N, 3, 3)`` and origins ``(N, 2)`` (Angstrom) from the moving map's frame to the reference's."""
    a = torch.as_tensor(np.asarray(rotations), dtype=torch.float64)
    o = torch.zeros(len(a), 2, dtype=torch.float64) if origins_A is None else \
        torch.as_tensor(np.asarray(origins_A), dtype=torch.float64)
    a_ref, o_ref = poses_in_reference_frame(a, o, torch.as_tensor(alignment.rotation, dtype=torch.float64),
                                            torch.as_tensor(alignment.shift_A, dtype=torch.float64), alignment.flipped)
    return a_ref.numpy(), None if origins_A is None else o_ref.numpy()


# --- map alignment -----------------------------------------------------------------------------

def _prepare(volume: Tensor, sphere: Tensor) -> Tensor:
    """Mask by ``sphere``, subtract the mean inside it, and scale to unit norm."""
    v = volume * sphere
    inside = sphere > 0.5
    v = (v - v[inside].mean()) * sphere
    return v / v.norm().clamp_min(1e-30)


def _downsample(volume: Tensor, box: int) -> Tensor:
    return volume if box >= volume.shape[-1] else fourier_resample_volume(volume, box)


def _content_box(ref: Tensor, mov: Tensor, fraction: float = 0.995) -> int:
    """Smallest even box (voxels) about the centre whose inscribed sphere holds ``fraction`` of both maps' power."""
    n = ref.shape[-1]
    r = torch.round(radius_3d(n, ref.device)).long().reshape(-1)
    radius = 0
    for v in (ref, mov):
        power = torch.zeros(int(r.max()) + 1, dtype=torch.float64, device=v.device)
        power.index_add_(0, r, (v.double() ** 2).reshape(-1))
        cum = torch.cumsum(power, 0) / power.sum().clamp_min(1e-300)
        radius = max(radius, int(torch.searchsorted(cum, torch.tensor([fraction], dtype=cum.dtype, device=cum.device))))
    return min(n, 2 * (radius + 4))


def _crop(volume: Tensor, box: int) -> Tensor:
    """Real-space crop to ``box`` voxels keeping voxel ``n // 2`` at ``box // 2`` (voxel size unchanged)."""
    n = volume.shape[-1]
    if box >= n:
        return volume
    o = n // 2 - box // 2
    return volume[o:o + box, o:o + box, o:o + box]


def _coarse_search(ref: Tensor, mov: Tensor, rotations: Tensor, flip: bool, chunk: int) -> tuple[Tensor, Tensor, Tensor]:
    """Score every rotation (and hand) with its best FFT translation. Returns scores, flips, shifts (x, y, z voxels)."""
    n = ref.shape[-1]
    fref = torch.fft.rfftn(ref)
    hands = [False, True] if flip else [False]
    scores, flips, shifts = [], [], []
    for hand in hands:
        for start in range(0, rotations.shape[0], chunk):
            r = rotations[start:start + chunk]
            m = _moving_matrix(r, torch.full((r.shape[0],), hand)).to(ref.dtype)
            rot = transform_volume(mov, m)
            cc = torch.fft.irfftn(fref[None] * torch.fft.rfftn(rot, dim=(-3, -2, -1)).conj(), s=(n, n, n))
            cc = cc / rot.flatten(1).norm(dim=1).clamp_min(1e-30)[:, None, None, None]
            best, idx = cc.flatten(1).max(dim=1)
            zyx = torch.stack([idx // (n * n), (idx // n) % n, idx % n], -1)
            zyx = torch.where(zyx > n // 2, zyx - n, zyx)
            scores.append(best)
            flips.append(torch.full_like(best, float(hand)))
            shifts.append(zyx.flip(-1).to(ref.dtype))
    return torch.cat(scores), torch.cat(flips).bool(), torch.cat(shifts)


def _distinct_top(scores: Tensor, rotations: Tensor, flips: Tensor, k: int, min_angle: float) -> Tensor:
    """Indices of the ``k`` best candidates, skipping any within ``min_angle`` radians of a better one of the same hand."""
    order = torch.argsort(scores, descending=True)
    chosen: list[int] = []
    for i in order.tolist():
        if len(chosen) == k:
            break
        if chosen:
            prev = torch.tensor(chosen, device=rotations.device)
            same = flips[prev] == flips[i]
            close = geodesic_distance(rotations[prev], rotations[i].expand(len(chosen), 3, 3)) < min_angle
            if bool((same & close).any()):
                continue
        chosen.append(i)
    return torch.tensor(chosen, dtype=torch.long, device=rotations.device)


def _sample_points(volume: Tensor, points: Tensor, matrix: Tensor, offset: Tensor) -> Tensor:
    """Trilinear samples of ``volume (n, n, n)`` at ``matrix @ p + offset`` for points ``(P, 3)`` -> ``(B, P)``."""
    n = volume.shape[-1]
    u = torch.einsum("bij,pj->bpi", matrix, points) + offset[:, None, :]
    g = (u + n // 2) * (2.0 / (n - 1)) - 1.0
    b = matrix.shape[0]
    return nnf.grid_sample(volume.expand(b, 1, n, n, n), g[:, None, None], mode="bilinear",
                           padding_mode="zeros", align_corners=True)[:, 0, 0, 0]


def _refine(ref: Tensor, mov: Tensor, rotations: Tensor, flips: Tensor, shifts: Tensor,
            iterations: int) -> tuple[Tensor, Tensor, Tensor]:
    """Gauss-Newton refinement of rotations ``(B, 3, 3)`` and shifts ``(B, 3)`` (voxels) of a batch of starts.

    Each iteration linearises the samples of the transformed moving map in the 6 parameters (rotation
    increment, shift) by central differences, evaluated for all starts and all 13 parameter sets in one
    batch, and solves ``target ~ a s + J b`` by least squares (the scale ``a`` makes it a correlation
    fit); the step is ``b / a``, capped at one voxel of motion at the map's edge. Only voxels inside the
    sphere of radius ``n / 2`` are sampled (the maps are zero outside it). Returns rotations, shifts and
    the final correlations ``(B,)``.
    """
    n = ref.shape[-1]
    inside = radius_3d(n, ref.device) <= n / 2
    z, y, x = (c[inside] for c in centred_grid_3d(n, ref.device, ref.dtype))
    points = torch.stack([x, y, z], -1)
    target = ref[inside].double()
    target = target / target.norm().clamp_min(1e-30)
    b = rotations.shape[0]
    rot, shift = rotations.double(), shifts.double()
    h_ang, h_shift = 0.5 / (n / 2), 0.5           # half a voxel of motion at the edge, half a voxel
    max_ang, max_shift = 1.0 / (n / 4), 1.0
    eye6 = torch.eye(6, dtype=torch.float64, device=ref.device)
    deltas = torch.cat([torch.zeros(1, 6, dtype=torch.float64, device=ref.device), eye6, -eye6])  # (13, 6)
    deltas = deltas * torch.tensor([h_ang] * 3 + [h_shift] * 3, dtype=torch.float64, device=ref.device)

    def samples(r: Tensor, t: Tensor, d: Tensor) -> Tensor:
        """Samples for rotations r (B,3,3), shifts t (B,3) perturbed by d (K,6) -> (B, K, P)."""
        k = d.shape[0]
        rr = axis_angle_to_matrix(d[:, :3])[None] @ r[:, None]           # (B, K, 3, 3)
        tt = t[:, None] + d[None, :, 3:]                                  # (B, K, 3)
        m = _moving_matrix(rr.reshape(-1, 3, 3), flips.repeat_interleave(k))
        off = -(m @ tt.reshape(-1, 3, 1))[..., 0]
        return _sample_points(mov, points, m.to(mov.dtype), off.to(mov.dtype)).double().reshape(b, k, -1)

    for _ in range(iterations):
        vals = samples(rot, shift, deltas)
        s0 = vals[:, 0]
        jac = (vals[:, 1:7] - vals[:, 7:13]) / (2 * deltas[1:7].sum(-1))[None, :, None]     # (B, 6, P)
        a = torch.cat([s0[:, None], jac], 1)                                                # (B, 7, P)
        normal = a @ a.transpose(1, 2) + 1e-9 * torch.eye(7, dtype=a.dtype, device=a.device)
        coef = torch.linalg.solve(normal, (a @ target)[..., None])[..., 0]                  # (B, 7)
        scale = coef[:, :1]
        step = torch.where(scale > 0, coef[:, 1:] / scale.clamp_min(1e-30), torch.zeros_like(coef[:, 1:]))
        ang, sh = step[:, :3], step[:, 3:]
        ang = ang * (max_ang / ang.norm(dim=1, keepdim=True).clamp_min(max_ang))
        sh = sh * (max_shift / sh.norm(dim=1, keepdim=True).clamp_min(max_shift))
        rot = axis_angle_to_matrix(ang) @ rot
        shift = shift + sh
    final = samples(rot, shift, deltas[:1])[:, 0]
    score = (final @ target) / final.norm(dim=1).clamp_min(1e-30)
    return rot.to(rotations.dtype), shift.to(shifts.dtype), score


@dataclass
class RefineStage:
    """One local-refinement stage: Fourier-cropped ``box`` (voxels), how many of the best distinct
    candidates it refines, and the number of Gauss-Newton ``iterations``."""

    box: int
    keep: int
    iterations: int


DEFAULT_STAGES = (RefineStage(20, 24, 4), RefineStage(32, 6, 4), RefineStage(64, 1, 3))


def align_maps(reference: np.ndarray | Tensor, moving: np.ndarray | Tensor, voxel_size: float, *,
               allow_flip: bool = True, coarse_box: int = 16, n_rotations: int = 2000,
               stages: tuple[RefineStage, ...] = DEFAULT_STAGES,
               device: torch.device | str | None = None) -> Alignment:
    """Align ``moving (n, n, n)`` onto ``reference (n, n, n)`` (voxel size in A): global search, then local refinement.

    Both maps are first cropped in real space to the box holding their density. The global search
    scores ``n_rotations`` rotations per hand (both hands when ``allow_flip``) on maps Fourier-cropped
    to ``coarse_box`` voxels, each with its best FFT translation; the ``stages`` then refine the best
    distinct candidates on larger boxes (capped at the content box), keeping fewer each time. Runs on
    ``device`` (default: the reference's device, else CPU). See the module docstring for the
    convention of the result.
    """
    dev = torch.device(device) if device is not None else (reference.device if torch.is_tensor(reference)
                                                            else torch.device("cpu"))
    ref = (reference if torch.is_tensor(reference) else torch.tensor(np.asarray(reference))).to(dev, torch.float32)
    mov = (moving if torch.is_tensor(moving) else torch.tensor(np.asarray(moving))).to(dev, torch.float32)
    if ref.shape != mov.shape or ref.dim() != 3 or len(set(ref.shape)) != 1:
        raise ValueError(f"maps must be cubic and of the same box: {tuple(ref.shape)} vs {tuple(mov.shape)}")
    n = ref.shape[-1]
    sphere = soft_sphere(n, n / 2 - 3, 3, dev)
    ref_p, mov_p = _prepare(ref, sphere), _prepare(mov, sphere)
    content = _content_box(ref_p, mov_p)
    ref_p, mov_p = _crop(ref_p, content), _crop(mov_p, content)

    def scaled(box: int) -> tuple[Tensor, Tensor, float]:
        box = min(box, content)
        s = soft_sphere(box, box / 2 - 2, 2, dev)
        return _prepare(_downsample(ref_p, box), s), _prepare(_downsample(mov_p, box), s), box / content

    ref_c, mov_c, scale = scaled(coarse_box)
    rotations = sample_rotations(n_rotations).to(dev, torch.float32)
    # Batches of about 4 M voxels: large enough that the per-call cost of the FFT library is small.
    chunk = max(32, 2**22 // ref_c.shape[-1] ** 3)
    scores, flips, shifts = _coarse_search(ref_c, mov_c, rotations, allow_flip, chunk=chunk)
    rots = rotations.repeat(2 if allow_flip else 1, 1, 1)
    shifts = shifts / scale  # voxels of the full-resolution box from here on
    for stage in stages:
        keep = _distinct_top(scores, rots, flips, stage.keep, math.radians(10.0))
        rots, flips, shifts = rots[keep], flips[keep], shifts[keep]
        ref_s, mov_s, scale = scaled(stage.box)
        rots, shifts_s, scores = _refine(ref_s, mov_s, rots, flips, shifts * scale, stage.iterations)
        shifts = shifts_s / scale
    best = int(torch.argmax(scores))
    rotation = project_to_so3(rots[best].double()).cpu().numpy()
    alignment = Alignment(rotation=rotation, shift_A=(shifts[best].double() * voxel_size).cpu().numpy(),
                          flipped=bool(flips[best]), aligned_map=np.zeros(0, np.float32), score=0.0,
                          voxel_size=voxel_size)
    aligned = apply_alignment(mov, alignment)
    inside = sphere > 0.5
    a = torch.tensor(aligned, device=dev)
    alignment.aligned_map = aligned
    alignment.score = float(torch.corrcoef(torch.stack([a[inside], ref[inside]]))[0, 1])
    return alignment


# --- pose sets ---------------------------------------------------------------------------------

@dataclass
class PoseAlignment:
    """Global rotation ``R`` (3, 3) and hand relating estimated to true poses (module convention), and the
    per-particle rotation errors in degrees ``(N,)`` after applying it."""

    rotation: np.ndarray
    flipped: bool
    errors_deg: np.ndarray


def _best_global(a_est: Tensor, a_true: Tensor, iterations: int = 10) -> tuple[Tensor, Tensor]:
    """``R`` minimising a robust sum of ``angle(A_true, A_est R^T)``: best of per-particle candidates, then
    repeated averaging of ``A_est^T A_true`` over the inliers, projected to SO(3)."""
    rel = a_est.transpose(-1, -2) @ a_true  # each is a candidate R^T
    pick = torch.linspace(0, len(rel) - 1, min(len(rel), 64)).round().long()
    cand = rel[pick]  # (K, 3, 3)
    err = geodesic_distance(a_est[None] @ cand[:, None], a_true[None])  # (K, N)
    rt = cand[int(torch.argmin(err.median(dim=1).values))]
    for _ in range(iterations):
        e = geodesic_distance(a_est @ rt, a_true)
        cut = torch.clamp(3 * e.median(), min=math.radians(5.0))
        inl = e <= cut
        rt = project_to_so3(rel[inl].mean(0))
    return rt.transpose(-1, -2), geodesic_distance(a_est @ rt, a_true)


def align_pose_sets(estimated: np.ndarray | Tensor, true: np.ndarray | Tensor, allow_flip: bool = True) -> PoseAlignment:
    """Find the global rotation (and hand) that best maps estimated poses ``(N, 3, 3)`` onto true ones ``(N, 3, 3)``.

    Estimated poses are taken to live in a map frame related to the truth by an :class:`Alignment`
    ``(R, flipped)``; the true poses are then ``F A_est F R^T`` (see the module docstring).
    """
    a_est = torch.as_tensor(np.asarray(estimated), dtype=torch.float64)
    a_true = torch.as_tensor(np.asarray(true), dtype=torch.float64)
    if a_est.shape != a_true.shape or a_est.shape[-2:] != (3, 3):
        raise ValueError(f"pose arrays must both be (N, 3, 3): {tuple(a_est.shape)} vs {tuple(a_true.shape)}")
    best: PoseAlignment | None = None
    for hand in ([False, True] if allow_flip else [False]):
        a = FLIP @ a_est @ FLIP if hand else a_est
        r, err = _best_global(a, a_true)
        cand = PoseAlignment(r.numpy(), hand, np.degrees(err.numpy()))
        if best is None or np.median(cand.errors_deg) < np.median(best.errors_deg):
            best = cand
    assert best is not None
    return best


def pose_errors_after_alignment(estimated: np.ndarray | Tensor, true: np.ndarray | Tensor,
                                allow_flip: bool = True) -> np.ndarray:
    """Per-particle geodesic rotation errors in degrees ``(N,)`` after the best global rotation and hand."""
    return align_pose_sets(estimated, true, allow_flip).errors_deg
