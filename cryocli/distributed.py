"""Data-parallel runs under ``torchrun``: which rank this process is, its share of the particles, and sums.

``torchrun --nproc_per_node=N -m cryocli reconstruct ...`` starts N processes with ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK`` set; :func:`setup` joins them in one ``torch.distributed`` process group (nccl on CUDA, one
rank per GPU picked by ``LOCAL_RANK``; gloo on the CPU). Each rank reads only its share of the particles
(:func:`shard`: every ``WORLD_SIZE``-th particle from its rank, so the shares are disjoint, cover the set and
do not depend on anything but the particle order), accumulates its backprojection, and
:func:`all_reduce_sum` adds the accumulators of all ranks in place, so every rank ends with the sums one
process would have made (to float32 round-off: the order of the additions differs). Rank 0 alone writes
outputs and prints. Without torchrun (``WORLD_SIZE`` unset or 1) every function here is a no-op and the run is
the one-process run.

Collectives give up after ``CRYOCLI_COLLECTIVE_TIMEOUT`` seconds (default 600), so a rank that died without
torchrun noticing does not leave the others waiting for ever; within one node torchrun itself stops the other
ranks as soon as one exits with an error.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

#: Seconds a collective waits for the other ranks before the run fails (``CRYOCLI_COLLECTIVE_TIMEOUT``).
DEFAULT_COLLECTIVE_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class Ranks:
    """This process's place in the run: ``rank`` of ``world_size`` processes, ``local_rank`` on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Whether this process writes outputs and prints (rank 0)."""
        return self.rank == 0


def launched() -> bool:
    """Whether this process was started by torchrun (or another launcher) with more than one rank."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def current() -> Ranks:
    """The ranks of the process group this process joined (``Ranks()`` when it is alone)."""
    if not (dist.is_available() and dist.is_initialized()):
        return Ranks()
    return Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def collective_timeout() -> timedelta:
    """How long a collective waits for the other ranks (``CRYOCLI_COLLECTIVE_TIMEOUT`` seconds)."""
    return timedelta(seconds=float(os.environ.get("CRYOCLI_COLLECTIVE_TIMEOUT", DEFAULT_COLLECTIVE_TIMEOUT_S)))


def setup(device: torch.device) -> tuple[Ranks, torch.device]:
    """Join the process group of a torchrun launch and return this rank and its device.

    On CUDA each rank takes ``cuda:LOCAL_RANK`` (nccl); on the CPU the ranks share the machine (gloo). Without a
    launch (one rank) nothing is joined and ``device`` is returned unchanged.
    """
    if not launched():
        return Ranks(), device
    if not dist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if device.type == "cuda":
            device = torch.device("cuda", local)
            torch.cuda.set_device(device)
        bind_world_defaults_before_joining()
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=collective_timeout())
    return current(), device


def bind_world_defaults_before_joining() -> None:
    """Import ``torch.distributed.nn`` before the process group exists.

    Its collectives take ``group=group.WORLD`` as a default argument, bound when the module is first imported, and
    torch._dynamo imports it (the first ``torch.optim`` optimiser does: cryospin, cryo2ssnet, the denoiser). Imported
    after ``init_process_group``, those defaults hold the world group, so ``destroy_process_group`` cannot free it:
    gloo's worker threads outlive :func:`teardown`, and one still releasing a collective's tensors when the
    interpreter shuts down aborts the process ("terminate called without an active exception", SIGABRT). That
    ended rank 1 of cryo2ssnet on 2 torchrun ranks in 4 of 122 runs beside a busy core. Imported before, the
    defaults are ``None``.
    """
    import torch.distributed.nn  # noqa: F401


def teardown() -> None:
    """Leave the process group (at the end of a run)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard(indices: np.ndarray, ranks: Ranks | None = None) -> np.ndarray:
    """This rank's share of ``indices`` ``(N,)``: every ``world_size``-th one from position ``rank``."""
    ranks = current() if ranks is None else ranks
    return np.asarray(indices)[ranks.rank::ranks.world_size]


def held_positions(ids: Tensor, ranks: Ranks | None = None) -> tuple[Tensor, Tensor]:
    """Which of the particles ``ids`` ``(B,)`` (0-based, of the whole set) this rank holds under :func:`shard`, and
    where in its share: ``(mask (B,) bool, positions (M,) long)``; particle ``g`` is at ``g // world_size`` of rank
    ``g % world_size``."""
    ranks = current() if ranks is None else ranks
    mask = ids % ranks.world_size == ranks.rank
    return mask, ids[mask] // ranks.world_size


def rank_seed(seed: int, ranks: Ranks | None = None) -> int:
    """A seed for this rank's own draws (its particles' order, its share of a batch): ``seed`` alone, a different
    one per rank under torchrun."""
    ranks = current() if ranks is None else ranks
    return seed if ranks.world_size == 1 else seed * 4099 + ranks.rank


def _several() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    """Wait until every rank is here (a no-op for one rank)."""
    if _several():
        dist.barrier()


def is_collective_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective that failed because another rank stopped or timed out (gloo's and nccl's
    errors), under a torchrun launch."""
    if not launched() or not isinstance(exc, RuntimeError):
        return False
    text = str(exc)
    return isinstance(exc, getattr(dist, "DistError", ())) or "gloo" in text or "NCCL" in text


def collective_device() -> torch.device:
    """Where the process group's collectives run: this rank's GPU under nccl, the CPU under gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Add ``tensor`` (contiguous) over all ranks, in place; returns it. A no-op for one rank. A tensor on another
    device than the collectives' (host statistics under nccl) goes through a copy there."""
    if _several():
        where = collective_device()
        work = tensor if tensor.device == where else tensor.to(where)
        # complex sums as their real and imaginary parts (a view: the sum lands in ``work``)
        dist.all_reduce(torch.view_as_real(work) if work.is_complex() else work, op=dist.ReduceOp.SUM)
        if work is not tensor:
            tensor.copy_(work)
    return tensor


def sum_over_ranks(values: list[float], device: torch.device | str | None = None) -> list[float]:
    """Sums of a few scalars ``values`` over all ranks (float64; one collective, on the collectives' device whatever
    ``device`` says). The values unchanged for one rank."""
    if not _several():
        return [float(v) for v in values]
    t = torch.tensor(values, dtype=torch.float64, device=collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return [float(v) for v in t.cpu()]


def gather_shards(local: Tensor, total: int) -> Tensor:
    """The whole ``(total, ...)`` per-particle tensor on every rank, from each rank's :func:`shard` of it.

    local: this rank's rows ``(len(shard), ...)``, rows ``rank, rank + world_size, ...`` of the whole. For one
    rank ``local`` itself.
    """
    ranks = current()
    if ranks.world_size == 1:
        return local
    w = ranks.world_size
    longest = -(-total // w)
    padded = torch.zeros((longest, *local.shape[1:]), dtype=local.dtype, device=collective_device())
    padded[:len(local)] = local
    parts = [torch.empty_like(padded) for _ in range(w)]
    dist.all_gather(parts, padded)
    whole = local.new_empty((total, *local.shape[1:]))
    for k, part in enumerate(parts):
        whole[k::w] = part[:len(range(k, total, w))].to(local.device)
    return whole


def broadcast_object(obj: object) -> object:
    """Rank 0's ``obj`` (any picklable value) on every rank; ``obj`` itself for one rank."""
    if not _several():
        return obj
    box = [obj if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def average_gradients(parameters: Iterable[Tensor]) -> None:
    """Replace every gradient of ``parameters`` by its mean over the ranks, in one collective (what
    ``DistributedDataParallel`` does during the backward pass; here after it). Parameters without a gradient are
    skipped: which ones have none is decided by the code path, the same on every rank. A no-op for one rank."""
    if not _several():
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1).to(torch.float32) for g in grads]).to(collective_device())
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def broadcast_module(module: torch.nn.Module) -> None:
    """Rank 0's parameters and buffers of ``module`` on every rank, in place (as DDP does when it wraps a
    module), so that all ranks start from the same random initialisation. A no-op for one rank."""
    if not _several():
        return
    where = collective_device()
    for tensor in module.state_dict().values():
        work = tensor if tensor.device == where else tensor.to(where)
        dist.broadcast(work, src=0)
        if work is not tensor:
            tensor.copy_(work)


def average_buffers(module: torch.nn.Module) -> None:
    """The floating-point buffers of ``module`` (batch-norm running statistics) averaged over the ranks, in
    place, so that every rank evaluates the same network. A no-op for one rank."""
    if not _several():
        return
    for buffer in module.buffers():
        if buffer.is_floating_point():
            all_reduce_sum(buffer)
            buffer /= dist.get_world_size()
