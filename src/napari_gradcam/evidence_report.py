"""The evidence report's old address: everything now lives in :mod:`napari_gradcam.evidence`.

Kept so that ``from napari_gradcam.evidence_report import run_evidence`` (scripts, notebooks,
the README's examples) goes on working; new code imports from :mod:`napari_gradcam.evidence`.
"""

from __future__ import annotations

from collections.abc import Callable

from napari_gradcam import evidence as _evidence
from napari_gradcam.evidence import *  # noqa: F403  (every name of the package's __all__)

ProgressCallback = Callable[[int, int, str], None]
"""What :func:`run_evidence` calls with each ``(done, total, stage)`` the job yields."""

__all__ = [*_evidence.__all__, "ProgressCallback"]
