"""The "Grad-CAM evidence" dock widget: is the heatmap on screen evidence? Test it, export it.

Choose a model, a layer and a target as in the explainer; the widget takes the current image
(or the current slice / window of a stack) of the chosen image layer, optionally a region from
a Labels or Shapes layer, and drains :func:`napari_gradcam.evidence.evidence_job` (the
generator every shell drains: ``(done, total, stage)`` per batch) in a napari generator worker:
the GUI stays responsive, a progress bar names the running check, *Run* becomes *Cancel*
(cancelling closes the job, whose running check stops before its next batch; nothing is added).
The verdicts fill a table, the deletion/insertion and randomisation curves an embedded
matplotlib canvas, and the maps of the other methods (occlusion, gradients, Integrated
Gradients...) are added as image layers placed exactly on the source (its scale, translate,
rotation, units), each with its provenance in the layer metadata. A map's layer name holds
everything that changes it (source, map, target, model and layer), so a run with another model
or target adds new layers and only a rerun with identical settings replaces its own earlier
ones. *Export …* writes the report folder (figures, CSV/JSON numbers, provenance) for a paper's
supplement.

No computation lives here; the source layer, its transforms and the current position are
captured when *Run* is pressed, so switching layers mid-run cannot misplace the result.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from napari.layers import Image, Labels, Shapes
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QGridLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from napari_gradcam._qt_common import (
    METADATA_KEY,
    ChoiceFormMixin,
    RunControlsMixin,
    displayed_plane,
    fill_layer_combo,
    image_source,
    model_summary,
    placement,
    refill_combo,
    region_mask,
)
from napari_gradcam.core.methods import METHODS, method_info
from napari_gradcam.display import MAP_COLORMAP
from napari_gradcam.evidence import (
    CHECK_TITLES,
    DEFAULT_CHECKS,
    Cancelled,
    EvidenceError,
    EvidenceReport,
    EvidenceSettings,
    evidence_job,
    format_value,
    plot_deletion_insertion,
    plot_randomisation,
)
from napari_gradcam.jobs import (
    ExplainRequest,
    ImageSource,
    Plan,
    TargetChoice,
    plan_explanation,
    read_slab,
    to_model_input,
)

if TYPE_CHECKING:
    import napari

    from napari_gradcam.core.models import LoadedModel

# METADATA_KEY is the explainer's key: provenance (with ``options.origin`` and
# ``options.source_shape``), so the explainer's label table can use these maps too.
EVIDENCE_KEY = "napari_gradcam_evidence"
"""The verdict table of the run that made a layer."""
PREDICTED = "predicted class"
SELECTABLE_CHECKS = ("deletion", "insertion", "randomisation", "occlusion", "saliency",
                     "smoothgrad", "integrated_gradients", "score_cam")
CAM_METHODS = tuple(name for name in METHODS if method_info(name).needs_layer)
"""Methods that explain a target layer: the ones whose map the evidence checks can test."""
REGION_KINDS = {
    "evidence": "where the evidence is (crack, precipitate)",
    "forbidden": "must not matter (scale bar, label, holder)",
}

try:  # the curves need matplotlib; without it the table still works
    from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
    from matplotlib.figure import Figure
except ImportError:  # pragma: no cover - matplotlib comes with the napari extra
    FigureCanvasQTAgg = None
    Figure = None


@dataclass
class CapturedSample:
    """The one sample a run explains, cut from the source layer when *Run* was pressed.

    ``data``: float32 values ``(*spatial)`` (or ``(C, *spatial)`` for RGB into a 3-channel
    model), cut and converted the job's way (:func:`~napari_gradcam.jobs.read_slab`,
    :func:`~napari_gradcam.jobs.to_model_input`);
    ``origin``: data index of its first pixel in the source (one per non-channel axis);
    ``map_shape``: the shape a map layer gets (1 along the fixed axes), so a map of a slice
    sits on that slice; ``placement``: the layer kwargs that put it there.
    """

    name: str
    data: np.ndarray
    region: np.ndarray | None
    origin: tuple[int, ...]
    map_shape: tuple[int, ...]
    source_shape: tuple[int, ...]
    placement: dict[str, Any]


class EvidenceWidget(ChoiceFormMixin, RunControlsMixin, QWidget):
    """Grad-CAM evidence dock widget (see the module docstring)."""

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.loaded: LoadedModel | None = None
        self.report: EvidenceReport | None = None
        self.worker: Any = None
        self.result_layers: list[str] = []
        self._pending: CapturedSample | None = None
        self._model_cache: dict[tuple[str, bool], LoadedModel] = {}
        self._job: Any = None
        self._build()
        self._connect_layer_lists()
        self._fill_models()
        self._refresh_layers()

    # ---------------------------------------------------------------------------------------
    # Construction

    def _build(self) -> None:
        layout = QVBoxLayout(self)
        form = QFormLayout()
        layout.addLayout(form)
        self._build_choice_rows(
            form, CAM_METHODS, region_tooltip="Optional: a Labels or Shapes layer marking a "
            "region (non-zero pixels) of the current image.")
        self.region_kind_combo = QComboBox()
        for key, text in REGION_KINDS.items():
            self.region_kind_combo.addItem(text, key)
        form.addRow("Region is", self.region_kind_combo)

        checks_box = QGroupBox("Checks")
        grid = QGridLayout(checks_box)
        self.check_boxes: dict[str, QCheckBox] = {}
        for number, name in enumerate(SELECTABLE_CHECKS):
            box = QCheckBox(CHECK_TITLES[name])
            box.setChecked(name in DEFAULT_CHECKS)
            self.check_boxes[name] = box
            grid.addWidget(box, number // 2, number % 2)
        layout.addWidget(checks_box)
        options = QFormLayout()
        self.steps_spin = QSpinBox()
        self.steps_spin.setRange(5, 500)
        self.steps_spin.setValue(EvidenceSettings().steps)
        self.steps_spin.setToolTip("points of the deletion / insertion curves")
        options.addRow("Curve steps", self.steps_spin)
        self.random_spin = QSpinBox()
        self.random_spin.setRange(1, 20)
        self.random_spin.setValue(EvidenceSettings().n_random)
        self.random_spin.setToolTip("random pixel orders averaged into the baseline")
        options.addRow("Random orders", self.random_spin)
        layout.addLayout(options)

        self._build_run_controls(layout)
        self.stage_label = QLabel("")
        layout.addWidget(self.stage_label)

        self.results_tabs = QTabWidget()
        self.table = QTableWidget(0, 5)
        self.table.setHorizontalHeaderLabels(["check", "measure", "value", "reference",
                                              "verdict"])
        self.table.horizontalHeader().setStretchLastSection(True)
        self.results_tabs.addTab(self.table, "Summary")
        self.curves_canvas = self._canvas()
        self.randomisation_canvas = self._canvas()
        for canvas, title in ((self.curves_canvas, "Curves"),
                              (self.randomisation_canvas, "Randomisation")):
            if canvas is not None:
                self.results_tabs.addTab(canvas, title)
            else:
                note = QLabel("install matplotlib to see the curves")
                self.results_tabs.addTab(note, title)
        layout.addWidget(self.results_tabs, 1)
        buttons = QHBoxLayout()
        self.export_button = QPushButton("Export …")
        self.export_button.setToolTip("Write figures (PNG), numbers (CSV, JSON) and provenance "
                                      "into a folder")
        self.export_button.clicked.connect(self._on_export_clicked)
        self.export_button.setEnabled(False)
        buttons.addWidget(self.export_button)
        layout.addLayout(buttons)

    @staticmethod
    def _canvas() -> Any:
        if FigureCanvasQTAgg is None:
            return None
        canvas = FigureCanvasQTAgg(Figure(figsize=(5.0, 3.2), layout="constrained"))
        canvas.setMinimumHeight(240)
        return canvas

    # ---------------------------------------------------------------------------------------
    # Layer lists

    def _refresh_layers(self, *_event: object) -> None:
        refill_combo(self.image_combo, self._source_image_names())
        refill_combo(self.region_combo, [layer.name for layer in self.viewer.layers
                                         if isinstance(layer, (Labels, Shapes))], ["none"])
        self._follow_active_layer()

    # ---------------------------------------------------------------------------------------
    # Models (the combo with its trust checkbox, Browse … and loading: ModelPickerMixin)

    def use_model(self, loaded: LoadedModel) -> None:
        """Test an already loaded model (e.g. ``load_model(my_module)`` from Python)."""
        card = loaded.card
        self.loaded = loaded
        fill_layer_combo(self.layer_combo, loaded)
        self.target_combo.clear()
        if card.task != "segmentation":
            self.target_combo.addItem(PREDICTED, None)
        for index, name in enumerate(card.class_names):
            self.target_combo.addItem(name, index)
        self.model_info.setText(model_summary(card))
        self.model_info.setToolTip(model_summary(card))

    # ---------------------------------------------------------------------------------------
    # Capturing the sample

    def capture(self) -> CapturedSample:
        """Cut the current image / slice / window from the chosen layer; ValueError if unfit."""
        if self.loaded is None:
            raise ValueError("Choose a model first (a demo model or Browse for a card / .pt2).")
        layer = self._layer(self.image_combo.currentText())
        if not isinstance(layer, Image):
            active = self.viewer.layers.selection.active
            what = (f"the active layer {active.name!r} is a {type(active).__name__} layer"
                    if active is not None else "there is no image layer")
            raise ValueError(f"Select an image layer to test ({what}).")
        source = image_source(self.viewer, layer)
        class_index = self.target_combo.currentData()
        target = TargetChoice("predicted") if class_index is None else TargetChoice(
            "class", class_index=int(class_index))
        request = ExplainRequest(method=self.method_combo.currentText(), mode="current",
                                 plane=displayed_plane(self.viewer, layer), target=target,
                                 layer=self.layer_combo.currentData())
        plan = plan_explanation(self.loaded, source, request)
        if plan.sample_axis is not None:  # 1D models on a stack: the current row only
            axis = plan.sample_axis
            plan = replace(plan, sample_axis=None,
                           fixed={**plan.fixed, axis: source.index()[axis]})
        shape = source.shape
        sample = to_model_input(read_slab(source, plan, 0, 1), source,
                                self.loaded.card.in_channels)[0]
        origin = plan.origin(shape)
        return CapturedSample(
            name=layer.name, data=sample, region=self._region(source, plan), origin=origin,
            map_shape=plan.out_shape(shape), source_shape=shape,
            placement=placement(layer, origin),
        )

    def _region(self, source: ImageSource, plan: Plan) -> np.ndarray | None:
        """The region layer's pixels in the captured sample; None when no region is chosen."""
        layer = self._layer(self.region_combo.currentText())
        if layer is None:
            return None
        mask = region_mask(layer, source.shape, source.name)
        region = read_slab(source, plan, 0, 1, data=mask, channels=False)[0]
        if not region.any():
            raise ValueError(f"the region layer {layer.name!r} has no pixels in the current "
                             "image / slice; paint the region there or choose 'none'")
        return region

    def settings(self) -> EvidenceSettings:
        """The evidence settings the widget's controls describe."""
        return EvidenceSettings(steps=self.steps_spin.value(), n_random=self.random_spin.value())

    def chosen_checks(self) -> tuple[str, ...]:
        return tuple(name for name, box in self.check_boxes.items() if box.isChecked())

    # ---------------------------------------------------------------------------------------
    # Running

    def run(self, *_args: object) -> Any:
        """Start a run (or cancel the running one). Returns the worker, or None."""
        if self.worker is not None:
            self.cancel()
            return None
        try:
            sample = self.capture()
            job = evidence_job(
                self.loaded, sample.data,
                layer=self.layer_combo.currentData() or None,
                target=self.target_combo.currentData(),
                checks=self.chosen_checks(),
                region_mask=sample.region,
                region_kind=self.region_kind_combo.currentData(),
                method=self.method_combo.currentText(),
                settings=self.settings(),
                source=sample.name,
            )
        except (ValueError, TypeError) as error:
            show_error(str(error))
            return None
        self._pending = sample
        self._job = job
        self.stage_label.setText("starting …")
        self.export_button.setEnabled(False)
        return self._start_worker(_guarded, job)

    def _on_progress(self, value: tuple[int, int, str]) -> None:
        done, total, stage = value
        if self.worker is None:
            return
        self.progress_bar.setRange(0, max(int(total), 1))
        self.progress_bar.setValue(int(done))
        title = CHECK_TITLES.get(stage, {"map": "computing the map", "done": "done"}.get(
            stage, stage))
        self.stage_label.setText(f"{title} ({done}/{total})")

    def _on_returned(self, report: EvidenceReport | None) -> None:
        sample = self._pending
        if report is None or sample is None:
            return
        try:
            self._show(sample, report)
        except Exception as error:  # adding a layer must never take the widget down
            show_error(f"Could not show the evidence: {error}")

    def _on_errored(self, error: BaseException) -> None:
        show_error(str(error) if isinstance(error, EvidenceError)
                   else f"The evidence run failed: {type(error).__name__}: {error}")

    def _on_finished(self) -> None:
        job, self._job = self._job, None
        if job is not None:
            # A cancelled worker leaves the job suspended at a yield; closing it stops the
            # running check before its next batch (and restores the model) before a new run
            # can start. A finished or failed job closes at no cost.
            job.close()
        self._end_run("Evidence run cancelled; nothing was added.")
        self.stage_label.setText("")
        self.export_button.setEnabled(self.report is not None)

    # ---------------------------------------------------------------------------------------
    # Results

    @staticmethod
    def layer_name(source: str, map_name: str, report: EvidenceReport) -> str:
        """``source · evidence · map · target · model:layer``: everything that changes the map.

        Two runs share a name only when source, map, target, model and layer are the same (the
        predicted class and the same class chosen by name give the same map, and the same
        name), so only such a rerun replaces its own earlier layers.
        """
        return (f"{source} · evidence · {map_name} · {target_words(report)} · "
                f"{report.model_name}:{report.layer}")

    def _show(self, sample: CapturedSample, report: EvidenceReport) -> None:
        self.report = report
        summary = [
            {"check": row.check, "measure": row.measure, "value": row.value,
             "reference": row.reference, "verdict": row.verdict}
            for row in report.rows()
        ]
        names = []
        for map_name, values in report.maps.items():
            name = self.layer_name(sample.name, map_name, report)
            metadata = {
                METADATA_KEY: report.map_provenance(
                    map_name, origin=list(sample.origin),
                    source_shape=list(sample.source_shape)),
                EVIDENCE_KEY: {"passed": report.passed, "summary": summary},
            }
            data = np.asarray(values, dtype=np.float32).reshape(sample.map_shape)
            low, high = float(data.min()), float(data.max())
            signed = low < 0
            limit = max(abs(low), abs(high)) or 1.0
            existing = self._layer(name)
            if existing is not None and self._is_result(existing):
                self.viewer.layers.remove(existing)  # our own map of identical settings
            self.viewer.add_image(
                data, name=name, metadata=metadata,
                colormap="bwr" if signed else MAP_COLORMAP,
                contrast_limits=(-limit, limit) if signed else (0.0, high if high > 0 else 1.0),
                blending="translucent" if signed else "additive",
                opacity=0.6, visible=map_name == report.method,
                **sample.placement,
            )
            names.append(name)
        self.result_layers = names
        self._fill_table(report)
        if self.curves_canvas is not None:
            plot_deletion_insertion(report, self.curves_canvas.figure)
            self.curves_canvas.draw_idle()
        if self.randomisation_canvas is not None:
            plot_randomisation(report, self.randomisation_canvas.figure)
            self.randomisation_canvas.draw_idle()
        verdict = "every check passed" if report.passed else "some checks FAILED (see table)"
        show_info(f"Evidence for {report.target}: {verdict}.")

    def _fill_table(self, report: EvidenceReport) -> None:
        rows = report.rows()
        self.table.setRowCount(len(rows))
        for r, row in enumerate(rows):
            cells = (row.check, row.measure, format_value(row.value),
                     "" if row.reference is None else format_value(row.reference), row.verdict)
            for c, text in enumerate(cells):
                item = QTableWidgetItem(text)
                item.setFlags(item.flags() & ~Qt.ItemFlag.ItemIsEditable)
                if c == 4:
                    item.setToolTip(row.criterion)
                self.table.setItem(r, c, item)
        self.table.resizeColumnsToContents()

    def table_rows(self) -> list[list[str]]:
        """The summary table as shown (for tests and copy-paste)."""
        return [[self.table.item(r, c).text() for c in range(self.table.columnCount())]
                for r in range(self.table.rowCount())]

    # ---------------------------------------------------------------------------------------
    # Export

    def _on_export_clicked(self, *_args: object) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Folder for the evidence report")
        if folder:
            self.export(folder)

    def export(self, folder: str | Path) -> Path | None:
        """Write the last report (figures, numbers, provenance) into ``folder``.

        The user chose the folder, so an earlier report there is replaced.
        """
        if self.report is None:
            show_error("Run the evidence checks first; there is nothing to export yet.")
            return None
        try:
            self.report.export(folder, overwrite=True)
        except (OSError, ImportError, ValueError) as error:
            show_error(f"Could not write the report to {folder}: {error}")
            return None
        show_info(f"Evidence report written to {folder}")
        return Path(folder)


def target_words(report: EvidenceReport) -> str:
    """The target as a layer name says it: the class name, else ``class i``, else the
    report's description (a region or a callable)."""
    index, names = report.target_index, report.class_names
    if index is None:
        return report.target
    return str(names[index]) if 0 <= index < len(names) else f"class {index}"


def _guarded(job: Any) -> Any:
    """Run the job in the worker: a cancel returns None, any failure becomes EvidenceError.

    :class:`Cancelled` and torch's model errors are RuntimeErrors, which Qt workers take for
    "the worker was deleted" and swallow (no ``finished`` signal): never let one escape.
    """
    try:
        return (yield from job)
    except Cancelled:
        return None
    except EvidenceError:
        raise
    except Exception as error:
        raise EvidenceError(f"The evidence run failed: {type(error).__name__}: {error}"
                            ) from error
