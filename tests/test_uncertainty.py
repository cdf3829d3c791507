"""Uncertainty maps: flips, shifts, MC dropout and the window-disagreement accumulator."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from napari_gradcam.core.methods import GradCAM, HiResCAM
from napari_gradcam.core.targets import SegmentationRegion
from napari_gradcam.core.uncertainty import (
    UncertaintyExplainer,
    WeightedMoments,
    explain_with_uncertainty,
    mc_dropout,
)
from napari_gradcam.core.volume import explain_volume

SYMMETRIC = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16
SHIFTING = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0]])


class TinyNet(nn.Module):
    """conv (fixed kernel) → ReLU [→ BatchNorm → dropout] → global average pool → linear.

    With a kernel symmetric under mirroring and stride 1 the activations mirror with the
    input, and Grad-CAM's channel weights (the mean gradient of a GAP + linear head) do not
    depend on the input, so the map mirrors exactly: zero flip uncertainty by construction.
    """

    def __init__(self, kernel: torch.Tensor, *, stride: int = 1, dropout: float = 0.0,
                 batchnorm: bool = False) -> None:
        super().__init__()
        conv = nn.Conv2d(1, 2, 3, padding=1, stride=stride, bias=False)
        with torch.no_grad():
            conv.weight[0, 0] = kernel
            conv.weight[1, 0] = -kernel
        layers: list[nn.Module] = [conv, nn.ReLU()]
        if batchnorm:
            layers.append(nn.BatchNorm2d(2))
        if dropout:
            layers.append(nn.Dropout(dropout))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(2, 2)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([[1.0, 0.5], [-1.0, 0.2]]))
            self.head.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.features(x)).flatten(1))


def image(seed: int = 0, n: int = 2, size: int = 24) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).normal(size=(n, 1, size, size))
                            .astype(np.float32))


def test_a_flip_equivariant_model_has_no_flip_uncertainty_and_a_shifting_one_has():
    x = image()
    _, _, info = explain_with_uncertainty(GradCAM(TinyNet(SYMMETRIC), "features"), x,
                                          sources=("flips",))
    flips = info.sources["flips"]
    assert flips.applicable and flips.n_variants == 2
    assert float(flips.std_map.max()) < 1e-6 * float(np.abs(info.plain.maps).max())
    _, _, skewed = explain_with_uncertainty(GradCAM(TinyNet(SHIFTING), "features"), x,
                                            sources=("flips",))
    assert skewed.sources["flips"].relative > 0.05  # a 1-px shift is undone the wrong way


def test_shifts_measure_aliasing_of_a_strided_model_and_not_of_a_stride_one_model():
    x = image(size=32)
    _, _, plain = explain_with_uncertainty(GradCAM(TinyNet(SYMMETRIC), "features"), x,
                                           sources=("shifts",))
    shifts = plain.sources["shifts"]
    assert shifts.n_variants == 8  # ±1, ±2 on each of two axes
    interior = shifts.std_map[:, 3:-3, 3:-3]  # away from the repeated edge and the padding
    assert float(interior.max()) < 1e-6 * float(np.abs(plain.plain.maps).max())
    _, _, strided = explain_with_uncertainty(GradCAM(TinyNet(SYMMETRIC, stride=2), "features"),
                                             x, sources=("shifts",))
    assert float(strided.sources["shifts"].std_map[:, 3:-3, 3:-3].mean()) > \
        0.02 * float(np.abs(strided.plain.maps).max())


def test_pooled_maps_are_the_mean_and_spread_of_all_variants():
    x = image(seed=1, n=1, size=16)
    cam = GradCAM(TinyNet(SHIFTING), "features")
    mean_map, std_map, info = explain_with_uncertainty(cam, x, sources=("flips",))
    target = int(info.plain.target_indices[0])
    variants = [cam(x, target), np.flip(cam(torch.flip(x, [2]), target), 1),
                np.flip(cam(torch.flip(x, [3]), target), 2)]
    assert np.allclose(mean_map, np.mean(variants, 0), atol=1e-6)
    assert np.allclose(std_map, np.std(variants, 0), atol=1e-6)
    assert mean_map.shape == std_map.shape == (1, 16, 16)


class PositionalNet(nn.Module):
    """conv → flatten → linear: the class depends on where things are, so flips change it."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.features = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(2 * 8 * 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def test_prediction_changes_count_the_variants_whose_class_differs():
    model, x = PositionalNet(), image(seed=1, n=8, size=8)
    cam = GradCAM(model, "features")
    mean_map, _, info = explain_with_uncertainty(cam, x, sources=("flips",))
    with torch.no_grad():
        plain = model(x).argmax(1)
        expected = sum(int((model(torch.flip(x, [d])).argmax(1) != plain).sum()) for d in (2, 3))
    assert info.prediction_changes == expected > 0
    # every variant still explains the class predicted for the unchanged input
    fixed = tuple(plain.tolist())
    variants = [cam(x, fixed), np.flip(cam(torch.flip(x, [2]), fixed), 1),
                np.flip(cam(torch.flip(x, [3]), fixed), 2)]
    np.testing.assert_allclose(mean_map, np.mean(variants, 0), atol=1e-6)


def test_all_classes_keep_their_class_axis():
    mean_map, std_map, _ = explain_with_uncertainty(GradCAM(TinyNet(SHIFTING), "features"),
                                                    image(), "all", sources=("flips", "shifts"))
    assert mean_map.shape == std_map.shape == (2, 2, 24, 24)


def test_mc_dropout_gives_spread_and_only_dropout_runs_in_train_mode():
    model = TinyNet(SYMMETRIC, dropout=0.5, batchnorm=True).eval()
    bn, dropout = model.features[2], model.features[3]
    seen: list[tuple[bool, bool]] = []
    recorder = dropout.register_forward_hook(
        lambda module, inputs, output: seen.append((bn.training, dropout.training)))
    rng_before = torch.get_rng_state()
    _, _, info = explain_with_uncertainty(GradCAM(model, "features"), image(), n_dropout=6,
                                          sources=("dropout",))
    recorder.remove()
    source = info.sources["dropout"]
    assert source.applicable and source.n_variants == 6
    assert source.relative > 0.05
    assert seen[0] == (False, False)  # the plain map: eval mode
    assert seen[1:] == [(False, True)] * 6  # MC samples: dropout on, BatchNorm still eval
    assert not any(m.training for m in model.modules())  # eval again afterwards
    assert not model._forward_pre_hooks
    assert torch.equal(torch.get_rng_state(), rng_before)  # the caller's random stream


def test_mc_dropout_is_reproducible_with_a_seed():
    model = TinyNet(SYMMETRIC, dropout=0.5)
    runs = [explain_with_uncertainty(GradCAM(model, "features"), image(), seed=seed,
                                     sources=("dropout",))[1] for seed in (3, 3, 4)]
    assert np.array_equal(runs[0], runs[1]) and not np.array_equal(runs[0], runs[2])


def test_a_model_in_training_mode_is_left_in_training_mode():
    model = TinyNet(SYMMETRIC, dropout=0.5, batchnorm=True).train()
    with pytest.warns(UserWarning, match="training mode"):
        explain_with_uncertainty(GradCAM(model, "features"), image(), sources=("dropout",))
    assert all(m.training for m in model.modules())


class FailsOnThirdCall(TinyNet):
    def __init__(self) -> None:
        super().__init__(SYMMETRIC, dropout=0.5)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == 3:
            raise ValueError("simulated failure half-way through the MC samples")
        return super().forward(x)


def test_dropout_state_is_restored_when_the_model_raises_half_way():
    model = FailsOnThirdCall().eval()
    model.features[2].train()  # an odd state the user chose: kept exactly
    with pytest.raises(RuntimeError, match="simulated failure"):
        explain_with_uncertainty(GradCAM(model, "features"), image(), sources=("dropout",))
    assert model.calls == 3
    assert model.features[2].training and not model.training
    assert not model.features[0].training and not model._forward_pre_hooks


def test_mc_dropout_context_alone_restores_flags_after_an_error():
    model = TinyNet(SYMMETRIC, dropout=0.5).eval()
    with pytest.raises(KeyError), mc_dropout(model) as layers:
        assert layers == [model.features[2]]
        model.eval()(image())  # the hook turns dropout on inside the forward pass
        assert model.features[2].training
        raise KeyError("boom")
    assert not any(m.training for m in model.modules()) and not model._forward_pre_hooks


def test_a_model_without_dropout_reports_dropout_as_not_applicable():
    _, std_map, info = explain_with_uncertainty(
        GradCAM(TinyNet(SHIFTING), "features"), image(), sources=("flips", "dropout"))
    dropout = info.sources["dropout"]
    assert not dropout.applicable and dropout.reason == "the model has no dropout layers"
    assert dropout.std_map is None
    assert "dropout: not applicable (the model has no dropout layers)" in info.summary()
    assert info.n_variants == 3  # the plain map and two flips
    assert np.allclose(std_map, info.sources["flips"].std_map) and float(std_map.max()) > 0


def test_shifts_are_not_applicable_to_maps_at_feature_resolution():
    cam = GradCAM(TinyNet(SYMMETRIC, stride=2), "features", upsample=False)
    _, _, info = explain_with_uncertainty(cam, image(), sources=("shifts", "flips"))
    assert not info.sources["shifts"].applicable
    assert "upsample=False" in info.sources["shifts"].reason
    assert info.sources["flips"].applicable


class TinySegNet(nn.Module):
    """A mirror-symmetric conv and a 1×1 classifier: a segmentation net whose maps mirror."""

    def __init__(self) -> None:
        super().__init__()
        self.features = TinyNet(SYMMETRIC).features
        self.classifier = nn.Conv2d(2, 2, 1)
        with torch.no_grad():
            self.classifier.weight.copy_(torch.tensor([[1.0, 0.5], [-1.0, 0.3]])[..., None, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def test_a_region_target_is_mirrored_and_shifted_with_the_input():
    mask = np.zeros((24, 24), dtype=bool)
    mask[2:9, 3:7] = True  # a corner region: its mirror image is elsewhere
    region = SegmentationRegion(class_index=1, mask=mask)
    # HiResCAM keeps the gradient's location, so a region left unmirrored would show at once
    _, _, info = explain_with_uncertainty(HiResCAM(TinySegNet(), "features"), image(), region,
                                          sources=("flips", "shifts"))
    peak = float(np.abs(info.plain.maps).max())
    assert peak > 0
    assert float(info.sources["flips"].std_map.max()) < 1e-5 * peak
    assert float(info.sources["shifts"].std_map[:, 3:-3, 3:-3].max()) < 1e-5 * peak


def test_window_accumulator_equals_the_weighted_variance_computed_directly():
    rng = np.random.default_rng(0)
    size, window, starts = 10, 4, (0, 3, 6)
    weights = np.array([0.2, 1.0, 1.0, 0.2])
    maps = [rng.normal(size=window) for _ in starts]
    moments = WeightedMoments((size,))
    for start, cam in zip(starts, maps, strict=True):
        moments.add(cam, weights, index=np.s_[start:start + window])
    for voxel in range(size):
        values = [m[voxel - s] for s, m in zip(starts, maps, strict=True)
                  if s <= voxel < s + window]
        w = [weights[voxel - s] for s in starts if s <= voxel < s + window]
        mean = np.average(values, weights=w)
        variance = np.average((np.array(values) - mean) ** 2, weights=w)
        assert moments.mean()[voxel] == pytest.approx(mean)
        assert moments.variance()[voxel] == pytest.approx(variance, abs=1e-12)
    assert moments.variance()[0] == 0.0 and moments.variance()[3] > 0  # one window vs two


def test_window_accumulator_adds_within_window_variance_by_the_law_of_total_variance():
    rng = np.random.default_rng(1)
    samples = rng.normal(size=(3, 2, 5))  # 3 windows, each with 2 equally weighted variants
    weights = np.array([0.5, 1.0, 2.0])
    moments = WeightedMoments((5,))
    for window, w in zip(samples, weights, strict=True):
        moments.add(window.mean(0), w, within_variance=window.var(0))
    pooled = samples.reshape(6, 5)
    pooled_w = np.repeat(weights, 2)
    mean = np.average(pooled, axis=0, weights=pooled_w)
    variance = np.average((pooled - mean) ** 2, axis=0, weights=pooled_w)
    assert np.allclose(moments.mean(), mean) and np.allclose(moments.variance(), variance)


def test_window_accumulator_moves_its_planes_like_the_windows_flush():
    moments = WeightedMoments((4, 2))
    moments.add(np.arange(8.0).reshape(4, 2), 2.0)
    before_mean, before_var = moments.mean(), moments.variance()
    moments.drop_leading(1)
    assert np.array_equal(moments.mean()[:3], before_mean[1:])
    assert np.array_equal(moments.variance()[:3], before_var[1:])
    assert not moments.weight[3].any() and not moments.mean()[3].any()
    mean_only = WeightedMoments((4, 2), np.float32, variance=False)
    mean_only.add(np.arange(8.0).reshape(4, 2), 2.0)
    assert mean_only.total_sq is None and np.array_equal(mean_only.mean(), before_mean)
    with pytest.raises(ValueError, match="variance=False"):
        mean_only.variance()


def test_the_wrapper_runs_in_the_volume_loop_with_the_plain_maps():
    model = TinyNet(SYMMETRIC, dropout=0.3)
    volume = np.random.default_rng(2).normal(size=(3, 16, 16)).astype(np.float32)
    wrapper = UncertaintyExplainer(GradCAM(model, "features"), sources=("flips", "dropout"),
                                   n_dropout=3)
    plain = explain_volume(GradCAM(model, "features"), volume, mode="slices", batch_size=2)
    wrapped = explain_volume(wrapper, volume, mode="slices", batch_size=2)
    assert np.array_equal(wrapped.maps, plain.maps)  # the main output does not change
    result = wrapper.explain(volume[:2, None])
    assert result.extras["uncertainty"].shape == (2, 16, 16)
    assert float(result.extras["uncertainty"].max()) > 0
    assert wrapper.last_info.sources["dropout"].n_variants == 3


def test_bad_options_are_named():
    cam = GradCAM(TinyNet(SYMMETRIC), "features")
    with pytest.raises(ValueError, match="unknown uncertainty source"):
        explain_with_uncertainty(cam, image(), sources=("flip",))
    with pytest.raises(ValueError, match="n_dropout"):
        explain_with_uncertainty(cam, image(), n_dropout=1)
