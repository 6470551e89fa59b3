"""What every benchmark script shares: one case per subprocess, peak memory, and the printed table.

Each case runs in its own Python process so its peak memory belongs to it alone; the case prints one
JSON object as its last stdout line.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

import torch


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process in MiB: CUDA peak allocated, or the CPU peak resident set (Linux: KiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_isolated(argv: Sequence[str]) -> dict[str, Any]:
    """Run ``python ARGV`` and return the JSON object on its last stdout line; exit with its stderr on failure."""
    out = subprocess.run([sys.executable, *argv], capture_output=True, text=True)
    if out.returncode != 0:
        print(out.stderr, file=sys.stderr)
        raise SystemExit(f"benchmark case failed: {' '.join(argv)}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]]) -> None:
    """Print ``rows`` as a fixed-width table; ``columns`` are (header, key, format spec such as ".2f")."""
    widths = [max(len(h), 8) for h, _, _ in columns]
    print(" ".join(f"{h:>{w}}" for (h, _, _), w in zip(columns, widths, strict=True)))
    for row in rows:
        print(" ".join(f"{format(row[k], spec):>{w}}" for (_, k, spec), w in zip(columns, widths, strict=True)))
