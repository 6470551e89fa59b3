"""Time `simulate` and `reconstruct` on standard simulated 4AKE datasets and score the reconstruction.

    python benchmarks/classical.py [--sizes 64 128] [--particles 5000] [--device cpu|cuda] [--apix 1.8]

Each box size runs in its own subprocess so the peak memory it reports (CPU: peak resident set of the
process; CUDA: peak allocated) belongs to that size alone. Columns: particles/s of simulation (project,
CTF, shift, noise, write stacks and STAR), particles/s of direct Fourier reconstruction (read stacks,
FFT, shift, CTF, insert; both halves and their union in one pass), the FSC 0.5 resolution of the reconstruction
against the ground truth, and peak memory. The pixel size scales with the box so the field of view is
fixed (115 A): 64 px at 1.8 A, 128 px at 0.9 A.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from harness import peak_memory_mb, print_table, run_isolated

from cryocli.analysis.fsc import fsc_curve, threshold_crossing
from cryocli.engines.common.particles_reconstruct import reconstruct_sets
from cryocli.imaging.simulate import SimulationConfig, draw_geometry, simulate_dataset
from cryocli.io.dataset import ParticleStack
from cryocli.io.models import demo_model_path
from cryocli.io.mrc import read_map
from cryocli.io.star import read_star
from cryocli.io.volumes import load_volume

FIELD_OF_VIEW_A = 115.2


def run_case(box: int, particles: int, device: str, snr: float) -> dict:
    dev = torch.device(device)
    apix = FIELD_OF_VIEW_A / box
    config = SimulationConfig(n_particles=particles, box=box, apix=apix, snr=snr, shift_sigma=2.0, seed=1)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "sim"
        t0 = time.perf_counter()
        volume, _ = load_volume(demo_model_path(), box, apix)
        simulate_dataset(volume, draw_geometry(config), config, out, device=dev)
        t_sim = time.perf_counter() - t0
        stack = ParticleStack(read_star(out / "particles.star"))
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        subsets = stack.random_subset.numpy()
        *halves, rec = reconstruct_sets(stack, [np.nonzero(subsets == s)[0] for s in (1, 2)], device=dev,
                                        batch_size=512, with_union=True)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t_rec = time.perf_counter() - t0
        truth = read_map(out / "ground_truth.mrc").data
        res_truth = threshold_crossing(fsc_curve(rec.cpu().numpy(), truth), box, apix, 0.5).resolution
        res_halves = threshold_crossing(fsc_curve(halves[0].cpu().numpy(), halves[1].cpu().numpy()), box, apix,
                                        0.143).resolution
    peak = peak_memory_mb(dev)
    return {"box": box, "apix": apix, "particles": particles, "simulate_s": t_sim,
            "simulate_per_s": particles / t_sim, "reconstruct_s": t_rec, "reconstruct_per_s": particles / t_rec,
            "fsc05_vs_truth_A": res_truth, "half_fsc0143_A": res_halves, "peak_MB": peak, "device": str(dev)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--particles", type=int, default=5000)
    parser.add_argument("--snr", type=float, default=0.1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--case", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case is not None:
        print(json.dumps(run_case(args.case, args.particles, args.device, args.snr)))
        return
    rows = [run_isolated([__file__, "--case", str(box), "--particles", str(args.particles), "--device", args.device,
                          "--snr", str(args.snr)]) for box in args.sizes]
    print_table(rows, [("box", "box", "d"), ("A/px", "apix", ".2f"), ("particles", "particles", "d"),
                       ("simulate p/s", "simulate_per_s", ".0f"), ("reconstruct p/s", "reconstruct_per_s", ".0f"),
                       ("FSC0.5 vs truth (A)", "fsc05_vs_truth_A", ".2f"),
                       ("halves FSC0.143 (A)", "half_fsc0143_A", ".2f"), ("peak MB", "peak_MB", ".0f"),
                       ("device", "device", "")])

if __name__ == "__main__":
    main()
