"""Display scopes of a map (:mod:`napari_gradcam.core.normalise`), on arrays whose answers are
read off by hand. No napari: these are the numbers the docks put on screen."""

from __future__ import annotations

import numpy as np
import pytest

from napari_gradcam.core.normalise import (
    SCOPES,
    full_limits,
    robust_limits,
    scaled_along,
    scope_limits,
    top_percentile,
    weak_rows,
)


def volume() -> np.ndarray:
    """Slice z holds the values z*10 .. z*10 + 5 (so each slice's range is known)."""
    base = np.arange(6, dtype=np.float32).reshape(2, 3)
    return np.stack([base + 10 * z for z in range(4)])


def test_scopes_give_the_ranges_they_promise():
    data = volume()
    assert SCOPES[0] == "raw"
    assert scope_limits(data, "raw", raw=(0.0, 7.5)) == (0.0, 7.5)
    assert scope_limits(data, "per volume") == (0.0, 35.0)
    assert scope_limits(data, "per slice", current=[2, None, None]) == (20.0, 25.0)
    assert scope_limits(data, "per slice", current=[9, None, None]) == (30.0, 35.0)  # clipped
    # no fixed axis (the 3D view): the whole map
    assert scope_limits(data, "per slice", current=[None, None, None]) == (0.0, 35.0)
    with pytest.raises(ValueError, match="normalisation scope must be one of"):
        scope_limits(data, "per row")
    with pytest.raises(ValueError, match="has 2 entries but the map has 3 axes"):
        scope_limits(data, "per slice", current=[1, None])


def test_raw_range_ignores_a_few_hot_pixels_and_constant_maps_get_a_range():
    data = np.zeros(10_000, dtype=np.float32)
    data[:100] = 1.0
    data[0] = 1e6  # one hot pixel
    low, high = robust_limits(data)
    assert low == 0.0 and high == pytest.approx(1.0)
    assert full_limits(np.full(5, 3.0)) == (3.0, 4.0)
    assert robust_limits(np.array([np.nan])) == (0.0, 1.0)


def test_rows_scaled_to_their_own_maximum_lazily_and_the_data_untouched():
    data = np.array([[0.0, 1.0, 2.0], [0.0, 0.0, 0.0], [5.0, 10.0, 0.0]], dtype=np.float32)
    before = data.copy()
    view = scaled_along(data, axis=0)
    assert type(view).__module__.startswith("dask")  # nothing computed yet
    np.testing.assert_allclose(np.asarray(view), [[0, 0.5, 1], [0, 0, 0], [0.5, 1, 0]])
    np.testing.assert_allclose(np.asarray(scaled_along(data, axis=1)),
                               [[0, 0.1, 1], [0, 0, 0], [1, 1, 0]])
    np.testing.assert_array_equal(data, before)


def test_weak_rows_and_the_top_percentile():
    data = np.array([[0.0, 1.0], [0.0, 0.05], [0.0, 0.5]])
    assert weak_rows(data, axis=0, fraction=0.1, limits=(0.0, 1.0)) == 1
    assert weak_rows(data, axis=0, fraction=0.6, limits=(0.0, 1.0)) == 2
    values = np.zeros(1000)
    values[:100] = np.arange(1, 101)  # 900 zeros, then 1..100
    assert top_percentile(values, 95.0) == pytest.approx(np.percentile(np.arange(1, 101), 95))
    assert top_percentile(np.zeros(4)) == 0.0
