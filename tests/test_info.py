"""`cryocli info` on every kind of RELION STAR file, checked against the real files read independently here
(a plain text parse, no cryocli code), plus the image-index check of particle files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cryocli.cli.app import app
from cryocli.io.summary import STAR_KINDS, summarize
from tests.conftest import ASPIRE, CRYODRGN, DATA, EXTERNAL, RELION_SET, REPO, STARFILE_DATA, need

runner = CliRunner()

ALL_STAR_FILES = sorted(DATA.rglob("*.star"))
# Genuinely broken files: one error line, exit 2 (sample.star has a ragged loop row and two loops in a block).
BROKEN = {"external/ASPIRE-Python/tests/saved_test_data/sample.star"}
EXPECTED_KIND = {
    "relion/set_3j9g/postprocess/postprocess.star": "postprocess",
    "relion/set_3j9g/postprocess_lowres20/postprocess.star": "postprocess",
    "external/starfile/tests/data/postprocess.star": "postprocess",
    "relion/set_3j9g/refine/run_model.star": "model",
    "external/ASPIRE-Python/tests/saved_test_data/sample_data_model.star": "model",
    "relion/set_3j9g/refine/run_optimiser.star": "optimiser",
    "external/starfile/tests/data/relion_tutorial/run_it025_optimiser_2D.star": "optimiser",
    "external/starfile/tests/data/relion_tutorial/run_it025_optimiser_3D.star": "optimiser",
    "relion/set_3j9g/refine/run_sampling.star": "sampling",
    "external/starfile/tests/data/relion_tutorial/run_it025_sampling_2D.star": "sampling",
    "external/starfile/tests/data/relion_tutorial/run_it025_sampling_3D.star": "sampling",
    "external/relion/data/mtf_k2_300kV.star": "mtf",
    "external/relion/data/mtf_falcon4EC_300kV.star": "mtf",
    "external/starfile/tests/data/default_pipeline.star": "star",
    "external/starfile/tests/data/empty_loop.star": "star",
    "external/starfile/tests/data/basic_double_quote.star": "star",
    "external/starfile/tests/data/basic_single_quote.star": "star",
    "external/starfile/tests/data/loop_double_quote.star": "star",
    "external/starfile/tests/data/loop_single_quote.star": "star",
    "external/starfile/tests/data/two_basic_blocks.star": "star",
    "external/starfile/tests/data/two_single_line_loop_blocks.star": "star",
    "relion/set_3j9g/noisy/noisy.star": "particles",
    "relion/set_3j9g/refine/run_data.star": "particles",
    "relion/set_3j9g/particles_truth.star": "particles",
    "external/cryodrgn/tests/data/relion31.star": "particles",
    "external/ASPIRE-Python/tests/saved_test_data/sample_particles_relion30.star": "particles",
}
SET_PARTICLE_FILES = ("clean/clean.star", "noisy/noisy.star", "refine/refine_input.star", "refine/run_data.star")


# ----- independent plain-text reading of the reference files ------------------------------------------------
def _blocks(path: Path) -> dict[str, dict]:
    """Every block as ``{"list": {label: text}}`` or ``{"labels": [...], "rows": [[text, ...], ...]}``."""
    blocks: dict[str, dict] = {}
    current: dict | None = None
    for line in path.read_text().splitlines():
        word = line.strip()
        if not word or word.startswith("#"):
            continue
        if word.startswith("data_"):
            current = blocks.setdefault(word[5:], {"list": {}, "labels": [], "rows": []})
            current["loop"] = False
        elif word.startswith("loop_"):
            current["loop"] = True
        elif word.startswith("_") and current["loop"]:
            current["labels"].append(word.split()[0][1:])
        elif word.startswith("_"):
            label, value = word.split(None, 1)
            current["list"][label[1:]] = value.strip()
        else:
            current["rows"].append(word.split())
    return blocks


def _column(block: dict, label: str) -> list[str]:
    i = block["labels"].index(label)
    return [row[i] for row in block["rows"]]


def _rel(path: Path) -> str:
    return path.relative_to(DATA).as_posix()


def _info_json(*args: str) -> dict:
    res = runner.invoke(app, ["info", "--json", *args], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def _info_text(*args: str) -> str:
    res = runner.invoke(app, ["info", *args], catch_exceptions=False, env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    return res.stdout


# ----- every STAR file in shared/data ------------------------------------------------------------------------
def test_the_reference_files_are_there() -> None:
    assert len(ALL_STAR_FILES) >= 40, ALL_STAR_FILES
    for rel in {*EXPECTED_KIND, *BROKEN}:
        need(DATA / rel)


@pytest.mark.parametrize("path", ALL_STAR_FILES, ids=_rel)
def test_info_answers_on_every_real_star_file(path: Path) -> None:
    """Exit 0 with a known kind (the expected one where this test knows it), in JSON and as tables; for a
    genuinely broken file, exit 2 and one error line. catch_exceptions=False: any other exception fails."""
    args = ["info", "--json", str(path)]
    res = runner.invoke(app, args, catch_exceptions=False)
    if _rel(path) in BROKEN:
        assert res.exit_code == 2, res.output
        assert res.stdout == "" and len(res.stderr.strip().splitlines()) == 1, res.stderr
        assert res.stderr.startswith("cryocli: error:") and "Traceback" not in res.stderr
        return
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["file"] == str(path) and summary["type"] == "star"
    assert summary["kind"] == EXPECTED_KIND.get(_rel(path), summary["kind"]) and summary["kind"] in STAR_KINDS
    text = runner.invoke(app, ["info", str(path)], catch_exceptions=False, env={"COLUMNS": "200"})
    assert text.exit_code == 0 and str(path) in text.stdout.replace("\n", ""), text.output


def test_a_broken_file_gives_one_line_and_exit_2_from_the_real_command() -> None:
    bad = need(ASPIRE / "sample.star")
    res = subprocess.run([sys.executable, "-m", "cryocli", "info", str(bad)], capture_output=True, text=True,
                         cwd=REPO, env={**os.environ, "COLUMNS": "300"}, timeout=120)
    assert res.returncode == 2 and res.stdout == "", res
    assert res.stderr.strip().splitlines() == [
        f"cryocli: error: {bad}: not a readable STAR file (line 20 of data_planetary has 5 values for 4 columns)"]


def test_the_kind_comes_from_the_blocks_not_the_file_name(tmp_path: Path) -> None:
    shutil.copy(need(RELION_SET / "postprocess" / "postprocess.star"), tmp_path / "run_data.star")
    shutil.copy(need(RELION_SET / "particles_truth.star"), tmp_path / "postprocess.star")
    shutil.copy(need(RELION_SET / "refine" / "run_optimiser.star"), tmp_path / "run_model.star")
    assert summarize(tmp_path / "run_data.star")["kind"] == "postprocess"
    assert summarize(tmp_path / "postprocess.star")["kind"] == "particles"
    assert summarize(tmp_path / "run_model.star")["kind"] == "optimiser"


# ----- postprocess -------------------------------------------------------------------------------------------
POSTPROCESS_FILES = [RELION_SET / "postprocess" / "postprocess.star",
                     RELION_SET / "postprocess_lowres20" / "postprocess.star",
                     STARFILE_DATA / "postprocess.star"]


@pytest.mark.parametrize("path", POSTPROCESS_FILES, ids=_rel)
def test_postprocess_figures_are_the_files_values(path: Path) -> None:
    blocks = _blocks(need(path))
    general, fsc = blocks["general"]["list"], blocks["fsc"]
    s = _info_json(str(path))
    assert s["kind"] == "postprocess"
    assert s["final_resolution_A"] == float(general["rlnFinalResolution"])
    assert s["bfactor_A2"] == float(general["rlnBfactorUsedForSharpening"])
    assert s["mask"] == general["rlnMaskName"]
    assert s["randomise_from_A"] == float(general["rlnRandomiseFrom"])
    assert s["half_maps"] == [general["rlnUnfilteredMapHalf1"], general["rlnUnfilteredMapHalf2"]]
    assert s["fsc"]["shells"] == len(fsc["rows"])
    # RELION reports as final resolution the last shell before the corrected FSC drops below 0.143
    assert s["fsc"]["resolution_0143_A"] == s["final_resolution_A"]
    angstrom = _column(fsc, "rlnAngstromResolution")
    corrected = _column(fsc, "rlnFourierShellCorrelationCorrected")
    shell = s["fsc"]["shell_0143"]
    assert float(corrected[shell]) >= 0.143 > float(corrected[shell + 1])
    assert all(float(c) >= 0.143 for c in corrected[1:shell + 1])
    for row in s["fsc"]["glance"]:
        assert row["resolution_A"] == float(angstrom[row["shell"]])
        assert row["corrected"] == float(corrected[row["shell"]])
        assert row["unmasked"] == float(_column(fsc, "rlnFourierShellCorrelationUnmaskedMaps")[row["shell"]])


def test_postprocess_values_in_the_file_match_the_set_readme() -> None:
    """The set's README quotes the same run: 9.083871 A, B = -1542.99162 A^2 (and -300.57973 with lowres 20)."""
    main = summarize(RELION_SET / "postprocess" / "postprocess.star")
    low = summarize(RELION_SET / "postprocess_lowres20" / "postprocess.star")
    assert (main["final_resolution_A"], main["bfactor_A2"]) == (9.083871, -1542.99162)
    assert (low["final_resolution_A"], low["bfactor_A2"]) == (9.083871, -300.57973)
    assert main["guinier_fit"] == {"slope": -385.74791, "intercept": -11.02976, "correlation": 0.723618}


def test_postprocess_table_shows_the_exact_values() -> None:
    out = _info_text(str(RELION_SET / "postprocess" / "postprocess.star"))
    assert "RELION postprocess" in out
    for text in ("9.083871 A", "-1542.99162 A^2", "mask.mrc", "21.661539 A", "0.143 at 9.083871 A (shell 31)"):
        assert text in out, out


# ----- model -------------------------------------------------------------------------------------------------
MODEL_FILES = [RELION_SET / "refine" / "run_model.star", ASPIRE / "sample_data_model.star"]


@pytest.mark.parametrize("path", MODEL_FILES, ids=_rel)
def test_model_figures_are_the_files_values(path: Path) -> None:
    blocks = _blocks(need(path))
    general, classes, groups = (blocks["model_general"]["list"], blocks["model_classes"],
                                blocks["model_groups"])
    s = _info_json(str(path))
    assert s["kind"] == "model"
    assert s["resolution_A"] == float(general["rlnCurrentResolution"])
    assert s["pixel_size"] == float(general["rlnPixelSize"])
    assert s["box"] == int(general["rlnOriginalImageSize"])
    assert s["classes"] == int(general["rlnNrClasses"]) == len(s["class_table"]) == len(classes["rows"])
    assert s["groups"] == int(general["rlnNrGroups"]) == len(s["group_table"])
    for row, distribution, accuracy in zip(s["class_table"], _column(classes, "rlnClassDistribution"),
                                           _column(classes, "rlnAccuracyRotations")):
        assert row["distribution"] == float(distribution) and row["accuracy_rotations_deg"] == float(accuracy)
    assert [g["particles"] for g in s["group_table"]] == [int(v) for v in _column(groups, "rlnGroupNrParticles")]


def test_run_model_of_the_set() -> None:
    """README: the auto-refine ended at 11.7333 A; 4.4 A/px, box 64, one class, one optics group."""
    s = summarize(RELION_SET / "refine" / "run_model.star")
    assert s["resolution_A"] == 11.733334 and s["pixel_size"] == 4.4 and s["box"] == 64
    assert s["optics_groups"] == 1 and s["sigma_offsets_A"] == 8.746602
    assert s["class_table"][0]["estimated_resolution_A"] == 11.733334
    out = _info_text(str(RELION_SET / "refine" / "run_model.star"))
    assert "RELION model" in out and "11.733334 A" in out and "refine/run_class001.mrc" in out


# ----- optimiser and sampling --------------------------------------------------------------------------------
@pytest.mark.parametrize("path", [RELION_SET / "refine" / "run_optimiser.star",
                                  STARFILE_DATA / "relion_tutorial" / "run_it025_optimiser_2D.star"], ids=_rel)
def test_optimiser_figures_are_the_files_values(path: Path) -> None:
    general = _blocks(need(path))["optimiser_general"]["list"]
    s = _info_json(str(path))
    assert s["kind"] == "optimiser"
    assert s["iteration"] == int(general["rlnCurrentIteration"])
    assert s["iterations"] == int(general["rlnNumberOfIterations"])
    assert s["particle_diameter_A"] == float(general["rlnParticleDiameter"])
    assert s["auto_refine"] is (general["rlnDoAutoRefine"] == "1")
    assert s["best_resolution_A"] == pytest.approx(1 / float(general["rlnBestResolutionThusFar"]), abs=1e-4)
    assert s["command"].startswith("--o ") and s["output_root"] == general["rlnOutputRootName"]


def test_final_auto_refine_optimiser_of_the_set() -> None:
    s = summarize(RELION_SET / "refine" / "run_optimiser.star")
    assert s["iteration"] == -1 and s["has_converged"] is True and s["auto_refine"] is True
    assert s["particle_diameter_A"] == 280.0 and "--particle_diameter 280" in s["command"]
    assert "iteration -1" in _info_text(str(RELION_SET / "refine" / "run_optimiser.star"))


@pytest.mark.parametrize("path", [RELION_SET / "refine" / "run_sampling.star",
                                  STARFILE_DATA / "relion_tutorial" / "run_it025_sampling_3D.star",
                                  STARFILE_DATA / "relion_tutorial" / "run_it025_sampling_2D.star"], ids=_rel)
def test_sampling_figures_are_the_files_values(path: Path) -> None:
    blocks = _blocks(need(path))
    general = blocks["sampling_general"]["list"]
    s = _info_json(str(path))
    assert s["kind"] == "sampling"
    assert s["psi_step_deg"] == float(general["rlnPsiStep"])
    assert s["offset_range"] == float(general["rlnOffsetRange"]) and s["offset_unit"] == "A"
    assert s["offset_step"] == float(general["rlnOffsetStep"])
    assert s["directions"] == len(blocks.get("sampling_directions", {"rows": []})["rows"])
    if "rlnHealpixOrder" in general:
        assert s["healpix_order"] == int(general["rlnHealpixOrder"]) and s["is_3d"] is True
        # RELION samples psi as finely as the HEALPix directions: both are 360 / (6 * 2^order) degrees
        assert s["angular_sampling_deg"] == pytest.approx(float(general["rlnPsiStep"]))
    else:
        assert s["healpix_order"] is None and s["is_3d"] is False


def test_sampling_of_the_set_offsets_in_angstrom() -> None:
    """--offset_range 5 --offset_step 2 at 4.4 A/px: the file starts from 22 A and 8.8 A; final order 6."""
    s = summarize(RELION_SET / "refine" / "run_sampling.star")
    assert s["healpix_order"] == 6 and s["healpix_order_original"] == 2 and s["directions"] == 49152
    assert (s["offset_range_original"], s["offset_step_original"]) == (22.0, 8.8)


# ----- MTF ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", [EXTERNAL / "relion" / "data" / "mtf_k2_300kV.star",
                                  EXTERNAL / "relion" / "data" / "mtf_falcon4EC_300kV.star"], ids=_rel)
def test_mtf_figures_are_the_files_values(path: Path) -> None:
    (block,) = _blocks(need(path)).values()
    freq = [float(v) for v in _column(block, "rlnResolutionInversePixel")]
    mtf = [float(v) for v in _column(block, "rlnMtfValue")]
    s = _info_json(str(path))
    assert s["kind"] == "mtf" and s["points"] == len(freq)
    assert s["frequency_range"] == [min(freq), max(freq)] and s["mtf_range"] == [min(mtf), max(mtf)]
    for at in s["mtf_at"]:
        if at["frequency"] in freq:  # a tabulated frequency: the file's value itself
            assert at["mtf"] == pytest.approx(mtf[freq.index(at["frequency"])], abs=1e-12)
        elif at["frequency"] > max(freq):
            assert at["mtf"] is None


def test_mtf_k2_at_nyquist_and_falcon_stops_short() -> None:
    k2 = summarize(EXTERNAL / "relion" / "data" / "mtf_k2_300kV.star")
    assert k2["mtf_at"][-1] == {"nyquist_fraction": 1.0, "frequency": 0.5, "mtf": 0.388115}
    falcon = summarize(EXTERNAL / "relion" / "data" / "mtf_falcon4EC_300kV.star")
    assert falcon["block"] == "" and falcon["points"] == 64 and falcon["mtf_at"][-1]["mtf"] is None


# ----- any other STAR file -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["default_pipeline.star", "empty_loop.star", "two_basic_blocks.star",
                                  "loop_double_quote.star"])
def test_other_star_files_list_their_blocks(name: str) -> None:
    path = need(STARFILE_DATA / name)
    expected = _blocks(path)
    s = _info_json(str(path))
    assert s["kind"] == "star"
    got = {b["name"]: b for b in s["blocks"]}
    assert list(got) == list(expected)
    for block_name, block in expected.items():
        b = got[block_name]
        if block["loop"]:
            assert (b["type"], b["rows"], b["columns"]) == ("loop", len(block["rows"]), len(block["labels"]))
            assert b["labels"] == block["labels"]
        else:
            assert (b["type"], b["rows"], b["columns"]) == ("list", 1, len(block["list"]))
    out = _info_text(str(path))
    assert all(f"data_{n}" in out for n in expected)


# ----- particles and their image indices ---------------------------------------------------------------------
@pytest.mark.parametrize("name", SET_PARTICLE_FILES)
def test_particles_of_the_set_all_within_their_stack(name: str) -> None:
    s = _info_json(str(need(RELION_SET / name)))
    assert s["kind"] == "particles" and s["type"] == "star" and s["particles"] == 600
    assert s["all_stacks_exist"] and s["stack_boxes"] == [64]
    assert (s["images_checked"], s["images_out_of_range"], s["out_of_range_examples"]) == (600, 0, [])


def _relion31_with_index(tmp_path: Path, last: int) -> Path:
    """relion31.star whose fifth particle points at image ``last`` of relion31.mrcs (which holds 5 images)."""
    text = need(CRYODRGN / "relion31.star").read_text()
    assert text.count("000005@relion31.mrcs") == 1
    star = tmp_path / "particles.star"
    star.write_text(text.replace("000005@relion31.mrcs", f"{last:06d}@relion31.mrcs"))
    return star


def test_last_image_of_a_stack_is_in_range(tmp_path: Path) -> None:
    s = _info_json(str(_relion31_with_index(tmp_path, 5)), "--datadir", str(CRYODRGN))
    assert (s["images_checked"], s["images_out_of_range"]) == (5, 0)


@pytest.mark.parametrize("index", [6, 1000])
def test_image_index_past_the_end_of_its_stack_is_an_error_line(tmp_path: Path, index: int) -> None:
    star = _relion31_with_index(tmp_path, index)
    s = _info_json(str(star), "--datadir", str(CRYODRGN))
    assert (s["images_checked"], s["images_out_of_range"]) == (5, 1)
    assert s["out_of_range_examples"] == [{"particle": 5, "image_name": f"{index:06d}@relion31.mrcs",
                                           "index": index, "stack_images": 5}]
    out = _info_text(str(star), "--datadir", str(CRYODRGN))
    assert f"error: 1 of 5 image indices are past the end of their stack: particle 5 {index:06d}@relion31.mrcs " \
           "(stack holds 5)" in out


def test_missing_and_unreadable_stacks_are_reported_not_checked(tmp_path: Path) -> None:
    text = need(CRYODRGN / "relion31.star").read_text()
    (tmp_path / "broken.mrcs").write_bytes(b"not an MRC file")
    star = tmp_path / "particles.star"
    star.write_text(text.replace("000005@relion31.mrcs", "000001@broken.mrcs")
                    .replace("000004@relion31.mrcs", "000001@absent.mrcs"))
    s = _info_json(str(star), "--datadir", str(CRYODRGN))
    assert s["stacks_missing"] == ["absent.mrcs"] and list(s["stacks_unreadable"]) == ["broken.mrcs"]
    assert (s["images_checked"], s["images_out_of_range"]) == (3, 0)
    out = _info_text(str(star), "--datadir", str(CRYODRGN))
    assert "error: stack broken.mrcs cannot be read" in out and "2 particles in missing or unreadable" in out


def test_particle_file_without_found_stacks_says_so() -> None:
    out = _info_text(str(need(CRYODRGN / "relion5.star")))
    assert "2 missing" in out and "not checked (all 17 particles" in out


def test_mrc_files_unchanged() -> None:
    s = _info_json(str(need(RELION_SET / "map.mrc")))
    assert s["type"] == "map" and s["shape_xyz"] == [64, 64, 64] and s["voxel_size"] == pytest.approx(4.4)


def test_map_contour_level_by_mass_and_by_default_sphere() -> None:
    """info MAP gives the level enclosing the molecule's volume with --mass (1.21 A^3/Da), else the level of a
    sphere of 0.8 x the box, labelled as a floor; in the JSON (contour_level, contour_basis) and the text."""
    import mrcfile
    import numpy as np

    from cryocli.analysis.contour import enclosing_level, sphere_volume_A3

    path = need(RELION_SET / "map.mrc")
    data = np.asarray(mrcfile.open(path).data, dtype=np.float64)
    apix = float(mrcfile.open(path).voxel_size.x)
    s = _info_json(str(path), "--mass", "300")
    assert s["contour_basis"] == "mass 300 kDa (363,000 A^3 at 1.21 A^3/Da)"
    assert s["contour_level"] == enclosing_level(data, apix, 363_000)
    assert abs(float((data > s["contour_level"]).sum()) * apix ** 3 - 363_000) <= 0.5 * apix ** 3
    d = _info_json(str(path))
    assert d["contour_level"] == enclosing_level(data, apix, sphere_volume_A3(0.8 * 64 * apix))
    assert d["contour_basis"].startswith("sphere of diameter 225.3 A, 0.8 x the box, no mass given")
    assert "floor" in d["contour_basis"] and d["contour_level"] < s["contour_level"]
    out = _info_text(str(path), "--mass", "300")
    assert f"volume #1 level {s['contour_level']:.4g}" in out and "mass 300 kDa" in out
    assert "pass --mass KDA" in _info_text(str(path))
    # Stacks have no contour level; STAR files take --mass without effect.
    stack = _info_json(str(need(RELION_SET / "clean" / "clean.mrcs")), "--mass", "300")
    assert "contour_level" not in stack
    assert _info_json(str(RELION_SET / "clean" / "clean.star"), "--mass", "300")["particles"] == 600


def test_contour_mass_that_does_not_fit_or_is_not_positive_is_one_error_line() -> None:
    path = str(need(RELION_SET / "map.mrc"))
    for mass, words in (("300000", "at least the whole map"), ("0", "must be greater than 0"), ("nan", "finite")):
        res = runner.invoke(app, ["info", path, "--mass", mass])
        assert res.exit_code == 2, res.output
        assert "--mass" in res.output and words in res.output and len(res.output.strip().splitlines()) == 1


# ----- MRC files: map, stack or image; what a header without a voxel size or data gives ------------------------
ALL_MRC_FILES = sorted(p for p in DATA.rglob("*") if p.suffix in {".mrc", ".mrcs", ".map", ".st"})


@pytest.mark.parametrize("path", ALL_MRC_FILES, ids=_rel)
def test_every_real_mrc_file_is_a_map_or_a_stack_by_its_header_and_name(path: Path) -> None:
    """Every .mrcs holds particle images; every .mrc and .map in shared/data is a 3D map, RELION's and ChimeraX's
    (ISPG 0, MZ = NZ) included, and a map gets a contour-level line."""
    s = _info_json(str(path))
    if path.suffix == ".mrcs":
        assert s["type"] == "stack" and s["images"] == s["shape_xyz"][2] and "contour_level" not in s
        return
    assert s["type"] == "map" and "images" not in s and "contour_basis" in s, s
    assert len(s["shape_xyz"]) == 3 and len(s["voxel_size_xyz"]) == 3


def test_relion_map_with_ispg_0_gets_its_contour_level_and_mass() -> None:
    """RELION writes its maps with ISPG 0: they were called stacks of 64 images, and --mass was ignored."""
    import mrcfile
    import numpy as np

    from cryocli.analysis.contour import enclosing_level

    path = need(RELION_SET / "reconstruct" / "rec.mrc")
    with mrcfile.open(path) as mrc:
        assert (int(mrc.header.ispg), int(mrc.header.mz), int(mrc.header.nz)) == (0, 64, 64)
        data = np.asarray(mrc.data, dtype=np.float64)
    s = _info_json(str(path), "--mass", "300")
    assert s["type"] == "map" and "images" not in s
    assert s["contour_basis"].startswith("mass 300 kDa")
    assert s["contour_level"] == enclosing_level(data, s["voxel_size"], 363_000)
    out = _info_text(str(path), "--mass", "300")
    assert "MRC map" in out and "stack" not in out and f"volume #1 level {s['contour_level']:.4g}" in out


def test_a_thin_map_is_flagged_as_possibly_images() -> None:
    """empiar_10076_7.mrc is 7 particle images written as a 320 x 320 x 7 map (ISPG 1, MZ = NZ): by its header a
    map, with a note that says how to have it read as a stack."""
    s = _info_json(str(need(CRYODRGN / "empiar_10076_7.mrc")))
    assert s["type"] == "map" and "7 images" in s["note"] and ".mrcs" in s["note"]
    assert "note: a 320 x 320 x 7 grid" in _info_text(str(CRYODRGN / "empiar_10076_7.mrc"))


def test_single_image_is_neither_map_nor_stack(tmp_path: Path) -> None:
    import mrcfile
    import numpy as np

    path = tmp_path / "image.mrc"
    with mrcfile.new(path) as mrc:
        mrc.set_data(np.arange(64, dtype=np.float32).reshape(8, 8))
    s = _info_json(str(path))
    assert (s["type"], s["images"], s["shape_xyz"]) == ("image", 1, [8, 8]) and "contour_level" not in s
    assert "MRC single image" in _info_text(str(path))


def test_a_map_without_voxel_size_says_so_in_words() -> None:
    """ASPIRE writes its maps with a cell of 0: no voxel size, so no level; the reason is the header, not "a
    diameter of 0 A"."""
    path = need(EXTERNAL / "ASPIRE-Python" / "gallery" / "tutorials" / "data" / "clean70SRibosome_vol_65p.mrc")
    for extra in ((), ("--mass", "2000")):
        s = _info_json(str(path), *extra)
        assert s["type"] == "map" and s["voxel_size"] == 0 and s["contour_level"] is None
        assert "no voxel size" in s["contour_basis"] and "diameter" not in s["contour_basis"]
    out = _info_text(str(path))
    assert "the header gives no voxel size" in out and "must be a positive number" not in out


def test_non_standard_axis_order_shows_x_y_z_and_every_voxel_size() -> None:
    """EMD-3001 stores columns, rows, sections along z, x, y (MAPC,R,S = 3,1,2) with voxels of 0.448, 0.393 and
    0.459 A along x, y, z: the grid is shown as x,y,z after reordering, with all three voxel sizes."""
    path = need(EXTERNAL / "mrcfile" / "tests" / "test_data" / "EMD-3001.map")
    s = _info_json(str(path))
    assert s["axis_order"] == [3, 1, 2] and s["shape_crs"] == [73, 43, 25] and s["shape_xyz"] == [43, 25, 73]
    assert s["voxel_size_xyz"] == pytest.approx([17.93 / 40, 4.71 / 12, 33.03 / 72], rel=1e-3)
    assert s["voxel_size"] == s["voxel_size_xyz"][0]
    out = _info_text(str(path))
    assert "43x25x73" in out and "A/voxel x,y,z" in out and "0.4482,0.3925,0.4587" in out
    assert "73 columns run along z, its 43 rows along x and its 25 sections along y" in out


@pytest.mark.parametrize("make,words", [
    ("headeronly.mrc", "MRC file holds no data"),
    ("complex.mrc", "unsupported MRC mode 4 (complex values) for a map"),
    ("notes.md", "not a STAR or MRC file"),
    ("folder", "is a directory"),
])
def test_files_with_nothing_to_show_are_one_error_line(tmp_path: Path, make: str, words: str) -> None:
    """From the real command, so that warnings printed by libraries would show: one line, exit 2."""
    import mrcfile
    import numpy as np

    path = tmp_path / make
    if make == "headeronly.mrc":
        with mrcfile.new(path):
            pass
    elif make == "complex.mrc":
        with mrcfile.new(path) as mrc:
            mrc.set_data(np.ones((8, 8, 8), dtype=np.complex64))
    elif make == "notes.md":
        path.write_text("# notes\n")
    else:
        path.mkdir()
    res = subprocess.run([sys.executable, "-m", "cryocli", "info", str(path)], capture_output=True, text=True,
                         cwd=REPO, env={**os.environ, "COLUMNS": "300"}, timeout=120)
    assert res.returncode == 2 and res.stdout == "", res
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"cryocli: error: {path}: "), res.stderr
    assert words in res.stderr and "Traceback" not in res.stderr and "particle stack" not in res.stderr


def test_fsc_with_a_header_only_map_prints_no_warnings(tmp_path: Path) -> None:
    import mrcfile

    empty = tmp_path / "headeronly.mrc"
    with mrcfile.new(empty):
        pass
    half = need(RELION_SET / "reconstruct" / "rec_half1.mrc")
    res = subprocess.run([sys.executable, "-m", "cryocli", "fsc", str(half), str(empty)], capture_output=True,
                         text=True, cwd=REPO, env={**os.environ, "COLUMNS": "300"}, timeout=120)
    assert res.returncode == 2 and "Warning" not in res.stderr, res.stderr
    assert res.stderr.strip().splitlines() == [f"cryocli: error: {empty}: MRC file holds no data (its header gives "
                                               "a grid of 0 x 0 x 0 voxels)"]


# ----- particle files: box of the optics table against the stacks ----------------------------------------------
def test_optics_box_that_differs_from_the_stacks_is_a_warning_like_reconstructs_error() -> None:
    """toy_projections_13.star says rlnImageSize 300, its stack holds 30 px images: info names both numbers, in
    the words reconstruct uses when it refuses the file."""
    from cryocli.errors import CryocliError
    from cryocli.io.dataset import ParticleStack
    from cryocli.io.star import read_star

    path = need(CRYODRGN / "toy_projections_13.star")
    s = _info_json(str(path))
    assert s["box_mismatch"] == [{"group": 1, "star_box": 300, "stack_boxes": [30], "message":
                                  "rlnImageSize in the STAR file is 300 px but the stacks hold 30 px images"}]
    with pytest.raises(CryocliError) as refused:
        ParticleStack(read_star(path))
    assert s["box_mismatch"][0]["message"] in str(refused.value)
    out = _info_text(str(path))
    assert "warning: rlnImageSize in the STAR file is 300 px but the stacks hold 30 px images" in out
    # relion5.star with its stacks found: 448 px declared, 30 px held.
    s5 = _info_json(str(need(CRYODRGN / "relion5.star")), "--datadir", str(CRYODRGN / "toy_datadir"))
    assert [(m["star_box"], m["stack_boxes"]) for m in s5["box_mismatch"]] == [(448, [30])]


@pytest.mark.parametrize("path", [CRYODRGN / "relion31.star", RELION_SET / "noisy" / "noisy.star",
                                  CRYODRGN / "empiar_10076_7.star"], ids=lambda p: p.name)
def test_agreeing_or_undeclared_box_gives_no_warning(path: Path) -> None:
    s = _info_json(str(need(path)), "--datadir", str(CRYODRGN))
    assert s["box_mismatch"] == []
    assert "warning" not in _info_text(str(path), "--datadir", str(CRYODRGN))


@pytest.mark.parametrize("name", ["rln_proj_64.star", "rln_proj_65.star"])
def test_a_file_with_no_pixel_size_anywhere_names_angpix(name: str) -> None:
    """ASPIRE's rln_proj_*.star give no pixel size, and their stacks' headers 0: info warns, in the words the
    commands that read the images use when they refuse it, and those commands do refuse it without --angpix."""
    from cryocli.errors import CryocliError
    from cryocli.io.dataset import ParticleStack
    from cryocli.io.star import read_star

    path = need(ASPIRE / name)
    assert _info_json(str(path))["pixel_size_known"] is False
    with pytest.raises(CryocliError, match="no pixel size in the STAR file or the stack headers: give the images' "
                       "pixel size with --angpix"):
        _ = ParticleStack(read_star(path)).pixel_size
    assert ("warning: no pixel size in the STAR file or the stack headers: give it to reconstruct, refine and "
            "abinitio with --angpix") in _info_text(str(path))
    # The set's particles, whose optics table gives 4.4 A: no warning.
    s = _info_json(str(need(RELION_SET / "noisy" / "noisy.star")))
    assert s["pixel_size_known"] is True


def test_missing_stacks_say_the_box_is_unknown() -> None:
    out = _info_text(str(need(CRYODRGN / "relion5.star")))
    assert "2 stack file(s), box unknown (no stack could be read): 2 missing" in out and "box :" not in out


# ----- output to a pipe or a narrow terminal keeps every value ---------------------------------------------------
def test_piped_output_shows_every_value_whole() -> None:
    """`cryocli info X | cat`: rich's 80 columns cut cells to "opticsG…" and "16003-1…"; every value is whole."""
    star, volume = need(RELION_SET / "noisy" / "noisy.star"), need(RELION_SET / "reconstruct" / "rec.mrc")
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    res = subprocess.run([sys.executable, "-m", "cryocli", "info", str(star), str(volume), "--mass", "300"],
                         capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "…" not in res.stdout
    particles, density = _info_json(str(star), str(volume), "--mass", "300")["files"]
    group = particles["optics_groups"][0]
    low, high = group["defocus_range"]
    assert group["name"] in res.stdout and f"{low:.0f}-{high:.0f}" in res.stdout
    for key in ("min", "max", "mean", "std"):
        assert f"{density[key]:.4g}" in res.stdout, key
    assert "64x64x64" in res.stdout and str(star) in res.stdout.splitlines()[0]


def test_a_narrow_terminal_folds_cells_rather_than_cutting_them() -> None:
    res = runner.invoke(app, ["info", str(need(RELION_SET / "reconstruct" / "rec.mrc"))], catch_exceptions=False,
                        env={"COLUMNS": "50"})
    assert res.exit_code == 0 and "…" not in res.stdout, res.stdout


# ----- --json with several files, and cryocli's own model.star --------------------------------------------------
def test_json_for_several_files_is_the_object_the_help_describes() -> None:
    help_text = runner.invoke(app, ["info", "--help"], env={"COLUMNS": "300"}).stdout
    assert "a list for several files" not in help_text and '"files" key' in help_text
    both = _info_json(str(need(RELION_SET / "map.mrc")), str(need(RELION_SET / "noisy" / "noisy.star")))
    assert list(both) == ["files"] and [s["file"] for s in both["files"]] == [str(RELION_SET / "map.mrc"),
                                                                               str(RELION_SET / "noisy" / "noisy.star")]


def test_cryocli_refine_model_star_is_summarised_as_a_model(tmp_path: Path) -> None:
    """cryocli refine writes model.star in RELION's format without rlnNrClasses: a model, with its iterations."""
    import numpy as np

    from cryocli.engines.result import ModelIteration
    from cryocli.io.star import model_star_text

    shells = 9
    history = [ModelIteration(i, 20.0 / i, 4 * i, 10.0 / i, 1.0 / i, 2 + i, np.linspace(1, 0, shells),
                              np.ones(shells), np.ones(shells), np.ones((1, shells))) for i in (1, 2, 3)]
    path = tmp_path / "model.star"
    path.write_text(model_star_text(history, 16, 2.5, 6.7, True, "refine --method relion"))
    s = _info_json(str(path))
    assert (s["kind"], s["resolution_A"], s["pixel_size"], s["box"]) == ("model", 6.7, 2.5, 16)
    assert (s["iteration"], s["has_converged"], s["written_by"]) == (3, True, "cryocli refine --method relion")
    assert [(r["iteration"], r["resolution_A"], r["image_size"]) for r in s["iteration_table"]] == [
        (1, 20.0, 8), (2, 10.0, 16), (3, pytest.approx(20.0 / 3), 24)]
    out = _info_text(str(path))
    assert "RELION model" in out and "current resolution" in out and "HEALPix order" in out
