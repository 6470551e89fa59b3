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
from cryocli.engines.common.reconstruct import DirectFourierReconstructor
from cryocli.engines.result import GOLD_STANDARD, SHARED_POSES, MapFilter, Reconstruction
from cryocli.imaging.filters import lowpass_weights, map_spectrum, spectrum_to_map
from cryocli.imaging.fourier import fourier_crop_images, rfftn_radius
from cryocli.imaging.masks import soft_sphere
from cryocli.io.dataset import ParticleStack

#: Default mask diameter as a fraction of the box, as refine's default particle diameter.
DIAMETER_FRACTION = 0.8
#: Soft edge of the solvent mask, Angstrom.
MASK_EDGE_A = 10.0
#: Shells a viewing map always keeps, even when its FSC shows no reproducible signal (a failed run).
MIN_SHELLS = 3


def _finite(fsc: np.ndarray) -> np.ndarray:
    """The FSC as float64 with undefined shells (no data in a half: 0 / 0) read as no correlation, and the
    zero-frequency shell (the maps' means, whose sign is arbitrary) as 1, so the mean is kept."""
    out = np.nan_to_num(np.asarray(fsc, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    out[:1] = 1.0
    return out


def viewing_lowpass(fsc: np.ndarray, n: int, voxel_size: float) -> tuple[float, bool]:
    """The low-pass of the viewing map (Angstrom) and whether the FSC supports it: the FSC = 0.143 crossing,
    or, when the FSC never stays above 0.143 past shell :data:`MIN_SHELLS` (no reproducible signal), the
    resolution of that shell, so that the map still shows its lowest frequencies (flagged ``False``)."""
    crossing = threshold_crossing(_finite(fsc), n, voxel_size, 0.143)
    if crossing.shell >= MIN_SHELLS:
        return float(crossing.resolution), True
    return float(n * voxel_size / MIN_SHELLS), False


def filter_for_viewing(volume: Tensor, voxel_size: float, fsc: np.ndarray, mask_diameter_A: float) -> Tensor:
    """``volume`` ``(n, n, n)`` weighted by ``sqrt(2F / (1 + F))`` per shell, low-passed at the FSC = 0.143
    crossing (raised cosine over 2 shells), then multiplied by a soft sphere of ``mask_diameter_A`` Angstrom
    (edge :data:`MASK_EDGE_A`). ``fsc``: ``(n // 2 + 1,)``. When the FSC shows no reproducible signal
    (:func:`viewing_lowpass`), the map is only low-passed to shell :data:`MIN_SHELLS`, unweighted. Returns
    float32 on the volume's device."""
    v = volume.detach().to(torch.float64)
    n = v.shape[-1]
    fsc = _finite(fsc)[: n // 2 + 1]
    resolution, supported = viewing_lowpass(fsc, n, voxel_size)
    weight = lowpass_weights(n, voxel_size, resolution, device=v.device) * (rfftn_radius(n, v.device) <= n // 2)
    if supported:
        shells = torch.clamp(torch.floor(rfftn_radius(n, v.device) + 0.5).long(), max=n // 2)
        weight = weight * torch.as_tensor(fsc_weighting(fsc), device=v.device)[shells]
    filtered = spectrum_to_map(map_spectrum(v) * weight, n)
    radius = 0.5 * mask_diameter_A / voxel_size
    edge = MASK_EDGE_A / voxel_size
    mask = soft_sphere(n, min(radius, n / 2 - edge), edge=edge, device=v.device, dtype=torch.float64)
    return (filtered * mask).to(torch.float32)


def shared_pose_fsc(stack: ParticleStack, rows: np.ndarray, rotations: Tensor, origins_angstrom: Tensor,
                    subset: np.ndarray, box: int, use_ctf: bool, device: torch.device,
                    batch_size: int = 256) -> np.ndarray:
    """FSC ``(box // 2 + 1,)`` between direct Fourier reconstructions of the two half sets at the run's poses.

    stack: the input particles; rows ``(N,)``: the rows the run used; rotations ``(N, 3, 3)`` and origins
    ``(N, 2)`` Angstrom: the run's poses of those rows; subset ``(N,)``: their half set (1 or 2); box: the run's
    (Fourier-cropped) box, at which the particles are reconstructed, streamed from the stacks in batches.
    """
    pixel = stack.pixel_size * stack.box / box
    ctf = stack.ctf_params if use_ctf else None
    recs = [DirectFourierReconstructor(box, pixel, device=device) for _ in (1, 2)]
    rot = rotations.to(torch.float32)
    origins = origins_angstrom.to(torch.float32)
    for start in range(0, len(rows), batch_size):
        chunk = np.arange(start, min(len(rows), start + batch_size))
        images = stack.images(rows[chunk]).to(device)
        if box != stack.box:
            images = fourier_crop_images(images, box)
        for half, rec in enumerate(recs, start=1):
            mine = chunk[subset[chunk] == half]
            if mine.size == 0:
                continue
            local = torch.as_tensor(mine - start)
            picked = torch.as_tensor(rows[mine])
            rec.add(images[local.to(device)], rot[torch.as_tensor(mine)], origins[torch.as_tensor(mine)],
                    None if ctf is None else ctf.index(picked))
    half1, half2 = (rec.reconstruct() for rec in recs)
    return fsc_curve(half1, half2)[: box // 2 + 1]


def with_viewing_map(result: Reconstruction, stack: ParticleStack, mask_diameter_A: float | None,
                     use_ctf: bool, seed: int, device: torch.device) -> Reconstruction:
    """``result`` with ``volume`` filtered for viewing (:func:`filter_for_viewing`) and the fitted volume kept as
    ``unfiltered_volume``; the FSC is the gold-standard one when the result has it, else :func:`shared_pose_fsc`
    on the ``rlnRandomSubset`` halves (drawn with ``seed`` when absent; alternate rows when the file's leave one
    half with fewer than 2 of the run's particles). ``mask_diameter_A`` None: 0.8 x box."""
    n, vs = result.box, result.voxel_size
    diameter = mask_diameter_A if mask_diameter_A else DIAMETER_FRACTION * n * vs
    if result.gold_standard_fsc is not None:
        fsc, kind = np.asarray(result.gold_standard_fsc), GOLD_STANDARD
    else:
        assert result.particle_rows is not None
        rows = result.particle_rows
        subset = stack.ensure_half_sets(seed).numpy()[rows]
        if min(int((subset == 1).sum()), int((subset == 2).sum())) < 2:
            subset = 1 + np.arange(len(rows)) % 2  # the file's half sets leave one empty: alternate the rows
        fsc = shared_pose_fsc(stack, rows, result.rotations, result.origins_angstrom, subset, n, use_ctf, device)
        kind = SHARED_POSES
    filtered = filter_for_viewing(result.volume.to(device), vs, fsc, diameter).cpu()
    resolution, supported = viewing_lowpass(fsc, n, vs)
    result.unfiltered_volume = result.volume
    result.volume = filtered
    result.map_filter = MapFilter(kind, resolution, float(diameter), _finite(fsc), supported)
    return result
