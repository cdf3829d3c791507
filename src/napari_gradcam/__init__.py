"""napari-gradcam: where does your materials-science CNN look?

The public Python API is Qt-free (importing it never imports napari or Qt)::

    from napari_gradcam import GradCAM, explain_volume
    maps = GradCAM(model, layer="features.3")(x, target=None)   # (N, *spatial) float32

The napari dock widget lives in ``napari_gradcam._widget`` and is only imported by napari
through the manifest (``napari.yaml``).
"""

from napari_gradcam.core.attribution import (
    completeness_residual,
    integrated_gradients,
    occlusion,
    saliency,
    score_cam,
    smoothgrad,
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
    METHODS,
    CAMResult,
    GradCAM,
    GradCAMPlusPlus,
    GuidedBackprop,
    GuidedGradCAM,
    HiResCAM,
    LayerCAM,
    XGradCAM,
    make_explainer,
)
from napari_gradcam.core.model_card import ModelCard, ModelCardError
from napari_gradcam.core.models import LoadedModel, ModelLoadError, list_demo_models, load_model
from napari_gradcam.core.preprocess import Preprocessor
from napari_gradcam.core.targets import (
    AllClasses,
    CallableTarget,
    ClassTarget,
    PredictedClass,
    SegmentationRegion,
)
from napari_gradcam.core.volume import Cancelled, VolumeResult, explain_volume, volume_job

__version__ = "0.1.0"

__all__ = [
    "CAM",
    "METHODS",
    "AllClasses",
    "CAMResult",
    "CallableTarget",
    "Cancelled",
    "ClassTarget",
    "GradCAM",
    "GradCAMPlusPlus",
    "GuidedBackprop",
    "GuidedGradCAM",
    "HiResCAM",
    "LayerCAM",
    "LayerInfo",
    "LoadedModel",
    "ModelCard",
    "ModelCardError",
    "ModelLoadError",
    "PredictedClass",
    "Preprocessor",
    "SegmentationRegion",
    "VolumeResult",
    "XGradCAM",
    "__version__",
    "agreement",
    "check_forbidden_region",
    "completeness_residual",
    "default_target_layer",
    "deletion_insertion",
    "discover_feature_layers",
    "energy_in_region",
    "explain_volume",
    "integrated_gradients",
    "list_demo_models",
    "load_model",
    "make_explainer",
    "occlusion",
    "randomisation_check",
    "region_test",
    "saliency",
    "score_cam",
    "smoothgrad",
    "volume_job",
]
