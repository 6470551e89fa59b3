"""Score and time `abinitio --method cryospin`, `--method cryo2ssnet` or `--method sagd` on standard simulated 4AKE
datasets; print a table.

    python benchmarks/abinitio.py [--cases 64:10000 128:50000] [--device cpu|cuda] [--snr 0.1]
                                  [--epochs 20] [--switch-epoch 7] [--grid-orders 2 -1]
                                  [--encoder-channels 64,128,256,512] [--encoder-lr 1e-4] [--batch-size 64]
    python benchmarks/abinitio.py --method cryo2ssnet [--cases 64:10000] [--steps 7500]
                                  [--variants default no-dhbs no-gd denoiser-off denoiser-all cryospin]
                                  [--apix 0.8 --snr 0.1]
    python benchmarks/abinitio.py --method sagd [--cases 64:10000] [--max-iter 5000] [--march-iter 2000]
                                  [--variants default no-is cryospin] [--shift-sigma 2] [--particle-diameter 76]

sagd rows: ``default`` (shipped settings, importance sampling on) and ``no-is`` (every quadrature point evaluated:
the same method without the speed-up), plus ``uniform`` / ``car`` (the other priors), ``cryospin`` and
``cryo2ssnet`` (those methods' shipped defaults, cryo2ssnet with ``--steps``, on the same simulated set) when asked. Extra columns:
seconds until the map first reaches FSC 0.5 vs truth at 2x Nyquist (scored at the end of every pass, the scoring's
own time included), and the fraction of quadrature points evaluated over the last pass. ``--max-iter`` and
``--march-iter`` set the iteration counts (the shipped 5,000 and 2,000 by default); the simulated particles get
in-plane shifts of ``--shift-sigma`` A (2 by default for sagd, whose shift prior expects a few A).

cryo2ssnet rows (the paper's ablations, on the same simulated set): ``default`` (shipped settings, the denoiser
for the first third of stage 1), ``no-dhbs`` (end to end only, twice the steps, 5.2), ``no-gd`` (no gradient
polishing, 5.3), ``adam`` (Adam polishing, 5.3), ``denoiser-off`` / ``denoiser-all`` (the denoiser never / for
all of stage 1, 5.4), ``paper-start`` (the beam always starts at the encoder's pose and stage 2 starts on
schedule), ``free-density`` (the decoder's voxels unconstrained, as in the paper) and ``cryospin`` (cryospin's
defaults on the same data, for comparison). ``--steps`` sets cryo2ssnet's step budget (the paper's 7,500 by default).

Default cases: 64 px with 10,000 particles on the CPU, plus 128 px with 50,000 particles when CUDA is
present. The pixel size scales with the box so the field of view is fixed (115.2 A). Each case runs
in its own subprocess, so the peak memory it reports (CPU: peak resident set; CUDA: peak allocated)
is its own. Columns: resolution at FSC 0.5 of the map against the ground truth after alignment
(rotation, shift, hand), mean and median rotation error after the best global rotation (hand flip
allowed), mean seconds per epoch of each stage (auto-encoding / auto-decoding), total engine time,
peak memory, and the share of particles whose starting pose at the switch came from the candidate grid
rather than an encoder head. Every case runs twice by default: with cryocli's candidate grid (grid order 2,
the default) and without it (grid order -1, the paper's heads alone), and the shares of particles won by the
grid and by the most used head are printed per auto-encoding epoch, so that one sees which part finds the
poses at which scale. The engine runs with the given settings; defaults are cryospin's.
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

FIELD_OF_VIEW_A = 115.2


def cryo2ssnet_setup(variant: str, args: argparse.Namespace, device: torch.device) -> tuple[object, object]:
    """Engine and config of a cryo2ssnet benchmark row."""
    from cryocli.engines.abinitio.cryo2ssnet import Cryo2SSNetConfig, Cryo2SSNetEngine
    from cryocli.engines.abinitio.cryospin import CryoSpinConfig, CryoSpinEngine

    if variant == "cryospin":
        return CryoSpinEngine(device), CryoSpinConfig(seed=args.seed, particle_diameter=args.particle_diameter)
    base = {"steps": args.steps, "seed": args.seed, "particle_diameter": args.particle_diameter}
    changes = {"default": {}, "no-dhbs": {"dhbs": False, "steps": 2 * args.steps}, "no-gd": {"gd_steps": 0},
               "adam": {"gd": "adam"}, "denoiser-off": {"denoiser_fraction": 0.0},
               "denoiser-all": {"denoiser_fraction": 1.0},
               "paper-start": {"beam_start": "encoder", "switch_waits": False},
               "free-density": {"constrain_density": False}}
    if variant not in changes:
        raise SystemExit(f"unknown cryo2ssnet variant {variant}; choose from {', '.join([*changes, 'cryospin'])}")
    return Cryo2SSNetEngine(device), Cryo2SSNetConfig(**{**base, **changes[variant]})


def sagd_setup(variant: str, args: argparse.Namespace, device: torch.device) -> tuple[object, object]:
    """Engine and config of a sagd benchmark row (``cryospin`` / ``cryo2ssnet``: that method's defaults on the same
    data, so that one table compares the methods)."""
    from cryocli.engines.abinitio.sagd import SAGDConfig, SAGDEngine

    if variant in ("cryospin", "cryo2ssnet"):
        return cryo2ssnet_setup("cryospin" if variant == "cryospin" else "default", args, device)
    changes = {"default": {}, "no-is": {"importance_sampling": False}, "uniform": {"prior": "uniform"},
               "car": {"prior": "car"}}
    if variant not in changes:
        raise SystemExit(f"unknown sagd variant {variant}; choose from {', '.join([*changes, 'cryospin', 'cryo2ssnet'])}")
    return SAGDEngine(device), SAGDConfig(max_iter=args.max_iter, march_iter=args.march_iter, seed=args.seed,
                                          particle_diameter=args.particle_diameter, **changes[variant])


def run_case(box: int, particles: int, args: argparse.Namespace) -> dict:
    from cryocli.analysis.ground_truth import GroundTruth
    from cryocli.engines.abinitio.cryospin import CryoSpinConfig, CryoSpinEngine
    from cryocli.engines.halves import run_engine
    from cryocli.engines.progress import Reporter
    from cryocli.imaging.simulate import SimulationConfig, draw_geometry, simulate_dataset
    from cryocli.io.dataset import ParticleStack
    from cryocli.io.models import demo_model_path
    from cryocli.io.mrc import read_map
    from cryocli.io.star import read_star
    from cryocli.io.volumes import load_volume

    dev = torch.device(args.device)
    apix = args.apix if args.apix else FIELD_OF_VIEW_A / box
    shift_sigma = args.shift_sigma if args.shift_sigma is not None else (2.0 if args.method == "sagd" else 0.0)
    sim = SimulationConfig(n_particles=particles, box=box, apix=apix, snr=args.snr, seed=1, shift_sigma=shift_sigma)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "sim"
        volume, _ = load_volume(demo_model_path(), box, apix)
        simulate_dataset(volume, draw_geometry(sim), sim, out, device=dev)
        stack = ParticleStack(read_star(out / "particles.star"))
        truth_map = read_map(out / "ground_truth.mrc")
        every = 1 if args.method == "sagd" else 10**9
        truth = GroundTruth(torch.tensor(truth_map.data), truth_map.voxel_size, stack.rotations, every=every)
        engine: object
        if args.method == "sagd":
            engine, config = sagd_setup(args.variant, args, dev)
        elif args.method == "cryo2ssnet":
            engine, config = cryo2ssnet_setup(args.variant, args, dev)
        else:
            engine = CryoSpinEngine(dev)
            config = CryoSpinConfig(epochs=args.epochs, switch_epoch=args.switch_epoch, batch_size=args.batch_size,
                                    encoder_channels=tuple(args.encoder_channels) if args.encoder_channels else None,
                                    encoder_lr=args.encoder_lr, grid_order=args.grid_order,
                                    seed=args.seed)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        reporter = Reporter(ground_truth=truth)
        t0 = time.perf_counter()
        result = run_engine(engine, stack, config, reporter)  # type: ignore[arg-type]
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        total = time.perf_counter() - t0
        scores = truth.score_map(result.volume, result.voxel_size)
        poses = truth.score_poses(result.rotations, result.particle_rows)
    elapsed = reporter.elapsed_s
    per_epoch = np.diff([0.0, *elapsed])
    stages = [row.get("stage", "") for row in reporter.history]
    if "cryo2ssnet" in (args.method, args.variant):
        stages = ["encode" if s in ("search", "switch") else "decode" if s == "end-to-end" else s for s in stages]
    enc = [t for t, s in zip(per_epoch, stages, strict=False) if s == "encode"]
    enc = enc[1:] or enc  # the first epoch also reads and prepares the particles
    dec = [t for t, s in zip(per_epoch, stages, strict=False) if s == "decode"]
    peak = peak_memory_mb(dev)
    reach = [t for t, row in zip(elapsed, reporter.history, strict=False)
             if row.get("res_fsc05_A", float("inf")) <= 4 * apix]
    last_pass = [row for row in reporter.history if row.get("pass") == reporter.history[-1].get("pass")]
    sagd_row = args.method == "sagd" and args.variant not in ("cryospin", "cryo2ssnet")
    fraction = float(np.mean([row["fraction_evaluated"] for row in last_pass])) if sagd_row else float("nan")
    return {"variant": args.variant if args.method in ("cryo2ssnet", "sagd") else f"grid {args.grid_order}",
            "s_to_2nyquist": reach[0] if reach else float("nan"), "fraction_evaluated": fraction,
            "grid_order": args.grid_order, "box": box, "particles": particles, "apix": apix, "device": str(dev), "epochs": args.epochs,
            "res_fsc05_A": scores["res_fsc05"], "nyquist_A": 2 * apix, "rot_err_mean": poses["rot_err_mean"],
            "rot_err_median": poses["rot_err_median"], "s_per_epoch_encode": float(np.mean(enc)) if enc else float("nan"),
            "s_per_epoch_decode": float(np.mean(dec)) if dec else float("nan"), "total_s": total,
            "peak_memory_GB": peak * 2**20 / 1e9,
            "grid_share": result.method_summary.get("grid_share", float("nan")),
            "history": [{k: row.get(k) for k in ("epoch", "stage", "loss", "rot_err_median", "grid_win_fraction",
                                                 "head_usage_max", "encoder_vs_search_deg", "res_fsc05_A", "rremse",
                                                 "fraction_evaluated")}
                        for row in reporter.history if args.method != "sagd" or "res_fsc05_A" in row]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", default=None, help="BOX:PARTICLES pairs")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--snr", type=float, default=0.1)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--switch-epoch", type=int, default=7)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--encoder-channels", type=lambda s: [int(v) for v in s.split(",")], default=None,
                   help="default: cryospin's (scaled with box and device)")
    p.add_argument("--encoder-lr", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--grid-orders", type=int, nargs="+", default=[2, -1],
                   help="cryospin --grid-order values to compare (-1: the paper's heads alone)")
    p.add_argument("--grid-order", type=int, default=2, help=argparse.SUPPRESS)
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    p.add_argument("--method", default="cryospin", choices=("cryospin", "cryo2ssnet", "sagd"))
    p.add_argument("--max-iter", type=int, default=5000, help="sagd: iterations at most")
    p.add_argument("--march-iter", type=int, default=2000, help="sagd: iterations of the frequency march")
    p.add_argument("--shift-sigma", type=float, default=None, help="simulated shifts in A (sagd: 2, else 0)")
    p.add_argument("--steps", type=int, default=7500, help="cryo2ssnet: step budget")
    p.add_argument("--variants", nargs="+", default=None,
                   help="cryo2ssnet rows (default: default no-dhbs no-gd denoiser-off denoiser-all paper-start cryospin); "
                   "sagd rows (default: default no-is)")
    p.add_argument("--variant", default="default", help=argparse.SUPPRESS)
    p.add_argument("--apix", type=float, default=None, help="pixel size in A (default: 115.2 A / box)")
    p.add_argument("--particle-diameter", type=float, default=None,
                   help="sagd and cryo2ssnet rows (and cryospin beside them): the particle diameter in A, as a "
                   "user gives RELION's mask diameter (default: the engines' 0.8 x the box)")
    args = p.parse_args()
    if args.one:
        box, particles = (int(v) for v in args.one.split(":"))
        print(json.dumps(run_case(box, particles, args)))
        return
    cases = args.cases or (["64:10000", "128:50000"] if args.device.startswith("cuda") else ["64:10000"])
    passthrough = _without(_without(_without(sys.argv[1:], "--cases"), "--grid-orders"), "--variants")
    if args.method in ("cryo2ssnet", "sagd"):
        variants = args.variants or (["default", "no-is"] if args.method == "sagd" else
                                     ["default", "no-dhbs", "no-gd", "denoiser-off", "denoiser-all", "paper-start",
                                      "cryospin"])
        rows = [run_isolated([__file__, *passthrough, "--variant", variant, "--one", case])
                for case in cases for variant in variants]
    else:
        rows = [run_isolated([__file__, *passthrough, "--grid-order", str(order), "--one", case])
                for case in cases for order in args.grid_orders]
    print_table(rows, [("run", "variant", ""), ("box", "box", "d"), ("particles", "particles", "d"), ("A/px", "apix", ".2f"),
                       ("FSC0.5 A", "res_fsc05_A", ".2f"), ("Nyq A", "nyquist_A", ".2f"),
                       ("rot mean", "rot_err_mean", ".2f"), ("rot med", "rot_err_median", ".2f"),
                       ("s/ep enc", "s_per_epoch_encode", ".2f"), ("s/ep dec", "s_per_epoch_decode", ".2f"),
                       ("total s", "total_s", ".1f"), ("peak GB", "peak_memory_GB", ".2f"), ("grid share", "grid_share", ".3f"),
                       ("s to 2xNyq", "s_to_2nyquist", ".1f"), ("frac eval", "fraction_evaluated", ".4f"),
                       ("device", "device", "")])
    if args.method == "sagd":
        base = {r["box"]: r["total_s"] for r in rows if r["variant"] == "no-is"}
        for r in rows:
            if r["variant"] == "default" and r["box"] in base:
                print(f"importance sampling speed-up ({r['box']} px): {base[r['box']] / r['total_s']:.2f}x in total time "
                      f"(fraction of quadrature points evaluated over the last pass {r['fraction_evaluated']:.4f})")
            trace = ", ".join(f"{h['epoch']}:{h['res_fsc05_A']:.1f}A" + (f"/{h['rremse']:.4f}" if h.get("rremse") else "")
                              for h in r["history"])
            print(f"FSC 0.5 vs truth / held-out RREMSE by iteration ({r['box']} px, {r['variant']}): {trace}")
        return
    for r in rows:
        tag = f"({r['box']} px, {r['variant']})"
        trace = ", ".join(f"{h['epoch']}:{h['rot_err_median']:.1f}" for h in r["history"])
        print(f"median rotation error by epoch {tag}: {trace}")
        agreement = [h for h in r["history"] if h.get("encoder_vs_search_deg") is not None]
        if agreement:
            print(f"encoder vs search, median deg by epoch {tag}: "
                  + ", ".join(f"{h['epoch']}:{h['encoder_vs_search_deg']:.1f}" for h in agreement))
        encoding = [h for h in r["history"] if h.get("grid_win_fraction") is not None]
        wins = ", ".join(f"{h['epoch']}:{h['grid_win_fraction']:.3f}" for h in encoding)
        print(f"share of particles won by the candidate grid, auto-encoding epochs {tag}: {wins}")
        heads = ", ".join(f"{h['epoch']}:{h['head_usage_max']:.3f}" for h in encoding)
        print(f"share won by the most used encoder head, auto-encoding epochs {tag}: {heads}")


def _without(argv: list[str], option: str) -> list[str]:
    """``argv`` without ``option`` and the values that follow it."""
    if option not in argv:
        return argv
    i = argv.index(option)
    j = i + 1
    while j < len(argv) and not (argv[j].startswith("--") or (argv[j].startswith("-") and not argv[j][1:2].isdigit())):
        j += 1
    return argv[:i] + argv[j:]


if __name__ == "__main__":
    main()
