"""The widget's API to the job: the names a shell needs, from the one spine in :mod:`core.run`.

Everything here is a re-export; the code lives in :mod:`napari_gradcam.core.run`:

* :mod:`~napari_gradcam.core.run.request`: :class:`ImageSource`, :class:`TargetChoice`,
  :class:`ExplainRequest` (what to explain and how, including ``output``, an on-disk OME-Zarr);
* :mod:`~napari_gradcam.core.run.plan`: :class:`Plan` and :func:`plan_explanation`;
* :mod:`~napari_gradcam.core.run.job`: :func:`explain_job` (the generator a thread worker
  drains), :class:`ExplainResult`, :func:`domain_report`, :func:`contrast_limits`,
  :class:`JobError`;
* :mod:`~napari_gradcam.core.run.tiles`: :func:`read_slab`, :func:`to_model_input` (how a job
  cuts a sample, for shells that show or check one);
* :mod:`~napari_gradcam.core.run.output`: :func:`map_layer_data`, :func:`store_state` (an
  on-disk map as napari layer data, and how far it is).

Kept as a module so the shells' imports stay short and stable while the spine changes shape.
"""

from __future__ import annotations

from napari_gradcam.core.run.job import (
    ExplainResult,
    Job,
    JobError,
    Progress,
    contrast_limits,
    domain_report,
    explain,
    explain_job,
)
from napari_gradcam.core.run.output import map_layer_data, store_state
from napari_gradcam.core.run.plan import Plan, is_regression_card, plan_explanation
from napari_gradcam.core.run.request import (
    MODES,
    TARGET_KINDS,
    UNCERTAINTY_SOURCES,
    ExplainRequest,
    ImageSource,
    TargetChoice,
)
from napari_gradcam.core.run.tiles import read_slab, to_model_input
from napari_gradcam.core.volume import Cancelled, run_job

__all__ = [
    "MODES",
    "TARGET_KINDS",
    "UNCERTAINTY_SOURCES",
    "Cancelled",
    "ExplainRequest",
    "ExplainResult",
    "ImageSource",
    "Job",
    "JobError",
    "Plan",
    "Progress",
    "TargetChoice",
    "contrast_limits",
    "domain_report",
    "explain",
    "explain_job",
    "is_regression_card",
    "map_layer_data",
    "plan_explanation",
    "read_slab",
    "run_job",
    "store_state",
    "to_model_input",
]
