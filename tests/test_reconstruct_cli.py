"""`cryocli reconstruct` end to end: RELION's own reconstructions, real particles, simulated data, errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import starfile
import torch
from typer.testing import CliRunner

from cryocli.analysis.fsc import fsc_curve, threshold_crossing
from cryocli.cli.app import app
from cryocli.imaging.filters import lowpass_filter
from cryocli.io.mrc import read_map
from cryocli.io.star import read_star
from tests.conftest import CRYOJAX, DEVICES, RELION_SET, need, strip_pixel_size

runner = CliRunner()
DEMO_MODEL = Path(__file__).resolve().parents[1] / "cryocli" / "data" / "4ake_adk_open.pdb"


def _run(*args: str):
    return runner.invoke(app, ["--quiet", *args], catch_exceptions=False)


def test_halves_agree_with_relion_reconstruct(tmp_path: Path) -> None:
    out = tmp_path / "rec.mrc"
    res = _run("reconstruct", str(need(RELION_SET / "noisy" / "noisy.star")), "-o", str(out), "--halves")
    assert res.exit_code == 0, res.output
    n = 64
    upto = int(0.9 * (n // 2))
    for ours, relion in [("rec.mrc", "rec.mrc"), ("rec_half1.mrc", "rec_half1.mrc"), ("rec_half2.mrc", "rec_half2.mrc")]:
        mine = read_map(tmp_path / ours)
        ref = read_map(RELION_SET / "reconstruct" / relion)
        assert mine.voxel_size == pytest.approx(4.4, rel=1e-5)
        fsc = fsc_curve(mine.data, ref.data)
        assert fsc[1:upto + 1].min() > 0.95, (ours, fsc[1:upto + 1].min())


def test_json_summary_reports_half_map_resolution(tmp_path: Path) -> None:
    res = runner.invoke(app, ["--json", "reconstruct", str(RELION_SET / "noisy" / "noisy.star"), "-o",
                              str(tmp_path / "m.mrc"), "--halves", "--maxres", "12"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["particles"] == 600 and len(summary["maps"]) == 3
    # --maxres 12 A: nothing beyond 12 A goes in, so the halves cannot agree beyond it.
    assert summary["half_map_fsc"]["resolution_0143"] >= 12 * 0.95


@pytest.mark.parametrize("device", DEVICES)
def test_json_summary_names_the_device_and_its_peak_memory(tmp_path: Path, device: str) -> None:
    res = runner.invoke(app, ["--json", "--device", device, "reconstruct", str(RELION_SET / "noisy" / "noisy.star"),
                              "-o", str(tmp_path / "m.mrc")], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["device"].split(":")[0] == device
    if device == "cuda":  # at least the 64^3 complex accumulator of the 600 particles' insertions
        assert 64**3 * 8 / 2**20 < summary["peak_device_memory_MB"] < torch.cuda.get_device_properties(0).total_memory / 2**20
    else:
        assert "peak_device_memory_MB" not in summary


def test_real_trpv1_particles_correlate_with_the_published_map(tmp_path: Path) -> None:
    """10 real TRPV1 particles at refined poses (image names remapped as PROVENANCE.md says)."""
    star = need(CRYOJAX / "trpv1_small_stack.star").read_text()
    shutil.copy(CRYOJAX / "trpv1_small_stack.mrcs", tmp_path / "trpv1_small_stack.mrcs")
    (tmp_path / "p.star").write_text(star.replace("./batch_0_restacked.mrc", "trpv1_small_stack.mrcs"))
    out = tmp_path / "trpv1.mrc"
    res = _run("reconstruct", str(tmp_path / "p.star"), "-o", str(out), "--sym", "C4")
    assert res.exit_code == 0, res.output
    ours = read_map(out)
    ref = read_map(CRYOJAX / "trpv1_volume.mrc")
    a = lowpass_filter(ours.data, ours.voxel_size, 20.0).numpy()
    b = lowpass_filter(ref.data, ref.voxel_size, 20.0).numpy()
    corr = np.corrcoef(a.ravel(), b.ravel())[0, 1]
    assert corr > 0.3, corr


def test_simulated_particles_reconstruct_to_near_nyquist(tmp_path: Path) -> None:
    """simulate -> reconstruct at the written poses: FSC to the ground truth > 0.5 to within 1.3x Nyquist."""
    sim = tmp_path / "sim"
    apix = 3.0
    res = _run("simulate", str(DEMO_MODEL), "-o", str(sim), "-n", "3000", "--box", "32", "--apix", str(apix),
               "--snr", "10", "--shift-sigma", "3", "--seed", "1")
    assert res.exit_code == 0, res.output
    res = _run("reconstruct", str(sim / "particles.star"), "-o", str(tmp_path / "rec.mrc"))
    assert res.exit_code == 0, res.output
    rec = read_map(tmp_path / "rec.mrc").data
    truth = read_map(sim / "ground_truth.mrc").data
    crossing = threshold_crossing(fsc_curve(rec, truth), 32, apix, 0.5)
    assert crossing.resolution < 1.3 * 2 * apix, crossing.resolution


def test_errors_exit_2_without_output(tmp_path: Path) -> None:
    out = tmp_path / "x.mrc"
    res = _run("reconstruct", str(RELION_SET / "refine" / "refine_input.star"), "-o", str(out))
    assert res.exit_code == 2 and "pose" in res.output.lower()
    assert not out.exists()
    res = _run("reconstruct", str(RELION_SET / "noisy" / "noisy.star"), "-o", str(out), "--sym", "X7")
    assert res.exit_code == 2 and not out.exists()
    out.write_text("existing")
    res = _run("reconstruct", str(RELION_SET / "noisy" / "noisy.star"), "-o", str(out))
    assert res.exit_code == 2 and "--force" in res.output
    assert out.read_text() == "existing"


def test_memory_that_runs_out_is_one_line_without_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An allocation the CPU allocator refuses (here a petabyte, asked for mid-reconstruction): one line saying what
    failed and what needs less, exit 1 (the input was fine), no traceback, no map."""
    import cryocli.engines.common.particles_reconstruct as module

    def greedy(*args, **kwargs):
        torch.empty(10**15, dtype=torch.uint8)

    monkeypatch.setattr(module, "reconstruct_labelled", greedy)
    out = tmp_path / "map.mrc"
    res = runner.invoke(app, ["reconstruct", str(RELION_SET / "noisy" / "noisy.star"), "-o", str(out)])
    assert res.exit_code == 1
    lines = [line for line in res.output.splitlines() if line.startswith("cryocli:")]
    assert lines == ["cryocli: error: the run stopped: out of memory on the CPU: an allocation of 931322.57 GiB "
                     "failed; a smaller --batch-size needs less memory"], res.output
    assert "Traceback" not in res.output
    assert not out.exists() and list(tmp_path.iterdir()) == []


def _without_columns(source: Path, dest: Path, drop: set[str]) -> Path:
    """``source``'s particles without the labels in ``drop`` (image names made absolute, so the stacks are found)."""
    table = read_star(source)
    particles = table.particles.drop(columns=[c for c in table.particles.columns if c in drop])
    folder = source.parent.parent  # RELION resolves noisy/noisy.mrcs from the project folder above the STAR file
    particles["rlnImageName"] = [f"{name.split('@')[0]}@{folder / name.split('@')[1]}"
                                 for name in particles["rlnImageName"]]
    starfile.write({"optics": table.optics, "particles": particles}, dest, overwrite=True)
    return dest


@pytest.mark.parametrize("chunk_rows", [None, 64])
@pytest.mark.parametrize("case", ["missing stacks", "no CTF", "no poses", "no pixel size"])
def test_input_errors_are_one_line_without_a_progress_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            case: str, chunk_rows: int | None) -> None:
    """The inputs are checked and the first stacks opened before the progress bar starts: one error line on
    stderr, not a ``reconstruct 0/600 0%`` line before it, whether the STAR file is read whole or in chunks."""
    if chunk_rows is not None:
        monkeypatch.setattr("cryocli.io.star_chunks.CHUNK_ROWS", chunk_rows)
    source = need(RELION_SET / "noisy" / "noisy.star")
    if case == "missing stacks":
        star = tmp_path / "p.star"
        shutil.copy(source, star)  # noisy/noisy.mrcs is not beside the copy
        words = "stack not found"
    elif case == "no CTF":
        star = _without_columns(source, tmp_path / "p.star", {"rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle"})
        words = "rlnDefocusU is missing); pass --no-ctf to reconstruct without CTF correction"
    elif case == "no poses":
        star = _without_columns(source, tmp_path / "p.star", {"rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"})
        words = "poses are needed"
    else:
        star = strip_pixel_size(source, tmp_path)
        words = "no pixel size in the STAR file or the stack headers: give the images' pixel size with --angpix"
    out = tmp_path / "map.mrc"
    res = runner.invoke(app, ["reconstruct", str(star), "-o", str(out)])
    assert res.exit_code == 2, res.output
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("cryocli: error: ") and words in lines[0], res.stderr
    assert not out.exists()
    if case in ("no CTF", "no pixel size"):  # the suggestion works
        fix = ["--no-ctf"] if case == "no CTF" else ["--angpix", "4.4"]
        res = runner.invoke(app, ["--quiet", "reconstruct", str(star), "-o", str(out), *fix])
        assert res.exit_code == 0, res.output


def test_angpix_stands_in_for_a_missing_pixel_size(tmp_path: Path) -> None:
    """set_3j9g's particles with no pixel size in the STAR file or the stack header, reconstructed with --angpix
    4.4 (their pixel size), give the map of the file that has it: its CTF and its origins in Angstrom both need the
    pixel size. A file that gives a pixel size keeps it with an --angpix that agrees, and refuses one that does not."""
    source = need(RELION_SET / "noisy" / "noisy.star")
    reference = tmp_path / "reference.mrc"
    assert _run("reconstruct", str(source), "-o", str(reference)).exit_code == 0
    stripped = strip_pixel_size(source, tmp_path)
    given = tmp_path / "given.mrc"
    res = _run("reconstruct", str(stripped), "-o", str(given), "--angpix", "4.4")
    assert res.exit_code == 0, res.output
    ours, ref = read_map(given), read_map(reference)
    assert ours.voxel_size == pytest.approx(4.4, rel=1e-6)
    assert np.allclose(ours.data, ref.data, rtol=0, atol=1e-6 * float(np.abs(ref.data).max()))
    # A wrong --angpix here would move every CTF zero and scale every origin: not the same map.
    wrong = tmp_path / "wrong.mrc"
    assert _run("reconstruct", str(stripped), "-o", str(wrong), "--angpix", "4.0").exit_code == 0
    assert fsc_curve(read_map(wrong).data, ref.data)[1:29].min() < 0.99
    agrees = tmp_path / "agrees.mrc"
    assert _run("reconstruct", str(source), "-o", str(agrees), "--angpix", "4.4").exit_code == 0
    assert np.array_equal(read_map(agrees).data, ref.data)
    refused = tmp_path / "refused.mrc"
    res = runner.invoke(app, ["reconstruct", str(source), "-o", str(refused), "--angpix", "5"])
    assert res.exit_code == 2
    assert res.stderr.strip().splitlines() == [
        f"cryocli: error: {source}: the STAR file's pixel size vs --angpix: pixel sizes differ by more than 0.5%: "
        "4.4 A vs 5 A"]
    assert not refused.exists()
