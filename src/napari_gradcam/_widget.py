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
marks the point in a Points layer; hovering a result layer shows the CAM value and the
predicted class in the status bar, and the predictions panel follows the row or slice under
the cursor; a per-label table of a CAM inside a Labels layer (stored in that Labels layer's
``features`` -- a change to a user's layer made only on request -- and exportable to CSV); a
file's declared voxel size applied to a layer at scale 1 (only on the button's click); and the
last choices remembered between sessions (:mod:`napari_gradcam._widget_settings`).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FileEdit,
    FloatSpinBox,
    Label,
    ProgressBar,
    PushButton,
    SpinBox,
)
from napari.layers import Image, Labels, Points, Shapes
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import QSize, Qt, QTimer
from qtpy.QtWidgets import (
    QBoxLayout,
    QFileDialog,
    QFrame,
    QGroupBox,
    QHeaderView,
    QLabel,
    QScrollArea,
    QSizePolicy,
    QTableWidget,
    QTableWidgetItem,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from napari_gradcam._live_map import LiveMap
from napari_gradcam._qt_common import (
    ALL_LABELS,
    BROWSE,
    METADATA_KEY,
    NO_MODEL,
    TRUST_TOOLTIP,
    RunControlsMixin,
    chosen_model_source,
    demo_model_names,
    displayed_plane,
    image_source,
    is_result_layer,
    is_source_image,
    label_value_text,
    label_values,
    placement,
    region_mask,
)
from napari_gradcam._widget_settings import load_choices, save_choices
from napari_gradcam.core.device import available_devices
from napari_gradcam.core.labels_stats import (
    as_features,
    label_names_from_features,
    label_statistics,
    suggest_csv_name,
    write_csv,
)
from napari_gradcam.core.layer_discovery import feature_blocks
from napari_gradcam.core.methods import METHODS, method_info
from napari_gradcam.core.run.output import coarse_limits, label_path
from napari_gradcam.core.run.plan import output_stores
from napari_gradcam.display import MAP_COLORMAP, MAP_OPACITY, full_resolution, show_map
from napari_gradcam.io import default_output_path, split_suffix, uncertainty_path
from napari_gradcam.jobs import (
    ExplainRequest,
    ExplainResult,
    ImageSource,
    JobError,
    TargetChoice,
    contrast_limits,
    explain_job,
    is_regression_card,
    map_layer_data,
    plan_explanation,
)

if TYPE_CHECKING:
    import napari

    from napari_gradcam.core.layer_discovery import LayerInfo
    from napari_gradcam.core.models import LoadedModel

COLORMAPS = (MAP_COLORMAP, "inferno", "magma", "hot", "viridis", "turbo")
"""The shared map colormap first (:mod:`napari_gradcam.display` says why: black at zero for
additive blending, one hue over grey CT, apart from napari's label colours), so a map made here
looks like the same map opened from a file."""
MODE_LABELS = {
    "current": "current: the slice / window in view",
    "slices": "slices: every slice along an axis (2D model)",
    "windows": "volume: overlapping 3D windows (3D model)",
}
"""The modes in the command line's words (``--mode slices`` / ``--mode volume``); *current*
has no command-line counterpart (a command line has no view). The values are the job's keys."""
MODE_NAMES = {"current": "current view", "slices": "slices", "windows": "volume"}
"""How a mode reads in a map's layer name."""
CLICK_MODIFIERS = ("Alt", "Control")
CLICK_TOLERANCE_PX = 4.0
"""A press and release further apart than this (screen pixels) is a drag, not a click: Alt-drag
is napari's zoom, and a zoom must not start a run."""
CLICKS_LAYER = "Grad-CAM clicks"
"""The Points layer that marks where a click explained something (made by the widget)."""
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
DISK_MAP_BYTES = 1 << 30
"""A map (float32, the source's size) larger than this goes to disk by default: above it, a
second copy of a scan in memory is what makes a 24 GB workstation swap."""
LAZY_DISK_MAP_BYTES = 256 << 20
"""For a lazily opened source (dask, zarr), which the user opened lazily because it is big, the
map goes to disk from this size on."""
NO_REGION = "none"
"""The Region list's first entry (a string, not None: magicgui announces no change to None)."""


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


def model_summary(card: Any) -> str:
    """What the model is (task, dimensions, channels, classes) and, on a line of its own, the
    card's description: what the model was trained on, which says what data it fits."""
    summary = (f"{card.name}: {card.task}, {card.spatial_dims}D, {card.in_channels} "
               f"channel(s), classes {', '.join(card.class_names)}.")
    description = " ".join(str(card.description or "").split())
    return f"{summary}\n{description}" if description else summary


class _VerticalScrollArea(QScrollArea):
    """A scroll area as wide as its page needs: it scrolls up and down only."""

    def _with_page_width(self, hint: QSize, page_width: int) -> QSize:
        bar = self.verticalScrollBar().sizeHint().width()
        return QSize(max(hint.width(), page_width + bar + 2 * self.frameWidth()), hint.height())

    def minimumSizeHint(self) -> QSize:
        page = self.widget()
        hint = super().minimumSizeHint()
        return hint if page is None else self._with_page_width(
            hint, page.minimumSizeHint().width())

    def sizeHint(self) -> QSize:
        page = self.widget()
        hint = super().sizeHint()
        return hint if page is None else self._with_page_width(hint, page.sizeHint().width())


def scrolled(page: QWidget) -> QScrollArea:
    """``page`` in a vertical scroll area, so a dock shorter than the form scrolls instead
    of squeezing every row below its height (which cut wrapped labels to their first line)."""
    area = _VerticalScrollArea()
    area.setWidget(page)
    area.setWidgetResizable(True)
    area.setFrameShape(QFrame.Shape.NoFrame)
    area.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
    return area


def axis_name(labels: Sequence[str], axis: int) -> str:
    """'z' for a labelled axis; 'axis 0' where napari's default label ('-3') says nothing."""
    label = str(labels[axis]) if 0 <= axis < len(labels) else ""
    if not label or label.lstrip("-").isdigit():
        return f"axis {axis}"
    return label


def label_names(layer: Any) -> dict[int, str]:
    """Names of a Labels layer's values: its ``features`` (a name column), else
    ``metadata["labels"]`` (as the samples set it)."""
    try:
        names = dict(label_names_from_features(getattr(layer, "features", None)))
    except (TypeError, ValueError):
        names = {}
    meta = (getattr(layer, "metadata", None) or {}).get("labels") or {}
    if isinstance(meta, dict):
        for key, value in meta.items():
            try:
                names.setdefault(int(key), str(value))
            except (TypeError, ValueError):
                continue
    return names


def file_voxel_size(layer: Any) -> tuple[tuple[float, ...], tuple[str, ...]] | None:
    """The voxel size the layer's file declares when the layer ignores it (scale 1, pixels).

    Only for a layer opened from a file (``layer.source.path``) whose every scale is 1: a
    layer with its own scale was set by a reader or by the user, and is left alone. The file
    is read by the reader's :func:`napari_gradcam._reader.declared_scale` (one code path for
    opening and for this offer); an unreadable file offers nothing.
    """
    path = getattr(getattr(layer, "source", None), "path", None)
    if not path or not isinstance(layer, Image):
        return None
    if any(abs(float(s) - 1.0) > 1e-12 for s in layer.scale):
        return None
    try:
        from napari_gradcam._reader import declared_scale

        declared = declared_scale(path)
    except (ImportError, OSError, ValueError):
        return None
    if declared is None:
        return None
    scale, units = tuple(float(s) for s in declared[0]), tuple(str(u) for u in declared[1])
    if len(scale) != layer.ndim or all(abs(s - 1.0) < 1e-12 for s in scale):
        return None
    return scale, units


def _modifier_names(event: Any) -> set[str]:
    names = set()
    for modifier in getattr(event, "modifiers", ()) or ():
        names.add(getattr(modifier, "name", None) or str(modifier))
    return names


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


def _layer_choices(viewer: Any, accept: Callable[[Any], bool],
                   first: Sequence[tuple[str, Any]] = ()) -> Callable[[Any], list]:
    """A magicgui ``choices`` callable: ``first`` + the viewer's layers that ``accept`` takes.

    The data of each entry is the layer itself, so the choice survives a rename (the text
    changes, the layer does not).
    """
    viewer_ref = weakref.ref(viewer)

    def choices(_widget: Any) -> list[tuple[str, Any]]:
        current = viewer_ref()
        layers = [] if current is None else [
            (layer.name, layer) for layer in current.layers if accept(layer)]
        return [*first, *layers]

    return choices


def refresh(combo: ComboBox) -> None:
    """Refill a combo from its choices callable, keeping the chosen value (by identity).

    magicgui matches entries by their text, so after a rename it would fall back to the
    first entry; this keeps the same layer chosen under its new name, and announces a change
    only when the chosen value really changed.
    """
    before = combo.value
    with combo.changed.blocked():
        combo.reset_choices()
        if before is not None and any(_same(before, c) for c in combo.choices):
            combo.value = next(c for c in combo.choices if _same(before, c))
    if not _same(before, combo.value):
        combo.changed.emit(combo.value)


def _same(a: Any, b: Any) -> bool:
    if a is b:
        return True
    try:
        return bool(a == b)
    except Exception:  # arrays or odd objects: only identity counts
        return False


class GradCAMWidget(RunControlsMixin, QWidget):
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
        self.setMaximumWidth(500)
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        self.tabs = QTabWidget()
        outer.addWidget(self.tabs)
        viewer = self.viewer

        self.form = Container(labels=True, widgets=[
            ComboBox(name="image", label="Image layer",
                     choices=_layer_choices(viewer, is_source_image)),
            Label(name="voxel_note", label=" ", value=""),
            PushButton(name="apply_scale", label="", text="Apply the file's voxel size"),
            ComboBox(name="model", label="Model", choices=self._model_choices),
            CheckBox(name="trust", label="", text="trust model code", tooltip=TRUST_TOOLTIP),
            Label(name="model_info", label=" ", value="no model"),
            ComboBox(name="target_layer", label="Target layer",
                     choices=self._target_layer_choices),
            CheckBox(name="all_layers", label="", text="list all layers",
                     tooltip="Also list the norms, activations, dropout and pooling layers "
                     "inside the blocks (their maps repeat their block's)."),
            ComboBox(name="method", label="Method", choices=list(METHODS)),
            ComboBox(name="target", label="Target", choices=self._target_choices),
            ComboBox(name="region", label="Region", choices=_layer_choices(
                viewer, lambda layer: isinstance(layer, (Labels, Shapes)), [("none", NO_REGION)]),
                tooltip="Segmentation models: explain the class inside the chosen labels of "
                "a Labels layer or inside Shapes."),
            ComboBox(name="region_labels", label="Region labels",
                     choices=self._region_value_choices,
                     tooltip="Which labels of the region layer are the region (e.g. only the "
                     "crack, label 2), or all non-zero labels."),
            ComboBox(name="channel_axis", label="Channel axis", choices=self._channel_choices,
                     tooltip="Multi-channel data: the axis whose entries are the model's "
                     "input channels (its length must equal the model's channels). Other "
                     "extra axes stay at the current position."),
            ComboBox(name="mode", label="Mode",
                     choices=[(text, key) for key, text in MODE_LABELS.items()]),
            ComboBox(name="axis", label="Slice axis", choices=self._axis_choices,
                     tooltip="The axis to step along, named by the layer's axis labels."),
            Container(name="window", label="Window", layout="horizontal", labels=False,
                      widgets=[SpinBox(name=f"w{i}", min=4, max=1024, value=32)
                               for i in range(3)]),
            FloatSpinBox(name="overlap", label="Overlap", min=0.0, max=0.9, step=0.05,
                         value=0.25),
            ComboBox(name="uncertainty", label="Uncertainty",
                     choices=list(UNCERTAINTY_CHOICES.items()),
                     tooltip="Also make an uncertainty layer: the per-pixel spread of the map "
                     "when the input is mirrored (flips), moved by 1-2 px (shifts) or "
                     "explained with the model's dropout on (MC dropout). Each variant costs "
                     "one more explanation."),
            CheckBox(name="windows_uncertainty", label="", text="+ windows",
                     tooltip="Volume mode: add the disagreement between overlapping windows "
                     "(how much the map depends on the context each window includes)."),
            CheckBox(name="to_disk", label="", text="write the map to disk (OME-Zarr)",
                     tooltip="Slices and volume modes: write the map chunk by chunk into an "
                     "OME-Zarr pyramid and show it while it is made. Memory then stays bounded "
                     "by a batch whatever the volume's size; on by default for large or lazily "
                     "opened volumes. The file keeps the map's scale and provenance; napari "
                     "opens it again as the same layer."),
            FileEdit(name="output", label="Map file", mode="w", filter="*.zarr",
                     tooltip="Where the map goes (a new .zarr; never the input). By default "
                     "next to the scan's file, else in the user's cache folder."),
            SpinBox(name="batch_size", label="Batch size", min=1, max=512, value=8),
            ComboBox(name="device", label="Device", choices=available_devices()),
            ComboBox(name="colormap", label="Colormap", choices=list(COLORMAPS)),
            FloatSpinBox(name="opacity", label="Opacity", min=0.0, max=1.0, step=0.1,
                         value=MAP_OPACITY),
        ])
        f = self.form
        f.voxel_note.visible = False
        f.apply_scale.visible = False
        for label in (f.model_info.native, f.voxel_note.native):
            # magicgui's labels are one fixed-size line; these wrap and take the height
            # their text needs at the dock's width (the scroll area below never squeezes them)
            label.setWordWrap(True)
            label.setSizePolicy(QSizePolicy.Policy.Preferred, QSizePolicy.Policy.Minimum)
        f.window.native.layout().setContentsMargins(0, 0, 0, 0)  # the three spins' row
        f.window.native.setMinimumHeight(f.batch_size.native.sizeHint().height())
        for row, name in enumerate(METHODS):  # what each method is and costs, on hover
            info = method_info(name)
            f.method.native.setItemData(
                row, f"{info.title or name}: {info.cost}. {info.reference}".strip(),
                Qt.ItemDataRole.ToolTipRole)

        explain_tab = QWidget()
        layout = QVBoxLayout(explain_tab)
        layout.addWidget(f.native)
        self._build_run_controls(layout)
        hint = QLabel("Alt-click (click without dragging) on the image: explain what is under "
                      "the cursor. Alt-drag zooms as usual.")
        hint.setWordWrap(True)
        layout.addWidget(hint)
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
        layout.addWidget(predictions_box)
        layout.addStretch(1)
        self.tabs.addTab(scrolled(explain_tab), "Explain")

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
        self.tabs.addTab(labels_tab, "CAM inside labels")

        # the Qt controls under the magicgui widgets, for scripts written against the Qt form
        self.image_combo = f.image.native
        self.model_combo = f.model.native
        self.trust_check = f.trust.native
        self.model_info = f.model_info.native
        self.layer_combo = f.target_layer.native
        self.method_combo = f.method.native
        self.target_combo = f.target.native
        self.region_combo = f.region.native
        self.region_value_combo = f.region_labels.native
        self.channel_combo = f.channel_axis.native
        self.mode_combo = f.mode.native
        self.axis_combo = f.axis.native
        self.window_spins = [spin.native for spin in f.window]
        self.overlap_spin = f.overlap.native
        self.uncertainty_combo = f.uncertainty.native
        self.windows_uncertainty_check = f.windows_uncertainty.native
        self.batch_spin = f.batch_size.native
        self.device_combo = f.device.native
        self.colormap_combo = f.colormap.native
        self.opacity_spin = f.opacity.native
        self.cam_combo = self.labels_form.cam.native
        self.labels_combo = self.labels_form.labels_layer.native
        self.tolerance_spin = self.labels_form.tolerance.native

        f.image.changed.connect(self._on_image_changed)
        f.apply_scale.changed.connect(self.apply_file_voxel_size)
        f.model.changed.connect(self._on_model_chosen)
        f.trust.changed.connect(self._on_trust_toggled)
        f.all_layers.changed.connect(lambda _on: self._refill_target_layers())
        f.region.changed.connect(self._on_region_changed)
        f.mode.changed.connect(self._enable_mode_options)
        f.mode.changed.connect(self._suggest_output)
        f.to_disk.changed.connect(lambda _on: self._enable_mode_options())
        self.labels_form.cam.changed.connect(self._default_tolerance)
        self.labels_form.buttons.table_button.changed.connect(self.compute_label_table)
        self.labels_form.buttons.export_button.changed.connect(self._on_export_clicked)
        self.export_button = self.labels_form.buttons.export_button.native
        self.table_button = self.labels_form.buttons.table_button.native

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

    @property
    def axis_spin(self) -> _AxisNumber:
        """The slice axis by number, for scripts written when it was a spin box
        (``widget.axis_spin.setValue(0)``); new code sets ``widget.form.axis.value``."""
        return _AxisNumber(self.form.axis)

    # ---------------------------------------------------------------------------------------
    # Choices that follow the viewer and the model

    def reset_choices(self, *_event: object) -> None:
        """Refill every list from the viewer and the model, keeping what is chosen.

        Connected to the layer list's insert, remove, reorder and rename events (and called
        by napari when the widget is docked); the layer pickers hold layers, so a renamed
        layer stays chosen under its new name.
        """
        f = self.form
        for combo in (f.image, f.region, self.labels_form.cam, self.labels_form.labels_layer):
            refresh(combo)
        self._refresh_region_values()
        self._refresh_axes()
        self._refresh_channel_axes()

    def _follow_active_layer(self, *_event: object) -> Any:
        """Choose the active layer: a source image in the image list, a map in the CAM list."""
        active = self.viewer.layers.selection.active
        if is_source_image(active):
            self._choose(self.form.image, active)
        elif is_result_layer(active):
            self._choose(self.labels_form.cam, active)
        return active

    @staticmethod
    def _choose(combo: ComboBox, value: Any) -> bool:
        """Choose ``value`` if it is offered (refilling once if it is new); True if chosen."""
        for attempt in range(2):
            for choice in combo.choices:
                if _same(choice, value):
                    if not _same(combo.value, choice):
                        combo.value = choice
                    return True
            if attempt == 0:
                refresh(combo)
        return False

    def _layer(self, name: str) -> Any:
        return self.viewer.layers[name] if name and name in self.viewer.layers else None

    @staticmethod
    def _is_result(layer: object) -> bool:
        return is_result_layer(layer)

    def _source_layer(self) -> Any:
        """The chosen image layer if it is still in the viewer (a picker may lag an event)."""
        layer = self.form.image.value
        if layer is None:
            return None
        return layer if any(_same(layer, other) for other in self.viewer.layers) else None

    def _on_image_changed(self, *_args: object) -> None:
        self._refresh_axes()
        self._refresh_channel_axes()
        self._check_voxel_size()
        self._suggest_output()

    def _suggest_output(self, *_args: object) -> None:
        """Propose where the map goes, and whether to disk, for the chosen layer and mode.

        On by default when the map would be large (:data:`DISK_MAP_BYTES`, or
        :data:`LAZY_DISK_MAP_BYTES` for a lazily opened source). The file name is refreshed
        only while the user has not typed their own.
        """
        f = self.form
        layer = self._source_layer()
        if not isinstance(layer, Image):
            return
        data = layer.data[0] if layer.multiscale else layer.data
        map_bytes = 4 * int(np.prod(data.shape[:-1] if layer.rgb else data.shape))
        lazy = not isinstance(data, np.ndarray)
        volume_mode = f.mode.value in ("slices", "windows")
        key = (id(data), f.mode.value)
        if key != self._disk_default_for:  # a new layer or mode; a refresh keeps the user's tick
            self._disk_default_for = key
            f.to_disk.value = volume_mode and (
                map_bytes > DISK_MAP_BYTES or (lazy and map_bytes > LAZY_DISK_MAP_BYTES))
        current = Path(str(f.output.value)) if str(f.output.value) not in ("", ".") else None
        if current is None or current == self._suggested_output:
            self._suggested_output = default_output_path(layer.name, _source_path(layer))
            f.output.value = self._suggested_output
        self._enable_mode_options()

    def _output_for(self, mode: str) -> Path | None:
        """The store this run writes, or None (in memory).

        A default name that a previous run has since taken is replaced by the next free one, so
        a second run never meets "already exists" for a name the user did not choose.
        """
        f = self.form
        if not (f.to_disk.value and mode in ("slices", "windows")):
            return None
        chosen = Path(str(f.output.value)).expanduser()
        if str(f.output.value) in ("", "."):
            raise ValueError("Choose a file for the map (a new .zarr) or untick "
                             "'write the map to disk'.")
        kind = (f.target.value or ("predicted",))[0]
        names = list(self.loaded.card.class_names) if self.loaded is not None else []

        def taken(path: Path) -> bool:  # "all classes" writes one store per class
            return any(store.exists() for store in output_stores(path, kind, names))

        if chosen == self._suggested_output and taken(chosen):
            layer = self._source_layer()
            chosen = default_output_path(layer.name, _source_path(layer))
            stem, suffix = split_suffix(chosen)
            number = 2
            while taken(chosen):
                chosen = chosen.with_name(f"{stem}_{number}{suffix}")
                number += 1
            self._suggested_output = chosen
            f.output.value = chosen
        if chosen == self._suggested_output:  # our default folder (the cache) may not exist yet
            chosen.parent.mkdir(parents=True, exist_ok=True)
        return chosen

    def _on_region_changed(self, *_args: object) -> None:
        """Follow the painted labels of the new region layer (their values fill the list)."""
        previous, self._watched_region = self._watched_region, self.form.region.value
        for layer, connect in ((previous, False), (self._watched_region, True)):
            if isinstance(layer, Labels):
                for event in (layer.events.paint, layer.events.data, layer.events.features):
                    if connect:
                        event.connect(self._refresh_region_values_soon)
                    else:
                        event.disconnect(self._refresh_region_values_soon)
        self._refresh_region_values()

    def _refresh_region_values_soon(self, *_args: object) -> None:
        """After the event loop's turn: napari announces a paint before it writes the data."""
        QTimer.singleShot(0, self._refresh_region_values)

    def _region_value_choices(self, _widget: Any = None) -> list[tuple[str, Any]]:
        region = self.form.region.value if hasattr(self, "form") else None
        entries: list[tuple[str, Any]] = [(ALL_LABELS, None)]
        if isinstance(region, Labels):
            names = label_names(region)
            for value in label_values(region):
                entries.append((f"{value} · {names[value]}" if value in names
                                else label_value_text(region, value), value))
        return entries

    def _refresh_region_values(self, *_args: object) -> None:
        """Offer "all non-zero labels" and each label value present in the region layer.

        Refilled when the region layer changes and when it is painted; the chosen value is
        kept while it is still present. Only a Labels region of a segmentation model has
        values to choose from.
        """
        refresh(self.form.region_labels)
        segmenter = self.loaded is not None and self.loaded.card.task == "segmentation"
        self.form.region.enabled = segmenter
        self.form.region_labels.enabled = segmenter and isinstance(self.form.region.value,
                                                                   Labels)

    def _source_shape(self) -> tuple[int, ...]:
        layer = self._source_layer()
        if not isinstance(layer, Image) or layer.rgb:
            return ()
        data = layer.data[0] if layer.multiscale else layer.data
        return tuple(int(s) for s in data.shape)

    def _axis_choices(self, _widget: Any = None) -> list[tuple[str, int]]:
        """One entry per axis of the chosen image, named by its axis label: 'z · axis 0 (64)'."""
        layer = self._source_layer() if hasattr(self, "form") else None
        if not isinstance(layer, Image):
            return [("axis 0", 0)]
        shape = (layer.data[0] if layer.multiscale else layer.data).shape
        labels = tuple(layer.axis_labels)
        entries = []
        for axis, size in enumerate(shape[:layer.ndim]):
            name = axis_name(labels, axis)
            text = f"{name} ({size})" if name.startswith("axis ") else (
                f"{name} · axis {axis} ({size})")
            entries.append((text, axis))
        return entries or [("axis 0", 0)]

    def _refresh_axes(self, *_args: object) -> None:
        refresh(self.form.axis)

    def _channel_choices(self, _widget: Any = None) -> list[tuple[str, Any]]:
        layer = self._source_layer() if hasattr(self, "form") else None
        labels = tuple(layer.axis_labels) if isinstance(layer, Image) else ()
        shape = self._source_shape() if hasattr(self, "form") else ()
        return [("none", None), *[(f"{axis}: {axis_name(labels, axis)} ({size})", axis)
                                  for axis, size in enumerate(shape)]]

    def _refresh_channel_axes(self, *_args: object) -> None:
        """Offer the axes that can hold the model's channels ("none" + every axis).

        Shown only where the choice matters: data with 4 or more axes, or a multi-channel
        model and an axis of its channel count. The default is an extra axis (not one of the
        model's spatial axes) whose length equals the model's channels; the user's choice is
        kept until the layer's shape or the model changes.
        """
        shape = self._source_shape()
        card = self.loaded.card if self.loaded is not None else None
        channels = int(card.in_channels) if card is not None else 1
        dims = int(card.spatial_dims) if card is not None else 2
        matching = [a for a, size in enumerate(shape) if size == channels]
        relevant = len(shape) >= 4 or (channels > 1 and bool(matching))
        combo = self.form.channel_axis
        combo.visible = relevant
        combo.enabled = relevant
        layer = self._source_layer()
        key = (shape, channels, dims, id(layer))
        if key == getattr(self, "_channel_key", None):
            return
        self._channel_key = key
        with combo.changed.blocked():
            combo.reset_choices()
            extra = [a for a in matching if a < len(shape) - dims]
            combo.value = extra[-1] if channels > 1 and extra else None

    # ---------------------------------------------------------------------------------------
    # Models

    def _model_choices(self, _widget: Any = None) -> list[tuple[str, Any]]:
        return [(NO_MODEL, None), *getattr(self, "_model_entries", []), (BROWSE, BROWSE)]

    def _fill_models(self) -> None:
        self._model_entries = [(name, name) for name in demo_model_names()]
        with self.form.model.changed.blocked():
            self.form.model.reset_choices()
            self.form.model.value = None

    def _on_model_chosen(self, source: Any = None) -> None:
        if self._restoring:
            return
        choice = self.form.model.value if source is None else source
        source = chosen_model_source(self, choice)
        if source is None:
            if choice is not None:  # the dialog was cancelled: show the model still loaded
                self._show_model_in_combo()
            return
        self.load_model_source(source)

    def _on_trust_toggled(self, *_args: object) -> None:
        """Ticking trust retries the chosen model, which may have failed for want of it;
        unticking it drops a model that was loaded with trust first, so no code the user no
        longer trusts runs at the next *Run* (the reload without trust may fail, and then no
        model is chosen)."""
        if not self.form.trust.value and self.loaded is not None and self._loaded_with_trust:
            self.loaded = None
            self._loaded_with_trust = False
        source = self.form.model.value
        if source not in (None, BROWSE):
            self.load_model_source(source)
        self._show_model_in_combo()

    def _model_cache_key(self, source: str, trust: bool) -> tuple[str, bool, str]:
        """A model is reused only for the same source, trust and device choice."""
        return (source, trust, str(self.form.device.value))

    def load_model_source(self, source: str | Path, *, quiet: bool = False
                          ) -> LoadedModel | None:
        """Load a demo model by name or a file (card, .pt2, trusted pickle); show errors.

        A loaded file is added to the model list (before *Browse …*) so it can be chosen
        again. ``quiet``: a failure is an info, not an error (restoring a remembered model).
        """
        from napari_gradcam.core.models import load_model

        trust = bool(self.form.trust.value)
        key = self._model_cache_key(str(source), trust)
        try:
            loaded = self._model_cache.get(key) or load_model(source, trust=trust)
        except Exception as error:
            (show_info if quiet else show_error)(
                f"Could not load the model {source}: {error}")
            self._show_model_in_combo()
            return None
        self._model_cache[key] = loaded
        entry = str(source)
        if entry not in [data for _text, data in self._model_entries]:
            self._model_entries.append((Path(entry).name, entry))
        self._model_source = entry
        self.use_model(loaded)
        self._loaded_with_trust = trust
        self._show_model_in_combo()
        self._save_choices()
        return loaded

    def _show_model_in_combo(self) -> None:
        """Show the loaded model's entry (or "choose a model") without loading anything."""
        combo = self.form.model
        with combo.changed.blocked():
            combo.reset_choices()
            chosen = getattr(self, "_model_source", None) if self.loaded is not None else None
            combo.value = chosen if chosen in combo.choices else None

    def use_model(self, loaded: LoadedModel) -> None:
        """Explain with an already loaded model (e.g. ``load_model(my_module)`` from Python)."""
        card = loaded.card
        self.loaded = loaded
        self._layer_infos = list(loaded.feature_layers)
        if not self._layer_infos:
            from napari_gradcam.core.layer_discovery import discover_feature_layers

            self._layer_infos = discover_feature_layers(
                loaded.model, card.spatial_dims, card.in_channels, card.input_size)
        f = self.form
        with f.target_layer.changed.blocked():
            f.target_layer.reset_choices()
            if card.target_layer in f.target_layer.choices:
                f.target_layer.value = card.target_layer
        with f.target.changed.blocked():
            f.target.reset_choices()
        self._refresh_region_values()
        if card.spatial_dims == 3:
            f.mode.value = "windows"
            for spin, size in zip(f.window, card.input_size or (32, 32, 32), strict=False):
                spin.value = int(size)
        else:
            f.mode.value = "current"
        self._enable_mode_options()
        self._refresh_channel_axes()
        f.model_info.value = model_summary(card)
        f.model_info.tooltip = model_summary(card)  # the whole text also on hover

    def _target_layer_choices(self, _widget: Any = None) -> list[tuple[str, str]]:
        """The model's feature-map blocks (or all its layers), with their output shapes."""
        infos = list(getattr(self, "_layer_infos", []))
        if not infos:
            return [("", None)]
        form = getattr(self, "form", None)
        card_layer = self.loaded.card.target_layer if self.loaded is not None else None
        chosen = form.target_layer.value if form is not None else None
        if form is None or not form.all_layers.value:
            infos = feature_blocks(infos, keep=(card_layer, chosen))
        return [(f"{info.name} — {info.type_name} "
                 f"({'×'.join(str(s) for s in info.output_shape)})", info.name)
                for info in infos]

    def _refill_target_layers(self) -> None:
        refresh(self.form.target_layer)

    def _target_choices(self, _widget: Any = None) -> list[tuple[str, Any]]:
        if getattr(self, "loaded", None) is None:
            return [(PREDICTED, ("predicted", None))]
        card = self.loaded.card
        entries: list[tuple[str, Any]] = []
        if not is_regression_card(card):
            if card.task != "segmentation":
                entries.append((PREDICTED, ("predicted", None)))
            entries += [(name, ("class", index)) for index, name in enumerate(card.class_names)]
            entries.append((ALL_CLASSES, ("all", None)))
        entries += regression_entries(card)
        return entries or [(PREDICTED, ("predicted", None))]

    def _enable_mode_options(self, *_args: object) -> None:
        """Grey out what the chosen mode and model do not use."""
        f = self.form
        mode = f.mode.value
        three_d = self.loaded is not None and self.loaded.card.spatial_dims == 3
        f.axis.enabled = mode == "slices"
        f.window.enabled = three_d
        for spin in f.window:
            spin.enabled = three_d
        f.overlap.enabled = three_d and mode == "windows"
        f.windows_uncertainty.enabled = three_d and mode == "windows"
        f.to_disk.enabled = mode in ("slices", "windows")
        f.output.enabled = f.to_disk.enabled and bool(f.to_disk.value)

    # ---------------------------------------------------------------------------------------
    # The file's voxel size

    def _check_voxel_size(self) -> None:
        """Say so when the chosen layer is at scale 1 but its file declares a voxel size."""
        layer = self._source_layer()
        declared = file_voxel_size(layer) if layer is not None else None
        f = self.form
        f.voxel_note.visible = f.apply_scale.visible = declared is not None
        if declared is not None:
            scale, units = declared
            sizes = " × ".join(f"{s:g}" for s in scale)
            unit = next((u for u in units if u != "pixel"), "")
            f.voxel_note.value = (
                f"{layer.name!r} is shown at scale 1, but its file declares a voxel size of "
                f"{sizes} {unit}. Maps follow the layer's scale.")

    def apply_file_voxel_size(self, *_args: object) -> bool:
        """Give the chosen layer its file's voxel size and units (the button's only job).

        The one time the widget changes a user's layer, and only on this click.
        """
        layer = self._source_layer()
        declared = file_voxel_size(layer) if layer is not None else None
        if declared is None:
            show_info("The layer has no file voxel size to apply.")
            self._check_voxel_size()
            return False
        scale, units = declared
        layer.scale = scale
        layer.units = units
        show_info(f"{layer.name!r}: voxel size {' × '.join(f'{s:g}' for s in scale)} "
                  f"({', '.join(units)}) from its file.")
        self._check_voxel_size()
        return True

    # ---------------------------------------------------------------------------------------
    # Remembered choices

    def _choices_record(self) -> dict[str, Any]:
        f = self.form
        target = f.target.current_choice
        layer = self._source_layer()
        return {
            "model": getattr(self, "_model_source", None) if self.loaded is not None else None,
            "image_layer": layer.name if layer is not None else None,
            "target_layer": f.target_layer.value,
            "all_layers": bool(f.all_layers.value),
            "method": f.method.value,
            "target": target,
            "mode": f.mode.value,
            "axis": f.axis.value,
            "window": [int(spin.value) for spin in f.window],
            "overlap": float(f.overlap.value),
            "uncertainty": f.uncertainty.current_choice,
            "batch_size": int(f.batch_size.value),
            "device": f.device.value,
            "colormap": f.colormap.value,
            "opacity": float(f.opacity.value),
        }

    def _save_choices(self) -> None:
        if not self._restoring:
            save_choices(self._choices_record())

    def _restore_choices(self) -> None:
        """Start with the last session's choices; a stale one (a model file gone, a layer not
        open) is skipped with an info, and the widget's default stays."""
        choices = load_choices()
        if not choices:
            return
        f = self.form
        model = choices.get("model")
        if isinstance(model, str) and model:
            demo = model in [data for _text, data in self._model_entries]
            if demo or Path(model).exists():
                self._restoring = True
                try:
                    self.load_model_source(model, quiet=True)
                finally:
                    self._restoring = False
            else:
                show_info(f"napari-gradcam: the last model {model!r} is gone; choose a model.")
        self._restoring = True
        try:
            self._set_if_offered(f.all_layers, choices.get("all_layers"), boolean=True)
            self._refill_target_layers()
            for widget, key in ((f.target_layer, "target_layer"), (f.method, "method"),
                                (f.mode, "mode"), (f.device, "device"),
                                (f.colormap, "colormap")):
                self._set_if_offered(widget, choices.get(key))
            for widget, key in ((f.target, "target"), (f.uncertainty, "uncertainty")):
                text = choices.get(key)  # by text: a target's data is a tuple
                if isinstance(text, str) and widget.native.findText(text) >= 0:
                    widget.native.setCurrentText(text)
            name = choices.get("image_layer")
            if isinstance(name, str) and name in self.viewer.layers:
                self._choose(f.image, self.viewer.layers[name])
            self._set_if_offered(f.axis, choices.get("axis"))
            for spin, size in zip(f.window, choices.get("window") or (), strict=False):
                self._set_number(spin, size)
            for widget, key in ((f.overlap, "overlap"), (f.batch_size, "batch_size"),
                                (f.opacity, "opacity")):
                self._set_number(widget, choices.get(key))
        finally:
            self._restoring = False
        self._enable_mode_options()

    @staticmethod
    def _set_if_offered(widget: Any, value: Any, boolean: bool = False) -> None:
        if boolean:
            if isinstance(value, bool):
                widget.value = value
            return
        if value is not None and value in widget.choices:
            widget.value = value

    @staticmethod
    def _set_number(widget: Any, value: Any) -> None:
        if (isinstance(value, (int, float)) and not isinstance(value, bool)
                and widget.min <= value <= widget.max):
            widget.value = value

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
    # Results → layers

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
        output = (result.provenance.get("options") or {}).get("output")
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
        output = (result.provenance.get("options") or {}).get("output")
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

    # ---------------------------------------------------------------------------------------
    # Predictions and hover

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

    # ---------------------------------------------------------------------------------------
    # Labels table

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
        cam = np.asarray(full_resolution(cam_layer))  # level 0 of an on-disk pyramid
        labels_shape = tuple(labels_layer.data.shape)
        source_shape = tuple(record["options"].get("source_shape", labels_shape))
        if any(origin) and record["options"].get("explained_row_of"):
            source_shape = labels_shape  # one row of the layer: the origin says which
        if labels_shape != source_shape or len(origin) != len(labels_shape):
            show_error(f"The Labels layer {labels_layer.name!r} has shape {labels_shape} but the "
                       f"CAM was computed on an image of shape {source_shape}; they must match.")
            return None
        box = tuple(slice(o, o + s) for o, s in zip(origin, cam.shape, strict=True))
        labels = np.asarray(labels_layer.data[box])
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


class _AxisNumber:
    """``setValue`` / ``value`` on the slice-axis list (see ``GradCAMWidget.axis_spin``)."""

    def __init__(self, combo: ComboBox) -> None:
        self._combo = combo

    def setValue(self, axis: int) -> None:  # Qt's spelling, as before
        if int(axis) not in self._combo.choices:
            raise ValueError(f"axis {axis} is not an axis of the chosen layer")
        self._combo.value = int(axis)

    def value(self) -> int:
        return int(self._combo.value)


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


def _shown_label(result: ExplainResult, label: str) -> str:
    """A click's map names the class it explained ('clicked crack'), other labels stay."""
    if label != "clicked" or result.target_indices is None or not len(result.target_indices):
        return label
    return f"clicked {_class_name(result, int(np.asarray(result.target_indices).ravel()[0]))}"


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


def _source_path(layer: Any) -> str | None:
    """The file a layer was opened from (napari records it in ``layer.source.path``), or None
    for a layer made in the session: the map's default store goes next to that file, and the
    job refuses to write over it."""
    source = getattr(layer, "source", None)
    path = getattr(source, "path", None)
    return str(path) if path else None


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
