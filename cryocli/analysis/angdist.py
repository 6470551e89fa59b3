"""The viewing-direction distribution of a particle set: HEALPix counts, an equal-area map, RELION's angdist.bild.

Conventions
-----------
Poses are RELION ``A`` matrices ``(..., 3, 3)`` (shared/CONVENTIONS.md). The viewing (projection) direction of
a pose is the third row of ``A`` in the map frame, ``(sin(tilt) cos(rot), sin(tilt) sin(rot), cos(tilt))``
(RELION's ``Euler_angles2direction``, src/euler.cpp:94): ``rot`` is its azimuth and ``tilt`` its polar angle,
both in degrees, ``rot`` in ``[-180, 180]``, ``tilt`` in ``[0, 180]``. Every angle entering or leaving this
module is in degrees; radians appear only inside.

HEALPix pixels are nested-scheme indices (:mod:`cryocli.geometry.so3grid`), ``12 * 4^order`` of them; a
pixel's direction is its centre, with ``rot`` wrapped to ``(-180, 180]`` as RELION's ``checkDirection``
(src/healpix_sampling.cpp:1541) does.

The asymmetric unit (RELION's sampled directions)
-------------------------------------------------
With point-group symmetry RELION samples only some directions (``HealpixSampling::setOrientations``,
src/healpix_sampling.cpp:477-558, line 516): every nested pixel centre in index order, then
``removeSymmetryEquivalentPoints(0.5 * max_pixrad)`` (lines 2193-2268), which

1. keeps the centres inside the group's asymmetric unit by fixed bounds
   (``removeSymmetryEquivalentPointsGeometric``, lines 2270-2874; the proper groups only):
   ``Cn``: ``-180/n <= rot <= 180/n``; ``D1``: ``tilt <= 90``; ``Dn``: ``90 - 180/n <= rot <= 90 + 180/n`` and
   ``tilt <= 90``; ``T``: (``90 <= rot <= 150`` or ``rot == 0``) and three half-spaces; ``O``:
   (``45 <= rot <= 135`` and ``tilt <= 90``, or ``rot == 0``) and three half-spaces; ``I``/``I2``, ``I1``,
   ``I3``, ``I4``: three half-spaces (RELION's plane normals, turned by ``Euler(0, 90, 0)``,
   ``Euler(0, 31.7174745559, 0)`` and ``Euler(0, -31.7174745559, 0)`` for I1, I3 and I4);
2. when fewer than 4000 directions remain, walks them in order and drops each one that lies within
   ``0.5 * max_pixrad`` of a symmetry mate of an earlier kept one (the seams of the unit).

:func:`asymmetric_unit_pixels` reimplements both steps (bounds are inclusive with a 1e-9 degree / 1e-12
tolerance, so a centre exactly on a boundary is kept, as intended by RELION's ``<=``; its own rounding may
decide such a centre either way, and step 2 then removes the duplicate).

Folding a direction into the unit
---------------------------------
A pose ``A`` and every ``A @ R`` (``R`` in the group) give the same image, so a direction ``v`` stands for
all of ``{R^T v}``. :func:`fold_directions` keeps, among these equivalents, one whose containing HEALPix pixel
is one of RELION's sampled directions; when several are (only at the seams) the one nearest its pixel centre
wins (ties: the smallest pixel index), the equivalent RELION's search would have reached. When none is (a
direction in a seam pixel whose centre RELION dropped), the equivalent and sampled centre nearest to each other
are taken. The choice depends only on the set of equivalents, so symmetry-related poses fold to the same
direction, and every particle is counted exactly once. With C1 this is plain ``ang2pix``.

RELION's ``pdf_direction`` is the sum of the posterior weights of each sampled direction; here a particle
counts 1 at its (MAP) pose, as read from a ``run_data.star``. The bild scaling uses ratios and standard scores
only, so counts and RELION's normalised ``pdf_direction`` give the same file for the same distribution.
"""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from cryocli.errors import CryocliError
from cryocli.geometry.rotations import euler_to_matrix, matrix_to_euler, projection_direction
from cryocli.geometry.so3grid import healpix_ang2pix, healpix_max_pixrad, healpix_npix, healpix_pix2ang
from cryocli.geometry.symmetry import parse_symmetry, symmetry_operators
from cryocli.io.paths import atomic_write_text

DEFAULT_ORDER = 3
"""Default HEALPix order: 768 directions, 7.5 degrees apart (RELION's ``--healpix_order 3``)."""

# RELION's writeBildFileOrientationalDistribution defaults (src/healpix_sampling.h:384-387).
_RMAX_FRAC = 0.3
_WIDTH_FRAC = 0.5
# RELION only corrects the seams below this many directions (src/healpix_sampling.cpp:2219).
_SEAM_LIMIT = 4000
_DEG_TOL = 1e-9
_DOT_TOL = 1e-12
_CHUNK = 1 << 14

ArrayLike = np.ndarray | Tensor


def _as_float64(values: ArrayLike | float) -> Tensor:
    if isinstance(values, Tensor):
        return values.detach().to(device="cpu", dtype=torch.float64)
    return torch.as_tensor(np.asarray(values, dtype=np.float64))


def _unit_vectors(rot_deg: ArrayLike | float, tilt_deg: ArrayLike | float) -> Tensor:
    """``(rot, tilt)`` in degrees (broadcast, shape ``S``) -> directions ``(*S, 3)`` float64 (Euler_angles2direction)."""
    rot, tilt = torch.broadcast_tensors(torch.deg2rad(_as_float64(rot_deg)), torch.deg2rad(_as_float64(tilt_deg)))
    return torch.stack([torch.sin(tilt) * torch.cos(rot), torch.sin(tilt) * torch.sin(rot), torch.cos(tilt)], -1)


def _vectors_to_angles(v: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Directions ``(..., 3)`` -> ``(rot, tilt)`` in degrees, rot in ``[-180, 180]``, tilt in ``[0, 180]``."""
    rot = torch.rad2deg(torch.atan2(v[..., 1], v[..., 0]))
    tilt = torch.rad2deg(torch.atan2(torch.linalg.vector_norm(v[..., :2], dim=-1), v[..., 2]))
    return rot.numpy(), tilt.numpy()


# ------------------------------------------------------------------------------------------- directions


def viewing_directions(rotations: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Projection directions of RELION poses ``A`` ``(..., 3, 3)`` -> ``(rot_deg, tilt_deg)``, each ``(...)``.

    RELION's convention: the direction is the third row of ``A`` (:func:`projection_direction`), ``rot`` its
    azimuth in ``[-180, 180]`` degrees and ``tilt`` its polar angle in ``[0, 180]`` degrees, read with
    :func:`matrix_to_euler` (so ``rot = 0`` at the poles, as ``Euler_matrix2angles`` gives). float64 numpy.
    """
    a = _as_float64(rotations)
    if a.ndim < 2 or a.shape[-2:] != (3, 3):
        raise CryocliError(f"expected rotation matrices of shape (..., 3, 3), got {tuple(a.shape)}")
    rot, tilt, _ = matrix_to_euler(a)
    # The Euler angles and the third row describe the same direction; check once, cheaply, for a bad input.
    v = projection_direction(a)
    if v.numel() and not torch.allclose(_unit_vectors(rot, tilt), v, atol=1e-4):
        raise CryocliError("rotation matrices expected (orthonormal, determinant +1)")
    return rot.numpy(), tilt.numpy()


def pixel_directions(order: int = DEFAULT_ORDER) -> tuple[np.ndarray, np.ndarray]:
    """Centres of all nested HEALPix pixels at ``order`` as RELION lists them: ``(rot_deg, tilt_deg)``, ``(npix,)``.

    ``rot`` in ``(-180, 180]`` and ``tilt`` in ``(0, 180)`` degrees, float64, in pixel-index order
    (``HealpixSampling::getDirectionFromHealPix``; RELION's ``run_sampling.star`` lists these for C1). Plot
    HEALPix counts at these centres (``np.radians(rot)``, ``np.radians(90 - tilt)`` on a ``hammer`` axes).
    """
    theta, phi = healpix_pix2ang(order, torch.arange(healpix_npix(order)))
    rot = torch.rad2deg(phi)
    rot = torch.where(rot > 180, rot - 360, rot)
    return rot.numpy(), torch.rad2deg(theta).numpy()


def _geometric_mask(kind: str, n: int, rot: np.ndarray, tilt: np.ndarray, v: np.ndarray) -> np.ndarray:
    """RELION's ``removeSymmetryEquivalentPointsGeometric`` for proper groups (angles in degrees, ``v`` (M, 3))."""

    def between(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
        return (x >= lo - _DEG_TOL) & (x <= hi + _DEG_TOL)

    def half_spaces(normals: list[tuple[float, float, float]], sign: float = 1.0, turn: float | None = None) -> np.ndarray:
        m = np.asarray(normals, dtype=np.float64)
        if turn is not None:
            m = m @ euler_to_matrix(torch.tensor(0.0, dtype=torch.float64), torch.tensor(turn, dtype=torch.float64),
                                    torch.tensor(0.0, dtype=torch.float64)).numpy().T
        m = m / np.linalg.norm(m, axis=1, keepdims=True)
        return np.all(sign * (v @ m.T) >= -_DOT_TOL, axis=1)

    upper = tilt <= 90 + _DEG_TOL
    if kind == "C":
        return between(rot, -180.0 / n, 180.0 / n)
    if kind == "D":
        return upper if n == 1 else between(rot, 90 - 180.0 / n, 90 + 180.0 / n) & upper
    rot_zero = np.abs(rot) < _DEG_TOL
    if kind == "T":
        planes = [(-0.942809, 0.0, 0.0), (0.471405, 0.272165, 0.7698), (0.471404, 0.816497, 0.0)]
        return (between(rot, 90, 150) | rot_zero) & half_spaces(planes)
    if kind == "O":
        planes = [(0.0, -1.0, 1.0), (1.0, 1.0, 0.0), (-1.0, 1.0, 0.0)]
        return ((between(rot, 45, 135) & upper) | rot_zero) & half_spaces(planes)
    icosa = [(0.0, 1.0, 0.0), (-0.4999999839058737, -0.8090170074556163, 0.3090169861701543),
             (0.4999999839058737, -0.8090170074556163, 0.3090169861701543)]
    if kind == "I2":
        return half_spaces(icosa)
    if kind == "I1":
        return half_spaces(icosa, turn=90.0)
    if kind == "I3":
        return half_spaces(icosa, turn=31.7174745559)
    if kind == "I4":
        i4 = [(0.0, 0.0, 1.0), (0.187592467856686, -0.303530987314591, -0.491123477863004),
              (0.187592467856686, 0.303530987314591, -0.491123477863004)]
        return half_spaces(i4, sign=-1.0, turn=-31.7174745559)
    raise CryocliError(f"symmetry {kind}: no asymmetric unit defined")  # unreachable after parse_symmetry


@lru_cache(maxsize=32)
def _asymmetric_unit(kind: str, n: int, sym: str, order: int) -> np.ndarray:
    rot, tilt = pixel_directions(order)
    v = _unit_vectors(rot, tilt).numpy()
    keep = np.flatnonzero(_geometric_mask(kind, n, rot, tilt, v))
    if len(keep) >= _SEAM_LIMIT:
        return keep
    # Seams: drop a direction within 0.5 max_pixrad of a symmetry mate of an earlier kept one (greedy, in order).
    cos_max = math.cos(0.5 * healpix_max_pixrad(order))
    ops = symmetry_operators(sym).numpy()
    kv = v[keep]
    close = np.zeros((len(keep), len(keep)), dtype=bool)
    for g in ops:  # at most 60 operators, each an (M, M) product
        close |= (kv @ g.T) @ kv.T > cos_max  # [k, i]: g v_k near v_i
    close = np.triu(close, k=1)  # only earlier k matter
    dropped = np.zeros(len(keep), dtype=bool)
    for i in np.flatnonzero(close.any(axis=0)):  # the few seam directions, in RELION's order
        earlier = np.flatnonzero(close[:i, i])
        dropped[i] = bool((~dropped[earlier]).any())
    return keep[~dropped]


def asymmetric_unit_pixels(sym: str = "C1", order: int = DEFAULT_ORDER) -> np.ndarray:
    """Nested pixel indices ``(M,)`` (int64, increasing) of the directions RELION samples with symmetry ``sym``.

    ``HealpixSampling::setOrientations`` with ``removeSymmetryEquivalentPoints`` (see the module docstring);
    ``M`` is about ``12 * 4^order / |G|``. All pixels for C1. Raises :class:`CryocliError` when no centre is
    left (icosahedral groups at order 1).
    """
    kind, n = parse_symmetry(sym)
    canonical = f"{kind}{n}" if kind in ("C", "D") else kind
    kept = _asymmetric_unit(kind, n, canonical, order)
    if len(kept) == 0:
        raise CryocliError(f"HEALPix order {order} is too coarse for symmetry {sym}: no pixel centre lies in the "
                           "asymmetric unit (use a higher order)")
    return kept.copy()


def fold_directions(rot_deg: ArrayLike, tilt_deg: ArrayLike, sym: str = "C1",
                    order: int = DEFAULT_ORDER) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fold viewing directions (degrees, shape ``(N,)``) into RELION's asymmetric unit of ``sym``.

    Returns ``(rot_deg, tilt_deg, pixel)``, each ``(N,)``: the chosen symmetry-equivalent direction (rot in
    ``[-180, 180]``, tilt in ``[0, 180]`` degrees, float64) and the nested HEALPix pixel at ``order`` it is
    counted in, one of :func:`asymmetric_unit_pixels` (int64). The rule is in the module docstring. With C1
    the direction is returned as it is (normalised to RELION's ranges) with its containing pixel.
    """
    v = _unit_vectors(rot_deg, tilt_deg).reshape(-1, 3)
    ops = symmetry_operators(sym)
    kept = asymmetric_unit_pixels(sym, order)
    in_unit = torch.zeros(healpix_npix(order), dtype=torch.bool)
    in_unit[torch.from_numpy(kept)] = True
    centres = _unit_vectors(*pixel_directions(order))  # (npix, 3)
    kept_t = torch.from_numpy(kept)
    out_v = torch.empty_like(v)
    out_pix = torch.empty(len(v), dtype=torch.int64)
    for start in range(0, len(v), _CHUNK):  # chunks of particles bound the (chunk, K) temporaries
        vc = v[start:start + _CHUNK]
        eq = torch.einsum("kji,nj->nki", ops, vc)  # R^T v for every operator: (n, K, 3)
        theta = torch.atan2(torch.linalg.vector_norm(eq[..., :2], dim=-1), eq[..., 2])
        pix = healpix_ang2pix(order, theta, torch.atan2(eq[..., 1], eq[..., 0]))  # (n, K)
        ok = in_unit[pix]
        dots = (eq * centres[pix]).sum(-1)
        score = torch.where(ok, dots, torch.full_like(dots, -math.inf))
        best = score.max(-1, keepdim=True).values
        # Among the (near-)best candidates take the smallest pixel index: a choice made on the set alone.
        tie = ok & (score >= best - _DOT_TOL)
        key = torch.where(tie, pix, torch.full_like(pix, torch.iinfo(torch.int64).max))
        choice = key.argmin(-1)
        rows = torch.arange(len(vc))
        chosen_v, chosen_pix = eq[rows, choice], pix[rows, choice]
        lost = ~ok.any(-1)
        if bool(lost.any()):  # seam pixels RELION dropped: nearest pair (equivalent, sampled centre)
            el = eq[lost]  # (m, K, 3)
            d = torch.einsum("mki,ci->mkc", el, centres[kept_t])  # (m, K, M)
            flat = d.reshape(len(el), -1).argmax(-1)
            k_idx, c_idx = flat // len(kept), flat % len(kept)
            chosen_v[lost] = el[torch.arange(len(el)), k_idx]
            chosen_pix[lost] = kept_t[c_idx]
        out_v[start:start + len(vc)] = chosen_v
        out_pix[start:start + len(vc)] = chosen_pix
    rot, tilt = _vectors_to_angles(out_v)
    return rot, tilt, out_pix.numpy()


def direction_histogram(rot_deg: ArrayLike, tilt_deg: ArrayLike, sym: str = "C1",
                        order: int = DEFAULT_ORDER) -> np.ndarray:
    """Particles per nested HEALPix pixel at ``order``: int64 ``(12 * 4^order,)``, summing to ``N``.

    ``rot_deg`` and ``tilt_deg`` are the viewing directions in degrees, shape ``(N,)`` (see
    :func:`viewing_directions`). With symmetry each direction is first folded into RELION's asymmetric unit
    (:func:`fold_directions`), so only the pixels of :func:`asymmetric_unit_pixels` can be non-zero. Pixel
    centres for a plot: :func:`pixel_directions`; each pixel covers ``4 pi / (12 * 4^order)`` sr.
    """
    _, _, pix = fold_directions(rot_deg, tilt_deg, sym, order)
    return np.bincount(pix, minlength=healpix_npix(order)).astype(np.int64)


def equal_area_histogram(rot_deg: ArrayLike, tilt_deg: ArrayLike,
                         bins: tuple[int, int] = (72, 36)) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Counts of viewing directions in ``nx x ny`` cells of equal solid angle, for a Hammer (equal-area) plot.

    Longitude ``rot`` (degrees) is cut into ``nx`` equal steps over ``[-180, 180]`` and latitude ``90 - tilt``
    into ``ny`` bands of equal ``sin(latitude)`` (= ``cos(tilt)``), so every cell covers exactly
    ``4 pi / (nx * ny)`` sr of the sphere (Archimedes: area is linear in ``z``). On an equal-area projection
    such as matplotlib's ``projection="hammer"`` each cell therefore keeps an equal area and colour reads as
    density::

        counts, x, y = equal_area_histogram(rot, tilt)
        ax = fig.add_subplot(projection="hammer")
        ax.pcolormesh(np.radians(x), np.radians(y), counts)

    Returns ``counts`` int64 ``(ny, nx)`` (row ``j``: latitude band ``j`` from the south pole ``tilt = 180``
    upwards; column ``i``: longitude step ``i`` from ``rot = -180``), ``x_edges`` ``(nx + 1,)`` longitudes in
    degrees and ``y_edges`` ``(ny + 1,)`` latitudes in degrees (``arcsin(linspace(-1, 1, ny + 1))``).
    A direction on an edge falls in the cell above/right of it; ``rot = 180`` is ``rot = -180``. Any
    ``(rot, tilt)`` is accepted (``tilt < 0`` means ``rot + 180``, as RELION's ``checkDirection``).
    """
    nx, ny = (int(b) for b in bins)
    if nx < 1 or ny < 1:
        raise CryocliError(f"histogram bins must be positive integers, got {bins}")
    v = _unit_vectors(rot_deg, tilt_deg).reshape(-1, 3).numpy()
    lon = np.degrees(np.arctan2(v[:, 1], v[:, 0]))
    ix = np.clip(np.floor((lon + 180.0) / 360.0 * nx).astype(np.int64) % nx, 0, nx - 1)
    iy = np.clip(np.floor((np.clip(v[:, 2], -1.0, 1.0) + 1.0) / 2.0 * ny).astype(np.int64), 0, ny - 1)
    counts = np.bincount(iy * nx + ix, minlength=nx * ny).reshape(ny, nx).astype(np.int64)
    x_edges = np.linspace(-180.0, 180.0, nx + 1)
    y_edges = np.degrees(np.arcsin(np.linspace(-1.0, 1.0, ny + 1)))
    return counts, x_edges, y_edges


# ------------------------------------------------------------------------------------------------- bild


def _g(x: float) -> str:
    """A number as C++'s ``std::ostream << double`` prints it by default (``%g``, 6 significant digits)."""
    return f"{x:.6g}"


def bild_text_from_counts(counts: ArrayLike, box: int, pixel_size: float, sym: str = "C1",
                          order: int = DEFAULT_ORDER) -> str:
    """RELION's ``*_angdist.bild`` text for per-pixel weights ``counts`` ``(12 * 4^order,)`` (any scale >= 0).

    Reimplements ``HealpixSampling::writeBildFileOrientationalDistribution`` (src/healpix_sampling.cpp:2015-2127,
    RELION 5.0 commit 73f0a3c) as ``MlModel::write`` calls it for a class (src/ml_model.cpp:588-613, no bodies):

    * ``R = offset = box * pixel_size / 2`` (Angstrom; ml_model.cpp:601): cylinders start on a sphere of
      radius ``R`` centred at ``(offset, offset, offset)``, the map centre in ChimeraX's frame (voxel
      ``(0, 0, 0)`` at the origin);
    * only RELION's sampled directions (:func:`asymmetric_unit_pixels`) are drawn, in their order; the
      statistics run over all of them, zeros included (``computeStats``, src/multidim_array.h:2659-2703:
      the population standard deviation, since RELION's ``N / (N - 1)`` is an integer division);
    * a direction with weight ``p > 0`` gets ``.color c 0 1-c`` with ``c = (clip((p - mean) / sigma, -1, 5)
      + 1) / 6`` (blue at or below 1 sigma under the mean, red from 5 sigma above; line 2054) and
      ``.cylinder`` from ``R v`` to ``Rp v`` (plus the offset) with ``Rp = R + 0.3 R p / max(p)`` (line 2061)
      and width ``0.5 pi R (360 / (6 * 2^order)) / 360`` (line 2039; defaults Rmax_frac 0.3, width_frac 0.5,
      healpix_sampling.h:384-387), ``v`` the pixel direction (``Euler_angles2direction`` of its rot, tilt);
    * a cylinder is left out when every component of ``(Rp - R) v`` is at most 0.01 A (lines 2083-2085);
    * numbers print as ``%g`` with 6 significant digits (C++ stream defaults).

    One deviation: when all sampled directions have the same weight (``sigma = 0``) RELION prints NaN colours;
    here ``c = 1/6`` (the colour of the mean). Multi-body files (rotated frames, ``Acom``) are not written.
    """
    if box < 1 or not pixel_size > 0:
        raise CryocliError(f"box ({box}) and pixel size ({pixel_size} A) must be positive")
    weights = _as_float64(counts).reshape(-1).numpy()
    if weights.shape[0] != healpix_npix(order):
        raise CryocliError(f"expected {healpix_npix(order)} weights for HEALPix order {order}, got {weights.shape[0]}")
    if (weights < 0).any() or not np.isfinite(weights).all():
        raise CryocliError("direction weights must be finite and non-negative")
    kept = asymmetric_unit_pixels(sym, order)
    pdf = weights[kept]
    size = len(pdf)
    mean = float(pdf.mean())
    var = float((pdf * pdf).mean()) - mean * mean
    sigma = math.sqrt(abs(var * (size // (size - 1)))) if size > 1 else 0.0
    pmax = float(pdf.max())
    radius = box * pixel_size / 2.0
    offset = radius
    width = _WIDTH_FRAC * math.pi * radius * ((360.0 / (6 * 2**order)) / 360.0)
    rot, tilt = pixel_directions(order)
    v = _unit_vectors(rot[kept], tilt[kept]).numpy()
    occupied = pdf > 0
    if sigma > 0:
        colscale = np.clip((pdf - mean) / sigma, -1.0, 5.0) / 6.0 + 1.0 / 6.0
    else:
        colscale = np.full_like(pdf, 1.0 / 6.0)
    rp = radius + _RMAX_FRAC * radius * pdf / (pmax if pmax > 0 else 1.0)
    long_enough = (np.abs((radius - rp)[:, None] * v) > 0.01).any(axis=1)
    start = radius * v + offset
    end = rp[:, None] * v + offset
    lines: list[str] = []
    for i in np.flatnonzero(occupied & long_enough):  # one pair of lines per drawn direction
        c = float(colscale[i])
        lines.append(f".color {_g(c)} 0 {_g(1.0 - c)}")
        coords = " ".join(_g(float(x)) for x in (*start[i], *end[i]))
        lines.append(f".cylinder {coords} {_g(width)}")
    return "".join(line + "\n" for line in lines)


def angdist_bild_text(rotations: ArrayLike, box: int, pixel_size: float, sym: str = "C1",
                      order: int = DEFAULT_ORDER) -> str:
    """RELION's ``run_class001_angdist.bild`` for poses ``rotations`` (RELION ``A``, ``(N, 3, 3)``).

    ``box`` is the particle box in pixels (RELION's ``ori_size``), ``pixel_size`` in Angstrom per pixel; the
    directions are counted per HEALPix pixel at ``order`` after folding into the asymmetric unit of ``sym``
    (:func:`direction_histogram`) and written as :func:`bild_text_from_counts` describes (RELION source
    followed: src/healpix_sampling.cpp ``writeBildFileOrientationalDistribution``, lines 2015-2127, and
    src/ml_model.cpp ``MlModel::write``, lines 588-613). Open it in ChimeraX with the map (``open
    run_class001_angdist.bild``): coordinates are Angstrom with map voxel ``(0, 0, 0)`` at the origin.
    """
    rot, tilt = viewing_directions(rotations)
    counts = direction_histogram(rot.reshape(-1), tilt.reshape(-1), sym, order)
    return bild_text_from_counts(counts, box, pixel_size, sym, order)


def write_angdist_bild(path: str | Path, rotations: ArrayLike, box: int, pixel_size: float, sym: str = "C1",
                       order: int = DEFAULT_ORDER) -> None:
    """Write :func:`angdist_bild_text` to ``path`` atomically (umask permissions; see :func:`atomic_write_text`)."""
    atomic_write_text(path, angdist_bild_text(rotations, box, pixel_size, sym, order))
