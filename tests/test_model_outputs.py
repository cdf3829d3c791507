"""Models that return a tuple, a list, a named tuple or a dict: ``output=`` picks the tensor to
explain, and when several tensors could be meant and none is named, the error lists them."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pytest
import torch
from torch import nn

from napari_gradcam import GradCAM, explain_volume
from napari_gradcam.core.architectures import ResNetLike
from napari_gradcam.core.outputs import select_output


class Heads(NamedTuple):
    logits: torch.Tensor
    features: torch.Tensor


class MultiOutput(nn.Module):
    """The seeded ResNetLike, returning its logits together with other things."""

    def __init__(self, style: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = ResNetLike(spatial_dims=2, in_channels=1, num_classes=3, widths=(8, 16, 16))
        self.style = style

    def forward(self, x: torch.Tensor) -> object:
        logits = self.net(x)
        auxiliary = -2.0 * logits[:, :2]  # a second head with other scores
        if self.style == "dict":
            return {"aux": auxiliary, "logits": logits}
        if self.style == "tuple_with_list":  # MONAI ViT: (logits, [hidden states])
            return logits, [logits * 1.0, logits * 2.0]
        if self.style == "named":
            return Heads(logits, auxiliary)
        return [auxiliary, logits]


@pytest.fixture
def plain() -> nn.Module:
    torch.manual_seed(0)
    return ResNetLike(spatial_dims=2, in_channels=1, num_classes=3, widths=(8, 16, 16)).eval()


@pytest.mark.parametrize(("style", "output"), [("dict", "logits"), ("named", "logits"),
                                               ("named", 0), ("list", 1), ("list", -1),
                                               ("tuple_with_list", None)])
def test_the_chosen_output_gives_the_plain_models_map(plain, images, style, output):
    model = MultiOutput(style).eval()
    expected = GradCAM(plain, "features.3").explain(images, target=2)
    result = GradCAM(model, "net.features.3", output=output).explain(images, target=2)
    np.testing.assert_allclose(result.maps, expected.maps, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(result.outputs, expected.outputs, rtol=1e-6)
    assert expected.maps.max() > 0


def test_another_output_explains_another_score(plain, images):
    model = MultiOutput("dict").eval()
    result = GradCAM(model, "net.features.3", output="aux").explain(images, target=1)
    logits = GradCAM(plain, "features.3").explain(images, target=1)
    np.testing.assert_allclose(result.scores, -2.0 * logits.scores, rtol=1e-5)
    assert result.outputs.shape == (2, 2)


def test_several_tensors_and_none_chosen_names_the_candidates(images):
    model = MultiOutput("dict").eval()
    with pytest.raises(ValueError, match=r"dict of 2 tensors \('aux': tensor \(2, 2\), "
                                         r"'logits': tensor \(2, 3\)\).*output='aux'"):
        GradCAM(model, "net.features.3")(images)
    with pytest.raises(ValueError, match=r"0: tensor \(2, 2\), 1: tensor \(2, 3\)"):
        GradCAM(MultiOutput("list").eval(), "net.features.3")(images)


def test_wrong_choices_say_what_the_model_returned(plain, images):
    with pytest.raises(ValueError, match=r"no 'logit'; they are 'aux': tensor \(2, 2\)"):
        GradCAM(MultiOutput("dict").eval(), "net.features.3", output="logit")(images)
    with pytest.raises(ValueError, match=r"output=5 is out of range: the model returned 2"):
        GradCAM(MultiOutput("list").eval(), "net.features.3", output=5)(images)
    with pytest.raises(ValueError, match=r"output=1 is a list of 2, not a tensor"):
        GradCAM(MultiOutput("tuple_with_list").eval(), "net.features.3", output=1)(images)
    with pytest.raises(ValueError, match=r"returns a single tensor of shape \(2, 3\)"):
        GradCAM(plain, "features.3", output=0)(images)


def test_select_output_refuses_what_holds_no_tensor():
    with pytest.raises(ValueError, match="without a tensor at the top level"):
        select_output(([torch.zeros(1)],))
    with pytest.raises(TypeError, match="a tuple/list/dict of tensors"):
        select_output("logits")
    with pytest.raises(TypeError, match="an index \\(int\\) or a key"):
        select_output((torch.zeros(1), torch.zeros(2)), 1.0)  # type: ignore[arg-type]


def test_explain_volume_slices_with_a_dict_output(plain):
    volume = np.random.default_rng(3).random((5, 16, 16)).astype(np.float32)
    model = MultiOutput("dict").eval()
    chosen = explain_volume(GradCAM(model, "net.features.3", output="logits"), volume,
                            mode="slices", batch_size=2, target=0)
    reference = explain_volume(GradCAM(plain, "features.3"), volume, mode="slices",
                               batch_size=2, target=0)
    np.testing.assert_allclose(np.asarray(chosen.maps), np.asarray(reference.maps), rtol=1e-6,
                               atol=1e-8)
    np.testing.assert_allclose(chosen.predictions, reference.predictions, rtol=1e-6)


@pytest.mark.parametrize("method", ["guided-backprop", "guided-gradcam"])
def test_input_gradient_methods_take_the_chosen_output_too(plain, images, method):
    from napari_gradcam import make_explainer

    model = MultiOutput("dict").eval()
    chosen = make_explainer(method, model, "net.features.3", output="logits")(images, target=2)
    reference = make_explainer(method, plain, "features.3")(images, target=2)
    assert np.abs(reference).max() > 0
    np.testing.assert_allclose(chosen, reference, rtol=1e-5, atol=1e-9)
