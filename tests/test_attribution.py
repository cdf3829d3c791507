"""Attribution methods checked against answers derived by hand.

For a linear model f(x) = w·x + b every method has a closed form: the gradient is w, so
saliency is |w|, SmoothGrad (the mean of |w| over noisy copies) is |w| too, Integrated Gradients
is (x - baseline)·w exactly (any step count: the integrand is constant), and occluding pixel i
with value v drops the score by w_i (x_i - v). Score-CAM is checked on a network where one
channel alone decides the class, and IG completeness on real convolutional networks.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from torch import nn

from napari_gradcam.core.architectures import build_architecture
from napari_gradcam.core.attribution import (
    Cancelled,
    completeness_residual,
    integrated_gradients,
    occlusion,
    saliency,
    score_cam,
    smoothgrad,
)
from napari_gradcam.core.targets import SegmentationRegion

torch.set_num_threads(1)

SPATIAL_SHAPES = [(12,), (5, 6), (3, 4, 5)]


def linear_model(spatial: tuple[int, ...], channels: int = 1, classes: int = 2,
                 seed: int = 0) -> nn.Module:
    """f(x) = W flatten(x) + b: a model whose attributions are known in closed form."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(channels * int(np.prod(spatial)), classes)).eval()


def weights_of(model: nn.Module, spatial: tuple[int, ...], channels: int = 1) -> np.ndarray:
    """The linear weights as (classes, C, *spatial)."""
    return model[1].weight.detach().numpy().reshape(-1, channels, *spatial)


def model_state(model: nn.Module) -> tuple:
    """Everything an attribution call must leave as it was."""
    return (
        tuple(module.training for module in model.modules()),
        tuple(parameter.requires_grad for parameter in model.parameters()),
        tuple(
            len(module._forward_hooks) + len(module._forward_pre_hooks)
            + len(module._backward_hooks)
            for module in model.modules()
        ),
        tuple(parameter.detach().clone().sum().item() for parameter in model.parameters()),
    )


# ---------------------------------------------------------------------------- saliency


@pytest.mark.parametrize("spatial", SPATIAL_SHAPES)
def test_saliency_of_linear_model_is_absolute_weight(spatial: tuple[int, ...]) -> None:
    model = linear_model(spatial)
    x = torch.randn(3, 1, *spatial)
    maps = saliency(model, x, target=1)
    assert maps.dtype == np.float32
    assert maps.shape == (3, *spatial)
    expected = np.abs(weights_of(model, spatial)[1, 0])
    np.testing.assert_allclose(maps, np.broadcast_to(expected, maps.shape), rtol=1e-6)


def test_saliency_channels_max_or_kept() -> None:
    spatial = (4, 4)
    model = linear_model(spatial, channels=3)
    x = torch.randn(2, 3, *spatial)
    weights = weights_of(model, spatial, channels=3)[0]
    reduced = saliency(model, x, target=0)
    np.testing.assert_allclose(reduced[0], np.abs(weights).max(axis=0), rtol=1e-6)
    full = saliency(model, x, target=0, reduce_channels=False)
    assert full.shape == (2, 3, *spatial)
    np.testing.assert_allclose(full[1], np.abs(weights), rtol=1e-6)
    signed = saliency(model, x, target=0, reduce_channels=False, absolute=False)
    np.testing.assert_allclose(signed[1], weights, rtol=1e-6)


def test_saliency_targets_predicted_per_sample_and_callable() -> None:
    spatial = (6,)
    model = linear_model(spatial, classes=3)
    weights = weights_of(model, spatial)[:, 0]
    x = torch.randn(4, 1, *spatial)
    predicted = model(x).argmax(dim=1).numpy()
    np.testing.assert_allclose(saliency(model, x), np.abs(weights[predicted]), rtol=1e-6)
    np.testing.assert_allclose(
        saliency(model, x, target=[2, 0, 1, 2]), np.abs(weights[[2, 0, 1, 2]]), rtol=1e-6
    )
    difference = saliency(model, x, target=lambda out: out[:, 0] - out[:, 1])
    np.testing.assert_allclose(difference[0], np.abs(weights[0] - weights[1]), rtol=1e-5)


def test_saliency_probability_score_matches_softmax_gradient() -> None:
    """d softmax_c / dx = p_c (w_c - sum_k p_k w_k) for a linear model."""
    spatial = (5,)
    model = linear_model(spatial, classes=3)
    weights = weights_of(model, spatial)[:, 0]
    x = torch.randn(1, 1, *spatial)
    p = torch.softmax(model(x), dim=1).detach().numpy()[0]
    expected = p[2] * (weights[2] - p @ weights)
    maps = saliency(model, x, target=2, score="probability", absolute=False)
    np.testing.assert_allclose(maps[0], expected, rtol=1e-5, atol=1e-7)


class PixelLogits(nn.Module):
    """A 'segmentation' model with logits (x, -x) per pixel: class 0's logit is the pixel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, -x], dim=1)


def test_region_target_with_one_mask_per_sample_follows_the_rows() -> None:
    """Score = sum of x inside sample n's mask, so the gradient is exactly that mask, even when
    a batch mixes perturbed copies of different samples."""
    x = torch.randn(3, 1, 5, 6)
    masks = np.zeros((3, 5, 6), dtype=bool)
    masks[0, :2] = True
    masks[1, :, 4:] = True
    masks[2, 3, 3] = True
    target = SegmentationRegion(0, masks)
    model = PixelLogits().eval()
    np.testing.assert_array_equal(saliency(model, x, target=target, batch_size=2), masks)
    np.testing.assert_array_equal(
        smoothgrad(model, x, target=target, n_samples=3, batch_size=4), masks
    )
    np.testing.assert_allclose(
        integrated_gradients(model, x, target=target, steps=2, batch_size=5),
        np.where(masks, x[:, 0].numpy(), 0.0), rtol=1e-6,
    )
    with pytest.raises(ValueError, match="one mask per sample"):
        saliency(model, x, target=SegmentationRegion(0, masks[:2]))


# ---------------------------------------------------------------------------- SmoothGrad


@pytest.mark.parametrize("spatial", SPATIAL_SHAPES)
def test_smoothgrad_of_linear_model_equals_saliency(spatial: tuple[int, ...]) -> None:
    model = linear_model(spatial)
    x = torch.randn(2, 1, *spatial)
    smooth = smoothgrad(model, x, target=0, n_samples=6, noise_level=0.3, batch_size=5)
    np.testing.assert_allclose(smooth, saliency(model, x, target=0), rtol=1e-5)


def test_smoothgrad_is_seeded_and_independent_of_batch_size() -> None:
    model = build_architecture("resnet_like", spatial_dims=1, widths=(4, 8)).eval()
    x = torch.randn(2, 1, 32)
    first = smoothgrad(model, x, target=1, n_samples=5, seed=3, batch_size=1)
    second = smoothgrad(model, x, target=1, n_samples=5, seed=3, batch_size=7)
    other_seed = smoothgrad(model, x, target=1, n_samples=5, seed=4, batch_size=7)
    generator = torch.Generator().manual_seed(3)
    with_generator = smoothgrad(model, x, target=1, n_samples=5, generator=generator)
    np.testing.assert_allclose(first, second, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(first, with_generator, rtol=1e-5, atol=1e-7)
    assert not np.allclose(first, other_seed)
    # Noise actually smooths: the result differs from the plain gradient of a ReLU network.
    assert not np.allclose(first, saliency(model, x, target=1))


def test_smoothgrad_with_zero_noise_is_saliency() -> None:
    model = build_architecture("resnet_like", spatial_dims=2, widths=(4, 8)).eval()
    x = torch.randn(1, 1, 16, 16)
    np.testing.assert_allclose(
        smoothgrad(model, x, target=0, n_samples=3, noise_level=0.0),
        saliency(model, x, target=0),
        rtol=1e-5, atol=1e-8,
    )


# ---------------------------------------------------------------------------- IG


@pytest.mark.parametrize("spatial", SPATIAL_SHAPES)
def test_integrated_gradients_of_linear_model_is_exact(spatial: tuple[int, ...]) -> None:
    model = linear_model(spatial, channels=2)
    x = torch.randn(2, 2, *spatial)
    weights = weights_of(model, spatial, channels=2)[1]
    for baseline, steps in [(None, 1), (0.5, 3), (torch.randn(2, *spatial), 8)]:
        reference = 0.0 if baseline is None else baseline
        difference = (x - (reference if not isinstance(reference, torch.Tensor)
                           else reference[None])).numpy()
        full = integrated_gradients(model, x, target=1, baseline=baseline, steps=steps,
                                    reduce_channels=False)
        np.testing.assert_allclose(full, difference * weights[None], rtol=1e-5, atol=1e-6)
        summed = integrated_gradients(model, x, target=1, baseline=baseline, steps=steps)
        np.testing.assert_allclose(summed, (difference * weights[None]).sum(axis=1),
                                   rtol=1e-5, atol=1e-6)
        residual = completeness_residual(model, x, summed, target=1, baseline=baseline)
        np.testing.assert_allclose(residual, 0.0, atol=1e-5)


@pytest.mark.parametrize("spatial_dims", [1, 2, 3])
def test_integrated_gradients_completeness_on_resnet(spatial_dims: int) -> None:
    torch.manual_seed(spatial_dims)
    model = build_architecture("resnet_like", spatial_dims=spatial_dims, widths=(4, 8)).eval()
    x = torch.randn(2, 1, *(8 if spatial_dims == 3 else 16,) * spatial_dims)
    attributions = integrated_gradients(model, x, target=2, steps=64, batch_size=32)
    assert attributions.shape == (2, *x.shape[2:])
    with torch.no_grad():
        gap = (model(x)[:, 2] - model(torch.zeros_like(x))[:, 2]).numpy()
    residual = completeness_residual(model, x, attributions, target=2)
    assert np.all(np.abs(residual) <= 0.02 * np.abs(gap) + 1e-3), (residual, gap)
    # The residual is not trivially zero: it is the sum minus the gap, so a wrong map fails.
    wrong = completeness_residual(model, x, attributions * 2, target=2)
    assert np.all(np.abs(wrong) > 0.5 * np.abs(gap))


def test_integrated_gradients_completeness_on_unet_class_and_region() -> None:
    """Segmentation: a class index scores the class logits summed over all pixels."""
    torch.manual_seed(0)
    model = build_architecture("unet", spatial_dims=2, widths=(4, 8)).eval()
    x = torch.randn(1, 1, 16, 16)
    for target in (1, SegmentationRegion(1, np.ones((16, 16), dtype=bool))):
        attributions = integrated_gradients(model, x, target=target, steps=64)
        with torch.no_grad():
            gap = float(model(x)[:, 1].sum() - model(torch.zeros_like(x))[:, 1].sum())
        residual = completeness_residual(model, x, attributions, target=target)
        assert abs(residual[0]) <= 0.02 * abs(gap) + 1e-3


def test_integrated_gradients_batch_size_does_not_change_result() -> None:
    model = build_architecture("resnet_like", spatial_dims=2, widths=(4, 8)).eval()
    x = torch.randn(3, 1, 12, 12)
    one = integrated_gradients(model, x, target=0, steps=8, batch_size=1)
    many = integrated_gradients(model, x, target=0, steps=8, batch_size=13)
    np.testing.assert_allclose(one, many, rtol=1e-4, atol=1e-7)


class SquaredProjection(nn.Module):
    """f(x) = (w·x)²: along the path a·x the gradient 2 a (w·x) w is linear in a, so each
    quadrature's error is known: IG = x ⊙ w (w·x) · Σ_i c_i 2 a_i, and Σ_i c_i 2 a_i is
    (n-1)/n (left), (n+1)/n (right), 1 (middle, trapezoid, Gauss-Legendre) and n/(n+1) for
    Captum's "riemann_trapezoid" (its n+1 weights 1/(n+1) sum to n/(n+1))."""

    def __init__(self, size: int, seed: int = 0) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.from_numpy(np.random.default_rng(seed).normal(size=size)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ((x.flatten(1) * self.w).sum(1) ** 2)[:, None]


@pytest.mark.parametrize(("method", "factor"), [
    ("riemann_left", lambda n: (n - 1) / n), ("riemann_right", lambda n: (n + 1) / n),
    ("riemann_middle", lambda n: 1.0), ("riemann_trapezoid", lambda n: n / (n + 1)),
    ("trapezoid", lambda n: 1.0), ("gausslegendre", lambda n: 1.0)])
def test_integrated_gradients_quadratures_and_convergence_delta(method, factor) -> None:
    model = SquaredProjection(6).double().eval()
    x = torch.from_numpy(np.random.default_rng(1).normal(size=(2, 1, 6)))
    w = model.w.detach().numpy()
    projection = x.numpy().reshape(2, 6) @ w
    steps = 4
    maps, delta = integrated_gradients(model, x, target=0, steps=steps, method=method,
                                       return_convergence_delta=True)
    expected = x.numpy()[:, 0] * w * projection[:, None] * factor(steps)
    np.testing.assert_allclose(maps, expected, rtol=1e-6)  # returned as float32
    # delta = sum(attributions) - (f(x) - f(0)) = projection² (factor - 1)
    np.testing.assert_allclose(delta, projection**2 * (factor(steps) - 1.0), atol=1e-10)
    assert delta.shape == (2,)
    # the old call returns the map alone
    assert isinstance(integrated_gradients(model, x, target=0, steps=steps), np.ndarray)


def test_integrated_gradients_rejects_an_unknown_quadrature() -> None:
    with pytest.raises(ValueError, match="gausslegendre"):
        integrated_gradients(linear_model((4,)), torch.randn(1, 1, 4), method="simpson")


# ---------------------------------------------------------------------------- occlusion


@pytest.mark.parametrize("spatial", SPATIAL_SHAPES)
def test_occlusion_patch_one_is_weight_times_difference(spatial: tuple[int, ...]) -> None:
    model = linear_model(spatial)
    x = torch.randn(2, 1, *spatial)
    weights = weights_of(model, spatial)[0, 0]
    maps = occlusion(model, x, target=0, patch=1, baseline=0.25, batch_size=7)
    assert maps.shape == (2, *spatial)
    np.testing.assert_allclose(maps, weights * (x[:, 0].numpy() - 0.25), rtol=1e-4, atol=1e-6)
    means = x.flatten(1).mean(dim=1).numpy().reshape(-1, *[1] * len(spatial))
    by_mean = occlusion(model, x, target=0, patch=1, baseline="mean")
    np.testing.assert_allclose(by_mean, weights * (x[:, 0].numpy() - means), rtol=1e-4, atol=1e-6)


def test_occlusion_overlapping_patches_average_the_drops() -> None:
    """1D, patch 3, stride 2 on length 8: windows start at 0, 2, 4 and 5 (flush with the end)."""
    spatial = (8,)
    model = linear_model(spatial)
    x = torch.randn(1, 1, *spatial)
    weights = weights_of(model, spatial)[0, 0]
    contribution = weights * x[0, 0].numpy()  # baseline 0: dropping pixel j costs w_j x_j
    starts = [0, 2, 4, 5]
    expected = np.zeros(8)
    covered = np.zeros(8)
    for start in starts:
        expected[start:start + 3] += contribution[start:start + 3].sum()
        covered[start:start + 3] += 1
    maps = occlusion(model, x, target=0, patch=3, stride=2, baseline=0.0)
    np.testing.assert_allclose(maps[0], expected / covered, rtol=1e-4, atol=1e-6)


def test_occlusion_refuses_a_stride_larger_than_the_patch() -> None:
    """Issue 12: stride 5 with patch 3 leaves elements 3, 4, 8, ... never occluded: their
    attribution was 0/0 = NaN, silently."""
    model = linear_model((12,))
    with pytest.raises(ValueError, match=r"stride \(5,\) is larger than the patch \(3,\)"):
        occlusion(model, torch.randn(1, 1, 12), target=0, patch=3, stride=5)
    model2d = linear_model((6, 6))
    with pytest.raises(ValueError, match=r"dim\(s\) \[1\]"):
        occlusion(model2d, torch.randn(1, 1, 6, 6), target=0, patch=(2, 2), stride=(2, 3))
    equal = occlusion(model, torch.randn(1, 1, 12), target=0, patch=3, stride=3)
    assert np.isfinite(equal).all()


def test_occlusion_3d_non_divisible_shape_and_batching() -> None:
    model = build_architecture("resnet_like", spatial_dims=3, widths=(4, 8)).eval()
    x = torch.randn(2, 1, 9, 10, 11)
    small = occlusion(model, x, target=1, patch=(4, 4, 4), stride=3, batch_size=1)
    large = occlusion(model, x, target=1, patch=(4, 4, 4), stride=3, batch_size=64)
    assert small.shape == (2, 9, 10, 11)
    assert np.isfinite(small).all()
    np.testing.assert_allclose(small, large, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------- Score-CAM


class OneChannelDecides(nn.Module):
    """features: channel 0 = ReLU(x), channel 1 = ReLU(1 - x); class 0 logit = k·mean(ch 0).

    For an input that is 1 on a square R and 0 elsewhere: A0 = 1_R and A1 = 1_(not R), so the
    masks are H0 = 1_R (x·H0 = x) and H1 = 1_(not R) (x·H1 = 0, like the all-zero baseline).
    Class-0 probability: sigmoid(k·|R|/HW) for x·H0, 0.5 for x·H1 and for the baseline.
    """

    def __init__(self, k: float = 8.0) -> None:
        super().__init__()
        conv = nn.Conv2d(1, 2, 1)
        with torch.no_grad():
            conv.weight.copy_(torch.tensor([1.0, -1.0]).view(2, 1, 1, 1))
            conv.bias.copy_(torch.tensor([0.0, 1.0]))
        self.features = nn.Sequential(conv, nn.ReLU())
        self.classifier = nn.Linear(2, 2)
        with torch.no_grad():
            self.classifier.weight.copy_(torch.tensor([[k, 0.0], [0.0, 0.0]]))
            self.classifier.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).mean(dim=(2, 3)))


def test_score_cam_where_one_channel_decides() -> None:
    model = OneChannelDecides(k=8.0).eval()
    x = torch.zeros(1, 1, 8, 8)
    x[0, 0, 2:5, 1:4] = 1.0
    region = x[0, 0].numpy() > 0
    logit_full = 8.0 * region.mean()  # class-0 logit of x·H0 = x; x·H1 = 0 scores 0
    # Default (the paper's Algorithm 1): softmax over the channels' logits, A0 = 1_R, A1 = 1_notR
    alpha0 = float(torch.sigmoid(torch.tensor(logit_full)))
    maps = score_cam(model, "features", x, target=0)
    assert maps.shape == (1, 8, 8)
    np.testing.assert_allclose(maps[0], np.where(region, alpha0, 1.0 - alpha0), rtol=1e-5,
                               atol=1e-6)
    # "increase": probability minus that of the all-zero baseline (0.5)
    p_full = float(torch.sigmoid(torch.tensor(logit_full)))
    for increase in (score_cam(model, "features", x, target=0, weights="increase"),
                     score_cam(model, "features", x, target=0, subtract_baseline=True)):
        np.testing.assert_allclose(increase[0], np.where(region, p_full - 0.5, 0.0), rtol=1e-5,
                                   atol=1e-6)
    # Without the baseline (the authors' code): weights p_full and 0.5.
    for raw in (score_cam(model, "features", x, target=0, weights="raw", batch_size=1),
                score_cam(model, "features", x, target=0, subtract_baseline=False, batch_size=1)):
        np.testing.assert_allclose(raw[0], np.where(region, p_full, 0.5), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="either weights or subtract_baseline"):
        score_cam(model, "features", x, weights="raw", subtract_baseline=False)


def test_score_cam_default_is_not_all_zero_where_the_baseline_variant_is() -> None:
    """Issue 12: with the baseline subtracted from probabilities, the weighted sum is negative
    wherever most masked inputs score below the blank image, and the ReLU leaves an all-zero
    map; the softmax weights are positive, so after a ReLU layer the map cannot vanish."""
    zero_default = zero_increase = 0
    for seed in range(3):
        torch.manual_seed(seed)
        model = build_architecture("resnet_like", spatial_dims=2, widths=(4, 8)).eval()
        x = torch.randn(8, 1, 16, 16)
        default = score_cam(model, "features.2", x, batch_size=64)
        increase = score_cam(model, "features.2", x, weights="increase", score="probability",
                             batch_size=64)
        zero_default += int((default.reshape(8, -1).max(1) == 0).sum())
        zero_increase += int((increase.reshape(8, -1).max(1) == 0).sum())
    assert zero_default == 0
    assert zero_increase > 0  # the degenerate variant, still available, shows the problem


def test_score_cam_upsamples_and_runs_in_1d_2d_3d() -> None:
    for dims, size in [(1, 32), (2, 16), (3, 8)]:
        model = build_architecture("resnet_like", spatial_dims=dims, widths=(4, 8)).eval()
        x = torch.randn(2, 1, *(size,) * dims)
        maps = score_cam(model, "features.2", x, batch_size=5)
        assert maps.shape == (2, *(size,) * dims)
        assert maps.dtype == np.float32 and (maps >= 0).all()


# ---------------------------------------------------------------------------- contracts


def _all_methods() -> list:
    return [
        lambda m, x, **kw: saliency(m, x, target=0, batch_size=1, **kw),
        lambda m, x, **kw: smoothgrad(m, x, target=0, n_samples=4, batch_size=2, **kw),
        lambda m, x, **kw: integrated_gradients(m, x, target=0, steps=4, batch_size=2, **kw),
        lambda m, x, **kw: occlusion(m, x, target=0, patch=4, batch_size=2, **kw),
        lambda m, x, **kw: score_cam(m, "features.2", x, target=0, batch_size=2, **kw),
    ]


def _model_with_mixed_state() -> nn.Module:
    model = build_architecture("resnet_like", spatial_dims=2, widths=(4, 8))
    model.train()
    model.features[1].eval()  # a submodule in another mode must come back as it was
    model.classifier.weight.requires_grad_(False)
    return model


@pytest.mark.filterwarnings("ignore:the model was in training mode")
def test_every_method_leaves_the_model_as_found() -> None:
    model = _model_with_mixed_state()
    x = torch.randn(2, 1, 12, 12)
    before = model_state(model)
    for method in _all_methods():
        method(model, x)
        assert model_state(model) == before


@pytest.mark.filterwarnings("ignore:the model was in training mode")
def test_cancel_raises_and_leaves_the_model_as_found() -> None:
    model = _model_with_mixed_state()
    x = torch.randn(2, 1, 12, 12)
    before = model_state(model)
    for method in _all_methods():
        calls = itertools.count()
        reported: list[tuple[int, int]] = []

        def stop_after_first_batch(calls: Iterator[int] = calls) -> bool:
            return next(calls) >= 1

        def report(done: int, total: int, reported: list = reported) -> None:
            reported.append((done, total))

        with pytest.raises(Cancelled, match="stopped"):
            method(model, x, should_stop=stop_after_first_batch, progress=report)
        assert model_state(model) == before
        assert len(reported) >= 1  # the batch before the stop was reported
        assert reported[-1][0] < reported[-1][1]  # ... and the job did not finish


@pytest.mark.filterwarnings("ignore:the model was in training mode")
def test_exception_in_target_leaves_the_model_as_found() -> None:
    model = _model_with_mixed_state()
    before = model_state(model)
    calls = itertools.count()

    def failing_target(output: torch.Tensor) -> torch.Tensor:
        if next(calls) >= 1:
            raise RuntimeError("boom")
        return output[:, 0]

    with pytest.raises(RuntimeError, match="boom"):
        score_cam(model, "features.2", torch.randn(1, 1, 12, 12), target=failing_target,
                  batch_size=2)
    assert model_state(model) == before


def test_progress_counts_every_forward_pass() -> None:
    model = build_architecture("resnet_like", spatial_dims=1, widths=(4, 8)).eval()
    x = torch.randn(3, 1, 16)
    reported: list[tuple[int, int]] = []
    integrated_gradients(model, x, target=0, steps=4, batch_size=4,
                         progress=lambda done, total: reported.append((done, total)))
    assert reported[-1] == (15, 15)  # 3 samples x 5 points
    assert [done for done, _ in reported] == sorted(done for done, _ in reported)
    reported.clear()
    occlusion(model, x, target=0, patch=4, batch_size=3,
              progress=lambda done, total: reported.append((done, total)))
    assert reported[-1] == (15, 15)  # 3 samples x (1 reference + 4 patches)


# ---------------------------------------------------------------------------- bad input


def test_bad_inputs_get_clear_errors() -> None:
    model = linear_model((6,))
    good = torch.randn(1, 1, 6)
    with pytest.raises(TypeError, match=r"nn\.Module"):
        saliency("not a model", good)
    with pytest.raises(ValueError, match=r"\(N, C, \*spatial\)"):
        saliency(model, torch.randn(6))
    with pytest.raises(ValueError, match="NaN"):
        saliency(model, torch.full((1, 1, 6), float("nan")))
    with pytest.raises(ValueError, match="'all'"):
        saliency(model, good, target="all")
    with pytest.raises(ValueError, match="out of range"):
        saliency(model, good, target=5)
    with pytest.raises(ValueError, match="batch_size"):
        saliency(model, good, batch_size=0)
    with pytest.raises(ValueError, match="one score per sample"):
        saliency(model, good, target=lambda out: out)
    with pytest.raises(ValueError, match="steps"):
        integrated_gradients(model, good, steps=0)
    with pytest.raises(ValueError, match="broadcast"):
        integrated_gradients(model, good, baseline=np.zeros(5))
    with pytest.raises(ValueError, match="patch"):
        occlusion(model, good, patch=(2, 2))
    with pytest.raises(ValueError, match="baseline"):
        occlusion(model, good, baseline="blur")
    with pytest.raises(ValueError, match="noise_level"):
        smoothgrad(model, good, noise_level=-1)
    cnn = build_architecture("resnet_like", spatial_dims=2, widths=(4, 8)).eval()
    with pytest.raises(KeyError, match="no layer"):
        score_cam(cnn, "features.9", torch.randn(1, 1, 8, 8))
    with pytest.raises(ValueError, match="feature map"):
        score_cam(cnn, "classifier", torch.randn(1, 1, 8, 8))


class ReusesALayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, 1, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.conv(x)).mean(dim=2)


def test_score_cam_explains_the_last_call_of_a_layer_that_runs_twice() -> None:
    """Like every CAM here (the engine's rule): the last call is explained, with a warning."""
    model = ReusesALayer().eval()
    with pytest.warns(UserWarning, match="ran 2 times"):
        maps = score_cam(model, "conv", torch.randn(1, 1, 8), target=lambda out: out[:, 0])
    assert maps.shape == (1, 8) and np.isfinite(maps).all()
    assert all(not module._forward_hooks for module in model.modules())
