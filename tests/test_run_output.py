"""The widget's job writing its map to disk: an OME-Zarr filled chunk by chunk, with a pyramid,
readable while it fills, honest when cancelled, equal to the in-memory map; and "all classes"
in windows mode in one forward pass per batch of windows."""

from __future__ import annotations

from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import zarr

from napari_gradcam._reader import read_zarr
from napari_gradcam.core.models import load_model
from napari_gradcam.core.run.output import (
    downsample_mean,
    map_layer_data,
    pyramid_shapes,
    store_state,
)
from napari_gradcam.io import ATTRS_KEY, default_output_path, read_volume
from napari_gradcam.jobs import (
    Cancelled,
    ExplainRequest,
    ImageSource,
    TargetChoice,
    explain,
    explain_job,
)
from test_jobs import write_card


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    folder = tmp_path_factory.mktemp("cards")
    return {
        "c2": load_model(write_card(folder, "c2")),
        "c3": load_model(write_card(folder, "c3", spatial_dims=3, widths=(2, 4),
                                    input_size="[8, 8, 8]")),
        "unet": load_model(write_card(folder, "unet", architecture="unet",
                                      task="segmentation", widths=(4, 8))),
    }


def lazy_scan(tmp_path: Path, shape: tuple[int, ...], seed: int = 0) -> tuple[da.Array, Path]:
    """A uint16 scan in a zarr store, opened lazily as dask (as napari opens a big scan)."""
    data = np.random.default_rng(seed).integers(0, 1000, shape).astype(np.uint16)
    path = tmp_path / "scan.zarr"
    array = zarr.open_array(str(path), mode="w", shape=shape, chunks=(4, *shape[1:]),
                            dtype=data.dtype)
    array[...] = data
    return da.from_zarr(str(path)), path


def test_pyramid_shapes_and_the_2x2x2_mean_by_hand() -> None:
    assert pyramid_shapes((300, 130, 40)) == [(300, 130, 40), (150, 65, 20), (75, 33, 10)]
    assert pyramid_shapes((20, 30, 40)) == [(20, 30, 40)]
    block = np.arange(3 * 2 * 2, dtype=np.float32).reshape(3, 2, 2)
    # planes 0 and 1 averaged; plane 2 alone (edge-padded: averaged with itself)
    expected = np.array([[[block[:2].mean()]], [[block[2].mean()]]], dtype=np.float32)
    np.testing.assert_allclose(downsample_mean(block), expected)


def test_slices_on_disk_equal_the_in_memory_map_and_reopen_as_the_same_layer(models, tmp_path
                                                                             ) -> None:
    scan, scan_path = lazy_scan(tmp_path, (12, 130, 40))
    source = ImageSource("scan", scan, voxel_size=(2.0, 0.5, 0.5), path=str(scan_path))
    in_memory = explain(models["c2"], source, ExplainRequest(mode="slices", batch_size=4))
    out = tmp_path / "map.zarr"
    on_disk = explain(models["c2"], source,
                      ExplainRequest(mode="slices", batch_size=4, output=str(out)))
    lazy = on_disk.maps["predicted"]
    assert isinstance(lazy, da.Array)  # never an in-memory copy
    np.testing.assert_array_equal(lazy.compute(), in_memory.maps["predicted"])
    np.testing.assert_allclose(on_disk.predictions, in_memory.predictions)
    state = store_state(out)
    assert state == {"complete": True, "planes_done": 12, "planes_total": 12,
                     "progress_axis": 0}
    # the plugin's reader re-opens it as the same map layer: pyramid, scale, provenance
    array, _ = read_volume(out)
    np.testing.assert_array_equal(np.asarray(array), in_memory.maps["predicted"])
    [(levels_read, kwargs, kind)] = read_zarr(str(out))
    assert kind == "image" and kwargs["multiscale"] and len(levels_read) == 2
    np.testing.assert_array_equal(np.asarray(levels_read[0]), in_memory.maps["predicted"])
    assert tuple(kwargs["scale"]) == (2.0, 0.5, 0.5)
    record = kwargs["metadata"][ATTRS_KEY]
    assert record["method"] == "gradcam" and record["source"] == "scan"
    assert record["options"]["origin"] == [0, 0, 0] and record["complete"] is True
    low, high = record["value_range"]
    assert low == float(in_memory.maps["predicted"].min())
    assert high == float(in_memory.maps["predicted"].max())
    # the pyramid: level 1 is the 2x2x2 mean of level 0
    levels = map_layer_data(out)
    assert [tuple(level.shape) for level in levels] == [(12, 130, 40), (6, 65, 20)]
    np.testing.assert_allclose(levels[1].compute(), downsample_mean(levels[0].compute()),
                               rtol=1e-6)
    group = zarr.open_group(str(out), mode="r")
    scales = [d["coordinateTransformations"][0]["scale"]
              for d in group.attrs["multiscales"][0]["datasets"]]
    assert scales == [[2.0, 0.5, 0.5], [4.0, 1.0, 1.0]]


def test_the_store_is_readable_while_it_fills_and_a_cancel_says_it_is_incomplete(
        models, tmp_path) -> None:
    scan, _ = lazy_scan(tmp_path, (12, 24, 20))
    source = ImageSource("scan", scan)
    reference = explain(models["c2"], source, ExplainRequest(mode="slices", batch_size=4))
    out = tmp_path / "partial.zarr"
    job = explain_job(models["c2"], source,
                      ExplainRequest(mode="slices", batch_size=4, output=out))
    assert next(job)[:2] == (4, 12)
    # another reader (the widget refreshing its layer) sees the finished planes now
    state = store_state(out)
    assert state["complete"] is False and state["planes_done"] == 4
    partial = map_layer_data(out)[0].compute()
    np.testing.assert_array_equal(partial[:4], reference.maps["predicted"][:4])
    assert not partial[4:].any()  # not written yet: zeros, and the metadata says so
    job.close()  # the user cancels
    assert store_state(out)["complete"] is False and store_state(out)["planes_done"] == 4
    assert out.exists()  # the part done stays


def test_a_4d_stack_map_keeps_its_length_one_axis_on_disk_and_in_the_layer_data(models, tmp_path
                                                                                ) -> None:
    data = np.random.default_rng(1).random((2, 6, 16, 16)).astype(np.float32)
    source = ImageSource("t", data, current_index=(1, 0, 0, 0))
    request = ExplainRequest(mode="slices", axis=1, batch_size=3)
    reference = explain(models["c2"], source, request)
    out = tmp_path / "t.zarr"
    result = explain(models["c2"], source,
                     ExplainRequest(mode="slices", axis=1, batch_size=3, output=out))
    assert result.maps["predicted"].shape == (1, 6, 16, 16) and result.origin == (1, 0, 0, 0)
    np.testing.assert_array_equal(np.asarray(result.maps["predicted"]),
                                  reference.maps["predicted"])
    assert map_layer_data(out)[0].shape == (1, 6, 16, 16)


def test_segmentation_class_map_goes_to_disk_beside_the_map(models, tmp_path) -> None:
    data = np.random.default_rng(2).random((4, 16, 16)).astype(np.float32)
    source = ImageSource("v", data)
    request = ExplainRequest(mode="slices", target=TargetChoice("class", class_index=1))
    reference = explain(models["unet"], source, request)
    result = explain(models["unet"], source,
                     ExplainRequest(mode="slices", target=TargetChoice("class", class_index=1),
                                    output=tmp_path / "seg.zarr"))
    assert isinstance(result.class_map, da.Array)
    np.testing.assert_array_equal(result.class_map.compute(), reference.class_map)


def test_output_is_never_the_input_nor_an_existing_store(models, tmp_path) -> None:
    scan, scan_path = lazy_scan(tmp_path, (4, 16, 16))
    source = ImageSource("scan", scan, path=str(scan_path))
    with pytest.raises(Exception, match=r"input|exists"):
        explain(models["c2"], source, ExplainRequest(mode="slices", output=scan_path))
    default = default_output_path("scan", scan_path)
    assert default == tmp_path / "scan_gradcam.zarr" and default != scan_path
    explain(models["c2"], source, ExplainRequest(mode="slices", output=default))
    with pytest.raises(Exception, match="exists"):
        explain(models["c2"], source, ExplainRequest(mode="slices", output=default))
    assert default_output_path("scan", scan_path) == tmp_path / "scan_gradcam_2.zarr"
    # a layer without a file goes to the user's cache folder
    assert default_output_path("made in napari").parent.name == "maps"


def test_a_2d_map_cannot_go_to_disk(models, tmp_path) -> None:
    with pytest.raises(Exception, match="volumes"):
        explain(models["c2"], ImageSource("img", np.zeros((16, 16), np.float32)),
                ExplainRequest(output=tmp_path / "img.zarr"))


def count_forward_passes(model) -> list[int]:
    calls = [0]
    model.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_all_classes_in_windows_is_one_forward_pass_per_batch_and_equals_each_class(
        tmp_path) -> None:
    folder = tmp_path / "cards"
    folder.mkdir()
    loaded = load_model(write_card(folder, "w3", spatial_dims=3, widths=(2, 4),
                                   input_size="[8, 8, 8]"))
    data = np.random.default_rng(3).random((12, 12, 12)).astype(np.float32)
    source = ImageSource("v", data)
    calls = count_forward_passes(loaded.model)
    request = ExplainRequest(mode="windows", batch_size=64, target=TargetChoice("all"),
                             domain_check=False)
    every = explain(loaded, source, request)
    # the loop batches the windows of one depth row: with a batch larger than a row, one
    # forward pass per row explains every class of every window in it
    rows = len({corner[0] for corner in every.positions})
    assert rows > 1 and len(every.positions) > rows
    assert calls[0] == rows
    for k, name in enumerate(loaded.card.class_names):
        one = explain(loaded, source, ExplainRequest(
            mode="windows", batch_size=64, target=TargetChoice("class", class_index=k),
            domain_check=False))
        np.testing.assert_allclose(every.maps[name], one.maps[name], rtol=1e-5, atol=1e-7)
    assert calls[0] == rows * (1 + len(loaded.card.class_names))


def test_all_classes_in_windows_on_disk_writes_one_store_per_class(models, tmp_path) -> None:
    data = np.random.default_rng(4).random((10, 12, 12)).astype(np.float32)
    source = ImageSource("v", data)
    reference = explain(models["c3"], source,
                        ExplainRequest(mode="windows", target=TargetChoice("all")))
    result = explain(models["c3"], source, ExplainRequest(
        mode="windows", target=TargetChoice("all"), output=tmp_path / "all.zarr"))
    for name in models["c3"].card.class_names:
        path = tmp_path / f"all_{name}.zarr"
        assert store_state(path)["complete"] is True
        np.testing.assert_array_equal(result.maps[name].compute(), reference.maps[name])
        record = zarr.open_group(str(path), mode="r").attrs[ATTRS_KEY]
        assert record["target"] == name


def test_cancel_through_run_job_keeps_the_part_done(models, tmp_path) -> None:
    scan, _ = lazy_scan(tmp_path, (12, 24, 20))
    out = tmp_path / "stopped.zarr"
    with pytest.raises(Cancelled):
        explain(models["c2"], ImageSource("scan", scan),
                ExplainRequest(mode="slices", batch_size=4, output=out),
                should_stop=lambda: True)
    assert store_state(out)["planes_done"] == 4 and store_state(out)["complete"] is False


@pytest.mark.parametrize(("card_options", "mode"), [
    ({}, "slices"),
    ({"spatial_dims": 3, "widths": (2, 4), "input_size": "[8, 8, 8]"}, "windows"),
])
def test_the_widget_job_and_the_command_line_write_identical_maps(tmp_path, card_options, mode
                                                                  ) -> None:
    from napari_gradcam.distributed import ExplainOptions, explain_file

    folder = tmp_path / "cards"
    folder.mkdir()
    card = write_card(folder, f"same_{mode}", **card_options)
    scan, scan_path = lazy_scan(tmp_path, (12, 20, 18), seed=5)
    cli_out = tmp_path / "cli.zarr"
    explain_file(scan_path, str(card), cli_out,
                 options=ExplainOptions(mode=mode, batch_size=4, device="cpu"))
    widget = explain(load_model(card), ImageSource("scan", scan, path=str(scan_path)),
                     ExplainRequest(mode=mode, batch_size=4, output=tmp_path / "widget.zarr"))
    cli_map, _ = read_volume(cli_out)
    assert np.asarray(cli_map).max() > 0  # two empty maps would be "identical" too
    np.testing.assert_array_equal(np.asarray(widget.maps["predicted"]), np.asarray(cli_map))


def test_the_command_line_drains_the_widgets_job_into_the_same_store(tmp_path, capsys) -> None:
    """The command line runs the widget's job (one pipeline): its OME-Zarr has the job's
    pyramid, the same levels, the job's record (complete, planes, map layout) and the maps of
    the widget bit for bit; only the command line's own options are added."""
    from napari_gradcam.cli import main

    folder = tmp_path / "cards"
    folder.mkdir()
    card = write_card(folder, "spine")
    scan, scan_path = lazy_scan(tmp_path, (12, 130, 40), seed=6)
    cli_out = tmp_path / "cli.zarr"
    assert main(["explain", str(scan_path), "--model", str(card), "--out", str(cli_out),
                 "--device", "cpu", "--batch-size", "4"]) == 0
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("explain: 12/12")
    widget_out = tmp_path / "widget.zarr"
    explain(load_model(card), ImageSource(str(scan_path), scan, path=str(scan_path)),
            ExplainRequest(mode="slices", batch_size=4, output=widget_out))
    assert store_state(cli_out) == store_state(widget_out) == {
        "complete": True, "planes_done": 12, "planes_total": 12, "progress_axis": 0}
    cli_levels, widget_levels = map_layer_data(cli_out), map_layer_data(widget_out)
    assert [level.shape for level in cli_levels] == [(12, 130, 40), (6, 65, 20)]
    assert [level.shape for level in widget_levels] == [level.shape for level in cli_levels]
    for cli_level, widget_level in zip(cli_levels, widget_levels, strict=True):
        np.testing.assert_array_equal(cli_level.compute(), widget_level.compute())
    assert cli_levels[0].compute().max() > 0
    cli_record = zarr.open_group(str(cli_out), mode="r").attrs[ATTRS_KEY]
    widget_record = zarr.open_group(str(widget_out), mode="r").attrs[ATTRS_KEY]
    for key in ("map_shape", "stored_axes", "value_range", "predicted_counts", "predictions",
                "method", "layers", "source", "class_names"):
        assert cli_record[key] == widget_record[key], key
    job_options = {"origin", "source_shape", "sample_axis", "spatial_axes", "batch_size"}
    assert job_options <= set(cli_record["options"])
    assert cli_record["options"]["scheduler"] == "single process"  # the shell's own
    assert cli_record["target"] == "predicted class"  # in the command line's words


def test_a_store_published_when_complete_appears_only_then_and_is_removed_on_cancel(
        models, tmp_path) -> None:
    scan, _ = lazy_scan(tmp_path, (12, 24, 20))
    out = tmp_path / "atomic.zarr"
    request = ExplainRequest(mode="slices", batch_size=4, output=out, keep_partial=False)
    job = explain_job(models["c2"], ImageSource("scan", scan), request)
    assert next(job)[:2] == (4, 12)
    (partial,) = tmp_path.glob("atomic.zarr.partial-*")  # written under a temporary name
    assert not out.exists() and store_state(partial)["planes_done"] == 4
    job.close()  # the user cancels: nothing is left
    assert not out.exists() and not list(tmp_path.glob("atomic.zarr*"))
    result = explain(models["c2"], ImageSource("scan", scan), request)
    assert store_state(out)["complete"] is True and not list(tmp_path.glob("*.partial-*"))
    np.testing.assert_array_equal(
        result.maps["predicted"].compute(),
        explain(models["c2"], ImageSource("scan", scan),
                ExplainRequest(mode="slices", batch_size=4)).maps["predicted"])


def test_an_existing_uncertainty_store_is_refused_before_anything_is_written(models, tmp_path
                                                                             ) -> None:
    data = np.random.default_rng(7).random((4, 16, 16)).astype(np.float32)
    out = tmp_path / "m.zarr"
    (tmp_path / "m_uncertainty.zarr").mkdir()
    request = ExplainRequest(mode="slices", uncertainty=("flips",), output=out)
    with pytest.raises(FileExistsError, match=r"m_uncertainty\.zarr already exists"):
        explain(models["c2"], ImageSource("v", data), request)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m_uncertainty.zarr"]
