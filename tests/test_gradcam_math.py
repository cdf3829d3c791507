"""Grad-CAM against its definition (Selvaraju et al. 2017), computed by hand with numpy.

α_k^c = (1/Z) Σ_s ∂y^c/∂A_k(s),   L^c = ReLU(Σ_k α_k^c A_k)

* On a GAP + linear head the gradient is W_ck / Z everywhere, so Grad-CAM = ReLU(CAM) / Z.
* On a nonlinear head the gradient is taken by central finite differences in float64.
* Upsampling is F.interpolate (linear / bilinear / trilinear, align_corners=False).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from napari_gradcam import GradCAM
from napari_gradcam.core.architectures import ResNetLike

SHAPES = {1: (12,), 2: (6, 7), 3: (4, 5, 3)}


def _gap_setup(hand, dims: int, seed: int = 3):
    model = hand.set_known_weights(hand.GapLinear(dims), seed).double().eval()
    x = np.random.default_rng(seed).normal(size=(2, 2, *SHAPES[dims]))
    weight = model.conv.weight.detach().numpy()
    bias = model.conv.bias.detach().numpy()
    activations = hand.relu(hand.conv1x1(x, weight, bias))  # (N, K, *s)
    return model, x, activations, model.fc.weight.detach().numpy(), model.fc.bias.detach().numpy()


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_gradcam_equals_relu_cam_over_positions_on_gap_linear(hand, dims):
    model, x, activations, fc_weight, _ = _gap_setup(hand, dims)
    z = int(np.prod(SHAPES[dims]))
    clipped_somewhere = positive_somewhere = False
    for c in range(fc_weight.shape[0]):
        maps = GradCAM(model, layer="relu")(x, target=c)
        assert maps.dtype == np.float32
        assert maps.shape == (2, *SHAPES[dims])
        for n in range(len(x)):
            cam = np.tensordot(fc_weight[c], activations[n], axes=(0, 0))  # Σ_k W_ck A_k
            expected = hand.relu(cam) / z
            np.testing.assert_allclose(maps[n], expected, rtol=1e-5, atol=1e-7)
            positive_somewhere |= bool((cam > 0).any())
            clipped_somewhere |= bool((cam < 0).any())
    # the comparison is not 0 == 0, and the ReLU was exercised
    assert positive_somewhere and clipped_somewhere


def test_per_sample_targets_pick_each_samples_class(hand):
    model, x, _, _, _ = _gap_setup(hand, 2)
    together = GradCAM(model, layer="relu")(x, target=[2, 0])
    np.testing.assert_allclose(together[0], GradCAM(model, "relu")(x[:1], target=2)[0])
    np.testing.assert_allclose(together[1], GradCAM(model, "relu")(x[1:], target=0)[0])


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_predicted_target_is_the_argmax_of_logits_computed_by_hand(hand, dims):
    model, x, activations, fc_weight, fc_bias = _gap_setup(hand, dims, seed=5)
    spatial_axes = tuple(range(2, activations.ndim))
    logits = activations.mean(axis=spatial_axes) @ fc_weight.T + fc_bias
    result = GradCAM(model, layer="relu").explain(x)
    np.testing.assert_allclose(result.outputs, logits, rtol=1e-6)
    np.testing.assert_array_equal(result.target_indices, logits.argmax(1))
    np.testing.assert_allclose(result.scores, logits.max(1), rtol=1e-6)


class _Square(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * x


def _nonlinear_head_model(dims: int, shape: tuple[int, ...], nonlinearity: nn.Module,
                          seed: int) -> nn.Sequential:
    """conv (3-wide, the target layer "0") → nonlinearity → flatten → Linear, float64."""
    torch.manual_seed(seed)
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims](2, 3, 3, padding=1)
    model = nn.Sequential(conv, nonlinearity, nn.Flatten(), nn.Linear(3 * int(np.prod(shape)), 4))
    return model.double().eval()


def _central_difference_gradient(head: nn.Module, activations: torch.Tensor, cls: int,
                                 step: float = 1e-6) -> np.ndarray:
    flat = activations.detach().clone().reshape(-1)
    gradient = np.zeros(flat.numel())
    with torch.no_grad():
        for i in range(flat.numel()):
            plus, minus = flat.clone(), flat.clone()
            plus[i] += step
            minus[i] -= step
            y_plus = head(plus.reshape(activations.shape))[0, cls]
            y_minus = head(minus.reshape(activations.shape))[0, cls]
            gradient[i] = float(y_plus - y_minus) / (2 * step)
    return gradient.reshape(activations.shape)


@pytest.mark.parametrize(
    ("dims", "nonlinearity"),
    [(1, _Square()), (2, nn.Tanh()), (2, _Square()), (3, nn.Tanh())],
)
def test_gradcam_matches_finite_difference_definition(dims, nonlinearity):
    shape = {1: (9,), 2: (5, 4), 3: (3, 3, 2)}[dims]
    model = _nonlinear_head_model(dims, shape, nonlinearity, seed=dims)
    x = torch.from_numpy(np.random.default_rng(dims).normal(size=(1, 2, *shape)))
    cls = 1
    with torch.no_grad():
        activations = model[0](x)
    gradient = _central_difference_gradient(model[1:], activations, cls)
    # the gradient really varies over space, so this is not the GAP special case
    assert np.ptp(gradient[0, 0]) > 1e-3
    spatial_axes = tuple(range(2, gradient.ndim))
    alpha = gradient.mean(axis=spatial_axes, keepdims=True)  # (1, K, 1...)
    expected = np.maximum((alpha * activations.numpy()).sum(1), 0)
    maps = GradCAM(model, layer="0", upsample=False)(x, target=cls)
    assert expected.max() > 0
    np.testing.assert_allclose(maps, expected, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize(("dims", "size", "mode"), [
    (1, (37,), "linear"), (2, (21, 18), "bilinear"), (3, (10, 9, 11), "trilinear"),
])
def test_upsampling_is_interpolate_align_corners_false(dims, size, mode):
    torch.manual_seed(dims)
    model = ResNetLike(spatial_dims=dims, widths=(4, 8, 8)).eval()
    x = torch.rand(2, 1, *size)
    small = GradCAM(model, "features.3", upsample=False)(x, target=1)
    assert small.shape[1:] != size  # the feature map really is smaller than the input
    big = GradCAM(model, "features.3")(x, target=1)
    expected = F.interpolate(torch.from_numpy(small)[:, None], size=size, mode=mode,
                             align_corners=False)[:, 0].numpy()
    assert big.shape == (2, *size)
    np.testing.assert_allclose(big, expected, rtol=1e-5, atol=1e-7)


def test_raw_maps_by_default_so_samples_keep_their_scale(hand):
    model, x, _, _, _ = _gap_setup(hand, 2)
    default = GradCAM(model, "relu")(x, target=1)
    explicit = GradCAM(model, "relu", normalize=None)(x, target=1)
    np.testing.assert_array_equal(default, explicit)
    peaks = default.reshape(len(default), -1).max(1)
    assert not np.isclose(peaks[0], peaks[1]) and peaks.max() != 1.0


def test_normalize_minmax_and_max_act_per_sample(hand):
    model, x, _, _, _ = _gap_setup(hand, 2)
    raw = GradCAM(model, "relu")(x, target=1).astype(np.float64)
    minmax = GradCAM(model, "relu", normalize="minmax")(x, target=1)
    by_max = GradCAM(model, "relu", normalize="max")(x, target=1)
    for n in range(len(raw)):
        low, high = raw[n].min(), raw[n].max()
        assert high > low
        np.testing.assert_allclose(minmax[n], (raw[n] - low) / (high - low), rtol=1e-5,
                                   atol=1e-6)
        np.testing.assert_allclose(by_max[n], raw[n] / high, rtol=1e-5, atol=1e-6)
        assert minmax[n].min() == pytest.approx(0.0, abs=1e-6)
        assert minmax[n].max() == pytest.approx(1.0)
        assert by_max[n].max() == pytest.approx(1.0)


def test_unknown_normalize_option_is_rejected_at_construction(hand):
    model = hand.GapLinear(2)
    with pytest.raises(ValueError, match="normalize must be"):
        GradCAM(model, "relu", normalize="zscore")
