"""A RELION particle STAR file read a chunk of rows at a time, for commands that make one pass over the particles.

:func:`cryocli.io.star.read_star` holds the whole table, and parsing it through ``starfile`` peaks at about
2 KB per particle (every line is held by ``linecache``, again in a list, once more joined and once more with
its quotes replaced before pandas parses it): 0.3 GB for 160,000 particles, 2 GB for a million, before any
image is read. A single pass (``reconstruct``) needs one chunk at a time, so its memory does not grow with
the particle count. :func:`read_star_chunks` parses the ``data_particles`` loop of a RELION 3.1+ file
(``data_optics`` loop, then ``data_particles`` loop, the layout every RELION 3.1+ program writes) with pandas'
chunked reader, using the same parser options as ``starfile`` (whitespace-separated, ``#`` comments, ``nan``
as the only missing values, every column made numeric where it can be) and the same checks as
:func:`~cryocli.io.star.read_star`. Any other layout, and files with quoted values, are read whole by
:func:`~cryocli.io.star.read_star` and come as one chunk, so every file reads the same either way.

Each chunk is a :class:`~cryocli.io.star.ParticleTable` whose index is the particles' 0-based row in the file.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Generator, Iterator
from contextlib import closing
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd

from cryocli.errors import CryocliError
from cryocli.io.star import (
    NO_IMAGE_NAMES,
    ParticleTable,
    SourceStamp,
    check_optics,
    read_star,
    read_star_text,
    star_version,
    unreadable_star,
    validate_frame,
)

#: Particles per chunk: about 5 MB of parsed metadata for RELION's usual 20-30 columns.
CHUNK_ROWS = 20_000
#: pandas' reading of a STAR loop, as ``starfile`` sets it.
_CSV_OPTIONS = {"sep": r"\s+", "header": None, "comment": "#", "keep_default_na": False,
                "na_values": ["nan", "NaN", "<NA>"], "engine": "c"}


@dataclass(frozen=True)
class LoopLayout:
    """Where the particle rows of a RELION 3.1+ STAR file are.

    ``optics_columns``/``optics_lines``: the data_optics loop's labels and data lines (text).
    ``columns``: the data_particles loop's labels. ``first_data_line``: 0-based line number of its first row.
    ``rows``: its number of rows. ``head``: the file's text before the first particle row.
    """

    optics_columns: list[str]
    optics_lines: list[str]
    columns: list[str]
    first_data_line: int
    rows: int
    head: str


def particle_loop_layout(path: Path) -> LoopLayout | None:
    """The layout of ``path`` when it is data_optics (a loop) followed by data_particles (a loop, the last
    block) without quoted values; ``None`` for any other file (those are read whole)."""
    blocks: list[tuple[str, bool]] = []  # (name, is a loop)
    columns: dict[str, list[str]] = {}
    optics_lines: list[str] = []
    head: list[str] = []
    first, rows = -1, 0
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle):
            line = raw.strip()
            if line.startswith(b"data_"):
                if blocks and blocks[-1][0] == "particles":
                    return None  # a block after the particles
                blocks.append((line[5:].decode("utf-8", "replace"), False))
            elif not line or line.startswith(b"#"):
                pass
            elif not blocks:
                return None
            elif line.startswith(b"loop_"):
                blocks[-1] = (blocks[-1][0], True)
            elif line.startswith(b"_"):
                if not blocks[-1][1] or (blocks[-1][0] == "particles" and rows):
                    return None  # a key-value block, or a label after the rows
                columns.setdefault(blocks[-1][0], []).append(line.split()[0][1:].decode("utf-8", "replace"))
            elif b'"' in line or b"'" in line:
                return None
            elif blocks[-1][0] == "optics":
                optics_lines.append(line.decode("utf-8", "replace"))
            elif blocks[-1][0] == "particles":
                if first < 0:
                    first = number
                rows += 1
                continue
            if first < 0:
                head.append(raw.decode("utf-8", "replace"))
    if [name for name, _ in blocks] != ["optics", "particles"] or not all(loop for _, loop in blocks) or rows == 0:
        return None
    return LoopLayout(columns.get("optics", []), optics_lines, columns["particles"], first, rows, "".join(head))


def _numeric_where_possible(frame: pd.DataFrame) -> pd.DataFrame:
    """Each column as numbers when all of it parses as numbers (``starfile``'s rule), else as it is."""
    for column in frame.columns:
        try:
            frame[column] = pd.to_numeric(frame[column])
        except (ValueError, TypeError):
            pass
    return frame


def _has_gaps(frame: pd.DataFrame) -> bool:
    """Whether ``frame`` holds a missing value: NaN, or an empty text value (what pandas pads a short row with)."""
    if frame.isna().to_numpy().any():
        return True
    return any((frame.iloc[:, k] == "").any() for k in range(frame.shape[1])
               if not pd.api.types.is_numeric_dtype(frame.iloc[:, k]))


@dataclass
class ChunkedParticles:
    """The particles of a STAR file, read :data:`CHUNK_ROWS` at a time by :meth:`tables`.

    ``count``: particles in the file. ``columns``: the particle table's labels. ``whole``: the table when the
    file was read whole (its layout is not the streamed one, or it is no bigger than one chunk).
    """

    path: Path
    count: int
    columns: list[str]
    rows_per_chunk: int
    layout: LoopLayout | None = None
    whole: ParticleTable | None = None
    _optics: pd.DataFrame | None = None
    _version: str = "3.1"
    _source: SourceStamp | None = None

    def tables(self) -> Iterator[ParticleTable]:
        """The particle tables, in file order, each indexed by its particles' 0-based rows in the file."""
        if self.whole is not None:
            yield self.whole
            return
        assert self.layout is not None and self._optics is not None
        seen = 0
        ragged = _RaggedRows(self.path, self.layout)
        try:
            with warnings.catch_warnings(), closing(ragged):
                warnings.simplefilter("ignore")
                reader = pd.read_csv(self.path, names=self.layout.columns, skiprows=self.layout.first_data_line,
                                     chunksize=self.rows_per_chunk, **_CSV_OPTIONS)
                with reader:
                    for chunk in reader:
                        frame = _numeric_where_possible(chunk)
                        # pandas pads a row with too few values with empty values (NaN once numeric): name the
                        # short row, not a NaN the file does not hold (scanned only when a chunk has a gap).
                        if _has_gaps(frame):
                            ragged.refuse(upto=int(frame.index[-1]))
                        validate_frame(frame, "data_particles", self.path)
                        table = ParticleTable(frame, self._optics, self._version, str(self.path), True, "particles",
                                              self._source)
                        table.group_rows()  # raises for particles whose optics group is unknown
                        seen += len(frame)
                        yield table
        except (pd.errors.ParserError, ValueError, UnicodeDecodeError) as exc:
            if isinstance(exc, pd.errors.ParserError):  # a row with too many values: name it
                ragged.refuse()
            raise unreadable_star(exc, self.path) from exc
        if seen != self.count:
            raise CryocliError(f"data_particles has {seen} readable rows, not the {self.count} lines it holds "
                               "(the file changed while it was read?)", self.path)


class _RaggedRows:
    """The particle rows of a streamed file read line by line, once and forward only, for the first row whose
    number of values differs from the loop's labels: the error :func:`~cryocli.io.star.ragged_row` gives for a
    file read whole (``line 20 of data_particles has 2 values for 3 columns``), without holding the file."""

    def __init__(self, path: Path, layout: LoopLayout) -> None:
        self.path, self.columns, self.first_line = path, len(layout.columns), layout.first_data_line
        self._rows: Generator[tuple[int, int], None, None] | None = None
        self._passed = 0  # rows already checked

    def _value_counts(self) -> Generator[tuple[int, int], None, None]:
        """(1-based line number, number of values) of each particle row, as pandas splits it (``#`` starts a
        comment, blank lines are skipped)."""
        with open(self.path, "rb") as handle:
            for number, raw in enumerate(handle, start=1):
                if number <= self.first_line:
                    continue
                words = raw.split(b"#", 1)[0].split()
                if words:
                    yield number, len(words)

    def refuse(self, upto: int | None = None) -> None:
        """Raise :class:`CryocliError` naming the first ragged row among the rows not yet checked, up to the
        0-based row ``upto`` (None: to the end of the file); return when there is none."""
        if self._rows is None:
            self._rows = self._value_counts()
        while upto is None or self._passed <= upto:
            number, values = next(self._rows, (0, -1))
            if values < 0:
                return
            self._passed += 1
            if values != self.columns:
                raise CryocliError(f"not a readable STAR file (line {number} of data_particles has {values} values "
                                   f"for {self.columns} columns)", self.path)

    def close(self) -> None:
        if self._rows is not None:
            self._rows.close()


def read_star_chunks(path: str | Path, rows: int | None = None, require_images: bool = False) -> ChunkedParticles:
    """Open a particle STAR file for reading ``rows`` (default :data:`CHUNK_ROWS`) particles at a time (see the
    module docstring).

    Raises :class:`CryocliError` for what :func:`~cryocli.io.star.read_star` refuses in the file's header and
    optics table at once, and for a bad particle row when the chunk holding it is read.
    """
    path = Path(path)
    rows = CHUNK_ROWS if rows is None else rows
    if not path.is_file():
        read_star_text(path)  # the missing-file / not-a-file error
    layout = particle_loop_layout(path)
    if layout is None or layout.rows <= rows:
        table = read_star(path, require_images=require_images)
        return ChunkedParticles(path, len(table), list(table.particles.columns), rows, whole=table)
    if require_images and "rlnImageName" not in layout.columns:
        raise CryocliError(NO_IMAGE_NAMES, path)
    try:
        optics = pd.read_csv(io.StringIO("\n".join(layout.optics_lines) + "\n"), names=layout.optics_columns,
                             **_CSV_OPTIONS)
    except (pd.errors.ParserError, ValueError) as exc:
        raise unreadable_star(exc, path) from exc
    optics = _numeric_where_possible(optics)
    validate_frame(optics, "data_optics", path)
    check_optics(optics, path)
    if pd.Index(layout.columns).duplicated().any():
        validate_frame(pd.DataFrame(columns=layout.columns), "data_particles", path)
    return ChunkedParticles(path, layout.rows, layout.columns, rows, layout=layout, _optics=optics,
                            _version=star_version(layout.head, True),
                            _source=replace(SourceStamp.of(path, ""), block="particles"))

