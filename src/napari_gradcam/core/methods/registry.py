"""Every method by name: the registry the GUI, the command line and model cards use.

``explainer("eigencam", model, layer, **options)`` builds any method the way pytorch-grad-cam
users expect to pick one; :func:`method_info` tells a shell what a method needs before it
builds one (gradients? a linear head? one class at a time? one map per input channel?).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
from torch import nn

from napari_gradcam.core.engine import LayerSpec
from napari_gradcam.core.methods.base import MethodTraits
from napari_gradcam.core.methods.eigen import KPCACAM, EigenCAM, EigenGradCAM
from napari_gradcam.core.methods.gradient import (
    FinerCAM,
    GradCAM,
    GradCAMElementWise,
    GradCAMPlusPlus,
    HiResCAM,
    LayerCAM,
    ShapleyCAM,
    XGradCAM,
)
from napari_gradcam.core.methods.guided import GuidedBackprop, GuidedGradCAM
from napari_gradcam.core.methods.linear_head import CAM
from napari_gradcam.core.methods.perturbation import AblationCAM, ScoreCAM

METHODS: dict[str, Callable[..., object]] = {
    "gradcam": GradCAM,
    "gradcam++": GradCAMPlusPlus,
    "hirescam": HiResCAM,
    "xgradcam": XGradCAM,
    "layercam": LayerCAM,
    "cam": CAM,
    "guided-backprop": GuidedBackprop,
    "guided-gradcam": GuidedGradCAM,
    "scorecam": ScoreCAM,
    "ablationcam": AblationCAM,
    "eigencam": EigenCAM,
    "eigengradcam": EigenGradCAM,
    "gradcam-elementwise": GradCAMElementWise,
    "finercam": FinerCAM,
    "shapleycam": ShapleyCAM,
    "kpcacam": KPCACAM,
}
"""Method names as the GUI, the command line and model cards spell them."""

ALIASES = {
    "gradcampp": "gradcam++",
    "gradcamplusplus": "gradcam++",
    "score-cam": "scorecam",
    "ablation-cam": "ablationcam",
    "eigen-cam": "eigencam",
    "eigen-gradcam": "eigengradcam",
    "gradcamelementwise": "gradcam-elementwise",
    "finer-cam": "finercam",
    "shapley-cam": "shapleycam",
    "kpca-cam": "kpcacam",
    "kpca_cam": "kpcacam",
    "guidedbackprop": "guided-backprop",
    "guidedgradcam": "guided-gradcam",
}
"""Other spellings users type (pytorch-grad-cam's class names in lower case, with hyphens)."""


@dataclass(frozen=True)
class MethodInfo:
    """What a method declares about itself (see :class:`~.base.MethodTraits`)."""

    name: str
    title: str
    reference: str
    needs_gradients: bool
    input_gradients: bool
    needs_layer: bool
    needs_linear_head: bool
    classifier_only: bool
    one_target_at_a_time: bool
    class_specific: bool
    cost: str

    @property
    def gradient_free(self) -> bool:
        """Runs forward passes only (CAM, Score-CAM, Ablation-CAM, EigenCAM)."""
        return not self.needs_gradients and not self.input_gradients

    @property
    def supports_segmentation(self) -> bool:
        """Accepts a segmentation model's region targets."""
        return not self.classifier_only


def canonical_name(method: str) -> str:
    """The registry's spelling of ``method`` (case, underscores and aliases forgiven)."""
    if not isinstance(method, str):
        raise TypeError(f"a method is named by a string, got {type(method).__name__}")
    key = method.strip().lower().replace("_", "-")
    key = ALIASES.get(key, key)
    if key not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    return key


def method_info(method: str) -> MethodInfo:
    """The declarations of a method, by name, without building it."""
    cls: type[MethodTraits] = METHODS[canonical_name(method)]  # type: ignore[assignment]
    return MethodInfo(
        name=cls.name, title=cls.title, reference=cls.reference,
        needs_gradients=cls.needs_gradients, input_gradients=cls.input_gradients,
        needs_layer=cls.needs_layer, needs_linear_head=cls.needs_linear_head,
        classifier_only=cls.classifier_only, one_target_at_a_time=cls.one_target_at_a_time,
        class_specific=cls.class_specific, cost=cls.cost,
    )


INPUT_GRADIENT_METHODS = frozenset(name for name in METHODS if method_info(name).input_gradients)
"""Methods whose maps are input gradients (N, C, *spatial) rather than one map per sample."""

ChannelMode = Literal["max", "per-channel", "sum"]


def heatmaps(maps: np.ndarray, method: str, channels: ChannelMode = "max") -> np.ndarray:
    """Maps for display and volumes, from what a method returned.

    Input-gradient methods give ``(N, C, *spatial)``, one map per input channel:

    * ``channels="max"`` (default): max |gradient| over channels, ``(N, *spatial)`` (as
      Simonyan et al. 2014 do for saliency) — a pixel matters if any of its channels does;
    * ``channels="per-channel"``: |gradient| per input channel, ``(N, C, *spatial)`` — which of
      a dual-energy CT pair or of stacked EDS element maps the model used where;
    * ``channels="sum"``: the signed sum over channels (a linear first-order estimate).

    Every CAM (one map per sample) is returned unchanged, whatever ``channels`` says.
    """
    if channels not in ("max", "per-channel", "sum"):
        raise ValueError(f"channels must be 'max', 'per-channel' or 'sum', got {channels!r}")
    maps = np.asarray(maps, dtype=np.float32)
    with contextlib.suppress(ValueError, TypeError):  # a spelling users type, e.g. Score_CAM
        method = canonical_name(method)
    if method not in INPUT_GRADIENT_METHODS:
        return maps
    if channels == "max":
        return np.abs(maps).max(axis=1)
    if channels == "per-channel":
        return np.abs(maps)
    return maps.sum(axis=1)


def explainer(method: str, model: nn.Module, layer: LayerSpec | None = None,
              **options: object) -> object:
    """Build any method by name: ``explainer("scorecam", model, "features.3", batch_size=64)``.

    ``options`` go to the method's class (``device``, ``amp``, ``upsample``, ``normalize``,
    ``fusion`` for CAMs, and each method's own, e.g. Score-CAM's ``weights``); an option the
    method does not take is an error that names it. Guided Backpropagation needs no layer.
    """
    name = canonical_name(method)
    factory = METHODS[name]
    info = method_info(name)
    if info.needs_layer and layer is None:
        raise ValueError(f"{info.title} explains a layer: pass layer='features.3' (a dotted "
                         "name), a module or a list of them")
    try:
        if not info.needs_layer:
            return factory(model, **options)
        return factory(model, layer, **options)
    except TypeError as error:
        if "unexpected keyword argument" in str(error):
            raise TypeError(f"{info.title} does not take one of the options "
                            f"{sorted(options)}: {error}") from None
        raise


def make_explainer(method: str, model: nn.Module, layer: LayerSpec, **options: object) -> object:
    """Build an explainer by name; the single place the shells turn a method name into code.

    Kept for the shells and older code; the same as :func:`explainer`.
    """
    return explainer(method, model, layer, **options)
