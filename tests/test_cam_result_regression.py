"""``CAMResult.probabilities``: a softmax for class scores, the values for a regression target.

A regression head predicts properties (porosity, grain size); a softmax over one predicted
value is always 1.0 and over several mixes unrelated quantities. The model here is a global
average pool and a linear head, whose outputs are known in closed form.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from napari_gradcam.core.methods import GradCAM, GuidedBackprop, ScoreCAM
from napari_gradcam.core.targets import ClassTarget, RegressionTarget


class PoolLinear(nn.Module):
    def __init__(self, outputs: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.head = nn.Linear(3, outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x)).mean((2, 3)))


def closed_form(model: PoolLinear, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        pooled = torch.relu(model.conv(x)).mean((2, 3))
        return (pooled @ model.head.weight.T + model.head.bias).numpy()


@pytest.mark.parametrize("method", [GradCAM, ScoreCAM])
@pytest.mark.parametrize("outputs", [1, 3])
def test_a_regression_result_gives_the_predicted_values(method, outputs) -> None:
    model = PoolLinear(outputs)
    x = torch.rand(2, 1, 12, 12, generator=torch.Generator().manual_seed(1))
    result = method(model, "conv").explain(x, RegressionTarget(0, sign=-1))
    assert result.is_regression
    np.testing.assert_allclose(result.probabilities, closed_form(model, x), rtol=1e-5,
                               atol=1e-7)


def test_input_gradient_methods_know_a_regression_target_too() -> None:
    model = PoolLinear(2)
    x = torch.rand(2, 1, 12, 12, generator=torch.Generator().manual_seed(2))
    result = GuidedBackprop(model).explain(x, RegressionTarget(1))
    np.testing.assert_allclose(result.probabilities, closed_form(model, x), rtol=1e-5,
                               atol=1e-7)


def test_a_class_result_still_gives_a_softmax() -> None:
    model = PoolLinear(3)
    x = torch.rand(2, 1, 12, 12, generator=torch.Generator().manual_seed(3))
    result = GradCAM(model, "conv").explain(x, ClassTarget(1))
    assert not result.is_regression
    expected = torch.softmax(torch.from_numpy(closed_form(model, x)), 1).numpy()
    np.testing.assert_allclose(result.probabilities, expected, rtol=1e-5)


def test_a_segmentation_result_gives_the_cores_one_definition_of_class_probabilities() -> None:
    """A U-Net's outputs (N, K, H, W): the per-pixel softmax averaged over the pixels, the
    numbers :func:`~napari_gradcam.core.metrics.class_probabilities` gives (and a map's
    provenance records), not a second per-pixel table."""
    from napari_gradcam.core.metrics import class_probabilities
    from napari_gradcam.core.targets import SegmentationRegion

    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 3, 1))
    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    result = GradCAM(model, "0").explain(x, SegmentationRegion(1))
    with torch.no_grad():
        logits = model(x).numpy().astype(np.float64)
    per_pixel = np.exp(logits - logits.max(1, keepdims=True))
    per_pixel /= per_pixel.sum(1, keepdims=True)
    expected = per_pixel.mean((2, 3))  # (N, K): each class's share of the image
    assert result.probabilities.shape == (2, 3)
    np.testing.assert_allclose(result.probabilities, expected, rtol=1e-5)
    np.testing.assert_allclose(result.probabilities.sum(1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(result.probabilities, class_probabilities(result.outputs))
