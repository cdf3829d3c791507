"""The explainer's form: its magicgui widgets, and the lists that follow the viewer.

Why a file of its own: the form is what the user sees and changes. Which layers, slice axes,
channel axes, target layers and targets are offered, what is greyed out for the chosen mode and
model, and where an on-disk map goes are decided here, apart from running
(:mod:`napari_gradcam._widget`) and from showing results (:mod:`napari_gradcam._widget_layers`),
so a change to a list touches one place. The model list is :mod:`napari_gradcam._widget_models`,
the remembered choices :mod:`napari_gradcam._widget_settings`.

:class:`FormMixin` is mixed into :class:`napari_gradcam._widget.GradCAMWidget`; like the mixins
of :mod:`napari_gradcam._qt_common` it defines no ``__init__`` and lists the attributes it uses.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
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
    PushButton,
    SpinBox,
)
from napari.layers import Image, Labels, Shapes
from napari.utils.notifications import show_info
from qtpy.QtCore import QSize, Qt, QTimer
from qtpy.QtWidgets import QFrame, QScrollArea, QSizePolicy, QWidget

from napari_gradcam._qt_common import (
    ALL_LABELS,
    TRUST_TOOLTIP,
    is_result_layer,
    is_source_image,
    label_value_text,
    label_values,
)
from napari_gradcam.core.device import available_devices
from napari_gradcam.core.labels_stats import label_names_from_features
from napari_gradcam.core.layer_discovery import feature_blocks
from napari_gradcam.core.methods import METHODS, method_info
from napari_gradcam.core.run.plan import output_stores
from napari_gradcam.display import MAP_COLORMAP, MAP_OPACITY
from napari_gradcam.io import default_output_path, split_suffix
from napari_gradcam.jobs import is_regression_card

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
PREDICTED, ALL_CLASSES = "predicted class", "all classes"
UNCERTAINTY_CHOICES = {
    "off": (),
    "flips": ("flips",),
    "flips + shifts": ("flips", "shifts"),
    "flips + shifts + dropout": ("flips", "shifts", "dropout"),
}
"""The Uncertainty row: which variations of each batch are explained too (each one costs a
run per variant: flips 1 per axis, shifts 4 per axis, dropout 8)."""
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


def _source_path(layer: Any) -> str | None:
    """The file a layer was opened from (napari records it in ``layer.source.path``), or None
    for a layer made in the session: the map's default store goes next to that file, and the
    job refuses to write over it."""
    source = getattr(layer, "source", None)
    path = getattr(source, "path", None)
    return str(path) if path else None


class FormMixin:
    """The Explain tab's form (``self.form``) and its lists, which follow the viewer and model.

    Needs ``self.viewer``, ``self.loaded`` (None before a model is chosen), ``labels_form``
    (the label table's form: its layer pickers are refilled here too) and the model list's
    ``_model_choices`` / ``_on_model_chosen`` / ``_on_trust_toggled``
    (:class:`napari_gradcam._widget_models.ModelChoiceMixin`).
    """

    viewer: napari.viewer.Viewer
    loaded: LoadedModel | None
    form: Container
    labels_form: Container
    _layer_infos: list[LayerInfo]
    _watched_region: Any
    _suggested_output: Path | None
    _disk_default_for: tuple[int, str] | None

    def _build_form(self) -> Container:
        """Build ``self.form``, keep its Qt controls as the ``*_combo`` / ``*_spin``
        attributes, and connect it; returns the form."""
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
            # their text needs at the dock's width (the tab scrolls, see scrolled())
            label.setWordWrap(True)
            label.setSizePolicy(QSizePolicy.Policy.Preferred, QSizePolicy.Policy.Minimum)
        f.window.native.layout().setContentsMargins(0, 0, 0, 0)  # the three spins' row
        f.window.native.setMinimumHeight(f.batch_size.native.sizeHint().height())
        for row, name in enumerate(METHODS):  # what each method is and costs, on hover
            info = method_info(name)
            f.method.native.setItemData(
                row, f"{info.title or name}: {info.cost}. {info.reference}".strip(),
                Qt.ItemDataRole.ToolTipRole)

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

        f.image.changed.connect(self._on_image_changed)
        f.apply_scale.changed.connect(self.apply_file_voxel_size)
        f.model.changed.connect(self._on_model_chosen)
        f.trust.changed.connect(self._on_trust_toggled)
        f.all_layers.changed.connect(lambda _on: self._refill_target_layers())
        f.region.changed.connect(self._on_region_changed)
        f.mode.changed.connect(self._enable_mode_options)
        f.mode.changed.connect(self._suggest_output)
        f.to_disk.changed.connect(lambda _on: self._enable_mode_options())
        return f

    @property
    def axis_spin(self) -> _AxisNumber:
        """The slice axis by number, for scripts written when it was a spin box
        (``widget.axis_spin.setValue(0)``); new code sets ``widget.form.axis.value``."""
        return _AxisNumber(self.form.axis)

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
