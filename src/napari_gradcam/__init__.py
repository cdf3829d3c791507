"""napari-gradcam: where does your materials-science CNN look?

The public Python API is Qt-free (importing it never imports napari or Qt)::

    from napari_gradcam import GradCAM, explain_volume
    maps = GradCAM(model, layer="features.3")(x, target=None)   # (N, *spatial) float32

The napari dock widget lives in ``napari_gradcam._widget`` and is only imported by napari
through the manifest (``napari.yaml``).

The names below are imported on first use (PEP 562), so that napari's reader hook, which
imports ``napari_gradcam._reader`` for every ``.zarr`` the user opens, does not pay for
importing torch and scipy just to look at a file's attributes.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    "completeness_residual": "napari_gradcam.core.attribution",
    "integrated_gradients": "napari_gradcam.core.attribution",
    "occlusion": "napari_gradcam.core.attribution",
    "saliency": "napari_gradcam.core.attribution",
    "score_cam": "napari_gradcam.core.attribution",
    "smoothgrad": "napari_gradcam.core.attribution",
    "DomainReport": "napari_gradcam.core.domain",
    "check_domain": "napari_gradcam.core.domain",
    "compare_to_training": "napari_gradcam.core.domain",
    "input_statistics": "napari_gradcam.core.domain",
    "agreement": "napari_gradcam.core.evidence",
    "check_forbidden_region": "napari_gradcam.core.evidence",
    "deletion_insertion": "napari_gradcam.core.evidence",
    "energy_in_region": "napari_gradcam.core.evidence",
    "randomisation_check": "napari_gradcam.core.evidence",
    "region_test": "napari_gradcam.core.evidence",
    "LayerInfo": "napari_gradcam.core.layer_discovery",
    "default_target_layer": "napari_gradcam.core.layer_discovery",
    "discover_feature_layers": "napari_gradcam.core.layer_discovery",
    "AblationCAM": "napari_gradcam.core.methods",
    "CAM": "napari_gradcam.core.methods",
    "CAMResult": "napari_gradcam.core.methods",
    "EigenCAM": "napari_gradcam.core.methods",
    "EigenGradCAM": "napari_gradcam.core.methods",
    "FinerCAM": "napari_gradcam.core.methods",
    "GradCAM": "napari_gradcam.core.methods",
    "GradCAMElementWise": "napari_gradcam.core.methods",
    "GradCAMPlusPlus": "napari_gradcam.core.methods",
    "GuidedBackprop": "napari_gradcam.core.methods",
    "GuidedGradCAM": "napari_gradcam.core.methods",
    "HiResCAM": "napari_gradcam.core.methods",
    "KPCACAM": "napari_gradcam.core.methods",
    "LayerCAM": "napari_gradcam.core.methods",
    "METHODS": "napari_gradcam.core.methods",
    "MethodInfo": "napari_gradcam.core.methods",
    "ScoreCAM": "napari_gradcam.core.methods",
    "ShapleyCAM": "napari_gradcam.core.methods",
    "XGradCAM": "napari_gradcam.core.methods",
    "explainer": "napari_gradcam.core.methods",
    "make_explainer": "napari_gradcam.core.methods",
    "method_info": "napari_gradcam.core.methods",
    "ModelCard": "napari_gradcam.core.model_card",
    "ModelCardError": "napari_gradcam.core.model_card",
    "LoadedModel": "napari_gradcam.core.models",
    "ModelLoadError": "napari_gradcam.core.models",
    "list_demo_models": "napari_gradcam.core.models",
    "load_model": "napari_gradcam.core.models",
    "Preprocessor": "napari_gradcam.core.preprocess",
    "AllClasses": "napari_gradcam.core.targets",
    "CallableTarget": "napari_gradcam.core.targets",
    "ClassTarget": "napari_gradcam.core.targets",
    "PredictedClass": "napari_gradcam.core.targets",
    "RegressionTarget": "napari_gradcam.core.targets",
    "SegmentationRegion": "napari_gradcam.core.targets",
    "UncertaintyExplainer": "napari_gradcam.core.uncertainty",
    "explain_with_uncertainty": "napari_gradcam.core.uncertainty",
    "Cancelled": "napari_gradcam.core.volume",
    "VolumeResult": "napari_gradcam.core.volume",
    "explain_volume": "napari_gradcam.core.volume",
    "volume_job": "napari_gradcam.core.volume",
}

__all__ = [
    "CAM",
    "KPCACAM",
    "METHODS",
    "AblationCAM",
    "AllClasses",
    "CAMResult",
    "CallableTarget",
    "Cancelled",
    "ClassTarget",
    "DomainReport",
    "EigenCAM",
    "EigenGradCAM",
    "FinerCAM",
    "GradCAM",
    "GradCAMElementWise",
    "GradCAMPlusPlus",
    "GuidedBackprop",
    "GuidedGradCAM",
    "HiResCAM",
    "LayerCAM",
    "LayerInfo",
    "LoadedModel",
    "MethodInfo",
    "ModelCard",
    "ModelCardError",
    "ModelLoadError",
    "PredictedClass",
    "Preprocessor",
    "RegressionTarget",
    "ScoreCAM",
    "SegmentationRegion",
    "ShapleyCAM",
    "UncertaintyExplainer",
    "VolumeResult",
    "XGradCAM",
    "__version__",
    "agreement",
    "check_domain",
    "check_forbidden_region",
    "compare_to_training",
    "completeness_residual",
    "default_target_layer",
    "deletion_insertion",
    "discover_feature_layers",
    "energy_in_region",
    "explain_volume",
    "explain_with_uncertainty",
    "explainer",
    "input_statistics",
    "integrated_gradients",
    "list_demo_models",
    "load_model",
    "make_explainer",
    "method_info",
    "occlusion",
    "randomisation_check",
    "region_test",
    "saliency",
    "score_cam",
    "smoothgrad",
    "volume_job",
]


def __getattr__(name: str) -> Any:
    try:
        module = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module 'napari_gradcam' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


if TYPE_CHECKING:  # static analysers and IDEs see the real names
    from napari_gradcam.core.attribution import (
        completeness_residual,
        integrated_gradients,
        occlusion,
        saliency,
        score_cam,
        smoothgrad,
    )
    from napari_gradcam.core.domain import (
        DomainReport,
        check_domain,
        compare_to_training,
        input_statistics,
    )
    from napari_gradcam.core.evidence import (
        agreement,
        check_forbidden_region,
        deletion_insertion,
        energy_in_region,
        randomisation_check,
        region_test,
    )
    from napari_gradcam.core.layer_discovery import (
        LayerInfo,
        default_target_layer,
        discover_feature_layers,
    )
    from napari_gradcam.core.methods import (
        CAM,
        KPCACAM,
        METHODS,
        AblationCAM,
        CAMResult,
        EigenCAM,
        EigenGradCAM,
        FinerCAM,
        GradCAM,
        GradCAMElementWise,
        GradCAMPlusPlus,
        GuidedBackprop,
        GuidedGradCAM,
        HiResCAM,
        LayerCAM,
        MethodInfo,
        ScoreCAM,
        ShapleyCAM,
        XGradCAM,
        explainer,
        make_explainer,
        method_info,
    )
    from napari_gradcam.core.model_card import ModelCard, ModelCardError
    from napari_gradcam.core.models import LoadedModel, ModelLoadError, list_demo_models, load_model
    from napari_gradcam.core.preprocess import Preprocessor
    from napari_gradcam.core.targets import (
        AllClasses,
        CallableTarget,
        ClassTarget,
        PredictedClass,
        RegressionTarget,
        SegmentationRegion,
    )
    from napari_gradcam.core.uncertainty import UncertaintyExplainer, explain_with_uncertainty
    from napari_gradcam.core.volume import Cancelled, VolumeResult, explain_volume, volume_job
