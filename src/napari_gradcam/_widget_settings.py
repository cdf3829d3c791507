"""The explainer widget's remembered choices: a small JSON file in the user's config folder.

Why: a user who explains the same kind of scan every day should not pick model, method, mode
and batch size again in every session. The file holds plain values only (names, numbers,
a model's name or path), never a model or data; it is read once when a widget opens and
written when a run starts or a model is loaded.

The folder is ``platformdirs.user_config_dir("napari-gradcam")``; the environment variable
:data:`CONFIG_DIR_ENV` overrides it (tests point it at a temporary folder, so they neither
read nor change a user's choices). A missing, unreadable or damaged file gives no choices
(the widget's defaults), never an error: remembered choices are a convenience.

:class:`RememberedChoicesMixin` is the explainer's side: which of its form's values are kept,
and how they come back (a stale one, such as a model file since deleted, is skipped).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from napari.utils.notifications import show_info

CONFIG_DIR_ENV = "NAPARI_GRADCAM_CONFIG_DIR"
"""Environment variable: the folder of the choices file (instead of the user config dir)."""
SETTINGS_FILE = "widget_choices.json"
SETTINGS_VERSION = 1
"""Bumped when a key changes meaning; a file of another version is ignored."""


def settings_path() -> Path:
    """Where the choices are kept (the folder need not exist yet)."""
    folder = os.environ.get(CONFIG_DIR_ENV)
    if not folder:
        from platformdirs import user_config_dir

        folder = user_config_dir("napari-gradcam", appauthor=False)
    return Path(folder) / SETTINGS_FILE


def load_choices() -> dict[str, Any]:
    """The remembered choices, or ``{}`` when there are none (or the file is unreadable)."""
    path = settings_path()
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(record, dict) or record.get("version") != SETTINGS_VERSION:
        return {}
    choices = record.get("choices")
    return dict(choices) if isinstance(choices, dict) else {}


def save_choices(choices: Mapping[str, Any]) -> Path | None:
    """Write ``choices`` (JSON values) atomically; None when the folder cannot be written.

    Written to a temporary file beside the target and renamed, so two napari windows saving
    at once, or a crash mid-write, never leave half a file.
    """
    path = settings_path()
    record = {"version": SETTINGS_VERSION, "choices": dict(choices)}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        partial.write_text(json.dumps(record, indent=1, sort_keys=True), encoding="utf-8")
        os.replace(partial, path)
    except OSError:
        return None
    return path


class RememberedChoicesMixin:
    """What the explainer remembers of its form, and how it comes back next session.

    Needs ``self.form``, ``self.viewer``, ``self.loaded``, ``self._restoring`` and the form's
    and model list's methods (``_choose``, ``load_model_source``, ...) of
    :class:`napari_gradcam._widget.GradCAMWidget`.
    """

    form: Any
    viewer: Any
    loaded: Any
    _restoring: bool
    _model_entries: list[tuple[str, Any]]

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
