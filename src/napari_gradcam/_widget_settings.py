"""The explainer widget's remembered choices: a small JSON file in the user's config folder.

Why: a user who explains the same kind of scan every day should not pick model, method, mode
and batch size again in every session. The file holds plain values only (names, numbers,
a model's name or path), never a model or data; it is read once when a widget opens and
written when a run starts or a model is loaded.

The folder is ``platformdirs.user_config_dir("napari-gradcam")``; the environment variable
:data:`CONFIG_DIR_ENV` overrides it (tests point it at a temporary folder, so they neither
read nor change a user's choices). A missing, unreadable or damaged file gives no choices
(the widget's defaults), never an error: remembered choices are a convenience.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

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
