"""Reading STAR files in chunks: the same tables as read_star on the real files, the same errors with the
file's row numbers, and `reconstruct` giving the same maps from chunks as from the whole table."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from cryocli.cli.app import app
from cryocli.errors import CryocliError
from cryocli.io.mrc import read_map
from cryocli.io.star import read_star
from cryocli.io.star_chunks import particle_loop_layout, read_star_chunks
from tests.conftest import DATA, RELION_SET, need

runner = CliRunner()


def _particle_star_files() -> list[Path]:
    found = []
    for path in sorted(DATA.rglob("*.star")):
        try:
            read_star(path)
        except CryocliError:
            continue
        found.append(path)
    return found


STAR_FILES = _particle_star_files() if DATA.is_dir() else []


@pytest.mark.parametrize("path", STAR_FILES, ids=lambda p: str(p.relative_to(DATA)))
def test_chunks_are_read_stars_table(path: Path) -> None:
    whole = read_star(path)
    chunked = read_star_chunks(path, rows=3)
    tables = list(chunked.tables())
    assert chunked.count == len(whole) and list(chunked.columns) == list(whole.particles.columns)
    if particle_loop_layout(path) is not None and len(whole) > 3:
        assert len(tables) == -(-len(whole) // 3)  # streamed: chunks of 3
    joined = pd.concat([t.particles for t in tables])
    pd.testing.assert_frame_equal(joined, whole.particles, check_dtype=False)
    for table in tables:
        pd.testing.assert_frame_equal(table.optics, whole.optics, check_dtype=False)
        assert table.version == whole.version and table.particle_block == whole.particle_block
    rows = np.concatenate([t.group_rows() for t in tables])
    np.testing.assert_array_equal(rows, whole.group_rows())


def test_real_relion_files_take_the_chunked_path() -> None:
    streamed = [p for p in STAR_FILES if particle_loop_layout(p) is not None]
    names = {p.name for p in streamed}
    assert {"run_data.star", "noisy.star", "relion5.star", "sample_particles_relion31.star"} <= names, names


def _star(tmp_path: Path, rows: list[str]) -> Path:
    head = ["# version 30001", "", "data_optics", "", "loop_", "_rlnOpticsGroup #1", "_rlnImagePixelSize #2",
            "_rlnImageSize #3", "_rlnVoltage #4", "1 2.0 32 300", "", "# version 30001", "", "data_particles", "",
            "loop_", "_rlnImageName #1", "_rlnAngleRot #2", "_rlnOpticsGroup #3"]
    path = tmp_path / "p.star"
    path.write_text("\n".join(head + rows) + "\n")
    return path


@pytest.mark.parametrize("bad, words", [("000025@s.mrcs nan 1", "NaN or Inf value in row 25"),
                                        ("000025@s.mrcs ten 1", "non-numeric value 'ten' in row 25"),
                                        ("000025@s.mrcs 10 7", "particle 25 refers to optics group 7")])
def test_a_bad_row_in_a_later_chunk_is_named_by_its_row_in_the_file(tmp_path: Path, bad: str, words: str) -> None:
    rows = [f"{k:06d}@s.mrcs {k}.0 1" for k in range(1, 31)]
    rows[24] = bad
    path = _star(tmp_path, rows)
    with pytest.raises(CryocliError, match=words):
        read_star(path)
    chunked = read_star_chunks(path, rows=10)
    with pytest.raises(CryocliError, match=words) as error:
        list(chunked.tables())
    assert error.value.path == str(path)


def test_a_ragged_row_is_one_error_naming_the_file(tmp_path: Path) -> None:
    rows = [f"{k:06d}@s.mrcs {k}.0 1" for k in range(1, 31)]
    rows[24] += " 5 6"
    path = _star(tmp_path, rows)
    with pytest.raises(CryocliError, match="not a readable STAR file") as error:
        list(read_star_chunks(path, rows=10).tables())
    assert error.value.path == str(path)


def _reconstruct(tmp_path: Path, name: str, *extra: str) -> dict[str, np.ndarray]:
    out = tmp_path / f"{name}.mrc"
    res = runner.invoke(app, ["--quiet", "reconstruct", str(need(RELION_SET / "noisy" / "noisy.star")), "-o",
                              str(out), *extra], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return {p.name.replace(name, ""): read_map(p).data for p in sorted(tmp_path.glob(f"{name}*.mrc"))}


@pytest.mark.parametrize("extra", [("--halves",), ("--subset", "2")])
def test_reconstruct_from_chunks_equals_the_whole_table(tmp_path: Path, monkeypatch, extra: tuple[str, ...]) -> None:
    """noisy.star (600 particles, no rlnRandomSubset): chunks of 64 rows give the maps of one whole table,
    with the same half sets (drawn over the whole file)."""
    whole = _reconstruct(tmp_path, "whole", *extra)
    monkeypatch.setattr("cryocli.io.star_chunks.CHUNK_ROWS", 64)
    chunked = _reconstruct(tmp_path, "chunked", *extra)
    assert set(whole) == set(chunked) and len(whole) == (3 if extra == ("--halves",) else 1)
    for key, volume in whole.items():
        scale = np.abs(volume).max()
        assert np.abs(chunked[key] - volume).max() < 1e-5 * scale, key


@pytest.mark.parametrize("row, extra, words", [
    (24, "", "line 46 of data_particles has 2 values for 3 columns"),  # row 25: rlnOpticsGroup missing
    (24, " 5 6", "line 46 of data_particles has 5 values for 3 columns"),
    (3, "", "line 23 of data_particles has 2 values for 3 columns"),   # in the first chunk
])
def test_a_ragged_row_is_named_by_its_line_as_read_star_names_it(tmp_path: Path, row: int, extra: str,
                                                                  words: str) -> None:
    """A row with too few values is a short row, not a "NaN or Inf value" (pandas pads it with NaN): the chunked
    reader names its line as read_star does, and a NaN the file does hold is still reported as one."""
    rows = [f"{k:06d}@s.mrcs {k}.0 1" for k in range(1, 31)]
    rows[row] = rows[row].rsplit(" ", 1)[0] if not extra else rows[row] + extra
    rows.insert(10, "# a comment between rows")  # comments and blank lines are not rows
    rows.insert(12, "")
    path = _star(tmp_path, rows)
    with pytest.raises(CryocliError, match=words):
        read_star(path)
    with pytest.raises(CryocliError, match=words) as error:
        list(read_star_chunks(path, rows=10).tables())
    assert error.value.message == f"not a readable STAR file ({words})"
    assert error.value.path == str(path)


def test_a_nan_before_a_short_row_is_reported_as_a_nan(tmp_path: Path) -> None:
    rows = [f"{k:06d}@s.mrcs {k}.0 1" for k in range(1, 31)]
    rows[4] = "000005@s.mrcs nan 1"
    rows[24] = "000025@s.mrcs 25.0"
    with pytest.raises(CryocliError, match="NaN or Inf value in row 5"):
        list(read_star_chunks(_star(tmp_path, rows), rows=10).tables())
