"""The map a user opens: an ab initio volume filtered to what the run supports, solvent outside flattened.

A decoder's volume is fitted up to Nyquist, where most of what it holds is noise; written as fitted, it looks
like a cube of noise in ChimeraX. RELION's InitialModel map is regularised by tau^2 and solvent-flattened,
cryoSPARC low-passes its ab initio maps. cryocli writes ``map.mrc`` as:

1. weighted per Fourier shell by ``sqrt(2 FSC / (1 + FSC))`` (Rosenthal & Henderson's C_ref, the figure of
   merit RELION's postprocess applies) and cut beyond the FSC = 0.143 crossing with a raised-cosine edge;
2. multiplied by a soft spherical mask of the particle diameter (solvent flattening).

The FSC is the gold-standard one when the run has independent half runs (``--halves``). Otherwise it is the
FSC between the direct Fourier reconstructions of the two ``rlnRandomSubset`` half sets at the run's final
poses: those poses were all found against one shared map, so that FSC over-estimates the resolution (the
halves share the alignment's model bias). It only sets the filter of the viewing map, is labelled as such in
the MRC header and the summary, and is never reported as the run's resolution. The unfiltered volume is
written as ``map_unfil.mrc`` (RELION's naming).

Units: Angstrom for resolutions, voxel sizes and diameters; maps ``(n, n, n)`` ``[z, y, x]``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from cryocli.analysis.fsc import fsc_curve, threshold_crossing
from cryocli.analysis.postprocess import fsc_weighting
from cryocli.engines.common.particles_reconstruct import reconstruct_sets
from cryocli.engines.result import GOLD_STANDARD, SHARED_POSES, MapFilter, Reconstruction
from cryocli.imaging.filters import lowpass_weights, map_spectrum, spectrum_to_map
from cryocli.imaging.fourier import fourier_resample_volume, rfftn_radius
from cryocli.imaging.masks import soft_sphere
from cryocli.io.dataset import ParticleStack
from cryocli.io.star import ParticleTable

#: Default mask diameter as a fraction of the box, as refine's default particle diameter.
DIAMETER_FRACTION = 0.8
#: Soft edge of the solvent mask, Angstrom.
MASK_EDGE_A = 10.0


def filter_for_viewing(volume: Tensor, voxel_size: float, fsc: np.ndarray, mask_diameter_A: float) -> Tensor:
    """``volume`` ``(n, n, n)`` weighted by ``sqrt(2F / (1 + F))`` per shell, low-passed at the FSC = 0.143
    crossing (raised cosine over 2 shells), then multiplied by a soft sphere of ``mask_diameter_A`` Angstrom
    (edge :data:`MASK_EDGE_A`). ``fsc``: ``(n // 2 + 1,)``. Returns float32 on the volume's device."""
    v = volume.detach().to(torch.float64)
    n = v.shape[-1]
    fsc = np.asarray(fsc, dtype=np.float64)[: n // 2 + 1]
    resolution = threshold_crossing(fsc, n, voxel_size, 0.143).resolution
    shells = torch.clamp(torch.floor(rfftn_radius(n, v.device) + 0.5).long(), max=n // 2)
    weight = torch.as_tensor(fsc_weighting(fsc), device=v.device)[shells]
    weight = weight * (rfftn_radius(n, v.device) <= n // 2)
    weight = weight * lowpass_weights(n, voxel_size, resolution, device=v.device)
    filtered = spectrum_to_map(map_spectrum(v) * weight, n)
    radius = 0.5 * mask_diameter_A / voxel_size
    edge = MASK_EDGE_A / voxel_size
    mask = soft_sphere(n, min(radius, n / 2 - edge), edge=edge, device=v.device, dtype=torch.float64)
    return (filtered * mask).to(torch.float32)


def shared_pose_fsc(table: ParticleTable, datadir: str | None, rows: np.ndarray, rotations: Tensor,
                    origins_angstrom: Tensor, subset: np.ndarray, box: int, use_ctf: bool,
                    device: torch.device) -> np.ndarray:
    """FSC ``(box // 2 + 1,)`` between direct Fourier reconstructions of the two half sets at the run's poses.

    table: the input particles; rows ``(N,)``: the rows the run used; rotations ``(N, 3, 3)`` and origins
    ``(N, 2)`` Angstrom: the run's poses of those rows; subset ``(N,)``: their half set (1 or 2); box: the
    run's (cropped) box; the FSC is computed on the data's box and truncated to the shells of ``box`` (the
    same frequencies: the field of view is the same).
    """
    from cryocli.geometry.rotations import matrix_to_euler

    rot, tilt, psi = matrix_to_euler(rotations.detach().cpu().to(torch.float64))
    posed = table.subset(rows).with_poses(rot.numpy(), tilt.numpy(), psi.numpy(),
                                          origins_angstrom.detach().cpu().to(torch.float64).numpy())
    stack = ParticleStack(posed, datadir)
    sets = [np.flatnonzero(subset == h) for h in (1, 2)]
    maxres = 2.0 * stack.pixel_size * stack.box / box  # the run's Nyquist
    half1, half2 = reconstruct_sets(stack, sets, use_ctf=use_ctf, maxres=maxres, device=device)
    if stack.box != box:
        half1, half2 = fourier_resample_volume(half1, box), fourier_resample_volume(half2, box)
    return fsc_curve(half1, half2)[: box // 2 + 1]


def with_viewing_map(result: Reconstruction, table: ParticleTable, stack: ParticleStack, mask_diameter_A: float | None,
                     use_ctf: bool, seed: int, device: torch.device) -> Reconstruction:
    """``result`` with ``volume`` filtered for viewing (:func:`filter_for_viewing`) and the fitted volume kept as
    ``unfiltered_volume``; the FSC is the gold-standard one when the result has it, else :func:`shared_pose_fsc`
    on the ``rlnRandomSubset`` halves (drawn with ``seed`` when absent). ``mask_diameter_A`` None: 0.8 x box."""
    n, vs = result.box, result.voxel_size
    diameter = mask_diameter_A if mask_diameter_A else DIAMETER_FRACTION * n * vs
    if result.gold_standard_fsc is not None:
        fsc, kind = np.asarray(result.gold_standard_fsc), GOLD_STANDARD
    else:
        assert result.particle_rows is not None
        rows = result.particle_rows
        subset = stack.ensure_half_sets(seed).numpy()[rows]
        fsc = shared_pose_fsc(table, stack.table.datadir, rows, result.rotations, result.origins_angstrom, subset, n,
                              use_ctf, device)
        kind = SHARED_POSES
    filtered = filter_for_viewing(result.volume.to(device), vs, fsc, diameter).cpu()
    resolution = threshold_crossing(np.asarray(fsc, dtype=np.float64), n, vs, 0.143).resolution
    result.unfiltered_volume = result.volume
    result.volume = filtered
    result.map_filter = MapFilter(kind, float(resolution), float(diameter), np.asarray(fsc, dtype=np.float64))
    return result
