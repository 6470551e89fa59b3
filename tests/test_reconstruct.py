"""Direct Fourier reconstruction: recovery of a known map, and relion_reconstruct's maps of set_3j9g."""

from __future__ import annotations

import math

import mrcfile
import numpy as np
import pytest
import starfile
import torch
from scipy.spatial.transform import Rotation

from cryocli.analysis.fsc import fsc_curve
from cryocli.geometry.rotations import euler_to_matrix
from cryocli.imaging.ctf import CTFParams, compute_ctf
from cryocli.imaging.fourier import image_to_rfft, rfft_to_image
from cryocli.geometry.symmetry import equivalent_poses, symmetry_operators
from cryocli.imaging.point_group import symmetrise_accumulators
from cryocli.imaging.projector import BackProjector, Projector, half_plane_pixels
from cryocli.engines.common.kernel_backprojection import BackProjectorLike, GaussianKernelBackProjector
from cryocli.engines.common.reconstruct import DirectFourierReconstructor, reconstruct, soft_mask_outside_map
from cryocli.io.mrc import read_map
from tests.conftest import DEVICES, RELION_SET, need


def col(df, name: str) -> np.ndarray:
    return df[name].to_numpy(dtype=np.float64, copy=True)


def uniform_rotations(count: int, seed: int) -> torch.Tensor:
    """Rotation matrices uniform on SO(3) (the convention does not matter for a uniform set)."""
    return torch.from_numpy(Rotation.random(count, random_state=seed).as_matrix())


def blob_volume(n: int, seed: int, count: int = 8, sigma: float = 1.0, extent: float = 0.3,
                copies: int = 1) -> torch.Tensor:
    """Gaussian blobs (sigma in voxels) within ``extent * n`` of the centre ``n // 2``: signal up to Nyquist.

    ``copies`` > 1 repeats every blob at ``copies`` rotations about z through the centre (a C_copies map).
    """
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*(np.arange(n) - n // 2,) * 3, indexing="ij")
    vol = np.zeros((n, n, n))
    for _ in range(count):
        c = rng.uniform(-extent * n, extent * n, 3)
        amp = rng.uniform(0.5, 1.5)
        for k in range(copies):
            t = 2 * np.pi * k / copies
            cx, cy = np.cos(t) * c[0] - np.sin(t) * c[1], np.sin(t) * c[0] + np.cos(t) * c[1]
            vol += amp * np.exp(-((x - cx) ** 2 + (y - cy) ** 2 + (z - c[2]) ** 2) / (2 * sigma**2))
    return torch.from_numpy(vol)


def projections(vol: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    return rfft_to_image(Projector(vol).project(rot), vol.shape[-1])


def shells_upto(fsc: np.ndarray, fraction: float) -> np.ndarray:
    """FSC values of shells 1 .. floor(fraction * Nyquist)."""
    nyquist = len(fsc) - 1
    return fsc[1:int(math.floor(fraction * nyquist)) + 1]


# ----------------------------------------------------------------------------------------------
# Known map, noiseless CTF-free projections
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def synthetic():
    n = 32
    vol = blob_volume(n, seed=4)
    rot = uniform_rotations(2000, seed=5)
    return vol, rot, projections(vol, rot)


@pytest.mark.parametrize("device", DEVICES)
def test_recovers_known_map(synthetic, device: str):
    vol, rot, images = synthetic
    rec = reconstruct(images.to(device), rot.to(device), None, None, pixel_size=1.0, device=device,
                      dtype=torch.float64).cpu()
    fsc = fsc_curve(rec, vol)
    # Measured: FSC >= 0.99965 up to 0.8 Nyquist (0.895 at Nyquist), voxel correlation 0.99975, scale 0.9987.
    assert shells_upto(fsc, 0.8).min() > 0.9
    corr = np.corrcoef(rec.numpy().ravel(), vol.numpy().ravel())[0, 1]
    scale = float((rec * vol).sum() / (rec * rec).sum())
    assert corr > 0.99
    assert scale == pytest.approx(1.0, abs=0.02)


@pytest.mark.parametrize("device", DEVICES)
def test_gridding_iterations_also_recover_known_map(synthetic, device: str):
    vol, rot, images = synthetic
    rec = reconstruct(images.to(device), rot.to(device), None, None, pixel_size=1.0, device=device,
                      gridding_iterations=10, dtype=torch.float64).cpu()
    assert shells_upto(fsc_curve(rec, vol), 0.8).min() > 0.9


@pytest.mark.parametrize("device", DEVICES)
def test_streaming_batches_equal_one_shot(synthetic, device: str):
    vol, rot, images = synthetic
    images, rot = images[:300].to(device), rot[:300].to(device)
    seen = []
    one = reconstruct(images, rot, None, None, pixel_size=1.0, device=device, batch_size=300).cpu()
    batches = (images[s:s + 64] for s in range(0, 300, 64))
    streamed = reconstruct(batches, rot, None, None, pixel_size=1.0, device=device,
                           progress=lambda done, total: seen.append((done, total))).cpu()
    assert torch.allclose(one, streamed, atol=1e-5 * float(one.abs().max()))
    assert seen[-1] == (300, 300) and len(seen) == 5


@pytest.mark.parametrize("device", DEVICES)
def test_maxres_ignores_frequencies_beyond_it(synthetic, device: str):
    """With --maxres 4 A (1 A/px, box 32: radius ceil(32 / 4) = 8 px) the images' content beyond 8 px is
    never used: corrupting it leaves the map unchanged, while it changes the unlimited reconstruction."""
    vol, rot, images = synthetic
    n = vol.shape[-1]
    images, rot = images[:300], rot[:300]
    spectra = image_to_rfft(images)
    ky = torch.fft.fftfreq(n, 1.0 / n, dtype=torch.float64)
    kx = torch.fft.rfftfreq(n, 1.0 / n, dtype=torch.float64)
    beyond = (ky[:, None] ** 2 + kx[None, :] ** 2) > 8.5**2
    noise = torch.randn(spectra.shape, dtype=torch.complex128) * spectra.abs().max()
    corrupted = rfft_to_image(torch.where(beyond, spectra + noise, spectra), n)
    images, corrupted, rot = images.to(device), corrupted.to(device), rot.to(device)
    limited = reconstruct(images, rot, None, None, pixel_size=1.0, maxres=4.0, device=device,
                          dtype=torch.float64).cpu()
    limited_bad = reconstruct(corrupted, rot, None, None, pixel_size=1.0, maxres=4.0, device=device,
                              dtype=torch.float64).cpu()
    assert torch.allclose(limited, limited_bad, atol=1e-10 * float(limited.abs().max()))
    full = reconstruct(images, rot, None, None, pixel_size=1.0, device=device, dtype=torch.float64).cpu()
    full_bad = reconstruct(corrupted, rot, None, None, pixel_size=1.0, device=device, dtype=torch.float64).cpu()
    assert float((full - full_bad).abs().max()) > 0.1 * float(full.abs().max())
    # Below the limit the limited map agrees with the full one (FSC over shells 1..6).
    assert fsc_curve(limited, full)[1:7].min() > 0.99


@pytest.mark.parametrize("device", DEVICES)
def test_soft_mask_outside_map_matches_relion_definition(device: str):
    n = 16
    vol = torch.arange(n**3, dtype=torch.float64).reshape(n, n, n)
    out = soft_mask_outside_map(vol.to(device)).cpu()
    k = torch.arange(n, dtype=torch.float64) - n // 2
    r = torch.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2)
    inner, outer = r < n / 2, r > n / 2 + 3
    assert torch.equal(out[inner], vol[inner])
    edge = ~inner & ~outer
    w = 0.5 + 0.5 * torch.cos(math.pi * (n / 2 + 3 - r[edge]) / 3)
    background = (torch.cat([w, torch.ones(int(outer.sum()), dtype=torch.float64)]) *
                  torch.cat([vol[edge], vol[outer]])).sum() / (w.sum() + outer.sum())
    assert torch.allclose(out[outer], background.expand(int(outer.sum())))
    assert torch.allclose(out[edge], (1 - w) * vol[edge] + w * background)


# ----------------------------------------------------------------------------------------------
# Symmetry
# ----------------------------------------------------------------------------------------------

def c4_operators() -> torch.Tensor:
    return euler_to_matrix(torch.tensor([0.0, 90.0, 180.0, 270.0]), torch.zeros(4), torch.zeros(4)).double()


@pytest.mark.parametrize("device", DEVICES)
def test_c4_symmetrised_reconstruction(device: str):
    n = 32
    vol = blob_volume(n, seed=8, count=4, copies=4)
    ops = c4_operators()
    rot = uniform_rotations(120, seed=9)
    images = projections(vol, rot)
    # The map really is C4: its projections at A and A @ L are the same images.
    assert torch.allclose(projections(vol, rot[:3] @ ops[1]), images[:3], atol=1e-6 * float(images.abs().max()))
    c1 = reconstruct(images.to(device), rot.to(device), None, None, pixel_size=1.0, device=device,
                     dtype=torch.float64).cpu()
    c4 = reconstruct(images.to(device), rot.to(device), None, None, pixel_size=1.0, sym_ops=ops.to(device),
                     device=device, dtype=torch.float64).cpu()
    fsc_c1, fsc_c4 = shells_upto(fsc_curve(c1, vol), 0.8), shells_upto(fsc_curve(c4, vol), 0.8)
    # 120 views leave gaps at high resolution that the 4 symmetry copies fill. Measured: min FSC up to
    # 0.8 Nyquist 0.9917 (C1) -> 0.9993 (C4), i.e. 1 - FSC ten times smaller.
    assert fsc_c4.min() > 0.9
    assert 1 - fsc_c4.min() < 0.5 * (1 - fsc_c1.min())
    # The other side (L @ A: an in-plane rotation of the image) is wrong and wrecks the map (measured
    # mean FSC 0.66, min 0.47, against 0.9996 / 0.9993).
    wrong_rot = (ops[:, None] @ rot[None]).reshape(-1, 3, 3)
    wrong = reconstruct(images.repeat(4, 1, 1).to(device), wrong_rot.to(device), None, None, pixel_size=1.0,
                        device=device, dtype=torch.float64).cpu()
    assert shells_upto(fsc_curve(wrong, vol), 0.8).mean() < 0.8


# ----------------------------------------------------------------------------------------------
# relion_reconstruct on set_3j9g
# ----------------------------------------------------------------------------------------------

def load_set(kind: str, subset: int | None = None):
    star = starfile.read(need(RELION_SET / kind / f"{kind}.star"))
    optics, parts = star["optics"], star["particles"]
    keep = np.ones(len(parts), dtype=bool) if subset is None else parts["rlnRandomSubset"].to_numpy() == subset
    parts = parts[keep]
    rot = euler_to_matrix(torch.tensor(col(parts, "rlnAngleRot")), torch.tensor(col(parts, "rlnAngleTilt")),
                          torch.tensor(col(parts, "rlnAnglePsi"))).double()
    origins = torch.tensor(np.stack([col(parts, "rlnOriginXAngst"), col(parts, "rlnOriginYAngst")], axis=1))
    ctf = CTFParams.build(col(parts, "rlnDefocusU"), col(parts, "rlnDefocusV"), col(parts, "rlnDefocusAngle"),
                          float(optics["rlnVoltage"].iloc[0]), float(optics["rlnSphericalAberration"].iloc[0]),
                          float(optics["rlnAmplitudeContrast"].iloc[0]), col(parts, "rlnPhaseShift"),
                          col(parts, "rlnCtfBfactor"))
    images = mrcfile.read(need(RELION_SET / kind / f"{kind}.mrcs"))[keep]
    return images, rot, origins, ctf, float(optics["rlnImagePixelSize"].iloc[0])


def compare(ours: torch.Tensor, reference_name: str) -> tuple[np.ndarray, float, float]:
    ref = read_map(need(RELION_SET / "reconstruct" / reference_name)).data.astype(np.float64)
    v = ours.numpy().astype(np.float64)
    fsc = fsc_curve(v, ref)
    corr = float(np.corrcoef(v.ravel(), ref.ravel())[0, 1])
    scale = float((v * ref).sum() / (v * v).sum())
    return fsc, corr, scale


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("subset, reference", [(None, "rec.mrc"), (1, "rec_half1.mrc"), (2, "rec_half2.mrc")])
def test_matches_relion_reconstruct_noisy(subset: int | None, reference: str, device: str):
    images, rot, origins, ctf, apix = load_set("noisy", subset)
    ours = reconstruct(torch.from_numpy(images).to(device), rot.to(device), origins.to(device), ctf.to(device), apix,
                       device=device).cpu()
    fsc, corr, scale = compare(ours, reference)
    # Measured (all / half1 / half2): FSC up to 0.9 Nyquist >= 0.99993 / 0.99994 / 0.99987 (0.990 / 0.993 /
    # 0.976 at Nyquist), voxel correlation 0.99964 / 0.99946 / 0.99877, scale 1.0001 / 1.0002 / 0.9999.
    # The residual sits at the Fourier boundary: RELION keeps or drops each image's pixels at exactly
    # |k| = n/2 by a floating-point test on the rotated coordinate (cryocli keeps them all), and on noisy
    # data those few voxels carry noise into every real-space voxel.
    assert shells_upto(fsc, 0.9).min() > 0.999
    assert corr > 0.998
    assert scale == pytest.approx(1.0, abs=0.002)


@pytest.mark.parametrize("device", DEVICES)
def test_matches_relion_reconstruct_clean_voxel_for_voxel(device: str):
    images, rot, origins, ctf, apix = load_set("clean")
    ours = reconstruct(torch.from_numpy(images).to(device), rot.to(device), origins.to(device), ctf.to(device), apix,
                       device=device).cpu()
    fsc, corr, scale = compare(ours, "rec_clean.mrc")
    # Measured: correlation 0.9999989, scale 1.00002, max |difference| 7.5e-4 of the map maximum,
    # FSC >= 0.99977 in every shell.
    assert corr > 0.99999
    assert scale == pytest.approx(1.0, abs=1e-3)
    assert fsc[1:].min() > 0.999
    ref = read_map(RELION_SET / "reconstruct" / "rec_clean.mrc").data
    assert float(np.abs(ours.numpy() - ref).max()) < 2e-3 * float(np.abs(ref).max())


@pytest.mark.parametrize("device", DEVICES)
def test_ctf_premultiplied_images_give_the_same_map(device: str):
    images, rot, origins, ctf, apix = load_set("clean")
    images, rot, origins, ctf = images[:100], rot[:100], origins[:100], ctf.index(slice(0, 100))
    n = images.shape[-1]
    rot_d, origins_d, ctf_d = rot.to(device), origins.to(device), ctf.to(device)
    plain = reconstruct(torch.from_numpy(images).to(device), rot_d, origins_d, ctf_d, apix, device=device,
                        dtype=torch.float64).cpu()
    spectra = image_to_rfft(torch.from_numpy(images.astype(np.float64)))
    premultiplied = rfft_to_image(spectra * compute_ctf(ctf, n, apix, dtype=torch.float64), n)
    again = reconstruct(premultiplied.to(device), rot_d, origins_d, ctf_d, apix, device=device, ctf_premultiplied=True,
                        dtype=torch.float64).cpu()
    assert torch.allclose(plain, again, atol=1e-9 * float(plain.abs().max()))


@pytest.mark.parametrize("device", DEVICES)
def test_reconstructor_rejects_wrong_box(device: str):
    rec = DirectFourierReconstructor(16, 1.0, device=device)
    with pytest.raises(ValueError):
        rec.add(torch.zeros(2, 18, 18).to(device), torch.eye(3).expand(2, 3, 3).to(device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cls", [BackProjector, GaussianKernelBackProjector])
def test_backprojectors_share_one_interface(cls: type, device: str):
    """Both backprojectors are BackProjectorLike, and inserting pixels is inserting the slices they come from."""
    n = 12
    gen = torch.Generator().manual_seed(0)
    rot = torch.as_tensor(Rotation.random(3, random_state=1).as_matrix(), dtype=torch.float64)
    slices = torch.complex(torch.randn(3, n, n // 2 + 1, generator=gen, dtype=torch.float64),
                           torch.randn(3, n, n // 2 + 1, generator=gen, dtype=torch.float64))
    weights = torch.rand(3, n, n // 2 + 1, generator=gen, dtype=torch.float64) - 0.2
    rot, slices, weights = rot.to(device), slices.to(device), weights.to(device)
    whole, pixels = cls(n, device=device, dtype=torch.float64), cls(n, device=device, dtype=torch.float64)
    assert isinstance(whole, BackProjectorLike)
    whole.insert(slices, weights, rot)
    pix, kx, ky = half_plane_pixels(n, n // 2, skip_redundant=True, device=device, dtype=torch.float64)
    pixels.insert_pixels(slices.reshape(3, -1)[:, pix], weights.reshape(3, -1)[:, pix], rot, kx, ky)
    assert torch.allclose(whole.accumulators.cpu(), pixels.accumulators.cpu(), rtol=0, atol=1e-12)
    assert float(whole.weight.abs().sum()) > 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sym", ["C6", "D3", "O"])
def test_point_group_on_the_grid_matches_inserting_every_operator(sym: str, device: str):
    """Each image inserted once and the accumulators summed over the group on the grid (RELION's
    ``BackProjector::symmetrise``) against each image inserted at every operator's pose ``A @ L``."""
    n = 32
    vol = blob_volume(n, seed=3, count=4, copies=6)
    ops = symmetry_operators(sym, torch.float64)
    rot = uniform_rotations(150, seed=4)
    images = projections(vol, rot)
    images, rot, ops = images.to(device), rot.to(device), ops.to(device)
    on_grid = reconstruct(images, rot, None, None, pixel_size=1.0, sym_ops=ops, device=device,
                          dtype=torch.float64).cpu()
    every_pose = reconstruct(images.repeat_interleave(ops.shape[0], 0), equivalent_poses(rot, ops).reshape(-1, 3, 3),
                             None, None, pixel_size=1.0, device=device, dtype=torch.float64).cpu()
    between = shells_upto(fsc_curve(on_grid, every_pose), 1.0)
    # The operators of O map grid points onto grid points, so its interpolation is exact; those of C6 and D3
    # interpolate the accumulated grid, which RELION accepts. Measured: min FSC to Nyquist 0.9985 (C6), 0.9963 (D3),
    # 1 - 7e-16 (O).
    assert between.min() > (0.999999 if sym == "O" else 0.99)
    # The result has the point group's symmetry: the map turned by an operator is the map.
    turned = reconstruct(images, rot @ ops[1], None, None, pixel_size=1.0, sym_ops=ops, device=device,
                         dtype=torch.float64).cpu()
    assert shells_upto(fsc_curve(turned, on_grid), 0.8).min() > 0.99


@pytest.mark.parametrize("device", DEVICES)
def test_point_group_leaves_c1_accumulators_alone(device: str):
    data = torch.randn(9, 9, 9, dtype=torch.complex64).to(device)
    weight = torch.rand(9, 9, 9).to(device)
    for ops in (None, torch.eye(3)[None].to(device)):
        out = symmetrise_accumulators(data, weight, ops, 3)
        assert out[0] is data and out[1] is weight
