"""Time the projector: central-slice extraction, insertion, and the backward pass, for 64 and 128 px boxes.

    python benchmarks/projector.py [--sizes 64 128] [--slices 1024] [--device cpu|cuda] [--repeats 3]

Each box size runs in its own subprocess so that the peak memory it reports (CUDA: peak allocated;
CPU: growth of the process's peak resident set during the timed work) belongs to that size alone.
Columns: slices/s of the forward projection (``Projector.project``), seconds to insert the slices with
weights (``BackProjector.insert``) and with the paper's 27-point Gaussian kernel (``--kernel gaussian-insert``,
``GaussianKernelBackProjector.insert``), seconds to apply the Gaussian on the grid to the trilinear data and weights
(``--kernel gaussian``, sparse-tv's default, :func:`kernel_on_grid`), seconds of the backward pass of ``sum |project(V, A)|^2`` with
respect to both the Fourier volume and the rotations, seconds to sum the accumulators over the point
group O (24 operators, :func:`cryocli.imaging.point_group.symmetrise_accumulators`), and the peak memory.
Times are the best of ``--repeats`` runs after one warm-up.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch
from harness import print_table, run_isolated

from cryocli.engines.common.kernel_backprojection import GaussianKernelBackProjector, kernel_on_grid
from cryocli.geometry.rotations import euler_to_matrix
from cryocli.geometry.symmetry import symmetry_operators
from cryocli.imaging.point_group import symmetrise_accumulators
from cryocli.imaging.projector import BackProjector, Projector, grid_radius, project_volume_ft


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_time(fn, device: torch.device, repeats: int) -> float:
    fn()
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def measure(n: int, slices: int, device: torch.device, repeats: int) -> dict:
    """Timings for one box size ``n`` (pixels) and ``slices`` random poses."""
    gen = torch.Generator().manual_seed(0)
    volume = torch.randn((n, n, n), generator=gen).to(device)
    angles = torch.rand((slices, 3), generator=gen) * torch.tensor([360.0, 180.0, 360.0])
    rotations = euler_to_matrix(angles[:, 0], angles[:, 1], angles[:, 2]).float().to(device)
    projector = Projector(volume)
    spectra = projector.project(rotations)
    weights = torch.ones(spectra.shape, device=device)
    backprojector = BackProjector(n, device=device)
    kernel = GaussianKernelBackProjector(n, device=device)
    ops = symmetry_operators("O", torch.float32, device)
    leaf = projector.volume_ft.clone().requires_grad_(True)
    rot_leaf = rotations.clone().requires_grad_(True)

    def backward() -> None:
        leaf.grad, rot_leaf.grad = None, None
        (project_volume_ft(leaf, rot_leaf, n).abs() ** 2).sum().backward()

    _sync(device)
    base_rss = _peak_rss_mb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base_cuda = torch.cuda.memory_allocated(device)
    forward_s = _best_time(lambda: projector.project(rotations), device, repeats)
    insert_s = _best_time(lambda: backprojector.insert(spectra, weights, rotations), device, repeats)
    kernel_s = _best_time(lambda: kernel.insert(spectra, weights, rotations), device, repeats)
    backward_s = _best_time(backward, device, repeats)
    data, weight = backprojector.symmetrised()
    radius = grid_radius(n, backprojector.pad, backprojector.r_max)
    symmetrise_s = _best_time(lambda: symmetrise_accumulators(data, weight, ops, radius), device, repeats)
    grid_kernel_s = _best_time(lambda: (kernel_on_grid(data), kernel_on_grid(weight)), device, repeats)
    if device.type == "cuda":
        peak_mb = (torch.cuda.max_memory_allocated(device) - base_cuda) / 2**20
    else:
        peak_mb = _peak_rss_mb() - base_rss
    return {"n": n, "slices": slices, "device": str(device), "threads": torch.get_num_threads(),
            "forward_slices_per_s": slices / forward_s, "forward_s": forward_s, "insert_s": insert_s,
            "kernel_insert_s": kernel_s, "grid_kernel_s": grid_kernel_s, "backward_s": backward_s,
            "symmetrise_o_s": symmetrise_s, "peak_mb": peak_mb}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128], help="box sizes in pixels")
    parser.add_argument("--slices", type=int, default=1024, help="slices per call")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per operation (best is kept)")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.worker is not None:
        print(json.dumps(measure(args.worker, args.slices, device, args.repeats)))
        return
    rows = [run_isolated([__file__, "--worker", str(n), "--slices", str(args.slices), "--device", args.device,
                          "--repeats", str(args.repeats)]) for n in args.sizes]
    print(f"projector benchmark: {args.slices} slices, device {args.device}, torch {torch.__version__}, "
          f"{rows[0]['threads']} threads")
    print_table(rows, [("box", "n", "d"), ("forward slices/s", "forward_slices_per_s", ".0f"),
                       ("insert (s)", "insert_s", ".3f"), ("Gaussian insert (s)", "kernel_insert_s", ".3f"),
                       ("Gaussian on grid (s)", "grid_kernel_s", ".3f"),
                       ("backward (s)", "backward_s", ".3f"), ("sum over O (s)", "symmetrise_o_s", ".3f"),
                       ("peak memory (MB)", "peak_mb", ".0f")])


if __name__ == "__main__":
    main()
