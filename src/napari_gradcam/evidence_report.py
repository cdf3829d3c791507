"""The evidence report's old address: everything now lives in :mod:`napari_gradcam.evidence`.

Kept so that ``from napari_gradcam.evidence_report import run_evidence`` (scripts, notebooks,
the README's examples) goes on working; new code imports from :mod:`napari_gradcam.evidence`.
"""

from __future__ import annotations

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
    ProgressCallback,
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
