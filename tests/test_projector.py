"""The projector against relion_project images (ASPIRE's saved sets, set_3j9g), real space, and its adjoint."""

from __future__ import annotations

import math

import mrcfile
import numpy as np
import pytest
import starfile
import torch
from scipy import ndimage

from cryocli.geometry.rotations import euler_to_matrix
from cryocli.imaging.ctf import CTFParams, compute_ctf
from cryocli.imaging.fourier import (centred_grid_3d, fft_to_volume, fourier_resample_volume, image_to_rfft,
                                     radius2_3d, radius_3d, rfft_radius, rfft_to_image, volume_to_fft)
from cryocli.imaging.hartley import (hartley_from_rfft, hartley_to_image, hartley_to_volume, hartley_volume,
                                     image_to_hartley, project_hartley, volume_to_hartley)
from cryocli.imaging.projector import (BackProjector, Projector, backproject_slices_ft, fourier_grid_size,
                                       fourier_volume, project_volume_ft, sample_grid, sampling_parts,
                                       scatter_grid, _normalised_grid)
from cryocli.imaging.shifts import phase_shift, shift_from_center, shift_to_center
from cryocli.io.mrc import read_map
from tests.conftest import ASPIRE, DEVICES, EXTERNAL, RELION_SET, need

RIBOSOME = EXTERNAL / "ASPIRE-Python" / "gallery" / "tutorials" / "data" / "clean70SRibosome_vol_65p.mrc"


def col(df, name: str) -> np.ndarray:
    return df[name].to_numpy(dtype=np.float64, copy=True)


def rotations_of(df) -> torch.Tensor:
    return euler_to_matrix(torch.tensor(col(df, "rlnAngleRot")), torch.tensor(col(df, "rlnAngleTilt")),
                           torch.tensor(col(df, "rlnAnglePsi"))).double()


def nyquist_mask(n: int, r_max: float) -> torch.Tensor:
    """Half-transform pixels ``(n, n // 2 + 1)`` with ``|k| <= r_max`` Fourier pixels."""
    return rfft_radius(n, dtype=torch.float64) <= r_max


def fourier_corr(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-image correlation of two half transforms over the pixels of ``mask``."""
    a, b = a[:, mask], b[:, mask]
    return (a * b.conj()).real.sum(-1) / torch.sqrt((a.abs() ** 2).sum(-1) * (b.abs() ** 2).sum(-1))


def fit_scale(model: torch.Tensor, data: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    a, b = model[:, mask], data[:, mask]
    return (a * b.conj()).real.sum(-1) / (a.abs() ** 2).sum(-1)


def aspire_set(name: str):
    df = starfile.read(need(ASPIRE / f"{name}.star"))
    df = df["particles"] if isinstance(df, dict) else df
    shifts = np.zeros((len(df), 2))
    if "rlnOriginX" in df:  # RELION 3.0 origins, in pixels
        shifts = np.stack([col(df, "rlnOriginX"), col(df, "rlnOriginY")], axis=1)
    images = torch.from_numpy(mrcfile.read(need(ASPIRE / f"{name}.mrcs")).astype(np.float64))
    return rotations_of(df), torch.tensor(shifts), images


def simulate(volume: torch.Tensor, rotations: torch.Tensor, origins_px: torch.Tensor) -> torch.Tensor:
    """relion_project without CTF: centred slice, then the particle moved to box centre - origin."""
    n = volume.shape[-1]
    return phase_shift(Projector(volume).project(rotations), -origins_px, n)


# RELION centres odd-sized images one pixel further than n // 2 (CenterFFT shifts by floor(n / 2) in both
# directions, so its image origin is index n // 2 + 1 for odd n), while maps keep theirs at n // 2.
# cryocli's image layout puts the centre at n // 2, so RELION's odd images sit at +1 pixel in x and y.
RELION_ODD_IMAGE_OFFSET = torch.tensor([1.0, 1.0], dtype=torch.float64)


@pytest.fixture(scope="module")
def ribosome() -> torch.Tensor:
    return torch.from_numpy(read_map(need(RIBOSOME)).data.copy()).double()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["rln_proj_65", "rln_proj_65_centered", "rln_proj_65_shifted"])
def test_relion_project_odd_box(ribosome: torch.Tensor, name: str, device: str):
    rot, origins, images = aspire_set(name)
    n = images.shape[-1]
    data = image_to_rfft(images)
    inside = nyquist_mask(n, n // 2)
    model = simulate(ribosome.to(device), rot.to(device), origins.to(device))
    at_relion_centre = phase_shift(model, RELION_ODD_IMAGE_OFFSET.expand(len(rot), 2).to(device), n).cpu()
    model = model.cpu()
    corr = fourier_corr(at_relion_centre, data, inside)
    # Measured: 1.00000 for every image, scale 1.0000 (projection = line integral in voxel units).
    assert float(corr.min()) > 0.99
    assert torch.allclose(fit_scale(at_relion_centre, data, inside), torch.ones(len(rot), dtype=torch.float64),
                          atol=1e-3)
    # Without RELION's odd-box image offset the match is clearly worse (measured 0.83-0.90).
    assert float(fourier_corr(model, data, inside).max()) < 0.95


@pytest.mark.parametrize("device", DEVICES)
def test_relion_origins_move_the_particle_to_centre_minus_origin(device: str):
    """rln_proj_65_shifted = rln_proj_65_centered shifted by -origin; shift_to_center undoes it."""
    rot, origins, shifted = aspire_set("rln_proj_65_shifted")
    _, _, centred = aspire_set("rln_proj_65_centered")
    n = shifted.shape[-1]
    inside = nyquist_mask(n, n // 2)
    recentred = shift_to_center(image_to_rfft(shifted).to(device), origins.to(device), 1.0).cpu()
    assert float(fourier_corr(recentred, image_to_rfft(centred), inside).min()) > 0.9999
    wrong_way = shift_from_center(image_to_rfft(shifted).to(device), origins.to(device), 1.0).cpu()
    assert float(fourier_corr(wrong_way, image_to_rfft(centred), inside).max()) < 0.5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["rln_proj_64_centered", "rln_proj_64_shifted"])
def test_relion_project_even_box_of_downsampled_map(ribosome: torch.Tensor, name: str, device: str):
    """ASPIRE's 64 px sets: the 65^3 map Fourier-cropped to 64^3 (ASPIRE's Volume.downsample) reproduces them."""
    rot, origins, images = aspire_set(name)
    vol64 = fourier_resample_volume(ribosome.to(device), 64)
    data = image_to_rfft(images)
    inside = nyquist_mask(64, 32)
    model = simulate(vol64, rot.to(device), origins.to(device)).cpu()
    corr = fourier_corr(model, data, inside)
    assert float(corr.min()) > 0.99  # measured 1.00000
    assert torch.allclose(fit_scale(model, data, inside), torch.ones(len(rot), dtype=torch.float64), atol=1e-3)


@pytest.mark.parametrize("device", DEVICES)
def test_relion_project_even_box_first_set_needs_half_voxel_map_shift(ribosome: torch.Tensor, device: str):
    """rln_proj_64 was made from a different downsampling: the 65^3 map moved by -1/2 voxel on x, y and z,
    then cropped to 64^3 (found by fitting per-image shifts: the 2D offsets are the projections of one 3D
    offset (-0.41, -0.47, -0.48) voxels). With that map every image matches."""
    rot, origins, images = aspire_set("rln_proj_64")
    rot, origins, vol = rot.to(device), origins.to(device), ribosome.to(device)
    n65 = ribosome.shape[-1]
    k = torch.arange(n65, dtype=torch.float64) - n65 // 2
    half = 2j * math.pi * 0.5 / n65
    ramp = torch.exp(half * (k[:, None, None] + k[None, :, None] + k[None, None, :]))  # shift by -1/2 voxel
    moved = fft_to_volume(volume_to_fft(vol) * ramp.to(device))
    data = image_to_rfft(images)
    inside = nyquist_mask(64, 32)
    corr = fourier_corr(simulate(fourier_resample_volume(moved, 64), rot, origins).cpu(), data, inside)
    assert float(corr.min()) > 0.99  # measured 0.99999
    plain = fourier_corr(simulate(fourier_resample_volume(vol, 64), rot, origins).cpu(), data, inside)
    assert float(plain.min()) < 0.99  # measured 0.951-0.992


@pytest.mark.parametrize("device", DEVICES)
def test_ctf_projections_match_relion_clean_set(device: str):
    """All 600 CTF-modulated, shifted projections of set_3j9g/map.mrc equal RELION's clean.mrcs."""
    star = starfile.read(need(RELION_SET / "clean" / "clean.star"))
    optics, parts = star["optics"], star["particles"]
    apix = float(optics["rlnImagePixelSize"].iloc[0])
    vol = torch.from_numpy(read_map(need(RELION_SET / "map.mrc")).data.copy())
    rot = rotations_of(parts).float()
    origins = torch.tensor(np.stack([col(parts, "rlnOriginXAngst"), col(parts, "rlnOriginYAngst")], axis=1))
    ctf = CTFParams.build(col(parts, "rlnDefocusU"), col(parts, "rlnDefocusV"), col(parts, "rlnDefocusAngle"),
                          float(optics["rlnVoltage"].iloc[0]), float(optics["rlnSphericalAberration"].iloc[0]),
                          float(optics["rlnAmplitudeContrast"].iloc[0]), col(parts, "rlnPhaseShift"),
                          col(parts, "rlnCtfBfactor"))
    projections = Projector(vol.to(device)).project(rot.to(device))
    ctf_images = compute_ctf(ctf.to(device), 64, apix, device=device)
    model = (shift_from_center(projections, origins.float().to(device), apix) * ctf_images).cpu()
    data = image_to_rfft(torch.from_numpy(mrcfile.read(need(RELION_SET / "clean" / "clean.mrcs")).copy()))
    inside = nyquist_mask(64, 31.5)  # the Nyquist row/column is evaluated at +Nyquist by RELION
    corr = fourier_corr(model, data, inside)
    assert corr.shape[0] == 600
    assert float(corr.min()) > 0.99  # measured 0.9999998
    rel = ((model - data)[:, inside].abs() ** 2).sum(-1).sqrt() / (data[:, inside].abs() ** 2).sum(-1).sqrt()
    assert float(rel.max()) < 1e-4  # measured 3.4e-6 (float32)


def blob_volume(n: int, seed: int = 0, count: int = 6, sigma: float = 2.5) -> torch.Tensor:
    """A smooth test map: Gaussian blobs (sigma in voxels) inside radius n/4 of the centre n // 2."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*(np.arange(n) - n // 2,) * 3, indexing="ij")
    vol = np.zeros((n, n, n))
    for _ in range(count):
        c = rng.uniform(-n / 4, n / 4, 3)
        vol += rng.uniform(0.5, 1.5) * np.exp(-((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2) / (2 * sigma**2))
    return torch.from_numpy(vol)


def real_space_projection(volume: np.ndarray, a: np.ndarray) -> np.ndarray:
    """sum_z V(A^T (x, y, z)) with cubic-spline interpolation; coordinates relative to the centre n // 2."""
    n = volume.shape[-1]
    r = np.arange(n) - n // 2
    zz, yy, xx = np.meshgrid(r, r, r, indexing="ij")
    image_frame = np.stack([xx, yy, zz]).reshape(3, -1)
    map_xyz = a.T @ image_frame + n // 2
    values = ndimage.map_coordinates(volume, map_xyz[::-1], order=3, mode="constant")
    return values.reshape(n, n, n).sum(axis=0)


@pytest.mark.parametrize("device", DEVICES)
def test_fourier_slice_equals_real_space_rotate_and_sum(device: str):
    n = 64
    vol = blob_volume(n)
    rot = euler_to_matrix(torch.tensor([20.0, 130.0, 250.0]), torch.tensor([35.0, 80.0, 150.0]),
                          torch.tensor([300.0, 10.0, 75.0])).double()
    fourier = rfft_to_image(Projector(vol.to(device)).project(rot.to(device)), n).cpu().numpy()
    for i in range(len(rot)):
        real = real_space_projection(vol.numpy(), rot[i].numpy())
        c = np.corrcoef(fourier[i].ravel(), real.ravel())[0, 1]
        scale = (fourier[i] * real).sum() / (fourier[i] ** 2).sum()
        # Measured: corr 0.99969-0.99979, scale 0.988-0.993. The Fourier projection is RELION's (padded 2x,
        # trilinear, sinc^2 pre-correction), whose images carry ~1% of aliased replica energy; the same
        # projector reproduces relion_project's images at scale 1.0000 above.
        assert c > 0.999
        assert abs(scale - 1.0) < 0.02
    # A transposed rotation (the classic convention mistake) does not match.
    wrong = real_space_projection(vol.numpy(), rot[0].numpy().T)
    assert np.corrcoef(fourier[0].ravel(), wrong.ravel())[0, 1] < 0.9


@pytest.mark.parametrize("device", DEVICES)
def test_identity_projection_is_the_sum_over_z(device: str):
    """A = I reads grid points only (no interpolation): inside the Nyquist circle (beyond it the projector
    returns zero, as RELION) the image is exactly sum_z of the map, and with RELION's gridding
    pre-correction sum_z of map / sinc^2(r / P)."""
    n = 32
    vol = blob_volume(n, seed=3, sigma=2.0)
    eye = torch.eye(3, dtype=torch.float64)[None]
    inside = nyquist_mask(n, n // 2 - 0.5)
    plain = Projector(vol.to(device), gridding_correction=False).project(eye.to(device))[0].cpu()
    expected = image_to_rfft(vol.sum(0))
    tol = 1e-12 * float(expected.abs().max())
    assert float((plain - expected)[inside].abs().max()) < tol
    assert float(plain[~nyquist_mask(n, n // 2)].abs().max()) == 0.0
    corrected = Projector(vol.to(device)).project(eye.to(device))[0].cpu()
    r = torch.sqrt(sum(g**2 for g in torch.meshgrid(*(torch.arange(n, dtype=torch.float64) - n // 2,) * 3,
                                                     indexing="ij")))
    expected = image_to_rfft((vol / torch.sinc(r / (2 * n)) ** 2).sum(0))
    assert float((corrected - expected)[inside].abs().max()) < tol


@pytest.mark.parametrize("device", DEVICES)
def test_adjoint_identity(device: str):
    torch.manual_seed(1)
    n, pad, b = 32, 2, 24
    g = fourier_grid_size(n, pad)
    x = torch.randn(g, g, g, dtype=torch.complex64)
    y = torch.randn(b, n, n // 2 + 1, dtype=torch.complex64)
    rot = euler_to_matrix(*(torch.rand(3, b) * torch.tensor([[360.0], [180.0], [360.0]]))).float()
    px = project_volume_ft(x.to(device), rot.to(device), n, pad).cpu()
    pty = backproject_slices_ft(y.to(device), rot.to(device), n, pad).cpu()
    lhs = (px.conj() * y).sum().to(torch.complex128)
    rhs = (x.conj() * pty).sum().to(torch.complex128)
    assert abs(lhs - rhs) / abs(lhs) < 1e-5  # measured ~1e-7


def _grid_sample_scatter(values: torch.Tensor, coords: torch.Tensor, g: int) -> torch.Tensor:
    """grid_sample's own input-gradient kernel: the trilinear scatter-add its adjoint must equal."""
    c = values.shape[0]
    grid = _normalised_grid(coords, g).reshape(1, 1, 1, -1, 3)
    shape_only = torch.zeros((), dtype=values.dtype).expand(1, c, g, g, g)
    grad, _ = torch.ops.aten.grid_sampler_3d_backward(values.reshape(1, c, 1, 1, -1), shape_only, grid, 0, 0, True,
                                                      [True, False])
    return grad[0]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_scatter_grid_is_grid_samples_adjoint_also_off_the_grid(dtype, device):
    """The index_add_ scatter equals grid_sample's backward, including points whose corners leave the grid
    (zero padding: the corners inside still get their share) and points wholly outside."""
    gen = torch.Generator().manual_seed(4)
    g = 21
    coords = (torch.rand(20000, 3, generator=gen, dtype=dtype) * 2 - 1) * 12.5  # grid spans -10 .. 10
    coords[:40] = torch.tensor([10.0, -10.0, 3.0], dtype=dtype)  # on the faces
    values = torch.randn(2, 20000, generator=gen, dtype=dtype)
    ours = scatter_grid(values.to(device), coords.to(device), g, chunk_points=7000).cpu()
    ref = _grid_sample_scatter(values, coords, g)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert float((ours - ref).abs().max()) < tol * float(ref.abs().max())
    x = torch.randn(2, g, g, g, generator=gen, dtype=dtype)
    lhs, rhs = (sample_grid(x, coords) * values).double().sum(), (x * ours).double().sum()
    assert abs(float(lhs - rhs)) < tol * float(lhs.abs())


@pytest.mark.parametrize("n_points", [4096 * 3 + 7, 100])
def test_sample_grid_cut_over_threads_is_bitwise_the_one_entry_sampling(n_points):
    """On the CPU, sample_grid cuts the points into one grid_sample batch entry per thread (when the volume needs no
    gradient): the values and the coordinates' gradients are those of one entry to the bit, also for a point count
    the threads do not divide and for too few points to cut."""
    gen = torch.Generator().manual_seed(5)
    channels = torch.randn(2, 31, 31, 31, generator=gen)
    coords = ((torch.rand(n_points, 3, generator=gen) * 2 - 1) * 16).requires_grad_(True)
    threads = torch.get_num_threads()
    results = []
    try:
        for t in (3, 1):
            torch.set_num_threads(t)
            expected = 1 if t == 1 or n_points < 4096 else 3
            assert sampling_parts(channels, n_points) == expected
            values = sample_grid(channels, coords)
            (grad,) = torch.autograd.grad((values * values).sum(), coords)
            results.append((values, grad))
            assert sampling_parts(channels.clone().requires_grad_(True), n_points) == 1
    finally:
        torch.set_num_threads(threads)
    assert results[0][0].shape == (2, n_points)
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


@pytest.mark.parametrize("device", DEVICES)
def test_gradients_wrt_rotations_and_volume(device: str):
    torch.manual_seed(2)
    n = 8
    vol_ft = fourier_volume(blob_volume(n, seed=5, count=3, sigma=1.2).to(device))
    angles = torch.tensor([[33.0, 71.0, 205.0], [140.0, 22.0, 310.0]], dtype=torch.float64).to(device)
    rot = euler_to_matrix(angles[:, 0], angles[:, 1], angles[:, 2]).double().requires_grad_(True)

    def f(r):
        return project_volume_ft(vol_ft, r, n)

    assert torch.autograd.gradcheck(lambda r: torch.view_as_real(f(r)), (rot,), eps=1e-6, atol=1e-6, rtol=1e-4)

    # Through RELION Euler angles: finite differences in degrees.
    def loss_of_angles(a):
        r = euler_to_matrix(a[:, 0], a[:, 1], a[:, 2])
        return (project_volume_ft(vol_ft, r.double(), n).abs() ** 2).sum()

    ang = angles.clone().requires_grad_(True)
    loss_of_angles(ang).backward()
    h = 1e-4
    for i, j in [(0, 0), (0, 1), (1, 2)]:
        e = torch.zeros_like(angles)
        e[i, j] = h
        fd = (loss_of_angles(angles + e) - loss_of_angles(angles - e)) / (2 * h)
        assert float(ang.grad[i, j]) == pytest.approx(float(fd), rel=1e-4, abs=1e-9 * float(loss_of_angles(angles)))

    # Gradient in the volume is the adjoint applied to the output gradient.
    v = vol_ft.clone().requires_grad_(True)
    y = torch.randn(2, n, n // 2 + 1, dtype=torch.complex128).to(device)
    (project_volume_ft(v, rot.detach(), n).conj() * y).real.sum().backward()
    expected = backproject_slices_ft(y, rot.detach(), n)
    assert torch.allclose(v.grad.cpu(), expected.cpu(), atol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
def test_backprojector_counts_each_fourier_pixel_once(device: str):
    """A = I puts pixel (kx, ky) on voxel (2kx, 2ky, 0): after Hermitian symmetrisation every pixel of the
    full Fourier plane has weight 1 and value F(k) (the kx = 0 column not doubled), the origin weight 2."""
    n = 16
    img = blob_volume(n, seed=7)[n // 2]
    spec = image_to_rfft(img[None])
    eye = torch.eye(3, dtype=torch.float64)[None]
    bp = BackProjector(n, dtype=torch.float64, device=device)
    bp.insert(spec.to(device), None, eye.to(device))
    data, weight = (t.cpu() for t in bp.symmetrised())
    c = bp.grid_size // 2
    full = torch.fft.fftshift(torch.fft.fft2(torch.fft.ifftshift(img)))
    for ky in range(-(n // 2) + 1, n // 2):
        for kx in range(-(n // 2) + 1, n // 2):
            if kx * kx + ky * ky > (n // 2) ** 2:
                continue
            w = float(weight[c, c + 2 * ky, c + 2 * kx])
            expected_w = 2.0 if kx == 0 and ky == 0 else 1.0
            assert w == pytest.approx(expected_w, abs=1e-12)
            value = data[c, c + 2 * ky, c + 2 * kx] / w
            assert abs(value - full[n // 2 + ky, n // 2 + kx]) < 1e-9 * float(full.abs().max())
    doubled = BackProjector(n, dtype=torch.float64, device=device)
    doubled.insert(spec.to(device), None, eye.to(device), skip_redundant=False)
    assert float(doubled.symmetrised()[1].cpu()[c, c + 2, c]) == pytest.approx(2.0)  # what the skip prevents


@pytest.mark.parametrize("device", DEVICES)
def test_hartley_round_trips_and_central_slice(device: str):
    torch.manual_seed(3)
    img = torch.randn(3, 16, 16, dtype=torch.float64)
    assert torch.allclose(hartley_to_image(image_to_hartley(img.to(device))).cpu(), img, atol=1e-12)
    vol = blob_volume(16, seed=9)
    assert torch.allclose(hartley_to_volume(volume_to_hartley(vol.to(device))).cpu(), vol, atol=1e-12)
    # A centred, symmetric object has a real, even transform: Hartley = Fourier.
    f = torch.fft.fftshift(torch.fft.fft2(torch.fft.ifftshift(img[0])))
    assert torch.allclose(image_to_hartley(img[0].to(device)).cpu(), f.real - f.imag, atol=1e-12)

    n = 32
    vol = blob_volume(n, seed=11)
    rot = euler_to_matrix(torch.tensor([10.0, 200.0]), torch.tensor([60.0, 120.0]), torch.tensor([45.0, 300.0]))
    rot = rot.double()
    slices = project_hartley(hartley_volume(vol.to(device)), rot.to(device), n).cpu()
    projections = Projector(vol.to(device)).project(rot.to(device))
    expected = hartley_from_rfft(projections, n).cpu()
    k = torch.arange(n) - n // 2
    inside = (k[:, None] ** 2 + k[None, :] ** 2) < (n // 2) ** 2
    diff = (slices - expected)[:, inside].abs().max()
    assert float(diff) < 1e-9 * float(expected.abs().max())
    # and the Hartley slice is the Hartley transform of the real-space projection.
    real = torch.from_numpy(real_space_projection(vol.numpy(), rot[0].numpy()))
    ht = image_to_hartley(real.to(device)).cpu()
    c = np.corrcoef(slices[0][inside].numpy(), ht[inside].numpy())[0, 1]
    assert c > 0.99


@pytest.mark.parametrize("device", DEVICES)
def test_radius_grids_are_exact_and_centred(device: str):
    for n in (7, 8):
        r2 = radius2_3d(n, device=device, dtype=torch.int64).cpu()
        z, y, x = (t.cpu() for t in centred_grid_3d(n, device=device, dtype=torch.int64))
        assert torch.equal(r2, x * x + y * y + z * z) and int(r2[n // 2, n // 2, n // 2]) == 0
        assert torch.equal(radius2_3d(n, device=device, dtype=torch.float32).cpu(), r2.float())
        assert torch.equal(radius_3d(n, device=device, dtype=torch.float64).cpu(), torch.sqrt(r2.double()))
