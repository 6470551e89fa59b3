"""Fourier shell correlation, in RELION's shells and with RELION's sums.

Shell ``s`` holds the Fourier voxels with ``round(|k| in pixels) == s``; its spatial frequency is
``s / (n * apix)`` 1/A and its resolution ``n * apix / s`` A. Shells run from 0 to ``n // 2`` (Nyquist).

Why the half transform: RELION's ``getFSC`` (src/fftw.cpp) sums over the FFTW half transform
``rfftn(map)`` (``kx >= 0`` only), not over the full transform. In the half transform every Fourier
voxel with ``kx > 0`` stands for itself and its Friedel mate, while the ``kx = 0`` plane holds both
members of each pair, so relative to a full-transform sum the ``kx = 0`` plane (and the ``kx = n/2``
plane) carry twice the weight. Low shells have a large share of their voxels in that plane, which is
why a full-transform FSC differs from RELION's by up to ~0.01 there. :func:`fsc_curve` sums over the
half transform and reproduces RELION's ``rlnFourierShellCorrelationUnmaskedMaps`` to the 6 digits it
prints.

Masked-FSC correction follows ``relion_postprocess``: the phases of both half maps are randomised
beyond the first shell where the unmasked FSC drops below 0.8, the randomised maps are masked, and
``FSC_true = (FSC_masked - FSC_random) / (1 - FSC_random)`` from two shells beyond the randomisation
shell (the masked FSC is kept below that). RELION draws the random phases from the C library's
``rand()`` after ``srand(--random_seed)``; :class:`GlibcRand` computes the same stream, so with the
same seed cryocli reproduces RELION's phase-randomised curve to float precision, not just
statistically.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from cryocli.imaging.fourier import rfftn_radius, rfftn_shells, shell_sum


def _as_tensor(volume: np.ndarray | Tensor, device: torch.device | str | None = None) -> Tensor:
    t = volume if torch.is_tensor(volume) else torch.tensor(np.asarray(volume))
    return t.to(device=device if device is not None else t.device, dtype=torch.float64)


def fsc_from_spectra(f1: Tensor, f2: Tensor) -> Tensor:
    """FSC of two half transforms ``(..., n, n, n//2+1)`` (complex) -> ``(..., n // 2 + 1)``, RELION's sums.

    A shell with no power in either map gives 0.
    """
    n = f1.shape[-2]
    shells = rfftn_shells(n, f1.device)
    nshell = n // 2 + 1
    num = shell_sum((f1 * f2.conj()).real, shells, nshell)
    den = torch.sqrt(shell_sum(f1.abs() ** 2, shells, nshell) * shell_sum(f2.abs() ** 2, shells, nshell))
    return torch.where(den > 0, num / den.clamp_min(1e-300), torch.zeros_like(num))


def fsc_tensor(map1: Tensor, map2: Tensor) -> Tensor:
    """FSC of cubic maps ``(..., n, n, n)`` on their own device (float64) -> ``(..., n // 2 + 1)``."""
    a, b = _as_tensor(map1), _as_tensor(map2, map1.device if torch.is_tensor(map1) else None)
    if a.shape != b.shape:
        raise ValueError(f"maps differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    dims = (-3, -2, -1)
    return fsc_from_spectra(torch.fft.rfftn(a, dim=dims), torch.fft.rfftn(b, dim=dims))


def fsc_curve(map1: np.ndarray | Tensor, map2: np.ndarray | Tensor) -> np.ndarray:
    """FSC between two cubic maps of box ``n``: array of length ``n // 2 + 1`` indexed by shell.

    Sums run over the half transform as in RELION's ``getFSC`` (see the module docstring). Shell 0
    holds the zero frequency alone; shells with no signal power give 0.
    """
    a = _as_tensor(map1)
    b = _as_tensor(map2, a.device)
    if a.shape != b.shape:
        raise ValueError(f"maps differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    return fsc_tensor(a, b).cpu().numpy()


def shell_voxel_counts(n: int) -> np.ndarray:
    """Number of half-transform voxels in each shell 0..n//2 (the independent Fourier samples of a real map)."""
    shells = rfftn_shells(n)
    return shell_sum(torch.ones(shells.shape, dtype=torch.float64), shells, n // 2 + 1).numpy()


def shell_resolution(n: int, voxel_size: float) -> np.ndarray:
    """Resolution in Angstrom of each shell 0..n//2 (shell 0 is reported as infinity)."""
    s = np.arange(n // 2 + 1, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return np.where(s > 0, n * voxel_size / np.maximum(s, 1e-12), np.inf)


def shell_frequency(n: int, voxel_size: float) -> np.ndarray:
    """Spatial frequency in 1/A of each shell 0..n//2."""
    return np.arange(n // 2 + 1, dtype=np.float64) / (n * voxel_size)


@dataclass
class Crossing:
    """Where an FSC curve first drops below ``threshold``.

    ``frequency`` (1/A) is interpolated linearly between the last shell at or above the threshold and
    the first shell below it; ``resolution`` = 1 / frequency (Angstrom). When the curve never drops
    below the threshold, ``reached`` is False and both give Nyquist (the resolution is that or finer).
    When it is below the threshold already at shell 0 and at shell 1 (maps whose means are zero or of
    opposite signs, and no correlation at shell 1), ``frequency`` is 0 and ``resolution`` infinite: there
    is no resolution to report.
    """

    threshold: float
    frequency: float
    resolution: float
    reached: bool
    shell: int  # last shell at or above the threshold


def threshold_crossing(fsc: np.ndarray, n: int, voxel_size: float, threshold: float) -> Crossing:
    """Interpolated crossing of ``fsc`` (length ``n//2+1``, per shell) with ``threshold``; shell 0 is skipped."""
    fsc = np.asarray(fsc, dtype=np.float64)
    freq = shell_frequency(n, voxel_size)
    below = np.nonzero(fsc[1:] < threshold)[0]
    if below.size == 0:
        nyq = freq[-1]
        return Crossing(threshold, float(nyq), float(1.0 / nyq), False, len(fsc) - 1)
    i = int(below[0]) + 1
    f0, f1, c0, c1 = freq[i - 1], freq[i], fsc[i - 1], fsc[i]
    # Shell i - 1 is at or above the threshold, except shell 0 (the search starts at shell 1): when shell 0 is
    # below it too, the line through the two shells does not cross it, and t would extrapolate a resolution
    # outside them; the curve is below from the start (frequency 0).
    t = (c0 - threshold) / (c0 - c1) if c0 > threshold else 0.0
    f = f0 + t * (f1 - f0)
    return Crossing(threshold, float(f), float(1.0 / f) if f > 0 else float("inf"), True, i - 1)


def relion_resolution_shell(fsc: np.ndarray, threshold: float = 0.143) -> int:
    """RELION's resolution shell: the last shell, counting from 0, before the curve first drops below ``threshold``.

    Returns -1 when shell 0 is already below the threshold.
    """
    fsc = np.asarray(fsc, dtype=np.float64)
    below = np.nonzero(fsc < threshold)[0]
    return int(below[0]) - 1 if below.size else len(fsc) - 1


class GlibcRand:
    """The C library's ``rand()`` stream of glibc (``srand(seed)``), which RELION draws its random phases from.

    glibc's default generator is an additive lagged-Fibonacci generator: ``r[0] = seed`` (0 counts as 1),
    ``r[i] = 16807 r[i-1] mod (2^31 - 1)`` for ``i < 31``, ``r[31..33] = r[0..2]``, then
    ``r[i] = r[i-31] + r[i-3] mod 2^32``; the ``k``-th output is ``r[k + 344] >> 1``. The recurrence is
    linear, so blocks of outputs are computed as one integer matrix product with the last 31 values
    (uint64 products wrap modulo 2^64, which keeps them exact modulo 2^32).

    With the same seed, ``relion_postprocess --random_seed`` (default 0) and cryocli draw the same phases.
    """

    _BLOCK = 4096
    _MASK = np.uint64(0xFFFFFFFF)
    _jump: np.ndarray | None = None

    def __init__(self, seed: int = 0) -> None:
        if not 0 <= seed < 2**31:
            raise ValueError(f"seed {seed} outside [0, 2^31)")
        r = [seed or 1]
        for _ in range(30):
            r.append((16807 * r[-1]) % 2147483647)
        r += r[:3]
        # Outputs start at r[344]; keep the 31 latest values and the values already computed but not used.
        self._state = np.array(r[3:34], dtype=np.uint64)
        self._pending = np.zeros(0, dtype=np.uint64)
        self._skip = 344 - 34

    @classmethod
    def _matrix(cls) -> np.ndarray:
        if cls._jump is None:
            rows = np.zeros((31 + cls._BLOCK, 31), dtype=np.uint64)
            rows[:31] = np.eye(31, dtype=np.uint64)
            for j in range(31, 31 + cls._BLOCK):
                rows[j] = (rows[j - 31] + rows[j - 3]) & cls._MASK
            cls._jump = rows[31:]
        return cls._jump

    def _raw(self, count: int) -> np.ndarray:
        blocks = [self._pending]
        have = len(self._pending)
        need = count + self._skip
        jump = self._matrix()
        while have < need:
            block = (jump @ self._state) & self._MASK
            self._state = block[-31:]
            blocks.append(block)
            have += len(block)
        seq = np.concatenate(blocks)
        out, self._pending = seq[self._skip:need], seq[need:]
        self._skip = 0
        return out

    def rand(self, count: int) -> np.ndarray:
        """The next ``count`` values of ``rand()`` (int64 in [0, 2^31 - 1])."""
        return (self._raw(count) >> np.uint64(1)).astype(np.int64)

    def uniform_phases(self, count: int) -> np.ndarray:
        """``count`` phases in [0, 2 pi) radians computed as RELION's ``rnd_unif(0, 2 pi)`` in single precision."""
        scale = np.float32(np.float32(2147483647) / np.float32(2 * np.pi))
        return (self.rand(count).astype(np.float32) / scale).astype(np.float64)


def randomize_phases_beyond(volume: np.ndarray | Tensor, shell: int,
                            source: GlibcRand | torch.Generator | None = None) -> Tensor:
    """Replace the Fourier phases at ``|k|^2 >= shell^2`` (Fourier pixels) by uniform random phases; float64 ``(n, n, n)``.

    As RELION's ``randomizePhasesBeyond``: one phase per voxel of the half transform ``rfftn(volume)`` in
    memory order (kz slowest, kx fastest), amplitudes kept, then the inverse real transform (which keeps
    the Friedel-symmetric part of the ``kx = 0`` plane). ``source`` is a :class:`GlibcRand` (RELION's
    numbers; the default, seeded 0) or a ``torch.Generator``.
    """
    v = _as_tensor(volume)
    n = v.shape[-1]
    spec = torch.fft.rfftn(v)
    outer = rfftn_radius(n, v.device) >= shell
    count = int(outer.sum())
    source = GlibcRand(0) if source is None else source
    if isinstance(source, GlibcRand):
        phases = torch.from_numpy(source.uniform_phases(count)).to(v.device)
    else:
        phases = (torch.rand(count, generator=source, dtype=torch.float64) * (2 * torch.pi)).to(v.device)
    values = spec[outer].abs() * torch.exp(1j * phases)
    spec = spec.masked_scatter(outer, values)
    return torch.fft.irfftn(spec, s=v.shape[-3:])


@dataclass
class MaskedFsc:
    """The four curves of a masked half-map FSC (each ``(n // 2 + 1,)`` per shell) and the randomisation shell."""

    unmasked: np.ndarray
    masked: np.ndarray
    random_masked: np.ndarray
    corrected: np.ndarray
    randomize_at: int


def corrected_masked_fsc(half1: np.ndarray | Tensor, half2: np.ndarray | Tensor, mask: np.ndarray | Tensor,
                         randomize_below: float = 0.8, randomize_shell: int | None = None,
                         source: GlibcRand | torch.Generator | None = None) -> MaskedFsc:
    """Phase-randomisation-corrected masked FSC of two half maps ``(n, n, n)`` with a soft ``mask`` in [0, 1].

    The randomisation shell is ``randomize_shell`` when given, else the first shell > 0 where the
    unmasked FSC drops below ``randomize_below``. Random phases come from ``source`` (default
    ``GlibcRand(0)``, RELION's default stream: half 1 is randomised first, then half 2, from one stream).
    Raises ValueError when the FSC never drops that low.
    """
    a = _as_tensor(half1)
    b, m = _as_tensor(half2, a.device), _as_tensor(mask, a.device)
    unmasked = fsc_tensor(a, b).cpu().numpy()
    masked = fsc_tensor(a * m, b * m).cpu().numpy()
    if randomize_shell is None:
        below = np.nonzero(unmasked[1:] < randomize_below)[0]
        if below.size == 0:
            raise ValueError(f"the unmasked FSC never drops below {randomize_below}: cannot randomise phases")
        randomize_shell = int(below[0]) + 1
    source = GlibcRand(0) if source is None else source
    ra = randomize_phases_beyond(a, randomize_shell, source)
    rb = randomize_phases_beyond(b, randomize_shell, source)
    random_masked = fsc_tensor(ra * m, rb * m).cpu().numpy()
    # RELION: a zero-mean masked pair can give FSC <= 0 at the origin; the origin is then set to 1.
    masked[0] = masked[0] if masked[0] > 0 else 1.0
    random_masked[0] = random_masked[0] if random_masked[0] > 0 else 1.0
    shells = np.arange(len(masked))
    with np.errstate(divide="ignore", invalid="ignore"):
        corr = (masked - random_masked) / (1.0 - random_masked)
    # Two shells of margin, as RELION, because of small artefacts next to the randomisation shell.
    corrected = np.where(shells < randomize_shell + 2, masked, corr)
    return MaskedFsc(unmasked, masked, random_masked, corrected, randomize_shell)


def particle_fsc(fsc: np.ndarray, fraction: float) -> np.ndarray:
    """cisTEM-style ``FSC_part = f FSC / (1 + (f - 1) FSC)`` for a volume fraction factor ``f`` (RELION's ParticleMaskFraction)."""
    fsc = np.asarray(fsc, dtype=np.float64)
    return fraction * fsc / (1.0 + (fraction - 1.0) * fsc)
