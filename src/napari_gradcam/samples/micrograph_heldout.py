"""A second, independent micrograph generator: the held-out family the micrograph classifier
never sees.

Why: a classifier scored on fresh seeds of its own generator can have learned that generator's
habits (its grain tessellation, its crack formula, its grey levels) instead of cracks and
particles, and such a score cannot tell. Nothing here is shared with
:mod:`napari_gradcam.samples.micrographs` (the training generator) except the label meaning
(0 background, 1 precipitate, 2 crack) and the :class:`~napari_gradcam.samples.micrographs.
Micrograph` it returns; every ingredient is drawn by different code:

* grains: a *weighted, stretched* tessellation (each seed has its own weight, and distances are
  measured in a frame stretched along a rolling direction), so boundaries are curved and grains
  elongated, not a plain Voronoi diagram; grain boundaries are where a 3x3 neighbourhood holds
  two grains, etched to a random depth and width;
* a dark second phase with a texture of stretched, filtered noise (bainite/martensite-like
  needles), not sinusoidal lamellae;
* precipitates: bright ellipses of random aspect and orientation, some in strings along a
  boundary;
* the crack: a polyline of straight segments whose direction jumps at each kink (a zig-zag,
  partly following facets), sometimes with a side branch, with an opening that narrows
  linearly to the tip, rendered by the exact distance to the segments; it starts at an edge or
  inside the image;
* artefacts that are no defect: a microscope data bar (a band across the bottom with a scale
  bar and blocky characters), polishing scratches, a smooth stain, vignetting;
* grey scale: a random tone curve (offset, gain, gamma), and Poisson-plus-read noise from a
  random photon count.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from napari_gradcam.samples.micrographs import (
    MICROGRAPH_CLASSES,
    MICROGRAPH_LABELS,
    Micrograph,
    PatchSet,
    check_shape,
)

MICROGRAPH_HELDOUT_SEED_BASE = 700_000
"""Seeds of the held-out micrograph evaluation start here (far from every training seed)."""


def _tessellation(shape: tuple[int, int], grain: float, rng: np.random.Generator
                  ) -> np.ndarray:
    """Grain ids of a weighted tessellation in a frame stretched along a random direction."""
    height, width = shape
    stretch = rng.uniform(1.0, 1.8)
    angle = rng.uniform(0, np.pi)
    n = max(3, round(height * width / grain**2 * 1.3))
    seeds = np.column_stack([rng.uniform(-grain, height + grain, n),
                             rng.uniform(-grain, width + grain, n)])
    weights = rng.uniform(0.0, 0.35 * grain**2, n)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    best = np.full(shape, np.inf, dtype=np.float32)
    ids = np.zeros(shape, dtype=np.int32)
    cos, sin = np.cos(angle), np.sin(angle)
    for index, (sy, sx) in enumerate(seeds):
        dy, dx = yy - sy, xx - sx
        along = dy * cos + dx * sin
        across = -dy * sin + dx * cos
        distance = (along / stretch) ** 2 + (across * stretch) ** 2 - weights[index]
        closer = distance < best
        best[closer] = distance[closer]
        ids[closer] = index
    return ids


def _segment_distance(points: np.ndarray, start: np.ndarray, end: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Distance of each point (N, 2) to the segment start-end, and the position along it (0-1)."""
    direction = end - start
    length_sq = max(float(direction @ direction), 1e-9)
    t = np.clip(((points - start) @ direction) / length_sq, 0.0, 1.0)
    nearest = start + t[:, None] * direction
    return np.linalg.norm(points - nearest, axis=1), t


def _polyline(shape: tuple[int, int], length: float, rng: np.random.Generator,
              start: np.ndarray | None = None, heading: float | None = None) -> np.ndarray:
    """Vertices of a zig-zag crack path of about ``length`` pixels, inside the image."""
    height, width = shape
    if start is None:
        if rng.random() < 0.7:  # from an edge, heading inwards
            side = int(rng.integers(4))
            along = rng.uniform(0.15, 0.85)
            start, heading = [
                (np.array([0.0, along * width]), np.pi / 2),
                (np.array([height - 1.0, along * width]), -np.pi / 2),
                (np.array([along * height, 0.0]), 0.0),
                (np.array([along * height, width - 1.0]), np.pi),
            ][side]
        else:  # inside the image (a crack from a subsurface origin)
            start = rng.uniform(0.25, 0.75, 2) * np.array([height, width])
            heading = rng.uniform(0, 2 * np.pi)
    heading = float(heading) + rng.uniform(-0.6, 0.6)
    vertices = [np.asarray(start, dtype=np.float64)]
    travelled = 0.0
    while travelled < length:
        step = rng.uniform(5.0, 18.0)
        heading += rng.normal(0.0, 0.55)
        point = vertices[-1] + step * np.array([np.sin(heading), np.cos(heading)])
        point = np.clip(point, [1.0, 1.0], [height - 2.0, width - 2.0])
        if np.allclose(point, vertices[-1]):
            break
        vertices.append(point)
        travelled += step
    return np.array(vertices)


def _crack_cover(shape: tuple[int, int], vertices: np.ndarray, mouth: float,
                 tip: float = 0.2) -> np.ndarray:
    """Open fraction (0-1) of each pixel for a polyline crack whose half opening goes linearly
    from ``mouth`` at the first vertex to ``tip`` at the last."""
    height, width = shape
    yy, xx = np.mgrid[0:height, 0:width]
    points = np.column_stack([yy.ravel(), xx.ravel()]).astype(np.float64)
    lengths = np.linalg.norm(np.diff(vertices, axis=0), axis=1)
    total = max(float(lengths.sum()), 1e-6)
    before = np.concatenate([[0.0], np.cumsum(lengths)])
    cover = np.zeros(len(points))
    for index in range(len(vertices) - 1):
        distance, t = _segment_distance(points, vertices[index], vertices[index + 1])
        fraction = (before[index] + t * lengths[index]) / total
        half = mouth + (tip - mouth) * fraction
        cover = np.maximum(cover, np.clip(half - distance + 0.5, 0.0, 1.0))
    return cover.reshape(shape)


def _data_bar(image: np.ndarray, rng: np.random.Generator) -> int:
    """A microscope data bar across the bottom: dark band, white scale bar, blocky text.
    Returns the band's height in pixels."""
    height, width = image.shape
    band = max(6, int(rng.uniform(0.07, 0.12) * height))
    image[height - band:, :] = rng.uniform(0.0, 0.12)
    bar_h = max(1, band // 5)
    bar_w = int(rng.uniform(0.12, 0.25) * width)
    top = height - band + band // 2 - bar_h // 2
    right = width - int(0.05 * width)
    image[top:top + bar_h, right - bar_w:right] = 0.95
    cell = max(2, band // 3)
    x = int(0.04 * width)
    glyphs = rng.random((int(rng.integers(4, 10)), 3, 2)) < 0.55
    for glyph in glyphs:
        for (row, col), on in np.ndenumerate(glyph):
            if on:
                y0 = height - band + 1 + row * cell // 2
                x0 = x + col * cell // 2
                image[y0:y0 + cell // 2, x0:x0 + cell // 2] = 0.9
        x += 2 * cell
        if x > right - bar_w - 2 * cell:
            break
    return band


def make_heldout_micrograph(
    shape: tuple[int, int] = (256, 256),
    seed: int = MICROGRAPH_HELDOUT_SEED_BASE,
    *,
    kind: int = 2,
) -> Micrograph:
    """A uint8 micrograph of the held-out family with labels (1 precipitate, 2 crack).

    ``kind`` 0 draws no defect, 1 precipitates, 2 a crack (and, in half of the images, also
    precipitates). Artefacts (data bar, scratches, a stain) may appear in any kind. All
    parameters are drawn from ``seed`` and returned in ``info``.
    """
    shape = check_shape(shape, 2, 32)
    if kind not in (0, 1, 2):
        raise ValueError(f"kind must be 0 (clean), 1 (precipitates) or 2 (crack), got {kind!r}")
    rng = np.random.default_rng(seed)
    height, width = shape
    grain = rng.uniform(10.0, 36.0)
    ids = _tessellation(shape, grain, rng)
    n_grains = int(ids.max()) + 1
    tone = rng.uniform(0.55, 0.8)
    image = (tone + rng.normal(0.0, rng.uniform(0.02, 0.07), n_grains))[ids].astype(np.float32)

    # a dark textured second phase in some grains
    second = rng.random(n_grains) < rng.uniform(0.0, 0.45)
    if second.any():
        texture = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32),
                                          (rng.uniform(0.6, 1.2), rng.uniform(2.0, 4.0)))
        texture = ndimage.rotate(texture, rng.uniform(0, 180), reshape=False, mode="wrap")
        texture /= max(float(texture.std()), 1e-6)
        dark = tone - rng.uniform(0.15, 0.3) + 0.08 * texture
        image = np.where(second[ids], dark, image).astype(np.float32)

    # etched boundaries: a 3x3 neighbourhood holding two grains
    boundary = ndimage.maximum_filter(ids, 3) != ndimage.minimum_filter(ids, 3)
    etched = ndimage.gaussian_filter(boundary.astype(np.float32), rng.uniform(0.4, 0.9))
    image -= rng.uniform(0.1, 0.3) * etched / max(float(etched.max()), 1e-6)

    labels = np.zeros(shape, dtype=np.uint8)
    n_particles = 0
    if kind == 1 or (kind == 2 and rng.random() < 0.5):
        n_particles = int(rng.integers(3, 4 + int(height * width / 4096)))
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    boundary_points = np.argwhere(boundary)
    for index in range(n_particles):
        if index % 3 == 2 and len(boundary_points):  # a string along a boundary
            cy, cx = boundary_points[rng.integers(len(boundary_points))] + rng.normal(0, 1.0, 2)
        else:
            cy, cx = rng.uniform(4, height - 4), rng.uniform(4, width - 4)
        a, b = rng.uniform(1.5, 3.5), rng.uniform(1.3, 2.5)
        angle = rng.uniform(0, np.pi)
        u = (yy - cy) * np.cos(angle) + (xx - cx) * np.sin(angle)
        v = -(yy - cy) * np.sin(angle) + (xx - cx) * np.cos(angle)
        radius = np.sqrt((u / a) ** 2 + (v / b) ** 2)
        cover = np.clip((1.0 - radius) * min(a, b) + 0.5, 0.0, 1.0)
        image = image * (1 - cover) + rng.uniform(0.88, 1.0) * cover
        labels[cover >= 0.5] = 1

    crack_info = None
    if kind == 2:
        length = rng.uniform(0.35, 0.9) * min(shape)
        vertices = _polyline(shape, length, rng)
        mouth = rng.uniform(0.7, 2.6)
        cover = _crack_cover(shape, vertices, mouth)
        branched = bool(rng.random() < 0.4 and len(vertices) > 3)
        if branched:
            joint = vertices[len(vertices) // 2]
            heading = np.arctan2(*(vertices[-1] - joint)) + rng.choice([-1, 1]) * rng.uniform(
                0.5, 1.2)
            branch = _polyline(shape, 0.4 * length, rng, start=joint, heading=heading)
            cover = np.maximum(cover, _crack_cover(shape, branch, 0.6 * mouth))
        image = image * (1 - cover) + rng.uniform(0.0, 0.15) * cover
        labels[cover >= 0.5] = 2
        crack_info = {"vertices": vertices.tolist(), "mouth_half_width": float(mouth),
                      "branched": branched}

    # artefacts that are no defect
    if rng.random() < 0.4:  # polishing scratches: straight, faint, across the image
        for _ in range(int(rng.integers(1, 4))):
            p0 = rng.uniform(0, 1, 2) * np.array(shape)
            p1 = rng.uniform(0, 1, 2) * np.array(shape)
            points = np.column_stack([yy.ravel(), xx.ravel()]).astype(np.float64)
            distance, _ = _segment_distance(points, p0, p1)
            line = np.clip(0.6 - distance.reshape(shape) + 0.5, 0, 1).astype(np.float32)
            image += rng.choice([-1.0, 1.0]) * rng.uniform(0.03, 0.1) * line
    if rng.random() < 0.3:  # a smooth stain
        stain = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32),
                                        min(shape) / 6)
        image -= rng.uniform(0.05, 0.15) * np.clip(stain / max(float(stain.std()), 1e-6), 0, None)
    image = ndimage.gaussian_filter(image, rng.uniform(0.4, 1.1))
    vignette = ((yy / height - 0.5) ** 2 + (xx / width - 0.5) ** 2) * 2.0
    image = image * (1.0 - rng.uniform(0.0, 0.3) * vignette)
    image = np.clip(image, 0.0, 1.0) ** rng.uniform(0.7, 1.4)
    image = rng.uniform(-0.05, 0.15) + rng.uniform(0.7, 1.2) * image
    photons = rng.uniform(80.0, 3000.0)
    image = rng.poisson(np.clip(image, 0, None) * photons) / photons
    image = image + rng.normal(0.0, rng.uniform(0.0, 0.02), shape)
    has_bar = bool(rng.random() < 0.35)
    image = np.clip(image, 0.0, 1.0).astype(np.float32)
    if has_bar:  # drawn over the specimen: what it covers is not visible, so not labelled
        band = _data_bar(image, rng)
        labels[height - band:, :] = 0
    info = {"kind": "micrograph_heldout", "seed": seed, "class": MICROGRAPH_CLASSES[kind],
            "grain_size_px": float(grain), "n_precipitates": n_particles,
            "crack": crack_info, "data_bar": has_bar, "labels": MICROGRAPH_LABELS}
    return Micrograph(np.round(image * 255).astype(np.uint8), labels, info)


def make_heldout_micrograph_set(
    n_per_class: int = 20, size: int = 256, seed: int = MICROGRAPH_HELDOUT_SEED_BASE
) -> PatchSet:
    """``n_per_class`` held-out micrographs per class (:data:`MICROGRAPH_CLASSES`) of
    ``size``x``size`` pixels, uint8, seeds ``seed``, ``seed + 1``, ... (class by class)."""
    if n_per_class < 1:
        raise ValueError(f"n_per_class must be >= 1, got {n_per_class}")
    images, classes, masks = [], [], []
    index = 0
    for kind in range(len(MICROGRAPH_CLASSES)):
        for _ in range(n_per_class):
            sample = make_heldout_micrograph((size, size), seed + index, kind=kind)
            images.append(sample.image)
            masks.append(sample.labels)
            classes.append(kind)
            index += 1
    return PatchSet(np.stack(images), np.asarray(classes, dtype=np.int64), np.stack(masks),
                    MICROGRAPH_CLASSES)
