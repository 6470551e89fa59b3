"""How `reconstruct` scales: peak memory against the particle count, and throughput on 1 and 2 ranks.

    .venv/bin/python benchmarks/scale.py [--counts 10000,40000,160000] [--box 32] [--ranks 1,2]

For each particle count, simulates that many 4AKE particles (CTF, SNR 0.1, random poses) with `cryocli
simulate`, then times `cryocli reconstruct --halves` on them as one process and under `torchrun
--nproc_per_node=R` (gloo on the CPU, nccl on GPUs), each in its own process tree. Peak memory is the largest
resident set of the process and its descendants (one rank's, under torchrun), from ``wait4``; on a GPU the
command's own peak is not visible from outside, so the column is host memory. Memory should not grow with
the particle count (the images stream from the memory-mapped stack in batches); the STAR table itself does.
Only `reconstruct` runs data-parallel so far; the engines are issue 15's next steps.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import print_table

REPO = Path(__file__).resolve().parents[1]
COLUMNS = [("particles", "particles", "d"), ("box", "box", "d"), ("ranks", "ranks", "d"), ("time s", "seconds", ".2f"),
           ("particles/s", "throughput", ".0f"), ("peak RSS MB", "peak_mb", ".0f"),
           ("vs smallest", "memory_ratio", ".2f")]


def run_measured(argv: list[str], cwd: Path) -> tuple[float, float]:
    """Run ``argv``; return (wall seconds, peak resident set in MiB of it and its descendants)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    stderr = proc.stderr.read().decode() if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        print(stderr, file=sys.stderr)
        raise SystemExit(f"benchmark case failed: {' '.join(argv)}")
    return seconds, usage.ru_maxrss / 1024.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--counts", default="10000,40000,160000", help="particle counts (comma-separated)")
    p.add_argument("--box", type=int, default=32)
    p.add_argument("--apix", type=float, default=2.4, help="pixel size of the simulated particles (A)")
    p.add_argument("--ranks", default="1,2", help="process counts to run reconstruct with (comma-separated)")
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for count in [int(c) for c in args.counts.split(",")]:
            sim = work / f"sim{count}"
            subprocess.run([sys.executable, "-m", "cryocli", "--quiet", "simulate",
                            str(REPO / "cryocli" / "data" / "4ake_adk_open.pdb"), "-o", str(sim), "-n", str(count),
                            "--box", str(args.box), "--apix", str(args.apix), "--snr", "0.1"], check=True, cwd=work,
                           env={**os.environ, "PYTHONPATH": str(REPO)})
            for ranks in [int(r) for r in args.ranks.split(",")]:
                out = work / f"map{count}_{ranks}.mrc"
                command = ["-m", "cryocli", "--quiet", "reconstruct", str(sim / "particles.star"), "-o", str(out),
                           "--halves"]
                launcher = [sys.executable] if ranks == 1 else [
                    sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
                seconds, peak = run_measured([*launcher, *command], work)
                rows.append({"particles": count, "box": args.box, "ranks": ranks, "seconds": seconds,
                             "throughput": count / seconds, "peak_mb": peak})
                print(rows[-1], file=sys.stderr)
    for row in rows:
        base = min((r for r in rows if r["ranks"] == row["ranks"]), key=lambda r: r["particles"])
        row["memory_ratio"] = row["peak_mb"] / base["peak_mb"]
    print_table(rows, COLUMNS)


if __name__ == "__main__":
    main()
