"""The newer CAM family against their papers' definitions, and the one entry point by name.

Models whose answer can be written down by hand:

* ``GapLinear`` (conv1x1 → ReLU → global average pool → Linear): activations are a matrix
  product computed with numpy, the class logit is y_c = Σ_k W_ck m_k + b_c with m_k the mean
  of channel k, so ablating channel k changes it by exactly W_ck m_k, and dy_c/dA_k = W_ck / Z.
* With one input channel, positive 1x1 weights w, no bias and x >= 0 the activations are rank
  one, A_k(s) = w_k x(s): the first principal component is w / |w| and EigenCAM is |w| x(s).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import napari_gradcam
from napari_gradcam import (
    METHODS,
    AblationCAM,
    EigenCAM,
    EigenGradCAM,
    FinerCAM,
    GradCAM,
    GuidedBackprop,
    ScoreCAM,
    SegmentationRegion,
    explain_volume,
    explainer,
    make_explainer,
    method_info,
)
from napari_gradcam.core.architectures import ResNetLike
from napari_gradcam.core.methods import INPUT_GRADIENT_METHODS, KPCACAM, heatmaps

SHAPE = (5, 6)


def _gap(hand, seed: int, in_channels: int = 2, positive: bool = False):
    model = hand.set_known_weights(hand.GapLinear(2, in_channels=in_channels), seed,
                                   positive=positive).double().eval()
    return model


def _activations(hand, model, x: np.ndarray) -> np.ndarray:
    return hand.relu(hand.conv1x1(x, model.conv.weight.detach().numpy(),
                                  model.conv.bias.detach().numpy()))


# ---------------------------------------------------------------------- one entry point


def test_explainer_builds_every_registered_method_by_name(resnet2d, images):
    for name in METHODS:
        built = explainer(name, resnet2d, "features.3")
        result = built.explain(images, 0)
        assert result.method == name
        expected = (2, 1, 16, 16) if name in INPUT_GRADIENT_METHODS else (2, 16, 16)
        assert result.maps.shape == expected
        assert np.isfinite(result.maps).all() and np.abs(result.maps).max() > 0, name


def test_explainer_forgives_spelling_and_lists_the_names_when_unknown(resnet2d):
    assert isinstance(explainer("Score_CAM", resnet2d, "features.3"), ScoreCAM)
    assert isinstance(explainer("EigenCAM", resnet2d, "features.3"), EigenCAM)
    assert isinstance(napari_gradcam.explainer("gradcamelementwise", resnet2d, "features.3"),
                      METHODS["gradcam-elementwise"])
    with pytest.raises(ValueError, match=r"unknown method 'fullgrad'; choose one of gradcam, .*"
                                         r"scorecam, .*ablationcam"):
        explainer("fullgrad", resnet2d, "features.3")
    with pytest.raises(TypeError, match=r"Score-CAM does not take one of the options.*center"):
        explainer("scorecam", resnet2d, "features.3", center=True)
    with pytest.raises(ValueError, match="Grad-CAM explains a layer"):
        explainer("gradcam", resnet2d)
    assert isinstance(explainer("guided-backprop", resnet2d), GuidedBackprop)
    assert isinstance(make_explainer("guided-backprop", resnet2d, "features.3"), GuidedBackprop)


def test_method_info_declares_what_each_method_needs():
    cam = method_info("cam")
    assert cam.needs_linear_head and cam.classifier_only and cam.gradient_free
    assert not cam.supports_segmentation
    assert method_info("scorecam").gradient_free and not method_info("scorecam").needs_gradients
    assert method_info("ablationcam").gradient_free
    assert method_info("eigencam").gradient_free and not method_info("eigencam").class_specific
    assert method_info("eigengradcam").needs_gradients
    guided = method_info("guided-backprop")
    assert guided.input_gradients and not guided.needs_layer and guided.one_target_at_a_time
    assert not guided.gradient_free
    assert method_info("gradcam").supports_segmentation
    assert not method_info("gradcam").one_target_at_a_time
    # the old constant is derived from the declarations and means the same
    assert {"guided-backprop", "guided-gradcam"} == INPUT_GRADIENT_METHODS
    for name in METHODS:
        info = method_info(name)
        assert info.name == name and info.title and info.reference and info.cost


def test_declarations_are_enforced_with_the_reason(resnet2d, unet2d, images):
    with pytest.raises(ValueError, match="EigenCAM explains one target at a time"):
        EigenCAM(resnet2d, "features.3")(images, "all")
    with pytest.raises(ValueError, match="Finer-CAM explains classes of a classifier"):
        FinerCAM(unet2d, "dec0")(images, lambda out: out[:, 0].sum((1, 2)))


# ---------------------------------------------------------------------- EigenCAM family


def test_eigencam_of_rank_one_activations_is_norm_of_weights_times_input(hand):
    model = _gap(hand, seed=3, in_channels=1, positive=True)
    with torch.no_grad():
        model.conv.bias.zero_()
    x = np.abs(np.random.default_rng(3).normal(size=(2, 1, *SHAPE)))
    w = model.conv.weight.detach().numpy().reshape(-1)
    maps = EigenCAM(model, "relu")(x)
    expected = np.linalg.norm(w) * x[:, 0]
    np.testing.assert_allclose(maps, expected, rtol=1e-5, atol=1e-7)


def _first_component(matrix: np.ndarray, center: bool) -> np.ndarray:
    """M v_1 by numpy's SVD, signed so that it agrees with the channel sum M 1."""
    if center:
        matrix = matrix - matrix.mean(0)
    _, _, vt = np.linalg.svd(matrix, full_matrices=False)
    projection = matrix @ vt[0]
    return projection if projection @ matrix.sum(1) >= 0 else -projection


@pytest.mark.parametrize("center", [False, True])
def test_eigencam_is_the_signed_first_principal_component(hand, center):
    model = _gap(hand, seed=7)
    x = np.random.default_rng(7).normal(size=(3, 2, *SHAPE))
    a = _activations(hand, model, x)
    expected = np.stack([
        hand.relu(_first_component(sample.reshape(4, -1).T, center)).reshape(SHAPE)
        for sample in a])
    assert expected.max() > 0
    maps = EigenCAM(model, "relu", center=center)(x)
    np.testing.assert_allclose(maps, expected, rtol=1e-5, atol=1e-7 * expected.max())
    # the map does not depend on the class: the same for every target
    np.testing.assert_allclose(EigenCAM(model, "relu", center=center)(x, 2), maps)
    if not center:  # non-negative activations: the Perron vector, nothing clipped
        raw = np.stack([_first_component(s.reshape(4, -1).T, False) for s in a])
        assert raw.min() >= -1e-9


@pytest.mark.parametrize("center", [True, False])
def test_eigengradcam_of_rank_one_products_has_the_sign_of_the_class_evidence(hand, center):
    model = _gap(hand, seed=4, in_channels=1, positive=True)
    hand.set_known_weights(model.fc, seed=3)  # class weights of both signs
    with torch.no_grad():
        model.conv.bias.zero_()
    x = np.abs(np.random.default_rng(5).normal(size=(2, 1, *SHAPE)))
    w = model.conv.weight.detach().numpy().reshape(-1)
    fc = model.fc.weight.detach().numpy()
    z = int(np.prod(SHAPE))
    # G_k A_k = W_ck w_k x(s) / Z: rank one, with right singular vector ±(W_c ⊙ w)/|W_c ⊙ w|
    pattern = x[:, 0] - (x[:, 0].mean(axis=(1, 2), keepdims=True) if center else 0.0)
    signs = set()
    for cls in range(3):
        evidence = float(fc[cls] @ w)  # Σ_k W_ck w_k: HiResCAM's map is x(s) times this / Z
        signs.add(np.sign(evidence))
        expected = hand.relu(np.sign(evidence) * pattern * np.linalg.norm(fc[cls] * w) / z)
        assert expected.max() > 0 or (not center and evidence < 0)
        np.testing.assert_allclose(EigenGradCAM(model, "relu", center=center)(x, cls),
                                   expected, rtol=1e-5, atol=1e-9)
    assert signs == {1.0, -1.0}  # both branches of the sign convention were exercised


def test_eigengradcam_all_classes_equals_one_at_a_time(resnet2d, images):
    everything = EigenGradCAM(resnet2d, "features.2")(images, "all")
    for cls in range(3):
        np.testing.assert_allclose(everything[:, cls],
                                   EigenGradCAM(resnet2d, "features.2")(images, cls),
                                   rtol=1e-4, atol=1e-6)


def test_kpcacam_with_a_linear_kernel_is_centred_eigencam(hand):
    """Linear kernel K = X Xᵀ = U S² Uᵀ: the top eigenvector scaled by √λ is s_1 u_1 = X v_1."""
    model = _gap(hand, seed=12)
    x = np.random.default_rng(12).normal(size=(2, 2, *SHAPE))
    kpca = KPCACAM(model, "relu", kernel="linear")(x)
    eigen = EigenCAM(model, "relu", center=True)(x)
    assert eigen.max() > 0
    np.testing.assert_allclose(kpca, eigen, rtol=1e-5, atol=1e-7 * eigen.max())


def _kernel_pca_by_hand(matrix: np.ndarray, gamma: float, coef0: float) -> np.ndarray:
    """scikit-learn's KernelPCA(n_components=1, kernel='sigmoid').fit_transform, written out."""
    x = matrix - matrix.mean(0)
    k = np.tanh(gamma * x @ x.T + coef0)
    n = len(k)
    ones = np.full((n, n), 1.0 / n)
    centred = k - ones @ k - k @ ones + ones @ k @ ones
    values, vectors = np.linalg.eigh(centred)
    scores = vectors[:, -1] * np.sqrt(values[-1])
    return scores if scores @ x.sum(1) >= 0 else -scores


def test_kpcacam_sigmoid_kernel_follows_the_kernel_pca_definition(hand):
    model = _gap(hand, seed=13)
    x = np.random.default_rng(13).normal(size=(2, 2, *SHAPE))
    a = _activations(hand, model, x)
    expected = np.stack([hand.relu(_kernel_pca_by_hand(s.reshape(4, -1).T, 0.25, 1.0))
                         .reshape(SHAPE) for s in a])
    assert expected.max() > 0
    maps = KPCACAM(model, "relu")(x)  # sigmoid, gamma = 1 / channels = 0.25, coef0 = 1
    np.testing.assert_allclose(maps, expected, rtol=1e-5, atol=1e-7 * expected.max())
    with pytest.raises(ValueError, match="kernel must be one of sigmoid, rbf, linear"):
        KPCACAM(model, "relu", kernel="cosine")


# ---------------------------------------------------------------------- Ablation-CAM


def test_ablationcam_weights_are_the_relative_score_drop(hand):
    model = _gap(hand, seed=9)
    x = np.random.default_rng(9).normal(size=(2, 2, *SHAPE))
    a = _activations(hand, model, x)
    fc, bias = model.fc.weight.detach().numpy(), model.fc.bias.detach().numpy()
    means = a.mean(axis=(2, 3))  # (N, K)
    logits = means @ fc.T + bias
    everything = AblationCAM(model, "relu", batch_size=3)(x, "all")
    for cls in range(3):
        y = logits[:, cls]
        weights = fc[cls][None] * means / y[:, None]  # (y - y_k) / y, y - y_k = W_ck m_k
        expected = hand.relu((weights[:, :, None, None] * a).sum(1))
        maps = AblationCAM(model, "relu", batch_size=3)(x, cls)
        np.testing.assert_allclose(maps, expected, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(everything[:, cls], expected, rtol=1e-5, atol=1e-7)
    assert everything.max() > 0


class _ReusesALayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, 1, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.conv(x)).mean(dim=2)


def test_ablationcam_refuses_a_layer_that_runs_twice():
    model = _ReusesALayer().eval()
    with (pytest.warns(UserWarning, match="ran 2 times"),
          pytest.raises(ValueError, match="runs exactly once")):
        AblationCAM(model, "conv")(torch.randn(1, 1, 8), lambda out: out[:, 0])
    assert all(not module._forward_hooks for module in model.modules())


# ---------------------------------------------------------------------- Finer-CAM


@pytest.mark.parametrize("compare", [1, 2])
def test_finercam_is_gradcam_of_the_weighted_logit_difference(hand, compare):
    model = _gap(hand, seed=11)
    x = np.random.default_rng(11).normal(size=(3, 2, *SHAPE))
    a = _activations(hand, model, x)
    fc, bias = model.fc.weight.detach().numpy(), model.fc.bias.detach().numpy()
    logits = a.mean(axis=(2, 3)) @ fc.T + bias
    probabilities = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    z, alpha = int(np.prod(SHAPE)), 0.7
    result = FinerCAM(model, "relu", alpha=alpha, compare=compare).explain(x)
    expected = []
    for n in range(len(x)):
        c = int(logits[n].argmax())
        others = sorted((j for j in range(3) if j != c),
                        key=lambda j: abs(logits[n, j] - logits[n, c]))[:compare]
        p = probabilities[n, others] / probabilities[n, others].sum()
        gradient = (fc[c] - alpha * (p[:, None] * fc[others]).sum(0)) / z  # dy/dA_k, constant
        expected.append(hand.relu(np.tensordot(gradient, a[n], axes=(0, 0))))
        assert list(result.extras["compared_classes"][n]) == others
    expected = np.stack(expected)
    assert expected.max() > 0
    np.testing.assert_allclose(result.maps, expected, rtol=1e-5, atol=1e-7 * expected.max())
    np.testing.assert_array_equal(result.target_indices, logits.argmax(1))


def test_finercam_with_alpha_zero_is_gradcam(resnet2d, images):
    np.testing.assert_allclose(FinerCAM(resnet2d, "features.3", alpha=0.0)(images, 1),
                               GradCAM(resnet2d, "features.3")(images, 1), rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------- Score-CAM


def test_scorecam_all_classes_equals_one_class_at_a_time(resnet2d, images):
    everything = ScoreCAM(resnet2d, "features.2", batch_size=7)(images, "all")
    assert everything.shape == (2, 3, 16, 16)
    for cls in range(3):
        np.testing.assert_allclose(everything[:, cls],
                                   ScoreCAM(resnet2d, "features.2")(images, cls),
                                   rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("method", [ScoreCAM, AblationCAM])
def test_perturbation_cams_score_each_row_with_its_own_samples_region(unet2d, images, method):
    """Batches mix samples and channels; a region with one mask per sample must follow the
    rows: explaining both samples together equals explaining each with its own mask."""
    masks = np.zeros((2, 16, 16), dtype=bool)
    masks[0, 2:6, 3:9] = True
    masks[1, 9:14, 1:5] = True
    together = method(unet2d, "dec0", batch_size=5)(images, SegmentationRegion(1, masks))
    for n in range(2):
        alone = method(unet2d, "dec0", batch_size=5)(images[n:n + 1],
                                                    SegmentationRegion(1, masks[n]))
        assert alone.max() > 0
        np.testing.assert_allclose(together[n], alone[0], rtol=1e-4, atol=1e-6 * alone.max())


def test_scorecam_keeps_feature_map_size_and_normalizes_like_the_others(resnet2d, images):
    raw = ScoreCAM(resnet2d, "features.2", upsample=False)(images, 0)
    assert raw.shape == (2, 8, 8)
    scaled = ScoreCAM(resnet2d, "features.2", upsample=False, normalize="max")(images, 0)
    np.testing.assert_allclose(scaled, raw / raw.reshape(2, -1).max(1)[:, None, None],
                               rtol=1e-5)
    with pytest.raises(ValueError, match="weights must be 'softmax', 'increase' or 'raw'"):
        ScoreCAM(resnet2d, "features.2", weights="paper")


def test_scorecam_in_volumes_slice_by_slice_equals_each_slice(resnet2d):
    volume = np.random.default_rng(2).random((3, 16, 16)).astype(np.float32)
    cam = ScoreCAM(resnet2d, "features.2", batch_size=5)
    result = explain_volume(cam, volume, mode="slices", batch_size=2, target=1)
    expected = cam(volume[:, None], 1)
    assert np.abs(expected).max() > 0
    np.testing.assert_allclose(np.asarray(result.maps), expected, rtol=1e-5, atol=1e-7)


def test_scorecam_and_ablationcam_in_3d_windows():
    torch.manual_seed(0)
    model = ResNetLike(3, 1, 2, widths=(4, 8)).eval()
    volume = np.random.default_rng(4).random((8, 12, 12)).astype(np.float32)
    for cam in (ScoreCAM(model, "features.2"), AblationCAM(model, "features.2")):
        maps = np.asarray(explain_volume(cam, volume, mode="windows", window=(8, 8, 8),
                                         target=1).maps)
        assert maps.shape == volume.shape and np.isfinite(maps).all() and maps.max() > 0


# ---------------------------------------------------------------------- input channels


class _SecondChannelOnly(nn.Module):
    """Two input channels (a dual-energy pair); the logits read only the second one."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 1)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(3 * 16, 2)
        with torch.no_grad():
            self.conv.weight[:, 0] = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.relu(self.conv(x)).flatten(1))


def test_per_channel_heatmaps_show_which_input_channel_was_used():
    torch.manual_seed(3)
    model = _SecondChannelOnly().eval()
    x = torch.rand(2, 2, 4, 4)
    gradients = GuidedBackprop(model)(x, 1)
    per_channel = heatmaps(gradients, "guided-backprop", channels="per-channel")
    assert per_channel.shape == (2, 2, 4, 4)
    np.testing.assert_array_equal(per_channel[:, 0], 0.0)  # the unused channel
    assert per_channel[:, 1].max() > 0
    np.testing.assert_allclose(per_channel, np.abs(gradients))
    np.testing.assert_allclose(heatmaps(gradients, "guided-backprop"), per_channel.max(1))
    np.testing.assert_allclose(heatmaps(gradients, "Guided_Backprop"), per_channel.max(1))
    np.testing.assert_allclose(heatmaps(gradients, "guided-backprop", channels="sum"),
                               gradients.sum(1))
    cam = np.ones((2, 4, 4), np.float32)
    np.testing.assert_array_equal(heatmaps(cam, "gradcam", channels="per-channel"), cam)
    with pytest.raises(ValueError, match="channels must be"):
        heatmaps(gradients, "guided-backprop", channels="mean")
