"""Regression heads (porosity, grain size, strength): RegressionTarget and its sign convention.

The model is conv (1x1) → ReLU → global average pooling → Linear(C, P): the prediction p is
sum_k W_pk mean_s A_k(s) + b_p, so dp/dA_k(s) = W_pk / Z everywhere (Z positions). Grad-CAM's
weights are therefore W_pk / Z and its map ReLU(sign · sum_k W_pk A_k) / Z, computed below
with numpy from the weights.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from napari_gradcam import GradCAM, RegressionTarget, explain_volume


def regression_model(hand, spatial_dims: int, properties: int) -> nn.Module:
    model = hand.GapLinear(spatial_dims, in_channels=2, channels=4, classes=properties)
    return hand.set_known_weights(model, seed=21).eval()


def by_hand(hand, model: nn.Module, x: np.ndarray, index: int, sign: int) -> np.ndarray:
    conv = model.conv
    activations = hand.relu(hand.conv1x1(x, conv.weight.detach().numpy(),
                                         conv.bias.detach().numpy()))
    positions = int(np.prod(activations.shape[2:]))
    weights = model.fc.weight.detach().numpy()[index] / positions  # Grad-CAM weights
    return hand.relu(sign * np.einsum("k,nk...->n...", weights, activations))


@pytest.mark.parametrize("spatial_dims", [1, 2, 3])
@pytest.mark.parametrize("sign", [1, -1])
def test_regression_map_is_the_linear_head_over_the_feature_map(hand, spatial_dims, sign):
    model = regression_model(hand, spatial_dims, properties=3)
    x = np.random.default_rng(22).normal(size=(2, 2, *(6,) * spatial_dims)).astype(np.float32)
    result = GradCAM(model, "relu").explain(x, target=RegressionTarget(output_index=1,
                                                                        sign=sign))
    expected = by_hand(hand, model, x, index=1, sign=sign)
    assert expected.max() > 0
    np.testing.assert_allclose(result.maps, expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(result.scores, sign * result.outputs[:, 1], rtol=1e-6)
    assert result.target_indices is None  # a property, not a class
    assert result.target == (f"regression output 1 (sign {sign:+d}: what "
                             f"{'increases' if sign > 0 else 'decreases'} it)")


def test_increase_and_decrease_maps_are_the_two_halves_of_the_signed_map(hand):
    model = regression_model(hand, 2, properties=1)
    x = np.random.default_rng(23).normal(size=(1, 2, 8, 8)).astype(np.float32)
    up = GradCAM(model, "relu")(x, target=RegressionTarget())
    down = GradCAM(model, "relu")(x, target=RegressionTarget(sign=-1))
    signed = by_hand(hand, model, x, 0, 1) - by_hand(hand, model, x, 0, -1)  # no ReLU
    np.testing.assert_allclose(up - down, signed, rtol=1e-5, atol=1e-7)
    assert up.max() > 0 and down.max() > 0
    assert not np.any((up > 0) & (down > 0))  # a position pushes the prediction one way


class Flat(nn.Module):
    """A head that returns one value per sample as shape (N,)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)[:, 0]


def test_single_output_needs_no_index_in_either_shape(hand):
    model = regression_model(hand, 2, properties=1)
    x = np.random.default_rng(24).normal(size=(2, 2, 5, 5)).astype(np.float32)
    column = GradCAM(model, "relu")(x, target=RegressionTarget())
    flat = GradCAM(Flat(model), "inner.relu")(x, target=RegressionTarget())
    np.testing.assert_allclose(flat, column, rtol=1e-6)
    np.testing.assert_allclose(column, by_hand(hand, model, x, 0, 1), rtol=1e-5, atol=1e-7)


def test_regression_mistakes_are_named(hand):
    model = regression_model(hand, 2, properties=3)
    x = np.zeros((1, 2, 4, 4), dtype=np.float32)
    with pytest.raises(ValueError, match=r"predicts 3 values per sample.*output_index=0..2"):
        GradCAM(model, "relu")(x, target=RegressionTarget())
    with pytest.raises(ValueError, match=r"output_index=3 is out of range for 3"):
        GradCAM(model, "relu")(x, target=RegressionTarget(output_index=3))
    with pytest.raises(ValueError, match=r"sign must be \+1 .* or -1"):
        RegressionTarget(sign=2)
    with pytest.raises(TypeError, match="output_index must be an integer"):
        RegressionTarget(output_index="porosity")  # type: ignore[arg-type]
    unet = nn.Sequential(nn.Conv2d(2, 3, 1), nn.ReLU(), nn.Conv2d(3, 2, 1))
    with pytest.raises(ValueError, match=r"needs predictions \(N,\) or \(N, P\).*"
                                         r"\(1, 2, 4, 4\)"):
        GradCAM(unet, "1")(x, target=RegressionTarget(output_index=0))


def test_explain_volume_slices_with_a_regression_target(hand):
    model = regression_model(hand, 2, properties=2)
    volume = np.random.default_rng(25).normal(size=(4, 6, 6)).astype(np.float32)

    def two_channels(batch: np.ndarray) -> torch.Tensor:  # the model reads 2 channels
        grey = torch.from_numpy(batch).unsqueeze(1)
        return torch.cat([grey, -grey], dim=1)

    target = RegressionTarget(output_index=1, sign=-1)
    result = explain_volume(GradCAM(model, "relu"), volume, mode="slices", batch_size=3,
                            target=target, preprocess=two_channels)
    stack = two_channels(volume).numpy()
    expected = by_hand(hand, model, stack, index=1, sign=-1)
    assert expected.max() > 0
    np.testing.assert_allclose(np.asarray(result.maps), expected, rtol=1e-5, atol=1e-7)
    assert result.target_indices is None


def test_volume_predictions_of_a_regression_target_are_the_raw_properties():
    """A softmax over two predicted properties would report probabilities; the volume loop
    must report the predicted values themselves."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(4, 2)).eval()
    volume = np.random.default_rng(0).random((3, 8, 8)).astype(np.float32)
    result = explain_volume(GradCAM(model, "0"), volume, mode="slices", axis=0,
                            target=RegressionTarget(output_index=1))
    with torch.no_grad():
        expected = model(torch.from_numpy(volume)[:, None]).numpy()
    np.testing.assert_allclose(np.asarray(result.predictions), expected, rtol=1e-5, atol=1e-6)
