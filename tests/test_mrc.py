"""MRC maps and stacks: axis order, voxel size, modes, atomic writes, corrupt files."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import mrcfile
import numpy as np
import pytest

import cryocli.io.mrc as mrc_module
from cryocli.errors import CryocliError
from cryocli.io.mrc import (
    grid_kind,
    open_mrc,
    open_stack,
    read_map,
    stack_images,
    stack_info,
    voxel_sizes,
    write_map,
    write_stack,
)
from tests.conftest import MRCFILE_DATA, RELION_SET, need


def _mrcfile_data(path: Path) -> tuple[np.ndarray, object]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with mrcfile.open(need(path), permissive=True) as mrc:
            return np.array(mrc.data), mrc.header.copy()


def test_emd3001_nonstandard_axis_order() -> None:
    path = MRCFILE_DATA / "EMD-3001.map"
    raw, header = _mrcfile_data(path)
    assert (int(header.mapc), int(header.mapr), int(header.maps)) == (3, 1, 2)
    with pytest.raises(CryocliError, match="not cubic") as exc:
        read_map(path)
    assert "EMD-3001.map" in str(exc.value)
    result = read_map(path, require_cubic=False)
    assert result.data.shape == (73, 25, 43)
    assert result.axis_order == (3, 1, 2)
    # The file stores [section, row, column] = [y, x, z] (MAPS=2, MAPR=1, MAPC=3), so V[z, y, x] = raw[y, x, z].
    manual = np.empty((raw.shape[2], raw.shape[0], raw.shape[1]), dtype=np.float32)
    for z in range(raw.shape[2]):
        manual[z] = raw[:, :, z]
    np.testing.assert_array_equal(result.data, manual)
    assert result.voxel_size == pytest.approx(17.93 / 40, rel=1e-6)  # cell a / mx along x


def test_emd3197_and_set_map() -> None:
    raw, _ = _mrcfile_data(MRCFILE_DATA / "EMD-3197.map")
    emd = read_map(MRCFILE_DATA / "EMD-3197.map")
    assert emd.data.shape == (20, 20, 20) and emd.data.dtype == np.float32
    assert emd.voxel_size == pytest.approx(11.4, rel=1e-6)
    np.testing.assert_array_equal(emd.data, raw)
    set_map = read_map(need(RELION_SET / "map.mrc"))
    assert set_map.data.shape == (64, 64, 64)
    assert set_map.voxel_size == pytest.approx(4.4, rel=1e-6)


def test_write_map_round_trip(tmp_path: Path) -> None:
    data = np.random.default_rng(0).normal(size=(12, 12, 12)).astype(np.float32)
    out = tmp_path / "m.mrc"
    mask = os.umask(0o022)
    try:
        write_map(out, data, 2.25, "reconstruct --method relion")
    finally:
        os.umask(mask)
    assert out.stat().st_mode & 0o777 == 0o644
    again = read_map(out)
    np.testing.assert_array_equal(again.data, data)
    assert again.voxel_size == pytest.approx(2.25)
    with mrcfile.open(out) as mrc:  # strict mode: a valid MRC file
        assert int(mrc.header.mode) == 2
        assert "reconstruct --method relion" in mrc.header.label[0].decode()
        assert tuple(float(v) for v in mrc.header.origin.tolist()) == (0.0, 0.0, 0.0)
        assert mrc.is_volume()
    assert [p.name for p in tmp_path.iterdir()] == ["m.mrc"]


def test_write_map_replaces_only_at_the_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "m.mrc"
    old = np.zeros((8, 8, 8), dtype=np.float32)
    new = np.ones((8, 8, 8), dtype=np.float32)
    write_map(out, old, 1.0, "first")
    old_bytes = out.read_bytes()
    seen = {}
    real_replace = os.replace

    def checking_replace(src, dst):
        seen["target_before"] = Path(dst).read_bytes()
        seen["temp_complete"] = read_map(src).data.copy()
        real_replace(src, dst)

    monkeypatch.setattr(mrc_module.os, "replace", checking_replace)
    write_map(out, new, 1.0, "second")
    assert seen["target_before"] == old_bytes
    np.testing.assert_array_equal(seen["temp_complete"], new)
    np.testing.assert_array_equal(read_map(out).data, new)

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(mrc_module.os, "replace", failing_replace)
    with pytest.raises(OSError):
        write_map(out, old, 1.0, "third")
    np.testing.assert_array_equal(read_map(out).data, new)
    assert [p.name for p in tmp_path.iterdir()] == ["m.mrc"]


@pytest.mark.parametrize("mode,dtype", [(0, np.int8), (1, np.int16), (2, np.float32), (6, np.uint16),
                                        (12, np.float16)])
def test_stack_modes(tmp_path: Path, mode: int, dtype: type) -> None:
    rng = np.random.default_rng(mode)
    images = (rng.uniform(0, 100, size=(5, 16, 16))).astype(dtype)
    path = tmp_path / f"s{mode}.mrcs"
    with mrcfile.new(path) as mrc:
        mrc.set_data(images)
        mrc.set_image_stack()
        mrc.voxel_size = 1.7
    info = stack_info(path)
    assert (info.count, info.box, info.ny, info.mode) == (5, 16, 16, mode)
    assert info.voxel_size == pytest.approx(1.7, rel=1e-3 if mode == 12 else 1e-6)
    with open_stack(path) as stack:
        read = stack_images(stack, np.array([3, 0, 3]))
    assert read.dtype == np.float32
    np.testing.assert_array_equal(read, images[[3, 0, 3]].astype(np.float32))


def test_write_stack_round_trip(tmp_path: Path) -> None:
    images = np.random.default_rng(1).normal(size=(3, 20, 20)).astype(np.float32)
    write_stack(tmp_path / "s.mrcs", images, 3.3, "simulate")
    with mrcfile.open(tmp_path / "s.mrcs") as mrc:
        assert mrc.is_image_stack() and int(mrc.header.mode) == 2
    info = stack_info(tmp_path / "s.mrcs")
    assert (info.count, info.box, info.voxel_size) == (3, 20, pytest.approx(3.3))
    with open_stack(tmp_path / "s.mrcs") as stack:
        np.testing.assert_array_equal(stack_images(stack, np.arange(3)), images)


@pytest.mark.parametrize("damage", ["truncated", "header_only", "garbage", "empty"])
def test_corrupt_files(tmp_path: Path, damage: str) -> None:
    source = need(MRCFILE_DATA / "EMD-3197.map").read_bytes()
    content = {"truncated": source[: len(source) // 2], "header_only": source[:1024],
               "garbage": np.random.default_rng(0).bytes(4096), "empty": b""}[damage]
    path = tmp_path / f"{damage}.mrc"
    path.write_bytes(content)
    for reader in (read_map, stack_info, open_stack):
        with pytest.raises(CryocliError) as exc:
            reader(path)
        assert path.name in str(exc.value)


def test_bad_maps(tmp_path: Path) -> None:
    with pytest.raises(CryocliError, match="not found"):
        read_map(tmp_path / "absent.mrc")
    data = np.zeros((8, 8, 8), dtype=np.float32)
    data[1, 2, 3] = np.nan
    with warnings.catch_warnings(), mrcfile.new(tmp_path / "nan.mrc") as mrc:
        warnings.simplefilter("ignore")  # mrcfile warns about the NaN we put there on purpose
        mrc.set_data(data)
    with pytest.raises(CryocliError, match="NaN") as exc:
        read_map(tmp_path / "nan.mrc")
    assert "nan.mrc" in str(exc.value)
    with mrcfile.new(tmp_path / "image.mrc") as mrc:
        mrc.set_data(np.zeros((8, 8), dtype=np.float32))
    with pytest.raises(CryocliError, match="3D"):
        read_map(tmp_path / "image.mrc")


# ----- what a file holds, and the errors for files with nothing to read ------------------------------------------
def _mrc(path: Path, data: np.ndarray, ispg: int | None = None, mz: int | None = None, voxel: float = 2.0) -> Path:
    """Write ``data`` with the space group and z sampling a tool might have written (None: mrcfile's own)."""
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(data.astype(np.float32))
        mrc.voxel_size = voxel
        if ispg is not None:
            mrc.header.ispg = ispg
        if mz is not None:
            mrc.header.mz = mz
    return path


@pytest.mark.parametrize("name,ispg,mz,nz,kind", [
    ("relion_map.mrc", 0, 8, 8, "map"),       # RELION, ChimeraX: ISPG 0 but MZ = NZ, a volume
    ("ccp4_map.map", 1, 8, 8, "map"),
    ("stack.mrc", 0, 1, 8, "stack"),          # MRC2014 image stack: ISPG 0, MZ 1
    ("odd_stack.mrc", 0, 3, 8, "stack"),      # ISPG 0 and a sampling that does not span z
    ("aspire.mrcs", 1, 8, 8, "stack"),        # ASPIRE's stacks: ISPG 1, MZ = NZ, named .mrcs
    ("one.mrc", 0, 1, 1, "image"),
    ("one_ispg1.mrc", 1, 1, 1, "image"),
])
def test_grid_kind_reads_mz_not_only_ispg(tmp_path: Path, name: str, ispg: int, mz: int, nz: int, kind: str) -> None:
    path = _mrc(tmp_path / name, np.zeros((nz, 8, 8)), ispg=ispg, mz=mz)
    with open_mrc(path) as mrc:
        assert grid_kind(mrc, path) == kind


def test_header_only_file_is_one_error_without_warnings(tmp_path: Path) -> None:
    """A valid header of 0 x 0 x 0 voxels: one CryocliError from every reader, and none of mrcfile's
    RuntimeWarnings (its voxel size divides by MX = 0) reaches the user."""
    path = tmp_path / "headeronly.mrc"
    with mrcfile.new(path):
        pass
    for reader in (read_map, stack_info, open_stack, open_mrc):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            with pytest.raises(CryocliError, match="holds no data") as exc:
                reader(path)
        assert [str(w.message) for w in seen] == []
        assert exc.value.path == str(path)
    with warnings.catch_warnings(), mrcfile.mmap(path, permissive=True) as mrc:
        warnings.simplefilter("ignore")
        assert voxel_sizes(mrc) == (0.0, 0.0, 0.0)  # not NaN: no voxel size


def test_complex_mode_is_named_for_what_the_file_was_read_as(tmp_path: Path) -> None:
    volume = tmp_path / "complex.mrc"
    with mrcfile.new(volume) as mrc:
        mrc.set_data(np.ones((8, 8, 8), dtype=np.complex64))
    with pytest.raises(CryocliError, match="mode 4 .* for a map") as exc:
        read_map(volume)
    assert "particle stack" not in str(exc.value)
    with pytest.raises(CryocliError, match="mode 4 .* for a particle stack"):
        open_stack(volume)


def test_a_file_not_named_mrc_is_not_called_a_corrupt_mrc(tmp_path: Path) -> None:
    text = tmp_path / "PROVENANCE.md"
    text.write_text("# Where the files come from\n\n" + "Some prose about the data sets.\n" * 50)
    for reader in (read_map, stack_info):
        with pytest.raises(CryocliError, match=r"not an MRC file \(its name ends in \.md") as exc:
            reader(text)
        assert "corrupt" not in str(exc.value)
    garbage = tmp_path / "garbage.mrc"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(CryocliError, match="truncated or corrupt|not a readable MRC"):
        read_map(garbage)
    with pytest.raises(CryocliError, match="is a directory"):
        read_map(tmp_path)
