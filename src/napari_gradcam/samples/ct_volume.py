"""A synthetic X-ray CT volume of a cylindrical metal specimen with pores and a fatigue crack.

Why these ingredients: a CT defect detector has to see the defect *through* the usual
reconstruction artefacts, and a saliency map is only convincing if it ignores them. So the
volume has

* a cylindrical specimen, rotation axis along z (array axis 0) through the centre of each slice;
* beam-hardening cupping: the grey value of uniform material sinks towards the axis;
* ring artefacts: thin bright/dark rings centred on the rotation axis, the same in every slice
  (a miscalibrated detector column draws the same ring through the whole stack);
* gas pores: ellipsoids, nearly spherical in micrometres (label ``1``);
* a fatigue crack: a thin wavy surface that starts at the specimen surface and grows inwards to
  a semicircular crack front (the tip); its opening shrinks towards the front like an elastic
  crack, sqrt(1 - (rho/a)^2) (label ``2``);
* partial-volume blur and noise, then a uint16 grey scale (air about 8000, metal about 32000).

Voxels are anisotropic, (z, y, x) = (1.0, 0.65, 0.65) micrometres (:data:`CT_VOXEL_SIZE_UM`):
defects are placed in micrometres, so a round pore spans fewer slices than pixels in a slice.
One function renders any box of the same virtual specimen, so the training patches
(:func:`make_ct_patches`, :func:`make_ct_slice_patches`) look exactly like windows of the
full volume (:func:`make_ct_volume`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from napari_gradcam.samples.micrographs import PatchSet, check_shape

CT_VOXEL_SIZE_UM: tuple[float, float, float] = (1.0, 0.65, 0.65)
"""(z, y, x) voxel size in micrometres of the generated volumes."""

CT_LABELS: dict[int, str] = {0: "background", 1: "pore", 2: "crack"}
"""Meaning of the values of a CT ground-truth label volume."""

CT_CLASSES: tuple[str, ...] = ("none", "pore", "crack")
"""Patch classes of :func:`make_ct_patches` (index = class id)."""

CT_AIR_GREY = 8000.0
CT_METAL_GREY = 32000.0
CT_WINDOW: tuple[float, float] = (4000.0, 40000.0)
"""A fixed grey-value window that maps air to about 0.1 and metal to about 0.75-0.8."""


@dataclass
class Pore:
    """An axis-aligned ellipsoidal pore; centre and semi-axes in micrometres (z, y, x)."""

    centre: tuple[float, float, float]
    radii: tuple[float, float, float]


@dataclass
class Crack:
    """A wavy, penny-shaped crack surface in micrometres.

    ``origin``: centre of the crack disc (a point on the specimen surface for a surface crack);
    ``normal``: unit normal of the mean crack plane; ``radius``: distance from the origin to the
    crack front (the tip); ``opening``: half opening at the origin; ``waviness``: amplitude of
    the out-of-plane waviness; ``wave``: wave numbers and phases of that waviness.
    """

    origin: tuple[float, float, float]
    normal: tuple[float, float, float]
    radius: float
    opening: float
    waviness: float
    wave: tuple[float, float, float, float]
    opening_variation: float = 0.0
    """Relative variation of the opening along the crack (0: smooth elastic profile only)."""
    opening_wave: tuple[float, float] = (0.3, 0.0)
    """Wave number (per um) and phase of that variation along the in-plane direction u."""
    keep_side: tuple[float, float, float] | None = None
    """If set, only the half-disc on this side of the origin exists (a branch of a crack)."""


@dataclass
class Specimen:
    """The virtual specimen: cylinder geometry, artefact parameters and defects.

    ``axis_yx`` and ``radius`` in voxels of a slice (the rotation axis is parallel to z).
    The remaining fields default to the look of :func:`make_ct_volume`; the randomised training
    generator (:mod:`napari_gradcam.samples.ct_randomised`) varies them.
    """

    axis_yx: tuple[float, float]
    radius: float
    cupping: float = 0.15
    rings: list[tuple[float, float]] = field(default_factory=list)  # (radius px, amplitude)
    pores: list[Pore] = field(default_factory=list)
    cracks: list[Crack] = field(default_factory=list)
    voxel_um: tuple[float, float, float] = CT_VOXEL_SIZE_UM
    air_grey: float = CT_AIR_GREY
    metal_grey: float = CT_METAL_GREY
    ring_width: float = 0.8
    cupping_power: float = 2.0
    correlated_noise: float = 0.0
    """Sigma of an extra, spatially correlated noise (grey values), 0 for none."""


@dataclass
class CTVolume:
    """A generated CT volume: uint16 ``volume``, uint8 ``labels`` (:data:`CT_LABELS`),
    ``scale`` (z, y, x) in micrometres and ``info`` (the generator parameters)."""

    volume: np.ndarray
    labels: np.ndarray
    scale: tuple[float, float, float]
    info: dict = field(default_factory=dict)


def render_ct(
    specimen: Specimen,
    origin: tuple[int, int, int],
    shape: tuple[int, int, int],
    rng: np.random.Generator,
    noise: float,
    blur: float = 0.7,
) -> tuple[np.ndarray, np.ndarray]:
    """Grey values (float32, on the uint16 scale) and labels of one box of the specimen.

    ``origin`` is the box's first voxel in the specimen's voxel grid. Defects are evaluated in
    micrometres, artefacts in slice pixels, exactly as for the whole volume.
    """
    dz, dy, dx = specimen.voxel_um
    z = (np.arange(shape[0], dtype=np.float32) + origin[0])[:, None, None]
    y = (np.arange(shape[1], dtype=np.float32) + origin[1])[None, :, None]
    x = (np.arange(shape[2], dtype=np.float32) + origin[2])[None, None, :]
    ry = y - specimen.axis_yx[0]
    rx = x - specimen.axis_yx[1]
    r = np.sqrt(ry**2 + rx**2)  # (1, Y, X): distance to the rotation axis in pixels
    # material fraction with a partial-volume edge at the specimen surface
    material = np.clip(specimen.radius - r + 0.5, 0.0, 1.0)
    material = np.broadcast_to(material, shape).astype(np.float32).copy()
    labels = np.zeros(shape, dtype=np.uint8)
    zu, yu, xu = z * dz, y * dy, x * dx

    for pore in specimen.pores:
        (cz, cy, cx), (az, ay, ax) = pore.centre, pore.radii
        # bounding box in voxels, clipped to this box
        lo = [
            int(np.floor((cz - az) / dz)) - 1 - origin[0],
            int(np.floor((cy - ay) / dy)) - 1 - origin[1],
            int(np.floor((cx - ax) / dx)) - 1 - origin[2],
        ]
        hi = [
            int(np.ceil((cz + az) / dz)) + 2 - origin[0],
            int(np.ceil((cy + ay) / dy)) + 2 - origin[1],
            int(np.ceil((cx + ax) / dx)) + 2 - origin[2],
        ]
        sl = tuple(slice(max(a, 0), min(b, n)) for a, b, n in zip(lo, hi, shape, strict=True))
        if any(s.start >= s.stop for s in sl):
            continue
        rho = np.sqrt(
            ((zu[sl[0]] - cz) / az) ** 2 + ((yu[:, sl[1]] - cy) / ay) ** 2
            + ((xu[:, :, sl[2]] - cx) / ax) ** 2
        )
        # signed distance to the surface in (roughly) voxels: min semi-axis in voxel units
        scale_vox = min(az / dz, ay / dy, ax / dx)
        empty = np.clip((1.0 - rho) * scale_vox + 0.5, 0.0, 1.0)
        material[sl] *= 1.0 - empty
        labels[sl][empty >= 0.5] = 1

    for crack in specimen.cracks:
        empty = _crack_void(crack, zu, yu, xu, shape, min(specimen.voxel_um))
        inside = material > 0.5
        material *= 1.0 - empty
        labels[(empty >= 0.5) & inside] = 2

    # cupping: uniform material looks darker towards the rotation axis
    relative_r = r / specimen.radius
    profile = relative_r**2 if specimen.cupping_power == 2.0 else relative_r**specimen.cupping_power
    cup = 1.0 - specimen.cupping * np.clip(1.0 - profile, 0.0, 1.0)
    grey = specimen.air_grey + (specimen.metal_grey - specimen.air_grey) * material * cup
    for ring_radius, amplitude in specimen.rings:
        grey = grey + amplitude * np.exp(-(((r - ring_radius) / specimen.ring_width) ** 2))
    if blur > 0:
        grey = ndimage.gaussian_filter(grey.astype(np.float32), blur)
    grey = grey + rng.normal(0.0, noise, shape).astype(np.float32)
    if specimen.correlated_noise > 0:
        correlated = ndimage.gaussian_filter(rng.normal(0.0, 1.0, shape).astype(np.float32), 1.0)
        grey = grey + correlated * np.float32(specimen.correlated_noise / 0.28)
    return grey.astype(np.float32), labels


def _crack_void(
    crack: Crack, zu: np.ndarray, yu: np.ndarray, xu: np.ndarray, shape: tuple[int, int, int],
    voxel: float = min(CT_VOXEL_SIZE_UM),
) -> np.ndarray:
    """Fraction (0..1) of each voxel that is open crack, from the crack's signed distance."""
    normal = np.asarray(crack.normal, dtype=np.float64)
    normal /= np.linalg.norm(normal)
    # two in-plane unit vectors
    helper = np.array([1.0, 0.0, 0.0]) if abs(normal[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
    u_axis = np.cross(normal, helper)
    u_axis /= np.linalg.norm(u_axis)
    v_axis = np.cross(normal, u_axis)
    pz, py, px = (zu - crack.origin[0]), (yu - crack.origin[1]), (xu - crack.origin[2])
    height = pz * normal[0] + py * normal[1] + px * normal[2]
    u = pz * u_axis[0] + py * u_axis[1] + px * u_axis[2]
    v = pz * v_axis[0] + py * v_axis[1] + px * v_axis[2]
    k1, k2, p1, p2 = crack.wave
    surface = crack.waviness * (np.sin(k1 * u + p1) + 0.6 * np.sin(k2 * v + p2))
    rho = np.sqrt(u**2 + v**2)
    half_opening = crack.opening * np.sqrt(np.clip(1.0 - (rho / crack.radius) ** 2, 0.0, 1.0))
    if crack.opening_variation:
        k, phase = crack.opening_wave
        half_opening = half_opening * (1.0 + crack.opening_variation * np.sin(k * u + phase))
    # distance in micrometres -> voxels of the finest sampling (``voxel``)
    distance = np.abs(height - surface)
    empty = np.clip((half_opening - distance) / voxel + 0.5, 0.0, 1.0)
    empty = np.where(rho < crack.radius, empty, 0.0)
    if crack.keep_side is not None:
        side = np.asarray(crack.keep_side, dtype=np.float64)
        empty = np.where(pz * side[0] + py * side[1] + px * side[2] >= 0, empty, 0.0)
    return np.broadcast_to(empty, shape).astype(np.float32)


def _random_rings(rng: np.random.Generator, radius: float, n: int = 6) -> list[tuple[float, float]]:
    radii = rng.uniform(0.05, 1.1, n) * radius
    amplitudes = rng.choice([-1.0, 1.0], n) * rng.uniform(1000, 2500, n)
    return [(float(a), float(b)) for a, b in zip(radii, amplitudes, strict=True)]


def random_crack(
    rng: np.random.Generator,
    centre_um: tuple[float, float, float],
    radius_um: tuple[float, float] = (10.0, 22.0),
    normal: np.ndarray | None = None,
) -> Crack:
    """A crack disc around ``centre_um`` with the given plane normal (random if None)."""
    if normal is None:
        normal = rng.normal(size=3)
    normal = np.asarray(normal, dtype=np.float64) / np.linalg.norm(normal)
    return Crack(
        origin=tuple(float(c) for c in centre_um),
        normal=tuple(float(c) for c in normal),
        radius=float(rng.uniform(*radius_um)),
        opening=float(rng.uniform(0.9, 1.3)),
        waviness=float(rng.uniform(0.6, 1.5)),
        wave=(
            float(rng.uniform(0.2, 0.5)),
            float(rng.uniform(0.2, 0.5)),
            float(rng.uniform(0, 2 * np.pi)),
            float(rng.uniform(0, 2 * np.pi)),
        ),
    )


def _random_pore(rng: np.random.Generator, centre_um: tuple[float, float, float]) -> Pore:
    base = rng.uniform(2.0, 5.0)
    radii = tuple(float(base * rng.uniform(0.8, 1.25)) for _ in range(3))
    return Pore(centre=tuple(float(c) for c in centre_um), radii=radii)


def make_ct_volume(
    shape: tuple[int, int, int] = (128, 128, 128),
    seed: int = 0,
    *,
    n_pores: int = 8,
    crack: bool = True,
    noise: float = 1200.0,
    rings: bool = True,
    cupping: float = 0.15,
) -> CTVolume:
    """A uint16 CT volume of a cylindrical specimen with pores, a surface crack and artefacts.

    ``shape`` is (z, y, x) in voxels; ``n_pores`` gas pores (label 1) inside the specimen;
    ``crack`` one fatigue crack growing from the specimen surface inwards (label 2); ``noise``
    the Gaussian noise sigma in grey values; ``rings`` ring artefacts; ``cupping`` the relative
    beam-hardening dip at the axis. Returns :class:`CTVolume` with scale
    :data:`CT_VOXEL_SIZE_UM`. A 128^3 volume takes well under 2 s.
    """
    shape = check_shape(shape, 3, 16)
    if n_pores < 0:
        raise ValueError(f"n_pores must be >= 0, got {n_pores}")
    if noise < 0:
        raise ValueError(
            f"noise is a standard deviation in grey values and must be >= 0, got {noise}"
        )
    rng = np.random.default_rng(seed)
    dz, dy, dx = CT_VOXEL_SIZE_UM
    axis_yx = ((shape[1] - 1) / 2, (shape[2] - 1) / 2)
    radius = 0.42 * min(shape[1], shape[2])
    specimen = Specimen(
        axis_yx=axis_yx,
        radius=radius,
        cupping=cupping,
        rings=_random_rings(rng, radius) if rings else [],
    )
    for _ in range(n_pores):
        # uniform over the disc, away from the surface, and away from the ends in z
        rad = radius * 0.8 * np.sqrt(rng.random())
        phi = rng.uniform(0, 2 * np.pi)
        centre = (
            rng.uniform(0.1, 0.9) * shape[0] * dz,
            (axis_yx[0] + rad * np.sin(phi)) * dy,
            (axis_yx[1] + rad * np.cos(phi)) * dx,
        )
        specimen.pores.append(_random_pore(rng, centre))
    if crack:
        phi = rng.uniform(0, 2 * np.pi)
        centre = (
            rng.uniform(0.35, 0.65) * shape[0] * dz,
            (axis_yx[0] + radius * np.sin(phi)) * dy,
            (axis_yx[1] + radius * np.cos(phi)) * dx,
        )
        # the crack plane contains the radial direction (it grows from the surface inwards) and
        # is tilted between the load axis z and the tangent, so slices cut it at a clear angle
        tilt = rng.uniform(np.radians(35), np.radians(80))
        tangent = np.array([0.0, np.cos(phi), -np.sin(phi)])
        normal = np.cos(tilt) * np.array([1.0, 0.0, 0.0]) + np.sin(tilt) * tangent
        size_um = min(shape[1] * dy, shape[0] * dz)
        specimen.cracks.append(
            random_crack(rng, centre, (0.25 * size_um, 0.4 * size_um), normal=normal)
        )
    grey, labels = render_ct(specimen, (0, 0, 0), shape, rng, noise)
    volume = np.clip(np.round(grey), 0, 65535).astype(np.uint16)
    info = {
        "kind": "xray_ct",
        "seed": seed,
        "voxel_size_um": CT_VOXEL_SIZE_UM,
        "rotation_axis": "z (axis 0)",
        "axis_yx_px": axis_yx,
        "specimen_radius_px": radius,
        "n_pores": n_pores,
        "crack": (
            {"origin_um": specimen.cracks[0].origin, "radius_um": specimen.cracks[0].radius}
            if crack
            else None
        ),
        "labels": CT_LABELS,
        "grey_window": CT_WINDOW,
    }
    return CTVolume(volume, labels, CT_VOXEL_SIZE_UM, info)


def _patch_specimen(rng: np.random.Generator, extent: int) -> Specimen:
    """A specimen like :func:`make_ct_volume`'s for an ``extent``-pixel wide volume."""
    axis = ((extent - 1) / 2, (extent - 1) / 2)
    radius = 0.42 * extent
    return Specimen(axis_yx=axis, radius=radius, rings=_random_rings(rng, radius))


def _defect_patch(
    rng: np.random.Generator,
    class_id: int,
    size: tuple[int, int, int],
    extent: int,
    noise: float,
) -> tuple[np.ndarray, np.ndarray]:
    """One box of a fresh virtual specimen containing no defect, pores or a crack.

    Boxes of class ``none`` may sit anywhere (also across the specimen surface and in air);
    defect boxes sit inside the material so the defect has material around it. A defect is
    re-drawn until at least a few voxels of it lie in the inner part of the box (a patch
    labelled crack must show a crack).
    """
    dz, dy, dx = CT_VOXEL_SIZE_UM
    min_voxels = {1: 12, 2: 12}
    for _ in range(50):
        specimen = _patch_specimen(rng, extent)
        if class_id == 0:
            max_r = specimen.radius + 0.25 * size[1]
        else:
            max_r = specimen.radius - 0.5 * size[1] - 2
        rad = max_r * np.sqrt(rng.random())
        phi = rng.uniform(0, 2 * np.pi)
        centre_px = (
            rng.uniform(0.5 * size[0], 2 * extent - 0.5 * size[0]),
            specimen.axis_yx[0] + rad * np.sin(phi),
            specimen.axis_yx[1] + rad * np.cos(phi),
        )
        origin = tuple(int(np.round(c - s / 2)) for c, s in zip(centre_px, size, strict=True))
        centre_um = (centre_px[0] * dz, centre_px[1] * dy, centre_px[2] * dx)
        half_um = np.array(size) * np.array(CT_VOXEL_SIZE_UM) / 2
        if class_id == 1:
            for _ in range(int(rng.integers(1, 3))):
                offset = rng.uniform(-0.45, 0.45, 3) * half_um
                specimen.pores.append(_random_pore(rng, tuple(np.add(centre_um, offset))))
        elif class_id == 2:
            # put the crack front somewhere in the box: disc centre up to ~1 radius away
            crack = random_crack(rng, centre_um, (10.0, 24.0))
            normal = np.asarray(crack.normal)
            away = rng.normal(size=3)
            away -= away.dot(normal) * normal
            away /= np.linalg.norm(away)
            shift = away * rng.uniform(0.0, 0.9) * crack.radius
            crack.origin = tuple(float(c) for c in np.add(centre_um, shift))
            specimen.cracks.append(crack)
        grey, labels = render_ct(specimen, origin, size, rng, noise)
        if class_id == 0:
            return grey, labels
        inner = tuple(slice(s // 6, s - s // 6) for s in size)
        if np.count_nonzero(labels[inner] == class_id) >= min_voxels[class_id]:
            return grey, labels
    raise RuntimeError("could not place a defect in a CT patch after 50 tries")  # pragma: no cover


def make_ct_patches(
    n_per_class: int = 100,
    size: int = 32,
    seed: int = 0,
    *,
    noise: float = 1200.0,
    extent: int = 128,
) -> PatchSet:
    """A balanced, shuffled set of ``size``^3 CT patches in the classes none / pore / crack.

    Each patch is a box of a fresh virtual specimen ``extent`` pixels wide (the same geometry,
    artefacts and grey scale as :func:`make_ct_volume` at that size), so a classifier trained
    on them can be slid over a generated volume. Images are float32 grey values on the uint16
    scale (apply the window :data:`CT_WINDOW`); masks are label patches (:data:`CT_LABELS`).
    """
    return _make_patch_set(n_per_class, (size, size, size), seed, noise, extent)


def make_ct_slice_patches(
    n: int = 100,
    size: int = 64,
    seed: int = 0,
    *,
    noise: float = 1200.0,
    extent: int = 128,
) -> PatchSet:
    """``n`` single-slice (z) CT patches of ``size``x``size`` pixels for a 2D segmenter.

    About a third show no defect, a third pores and a third a crack (``classes`` says which);
    the masks are the per-pixel labels a segmentation network learns. Images are float32 grey
    values on the uint16 scale.
    """
    per_class = -(-n // 3)
    patches = _make_patch_set(per_class, (1, size, size), seed, noise, extent)
    return PatchSet(
        images=patches.images[:n, 0],
        classes=patches.classes[:n],
        masks=patches.masks[:n, 0],
        class_names=CT_CLASSES,
    )


def _make_patch_set(
    n_per_class: int, size: tuple[int, int, int], seed: int, noise: float, extent: int
) -> PatchSet:
    if n_per_class < 1:
        raise ValueError(f"n_per_class must be >= 1, got {n_per_class}")
    if min(size[1:]) < 16:
        raise ValueError(f"patch size must be >= 16 voxels so a defect fits, got {size[1:]}")
    if extent < 2 * max(size[1:]):
        raise ValueError(
            f"extent ({extent}) must be at least twice the patch size ({max(size[1:])}) so "
            "defect patches fit inside the specimen"
        )
    rng = np.random.default_rng(seed)
    images, classes, masks = [], [], []
    for class_id in range(len(CT_CLASSES)):
        for _ in range(n_per_class):
            grey, labels = _defect_patch(rng, class_id, size, extent, noise)
            images.append(grey)
            masks.append(labels)
            classes.append(class_id)
    return PatchSet.shuffled(images, classes, masks, CT_CLASSES, rng)
