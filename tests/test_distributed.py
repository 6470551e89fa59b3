"""Data-parallel runs under torchrun (gloo on the CPU): sharding, and reconstruct equal to one process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mrcfile
import numpy as np

from cryocli import distributed
from tests.conftest import RELION_SET, need

REPO = Path(__file__).resolve().parents[1]


def _torchrun(args: list[str], cwd: Path, ranks: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "CRYOCLI_COLLECTIVE_TIMEOUT": "120"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={ranks}", "-m", "cryocli", *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_shards_are_disjoint_and_cover_the_particles() -> None:
    idx = np.array([3, 5, 8, 13, 21, 34, 55])
    parts = [distributed.shard(idx, distributed.Ranks(r, 3)) for r in range(3)]
    assert sorted(np.concatenate(parts).tolist()) == idx.tolist()
    assert [len(p) for p in parts] == [3, 2, 2]
    assert np.array_equal(distributed.shard(idx), idx)  # one process: everything


def test_reconstruct_under_torchrun_equals_one_process(tmp_path: Path) -> None:
    """Two gloo ranks, each backprojecting half the particles, then an all-reduce: the full map and both half
    maps equal the one-process run's to float32 round-off, and only rank 0 wrote and printed."""
    star = need(RELION_SET / "noisy" / "noisy.star")
    one = subprocess.run([sys.executable, "-m", "cryocli", "--quiet", "reconstruct", str(star), "-o",
                          str(tmp_path / "one.mrc"), "--halves"], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert one.returncode == 0, one.stderr
    two = _torchrun(["--json", "reconstruct", str(star), "-o", str(tmp_path / "two.mrc"), "--halves"], tmp_path)
    assert two.returncode == 0, two.stderr
    assert two.stdout.count('"command": "reconstruct"') == 1  # one summary, from rank 0
    for suffix in ("", "_half1", "_half2"):
        a = mrcfile.read(tmp_path / f"one{suffix}.mrc")
        b = mrcfile.read(tmp_path / f"two{suffix}.mrc")
        assert float(np.abs(a - b).max()) < 1e-5 * float(np.abs(a).max()), suffix
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        f"{k}{s}.mrc" for k in ("one", "two") for s in ("", "_half1", "_half2"))


def test_commands_not_yet_data_parallel_refuse_torchrun(tmp_path: Path) -> None:
    """refine is not data-parallel yet: under torchrun it stops with one error line (rank 0) and exit 2, before
    reading anything, instead of running two copies that write the same outputs."""
    run = _torchrun(["refine", "missing.star", "--ref", "missing.mrc", "-o", "out"], tmp_path)
    assert run.returncode != 0
    errors = [line for line in run.stderr.splitlines() if line.startswith("cryocli: error:")]
    assert errors == ["cryocli: error: cryocli refine does not run under torchrun yet (only reconstruct does); "
                      "run it as one process"], run.stderr
    assert not (tmp_path / "out").exists()


def test_torchrun_refuses_an_existing_output_on_every_rank_before_any_work(tmp_path: Path) -> None:
    """An existing output without --force: each rank stops with its one error line (no rank's traceback from a
    broken collective), the run exits non-zero and the file is untouched."""
    star = need(RELION_SET / "noisy" / "noisy.star")
    (tmp_path / "map.mrc").write_bytes(b"keep")
    run = _torchrun(["reconstruct", str(star), "-o", str(tmp_path / "map.mrc")], tmp_path)
    assert run.returncode != 0
    errors = [line for line in run.stderr.splitlines() if line.startswith("cryocli: error")]
    problem = f"{tmp_path / 'map.mrc'}: output exists; pass --force to overwrite it"
    assert sorted(errors) == [f"cryocli: error (rank 1): {problem}", f"cryocli: error: {problem}"], run.stderr
    assert "[rank" not in run.stderr, run.stderr
    assert (tmp_path / "map.mrc").read_bytes() == b"keep"
