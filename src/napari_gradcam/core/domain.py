"""Is this input like the data the model was trained on? An out-of-domain check.

A Grad-CAM explains what a model does with an input; it cannot say whether the model should be
used on that input at all. A classifier trained on 64 × 64 patches with mild noise still returns
a confident class, and a tidy heatmap, for a 256 × 256 image twice as noisy from another
microscope. This module compares the statistics of the user's input *after the model card's
preprocessing* (what the model actually sees) with the same statistics of the training data,
stored in the card's ``training_statistics`` field, and says in numbers where they differ.

:func:`input_statistics` computes the statistics (the one function used for both sides, so they
are comparable by construction); :func:`compare_to_training` makes a :class:`DomainReport`;
:func:`check_domain` does both for a loaded model.

Bounded memory on lazy data (dask, zarr, memory maps)
    The axes before the last ``spatial_dims`` axes are sample axes (a stack of images, the
    slices of a CT volume for a 2D model). ``sample`` items (default 16) are drawn from them
    without replacement by a seeded generator (``seed``, default 0) and read one at a time
    (``np.asarray(array[index])`` loads one slice or image). An item larger than
    :data:`MAX_ITEM_VOXELS` (a whole volume for a 3D model, a huge micrograph) contributes one
    seeded random block of at most that many voxels instead; with no sample axis, ``sample``
    such blocks are drawn from the single item. Mean and standard deviation use every value
    read; quantiles and the histogram use at most :data:`VALUES_PER_ITEM` seeded random values
    per item. Peak memory is therefore a few copies of one block (16 MiB of float32), whatever
    the size of the volume, and the same call on the same data gives the same numbers.

The checks and their thresholds (:data:`THRESHOLDS`), and why
    ``histogram``
        Jensen–Shannon distance (base 2, 0 = identical, 1 = disjoint) between the two
        intensity distributions on the training histogram's 32 bins plus one bin below and one
        above its range. Both distributions are rebuilt from the stored 101 percentiles, so
        the bins are shared even though the user's data has its own range. Threshold 0.2:
        a Gaussian against itself shifted by a quarter of its std gives a JS distance of
        0.12, by half a std 0.22, by one std 0.41; two samples of the same distribution
        give 0.03–0.05 (the resolution of 101 percentiles), stacks of new micrographs from
        the training generator 0.03–0.07.
    ``mean_shift``
        ``|mean_user - mean_train| / std_train``. Threshold 0.5 training stds: the model's
        first layers respond linearly to the grey level, and a shift of half the training
        spread moves a typical input to where only the brightest or darkest quarter of the
        training data was.
    ``percentile_shift``
        The largest of the 1st, 50th and 99th percentile shifts in training stds. Threshold
        1.0: the tails move more than the mean when the contrast changes (a different
        exposure or window) or a new phase appears, and a CNN's decisions often hinge on the
        darkest or brightest structures (pores, precipitates).
    ``noise``
        Ratio of noise levels. The noise σ is robust: the median absolute deviation of the
        discrete Laplacian (which removes smooth structure), scaled by 1.4826 (MAD → σ for a
        Gaussian) and by ``1 / sqrt(4 d² + 2 d)`` (the Laplacian's gain on white noise in ``d``
        dimensions), per item, then the median over items. Allowed range 0.5–2×: a
        model trained at one noise level has learned filters for that level; twice the noise
        (a shorter exposure, fewer projections) or half of it (denoised or simulated data) is
        where CNN accuracy on materials images typically starts to fall.
    ``input_size``
        The input size the model sees per pass (the image, the slice, or the window), per
        axis against the training patch size. Allowed 0.5–2× per axis for classifiers: a
        classifier with global pooling averages its evidence over the whole input, so 4×
        the patch side means 16× the area, and a defect the model would flag in a 64² patch
        is diluted in a 256² image. Segmentation models (fully convolutional) are only
        flagged when the input is under half the patch size (too little context).
    ``voxel_size``
        The physical size of a pixel/voxel (same unit on both sides) per axis against the
        training range. Allowed 0.8–1.25× of the range's ends: CNN filters are tuned to
        structures of a size in voxels, and a 25 % change of magnification is about the
        scale augmentation such models see. Not checked when either side lacks a voxel size.

Thresholds that follow the training data's own spread
    A pooled training set is more varied than any one image in it: micrograph patches with 10
    to 50 % pearlite differ from the pool's histogram by a JS distance of up to 0.37. So
    :func:`input_statistics` also stores ``item_spread``: how far each sampled item lies from
    the pool (99th percentile over items of the JS distance, mean and percentile shifts; the
    0.5th–99.5th percentile of the noise ratio). A check's threshold is the larger of the
    fixed value above and that spread (the noise range is widened to include it), so a
    training-like input is not flagged for differing from the pool as much as the training
    images differ among themselves. Compute the training statistics with a large ``sample``
    (e.g. 300 patches) so the spread is well estimated. On 60 new patches from the demo
    micrograph generator (training statistics from 300 patches), single 64² patches drew 6
    findings between them (JS 0.40 against a limit of 0.37 at worst); six stacks of 15 new
    patches drew none (JS distances 0.03–0.07). The price: where single training items
    differ wildly (CT patches from air to metal), the intensity limits become wide (JS 0.89
    and 3.3 training stds for the demo CT classifier) and only gross changes are flagged
    there; the size and voxel-size checks are never widened.

A card without statistics gives a report that says so (``checked=False``), not an error.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

STATISTICS_VERSION = 1
HISTOGRAM_BINS = 32
DEFAULT_SAMPLE = 16
DEFAULT_SEED = 0
VALUES_PER_ITEM = 65_536
MAX_ITEM_VOXELS = 2**22
MAX_POOLED_VALUES = 2**21
_QUANTILE_LEVELS = np.arange(101, dtype=np.float64)
_MAD_TO_SIGMA = 1.4826

#: The thresholds of the checks (see the module docstring for why these values).
THRESHOLDS: dict[str, Any] = {
    "histogram_js": 0.2,
    "mean_shift_std": 0.5,
    "percentile_shift_std": 1.0,
    "noise_ratio": (0.5, 2.0),
    "input_size_ratio": (0.5, 2.0),
    "voxel_size_ratio": (0.8, 1.25),
}

Preprocess = Callable[[np.ndarray], Any]


# --------------------------------------------------------------------------------------------
# Statistics


def _laplacian_noise_sigma(item: np.ndarray) -> float | None:
    """Robust noise σ of one item ``(C, *spatial)``: MAD of the discrete Laplacian → σ.

    For white Gaussian noise of σ the d-dimensional Laplacian (2d neighbours with weight 1,
    centre −2d) has standard deviation σ·sqrt(4d² + 2d); its MAD is 0.6745 of that. Smooth
    structure (gradients, plateaus) cancels in the Laplacian, and the median ignores the few
    large responses at edges, so what is left measures the noise.
    """
    dims = item.ndim - 1
    if min(item.shape[1:]) < 3:
        return None
    centre = tuple([slice(None)] + [slice(1, -1)] * dims)
    laplacian = -2.0 * dims * item[centre].astype(np.float64)
    for axis in range(1, dims + 1):
        for shift in (slice(0, -2), slice(2, None)):
            index = [slice(None)] + [slice(1, -1)] * dims
            index[axis] = shift
            laplacian += item[tuple(index)]
    values = laplacian.ravel()
    mad = float(np.median(np.abs(values - np.median(values))))
    return _MAD_TO_SIGMA * mad / math.sqrt(4 * dims * dims + 2 * dims)


def _block_for(shape: tuple[int, ...], rng: np.random.Generator) -> tuple[slice, ...]:
    """A seeded random block of at most MAX_ITEM_VOXELS voxels inside ``shape``."""
    total = int(np.prod(shape))
    if total <= MAX_ITEM_VOXELS:
        return tuple(slice(None) for _ in shape)
    factor = (MAX_ITEM_VOXELS / total) ** (1.0 / len(shape))
    sizes = [max(3, min(s, int(s * factor))) for s in shape]
    starts = [int(rng.integers(0, s - b + 1)) for s, b in zip(shape, sizes, strict=True)]
    return tuple(slice(a, a + b) for a, b in zip(starts, sizes, strict=True))


def _to_channels_first(item: np.ndarray, preprocess: Preprocess | None) -> np.ndarray:
    """One item ``(*spatial)`` → ``(C, *spatial)`` float32, through the card's preprocessing."""
    if preprocess is None:
        return item[None].astype(np.float32, copy=False)
    out = preprocess(item[None])
    out = out.detach().cpu().numpy() if hasattr(out, "detach") else np.asarray(out)
    return np.asarray(out[0], dtype=np.float32)


def _plain_floats(values: Sequence[float] | np.ndarray) -> list[float]:
    return [float(v) for v in np.asarray(values, dtype=np.float64).ravel()]


def input_statistics(
    array: object,
    *,
    spatial_dims: int,
    preprocess: Preprocess | None = None,
    voxel_size: Sequence[float] | None = None,
    input_size: Sequence[int] | None = None,
    sample: int = DEFAULT_SAMPLE,
    seed: int = DEFAULT_SEED,
    axis: int | None = None,
) -> dict[str, Any]:
    """The statistics of ``array`` as the model sees it, as plain (YAML/JSON-ready) data.

    ``array`` has shape ``(*sample_axes, *spatial)`` with ``spatial_dims`` spatial axes last
    (a stack of training patches ``(N, 64, 64)``, a CT volume ``(Z, Y, X)`` explained slice by
    slice with ``spatial_dims=2``, one image ``(Y, X)``). For data with one sample axis that
    is not the first (a CT volume explained along ``axis=1``), pass ``axis``: items are then
    read along it by indexing, without moving the (possibly lazy) array.
    ``preprocess`` is the card's :class:`~napari_gradcam.core.preprocess.Preprocessor` (or any
    callable ``(1, *spatial) → (1, C, *spatial)``); channels are pooled. ``input_size`` is the
    size the model sees per pass when it is not the array's spatial shape (the window of
    windows mode); a ``resize`` step in ``preprocess`` is taken into account. ``voxel_size``
    gives the physical sizes of the spatial axes, or of all axes (the sample axis's entry is
    then dropped: ``axis``, else the leading ones).
    ``sample`` and ``seed`` fix which items are read (see the module docstring).
    """
    if voxel_size is not None and axis is not None and len(voxel_size) == len(array.shape):
        voxel_size = [v for i, v in enumerate(voxel_size) if i != axis % len(array.shape)]
    if axis is not None:
        array = _AxisFirst(array, axis, spatial_dims)
    shape = tuple(int(s) for s in getattr(array, "shape", ()))
    if spatial_dims not in (1, 2, 3):
        raise ValueError(f"spatial_dims must be 1, 2 or 3, got {spatial_dims!r}")
    if len(shape) < spatial_dims:
        raise ValueError(
            f"the data has shape {shape}, fewer axes than the model's {spatial_dims} spatial axes"
        )
    if 0 in shape:
        raise ValueError(f"the data is empty (shape {shape})")
    dtype = np.dtype(getattr(array, "dtype", np.float32))
    if dtype.kind not in "biuf":
        raise TypeError(f"the data has dtype {dtype}; statistics need real numbers")
    if not isinstance(sample, int) or sample < 1:
        raise ValueError(f"sample must be a positive integer, got {sample!r}")
    rng = np.random.default_rng(seed)
    lead, spatial = shape[:-spatial_dims], shape[-spatial_dims:]
    n_items = int(np.prod(lead)) if lead else 1
    if lead:
        chosen = np.sort(rng.choice(n_items, size=min(sample, n_items), replace=False))
        items = [tuple(int(i) for i in np.unravel_index(k, lead)) for k in chosen]
    else:  # one big item: sample blocks of it (or read it once when it is small)
        repeats = 1 if int(np.prod(spatial)) <= MAX_ITEM_VOXELS else sample
        items = [()] * repeats

    per_item_values = max(1024, min(VALUES_PER_ITEM, MAX_POOLED_VALUES // len(items)))
    total = total_sq = 0.0
    count = 0
    kept: list[np.ndarray] = []
    item_stats: list[dict[str, Any]] = []
    for index in items:
        block = _block_for(spatial, rng)
        raw = np.asarray(array[index + block], dtype=np.float32)  # type: ignore[index]
        data = _to_channels_first(raw, preprocess)
        finite = data[np.isfinite(data)].astype(np.float64)
        if finite.size == 0:
            continue
        total += float(finite.sum())
        total_sq += float(np.square(finite).sum())
        count += finite.size
        take = min(finite.size, per_item_values)
        values = (finite[rng.choice(finite.size, size=take, replace=False)]
                  if take < finite.size else finite)
        kept.append(values.astype(np.float32))
        item_stats.append(_summary(values, float(finite.mean()), float(finite.std()),
                                   _laplacian_noise_sigma(np.nan_to_num(data)), spatial_dims))
    if count == 0:
        raise ValueError("the data holds no finite values (all NaN or infinite)")
    pooled = np.concatenate(kept).astype(np.float64)
    mean = total / count
    std = math.sqrt(max(total_sq / count - mean * mean, 0.0))
    noise = [s["noise_sigma"] for s in item_stats if s["noise_sigma"] is not None]
    stats = _summary(pooled, mean, std, float(np.median(noise)) if noise else None, spatial_dims)
    low, high = stats["quantiles"][0], stats["quantiles"][-1]
    if high <= low:  # constant data: one bin around the value
        low, high = low - 0.5, high + 0.5
    counts, edges = np.histogram(pooled, bins=HISTOGRAM_BINS, range=(low, high))

    model_size = tuple(input_size) if input_size is not None else spatial
    output_shape = getattr(preprocess, "output_spatial_shape", None)
    if output_shape is not None:
        model_size = tuple(output_shape(model_size))
    voxels = None
    if voxel_size is not None:
        voxels = _plain_floats(voxel_size)[-spatial_dims:]
        if len(voxels) != spatial_dims:
            raise ValueError(f"voxel_size needs {spatial_dims} entries, got {list(voxel_size)}")
    return {
        "version": STATISTICS_VERSION,
        "spatial_dims": spatial_dims,
        "preprocessed": preprocess is not None,
        "input_size": [int(s) for s in model_size],
        "voxel_size": voxels,
        "mean": stats["mean"],
        "std": stats["std"],
        "percentiles": stats["percentiles"],
        "quantiles": stats["quantiles"],
        "histogram": {"edges": _plain_floats(edges),
                      "counts": _plain_floats(counts / max(int(counts.sum()), 1))},
        "noise_sigma": stats["noise_sigma"],
        "item_spread": _item_spread(item_stats, stats),
        "sampling": {"items_total": n_items, "items_read": len(item_stats), "seed": seed,
                     "values_used": int(pooled.size), "values_read": int(count)},
    }


class _AxisFirst:
    """A view of ``array`` with ``axis`` first, made by indexing (nothing is read or copied)."""

    def __init__(self, array: object, axis: int, spatial_dims: int) -> None:
        shape = tuple(array.shape)  # type: ignore[attr-defined]
        if len(shape) != spatial_dims + 1 or not -len(shape) <= axis < len(shape):
            raise ValueError(
                f"axis={axis} needs data with one sample axis and {spatial_dims} spatial axes; "
                f"got shape {shape}"
            )
        self.array, self.axis = array, axis % len(shape)
        self.shape = (shape[self.axis], *(s for i, s in enumerate(shape) if i != self.axis))
        self.dtype = getattr(array, "dtype", np.dtype(np.float32))

    def __getitem__(self, index: tuple) -> object:
        item, *rest = index
        full = list(rest)
        full.insert(self.axis, item)
        return self.array[tuple(full)]  # type: ignore[index]


def _summary(values: np.ndarray, mean: float, std: float, noise_sigma: float | None,
             spatial_dims: int) -> dict[str, Any]:
    """The comparable numbers of one item or of the pooled data."""
    quantiles = np.percentile(values, _QUANTILE_LEVELS)
    return {"spatial_dims": spatial_dims, "mean": float(mean), "std": float(std),
            "percentiles": {"p1": float(quantiles[1]), "p50": float(quantiles[50]),
                            "p99": float(quantiles[99])},
            "quantiles": _plain_floats(quantiles),
            "noise_sigma": None if noise_sigma is None else float(noise_sigma)}


def _item_spread(items: list[dict[str, Any]], pooled: dict[str, Any]) -> dict[str, Any] | None:
    """How far single items of this data lie from the pooled data (99th percentiles; noise
    ratio 0.5th–99.5th). Stored with the training statistics, these widen the thresholds
    for heterogeneous training sets, so that a training-like input is not flagged for
    differing from the pool as much as the training images differ among themselves."""
    if len(items) < 2:
        return None
    js = [_js_value(item, pooled) for item in items]
    mean = [abs(_mean_value(item, pooled)) for item in items]
    percentile = [abs(_percentile_values(item, pooled)[1]) for item in items]
    ratios = [r for r in (_noise_ratio(item, pooled) for item in items)
              if r is not None and math.isfinite(r)]
    return {
        "n_items": len(items),
        "histogram_js_p99": float(np.percentile(js, 99)),
        "mean_shift_std_p99": float(np.percentile(mean, 99)),
        "percentile_shift_std_p99": float(np.percentile(percentile, 99)),
        "noise_ratio_p0_5": float(np.percentile(ratios, 0.5)) if ratios else None,
        "noise_ratio_p99_5": float(np.percentile(ratios, 99.5)) if ratios else None,
    }


# --------------------------------------------------------------------------------------------
# Comparison


@dataclass(frozen=True)
class Finding:
    """One check: its number, its threshold, whether it flags the input, in words."""

    check: str
    flagged: bool
    applicable: bool
    value: float | None
    threshold: str
    text: str
    numbers: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"check": self.check, "flagged": self.flagged, "applicable": self.applicable,
                "value": self.value, "threshold": self.threshold, "text": self.text,
                "numbers": dict(self.numbers)}


NO_STATISTICS = "no training statistics in the model card; cannot check whether the input " \
                "resembles the training data"


@dataclass(frozen=True)
class DomainReport:
    """All findings of :func:`compare_to_training`; ``checked`` is False without statistics."""

    findings: tuple[Finding, ...] = ()
    checked: bool = True
    reason: str = ""

    @property
    def out_of_domain(self) -> bool:
        return any(f.flagged for f in self.findings)

    def finding(self, check: str) -> Finding:
        for item in self.findings:
            if item.check == check:
                return item
        raise KeyError(f"no check named {check!r}; checks: {[f.check for f in self.findings]}")

    @property
    def flagged(self) -> list[str]:
        return [f.check for f in self.findings if f.flagged]

    def message(self) -> str:
        """One paragraph for a person: what differs from the training data, with the numbers."""
        if not self.checked:
            return self.reason[:1].upper() + self.reason[1:] + "."
        flagged = [f.text for f in self.findings if f.flagged]
        skipped = [f.text for f in self.findings if not f.applicable]
        if flagged:
            text = ("The input looks unlike the model's training data, so the prediction and "
                    "its map may not be trustworthy: " + "; ".join(flagged) + ".")
        else:
            passed = [f.text for f in self.findings if f.applicable]
            text = "The input resembles the training data on every check (" + \
                   "; ".join(passed) + ")."
        if skipped:
            text += " Not checked: " + "; ".join(skipped) + "."
        return text

    def to_dict(self) -> dict[str, Any]:
        """Plain data for layer metadata, provenance and JSON sidecars."""
        return {"checked": self.checked, "out_of_domain": self.out_of_domain,
                "reason": self.reason, "message": self.message(),
                "findings": [f.to_dict() for f in self.findings]}


def training_statistics_of(source: object) -> Mapping[str, Any] | None:
    """The training statistics held by a model card, a card dict, a loaded model, or the
    statistics themselves; None when there are none."""
    if source is None:
        return None
    card = getattr(source, "card", source)  # a LoadedModel holds its card
    if isinstance(card, Mapping):
        if "quantiles" in card:
            return card
        stats = card.get("training_statistics")
    else:
        stats = getattr(card, "training_statistics", None)
    return stats if isinstance(stats, Mapping) and "quantiles" in stats else None


def _cdf(quantiles: Sequence[float]) -> Callable[[np.ndarray], np.ndarray]:
    """Right-continuous CDF interpolated from percentiles 0..100 (ties become jumps)."""
    q = np.asarray(quantiles, dtype=np.float64)
    levels = np.linspace(0.0, 1.0, len(q))
    values, last = np.unique(q[::-1], return_index=True)  # last occurrence of each value
    probs = levels[::-1][last]

    def cdf(points: np.ndarray) -> np.ndarray:
        return np.interp(points, values, probs, left=0.0, right=1.0)

    return cdf


def _shared_edges(train: Mapping) -> np.ndarray:
    """The training histogram's bin edges (32 equal bins over the training range)."""
    low, high = float(train["quantiles"][0]), float(train["quantiles"][-1])
    if high <= low:
        low, high = low - 0.5, high + 0.5
    return np.linspace(low, high, HISTOGRAM_BINS + 1)


def _bin_masses(quantiles: Sequence[float], edges: np.ndarray) -> np.ndarray:
    """Mass in (-inf, e0], (e0, e1], …, (e_last, inf) under the CDF of ``quantiles``."""
    inner = _cdf(quantiles)(edges)
    return np.diff(np.concatenate([[0.0], inner, [1.0]]))


def js_distance(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen–Shannon distance, base 2: sqrt of the JS divergence, in [0, 1]."""
    p = np.clip(np.asarray(p, np.float64), 0, None)
    q = np.clip(np.asarray(q, np.float64), 0, None)
    p, q = p / p.sum(), q / q.sum()
    m = 0.5 * (p + q)

    def kl(a: np.ndarray) -> float:
        nonzero = a > 0
        return float(np.sum(a[nonzero] * np.log2(a[nonzero] / m[nonzero])))

    return math.sqrt(max(0.5 * kl(p) + 0.5 * kl(q), 0.0))


def _spread(train: Mapping) -> float:
    """The training std, floored so constant training data does not divide by zero."""
    return max(float(train["std"]), 1e-12 * max(1.0, abs(float(train["mean"]))), 1e-30)


def _js_value(user: Mapping, train: Mapping) -> float:
    edges = _shared_edges(train)
    return js_distance(_bin_masses(user["quantiles"], edges),
                       _bin_masses(train["quantiles"], edges))


def _mean_value(user: Mapping, train: Mapping) -> float:
    return (float(user["mean"]) - float(train["mean"])) / _spread(train)


def _percentile_values(user: Mapping, train: Mapping) -> tuple[str, float, dict[str, float]]:
    """(name of the worst percentile, its signed shift, all shifts) in training stds."""
    shifts = {key: (float(user["percentiles"][key]) - float(train["percentiles"][key]))
              / _spread(train) for key in ("p1", "p50", "p99")}
    worst = max(shifts, key=lambda key: abs(shifts[key]))
    return worst, shifts[worst], shifts


def _noise_ratio(user: Mapping, train: Mapping) -> float | None:
    user_sigma, train_sigma = user.get("noise_sigma"), train.get("noise_sigma")
    if user_sigma is None or train_sigma is None:
        return None
    if train_sigma <= 0:
        return 1.0 if user_sigma <= 0 else math.inf
    return float(user_sigma) / float(train_sigma)


def _limit(train: Mapping, base: float, spread_key: str) -> float:
    """The larger of the fixed threshold and the training items' own 99th percentile."""
    spread = train.get("item_spread") or {}
    value = spread.get(spread_key)
    return max(base, float(value)) if value is not None else base


def _histogram_finding(user: Mapping, train: Mapping) -> Finding:
    distance = _js_value(user, train)
    wasserstein = float(np.mean(np.abs(np.subtract(user["quantiles"], train["quantiles"]))))
    limit = _limit(train, THRESHOLDS["histogram_js"], "histogram_js_p99")
    flagged = distance > limit
    if flagged:
        text = (f"the intensity histogram differs from the training data's (JS distance "
                f"{distance:.2f} > {limit:.2f})")
    else:
        text = f"intensity histogram JS distance {distance:.2f} ≤ {limit:.2f}"
    return Finding("histogram", flagged, True, distance, f"<= {limit:.3g}", text,
                   {"js_distance": distance, "limit": limit,
                    "wasserstein_in_train_std": wasserstein / _spread(train)})


def _mean_finding(user: Mapping, train: Mapping) -> Finding:
    shift = _mean_value(user, train)
    limit = _limit(train, THRESHOLDS["mean_shift_std"], "mean_shift_std_p99")
    flagged = abs(shift) > limit
    direction = "brighter" if shift > 0 else "darker"
    if flagged:
        text = (f"the mean intensity is {abs(shift):.2f} training stds {direction} than the "
                f"training data's (> {limit:.2f})")
    else:
        text = f"mean shift {shift:+.2f} training stds (limit ±{limit:.2f})"
    return Finding("mean_shift", flagged, True, shift, f"|shift| <= {limit:.3g} training std",
                   text, {"user_mean": user["mean"], "train_mean": train["mean"],
                          "train_std": train["std"], "limit": limit})


def _percentile_finding(user: Mapping, train: Mapping) -> Finding:
    worst, shift, shifts = _percentile_values(user, train)
    limit = _limit(train, THRESHOLDS["percentile_shift_std"], "percentile_shift_std_p99")
    flagged = abs(shift) > limit
    name = {"p1": "1st", "p50": "50th", "p99": "99th"}[worst]
    if flagged:
        text = (f"the {name} intensity percentile is shifted by {shift:+.2f} training stds "
                f"(> {limit:.2f})")
    else:
        text = f"largest percentile shift {shift:+.2f} training stds ({name}; limit {limit:.2f})"
    return Finding("percentile_shift", flagged, True, shift,
                   f"|shift| <= {limit:.3g} training std", text,
                   {"shifts": shifts, "limit": limit})


def _noise_finding(user: Mapping, train: Mapping) -> Finding:
    low, high = THRESHOLDS["noise_ratio"]
    spread = train.get("item_spread") or {}
    if spread.get("noise_ratio_p0_5") is not None:
        low = min(low, float(spread["noise_ratio_p0_5"]))
        high = max(high, float(spread["noise_ratio_p99_5"]))
    threshold = f"{low:.3g}-{high:.3g}x the training level"
    ratio = _noise_ratio(user, train)
    if ratio is None:
        return Finding("noise", False, False, None, threshold,
                       "noise level (unknown: an axis shorter than 3 samples)")
    numbers = {"user_sigma": user["noise_sigma"], "train_sigma": train["noise_sigma"],
               "allowed": [low, high]}
    if not math.isfinite(ratio):
        return Finding("noise", True, True, ratio, threshold,
                       "noise present while the training data was noise-free", numbers)
    flagged = not low <= ratio <= high
    if flagged:
        text = f"noise {ratio:.1f}× the training level (allowed {low:.2g}–{high:.2g}×)"
    else:
        text = f"noise {ratio:.2f}× the training level"
    return Finding("noise", flagged, True, ratio, threshold, text, numbers)


def _size_text(size: Sequence[int]) -> str:
    return "×".join(str(int(s)) for s in size)


def _input_size_finding(user: Mapping, train: Mapping, task: str | None) -> Finding:
    low, high = THRESHOLDS["input_size_ratio"]
    user_size, train_size = list(user["input_size"]), list(train["input_size"])
    if len(user_size) != len(train_size):
        return Finding("input_size", False, False, None, f"{low}-{high}x per axis",
                       "input size (different number of axes)")
    ratios = [u / t for u, t in zip(user_size, train_size, strict=True)]
    worst = max(ratios, key=lambda r: max(r, 1 / r))
    too_large = any(r > high for r in ratios) and task != "segmentation"
    flagged = too_large or any(r < low for r in ratios)
    numbers = {"user": user_size, "train": train_size, "ratios": ratios}
    if flagged:
        text = (f"the input is {_size_text(user_size)} but the model was trained on "
                f"{_size_text(train_size)} ({worst:.1f}× per axis; allowed {low:g}–{high:g}×)")
    else:
        text = f"input {_size_text(user_size)} vs training {_size_text(train_size)}"
    threshold = f"{low}-{high}x per axis" + (" (only smaller for segmentation)"
                                             if task == "segmentation" else "")
    return Finding("input_size", flagged, True, worst, threshold, text, numbers)


def _voxel_range(train: Mapping) -> tuple[list[float], list[float]] | None:
    given = train.get("voxel_size_range")
    if isinstance(given, Mapping) and "min" in given and "max" in given:
        return list(given["min"]), list(given["max"])
    if train.get("voxel_size") is not None:
        return list(train["voxel_size"]), list(train["voxel_size"])
    return None


def _voxel_finding(user: Mapping, train: Mapping) -> Finding:
    low, high = THRESHOLDS["voxel_size_ratio"]
    threshold = f"{low}-{high}x of the training range"
    trained = _voxel_range(train)
    if user.get("voxel_size") is None or trained is None:
        side = "the input's" if user.get("voxel_size") is None else "the training data's"
        return Finding("voxel_size", False, False, None, threshold,
                       f"voxel size ({side} is unknown)")
    size = [float(v) for v in user["voxel_size"]]
    smallest, largest = trained
    if not len(size) == len(smallest) == len(largest):
        return Finding("voxel_size", False, False, None, threshold,
                       "voxel size (different number of axes)")
    ratios = []
    for value, a, b in zip(size, smallest, largest, strict=True):
        if a <= value <= b:
            ratios.append(1.0)
        else:
            nearest = a if value < a else b
            ratios.append(value / nearest if nearest > 0 else math.inf)
    worst = max(ratios, key=lambda r: max(r, 1 / r) if r > 0 else math.inf)
    flagged = not all(low <= r <= high for r in ratios)
    numbers = {"user": size, "train_min": smallest, "train_max": largest, "ratios": ratios}
    shown = ", ".join(f"{v:g}" for v in size)
    trained_text = ", ".join(f"{v:g}" for v in smallest) if smallest == largest else (
        " to ".join("(" + ", ".join(f"{v:g}" for v in ends) + ")" for ends in trained))
    if flagged:
        text = (f"voxel size ({shown}) is {worst:.2f}× the training data's ({trained_text}; "
                f"allowed {low:g}–{high:g}×)")
    else:
        text = f"voxel size ({shown}) within the training range"
    return Finding("voxel_size", flagged, True, worst, threshold, text, numbers)


def compare_to_training(
    stats_user: Mapping[str, Any],
    stats_train: object,
    *,
    task: str | None = None,
) -> DomainReport:
    """Compare the input's statistics with the training data's (see the module docstring).

    ``stats_train`` is the training statistics, or a card / card dict / loaded model holding
    them; without statistics the report says it could not check (``checked=False``). ``task``
    ``"segmentation"`` allows inputs larger than the training patches (fully convolutional).
    """
    train = training_statistics_of(stats_train)
    if train is None:
        return DomainReport(checked=False, reason=NO_STATISTICS)
    if task is None:
        card = getattr(stats_train, "card", stats_train)
        task = card.get("task") if isinstance(card, Mapping) else getattr(card, "task", None)
    if int(stats_user["spatial_dims"]) != int(train["spatial_dims"]):
        raise ValueError(
            f"the input's statistics have {stats_user['spatial_dims']} spatial axes, the "
            f"training data's {train['spatial_dims']}; compare data for the same model"
        )
    findings = (
        _histogram_finding(stats_user, train),
        _mean_finding(stats_user, train),
        _percentile_finding(stats_user, train),
        _noise_finding(stats_user, train),
        _input_size_finding(stats_user, train, task),
        _voxel_finding(stats_user, train),
    )
    return DomainReport(findings=findings)


def check_domain(
    array: object,
    model: object,
    *,
    voxel_size: Sequence[float] | None = None,
    input_size: Sequence[int] | None = None,
    sample: int = DEFAULT_SAMPLE,
    seed: int = DEFAULT_SEED,
    axis: int | None = None,
) -> DomainReport:
    """Statistics of ``array`` through a loaded model's preprocessing, against its card.

    ``model`` is a :class:`~napari_gradcam.core.models.LoadedModel` (its ``card`` and
    ``preprocess`` are used); the other options are :func:`input_statistics`'s. Cheap when
    the card has no statistics: nothing is read then.
    """
    card = getattr(model, "card", model)
    if training_statistics_of(card) is None:
        return DomainReport(checked=False, reason=NO_STATISTICS)
    stats = input_statistics(array, spatial_dims=int(card.spatial_dims),
                             preprocess=getattr(model, "preprocess", None),
                             voxel_size=voxel_size, input_size=input_size, sample=sample,
                             seed=seed, axis=axis)
    return compare_to_training(stats, card, task=getattr(card, "task", None))
