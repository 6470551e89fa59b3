"""How `reconstruct`, `refine` and `abinitio` scale: peak memory against the particle count, throughput on 1 and 2
ranks.

    .venv/bin/python benchmarks/scale.py [--counts 10000,40000,160000] [--refine-counts 1000,4000,16000]
                                         [--abinitio-counts 1000,4000,16000] [--box 32] [--ranks 1,2]
                                         [--commands reconstruct,refine,abinitio]

For each particle count, simulates that many 4AKE particles (CTF, SNR 0.1, random poses) with `cryocli simulate`,
then times, as one process and under `torchrun --nproc_per_node=R` (gloo on the CPU, nccl on GPUs), each in its own
process tree: `cryocli reconstruct --halves`, and one iteration of `cryocli refine --method relion --preload no`
from the ground truth (low-passed to 40 A by refine; a global search over the whole HEALPix order-2 grid, the
costliest iteration of a run), and one epoch of `cryocli abinitio --method cryospin --preload no` (an auto-encoding
epoch: encoder, candidate grid and decoder steps over every particle; `--abinitio-method sagd`: one pass over the
minibatches and the final poses; `cryo2ssnet`: the denoiser's training and one epoch). Peak memory is the largest
resident set of the process and its descendants (one rank's, under torchrun), from ``wait4``; on a GPU, peak GPU MB is
the command's own figure from its ``--json`` summary (``peak_device_memory_MB``: PyTorch's peak allocation, rank
0's). Memory should not grow with the particle count: the images stream from the memory-mapped stack in batches and
reconstruct reads the STAR file in chunks; refine and abinitio hold the STAR table and the per-particle state (poses,
CTF parameters), which grow with it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import print_table

REPO = Path(__file__).resolve().parents[1]
COLUMNS = [("command", "command", "s"),
           ("particles", "particles", "d"), ("box", "box", "d"), ("ranks", "ranks", "d"), ("time s", "seconds", ".2f"),
           ("particles/s", "throughput", ".0f"), ("peak RSS MB", "peak_mb", ".0f"),
           ("vs smallest", "memory_ratio", ".2f"), ("peak GPU MB", "peak_gpu_mb", ".0f")]


def run_measured(argv: list[str], cwd: Path) -> tuple[float, float, float]:
    """Run ``argv`` (a cryocli command with ``--json``); return (wall seconds, peak resident set in MiB of it and its
    descendants, the peak GPU memory in MiB its summary reports, NaN on the CPU)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode()
    if os.waitstatus_to_exitcode(status) != 0:
        print(stderr, file=sys.stderr)
        raise SystemExit(f"benchmark case failed: {' '.join(argv)}")
    summary = json.loads(stdout.strip().splitlines()[-1])
    return seconds, usage.ru_maxrss / 1024.0, float(summary.get("peak_device_memory_MB", "nan"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--counts", default="10000,40000,160000", help="particle counts for reconstruct")
    p.add_argument("--refine-counts", default="1000,4000,16000", help="particle counts for refine (one iteration)")
    p.add_argument("--abinitio-counts", default="1000,4000,16000",
                   help="particle counts for abinitio (cryospin, one epoch)")
    p.add_argument("--abinitio-method", default="cryospin", help="abinitio method: cryospin, sagd or cryo2ssnet")
    p.add_argument("--commands", default="reconstruct,refine,abinitio", help="which commands to measure")
    p.add_argument("--box", type=int, default=32)
    p.add_argument("--apix", type=float, default=2.4, help="pixel size of the simulated particles (A)")
    p.add_argument("--ranks", default="1,2", help="process counts to run reconstruct with (comma-separated)")
    args = p.parse_args()
    rows = []
    commands = args.commands.split(",")
    counts = {"reconstruct": [int(c) for c in args.counts.split(",")],
              "refine": [int(c) for c in args.refine_counts.split(",")],
              "abinitio": [int(c) for c in args.abinitio_counts.split(",")]}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for count in sorted({c for command in commands for c in counts[command]}):
            sim = work / f"sim{count}"
            subprocess.run([sys.executable, "-m", "cryocli", "--quiet", "simulate",
                            str(REPO / "cryocli" / "data" / "4ake_adk_open.pdb"), "-o", str(sim), "-n", str(count),
                            "--box", str(args.box), "--apix", str(args.apix), "--snr", "0.1"], check=True, cwd=work,
                           env={**os.environ, "PYTHONPATH": str(REPO)})
            for command in commands:
                if count not in counts[command]:
                    continue
                for ranks in [int(r) for r in args.ranks.split(",")]:
                    out = work / f"{command}{count}_{ranks}"
                    if command == "reconstruct":
                        argv = ["reconstruct", str(sim / "particles.star"), "-o", f"{out}.mrc", "--halves"]
                    elif command == "refine":
                        argv = ["refine", str(sim / "particles.star"), "--ref", str(sim / "ground_truth.mrc"), "-o",
                                str(out), "--max-iter", "1", "--preload", "no"]
                    else:
                        argv = ["abinitio", str(sim / "particles.star"), "--method", args.abinitio_method, "-o",
                                str(out), "--epochs", "1", "--preload", "no"]
                    launcher = [sys.executable] if ranks == 1 else [
                        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
                    seconds, peak, peak_gpu = run_measured([*launcher, "-m", "cryocli", "--json", *argv], work)
                    label = command if command != "abinitio" else f"abinitio {args.abinitio_method}"
                    rows.append({"command": label, "particles": count, "box": args.box, "ranks": ranks,
                                 "seconds": seconds, "throughput": count / seconds, "peak_mb": peak,
                                 "peak_gpu_mb": peak_gpu})
                    print(rows[-1], file=sys.stderr)
    for row in rows:
        base = min((r for r in rows if r["ranks"] == row["ranks"] and r["command"] == row["command"]),
                   key=lambda r: r["particles"])
        row["memory_ratio"] = row["peak_mb"] / base["peak_mb"]
    print_table(rows, COLUMNS)


if __name__ == "__main__":
    main()
