"""The evidence report: what one run measured, its verdicts, and the files for a supplement.

:class:`EvidenceReport` holds the results of the checks on one sample
(:mod:`napari_gradcam.evidence.running` builds it), turns them into a verdict table
(:meth:`EvidenceReport.rows`: a measured number, what it is compared with, pass / FAIL /
info), a summary that travels with every map (:func:`evidence_summary`) and a report folder
(:meth:`EvidenceReport.export`: CSV, JSON, provenance, the maps and, through
:mod:`napari_gradcam.evidence.figures`, PNG figures).

The region energy is :func:`napari_gradcam.core.metrics.energy_share` (the share of the map's
positive mass inside the region), the number the label table and the model cards call
"energy share" too.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from napari_gradcam.core.evidence import (
    AgreementResult,
    DeletionInsertionResult,
    ForbiddenRegionResult,
    RandomisationResult,
    RegionTestResult,
)
from napari_gradcam.core.provenance import make_provenance
from napari_gradcam.evidence.checks import CHECK_TITLES, EvidenceSettings, RegionKind

__all__ = [
    "EvidenceReport",
    "EvidenceRow",
    "evidence_summary",
    "format_value",
    "require_matplotlib",
]


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
            require_matplotlib()
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

        from napari_gradcam.evidence.figures import (
            maps_figure_size,
            plot_deletion_insertion,
            plot_maps,
            plot_randomisation,
        )

        jobs = (
            ("deletion_insertion_png", plot_deletion_insertion, (8.0, 3.4)),
            ("randomisation_png", plot_randomisation, (9.0, 5.0)),
            ("maps_png", plot_maps, maps_figure_size(len(self.maps))),
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



def require_matplotlib() -> None:
    """Raise an ImportError that says what to do when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as error:  # pragma: no cover - matplotlib is installed with napari
        raise ImportError("figures need matplotlib: pip install matplotlib (or export with "
                          "figures=False for the numbers only)") from error
