"""The napari dock widget: gather choices, run a job in a thread, turn results into layers.

No computation lives here: the job (:func:`napari_gradcam.jobs.explain_job`) is a generator
that yields progress and returns maps, predictions and provenance; this widget captures what
it needs from the viewer when *Run* is pressed (the source layer's data, transforms and
current position, so switching layers mid-run cannot misplace the result), runs the job in a
napari thread worker (the GUI stays responsive, *Run* becomes *Cancel*, cancelling stops before
the next batch and adds nothing), and finally adds or updates one layer per map.

Also here: Alt-click (or Ctrl-click) on the image explains the plane / window / predicted
region under the cursor; hovering a result layer shows the CAM value and the predicted class in
the status bar; and a per-label table of a CAM inside a Labels layer (stored in that Labels
layer's ``features`` -- the one change this plugin makes to a user's layer, on request --
and exportable to CSV).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from napari.layers import Image, Labels, Shapes
from napari.utils.notifications import show_error, show_warning
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
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
    ALL_LABELS,
    METADATA_KEY,
    ChoiceFormMixin,
    RefreshingComboBox,
    RunControlsMixin,
    displayed_plane,
    fill_layer_combo,
    image_source,
    is_result_layer,
    label_value_text,
    label_values,
    placement,
    refill_combo,
    region_mask,
)
from napari_gradcam.core.device import available_devices
from napari_gradcam.core.labels_stats import as_features, label_statistics, write_csv
from napari_gradcam.core.methods import METHODS, method_info
from napari_gradcam.display import MAP_COLORMAP, MAP_OPACITY
from napari_gradcam.jobs import (
    ExplainRequest,
    ExplainResult,
    ImageSource,
    JobError,
    TargetChoice,
    contrast_limits,
    explain_job,
    is_regression_card,
    plan_explanation,
)

if TYPE_CHECKING:
    import napari

    from napari_gradcam.core.models import LoadedModel

COLORMAPS = (MAP_COLORMAP, "inferno", "magma", "hot", "viridis", "turbo")
"""The shared map colormap first (:mod:`napari_gradcam.display` says why: black at zero for
additive blending, one hue over grey CT, apart from napari's label colours), so a map made here
looks like the same map opened from a file."""
MODE_LABELS = {
    "current": "current slice / window",
    "slices": "every slice along axis",
    "windows": "3D windows",
}
CLICK_MODIFIERS = ("Alt", "Control")
PREDICTED, ALL_CLASSES = "predicted class", "all classes"
UNCERTAINTY_CHOICES = {
    "off": (),
    "flips": ("flips",),
    "flips + shifts": ("flips", "shifts"),
    "flips + shifts + dropout": ("flips", "shifts", "dropout"),
}
"""The Uncertainty row: which variations of each batch are explained too (each one costs a
run per variant: flips 1 per axis, shifts 4 per axis, dropout 8)."""
UNCERTAINTY_SUFFIX = " · uncertainty"
"""An uncertainty layer is named after its map with this suffix."""


def regression_entries(card: Any) -> list[tuple[str, tuple[object, ...]]]:
    """Target entries "increases <property>" / "decreases <property>", one pair per output.

    Offered for regression cards (their ``class_names`` name the predicted properties) and for
    classifiers whose outputs have no names (a head loaded from Python: "class 0"... were filled
    in), whose outputs may be predicted values; never for segmentation models.
    """
    if card.task == "segmentation":
        return []
    names = list(card.class_names)
    unnamed = names == [f"class {i}" for i in range(len(names))]
    if not is_regression_card(card) and not unnamed:
        return []
    entries = []
    for index, name in enumerate(names):
        shown = f"output {index}" if unnamed else name
        for sign, word in ((1, "increases"), (-1, "decreases")):
            entries.append((f"{word} {shown}", ("regression", index, sign, shown)))
    return entries


def _modifier_names(event: Any) -> set[str]:
    names = set()
    for modifier in getattr(event, "modifiers", ()) or ():
        names.add(getattr(modifier, "name", None) or str(modifier))
    return names


@dataclass(frozen=True)
class _Capture:
    """The source layer as it was when a run started: its data and where its maps go.

    ``placement``: the layer kwargs for the maps (the layer's transforms, copied at *Run*,
    shifted to the origin of the part explained).
    """

    name: str
    source: ImageSource
    placement: dict[str, Any]


class GradCAMWidget(ChoiceFormMixin, RunControlsMixin, QWidget):
    """Grad-CAM explainer dock widget (see the module docstring)."""

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.loaded: LoadedModel | None = None
        self.worker: Any = None
        self.last_result: ExplainResult | None = None
        self.last_table: dict[str, np.ndarray] | None = None
        self._results: dict[str, ExplainResult] = {}
        self._model_cache: dict[tuple[str, bool, str], LoadedModel] = {}
        self._pending: tuple[_Capture, ExplainRequest] | None = None
        self._build()
        self._connect_viewer()
        self._fill_models()
        self._refresh_layers()

    # ---------------------------------------------------------------------------------------
    # Construction

    def _build(self) -> None:
        self.setMaximumWidth(480)
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        self.tabs = QTabWidget()
        outer.addWidget(self.tabs)
        explain_tab, labels_tab = QWidget(), QWidget()
        self.tabs.addTab(explain_tab, "Explain")
        self.tabs.addTab(labels_tab, "CAM inside labels")
        layout = QVBoxLayout(explain_tab)
        form = QFormLayout()
        layout.addLayout(form)

        self._build_choice_rows(
            form, METHODS, region_tooltip="Segmentation models: explain the class inside the "
            "chosen labels of a Labels layer or inside Shapes.")
        self.region_value_combo = RefreshingComboBox(self._fill_region_values)
        self.region_value_combo.setToolTip(
            "Which labels of the region layer are the region (e.g. only the crack, label 2), "
            "or all non-zero labels.")
        form.addRow("Region labels", self.region_value_combo)
        self.region_combo.currentIndexChanged.connect(self._fill_region_values)

        self.mode_combo = QComboBox()
        for key, text in MODE_LABELS.items():
            self.mode_combo.addItem(text, key)
        self.channel_combo = QComboBox()
        self.channel_combo.setToolTip(
            "Multi-channel data: the axis whose entries are the model's input channels (its "
            "length must equal the model's channels). Other extra axes stay at the current "
            "position.")
        self.channel_label = QLabel("Channel axis")
        form.addRow(self.channel_label, self.channel_combo)
        self._channel_key: tuple[object, ...] | None = None
        self.image_combo.currentIndexChanged.connect(self._refresh_channel_axes)
        form.addRow("Mode", self.mode_combo)
        self.mode_combo.currentIndexChanged.connect(self._enable_mode_options)
        self.axis_spin = QSpinBox()
        self.axis_spin.setRange(0, 8)
        form.addRow("Slice axis", self.axis_spin)
        window_row = QHBoxLayout()
        self.window_spins = []
        for _ in range(3):
            spin = QSpinBox()
            spin.setRange(4, 1024)
            spin.setValue(32)
            self.window_spins.append(spin)
            window_row.addWidget(spin)
        self.overlap_spin = QDoubleSpinBox()
        self.overlap_spin.setRange(0.0, 0.9)
        self.overlap_spin.setSingleStep(0.05)
        self.overlap_spin.setValue(0.25)
        form.addRow("Window", window_row)
        form.addRow("Overlap", self.overlap_spin)
        uncertainty_row = QHBoxLayout()
        self.uncertainty_combo = QComboBox()
        for text, sources in UNCERTAINTY_CHOICES.items():
            self.uncertainty_combo.addItem(text, sources)
        self.uncertainty_combo.setToolTip(
            "Also make an uncertainty layer: the per-pixel spread of the map when the input "
            "is mirrored (flips), moved by 1-2 px (shifts) or explained with the model's "
            "dropout on (MC dropout). Each variant costs one more explanation.")
        self.windows_uncertainty_check = QCheckBox("+ windows")
        self.windows_uncertainty_check.setToolTip(
            "3D windows mode: add the disagreement between overlapping windows (how much the "
            "map depends on the context each window includes).")
        uncertainty_row.addWidget(self.uncertainty_combo)
        uncertainty_row.addWidget(self.windows_uncertainty_check)
        form.addRow("Uncertainty", uncertainty_row)
        self.batch_spin = QSpinBox()
        self.batch_spin.setRange(1, 512)
        self.batch_spin.setValue(8)
        form.addRow("Batch size", self.batch_spin)
        self.device_combo = QComboBox()
        self.device_combo.addItems(available_devices())
        form.addRow("Device", self.device_combo)
        self.colormap_combo = QComboBox()
        self.colormap_combo.addItems(list(COLORMAPS))
        self.opacity_spin = QDoubleSpinBox()
        self.opacity_spin.setRange(0.0, 1.0)
        self.opacity_spin.setSingleStep(0.1)
        self.opacity_spin.setValue(MAP_OPACITY)
        display_row = QHBoxLayout()
        display_row.addWidget(self.colormap_combo)
        display_row.addWidget(QLabel("opacity"))
        display_row.addWidget(self.opacity_spin)
        form.addRow("Display", display_row)

        for row, name in enumerate(METHODS):  # what each method is and costs, on hover
            info = method_info(name)
            self.method_combo.setItemData(
                row, f"{info.title or name}: {info.cost}. {info.reference}".strip(),
                Qt.ItemDataRole.ToolTipRole)

        self._build_run_controls(layout)
        hint = QLabel("Alt-click on the image: explain what is under the cursor.")
        hint.setWordWrap(True)
        layout.addWidget(hint)

        predictions_box = QGroupBox("Predictions")
        predictions_layout = QVBoxLayout(predictions_box)
        self.predictions_title = QLabel("run a model to see its predictions")
        predictions_layout.addWidget(self.predictions_title)
        self.predictions_table = QTableWidget(0, 2)
        self.predictions_table.setHorizontalHeaderLabels(["class", "probability"])
        self.predictions_table.setMinimumHeight(110)
        self.predictions_table.horizontalHeader().setStretchLastSection(True)
        predictions_layout.addWidget(self.predictions_table)
        layout.addWidget(predictions_box)
        layout.addStretch(1)

        labels_layout = QVBoxLayout(labels_tab)
        labels_intro = QLabel("Per-label statistics of a CAM inside a Labels layer. The table "
                              "is also written to the Labels layer's features.")
        labels_intro.setWordWrap(True)
        labels_layout.addWidget(labels_intro)
        labels_form = QFormLayout()
        labels_layout.addLayout(labels_form)
        self.cam_combo = QComboBox()
        labels_form.addRow("CAM layer", self.cam_combo)
        self.labels_combo = QComboBox()
        labels_form.addRow("Labels layer", self.labels_combo)
        self.tolerance_spin = QDoubleSpinBox()
        self.tolerance_spin.setRange(0.0, 1000.0)
        self.tolerance_spin.setToolTip("pointing-game tolerance, in the layer's units")
        labels_form.addRow("Tolerance", self.tolerance_spin)
        buttons = QHBoxLayout()
        self.table_button = QPushButton("Label table")
        self.table_button.clicked.connect(self.compute_label_table)
        self.export_button = QPushButton("Export CSV …")
        self.export_button.clicked.connect(self._on_export_clicked)
        buttons.addWidget(self.table_button)
        buttons.addWidget(self.export_button)
        labels_form.addRow(buttons)
        self.labels_table = QTableWidget(0, 0)
        labels_layout.addWidget(self.labels_table, 1)

    def _connect_viewer(self) -> None:
        self._connect_layer_lists()
        self.viewer.dims.events.current_step.connect(self._update_predictions_view)
        self.viewer.mouse_drag_callbacks.append(self._on_mouse_press)
        self.destroyed.connect(self._disconnect_viewer_factory())

    def _disconnect_viewer_factory(self) -> Any:
        viewer_ref = weakref.ref(self.viewer)
        callback = self._on_mouse_press

        def disconnect() -> None:
            viewer = viewer_ref()
            if viewer is not None and callback in viewer.mouse_drag_callbacks:
                viewer.mouse_drag_callbacks.remove(callback)

        return disconnect

    # ---------------------------------------------------------------------------------------
    # Layer lists

    def _refresh_layers(self, *_event: object) -> None:
        refill_combo(self.image_combo, self._source_image_names())
        refill_combo(self.region_combo, [layer.name for layer in self.viewer.layers
                                         if isinstance(layer, (Labels, Shapes))], ["none"])
        self._fill_region_values()
        refill_combo(self.labels_combo, [layer.name for layer in self.viewer.layers
                                         if isinstance(layer, Labels)])
        refill_combo(self.cam_combo, [layer.name for layer in self.viewer.layers
                                      if is_result_layer(layer)])
        self._follow_active_layer()
        self._refresh_channel_axes()

    def _fill_region_values(self, *_args: object) -> None:
        """Offer "all non-zero labels" and each label value present in the region layer.

        Refilled when the region layer changes and just before the list opens (labels
        painted meanwhile appear); the chosen value is kept while it is still present. Only
        a Labels region of a segmentation model has values to choose from.
        """
        combo = self.region_value_combo
        region = self._layer(self.region_combo.currentText())
        values = label_values(region) if isinstance(region, Labels) else []
        chosen = combo.currentData()
        combo.blockSignals(True)
        combo.clear()
        combo.addItem(ALL_LABELS, None)
        for value in values:
            combo.addItem(label_value_text(region, value), value)
        if chosen in values:
            combo.setCurrentIndex(combo.findData(chosen))
        combo.blockSignals(False)
        combo.setEnabled(isinstance(region, Labels) and self.region_combo.isEnabled())

    def _refresh_channel_axes(self, *_args: object) -> None:
        """Offer the axes that can hold the model's channels ("none" + every axis).

        Shown only where the choice matters: data with 4 or more axes, or a multi-channel
        model and an axis of its channel count. The default is an extra axis (not one of the
        model's spatial axes) whose length equals the model's channels; the user's choice is
        kept until the layer's shape or the model changes.
        """
        layer = self._layer(self.image_combo.currentText())
        shape: tuple[int, ...] = ()
        if isinstance(layer, Image) and not layer.rgb:
            shape = tuple(int(s) for s in (layer.data[0] if layer.multiscale
                                           else layer.data).shape)
        card = self.loaded.card if self.loaded is not None else None
        channels = int(card.in_channels) if card is not None else 1
        dims = int(card.spatial_dims) if card is not None else 2
        matching = [a for a, size in enumerate(shape) if size == channels]
        relevant = len(shape) >= 4 or (channels > 1 and bool(matching))
        self.channel_combo.setVisible(relevant)
        self.channel_label.setVisible(relevant)
        self.channel_combo.setEnabled(relevant)
        key = (shape, channels, dims, layer.name if layer is not None else None)
        if key == self._channel_key:
            return
        self._channel_key = key
        labels = tuple(layer.axis_labels) if isinstance(layer, Image) else ()
        self.channel_combo.blockSignals(True)
        self.channel_combo.clear()
        self.channel_combo.addItem("none", None)
        for axis, size in enumerate(shape):
            label = labels[axis] if axis < len(labels) else str(axis)
            self.channel_combo.addItem(f"{axis}: {label} ({size})", axis)
        extra = [a for a in matching if a < len(shape) - dims]
        if channels > 1 and extra:
            self.channel_combo.setCurrentIndex(self.channel_combo.findData(extra[-1]))
        self.channel_combo.blockSignals(False)

    def _follow_active_layer(self, *_event: object) -> Any:
        """Follow the active layer: a source image in the image combo, a map in the CAM combo."""
        active = super()._follow_active_layer()
        if is_result_layer(active):
            self.cam_combo.setCurrentText(active.name)
        return active

    # ---------------------------------------------------------------------------------------
    # Models (the combo, Browse … and loading come from ModelPickerMixin)

    def _model_cache_key(self, source: str, trust: bool) -> tuple[str, bool, str]:
        """A model is reused only for the same source, trust and device choice."""
        return (source, trust, self.device_combo.currentText())

    def use_model(self, loaded: LoadedModel) -> None:
        """Explain with an already loaded model (e.g. ``load_model(my_module)`` from Python)."""
        card = loaded.card
        self.loaded = loaded
        fill_layer_combo(self.layer_combo, loaded)
        self.target_combo.clear()
        if not is_regression_card(card):
            if card.task != "segmentation":
                self.target_combo.addItem(PREDICTED, ("predicted", None))
            for index, name in enumerate(card.class_names):
                self.target_combo.addItem(name, ("class", index))
            self.target_combo.addItem(ALL_CLASSES, ("all", None))
        for text, data in regression_entries(card):
            self.target_combo.addItem(text, data)
        self.region_combo.setEnabled(card.task == "segmentation")
        self._fill_region_values()
        if card.spatial_dims == 3:
            self.mode_combo.setCurrentIndex(self.mode_combo.findData("windows"))
            for spin, size in zip(self.window_spins, card.input_size or (32, 32, 32),
                                  strict=False):
                spin.setValue(int(size))
        else:
            self.mode_combo.setCurrentIndex(self.mode_combo.findData("current"))
        self._enable_mode_options()
        self._refresh_channel_axes()
        self.model_info.setText(
            f"{card.name}: {card.task}, {card.spatial_dims}D, {card.in_channels} channel(s), "
            f"classes {', '.join(card.class_names)}. {card.description}".strip())

    def _enable_mode_options(self, *_args: object) -> None:
        """Grey out what the chosen mode and model do not use."""
        mode = self.mode_combo.currentData()
        three_d = self.loaded is not None and self.loaded.card.spatial_dims == 3
        self.axis_spin.setEnabled(mode == "slices")
        for spin in self.window_spins:
            spin.setEnabled(three_d)
        self.overlap_spin.setEnabled(three_d and mode == "windows")
        self.windows_uncertainty_check.setEnabled(three_d and mode == "windows")

    # ---------------------------------------------------------------------------------------
    # Gathering the choices

    def _gather(self, click_point: tuple[int, ...] | None = None
                ) -> tuple[_Capture, ExplainRequest]:
        """Capture the source layer and the choices now; raise ValueError on bad input."""
        if self.loaded is None:
            raise ValueError("Choose a model first (a demo model or Browse for a card / .pt2).")
        name = self.image_combo.currentText()
        layer = self._layer(name)
        if layer is None:
            raise ValueError(self._no_image_message())
        if not isinstance(layer, Image):
            raise ValueError(f"{name!r} is not an image layer.")
        source = image_source(self.viewer, layer, click_point)
        choice = self.target_combo.currentData() or ("predicted", None)
        kind, class_index = choice[0], choice[1]
        mask = None
        if click_point is not None:
            target = TargetChoice("click", point=click_point)
        elif kind == "regression":
            _kind, index, sign, property_name = choice
            target = TargetChoice("regression", output_index=index, sign=sign,
                                  property_name=property_name)
        else:
            if self.loaded.card.task == "segmentation" and kind == "class":
                region = self._layer(self.region_combo.currentText())
                region_name = None
                if region is not None and self.region_combo.isEnabled():
                    value = (self.region_value_combo.currentData()
                             if isinstance(region, Labels) else None)
                    mask = region_mask(region, source.shape, layer.name,
                                       None if value is None else (value,))
                    region_name = repr(region.name) + (
                        "" if value is None else f" label {value}")
                kind = "region"
                target = TargetChoice(kind, class_index=class_index, mask=mask,
                                      region_name=region_name)
            else:
                target = TargetChoice(kind, class_index=class_index)
        mode = "current" if click_point is not None else self.mode_combo.currentData()
        uncertainty = tuple(self.uncertainty_combo.currentData() or ())
        if (mode == "windows" and self.windows_uncertainty_check.isEnabled()
                and self.windows_uncertainty_check.isChecked()):
            uncertainty += ("windows",)
        request = ExplainRequest(
            method=self.method_combo.currentText(),
            layer=self.layer_combo.currentData() or None,
            target=target,
            mode=mode,
            axis=self.axis_spin.value() if mode == "slices" else None,
            plane=displayed_plane(self.viewer, layer),
            window=tuple(spin.value() for spin in self.window_spins),
            overlap=self.overlap_spin.value(),
            batch_size=self.batch_spin.value(),
            device=self.device_combo.currentText() or None,
            channel_axis=(self.channel_combo.currentData()
                          if self.channel_combo.isEnabled() else None),
            uncertainty=uncertainty,
        )
        plan = plan_explanation(self.loaded, source, request)
        origin = plan.origin(source.shape)  # explain_job makes this plan again: same origin
        return _Capture(layer.name, source, placement(layer, origin)), request

    def _no_image_message(self) -> str:
        """Why there is nothing to explain, and which layers could be explained.

        The layer's kind comes from ``__class__`` (not ``type()``): napari hands plugins
        proxies of its layers, whose ``type()`` is ``PublicOnlyProxy``.
        """
        active = self.viewer.layers.selection.active
        if active is not None:
            what = f"{active.name!r} is a {active.__class__.__name__} layer"
        elif len(self.viewer.layers):
            what = "no Image layer is open"
        else:
            what = "no layer is open"
        return (f"Select an image layer to explain ({what}). Grad-CAM explains Image layers "
                "(grey or RGB images, stacks, volumes, spectra); Labels and Shapes layers "
                "serve as regions for segmentation models.")

    # ---------------------------------------------------------------------------------------
    # Running

    def run(self, *_args: object, click_point: tuple[int, ...] | None = None) -> Any:
        """Start a run (or cancel the running one). Returns the worker, or None."""
        if self.worker is not None:
            self.cancel()
            return None
        try:
            capture, request = self._gather(click_point)
        except (ValueError, TypeError) as error:
            show_error(str(error))
            return None
        job = explain_job(self.loaded, capture.source, request)
        self._pending = (capture, request)
        return self._start_worker(_guarded, job)

    def _on_progress(self, value: tuple[int, int]) -> None:
        done, total = value
        self.progress_bar.setRange(0, max(int(total), 1))
        self.progress_bar.setValue(int(done))

    def _on_returned(self, result: ExplainResult) -> None:
        """Add the maps of a finished run, also when its source layer is gone.

        If the source layer was removed (or renamed, or its data replaced) during the run,
        the map is still added, where the source was (its transforms were captured at *Run*),
        with a warning saying so: the computation may have taken minutes, and the map stays
        valid for the data it was computed on. Deleting a layer is one keystroke; silently
        dropping an expensive result, or silently adding a map with no source beside it,
        would leave the user guessing.
        """
        if self._pending is None:
            return
        capture, _request = self._pending
        try:
            self._show_result(capture, result)
        except Exception as error:  # adding a layer must never take the widget down
            show_error(f"Could not add the result layer: {error}")
            return
        if not self._source_still_there(capture):
            show_warning(
                f"The layer {capture.name!r} was removed (or renamed, or its data replaced) "
                "while Grad-CAM ran. Its map was added anyway, where the layer was, because "
                "it is valid for the data it was computed on; delete it if you no longer "
                "need it.")

    def _source_still_there(self, capture: _Capture) -> bool:
        """Whether the viewer still holds the explained layer, with the data explained."""
        layer = self._layer(capture.name)
        if not isinstance(layer, Image):
            return False
        data = layer.data[0] if layer.multiscale else layer.data
        return data is capture.source.data

    def _on_errored(self, error: BaseException) -> None:
        show_error(str(error) if isinstance(error, JobError)
                   else f"The explanation failed: {type(error).__name__}: {error}")

    def _on_finished(self) -> None:
        self._end_run("Grad-CAM run cancelled; nothing was added.")

    # ---------------------------------------------------------------------------------------
    # Results → layers

    @staticmethod
    def result_name(result: ExplainResult, label: str) -> str:
        """The map's layer name: source · method · target · model:layer · mode.

        Everything that changes the map is in the name, so a run with another model, layer,
        region or slice axis adds a layer beside the earlier one instead of silently
        replacing it; a run with identical settings (at another slice, say) updates it.
        """
        record = result.provenance
        model = record.get("model") or "model"
        layers = "+".join(str(name) for name in record.get("layers") or [])
        if result.mode == "slices":
            mode = f"slices along axis {result.sample_axis}"
        else:
            mode = {"windows": "3D windows"}.get(result.mode, "current view")
        return (f"{result.source_name} · {result.method} · {label} · {model}:{layers} · "
                f"{mode}")

    def _show_result(self, capture: _Capture, result: ExplainResult) -> None:
        predictions = {
            "class_names": list(result.class_names),
            "probabilities": np.asarray(result.predictions).round(6).tolist(),
            "positions": [list(p) for p in result.positions],
            "sample_axis": result.sample_axis,
            "target_indices": (None if result.target_indices is None
                               else [int(i) for i in result.target_indices]),
        }
        names = []
        for label, data in result.maps.items():
            name = self.result_name(result, label)
            metadata = {METADATA_KEY: {**result.provenance, "target": label,
                                       "predictions": predictions,
                                       "domain_check": result.domain}}
            kwargs = {
                "colormap": self.colormap_combo.currentText(),
                "blending": "additive",
                "opacity": self.opacity_spin.value(),
                "contrast_limits": result.contrast_limits[label],
                "metadata": metadata,
                **capture.placement,
            }
            existing = self._layer(name)
            if (isinstance(existing, Image) and self._is_result(existing)
                    and existing.ndim == data.ndim):
                self._update_layer(existing, data, kwargs)
                layer = existing
            else:
                if existing is not None and self._is_result(existing):
                    self.viewer.layers.remove(existing)  # our own earlier map, other axes
                layer = self.viewer.add_image(data, name=name, **kwargs)
            self._install_status(layer)
            self._results[name] = result
            names.append(name)
            if label in result.uncertainty:
                self._show_uncertainty(capture, result, label, name)
            else:  # an earlier run's spread no longer describes the updated map
                stale = self._layer(name + UNCERTAINTY_SUFFIX)
                if stale is not None and self._is_result(stale):
                    self.viewer.layers.remove(stale)
        self.last_result = result
        self._refresh_layers()
        self.cam_combo.setCurrentText(names[0])
        self._update_predictions_view()
        domain = result.domain
        if domain and domain.get("out_of_domain"):
            show_warning(f"{result.source_name}: {domain['message']}")

    def _show_uncertainty(self, capture: _Capture, result: ExplainResult, label: str,
                          map_name: str) -> Image:
        """Add or update the uncertainty layer of one map: placed exactly like the map, hidden
        at first (shown over the map it would hide it), its metadata saying what it measures.
        """
        std = result.uncertainty[label]
        info = result.uncertainty_info or {}
        metadata = {METADATA_KEY: {
            **result.provenance, "target": label, "uncertainty_of": map_name,
            "uncertainty": info, "meaning": dict(info.get("meaning") or {}),
            "domain_check": result.domain}}
        kwargs = {
            "colormap": "viridis",
            "blending": "additive",
            "opacity": self.opacity_spin.value(),
            "contrast_limits": contrast_limits(std),
            "metadata": metadata,
            **capture.placement,
        }
        name = map_name + UNCERTAINTY_SUFFIX
        existing = self._layer(name)
        if (isinstance(existing, Image) and self._is_result(existing)
                and existing.ndim == std.ndim):
            self._update_layer(existing, std, kwargs)
            return existing
        if existing is not None and self._is_result(existing):
            self.viewer.layers.remove(existing)
        return self.viewer.add_image(std, name=name, visible=False, **kwargs)

    @staticmethod
    def _update_layer(layer: Image, data: np.ndarray, kwargs: dict[str, Any]) -> None:
        with layer.events.blocker_all():
            layer.affine = kwargs["affine"]
            layer.scale = kwargs["scale"]
            layer.translate = kwargs["translate"]
            layer.rotate = kwargs["rotate"]
            layer.shear = kwargs["shear"]
        layer.data = data
        layer.units = kwargs["units"]
        layer.axis_labels = kwargs["axis_labels"]
        layer.metadata = kwargs["metadata"]
        layer.colormap = kwargs["colormap"]
        layer.opacity = kwargs["opacity"]
        layer.contrast_limits = kwargs["contrast_limits"]
        layer.refresh()

    # ---------------------------------------------------------------------------------------
    # Predictions and hover

    def _result_index(self, layer: Image, world: Sequence[float]) -> tuple[int, ...] | None:
        """Index into the result layer's data under a world position (None: outside)."""
        point = np.asarray(layer.world_to_data(world), dtype=float)
        index = tuple(math.floor(p + 0.5) for p in point)
        if all(0 <= i < s for i, s in zip(index, layer.data.shape, strict=True)):
            return index
        return None

    def hover_text(self, layer: Image, world: Sequence[float]) -> str:
        """'CAM 0.12 · predicted crack (0.93)' for a world position over a result layer."""
        result = self._results.get(layer.name)
        index = self._result_index(layer, world)
        if result is None or index is None:
            return ""
        value = float(layer.data[index])
        source_index = tuple(i + o for i, o in zip(index, result.origin, strict=True))
        if result.class_map is not None:
            predicted = int(result.class_map[index])
            return f"CAM {value:.4g} · predicted {_class_name(result, predicted)} (this pixel)"
        probabilities = result.prediction_at(source_index)
        if probabilities is None or len(probabilities) == 0:
            return f"CAM {value:.4g}"
        if result.regression:  # predicted values, not class probabilities
            values = ", ".join(f"{_class_name(result, k)} {float(v):.4g}"
                               for k, v in enumerate(probabilities))
            return f"CAM {value:.4g} · predicted {values}"
        best = int(np.argmax(probabilities))
        return (f"CAM {value:.4g} · predicted {_class_name(result, best)} "
                f"({float(probabilities[best]):.2f})")

    def _install_status(self, layer: Image) -> None:
        """Add the CAM value and predicted class to the layer's status-bar text.

        Only public API: the layer's bound ``get_status`` is wrapped by an instance attribute
        (napari hands plugins proxies that refuse private access, so no private hooks).
        """
        if getattr(layer.get_status, "napari_gradcam_hover", False):
            return
        original = layer.get_status
        widget_ref = weakref.ref(self)

        def get_status(position: Any = None, *, view_direction: Any = None,
                       dims_displayed: Any = None, world: bool = False, value: Any = None
                       ) -> dict[str, str]:
            status = original(position, view_direction=view_direction,
                              dims_displayed=dims_displayed, world=world, value=value)
            widget = widget_ref()
            if widget is None or position is None or not world:
                return status
            try:
                extra = widget.hover_text(layer, position)
            except Exception:  # the status bar must never raise
                extra = ""
            if extra:
                status["coordinates"] = f"{status.get('coordinates', '')} | {extra}"
            return status

        get_status.napari_gradcam_hover = True  # type: ignore[attr-defined]
        layer.get_status = get_status

    def _update_predictions_view(self, *_event: object) -> None:
        result = self.last_result
        if result is None:
            return
        name = self.result_name(result, next(iter(result.maps)))
        layer = self._layer(name)
        probabilities = None
        where = "image"
        if layer is not None:
            index = self._result_index(layer, self.viewer.dims.point)
            if index is None:
                # outside the result (another slice): take the nearest sample
                point = np.asarray(layer.world_to_data(self.viewer.dims.point), dtype=float)
                index = tuple(int(min(max(round(p), 0), s - 1))
                              for p, s in zip(point, layer.data.shape, strict=True))
            source_index = tuple(i + o for i, o in zip(index, result.origin, strict=True))
            probabilities = result.prediction_at(source_index)
            if result.sample_axis is not None:
                where = f"index {source_index[result.sample_axis]} of axis {result.sample_axis}"
            through = (result.windows_through_plane(source_index[-3])
                       if result.mode == "windows" else None)
            if through is not None:
                probabilities, count = through
                where = f"mean of the {count} windows through plane {source_index[-3]}"
        if probabilities is None:
            probabilities = result.predictions.mean(0)
            where = "mean over all samples"
        self.predictions_title.setText(f"{result.source_name}: {where}")
        self.predictions_table.setHorizontalHeaderLabels(
            ["output", "predicted value"] if result.regression else ["class", "probability"])
        self.predictions_table.setRowCount(len(probabilities))
        for row, probability in enumerate(probabilities):
            self.predictions_table.setItem(row, 0, QTableWidgetItem(_class_name(result, row)))
            shown = f"{probability:.4g}" if result.regression else f"{probability:.3f}"
            self.predictions_table.setItem(row, 1, QTableWidgetItem(shown))

    def predictions_shown(self) -> dict[str, float]:
        """The class → probability pairs the predictions table shows now."""
        shown = {}
        for row in range(self.predictions_table.rowCount()):
            shown[self.predictions_table.item(row, 0).text()] = float(
                self.predictions_table.item(row, 1).text())
        return shown

    # ---------------------------------------------------------------------------------------
    # Click to explain

    def _on_mouse_press(self, viewer: Any, event: Any) -> None:
        if not _modifier_names(event) & set(CLICK_MODIFIERS):
            return
        self.explain_at(event.position)

    def explain_at(self, world_position: Sequence[float]) -> Any:
        """Explain what is under a world position (what Alt-click does); returns the worker."""
        if self.worker is not None:
            show_warning("A Grad-CAM run is in progress; wait for it or cancel it first.")
            return None
        layer = self._layer(self.image_combo.currentText())
        if layer is None:
            show_error("Select an image layer to explain before clicking on it.")
            return None
        point = np.asarray(layer.world_to_data(world_position), dtype=float)
        shape = layer.data[0].shape if layer.multiscale else layer.data.shape
        shape = shape[:-1] if layer.rgb else shape
        index = tuple(round(p) for p in point)
        if not all(0 <= i < s for i, s in zip(index, shape, strict=True)):
            show_warning("The click is outside the image.")
            return None
        return self.run(click_point=index)

    # ---------------------------------------------------------------------------------------
    # Labels table

    def compute_label_table(self, *_args: object) -> dict[str, np.ndarray] | None:
        """Per-label CAM statistics of the chosen CAM inside the chosen Labels layer.

        The table is shown here and written to the Labels layer's ``features`` (so hovering a
        label shows its row): the one, explicit change to a user's layer.
        """
        cam_layer = self._layer(self.cam_combo.currentText())
        labels_layer = self._layer(self.labels_combo.currentText())
        if cam_layer is None or not self._is_result(cam_layer):
            show_error("Run Grad-CAM first, then choose its result as the CAM layer.")
            return None
        if not isinstance(labels_layer, Labels):
            show_error("Choose a Labels layer (e.g. your segmented defects) for the table.")
            return None
        record = cam_layer.metadata[METADATA_KEY]
        origin = record["options"]["origin"]
        cam = np.asarray(cam_layer.data)
        labels_shape = tuple(labels_layer.data.shape)
        source_shape = tuple(record["options"].get("source_shape", labels_shape))
        if labels_shape != source_shape or len(origin) != len(labels_shape):
            show_error(f"The Labels layer {labels_layer.name!r} has shape {labels_shape} but the "
                       f"CAM was computed on an image of shape {source_shape}; they must match.")
            return None
        box = tuple(slice(o, o + s) for o, s in zip(origin, cam.shape, strict=True))
        labels = np.asarray(labels_layer.data[box])
        spacing = tuple(abs(float(s)) for s in cam_layer.scale)
        try:
            table = label_statistics(cam, labels, tolerance=self.tolerance_spin.value(),
                                     spacing=spacing)
        except (ValueError, TypeError) as error:
            show_error(f"Could not compute the label table: {error}")
            return None
        labels_layer.features = as_features(table)
        self.last_table = table
        self._show_table(table)
        return table

    def _show_table(self, table: dict[str, np.ndarray]) -> None:
        columns = list(table)
        rows = len(next(iter(table.values()))) if columns else 0
        self.labels_table.setColumnCount(len(columns))
        self.labels_table.setHorizontalHeaderLabels(columns)
        self.labels_table.setRowCount(rows)
        for c, column in enumerate(columns):
            for r, value in enumerate(table[column]):
                text = f"{value:.4g}" if isinstance(value, (float, np.floating)) else str(value)
                item = QTableWidgetItem(text)
                item.setFlags(item.flags() & ~Qt.ItemFlag.ItemIsEditable)
                self.labels_table.setItem(r, c, item)

    def _on_export_clicked(self, *_args: object) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Export label table", "cam_labels.csv",
                                              "CSV (*.csv)")
        if path:
            self.export_csv(path)

    def export_csv(self, path: str | Path) -> Path | None:
        """Write the last label table to ``path`` as CSV."""
        if self.last_table is None:
            show_error("Compute a label table first.")
            return None
        try:
            return write_csv(self.last_table, path)
        except OSError as error:
            show_error(f"Could not write {path}: {error}")
            return None


def _class_name(result: ExplainResult, index: int) -> str:
    names = result.class_names
    return str(names[index]) if 0 <= index < len(names) else f"class {index}"


def _guarded(job: Any) -> Any:
    """Run a job inside the worker, turning any failure into a :class:`JobError`.

    Qt workers swallow RuntimeErrors (taken for "the worker was deleted"), and torch raises
    RuntimeErrors for most model failures: without this the run would end silently.
    """
    try:
        return (yield from job)
    except JobError:
        raise
    except Exception as error:
        raise JobError(f"The explanation failed: {type(error).__name__}: {error}") from error
