"""Figures of an evidence report, drawn with matplotlib on a Figure the caller owns.

The same functions draw into a file (:meth:`napari_gradcam.evidence.report.EvidenceReport.
export`, Agg renderer, no display) and into the evidence widget's canvas. Matplotlib is
imported by the caller that makes the Figure, not here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from napari_gradcam.evidence.checks import CHECK_TITLES

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from napari_gradcam.evidence.report import EvidenceReport

__all__ = ["MAP_COLUMNS", "maps_figure_size", "plot_deletion_insertion", "plot_maps",
           "plot_randomisation"]


MAP_COLUMNS = 4
"""Panels per row in the maps figure."""


def maps_figure_size(count: int) -> tuple[float, float]:
    panels = 1 + count
    columns = min(panels, MAP_COLUMNS)
    return 2.8 * columns, 3.0 * -(-panels // columns)


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
