"""The explainer's predictions panel and the status-bar text over a map.

Why a file of its own: after a run, what the model predicted is shown where the user looks: in
the *Predictions* panel for the row / slice / window under the cursor, and in the status bar
while hovering a map ("CAM 0.12 · predicted crack (0.93)"). Both read the result kept by
:class:`napari_gradcam._widget_layers.ResultLayersMixin`; nothing is computed again.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from napari.layers import Image
from qtpy.QtWidgets import QGroupBox, QLabel, QTableWidget, QTableWidgetItem, QVBoxLayout

from napari_gradcam._widget_form import axis_name
from napari_gradcam._widget_layers import _class_name
from napari_gradcam.display import full_resolution

if TYPE_CHECKING:
    import napari

    from napari_gradcam._widget_layers import _Capture
    from napari_gradcam.jobs import ExplainResult


class PredictionsMixin:
    """The predictions panel (``predictions_title``, ``predictions_table``) and the hover text.

    Needs ``self.viewer``, ``self.last_result``, ``self._last_capture``, ``self._results``,
    ``self._predictions_key`` and the result layers' ``result_name`` and ``_layer``.
    """

    viewer: napari.viewer.Viewer
    last_result: ExplainResult | None
    _last_capture: _Capture | None
    _results: dict[str, ExplainResult]
    _predictions_key: object
    predictions_title: QLabel
    predictions_table: QTableWidget

    def _build_predictions_box(self) -> QGroupBox:
        """The *Predictions* panel: the class probabilities (or predicted values) of the
        sample under the cursor, below *Run*."""
        predictions_box = QGroupBox("Predictions")
        predictions_layout = QVBoxLayout(predictions_box)
        self.predictions_title = QLabel("run a model to see its predictions")
        self.predictions_title.setWordWrap(True)
        predictions_layout.addWidget(self.predictions_title)
        self.predictions_table = QTableWidget(0, 2)
        self.predictions_table.setHorizontalHeaderLabels(["class", "probability"])
        self.predictions_table.setMinimumHeight(110)
        self.predictions_table.horizontalHeader().setStretchLastSection(True)
        predictions_layout.addWidget(self.predictions_table)
        return predictions_box

    def _result_index(self, layer: Image, world: Sequence[float]) -> tuple[int, ...] | None:
        """Index into the result layer's data under a world position (None: outside)."""
        point = np.asarray(layer.world_to_data(world), dtype=float)
        index = tuple(math.floor(p + 0.5) for p in point)
        if all(0 <= i < s for i, s in zip(index, full_resolution(layer).shape, strict=True)):
            return index
        return None

    def hover_text(self, layer: Image, world: Sequence[float]) -> str:
        """'CAM 0.12 · predicted crack (0.93)' for a world position over a result layer."""
        result = self._results.get(layer.name)
        index = self._result_index(layer, world)
        if result is None or index is None:
            return ""
        value = float(full_resolution(layer)[index])
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
        """Show the predictions of the row / slice / window under the cursor.

        The cursor's world position carries the displayed axes at the pointer and the
        others at the current slice; when the pointer is off the map (or not over the
        canvas) the current slice is shown. Only redrawn when the sample shown changes.
        """
        result = self.last_result
        if result is None:
            return
        capture = self._last_capture
        labels = capture.axis_labels if capture is not None else ()
        name = self.result_name(result, next(iter(result.maps)), labels)
        layer = self._layer(name)
        probabilities = None
        where = "image"
        key: object = None
        if layer is not None:
            index = None
            cursor = tuple(self.viewer.cursor.position)
            if len(cursor) == len(self.viewer.dims.point):
                index = self._result_index(layer, cursor)
            if index is None:
                index = self._result_index(layer, self.viewer.dims.point)
            if index is None:
                # outside the result (another slice): take the nearest sample
                point = np.asarray(layer.world_to_data(self.viewer.dims.point), dtype=float)
                index = tuple(int(min(max(round(p), 0), s - 1))
                              for p, s in zip(point, layer.data.shape, strict=True))
            source_index = tuple(i + o for i, o in zip(index, result.origin, strict=True))
            probabilities = result.prediction_at(source_index)
            offset = (capture.offset if capture is not None else ()) or (0,) * len(index)
            if result.sample_axis is not None:
                axis = result.sample_axis
                where = (f"{axis_name(labels, axis)} = {source_index[axis] + offset[axis]}"
                         if axis_name(labels, axis) != f"axis {axis}" else
                         f"index {source_index[axis] + offset[axis]} of axis {axis}")
                key = (id(result), source_index[axis])
            else:
                key = (id(result), None)
            through = (result.windows_through_plane(source_index[-3])
                       if result.mode == "windows" else None)
            if through is not None:
                probabilities, count = through
                where = f"mean of the {count} windows through plane {source_index[-3]}"
                key = (id(result), "plane", source_index[-3])
        if probabilities is None:
            probabilities = result.predictions.mean(0)
            where = "mean over all samples"
            key = (id(result), "mean")
        if key == self._predictions_key:
            return
        self._predictions_key = key
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
