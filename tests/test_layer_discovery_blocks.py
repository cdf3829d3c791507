"""feature_blocks: the short list of layers a user picks a Grad-CAM layer from.

On real networks (a tiny CNN built here, the shipped U-Net from the zoo, MONAI's UNet and
ViT), the list must hold the blocks that make feature maps and none of the norms,
activations, dropout or pooling layers inside them, and the card's default must stay listed.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from napari_gradcam.core.layer_discovery import (
    POINTWISE_TYPES,
    discover_feature_layers,
    feature_blocks,
)


class TinyCNN(nn.Module):
    """Two conv blocks (conv, BN, ReLU, dropout) and a head: the blocks are 'block1/2'."""

    def __init__(self) -> None:
        super().__init__()
        self.block1 = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                    nn.Dropout2d(0.1))
        self.pool = nn.MaxPool2d(2)
        self.block2 = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block2(self.pool(self.block1(x)))
        return self.fc(self.gap(x).flatten(1))


def names(layers) -> list[str]:
    return [layer.name for layer in layers]


def test_a_tiny_cnn_lists_its_two_blocks_only() -> None:
    every = discover_feature_layers(TinyCNN().eval(), 2, 1, 32)
    assert "block1.1" in names(every) and "block1.2" in names(every)  # BN, ReLU are probed
    assert names(feature_blocks(every)) == ["block1", "block2"]


def test_the_zoo_unet_lists_its_encoder_and_decoder_blocks() -> None:
    from napari_gradcam.core.models import load_model

    loaded = load_model("ct-slice-unet")
    short = feature_blocks(loaded.feature_layers, keep=(loaded.card.target_layer,))
    assert names(short) == ["down0", "down1", "down2", "down3", "up2", "dec2", "up1", "dec1",
                            "up0", "dec0", "head"]
    assert len(loaded.feature_layers) > 4 * len(short)  # what the old list offered
    assert loaded.card.target_layer in names(short)
    assert not {layer.type_name for layer in short} & POINTWISE_TYPES


def test_a_monai_unet_lists_residual_units_and_skip_connections() -> None:
    monai_nets = pytest.importorskip("monai.networks.nets")
    unet = monai_nets.UNet(spatial_dims=2, in_channels=1, out_channels=3, channels=(4, 8, 16),
                           strides=(2, 2), num_res_units=1).eval()
    every = discover_feature_layers(unet, 2, 1, 32)
    short = feature_blocks(every)
    assert names(short) == ["model.0", "model.1.submodule.0", "model.1.submodule.1",
                            "model.1.submodule.2.0", "model.1.submodule.2.1", "model.1",
                            "model.2.0", "model.2.1"]
    assert {layer.type_name for layer in short} == {"ResidualUnit", "SkipConnection",
                                                    "Convolution"}
    inside = [layer for layer in every if layer.type_name in ("InstanceNorm2d", "PReLU",
                                                              "Dropout", "ADN")]
    assert inside and not set(names(inside)) & set(names(short))


def test_a_vit_lists_its_transformer_blocks_and_keeps_the_default_norm() -> None:
    monai_nets = pytest.importorskip("monai.networks.nets")
    vit = monai_nets.ViT(in_channels=1, img_size=64, patch_size=16, classification=True,
                         num_classes=3, hidden_size=48, mlp_dim=96, num_layers=2, num_heads=4,
                         spatial_dims=2).eval()
    every = discover_feature_layers(vit, 2, 1, 64)
    short = feature_blocks(every, keep=("blocks.1.norm1",))
    assert names(short) == ["patch_embedding", "blocks.0", "blocks.1.norm1", "blocks.1"]
    assert "blocks.1.norm1" not in names(feature_blocks(every))  # shown only when kept


def test_a_model_of_pointwise_layers_only_keeps_its_full_list() -> None:
    model = nn.Sequential(nn.BatchNorm2d(1), nn.ReLU()).eval()
    every = discover_feature_layers(model, 2, 1, 16)
    assert every and feature_blocks(every) == every
