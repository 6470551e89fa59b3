"""The run directory's guarantees (abinitio and refine): nothing lost, one writer, no stale temporaries,
umask permissions, the same bytes for the same seed, bad values refused before any work, interrupts."""

from __future__ import annotations

import errno
import filecmp
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cryocli.cli.app import app
from cryocli.engines.protocol import EngineConfig
from cryocli.engines.result import Reconstruction
from cryocli.engines.runner import RunRequest, run_to_directory
from cryocli.errors import CryocliError, RunBrokenOff, memory_shortage
from cryocli.io.locks import output_lock

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "cryocli" / "data" / "4ake_adk_open.pdb"
runner = CliRunner()
# Sizes only: every other option is the shipped default.
ABINITIO = ["--epochs", "2", "--switch-epoch", "1"]
REFINE = ["--max-iter", "2"]


@pytest.fixture(scope="module")
def sim(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("rundir") / "sim"
    r = runner.invoke(app, ["--quiet", "simulate", str(MODEL), "-o", str(out), "-n", "160", "--box", "24",
                            "--apix", "4", "--snr", "1", "--seed", "2"])
    assert r.exit_code == 0, r.output
    return out


def _abinitio(sim: Path, out: Path, *extra: str) -> Any:
    return runner.invoke(app, ["--quiet", "abinitio", str(sim / "particles.star"), "-o", str(out), *ABINITIO, *extra])


def _refine(sim: Path, out: Path, *extra: str) -> Any:
    return runner.invoke(app, ["--quiet", "refine", str(sim / "particles.star"), "--ref",
                               str(sim / "ground_truth.mrc"), "-o", str(out), *REFINE, *extra])


def _same_files(a: Path, b: Path, skip: tuple[str, ...] = ("log.jsonl",)) -> list[str]:
    """Names of the files that differ between two run directories (the log carries times by design)."""
    names = sorted({p.name for p in a.iterdir()} | {p.name for p in b.iterdir()})
    return [n for n in names if n not in skip and not filecmp.cmp(a / n, b / n, shallow=False)]


def test_same_seed_gives_the_same_bytes_for_abinitio_and_refine(sim, tmp_path):
    for run in (_abinitio, _refine):
        a, b = tmp_path / f"{run.__name__}_a", tmp_path / f"{run.__name__}_b"
        for out in (a, b):
            r = run(sim, out)
            assert r.exit_code == 0, r.output
        assert {p.name for p in a.iterdir()} >= {"map.mrc", "particles.star", "metrics.csv", "checkpoint.pt"}
        assert _same_files(a, b) == []
    assert (tmp_path / "_refine_a" / "model.star").is_file()


def test_failed_force_run_leaves_the_previous_run_byte_identical(sim, tmp_path):
    out = tmp_path / "run"
    assert _refine(sim, out).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    empty = tmp_path / "empty.mrc"
    from cryocli.io.mrc import write_map

    write_map(empty, np.zeros((24, 24, 24), np.float32), 4.0)
    r = runner.invoke(app, ["refine", str(sim / "particles.star"), "--ref", str(empty), "-o", str(out), "--force",
                            *REFINE])
    assert r.exit_code == 2 and "empty" in r.output
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.mrc", "run"]  # no staging, no lock left


def test_force_replaces_only_when_the_new_run_succeeds(sim, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "old.txt").write_text("old")
    assert _abinitio(sim, out).exit_code == 2  # not empty, no --force
    assert _abinitio(sim, out, "--force").exit_code == 0
    assert not (out / "old.txt").exists() and (out / "map.mrc").is_file()


def test_bad_values_are_refused_before_anything_is_written(sim, tmp_path):
    cases = [(_abinitio, ["--lr", "nan"], "--lr nan"), (_refine, ["--ini-lowpass", "0"], "--ini-lowpass 0"),
             (_refine, ["--tau2-fudge", "-1"], "--tau2-fudge -1"), (_refine, ["--offset-step", "-1"], "--offset-step"),
             (_refine, ["--method", "sparse-tv", "--beta", "nan"], "--beta nan"),
             (_refine, ["--method", "sparse-tv", "--tv-lr", "-1"], "--tv-lr -1"),
             (_refine, ["--particle-diameter", "0"], "--particle-diameter 0"),
             (_abinitio, ["--datadir", str(tmp_path / "nowhere")], "does not exist")]
    for i, (run, extra, expected) in enumerate(cases):
        out = tmp_path / f"out{i}"
        r = run(sim, out, *extra)
        assert r.exit_code == 2, (extra, r.output)
        assert expected in r.output and len(r.output.strip().splitlines()) == 1, r.output
        assert not out.exists(), extra
    # A rerun after a refused one is not blocked by anything it left.
    assert _abinitio(sim, tmp_path / "out0").exit_code == 0


def test_particles_without_ctf_need_no_ctf(sim, tmp_path):
    from cryocli.io.star import read_star, write_star

    table = read_star(sim / "particles.star")
    nodefocus = table.particles.drop(columns=["rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle"])
    from dataclasses import replace

    star = tmp_path / "noctf.star"
    write_star(replace(table, particles=nodefocus), star)
    r = runner.invoke(app, ["abinitio", str(star), "-o", str(tmp_path / "a"), *ABINITIO])
    assert r.exit_code == 2 and "--no-ctf" in r.output and not (tmp_path / "a").exists()
    r = runner.invoke(app, ["--quiet", "abinitio", str(star), "-o", str(tmp_path / "a"), *ABINITIO, "--no-ctf"])
    assert r.exit_code == 0, r.output


def test_a_second_run_on_a_locked_directory_is_refused(sim, tmp_path):
    out = tmp_path / "run"
    with output_lock(out, "abinitio --method cryospin"):
        from cryocli.io import locks

        holder = locks.read_lock(locks.lock_path(out))
        assert holder is not None
        # Pretend the holder is another live process on this host: PID 1 is always running.
        locks.lock_path(out).write_text(locks.lock_path(out).read_text().replace(f'"pid": {holder.pid}', '"pid": 1'))
        r = _abinitio(sim, out)
        assert r.exit_code == 2 and "in use by cryocli abinitio" in r.output, r.output
        r = _abinitio(sim, out, "--resume")
        assert r.exit_code == 2
        locks.lock_path(out).unlink()


def test_stale_temporaries_of_a_killed_run_are_removed(sim, tmp_path):
    out = tmp_path / "run"
    assert _abinitio(sim, out).exit_code == 0
    stale = [out / ".map.mrc.a1b2c3.tmp", out / ".checkpoint.pt.x9y8.tmp", tmp_path / ".run.k3j4h5"]
    stale[0].write_bytes(b"x")
    stale[1].write_bytes(b"x")
    stale[2].mkdir()
    r = _abinitio(sim, out, "--resume", "--epochs", "3")
    assert r.exit_code == 0, r.output
    assert not any(p.exists() for p in stale)


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_outputs_follow_the_umask(sim, tmp_path, umask):
    old = os.umask(umask)
    try:
        out = tmp_path / "deep" / "run"
        assert _refine(sim, out).exit_code == 0
    finally:
        os.umask(old)
    for p in [out, *out.iterdir()]:
        mode = p.stat().st_mode & 0o777
        expected = (0o777 if p.is_dir() else 0o666) & ~umask
        assert mode == expected, (p.name, oct(mode), oct(expected))


@dataclass
class _StopConfig(EngineConfig):
    stop_after: int = 1
    error: str = "interrupt"


class _StoppingEngine:
    """A test engine that checkpoints ``stop_after`` epochs and then fails or is interrupted."""

    name: ClassVar[str] = "stopping"
    kind: ClassVar[str] = "abinitio"
    summary: ClassVar[str] = "test"
    config_class: ClassVar[type[EngineConfig]] = _StopConfig

    def check_inputs(self, data: Any, config: EngineConfig) -> None:
        pass

    def run(self, data: Any, config: EngineConfig, reporter: Any) -> Reconstruction:
        assert isinstance(config, _StopConfig)
        for epoch in range(1, config.stop_after + 1):
            reporter.end_epoch(epoch, {"loss": 1.0}, state={"epoch": epoch})
        if config.error == "interrupt":
            raise KeyboardInterrupt
        if config.error == "memory":
            torch.empty(10**15, dtype=torch.uint8)  # a petabyte: the CPU allocator refuses it
        if config.error == "disk":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "run/map.mrc")
        raise CryocliError("the engine found bad input")


STOP_ERRORS = {"interrupt": KeyboardInterrupt, "bad input": CryocliError, "memory": RunBrokenOff, "disk": RunBrokenOff}


@pytest.mark.parametrize("stop_after, error, kept", [(0, "interrupt", False), (2, "interrupt", True),
                                                     (0, "bad input", False), (2, "bad input", False),
                                                     (0, "memory", False), (2, "memory", True),
                                                     (2, "disk", True)])
def test_a_stopped_run_keeps_only_a_checkpoint_worth_resuming(sim, tmp_path, stop_after, error, kept):
    """An interrupt, an allocation that failed or a full disk keeps the checkpoint (if there is one) for --resume;
    bad input found by the engine does not (resuming would meet it again)."""
    out = tmp_path / "run"
    request = RunRequest(particles=sim / "particles.star", out=out, command="abinitio --method stopping")
    told: list[Path | None] = []
    with pytest.raises(STOP_ERRORS[error]) as raised:
        run_to_directory(_StoppingEngine(), _StopConfig(stop_after=stop_after, error=error), request, None,
                         torch.device("cpu"), on_interrupt=told.append)
    assert out.exists() == kept
    if kept:
        assert (out / "checkpoint.pt").is_file()
        assert told == ([out] if error == "interrupt" else [])
    if error in ("memory", "disk"):
        assert raised.value.kept == (out if kept else None)
    if error == "memory":
        assert raised.value.line().startswith("out of memory on the CPU: an allocation of 931322.57 GiB failed; ")
    if error == "disk":
        assert raised.value.line() == (f"No space left on device (run/map.mrc); the last checkpoint is kept in {out}; "
                                       "run the same command with --resume to continue")
    assert sorted(p.name for p in tmp_path.iterdir()) == (["run"] if kept else [])


def test_memory_shortage_names_what_failed_and_nothing_else() -> None:
    with pytest.raises(RuntimeError) as cpu:
        torch.empty(10**15, dtype=torch.uint8)
    assert memory_shortage(cpu.value) == "out of memory on the CPU: an allocation of 931322.57 GiB failed"
    gpu = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of "
                                 "79.19 GiB of which 1.06 GiB is free. Of the allocated memory 75.11 GiB is ...")
    assert memory_shortage(gpu) == "CUDA out of memory. Tried to allocate 2.00 GiB"
    assert memory_shortage(RuntimeError("shape mismatch")) is None
    assert memory_shortage(ValueError("can't allocate memory: you tried to allocate 8 bytes")) is None


def test_interrupt_says_what_was_kept(sim, tmp_path, monkeypatch):
    from cryocli.engines.abinitio.cryospin import CryoSpinEngine

    calls = {"n": 0}
    original = CryoSpinEngine._decoding_epoch

    def interrupted(self, *args, **kwargs):
        calls["n"] += 1
        raise KeyboardInterrupt

    monkeypatch.setattr(CryoSpinEngine, "_decoding_epoch", interrupted)
    out = tmp_path / "run"
    r = _abinitio(sim, out)
    assert r.exit_code == 130 and calls["n"] == 1
    assert "interrupted" in r.output and "--resume" in r.output and str(out) in r.output
    monkeypatch.setattr(CryoSpinEngine, "_decoding_epoch", original)
    r = _abinitio(sim, out, "--resume")
    assert r.exit_code == 0, r.output


def test_device_out_of_memory_is_one_line_that_keeps_the_checkpoint(sim, tmp_path, monkeypatch):
    """A GPU's OutOfMemoryError mid-run: one line (what failed, how to need less, where the checkpoint is), exit 1,
    and a smaller --batch-size with --resume finishes the run."""
    from cryocli.engines.abinitio.cryospin import CryoSpinEngine

    original = CryoSpinEngine._decoding_epoch

    def short_of_memory(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity "
                                     "of 79.19 GiB of which 1.06 GiB is free.")

    monkeypatch.setattr(CryoSpinEngine, "_decoding_epoch", short_of_memory)
    out = tmp_path / "run"
    r = runner.invoke(app, ["abinitio", str(sim / "particles.star"), "-o", str(out), *ABINITIO])
    assert r.exit_code == 1
    lines = [line for line in r.output.splitlines() if line.startswith("cryocli:")]
    assert lines == [f"cryocli: error: the run stopped: CUDA out of memory. Tried to allocate 2.00 GiB; the last "
                     f"checkpoint is kept in {out}; a smaller --batch-size needs less memory, and add --resume to "
                     "continue"], r.output
    assert "Traceback" not in r.output
    monkeypatch.setattr(CryoSpinEngine, "_decoding_epoch", original)
    r = _abinitio(sim, out, "--resume", "--batch-size", "16")
    assert r.exit_code == 0, r.output


def test_reference_and_ground_truth_mismatches_are_refused_before_any_work(sim, tmp_path):
    from cryocli.io.mrc import read_map, write_map

    truth = read_map(sim / "ground_truth.mrc")
    wrong_pixel = tmp_path / "wrong_pixel.mrc"
    write_map(wrong_pixel, np.asarray(truth.data), 2.0)  # 24 px at 2 A: half the particles' 96 A
    nan_map = tmp_path / "nan.mrc"
    data = np.array(truth.data, dtype=np.float32)
    data[0, 0, 0] = np.nan
    write_map(nan_map, data, 4.0)
    star = str(sim / "particles.star")
    cases = [(["refine", star, "--ref", str(wrong_pixel)], "covers 48.0 A"),
             (["refine", star, "--ref", str(nan_map)], "NaN"),
             (["abinitio", star, "--ground-truth", str(wrong_pixel)], "ground truth covers 48.0 A"),
             (["refine", star, "--ref", str(sim / "ground_truth.mrc"), "--ground-truth", str(wrong_pixel)],
              "ground truth covers")]
    for i, (args, expected) in enumerate(cases):
        out = tmp_path / f"out{i}"
        r = runner.invoke(app, [*args, "-o", str(out)])
        assert r.exit_code == 2 and expected in r.output, (args, r.output)
        assert not out.exists()


def test_refine_with_a_solvent_mask_and_a_masked_gold_standard(sim, tmp_path):
    """--solvent-mask replaces the soft sphere on the references; --solvent-correct-fsc measures the gold
    standard inside it (corrected by phase randomisation). A mask of another field of view, out of [0, 1] or
    without --solvent-mask is refused before any work."""
    from cryocli.analysis.postprocess import auto_mask_from_halves
    from cryocli.io.mrc import read_map, write_map

    truth = read_map(sim / "ground_truth.mrc")
    mask = auto_mask_from_halves(truth.data, truth.data, truth.voxel_size)
    good, wide, big = tmp_path / "mask.mrc", tmp_path / "wide.mrc", tmp_path / "big.mrc"
    write_map(good, mask.astype(np.float32), truth.voxel_size)
    write_map(wide, mask.astype(np.float32), 2 * truth.voxel_size)
    write_map(big, 2 * mask.astype(np.float32), truth.voxel_size)
    plain = runner.invoke(app, ["--json", "refine", str(sim / "particles.star"), "--ref", str(sim / "ground_truth.mrc"),
                                "-o", str(tmp_path / "plain"), *REFINE])
    masked = runner.invoke(app, ["--json", "refine", str(sim / "particles.star"), "--ref", str(sim / "ground_truth.mrc"),
                                 "-o", str(tmp_path / "masked"), "--solvent-mask", str(good), "--solvent-correct-fsc",
                                 *REFINE])
    assert plain.exit_code == 0 and masked.exit_code == 0, masked.output
    a = json.loads(plain.output.strip().splitlines()[-1])
    b = json.loads(masked.output.strip().splitlines()[-1])
    print(f"gold standard: sphere {a['gold_standard_resolution_A']:.2f} A, solvent mask and corrected FSC "
          f"{b['gold_standard_resolution_A']:.2f} A")
    # Both runs report a resolution; which one is finer is not a property of the option on 160 particles of 24 px
    # in 2 iterations (the runs' poses differ, and the two numbers were within one shell: 11.03 vs 11.34 A, then
    # 9.68 vs 9.25 A after refine's significant-sample cap changed). The masked, corrected FSC itself is checked on
    # fixed half maps in test_refine.py::test_solvent_corrected_gold_standard_is_finer_than_the_spheres.
    assert 2 * 4.0 <= b["gold_standard_resolution_A"] < 96 and 2 * 4.0 <= a["gold_standard_resolution_A"] < 96
    for i, (extra, expected) in enumerate([(["--solvent-mask", str(wide)], "covers"),
                                           (["--solvent-mask", str(big)], "[0, 1]"),
                                           (["--solvent-correct-fsc"], "--solvent-correct-fsc")]):
        r = _refine(sim, tmp_path / f"bad{i}", *extra)
        assert r.exit_code == 2 and expected in r.output, r.output
        assert not (tmp_path / f"bad{i}").exists()
