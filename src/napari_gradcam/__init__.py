"""napari-gradcam: where does your materials-science CNN look?

The public Python API is Qt-free (importing it never imports napari or Qt)::

    from napari_gradcam import GradCAM, explain_volume
    maps = GradCAM(model, layer="features.3")(x, target=None)   # (N, *spatial) float32

The napari dock widget lives in ``napari_gradcam._widget`` and is only imported by napari
through the manifest (``napari.yaml``).
"""

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
    "PredictedClass",
    "SegmentationRegion",
    "VolumeResult",
    "XGradCAM",
    "__version__",
    "explain_volume",
    "make_explainer",
    "volume_job",
]
