"""The declared minimum versions stay checkable: scripts/check_minimum_versions.sh installs what
scripts/minimum_versions.py reads from pyproject.toml, so these tests make sure that reading
covers every dependency, that the floors do not contradict each other between extras, and that
the check really notices a version that is not its floor."""

from __future__ import annotations

import importlib.util
import re
from importlib import metadata
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]


def _load_minimum_versions():
    spec = importlib.util.spec_from_file_location("minimum_versions",
                                                  ROOT / "scripts" / "minimum_versions.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


minimum_versions = _load_minimum_versions()


def _requirement_names(*extras: str) -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    requirements = list(project["dependencies"])
    for extra in extras:
        requirements += project["optional-dependencies"][extra]
    return {minimum_versions.canonical(re.match(r"[A-Za-z0-9._-]+", r)[0]) for r in requirements}


def test_every_dependency_the_check_covers_has_a_floor_it_installs():
    """A dependency added without a ``>=`` floor would silently be installed at its newest
    version by the check; every one has a floor, except torch, pinned by constraints.txt."""
    floors = minimum_versions.floors(extras=("napari", "distributed"))
    assert set(floors) | minimum_versions.NOT_AT_FLOOR == _requirement_names("napari",
                                                                             "distributed")
    assert "torch" not in floors
    assert "torch==2.13.0" in (ROOT / "constraints.txt").read_text()


def test_the_same_package_has_the_same_floor_in_every_extra():
    """napari appears in the napari, pyqt6 and testing extras: raising one floor and not the
    others makes the declaration contradict itself, and the check refuses it."""
    floors = minimum_versions.floors(extras=("napari", "pyqt6", "distributed", "testing",
                                             "benchmark"))
    assert floors["napari"] == minimum_versions.floors(extras=("napari",))["napari"]
    assert floors["distributed"] == floors["dask"]  # distributed pins its own dask release


def test_two_floors_for_one_package_are_refused(tmp_path):
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text('[project]\nname = "x"\ndependencies = ["zarr>=3.0.8"]\n'
                         '[project.optional-dependencies]\nnapari = ["Zarr>=2.16"]\n')
    with pytest.raises(SystemExit, match="two floors for zarr"):
        minimum_versions.floors(pyproject, extras=("napari",))
    assert minimum_versions.floors(pyproject, extras=()) == {"zarr": "3.0.8"}


def test_verify_names_every_package_that_is_not_at_its_floor():
    numpy_version = metadata.version("numpy")
    assert minimum_versions.mismatches({"numpy": numpy_version}) == []
    assert minimum_versions.mismatches({"numpy": numpy_version + ".0"}) == []  # 1.25 == 1.25.0
    (line,) = minimum_versions.mismatches({"numpy": "0.1"})
    assert line == f"numpy: {numpy_version} installed, declared floor 0.1"
    (line,) = minimum_versions.mismatches({"no-such-package-xyz": "1.0"})
    assert "not installed" in line


def test_the_installed_versions_meet_the_declared_floors():
    """Whatever environment runs the tests (the main one or the minimum one), it satisfies the
    floors it was installed with: a floor above what pip installed would mean a broken set-up."""
    for name, floor in minimum_versions.floors(extras=("napari",)).items():
        installed = minimum_versions._release(metadata.version(name))
        assert installed >= minimum_versions._release(floor), (name, installed, floor)
