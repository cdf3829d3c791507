"""Qt pieces both dock widgets share: layer combos that follow the viewer, and the model picker.

The explainer (:mod:`napari_gradcam._widget`) and the evidence widget
(:mod:`napari_gradcam._evidence_widget`) pick an image layer and a model the same way; keeping
that logic here means a fix (say, to how a combo keeps its selection when layers change) reaches
both. Everything is written against ``qtpy`` so any Qt binding napari runs on works.

The widgets inherit :class:`ChoiceFormMixin` (which combines the layer and model mixins and
builds the form rows they share) and :class:`RunControlsMixin` (Run/Cancel and the thread
worker's life); each mixin lists the attributes it expects. They define no
``__init__``, so they sit in front of ``QWidget`` in the bases without touching Qt's
construction.
"""

from __future__ import annotations

import string
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from napari.layers import Image, Shapes
from napari.qt.threading import create_worker
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtWidgets import (
    QBoxLayout,
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QWidget,
)

from napari_gradcam.jobs import ImageSource
from napari_gradcam.placement import layer_transform

if TYPE_CHECKING:
    import napari

    from napari_gradcam.core.models import LoadedModel

METADATA_KEY = "napari_gradcam"
"""Result layers of both widgets keep their provenance under this metadata key; it is also how
a widget tells its own maps from the user's images."""
NO_MODEL = "— choose a model —"
"""The model combo's first entry: nothing loaded yet."""
BROWSE = "Browse card / .pt2 …"
"""The model combo's last entry: opens a file dialog."""
MODEL_FILE_FILTER = "Models (*.yaml *.yml *.pt2 *.pt *.pth);;All files (*)"
"""Cards, exported programs, and pickles (the latter load only with *trust* ticked)."""
TRUST_TOOLTIP = ("Pickled models, custom architectures (a module or a .py file, bioimage.io "
                 "packages), weights outside the card's folder and .pt2 files with pickled objects "
                 "run code or read other files: only for models you trust.")


def ask_model_file(parent: QWidget | None) -> str | None:
    """Ask for a model card or exported model with a file dialog; None when cancelled.

    The one *Browse …* dialog of both widgets. It only picks a path: whether the file may run
    code is decided when it is loaded, by the widget's *trust model code* box.
    """
    path, _ = QFileDialog.getOpenFileName(
        parent, "Open a model card or exported model", "", MODEL_FILE_FILTER)
    return path or None


def chosen_model_source(parent: QWidget | None, choice: object) -> str | None:
    """What to load for a model-list entry: a demo model's name, a file's path, or, for
    *Browse …*, the file the user picks now (:func:`ask_model_file`). None: nothing to load
    (the placeholder entry, or the dialog was cancelled)."""
    if choice is None:
        return None
    if choice == BROWSE:
        return ask_model_file(parent)
    return str(choice)


def demo_model_names() -> list[str]:
    """The shipped demo models' names for a model list; none (with a warning) when a card is
    broken, since a broken card must not take a widget down."""
    from napari_gradcam.core.models import list_demo_models

    try:
        return [card.name for card in list_demo_models()]
    except Exception as error:
        show_warning(f"napari-gradcam: could not list the demo models ({error})")
        return []


def model_summary(card: Any) -> str:
    """What the model is (task, dimensions, channels, classes) and, on a line of its own, the
    card's description: what the model was trained on, which says what data it fits. The text
    under a widget's model list."""
    summary = (f"{card.name}: {card.task}, {card.spatial_dims}D, {card.in_channels} "
               f"channel(s), classes {', '.join(card.class_names)}.")
    description = " ".join(str(card.description or "").split())
    return f"{summary}\n{description}" if description else summary


def refill_combo(combo: QComboBox, names: Iterable[str], keep_first: Sequence[str] = ()) -> None:
    """Replace a combo's items with ``keep_first + names``, keeping the chosen text if present.

    Signals are blocked while refilling: clearing would otherwise announce a selection change
    for every layer event, and a layer being added must not reset what the user chose.
    """
    items = [*keep_first, *names]
    current = combo.currentText()
    combo.blockSignals(True)
    combo.clear()
    combo.addItems(items)
    if current in items:
        combo.setCurrentText(current)
    combo.blockSignals(False)


def is_result_layer(layer: object) -> bool:
    """True for an image layer one of our widgets made (it carries our provenance)."""
    return isinstance(layer, Image) and METADATA_KEY in getattr(layer, "metadata", {})


LIVE_MAP_KEY = "napari_gradcam_map_store"
"""Metadata key of a map being written to disk and shown while it is made (its store's path);
such a layer is neither a finished map nor something to explain."""


def is_source_image(layer: object) -> bool:
    """True for an image layer a user could explain: an Image that is not one of our maps
    (finished, or still being written)."""
    return (isinstance(layer, Image) and not is_result_layer(layer)
            and LIVE_MAP_KEY not in getattr(layer, "metadata", {}))


def displayed_plane(viewer: napari.viewer.Viewer, layer: Image) -> tuple[int, ...] | None:
    """The layer's two displayed axes (in its own axis numbering), or None when not 2D view.

    A layer with fewer dimensions than the viewer sees only the trailing viewer axes, hence
    the offset.
    """
    offset = viewer.dims.ndim - layer.ndim
    plane = tuple(a - offset for a in viewer.dims.displayed if a - offset >= 0)
    return plane if len(plane) == 2 else None


def image_source(viewer: napari.viewer.Viewer, layer: Image,
                 point: Sequence[int] | None = None) -> ImageSource:
    """``layer`` as the job's :class:`ImageSource`, positioned at data index ``point``.

    Without ``point``, at the viewer's current position mapped into the layer's data (rounded).
    The position is clamped into the data now (by :meth:`ImageSource.index`, the one clamp), so
    a viewer point beyond a smaller layer still picks its last slice. Multiscale layers give
    their full-resolution level: maps are placed in its pixel grid.
    """
    data = layer.data[0] if layer.multiscale else layer.data
    if point is None:
        point = tuple(round(float(p)) for p in layer.world_to_data(viewer.dims.point))
    path = getattr(getattr(layer, "source", None), "path", None)
    source = ImageSource(layer.name, data, rgb=bool(layer.rgb), current_index=tuple(point),
                         voxel_size=voxel_size_um(layer), path=str(path) if path else None,
                         scale=tuple(float(s) for s in layer.scale),
                         translate=tuple(float(t) for t in layer.translate))
    return replace(source, current_index=source.index())


def voxel_size_um(layer: Image) -> tuple[float, ...] | None:
    """The layer's pixel size per axis in micrometres, or None when it is not a length.

    Only a scale with length units (``units=("nm", "nm")``, as readers of OME files set) is a
    physical size; napari's default unit is "pixel", and a scale in pixels says nothing about
    magnification, so the out-of-domain check then leaves the voxel size unchecked rather
    than comparing a made-up size with the training data's.
    """
    from napari_gradcam.io import to_micrometers  # one unit table for files and layers

    sizes = [abs(float(scale)) for scale in layer.scale]
    names = string.ascii_lowercase[:len(sizes)]
    try:
        scale, unit = to_micrometers(sizes, [str(u) for u in layer.units], names, layer.name)
    except ValueError:  # a length on one axis and pixels on another: no common size
        return None
    return scale if unit == "micrometer" else None


def placement(layer: Image, origin: Sequence[int]) -> dict[str, Any]:
    """Layer kwargs that put a map whose first pixel is data index ``origin`` on ``layer``
    (:func:`napari_gradcam.placement.layer_transform`). Called when *Run* is pressed: the
    values are copies, so moving the layer mid-run cannot misplace the result."""
    return layer_transform(layer, origin)


def region_mask(layer: Any, shape: tuple[int, ...], image_name: str,
                values: Sequence[int] | None = None) -> np.ndarray:
    """The pixels of a Labels or Shapes ``layer`` as a bool mask of ``shape``.

    A Labels layer gives its pixels whose label is one of ``values`` (``None``: every
    non-zero label), so a crack (label 2) can be the region without the pores (label 1)
    painted in the same layer. A copy: painting during the run changes nothing. A Labels
    layer must have the image's shape, and a chosen value must be present (``ValueError``
    otherwise); Shapes are rasterised onto it.
    """
    if isinstance(layer, Shapes):
        return np.asarray(layer.to_labels(labels_shape=shape)) != 0
    if tuple(layer.data.shape) != tuple(shape):
        raise ValueError(f"the region layer {layer.name!r} has shape {tuple(layer.data.shape)} "
                         f"but the image {image_name!r} has {tuple(shape)}; they must match")
    data = np.asarray(layer.data)
    if values is None:
        return data != 0
    mask = np.isin(data, np.asarray(list(values), dtype=data.dtype))
    if not mask.any():
        raise ValueError(f"the Labels layer {layer.name!r} has no pixel with label "
                         f"{', '.join(str(v) for v in values)}; paint it first or choose "
                         "another label")
    return mask


ALL_LABELS = "all non-zero labels"
"""The first entry of a label-value picker: every painted label is the region."""


def label_values(layer: Any) -> list[int]:
    """The non-zero label values present in an in-memory Labels layer, in order.

    Lazy (dask, zarr) or multiscale label data is not read whole just to fill a list: it
    offers no values, and the region is every non-zero label.
    """
    data = getattr(layer, "data", None)
    if not isinstance(data, np.ndarray):
        return []
    return [int(v) for v in np.unique(data) if v != 0]


def label_value_text(layer: Any, value: int) -> str:
    """'2 · crack' when the layer's metadata names its labels (the samples do), else '2'."""
    names = (getattr(layer, "metadata", None) or {}).get("labels") or {}
    name = names.get(value, names.get(str(value))) if isinstance(names, dict) else None
    return f"{value} · {name}" if name else str(value)


class RefreshingComboBox(QComboBox):
    """A combo that refills itself just before it opens.

    For choices that follow data the user keeps changing (the labels painted so far), which
    napari announces by no single event a widget could listen to cheaply.
    """

    def __init__(self, refill: Callable[[], None]) -> None:
        super().__init__()
        self._refill = refill

    def showPopup(self) -> None:  # Qt's name for "about to open"
        self._refill()
        super().showPopup()


def fill_layer_combo(combo: QComboBox, loaded: LoadedModel) -> None:
    """List the model's feature layers (name, type, output shape); select the card's layer.

    The card's layers when it lists them, otherwise those found by probing the model, so a
    model loaded from Python without a card still offers sensible choices.
    """
    from napari_gradcam.core.layer_discovery import discover_feature_layers

    card = loaded.card
    layers = list(loaded.feature_layers) or discover_feature_layers(
        loaded.model, card.spatial_dims, card.in_channels, card.input_size)
    combo.clear()
    for info in layers:
        shape = "×".join(str(s) for s in info.output_shape)
        combo.addItem(f"{info.name} — {info.type_name} ({shape})", info.name)
    chosen = combo.findData(card.target_layer)
    if chosen >= 0:
        combo.setCurrentIndex(chosen)


class LayerPickerMixin:
    """Layer lookup and an image combo that follows the viewer's active layer.

    Needs ``self.viewer`` and ``self.image_combo``; the widget provides ``_refresh_layers``
    (which combos it refills differs) and may extend ``_follow_active_layer``.
    """

    viewer: napari.viewer.Viewer
    image_combo: QComboBox

    def _connect_layer_lists(self) -> None:
        """Refill the combos whenever the layer list changes; follow the active layer."""
        layers = self.viewer.layers
        layers.events.inserted.connect(self._refresh_layers)
        layers.events.removed.connect(self._refresh_layers)
        layers.events.reordered.connect(self._refresh_layers)
        layers.selection.events.active.connect(self._follow_active_layer)

    def _refresh_layers(self, *_event: object) -> None:  # pragma: no cover - always overridden
        raise NotImplementedError

    @staticmethod
    def _is_result(layer: object) -> bool:
        return is_result_layer(layer)

    def _source_image_names(self) -> list[str]:
        return [layer.name for layer in self.viewer.layers if is_source_image(layer)]

    def _follow_active_layer(self, *_event: object) -> Any:
        """Select the active layer in the image combo when it is a source image.

        Returns the active layer so a widget can follow it in other combos too.
        """
        active = self.viewer.layers.selection.active
        if is_source_image(active):
            self.image_combo.setCurrentText(active.name)
        return active

    def _layer(self, name: str) -> Any:
        return self.viewer.layers[name] if name and name in self.viewer.layers else None


class ModelPickerMixin:
    """The model combo (demo models, files loaded so far, *Browse …*) with a trust checkbox.

    ``_build_model_rows`` creates ``model_combo``, ``trust_check`` and ``model_info``; the widget
    creates ``_model_cache`` (a dict) before ``_fill_models`` and defines ``use_model``, which
    fills its own controls from a loaded model. Override ``_model_cache_key`` when more than the
    source and the trust flag decide whether a cached model can be reused.
    """

    model_combo: QComboBox
    trust_check: QCheckBox
    model_info: QLabel
    _model_cache: dict[Hashable, LoadedModel]

    def use_model(self, loaded: LoadedModel) -> None:  # pragma: no cover - always overridden
        raise NotImplementedError

    def _build_model_rows(self, form: QFormLayout) -> None:
        self.model_combo = QComboBox()
        self.model_combo.activated.connect(self._on_model_activated)
        self.trust_check = QCheckBox("trust model code")
        self.trust_check.setToolTip(TRUST_TOOLTIP)
        # ticking trust retries the chosen model, which may have failed for want of it
        self.trust_check.toggled.connect(lambda _on: self._on_model_activated())
        form.addRow("Model", self.model_combo)
        form.addRow("", self.trust_check)
        self.model_info = QLabel("no model")
        self.model_info.setWordWrap(True)
        form.addRow("", self.model_info)

    def _fill_models(self) -> None:
        self.model_combo.clear()
        self.model_combo.addItem(NO_MODEL, None)
        for name in demo_model_names():
            self.model_combo.addItem(name, name)
        self.model_combo.addItem(BROWSE, BROWSE)

    def _on_model_activated(self, *_args: object) -> None:
        source = chosen_model_source(self, self.model_combo.currentData())
        if source is not None:
            self.load_model_source(source)

    def _model_cache_key(self, source: str, trust: bool) -> Hashable:
        return (source, trust)

    def load_model_source(self, source: str | Path) -> LoadedModel | None:
        """Load a demo model by name or a file (card, .pt2, trusted pickle); show errors.

        A loaded file is added to the combo (before *Browse …*) so it can be chosen again.
        """
        from napari_gradcam.core.models import load_model

        trust = self.trust_check.isChecked()
        key = self._model_cache_key(str(source), trust)
        try:
            loaded = self._model_cache.get(key) or load_model(source, trust=trust)
        except Exception as error:
            show_error(f"Could not load the model {source}: {error}")
            return None
        self._model_cache[key] = loaded
        index = self.model_combo.findData(str(source))
        if index < 0:
            self.model_combo.insertItem(self.model_combo.count() - 1, Path(str(source)).name,
                                        str(source))
            index = self.model_combo.findData(str(source))
        self.model_combo.setCurrentIndex(index)
        self.use_model(loaded)
        return loaded


class ChoiceFormMixin(LayerPickerMixin, ModelPickerMixin):
    """Both mixins, plus the form rows both widgets open with (what to explain, and how).

    The rows are image, model (+ trust, info), target layer, method, target and region, in
    that order in both widgets, so a user who knows one knows the other.
    """

    layer_combo: QComboBox
    method_combo: QComboBox
    target_combo: QComboBox
    region_combo: QComboBox

    def _build_choice_rows(self, form: QFormLayout, methods: Sequence[str],
                           region_tooltip: str) -> None:
        self.image_combo = QComboBox()
        form.addRow("Image layer", self.image_combo)
        self._build_model_rows(form)
        self.layer_combo = QComboBox()
        form.addRow("Target layer", self.layer_combo)
        self.method_combo = QComboBox()
        self.method_combo.addItems(list(methods))
        form.addRow("Method", self.method_combo)
        self.target_combo = QComboBox()
        form.addRow("Target", self.target_combo)
        self.region_combo = QComboBox()
        self.region_combo.setToolTip(region_tooltip)
        form.addRow("Region", self.region_combo)


class RunControlsMixin:
    """A *Run* button that becomes *Cancel*, a progress bar, and the thread worker's life.

    The widget defines ``run`` (gather its inputs, then ``_start_worker``), ``_on_progress``,
    ``_on_returned`` and ``_on_errored``, sets ``worker = None`` and ``_pending`` in its
    ``__init__``, and calls ``_end_run`` from its ``_on_finished``. The worker's only way to
    report is its signals, so every run ends through ``finished``, cancelled or not.
    """

    worker: Any
    _pending: Any
    _run_warnings: set[str]
    _run_completed: bool = False
    run_button: QPushButton
    progress_bar: QProgressBar

    def _build_run_controls(self, layout: QBoxLayout) -> None:
        self.run_button = QPushButton("Run")
        self.run_button.clicked.connect(self.run)
        layout.addWidget(self.run_button)
        self.progress_bar = QProgressBar()
        self.progress_bar.setRange(0, 1)
        self.progress_bar.setValue(0)
        layout.addWidget(self.progress_bar)

    def _start_worker(self, guarded: Any, job: Any) -> Any:
        """Run ``guarded(job)`` in a napari thread worker; the button now cancels it."""
        self.progress_bar.setRange(0, 0)  # busy until the first batch reports
        self.run_button.setText("Cancel")
        self._run_warnings = set()
        self._run_completed = False
        self.worker = create_worker(
            guarded, job,
            _start_thread=True,
            _connect={
                "yielded": self._on_progress,
                "returned": self._returned,
                "errored": self._on_errored,
                "warned": self._on_warned,
                "finished": self._on_finished,
            },
        )
        return self.worker

    def _returned(self, result: Any) -> None:
        """The job ran to its end: remember it (the progress bar stays full), then show it."""
        self._run_completed = True
        self._on_returned(result)

    def _on_warned(self, warning: tuple[Any, ...]) -> None:
        """Show a warning the job raised (a 1×1 target layer, a saturated score) once per run.

        The worker catches warnings in its thread and emits them; napari 0.9 does not turn
        them into notifications (its relay mixin's ``__init__`` never runs after Qt's), so
        without this the engine's warnings about wrong numbers would be lost. Every batch
        warns again: the same text is shown once per run.
        """
        text = str(warning[0]) if warning else ""
        if text and text not in self._run_warnings:
            self._run_warnings.add(text)
            show_warning(text)

    def cancel(self) -> None:
        """Stop the running job before its next batch; nothing is added or changed."""
        if self.worker is not None:
            self.worker.quit()
            self.run_button.setText("Cancelling …")
            self.run_button.setEnabled(False)

    def _end_run(self, cancelled_message: str) -> None:
        """Say so if the run was cancelled, forget it, and make the button a *Run* again.

        The progress bar stays at 100 % after a run that finished (falling back to 0 % would
        read as "nothing happened"); it is empty after a cancelled or failed run.
        """
        if self.worker is not None and self.worker.abort_requested and not self._run_completed:
            show_info(cancelled_message)
        self.worker = None
        self._pending = None
        self.run_button.setText("Run")
        self.run_button.setEnabled(True)
        self.progress_bar.setRange(0, 1)
        self.progress_bar.setValue(1 if self._run_completed else 0)
