"""FSC in RELION's shells and sums, resolution crossings, RELION's random phases, and `cryocli fsc`."""

from __future__ import annotations

import ctypes
import json
import os

import numpy as np
import pytest
import starfile
import torch
from typer.testing import CliRunner

from cryocli.analysis.fsc import (GlibcRand, corrected_masked_fsc, fsc_curve, randomize_phases_beyond,
                                  relion_resolution_shell, shell_resolution, shell_voxel_counts, threshold_crossing)
from cryocli.cli.app import app
from cryocli.io.star import fsc_star_text
from cryocli.imaging.fourier import fourier_resample_volume, shell_index_3d, volume_to_fft
from cryocli.io.mrc import read_map, write_map
from tests.conftest import CRYODRGN, DEVICES, RELION_SET, need

runner = CliRunner()


@pytest.fixture(scope="module")
def halves():
    h1 = read_map(need(RELION_SET / "reconstruct" / "rec_half1.mrc"))
    h2 = read_map(need(RELION_SET / "reconstruct" / "rec_half2.mrc"))
    mask = read_map(need(RELION_SET / "mask.mrc")).data
    pp = starfile.read(need(RELION_SET / "postprocess" / "postprocess.star"))
    return h1.data, h2.data, mask, h1.voxel_size, pp


@pytest.fixture(scope="module")
def small_map() -> np.ndarray:
    vol = torch.tensor(read_map(need(RELION_SET / "map.mrc")).data, dtype=torch.float64)
    return fourier_resample_volume(vol, 32).numpy()


@pytest.mark.parametrize("device", DEVICES)
def test_identical_maps_give_one_everywhere(small_map: np.ndarray, device: str):
    f = fsc_curve(torch.tensor(small_map).to(device), torch.tensor(small_map.copy()).to(device))
    assert f.shape == (17,)
    np.testing.assert_allclose(f, 1.0, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_independent_noise_gives_zero_within_shell_statistics(device: str):
    g = torch.Generator().manual_seed(7)
    a = torch.randn(40, 40, 40, generator=g, dtype=torch.float64)
    b = torch.randn(40, 40, 40, generator=g, dtype=torch.float64)
    f = fsc_curve(a.to(device), b.to(device))[1:]
    count = shell_voxel_counts(40)[1:]
    assert np.all(np.abs(f) < 4 / np.sqrt(count))
    # The statistic is normalised: FSC^2 * count averages ~1 for independent noise (a curve of zeros fails).
    z2 = float(np.mean(f**2 * count))
    assert 0.5 < z2 < 1.6, z2


@pytest.mark.parametrize("device", DEVICES)
def test_fsc_matches_relion_unmasked_and_masked_columns(halves, device: str):
    h1, h2, mask, _, pp = halves
    fsc = pp["fsc"]
    ours = fsc_curve(torch.tensor(h1).to(device), torch.tensor(h2).to(device))
    np.testing.assert_allclose(ours, fsc["rlnFourierShellCorrelationUnmaskedMaps"], atol=2e-6)
    masked = fsc_curve(torch.tensor(h1 * mask).to(device), torch.tensor(h2 * mask).to(device))
    np.testing.assert_allclose(masked, fsc["rlnFourierShellCorrelationMaskedMaps"], atol=2e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_full_transform_sum_is_what_differs_from_relion(halves, device: str):
    """Why fsc_curve sums over the half transform: the full-transform sum misses RELION by ~0.01."""
    h1, h2, _, _, pp = halves
    fa, fb = (volume_to_fft(torch.tensor(v, dtype=torch.float64).to(device)) for v in (h1, h2))
    shells = shell_index_3d(64, device).reshape(-1)
    keep = shells <= 32

    def ssum(v):
        return torch.zeros(33, dtype=torch.float64, device=device).index_add_(0, shells[keep], v.reshape(-1)[keep])

    full = (ssum((fa * fb.conj()).real) / torch.sqrt(ssum(fa.abs() ** 2) * ssum(fb.abs() ** 2))).cpu().numpy()
    diff = np.abs(full - pp["fsc"]["rlnFourierShellCorrelationUnmaskedMaps"].to_numpy())
    assert diff.max() > 0.005


@pytest.mark.parametrize("device", DEVICES)
def test_relion_resolution_rule_matches_readme(halves, device: str):
    h1, h2, _, apix, _ = halves
    f = fsc_curve(torch.tensor(h1).to(device), torch.tensor(h2).to(device))
    res = shell_resolution(64, apix)
    # README: unmasked half maps, 0.143 at 10.83 A and 0.5 at 18.77 A (last shell before the drop).
    assert res[relion_resolution_shell(f, 0.143)] == pytest.approx(10.83, abs=0.01)
    assert res[relion_resolution_shell(f, 0.5)] == pytest.approx(18.77, abs=0.01)


def test_crossing_is_interpolated_between_last_above_and_first_below():
    n, apix = 20, 2.0
    fsc = np.array([1.0, 0.95, 0.8, 0.6, 0.4, 0.2, 0.1, 0.05, 0.0, 0, 0])
    c = threshold_crossing(fsc, n, apix, 0.5)
    # Between shell 3 (0.6) and 4 (0.4), halfway: shell 3.5 -> 3.5 / (20 * 2) 1/A.
    assert c.reached and c.shell == 3
    assert c.frequency == pytest.approx(3.5 / 40)
    assert c.resolution == pytest.approx(40 / 3.5)
    never = threshold_crossing(np.ones(11), n, apix, 0.143)
    assert not never.reached and never.resolution == pytest.approx(4.0)


def test_glibc_stream_matches_the_c_library():
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        pytest.skip("not a glibc system: the C library's rand() is another generator")
    for seed in (0, 1, 4242):
        libc.srand(seed)
        expected = np.array([libc.rand() for _ in range(20000)])
        ours = GlibcRand(seed)
        got = np.concatenate([ours.rand(7), ours.rand(12000), ours.rand(7993)])  # block boundaries are seamless
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("device", DEVICES)
def test_phase_randomisation_reproduces_relion(halves, device: str):
    h1, h2, mask, _, pp = halves
    fsc = pp["fsc"]
    res = corrected_masked_fsc(*(torch.tensor(v).to(device) for v in (h1, h2, mask)))
    assert res.randomize_at == 13  # RELION: rlnRandomiseFrom 21.661539 A = 281.6 / 13
    np.testing.assert_allclose(res.random_masked, fsc["rlnCorrectedFourierShellCorrelationPhaseRandomizedMaskedMaps"],
                               atol=1e-5)
    np.testing.assert_allclose(res.corrected, fsc["rlnFourierShellCorrelationCorrected"], atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_randomised_phases_keep_amplitudes_and_scramble_beyond_the_shell(small_map: np.ndarray, device: str):
    # The phases are drawn on the CPU from the generator and moved to the map's device.
    out = randomize_phases_beyond(torch.tensor(small_map).to(device), 6, torch.Generator().manual_seed(1)).cpu()
    f = fsc_curve(small_map, out)
    np.testing.assert_allclose(f[:5], 1.0, atol=1e-9)  # |k| < 6 untouched (shell 5 lies below radius 5.5)
    assert np.all(np.abs(f[7:]) < 4 / np.sqrt(shell_voxel_counts(32)[7:]))
    amp = lambda v: np.abs(np.fft.rfftn(v))  # noqa: E731
    # Friedel pairs inside the kx = 0 plane get independent phases, as in RELION, so only kx > 0 keeps |F| exactly.
    np.testing.assert_allclose(amp(out)[:, :, 1:16], amp(small_map)[:, :, 1:16], rtol=1e-7, atol=1e-12)


def test_fsc_star_file(tmp_path, halves):
    h1, h2, _, apix, _ = halves
    f = fsc_curve(h1, h2)
    path = tmp_path / "fsc.star"
    path.write_text(fsc_star_text(f, 64, apix))
    df = starfile.read(path)
    assert list(df.columns) == ["rlnSpectralIndex", "rlnResolution", "rlnAngstromResolution",
                                "rlnFourierShellCorrelation"]
    assert df["rlnAngstromResolution"].iloc[1] == pytest.approx(64 * apix, rel=1e-6)
    np.testing.assert_allclose(df["rlnFourierShellCorrelation"], f, atol=1e-6)


# --- CLI ------------------------------------------------------------------------------------------

def _half_paths():
    return str(need(RELION_SET / "reconstruct" / "rec_half1.mrc")), str(need(RELION_SET / "reconstruct" / "rec_half2.mrc"))


def test_cli_fsc_outputs_json_star_and_plot(tmp_path):
    a, b = _half_paths()
    star, png = tmp_path / "fsc.star", tmp_path / "fsc.png"
    r = runner.invoke(app, ["fsc", a, b, "--mask", str(RELION_SET / "mask.mrc"), "-o", str(star), "--plot", str(png),
                            "-t", "0.3", "--json"])
    assert r.exit_code == 0, r.stderr
    s = json.loads(r.stdout)
    thr = {x["threshold"]: x for x in s["resolution"]}
    assert set(thr) == {0.143, 0.5, 0.3}
    # RELION's masked half-map FSC: 0.143 in the shell after 9.08 A, 0.5 after 15.64 A (README).
    assert 8.8 < thr[0.143]["resolution_A"] < 9.09
    assert 14.82 < thr[0.5]["resolution_A"] < 15.65
    assert star.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Global --json before the subcommand works too, and the table mode prints the thresholds.
    r2 = runner.invoke(app, ["--json", "fsc", a, b])
    assert r2.exit_code == 0 and json.loads(r2.stdout)["box"] == 64
    r3 = runner.invoke(app, ["fsc", a, b])
    assert r3.exit_code == 0 and "0.143" in r3.stdout and "resolution (A)" in r3.stdout


def test_cli_fsc_refuses_to_overwrite_without_force(tmp_path):
    a, b = _half_paths()
    star = tmp_path / "fsc.star"
    star.write_text("keep me")
    r = runner.invoke(app, ["fsc", a, b, "-o", str(star)])
    assert r.exit_code == 2 and "--force" in r.stderr
    assert star.read_text() == "keep me"
    r = runner.invoke(app, ["fsc", a, b, "-o", str(star), "--force"])
    assert r.exit_code == 0 and star.read_text().count("data_fsc") == 1


def test_cli_fsc_bad_inputs_fail_in_one_line_without_output(tmp_path, small_map):
    a, _ = _half_paths()
    small = tmp_path / "small.mrc"
    write_map(small, small_map.astype(np.float32), 8.8)
    star = tmp_path / "out.star"
    r = runner.invoke(app, ["fsc", a, str(small), "-o", str(star)])
    assert r.exit_code == 2
    assert "(64, 64, 64)" in r.stderr and "(32, 32, 32)" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not star.exists()
    other = tmp_path / "other_apix.mrc"
    write_map(other, read_map(a).data, 4.5)
    r = runner.invoke(app, ["fsc", a, str(other), "-o", str(star)])
    assert r.exit_code == 2 and "4.4" in r.stderr and "4.5" in r.stderr and not star.exists()
    # --angpix overrides the headers.
    r = runner.invoke(app, ["fsc", a, str(other), "--angpix", "4.4", "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["voxel_size"] == 4.4
    bad_mask = tmp_path / "bad_mask.mrc"
    write_map(bad_mask, read_map(a).data * 1e4, 4.4)
    r = runner.invoke(app, ["fsc", a, a, "--mask", str(bad_mask), "--plot", str(tmp_path / "p.png")])
    assert r.exit_code == 2 and "[0, 1]" in r.stderr and not (tmp_path / "p.png").exists()


def test_cli_fsc_align_recovers_a_mirrored_rotated_map(tmp_path):
    from cryocli.analysis.align import FLIP, resample_volume
    from cryocli.geometry.rotations import euler_to_matrix
    from cryocli.imaging.masks import soft_sphere

    hand = read_map(need(CRYODRGN / "hand-vol.mrc"))
    vol = fourier_resample_volume(torch.tensor(hand.data, dtype=torch.float64), 32).float()
    vol = vol * soft_sphere(32, 12, 3)
    rot = euler_to_matrix(torch.tensor(-40.0), torch.tensor(100.0), torch.tensor(65.0)).double()
    moving = resample_volume(vol, (rot @ FLIP)[None].float(), torch.tensor([[1.0, -2.0, 1.5]]))[0]
    p1, p2 = tmp_path / "ref.mrc", tmp_path / "moved.mrc"
    write_map(p1, vol.numpy(), 2.0)
    write_map(p2, moving.numpy(), 2.0)
    r = runner.invoke(app, ["fsc", str(p1), str(p2), "--align", "--json", "--aligned-map", str(tmp_path / "al.mrc")])
    assert r.exit_code == 0, r.stderr
    al = json.loads(r.stdout)["alignment"]
    assert al["flipped"] is True
    found = torch.tensor(al["rotation_matrix"], dtype=torch.float64)
    angle = torch.rad2deg(torch.arccos(((found @ rot.T).trace() - 1).clamp(-2, 2) / 2))
    assert float(angle) < 2.0
    np.testing.assert_allclose(al["shift_A"], [2.0, -4.0, 3.0], atol=0.3)
    assert (tmp_path / "al.mrc").exists()


def test_crossing_below_the_threshold_from_the_first_shell_is_not_extrapolated():
    """A curve already below the threshold at shell 0 (maps whose means have opposite signs, or a zero mean)
    crosses at frequency 0; interpolating between two shells below the threshold extrapolated a finite
    resolution beyond shell 1 (here 0.143 / 0.1 = 1.43 shells)."""
    n, apix = 20, 2.0
    for start in (0.0, -1.0):
        c = threshold_crossing(np.array([start, 0.1, 0.05, 0.0, 0, 0, 0, 0, 0, 0, 0]), n, apix, 0.143)
        assert c.reached and c.shell == 0
        assert c.frequency == 0.0 and c.resolution == float("inf")


def _strict_json(text: str) -> dict:
    """json.loads that refuses Infinity and NaN (not JSON: jq and most parsers reject them)."""
    def refuse(name: str):
        raise AssertionError(f"{name} in the JSON output")
    return json.loads(text, parse_constant=refuse)


def _one_error_line(r, *words: str) -> str:
    assert r.exit_code == 2, (r.exit_code, r.output)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("cryocli: error: "), r.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


@pytest.fixture
def half_copies(tmp_path):
    """Copies of the two RELION half maps and the mask in tmp_path (the shared data is read-only)."""
    names = {"h1.mrc": RELION_SET / "reconstruct" / "rec_half1.mrc",
             "h2.mrc": RELION_SET / "reconstruct" / "rec_half2.mrc", "mask.mrc": RELION_SET / "mask.mrc"}
    for name, source in names.items():
        (tmp_path / name).write_bytes(need(source).read_bytes())
    return tmp_path / "h1.mrc", tmp_path / "h2.mrc", tmp_path / "mask.mrc"


def test_cli_fsc_never_writes_over_its_own_inputs(tmp_path, half_copies):
    """`fsc h1 h2 -o h1 --force` replaced the input half map with STAR text: an output that is an input is
    refused even with --force, also through a symbolic link, a `..` path or a hard link."""
    h1, h2, mask = half_copies
    before = {p: p.read_bytes() for p in half_copies}
    (tmp_path / "sub").mkdir()
    (tmp_path / "link.star").symlink_to(h2)
    os.link(mask, tmp_path / "hard.png")
    before[tmp_path / "hard.png"] = mask.read_bytes()
    cases = [
        (["-o", h1, "--force"], h1, "MAP1"),
        (["-o", tmp_path / "link.star", "--force"], tmp_path / "link.star", "MAP2"),
        (["--plot", tmp_path / "sub" / ".." / "mask.mrc", "--force", "--mask", mask], None, "--mask"),
        (["--plot", tmp_path / "hard.png", "--force", "--mask", mask], tmp_path / "hard.png", "--mask"),
        (["--align", "--aligned-map", h2, "--force"], h2, "MAP2"),
    ]
    for extra, shown, name in cases:
        r = runner.invoke(app, ["fsc", str(h1), str(h2), *map(str, extra)])
        line = _one_error_line(r, name, "input")
        assert shown is None or str(shown) in line
    assert {p: p.read_bytes() for p in before} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h1.mrc", "h2.mrc", "hard.png", "link.star", "mask.mrc",
                                                          "sub"]


def test_cli_fsc_outputs_need_their_extensions(tmp_path):
    a, b = _half_paths()
    cases = [(["-o", tmp_path / "fsc.txt"], "--output", ".star"), (["--plot", tmp_path / "fsc.txt"], "--plot", ".png"),
             (["--plot", tmp_path / "fsc.pdf"], "--plot", ".png"),
             (["--align", "--aligned-map", tmp_path / "al.star"], "--aligned-map", ".mrc or .map")]
    for extra, option, suffix in cases:
        line = _one_error_line(runner.invoke(app, ["fsc", a, b, *map(str, extra)]), option, suffix)
        assert str(extra[-1]) in line
    assert list(tmp_path.iterdir()) == []
    # Upper case is fine, as for reconstruct's output.
    r = runner.invoke(app, ["fsc", a, b, "-o", str(tmp_path / "FSC.STAR"), "--plot", str(tmp_path / "FSC.PNG"), "-q"])
    assert r.exit_code == 0, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["FSC.PNG", "FSC.STAR"]


def test_cli_fsc_creates_a_missing_output_folder_as_the_other_commands_and_only_when_it_succeeds(tmp_path):
    """The output's missing parent folders are created, as for reconstruct and postprocess; a run that fails
    leaves none behind."""
    a, b = _half_paths()
    star = tmp_path / "new" / "deeper" / "fsc.star"
    small = tmp_path / "small.mrc"
    write_map(small, np.ones((8, 8, 8), np.float32) + np.arange(8, dtype=np.float32), 4.4)
    r = runner.invoke(app, ["fsc", a, str(small), "-o", str(star)])
    assert r.exit_code == 2 and not (tmp_path / "new").exists()
    r = runner.invoke(app, ["fsc", a, b, "-o", str(star), "-q"])
    assert r.exit_code == 0, r.stderr
    assert star.read_text().count("data_fsc") == 1
    assert sorted(p.name for p in star.parent.iterdir()) == ["fsc.star"]  # no lock or temporary left


@pytest.mark.parametrize("fill, words", [(0.0, "all zero"), (2.5, "constant")])
def test_cli_fsc_refuses_an_all_zero_or_constant_map(tmp_path, fill: float, words: str):
    """An empty map has no FSC (it reported a resolution of "inf" with exit 0); postprocess refuses it too."""
    a, b = _half_paths()
    flat = tmp_path / "flat.mrc"
    write_map(flat, np.full((64, 64, 64), fill, np.float32), 4.4)
    star = tmp_path / "fsc.star"
    for args in ([a, str(flat)], [str(flat), b], [str(flat), str(flat)]):
        line = _one_error_line(runner.invoke(app, ["fsc", *args, "-o", str(star)]), str(flat), words)
        assert "inf" not in line
    assert not star.exists()


def test_cli_fsc_refuses_a_mask_that_leaves_nothing(tmp_path):
    a, b = _half_paths()
    empty = tmp_path / "empty_mask.mrc"
    write_map(empty, np.zeros((64, 64, 64), np.float32), 4.4)
    _one_error_line(runner.invoke(app, ["fsc", a, b, "--mask", str(empty)]), str(empty), "all zero")
    # A mask that keeps only a corner where the first map is zero.
    corner = np.zeros((64, 64, 64), np.float32)
    corner[:2, :2, :2] = 1.0
    inner = tmp_path / "inner.mrc"
    volume = read_map(a).data.copy()
    volume[:2, :2, :2] = 0.0
    write_map(inner, volume, 4.4)
    write_map(tmp_path / "corner.mrc", corner, 4.4)
    _one_error_line(runner.invoke(app, ["fsc", str(inner), b, "--mask", str(tmp_path / "corner.mrc")]), str(inner),
                    "all zero inside the mask")


def test_cli_fsc_says_beyond_nyquist_for_a_map_against_itself():
    a, _ = _half_paths()
    r = runner.invoke(app, ["fsc", a, a], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.stderr
    rows = [line for line in r.stdout.splitlines() if "0.143" in line or "0.5 " in line]
    assert len(rows) == 2 and all("beyond Nyquist" in row and "<= 8.80" in row for row in rows), r.stdout
    assert "inf" not in r.stdout
    s = _strict_json(runner.invoke(app, ["fsc", a, a, "--json"]).stdout)
    assert s["nyquist_A"] == pytest.approx(8.8)
    for x in s["resolution"]:
        assert x["reached"] is False and x["resolution_A"] == pytest.approx(8.8)


def test_cli_fsc_without_a_crossing_gives_null_not_infinity(tmp_path):
    """A map against its negative: the FSC is -1 from shell 0, below every threshold; no resolution (JSON null),
    not "inf" (Infinity is not JSON)."""
    a, _ = _half_paths()
    negative = tmp_path / "negative.mrc"
    write_map(negative, -read_map(a).data, 4.4)
    r = runner.invoke(app, ["fsc", a, str(negative), "--json", "--plot", str(tmp_path / "p.png")])
    assert r.exit_code == 0, r.stderr
    s = _strict_json(r.stdout)
    for x in s["resolution"]:
        assert x["reached"] is True and x["resolution_A"] is None and x["frequency_per_A"] == 0.0
    r = runner.invoke(app, ["fsc", a, str(negative)], env={"COLUMNS": "200"})
    assert r.exit_code == 0 and "inf" not in r.stdout
    assert r.stdout.count("none: below from the first shell") == 2, r.stdout
