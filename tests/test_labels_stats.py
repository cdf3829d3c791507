"""Per-label CAM statistics against values worked out by hand."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from napari_gradcam.core.labels_stats import (
    LABEL_STAT_COLUMNS,
    as_features,
    label_statistics,
    write_csv,
)
from napari_gradcam.samples.metrics import energy_share, pointing_hits


def _toy() -> tuple[np.ndarray, np.ndarray]:
    # 4x4 map; label 1 = top-left 2x2 block, label 3 = bottom-right pixel, label 2 absent.
    cam = np.array(
        [[1.0, 2.0, 0.0, 0.0],
         [3.0, 4.0, 0.0, -1.0],
         [0.0, 0.0, 0.0, 0.0],
         [0.0, 0.0, 0.0, 10.0]],
        dtype=np.float32,
    )
    labels = np.zeros((4, 4), dtype=np.uint8)
    labels[:2, :2] = 1
    labels[3, 3] = 3
    return cam, labels


def test_statistics_match_hand_computation() -> None:
    cam, labels = _toy()
    table = label_statistics(cam, labels)
    assert tuple(table) == LABEL_STAT_COLUMNS
    assert table["label"].tolist() == [1, 3]
    assert table["voxels"].tolist() == [4, 1]
    np.testing.assert_allclose(table["mean_cam"], [2.5, 10.0])
    np.testing.assert_allclose(table["max_cam"], [4.0, 10.0])
    # positive mass: 1+2+3+4+10 = 20 (the -1 does not count)
    np.testing.assert_allclose(table["energy_share"], [10 / 20, 10 / 20])
    np.testing.assert_allclose(table["area_share"], [4 / 16, 1 / 16])
    assert table["pointing_hit"].tolist() == [False, True]  # the maximum (10) is on label 3


def test_energy_share_and_pointing_agree_with_sample_metrics() -> None:
    rng = np.random.default_rng(3)
    cam = rng.normal(size=(20, 30))
    labels = np.zeros((20, 30), dtype=np.int32)
    labels[2:8, 3:9] = 5
    labels[10:18, 20:28] = 7
    table = label_statistics(cam, labels)
    for row, value in enumerate(table["label"]):
        mask = (labels == value)[None]
        np.testing.assert_allclose(table["energy_share"][row], energy_share(cam[None], mask)[0])
        assert table["pointing_hit"][row] == pointing_hits(cam[None], mask)[0]


def test_tolerance_uses_physical_spacing() -> None:
    cam = np.zeros((1, 10), dtype=np.float32)
    cam[0, 0] = 1.0
    labels = np.zeros((1, 10), dtype=np.uint8)
    labels[0, 3] = 1  # three pixels from the peak
    assert not label_statistics(cam, labels, tolerance=2.0)["pointing_hit"][0]
    assert label_statistics(cam, labels, tolerance=3.0)["pointing_hit"][0]
    # with 0.5 units per pixel the object is 1.5 units away
    assert label_statistics(cam, labels, tolerance=1.5, spacing=(1.0, 0.5))["pointing_hit"][0]


def test_flat_map_hits_nothing_and_zero_map_has_no_energy() -> None:
    _, labels = _toy()
    table = label_statistics(np.zeros((4, 4)), labels)
    assert not table["pointing_hit"].any()
    assert (table["energy_share"] == 0).all()


def test_no_labels_gives_empty_columns() -> None:
    table = label_statistics(np.ones((3, 3)), np.zeros((3, 3), dtype=np.uint8))
    assert all(len(column) == 0 for column in table.values())


def test_3d_volume() -> None:
    cam = np.zeros((3, 4, 4))
    cam[1, 2, 2] = 2.0
    labels = np.zeros((3, 4, 4), dtype=np.uint16)
    labels[1, 2:, 2:] = 4
    table = label_statistics(cam, labels)
    assert table["label"].tolist() == [4]
    np.testing.assert_allclose(table["mean_cam"], [0.5])
    assert table["energy_share"][0] == 1.0 and table["pointing_hit"][0]


@pytest.mark.parametrize(
    ("cam", "labels", "error", "words"),
    [
        (np.zeros((4, 4)), np.zeros((4, 5), dtype=np.uint8), ValueError, "shape"),
        (np.zeros((4, 4)), np.zeros((4, 4), dtype=np.float32), TypeError, "integers"),
        (np.zeros((4, 4)), -np.ones((4, 4), dtype=np.int32), ValueError, "non-negative"),
        (np.full((4, 4), np.nan), np.zeros((4, 4), dtype=np.uint8), ValueError, "NaN"),
    ],
)
def test_bad_input_is_explained(cam, labels, error, words) -> None:
    with pytest.raises(error, match=words):
        label_statistics(cam, labels)


def test_bad_tolerance_and_spacing() -> None:
    cam, labels = _toy()
    with pytest.raises(ValueError, match="tolerance"):
        label_statistics(cam, labels, tolerance=-1)
    with pytest.raises(ValueError, match="spacing"):
        label_statistics(cam, labels, spacing=(1.0,))


def test_features_and_csv_round_trip(tmp_path) -> None:
    cam, labels = _toy()
    table = label_statistics(cam, labels)
    features = as_features(table)
    assert features["index"].tolist() == [1, 3]
    path = write_csv(table, tmp_path / "stats.csv")
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == list(LABEL_STAT_COLUMNS)
    assert rows[1][0] == "1" and float(rows[1][2]) == 2.5 and rows[2][-1] == "True"
    with pytest.raises(ValueError, match="length"):
        write_csv({"a": [1, 2], "b": [1]}, tmp_path / "bad.csv")
