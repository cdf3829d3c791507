"""The scores of a heat map against ground truth, and class probabilities: one definition each.

Accuracy says whether a model is right; these say whether it is right *for the right reason*.
Every number with one of these names, in the widget's label table
(:mod:`napari_gradcam.core.labels_stats`), the evidence report, the model cards and the
evaluation scripts, comes from the functions here; nothing else re-implements them (a score
that had four definitions once gave four different numbers for one map).

* **pointing hit** (:func:`pointing_hits`, the pointing game of Zhang et al. 2016): a map's
  peak is its (first, in C order) maximum; it *hits* an object when the peak lies within
  ``tolerance`` of an object pixel, measured as the Euclidean distance between pixel centres
  in the units of ``spacing`` (pixels by default; micrometres for an anisotropic CT with its
  voxel size). ``tolerance=0`` asks whether the peak pixel itself is on the object. A flat map
  (all values equal, e.g. all zero) has no peak: it points nowhere and hits nothing, so an
  empty explanation is never counted as a hit. A tolerance of a couple of pixels forgives
  the coarse grid of a late CNN layer (the paper used 15 pixels on 224-pixel images; the demo
  models are scored at 2). The **pointing game** (:func:`pointing_game`) is the share of hits
  over samples that contain the object; a sample without the object can neither hit nor
  miss and is refused.
* **energy share** (:func:`energy_share`, the "energy-based pointing game" of Score-CAM):
  the share of the map's *positive* mass inside the mask, sum(max(map, 0)·mask) /
  sum(max(map, 0)). Why the positive part: a CAM is ReLU'd, and a negative value is evidence
  *against* the class, not attention on the region, so |map| would count counter-evidence as
  support. Why NaN for a map with no positive mass (all zero or all negative): such a map
  says nothing about any region, and 0 would read as "the model ignores the region", a
  claim the map does not make. Pass ``empty=0.0`` where a convention needs a number (the
  demo models' evaluation scores a slice without a target as energy 0). Compare the share
  with the mask's share of the image (``mask.mean()``), its value by chance. For signed
  attributions (Integrated Gradients, occlusion) where magnitude is the question, pass
  ``np.abs(map)`` explicitly: then the number says what it measures.
* **IoU per class** (:func:`iou_per_class`): |prediction = c ∧ truth = c| /
  |prediction = c ∨ truth = c| over all pixels; NaN for a class in neither (no evidence
  either way, not a perfect or a failed score).
* **class probabilities** (:func:`class_probabilities`): softmax over the class axis (axis 1)
  of the logits; for segmentation outputs (N, K, *spatial) the per-pixel probabilities
  averaged over the pixels; outputs without a class axis, and any output explained with a
  regression target, returned as they are (a softmax of one predicted porosity is always 1).

No torch at import time (the samples package promises that); :func:`class_probabilities`
imports it when called.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = [
    "class_probabilities",
    "energy_share",
    "energy_share_by_label",
    "iou_per_class",
    "labels_near",
    "peak_position",
    "pointing_game",
    "pointing_hits",
]


def _as_batches(maps: object, masks: object) -> tuple[np.ndarray, np.ndarray]:
    maps_arr = np.asarray(maps, dtype=np.float64)
    masks_arr = np.asarray(masks)
    if masks_arr.dtype != bool:
        if not (np.issubdtype(masks_arr.dtype, np.number) and np.isin(masks_arr, (0, 1)).all()):
            raise ValueError("a mask must be boolean (or 0/1); for a label image pass "
                             "labels == label_id")
        masks_arr = masks_arr.astype(bool)
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


def _spacing(spacing: Sequence[float] | None, ndim: int) -> tuple[float, ...]:
    steps = tuple(float(s) for s in (spacing if spacing is not None else (1.0,) * ndim))
    if len(steps) != ndim or min(steps) <= 0:
        raise ValueError(f"spacing needs one positive value per spatial axis ({ndim}), got "
                         f"{spacing}")
    return steps


def peak_position(heat: np.ndarray) -> tuple[int, ...] | None:
    """Index of the map's maximum (the first in C order), or None for a flat map."""
    values = np.asarray(heat)
    if values.size == 0 or values.max() == values.min():
        return None
    return tuple(int(i) for i in np.unravel_index(int(np.argmax(values)), values.shape))


def labels_near(labels: np.ndarray, peak: tuple[int, ...], tolerance: float,
                spacing: Sequence[float] | None = None) -> set[int]:
    """Values of ``labels`` at pixels within ``tolerance`` (units of ``spacing``) of ``peak``.

    The pointing hit's distance rule, shared by :func:`pointing_hits` (a mask is labels 0/1)
    and the per-label table: only the box of ``tolerance`` around the peak is read, so a
    large volume costs nothing more than a small one.
    """
    if tolerance < 0:
        raise ValueError(f"tolerance is a distance and must be >= 0, got {tolerance}")
    steps = _spacing(spacing, labels.ndim)
    reach = [int(np.floor(tolerance / step)) for step in steps]
    box = tuple(slice(max(0, p - r), min(size, p + r + 1))
                for p, r, size in zip(peak, reach, labels.shape, strict=True))
    grids = np.meshgrid(*[(np.arange(s.start, s.stop) - p) * step
                          for s, p, step in zip(box, peak, steps, strict=True)], indexing="ij")
    distance = np.sqrt(sum(g**2 for g in grids))
    return {int(v) for v in np.unique(np.asarray(labels[box])[distance <= tolerance])}


def pointing_hits(
    maps: object,
    masks: object,
    tolerance: float = 0.0,
    spacing: Sequence[float] | None = None,
) -> np.ndarray:
    """Per-sample pointing hits (bool, length N) of maps ``(N, *spatial)`` on their masks.

    See the module docstring for the definition. Samples whose mask is empty cannot hit or
    miss; a ValueError names them (leave them out).
    """
    maps_arr, masks_arr = _as_batches(maps, masks)
    spatial = maps_arr.shape[1:]
    if tolerance < 0:
        raise ValueError(f"tolerance is a distance and must be >= 0, got {tolerance}")
    steps = _spacing(spacing, len(spatial))
    empty = [i for i, m in enumerate(masks_arr) if not m.any()]
    if empty:
        raise ValueError(
            f"samples {empty[:10]} have empty masks; the pointing game is only defined for "
            "samples that contain the object"
        )
    hits = np.zeros(len(maps_arr), dtype=bool)
    for index, (heat, mask) in enumerate(zip(maps_arr, masks_arr, strict=True)):
        peak = peak_position(heat)
        if peak is None:
            continue  # a flat map points nowhere
        hits[index] = (bool(mask[peak]) if tolerance == 0
                       else 1 in labels_near(mask.view(np.uint8), peak, tolerance, steps))
    return hits


def pointing_game(
    maps: object,
    masks: object,
    tolerance: float = 0.0,
    spacing: Sequence[float] | None = None,
) -> float:
    """Share of samples whose map peak lies within ``tolerance`` of their mask."""
    return float(np.mean(pointing_hits(maps, masks, tolerance, spacing)))


def energy_share(maps: object, masks: object, *, empty: float = np.nan) -> np.ndarray:
    """Per-sample share of the positive map mass inside the mask, ``(N,)``.

    ``maps`` and ``masks`` are ``(N, *spatial)``. A map with no positive mass gets ``empty``
    (NaN by default: no evidence is not 0 % evidence; see the module docstring).
    """
    maps_arr, masks_arr = _as_batches(maps, masks)
    positive = np.clip(maps_arr, 0.0, None)
    axes = tuple(range(1, maps_arr.ndim))
    total = positive.sum(axis=axes)
    inside = (positive * masks_arr).sum(axis=axes)
    return np.divide(inside, total, out=np.full_like(total, float(empty)), where=total > 0)


def energy_share_by_label(heat: np.ndarray, labels: np.ndarray, ids: Sequence[int], *,
                          empty: float = np.nan) -> np.ndarray:
    """:func:`energy_share` of one map inside each label of ``ids`` at once (one pass over
    the image instead of one per label; the same numbers as ``energy_share(heat[None],
    (labels == i)[None])``). ``labels`` holds non-negative integers of the map's shape."""
    flat = np.asarray(labels, dtype=np.int64).ravel()
    positive = np.clip(np.asarray(heat, dtype=np.float64), 0.0, None).ravel()
    inside = np.bincount(flat, weights=positive, minlength=int(max(ids, default=0)) + 1)
    total = float(positive.sum())
    ids_arr = np.asarray(ids, dtype=np.int64)
    if total <= 0:
        return np.full(len(ids_arr), float(empty))
    return inside[ids_arr] / total


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


def class_probabilities(outputs: object, target: object = None) -> np.ndarray:
    """(N, K) class probabilities of model outputs (N, ...), float32.

    Logits (N, K): softmax over K. Segmentation logits (N, K, *spatial): the per-pixel softmax
    averaged over the pixels (the share of the image each class claims, weighted by
    confidence). Outputs without a class axis (N,), or any output explained with a
    :class:`~napari_gradcam.core.targets.RegressionTarget` (predicted properties, not class
    scores: a softmax would turn a single porosity into 1.0): returned as they are, one row
    per sample. Computed in float32 with torch's softmax, as every caller did before.
    """
    import torch

    from napari_gradcam.core.targets import RegressionTarget

    if isinstance(outputs, torch.Tensor):
        outputs = outputs.detach().cpu().float().numpy()
    logits = torch.from_numpy(np.asarray(outputs, dtype=np.float32))
    if isinstance(target, RegressionTarget):
        return logits.reshape(len(logits), -1).numpy()
    if logits.ndim > 2:  # segmentation: average the per-pixel probabilities
        return torch.softmax(logits, 1).flatten(2).mean(-1).numpy()
    if logits.ndim == 2:
        return torch.softmax(logits, 1).numpy()
    return logits.reshape(len(logits), -1).numpy()
