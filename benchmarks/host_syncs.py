"""Where an engine turns device tensors into host values: the calls that make a GPU run wait for the device.

    .venv/bin/python benchmarks/host_syncs.py [--particles 600] [--box 32] [--top 15]
                                              [--commands refine,cryospin,cryo2ssnet,sagd,reconstruct]

On a GPU each of ``Tensor.item``, ``.tolist``, ``.cpu``, ``.numpy``, ``float(t)``, ``int(t)``, ``bool(t)`` (an ``if``
on a tensor) and indexing with a tensor turned into a Python int waits for every kernel queued before it. The
device is not needed to find them: this script counts those calls on the CPU, by the line of cryocli that made
them, while a small simulated run of each command goes (in this process, with the shipped defaults), and prints
the lines called at least once per two batch reads (``ParticleStack.images`` calls, counted in a first run),
the ones a per-batch loop must not have (the issue's "no host
synchronisation inside per-batch loops"). Lines called a fixed number of times per iteration or epoch (a
checkpoint, a summary, the M-step's statistics) cost nothing that grows with the data and are not listed.
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

#: Tensor methods that copy a value to the host (a device synchronisation on a GPU).
SYNCING = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__")


class SyncCounter:
    """Counts the calls of :data:`SYNCING` on tensors by the cryocli line (``file:line``) that made them."""

    def __init__(self) -> None:
        self.counts: collections.Counter[str] = collections.Counter()
        self._originals = {name: getattr(torch.Tensor, name) for name in SYNCING}
        self._active = False

    def _caller(self) -> str | None:
        """The cryocli line that made the call itself; calls made inside torch (an optimiser's step counter,
        which torch keeps on the host for this reason) are torch's business."""
        frame = traceback.extract_stack(limit=3)[0]
        if "/cryocli/" in frame.filename:
            return f"{Path(frame.filename).relative_to(REPO)}:{frame.lineno}"
        return None

    def __enter__(self) -> SyncCounter:
        def wrap(name: str, original):
            def counted(tensor, *args, **kwargs):
                if self._active:
                    self._active = False  # calls made while counting are not counted
                    try:
                        where = self._caller()
                        if where is not None:
                            self.counts[f"{where} ({name.strip('_')})"] += 1
                    finally:
                        self._active = True
                return original(tensor, *args, **kwargs)
            return counted

        for name, original in self._originals.items():
            setattr(torch.Tensor, name, wrap(name, original))
        self._active = True
        return self

    def __exit__(self, *exc: object) -> None:
        self._active = False
        for name, original in self._originals.items():
            setattr(torch.Tensor, name, original)


def run_command(argv: list[str]) -> None:
    from typer.testing import CliRunner

    from cryocli.cli.app import app

    result = CliRunner().invoke(app, ["--quiet", *argv], catch_exceptions=False)
    if result.exit_code != 0:
        raise SystemExit(f"{' '.join(argv)} failed: {result.output}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--particles", type=int, default=600)
    p.add_argument("--box", type=int, default=32)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--commands", default="reconstruct,refine,cryospin,cryo2ssnet,sagd")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        run_command(["simulate", str(REPO / "cryocli" / "data" / "4ake_adk_open.pdb"), "-o", str(work / "sim"),
                     "-n", str(args.particles), "--box", str(args.box), "--apix", "2.4", "--snr", "0.1"])
        star, truth = str(work / "sim" / "particles.star"), str(work / "sim" / "ground_truth.mrc")
        batch = 64
        cases = {
            "reconstruct": (["reconstruct", star, "-o", str(work / "rec.mrc"), "--halves", "--batch-size", str(batch)],
                            2 * -(-args.particles // batch)),
            "refine": (["refine", star, "--ref", truth, "-o", str(work / "ref"), "--max-iter", "2",
                        "--preload", "no"], None),
            "cryospin": (["abinitio", star, "--method", "cryospin", "-o", str(work / "cs"), "--epochs", "2",
                          "--preload", "no"], None),
            "cryo2ssnet": (["abinitio", star, "--method", "cryo2ssnet", "-o", str(work / "c2"), "--steps", "60",
                            "--preload", "no"], None),
            "sagd": (["abinitio", star, "--method", "sagd", "-o", str(work / "sagd"), "--max-iter", "30",
                      "--preload", "no"], None),
        }
        for name in args.commands.split(","):
            argv, _ = cases[name]
            batches = _count_batches(name, argv)
            with SyncCounter() as counter:
                run_command(argv)
            per_batch = [(where, n) for where, n in counter.counts.most_common() if n >= batches / 2]
            print(f"\n{name}: {sum(counter.counts.values())} host syncs in all, {batches} batch reads; lines called "
                  f"at least once per two batch reads:")
            for where, n in per_batch[:args.top]:
                print(f"  {n:8d}  {n / batches:6.2f}/batch  {where}")
            if not per_batch:
                print("  none")


def _count_batches(name: str, argv: list[str]) -> int:
    """The number of particle batches the run reads, counted from ParticleStack.images calls in a dry run."""
    from cryocli.io.dataset import ParticleStack

    original = ParticleStack.images
    calls = [0]

    def counted(self, indices):
        calls[0] += 1
        return original(self, indices)

    ParticleStack.images = counted  # type: ignore[method-assign]
    try:
        out = Path(argv[argv.index("-o") + 1])
        dry = [*argv]
        dry[dry.index("-o") + 1] = str(out.with_name(out.name + "_count" + out.suffix))
        run_command(dry)
    finally:
        ParticleStack.images = original  # type: ignore[method-assign]
    return max(calls[0], 1)


if __name__ == "__main__":
    main()
