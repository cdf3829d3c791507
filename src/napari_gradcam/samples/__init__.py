"""Synthetic materials samples with ground truth, and the recipes of the demo models.

Micrographs (2D), X-ray CT volumes (3D) and XRD pattern stacks (1D rows) are drawn by seeded
generators (for micrographs and CT also a domain-randomised training family and an independent
held-out family), so every sample comes with exact defect masks against which a Grad-CAM can be
scored (:mod:`napari_gradcam.samples.metrics`). Importing this package does not import torch;
:mod:`napari_gradcam.samples.demo_models` (training and evaluation) does.
"""

from napari_gradcam.samples.ct_heldout import HELDOUT_SEED_BASE, make_heldout_ct_volume
from napari_gradcam.samples.ct_randomised import (
    CT_RANDOMISED_WINDOW,
    make_randomised_ct_patches,
    make_randomised_ct_slice_patches,
)
from napari_gradcam.samples.ct_volume import (
    CT_CLASSES,
    CT_LABELS,
    CT_VOXEL_SIZE_UM,
    CT_WINDOW,
    CTVolume,
    make_ct_patches,
    make_ct_slice_patches,
    make_ct_volume,
)
from napari_gradcam.samples.metrics import (
    energy_share,
    iou_per_class,
    pointing_game,
    pointing_hits,
)
from napari_gradcam.samples.micrograph_heldout import (
    MICROGRAPH_HELDOUT_SEED_BASE,
    make_heldout_micrograph,
    make_heldout_micrograph_set,
)
from napari_gradcam.samples.micrographs import (
    MICROGRAPH_CLASSES,
    MICROGRAPH_LABELS,
    MICROGRAPH_TRAINING_SIZES,
    Micrograph,
    PatchSet,
    make_micrograph,
    make_micrograph_patches,
    make_randomised_micrograph,
    make_randomised_micrograph_patches,
)
from napari_gradcam.samples.spectra import (
    PHASES,
    SPECTRA_CLASSES,
    SpectraStack,
    make_pattern,
    make_spectra_dataset,
    make_spectra_stack,
    two_theta_axis,
)

__all__ = [
    "CT_CLASSES",
    "CT_LABELS",
    "CT_RANDOMISED_WINDOW",
    "CT_VOXEL_SIZE_UM",
    "CT_WINDOW",
    "HELDOUT_SEED_BASE",
    "MICROGRAPH_CLASSES",
    "MICROGRAPH_HELDOUT_SEED_BASE",
    "MICROGRAPH_LABELS",
    "MICROGRAPH_TRAINING_SIZES",
    "PHASES",
    "SPECTRA_CLASSES",
    "CTVolume",
    "Micrograph",
    "PatchSet",
    "SpectraStack",
    "energy_share",
    "iou_per_class",
    "make_ct_patches",
    "make_ct_slice_patches",
    "make_ct_volume",
    "make_heldout_ct_volume",
    "make_heldout_micrograph",
    "make_heldout_micrograph_set",
    "make_micrograph",
    "make_micrograph_patches",
    "make_pattern",
    "make_randomised_ct_patches",
    "make_randomised_ct_slice_patches",
    "make_randomised_micrograph",
    "make_randomised_micrograph_patches",
    "make_spectra_dataset",
    "make_spectra_stack",
    "pointing_game",
    "pointing_hits",
    "two_theta_axis",
]
