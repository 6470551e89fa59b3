"""`cryocli abinitio PARTICLES.star --method NAME -o RUN/`: ab initio reconstruction (poses and map from scratch)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from cryocli.cli.common import angpix_option, guarded
from cryocli.cli.engine_command import option_flags, print_summary, run_engine_command
from cryocli.errors import CryocliError


def _int_tuple(text: str | None, option: str) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise CryocliError(f"{option} {text}: expected comma-separated integers, e.g. 64,128,256") from None
    if not values or min(values) < 1:
        raise CryocliError(f"{option} {text}: expected positive integers")
    return values


def _float_tuple(text: str | None, option: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    if text.strip().lower() in ("", "none"):
        return ()
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise CryocliError(f"{option} {text}: expected comma-separated numbers, e.g. 1,2,4") from None


def _snr(text: str | None) -> float | None:
    if text is None:
        return None
    from cryocli.imaging.noise import parse_snr

    return parse_snr(text, "--snr")


def abinitio(
    particles: Path = typer.Argument(..., help="RELION STAR file of the particles (3.0 or 3.1+)."),
    method: str = typer.Option("cryospin", "--method", "-m", help="Reconstruction method (see above)."),
    out: Path = typer.Option(..., "-o", "--out", help="Run directory: map.mrc, particles.star, metrics.csv, "
                             "log.jsonl, checkpoint.pt, figures."),
    epochs: int | None = typer.Option(None, "--epochs", min=1, help="Passes over the particles "
                                         "[default: the method's, 20 for cryospin; cryo2ssnet: as many as --steps "
                                         "take; sagd: no limit but --max-iter]."),
    batch_size: int | None = typer.Option(None, "--batch-size", min=1, help="Particles per step [default: 64; "
                                          "cryo2ssnet: 32; sagd: 200, the paper's minibatch]."),
    lr: float | None = typer.Option(None, "--lr", help="Main learning rate (cryospin: the decoder's, 0.05; "
                                    "cryo2ssnet: the decoder's, 1e-2, divided by 10 in stage 2; sagd has none: its step is "
                                    "eps / L)."),
    box: int | None = typer.Option(None, "--box", min=8, help="Fourier-crop the particles to this box (pixels) "
                                      "on the fly; the map is written at that box and its pixel size."),
    max_particles: int | None = typer.Option(None, "--max-particles", min=1, help="Use only the first N particles."),
    halves: bool = typer.Option(False, "--halves", help="Two independent runs on the rlnRandomSubset halves "
                                "(drawn if absent), aligned to each other; writes half maps and the "
                                "gold-standard FSC (fsc.star)."),
    ground_truth: Path | None = typer.Option(None, "--ground-truth", help="Known map: score each epoch by FSC "
                                                "after alignment (and the poses against the STAR file's, when "
                                                "it has any). A developer and benchmark aid."),
    score_every: int = typer.Option(1, "--score-every", min=1, help="With --ground-truth, align and score the "
                                    "map every N epochs (and at the last)."),
    invert: bool | None = typer.Option(None, "--invert/--no-invert", help="Multiply the images by -1 (dark "
                                          "protein) or keep them [default: detect from the mean image]."),
    particle_diameter: float | None = typer.Option(None, "--particle-diameter", help="Particle diameter in "
                                                   "A: the soft solvent mask of the map written for viewing; sagd: "
                                                   "also its quadrature levels, shift step and random spheres (the "
                                                   "default overestimates a small particle in a large box and makes "
                                                   "the finest level 8x larger: give it on a CPU); cryo2ssnet: the "
                                                   "decoder's sphere, its support and the denoiser mask [default: "
                                                   "0.8 x box; cryo2ssnet: estimated from the data]."),
    mass: float | None = typer.Option(None, "--mass", help="Mass of the molecule in kDa, for the contour level "
                                      "in the summary and report.png [default: from the particle diameter]."),
    no_ctf: bool = typer.Option(False, "--no-ctf", help="Run without CTF correction (only for particles without "
                                "CTF parameters; by default their absence is an error)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last checkpoint, with its "
                                "options (only its length, --batch-size and --preload may change)."),
    force: bool = typer.Option(False, "--force", help="Replace the run in an existing --out directory "
                               "(the old one stays until the new run succeeds)."),
    datadir: Path | None = typer.Option(None, "--datadir", help="Extra folder to look for particle stacks in."),
    angpix: float | None = angpix_option(writes_particles=True),
    heads: int | None = typer.Option(None, "--heads", min=1, help="cryospin: pose heads of the encoder "
                                        "[default: 7; the paper uses 15 on real data]."),
    switch_epoch: int | None = typer.Option(None, "--switch-epoch", min=0, help="cryospin: last auto-encoding "
                                               "epoch before per-particle pose optimisation [default: 7]."),
    shifts: bool | None = typer.Option(None, "--shifts/--no-shifts", help="Estimate in-plane origins [cryospin: "
                                       "off, the paper's setting for centred simulated particles: give --shifts for "
                                       "picked particles, as the paper does on real data; cryo2ssnet: on, "
                                       "--no-shifts is the paper's setting for centred particles]."),
    pose_lr: float | None = typer.Option(None, "--pose-lr", help="cryospin: Adam learning rate of the "
                                            "per-particle axis-angle poses, radians [default: 0.05]."),
    encoder_lr: float | None = typer.Option(None, "--encoder-lr", help="Encoder learning rate [cryospin: 1e-4 "
                                               "with the paper's encoder, 1e-3 with the slim one; cryo2ssnet: 1e-4]."),
    encoder_channels: str | None = typer.Option(None, "--encoder-channels", help="Filters of the encoder's "
                                                   "convolutional blocks, comma-separated [cryospin: the paper's "
                                                   "64,128,256,512 on CUDA at box >= 64 px, 16,32,64 on the CPU or "
                                                   "smaller boxes; cryo2ssnet: 32,64,128]."),
    pyramid: str | None = typer.Option(None, "--pyramid", help="cryospin: Gaussian blurs (pixels) stacked with "
                                          "the image as encoder input, comma-separated, or none [default: 1,2,4]."),
    grid_order: int | None = typer.Option(None, "--grid-order", min=-1, help="cryospin: HEALPix order of the "
                                             "fixed candidate poses scored with the heads during auto-encoding "
                                             "(2: 4,608 poses, 15 deg); -1: the paper's heads alone [default: 2]."),
    encode_resolution: float | None = typer.Option(None, "--encode-resolution", help="cryospin: compare "
                                                      "frequencies up to 1/this (A) by the last auto-encoding "
                                                      "epoch; 0: all [default: 12]."),
    encode_start_resolution: float | None = typer.Option(None, "--encode-start-resolution", help="cryospin: "
                                                            "the band (A) of the first auto-encoding epoch, widened "
                                                            "to --encode-resolution by the last; 0: no march "
                                                            "[default: 20]."),
    decode_march_epochs: int | None = typer.Option(None, "--decode-march-epochs", min=0, help="cryospin: "
                                                      "auto-decoding epochs over which the compared band widens "
                                                      "to Nyquist [default: 6]."),
    search_epochs: int | None = typer.Option(None, "--search-epochs", min=0, help="cryospin: auto-decoding epochs "
                                             "in which every particle's pose is also searched on the candidate "
                                             "grid, around its origin and the origin it would have in the map's "
                                             "mirror image, which gathers particles split between the two hands "
                                             "[default: 3 with --shifts, 0 without]."),
    preload: str | None = typer.Option(None, "--preload", help="Hold the prepared particles in memory (cryospin "
                                       "and sagd: on the device): yes, no (read each batch from the stacks; memory "
                                       "does not grow with the particle count), auto (yes while they take at most "
                                       "1 GiB per process) [default: auto]."),
    final_map: str | None = typer.Option(None, "--final-map", help="cryospin: decoder (the learned volume) or "
                                            "reconstruct (direct Fourier reconstruction at the final poses) "
                                            "[default: decoder]."),
    steps: int | None = typer.Option(None, "--steps", help="cryo2ssnet: optimiser steps in all, whatever the "
                                     "number of particles (the paper's fixed budget) [default: 7500]."),
    snr: str | None = typer.Option(None, "--snr", help="cryo2ssnet: SNR of the particles for the unbiased loss, "
                                   "linear (0.1) or in dB (-10dB) [default: estimated from the data as the variance of "
                                   "the particles over the box against that of their background, and logged]."),
    stage1_fraction: float | None = typer.Option(None, "--stage1-fraction", help="cryo2ssnet: share of the steps "
                                                 "in the search-supervised stage 1 [default: 0.5]."),
    dhbs: bool | None = typer.Option(None, "--dhbs/--no-dhbs", help="cryo2ssnet: --no-dhbs skips stage 1 and "
                                     "trains end to end only (the paper's ablation) [default: --dhbs]."),
    beam_width: int | None = typer.Option(None, "--beam-width", help="cryo2ssnet: cells kept per level of the "
                                          "beam search, 1-72 [default: 4]."),
    beam_depth: int | None = typer.Option(None, "--beam-depth", help="cryo2ssnet: subdivisions of the 72-cell base "
                                          "grid, 0-8 (5: cells of 1.9 deg) [default: 5]."),
    beam_start: str | None = typer.Option(None, "--beam-start", help="cryo2ssnet: encoder (the paper: the cells "
                                          "nearest the encoder's pose), global (the best of all 72 base cells) or "
                                          "auto (global until the encoder agrees with the search) [default: auto]."),
    agreement: float | None = typer.Option(None, "--agreement", help="cryo2ssnet: the encoder agrees with the "
                                           "search when their median distance over an epoch is at most this, in "
                                           "degrees [default: 10]."),
    switch_waits: bool | None = typer.Option(None, "--switch-waits/--fixed-switch", help="cryo2ssnet: stage 2 "
                                             "waits until the encoder agrees with the search, or starts at its "
                                             "scheduled step as in the paper [default: --switch-waits]."),
    constrain_density: bool | None = typer.Option(None, "--constrain-density/--free-density", help="cryo2ssnet: "
                                                  "after every step, zero the decoder's density outside a soft "
                                                  "sphere (the --particle-diameter, or 1.25 x the estimated "
                                                  "particle radius) and below 0 (RELION masks its references, "
                                                  "SAGD truncates negative density); --free-density: the paper's "
                                                  "unconstrained voxels [default: --constrain-density]."),
    gd: str | None = typer.Option(None, "--gd", help="cryo2ssnet: pose polishing after the beam search: gd (the "
                                  "paper's vanilla gradient descent) or adam (its better variant) [default: gd]."),
    gd_steps: int | None = typer.Option(None, "--gd-steps", help="cryo2ssnet: polishing steps, 0 for none "
                                        "[default: 20]."),
    gd_lr: float | None = typer.Option(None, "--gd-lr", help="cryo2ssnet: polishing rate in radians [default: 0.05 "
                                       "for gd, a quarter of the last cell for adam]."),
    balance: float | None = typer.Option(None, "--balance", help="cryo2ssnet: weight lambda of the encoder's "
                                         "pose loss in stage 1 [default: 1]."),
    denoiser_factor: int | None = typer.Option(None, "--denoiser-factor", help="cryo2ssnet: the denoiser's first "
                                               "layer divides the pixel count by this [default: the box's pixels over "
                                               "the Fourier pixels where the data's spectral SNR is at least 1]."),
    denoiser_fraction: float | None = typer.Option(None, "--denoiser-fraction", help="cryo2ssnet: share of stage 1 "
                                                   "during which the denoiser scores the search, 0-1 [default: "
                                                   "0.333]."),
    denoiser_steps: int | None = typer.Option(None, "--denoiser-steps", help="cryo2ssnet: training steps of the "
                                              "denoiser (batch 64) [default: 48 passes over the particles, at most "
                                              "7500]."),
    max_shift: float | None = typer.Option(None, "--max-shift", help="cryo2ssnet: largest in-plane shift searched "
                                           "and predicted, in pixels of the working box [default: box / 8]."),
    max_iter: int | None = typer.Option(None, "--max-iter", help="sagd: iterations (minibatches) at most; the run "
                                        "stops earlier once omega is at its maximum and the held-out error has "
                                        "stopped improving [default: 5000]."),
    res_start: float | None = typer.Option(None, "--res-start", help="sagd: the frequency march starts at 1/this, in A "
                                           "[default: 40]."),
    res_final: float | None = typer.Option(None, "--res-final", help="sagd: the frequency march ends at 1/this, in A, "
                                           "capped at Nyquist [default: 10]."),
    march_iter: int | None = typer.Option(None, "--march-iter", help="sagd: iterations over which omega rises "
                                          "geometrically from the start to the end [default: 2000]."),
    prior: str | None = typer.Option(None, "--prior", help="sagd: density prior: exponential, car (26-neighbour "
                                     "Gaussian smoothness) or uniform (improper) [default: exponential]."),
    prior_lambda: float | None = typer.Option(None, "--prior-lambda", help="sagd: lambda of the exponential prior, per "
                                              "unit of density [default: the prior weighs --prior-strength nats per "
                                              "training particle at the density of the scaled random start]."),
    car_sigma: float | None = typer.Option(None, "--car-sigma", help="sagd: sigma_CAR of the CAR prior, in units of "
                                           "density [default: the scaled random start's voxel standard deviation over "
                                           "--prior-strength]."),
    prior_strength: float | None = typer.Option(None, "--prior-strength", help="sagd: multiplies the data-derived "
                                                "lambda and divides sigma_CAR [default: 1]."),
    importance_sampling: bool | None = typer.Option(None, "--importance-sampling/--no-importance-sampling",
                                                    help="sagd: importance-sample the quadrature sums, or evaluate "
                                                    "every quadrature point [default: --importance-sampling]."),
    s0: float | None = typer.Option(None, "--s0", help="sagd: samples drawn per sampler = s0 x the proposal's "
                                    "effective sample size [default: 10]."),
    held_out: int | None = typer.Option(None, "--held-out", help="sagd: particles held out for the RREMSE (never used "
                                        "for gradients); 0: none [default: 100, or 5% of sets under 2000]."),
    spheres: int | None = typer.Option(None, "--spheres", help="sagd: random spheres summed into the starting density "
                                       "[default: 30]."),
    shift_sigma: float | None = typer.Option(None, "--shift-sigma", help="sagd: standard deviation of the Gaussian "
                                             "shift prior, in A [default: 3% of the box's field of view]."),
    shift_extent: float | None = typer.Option(None, "--shift-extent", help="sagd: shift quadrature points lie within "
                                              "this many shift sigmas of the centre [default: 2.5]."),
    max_level: int | None = typer.Option(None, "--max-level", help="sagd: finest quadrature level, 0-5 (HEALPix "
                                         "order; 4: 3.75 deg) [default: 4]."),
    patience: int | None = typer.Option(None, "--patience", help="sagd: passes without a held-out improvement that "
                                        "stop the run once omega is at its maximum [default: 5]."),
) -> None:
    """Ab initio reconstruction: poses and a map from particles alone (the help text is built by _help)."""
    with guarded():
        options: dict[str, Any] = {
            "epochs": epochs, "batch_size": batch_size, "lr": lr, "box": box, "max_particles": max_particles,
            "invert": invert, "use_ctf": False if no_ctf else None, "particle_diameter": particle_diameter,
            "heads": heads, "switch_epoch": switch_epoch,
            "shifts": shifts, "pose_lr": pose_lr, "encoder_lr": encoder_lr,
            "encoder_channels": _int_tuple(encoder_channels, "--encoder-channels"),
            "pyramid_sigmas": _float_tuple(pyramid, "--pyramid"), "final_map": final_map, "preload": preload,
            "grid_order": grid_order, "encode_resolution": encode_resolution,
            "encode_start_resolution": encode_start_resolution,
            "decode_march_epochs": decode_march_epochs, "search_epochs": search_epochs,
            "steps": steps, "snr": _snr(snr), "stage1_fraction": stage1_fraction, "dhbs": dhbs,
            "beam_width": beam_width, "beam_depth": beam_depth, "beam_start": beam_start, "agreement": agreement,
            "switch_waits": switch_waits, "constrain_density": constrain_density, "gd": gd, "gd_steps": gd_steps,
            "gd_lr": gd_lr, "balance": balance,
            "denoiser_factor": denoiser_factor, "denoiser_fraction": denoiser_fraction,
            "denoiser_steps": denoiser_steps, "max_shift": max_shift,
            "max_iter": max_iter, "res_start": res_start, "res_final": res_final, "march_iter": march_iter,
            "prior": prior, "prior_lambda": prior_lambda, "car_sigma": car_sigma, "prior_strength": prior_strength,
            "importance_sampling": importance_sampling, "s0": s0, "held_out": held_out, "spheres": spheres,
            "shift_sigma": shift_sigma, "shift_extent": shift_extent, "max_level": max_level, "patience": patience,
        }
    summary = run_engine_command("abinitio", method, options, particles, out, flags=FLAGS, datadir=datadir,
                                 force=force, resume=resume, ground_truth=ground_truth, score_every=score_every,
                                 halves=halves, mass_kda=mass, angpix=angpix)
    print_summary(summary)


def _help() -> str:
    from cryocli.engines.protocol import engine_summaries

    methods = "\n".join(f"* [bold]{name}[/]: {line}" for name, line in engine_summaries("abinitio").items())
    return ("Ab initio reconstruction: poses and a map from the particles alone, written to a run directory "
            "(map.mrc filtered for viewing and map_unfil.mrc as fitted, particles.star with the input columns "
            "kept and poses/origins in RELION 3.1 form, report.png, angdist.bild for ChimeraX, metrics.csv, "
            "log.jsonl, checkpoint.pt; fsc.png with --ground-truth or --halves).\n\n"
            f"Methods (--method):\n\n{methods}\n\n"
            "cryospin adds to the paper a fixed grid of candidate poses during auto-encoding and frequency "
            "marching, and with --shifts a search of the grid in the first auto-decoding epochs (--grid-order, "
            "--encode-start-resolution, --encode-resolution, --decode-march-epochs, --search-epochs; see "
            "the README), without "
            "which it does not leave its random start on a few thousand particles. Measured on 10,000 "
            "particles of 64 px: the grid wins 84-100% of the particles during auto-encoding and the heads "
            "16% by the switch, so at that scale the grid finds the poses (median error 2.1 deg; the heads "
            "alone, --grid-order -1: 58 deg). The encoder is the paper's (VGG16 widths) on CUDA at 64 px or "
            "more, a slim one (16,32,64) otherwise.\n\n"
            "cryo2ssnet follows the paper's appendix B (7,500 steps of 32, beam width 4 and depth 5, 20 gradient "
            "steps at 0.05, denoiser for the first third of stage 1). cryocli adds in-plane shifts to the search and "
            "the encoder (--no-shifts for centred particles), estimates the SNR (--snr) and chooses the denoiser's "
            "factor and mask radius from the data, keeps the paper's fixed step budget whatever the number of "
            "particles (--steps), starts the beam from the whole base grid until the encoder agrees with the search "
            "and lets stage 2 wait for that agreement (--beam-start, --agreement, --fixed-switch), and keeps the "
            "decoder's density inside a sphere and non-negative (--free-density for the paper's; see the README).\n\n"
            "sagd follows the paper and its supplement (minibatches of 200, eps = max(1/16, 2^(1 - floor(tau/150))), "
            "a line search for L every 20 iterations, three importance samplers with s0 = 10, omega from 1/40 to 1/10 "
            "A^-1, 100 held-out particles). cryocli chooses what the paper leaves open (the omega schedule, the "
            "quadrature and how it grows, the shift prior, lambda, sigma_CAR, the random spheres, the decrease of L, "
            "the RREMSE normalisation; see the README) and uses the shared projector instead of sinc interpolation.")


FLAGS = option_flags(abinitio, {"pyramid": "pyramid_sigmas"})


def register(app: typer.Typer) -> None:
    app.command("abinitio", help=_help())(abinitio)
