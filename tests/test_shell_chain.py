"""The whole chain from a shell, as a user runs it: each command reads the previous one's output by its path.

Every command is the installed ``cryocli`` console script, run in a subprocess from one working directory
(``tmp_path``), with no ``--datadir``: the STAR files each command writes name their stacks relative to
that directory, as RELION does (``relion_reconstruct --i ref/particles.star`` reads them from there too),
and old-style names relative to the STAR file's folder still read.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cryocli.io.star import read_star

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "cryocli" / "data" / "4ake_adk_open.pdb"


def _cryocli() -> str:
    """The installed console script: beside this Python (the venv's bin folder), else on PATH."""
    beside = Path(sys.executable).parent / "cryocli"
    found = str(beside) if beside.is_file() else shutil.which("cryocli")
    assert found, "the cryocli console script is not installed (pip install -e .)"
    return found


def _sh(cwd: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``cryocli --quiet <args>`` in ``cwd``; the test fails with the command's output unless it exits 0."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")  # two shared cores: one thread per process, as the suite runs
    started = time.perf_counter()
    done = subprocess.run([_cryocli(), "--quiet", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    print(f"{time.perf_counter() - started:6.1f} s  (cd {cwd.name}; cryocli {' '.join(args)})")
    assert done.returncode == 0, (f"cryocli {' '.join(args)} (in {cwd}) exited {done.returncode}:\n"
                                  f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done


def _stacks(star: Path) -> set[str]:
    return set(read_star(star).image_names[1])


def test_simulate_abinitio_refine_reconstruct_postprocess_from_one_shell(tmp_path: Path) -> None:
    work = tmp_path.resolve()
    _sh(work, "simulate", str(MODEL), "-o", "sim/", "-n", "400", "--box", "32", "--apix", "3.0", "--snr", "1")
    assert _stacks(work / "sim" / "particles.star") == {"sim/Particles/particles_0001.mrcs"}

    _sh(work, "abinitio", "sim/particles.star", "-o", "run/", "--epochs", "2")
    # The run's STAR names the stacks from the cwd (RELION's reading), not from sim/ (where they were).
    assert _stacks(work / "run" / "particles.star") == {"sim/Particles/particles_0001.mrcs"}

    _sh(work, "refine", "sim/particles.star", "--ref", "run/map.mrc", "-o", "ref/", "--max-iter", "2")
    ref_stacks = _stacks(work / "ref" / "particles.star")
    assert ref_stacks == {"sim/Particles/particles_0001.mrcs"} and all((work / s).is_file() for s in ref_stacks)

    _sh(work, "reconstruct", "ref/particles.star", "-o", "rec/map.mrc", "--halves")
    assert (work / "rec" / "map.mrc").is_file()
    _sh(work, "postprocess", "ref/half1_unfil.mrc", "ref/half2_unfil.mrc", "--auto-mask", "-o", "post/")
    assert (work / "post" / "postprocess.mrc").is_file()

    # Read from another directory (the STAR file's own folder), the names still find their stacks.
    _sh(work / "run", "reconstruct", "particles.star", "-o", "here.mrc")
    assert (work / "run" / "here.mrc").is_file()
