"""Acceptance tests of issue 5 for `cryocli refine` (end to end on simulated 4AKE and C2 HIV protease).

Not part of the default suite (`-m "not acceptance"` in pyproject): as of this commit they take more than
15 minutes on 2 cores and the relion method stops at about 8.6 A / 6 deg median pose error on 600
particles (targets 7.5 A / 3 deg). Run them with `bash scripts/test.sh -m acceptance tests/test_refine_acceptance.py`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cryocli.analysis.align import pose_errors_after_alignment
from cryocli.cli.app import app
from cryocli.imaging.filters import lowpass_filter
from cryocli.io.dataset import ParticleStack
from cryocli.io.mrc import read_map, write_map
from cryocli.io.star import read_star
from tests.conftest import MODELS, need

runner = CliRunner()
BOX, APIX = 48, 2.5
NYQUIST = 2 * APIX


def _simulate(tmp: Path, model: Path, n: int) -> tuple[Path, Path]:
    out = tmp / "sim"
    r = runner.invoke(app, ["--quiet", "simulate", str(model), "-o", str(out), "-n", str(n), "--box", str(BOX),
                            "--apix", str(APIX), "--snr", "0.1", "--shift-sigma", "2"])
    assert r.exit_code == 0, r.output
    gt = read_map(out / "ground_truth.mrc")
    ref = tmp / "ref_lp40.mrc"
    write_map(ref, lowpass_filter(gt.data, gt.voxel_size, 40.0).numpy().astype(np.float32), gt.voxel_size, "lp40")
    return out, ref


pytestmark = pytest.mark.acceptance


@pytest.fixture(scope="module")
def adk(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return _simulate(tmp_path_factory.mktemp("adk"), need(MODELS / "4ake_adk_open.pdb"), 1000)


def _refine(sim: Path, ref: Path, out: Path, method: str, *extra: str) -> dict:
    r = runner.invoke(app, ["--json", "refine", str(sim / "particles.star"), "--ref", str(ref), "--method", method,
                            "-o", str(out), "--ground-truth", str(sim / "ground_truth.mrc"), *extra])
    assert r.exit_code == 0, r.output
    return json.loads(r.output.strip().splitlines()[-1])


def _pose_error(sim: Path, out: Path) -> float:
    truth = ParticleStack(read_star(sim / "particles.star")).rotations.double()
    est = ParticleStack(read_star(out / "particles.star")).rotations.double()
    return float(np.median(pose_errors_after_alignment(est, truth)))


@pytest.mark.parametrize("method", ["relion", "sparse-tv"])
def test_refine_adk_from_40A_reference(adk: tuple[Path, Path], tmp_path: Path, method: str) -> None:
    sim, ref = adk
    out = tmp_path / method
    summary = _refine(sim, ref, out, method, "--max-iter", "8", "--particle-diameter", "80")
    res = summary["gold_standard_resolution_A"]
    err = _pose_error(sim, out)
    print(method, "gold-standard", res, "vs truth 0.5", summary["res_vs_truth_fsc05_A"], "pose error", err,
          "iterations", summary["iterations"])
    assert res <= 1.5 * NYQUIST, res
    assert err < 3.0, err
    for name in ("half1_unfil.mrc", "half2_unfil.mrc", "map.mrc", "model.star", "fsc.png", "checkpoint.pt"):
        assert (out / name).is_file(), name
    table = read_star(out / "particles.star")
    for col in ("rlnMaxValueProbDistribution", "rlnNrOfSignificantSamples", "rlnLogLikeliContribution",
                "rlnRandomSubset", "rlnDefocusU"):
        assert col in table.particles.columns, col
    assert (table.particles["rlnNrOfSignificantSamples"].astype(int) >= 1).all()
    pp = runner.invoke(app, ["--json", "postprocess", str(out / "half1_unfil.mrc"), str(out / "half2_unfil.mrc"),
                             "-o", str(tmp_path / "pp")])
    assert pp.exit_code == 0, pp.output


def test_refine_c2_protease(tmp_path: Path) -> None:
    sim, ref = _simulate(tmp_path, need(MODELS / "1hvr.pdb"), 600)
    out = tmp_path / "c2"
    summary = _refine(sim, ref, out, "relion", "--sym", "C2", "--max-iter", "6", "--particle-diameter", "80")
    print("1hvr C2 gold-standard", summary["gold_standard_resolution_A"], "vs truth", summary["res_vs_truth_fsc05_A"])
    assert summary["gold_standard_resolution_A"] <= 1.5 * NYQUIST
    assert summary["res_vs_truth_fsc05_A"] <= 2.5 * NYQUIST
