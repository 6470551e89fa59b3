"""Half-map postprocessing as ``relion_postprocess``: masked FSC, FSC weighting, MTF, B-factor, low-pass.

Every Fourier operation here works on the half transform ``rfftn(map, norm="forward")`` (RELION's
FFTW transform, normalised by the voxel count, so log amplitudes match its Guinier tables), with
RELION's shells (``floor(|k| + 0.5)``) and RELION's continuous radius where it uses one:

* FSC weighting: each shell is multiplied by ``sqrt(2 F / (1 + F))`` with ``F`` the corrected FSC,
  up to the last shell before ``F`` first drops below 1e-4; everything beyond is zeroed.
* MTF: Fourier voxels below Nyquist are divided by the detector MTF, read from a RELION MTF STAR file
  (``rlnResolutionInversePixel``, ``rlnMtfValue``; frequency in 1/pixel of the micrographs, whose
  pixel size is ``mtf_angpix``), interpolated linearly as RELION does.
* Guinier plot: ``ln(mean |F|)`` per shell against ``1/d^2`` (1/A^2). The automatic B-factor is
  ``4 x`` the slope of a straight-line fit over shells with ``autob_highres <= d <= autob_lowres``
  (A); RELION's default ``autob_highres = 0`` fits up to Nyquist, not just to the resolution.
* B-factor: ``F *= exp(-B |k|^2 / 4)`` (|k| in 1/A) inside the Nyquist sphere, zero outside.
* Low-pass: a raised cosine from shell ``round(n apix / d) - 1`` to ``+ 1`` (``edge_shells = 2``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from cryocli.analysis.fsc import (
    GlibcRand,
    MaskedFsc,
    corrected_masked_fsc,
    fsc_tensor,
    particle_fsc,
    relion_resolution_shell,
)
from cryocli.errors import CryocliError
from cryocli.imaging.filters import as_float64_tensor, bfactor_weights, lowpass_weights, map_spectrum, spectrum_to_map
from cryocli.imaging.fourier import rfftn_radius, rfftn_shells, shell_sum
from cryocli.io.star import format_star_list, format_star_loop, star_header


def fsc_weighting(fsc: np.ndarray) -> np.ndarray:
    """Per-shell weights ``sqrt(2F / (1 + F))`` (0 where F <= 0 and for every shell after F first drops below 1e-4)."""
    fsc = np.asarray(fsc, dtype=np.float64)
    low = np.nonzero(fsc < 1e-4)[0]
    last = int(low[0]) - 1 if low.size else len(fsc) - 1
    w = np.sqrt(np.clip(2 * fsc / (1 + fsc), 0.0, None), where=fsc > 0, out=np.zeros_like(fsc))
    w[max(last + 1, 0):] = 0.0
    return w


# --- MTF --------------------------------------------------------------------------------------

@dataclass
class Mtf:
    """A detector MTF: ``frequency`` in 1/pixel of the micrographs and ``value`` at each (both ``(m,)``)."""

    frequency: np.ndarray
    value: np.ndarray


def read_mtf(path: str | Path) -> Mtf:
    """Read a RELION MTF STAR file (columns rlnResolutionInversePixel, rlnMtfValue)."""
    import starfile

    path = Path(path)
    if not path.exists():
        raise CryocliError("MTF file not found", path)
    try:
        blocks = starfile.read(path, always_dict=True)
    except Exception as exc:
        raise CryocliError(f"not a readable STAR file ({exc})", path) from exc
    for df in blocks.values():
        if hasattr(df, "columns") and {"rlnResolutionInversePixel", "rlnMtfValue"} <= set(df.columns):
            freq = df["rlnResolutionInversePixel"].to_numpy(dtype=np.float64)
            value = df["rlnMtfValue"].to_numpy(dtype=np.float64)
            if len(freq) < 2 or np.any(value < 1e-10):
                raise CryocliError("MTF table needs at least 2 rows and positive rlnMtfValue values", path)
            return Mtf(freq, value)
    raise CryocliError("no table with rlnResolutionInversePixel and rlnMtfValue", path)


def mtf_weights(mtf: Mtf, n: int, voxel_size: float, mtf_angpix: float,
                device: torch.device | str | None = None) -> Tensor:
    """The MTF at every half-transform voxel ``(n, n, n//2+1)``; 1 at and beyond Nyquist (RELION leaves those alone).

    Interpolated as RELION does: the bracket index is ``floor(k / step)`` with ``step = (last - first) / rows``,
    values are clamped to the first and last rows, and ``k`` is in 1/A (the table is divided by ``mtf_angpix``).
    """
    res = torch.tensor(mtf.frequency / mtf_angpix, dtype=torch.float64, device=device)
    val = torch.tensor(mtf.value, dtype=torch.float64, device=device)
    m = res.shape[0]
    step = float((res[-1] - res[0]) / m)
    if step < 1e-10:
        raise CryocliError("the resolution column of the MTF file does not increase")
    k = rfftn_radius(n, device) / (n * voxel_size)
    i0 = torch.floor(k / step).long()
    inner = i0.clamp(1, m - 2)
    x0, x1, y0, y1 = res[inner], res[inner + 1], val[inner], val[inner + 1]
    interp = y0 + (y1 - y0) * (k - x0) / (x1 - x0)
    out = torch.where(i0 >= m - 1, val[-1], torch.where(i0 <= 0, val[0], interp))
    return torch.where(k < 1.0 / (2.0 * voxel_size), out, torch.ones_like(out))


# --- Guinier ------------------------------------------------------------------------------------

def guinier_curve(spectrum: Tensor, voxel_size: float) -> tuple[np.ndarray, np.ndarray]:
    """Guinier plot of a half transform ``(n, n, n//2+1)``: ``(1/d^2 in 1/A^2, ln mean |F|)`` per shell 0..n//2.

    A shell whose amplitudes are all zero gets RELION's marker ``-99``.
    """
    n = spectrum.shape[-3]
    shells = rfftn_shells(n, spectrum.device)
    nshell = n // 2 + 1
    total = shell_sum(spectrum.abs(), shells, nshell).cpu().numpy()
    count = shell_sum(torch.ones_like(spectrum.real), shells, nshell).cpu().numpy()
    x = (np.arange(nshell) / (n * voxel_size)) ** 2
    y = np.full(nshell, -99.0)
    ok = total > 0
    y[ok] = np.log(total[ok] / count[ok])
    return x, y


@dataclass
class GuinierFit:
    """Straight line ``ln|F| = intercept + slope / d^2``; ``bfactor = 4 * slope`` (A^2); ``correlation`` is r^2 as RELION reports."""

    slope: float
    intercept: float
    correlation: float
    bfactor: float
    points: int


def fit_guinier(x: np.ndarray, y: np.ndarray, lowres: float = 10.0, highres: float = 0.0) -> GuinierFit:
    """Least-squares line through the Guinier points with ``highres <= d <= lowres`` (A) and ``y > -99``."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    with np.errstate(divide="ignore"):
        d = np.where(x > 0, 1.0 / np.sqrt(np.maximum(x, 1e-300)), np.inf)
    use = (d <= lowres) & (d >= highres) & (y > -99.0)
    if use.sum() < 2:
        raise CryocliError(f"Guinier fit needs at least 2 shells between {lowres} and {highres or 'Nyquist'} A; "
                           "lower --autob-lowres or give --bfactor")
    xs, ys = x[use], y[use]
    mx, my = xs.mean(), ys.mean()
    sxx, syy, sxy = ((xs - mx) ** 2).sum(), ((ys - my) ** 2).sum(), ((xs - mx) * (ys - my)).sum()
    slope = sxy / sxx
    corr = sxy**2 / (sxx * syy) if syy > 0 else 1.0
    return GuinierFit(float(slope), float(my - slope * mx), float(corr), float(4 * slope), int(use.sum()))


def _per_shell(values: np.ndarray, n: int, device: torch.device | str | None) -> Tensor:
    """Spread per-shell ``values`` (shells 0..n//2) over the half transform ``(n, n, n//2+1)``; 0 beyond Nyquist."""
    shells = rfftn_shells(n, device)
    table = torch.zeros(int(shells.max()) + 1, dtype=torch.float64, device=device)
    table[: len(values)] = torch.as_tensor(np.asarray(values, dtype=np.float64), device=device)
    return table[shells]


# --- the whole procedure ----------------------------------------------------------------------

@dataclass
class PostprocessResult:
    """Everything ``relion_postprocess`` reports. Maps are float32 ``(n, n, n)``; curves are per shell 0..n//2."""

    voxel_size: float
    box: int
    map: np.ndarray
    map_masked: np.ndarray | None
    fsc_unmasked: np.ndarray
    fsc_masked: np.ndarray | None
    fsc_random_masked: np.ndarray | None
    fsc_corrected: np.ndarray
    fsc_particle_fraction: np.ndarray | None
    randomize_at: int | None
    resolution: float           # A; 999 when even shell 1 is below 0.143 (RELION's value)
    resolution_shell: int
    bfactor: float              # A^2 applied (0 when none)
    guinier_fit: GuinierFit | None
    low_pass: float | None      # A, the filter applied (None: not filtered)
    mask_fraction: float | None       # fraction of the box with mask > 0.5
    solvent_mask_factor: float | None  # RELION's rlnParticleBoxFractionSolventMask = 0.476 / mask_fraction
    guinier_x: np.ndarray = field(default_factory=lambda: np.zeros(0))
    guinier_original: np.ndarray = field(default_factory=lambda: np.zeros(0))
    guinier_mtf: np.ndarray | None = None
    guinier_weighted: np.ndarray = field(default_factory=lambda: np.zeros(0))
    guinier_sharpened: np.ndarray = field(default_factory=lambda: np.zeros(0))
    warnings: list[str] = field(default_factory=list)


def _check_inputs(half1: Tensor, half2: Tensor, mask: Tensor | None) -> None:
    if half1.shape != half2.shape:
        raise CryocliError(f"half maps differ in shape: {tuple(half1.shape)} vs {tuple(half2.shape)}")
    if mask is not None:
        if mask.shape != half1.shape:
            raise CryocliError(f"mask shape {tuple(mask.shape)} differs from the maps' {tuple(half1.shape)}")
        lo, hi = float(mask.min()), float(mask.max())
        if lo < -1e-6 or hi > 1 + 1e-6:
            raise CryocliError(f"mask values must lie in [0, 1], found {lo:.4g} .. {hi:.4g}")


def postprocess(half1: np.ndarray | Tensor, half2: np.ndarray | Tensor, voxel_size: float,
                mask: np.ndarray | Tensor | None = None, *, bfactor: float | None = None, auto_bfactor: bool = True,
                autob_lowres: float = 10.0, autob_highres: float = 0.0, mtf: Mtf | None = None,
                mtf_angpix: float | None = None, low_pass: float | None = -1.0, randomize_below: float = 0.8,
                randomize_at_A: float | None = None, force_mask: bool = False, fsc_weighting_on: bool = True,
                seed: int = 0, device: torch.device | str | None = None) -> PostprocessResult:
    """Postprocess two half maps ``(n, n, n)`` of voxel size ``voxel_size`` (A) as ``relion_postprocess``.

    ``bfactor`` (A^2) overrides the automatic Guinier fit; ``auto_bfactor=False`` with no ``bfactor``
    applies none. ``low_pass``: resolution in A; negative (default) filters at the final resolution,
    ``None`` or 0 does not filter. ``randomize_at_A`` fixes the phase-randomisation resolution (A).
    The phase randomisation draws RELION's random stream (:class:`~cryocli.analysis.fsc.GlibcRand`)
    seeded with ``seed`` (0 to 2^31 - 1; RELION's ``--random_seed``, default 0).
    """
    a = as_float64_tensor(half1, device)
    b = as_float64_tensor(half2, a.device)
    m = as_float64_tensor(mask, a.device) if mask is not None else None
    _check_inputs(a, b, m)
    n = a.shape[-1]
    warnings: list[str] = []

    unmasked = fsc_tensor(a, b).cpu().numpy()
    masked_fsc: MaskedFsc | None = None
    mask_fraction = solvent_factor = None
    if m is not None:
        mask_fraction = float((m > 0.5).double().mean())
        if mask_fraction <= 0:
            raise CryocliError("the mask has no voxel above 0.5")
        solvent_factor = 0.476 / mask_fraction
        shell = int(voxel_size * n / randomize_at_A) if randomize_at_A else None
        try:
            masked_fsc = corrected_masked_fsc(a, b, m, randomize_below, shell, GlibcRand(seed))
        except ValueError as exc:
            raise CryocliError(str(exc)) from None
        corrected = masked_fsc.corrected
    else:
        corrected = unmasked.copy()

    res_shell = relion_resolution_shell(corrected, 0.143)
    if masked_fsc is not None:
        unmasked_shell = relion_resolution_shell(unmasked, 0.143)
        if unmasked_shell > res_shell:
            if force_mask:
                warnings.append("the unmasked FSC extends beyond the solvent-corrected FSC")
            else:
                warnings.append("the unmasked FSC extends beyond the solvent-corrected FSC: the mask is not used "
                                "for the resolution (pass --force-mask to use it anyway)")
                corrected = unmasked.copy()
                res_shell = unmasked_shell
        elif res_shell >= 0 and masked_fsc.random_masked[res_shell] > 0.1:
            warnings.append("the phase-randomised FSC is above 0.10 at the estimated resolution; use a softer mask")
    resolution = n * voxel_size / res_shell if res_shell > 0 else 999.0

    spec = map_spectrum((a + b) / 2)
    gx, g_orig = guinier_curve(spec, voxel_size)
    g_mtf = None
    if mtf is not None:
        spec = spec / mtf_weights(mtf, n, voxel_size, mtf_angpix or voxel_size, spec.device)
        g_mtf = guinier_curve(spec, voxel_size)[1]
    if fsc_weighting_on:
        spec = spec * _per_shell(fsc_weighting(corrected), n, spec.device)
    g_weighted = guinier_curve(spec, voxel_size)[1]

    fit = None
    applied_b = 0.0
    if bfactor is not None:
        applied_b = float(bfactor)
    elif auto_bfactor:
        fit = fit_guinier(gx, g_weighted, autob_lowres, autob_highres)
        applied_b = fit.bfactor
    if applied_b != 0.0:
        spec = spec * bfactor_weights(n, voxel_size, applied_b, spec.device)
    g_sharp = guinier_curve(spec, voxel_size)[1]

    applied_lp = None
    if low_pass is not None and low_pass != 0:
        applied_lp = resolution if low_pass < 0 else float(low_pass)
        spec = spec * lowpass_weights(n, voxel_size, applied_lp, 2, spec.device)
    out = spectrum_to_map(spec, n)
    out_np = out.float().cpu().numpy()
    masked_map = (out * m).float().cpu().numpy() if m is not None else None

    return PostprocessResult(
        voxel_size=voxel_size, box=n, map=out_np, map_masked=masked_map, fsc_unmasked=unmasked,
        fsc_masked=masked_fsc.masked if masked_fsc else None,
        fsc_random_masked=masked_fsc.random_masked if masked_fsc else None, fsc_corrected=corrected,
        fsc_particle_fraction=particle_fsc(unmasked, solvent_factor) if solvent_factor else None,
        randomize_at=masked_fsc.randomize_at if masked_fsc else None, resolution=float(resolution),
        resolution_shell=res_shell, bfactor=applied_b, guinier_fit=fit, low_pass=applied_lp,
        mask_fraction=mask_fraction, solvent_mask_factor=solvent_factor, guinier_x=gx, guinier_original=g_orig,
        guinier_mtf=g_mtf, guinier_weighted=g_weighted, guinier_sharpened=g_sharp, warnings=warnings)


def postprocess_star_text(result: PostprocessResult, half1_name: str, half2_name: str, map_name: str,
                          mask_name: str | None, masked_map_name: str | None, command: str = "postprocess") -> str:
    """``postprocess.star`` with RELION's ``data_general``, ``data_fsc`` and ``data_guinier`` tables and labels."""
    n, apix = result.box, result.voxel_size
    general: dict[str, object] = {
        "rlnFinalResolution": result.resolution,
        "rlnBfactorUsedForSharpening": result.bfactor,
        "rlnUnfilteredMapHalf1": half1_name,
        "rlnUnfilteredMapHalf2": half2_name,
        "rlnPostprocessedMap": map_name,
    }
    if mask_name is not None and result.randomize_at:
        general["rlnParticleBoxFractionSolventMask"] = result.solvent_mask_factor
        general["rlnMaskName"] = mask_name
        general["rlnRandomiseFrom"] = n * apix / result.randomize_at
        general["rlnPostprocessedMapMasked"] = masked_map_name
    if result.guinier_fit is not None:
        general["rlnFittedSlopeGuinierPlot"] = result.guinier_fit.slope
        general["rlnFittedInterceptGuinierPlot"] = result.guinier_fit.intercept
        general["rlnCorrelationFitGuinierPlot"] = result.guinier_fit.correlation

    shells = np.arange(n // 2 + 1)
    res_a = np.where(shells > 0, n * apix / np.maximum(shells, 1), 999.0)
    fsc: dict[str, Sequence[object] | np.ndarray] = {"rlnSpectralIndex": shells, "rlnResolution": 1.0 / res_a,
                              "rlnAngstromResolution": res_a}
    if result.fsc_masked is not None:
        # Set together with fsc_masked: all three come from the mask (see postprocess()).
        assert result.fsc_particle_fraction is not None and result.fsc_random_masked is not None
        fsc["rlnFourierShellCorrelationCorrected"] = result.fsc_corrected
        fsc["rlnFourierShellCorrelationParticleMaskFraction"] = result.fsc_particle_fraction
        fsc["rlnFourierShellCorrelationUnmaskedMaps"] = result.fsc_unmasked
        fsc["rlnFourierShellCorrelationMaskedMaps"] = result.fsc_masked
        fsc["rlnCorrectedFourierShellCorrelationPhaseRandomizedMaskedMaps"] = result.fsc_random_masked
    else:
        fsc["rlnFourierShellCorrelationUnmaskedMaps"] = result.fsc_corrected

    guinier: dict[str, Sequence[object] | np.ndarray] = {"rlnResolutionSquared": result.guinier_x,
                                  "rlnLogAmplitudesOriginal": result.guinier_original}
    if result.guinier_mtf is not None:
        guinier["rlnLogAmplitudesMTFCorrected"] = result.guinier_mtf
    guinier["rlnLogAmplitudesWeighted"] = result.guinier_weighted
    guinier["rlnLogAmplitudesSharpened"] = result.guinier_sharpened
    if result.guinier_fit is not None:
        guinier["rlnLogAmplitudesIntercept"] = np.full(len(result.guinier_x), result.guinier_fit.intercept)

    return (star_header(command) + format_star_list("general", general) + "# version 30001\n\n"
            + format_star_loop("fsc", fsc) + "# version 30001\n\n" + format_star_loop("guinier", guinier))


def auto_mask_from_halves(half1: np.ndarray | Tensor, half2: np.ndarray | Tensor, voxel_size: float,
                          threshold: float | None = None, extend: float = 3.0, soft_edge: float = 6.0,
                          lowpass: float = 15.0) -> np.ndarray:
    """``cryocli postprocess --auto-mask``'s mask of two half maps ``(n, n, n)``: ``relion_mask_create`` on their
    average, low-passed to ``lowpass`` A, thresholded (default: 10% of the low-passed maximum), extended by
    ``extend`` voxels, with a raised-cosine edge of ``soft_edge`` voxels. Returns float64 ``(n, n, n)`` in [0, 1]."""
    from cryocli.imaging.filters import lowpass_filter
    from cryocli.imaging.masks import auto_mask

    avg = (as_float64_tensor(half1) + as_float64_tensor(half2)) / 2
    if threshold is None:
        ref = lowpass_filter(avg, voxel_size, lowpass) if lowpass > 0 else avg
        # RELION's fixed 0.02 only suits maps on its usual scale; 10% of the maximum clears the noise
        # of typical half-map averages after the low-pass.
        threshold = 0.1 * float(ref.max())
    mask = auto_mask(avg, voxel_size, threshold, extend, soft_edge, lowpass if lowpass > 0 else None)
    if float(mask.max()) <= 0.5:
        raise CryocliError(f"the automatic mask is empty: no voxel reaches the threshold {threshold:.4g}")
    return mask.cpu().numpy()
