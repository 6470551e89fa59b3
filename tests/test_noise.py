"""SNR definitions and noise: checked against RELION's own clean/noisy pair and by measuring spectra."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tests.conftest import ASPIRE, DEVICES, RELION_SET, need
from cryocli.errors import CryocliError
from cryocli.imaging.fourier import fourier_crop_images
from cryocli.imaging.noise import (add_white_noise, coloured_noise, estimate_snr, noise_sigma_for_snr, parse_snr,
                                   radial_power_spectrum, signal_variances)
from cryocli.io.mrc import open_stack, stack_images


def _stack(path) -> torch.Tensor:
    with open_stack(need(path)) as mrc:
        count = mrc.data.shape[0]
        return torch.from_numpy(stack_images(mrc, np.arange(count))).double()


@pytest.fixture(scope="module")
def relion_pair() -> tuple[torch.Tensor, torch.Tensor]:
    """600 RELION images (64 px, 4.4 A/px): projections x CTF, and the same plus RELION's white noise."""
    return _stack(RELION_SET / "clean" / "clean.mrcs"), _stack(RELION_SET / "noisy" / "noisy.mrcs")


@pytest.mark.parametrize("text, expected", [
    ("0.1", 0.1), (" 0.5 ", 0.5), ("1e-2", 0.01), ("2", 2.0), (".25", 0.25),
    ("-10dB", 0.1), ("-10 dB", 0.1), ("-10 db", 0.1), ("0dB", 1.0), ("+20dB", 100.0), ("3 dB", 10 ** 0.3),
    ("-3.5dB", 10 ** -0.35),
])
def test_parse_snr_values(text: str, expected: float) -> None:
    assert parse_snr(text) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("text", ["inf", "INF", "Infinity"])
def test_parse_snr_infinite(text: str) -> None:
    assert parse_snr(text) == math.inf


@pytest.mark.parametrize("text", ["", "abc", "-0.1", "0", "0.0", "nan", "10 dBm", "dB", "0.1.2", "infdB",
                                  "1/10", "1e400", "1e400dB"])
def test_parse_snr_rejects(text: str) -> None:
    with pytest.raises(CryocliError):
        parse_snr(text)


@pytest.mark.parametrize("device", DEVICES)
def test_snr_definition_matches_the_relion_reference_set(relion_pair, device: str) -> None:
    """The RELION set was made at SNR 0.2 with this definition (README: achieved 0.2000, noise sd 3.560272e-3)."""
    clean, noisy = relion_pair
    assert estimate_snr(clean.to(device), noisy.to(device)) == pytest.approx(0.2000, abs=5e-4)
    sigma = noise_sigma_for_snr(signal_variances(clean.to(device)), 0.2)
    realised = float((noisy - clean).std())
    assert sigma == pytest.approx(3.560272e-3, rel=1e-3)
    assert realised == pytest.approx(sigma, rel=1e-3)


def _clean_32px(clean: torch.Tensor) -> torch.Tensor:
    """2,000 clean 32-px images: the centres of the RELION projections, in four 90-degree orientations."""
    centre = clean[:, 16:48, 16:48]
    return torch.cat([torch.rot90(centre, k, dims=(-2, -1)) for k in range(4)])[:2000]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("snr", [0.05, 1.0])
def test_white_noise_reaches_the_requested_snr(relion_pair, snr: float, device: str) -> None:
    clean = _clean_32px(relion_pair[0])
    assert clean.shape == (2000, 32, 32)
    sigma = noise_sigma_for_snr(signal_variances(clean.to(device)), snr)
    # add_white_noise draws on the images' device, so its generator lives there (on the CPU: the same stream as ever).
    noisy = add_white_noise(clean.to(device), sigma, torch.Generator(device=device).manual_seed(7))
    achieved = estimate_snr(clean.to(device), noisy)
    assert abs(achieved / snr - 1) < 0.02
    noise = noisy.cpu() - clean
    assert abs(float(noise.mean())) < 5 * sigma / math.sqrt(noise.numel())
    spectrum = radial_power_spectrum(noise.to(device)).cpu()
    assert torch.allclose(spectrum, torch.full((17,), sigma**2, dtype=noise.dtype), rtol=0.1)


@pytest.mark.parametrize("device", DEVICES)
def test_white_noise_is_reproducible_and_inf_snr_is_clean(relion_pair, device: str) -> None:
    clean = relion_pair[0][:10].to(device)
    a = add_white_noise(clean, 1e-3, torch.Generator(device=device).manual_seed(3)).cpu()
    b = add_white_noise(clean, 1e-3, torch.Generator(device=device).manual_seed(3)).cpu()
    c = add_white_noise(clean, 1e-3, torch.Generator(device=device).manual_seed(4)).cpu()
    assert torch.equal(a, b) and not torch.equal(a, c)
    sigma = noise_sigma_for_snr(signal_variances(clean), parse_snr("inf"))
    assert sigma == 0.0
    assert torch.equal(add_white_noise(clean, sigma).cpu(), clean.cpu())
    assert estimate_snr(clean, clean) == math.inf


def _real_particle_spectrum(n: int) -> torch.Tensor:
    """Radial power spectrum of 17 real EMPIAR-10017 particles (200 px) Fourier-cropped to ``n`` px."""
    particles = _stack(ASPIRE / "sample.mrcs")
    return radial_power_spectrum(fourier_crop_images(particles, n))


def _steep_spectrum(n: int) -> torch.Tensor:
    """Three decades of fall-off from shell 0 to Nyquist, like a low-passed signal over a detector floor."""
    k = torch.arange(n // 2 + 1, dtype=torch.float64)
    return 1e-3 + torch.exp(-((k / (0.25 * n)) ** 2) * 4.6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n, kind", [(32, "real"), (33, "real"), (32, "steep")])
def test_coloured_noise_has_the_requested_spectrum(n: int, kind: str, device: str) -> None:
    target = _real_particle_spectrum(n) if kind == "real" else _steep_spectrum(n)
    assert float(target.max() / target.min()) > 5  # a genuinely coloured spectrum
    # coloured_noise draws on the spectrum's device, so its generator lives there (on the CPU: the same stream).
    noise = coloured_noise((4000, n, n), target.to(device), torch.Generator(device=device).manual_seed(11))
    assert noise.shape == (4000, n, n) and noise.dtype == target.dtype
    measured = radial_power_spectrum(noise).cpu()
    noise = noise.cpu()
    assert torch.all((measured / target - 1).abs() < 0.1)
    # Parseval: the pixel variance is the mean of the spectrum over the Fourier plane.
    full_plane = torch.fft.fftfreq(n, dtype=torch.float64)
    radius = torch.sqrt(full_plane[:, None] ** 2 + full_plane[None, :] ** 2) * n
    expected_var = float(target[torch.round(radius).long().clamp(max=n // 2)].mean())
    assert float(noise.var()) == pytest.approx(expected_var, rel=0.03)


@pytest.mark.parametrize("device", DEVICES)
def test_flat_spectrum_is_white_noise_of_that_variance(device: str) -> None:
    sigma = 0.7
    noise = coloured_noise((2000, 32, 32), torch.full((17,), sigma**2, dtype=torch.float64).to(device),
                           torch.Generator(device=device).manual_seed(5)).cpu()
    assert float(noise.std()) == pytest.approx(sigma, rel=0.01)
    # White: neighbouring pixels uncorrelated.
    corr = float((noise[:, :, 1:] * noise[:, :, :-1]).mean() / noise.var())
    assert abs(corr) < 0.01


@pytest.mark.parametrize("device", DEVICES)
def test_coloured_noise_rejects_bad_spectra(device: str) -> None:
    with pytest.raises(CryocliError):
        coloured_noise((2, 32, 32), torch.ones(16).to(device))
    with pytest.raises(CryocliError):
        coloured_noise((2, 32, 32), -torch.ones(17).to(device))
    with pytest.raises(CryocliError):
        coloured_noise((2, 32, 16), torch.ones(17).to(device))


@pytest.mark.parametrize("text, words", [("0", "--snr 0: the SNR must be positive"),
                                         ("-0.1", "--snr -0.1: the SNR must be positive"),
                                         ("loud", "--snr loud: expected the SNR as a positive number"),
                                         ("", "--snr '': expected the SNR as a positive number"),
                                         ("1e400dB", "--snr 1e400dB: out of range"),
                                         ("4000dB", "--snr 4000dB: out of range")])
def test_parse_snr_errors_name_the_option(text: str, words: str) -> None:
    """The message names the flag the value came from, as every other bad option value's does."""
    with pytest.raises(CryocliError) as error:
        parse_snr(text)
    assert error.value.message.startswith(words), error.value.message
    with pytest.raises(CryocliError, match="^--noise-snr 0: "):
        parse_snr("0", "--noise-snr")
