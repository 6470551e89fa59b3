"""The CTF against RELION's formula (scalar by scalar) and against relion_project's CTF images (set_3j9g)."""

from __future__ import annotations

import dataclasses
import math

import mrcfile
import numpy as np
import pytest
import starfile
import torch

from cryocli.geometry.rotations import euler_to_matrix
from cryocli.imaging.ctf import CTFParams, compute_ctf, ctf_at
from cryocli.imaging.fourier import image_to_rfft
from cryocli.imaging.projector import Projector
from cryocli.imaging.shifts import shift_from_center
from cryocli.io.mrc import read_map
from tests.conftest import DEVICES, RELION_SET, need


def _disc(n: int, r_max: float) -> torch.Tensor:
    """Boolean ``(n, n // 2 + 1)``: half-transform pixels with ``|k| <= r_max`` Fourier pixels."""
    ky = torch.fft.fftfreq(n, d=1.0 / n)
    kx = torch.fft.rfftfreq(n, d=1.0 / n)
    return (ky[:, None] ** 2 + kx[None, :] ** 2) <= r_max * r_max


def relion_ctf_scalar(kx: float, ky: float, du: float, dv: float, angle_deg: float, kv: float, cs_mm: float,
                      q0: float, phase_deg: float, bfac: float, scale: float) -> float:
    """RELION's CTF::getCTF written out for one frequency (kx, ky in 1/A), independently of cryocli."""
    volts = kv * 1000.0
    lam = 12.2643247 / math.sqrt(volts * (1.0 + volts * 0.978466e-6))
    u2 = kx * kx + ky * ky
    theta = math.atan2(ky, kx)
    az = math.radians(angle_deg)
    # RELION: deltaf = defocus_average + defocus_deviation * cos(2 (theta - azimuth))
    avg, dev = -(du + dv) / 2.0, -(du - dv) / 2.0
    deltaf = avg + dev * math.cos(2.0 * (theta - az))
    k1 = math.pi / 2.0 * 2.0 * lam
    k2 = math.pi / 2.0 * cs_mm * 1e7 * lam**3
    k3 = math.atan(q0 / math.sqrt(1.0 - q0 * q0))
    k4 = -bfac / 4.0
    k5 = math.radians(phase_deg)
    gamma = k1 * deltaf * u2 + k2 * u2 * u2 - k5 - k3
    return -math.sin(gamma) * math.exp(k4 * u2) * scale


CASES = [
    # du, dv, angle, kV, Cs, Q0, phase, B, scale
    (15000.0, 14200.0, 33.0, 300.0, 2.7, 0.1, 0.0, 0.0, 1.0),
    (8000.0, 9500.0, 151.0, 200.0, 0.01, 0.07, 90.0, 50.0, 0.8),
    (24000.0, 23000.0, -40.0, 300.0, 2.0, 0.15, 37.5, -20.0, 1.0),
    (500.0, 500.0, 0.0, 100.0, 1.6, 0.2, 180.0, 120.0, 1.3),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES)
def test_ctf_matches_relion_formula_scalar_by_scalar(case: tuple[float, ...], device: str):
    rng = np.random.default_rng(1)
    kx = rng.uniform(-0.25, 0.25, 40)
    ky = rng.uniform(-0.25, 0.25, 40)
    kx[:3], ky[:3] = [0.0, 0.1, 0.0], [0.0, 0.0, -0.2]
    params = CTFParams.build(*case).to(device)
    got = ctf_at(params, torch.tensor(kx).to(device), torch.tensor(ky).to(device)).cpu().numpy()[0]
    want = np.array([relion_ctf_scalar(a, b, *case) for a, b in zip(kx, ky)])
    np.testing.assert_allclose(got, want, atol=1e-9, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_ctf_zero_frequency_is_plus_q0(device: str):
    params = CTFParams.build(12000.0, 11000.0, 10.0, 300.0, 2.7, 0.1).to(device)
    zero = torch.zeros(1, dtype=torch.float64).to(device)
    assert ctf_at(params, zero, zero).cpu().item() == pytest.approx(0.1, abs=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_compute_ctf_grid_uses_fft_frequencies(device: str):
    """compute_ctf on the half-transform grid equals the scalar formula at (rfftfreq, fftfreq) / apix."""
    n, apix = 16, 1.7
    case = CASES[1]
    grid = compute_ctf(CTFParams.build(*case).to(device), n, apix, device=device, dtype=torch.float64)[0].cpu().numpy()
    for iy in range(n):
        for ix in range(n // 2 + 1):
            ky = (iy if iy < (n + 1) // 2 else iy - n) / (n * apix)
            kx = ix / (n * apix)
            assert grid[iy, ix] == pytest.approx(relion_ctf_scalar(kx, ky, *case), abs=1e-9)


@pytest.fixture(scope="module")
def clean_set():
    """Pure projections of map.mrc (cryocli's projector, validated in test_projector) and RELION's clean images."""
    star = starfile.read(need(RELION_SET / "clean" / "clean.star"))
    optics, parts = star["optics"], star["particles"]
    apix = float(optics["rlnImagePixelSize"].iloc[0])
    vol = torch.from_numpy(read_map(need(RELION_SET / "map.mrc")).data.copy()).double()

    def col(name: str) -> np.ndarray:
        return parts[name].to_numpy(dtype=np.float64, copy=True)

    rot = euler_to_matrix(torch.tensor(col("rlnAngleRot")), torch.tensor(col("rlnAngleTilt")),
                          torch.tensor(col("rlnAnglePsi"))).double()
    origins = torch.tensor(np.stack([col("rlnOriginXAngst"), col("rlnOriginYAngst")], axis=1))
    pure = shift_from_center(Projector(vol).project(rot), origins, apix)
    ctf = CTFParams.build(col("rlnDefocusU"), col("rlnDefocusV"), col("rlnDefocusAngle"),
                          float(optics["rlnVoltage"].iloc[0]), float(optics["rlnSphericalAberration"].iloc[0]),
                          float(optics["rlnAmplitudeContrast"].iloc[0]), col("rlnPhaseShift"), col("rlnCtfBfactor"))
    images = torch.from_numpy(mrcfile.read(need(RELION_SET / "clean" / "clean.mrcs")).astype(np.float64))
    return pure, image_to_rfft(images), ctf, apix


def _ctf_error(clean_set, ctf: CTFParams, device: str) -> torch.Tensor:
    """Per image: max |FFT(clean) / FFT(pure) - CTF| over pixels below 0.95 Nyquist with usable signal (the CTF
    computed on ``device``, the comparison on the CPU)."""
    pure, data, _, apix = clean_set
    n = data.shape[-2]
    ratio = (data / pure).real
    amp = pure.abs()
    usable = (amp > 1e-3 * amp.amax(dim=(1, 2), keepdim=True)) & _disc(n, 0.95 * n / 2)
    model = compute_ctf(ctf.to(device), n, apix, device=device, dtype=torch.float64).cpu()
    return torch.where(usable, (ratio - model).abs(), torch.zeros_like(model)).amax(dim=(1, 2))


@pytest.mark.parametrize("device", DEVICES)
def test_ctf_reproduces_relion_project_images(clean_set, device: str):
    """relion_project's CTF (clean.mrcs / pure projection) equals compute_ctf on every usable pixel of 600 images."""
    err = _ctf_error(clean_set, clean_set[2], device)
    assert err.shape[0] == 600
    # Measured: max 1.9e-4 (float32 stack), median 2.5e-5.
    assert float(err.max()) < 1e-3


@pytest.mark.parametrize("device", DEVICES)
def test_swapped_or_negated_astigmatism_is_detected(clean_set, device: str):
    """The usual mistakes change the CTF visibly: the same check fails by a wide margin."""
    ctf = clean_set[2]
    swapped = dataclasses.replace(ctf, defocus_u=ctf.defocus_v, defocus_v=ctf.defocus_u)
    negated = dataclasses.replace(ctf, defocus_angle=-ctf.defocus_angle)
    # Measured medians over the 600 images: 0.29 (U/V swapped), 0.16 (angle negated) vs 2.5e-5.
    assert float(_ctf_error(clean_set, swapped, device).median()) > 0.1
    assert float(_ctf_error(clean_set, negated, device).median()) > 0.05


@pytest.mark.parametrize("device", DEVICES)
def test_clean_image_correlation_drops_for_wrong_ctf(clean_set, device: str):
    """Fourier correlation (Nyquist/2 .. Nyquist) per image: exact CTF > 0.99999; wrong CTFs lose correlation."""
    pure, data, ctf, apix = clean_set
    n = data.shape[-2]
    band = _disc(n, n / 2 - 0.5) & ~_disc(n, n / 4)

    def corr(c: CTFParams) -> torch.Tensor:
        a = (pure * compute_ctf(c.to(device), n, apix, device=device, dtype=torch.float64).cpu())[:, band]
        b = data[:, band]
        return (a * b.conj()).real.sum(-1) / torch.sqrt((a.abs() ** 2).sum(-1) * (b.abs() ** 2).sum(-1))

    right = corr(ctf)
    swapped = corr(dataclasses.replace(ctf, defocus_u=ctf.defocus_v, defocus_v=ctf.defocus_u))
    negated = corr(dataclasses.replace(ctf, defocus_angle=-ctf.defocus_angle))
    assert float(right.min()) > 0.99999
    # The astigmatism of this set is small (100-800 A on 1-2.5 um), so the band correlation drops modestly
    # (measured: swapped min 0.956 / median 0.989, negated min 0.963 / median 0.997) but for every image
    # with astigmatism off the axes; the per-pixel check above is the sharp one.
    assert bool((swapped < right - 1e-6).all())
    assert float(swapped.min()) < 0.97 and float(negated.min()) < 0.975
