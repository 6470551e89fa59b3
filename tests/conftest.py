"""Shared test fixtures: where the real reference files live, and small-box defaults."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    # scripts/test.sh runs two pytest-xdist workers on the two cores: one thread each (and in the processes a test
    # starts: torchrun's ranks, the console script), since two workers of two OpenMP threads each would contend.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

#: The test files that take longest, heaviest first (seconds on one thread of this suite's 2-core machine, 2026-12-07:
#: 443, 427, 273, 223, 200, 133, 124, 45; every other file takes under 21 s). scripts/test.sh hands whole files to
#: two workers in collection order (--no-loadscope-reorder; pytest-xdist's own order puts the files with the most
#: tests first, so these few-test files came last and one worker ran the last of them alone): longest first, the
#: two workers end within seconds of each other. Simulated from that run's durations: 1,004 s against 1,136 s
#: (measured: 1,158 s).
HEAVIEST_FILES_FIRST = ("test_cryo2ssnet.py", "test_refine_acceptance.py", "test_distributed.py", "test_cryospin.py",
                        "test_sagd.py", "test_run_directory.py", "test_refine_cli.py", "test_shell_chain.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Collect the files of :data:`HEAVIEST_FILES_FIRST` first, in that order (the rest keep theirs)."""
    rank = {name: i for i, name in enumerate(HEAVIEST_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DATA = SHARED / "data"
EXTERNAL = DATA / "external"
RELION_SET = DATA / "relion" / "set_3j9g"
MODELS = DATA / "models"
ASPIRE = EXTERNAL / "ASPIRE-Python" / "tests" / "saved_test_data"
CRYODRGN = EXTERNAL / "cryodrgn" / "tests" / "data"
CRYOJAX = EXTERNAL / "cryojax" / "tests" / "data"
STARFILE_DATA = EXTERNAL / "starfile" / "tests" / "data"
MRCFILE_DATA = EXTERNAL / "mrcfile" / "tests" / "test_data"


@pytest.fixture(autouse=True)
def _deterministic_torch():
    torch.manual_seed(0)
    yield


#: Devices the device-agnostic tests run on: the CPU always, CUDA when present (as the teamtomo torch-* packages).
DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


def need(path: Path) -> Path:
    """Fail loudly (not skip) when a reference file is missing: CI has ../shared beside the repo."""
    assert path.exists(), f"reference file missing: {path} (tests read ../shared relative to the repo root)"
    return path


BUNDLED_4AKE = REPO / "cryocli" / "data" / "4ake_adk_open.pdb"


def simulate_4ake(out: Path, n: int, snr: float = 0.1, box: int = 32, seed: int = 11, apix: float = 2.4,
                  shift_sigma: float | None = None) -> Path:
    """``cryocli simulate`` of ``n`` particles of the bundled 4AKE model into ``out`` (box in pixels, apix in
    Angstrom per pixel, in-plane shifts of ``shift_sigma`` Angstrom, None: simulate's default), as a user would run
    it; returns ``out``."""
    from typer.testing import CliRunner

    from cryocli.cli.app import app

    shifts = [] if shift_sigma is None else ["--shift-sigma", str(shift_sigma)]
    r = CliRunner().invoke(app, ["--quiet", "simulate", str(BUNDLED_4AKE), "-o", str(out), "-n", str(n), "--box",
                                 str(box), "--apix", str(apix), "--snr", str(snr), "--seed", str(seed), *shifts])
    assert r.exit_code == 0, r.output
    return out


def strip_pixel_size(source: Path, folder: Path) -> Path:
    """``folder/p.star``: the particles of ``source`` (set_3j9g's ``noisy/noisy.star``) with no pixel size anywhere:
    none in the optics table, 0 in the header of a copy of the stack (the ASPIRE test set's ``rln_proj_64.star`` is
    like that)."""
    import shutil

    import mrcfile
    import starfile

    from cryocli.io.star import read_star

    table = read_star(source)
    stack = folder / "images.mrcs"
    shutil.copy(source.parent / "noisy.mrcs", stack)
    with mrcfile.open(stack, "r+") as handle:
        handle.voxel_size = 0.0
    particles = table.particles.copy()
    particles["rlnImageName"] = [f"{name.split('@')[0]}@{stack}" for name in particles["rlnImageName"]]
    dest = folder / "p.star"
    starfile.write({"optics": table.optics.drop(columns=["rlnImagePixelSize"]), "particles": particles}, dest,
                   overwrite=True)
    return dest
