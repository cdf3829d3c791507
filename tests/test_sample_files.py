"""The committed sample files are what the generator makes today, with their voxel size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from napari_gradcam.cli import main
from napari_gradcam.io import read_volume

SAMPLES = Path(__file__).resolve().parents[1] / "sample_data"


def test_committed_ct_sample_is_reproduced_by_the_generator(tmp_path):
    assert main(["sample", "ct", str(tmp_path / "ct.tif"), "--shape", "48", "96", "96",
                 "--seed", "7", "--labels", str(tmp_path / "labels.tif")]) == 0
    for name, fresh in (("ct_small.tif", "ct.tif"), ("ct_small_labels.tif", "labels.tif")):
        committed, info = read_volume(SAMPLES / name)
        regenerated, _ = read_volume(tmp_path / fresh)
        np.testing.assert_array_equal(np.asarray(committed), np.asarray(regenerated))
        assert info.scale == pytest.approx((1.0, 0.65, 0.65))


def test_committed_labels_hold_pores_and_a_crack():
    labels, _ = read_volume(SAMPLES / "ct_small_labels.tif")
    assert set(np.unique(np.asarray(labels))) == {0, 1, 2}
