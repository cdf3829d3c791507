"""Files both ways through a real napari viewer: TIFF stacks keep their voxel size and origin,
OME-Zarr maps open as maps, plain OME-Zarr images as grey images with scale and translation,
and a saved layer reads back as it was.

Every file is written by tifffile or zarr themselves (the way ImageJ, Bio-Formats or another
tool would have written it), not by the code under test, except for the round trips."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

from napari_gradcam.display import MAP_BLENDING, MAP_COLORMAP
from napari_gradcam.io import ATTRS_KEY, read_volume, write_volume
from napari_gradcam.placement import ngff_translation, set_ngff_translation

PLUGIN = "napari-gradcam"
RECORD = {"method": "gradcam", "layers": ["features.3"], "target": "crack",
          "model": "ct-patch-classifier", "value_range": [0.0, 2.5]}


def scan(shape=(6, 10, 12), seed=0) -> np.ndarray:
    return (np.random.default_rng(seed).random(shape) * 4000).astype(np.uint16)


def imagej_tiff(path: Path, data: np.ndarray, *, spacing: float, pixel: float, unit: str,
                **extra: object) -> Path:
    """An ImageJ hyperstack as ImageJ writes it: pixels per unit in X/YResolution, the z step
    in ``spacing``, the unit in ``unit`` (and anything else ImageJ's Calibration keeps)."""
    tifffile.imwrite(path, data, imagej=True, resolution=(1.0 / pixel, 1.0 / pixel),
                     metadata={"axes": "ZYX", "spacing": spacing, "unit": unit, **extra})
    return path


def ome_zarr(path: Path, data: np.ndarray, *, levels: list[list[dict]],
             top: list[dict] | None = None, unit: str = "micrometer",
             attrs: dict | None = None) -> Path:
    """An OME-Zarr image with one dataset per entry of ``levels`` (each its transformations;
    level k holds ``data`` subsampled by 2**k), written with zarr itself."""
    group = zarr.open_group(str(path), mode="w", zarr_format=2)
    datasets = []
    for index, transformations in enumerate(levels):
        step = 2 ** index
        level = data[:, ::step, ::step]
        group.create_array(str(index), shape=level.shape, dtype=level.dtype)[:] = level
        datasets.append({"path": str(index), "coordinateTransformations": transformations})
    image = {"version": "0.4", "name": path.stem, "datasets": datasets,
             "axes": [{"name": n, "type": "space", "unit": unit} for n in "zyx"]}
    if top:
        image["coordinateTransformations"] = top
    group.attrs["multiscales"] = [image]
    for key, value in (attrs or {}).items():
        group.attrs[key] = value
    return path


# ----------------------------------------------------------------------------- TIFF in


@pytest.mark.gui
def test_an_imagej_stack_opens_at_its_voxel_size_and_origin(tmp_path, make_napari_viewer):
    volume = scan()
    path = imagej_tiff(tmp_path / "scan.tif", volume, spacing=2.0, pixel=0.65, unit="micron",
                       xorigin=-10.0, yorigin=0.0, zorigin=-3.0)
    viewer = make_napari_viewer()
    (layer,) = viewer.open(path, plugin=PLUGIN)
    np.testing.assert_array_equal(np.asarray(layer.data), volume)
    assert tuple(layer.scale) == pytest.approx((2.0, 0.65, 0.65))
    # ImageJ: calibrated x = (pixel - xorigin) * pixelWidth, so pixel 0 sits at 10 * 0.65 µm.
    assert tuple(layer.translate) == pytest.approx((6.0, 0.0, 6.5))
    assert [str(u) for u in layer.units] == ["micrometer"] * 3
    assert tuple(layer.axis_labels) == ("z", "y", "x")
    assert layer.colormap.name == "gray"


@pytest.mark.gui
def test_an_imagej_stack_in_nanometres_comes_in_micrometres(tmp_path, make_napari_viewer):
    path = imagej_tiff(tmp_path / "nano.tif", scan(), spacing=500.0, pixel=250.0, unit="nm")
    (layer,) = make_napari_viewer().open(path, plugin=PLUGIN)
    assert tuple(layer.scale) == pytest.approx((0.5, 0.25, 0.25))
    assert str(layer.units[0]) == "micrometer"


@pytest.mark.gui
def test_an_ome_tiff_keeps_physical_sizes_units_and_plane_position(tmp_path,
                                                                   make_napari_viewer):
    volume = scan()
    path = tmp_path / "scan.ome.tif"
    planes = volume.shape[0]
    tifffile.imwrite(path, volume, ome=True, photometric="minisblack", metadata={
        "axes": "ZYX", "PhysicalSizeX": 650.0, "PhysicalSizeXUnit": "nm",
        "PhysicalSizeY": 650.0, "PhysicalSizeYUnit": "nm",
        "PhysicalSizeZ": 2.0, "PhysicalSizeZUnit": "µm",
        "Plane": {"PositionX": [0.5] * planes, "PositionXUnit": ["mm"] * planes,
                  "PositionY": [20.0] * planes, "PositionYUnit": ["µm"] * planes,
                  "PositionZ": [4.0 + 2.0 * z for z in range(planes)],
                  "PositionZUnit": ["µm"] * planes}})
    (layer,) = make_napari_viewer().open(path, plugin=PLUGIN)
    np.testing.assert_array_equal(np.asarray(layer.data), volume)
    assert tuple(layer.scale) == pytest.approx((2.0, 0.65, 0.65))
    assert tuple(layer.translate) == pytest.approx((4.0, 20.0, 500.0))
    assert tuple(layer.axis_labels) == ("z", "y", "x")


@pytest.mark.gui
def test_a_labels_companion_opens_as_labels_on_the_same_grid(tmp_path, make_napari_viewer):
    labels = np.zeros((6, 10, 12), np.uint8)
    labels[2:4, 3:6, 4:8] = 2
    path = imagej_tiff(tmp_path / "scan_labels.tif", labels, spacing=2.0, pixel=0.65,
                       unit="micron")
    (layer,) = make_napari_viewer().open(path, plugin=PLUGIN)
    assert layer._type_string == "labels"
    np.testing.assert_array_equal(np.asarray(layer.data), labels)
    assert tuple(layer.scale) == pytest.approx((2.0, 0.65, 0.65))


@pytest.mark.gui
def test_a_float_file_named_labels_is_still_an_image(tmp_path, make_napari_viewer):
    path = imagej_tiff(tmp_path / "prob_labels.tif", scan().astype(np.float32), spacing=1.0,
                       pixel=1.0, unit="micron")
    (layer,) = make_napari_viewer().open(path, plugin=PLUGIN)
    assert layer._type_string == "image"


@pytest.mark.gui
def test_a_tiff_without_voxel_size_is_taken_at_scale_one(tmp_path, make_napari_viewer):
    """Our TIFF reader does not decline files without metadata (see _reader's docstring)."""
    path = tmp_path / "bare.tif"
    tifffile.imwrite(path, scan(), photometric="minisblack")
    (layer,) = make_napari_viewer().open(path, plugin=PLUGIN)
    assert tuple(layer.scale) == (1.0, 1.0, 1.0)
    assert tuple(layer.translate) == (0.0, 0.0, 0.0)


@pytest.mark.gui
def test_plain_open_of_a_tiff_offers_our_reader_and_a_preference_picks_it(tmp_path,
                                                                          make_napari_viewer):
    """`napari scan.tif` and drag and drop open with ``plugin=None`` (``viewer.open``'s own
    default is napari's builtins): two readers match, so napari asks (the GUI shows its reader
    dialog, with 'remember my choice'); with the preference napari-gradcam, the voxel size
    is kept."""
    from napari.errors import MultipleReaderError
    from napari.settings import get_settings

    path = imagej_tiff(tmp_path / "scan.tif", scan(), spacing=2.0, pixel=0.65, unit="micron")
    viewer = make_napari_viewer()
    with pytest.raises(MultipleReaderError) as offered:
        viewer.open(path, plugin=None)
    assert PLUGIN in offered.value.available_plugins
    assert "napari" in offered.value.available_plugins
    preferences = get_settings().plugins
    before = dict(preferences.extension2reader)
    try:
        preferences.extension2reader = {**before, "*.tif": PLUGIN}
        (layer,) = viewer.open(path, plugin=None)
    finally:
        preferences.extension2reader = before
    assert tuple(layer.scale) == pytest.approx((2.0, 0.65, 0.65))


# ----------------------------------------------------------------------------- OME-Zarr in


@pytest.mark.gui
def test_our_map_opens_as_a_map_over_its_scan(tmp_path, make_napari_viewer):
    maps = np.linspace(0.0, 2.5, 6 * 10 * 12, dtype=np.float32).reshape(6, 10, 12)
    path = write_volume(tmp_path / "maps.zarr", maps, scale=(2.0, 0.65, 0.65), attrs=RECORD)
    scan_path = imagej_tiff(tmp_path / "scan.tif", scan(), spacing=2.0, pixel=0.65,
                            unit="micron")
    viewer = make_napari_viewer()
    (ct,) = viewer.open(scan_path, plugin=PLUGIN)
    (layer,) = viewer.open(path, plugin=PLUGIN)
    np.testing.assert_array_equal(np.asarray(layer.data), maps)
    assert layer.colormap.name == MAP_COLORMAP and layer.blending == MAP_BLENDING
    assert tuple(layer.contrast_limits) == pytest.approx((0.0, 2.5))
    assert layer.metadata[ATTRS_KEY]["target"] == "crack"
    assert tuple(layer.scale) == pytest.approx(tuple(ct.scale))
    assert layer.extent.world == pytest.approx(ct.extent.world)
    assert [str(u) for u in layer.units] == ["micrometer"] * 3


@pytest.mark.gui
def test_the_readme_command_puts_the_map_on_the_scan(tmp_path, make_napari_viewer):
    """`napari --plugin napari-gradcam scan.tif maps.zarr`: both files through our readers
    (what napari's command line does with them), the map on the scan's grid."""
    scan_path = imagej_tiff(tmp_path / "scan.tif", scan(), spacing=2.0, pixel=0.65,
                            unit="micron")
    maps = write_volume(tmp_path / "maps.zarr", np.ones((6, 10, 12), np.float32),
                        scale=(2.0, 0.65, 0.65), attrs=RECORD)
    viewer = make_napari_viewer()
    ct, cam = viewer.open([str(scan_path), str(maps)], plugin=PLUGIN, stack=False)
    assert ct.colormap.name == "gray" and cam.colormap.name == MAP_COLORMAP
    assert cam.extent.world == pytest.approx(ct.extent.world)
    assert viewer.layers[0].name == "scan"


#: Run by a separate Python: the `napari` command's own entry point (napari.__main__.main, what
#: the console script calls) with the README's arguments. A timer polls until the command has
#: opened one layer per file (Qt runs timers while napari still builds the window), lists
#: them once the window is shown (the command has done all it does before its event loop) and
#: closes the viewer, which ends the command.
_NAPARI_COMMAND_LINE = textwrap.dedent("""
    import json, sys, time
    import napari
    from napari.__main__ import main
    from napari.qt import get_qapp
    from qtpy.QtCore import QTimer

    files, started = len(sys.argv) - 3, time.monotonic()

    def report():
        viewer = napari.current_viewer()
        shown = any(widget.isVisible() and widget.inherits("QMainWindow")
                    for widget in get_qapp().topLevelWidgets())
        if (viewer is None or len(viewer.layers) < files or not shown) and (
                time.monotonic() - started < 300):
            QTimer.singleShot(200, report)
            return
        print(json.dumps([{
            "name": layer.name, "type": type(layer).__name__, "colormap": layer.colormap.name,
            "blending": layer.blending, "scale": list(map(float, layer.scale)),
            "world": [list(map(float, row)) for row in layer.extent.world],
            "units": [str(unit) for unit in layer.units],
            "contrast_limits": list(map(float, layer.contrast_limits))}
            for layer in viewer.layers]), flush=True)
        viewer.close()
        get_qapp().quit()

    sys.argv = ["napari", *sys.argv[1:]]
    get_qapp()
    QTimer.singleShot(200, report)
    main()
""")


@pytest.mark.gui
def test_the_readme_command_line_opens_the_map_as_an_overlay_on_the_scan(tmp_path):
    """`napari --plugin napari-gradcam scan.tif maps.zarr` exactly as the `napari` command runs
    it (its argument parsing and its way of opening files, in a process of its own with fresh
    settings): the scan grey at its voxel size, the map above it in the map colormap, added,
    with the recorded range, on the same grid in micrometres."""
    scan_path = imagej_tiff(tmp_path / "scan.tif", scan(), spacing=2.0, pixel=0.65,
                            unit="micron")
    maps = write_volume(tmp_path / "maps.zarr",
                        np.linspace(0, 2.5, 720, dtype=np.float32).reshape(6, 10, 12),
                        scale=(2.0, 0.65, 0.65), attrs=RECORD)
    env = {**os.environ, "NAPARI_CONFIG": str(tmp_path / "settings.yaml")}
    done = subprocess.run([sys.executable, "-c", _NAPARI_COMMAND_LINE, "--plugin", PLUGIN,
                           str(scan_path), str(maps)], capture_output=True, text=True,
                          timeout=600, env=env, cwd=tmp_path, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    ct, cam = json.loads(done.stdout.strip().splitlines()[-1])
    assert (ct["name"], ct["type"], ct["colormap"]) == ("scan", "Image", "gray")
    assert ct["scale"] == pytest.approx([2.0, 0.65, 0.65])
    assert (cam["colormap"], cam["blending"]) == (MAP_COLORMAP, MAP_BLENDING)
    assert cam["contrast_limits"] == pytest.approx([0.0, 2.5])
    assert cam["name"].startswith("maps") and "gradcam" in cam["name"]
    np.testing.assert_allclose(cam["world"], ct["world"])
    assert ct["units"] == cam["units"] == ["micrometer"] * 3


@pytest.mark.gui
def test_the_map_colormap_adds_nothing_where_the_map_is_zero(tmp_path, make_napari_viewer):
    """Additive blending adds the colour of a zero CAM to the scan: it must be black."""
    path = write_volume(tmp_path / "maps.zarr", np.zeros((2, 3, 4), np.float32), attrs=RECORD)
    (layer,) = make_napari_viewer().open(path, plugin=PLUGIN)
    assert layer.colormap.map(np.array([0.0]))[0, :3] == pytest.approx((0.0, 0.0, 0.0))
    top = layer.colormap.map(np.array([1.0]))[0, :3]
    assert top.max() == pytest.approx(1.0)


@pytest.mark.gui
def test_a_plain_ome_zarr_opens_grey_with_scale_translation_and_its_pyramid(
        tmp_path, make_napari_viewer):
    volume = scan((4, 16, 16))
    path = ome_zarr(tmp_path / "other.ome.zarr", volume, unit="millimeter", levels=[
        [{"type": "scale", "scale": [0.002, 0.001, 0.001]},
         {"type": "translation", "translation": [0.01, 0.02, 0.03]}],
        [{"type": "scale", "scale": [0.002, 0.002, 0.002]},
         {"type": "translation", "translation": [0.01, 0.0205, 0.0305]}],
    ], top=[{"type": "scale", "scale": [2.0, 1.0, 1.0]},
            {"type": "translation", "translation": [1.0, 0.0, 0.0]}])
    (layer,) = make_napari_viewer().open(path, plugin=PLUGIN)
    assert layer.colormap.name == "gray" and layer.blending != "additive"
    assert layer.multiscale and len(layer.data) == 2
    np.testing.assert_array_equal(np.asarray(layer.data[0]), volume)
    # level 0 (µm): scale 2 * [2, 1, 1]; origin 2 * 10 + 1000 (z), 20, 30
    assert tuple(layer.scale) == pytest.approx((4.0, 1.0, 1.0))
    assert tuple(layer.translate) == pytest.approx((1020.0, 20.0, 30.0))
    assert ATTRS_KEY not in layer.metadata


# ----------------------------------------------------------------------------- out and back


@pytest.mark.parametrize("name", ["maps.zarr", "maps.ome.zarr", "maps.tif", "maps.ome.tif"])
@pytest.mark.gui
def test_a_saved_map_layer_reads_back_as_it_was(tmp_path, make_napari_viewer, name):
    viewer = make_napari_viewer()
    maps = np.random.default_rng(1).random((5, 9, 11)).astype(np.float32)
    layer = viewer.add_image(maps, name="cam", scale=(2.0, 0.65, 0.65),
                             translate=(10.0, -3.25, 6.5), units=("micrometer",) * 3,
                             axis_labels=("z", "y", "x"), colormap=MAP_COLORMAP,
                             blending=MAP_BLENDING, metadata={ATTRS_KEY: dict(RECORD)})
    path = tmp_path / name
    written = layer.save(str(path), plugin=PLUGIN)
    assert [Path(p) for p in written] == [path] and path.exists()
    (back,) = viewer.open(path, plugin=PLUGIN)
    np.testing.assert_array_equal(np.asarray(back.data), maps)
    assert tuple(back.scale) == pytest.approx(tuple(layer.scale))
    assert tuple(back.translate) == pytest.approx(tuple(layer.translate))
    assert [str(u) for u in back.units] == ["micrometer"] * 3
    assert back.metadata[ATTRS_KEY] == RECORD
    assert back.colormap.name == MAP_COLORMAP and back.blending == MAP_BLENDING
    assert back.extent.world == pytest.approx(layer.extent.world)


@pytest.mark.gui
def test_a_saved_plain_image_in_millimetres_reads_back_in_micrometres(tmp_path,
                                                                      make_napari_viewer):
    viewer = make_napari_viewer()
    volume = scan()
    layer = viewer.add_image(volume, scale=(0.002, 0.001, 0.001), translate=(0.0, 0.5, 0.0),
                             units=("millimeter",) * 3, contrast_limits=(100, 3000))
    path = tmp_path / "scan.ome.zarr"
    layer.save(str(path), plugin=PLUGIN)
    (back,) = viewer.open(path, plugin=PLUGIN)
    np.testing.assert_array_equal(np.asarray(back.data), volume)
    assert back.data.dtype == np.uint16
    assert tuple(back.scale) == pytest.approx((2.0, 1.0, 1.0))
    assert tuple(back.translate) == pytest.approx((0.0, 500.0, 0.0))
    assert tuple(back.contrast_limits) == pytest.approx((100, 3000))
    assert back.colormap.name == "gray" and ATTRS_KEY not in back.metadata
    np.testing.assert_allclose(back.extent.world, layer.extent.world * 1000)


@pytest.mark.gui
def test_saving_never_leaves_half_a_file_and_names_bad_formats(tmp_path, make_napari_viewer):
    from napari_gradcam._writer import write_image

    with pytest.raises(ValueError, match=r"maps\.png"):
        write_image(str(tmp_path / "maps.png"), np.zeros((2, 3, 4), np.float32), {})
    assert list(tmp_path.iterdir()) == []


def test_a_four_d_layer_saves_as_ome_tiff_and_an_imagej_tiff_says_why_not(tmp_path):
    """ImageJ hyperstacks are TZCYX; a (C, Z, Y, X) layer (napari's default axis names for 4D)
    cannot be written there without moving its axes: the writer says so and writes nothing,
    and the OME-TIFF it points to keeps the layer as it is."""
    from napari_gradcam._writer import write_image

    data = np.random.default_rng(0).random((2, 3, 4, 5)).astype(np.float32)
    with pytest.raises(ValueError, match=r"ImageJ.*ZCYX.*CZYX.*\.ome\.tif"):
        write_image(str(tmp_path / "maps.tif"), data, {})
    assert list(tmp_path.iterdir()) == []
    written = write_image(str(tmp_path / "maps.ome.tif"), data, {})
    assert written and Path(written[0]).exists()
    import tifffile

    np.testing.assert_array_equal(tifffile.imread(written[0]), data)


# ----------------------------------------------------------------------------- translation


@pytest.mark.gui
def test_a_map_of_a_cropped_ome_zarr_lands_where_the_crop_came_from(tmp_path,
                                                                    make_napari_viewer):
    """A crop keeps its place in the full scan as an NGFF translation; the map written for it
    gets the same translation (set_ngff_translation, what the explain command does with the
    input's ngff_translation), and the reader puts the map exactly on the crop."""
    crop = ome_zarr(tmp_path / "crop.ome.zarr", scan((4, 8, 8)), levels=[[
        {"type": "scale", "scale": [2.0, 0.65, 0.65]},
        {"type": "translation", "translation": [40.0, 13.0, 26.0]}]])
    volume, voxel = read_volume(crop)
    origin = ngff_translation(crop, 3)
    assert origin == pytest.approx((40.0, 13.0, 26.0))
    maps_path = write_volume(tmp_path / "maps.zarr", np.ones(volume.shape, np.float32),
                             scale=voxel.scale, attrs=RECORD)
    set_ngff_translation(maps_path, origin)
    assert ngff_translation(maps_path, 3) == pytest.approx(origin)
    viewer = make_napari_viewer()
    (ct,) = viewer.open(crop, plugin=PLUGIN)
    (cam,) = viewer.open(maps_path, plugin=PLUGIN)
    assert tuple(ct.translate) == pytest.approx((40.0, 13.0, 26.0))
    assert tuple(cam.translate) == pytest.approx(tuple(ct.translate))
    assert cam.extent.world == pytest.approx(ct.extent.world)
    # and saved again from napari, the map keeps it
    again = tmp_path / "again.zarr"
    cam.save(str(again), plugin=PLUGIN)
    assert ngff_translation(again, 3) == pytest.approx(origin)
    attrs = json.loads((again / ".zattrs").read_text())
    assert attrs[ATTRS_KEY]["method"] == "gradcam"


def test_the_origin_a_map_must_carry_is_read_from_every_input_kind(tmp_path):
    """input_origin: what the explain command copies to its map (same unit as the scale)."""
    from napari_gradcam.placement import input_origin

    tiff = imagej_tiff(tmp_path / "scan.tif", scan(), spacing=2.0, pixel=0.5, unit="micron",
                       xorigin=-4.0, yorigin=-2.0)
    assert input_origin(tiff) == pytest.approx((0.0, 1.0, 2.0))
    crop = ome_zarr(tmp_path / "crop.ome.zarr", scan(), unit="nanometer", levels=[[
        {"type": "scale", "scale": [1.0, 1.0, 1.0]},
        {"type": "translation", "translation": [1000.0, 2000.0, 3000.0]}]])
    assert input_origin(crop) == pytest.approx((1.0, 2.0, 3.0))
    npy = tmp_path / "scan.npy"
    np.save(npy, scan())
    assert input_origin(npy) == (0.0, 0.0, 0.0)


@pytest.mark.gui
def test_a_two_channel_ome_zarr_opens_whole_with_its_space_scale(tmp_path, make_napari_viewer):
    """read_volume refuses several channels (a model explains one); the viewer still shows
    such a store, scaling only its space axes."""
    data = scan((2, 4, 6, 6))
    group = zarr.open_group(str(tmp_path / "two.ome.zarr"), mode="w", zarr_format=2)
    group.create_array("0", shape=data.shape, dtype=data.dtype)[:] = data
    group.attrs["multiscales"] = [{"version": "0.4", "datasets": [{"path": "0",
        "coordinateTransformations": [{"type": "scale", "scale": [1.0, 0.004, 0.001, 0.001]}]}],
        "axes": [{"name": "c", "type": "channel"}] + [
            {"name": n, "type": "space", "unit": "millimeter"} for n in "zyx"]}]
    with pytest.raises(ValueError, match="single channel"):
        read_volume(tmp_path / "two.ome.zarr")
    (layer,) = make_napari_viewer().open(tmp_path / "two.ome.zarr", plugin=PLUGIN)
    np.testing.assert_array_equal(np.asarray(layer.data), data)
    assert tuple(layer.scale) == pytest.approx((1.0, 4.0, 1.0, 1.0))
    assert tuple(layer.axis_labels) == ("c", "z", "y", "x")
    assert [str(u) for u in layer.units] == ["pixel"] + ["micrometer"] * 3


# ----------------------------------------------------------------------------- declared voxel size


def test_declared_scale_of_an_imagej_stack_is_its_calibration_in_micrometres(tmp_path):
    from napari_gradcam._reader import declared_scale

    microns = imagej_tiff(tmp_path / "scan.tif", scan(), spacing=2.0, pixel=0.65, unit="micron")
    assert declared_scale(microns) == (pytest.approx((2.0, 0.65, 0.65)), ("micrometer",) * 3)
    nanometres = imagej_tiff(tmp_path / "nm.tif", scan(), spacing=500.0, pixel=250.0,
                             unit="nm")
    scale, units = declared_scale(nanometres)
    assert scale == pytest.approx((0.5, 0.25, 0.25)) and units == ("micrometer",) * 3


def test_declared_scale_of_an_ome_tiff_converts_each_axis_unit(tmp_path):
    from napari_gradcam._reader import declared_scale

    path = tmp_path / "scan.ome.tif"
    tifffile.imwrite(path, scan(), ome=True, photometric="minisblack", metadata={
        "axes": "ZYX", "PhysicalSizeX": 650.0, "PhysicalSizeXUnit": "nm",
        "PhysicalSizeY": 0.00065, "PhysicalSizeYUnit": "mm",
        "PhysicalSizeZ": 2.0, "PhysicalSizeZUnit": "µm"})
    scale, units = declared_scale(path)
    assert scale == pytest.approx((2.0, 0.65, 0.65)) and units == ("micrometer",) * 3


def test_declared_scale_of_an_ome_zarr_has_every_axis_of_its_full_resolution_array(tmp_path):
    """napari's built-in reader keeps the singleton t and c axes of a TCZYX store (a 5D layer):
    the declared scale has five entries, the space ones converted from millimetres."""
    from napari_gradcam._reader import declared_scale

    data = scan((1, 1, 4, 6, 6))
    group = zarr.open_group(str(tmp_path / "tczyx.ome.zarr"), mode="w", zarr_format=2)
    group.create_array("0", shape=data.shape, dtype=data.dtype)[:] = data
    group.attrs["multiscales"] = [{"version": "0.4", "datasets": [{"path": "0",
        "coordinateTransformations": [{"type": "scale",
                                       "scale": [1.0, 1.0, 0.002, 0.0005, 0.0005]}]}],
        "axes": [{"name": "t", "type": "time"}, {"name": "c", "type": "channel"}] + [
            {"name": n, "type": "space", "unit": "millimeter"} for n in "zyx"]}]
    scale, units = declared_scale(tmp_path / "tczyx.ome.zarr")
    assert scale == pytest.approx((1.0, 1.0, 2.0, 0.5, 0.5))
    assert units == ("pixel", "pixel") + ("micrometer",) * 3
    three_d = ome_zarr(tmp_path / "zyx.ome.zarr", scan(), unit="nanometer", levels=[[
        {"type": "scale", "scale": [2000.0, 650.0, 650.0]}]])
    scale, units = declared_scale(three_d)
    assert scale == pytest.approx((2.0, 0.65, 0.65)) and units == ("micrometer",) * 3


def test_declared_scale_is_none_where_the_file_declares_nothing(tmp_path):
    from napari_gradcam._reader import declared_scale

    tifffile.imwrite(tmp_path / "plain.tif", scan())
    zarr.open_array(str(tmp_path / "plain.zarr"), mode="w", shape=(4, 6, 6), dtype="uint16",
                    zarr_format=2)[:] = 1
    (tmp_path / "notes.txt").write_text("0.65 micron")
    assert declared_scale(tmp_path / "plain.tif") is None
    assert declared_scale(tmp_path / "plain.zarr") is None
    assert declared_scale(tmp_path / "notes.txt") is None
    assert declared_scale(tmp_path / "missing.tif") is None
    bad = imagej_tiff(tmp_path / "bad.tif", scan(), spacing=2.0, pixel=0.65, unit="micron",
                      zunit="pixel")
    with pytest.raises(ValueError, match=r"bad\.tif"):
        declared_scale(bad)


@pytest.mark.gui
def test_declared_scale_fits_the_layers_napari_builtin_reader_makes(tmp_path,
                                                                    make_napari_viewer):
    """What the widget will offer: the built-in reader's layer sits at scale 1; the declared
    scale has one entry per axis of that layer and, applied, puts it where our reader does."""
    from napari_gradcam._reader import declared_scale

    tiff = imagej_tiff(tmp_path / "scan.tif", scan(), spacing=2.0, pixel=0.65, unit="micron")
    store = ome_zarr(tmp_path / "scan.ome.zarr", scan(), levels=[
        [{"type": "scale", "scale": [2.0, 0.65, 0.65]}],
        [{"type": "scale", "scale": [2.0, 1.3, 1.3]}]])
    viewer = make_napari_viewer()
    for path in (tiff, store):
        (builtin,) = viewer.open(path, plugin="napari")
        (ours,) = viewer.open(path, plugin=PLUGIN)
        assert tuple(builtin.scale) == (1.0,) * builtin.ndim
        scale, units = declared_scale(path)
        assert len(scale) == len(units) == builtin.ndim
        builtin.scale, builtin.units = scale, units
        assert tuple(builtin.scale) == pytest.approx(tuple(ours.scale))
        assert [str(u) for u in builtin.units] == [str(u) for u in ours.units]
        assert builtin.extent.world[1] - builtin.extent.world[0] == pytest.approx(
            ours.extent.world[1] - ours.extent.world[0])
