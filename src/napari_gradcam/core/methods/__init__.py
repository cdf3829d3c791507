"""The CAM methods: how each one weighs the target layer's channels.

One entry point for all of them, by name (:func:`explainer`, :func:`make_explainer`), or by
class (``GradCAM(model, layer)``). Each method declares what it needs as class attributes
(:class:`~napari_gradcam.core.methods.base.MethodTraits`), readable without building it through
:func:`method_info`. The families, one module each:

- :mod:`.gradient`: Grad-CAM, Grad-CAM++, HiResCAM, XGrad-CAM, LayerCAM, Grad-CAM element-wise,
  Finer-CAM, ShapleyCAM (one forward and one backward pass to the layer);
- :mod:`.linear_head`: CAM (the classifier's weights);
- :mod:`.eigen`: EigenCAM, EigenGradCAM, KPCA-CAM (first (kernel) principal component);
- :mod:`.perturbation`: Score-CAM, Ablation-CAM (gradient-free, one forward pass per channel);
- :mod:`.guided`: Guided Backpropagation, Guided Grad-CAM (input gradients, (N, C, *spatial)).

With several layers (multi-layer fusion) each layer's map is upsampled to the common size,
divided by its per-sample maximum (layers differ in scale) and the maps are averaged
(``fusion="mean"``), or combined by ``"max"`` or ``"product"``.
"""

from napari_gradcam.core.methods.base import (
    BaseCAM,
    CAMResult,
    MethodTraits,
    normalize_maps,
    upsample,
)
from napari_gradcam.core.methods.eigen import KPCACAM, EigenCAM, EigenGradCAM
from napari_gradcam.core.methods.gradient import (
    FinerCAM,
    FinerTarget,
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
from napari_gradcam.core.methods.registry import (
    ALIASES,
    INPUT_GRADIENT_METHODS,
    METHODS,
    MethodInfo,
    canonical_name,
    explainer,
    heatmaps,
    make_explainer,
    method_info,
)

__all__ = [
    "ALIASES",
    "CAM",
    "INPUT_GRADIENT_METHODS",
    "KPCACAM",
    "METHODS",
    "AblationCAM",
    "BaseCAM",
    "CAMResult",
    "EigenCAM",
    "EigenGradCAM",
    "FinerCAM",
    "FinerTarget",
    "GradCAM",
    "GradCAMElementWise",
    "GradCAMPlusPlus",
    "GuidedBackprop",
    "GuidedGradCAM",
    "HiResCAM",
    "LayerCAM",
    "MethodInfo",
    "MethodTraits",
    "ScoreCAM",
    "ShapleyCAM",
    "XGradCAM",
    "canonical_name",
    "explainer",
    "heatmaps",
    "make_explainer",
    "method_info",
    "normalize_maps",
    "upsample",
]
