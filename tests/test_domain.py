"""The out-of-domain check: statistics of inputs against the training data's."""

from __future__ import annotations

import math

import dask.array as da
import numpy as np
import pytest
import yaml
import zarr
from scipy import ndimage

from napari_gradcam.core import domain
from napari_gradcam.core.domain import (
    check_domain,
    compare_to_training,
    input_statistics,
    js_distance,
)
from napari_gradcam.core.model_card import ModelCard
from napari_gradcam.core.models import load_model
from napari_gradcam.core.preprocess import Preprocessor

NOISE = 0.05


def textured(n: int, size: int, seed: int, noise: float = NOISE) -> np.ndarray:
    """Microstructure-like patches: smooth grains (a blurred random field, unit scale) + noise."""
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.normal(size=(n, size, size)), sigma=(0, 3, 3))
    field /= field.std()
    return (0.5 + 0.15 * field + rng.normal(scale=noise, size=field.shape)).astype(np.float32)


@pytest.fixture(scope="module")
def training() -> dict:
    return input_statistics(textured(300, 32, seed=0), spatial_dims=2, sample=300)


def test_data_drawn_like_the_training_data_is_in_domain(training):
    user = input_statistics(textured(20, 32, seed=1), spatial_dims=2)
    report = compare_to_training(user, training)
    assert report.checked
    assert not report.out_of_domain, report.message()
    assert report.finding("histogram").value < 0.2
    assert 0.8 < report.finding("noise").value < 1.25
    assert report.message().startswith("The input resembles the training data")


def test_a_single_training_like_image_is_in_domain(training):
    user = input_statistics(textured(1, 32, seed=7)[0], spatial_dims=2)
    assert not compare_to_training(user, training).out_of_domain


def test_shifted_intensity_is_flagged_with_its_numbers(training):
    drawn = textured(20, 32, seed=1)
    shifted = drawn + 2.0 * training["std"]
    report = compare_to_training(input_statistics(shifted, spatial_dims=2), training)
    unshifted = compare_to_training(input_statistics(drawn, spatial_dims=2), training)
    assert report.out_of_domain
    assert {"histogram", "mean_shift", "percentile_shift"} <= set(report.flagged)
    assert "noise" not in report.flagged and "input_size" not in report.flagged
    # the shift is measured in training stds: exactly 2 more than the unshifted draw's
    assert report.finding("mean_shift").value == pytest.approx(
        unshifted.finding("mean_shift").value + 2.0, abs=1e-4)
    message = report.message()
    assert "intensity histogram differs" in message and "brighter" in message


def test_five_times_the_noise_is_flagged_as_noise(training):
    noisy = textured(20, 32, seed=1, noise=5 * NOISE)
    report = compare_to_training(input_statistics(noisy, spatial_dims=2), training)
    assert "noise" in report.flagged
    assert report.finding("noise").value == pytest.approx(5.0, rel=0.15)
    assert "mean_shift" not in report.flagged and "input_size" not in report.flagged
    assert "× the training level" in report.message()


def test_four_times_the_input_size_is_flagged_for_a_classifier(training):
    large = textured(4, 128, seed=1)
    report = compare_to_training(input_statistics(large, spatial_dims=2), training)
    assert report.flagged == ["input_size"]
    finding = report.finding("input_size")
    assert finding.value == pytest.approx(4.0)
    assert "128×128" in finding.text and "32×32" in finding.text


def test_a_segmentation_model_may_see_larger_inputs_but_not_much_smaller(training):
    large = input_statistics(textured(4, 128, seed=1), spatial_dims=2)
    assert "input_size" not in compare_to_training(large, training,
                                                   task="segmentation").flagged
    small = input_statistics(textured(20, 12, seed=1), spatial_dims=2)
    assert "input_size" in compare_to_training(small, training, task="segmentation").flagged


def test_voxel_size_outside_the_training_range_is_flagged():
    train = input_statistics(textured(50, 32, seed=0), spatial_dims=2, voxel_size=(0.5, 0.5),
                             sample=50)
    same = input_statistics(textured(10, 32, seed=1), spatial_dims=2, voxel_size=(0.55, 0.5))
    coarse = input_statistics(textured(10, 32, seed=1), spatial_dims=2,
                              voxel_size=(9.0, 1.0, 1.0))  # (z, y, x): the last two are kept
    assert coarse["voxel_size"] == [1.0, 1.0]
    assert "voxel_size" not in compare_to_training(same, train).flagged
    finding = compare_to_training(coarse, train).finding("voxel_size")
    assert finding.flagged and finding.value == pytest.approx(2.0)
    unknown = input_statistics(textured(10, 32, seed=1), spatial_dims=2)
    skipped = compare_to_training(unknown, train).finding("voxel_size")
    assert not skipped.applicable and not skipped.flagged
    assert "Not checked: voxel size" in compare_to_training(unknown, train).message()


def test_a_card_without_statistics_cannot_be_checked_and_says_so():
    user = input_statistics(textured(5, 32, seed=1), spatial_dims=2)
    for card in (None, {"name": "m", "task": "classification"}):
        report = compare_to_training(user, card)
        assert not report.checked and not report.out_of_domain
        assert "no training statistics in the model card; cannot check" in \
            report.message().lower()


def test_statistics_are_plain_yaml_and_are_read_from_a_card_dict(training):
    text = yaml.safe_dump({"name": "m", "training_statistics": training})
    card = yaml.safe_load(text)
    user = input_statistics(textured(20, 32, seed=1), spatial_dims=2)
    assert compare_to_training(user, card).to_dict() == \
        compare_to_training(user, training).to_dict()
    assert sum(card["training_statistics"]["histogram"]["counts"]) == pytest.approx(1.0)
    assert len(card["training_statistics"]["histogram"]["edges"]) == 33


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_noise_level_is_the_sigma_of_white_noise_and_ignores_smooth_structure(dims):
    rng = np.random.default_rng(dims)
    shape = {1: (20, 4000), 2: (4, 200, 200), 3: (1, 48, 48, 48)}[dims]
    ramp = np.linspace(0, 50, shape[-1])  # a strong smooth gradient: the Laplacian removes it
    data = rng.normal(scale=0.3, size=shape) + ramp
    stats = input_statistics(data, spatial_dims=dims)
    assert stats["noise_sigma"] == pytest.approx(0.3, rel=0.03)
    assert stats["std"] > 10  # the structure dominates the plain std, not the noise estimate


def test_statistics_are_of_the_preprocessed_data():
    raw = (textured(10, 32, seed=0) * 255).astype(np.uint8)
    preprocess = Preprocessor([{"op": "window", "min": 0, "max": 255},
                               {"op": "normalize", "mean": 0.5, "std": 0.25}],
                              spatial_dims=2, in_channels=1)
    stats = input_statistics(raw, spatial_dims=2, preprocess=preprocess)
    expected = (raw.astype(np.float64) / 255 - 0.5) / 0.25
    assert stats["preprocessed"]
    assert stats["mean"] == pytest.approx(expected.mean(), abs=1e-5)
    assert stats["std"] == pytest.approx(expected.std(), rel=1e-4)
    assert stats["percentiles"]["p50"] == pytest.approx(np.median(expected), abs=0.02)
    resized = Preprocessor([{"op": "resize", "size": [16, 16]}], spatial_dims=2, in_channels=1)
    assert input_statistics(raw, spatial_dims=2, preprocess=resized)["input_size"] == [16, 16]


class CountingArray:
    """A lazy array (like zarr or dask): records every read so the test can bound them."""

    def __init__(self, shape: tuple[int, ...], seed: int = 0) -> None:
        self.shape, self.dtype, self.reads = shape, np.dtype(np.float32), []
        self.seed = seed

    def __getitem__(self, index: tuple) -> np.ndarray:
        full = tuple(index) + (slice(None),) * (len(self.shape) - len(index))
        sizes = [len(range(*s.indices(n))) for s, n in zip(full, self.shape, strict=True)
                 if isinstance(s, slice)]
        self.reads.append(int(np.prod(sizes)))
        offset = sum(i for i in full if isinstance(i, int))
        return np.random.default_rng(self.seed + offset).normal(size=sizes).astype(np.float32)


def test_a_large_lazy_stack_is_sampled_slice_by_slice_reproducibly():
    volume = CountingArray((5000, 64, 64))  # 5000 slices never read in full
    stats = input_statistics(volume, spatial_dims=2, sample=16, seed=3)
    assert volume.reads == [64 * 64] * 16
    assert stats["sampling"]["items_read"] == 16 and stats["sampling"]["items_total"] == 5000
    again = input_statistics(CountingArray((5000, 64, 64)), spatial_dims=2, sample=16, seed=3)
    assert again == stats
    assert stats["input_size"] == [64, 64]


def test_slices_along_another_axis_are_read_by_indexing_that_axis():
    volume = textured(12, 32, seed=4).transpose(1, 0, 2)  # (y, z, x): slice along axis 1
    along = input_statistics(volume, spatial_dims=2, axis=1, sample=12,
                             voxel_size=(0.5, 2.0, 0.7))
    moved = input_statistics(np.moveaxis(volume, 1, 0).copy(), spatial_dims=2, sample=12,
                             voxel_size=(0.5, 0.7))
    assert along == moved  # same items, same numbers, the slice axis's voxel size dropped
    assert along["input_size"] == [32, 32] and along["voxel_size"] == [0.5, 0.7]
    with pytest.raises(ValueError, match="one sample axis"):
        input_statistics(np.zeros((2, 3, 8, 8)), spatial_dims=2, axis=1)


def test_zarr_and_dask_volumes_give_the_numbers_of_the_numpy_volume(tmp_path):
    volume = textured(40, 32, seed=6)
    stored = zarr.open(str(tmp_path / "v.zarr"), mode="w", shape=volume.shape,
                       chunks=(1, 32, 32), dtype="f4")
    stored[:] = volume
    expected = input_statistics(volume, spatial_dims=2, sample=8)
    assert input_statistics(stored, spatial_dims=2, sample=8) == expected
    lazy = da.from_array(volume, chunks=(1, 32, 32))
    assert input_statistics(lazy, spatial_dims=2, sample=8) == expected


def test_one_large_volume_is_read_in_bounded_blocks(monkeypatch):
    monkeypatch.setattr(domain, "MAX_ITEM_VOXELS", 16**3)
    volume = CountingArray((80, 80, 80))
    stats = input_statistics(volume, spatial_dims=3, sample=5)
    assert len(volume.reads) == 5
    assert max(volume.reads) <= 16**3
    assert stats["input_size"] == [80, 80, 80]  # what the model sees, not the block
    assert stats["std"] == pytest.approx(1.0, rel=0.05)


def test_js_distance_matches_its_definition():
    p, q = np.array([0.5, 0.5, 0.0]), np.array([0.0, 0.5, 0.5])
    m = (p + q) / 2
    kl = lambda a: sum(x * math.log2(x / y) for x, y in zip(a, m, strict=True) if x > 0)  # noqa: E731
    assert js_distance(p, q) == pytest.approx(math.sqrt(0.5 * kl(p) + 0.5 * kl(q)))
    assert js_distance(p, p) == 0.0
    assert js_distance(np.array([1.0, 0]), np.array([0, 1.0])) == pytest.approx(1.0)


def test_check_domain_uses_the_loaded_models_preprocessing_and_card(training):
    def loaded(statistics: dict | None, window_max: float = 1.0) -> object:
        card = ModelCard(
            name="tiny", architecture="resnet_like", spatial_dims=2, in_channels=1,
            architecture_kwargs={"spatial_dims": 2, "in_channels": 1, "num_classes": 2,
                                 "widths": [4, 8]},
            task="classification", training_statistics=statistics,
            preprocessing=[{"op": "window", "min": 0.0, "max": window_max}])
        return load_model(card)

    assert not check_domain(textured(10, 32, seed=2), loaded(training)).out_of_domain
    assert "noise" in check_domain(textured(10, 32, seed=2, noise=0.3), loaded(training)).flagged
    # the card's preprocessing is applied: a window twice as wide halves the grey levels
    assert "mean_shift" in check_domain(textured(10, 32, seed=2),
                                        loaded(training, window_max=2.0)).flagged
    assert not check_domain(textured(10, 32, seed=2), loaded(None)).checked


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="fewer axes"):
        input_statistics(np.zeros(5), spatial_dims=2)
    with pytest.raises(ValueError, match="empty"):
        input_statistics(np.zeros((0, 4, 4)), spatial_dims=2)
    with pytest.raises(ValueError, match="no finite values"):
        input_statistics(np.full((2, 4, 4), np.nan), spatial_dims=2)
    a = input_statistics(np.zeros((2, 8)), spatial_dims=1)
    b = input_statistics(np.zeros((2, 8, 8)), spatial_dims=2)
    with pytest.raises(ValueError, match="spatial axes"):
        compare_to_training(a, b)
