"""RELION STAR reading and writing against the real reference files (see shared PROVENANCE.md)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import starfile
import torch

from cryocli.errors import CryocliError
from cryocli.io.star import ParticleTable, check_pixel_size, read_star, write_star
from tests.conftest import ASPIRE, CRYODRGN, CRYOJAX, DATA, RELION_SET, STARFILE_DATA, need

ALL_STAR = sorted((DATA / "external").rglob("*.star")) + sorted((DATA / "relion").rglob("*.star"))

# Files that hold particles: (count, version, pixel size in A or None when the file gives none).
PARTICLE_FILES = {
    CRYODRGN / "relion31.star": (5, "3.1", 2.806),
    CRYODRGN / "relion31.v2.star": (5, "3.1", 2.806),
    CRYODRGN / "relion5.star": (17, "5.0", 0.89),
    CRYODRGN / "empiar_10076_7.star": (7, "3.0", 1e4 * 5 / 38168),
    CRYODRGN / "toy_projections.star": (1000, "3.0", None),
    CRYODRGN / "toy_projections_13.star": (13, "3.1", 1.035),
    CRYOJAX / "trpv1_small_stack.star": (10, "3.1", 4.88),
    ASPIRE / "sample_particles_relion31.star": (17, "3.1", 1.4),
    ASPIRE / "sample_particles_relion30.star": (17, "3.0", 1e4 * 5 / 37369.207031),
    ASPIRE / "sample_relion_symmetry_group_D4.star": (17, "3.0", 1e4 * 5 / 37369.207031),
    ASPIRE / "sample_incomplete_ctf_params.star": (1, "3.0", 1e4 * 5 / 37369.207031),
    ASPIRE / "rln_proj_65.star": (5, "3.1", None),
    ASPIRE / "rln_proj_65_shifted.star": (4, "3.1", 1.0),
    ASPIRE / "rln_proj_64_centered.star": (4, "3.1", 1.0),
    RELION_SET / "noisy" / "noisy.star": (600, "5.0", 4.4),
    RELION_SET / "clean" / "clean.star": (600, "5.0", 4.4),
    RELION_SET / "particles_truth.star": (600, "3.1", 4.4),
    RELION_SET / "refine" / "refine_input.star": (600, "3.1", 4.4),
    RELION_SET / "refine" / "run_data.star": (600, "5.0", 4.4),
}

# Files that are STAR but hold no particles: they must be refused with a clear error.
NON_PARTICLE_FILES = [
    STARFILE_DATA / "postprocess.star", STARFILE_DATA / "default_pipeline.star",
    ASPIRE / "sample_data_model.star", DATA / "external/relion/data/mtf_k2_300kV.star",
    DATA / "external/relion/data/mtf_falcon4EC_300kV.star", RELION_SET / "postprocess/postprocess.star",
    RELION_SET / "refine/run_model.star", RELION_SET / "refine/run_sampling.star",
    STARFILE_DATA / "relion_tutorial/run_it025_optimiser_3D.star",
]


def _raw_columns(path: Path) -> dict[str, pd.DataFrame]:
    """Every loop of a STAR file as text, parsed independently of cryocli (starfile, nothing numericised)."""
    text = Path(path).read_text()
    names = sorted({line.split()[0][1:] for line in text.splitlines() if line.strip().startswith("_")})
    return starfile.read(path, always_dict=True, parse_as_string=names)


def _rewritten(tmp_path: Path, source: Path, old: str, new: str, name: str | None = None) -> Path:
    text = need(source).read_text()
    assert old in text
    out = tmp_path / (name or source.name)
    out.write_text(text.replace(old, new, 1))
    return out


def _stack_files(table: ParticleTable) -> tuple[list[int], list[object]]:
    """Each particle's image index and the stack file it reads from (the name as written when no stack is
    found), resolved as the reader resolves it: what a rewritten ``rlnImageName`` must keep."""
    from cryocli.io.dataset import resolve_stack_paths

    found = {e["name"]: e["resolved"] if e["resolved"] is not None else e["name"] for e in resolve_stack_paths(table)}
    index, paths = table.image_names
    return index.tolist(), [found[p] for p in paths]


def _assert_same_images(before: ParticleTable, after: ParticleTable) -> None:
    """``after`` names the same images of the same stack files as ``before``, with the index text kept."""
    assert _stack_files(after) == _stack_files(before)
    index_text = lambda t: t.particles["rlnImageName"].astype(str).str.partition("@")[0].tolist()  # noqa: E731
    assert index_text(after) == index_text(before)


def _assert_error_names_file(exc: pytest.ExceptionInfo, path: Path, *words: str) -> None:
    message = str(exc.value)
    assert path.name in message, message
    for word in words:
        assert word in message, message


# ----- every file: read or refuse cleanly -------------------------------------------------------------------
@pytest.mark.parametrize("path", ALL_STAR, ids=lambda p: str(p.relative_to(DATA)))
def test_every_star_file_reads_or_is_refused(path: Path) -> None:
    assert len(ALL_STAR) >= 40
    try:
        table = read_star(path)
    except CryocliError as exc:
        assert path.name in str(exc)
        assert path not in PARTICLE_FILES, f"particle file refused: {exc}"
        return
    assert path not in NON_PARTICLE_FILES
    assert len(table) > 0 and table.version in {"3.0", "3.1", "5.0"}
    assert len(table.optics) >= 1 and "rlnOpticsGroup" in table.optics.columns
    if path in PARTICLE_FILES:
        count, version, pixel = PARTICLE_FILES[path]
        assert len(table) == count
        assert table.version == version
        if pixel is None:
            assert not table.has_pixel_size
            with pytest.raises(CryocliError, match="no pixel size"):
                table.pixel_size  # noqa: B018
        else:
            np.testing.assert_allclose(table.pixel_size, pixel, rtol=1e-9)
        assert table.origins_angstrom.shape == (count, 2)


@pytest.mark.parametrize("path", NON_PARTICLE_FILES, ids=lambda p: p.name)
def test_non_particle_files_are_refused_naming_the_blocks(path: Path) -> None:
    with pytest.raises(CryocliError, match="no particle table") as exc:
        read_star(need(path))
    _assert_error_names_file(exc, path, "data_")


# ----- facts of the reference files -------------------------------------------------------------------------
def test_relion31_facts() -> None:
    table = read_star(need(CRYODRGN / "relion31.star"))
    assert (len(table), table.version, table.box_size) == (5, "3.1", 256)
    assert list(table.particles.columns)[:3] == ["rlnCoordinateX", "rlnCoordinateY", "rlnImageOriginalName"]
    assert len(table.particles.columns) == 26
    np.testing.assert_allclose(table.pixel_size, 2.806)
    ctf = table.ctf_params()
    assert ctf.voltage.dtype == torch.float64
    np.testing.assert_allclose(ctf.voltage.numpy(), 300.0)
    np.testing.assert_allclose(ctf.cs.numpy(), 0.01)
    np.testing.assert_allclose(ctf.amplitude_contrast.numpy(), 0.1)
    np.testing.assert_allclose(ctf.defocus_u.numpy()[:2], [13108.082418, 12906.018499])
    np.testing.assert_allclose(table.euler_angles[0], [-102.30296, 82.318041, 124.706463])
    np.testing.assert_allclose(table.origins_angstrom[0], [0.019324, -0.64686])
    index, paths = table.image_names
    np.testing.assert_array_equal(index, np.arange(5))
    assert paths == ["relion31.mrcs"] * 5
    np.testing.assert_array_equal(table.random_subset, [1, 1, 1, 1, 1])
    assert table.has_poses and table.has_shifts and table.has_ctf


def test_block_order_does_not_matter() -> None:
    a = read_star(need(CRYODRGN / "relion31.star"))
    b = read_star(need(CRYODRGN / "relion31.v2.star"))
    pd.testing.assert_frame_equal(a.particles, b.particles)
    pd.testing.assert_frame_equal(a.optics, b.optics)
    assert a.version == b.version == "3.1"


def test_relion30_empiar_pixel_size_from_magnification() -> None:
    table = read_star(need(CRYODRGN / "empiar_10076_7.star"))
    assert table.version == "3.0" and not table.optics_in_file
    np.testing.assert_allclose(table.pixel_size, 1e4 * 5 / 38168)
    assert abs(table.pixel_size[0] - 1.31) < 0.001
    assert table.euler_angles is None and not table.has_poses and not table.has_shifts
    np.testing.assert_array_equal(table.origins_angstrom, np.zeros((7, 2)))
    assert table.box_size is None and table.random_subset is None
    ctf = table.ctf_params()
    np.testing.assert_allclose(ctf.cs.numpy(), 2.7)
    np.testing.assert_allclose(ctf.amplitude_contrast.numpy(), 0.07)
    np.testing.assert_allclose(ctf.defocus_angle.numpy()[0], 5.28)
    # one synthesised optics group holding the per-particle optics values
    assert len(table.optics) == 1
    assert table.optics["rlnVoltage"].iloc[0] == 300
    np.testing.assert_allclose(table.optics["rlnImagePixelSize"].iloc[0], 1e4 * 5 / 38168)
    # the file's columns are kept in their order
    assert list(table.particles.columns) == ["rlnImageName", "rlnMicrographName", "rlnDefocusU", "rlnDefocusV",
                                             "rlnDefocusAngle", "rlnVoltage", "rlnSphericalAberration",
                                             "rlnAmplitudeContrast", "rlnMagnification", "rlnDetectorPixelSize"]


def test_two_optics_groups_without_image_size() -> None:
    table = read_star(need(ASPIRE / "sample_particles_relion31.star"))
    assert len(table.optics) == 2 and table.box_size is None
    groups = table.particles["rlnOpticsGroup"].to_numpy()
    voltage = table.ctf_params().voltage.numpy()
    np.testing.assert_array_equal(voltage, np.where(groups == 1, 300.0, 200.0))
    assert set(groups) == {1, 2}
    merged = table.optics_per_particle()
    assert list(merged.index) == list(table.particles.index)
    assert (merged["rlnMtfFileName"] == "mtf_k2_200kV.star").all()
    assert table.common_pixel_size() == pytest.approx(1.4)


def test_relion30_and_relion31_samples_hold_the_same_particles() -> None:
    v30 = read_star(need(ASPIRE / "sample_particles_relion30.star"))
    v31 = read_star(need(ASPIRE / "sample_particles_relion31.star"))
    assert (v30.particles["rlnImageName"].to_numpy() == v31.particles["rlnImageName"].to_numpy()).all()
    # Row 15 holds a different particle record in the two ASPIRE files (other coordinates and angles);
    # the other 16 rows agree.
    differs = ~np.isclose(v30.euler_angles, v31.euler_angles).all(axis=1)
    np.testing.assert_array_equal(np.flatnonzero(differs), [14])
    same = ~differs
    c30, c31 = v30.ctf_params(), v31.ctf_params()
    for name in ("defocus_u", "defocus_v", "defocus_angle", "voltage", "cs", "amplitude_contrast"):
        np.testing.assert_allclose(getattr(c30, name).numpy(), getattr(c31, name).numpy())
    # 3.0 origins are pixels: Angstrom = pixels * (1e4 * 5 / 37369.207031) = 1.338 A/px.
    pixels = v30.particles[["rlnOriginX", "rlnOriginY"]].to_numpy()
    np.testing.assert_allclose(v30.origins_angstrom, pixels * 1.338, rtol=1e-7)
    # ASPIRE's 3.1 version copied the pixel numbers into rlnOriginX/YAngst unconverted (and states
    # 1.4 A/px): its Angstrom values equal the 3.0 pixel values, so they differ from the true Angstrom
    # origins by the pixel size. Reading each file by its own units exposes that.
    np.testing.assert_allclose(v31.origins_angstrom[same], pixels[same], rtol=1e-12)
    assert np.abs(v31.origins_angstrom - v30.origins_angstrom)[same].max() > 0.1


def test_trpv1_optics_group_seven() -> None:
    table = read_star(need(CRYOJAX / "trpv1_small_stack.star"))
    assert table.optics["rlnOpticsGroup"].tolist() == [7]
    assert (table.particles["rlnOpticsGroup"] == 7).all()
    assert table.box_size == 48
    np.testing.assert_allclose(table.pixel_size, 4.88)
    np.testing.assert_allclose(table.ctf_params().cs.numpy(), 2.0)
    assert table.optics_per_particle()["rlnOpticsGroupName"].eq("opticsGroup7").all()
    assert set(table.random_subset) == {1, 2}


def test_set_3j9g_noisy_matches_truth() -> None:
    noisy = read_star(need(RELION_SET / "noisy" / "noisy.star"))
    truth = read_star(need(RELION_SET / "particles_truth.star"))
    assert (len(noisy), noisy.version, noisy.box_size) == (600, "5.0", 64)
    np.testing.assert_allclose(noisy.pixel_size, 4.4)
    np.testing.assert_array_equal(noisy.random_subset, np.tile([1, 2], 300))
    # RELION printed ~6 significant digits; the truth file has full precision.
    np.testing.assert_allclose(noisy.euler_angles, truth.euler_angles, atol=1e-4)
    np.testing.assert_allclose(noisy.origins_angstrom, truth.origins_angstrom, atol=1e-4)
    np.testing.assert_allclose(noisy.ctf_params().defocus_u.numpy(), truth.ctf_params().defocus_u.numpy(),
                               rtol=1e-6)
    assert "rlnImageName" not in truth.particles.columns
    with pytest.raises(CryocliError, match="rlnImageName"):
        read_star(RELION_SET / "particles_truth.star", require_images=True)
    with pytest.raises(CryocliError, match="rlnImageName"):
        truth.image_names  # noqa: B018


def test_relion5_zernike_and_toy_extra_columns() -> None:
    table = read_star(need(CRYODRGN / "relion5.star"))
    assert table.optics["rlnOddZernike"].iloc[0].startswith("[0.0680480107376,")
    assert table.box_size == 448
    assert table.image_names[1][:2] == ["toy_images_a.mrcs", "toy_images_b.mrcs"]
    toy = read_star(need(CRYODRGN / "toy_projections.star"))
    assert toy.particle_block == "images"
    np.testing.assert_array_equal(toy.particles["dummyVariable"].to_numpy()[:3], [1, 2, 3])


def test_pixel_origins_in_a_31_file_use_the_optics_pixel_size() -> None:
    table = read_star(need(ASPIRE / "rln_proj_65_shifted.star"))
    np.testing.assert_allclose(table.origins_angstrom, [[6, 10], [10, -5], [-8, 11], [-13, -3]])


def test_missing_voltage_names_the_column() -> None:
    path = need(ASPIRE / "sample_incomplete_ctf_params.star")
    table = read_star(path)
    with pytest.raises(CryocliError, match="rlnVoltage") as exc:
        table.ctf_params()
    _assert_error_names_file(exc, path)
    no_ctf = read_star(need(ASPIRE / "rln_proj_65.star"))
    assert no_ctf.ctf_params(require=False) is None
    with pytest.raises(CryocliError, match="rlnDefocusU"):
        no_ctf.ctf_params()


# ----- writing ------------------------------------------------------------------------------------------------
ROUND_TRIP = [CRYODRGN / "relion31.star", CRYODRGN / "relion31.v2.star", CRYODRGN / "relion5.star",
              CRYODRGN / "toy_projections_13.star", CRYOJAX / "trpv1_small_stack.star",
              ASPIRE / "sample_particles_relion31.star", RELION_SET / "noisy" / "noisy.star",
              RELION_SET / "refine" / "run_data.star"]


@pytest.mark.parametrize("path", ROUND_TRIP, ids=lambda p: p.name)
def test_round_trip_keeps_every_value_and_its_text(path: Path, tmp_path: Path) -> None:
    table = read_star(need(path))
    out = tmp_path / "out.star"
    write_star(table, out)
    text = out.read_text()
    assert text.lstrip().startswith("# version 30001")
    assert text.index("data_optics") < text.index("data_particles")
    again = read_star(out)
    assert again.version == "3.1"
    # RELION 3.1 needs rlnOpticsGroup per particle: it is appended when the file left it out
    added = [] if "rlnOpticsGroup" in table.particles.columns else ["rlnOpticsGroup"]
    assert list(again.particles.columns) == list(table.particles.columns) + added
    np.testing.assert_array_equal(again.optics_per_particle()["rlnOpticsGroup"],
                                  table.optics_per_particle()["rlnOpticsGroup"])
    kept = [c for c in table.particles.columns if c != "rlnImageName"]
    pd.testing.assert_frame_equal(again.particles[kept], table.particles[kept])
    pd.testing.assert_frame_equal(again.optics, table.optics)
    # image names are rewritten relative to the current directory (absolute outside it), same images
    _assert_same_images(table, again)
    # every other token is the file's own text, read independently of cryocli
    before, after = _raw_columns(path), _raw_columns(out)
    for block in ("particles", "optics"):
        columns = list(before[block].columns)
        assert list(after[block].columns)[:len(columns)] == columns
        columns = [c for c in columns if c != "rlnImageName"]
        pd.testing.assert_frame_equal(after[block][columns].reset_index(drop=True),
                                      before[block].reset_index(drop=True)[columns])
    assert [f.name for f in tmp_path.iterdir()] == ["out.star"]


def test_relion30_converts_to_31(tmp_path: Path) -> None:
    source = read_star(need(ASPIRE / "sample_particles_relion30.star"))
    out = tmp_path / "v31.star"
    write_star(source, out)
    table = read_star(out)
    assert table.version == "3.1" and table.optics_in_file
    assert "rlnOriginX" not in table.particles.columns and "rlnOriginXAngst" in table.particles.columns
    # origins in Angstrom = 3.0 pixels * 1e4 * DetectorPixelSize / Magnification
    pixels = source.particles[["rlnOriginX", "rlnOriginY"]].to_numpy()
    np.testing.assert_allclose(table.origins_angstrom, pixels * (1e4 * 5 / 37369.207031), rtol=1e-14)
    np.testing.assert_array_equal(table.origins_angstrom, source.origins_angstrom)
    # per-particle optics moved into two optics groups (300 and 200 kV)
    assert "rlnVoltage" not in table.particles.columns
    assert table.optics["rlnVoltage"].tolist() == [300.0, 200.0]
    np.testing.assert_allclose(table.optics["rlnImagePixelSize"], 1e4 * 5 / 37369.207031)
    for name in ("defocus_u", "voltage", "cs", "amplitude_contrast", "scale"):
        np.testing.assert_array_equal(getattr(table.ctf_params(), name).numpy(),
                                      getattr(source.ctf_params(), name).numpy())
    np.testing.assert_array_equal(table.pixel_size, source.pixel_size)
    # the columns cryocli does not use keep value, text and order
    kept = [c for c in source.particles.columns if c not in ("rlnOriginX", "rlnOriginY", "rlnVoltage",
                                                             "rlnSphericalAberration", "rlnAmplitudeContrast",
                                                             "rlnMagnification", "rlnDetectorPixelSize")]
    assert [c for c in table.particles.columns if c in kept] == kept
    raw_before = _raw_columns(ASPIRE / "sample_particles_relion30.star")["model_class_1"]
    raw_after = _raw_columns(out)["particles"]
    for column in kept:
        if column != "rlnImageName":
            assert raw_after[column].tolist() == raw_before[column].tolist(), column
    _assert_same_images(source, table)


def test_relion30_single_group_converts(tmp_path: Path) -> None:
    out = tmp_path / "empiar31.star"
    write_star(read_star(need(CRYODRGN / "empiar_10076_7.star")), out)
    table = read_star(out)
    assert table.optics["rlnOpticsGroup"].tolist() == [1]
    assert (table.particles["rlnOpticsGroup"] == 1).all()
    assert table.optics["rlnAmplitudeContrast"].iloc[0] == pytest.approx(0.07)
    np.testing.assert_allclose(table.pixel_size, 1e4 * 5 / 38168)
    # the stack beside the source file lies outside the current directory: named by its absolute path
    assert table.particles["rlnImageName"].tolist()[0] == f"1@{need(CRYODRGN / 'empiar_10076_7.mrc').resolve()}"


def test_with_poses_full_precision_round_trip(tmp_path: Path) -> None:
    table = read_star(need(ASPIRE / "sample_particles_relion30.star"))
    rng = np.random.default_rng(1)
    n = len(table)
    rot, tilt, psi = rng.uniform(-180, 180, n), rng.uniform(0, 180, n), rng.uniform(-180, 180, n)
    origins = rng.normal(0, 7.3, (n, 2))
    score = torch.from_numpy(rng.uniform(0, 1, n))
    posed = table.with_poses(torch.from_numpy(rot), tilt, psi, origins, {"rlnMaxValueProbDistribution": score,
                                                                          "rlnCryocliScore": score})
    assert "rlnOriginX" not in posed.particles.columns and "rlnOriginX" in table.particles.columns
    assert list(posed.particles.columns).index("rlnAngleRot") == list(table.particles.columns).index("rlnAngleRot")
    out = tmp_path / "posed.star"
    write_star(posed, out)
    again = read_star(out)
    np.testing.assert_array_equal(again.euler_angles, np.stack([rot, tilt, psi], 1))
    np.testing.assert_array_equal(again.origins_angstrom, origins)
    np.testing.assert_array_equal(again.particles["rlnCryocliScore"], score.numpy())
    np.testing.assert_array_equal(again.particles["rlnMaxValueProbDistribution"], score.numpy())
    np.testing.assert_array_equal(again.particles["rlnCoordinateX"], table.particles["rlnCoordinateX"])


def test_subset_keeps_order_and_text(tmp_path: Path) -> None:
    table = read_star(need(RELION_SET / "noisy" / "noisy.star"))
    picked = table.subset([7, 3, 599])
    assert picked.image_names[0].tolist() == [7, 3, 599]
    mask = table.random_subset == 2
    half = table.subset(mask)
    assert len(half) == 300 and (half.random_subset == 2).all()
    out = tmp_path / "half.star"
    write_star(half, out)
    raw = _raw_columns(out)["particles"]
    original = _raw_columns(RELION_SET / "noisy" / "noisy.star")["particles"]
    columns = [c for c in raw.columns if c != "rlnImageName"]
    pd.testing.assert_frame_equal(raw[columns], original[mask].reset_index(drop=True)[columns])
    _assert_same_images(half, read_star(out))


def test_source_changed_after_reading_falls_back_to_fresh_text(tmp_path: Path) -> None:
    source = tmp_path / "copy.star"
    source.write_text(need(CRYODRGN / "relion31.star").read_text())
    table = read_star(source)
    write_star(table, tmp_path / "kept.star")
    assert "2.586789e+05" in (tmp_path / "kept.star").read_text()
    source.write_text(source.read_text() + "\n# edited later\n")
    write_star(table, tmp_path / "fresh.star")
    text = (tmp_path / "fresh.star").read_text()
    assert "2.586789e+05" not in text and " 258678.9 " in text
    pd.testing.assert_frame_equal(read_star(tmp_path / "fresh.star").particles, table.particles)


def test_write_is_atomic_and_refuses_nan(tmp_path: Path) -> None:
    out = tmp_path / "p.star"
    table = read_star(need(CRYODRGN / "relion31.star"))
    write_star(table, out)
    before = out.read_bytes()
    broken = table.with_poses(np.full(5, np.nan), np.zeros(5), np.zeros(5), np.zeros((5, 2)))
    with pytest.raises(CryocliError, match="rlnAngleRot"):
        write_star(broken, out)
    assert out.read_bytes() == before
    assert [f.name for f in tmp_path.iterdir()] == ["p.star"]
    mask = os.umask(0o022)
    try:
        write_star(table, tmp_path / "q.star")
    finally:
        os.umask(mask)
    assert (tmp_path / "q.star").stat().st_mode & 0o777 == 0o644


def test_in_memory_table_writes(tmp_path: Path) -> None:
    particles = pd.DataFrame({"rlnImageName": ["1@a b.mrcs", "2@a b.mrcs"], "rlnDefocusU": [1e4, 2e4],
                              "rlnOpticsGroup": [1, 1], "rlnMicrographName": ["", "x"]})
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnOpticsGroupName": ["g 1"], "rlnVoltage": [300.0],
                           "rlnSphericalAberration": [2.7], "rlnAmplitudeContrast": [0.1],
                           "rlnImagePixelSize": [1.5]})
    out = tmp_path / "mem.star"
    write_star(ParticleTable(particles, optics, "3.1"), out)
    again = read_star(out)
    assert again.image_names[1] == ["a b.mrcs", "a b.mrcs"]
    assert again.particles["rlnMicrographName"].tolist() == ["", "x"]
    assert again.optics["rlnOpticsGroupName"].tolist() == ["g 1"]


# ----- image names: written relative to the current directory, as RELION does ------------------------------
def _small_set(folder: Path, names: list[str]) -> Path:
    """``folder/particles.star`` naming ``names`` (written as they are: an in-memory table), and a 3-image
    8 px stack ``folder/Particles/particles_0001.mrcs``."""
    from cryocli.io.mrc import write_stack

    write_stack(folder / "Particles" / "particles_0001.mrcs", np.zeros((3, 8, 8), np.float32), 2.0)
    particles = pd.DataFrame({"rlnImageName": names, "rlnDefocusU": np.full(len(names), 1e4),
                              "rlnOpticsGroup": np.ones(len(names), dtype=int)})
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnOpticsGroupName": ["g1"], "rlnVoltage": [300.0],
                           "rlnSphericalAberration": [2.7], "rlnAmplitudeContrast": [0.1],
                           "rlnImagePixelSize": [2.0], "rlnImageSize": [8]})
    write_star(ParticleTable(particles, optics, "3.1"), folder / "particles.star")
    return folder / "particles.star"


def test_relion_image_path_is_relative_to_the_cwd_or_absolute(tmp_path: Path, monkeypatch) -> None:
    from cryocli.io.paths import relion_image_path

    root = tmp_path.resolve()
    work, data = root / "w", root / "data"
    (work / "sim").mkdir(parents=True)
    data.mkdir()
    monkeypatch.chdir(work)
    assert relion_image_path(work / "sim" / "a.mrcs") == "sim/a.mrcs"
    assert relion_image_path("sim/./x/../a.mrcs") == "sim/a.mrcs"
    assert relion_image_path(data / "a.mrcs") == str(data / "a.mrcs")
    assert relion_image_path("../data/a.mrcs") == str(data / "a.mrcs")  # never "../": absolute outside
    (work / "link").symlink_to(data)
    assert relion_image_path(work / "link" / "a.mrcs") == "link/a.mrcs"  # the user's link is kept
    # a current directory reached through a link: names still relative to it
    (root / "wl").symlink_to(work)
    monkeypatch.chdir(root / "wl")
    assert relion_image_path(root / "wl" / "sim" / "a.mrcs") == "sim/a.mrcs"
    assert relion_image_path(work / "sim" / "a.mrcs") == "sim/a.mrcs"


def test_written_names_resolve_from_the_cwd(tmp_path: Path, monkeypatch) -> None:
    """A table read from sim/particles.star (names relative to its folder, as cryocli used to write them)
    and written to run/particles.star names its stacks from the current directory, as RELION does."""
    from cryocli.io.dataset import ParticleStack

    work = tmp_path.resolve() / "w"
    (work / "sim").mkdir(parents=True)
    monkeypatch.chdir(work)
    _small_set(work / "sim", ["00000001@Particles/particles_0001.mrcs", "00000003@Particles/particles_0001.mrcs",
                              "2@./Particles/particles_0001.mrcs", "1@missing/none.mrcs"])
    stack = work / "sim" / "Particles" / "particles_0001.mrcs"
    table = read_star("sim/particles.star")
    write_star(table, "run/particles.star")
    written = read_star("run/particles.star")
    assert written.particles["rlnImageName"].tolist() == [
        "00000001@sim/Particles/particles_0001.mrcs", "00000003@sim/Particles/particles_0001.mrcs",
        "2@sim/Particles/particles_0001.mrcs", "1@missing/none.mrcs"]  # index text kept, unknown name kept
    assert all(Path(p).is_file() for p in written.image_names[1][:3])  # from the cwd, as RELION reads them
    kept = written.subset([0, 1, 2])
    assert ParticleStack(kept).files == [stack]
    # writing again changes nothing; reading from the STAR file's own folder works too
    write_star(kept, "again/particles.star")
    assert read_star("again/particles.star").particles["rlnImageName"].tolist() == \
        kept.particles["rlnImageName"].tolist()
    monkeypatch.chdir(work / "run")
    assert ParticleStack(read_star("particles.star").subset([0, 1, 2])).files == [stack]
    # written from a directory the stacks are not under: absolute names
    elsewhere = tmp_path.resolve() / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    write_star(read_star(work / "sim" / "particles.star"), "out/particles.star")
    names = read_star("out/particles.star").particles["rlnImageName"].tolist()
    assert names[:3] == [f"00000001@{stack}", f"00000003@{stack}", f"2@{stack}"] and names[3] == "1@missing/none.mrcs"
    # and as they are, when asked
    write_star(read_star(work / "sim" / "particles.star"), "plain.star", rebase_images=False)
    assert read_star("plain.star").particles["rlnImageName"].tolist()[0] == "00000001@Particles/particles_0001.mrcs"


def test_written_names_use_the_datadir_the_stacks_were_found_in(tmp_path: Path, monkeypatch) -> None:
    from cryocli.io.dataset import ParticleStack

    work = tmp_path.resolve() / "w"
    (work / "meta").mkdir(parents=True)
    monkeypatch.chdir(work)
    _small_set(work / "data", ["1@particles_0001.mrcs"])  # writes data/Particles/particles_0001.mrcs
    star = _small_set(work / "meta", ["1@particles_0001.mrcs", "3@particles_0001.mrcs"])
    table = read_star(star)
    write_star(table, "a.star")  # not found without the datadir: left as it is
    assert read_star("a.star").particles["rlnImageName"].tolist() == ["1@particles_0001.mrcs", "3@particles_0001.mrcs"]
    write_star(table, "b.star", datadir="data/Particles")
    assert read_star("b.star").particles["rlnImageName"].tolist() == [
        "1@data/Particles/particles_0001.mrcs", "3@data/Particles/particles_0001.mrcs"]
    ParticleStack(table, datadir="data/Particles")  # remembers the folder on the table for writers
    write_star(table.subset([1]).with_poses([1.0], [2.0], [3.0], np.zeros((1, 2))), "c.star")
    assert read_star("c.star").particles["rlnImageName"].tolist() == ["3@data/Particles/particles_0001.mrcs"]


def test_image_names_are_resolved_once_per_stack(tmp_path: Path, monkeypatch) -> None:
    """10^5 particles in 3 stacks: 3 look-ups, not one per particle (the 10^6-particle case stays fast)."""
    import cryocli.io.star as star_module

    work = tmp_path.resolve()
    monkeypatch.chdir(work)
    n = 100_000
    stacks = np.array(["a/s1.mrcs", "b/s2.mrcs", "c/s3.mrcs"], dtype=object)
    names = [f"{i % 1000 + 1:06d}@{p}" for i, p in enumerate(stacks[np.arange(n) % 3])]
    star = _small_set(work / "set", names)
    for p in stacks:
        (work / "set" / p).parent.mkdir(exist_ok=True)
        (work / "set" / p).write_bytes(b"")
    calls = []
    real = star_module.resolve_stack
    monkeypatch.setattr(star_module, "resolve_stack", lambda *a: calls.append(a[0]) or real(*a))
    write_star(read_star(star), work / "out.star")
    assert sorted(calls) == sorted(stacks)
    again = read_star(work / "out.star").particles["rlnImageName"]
    assert again.iloc[4] == "000005@set/b/s2.mrcs" and again.iloc[n - 1] == f"{(n - 1) % 1000 + 1:06d}@set/a/s1.mrcs"


# ----- errors -------------------------------------------------------------------------------------------------
def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CryocliError, match="not found") as exc:
        read_star(tmp_path / "nothing.star")
    _assert_error_names_file(exc, tmp_path / "nothing.star")


def test_not_a_star_file(tmp_path: Path) -> None:
    binary = tmp_path / "map.star"
    binary.write_bytes((RELION_SET / "map.mrc").read_bytes()[:4096])
    with pytest.raises(CryocliError, match="not a STAR file") as exc:
        read_star(binary)
    _assert_error_names_file(exc, binary)
    prose = tmp_path / "prose.star"
    prose.write_text("hello\nthis is not a star file\n")
    with pytest.raises(CryocliError, match="no data_ block"):
        read_star(prose)
    ragged = need(ASPIRE / "sample.star")
    with pytest.raises(CryocliError) as exc:
        read_star(ragged)
    _assert_error_names_file(exc, ragged)


def test_unknown_optics_group(tmp_path: Path) -> None:
    path = _rewritten(tmp_path, CRYODRGN / "relion31.star", "000003@relion31.mrcs            1",
                      "000003@relion31.mrcs            4")
    with pytest.raises(CryocliError, match="optics group 4") as exc:
        read_star(path)
    _assert_error_names_file(exc, path, "particle 3")


def test_non_numeric_value_names_column_and_row(tmp_path: Path) -> None:
    path = _rewritten(tmp_path, CRYODRGN / "relion31.star", "12906.018499", "12906.0x8499")
    with pytest.raises(CryocliError) as exc:
        read_star(path)
    _assert_error_names_file(exc, path, "rlnDefocusU", "row 2", "12906.0x8499")


@pytest.mark.parametrize("token", ["nan", "inf", "-inf", "NaN"])
def test_nan_and_inf_are_refused(tmp_path: Path, token: str) -> None:
    path = _rewritten(tmp_path, CRYODRGN / "relion31.star", "0.403454", token)
    with pytest.raises(CryocliError, match="NaN or Inf") as exc:
        read_star(path)
    _assert_error_names_file(exc, path, "rlnOriginYAngst", "row 2")


def test_empty_particle_table(tmp_path: Path) -> None:
    text = need(CRYODRGN / "relion31.star").read_text()
    head = text[:text.index(" 3277.000000")]
    path = tmp_path / "empty.star"
    path.write_text(head)
    with pytest.raises(CryocliError, match="empty") as exc:
        read_star(path)
    _assert_error_names_file(exc, path)


def test_pixel_sizes_of_optics_groups_must_agree(tmp_path: Path) -> None:
    source = ASPIRE / "sample_particles_relion31.star"
    text = re.sub(r"^(opticsGroup2.*)1\.400000", r"\g<1>1.500000", need(source).read_text(), flags=re.MULTILINE)
    path = tmp_path / "two_sizes.star"
    path.write_text(text)
    table = read_star(path)
    np.testing.assert_allclose(np.unique(table.pixel_size), [1.4, 1.5])
    with pytest.raises(CryocliError) as exc:
        table.common_pixel_size()
    _assert_error_names_file(exc, path, "1.4 A", "1.5 A", "0.5%")


def test_check_pixel_size() -> None:
    check_pixel_size(4.4, 4.41, "map vs particles")  # 0.23 %
    check_pixel_size(1.0, 1.0049, "x")
    with pytest.raises(CryocliError, match="4.4 A vs 4.88 A"):
        check_pixel_size(4.4, 4.88, "map vs particles")
    with pytest.raises(CryocliError, match="1 A vs 1.006 A"):
        check_pixel_size(1.0, 1.006, "x")
    with pytest.raises(CryocliError, match="invalid"):
        check_pixel_size(0.0, 1.0, "x")


@pytest.mark.parametrize("old,new,values", [
    ("     -0.00755     -0.33640            1 ", "     -0.00755 ", 24),  # two values short
    ("     -0.00755     -0.33640            1 ", "     -0.00755     -0.33640            1 7 8 ", 28),  # two extra
])
def test_a_row_with_the_wrong_number_of_values_is_named_as_such(tmp_path: Path, old: str, new: str,
                                                                values: int) -> None:
    """pandas pads a short row with NaN; the file holds no NaN, so the error names the row and its count of values,
    as it does for a row with too many (the fourth particle is line 53 of relion31.star)."""
    path = _rewritten(tmp_path, CRYODRGN / "relion31.star", old, new)
    with pytest.raises(CryocliError) as exc:
        read_star(path)
    _assert_error_names_file(exc, path, f"line 53 of data_particles has {values} values for 26 columns")
    assert "NaN" not in str(exc.value)


def test_a_nan_in_a_full_row_is_still_called_a_nan(tmp_path: Path) -> None:
    path = _rewritten(tmp_path, CRYODRGN / "relion31.star", "     -0.00755     -0.33640", "     -0.00755          nan")
    with pytest.raises(CryocliError, match="NaN or Inf value in row 4"):
        read_star(path)
