"""The run contract of the commands (simulate, reconstruct, postprocess, fsc) and of the root app.

Global options anywhere, one-line usage errors, clean interrupts (130 / 143), unwritable outputs refused
before any work, one writer per output (locks) and the clean-up of killed runs, permissions that follow
the umask, the same bytes for the same seed, bad values and NaN / empty outputs refused. Everything is
tiny: 24 px boxes, tens of particles.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

import mrcfile
import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

from cryocli.cli import common
from cryocli.cli.app import GLOBAL_OPTIONS_NOTE, app
from cryocli.errors import CryocliError
from cryocli.io.locks import lock_path, output_lock, read_lock, remove_stale_temporaries
from cryocli.io.mrc import write_map

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]
DEMO_MODEL = REPO / "cryocli" / "data" / "4ake_adk_open.pdb"
SMALL = ["-n", "40", "--box", "24", "--apix", "4", "--snr", "1"]


def _run(*args: object):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def _one_error(res, *words: str) -> str:
    """Exit 2 and exactly one line on stderr, ``cryocli: error: ...``, containing ``words``."""
    assert res.exit_code == 2, (res.exit_code, res.output)
    lines = _lines(res.stderr)
    assert len(lines) == 1 and lines[0].startswith("cryocli: error: "), res.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def _live_child() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _write_lock(output: Path, pid: int, command: str = "reconstruct") -> Path:
    lock = lock_path(output)
    lock.write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "command": command,
                                "started": datetime.now(timezone.utc).isoformat()}))
    return lock


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> SimpleNamespace:
    """40 simulated particles (24 px at 4 A/px) and their half maps, made once for the module."""
    root = tmp_path_factory.mktemp("contract")
    assert _run("--quiet", "simulate", DEMO_MODEL, "-o", root / "sim", *SMALL, "--seed", "1").exit_code == 0
    star = root / "sim" / "particles.star"
    rec = root / "rec" / "map.mrc"
    res = _run("--quiet", "reconstruct", star, "-o", rec, "--halves")
    assert res.exit_code == 0, res.output
    return SimpleNamespace(root=root, star=star, map=rec, half1=rec.with_name("map_half1.mrc"),
                           half2=rec.with_name("map_half2.mrc"))


# ----- 1. global options after the subcommand --------------------------------------------------------------

def test_global_options_work_after_the_subcommand(tmp_path: Path) -> None:
    res = _run("simulate", DEMO_MODEL, "-o", tmp_path / "a", *SMALL, "--seed", "3", "--json", "-q")
    assert res.exit_code == 0, res.output
    summary = json.loads(_lines(res.stdout)[-1])
    assert summary["parameters"]["seed"] == 3 and summary["command"] == "simulate"
    assert _run("--seed=3", "--quiet", "simulate", DEMO_MODEL, "-o", tmp_path / "b", *SMALL).exit_code == 0
    stack = Path("Particles") / "particles_0001.mrcs"
    assert (tmp_path / "a" / stack).read_bytes() == (tmp_path / "b" / stack).read_bytes()


def test_global_options_are_hoisted_for_any_subcommand() -> None:
    group = typer.main.get_command(app)
    ctx = group.context_class(group)
    hoist = group.hoist_global_options
    assert hoist(ctx, ["abinitio", "p.star", "-o", "run/", "--device", "cuda:1", "--json"]) == [
        "--device", "cuda:1", "--json", "abinitio", "p.star", "-o", "run/"]
    assert hoist(ctx, ["-q", "refine", "p.star", "--seed=5", "--threads", "2", "--ref", "r.mrc"]) == [
        "-q", "--seed=5", "--threads", "2", "refine", "p.star", "--ref", "r.mrc"]
    # the value of one of the command's own options is never taken for a global option; nothing after --
    assert hoist(ctx, ["fsc", "a.mrc", "b.mrc", "--plot", "--json"]) == ["fsc", "a.mrc", "b.mrc", "--plot", "--json"]
    assert hoist(ctx, ["info", "x.star", "--", "--quiet"]) == ["info", "x.star", "--", "--quiet"]
    assert hoist(ctx, ["--device", "cpu", "reconstruct", "p.star", "-q"]) == [
        "--device", "cpu", "-q", "reconstruct", "p.star"]


def test_every_subcommand_help_names_the_global_options() -> None:
    group = typer.main.get_command(app)
    for name in group.commands:
        res = runner.invoke(app, [name, "--help"], env={"COLUMNS": "250"})
        assert res.exit_code == 0, (name, res.output)
        assert GLOBAL_OPTIONS_NOTE in " ".join(res.output.split()), name


# ----- 2. usage errors are one line ------------------------------------------------------------------------

@pytest.mark.parametrize("args, words", [
    (["simulate", DEMO_MODEL, "-o", "OUT", "--n-particles", "0"], ["--n-particles"]),
    (["simulate", DEMO_MODEL, "-o", "OUT", "--no-such-option"], ["--no-such-option"]),
    (["simulate"], ["Missing argument"]),
    (["reconstruct", "p.star"], ["Missing option", "--out"]),
    (["no-such-command"], ["no-such-command"]),
    (["--seed", "-1", "info", "x.star"], ["--seed"]),
    (["info", "x.star", "--threads", "0"], ["--threads"]),
])
def test_usage_errors_are_one_line(tmp_path: Path, args: list, words: list[str]) -> None:
    args = [tmp_path / "out" if a == "OUT" else a for a in args]
    line = _one_error(_run(*args), *words)
    assert "Usage" not in line and not (tmp_path / "out").exists()


def test_help_still_works() -> None:
    res = _run("--help")
    assert res.exit_code == 0 and "simulate" in res.output
    res = _run("simulate", "--help")
    assert res.exit_code == 0 and "--n-particles" in res.output


def test_usage_error_from_the_console_script_is_one_line(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "cryocli", "simulate", str(DEMO_MODEL), "-o", str(tmp_path / "x"),
                           "--bogus"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 2, proc.stderr
    assert _lines(proc.stderr) == [_lines(proc.stderr)[0]] and proc.stderr.startswith("cryocli: error: ")


# ----- 3. interrupts -----------------------------------------------------------------------------------------

def _nothing_left(folder: Path, name: str) -> None:
    left = [p.name for p in folder.iterdir() if p.name == name or p.name.startswith(f".{name}.")]
    assert left == [], left


def test_ctrl_c_exits_130_with_one_line_and_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("cryocli.imaging.simulate.write_star", interrupt)  # after the stacks are staged
    res = _run("-q", "simulate", DEMO_MODEL, "-o", tmp_path / "sim", *SMALL)
    assert res.exit_code == 130, res.output
    assert _lines(res.stderr) == ["cryocli: interrupted; partial results were not written"]
    _nothing_left(tmp_path, "sim")


def test_sigterm_exits_143_after_the_clean_up(tmp_path: Path, monkeypatch) -> None:
    before = signal.getsignal(signal.SIGTERM)

    def terminate(*args, **kwargs):
        assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN, None)
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(500):  # the handler raises at the next bytecode
            time.sleep(0.01)
        raise AssertionError("SIGTERM was not turned into an exception")

    monkeypatch.setattr("cryocli.imaging.simulate.write_star", terminate)
    res = _run("-q", "simulate", DEMO_MODEL, "-o", tmp_path / "sim", *SMALL)
    assert res.exit_code == 143, res.output
    assert _lines(res.stderr) == ["cryocli: interrupted (SIGTERM); partial results were not written"]
    _nothing_left(tmp_path, "sim")
    assert signal.getsignal(signal.SIGTERM) == before


def test_a_command_can_say_more_when_interrupted(tmp_path: Path, monkeypatch) -> None:
    def interrupt(*args, **kwargs):
        common.set_interrupt_hint("run again with --resume to continue")
        raise KeyboardInterrupt

    monkeypatch.setattr("cryocli.imaging.simulate.write_star", interrupt)
    res = _run("-q", "simulate", DEMO_MODEL, "-o", tmp_path / "sim", *SMALL)
    assert res.exit_code == 130
    assert _lines(res.stderr) == ["cryocli: interrupted; run again with --resume to continue"]
    monkeypatch.setattr("cryocli.imaging.simulate.write_star", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    res = _run("-q", "simulate", DEMO_MODEL, "-o", tmp_path / "sim", *SMALL)
    assert _lines(res.stderr) == ["cryocli: interrupted; partial results were not written"]  # reset per run


# ----- 4. unwritable outputs refused before any work ---------------------------------------------------------

def test_output_under_a_regular_file_is_refused_before_reading_anything(tmp_path: Path) -> None:
    blocker = tmp_path / "afile"
    blocker.write_text("not a folder")
    missing = tmp_path / "missing.mrc"  # inputs that do not exist: the output is checked first
    cases = [
        (["simulate", tmp_path / "missing.pdb", "-o", blocker / "sim", *SMALL], blocker / "sim"),
        (["reconstruct", tmp_path / "missing.star", "-o", blocker / "map.mrc"], blocker / "map.mrc"),
        (["postprocess", missing, missing, "-o", blocker / "post"], blocker / "post"),
        (["fsc", missing, missing, "--plot", blocker / "sub" / "fsc.png"], blocker / "sub" / "fsc.png"),
    ]
    for args, out in cases:
        line = _one_error(_run(*args), str(out), "not a folder")
        assert "missing" not in line.replace(str(out), "")
    assert blocker.read_text() == "not a folder"


def test_output_of_the_wrong_type_is_refused(tmp_path: Path, data) -> None:
    afile = tmp_path / "sim"
    afile.write_text("x")
    _one_error(_run("simulate", DEMO_MODEL, "-o", afile, *SMALL, "--force"), str(afile), "not a folder")
    folder = tmp_path / "map.mrc"
    folder.mkdir()
    _one_error(_run("reconstruct", data.star, "-o", folder, "--force"), str(folder), "folder")
    _one_error(_run("postprocess", data.half1, data.half2, "-o", afile, "--force"), str(afile), "not a folder")
    _one_error(_run("fsc", data.half1, data.half2, "--plot", folder, "--force"), str(folder), "folder")


def test_read_only_locations_are_refused(tmp_path: Path, data) -> None:
    out = Path("/proc/cryocli-contract/map.mrc")  # /proc takes no new files, even from root
    _one_error(_run("reconstruct", data.star, "-o", out), str(out))
    frozen = tmp_path / "frozen"
    frozen.mkdir()
    if subprocess.run(["chattr", "+i", str(frozen)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i does not work here")
    try:
        for target in (frozen / "map.mrc", frozen / "sub" / "map.mrc"):
            _one_error(_run("reconstruct", data.star, "-o", target), str(target))
        _one_error(_run("simulate", DEMO_MODEL, "-o", frozen / "sim", *SMALL), str(frozen / "sim"))
        assert list(frozen.iterdir()) == []
    finally:
        subprocess.run(["chattr", "-i", str(frozen)], check=True)


# ----- 5. one writer per output; leftovers of killed runs ----------------------------------------------------

def test_a_second_writer_is_refused(tmp_path: Path, data) -> None:
    out = tmp_path / "sim"
    with output_lock(out, "simulate") as lock:
        line = _one_error(_run("simulate", DEMO_MODEL, "-o", out, *SMALL), str(out),
                          f"in use by cryocli simulate (pid {os.getpid()} on {socket.gethostname()})", str(lock))
        assert "--resume" not in line and not out.exists()
    assert not lock.exists()
    rec = tmp_path / "rec.mrc"
    half2 = tmp_path / "rec_half2.mrc"
    with output_lock(half2, "refine"):
        _one_error(_run("reconstruct", data.star, "-o", rec, "--halves"), str(half2), "in use by cryocli refine")
    assert not rec.exists() and not (tmp_path / "rec_half1.mrc").exists()
    post = tmp_path / "post"
    with output_lock(post, "postprocess"):
        _one_error(_run("postprocess", data.half1, data.half2, "-o", post, "--bfactor", "-50"), "in use")


def test_a_live_holder_is_refused_and_a_dead_one_taken_over(tmp_path: Path, data) -> None:
    out = tmp_path / "map.mrc"
    child = _live_child()
    try:
        lock = _write_lock(out, child.pid)
        _one_error(_run("reconstruct", data.star, "-o", out), f"pid {child.pid}", "wait for it or remove", str(lock))
    finally:
        child.kill()
        child.wait()
    assert not out.exists() and lock.exists()
    res = _run("--quiet", "reconstruct", data.star, "-o", out)  # the holder is gone: the lock is stale
    assert res.exit_code == 0, res.output
    assert out.exists() and not lock.exists()


def test_leftovers_of_a_killed_run_are_removed(tmp_path: Path, data) -> None:
    (tmp_path / ".sim.k9abcdef").mkdir()
    (tmp_path / ".sim.k9abcdef" / "particles.star").write_text("half written")
    (tmp_path / ".sim.old").mkdir()
    (tmp_path / ".sim.zz1234yy.tmp").write_text("x")
    _write_lock(tmp_path / "sim", _dead_pid(), "simulate")
    (tmp_path / ".simx.abcdefgh").mkdir()            # another output's: kept
    (tmp_path / ".sim.v2.abcdefgh").mkdir()          # the output "sim.v2"'s: kept
    assert _run("--quiet", "simulate", DEMO_MODEL, "-o", tmp_path / "sim", *SMALL).exit_code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [".sim.v2.abcdefgh", ".simx.abcdefgh", "sim"]

    rec = tmp_path / "rec"
    rec.mkdir()
    for name in (".map.mrc.a1b2c3d4.tmp", ".map_half1.mrc.e5f6g7h8.tmp", ".map_half2.mrc.i9j0k1l2.tmp"):
        (rec / name).write_bytes(b"partial")
    assert _run("--quiet", "reconstruct", data.star, "-o", rec / "map.mrc", "--halves").exit_code == 0
    assert sorted(p.name for p in rec.iterdir()) == ["map.mrc", "map_half1.mrc", "map_half2.mrc"]


def test_temporaries_under_a_live_lock_are_left_alone(tmp_path: Path) -> None:
    (tmp_path / ".map.mrc.abcdefgh.tmp").write_text("being written")
    child = _live_child()
    try:
        _write_lock(tmp_path / "map.mrc", child.pid)
        assert remove_stale_temporaries(tmp_path, "map.mrc") == []
        assert (tmp_path / ".map.mrc.abcdefgh.tmp").exists()
        assert read_lock(lock_path(tmp_path / "map.mrc")).pid == child.pid
    finally:
        child.kill()
        child.wait()
    assert remove_stale_temporaries(tmp_path, "map.mrc") == [tmp_path / ".map.mrc.abcdefgh.tmp"]


def test_lock_api_refuses_a_second_holder_and_cleans_up(tmp_path: Path) -> None:
    out = tmp_path / "new" / "deeper" / "run"
    with output_lock(out, "abinitio") as lock:
        assert lock == tmp_path / "new" / "deeper" / ".run.lock"
        holder = read_lock(lock)
        assert (holder.pid, holder.command) == (os.getpid(), "abinitio")
        with pytest.raises(CryocliError, match="in use by cryocli abinitio"):
            with output_lock(out, "refine"):
                pass
    assert not (tmp_path / "new").exists()  # the folders it made for the lock, empty again, are removed


# ----- 6. permissions follow the umask --------------------------------------------------------------------

@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_outputs_follow_the_umask(tmp_path: Path, data, umask: int) -> None:
    old = os.umask(umask)
    try:
        assert _run("-q", "simulate", DEMO_MODEL, "-o", tmp_path / "sim", *SMALL).exit_code == 0
        assert _run("-q", "reconstruct", data.star, "-o", tmp_path / "rec" / "map.mrc", "--halves").exit_code == 0
        res = _run("-q", "postprocess", data.half1, data.half2, "-o", tmp_path / "post", "--bfactor", "-50")
        assert res.exit_code == 0, res.output
        res = _run("-q", "fsc", data.half1, data.half2, "--plot", tmp_path / "fsc" / "fsc.png", "-o",
                   tmp_path / "fsc" / "fsc.star")
        assert res.exit_code == 0, res.output
    finally:
        os.umask(old)
    paths = [p for p in tmp_path.rglob("*")]
    assert {p.name for p in paths} >= {"Particles", "particles_0001.mrcs", "map_half2.mrc", "guinier.png",
                                       "fsc.png", "fsc.star", "postprocess.star"}
    for p in paths:
        want = (0o777 if p.is_dir() else 0o666) & ~umask
        assert p.stat().st_mode & 0o777 == want, (p, oct(p.stat().st_mode & 0o777), oct(want))


# ----- 7. the same seed gives the same bytes ---------------------------------------------------------------

def test_same_seed_gives_byte_identical_files(tmp_path: Path, monkeypatch) -> None:
    trees = []
    for where in ("a", "b"):
        work = tmp_path / where
        work.mkdir()
        monkeypatch.chdir(work)
        assert _run("-q", "simulate", DEMO_MODEL, "-o", "sim", "-n", "50", "--box", "24", "--apix", "4",
                    "--seed", "11", "--shift-sigma", "2").exit_code == 0
        assert _run("-q", "reconstruct", "sim/particles.star", "-o", "rec/map.mrc", "--halves").exit_code == 0
        assert _run("-q", "postprocess", "rec/map_half1.mrc", "rec/map_half2.mrc", "-o", "post",
                    "--bfactor", "-50").exit_code == 0
        assert _run("-q", "fsc", "rec/map_half1.mrc", "rec/map_half2.mrc", "-o", "fsc.star").exit_code == 0
        trees.append({p.relative_to(work).as_posix(): p.read_bytes() for p in sorted(work.rglob("*")) if p.is_file()})
    a, b = trees
    assert sorted(a) == sorted(b) and len(a) >= 12
    different = [name for name in a if a[name] != b[name]]
    assert different == [], different
    with mrcfile.open(tmp_path / "a" / "rec" / "map.mrc") as m:
        assert m.header.label[0].decode().strip() == "cryocli reconstruct particles.star"


# ----- 8. bad values refused; no NaN, Inf or empty output ------------------------------------------------------

SIM_BAD = [
    (["--voltage", "0"], "--voltage"), (["--voltage", "nan"], "--voltage"), (["--cs", "-1"], "--cs"),
    (["--defocus", "-20000:-15000"], "--defocus"), (["--defocus", "1000:nan"], "--defocus"),
    (["--apix", "0"], "--apix"), (["--snr", "0"], "SNR"), (["--snr", "-3"], "SNR"),
    (["--resolution", "0"], "--resolution"), (["--bfactor", "inf"], "--bfactor"),
    (["--shift-sigma", "nan"], "--shift-sigma"), (["--amp-contrast", "nan"], "--amp-contrast"),
]


@pytest.mark.parametrize("extra, option", SIM_BAD)
def test_simulate_refuses_bad_values(tmp_path: Path, extra: list[str], option: str) -> None:
    _one_error(_run("simulate", DEMO_MODEL, "-o", tmp_path / "sim", *SMALL, *extra), option)
    assert list(tmp_path.iterdir()) == []


def test_other_commands_refuse_bad_values(tmp_path: Path, data) -> None:
    out = tmp_path / "out.mrc"
    post = tmp_path / "post"
    cases = [
        (["reconstruct", data.star, "-o", out, "--maxres", "0"], "--maxres"),
        (["reconstruct", data.star, "-o", out, "--maxres", "nan"], "--maxres"),
        (["reconstruct", data.star, "-o", out, "--datadir", tmp_path / "nowhere"], "--datadir"),
        (["reconstruct", data.star, "-o", out, "--device", "foo"], "--device foo"),
        (["reconstruct", data.star, "-o", out, "--device", "cuda:x"], "--device cuda:x"),
        (["postprocess", data.half1, data.half2, "-o", post, "--low-pass", "nan"], "--low-pass"),
        (["postprocess", data.half1, data.half2, "-o", post, "--bfactor", "inf"], "--bfactor"),
        (["postprocess", data.half1, data.half2, "-o", post, "--extend", "-1"], "--extend"),
        (["postprocess", data.half1, data.half2, "-o", post, "--angpix", "0"], "--angpix"),
        (["postprocess", data.half1, data.half2, "-o", post, "--mtf-angpix", "-1"], "--mtf-angpix"),
        (["postprocess", data.half1, data.half2, "-o", post, "--autob-lowres", "nan"], "--autob-lowres"),
        (["fsc", data.half1, data.half2, "--angpix", "nan", "--plot", tmp_path / "f.png"], "--angpix"),
        (["fsc", data.half1, data.half2, "--threshold", "2"], "--threshold"),
    ]
    for args, option in cases:
        _one_error(_run(*args), option)
    assert list(tmp_path.iterdir()) == []


def test_simulate_refuses_an_empty_map(tmp_path: Path) -> None:
    empty = tmp_path / "empty.mrc"
    write_map(empty, np.zeros((24, 24, 24), np.float32), 4.0)
    _one_error(_run("simulate", empty, "-o", tmp_path / "sim", *SMALL), "the map is empty", str(empty))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.mrc"]


def test_simulate_dataset_never_writes_nan_images(tmp_path: Path) -> None:
    from cryocli.imaging.simulate import SimulationConfig, draw_geometry, simulate_dataset

    config = SimulationConfig(n_particles=10, box=16, apix=4.0, voltage=0.0, snr=float("inf"))
    volume = np.zeros((16, 16, 16), np.float32)
    volume[6:10, 6:10, 6:10] = 1.0
    with pytest.raises(CryocliError, match="NaN or Inf.*--voltage 0"):
        simulate_dataset(volume, draw_geometry(config), config, tmp_path / "sim")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("value, words", [(float("nan"), "NaN or Inf"), (0.0, "all zero")])
def test_reconstruct_never_writes_nan_or_empty_maps(tmp_path: Path, data, monkeypatch, value: float,
                                                     words: str) -> None:
    from cryocli.engines.common.particles_reconstruct import ReconstructedSets

    monkeypatch.setattr("cryocli.engines.common.particles_reconstruct.reconstruct_labelled",
                        lambda *a, **k: ReconstructedSets([torch.full((24, 24, 24), value)], [10], 24, 4.0))
    out = tmp_path / "map.mrc"
    _one_error(_run("-q", "reconstruct", data.star, "-o", out), words, str(data.star))
    assert list(tmp_path.iterdir()) == []


def test_postprocess_never_writes_a_non_finite_map(tmp_path: Path, data) -> None:
    post = tmp_path / "post"
    _one_error(_run("postprocess", data.half1, data.half2, "-o", post, "--bfactor", "-1e6"), "NaN or Inf", "--bfactor")
    assert list(tmp_path.iterdir()) == []


# ----- 7. the global --device is checked by every command ----------------------------------------------------

def _every_command_args(tmp_path: Path, data) -> dict[str, list[object]]:
    """Arguments for each subcommand: inputs that exist, outputs in tmp_path."""
    return {
        "info": [data.half1],
        "simulate": [DEMO_MODEL, "-o", tmp_path / "sim", *SMALL],
        "reconstruct": [data.star, "-o", tmp_path / "map.mrc"],
        "postprocess": [data.half1, data.half2, "-o", tmp_path / "post"],
        "fsc": [data.half1, data.half2, "-o", tmp_path / "fsc.star"],
        "abinitio": [data.star, "-o", tmp_path / "run"],
        "refine": [data.star, "-o", tmp_path / "run", "--ref", data.map],
        "report": [data.root / "rec"],
    }


def test_every_command_refuses_a_bad_device(tmp_path: Path, data) -> None:
    """`cryocli --device banana fsc a.mrc b.mrc` ran (exit 0): the value was only read by commands that use a
    torch device. Every command refuses it, before any work, with resolve_device's line."""
    cases = _every_command_args(tmp_path, data)
    assert set(cases) == set(typer.main.get_command(app).commands)  # a new command gets a case here
    for name, args in cases.items():
        for where in ("before", "after"):
            argv = ["--device", "banana", name, *args] if where == "before" else [name, *args, "--device", "banana"]
            _one_error(_run(*argv), "--device banana: expected auto, cpu, cuda or cuda:N")
    _one_error(_run("--device", "cuda:x", "info", data.half1), "--device cuda:x: expected auto, cpu, cuda or cuda:N")
    assert list(tmp_path.iterdir()) == []
    for good in ("cpu", "auto", "CPU"):
        assert _run("--device", good, "-q", "info", data.half1).exit_code == 0


def test_every_command_refuses_cuda_where_there_is_none(tmp_path: Path, data, monkeypatch) -> None:
    """`cryocli --device cuda info map.mrc` ran on a machine without CUDA; now the same line as reconstruct's."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name, args in _every_command_args(tmp_path, data).items():
        _one_error(_run("--device", "cuda", name, *args), "--device cuda: CUDA is not available on this machine")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    _one_error(_run("--device", "cuda:1", "info", data.half1), "--device cuda:1: this machine has 1 CUDA device(s)")
    assert list(tmp_path.iterdir()) == []


def test_json_summaries_are_valid_json_without_infinity(capsys, monkeypatch) -> None:
    """A resolution that does not exist (inf) or a NaN is written as null: Python's json writes Infinity, which
    jq and JSON.parse refuse."""
    import json as json_module
    import math

    import numpy as np

    from cryocli.cli import common

    monkeypatch.setattr(common.STATE, "json", True)
    common.emit_json({"a": math.inf, "b": [1.5, float("nan"), np.float64(-np.inf)], "c": {"d": 2.0}, "e": "inf"})
    line = capsys.readouterr().out
    assert "Infinity" not in line and "NaN" not in line
    assert json_module.loads(line) == {"a": None, "b": [1.5, None, None], "c": {"d": 2.0}, "e": "inf"}
