"""napari sample data: synthetic materials samples with their ground truth.

Each function returns napari ``LayerData`` tuples ``(data, kwargs, layer_type)``: the image and
a Labels layer of the true defects, with physical scale where the sample has one, and metadata
that says what the sample is and which demo model fits it. Generated on the fly (seeded, well
under two seconds each), so nothing is downloaded and nothing large ships with the plugin.
No Qt and no napari import here: napari only receives the tuples.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from napari_gradcam.samples.ct_volume import CT_LABELS, CT_WINDOW, make_ct_volume
from napari_gradcam.samples.micrographs import MICROGRAPH_LABELS, make_micrograph
from napari_gradcam.samples.spectra import SPECTRA_CLASSES, make_spectra_stack

LayerData = tuple[np.ndarray, dict[str, Any], str]

_SOURCE = "napari-gradcam synthetic sample (napari_gradcam.samples)"


def micrograph_sample(seed: int = 0) -> list[LayerData]:
    """A 256x256 uint8 ferrite-pearlite micrograph with precipitates and a crack, plus labels."""
    sample = make_micrograph((256, 256), seed=seed, dtype="uint8")
    metadata = {
        "source": _SOURCE,
        "description": "Synthetic steel micrograph: ferrite grains, pearlite colonies, bright "
        "precipitates and one crack.",
        "suggested_model": "micrograph-classifier",
        "pixel_size": None,
        "generator": sample.info,
    }
    return [
        (sample.image, {"name": "steel micrograph", "metadata": metadata}, "image"),
        (
            sample.labels,
            {
                "name": "micrograph defects (ground truth)",
                "metadata": {"source": _SOURCE, "labels": MICROGRAPH_LABELS},
                "opacity": 0.5,
            },
            "labels",
        ),
    ]


def ct_volume_sample(seed: int = 0) -> list[LayerData]:
    """A 128^3 uint16 X-ray CT volume (voxel 1.0 x 0.65 x 0.65 um) with pores, a crack and
    ring/cupping artefacts, plus the label volume (1 pore, 2 crack) at the same scale."""
    sample = make_ct_volume((128, 128, 128), seed=seed)
    common = {"scale": sample.scale, "units": ("µm", "µm", "µm"), "axis_labels": ("z", "y", "x")}
    metadata = {
        "source": _SOURCE,
        "description": "Synthetic X-ray CT of a cylindrical specimen (rotation axis z) with gas "
        "pores and a fatigue crack, beam-hardening cupping and ring artefacts.",
        "suggested_model": "ct-patch-classifier (windows) or ct-slice-unet (slices)",
        "voxel_size_um": sample.scale,
        "generator": sample.info,
    }
    return [
        (
            sample.volume,
            {
                "name": "CT volume",
                "metadata": metadata,
                "contrast_limits": CT_WINDOW,
                **common,
            },
            "image",
        ),
        (
            sample.labels,
            {
                "name": "CT defects (ground truth)",
                "metadata": {"source": _SOURCE, "labels": CT_LABELS},
                "opacity": 0.5,
                **common,
            },
            "labels",
        ),
    ]


def spectra_sample(seed: int = 0) -> list[LayerData]:
    """A stack of 64 XRD patterns (rows) over 2-theta 20-100 deg as one image, plus a Labels
    layer marking the peaks of each row's dominant phase (value = phase index + 1)."""
    stack = make_spectra_stack(64, seed=seed)
    step = float(stack.two_theta[1] - stack.two_theta[0])
    geometry = {
        "scale": (1.0, step),
        "translate": (0.0, float(stack.two_theta[0])),
        "axis_labels": ("spectrum", "2θ"),
        "units": ("pixel", "degree"),
    }
    metadata = {
        "source": _SOURCE,
        "description": "Synthetic in-situ XRD series (Cu K-alpha): austenite -> ferrite -> "
        "magnetite; one pattern per row.",
        "suggested_model": "xrd-phase-classifier (row by row)",
        "two_theta_deg": stack.two_theta.tolist(),
        "dominant_phase": [SPECTRA_CLASSES[c] for c in stack.classes],
        "generator": stack.info,
    }
    peaks = (stack.masks * (stack.classes[:, None] + 1)).astype(np.uint8)
    return [
        (stack.image, {"name": "XRD spectra stack", "metadata": metadata, **geometry}, "image"),
        (
            peaks,
            {
                "name": "dominant-phase peaks (ground truth)",
                "metadata": {
                    "source": _SOURCE,
                    "labels": {0: "none", **{i + 1: p for i, p in enumerate(SPECTRA_CLASSES)}},
                },
                "opacity": 0.4,
                **geometry,
            },
            "labels",
        ),
    ]
