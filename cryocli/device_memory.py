"""What a run took of its GPU's memory, for summaries and benchmarks."""

from __future__ import annotations

import torch


def peak_device_memory_mb(device: torch.device) -> float | None:
    """The most memory PyTorch's allocator held for tensors on ``device`` in this process so far (MiB), or ``None``
    off CUDA (on the CPU the process's peak resident set is the figure, which the operating system reports)."""
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
