"""Whole-volume evidence: every slice or tile once, one at a time, nothing written unless the
whole run finishes."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from napari_gradcam.core.architectures import ResNetLike
from napari_gradcam.core.volume import Cancelled, run_job
from napari_gradcam.evidence_report import EvidenceSettings
from napari_gradcam.evidence_volume import volume_samples, whole_volume_job

FAST = EvidenceSettings(steps=5, n_random=1, region_null_samples=10)


class RecordingArray:
    """A volume that slices like NumPy and remembers how many voxels each read returned (what
    a zarr or dask array on disk would have to load)."""

    def __init__(self, data: np.ndarray) -> None:
        self.data = data
        self.shape = data.shape
        self.dtype = data.dtype
        self.reads: list[int] = []

    def __getitem__(self, key: object) -> np.ndarray:
        piece = self.data[key]
        self.reads.append(int(np.size(piece)))
        return piece


@pytest.fixture(scope="module")
def model3d() -> torch.nn.Module:
    torch.manual_seed(0)
    model = ResNetLike(spatial_dims=3, in_channels=1, num_classes=2, widths=(4, 8)).eval()
    with torch.no_grad():
        model.classifier.weight.abs_()
    return model


def test_samples_cover_the_volume_once():
    slices = volume_samples((5, 7, 9), 2, window=None, axis=1)
    assert [s.position for s in slices] == [(i,) for i in range(7)]
    assert slices[3].key == (slice(None), 3, slice(None))
    tiles = volume_samples((10, 8, 12), 3, window=(4, 8, 5))
    covered = np.zeros((10, 8, 12), int)
    for tile in tiles:
        covered[tile.key] += 1
    assert covered.min() >= 1  # every voxel is in a tile; the last tile of an axis is flush
    assert [t.position for t in tiles][:3] == [(0, 0, 0), (0, 0, 5), (0, 0, 7)]
    assert len(tiles) == 3 * 1 * 3
    with pytest.raises(ValueError, match="larger than the volume"):
        volume_samples((4, 4, 4), 3, window=(8, 4, 4))


def test_whole_volume_reads_one_tile_at_a_time_and_tallies_the_verdicts(model3d, tmp_path):
    rng = np.random.default_rng(0)
    volume = RecordingArray(rng.random((8, 8, 16)).astype(np.float32))
    region = np.zeros((8, 8, 16), np.uint8)
    region[2:5, 2:5, 1:4] = 1  # only in the first tile
    samples = volume_samples(volume.shape, 3, window=(8, 8, 8))
    progress = []
    job = whole_volume_job(model3d, volume, samples, tmp_path / "report", layer="features.1",
                           target=1, checks=["deletion"], region=region, settings=FAST,
                           source="test volume")
    result = run_job(job, lambda done, total, stage: progress.append((done, total, stage)))
    # bounded memory: each read is one tile, never the volume
    assert volume.reads and max(volume.reads) == 8 * 8 * 8
    assert progress[-1][:2] == (2000, 2000) and "sample 2/2" in progress[-2][2]
    assert [d for d, _, _ in progress] == sorted(d for d, _, _ in progress)
    assert result.samples == 2 and result.samples_with_region == 1
    with open(tmp_path / "report" / "samples.csv", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    first = [r for r in rows if r["sample"] == "0"]
    second = [r for r in rows if r["sample"] == "1"]
    assert any(r["check"] == "Region test" and "p-value" in r["measure"] for r in first)
    assert any(r["measure"] == "no region in this sample" for r in second)
    tally = result.tallies[("Deletion", "AUC of the target probability")]
    assert tally["samples"] == 2 and tally["judged"] == 2
    assert tally["passed"] == sum(r["verdict"] == "pass" for r in rows if r["check"] == "Deletion")
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert summary["samples"] == 2 and summary["passed"] == result.passed
    provenance = json.loads((tmp_path / "report" / "provenance.json").read_text())
    assert provenance["mode"] == "evidence (whole volume)"
    assert provenance["options"]["samples"] == 2
    with pytest.raises(FileExistsError, match="already holds"):
        whole_volume_job(model3d, volume, samples, tmp_path / "report", checks=["deletion"])


def test_a_stopped_run_writes_nothing(model3d, tmp_path):
    volume = np.random.default_rng(1).random((8, 8, 16)).astype(np.float32)
    samples = volume_samples(volume.shape, 3, window=(8, 8, 8))
    job = whole_volume_job(model3d, volume, samples, tmp_path / "report", layer="features.1",
                           target=0, checks=["deletion"], settings=FAST)
    calls = []
    with pytest.raises(Cancelled):
        run_job(job, lambda *item: calls.append(item), should_stop=lambda: len(calls) > 3)
    assert not (tmp_path / "report").exists()
    assert list(tmp_path.iterdir()) == []  # no staging folder left behind


def test_staging_of_a_killed_run_is_cleaned_and_a_live_runs_is_left_alone(model3d, tmp_path):
    """Whole-volume evidence stages its report like every output (io.atomic_path's naming): a
    staging folder of a killed run is removed with a word; one of a run still going is kept."""
    import os
    import subprocess
    import sys

    from napari_gradcam.io import temporary_name

    folder = tmp_path / "report"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = temporary_name(folder, "partial").with_name(
        f"report.partial-{temporary_name(folder, 'x').name.split('-')[1]}-{dead.pid}-deadbeef")
    live = temporary_name(folder, "partial")  # this very process: still running
    for leftover in (stale, live):
        leftover.mkdir()
        (leftover / "samples.csv").write_text("half", encoding="utf-8")
    old = os.path.getmtime(stale)
    os.utime(stale, (old - 3600, old - 3600))  # written before the dead process ended
    volume = np.random.default_rng(1).random((8, 8, 16)).astype(np.float32)
    samples = volume_samples(volume.shape, 3, window=(8, 8, 8))
    job = whole_volume_job(model3d, volume, samples, folder, layer="features.1", target=0,
                           checks=["deletion"], settings=FAST)
    with pytest.warns(RuntimeWarning, match="removed .*was killed"):
        run_job(job)
    assert not stale.exists() and live.exists()
    assert (folder / "summary.json").exists()
