"""Compare `refine --method relion` and `--method sparse-tv` on the same simulated data, or on set_3j9g.

    .venv/bin/python benchmarks/refine.py [--particles 2000] [--snr 0.1,0.05,0.2] [--box 64] [--apix 2.5]
                                          [--max-iter 25] [--device cpu|cuda] [--methods relion,sparse-tv]
                                          [--max-significant N]
    .venv/bin/python benchmarks/refine.py --set-3j9g [--max-iter 25]
    .venv/bin/python benchmarks/refine.py --relion [--particles 1500]   # also RELION's auto-refine (relion_refine_mpi on PATH)

Simulated (default): 4AKE at box 64, 2.5 A/px, shifts sigma 2 px, one dataset per SNR; the STAR file given
to refine has no poses and no origins (as RELION's refine input), both methods start from the ground
truth low-passed to 40 A. Columns: gold-standard resolution (FSC 0.143 of the unregularised half
reconstructions at the final poses), the same for the written half maps (half1/2_unfil.mrc: the MAP
maps for relion, the sparse + TV solutions for sparse-tv), resolution of the final map against the ground
truth (FSC 0.5 after alignment), median rotation error after the best global rotation, median shift
error, iterations, seconds per iteration, total seconds and peak memory (CPU: peak resident set of the
case's own process; CUDA: peak allocated). Each case runs in its own subprocess.
``--methods`` picks the cryocli methods; ``--max-significant N`` overrides the engine's cap on significant samples
per particle (300; RELION's auto-refine has none), the setting behind the README's table of that cap.

``--relion`` adds a row per SNR for RELION's own 3D auto-refine (``relion_refine_mpi`` with 1 leader + 2 followers,
``--j 1``: the command RELION 5 ran on set_3j9g, see ../shared/data/relion/set_3j9g/README.md, with this set's
diameter), on the same STAR file and reference, scored by the same code from its run_data.star, run_class001.mrc
and half maps. On Debian, ``apt-get install relion`` gives RELION 3.1.3, which does not reproduce RELION 5: with RELION 5's
exact set_3j9g command it stays at 35.2 A (RELION 5: 11.7 A), and it fails on the simulated sets at every SNR, so
its rows stand for RELION only with a RELION 5 build on PATH. RELION 5.0.1 builds for the CPU from its source with
``cmake .. -DGUI=OFF -DALTCPU=OFF -DCUDA=OFF -DFETCH_WEIGHTS=OFF -DTORCH_OFF=ON && make refine_mpi`` (Debian:
libfftw3-dev, libopenmpi-dev, libtiff-dev); such a build gives 12.24 A gold standard and 10.51 A against the truth
on set_3j9g with RELION 5's command (RELION 5's own run: 11.73 / 10.83 A).

set_3j9g: the particles (refine/refine_input.star) and reference (refine/ref_lp40.mrc) RELION's
auto-refine used (particle diameter 280 A, offset range 5 px, step 2 px); rotation errors against
noisy/noisy.star without alignment (same frame: the reference is the true map low-passed), plainly and
modulo the map's pseudo-C6 about z, as ../shared/data/relion/set_3j9g/README.md reports RELION's, and
modulo C6 after removing the small global turn of the refined map's frame ("C6 aligned"; RELION's own
poses: 0.57 degrees).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from harness import peak_memory_mb, print_table, run_isolated

REPO = Path(__file__).resolve().parents[1]
SET = REPO.parent / "shared" / "data" / "relion" / "set_3j9g"
METHODS = ("relion", "sparse-tv")
COLUMNS = [("SNR", "snr", ".2f"), ("method", "method", ""), ("gold A", "gold_A", ".2f"),
           ("halfmaps A", "halfmaps_A", ".2f"), ("postproc A", "postprocess_A", ".2f"),
           ("pp vs truth A", "pp_truth_A", ".2f"), ("truth 0.5 A", "truth_A", ".2f"), ("rot err", "rot_err", ".2f"),
           ("shift err A", "shift_err_A", ".2f"), ("iters", "iterations", "d"), ("conv", "converged", ""),
           ("s/iter", "s_per_iter", ".1f"),
           ("total s", "seconds", ".0f"), ("peak MB", "peak_mb", ".0f")]
COLUMNS_3J9G = [("method", "method", ""), ("gold A", "gold_A", ".2f"), ("halfmaps A", "halfmaps_A", ".2f"),
                ("postproc A", "postprocess_A", ".2f"), ("pp vs truth A", "pp_truth_A", ".2f"),
                ("truth 0.5 A", "truth_A", ".2f"), ("rot err", "rot_err", ".2f"), ("mod C6", "rot_err_c6", ".2f"),
                ("C6 aligned", "rot_err_c6_aligned", ".2f"),
                ("mod C6 >20", "c6_over20", "d"), ("shift err A", "shift_err_A", ".2f"), ("iters", "iterations", "d"),
                ("conv", "converged", ""),
                ("total s", "seconds", ".0f"), ("peak MB", "peak_mb", ".0f")]


def _rotations(table) -> torch.Tensor:
    from cryocli.geometry.rotations import euler_to_matrix

    a = torch.as_tensor(table.euler_angles)
    return euler_to_matrix(a[:, 0], a[:, 1], a[:, 2])


def strip_poses(star: Path, out: Path) -> None:
    """Write ``star`` without rlnAngleRot/Tilt/Psi and rlnOriginX/YAngst (what refine must find)."""
    from cryocli.io.star import read_star, write_star

    table = read_star(star)
    drop = [c for c in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst",
                        "rlnOriginX", "rlnOriginY") if c in table.particles.columns]
    table.particles = table.particles.drop(columns=drop)
    write_star(table, out)


def run_case(args: argparse.Namespace) -> dict:
    """One refine run in this process; scores against the truth STAR and map; returns the table row."""
    from cryocli.analysis.align import pose_errors_after_alignment
    from cryocli.analysis.fsc import fsc_curve, threshold_crossing
    from cryocli.analysis.ground_truth import GroundTruth
    from cryocli.engines.halves import run_engine
    from cryocli.engines.progress import Reporter
    from cryocli.engines.protocol import get_engine
    from cryocli.engines.refine.scoring import rotation_errors_modulo_cn, rotation_errors_modulo_cn_aligned
    from cryocli.engines.runner import postprocess_check
    from cryocli.io.dataset import ParticleStack
    from cryocli.io.mrc import read_map
    from cryocli.io.star import read_star

    dev = torch.device(args.device)
    engine = get_engine(args.method, "refine", device=dev)
    extra = {} if args.max_significant is None else {"max_significant": args.max_significant}
    if args.kernel and args.method == "sparse-tv":
        extra["kernel"] = args.kernel
    cfg = engine.config_class(ref=args.ref, epochs=args.max_iter, particle_diameter=args.diameter,
                              offset_range=args.offset_range, offset_step=args.offset_step, seed=0, **extra)
    stack = ParticleStack(read_star(args.particles))
    truth_map = read_map(args.truth_map)
    truth = GroundTruth(torch.tensor(truth_map.data), truth_map.voxel_size, None, every=10**9)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    reporter = Reporter()
    t0 = time.perf_counter()
    result = run_engine(engine, stack, cfg, reporter)
    seconds = time.perf_counter() - t0
    n, apix = int(result.volume.shape[-1]), result.voxel_size
    halves = fsc_curve(result.half_volumes[0], result.half_volumes[1])
    truth_table = read_star(args.truth_star)
    names = truth_table.particles["rlnImageName"].astype(str).to_numpy()
    order = {name: i for i, name in enumerate(names)}
    rows = np.array([order[s] for s in stack.table.particles["rlnImageName"].astype(str)])
    true_rot = _rotations(truth_table)[rows].double()
    est = result.rotations.double()
    shift_err = np.linalg.norm(result.origins_angstrom.double().numpy() - truth_table.origins_angstrom[rows], axis=1)
    label = f"{args.method} ({args.kernel})" if args.kernel and args.method == "sparse-tv" else args.method
    row = {"method": label, "gold_A": float(result.resolution_A),
           "halfmaps_A": threshold_crossing(halves, n, apix, 0.143).resolution,
           "truth_A": truth.score_map(result.volume, apix)["res_fsc05"],
           "rot_err": float(np.median(pose_errors_after_alignment(est, true_rot))),
           "shift_err_A": float(np.median(shift_err)), "iterations": result.iterations,
           "converged": "yes" if result.converged else "no", "seconds": seconds,
           "s_per_iter": seconds / max(1, result.iterations),
           "peak_mb": peak_memory_mb(dev)}
    check = postprocess_check(result, truth)
    row.update({"postprocess_A": check["postprocess_resolution_A"], "pp_truth_A": check["postprocessed_vs_truth_fsc05_A"]})
    if args.cn > 1:
        err, copy = rotation_errors_modulo_cn(est, true_rot, args.cn)
        plain, _ = rotation_errors_modulo_cn(est, true_rot, 1)
        aligned = rotation_errors_modulo_cn_aligned(est, true_rot, args.cn)
        row.update({"rot_err": float(np.median(plain)), "rot_err_c6": float(np.median(err)),
                    "rot_err_c6_aligned": float(np.median(aligned)),
                    "c6_over20": int((err > 20).sum()), "c6_copies": np.bincount(copy, minlength=args.cn).tolist()})
    return row


def relion_case(particles: Path, ref: Path, truth_map_path: Path, truth_star: Path, diameter: float,
                out: Path, args: argparse.Namespace) -> dict:
    """RELION's 3D auto-refine on ``particles`` from ``ref`` (run from the cwd, which the STAR's image paths are
    relative to), scored as :func:`run_case` scores cryocli's runs."""
    import shutil
    import subprocess

    from cryocli.analysis.align import pose_errors_after_alignment
    from cryocli.analysis.fsc import fsc_curve, threshold_crossing
    from cryocli.analysis.ground_truth import GroundTruth
    from cryocli.engines.result import Reconstruction
    from cryocli.engines.runner import postprocess_check
    from cryocli.io.mrc import read_map
    from cryocli.io.star import read_star
    from cryocli.io.summary import read_star_blocks

    if shutil.which("relion_refine_mpi") is None or shutil.which("mpirun") is None:
        raise SystemExit("--relion needs relion_refine_mpi and mpirun on PATH (Debian: apt-get install relion)")
    apix = read_map(ref).voxel_size
    out.mkdir(parents=True, exist_ok=True)
    cmd = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-n", "3", "relion_refine_mpi", "--o", str(out / "run"),
           "--auto_refine", "--split_random_halves", "--i", str(particles), "--ref", str(ref), "--ini_high", "40",
           "--ctf", "--particle_diameter", str(diameter), "--flatten_solvent", "--zero_mask", "--healpix_order", "2",
           "--auto_local_healpix_order", "4", "--offset_range", str(args.offset_range), "--offset_step",
           str(args.offset_step), "--sym", "C1", "--low_resol_join_halves", "40", "--norm", "--scale", "--pad", "2",
           "--j", "1", "--pool", "3", "--dont_combine_weights_via_disc", "--random_seed", "1"]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode != 0 or not (out / "run_data.star").exists():
        print(done.stdout[-3000:], done.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"relion_refine_mpi failed on {particles}")
    table = read_star(out / "run_data.star")
    truth_table = read_star(truth_star)
    order = {name: i for i, name in enumerate(truth_table.particles["rlnImageName"].astype(str))}
    rows = np.array([order[s] for s in table.particles["rlnImageName"].astype(str)])
    est, true_rot = _rotations(table).double(), _rotations(truth_table)[rows].double()
    full = read_map(out / "run_class001.mrc")
    halves = [torch.tensor(read_map(out / f"run_half{i}_class001_unfil.mrc").data) for i in (1, 2)]
    truth_map = read_map(truth_map_path)
    truth = GroundTruth(torch.tensor(truth_map.data), truth_map.voxel_size, None, every=10**9)
    n = int(full.data.shape[-1])
    model = read_star_blocks(out / "run_model.star", (out / "run_model.star").read_text())["model_general"]
    assert isinstance(model, dict)
    result = Reconstruction(volume=torch.tensor(full.data), voxel_size=apix, rotations=est.float(),
                            origins_angstrom=torch.zeros(len(rows), 2), half_volumes=(halves[0], halves[1]))
    check = postprocess_check(result, truth)
    shift_err = np.linalg.norm(table.origins_angstrom - truth_table.origins_angstrom[rows], axis=1)
    # run_it000 is the start; the converged final iteration is written without a number (run_optimiser.star), and
    # is counted as the set_3j9g row counts RELION 5's (run_it001..014 + final = 15).
    iterations = len(list(out.glob("run_it*_optimiser.star"))) - 1 + int((out / "run_optimiser.star").exists())
    return {"method": "RELION", "gold_A": float(model["rlnCurrentResolution"]),
            "halfmaps_A": threshold_crossing(fsc_curve(halves[0], halves[1]), n, apix, 0.143).resolution,
            "truth_A": truth.score_map(torch.tensor(full.data), apix)["res_fsc05"],
            "rot_err": float(np.median(pose_errors_after_alignment(est, true_rot))),
            "shift_err_A": float(np.median(shift_err)), "iterations": iterations, "converged": "yes",
            "seconds": seconds, "s_per_iter": seconds / max(1, iterations), "peak_mb": float("nan"),
            "postprocess_A": check["postprocess_resolution_A"], "pp_truth_A": check["postprocessed_vs_truth_fsc05_A"]}


def _case_argv(method: str, particles: Path, ref: Path, truth_map: Path, truth_star: Path, diameter: float,
               args: argparse.Namespace, cn: int = 1) -> list[str]:
    return [__file__, "--case", "--method", method, "--particles", str(particles), "--ref", str(ref),
            "--truth-map", str(truth_map), "--truth-star", str(truth_star), "--diameter", str(diameter),
            "--max-iter", str(args.max_iter), "--device", args.device, "--cn", str(cn),
            "--offset-range", str(args.offset_range), "--offset-step", str(args.offset_step),
            *([] if args.max_significant is None else ["--max-significant", str(args.max_significant)]),
            *([] if not args.kernel else ["--kernel", args.kernel])]


def simulated(args: argparse.Namespace) -> None:
    from cryocli.imaging.filters import lowpass_filter
    from cryocli.io.mrc import read_map, write_map

    rows = []
    for snr in [float(s) for s in args.snr.split(",")]:
        with tempfile.TemporaryDirectory() as tmp:
            sim = Path(tmp) / "sim"
            run_isolated(["-m", "cryocli", "--json", "--quiet", "simulate", str(REPO / "cryocli" / "data" /
                          "4ake_adk_open.pdb"), "-o", str(sim), "-n", str(int(args.particles)), "--box", str(args.box),
                          "--apix", str(args.apix), "--snr", str(snr), "--shift-sigma", "2"])
            strip_poses(sim / "particles.star", sim / "refine_input.star")
            gt = read_map(sim / "ground_truth.mrc")
            ref = Path(tmp) / "ref_lp40.mrc"
            write_map(ref, lowpass_filter(gt.data, gt.voxel_size, 40).numpy().astype(np.float32), gt.voxel_size, "lp40")
            for method in args.methods.split(","):
                row = run_isolated(_case_argv(method, sim / "refine_input.star", ref, sim / "ground_truth.mrc",
                                              sim / "particles.star", 80.0, args))
                rows.append({"snr": snr, **row})
                print(json.dumps(rows[-1]), file=sys.stderr)
            if args.relion:
                row = relion_case(sim / "refine_input.star", ref, sim / "ground_truth.mrc", sim / "particles.star",
                                  80.0, Path(tmp) / "relion", args)
                rows.append({"snr": snr, **row})
                print(json.dumps(rows[-1]), file=sys.stderr)
    print_table(rows, COLUMNS)


def relion_postprocess_row() -> dict:
    """RELION's own half maps (refine/run_half1/2_class001_unfil.mrc) through the same postprocess check as
    cryocli's runs: `cryocli postprocess --auto-mask` resolution and that map against the truth (FSC 0.5)."""
    from cryocli.analysis.ground_truth import GroundTruth
    from cryocli.engines.result import Reconstruction
    from cryocli.engines.runner import postprocess_check
    from cryocli.io.mrc import read_map

    halves = [read_map(SET / "refine" / f"run_half{i}_class001_unfil.mrc") for i in (1, 2)]
    full = read_map(SET / "refine" / "run_class001.mrc")
    truth_map = read_map(SET / "map.mrc")
    truth = GroundTruth(torch.tensor(truth_map.data), truth_map.voxel_size, None, every=10**9)
    result = Reconstruction(volume=torch.tensor(full.data), voxel_size=full.voxel_size, rotations=torch.eye(3)[None],
                            origins_angstrom=torch.zeros(1, 2),
                            half_volumes=(torch.tensor(halves[0].data), torch.tensor(halves[1].data)))
    check = postprocess_check(result, truth)
    return {"postprocess_A": check["postprocess_resolution_A"], "pp_truth_A": check["postprocessed_vs_truth_fsc05_A"]}


def set_3j9g(args: argparse.Namespace) -> None:
    # RELION's figures from ../shared/data/relion/set_3j9g/README.md (its run on this machine's 2 cores); its
    # half maps go through the same postprocess check as cryocli's.
    rows = [{"method": "RELION 5", "gold_A": 11.7333, "halfmaps_A": 11.7333, "truth_A": 10.83, "rot_err": 60.36,
             "rot_err_c6": 0.81, "rot_err_c6_aligned": 0.57, "c6_over20": 3, "shift_err_A": 0.71, "iterations": 15,
             "converged": "yes", "seconds": 696.2, "peak_mb": float("nan"), **relion_postprocess_row()}]
    for method in args.methods.split(","):
        row = run_isolated(_case_argv(method, SET / "refine" / "refine_input.star", SET / "refine" / "ref_lp40.mrc",
                                      SET / "map.mrc", SET / "noisy" / "noisy.star", 280.0, args, cn=6))
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    print_table(rows, COLUMNS_3J9G)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--particles", default="2000", help="simulated: particle count; --case: the STAR file")
    p.add_argument("--snr", default="0.1,0.05,0.2")
    p.add_argument("--box", type=int, default=64)
    p.add_argument("--apix", type=float, default=2.5)
    p.add_argument("--max-iter", type=int, default=25)
    p.add_argument("--offset-range", type=float, default=5.0)
    p.add_argument("--offset-step", type=float, default=2.0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--methods", default=",".join(METHODS), help="cryocli refine methods to run (comma-separated)")
    p.add_argument("--max-significant", type=int, default=None,
                   help="cryocli: cap on significant samples per particle (default: the engine's)")
    p.add_argument("--kernel", default=None, help="sparse-tv's backprojection kernel [its default]")
    p.add_argument("--set-3j9g", action="store_true", help="run on RELION's set_3j9g refine inputs instead")
    p.add_argument("--relion", action="store_true", help="simulated: also run RELION's auto-refine (relion_refine_mpi)")
    p.add_argument("--case", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--ref", help=argparse.SUPPRESS)
    p.add_argument("--truth-map", help=argparse.SUPPRESS)
    p.add_argument("--truth-star", help=argparse.SUPPRESS)
    p.add_argument("--diameter", type=float, default=80.0, help=argparse.SUPPRESS)
    p.add_argument("--cn", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.case:
        print(json.dumps(run_case(args)))
    elif args.set_3j9g:
        set_3j9g(args)
    else:
        simulated(args)


if __name__ == "__main__":
    main()
