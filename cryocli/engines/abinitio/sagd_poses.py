"""The most probable pose of each particle, located below the quadrature's spacing (cryocli's addition to SAGD).

The marginalisation never needs single poses, but the run directory reports one per particle: the most probable
evaluated quadrature point, whose error is at least the grid's (median 7 degrees at the 15-degree level 2 for random
poses). :func:`polish_poses` moves it to the best of the point and its local neighbours, with halving steps:
turns by ``+-step / 2`` about each image axis (``A' = R A``) and shifts by ``+-shift_step / 2`` along x and y, scored by
the same likelihood on the same pixels plus the shift prior (the orientation prior is uniform). The map is not
affected. All particles of a batch at once: ``7`` rotations x ``5`` shifts per particle and round, three rounds
(steps of half, a quarter and an eighth of the quadrature's).
"""

from __future__ import annotations

import torch
from torch import Tensor

from cryocli.engines.abinitio.sagd_marginal import BatchPixels
from cryocli.engines.common.pose_search import SearchPixels, project_pixels
from cryocli.geometry.rotations import rotation_about_axis

#: Rounds of the local search (each halves the steps).
ROUNDS = 3


def _turns(step: float, device: torch.device) -> Tensor:
    """The identity and turns by ``+-step / 2`` about x, y, z: ``(7, 3, 3)``."""
    axes = torch.eye(3, device=device).repeat_interleave(2, 0)
    angles = torch.tensor([0.5, -0.5] * 3, device=device) * step
    return torch.cat([torch.eye(3, device=device)[None], rotation_about_axis(axes, angles)])


def _offsets(step: float, device: torch.device) -> Tensor:
    """Zero and ``+-step / 2`` along x and y: ``(5, 2)`` pixels."""
    h = 0.5 * step
    return torch.tensor([[0.0, 0.0], [h, 0.0], [-h, 0.0], [0.0, h], [0.0, -h]], device=device)


def polish_poses(volume_ft: Tensor, pad: float, data: BatchPixels, pixels: SearchPixels, rotations: Tensor,
                 shifts: Tensor, angle_step: float, shift_step: float, shift_sigma: float) -> tuple[Tensor, Tensor]:
    """Local search around ``rotations (B, 3, 3)`` and ``shifts (B, 2)`` (pixels) on the padded Fourier grid
    ``volume_ft`` (``pad``); steps in radians and pixels, the shift prior's sigma in pixels (0: none). Returns the
    polished ``(rotations, shifts)``."""
    b, dev = rotations.shape[0], rotations.device
    c = data.ctf
    wr, wi = data.xr * c * data.inv, data.xi * c * data.inv
    c2inv = c * c * data.inv
    for _ in range(ROUNDS):
        cand_rot = _turns(angle_step, dev)[None] @ rotations[:, None]  # (B, 7, 3, 3)
        cand_shift = shifts[:, None, :] + _offsets(shift_step, dev)[None]  # (B, 5, 2)
        proj = project_pixels(volume_ft, cand_rot.reshape(-1, 3, 3), pixels, pad).reshape(b, 7, -1) / pixels.n
        pr, pi = proj.real.contiguous(), proj.imag.contiguous()
        rr, ri = pixels.ramp_parts(cand_shift)  # (B, 5, M)
        sr, si = wr[:, None] * rr - wi[:, None] * ri, wr[:, None] * ri + wi[:, None] * rr
        cross = torch.bmm(sr, pr.transpose(1, 2)) + torch.bmm(si, pi.transpose(1, 2))  # (B, 5, 7)
        norm = torch.bmm(pr * pr + pi * pi, c2inv[:, :, None])[:, :, 0]  # (B, 7)
        score = cross - 0.5 * norm[:, None, :]
        if shift_sigma > 0:
            score = score - ((cand_shift**2).sum(-1) / (2.0 * shift_sigma**2))[:, :, None]
        best = score.reshape(b, -1).argmax(1)
        jt, jr = best // 7, best % 7
        idx = torch.arange(b, device=dev)
        rotations, shifts = cand_rot[idx, jr], cand_shift[idx, jt]
        angle_step, shift_step = angle_step / 2, shift_step / 2
    return rotations, shifts
