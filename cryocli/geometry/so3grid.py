"""Hierarchical SO(3) grids: HEALPix viewing directions x in-plane angles, as RELION samples poses.

HEALPix (Gorski et al. 2005, ApJ 622:759) splits the sphere into 12 base diamonds, each into
``nside x nside`` equal-area pixels with ``nside = 2^order``. In the *nested* numbering a pixel index is
``face * nside^2 + interleave(ix, iy)`` (``ix`` in the even bits, ``iy`` in the odd ones), so the four
children of pixel ``p`` at the next order are ``4p .. 4p+3``. The functions below implement pix2ang and
ang2pix for that scheme, vectorised in torch.

RELION (``HealpixSampling``: ``healpix_base.Set(order, NEST)``; ``getDirectionFromHealPix``) takes, for
every nested pixel in index order, ``rot = phi`` (wrapped to ``(-180, 180]``) and ``tilt = theta`` of its
centre, so the projection direction (third row of ``A``) is the pixel centre; psi runs over
``k * 360 / (6 * 2^order)`` degrees, ``k = 0 .. 6 * 2^order - 1``. Order 2: 192 directions, psi every
15 degrees (4608 poses); RELION's ``run_it*_sampling.star`` lists the directions in this nested order.

:class:`SO3Grid` builds the hierarchy used by grid search, beam search (Cryo2SSNet's ``G_k``: 72 x 8^k
cells from HEALPix order 0 x 6 psi angles) and branch-and-bound. Level ``l`` is HEALPix order
``base_order + l`` with ``n_psi = 6 * 2^order`` in-plane angles; a cell id is ``pixel * n_psi + psi_index``
and each cell has 8 children (4 nested pixel children x 2 psi halves). Level 0 is RELION's sampling of
``base_order`` exactly. Finer levels keep RELION's directions but carry each pixel's psi comb along from
its parent (see :meth:`SO3Grid.psi_offsets`): with plain Euler psi at every level, the in-plane angle of a
cell near the poles depends on ``rot`` (``A ~ Rz(rot + psi)`` at tilt 0), so children there would land
tens of degrees away from their parent at any order. With the transported combs every child sits within
``2 acos(cos(a/2) cos(s/8))`` of its parent (``a``: parent-child direction angle, ``s``: parent psi step).
Measured from base order 0: every child of levels 0, 1 and 2 is nearer to its parent than to any other
cell of the parent's level; from level 3 to 4 this holds for 99.7% of the children, the rest sitting where
HEALPix child centres are almost equidistant from two parent centres (at most 4% nearer to the other one).
With plain Euler psi 12-17% of the children fail at each of levels 0-3, and they drift up to 1.7 cells
(level 2) and 3.2 cells (level 3) away from their parent.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from cryocli.errors import CryocliError
from cryocli.geometry.rotations import euler_to_matrix

# Per base face: ring number of its centre in units of nside, and its longitude index (Gorski et al. table).
_FACE_RING = (2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4)
_FACE_PHI = (1, 3, 5, 7, 0, 2, 4, 6, 1, 3, 5, 7)
# Tolerance (radians) of neighbourhood radii.
_SLACK = 1e-9


# ------------------------------------------------------------------------------------------------- HEALPix


def healpix_npix(order: int) -> int:
    """Number of HEALPix pixels at ``order`` (``nside = 2^order``): ``12 * 4^order``."""
    return 12 * 4**order


def _check_order(order: int) -> None:
    if not 0 <= order <= 29:
        raise CryocliError(f"HEALPix order must be between 0 and 29 (got {order})")


def _deinterleave(ipf: Tensor, order: int) -> tuple[Tensor, Tensor]:
    """Nested index within a face -> ``(ix, iy)``: even bits -> ix, odd bits -> iy."""
    ix = torch.zeros_like(ipf)
    iy = torch.zeros_like(ipf)
    for b in range(order):
        ix |= ((ipf >> (2 * b)) & 1) << b
        iy |= ((ipf >> (2 * b + 1)) & 1) << b
    return ix, iy


def _interleave(ix: Tensor, iy: Tensor, order: int) -> Tensor:
    ipf = torch.zeros_like(ix)
    for b in range(order):
        ipf |= ((ix >> b) & 1) << (2 * b)
        ipf |= ((iy >> b) & 1) << (2 * b + 1)
    return ipf


def healpix_pix2ang(order: int, pix: Tensor) -> tuple[Tensor, Tensor]:
    """Nested pixel indices (int64, any shape) -> centre ``(theta, phi)`` in radians (float64).

    ``theta`` is the colatitude in ``(0, pi)``, ``phi`` the longitude in ``[0, 2 pi)``.
    """
    _check_order(order)
    pix = torch.as_tensor(pix, dtype=torch.int64)
    nside = 1 << order
    face = pix // (nside * nside)
    ix, iy = _deinterleave(pix % (nside * nside), order)
    face_ring = torch.tensor(_FACE_RING, device=pix.device)[face]
    face_phi = torch.tensor(_FACE_PHI, device=pix.device)[face]
    ring = face_ring * nside - ix - iy - 1  # 1 .. 4 nside - 1, from the north pole
    north, south = ring < nside, ring > 3 * nside
    # Pixels per quarter ring (polar caps shrink towards the poles).
    nr = torch.where(north, ring, torch.where(south, 4 * nside - ring, torch.full_like(ring, nside)))
    # Belt rings alternate between centres at phi = (j - 1/2) and j quarter-pixel steps; caps have the former.
    kshift = torch.where(north | south, torch.zeros_like(ring), (ring - nside) % 2)
    nr_f = nr.to(torch.float64)
    # In the caps 1 - |z| = nr^2 / (3 nside^2): theta from asin keeps precision at the poles.
    cap_theta = 2 * torch.asin(nr_f / (math.sqrt(6.0) * nside))
    belt_z = (2 * nside - ring).to(torch.float64) * (2.0 / (3 * nside))
    theta = torch.where(north, cap_theta, torch.where(south, math.pi - cap_theta, torch.acos(belt_z)))
    jp = (face_phi * nr + ix - iy + 1 + kshift) // 2  # 1-based index around the ring
    jp = torch.where(jp > 4 * nr, jp - 4 * nr, jp)
    jp = torch.where(jp < 1, jp + 4 * nr, jp)
    phi = (jp.to(torch.float64) - 0.5 * (1 + kshift)) * (math.pi / 2) / nr_f
    return theta, phi


def healpix_ang2pix(order: int, theta: Tensor, phi: Tensor) -> Tensor:
    """Colatitude and longitude in radians (any shape) -> nested index (int64) of the containing pixel."""
    _check_order(order)
    theta, phi = torch.broadcast_tensors(torch.as_tensor(theta, dtype=torch.float64),
                                         torch.as_tensor(phi, dtype=torch.float64))
    nside = 1 << order
    z = torch.cos(theta)
    tt = torch.remainder(phi, 2 * math.pi) * (2 / math.pi)  # in [0, 4)
    tt = torch.where(tt >= 4, torch.zeros_like(tt), tt)
    # Equatorial belt |z| <= 2/3: faces are cut by the lines of constant phi +- (3/4) z (in units of pi/2).
    a = nside * (0.5 + tt)
    b = nside * z * 0.75
    jp = torch.floor(a - b).to(torch.int64)  # index of the ascending edge line
    jm = torch.floor(a + b).to(torch.int64)  # index of the descending edge line
    fp, fm = jp // nside, jm // nside
    belt_face = torch.where(fp == fm, (fp % 4) + 4, torch.where(fp < fm, fp % 4, (fm % 4) + 8))
    belt_ix = jm % nside
    belt_iy = nside - (jp % nside) - 1
    # Polar caps: distance from the pole scaled so that pixel rows are integers.
    quarter = torch.clamp(torch.floor(tt).to(torch.int64), max=3)
    tp = tt - quarter
    one_minus_az = 2 * torch.sin(theta / 2) ** 2
    one_minus_az = torch.where(z < 0, 2 * torch.cos(theta / 2) ** 2, one_minus_az)
    tmp = nside * torch.sqrt(3 * one_minus_az)
    cjp = torch.clamp(torch.floor(tp * tmp).to(torch.int64), max=nside - 1)
    cjm = torch.clamp(torch.floor((1 - tp) * tmp).to(torch.int64), max=nside - 1)
    north = z >= 0
    cap_face = torch.where(north, quarter, quarter + 8)
    cap_ix = torch.where(north, nside - cjm - 1, cjp)
    cap_iy = torch.where(north, nside - cjp - 1, cjm)
    belt = z.abs() <= 2.0 / 3.0
    face = torch.where(belt, belt_face, cap_face)
    ix = torch.where(belt, belt_ix, cap_ix)
    iy = torch.where(belt, belt_iy, cap_iy)
    return face * (nside * nside) + _interleave(ix, iy, order)


def healpix_pix2vec(order: int, pix: Tensor) -> Tensor:
    """Nested pixel indices -> unit vectors ``(..., 3)`` (float64) of the pixel centres."""
    theta, phi = healpix_pix2ang(order, pix)
    return torch.stack([torch.sin(theta) * torch.cos(phi), torch.sin(theta) * torch.sin(phi), torch.cos(theta)], -1)


def healpix_vec2pix(order: int, vectors: Tensor) -> Tensor:
    """Directions ``(..., 3)`` (any non-zero length) -> nested index of the containing pixel."""
    v = vectors.to(torch.float64)
    theta = torch.atan2(torch.linalg.vector_norm(v[..., :2], dim=-1), v[..., 2])
    return healpix_ang2pix(order, theta, torch.atan2(v[..., 1], v[..., 0]))


def healpix_max_pixrad(order: int) -> float:
    """Largest angle (radians) between a pixel centre and a point of its pixel, at ``order``.

    The worst pixels touch the boundary between the polar caps and the belt: the distance from the
    belt-edge centre at ``z = 2/3``, ``phi = pi / (4 nside)`` to the cap corner at
    ``z = 1 - (1 - 1/nside)^2 / 3``, ``phi = 0`` bounds every centre-to-corner distance (and pixels are
    far from their centres only at corners). The tests check this against dense samples.
    """
    nside = 1 << order
    z1, p1 = 2.0 / 3.0, math.pi / (4 * nside)
    z2 = 1 - (1 - 1 / nside) ** 2 / 3
    s1, s2 = math.sqrt(1 - z1 * z1), math.sqrt(1 - z2 * z2)
    return math.acos(min(1.0, s1 * s2 * math.cos(p1) + z1 * z2))


# ------------------------------------------------------------------------------------------------- SO(3)


def _compose_angles(tilt: float, spin: float) -> float:
    """Angle (radians) of a turn by ``tilt`` about an axis perpendicular to the viewing axis combined with
    a turn by ``spin`` about the viewing axis: ``cos(w/2) = cos(tilt/2) cos(spin/2)``, in a form that keeps
    precision for small angles."""
    s, c = math.sin(tilt / 2), math.cos(tilt / 2)
    return 2 * math.atan2(math.sqrt(s * s + (c * math.sin(spin / 2)) ** 2), c * math.cos(spin / 2))


def _wrap(angle: Tensor) -> Tensor:
    """Angles (radians) wrapped to ``[-pi, pi)``."""
    return torch.remainder(angle + math.pi, 2 * math.pi) - math.pi


def _compact(mask: Tensor) -> tuple[Tensor, Tensor]:
    """Positions of the True entries of each row of ``mask`` (B, N), left-aligned: ``(index, valid)`` (B, K)."""
    order = torch.argsort((~mask).to(torch.int8), dim=-1, stable=True)
    k = max(int(mask.sum(-1).max()) if mask.numel() else 0, 1)
    index = order[..., :k]
    return index, torch.gather(mask, -1, index)


def _minimal_transport(rotations: Tensor, targets: Tensor) -> Tensor:
    """Euler psi (radians) of the rotation nearest to each ``rotations`` (B, 3, 3) whose viewing direction is
    ``targets`` (B, K, 3); result (B, K).

    The nearest such rotation is ``Q^T A`` with ``Q`` the smallest turn taking ``e_z`` to ``u = A t``.
    """
    u = torch.einsum("bij,bkj->bki", rotations, targets)
    ux, uy, uz = u.unbind(-1)
    # Q = I + [k]x + [k]x^2 / (1 + c), k = e_z x u = (-uy, ux, 0), c = uz; only its first two columns
    # are needed since psi = atan2(B[1, 2], -B[0, 2]) for B = Q^T A, and B[i, 2] = sum_m Q[m, i] A[m, 2].
    f = 1 / torch.clamp(1 + uz, min=1e-300)
    q00, q10, q20 = 1 - ux * ux * f, -ux * uy * f, -ux
    q01, q11, q21 = -ux * uy * f, 1 - uy * uy * f, -uy
    a2 = rotations[:, :, 2].unsqueeze(1)  # (B, 1, 3): column 2 of A
    b02 = q00 * a2[..., 0] + q10 * a2[..., 1] + q20 * a2[..., 2]
    b12 = q01 * a2[..., 0] + q11 * a2[..., 1] + q21 * a2[..., 2]
    return torch.atan2(b12, -b02)


class SO3Grid:
    """Hierarchy of SO(3) grids; level ``l`` is HEALPix order ``base_order + l`` x ``6 * 2^order`` psi angles.

    Cell ids at a level are ``pixel * n_psi + psi_index`` (int64). Cell ``(p, j)`` is the pose with
    ``rot, tilt`` = the centre of nested pixel ``p`` and
    ``psi = psi_origin + (j + 1/2) * step + psi_offsets(level)[p]`` (radians inside, degrees from
    :meth:`euler`). With the default ``psi_origin = -step_0 / 2`` level 0 has psi ``0, step_0, ...`` like
    RELION. Rotations are RELION ``A`` matrices in ``dtype`` on ``device``; geometry runs in float64.
    """

    def __init__(self, base_order: int = 0, psi_origin_deg: float | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        _check_order(base_order)
        self.base_order = base_order
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = dtype or torch.get_default_dtype()
        step0 = 2 * math.pi / (6 * 2**base_order)
        self.psi_origin = -step0 / 2 if psi_origin_deg is None else math.radians(psi_origin_deg)
        self._offsets: dict[int, Tensor] = {}

    # ------------------------------------------------------------------------------------ sizes and scales

    def order(self, level: int) -> int:
        """HEALPix order of ``level``."""
        if level < 0:
            raise CryocliError(f"grid level must be >= 0 (got {level})")
        order = self.base_order + level
        _check_order(order)
        return order

    def n_directions(self, level: int) -> int:
        """Viewing directions at ``level``: ``12 * 4^order``."""
        return healpix_npix(self.order(level))

    def n_psi(self, level: int) -> int:
        """In-plane angles per direction at ``level``: ``6 * 2^order``."""
        return 6 * 2 ** self.order(level)

    def n_cells(self, level: int) -> int:
        """Cells at ``level``: ``72 * 8^order``."""
        return self.n_directions(level) * self.n_psi(level)

    def psi_step(self, level: int) -> float:
        """In-plane step (radians): ``2 pi / (6 * 2^order)``, RELION's angular sampling of that order."""
        return 2 * math.pi / self.n_psi(level)

    def cell_size(self, level: int) -> float:
        """Angular resolution of ``level`` in radians: the psi step, ~ the spacing of the directions
        (``sqrt(4 pi / npix) = 1.02 x`` the step). RELION reports the same number as its sampling."""
        return self.psi_step(level)

    def covering_radius(self, level: int) -> float:
        """Bound (radians) on the distance from any rotation to its nearest cell at ``level``.

        Nearest direction within ``a = healpix_max_pixrad``; on that direction's psi comb the nearest
        in-plane angle is within ``d = step / 2``. The rotation between the two factors into a turn about
        the viewing axis by ``d`` and a turn about an axis perpendicular to it by ``a``, whose angle ``w``
        obeys ``cos(w/2) = cos(a/2) cos(d/2)`` exactly.
        """
        return _compose_angles(healpix_max_pixrad(self.order(level)), self.psi_step(level) / 2)

    # ------------------------------------------------------------------------------------- cell geometry

    def _all(self, level: int) -> Tensor:
        return torch.arange(self.n_cells(level), device=self.device)

    def _ids(self, level: int, ids: Tensor | None, checked: bool = True) -> Tensor:
        if ids is None:
            return self._all(level)
        ids = torch.as_tensor(ids, dtype=torch.int64, device=self.device)
        if checked and ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.n_cells(level)):
            raise CryocliError(f"cell ids out of range for level {level} (0 .. {self.n_cells(level) - 1})")
        return ids

    def psi_offsets(self, level: int) -> Tensor:
        """Per-pixel shift (radians, float64, ``(npix,)``) of the psi comb at ``level``.

        Zero at level 0. A child pixel's comb is its parent's carried along the shortest rotation from the
        parent's centre to the child's: the psi that rotation gives to the parent's pose with psi = 0.
        """
        if level not in self._offsets:
            if level == 0:
                offsets = torch.zeros(self.n_directions(0), dtype=torch.float64, device=self.device)
            else:
                order = self.order(level)
                child = torch.arange(healpix_npix(order), device=self.device)
                parent = child // 4
                theta, phi = healpix_pix2ang(order - 1, parent)
                parent_pose = euler_to_matrix(torch.rad2deg(phi), torch.rad2deg(theta), torch.zeros_like(phi))
                psi = _minimal_transport(parent_pose, healpix_pix2vec(order, child).unsqueeze(1))[:, 0]
                offsets = _wrap(self.psi_offsets(level - 1)[parent] + psi)
            self._offsets[level] = offsets
        return self._offsets[level]

    def _euler_rad(self, level: int, ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        n_psi = self.n_psi(level)
        pix, j = ids // n_psi, ids % n_psi
        theta, phi = healpix_pix2ang(self.order(level), pix)
        psi = self.psi_origin + (j.to(torch.float64) + 0.5) * self.psi_step(level) + self.psi_offsets(level)[pix]
        return phi, theta, psi

    def euler(self, level: int, ids: Tensor | None = None) -> Tensor:
        """RELION angles ``(..., 3)`` = (rot, tilt, psi) in degrees of cells ``ids`` (default: all).

        rot and psi are in ``(-180, 180]``, tilt in ``(0, 180)``; float64.
        """
        phi, theta, psi = self._euler_rad(level, self._ids(level, ids))
        deg = torch.rad2deg(torch.stack([phi, theta, psi], -1))
        # rot and psi to (-180, 180], the range RELION's checkDirection gives rot.
        wrapped = 180 - torch.remainder(180 - deg, 360)
        return torch.cat([wrapped[..., :1], deg[..., 1:2], wrapped[..., 2:]], -1)

    def rotations(self, level: int, ids: Tensor | None = None, checked: bool = True) -> Tensor:
        """Rotation matrices ``A`` ``(..., 3, 3)`` of cells ``ids`` (default: all cells of the level).

        ``checked=False`` skips the range check of ``ids`` (a device-to-host sync), for ids known to be valid
        (e.g. children of valid cells) in batched inner loops."""
        phi, theta, psi = self._euler_rad(level, self._ids(level, ids, checked))
        a = euler_to_matrix(torch.rad2deg(phi), torch.rad2deg(theta), torch.rad2deg(psi))
        return a.to(self.dtype)

    def directions(self, level: int) -> Tensor:
        """Unit viewing directions ``(npix, 3)`` (float64) of the pixels at ``level``, in nested order."""
        return healpix_pix2vec(self.order(level), torch.arange(self.n_directions(level), device=self.device))

    # ------------------------------------------------------------------------------------------ hierarchy

    def children(self, level: int, ids: Tensor, checked: bool = True) -> Tensor:
        """The 8 children (ids at ``level + 1``, ``(..., 8)``) of cells ``ids`` at ``level``.

        Order: for each nested pixel child ``4p .. 4p+3``, psi halves ``2j`` then ``2j + 1``. ``checked``: as
        in :meth:`rotations`.
        """
        ids = self._ids(level, ids, checked)
        n_psi, n_psi_next = self.n_psi(level), self.n_psi(level + 1)
        pix, j = ids // n_psi, ids % n_psi
        sub_pix = 4 * pix.unsqueeze(-1) + torch.arange(4, device=ids.device)
        sub_psi = 2 * j.unsqueeze(-1) + torch.arange(2, device=ids.device)
        return (sub_pix.unsqueeze(-1) * n_psi_next + sub_psi.unsqueeze(-2)).flatten(-2)

    def parent(self, level: int, ids: Tensor) -> Tensor:
        """Parent ids (at ``level - 1``) of cells ``ids`` at ``level`` (``level >= 1``), same shape."""
        if level < 1:
            raise CryocliError("level-0 cells have no parent")
        ids = self._ids(level, ids)
        n_psi = self.n_psi(level)
        return (ids // n_psi // 4) * self.n_psi(level - 1) + (ids % n_psi) // 2

    # ------------------------------------------------------------------------------------ neighbourhoods

    def cells_within(self, rotations: Tensor, level: int, radius: float) -> tuple[Tensor, Tensor]:
        """Cells at ``level`` within geodesic ``radius`` (radians) of each rotation ``(B, 3, 3)``.

        Returns ``(ids, distance)``, each ``(B, K)`` sorted by distance (radians), padded with ``-1`` and
        ``inf`` where a row has fewer than ``K`` cells; cells up to 1e-9 rad beyond ``radius`` are kept. The
        distance is exact: for a pixel at angle ``a`` from the rotation's viewing direction and an in-plane
        mismatch ``d`` to the nearest pose with that direction, ``cos(w/2) = cos(a/2) cos(d/2)``.
        Cost ~ ``B x npix`` for the direction screen.
        """
        a = rotations.to(device=self.device, dtype=torch.float64)
        if a.ndim != 3:
            raise CryocliError(f"expected rotations of shape (B, 3, 3), got {tuple(rotations.shape)}")
        n_psi, step = self.n_psi(level), self.psi_step(level)
        view = a[:, 2, :]
        dirs = self.directions(level)
        # Direction screen: a cell's distance is at least its direction's angle.
        # Cells at the radius up to _SLACK count as inside, so ties (common: radius = k steps) are decided
        # the same way from either end of a pair.
        radius = radius + _SLACK
        near = view @ dirs.T >= math.cos(min(radius, math.pi)) - 1e-12
        cand, cand_ok = _compact(near)
        targets = dirs[cand]  # (B, Kd, 3)
        psi_star = _minimal_transport(a, targets)
        half_sin = 0.5 * torch.linalg.vector_norm(view.unsqueeze(1) - targets, dim=-1)  # sin(a/2)
        half_cos = 0.5 * torch.linalg.vector_norm(view.unsqueeze(1) + targets, dim=-1)  # cos(a/2)
        comb = self.psi_origin + self.psi_offsets(level)[cand]  # psi of index -1/2
        half_width = math.ceil(min(radius, math.pi) / step) + 1
        if 2 * half_width + 1 >= n_psi:
            j = torch.arange(n_psi, device=self.device).expand(*cand.shape, n_psi)
        else:
            centre = torch.round((psi_star - comb) / step - 0.5).to(torch.int64)
            j = centre.unsqueeze(-1) + torch.arange(-half_width, half_width + 1, device=self.device)
        delta = _wrap(comb.unsqueeze(-1) + (j.to(torch.float64) + 0.5) * step - psi_star.unsqueeze(-1))
        s, c = half_sin.unsqueeze(-1), half_cos.unsqueeze(-1)
        dist = 2 * torch.atan2(torch.sqrt(s * s + (c * torch.sin(delta / 2)) ** 2), c * torch.cos(delta / 2))
        ok = cand_ok.unsqueeze(-1) & (dist <= radius)
        ids = (cand.unsqueeze(-1) * n_psi + torch.remainder(j, n_psi)).flatten(1)
        dist, ok = dist.flatten(1), ok.flatten(1)
        keep, keep_ok = _compact(ok)
        dist = torch.where(keep_ok, torch.gather(dist, 1, keep), torch.full_like(dist[:, :1], math.inf))
        ids = torch.where(keep_ok, torch.gather(ids, 1, keep), torch.full_like(ids[:, :1], -1))
        order = torch.argsort(dist, dim=1, stable=True)
        return torch.gather(ids, 1, order), torch.gather(dist, 1, order)

    def nearest(self, rotations: Tensor, level: int, k: int = 1) -> tuple[Tensor, Tensor]:
        """The ``k`` cells at ``level`` nearest to each rotation ``(B, 3, 3)``: ``(ids, distance)`` ``(B, k)``."""
        if not 1 <= k <= self.n_cells(level):
            raise CryocliError(f"k must be between 1 and {self.n_cells(level)} (got {k})")
        radius = self.covering_radius(level) * (1.0 if k == 1 else 2.0 * k ** (1 / 3))
        while True:
            ids, dist = self.cells_within(rotations, level, radius)
            if radius >= math.pi or (ids.shape[1] >= k and bool((ids[:, k - 1] >= 0).all())):
                return ids[:, :k], dist[:, :k]
            radius = min(2 * radius, math.pi)

    def local_cells(self, centres: Tensor, level: int, radius: float) -> tuple[Tensor, Tensor, Tensor]:
        """The neighbourhood at ``level`` of each pose ``centres`` ``(B, 3, 3)``: the cells within geodesic
        ``radius`` (radians), nearest first, as searched by a RELION-style local search around the previous
        best pose. For the neighbours of cells ``ids`` pass ``self.rotations(level, ids)`` (each cell then
        comes first, at distance 0); for the ``k`` nearest cells see :meth:`nearest`.

        Returns ``(ids, valid, distance)``, each ``(B, K)`` (see :meth:`cells_within`). Padded slots (``valid``
        False, distance ``inf``) repeat the row's nearest cell (cell 0 for a row with none), so that they can
        be evaluated harmlessly, then masked.
        """
        ids, dist = self.cells_within(centres, level, radius)
        valid = ids >= 0
        return torch.where(valid, ids, ids[:, :1].clamp(min=0)), valid, dist
