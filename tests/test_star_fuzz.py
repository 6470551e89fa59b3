"""Fuzzing: mutated real STAR files and random text either read or raise CryocliError, nothing else."""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cryocli.errors import CryocliError
from cryocli.io.star import read_star, write_star
from tests.conftest import ASPIRE, CRYODRGN, CRYOJAX, STARFILE_DATA, need

SEEDS = [CRYODRGN / "relion31.star", CRYODRGN / "relion31.v2.star", CRYODRGN / "empiar_10076_7.star",
         CRYODRGN / "relion5.star", CRYODRGN / "toy_projections_13.star", CRYOJAX / "trpv1_small_stack.star",
         ASPIRE / "sample_particles_relion31.star", ASPIRE / "sample_particles_relion30.star",
         ASPIRE / "rln_proj_65_shifted.star", ASPIRE / "sample.star", STARFILE_DATA / "postprocess.star"]
TEXTS = [need(p).read_text() for p in SEEDS]

PIECES = list("_#@'\" \t\n.-+e0123456789abcnNIf[]") + ["data_", "loop_", "_rln", "nan", "inf", "data_optics\n",
                                                          "data_particles\n", "_rlnOpticsGroup\n"]
GARBAGE = st.lists(st.sampled_from(PIECES), max_size=20).map("".join)


@st.composite
def mutated_star(draw) -> str:
    """A real STAR file after a few random edits (truncation, garbage, swapped tokens, dropped lines)."""
    text = draw(st.sampled_from(TEXTS))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["truncate", "insert", "swap", "drop", "duplicate"]))
        if kind == "truncate":
            text = text[:len(text) - draw(st.integers(0, len(text)))]
        elif kind == "insert":
            at = draw(st.integers(0, len(text)))
            text = text[:at] + draw(GARBAGE) + text[at:]
        elif kind == "swap":
            tokens = text.split(" ")
            if len(tokens) > 1:
                i, j = draw(st.integers(0, len(tokens) - 1)), draw(st.integers(0, len(tokens) - 1))
                tokens[i], tokens[j] = tokens[j], tokens[i]
                text = " ".join(tokens)
        else:
            lines = text.splitlines(keepends=True)
            if lines:
                k = draw(st.integers(0, len(lines) - 1))
                lines = lines[:k] + lines[k + 1:] if kind == "drop" else lines[:k] + [lines[k]] + lines[k:]
                text = "".join(lines)
    return text


def _exercise(text: str | bytes) -> None:
    """Read a candidate file and use every accessor; only CryocliError may come out."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "fuzz.star"
        if isinstance(text, bytes):
            path.write_bytes(text)
        else:
            path.write_text(text)
        try:
            table = read_star(path)
        except CryocliError as exc:
            assert "fuzz.star" in str(exc)
            return
        assert len(table) > 0
        for accessor in ("pixel_size", "origins_angstrom", "euler_angles", "box_size", "image_names",
                         "random_subset"):
            try:
                getattr(table, accessor)
            except CryocliError:
                pass
        for call in (table.ctf_params, table.optics_per_particle):
            try:
                call()
            except CryocliError:
                pass
        out = Path(folder) / "out.star"
        try:
            write_star(table, out)
        except CryocliError:
            return
        again = read_star(out)
        assert len(again) == len(table)


@settings(max_examples=170, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_star())
def test_mutated_star_files(text: str) -> None:
    _exercise(text)


@settings(max_examples=30, deadline=None)
@given(st.one_of(st.text(max_size=300), st.binary(max_size=300), GARBAGE.map(lambda g: "data_\nloop_\n" + g)))
def test_random_text(text: str | bytes) -> None:
    _exercise(text)
