"""The command line never loses data or reports wrong numbers: it refuses to write over its own
input, a full disk is an ordinary error, leftovers of killed runs are cleaned up (and only
those), voxel sizes in mixed units are converted, and damaged files get messages that name them.

Real files, real processes, real file systems: a small tmpfs stands in for a full disk and a
read-only mount for a folder that cannot be written (root can write anywhere else). Where this
machine cannot mount (not root, no mount rights), those tests are skipped and say why.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import yaml
import zarr
from safetensors.torch import save_file

import napari_gradcam
from napari_gradcam import io
from napari_gradcam._reader import get_reader
from napari_gradcam.cli import main
from napari_gradcam.core.architectures import ResNetLike
from napari_gradcam.io import ATTRS_KEY, read_volume, write_tiff_volume, write_volume

SCALE = (2.0, 0.65, 0.65)


def write_card(folder: Path) -> Path:
    """A small 2D classifier with its card (positive head, so the maps are not all zero)."""
    torch.manual_seed(0)
    widths = (4, 8, 8)
    model = ResNetLike(spatial_dims=2, in_channels=1, num_classes=3, widths=widths)
    with torch.no_grad():
        model.classifier.weight.abs_()
    save_file(model.state_dict(), str(folder / "tiny2d.safetensors"))
    card = {
        "name": "tiny2d", "architecture": "resnet_like",
        "architecture_kwargs": {"spatial_dims": 2, "in_channels": 1, "num_classes": 3,
                                "widths": list(widths)},
        "weights": "tiny2d.safetensors", "spatial_dims": 2, "in_channels": 1,
        "task": "classification", "class_names": ["none", "pore", "crack"],
        "target_layer": "features.2", "input_size": [16, 16],
        "preprocessing": [{"op": "window", "min": 0.0, "max": 1000.0}],
    }
    path = folder / "tiny2d.yaml"
    path.write_text(yaml.safe_dump(card), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def card(tmp_path_factory) -> Path:
    return write_card(tmp_path_factory.mktemp("card"))


def scan_volume(shape=(10, 20, 24), seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random(shape) * 1000).astype(np.uint16)


def explain_args(scan: Path, card: Path, out: Path, *extra: str) -> list[str]:
    return ["explain", str(scan), "--model", str(card), "--out", str(out), "--device", "cpu",
            "--batch-size", "4", "--quiet", *extra]


def _env() -> dict[str, str]:
    src = str(Path(napari_gradcam.__file__).resolve().parents[1])
    env = dict(os.environ)
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def run_cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    """The command line in its own process: a crash (SIGBUS) must not take pytest with it."""
    return subprocess.run([sys.executable, "-m", "napari_gradcam.cli", *args],
                          capture_output=True, text=True, env=_env(), timeout=timeout)


def tree_digest(root: Path) -> dict[str, str]:
    """Every file under ``root`` (or ``root`` itself) with the SHA-256 of its bytes."""
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root.parent)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in files}


@contextlib.contextmanager
def mounted_tmpfs(where: Path, options: str) -> Iterator[Path]:
    """A real tmpfs (``mount -t tmpfs -o OPTIONS``) at ``where``; skip when mounting fails."""
    where.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command on this machine")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root with mount rights): "
                    f"{done.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


# ----------------------------------------------------------------------------- 1: output = input


@pytest.fixture
def inputs(tmp_path) -> dict[str, Path]:
    volume = scan_volume()
    scan = write_tiff_volume(tmp_path / "scan.tif", volume, scale=SCALE)
    zarr_scan = write_volume(tmp_path / "scan.ome.zarr", volume, scale=SCALE)
    (tmp_path / "link.tif").symlink_to(scan)
    (tmp_path / "link.ome.zarr").symlink_to(zarr_scan)
    return {"tif": scan, "zarr": zarr_scan}


@pytest.mark.parametrize("source, out, extra", [
    ("scan.tif", "scan.tif", []),                       # the same name
    ("link.tif", "scan.tif", []),                       # input through a symlink
    ("scan.tif", "link.tif", []),                       # output through a symlink
    ("scan.ome.zarr", "scan.ome.zarr", []),             # an OME-Zarr folder
    ("link.ome.zarr", "scan.ome.zarr", []),
    ("scan.ome.zarr", "scan.ome.zarr/maps.zarr", []),   # inside the input's folder
    ("scan.ome.zarr", "scan.ome.zarr", ["--workers", "1"]),  # the distributed path too
])
@pytest.mark.parametrize("overwrite", [False, True])
def test_the_output_is_never_the_input(inputs, card, tmp_path, capsys, source, out, extra,
                                       overwrite):
    before = tree_digest(tmp_path)
    args = explain_args(tmp_path / source, card, tmp_path / out, *extra)
    code = main(args + (["--overwrite"] if overwrite else []))
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"the output {tmp_path / out} is the input" in err
    assert "never writes over its input, also not with --overwrite" in err
    assert tree_digest(tmp_path) == before  # byte-identical, and nothing new next to it


def test_an_output_folder_that_contains_the_input_is_refused(card, tmp_path, capsys):
    folder = tmp_path / "run.zarr"
    folder.mkdir()
    scan = write_tiff_volume(folder / "scan.tif", scan_volume(), scale=SCALE)
    before = tree_digest(tmp_path)
    assert main(explain_args(scan, card, folder, "--overwrite")) == 2
    assert "a folder that contains the input" in capsys.readouterr().err
    assert tree_digest(tmp_path) == before


def test_the_api_refuses_too(inputs, card, tmp_path):
    from napari_gradcam.distributed import explain_file

    with pytest.raises(io.OutputIsInputError, match="is the input"):
        explain_file(inputs["tif"], card, tmp_path / "link.tif", overwrite=True)
    with pytest.raises(io.OutputIsInputError):
        io.check_output_path(inputs["zarr"], overwrite=True, inputs=[tmp_path / "link.ome.zarr"])
    hard = tmp_path / "hard.tif"
    os.link(inputs["tif"], hard)
    with pytest.raises(io.OutputIsInputError, match="hard link"):
        io.check_output_path(hard, overwrite=True, inputs=[inputs["tif"]])
    # Another file in the same folder is fine.
    assert io.check_output_path(tmp_path / "maps.tif", inputs=[inputs["tif"]]).name == "maps.tif"
    # Any output, e.g. a report folder, can be checked on its own.
    with pytest.raises(io.OutputIsInputError, match="inside the input"):
        io.refuse_output_over_input(inputs["zarr"] / "report", [inputs["zarr"]])
    io.refuse_output_over_input(tmp_path / "report", [inputs["zarr"], inputs["tif"]])


# ----------------------------------------------------------------------------- 2: full disk


@pytest.mark.slow
@pytest.mark.parametrize("name", ["maps.tif", "maps.npy", "maps.zarr"])
def test_a_full_disk_is_an_error_with_a_message_and_leaves_nothing(card, tmp_path, name):
    """A 1 MiB tmpfs and a 2.6 MB map: the run must stop with exit 1 and a sentence, not die of
    SIGBUS in the middle of a memory-mapped write and leave a full-size partial behind."""
    scan = write_tiff_volume(tmp_path / "scan.tif", scan_volume((20, 128, 256)), scale=SCALE)
    with mounted_tmpfs(tmp_path / "small", "size=1m") as disk:
        out = disk / name
        done = run_cli(*explain_args(scan, card, out))
        assert done.returncode == 1, (done.returncode, done.stderr)  # -7 is SIGBUS
        assert f"not enough space to write the output {out}" in done.stderr
        assert ".partial-" not in done.stderr and "Traceback" not in done.stderr
        assert list(disk.iterdir()) == []
        # Once there is room, the same command works.
        bigger = subprocess.run(["mount", "-o", "remount,size=16m", str(disk)],
                                capture_output=True)
        if bigger.returncode == 0:
            assert run_cli(*explain_args(scan, card, out)).returncode == 0
            assert read_volume(out)[0].shape == (20, 128, 256)


# ----------------------------------------------------------------------------- 3: killed runs


def _wait_for(condition, process: subprocess.Popen, what: str, seconds: float = 90) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert process.poll() is None, process.stderr.read() if process.stderr else ""
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.mark.slow
def test_leftovers_of_a_sigkilled_run_are_reported_and_removed(card, tmp_path, capsys):
    big = write_tiff_volume(tmp_path / "big.tif", scan_volume((400, 64, 64), seed=1),
                            scale=SCALE)
    out = tmp_path / "maps.zarr"
    process = subprocess.Popen(
        [sys.executable, "-m", "napari_gradcam.cli", *explain_args(big, card, out)[:-1],
         "--batch-size", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=_env())
    try:
        _wait_for(lambda: any((partial / "0" / "0").exists()
                              for partial in tmp_path.glob("maps.zarr.partial-*")),
                  process, "the first chunk")
        process.send_signal(signal.SIGKILL)  # no handler runs, nothing is cleaned up
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    (leftover,) = tmp_path.glob("maps.zarr.partial-*")
    scan = write_tiff_volume(tmp_path / "scan.tif", scan_volume(), scale=SCALE)
    assert main(explain_args(scan, card, out)) == 0
    err = capsys.readouterr().err
    assert f"removed {leftover}" in err and f"process {process.pid} no longer runs" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.tif", "maps.zarr", "scan.tif"]


HOLDER = """
import sys, time
from napari_gradcam.io import open_output
with open_output(sys.argv[1], (4, 5, 6)) as output:
    output.array[:] = 1.0
    print(output.partial, flush=True)
    time.sleep(120)
"""


@pytest.mark.slow
def test_a_live_runs_partial_is_left_alone_until_its_process_is_gone(card, tmp_path, capsys):
    out = tmp_path / "maps.npy"
    process = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=_env())
    try:
        partial = Path(process.stdout.readline().strip())
        assert partial.name.startswith("maps.npy.partial-") and partial.is_file()
        scan = write_tiff_volume(tmp_path / "scan.tif", scan_volume(), scale=SCALE)
        assert main(explain_args(scan, card, out)) == 0
        err = capsys.readouterr().err
        assert f"{partial} is being written by another run (process {process.pid})" in err
        assert partial.is_file()  # the other run's data is still there
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert main(explain_args(scan, card, out, "--overwrite")) == 0
    assert f"removed {partial}" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["maps.npy", "maps.npy.json",
                                                          "scan.tif"]


def test_leftovers_that_cannot_be_attributed_are_reported_not_removed(tmp_path):
    out = tmp_path / "maps.zarr"
    foreign = tmp_path / "maps.zarr.partial-otherhost-12345-0123abcd"
    legacy = tmp_path / "maps.zarr.partial-89abcdef"
    unrelated = tmp_path / "maps.zarr.notes.txt"
    for path in (foreign, legacy, unrelated):
        path.write_text("x")
    messages = io.clean_stale_partials(out)
    assert any(str(foreign) in m and "otherhost" in m and "not removed" in m for m in messages)
    assert any(str(legacy) in m and "not removed" in m for m in messages)
    assert len(messages) == 2
    assert foreign.exists() and legacy.exists() and unrelated.exists()


# ----------------------------------------------------------------------------- 4: units

MICROMETERS = {"nm": 1e-3, "µm": 1.0, "um": 1.0, "micron": 1.0, "mm": 1e3, "Å": 1e-4,
               "m": 1e6}


@pytest.mark.parametrize("xy_unit", sorted(MICROMETERS))
def test_ome_tiff_axes_in_different_units_are_converted_to_micrometres(tmp_path, xy_unit):
    path = tmp_path / "scan.ome.tif"
    tifffile.imwrite(path, scan_volume(), ome=True, metadata={
        "axes": "ZYX", "PhysicalSizeZ": 1.0, "PhysicalSizeZUnit": "µm",
        "PhysicalSizeY": 65.0, "PhysicalSizeYUnit": xy_unit,
        "PhysicalSizeX": 65.0, "PhysicalSizeXUnit": xy_unit})
    _, info = read_volume(path)
    factor = MICROMETERS[xy_unit]
    assert info.scale == pytest.approx((1.0, 65.0 * factor, 65.0 * factor))
    assert info.unit == "micrometer"


def test_the_map_of_a_mixed_unit_ome_tiff_lands_on_its_scan(card, tmp_path):
    """Z 1 µm, X/Y 65 nm: the map must say (1.0, 0.065, 0.065) µm, not (1, 65, 65) µm."""
    scan = tmp_path / "scan.ome.tif"
    tifffile.imwrite(scan, scan_volume(), ome=True, metadata={
        "axes": "ZYX", "PhysicalSizeZ": 1.0, "PhysicalSizeZUnit": "µm",
        "PhysicalSizeY": 65.0, "PhysicalSizeYUnit": "nm",
        "PhysicalSizeX": 65.0, "PhysicalSizeXUnit": "nm"})
    assert main(explain_args(scan, card, tmp_path / "maps.zarr")) == 0
    _, info = read_volume(tmp_path / "maps.zarr")
    assert info.scale == pytest.approx((1.0, 0.065, 0.065)) and info.unit == "micrometer"
    assert info.metadata["options"]["voxel_size"] == pytest.approx([1.0, 0.065, 0.065])


def test_imagej_tiff_units_per_axis_are_converted(tmp_path):
    path = tmp_path / "imagej.tif"
    tifffile.imwrite(path, scan_volume(), imagej=True, resolution=(1 / 65, 1 / 65),
                     metadata={"axes": "ZYX", "spacing": 1.5, "unit": "nm", "zunit": "micron"})
    _, info = read_volume(path)
    assert info.scale == pytest.approx((1.5, 0.065, 0.065)) and info.unit == "micrometer"
    same = tmp_path / "nm.tif"
    tifffile.imwrite(same, scan_volume(), imagej=True, resolution=(1 / 65, 1 / 65),
                     metadata={"axes": "ZYX", "spacing": 1000, "unit": "nm"})
    assert read_volume(same)[1].scale == pytest.approx((1.0, 0.065, 0.065))


def test_ome_zarr_axes_in_different_units_are_converted(tmp_path):
    group = zarr.open_group(str(tmp_path / "mixed.zarr"), mode="w", zarr_format=2)
    group.create_array("0", shape=(4, 5, 6), dtype="f4")
    group.attrs["multiscales"] = [{
        "version": "0.4",
        "axes": [{"name": "z", "type": "space", "unit": "millimeter"},
                 {"name": "y", "type": "space", "unit": "nanometer"},
                 {"name": "x", "type": "space", "unit": "angstrom"}],
        "datasets": [{"path": "0", "coordinateTransformations": [
            {"type": "scale", "scale": [0.002, 650.0, 6500.0]}]}],
    }]
    _, info = read_volume(tmp_path / "mixed.zarr")
    assert info.scale == pytest.approx((2.0, 0.65, 0.65)) and info.unit == "micrometer"


def test_units_that_cannot_be_converted_are_refused_naming_the_axes(card, tmp_path, capsys):
    scan = tmp_path / "scan.ome.tif"
    tifffile.imwrite(scan, scan_volume(), ome=True, metadata={
        "axes": "ZYX", "PhysicalSizeZ": 1.0, "PhysicalSizeZUnit": "pixel",
        "PhysicalSizeY": 65.0, "PhysicalSizeYUnit": "nm",
        "PhysicalSizeX": 65.0, "PhysicalSizeXUnit": "nm"})
    with pytest.raises(ValueError, match="cannot be converted to one") as caught:
        read_volume(scan)
    assert "z 1 pixel, y 65 nm, x 65 nm" in str(caught.value) and str(scan) in str(caught.value)
    assert main(explain_args(scan, card, tmp_path / "maps.zarr")) == 2
    assert "z 1 pixel, y 65 nm, x 65 nm" in capsys.readouterr().err
    assert not (tmp_path / "maps.zarr").exists()


def test_one_unit_that_is_not_a_length_keeps_the_sizes():
    assert io.to_micrometers((1, 2, 3), ["pixel"] * 3, "zyx", "f") == ((1.0, 2.0, 3.0), None)
    assert io.to_micrometers((1, 2, 3), [None] * 3, "zyx", "f") == ((1.0, 2.0, 3.0), None)
    # An axis without a stated unit shares the others' (an OME-TIFF without PhysicalSizeZ).
    scale, unit = io.to_micrometers((1, 65, 65), [None, "nm", "nm"], "zyx", "f")
    assert scale == pytest.approx((1e-3, 0.065, 0.065)) and unit == "micrometer"
    assert io.normalize_unit("Mm") is None  # a megametre, not a millimetre


# ----------------------------------------------------------------------------- 5: messages


def test_a_read_only_output_folder_is_named_with_the_users_path(card, tmp_path, capsys):
    scan = write_tiff_volume(tmp_path / "scan.tif", scan_volume(), scale=SCALE)
    with mounted_tmpfs(tmp_path / "readonly", "ro,size=64k") as folder:
        for name in ("maps.zarr", "maps.tif", "maps.npy"):
            out = folder / name
            assert main(explain_args(scan, card, out)) == 2
            err = capsys.readouterr().err
            assert f"cannot write the output {out}: the folder {folder} is not writable" in err
            assert "read-only file system" in err and ".partial-" not in err
            with pytest.raises(PermissionError, match=f"cannot write the output {out}"):
                write_volume(out, np.zeros((2, 3, 4), np.float32))


@pytest.mark.parametrize("keep", [0.5, 0.9, 0.99])
def test_a_truncated_tiff_is_called_truncated(card, tmp_path, capsys, keep):
    whole = write_tiff_volume(tmp_path / "whole.tif", scan_volume(), scale=SCALE)
    data = whole.read_bytes()
    cut = tmp_path / "cut.tif"
    cut.write_bytes(data[:int(len(data) * keep)])
    with pytest.raises(ValueError, match="truncated or corrupt") as caught:
        read_volume(cut)
    assert str(cut) in str(caught.value) and "(2D)" not in str(caught.value)
    assert main(explain_args(cut, card, tmp_path / "maps.zarr")) == 2
    err = capsys.readouterr().err
    assert f"{cut} is truncated or corrupt" in err
    assert np.array_equal(read_volume(whole)[0], scan_volume())  # the whole file still reads


def test_a_truncated_ome_tiff_is_called_truncated(tmp_path):
    whole = tmp_path / "whole.ome.tif"
    tifffile.imwrite(whole, scan_volume(), ome=True, metadata={"axes": "ZYX"})
    cut = tmp_path / "cut.ome.tif"
    cut.write_bytes(whole.read_bytes()[:-100])  # the end holds the OME-XML's bytes
    with pytest.raises(ValueError, match=f"{cut} is truncated or corrupt"):
        read_volume(cut)


@pytest.mark.parametrize("value_range", ["abc", [0.0, "high"], [1.0], [True, False]])
def test_a_malformed_value_range_names_the_store_and_the_field(tmp_path, value_range):
    path = write_volume(tmp_path / "maps.zarr", np.zeros((2, 3, 4), np.float32),
                        attrs={"method": "gradcam", "value_range": value_range})
    reader = get_reader(str(path))
    assert reader is not None
    with pytest.raises(ValueError) as caught:
        reader(str(path))
    message = str(caught.value)
    assert str(path) in message and f"{ATTRS_KEY}.value_range" in message
    assert "two numbers" in message


def test_a_well_formed_value_range_still_sets_the_contrast(tmp_path):
    path = write_volume(tmp_path / "maps.zarr", np.ones((2, 3, 4), np.float32),
                        attrs={"method": "gradcam", "value_range": [0.25, 2.5]})
    ((_, kwargs, _),) = get_reader(str(path))(str(path))
    assert kwargs["contrast_limits"] == pytest.approx((0.25, 2.5))
