"""ParticleStack on the real stacks: path resolution, batched reads, parameters, errors."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import torch

from cryocli.errors import CryocliError
from cryocli.geometry.rotations import euler_to_matrix
from cryocli.io.dataset import ParticleStack, check_map_compatible, resolve_stack_paths
from cryocli.io.mrc import read_map, write_map
from cryocli.io.star import read_star
from tests.conftest import CRYODRGN, CRYOJAX, RELION_SET, need


def _direct(path: Path) -> np.ndarray:
    """The whole stack read straight through mrcfile, float32 ``(n, ny, nx)``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # several reference stacks lack the MAP id and machine stamp
        mrc = mrcfile.open(need(path), permissive=True)
    with mrc:
        return np.asarray(mrc.data, dtype=np.float32).reshape(-1, mrc.data.shape[-2], mrc.data.shape[-1])


def _with_names(table, names):
    table.particles["rlnImageName"] = names
    return table


def test_relion31_images_match_mrcfile() -> None:
    stack = ParticleStack(read_star(need(CRYODRGN / "relion31.star")))
    assert (len(stack), stack.box) == (5, 256)
    assert stack.pixel_size == pytest.approx(2.806)  # the header says 1 A/px: the STAR file wins
    direct = _direct(CRYODRGN / "relion31.mrcs")
    images = stack.images(torch.arange(5))
    assert images.dtype == torch.float32 and images.shape == (5, 256, 256)
    np.testing.assert_array_equal(images.numpy(), direct)
    np.testing.assert_array_equal(stack.images([4, 0, 4]).numpy(), direct[[4, 0, 4]])
    assert stack.images([]).shape == (0, 256, 256)
    with pytest.raises(IndexError):
        stack.images([5])


def test_relion31_parameters() -> None:
    table = read_star(need(CRYODRGN / "relion31.star"))
    stack = ParticleStack(table)
    angles = torch.from_numpy(table.euler_angles)
    expected = euler_to_matrix(angles[:, 0], angles[:, 1], angles[:, 2])
    assert stack.rotations.shape == (5, 3, 3) and stack.rotations.dtype == torch.float32
    torch.testing.assert_close(stack.rotations, expected.float())
    torch.testing.assert_close(stack.shifts_angstrom, torch.tensor([[0.019324, -0.64686], [-0.25248, 0.403454],
                                                                    [-0.65323, -0.09226], [-0.00755, -0.33640],
                                                                    [-0.33773, 0.385262]]))
    ctf = stack.ctf_params
    assert len(ctf) == 5 and ctf.defocus_u.dtype == torch.float64
    np.testing.assert_allclose(ctf.defocus_v.numpy()[2], 12468.325404)
    np.testing.assert_array_equal(stack.random_subset.numpy(), [1] * 5)


def test_empiar_mrc_extension_and_no_poses() -> None:
    stack = ParticleStack(read_star(need(CRYODRGN / "empiar_10076_7.star")))
    assert (len(stack), stack.box) == (7, 320)
    assert stack.pixel_size == pytest.approx(1e4 * 5 / 38168)
    assert stack.rotations is None and stack.shifts_angstrom is None and stack.random_subset is None
    np.testing.assert_array_equal(stack.images([6, 1]).numpy(), _direct(CRYODRGN / "empiar_10076_7.mrc")[[6, 1]])
    batch = stack.batch([2, 3])
    assert batch.rotations is None and batch.subset is None
    np.testing.assert_allclose(batch.ctf.amplitude_contrast.numpy(), 0.07)


def test_relion5_two_stacks_through_datadir() -> None:
    table = read_star(need(CRYODRGN / "relion5.star"))
    datadir = CRYODRGN / "toy_datadir"
    with pytest.raises(CryocliError, match="stack not found") as exc:
        ParticleStack(table)
    assert "toy_images_a.mrcs" in str(exc.value) and "relion5.star" in str(exc.value)
    # the optics table says 448 px, the toy stacks hold 30 px images
    with pytest.raises(CryocliError, match="448 px") as exc:
        ParticleStack(table, datadir=datadir)
    assert "30 px" in str(exc.value)
    stack = ParticleStack(table, datadir=str(datadir), allow_box_mismatch=True)
    assert stack.box == 30 and len(stack) == 17
    assert sorted(p.name for p in stack.files) == ["toy_images_a.mrcs", "toy_images_b.mrcs"]
    index, paths = table.image_names
    a, b = _direct(datadir / "toy_images_a.mrcs"), _direct(datadir / "toy_images_b.mrcs")
    expected = np.stack([(a if p == "toy_images_a.mrcs" else b)[i] for i, p in zip(index, paths)])
    order = np.random.default_rng(0).permutation(17)
    np.testing.assert_array_equal(stack.images(order).numpy(), expected[order])
    assert {"toy_images_a.mrcs", "toy_images_b.mrcs"} == set(paths)


def test_resolve_stack_paths_once_per_stack() -> None:
    table = read_star(need(CRYODRGN / "relion5.star"))
    entries = resolve_stack_paths(table, datadir=CRYODRGN / "toy_datadir")
    assert [e["name"] for e in entries] == ["toy_images_a.mrcs", "toy_images_b.mrcs"]
    assert [e["resolved"] for e in entries] == [CRYODRGN / "toy_datadir" / "toy_images_a.mrcs",
                                                CRYODRGN / "toy_datadir" / "toy_images_b.mrcs"]
    assert [e["first_particle"] for e in entries] == [0, 1]
    missing = resolve_stack_paths(table)
    assert all(e["resolved"] is None and e["tried"][0] == CRYODRGN / e["name"] for e in missing)


def test_trpv1_with_remapped_names() -> None:
    table = read_star(need(CRYOJAX / "trpv1_small_stack.star"))
    names = table.particles["rlnImageName"].str.replace("./batch_0_restacked.mrc", "trpv1_small_stack.mrcs",
                                                        regex=False)
    stack = ParticleStack(_with_names(table, names))
    assert (stack.box, stack.pixel_size) == (48, pytest.approx(4.88))
    np.testing.assert_array_equal(stack.images(np.arange(10)).numpy(), _direct(CRYOJAX / "trpv1_small_stack.mrcs"))
    assert set(stack.random_subset.tolist()) == {1, 2}


def test_set_3j9g_paths_relative_to_the_project_folder() -> None:
    stack = ParticleStack(read_star(need(RELION_SET / "noisy" / "noisy.star")))
    assert stack.files == [RELION_SET / "noisy" / "noisy.mrcs"]
    assert (len(stack), stack.box, stack.pixel_size) == (600, 64, pytest.approx(4.4))
    direct = _direct(RELION_SET / "noisy" / "noisy.mrcs")
    seen = []
    for batch in stack.iter_batches(97):
        assert batch.images.shape[1:] == (64, 64) and len(batch.images) <= 97
        np.testing.assert_array_equal(batch.images.numpy(), direct[batch.indices.numpy()])
        torch.testing.assert_close(batch.rotations, stack.rotations[batch.indices])
        torch.testing.assert_close(batch.ctf.defocus_u, stack.ctf_params.defocus_u[batch.indices])
        np.testing.assert_array_equal(batch.subset.numpy(), 2 - (batch.indices.numpy() + 1) % 2)
        seen.append(batch.indices)
    np.testing.assert_array_equal(torch.cat(seen).numpy(), np.arange(600))
    picked = list(stack.iter_batches(4, indices=[599, 3, 10]))
    assert [b.indices.tolist() for b in picked] == [[599, 3, 10]]


def test_half_sets_are_written_when_absent() -> None:
    table = read_star(need(RELION_SET / "noisy" / "noisy.star"))
    table.particles = table.particles.drop(columns=["rlnRandomSubset"])
    stack = ParticleStack(table)
    assert stack.random_subset is None
    halves = stack.ensure_half_sets(seed=0)
    assert sorted(set(halves.tolist())) == [1, 2] and int((halves == 1).sum()) == 300
    np.testing.assert_array_equal(table.particles["rlnRandomSubset"].to_numpy(), halves.numpy())
    assert torch.equal(stack.random_subset, halves)
    other = read_star(RELION_SET / "noisy" / "noisy.star")
    other.particles = other.particles.drop(columns=["rlnRandomSubset"])
    again = ParticleStack(other).ensure_half_sets(seed=0)
    assert torch.equal(again, halves)
    odd = read_star(need(CRYODRGN / "empiar_10076_7.star"))
    seven = ParticleStack(odd).ensure_half_sets(seed=3)
    assert abs(int((seven == 1).sum()) - int((seven == 2).sum())) == 1
    # a different seed gives a different split, and the split is not the file order
    third = read_star(RELION_SET / "noisy" / "noisy.star")
    third.particles = third.particles.drop(columns=["rlnRandomSubset"])
    assert not torch.equal(ParticleStack(third).ensure_half_sets(seed=1), halves)
    assert not torch.equal(halves, torch.from_numpy(np.tile([1, 2], 300)))


def test_missing_stack_lists_every_path_tried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    table = read_star(need(CRYODRGN / "relion31.star"))
    names = table.particles["rlnImageName"].tolist()
    names[3] = "000004@sub/missing.mrcs"
    with pytest.raises(CryocliError) as exc:
        ParticleStack(_with_names(table, names), datadir=tmp_path / "dd")
    message = str(exc.value)
    assert "particle 4" in message and "000004@sub/missing.mrcs" in message and "relion31.star" in message
    for tried in (CRYODRGN / "sub/missing.mrcs", tmp_path / "sub/missing.mrcs", tmp_path / "dd/sub/missing.mrcs",
                  tmp_path / "dd/missing.mrcs", CRYODRGN.parent / "sub/missing.mrcs"):
        assert str(tried) in message, tried


def test_index_past_the_end(tmp_path: Path) -> None:
    table = read_star(need(CRYODRGN / "relion31.star"))
    names = table.particles["rlnImageName"].tolist()
    names[2] = "000006@relion31.mrcs"
    with pytest.raises(CryocliError) as exc:
        ParticleStack(_with_names(table, names))
    message = str(exc.value)
    for part in ("particle 3", "000006@relion31.mrcs", "past the end", "5 images", str(CRYODRGN / "relion31.mrcs")):
        assert part in message, message


def test_stacks_with_different_boxes() -> None:
    table = read_star(need(CRYODRGN / "relion31.star"))
    names = table.particles["rlnImageName"].tolist()
    names[1] = f"3@{CRYODRGN / 'toy_datadir' / 'toy_images_a.mrcs'}"
    with pytest.raises(CryocliError, match="different box sizes") as exc:
        ParticleStack(_with_names(table, names))
    assert "256 px" in str(exc.value) and "30 px" in str(exc.value)


def test_nan_pixels_name_the_stack(tmp_path: Path) -> None:
    images = np.random.default_rng(0).normal(size=(4, 32, 32)).astype(np.float32)
    images[2, 5, 7] = np.nan
    with warnings.catch_warnings(), mrcfile.new(tmp_path / "bad.mrcs") as mrc:
        warnings.simplefilter("ignore")  # mrcfile warns about the NaN we put there on purpose
        mrc.set_data(images)
        mrc.set_image_stack()
    table = read_star(need(CRYODRGN / "relion31.star")).subset([0, 1, 2, 3])
    stack = ParticleStack(_with_names(table, [f"{i}@{tmp_path / 'bad.mrcs'}" for i in range(1, 5)]),
                          allow_box_mismatch=True)
    np.testing.assert_array_equal(stack.images([0, 3]).numpy(), images[[0, 3]])
    with pytest.raises(CryocliError, match="NaN or Inf") as exc:
        stack.images([1, 2])
    assert "bad.mrcs" in str(exc.value) and "image 3" in str(exc.value)


def test_missing_image_names_column() -> None:
    with pytest.raises(CryocliError, match="rlnImageName") as exc:
        ParticleStack(read_star(need(RELION_SET / "particles_truth.star")))
    assert "particles_truth.star" in str(exc.value)


def test_map_compatibility(tmp_path: Path) -> None:
    stack = ParticleStack(read_star(need(RELION_SET / "noisy" / "noisy.star")))
    map_data = read_map(need(RELION_SET / "map.mrc"))
    check_map_compatible(map_data, stack)
    with pytest.raises(CryocliError, match="48 x 48 x 48 px") as exc:
        check_map_compatible(read_map(need(CRYOJAX / "trpv1_volume.mrc")), stack)
    assert "64 px" in str(exc.value)
    write_map(tmp_path / "coarse.mrc", map_data.data, 4.5, "test")
    with pytest.raises(CryocliError) as exc:
        check_map_compatible(read_map(tmp_path / "coarse.mrc"), stack)
    assert "4.4 A vs 4.5 A" in str(exc.value) and "coarse.mrc" in str(exc.value)
    write_map(tmp_path / "close.mrc", map_data.data, 4.41, "test")
    check_map_compatible(read_map(tmp_path / "close.mrc"), stack)


def test_batches_move_to_the_device() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    stack = ParticleStack(read_star(need(CRYODRGN / "relion31.star")))
    batch = stack.batch(torch.tensor([1, 3]), device=device)
    for tensor in (batch.indices, batch.images, batch.rotations, batch.shifts_angstrom, batch.subset,
                   batch.ctf.defocus_u):
        assert tensor.device.type == device
    assert os.fspath(stack.files[0]).endswith("relion31.mrcs")
    stack.close()
    np.testing.assert_array_equal(stack.images([1]).numpy(), _direct(CRYODRGN / "relion31.mrcs")[[1]])


def _rss_file_kib() -> int:
    """Resident file-backed memory of this process (Linux), KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    raise AssertionError("no RssFile in /proc/self/status")


def test_streaming_a_stack_does_not_keep_it_resident(tmp_path: Path) -> None:
    """Reading every image of a 40 MB stack in batches leaves its mapped pages out of the resident set (they
    are released after each read), and the images read again are the same."""
    from cryocli.io.mrc import write_stack

    gen = np.random.default_rng(0)
    images = gen.standard_normal((10000, 32, 32)).astype(np.float32)
    write_stack(tmp_path / "p.mrcs", images, 2.0)
    lines = ["data_particles", "loop_", "_rlnImageName #1"] + [f"{i + 1:06d}@p.mrcs" for i in range(len(images))]
    (tmp_path / "p.star").write_text("\n".join(lines) + "\n")
    stack = ParticleStack(read_star(tmp_path / "p.star"))
    before = _rss_file_kib()
    for start in range(0, len(images), 512):
        batch = stack.images(np.arange(start, min(start + 512, len(images))))
    grown_mib = (_rss_file_kib() - before) / 1024
    assert grown_mib < 8, grown_mib  # the stack is 39 MiB
    np.testing.assert_array_equal(batch.numpy(), images[len(images) - batch.shape[0]:])
    np.testing.assert_array_equal(stack.images([3, 9000]).numpy(), images[[3, 9000]])
