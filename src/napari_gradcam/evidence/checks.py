"""The evidence checks: one registry where each check declares its title, cost and runner.

Adding a check means adding one :class:`Check` to :data:`REGISTRY` (and its test): the job
(:mod:`napari_gradcam.evidence.running`) orders, costs and runs the checks from here, the
widget builds its check boxes from here, the command line its ``--checks`` choices. The checks'
mathematics lives in :mod:`napari_gradcam.core.evidence` and
:mod:`napari_gradcam.core.attribution`; a check here only chooses their settings.

Costs are forward-pass equivalents (a backward pass counts as one more): the units of the
job's progress and of :func:`napari_gradcam.evidence.running.estimate_evidence`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from napari_gradcam.core.attribution import (
    integrated_gradients,
    occlusion,
    saliency,
    score_cam,
    smoothgrad,
)
from napari_gradcam.core.evidence import deletion_insertion, randomisation_check, region_test
from napari_gradcam.core.volume import window_starts

RegionKind = Literal["evidence", "forbidden"]
ProgressCallback = Callable[[int, int], None]
StopCallback = Callable[[], bool]


class EvidenceError(ValueError):
    """An evidence run cannot start or failed; the message says what to change.

    A ValueError (not a RuntimeError) on purpose: Qt thread workers take RuntimeErrors for a
    deleted worker and swallow them.
    """


@dataclass(frozen=True)
class EvidenceSettings:
    """Every knob of an evidence run, stored in the provenance so a run can be repeated.

    * ``steps``, ``n_random``: points of the deletion/insertion curves and number of random
      orders averaged into the baseline; ``deletion_removal`` / ``insertion_removal``: what a
      removed pixel becomes (``"mean"``, ``"blur"`` or a number; the core's defaults, mean for
      deletion and blur for insertion, as Petsiuk et al.);
    * ``randomisation_depth``: randomise whole blocks named by the first ``depth`` parts of the
      dotted layer names (2: ``classifier``, ``features.3``...), ``None``: layer by layer;
      ``randomisation_threshold``: a Spearman correlation at or above it means "barely changed";
    * ``occlusion_patch``: patch side in pixels (``None``: an eighth of each side, at least 2,
      so about 8 patches per axis), stride = patch;
    * ``smoothgrad_samples``, ``smoothgrad_noise``, ``ig_steps``: the gradient methods;
    * ``agreement_top_k``, ``agreement_factor``: two maps agree when the IoU of their top
      ``agreement_top_k`` pixels is at least ``agreement_factor`` times the IoU of two unrelated
      maps (``k / (2 - k)``). The overlap of the top pixels asks whether two methods point at the
      same places, the user's question; a rank correlation over all pixels (reported too) is
      dominated by the order of the many unimportant background pixels, which is noise;
    * ``region_fill``: how the region test fills the region (``"inpaint"`` blends it into its
      surroundings without drawing a new edge); ``region_null_samples``: how many random
      regions of the same shape are filled the same way to tell a real drop from the drop any
      filling causes, and ``region_alpha``: the region passes when its drop is positive and its
      p-value against them is below it; ``forbidden_threshold``: the largest share of the map
      allowed inside a forbidden region;
    * ``seed``, ``batch_size``: reproducibility and memory.
    """

    steps: int = 50
    n_random: int = 3
    deletion_removal: str | float | None = None
    insertion_removal: str | float | None = None
    randomisation_depth: int | None = 2
    randomisation_threshold: float = 0.5
    occlusion_patch: int | tuple[int, ...] | None = None
    smoothgrad_samples: int = 25
    smoothgrad_noise: float = 0.15
    ig_steps: int = 32
    agreement_top_k: float = 0.1
    agreement_factor: float = 3.0
    region_fill: str | float = "inpaint"
    region_null_samples: int = 50
    region_alpha: float = 0.05
    forbidden_threshold: float = 0.2
    seed: int = 0
    batch_size: int = 16

    def __post_init__(self) -> None:
        for name in ("steps", "n_random", "smoothgrad_samples", "ig_steps", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not 0.0 < self.agreement_top_k <= 1.0:
            raise ValueError(f"agreement_top_k is a fraction in (0, 1], got "
                             f"{self.agreement_top_k!r}")
        if not 0.0 < self.region_alpha < 1.0:
            raise ValueError(f"region_alpha is a p-value threshold in (0, 1), got "
                             f"{self.region_alpha!r}")
        null = self.region_null_samples
        if isinstance(null, bool) or not isinstance(null, (int, np.integer)) or null < 0:
            raise ValueError(f"region_null_samples must be a non-negative integer, got {null!r}")
        smallest_p = 1.0 / (int(null) + 1)  # the p-value of a region beating every random one
        if null and smallest_p > self.region_alpha:  # allowed (quick looks), but said
            needed = math.ceil(1.0 / self.region_alpha) - 1
            warnings.warn(
                f"with region_null_samples={null} the region test can never pass at "
                f"region_alpha={self.region_alpha} (its smallest p-value is {smallest_p:.3g}): "
                f"use at least {needed} random regions, or a larger alpha",
                RuntimeWarning, stacklevel=3)
        if not 0.0 <= self.forbidden_threshold <= 1.0:
            raise ValueError(f"forbidden_threshold is a share in [0, 1], got "
                             f"{self.forbidden_threshold!r}")

    def to_dict(self) -> dict[str, Any]:
        return {key: (list(value) if isinstance(value, tuple) else value)
                for key, value in asdict(self).items()}



@dataclass
class CheckContext:
    """What a check sees: the model and its one-sample input, the fixed target, the settings,
    the region mask (or None), the map under test and how to explain with another model (the
    randomisation cascade re-explains randomised copies)."""

    model: nn.Module
    inputs: torch.Tensor
    layer: str
    target: Any
    settings: EvidenceSettings
    mask: np.ndarray | None
    cam: np.ndarray | None
    explain: Callable[[nn.Module, torch.Tensor, Any], np.ndarray]

    @property
    def spatial(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.inputs.shape[2:])


Runner = Callable[[CheckContext, ProgressCallback, StopCallback], Any]


@dataclass(frozen=True)
class Check:
    """One evidence check as the job and the shells see it.

    ``cost(context)``: forward-pass equivalents (exact where the core's loop is known, an
    estimate otherwise: progress only); ``run(context, progress, should_stop)``: the result
    (the core function's, called with ``settings.batch_size``); ``default``: on unless the
    caller chooses; ``compares_maps``: the result is another method's map, compared with the
    CAM (:func:`~napari_gradcam.core.evidence.agreement`); ``needs_region``: runs only with a
    region mask.
    """

    name: str
    title: str
    cost: Callable[[CheckContext], int]
    run: Runner
    default: bool = True
    compares_maps: bool = False
    needs_region: bool = False
    notes: str = field(default="", compare=False)


def auto_patch(spatial: tuple[int, ...], patch: int | tuple[int, ...] | None) -> tuple[int, ...]:
    """The occlusion patch: ``None`` gives an eighth of each side (at least 2)."""
    if patch is None:
        return tuple(max(2, size // 8) for size in spatial)
    values = (patch,) * len(spatial) if isinstance(patch, (int, np.integer)) else tuple(patch)
    if len(values) != len(spatial):
        raise EvidenceError(f"occlusion_patch needs one size per spatial axis ({len(spatial)}), "
                            f"got {patch!r}")
    return tuple(min(int(v), s) for v, s in zip(values, spatial, strict=True))


def _window_count(spatial: tuple[int, ...], patch: tuple[int, ...]) -> int:
    """How many occlusion patches the core will try (the same grid, for progress)."""
    return math.prod(len(window_starts(size, side, step=side))
                     for size, side in zip(spatial, patch, strict=True))


def _randomisation_blocks(model: nn.Module, depth: int | None) -> int:
    """About how many steps the cascade takes (progress only; the core decides exactly)."""
    owners = [name for name, module in model.named_modules()
              if any(True for _ in module.parameters(recurse=False))]
    if depth is None:
        return max(1, len(owners))
    return max(1, len({".".join(name.split(".")[:depth]) for name in owners}))


def layer_channels(model: nn.Module, layer: str, inputs: torch.Tensor) -> int:
    """Feature channels of ``layer`` (summed over its layers, when it names several) for
    ``inputs``: the number of masked inputs Score-CAM scores, one per channel.

    Read from one forward pass with a hook (no gradients, the model left as found), because a
    module's own attributes do not say it for every layer (a block, a token layer, a ReLU).
    """
    from napari_gradcam.core.engine import (
        model_dtype_device,
        preserved_model_state,
        resolve_layers,
    )
    from napari_gradcam.core.tokens import feature_map_view

    resolved = resolve_layers(model, layer)
    shapes: dict[str, tuple[int, ...]] = {}

    def recorder(name: str) -> Callable[[nn.Module, object, object], None]:
        def hook(module: nn.Module, args: object, output: object) -> None:
            if isinstance(output, torch.Tensor):
                shapes.setdefault(name, tuple(output.shape))

        return hook

    handles = [module.register_forward_hook(recorder(name)) for name, module in resolved]
    try:
        with preserved_model_state(model), torch.no_grad():
            dtype, device = model_dtype_device(model)
            model(inputs.to(device=device, dtype=dtype))
    finally:
        for handle in handles:
            handle.remove()
    channels = 0
    for name, module in resolved:
        if name not in shapes:
            raise EvidenceError(f"layer {name!r} made no feature map in the forward pass; "
                                "choose a layer that outputs (N, C, *spatial)")
        shape = shapes[name]
        view = feature_map_view(name, shape, tuple(inputs.shape), model, None, module)
        channels += int(shape[1] if view is None or view.kind == "channels_first"
                        else shape[-1])
    return channels


def _score_cam_cost(context: CheckContext) -> int:
    """One forward pass that records the layer, then one per channel (the check runs the
    softmax weighting, which needs no baseline pass)."""
    return 1 + layer_channels(context.model, context.layer, context.inputs)


def _curve_cost(context: CheckContext) -> int:
    return (1 + context.settings.n_random) * (context.settings.steps + 1)


def _curve(mode: str) -> Runner:
    def run(context: CheckContext, progress: ProgressCallback, should_stop: StopCallback) -> Any:
        settings = context.settings
        removal = settings.deletion_removal if mode == "deletion" else settings.insertion_removal
        return deletion_insertion(
            context.model, context.inputs, context.cam, context.target, steps=settings.steps,
            mode=mode, removal=removal, n_random=settings.n_random, seed=settings.seed,
            batch_size=settings.batch_size, progress=progress, should_stop=should_stop)

    return run


def _randomisation(context: CheckContext, progress: ProgressCallback,
                   should_stop: StopCallback) -> Any:
    settings = context.settings
    return randomisation_check(
        context.model, context.inputs, lambda m, x: context.explain(m, x, context.target),
        depth=settings.randomisation_depth, threshold=settings.randomisation_threshold,
        seed=settings.seed, keep_maps=True, progress=progress, should_stop=should_stop)


def _attribution(name: str) -> Runner:
    def run(context: CheckContext, progress: ProgressCallback, should_stop: StopCallback) -> Any:
        settings = context.settings
        common = {"batch_size": settings.batch_size, "progress": progress,
                  "should_stop": should_stop}
        model, inputs, target = context.model, context.inputs, context.target
        if name == "occlusion":
            return occlusion(model, inputs, target,
                             patch=auto_patch(context.spatial, settings.occlusion_patch),
                             **common)
        if name == "saliency":
            return saliency(model, inputs, target, **common)
        if name == "smoothgrad":
            return smoothgrad(model, inputs, target, n_samples=settings.smoothgrad_samples,
                              noise_level=settings.smoothgrad_noise, seed=settings.seed,
                              **common)
        if name == "integrated_gradients":
            return integrated_gradients(model, inputs, target, steps=settings.ig_steps,
                                        **common)
        return score_cam(model, context.layer, inputs, target, **common)

    return run


def _region(context: CheckContext, progress: ProgressCallback, should_stop: StopCallback) -> Any:
    assert context.mask is not None
    settings = context.settings
    result = region_test(context.model, context.inputs, context.mask, context.target,
                         fill=settings.region_fill, n_null=settings.region_null_samples,
                         seed=settings.seed, batch_size=settings.batch_size,
                         progress=progress, should_stop=should_stop)
    progress(1, 1)
    return result


def _check_list() -> list[Check]:
    return [
        Check("deletion", "Deletion", _curve_cost, _curve("deletion")),
        Check("insertion", "Insertion", _curve_cost, _curve("insertion")),
        Check("randomisation", "Model randomisation",
              lambda c: 2 * (1 + _randomisation_blocks(c.model, c.settings.randomisation_depth)),
              _randomisation),
        Check("occlusion", "Occlusion",
              lambda c: 1 + _window_count(c.spatial, auto_patch(c.spatial,
                                                                c.settings.occlusion_patch)),
              _attribution("occlusion"), compares_maps=True),
        Check("saliency", "Saliency", lambda c: 2, _attribution("saliency"), compares_maps=True),
        Check("smoothgrad", "SmoothGrad", lambda c: 2 * c.settings.smoothgrad_samples,
              _attribution("smoothgrad"), compares_maps=True),
        Check("integrated_gradients", "Integrated Gradients",
              lambda c: 2 * (c.settings.ig_steps + 1), _attribution("integrated_gradients"),
              compares_maps=True),
        Check("score_cam", "Score-CAM", _score_cam_cost, _attribution("score_cam"), default=False,
              compares_maps=True,
              notes="off by default: one forward pass per feature channel"),
        Check("region", "Region", lambda c: 2 + c.settings.region_null_samples, _region,
              default=False, needs_region=True),
    ]


REGISTRY: Mapping[str, Check] = {check.name: check for check in _check_list()}
"""Every check, in the order the job runs them."""

CHECKS: tuple[str, ...] = tuple(REGISTRY)
"""Every check the job knows; ``region`` needs a region mask."""

ATTRIBUTION_CHECKS: tuple[str, ...] = tuple(n for n, c in REGISTRY.items() if c.compares_maps)
"""Checks that compute another method's map, compared with the CAM by ``agreement``."""

DEFAULT_CHECKS: tuple[str, ...] = tuple(n for n, c in REGISTRY.items() if c.default)
"""What runs when the caller does not choose (Score-CAM is left out: it costs one forward pass
per feature channel)."""

CHECK_TITLES: dict[str, str] = {name: check.title for name, check in REGISTRY.items()}
"""How each check is named in tables and figures."""


def checked_checks(checks: Iterable[str] | str, region_mask: object) -> tuple[str, ...]:
    """The chosen checks in run order; ``region`` added when a mask is given, refused without."""
    chosen = [checks] if isinstance(checks, str) else list(checks)
    unknown = [name for name in chosen if name not in REGISTRY]
    if unknown:
        raise EvidenceError(f"unknown check(s) {unknown}; choose from {', '.join(CHECKS)}")
    if region_mask is not None and "region" not in chosen:
        chosen.append("region")
    if "region" in chosen and region_mask is None:
        raise EvidenceError("the region check needs a region mask (a Labels or Shapes layer "
                            "in napari, region_mask= in Python)")
    return tuple(name for name in CHECKS if name in chosen)
