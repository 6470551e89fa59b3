"""One writer per output, and the clean-up of what a killed run left behind.

Every command that writes an output (a file such as ``map.mrc`` or a folder such as ``sim/``) holds a lock
beside it while it works::

    with output_lock(out, "simulate"):
        remove_stale_temporaries(out.parent, out.name)
        ...  # compute, then write through temporaries and rename into place

The lock of an output ``P`` is the file ``P.parent / f".{P.name}.lock"``, created with
``O_CREAT | O_EXCL`` (so exactly one process gets it) and holding JSON
``{"pid": ..., "host": ..., "command": ..., "started": ...}`` (``started``: UTC, ISO 8601). A second run on
the same output is refused with one line naming the holder. A lock whose process is gone (same host, the
pid is not running or now belongs to a process started after the lock) is stale: it is taken over
silently. A lock from another host is never taken over; the error says how to remove it.

The atomic writers of cryocli name their temporaries after the output they become:

* files ``.{name}.XXXXXXXX.tmp`` (``tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp")``: io/mrc.py,
  io/paths.py),
* folders ``.{name}.XXXXXXXX`` (``tempfile.mkdtemp(prefix=f".{name}.")``: imaging/simulate.py,
  cli/postprocess.py) and the backup folder ``.{name}.old`` of a folder being replaced.

A ``kill -9`` leaves them behind; :func:`remove_stale_temporaries` removes them at the next run of that
output (under its lock). New writers should use the same naming (a random part without dots) so that
their leftovers are cleaned too.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from cryocli.errors import CryocliError

__all__ = ["LockHolder", "OutputLocked", "current_umask", "default_dir_mode", "lock_path", "output_lock",
           "read_lock", "remove_stale_temporaries"]

# A lock file that cannot be parsed is normally one being written this very moment (between O_EXCL and the
# write); older than this, its writer died in between and the lock is stale.
_UNREADABLE_GRACE_S = 5.0

_UMASK_LOCK = threading.Lock()


class OutputLocked(CryocliError):
    """The output is being written by another live process (the message names it and the lock file)."""


@dataclass(frozen=True)
class LockHolder:
    """What a lock file says: who holds the output, since when (``started``, UTC ISO 8601)."""

    pid: int
    host: str
    command: str
    started: str

    def is_this_process(self) -> bool:
        return self.pid == os.getpid() and self.host == socket.gethostname()

    def is_alive(self) -> bool:
        """False only when the holder is known to be gone (its pid is not running on this host, or that pid now
        belongs to a process started after the lock); True otherwise, including for other hosts."""
        if self.host != socket.gethostname():
            return True
        if self.pid <= 0:
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass  # running, under another user
        except OSError:
            return True
        started = _process_start_time(self.pid)
        lock_time = _parse_time(self.started)
        # The pid was reused by a process that started (clearly) after the lock was written.
        return not (started is not None and lock_time is not None and started > lock_time + 2.0)

    def describe(self) -> str:
        command = self.command if self.command.startswith("cryocli") else f"cryocli {self.command}"
        return f"{command} (pid {self.pid} on {self.host}) since {self.started}"


def current_umask() -> int:
    """The process umask (read from /proc where possible; otherwise set and restored under a lock)."""
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def default_dir_mode() -> int:
    """Permission bits a newly created folder gets under the current umask (``0o777 & ~umask``)."""
    return 0o777 & ~current_umask()


def lock_path(path: str | Path) -> Path:
    """The lock file of the output ``path``: ``.{name}.lock`` beside it."""
    p = Path(os.path.abspath(path))
    return p.parent / f".{p.name}.lock"


def read_lock(lock: str | Path) -> LockHolder | None:
    """The holder written in a lock file, or None when the file is missing or unreadable."""
    try:
        data = json.loads(Path(lock).read_text(encoding="utf-8"))
        return LockHolder(pid=int(data["pid"]), host=str(data["host"]), command=str(data["command"]),
                          started=str(data["started"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


@contextmanager
def output_lock(path: str | Path, command: str) -> Iterator[Path]:
    """Hold the lock of the output ``path`` (file or folder) for the duration of the ``with`` block.

    ``command`` names the holder in the message other runs get (``"simulate"`` -> "in use by cryocli
    simulate ..."). Creates the missing parent folders of ``path`` (and removes those left empty at the end).
    Raises :class:`OutputLocked` when another live process holds it. Yields the lock file's path. The lock is
    removed on exit, also on exceptions and interrupts (a ``kill -9`` leaves it; the next run takes it over).
    """
    shown = Path(path)
    lock = lock_path(path)
    created = _make_parents(lock.parent)
    holder = LockHolder(pid=os.getpid(), host=socket.gethostname(), command=command,
                        started=datetime.now(timezone.utc).isoformat(timespec="microseconds"))
    try:
        _acquire(lock, holder, shown)
    except BaseException:
        _remove_empty(created)
        raise
    try:
        yield lock
    finally:
        if read_lock(lock) == holder:
            try:
                lock.unlink()
            except FileNotFoundError:
                pass
        _remove_empty(created)


def remove_stale_temporaries(folder: str | Path, name: str) -> list[Path]:
    """Remove the temporaries of the output ``folder / name`` that an interrupted run left behind.

    These are files ``.{name}.<random>.tmp`` and folders ``.{name}.<random>`` (``<random>`` without dots; see
    the module docstring). Nothing is removed while another live process holds the output's lock (call this
    with the lock held, or with no lock at all). Returns the paths removed.
    """
    folder = Path(folder)
    holder = read_lock(folder / f".{name}.lock")
    if holder is not None and not holder.is_this_process() and holder.is_alive():
        return []
    files = re.compile(rf"^\.{re.escape(name)}\.[^./]+\.tmp$")
    folders = re.compile(rf"^\.{re.escape(name)}\.[^./]+$")
    removed: list[Path] = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    for entry in entries:
        if entry.name == f".{name}.lock" or entry.is_symlink():
            continue
        try:
            if entry.is_dir() and folders.match(entry.name):
                shutil.rmtree(entry)
            elif entry.is_file() and files.match(entry.name):
                entry.unlink()
            else:
                continue
        except FileNotFoundError:
            continue
        except OSError:
            continue  # not ours to remove after all (permissions): leave it
        removed.append(entry)
    return removed


# --- internals ----------------------------------------------------------------------------------------

def _acquire(lock: Path, holder: LockHolder, shown: Path) -> None:
    payload = json.dumps({"pid": holder.pid, "host": holder.host, "command": holder.command,
                          "started": holder.started}) + "\n"
    for _ in range(20):
        try:
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            other = _wait_readable(lock)
            if other is None:
                if _age(lock) < _UNREADABLE_GRACE_S:
                    raise OutputLocked(f"in use by another cryocli run (its lock {lock} is being written); wait "
                                       f"for it or remove {lock} if that process is gone", shown) from None
            elif other.is_alive():
                raise OutputLocked(f"in use by {other.describe()}; wait for it or remove {lock} if that process "
                                   "is gone", shown) from None
            _break(lock, other)
            continue
        except OSError as exc:
            raise CryocliError(f"cannot create the lock file {lock} ({exc.strerror})", shown) from None
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(payload)
                handle.flush()
                os.fsync(handle.fileno())
        except BaseException:
            try:
                lock.unlink()
            except OSError:
                pass
            raise
        return
    raise OutputLocked(f"could not take the lock {lock}: other runs keep replacing it", shown)


def _wait_readable(lock: Path) -> LockHolder | None:
    for _ in range(5):
        holder = read_lock(lock)
        if holder is not None or not lock.exists():
            return holder
        time.sleep(0.05)
    return None


def _age(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return 0.0


def _break(lock: Path, judged: LockHolder | None) -> None:
    """Take a stale lock out of the way without removing a fresh one another process just created."""
    aside = lock.with_name(f"{lock.name}.stale-{os.getpid()}-{time.monotonic_ns()}")
    try:
        os.rename(lock, aside)
    except FileNotFoundError:
        return  # someone else broke it first
    if read_lock(aside) != judged:
        # Between our reading and the rename, another process replaced the stale lock with its own: put it back.
        try:
            os.link(aside, lock)
        except OSError:
            pass
    try:
        aside.unlink()
    except OSError:
        pass


def _make_parents(folder: Path) -> list[Path]:
    missing: list[Path] = []
    p = folder
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    if missing:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CryocliError(f"cannot create the folder ({exc.strerror})", folder) from None
    return missing  # deepest first


def _remove_empty(created: list[Path]) -> None:
    for p in created:
        try:
            p.rmdir()
        except OSError:
            break


def _parse_time(text: str) -> float | None:
    try:
        return datetime.fromisoformat(text).timestamp()
    except (ValueError, TypeError):
        return None


def _process_start_time(pid: int) -> float | None:
    """Start time (epoch seconds) of a process, from /proc on Linux; None elsewhere."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        ticks = int(stat[stat.rindex(")") + 2:].split()[19])
        with open("/proc/stat", encoding="ascii") as handle:
            boot = next(int(line.split()[1]) for line in handle if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None
