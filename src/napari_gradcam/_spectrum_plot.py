"""The "Spectrum and CAM" dock: one spectrum of a stack with its Grad-CAM, against 2θ.

A stack of XRD patterns is an image (rows = patterns, columns = channels) and its map has the
same shape, so napari shows both as stripes: where the CAM is high along a row is visible,
but not *which peak* it is, nor how the pattern looks there. This dock plots the row under the
cursor (or the chosen row): the spectrum, its CAM on a second axis, the explained class and
the row's class probabilities (from the map's provenance), with the x axis in the data's
units (the layer's scale and translate: 2θ in degrees for the XRD sample; channel index when
the layer has no unit on that axis).

*Per-row scaling* (an option): on one shared colour range, rows whose CAM is small look empty
although the model did look somewhere (in the XRD sample 14 of 64 rows stay under 10 % of
the range). The option shows, as a separate display layer, every row divided by its own
maximum, hiding the map meanwhile; the map layer and its data are not touched.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import CheckBox, ComboBox, Container, SpinBox
from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
from matplotlib.figure import Figure

from napari_gradcam.core.normalise import scaled_along
from napari_gradcam.display import DISPLAY_KEY, METADATA_KEY, is_map_layer, map_record

if TYPE_CHECKING:
    import napari

#: Suffix of the per-row scaled display layer's name.
PER_ROW_SUFFIX = " · per row"
ROW_AXIS = 0
UNITLESS = ("", "pixel", "pixels", "px", "dimensionless", "None")


def axis_label_and_values(layer: Any, axis: int = -1) -> tuple[str, np.ndarray]:
    """The x axis of a spectrum: world coordinates of the channels along ``axis`` (translate +
    scale × index) and their label, e.g. ``"2θ (°)"``; ``"channel"`` and the plain index when
    the layer's unit on that axis is pixels (napari's default) or none."""
    axis = axis % layer.ndim
    count = layer.data.shape[axis]
    unit = str(layer.units[axis]) if layer.units is not None else ""
    if unit in UNITLESS:
        return "channel", np.arange(count, dtype=np.float64)
    values = float(layer.translate[axis]) + float(layer.scale[axis]) * np.arange(count)
    symbol = {"degree": "°", "micrometer": "µm", "nanometer": "nm"}.get(unit, unit)
    name = str(layer.axis_labels[axis]) if layer.axis_labels else ""
    name = name if name and not name.startswith("axis") else "x"
    return f"{name} ({symbol})", values


def row_class_text(record: dict[str, Any], row: int) -> tuple[str, str]:
    """(explained class, probabilities) of spectrum ``row`` from a map's provenance: the
    target's class name, or for "predicted" the row's most probable class; the probabilities
    as ``"ferrite 0.97 · austenite 0.02 · …"`` ('' when the record has none)."""
    predictions = record.get("predictions") or {}
    names = list(predictions.get("class_names")
                 or (record.get("options") or {}).get("class_names") or [])
    probabilities = predictions.get("probabilities")
    positions = predictions.get("positions")
    values = None
    if probabilities is not None:
        table = np.asarray(probabilities, dtype=np.float64)
        if positions:
            rows = [int(p[ROW_AXIS]) if len(p) > ROW_AXIS else -1 for p in positions]
            values = table[rows.index(row)] if row in rows else None
        elif table.ndim == 2 and 0 <= row < len(table):
            values = table[row]
    target = str(record.get("target", "CAM"))
    if target in ("predicted", "clicked") and values is not None and names:
        target = f"{target}: {names[int(np.argmax(values))]}"
    text = ""
    if values is not None and names:
        text = " · ".join(f"{n} {p:.2f}" for n, p in zip(names, values, strict=False))
    return target, text


class SpectrumPlotWidget(Container):
    """A spectrum of a stack with its CAM, following the row under the cursor."""

    def __init__(self, viewer: napari.viewer.Viewer) -> None:
        self.viewer = viewer
        self.spectra = ComboBox(label="Spectra", choices=self._spectra_choices, nullable=True,
                                tooltip="An image whose rows are spectra (rows × channels)")
        self.map_layer = ComboBox(label="CAM", choices=self._map_choices, nullable=True,
                                  tooltip="A Grad-CAM map of the same rows and channels")
        self.row = SpinBox(label="Row", min=0, max=0, value=0)
        self.follow = CheckBox(text="Follow the cursor", value=True)
        self.per_row = CheckBox(text="Per-row scaling of the map (display only)", value=False,
                                tooltip="Show each row of the map divided by its own maximum, "
                                        "in a separate layer; the map's data stay raw")
        self.figure = Figure(figsize=(5, 3), tight_layout=True)
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setMinimumHeight(220)
        self.axes = self.figure.add_subplot(111)
        self.cam_axes = self.axes.twinx()
        self.spectrum_line = None
        self.cam_line = None
        super().__init__(widgets=[self.spectra, self.map_layer, self.row, self.follow,
                                  self.per_row])
        self.native.layout().addWidget(self.canvas)
        self.spectra.changed.connect(self._on_layers)
        self.map_layer.changed.connect(self._on_layers)
        self.row.changed.connect(self.plot_row)
        self.per_row.changed.connect(self.set_per_row)
        layers = viewer.layers
        for emitter in (layers.events.inserted, layers.events.removed, layers.events.reordered):
            emitter.connect(self._refresh)
        layers.events.inserted.connect(lambda event: event.value.events.name.connect(
            self._refresh))
        for layer in layers:
            layer.events.name.connect(self._refresh)
        viewer.cursor.events.position.connect(self._on_cursor)
        self._refresh()

    # -- choices -------------------------------------------------------------------------

    def _spectra_choices(self, widget: Any = None) -> list[tuple[str, Any]]:
        return [(layer.name, layer) for layer in self.viewer.layers
                if getattr(layer, "data", None) is not None and layer.__class__.__name__
                == "Image" and layer.ndim == 2 and not layer.rgb
                and map_record(layer) is None]

    def _map_choices(self, widget: Any = None) -> list[tuple[str, Any]]:
        return [(layer.name, layer) for layer in self.viewer.layers
                if is_map_layer(layer) and layer.ndim == 2]

    def _refresh(self, event: Any = None) -> None:
        self.reset_choices()
        maps = [layer for layer in self.map_layer.choices if layer is not None]
        if self.map_layer.value is None and maps:
            self.map_layer.value = maps[-1]
        stacks = [layer for layer in self.spectra.choices if layer is not None]
        if self.spectra.value is None and stacks:
            source = (map_record(self.map_layer.value) or {}).get("source")
            named = [layer for layer in stacks if layer.name == source]
            self.spectra.value = named[0] if named else stacks[0]

    def _on_layers(self, event: Any = None) -> None:
        spectra = self.spectra.value
        if spectra is not None:
            self.row.max = max(0, spectra.data.shape[ROW_AXIS] - 1)
        self.plot_row(self.row.value)

    # -- following the cursor ------------------------------------------------------------

    def _on_cursor(self, event: Any = None) -> None:
        spectra = self.spectra.value
        if not self.follow.value or spectra is None:
            return
        point = spectra.world_to_data(self.viewer.cursor.position)
        row = math.floor(float(point[ROW_AXIS]) + 0.5)
        if 0 <= row < spectra.data.shape[ROW_AXIS] and row != self.row.value:
            self.row.value = row  # replots

    # -- the plot ------------------------------------------------------------------------

    def cam_row(self, row: int) -> np.ndarray | None:
        """The map's values on spectrum ``row`` (raw), ``None`` when the map does not cover
        that row. Found through world coordinates, so a map of a few rows (its origin moved
        by its translate) lines up with the stack."""
        spectra, cam = self.spectra.value, self.map_layer.value
        if spectra is None or cam is None:
            return None
        world = spectra.data_to_world(np.array([row, 0], dtype=float))
        index = math.floor(float(cam.world_to_data(world)[ROW_AXIS]) + 0.5)
        if not 0 <= index < cam.data.shape[ROW_AXIS]:
            return None
        return np.asarray(cam.data[index], dtype=np.float64)

    def plot_row(self, row: int | None = None) -> None:
        """Draw spectrum ``row`` (``None``: the current one) with its CAM."""
        row = self.row.value if row is None else int(row)
        self.axes.clear()
        self.cam_axes.clear()
        self.spectrum_line = self.cam_line = None
        spectra, cam = self.spectra.value, self.map_layer.value
        if spectra is None:
            self.canvas.draw_idle()
            return
        label, x = axis_label_and_values(spectra)
        values = np.asarray(spectra.data[row], dtype=np.float64)
        (self.spectrum_line,) = self.axes.plot(x, values, color="0.25", lw=1.0,
                                               label="spectrum")
        self.axes.set_xlabel(label)
        self.axes.set_ylabel("intensity")
        title = f"{spectra.name} · row {row}"
        cam_values = self.cam_row(row) if cam is not None else None
        if cam_values is not None:
            record = map_record(cam) or {}
            target, probabilities = row_class_text(record, row)
            _, cam_x = axis_label_and_values(cam)
            (self.cam_line,) = self.cam_axes.plot(cam_x, cam_values, color="#d4a000", lw=1.5,
                                                  label=f"CAM · {target}")
            self.cam_axes.fill_between(cam_x, 0, cam_values, color="#ffd000", alpha=0.3)
            if self.per_row.value:
                top = float(np.nanmax(cam_values)) if np.nanmax(cam_values) > 0 else 1.0
                self.cam_axes.set_ylabel("CAM [a.u.], this row's range")
            else:
                top = float(cam.contrast_limits[1])
                self.cam_axes.set_ylabel("CAM [a.u.], map's range")
            self.cam_axes.set_ylim(0, top * 1.05)
            title += f" · {record.get('method', 'CAM')} for {target}"
            if probabilities:
                title += f"\n{probabilities}"
        elif cam is not None:
            title += " · the CAM does not cover this row"
        lines = [line for line in (self.spectrum_line, self.cam_line) if line is not None]
        self.axes.legend(lines, [line.get_label() for line in lines], loc="upper right",
                         fontsize="small")
        self.axes.set_title(title, fontsize="small")
        self.canvas.draw_idle()

    # -- per-row scaling -----------------------------------------------------------------

    def per_row_layer(self) -> Any | None:
        cam = self.map_layer.value
        if cam is None:
            return None
        name = cam.name + PER_ROW_SUFFIX
        return next((layer for layer in self.viewer.layers if layer.name == name), None)

    def set_per_row(self, enabled: bool) -> None:
        """Show the map with each row scaled to its own maximum (a lazy derived layer placed
        like the map, the map hidden), or go back to the map. Display only."""
        cam = self.map_layer.value
        if cam is None:
            return
        derived = self.per_row_layer()
        if not enabled:
            if derived is not None:
                self.viewer.layers.remove(derived)
            cam.visible = True
            self.plot_row()
            return
        if derived is None:
            record = dict(map_record(cam) or {})
            record[DISPLAY_KEY] = {
                "derived_from": cam.name, "scope": "per row",
                "scope_meaning": "each row divided by its own maximum (display only; the map "
                                 "layer keeps the raw values)"}
            derived = self.viewer.add_image(
                scaled_along(cam.data, ROW_AXIS), name=cam.name + PER_ROW_SUFFIX,
                scale=cam.scale, translate=cam.translate, units=cam.units,
                axis_labels=cam.axis_labels, colormap=cam.colormap, blending=cam.blending,
                opacity=cam.opacity, contrast_limits=(0.0, 1.0),
                metadata={METADATA_KEY: record})
            derived.colorbar.visible = bool(cam.colorbar.visible)
        cam.visible = False
        self.plot_row()
