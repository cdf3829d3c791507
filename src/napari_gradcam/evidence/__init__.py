"""Is this heatmap evidence? Every check on one sample, and a report for a paper.

A Grad-CAM map of a crack convinces a reader only with numbers beside it: does deleting the
pixels it ranks first destroy the prediction faster than deleting random pixels (deletion
and insertion, Petsiuk et al. 2018)? Does the map change once the learned weights are
replaced by random ones (Adebayo et al. 2018)? Do other methods (occlusion, gradients,
Integrated Gradients) point at the same places? Does filling the crack lower the prediction,
and how much of the map lies inside it (or inside a scale bar that must not matter)?

The package, by job:

* :mod:`~napari_gradcam.evidence.checks`: the registry (:data:`REGISTRY`): each check's
  title, cost in forward passes and runner; the settings (:class:`EvidenceSettings`);
* :mod:`~napari_gradcam.evidence.running`: :func:`evidence_job`, the generator every shell
  drains (``(done, total, stage)`` per batch, cancel by closing it, out-of-memory back-off),
  :func:`run_evidence` and :func:`estimate_evidence`;
* :mod:`~napari_gradcam.evidence.report`: :class:`EvidenceReport`: the verdict table, the
  summary that travels with every map, the export folder;
* :mod:`~napari_gradcam.evidence.figures`: the matplotlib figures.

The checks' mathematics is in :mod:`napari_gradcam.core.evidence` and
:mod:`napari_gradcam.core.attribution`, the scores in :mod:`napari_gradcam.core.metrics`.
No Qt and no napari here; matplotlib only when figures are drawn.
"""

from __future__ import annotations

from napari_gradcam.core.volume import Cancelled
from napari_gradcam.evidence.checks import (
    ATTRIBUTION_CHECKS,
    CHECK_TITLES,
    CHECKS,
    DEFAULT_CHECKS,
    REGISTRY,
    Check,
    CheckContext,
    EvidenceError,
    EvidenceSettings,
    RegionKind,
    StopCallback,
)
from napari_gradcam.evidence.figures import plot_deletion_insertion, plot_maps, plot_randomisation
from napari_gradcam.evidence.report import (
    EvidenceReport,
    EvidenceRow,
    evidence_summary,
    format_value,
)
from napari_gradcam.evidence.running import (
    EvidenceEstimate,
    Job,
    estimate_evidence,
    evidence_job,
    run_evidence,
)

__all__ = [
    "ATTRIBUTION_CHECKS",
    "CHECKS",
    "CHECK_TITLES",
    "DEFAULT_CHECKS",
    "REGISTRY",
    "Cancelled",
    "Check",
    "CheckContext",
    "EvidenceError",
    "EvidenceEstimate",
    "EvidenceReport",
    "EvidenceRow",
    "EvidenceSettings",
    "Job",
    "RegionKind",
    "StopCallback",
    "estimate_evidence",
    "evidence_job",
    "evidence_summary",
    "format_value",
    "plot_deletion_insertion",
    "plot_maps",
    "plot_randomisation",
    "run_evidence",
]
