"""The core runs without a display: importing the package and every core module pulls in no
napari, magicgui or Qt binding (checked in a fresh interpreter, since this test process may
already have imported them)."""

from __future__ import annotations

import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import napari_gradcam
import napari_gradcam.core
import napari_gradcam.samples

GUI_PACKAGES = ("napari", "qtpy", "magicgui", "PyQt5", "PyQt6", "PySide2", "PySide6")


def _headless_modules() -> list[str]:
    names = ["napari_gradcam", "napari_gradcam.core", "napari_gradcam.samples"]
    for package in (napari_gradcam.core, napari_gradcam.samples):
        names += [f"{package.__name__}.{info.name}"
                  for info in pkgutil.iter_modules(package.__path__)]
    return names


def test_core_modules_import_no_gui_package():
    modules = _headless_modules()
    assert "napari_gradcam.core.engine" in modules and "napari_gradcam.core.volume" in modules
    script = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        f"gui = sorted(m for m in sys.modules if m.split('.')[0] in {GUI_PACKAGES!r})\n"
        "print(','.join(gui))\n"
    )
    # the fresh interpreter finds the package where this one did (installed or a source tree)
    source_root = str(Path(napari_gradcam.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [source_root, *filter(None, [os.environ.get("PYTHONPATH")])])}
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                               timeout=120, check=False, env=env)
    assert completed.returncode == 0, completed.stderr[-3000:]
    imported = completed.stdout.strip()
    assert imported == "", f"importing the core pulled in GUI packages: {imported}"


def test_the_reader_hook_does_not_import_torch():
    """napari imports the reader for every .zarr the user opens: it must stay light."""
    code = ("import sys, napari_gradcam._reader; "
            "print(','.join(m for m in ('torch', 'scipy') if m in sys.modules))")
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True).stdout.strip()
    assert found == ""


def test_public_names_resolve_lazily_and_completely():
    import napari_gradcam

    for name in napari_gradcam.__all__:
        assert getattr(napari_gradcam, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        napari_gradcam.not_a_name  # noqa: B018
