"""Preprocessing ops against values worked out by hand, and the errors bad input gets."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
import torch
import zarr

from napari_gradcam.core.preprocess import PreprocessingError, Preprocessor, validate_preprocessing


def test_percentile_clip_matches_hand_computed_values_per_sample() -> None:
    # 0..100: the 10th and 90th percentiles are exactly 10 and 90 (linear interpolation).
    first = np.arange(101, dtype=np.float32)
    second = 2.0 * first + 5.0  # another brightness: its own percentiles, 25 and 185
    batch = np.stack([first, second])
    pre = Preprocessor([{"op": "percentile_clip", "low": 10, "high": 90}], spatial_dims=1,
                       in_channels=1)
    out = pre(batch)
    expected = np.clip((first - 10.0) / 80.0, 0.0, 1.0)
    assert out.shape == (2, 1, 101)
    assert out.dtype == torch.float32
    np.testing.assert_allclose(out[0, 0].numpy(), expected, atol=1e-6)
    # Per sample: the brighter sample maps onto the very same [0, 1] ramp.
    np.testing.assert_allclose(out[1, 0].numpy(), expected, atol=1e-6)


def test_percentile_clip_of_a_constant_sample_is_zero_not_nan() -> None:
    pre = Preprocessor([{"op": "percentile_clip"}], spatial_dims=2, in_channels=1)
    out = pre(np.full((1, 4, 4), 7.0))
    assert torch.equal(out, torch.zeros(1, 1, 4, 4))


def test_window_maps_a_fixed_range_to_unit_interval() -> None:
    pre = Preprocessor([{"op": "window", "min": 1000, "max": 3000}], spatial_dims=2,
                       in_channels=1)
    data = np.array([[[0, 1000], [2000, 5000]]], dtype=np.uint16)
    out = pre(data)
    assert out[0, 0].tolist() == [[0.0, 0.0], [0.5, 1.0]]


def test_normalize_scalar_and_per_channel_after_repeat() -> None:
    scalar = Preprocessor([{"op": "normalize", "mean": 0.5, "std": 0.25}], spatial_dims=1,
                          in_channels=1)
    assert scalar(np.array([[0.0, 0.5, 1.0]]))[0, 0].tolist() == [-2.0, 0.0, 2.0]

    rgb = Preprocessor(
        [{"op": "repeat_channels", "channels": 3},
         {"op": "normalize", "mean": [0.0, 1.0, 2.0], "std": [1.0, 2.0, 4.0]}],
        spatial_dims=2, in_channels=3,
    )
    out = rgb(np.full((1, 2, 2), 2.0))
    assert out.shape == (1, 3, 2, 2)
    assert out[0, :, 0, 0].tolist() == [2.0, 0.5, 0.0]  # (2-0)/1, (2-1)/2, (2-2)/4


def test_repeat_channels_copies_grey_and_passes_matching_channels_through() -> None:
    pre = Preprocessor([{"op": "repeat_channels", "channels": 3}], spatial_dims=2,
                       in_channels=3)
    grey = np.arange(4, dtype=np.float32).reshape(1, 2, 2)
    out = pre(grey)
    for channel in range(3):
        assert torch.equal(out[0, channel], torch.from_numpy(grey[0]))
    rgb = np.random.default_rng(0).random((1, 3, 2, 2)).astype(np.float32)
    assert torch.equal(pre(rgb), torch.from_numpy(rgb))


def test_resize_uses_interpolate_with_linear_mode_per_dimension() -> None:
    pre = Preprocessor([{"op": "resize", "size": [4]}], spatial_dims=1, in_channels=1)
    out = pre(np.array([[0.0, 1.0]]))
    # align_corners=False: output sample i sits at source coordinate (i + 0.5) / 2 - 0.5,
    # clamped to [0, 1]: 0, 0.25, 0.75, 1.
    assert out[0, 0].tolist() == pytest.approx([0.0, 0.25, 0.75, 1.0])
    volume = Preprocessor([{"op": "resize", "size": 8, "mode": "nearest"}], spatial_dims=3,
                          in_channels=1)
    assert volume(np.zeros((2, 4, 4, 4))).shape == (2, 1, 8, 8, 8)
    assert volume.output_spatial_shape((4, 4, 4)) == (8, 8, 8)


def test_ops_run_in_card_order() -> None:
    steps = [{"op": "window", "min": 0, "max": 10}, {"op": "normalize", "mean": 0.5, "std": 0.5}]
    pre = Preprocessor(steps, spatial_dims=1, in_channels=1)
    assert pre(np.array([[0.0, 5.0, 10.0]]))[0, 0].tolist() == [-1.0, 0.0, 1.0]


def test_channel_axis_option_for_explicit_and_channels_last_data() -> None:
    pre = Preprocessor(spatial_dims=2, in_channels=3)
    channels_last = np.random.default_rng(1).random((2, 5, 6, 3)).astype(np.float32)
    out = pre(channels_last, channel_axis=-1)
    assert out.shape == (2, 3, 5, 6)
    assert torch.equal(out, torch.from_numpy(np.moveaxis(channels_last, -1, 1)))
    # channels-first data with the model's channel count is recognised by its dimensions
    assert pre(np.moveaxis(channels_last, -1, 1)).shape == (2, 3, 5, 6)
    with pytest.raises(ValueError, match="axis 0 is the batch"):
        pre(channels_last, channel_axis=0)


def test_accepts_dask_zarr_and_torch_without_aliasing_the_input() -> None:
    data = np.arange(32, dtype=np.float32).reshape(2, 4, 4)
    pre = Preprocessor(spatial_dims=2, in_channels=1)
    expected = torch.from_numpy(data).unsqueeze(1)
    store = zarr.zeros((2, 4, 4), dtype="float32")
    store[:] = data
    for source in (da.from_array(data, chunks=(1, 4, 4)), store, torch.from_numpy(data)):
        assert torch.equal(pre(source), expected)
    out = pre(data)
    out += 1  # the engine may work in place; the user's image must not change
    assert data[0, 0, 0] == 0.0


def test_nan_and_inf_input_is_refused_with_counts() -> None:
    pre = Preprocessor(spatial_dims=2, in_channels=1)
    data = np.zeros((1, 3, 3))
    data[0, 0, 0] = np.nan
    data[0, 1, 1] = np.inf
    with pytest.raises(ValueError, match=r"1 NaN and 1 infinite"):
        pre(data)


def test_wrong_channel_count_and_shape_get_clear_errors() -> None:
    pre = Preprocessor(spatial_dims=2, in_channels=3)
    with pytest.raises(ValueError, match="repeat_channels, channels: 3"):
        pre(np.zeros((1, 8, 8)))
    with pytest.raises(ValueError, match=r"add a batch axis"):
        Preprocessor(spatial_dims=2, in_channels=1)(np.zeros((8, 8)))
    with pytest.raises(TypeError, match="real-valued"):
        Preprocessor(spatial_dims=1, in_channels=1)(np.zeros((1, 4), dtype=complex))


@pytest.mark.parametrize(
    ("steps", "message"),
    [
        ([{"op": "normalise", "mean": 0, "std": 1}], r"unknown op 'normalise' \(did you mean "
                                                      r"'normalize'\?\)"),
        ([{"op": "window", "min": 0}], r"missing parameter\(s\) max"),
        ([{"op": "window", "min": 0, "max": 1, "clip": True}], "unknown parameter 'clip'"),
        ([{"op": "window", "min": 5, "max": 1}], "min < max"),
        ([{"op": "percentile_clip", "low": 99, "high": 1}], "0 <= low < high <= 100"),
        ([{"op": "normalize", "mean": 0, "std": 0}], "'std' must be positive"),
        ([{"op": "normalize", "mean": "zero", "std": 1}], "'mean' must be a finite number"),
        ([{"op": "repeat_channels", "channels": 2.5}], "positive integer"),
        ([{"op": "resize", "size": [8, 8, 8]}], "2 positive integer"),
        ([{"op": "resize", "size": [8, 8], "mode": "cubic"}], "'mode' must be one of"),
        (["window"], "each step is a mapping with an 'op' key"),
        ({"op": "window"}, "must be a list of steps"),
    ],
)
def test_bad_steps_name_the_step_and_the_problem(steps: object, message: str) -> None:
    with pytest.raises(PreprocessingError, match=message) as caught:
        validate_preprocessing(steps, spatial_dims=2)
    if isinstance(steps, list) and isinstance(steps[0], dict):
        assert "preprocessing[0]" in str(caught.value)


def test_validation_fills_defaults() -> None:
    (step,) = validate_preprocessing([{"op": "percentile_clip"}], spatial_dims=2)
    assert step == {"op": "percentile_clip", "low": 1.0, "high": 99.0}


def test_float64_values_beyond_float32_are_called_an_overflow_with_the_largest_value() -> None:
    """1e300 is finite; the message must not claim the data holds NaN or infinite values."""
    pre = Preprocessor(spatial_dims=2, in_channels=1)
    data = np.ones((1, 4, 4))
    data[0, 2, 1] = 1e300
    with pytest.raises(ValueError) as caught:
        pre(data)
    message = str(caught.value)
    assert "too large for the model's dtype float32" in message
    assert "largest |value| is 1e+300" in message and "overflow to infinity" in message
    assert "NaN" not in message
