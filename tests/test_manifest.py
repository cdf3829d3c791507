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
    assert {w.display_name for w in contributions.widgets} == {"Grad-CAM explainer",
                                                               "Grad-CAM evidence"}
    assert {s.key for s in contributions.sample_data} == {"micrograph", "ct_volume", "spectra"}
    assert contributions.readers and contributions.readers[0].accepts_directories
