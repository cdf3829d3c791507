"""Each CAM method against its paper's formula, computed by hand on models with known gradients.

The workhorse is ``conv1x1 → square → flatten → Linear``: the target layer's activations A
are a per-position matrix product, and the gradient of class c is known in closed form,
G_k(s) = 2 W_c,(k,s) A_k(s), which varies over space and changes sign (unlike a GAP head).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from napari_gradcam import (
    CAM,
    GradCAM,
    GradCAMElementWise,
    GradCAMPlusPlus,
    GuidedBackprop,
    GuidedGradCAM,
    HiResCAM,
    LayerCAM,
    SegmentationRegion,
    ShapleyCAM,
    XGradCAM,
    make_explainer,
)

SHAPE = (5, 6)


class _Square(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * x


@pytest.fixture
def square_head(hand):
    """(model, x, A, G) with A > 0 (positive conv weights and inputs) and G of both signs."""
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 1)
    hand.set_known_weights(conv, seed=11, positive=True)
    linear = hand.set_known_weights(nn.Linear(3 * int(np.prod(SHAPE)), 4), seed=12)
    model = nn.Sequential(conv, _Square(), nn.Flatten(), linear).double().eval()
    x = np.abs(np.random.default_rng(13).normal(size=(2, 2, *SHAPE)))
    activations = hand.conv1x1(x, conv.weight.detach().double().numpy(),
                               conv.bias.detach().double().numpy())
    cls = 2
    w = linear.weight.detach().double().numpy()[cls].reshape(3, *SHAPE)
    gradients = 2 * w[None] * activations  # dy_c/dA for every sample, (N, K, *s)
    assert (activations > 0).all()
    assert (gradients > 0).any() and (gradients < 0).any()
    return model, x, activations, gradients, cls


def _combine(weights: np.ndarray, activations: np.ndarray) -> np.ndarray:
    """ReLU(Σ_k w_k A_k) with weights (N, K)."""
    return np.maximum((weights[:, :, None, None] * activations).sum(1), 0)


def _assert_maps(actual: np.ndarray, expected: np.ndarray) -> None:
    assert expected.max() > 0
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6 * expected.max())


def test_gradcam_on_the_square_head(square_head):
    model, x, a, g, cls = square_head
    _assert_maps(GradCAM(model, "0")(x, cls), _combine(g.mean((2, 3)), a))


def test_gradcam_plus_plus_alpha_formula(square_head):
    model, x, a, g, cls = square_head
    assert np.ptp(g, axis=(2, 3)).min() > 0  # gradients vary over space in every channel
    activation_sums = a.sum((2, 3), keepdims=True)
    denominator = 2 * g**2 + activation_sums * g**3
    alpha = np.where(denominator != 0, g**2 / np.where(denominator != 0, denominator, 1), 0)
    weights = (alpha * np.maximum(g, 0)).sum((2, 3))
    expected = _combine(weights, a)
    _assert_maps(GradCAMPlusPlus(model, "0")(x, cls), expected)
    # and it is a different method: Grad-CAM's weights give another map here
    assert not np.allclose(GradCAM(model, "0")(x, cls), expected, rtol=1e-3)


def test_hirescam_is_elementwise_gradient_times_activation(square_head):
    model, x, a, g, cls = square_head
    _assert_maps(HiResCAM(model, "0")(x, cls), np.maximum((g * a).sum(1), 0))


def test_hirescam_equals_gradcam_when_gradient_is_constant_over_space(hand):
    """With G_k(s) = g_k for all s, Σ_k G_k A_k = Σ_k mean_s(G_k) A_k: the two coincide.

    (Not Z × Grad-CAM: the factor Z relates CAM, which uses W_ck, to Grad-CAM, whose
    gradient is W_ck / Z.)
    """
    model = hand.set_known_weights(hand.GapLinear(2), seed=4).eval()
    x = torch.from_numpy(np.random.default_rng(4).normal(size=(2, 2, *SHAPE))).float()
    positive = False
    for cls in range(3):
        hires = HiResCAM(model, "relu")(x, cls)
        np.testing.assert_allclose(hires, GradCAM(model, "relu")(x, cls), rtol=1e-5, atol=1e-7)
        positive |= bool(hires.max() > 0)
    assert positive


def test_xgradcam_weights(square_head):
    model, x, a, g, cls = square_head
    weights = (a * g).sum((2, 3)) / a.sum((2, 3))
    _assert_maps(XGradCAM(model, "0")(x, cls), _combine(weights, a))


def test_layercam_is_relu_gradient_times_activation(square_head):
    model, x, a, g, cls = square_head
    expected = np.maximum((np.maximum(g, 0) * a).sum(1), 0)
    _assert_maps(LayerCAM(model, "0")(x, cls), expected)
    assert not np.allclose(HiResCAM(model, "0")(x, cls), expected)  # the inner ReLU matters


def test_gradcam_elementwise_clips_each_channels_product(square_head):
    model, x, a, g, cls = square_head
    expected = np.maximum(g * a, 0).sum(1)
    _assert_maps(GradCAMElementWise(model, "0")(x, cls), expected)
    # not HiResCAM: there the negative products cancel part of the positive ones
    assert not np.allclose(HiResCAM(model, "0")(x, cls), expected, rtol=1e-3)


class _PlusSquare(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + x * x


def test_shapleycam_uses_gradient_minus_half_hessian_times_activation(square_head):
    """Head y = Σ W (A + A²) + b: G = W (1 + 2A), H A = 2 W A, so G - ½ H A = W (1 + A),
    which is not proportional to the gradient (Grad-CAM weighs by mean W (1 + 2A))."""
    square_model, x, a, _, cls = square_head
    conv, linear = square_model[0], square_model[3]
    model = nn.Sequential(conv, _PlusSquare(), nn.Flatten(), linear).double().eval()
    w = linear.weight.detach().double().numpy()[cls].reshape(3, *SHAPE)
    gradient = w[None] * (1 + 2 * a)
    effective = w[None] * (1 + a)
    np.testing.assert_allclose(effective, gradient - 0.5 * (2 * w[None] * a))  # the algebra
    expected = _combine(effective.mean((2, 3)), a)
    _assert_maps(ShapleyCAM(model, "0")(x, cls), expected)
    _assert_maps(ShapleyCAM(model, "0")(x, "all")[:, cls], expected)
    _assert_maps(GradCAM(model, "0")(x, cls), _combine(gradient.mean((2, 3)), a))
    assert not np.allclose(GradCAM(model, "0")(x, cls), expected, rtol=1e-2)


def test_shapleycam_equals_gradcam_when_the_head_is_linear(hand):
    model = hand.set_known_weights(hand.GapLinear(2), seed=8).double().eval()
    x = np.random.default_rng(8).normal(size=(2, 2, *SHAPE))
    for cls in range(3):
        np.testing.assert_allclose(ShapleyCAM(model, "relu")(x, cls),
                                   GradCAM(model, "relu")(x, cls), rtol=1e-6, atol=1e-9)


def test_cam_uses_the_heads_weights_and_equals_gradcam_times_positions(hand):
    model = hand.set_known_weights(hand.GapLinear(2), seed=6).double().eval()
    x = np.random.default_rng(6).normal(size=(2, 2, *SHAPE))
    a = hand.relu(hand.conv1x1(x, model.conv.weight.detach().numpy(),
                               model.conv.bias.detach().numpy()))
    fc = model.fc.weight.detach().numpy()
    everything = CAM(model, "relu")(x, target="all")
    assert everything.shape == (2, 3, *SHAPE)
    for cls in range(3):
        expected = _combine(np.repeat(fc[cls][None], 2, 0), a)
        cam = CAM(model, "relu")(x, cls)
        np.testing.assert_allclose(cam, expected, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(everything[:, cls], expected, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(cam, int(np.prod(SHAPE)) * GradCAM(model, "relu")(x, cls),
                                   rtol=1e-5, atol=1e-6)


def test_cam_rejects_a_head_that_does_not_read_the_layer(resnet2d, images):
    # the stem has 8 channels, the classifier reads 16
    with pytest.raises(ValueError, match=r"global average pooling.*16 inputs.*8 channels"):
        CAM(resnet2d, "features.0")(images, 0)


def test_cam_refuses_a_model_without_linear_head(unet2d):
    with pytest.raises(ValueError, match=r"no nn\.Linear"):
        CAM(unet2d, "down2")


@pytest.mark.parametrize("fusion", ["mean", "max", "product"])
def test_multi_layer_fusion_of_max_normalised_upsampled_maps(resnet2d, images, fusion):
    layers = ["features.1", "features.2", "features.3"]
    per_layer = []
    for layer in layers:
        single = GradCAM(resnet2d, layer)(images, 1).astype(np.float64)
        peak = single.reshape(len(single), -1).max(1).reshape(-1, 1, 1)
        per_layer.append(single / np.maximum(peak, 1e-12))
    stacked = np.stack(per_layer)
    assert stacked.max() > 0
    expected = {"mean": stacked.mean(0), "max": stacked.max(0), "product": stacked.prod(0)}
    fused = GradCAM(resnet2d, layers, fusion=fusion)(images, 1)
    assert fused.shape == images.shape[:1] + images.shape[2:]
    np.testing.assert_allclose(fused, expected[fusion], rtol=1e-4, atol=1e-6)


def test_unknown_fusion_and_method_are_rejected(resnet2d):
    with pytest.raises(ValueError, match="fusion must be"):
        GradCAM(resnet2d, ["features.2", "features.3"], fusion="median")
    with pytest.raises(ValueError, match=r"unknown method 'nosuchcam'; choose one of .*eigencam"):
        make_explainer("nosuchcam", resnet2d, "features.3")


def test_make_explainer_builds_each_method(resnet2d, images):
    for name in ["gradcam", "gradcam++", "hirescam", "xgradcam", "layercam", "cam"]:
        explainer = make_explainer(name, resnet2d, "features.3")
        assert explainer.explain(images, 0).method == name
    assert make_explainer("guided-backprop", resnet2d, "features.3")(images, 0).shape == (
        2, 1, 16, 16)


class _TwoReluNet(nn.Module):
    """conv1x1 (1→3) → ReLU → conv1x1 (3→2) → ReLU → flatten → Linear: backprop by hand."""

    def __init__(self, length: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(1, 3, 1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv1d(3, 2, 1)
        self.relu2 = nn.ReLU()
        self.fc = nn.Linear(2 * length, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.relu2(self.conv2(self.relu1(self.conv1(x)))).flatten(1))


def _backprop_by_hand(net: _TwoReluNet, x: np.ndarray, cls: int, guided: bool) -> np.ndarray:
    w1 = net.conv1.weight.detach().double().numpy()[:, :, 0]
    b1 = net.conv1.bias.detach().double().numpy()
    w2 = net.conv2.weight.detach().double().numpy()[:, :, 0]
    b2 = net.conv2.bias.detach().double().numpy()
    wc = net.fc.weight.detach().double().numpy()[cls].reshape(2, -1)
    h1 = w1 @ x[0] + b1[:, None]                  # (3, L)
    h2 = w2 @ np.maximum(h1, 0) + b2[:, None]     # (2, L)
    # Springenberg et al.: at each ReLU keep the gradient only where the input was positive
    # (plain backprop) and, for guided backprop, also only where the gradient is positive.
    g_h2 = wc * (h2 > 0) * ((wc > 0) if guided else 1)
    g_r1 = w2.T @ g_h2
    g_h1 = g_r1 * (h1 > 0) * ((g_r1 > 0) if guided else 1)
    return (w1.T @ g_h1)[None]                    # (1, 1, L)


def test_guided_backprop_zeroes_negative_gradients_at_each_relu(hand):
    length = 7
    net = hand.set_known_weights(_TwoReluNet(length), seed=21).double().eval()
    x = np.random.default_rng(22).normal(size=(1, 1, length))
    cls = 1
    guided = GuidedBackprop(net)(x, cls)
    assert guided.shape == x.shape
    expected = _backprop_by_hand(net, x, cls, guided=True)
    plain = _backprop_by_hand(net, x, cls, guided=False)
    np.testing.assert_allclose(guided, expected, rtol=1e-5, atol=1e-7)
    # the plain gradient by hand is what autograd gives, and guiding changed it somewhere
    leaf = torch.from_numpy(x).requires_grad_(True)
    net(leaf)[0, cls].backward()
    np.testing.assert_allclose(leaf.grad.numpy(), plain, rtol=1e-10)
    assert np.abs(expected - plain).max() > 1e-3


def test_guided_backprop_leaves_the_model_as_found(hand):
    net = hand.set_known_weights(_TwoReluNet(5), seed=3)
    x = np.ones((1, 1, 5))
    GuidedBackprop(net)(torch.from_numpy(x).float(), 0)
    assert all(not module._forward_hooks for module in net.modules())
    assert all(p.requires_grad and p.grad is None for p in net.parameters())
    assert net.training


def test_guided_gradcam_is_guided_times_cam(resnet2d, images):
    result = GuidedGradCAM(resnet2d, "features.3").explain(images)
    predicted = result.target_indices
    guided = GuidedBackprop(resnet2d)(images, list(predicted))
    cam = GradCAM(resnet2d, "features.3")(images, list(predicted))
    np.testing.assert_allclose(result.extras["cam"], cam, rtol=1e-5)
    expected = guided * cam[:, None]
    assert np.abs(expected).max() > 0
    np.testing.assert_allclose(result.maps, expected, rtol=1e-4, atol=1e-6 * np.abs(
        expected).max())


def test_guided_gradcam_explains_the_same_region_target(unet2d, images):
    """Both halves of Guided Grad-CAM must explain the masked region, not the whole image."""
    mask = np.zeros((16, 16), dtype=bool)
    mask[2:6, 3:9] = True
    target = SegmentationRegion(1, mask)
    result = GuidedGradCAM(unet2d, "dec0").explain(images, target)
    guided = GuidedBackprop(unet2d).explain(images, target)
    np.testing.assert_allclose(result.scores, guided.scores, rtol=1e-5)
    expected = guided.maps * result.extras["cam"][:, None]
    scale = np.abs(expected).max()
    assert scale > 0
    np.testing.assert_allclose(result.maps / scale, expected / scale, atol=1e-4)
