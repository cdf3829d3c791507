"""Is the heatmap evidence? Checks that test a saliency map against the model it explains.

A heatmap is a claim: "these pixels made the decision". The checks here test that claim
instead of admiring it:

* :func:`deletion_insertion` (Petsiuk et al. 2018, RISE): remove (or add back) pixels in the
  map's order of importance; a faithful map makes the score fall (rise) faster than a random
  order does.
* :func:`region_test`: fill a region (a precipitate, a crack) with blur, mean or an inpainting
  and see whether the prediction changes.
* :func:`energy_in_region` / :func:`check_forbidden_region`: how much of the map lies in a
  region that must not matter (a scale bar, a label burnt into a micrograph, the sample
  holder in a CT scan). A model that looks there has learned a shortcut.
* :func:`randomisation_check` (Adebayo et al. 2018, "Sanity checks for saliency maps"):
  re-initialise the network layer by layer from the top; a map that does not change was never
  about what the model learned (it is an edge detector of the input).
* :func:`agreement`: do two methods point at the same places?

All functions work on 1D, 2D and 3D inputs ``(N, C, *spatial)``, take ``target`` like the
engine, leave the model as found, batch their forward passes (``batch_size``), report
``progress(done, total)`` and stop with :class:`Cancelled` when ``should_stop()`` says so.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from scipy import ndimage
from torch import nn

from napari_gradcam.core.attribution import (
    ProgressCallback,
    ProgressTracker,
    ScoreKind,
    StopCallback,
    as_input_tensor,
    batch_ranges,
    check_batch_size,
    check_model,
    forward,
    forward_in_batches,
    resolve_scorer,
    target_scores,
)
from napari_gradcam.core.engine import preserved_model_state
from napari_gradcam.core.metrics import class_probabilities, energy_share
from napari_gradcam.core.similarity import (
    normalise_map,
    pearson,
    spearman,
    ssim,
    top_k_iou,
)
from napari_gradcam.core.targets import TargetSpec
from napari_gradcam.core.volume import Cancelled

__all__ = [
    "AgreementResult",
    "Cancelled",
    "DeletionInsertionResult",
    "ForbiddenRegionResult",
    "RandomisationResult",
    "RandomisationStep",
    "RegionTestResult",
    "agreement",
    "check_forbidden_region",
    "deletion_insertion",
    "energy_in_region",
    "random_placements",
    "randomisation_check",
    "region_test",
]

Fill = Literal["blur", "mean", "inpaint"] | float
Explainer = Callable[[nn.Module, torch.Tensor], object]


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _maps_for(saliency_map: object, inputs: torch.Tensor, name: str = "saliency_map") -> np.ndarray:
    """The map as ``(N, *spatial)`` float64, matching the input; a clear error otherwise."""
    values = np.asarray(
        saliency_map.detach().cpu().numpy() if isinstance(saliency_map, torch.Tensor)
        else saliency_map,
        dtype=np.float64,
    )
    spatial = tuple(inputs.shape[2:])
    count = inputs.shape[0]
    if values.shape == spatial and count == 1:
        values = values[None]
    if values.shape != (count, *spatial):
        raise ValueError(
            f"{name} must have shape (N, *spatial) = {(count, *spatial)} to match the input "
            f"{tuple(inputs.shape)}, got {values.shape}; compute the map at the input size "
            "(upsampled) and reduce the channel axis"
        )
    if not np.isfinite(values).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return values


def _masks_for(mask: object, inputs: torch.Tensor) -> np.ndarray:
    """A region mask as bool ``(N, *spatial)``, from ``(*spatial)`` or ``(N, *spatial)``."""
    values = np.asarray(mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else mask)
    spatial = tuple(inputs.shape[2:])
    count = inputs.shape[0]
    if values.dtype != bool:
        if not (np.issubdtype(values.dtype, np.number) and np.isin(values, (0, 1)).all()):
            raise ValueError(
                "the region mask must be boolean (or 0/1); for a Labels layer pass "
                "labels == label_id"
            )
        values = values.astype(bool)
    if values.shape == spatial:
        values = np.broadcast_to(values, (count, *spatial))
    if values.shape != (count, *spatial):
        raise ValueError(
            f"the region mask must have the input's spatial shape {spatial} (or "
            f"{(count, *spatial)} with one mask per sample), got {values.shape}"
        )
    if not values.reshape(count, -1).any(axis=1).all():
        raise ValueError("the region mask is empty (for at least one sample): select some pixels")
    return values


def _default_sigma(spatial: tuple[int, ...]) -> float:
    """Blur width that erases object-scale detail: 5% of the largest side, at least 1 pixel."""
    return max(1.0, 0.05 * max(spatial))


def _blurred(inputs: torch.Tensor, sigma: float | None) -> torch.Tensor:
    """Each channel blurred over the spatial axes only (never across samples or channels)."""
    spatial = tuple(inputs.shape[2:])
    width = _default_sigma(spatial) if sigma is None else float(sigma)
    if width <= 0:
        raise ValueError(f"blur_sigma must be positive, got {sigma!r}")
    array = inputs.detach().cpu().double().numpy()
    blurred = ndimage.gaussian_filter(array, sigma=(0, 0) + (width,) * len(spatial), mode="nearest")
    return torch.from_numpy(blurred).to(device=inputs.device, dtype=inputs.dtype)


def _removal_image(inputs: torch.Tensor, removal: Fill, blur_sigma: float | None) -> torch.Tensor:
    """What "removed" pixels are replaced with in deletion / start from in insertion."""
    if isinstance(removal, str):
        if removal == "blur":
            return _blurred(inputs, blur_sigma)
        if removal == "mean":
            spatial_axes = tuple(range(2, inputs.ndim))
            return inputs.mean(dim=spatial_axes, keepdim=True).expand_as(inputs).clone()
        raise ValueError(f"removal must be 'blur', 'mean' or a number, got {removal!r}")
    if isinstance(removal, bool) or not isinstance(removal, (int, float, np.number)):
        raise TypeError(f"removal must be 'blur', 'mean' or a number, got {removal!r}")
    return torch.full_like(inputs, float(removal))


def _trapezoid(y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Trapezoid integral along the last axis (np.trapz was renamed across numpy versions)."""
    return ((y[..., 1:] + y[..., :-1]) * 0.5 * np.diff(x)).sum(axis=-1)


# --------------------------------------------------------------------------------------------
# Deletion / insertion
# --------------------------------------------------------------------------------------------


@dataclass
class DeletionInsertionResult:
    """Score curves of a deletion or insertion game, with a random-order baseline.

    ``fractions`` (steps + 1,) is the share of pixels removed (deletion) or inserted
    (insertion); ``scores`` (N, steps + 1) the target score at each step; ``auc`` (N,) the area
    under the curve on the [0, 1] fraction axis. A faithful map gives a *lower* deletion AUC and
    a *higher* insertion AUC than the random order (``random_scores``, ``random_auc``: the mean
    over ``n_random`` random orders).
    """

    mode: str
    fractions: np.ndarray
    scores: np.ndarray
    auc: np.ndarray
    random_scores: np.ndarray | None
    random_auc: np.ndarray | None
    target_indices: np.ndarray | None
    score_kind: str
    removal: str = ""
    target: str = ""

    @property
    def better_than_random(self) -> np.ndarray | None:
        """Per sample: does the map's order beat the random order (None without a baseline)?"""
        if self.random_auc is None:
            return None
        if self.mode == "deletion":
            return self.auc < self.random_auc
        return self.auc > self.random_auc

    def summary(self) -> str:
        """One line per sample for a log or the GUI."""
        lines = []
        for index, auc in enumerate(self.auc):
            line = f"sample {index}: {self.mode} AUC {auc:.3f}"
            if self.random_auc is not None:
                verdict = "better" if self.better_than_random[index] else "NOT better"
                line += f" vs random {self.random_auc[index]:.3f} ({verdict} than random)"
            lines.append(line)
        return "\n".join(lines)


def deletion_insertion(
    model: nn.Module,
    x: torch.Tensor | np.ndarray,
    saliency_map: np.ndarray | torch.Tensor,
    target: TargetSpec = None,
    *,
    steps: int = 50,
    mode: Literal["deletion", "insertion"] = "deletion",
    removal: Fill | None = None,
    blur_sigma: float | None = None,
    score: ScoreKind = "probability",
    random_baseline: bool = True,
    n_random: int = 1,
    seed: int = 0,
    batch_size: int = 16,
    progress: ProgressCallback | None = None,
    should_stop: StopCallback | None = None,
) -> DeletionInsertionResult:
    """Deletion / insertion curves (Petsiuk et al. 2018) for a saliency map.

    Pixels (all channels of a spatial position together) are ranked by the map, most important
    first (ties keep their position order). At step ``k`` of ``steps`` the first
    ``round(k / steps * P)`` of the ``P`` pixels are replaced by the ``removal`` image
    (deletion, starting from ``x``) or copied from ``x`` into the removal image (insertion,
    starting from the removal image). ``removal`` is ``"blur"`` (a Gaussian blur of ``x``,
    ``blur_sigma`` defaulting to 5% of the largest side: removes detail without inventing a
    sharp edge the model may react to), ``"mean"`` (each channel's mean) or a constant; by
    default ``"mean"`` for deletion and ``"blur"`` for insertion, as Petsiuk et al. do (a
    blurred start keeps insertion inputs closer to real images). Blur only removes what is
    finer than ``blur_sigma``: a large object survives it, so choose ``"mean"`` to erase it.

    The target (``None`` = the class predicted for the clean input, kept fixed for all steps)
    is scored as its softmax ``"probability"`` (default) or ``"logit"``. With
    ``random_baseline`` the same game is played with ``n_random`` random orders (seeded). The
    map is ``(N, *spatial)`` matching ``x``, or ``(*spatial)`` when N is 1.
    Costs ``N * (1 + n_random) * (steps + 1)`` forward passes, ``batch_size`` at a time.
    """
    model = check_model(model)
    batch_size = check_batch_size(batch_size)
    if mode not in ("deletion", "insertion"):
        raise ValueError(f"mode must be 'deletion' or 'insertion', got {mode!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if random_baseline and n_random < 1:
        raise ValueError(f"n_random must be at least 1 with random_baseline, got {n_random}")
    with preserved_model_state(model), torch.no_grad():
        inputs = as_input_tensor(x, model)
        maps = _maps_for(saliency_map, inputs)
        resolved = resolve_scorer(model, inputs, target, batch_size)
        if removal is None:
            removal = "mean" if mode == "deletion" else "blur"
        removed = _removal_image(inputs, removal, blur_sigma)
        count, spatial = inputs.shape[0], tuple(inputs.shape[2:])
        pixels = int(np.prod(spatial))
        rng = np.random.default_rng(seed)
        orders_per_sample = 1 + (n_random if random_baseline else 0)
        # ranks[o, n, p] = position of pixel p in ordering o of sample n (0 = removed first)
        ranks = np.empty((orders_per_sample, count, pixels), dtype=np.int64)
        for sample in range(count):
            order = np.argsort(-maps[sample].ravel(), kind="stable")
            ranks[0, sample, order] = np.arange(pixels)
            for ordering in range(1, orders_per_sample):
                ranks[ordering, sample, rng.permutation(pixels)] = np.arange(pixels)
        rank_tensor = torch.as_tensor(ranks, device=inputs.device)
        fractions = np.arange(steps + 1) / steps
        changed_counts = torch.as_tensor(
            np.rint(fractions * pixels).astype(np.int64), device=inputs.device
        )
        points = steps + 1
        total = orders_per_sample * count * points
        scores = np.empty(total, dtype=np.float64)
        tracker = ProgressTracker(total, progress, should_stop)
        for start, stop in batch_ranges(total, batch_size):
            tracker.check()
            items = np.arange(start, stop)
            orderings, rest = items // (count * points), items % (count * points)
            samples, positions = rest // points, rest % points
            sample_index = torch.as_tensor(samples, device=inputs.device)
            ordering_index = torch.as_tensor(orderings, device=inputs.device)
            position_index = torch.as_tensor(positions, device=inputs.device)
            item_ranks = rank_tensor[ordering_index, sample_index]
            changed = item_ranks < changed_counts[position_index].unsqueeze(1)
            changed = changed.view(len(items), 1, *spatial)
            original, replacement = inputs[sample_index], removed[sample_index]
            if mode == "deletion":
                batch = torch.where(changed, replacement, original)
            else:
                batch = torch.where(changed, original, replacement)
            output = forward(model, batch)
            scores[start:stop] = (
                target_scores(output, resolved.rows(samples), resolved, score)
                .double().cpu().numpy()
            )
            tracker.advance(stop - start)
    curves = scores.reshape(orders_per_sample, count, points)
    auc = _trapezoid(curves, fractions)
    random_scores = curves[1:].mean(axis=0) if random_baseline else None
    return DeletionInsertionResult(
        mode=mode,
        fractions=fractions.astype(np.float32),
        scores=curves[0].astype(np.float32),
        auc=auc[0].astype(np.float32),
        random_scores=None if random_scores is None else random_scores.astype(np.float32),
        random_auc=auc[1:].mean(axis=0).astype(np.float32) if random_baseline else None,
        target_indices=resolved.indices,
        score_kind=score if resolved.function is None else "target function",
        removal=removal if isinstance(removal, str) else f"constant {removal}",
        target=resolved.description,
    )


# --------------------------------------------------------------------------------------------
# Region test
# --------------------------------------------------------------------------------------------


@dataclass
class RegionTestResult:
    """The model's answer before and after a region was filled in.

    ``score_*`` (N,) are the target's logits (or the target function's value);
    ``probability_*`` (N,) the target class's softmax probability and ``probabilities_*``
    (N, K) all class probabilities (spatially averaged for segmentation outputs), ``None`` when
    the output has no class axis; ``predicted_*`` the arg-max class; ``flipped`` whether it
    changed. ``filled`` is the input the model saw after filling, to show beside the original.
    """

    score_before: np.ndarray
    score_after: np.ndarray
    probability_before: np.ndarray | None
    probability_after: np.ndarray | None
    probabilities_before: np.ndarray | None
    probabilities_after: np.ndarray | None
    predicted_before: np.ndarray | None
    predicted_after: np.ndarray | None
    flipped: np.ndarray | None
    target_indices: np.ndarray | None
    fill: str
    filled: np.ndarray
    target: str = ""
    null_drops: np.ndarray | None = None
    null_note: str = ""

    @property
    def score_drop(self) -> np.ndarray:
        """``score_before - score_after``: positive when the region supported the target."""
        return self.score_before - self.score_after

    @property
    def null_count(self) -> int:
        """How many random regions the drop was compared with (0: no null distribution)."""
        return 0 if self.null_drops is None else int(self.null_drops.shape[1])

    @property
    def effect_size(self) -> np.ndarray | None:
        """(N,) ``(drop - mean of the null drops) / their standard deviation`` (ddof 1).

        How many standard deviations the region's drop lies above what filling a random region
        of the same shape does; ±inf when every random region gave the same drop.
        """
        if self.null_drops is None:
            return None
        mean = self.null_drops.mean(axis=1)
        spread = self.null_drops.std(axis=1, ddof=1) if self.null_count > 1 else np.zeros_like(mean)
        excess = self.score_drop - mean
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(spread > 0, excess / np.where(spread > 0, spread, 1.0),
                            np.sign(excess) * np.inf)

    @property
    def p_value(self) -> np.ndarray | None:
        """(N,) one-sided permutation p-value ``(1 + #{null drop >= drop}) / (1 + n)``.

        The ``1 +`` counts the region itself as one draw of the null (Phipson & Smyth 2010),
        so the p-value is never 0 and with ``n`` random regions it is at least ``1 / (1 + n)``.
        """
        if self.null_drops is None:
            return None
        at_least = (self.null_drops >= self.score_drop[:, None]).sum(axis=1)
        return (1.0 + at_least) / (1.0 + self.null_count)

    def stands_out(self, alpha: float = 0.05) -> np.ndarray | None:
        """(N,) True where the drop is positive and ``p_value < alpha``; None without a null."""
        p_values = self.p_value
        if p_values is None:
            return None
        return (self.score_drop > 0) & (p_values < alpha)


def _inpainted(inputs: torch.Tensor, masks: np.ndarray, iterations: int) -> torch.Tensor:
    """Fill each masked region from its surroundings: nearest outside value, then diffusion.

    The nearest-neighbour fill (via the Euclidean distance transform) gives every masked pixel
    a plausible value; ``iterations`` rounds of replacing masked pixels by the mean of their
    3-neighbourhood then smooth the Voronoi-like seams (a discrete Laplace/harmonic inpainting),
    so no sharp edge outlines the removed object.
    """
    array = inputs.detach().cpu().double().numpy().copy()
    for sample in range(array.shape[0]):
        mask = masks[sample]
        if mask.all():
            raise ValueError("fill='inpaint' needs pixels outside the region to copy from; the "
                             "mask covers the whole input")
        nearest = ndimage.distance_transform_edt(mask, return_distances=False, return_indices=True)
        for channel in range(array.shape[1]):
            image = array[sample, channel]
            image[mask] = image[tuple(nearest)][mask]
            for _ in range(iterations):
                image[mask] = ndimage.uniform_filter(image, size=3, mode="nearest")[mask]
    return torch.from_numpy(array).to(device=inputs.device, dtype=inputs.dtype)


def _filled_input(
    inputs: torch.Tensor, masks: np.ndarray, fill: Fill, blur_sigma: float | None,
    inpaint_iterations: int,
) -> torch.Tensor:
    mask_tensor = torch.as_tensor(np.array(masks, copy=True), device=inputs.device).unsqueeze(1)
    if isinstance(fill, str):
        if fill == "blur":
            replacement = _blurred(inputs, blur_sigma)
        elif fill == "mean":
            # The mean of the surroundings, not of the whole image: the region's own values
            # must not leak into what replaces it.
            outside = (~mask_tensor).to(inputs.dtype)
            spatial_axes = tuple(range(2, inputs.ndim))
            kept = outside.sum(dim=spatial_axes, keepdim=True)
            if bool((kept == 0).any()):
                raise ValueError("fill='mean' needs pixels outside the region; the mask covers "
                                 "the whole input")
            replacement = ((inputs * outside).sum(dim=spatial_axes, keepdim=True) / kept
                           ).expand_as(inputs)
        elif fill == "inpaint":
            replacement = _inpainted(inputs, masks, inpaint_iterations)
        else:
            raise ValueError(f"fill must be 'blur', 'mean', 'inpaint' or a number, got {fill!r}")
    elif isinstance(fill, bool) or not isinstance(fill, (int, float, np.number)):
        raise TypeError(f"fill must be 'blur', 'mean', 'inpaint' or a number, got {fill!r}")
    else:
        replacement = torch.full_like(inputs, float(fill))
    return torch.where(mask_tensor, replacement, inputs)


def _class_probabilities(output: torch.Tensor) -> np.ndarray | None:
    """:func:`napari_gradcam.core.metrics.class_probabilities`, or None without a class axis."""
    return None if output.ndim < 2 else class_probabilities(output)


def region_test(
    model: nn.Module,
    x: torch.Tensor | np.ndarray,
    mask: np.ndarray | torch.Tensor,
    target: TargetSpec = None,
    *,
    fill: Fill = "blur",
    blur_sigma: float | None = None,
    inpaint_iterations: int = 50,
    batch_size: int = 16,
    n_null: int = 0,
    seed: int = 0,
    progress: ProgressCallback | None = None,
    should_stop: StopCallback | None = None,
) -> RegionTestResult:
    """Fill the masked region and compare the model's answer before and after.

    ``fill``: ``"blur"`` (the region replaced by a Gaussian blur of the input, removing its
    detail but keeping its mean brightness: the gentlest test), ``"mean"`` (each channel's mean
    of the pixels *outside* the region: the object is erased), ``"inpaint"`` (nearest outside
    value plus diffusion: erased and blended into the background) or a constant. If the
    region decided the class, the target score drops and the prediction may flip; if it did not,
    nothing much happens. ``mask`` is boolean with the input's spatial shape, or one per sample.
    Costs two forward passes per sample.

    A drop alone proves little: filling *any* region changes a prediction a bit (a 0.004 drop in
    probability once passed). With ``n_null`` the same fill is applied to ``n_null`` random
    regions of the same size and shape (the mask moved, seeded by ``seed``, to random places
    where it lies wholly inside the input and does not touch the region itself; wrapped
    around the edges, ``np.roll``, when it fits nowhere whole) and the result carries their
    drops (``null_drops``), the region's ``effect_size`` and ``p_value`` against them; about 50
    resolve p < 0.05. Costs ``n_null`` more forward passes per sample.
    """
    model = check_model(model)
    batch_size = check_batch_size(batch_size)
    if inpaint_iterations < 0:
        raise ValueError(f"inpaint_iterations must be >= 0, got {inpaint_iterations}")
    if isinstance(n_null, bool) or not isinstance(n_null, (int, np.integer)) or n_null < 0:
        raise ValueError(f"n_null is a number of random regions (>= 0), got {n_null!r}")
    with preserved_model_state(model), torch.no_grad():
        inputs = as_input_tensor(x, model)
        masks = _masks_for(mask, inputs)
        resolved = resolve_scorer(model, inputs, target, batch_size)
        filled = _filled_input(inputs, masks, fill, blur_sigma, inpaint_iterations)
        before = forward_in_batches(model, inputs, batch_size)
        after = forward_in_batches(model, filled, batch_size)
        rows = resolved.rows(range(inputs.shape[0]))

        def scores_of(output: torch.Tensor, kind: ScoreKind) -> np.ndarray:
            return target_scores(output, rows, resolved, kind).double().cpu().numpy()

        null_drops, null_note = None, ""
        if n_null:
            null_drops, null_note = _null_drops(
                model, inputs, masks, resolved, scores_of(before, "logit"), fill, blur_sigma,
                inpaint_iterations, batch_size, int(n_null), seed, progress, should_stop)

        class_target = resolved.function is None
        probabilities_before = _class_probabilities(before)
        probabilities_after = _class_probabilities(after)
        has_classes = probabilities_before is not None
        predicted_before = probabilities_before.argmax(axis=1) if has_classes else None
        predicted_after = probabilities_after.argmax(axis=1) if has_classes else None
        return RegionTestResult(
            score_before=scores_of(before, "logit"),
            score_after=scores_of(after, "logit"),
            probability_before=scores_of(before, "probability") if class_target else None,
            probability_after=scores_of(after, "probability") if class_target else None,
            probabilities_before=probabilities_before,
            probabilities_after=probabilities_after,
            predicted_before=predicted_before,
            predicted_after=predicted_after,
            flipped=predicted_before != predicted_after if has_classes else None,
            target_indices=resolved.indices,
            fill=fill if isinstance(fill, str) else f"constant {fill}",
            filled=filled.cpu().float().numpy(),
            target=resolved.description,
            null_drops=null_drops,
            null_note=null_note,
        )


def random_placements(mask: np.ndarray, count: int, rng: np.random.Generator
                      ) -> tuple[list[np.ndarray], str]:
    """``count`` copies of ``mask`` moved to random places, and how they were placed.

    Each copy keeps the region's exact size and shape. First choice: shifted (not wrapped) so
    the whole region stays inside the input and does not overlap the original (the null
    should ask "does filling some *other* region of this shape matter as much?"). When the
    region fits nowhere else whole, the copies are rolled with wrap-around (``np.roll``), still
    avoiding the original. Draws are with replacement; an empty list when no placement avoids
    the region (a region covering most of the input has no null).
    """
    where = np.nonzero(mask)
    low = np.array([int(axis.min()) for axis in where])
    extent = np.array([int(axis.max()) + 1 for axis in where]) - low
    shape = np.array(mask.shape)
    room = shape - extent  # the bounding box can start anywhere in 0..room
    tries = max(200, 100 * count)
    placed: list[np.ndarray] = []
    for _ in range(tries):
        start = np.array([rng.integers(0, r + 1) for r in room])
        if np.array_equal(start, low):
            continue
        moved = np.zeros_like(mask)
        source = tuple(slice(a, a + e) for a, e in zip(low, extent, strict=True))
        target = tuple(slice(a, a + e) for a, e in zip(start, extent, strict=True))
        moved[target] = mask[source]
        if not (moved & mask).any():
            placed.append(moved)
            if len(placed) == count:
                return placed, "shifted inside the input"
    placed = []
    for _ in range(tries):
        shift = tuple(int(rng.integers(0, size)) for size in shape)
        moved = np.roll(mask, shift, axis=tuple(range(mask.ndim)))
        if not (moved & mask).any():
            placed.append(moved)
            if len(placed) == count:
                return placed, "rolled with wrap-around (the region fits nowhere else whole)"
    return [], "no random placement avoids the region (it covers too much of the input)"


def _null_drops(model: nn.Module, inputs: torch.Tensor, masks: np.ndarray, resolved: object,
                scores_before: np.ndarray, fill: Fill, blur_sigma: float | None,
                inpaint_iterations: int, batch_size: int, count: int, seed: int,
                progress: ProgressCallback | None, should_stop: StopCallback | None
                ) -> tuple[np.ndarray | None, str]:
    """(N, count) target-score drops when random regions of each sample's mask are filled."""
    rng = np.random.default_rng(seed)
    drops = np.empty((inputs.shape[0], count), dtype=np.float64)
    tracker = ProgressTracker(inputs.shape[0] * count, progress, should_stop)
    note = ""
    for sample in range(inputs.shape[0]):
        placements, note = random_placements(masks[sample], count, rng)
        if not placements:
            return None, note
        one = inputs[sample:sample + 1]
        for start, stop in batch_ranges(count, batch_size):
            tracker.check()
            group = np.stack(placements[start:stop])
            repeated = one.expand(stop - start, *one.shape[1:])
            filled = _filled_input(repeated, group, fill, blur_sigma, inpaint_iterations)
            output = forward(model, filled)
            rows = resolved.rows([sample] * (stop - start))  # type: ignore[attr-defined]
            after = target_scores(output, rows, resolved, "logit").double().cpu().numpy()
            drops[sample, start:stop] = scores_before[sample] - after
            tracker.advance(stop - start)
    return drops, note


# --------------------------------------------------------------------------------------------
# Energy in a region
# --------------------------------------------------------------------------------------------


def energy_in_region(cam_map: np.ndarray | torch.Tensor, mask: np.ndarray) -> float | np.ndarray:
    """The map's energy share inside ``mask``: :func:`napari_gradcam.core.metrics.energy_share`.

    ``cam_map`` is one map ``(*spatial)`` (returns a float) or a batch ``(N, *spatial)``
    (returns ``(N,)``, one mask for all); ``mask`` is boolean with the spatial shape. The share
    of the *positive* mass (a CAM's evidence for the class; negative values are evidence
    against it) and NaN for a map with no positive mass, which says nothing about any region.
    For the magnitude of a signed attribution (Integrated Gradients, occlusion) pass
    ``np.abs(map)``: the number then says what it measures.
    """
    values = np.asarray(
        cam_map.detach().cpu().numpy() if isinstance(cam_map, torch.Tensor) else cam_map,
        dtype=np.float64,
    )
    region = np.asarray(mask)
    if region.dtype != bool:
        if not (np.issubdtype(region.dtype, np.number) and np.isin(region, (0, 1)).all()):
            raise ValueError("mask must be boolean (or 0/1); for a Labels layer pass "
                             "labels == label_id")
        region = region.astype(bool)
    if not np.isfinite(values).all():
        raise ValueError("cam_map contains NaN or infinite values")
    single = values.shape == region.shape
    if not single and values.shape[1:] != region.shape:
        raise ValueError(
            f"mask shape {region.shape} does not match the map shape {values.shape}; give a "
            "mask with the map's spatial shape (for a batch of maps, its shape without N)"
        )
    batch = values if not single else values[None]
    shares = energy_share(batch, np.broadcast_to(region, batch.shape))
    return float(shares[0]) if single else shares


@dataclass
class ForbiddenRegionResult:
    """How much of the map falls into a region that must not matter, and a warning if too much."""

    energy_share: float | np.ndarray
    threshold: float
    exceeded: bool
    message: str | None
    region_name: str = "forbidden region"


def check_forbidden_region(
    cam_map: np.ndarray | torch.Tensor,
    mask: np.ndarray,
    threshold: float = 0.2,
    *,
    region_name: str = "forbidden region",
) -> ForbiddenRegionResult:
    """Warn when more than ``threshold`` of the map's energy lies in a forbidden region.

    Micrographs carry scale bars, magnification labels and databar strips; a classifier that
    scores them has learned the instrument, not the material. ``message`` is None when the map
    passes, otherwise a sentence for the user naming the region and the share.
    """
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold is a share of the map energy, in [0, 1]; got {threshold!r}")
    shares = energy_in_region(cam_map, mask)
    share_array = np.atleast_1d(np.asarray(shares, dtype=np.float64))
    over = np.flatnonzero(share_array > threshold)
    empty = np.flatnonzero(np.isnan(share_array))
    parts = []
    if over.size:
        worst = float(share_array[over].max())
        which = "" if np.ndim(shares) == 0 else f" (samples {over.tolist()})"
        parts.append(
            f"{worst:.0%} of the heatmap lies in the {region_name}{which}, above the "
            f"{threshold:.0%} limit: the model may rely on it instead of the material"
        )
    if empty.size:
        which = "" if np.ndim(shares) == 0 else f" (samples {empty.tolist()})"
        parts.append(f"the heatmap is empty{which}, so the {region_name} share is undefined")
    return ForbiddenRegionResult(
        energy_share=shares,
        threshold=float(threshold),
        exceeded=bool(over.size),
        message="; ".join(parts) if parts else None,
        region_name=region_name,
    )


# --------------------------------------------------------------------------------------------
# Model-parameter randomisation (Adebayo et al. 2018)
# --------------------------------------------------------------------------------------------


@dataclass
class RandomisationStep:
    """One step of the cascade: which layers are random now and how alike the map still is."""

    layer: str
    randomised_layers: tuple[str, ...]
    spearman: float
    ssim: float
    spearman_per_sample: np.ndarray
    ssim_per_sample: np.ndarray
    barely_changed: bool
    saliency_map: np.ndarray | None = None


@dataclass
class RandomisationResult:
    """The cascade's steps and the verdict.

    ``barely_changes`` is True when the Spearman correlation with the original map stayed at or
    above ``threshold`` at every step, including with every layer randomised: the map then
    reflects the input more than the learned weights and should not be trusted as an
    explanation. ``message`` says so in words.
    """

    original_map: np.ndarray
    steps: list[RandomisationStep] = field(default_factory=list)
    threshold: float = 0.5
    cascading: bool = True
    barely_changes: bool = False
    message: str = ""


def _as_map_array(values: object) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    array = np.asarray(values, dtype=np.float32)
    if not np.isfinite(array).all():
        raise ValueError("the explainer returned a map with NaN or infinite values")
    return array


_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def _parameter_layers(model: nn.Module, x: torch.Tensor) -> list[str]:
    """Modules that own parameters, in the order the forward pass calls them.

    Execution order (recorded with temporary hooks on the private copy) is what "from the top"
    means; registration order can differ (a head defined before the encoder).
    """
    owners = {
        name: module for name, module in model.named_modules()
        if any(True for _ in module.parameters(recurse=False))
    }
    called: list[str] = []
    handles = []
    try:
        for name, module in owners.items():
            def record(_module: nn.Module, _inputs: object, _output: object,
                       name: str = name) -> None:
                if name not in called:
                    called.append(name)
            handles.append(module.register_forward_hook(record))
        with torch.no_grad():
            forward(model, x[:1])
    finally:
        for handle in handles:
            handle.remove()
    return called


def _randomisation_groups(
    model: nn.Module, x: torch.Tensor, depth: int | None
) -> list[tuple[str, list[str]]]:
    """``(label, module names)`` per step, bottom (input) first.

    With ``depth`` the executed parameter layers are grouped by the first ``depth`` parts of
    their dotted names (``depth=2`` gives ``features.3``, ``classifier``: whole blocks, as
    in Adebayo et al.'s Inception figure). Without it each layer is a step, except that a
    normalisation layer joins the layer executed just before it: re-initialising a batch norm
    alone makes it the identity, which for a freshly initialised norm changes nothing and would
    show up as a step where "nothing happened".
    """
    named = dict(model.named_modules())
    groups: list[tuple[str, list[str]]] = []
    for name in _parameter_layers(model, x):
        if depth is not None:
            label = ".".join(name.split(".")[:depth])
            if groups and groups[-1][0] == label:
                groups[-1][1].append(name)
            elif label in [existing for existing, _ in groups]:
                next(members for existing, members in groups if existing == label).append(name)
            else:
                groups.append((label, [name]))
        elif isinstance(named[name], _NORM_TYPES) and groups:
            groups[-1][1].append(name)
        else:
            groups.append((name, [name]))
    return groups


def _reinitialise(modules: Sequence[nn.Module], seed: int) -> None:
    """Fresh random weights for ``modules`` without touching the caller's global RNG state.

    ``reset_parameters`` is the module's own initialiser (Kaiming for convolutions and linear
    layers; identity affine and reset running statistics for batch norm); parameters of modules
    without one are drawn from a normal distribution of the same standard deviation.
    """
    devices = sorted({p.device.index or 0 for m in modules for p in m.parameters()
                      if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for module in modules:
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
            else:
                with torch.no_grad():
                    for parameter in module.parameters(recurse=False):
                        spread = float(parameter.std()) if parameter.numel() > 1 else 0.0
                        parameter.normal_(0.0, spread if spread > 0 else 0.02)


def randomisation_check(
    model: nn.Module,
    x: torch.Tensor | np.ndarray,
    explainer: Explainer,
    *,
    layers: Sequence[str] | None = None,
    depth: int | None = None,
    cascading: bool = True,
    threshold: float = 0.5,
    seed: int = 0,
    keep_maps: bool = False,
    progress: ProgressCallback | None = None,
    should_stop: StopCallback | None = None,
) -> RandomisationResult:
    """Model-parameter randomisation test (Adebayo et al. 2018), cascading from the top.

    ``explainer(model, x) -> map`` computes the map under test for any model, e.g.
    ``lambda m, x: GradCAM(m, "features.3")(x, target=0)``; fix the target class in it, so
    every step explains the same class. The user's model is never modified: a deep copy (in
    eval mode) is explained once as it is, then its layers are re-initialised one after the
    other from the output towards the input (``cascading=True``; each step adds a layer), or
    each layer alone in a fresh copy (``cascading=False``), and the map is recomputed after
    each step. ``layers`` lists module names in the order to randomise (a container name
    randomises everything inside it); by default every module that owns parameters, in reverse
    execution order (the classifier first), with each normalisation layer randomised together
    with the layer before it; ``depth=2`` instead makes one step per block named by the first
    two parts of the dotted names (``classifier``, ``features.3``, ``features.2``, ...).

    Each step reports the Spearman rank correlation and SSIM (after min-max normalisation) with
    the original map, per sample and averaged. A step with Spearman >= ``threshold`` is
    ``barely_changed``; if every step is, the result's ``barely_changes`` flag and ``message``
    say the map does not depend on what the model learned. An undefined correlation (a constant
    map, e.g. an all-zero CAM) counts as changed. Costs ``len(layers) + 1`` explainer calls.
    """
    model = check_model(model)
    if not callable(explainer):
        raise TypeError("explainer must be a callable (model, x) -> map, e.g. "
                        "lambda m, x: GradCAM(m, 'features.3')(x, target=0)")
    if not -1.0 <= threshold <= 1.0:
        raise ValueError(f"threshold is a Spearman correlation in [-1, 1], got {threshold!r}")
    inputs = as_input_tensor(x, model)
    pristine = copy.deepcopy(model).eval()
    named = dict(pristine.named_modules())
    if depth is not None and (isinstance(depth, bool) or not isinstance(depth, int) or depth < 1):
        raise ValueError(f"depth counts parts of a dotted name: a positive integer, got {depth!r}")
    if layers is None:
        order = list(reversed(_randomisation_groups(pristine, inputs, depth)))
        if not order:
            raise ValueError("the model has no parameters to randomise")
    else:
        names = [layers] if isinstance(layers, str) else list(layers)
        unknown = [name for name in names if name not in named or name == ""]
        if unknown:
            raise ValueError(f"layers {unknown} are not in the model; names come from "
                             "model.named_modules(), e.g. 'classifier' or 'features.3'")
        if not names:
            raise ValueError("layers is empty: name at least one layer to randomise")
        order = [(name, [name]) for name in names]
    tracker = ProgressTracker(len(order) + 1, progress, should_stop, "explainer calls")
    tracker.check()
    original = _as_map_array(explainer(pristine, inputs))
    tracker.advance(1)
    per_sample = original.ndim == inputs.ndim - 1 and original.shape[0] == inputs.shape[0]
    originals = original if per_sample else original[None]
    result = RandomisationResult(original_map=original, threshold=float(threshold),
                                 cascading=cascading)
    working = copy.deepcopy(pristine) if cascading else None
    randomised: list[str] = []
    for step, (name, members) in enumerate(order):
        tracker.check()
        subject = working if cascading else copy.deepcopy(pristine)
        assert subject is not None
        modules = dict(subject.named_modules())
        chosen = {id(m): m for member in members for m in modules[member].modules()}
        _reinitialise(list(chosen.values()), seed + step)
        randomised = [*randomised, name] if cascading else [name]
        current = _as_map_array(explainer(subject, inputs))
        if current.shape != original.shape:
            raise ValueError(f"the explainer returned shape {current.shape} after randomising "
                             f"{name!r} but {original.shape} for the original model")
        currents = current if per_sample else current[None]
        rank = np.array([spearman(a, b) for a, b in zip(originals, currents, strict=True)])
        structure = np.array([
            ssim(normalise_map(a), normalise_map(b), data_range=1.0)
            for a, b in zip(originals, currents, strict=True)
        ])
        mean_rank = float(np.nanmean(rank)) if np.isfinite(rank).any() else float("nan")
        result.steps.append(RandomisationStep(
            layer=name,
            randomised_layers=tuple(randomised),
            spearman=mean_rank,
            ssim=float(structure.mean()),
            spearman_per_sample=rank,
            ssim_per_sample=structure,
            barely_changed=bool(np.isfinite(mean_rank) and mean_rank >= threshold),
            saliency_map=current if keep_maps else None,
        ))
        tracker.advance(1)
    result.barely_changes = all(step.barely_changed for step in result.steps)
    last = result.steps[-1]
    if result.barely_changes:
        result.message = (
            f"map barely changes: after randomising {len(last.randomised_layers)} layer(s) the "
            f"Spearman correlation with the original map is still {last.spearman:.2f} (>= "
            f"{threshold:.2f}); the map reflects the input more than what the model learned"
        )
    else:
        first = next(step for step in result.steps if not step.barely_changed)
        result.message = (
            f"passed: the map changes once {first.layer!r} is randomised (Spearman "
            f"{first.spearman:.2f}, SSIM {first.ssim:.2f}); with {len(last.randomised_layers)} "
            f"layer(s) randomised Spearman is {last.spearman:.2f}"
        )
    return result


# --------------------------------------------------------------------------------------------
# Agreement between methods
# --------------------------------------------------------------------------------------------


@dataclass
class AgreementResult:
    """How much two maps agree: rank and linear correlation, overlap of their top pixels."""

    spearman: float
    pearson: float
    top_k_iou: float
    top_k: float


def agreement(
    map_a: np.ndarray | torch.Tensor, map_b: np.ndarray | torch.Tensor, top_k: float = 0.1
) -> AgreementResult:
    """Compare two maps of the same shape (e.g. Grad-CAM vs occlusion of one sample).

    Spearman ignores scale, Pearson rewards linear agreement, and the IoU of the top ``top_k``
    fraction of elements asks whether the two point at the same few places, the question a
    user usually has. Maps must be computed at the same size (upsample CAMs to the input).
    """
    a, b = _as_map_array(map_a), _as_map_array(map_b)
    return AgreementResult(
        spearman=spearman(a, b),
        pearson=pearson(a, b),
        top_k_iou=top_k_iou(a, b, top_k),
        top_k=float(top_k),
    )

