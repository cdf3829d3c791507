"""The widget with maps on disk: a lazily opened volume explained into an OME-Zarr that is shown
while it is written, cancel keeping the done part marked incomplete, the event loop staying
responsive, and the label table keeping a user's own feature columns. Real viewer, real zarr.
"""

from __future__ import annotations

import time
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import zarr
from qtpy.QtCore import QTimer

from napari_gradcam._live_map import MAP_STORE_KEY
from napari_gradcam._qt_common import METADATA_KEY
from napari_gradcam._widget import LAZY_DISK_MAP_BYTES, GradCAMWidget
from napari_gradcam.jobs import store_state
from napari_helpers import finish, write_card

pytestmark = pytest.mark.gui


@pytest.fixture(scope="module")
def card(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_card(tmp_path_factory.mktemp("disk_cards"), "c2")


@pytest.fixture(autouse=True)
def own_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Remembered choices and the default map folder in the test's own folders."""
    monkeypatch.setenv("NAPARI_GRADCAM_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


@pytest.fixture
def make_widget(make_napari_viewer, qtbot, card):
    def factory():
        viewer = make_napari_viewer()
        widget = GradCAMWidget(viewer)
        viewer.window.add_dock_widget(widget, name="Grad-CAM explainer")
        assert widget.load_model_source(card) is not None
        return viewer, widget

    return factory


def lazy_scan(folder: Path, shape: tuple[int, ...], seed: int = 0) -> da.Array:
    """A scan written to a zarr array and opened lazily, as a user opens a large CT."""
    data = np.random.default_rng(seed).random(shape).astype(np.float32)
    store = zarr.open_array(str(folder / "scan.zarr"), mode="w", shape=shape,
                            chunks=(1, *shape[1:]), dtype="float32")
    store[:] = data
    return da.from_zarr(str(folder / "scan.zarr"))


def slices_to_disk(widget: GradCAMWidget, output: Path | None, batch: int = 2) -> None:
    widget.form.mode.value = "slices"
    widget.form.axis.value = 0
    widget.form.batch_size.value = batch
    widget.form.to_disk.value = output is not None
    if output is not None:
        widget.form.output.value = output


def test_a_lazy_volume_is_explained_to_disk_shown_while_written_and_reopens_alike(
        make_widget, qtbot, tmp_path) -> None:
    viewer, widget = make_widget()
    scan = lazy_scan(tmp_path, (24, 32, 32))
    source = viewer.add_image(scan, name="scan", scale=(2.0, 0.5, 0.5),
                              units=("um", "um", "um"))
    output = tmp_path / "maps.zarr"
    slices_to_disk(widget, output)
    worker = widget.run()
    seen: list[tuple[str, bool]] = []

    def look(_value: object) -> None:
        live = [layer for layer in viewer.layers if MAP_STORE_KEY in layer.metadata]
        if live:
            data = live[0].data[0] if live[0].multiscale else live[0].data
            seen.append((live[0].name, isinstance(data, np.ndarray)))

    worker.yielded.connect(look)
    finish(qtbot, widget, timeout=60000)
    # shown while it was made, lazily (never as an in-memory NumPy array)
    assert seen, "no layer showed the map while it was written"
    assert all("being written" in name and not in_memory for name, in_memory in seen)
    assert not [layer for layer in viewer.layers if MAP_STORE_KEY in layer.metadata]
    maps = [layer for layer in viewer.layers if METADATA_KEY in layer.metadata]
    assert len(maps) == 1
    layer = maps[0]
    full = layer.data[0] if layer.multiscale else layer.data
    assert not isinstance(full, np.ndarray) and full.shape == (24, 32, 32)
    np.testing.assert_allclose(layer.scale, source.scale)
    assert store_state(output)["complete"] is True
    on_disk = np.asarray(full)
    assert on_disk.max() > 0
    # the same settings in memory give the same map
    slices_to_disk(widget, None)
    widget.run()
    finish(qtbot, widget, timeout=60000)
    in_memory = np.asarray(layer.data[0] if layer.multiscale else layer.data)
    np.testing.assert_allclose(on_disk, in_memory, rtol=1e-5, atol=1e-6)
    # re-opening the store later gives the map at the same place with its provenance
    reopened = viewer.open(str(output), plugin="napari-gradcam")[0]
    np.testing.assert_allclose(reopened.scale, source.scale)
    np.testing.assert_allclose(np.asarray(reopened.data[0] if reopened.multiscale
                                          else reopened.data), on_disk, rtol=1e-6)
    assert reopened.metadata[METADATA_KEY]["model"] == "c2"
    # the user's scan is untouched
    assert viewer.layers["scan"].data is scan


def test_a_second_run_with_the_default_name_writes_a_new_store(make_widget, qtbot,
                                                                tmp_path) -> None:
    viewer, widget = make_widget()
    viewer.add_image(lazy_scan(tmp_path, (4, 16, 16)), name="scan")
    slices_to_disk(widget, None)
    widget.form.to_disk.value = True
    first = Path(str(widget.form.output.value))
    assert first.name.endswith(".zarr") and not first.exists()
    widget.run()
    finish(qtbot, widget)
    assert store_state(first)["complete"] is True
    widget.run()  # the suggested name is taken now: the next free one, never "exists"
    finish(qtbot, widget)
    second = Path(str(widget.form.output.value))
    assert second != first and store_state(second)["complete"] is True


def test_large_lazy_volumes_go_to_disk_by_default_small_ones_stay_in_memory(
        make_widget, tmp_path) -> None:
    viewer, widget = make_widget()
    depth = LAZY_DISK_MAP_BYTES // (4 * 256 * 256) + 1
    viewer.add_image(da.zeros((depth, 256, 256), dtype=np.uint16, chunks=(1, 256, 256)),
                     name="large")
    widget.form.mode.value = "slices"
    widget.form.image.value = viewer.layers["large"]
    assert widget.form.to_disk.value is True
    assert Path(str(widget.form.output.value)).is_relative_to(tmp_path / "cache")
    viewer.add_image(np.zeros((4, 16, 16), np.float32), name="small")
    widget.form.image.value = viewer.layers["small"]
    assert widget.form.to_disk.value is False
    widget.form.mode.value = "current"  # a single slice is never written to disk
    assert widget.form.to_disk.enabled is False


def test_cancel_keeps_the_done_part_on_disk_marked_incomplete(make_widget, qtbot,
                                                              tmp_path) -> None:
    viewer, widget = make_widget()
    viewer.add_image(lazy_scan(tmp_path, (1000, 128, 128)), name="scan")  # long: cancel first
    output = tmp_path / "partial.zarr"
    slices_to_disk(widget, output, batch=1)
    worker = widget.run()
    progress: list[object] = []
    worker.yielded.connect(progress.append)
    qtbot.waitUntil(lambda: len(progress) >= 4, timeout=30000)
    widget.run()  # Cancel
    finish(qtbot, widget, timeout=30000)
    state = store_state(output)
    assert state["complete"] is False and 0 < state["planes_done"] < 1000
    kept = [layer for layer in viewer.layers if MAP_STORE_KEY in layer.metadata]
    assert len(kept) == 1
    assert f"(incomplete: {state['planes_done']}/1000 planes)" in kept[0].name
    assert kept[0].metadata["complete"] is False
    data = np.asarray(kept[0].data[0] if kept[0].multiscale else kept[0].data)
    assert data[: state["planes_done"]].max() > 0  # the done part is there


def test_the_event_loop_stays_responsive_while_a_map_is_written(make_widget, qtbot,
                                                                tmp_path) -> None:
    """The longest gap between 10 ms timer ticks during a run: what a user feels as lag."""
    viewer, widget = make_widget()
    viewer.add_image(lazy_scan(tmp_path, (40, 64, 64)), name="scan")
    slices_to_disk(widget, tmp_path / "maps.zarr", batch=2)
    ticks: list[float] = []
    timer = QTimer()
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    timer.start(10)
    worker = widget.run()
    yields: list[float] = []

    def seen(_value: object) -> None:  # batches after the live layer was added
        if widget._live is not None and widget._live.layer is not None:
            yields.append(time.perf_counter())

    worker.yielded.connect(seen)
    finish(qtbot, widget, timeout=60000)
    timer.stop()
    # while it runs and shows the map: adding layers (first and last) is GUI work of its own
    gaps = np.diff([tick for tick in ticks if yields[0] <= tick <= yields[-1]])
    assert len(gaps) > 10, "the event loop did not run during the job"
    assert float(np.max(gaps)) < 1.0, f"the GUI froze for {np.max(gaps):.2f} s"
    assert float(np.median(gaps)) < 0.1


def test_the_label_table_keeps_the_users_own_feature_columns(make_widget, qtbot) -> None:
    viewer, widget = make_widget()
    viewer.add_image(np.random.default_rng(0).random((32, 32)).astype(np.float32), name="img")
    widget.run()
    finish(qtbot, widget)
    labels = np.zeros((32, 32), dtype=np.uint8)
    labels[2:8, 2:8] = 1
    labels[20:30, 20:30] = 2
    layer = viewer.add_labels(labels, name="defects",
                              features={"index": [1, 2], "note": ["inclusion", "crack"]})
    widget.labels_form.cam.value = next(
        lay for lay in viewer.layers if METADATA_KEY in lay.metadata)
    widget.labels_form.labels_layer.value = layer
    table = widget.compute_label_table()
    assert table is not None
    features = layer.features
    assert list(features["note"]) == ["inclusion", "crack"]  # the user's column, row by row
    assert list(features["index"]) == [1, 2] and "mean_cam" in features.columns


def test_the_store_keeps_the_layers_placement_in_its_own_units(make_widget, qtbot,
                                                                  tmp_path) -> None:
    """A scan in pixels with an anisotropic scale and an offset: the store re-opens where the
    map layer was, not at scale 1 from 0."""
    viewer, widget = make_widget()
    source = viewer.add_image(lazy_scan(tmp_path, (6, 16, 16)), name="scan",
                              scale=(2.0, 1.0, 0.5), translate=(10.0, -4.0, 3.0))
    output = tmp_path / "placed.zarr"
    slices_to_disk(widget, output)
    widget.run()
    finish(qtbot, widget)
    made = next(layer for layer in viewer.layers if METADATA_KEY in layer.metadata)
    reopened = viewer.open(str(output), plugin="napari-gradcam")[0]
    np.testing.assert_allclose(reopened.scale[-3:], source.scale)
    np.testing.assert_allclose(reopened.translate[-3:], made.translate)
    np.testing.assert_allclose(made.translate, source.translate)


def test_a_second_all_classes_run_takes_new_names_for_every_class(make_widget, qtbot,
                                                                  tmp_path) -> None:
    viewer, widget = make_widget()
    viewer.add_image(lazy_scan(tmp_path, (4, 16, 16)), name="scan")
    slices_to_disk(widget, None)
    widget.form.to_disk.value = True
    widget.form.target.value = next(value for value in widget.form.target.choices
                                    if value and value[0] == "all")
    first = Path(str(widget.form.output.value))
    widget.run()
    finish(qtbot, widget)
    stores = sorted(path.name for path in first.parent.glob("*.zarr"))
    assert len(stores) == 3  # one per class
    widget.run()  # the class stores exist now: the next run takes a free name for all of them
    finish(qtbot, widget)
    assert len(list(first.parent.glob("*.zarr"))) == 6
    maps = [layer for layer in viewer.layers if METADATA_KEY in layer.metadata]
    assert maps and all(layer.data is not None for layer in maps)


@pytest.mark.parametrize("labels_on_disk", ["dask", "zarr"])
def test_the_label_table_of_an_on_disk_map_is_read_in_blocks_and_equals_the_whole(
        make_widget, qtbot, tmp_path, monkeypatch, labels_on_disk) -> None:
    """The label table of a map on disk, with lazy labels: the widget hands both to the core as
    they are, which reads them block by block within its budget (here far smaller than the map),
    and the table equals the one computed from the whole arrays in memory."""
    from napari_gradcam.core import labels_stats

    viewer, widget = make_widget()
    viewer.add_image(lazy_scan(tmp_path, (24, 32, 32)), name="scan")
    slices_to_disk(widget, tmp_path / "maps.zarr")
    widget.run()
    finish(qtbot, widget, timeout=60000)
    made = next(layer for layer in viewer.layers if METADATA_KEY in layer.metadata)
    labels = np.zeros((24, 32, 32), dtype=np.uint8)
    labels[2:10, 4:12, 4:12] = 1
    labels[12:22, 16:30, 10:28] = 2
    if labels_on_disk == "dask":
        lazy_labels = da.from_array(labels, chunks=(4, 32, 32))
    else:  # a zarr array as it is (no dask): slicing it would read the box whole
        lazy_labels = zarr.open_array(str(tmp_path / "labels.zarr"), mode="w", shape=labels.shape,
                                      chunks=(4, 32, 32), dtype="uint8")
        lazy_labels[:] = labels
    layer = viewer.add_labels(lazy_labels, name="defects")
    widget.labels_form.cam.value = made
    widget.labels_form.labels_layer.value = layer
    reads: list[int] = []
    whole_read = labels_stats.label_statistics

    def counting(cam, labels_in, **options):
        assert not isinstance(cam, np.ndarray), "the widget loaded the whole map"
        assert not isinstance(labels_in, np.ndarray), "the widget loaded the whole labels"
        reads.append(1)
        return whole_read(cam, labels_in, block_bytes=4 * 32 * 32 * 8, **options)

    monkeypatch.setattr("napari_gradcam._widget_label_table.label_statistics", counting)
    table = widget.compute_label_table()
    assert table is not None and reads == [1]
    full = made.data[0] if made.multiscale else made.data
    expected = whole_read(np.asarray(full), labels, tolerance=widget.labels_form.tolerance.value,
                          spacing=tuple(abs(float(s)) for s in made.scale))
    for column in ("mean_cam", "max_cam"):
        np.testing.assert_allclose(table[column], expected[column], rtol=1e-6)
