"""Make the README's screenshots in a real napari viewer (run under ``xvfb-run -a`` without a
display): a 2D overlay, the 3D view and the colour bar with the map display dock.

The explanation runs through the core (``load_model`` + ``GradCAM`` + ``explain_volume``), the
map is placed with :func:`napari_gradcam.placement.map_layer_placement` and shown with
:func:`napari_gradcam.display.show_map`, exactly as a shell would; the dock widget is not
needed. Seeded sample, shipped demo model: the images are reproducible.

    xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python scripts/make_screenshots.py
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

TARGET = "crack"
WINDOW = (32, 32, 32)


def explain_ct() -> tuple[list, np.ndarray, dict]:
    """The CT sample, its Grad-CAM for 'crack' (3D windows) and the map's provenance."""
    import torch

    from napari_gradcam import GradCAM, explain_volume, load_model
    from napari_gradcam._sample_data import ct_volume_sample
    from napari_gradcam.core.provenance import make_provenance

    torch.set_num_threads(1)
    layers = ct_volume_sample()
    volume = layers[0][0]
    loaded = load_model("ct-patch-classifier")
    card = loaded.card
    target = card.class_names.index(TARGET)
    result = explain_volume(GradCAM(loaded.model, card.target_layer), volume, mode="windows",
                            window=WINDOW, overlap=0.25, target=target,
                            preprocess=loaded.preprocess, batch_size=16)
    record = make_provenance(method="gradcam", layers=[card.target_layer], target=TARGET,
                             model_name=card.name, weights_sha256=loaded.weights_sha256,
                             preprocessing=list(card.preprocessing), mode="windows",
                             source=layers[0][1]["name"],
                             options={"class_names": list(card.class_names),
                                      "window": list(WINDOW), "overlap": 0.25})
    return layers, np.asarray(result.maps, dtype=np.float32), record


def main(out: Path) -> None:
    import napari

    from napari_gradcam._map_display import MapDisplayWidget
    from napari_gradcam.core.normalise import robust_limits
    from napari_gradcam.display import METADATA_KEY, show_map
    from napari_gradcam.figure import export_figure, write_png
    from napari_gradcam.placement import map_layer_placement

    out.mkdir(parents=True, exist_ok=True)
    layers, cam, record = explain_ct()
    viewer = napari.Viewer(show=True)
    viewer.window.resize(1500, 850)
    for data, kwargs, kind in layers:
        getattr(viewer, f"add_{kind}")(data, **kwargs)
    scan, labels = viewer.layers[0], viewer.layers[1]
    labels.visible = True
    name = f"{scan.name} · gradcam · {TARGET} · ct-patch-classifier"
    kwargs = map_layer_placement(scan)
    layer = viewer.add_image(cam, name=name, contrast_limits=robust_limits(cam),
                             metadata={METADATA_KEY: record}, **kwargs)
    show_map(viewer, layer)
    dock = MapDisplayWidget(viewer)
    viewer.window.add_dock_widget(dock, name="Map display", area="right")
    dock.map_layer.value = layer

    # 2D: the slice through the crack's middle, labels outlined beside the map
    crack_z = int(np.argmax((np.asarray(labels.data) == 2).sum(axis=(1, 2))))
    viewer.dims.set_point(0, crack_z * scan.scale[0])
    labels.contour = 1
    viewer.reset_view()
    _settle()
    _small(export_figure(viewer, out / "overlay_2d.png"), 640)

    # the colour bar and the dock that sets its scope, from the whole window
    _settle()
    window = viewer.screenshot(canvas_only=False, flash=False)
    write_png(out / "colorbar.png", _shrink(window, 1000))

    # 3D: the default style (attenuated MIP of the map, scan dimmed)
    labels.visible = False
    viewer.dims.ndisplay = 3
    viewer.reset_view()
    viewer.camera.angles = (0, 30, -30)
    viewer.camera.zoom *= 0.85
    _settle()
    _small(export_figure(viewer, out / "view_3d.png"), 480)
    viewer.close()
    for png in ("overlay_2d.png", "view_3d.png", "colorbar.png"):
        print(png, (out / png).stat().st_size // 1024, "KB")


def _settle() -> None:
    """Let Qt lay out the docks and draw before a screenshot."""
    from qtpy.QtWidgets import QApplication

    for _ in range(5):
        QApplication.processEvents()


def _small(path: Path, width: int) -> None:
    """Rewrite the PNG at ``path`` at most ``width`` pixels wide (README images stay small)."""
    import imageio.v3 as iio

    from napari_gradcam.figure import write_png

    image = iio.imread(path)
    if image.shape[1] > width:
        write_png(path, _shrink(image, width))


def _shrink(image: np.ndarray, width: int) -> np.ndarray:
    """Downscale by an integer-free area average to ``width`` pixels (keeps the PNG small)."""
    from skimage.transform import resize

    height = round(image.shape[0] * width / image.shape[1])
    small = resize(image, (height, width, image.shape[2]), anti_aliasing=True,
                   preserve_range=True)
    return np.clip(small, 0, 255).astype(np.uint8)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/images"))
    main(parser.parse_args().out)
