"""Signal-to-noise ratio and noise for simulated particle images.

SNR, as ``simulate`` and the RELION reference set use it: the variance of each clean (projected,
CTF-modulated) image over the whole box, averaged over the dataset, divided by the noise variance per
pixel. One noise level serves the whole dataset, so images with more signal have a higher SNR.

Power spectra here are per Fourier pixel and normalised so that white noise of variance sigma^2 has a
flat spectrum sigma^2: ``S(k) = E|F(k)|^2 / n^2`` with ``F`` the unnormalised 2D FFT of an ``n x n``
image. A spectrum is given per RELION shell ``round(|k| in pixels)``, shells ``0 .. n // 2``; the
corner pixels beyond shell ``n // 2`` take the last value.
"""

from __future__ import annotations

import math
import re

import torch
from torch import Tensor

from cryocli.errors import CryocliError
from cryocli.imaging.fourier import rfft_radius

_DECIBEL = re.compile(r"^\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*dB\s*$", re.IGNORECASE)
_LINEAR = re.compile(r"^\s*[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?\s*$")


def parse_snr(text: str, option: str = "--snr") -> float:
    """A linear SNR from ``"0.1"``, ``"-10dB"`` / ``"-10 dB"`` (10^(dB/10)) or ``"inf"`` (no noise).

    Raises :class:`CryocliError` for anything else, and for a linear SNR that is not positive; the message
    names ``option``, the flag the value came from (``--snr 0: ...``).
    """
    value = text.strip()
    given = f"{option} {value if value else repr(text)}"
    if value.lower() in ("inf", "infinity", "+inf"):
        return math.inf
    decibel = _DECIBEL.match(value)
    if decibel:
        try:
            snr = 10.0 ** (float(decibel.group(1)) / 10.0)
        except OverflowError:  # 4000dB
            snr = math.inf
        if not 0.0 < snr < math.inf:
            raise CryocliError(f"{given}: out of range (10^(dB/10) must be a positive, finite ratio)")
        return snr
    if not _LINEAR.match(value):
        raise CryocliError(f"{given}: expected the SNR as a positive number (0.1), decibels (-10dB) or inf")
    snr = float(value)
    if not 0.0 < snr < math.inf:
        raise CryocliError(f"{given}: the SNR must be positive and finite (or inf for no noise)")
    return snr


def signal_variances(images: Tensor) -> Tensor:
    """Variance of each image over its whole box: ``(..., n, n)`` -> ``(...)`` (population variance)."""
    return images.var(dim=(-2, -1), unbiased=False)


def noise_sigma_for_snr(clean_variances: Tensor, snr: float) -> float:
    """Noise standard deviation (image units) giving ``snr`` on average: ``sqrt(mean(var) / snr)``.

    ``clean_variances`` ``(B,)`` are the clean images' variances over the box (:func:`signal_variances`);
    an infinite SNR gives 0.
    """
    if math.isinf(snr):
        return 0.0
    if not snr > 0.0:
        raise CryocliError(f"SNR must be positive, got {snr}")
    return math.sqrt(float(clean_variances.double().mean()) / snr)


def add_white_noise(images: Tensor, sigma: float, generator: torch.Generator | None = None) -> Tensor:
    """``images + sigma * N(0, 1)`` for a batch ``(..., n, n)``, drawn on the images' device."""
    if sigma == 0.0:
        return images.clone()
    noise = torch.randn(images.shape, generator=generator, device=images.device, dtype=images.dtype)
    return images + sigma * noise


def _shell_lookup(n: int, spectrum: Tensor) -> Tensor:
    """Spectrum ``(n // 2 + 1,)`` spread over the half-transform grid ``(n, n // 2 + 1)`` by shell."""
    if spectrum.shape[-1] != n // 2 + 1:
        raise CryocliError(f"a spectrum for {n}-pixel images needs {n // 2 + 1} shells, got {spectrum.shape[-1]}")
    shells = torch.round(rfft_radius(n, spectrum.device, torch.float64)).long().clamp(max=n // 2)
    return spectrum[shells]


def coloured_noise(shape: tuple[int, ...], spectrum: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Gaussian noise images ``shape = (..., n, n)`` with radial power spectrum ``spectrum`` ``(n // 2 + 1,)``.

    ``spectrum[k]`` is the power per Fourier pixel in shell ``k`` (see the module docstring: a flat
    spectrum sigma^2 is white noise of variance sigma^2). The noise is stationary, real and zero-mean,
    made on ``spectrum``'s device in its dtype.
    """
    n = shape[-1]
    if len(shape) < 2 or shape[-2] != n:
        raise CryocliError(f"coloured noise needs square images, got shape {tuple(shape)}")
    if (spectrum < 0).any():
        raise CryocliError("a power spectrum cannot be negative")
    amplitude = torch.sqrt(_shell_lookup(n, spectrum))
    white = torch.randn(shape, generator=generator, device=spectrum.device, dtype=spectrum.dtype)
    # The filter depends on |k| only, so it is Hermitian-symmetric and the filtered noise stays real.
    return torch.fft.irfft2(torch.fft.rfft2(white) * amplitude, s=(n, n))


def radial_power_spectrum(images: Tensor) -> Tensor:
    """Mean power per Fourier pixel in each shell, over all images ``(..., n, n)`` -> ``(n // 2 + 1,)``.

    Same normalisation as :func:`coloured_noise`: white noise of variance sigma^2 gives sigma^2. Shells
    are ``round(|k|)`` in pixels; pixels beyond shell ``n // 2`` are left out. The half transform's
    kx = 0 and Nyquist columns stand for themselves only; every other column also for its mirror image.
    """
    n = images.shape[-1]
    power = torch.fft.rfft2(images).abs().square() / n**2
    power = power.reshape(-1, n, n // 2 + 1).mean(dim=0)
    shells = torch.round(rfft_radius(n, images.device, torch.float64)).long()
    weight = torch.full((n, n // 2 + 1), 2.0, dtype=power.dtype, device=images.device)
    weight[:, 0] = 1.0
    if n % 2 == 0:
        weight[:, -1] = 1.0
    inside = shells <= n // 2
    total = torch.zeros(n // 2 + 1, dtype=power.dtype, device=images.device)
    count = torch.zeros_like(total)
    total.index_add_(0, shells[inside], (power * weight)[inside])
    count.index_add_(0, shells[inside], weight[inside])
    return total / count


def estimate_snr(clean: Tensor, noisy: Tensor) -> float:
    """Realised SNR of a dataset: mean clean variance over the box / variance of ``noisy - clean``.

    ``clean`` and ``noisy`` are ``(B, n, n)``; the noise variance is pooled over all images and pixels.
    """
    noise_var = float(signal_variances(noisy - clean).double().mean())
    if noise_var == 0.0:
        return math.inf
    return float(signal_variances(clean).double().mean()) / noise_var
