"""The contrast transfer function exactly as RELION computes it (``src/ctf.cpp``).

Units: defocus in Angstrom, astigmatism angle and phase shift in degrees (as in STAR files), voltage in
kV, Cs in mm, B-factor in A^2, spatial frequency in 1/A. The angle of a Fourier pixel is measured from
+x (the column axis of an ``[y, x]`` array) towards +y. ``CTF(0) = +Q0`` (before the scale factor), so
projections multiplied by it keep the sign of the map; RELION's default "dark protein" images are the
negative of that (see ``simulate --invert``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import numpy as np
import torch
from torch import Tensor

from cryocli.imaging.fourier import rfft_frequencies


@dataclass(frozen=True)
class CTFParams:
    """Per-particle CTF parameters, each a tensor of shape ``(B,)`` on the same device.

    defocus_u, defocus_v: Angstrom (underfocus positive). defocus_angle: degrees. voltage: kV.
    cs: mm. amplitude_contrast: fraction Q0. phase_shift: degrees. bfactor: A^2. scale: unitless.
    """

    defocus_u: Tensor
    defocus_v: Tensor
    defocus_angle: Tensor
    voltage: Tensor
    cs: Tensor
    amplitude_contrast: Tensor
    phase_shift: Tensor
    bfactor: Tensor
    scale: Tensor

    def __len__(self) -> int:
        return int(self.defocus_u.shape[0])

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> CTFParams:
        """The same parameters on another device (and optionally dtype)."""
        return replace(self, **{f.name: getattr(self, f.name).to(device=device, dtype=dtype) for f in fields(self)})

    def index(self, idx: Tensor | slice) -> CTFParams:
        """The parameters of a subset of particles."""
        return replace(self, **{f.name: getattr(self, f.name)[idx] for f in fields(self)})

    @staticmethod
    def build(defocus_u, defocus_v, defocus_angle, voltage, cs, amplitude_contrast, phase_shift=0.0,
              bfactor=0.0, scale=1.0, dtype: torch.dtype = torch.float64) -> CTFParams:
        """Build from scalars or arrays, broadcasting every field to the number of particles."""
        values = dict(defocus_u=defocus_u, defocus_v=defocus_v, defocus_angle=defocus_angle, voltage=voltage,
                      cs=cs, amplitude_contrast=amplitude_contrast, phase_shift=phase_shift, bfactor=bfactor,
                      scale=scale)
        # np.array copies: pandas 3 hands out read-only column arrays, which torch refuses to wrap. Tensors go
        # straight (numpy 2 warns when it converts them, their __array__ taking no copy argument).
        tensors = {k: (v.detach().to(device="cpu", dtype=dtype) if torch.is_tensor(v)
                       else torch.as_tensor(np.array(v, dtype=np.float64), dtype=dtype)).reshape(-1)
                   for k, v in values.items()}
        b = max(t.shape[0] for t in tensors.values())
        return CTFParams(**{k: t.expand(b).clone() for k, t in tensors.items()})


def electron_wavelength(voltage_kv: Tensor | float) -> Tensor:
    """Relativistic electron wavelength in Angstrom for an acceleration voltage in kV."""
    v = torch.as_tensor(voltage_kv, dtype=torch.float64) * 1e3
    return 12.2643247 / torch.sqrt(v * (1.0 + 0.978466e-6 * v))


def ctf_at(params: CTFParams, kx: Tensor, ky: Tensor) -> Tensor:
    """CTF at spatial frequencies ``kx, ky`` (1/A, shape broadcastable to ``(B, ...)``); returns ``(B, ...)``.

    ``gamma = -K1 * defocus(theta) * u^2 + K2 * u^4 - K5 - K3`` and ``CTF = -sin(gamma) * exp(-B u^2 / 4) * scale``
    with the constants of RELION's ``CTF::initialise``.
    """
    dtype = kx.dtype
    extra = kx.dim()

    def per_particle(t: Tensor) -> Tensor:
        return t.to(device=kx.device, dtype=torch.float64).reshape(-1, *([1] * extra))

    lam = per_particle(electron_wavelength(params.voltage))
    q0 = per_particle(params.amplitude_contrast)
    k1 = math.pi * lam
    k2 = math.pi / 2.0 * per_particle(params.cs) * 1e7 * lam**3
    k3 = torch.atan(q0 / torch.sqrt(1.0 - q0**2))
    k4 = -per_particle(params.bfactor) / 4.0
    k5 = torch.deg2rad(per_particle(params.phase_shift))
    kx64, ky64 = kx.to(torch.float64), ky.to(torch.float64)
    u2 = kx64**2 + ky64**2
    theta = torch.atan2(ky64, kx64)
    az = torch.deg2rad(per_particle(params.defocus_angle))
    du, dv = per_particle(params.defocus_u), per_particle(params.defocus_v)
    defocus = du * torch.cos(theta - az) ** 2 + dv * torch.sin(theta - az) ** 2
    gamma = -k1 * defocus * u2 + k2 * u2**2 - k5 - k3
    ctf = -torch.sin(gamma) * torch.exp(k4 * u2) * per_particle(params.scale)
    return ctf.to(dtype)


def compute_ctf(params: CTFParams, n: int, pixel_size: float, device: torch.device | str | None = None,
                dtype: torch.dtype = torch.float32) -> Tensor:
    """CTF of every particle on the half-transform grid of box ``n`` (pixel size in A): ``(B, n, n // 2 + 1)``."""
    ky, kx = rfft_frequencies(n, device=device, dtype=torch.float64)
    return ctf_at(params, kx / pixel_size, ky / pixel_size).to(dtype)
