"""Is this heatmap evidence? Run every check on one image and write a report for a paper.

A Grad-CAM map of a crack convinces a reader only with numbers beside it: does deleting the
pixels it ranks first destroy the prediction faster than deleting random pixels (deletion
and insertion, Petsiuk et al. 2018)? Does the map change once the learned weights are
replaced by random ones (Adebayo et al. 2018)? Do other methods (occlusion, gradients,
Integrated Gradients) point at the same places? Does filling the crack lower the prediction,
and how much of the map lies inside it (or inside a scale bar that must not matter)?

:func:`evidence_job` runs these checks on one sample as a generator that yields
``(done, total, stage)`` between checks and returns an :class:`EvidenceReport`; the napari
widget runs it in a thread worker, :func:`run_evidence` drains it for scripts and the command
line. The checks themselves live in :mod:`napari_gradcam.core.evidence` and
:mod:`napari_gradcam.core.attribution`; this module decides their order and settings, fixes
the target once (so every check explains the same class), and turns the results into
figures (PNG, matplotlib's Agg renderer, no display needed), numbers (CSV and JSON) and the
provenance record (:meth:`EvidenceReport.export`), ready for a supplement.

No Qt and no napari here. Matplotlib is imported only when figures are drawn.
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Callable, Generator, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import nn

from napari_gradcam.core.attribution import (
    integrated_gradients,
    occlusion,
    saliency,
    score_cam,
    smoothgrad,
)
from napari_gradcam.core.engine import model_dtype_device, preserved_model_state
from napari_gradcam.core.evidence import (
    AgreementResult,
    DeletionInsertionResult,
    ForbiddenRegionResult,
    RandomisationResult,
    RegionTestResult,
    agreement,
    check_forbidden_region,
    deletion_insertion,
    energy_in_region,
    randomisation_check,
    region_test,
)
from napari_gradcam.core.methods import METHODS, heatmaps, make_explainer
from napari_gradcam.core.provenance import make_provenance
from napari_gradcam.core.targets import SegmentationRegion, Target
from napari_gradcam.core.volume import Cancelled, run_job, window_starts

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from napari_gradcam.core.models import LoadedModel

__all__ = [
    "ATTRIBUTION_CHECKS",
    "CHECKS",
    "DEFAULT_CHECKS",
    "Cancelled",
    "EvidenceError",
    "EvidenceEstimate",
    "EvidenceReport",
    "EvidenceRow",
    "EvidenceSettings",
    "estimate_evidence",
    "evidence_job",
    "evidence_summary",
    "format_value",
    "plot_deletion_insertion",
    "plot_maps",
    "plot_randomisation",
    "run_evidence",
]

ATTRIBUTION_CHECKS: tuple[str, ...] = (
    "occlusion", "saliency", "smoothgrad", "integrated_gradients", "score_cam",
)
"""Checks that compute another method's map, compared with the CAM by :func:`agreement`."""

CHECKS: tuple[str, ...] = ("deletion", "insertion", "randomisation", *ATTRIBUTION_CHECKS,
                           "region")
"""Every check :func:`evidence_job` knows; ``region`` needs a region mask."""

DEFAULT_CHECKS: tuple[str, ...] = (
    "deletion", "insertion", "randomisation", "occlusion", "saliency", "smoothgrad",
    "integrated_gradients",
)
"""What runs when the caller does not choose (Score-CAM is left out: it costs one forward pass
per feature channel)."""

CHECK_TITLES: dict[str, str] = {
    "deletion": "Deletion",
    "insertion": "Insertion",
    "randomisation": "Model randomisation",
    "occlusion": "Occlusion",
    "saliency": "Saliency",
    "smoothgrad": "SmoothGrad",
    "integrated_gradients": "Integrated Gradients",
    "score_cam": "Score-CAM",
    "region": "Region",
}
"""How each check is named in tables and figures."""

RegionKind = Literal["evidence", "forbidden"]
ProgressCallback = Callable[[int, int, str], None]
StopCallback = Callable[[], bool]
Job = Generator[tuple[int, int, str], None, "EvidenceReport"]


class EvidenceError(ValueError):
    """An evidence run cannot start or failed; the message says what to change.

    A ValueError (not a RuntimeError) on purpose: Qt thread workers take RuntimeErrors for a
    deleted worker and swallow them.
    """


@dataclass(frozen=True)
class EvidenceSettings:
    """Every knob of an evidence run, stored in the provenance so a run can be repeated.

    * ``steps``, ``n_random``: points of the deletion/insertion curves and number of random
      orders averaged into the baseline; ``deletion_removal`` / ``insertion_removal``: what a
      removed pixel becomes (``"mean"``, ``"blur"`` or a number; the core's defaults, mean for
      deletion and blur for insertion, as Petsiuk et al.);
    * ``randomisation_depth``: randomise whole blocks named by the first ``depth`` parts of the
      dotted layer names (2: ``classifier``, ``features.3``...), ``None``: layer by layer;
      ``randomisation_threshold``: a Spearman correlation at or above it means "barely changed";
    * ``occlusion_patch``: patch side in pixels (``None``: an eighth of each side, at least 2,
      so about 8 patches per axis), stride = patch;
    * ``smoothgrad_samples``, ``smoothgrad_noise``, ``ig_steps``: the gradient methods;
    * ``agreement_top_k``, ``agreement_factor``: two maps agree when the IoU of their top
      ``agreement_top_k`` pixels is at least ``agreement_factor`` times the IoU of two unrelated
      maps (``k / (2 - k)``). The overlap of the top pixels asks whether two methods point at the
      same places, the user's question; a rank correlation over all pixels (reported too) is
      dominated by the order of the many unimportant background pixels, which is noise;
    * ``region_fill``: how the region test fills the region (``"inpaint"`` blends it into its
      surroundings without drawing a new edge); ``region_null_samples``: how many random
      regions of the same shape are filled the same way to tell a real drop from the drop any
      filling causes, and ``region_alpha``: the region passes when its drop is positive and its
      p-value against them is below it; ``forbidden_threshold``: the largest share of the map
      allowed inside a forbidden region;
    * ``seed``, ``batch_size``: reproducibility and memory.
    """

    steps: int = 50
    n_random: int = 3
    deletion_removal: str | float | None = None
    insertion_removal: str | float | None = None
    randomisation_depth: int | None = 2
    randomisation_threshold: float = 0.5
    occlusion_patch: int | tuple[int, ...] | None = None
    smoothgrad_samples: int = 25
    smoothgrad_noise: float = 0.15
    ig_steps: int = 32
    agreement_top_k: float = 0.1
    agreement_factor: float = 3.0
    region_fill: str | float = "inpaint"
    region_null_samples: int = 50
    region_alpha: float = 0.05
    forbidden_threshold: float = 0.2
    seed: int = 0
    batch_size: int = 16

    def __post_init__(self) -> None:
        for name in ("steps", "n_random", "smoothgrad_samples", "ig_steps", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not 0.0 < self.agreement_top_k <= 1.0:
            raise ValueError(f"agreement_top_k is a fraction in (0, 1], got "
                             f"{self.agreement_top_k!r}")
        if not 0.0 < self.region_alpha < 1.0:
            raise ValueError(f"region_alpha is a p-value threshold in (0, 1), got "
                             f"{self.region_alpha!r}")
        null = self.region_null_samples
        if isinstance(null, bool) or not isinstance(null, (int, np.integer)) or null < 0:
            raise ValueError(f"region_null_samples must be a non-negative integer, got {null!r}")
        if not 0.0 <= self.forbidden_threshold <= 1.0:
            raise ValueError(f"forbidden_threshold is a share in [0, 1], got "
                             f"{self.forbidden_threshold!r}")

    def to_dict(self) -> dict[str, Any]:
        return {key: (list(value) if isinstance(value, tuple) else value)
                for key, value in asdict(self).items()}


@dataclass(frozen=True)
class EvidenceRow:
    """One line of the verdict table: a measured value, what it is compared with, the verdict.

    ``passed`` is True/False for a test with a pass criterion, None for a number shown for
    information. ``reference`` is the comparison value (random baseline, chance level,
    threshold) or None.
    """

    check: str
    measure: str
    value: float
    reference: float | None
    passed: bool | None
    criterion: str

    @property
    def verdict(self) -> str:
        return {True: "pass", False: "FAIL", None: "info"}[self.passed]


def _finite(value: float | None) -> float | None:
    """JSON has no NaN: undefined numbers are written as null."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def format_value(value: float) -> str:
    """Three decimals; an undefined number (a correlation with a constant map) in words."""
    return f"{value:.3f}" if math.isfinite(value) else "undefined"


def _chance_iou(top_k: float) -> float:
    """Expected IoU of two independent random top-k sets: k^2 / (2k - k^2) = k / (2 - k)."""
    return top_k / (2.0 - top_k)


# --------------------------------------------------------------------------------------------
# The report


@dataclass
class EvidenceReport:
    """Everything one evidence run measured on one sample, with its provenance.

    ``maps`` holds the explained method's map (key ``method``, e.g. ``"gradcam"``) and the map
    of every attribution check that ran, each ``(*spatial)`` float32 at the input size.
    ``image`` is the sample as the caller gave it (before the card's preprocessing, first
    channel), for figures; ``probabilities`` the model's class probabilities for the clean
    input (``None`` for outputs without a class axis).
    """

    method: str
    layer: str
    model_name: str
    target: str
    target_index: int | None
    class_names: tuple[str, ...]
    image: np.ndarray
    probabilities: np.ndarray | None
    maps: dict[str, np.ndarray]
    settings: EvidenceSettings
    provenance: dict[str, Any]
    checks: tuple[str, ...]
    deletion: DeletionInsertionResult | None = None
    insertion: DeletionInsertionResult | None = None
    randomisation: RandomisationResult | None = None
    agreements: dict[str, AgreementResult] = field(default_factory=dict)
    region_kind: RegionKind = "evidence"
    region_mask: np.ndarray | None = None
    region: RegionTestResult | None = None
    region_energy: float | None = None
    forbidden: ForbiddenRegionResult | None = None
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def cam(self) -> np.ndarray:
        """The map under test (the explained method's map)."""
        return self.maps[self.method]

    @property
    def spatial_dims(self) -> int:
        return self.cam.ndim

    @property
    def region_area_share(self) -> float | None:
        """The share of the image the region covers: the energy share of a map that ignores it."""
        return None if self.region_mask is None else float(np.mean(self.region_mask))

    # ---------------------------------------------------------------------------------------
    # Verdicts

    def rows(self) -> list[EvidenceRow]:
        """The verdict table, one row per measured number, in the order the checks ran."""
        rows: list[EvidenceRow] = []
        for result in (self.deletion, self.insertion):
            if result is None:
                continue
            lower = result.mode == "deletion"
            rows.append(EvidenceRow(
                CHECK_TITLES[result.mode], f"AUC of the target {result.score_kind}",
                float(result.auc[0]),
                None if result.random_auc is None else float(result.random_auc[0]),
                None if result.better_than_random is None else bool(
                    result.better_than_random[0]),
                ("below" if lower else "above") + " the random-order AUC",
            ))
        if self.randomisation is not None and self.randomisation.steps:
            last = self.randomisation.steps[-1]
            rows.append(EvidenceRow(
                CHECK_TITLES["randomisation"],
                f"Spearman with the original map, {len(last.randomised_layers)} block(s) random",
                float(last.spearman), float(self.randomisation.threshold),
                not self.randomisation.barely_changes,
                "some step below the threshold (the map depends on the learned weights)",
            ))
            rows.append(EvidenceRow(
                CHECK_TITLES["randomisation"], "SSIM with the original map, all random",
                float(last.ssim), None, None, "for information",
            ))
        factor = self.settings.agreement_factor
        for name, result in self.agreements.items():
            chance = _chance_iou(result.top_k)
            rows.append(EvidenceRow(
                CHECK_TITLES[name], f"IoU of the top {result.top_k:.0%} with {self.method}",
                float(result.top_k_iou), chance,
                bool(np.isfinite(result.top_k_iou) and result.top_k_iou >= factor * chance),
                f"at least {factor:g} x the chance level (both point at the same places)",
            ))
            rows.append(EvidenceRow(
                CHECK_TITLES[name], f"Spearman with {self.method} (all pixels)",
                float(result.spearman), None, None, "for information",
            ))
        if self.region is not None:
            rows.extend(self._region_rows())
            if self.region.probability_before is not None:
                rows.append(EvidenceRow(
                    "Region test", "target probability after filling",
                    float(self.region.probability_after[0]),
                    float(self.region.probability_before[0]), None,
                    "for information (reference: before filling)",
                ))
            if self.region_kind == "forbidden" and self.region.flipped is not None:
                flipped = bool(self.region.flipped[0])
                rows.append(EvidenceRow(
                    "Region test", "prediction flips when the forbidden region is filled",
                    float(flipped), 0.0, not flipped, "no flip (the region must not matter)",
                ))
        if self.region_energy is not None:
            area = self.region_area_share
            if self.region_kind == "evidence":
                rows.append(EvidenceRow(
                    "Region energy", f"share of the {self.method} map inside the region",
                    float(self.region_energy), area,
                    bool(area is not None and self.region_energy > area),
                    "above the region's area share (chance)",
                ))
            elif self.forbidden is not None:
                rows.append(EvidenceRow(
                    "Forbidden region", f"share of the {self.method} map inside the region",
                    float(self.region_energy), self.forbidden.threshold,
                    not self.forbidden.exceeded,
                    f"at most {self.forbidden.threshold:.0%}",
                ))
        return rows

    def _region_rows(self) -> list[EvidenceRow]:
        """The region test's drop, judged against random regions of the same shape."""
        region = self.region
        assert region is not None
        drop = float(region.score_drop[0])
        evidence = self.region_kind == "evidence"
        rows = []
        if region.p_value is None:  # no null distribution: the drop is all there is
            rows.append(EvidenceRow(
                "Region test", f"target score drop when the region is filled ({region.fill})",
                drop, 0.0, None if not evidence else False,
                "no random regions to compare with"
                + (f" ({region.null_note})" if region.null_note else "")
                + ": a drop alone is not evidence",
            ))
            return rows
        alpha = self.settings.region_alpha
        p_value = float(region.p_value[0])
        effect = float(region.effect_size[0])
        null_mean = float(region.null_drops[0].mean())
        rows.append(EvidenceRow(
            "Region test", f"p-value of the target score drop ({region.fill} fill) against "
            f"{region.null_count} random regions of the same shape", p_value, alpha,
            bool(region.stands_out(alpha)[0]) if evidence else None,
            f"below {alpha:g} with a positive drop (the region matters more than others)"
            if evidence else "for information (a forbidden region should not stand out)",
        ))
        rows.append(EvidenceRow(
            "Region test", "target score drop (reference: mean drop of the random regions)",
            drop, null_mean, None, "for information",
        ))
        rows.append(EvidenceRow(
            "Region test", "effect size (drop - null mean) / null std", effect, None, None,
            "for information",
        ))
        return rows

    @property
    def passed(self) -> bool:
        """True when every row with a pass criterion passed."""
        return all(row.passed is not False for row in self.rows())

    def summary(self) -> str:
        """A few lines for a log, the status bar or the supplement's caption."""
        head = (f"{self.model_name}: {self.method} at {self.layer!r}, target {self.target}")
        lines = [head]
        for row in self.rows():
            reference = "" if row.reference is None else f" (reference {row.reference:.3f})"
            lines.append(f"  [{row.verdict}] {row.check}: {row.measure} = "
                         f"{format_value(row.value)}{reference}")
        if self.randomisation is not None:
            lines.append(f"  randomisation: {self.randomisation.message}")
        if self.forbidden is not None and self.forbidden.message:
            lines.append(f"  forbidden region: {self.forbidden.message}")
        return "\n".join(lines)

    # ---------------------------------------------------------------------------------------
    # Provenance and numbers

    def map_provenance(self, name: str, **options: Any) -> dict[str, Any]:
        """The provenance record of one map (for a napari layer or a file).

        ``options["evidence"]`` is :func:`evidence_summary`: which checks passed, with their
        numbers, so a map saved or shared without its report folder still says how far it was
        tested.
        """
        record = dict(self.provenance)
        cam_like = name == self.method or name == "score_cam"
        extra = {**record.get("options", {}), "evidence_of": self.method,
                 "evidence": evidence_summary(self), **options}
        return make_provenance(
            method=name,
            layers=list(record["layers"]) if cam_like else [],
            target=record["target"],
            model_name=record["model"],
            weights_sha256=record["weights_sha256"],
            preprocessing=record["preprocessing"],
            mode="evidence",
            source=record["source"],
            options=extra,
        )

    def to_dict(self) -> dict[str, Any]:
        """All numbers of the report as JSON-ready Python objects (no maps)."""
        data: dict[str, Any] = {
            "model": self.model_name,
            "method": self.method,
            "layer": self.layer,
            "target": self.target,
            "target_index": self.target_index,
            "class_names": list(self.class_names),
            "probabilities": (None if self.probabilities is None
                              else [float(p) for p in self.probabilities]),
            "checks": list(self.checks),
            "passed": self.passed,
            "summary": [
                {"check": row.check, "measure": row.measure, "value": _finite(row.value),
                 "reference": _finite(row.reference), "passed": row.passed,
                 "criterion": row.criterion}
                for row in self.rows()
            ],
            "settings": self.settings.to_dict(),
            "timings_s": {key: round(value, 3) for key, value in self.timings.items()},
        }
        for result in (self.deletion, self.insertion):
            if result is not None:
                data[result.mode] = {
                    "fractions": [float(f) for f in result.fractions],
                    "scores": [float(s) for s in result.scores[0]],
                    "auc": float(result.auc[0]),
                    "random_scores": (None if result.random_scores is None
                                      else [float(s) for s in result.random_scores[0]]),
                    "random_auc": (None if result.random_auc is None
                                   else float(result.random_auc[0])),
                    "removal": result.removal,
                    "score": result.score_kind,
                }
        if self.randomisation is not None:
            data["randomisation"] = {
                "cascading": self.randomisation.cascading,
                "threshold": self.randomisation.threshold,
                "barely_changes": self.randomisation.barely_changes,
                "message": self.randomisation.message,
                "steps": [
                    {"layer": step.layer, "randomised_layers": list(step.randomised_layers),
                     "spearman": _finite(step.spearman), "ssim": _finite(step.ssim),
                     "barely_changed": step.barely_changed}
                    for step in self.randomisation.steps
                ],
            }
        if self.agreements:
            data["agreement"] = {
                name: {"spearman": _finite(r.spearman), "pearson": _finite(r.pearson),
                       "top_k_iou": _finite(r.top_k_iou), "top_k": r.top_k,
                       "chance_iou": _chance_iou(r.top_k)}
                for name, r in self.agreements.items()
            }
        if self.region_mask is not None:
            region: dict[str, Any] = {
                "kind": self.region_kind,
                "pixels": int(np.count_nonzero(self.region_mask)),
                "area_share": self.region_area_share,
                "energy_share": _finite(self.region_energy),
            }
            if self.region is not None:
                region.update({
                    "fill": self.region.fill,
                    "score_before": float(self.region.score_before[0]),
                    "score_after": float(self.region.score_after[0]),
                    "score_drop": float(self.region.score_drop[0]),
                    "probability_before": (None if self.region.probability_before is None
                                           else float(self.region.probability_before[0])),
                    "probability_after": (None if self.region.probability_after is None
                                          else float(self.region.probability_after[0])),
                    "flipped": (None if self.region.flipped is None
                                else bool(self.region.flipped[0])),
                    "null_count": self.region.null_count,
                    "null_placement": self.region.null_note,
                    "null_drops": (None if self.region.null_drops is None
                                   else [float(d) for d in self.region.null_drops[0]]),
                    "null_mean": (None if self.region.null_drops is None
                                  else float(self.region.null_drops[0].mean())),
                    "effect_size": (None if self.region.effect_size is None
                                    else _finite(self.region.effect_size[0])),
                    "p_value": (None if self.region.p_value is None
                                else float(self.region.p_value[0])),
                    "alpha": self.settings.region_alpha,
                })
            if self.forbidden is not None:
                region["forbidden_message"] = self.forbidden.message
                region["forbidden_threshold"] = self.forbidden.threshold
            data["region"] = region
        return data

    # ---------------------------------------------------------------------------------------
    # Export

    def export(self, folder: str | Path, *, figures: bool = True, maps: bool = True,
               overwrite: bool = False) -> dict[str, Path]:
        """Write the report into ``folder`` (created if needed) and return the files by role.

        ``summary.csv`` (the verdict table), ``curves.csv`` (deletion/insertion with the
        random baseline), ``randomisation.csv``, ``agreement.csv``, ``report.json`` (every
        number), ``provenance.json``, ``maps.npz`` (image, maps, region mask), ``summary.txt``
        and, with ``figures``, ``figures/deletion_insertion.png``, ``figures/randomisation.png``
        and ``figures/maps.png``. ``maps=False`` leaves out ``maps.npz`` (the largest file, and
        one that a rerun reproduces). An existing report in ``folder`` is only replaced with
        ``overwrite=True``. Figures need matplotlib (``figures=False`` writes numbers only).
        """
        folder = Path(folder).expanduser()
        if folder.exists() and not folder.is_dir():
            raise NotADirectoryError(f"{folder} is a file; give a folder for the report")
        planned = self._planned_files(folder, figures, maps)
        existing = [path for path in planned.values() if path.exists()]
        if existing and not overwrite:
            raise FileExistsError(
                f"{folder} already holds an evidence report ({existing[0].name}); choose another "
                "folder or pass overwrite=True"
            )
        if figures:
            _require_matplotlib()
        (folder / "figures").mkdir(parents=True, exist_ok=True) if figures else folder.mkdir(
            parents=True, exist_ok=True)
        self._write_numbers(planned)
        if figures:
            self._write_figures(planned)
        return {role: path for role, path in planned.items() if path.exists()}

    def _planned_files(self, folder: Path, figures: bool, maps: bool) -> dict[str, Path]:
        files = {
            "summary_csv": folder / "summary.csv",
            "summary_txt": folder / "summary.txt",
            "report_json": folder / "report.json",
            "provenance_json": folder / "provenance.json",
        }
        if maps:
            files["maps_npz"] = folder / "maps.npz"
        if self.deletion is not None or self.insertion is not None:
            files["curves_csv"] = folder / "curves.csv"
        if self.randomisation is not None:
            files["randomisation_csv"] = folder / "randomisation.csv"
        if self.agreements:
            files["agreement_csv"] = folder / "agreement.csv"
        if figures:
            if self.deletion is not None or self.insertion is not None:
                files["deletion_insertion_png"] = folder / "figures" / "deletion_insertion.png"
            if self.randomisation is not None:
                files["randomisation_png"] = folder / "figures" / "randomisation.png"
            files["maps_png"] = folder / "figures" / "maps.png"
        return files

    def _write_numbers(self, files: Mapping[str, Path]) -> None:
        def write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
            with open(path, "w", newline="", encoding="utf-8") as handle:
                writer = csv.writer(handle)
                writer.writerow(header)
                for row in rows:
                    writer.writerow(["" if value is None else value for value in row])

        write_csv(files["summary_csv"],
                  ("check", "measure", "value", "reference", "verdict", "criterion"),
                  ((r.check, r.measure, f"{r.value:.6g}",
                    None if r.reference is None else f"{r.reference:.6g}", r.verdict,
                    r.criterion) for r in self.rows()))
        if "curves_csv" in files:
            fractions = (self.deletion or self.insertion).fractions  # type: ignore[union-attr]
            columns: dict[str, np.ndarray | None] = {}
            for result in (self.deletion, self.insertion):
                if result is not None:
                    columns[result.mode] = result.scores[0]
                    columns[f"{result.mode}_random"] = (
                        None if result.random_scores is None else result.random_scores[0])
            names = [name for name, values in columns.items() if values is not None]
            write_csv(files["curves_csv"], ("fraction", *names),
                      ([f"{f:.6g}", *(f"{columns[n][i]:.6g}" for n in names)]
                       for i, f in enumerate(fractions)))
        if "randomisation_csv" in files:
            assert self.randomisation is not None
            write_csv(files["randomisation_csv"],
                      ("step", "layer", "randomised_layers", "spearman", "ssim",
                       "barely_changed"),
                      ((i + 1, s.layer, " ".join(s.randomised_layers), f"{s.spearman:.6g}",
                        f"{s.ssim:.6g}", s.barely_changed)
                       for i, s in enumerate(self.randomisation.steps)))
        if "agreement_csv" in files:
            write_csv(files["agreement_csv"],
                      ("method", "spearman", "pearson", "top_k_iou", "top_k", "chance_iou"),
                      ((name, f"{r.spearman:.6g}", f"{r.pearson:.6g}", f"{r.top_k_iou:.6g}",
                        r.top_k, f"{_chance_iou(r.top_k):.6g}")
                       for name, r in self.agreements.items()))
        files["report_json"].write_text(json.dumps(self.to_dict(), indent=2), encoding="utf-8")
        # the run's record with its verdicts, as every map's provenance carries them
        record = {**self.provenance, "options": {**self.provenance.get("options", {}),
                                                 "evidence": evidence_summary(self)}}
        files["provenance_json"].write_text(json.dumps(record, indent=2, default=str),
                                            encoding="utf-8")
        if "maps_npz" in files:
            arrays = {f"map_{name}": values for name, values in self.maps.items()}
            arrays["image"] = self.image
            if self.region_mask is not None:
                arrays["region_mask"] = self.region_mask
            np.savez_compressed(files["maps_npz"], **arrays)
        files["summary_txt"].write_text(self.summary() + "\n", encoding="utf-8")

    def _write_figures(self, files: Mapping[str, Path]) -> None:
        from matplotlib.figure import Figure

        jobs = (
            ("deletion_insertion_png", plot_deletion_insertion, (8.0, 3.4)),
            ("randomisation_png", plot_randomisation, (9.0, 5.0)),
            ("maps_png", plot_maps, _maps_figure_size(len(self.maps))),
        )
        for role, draw, size in jobs:
            if role not in files:
                continue
            figure = Figure(figsize=size, dpi=150, layout="constrained")
            draw(self, figure)
            figure.savefig(files[role])


def evidence_summary(report: EvidenceReport) -> dict[str, Any]:
    """The verdicts of an evidence run, small and JSON-ready, to travel with the map.

    A heatmap that leaves napari (a layer saved, an OME-Zarr sent to a colleague) loses its
    report folder; this record goes into its provenance instead (:meth:`EvidenceReport.
    map_provenance` puts it under ``options["evidence"]``; the explainer widget and the command
    line put it under the map's ``provenance["evidence"]``). It holds the overall verdict, the
    checks that failed by name, and every row of the verdict table with its number, reference
    and criterion; undefined numbers are ``None`` (JSON has no NaN).
    """
    rows = report.rows()
    record = report.provenance
    return {
        "passed": report.passed,
        "failed": [f"{row.check}: {row.measure}" for row in rows if row.passed is False],
        "method": report.method,
        "layer": report.layer,
        "target": report.target,
        "model": report.model_name,
        "source": record.get("source"),
        "created": record.get("created"),
        "checks": list(report.checks),
        "rows": [
            {"check": row.check, "measure": row.measure, "value": _finite(row.value),
             "reference": _finite(row.reference), "verdict": row.verdict,
             "criterion": row.criterion}
            for row in rows
        ],
    }


# --------------------------------------------------------------------------------------------
# Figures (matplotlib, drawn on a Figure the caller owns: a file or the widget's canvas)


MAP_COLUMNS = 4
"""Panels per row in the maps figure."""


def _maps_figure_size(count: int) -> tuple[float, float]:
    panels = 1 + count
    columns = min(panels, MAP_COLUMNS)
    return 2.8 * columns, 3.0 * -(-panels // columns)


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError as error:  # pragma: no cover - matplotlib is installed with napari
        raise ImportError("figures need matplotlib: pip install matplotlib (or export with "
                          "figures=False for the numbers only)") from error


def plot_deletion_insertion(report: EvidenceReport, figure: Figure) -> None:
    """Deletion and insertion curves of the map's order next to the random-order baseline."""
    results = [r for r in (report.deletion, report.insertion) if r is not None]
    figure.clear()
    if not results:
        axis = figure.add_subplot(1, 1, 1)
        axis.text(0.5, 0.5, "deletion / insertion not run", ha="center", va="center")
        axis.set_axis_off()
        return
    axes = figure.subplots(1, len(results), squeeze=False)[0]
    for axis, result in zip(axes, results, strict=True):
        fractions = result.fractions
        axis.plot(fractions, result.scores[0], color="C3", lw=2,
                  label=f"{report.method} order (AUC {result.auc[0]:.3f})")
        if result.random_scores is not None:
            axis.plot(fractions, result.random_scores[0], color="0.4", ls="--",
                      label=f"random order (AUC {result.random_auc[0]:.3f})")
        verb = "removed" if result.mode == "deletion" else "inserted"
        axis.set_xlabel(f"fraction of pixels {verb}")
        axis.set_ylabel(f"target {result.score_kind}")
        axis.set_title(f"{result.mode.capitalize()} ({result.removal})")
        axis.set_xlim(0, 1)
        axis.grid(alpha=0.3)
        axis.legend(fontsize="small")


def _display_slice(report: EvidenceReport) -> tuple[tuple[int | slice, ...], str]:
    """For 3D data the slice (axis 0) to show: through the region, else the CAM's maximum."""
    if report.spatial_dims != 3:
        return (), ""
    if report.region_mask is not None and report.region_mask.any():
        weights = report.region_mask.reshape(report.region_mask.shape[0], -1).sum(1)
    else:
        weights = np.abs(report.cam).reshape(report.cam.shape[0], -1).sum(1)
    index = int(np.argmax(weights))
    return (index,), f" (slice {index})"


def _plot_map(axis: Any, report: EvidenceReport, values: np.ndarray | None, title: str,
              say_where: bool = True) -> None:
    key, where = _display_slice(report)
    where = where if say_where else ""
    image = np.asarray(report.image, dtype=np.float64)[key]
    if image.ndim == 1:
        axis.plot(image, color="0.5", lw=1)
        if values is not None:
            twin = axis.twinx()
            twin.plot(np.asarray(values)[key], color="C3", lw=1.2)
            twin.set_yticks([])
        axis.set_yticks([])
    else:
        axis.imshow(image, cmap="gray")
        if values is not None:
            shown = np.asarray(values, dtype=np.float64)[key]
            if shown.min() < 0:
                limit = float(np.abs(shown).max()) or 1.0
                axis.imshow(shown, cmap="RdBu_r", vmin=-limit, vmax=limit, alpha=0.6)
            else:
                axis.imshow(shown, cmap="inferno", alpha=0.55)
        if report.region_mask is not None:
            mask = report.region_mask[key]
            if mask.any() and not mask.all():
                axis.contour(mask.astype(float), levels=[0.5], colors="cyan", linewidths=0.8)
        axis.set_xticks([])
        axis.set_yticks([])
    axis.set_title(title + where, fontsize="small")


def plot_maps(report: EvidenceReport, figure: Figure) -> None:
    """The input and every map side by side (3D: one slice; 1D: curves over the signal)."""
    figure.clear()
    names = list(report.maps)
    panels = 1 + len(names)
    columns = min(panels, MAP_COLUMNS)
    rows = -(-panels // columns)
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    _plot_map(axes[0], report, None, "input")
    for axis, name in zip(axes[1:], names, strict=False):
        if name == report.method:
            title = f"{name} ({report.layer})"
        else:
            title = CHECK_TITLES.get(name, name)
        if name in report.agreements:
            title += f"\ntop-{report.agreements[name].top_k:.0%} IoU " \
                f"{report.agreements[name].top_k_iou:.2f}"
        _plot_map(axis, report, report.maps[name], title)
    for axis in axes[panels:]:
        axis.set_axis_off()


def plot_randomisation(report: EvidenceReport, figure: Figure) -> None:
    """Maps after each randomisation step above the similarity with the original map."""
    figure.clear()
    result = report.randomisation
    if result is None or not result.steps:
        axis = figure.add_subplot(1, 1, 1)
        axis.text(0.5, 0.5, "randomisation check not run", ha="center", va="center")
        axis.set_axis_off()
        return
    steps = result.steps
    with_maps = all(step.saliency_map is not None for step in steps)
    grid = figure.add_gridspec(2 if with_maps else 1, 1 + len(steps) if with_maps else 1,
                               height_ratios=[1, 1.2] if with_maps else None)
    if with_maps:
        first = figure.add_subplot(grid[0, 0])
        _plot_map(first, report, _first_map(result.original_map), "original")
        for column, step in enumerate(steps, start=1):
            axis = figure.add_subplot(grid[0, column])
            _plot_map(axis, report, _first_map(step.saliency_map), f"+ {step.layer}",
                      say_where=False)
        curve = figure.add_subplot(grid[1, :])
    else:
        curve = figure.add_subplot(grid[0, 0])
    positions = np.arange(len(steps) + 1)
    spearman = [1.0, *(step.spearman for step in steps)]
    structure = [1.0, *(step.ssim for step in steps)]
    curve.plot(positions, spearman, "o-", color="C3", label="Spearman rank correlation")
    curve.plot(positions, structure, "s--", color="C0", label="SSIM")
    curve.axhline(result.threshold, color="0.5", lw=0.8, ls=":",
                  label=f"threshold {result.threshold:g}")
    curve.set_xticks(positions, ["original", *(step.layer for step in steps)],
                     rotation=30, ha="right", fontsize="small")
    curve.set_ylim(-1.05, 1.05)
    curve.set_ylabel("similarity to the original map")
    curve.set_title("Cascading randomisation, from the output towards the input")
    curve.grid(alpha=0.3)
    curve.legend(fontsize="small")


def _first_map(values: np.ndarray | None) -> np.ndarray | None:
    """The map of the (only) sample: randomisation maps keep their batch axis."""
    if values is None:
        return None
    array = np.asarray(values)
    return array[0] if array.ndim > 1 and array.shape[0] == 1 else array


# --------------------------------------------------------------------------------------------
# The job


@dataclass
class _Subject:
    """Everything a run needs, checked before any computation."""

    model: nn.Module
    inputs: torch.Tensor
    image: np.ndarray
    layer: str
    model_name: str
    class_names: tuple[str, ...]
    weights_sha256: str | None
    preprocessing: list[Mapping[str, Any]]
    model_source: str


def _is_loaded_model(candidate: object) -> bool:
    from napari_gradcam.core.models import LoadedModel

    return isinstance(candidate, LoadedModel)


def _one_sample(loaded: LoadedModel, x: object) -> tuple[torch.Tensor, np.ndarray]:
    """Raw data of one sample → (1, C, *spatial) model input, and the display image."""
    card = loaded.card
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    array = np.asarray(x)
    dims = card.spatial_dims
    if array.ndim == dims:
        batch = array[None]
    elif array.ndim == dims + 1 and array.shape[0] == 1:
        batch = array
    elif array.ndim == dims + 1 and array.shape[0] == card.in_channels:
        batch = array[None]  # one channels-first sample
    elif array.ndim == dims + 2 and array.shape[0] == 1:
        batch = array
    else:
        raise EvidenceError(
            f"the evidence report explains one sample: give the model {card.name!r} data of "
            f"shape (*spatial) with {dims} spatial axes, (1, *spatial) or (1, C, *spatial); got "
            f"{array.shape}. Run once per image for a batch"
        )
    try:
        inputs = loaded.preprocess(batch)
    except (ValueError, TypeError) as error:
        raise EvidenceError(f"the data does not fit the model {card.name!r}: {error}") from None
    image = batch[0] if batch.ndim == dims + 1 else batch[0, 0]
    return inputs, np.asarray(image, dtype=np.float32)


def _prepare(model: object, x: object, layer: str | None, method: str) -> _Subject:
    if method not in METHODS:
        raise EvidenceError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if _is_loaded_model(model):
        loaded = model
        inputs, image = _one_sample(loaded, x)  # type: ignore[arg-type]
        card = loaded.card  # type: ignore[attr-defined]
        subject = _Subject(
            model=loaded.model,  # type: ignore[attr-defined]
            inputs=inputs, image=image,
            layer=layer or card.target_layer or "",
            model_name=card.name, class_names=tuple(card.class_names),
            weights_sha256=loaded.weights_sha256,  # type: ignore[attr-defined]
            preprocessing=list(card.preprocessing),
            model_source=str(loaded.source),  # type: ignore[attr-defined]
        )
    elif isinstance(model, nn.Module):
        tensor = torch.as_tensor(np.asarray(x)) if not isinstance(x, torch.Tensor) else x
        if tensor.ndim < 3 or tensor.shape[0] != 1:
            raise EvidenceError(
                "with a bare torch module, x is the model input of one sample, shape "
                f"(1, C, *spatial); got {tuple(tensor.shape)} (load a model card to feed raw "
                "data through its preprocessing)"
            )
        tensor = tensor.detach().float()
        if layer is None:
            from napari_gradcam.core.layer_discovery import default_target_layer

            layer = default_target_layer(model, tensor.ndim - 2, int(tensor.shape[1]),
                                         tuple(tensor.shape[2:]))
        subject = _Subject(
            model=model, inputs=tensor, image=tensor[0, 0].cpu().numpy().astype(np.float32),
            layer=layer, model_name=type(model).__name__, class_names=(),
            weights_sha256=None, preprocessing=[], model_source="<python module>",
        )
    else:
        raise TypeError(
            f"run_evidence takes a LoadedModel (load_model(...)) or a torch.nn.Module, not "
            f"{type(model).__name__}"
        )
    if not subject.layer or subject.layer not in dict(subject.model.named_modules()):
        raise EvidenceError(
            f"layer {subject.layer!r} is not in the model; choose one of its feature layers, "
            "e.g. 'features.3' (see discover_feature_layers)"
        )
    if not torch.isfinite(subject.inputs).all():
        raise EvidenceError("the input contains NaN or infinite values; fill them first")
    return subject


def _fixed_target(subject: _Subject, target: object) -> tuple[Any, int | None, str,
                                                                np.ndarray | None]:
    """Fix the target once: every check must explain the same class.

    Returns the target for the core functions, its class index (if a class), a label and the
    clean input's class probabilities.
    """
    model = subject.model
    with preserved_model_state(model), torch.no_grad():
        dtype, device = model_dtype_device(model)
        output = model(subject.inputs.to(device=device, dtype=dtype))
    if not isinstance(output, torch.Tensor):
        raise EvidenceError(f"the model returned {type(output).__name__}, not a tensor of "
                            "logits; wrap it so that it returns its logits")
    probabilities = None
    if output.ndim >= 2:
        soft = torch.softmax(output.double(), dim=1)
        probabilities = (soft.flatten(2).mean(2) if output.ndim > 2 else soft)[0].cpu().numpy()
    names = subject.class_names

    def label(index: int) -> str:
        return f"{names[index]} (class {index})" if 0 <= index < len(names) else f"class {index}"

    if isinstance(target, (list, tuple)) and len(target) == 1:
        target = target[0]
    if target is None or (isinstance(target, str) and target == "predicted"):
        if output.ndim != 2:
            raise EvidenceError(
                "the model returns a map of class scores (segmentation), so there is no single "
                "predicted class: choose a class as the target"
            )
        index = int(output[0].argmax())
        return index, index, f"predicted: {label(index)}", probabilities
    if isinstance(target, str):
        raise EvidenceError(f"target {target!r} is not supported: the evidence checks explain "
                            "one class at a time; use 'predicted' or a class index")
    if isinstance(target, (bool, np.bool_)):
        raise TypeError("a boolean is not a target; pass a class index")
    if isinstance(target, (int, np.integer)):
        classes = int(output.shape[1]) if output.ndim >= 2 else 0
        if not 0 <= int(target) < classes:
            raise EvidenceError(f"class {int(target)} is out of range: the model has {classes} "
                                "classes")
        return int(target), int(target), label(int(target)), probabilities
    if isinstance(target, SegmentationRegion):
        return target, int(target.class_index), f"{label(int(target.class_index))}, " \
            f"{target.describe()}", probabilities
    if isinstance(target, Target) or callable(target):
        name = target.describe() if isinstance(target, Target) else getattr(
            target, "__name__", "callable target")
        return target, None, str(name), probabilities
    raise TypeError(f"target must be None/'predicted', a class index, a SegmentationRegion or a "
                    f"callable, not {type(target).__name__}")


def _auto_patch(spatial: tuple[int, ...], patch: int | tuple[int, ...] | None) -> tuple[int, ...]:
    if patch is None:
        return tuple(max(2, size // 8) for size in spatial)
    values = (patch,) * len(spatial) if isinstance(patch, (int, np.integer)) else tuple(patch)
    if len(values) != len(spatial):
        raise EvidenceError(f"occlusion_patch needs one size per spatial axis ({len(spatial)}), "
                            f"got {patch!r}")
    return tuple(min(int(v), s) for v, s in zip(values, spatial, strict=True))


def _window_count(spatial: tuple[int, ...], patch: tuple[int, ...]) -> int:
    """How many occlusion patches the core will try (the same grid, for progress)."""
    return math.prod(len(window_starts(size, side, step=side))
                     for size, side in zip(spatial, patch, strict=True))


def _randomisation_blocks(model: nn.Module, depth: int | None) -> int:
    """About how many steps the cascade takes (progress only; the core decides exactly)."""
    owners = [name for name, module in model.named_modules()
              if any(True for _ in module.parameters(recurse=False))]
    if depth is None:
        return max(1, len(owners))
    return max(1, len({".".join(name.split(".")[:depth]) for name in owners}))


def _costs(checks: Sequence[str], subject: _Subject, settings: EvidenceSettings
           ) -> list[tuple[str, int]]:
    """(stage, cost) in forward-pass equivalents (a backward pass counts as one more)."""
    spatial = tuple(int(s) for s in subject.inputs.shape[2:])
    curve = (1 + settings.n_random) * (settings.steps + 1)
    costs = {
        "deletion": curve,
        "insertion": curve,
        "randomisation": 2 * (1 + _randomisation_blocks(subject.model,
                                                        settings.randomisation_depth)),
        "occlusion": 1 + _window_count(spatial, _auto_patch(spatial, settings.occlusion_patch)),
        "saliency": 2,
        "smoothgrad": 2 * settings.smoothgrad_samples,
        "integrated_gradients": 2 * (settings.ig_steps + 1),
        "score_cam": 66,
        "region": 2 + settings.region_null_samples,
    }
    return [(check, costs[check]) for check in checks]


def _checked_checks(checks: Iterable[str] | str, region_mask: object) -> tuple[str, ...]:
    chosen = [checks] if isinstance(checks, str) else list(checks)
    unknown = [name for name in chosen if name not in CHECKS]
    if unknown:
        raise EvidenceError(f"unknown check(s) {unknown}; choose from {', '.join(CHECKS)}")
    if region_mask is not None and "region" not in chosen:
        chosen.append("region")
    if "region" in chosen and region_mask is None:
        raise EvidenceError("the region check needs a region mask (a Labels or Shapes layer "
                            "in napari, region_mask= in Python)")
    ordered = tuple(name for name in CHECKS if name in chosen)
    return ordered


def _region_mask(region_mask: object, image_shape: tuple[int, ...]) -> np.ndarray | None:
    if region_mask is None:
        return None
    mask = np.asarray(region_mask)
    if mask.shape != image_shape:
        squeezed = np.squeeze(mask)
        if squeezed.shape != image_shape:
            raise EvidenceError(f"the region mask has shape {mask.shape} but the image has "
                                f"{image_shape}; they must match")
        mask = squeezed
    if mask.dtype != bool:
        if not np.issubdtype(mask.dtype, np.number):
            raise EvidenceError("the region mask must be boolean or a label image (non-zero = "
                                "inside)")
        mask = mask != 0
    if not mask.any():
        raise EvidenceError("the region mask is empty: paint or draw the region first (in the "
                            "current slice)")
    if mask.all():
        raise EvidenceError("the region mask covers the whole image; it must leave some pixels "
                            "outside")
    return mask


def _as_map(values: object) -> np.ndarray:
    array = np.asarray(values, dtype=np.float32)
    return array[0] if array.shape[0] == 1 else array


def evidence_job(
    model: LoadedModel | nn.Module,
    x: object,
    *,
    layer: str | None = None,
    target: object = None,
    checks: Iterable[str] | str = DEFAULT_CHECKS,
    region_mask: object = None,
    region_kind: RegionKind = "evidence",
    method: str = "gradcam",
    settings: EvidenceSettings | None = None,
    source: str | None = None,
    progress: ProgressCallback | None = None,
    should_stop: StopCallback | None = None,
) -> Job:  # returns a generator (validated eagerly)
    """Run the evidence checks on one sample; yield ``(done, total, stage)``, return the report.

    ``model`` is a :class:`~napari_gradcam.core.models.LoadedModel` (then ``x`` is raw data of
    one sample, ``(*spatial)``, ``(1, *spatial)`` or ``(1, C, *spatial)``, fed through the
    card's preprocessing) or a bare module (then ``x`` is its input ``(1, C, *spatial)``).
    ``layer`` defaults to the card's (or the discovered) target layer; ``target`` is
    ``None``/``"predicted"`` (fixed to the class predicted for the clean input), a class index,
    a :class:`~napari_gradcam.core.targets.SegmentationRegion` or a callable. ``checks``: any
    of :data:`CHECKS`; with ``region_mask`` (non-zero = inside, the image's shape) the region
    check runs too: for ``region_kind="evidence"`` (the crack) filling the region should lower
    the score and the map should concentrate there; for ``"forbidden"`` (a scale bar) the map
    should avoid it and filling it should not flip the prediction.

    Not itself a generator: everything is validated when it is called (a clear
    ``EvidenceError``, before a worker starts) and the returned generator does the work. Units
    of ``total`` are forward-pass equivalents. Within a long check
    ``progress(done, total, stage)`` reports finer steps and ``should_stop()`` is polled;
    both between and within checks a stop raises :class:`Cancelled` and nothing is returned.
    The model is left as found.
    """
    if region_kind not in ("evidence", "forbidden"):
        raise EvidenceError(f"region_kind must be 'evidence' or 'forbidden', got {region_kind!r}")
    settings = settings or EvidenceSettings()
    chosen = _checked_checks(checks, region_mask)
    subject = _prepare(model, x, layer, method)
    mask = _region_mask(region_mask, tuple(subject.inputs.shape[2:]))
    fixed = _fixed_target(subject, target)
    return _stages(subject, fixed, chosen, mask, region_kind, method, settings, source,
                   progress, should_stop)


def _stages(subject: _Subject, fixed: tuple[Any, int | None, str, np.ndarray | None],
            chosen: tuple[str, ...], mask: np.ndarray | None, region_kind: RegionKind,
            method: str, settings: EvidenceSettings, source: str | None,
            progress: ProgressCallback | None, should_stop: StopCallback | None) -> Job:
    """The generator behind :func:`evidence_job`: one stage per check."""
    target, target_index, target_label, probabilities = fixed
    explainer_factory = _explainer_factory(method, subject.layer)
    stages = [("map", 2), *_costs(chosen, subject, settings)]
    total = sum(cost for _, cost in stages)
    done = 0
    timings: dict[str, float] = {}
    results: dict[str, Any] = {}

    def stop_requested() -> bool:
        return should_stop is not None and bool(should_stop())

    for stage, cost in stages:
        if stop_requested():
            raise Cancelled(f"evidence run stopped before {stage}")
        yield done, total, stage
        base = done

        def inner(step: int, steps: int, base: int = base, cost: int = cost,
                  stage: str = stage) -> None:
            if progress is not None and steps > 0:
                progress(base + min(cost, round(cost * step / steps)), total, stage)

        started = time.perf_counter()
        try:
            results[stage] = _run_stage(stage, subject, target, settings, mask, results,
                                        explainer_factory, inner, stop_requested)
        except Cancelled:
            raise
        except EvidenceError:
            raise
        except (ValueError, TypeError) as error:
            raise EvidenceError(f"{CHECK_TITLES.get(stage, stage)}: {error}") from error
        except MemoryError as error:
            raise EvidenceError(f"out of memory in {stage}: use a smaller batch size or "
                                "image") from error
        except Exception as error:
            raise EvidenceError(f"{CHECK_TITLES.get(stage, stage)} failed: "
                                f"{type(error).__name__}: {error}") from error
        timings[stage] = time.perf_counter() - started
        done += cost
    yield total, total, "done"
    return _assemble(subject, method, target_index, target_label, probabilities,
                     settings, chosen, mask, region_kind, results, timings, source)


def _explainer_factory(method: str, layer: str) -> Callable[[nn.Module, torch.Tensor, Any],
                                                              np.ndarray]:
    def explain(model: nn.Module, inputs: torch.Tensor, target: Any) -> np.ndarray:
        return heatmaps(make_explainer(method, model, layer)(inputs, target=target), method)

    return explain


def _run_stage(stage: str, subject: _Subject, target: Any, settings: EvidenceSettings,
               mask: np.ndarray | None, results: dict[str, Any],
               explain: Callable[[nn.Module, torch.Tensor, Any], np.ndarray],
               progress: Callable[[int, int], None], should_stop: StopCallback) -> Any:
    model, inputs = subject.model, subject.inputs
    common = {"batch_size": settings.batch_size, "progress": progress, "should_stop": should_stop}
    if stage == "map":
        maps = explain(model, inputs, target)
        progress(1, 1)
        return maps
    if stage in ("deletion", "insertion"):
        removal = settings.deletion_removal if stage == "deletion" else settings.insertion_removal
        return deletion_insertion(model, inputs, results["map"], target, steps=settings.steps,
                                  mode=stage, removal=removal, n_random=settings.n_random,
                                  seed=settings.seed, **common)
    if stage == "randomisation":
        return randomisation_check(
            model, inputs, lambda m, x: explain(m, x, target),
            depth=settings.randomisation_depth, threshold=settings.randomisation_threshold,
            seed=settings.seed, keep_maps=True, progress=progress, should_stop=should_stop)
    if stage == "occlusion":
        spatial = tuple(int(s) for s in inputs.shape[2:])
        return occlusion(model, inputs, target, patch=_auto_patch(spatial,
                                                                   settings.occlusion_patch),
                         **common)
    if stage == "saliency":
        return saliency(model, inputs, target, **common)
    if stage == "smoothgrad":
        return smoothgrad(model, inputs, target, n_samples=settings.smoothgrad_samples,
                          noise_level=settings.smoothgrad_noise, seed=settings.seed, **common)
    if stage == "integrated_gradients":
        return integrated_gradients(model, inputs, target, steps=settings.ig_steps, **common)
    if stage == "score_cam":
        return score_cam(model, subject.layer, inputs, target, **common)
    if stage == "region":
        assert mask is not None
        if should_stop():
            raise Cancelled("evidence run stopped before the region test")
        result = region_test(model, inputs, mask, target, fill=settings.region_fill,
                             n_null=settings.region_null_samples, seed=settings.seed, **common)
        progress(1, 1)
        return result
    raise AssertionError(stage)  # pragma: no cover - _checked_checks rejects unknown names


def _assemble(subject: _Subject, method: str, target_index: int | None,
              target_label: str, probabilities: np.ndarray | None, settings: EvidenceSettings,
              checks: tuple[str, ...], mask: np.ndarray | None, region_kind: RegionKind,
              results: dict[str, Any], timings: dict[str, float], source: str | None
              ) -> EvidenceReport:
    cam = _as_map(results["map"])
    maps = {method: cam}
    agreements = {}
    for name in ATTRIBUTION_CHECKS:
        if name in results:
            maps[name] = _as_map(results[name])
            agreements[name] = agreement(cam, maps[name], top_k=settings.agreement_top_k)
    region_energy = forbidden = None
    if mask is not None:
        share = energy_in_region(cam, mask)
        region_energy = None if not np.isfinite(share) else float(share)
        if region_kind == "forbidden":
            forbidden = check_forbidden_region(cam, mask, settings.forbidden_threshold)
    provenance = make_provenance(
        method=method,
        layers=[subject.layer],
        target=target_label,
        model_name=subject.model_name,
        weights_sha256=subject.weights_sha256,
        preprocessing=subject.preprocessing,
        mode="evidence",
        source=source,
        options={
            "checks": list(checks),
            "settings": settings.to_dict(),
            "target_index": target_index,
            "class_names": list(subject.class_names),
            "input_shape": list(subject.inputs.shape),
            "model_source": subject.model_source,
            "region_kind": region_kind if mask is not None else None,
            "region_pixels": None if mask is None else int(mask.sum()),
        },
    )
    return EvidenceReport(
        method=method,
        layer=subject.layer,
        model_name=subject.model_name,
        target=target_label,
        target_index=target_index,
        class_names=subject.class_names,
        image=subject.image,
        probabilities=probabilities,
        maps=maps,
        settings=settings,
        provenance=provenance,
        checks=checks,
        deletion=results.get("deletion"),
        insertion=results.get("insertion"),
        randomisation=results.get("randomisation"),
        agreements=agreements,
        region_kind=region_kind,
        region_mask=mask,
        region=results.get("region"),
        region_energy=region_energy,
        forbidden=forbidden,
        timings=timings,
    )


@dataclass(frozen=True)
class EvidenceEstimate:
    """What an evidence run will cost, measured before it starts.

    ``per_check`` holds the forward-pass equivalents of each stage (a backward pass counts as
    one more; the same numbers the progress bar counts), ``forward_passes`` their sum for one
    sample, ``seconds_per_pass`` one timed forward pass of the sample (after a warm-up pass),
    and ``samples`` how many samples a whole-volume run repeats it for.
    """

    per_check: dict[str, int]
    seconds_per_pass: float
    samples: int = 1

    @property
    def forward_passes(self) -> int:
        return sum(self.per_check.values())

    @property
    def seconds(self) -> float:
        return self.forward_passes * self.seconds_per_pass * self.samples

    def describe(self) -> str:
        """One line for the terminal, before the run starts."""
        per_sample = f"{self.forward_passes} forward passes x {1000 * self.seconds_per_pass:.1f} ms"
        many = f"{self.samples} samples x " if self.samples != 1 else ""
        return (f"estimate: about {_duration(self.seconds)} ({many}{per_sample}; "
                + ", ".join(f"{name} {cost}" for name, cost in self.per_check.items()) + ")")


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _timed_forward(subject: _Subject, batch_size: int) -> float:
    """Seconds per sample of a forward pass of ``batch_size`` copies of the sample, as the
    checks batch them (the faster of two timings, after a warm-up pass)."""
    model = subject.model
    with preserved_model_state(model), torch.no_grad():
        dtype, device = model_dtype_device(model)
        inputs = subject.inputs.to(device=device, dtype=dtype)
        batch = inputs.expand(batch_size, *inputs.shape[1:]).contiguous()
        model(batch)
        timings = []
        for _ in range(2):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            started = time.perf_counter()
            model(batch)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            timings.append(time.perf_counter() - started)
        return min(timings) / batch_size


def estimate_evidence(
    model: LoadedModel | nn.Module,
    x: object,
    *,
    layer: str | None = None,
    checks: Iterable[str] | str = DEFAULT_CHECKS,
    region_mask: object = None,
    method: str = "gradcam",
    settings: EvidenceSettings | None = None,
    samples: int = 1,
) -> EvidenceEstimate:
    """How long :func:`run_evidence` with these arguments will take, from a timed forward pass.

    Takes the same arguments (and validates them the same way), times one forward pass of a
    batch of ``settings.batch_size`` copies of ``x`` (the checks run in such batches; a lone
    sample is several times slower per sample on a CPU) and multiplies by the forward-pass
    equivalents of the chosen checks. ``samples`` multiplies it for a run over many slices or
    windows.
    """
    settings = settings or EvidenceSettings()
    chosen = _checked_checks(checks, region_mask)
    subject = _prepare(model, x, layer, method)
    _region_mask(region_mask, tuple(subject.inputs.shape[2:]))
    per_check = dict([("map", 2), *_costs(chosen, subject, settings)])
    return EvidenceEstimate(per_check, _timed_forward(subject, settings.batch_size),
                            max(1, int(samples)))


def run_evidence(
    model: LoadedModel | nn.Module,
    x: object,
    *,
    layer: str | None = None,
    target: object = None,
    checks: Iterable[str] | str = DEFAULT_CHECKS,
    region_mask: object = None,
    region_kind: RegionKind = "evidence",
    method: str = "gradcam",
    settings: EvidenceSettings | None = None,
    source: str | None = None,
    export_folder: str | Path | None = None,
    overwrite: bool = False,
    progress: ProgressCallback | None = None,
    should_stop: StopCallback | None = None,
) -> EvidenceReport:
    """:func:`evidence_job`, drained (scripts, command line, tests).

    ``progress(done, total, stage)`` is called within and between checks; ``should_stop()``
    is polled before every batch and raises :class:`Cancelled`. With ``export_folder`` the
    report is written there (:meth:`EvidenceReport.export`) only when every check finished,
    so a cancelled or failed run writes nothing.
    """
    job = evidence_job(model, x, layer=layer, target=target, checks=checks,
                       region_mask=region_mask, region_kind=region_kind, method=method,
                       settings=settings, source=source, progress=progress,
                       should_stop=should_stop)
    report: EvidenceReport = run_job(job, progress)  # the job itself polls should_stop
    if export_folder is not None:
        report.export(export_folder, overwrite=overwrite)
    return report
