"""Property-based checks: whatever the shape and dtype of a valid input, every CAM method returns
float32 maps of shape (N, *spatial) that are finite and non-negative, and "minmax" maps lie in
[0, 1]."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from napari_gradcam import METHODS, make_explainer

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
POOL = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}
DTYPES = [np.float32, np.float64, np.uint8, np.int16]
CAM_METHODS = [name for name in METHODS if name not in ("guided-backprop", "guided-gradcam")]


def _tiny_net(dims: int, channels: int) -> nn.Module:
    """conv (stride 2, so maps are upsampled) → ReLU → conv → ReLU → GAP → Linear."""
    torch.manual_seed(dims * 10 + channels)
    conv = CONV[dims]
    return nn.Sequential(
        conv(channels, 4, 3, stride=2, padding=1), nn.ReLU(),
        conv(4, 5, 3, padding=1), nn.ReLU(),
        POOL[dims](1), nn.Flatten(), nn.Linear(5, 3),
    ).eval()


NETS = {(dims, channels): _tiny_net(dims, channels) for dims in (1, 2, 3) for channels in (1, 2, 3)}


@st.composite
def batches(draw) -> np.ndarray:
    dims = draw(st.integers(1, 3))
    spatial = tuple(draw(st.lists(st.integers(4, 20), min_size=dims, max_size=dims)))
    if dims == 3:  # keep 3D volumes small enough for a fast test
        spatial = tuple(min(s, 10) for s in spatial)
    n, channels = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        data = rng.integers(max(info.min, -1000), min(info.max, 1000), size=(n, channels,
                                                                            *spatial))
    else:
        data = rng.normal(size=(n, channels, *spatial)) * draw(st.sampled_from([1e-3, 1, 1e3]))
    return data.astype(dtype)


@settings(deadline=None, max_examples=20)
@given(x=batches(), method=st.sampled_from(CAM_METHODS),
       layer=st.sampled_from(["1", "3", ["1", "3"]]))
def test_maps_are_float32_finite_non_negative_at_input_size(x, method, layer):
    dims, channels = x.ndim - 2, x.shape[1]
    if method == "cam":
        layer = "3"  # CAM needs the layer its GAP + linear head reads
    maps = make_explainer(method, NETS[dims, channels], layer)(x, target=None)
    assert maps.dtype == np.float32
    assert maps.shape == (x.shape[0], *x.shape[2:])
    assert np.isfinite(maps).all()
    assert (maps >= 0).all()


@settings(deadline=None, max_examples=20)
@given(x=batches(), method=st.sampled_from(CAM_METHODS))
def test_minmax_maps_lie_in_the_unit_interval(x, method):
    dims, channels = x.ndim - 2, x.shape[1]
    maps = make_explainer(method, NETS[dims, channels], "3", normalize="minmax")(x, target=0)
    assert maps.dtype == np.float32
    assert np.isfinite(maps).all()
    assert maps.min() >= 0.0 and maps.max() <= 1.0 + 1e-6
    for sample in maps:  # each map spans [0, 1] unless it is constant
        if np.ptp(sample) > 0:
            assert sample.min() == pytest.approx(0.0, abs=1e-6)
            assert sample.max() == pytest.approx(1.0, abs=1e-5)
