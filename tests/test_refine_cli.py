"""`cryocli refine` runs end to end on real RELION particles (results on 17 particles are not judged) and its
half maps go through `cryocli postprocess`; bad input leaves no run directory behind."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from cryocli.cli.app import app
from cryocli.engines.common.reconstruct import reconstruct
from cryocli.imaging.fourier import fourier_crop_images
from cryocli.io.dataset import ParticleStack
from cryocli.io.mrc import write_map
from cryocli.io.star import read_star
from tests.conftest import ASPIRE, CRYOJAX, need

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
    for column in ("rlnMaxValueProbDistribution", "rlnNrOfSignificantSamples", "rlnLogLikeliContribution"):
        assert column in table.particles.columns, column
    pp = runner.invoke(app, ["--quiet", "postprocess", str(out / "half1_unfil.mrc"), str(out / "half2_unfil.mrc"),
                             "-o", str(tmp_path / f"pp_{method}"), "--bfactor", "0"], catch_exceptions=False)
    assert pp.exit_code == 0, pp.output


def test_reference_of_another_size_is_refused_without_leftovers(tmp_path: Path) -> None:
    out = tmp_path / "run"
    r = runner.invoke(app, ["--quiet", "refine", str(REAL), "--ref", str(need(CRYOJAX / "trpv1_volume.mrc")),
                            "--method", "relion", "-o", str(out), "--box", "32", "--max-iter", "1"])
    assert r.exit_code == 2
    assert "reference" in r.output
    assert not out.exists()
