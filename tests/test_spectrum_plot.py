"""The "Spectrum and CAM" dock in a real napari viewer, on the XRD sample and the shipped XRD
phase classifier (explained row by row through the core, as a script would).

What is checked is what the plot shows: the row's spectrum and its CAM, exactly (the line
data against the arrays), against 2θ in degrees from the layer's scale; the explained class
from the map's provenance; the row following the cursor; and per-row scaling as a display
layer that leaves the map's data bit for bit as they were.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("napari")

from napari_gradcam.core.normalise import robust_limits, weak_rows
from napari_gradcam.display import METADATA_KEY, show_map

pytestmark = pytest.mark.gui


@pytest.fixture(scope="module")
def xrd():
    """The XRD sample's layers, Grad-CAM of each row's predicted phase, and the provenance."""
    import torch

    from napari_gradcam import GradCAM, load_model
    from napari_gradcam._sample_data import spectra_sample
    from napari_gradcam.core.provenance import make_provenance

    torch.set_num_threads(1)
    layers = spectra_sample()
    image = layers[0][0]
    loaded = load_model("xrd-phase-classifier")
    result = GradCAM(loaded.model, loaded.card.target_layer).explain(loaded.preprocess(image))
    cam = np.asarray(result.maps, dtype=np.float32)
    probabilities = np.asarray(result.probabilities, dtype=np.float64)
    record = make_provenance(method="gradcam", layers=[loaded.card.target_layer],
                             target="predicted", model_name=loaded.card.name,
                             mode="slices", source=layers[0][1]["name"],
                             options={"class_names": list(loaded.class_names)})
    record["predictions"] = {"class_names": list(loaded.class_names),
                             "probabilities": probabilities.round(6).tolist(),
                             "positions": [[row, 0] for row in range(len(image))],
                             "sample_axis": 0}
    return layers, cam, record, probabilities, list(loaded.class_names)


@pytest.fixture
def dock(make_napari_viewer, xrd):
    from napari_gradcam._spectrum_plot import SpectrumPlotWidget
    from napari_gradcam.placement import map_layer_placement

    layers, cam, record, _, _ = xrd
    viewer = make_napari_viewer()
    for data, kwargs, kind in layers:
        getattr(viewer, f"add_{kind}")(data, **kwargs)
    spectra = viewer.layers[layers[0][1]["name"]]
    layer = viewer.add_image(cam.copy(), name="XRD · gradcam · predicted",
                             contrast_limits=robust_limits(cam),
                             metadata={METADATA_KEY: dict(record)},
                             **map_layer_placement(spectra))
    show_map(viewer, layer)
    widget = SpectrumPlotWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Spectrum and CAM")
    return viewer, widget, spectra, layer


def test_the_plot_shows_the_rows_spectrum_and_cam_against_two_theta(dock, xrd):
    _viewer, widget, spectra, layer = dock
    layers, cam, _, probabilities, names = xrd
    assert widget.spectra.value is spectra and widget.map_layer.value is layer
    two_theta = np.asarray(layers[0][1]["metadata"]["two_theta_deg"])
    row = 23
    widget.row.value = row
    np.testing.assert_array_equal(widget.spectrum_line.get_ydata(), spectra.data[row])
    np.testing.assert_allclose(widget.spectrum_line.get_xdata(), two_theta, atol=1e-9)
    np.testing.assert_array_equal(widget.cam_line.get_ydata(), cam[row])
    np.testing.assert_allclose(widget.cam_line.get_xdata(), two_theta, atol=1e-9)
    assert widget.axes.get_xlabel() == "2θ (°)"
    predicted = names[int(np.argmax(probabilities[row]))]
    assert predicted in widget.cam_line.get_label()
    title = widget.axes.get_title()
    assert f"row {row}" in title and predicted in title
    assert f"{names[0]} {probabilities[row][0]:.2f}" in title
    legend = [text.get_text() for text in widget.axes.get_legend().get_texts()]
    assert legend == ["spectrum", f"CAM · predicted: {predicted}"]
    assert widget.cam_axes.get_ylim()[1] == pytest.approx(layer.contrast_limits[1] * 1.05)


def test_the_plot_follows_the_row_under_the_cursor(dock, xrd):
    viewer, widget, spectra, _ = dock
    _, cam, _, probabilities, names = xrd
    for row in (7, 51):
        viewer.cursor.position = tuple(spectra.data_to_world((row, 300)))
        assert widget.row.value == row
        np.testing.assert_array_equal(widget.spectrum_line.get_ydata(), spectra.data[row])
        np.testing.assert_array_equal(widget.cam_line.get_ydata(), cam[row])
        assert names[int(np.argmax(probabilities[row]))] in widget.axes.get_title()
    widget.follow.value = False
    viewer.cursor.position = tuple(spectra.data_to_world((3, 300)))
    assert widget.row.value == 51  # not following: the chosen row stays


def test_per_row_scaling_is_a_display_layer_and_leaves_the_map_unchanged(dock, xrd):
    _viewer, widget, _, layer = dock
    _, cam, _, _, _ = xrd
    before = layer.data.copy()
    # why the option exists: on the shared range many rows look empty
    assert weak_rows(cam, axis=0, fraction=0.1, limits=tuple(layer.contrast_limits)) >= 10
    widget.per_row.value = True
    derived = widget.per_row_layer()
    assert derived is not None and not layer.visible and derived.visible
    shown = np.asarray(derived.data)
    peaks = cam.max(axis=1, keepdims=True)
    expected = np.where(peaks > 0, cam / np.where(peaks > 0, peaks, 1), 0)
    np.testing.assert_allclose(shown, expected, rtol=1e-6)
    assert np.allclose(shown.max(axis=1)[peaks[:, 0] > 0], 1.0)
    np.testing.assert_allclose(derived.translate, layer.translate)
    np.testing.assert_allclose(derived.scale, layer.scale)
    record = derived.metadata[METADATA_KEY]["display"]
    assert record["derived_from"] == layer.name and record["scope"] == "per row"
    assert widget.map_layer.value is layer  # the derived layer is not offered as a map
    assert derived not in widget.map_layer.choices
    widget.row.value = 12  # the plot keeps raw values, on this row's own range
    np.testing.assert_array_equal(widget.cam_line.get_ydata(), cam[12])
    assert widget.cam_axes.get_ylim()[1] == pytest.approx(cam[12].max() * 1.05)

    widget.per_row.value = False
    assert widget.per_row_layer() is None and layer.visible
    np.testing.assert_array_equal(layer.data, before)
    assert layer.data.dtype == before.dtype


def test_without_units_the_x_axis_is_the_channel_index(make_napari_viewer):
    from napari_gradcam._spectrum_plot import SpectrumPlotWidget

    viewer = make_napari_viewer()
    data = np.random.default_rng(0).random((5, 40)).astype(np.float32)
    viewer.add_image(data, name="plain stack")
    widget = SpectrumPlotWidget(viewer)
    widget.row.value = 2
    assert widget.axes.get_xlabel() == "channel"
    np.testing.assert_array_equal(widget.spectrum_line.get_xdata(), np.arange(40))
    np.testing.assert_array_equal(widget.spectrum_line.get_ydata(), data[2])
    assert widget.cam_line is None  # no map in the viewer


def test_a_map_of_a_few_rows_lines_up_by_its_origin(make_napari_viewer, xrd):
    """A map of rows 10-12 only (the widget's 'current' mode or a crop) is placed by its
    origin; the plot finds each row's CAM through world coordinates, and its class from the
    recorded positions."""
    from napari_gradcam._spectrum_plot import SpectrumPlotWidget
    from napari_gradcam.placement import map_layer_placement

    layers, cam, record, probabilities, names = xrd
    viewer = make_napari_viewer()
    spectra = viewer.add_image(layers[0][0], **layers[0][1])
    part = dict(record)
    part["predictions"] = {**record["predictions"],
                           "probabilities": probabilities[10:13].tolist(),
                           "positions": [[row, 0] for row in (10, 11, 12)]}
    layer = viewer.add_image(cam[10:13].copy(), name="rows 10-12",
                             metadata={METADATA_KEY: part},
                             **map_layer_placement(spectra, origin=(10, 0)))
    widget = SpectrumPlotWidget(viewer)
    assert widget.map_layer.value is layer and widget.spectra.value is spectra
    widget.row.value = 11
    np.testing.assert_array_equal(widget.cam_line.get_ydata(), cam[11])
    assert names[int(np.argmax(probabilities[11]))] in widget.cam_line.get_label()
    widget.row.value = 5
    assert widget.cam_line is None
    assert "does not cover this row" in widget.axes.get_title()
    np.testing.assert_array_equal(widget.spectrum_line.get_ydata(), spectra.data[5])
