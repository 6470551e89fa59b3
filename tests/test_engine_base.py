"""The engine framework: registry, particle preparation (crop, normalisation, sign), reporter, run directory,
checkpoints, the explicit Hartley decoder, the multi-head encoder and the per-particle Adam."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cryocli.engines.abinitio.particle_adam import ParticleAdam
from cryocli.analysis.ground_truth import GroundTruth
from cryocli.engines.particles import prefetching, prepare_particles, protein_is_dark, stream_particles
from cryocli.engines.progress import Reporter
from cryocli.engines.protocol import EngineConfig, engine_names, engine_summaries, get_engine
from cryocli.engines.result import Reconstruction
from cryocli.engines.common.encoders import MultiHeadPoseEncoder, gaussian_pyramid
from cryocli.engines.common.hartley_volume import HartleyVolume
from cryocli.io.run_directory import RunDirectory
from cryocli.errors import CryocliError
from cryocli.geometry.rotations import euler_to_matrix, geodesic_distance, random_rotations
from cryocli.imaging.hartley import hartley_volume, image_to_hartley
from cryocli.imaging.projector import Projector
from cryocli.imaging.fourier import rfft_to_image
from cryocli.io.dataset import ParticleStack
from cryocli.io.star import read_star

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "cryocli" / "data" / "4ake_adk_open.pdb"


def _simulate(out: Path, n: int, invert: bool, box: int = 32, snr: float = 0.1, seed: int = 3) -> Path:
    from cryocli.imaging.simulate import SimulationConfig, draw_geometry, simulate_dataset
    from cryocli.io.volumes import load_volume

    config = SimulationConfig(n_particles=n, box=box, apix=3.6, snr=snr, invert=invert, seed=seed, stack_size=n)
    volume, info = load_volume(MODEL, box, 3.6)
    simulate_dataset(volume, draw_geometry(config), config, out)
    return out


@pytest.fixture(scope="module")
def bright(tmp_path_factory) -> Path:
    return _simulate(tmp_path_factory.mktemp("bright"), 300, invert=False)


@pytest.fixture(scope="module")
def dark(tmp_path_factory) -> Path:
    return _simulate(tmp_path_factory.mktemp("dark"), 300, invert=True)


# ------------------------------------------------------------------------------------------------ registry


def test_registry_lists_cryospin_and_rejects_unknown_methods():
    assert "cryospin" in engine_names("abinitio")
    assert "winner-takes-all" in engine_summaries("abinitio")["cryospin"]
    engine = get_engine("cryospin", "abinitio")
    assert engine.name == "cryospin"
    with pytest.raises(CryocliError, match="unknown method.*cryospin"):
        get_engine("no-such-method")


# ------------------------------------------------------------------------------------------------ particles


def test_sign_is_detected_for_bright_and_dark_protein(bright, dark):
    device = torch.device("cpu")
    a = prepare_particles(ParticleStack(read_star(bright / "particles.star")), EngineConfig(), device)
    b = prepare_particles(ParticleStack(read_star(dark / "particles.star")), EngineConfig(), device)
    assert not a.inverted and b.inverted
    # After the sign correction both datasets have bright protein: the mean images agree.
    corr = torch.corrcoef(torch.stack([a.images.mean(0).flatten(), b.images.mean(0).flatten()]))[0, 1]
    assert corr > 0.5
    assert protein_is_dark(-a.images.mean(0), a.pixel_size)
    # --invert / --no-invert override the detection.
    forced = prepare_particles(ParticleStack(read_star(bright / "particles.star")), EngineConfig(invert=True), device)
    assert forced.inverted
    assert torch.allclose(forced.images, -a.images, atol=1e-5)


def test_prepared_particles_have_unit_background_and_cropped_pixel_size(bright):
    stack = ParticleStack(read_star(bright / "particles.star"))
    full = prepare_particles(stack, EngineConfig(), torch.device("cpu"))
    k = torch.arange(32) - 16
    ring = (k[:, None] ** 2 + k[None, :] ** 2) > (0.4 * 32) ** 2
    bg = full.images[:, ring]
    assert abs(float(bg.std()) - 1.0) < 1e-3
    assert float(bg.mean(1).abs().max()) < 1e-4
    cropped = prepare_particles(stack, EngineConfig(box=16), torch.device("cpu"))
    assert cropped.images.shape == (300, 16, 16)
    assert cropped.pixel_size == pytest.approx(7.2)
    with pytest.raises(CryocliError, match="larger than the particle box"):
        prepare_particles(stack, EngineConfig(box=64), torch.device("cpu"))


@pytest.mark.parametrize("box,invert", [(32, None), (16, True)])
def test_streamed_particles_equal_the_prepared_ones(dark, box, invert):
    """stream_particles reads, crops and normalises on demand what prepare_particles holds: the same images for an
    unsorted tensor index, an array and a slice, the same sign, pixel size and CTFs."""
    stack = ParticleStack(read_star(dark / "particles.star"))
    config = EngineConfig(box=box, invert=invert)
    held = prepare_particles(stack, config, torch.device("cpu"))
    streamed = stream_particles(stack, config, torch.device("cpu"), chunk=64)  # several chunks in the first pass
    assert streamed.inverted == held.inverted and streamed.pixel_size == held.pixel_size
    assert streamed.images.shape == tuple(held.images.shape) and len(streamed) == len(held)
    idx = torch.tensor([299, 3, 150, 3, 0])
    for index in (idx, idx.numpy(), slice(10, 20)):
        assert torch.allclose(streamed.images[index], held.images[index], atol=1e-5, rtol=1e-5)
    assert held.ctf is not None and streamed.ctf is not None
    assert torch.equal(streamed.ctf.defocus_u, held.ctf.defocus_u)


def test_prefetching_reads_each_batch_once_ahead_of_its_use(dark, monkeypatch):
    """A loop over prefetching(...) gets the held images of each batch; every batch is read from the stacks once,
    and the next batch is already queued (read in the background) when the loop body runs."""
    stack = ParticleStack(read_star(dark / "particles.star"))
    config = EngineConfig(box=32)
    held = prepare_particles(stack, config, torch.device("cpu"))
    streamed = stream_particles(stack, config, torch.device("cpu"))
    reads: list[list[int]] = []
    original = stack.images
    monkeypatch.setattr(stack, "images", lambda rows: (reads.append(list(np.asarray(rows))), original(rows))[1])
    batches = list(torch.randperm(len(stack), generator=torch.Generator().manual_seed(0)).split(37))
    for k, idx in enumerate(prefetching(streamed.images, batches)):
        queued = [rows.tolist() for rows, _ in streamed.images._pending]
        if k + 1 < len(batches):
            assert batches[k + 1].tolist() in queued  # the next batch is being read while this one is used
        assert torch.allclose(streamed.images[idx], held.images[idx], atol=1e-5, rtol=1e-5)
    assert sorted(map(tuple, reads)) == sorted(tuple(b.tolist()) for b in batches)  # each read once
    assert list(prefetching(held.images, batches)) == batches  # held images: the batches as they are


def test_read_ahead_reads_the_next_item_while_this_one_is_used():
    from cryocli.io.read_ahead import read_ahead

    started: list[int] = []

    def read(k: int) -> int:
        started.append(k)
        if k == 4:
            raise ValueError("bad item 4")
        return k * k

    seen = []
    with pytest.raises(ValueError, match="bad item 4"):
        for k, value in read_ahead(read, range(6)):
            assert value == k * k
            deadline = time.monotonic() + 10
            while k + 1 not in started and time.monotonic() < deadline:
                pass  # the next read starts in the background, without the caller asking for it
            assert k + 1 in started
            seen.append(k)
    assert seen == [0, 1, 2, 3]  # the error is raised where item 4 would have been yielded


def test_particle_stack_reads_from_two_threads_at_once(dark):
    from concurrent.futures import ThreadPoolExecutor

    stack = ParticleStack(read_star(dark / "particles.star"))
    expected = stack.images(np.arange(len(stack)))
    batches = [np.random.default_rng(k).permutation(len(stack))[:50] for k in range(40)]
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(stack.images, batches))
    for rows, images in zip(batches, results, strict=True):
        assert torch.equal(images, expected[rows])


# ------------------------------------------------------------------------------------------------ decoder


def test_hartley_volume_slices_match_the_projector_and_map_round_trips(bright):
    from cryocli.io.mrc import read_map

    truth = torch.tensor(read_map(bright / "ground_truth.mrc").data)
    n = truth.shape[-1]
    vol = HartleyVolume(n, torch.ones(n // 2 + 3))
    grid = hartley_volume(truth, pad=1, gridding_correction=False)
    with torch.no_grad():
        vol.mantissa.copy_(grid)
        vol.exponent.zero_()
    # Voxels outside the support are kept at 0; the map inside the Nyquist ball comes back.
    back = vol.to_map()
    assert float(torch.corrcoef(torch.stack([back.flatten(), truth.flatten()]))[0, 1]) > 0.99
    rots = random_rotations(6, generator=torch.Generator().manual_seed(1))
    reference = image_to_hartley(rfft_to_image(Projector(truth, pad=1, gridding_correction=False).project(rots), n))
    with torch.no_grad():
        ours = vol.project(rots)
    k = torch.arange(n) - n // 2
    inside = (k[:, None] ** 2 + k[None, :] ** 2) <= (n // 2 - 1) ** 2
    err = (ours - reference)[:, inside].norm() / reference[:, inside].norm()
    assert float(err) < 1e-4


def test_mantissa_exponent_gradients_reach_both_fields():
    vol = HartleyVolume(16, torch.linspace(10, 1, 11), generator=torch.Generator().manual_seed(0))
    loss = vol.project(random_rotations(4, generator=torch.Generator().manual_seed(2))).pow(2).sum()
    loss.backward()
    assert float(vol.mantissa.grad.abs().sum()) > 0 and float(vol.exponent.grad.abs().sum()) > 0
    # The exponent starts as the log of the radial profile: |H| at the centre is amplitude(0) * |M|.
    c = vol.grid_size // 2
    assert float(vol.exponent.detach()[c, c, c]) == pytest.approx(np.log(10.0), abs=1e-5)


# ------------------------------------------------------------------------------------------------ encoder


def test_multi_head_encoder_returns_rotations_and_bounded_shifts():
    enc = MultiHeadPoseEncoder(32, heads=5, channels=(8, 16, 32), convs=(1, 1, 1), hidden=(32,), predict_shifts=True)
    with torch.no_grad():
        rot, sh = enc(torch.randn(3, 32, 32))
    assert rot.shape == (3, 5, 3, 3) and sh.shape == (3, 5, 2)
    eye = torch.eye(3).expand(3, 5, 3, 3)
    assert torch.allclose(rot @ rot.transpose(-1, -2), eye, atol=1e-5)
    assert torch.allclose(torch.linalg.det(rot), torch.ones(3, 5), atol=1e-5)
    assert float(sh.abs().max()) <= 32 / 8
    # Heads have their own weights: they disagree on the same image.
    assert float(geodesic_distance(rot[:, 0], rot[:, 1]).min()) > 1e-3
    pyr = gaussian_pyramid(torch.randn(2, 32, 32), (1.0, 2.0))
    assert pyr.shape == (2, 3, 32, 32) and float(pyr[:, 2].std()) < float(pyr[:, 1].std()) < float(pyr[:, 0].std())


# ------------------------------------------------------------------------------------------------ Adam


def test_particle_adam_matches_torch_adam_and_leaves_other_particles_alone():
    g = torch.Generator().manual_seed(0)
    grads = torch.randn(7, 2, 3, generator=g)
    ours = ParticleAdam.zeros(5, 3, lr=0.05)
    params = torch.zeros(5, 3)
    reference = torch.zeros(2, 3, requires_grad=True)
    opt = torch.optim.Adam([reference], lr=0.05)
    idx = torch.tensor([1, 3])
    for grad in grads:
        params[idx] += ours.step(idx, grad)
        opt.zero_grad()
        reference.grad = grad.clone()
        opt.step()
    assert torch.allclose(params[idx], reference.detach(), atol=1e-6)
    assert torch.equal(params[torch.tensor([0, 2, 4])], torch.zeros(3, 3))
    assert ours.steps.tolist() == [0, 7, 0, 7, 0]


# ------------------------------------------------------------------------------------------------ files


def _fake_result(n_particles: int, rows: np.ndarray) -> Reconstruction:
    g = torch.Generator().manual_seed(5)
    return Reconstruction(volume=torch.randn(16, 16, 16, generator=g), voxel_size=7.2,
                          rotations=random_rotations(n_particles, generator=g),
                          origins_angstrom=torch.randn(n_particles, 2, generator=g) * 3, particle_rows=rows,
                          gold_standard_fsc=np.linspace(1, 0, 9),
                          half_volumes=(torch.randn(16, 16, 16, generator=g), torch.ones(16, 16, 16)))


def test_run_directory_refuses_to_overwrite_and_writes_relion31_results(bright, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("old results")
    with pytest.raises(CryocliError, match="--force"):
        RunDirectory(out)
    with pytest.raises(CryocliError, match="no checkpoint.pt"):
        RunDirectory(out, resume=True)
    run = RunDirectory(out, force=True).open()
    table = read_star(bright / "particles.star")
    rows = np.arange(0, 300, 3)
    result = _fake_result(len(rows), rows)
    written = run.write_result(result, table, "abinitio --method test")
    # A forced run works aside: the old results stay until it is committed.
    assert (out / "keep.txt").read_text() == "old results" and not (out / "map.mrc").exists()
    run.commit()
    run.close(keep=False)
    assert not (out / "keep.txt").exists()
    for key in ("map", "half1", "half2", "particles", "fsc_star", "fsc_plot"):
        assert Path(written[key]).is_file(), key
    back = read_star(out / "particles.star")
    assert len(back) == len(rows)
    # Every input column is kept; poses and origins are RELION 3.1 columns in degrees and Angstrom.
    assert set(table.particles.columns) <= set(back.particles.columns)
    assert back.version.startswith("3.1") or back.version == "3.1"
    a = torch.from_numpy(back.euler_angles)
    mats = euler_to_matrix(a[:, 0], a[:, 1], a[:, 2])
    assert float(geodesic_distance(mats, result.rotations.double()).max()) < 1e-5
    assert np.allclose(back.origins_angstrom, result.origins_angstrom.numpy(), atol=1e-5)
    assert (back.particles["rlnImageName"].to_numpy() == table.particles["rlnImageName"].to_numpy()[rows]).all()
    assert (back.particles["rlnDefocusU"].to_numpy() == table.particles["rlnDefocusU"].to_numpy()[rows]).all()


def test_reporter_logs_metrics_checkpoints_and_resumes(bright, tmp_path):
    from cryocli.io.mrc import read_map

    truth_map = read_map(bright / "ground_truth.mrc")
    stack = ParticleStack(read_star(bright / "particles.star"))
    truth = GroundTruth(torch.tensor(truth_map.data), truth_map.voxel_size, stack.rotations, every=2)
    run = RunDirectory(tmp_path / "run").open()
    rep = Reporter(files=run, ground_truth=truth, meta={"method": "test"})
    rows = np.arange(300)
    rep.begin_run("full", rows)
    assert rep.resume_state() is None
    # The true poses and map score perfectly; a noise map does not.
    row1 = rep.end_epoch(1, {"loss": 2.0}, volume=torch.randn(32, 32, 32), voxel_size=3.6,
                         rotations=stack.rotations, state={"epoch": 1, "x": torch.arange(3)})
    assert row1["rot_err_median"] < 1e-3 and "res_fsc05_A" not in row1  # map scored every 2 epochs
    row2 = rep.end_epoch(2, {"loss": 1.0}, volume=torch.tensor(truth_map.data), voxel_size=3.6,
                         rotations=stack.rotations, state={"epoch": 2, "x": torch.arange(4)})
    assert row2["res_fsc05_A"] == pytest.approx(7.2, abs=0.01)  # FSC = 1 up to Nyquist
    lines = [json.loads(x) for x in (run.path / "log.jsonl").read_text().splitlines()]
    assert [x["event"] for x in lines] == ["run", "epoch", "epoch"]
    csv = (run.path / "metrics.csv").read_text().splitlines()
    assert csv[0].startswith("run,epoch,loss") and len(csv) == 3
    run.close(keep=True)
    again = Reporter(files=RunDirectory(run.path, resume=True).open(), resume=True, meta={"method": "test"})
    again.begin_run("full", rows)
    state = again.resume_state()
    assert state["epoch"] == 2 and torch.equal(state["x"], torch.arange(4))
    assert len(again.history) == 2
    with pytest.raises(CryocliError, match="not other"):
        Reporter(files=RunDirectory(run.path, resume=True), resume=True, meta={"method": "other"})


@pytest.mark.parametrize("method", ["relion", "sparse-tv", "cryospin", "cryo2ssnet", "sagd"])
def test_a_resume_may_change_only_how_long_a_run_goes_on(method: str) -> None:
    """Every engine's config refuses a resume with another value of an option that changes what the run computes
    (the seed: its half sets and random draws), names it, and accepts another run length, batch size (the remedy for a
    run short of memory) and --preload."""
    from cryocli.engines.protocol import build_config
    from cryocli.errors import OptionError

    kind = "refine" if method in ("relion", "sparse-tv") else "abinitio"
    engine = get_engine(method, kind)
    given = {"ref": "init.mrc"} if kind == "refine" else {}
    saved = build_config(engine, given).as_dict()
    longer = {"relion": "epochs", "sparse-tv": "epochs", "cryospin": "epochs", "cryo2ssnet": "steps",
              "sagd": "max_iter"}[method]
    build_config(engine, {**given, longer: 2 * saved[longer], "batch_size": 16, "preload": "no"}).check_resumes(saved)
    build_config(engine, given).check_resumes(None)  # a checkpoint from before configurations were stored
    with pytest.raises(OptionError, match="made with 0") as refused:
        build_config(engine, {**given, "seed": 3}).check_resumes(saved)
    assert refused.value.option == "seed"
