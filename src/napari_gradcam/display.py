"""How a Grad-CAM map is shown over its scan: one choice, shared by the reader and the widget.

Why a single-hue ``yellow`` (black → yellow) and not ``turbo``, ``inferno`` or ``magma``:

* **black at zero**: with additive blending a voxel adds its colour to the scan below, so a
  colormap whose zero is not black tints the whole scan (``turbo``'s dark blue does);
* **one hue, brightness = value**: over grey CT a single hue reads as "how much" at a glance,
  and every value keeps the same hue however bright the scan is underneath; a multi-hue map
  mixed additively with grey gives hues that no longer match its colour bar;
* **apart from napari's Labels**: the default label colours of the first labels (1 a dark
  orange-brown, 2 light cyan, 3 lavender, 4 purple, 5 indigo, 6 light green) collide with
  ``inferno``'s dark reds and oranges and ``magma``'s purples; yellow is none of them, so a
  painted crack or pore stays distinguishable from the map beside it.

No napari import here: the reader (imported by napari for every file it is offered) and the
headless code can use these names for free.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from typing import Any

from napari_gradcam.core.normalise import (
    DEFAULT_SCOPE,
    SCOPE_MEANINGS,
    check_scope,
    robust_limits,
    scope_limits,
    top_percentile,
)

#: napari colormap name of a Grad-CAM map layer (the reader and the widget's default).
MAP_COLORMAP = "yellow"
#: Blending of a map layer: added to the scan below, so zero CAM leaves the scan as it is.
MAP_BLENDING = "additive"
#: Opacity of a map layer (the widget's default).
MAP_OPACITY = 0.6

# -------------------------------------------------------------------------------------------
# Reading a map: normalisation scope, colour bar, 3D style
#
# Everything below acts on napari objects handed in (a viewer, a layer) but imports nothing
# from napari, so this module stays importable by the reader hook and headless code.

#: The metadata key of a map's provenance (the same as :data:`napari_gradcam.io.ATTRS_KEY`).
METADATA_KEY = "napari_gradcam"
#: Where a map keeps its display state (scope, raw limits, 3D style) inside its provenance.
DISPLAY_KEY = "display"

#: The 3D styles, the default first. Why not napari's MIP with additive blending (the old
#: default): over a bright CT volume the scan's own MIP is nearly white everywhere, and a map
#: added on top cannot be brighter than white, so the map vanishes. The first two styles dim
#: the scan (lower opacity) and draw the map so that its *high* places stand out: an
#: attenuated MIP (nearer voxels win, so depth reads) or an iso-surface around the map's top
#: 1 % (a solid, shaded blob where the model looked; a Grad-CAM is small but positive over
#: much of a volume, so the top 5 % still spreads over the whole specimen). The third is the
#: old look, kept to compare.
STYLES_3D: dict[str, dict[str, Any]] = {
    "attenuated MIP, scan dimmed": {
        "rendering": "attenuated_mip", "attenuation": 0.05, "blending": "additive",
        "opacity": 1.0, "scan_opacity": 0.3},
    "iso-surface (top 1 %), scan dimmed": {
        "rendering": "iso", "percentile": 99.0, "blending": "translucent",
        "opacity": 1.0, "scan_opacity": 0.3},
    "MIP, additive (undimmed scan)": {
        "rendering": "mip", "blending": "additive", "opacity": None, "scan_opacity": None},
}
DEFAULT_STYLE_3D = next(iter(STYLES_3D))

#: The unit a raw CAM value is in: the model's score times activations, no physical unit.
CAM_UNITS = "a.u."


def map_layer_kwargs() -> dict[str, Any]:
    """The keyword arguments of ``viewer.add_image`` that make a map look right in 2D *and* 3D:
    the shared colormap, blending and opacity, and the default 3D rendering (which napari uses
    only when the view is 3D). Merge these into the map's own kwargs."""
    style = STYLES_3D[DEFAULT_STYLE_3D]
    return {"colormap": MAP_COLORMAP, "blending": MAP_BLENDING, "opacity": MAP_OPACITY,
            "rendering": style["rendering"], "attenuation": style["attenuation"]}


def is_map_layer(layer: Any) -> bool:
    """A Grad-CAM map (or its uncertainty) that napari-gradcam made or read: an image layer
    whose metadata holds our provenance record. Derived display layers (per-row scaling) are
    not maps: their data is not the raw map."""
    record = map_record(layer)
    return (record is not None and getattr(layer, "rgb", False) is False
            and not record.get(DISPLAY_KEY, {}).get("derived_from"))


def map_record(layer: Any) -> dict[str, Any] | None:
    """The provenance record in a layer's metadata (``None``: not one of our maps)."""
    metadata = getattr(layer, "metadata", None)
    if not isinstance(metadata, dict):
        return None
    record = metadata.get(METADATA_KEY)
    if not isinstance(record, dict) or not (record.get("method") or record.get("generator")):
        return None
    return record


def display_state(layer: Any) -> dict[str, Any]:
    """The map's display state (created empty): kept in its metadata beside the provenance, so
    a saved map says how it was shown; the data is never touched."""
    record = map_record(layer)
    if record is None:
        raise ValueError(f"the layer {getattr(layer, 'name', layer)!r} is not a Grad-CAM map "
                         "(its metadata has no napari-gradcam provenance)")
    state = record.get(DISPLAY_KEY)
    if not isinstance(state, dict):
        state = record[DISPLAY_KEY] = {}
    return state


def raw_limits(layer: Any) -> tuple[float, float]:
    """The map's raw colour range: the one recorded when the map was first shown (the widget's
    and the reader's limits), else the robust range of its data."""
    state = display_state(layer)
    if "raw_limits" not in state:
        limits = getattr(layer, "contrast_limits", None)
        state["raw_limits"] = ([float(v) for v in limits] if limits is not None
                               else list(robust_limits(stats_level(layer))))
    low, high = state["raw_limits"]
    return float(low), float(high)


def full_resolution(layer: Any) -> Any:
    """The layer's full-resolution array (level 0 of a multiscale map, as our OME-Zarr reader
    opens a pyramid): what values under the cursor and label tables are read from."""
    return layer.data[0] if getattr(layer, "multiscale", False) else layer.data


STATS_BYTES = 256 << 20
"""A whole-map statistic (per-volume range, iso threshold) reads at most this much: the
finest pyramid level that fits. A map written to disk because it is larger than memory must
not be read whole on the GUI thread to colour it; a 2×2×2 mean level changes a range or a
top percentile by little, and small maps are read at full resolution."""


def stats_level(layer: Any) -> Any:
    """The array whole-map display statistics are computed from: the full resolution when it
    fits :data:`STATS_BYTES`, else the finest pyramid level that does (the coarsest at worst)."""
    if not getattr(layer, "multiscale", False):
        return layer.data
    for level in layer.data:
        if math.prod(level.shape) * level.dtype.itemsize <= STATS_BYTES:
            return level
    return layer.data[-1]


def current_slice(viewer: Any, layer: Any) -> list[int | None]:
    """One entry per axis of ``layer``: the data index of the slice on screen for the axes
    that are not displayed, ``None`` for the displayed ones."""
    offset = viewer.dims.ndim - layer.ndim
    point = layer.world_to_data(viewer.dims.point)
    displayed = set(viewer.dims.displayed)
    return [None if axis + offset in displayed else math.floor(float(p) + 0.5)
            for axis, p in enumerate(point)]


def set_scope(viewer: Any, layer: Any, scope: str) -> tuple[float, float]:
    """Show ``layer`` in normalisation ``scope`` (see :mod:`napari_gradcam.core.normalise`):
    only its contrast limits change, and the scope is declared in its metadata
    (``metadata["napari_gradcam"]["display"]``). Returns the new limits."""
    check_scope(scope)
    raw = raw_limits(layer)
    current = current_slice(viewer, layer) if scope == "per slice" else None
    # a slice is read at full resolution; a whole-volume range from a level that fits
    data = full_resolution(layer) if scope == "per slice" else stats_level(layer)
    limits = scope_limits(data, scope, raw=raw, current=current)
    state = display_state(layer)
    state.update({"scope": scope, "scope_meaning": SCOPE_MEANINGS[scope],
                  "units": CAM_UNITS, "limits": [float(v) for v in limits]})
    if scope == "per slice":
        state["slice"] = [i for i in (current or []) if i is not None]
    else:
        state.pop("slice", None)
    layer.contrast_limits = limits
    return limits


def scope_of(layer: Any) -> str:
    """The scope a map is shown in (raw when none was chosen)."""
    return str(display_state(layer).get("scope", DEFAULT_SCOPE))


def caption(layer: Any) -> str:
    """What the colour bar shows, in words: the map, its units, scope and range. napari's
    colour bar has ticks but no title, so this goes beside it (the dock and the canvas text)."""
    record = map_record(layer) or {}
    low, high = (float(v) for v in layer.contrast_limits)
    what = f"{record.get('method', 'CAM')} · {record.get('target', '?')}"
    scope = scope_of(layer)
    where = ""
    if scope == "per slice" and display_state(layer).get("slice"):
        where = f" at {tuple(display_state(layer)['slice'])}"
    return (f"{what} [{CAM_UNITS}], {scope}{where}: {low:.3g} – {high:.3g}")


def source_layer(viewer: Any, layer: Any) -> Any | None:
    """The scan a map was computed from: the layer named in its provenance, if it is still
    there and is not a map itself."""
    name = (map_record(layer) or {}).get("source")
    if not name or name not in viewer.layers:
        return None
    source = viewer.layers[name]
    return None if map_record(source) is not None else source


# The layers' own opacities while the 3D style overrides them (a dimmed scan, a map drawn at
# full opacity), to give them back as they were in 2D.
_DIMMED: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()
# The maps' own blending while a 3D style overrides it, given back in 2D (a signed evidence
# map's "translucent", or whatever the user chose, not the explainer's default).
_BLENDING_2D: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()


def apply_3d_style(viewer: Any, layer: Any, style: str | None = None) -> str:
    """Give the map ``layer`` the 3D ``style`` (a key of :data:`STYLES_3D`; ``None``: the one
    it has, else the default) and record it in its metadata. The rendering is the map's own
    (napari uses it only in 3D); the blending and the dimmed scan apply only while the view is
    3D (:func:`leave_3d` undoes them), so the 2D overlay stays as it was."""
    state = display_state(layer)
    style = style or state.get("style_3d") or DEFAULT_STYLE_3D
    if style not in STYLES_3D:
        raise ValueError(f"3D style must be one of {', '.join(STYLES_3D)}, got {style!r}")
    settings = STYLES_3D[style]
    state["style_3d"] = style
    layer.rendering = settings["rendering"]
    if "attenuation" in settings:
        layer.attenuation = settings["attenuation"]
    if "percentile" in settings:
        threshold = top_percentile(stats_level(layer), settings["percentile"])
        state["iso_threshold"] = threshold
        layer.iso_threshold = threshold
    if viewer.dims.ndisplay == 3:
        _BLENDING_2D.setdefault(layer, str(layer.blending))
        layer.blending = settings["blending"]
        _set_opacity(layer, settings["opacity"])
        scan = source_layer(viewer, layer)
        if scan is not None:
            _dim(scan, settings["scan_opacity"])
    return style


def _set_opacity(layer: Any, opacity: float | None) -> None:
    """Set a 3D-only opacity, remembering the layer's own (``None``: give it back)."""
    if opacity is None:
        if layer in _DIMMED:
            layer.opacity = _DIMMED.pop(layer)
        return
    if layer not in _DIMMED:
        _DIMMED[layer] = float(layer.opacity)
    layer.opacity = opacity


_dim = _set_opacity


def leave_3d(viewer: Any) -> None:
    """Back to 2D: every map gets its 2D blending and opacity again, every dimmed scan its
    opacity."""
    for layer in list(viewer.layers):
        if layer in _BLENDING_2D:
            layer.blending = _BLENDING_2D.pop(layer)
        if layer in _DIMMED:
            layer.opacity = _DIMMED.pop(layer)


def show_map(viewer: Any, layer: Any) -> None:
    """Make a map that was just added read well: its raw range recorded and declared (scope
    raw), its colour bar shown, its 3D style set (applied now if the view is 3D), and the
    viewer followed so that switching 2D/3D and moving through slices keep the display right.

    The one call a shell makes after ``viewer.add_image`` of a map (the dock widget, the
    reader's users, scripts). Touches only display settings, never data.
    """
    state = display_state(layer)
    raw_limits(layer)
    if "scope" not in state:
        state.update({"scope": DEFAULT_SCOPE, "scope_meaning": SCOPE_MEANINGS[DEFAULT_SCOPE],
                      "units": CAM_UNITS})
    layer.colorbar.visible = True
    apply_3d_style(viewer, layer)
    follow_viewer(viewer)


_FOLLOWED: dict[int, Callable[[], None]] = {}


def follow_viewer(viewer: Any) -> None:
    """Connect (once per viewer) the callbacks that keep maps right when the view changes:
    entering 3D applies each map's 3D style, leaving it restores the 2D look; moving through
    slices updates the limits of maps shown per slice."""
    key = id(viewer)
    if key in _FOLLOWED:
        return
    ref = weakref.ref(viewer)

    def on_ndisplay(event: Any = None) -> None:
        owner = ref()
        if owner is None:
            return
        if owner.dims.ndisplay == 3:
            for layer in list(owner.layers):
                if is_map_layer(layer) and DISPLAY_KEY in (map_record(layer) or {}):
                    apply_3d_style(owner, layer)
        else:
            leave_3d(owner)
        on_point()

    def on_point(event: Any = None) -> None:
        owner = ref()
        if owner is None:
            return
        for layer in list(owner.layers):
            if (is_map_layer(layer) and (map_record(layer) or {}).get(DISPLAY_KEY, {})
                    .get("scope") == "per slice"):
                set_scope(owner, layer, "per slice")

    viewer.dims.events.ndisplay.connect(on_ndisplay)
    viewer.dims.events.point.connect(on_point)
    _FOLLOWED[key] = on_ndisplay
    weakref.finalize(viewer, _FOLLOWED.pop, key, None)
