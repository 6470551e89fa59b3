"""Reading the next batch of particles from disk while the device computes on this one.

Streamed engines alternate between reading a batch from the memory-mapped stacks (page faults, a copy per
image, CPU work) and computing on it (on the GPU, or on the CPU's other threads). A background thread that
reads batch k+1 while the caller computes on batch k hides the read, as PyTorch's ``DataLoader`` does with
its prefetching workers; one thread is enough (one batch ahead), and it reads only: the device work stays on
the caller's thread, so results are those of reading in turn. Reads of one :class:`~cryocli.io.dataset.ParticleStack`
are serialised by its lock, so a read-ahead and a direct read never share a stack handle at once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

Item = TypeVar("Item")
Read = TypeVar("Read")


def read_ahead(read: Callable[[Item], Read], items: Iterable[Item]) -> Iterator[tuple[Item, Read]]:
    """``(item, read(item))`` for each of ``items`` in order, ``read(next item)`` running in a background thread
    while the caller works on this one. An exception in ``read`` is raised where its item is yielded."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="cryocli-read-ahead") as pool:
        pending: tuple[Item, Future[Read]] | None = None
        for item in items:
            upcoming = (item, pool.submit(read, item))
            if pending is not None:
                yield pending[0], pending[1].result()
            pending = upcoming
        if pending is not None:
            yield pending[0], pending[1].result()
