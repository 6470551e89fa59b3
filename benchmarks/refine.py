"""Compare `refine --method relion` and `--method sparse-tv` on the same simulated data, or on set_3j9g.

Simulated (default): 4AKE at box 48, 2.5 A/px, shifts sigma 2 px, several SNRs; both methods start from the
40-A low-passed ground truth. Prints gold-standard resolution (FSC 0.143 of the half maps), resolution
against the ground truth (FSC 0.5 after alignment), median pose error after global alignment, time per
iteration and peak memory (CUDA peak when on a GPU, else the process's peak RSS).

    .venv/bin/python benchmarks/refine.py --particles 2000 --snr 0.1,0.05 --device cpu
    .venv/bin/python benchmarks/refine.py --set-3j9g        # RELION's set_3j9g refine inputs, both methods

set_3j9g: the same particles (refine/refine_input.star) and reference (refine/ref_lp40.mrc) RELION's
auto-refine used (particle diameter 280 A, offset range 5, step 2); pose errors against noisy/noisy.star,
also modulo the pseudo-C6 about z (see ../shared/data/relion/set_3j9g/README.md).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SET = SHARED / "data" / "relion" / "set_3j9g"


def _cli(*args: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "cryocli", "--json", *args], capture_output=True, text=True, cwd=REPO)
    if out.returncode != 0:
        raise SystemExit(out.stderr or out.stdout)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _peak_memory_mb(device: str) -> float:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def _pose_errors(est_star: Path, truth_star: Path, cn: int = 1) -> tuple[float, float]:
    """Median rotation error after global alignment, and (cn > 1) the error modulo Cn about z (degrees)."""
    from cryocli.analysis.align import align_pose_sets, pose_errors_after_alignment
    from cryocli.geometry.rotations import euler_to_matrix, geodesic_distance
    from cryocli.io.star import read_star

    est_t, tru_t = read_star(est_star), read_star(truth_star)
    names = tru_t.particles["rlnImageName"].astype(str).tolist()
    order = {n: i for i, n in enumerate(names)}
    idx = np.array([order[n] for n in est_t.particles["rlnImageName"].astype(str)])
    ea, ta = est_t.euler_angles, tru_t.euler_angles[idx]
    est = euler_to_matrix(*[torch.as_tensor(ea[:, i]) for i in range(3)])
    tru = euler_to_matrix(*[torch.as_tensor(ta[:, i]) for i in range(3)])
    err = float(np.median(pose_errors_after_alignment(est, tru)))
    if cn <= 1:
        return err, err
    from cryocli.analysis.align import FLIP

    al = align_pose_sets(est, tru)
    a = (FLIP.to(est) @ est @ FLIP.to(est)) if al.flipped else est
    aligned = a @ torch.as_tensor(al.rotation).T
    best = None
    for k in range(cn):
        ang = torch.deg2rad(torch.tensor(360.0 * k / cn, dtype=torch.float64))
        c, s = float(torch.cos(ang)), float(torch.sin(ang))
        rz = torch.tensor([[c, s, 0.0], [-s, c, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
        d = torch.rad2deg(geodesic_distance(aligned, tru @ rz))
        best = d if best is None else torch.minimum(best, d)
    return err, float(best.median())


def simulated(args: argparse.Namespace) -> None:
    from cryocli.imaging.filters import lowpass_filter
    from cryocli.io.mrc import read_map, write_map

    rows = []
    for snr in [float(s) for s in args.snr.split(",")]:
        with tempfile.TemporaryDirectory() as tmp:
            sim = Path(tmp) / "sim"
            _cli("--quiet", "simulate", str(REPO / "cryocli" / "data" / "4ake_adk_open.pdb"), "-o", str(sim),
                 "-n", str(args.particles), "--box", "48", "--apix", "2.5", "--snr", str(snr), "--shift-sigma", "2")
            gt = read_map(sim / "ground_truth.mrc")
            ref = Path(tmp) / "ref.mrc"
            write_map(ref, lowpass_filter(gt.data, gt.voxel_size, 40).numpy().astype(np.float32), gt.voxel_size, "lp")
            for method in ("relion", "sparse-tv"):
                t0 = time.perf_counter()
                s = _cli("--device", args.device, "refine", str(sim / "particles.star"), "--ref", str(ref),
                         "--method", method, "-o", str(Path(tmp) / method), "--ground-truth",
                         str(sim / "ground_truth.mrc"), "--max-iter", str(args.max_iter),
                         "--particle-diameter", "80")
                wall = time.perf_counter() - t0
                rows.append((snr, method, s["gold_standard_resolution_A"], s["res_vs_truth_fsc05_A"],
                             s.get("final_rot_err_median", float("nan")), s["iterations"],
                             s["seconds"] / max(1, s["iterations"]), _peak_memory_mb(args.device), wall))
    print(f"{'SNR':>5} {'method':>10} {'gold 0.143 A':>12} {'truth 0.5 A':>11} {'pose err deg':>12} "
          f"{'iters':>5} {'s/iter':>7} {'peak MB':>8}")
    for r in rows:
        print(f"{r[0]:5.2f} {r[1]:>10} {r[2]:12.2f} {r[3]:11.2f} {r[4]:12.2f} {r[5]:5d} {r[6]:7.1f} {r[7]:8.0f}")


def set_3j9g(args: argparse.Namespace) -> None:
    rows = []
    for method in ("relion", "sparse-tv"):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / method
            s = _cli("--device", args.device, "refine", str(SET / "refine" / "refine_input.star"), "--ref",
                     str(SET / "refine" / "ref_lp40.mrc"), "--method", method, "-o", str(out),
                     "--ground-truth", str(SET / "map.mrc"), "--particle-diameter", "280", "--offset-range", "5",
                     "--offset-step", "2", "--max-iter", str(args.max_iter))
            err, err6 = _pose_errors(out / "particles.star", SET / "noisy" / "noisy.star", cn=6)
            rows.append((method, s["gold_standard_resolution_A"], s["res_vs_truth_fsc05_A"], err, err6,
                         s["iterations"], s["seconds"]))
    print(f"{'method':>10} {'gold 0.143 A':>12} {'truth 0.5 A':>11} {'pose err':>9} {'mod C6':>7} {'iters':>5} "
          f"{'seconds':>8}")
    print(f"{'RELION 5':>10} {11.7333:12.2f} {10.83:11.2f} {60.36:9.2f} {0.81:7.2f} {14:5d} {696.2:8.1f}")
    for r in rows:
        print(f"{r[0]:>10} {r[1]:12.2f} {r[2]:11.2f} {r[3]:9.2f} {r[4]:7.2f} {r[5]:5d} {r[6]:8.1f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--particles", type=int, default=2000)
    p.add_argument("--snr", default="0.1,0.05")
    p.add_argument("--max-iter", type=int, default=10)
    p.add_argument("--device", default="auto")
    p.add_argument("--set-3j9g", action="store_true", help="run on RELION's set_3j9g refine inputs instead")
    args = p.parse_args()
    set_3j9g(args) if args.set_3j9g else simulated(args)


if __name__ == "__main__":
    main()
