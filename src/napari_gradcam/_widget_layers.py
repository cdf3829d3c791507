"""Results → layers: a finished run's maps, uncertainty and click marker become napari layers.

Why a file of its own: this is the one place a run's :class:`napari_gradcam.jobs.ExplainResult`
becomes layers (:meth:`ResultLayersMixin.add_result_layers`): their names (everything that
changes a map is in its name, so another setting adds a layer and the same setting updates it),
their metadata (the provenance, predictions and domain check under
:data:`napari_gradcam._qt_common.METADATA_KEY`) and their placement (the source layer's
transforms, captured at *Run* in :class:`_Capture`). Extend it here, not beside it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from napari.layers import Image, Points
from napari.utils.notifications import show_warning

from napari_gradcam._qt_common import METADATA_KEY
from napari_gradcam._widget_form import axis_name
from napari_gradcam.core.run.output import coarse_limits, label_path
from napari_gradcam.display import show_map
from napari_gradcam.io import uncertainty_path
from napari_gradcam.jobs import ExplainResult, ImageSource, contrast_limits, map_layer_data

if TYPE_CHECKING:
    import napari
    from magicgui.widgets import Container

    from napari_gradcam.core.models import LoadedModel

MODE_NAMES = {"current": "current view", "slices": "slices", "windows": "volume"}
"""How a mode reads in a map's layer name."""
CLICKS_LAYER = "Grad-CAM clicks"
"""The Points layer that marks where a click explained something (made by the widget)."""
UNCERTAINTY_SUFFIX = " · uncertainty"
"""An uncertainty layer is named after its map with this suffix."""


@dataclass(frozen=True)
class _Capture:
    """The source layer as it was when a run started: its data and where its maps go.

    ``placement``: the layer kwargs for the maps (the layer's transforms, copied at *Run*,
    shifted to the origin of the part explained). ``offset``: where the explained data starts
    in the layer (non-zero when a click explains one row of a stack of spectra: the job then
    sees that row only). ``axis_labels``: the layer's, for the map's name.
    """

    name: str
    source: ImageSource
    placement: dict[str, Any]
    offset: tuple[int, ...] = ()
    axis_labels: tuple[str, ...] = ()
    world_point: tuple[float, ...] | None = None
    layer_data: Any = None


class ResultLayersMixin:
    """Add or update the layers of a result; remember it for hover and predictions.

    Needs ``self.viewer``, ``self.form`` (colormap, opacity), ``self.loaded``,
    ``self._results`` (layer name → result), ``labels_form``, and the form's ``_layer``,
    ``_is_result``, ``_choose`` and ``reset_choices``; the predictions panel's
    ``_install_status`` and ``_update_predictions_view``
    (:class:`napari_gradcam._widget_predictions.PredictionsMixin`).
    """

    viewer: napari.viewer.Viewer
    form: Container
    labels_form: Container
    loaded: LoadedModel | None
    last_result: ExplainResult | None
    _last_capture: _Capture | None
    _results: dict[str, ExplainResult]
    _predictions_key: object

    @staticmethod
    def result_name(result: ExplainResult, label: str,
                    axis_labels: Sequence[str] = ()) -> str:
        """The map's layer name: source · method · target · model:layer · mode.

        Everything that changes the map is in the name, so a run with another model, layer,
        region or slice axis adds a layer beside the earlier one instead of silently
        replacing it; a run with identical settings (at another slice, say) updates it. The
        slice axis is named by the layer's axis label ('slices along z'); a click names the
        class it explained ('clicked crack').
        """
        record = result.provenance
        model = record.get("model") or "model"
        layers = "+".join(str(name) for name in record.get("layers") or [])
        if result.mode == "slices":
            mode = f"slices along {axis_name(axis_labels, int(result.sample_axis or 0))}"
        else:
            mode = MODE_NAMES.get(result.mode, "current view")
        return (f"{result.source_name} · {result.method} · {_shown_label(result, label)} · "
                f"{model}:{layers} · {mode}")

    def add_result_layers(self, capture: _Capture, result: ExplainResult) -> list[Image]:
        """Add (or update in place) one layer per map of ``result``, and its uncertainty.

        The one place a run's result becomes layers: extend it here (e.g. maps written to
        disk) rather than beside it. Returns the map layers.
        """
        predictions = {
            "class_names": list(result.class_names),
            "probabilities": np.asarray(result.predictions).round(6).tolist(),
            # in the layer's indices (a clicked row of a stack was explained as a one-row source)
            "positions": [[int(a) + int(o) for a, o in zip(p, capture.offset, strict=False)]
                          for p in result.positions],
            "sample_axis": result.sample_axis,
            "target_indices": (None if result.target_indices is None
                               else [int(i) for i in result.target_indices]),
        }
        layers = []
        output = (result.provenance.get("options") or {}).get("map_store")
        for label, data in result.maps.items():
            if output:  # on disk: the store's pyramid, read lazily
                data = map_layer_data(label_path(output, label, several=len(result.maps) > 1))
            name = self.result_name(result, label, capture.axis_labels)
            record = {**result.provenance, "target": _shown_label(result, label),
                      "predictions": predictions, "domain_check": result.domain}
            if any(capture.offset):  # one row of a stack: say where it sits in the layer
                options = dict(record.get("options") or {})
                options["origin"] = [int(o) + int(s) for o, s in zip(
                    options.get("origin") or result.origin, capture.offset, strict=True)]
                options["explained_row_of"] = capture.name
                record["options"] = options
            if self.loaded is not None:
                tolerance = (self.loaded.card.metrics or {}).get("pointing_tolerance_px")
                if isinstance(tolerance, (int, float)):
                    record.setdefault("pointing_tolerance_px", float(tolerance))
            kwargs = {
                "colormap": self.form.colormap.value,
                "blending": "additive",
                "opacity": float(self.form.opacity.value),
                "contrast_limits": result.contrast_limits[label],
                "metadata": {METADATA_KEY: record},
                **capture.placement,
            }
            multiscale = isinstance(data, list)
            if multiscale and len(data) == 1:
                data, multiscale = data[0], False
            ndim = data[0].ndim if multiscale else data.ndim
            existing = self._layer(name)
            if (isinstance(existing, Image) and self._is_result(existing)
                    and existing.ndim == ndim and bool(existing.multiscale) == multiscale):
                self._update_layer(existing, data, kwargs)
                layer = existing
            else:
                if existing is not None and self._is_result(existing):
                    self.viewer.layers.remove(existing)  # our own earlier map, other axes
                layer = self.viewer.add_image(data, name=name, multiscale=multiscale, **kwargs)
            show_map(self.viewer, layer)  # colour bar, declared scope, 3D style (also updated)
            self._install_status(layer)
            self._results[name] = result
            layers.append(layer)
            if label in result.uncertainty:
                self._show_uncertainty(capture, result, label, name)
            else:  # an earlier run's spread no longer describes the updated map
                stale = self._layer(name + UNCERTAINTY_SUFFIX)
                if stale is not None and self._is_result(stale):
                    self.viewer.layers.remove(stale)
        if capture.world_point is not None:
            self._mark_click(capture.world_point, layers[0].name if layers else "")
        self.last_result = result
        self._last_capture = capture
        self.reset_choices()
        if layers:
            self._choose(self.labels_form.cam, layers[0])
        self._predictions_key = None
        self._update_predictions_view()
        domain = result.domain
        if domain and domain.get("out_of_domain"):
            show_warning(f"{result.source_name}: {domain['message']}")
        return layers

    def _mark_click(self, world_point: Sequence[float], map_name: str) -> None:
        """Put the clicked point in the widget's own Points layer (one marker per click)."""
        point = np.asarray([world_point], dtype=float)
        marker = self._layer(CLICKS_LAYER)
        if isinstance(marker, Points) and marker.ndim == point.shape[1]:
            marker.data = np.concatenate([np.asarray(marker.data), point])
            marker.features = {"map": [*list(marker.features.get("map", [])), map_name]}
        else:
            if marker is not None:
                self.viewer.layers.remove(marker)
            self.viewer.add_points(point, name=CLICKS_LAYER, size=6, symbol="cross",
                                   face_color="cyan", features={"map": [map_name]},
                                   metadata={METADATA_KEY + "_clicks": True})

    def _show_uncertainty(self, capture: _Capture, result: ExplainResult, label: str,
                          map_name: str) -> Image:
        """Add or update the uncertainty layer of one map: placed exactly like the map, hidden
        at first (shown over the map it would hide it), its metadata saying what it measures.
        """
        std: Any = result.uncertainty[label]
        limits: tuple[float, float] | None = None
        output = (result.provenance.get("options") or {}).get("map_store")
        if output:  # on disk: its pyramid, its range from the coarsest level (never all of it)
            store = uncertainty_path(label_path(output, label, several=len(result.maps) > 1))
            levels = map_layer_data(store)
            std = levels if len(levels) > 1 else levels[0]
            limits = coarse_limits(store)
        info = result.uncertainty_info or {}
        metadata = {METADATA_KEY: {
            **result.provenance, "target": label, "uncertainty_of": map_name,
            "uncertainty": info, "meaning": dict(info.get("meaning") or {}),
            "domain_check": result.domain}}
        kwargs = {
            "colormap": "viridis",
            "blending": "additive",
            "opacity": float(self.form.opacity.value),
            "contrast_limits": limits or contrast_limits(std),
            "metadata": metadata,
            **capture.placement,
        }
        name = map_name + UNCERTAINTY_SUFFIX
        multiscale = isinstance(std, list)
        ndim = std[0].ndim if multiscale else std.ndim
        existing = self._layer(name)
        if (isinstance(existing, Image) and self._is_result(existing)
                and existing.ndim == ndim and bool(existing.multiscale) == multiscale):
            self._update_layer(existing, std, kwargs)
            return existing
        if existing is not None and self._is_result(existing):
            self.viewer.layers.remove(existing)
        return self.viewer.add_image(std, name=name, visible=False, multiscale=multiscale,
                                     **kwargs)

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


def _shown_label(result: ExplainResult, label: str) -> str:
    """A click's map names the class it explained ('clicked crack'), other labels stay."""
    if label != "clicked" or result.target_indices is None or not len(result.target_indices):
        return label
    return f"clicked {_class_name(result, int(np.asarray(result.target_indices).ravel()[0]))}"


def _class_name(result: ExplainResult, index: int) -> str:
    names = result.class_names
    return str(names[index]) if 0 <= index < len(names) else f"class {index}"
