"""The napari dock widget: gather choices, run a job in a thread, turn results into layers.

No computation lives here: the job (:func:`napari_gradcam.jobs.explain_job`) is a generator
that yields progress and returns maps, predictions and provenance; this widget captures what
it needs from the viewer when *Run* is pressed (the source layer's data, transforms and
current position, so switching layers mid-run cannot misplace the result), runs the job in a
napari thread worker (the GUI stays responsive, *Run* becomes *Cancel*, cancelling stops before
the next batch and adds nothing), and finally adds or updates one layer per map
(:meth:`GradCAMWidget.add_result_layers`, the one place results become layers).

The form is built from magicgui widgets (``self.form``, a :class:`magicgui.widgets.Container`;
``self.labels_form`` on the second tab). Its layer pickers hold the layers themselves, not
their names, and are refilled on napari's layer events (insert, remove, reorder, rename), so a
renamed layer stays chosen. Qt is used only where magicgui has no widget: the two tables and
the tab bar. The ``*_combo`` / ``*_spin`` attributes are the Qt controls under the magicgui
widgets (``form.<name>.native``), kept for scripts written against the earlier Qt form.

Also here: a click without drag with Alt (or Ctrl) on the image explains the plane / window /
row / predicted region under the cursor (a drag -- napari's Alt-drag zoom -- does not), and
marks the point in a Points layer.

The widget is one class, :class:`GradCAMWidget`, put together from one mixin per job, each in
its own file (this one keeps the tabs, gathering the choices, running and the click):

- :mod:`napari_gradcam._widget_form`: the form and the lists that follow the viewer and the
  model (layers, axes, channel axis, target layer, target, region labels, the map's file), and
  a file's declared voxel size applied to a layer at scale 1 (only on the button's click);
- :mod:`napari_gradcam._widget_models`: the model list, trust, *Browse …*;
- :mod:`napari_gradcam._widget_settings`: the last choices, remembered between sessions;
- :mod:`napari_gradcam._widget_layers`: results → layers (names, metadata, placement,
  uncertainty, the click marker);
- :mod:`napari_gradcam._widget_predictions`: the predictions panel under the cursor and the
  CAM value and predicted class in the status bar while hovering a map;
- :mod:`napari_gradcam._widget_label_table`: the per-label table of a CAM inside a Labels
  layer (stored in that Labels layer's ``features`` -- a change to a user's layer made only on
  request -- and exportable to CSV).

The names scripts and tests import from this module (:data:`__all__`) stay importable here.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import Container, ProgressBar, PushButton
from napari.layers import Image, Labels, Shapes
from napari.utils.notifications import show_error, show_warning
from qtpy.QtWidgets import QBoxLayout, QLabel, QTabWidget, QVBoxLayout, QWidget

from napari_gradcam._live_map import LiveMap
from napari_gradcam._qt_common import (
    METADATA_KEY,
    RunControlsMixin,
    displayed_plane,
    image_source,
    model_summary,
    placement,
    region_mask,
)
from napari_gradcam._widget_form import (
    ALL_CLASSES,
    COLORMAPS,
    DISK_MAP_BYTES,
    LAZY_DISK_MAP_BYTES,
    MODE_LABELS,
    NO_REGION,
    PREDICTED,
    UNCERTAINTY_CHOICES,
    FormMixin,
    axis_name,
    file_voxel_size,
    label_names,
    regression_entries,
    scrolled,
)
from napari_gradcam._widget_label_table import LabelTableMixin, merged_features
from napari_gradcam._widget_layers import (
    CLICKS_LAYER,
    MODE_NAMES,
    UNCERTAINTY_SUFFIX,
    ResultLayersMixin,
    _Capture,
)
from napari_gradcam._widget_models import ModelChoiceMixin
from napari_gradcam._widget_predictions import PredictionsMixin
from napari_gradcam._widget_settings import RememberedChoicesMixin
from napari_gradcam.jobs import (
    ExplainRequest,
    ExplainResult,
    ImageSource,
    JobError,
    TargetChoice,
    explain_job,
    plan_explanation,
)

if TYPE_CHECKING:
    import napari

    from napari_gradcam.core.layer_discovery import LayerInfo
    from napari_gradcam.core.models import LoadedModel

__all__ = [  # what scripts and tests import from here, wherever it now lives
    "ALL_CLASSES",
    "CLICKS_LAYER",
    "COLORMAPS",
    "DISK_MAP_BYTES",
    "LAZY_DISK_MAP_BYTES",
    "METADATA_KEY",
    "MODE_LABELS",
    "MODE_NAMES",
    "NO_REGION",
    "PREDICTED",
    "UNCERTAINTY_CHOICES",
    "UNCERTAINTY_SUFFIX",
    "GradCAMWidget",
    "axis_name",
    "file_voxel_size",
    "label_names",
    "merged_features",
    "model_summary",
    "regression_entries",
]

CLICK_MODIFIERS = ("Alt", "Control")
CLICK_TOLERANCE_PX = 4.0
"""A press and release further apart than this (screen pixels) is a drag, not a click: Alt-drag
is napari's zoom, and a zoom must not start a run."""


def _modifier_names(event: Any) -> set[str]:
    names = set()
    for modifier in getattr(event, "modifiers", ()) or ():
        names.add(getattr(modifier, "name", None) or str(modifier))
    return names


class GradCAMWidget(FormMixin, ModelChoiceMixin, RememberedChoicesMixin, ResultLayersMixin,
                    PredictionsMixin, LabelTableMixin, RunControlsMixin, QWidget):
    """Grad-CAM explainer dock widget (see the module docstring)."""

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.loaded: LoadedModel | None = None
        self.worker: Any = None
        self.last_result: ExplainResult | None = None
        self.last_table: dict[str, np.ndarray] | None = None
        self.last_table_provenance: dict[str, Any] | None = None
        self._results: dict[str, ExplainResult] = {}
        self._model_cache: dict[tuple[str, bool, str], LoadedModel] = {}
        self._model_entries: list[tuple[str, Any]] = []
        self._layer_infos: list[LayerInfo] = []
        self._pending: tuple[_Capture, ExplainRequest] | None = None
        self._predictions_key: object = None
        self._watched_region: Any = None
        self._restoring = False
        self._last_capture: _Capture | None = None
        self._live: LiveMap | None = None
        self._loaded_with_trust = False
        self._job: Any = None
        self._suggested_output: Path | None = None
        self._disk_default_for: tuple[int, str] | None = None
        self._build()
        self._connect_viewer()
        self._fill_models()
        self.reset_choices()
        self._follow_active_layer()
        self._restore_choices()

    # ---------------------------------------------------------------------------------------
    # Construction

    def _build(self) -> None:
        """The two tabs: the form with *Run* and the predictions, and the label table."""
        self.setMaximumWidth(500)
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        self.tabs = QTabWidget()
        outer.addWidget(self.tabs)
        f = self._build_form()

        explain_tab = QWidget()
        layout = QVBoxLayout(explain_tab)
        layout.addWidget(f.native)
        self._build_run_controls(layout)
        hint = QLabel("Alt-click (click without dragging) on the image: explain what is under "
                      "the cursor. Alt-drag zooms as usual.")
        hint.setWordWrap(True)
        layout.addWidget(hint)
        layout.addWidget(self._build_predictions_box())
        layout.addStretch(1)
        self.tabs.addTab(scrolled(explain_tab), "Explain")
        self.tabs.addTab(self._build_labels_tab(), "CAM inside labels")

    def _build_run_controls(self, layout: QBoxLayout) -> None:
        """*Run* (becomes *Cancel*) and the progress bar, as magicgui widgets; the mixin
        drives their Qt controls."""
        self.run_controls = Container(labels=False, widgets=[
            PushButton(name="run_button", text="Run"),
            ProgressBar(name="progress", min=0, max=1, value=0),
        ])
        self.run_controls.run_button.changed.connect(lambda *_: self.run())
        self.run_button = self.run_controls.run_button.native
        self.progress_bar = self.run_controls.progress.native
        layout.addWidget(self.run_controls.native)

    def _connect_viewer(self) -> None:
        layers = self.viewer.layers
        for event in (layers.events.inserted, layers.events.removed, layers.events.reordered,
                      layers.events.renamed):
            event.connect(self.reset_choices)
        layers.selection.events.active.connect(self._follow_active_layer)
        self.viewer.dims.events.current_step.connect(self._update_predictions_view)
        self.viewer.cursor.events.position.connect(self._update_predictions_view)
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
    # Gathering the choices

    def _gather(self, click_point: tuple[int, ...] | None = None,
                world_point: Sequence[float] | None = None
                ) -> tuple[_Capture, ExplainRequest]:
        """Capture the source layer and the choices now; raise ValueError on bad input."""
        if self.loaded is None:
            raise ValueError("Choose a model first (a demo model or Browse for a card / .pt2).")
        f = self.form
        layer = self._source_layer()
        if layer is None:
            raise ValueError(self._no_image_message())
        if not isinstance(layer, Image):
            raise ValueError(f"{layer.name!r} is not an image layer.")
        source = image_source(self.viewer, layer, click_point)
        layer_data = source.data
        offset = (0,) * source.ndim
        card = self.loaded.card
        if click_point is not None and card.spatial_dims == 1 and source.ndim >= 2:
            # a click on a stack of spectra explains the row under it, not every row
            source, offset = _one_row(source, click_point)
        choice = f.target.value or ("predicted", None)
        kind, class_index = choice[0], choice[1]
        if click_point is not None:
            target = TargetChoice("click", point=tuple(
                p - o for p, o in zip(click_point, offset, strict=True)))
        elif kind == "regression":
            _kind, index, sign, property_name = choice
            target = TargetChoice("regression", output_index=index, sign=sign,
                                  property_name=property_name)
        elif card.task == "segmentation" and kind == "class":
            region = f.region.value
            mask, region_name = None, None
            if isinstance(region, (Labels, Shapes)) and f.region.enabled:
                value = f.region_labels.value if isinstance(region, Labels) else None
                mask = region_mask(region, source.shape, layer.name,
                                   None if value is None else (value,))
                region_name = repr(region.name) + ("" if value is None else f" label {value}")
            target = TargetChoice("region", class_index=class_index, mask=mask,
                                  region_name=region_name)
        else:
            target = TargetChoice(kind, class_index=class_index)
        mode = "current" if click_point is not None else f.mode.value
        uncertainty = tuple(f.uncertainty.value or ())
        if mode == "windows" and f.windows_uncertainty.enabled and f.windows_uncertainty.value:
            uncertainty += ("windows",)
        request = ExplainRequest(
            method=f.method.value,
            layer=f.target_layer.value or None,
            target=target,
            mode=mode,
            axis=f.axis.value if mode == "slices" else None,
            plane=displayed_plane(self.viewer, layer),
            window=tuple(int(spin.value) for spin in f.window),
            overlap=float(f.overlap.value),
            batch_size=int(f.batch_size.value),
            device=f.device.value or None,
            channel_axis=f.channel_axis.value if f.channel_axis.enabled else None,
            uncertainty=uncertainty,
            output=self._output_for(mode),
        )
        plan = plan_explanation(self.loaded, source, request)
        origin = tuple(o + s for o, s in zip(plan.origin(source.shape), offset, strict=True))
        return _Capture(layer.name, source, placement(layer, origin), offset,
                        tuple(str(a) for a in layer.axis_labels),
                        None if world_point is None else tuple(float(p) for p in world_point),
                        layer_data), request

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

    def run(self, *_args: object, click_point: tuple[int, ...] | None = None,
            world_point: Sequence[float] | None = None) -> Any:
        """Start a run (or cancel the running one). Returns the worker, or None."""
        if self.worker is not None:
            self.cancel()
            return None
        try:
            capture, request = self._gather(click_point, world_point)
        except (ValueError, TypeError) as error:
            show_error(str(error))
            return None
        self._save_choices()
        job = explain_job(self.loaded, capture.source, request)
        self._job = job
        self._pending = (capture, request)
        self._live = self._live_map(capture, request)
        return self._start_worker(_guarded, job)

    def _live_map(self, capture: _Capture, request: ExplainRequest) -> LiveMap | None:
        """The layer that shows an on-disk map while it is written (one map per run only:
        "all classes" writes one store per class, shown when the run ends)."""
        if request.output is None or request.target.kind == "all":
            return None
        name = (f"{capture.name} · {request.method} · being written to "
                f"{Path(request.output).name}")
        kwargs = {"colormap": self.form.colormap.value, "blending": "additive",
                  "opacity": float(self.form.opacity.value), **capture.placement}
        return LiveMap(self.viewer, request.output, name, kwargs)

    def _on_progress(self, value: tuple[int, int]) -> None:
        done, total = value
        self.progress_bar.setRange(0, max(int(total), 1))
        self.progress_bar.setValue(int(done))
        if self._live is not None:
            try:
                self._live.update()
            except Exception as error:  # showing must never stop the run that writes
                show_warning(f"Could not show the map while it is written: {error}")
                self._live.finish()  # no half-made layer left behind; the map comes at the end
                self._live = None

    def _on_returned(self, result: ExplainResult) -> None:
        """Add the maps of a finished run, also when its source layer is gone.

        If the source layer was removed (or its data replaced) during the run, the map is
        still added, where the source was (its transforms were captured at *Run*), with a
        warning saying so: the computation may have taken minutes, and the map stays valid
        for the data it was computed on. Deleting a layer is one keystroke; silently dropping
        an expensive result, or silently adding a map with no source beside it, would leave
        the user guessing.
        """
        if self._pending is None:
            return
        capture, _request = self._pending
        if self._live is not None:
            self._live.finish()
            self._live = None
        try:
            self.add_result_layers(capture, result)
        except Exception as error:  # adding a layer must never take the widget down
            show_error(f"Could not add the result layer: {error}")
            return
        if not self._source_still_there(capture):
            show_warning(
                f"The layer {capture.name!r} was removed (or its data replaced) while "
                "Grad-CAM ran. Its map was added anyway, where the layer was, because it is "
                "valid for the data it was computed on; delete it if you no longer need it.")

    def _source_still_there(self, capture: _Capture) -> bool:
        """Whether the viewer still holds the explained data (under any name)."""
        data = capture.source.data if capture.layer_data is None else capture.layer_data
        for layer in self.viewer.layers:
            if isinstance(layer, Image) and (
                    layer.data[0] if layer.multiscale else layer.data) is data:
                return True
        return False

    def _on_errored(self, error: BaseException) -> None:
        show_error(str(error) if isinstance(error, JobError)
                   else f"The explanation failed: {type(error).__name__}: {error}")

    def _on_finished(self) -> None:
        job, self._job = self._job, None
        if job is not None:  # napari's worker does not close a cancelled generator: release it
            job.close()
        live, self._live = self._live, None
        kept = live.abandon() if live is not None else None
        if kept is not None:
            self._end_run(f"Grad-CAM run cancelled; the part done is kept in {live.path} and "
                          f"shown as {kept.name!r}.")
        else:
            self._end_run("Grad-CAM run cancelled; nothing was added.")

    # ---------------------------------------------------------------------------------------
    # Click to explain

    def _on_mouse_press(self, viewer: Any, event: Any) -> Any:
        """Alt/Ctrl + click without drag explains the point; a drag (Alt-drag zoom) does not.

        A napari drag callback: it runs on press, resumes on every move and once on release.
        The run starts on the release, and only if the pointer stayed within
        :data:`CLICK_TOLERANCE_PX` screen pixels of the press.
        """
        if not _modifier_names(event) & set(CLICK_MODIFIERS):
            return
        press_world = tuple(float(p) for p in event.position)
        press_screen = np.asarray(getattr(event, "pos", (0.0, 0.0)), dtype=float)
        dragged = False
        yield
        while getattr(event, "type", None) == "mouse_move":
            moved = np.asarray(getattr(event, "pos", press_screen), dtype=float) - press_screen
            if float(np.hypot(*moved[:2])) > CLICK_TOLERANCE_PX:
                dragged = True
            yield
        if not dragged:
            self.explain_at(press_world)

    def explain_at(self, world_position: Sequence[float]) -> Any:
        """Explain what is under a world position (what Alt-click does); returns the worker."""
        if self.worker is not None:
            show_warning("A Grad-CAM run is in progress; wait for it or cancel it first.")
            return None
        layer = self._source_layer()
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
        return self.run(click_point=index, world_point=world_position)


def _one_row(source: ImageSource, point: Sequence[int]) -> tuple[ImageSource, tuple[int, ...]]:
    """The row of a stack of spectra under ``point`` as a source of its own, and its offset.

    A 1D model's rows lie along the second-to-last axis; the data is a view (a dask or zarr
    array stays lazy), and the job sees one row, so a click explains that row only.
    """
    axis = source.ndim - 2
    row = int(point[axis])
    key = tuple(slice(row, row + 1) if a == axis else slice(None) for a in range(source.ndim))
    offset = tuple(row if a == axis else 0 for a in range(source.ndim))
    local = tuple(p - o for p, o in zip(point, offset, strict=True))
    return replace(source, data=source.data[key], current_index=local), offset


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
