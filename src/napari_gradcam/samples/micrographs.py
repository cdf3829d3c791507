"""Synthetic light/SEM micrographs of a ferrite-pearlite steel, with ground truth.

Why synthetic: Grad-CAM is only worth trusting if we can check *where* a model looks against
where the defect really is. Real micrographs rarely come with pixel-exact defect masks, so these
generators draw the microstructure from a few physical ingredients and keep the masks:

* ferrite grains: a Voronoi tessellation, each grain a slightly different grey (orientation
  contrast), with dark etched grain boundaries;
* pearlite colonies: some grains filled with cementite/ferrite lamellae (a sinusoidal stripe
  pattern at a random orientation and spacing per colony);
* precipitates: small bright round particles (carbides in SEM contrast), label ``1``;
* a crack: a thin dark wavy line that starts at an edge and tapers to a tip, label ``2``;
* optics and detector: a slight Gaussian blur, an illumination gradient and Gaussian noise.

Label images use ``0`` background (matrix), ``1`` precipitate, ``2`` crack
(:data:`MICROGRAPH_LABELS`). Everything is seeded; the same seed gives the same image.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

MICROGRAPH_LABELS: dict[int, str] = {0: "background", 1: "precipitate", 2: "crack"}
"""Meaning of the values of a micrograph ground-truth label image."""

MICROGRAPH_CLASSES: tuple[str, ...] = ("clean", "precipitates", "crack")
"""Patch classes of :func:`make_micrograph_patches` (index = class id)."""

_DTYPES = ("float32", "uint8", "uint16")


@dataclass
class Micrograph:
    """A generated micrograph with its ground truth.

    ``image`` is grey (float32 in [0, 1], or uint8/uint16 full range), ``labels`` is a uint8
    label image (see :data:`MICROGRAPH_LABELS`), ``info`` records the generator parameters.
    """

    image: np.ndarray
    labels: np.ndarray
    info: dict = field(default_factory=dict)


@dataclass
class PatchSet:
    """A labelled set of patches for training or evaluating a patch classifier.

    ``images``: (N, *patch) float32; ``classes``: (N,) int64 class ids into ``class_names``;
    ``masks``: (N, *patch) uint8 label images of the defects (0 where there is none), which is
    what localisation metrics such as the pointing game compare a heat map against.
    """

    images: np.ndarray
    classes: np.ndarray
    masks: np.ndarray
    class_names: tuple[str, ...]

    def __len__(self) -> int:
        return int(self.classes.shape[0])

    @classmethod
    def shuffled(cls, images: list[np.ndarray], classes: list[int], masks: list[np.ndarray],
                 class_names: tuple[str, ...], rng: np.random.Generator) -> PatchSet:
        """Stack the patches made class by class and shuffle them, so a training loop never
        sees one class in a long run (the permutation is drawn from the generator's ``rng``)."""
        order = rng.permutation(len(classes))
        return cls(images=np.stack(images)[order],
                   classes=np.asarray(classes, dtype=np.int64)[order],
                   masks=np.stack(masks)[order], class_names=class_names)


def check_shape(shape: tuple[int, ...], ndim: int, minimum: int) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in shape)
    except TypeError:
        raise TypeError(f"shape must be a tuple of {ndim} integers, got {shape!r}") from None
    if len(shape) != ndim or min(shape) < minimum:
        raise ValueError(
            f"shape must be {ndim} integers each >= {minimum}, got {shape!r}; "
            f"pass e.g. {(minimum * 4,) * ndim}"
        )
    return shape


def _voronoi_grains(
    shape: tuple[int, int], grain_size: float, rng: np.random.Generator
) -> np.ndarray:
    """Grain id image from a Voronoi tessellation with seeds also just outside the frame.

    Seeds outside the frame avoid unnaturally large grains along the edges.
    """
    height, width = shape
    pad = grain_size
    area = (height + 2 * pad) * (width + 2 * pad)
    n_seeds = max(2, int(np.round(area / grain_size**2)))
    seeds = np.column_stack(
        [
            rng.uniform(-pad, height + pad, n_seeds),
            rng.uniform(-pad, width + pad, n_seeds),
        ]
    )
    yy, xx = np.mgrid[0:height, 0:width]
    _, grain = cKDTree(seeds).query(np.column_stack([yy.ravel(), xx.ravel()]))
    return grain.reshape(shape).astype(np.int32)


def _crack_path(
    shape: tuple[int, int], length: float, rng: np.random.Generator, turn: float = 0.12
) -> tuple[np.ndarray, float]:
    """Points (M, 2) of a wavy crack path from an image edge inwards, one pixel apart.

    The direction does a small random walk (a meandering, transgranular crack); the start is on
    a random edge and the direction points into the image.
    """
    height, width = shape
    edge = rng.integers(4)
    if edge == 0:  # top
        start, angle = np.array([0.0, rng.uniform(0.2, 0.8) * width]), np.pi / 2
    elif edge == 1:  # bottom
        start, angle = np.array([height - 1.0, rng.uniform(0.2, 0.8) * width]), -np.pi / 2
    elif edge == 2:  # left
        start, angle = np.array([rng.uniform(0.2, 0.8) * height, 0.0]), 0.0
    else:  # right
        start, angle = np.array([rng.uniform(0.2, 0.8) * height, width - 1.0]), np.pi
    angle += rng.uniform(-0.5, 0.5)
    n_steps = max(2, int(length))
    turns = np.cumsum(rng.normal(0.0, turn, n_steps)) + angle
    # direction (dy, dx) = (sin, cos): angle 0 points along +x
    steps = np.column_stack([np.sin(turns), np.cos(turns)])
    path = start + np.vstack([[0.0, 0.0], np.cumsum(steps, axis=0)])
    inside = (
        (path[:, 0] >= 0)
        & (path[:, 0] <= height - 1)
        & (path[:, 1] >= 0)
        & (path[:, 1] <= width - 1)
    )
    # stop at the first step that leaves the frame so the tip is inside the image
    first_out = np.argmin(inside[1:]) + 1 if not inside[1:].all() else len(path)
    return path[:first_out], float(first_out)


def _render_crack(
    shape: tuple[int, int], path: np.ndarray, half_width: float
) -> tuple[np.ndarray, np.ndarray]:
    """Darkening (0..1) and mask of a crack whose half-width tapers to zero at the tip.

    The opening follows sqrt(1 - s/L) along the path (an elastic crack-opening profile near a
    tip), so the tip is a real, narrowing end rather than a blunt stop.
    """
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    distance, nearest = cKDTree(path).query(np.column_stack([yy.ravel(), xx.ravel()]))
    distance = distance.reshape(shape)
    along = nearest.reshape(shape) / max(len(path) - 1, 1)
    local = half_width * np.sqrt(np.clip(1.0 - along, 0.0, 1.0)) + 0.35
    darkening = np.clip(local - distance + 0.5, 0.0, 1.0)
    # the tip end (last few pixels) fades out: beyond it there is no crack
    mask = (darkening >= 0.5) & (along < 0.999)
    return darkening.astype(np.float32), mask


def make_micrograph(
    shape: tuple[int, int] = (256, 256),
    seed: int = 0,
    *,
    grain_size: float = 22.0,
    pearlite_fraction: float = 0.35,
    n_precipitates: int = 12,
    crack: bool = True,
    crack_length: float | None = None,
    noise: float = 0.03,
    dtype: str = "float32",
    crack_half_width: tuple[float, float] = (1.0, 1.5),
    crack_turn: float = 0.12,
    precipitate_radius: tuple[float, float] = (1.6, 3.0),
    blur: float = 0.6,
    boundary_width: int = 1,
    boundary_depth: float = 0.22,
) -> Micrograph:
    """Draw a ferrite-pearlite micrograph with optional precipitates and crack.

    ``grain_size`` is the mean grain diameter in pixels; ``pearlite_fraction`` the share of
    grains that are lamellar pearlite colonies; ``n_precipitates`` round bright particles
    (label 1); ``crack`` adds one thin dark wavy crack from an edge with a tip inside the image
    (label 2, length ``crack_length`` pixels, default 0.6 of the smaller side); ``noise`` the
    Gaussian noise sigma on the [0, 1] grey scale. ``dtype`` is ``"float32"`` ([0, 1]),
    ``"uint8"`` or ``"uint16"`` (scaled to the full range). ``crack_half_width`` (range of the
    crack's half opening at its mouth, pixels), ``crack_turn`` (how much the crack meanders:
    the std of its direction change per pixel, radians), ``precipitate_radius`` (pixels) and
    ``blur`` (Gaussian sigma of the optics, pixels), ``boundary_width`` (pixels) and
    ``boundary_depth`` (how much darker an etched grain boundary is) are what the
    domain-randomised training set (:func:`make_randomised_micrograph_patches`) draws per
    image; the defaults are the sample's.
    """
    shape = check_shape(shape, 2, 16)
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {_DTYPES}, got {dtype!r}")
    if not 0.0 <= pearlite_fraction <= 1.0:
        raise ValueError(
            f"pearlite_fraction is a share of grains in [0, 1], got {pearlite_fraction}"
        )
    if grain_size <= 2:
        raise ValueError(f"grain_size is a diameter in pixels and must be > 2, got {grain_size}")
    if n_precipitates < 0:
        raise ValueError(f"n_precipitates must be >= 0, got {n_precipitates}")
    rng = np.random.default_rng(seed)
    height, width = shape

    grains = _voronoi_grains(shape, grain_size, rng)
    n_grains = int(grains.max()) + 1
    grain_grey = rng.normal(0.66, 0.04, n_grains)
    image = grain_grey[grains].astype(np.float32)

    # pearlite colonies: lamellae at one orientation and spacing per colony
    is_pearlite = rng.random(n_grains) < pearlite_fraction
    pearlite = is_pearlite[grains]
    if pearlite.any():
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
        theta = rng.uniform(0, np.pi, n_grains)[grains]
        period = rng.uniform(3.0, 5.5, n_grains)[grains]
        phase = rng.uniform(0, 2 * np.pi, n_grains)[grains]
        stripes = np.sin(2 * np.pi * (xx * np.cos(theta) + yy * np.sin(theta)) / period + phase)
        lamellar = 0.46 + 0.16 * stripes
        image = np.where(pearlite, lamellar, image).astype(np.float32)

    # etched grain boundaries: pixels whose right or lower neighbour is another grain
    boundary = np.zeros(shape, dtype=bool)
    boundary[:, :-1] |= grains[:, :-1] != grains[:, 1:]
    boundary[:-1, :] |= grains[:-1, :] != grains[1:, :]
    if boundary_width > 1:
        boundary = ndimage.binary_dilation(boundary, iterations=boundary_width - 1)
    image[boundary] -= boundary_depth

    labels = np.zeros(shape, dtype=np.uint8)

    # precipitates: bright discs, radius 1.5-3 px, with a soft (partial-pixel) edge
    if n_precipitates:
        yy, xx = np.mgrid[0:height, 0:width]
        centres = np.column_stack(
            [rng.uniform(3, height - 3, n_precipitates), rng.uniform(3, width - 3, n_precipitates)]
        )
        radii = rng.uniform(*precipitate_radius, n_precipitates)
        for (cy, cx), radius in zip(centres, radii, strict=True):
            y0, y1 = max(int(cy - radius - 2), 0), min(int(cy + radius + 3), height)
            x0, x1 = max(int(cx - radius - 2), 0), min(int(cx + radius + 3), width)
            dist = np.hypot(yy[y0:y1, x0:x1] - cy, xx[y0:y1, x0:x1] - cx)
            cover = np.clip(radius - dist + 0.5, 0.0, 1.0)
            window = image[y0:y1, x0:x1]
            image[y0:y1, x0:x1] = window * (1 - cover) + 0.97 * cover
            labels[y0:y1, x0:x1][cover >= 0.5] = 1

    crack_info: dict = {}
    if crack:
        length = 0.6 * min(shape) if crack_length is None else float(crack_length)
        if length < 4:
            raise ValueError(f"crack_length must be at least 4 pixels, got {crack_length}")
        path, drawn = _crack_path(shape, length, rng, crack_turn)
        half_width = rng.uniform(*crack_half_width)
        darkening, mask = _render_crack(shape, path, half_width)
        image = image * (1 - darkening) + 0.08 * darkening
        labels[mask] = 2
        crack_info = {"start": path[0].tolist(), "tip": path[-1].tolist(), "length": drawn}

    # optics: blur, uneven illumination, detector noise
    image = ndimage.gaussian_filter(image, blur)
    gy, gx = rng.normal(0, 0.04, 2)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    image = image + gy * (yy / height - 0.5) + gx * (xx / width - 0.5)
    image = image + rng.normal(0.0, noise, shape)
    image = np.clip(image, 0.0, 1.0).astype(np.float32)

    info = {
        "kind": "micrograph",
        "seed": seed,
        "grain_size_px": grain_size,
        "pearlite_fraction": pearlite_fraction,
        "n_precipitates": n_precipitates,
        "crack": crack_info or None,
        "labels": MICROGRAPH_LABELS,
    }
    return Micrograph(_to_dtype(image, dtype), labels, info)


def _to_dtype(image: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "float32":
        return image
    top = np.iinfo(dtype).max
    return np.round(image * top).astype(dtype)


def make_micrograph_patches(
    n_per_class: int = 100, size: int = 64, seed: int = 0, *, dtype: str = "float32"
) -> PatchSet:
    """A balanced, shuffled set of ``size``x``size`` micrograph patches in three classes.

    Classes (:data:`MICROGRAPH_CLASSES`): ``clean`` (no defect), ``precipitates`` (2-6
    particles, no crack), ``crack`` (one crack entering from an edge, no precipitates). Each
    patch is its own small micrograph with its own seed, so the set is reproducible and two
    seeds give disjoint data. Images are float32 in [0, 1] (or ``dtype`` "uint8"/"uint16",
    full range, like :func:`make_micrograph`); masks are the label images.
    """
    if n_per_class < 1:
        raise ValueError(f"n_per_class must be >= 1, got {n_per_class}")
    if size < 32:
        raise ValueError(f"patch size must be >= 32 pixels so a crack and grains fit, got {size}")
    rng = np.random.default_rng(seed)
    images, classes, masks = [], [], []
    for class_id in range(len(MICROGRAPH_CLASSES)):
        for _ in range(n_per_class):
            child = int(rng.integers(2**31))
            kwargs = {
                "grain_size": float(rng.uniform(14, 26)),
                "pearlite_fraction": float(rng.uniform(0.1, 0.5)),
                "noise": float(rng.uniform(0.015, 0.045)),
                "n_precipitates": int(rng.integers(2, 7)) if class_id == 1 else 0,
                "crack": class_id == 2,
                "crack_length": float(rng.uniform(0.45, 0.9) * size),
            }
            sample = make_micrograph((size, size), seed=child, dtype=dtype, **kwargs)
            images.append(sample.image)
            masks.append(sample.labels)
            classes.append(class_id)
    return PatchSet.shuffled(images, classes, masks, MICROGRAPH_CLASSES, rng)


MICROGRAPH_TRAINING_SIZES: tuple[int, ...] = (64, 96, 128, 192, 256)
"""Image sizes the domain-randomised micrograph classifier trains on (one set per size)."""


def _scale_bar(image: np.ndarray, rng: np.random.Generator) -> None:
    """Draw a scale bar with a caption (blocks for the digits) into a corner, in place.

    A distractor: a long, sharp, high-contrast bar is not a defect, and a classifier that has
    never seen one may call it a crack (dark bar) or a particle (bright caption blocks).
    """
    height, width = image.shape
    value = float(rng.choice([0.02, 0.98]))
    bar_h = max(2, round(rng.uniform(0.012, 0.03) * height))
    bar_w = round(rng.uniform(0.15, 0.35) * width)
    margin = round(rng.uniform(0.03, 0.08) * min(height, width))
    top = height - margin - bar_h
    left = margin if rng.random() < 0.5 else width - margin - bar_w
    if rng.random() < 0.5:  # a contrasting backing plate behind bar and caption
        pad = max(2, bar_h)
        plate = (slice(max(top - 4 * pad, 0), min(top + bar_h + pad, height)),
                 slice(max(left - pad, 0), min(left + bar_w + pad, width)))
        image[plate] = 1.0 - value
    image[top:top + bar_h, left:left + bar_w] = value
    glyph_h = max(3, 2 * bar_h)
    glyph_w = max(2, int(0.6 * glyph_h))
    x = left
    for _ in range(int(rng.integers(2, 6))):
        y0 = max(top - glyph_h - bar_h, 0)
        image[y0:y0 + glyph_h, x:x + glyph_w] = value
        x += glyph_w + max(1, glyph_w // 2)
        if x + glyph_w > width:
            break


def _scratches(image: np.ndarray, rng: np.random.Generator) -> None:
    """Polishing scratches: long, straight, faint lines across the image, in place."""
    height, width = image.shape
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    for _ in range(int(rng.integers(1, 5))):
        angle = rng.uniform(0, np.pi)
        offset = rng.uniform(-0.5, 0.5) * max(height, width)
        distance = np.abs((yy - height / 2) * np.cos(angle) - (xx - width / 2) * np.sin(angle)
                          - offset)
        cover = np.clip(rng.uniform(0.3, 0.9) - distance + 0.5, 0.0, 1.0)
        image += float(rng.choice([-1.0, 1.0]) * rng.uniform(0.03, 0.12)) * cover


def _specks(image: np.ndarray, rng: np.random.Generator) -> None:
    """Dust and etch pits: a few soft dark spots of 1.5-5 px radius, in place."""
    height, width = image.shape
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    for _ in range(int(rng.integers(1, 4 + height * width // 8192))):
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        radius = rng.uniform(1.5, 5.0)
        cover = np.clip(radius - np.hypot(yy - cy, xx - cx) + 0.5, 0.0, 1.0)
        image -= float(rng.uniform(0.1, 0.35)) * cover


def make_randomised_micrograph(
    shape: tuple[int, int], seed: int, kind: int, *, varied_boundaries: bool = False
) -> Micrograph:
    """One domain-randomised micrograph of class ``kind`` (0 clean, 1 precipitates, 2 crack).

    Why: trained on one look (64x64 patches, one grain-size band, one crack width, fixed
    contrast and noise), the first micrograph classifier called the 256x256 sample "clean"
    (0.70) with its crack in plain sight. Each image here draws its own grain size (8-40 px),
    pearlite share, precipitate size and count, crack width (half opening 0.7-3 px at the
    mouth), length (0.3-1 of the side) and meander, optics blur (0.3-1.1 px), vignetting,
    contrast window (gain, offset, gamma), noise level (sigma 0.005-0.05 of the grey range,
    Gaussian or signal dependent), and
    distractors that are no defect: scale bars with captions, polishing scratches, dust specks.
    A crack image may also hold precipitates (a crack is what matters then; its label wins).
    ``varied_boundaries`` also draws the grain boundaries' etch width (1-3 px) and depth
    (0.1-0.4): with thin boundaries only, the classifier called micrographs with thick, dark
    boundaries "crack" (the held-out family showed it).
    """
    rng = np.random.default_rng(seed)
    etch = ({"boundary_width": int(rng.integers(1, 4)),
             "boundary_depth": float(rng.uniform(0.1, 0.4))} if varied_boundaries else {})
    height, width = shape
    area_factor = height * width / 4096.0
    n_precipitates = 0
    if kind == 1 or (kind == 2 and rng.random() < 0.5):
        n_precipitates = int(rng.integers(2, 3 + int(4 * np.sqrt(area_factor))))
    sample = make_micrograph(
        shape, seed=int(rng.integers(2**31)),
        grain_size=float(rng.uniform(8.0, 40.0)),
        pearlite_fraction=float(rng.uniform(0.0, 0.6)),
        n_precipitates=n_precipitates,
        crack=kind == 2,
        crack_length=float(rng.uniform(0.3, 1.0) * min(shape)),
        noise=0.0,
        crack_half_width=(0.7, 3.0),
        crack_turn=float(rng.uniform(0.03, 0.3)),
        precipitate_radius=(float(rng.uniform(1.2, 2.0)), float(rng.uniform(2.2, 4.0))),
        blur=float(rng.uniform(0.3, 1.1)),
        **etch,
    )
    image = sample.image.astype(np.float32)
    if rng.random() < 0.35:
        _scratches(image, rng)
    if rng.random() < 0.35:
        _specks(image, rng)
    # contrast window: gamma, gain and offset as different microscopes and etches give them
    image = np.clip(image, 0.0, 1.0) ** float(rng.uniform(0.6, 1.6))
    image = float(rng.uniform(-0.15, 0.25)) + float(rng.uniform(0.5, 1.3)) * image
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    centre = rng.uniform(0.2, 0.8, 2) * np.array(shape)
    vignette = np.hypot(yy - centre[0], xx - centre[1]) / max(shape)
    image -= float(rng.uniform(0.0, 0.25)) * vignette**2
    sigma = float(rng.uniform(0.005, 0.05))
    if rng.random() < 0.5:  # shot noise: brighter pixels are noisier
        image = image + sigma * np.sqrt(np.clip(image, 0.0, None) + 0.1) * rng.standard_normal(
            shape).astype(np.float32)
    else:
        image = image + sigma * rng.standard_normal(shape).astype(np.float32)
    if rng.random() < 0.25:
        _scale_bar(image, rng)
    image = np.clip(image, 0.0, 1.0).astype(np.float32)
    info = {**sample.info, "kind": "micrograph_randomised", "class": MICROGRAPH_CLASSES[kind],
            "seed": seed}
    return Micrograph(image, sample.labels, info)


def make_randomised_micrograph_patches(
    n_per_class: int = 100, size: int = 128, seed: int = 0, *, dtype: str = "uint8",
    varied_boundaries: bool = False,
) -> PatchSet:
    """A balanced, shuffled set of ``size``x``size`` domain-randomised micrographs
    (:func:`make_randomised_micrograph`), classes as :data:`MICROGRAPH_CLASSES`.

    The generator is seeded with ``(seed, size)``, so the sets of one seed at different sizes
    (:data:`MICROGRAPH_TRAINING_SIZES`) are different images.
    """
    if n_per_class < 1:
        raise ValueError(f"n_per_class must be >= 1, got {n_per_class}")
    if size < 32:
        raise ValueError(f"size must be >= 32 pixels so a crack and grains fit, got {size}")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {_DTYPES}, got {dtype!r}")
    rng = np.random.default_rng([seed, size])
    images, classes, masks = [], [], []
    for class_id in range(len(MICROGRAPH_CLASSES)):
        for _ in range(n_per_class):
            sample = make_randomised_micrograph((size, size), int(rng.integers(2**31)), class_id,
                                                varied_boundaries=varied_boundaries)
            images.append(_to_dtype(sample.image, dtype))
            masks.append(sample.labels)
            classes.append(class_id)
    return PatchSet.shuffled(images, classes, masks, MICROGRAPH_CLASSES, rng)
