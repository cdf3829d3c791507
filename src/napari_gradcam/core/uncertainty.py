"""How sure is a map? An uncertainty map beside each explanation.

A Grad-CAM is one number per voxel with no error bar. Here the same input is explained
several times under changes that should not matter, and the spread of the maps, voxel by
voxel, is the error bar. What a large spread means depends on what was changed:

``flips``
    The input mirrored along each spatial axis, explained, and the map mirrored back.
    Microstructure has no preferred orientation unless the model learned one, so a voxel
    whose evidence appears in one orientation and not the other is evidence the model only
    uses in that orientation, or lies where the coarse feature grid does not map onto itself
    under mirroring (a stride-2 grid on an odd size moves by one cell). High values: do not
    read the map's detail there as a property of the material.
``shifts``
    The input moved by ±1 and ±2 pixels along each spatial axis (edge values repeated), the
    map moved back; voxels that were only seen as repeated edge are left out of that
    variant's count. This measures aliasing: strided convolutions and pooling make a CAM
    depend on where the sampling grid falls. High values mean the map's fine structure at
    that place is an artefact of the grid, so trust it only at the scale of one feature cell.
    Needs maps at the input's resolution (``upsample=True``, the default).
``dropout``
    Monte-Carlo dropout (Gal & Ghahramani 2016): the model's dropout layers are switched on
    (only those; BatchNorm and everything else stay in eval mode) and the input is explained
    ``n_dropout`` times with different dropped units. The spread approximates the model's
    own (epistemic) uncertainty: high where the explanation rests on a few units the model
    has not learned robustly. A model without dropout layers reports this source as not
    applicable. Dropout written as ``F.dropout(x, training=self.training)`` inside a
    ``forward`` is switched on too only if it reads the module's ``training`` flag of a
    registered dropout module; functional dropout cannot be found and is left off.
windows (volume mode ``windows``, see :class:`WeightedMoments`)
    Overlapping windows explain the same voxel with different surroundings; the weighted
    variance of their maps is the disagreement. High values mean the map there depends on
    the context the window happened to include, not only on the local structure.

Each source's standard deviation map is in the map's own units (a CAM of 0.8 ± 0.3); the
combined ``std_map`` pools every variant of every requested source with the plain map.
``info.sources[name].relative`` (the mean std over the map's maximum) gives one number per
source to compare runs.

The target is fixed by the plain explanation: "the predicted class" is replaced by the class
the model predicted for the unchanged input, so every variant explains the same class even
where a flip or a dropped unit changes the prediction (how often that happens is reported as
``info.prediction_changes``). A region target (Seg-Grad-CAM) is mirrored and shifted with
the input. A callable target is used as given: it is assumed not to depend on position.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from napari_gradcam.core.methods import INPUT_GRADIENT_METHODS, CAMResult, heatmaps
from napari_gradcam.core.targets import (
    ClassTarget,
    PredictedClass,
    SegmentationRegion,
    Target,
    TargetSpec,
    resolve_target,
)

SOURCES = ("flips", "shifts", "dropout")
DEFAULT_SOURCES = ("flips", "shifts", "dropout")
DEFAULT_SHIFTS = (-2, -1, 1, 2)

DROPOUT_TYPES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                 nn.FeatureAlphaDropout)

MEANINGS = {
    "flips": "change of the map when the input is mirrored (orientation dependence, feature-grid"
             " alignment)",
    "shifts": "change of the map when the input moves by 1-2 pixels (aliasing of the sampling "
              "grid: trust detail only at the scale of one feature cell)",
    "dropout": "spread over Monte-Carlo dropout samples (the model's own uncertainty)",
    "windows": "disagreement between overlapping windows (dependence on the surrounding "
               "context)",
}


# --------------------------------------------------------------------------------------------
# The accumulator: weighted mean and variance per voxel, also for volume.py's windows loop


class WeightedMoments:
    """Per-voxel weighted mean and variance of maps that arrive one at a time.

    Keeps ``W = Σ w``, ``S = Σ w·m``, ``Q = Σ w·m²`` and, when the maps come with their own
    variance (an uncertainty run per window), ``V = Σ w·v``. Then

        mean = S / W,    variance = V / W + Q / W − mean²

    (the law of total variance: the weighted mean of the within-map variances plus the
    weighted variance between the maps). With the Gaussian blending weights of
    :mod:`napari_gradcam.core.volume` the mean is exactly the blended map it writes today
    (``accumulated / weight_sum``), so the windows loop can keep these buffers instead of its
    two and get the window disagreement for the price of one more. Voxels with ``W = 0`` read
    as 0. ``dtype`` float64 (default) keeps ``Q/W − mean²`` accurate; float32 halves the
    memory for very wide slabs at a relative error of about 1e-7·mean²/variance.
    ``variance=False`` keeps only ``W`` and ``S`` (exactly the blending loop's two buffers),
    for runs that want the blended map alone.
    """

    def __init__(self, shape: Sequence[int], dtype: np.dtype | type = np.float64, *,
                 variance: bool = True) -> None:
        self.weight = np.zeros(tuple(shape), dtype=dtype)
        self.total = np.zeros_like(self.weight)
        self.total_sq: np.ndarray | None = np.zeros_like(self.weight) if variance else None
        self.within: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return self.weight.shape

    def add(self, values: np.ndarray, weights: np.ndarray | float = 1.0,
            index: tuple[slice, ...] | slice = ..., within_variance: np.ndarray | None = None
            ) -> None:
        """Add one map (``values``) with per-voxel ``weights`` at ``index`` of the buffers."""
        values = np.asarray(values, dtype=self.weight.dtype)
        weights = np.broadcast_to(np.asarray(weights, dtype=self.weight.dtype), values.shape)
        self.weight[index] += weights
        self.total[index] += weights * values
        if self.total_sq is None:
            return
        self.total_sq[index] += weights * np.square(values)
        if within_variance is not None:
            if self.within is None:
                self.within = np.zeros_like(self.weight)
            self.within[index] += weights * np.asarray(within_variance, self.weight.dtype)

    def mean(self, index: tuple[slice, ...] | slice = ...) -> np.ndarray:
        weight = self.weight[index]
        return np.divide(self.total[index], weight, out=np.zeros_like(weight), where=weight > 0)

    def variance(self, index: tuple[slice, ...] | slice = ...) -> np.ndarray:
        if self.total_sq is None:
            raise ValueError("this accumulator was made with variance=False; it keeps the "
                             "weighted mean only")
        weight = self.weight[index]
        mean = self.mean(index)
        second = np.divide(self.total_sq[index], weight, out=np.zeros_like(weight),
                           where=weight > 0)
        variance = np.maximum(second - np.square(mean), 0.0)  # rounding can dip below zero
        if self.within is not None:
            variance += np.divide(self.within[index], weight, out=np.zeros_like(weight),
                                  where=weight > 0)
        return variance

    def std(self, index: tuple[slice, ...] | slice = ...) -> np.ndarray:
        return np.sqrt(self.variance(index))

    def drop_leading(self, planes: int) -> None:
        """Move the buffers ``planes`` along axis 0 and zero the freed end, in place (the
        flush of volume.py's windows loop, which keeps only a window's depth of planes)."""
        if planes <= 0:
            return
        buffers = [self.weight, self.total, self.total_sq, self.within]
        for buffer in (b for b in buffers if b is not None):
            if planes >= len(buffer):
                buffer[...] = 0
                continue
            buffer[:-planes] = buffer[planes:].copy()
            buffer[-planes:] = 0


# --------------------------------------------------------------------------------------------
# Monte-Carlo dropout


def dropout_modules(model: nn.Module) -> list[nn.Module]:
    """The model's dropout layers (the standard ``nn.Dropout*`` family)."""
    return [module for module in model.modules() if isinstance(module, DROPOUT_TYPES)]


@contextlib.contextmanager
def mc_dropout(model: nn.Module) -> Iterator[list[nn.Module]]:
    """Dropout layers on (train mode) for every forward pass inside; everything else in eval.

    The explainers put the whole model in eval mode when they run it, so switching dropout on
    beforehand would be undone. Instead a forward pre-hook on the model turns exactly the
    dropout layers to train mode at the start of each forward pass, after the explainer's
    ``eval()``. On exit (also after an error) the hook is removed and every module's
    train/eval flag is put back as it was.
    """
    layers = dropout_modules(model)
    modes = {module: module.training for module in model.modules()}

    def switch_on(module: nn.Module, inputs: tuple) -> None:
        for layer in layers:
            layer.training = True

    handle = model.register_forward_pre_hook(switch_on)
    try:
        yield layers
    finally:
        handle.remove()
        for module, was_training in modes.items():
            module.training = was_training


# --------------------------------------------------------------------------------------------
# Transforms of the input, the target and the maps


def _shift_index(size: int, offset: int) -> torch.Tensor:
    """Gather index that moves content by ``offset`` (repeating the edge value)."""
    return torch.clamp(torch.arange(size) - offset, 0, size - 1)


def _shift_input(x: torch.Tensor, axis: int, offset: int) -> torch.Tensor:
    """``x`` moved by ``offset`` along spatial ``axis`` (edge values repeated)."""
    dim = 2 + axis
    return x.index_select(dim, _shift_index(x.shape[dim], offset).to(x.device))


def _shift_back(maps: np.ndarray, axis: int, offset: int, spatial_dims: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """The map moved back by ``offset`` and the mask of voxels it really covers."""
    dim = maps.ndim - spatial_dims + axis
    size = maps.shape[dim]
    source = np.arange(size) + offset
    valid = (source >= 0) & (source < size)
    back = np.take(maps, np.clip(source, 0, size - 1), axis=dim)
    shape = [1] * maps.ndim
    shape[dim] = size
    return back, np.broadcast_to(valid.reshape(shape), maps.shape).astype(np.float64)


def _transform_mask(mask: object, spatial_dims: int, kind: str, axis: int, offset: int = 0
                    ) -> np.ndarray:
    array = np.asarray(mask)
    dim = array.ndim - spatial_dims + axis
    if kind == "flip":
        return np.flip(array, axis=dim).copy()
    size = array.shape[dim]
    source = np.arange(size) - offset
    valid = (source >= 0) & (source < size)
    moved = np.take(array, np.clip(source, 0, size - 1), axis=dim)
    shape = [1] * array.ndim
    shape[dim] = size
    return np.where(valid.reshape(shape), moved, np.zeros_like(moved))


def _transform_target(target: Target, spatial_dims: int, kind: str, axis: int,
                      offset: int = 0) -> Target:
    """The target for a mirrored or shifted input: a region mask moves with the image."""
    if isinstance(target, SegmentationRegion) and target.mask is not None:
        mask = _transform_mask(target.mask, spatial_dims, kind, axis, offset)
        return dataclasses.replace(target, mask=mask)
    return target


def _fixed_target(target: Target, plain: CAMResult) -> Target:
    """The predicted class becomes the class predicted for the unchanged input."""
    if isinstance(target, PredictedClass) and plain.target_indices is not None:
        return ClassTarget(tuple(int(i) for i in plain.target_indices))
    return target


# --------------------------------------------------------------------------------------------
# The public function


@dataclass
class SourceUncertainty:
    """One source of variation: its std map (None when not applicable) and what it means."""

    name: str
    applicable: bool
    reason: str = ""
    n_variants: int = 0
    std_map: np.ndarray | None = None
    relative: float | None = None
    meaning: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"applicable": self.applicable, "reason": self.reason,
                "n_variants": self.n_variants, "relative": self.relative,
                "meaning": self.meaning}


@dataclass
class UncertaintyInfo:
    """What :func:`explain_with_uncertainty` did, per source, and the plain explanation."""

    plain: CAMResult
    sources: dict[str, SourceUncertainty] = field(default_factory=dict)
    n_variants: int = 1
    prediction_changes: int = 0

    def to_dict(self) -> dict[str, Any]:
        """Numbers and words only (no arrays), for layer metadata and provenance."""
        return {"sources": {name: s.to_dict() for name, s in self.sources.items()},
                "n_variants": self.n_variants, "prediction_changes": self.prediction_changes,
                "target": self.plain.target}

    def summary(self) -> str:
        parts = []
        for name, source in self.sources.items():
            if source.applicable:
                parts.append(f"{name}: std {source.relative:.0%} of the map's maximum "
                             f"({source.n_variants} variants)")
            else:
                parts.append(f"{name}: not applicable ({source.reason})")
        return "; ".join(parts)


def _relative(std_map: np.ndarray, mean_map: np.ndarray) -> float:
    peak = float(np.abs(mean_map).max())
    return float(std_map.mean() / peak) if peak > 0 else 0.0


def _predicted(result: CAMResult) -> np.ndarray | None:
    outputs = np.asarray(result.outputs)
    return outputs.argmax(1) if outputs.ndim == 2 else None


def explain_with_uncertainty(
    explainer: object,
    x: torch.Tensor | np.ndarray,
    target: TargetSpec = None,
    *,
    sources: Sequence[str] = DEFAULT_SOURCES,
    n_dropout: int = 8,
    shifts: Sequence[int] = DEFAULT_SHIFTS,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, UncertaintyInfo]:
    """Explain ``x`` under flips, shifts and MC dropout; return ``(mean_map, std_map, info)``.

    ``explainer`` is any explainer of this package (``explain(x, target)`` returning a
    :class:`~napari_gradcam.core.methods.CAMResult`, with ``.model`` for dropout). ``x`` is a
    batch ``(N, C, *spatial)`` as the explainer takes it. Maps are the one-map-per-sample form
    (:func:`~napari_gradcam.core.methods.heatmaps`), ``(N, *spatial)`` or ``(N, K, *spatial)``
    for ``target="all"``. ``mean_map`` and ``std_map`` pool the plain map and every variant
    (shift variants only where they cover a voxel); ``info.sources[name].std_map`` is each
    source's own spread (with the plain map). Cost: one explanation, plus one per spatial
    axis (flips), ``len(shifts)`` per axis (shifts) and ``n_dropout`` (dropout). The dropout
    masks come from a private random stream seeded by ``seed``; the caller's torch random
    state is left untouched.
    """
    unknown = [s for s in sources if s not in SOURCES]
    if unknown:
        raise ValueError(f"unknown uncertainty source(s) {unknown}; choose from "
                         f"{', '.join(SOURCES)}")
    if not isinstance(n_dropout, int) or n_dropout < 2:
        raise ValueError(f"n_dropout must be an integer >= 2, got {n_dropout!r}")
    tensor = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))
    if tensor.ndim not in (3, 4, 5):
        raise ValueError(f"expected a batch (N, C, *spatial), got shape {tuple(tensor.shape)}")
    spatial_dims = tensor.ndim - 2
    method = getattr(explainer, "name", "")
    resolved = resolve_target(target)
    plain = explainer.explain(tensor, resolved)
    plain_map = heatmaps(plain.maps, method)
    fixed = _fixed_target(resolved, plain)
    reference = _predicted(plain)
    at_input_size = tuple(plain_map.shape[-spatial_dims:]) == tuple(tensor.shape[2:])

    pooled = WeightedMoments(plain_map.shape)
    pooled.add(plain_map)
    info = UncertaintyInfo(plain=plain)

    def run(variant: torch.Tensor, variant_target: Target) -> np.ndarray:
        result = explainer.explain(variant, variant_target)
        predicted = _predicted(result)
        if reference is not None and predicted is not None:
            info.prediction_changes += int((predicted != reference).sum())
        return heatmaps(result.maps, method)

    for name in sources:
        own = WeightedMoments(plain_map.shape)
        own.add(plain_map)
        count = 0
        if name == "flips":
            for axis in range(spatial_dims):
                flipped = torch.flip(tensor, dims=[2 + axis])
                maps = run(flipped, _transform_target(fixed, spatial_dims, "flip", axis))
                back = np.flip(maps, axis=maps.ndim - spatial_dims + axis)
                for moments in (own, pooled):
                    moments.add(back)
                count += 1
        elif name == "shifts":
            if not at_input_size:
                info.sources[name] = SourceUncertainty(
                    name, False, "the maps are not at the input's resolution (upsample=False); "
                    "a pixel shift of the input is a fraction of a map cell",
                    meaning=MEANINGS[name])
                continue
            for axis in range(spatial_dims):
                for offset in shifts:
                    if offset == 0:
                        continue
                    moved = _shift_input(tensor, axis, int(offset))
                    maps = run(moved, _transform_target(fixed, spatial_dims, "shift", axis,
                                                        int(offset)))
                    back, valid = _shift_back(maps, axis, int(offset), spatial_dims)
                    for moments in (own, pooled):
                        moments.add(back, valid)
                    count += 1
        else:  # dropout
            model = getattr(explainer, "model", None)
            if not isinstance(model, nn.Module) or not dropout_modules(model):
                reason = ("the model has no dropout layers" if isinstance(model, nn.Module)
                          else "the explainer exposes no model")
                info.sources[name] = SourceUncertainty(name, False, reason,
                                                       meaning=MEANINGS[name])
                continue
            device = next((p.device for p in model.parameters()), torch.device("cpu"))
            devices = [device.index or 0] if device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices), mc_dropout(model):
                torch.manual_seed(seed)
                for _ in range(n_dropout):
                    maps = run(tensor, fixed)
                    for moments in (own, pooled):
                        moments.add(maps)
                    count += 1
        std_map = own.std().astype(np.float32)
        info.sources[name] = SourceUncertainty(
            name, True, n_variants=count, std_map=std_map,
            relative=_relative(std_map, own.mean()), meaning=MEANINGS[name])
        info.n_variants += count
    mean_map = pooled.mean().astype(np.float32)
    return mean_map, pooled.std().astype(np.float32), info


class UncertaintyExplainer:
    """An explainer whose maps are the mean over the variants, with the std map beside them.

    For the volume loops (:mod:`napari_gradcam.core.volume`), which call ``explain(batch,
    target)`` per batch of slices or windows: ``result.maps`` is the plain map (``maps=
    "plain"``, the default, so the main output is the same with or without uncertainty) or
    the mean over the variants (``maps="mean"``), and ``result.extras["uncertainty"]`` the std
    map (``extras["variance"]`` its square, for the windows accumulator). ``name`` is the
    wrapped method's, except for the input-gradient methods, whose maps are already reduced
    to one per sample here (``"<name>-heatmap"``), so that
    :func:`~napari_gradcam.core.methods.heatmaps` does not reduce them twice.
    """

    def __init__(self, explainer: object, *, sources: Sequence[str] = DEFAULT_SOURCES,
                 n_dropout: int = 8, shifts: Sequence[int] = DEFAULT_SHIFTS,
                 seed: int = 0, maps: str = "plain") -> None:
        if maps not in ("plain", "mean"):
            raise ValueError(f"maps must be 'plain' or 'mean', got {maps!r}")
        unknown = [s for s in sources if s not in SOURCES]
        if unknown:
            raise ValueError(f"unknown uncertainty source(s) {unknown}; choose from "
                             f"{', '.join(SOURCES)}")
        self.explainer = explainer
        self.maps = maps
        self.sources = tuple(sources)
        self.n_dropout = n_dropout
        self.shifts = tuple(shifts)
        self.seed = seed
        self.method = getattr(explainer, "name", "")
        self.name = f"{self.method}-heatmap" if self.method in INPUT_GRADIENT_METHODS \
            else self.method
        self.model = getattr(explainer, "model", None)
        self.device = getattr(explainer, "device", torch.device("cpu"))
        self.last_info: UncertaintyInfo | None = None

    def explain(self, x: torch.Tensor | np.ndarray, target: TargetSpec = None) -> CAMResult:
        mean_map, std_map, info = explain_with_uncertainty(
            self.explainer, x, target, sources=self.sources, n_dropout=self.n_dropout,
            shifts=self.shifts, seed=self.seed)
        self.last_info = info
        extras = {**info.plain.extras, "uncertainty": std_map,
                  "variance": np.square(std_map, dtype=np.float32)}
        shown = mean_map if self.maps == "mean" else heatmaps(info.plain.maps, self.method)
        return dataclasses.replace(info.plain, maps=shown, extras=extras)

    def __call__(self, x: torch.Tensor | np.ndarray, target: TargetSpec = None) -> np.ndarray:
        return self.explain(x, target).maps
