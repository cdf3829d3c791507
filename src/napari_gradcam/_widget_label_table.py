"""The label table: per-label statistics of a map inside a Labels layer, and their CSV.

Why a file of its own: the *CAM inside labels* tab is a job apart from explaining. It reads a
finished map (its provenance says where it sits in the image) and a Labels layer, computes the
table with :func:`napari_gradcam.core.labels_stats.label_statistics` (the numbers live in the
core), shows it, adds it to the Labels layer's ``features`` (the one, explicit change to a
user's layer, keeping the user's own columns: :func:`merged_features`) and exports it as CSV
with the map's provenance.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import dask.array as da
import numpy as np
from magicgui.widgets import ComboBox, Container, FloatSpinBox, Label, PushButton
from napari.layers import Labels
from napari.utils.notifications import show_error
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QFileDialog,
    QHeaderView,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from napari_gradcam._qt_common import METADATA_KEY, is_result_layer
from napari_gradcam._widget_form import _layer_choices, label_names
from napari_gradcam.core.labels_stats import (
    as_features,
    label_statistics,
    suggest_csv_name,
    write_csv,
)
from napari_gradcam.display import full_resolution

if TYPE_CHECKING:
    import napari


class LabelTableMixin:
    """The *CAM inside labels* tab: ``labels_form``, ``labels_table``, the last table.

    Needs ``self.viewer``, ``self.last_table`` and ``self.last_table_provenance`` (set in the
    widget's ``__init__``) and the form's ``_is_result``.
    """

    viewer: napari.viewer.Viewer
    labels_form: Container
    labels_table: QTableWidget
    last_table: dict[str, np.ndarray] | None
    last_table_provenance: dict[str, Any] | None

    def _build_labels_tab(self) -> QWidget:
        """The *CAM inside labels* tab: its form (``self.labels_form``) and table, connected."""
        viewer = self.viewer
        self.labels_form = Container(labels=True, widgets=[
            Label(name="intro", label=" ", value="Per-label statistics of a CAM inside a Labels "
                  "layer. The table is also written to the Labels layer's features."),
            ComboBox(name="cam", label="CAM layer",
                     choices=_layer_choices(viewer, is_result_layer)),
            ComboBox(name="labels_layer", label="Labels layer",
                     choices=_layer_choices(viewer, lambda layer: isinstance(layer, Labels))),
            FloatSpinBox(name="tolerance", label="Tolerance", min=0.0, max=1000.0, step=0.5,
                         tooltip="Pointing-game tolerance, in the layer's units: the CAM "
                         "maximum counts as a hit within this distance of the label. Set "
                         "from the model card's pointing_tolerance_px when it has one."),
            Container(name="buttons", label=" ", layout="horizontal", labels=False, widgets=[
                PushButton(name="table_button", text="Label table"),
                PushButton(name="export_button", text="Export CSV …"),
            ]),
        ])
        self.labels_form.intro.native.setWordWrap(True)
        labels_tab = QWidget()
        labels_layout = QVBoxLayout(labels_tab)
        labels_layout.addWidget(self.labels_form.native)
        self.labels_table = QTableWidget(0, 0)
        self.labels_table.horizontalHeader().setSectionResizeMode(
            QHeaderView.ResizeMode.ResizeToContents)
        labels_layout.addWidget(self.labels_table, 1)
        self.cam_combo = self.labels_form.cam.native
        self.labels_combo = self.labels_form.labels_layer.native
        self.tolerance_spin = self.labels_form.tolerance.native
        self.labels_form.cam.changed.connect(self._default_tolerance)
        self.labels_form.buttons.table_button.changed.connect(self.compute_label_table)
        self.labels_form.buttons.export_button.changed.connect(self._on_export_clicked)
        self.export_button = self.labels_form.buttons.export_button.native
        self.table_button = self.labels_form.buttons.table_button.native
        return labels_tab

    def _default_tolerance(self, *_args: object) -> None:
        """Set the pointing-game tolerance from the model card of the chosen map.

        The card's ``metrics.pointing_tolerance_px`` (the tolerance its published pointing
        scores were measured with) in pixels, times the map's pixel size, so the widget's
        numbers are comparable with the card's; 0 when the card gives none.
        """
        layer = self.labels_form.cam.value
        if not is_result_layer(layer):
            return
        record = layer.metadata.get(METADATA_KEY) or {}
        pixels = record.get("pointing_tolerance_px")
        if not isinstance(pixels, (int, float)):
            return
        spacing = [abs(float(s)) for s in layer.scale]
        self.labels_form.tolerance.value = float(pixels) * (min(spacing) if spacing else 1.0)

    def compute_label_table(self, *_args: object) -> dict[str, np.ndarray] | None:
        """Per-label CAM statistics of the chosen CAM inside the chosen Labels layer.

        The table is shown here and added to the Labels layer's ``features`` (so hovering a
        label shows its row): the one, explicit change to a user's layer, which keeps every
        column the user had (:func:`merged_features`).
        """
        cam_layer = self.labels_form.cam.value
        labels_layer = self.labels_form.labels_layer.value
        if cam_layer is None or not self._is_result(cam_layer):
            show_error("Run Grad-CAM first, then choose its result as the CAM layer.")
            return None
        if not isinstance(labels_layer, Labels):
            show_error("Choose a Labels layer (e.g. your segmented defects) for the table.")
            return None
        record = cam_layer.metadata[METADATA_KEY]
        origin = record["options"]["origin"]
        # level 0 of an on-disk pyramid, as it is (lazy): label_statistics reads it block by
        # block within a memory budget, never the whole map
        cam = full_resolution(cam_layer)
        labels_shape = tuple(labels_layer.data.shape)
        source_shape = tuple(record["options"].get("source_shape", labels_shape))
        if any(origin) and record["options"].get("explained_row_of"):
            source_shape = labels_shape  # one row of the layer: the origin says which
        if labels_shape != source_shape or len(origin) != len(labels_shape):
            show_error(f"The Labels layer {labels_layer.name!r} has shape {labels_shape} but the "
                       f"CAM was computed on an image of shape {source_shape}; they must match.")
            return None
        box = tuple(slice(o, o + s) for o, s in zip(origin, cam.shape, strict=True))
        labels_data = labels_layer.data
        if not isinstance(labels_data, np.ndarray) and not hasattr(labels_data, "dask"):
            # a zarr array (or other on-disk array) sliced directly would be read whole: cut the
            # box lazily so the core reads it chunk by chunk
            labels_data = da.from_array(labels_data,
                                        chunks=getattr(labels_data, "chunks", None) or "auto")
        labels = labels_data[box]
        spacing = tuple(abs(float(s)) for s in cam_layer.scale)
        try:
            table = label_statistics(cam, labels, tolerance=self.labels_form.tolerance.value,
                                     spacing=spacing, names=label_names(labels_layer) or None)
        except (ValueError, TypeError) as error:
            show_error(f"Could not compute the label table: {error}")
            return None
        labels_layer.features = merged_features(labels_layer.features, as_features(table))
        self.last_table = table
        self.last_table_provenance = {
            **{k: v for k, v in record.items() if k not in ("predictions", "domain_check")},
            "map_layer": cam_layer.name, "labels_layer": labels_layer.name,
            "pointing_tolerance": float(self.labels_form.tolerance.value)}
        self._show_table(table)
        return table

    def _show_table(self, table: dict[str, np.ndarray]) -> None:
        columns = list(table)
        if "name" in columns and "label" in columns:  # the name beside its value
            columns.remove("name")
            columns.insert(columns.index("label") + 1, "name")
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
        self.labels_table.resizeColumnsToContents()

    def suggested_csv_name(self) -> str:
        """The default file name of the export: tells tables of other runs apart."""
        return suggest_csv_name(self.last_table_provenance)

    def _on_export_clicked(self, *_args: object) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Export label table",
                                              self.suggested_csv_name(), "CSV (*.csv)")
        if path:
            self.export_csv(path)

    def export_csv(self, path: str | Path) -> Path | None:
        """Write the last label table to ``path`` as CSV, with the map's provenance."""
        if self.last_table is None:
            show_error("Compute a label table first.")
            return None
        try:
            return write_csv(self.last_table, path, provenance=self.last_table_provenance)
        except OSError as error:
            show_error(f"Could not write {path}: {error}")
            return None


def merged_features(existing: Any, table: dict[str, np.ndarray]) -> Any:
    """The Labels layer's features with the label table's columns added or updated.

    The user's own columns (names, classes, notes from another plugin) are kept, row by row,
    matched on the label value (``index``, as napari matches features to labels); only the
    table's columns are replaced. Replacing the whole table would silently drop a user's
    annotations.
    """
    import pandas as pd

    ours = pd.DataFrame(table)
    old = pd.DataFrame(existing) if existing is not None else pd.DataFrame()
    if old.empty or len(old.columns) == 0:
        return ours
    old = old.copy()
    if "index" not in old.columns:  # napari's rule without it: row i describes label i
        old.insert(0, "index", np.arange(len(old)))
    kept = ["index", *[c for c in old.columns if c != "index" and c not in ours.columns]]
    merged = old[kept].merge(ours, on="index", how="outer")
    return merged.sort_values("index", kind="stable").reset_index(drop=True)
