"""`relion_postprocess` reproduced: corrected FSC, Guinier B-factor, sharpening, MTF, STAR tables, and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import starfile
import torch
from typer.testing import CliRunner

from cryocli.analysis.postprocess import fit_guinier, guinier_curve, mtf_weights, postprocess, read_mtf
from cryocli.imaging.filters import apply_bfactor, lowpass_filter
from cryocli.cli.app import app
from cryocli.imaging.fourier import fourier_resample_volume
from cryocli.io.mrc import read_map, write_map
from tests.conftest import CRYODRGN, EXTERNAL, RELION_SET, need

runner = CliRunner()
APIX = 4.4
FSC_COLUMNS = {
    "unmasked": "rlnFourierShellCorrelationUnmaskedMaps",
    "masked": "rlnFourierShellCorrelationMaskedMaps",
    "random_masked": "rlnCorrectedFourierShellCorrelationPhaseRandomizedMaskedMaps",
    "corrected": "rlnFourierShellCorrelationCorrected",
}


@pytest.fixture(scope="module")
def relion_inputs():
    h1 = read_map(need(RELION_SET / "reconstruct" / "rec_half1.mrc")).data
    h2 = read_map(need(RELION_SET / "reconstruct" / "rec_half2.mrc")).data
    mask = read_map(need(RELION_SET / "mask.mrc")).data
    return h1, h2, mask


@pytest.fixture(scope="module")
def relion10():
    return starfile.read(need(RELION_SET / "postprocess" / "postprocess.star"))


@pytest.fixture(scope="module")
def relion20():
    return starfile.read(need(RELION_SET / "postprocess_lowres20" / "postprocess.star"))


@pytest.fixture(scope="module")
def ours10(relion_inputs):
    h1, h2, mask = relion_inputs
    return postprocess(h1, h2, APIX, mask, autob_lowres=10, low_pass=0)


@pytest.fixture(scope="module")
def ours20(relion_inputs):
    h1, h2, mask = relion_inputs
    return postprocess(h1, h2, APIX, mask, autob_lowres=20, low_pass=0)


def test_resolution_and_randomisation_shell_match_relion(ours10, relion10):
    g = relion10["general"]
    n_shells_res = round(64 * APIX / g["rlnFinalResolution"])
    assert ours10.resolution_shell == n_shells_res == 31
    assert ours10.resolution == pytest.approx(g["rlnFinalResolution"], abs=1e-5)
    assert 64 * APIX / ours10.randomize_at == pytest.approx(g["rlnRandomiseFrom"], abs=1e-5)
    assert ours10.solvent_mask_factor == pytest.approx(g["rlnParticleBoxFractionSolventMask"], abs=1e-6)


def test_fsc_columns_match_relion_per_shell(ours10, relion10):
    """RELION's phase randomisation is reproduced (same glibc random stream, seed 0), so every column agrees
    to the 6 printed digits, far inside the 0.02 per shell asked for."""
    fsc = relion10["fsc"]
    for attr, col in FSC_COLUMNS.items():
        diff = np.abs(getattr(ours10, f"fsc_{attr}") - fsc[col].to_numpy())
        assert diff.max() < 1e-5, (col, diff.max())
    np.testing.assert_allclose(ours10.fsc_particle_fraction, fsc["rlnFourierShellCorrelationParticleMaskFraction"],
                               atol=1e-5)


def test_bfactor_matches_relion_with_both_fit_ranges(ours10, ours20, relion10, relion20):
    for ours, ref in ((ours20, relion20), (ours10, relion10)):
        g = ref["general"]
        assert ours.bfactor == pytest.approx(g["rlnBfactorUsedForSharpening"], rel=1e-4)
        assert ours.guinier_fit.slope == pytest.approx(g["rlnFittedSlopeGuinierPlot"], rel=1e-4)
        assert ours.guinier_fit.intercept == pytest.approx(g["rlnFittedInterceptGuinierPlot"], abs=1e-4)
        assert ours.guinier_fit.correlation == pytest.approx(g["rlnCorrelationFitGuinierPlot"], abs=1e-5)
    # RELION fits from --autob_lowres up to Nyquist (its --autob_highres defaults to 0), not to the resolution.
    assert ours20.guinier_fit.points == 18 and ours10.guinier_fit.points == 4


def test_guinier_table_matches_relion(ours10, relion10):
    gt = relion10["guinier"]
    np.testing.assert_allclose(ours10.guinier_x, gt["rlnResolutionSquared"], rtol=1e-5, atol=1e-6)
    for attr, col in (("original", "rlnLogAmplitudesOriginal"), ("weighted", "rlnLogAmplitudesWeighted"),
                      ("sharpened", "rlnLogAmplitudesSharpened")):
        np.testing.assert_allclose(getattr(ours10, f"guinier_{attr}"), gt[col], atol=1e-4)


def test_sharpened_maps_match_relion(ours10):
    """RELION 5 writes postprocess.mrc unfiltered (its --low_pass defaults to 0), hence low_pass=0 here."""
    ref = read_map(need(RELION_SET / "postprocess" / "postprocess.mrc")).data
    ref_masked = read_map(need(RELION_SET / "postprocess" / "postprocess_masked.mrc")).data
    scale = np.abs(ref).max()
    assert np.abs(ours10.map - ref).max() < 1e-4 * scale
    assert np.abs(ours10.map_masked - ref_masked).max() < 1e-4 * scale


def test_guinier_fit_recovers_a_known_blur():
    """A map with a flat Guinier plot, blurred by B = 80 A^2: the automatic B-factor undoes the blur."""
    hand = read_map(need(CRYODRGN / "hand-vol.mrc"))
    vol = torch.tensor(hand.data, dtype=torch.float64)
    spec = torch.fft.rfftn(vol)
    from cryocli.imaging.fourier import rfftn_shells, shell_sum

    shells = rfftn_shells(64)
    mean_amp = shell_sum(spec.abs(), shells, 64) / shell_sum(torch.ones_like(spec.real), shells, 64)
    flat = torch.fft.irfftn(spec / mean_amp[shells.clamp_max(63)].clamp_min(1e-12), s=(64, 64, 64))
    b_true = 80.0
    blurred = apply_bfactor(flat, 1.0, b_true)
    res = postprocess(blurred, blurred.clone(), 1.0, None, autob_lowres=10, low_pass=0)
    assert res.resolution_shell == 32  # noise-free halves: FSC = 1 to Nyquist
    assert res.bfactor == pytest.approx(-b_true, rel=0.15)
    # The sharpened Guinier plot is flat again between 10 A and Nyquist.
    x, y = res.guinier_x, res.guinier_sharpened
    fit_after = fit_guinier(x, y, 10.0, 0.0)
    assert abs(fit_after.bfactor) < 0.15 * b_true


def test_mtf_division(relion_inputs):
    mtf = read_mtf(need(EXTERNAL / "relion" / "data" / "mtf_k2_300kV.star"))
    assert len(mtf.frequency) == 1001
    falcon = read_mtf(need(EXTERNAL / "relion" / "data" / "mtf_falcon4EC_300kV.star"))
    assert len(falcon.value) == 64 and falcon.frequency[0] == 0.0
    w = mtf_weights(mtf, 64, APIX, mtf_angpix=APIX)
    from cryocli.imaging.fourier import rfftn_radius

    k_pix = (rfftn_radius(64) / 64).numpy()  # 1/pixel
    inside = k_pix < 0.5
    expected = np.interp(k_pix[inside], mtf.frequency, mtf.value)
    np.testing.assert_allclose(w.numpy()[inside], expected, atol=2e-3)
    assert np.all(w.numpy()[~inside] == 1.0)
    h1, h2, mask = relion_inputs
    res = postprocess(h1, h2, APIX, mask, mtf=mtf, mtf_angpix=APIX, low_pass=0)
    shell_k = np.arange(33) / 64
    gain = res.guinier_mtf - res.guinier_original
    np.testing.assert_allclose(gain[1:31], -np.log(np.interp(shell_k[1:31], mtf.frequency, mtf.value)), atol=0.02)


def test_lowpass_is_a_raised_cosine_over_two_shells():
    vol = torch.zeros(32, 32, 32, dtype=torch.float64)
    vol[16, 16, 16] = 1.0  # flat spectrum
    out = lowpass_filter(vol, 2.0, 8.0)  # shell round(64 / 8) = 8
    x, y = guinier_curve(torch.fft.rfftn(out, norm="forward"), 2.0)
    amp = np.exp(y) * 32**3
    np.testing.assert_allclose(amp[:7], 1.0, atol=1e-9)
    assert 0.2 < amp[8] < 0.8 and amp[10] < 1e-6


# --- CLI ------------------------------------------------------------------------------------------

def _halves():
    return str(need(RELION_SET / "reconstruct" / "rec_half1.mrc")), str(need(RELION_SET / "reconstruct" / "rec_half2.mrc"))


def test_cli_postprocess_writes_relion_tables(tmp_path, relion20):
    a, b = _halves()
    out = tmp_path / "pp"
    r = runner.invoke(app, ["--json", "postprocess", a, b, "--mask", str(RELION_SET / "mask.mrc"), "-o", str(out),
                            "--autob-lowres", "20", "--angpix", "4.4"])
    assert r.exit_code == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["resolution_A"] == pytest.approx(9.083871, abs=1e-5)
    assert s["bfactor_A2"] == pytest.approx(-300.57973, rel=1e-4)
    assert s["low_pass_A"] == pytest.approx(9.083871, abs=1e-5) and 0.34 < s["mask_fraction"] < 0.35
    assert sorted(p.name for p in out.iterdir()) == ["fsc.png", "guinier.png", "postprocess.mrc",
                                                      "postprocess.star", "postprocess_masked.mrc"]
    ours = starfile.read(out / "postprocess.star")
    for block in ("general", "fsc", "guinier"):
        theirs = relion20[block]
        keys = set(theirs) if isinstance(theirs, dict) else set(theirs.columns)
        mine = set(ours[block]) if isinstance(ours[block], dict) else set(ours[block].columns)
        assert keys <= mine, (block, keys - mine)
    np.testing.assert_allclose(ours["fsc"]["rlnFourierShellCorrelationCorrected"],
                               relion20["fsc"]["rlnFourierShellCorrelationCorrected"], atol=2e-6)
    pp = read_map(out / "postprocess.mrc")
    assert pp.voxel_size == pytest.approx(4.4, rel=1e-6) and pp.data.shape == (64, 64, 64)
    # Table mode, refusing to overwrite, and --force.
    r = runner.invoke(app, ["postprocess", a, b, "--mask", str(RELION_SET / "mask.mrc"), "-o", str(out)])
    assert r.exit_code == 2 and "--force" in r.stderr
    r = runner.invoke(app, ["postprocess", a, b, "-o", str(out), "--force", "--bfactor", "-200"])
    assert r.exit_code == 0 and "final resolution" in r.stdout and "-200.0" in r.stdout


def test_cli_postprocess_auto_mask(tmp_path):
    a, b = _halves()
    out = tmp_path / "auto"
    r = runner.invoke(app, ["postprocess", a, b, "--auto-mask", "--extend", "3", "--soft-edge", "5", "-o", str(out),
                            "--json"])
    assert r.exit_code == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["mask"] == str(out / "mask.mrc")
    mask = read_map(out / "mask.mrc").data
    assert 0.0 <= mask.min() and mask.max() == pytest.approx(1.0)
    # From the noisy half maps (default threshold: 10% of the low-passed maximum) the mask is close to RELION's,
    # which was made from the clean map.
    from cryocli.imaging.masks import mask_agreement

    assert mask_agreement(mask, read_map(RELION_SET / "mask.mrc").data)["dice"] > 0.85
    assert 0.25 < s["mask_fraction"] < 0.4 and s["resolution_A"] < 10.5


def test_cli_postprocess_errors_leave_nothing(tmp_path):
    a, b = _halves()
    small = tmp_path / "small.mrc"
    vol = torch.tensor(read_map(a).data, dtype=torch.float64)
    write_map(small, fourier_resample_volume(vol, 32).float().numpy(), 8.8)
    out = tmp_path / "never"
    r = runner.invoke(app, ["postprocess", a, b, "--mask", str(small), "-o", str(out)])
    assert r.exit_code == 2 and "(32, 32, 32)" in r.stderr and "(64, 64, 64)" in r.stderr
    r = runner.invoke(app, ["postprocess", a, str(small), "-o", str(out)])
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1
    r = runner.invoke(app, ["postprocess", a, b, "--mask", str(RELION_SET / "mask.mrc"), "--auto-mask", "-o", str(out)])
    assert r.exit_code == 2 and "either" in r.stderr
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["small.mrc"]  # no temporary folders left behind


def test_cli_postprocess_force_removes_what_the_new_run_does_not_write(tmp_path):
    """--force over an --auto-mask run without a mask: the old mask.mrc and postprocess_masked.mrc went against the
    new postprocess.star, which no longer names them. A --mask kept in the output folder stays."""
    import shutil

    a, b = _halves()
    out = tmp_path / "post"
    assert runner.invoke(app, ["postprocess", a, b, "--auto-mask", "-o", str(out), "-q"]).exit_code == 0
    assert (out / "mask.mrc").is_file() and (out / "postprocess_masked.mrc").is_file()
    assert runner.invoke(app, ["postprocess", a, b, "-o", str(out), "--force", "-q"]).exit_code == 0
    assert sorted(p.name for p in out.iterdir()) == ["fsc.png", "guinier.png", "postprocess.mrc", "postprocess.star"]
    shutil.copy(RELION_SET / "mask.mrc", out / "mask.mrc")
    r = runner.invoke(app, ["postprocess", a, b, "--mask", str(out / "mask.mrc"), "-o", str(out), "--force", "-q"])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.iterdir()) == ["fsc.png", "guinier.png", "mask.mrc", "postprocess.mrc",
                                                     "postprocess.star", "postprocess_masked.mrc"]
