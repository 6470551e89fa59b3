"""Simulated particle datasets with ground truth, written the way RELION would write them.

Image formation is the one model every engine uses: central slice of the map's transform at pose A
(:mod:`cryocli.imaging.projector`), times RELION's CTF (:mod:`cryocli.imaging.ctf`), shifted by -origin
as ``relion_project`` does (so RELION re-centres it by +origin), plus white Gaussian noise at the
requested SNR. SNR = mean over the dataset of var(clean CTF-modulated projection over the whole box)
divided by the noise variance.

Sign: by default the images have the sign ``relion_project`` writes, which is also the sign of
particles extracted by RELION with ``--invert_contrast``: protein bright at low frequency
(``CTF(0) = +Q0`` times a positive potential). ``invert=True`` writes dark protein, as on raw micrographs.
"""

from __future__ import annotations

import json
import math
import os
import posixpath
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from cryocli.errors import CryocliError
from cryocli.geometry.rotations import euler_to_matrix, matrix_to_euler, random_rotations
from cryocli.imaging.ctf import CTFParams, compute_ctf
from cryocli.imaging.fourier import rfft_to_image
from cryocli.imaging.noise import noise_sigma_for_snr, signal_variances
from cryocli.imaging.projector import Projector
from cryocli.imaging.shifts import shift_from_center
from cryocli.io.locks import default_dir_mode
from cryocli.io.mrc import open_stack, stack_images, write_map, write_stack
from cryocli.io.paths import relion_image_path
from cryocli.io.star import ParticleTable, read_star, write_star


@dataclass
class SimulationConfig:
    """Every parameter of a simulated dataset. Defaults follow Cryo2SSNet's appendix B (4AKE set).

    box: pixels. apix: Angstrom per pixel. snr: linear (``math.inf`` for no noise). defocus and
    astigmatism: Angstrom ranges (uniform); DefocusU = d + a/2, DefocusV = d - a/2. astig_angle:
    radians range (written to the STAR file in degrees). voltage kV, cs mm, bfactor A^2, shift_sigma A.
    particles_per_micrograph: consecutive particles that share one synthetic micrograph, hence one
    defocus U/V/angle (see :func:`draw_geometry`); 1 gives every particle its own defocus.
    """

    n_particles: int = 10000
    box: int = 128
    apix: float = 0.8
    snr: float = 0.1
    defocus: tuple[float, float] = (15000.0, 20000.0)
    astigmatism: tuple[float, float] = (100.0, 500.0)
    astig_angle: tuple[float, float] = (0.2, 1.4)
    voltage: float = 300.0
    cs: float = 2.7
    amp_contrast: float = 0.07
    bfactor: float = 0.0
    shift_sigma: float = 0.0
    views: str = "uniform"
    ctf: bool = True
    invert: bool = False
    seed: int = 0
    stack_size: int = 1000
    chunk_size: int = 256
    pilot_size: int = 2000
    particles_per_micrograph: int = 50


@dataclass
class Geometry:
    """Per-particle ground truth: Euler angles (degrees), origins (Angstrom, [x, y]), CTF, half set."""

    euler: np.ndarray                 # (N, 3) rot, tilt, psi in degrees
    origins: np.ndarray               # (N, 2) rlnOriginXAngst, rlnOriginYAngst
    ctf: CTFParams | None
    subset: np.ndarray                # (N,) 1 or 2
    source: ParticleTable | None = None   # the STAR file the geometry came from, if any

    def __len__(self) -> int:
        return int(self.euler.shape[0])


def _uniform(rng: np.random.Generator, bounds: tuple[float, float], n: int) -> np.ndarray:
    lo, hi = sorted(bounds)
    return rng.uniform(lo, hi, n)


def draw_views(n: int, views: str, rng: np.random.Generator) -> np.ndarray:
    """Euler angles ``(n, 3)`` in degrees: ``uniform`` on SO(3), or ``belt`` (tilt concentrated near 90
    degrees, standard deviation 10 degrees, rot and psi uniform: the preferred-orientation case)."""
    if views == "uniform":
        gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
        rot, tilt, psi = matrix_to_euler(random_rotations(n, generator=gen, dtype=torch.float64))
        return torch.stack([rot, tilt, psi], -1).numpy()
    if views == "belt":
        belt_tilt = np.clip(rng.normal(90.0, 10.0, n), 0.0, 180.0)
        return np.stack([rng.uniform(-180, 180, n), belt_tilt, rng.uniform(-180, 180, n)], -1)
    raise CryocliError(f"--views {views}: expected uniform or belt")


def draw_geometry(config: SimulationConfig) -> Geometry:
    """Poses, shifts, CTF parameters and half sets drawn from the configured distributions.

    Particles come from synthetic micrographs of ``config.particles_per_micrograph`` consecutive
    particles (the last one may hold fewer), and the particles of one micrograph share its defocus U, V
    and astigmatism angle, as on real data before per-particle CTF refinement. The values are drawn once per
    particle (the same random stream for any micrograph size, so poses, origins and half sets do not
    depend on it) and the whole micrograph takes those of its first particle: everything is
    deterministic with ``config.seed``, and ``particles_per_micrograph=1`` gives one defocus per particle.
    """
    rng = np.random.default_rng(config.seed)
    n = config.n_particles
    euler = draw_views(n, config.views, rng)
    origins = rng.normal(0.0, config.shift_sigma, (n, 2)) if config.shift_sigma > 0 else np.zeros((n, 2))
    ctf = None
    if config.ctf:
        d = _uniform(rng, config.defocus, n)
        a = _uniform(rng, config.astigmatism, n)
        angle = np.rad2deg(_uniform(rng, config.astig_angle, n))
        per_mic = max(1, int(config.particles_per_micrograph))
        first = (np.arange(n) // per_mic) * per_mic      # first particle of each particle's micrograph
        d, a, angle = d[first], a[first], angle[first]
        ctf = CTFParams.build(d + a / 2, d - a / 2, angle, config.voltage, config.cs, config.amp_contrast,
                              0.0, config.bfactor, 1.0)
    subset = np.where(rng.permutation(n) % 2 == 0, 1, 2)
    return Geometry(euler=euler, origins=origins, ctf=ctf, subset=subset)


def geometry_from_star(path: str | Path, use_ctf: bool = True) -> Geometry:
    """Poses, shifts, CTF and optics of an existing STAR file (``simulate --poses-from``)."""
    table = read_star(path)
    if table.euler_angles is None:
        raise CryocliError("no rlnAngleRot/rlnAngleTilt/rlnAnglePsi columns to take poses from", path)
    ctf = table.ctf_params(require=True) if use_ctf else None
    subset = table.random_subset
    if subset is None:
        subset = np.where(np.arange(len(table.particles)) % 2 == 0, 1, 2)
    return Geometry(euler=np.asarray(table.euler_angles, dtype=np.float64),
                    origins=np.asarray(table.origins_angstrom, dtype=np.float64), ctf=ctf,
                    subset=np.asarray(subset), source=table)


def render_clean(projector: Projector, rotations: Tensor, origins_angstrom: Tensor, ctf: CTFParams | None,
                 apix: float) -> Tensor:
    """Clean particle images ``(B, n, n)``: projection at ``rotations`` (B, 3, 3), CTF-modulated, shifted by
    ``-origin`` (``origins_angstrom`` (B, 2) [x, y]) as relion_project does; ``apix`` in Angstrom."""
    n = projector.n
    spectra = projector.project(rotations)
    if ctf is not None:
        spectra = spectra * compute_ctf(ctf, n, apix, device=spectra.device)
    return rfft_to_image(shift_from_center(spectra, origins_angstrom, apix), n)


def noise_sigma(projector: Projector, geometry: Geometry, config: SimulationConfig, device: torch.device) -> float:
    """Noise standard deviation giving the requested SNR, from the clean variance of a pilot sample.

    The pilot is every particle for small sets and ``pilot_size`` random ones otherwise, so the
    achieved SNR (measured over the whole set while writing) matches the request to about 1%.
    """
    if math.isinf(config.snr):
        return 0.0
    if config.snr <= 0:
        raise CryocliError(f"--snr must be positive (got {config.snr})")
    rng = np.random.default_rng(config.seed + 1)
    n = len(geometry)
    pick = np.arange(n) if n <= config.pilot_size else np.sort(rng.choice(n, config.pilot_size, replace=False))
    variances = []
    for start in range(0, len(pick), config.chunk_size):
        idx = pick[start:start + config.chunk_size]
        variances.append(signal_variances(_clean_chunk(projector, geometry, idx, config, device)))
    return noise_sigma_for_snr(torch.cat(variances), config.snr)


def _clean_chunk(projector: Projector, geometry: Geometry, idx: np.ndarray, config: SimulationConfig,
                 device: torch.device) -> Tensor:
    e = torch.as_tensor(geometry.euler[idx], dtype=torch.float32, device=device)
    rotations = euler_to_matrix(e[:, 0], e[:, 1], e[:, 2])
    origins = torch.as_tensor(geometry.origins[idx], dtype=torch.float32, device=device)
    ctf = geometry.ctf.index(torch.as_tensor(idx)).to(device) if geometry.ctf is not None else None
    return render_clean(projector, rotations, origins, ctf, config.apix)


def stack_image_names(stack: str | Path, count: int) -> list[str]:
    """``rlnImageName`` of the ``count`` images of ``stack`` (its final path, absolute or relative to the
    current directory): ``000001@sim/Particles/particles_0001.mrcs``..., the stack named relative to the
    current directory as RELION names it (absolute when it lies outside; see
    :func:`~cryocli.io.paths.relion_image_path`)."""
    where = relion_image_path(stack)
    return [f"{i + 1:06d}@{where}" for i in range(count)]


MONTAGE_PARTICLES = 6
"""Particles shown in ``particles.png`` (the first ones of the set)."""


@dataclass
class ParticleMontage:
    """The images of ``particles.png``, each ``(k, n, n)`` float32 with the sign of the stack (``index``: the
    0-based particles shown; ``defocus``: their mean defocus (U + V) / 2 in Angstrom, None without CTF)."""

    index: np.ndarray
    projection: np.ndarray            # the map projected at the pose, shifted by -origin, no CTF
    with_ctf: np.ndarray | None       # the same times the particle's CTF: the clean image (None without CTF)
    written: np.ndarray               # the image in the stack (clean image + noise)
    defocus: np.ndarray | None


def montage_images(projector: Projector, geometry: Geometry, config: SimulationConfig,
                   stacks: Sequence[str | Path], device: torch.device | str = "cpu",
                   count: int = MONTAGE_PARTICLES) -> ParticleMontage:
    """The first ``count`` particles three ways, for ``particles.png``: the projection without CTF and with it,
    from the one forward model (:func:`render_clean`, the poses, origins and CTFs of the stack), and the images
    read back from ``stacks``, the stacks written, in order (their images are particles 0, 1, ...). The clean
    images take the stack's sign (negated with ``config.invert``), so the rows look alike."""
    device = torch.device(device)
    parts: list[np.ndarray] = []
    for stack in stacks:
        have = sum(len(p) for p in parts)
        if have >= min(count, len(geometry)):
            break
        with open_stack(stack) as mrc:
            available = 1 if mrc.data.ndim == 2 else int(mrc.data.shape[0])
            parts.append(stack_images(mrc, np.arange(min(available, count - have))))
    written = np.concatenate(parts)[:min(count, len(geometry))]
    idx = np.arange(len(written))
    sign = -1.0 if config.invert else 1.0
    e = torch.as_tensor(geometry.euler[idx], dtype=torch.float32, device=device)
    rotations = euler_to_matrix(e[:, 0], e[:, 1], e[:, 2])
    origins = torch.as_tensor(geometry.origins[idx], dtype=torch.float32, device=device)
    projection = render_clean(projector, rotations, origins, None, config.apix)
    with_ctf, defocus = None, None
    if geometry.ctf is not None:
        ctf = geometry.ctf.index(torch.as_tensor(idx)).to(device)
        with_ctf = (sign * render_clean(projector, rotations, origins, ctf, config.apix)).cpu().numpy()
        defocus = ((geometry.ctf.defocus_u[idx] + geometry.ctf.defocus_v[idx]) / 2).numpy()
    return ParticleMontage(index=idx, projection=(sign * projection).cpu().numpy(), with_ctf=with_ctf,
                           written=written, defocus=defocus)


def _write_montage(path: Path, montage: ParticleMontage, geometry: Geometry, config: SimulationConfig,
                   sigma: float) -> None:
    """``particles.png``: the rows of :func:`montage_images`, the SNR and the defocus in the title."""
    from cryocli.plots import plot_particle_montage

    noisy = sigma > 0
    rows = [("projection\n(no CTF)", montage.projection)]
    if montage.with_ctf is not None:
        rows.append(("projection x CTF\n(clean image)", montage.with_ctf))
    rows.append(("+ noise: the image\nin the stack" if noisy else "the image in the\nstack (no noise)",
                 montage.written))
    labels = [f"particle {i + 1}" for i in montage.index]
    if montage.defocus is not None:
        labels = [f"{label}\ndefocus {d / 1e4:.2f} µm" for label, d in zip(labels, montage.defocus, strict=True)]
    snr = f"SNR {config.snr:g} ({10 * math.log10(config.snr):.1f} dB)" if noisy else "no noise (SNR inf)"
    if geometry.ctf is not None:
        mean = ((geometry.ctf.defocus_u + geometry.ctf.defocus_v) / 2).numpy()
        ctf = f"defocus {mean.min() / 1e4:.2f}-{mean.max() / 1e4:.2f} µm"
    else:
        ctf = "no CTF"
    title = (f"Simulated particles: {snr}, {ctf}\n{len(geometry)} particles of {config.box} px at "
             f"{config.apix:g} Å/px; the first {len(montage.index)} shown")
    sign = "dark protein (--invert)" if config.invert else "protein bright, as relion_project writes"
    caption = (f"Each image has its own grey scale (its minimum black, its maximum white): compare shapes, not "
               f"brightness, between panels. Sign as in the stack: {sign}. SNR = variance of the clean image over "
               "the box / noise variance, averaged over the set"
               + ("; defocus (U + V) / 2, underfocus positive." if geometry.ctf is not None else "."))
    plot_particle_montage(path, rows, title=title, column_labels=labels, caption=caption)


def _micrograph_groups(geometry: Geometry, config: SimulationConfig) -> np.ndarray:
    """0-based synthetic micrograph of each particle ``(N,)``: one per distinct (defocus U, V, angle), in
    order of first appearance; without CTF, consecutive groups of ``config.particles_per_micrograph``."""
    n = len(geometry)
    if geometry.ctf is None:
        return np.arange(n) // max(1, int(config.particles_per_micrograph))
    c = geometry.ctf
    keys = pd.DataFrame({"u": c.defocus_u.numpy(), "v": c.defocus_v.numpy(), "a": c.defocus_angle.numpy()})
    return keys.groupby(["u", "v", "a"], sort=False).ngroup().to_numpy(dtype=np.int64)


def _micrograph_columns(groups: np.ndarray, image_names: list[str], box: int) -> dict[str, np.ndarray]:
    """``rlnMicrographName`` and ``rlnCoordinateX/Y`` (micrograph pixels) of synthetic micrographs.

    Micrographs are named ``<out>/Micrographs/mic_000001.mrc``, where ``<out>`` is the folder above the
    particle stacks in ``image_names`` (so the names are relative to the current directory like the stack
    names). The files do not exist: the names group particles as RELION's tools expect (relion_star_handler
    ``--remove_duplicates`` needs rlnMicrographName and rlnCoordinateX/Y). Particles sit on a square grid,
    two boxes apart, so no two are duplicates of each other.
    """
    first = str(image_names[0]) if len(image_names) else ""
    stack = first.partition("@")[2] or first
    out = posixpath.dirname(posixpath.dirname(stack))
    folder = posixpath.join(out, "Micrographs") if out else "Micrographs"
    counts = np.bincount(groups) if len(groups) else np.ones(1, dtype=np.int64)
    names = np.array([f"{folder}/mic_{g + 1:06d}.mrc" for g in range(len(counts))], dtype=object)
    rank = pd.Series(groups).groupby(groups).cumcount().to_numpy()
    side = math.ceil(math.sqrt(int(counts.max())))
    step = 2.0 * box
    return {"rlnMicrographName": names[groups], "rlnCoordinateX": box + step * (rank % side),
            "rlnCoordinateY": box + step * (rank // side)}


def particles_table(geometry: Geometry, config: SimulationConfig, image_names: list[str]) -> ParticleTable:
    """The RELION 3.1 table of the simulated set (ground truth poses, origins, CTF and half sets).

    Particles of one synthetic micrograph (one per distinct defocus, :func:`draw_geometry`) share an
    ``rlnMicrographName`` beside the stacks (``sim/Micrographs/mic_000001.mrc``) and get coordinates on
    it (:func:`_micrograph_columns`). With ``--poses-from``, the source table is kept whole (optics and
    every column, its micrograph names and coordinates included) and only the image names change, so
    the new set is the old one's geometry with new images; micrograph columns are added only where the
    source has none.
    """
    n = len(geometry)
    if geometry.source is not None:
        particles = geometry.source.particles.copy()
        particles["rlnImageName"] = image_names
        if "rlnRandomSubset" not in particles.columns:
            particles["rlnRandomSubset"] = geometry.subset.astype(int)
        if "rlnMicrographName" in particles.columns:
            groups = pd.factorize(particles["rlnMicrographName"].astype(str), sort=False)[0]
        else:
            groups = _micrograph_groups(geometry, config)
        for column, values in _micrograph_columns(groups, image_names, config.box).items():
            if column not in particles.columns:
                particles[column] = values
        return replace(geometry.source, particles=particles, path=None, source=None)
    optics = pd.DataFrame({
        "rlnOpticsGroup": [1], "rlnOpticsGroupName": ["opticsGroup1"],
        "rlnAmplitudeContrast": [config.amp_contrast], "rlnSphericalAberration": [config.cs],
        "rlnVoltage": [config.voltage], "rlnImagePixelSize": [config.apix], "rlnImageSize": [config.box],
        "rlnImageDimensionality": [2], "rlnCtfDataAreCtfPremultiplied": [0],
    })
    cols: dict[str, object] = {"rlnImageName": image_names}
    cols.update(_micrograph_columns(_micrograph_groups(geometry, config), image_names, config.box))
    cols.update(rlnAngleRot=geometry.euler[:, 0], rlnAngleTilt=geometry.euler[:, 1],
                rlnAnglePsi=geometry.euler[:, 2], rlnOriginXAngst=geometry.origins[:, 0],
                rlnOriginYAngst=geometry.origins[:, 1])
    if geometry.ctf is not None:
        c = geometry.ctf
        cols.update(rlnDefocusU=c.defocus_u.numpy(), rlnDefocusV=c.defocus_v.numpy(),
                    rlnDefocusAngle=c.defocus_angle.numpy(), rlnPhaseShift=c.phase_shift.numpy(),
                    rlnCtfBfactor=c.bfactor.numpy())
    cols.update(rlnOpticsGroup=np.ones(n, dtype=int), rlnRandomSubset=geometry.subset.astype(int))
    return ParticleTable(particles=pd.DataFrame(cols), optics=optics, version="3.1", path=None)


def simulate_dataset(volume: np.ndarray, geometry: Geometry, config: SimulationConfig, out_dir: str | Path,
                     device: torch.device | str = "cpu", progress: Callable[[int], None] | None = None,
                     extra_info: dict | None = None) -> dict:
    """Write ``particles.star``, ``Particles/*.mrcs``, ``ground_truth.mrc``, ``simulate.json`` and ``particles.png``
    (the first particles without CTF, with it, and as written: :func:`montage_images`) to ``out_dir``.

    ``volume`` is the clean map ``(box, box, box)`` at ``config.apix``. Particles stream in chunks
    (memory is bounded by ``chunk_size`` and ``stack_size``). Everything is written into a temporary
    folder beside ``out_dir`` and moved into place at the end. Returns the summary written to simulate.json.
    """
    out_dir = Path(out_dir)
    device = torch.device(device)
    n, box = len(geometry), config.box
    if volume.shape != (box, box, box):
        raise CryocliError(f"map box {volume.shape} does not match --box {box}")
    if not np.isfinite(volume).all():
        raise CryocliError("the map holds NaN or Inf values")
    if not np.any(volume):
        raise CryocliError("the map is empty (all zero)")
    projector = Projector(torch.as_tensor(volume, dtype=torch.float32, device=device), pad=2)
    sigma = noise_sigma(projector, geometry, config, device)
    gen = torch.Generator(device=device).manual_seed(config.seed + 2)
    sign = -1.0 if config.invert else 1.0

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        (tmp / "Particles").mkdir()
        names: list[str] = []
        stacks: list[Path] = []
        clean_var_sum, noise_var_sum = 0.0, 0.0
        n_stacks = math.ceil(n / config.stack_size)
        for s in range(n_stacks):
            stack_name = f"Particles/particles_{s + 1:04d}.mrcs"
            first, last = s * config.stack_size, min(n, (s + 1) * config.stack_size)
            images = np.empty((last - first, box, box), dtype=np.float32)
            for start in range(first, last, config.chunk_size):
                idx = np.arange(start, min(last, start + config.chunk_size))
                clean = _clean_chunk(projector, geometry, idx, config, device)
                clean_var_sum += float(signal_variances(clean).sum())
                if sigma > 0:
                    noise = torch.randn(clean.shape, generator=gen, device=device) * sigma
                    noise_var_sum += float(signal_variances(noise).sum())
                    clean = clean + noise
                images[idx - first] = (sign * clean).cpu().numpy()
                if progress:
                    progress(len(idx))
            _check_images(images, config, stack_name)
            write_stack(tmp / stack_name, images, config.apix, command="simulate")
            stacks.append(tmp / stack_name)
            names += stack_image_names(out_dir / stack_name, last - first)
        write_star(particles_table(geometry, config, names), tmp / "particles.star")
        write_map(tmp / "ground_truth.mrc", volume, config.apix, command="simulate ground truth")
        montage = montage_images(projector, geometry, config, stacks, device)
        _write_montage(tmp / "particles.png", montage, geometry, config, sigma)
        achieved = (clean_var_sum / noise_var_sum) if noise_var_sum > 0 else math.inf
        summary = {
            "parameters": {k: (list(v) if isinstance(v, tuple) else _finite_or_text(v))
                           for k, v in asdict(config).items()},
            "n_particles": n, "noise_sigma": sigma, "snr_requested": _finite_or_text(config.snr),
            "snr_achieved": _finite_or_text(achieved),
            "snr_achieved_db": 10 * math.log10(achieved) if 0 < achieved < math.inf else None,
            "mean_clean_variance": clean_var_sum / n, "sign": "dark protein (inverted)" if config.invert else
            "as relion_project (protein bright at low frequency)",
            "files": {"star": "particles.star", "stacks": n_stacks, "ground_truth": "ground_truth.mrc",
                      "montage": "particles.png"},
            **(extra_info or {}),
        }
        (tmp / "simulate.json").write_text(json.dumps(summary, indent=2, default=_json_default) + "\n")
        os.chmod(tmp, default_dir_mode())  # mkdtemp makes the folder private; give it the umask's permissions
        _move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary


def _finite_or_text(value):
    """JSON has no infinity: write it as the string "inf" (as --snr accepts it)."""
    return "inf" if isinstance(value, float) and math.isinf(value) else value


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    return str(obj)


def _check_images(images: np.ndarray, config: SimulationConfig, stack_name: str) -> None:
    """Refuse to write a stack with NaN/Inf values or only zeros, naming the options that lead there."""
    if not np.isfinite(images).all():
        raise CryocliError(f"simulated images of {stack_name} hold NaN or Inf values; nothing written (check "
                           f"--voltage {config.voltage:g}, --cs {config.cs:g}, --defocus, --bfactor {config.bfactor:g}, "
                           f"--apix {config.apix:g})")
    if not np.any(images):
        raise CryocliError(f"simulated images of {stack_name} are all zero; nothing written (check the map, "
                           "--bfactor and --apix)")


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    """Replace ``out_dir`` by the finished temporary folder (the caller checked --force).

    The backup of a replaced folder is ``.{name}.old`` beside it, a name that
    :func:`cryocli.io.locks.remove_stale_temporaries` removes if a killed run left it.
    """
    if out_dir.exists():
        backup = out_dir.with_name(f".{out_dir.name}.old")
        shutil.rmtree(backup, ignore_errors=True)
        os.replace(out_dir, backup)
        os.replace(tmp, out_dir)
        shutil.rmtree(backup, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)
