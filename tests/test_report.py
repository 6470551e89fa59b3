"""`cryocli report` and cryocli/report.py: the picture shows the map's own slices and projections, the FSC with
the resolutions the run reports, the history per run and the folded viewing directions; the PNG has the size
the layout says and the same bytes for the same data; RELION jobs and cryocli run directories are read."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest
import starfile
import torch
from typer.testing import CliRunner

from cryocli.analysis.angdist import angdist_bild_text
from cryocli.analysis.fsc import fsc_curve, shell_frequency
from cryocli.cli.app import app
from cryocli.errors import CryocliError
from cryocli.geometry.rotations import euler_to_matrix, random_rotations
from cryocli.io.mrc import read_map, write_map
from cryocli.report import (
    ReportData,
    draw_report,
    history_series,
    report_arrays,
    report_figure_size,
    report_from_relion_job,
    report_from_run_directory,
    report_source,
    viewing_histogram,
    write_report,
)
from tests.conftest import RELION_SET, need

REFINE_JOB = RELION_SET / "refine"
MODEL = Path(__file__).resolve().parents[1] / "cryocli" / "data" / "4ake_adk_open.pdb"
runner = CliRunner()


def _error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("cryocli: error: "), result.stderr
    return lines[0]


def _volume(n: int = 24, seed: int = 0) -> np.ndarray:
    """An asymmetric map: a blob off centre plus noise, so that every slice and projection differs."""
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[:n, :n, :n].astype(np.float32)
    blob = np.exp(-((x - 0.6 * n) ** 2 + (y - 0.45 * n) ** 2 + (z - 0.4 * n) ** 2) / (0.02 * n * n))
    return (blob + 0.05 * rng.standard_normal((n, n, n))).astype(np.float32)


def _data(n: int = 24, particles: int = 500, history: bool = True, mask: bool = True, sym: str = "C1") -> ReportData:
    vol = _volume(n)
    z, y, x = np.mgrid[:n, :n, :n]
    sphere = (((x - n // 2) ** 2 + (y - n // 2) ** 2 + (z - n // 2) ** 2) < (0.35 * n) ** 2).astype(np.float32)
    freq = shell_frequency(n, 3.0)
    curve = np.clip(1.2 - 8 * freq, -0.05, 1.0)
    truth = np.clip(1.1 - 9 * freq, -0.05, 1.0)
    rows = []
    if history:
        for run in ("half1", "half2"):
            for epoch in range(1, 6):
                rows.append({"run": run, "epoch": epoch, "lr": 0.01, "stage": "decode", "local": epoch > 2,
                             "pose_change_deg": 10.0 / epoch, "loss": 5.0 - epoch + (run == "half2"),
                             "resolution_A": 20.0 - epoch, "grid_win_fraction": "" if epoch == 1 else 0.5})
    rots = random_rotations(particles, generator=torch.Generator().manual_seed(1), dtype=torch.float64).numpy()
    return ReportData(title="refine --method relion (test)", volume=vol, voxel_size=3.0, mask=sphere if mask else None,
                      fsc={"half maps": (freq, curve), "vs truth": (freq, truth)},
                      fsc_thresholds={"half maps": 0.143, "vs truth": 0.5},
                      resolutions={"half maps": 7.5, "vs truth": 9.25}, resolution_A=7.5, history=rows,
                      rotations=rots if particles else None, box=n, pixel_size=3.0, sym=sym, contour_level=0.4,
                      contour_basis="mass 20 kDa")


def test_report_arrays_are_the_maps_central_slices_and_sums() -> None:
    data = _data()
    vol, mask, c = data.volume, data.mask, data.n // 2
    assert mask is not None
    arrays = report_arrays(data)
    np.testing.assert_array_equal(arrays.slices["z"], vol[c])
    np.testing.assert_array_equal(arrays.slices["y"], vol[:, c])
    np.testing.assert_array_equal(arrays.slices["x"], vol[:, :, c])
    for i, axis in enumerate(("z", "y", "x")):
        np.testing.assert_allclose(arrays.projections[axis], vol.sum(axis=i), rtol=1e-5, atol=1e-5)
        assert arrays.mask_projections is not None and arrays.mask_slices is not None
        np.testing.assert_array_equal(arrays.mask_projections[axis], mask.max(axis=i))
    np.testing.assert_array_equal(arrays.mask_slices["y"], mask[:, c])
    # One grey scale per row, spanning the row's three images.
    assert arrays.slice_range == (min(float(a.min()) for a in arrays.slices.values()),
                                  max(float(a.max()) for a in arrays.slices.values()))
    assert arrays.projection_range[1] == max(float(a.max()) for a in arrays.projections.values())
    assert not np.allclose(arrays.slices["z"], arrays.slices["y"])  # the three cuts are different pictures


def test_the_figure_draws_those_arrays_on_a_shared_scale_with_the_mask_outline() -> None:
    data = _data()
    arrays = report_arrays(data)
    fig = draw_report(data)
    drawn = {ax.get_title(): ax for ax in fig.axes if ax.images}
    c = data.n // 2
    for axis in ("z", "y", "x"):
        slice_ax, sum_ax = drawn[f"slice {axis} = {c}"], drawn[f"sum along {axis}"]
        np.testing.assert_array_equal(np.asarray(slice_ax.images[0].get_array()), arrays.slices[axis])
        np.testing.assert_array_equal(np.asarray(sum_ax.images[0].get_array()), arrays.projections[axis])
        assert slice_ax.images[0].get_clim() == arrays.slice_range
        assert sum_ax.images[0].get_clim() == arrays.projection_range
        assert slice_ax.images[0].origin == "lower"
        # The mask's 0.5 outline is drawn on every image (a contour set per axes).
        assert slice_ax.collections and sum_ax.collections


def test_fsc_panel_writes_each_resolution_at_its_threshold() -> None:
    fig = draw_report(_data())
    (ax,) = [ax for ax in fig.axes if ax.get_xlabel().startswith("spatial frequency")]
    notes = [t.get_text() for t in ax.texts]
    assert "7.50 Å" in notes and "9.25 Å" in notes
    horizontals = {round(float(line.get_ydata()[0]), 3) for line in ax.lines if len(set(line.get_ydata())) == 1}
    assert {0.143, 0.5} <= horizontals
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["half maps (at 0.143): 7.50 Å", "vs truth (at 0.5): 9.25 Å"]


def test_history_orders_resolution_objective_pose_change_then_the_rest_one_line_per_run() -> None:
    data = _data()
    columns, series = history_series(data.history)
    assert columns == ["resolution_A", "loss", "pose_change_deg", "lr", "local", "grid_win_fraction"]  # no "stage"
    assert list(series["loss"]) == ["half1", "half2"]
    x, y = series["loss"]["half2"]
    np.testing.assert_array_equal(x, [1, 2, 3, 4, 5])
    np.testing.assert_array_equal(y, [5, 4, 3, 2, 1])
    assert np.isnan(series["grid_win_fraction"]["half1"][1][0])  # an empty CSV cell is a gap
    fig = draw_report(data)
    panels = {ax.get_title(): ax for ax in fig.axes if ax.get_xlabel() == "epoch" or ax.get_title() in columns}
    assert set(columns) <= set(panels)
    assert len(panels["loss"].lines) == 2


def test_viewing_histogram_counts_every_particle_folded_into_the_asymmetric_unit() -> None:
    counts, x_edges, y_edges = viewing_histogram(_data(particles=2000))
    assert counts.sum() == 2000 and counts.shape == (len(y_edges) - 1, len(x_edges) - 1)
    counts, x_edges, y_edges = viewing_histogram(_data(particles=2000, sym="C4"))
    assert counts.sum() == 2000
    # C4's unit is -45 <= rot <= 45 by its HEALPix pixel centres (order 3, 7.3 degree pixels): away from the poles
    # (where a pixel spans many rot) directions stay within a pixel of it.
    equator = (y_edges[:-1] >= -40) & (y_edges[1:] <= 40)
    outside = (x_edges[:-1] >= 53) | (x_edges[1:] <= -53)
    inside = (x_edges[:-1] >= -45) & (x_edges[1:] <= 45)
    assert counts[np.ix_(equator, outside)].sum() == 0
    assert counts[:, inside].sum() > 0.8 * 2000


def test_write_report_png_size_bytes_and_permissions(tmp_path: Path) -> None:
    data = _data()
    old = os.umask(0o027)
    try:
        files = write_report(tmp_path / "a", data)
        write_report(tmp_path / "b", data)
    finally:
        os.umask(old)
    assert set(files) == {"report", "angdist"}
    a, b = Path(files["report"]), tmp_path / "b" / "report.png"
    assert a.read_bytes() == b.read_bytes()
    assert (tmp_path / "a" / "angdist.bild").read_bytes() == (tmp_path / "b" / "angdist.bild").read_bytes()
    image = mpimg.imread(a)
    width, height = report_figure_size(data)
    assert image.shape[:2] == (height, width) and width == 1600
    assert stat.S_IMODE(a.stat().st_mode) == 0o640
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["angdist.bild", "report.png"]  # no temporaries
    assert (tmp_path / "a" / "angdist.bild").read_text() == angdist_bild_text(data.rotations, data.n, 3.0, "C1")
    # Without history, poses or FSC the picture is the map alone, smaller.
    bare = ReportData(title="map", volume=data.volume, voxel_size=3.0)
    only = write_report(tmp_path / "c", bare)
    assert set(only) == {"report"}
    assert mpimg.imread(only["report"]).shape[:2] == report_figure_size(bare)[::-1]
    assert report_figure_size(bare)[1] < height


def test_report_from_relion_job_reads_set_3j9g() -> None:
    data = report_from_relion_job(need(REFINE_JOB))
    assert data.n_particles == 600 and data.rotations is not None and data.rotations.shape == (600, 3, 3)
    model = starfile.read(REFINE_JOB / "run_model.star", read_n_blocks=3, always_dict=True)
    assert data.resolution_A == pytest.approx(model["model_general"]["rlnCurrentResolution"])  # 11.733334
    (label,) = data.fsc
    freq, curve = data.fsc[label]
    np.testing.assert_allclose(curve, model["model_class_1"]["rlnGoldStandardFsc"])
    assert len(freq) == 33 and data.fsc_thresholds[label] == 0.143
    assert data.resolutions[label] == pytest.approx(11.733334)
    np.testing.assert_array_equal(data.volume, read_map(REFINE_JOB / "run_class001.mrc").data)
    assert (data.box, data.pixel_size, data.sym) == (64, pytest.approx(4.4), "C1")
    table = starfile.read(REFINE_JOB / "run_data.star", always_dict=True)["particles"]
    first = euler_to_matrix(*(torch.tensor(float(table[c][0]), dtype=torch.float64)
                              for c in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"))).numpy()
    np.testing.assert_allclose(data.rotations[0], first, atol=1e-12)
    assert data.history == [] and data.mask is None and data.contour_level is not None
    assert "Refine3D" in data.title and report_source(REFINE_JOB) == "relion"


def _fake_iterations(tmp_path: Path, final: bool) -> Path:
    """A RELION job with two iterations' files (links to set_3j9g's), and the final ones when ``final``."""
    job = tmp_path / "Refine3D" / "job001"
    job.mkdir(parents=True)
    src = need(REFINE_JOB)
    for it in (1, 2):
        for half in (1, 2):
            (job / f"run_it{it:03d}_half{half}_model.star").symlink_to(src / "run_model.star")
            (job / f"run_it{it:03d}_half{half}_class001.mrc").symlink_to(src / f"run_half{half}_class001_unfil.mrc")
        (job / f"run_it{it:03d}_optimiser.star").symlink_to(src / "run_optimiser.star")
        (job / f"run_it{it:03d}_data.star").symlink_to(src / "run_data.star")
    if final:
        for name in ("run_data.star", "run_model.star", "run_class001.mrc", "run_half1_class001_unfil.mrc",
                     "run_half2_class001_unfil.mrc", "run_optimiser.star", "run_sampling.star"):
            (job / name).symlink_to(src / name)
    return job


def test_report_from_relion_job_reads_the_history_of_its_iterations(tmp_path: Path) -> None:
    job = _fake_iterations(tmp_path, final=True)
    data = report_from_relion_job(job)
    assert [(r["run"], r["epoch"]) for r in data.history] == [("half1", 1), ("half2", 1), ("half1", 2), ("half2", 2)]
    row = data.history[0]
    assert row["resolution_A"] == pytest.approx(11.733334) and row["pose_change_deg"] == pytest.approx(0.265264)
    columns, _ = history_series(data.history)
    assert columns[:3] == ["resolution_A", "log_likelihood", "pose_change_deg"]
    assert data.epoch_label == "iteration"


def test_report_from_an_unfinished_relion_job_uses_the_last_iteration(tmp_path: Path) -> None:
    job = _fake_iterations(tmp_path, final=False)
    data = report_from_relion_job(job)
    assert "run_it002" in data.title and data.n_particles == 600
    halves = [read_map(REFINE_JOB / f"run_half{i}_class001_unfil.mrc").data for i in (1, 2)]
    np.testing.assert_allclose(data.volume, 0.5 * (halves[0] + halves[1]), rtol=1e-6)


@pytest.fixture(scope="module")
def refine_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cryocli refine run directory (160 particles of 24 px, two iterations)."""
    base = tmp_path_factory.mktemp("report")
    sim = base / "sim"
    r = runner.invoke(app, ["--quiet", "simulate", str(MODEL), "-o", str(sim), "-n", "160", "--box", "24", "--apix", "4",
                            "--snr", "1", "--seed", "2"])
    assert r.exit_code == 0, r.output
    out = base / "ref"
    r = runner.invoke(app, ["--quiet", "refine", str(sim / "particles.star"), "--ref", str(sim / "ground_truth.mrc"),
                            "-o", str(out), "--max-iter", "2"])
    assert r.exit_code == 0, r.output
    return out


def test_report_from_run_directory_reads_the_runs_files(refine_run: Path) -> None:
    data = report_from_run_directory(refine_run)
    finish = [json.loads(line) for line in (refine_run / "log.jsonl").read_text().splitlines()][-1]
    assert "refine --method relion" in data.title and data.n_particles == 160 == finish["particles"]
    (label,) = data.fsc
    assert data.resolutions[label] == pytest.approx(finish["gold_standard_resolution_A"])
    assert data.resolution_A == pytest.approx(finish["gold_standard_resolution_A"])
    np.testing.assert_allclose(data.fsc[label][1], starfile.read(refine_run / "fsc.star")["rlnFourierShellCorrelation"])
    assert [(r["run"], int(r["epoch"])) for r in data.history] == [("full", 1), ("full", 2)]
    np.testing.assert_array_equal(data.volume, read_map(refine_run / "map.mrc").data)
    assert data.rotations is not None and data.rotations.shape == (160, 3, 3) and (data.box, data.sym) == (24, "C1")
    columns, _ = history_series(data.history)
    assert columns[:2] == ["resolution_A", "rot_change_deg"]


def test_a_mask_in_the_run_directory_adds_the_masked_and_unmasked_fsc_and_its_outline(refine_run: Path,
                                                                                     tmp_path: Path) -> None:
    run = tmp_path / "ref"
    shutil.copytree(refine_run, run)
    n = 24
    z, y, x = np.mgrid[:n, :n, :n]
    sphere = (((x - n // 2) ** 2 + (y - n // 2) ** 2 + (z - n // 2) ** 2) < 8.0**2).astype(np.float32)
    write_map(run / "mask.mrc", sphere, 4.0, "test mask")
    data = report_from_run_directory(run)
    assert data.mask is not None and np.array_equal(data.mask, sphere)
    assert set(data.fsc) == {"gold standard (half maps)", "half maps, unmasked", "half maps, masked (corrected)"}
    halves = [read_map(run / f"half{i}_unfil.mrc").data for i in (1, 2)]
    np.testing.assert_allclose(data.fsc["half maps, unmasked"][1], fsc_curve(*halves), atol=1e-6)
    assert all(data.fsc_thresholds[label] == 0.143 for label in data.fsc)
    files = write_report(run, data)
    assert mpimg.imread(files["report"]).shape[:2] == report_figure_size(data)[::-1]


def test_cli_refreshes_a_run_directorys_own_report(refine_run: Path) -> None:
    for _ in range(2):  # the second time over the first report, without --force
        r = runner.invoke(app, ["report", str(refine_run), "--json"])
        assert r.exit_code == 0, r.stderr
    files = json.loads(r.stdout)["files"]
    assert files == {"report": str(refine_run / "report.png"), "angdist": str(refine_run / "angdist.bild")}
    assert mpimg.imread(files["report"]).shape[1] == 1600


def test_cli_report_of_set_3j9g_into_an_output_folder(tmp_path: Path) -> None:
    out = tmp_path / "out"
    r = runner.invoke(app, ["report", str(need(REFINE_JOB)), "-o", str(out)])
    assert r.exit_code == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["angdist.bild", "report.png"]
    assert "level" in r.stdout
    before = (out / "report.png").read_bytes()
    assert "--force" in _error_line(runner.invoke(app, ["report", str(REFINE_JOB), "-o", str(out)]))
    r = runner.invoke(app, ["report", str(REFINE_JOB), "-o", str(out), "--force", "--mass", "300", "--json"])
    assert r.exit_code == 0, r.stderr
    summary = json.loads(r.stdout)
    assert set(summary["files"]) == {"report", "angdist"} and summary["contour_basis"].startswith("mass 300 kDa")
    assert (out / "report.png").read_bytes() != before  # the new level is in the title


def test_cli_bad_path_is_one_error_line(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.star").write_text("data_\n")
    for path, words in ((tmp_path / "missing", "not found"), (tmp_path / "file.star", "not a folder"),
                        (tmp_path / "empty", "neither a cryocli run directory")):
        assert words in _error_line(runner.invoke(app, ["report", str(path)]))
    for option, words in ((["--sym", "X3"], "--sym X3"), (["--mass", "0"], "--mass 0")):
        line = _error_line(runner.invoke(app, ["report", str(need(REFINE_JOB)), "-o", str(tmp_path / "o"), *option]))
        assert words in line
    assert not (tmp_path / "o").exists()
    with pytest.raises(CryocliError, match="not found"):
        report_source(tmp_path / "missing")


def test_cli_refuses_to_write_into_a_read_only_job_folder(tmp_path: Path) -> None:
    job = tmp_path / "job"
    shutil.copytree(need(REFINE_JOB), job, ignore=shutil.ignore_patterns("run_sampling.star", "ref_lp40.mrc",
                                                                          "refine_input.star"))
    job.chmod(0o555)
    try:
        line = _error_line(runner.invoke(app, ["report", str(job)]))
        assert "-o" in line and not (job / "report.png").exists()
    finally:
        job.chmod(0o755)
