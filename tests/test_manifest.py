"""The installed package announces a valid npe2 manifest that napari can find, and every
command in it points at a real, importable callable."""

from __future__ import annotations

import importlib
from importlib import metadata
from pathlib import Path

import pytest
from npe2 import PluginManifest

import napari_gradcam


def _shipped_manifest() -> PluginManifest:
    return PluginManifest.from_file(Path(napari_gradcam.__file__).with_name("napari.yaml"))


def test_the_entry_point_announces_the_manifest_inside_the_package():
    entry_points = metadata.entry_points(group="napari.manifest")
    ours = [ep for ep in entry_points if ep.name == "napari-gradcam"]
    if not ours:
        pytest.fail("napari-gradcam is not installed with its napari.manifest entry point; "
                    "run the set-up (pip install -e .)")
    assert ours[0].value == "napari_gradcam:napari.yaml"
    manifest = PluginManifest.from_distribution("napari-gradcam")
    assert manifest.name == "napari-gradcam"


def test_the_top_level_manifest_is_the_packaged_one():
    top_level = Path(__file__).resolve().parents[1] / "napari.yaml"
    assert top_level.read_text() == Path(napari_gradcam.__file__).with_name(
        "napari.yaml").read_text()


def test_every_command_resolves_to_a_callable():
    manifest = _shipped_manifest()
    for command in manifest.contributions.commands:
        module_name, _, attribute = command.python_name.partition(":")
        target = getattr(importlib.import_module(module_name), attribute)
        assert callable(target), command.id


def test_contributions_cover_widgets_reader_and_every_sample():
    contributions = _shipped_manifest().contributions
    assert {w.display_name for w in contributions.widgets} == {
        "Grad-CAM explainer", "Grad-CAM evidence", "Map display", "Spectrum and CAM"}
    assert {s.key for s in contributions.sample_data} == {"micrograph", "ct_volume", "spectra"}
    assert contributions.readers and contributions.readers[0].accepts_directories


def test_readers_cover_tiff_and_zarr_and_the_writer_saves_images_both_ways():
    """What issue 11 asks for: our readers are offered for TIFF stacks and OME-Zarr, and the
    writer for image layers in OME-Zarr and both TIFF flavours."""
    contributions = _shipped_manifest().contributions
    patterns = {p for reader in contributions.readers for p in reader.filename_patterns}
    assert {"*.tif", "*.tiff", "*.ome.tif", "*.zarr", "*.ome.zarr"} <= patterns
    (writer,) = contributions.writers
    assert writer.layer_types == ["image"]
    assert {".zarr", ".ome.zarr", ".tif", ".tiff", ".ome.tif"} <= set(writer.filename_extensions)


def test_napari_offers_our_readers_and_writer():
    """Through a plugin manager that discovers installed plugins as napari's does, not just
    the file: napari chooses readers by file name, so ours must be among them."""
    from npe2 import PluginManager

    manager = PluginManager()
    manager.discover()
    for name in ("scan.tif", "scan.TIFF", "scan.ome.tif", "maps.zarr"):
        readers = {r.plugin_name for r in manager.iter_compatible_readers([name])}
        assert {"napari-gradcam", "napari"} <= readers, name
    writers = {w.plugin_name for w in manager.iter_compatible_writers(["image"])}
    assert "napari-gradcam" in writers
