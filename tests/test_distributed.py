"""Data-parallel runs under torchrun (gloo on the CPU): sharding; reconstruct and refine equal to one process; a
killed rank, or a stalled one at the collective timeout, ends the run, whose checkpoint resumes on another number of
ranks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import torch

from cryocli import distributed
from cryocli.analysis.fsc import fsc_curve
from cryocli.io.dataset import ParticleStack
from cryocli.io.star import read_star
from tests.conftest import RELION_SET, need, simulate_4ake

REPO = Path(__file__).resolve().parents[1]


ENV = {**os.environ, "PYTHONPATH": str(REPO), "CRYOCLI_COLLECTIVE_TIMEOUT": "120"}


def _torchrun_command(args: list[str], ranks: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", "-m",
            "cryocli", *args]


def _torchrun(args: list[str], cwd: Path, ranks: int = 2) -> subprocess.CompletedProcess:
    return subprocess.run(_torchrun_command(args, ranks), cwd=cwd, env=ENV, capture_output=True, text=True,
                          timeout=600)


def _cryocli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cryocli", *args], cwd=cwd, env=ENV, capture_output=True, text=True,
                          timeout=600)


#: Run on each torchrun rank: join as cryocli does, make an optimiser (which imports torch.distributed.nn through
#: torch._dynamo) and a collective, leave; write this process's threads before joining and after leaving to
#: ``threads.<rank>`` (not to the shared stdout, where two unbuffered ranks' prints interleave word by word).
_LEAVES_NO_THREADS = """
import os, torch
from cryocli import distributed
count = lambda: len(os.listdir("/proc/self/task"))
alone = count()
distributed.setup(torch.device("cpu"))
torch.optim.Adam([torch.nn.Parameter(torch.zeros(3))])
distributed.sum_over_ranks([1.0])
distributed.teardown()
with open(f"threads.{os.environ['RANK']}", "w") as out:
    out.write(f"{alone} {count()}")
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads in /proc (Linux)")
def test_leaving_the_process_group_ends_its_threads(tmp_path: Path) -> None:
    """teardown frees the process group, so that no gloo thread outlives it: a thread still releasing a collective's
    tensors while the interpreter shut down aborted a rank (SIGABRT) in about 1 run in 30 of cryo2ssnet on 2 ranks.
    The group had been kept alive by torch.distributed.nn's default arguments, bound to it when an optimiser first
    imported that module after the group was made (see distributed.bind_world_defaults_before_joining)."""
    script = tmp_path / "leave.py"
    script.write_text(_LEAVES_NO_THREADS)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(script)], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    counts = [tuple(map(int, (tmp_path / f"threads.{rank}").read_text().split())) for rank in range(2)]
    assert [len(c) for c in counts] == [2, 2] and all(after == alone for alone, after in counts), counts


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
    """postprocess has no particles to share: under torchrun it stops with one error line (rank 0) and exit 2, before
    reading anything, instead of running two copies that write the same outputs."""
    run = _torchrun(["postprocess", "missing1.mrc", "missing2.mrc", "-o", "out"], tmp_path)
    assert run.returncode != 0
    errors = [line for line in run.stderr.splitlines() if line.startswith("cryocli: error:")]
    assert errors == ["cryocli: error: cryocli postprocess does not run under torchrun (these do: reconstruct, "
                      "refine, abinitio); run it as one process"], run.stderr
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


# ---------------------------------------------------------------------------------------------- refine
# sparse-tv differs from relion only in its M-step, which every rank runs on the same summed backprojections: one
# iteration checks it.
REFINE_ARGS = {"relion": ["--max-iter", "3"], "sparse-tv": ["--max-iter", "1"]}


@pytest.fixture(scope="module")
def refine_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """300 simulated 4AKE particles of 32 px at 3 A/px, SNR 1, CTF and shifts, in a folder where each test's runs
    go, as a user's shell script would lay them out (the runs read ``sim/particles.star``)."""
    work = tmp_path_factory.mktemp("dp_refine")
    simulate_4ake(work / "sim", 300, snr=1.0, box=32, apix=3.0, seed=5)
    return work


def _one_process_refine(work: Path, method: str) -> Path:
    out = work / f"one_{method}"
    if not out.is_dir():
        run = _cryocli(["--quiet", "refine", "sim/particles.star", "--ref", "sim/ground_truth.mrc", "--method", method,
                        "-o", out.name, *REFINE_ARGS[method]], work)
        assert run.returncode == 0, run.stderr
    return out


def _rotation_difference_deg(a: Path, b: Path) -> np.ndarray:
    ra, rb = (ParticleStack(read_star(p / "particles.star")).rotations for p in (a, b))
    assert ra is not None and rb is not None
    trace = (ra.transpose(1, 2) @ rb).diagonal(dim1=1, dim2=2).sum(-1)
    return torch.rad2deg(torch.arccos(((trace - 1) / 2).clamp(-1, 1))).numpy()


def _assert_same_refinement(a: Path, b: Path) -> None:
    """Poses far within the fine sampling step (7.5 degrees here), maps with FSC > 0.99 at every shell, the same
    per-particle columns."""
    turned = _rotation_difference_deg(a, b)
    assert float(np.median(turned)) < 0.1 and float(np.mean(turned)) < 0.5, (np.median(turned), turned.max())
    for name in ("map.mrc", "half1_unfil.mrc", "half2_unfil.mrc"):
        assert float(fsc_curve(mrcfile.read(a / name), mrcfile.read(b / name)).min()) > 0.99, name
    ta, tb = read_star(a / "particles.star").particles, read_star(b / "particles.star").particles
    assert list(ta.columns) == list(tb.columns)
    assert np.array_equal(ta["rlnRandomSubset"].to_numpy(), tb["rlnRandomSubset"].to_numpy())
    shift = np.abs(ta["rlnOriginXAngst"].astype(float) - tb["rlnOriginXAngst"].astype(float))
    assert float(np.median(shift)) < 0.05  # Angstrom; the shift step is 6 A


@pytest.mark.parametrize("method", ["relion", "sparse-tv"])
def test_refine_under_torchrun_matches_one_process(refine_set: Path, method: str) -> None:
    """Two gloo ranks, each searching half the particles of both half sets, their backprojections, noise and
    intensity sums all-reduced: the poses, half maps and map of the one-process run; one summary, from rank 0."""
    one = _one_process_refine(refine_set, method)
    two = _torchrun(["--json", "refine", "sim/particles.star", "--ref", "sim/ground_truth.mrc", "--method", method,
                     "-o", f"two_{method}", *REFINE_ARGS[method]], refine_set)
    assert two.returncode == 0, two.stderr
    assert two.stdout.count('"command": "refine"') == 1
    _assert_same_refinement(one, refine_set / f"two_{method}")


def _ranks_of(parent: int) -> dict[int, int]:
    """``{RANK: pid}`` of the worker processes that torchrun (pid ``parent``) started."""
    found: dict[int, int] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = dict(item.split("=", 1) for item in (proc / "environ").read_text().split("\0") if "=" in item)
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent and "RANK" in env:
            found[int(env["RANK"])] = int(proc.name)
    return found


@pytest.mark.skipif(not Path("/proc/self/environ").is_file(), reason="finds the ranks through /proc (Linux)")
def test_a_killed_rank_ends_the_run_and_its_checkpoint_resumes_on_one_process(refine_set: Path) -> None:
    """Rank 1 killed (SIGKILL) after the first checkpoint: torchrun stops rank 0 (or its next collective fails),
    which says in one line that the checkpoint is kept; the run exits non-zero well within the collective timeout.
    ``--resume`` in one process finishes the run: the result of the uninterrupted one-process run."""
    import signal
    import time

    one = _one_process_refine(refine_set, "relion")
    out = refine_set / "killed"
    args = ["refine", "sim/particles.star", "--ref", "sim/ground_truth.mrc", "-o", out.name, "--max-iter", "3"]
    proc = subprocess.Popen(_torchrun_command(["--quiet", *args]), cwd=refine_set, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (out / "checkpoint.pt").is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    ranks = _ranks_of(proc.pid)
    assert proc.poll() is None and 1 in ranks, "the run ended before its first checkpoint"
    os.kill(ranks[1], signal.SIGKILL)
    killed_at = time.monotonic()
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert time.monotonic() - killed_at < 120  # CRYOCLI_COLLECTIVE_TIMEOUT; torchrun itself stops rank 0 sooner
    cryocli_lines = [line for line in stderr.splitlines() if line.startswith("cryocli:")]
    hint = f"the last checkpoint is kept in {out.name}; run the same command with --resume to continue"
    # torchrun's SIGTERM usually reaches rank 0 first; if rank 0's next collective finds the dead peer sooner, it
    # ends with the collective's error line instead, which keeps the checkpoint the same way.
    assert len(cryocli_lines) == 1 and (
        cryocli_lines[0] == f"cryocli: interrupted (SIGTERM); {hint}"
        or (cryocli_lines[0].startswith("cryocli: error: the run stopped: a collective with the other ranks failed")
            and cryocli_lines[0].endswith(hint))), stderr
    resumed = _cryocli(["--quiet", *args, "--resume"], refine_set)
    assert resumed.returncode == 0, resumed.stderr
    epochs = [row.split(",")[1] for row in (out / "metrics.csv").read_text().splitlines()[1:]]
    assert epochs == ["1", "2", "3"]
    _assert_same_refinement(one, out)


@pytest.mark.skipif(not Path("/proc/self/environ").is_file(), reason="finds the ranks through /proc (Linux)")
def test_a_stalled_rank_ends_the_run_at_the_collective_timeout_and_the_checkpoint_resumes(refine_set: Path) -> None:
    """Rank 1 stopped (SIGSTOP: alive, so torchrun sees nothing wrong) after the first checkpoint: rank 0's next
    collective gives up after CRYOCLI_COLLECTIVE_TIMEOUT (10 s here) with one error line that keeps the checkpoint,
    and ``--resume`` in one process finishes the run with the uninterrupted run's result."""
    import signal
    import time

    one = _one_process_refine(refine_set, "relion")
    out = refine_set / "stalled"
    args = ["refine", "sim/particles.star", "--ref", "sim/ground_truth.mrc", "-o", out.name, "--max-iter", "3"]
    proc = subprocess.Popen(_torchrun_command(["--quiet", *args]), cwd=refine_set,
                            env={**ENV, "CRYOCLI_COLLECTIVE_TIMEOUT": "10"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (out / "checkpoint.pt").is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    ranks = _ranks_of(proc.pid)
    assert proc.poll() is None and {0, 1} <= set(ranks), "the run ended before its first checkpoint"
    os.kill(ranks[1], signal.SIGSTOP)
    try:
        # Rank 0 ends by itself: nothing but the timeout can end its wait for a rank that is alive but silent.
        while Path(f"/proc/{ranks[0]}").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None, "torchrun ended before rank 0 did"
    finally:
        os.kill(ranks[1], signal.SIGCONT)  # so that torchrun's SIGTERM ends it now
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode != 0
    errors = [line for line in stderr.splitlines() if line.startswith("cryocli: error:")]
    assert len(errors) == 1, stderr
    assert errors[0].startswith("cryocli: error: the run stopped: a collective with the other ranks failed (")
    assert "Timed out" in errors[0]  # gloo's own words: the timeout ended the wait
    assert errors[0].endswith(f"the last checkpoint is kept in {out.name}; run the same command with --resume to "
                              "continue"), errors[0]
    assert (out / "checkpoint.pt").is_file()
    resumed = _cryocli(["--quiet", *args, "--resume"], refine_set)
    assert resumed.returncode == 0, resumed.stderr
    epochs = [row.split(",")[1] for row in (out / "metrics.csv").read_text().splitlines()[1:]]
    assert epochs == ["1", "2", "3"]
    _assert_same_refinement(one, out)


# ---------------------------------------------------------------------------------------------- abinitio
ABINITIO_ARGS = {"cryospin": ["--switch-epoch", "1", "--batch-size", "50"],
                 "cryo2ssnet": ["--batch-size", "40", "--beam-depth", "2", "--gd-steps", "2", "--denoiser-steps", "20"]}


@pytest.mark.parametrize("method", ["cryospin", "cryo2ssnet"])
def test_abinitio_under_torchrun_completes_and_resumes_on_one_process(tmp_path: Path, method: str) -> None:
    """An abinitio engine on 2 gloo ranks (each its share of the particles, gradients averaged over the ranks):
    its stages run, rank 0 writes the whole run (every particle's pose), and the checkpoint resumes in one
    process. The quality is judged at the done-means scale in the acceptance test below (this set is too small to
    judge it)."""
    simulate_4ake(tmp_path / "sim", 200, snr=0.1, box=32, apix=3.6, seed=3)
    args = ["abinitio", "sim/particles.star", "-o", "run", "--method", method, *ABINITIO_ARGS[method]]
    two = _torchrun(["--json", *args, "--epochs", "2"], tmp_path)
    assert two.returncode == 0, two.stderr
    assert two.stdout.count('"command": "abinitio"') == 1
    metrics = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    assert [row.split(",")[1] for row in metrics[1:]] == ["1", "2"]
    poses = ParticleStack(read_star(tmp_path / "run" / "particles.star")).rotations
    assert poses is not None and len(poses) == 200
    # every rank's particles moved away from the identity the run starts from
    identity = torch.eye(3).expand(200, 3, 3)
    assert int(((poses - identity).abs().amax((1, 2)) > 1e-3).sum()) == 200
    one = _cryocli(["--quiet", *args, "--epochs", "3", "--resume"], tmp_path)
    assert one.returncode == 0, one.stderr
    metrics = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    assert [row.split(",")[1] for row in metrics[1:]] == ["1", "2", "3"]


def test_sagd_under_torchrun_takes_the_one_process_steps(tmp_path: Path) -> None:
    """sagd on 2 gloo ranks, each with its share of every minibatch (the last, of 14 particles, too) and of the
    held-out set: in the first pass every particle is evaluated at every quadrature point (no importance sampling
    yet), so the summed gradients, line searches and held-out error are the one-process run's and so is the map, to
    float32 round-off; the checkpoint then resumes in one process."""
    simulate_4ake(tmp_path / "sim", 120, snr=0.1, box=32, apix=2.4, seed=3, shift_sigma=2.0)
    args = ["abinitio", "sim/particles.star", "--method", "sagd", "--march-iter", "2", "--batch-size", "50"]
    one = _cryocli(["--quiet", *args, "-o", "one", "--max-iter", "3"], tmp_path)
    assert one.returncode == 0, one.stderr
    two = _torchrun(["--quiet", *args, "-o", "two", "--max-iter", "3"], tmp_path)
    assert two.returncode == 0, two.stderr
    a, b = (mrcfile.read(tmp_path / run / "map_unfil.mrc") for run in ("one", "two"))
    assert float(np.abs(a - b).max()) < 1e-5 * float(np.abs(a).max())
    rows = [(tmp_path / run / "metrics.csv").read_text().splitlines() for run in ("one", "two")]
    assert len(rows[0]) == len(rows[1]) == 4  # header and iterations 1-3 (one pass: minibatches of 50, 50, 14)
    resumed = _cryocli(["--quiet", *args, "-o", "two", "--max-iter", "6", "--resume"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert len((tmp_path / "two" / "metrics.csv").read_text().splitlines()) == 7


def test_an_engine_without_data_parallel_is_refused_under_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every engine shares its particles today; one that does not declare ``data_parallel`` is stopped under
    torchrun: one error line from rank 0, a quiet exit 2 from the others, nothing for one process."""
    import typer

    from cryocli.cli.engine_command import refuse_torchrun_without_data_parallel
    from cryocli.errors import CryocliError

    class Plain:
        name = "plain"

    refuse_torchrun_without_data_parallel(Plain(), "abinitio --method plain")  # one process: runs
    monkeypatch.setattr(distributed, "current", lambda: distributed.Ranks(0, 2))
    with pytest.raises(CryocliError, match="abinitio --method plain does not run under torchrun"):
        refuse_torchrun_without_data_parallel(Plain(), "abinitio --method plain")
    monkeypatch.setattr(distributed, "current", lambda: distributed.Ranks(1, 2))
    with pytest.raises(typer.Exit):
        refuse_torchrun_without_data_parallel(Plain(), "abinitio --method plain")


def test_abinitio_refuses_an_engine_without_data_parallel_before_writing(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the command line, as rank 0 of 2: an engine that does not declare ``data_parallel`` (cryospin with
    the flag taken off) stops with exit 2 and exactly one error line, and no run folder is made."""
    from typer.testing import CliRunner

    from cryocli.cli.app import app
    from cryocli.engines.abinitio.cryospin import CryoSpinEngine

    simulate_4ake(tmp_path / "sim", 20, snr=0.1, box=32, apix=3.6, seed=3)
    monkeypatch.setattr(CryoSpinEngine, "data_parallel", False)
    monkeypatch.setattr(distributed, "current", lambda: distributed.Ranks(0, 2))
    run = CliRunner().invoke(app, ["abinitio", str(tmp_path / "sim" / "particles.star"), "--method", "cryospin",
                                   "-o", str(tmp_path / "run")])
    assert run.exit_code == 2, run.output
    errors = [line for line in run.stderr.splitlines() if line.strip()]
    assert errors == ["cryocli: error: cryocli abinitio --method cryospin does not run under torchrun yet; run it as "
                      "one process"], run.stderr
    assert not (tmp_path / "run").exists()


def test_a_collective_broken_by_another_rank_is_one_error_line(monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """Under torchrun, gloo's error when a peer died mid-collective becomes one error line and exit 1 (not a
    traceback, not the bad-input code); other RuntimeErrors, and any error outside torchrun, go on as they are."""
    import typer

    from cryocli.cli.common import guarded

    broken = RuntimeError("[third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:1")
    assert not distributed.is_collective_failure(broken)  # one process
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert distributed.is_collective_failure(broken)
    assert not distributed.is_collective_failure(RuntimeError("shape mismatch"))
    with pytest.raises(typer.Exit) as stopped:
        with guarded():
            raise broken
    assert stopped.value.exit_code == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("cryocli: error: the run stopped: a collective with the other "
                                                   "ranks failed"), lines
    with pytest.raises(RuntimeError, match="shape mismatch"):
        with guarded():
            raise RuntimeError("shape mismatch")
    # Broken off inside a run (cryocli.engines.runner): the line says whether a checkpoint was kept for --resume.
    from cryocli.errors import RunBrokenOff, broken_off

    assert broken_off(RuntimeError("shape mismatch")) is None
    why = broken_off(broken)
    assert why is not None and why[0].startswith("a collective with the other ranks failed (") and why[1] == ""
    reason = why[0]
    for kept, tail in ((Path("run"), "; the last checkpoint is kept in run; run the same command with --resume to "
                                     "continue"),
                       (None, "; it stopped before its first checkpoint; nothing was kept")):
        with pytest.raises(typer.Exit) as stopped:
            with guarded():
                raise RunBrokenOff(reason, kept)
        assert stopped.value.exit_code == 1
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("cryocli: error: the run stopped: a collective with the "
                                                       "other ranks failed (") and lines[0].endswith(tail), lines


@pytest.mark.acceptance
def test_cryospin_under_torchrun_meets_the_one_process_done_means(tmp_path: Path) -> None:
    """The done-means run of tests/test_cryospin.py (3,000 particles of 48 px, SNR 0.1, CTF, random start, shipped
    defaults) on 2 gloo ranks: the same thresholds, median rotation error < 5 degrees after global alignment and FSC
    against the truth >= 0.5 to 2x Nyquist."""
    from cryocli.analysis.align import pose_errors_after_alignment

    simulate_4ake(tmp_path / "sim", 3000, snr=0.1, box=48, apix=2.4)
    two = _torchrun(["--quiet", "abinitio", "sim/particles.star", "-o", "run"], tmp_path)
    assert two.returncode == 0, two.stderr
    fsc = _cryocli(["--json", "fsc", "sim/ground_truth.mrc", "run/map.mrc", "--align"], tmp_path)
    assert fsc.returncode == 0, fsc.stderr
    import json

    curve = np.asarray(json.loads(fsc.stdout.strip().splitlines()[-1])["curve"]["fsc"])
    found = ParticleStack(read_star(tmp_path / "run" / "particles.star")).rotations
    truth = ParticleStack(read_star(tmp_path / "sim" / "particles.star")).rotations
    assert found is not None and truth is not None
    errors = pose_errors_after_alignment(found, truth)
    print(f"2 ranks: FSC vs truth {np.round(curve, 3).tolist()}; median rotation error {np.median(errors):.2f} deg")
    assert curve[1:48 // 4 + 1].min() >= 0.5
    assert np.median(errors) < 5.0
