"""The "Grad-CAM evidence" dock widget in a real napari viewer.

Run under a virtual display: ``xvfb-run -a pytest tests/test_evidence_widget.py``. The model is
a small built-in network saved as a real card in ``tmp_path`` (the widget's mechanics do not
need a trained model; the checks' meaning is tested in ``test_evidence_report.py``); one test
uses the shipped micrograph demo model when the zoo holds it. Errors are observed through
napari's notification manager, which records every ``show_error`` / ``show_info``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

from napari.utils.notifications import NotificationSeverity, notification_manager

from napari_gradcam._evidence_widget import (
    CAM_METHODS,
    EVIDENCE_KEY,
    METADATA_KEY,
    EvidenceWidget,
)
from napari_gradcam._qt_common import BROWSE
from napari_gradcam.core.architectures import build_architecture
from napari_gradcam.core.models import list_demo_models
from napari_helpers import finish, write_card

pytestmark = pytest.mark.gui
MANIFEST = Path(__file__).resolve().parents[1] / "src" / "napari_gradcam" / "napari.yaml"
COMMAND = "evidence_widget"
QUICK_CHECKS = ("deletion", "insertion", "randomisation", "occlusion", "saliency")


@pytest.fixture(scope="module")
def card(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("evidence_cards")
    return write_card(folder, "small", target_layer="features.3")


@pytest.fixture
def messages():
    """Notifications shown during the test, as (severity, text)."""
    start = len(notification_manager.records)
    return lambda: [(n.severity, str(n.message)) for n in notification_manager.records[start:]]


@pytest.fixture
def make_widget(make_napari_viewer, card):
    def factory(load: bool = True):
        viewer = make_napari_viewer()
        widget = EvidenceWidget(viewer)
        viewer.window.add_dock_widget(widget, name="Grad-CAM evidence")
        if load:
            assert widget.load_model_source(card) is not None
        for name, box in widget.check_boxes.items():
            box.setChecked(name in QUICK_CHECKS)
        widget.steps_spin.setValue(10)
        widget.random_spin.setValue(1)
        return viewer, widget

    return factory


def image(shape=(32, 32), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).random(shape).astype(np.float32)


def test_run_adds_maps_on_the_source_with_provenance_and_fills_table_and_plot(
        make_widget, qtbot) -> None:
    viewer, widget = make_widget()
    data = image()
    source = viewer.add_image(data, name="micro", scale=(0.5, 0.25), translate=(10.0, -4.0),
                              units=("um", "um"), axis_labels=("y", "x"))
    assert widget.image_combo.currentText() == "micro"
    widget.run()
    assert widget.run_button.text() == "Cancel"
    finish(qtbot, widget)
    assert widget.run_button.text() == "Run"
    report = widget.report
    assert report is not None
    target = report.class_names[report.target_index]  # the predicted class, by name
    expected = {f"micro · evidence · {name} · {target} · small:features.3" for name in
                ("gradcam", "occlusion", "saliency")}
    assert set(widget.result_layers) == expected
    for name in expected:
        layer = viewer.layers[name]
        np.testing.assert_allclose(layer.scale, source.scale)
        np.testing.assert_allclose(layer.translate, source.translate)
        assert tuple(layer.axis_labels) == ("y", "x")
        assert tuple(str(u) for u in layer.units) == ("micrometer",) * 2
        record = layer.metadata[METADATA_KEY]
        method = name.split(" · ")[2]
        assert record["method"] == method and record["model"] == "small"
        assert record["mode"] == "evidence" and record["source"] == "micro"
        assert len(record["weights_sha256"]) == 64
        assert record["options"]["origin"] == [0, 0]
        assert record["options"]["source_shape"] == [32, 32]
        assert layer.metadata[EVIDENCE_KEY]["summary"][0]["check"] == "Deletion"
        np.testing.assert_array_equal(layer.data, report.maps[method])
    assert viewer.layers[widget.layer_name("micro", "gradcam", report)].visible
    assert not viewer.layers[widget.layer_name("micro", "saliency", report)].visible
    # the table shows the report's rows; the canvas the two curves with their baselines
    rows = widget.table_rows()
    assert [row[0] for row in rows] == [row.check for row in report.rows()]
    assert {row[4] for row in rows} <= {"pass", "FAIL", "info"}
    axes = widget.curves_canvas.figure.axes
    assert len(axes) == 2 and all(len(axis.lines) == 2 for axis in axes)
    np.testing.assert_allclose(axes[0].lines[0].get_ydata(), report.deletion.scores[0])
    assert widget.randomisation_canvas.figure.axes
    assert widget.export_button.isEnabled()
    # the user's layer is untouched
    assert np.array_equal(source.data, data) and source.metadata == {}


def test_widget_from_a_plugin_manifest_through_the_public_viewer(make_napari_viewer, npe2pm,
                                                                qtbot, card) -> None:
    """napari hands plugins a public-only proxy of the viewer: a whole run must work with it.

    Uses the shipped manifest once it lists the evidence widget, else the same entries in a
    test manifest.
    """
    import warnings

    from npe2 import PluginManifest

    shipped = PluginManifest.from_file(MANIFEST)
    if any(command.id == f"{shipped.name}.{COMMAND}" for command in shipped.contributions.commands):
        manifest = shipped
    else:
        manifest = PluginManifest(name="evidence-test", contributions={
            "commands": [{"id": f"evidence-test.{COMMAND}", "title": "Grad-CAM evidence",
                          "python_name": "napari_gradcam._evidence_widget:EvidenceWidget"}],
            "widgets": [{"command": f"evidence-test.{COMMAND}",
                         "display_name": "Grad-CAM evidence"}],
        })
    with npe2pm.tmp_plugin(manifest=manifest):
        viewer = make_napari_viewer()
        _dock, widget = viewer.window.add_plugin_dock_widget(manifest.name, "Grad-CAM evidence")
        assert isinstance(widget, EvidenceWidget)
        viewer.add_image(image((16, 16)), name="img", scale=(2.0, 2.0))
        widget.load_model_source(card)
        for name, box in widget.check_boxes.items():
            box.setChecked(name == "deletion")
        widget.steps_spin.setValue(5)
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)  # napari's private-access warning
            assert widget.run() is not None
            finish(qtbot, widget)
        layer = viewer.layers[widget.layer_name("img", "gradcam", widget.report)]
        np.testing.assert_allclose(layer.scale, (2.0, 2.0))


def test_current_slice_of_a_stack_with_a_labels_region(make_widget, qtbot) -> None:
    viewer, widget = make_widget()
    stack = image((5, 32, 32))
    source = viewer.add_image(stack, name="stack", scale=(2.0, 0.5, 0.5),
                              translate=(100.0, 0.0, 0.0))
    labels = np.zeros((5, 32, 32), dtype=np.uint8)
    labels[3, 8:16, 8:16] = 1
    viewer.add_labels(labels, name="crack", scale=source.scale, translate=source.translate)
    viewer.layers.selection.active = source
    viewer.dims.set_point(0, 100.0 + 2.0 * 3)  # world z of slice 3
    widget.region_combo.setCurrentText("crack")
    for name, box in widget.check_boxes.items():
        box.setChecked(name == "deletion")
    widget.run()
    finish(qtbot, widget)
    layer = viewer.layers[widget.layer_name("stack", "gradcam", widget.report)]
    assert layer.data.shape == (1, 32, 32)
    np.testing.assert_allclose(layer.translate, (106.0, 0.0, 0.0))
    assert layer.metadata[METADATA_KEY]["options"]["origin"] == [3, 0, 0]
    report = widget.report
    np.testing.assert_array_equal(report.image, stack[3])
    np.testing.assert_array_equal(report.region_mask, labels[3] == 1)
    assert report.region is not None and report.region_energy is not None
    assert "Region test" in [row[0] for row in widget.table_rows()]


def test_shapes_region_marked_forbidden(make_widget, qtbot) -> None:
    viewer, widget = make_widget()
    viewer.add_image(image(), name="micro")
    viewer.add_shapes([np.array([[24, 0], [31, 0], [31, 31], [24, 31]])],
                      shape_type="rectangle", name="scale bar")
    widget.image_combo.setCurrentText("micro")
    widget.region_combo.setCurrentText("scale bar")
    widget.region_kind_combo.setCurrentIndex(widget.region_kind_combo.findData("forbidden"))
    for box in widget.check_boxes.values():
        box.setChecked(False)
    widget.run()
    finish(qtbot, widget)
    report = widget.report
    assert report.region_kind == "forbidden" and report.forbidden is not None
    assert report.region_mask[24:, :].all() and not report.region_mask[:24].any()
    assert "Forbidden region" in [row[0] for row in widget.table_rows()]


def test_layer_names_keep_runs_of_other_models_and_targets_apart(make_widget, qtbot, card,
                                                                  tmp_path) -> None:
    """A run with another target or model adds its own layers; only a rerun with identical
    settings (source, map, target, model, layer) replaces its own earlier layers."""
    viewer, widget = make_widget()
    viewer.add_image(image(), name="micro")
    for name, box in widget.check_boxes.items():
        box.setChecked(name == "saliency")
    widget.steps_spin.setValue(5)

    def run(target: str) -> list[str]:
        widget.image_combo.setCurrentText("micro")
        widget.target_combo.setCurrentText(target)
        assert widget.run() is not None
        finish(qtbot, widget)
        return list(widget.result_layers)

    crack = run("crack")
    assert crack == ["micro · evidence · gradcam · crack · small:features.3",
                     "micro · evidence · saliency · crack · small:features.3"]
    clean = run("clean")
    assert not set(clean) & set(crack)
    other_card = write_card(tmp_path, "other", target_layer="features.3", widths=(4, 4, 8))
    assert widget.load_model_source(other_card) is not None
    other = run("crack")
    assert other[0] == "micro · evidence · gradcam · crack · other:features.3"
    maps = {name: np.array(viewer.layers[name].data) for name in crack + clean + other}
    assert len(viewer.layers) == 1 + 6  # the image and three runs' maps, none overwritten
    assert not np.array_equal(maps[crack[0]], maps[clean[0]])  # different targets, both kept
    assert not np.array_equal(maps[crack[0]], maps[other[0]])  # different models, both kept
    # the same settings again: its own layers are replaced, the others stay as they were
    first_layer = viewer.layers[other[0]]
    assert run("crack") == other
    assert len(viewer.layers) == 7 and viewer.layers[other[0]] is not first_layer
    for name in crack + clean:
        np.testing.assert_array_equal(viewer.layers[name].data, maps[name])


def test_export_from_the_widget_writes_the_report_folder(make_widget, qtbot, tmp_path,
                                                         messages) -> None:
    viewer, widget = make_widget()
    assert widget.export(tmp_path / "early") is None
    assert any("nothing to export" in text for _, text in messages())
    assert not (tmp_path / "early").exists()
    viewer.add_image(image(), name="micro")
    widget.run()
    finish(qtbot, widget)
    folder = tmp_path / "supplement"
    assert widget.export(folder) == folder
    for name in ("summary.csv", "report.json", "provenance.json", "curves.csv",
                 "figures/deletion_insertion.png", "figures/maps.png"):
        assert (folder / name).is_file(), name
    provenance = json.loads((folder / "provenance.json").read_text(encoding="utf-8"))
    assert provenance["model"] == "small" and provenance["source"] == "micro"
    # exporting again into the folder the user chose replaces the report
    assert widget.export(folder) == folder


def test_no_model_or_a_bad_model_file_is_a_clear_error(make_widget, tmp_path,
                                                      messages) -> None:
    viewer, widget = make_widget(load=False)
    viewer.add_image(image(), name="micro")
    before = len(viewer.layers)
    assert widget.run() is None
    assert any("Choose a model first" in text for _, text in messages())
    not_a_model = tmp_path / "weights.pt2"
    not_a_model.write_text("not a model", encoding="utf-8")
    assert widget.load_model_source(not_a_model) is None
    assert any("Could not load the model" in text for _, text in messages())
    assert widget.loaded is None and len(viewer.layers) == before


def test_a_pickled_model_loads_only_with_trust_ticked(make_widget, tmp_path, messages) -> None:
    _viewer, widget = make_widget(load=False)
    pickled = tmp_path / "whole_model.pt"
    torch.save(build_architecture("resnet_like", widths=(4, 8, 8)), pickled)
    assert not widget.trust_check.isChecked()
    assert widget.load_model_source(pickled) is None
    assert any("Could not load the model" in text for _, text in messages())
    assert widget.loaded is None and widget.model_combo.findData(str(pickled)) < 0
    widget.trust_check.setChecked(True)
    loaded = widget.load_model_source(pickled)
    assert loaded is not None and widget.loaded is loaded
    assert widget.model_combo.currentData() == str(pickled)
    assert widget.model_combo.itemData(widget.model_combo.count() - 1) == BROWSE
    assert widget.layer_combo.count() > 0 and widget.target_combo.count() == 4


def test_no_image_layer_with_a_model_loaded(make_widget, messages) -> None:
    viewer, widget = make_widget()
    viewer.add_labels(np.zeros((16, 16), dtype=np.uint8), name="only labels")
    before = len(viewer.layers)
    assert widget.run() is None
    errors = [text for severity, text in messages() if severity == NotificationSeverity.ERROR]
    assert any("Select an image layer" in text and "Labels" in text for text in errors)
    assert len(viewer.layers) == before and widget.worker is None
    assert widget.report is None and widget.table.rowCount() == 0


def test_cancel_adds_nothing(make_widget, qtbot, messages) -> None:
    viewer, widget = make_widget()
    viewer.add_image(image((64, 64)), name="micro")
    widget.steps_spin.setValue(200)
    widget.random_spin.setValue(10)
    before = len(viewer.layers)
    assert widget.run() is not None
    # cancel inside the long deletion check: the core stops before its next batch
    qtbot.waitUntil(lambda: widget.stage_label.text().startswith("Deletion ("), timeout=20000)
    qtbot.waitUntil(lambda: widget.progress_bar.value() > 50, timeout=20000)
    widget.run()  # the same button now cancels
    assert widget.run_button.text() == "Cancelling …"
    finish(qtbot, widget)
    assert len(viewer.layers) == before and widget.report is None
    assert any("cancelled" in text for _, text in messages())
    # the job was closed: its running check stopped, no thread keeps computing
    import threading

    assert not [t for t in threading.enumerate() if t.name == "napari-gradcam-evidence-check"]
    assert widget.run_button.text() == "Run" and widget.run_button.isEnabled()


def test_cancel_never_holds_the_gui_thread_for_a_batch(make_widget, qtbot) -> None:
    """Cancel only asks the worker to stop; closing the job afterwards (on the GUI thread)
    finds its check waiting at a batch boundary, so the event loop never waits for a batch,
    even when one batch takes 0.5 s (a model slowed by a real forward hook, like a slow
    device)."""
    import threading
    import time

    from qtpy.QtCore import QTimer

    viewer, widget = make_widget()
    viewer.add_image(image((64, 64)), name="micro")
    widget.steps_spin.setValue(200)
    widget.random_spin.setValue(10)
    batch_seconds = 0.5

    def slow_batches(module, args) -> None:
        if args[0].shape[0] > 1:  # the checks' batches, not the single map pass
            time.sleep(batch_seconds)

    handle = widget.loaded.model.register_forward_pre_hook(slow_batches)
    ticks: list[float] = []
    timer = QTimer()
    timer.setInterval(10)
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    try:
        assert widget.run() is not None
        qtbot.waitUntil(lambda: widget.stage_label.text().startswith("Deletion ("),
                        timeout=30000)
        qtbot.waitUntil(lambda: widget.progress_bar.value() > 20, timeout=30000)
        timer.start()
        qtbot.wait(50)
        started = time.perf_counter()
        widget.run()  # the same button now cancels
        cancel_seconds = time.perf_counter() - started
        finish(qtbot, widget)
        qtbot.wait(50)
    finally:
        timer.stop()
        handle.remove()
    assert cancel_seconds < 0.1
    gaps = np.diff(ticks)
    assert len(gaps) > 5 and gaps.max() < 0.6 * batch_seconds, gaps.max()
    assert not [t for t in threading.enumerate() if t.name == "napari-gradcam-evidence-check"]
    assert widget.report is None and widget.run_button.isEnabled()


def test_demo_micrograph_model_on_a_crack(make_widget, qtbot) -> None:
    assert any(c.name == "micrograph-classifier" for c in list_demo_models())
    from napari_gradcam.samples import make_micrograph

    viewer, widget = make_widget(load=False)
    assert widget.load_model_source("micrograph-classifier") is not None
    sample = make_micrograph((64, 64), seed=3, n_precipitates=0, crack=True, dtype="uint8")
    viewer.add_image(sample.image, name="micrograph")
    viewer.add_labels((sample.labels == 2).astype(np.uint8), name="crack")
    widget.region_combo.setCurrentText("crack")
    widget.target_combo.setCurrentText("crack")
    widget.run()
    finish(qtbot, widget, timeout=60000)
    report = widget.report
    assert report.target_index == 2
    assert report.deletion.better_than_random[0]


@pytest.mark.parametrize("method", CAM_METHODS)
def test_every_method_the_evidence_widget_offers_runs_its_checks(method: str) -> None:
    """The method list comes from the registry's declarations (every method with a target
    layer), so a newly registered method must also run through the evidence job."""
    from torch import nn

    from napari_gradcam.evidence_report import run_evidence

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()
    report = run_evidence(model, torch.rand(1, 1, 16, 16), layer="2", method=method,
                          checks=("deletion",))
    assert report.method == method
    assert np.isfinite(report.cam).all() and report.cam.shape[-2:] == (16, 16)
    assert [row for row in report.rows() if "eletion" in row.check]
