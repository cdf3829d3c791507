"""core.metrics: each score against its definition on inputs small enough to work out by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_gradcam.core import metrics
from napari_gradcam.core.metrics import (
    class_probabilities,
    energy_share,
    energy_share_by_label,
    iou_per_class,
    peak_position,
    pointing_game,
    pointing_hits,
)
from napari_gradcam.core.targets import RegressionTarget


def test_pointing_hit_by_hand_with_tolerance_and_spacing() -> None:
    # one row of 8 pixels; the mask is pixel 5; the peak is at pixel 2 (3 pixels away)
    heat = np.array([[0.0, 1.0, 9.0, 1.0, 0.0, 0.0, 0.0, 0.0]])[:, None, :]  # (1, 1, 8)
    mask = np.zeros_like(heat, dtype=bool)
    mask[0, 0, 5] = True
    assert not pointing_hits(heat, mask)[0]
    assert not pointing_hits(heat, mask, tolerance=2.9)[0]
    assert pointing_hits(heat, mask, tolerance=3.0)[0]  # distance 3 <= 3
    # 0.5 µm per pixel along x: 1.5 µm away
    assert pointing_hits(heat, mask, tolerance=1.5, spacing=(1.0, 0.5))[0]
    assert not pointing_hits(heat, mask, tolerance=1.4, spacing=(1.0, 0.5))[0]
    # Euclidean, not per-axis: peak (0,0), mask (3,4) is 5 away
    square = np.zeros((1, 6, 6))
    square[0, 0, 0] = 1.0
    target = np.zeros((1, 6, 6), dtype=bool)
    target[0, 3, 4] = True
    assert not pointing_hits(square, target, tolerance=4.99)[0]
    assert pointing_hits(square, target, tolerance=5.0)[0]


def test_pointing_edge_cases_flat_negative_ties_and_empty_masks() -> None:
    mask = np.array([[[True, False, False]]])
    assert not pointing_hits(np.zeros((1, 1, 3)), mask, tolerance=10)[0]  # flat: points nowhere
    # all negative but not flat: the peak is the largest value (-1 at pixel 0) -> hit
    assert pointing_hits(np.array([[[-1.0, -5.0, -3.0]]]), mask)[0]
    # a tie: the first maximum in C order
    assert peak_position(np.array([[2.0, 0.0], [2.0, 1.0]])) == (0, 0)
    assert peak_position(np.full((3, 3), 7.0)) is None
    maps = np.stack([np.eye(3), np.eye(3)[::-1]])
    masks = np.zeros((2, 3, 3), dtype=bool)
    masks[:, 0, 0] = True
    assert pointing_hits(maps, masks).tolist() == [True, False]
    assert pointing_game(maps, masks) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="empty masks"):
        pointing_hits(maps, np.zeros_like(masks))
    with pytest.raises(ValueError, match="tolerance"):
        pointing_hits(maps, masks, tolerance=-1)
    with pytest.raises(ValueError, match="spacing"):
        pointing_hits(maps, masks, tolerance=1, spacing=(1.0,))


def test_energy_share_is_the_positive_part_and_nan_without_positive_mass() -> None:
    maps = np.array([
        [[1.0, -3.0], [0.0, 4.0]],     # positive mass 5, 4 of it in the mask
        [[0.0, 0.0], [0.0, 0.0]],      # no mass at all
        [[-1.0, -2.0], [-3.0, -4.0]],  # only negative values
        [[2.0, 2.0], [2.0, 2.0]],      # uniform: the share is the mask's area share
    ])
    masks = np.zeros((4, 2, 2), dtype=bool)
    masks[:, 1, 1] = True
    masks[:, 0, 1] = True  # the -3 is inside too and must not count (|map| would give 7/8)
    shares = energy_share(maps, masks)
    np.testing.assert_allclose(shares[[0, 3]], [4 / 5, 2 / 4])
    assert np.isnan(shares[1]) and np.isnan(shares[2])
    np.testing.assert_allclose(energy_share(maps, masks, empty=0.0), [0.8, 0.0, 0.0, 0.5])
    with pytest.raises(ValueError, match="boolean"):
        energy_share(maps, masks.astype(int) * 2)


def test_energy_share_by_label_equals_energy_share_per_label() -> None:
    rng = np.random.default_rng(0)
    heat = rng.normal(size=(6, 7))
    labels = rng.integers(0, 4, size=(6, 7))
    ids = [1, 2, 3]
    fast = energy_share_by_label(heat, labels, ids)
    slow = [energy_share(heat[None], (labels == i)[None])[0] for i in ids]
    np.testing.assert_allclose(fast, slow)
    assert np.isnan(energy_share_by_label(-np.abs(heat), labels, ids)).all()


def test_samples_metrics_is_the_same_definition_with_the_cards_empty_convention() -> None:
    from napari_gradcam.samples import metrics as samples_metrics

    assert samples_metrics.pointing_hits is metrics.pointing_hits
    assert samples_metrics.iou_per_class is metrics.iou_per_class
    maps = np.array([[[1.0, 3.0]], [[0.0, 0.0]]])
    masks = np.array([[[False, True]], [[False, True]]])
    np.testing.assert_allclose(samples_metrics.energy_share(maps, masks), [0.75, 0.0])


def test_iou_per_class_by_hand() -> None:
    prediction = np.array([0, 0, 1, 1, 2])
    truth = np.array([0, 1, 1, 1, 1])
    iou = iou_per_class(prediction, truth, 4)
    # class 0: {0,1} vs {0} -> 1/2; class 1: {2,3} vs {1,2,3,4} -> 2/4; class 2: {4} vs {} -> 0
    np.testing.assert_allclose(iou[:3], [0.5, 0.5, 0.0])
    assert np.isnan(iou[3])  # in neither: undefined, not 0 or 1


def test_class_probabilities_against_the_softmax_formula() -> None:
    logits = np.array([[0.0, np.log(3.0)], [np.log(2.0), np.log(2.0)]], dtype=np.float32)
    np.testing.assert_allclose(class_probabilities(logits), [[0.25, 0.75], [0.5, 0.5]],
                               rtol=1e-6)
    # segmentation (1, 2, 2 pixels): pixel 0 softmax (0.25, 0.75), pixel 1 (0.5, 0.5) -> mean
    seg = np.array([[[0.0, np.log(2.0)], [np.log(3.0), np.log(2.0)]]], dtype=np.float32)
    np.testing.assert_allclose(class_probabilities(seg), [[0.375, 0.625]], rtol=1e-6)
    # a torch tensor is accepted and gives the same numbers
    np.testing.assert_allclose(class_probabilities(torch.from_numpy(seg)), [[0.375, 0.625]],
                               rtol=1e-6)
    # no class axis, or a regression target: the values as they are, one row per sample
    np.testing.assert_allclose(class_probabilities(np.array([0.3, 0.7])), [[0.3], [0.7]])
    porosity = np.array([[0.12], [0.30]], dtype=np.float32)
    np.testing.assert_allclose(class_probabilities(porosity, RegressionTarget(0)), porosity)
    assert class_probabilities(logits).dtype == np.float32
