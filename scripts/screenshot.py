"""Make docs/screenshot.png: the widget explaining the CT sample volume next to its crack labels.

Run under a virtual display (no window appears)::

    PYTHONPATH=src xvfb-run -a python scripts/screenshot.py [--model ct-patch-classifier]

It opens napari with the synthetic X-ray CT volume and its ground-truth labels (the plugin's
sample data), docks the Grad-CAM widget, runs the chosen demo model through the widget exactly
as a user would (thread worker included), computes the per-label table, moves to the slice
through the crack and saves a screenshot of the whole window.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ct-patch-classifier",
                        help="demo model: ct-patch-classifier (3D windows) or ct-slice-unet, or "
                        "the path of a model card")
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "screenshot.png")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds for the run")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)

    import napari
    from qtpy.QtWidgets import QApplication

    from napari_gradcam._sample_data import ct_volume_sample
    from napari_gradcam._widget import GradCAMWidget
    from napari_gradcam.core.models import list_demo_models

    names = [card.name for card in list_demo_models()]
    if args.model not in names and not Path(args.model).is_file():
        print(f"demo model {args.model!r} is not in the zoo (found: {names}); train it with "
              "scripts/train_demo_models.py first", file=sys.stderr)
        return 1

    viewer = napari.Viewer(title="napari-gradcam", show=True)
    viewer.window.resize(1600, 1000)
    (volume, volume_kwargs, _), (labels, labels_kwargs, _) = ct_volume_sample()
    image = viewer.add_image(volume, **volume_kwargs)
    defects = viewer.add_labels(labels, **{**labels_kwargs, "opacity": 0.35})
    widget = GradCAMWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Grad-CAM explainer", area="right")
    viewer.layers.selection.active = image
    if widget.load_model_source(args.model) is None:
        return 1
    widget.target_combo.setCurrentText("crack")
    if widget.loaded.card.spatial_dims == 2:
        widget.form.mode.value = "slices"
        widget.form.axis.value = 0
    widget.batch_spin.setValue(8)
    widget.opacity_spin.setValue(0.9)

    app = QApplication.instance()
    started = time.perf_counter()
    if widget.run() is None:
        return 1
    while widget.worker is not None:
        app.processEvents()
        time.sleep(0.02)
        if time.perf_counter() - started > args.timeout:
            widget.cancel()
            print("the run took too long; cancelled", file=sys.stderr)
            return 1
    print(f"explained in {time.perf_counter() - started:.1f} s")
    results = [layer for layer in viewer.layers if "gradcam" in layer.name]
    if not results:
        print("no result layer was made", file=sys.stderr)
        return 1
    widget.cam_combo.setCurrentText(results[0].name)
    widget.labels_combo.setCurrentText(defects.name)
    table = widget.compute_label_table()
    if table is not None:
        print({key: (np.round(np.asarray(value, dtype=float), 3).tolist()
                     if np.asarray(value).dtype.kind in "biuf" else list(map(str, value)))
               for key, value in table.items()})
    # show the slice through the middle of the crack
    z = int(np.median(np.nonzero(labels == 2)[0]))
    viewer.dims.set_point(0, z * volume_kwargs["scale"][0])
    viewer.layers.selection.active = results[0]
    viewer.reset_view()
    for _ in range(20):
        app.processEvents()
        time.sleep(0.02)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    viewer.screenshot(str(args.output), canvas_only=False)
    print(f"wrote {args.output}")
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
