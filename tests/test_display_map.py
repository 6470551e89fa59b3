"""The map written for viewing: FSC weighting, low-pass, solvent flattening; the decoder's band limit."""

from __future__ import annotations

import numpy as np
import torch

from cryocli.engines.common.hartley_volume import HartleyVolume
from cryocli.engines.display_map import filter_for_viewing
from cryocli.imaging.fourier import radius_3d, rfftn_radius


def _shell_power(volume: torch.Tensor) -> np.ndarray:
    n = volume.shape[-1]
    spec = torch.fft.rfftn(volume.to(torch.float64))
    shells = torch.floor(rfftn_radius(n) + 0.5).long().flatten()
    power = torch.zeros(int(shells.max()) + 1, dtype=torch.float64).index_add_(0, shells, spec.abs().flatten() ** 2)
    count = torch.zeros_like(power).index_add_(0, shells, torch.ones_like(spec.abs().flatten()))
    return (power / count.clamp(min=1)).numpy()


def test_decoder_map_has_no_power_beyond_the_band_the_slices_read():
    """The unpaired plane k = -n/2 and the cube's corners are never read by a slice: the map leaves them out,
    so there is no Nyquist spike (a random start has a flat spectrum up to Nyquist and nothing beyond)."""
    n = 24
    vol = HartleyVolume(n, torch.ones(n // 2 + 3), generator=torch.Generator().manual_seed(0))
    spectrum = torch.fft.rfftn(vol.to_map().to(torch.float64))
    beyond = rfftn_radius(n) > n // 2 + 1e-6
    assert float(spectrum[beyond].abs().max()) < 1e-6 * float(spectrum.abs().max())
    power = _shell_power(vol.to_map())
    assert power[n // 2] < 2.0 * np.median(power[n // 4:n // 2])


def test_viewing_filter_weights_cuts_and_flattens():
    n, vs = 32, 2.0
    g = torch.Generator().manual_seed(1)
    vol = torch.randn(n, n, n, generator=g)
    fsc = np.ones(n // 2 + 1)
    fsc[9:] = 0.0  # FSC drops below 0.143 between shells 8 and 9
    out = filter_for_viewing(vol, vs, fsc, mask_diameter_A=40.0)
    spectrum = torch.fft.rfftn(out.to(torch.float64))
    r = rfftn_radius(n)
    # Nothing from beyond the crossing survives, except the raised-cosine edge across one shell and the mask's
    # own blur of the low shells.
    assert float(spectrum[r > 12].abs().max()) < 0.05 * float(spectrum[r < 4].abs().max())
    # Outside the mask (radius 10 px + 5 px edge) the map is flat zero.
    outside = radius_3d(n) > 10 + 5 + 1e-6
    assert float(out[outside].abs().max()) == 0.0
    # Inside, where the mask is 1 and the FSC is 1, low frequencies come through unchanged.
    low = torch.fft.irfftn(torch.fft.rfftn(vol.to(torch.float64)) * (r <= 3), s=(n, n, n))
    low_out = torch.fft.irfftn(spectrum * (r <= 3), s=(n, n, n))
    centre = radius_3d(n) < 4
    assert float(torch.corrcoef(torch.stack([low[centre], low_out[centre]]))[0, 1]) > 0.9
