"""File-system helpers for the readers and writers: atomic writes and stack path resolution.

RELION writes ``rlnImageName`` paths relative to the directory it ran in (the project folder). A STAR file
usually sits in that folder or one level below it (``Extract/job012/particles.star``,
``noisy/noisy.star``), so a stack path is looked up, in order, against the STAR file's folder, the
current directory, the user's data directory (also by bare file name, the ``--datadir`` habit of other
tools) and finally the STAR file's parent folder.

Writers name stacks as RELION does (:func:`relion_image_path`): relative to the current directory when
the stack lies under it, absolute otherwise, so a STAR file written by one command reads from the same
shell with the next command, or with RELION, without ``--datadir``.
"""

from __future__ import annotations

import os
import tempfile
import threading
from pathlib import Path

_UMASK_LOCK = threading.Lock()


def default_file_mode() -> int:
    """Permission bits a newly created file gets under the current umask (``0o666 & ~umask``)."""
    # There is no way to read the umask without setting it; hold a lock so threads do not race.
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return 0o666 & ~mask


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8, newlines as given) to ``path`` through :func:`atomic_write_bytes`: a temporary file
    in the same folder and an ``os.replace``, so an interrupted write never leaves a partial file under the final
    name, and an existing file is replaced only once the new content is complete (umask permissions)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def stack_candidates(name: str, star_dir: Path | None, datadir: Path | None) -> list[Path]:
    """Every location tried for the stack ``name`` (the path part of ``rlnImageName``), in lookup order.

    Absolute names are used as they are. Relative names are tried against the STAR file's folder, the
    current directory, ``datadir`` (as given and by bare file name) and the STAR file's parent folder
    (RELION's project folder when the STAR file lives in a job or set subfolder). Duplicates are dropped.
    """
    rel = Path(name)
    if rel.is_absolute():
        return [rel]
    bases: list[Path] = []
    if star_dir is not None:
        bases.append(star_dir / rel)
    bases.append(Path.cwd() / rel)
    if datadir is not None:
        bases.append(datadir / rel)
        bases.append(datadir / rel.name)
    if star_dir is not None:
        bases.append(star_dir.parent / rel)
    seen: set[str] = set()
    unique: list[Path] = []
    for candidate in bases:
        key = os.path.normpath(str(candidate))
        if key not in seen:
            seen.add(key)
            unique.append(Path(key))
    return unique


def resolve_stack(name: str, star_dir: Path | None, datadir: Path | None) -> tuple[Path | None, list[Path]]:
    """The first existing file among :func:`stack_candidates`, or ``None``, and the list of paths tried."""
    tried = stack_candidates(name, star_dir, datadir)
    for candidate in tried:
        if candidate.is_file():
            return candidate, tried
    return None, tried


def star_folder(star_path: str | Path | None) -> Path | None:
    """The folder stack names of the STAR file ``star_path`` are first looked up in (its resolved folder)."""
    return Path(star_path).resolve().parent if star_path else None


def relion_image_path(path: str | Path) -> str:
    """The stack path ``path`` as RELION writes it in ``rlnImageName``: relative to the current directory.

    ``path`` (absolute, or relative to the current directory) is made absolute and normalised lexically
    (``.`` and ``a/..`` removed, symbolic links kept). When it lies under the current directory, either
    as written or once symbolic links are resolved on both sides (``os.getcwd()`` gives the physical
    folder), the result is relative to it (``sim/Particles/particles_0001.mrcs``), as RELION names the
    stacks of its project folder (``Extract/job005/...``). Otherwise it is absolute, never ``../``: a
    name that climbs out of the current directory reads from nowhere else anyway, and ``..`` after a
    symbolic link means a different folder to the kernel than to a lexical normalisation, so the
    same text could name two files. An absolute name reads from every directory.
    """
    target = Path(os.path.abspath(os.fspath(path)))
    cwd = Path.cwd()
    for base, full in ((cwd, target), (cwd.resolve(), None)):
        if full is None:
            try:
                full = target.resolve()
            except OSError:
                continue
        try:
            rel = full.relative_to(base)
        except ValueError:
            continue
        if rel.parts:
            return rel.as_posix()
    return target.as_posix()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` as :func:`atomic_write_text` does (temporary in the same folder, fsync,
    umask permissions, ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
