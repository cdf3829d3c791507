"""The command line on real files: exit codes, outputs that open with the right scale, refusal
to overwrite, cancellation that leaves nothing behind, and the napari reader for its output."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import yaml
import zarr
from safetensors.torch import save_file

import napari_gradcam
from napari_gradcam._reader import get_reader
from napari_gradcam.cli import main
from napari_gradcam.core.architectures import ResNetLike
from napari_gradcam.display import MAP_BLENDING, MAP_COLORMAP
from napari_gradcam.io import ATTRS_KEY, read_volume, write_ome_zarr, write_tiff_volume
from napari_gradcam.placement import ngff_translation, set_ngff_translation

SCALE = (2.0, 0.65, 0.65)


def write_card(folder: Path, name: str = "tiny2d", widths=(4, 8, 8)) -> Path:
    """A small 2D classifier (positive linear head, so its maps are not all zero) + card."""
    torch.manual_seed(0)
    model = ResNetLike(spatial_dims=2, in_channels=1, num_classes=3, widths=widths)
    with torch.no_grad():
        model.classifier.weight.abs_()
    save_file(model.state_dict(), str(folder / f"{name}.safetensors"))
    card = {
        "name": name, "description": "a test classifier", "architecture": "resnet_like",
        "architecture_kwargs": {"spatial_dims": 2, "in_channels": 1, "num_classes": 3,
                                "widths": list(widths)},
        "weights": f"{name}.safetensors", "spatial_dims": 2, "in_channels": 1,
        "task": "classification", "class_names": ["none", "pore", "crack"],
        "target_layer": "features.2", "input_size": [16, 16],
        "preprocessing": [{"op": "window", "min": 0.0, "max": 1000.0}],
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(card), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("cli")
    volume = (np.random.default_rng(0).random((10, 20, 24)) * 1000).astype(np.uint16)
    return {"card": write_card(folder),
            "scan": write_tiff_volume(folder / "scan.tif", volume, scale=SCALE)}


def explain_args(files, out: Path, *extra: str) -> list[str]:
    return ["explain", str(files["scan"]), "--model", str(files["card"]), "--out", str(out),
            "--device", "cpu", "--batch-size", "4", "--quiet", *extra]


def test_explain_writes_an_ome_zarr_with_the_scan_scale(files, tmp_path, capsys):
    out = tmp_path / "maps.zarr"
    assert main(explain_args(files, out)[:-1]) == 0  # without --quiet: summary on stdout
    stdout = capsys.readouterr().out
    assert f"wrote {out}" in stdout and "predicted (slices)" in stdout
    maps, info = read_volume(out)
    assert maps.shape == (10, 20, 24)
    assert info.scale == pytest.approx(SCALE) and info.unit == "micrometer"
    assert np.asarray(maps).max() > 0
    assert info.metadata["model"] == "tiny2d" and info.metadata["layers"] == ["features.2"]
    assert info.metadata["source"] == str(files["scan"].resolve())


def test_progress_goes_to_stderr_as_plain_lines_when_not_a_terminal(files, tmp_path, capsys):
    assert main(explain_args(files, tmp_path / "maps.zarr")[:-1]) == 0
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("explain: 10/10 (100 %)")


@pytest.mark.parametrize("extra, message", [
    (["--target", "cracks"], "not a class of this model"),
    (["--target", "7"], "out of range"),
    (["--mode", "volume"], "needs a 3D model"),
    (["--layer", "features.8"], "no layer 'features.8'"),
    (["--method", "gradcam+++"], "unknown method"),
    (["--batch-size", "0"], "batch size must be at least 1"),
])
def test_bad_options_exit_2_with_one_clear_line(files, tmp_path, capsys, extra, message):
    out = tmp_path / "maps.zarr"
    assert main(explain_args(files, out, *extra)) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert err.startswith("napari-gradcam: error: ")
    assert list(tmp_path.iterdir()) == []


def test_bad_inputs_exit_2(files, tmp_path, capsys):
    out = str(tmp_path / "maps.zarr")
    assert main(["explain", str(tmp_path / "missing.tif"), "--model", str(files["card"]),
                 "--out", out]) == 2
    assert "input not found" in capsys.readouterr().err
    flat = tmp_path / "flat.tif"
    tifffile.imwrite(flat, np.zeros((8, 8), np.uint16))
    assert main(["explain", str(flat), "--model", str(files["card"]), "--out", out]) == 2
    assert "3D volume" in capsys.readouterr().err
    assert main(["explain", str(files["scan"]), "--model", "no-such-model", "--out", out]) == 2
    assert "neither a file nor a demo model" in capsys.readouterr().err
    assert main(["explain", str(files["scan"]), "--out", out]) == 2  # argparse: no --model
    assert "--model" in capsys.readouterr().err
    assert main(["explain", str(files["scan"]), "--model", str(files["card"]),
                 "--out", str(tmp_path / "maps.h5")]) == 2
    assert "cannot tell the output format" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["flat.tif"]


def test_existing_output_is_refused_unless_overwrite(files, tmp_path, capsys):
    out = tmp_path / "maps.zarr"
    assert main(explain_args(files, out)) == 0
    created = read_volume(out)[1].metadata["created"]
    assert main(explain_args(files, out, "--target", "crack")) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert read_volume(out)[1].metadata["target"] == "predicted class"
    assert main(explain_args(files, out, "--target", "crack", "--overwrite")) == 0
    record = read_volume(out)[1].metadata
    assert record["target"] == "class 2 (crack)" and record["created"] >= created
    assert [p.name for p in tmp_path.iterdir()] == ["maps.zarr"]


def test_float16_tif_and_npy_outputs(files, tmp_path):
    assert main(explain_args(files, tmp_path / "half.zarr", "--dtype", "float16")) == 0
    half, _ = read_volume(tmp_path / "half.zarr")
    assert half.dtype == np.float16
    assert main(explain_args(files, tmp_path / "maps.tif")) == 0
    assert main(explain_args(files, tmp_path / "maps.npy")) == 0
    tif, tif_info = read_volume(tmp_path / "maps.tif")
    npy, npy_info = read_volume(tmp_path / "maps.npy")
    np.testing.assert_array_equal(tif, npy)
    np.testing.assert_allclose(half[:], npy, rtol=2e-3, atol=1e-7)
    assert tif_info.scale == pytest.approx(SCALE) and npy_info.scale == pytest.approx(SCALE)
    assert tif_info.metadata["method"] == npy_info.metadata["method"] == "gradcam"


def test_models_lists_demo_models_and_one_models_layers(files, capsys):
    assert main(["models"]) == 0
    listing = capsys.readouterr().out
    assert "name" in listing or "no demo models" in listing
    assert main(["models", str(files["card"])]) == 0
    out = capsys.readouterr().out
    assert "tiny2d: 2D classification" in out
    default = [line for line in out.splitlines() if line.startswith("*")]
    assert len(default) == 1 and "features.2" in default[0] and "8 x 8 x 8" in default[0]
    assert main(["models", "no-such-model"]) == 2


def test_sample_writes_a_ct_tiff_with_voxel_size(tmp_path, capsys):
    out, labels = tmp_path / "ct.tif", tmp_path / "ct_labels.tif"
    assert main(["sample", "ct", str(out), "--shape", "16", "24", "24", "--labels",
                 str(labels)]) == 0
    volume, info = read_volume(out)
    assert volume.shape == (16, 24, 24) and volume.dtype == np.uint16
    assert info.scale == pytest.approx((1.0, 0.65, 0.65)) and info.unit == "micrometer"
    assert set(np.unique(read_volume(labels)[0])) <= {0, 1, 2}
    assert main(["sample", "ct", str(out)]) == 2  # exists
    assert main(["sample", "ct", str(tmp_path / "ct.zarr")]) == 2
    assert "name the file *.tif" in capsys.readouterr().err


def test_help_and_version_exit_0(capsys):
    assert main(["--version"]) == 0
    assert napari_gradcam.__version__ in capsys.readouterr().out
    assert main(["explain", "--help"]) == 0
    assert "--workers" in capsys.readouterr().out
    assert main([]) == 2


# ----------------------------------------------------------------------------- subprocess


def _env() -> dict[str, str]:
    src = str(Path(napari_gradcam.__file__).resolve().parents[1])
    env = dict(os.environ)
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


@pytest.mark.slow
def test_module_entry_point_in_a_subprocess(files, tmp_path):
    out = tmp_path / "maps.zarr"
    done = subprocess.run([sys.executable, "-m", "napari_gradcam.cli",
                           *explain_args(files, out)[:-1]], capture_output=True, text=True,
                          env=_env(), timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"wrote {out}" in done.stdout
    assert read_volume(out)[1].scale == pytest.approx(SCALE)
    failed = subprocess.run([sys.executable, "-m", "napari_gradcam.cli", "explain",
                             str(tmp_path / "nothing.tif"), "--model", str(files["card"]),
                             "--out", str(tmp_path / "x.zarr")], capture_output=True,
                            text=True, env=_env(), timeout=120)
    assert failed.returncode == 2
    assert failed.stderr.strip().splitlines() == [
        f"napari-gradcam: error: input not found: {tmp_path / 'nothing.tif'}"]


@pytest.mark.slow
@pytest.mark.parametrize("signals", [1, 2])
def test_sigterm_mid_run_exits_130_and_leaves_nothing(files, tmp_path, signals):
    """One SIGTERM stops at the next batch; a second one aborts in the middle of whatever
    runs (a zarr write included). Either way the partial output is gone afterwards."""
    big = (np.random.default_rng(1).random((400, 64, 64)) * 1000).astype(np.uint16)
    scan = write_tiff_volume(tmp_path / "big.tif", big, scale=SCALE)
    out = tmp_path / "maps.zarr"
    process = subprocess.Popen(
        [sys.executable, "-m", "napari_gradcam.cli", "explain", str(scan), "--model",
         str(files["card"]), "--out", str(out), "--device", "cpu", "--batch-size", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        deadline = time.monotonic() + 60
        while not any((partial / "0" / "0").exists()  # the first chunk has been written
                      for partial in tmp_path.glob("maps.zarr.partial-*")):
            assert process.poll() is None, process.stderr.read()
            assert time.monotonic() < deadline, "the run never started writing"
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        if signals == 2:
            time.sleep(0.01)
            process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    if signals == 1:
        assert process.returncode == 130, stderr
        assert "stopping after the current batch" in stderr and "cancelled" in stderr
    else:  # 130, or killed by the second signal if it came after the clean-up had finished
        assert process.returncode in (130, -signal.SIGTERM), stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.tif"]


@pytest.mark.slow
def test_workers_flag_gives_the_same_file_as_one_process(files, tmp_path):
    """The same map store: level 0, the pyramid (130 planes high: two levels) and the state."""
    from napari_gradcam.core.run.output import map_layer_data, store_state

    tall = (np.random.default_rng(2).random((8, 130, 24)) * 1000).astype(np.uint16)
    scan = write_tiff_volume(tmp_path / "tall.tif", tall, scale=SCALE)
    single, spread = tmp_path / "single.zarr", tmp_path / "spread.zarr"
    args = ["--model", str(files["card"]), "--device", "cpu", "--batch-size", "4", "--quiet"]
    assert main(["explain", str(scan), "--out", str(single), *args]) == 0
    assert main(["explain", str(scan), "--out", str(spread), *args, "--workers", "2",
                 "--chunk", "4"]) == 0
    single_levels, spread_levels = map_layer_data(single), map_layer_data(spread)
    assert len(single_levels) == len(spread_levels) == 2
    for one, other in zip(single_levels, spread_levels, strict=True):
        np.testing.assert_array_equal(np.asarray(one), np.asarray(other))
    assert store_state(spread) == store_state(single) == {
        "complete": True, "planes_done": 8, "planes_total": 8, "progress_axis": 0}
    record = read_volume(spread)[1].metadata
    assert record["options"]["scheduler"] == "local cluster of 2 processes"
    assert record["predictions"] == read_volume(single)[1].metadata["predictions"]


# ----------------------------------------------------------------------------- napari reader


def test_reader_opens_our_output_as_a_heatmap_layer(files, tmp_path):
    out = tmp_path / "maps.zarr"
    assert main(explain_args(files, out)) == 0
    reader = get_reader(str(out))
    assert callable(reader)
    assert get_reader([str(out)]) is reader
    ((data, kwargs, layer_type),) = reader(str(out))
    assert layer_type == "image"
    assert data.shape == (10, 20, 24)
    assert kwargs["scale"] == pytest.approx(SCALE)
    assert kwargs["colormap"] == MAP_COLORMAP and kwargs["blending"] == MAP_BLENDING
    record = kwargs["metadata"][ATTRS_KEY]
    assert record["method"] == "gradcam" and record["model"] == "tiny2d"
    values = np.asarray(data)
    assert kwargs["contrast_limits"] == pytest.approx((values.min(), values.max()))
    assert kwargs["units"] == ("micrometer",) * 3


def test_reader_declines_other_paths(files, tmp_path):
    # another program's OME-Zarr opens as a plain image (its scale, no map styling, no
    # provenance); a TIFF, a missing store or several paths are another reader's business
    foreign = zarr.open_group(str(tmp_path / "foreign.zarr"), mode="w", zarr_format=2)
    foreign.create_array("0", shape=(2, 2, 2), dtype="f4")
    foreign.attrs["multiscales"] = [{"version": "0.4", "axes": [], "datasets": [{"path": "0"}]}]
    ((_, kwargs, layer_type),) = get_reader(str(tmp_path / "foreign.zarr"))(
        str(tmp_path / "foreign.zarr"))
    assert layer_type == "image" and "colormap" not in kwargs
    assert ATTRS_KEY not in kwargs.get("metadata", {})
    assert get_reader(str(files["scan"])) is None
    assert get_reader(str(tmp_path / "missing.zarr")) is None
    assert get_reader([str(files["scan"]), str(files["scan"])]) is None


def test_reader_layer_data_is_accepted_by_napari(files, tmp_path):
    layers = pytest.importorskip("napari.layers")
    out = tmp_path / "maps.zarr"
    assert main(explain_args(files, out)) == 0
    ((data, kwargs, layer_type),) = get_reader(str(out))(str(out))
    layer = layers.Layer.create(data, kwargs, layer_type)
    assert tuple(layer.scale) == pytest.approx(SCALE)
    assert layer.colormap.name == MAP_COLORMAP and layer.blending == MAP_BLENDING
    assert str(layer.units[0]) == "micrometer"
    assert layer.metadata[ATTRS_KEY]["layers"] == ["features.2"]


@pytest.mark.gui
def test_napari_opens_the_output_beside_its_scan_through_the_plugin(files, tmp_path,
                                                                     make_napari_viewer):
    """What the README promises: `napari scan.tif maps.zarr` puts the map on the scan."""
    out = tmp_path / "maps.zarr"
    assert main(explain_args(files, out)) == 0
    viewer = make_napari_viewer()
    (scan,) = viewer.open(str(files["scan"]), plugin="napari-gradcam", stack=False)
    assert tuple(scan.scale) == pytest.approx(SCALE)  # our TIFF reader keeps the voxel size
    (heatmap,) = viewer.open(str(out), plugin="napari-gradcam")
    assert heatmap.data.shape == scan.data.shape
    assert tuple(heatmap.scale) == pytest.approx(tuple(scan.scale))
    assert heatmap.extent.world == pytest.approx(scan.extent.world)
    assert heatmap.blending == "additive"


@pytest.mark.gui
def test_the_map_of_a_cropped_ome_zarr_keeps_its_translation(files, tmp_path,
                                                             make_napari_viewer):
    """A crop of a scan keeps its place as an NGFF translation; the explain command gives
    the map the same translation, so napari puts the map on the crop, not at the origin."""
    crop = write_ome_zarr(tmp_path / "crop.ome.zarr", read_volume(files["scan"])[0][2:8],
                          scale=SCALE)
    origin = (4.0, 6.5, 13.0)
    set_ngff_translation(crop, origin)
    out = tmp_path / "maps.zarr"
    assert main(["explain", str(crop), *explain_args(files, out)[2:]]) == 0
    assert ngff_translation(out, 3) == pytest.approx(origin)
    viewer = make_napari_viewer()
    scan, heatmap = viewer.open([str(crop), str(out)], plugin="napari-gradcam", stack=False)
    assert tuple(heatmap.translate) == pytest.approx(origin)
    assert heatmap.extent.world == pytest.approx(scan.extent.world)
