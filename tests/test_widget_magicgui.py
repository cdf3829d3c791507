"""The explainer's magicgui form in a real viewer: layer pickers that survive a rename, slice
axes by their labels, the target-layer short list, a click on a spectrum row, the predictions
panel under the cursor, label names and provenance in the label table, a file's voxel size,
and choices remembered between sessions.

Run under a virtual display: ``xvfb-run -a pytest tests/test_widget_magicgui.py``.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

from magicgui.widgets import ComboBox, Container
from napari.utils.notifications import NotificationSeverity, notification_manager

from napari_gradcam._widget import METADATA_KEY, GradCAMWidget
from napari_gradcam._widget_settings import CONFIG_DIR_ENV, settings_path
from napari_helpers import CLASSES, finish, write_card

pytestmark = pytest.mark.gui


@pytest.fixture(autouse=True)
def own_config_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test remembers its widget choices in its own folder, never the user's."""
    folder = tmp_path / "config"
    monkeypatch.setenv(CONFIG_DIR_ENV, str(folder))
    return folder


@pytest.fixture(scope="module")
def cards(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("magicgui_cards")
    return {
        "c2": write_card(folder, "c2"),
        "other": write_card(folder, "other"),
        "c1": write_card(folder, "c1", spatial_dims=1, widths=(4, 8)),
        "unet": write_card(folder, "unet", architecture="unet", task="segmentation",
                           widths=(4, 8)),
    }


@pytest.fixture
def make_widget(make_napari_viewer, qtbot):
    def factory(card: Path | None = None):
        viewer = make_napari_viewer()
        widget = GradCAMWidget(viewer)
        viewer.window.add_dock_widget(widget, name="Grad-CAM explainer")
        if card is not None:
            assert widget.load_model_source(card) is not None
        return viewer, widget

    return factory


def messages(start: int) -> list[str]:
    return [str(n.message) for n in notification_manager.records[start:]
            if n.severity in (NotificationSeverity.ERROR, NotificationSeverity.WARNING)]


def volume(shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).random(shape).astype(np.float32)


def maps(viewer) -> list:
    return [layer for layer in viewer.layers if METADATA_KEY in layer.metadata]


# ------------------------------------------------------------------------------------------


def test_the_form_is_magicgui_and_its_pickers_follow_insert_remove_reorder_rename(
        make_widget, qtbot, cards) -> None:
    viewer, widget = make_widget(cards["c2"])
    assert isinstance(widget.form, Container)
    assert isinstance(widget.form.image, ComboBox)
    first = viewer.add_image(volume((16, 16)), name="first")
    second = viewer.add_image(volume((16, 16), 1), name="second")
    assert widget.form.image.value is second  # the active layer
    widget.form.image.value = first
    viewer.layers.move(0, 1)  # reorder: the choice stays
    assert widget.form.image.value is first
    first.name = "renamed"  # rename: the same layer, under its new name
    assert widget.form.image.value is first
    assert widget.form.image.current_choice == "renamed"
    assert "first" not in [widget.image_combo.itemText(i)
                           for i in range(widget.image_combo.count())]
    start = len(notification_manager.records)
    widget.run()  # used to fail: "Select an image layer"
    finish(qtbot, widget)
    assert messages(start) == []
    assert "renamed · gradcam · predicted · c2:features.3 · current view" in viewer.layers
    del viewer.layers["second"]  # remove: gone from the list
    assert [widget.image_combo.itemText(i) for i in range(widget.image_combo.count())] == [
        "renamed"]
    labels = viewer.add_labels(np.zeros((16, 16), dtype=np.uint8), name="mask")
    assert widget.form.region.choices == ("none", labels)


def test_the_model_description_is_shown_whole_and_wrapped_in_a_short_dock(
        make_widget, qtbot, tmp_path) -> None:
    """The label under the model picker shows the model's summary and its card's whole
    description, word-wrapped, with every line it needs even when the window is too short for
    the form (the form scrolls instead of squeezing the label to its first line), and the
    whole text on hover."""
    card = write_card(tmp_path, "described")
    description = ("Steel micrograph patches (64x64, grey): clean / precipitates / crack. "
                   "Trained on domain-randomised synthetic patches (grain size, contrast, "
                   "noise, etching artefacts); a map on other data needs the domain check.")
    card.write_text(card.read_text(encoding="utf-8") + f"description: '{description}'\n",
                    encoding="utf-8")
    viewer, widget = make_widget(card)
    widget.setFixedHeight(420)  # a dock far shorter than the form (a laptop's screen)
    viewer.window.show()  # layouts place their rows only in a shown window
    label = widget.form.model_info.native
    qtbot.waitUntil(label.isVisible)
    qtbot.wait(50)
    text = label.text()
    assert text.splitlines()[0].startswith("described: classification, 2D, 1 channel(s)")
    assert description in text and len(text.splitlines()) == 2
    assert description in label.toolTip() and text.splitlines()[0] in label.toolTip()
    assert label.wordWrap()
    needed = label.heightForWidth(label.width())
    line = label.fontMetrics().lineSpacing()
    assert needed >= 3 * line  # the text does wrap onto several lines at the dock's width
    row = label.parentWidget()  # the form's row holding the label
    assert label.height() >= needed and row.height() >= label.geometry().bottom() + 1
    assert label.geometry().right() < row.width()


def test_the_slice_axis_is_chosen_by_the_layers_axis_labels(make_widget, qtbot, cards) -> None:
    viewer, widget = make_widget(cards["c2"])
    viewer.add_image(volume((4, 16, 12)), name="ct", axis_labels=("z", "y", "x"))
    combo = widget.form.axis
    assert [combo.native.itemText(i) for i in range(combo.native.count())] == [
        "z · axis 0 (4)", "y · axis 1 (16)", "x · axis 2 (12)"]
    widget.form.mode.value = "slices"
    assert widget.form.mode.current_choice.startswith("slices")  # the CLI's word
    combo.value = 2
    widget.run()
    finish(qtbot, widget)
    layer = viewer.layers["ct · gradcam · predicted · c2:features.3 · slices along x"]
    assert layer.data.shape == (4, 16, 12)
    assert layer.metadata[METADATA_KEY]["predictions"]["sample_axis"] == 2
    # two runs with different models give two layers; the same settings update one
    widget.load_model_source(cards["other"])
    widget.form.mode.value = "slices"
    widget.form.axis.value = 2
    widget.run()
    finish(qtbot, widget)
    assert {layer.name for layer in maps(viewer)} == {
        "ct · gradcam · predicted · c2:features.3 · slices along x",
        "ct · gradcam · predicted · other:features.3 · slices along x"}


def test_the_target_layer_list_shows_blocks_and_all_layers_on_request(make_widget,
                                                                      cards) -> None:
    _viewer, widget = make_widget(cards["unet"])
    offered = [name for name in widget.form.target_layer.choices if name]
    assert offered == ["down0", "down1", "up0", "dec0", "head"]
    widget.form.all_layers.value = True
    everything = [name for name in widget.form.target_layer.choices if name]
    assert "down0.1" in everything and "down0.2" in everything  # BatchNorm, ReLU
    assert set(offered) < set(everything)
    assert widget.form.target_layer.value == "down1"  # the card's choice is kept


def test_a_click_on_a_spectrum_row_explains_that_row_only(make_widget, qtbot, cards) -> None:
    viewer, widget = make_widget(cards["c1"])
    viewer.add_image(volume((6, 64)), name="spectra", axis_labels=("row", "2θ"))
    worker = widget.explain_at((3.0, 20.0))
    assert worker is not None
    finish(qtbot, widget)
    (layer,) = [layer for layer in maps(viewer) if layer.name.startswith("spectra")]
    assert layer.data.shape == (1, 64)  # one row, not all six again
    assert tuple(layer.translate) == (3.0, 0.0)
    record = layer.metadata[METADATA_KEY]
    assert len(record["predictions"]["probabilities"]) == 1
    assert record["options"]["origin"] == [3, 0]
    # the map of the row equals a run on that row alone
    expected = widget.loaded
    from napari_gradcam.core.methods import GradCAM

    data = np.asarray(viewer.layers["spectra"].data)
    direct = GradCAM(expected.model, "features.2")(expected.preprocess(data[3:4]),
                                                   target=record["predictions"]
                                                   ["target_indices"][0])
    np.testing.assert_allclose(layer.data[0], direct[0], rtol=1e-4, atol=1e-6)


def test_the_predictions_panel_follows_the_row_under_the_cursor(make_widget, qtbot,
                                                                cards) -> None:
    viewer, widget = make_widget(cards["c1"])
    viewer.add_image(volume((6, 64), seed=3), name="spectra")
    widget.run()
    finish(qtbot, widget)
    (layer,) = maps(viewer)
    probabilities = np.asarray(layer.metadata[METADATA_KEY]["predictions"]["probabilities"])
    assert not np.allclose(probabilities[1], probabilities[4], atol=1e-3)
    for row in (1, 4):
        viewer.cursor.position = (float(row), 30.0)
        shown = widget.predictions_shown()
        np.testing.assert_allclose([shown[name] for name in CLASSES], probabilities[row],
                                   atol=1e-3)
        assert f"index {row} of axis 0" in widget.predictions_title.text()


def test_the_label_table_names_labels_fits_its_columns_and_exports_provenance(
        make_widget, qtbot, cards, tmp_path) -> None:
    viewer, widget = make_widget(cards["c2"])
    viewer.add_image(volume((24, 24)), name="micrograph")
    widget.run()
    finish(qtbot, widget)
    labels = np.zeros((24, 24), dtype=np.uint8)
    labels[2:8, 2:8] = 1
    labels[12:20, 10:22] = 2
    layer = viewer.add_labels(labels, name="defects",
                              features={"index": [1, 2], "name": ["pore", "crack"]})
    widget.labels_form.labels_layer.value = layer
    table = widget.compute_label_table()
    assert table is not None
    columns = [widget.labels_table.horizontalHeaderItem(c).text()
               for c in range(widget.labels_table.columnCount())]
    assert "name" in columns
    name_column = columns.index("name")
    assert [widget.labels_table.item(r, name_column).text() for r in range(2)] == [
        "pore", "crack"]
    header = widget.labels_table.horizontalHeader()
    metrics = widget.labels_table.fontMetrics()
    for c in range(widget.labels_table.columnCount()):  # every column fits its contents
        widest = max(metrics.horizontalAdvance(widget.labels_table.item(r, c).text())
                     for r in range(2))
        assert header.sectionSize(c) >= widest
    suggested = widget.suggested_csv_name()
    assert suggested.endswith(".csv") and "c2" in suggested and suggested != "cam_labels.csv"
    written = widget.export_csv(tmp_path / suggested)
    text = written.read_text(encoding="utf-8")
    assert "c2" in text and "gradcam" in text and "features.3" in text
    rows = [row for row in csv.reader(line for line in text.splitlines()
                                      if not line.startswith("#"))]
    assert "name" in rows[0]


def test_the_pointing_tolerance_defaults_to_the_model_cards(make_widget, qtbot,
                                                            tmp_path) -> None:
    card = write_card(tmp_path, "measured")
    card.write_text(card.read_text(encoding="utf-8")
                    + "metrics: {pointing_tolerance_px: 2.0}\n", encoding="utf-8")
    viewer, widget = make_widget(card)
    viewer.add_image(volume((16, 16)), name="img", scale=(0.5, 0.5))
    widget.run()
    finish(qtbot, widget)
    (layer,) = maps(viewer)
    assert widget.labels_form.cam.value is layer
    assert widget.labels_form.tolerance.value == pytest.approx(1.0)  # 2 px × 0.5 µm


def test_a_files_declared_voxel_size_is_offered_and_applied_only_on_click(make_widget,
                                                                          tmp_path) -> None:
    tifffile = pytest.importorskip("tifffile")
    path = tmp_path / "scan.tif"
    tifffile.imwrite(path, volume((4, 16, 16)), imagej=True, resolution=(1 / 0.65, 1 / 0.65),
                     metadata={"spacing": 0.65, "unit": "um", "axes": "ZYX"})
    viewer, widget = make_widget()
    (layer,) = viewer.open(path, plugin="napari")  # napari's built-in reader: scale 1
    assert tuple(layer.scale) == (1.0, 1.0, 1.0)
    assert widget.form.image.value is layer
    def offered() -> bool:
        return widget.form.apply_scale.native.isVisibleTo(widget)

    assert offered() and widget.form.voxel_note.native.isVisibleTo(widget)
    assert "0.65" in widget.form.voxel_note.value
    assert tuple(layer.scale) == (1.0, 1.0, 1.0)  # nothing changed until the click
    widget.form.apply_scale.native.click()
    assert tuple(layer.scale) == pytest.approx((0.65, 0.65, 0.65))
    assert not offered()
    # a layer at scale 1 with no file says nothing
    viewer.add_image(volume((16, 16)), name="plain")
    assert not offered()


def test_a_second_widget_starts_with_the_first_ones_choices(make_widget, make_napari_viewer,
                                                            qtbot, cards) -> None:
    viewer, widget = make_widget(cards["c2"])
    viewer.add_image(volume((4, 16, 16)), name="stack")
    widget.form.method.value = "layercam"
    widget.form.mode.value = "slices"
    widget.form.axis.value = 1
    widget.form.batch_size.value = 3
    widget.target_combo.setCurrentText("crack")
    widget.run()
    finish(qtbot, widget)
    assert settings_path().exists()

    viewer2 = make_napari_viewer()
    viewer2.add_image(volume((4, 16, 16)), name="stack")
    second = GradCAMWidget(viewer2)  # a new session's widget, on a viewer holding the layer
    assert second.loaded is not None and second.loaded.card.name == "c2"
    assert second.form.model.current_choice == "c2.yaml"  # the list shows what is loaded
    assert second.form.method.value == "layercam"
    assert second.form.mode.value == "slices"
    assert second.form.axis.value == 1
    assert second.form.batch_size.value == 3
    assert second.form.target.current_choice == "crack"


def test_a_stale_remembered_model_falls_back_cleanly(make_widget, qtbot, tmp_path) -> None:
    card = write_card(tmp_path, "soon_gone")
    viewer, widget = make_widget(card)
    widget.form.batch_size.value = 5
    viewer.add_image(volume((16, 16)), name="img")
    widget.run()
    finish(qtbot, widget)
    for file in tmp_path.glob("soon_gone*"):
        file.unlink()
    start = len(notification_manager.records)
    _viewer2, second = make_widget()
    assert second.loaded is None
    assert second.form.model.value is None  # "choose a model"
    assert second.form.batch_size.value == 5  # the other choices still come back
    assert messages(start) == []  # an info, not an error
    assert any("soon_gone" in str(n.message) for n in notification_manager.records[start:])


def test_a_real_alt_click_on_the_canvas_explains_and_an_alt_drag_does_not(
        make_napari_viewer, qtbot, cards) -> None:
    """Through Qt mouse events on napari's canvas (the path a user's mouse takes)."""
    from qtpy.QtCore import QPoint, Qt

    viewer = make_napari_viewer(show=True)
    widget = GradCAMWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Grad-CAM explainer")
    widget.load_model_source(cards["c2"])
    viewer.add_image(volume((32, 32)), name="img")
    canvas = viewer.window._qt_viewer.canvas.native  # the vispy canvas's QWidget
    qtbot.waitExposed(canvas)
    centre = QPoint(canvas.width() // 2, canvas.height() // 2)
    left, alt = Qt.MouseButton.LeftButton, Qt.KeyboardModifier.AltModifier
    qtbot.mousePress(canvas, left, alt, centre)
    for step in (5, 15, 30):
        qtbot.mouseMove(canvas, centre + QPoint(step, step))
    qtbot.mouseRelease(canvas, left, alt, centre + QPoint(30, 30))
    assert widget.worker is None and maps(viewer) == []  # a drag: no run
    qtbot.mouseClick(canvas, left, alt, centre)
    assert widget.worker is not None  # a click: a run
    finish(qtbot, widget)
    (layer,) = maps(viewer)
    assert layer.name.startswith("img · gradcam · clicked ")
    assert len(viewer.layers["Grad-CAM clicks"].data) == 1
