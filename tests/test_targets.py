"""Targets: which score is explained (a class, each sample's class, the prediction, every class,
a segmentation region, any callable), and clear errors for targets that cannot work."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from napari_gradcam import GradCAM, SegmentationRegion


def test_int_target_explains_that_class_for_every_sample(resnet2d, images):
    result = GradCAM(resnet2d, "features.3").explain(images, target=2)
    np.testing.assert_array_equal(result.target_indices, [2, 2])
    np.testing.assert_allclose(result.scores, result.outputs[:, 2], rtol=1e-6)
    other = GradCAM(resnet2d, "features.3")(images, target=0)
    assert not np.allclose(result.maps, other)  # the class changes the map


def test_negative_int_counts_from_the_last_class(resnet2d, images):
    last = GradCAM(resnet2d, "features.3")(images, target=-1)
    np.testing.assert_array_equal(last, GradCAM(resnet2d, "features.3")(images, target=2))


def test_per_sample_list_equals_one_call_per_sample(resnet2d, images):
    together = GradCAM(resnet2d, "features.3").explain(images, target=[2, 0])
    np.testing.assert_array_equal(together.target_indices, [2, 0])
    for n, cls in enumerate([2, 0]):
        alone = GradCAM(resnet2d, "features.3")(images[n:n + 1], target=cls)
        np.testing.assert_allclose(together.maps[n], alone[0], rtol=1e-5, atol=1e-7)
    as_array = GradCAM(resnet2d, "features.3")(images, target=np.array([2, 0]))
    np.testing.assert_array_equal(as_array, together.maps)


@pytest.mark.parametrize("spelling", [None, "predicted"])
def test_predicted_target_is_the_argmax(resnet2d, spelling):
    x = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(5))
    result = GradCAM(resnet2d, "features.3").explain(x, target=spelling)
    np.testing.assert_array_equal(result.target_indices, result.outputs.argmax(1))
    np.testing.assert_allclose(result.scores, result.outputs.max(1), rtol=1e-6)
    explicit = GradCAM(resnet2d, "features.3")(x, target=list(result.outputs.argmax(1)))
    np.testing.assert_array_equal(result.maps, explicit)


def test_all_classes_stacks_the_per_class_maps(resnet2d, images):
    everything = GradCAM(resnet2d, "features.3")(images, target="all")
    assert everything.shape == (2, 3, 16, 16)
    for cls in range(3):
        np.testing.assert_allclose(everything[:, cls],
                                   GradCAM(resnet2d, "features.3")(images, target=cls),
                                   rtol=1e-5, atol=1e-7)
    assert not np.allclose(everything[:, 0], everything[:, 1])


def test_all_classes_with_normalisation_is_per_class_and_sample(resnet2d, images):
    everything = GradCAM(resnet2d, "features.3", normalize="max")(images, target="all")
    peaks = everything.reshape(2, 3, -1).max(-1)
    for n in range(2):
        for cls in range(3):
            if peaks[n, cls] > 0:
                assert peaks[n, cls] == pytest.approx(1.0)


@pytest.fixture
def region():
    mask = np.zeros((16, 16), dtype=bool)
    mask[4:10, 6:12] = True
    return mask


def test_segmentation_region_scores_the_class_logits_inside_the_mask(unet2d, images, region):
    result = GradCAM(unet2d, "dec0").explain(images, target=SegmentationRegion(1, region))
    expected_scores = result.outputs[:, 1][:, region].sum(1)
    np.testing.assert_allclose(result.scores, expected_scores, rtol=1e-5)
    np.testing.assert_array_equal(result.target_indices, [1, 1])
    by_hand = GradCAM(unet2d, "dec0")(
        images, target=lambda out: (out[:, 1] * torch.from_numpy(region)).sum((1, 2)))
    np.testing.assert_allclose(result.maps, by_hand, rtol=1e-5, atol=1e-7)
    assert result.maps.max() > 0
    whole = GradCAM(unet2d, "dec0")(images, target=SegmentationRegion(1))
    assert not np.allclose(whole, result.maps)  # the region matters


def test_segmentation_region_mask_per_sample(unet2d, images, region):
    masks = np.stack([region, ~region])
    result = GradCAM(unet2d, "dec0").explain(images, target=SegmentationRegion(0, masks))
    np.testing.assert_allclose(result.scores[0], result.outputs[0, 0][region].sum(), rtol=1e-5)
    np.testing.assert_allclose(result.scores[1], result.outputs[1, 0][~region].sum(), rtol=1e-5)


def test_segmentation_region_errors(unet2d, resnet2d, images, region):
    cam = GradCAM(unet2d, "dec0")
    with pytest.raises(ValueError, match="mask is empty"):
        cam(images, target=SegmentationRegion(1, np.zeros((16, 16), dtype=bool)))
    with pytest.raises(ValueError, match=r"mask has shape \(8, 8\).*\(16, 16\)"):
        cam(images, target=SegmentationRegion(1, np.ones((8, 8), dtype=bool)))
    with pytest.raises(ValueError, match="out of range for 3 output classes"):
        cam(images, target=SegmentationRegion(7, region))
    with pytest.raises(ValueError, match="needs a segmentation output"):
        GradCAM(resnet2d, "features.3")(images, target=SegmentationRegion(1, region))
    with pytest.raises(ValueError, match="SegmentationRegion"):
        cam(images)  # no single predicted class for a per-pixel output


class _Regressor(nn.Module):
    """GAP + linear with one output, returned as (N,): e.g. a porosity regressor."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 1)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.relu(self.conv(x)).mean((2, 3)))[:, 0]


def test_callable_target_on_a_regression_head(hand):
    model = hand.set_known_weights(_Regressor(), seed=8).double().eval()
    x = np.random.default_rng(8).normal(size=(2, 1, 5, 4))
    result = GradCAM(model, "relu").explain(x, target=lambda out: out)
    a = hand.relu(hand.conv1x1(x, model.conv.weight.detach().numpy(),
                               model.conv.bias.detach().numpy()))
    expected = hand.relu(np.tensordot(model.fc.weight.detach().numpy()[0], a, axes=(0, 1))) / 20
    assert expected.max() > 0
    np.testing.assert_allclose(result.maps, expected, rtol=1e-5, atol=1e-7)
    assert result.target_indices is None
    np.testing.assert_allclose(result.scores, result.outputs, rtol=1e-6)
    # a negated score explains "what lowers the prediction"
    lowered = GradCAM(model, "relu")(x, target=lambda out: -out)
    np.testing.assert_allclose(
        lowered, hand.relu(-np.tensordot(model.fc.weight.detach().numpy()[0], a,
                                         axes=(0, 1))) / 20, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match=r"RegressionTarget\(output_index"):
        GradCAM(model, "relu")(x)  # no class axis: "predicted" makes no sense


def test_bad_targets_get_clear_errors(resnet2d, images):
    cam = GradCAM(resnet2d, "features.3")
    with pytest.raises(ValueError, match="out of range for 3 classes"):
        cam(images, target=3)
    with pytest.raises(ValueError, match="out of range"):
        cam(images, target=[0, -4])
    with pytest.raises(ValueError, match="got 3 target classes for a batch of 2"):
        cam(images, target=[0, 1, 2])
    with pytest.raises(ValueError, match="unknown target 'crack'"):
        cam(images, target="crack")
    with pytest.raises(TypeError, match="boolean is not a target"):
        cam(images, target=True)
    with pytest.raises(TypeError, match="cannot use float as a target"):
        cam(images, target=1.5)
    with pytest.raises(ValueError, match="one score per sample"):
        cam(images, target=lambda out: out)  # (N, K), not (N,)
    with pytest.raises(TypeError, match="must return a tensor"):
        cam(images, target=lambda out: 1.0)
