"""Synthetic X-ray powder diffraction (XRD) patterns of steel phases, with peak masks.

Why: a 1D phase classifier should decide by the *peaks* of the phase it names, not by the
background or by a neighbouring phase's peaks. Each pattern here is a sum of pseudo-Voigt peaks
of up to three phases (one dominant), on a sloping background with an amorphous hump, with a
small sample-displacement shift, lattice strain and counting (Poisson) noise. The mask of the
dominant phase's peaks (each peak +- one FWHM) is the ground truth a heat map should hit.

Peak positions are 2-theta in degrees for Cu K-alpha (1.5406 A) from the textbook lattices:
ferrite (bcc alpha-Fe, a = 2.8665 A), austenite (fcc gamma-Fe, a = 3.59 A) and magnetite
(spinel Fe3O4, a = 8.396 A); relative intensities are rounded powder-pattern values.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from napari_gradcam.samples.micrographs import PatchSet

TWO_THETA_RANGE: tuple[float, float] = (20.0, 100.0)
"""2-theta range of the generated patterns, degrees."""

N_POINTS = 1024
"""Samples per pattern (0.078 degree steps)."""

PHASES: dict[str, tuple[tuple[float, float], ...]] = {
    # (2-theta in degrees, relative intensity)
    "ferrite": ((44.67, 100.0), (65.02, 20.0), (82.33, 30.0), (98.94, 10.0)),
    "austenite": ((43.58, 100.0), (50.79, 45.0), (74.68, 20.0), (90.67, 20.0), (95.96, 6.0)),
    "magnetite": (
        (30.10, 30.0),
        (35.45, 100.0),
        (43.09, 20.0),
        (53.42, 10.0),
        (56.98, 30.0),
        (62.57, 40.0),
        (74.01, 8.0),
    ),
}
"""Peak lists of the three phases."""

SPECTRA_CLASSES: tuple[str, ...] = tuple(PHASES)
"""Class names of the phase classifier (index = class id): ferrite, austenite, magnetite."""


@dataclass
class SpectraStack:
    """A stack of patterns as a 2D image (spectrum index x 2-theta).

    ``image`` float32 (N, L) counts; ``two_theta`` (L,) degrees; ``classes`` (N,) dominant
    phase per row; ``masks`` (N, L) bool, where the dominant phase's peaks are; ``fractions``
    (N, 3) phase weights per row; ``info`` the generator parameters.
    """

    image: np.ndarray
    two_theta: np.ndarray
    classes: np.ndarray
    masks: np.ndarray
    fractions: np.ndarray
    info: dict = field(default_factory=dict)


def two_theta_axis(n_points: int = N_POINTS) -> np.ndarray:
    """The 2-theta sampling (degrees) shared by all generated patterns."""
    return np.linspace(*TWO_THETA_RANGE, n_points, dtype=np.float64)


def _pseudo_voigt(x: np.ndarray, centre: float, fwhm: float, eta: float) -> np.ndarray:
    """Unit-height pseudo-Voigt: eta * Lorentzian + (1 - eta) * Gaussian, same FWHM."""
    d = (x - centre) / (fwhm / 2)
    lorentz = 1.0 / (1.0 + d**2)
    gauss = np.exp(-np.log(2.0) * d**2)
    return eta * lorentz + (1.0 - eta) * gauss


def _shifted(centre: float, strain: float, displacement: float) -> float:
    """Peak position after a lattice strain (d -> d(1+strain)) and a constant 2-theta offset."""
    theta = np.radians(centre / 2)
    d_ratio = 1.0 + strain
    new_theta = np.arcsin(np.clip(np.sin(theta) / d_ratio, -1, 1))
    return float(2 * np.degrees(new_theta) + displacement)


def make_pattern(
    fractions: dict[str, float] | np.ndarray,
    seed: int = 0,
    *,
    n_points: int = N_POINTS,
    counts: float = 2000.0,
    mask_phase: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One pattern (float32 counts, length ``n_points``) and the bool mask of one phase's peaks.

    ``fractions`` maps phase name to weight (or is an array in :data:`SPECTRA_CLASSES` order);
    ``counts`` the height of a weight-1, intensity-100 peak above background; ``mask_phase``
    the phase whose peaks are masked (default: the largest weight). The mask spans each peak of
    that phase with a relative intensity >= 10 over +- one FWHM around its shifted position.
    """
    weights = _as_fractions(fractions)
    rng = np.random.default_rng(seed)
    x = two_theta_axis(n_points)
    if mask_phase is None:
        mask_phase = SPECTRA_CLASSES[int(np.argmax(weights))]
    if mask_phase not in PHASES:
        raise ValueError(f"unknown phase {mask_phase!r}; phases: {', '.join(PHASES)}")
    displacement = rng.normal(0.0, 0.08)
    fwhm_base = rng.uniform(0.25, 0.5)
    eta = rng.uniform(0.2, 0.7)
    signal = np.zeros_like(x)
    mask = np.zeros(n_points, dtype=bool)
    for weight, phase in zip(weights, SPECTRA_CLASSES, strict=True):
        if weight <= 0:
            continue
        strain = rng.normal(0.0, 0.0015)
        for centre, intensity in PHASES[phase]:
            position = _shifted(centre, strain, displacement)
            # peaks broaden with angle (Caglioti-like), and intensities vary a little (texture)
            fwhm = fwhm_base * (1.0 + 0.6 * (position - 20.0) / 80.0)
            height = weight * intensity / 100.0 * rng.uniform(0.8, 1.2)
            signal += counts * height * _pseudo_voigt(x, position, fwhm, eta)
            if phase == mask_phase and intensity >= 10:
                mask |= np.abs(x - position) <= fwhm
    # background: decaying air scatter + an amorphous hump + a constant
    t = (x - x[0]) / (x[-1] - x[0])
    background = (
        rng.uniform(60, 200) * np.exp(-t * rng.uniform(2.0, 5.0))
        + rng.uniform(20, 80) * np.exp(-(((x - rng.uniform(25, 40)) / rng.uniform(5, 10)) ** 2))
        + rng.uniform(30, 80)
    )
    pattern = rng.poisson(np.maximum(signal + background, 0.0)).astype(np.float32)
    return pattern, mask


def _as_fractions(fractions: dict[str, float] | np.ndarray) -> np.ndarray:
    if isinstance(fractions, dict):
        unknown = set(fractions) - set(PHASES)
        if unknown:
            raise ValueError(
                f"unknown phase(s) {sorted(unknown)}; phases are {', '.join(SPECTRA_CLASSES)}"
            )
        weights = np.array([float(fractions.get(p, 0.0)) for p in SPECTRA_CLASSES])
    else:
        weights = np.asarray(fractions, dtype=np.float64)
        if weights.shape != (len(SPECTRA_CLASSES),):
            raise ValueError(
                f"fractions must have one weight per phase {SPECTRA_CLASSES}, got shape "
                f"{weights.shape}"
            )
    if (weights < 0).any() or weights.sum() <= 0:
        raise ValueError(f"phase fractions must be >= 0 with a positive sum, got {weights}")
    return weights


def _random_fractions(rng: np.random.Generator, dominant: int) -> np.ndarray:
    """One dominant phase (weight 1) and 0-2 minor phases with weights 0-0.3."""
    weights = np.where(rng.random(len(SPECTRA_CLASSES)) < 0.5, rng.uniform(0, 0.3, 3), 0.0)
    weights[dominant] = 1.0
    return weights


def make_spectra_dataset(n_per_class: int = 100, seed: int = 0) -> PatchSet:
    """A balanced, shuffled set of patterns: ``images`` (N, L) float32 counts, ``classes`` the
    dominant phase, ``masks`` (N, L) uint8 1 where the dominant phase's peaks are."""
    if n_per_class < 1:
        raise ValueError(f"n_per_class must be >= 1, got {n_per_class}")
    rng = np.random.default_rng(seed)
    images, classes, masks = [], [], []
    for class_id in range(len(SPECTRA_CLASSES)):
        for _ in range(n_per_class):
            weights = _random_fractions(rng, class_id)
            pattern, mask = make_pattern(weights, seed=int(rng.integers(2**31)))
            images.append(pattern)
            masks.append(mask.astype(np.uint8))
            classes.append(class_id)
    return PatchSet.shuffled(images, classes, masks, SPECTRA_CLASSES, rng)


def make_spectra_stack(
    n_spectra: int = 64, seed: int = 0, *, n_points: int = N_POINTS
) -> SpectraStack:
    """An in-situ-like series: austenite transforms to ferrite, then the surface oxidises.

    Row ``i`` of the (n_spectra, n_points) image is one pattern; the phase weights change
    smoothly along the stack (austenite first, ferrite in the middle, magnetite last), so the
    dominant phase - the label - changes twice. Good for viewing Grad-CAM of a 1D classifier
    row by row as an image.
    """
    if n_spectra < 3:
        raise ValueError(f"n_spectra must be >= 3 so all three stages appear, got {n_spectra}")
    rng = np.random.default_rng(seed)
    progress = np.linspace(0.0, 1.0, n_spectra)
    austenite = np.clip(1.0 - 2.2 * progress, 0.0, 1.0)
    ferrite = np.clip(2.2 * progress, 0.0, 1.0) * np.clip(2.6 - 2.6 * progress, 0.0, 1.0)
    magnetite = np.clip(2.4 * progress - 1.2, 0.0, 1.2)
    fractions = np.column_stack([ferrite, austenite, magnetite])
    fractions = fractions + 0.02  # traces of everything
    classes = np.argmax(fractions, axis=1)
    rows, masks = [], []
    for weights in fractions:
        pattern, mask = make_pattern(weights, seed=int(rng.integers(2**31)), n_points=n_points)
        rows.append(pattern)
        masks.append(mask)
    return SpectraStack(
        image=np.stack(rows),
        two_theta=two_theta_axis(n_points),
        classes=classes.astype(np.int64),
        masks=np.stack(masks),
        fractions=fractions.astype(np.float32),
        info={
            "kind": "xrd_spectra_stack",
            "seed": seed,
            "radiation": "Cu K-alpha, 1.5406 A",
            "two_theta_range_deg": TWO_THETA_RANGE,
            "axes": ("spectrum", "two_theta"),
            "phases": SPECTRA_CLASSES,
        },
    )
