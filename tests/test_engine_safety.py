"""The engine is fast by design and leaves the model exactly as found; bad input gets a clear
message naming the problem and the fix."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from napari_gradcam import GradCAM, HiResCAM
from napari_gradcam.core.architectures import ResNetLike

# --- fast by design, and the model left as found ------------------------------------------


def test_no_parameter_gets_a_gradient_and_none_requires_grad_during_the_call(resnet2d, images):
    seen_during_call = []
    handle = resnet2d.features[2].register_forward_hook(
        lambda module, inputs, output: seen_during_call.append(
            [p.requires_grad for p in resnet2d.parameters()]))
    try:
        maps = GradCAM(resnet2d, "features.3")(images)
    finally:
        handle.remove()
    assert maps.max() > 0
    assert seen_during_call and not any(seen_during_call[0])
    assert all(p.grad is None for p in resnet2d.parameters())
    assert all(p.requires_grad for p in resnet2d.parameters())  # switched back on afterwards


def test_requires_grad_and_training_flags_are_restored_exactly(resnet2d, images):
    frozen = {name for name, _ in resnet2d.named_parameters() if name.startswith("features.1")}
    for name, param in resnet2d.named_parameters():
        param.requires_grad_(name not in frozen)
    resnet2d.features[2].train()  # one block in train mode inside an eval-mode model
    training_before = {name: m.training for name, m in resnet2d.named_modules()}
    requires_before = {name: p.requires_grad for name, p in resnet2d.named_parameters()}
    assert any(training_before.values()) and not all(training_before.values())
    assert any(requires_before.values()) and not all(requires_before.values())

    GradCAM(resnet2d, ["features.2", "features.3"])(images, target="all")

    assert {name: m.training for name, m in resnet2d.named_modules()} == training_before
    assert {name: p.requires_grad for name, p in resnet2d.named_parameters()} == requires_before
    assert all(not m._forward_hooks for m in resnet2d.modules())


class _FailsAfterTheLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.relu(self.conv(x))  # the hook on "conv" has run by now
        raise RuntimeError("the head is broken")


def test_hooks_and_state_restored_when_the_model_raises_mid_forward(images):
    model = _FailsAfterTheLayer().train()
    model.relu.eval()
    model.conv.bias.requires_grad_(False)
    with pytest.warns(UserWarning, match="training mode"), pytest.raises(
            RuntimeError, match=r"the model failed on an input of shape \(2, 1, 16, 16\): the "
                                r"head is broken"):
        GradCAM(model, "conv")(images)
    assert not model.conv._forward_hooks and not model._forward_hooks
    assert model.training and model.conv.training and not model.relu.training
    assert model.conv.weight.requires_grad and not model.conv.bias.requires_grad


def test_train_mode_warns_and_gives_the_eval_result_without_touching_batchnorm_stats(images):
    torch.manual_seed(0)
    model = ResNetLike(widths=(8, 16, 16))
    with torch.no_grad():  # non-trivial running statistics, so train and eval differ
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    stats_before = {k: v.clone() for k, v in model.state_dict().items()}
    reference = GradCAM(model.eval(), "features.3")(images, target=1)
    model.train()
    with pytest.warns(UserWarning, match="training mode"):
        in_train_mode = GradCAM(model, "features.3")(images, target=1)
    np.testing.assert_allclose(in_train_mode, reference, rtol=1e-6)
    assert model.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, stats_before[key]), key
    with torch.no_grad():  # sanity: train mode really would have changed the prediction
        assert not torch.allclose(model(images), model.eval()(images))


def test_layers_before_the_target_record_no_graph(resnet2d, images):
    recorded = {}

    def record(name):
        def hook(module, inputs, output):
            recorded[name] = output.requires_grad
        return hook

    handles = [resnet2d.features[0].register_forward_hook(record("stem")),
               resnet2d.features[1].register_forward_hook(record("stage1")),
               resnet2d.features[3].conv2.register_forward_hook(record("after"))]
    try:
        GradCAM(resnet2d, "features.2")(images)
    finally:
        for handle in handles:
            handle.remove()
    assert recorded == {"stem": False, "stage1": False, "after": True}


def test_an_input_that_requires_grad_gives_the_same_map_and_no_grad(resnet2d, images):
    leaf = images.clone().requires_grad_(True)
    np.testing.assert_allclose(GradCAM(resnet2d, "features.3")(leaf),
                               GradCAM(resnet2d, "features.3")(images), rtol=1e-6)
    assert leaf.grad is None


class _ConvThenInplaceRelu(nn.Module):
    def __init__(self, inplace: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 1)
        self.relu = nn.ReLU(inplace=inplace)
        self.fc = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.relu(self.conv(x)).mean((2, 3)))


def test_inplace_relu_after_the_target_does_not_alter_the_activation(hand):
    """Grad-CAM at the conv uses its raw output, negative values included; an in-place ReLU
    that clamped the recorded tensor would change the weighted sum."""
    model = hand.set_known_weights(_ConvThenInplaceRelu(inplace=True), seed=6).double().eval()
    x = np.random.default_rng(6).normal(size=(2, 1, 4, 5))
    a = hand.conv1x1(x, model.conv.weight.detach().numpy(), model.conv.bias.detach().numpy())
    assert (a < 0).any() and (a > 0).any()
    gradient = model.fc.weight.detach().numpy()[1][None, :, None, None] * (a > 0) / 20
    expected = hand.relu((gradient.mean((2, 3), keepdims=True) * a).sum(1))
    result = HiResCAM(model, "conv").explain(x, target=1)
    gradcam = GradCAM(model, "conv")(x, target=1)
    np.testing.assert_allclose(gradcam, expected, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(result.maps, hand.relu((gradient * a).sum(1)), rtol=1e-5,
                               atol=1e-8)
    clamped = hand.relu((gradient.mean((2, 3), keepdims=True) * hand.relu(a)).sum(1))
    assert not np.allclose(expected, clamped)  # the test could tell the difference
    twin = _ConvThenInplaceRelu(inplace=False).double().eval()
    twin.load_state_dict(model.state_dict())
    np.testing.assert_array_equal(GradCAM(twin, "conv")(x, target=1), gradcam)


def test_layer_given_as_a_module_equals_its_name(resnet2d, images):
    np.testing.assert_array_equal(GradCAM(resnet2d, resnet2d.features[3])(images),
                                  GradCAM(resnet2d, "features.3")(images))


def test_numpy_input_equals_tensor_input(resnet2d, images):
    np.testing.assert_array_equal(GradCAM(resnet2d, "features.3")(images.numpy()),
                                  GradCAM(resnet2d, "features.3")(images))


@pytest.mark.parametrize("dtype", [np.float64, np.uint8, np.int16])
def test_any_real_dtype_meets_a_float32_model(resnet2d, images, dtype):
    """NumPy's default float64 (and integer grey values) must not need a cast by the user."""
    x = (images.numpy() * 100).astype(dtype)
    expected = GradCAM(resnet2d, "features.3")(torch.from_numpy(x.astype(np.float32)))
    np.testing.assert_allclose(GradCAM(resnet2d, "features.3")(x), expected, rtol=1e-5,
                               atol=1e-7)


# --- bad input ------------------------------------------------------------------------------


def test_wrong_ndim(resnet2d):
    with pytest.raises(ValueError, match=r"\(N, C, \*spatial\).*x\[None, None\]"):
        GradCAM(resnet2d, "features.3")(torch.rand(16, 16))


def test_wrong_channels_names_the_expected_count(resnet2d):
    with pytest.raises(ValueError, match=r"expects 1 input channel\(s\) but the input has 3"):
        GradCAM(resnet2d, "features.3")(torch.rand(1, 3, 16, 16))
    rgb = ResNetLike(in_channels=3, widths=(4, 8, 8)).eval()
    with pytest.raises(ValueError, match=r"expects 3 input channel.*repeat"):
        GradCAM(rgb, "features.3")(torch.rand(1, 1, 16, 16))


def test_volume_given_to_a_2d_model_suggests_explain_volume(resnet2d):
    with pytest.raises(ValueError, match=r"2D network.*3 spatial dims.*explain_volume"):
        GradCAM(resnet2d, "features.3")(torch.rand(1, 1, 8, 16, 16))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_input(resnet2d, bad):
    x = torch.rand(1, 1, 16, 16)
    x[0, 0, 3, 4] = bad
    with pytest.raises(ValueError, match="1 NaN or infinite values"):
        GradCAM(resnet2d, "features.3")(x)


def test_empty_and_bool_and_non_array_input(resnet2d):
    cam = GradCAM(resnet2d, "features.3")
    with pytest.raises(ValueError, match="the input is empty"):
        cam(torch.zeros(0, 1, 16, 16))
    with pytest.raises(TypeError, match=r"dtype torch\.bool"):
        cam(np.ones((1, 1, 16, 16), dtype=bool))
    with pytest.raises(TypeError, match="expected a torch tensor or an array"):
        cam("micrograph.tif")


def test_unknown_layer_lists_the_conv_layers(resnet2d):
    with pytest.raises(KeyError, match=r"no layer 'features\.9'.*features\.0.*features\.3"):
        GradCAM(resnet2d, "features.9")
    with pytest.raises(KeyError, match="not part of this model"):
        GradCAM(resnet2d, nn.Conv2d(1, 1, 1))
    with pytest.raises(ValueError, match="no target layer"):
        GradCAM(resnet2d, [])


def test_linear_layer_is_not_a_feature_map(resnet2d, images):
    with pytest.raises(ValueError, match=r"'classifier'.*not a feature map.*features\.3"):
        GradCAM(resnet2d, "classifier")(images)


def test_model_that_is_not_a_module():
    with pytest.raises(TypeError, match=r"must be a torch\.nn\.Module"):
        GradCAM(lambda x: x, "conv")


def test_softmax_output_warns_about_probabilities(resnet2d, images):
    model = nn.Sequential(resnet2d, nn.Softmax(dim=1)).eval()
    with pytest.warns(UserWarning, match="look like probabilities.*logits"):
        GradCAM(model, "0.features.3")(images)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # logits: no such warning
        GradCAM(resnet2d, "features.3")(images)


def test_saturated_score_warns_and_suggests_the_logit(resnet2d, images):
    """A sigmoid at +40 is exactly 1.0 in float32: its gradient is exactly zero."""
    model = nn.Sequential(resnet2d, nn.Flatten(), nn.Linear(3, 1), nn.Sigmoid()).eval()
    with torch.no_grad():
        model[2].weight.zero_()
        model[2].weight[0, 0] = 1.0
        model[2].bias.fill_(40.0)
    with pytest.warns(UserWarning, match="exactly zero.*explain the logit"):
        maps = GradCAM(model, "0.features.3")(images, target=lambda out: out[:, 0])
    assert not maps.any()


def test_a_call_inside_no_grad_or_inference_code_still_gives_the_map(resnet2d, images):
    """Users often wrap inference in torch.no_grad(); the CAM must not silently break there."""
    expected = GradCAM(resnet2d, "features.3")(images)
    with torch.no_grad():
        inside = GradCAM(resnet2d, "features.3")(images)
    np.testing.assert_allclose(inside, expected, rtol=1e-6)
    assert torch.is_grad_enabled()  # the caller's mode is back after the call


def test_the_body_before_the_target_layer_runs_in_no_grad_mode(resnet2d, images):
    modes: dict[str, bool] = {}
    hooks = [dict(resnet2d.named_modules())[name].register_forward_hook(
        lambda module, inputs, output, name=name: modes.__setitem__(name, torch.is_grad_enabled()))
        for name in ("features.1", "classifier")]
    try:
        GradCAM(resnet2d, "features.2")(images)
    finally:
        for hook in hooks:
            hook.remove()
    assert modes == {"features.1": False, "classifier": True}


# --- wrong numbers must not pass without a word (issue 9) ----------------------------------


def test_a_one_pixel_layer_warns_and_names_the_last_layer_with_spatial_extent(resnet2d, images):
    """Global pooling makes a 1×1 map: its CAM is one value everywhere, so say so."""
    with pytest.warns(UserWarning, match=r"'pool' outputs a feature map of one pixel "
                      r"\(C×spatial = 16×1×1\) for an input of 16×16.*same value everywhere.*"
                      r"'features\.3' \(output 16×4×4\)"):
        maps = GradCAM(resnet2d, "pool")(images)
    # the warning is about a real defect: each map is constant
    assert np.ptp(maps.reshape(len(maps), -1), axis=1).max() == 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a layer with spatial extent: no warning
        GradCAM(resnet2d, "features.3")(images)


def test_a_one_pixel_layer_in_a_plain_sequential_suggests_the_layer_before_the_pool():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(4, 2)).eval()
    with pytest.warns(UserWarning, match=r"'2' outputs a feature map of one pixel.*"
                      r"instead: '1' \(output 4×12×10\)"):
        GradCAM(model, "2")(torch.rand(1, 1, 12, 10))


def test_the_one_pixel_advice_costs_one_dry_run_per_input_shape_not_one_per_batch():
    """A volume explained batch by batch at a 1×1 layer warns every batch; the dry run that
    finds the better layer runs once per model and input shape."""
    from napari_gradcam import explain_volume

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(4, 2)).eval()
    calls = []
    model[0].register_forward_hook(lambda *_: calls.append(1))
    volume = np.random.default_rng(0).random((6, 12, 10)).astype(np.float32)
    with pytest.warns(UserWarning, match="one pixel"):
        explain_volume(GradCAM(model, "2"), volume, mode="slices", axis=0, batch_size=2)
    batches = 3
    assert len(calls) <= batches + 1  # each batch once, plus one dry run for the advice


def test_float64_beyond_float32_range_is_called_an_overflow_not_nan(resnet2d):
    x = np.random.default_rng(0).random((1, 1, 16, 16))
    x[0, 0, 3, 3] = -1e300
    with pytest.raises(ValueError) as caught:
        GradCAM(resnet2d, "features.3")(x)
    message = str(caught.value)
    assert "1 value(s) too large for the model's dtype float32" in message
    assert "largest |value| is 1e+300" in message and "overflow to infinity" in message
    assert "NaN" not in message  # the data holds no NaN: do not say it does
    x[0, 0, 5, 5] = np.nan  # a real NaN as well: both are named
    with pytest.raises(ValueError, match=r"too large.*1 value\(s\) are already NaN"):
        GradCAM(resnet2d, "features.3")(x)


def test_a_typo_in_the_layer_name_gets_the_close_match(resnet2d):
    with pytest.raises(KeyError, match=r"no layer 'feature\.3' \(did you mean 'features\.3'\?\)"):
        GradCAM(resnet2d, "feature.3")


def test_a_long_layer_list_is_cut_but_never_loses_the_close_match():
    model = nn.Module()
    model.blocks = nn.Sequential(*[nn.Conv2d(1, 1, 3, padding=1) for _ in range(60)])
    with pytest.raises(KeyError) as caught:
        GradCAM(model, "block.57")
    message = str(caught.value)
    assert "did you mean 'blocks.57'?" in message
    listed = message.split("Layers that make feature maps: ")[1]
    names = listed.split(", ... (")[0].split(", ")
    assert "blocks.57" in names  # beyond the first 40, kept because it is the close match
    assert len(names) <= 40 and listed.endswith(f"({61 - len(names)} more)")
