"""The one-minute demo: napari with the plugin, the CT sample with its crack labels, and a CAM.

    .venv/bin/python scripts/demo.py                 # opens napari (needs a display)
    .venv/bin/python scripts/demo.py --headless      # no display: the same job, files out

With a display it opens napari, loads the synthetic X-ray CT volume (pores and a fatigue crack,
voxel 1.0 × 0.65 × 0.65 µm) and its ground-truth labels from the plugin's sample data, docks
the Grad-CAM widget, runs the shipped 3D CT classifier over the volume in overlapping windows
(in a background thread, with progress) and leaves napari open for you to explore. Without a
display (no ``DISPLAY``/``WAYLAND_DISPLAY``, or ``--headless``) it writes the sample to
``demo-output/ct_sample.tif``, explains it with the command line into
``demo-output/ct_gradcam.zarr`` (OME-Zarr, napari opens it at the scan's scale) and prints a
summary.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

DEFAULT_MODEL = "ct-patch-classifier"


def run_headless(model: str, out_dir: Path) -> int:
    from napari_gradcam.cli import main as cli

    out_dir.mkdir(parents=True, exist_ok=True)
    scan = out_dir / "ct_sample.tif"
    maps = out_dir / "ct_gradcam.zarr"
    if not scan.exists() and cli(["sample", "ct", str(scan)]) != 0:
        return 1
    code = cli(["explain", str(scan), "--model", model, "--target", "crack", "--out", str(maps),
                "--overwrite"])
    if code == 0:
        print(f"\nopen both in napari:  napari --plugin napari-gradcam {scan} {maps}")
    return code


def run_gui(model: str, auto_run: bool) -> int:
    import napari

    viewer = napari.Viewer(title="napari-gradcam demo")
    layers = viewer.open_sample("napari-gradcam", "ct_volume")
    image = next(layer for layer in layers if layer.__class__.__name__ == "Image")
    _, widget = viewer.window.add_plugin_dock_widget("napari-gradcam", "Grad-CAM explainer")
    viewer.layers.selection.active = image
    viewer.dims.set_point(0, image.data.shape[0] // 2 * image.scale[0])
    if widget.load_model_source(model) is not None:
        if "crack" in widget.loaded.card.class_names:
            widget.target_combo.setCurrentText("crack")
        if auto_run:
            widget.run()
    napari.run()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="demo model name or card path")
    parser.add_argument("--headless", action="store_true",
                        help="no window: write the sample and its map as files")
    parser.add_argument("--out", type=Path, default=Path("demo-output"),
                        help="folder for --headless outputs")
    parser.add_argument("--no-run", action="store_true", help="open napari without running")
    args = parser.parse_args(argv)
    has_display = bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
                       or sys.platform in ("darwin", "win32"))
    if args.headless or not has_display:
        if not args.headless:
            print("no display found: running the demo headless (--headless)", file=sys.stderr)
        return run_headless(args.model, args.out)
    return run_gui(args.model, auto_run=not args.no_run)


if __name__ == "__main__":
    sys.exit(main())
