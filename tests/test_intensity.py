"""RELION's intensity corrections (refine --norm, --scale): estimates recover known factors."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from cryocli.engines.refine.intensity import IntensityAccumulator, IntensityCorrections, intensity_groups
from tests.conftest import DEVICES


def _data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """400 particles in 4 groups, 600 pixels each: model M, images X = c_i (s_g M + noise), noise sigma^2 = 1
    per component, with known normalisation factors c_i and group scales s_g."""
    g = torch.Generator().manual_seed(seed)
    n, pixels = 400, 600
    groups = torch.arange(n) % 4
    scale = torch.tensor([0.7, 1.0, 1.2, 1.1])
    norm = 0.6 + 0.8 * torch.rand(n, generator=g, dtype=torch.float64)
    model = torch.complex(torch.randn(n, pixels, generator=g, dtype=torch.float64),
                          torch.randn(n, pixels, generator=g, dtype=torch.float64)) * 0.5
    noise = torch.complex(torch.randn(n, pixels, generator=g, dtype=torch.float64),
                          torch.randn(n, pixels, generator=g, dtype=torch.float64))
    images = norm[:, None] * (scale.double()[groups][:, None] * model + noise)
    return images, model, groups, norm, scale.double()


def _estimate(images: torch.Tensor, model: torch.Tensor, groups: torch.Tensor, do_norm: bool, do_scale: bool,
              rounds: int = 6, device: str = "cpu") -> IntensityCorrections:
    """The corrections after ``rounds`` streamed rounds, estimated on ``device`` from the data moved there."""
    c = IntensityCorrections.start(groups.to(device), ["a", "b", "c", "d"], do_norm, do_scale, device)
    idx = torch.arange(len(groups), device=device)
    images, model = images.to(device), model.to(device)
    for _ in range(rounds):
        acc = IntensityAccumulator(c)
        x, _ = c.apply(idx, images[:, :, None], None)  # (B, M, 1): apply works on image-shaped arrays
        for s in range(0, len(idx), 64):  # streamed in batches as the E-step does
            b = idx[s:s + 64]
            acc.add(b, x[b, :, 0], model[b], torch.ones(len(b), model.shape[1], dtype=torch.float64, device=device))
        c = acc.updated()
    return c


@pytest.mark.parametrize("device", DEVICES)
def test_norm_and_scale_recover_known_factors(device: str) -> None:
    images, model, groups, norm, scale = _data()
    c = _estimate(images, model, groups, True, True, device=device)
    c_norm, c_scale = c.norm.cpu(), c.scale.cpu()
    # Corrections are relative (mean 1): compare with the truth rescaled the same way.
    true_norm = norm / norm.mean()
    assert torch.corrcoef(torch.stack([c_norm.double(), true_norm]))[0, 1] > 0.98
    assert (c_norm.double() - true_norm).abs().median() < 0.03
    # The group scales in units of the particle-weighted mean (equal group sizes here); the image's own
    # normalisation multiplies signal and noise alike, so after the norm correction the signal scale is s_g.
    assert torch.allclose(c_scale.double(), scale / scale.mean(), atol=0.03)
    assert c_norm.mean().item() == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_corrections_off_stay_one_and_change_nothing(device: str) -> None:
    images, model, groups, _, _ = _data(1)
    c = _estimate(images, model, groups, False, False, rounds=2, device=device)
    c_norm, c_scale = c.norm.cpu(), c.scale.cpu()
    assert torch.equal(c_norm, torch.ones_like(c_norm)) and torch.equal(c_scale, torch.ones_like(c_scale))
    x, ctf = c.apply(torch.arange(3, device=device), images[:3, :, None].to(device), None)
    assert ctf is None and torch.equal(x.cpu(), images[:3, :, None])


@pytest.mark.parametrize("device", DEVICES)
def test_scale_multiplies_the_ctf_and_norm_divides_the_image(device: str) -> None:
    groups = torch.tensor([0, 1, 1], device=device)
    c = IntensityCorrections(torch.tensor([2.0, 1.0, 0.5], device=device), torch.tensor([0.5, 2.0], device=device),
                             groups, ["a", "b"], True, True)
    x, ctf = c.apply(torch.arange(3, device=device), torch.ones(3, 2, 2, dtype=torch.complex64, device=device),
                     torch.ones(3, 2, 2, device=device))
    assert torch.allclose(x[:, 0, 0].real.cpu(), torch.tensor([0.5, 1.0, 2.0]))
    assert ctf is not None and torch.allclose(ctf[:, 0, 0].cpu(), torch.tensor([0.5, 2.0, 2.0]))


def test_groups_follow_relion_columns_in_order() -> None:
    table = pd.DataFrame({"rlnMicrographName": ["m2", "m1", "m2"], "rlnGroupName": ["g", "g", "h"]})
    groups, names = intensity_groups(table)
    assert names == ["g", "h"] and groups.tolist() == [0, 0, 1]
    groups, names = intensity_groups(table.drop(columns="rlnGroupName"))
    assert names == ["m1", "m2"] and groups.tolist() == [1, 0, 1]
    groups, names = intensity_groups(pd.DataFrame({"rlnImageName": ["a", "b"]}))
    assert groups.tolist() == [0, 0] and len(names) == 1
