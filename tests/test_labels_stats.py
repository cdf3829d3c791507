"""Per-label CAM statistics against values worked out by hand."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from napari_gradcam.core.labels_stats import (
    LABEL_STAT_COLUMNS,
    as_features,
    label_names_from_features,
    label_statistics,
    read_csv_provenance,
    suggest_csv_name,
    write_csv,
)
from napari_gradcam.core.metrics import energy_share, pointing_hits


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


def test_flat_map_hits_nothing_and_map_without_positive_mass_has_no_energy_share() -> None:
    _, labels = _toy()
    table = label_statistics(np.zeros((4, 4)), labels)
    assert not table["pointing_hit"].any()
    assert np.isnan(table["energy_share"]).all()  # no positive mass: no share, not 0 %
    negative = label_statistics(-np.ones((4, 4)) - np.eye(4), labels)
    assert np.isnan(negative["energy_share"]).all()


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
    assert rows[1][0] == "1" and float(rows[1][2]) == 2.5 and rows[2][-2] == "True"
    assert rows[1][-1] == ""  # no names given
    with pytest.raises(ValueError, match="length"):
        write_csv({"a": [1, 2], "b": [1]}, tmp_path / "bad.csv")


def test_names_column_from_a_mapping_empty_where_unknown() -> None:
    cam, labels = _toy()
    table = label_statistics(cam, labels, names={1: "pore", 2: "crack"})
    assert table["name"].tolist() == ["pore", ""]  # label 3 has no name; 2 is not in the image
    assert label_statistics(cam, labels)["name"].tolist() == ["", ""]


def test_label_names_from_napari_style_features() -> None:
    pandas = pytest.importorskip("pandas")
    # napari's convention: the "index" column holds the label value of each row
    features = pandas.DataFrame({"index": [0, 3, 1], "name": ["background", "crack", None]})
    assert label_names_from_features(features) == {0: "background", 3: "crack"}
    # a "label" column and a "class" column (a dict of columns, as Labels.properties)
    assert label_names_from_features({"label": np.array([2, 5]), "class": ["pore", "crack"]}) == {
        2: "pore", 5: "crack"}
    # no id column: row number = label value (napari's rule); NaN names are left out
    assert label_names_from_features({"name": ["bg", float("nan"), "pore"]}) == {0: "bg", 2: "pore"}
    assert label_names_from_features({"index": [1, 2], "area": [3, 4]}) == {}
    assert label_names_from_features(None) == {}
    with pytest.raises(ValueError, match="'index' column"):
        label_names_from_features({"index": ["a"], "name": ["pore"]})


def test_names_from_features_round_trip_through_our_own_features() -> None:
    cam, labels = _toy()
    table = label_statistics(cam, labels, names={1: "pore", 3: "crack"})
    features = as_features(table)  # what the widget writes back to the Labels layer
    assert label_names_from_features(features) == {1: "pore", 3: "crack"}


def test_csv_carries_provenance_as_leading_comments(tmp_path) -> None:
    pandas = pytest.importorskip("pandas")
    cam, labels = _toy()
    table = label_statistics(cam, labels, names={1: "pore"})
    provenance = {"model": "ct-slice-unet", "layers": ["down2"], "target": "crack",
                  "method": "gradcam", "source": "scan\nline two", "options": {"batch": 8}}
    path = write_csv(table, tmp_path / "stats.csv", provenance=provenance)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[:6] == ["# model: ct-slice-unet", '# layers: ["down2"]', "# target: crack",
                         "# method: gradcam", "# source: scan\\nline two",
                         '# options: {"batch":8}']
    assert lines[6] == ",".join(LABEL_STAT_COLUMNS)
    assert read_csv_provenance(path)["target"] == "crack"
    assert len(read_csv_provenance(path)) == 6
    frame = pandas.read_csv(path, comment="#", keep_default_na=False)
    assert frame["label"].tolist() == [1, 3] and frame["name"].tolist() == ["pore", ""]
    np.testing.assert_allclose(frame["energy_share"], table["energy_share"])
    # without provenance the header is the first line, as before
    bare = write_csv(table, tmp_path / "bare.csv")
    assert bare.read_text(encoding="utf-8").splitlines()[0] == ",".join(LABEL_STAT_COLUMNS)
    assert read_csv_provenance(bare) == {}


def test_suggested_csv_names_differ_by_model_target_method_and_time() -> None:
    base = {"source": "/data/scans/steel_01.ome.zarr", "model": "ct-slice-unet",
            "layers": ["down2"], "target": "crack", "method": "gradcam",
            "created": "2026-11-28T11:30:05+00:00"}
    name = suggest_csv_name(base)
    assert name == "cam-labels_steel_01_ct-slice-unet_down2_crack_gradcam_20261128-113005.csv"
    variants = [{**base, "model": "ct-patch-classifier"}, {**base, "target": "pore"},
                {**base, "method": "hirescam"}, {**base, "created": "2026-11-28T11:30:06+00:00"},
                {**base, "layers": ["down1"]}]
    names = {name, *(suggest_csv_name(v) for v in variants)}
    assert len(names) == 1 + len(variants)
    odd = suggest_csv_name({"model": "my model/v2", "target": "class 1", "created": "bad"})
    assert odd.startswith("cam-labels_my-model-v2_class-1_") and odd.endswith(".csv")
    assert "/" not in odd and " " not in odd


def _random_map_and_labels(shape: tuple[int, ...], seed: int = 0) -> tuple[np.ndarray,
                                                                            np.ndarray]:
    rng = np.random.default_rng(seed)
    cam = rng.normal(size=shape)
    labels = rng.integers(0, 7, size=shape).astype(np.uint16)
    labels[labels == 4] = 0  # a label value that never occurs
    return cam, labels


@pytest.mark.parametrize("block_bytes", [1, 40 * 7, 40 * 60, 40 * 1000])
def test_blockwise_statistics_equal_the_whole_arrays(block_bytes: int) -> None:
    cam, labels = _random_map_and_labels((9, 13, 11))
    # the maximum twice, in different blocks: the first in C order is the peak (label 2)
    cam[2, 5, 7], labels[2, 5, 7] = 9.0, 2
    cam[6, 1, 1], labels[6, 1, 1] = 9.0, 5
    whole = label_statistics(cam, labels)
    blocks = label_statistics(cam, labels, block_bytes=block_bytes)
    assert whole["label"].tolist() == [1, 2, 3, 5, 6]
    for column in LABEL_STAT_COLUMNS:
        if whole[column].dtype.kind == "f":
            np.testing.assert_allclose(blocks[column], whole[column], rtol=1e-12)
        else:
            np.testing.assert_array_equal(blocks[column], whole[column])
    # and each column against its definition over the whole arrays
    for row, value in enumerate(whole["label"]):
        inside = labels == value
        assert blocks["voxels"][row] == inside.sum()
        np.testing.assert_allclose(blocks["mean_cam"][row], cam[inside].mean(), rtol=1e-12)
        assert blocks["max_cam"][row] == cam[inside].max()
        np.testing.assert_allclose(blocks["energy_share"][row],
                                   energy_share(cam[None], inside[None])[0], rtol=1e-12)
        assert blocks["pointing_hit"][row] == (value == 2)
    near = label_statistics(cam, labels, tolerance=1.5, block_bytes=block_bytes)
    for row, value in enumerate(near["label"]):
        assert near["pointing_hit"][row] == pointing_hits(
            cam[None], (labels == value)[None], tolerance=1.5)[0]


def test_chunked_maps_are_read_chunk_by_chunk_in_any_order_with_the_same_numbers() -> None:
    da = pytest.importorskip("dask.array")
    cam, labels = _random_map_and_labels((8, 12, 10), seed=1)
    # equal maxima where block order and C order disagree: chunks (4, 6, 5) visit
    # [0:4, 0:6, 5:10] before [1, ...]; (0, 0, 7) comes first in C order, so it is the peak
    cam[0, 0, 7], labels[0, 0, 7] = 7.0, 3
    cam[3, 0, 1], labels[3, 0, 1] = 7.0, 6
    reads: list[tuple[int, ...]] = []

    def chunk(block_info=None) -> np.ndarray:  # a map whose chunks count their reads
        where = tuple(slice(a, b) for a, b in block_info[None]["array-location"])
        reads.append(tuple(s.start for s in where))
        return cam[where]

    lazy = da.map_blocks(chunk, chunks=((4, 4), (6, 6), (5, 5)), dtype=np.float64,
                         meta=np.array(()))
    table = label_statistics(lazy, da.from_array(labels, chunks=(4, 6, 5)),
                             block_bytes=40 * 4 * 6 * 5)
    assert sorted(reads) == sorted(set(reads)) and len(reads) == 2 * 2 * 2  # each chunk once
    whole = label_statistics(cam, labels)
    np.testing.assert_allclose(table["mean_cam"], whole["mean_cam"], rtol=1e-12)
    np.testing.assert_allclose(table["energy_share"], whole["energy_share"], rtol=1e-12)
    assert table["pointing_hit"].tolist() == whole["pointing_hit"].tolist()
    assert table["label"][table["pointing_hit"]].tolist() == [3]


def test_a_lazy_map_much_larger_than_the_budget_is_never_read_whole() -> None:
    import tracemalloc

    da = pytest.importorskip("dask.array")
    shape, chunks = (128, 128, 128), (4, 128, 128)
    rng = da.random.default_rng(0)
    cam = rng.standard_normal(shape, chunks=chunks)  # float64: 16 MiB whole, made per chunk
    labels = rng.integers(0, 5, shape, chunks=chunks)  # int64: 16 MiB whole
    budget = 4 << 20
    label_statistics(cam[:4], labels[:4], block_bytes=budget)  # one-off imports, threads
    tracemalloc.start()
    try:
        table = label_statistics(cam, labels, block_bytes=budget)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    whole_map = 8 * int(np.prod(shape))
    assert peak < whole_map / 2, f"peak {peak / 2**20:.1f} MiB for a {whole_map >> 20} MiB map"
    assert table["label"].tolist() == [1, 2, 3, 4]
    expected = [int((labels == value).sum().compute()) for value in (1, 2, 3, 4)]
    assert table["voxels"].tolist() == expected
    mean_of_one = float(((labels == 1) * cam).sum().compute()) / expected[0]
    np.testing.assert_allclose(table["mean_cam"][0], mean_of_one, rtol=1e-9)


def test_lists_and_tensors_are_read_as_arrays() -> None:
    torch = pytest.importorskip("torch")
    cam, labels = _toy()
    expected = label_statistics(cam, labels)
    for table in (label_statistics(cam.tolist(), labels.tolist()),
                  label_statistics(torch.from_numpy(cam), torch.from_numpy(labels))):
        np.testing.assert_allclose(table["mean_cam"], expected["mean_cam"])
        assert table["pointing_hit"].tolist() == expected["pointing_hit"].tolist()
