"""Volumes in and out: voxel sizes survive every format, bad files get clear errors, and an
output appears complete or not at all."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

from napari_gradcam import io
from napari_gradcam.io import ATTRS_KEY, VoxelInfo, read_volume, write_volume

SCALE = (2.0, 0.5, 0.25)


@pytest.fixture
def volume() -> np.ndarray:
    return np.random.default_rng(0).random((6, 7, 8)).astype(np.float32)


@pytest.mark.parametrize("name", ["maps.zarr", "maps.ome.zarr", "maps.tif", "maps.npy"])
def test_round_trip_keeps_data_scale_unit_and_provenance(tmp_path, volume, name):
    record = {"method": "gradcam", "layers": ["features.3"]}
    path = write_volume(tmp_path / name, volume, scale=SCALE, unit="µm", attrs=record)
    data, info = read_volume(path)
    np.testing.assert_array_equal(np.asarray(data[:]), volume)
    assert info.scale == SCALE
    assert info.unit == "micrometer"
    assert info.axes == "zyx"
    assert info.metadata == record
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [name] + ([name + ".json"] if name.endswith(".npy") else []))


def test_ome_zarr_metadata_follows_ngff_04(tmp_path, volume):
    path = write_volume(tmp_path / "maps.zarr", volume, scale=SCALE, unit="micrometer",
                        dtype="float16", chunks=(2, 7, 8), attrs={"method": "gradcam"})
    group = zarr.open_group(str(path), mode="r")
    assert group.metadata.zarr_format == 2
    (image,) = group.attrs["multiscales"]
    assert image["version"] == "0.4"
    assert [a["name"] for a in image["axes"]] == ["z", "y", "x"]
    assert all(a["type"] == "space" and a["unit"] == "micrometer" for a in image["axes"])
    (dataset,) = image["datasets"]
    assert dataset["coordinateTransformations"] == [{"type": "scale", "scale": list(SCALE)}]
    array = group[dataset["path"]]
    assert array.dtype == np.float16 and array.chunks == (2, 7, 8)
    np.testing.assert_allclose(array[:], volume, rtol=1e-3)
    assert group.attrs[ATTRS_KEY] == {"method": "gradcam"}
    # NGFF 0.4 chunk keys are nested ("/"), as other OME-Zarr readers expect.
    assert (path / "0" / "0" / "0" / "0").is_file()


def test_imagej_tiff_voxel_size_from_spacing_and_resolution(tmp_path, volume):
    path = tmp_path / "imagej.tif"
    tifffile.imwrite(path, volume, imagej=True, resolution=(1 / 0.65, 1 / 0.65),
                     metadata={"spacing": 1.5, "unit": "micron", "axes": "ZYX"})
    data, info = read_volume(path)
    np.testing.assert_array_equal(data, volume)
    assert info.scale == pytest.approx((1.5, 0.65, 0.65))
    assert info.unit == "micrometer"
    assert info.metadata == {}


def test_ome_tiff_physical_size(tmp_path, volume):
    path = tmp_path / "scan.ome.tif"
    tifffile.imwrite(path, volume, ome=True, metadata={
        "axes": "ZYX", "PhysicalSizeX": 0.3, "PhysicalSizeY": 0.4, "PhysicalSizeZ": 2.5,
        "PhysicalSizeXUnit": "µm", "PhysicalSizeYUnit": "µm", "PhysicalSizeZUnit": "µm"})
    _, info = read_volume(path)
    assert info.scale == pytest.approx((2.5, 0.4, 0.3))
    assert info.unit == "micrometer"


def test_plain_tiff_without_metadata_has_unit_voxels(tmp_path, volume):
    path = tmp_path / "plain.tif"
    tifffile.imwrite(path, volume)
    _, info = read_volume(path)
    assert info == VoxelInfo((1.0, 1.0, 1.0), None, "zyx", {})


def test_big_tiff_is_read_lazily(tmp_path, volume):
    path = io.write_tiff_volume(tmp_path / "raw.tif", (volume * 1000).astype(np.uint16),
                                scale=(1.0, 0.65, 0.65))
    data, info = read_volume(path, lazy=True)
    assert not isinstance(data, np.ndarray) or isinstance(data, np.memmap)
    assert data.dtype == np.uint16
    np.testing.assert_array_equal(np.asarray(data[2:4]), (volume[2:4] * 1000).astype(np.uint16))
    assert info.scale == pytest.approx((1.0, 0.65, 0.65))


def test_compressed_tiff_lazy_goes_through_zarr_store(tmp_path, volume):
    path = tmp_path / "compressed.tif"
    tifffile.imwrite(path, volume, compression="zlib")
    data, _ = read_volume(path, lazy=True)
    assert isinstance(data, zarr.Array)
    np.testing.assert_array_equal(data[1:3], volume[1:3])


def test_plain_zarr_array_and_5d_ome_zarr(tmp_path, volume):
    plain = zarr.open_array(str(tmp_path / "plain.zarr"), mode="w", shape=volume.shape,
                            dtype=volume.dtype)
    plain[:] = volume
    data, info = read_volume(tmp_path / "plain.zarr")
    np.testing.assert_array_equal(data[:], volume)
    assert info.scale == (1.0, 1.0, 1.0) and info.unit is None

    # An OME-Zarr from another tool: t, c, z, y, x with singleton t and c.
    group = zarr.open_group(str(tmp_path / "tczyx.zarr"), mode="w", zarr_format=2)
    array = group.create_array("s0", shape=(1, 1, *volume.shape), dtype=volume.dtype)
    array[:] = volume[None, None]
    group.attrs["multiscales"] = [{
        "version": "0.4",
        "axes": [{"name": "t", "type": "time"}, {"name": "c", "type": "channel"}] + [
            {"name": n, "type": "space", "unit": "nanometer"} for n in "zyx"],
        "datasets": [{"path": "s0", "coordinateTransformations": [
            {"type": "scale", "scale": [1.0, 1.0, 30.0, 10.0, 10.0]}]}],
    }]
    data, info = read_volume(tmp_path / "tczyx.zarr")
    assert data.shape == volume.shape
    np.testing.assert_array_equal(np.asarray(data), volume)
    assert info.scale == pytest.approx((0.030, 0.010, 0.010))  # every length in micrometres
    assert info.unit == "micrometer" and info.axes == "zyx"


def test_npy_is_memory_mapped_and_never_unpickled(tmp_path, volume):
    np.save(tmp_path / "v.npy", volume)
    data, info = read_volume(tmp_path / "v.npy")
    assert isinstance(data, np.memmap)
    assert info.scale == (1.0, 1.0, 1.0)
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="pickled code"):
        read_volume(tmp_path / "objects.npy")


# ----------------------------------------------------------------------------- bad input


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="input not found"):
        read_volume(tmp_path / "nothing.tif")


def test_not_3d(tmp_path):
    tifffile.imwrite(tmp_path / "image.tif", np.zeros((5, 5), np.uint8))
    with pytest.raises(ValueError, match=r"2D\) but a 3D volume"):
        read_volume(tmp_path / "image.tif")


def test_unsupported_extension(tmp_path):
    (tmp_path / "scan.png").write_bytes(b"\x89PNG")
    with pytest.raises(ValueError, match=r"unsupported file type: scan\.png"):
        read_volume(tmp_path / "scan.png")


@pytest.mark.parametrize("name, content", [("bad.tif", b"II*\x00garbage"),
                                           ("bad.npy", b"\x93NUMPY\x01\x00{'descr'")])
def test_corrupt_files(tmp_path, name, content):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError, match="not a readable"):
        read_volume(tmp_path / name)


def test_folder_that_is_not_zarr(tmp_path):
    (tmp_path / "empty.zarr").mkdir()
    with pytest.raises(ValueError, match="not a readable zarr store"):
        read_volume(tmp_path / "empty.zarr")


def test_zarr_group_without_multiscales_and_two_arrays(tmp_path):
    group = zarr.open_group(str(tmp_path / "g.zarr"), mode="w")
    group.create_array("a", shape=(2, 2, 2), dtype="f4")
    group.create_array("b", shape=(2, 2, 2), dtype="f4")
    with pytest.raises(ValueError, match=r"without OME-Zarr 'multiscales'.*2 arrays"):
        read_volume(tmp_path / "g.zarr")


def test_bad_output_names_and_dtypes(tmp_path, volume):
    with pytest.raises(ValueError, match="cannot tell the output format"):
        write_volume(tmp_path / "maps.h5", volume)
    with pytest.raises(FileNotFoundError, match="output folder"):
        write_volume(tmp_path / "missing" / "maps.zarr", volume)
    with pytest.raises(ValueError, match="float32 or float16"):
        write_volume(tmp_path / "maps.zarr", volume, dtype="int8")
    with pytest.raises(ValueError, match="ImageJ TIFF stores float32 only"):
        write_volume(tmp_path / "maps.tif", volume, dtype="float16")
    with pytest.raises(ValueError, match="3D volumes"):
        write_volume(tmp_path / "maps.zarr", volume[0])
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- atomic writes


@pytest.mark.parametrize("name", ["maps.zarr", "maps.tif", "maps.npy"])
@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_failed_write_leaves_nothing(tmp_path, name, error):
    with pytest.raises(error), io.open_output(tmp_path / name, (4, 5, 6),
                                              attrs={"a": 1}) as output:
        output.array[:2] = 1.0
        assert output.partial.exists() and output.partial.name.startswith(name + ".partial-")
        raise error("stopped half way")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_refused_then_replaced_only_on_success(tmp_path, volume):
    path = write_volume(tmp_path / "maps.zarr", volume, attrs={"run": 1})
    with pytest.raises(FileExistsError, match="--overwrite"):
        write_volume(path, volume * 2)
    with pytest.raises(RuntimeError), io.open_output(path, volume.shape, attrs={"run": 2},
                                                     overwrite=True) as output:
        output.array[:] = 7.0
        raise RuntimeError("crash before the end")
    assert io.read_attrs(path) == {"run": 1}  # the old result survived the failed rerun
    write_volume(path, volume * 2, attrs={"run": 3}, overwrite=True)
    data, info = read_volume(path)
    np.testing.assert_array_equal(data[:], volume * 2)
    assert info.metadata == {"run": 3}
    assert [p.name for p in tmp_path.iterdir()] == ["maps.zarr"]


def test_update_attrs_before_commit_is_kept(tmp_path):
    with io.open_output(tmp_path / "maps.npy", (2, 3, 4), scale=(1, 2, 3),
                        attrs={"method": "gradcam"}) as output:
        output.array[:] = 1
        output.update_attrs({"value_range": (0.0, 1.0)})
    sidecar = json.loads((tmp_path / "maps.npy.json").read_text())
    assert sidecar["scale"] == [1.0, 2.0, 3.0]
    assert sidecar[ATTRS_KEY] == {"method": "gradcam", "value_range": [0.0, 1.0]}


def test_unit_names_are_normalised():
    assert io.normalize_unit("um") == io.normalize_unit("µm") == "micrometer"
    assert io.normalize_unit("\\u00B5m") == "micrometer"
    assert io.normalize_unit("nm") == "nanometer"
    assert io.normalize_unit("pixel") is None
    assert io.normalize_unit(None) is None


def test_output_path_is_checked_before_work(tmp_path):
    (tmp_path / "done.zarr").mkdir()
    with pytest.raises(FileExistsError):
        io.check_output_path(tmp_path / "done.zarr")
    assert io.check_output_path(tmp_path / "done.zarr", overwrite=True) == Path(
        tmp_path / "done.zarr")


def test_npy_sidecar_is_published_only_with_its_data(tmp_path, volume):
    """If the output name is taken while writing, neither the data nor a stray sidecar that
    describes it may appear under the output name."""
    from napari_gradcam.io import open_output

    target = tmp_path / "maps.npy"
    with pytest.raises(FileExistsError, match="appeared while writing"):  # noqa: SIM117
        with open_output(target, volume.shape, scale=SCALE, attrs={"method": "gradcam"}) as out:
            out.array[:] = volume
            np.save(target, np.zeros(3))  # someone else writes the same name meanwhile
    assert np.load(target).shape == (3,)  # theirs is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["maps.npy"]
