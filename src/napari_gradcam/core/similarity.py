"""How alike are two saliency maps? Rank correlation, linear correlation, top-k overlap, SSIM.

Evidence checks (the model-randomisation test, method agreement) need to compare maps whose
scales are arbitrary: a Grad-CAM map and an Integrated-Gradients map of the same image differ by
orders of magnitude, and a map of a randomised network has a different scale again. So the
measures here are either scale-free (Spearman, Pearson, top-k overlap) or are applied to maps
that were min-max normalised first (SSIM through :func:`normalise_map`).

Pure numpy + scipy on purpose: scikit-image is not a core dependency, so SSIM is implemented
here, for 1D, 2D and 3D maps alike, following Wang et al. 2004 and matching
``skimage.metrics.structural_similarity`` (which the tests use as a reference).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from scipy import ndimage, stats

__all__ = [
    "normalise_map",
    "pearson",
    "spearman",
    "ssim",
    "top_k_iou",
    "top_k_mask",
]


def _as_float_pair(map_a: object, map_b: object) -> tuple[np.ndarray, np.ndarray]:
    """Two maps as float64 arrays of the same shape; a clear error when the shapes differ."""
    a = np.asarray(map_a, dtype=np.float64)
    b = np.asarray(map_b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(
            f"the two maps must have the same shape to be compared, got {a.shape} and "
            f"{b.shape}; resample one of them to the other's size first"
        )
    if a.size == 0:
        raise ValueError("cannot compare empty maps (size 0)")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("maps contain NaN or infinite values; clean them before comparing")
    return a, b


def normalise_map(saliency_map: object) -> np.ndarray:
    """Min-max scale a map to [0, 1] (float64); a constant map becomes all zeros.

    Saliency maps carry no meaningful absolute scale, so structural comparisons (SSIM) are only
    fair after each map has been brought to the same range.
    """
    values = np.asarray(saliency_map, dtype=np.float64)
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros_like(values)
    return (values - low) / (high - low)


def pearson(map_a: object, map_b: object) -> float:
    """Pearson (linear) correlation of two maps over all their elements.

    Returns NaN when either map is constant: correlation is undefined there, and callers must
    not mistake "undefined" for "similar".
    """
    a, b = _as_float_pair(map_a, map_b)
    a = a.ravel() - a.mean()
    b = b.ravel() - b.mean()
    denominator = float(np.sqrt(np.dot(a, a) * np.dot(b, b)))
    if denominator == 0.0:
        return float("nan")
    return float(np.clip(np.dot(a, b) / denominator, -1.0, 1.0))


def spearman(map_a: object, map_b: object) -> float:
    """Spearman rank correlation of two maps (Pearson of the ranks, ties get average ranks).

    Rank correlation is what the randomisation test of Adebayo et al. 2018 reports: it ignores
    any monotone rescaling of a map, so only the ordering of importance counts. NaN for a
    constant map.
    """
    a, b = _as_float_pair(map_a, map_b)
    return pearson(stats.rankdata(a.ravel()), stats.rankdata(b.ravel()))


def top_k_mask(saliency_map: object, top_k: float = 0.1) -> np.ndarray:
    """Boolean mask of the ``top_k`` fraction of elements with the highest values.

    Exactly ``max(1, round(top_k * size))`` elements are selected; ties are broken by position
    (a stable sort), so the answer is deterministic.
    """
    if not 0.0 < top_k <= 1.0:
        raise ValueError(f"top_k is a fraction of the map and must be in (0, 1], got {top_k!r}")
    values = np.asarray(saliency_map, dtype=np.float64)
    count = max(1, round(top_k * values.size))
    order = np.argsort(-values.ravel(), kind="stable")
    mask = np.zeros(values.size, dtype=bool)
    mask[order[:count]] = True
    return mask.reshape(values.shape)


def top_k_iou(map_a: object, map_b: object, top_k: float = 0.1) -> float:
    """Intersection over union of the top-``top_k`` elements of two maps.

    Two methods that point at the same few places agree here even when their low-importance
    background is ordered differently (which dominates a rank correlation).
    """
    a, b = _as_float_pair(map_a, map_b)
    mask_a, mask_b = top_k_mask(a, top_k), top_k_mask(b, top_k)
    union = np.logical_or(mask_a, mask_b).sum()
    return float(np.logical_and(mask_a, mask_b).sum() / union)


def ssim(
    map_a: object,
    map_b: object,
    *,
    data_range: float | None = None,
    window: Literal["gaussian", "uniform"] = "gaussian",
    win_size: int | None = None,
    sigma: float = 1.5,
) -> float:
    """Mean structural similarity (Wang et al. 2004) of two 1D, 2D or 3D arrays.

    Local means, variances and covariance come from a Gaussian window (``sigma``, truncated at
    3.5 sigma, i.e. an 11-wide window for sigma 1.5) or a uniform ``win_size`` window (7 by
    default); variances use the sample (N-1) normalisation and a border of half a window is
    left out of the mean, exactly as ``skimage.metrics.structural_similarity`` does. The window
    shrinks (to an odd size) for arrays smaller than it, so short spectra work too.

    ``data_range`` defaults to the range spanned by both arrays together; for saliency maps,
    normalise both with :func:`normalise_map` first and the range is 1. Two identical arrays
    give exactly 1.
    """
    a, b = _as_float_pair(map_a, map_b)
    if a.ndim not in (1, 2, 3):
        raise ValueError(f"ssim compares 1D, 2D or 3D maps, got an array with {a.ndim} dims")
    if window not in ("gaussian", "uniform"):
        raise ValueError(f"window must be 'gaussian' or 'uniform', got {window!r}")
    if data_range is None:
        data_range = float(max(a.max(), b.max()) - min(a.min(), b.min()))
        if data_range == 0.0:  # both constant and equal (otherwise the range would be > 0)
            return 1.0
    if data_range <= 0:
        raise ValueError(f"data_range must be positive, got {data_range!r}")

    truncate = 3.5
    if win_size is None:
        win_size = 2 * int(truncate * sigma + 0.5) + 1 if window == "gaussian" else 7
    if win_size < 1 or win_size % 2 == 0:
        raise ValueError(f"win_size must be a positive odd integer, got {win_size!r}")
    smallest = min(a.shape)
    if win_size > smallest:
        # Shrink to fit: the largest odd window that fits the smallest side.
        win_size = smallest if smallest % 2 == 1 else smallest - 1
        sigma = min(sigma, max(win_size - 1, 1) / (2 * truncate))

    def local_mean(values: np.ndarray) -> np.ndarray:
        if window == "gaussian":
            return ndimage.gaussian_filter(values, sigma=sigma, truncate=truncate, mode="reflect")
        return ndimage.uniform_filter(values, size=win_size, mode="reflect")

    points = win_size**a.ndim
    covariance_norm = points / (points - 1) if points > 1 else 1.0
    mean_a, mean_b = local_mean(a), local_mean(b)
    var_a = covariance_norm * (local_mean(a * a) - mean_a * mean_a)
    var_b = covariance_norm * (local_mean(b * b) - mean_b * mean_b)
    cov_ab = covariance_norm * (local_mean(a * b) - mean_a * mean_b)
    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2
    ssim_map = ((2 * mean_a * mean_b + c1) * (2 * cov_ab + c2)) / (
        (mean_a**2 + mean_b**2 + c1) * (var_a + var_b + c2)
    )
    pad = (win_size - 1) // 2
    if pad > 0 and all(size > 2 * pad for size in ssim_map.shape):
        ssim_map = ssim_map[tuple(slice(pad, -pad) for _ in range(ssim_map.ndim))]
    return float(ssim_map.mean(dtype=np.float64))
