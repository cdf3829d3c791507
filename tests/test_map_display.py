"""The "Map display" dock and :mod:`napari_gradcam.display` in a real napari viewer.

The map is a real Grad-CAM of the shipped CT patch classifier on a crop of the CT sample
(through the core, as a script would), placed with ``placement.map_layer_placement``. What is
checked is what a user reads off the screen: the colour range of each normalisation scope
(while the data stay bit for bit the same), the colour bar's range, the 3D rendering and the
dimmed scan of each style, and the exported PNG with its scale bar.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("napari")

from napari_gradcam.core.normalise import robust_limits, top_percentile
from napari_gradcam.display import (
    MAP_OPACITY,
    METADATA_KEY,
    STYLES_3D,
    display_state,
    show_map,
)
from napari_gradcam.figure import canvas_overlay

pytestmark = pytest.mark.gui

CROP = (slice(40, 72), slice(32, 96), slice(32, 96))  # 32 × 64 × 64, through the crack


@pytest.fixture(scope="module")
def ct_and_map():
    """The CT crop, its labels, the crack Grad-CAM (z, y, x) and the map's provenance."""
    import torch

    from napari_gradcam import GradCAM, load_model
    from napari_gradcam._sample_data import ct_volume_sample
    from napari_gradcam.core.provenance import make_provenance

    torch.set_num_threads(1)
    (volume, kwargs, _), (labels, _, _) = ct_volume_sample()
    scan = np.ascontiguousarray(volume[CROP])
    loaded = load_model("ct-patch-classifier")
    crack = loaded.card.class_names.index("crack")
    batch = loaded.preprocess(scan[None, None].astype(np.float32))
    cam = GradCAM(loaded.model, loaded.card.target_layer)(batch, target=crack)
    cam = np.asarray(cam[0], dtype=np.float32)
    record = make_provenance(method="gradcam", layers=[loaded.card.target_layer],
                             target="crack", model_name=loaded.card.name, mode="current",
                             source="CT crop")
    return (scan, np.ascontiguousarray(labels[CROP]), cam, record, kwargs["scale"],
            kwargs["contrast_limits"])


@pytest.fixture
def viewer_with_map(make_napari_viewer, ct_and_map):
    from napari_gradcam.placement import map_layer_placement

    scan, labels, cam, record, scale, window = ct_and_map
    viewer = make_napari_viewer(show=True)  # a hidden canvas renders black screenshots
    common = {"scale": scale, "units": ("µm", "µm", "µm"), "axis_labels": ("z", "y", "x")}
    source = viewer.add_image(scan, name="CT crop", contrast_limits=window, **common)
    viewer.add_labels(labels, name="defects", **common)
    layer = viewer.add_image(cam.copy(), name="CT crop · gradcam · crack",
                             contrast_limits=robust_limits(cam),
                             metadata={METADATA_KEY: dict(record)},
                             **map_layer_placement(source))
    show_map(viewer, layer)
    return viewer, source, layer


def _dock(viewer):
    from napari_gradcam._map_display import MapDisplayWidget

    widget = MapDisplayWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Map display")
    return widget


def test_the_map_is_placed_on_its_scan_in_physical_units(viewer_with_map):
    _viewer, source, layer = viewer_with_map
    np.testing.assert_allclose(layer.scale, source.scale)
    np.testing.assert_allclose(layer.translate, source.translate)
    assert tuple(str(u) for u in layer.units) == ("micrometer",) * 3
    corner = source.data_to_world((31, 63, 63))
    np.testing.assert_allclose(layer.data_to_world((31, 63, 63)), corner)


def test_scopes_change_only_the_colour_range_and_are_declared(viewer_with_map, qtbot):
    viewer, source, layer = viewer_with_map
    dock = _dock(viewer)
    assert dock.map_layer.value is layer
    data_before = layer.data.copy()
    data_object = layer.data
    raw = tuple(layer.contrast_limits)
    assert raw == pytest.approx(robust_limits(data_before))
    assert display_state(layer)["scope"] == "raw"

    dock.scope.value = "per volume"
    assert tuple(layer.contrast_limits) == pytest.approx(
        (float(data_before.min()), float(data_before.max())))
    assert display_state(layer)["scope"] == "per volume"

    z = 5
    viewer.dims.set_point(0, source.data_to_world((z, 0, 0))[0])
    dock.scope.value = "per slice"
    plane = data_before[z]
    assert tuple(layer.contrast_limits) == pytest.approx((float(plane.min()),
                                                          float(plane.max())))
    assert display_state(layer)["slice"] == [z]
    assert "per slice" in dock.caption.value and "a.u." in dock.caption.value
    # moving to another slice re-scales to that slice (display follows the view)
    z2 = 20
    viewer.dims.set_point(0, source.data_to_world((z2, 0, 0))[0])
    plane2 = data_before[z2]
    assert tuple(layer.contrast_limits) == pytest.approx((float(plane2.min()),
                                                          float(plane2.max())))
    assert plane2.max() != pytest.approx(plane.max())

    dock.scope.value = "raw"
    assert tuple(layer.contrast_limits) == pytest.approx(raw)
    assert layer.data is data_object
    assert layer.data.dtype == data_before.dtype
    np.testing.assert_array_equal(layer.data, data_before)  # bit for bit


def test_colour_bar_is_visible_and_spans_the_contrast_limits(viewer_with_map, qtbot):
    viewer, _, layer = viewer_with_map
    dock = _dock(viewer)
    assert layer.colorbar.visible
    canvas = viewer.window._qt_viewer.canvas
    for scope in ("raw", "per volume"):
        dock.scope.value = scope
        visual = canvas._layer_overlay_to_visual[layer][layer.colorbar]
        visual = visual[0] if isinstance(visual, list) else visual
        assert visual.node.visible
        assert tuple(visual.node.img.clim) == pytest.approx(tuple(layer.contrast_limits))
        low, high = layer.contrast_limits
        assert f"{low:.3g}" in dock.caption.value and f"{high:.3g}" in dock.caption.value
    text = canvas_overlay(viewer, "text")
    assert text.visible and text.text == dock.caption.value
    dock.colorbar.value = False
    assert not layer.colorbar.visible and not text.visible


def test_3d_defaults_and_each_style(viewer_with_map, qtbot):
    viewer, source, layer = viewer_with_map
    dock = _dock(viewer)
    scan_opacity = source.opacity
    assert layer.blending == "additive"

    viewer.dims.ndisplay = 3
    default = STYLES_3D["attenuated MIP, scan dimmed"]
    assert layer.rendering == "attenuated_mip"
    assert layer.attenuation == pytest.approx(default["attenuation"])
    assert source.opacity == pytest.approx(default["scan_opacity"])
    assert layer.opacity == pytest.approx(1.0)  # the map drawn fully over the dimmed scan

    dock.style_3d.value = "iso-surface (top 1 %), scan dimmed"
    assert layer.rendering == "iso"
    assert layer.iso_threshold == pytest.approx(top_percentile(layer.data, 99.0))
    assert (layer.data > layer.iso_threshold).mean() < 0.011  # the map's top places only
    assert layer.blending == "translucent"
    assert source.opacity == pytest.approx(0.3)

    dock.style_3d.value = "MIP, additive (undimmed scan)"
    assert layer.rendering == "mip" and layer.blending == "additive"
    assert source.opacity == pytest.approx(scan_opacity)
    assert layer.opacity == pytest.approx(MAP_OPACITY)

    dock.style_3d.value = "attenuated MIP, scan dimmed"
    assert source.opacity == pytest.approx(0.3)
    viewer.dims.ndisplay = 2  # back to 2D: the overlay and the scan as they were
    assert layer.blending == "additive"
    assert source.opacity == pytest.approx(scan_opacity)
    assert layer.opacity == pytest.approx(MAP_OPACITY)
    assert display_state(layer)["style_3d"] == "attenuated MIP, scan dimmed"


def test_a_map_added_in_3d_gets_the_default_without_the_dock(make_napari_viewer, ct_and_map):
    from napari_gradcam.placement import map_layer_placement

    scan, _, cam, record, scale, _ = ct_and_map
    viewer = make_napari_viewer()
    source = viewer.add_image(scan, name="CT crop", scale=scale)
    viewer.dims.ndisplay = 3
    layer = viewer.add_image(cam, name="map", metadata={METADATA_KEY: dict(record)},
                             **map_layer_placement(source))
    show_map(viewer, layer)
    assert layer.rendering == "attenuated_mip"
    assert source.opacity == pytest.approx(0.3)
    assert layer.colorbar.visible


def test_the_default_3d_view_is_not_washed_out(viewer_with_map, qtbot):
    """Where the map is drawn, the old default (MIP, additive over the undimmed scan) turns
    the bright specimen nearly white, so the map's yellow fades to a pale tint; the default
    keeps it a saturated yellow. Saturation = (max − min) / max of R, G, B: 0 for grey and
    white, 1 for pure yellow."""
    viewer, source, _layer = viewer_with_map
    viewer.layers["defects"].visible = False
    dock = _dock(viewer)
    viewer.dims.ndisplay = 3
    viewer.reset_view()

    def shot() -> np.ndarray:
        image = viewer.screenshot(canvas_only=True, flash=False)
        return image[..., :3].astype(float)

    def saturation(image: np.ndarray) -> np.ndarray:
        top = image.max(axis=-1)
        return (top - image.min(axis=-1)) / np.maximum(top, 1.0)

    source.visible = False
    alone = shot()
    where = (alone[..., :2].min(axis=-1) - alone[..., 2]) > 20  # the map's footprint
    source.visible = True
    assert where.mean() > 0.01
    new = saturation(shot())[where].mean()
    dock.style_3d.value = "MIP, additive (undimmed scan)"
    old = saturation(shot())[where].mean()
    assert new > old + 0.15, (new, old)


def test_figure_export_with_a_scale_bar(viewer_with_map, qtbot, tmp_path):
    import imageio.v3 as iio

    viewer, _, _ = viewer_with_map
    dock = _dock(viewer)
    assert not canvas_overlay(viewer, "scale_bar").visible
    with_bar = dock.export(tmp_path / "with.png")
    dock.scale_bar.value = False
    without = dock.export(tmp_path / "without.png")
    assert with_bar.is_file() and without.is_file()
    image, plain = iio.imread(with_bar), iio.imread(without)
    expected = viewer.screenshot(canvas_only=True, flash=False).shape[:2]
    assert image.shape[:2] == expected == plain.shape[:2]
    assert not np.array_equal(image, plain)  # the bar is drawn
    assert not canvas_overlay(viewer, "scale_bar").visible  # exporting does not change the view
    canvas = viewer.window._qt_viewer.canvas
    bars = canvas._viewer_overlay_to_visual[canvas_overlay(viewer, "scale_bar")]
    bar = bars[0] if isinstance(bars, list) else bars
    assert "µm" in bar.node.text.text  # physical units, from the layers
    with pytest.raises(ValueError, match=r"must be a \.png"):
        dock.export(tmp_path / "figure.jpg")


def test_the_dock_follows_a_renamed_map(viewer_with_map, qtbot):
    viewer, _, layer = viewer_with_map
    dock = _dock(viewer)
    layer.name = "renamed map"
    assert dock.map_layer.value is layer
    assert dock.map_layer.native.currentText() == "renamed map"  # the picker shows the new name
    dock.scope.value = "per volume"
    assert display_state(layer)["scope"] == "per volume"


def test_a_multiscale_map_is_ranged_on_its_full_resolution(make_napari_viewer, ct_and_map):
    """Our OME-Zarr reader opens a pyramid as a multiscale layer: the scopes use level 0."""
    from napari_gradcam.display import set_scope

    _, _, cam, record, _, _ = ct_and_map
    viewer = make_napari_viewer()
    levels = [cam, np.ascontiguousarray(cam[::2, ::2, ::2])]
    layer = viewer.add_image(levels, multiscale=True, name="pyramid",
                             contrast_limits=robust_limits(cam),
                             metadata={METADATA_KEY: dict(record)})
    show_map(viewer, layer)
    assert set_scope(viewer, layer, "per volume") == pytest.approx(
        (float(cam.min()), float(cam.max())))
    viewer.dims.set_point(0, 3)
    assert set_scope(viewer, layer, "per slice") == pytest.approx(
        (float(cam[3].min()), float(cam[3].max())))
    assert layer.data[0] is cam


def test_both_docks_open_from_the_plugins_menu(make_napari_viewer):
    """The manifest's widget contributions resolve to the docks (as Plugins ▸ … opens them)."""
    from napari_gradcam._map_display import MapDisplayWidget
    from napari_gradcam._spectrum_plot import SpectrumPlotWidget

    viewer = make_napari_viewer()
    for name, kind in (("Map display", MapDisplayWidget),
                       ("Spectrum and CAM", SpectrumPlotWidget)):
        _, widget = viewer.window.add_plugin_dock_widget("napari-gradcam", name)
        assert isinstance(widget, kind)


def test_a_map_larger_than_the_budget_is_ranged_on_a_level_that_fits(make_napari_viewer):
    """A map on disk is larger than memory: its whole-volume statistics come from the finest
    pyramid level within display.STATS_BYTES, never from reading level 0 whole."""
    import dask.array as da

    from napari_gradcam.display import STATS_BYTES, stats_level

    levels = [da.zeros((1024, 1024, 1024), dtype=np.float32, chunks=(16, 1024, 1024)),
              da.zeros((512, 512, 512), dtype=np.float32, chunks=(16, 512, 512)),
              da.ones((256, 256, 256), dtype=np.float32, chunks=(64, 256, 256))]
    viewer = make_napari_viewer()
    layer = viewer.add_image(levels, multiscale=True, name="big map",
                             contrast_limits=(0.0, 1.0), metadata={METADATA_KEY: {}})
    chosen = stats_level(layer)
    assert chosen is levels[2] and chosen.nbytes <= STATS_BYTES < levels[1].nbytes


def test_leaving_3d_gives_each_map_its_own_2d_blending_back(viewer_with_map, qtbot):
    """A signed evidence map is drawn 'translucent' in 2D; a 3D round trip must not turn it
    into the explainer's additive overlay (it would tint the whole scan)."""
    viewer, _, layer = viewer_with_map
    layer.blending = "translucent"
    viewer.dims.ndisplay = 3
    qtbot.wait(50)
    assert layer.blending != "translucent"  # the 3D style's blending while in 3D
    viewer.dims.ndisplay = 2
    qtbot.wait(50)
    assert layer.blending == "translucent"
