"""The dock widget in a real napari viewer: runs, placement, cancel, clicks, tables, errors.

Run under a virtual display: ``xvfb-run -a pytest tests/test_widget.py``. Models are small
built-in networks saved as real cards in ``tmp_path`` (fast); one test uses a shipped demo model
when the zoo holds its weights. Errors are observed through napari's notification manager,
which records every ``show_error`` / ``show_warning``.
"""

from __future__ import annotations

import csv
import warnings
from pathlib import Path
from types import SimpleNamespace

import dask.array as da
import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file
from tests.test_jobs import (
    Picky,  # a model that fails on large inputs, shared with the job tests
    training_patches,  # the domain tests' "training data"
)
from torch import nn

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

from napari.layers import Image
from napari.utils.notifications import NotificationSeverity, notification_manager
from qtpy.QtCore import Qt, QTimer

from napari_gradcam._widget import METADATA_KEY, GradCAMWidget
from napari_gradcam.core.architectures import build_architecture
from napari_gradcam.core.domain import input_statistics
from napari_gradcam.core.methods import GradCAM, make_explainer
from napari_gradcam.core.models import list_demo_models, load_model
from napari_gradcam.core.targets import RegressionTarget, SegmentationRegion
from napari_gradcam.core.uncertainty import explain_with_uncertainty
from napari_gradcam.core.volume import explain_volume
from napari_helpers import CLASSES, finish, write_card

pytestmark = pytest.mark.gui
MANIFEST = Path(__file__).resolve().parents[1] / "src" / "napari_gradcam" / "napari.yaml"


@pytest.fixture(scope="module")
def cards(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("widget_cards")
    return {
        "c2": write_card(folder, "c2"),
        "c1": write_card(folder, "c1", spatial_dims=1, widths=(4, 8)),
        "c3": write_card(folder, "c3", spatial_dims=3, widths=(2, 4)),
        "unet": write_card(folder, "unet", architecture="unet", task="segmentation",
                           widths=(4, 8)),
    }


@pytest.fixture(autouse=True)
def own_config_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test remembers its widget choices in its own folder, never the user's."""
    folder = tmp_path / "config"
    monkeypatch.setenv("NAPARI_GRADCAM_CONFIG_DIR", str(folder))
    return folder


@pytest.fixture
def errors() -> list[str]:
    """Messages of errors and warnings shown during the test."""
    start = len(notification_manager.records)

    class Recorded(list):
        def __call__(self) -> list[str]:
            return [str(n.message) for n in notification_manager.records[start:]
                    if n.severity in (NotificationSeverity.ERROR, NotificationSeverity.WARNING)]

    return Recorded()


@pytest.fixture
def make_widget(make_napari_viewer, qtbot):
    def factory(card: Path | None = None):
        viewer = make_napari_viewer()
        widget = GradCAMWidget(viewer)
        viewer.window.add_dock_widget(widget, name="Grad-CAM explainer")
        if card is not None:
            assert widget.load_model_source(card) is not None
        return viewer, widget

    yield factory


def volume(shape=(6, 32, 40), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).random(shape).astype(np.float32)


def set_mode(widget: GradCAMWidget, mode: str, axis: int = 0) -> None:
    widget.form.mode.value = mode
    widget.form.axis.value = axis


# ------------------------------------------------------------------------------------------


def test_widget_from_the_manifest(make_napari_viewer, qtbot, cards, errors) -> None:
    npe2 = pytest.importorskip("npe2")
    manager = npe2.PluginManager.instance()
    manifest = npe2.PluginManifest.from_file(MANIFEST)
    if manifest.name not in manager._manifests:
        manager.register(manifest)
    viewer = make_napari_viewer()
    _dock, widget = viewer.window.add_plugin_dock_widget("napari-gradcam", "Grad-CAM explainer")
    assert isinstance(widget, GradCAMWidget)
    assert widget.device_combo.itemText(widget.device_combo.count() - 1) == "cpu"
    # napari hands plugins a public-only proxy of the viewer: a whole run must work through it
    viewer.add_image(volume((16, 16)), name="img")
    assert widget.image_combo.currentText() == "img"
    widget.load_model_source(cards["c2"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # napari's private-access warning
        widget.run()
        finish(qtbot, widget)
        layer = viewer.layers["img · gradcam · predicted · c2:features.3 · current view"]
        assert "predicted" in layer.get_status((3.0, 3.0), world=True)["coordinates"]
    # the source is recognised through napari's proxies: no removal notice
    assert not [message for message in errors() if "was removed" in message]


def test_refilled_combos_keep_the_choice_silently(make_widget, cards) -> None:
    viewer, widget = make_widget()
    viewer.add_image(volume(), name="a")
    viewer.add_image(volume(), name="b")
    viewer.add_labels(np.zeros((6, 32, 40), dtype=np.uint8), name="mask")
    widget.image_combo.setCurrentText("a")
    widget.region_combo.setCurrentText("mask")
    changes: list[int] = []
    widget.image_combo.currentIndexChanged.connect(changes.append)
    viewer.add_image(volume(), name="c")  # becomes active: the image combo follows it
    assert widget.image_combo.currentText() == "c"
    assert [widget.region_combo.itemText(i) for i in range(widget.region_combo.count())] == [
        "none", "mask"]
    assert widget.region_combo.currentText() == "mask"
    changes.clear()
    viewer.layers.selection.active = viewer.layers["mask"]  # not an image: no change
    del viewer.layers["b"]  # a refill keeps "c" and announces nothing
    assert widget.image_combo.currentText() == "c" and changes == []
    assert [widget.image_combo.itemText(i) for i in range(widget.image_combo.count())] == [
        "a", "c"]


def test_slices_run_places_the_result_on_the_source(make_widget, qtbot, cards) -> None:
    viewer, widget = make_widget(cards["c2"])
    data = volume((6, 32, 40))
    source = viewer.add_image(data, name="stack", scale=(2.0, 0.5, 0.25),
                              translate=(10.0, 1.0, -3.0), units=("um", "um", "um"),
                              axis_labels=("z", "y", "x"))
    set_mode(widget, "slices", axis=0)
    widget.batch_spin.setValue(4)
    widget.colormap_combo.setCurrentText("inferno")
    widget.run()
    assert widget.run_button.text() == "Cancel"
    finish(qtbot, widget)
    assert widget.run_button.text() == "Run"
    # the slice axis is named by the layer's axis label
    layer = viewer.layers["stack · gradcam · predicted · c2:features.3 · slices along z"]
    assert layer.data.shape == (6, 32, 40) and layer.data.max() > 0
    np.testing.assert_allclose(layer.scale, source.scale)
    np.testing.assert_allclose(layer.translate, source.translate)
    assert tuple(str(u) for u in layer.units) == ("micrometer",) * 3
    assert tuple(layer.axis_labels) == ("z", "y", "x")
    assert layer.blending == "additive" and layer.colormap.name == "inferno"
    low, high = layer.contrast_limits
    assert low == 0.0 < high <= float(layer.data.max())
    record = layer.metadata[METADATA_KEY]
    assert record["method"] == "gradcam" and record["model"] == "c2"
    assert record["layers"] == ["features.3"] and record["source"] == "stack"
    assert len(record["weights_sha256"]) == 64 and "torch" in record["versions"]
    assert np.asarray(record["predictions"]["probabilities"]).shape == (6, 3)
    # predictions of the current slice are shown
    viewer.dims.set_point(0, 10.0 + 2.0 * 4)  # world z of slice 4
    shown = widget.predictions_shown()
    expected = record["predictions"]["probabilities"][4]
    assert list(shown) == list(CLASSES)
    np.testing.assert_allclose(list(shown.values()), expected, atol=1e-3)
    # the user's layer is untouched
    assert np.array_equal(source.data, data) and source.metadata == {}


def test_rerun_with_the_same_settings_updates_the_layer_in_place(make_widget, qtbot,
                                                                 cards) -> None:
    viewer, widget = make_widget(cards["c2"])
    source = viewer.add_image(volume((3, 16, 16)), name="img")
    viewer.dims.set_point(0, 0)
    widget.run()
    finish(qtbot, widget)
    name = "img · gradcam · predicted · c2:features.3 · current view"
    layer = viewer.layers[name]
    assert layer.data.shape == (1, 16, 16) and layer.translate[0] == 0
    count = len(viewer.layers)
    viewer.dims.set_point(0, 2)
    widget.run()
    finish(qtbot, widget)
    assert len(viewer.layers) == count and viewer.layers[name] is layer
    assert layer.translate[0] == 2  # now the map of slice 2, placed there
    assert layer.metadata[METADATA_KEY]["options"]["origin"] == [2, 0, 0]
    assert source.translate[0] == 0
    # the label table of a one-slice CAM uses that slice of a 3D Labels layer
    labels = np.zeros((3, 16, 16), dtype=np.uint8)
    labels[2, 0:4, 0:4] = 5
    labels[0, 8:, 8:] = 6  # not on slice 2: not in the table
    viewer.add_labels(labels, name="objects")
    widget.tabs.setCurrentIndex(1)
    widget.cam_combo.setCurrentText(name)
    widget.labels_combo.setCurrentText("objects")
    table = widget.compute_label_table()
    assert table["label"].tolist() == [5]
    np.testing.assert_allclose(table["mean_cam"][0], layer.data[0, 0:4, 0:4].mean(), rtol=1e-5)


def test_gui_stays_responsive_and_cancel_adds_nothing(make_widget, qtbot, cards) -> None:
    viewer, widget = make_widget(cards["c2"])
    viewer.add_image(volume((400, 48, 48)), name="big")  # far more than fits before the cancel
    set_mode(widget, "slices", axis=0)
    widget.batch_spin.setValue(1)
    ticks: list[int] = []
    timer = QTimer()
    timer.timeout.connect(lambda: ticks.append(widget.progress_bar.value()))
    timer.start(5)
    before = len(viewer.layers)
    worker = widget.run()
    progress: list[tuple[int, int]] = []
    worker.yielded.connect(progress.append)
    qtbot.waitUntil(lambda: len(progress) >= 2, timeout=20000)
    widget.run()  # the Run button is now Cancel
    finish(qtbot, widget)
    timer.stop()
    assert len(ticks) > 3, "the event loop did not run during the job"
    assert progress[-1][0] < 400, "the job ran to the end despite the cancel"
    assert len(viewer.layers) == before
    assert widget.run_button.text() == "Run" and widget.run_button.isEnabled()


def test_switching_layers_mid_run_cannot_misplace_the_result(make_widget, qtbot,
                                                             cards) -> None:
    viewer, widget = make_widget(cards["c2"])
    first = viewer.add_image(volume((12, 32, 32)), name="first", scale=(3.0, 1.0, 1.0))
    set_mode(widget, "slices", axis=0)
    widget.batch_spin.setValue(1)
    widget.image_combo.setCurrentText("first")
    worker = widget.run()
    started = []
    worker.yielded.connect(started.append)
    qtbot.waitUntil(lambda: bool(started), timeout=20000)
    viewer.add_image(volume((5, 8, 8), seed=2), name="second")  # becomes active
    first.scale = (7.0, 7.0, 7.0)
    finish(qtbot, widget)
    assert widget.image_combo.currentText() == "second"
    layer = viewer.layers["first · gradcam · predicted · c2:features.3 · slices along axis 0"]
    assert layer.data.shape == (12, 32, 32)
    np.testing.assert_allclose(layer.scale, (3.0, 1.0, 1.0))  # the transform at the start


def mouse_gesture(viewer, modifiers, position, moves=()) -> None:
    """Press, move through ``moves`` (screen offsets) and release, through napari's own
    dispatch of mouse events to the viewer's drag callbacks (what the canvas does)."""
    from napari.utils._proxies import ReadOnlyWrapper
    from napari.utils.interactions import (
        mouse_move_callbacks,
        mouse_press_callbacks,
        mouse_release_callbacks,
    )

    def event(kind, pos):
        return ReadOnlyWrapper(SimpleNamespace(
            type=kind, modifiers=modifiers, position=position, pos=pos, is_dragging=True,
            view_direction=None, dims_displayed=[1, 2], delta=(0, 0), button=1),
            exceptions=("handled",))

    mouse_press_callbacks(viewer, event("mouse_press", (100.0, 100.0)))
    for dx, dy in moves:
        mouse_move_callbacks(viewer, event("mouse_move", (100.0 + dx, 100.0 + dy)))
    last = moves[-1] if moves else (0.0, 0.0)
    mouse_release_callbacks(viewer, event("mouse_release", (100.0 + last[0], 100.0 + last[1])))


def test_alt_click_explains_the_slice_under_the_cursor(make_widget, qtbot, cards) -> None:
    viewer, widget = make_widget(cards["c2"])
    viewer.add_image(volume((8, 16, 16)), name="stack", scale=(2.0, 1.0, 1.0))
    mouse_gesture(viewer, (), (10.0, 4.0, 4.0))
    assert widget.worker is None  # a click without the modifier does nothing
    # Alt-drag is napari's zoom: it must not start a run
    mouse_gesture(viewer, ("Alt",), (10.0, 4.0, 4.0), moves=[(3.0, 0.0), (20.0, 12.0)])
    assert widget.worker is None and not [
        layer for layer in viewer.layers if METADATA_KEY in layer.metadata]
    # a jitter of a pixel or two is still a click
    mouse_gesture(viewer, ("Alt",), (10.0, 4.0, 4.0), moves=[(1.0, 1.0)])
    assert widget.worker is not None
    finish(qtbot, widget)
    maps = [layer for layer in viewer.layers if METADATA_KEY in layer.metadata]
    assert len(maps) == 1
    (explained,) = maps[0].metadata[METADATA_KEY]["predictions"]["target_indices"]
    # the explained class is in the name, and the clicked point is marked
    layer = viewer.layers[f"stack · gradcam · clicked {CLASSES[explained]} · c2:features.3 · "
                          "current view"]
    assert layer.metadata[METADATA_KEY]["target"] == f"clicked {CLASSES[explained]}"
    marks = viewer.layers["Grad-CAM clicks"]
    np.testing.assert_allclose(marks.data, [[10.0, 4.0, 4.0]])
    assert layer.data.shape == (1, 16, 16) and layer.translate[0] == 10.0  # slice 5
    text = widget.hover_text(layer, (10.0, 4.0, 4.0))
    assert text.startswith("CAM ") and "predicted" in text
    status = layer.get_status((10.0, 4.0, 4.0), world=True)
    assert "predicted" in status["coordinates"]


def test_click_on_a_segmentation_explains_the_object_there(make_widget, qtbot, cards) -> None:
    viewer, widget = make_widget(cards["unet"])
    viewer.add_image(volume((16, 16)), name="slice")
    assert widget.target_combo.itemText(0) == "clean"  # no "predicted class" for segmenters
    widget.explain_at((5.0, 7.0))
    finish(qtbot, widget)
    (layer,) = [layer for layer in viewer.layers if layer.name.startswith(
        "slice · gradcam · clicked ")]
    record = layer.metadata[METADATA_KEY]
    clicked = record["predictions"]["target_indices"][0]
    assert layer.name == f"slice · gradcam · clicked {CLASSES[clicked]} · unet:down1 · current view"
    assert "this pixel" in widget.hover_text(layer, (5.0, 7.0))
    # a class inside the region painted in a Labels layer (Seg-Grad-CAM)
    region = np.zeros((16, 16), dtype=np.uint8)
    region[4:10, 4:10] = 1
    viewer.add_labels(region, name="painted")
    widget.image_combo.setCurrentText("slice")
    widget.target_combo.setCurrentText("crack")
    widget.region_combo.setCurrentText("painted")
    widget.run()
    finish(qtbot, widget)
    in_region = viewer.layers["slice · gradcam · crack in 'painted' · unet:down1 · current view"]
    assert in_region.metadata[METADATA_KEY]["target"] == "crack in 'painted'"
    # all classes: one layer per class
    widget.target_combo.setCurrentText("all classes")
    widget.run()
    finish(qtbot, widget)
    for name in CLASSES:
        assert f"slice · gradcam · {name} · unet:down1 · current view" in viewer.layers


def test_label_table_is_shown_stored_and_exported(make_widget, qtbot, cards,
                                                  tmp_path) -> None:
    viewer, widget = make_widget(cards["c2"])
    viewer.add_image(volume((32, 32)), name="micrograph")
    labels = np.zeros((32, 32), dtype=np.uint8)
    labels[2:10, 2:10] = 1
    labels[20:30, 18:28] = 2
    labels_layer = viewer.add_labels(labels, name="defects")
    widget.image_combo.setCurrentText("micrograph")
    widget.run()
    finish(qtbot, widget)
    widget.cam_combo.setCurrentText(
        "micrograph · gradcam · predicted · c2:features.3 · current view")
    widget.labels_combo.setCurrentText("defects")
    table = widget.compute_label_table()
    cam = viewer.layers["micrograph · gradcam · predicted · c2:features.3 · current view"].data
    assert table["label"].tolist() == [1, 2]
    np.testing.assert_allclose(table["mean_cam"][1], cam[20:30, 18:28].mean(), rtol=1e-5)
    assert widget.labels_table.rowCount() == 2
    headers = [widget.labels_table.horizontalHeaderItem(c).text()
               for c in range(widget.labels_table.columnCount())]
    assert headers[:5] == ["label", "name", "voxels", "mean_cam", "max_cam"]
    assert list(labels_layer.features["index"]) == [1, 2]
    assert np.array_equal(labels_layer.data, labels)  # only the features table changed
    path = widget.export_csv(tmp_path / "table.csv")
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(line for line in handle if not line.startswith("#")))
    assert rows[0][0] == "label" and len(rows) == 3


def test_spectra_dask_rgb_and_4d_layers(make_widget, qtbot, cards) -> None:
    viewer, widget = make_widget(cards["c1"])
    viewer.add_image(volume((5, 64)), name="spectra")
    widget.run()
    finish(qtbot, widget)
    spectra = viewer.layers["spectra · gradcam · predicted · c1:features.2 · current view"]
    assert spectra.data.shape == (5, 64)
    assert np.asarray(spectra.metadata[METADATA_KEY]
                      ["predictions"]["probabilities"]).shape == (5, 3)

    widget.load_model_source(cards["c2"])
    viewer.add_image(da.from_array(volume((4, 16, 16)), chunks=(1, 16, 16)), name="lazy")
    set_mode(widget, "slices", axis=0)
    widget.run()
    finish(qtbot, widget)
    lazy_result = viewer.layers["lazy · gradcam · predicted · c2:features.3 · slices along axis 0"]
    assert isinstance(lazy_result.data, np.ndarray) and lazy_result.data.shape == (4, 16, 16)

    rgb = np.random.default_rng(0).integers(0, 255, (16, 16, 3)).astype(np.uint8)
    viewer.add_image(rgb, name="colour", rgb=True)
    set_mode(widget, "current")
    widget.run()
    finish(qtbot, widget)
    colour = viewer.layers["colour · gradcam · predicted · c2:features.3 · current view"]
    assert colour.data.shape == (16, 16)

    viewer.add_image(volume((2, 3, 16, 16)), name="time")
    viewer.dims.set_point(0, 1)
    viewer.dims.set_point(1, 2)
    widget.run()
    finish(qtbot, widget)
    result = viewer.layers["time · gradcam · predicted · c2:features.3 · current view"]
    assert result.data.shape == (1, 1, 16, 16) and tuple(result.translate[:2]) == (1, 2)


def test_3d_model_in_windows(make_widget, qtbot, cards) -> None:
    viewer, widget = make_widget(cards["c3"])
    viewer.add_image(volume((12, 16, 16)), name="ct", scale=(1.0, 0.65, 0.65))
    assert widget.mode_combo.currentData() == "windows"
    assert [s.value() for s in widget.window_spins] == [8, 8, 8]
    widget.run()
    finish(qtbot, widget)
    layer = viewer.layers["ct · gradcam · predicted · c3:features.2 · volume"]
    assert layer.data.shape == (12, 16, 16)
    np.testing.assert_allclose(layer.scale, (1.0, 0.65, 0.65))
    assert layer.metadata[METADATA_KEY]["options"]["window"] == [8, 8, 8]
    viewer.dims.set_point(0, 10.0)
    assert "windows through plane 10" in widget.predictions_title.text()
    assert abs(sum(widget.predictions_shown().values()) - 1.0) < 0.01


def test_demo_model_on_a_ct_volume(make_widget, qtbot) -> None:
    names = {card.name for card in list_demo_models()}
    assert "ct-slice-unet" in names, "the shipped ct-slice-unet is missing from the zoo"
    from napari_gradcam._sample_data import ct_volume_sample

    viewer, widget = make_widget()
    assert widget.model_combo.findData("ct-slice-unet") >= 0
    widget.load_model_source("ct-slice-unet")
    (data, kwargs, _), (labels, labels_kwargs, _) = ct_volume_sample()
    viewer.add_image(data[40:56, 32:96, 32:96], **kwargs)
    viewer.add_labels(labels[40:56, 32:96, 32:96], **labels_kwargs)
    widget.image_combo.setCurrentText(kwargs["name"])
    widget.target_combo.setCurrentText("crack")
    set_mode(widget, "slices", axis=0)
    widget.run()
    finish(qtbot, widget, timeout=60000)
    target_layer = widget.loaded.card.target_layer  # the card's choice (dec1, dec0 ...)
    layer = viewer.layers[f"{kwargs['name']} · gradcam · crack · ct-slice-unet:{target_layer} · "
                          "slices along z"]
    assert layer.data.shape == (16, 64, 64)
    np.testing.assert_allclose(layer.scale, kwargs["scale"])


# ------------------------------------------------------------------------------------------
# Bad input: an error is shown and nothing changes


def test_no_model_no_layer_and_non_image_layers_are_refused(make_widget, cards,
                                                            errors) -> None:
    viewer, widget = make_widget()
    viewer.add_image(volume((16, 16)), name="img")
    assert widget.run() is None
    assert "Choose a model" in errors()[-1]
    viewer.layers.clear()
    widget.load_model_source(cards["c2"])
    assert widget.run() is None
    assert "Select an image layer" in errors()[-1]
    viewer.add_labels(np.zeros((16, 16), dtype=np.uint8), name="only labels")
    assert widget.run() is None
    assert "Labels layer" in errors()[-1]
    assert [layer.name for layer in viewer.layers] == ["only labels"]


def test_a_model_that_does_not_fit_is_refused(make_widget, cards, errors) -> None:
    viewer, widget = make_widget(cards["c3"])
    viewer.add_image(volume((16, 16)), name="flat")
    assert widget.run() is None
    assert "explains 3D data" in errors()[-1]
    assert len(viewer.layers) == 1
    widget.load_model_source(Path(cards["c3"]).with_name("missing.yaml"))
    assert "Could not load the model" in errors()[-1]


def test_nan_in_the_data_is_reported_and_nothing_added(make_widget, qtbot, cards,
                                                       errors) -> None:
    viewer, widget = make_widget(cards["c2"])
    data = volume((16, 16))
    data[3, 3] = np.nan
    viewer.add_image(data, name="holes")
    widget.run()
    finish(qtbot, widget)
    assert "NaN" in errors()[-1]
    assert [layer.name for layer in viewer.layers] == ["holes"]


@pytest.mark.parametrize(("error", "words"), [(RuntimeError, "the model failed"),
                                              (MemoryError, "out of memory")])
def test_failures_inside_the_model_are_reported(make_widget, qtbot, errors, error,
                                                words) -> None:
    viewer, widget = make_widget()
    widget.use_model(load_model(Picky(error)))
    viewer.add_image(volume((80, 80)), name="wide")
    widget.run()
    finish(qtbot, widget)
    assert words in errors()[-1]
    assert len(viewer.layers) == 1
    assert isinstance(viewer.layers[0], Image)


# ------------------------------------------------------------------------------------------
# Which axis is what: the channel-axis row


def gradcam_maps(loaded, batch: np.ndarray) -> np.ndarray:
    """The engine called directly on one batch (B, [C,] *spatial), the card's preprocessing."""
    return GradCAM(loaded.model, loaded.card.target_layer)(loaded.preprocess(batch))


def two_channel_card(folder: Path) -> Path:
    """A seeded 2-channel ResNetLike saved as a real card (napari_helpers' cards are 1-channel)."""
    torch.manual_seed(1)
    model = build_architecture("resnet_like", spatial_dims=2, in_channels=2, num_classes=3,
                               widths=(4, 8, 8))
    save_file(model.state_dict(), folder / "two.safetensors")
    card = folder / "two.yaml"
    card.write_text(
        "name: two\narchitecture: resnet_like\narchitecture_kwargs: {spatial_dims: 2, "
        "in_channels: 2, num_classes: 3, widths: [4, 8, 8]}\nweights: two.safetensors\n"
        f"spatial_dims: 2\nin_channels: 2\ntask: classification\n"
        f"class_names: [{', '.join(CLASSES)}]\n", encoding="utf-8")
    return card


def test_zcyx_stack_feeds_its_channel_axis_to_a_two_channel_model(make_widget, qtbot,
                                                                   tmp_path) -> None:
    viewer, widget = make_widget(two_channel_card(tmp_path))
    data = volume((3, 2, 16, 12), seed=3)
    viewer.add_image(data, name="zcyx", scale=(2.0, 1.0, 0.5, 0.5),
                     axis_labels=("z", "c", "y", "x"))
    assert widget.channel_combo.isVisibleTo(widget)
    assert widget.channel_combo.currentData() == 1  # the axis of length in_channels
    assert widget.channel_combo.currentText() == "1: c (2)"
    set_mode(widget, "slices", axis=0)
    widget.run()
    finish(qtbot, widget)
    layer = viewer.layers["zcyx · gradcam · predicted · two:features.3 · slices along z"]
    assert layer.data.shape == (3, 1, 16, 12)
    np.testing.assert_allclose(layer.scale, (2.0, 1.0, 0.5, 0.5))
    assert layer.metadata[METADATA_KEY]["options"]["channel_axis"] == 1
    for z in range(3):  # each slice is x[z][None]: (1, C=2, Y, X), as the model takes it
        expected = gradcam_maps(widget.loaded, data[z][None])
        np.testing.assert_allclose(layer.data[z, 0], expected[0], rtol=1e-4, atol=1e-7)


def test_tzyx_series_is_explained_at_the_current_time(make_widget, qtbot, cards) -> None:
    viewer, widget = make_widget(cards["c2"])
    data = volume((3, 4, 16, 16), seed=2)
    viewer.add_image(data, name="tzyx", scale=(5.0, 2.0, 0.5, 0.5),
                     translate=(100.0, 0.0, 0.0, 0.0))
    assert widget.channel_combo.isVisibleTo(widget)  # 4 axes: the row is offered
    assert widget.channel_combo.currentData() is None  # 1-channel model: no channel axis
    viewer.dims.set_point(0, 100.0 + 5.0 * 2)  # t = 2
    viewer.dims.set_point(1, 2.0 * 1)  # z = 1
    widget.run()
    finish(qtbot, widget)
    layer = viewer.layers["tzyx · gradcam · predicted · c2:features.3 · current view"]
    assert layer.data.shape == (1, 1, 16, 16)
    np.testing.assert_allclose(layer.scale, (5.0, 2.0, 0.5, 0.5))
    np.testing.assert_allclose(layer.translate, (110.0, 2.0, 0.0, 0.0))
    expected = gradcam_maps(widget.loaded, data[2, 1][None])
    np.testing.assert_allclose(layer.data[0, 0], expected[0], rtol=1e-4, atol=1e-7)


def test_a_channel_axis_of_the_wrong_length_is_refused_without_a_layer(make_widget, qtbot,
                                                                       tmp_path, errors) -> None:
    viewer, widget = make_widget(two_channel_card(tmp_path))
    viewer.add_image(volume((3, 2, 16, 12)), name="zcyx")
    widget.channel_combo.setCurrentIndex(widget.channel_combo.findData(0))  # length 3
    layers_before = len(viewer.layers)
    assert widget.run() is None
    assert "has length 3 but the model 'two' takes 2 channel" in errors()[-1]
    assert len(viewer.layers) == layers_before and widget.worker is None


def test_a_plain_3d_stack_with_a_one_channel_model_hides_the_channel_row(make_widget,
                                                                         cards) -> None:
    viewer, widget = make_widget(cards["c2"])
    viewer.add_image(volume((4, 16, 16)), name="zyx")
    assert not widget.channel_combo.isVisibleTo(widget)
    assert not widget.channel_combo.isEnabled()


# ------------------------------------------------------------------------------------------
# Wrong numbers and misleading messages (issue 9)


def test_a_one_pixel_target_layer_is_run_with_a_warning_naming_the_better_layer(
        make_widget, qtbot, cards, errors) -> None:
    viewer, widget = make_widget(cards["c2"])
    viewer.add_image(volume((3, 24, 20)), name="pooled")
    widget.form.all_layers.value = True  # pooling is not a block: listed with all layers
    widget.layer_combo.setCurrentIndex(widget.layer_combo.findData("pool"))
    set_mode(widget, "slices", axis=0)
    widget.batch_spin.setValue(1)  # three batches, each warns: one notification
    widget.run()
    finish(qtbot, widget)
    shown = [m for m in errors() if "'pool' outputs a feature map of one pixel" in m]
    assert len(shown) == 1
    assert "for an input of 24×20" in shown[0] and "instead: 'features.3'" in shown[0]
    # the run itself went through
    assert "pooled · gradcam · predicted · c2:pool · slices along axis 0" in viewer.layers


def test_only_a_points_layer_says_which_layers_can_be_explained(make_napari_viewer, cards,
                                                                errors) -> None:
    """Through the plugin manifest, as users get it: napari hands the widget layer proxies."""
    npe2 = pytest.importorskip("npe2")
    manager = npe2.PluginManager.instance()
    manifest = npe2.PluginManifest.from_file(MANIFEST)
    if manifest.name not in manager._manifests:
        manager.register(manifest)
    viewer = make_napari_viewer()
    _dock, widget = viewer.window.add_plugin_dock_widget("napari-gradcam", "Grad-CAM explainer")
    widget.load_model_source(cards["c2"])
    viewer.add_points(np.array([[3.0, 4.0]]), name="pts")
    assert widget.run() is None
    message = errors()[-1]
    assert "'pts' is a Points layer" in message and "PublicOnlyProxy" not in message
    assert "Grad-CAM explains Image layers" in message
    assert "Labels and Shapes layers serve as regions" in message
    assert [layer.name for layer in viewer.layers] == ["pts"]


def test_removing_the_source_mid_run_keeps_the_map_and_says_so(make_widget, qtbot, cards,
                                                               errors) -> None:
    viewer, widget = make_widget(cards["c2"])
    viewer.add_image(volume((12, 32, 32)), name="doomed", scale=(3.0, 1.0, 1.0))
    set_mode(widget, "slices", axis=0)
    widget.batch_spin.setValue(1)
    worker = widget.run()
    assert worker is not None
    # removed before the main thread handles any of the worker's signals: its result (however
    # fast the run) can only arrive after the source is gone. Waiting for a first progress
    # signal instead raced with fast runs whose result was handled in the same event batch.
    viewer.layers.remove("doomed")
    finish(qtbot, widget)
    assert "The layer 'doomed' was removed" in errors()[-1]
    assert "map was added anyway" in errors()[-1]
    # kept, where the source was
    layer = viewer.layers["doomed · gradcam · predicted · c2:features.3 · slices along axis 0"]
    assert layer.data.shape == (12, 32, 32)
    np.testing.assert_allclose(layer.scale, (3.0, 1.0, 1.0))


def test_a_finished_run_on_a_present_source_adds_no_removal_notice(make_widget, qtbot, cards,
                                                                   errors) -> None:
    viewer, widget = make_widget(cards["c2"])
    viewer.add_image(volume((16, 16)), name="kept")
    widget.run()
    finish(qtbot, widget)
    assert not [m for m in errors() if "was removed" in m]


# ------------------------------------------------------------------------------------------
# Runs told apart, progress, and which labels are the region (issue 11)


def test_runs_with_other_models_or_axes_add_layers_and_identical_runs_update_one(
        make_widget, qtbot, cards, tmp_path) -> None:
    viewer, widget = make_widget(cards["c2"])
    viewer.add_image(volume((4, 16, 12)), name="stack")
    set_mode(widget, "slices", axis=0)
    widget.run()
    finish(qtbot, widget)
    first = viewer.layers["stack · gradcam · predicted · c2:features.3 · slices along axis 0"]
    widget.load_model_source(write_card(tmp_path, "other", widths=(4, 4, 8)))
    set_mode(widget, "slices", axis=0)
    widget.run()
    finish(qtbot, widget)
    second = viewer.layers["stack · gradcam · predicted · other:features.3 · slices along axis 0"]
    assert second is not first and len(viewer.layers) == 3  # the first map was not replaced
    assert first.metadata[METADATA_KEY]["model"] == "c2"
    assert not np.allclose(first.data, second.data)  # two models, two different maps
    widget.run()  # identical settings: the same layer is updated, nothing added
    finish(qtbot, widget)
    assert len(viewer.layers) == 3
    assert viewer.layers[
        "stack · gradcam · predicted · other:features.3 · slices along axis 0"] is second
    set_mode(widget, "slices", axis=1)  # another slice axis: another layer
    widget.run()
    finish(qtbot, widget)
    assert "stack · gradcam · predicted · other:features.3 · slices along axis 1" in viewer.layers
    assert len(viewer.layers) == 4


def test_the_progress_bar_stays_full_after_a_finished_run_and_empties_after_a_cancel(
        make_widget, qtbot, cards) -> None:
    viewer, widget = make_widget(cards["c2"])
    viewer.add_image(volume((300, 48, 48)), name="stack")  # the cancel comes long before the end
    set_mode(widget, "current")
    widget.run()
    finish(qtbot, widget)
    bar = widget.progress_bar
    assert bar.maximum() > bar.minimum() and bar.value() == bar.maximum()  # 100 %
    set_mode(widget, "slices", axis=0)
    widget.batch_spin.setValue(1)
    worker = widget.run()
    progress: list[tuple[int, int]] = []
    worker.yielded.connect(progress.append)
    qtbot.waitUntil(lambda: bool(progress), timeout=20000)
    widget.run()  # Cancel
    finish(qtbot, widget)
    assert progress[-1][0] < 300 and bar.value() == bar.minimum()  # cancelled: empty


def test_the_region_is_the_chosen_label_value_of_a_labels_layer(make_widget, qtbot,
                                                                cards) -> None:
    viewer, widget = make_widget(cards["unet"])
    image = volume((16, 16), seed=4)
    viewer.add_image(image, name="slice")
    labels = np.zeros((16, 16), dtype=np.uint8)
    labels[2:7, 2:7] = 1  # a pore
    labels[9:14, 8:15] = 2  # the crack
    viewer.add_labels(labels, name="defects", metadata={"labels": {1: "pore", 2: "crack"}})
    widget.image_combo.setCurrentText("slice")
    widget.target_combo.setCurrentText("crack")
    widget.region_combo.setCurrentText("defects")
    picker = widget.region_value_combo
    assert picker.isEnabled()
    assert [picker.itemText(i) for i in range(picker.count())] == [
        "all non-zero labels", "1 · pore", "2 · crack"]
    picker.setCurrentIndex(picker.findData(2))
    widget.run()
    finish(qtbot, widget)
    only_crack = viewer.layers["slice · gradcam · crack in 'defects' label 2 · unet:down1 · "
                               "current view"]
    loaded = widget.loaded
    expected = GradCAM(loaded.model, "down1")(
        loaded.preprocess(image[None]), target=SegmentationRegion(2, (labels == 2)[None]))
    np.testing.assert_allclose(only_crack.data, expected[0], rtol=1e-4, atol=1e-7)
    everything = GradCAM(loaded.model, "down1")(
        loaded.preprocess(image[None]), target=SegmentationRegion(2, (labels != 0)[None]))
    assert not np.allclose(expected, everything)  # the choice of label changes the map
    # a label painted later is offered at once; the choice is kept
    viewer.layers["defects"].paint((0, 0), 3, refresh=True)
    qtbot.waitUntil(lambda: picker.itemText(picker.count() - 1) == "3", timeout=5000)
    assert picker.itemText(picker.count() - 1) == "3" and picker.currentData() == 2
    # a Shapes region or a classifier has no label values to choose
    widget.region_combo.setCurrentText("none")
    assert not picker.isEnabled()


# ------------------------------------------------------------------------------------------
# Uncertainty layers, the out-of-domain warning, every method, regression targets


def choose(combo, text: str) -> None:
    index = combo.findText(text)
    assert index >= 0, f"{text!r} not offered: {[combo.itemText(i) for i in range(combo.count())]}"
    combo.setCurrentIndex(index)


def test_the_uncertainty_layer_is_placed_like_its_map_with_its_meaning(make_widget, qtbot,
                                                                       cards) -> None:
    viewer, widget = make_widget(cards["c2"])
    data = volume((3, 24, 20), seed=4)
    source = viewer.add_image(data, name="stack", scale=(2.0, 0.5, 0.25),
                              translate=(1.0, 2.0, 3.0))
    set_mode(widget, "slices", 0)
    assert not widget.windows_uncertainty_check.isEnabled()  # a 2D model has no windows
    choose(widget.uncertainty_combo, "flips")
    widget.run()
    finish(qtbot, widget)
    name = "stack · gradcam · predicted · c2:features.3 · slices along axis 0"
    cam, spread = viewer.layers[name], viewer.layers[name + " · uncertainty"]
    for attribute in ("scale", "translate"):
        np.testing.assert_allclose(getattr(spread, attribute), getattr(cam, attribute))
    np.testing.assert_allclose(cam.scale, source.scale)
    assert tuple(spread.units) == tuple(cam.units)
    assert spread.colormap.name == "viridis" and cam.colormap.name != "viridis"
    assert not spread.visible and cam.visible  # shown over the map it would hide it
    record = spread.metadata[METADATA_KEY]
    assert record["uncertainty_of"] == name and list(record["meaning"]) == ["flips"]
    assert "mirrored" in record["meaning"]["flips"]
    loaded = widget.loaded
    cam_engine = GradCAM(loaded.model, loaded.card.target_layer)
    _mean, std, _info = explain_with_uncertainty(cam_engine, loaded.preprocess(data), None,
                                                 sources=("flips",))
    np.testing.assert_allclose(spread.data, std, rtol=1e-4, atol=1e-9)
    assert std.max() > 0
    assert METADATA_KEY not in source.metadata  # the user's layer is untouched
    # the same run without uncertainty updates the map and drops the spread of the old one
    choose(widget.uncertainty_combo, "off")
    widget.run()
    finish(qtbot, widget)
    assert name in viewer.layers and name + " · uncertainty" not in viewer.layers


def statistics_card(folder: Path) -> Path:
    """A card whose training statistics are those of 64² patches (as the demo cards carry)."""
    card = write_card(folder, "patches64")
    loaded = load_model(card)
    stats = input_statistics(training_patches(), spatial_dims=2, preprocess=loaded.preprocess,
                             sample=120)
    card.write_text(card.read_text(encoding="utf-8")
                    + yaml.safe_dump({"training_statistics": stats}), encoding="utf-8")
    return card


def test_an_out_of_domain_image_gets_a_warning_and_the_report_in_the_maps_metadata(
        make_widget, qtbot, tmp_path, errors) -> None:
    viewer, widget = make_widget(statistics_card(tmp_path))
    large = viewer.add_image(training_patches(1, 256, seed=9)[0], name="large")
    widget.image_combo.setCurrentText("large")
    widget.run()
    finish(qtbot, widget)
    layer = viewer.layers["large · gradcam · predicted · patches64:features.3 · current view"]
    report = layer.metadata[METADATA_KEY]["domain_check"]
    assert report["checked"] and report["out_of_domain"]
    assert [f["check"] for f in report["findings"] if f["flagged"]] == ["input_size"]
    warned = [message for message in errors() if message.startswith("large: ")]
    assert len(warned) == 1 and "unlike the model's training data" in warned[0]
    assert "256×256" in warned[0] and "64×64" in warned[0]
    assert METADATA_KEY not in large.metadata and "domain_check" not in large.metadata


def test_an_image_like_the_training_data_gets_no_warning(make_widget, qtbot, tmp_path,
                                                         errors) -> None:
    viewer, widget = make_widget(statistics_card(tmp_path))
    viewer.add_image(training_patches(4, 64, seed=11), name="patches")
    set_mode(widget, "slices", 0)
    widget.run()
    finish(qtbot, widget)
    layer = viewer.layers["patches · gradcam · predicted · patches64:features.3 · "
                          "slices along axis 0"]
    report = layer.metadata[METADATA_KEY]["domain_check"]
    assert report["checked"] and not report["out_of_domain"]
    assert errors() == []


def test_a_card_without_statistics_adds_no_notification_only_the_metadata(make_widget, qtbot,
                                                                           cards, errors) -> None:
    viewer, widget = make_widget(cards["c2"])
    viewer.add_image(volume((24, 20)), name="img")
    widget.run()
    finish(qtbot, widget)
    layer = viewer.layers["img · gradcam · predicted · c2:features.3 · current view"]
    assert layer.metadata[METADATA_KEY]["domain_check"]["checked"] is False
    assert errors() == []


def test_score_cam_runs_from_the_widget_as_the_explainer_does(make_widget, qtbot,
                                                              cards) -> None:
    viewer, widget = make_widget(cards["c2"])
    image = volume((24, 20), seed=8)
    viewer.add_image(image, name="img")
    choose(widget.method_combo, "scorecam")
    assert "Score-CAM" in widget.method_combo.itemData(widget.method_combo.currentIndex(),
                                                       Qt.ItemDataRole.ToolTipRole)
    widget.run()
    finish(qtbot, widget)
    layer = viewer.layers["img · scorecam · predicted · c2:features.3 · current view"]
    loaded = widget.loaded
    expected = make_explainer("scorecam", loaded.model, loaded.card.target_layer).explain(
        loaded.preprocess(image[None]), None).maps[0]
    assert expected.max() > 0
    np.testing.assert_allclose(layer.data, expected, rtol=1e-5, atol=1e-9)


class RegressionHead(nn.Module):
    """Predicts two properties (say porosity and grain size) from a pooled feature map."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.features = nn.Conv2d(1, 4, 3, padding=1)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.features(x)).mean((2, 3)))


def test_a_regression_head_offers_what_increases_or_decreases_each_output(make_widget, qtbot,
                                                                          cards) -> None:
    viewer, widget = make_widget(cards["c2"])
    offered = [widget.target_combo.itemText(i) for i in range(widget.target_combo.count())]
    assert not any(text.startswith(("increases", "decreases")) for text in offered)
    model = RegressionHead().eval()
    widget.use_model(load_model(model))
    offered = [widget.target_combo.itemText(i) for i in range(widget.target_combo.count())]
    assert {"increases output 0", "decreases output 0", "increases output 1",
            "decreases output 1"} <= set(offered)
    image = volume((24, 20), seed=9)
    viewer.add_image(image, name="img")
    choose(widget.target_combo, "decreases output 1")
    widget.run()
    finish(qtbot, widget)
    layer = viewer.layers["img · gradcam · decreases output 1 · RegressionHead:features · "
                          "current view"]
    tensor = torch.from_numpy(image[None, None])
    expected = GradCAM(model, "features").explain(tensor, RegressionTarget(1, sign=-1)).maps[0]
    np.testing.assert_allclose(layer.data, expected, rtol=1e-5, atol=1e-9)
    assert widget.predictions_table.horizontalHeaderItem(1).text() == "predicted value"
    with torch.no_grad():
        predicted = model(tensor).numpy()[0]
    shown = widget.predictions_shown()
    np.testing.assert_allclose([shown["class 0"], shown["class 1"]], predicted, rtol=1e-3)


def test_window_disagreement_in_3d_windows_mode(make_widget, qtbot, cards) -> None:
    viewer, widget = make_widget(cards["c3"])
    data = volume((12, 16, 16), seed=5)
    viewer.add_image(data, name="ct", scale=(1.0, 0.65, 0.65))
    assert widget.windows_uncertainty_check.isEnabled()
    widget.windows_uncertainty_check.setChecked(True)
    widget.overlap_spin.setValue(0.5)
    widget.run()
    finish(qtbot, widget)
    name = "ct · gradcam · predicted · c3:features.2 · volume"
    spread = viewer.layers[name + " · uncertainty"]
    np.testing.assert_allclose(spread.scale, (1.0, 0.65, 0.65))
    assert list(spread.metadata[METADATA_KEY]["meaning"]) == ["windows"]
    loaded = widget.loaded
    expected = np.zeros(data.shape, np.float32)
    explain_volume(GradCAM(loaded.model, loaded.card.target_layer), data, mode="windows",
                   window=(8, 8, 8), overlap=0.5, batch_size=8, preprocess=loaded.preprocess,
                   uncertainty_out=expected)
    assert expected.max() > 0
    np.testing.assert_allclose(spread.data, expected, rtol=1e-5, atol=1e-9)


def test_the_demo_micrograph_classifier_warns_on_an_image_four_times_its_input_size(
        make_widget, qtbot, errors) -> None:
    """The shipped card's own training statistics (input_size 128², trained on 64-256 px)
    against a 512² micrograph."""
    from napari_gradcam.samples.micrographs import make_micrograph

    cards = {card.name: card for card in list_demo_models()}
    card = cards.get("micrograph-classifier")
    if card is None or card.training_statistics is None:
        pytest.skip("the shipped micrograph-classifier card carries no training statistics")
    viewer, widget = make_widget()
    assert widget.load_model_source("micrograph-classifier") is not None
    viewer.add_image(make_micrograph((512, 512), seed=1, dtype="uint8").image, name="micrograph")
    widget.run()
    finish(qtbot, widget, timeout=60000)
    layer = next(layer for layer in viewer.layers
                 if layer.name.startswith("micrograph · gradcam · predicted"))
    report = layer.metadata[METADATA_KEY]["domain_check"]
    assert report["out_of_domain"]
    assert "input_size" in [f["check"] for f in report["findings"] if f["flagged"]]
    assert any(message.startswith("micrograph: ") and "512×512" in message
               for message in errors())


def test_a_vision_transformer_offers_its_blocks_and_explains_through_its_default(
        make_widget, qtbot) -> None:
    nets = pytest.importorskip("monai.networks.nets")
    torch.manual_seed(3)
    model = nets.ViT(in_channels=1, img_size=64, patch_size=16, hidden_size=48, mlp_dim=96,
                     num_layers=2, num_heads=4, classification=True, num_classes=3,
                     spatial_dims=2).eval()
    viewer, widget = make_widget()
    widget.use_model(load_model(model))
    offered = [widget.layer_combo.itemText(i) for i in range(widget.layer_combo.count())]
    assert "blocks.0 — TransformerBlock (48×4×4)" in offered
    assert not any("drop_weights" in text for text in offered)  # attention matrices
    assert widget.layer_combo.currentData() == "blocks.1.norm1"
    viewer.add_image(volume((64, 64), seed=2), name="img")
    widget.run()
    finish(qtbot, widget)
    layer = viewer.layers["img · gradcam · predicted · ViT:blocks.1.norm1 · current view"]
    assert layer.data.shape == (64, 64) and layer.data.max() > 0


def test_a_map_made_in_the_widget_looks_like_the_same_map_opened_from_a_file(
        make_widget, qtbot, cards) -> None:
    """One colormap story: the widget's default colormap, blending and opacity are the shared
    display constants that the reader also uses, so the two never disagree."""
    from napari_gradcam.display import MAP_BLENDING, MAP_COLORMAP, MAP_OPACITY

    viewer, widget = make_widget(cards["c2"])
    viewer.add_image(volume((32, 40)), name="img")
    widget.run()
    finish(qtbot, widget)
    layer = next(layer for layer in viewer.layers if layer.name.startswith("img · "))
    assert layer.colormap.name == MAP_COLORMAP
    assert layer.blending == MAP_BLENDING
    assert layer.opacity == pytest.approx(MAP_OPACITY)


def test_a_layers_voxel_size_uses_the_same_unit_table_as_files() -> None:
    """The widget's voxel size (for the out-of-domain check) converts units with io's table,
    as the readers do: nm and mm come in µm, pixels or a mix of units give no voxel size."""
    from napari.layers import Image as ImageLayer

    from napari_gradcam._qt_common import voxel_size_um

    data = np.zeros((2, 3, 4), np.float32)
    nm = ImageLayer(data, scale=(500.0, 65.0, 65.0), units=("nm", "nm", "nm"))
    assert voxel_size_um(nm) == pytest.approx((0.5, 0.065, 0.065))
    mixed = ImageLayer(data, scale=(1.0, 65.0, 65.0), units=("um", "nm", "nm"))
    assert voxel_size_um(mixed) == pytest.approx((1.0, 0.065, 0.065))
    assert voxel_size_um(ImageLayer(data, scale=(1.0, 2.0, 2.0))) is None  # napari's pixels
    millimetre = ImageLayer(data, scale=(0.001, 0.001, 0.001), units=("mm", "mm", "mm"))
    assert voxel_size_um(millimetre) == pytest.approx((1.0, 1.0, 1.0))
