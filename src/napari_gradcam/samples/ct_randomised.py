"""Domain-randomised CT training patches: the data the CT demo models learn from.

Why: trained on one look (one grey scale, one voxel size, round pores, one crack formula),
the first CT models learned that look. On volumes from an independent generator
(:mod:`napari_gradcam.samples.ct_heldout`: blob pores, branched cracks, other artefacts) the
U-Net called pores "crack" and its Seg-Grad-CAM for crack lit up the pores. Here every patch
comes from its own virtual specimen with randomly drawn

* voxel size (z 0.5-1.3 um, y/x 0.45-1.0 um) — defects are sized in micrometres, so their size
  in voxels varies;
* grey scale: air 500-15000, metal 12000-40000 above it; noise 1-7 % of that contrast, some of
  it spatially correlated; partial-volume blur;
* cupping depth and profile, 0-12 ring artefacts of random width and strength;
* specimen radius (sometimes larger than the field of view);
* pore morphologies: spheres, ellipsoids, blobs (overlapping ellipsoids), elongated gas pores
  (chains of spheres in any direction), clusters of micro-pores;
* cracks: random plane, waviness and wave lengths, opening (thin to wide) varying along the
  crack, sometimes a branch leaving the crack at an angle.

The rendering is the training generator's (:func:`napari_gradcam.samples.ct_volume.render_ct`),
so labels follow the same rule (a voxel is a defect when at least half of it is open).
"""

from __future__ import annotations

import numpy as np

from napari_gradcam.samples.ct_volume import (
    CT_CLASSES,
    Crack,
    Pore,
    Specimen,
    random_crack,
    render_ct,
)
from napari_gradcam.samples.micrographs import PatchSet

CT_RANDOMISED_WINDOW: tuple[float, float] = (0.0, 60000.0)
"""Grey-value window of the randomised models' preprocessing: wide enough for every drawn grey
scale (air from 500, metal up to 55000), so no contrast is clipped away."""


def random_specimen(rng: np.random.Generator, extent: int) -> tuple[Specimen, float, float]:
    """A specimen with randomly drawn look; returns it with its noise sigma and blur."""
    voxel_yx = float(rng.uniform(0.45, 1.0))
    voxel = (float(rng.uniform(0.5, 1.3)), voxel_yx, voxel_yx)
    air = float(rng.uniform(500.0, 15000.0))
    contrast = float(rng.uniform(12000.0, 40000.0))
    radius = extent * float(rng.choice([rng.uniform(0.3, 0.48), rng.uniform(0.48, 0.75)],
                                       p=[0.75, 0.25]))
    axis = (float((extent - 1) / 2 + rng.normal(0, 3)), float((extent - 1) / 2 + rng.normal(0, 3)))
    n_rings = int(rng.integers(0, 13))
    rings = [(float(rng.uniform(0.03, 1.1) * radius),
              float(rng.choice([-1.0, 1.0]) * rng.uniform(0.01, 0.12) * contrast))
             for _ in range(n_rings)]
    noise_share = float(rng.uniform(0.01, 0.07))
    specimen = Specimen(
        axis_yx=axis,
        radius=radius,
        cupping=float(rng.uniform(0.0, 0.3)),
        rings=rings,
        voxel_um=voxel,
        air_grey=air,
        metal_grey=air + contrast,
        ring_width=float(rng.uniform(0.5, 2.0)),
        cupping_power=float(rng.uniform(1.5, 3.0)),
        correlated_noise=float(rng.uniform(0.0, 0.6) * noise_share * contrast),
    )
    return specimen, noise_share * contrast, float(rng.uniform(0.4, 1.1))


def random_pore_object(rng: np.random.Generator, centre_um: np.ndarray) -> list[Pore]:
    """One pore-like object (a list of ellipsoids whose union is the pore)."""
    kind = rng.choice(["sphere", "ellipsoid", "blob", "elongated", "cluster"],
                      p=[0.2, 0.2, 0.25, 0.2, 0.15])
    if kind == "sphere":
        r = rng.uniform(1.5, 6.0)
        return [Pore(tuple(centre_um), (r, r, r))]
    if kind == "ellipsoid":
        base = rng.uniform(1.5, 5.5)
        return [Pore(tuple(centre_um), tuple(base * rng.uniform(0.6, 1.6, 3)))]
    if kind == "blob":
        base = rng.uniform(2.0, 5.5)
        parts = []
        for _ in range(int(rng.integers(3, 7))):
            offset = rng.uniform(-0.8, 0.8, 3) * base
            parts.append(Pore(tuple(centre_um + offset),
                              tuple(base * rng.uniform(0.35, 0.85, 3))))
        return parts
    if kind == "elongated":
        # a gas pore stretched along a random direction: a chain of spheres, slightly bent
        r = rng.uniform(1.0, 2.8)
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        bend = rng.normal(size=3) * 0.04
        n = int(rng.integers(5, 12))
        parts = []
        for index in range(n):
            t = (index - (n - 1) / 2) * 0.6 * r
            point = centre_um + direction * t + bend * t**2
            radius = r * (1.0 - 0.5 * (abs(t) / (0.3 * n * r + 1e-6)) ** 2)
            parts.append(Pore(tuple(point), (radius,) * 3))
        return parts
    parts = []
    for _ in range(int(rng.integers(3, 9))):
        r = rng.uniform(0.8, 1.8)
        parts.append(Pore(tuple(centre_um + rng.uniform(-6.0, 6.0, 3)), (r, r, r)))
    return parts


def random_worm_pore(rng: np.random.Generator, centre_um: np.ndarray) -> list[Pore]:
    """A thin, bent, lumpy pore: spheres along a wandering path, 1.2-4 um thick, 8-25 um long.

    Why: a slice through such a pore is a dark streak only 2-5 pixels wide, the width of a
    crack. The chains of :func:`random_pore_object` are straight and thicker; with few thin
    streaks among the pores, the U-Net learned "thin and dark = crack" and called elongated pores
    of the held-out family crack. These are the negatives that teach it the difference (a crack
    is a long sheet of nearly constant, partial-volume width; a pore is fully open and lumpy).
    """
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction)
    radius = rng.uniform(0.6, 2.0)
    length = rng.uniform(8.0, 25.0)
    point = np.asarray(centre_um, dtype=np.float64) - direction * length / 2
    parts = []
    travelled = 0.0
    while travelled < length:
        lump = radius * rng.uniform(0.7, 1.3)
        parts.append(Pore(tuple(float(c) for c in point), (lump,) * 3))
        step = 0.5 * lump
        direction = direction + rng.normal(size=3) * 0.25
        direction /= np.linalg.norm(direction)
        point = point + direction * step
        travelled += step
    return parts


def random_crack_object(rng: np.random.Generator, centre_um: np.ndarray) -> list[Crack]:
    """A crack disc with its front somewhere near ``centre_um``, sometimes with a branch."""
    crack = random_crack(rng, centre_um, (10.0, 30.0))
    crack.opening = float(rng.uniform(0.35, 1.7))
    crack.waviness = float(rng.uniform(0.2, 2.5))
    k1, k2 = rng.uniform(0.08, 0.8, 2)
    crack.wave = (float(k1), float(k2), crack.wave[2], crack.wave[3])
    crack.opening_variation = float(rng.uniform(0.0, 0.5))
    crack.opening_wave = (float(rng.uniform(0.1, 0.5)), float(rng.uniform(0, 2 * np.pi)))
    normal = np.asarray(crack.normal)
    away = rng.normal(size=3)
    away -= away.dot(normal) * normal
    away /= np.linalg.norm(away)
    origin = np.add(centre_um, away * rng.uniform(0.0, 0.9) * crack.radius)
    crack.origin = tuple(float(c) for c in origin)
    cracks = [crack]
    if rng.random() < 0.35:
        along = rng.normal(size=3)
        along -= along.dot(normal) * normal
        along /= np.linalg.norm(along)
        start = origin + along * rng.uniform(0.2, 0.6) * crack.radius
        bend = np.radians(rng.uniform(25, 65)) * rng.choice([-1.0, 1.0])
        branch_normal = np.cos(bend) * normal + np.sin(bend) * along
        hinge = np.cross(normal, along)
        side = np.cross(hinge, branch_normal)
        side *= np.sign(side.dot(along)) or 1.0
        branch = random_crack(rng, tuple(start), (0.4 * crack.radius, 0.7 * crack.radius),
                               normal=branch_normal)
        branch.opening = float(crack.opening * rng.uniform(0.6, 1.0))
        branch.keep_side = tuple(float(c) for c in side)
        cracks.append(branch)
    return cracks


def surface_crack_object(
    rng: np.random.Generator, specimen: Specimen, phi: float, z_um: float
) -> list[Crack]:
    """A crack that opens at the specimen's surface (at angle ``phi`` about the axis) and grows
    inwards, its plane holding the radial direction and tilted between the axis and the tangent.

    Why: a fatigue crack starts at the surface, and its mouth (the widest part, open to the
    air outside) is still crack. Trained only on cracks inside the material, the U-Net left
    the held-out family's crack mouths as background: 81 % of the crack pixels within 3 pixels
    of the surface were missed, three quarters of all missed crack pixels.
    """
    voxel = np.asarray(specimen.voxel_um)
    surface_px = (specimen.axis_yx[0] + specimen.radius * np.sin(phi),
                  specimen.axis_yx[1] + specimen.radius * np.cos(phi))
    origin = (z_um + rng.uniform(-8.0, 8.0), surface_px[0] * voxel[1], surface_px[1] * voxel[2])
    tangent = np.array([0.0, np.cos(phi), -np.sin(phi)])
    tilt = rng.uniform(np.radians(20), np.radians(85))
    normal = np.cos(tilt) * np.array([1.0, 0.0, 0.0]) + np.sin(tilt) * tangent
    normal = normal + rng.normal(0.0, 0.15, 3)
    crack = random_crack(rng, origin, (12.0, 35.0), normal=normal)
    crack.opening = float(rng.uniform(0.35, 1.7))
    crack.waviness = float(rng.uniform(0.2, 2.5))
    k1, k2 = rng.uniform(0.08, 0.8, 2)
    crack.wave = (float(k1), float(k2), crack.wave[2], crack.wave[3])
    crack.opening_variation = float(rng.uniform(0.0, 0.5))
    crack.opening_wave = (float(rng.uniform(0.1, 0.5)), float(rng.uniform(0, 2 * np.pi)))
    return [crack]


def _randomised_patch(
    rng: np.random.Generator, kind: int, size: tuple[int, int, int], extent: int,
    worm_share: float = 0.0, surface_share: float = 0.0, surface_kinds: tuple[int, ...] = (2,),
) -> tuple[np.ndarray, np.ndarray]:
    """One box: ``kind`` 0 no defect, 1 pores, 2 a crack, 3 pores and a crack.

    ``worm_share``: the share of pore objects drawn as thin worm-like pores
    (:func:`random_worm_pore`); with pores and a crack, such a worm then lies next to the
    crack (a few micrometres off its plane). ``surface_share``: the share of crack-only boxes
    that hold a crack opening at the specimen's surface (:func:`surface_crack_object`), the
    box straddling the surface; ``surface_kinds`` the kinds of box that may (2: crack only;
    (2, 3): also pores beside a surface crack). 0 for both keeps the original draw sequence
    exactly.
    """
    for _ in range(50):
        specimen, noise, blur = random_specimen(rng, extent)
        voxel = np.asarray(specimen.voxel_um)
        surface = bool(kind in surface_kinds and kind in (2, 3) and surface_share
                       and rng.random() < surface_share)
        if kind == 0:
            max_r = specimen.radius + 0.25 * size[1]
        else:
            max_r = max(specimen.radius - 0.5 * size[1] - 2, 1.0)
        rad = max_r * np.sqrt(rng.random())
        phi = rng.uniform(0, 2 * np.pi)
        if surface:
            rad = specimen.radius - rng.uniform(0.05, 0.4) * size[-1]
        centre_px = np.array([
            rng.uniform(0.5 * size[0], 2 * extent - 0.5 * size[0]),
            specimen.axis_yx[0] + rad * np.sin(phi),
            specimen.axis_yx[1] + rad * np.cos(phi),
        ])
        origin = tuple(int(np.round(c - s / 2)) for c, s in zip(centre_px, size, strict=True))
        centre_um = centre_px * voxel
        half_um = np.array(size) * voxel / 2
        # (with worms the crack is drawn first, to place a worm beside it; without, the
        # original order keeps earlier seeds' data unchanged)
        cracks = []
        if surface:
            cracks = surface_crack_object(rng, specimen, phi, float(centre_um[0]))
        elif kind in (2, 3) and worm_share:
            cracks = random_crack_object(rng, centre_um)
        if kind in (1, 3):
            for _ in range(int(rng.integers(1, 4))):
                offset = rng.uniform(-0.5, 0.5, 3) * half_um
                if worm_share and rng.random() < worm_share:
                    if cracks:
                        # beside the crack: a few micrometres off its plane, near the centre
                        normal = np.asarray(cracks[0].normal)
                        offset = offset - offset.dot(normal) * normal
                        offset = 0.5 * offset + normal * rng.choice([-1.0, 1.0]) * rng.uniform(
                            2.5, 7.0)
                    specimen.pores.extend(random_worm_pore(rng, centre_um + offset))
                else:
                    specimen.pores.extend(random_pore_object(rng, centre_um + offset))
        if kind in (2, 3) and not (worm_share or surface):
            cracks = random_crack_object(rng, centre_um)
        specimen.cracks.extend(cracks)
        grey, labels = render_ct(specimen, origin, size, rng, noise, blur)
        if kind == 0:
            return grey, labels
        inner = labels[tuple(slice(s // 6, s - s // 6) for s in size)]
        wanted = {1: (1,), 2: (2,), 3: (1, 2)}[kind]
        if all(np.count_nonzero(inner == label) >= 12 for label in wanted):
            return grey, labels
    raise RuntimeError("could not place a defect in a CT patch after 50 tries")  # pragma: no cover


def make_randomised_ct_patches(
    n_per_class: int = 100, size: int = 32, seed: int = 0, *, extent: int = 128
) -> PatchSet:
    """A balanced, shuffled set of ``size``^3 randomised CT patches: none / pore / crack.

    Images are float32 grey values on the uint16 scale; masks are labels (1 pore, 2 crack).
    """
    if n_per_class < 1:
        raise ValueError(f"n_per_class must be >= 1, got {n_per_class}")
    rng = np.random.default_rng(seed)
    images, classes, masks = [], [], []
    for class_id in range(len(CT_CLASSES)):
        for _ in range(n_per_class):
            grey, labels = _randomised_patch(rng, class_id, (size, size, size), extent)
            images.append(grey)
            masks.append(labels)
            classes.append(class_id)
    return PatchSet.shuffled(images, classes, masks, CT_CLASSES, rng)


def make_randomised_ct_slice_patches(
    n: int = 100, size: int = 64, seed: int = 0, *, extent: int = 128, worm_share: float = 0.0,
    surface_share: float = 0.0, surface_kinds: tuple[int, ...] = (2,),
) -> PatchSet:
    """``n`` randomised single-slice patches for a 2D segmenter.

    A quarter each shows no defect, pores, a crack, and pores next to a crack (the U-Net has to
    tell them apart side by side). ``classes`` is 0-2 as in :data:`CT_CLASSES` for the first
    three kinds and 3 for the mixed one. ``worm_share`` > 0 draws that share of the pores as
    thin worm-like pores (:func:`random_worm_pore`), next to the crack in mixed patches;
    ``surface_share`` > 0 that share of the crack-only slices across the specimen's surface
    with a crack opening there (:func:`surface_crack_object`); ``surface_kinds`` (2, 3) draws
    the mixed slices' cracks at the surface with that share too.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    rng = np.random.default_rng(seed)
    images, classes, masks = [], [], []
    for index in range(n):
        kind = index % 4
        grey, labels = _randomised_patch(rng, kind, (1, size, size), extent, worm_share,
                                         surface_share, tuple(surface_kinds))
        images.append(grey[0])
        masks.append(labels[0])
        classes.append(kind)
    return PatchSet.shuffled(images, classes, masks, (*CT_CLASSES, "pore+crack"), rng)
