"""A second, independent CT volume generator: the held-out family the demo models never see.

Why a second generator: a model trained and scored on one generator can learn that
generator's habits (its pore shape, its crack formula, its grey scale) instead of pores and
cracks, and a score on fresh seeds of the same generator cannot tell. Nothing here is shared
with :mod:`napari_gradcam.samples.ct_volume` (the training generator) except the label
meaning (0 background, 1 pore, 2 crack); every ingredient is drawn by different code:

* the specimen is an *elliptical* bar whose centre is off the rotation axis, not a centred
  cylinder; part of it may leave the field of view;
* pores are blobs: smoothed random noise thresholded at a high level inside the material
  (irregular, partly merged, any orientation), not ellipsoids;
* the crack is a surface whose height is a sum of randomly oriented waves, whose opening
  varies along the crack (random bands), whose front is irregular, and which may branch (a
  second, smaller surface leaving the first at an angle);
* cupping follows the path length through the ellipse (a cosine-like dip centred on the
  specimen), rings come from a random detector-response profile (many weak rings of varying
  width) centred on the rotation axis;
* noise is signal dependent (Poisson-like) plus a spatially correlated part, blurred by a
  different point-spread width; the grey scale (offset, gain) is drawn per volume;
* voxels have a random size per volume (isotropic or not), and defect sizes are in
  micrometres, so their size in voxels varies.

The output is the same :class:`~napari_gradcam.samples.ct_volume.CTVolume` (uint16 volume,
uint8 labels, scale in micrometres, generator parameters in ``info``).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from napari_gradcam.samples.ct_volume import CT_LABELS, CTVolume
from napari_gradcam.samples.micrographs import check_shape

HELDOUT_SEED_BASE = 900_000
"""Seeds of the held-out evaluation start here (far from every training seed)."""


def _wave_field(
    rng: np.random.Generator, u: np.ndarray, v: np.ndarray, n_waves: int,
    wavelength_um: tuple[float, float],
) -> np.ndarray:
    """A smooth random field over the plane coordinates (u, v): randomly oriented cosines with
    random wavelengths and phases, normalised to unit standard deviation (about)."""
    field = np.zeros(np.broadcast_shapes(u.shape, v.shape), dtype=np.float32)
    for _ in range(n_waves):
        angle = rng.uniform(0, np.pi)
        k = 2 * np.pi / rng.uniform(*wavelength_um)
        phase = rng.uniform(0, 2 * np.pi)
        field += np.cos(k * (np.cos(angle) * u + np.sin(angle) * v) + phase).astype(np.float32)
    return field * np.float32(np.sqrt(2.0 / n_waves))


def _plane_frame(normal: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    normal = normal / np.linalg.norm(normal)
    helper = np.array([0.0, 0.0, 1.0]) if abs(normal[2]) < 0.8 else np.array([0.0, 1.0, 0.0])
    first = np.cross(helper, normal)
    first /= np.linalg.norm(first)
    return normal, first, np.cross(normal, first)


def _crack_sheet(
    rng: np.random.Generator,
    coords_um: tuple[np.ndarray, np.ndarray, np.ndarray],
    origin_um: np.ndarray,
    normal: np.ndarray,
    size_um: float,
    half_width_um: tuple[float, float],
    voxel_um: float,
    one_sided: np.ndarray | None = None,
) -> np.ndarray:
    """Open fraction (0..1) of each voxel for one wavy crack sheet of irregular extent.

    The sheet is the set of points at height ``h(u, v)`` above the plane through ``origin_um``
    with ``normal``; its half width varies in bands between ``half_width_um`` and tapers to
    zero at an irregular front about ``size_um`` from the origin. ``one_sided``: keep only the
    half of the plane on this in-plane direction's side (a branch leaving another crack).
    """
    zu, yu, xu = coords_um
    normal, first, second = _plane_frame(np.asarray(normal, dtype=np.float64))
    pz, py, px = zu - origin_um[0], yu - origin_um[1], xu - origin_um[2]
    height = (pz * normal[0] + py * normal[1] + px * normal[2]).astype(np.float32)
    u = (pz * first[0] + py * first[1] + px * first[2]).astype(np.float32)
    v = (pz * second[0] + py * second[1] + px * second[2]).astype(np.float32)
    amplitude = rng.uniform(0.5, 2.5)
    surface = amplitude * _wave_field(rng, u, v, 5, (8.0, 40.0))
    low, high = half_width_um
    bands = _wave_field(rng, u, v, 3, (10.0, 30.0))
    half_width = low + (high - low) * np.clip(0.5 + 0.35 * bands, 0.0, 1.0)
    theta = np.arctan2(v, u)
    front = size_um * (1.0 + 0.25 * np.sin(3 * theta + rng.uniform(0, 2 * np.pi))
                       + 0.1 * np.cos(5 * theta + rng.uniform(0, 2 * np.pi)))
    rho = np.sqrt(u**2 + v**2)
    taper = np.sqrt(np.clip(1.0 - (rho / front) ** 2, 0.0, 1.0)) ** 0.6
    opening = half_width * taper
    empty = np.clip((opening - np.abs(height - surface)) / voxel_um + 0.5, 0.0, 1.0)
    if one_sided is not None:
        direction = one_sided / np.linalg.norm(one_sided)
        along = pz * direction[0] + py * direction[1] + px * direction[2]
        empty = np.where(along >= 0, empty, 0.0)
    return empty.astype(np.float32)


def make_heldout_ct_volume(
    shape: tuple[int, int, int] = (96, 128, 128),
    seed: int = HELDOUT_SEED_BASE,
    *,
    crack: bool = True,
    pores: bool = True,
) -> CTVolume:
    """A uint16 CT volume from the held-out family with labels (1 pore, 2 crack).

    All parameters (voxel size, grey scale, specimen shape and position, pore density, crack
    shape, width and branch, artefacts, noise) are drawn from ``seed``; they are returned in
    ``info``. A 96x128x128 volume takes about a second.
    """
    shape = check_shape(shape, 3, 32)
    rng = np.random.default_rng(seed)
    isotropic = rng.random() < 0.5
    voxel_yx = float(rng.uniform(0.5, 0.9))
    voxel_z = voxel_yx if isotropic else float(rng.uniform(0.7, 1.3))
    voxel = (voxel_z, voxel_yx, voxel_yx)
    nz, ny, nx = shape
    z = (np.arange(nz, dtype=np.float32) * voxel_z)[:, None, None]
    y = (np.arange(ny, dtype=np.float32) * voxel_yx)[None, :, None]
    x = (np.arange(nx, dtype=np.float32) * voxel_yx)[None, None, :]
    coords = (z, y, x)

    # an elliptical bar, rotated in the slice, its centre off the rotation axis
    centre = np.array([ny, nx]) * voxel_yx / 2 + rng.uniform(-0.08, 0.08, 2) * ny * voxel_yx
    semi = np.array([rng.uniform(0.36, 0.5), rng.uniform(0.3, 0.42)]) * ny * voxel_yx
    angle = rng.uniform(0, np.pi)
    dy, dx = y - centre[0], x - centre[1]
    a = np.cos(angle) * dy + np.sin(angle) * dx
    b = -np.sin(angle) * dy + np.cos(angle) * dx
    ellipse = np.sqrt((a / semi[0]) ** 2 + (b / semi[1]) ** 2)  # 1 on the surface
    depth_um = (1.0 - ellipse) * float(semi.min())  # about the depth below the surface
    material = np.clip(depth_um / voxel_yx + 0.5, 0.0, 1.0).astype(np.float32)
    material = np.broadcast_to(material, shape).copy()
    solid = material > 0.5  # the bar's voxels (a crack opens in them, up to the surface)
    labels = np.zeros(shape, dtype=np.uint8)

    if pores:
        # blobs: smoothed white noise, thresholded so that a chosen fraction is pore
        sigma_um = rng.uniform(1.5, 3.0)
        sigma = (sigma_um / voxel_z, sigma_um / voxel_yx, sigma_um / voxel_yx)
        noise_field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32),
                                              sigma)
        inner = np.broadcast_to(depth_um > 6.0, shape)
        fraction = rng.uniform(0.004, 0.015)
        level = np.quantile(noise_field[inner], 1.0 - fraction)
        soft = np.clip((noise_field - level) / (0.15 * noise_field[inner].std()) + 0.5, 0, 1)
        soft = np.where(inner, soft, 0.0).astype(np.float32)
        material *= 1.0 - soft
        labels[soft >= 0.5] = 1

    crack_info = None
    if crack:
        # a crack starting at (or just below) the surface, its plane roughly across the bar
        phi = rng.uniform(0, 2 * np.pi)
        edge = centre + np.array([np.sin(phi), np.cos(phi)]) * semi.mean() * 0.95
        origin = np.array([rng.uniform(0.35, 0.65) * nz * voxel_z, *edge])
        radial = np.array([0.0, np.sin(phi), np.cos(phi)])
        tangent = np.array([0.0, np.cos(phi), -np.sin(phi)])
        tilt = rng.uniform(np.radians(25), np.radians(75))
        normal = np.cos(tilt) * np.array([1.0, 0.0, 0.0]) + np.sin(tilt) * tangent
        normal += rng.normal(0, 0.15, 3)
        size_um = rng.uniform(0.3, 0.5) * min(nz * voxel_z, ny * voxel_yx)
        half_width = (rng.uniform(0.45, 0.7), rng.uniform(0.9, 1.6))
        empty = _crack_sheet(rng, coords, origin, normal, size_um, half_width, voxel_yx)
        branched = bool(rng.random() < 0.6)
        if branched:
            # the branch leaves the main crack half-way to its front, bent by 30-60 degrees
            unit_normal = normal / np.linalg.norm(normal)
            inward = -radial - (-radial).dot(unit_normal) * unit_normal
            inward /= np.linalg.norm(inward)
            start = origin + 0.45 * size_um * inward
            bend = np.radians(rng.uniform(30, 60)) * rng.choice([-1, 1])
            branch_normal = np.cos(bend) * unit_normal + np.sin(bend) * inward
            # both planes contain the line along `hinge`; keep the branch's inward half
            hinge = np.cross(unit_normal, inward)
            away = np.cross(hinge, branch_normal)
            away *= np.sign(away.dot(inward)) or 1.0
            branch = _crack_sheet(rng, coords, start, branch_normal, 0.6 * size_um,
                                  (half_width[0], 0.8 * half_width[1]), voxel_yx,
                                  one_sided=away)
            empty = np.maximum(empty, branch)
        empty = np.where(material > 0.5, empty, 0.0)
        material *= 1.0 - empty
        labels[(empty >= 0.5) & solid] = 2
        crack_info = {"origin_um": origin.tolist(), "size_um": float(size_um),
                      "half_width_um": list(half_width), "branched": branched}

    # attenuation -> grey values: cupping along the path length, rings about the axis
    cupping = rng.uniform(0.05, 0.25)
    path = np.sqrt(np.clip(1.0 - ellipse**2, 0.0, 1.0))
    cup = 1.0 - cupping * path**1.5
    axis_yx = np.array([ny, nx]) * voxel_yx / 2 + rng.normal(0, 1.0, 2)
    r_px = np.sqrt((y - axis_yx[0]) ** 2 + (x - axis_yx[1]) ** 2) / voxel_yx
    n_bins = int(np.ceil(float(r_px.max()))) + 2
    profile = rng.standard_normal(n_bins) * (rng.random(n_bins) < 0.15)
    profile = ndimage.gaussian_filter1d(profile, rng.uniform(0.4, 1.2))
    profile /= max(float(np.abs(profile).max()), 1e-6)
    ring_strength = rng.uniform(0.04, 0.15)
    rings = np.interp(r_px, np.arange(n_bins), profile).astype(np.float32) * ring_strength

    mu = material * cup + rings  # attenuation relative to the metal (1 = metal, 0 = air)
    mu = ndimage.gaussian_filter(mu.astype(np.float32), rng.uniform(0.5, 1.0))
    noise_level = rng.uniform(0.02, 0.06)
    white = rng.standard_normal(shape).astype(np.float32)
    correlated = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), 1.2)
    correlated *= 1.0 / max(float(correlated.std()), 1e-6)
    mu = mu + noise_level * (np.sqrt(0.3 + np.clip(mu, 0, None)) * white + 0.5 * correlated)

    offset = rng.uniform(1000.0, 12000.0)
    gain = rng.uniform(15000.0, 35000.0)
    volume = np.clip(np.round(offset + gain * mu), 0, 65535).astype(np.uint16)
    info = {
        "kind": "xray_ct_heldout",
        "seed": seed,
        "voxel_size_um": voxel,
        "grey_air": float(offset),
        "grey_metal": float(offset + gain),
        "noise_level": float(noise_level),
        "cupping": float(cupping),
        "ring_strength": float(ring_strength),
        "crack": crack_info,
        "labels": CT_LABELS,
    }
    return CTVolume(volume, labels, voxel, info)
