"""The whole napari round: a cropped scan opened with our reader, explained by the dock widget,
the map saved with our writer and opened again lands on the crop, with its provenance."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr

from napari_gradcam._widget import METADATA_KEY, GradCAMWidget
from napari_gradcam.placement import ngff_translation
from napari_helpers import finish, write_card

pytestmark = pytest.mark.gui
PLUGIN = "napari-gradcam"


def cropped_scan(path: Path) -> Path:
    """A crop of a CT scan as another tool writes it: OME-Zarr in millimetres whose NGFF
    translation says where the crop sits in the full scan."""
    data = np.random.default_rng(0).random((6, 32, 40)).astype(np.float32)
    group = zarr.open_group(str(path), mode="w", zarr_format=2)
    group.create_array("0", shape=data.shape, dtype=data.dtype)[:] = data
    group.attrs["multiscales"] = [{"version": "0.4", "name": "crop", "datasets": [{
        "path": "0", "coordinateTransformations": [
            {"type": "scale", "scale": [0.002, 0.0005, 0.0005]},
            {"type": "translation", "translation": [0.04, 0.013, 0.026]}]}],
        "axes": [{"name": n, "type": "space", "unit": "millimeter"} for n in "zyx"]}]
    return path


def test_a_widget_map_of_a_crop_saved_and_reopened_lands_on_the_crop(make_napari_viewer, qtbot,
                                                                     tmp_path):
    card = write_card(tmp_path, "c2")
    viewer = make_napari_viewer()
    widget = GradCAMWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Grad-CAM explainer")
    assert widget.load_model_source(card) is not None
    (scan,) = viewer.open(cropped_scan(tmp_path / "crop.ome.zarr"), plugin=PLUGIN)
    assert tuple(scan.translate) == pytest.approx((40.0, 13.0, 26.0))
    widget.image_combo.setCurrentText(scan.name)
    widget.mode_combo.setCurrentIndex(widget.mode_combo.findData("slices"))
    widget.axis_spin.setValue(0)
    widget.run()
    finish(qtbot, widget)
    (cam,) = [layer for layer in viewer.layers if METADATA_KEY in layer.metadata
              and layer is not scan]
    saved = tmp_path / "maps.ome.zarr"
    cam.save(str(saved), plugin=PLUGIN)
    assert ngff_translation(saved, 3) == pytest.approx((40.0, 13.0, 26.0))
    (back,) = viewer.open(saved, plugin=PLUGIN)
    np.testing.assert_allclose(np.asarray(back.data), np.asarray(cam.data))
    assert tuple(back.translate) == pytest.approx(tuple(scan.translate))
    assert tuple(back.scale) == pytest.approx(tuple(scan.scale))
    assert back.extent.world == pytest.approx(scan.extent.world)
    assert back.metadata[METADATA_KEY]["method"] == cam.metadata[METADATA_KEY]["method"]
    assert back.metadata[METADATA_KEY]["model"] == "c2"
