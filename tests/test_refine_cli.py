"""`cryocli refine` runs end to end on real RELION particles (results on 5-17 particles are not judged) and its
half maps go through `cryocli postprocess`; bad input leaves no run directory behind."""

from __future__ import annotations

from pathlib import Path

import pytest
import starfile
from typer.testing import CliRunner

from cryocli.cli.app import app
from cryocli.engines.common.reconstruct import reconstruct
from cryocli.imaging.fourier import fourier_crop_images
from cryocli.io.dataset import ParticleStack
from cryocli.io.mrc import write_map
from cryocli.io.star import read_star
from tests.conftest import ASPIRE, CRYODRGN, CRYOJAX, RELION_SET, need, strip_pixel_size

runner = CliRunner()
BOX = 32
REAL = ASPIRE / "sample_particles_relion31.star"  # 17 real beta-galactosidase particles, 2 optics groups


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A reference of the particles' field of view at 32 px (their own reconstruction at the STAR poses)."""
    stack = ParticleStack(read_star(need(REAL)))
    images = fourier_crop_images(stack.images(range(len(stack))), BOX)
    apix = stack.pixel_size * stack.box / BOX
    vol = reconstruct(images, stack.rotations, stack.shifts_angstrom, stack.ctf_params, apix)
    ref = tmp_path_factory.mktemp("ref") / "ref.mrc"
    write_map(ref, vol.numpy(), apix, "reference for test_refine_cli")
    return ref


@pytest.mark.parametrize("method", ["relion", "sparse-tv"])
def test_refine_runs_on_real_particles_and_feeds_postprocess(reference: Path, tmp_path: Path, method: str) -> None:
    out = tmp_path / method
    r = runner.invoke(app, ["--quiet", "refine", str(REAL), "--ref", str(reference), "--method", method, "-o", str(out),
                            "--box", str(BOX), "--max-iter", "1"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    for name in ("half1_unfil.mrc", "half2_unfil.mrc", "map.mrc", "particles.star", "model.star", "checkpoint.pt"):
        assert (out / name).is_file(), name
    table = read_star(out / "particles.star")
    source = read_star(REAL)
    assert len(table) == len(source)
    for column in source.particles.columns:
        assert column in table.particles.columns, column
    for column in ("rlnMaxValueProbDistribution", "rlnNrOfSignificantSamples", "rlnLogLikeliContribution",
                   "rlnNormCorrection"):
        assert column in table.particles.columns, column
    assert table.particles["rlnNormCorrection"].astype(float).mean() == pytest.approx(1.0, abs=1e-4)
    model = starfile.read(out / "model.star", always_dict=True)
    groups = model["model_groups"]  # --scale on by default, as RELION's auto-refine job
    assert groups["rlnGroupNrParticles"].sum() == len(source)
    assert (groups["rlnGroupScaleCorrection"] > 0).all()
    shells = model["model_class_1"]
    assert {"rlnGoldStandardFsc", "rlnSsnrMap", "rlnReferenceTau2"} <= set(shells.columns)
    assert (shells["rlnReferenceTau2"] >= 0).all() and (shells["rlnReferenceTau2"] > 0).any()
    assert "rlnSigma2Noise" in model["model_optics_group_1"].columns
    check_report_files(out, len(source))
    pp = runner.invoke(app, ["--quiet", "postprocess", str(out / "half1_unfil.mrc"), str(out / "half2_unfil.mrc"),
                             "-o", str(tmp_path / f"pp_{method}"), "--bfactor", "0"], catch_exceptions=False)
    assert pp.exit_code == 0, pp.output


def check_report_files(run: Path, particles: int) -> None:
    """report.png opens at its drawn size; angdist.bild parses (``.color r g b`` / ``.cylinder`` with 7 numbers),
    with one cylinder per occupied direction whose lengths grow with the counts."""
    import matplotlib.image as mpimg
    import numpy as np

    from cryocli.report import read_report, report_figure_size

    image = mpimg.imread(run / "report.png")
    assert image.shape[:2] == report_figure_size(read_report(run))[::-1]
    lines = (run / "angdist.bild").read_text().splitlines()
    colours = [line for line in lines if line.startswith(".color")]
    cylinders = [line for line in lines if line.startswith(".cylinder")]
    assert colours and len(colours) == len(cylinders) and len(colours) + len(cylinders) == len(lines)
    assert all(len(c.split()) == 4 for c in colours) and all(len(c.split()) == 8 for c in cylinders)
    values = np.array([[float(v) for v in c.split()[1:]] for c in cylinders])
    assert np.isfinite(values).all() and len(values) <= particles


def _blob_reference(stack: ParticleStack, path: Path) -> Path:
    """A Gaussian blob of the particles' field of view at BOX px."""
    import numpy as np

    r2 = ((np.indices((BOX,) * 3) - BOX // 2) ** 2).sum(0)
    write_map(path, np.exp(-r2 / (2 * (BOX / 8) ** 2)).astype(np.float32), stack.pixel_size * stack.box / BOX, "blob")
    return path


def test_refine_runs_on_a_relion_30_file(tmp_path: Path) -> None:
    """A RELION 3.0 file without poses, origins or optics table (EMPIAR-10076, 7 particles, 320 px), from a
    blob of its field of view: both methods run an iteration, keep the input columns (3.0 per-particle
    optics move to data_optics) and write half maps postprocess reads."""
    import numpy as np

    star = need(CRYODRGN / "empiar_10076_7.star")
    stack = ParticleStack(read_star(star))
    ref = _blob_reference(stack, tmp_path / "blob.mrc")
    for method in ("relion", "sparse-tv"):
        out = tmp_path / method
        r = runner.invoke(app, ["--quiet", "refine", str(star), "--ref", str(ref), "--method", method, "-o", str(out),
                                "--box", str(BOX), "--max-iter", "1"], catch_exceptions=False)
        assert r.exit_code == 0, r.output
        table = read_star(out / "particles.star")
        assert len(table) == len(stack)
        kept = set(table.particles.columns) | set(table.optics.columns)
        assert set(stack.table.particles.columns) - {"rlnOriginX", "rlnOriginY"} <= kept
        assert np.isfinite(table.euler_angles).all()
        pp = runner.invoke(app, ["--quiet", "postprocess", str(out / "half1_unfil.mrc"), str(out / "half2_unfil.mrc"),
                                 "-o", str(tmp_path / f"pp_{method}"), "--bfactor", "0"], catch_exceptions=False)
        assert pp.exit_code == 0, pp.output


def test_half_sets_too_small_is_one_error_line_naming_the_file(tmp_path: Path) -> None:
    """cryoDRGN's RELION 3.1 file puts its 5 particles all in rlnRandomSubset 1."""
    star = need(CRYODRGN / "relion31.star")
    ref = _blob_reference(ParticleStack(read_star(star)), tmp_path / "blob.mrc")
    out = tmp_path / "run"
    r = runner.invoke(app, ["--quiet", "refine", str(star), "--ref", str(ref), "-o", str(out), "--box", str(BOX)])
    assert r.exit_code == 2
    assert str(star) in r.output and "found 5 in half 1 and 0 in half 2" in r.output
    assert len(r.output.strip().splitlines()) == 1
    assert not out.exists()


def test_reference_of_another_size_is_refused_without_leftovers(tmp_path: Path) -> None:
    out = tmp_path / "run"
    r = runner.invoke(app, ["--quiet", "refine", str(REAL), "--ref", str(need(CRYOJAX / "trpv1_volume.mrc")),
                            "--method", "relion", "-o", str(out), "--box", "32", "--max-iter", "1"])
    assert r.exit_code == 2
    assert "reference" in r.output
    assert not out.exists()


def test_resume_continues_a_finished_run_and_plain_rerun_is_refused(tmp_path: Path) -> None:
    """One iteration, then --resume with --max-iter 3 runs iterations 2 and 3 on top of the first (its
    metrics row kept), and rewrites the results; running again without --resume or --force is refused. A --resume
    with options other than the run's (but how long it runs and the batch size) or on another number of particles
    is one error line naming what differs, and leaves the run as it was."""
    stack = ParticleStack(read_star(need(REAL)))
    ref = _blob_reference(stack, tmp_path / "blob.mrc")
    out = tmp_path / "run"
    base = ["--quiet", "refine", str(REAL), "--ref", str(ref), "-o", str(out), "--box", str(BOX)]
    assert runner.invoke(app, [*base, "--max-iter", "1"]).exit_code == 0
    first = (out / "metrics.csv").read_text().splitlines()
    assert len(first) == 2
    fewer = tmp_path / "fewer.star"
    table = starfile.read(REAL)
    kept = table["particles"].iloc[:-1].copy()
    kept["rlnImageName"] = [f"{i}@{REAL.parent / name}" for i, name in kept["rlnImageName"].str.split("@", n=1)]
    starfile.write({"optics": table["optics"], "particles": kept}, fewer)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    for args, words in (([*base, "--sym", "C2"], ["--sym C2", "made with C1"]),
                        (["--seed", "5", *base], ["--seed 5", "made with 0"]),
                        ([*base, "--ini-lowpass", "30"], ["--ini-lowpass 30", "made with 40"]),
                        ([*base, "--particle-diameter", "150"], ["--particle-diameter 150", "the default"]),
                        ([*base[:2], str(fewer), *base[3:]], [str(fewer), "16 particles", "made on 17"])):
        refused = runner.invoke(app, [*args, "--max-iter", "3", "--resume"])
        assert refused.exit_code == 2, refused.output
        assert len(refused.output.strip().splitlines()) == 1 and all(w in refused.output for w in words), refused.output
        assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    r = runner.invoke(app, [*base, "--max-iter", "3", "--resume", "--batch-size", "5"])
    assert r.exit_code == 0, r.output
    rows = (out / "metrics.csv").read_text().splitlines()
    assert rows[:2] == first and [row.split(",")[1] for row in rows[1:]] == ["1", "2", "3"]
    assert len(read_star(out / "particles.star")) == len(stack)
    again = runner.invoke(app, [*base, "--max-iter", "3"])
    assert again.exit_code == 2 and "--resume" in again.output


def test_sparse_tv_resume_searches_beta_around_the_kept_scale(tmp_path: Path) -> None:
    """The checkpoint carries each half's kept beta scale: after --resume the second M-step tries that scale
    and its neighbours (/ 2, x 2), not the first M-step's grid again."""
    import csv

    stack = ParticleStack(read_star(need(REAL)))
    ref = _blob_reference(stack, tmp_path / "blob.mrc")
    out = tmp_path / "run"
    base = ["--quiet", "refine", str(REAL), "--ref", str(ref), "-o", str(out), "--box", str(BOX), "--method",
            "sparse-tv"]
    assert runner.invoke(app, [*base, "--max-iter", "1"]).exit_code == 0
    r = runner.invoke(app, [*base, "--max-iter", "2", "--resume"])
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    kept = float(rows[0]["beta_scale_h1"])
    tried = sorted(float(k.rsplit("_b", 1)[1]) for k, v in rows[1].items() if k.startswith("heldout_h1_b") and v)
    assert tried == pytest.approx(sorted({min(50.0, max(0.05, kept * f)) for f in (0.5, 1.0, 2.0)}), rel=1e-2)


def test_streamed_particles_give_the_run_of_preloaded_ones(reference: Path, tmp_path: Path) -> None:
    """--preload no reads every batch from the stacks (memory flat in the particle count) and normalises with the
    moments of one streamed pass: the same poses and maps as the particles held in memory."""
    import mrcfile
    import numpy as np

    runs = {}
    for preload in ("yes", "no"):
        out = tmp_path / preload
        r = runner.invoke(app, ["--quiet", "refine", str(REAL), "--ref", str(reference), "-o", str(out), "--box",
                                str(BOX), "--max-iter", "2", "--preload", preload], catch_exceptions=False)
        assert r.exit_code == 0, r.output
        runs[preload] = out
    for name in ("map.mrc", "half1_unfil.mrc", "half2_unfil.mrc"):
        held, streamed = (mrcfile.read(runs[k] / name) for k in ("yes", "no"))
        assert float(np.abs(held - streamed).max()) <= 1e-4 * float(np.abs(held).max()), name
    angles = ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]
    held_t, streamed_t = (read_star(runs[k] / "particles.star").particles for k in ("yes", "no"))
    assert np.allclose(held_t[angles].astype(float), streamed_t[angles].astype(float), atol=1e-3)


@pytest.mark.parametrize("method", ["relion", "sparse-tv"])
def test_every_kernel_choice_runs_and_takes_effect(reference: Path, tmp_path: Path, method: str) -> None:
    """--kernel trilinear, gaussian (the Gaussian's samples applied on the grid to the trilinear accumulators) and
    gaussian-insert (the paper's 27 points per pixel) each make the map: one iteration from the same reference gives
    three related but different maps (how close the two Gaussian forms are is tested at known poses in
    tests/test_pose_search.py; 17 real particles cannot tell)."""
    import mrcfile
    import numpy as np

    maps = {}
    for kernel in ("gaussian", "gaussian-insert", "trilinear"):
        out = tmp_path / kernel
        r = runner.invoke(app, ["--quiet", "refine", str(REAL), "--ref", str(reference), "--method", method, "-o",
                                str(out), "--box", str(BOX), "--max-iter", "1", "--kernel", kernel],
                          catch_exceptions=False)
        assert r.exit_code == 0, r.output
        maps[kernel] = mrcfile.read(out / "map.mrc").astype(np.float64).ravel()
    cc = {k: float(np.corrcoef(maps["gaussian"], maps[k])[0, 1]) for k in ("gaussian-insert", "trilinear")}
    assert all(0.9 < v < 1 - 1e-6 for v in cc.values()), cc


@pytest.mark.parametrize(("option", "value"), [("--preload", "sometimes"), ("--kernel", "cubic")])
def test_unknown_choice_is_one_error_line(reference: Path, tmp_path: Path, option: str, value: str) -> None:
    r = runner.invoke(app, ["refine", str(REAL), "--ref", str(reference), "-o", str(tmp_path / "run"), option, value])
    assert r.exit_code == 2
    assert option in r.output and value in r.output
    assert not (tmp_path / "run").exists()


def test_one_iteration_summary_and_the_out_help_name_what_is_written(reference: Path, tmp_path: Path) -> None:
    """sparse-tv for one iteration: the summary says "1 iteration" (not "1 iterations"), and the --out help
    names every file the run writes (the regularised half maps are sparse-tv's)."""
    import inspect
    import re

    from cryocli.cli.refine import refine

    out = tmp_path / "run"
    r = runner.invoke(app, ["refine", str(REAL), "--ref", str(reference), "--method", "sparse-tv", "-o", str(out),
                            "--box", str(BOX), "--max-iter", "1"], env={"COLUMNS": "250"}, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    summary = [line for line in r.stdout.splitlines() if line.startswith("sparse-tv: ")]
    assert len(summary) == 1 and " 1 iteration in " in summary[0], r.stdout
    written = {p.name for p in out.iterdir() if not p.name.startswith(".")}
    assert {"report.png", "angdist.bild", "half1_regularised.mrc", "half2_regularised.mrc"} <= written
    help_text = inspect.signature(refine).parameters["out"].default.help
    named = set(re.findall(r"[\w*]+\.(?:mrc|star|png|bild|csv|jsonl|pt)\b", help_text))
    assert written <= named, written - named


def test_no_option_states_its_default_twice() -> None:
    """typer prints ``[default: X]`` itself for an option with a default (unless show_default=False), so help that
    also says ``[default: ...]`` shows it twice (refine --minimum-angular-sampling did: "[default: 0, off].
    [default: 0.0]")."""
    import inspect

    from typer.models import OptionInfo

    doubled = []
    for info in app.registered_commands:
        assert info.callback is not None
        for name, parameter in inspect.signature(info.callback).parameters.items():
            option = parameter.default
            if (isinstance(option, OptionInfo) and option.default not in (None, ...) and option.show_default
                    and "[default" in (option.help or "")):
                doubled.append(f"{info.name} {name}")
    assert doubled == []


@pytest.mark.parametrize("command", ["refine", "abinitio"])
def test_particle_diameter_beyond_the_box_is_one_line_naming_both(reference: Path, tmp_path: Path, command: str) -> None:
    """The 17 particles are 200 px at 1.4 A/px, a 280 A box (whatever --box crops them to): a 500 A mask is refused,
    as relion_autopick refuses it, with one line naming the diameter and the box, before the run directory is made."""
    out = tmp_path / "run"
    extra = ["--ref", str(reference)] if command == "refine" else ["--method", "cryospin"]
    r = runner.invoke(app, [command, str(REAL), *extra, "-o", str(out), "--box", str(BOX), "--max-iter" if command ==
                            "refine" else "--epochs", "1", "--particle-diameter", "500"])
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.exit_code == 2 and len(lines) == 1, r.output
    assert lines[0] == ("cryocli: error: --particle-diameter 500: larger than the box of the particles, 200 px x 1.4 "
                        "A/px = 280 A"), lines
    assert not out.exists()


@pytest.mark.parametrize("command", ["refine", "abinitio"])
def test_missing_stacks_and_a_bad_star_file_are_one_line(reference: Path, tmp_path: Path, command: str) -> None:
    """The particles are read and their stacks opened before any progress is printed: one line on stderr."""
    import shutil

    moved = tmp_path / "p.star"
    shutil.copy(need(REAL), moved)  # its stacks are not beside the copy
    ragged = tmp_path / "r.star"
    ragged.write_text("data_\nloop_\n_rlnImageName\n_rlnAngleRot\n1@a.mrcs 2 3\n")
    extra = ["--ref", str(reference)] if command == "refine" else []
    for star, words in ((moved, "stack not found"), (ragged, "line 5 of data_ has 3 values for 2 columns")):
        r = runner.invoke(app, [command, str(star), *extra, "-o", str(tmp_path / "run")])
        lines = [line for line in r.stderr.splitlines() if line.strip()]
        assert r.exit_code == 2 and len(lines) == 1 and words in lines[0], r.stderr
        assert not (tmp_path / "run").exists()


def test_angpix_gives_refine_and_abinitio_the_pixel_size_a_file_lacks(tmp_path: Path) -> None:
    """A STAR file and stack with no pixel size anywhere: refine and abinitio stop with one line that names
    --angpix, before the run folder is made; with it, refine runs and its particles.star gives RELION the pixel
    size (4.4 A, set_3j9g's) in the optics table."""
    source = need(RELION_SET / "noisy" / "noisy.star")
    star = strip_pixel_size(source, tmp_path)
    ref = need(RELION_SET / "reconstruct" / "rec.mrc")
    line = f"cryocli: error: {star}: no pixel size in the STAR file or the stack headers: give the images' pixel size with --angpix"
    for command in (["refine", str(star), "--ref", str(ref)], ["abinitio", str(star), "--method", "sagd"]):
        out = tmp_path / f"no_{command[0]}"
        r = runner.invoke(app, [*command, "-o", str(out), "--box", str(BOX)])
        assert r.exit_code == 2, r.output
        assert [x for x in r.stderr.splitlines() if x.strip()] == [line]
        assert not out.exists()
    run = tmp_path / "run"
    r = runner.invoke(app, ["--quiet", "refine", str(star), "--ref", str(ref), "-o", str(run), "--box", str(BOX),
                            "--max-iter", "1", "--max-particles", "200", "--angpix", "4.4"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    written = read_star(run / "particles.star")
    assert written.common_pixel_size() == pytest.approx(4.4)
    assert "rlnImagePixelSize" in written.optics.columns
