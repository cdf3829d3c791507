"""The evidence report's old address: everything now lives in :mod:`napari_gradcam.evidence`.

Kept so that ``from napari_gradcam.evidence_report import run_evidence`` (scripts, notebooks,
the README's examples) goes on working; new code imports from :mod:`napari_gradcam.evidence`.
"""

from __future__ import annotations

from collections.abc import Callable

from napari_gradcam.evidence import (
    ATTRIBUTION_CHECKS,
    CHECK_TITLES,
    CHECKS,
    DEFAULT_CHECKS,
    Cancelled,
    EvidenceError,
    EvidenceEstimate,
    EvidenceReport,
    EvidenceRow,
    EvidenceSettings,
    Job,
    RegionKind,
    StopCallback,
    estimate_evidence,
    evidence_job,
    evidence_summary,
    format_value,
    plot_deletion_insertion,
    plot_maps,
    plot_randomisation,
    run_evidence,
)

ProgressCallback = Callable[[int, int, str], None]
"""What :func:`run_evidence` calls with each ``(done, total, stage)`` the job yields."""

__all__ = [
    "ATTRIBUTION_CHECKS",
    "CHECKS",
    "CHECK_TITLES",
    "DEFAULT_CHECKS",
    "Cancelled",
    "EvidenceError",
    "EvidenceEstimate",
    "EvidenceReport",
    "EvidenceRow",
    "EvidenceSettings",
    "Job",
    "ProgressCallback",
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
