"""Layer discovery: which modules make feature maps, their shapes, and the default choice."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from napari_gradcam.core.architectures import ResNetLike, UNet
from napari_gradcam.core.layer_discovery import (
    default_target_layer,
    discover_feature_layers,
    last_spatial_layer,
    probe_model,
)
from napari_gradcam.core.model_card import ModelCard


@pytest.mark.parametrize(
    ("spatial_dims", "size", "stage_shapes"),
    [
        # stride 1 in the first stage, then stride 2 per stage: 64 -> 64, 32, 16
        (1, 64, [(16, 64), (32, 32), (64, 16)]),
        (2, 32, [(16, 32, 32), (32, 16, 16), (64, 8, 8)]),
        (3, 16, [(16, 16, 16, 16), (32, 8, 8, 8), (64, 4, 4, 4)]),
    ],
)
def test_resnet_like_stage_shapes_and_default_layer(
    spatial_dims: int, size: int, stage_shapes: list[tuple[int, ...]]
) -> None:
    model = ResNetLike(spatial_dims=spatial_dims, in_channels=2)
    layers = {info.name: info for info in discover_feature_layers(model, spatial_dims, 2, size)}
    assert [layers[f"features.{i}"].output_shape for i in (1, 2, 3)] == stage_shapes
    assert layers["features.0"].output_shape == (16,) + (size,) * spatial_dims
    assert layers["features.3"].type_name == "ResidualBlock"
    assert layers["pool"].output_shape == (64,) + (1,) * spatial_dims
    assert "classifier" not in layers  # (N, K) is not a feature map
    assert layers["features.3.relu"].calls == 2  # shared ReLU, ran twice
    assert default_target_layer(model, spatial_dims, 2, size) == "features.3"


def test_layers_come_in_execution_order_and_the_model_is_left_as_found() -> None:
    model = ResNetLike()
    model.train()
    model.features[1].eval()  # a mixed state must come back exactly
    names = [info.name for info in discover_feature_layers(model, 2, 1, 32)]
    assert names.index("features.0") < names.index("features.1.conv1") < names.index("features.3")
    assert names.index("features.3") < names.index("features") < names.index("pool")
    assert model.training and model.features[0].training and not model.features[1].training
    assert not any(m._forward_hooks for m in model.modules())


def test_unet_default_is_the_bottleneck_not_the_head() -> None:
    model = UNet(spatial_dims=2, num_classes=4)
    probe = probe_model(model, 2, 1)
    shapes = {info.name: info.output_shape for info in probe.layers}
    assert shapes["down2"] == (64, 16, 16)  # 64 / 2 / 2
    assert shapes["head"] == (4, 64, 64)
    assert probe.output_shape == (1, 4, 64, 64) and probe.output_is_map
    assert default_target_layer(model, 2, 1) == "down2"


def test_unet_3d_default_layer() -> None:
    model = UNet(spatial_dims=3, widths=(4, 8))
    assert default_target_layer(model, 3, 1, 16) == "down1"


def test_the_card_choice_wins_and_is_checked() -> None:
    model = ResNetLike()
    card = ModelCard(name="c", architecture="resnet_like", spatial_dims=2, in_channels=1,
                     task="classification", target_layer="features.2")
    assert default_target_layer(model, 2, 1, card=card) == "features.2"
    wrong = ModelCard(name="c", architecture="resnet_like", spatial_dims=2, in_channels=1,
                      task="classification", target_layer="features.9")
    with pytest.raises(ValueError, match="no such layer"):
        default_target_layer(model, 2, 1, card=wrong)


class NeedsFixedSize(nn.Module):
    """Flatten into a Linear: only runs at 8x8, like many hand-written classifiers."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.act = nn.ReLU()
        self.fc = nn.Linear(2 * 8 * 8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.act(self.conv(x)), 1))


def test_a_model_that_fails_on_the_dummy_input_gets_advice_and_no_leftover_hooks() -> None:
    model = NeedsFixedSize()
    with pytest.raises(ValueError, match=r"dummy input of shape \(1, 1, 64, 64\).*input_size"):
        discover_feature_layers(model, 2, 1)
    assert not any(m._forward_hooks for m in model.modules())
    assert model.training  # restored after the failure, too
    assert default_target_layer(model, 2, 1, input_size=(8, 8)) == "act"


def test_a_model_without_feature_maps_is_reported() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    assert discover_feature_layers(model, 1, 1, 16) == []
    with pytest.raises(ValueError, match="no layer of this model returns a feature map"):
        default_target_layer(model, 1, 1, 16)


def test_a_mistyped_card_target_layer_gets_the_close_match() -> None:
    card = ModelCard(name="c", architecture="resnet_like", spatial_dims=2, in_channels=1,
                     task="classification", target_layer="feature.3")
    with pytest.raises(ValueError, match=r"no such layer \(did you mean 'features\.3'\?\)"):
        default_target_layer(ResNetLike(), 2, 1, card=card)


def test_last_spatial_layer_is_found_at_the_users_input_size() -> None:
    """What the engine suggests instead of a 1×1 layer: probed at the real input size."""
    model = NeedsFixedSize()  # runs only at 8x8: a fixed 64x64 dummy would fail
    found = last_spatial_layer(model, (1, 8, 8))
    assert found is not None and found.name == "act" and found.output_shape == (2, 8, 8)
    pooled = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(1, 2))
    assert last_spatial_layer(pooled, (1, 8, 8)) is None  # nothing with spatial extent


class UnpaddedCNN(nn.Module):
    """Valid (unpadded) convolutions: 32 -> 30 -> 28, grids no stride of the input makes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3)
        self.conv2 = nn.Conv2d(4, 6, 3)
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv2(torch.relu(self.conv1(x)))).mean((2, 3)))


def test_a_cnn_keeps_its_unpadded_feature_maps() -> None:
    layers = {info.name: info.output_shape for info in discover_feature_layers(
        UnpaddedCNN(), 2, 1, 32)}
    assert layers == {"conv1": (4, 30, 30), "conv2": (6, 28, 28)}
    assert default_target_layer(UnpaddedCNN(), 2, 1, 32) == "conv2"


def monai_vit(spatial_dims: int, classification: bool) -> nn.Module:
    nets = pytest.importorskip("monai.networks.nets")
    torch.manual_seed(3)
    size, patch = (32, 8) if spatial_dims == 2 else (16, 4)
    return nets.ViT(in_channels=1, img_size=size, patch_size=patch, hidden_size=48, mlp_dim=96,
                    num_layers=2, num_heads=4, classification=classification, num_classes=3,
                    spatial_dims=spatial_dims).eval()


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_a_vit_lists_its_token_layers_on_the_patch_grid_and_no_attention_matrix(
        spatial_dims: int) -> None:
    model = monai_vit(spatial_dims, classification=True)
    size = 32 if spatial_dims == 2 else 16
    grid = (4,) * spatial_dims  # size / patch
    layers = {info.name: info for info in discover_feature_layers(model, spatial_dims, 1, size)}
    for name in ("patch_embedding", "blocks.0", "blocks.1", "blocks.1.norm1", "norm"):
        assert layers[name].output_shape == (48, *grid), name
    assert layers["blocks.0"].type_name == "TransformerBlock"
    assert layers["blocks.0.mlp.linear1"].output_shape == (96, *grid)
    # the attention weights (N, heads, T, T), T = 1 + 16 tokens, are no map of the image
    assert not any("drop_weights" in name for name in layers)
    assert all(info.output_shape[1:] == grid for info in layers.values())
    assert not any(m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_a_class_token_vit_defaults_to_a_layer_whose_map_is_not_zero(spatial_dims: int) -> None:
    from napari_gradcam.core.methods import GradCAM

    model = monai_vit(spatial_dims, classification=True)
    size = 32 if spatial_dims == 2 else 16
    chosen = default_target_layer(model, spatial_dims, 1, size)
    # after the last attention the patch tokens no longer reach the class token: the last
    # block (and the final norm) would give an all-zero map
    assert chosen == "blocks.1.norm1"
    probe = probe_model(model, spatial_dims, 1, size)
    assert {"blocks.1", "norm", "blocks.1.mlp"} <= probe._class_token_only
    assert "blocks.1.norm1" not in probe._class_token_only
    x = torch.rand(2, 1, *(size,) * spatial_dims, generator=torch.Generator().manual_seed(1))
    maps = GradCAM(model, chosen, output=0).explain(x, 0).maps
    assert maps.max() > 0
    assert all(p.grad is None for p in model.parameters())  # the probe's backward left none
    with pytest.warns(UserWarning, match="only the class token"):
        assert GradCAM(model, "blocks.1", output=0).explain(x, 0).maps.max() == 0


def test_a_vit_without_class_token_defaults_to_its_last_block() -> None:
    model = monai_vit(2, classification=False)
    assert default_target_layer(model, 2, 1, 32) == "blocks.1"
