"""The localisation and segmentation scores, as the samples package has always offered them.

The definitions live in :mod:`napari_gradcam.core.metrics` (one per score, documented there);
this module re-exports them so ``napari_gradcam.samples.pointing_hits`` and friends keep
working. One name differs in its default only: :func:`energy_share` here scores a map with no
positive mass as 0 instead of NaN, the convention the demo models' cards were scored with (a
slice where the model predicts no region has no target; it counts as a miss with energy 0).
New code should call :func:`napari_gradcam.core.metrics.energy_share` and say ``empty=0.0``
where it wants that convention.
"""

from __future__ import annotations

import numpy as np

from napari_gradcam.core import metrics as _metrics
from napari_gradcam.core.metrics import iou_per_class, pointing_game, pointing_hits

__all__ = ["energy_share", "iou_per_class", "pointing_game", "pointing_hits"]


def energy_share(maps: object, masks: object) -> np.ndarray:
    """:func:`napari_gradcam.core.metrics.energy_share` with ``empty=0.0`` (see above)."""
    return _metrics.energy_share(maps, masks, empty=0.0)
