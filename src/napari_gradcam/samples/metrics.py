"""Localisation and segmentation scores for heat maps against ground-truth defect masks.

Accuracy says whether a model is right; these say whether it is right *for the right reason*.
These are THE definitions every number in this project's README, model cards and evaluation
scripts uses (``scripts/evaluate_demo_models.py``, the evidence reports); nothing else
re-implements them:

* **pointing hit** (:func:`pointing_hits`, pointing game of Zhang et al., 2016): a map "hits"
  when its maximum lies on the object, here within ``tolerance`` (in pixels, or in physical
  units with ``spacing``; Euclidean distance to the nearest mask pixel) of a mask pixel. A
  tolerance of a couple of pixels forgives the coarse grid of a late CNN layer; the original
  paper used 15 pixels on 224-pixel images; the demo models are scored at 2 pixels/voxels. A
  map without a unique maximum structure (all values equal, e.g. all zero) is a miss: it
  points nowhere. The **pointing game** (:func:`pointing_game`) is the share of hits over
  samples (slices, patches, volumes) that contain the object;
* **energy share** (:func:`energy_share`): the fraction of the map's *positive* mass inside
  the mask, sum(max(map, 0) * mask) / sum(max(map, 0)) (the "energy-based pointing game" of
  Score-CAM; 0 for a map with no positive value). Compare it with the mask's share of the
  image, its chance level. Which mask is stated with every number (the true defect mask, or
  that mask dilated by the pointing tolerance for whole-volume maps);
* intersection over union per class (:func:`iou_per_class`), for segmentation outputs.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage


def _as_batches(maps: object, masks: object) -> tuple[np.ndarray, np.ndarray]:
    maps_arr = np.asarray(maps, dtype=np.float64)
    masks_arr = np.asarray(masks).astype(bool)
    if maps_arr.shape != masks_arr.shape:
        raise ValueError(
            f"maps {maps_arr.shape} and masks {masks_arr.shape} must have the same shape "
            "(N, *spatial); upsample the maps to the input size first"
        )
    if maps_arr.ndim < 2:
        raise ValueError(
            f"expected a batch (N, *spatial) of maps, got shape {maps_arr.shape}; add a batch "
            "axis with x[None] for a single map"
        )
    if not np.isfinite(maps_arr).all():
        raise ValueError("the maps contain NaN or infinite values")
    return maps_arr, masks_arr


def pointing_hits(
    maps: object,
    masks: object,
    tolerance: float = 0.0,
    spacing: Sequence[float] | None = None,
) -> np.ndarray:
    """Per-sample pointing-game hits (bool array of length N).

    ``maps`` and ``masks`` are (N, *spatial); samples whose mask is empty cannot hit or miss
    and must be left out by the caller (a ValueError says which). ``spacing`` gives the pixel
    size per spatial axis so that ``tolerance`` is in the same physical unit (anisotropic CT).
    """
    maps_arr, masks_arr = _as_batches(maps, masks)
    spatial = maps_arr.shape[1:]
    if spacing is not None and len(spacing) != len(spatial):
        raise ValueError(
            f"spacing needs one value per spatial axis ({len(spatial)}), got {spacing}"
        )
    if tolerance < 0:
        raise ValueError(f"tolerance is a distance and must be >= 0, got {tolerance}")
    empty = [i for i, m in enumerate(masks_arr) if not m.any()]
    if empty:
        raise ValueError(
            f"samples {empty[:10]} have empty masks; the pointing game is only defined for "
            "samples that contain the object"
        )
    hits = np.zeros(len(maps_arr), dtype=bool)
    for index, (heat, mask) in enumerate(zip(maps_arr, masks_arr, strict=True)):
        if heat.max() == heat.min():
            continue  # a flat map points nowhere
        peak = np.unravel_index(int(np.argmax(heat)), spatial)
        if tolerance == 0:
            hits[index] = bool(mask[peak])
        else:
            distance = ndimage.distance_transform_edt(~mask, sampling=spacing)
            hits[index] = bool(distance[peak] <= tolerance)
    return hits


def pointing_game(
    maps: object,
    masks: object,
    tolerance: float = 0.0,
    spacing: Sequence[float] | None = None,
) -> float:
    """Share of samples whose map maximum lies within ``tolerance`` of their mask."""
    return float(np.mean(pointing_hits(maps, masks, tolerance, spacing)))


def energy_share(maps: object, masks: object) -> np.ndarray:
    """Per-sample share of the positive map mass inside the mask (0 for an all-<=0 map).

    Negative values are set to zero first, as Grad-CAM's ReLU does: negative evidence is not
    "attention" on the mask.
    """
    maps_arr, masks_arr = _as_batches(maps, masks)
    positive = np.clip(maps_arr, 0.0, None)
    axes = tuple(range(1, maps_arr.ndim))
    total = positive.sum(axis=axes)
    inside = (positive * masks_arr).sum(axis=axes)
    return np.divide(inside, total, out=np.zeros_like(total), where=total > 0)


def iou_per_class(prediction: object, truth: object, n_classes: int) -> np.ndarray:
    """Intersection over union of each class over all pixels (NaN for a class in neither)."""
    pred = np.asarray(prediction)
    true = np.asarray(truth)
    if pred.shape != true.shape:
        raise ValueError(f"prediction {pred.shape} and truth {true.shape} shapes differ")
    scores = np.full(n_classes, np.nan)
    for cls in range(n_classes):
        p, t = pred == cls, true == cls
        union = np.count_nonzero(p | t)
        if union:
            scores[cls] = np.count_nonzero(p & t) / union
    return scores
