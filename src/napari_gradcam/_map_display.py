"""The "Map display" dock: how the selected Grad-CAM map is read, never what it contains.

A magicgui form over :mod:`napari_gradcam.display` (scope, colour bar, 3D style) and
:mod:`napari_gradcam.figure` (export): the logic lives there and is usable from a script; this
dock only picks the map and forwards the choices. It follows the layer list (maps added,
removed, renamed) and the selected layer.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from magicgui.widgets import CheckBox, ComboBox, Container, FileEdit, Label, PushButton
from napari.utils.notifications import show_error, show_info

from napari_gradcam.core.normalise import DEFAULT_SCOPE, SCOPE_MEANINGS, SCOPES
from napari_gradcam.display import (
    DEFAULT_STYLE_3D,
    DISPLAY_KEY,
    STYLES_3D,
    apply_3d_style,
    caption,
    display_state,
    is_map_layer,
    map_record,
    set_scope,
    show_map,
)
from napari_gradcam.figure import canvas_overlay, export_figure

if TYPE_CHECKING:
    import napari


class MapDisplayWidget(Container):
    """Normalisation scope, colour bar, 3D style and figure export of one map layer."""

    def __init__(self, viewer: napari.viewer.Viewer) -> None:
        self.viewer = viewer
        self._updating = False
        self._watched: Any = None
        self.map_layer = ComboBox(label="Map", choices=self._map_choices, nullable=True,
                                  tooltip="The Grad-CAM map layer to display (follows the "
                                          "selected layer)")
        self.scope = ComboBox(label="Normalisation", choices=SCOPES, value=DEFAULT_SCOPE,
                              tooltip="\n".join(f"{s}: {m}" for s, m in SCOPE_MEANINGS.items())
                              + "\nOnly the colour range changes; the data stay raw.")
        self.style_3d = ComboBox(label="3D style", choices=tuple(STYLES_3D),
                                 value=DEFAULT_STYLE_3D,
                                 tooltip="How the map and its scan are drawn in the 3D view")
        self.colorbar = CheckBox(text="Colour bar on the canvas", value=True)
        self.caption = Label(value="")
        self.figure_path = FileEdit(label="Figure", mode="w", filter="*.png",
                                    value=str(Path.home() / "gradcam_figure.png"))
        self.scale_bar = CheckBox(text="Scale bar in the figure", value=True)
        self.export_button = PushButton(text="Export figure (PNG)")
        super().__init__(widgets=[self.map_layer, self.scope, self.style_3d, self.colorbar,
                                  self.caption, self.figure_path, self.scale_bar,
                                  self.export_button])
        self.map_layer.changed.connect(self._on_map)
        self.scope.changed.connect(self._on_scope)
        self.style_3d.changed.connect(self._on_style)
        self.colorbar.changed.connect(self._on_colorbar)
        self.export_button.clicked.connect(self._on_export)
        layers = viewer.layers
        for emitter in (layers.events.inserted, layers.events.removed, layers.events.reordered):
            emitter.connect(self._refresh)
        layers.events.inserted.connect(self._watch_name)
        for layer in layers:
            layer.events.name.connect(self._refresh)
        layers.selection.events.active.connect(self._on_active)
        self._refresh()
        self._on_active()

    # -- choices -------------------------------------------------------------------------

    def _map_choices(self, widget: Any = None) -> list[tuple[str, Any]]:
        return [(layer.name, layer) for layer in self.viewer.layers if is_map_layer(layer)]

    def _watch_name(self, event: Any) -> None:
        event.value.events.name.connect(self._refresh)

    def _refresh(self, event: Any = None) -> None:
        self.reset_choices()
        maps = [layer for layer in self.map_layer.choices if layer is not None]
        if self.map_layer.value is None and maps:
            self.map_layer.value = maps[-1]

    def _on_active(self, event: Any = None) -> None:
        active = self.viewer.layers.selection.active
        if active is not None and is_map_layer(active) and active is not self.map_layer.value:
            self.map_layer.value = active

    # -- the map's display ---------------------------------------------------------------

    def _on_map(self, layer: Any = None) -> None:
        layer = self.map_layer.value
        if self._watched is not None:
            self._watched.events.contrast_limits.disconnect(self._show_caption)
            self._watched = None
        if layer is None:
            self.caption.value = ""
            return
        if DISPLAY_KEY not in (map_record(layer) or {}):
            show_map(self.viewer, layer)
        state = display_state(layer)
        self._updating = True
        try:
            self.scope.value = state.get("scope", DEFAULT_SCOPE)
            self.style_3d.value = state.get("style_3d", DEFAULT_STYLE_3D)
            self.colorbar.value = bool(layer.colorbar.visible)
        finally:
            self._updating = False
        layer.events.contrast_limits.connect(self._show_caption)
        self._watched = layer
        self._show_caption()

    def _on_scope(self, scope: str) -> None:
        layer = self.map_layer.value
        if self._updating or layer is None:
            return
        set_scope(self.viewer, layer, scope)
        self._show_caption()

    def _on_style(self, style: str) -> None:
        layer = self.map_layer.value
        if self._updating or layer is None:
            return
        apply_3d_style(self.viewer, layer, style)

    def _on_colorbar(self, visible: bool) -> None:
        layer = self.map_layer.value
        if self._updating or layer is None:
            return
        layer.colorbar.visible = bool(visible)
        self._show_caption()

    def _show_caption(self, event: Any = None) -> None:
        """The colour bar's title (units, scope, range) under the form and on the canvas:
        napari's colour bar draws ticks only, and an exported figure must say what it shows."""
        layer = self.map_layer.value
        if layer is None:
            return
        text = caption(layer)
        self.caption.value = text
        overlay = canvas_overlay(self.viewer, "text")
        overlay.text = text
        overlay.position = "bottom_left"  # the colour bar is top right, the scale bar bottom right
        overlay.visible = bool(layer.colorbar.visible)

    # -- figure --------------------------------------------------------------------------

    def export(self, path: str | Path | None = None) -> Path:
        """Save what the canvas shows (with the scale bar when ticked) as PNG."""
        target = Path(path) if path is not None else Path(self.figure_path.value)
        return export_figure(self.viewer, target, scale_bar=bool(self.scale_bar.value))

    def _on_export(self) -> None:
        try:
            saved = self.export()
        except (OSError, ValueError) as error:
            show_error(f"figure not saved: {error}")
            return
        show_info(f"figure saved to {saved}")
