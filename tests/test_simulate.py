"""`cryocli simulate`: RELION's image formation reproduced, ground truth written, bad input refused."""

from __future__ import annotations

import json
from pathlib import Path

import mrcfile
import numpy as np
import torch
from typer.testing import CliRunner

from cryocli.cli.app import app
from cryocli.imaging.fourier import image_to_rfft, rfft_radius
from cryocli.io.star import read_star
from tests.conftest import EXTERNAL, MODELS, RELION_SET, need

runner = CliRunner()
DEMO_MODEL = Path(__file__).resolve().parents[1] / "cryocli" / "data" / "4ake_adk_open.pdb"


def _run(*args: str):
    return runner.invoke(app, ["--quiet", *args], catch_exceptions=False)


def _fourier_correlation(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-image correlation of two stacks inside the Nyquist circle."""
    m = rfft_radius(a.shape[-1], dtype=torch.float64) <= a.shape[-1] // 2
    fa = image_to_rfft(torch.from_numpy(a.astype(np.float64)))[:, m]
    fb = image_to_rfft(torch.from_numpy(b.astype(np.float64)))[:, m]
    num = (fa * fb.conj()).real.sum(1)
    return (num / torch.sqrt((fa.abs() ** 2).sum(1) * (fb.abs() ** 2).sum(1))).numpy()


def test_poses_from_relion_reproduces_relion_project(tmp_path: Path) -> None:
    """simulate --poses-from clean.star --snr inf on RELION's map gives relion_project's clean.mrcs."""
    out = tmp_path / "resim"
    res = _run("simulate", str(need(RELION_SET / "map.mrc")), "--poses-from", str(RELION_SET / "clean" / "clean.star"),
               "--snr", "inf", "-o", str(out))
    assert res.exit_code == 0, res.output
    ours = mrcfile.open(out / "Particles" / "particles_0001.mrcs").data
    relion = mrcfile.open(RELION_SET / "clean" / "clean.mrcs").data
    assert ours.shape == relion.shape == (600, 64, 64)
    corr = _fourier_correlation(ours, relion)
    assert corr.min() > 0.99, corr.min()
    # Same sign and scale as relion_project (the map is used unchanged at its own pixel size).
    assert abs(ours.std() / relion.std() - 1) < 0.01
    table = read_star(out / "particles.star")
    source = read_star(RELION_SET / "clean" / "clean.star")
    np.testing.assert_allclose(table.euler_angles, source.euler_angles)
    np.testing.assert_allclose(table.origins_angstrom, source.origins_angstrom)


def test_simulate_model_writes_ground_truth_and_requested_snr(tmp_path: Path) -> None:
    out = tmp_path / "sim"
    res = _run("simulate", str(DEMO_MODEL), "-o", str(out), "-n", "300", "--box", "32", "--apix", "3",
               "--snr", "-10dB", "--shift-sigma", "3", "--stack-size", "128", "--seed", "5")
    assert res.exit_code == 0, res.output
    info = json.loads((out / "simulate.json").read_text())
    assert abs(info["snr_achieved"] / 0.1 - 1) < 0.03
    assert sorted(p.name for p in (out / "Particles").iterdir()) == [
        "particles_0001.mrcs", "particles_0002.mrcs", "particles_0003.mrcs"]
    table = read_star(out / "particles.star")
    assert len(table) == 300 and table.version == "3.1"
    assert table.has_poses and table.has_ctf and set(np.unique(table.random_subset)) == {1, 2}
    defocus = (table.particles["rlnDefocusU"] + table.particles["rlnDefocusV"]) / 2
    assert defocus.min() >= 15000 and defocus.max() <= 20000
    astig = table.particles["rlnDefocusU"] - table.particles["rlnDefocusV"]
    assert astig.min() >= 100 - 1e-6 and astig.max() <= 500 + 1e-6
    assert np.rad2deg(0.2) - 1e-6 <= table.particles["rlnDefocusAngle"].min()
    assert 1.0 < np.std(table.origins_angstrom) < 5.0
    with mrcfile.open(out / "ground_truth.mrc") as m:
        assert m.data.shape == (32, 32, 32) and abs(float(m.voxel_size.x) - 3) < 1e-5


def test_invert_flips_the_sign_and_seed_reproduces(tmp_path: Path) -> None:
    common = ["-n", "20", "--box", "32", "--apix", "3", "--snr", "inf", "--seed", "3"]
    assert _run("simulate", str(DEMO_MODEL), "-o", str(tmp_path / "a"), *common).exit_code == 0
    assert _run("simulate", str(DEMO_MODEL), "-o", str(tmp_path / "b"), *common, "--invert").exit_code == 0
    a = mrcfile.open(tmp_path / "a" / "Particles" / "particles_0001.mrcs").data
    b = mrcfile.open(tmp_path / "b" / "Particles" / "particles_0001.mrcs").data
    np.testing.assert_allclose(a, -b, atol=1e-5 * np.abs(a).max())
    # Protein is bright at the centre by default (CTF(0) = +Q0 on a positive potential).
    assert a[:, 12:20, 12:20].mean() > a.mean()


def test_belt_views_concentrate_tilt(tmp_path: Path) -> None:
    out = tmp_path / "belt"
    assert _run("simulate", str(DEMO_MODEL), "-o", str(out), "-n", "400", "--box", "32", "--apix", "3",
                "--views", "belt", "--no-ctf", "--snr", "1").exit_code == 0
    table = read_star(out / "particles.star")
    tilt = table.euler_angles[:, 1]
    assert np.mean(np.abs(tilt - 90) < 30) > 0.99
    assert not table.has_ctf


def test_refuses_existing_output_and_bad_snr(tmp_path: Path) -> None:
    out = tmp_path / "sim"
    out.mkdir()
    (out / "keep.txt").write_text("results")
    res = _run("simulate", str(DEMO_MODEL), "-o", str(out), "-n", "5", "--box", "32", "--apix", "3")
    assert res.exit_code == 2 and "--force" in res.output
    assert (out / "keep.txt").exists()
    bad = tmp_path / "bad"
    res = _run("simulate", str(DEMO_MODEL), "-o", str(bad), "-n", "5", "--box", "32", "--apix", "3", "--snr", "loud")
    assert res.exit_code == 2 and "snr" in res.output.lower()
    assert not bad.exists() and not any(p.name.startswith(".bad") for p in tmp_path.iterdir())


def test_a_full_disk_is_one_line_and_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    """The disk fills up while the stacks are written: one line naming the file and the system's reason, exit 1
    (the input was fine), and neither the output folder nor its temporary one is left."""
    import errno
    import os

    import cryocli.imaging.simulate as simulate

    written: list[Path] = []

    def full_disk(path, *args, **kwargs):
        written.append(Path(path))
        if len(written) == 2:  # the second stack: a part of the output exists by then
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(path, *args, **kwargs)

    real = simulate.write_stack
    monkeypatch.setattr(simulate, "write_stack", full_disk)
    out = tmp_path / "sim"
    res = runner.invoke(app, ["--quiet", "simulate", str(DEMO_MODEL), "-o", str(out), "-n", "30", "--box", "32",
                              "--apix", "3", "--stack-size", "10"])
    assert len(written) == 2, res.output
    assert res.exit_code == 1
    assert res.output.strip() == f"cryocli: error: the run stopped: No space left on device ({written[1]})", res.output
    assert list(tmp_path.iterdir()) == []


def test_model_too_big_for_box_is_an_error(tmp_path: Path) -> None:
    res = _run("simulate", str(need(MODELS / "4ake_adk_open.pdb")), "-o", str(tmp_path / "x"), "-n", "5",
               "--box", "16", "--apix", "1")
    assert res.exit_code == 2
    assert not (tmp_path / "x").exists()


# ----- names: stacks and micrographs named from the current directory, as RELION names them ----------------
def test_names_are_relative_to_the_cwd_for_the_final_folder(tmp_path: Path, monkeypatch) -> None:
    """-o sim/ from W names W's sim/Particles/... (not the temporary folder it was staged in); particles of
    one synthetic micrograph share its defocus; an output outside the cwd gets absolute names."""
    work = tmp_path.resolve() / "w"
    work.mkdir()
    monkeypatch.chdir(work)
    res = _run("simulate", str(DEMO_MODEL), "-o", "sim/", "-n", "120", "--box", "32", "--apix", "3",
               "--snr", "inf", "--stack-size", "50")
    assert res.exit_code == 0, res.output
    table = read_star("sim/particles.star")
    names = table.particles["rlnImageName"].tolist()
    assert names[0] == "000001@sim/Particles/particles_0001.mrcs"
    assert names[119] == "000020@sim/Particles/particles_0003.mrcs"
    assert all(Path(p).is_file() for p in set(table.image_names[1]))  # read from the cwd, as RELION reads them
    mics = table.particles["rlnMicrographName"]
    assert mics.tolist() == [f"sim/Micrographs/mic_{k // 50 + 1:06d}.mrc" for k in range(120)]
    per_mic = table.particles.groupby("rlnMicrographName")[["rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle"]]
    assert (per_mic.nunique() == 1).all().all()
    assert per_mic.first()["rlnDefocusU"].nunique() == 3
    xy = table.particles[["rlnMicrographName", "rlnCoordinateX", "rlnCoordinateY"]]
    assert not xy.duplicated().any()  # no two particles of a micrograph at the same place
    # outside the cwd: absolute names
    out = tmp_path.resolve() / "elsewhere" / "sim"
    assert _run("simulate", str(DEMO_MODEL), "-o", str(out), "-n", "5", "--box", "32", "--apix", "3",
                "--snr", "inf").exit_code == 0
    far = read_star(out / "particles.star").particles
    assert far["rlnImageName"].iloc[4] == f"000005@{out}/Particles/particles_0001.mrcs"
    assert far["rlnMicrographName"].iloc[0] == f"{out}/Micrographs/mic_000001.mrc"


def test_micrograph_defocus_is_deterministic_and_leaves_poses_alone() -> None:
    from dataclasses import replace as dc_replace

    from cryocli.imaging.simulate import SimulationConfig, draw_geometry

    config = SimulationConfig(n_particles=230, box=32, apix=3.0, seed=4, particles_per_micrograph=100)
    a, b = draw_geometry(config), draw_geometry(config)
    single = draw_geometry(dc_replace(config, particles_per_micrograph=1))
    np.testing.assert_array_equal(a.ctf.defocus_u.numpy(), b.ctf.defocus_u.numpy())
    np.testing.assert_array_equal(a.euler, single.euler)
    np.testing.assert_array_equal(a.subset, single.subset)
    du = a.ctf.defocus_u.numpy()
    assert len(np.unique(single.ctf.defocus_u.numpy())) == 230
    assert [len(np.unique(du[k:k + 100])) for k in (0, 100, 200)] == [1, 1, 1] and len(np.unique(du)) == 3
    # each micrograph takes the values its first particle draws with one defocus per particle
    np.testing.assert_array_equal(du[[0, 150, 229]], single.ctf.defocus_u.numpy()[[0, 100, 200]])


def test_poses_from_keeps_the_source_micrographs() -> None:
    from cryocli.imaging.simulate import SimulationConfig, geometry_from_star, particles_table

    source_path = need(RELION_SET.parents[1] / "external" / "ASPIRE-Python" / "tests" / "saved_test_data"
                       / "sample_particles_relion31.star")
    geometry = geometry_from_star(source_path)
    config = SimulationConfig(n_particles=len(geometry), box=32, apix=1.4)
    names = [f"{i + 1:06d}@resim/Particles/particles_0001.mrcs" for i in range(len(geometry))]
    table = particles_table(geometry, config, names)
    source = read_star(source_path).particles
    assert table.particles["rlnMicrographName"].tolist() == source["rlnMicrographName"].tolist()
    np.testing.assert_array_equal(table.particles["rlnCoordinateX"], source["rlnCoordinateX"])
    # a source without micrographs (relion_project's): one synthetic micrograph per distinct defocus
    clean = geometry_from_star(RELION_SET / "clean" / "clean.star")
    names = [f"{i + 1:06d}@resim/Particles/particles_0001.mrcs" for i in range(len(clean))]
    mics = particles_table(clean, SimulationConfig(n_particles=len(clean), box=64, apix=4.4), names).particles
    assert mics["rlnMicrographName"].iloc[0] == "resim/Micrographs/mic_000001.mrc"
    defocus = mics[["rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle"]]
    assert mics["rlnMicrographName"].nunique() == len(defocus.drop_duplicates())


# ----- particles.png: the first particles without CTF, with it, and as written ------------------------------
PNG_DPI = 120          # cryocli.plots._save
MONTAGE_LAYOUT = {"panel_in": 1.2, "gap_in": 0.1, "label_in": 1.5, "title_in": 0.9, "caption_in": 0.6}  # defaults


def _png_size(rows: int, cols: int) -> tuple[int, int]:
    """(height, width) in pixels of plot_particle_montage's figure at its default geometry."""
    g = MONTAGE_LAYOUT
    width = max(8.0, g["label_in"] + cols * g["panel_in"] + (cols - 1) * g["gap_in"] + 0.1)
    height = g["title_in"] + rows * g["panel_in"] + (rows - 1) * g["gap_in"] + g["caption_in"]
    return round(height * PNG_DPI), round(width * PNG_DPI)


def _panel(png: np.ndarray, n_rows: int, row: int, col: int, box: int) -> np.ndarray:
    """The grey values of the PNG at the centre of each image pixel of panel (row, col)."""
    g = MONTAGE_LAYOUT
    step = g["panel_in"] + g["gap_in"]
    left = (g["label_in"] + col * step) * PNG_DPI
    top = png.shape[0] - (g["caption_in"] + (n_rows - 1 - row) * step + g["panel_in"]) * PNG_DPI
    centres = (np.arange(box) + 0.5) * g["panel_in"] * PNG_DPI / box
    return png[(top + centres).astype(int)][:, (left + centres).astype(int), 0]


def test_particles_png_shows_the_stack_and_the_forward_model(tmp_path: Path) -> None:
    """simulate writes particles.png: 3 rows of the first 6 particles. The helper behind it takes the noisy images
    from the stacks as written (across stack files) and the clean ones from render_clean at the stack's poses,
    origins and CTFs (the stack minus the clean image is noise of the chosen sigma); the PNG's noisy panel of
    particle 1 is the stack's image 1 on its own grey scale."""
    import matplotlib.image

    from cryocli.geometry.rotations import euler_to_matrix
    from cryocli.imaging.projector import Projector
    from cryocli.imaging.simulate import SimulationConfig, draw_geometry, montage_images, render_clean

    out = tmp_path / "sim"
    res = _run("simulate", str(DEMO_MODEL), "-o", str(out), "-n", "20", "--box", "32", "--apix", "3",
               "--snr", "0.5", "--shift-sigma", "2", "--stack-size", "4", "--seed", "4")
    assert res.exit_code == 0, res.output
    assert json.loads((out / "simulate.json").read_text())["files"]["montage"] == "particles.png"
    stacks = sorted((out / "Particles").iterdir())
    written = np.concatenate([mrcfile.open(p).data for p in stacks])

    config = SimulationConfig(n_particles=20, box=32, apix=3.0, snr=0.5, shift_sigma=2.0, seed=4, stack_size=4)
    geometry = draw_geometry(config)
    projector = Projector(torch.from_numpy(mrcfile.open(out / "ground_truth.mrc").data.copy()), pad=2)
    montage = montage_images(projector, geometry, config, stacks)
    np.testing.assert_array_equal(montage.index, np.arange(6))
    np.testing.assert_array_equal(montage.written, written[:6])          # read back, across two stack files
    e = torch.as_tensor(geometry.euler[:6], dtype=torch.float32)
    rotations = euler_to_matrix(e[:, 0], e[:, 1], e[:, 2])
    origins = torch.as_tensor(geometry.origins[:6], dtype=torch.float32)
    ctf = geometry.ctf.index(torch.arange(6))
    np.testing.assert_array_equal(montage.with_ctf, render_clean(projector, rotations, origins, ctf, 3.0).numpy())
    np.testing.assert_array_equal(montage.projection, render_clean(projector, rotations, origins, None, 3.0).numpy())
    sigma = json.loads((out / "simulate.json").read_text())["noise_sigma"]
    assert abs(float(np.std(montage.written - montage.with_ctf)) / sigma - 1) < 0.05
    np.testing.assert_allclose(montage.defocus, (geometry.ctf.defocus_u[:6] + geometry.ctf.defocus_v[:6]).numpy() / 2)

    png = matplotlib.image.imread(out / "particles.png")
    assert png.shape[:2] == _png_size(3, 6)
    for col in (0, 5):
        image = written[col].astype(np.float64)
        expected = (image - image.min()) / (image.max() - image.min())
        np.testing.assert_allclose(_panel(png, 3, 2, col, 32), expected, atol=2 / 255)
    clean = montage.with_ctf[0].astype(np.float64)
    np.testing.assert_allclose(_panel(png, 3, 1, 0, 32), (clean - clean.min()) / (clean.max() - clean.min()),
                               atol=2 / 255)


def test_particles_png_is_byte_identical_for_the_same_seed_and_follows_the_umask(tmp_path: Path) -> None:
    """Two runs with the same seed give the same PNG bytes; without CTF the montage has two rows; the file has
    the umask's permissions, and no temporary is left beside it."""
    import os
    import stat

    import matplotlib.image

    common = ["-n", "8", "--box", "32", "--apix", "3", "--snr", "0.2", "--seed", "7", "--no-ctf"]
    old = os.umask(0o027)
    try:
        for name in ("a", "b"):
            assert _run("simulate", str(DEMO_MODEL), "-o", str(tmp_path / name), *common).exit_code == 0
    finally:
        os.umask(old)
    a, b = (tmp_path / "a" / "particles.png"), (tmp_path / "b" / "particles.png")
    assert a.read_bytes() == b.read_bytes()
    assert stat.S_IMODE(a.stat().st_mode) == 0o640
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [
        "Particles", "ground_truth.mrc", "particles.png", "particles.star", "simulate.json"]
    assert matplotlib.image.imread(a).shape[:2] == _png_size(2, 6)


def test_a_map_is_simulated_on_its_own_grid_unless_told_otherwise(tmp_path: Path) -> None:
    """A map keeps its voxel size and box by default (it was resampled to 128 px at 0.8 A, cropping a 282 A
    particle to 102 A); --apix alone keeps its field of view; a box that crops the map says so."""
    source = need(RELION_SET / "map.mrc")
    with mrcfile.open(source) as m:
        truth, voxel = np.asarray(m.data, dtype=np.float64), float(m.voxel_size.x)
    assert truth.shape == (64, 64, 64) and abs(voxel - 4.4) < 1e-4
    common = ["-n", "20", "--snr", "inf", "--no-ctf"]
    assert _run("simulate", str(source), "-o", str(tmp_path / "own"), *common).exit_code == 0
    with mrcfile.open(tmp_path / "own" / "ground_truth.mrc") as m:
        assert m.data.shape == (64, 64, 64) and abs(float(m.voxel_size.x) - voxel) < 1e-4
        assert np.corrcoef(np.asarray(m.data, dtype=np.float64).ravel(), truth.ravel())[0, 1] > 0.9999
    assert _run("simulate", str(source), "-o", str(tmp_path / "half"), "--apix", "8.8", *common).exit_code == 0
    with mrcfile.open(tmp_path / "half" / "ground_truth.mrc") as m:
        assert m.data.shape == (32, 32, 32) and abs(float(m.voxel_size.x) - 8.8) < 1e-4
    cropped = runner.invoke(app, ["simulate", str(source), "-o", str(tmp_path / "crop"), "--box", "32", *common],
                            catch_exceptions=False)
    assert cropped.exit_code == 0, cropped.output
    text = " ".join(cropped.output.split())
    assert "warning: the 32 px box at 4.4 A/px (140.8 A) crops the 281.6 A map" in text, text
    info = json.loads((tmp_path / "crop" / "simulate.json").read_text())
    assert info["map_fraction_outside_box"] > 0.01
    assert info["parameters"]["box"] == 32 and info["parameters"]["apix"] == 4.4


def test_a_bad_snr_is_one_line_naming_the_option(tmp_path: Path) -> None:
    """simulate and abinitio (cryo2ssnet's --snr) both read --snr through parse_snr: the error names the flag."""
    for argv in (["simulate", str(DEMO_MODEL), "-o", str(tmp_path / "sim"), "-n", "5", "--box", "32", "--apix", "3"],
                 ["abinitio", str(tmp_path / "p.star"), "--method", "cryo2ssnet", "-o", str(tmp_path / "run")]):
        res = CliRunner().invoke(app, [*argv, "--snr", "0"])
        lines = [line for line in res.stderr.splitlines() if line.strip()]
        assert res.exit_code == 2 and lines == ["cryocli: error: --snr 0: the SNR must be positive and finite (or inf "
                                                "for no noise)"], res.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_map_without_a_voxel_size_takes_apix(tmp_path: Path) -> None:
    """ASPIRE's and cryoDRGN's maps have a cell of 0: simulate said 'no voxel size' with no way to give one. Now
    --apix is the map's voxel size (the map is used on its own grid), and without it the error says to pass it."""
    source = need(EXTERNAL / "ASPIRE-Python" / "gallery" / "tutorials" / "data" / "clean70SRibosome_vol_65p.mrc")
    with mrcfile.open(source, permissive=True) as m:
        assert float(m.voxel_size.x) == 0
        truth = np.asarray(m.data, dtype=np.float64)
    refused = _run("simulate", str(source), "-o", str(tmp_path / "none"), "-n", "4")
    assert refused.exit_code == 2 and not (tmp_path / "none").exists()
    assert "no voxel size in its header: give it with --apix" in " ".join(refused.output.split())
    res = _run("simulate", str(source), "-o", str(tmp_path / "given"), "-n", "4", "--apix", "5", "--snr", "inf")
    assert res.exit_code == 0, res.output
    with mrcfile.open(tmp_path / "given" / "ground_truth.mrc") as m:
        assert m.data.shape == truth.shape and abs(float(m.voxel_size.x) - 5) < 1e-5
        assert np.corrcoef(np.asarray(m.data, dtype=np.float64).ravel(), truth.ravel())[0, 1] > 0.9999
    assert json.loads((tmp_path / "given" / "simulate.json").read_text())["map_voxel_size_from"] == "--apix"
