"""Vision transformers: Grad-CAM on token activations (N, T, C) and on channels-last Swin maps.

The models are MONAI's own ViT, UNETR and SwinUNETR (small configurations, seeded). Every map
is checked against the definition computed here without the library: a forward hook keeps the
layer's output, ordinary autograd gives dy/dA on the tokens, then weights = mean over the
patch tokens of dy/dA, map = ReLU(sum_c w_c A_c) on the patch grid, upsampled (bi/trilinear,
align_corners=False) to the input. A hand-made token model whose answer is known in closed
form checks the token order against patches cut out of the image by hand.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from napari_gradcam import GradCAM, SegmentationRegion, explain_volume
from napari_gradcam.core.tokens import FeatureMapView, TokenLayout, feature_map_view

monai_nets = pytest.importorskip("monai.networks.nets")

_MODES = {1: "linear", 2: "bilinear", 3: "trilinear"}


def gradcam_by_hand(model: nn.Module, layer: str, x: torch.Tensor, score, *,
                    prefix: int = 0, grid: tuple[int, ...] | None = None,
                    channels_last: bool = False) -> np.ndarray:
    """Grad-CAM from its definition with plain autograd (parameter gradients and all)."""
    captured = {}

    def keep(module, inputs, output):
        output.retain_grad()
        captured["a"] = output

    handle = dict(model.named_modules())[layer].register_forward_hook(keep)
    try:
        score(model(x)).sum().backward()
    finally:
        handle.remove()
    model.zero_grad(set_to_none=True)
    a, g = captured["a"].detach(), captured["a"].grad.detach()
    if channels_last:  # (N, *s, C): weights are the mean over positions of each channel
        weights = g.flatten(1, -2).mean(1)
        cam = F.relu(torch.einsum("n...c,nc->n...", a, weights))
    elif grid is not None:  # tokens (N, T, C): drop the class token(s), mean over patch tokens
        a, g = a[:, prefix:], g[:, prefix:]
        weights = g.mean(1)
        cam = F.relu(torch.einsum("ntc,nc->nt", a, weights)).reshape(len(a), *grid)
    else:
        weights = g.flatten(2).mean(-1)
        cam = F.relu(torch.einsum("nc...,nc->n...", a, weights))
    size = tuple(x.shape[2:])
    cam = F.interpolate(cam[:, None], size=size, mode=_MODES[len(size)], align_corners=False)
    return cam[:, 0].numpy()


def vit(spatial_dims: int, img_size: int, patch: int, classification: bool = True,
        **kwargs: object) -> nn.Module:
    torch.manual_seed(3)
    return monai_nets.ViT(in_channels=1, img_size=img_size, patch_size=patch, hidden_size=48,
                          mlp_dim=96, num_layers=2, num_heads=4, classification=classification,
                          num_classes=3, spatial_dims=spatial_dims, **kwargs).eval()


@pytest.mark.parametrize(("spatial_dims", "img_size", "patch"), [(2, 32, 8), (3, 16, 4)])
def test_vit_class_token_model_matches_the_definition_on_tokens(spatial_dims, img_size, patch):
    model = vit(spatial_dims, img_size, patch)
    x = torch.rand(2, 1, *(img_size,) * spatial_dims, generator=torch.Generator().manual_seed(4))
    grid = (img_size // patch,) * spatial_dims
    result = GradCAM(model, "blocks.0", output=0).explain(x, target=1)
    expected = gradcam_by_hand(model, "blocks.0", x, lambda out: out[0][:, 1], prefix=1,
                               grid=grid)
    assert result.feature_shapes == [(48, *grid)]  # the class token is not on the grid
    assert expected.max() > 0
    np.testing.assert_allclose(result.maps, expected, rtol=1e-4, atol=1e-6 * expected.max())
    np.testing.assert_allclose(result.scores, result.outputs[:, 1], rtol=1e-6)


def test_vit_grid_and_class_token_given_by_the_user_equal_the_derived_ones():
    model = vit(2, 32, 8)
    x = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(5))
    derived = GradCAM(model, "blocks.0")(x, target=2)
    given = GradCAM(model, "blocks.0", patch_grid=(4, 4), class_token=True)(x, target=2)
    np.testing.assert_array_equal(derived, given)
    with pytest.raises(ValueError, match=r"17 tokens.*patch_grid \(4, 4\) needs 16 tokens"):
        GradCAM(model, "blocks.0", patch_grid=(4, 4), class_token=False)(x, target=2)
    with pytest.raises(ValueError, match="3 axes but the input has 2"):
        GradCAM(model, "blocks.0", patch_grid=(2, 2, 4))(x, target=2)


def test_vit_perceptron_patch_embedding_gives_the_grid_too():
    model = vit(2, 32, 8, proj_type="perceptron")
    x = torch.rand(1, 1, 32, 32, generator=torch.Generator().manual_seed(6))
    result = GradCAM(model, "blocks.0").explain(x, target=0)
    expected = gradcam_by_hand(model, "blocks.0", x, lambda out: out[0][:, 0], prefix=1,
                               grid=(4, 4))
    assert result.feature_shapes == [(48, 4, 4)]
    np.testing.assert_allclose(result.maps, expected, rtol=1e-4, atol=1e-6 * expected.max())


def test_last_block_of_a_class_token_classifier_warns_which_layer_to_take():
    model = vit(2, 32, 8)
    x = torch.rand(1, 1, 32, 32, generator=torch.Generator().manual_seed(7))
    with pytest.warns(UserWarning, match=r"only the class token of layer 'blocks.1'.*norm1"):
        maps = GradCAM(model, "blocks.1")(x, target=0)
    assert not maps.any()
    with warnings.catch_warnings():  # the suggested layer works: a non-zero map, no warning
        warnings.simplefilter("error")
        assert GradCAM(model, "blocks.1.norm1")(x, target=0).max() > 0


def test_unetr_3d_encoder_tokens_with_a_segmentation_region():
    torch.manual_seed(8)
    model = monai_nets.UNETR(in_channels=1, out_channels=2, img_size=32, feature_size=8,
                             hidden_size=48, mlp_dim=96, num_heads=4, spatial_dims=3).eval()
    x = torch.rand(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(9))
    mask = np.zeros((32, 32, 32), dtype=bool)
    mask[8:20, 10:24, 4:16] = True
    region = torch.from_numpy(mask)
    result = GradCAM(model, "vit.blocks.2").explain(x, target=SegmentationRegion(1, mask))
    expected = gradcam_by_hand(model, "vit.blocks.2", x,
                               lambda out: (out[:, 1] * region).sum((1, 2, 3)), grid=(2, 2, 2))
    assert result.feature_shapes == [(48, 2, 2, 2)]  # 16³ patches, no class token
    assert expected.max() > 0
    np.testing.assert_allclose(result.maps, expected, rtol=1e-4, atol=1e-6 * expected.max())


@pytest.fixture(scope="module")
def swin2d() -> nn.Module:
    torch.manual_seed(10)
    return monai_nets.SwinUNETR(in_channels=1, out_channels=2, feature_size=12,
                                depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1), window_size=4,
                                spatial_dims=2).eval()


@pytest.mark.parametrize("layer", ["swinViT.layers1.0.blocks.0", "swinViT.layers1.0.downsample"])
def test_swin_channels_last_blocks_are_detected_and_match_the_definition(swin2d, layer):
    x = torch.rand(1, 1, 64, 64, generator=torch.Generator().manual_seed(11))
    region = torch.zeros(64, 64, dtype=torch.bool)
    region[20:40, 30:50] = True
    target = SegmentationRegion(1, region.numpy())
    result = GradCAM(swin2d, layer).explain(x, target=target)
    expected = gradcam_by_hand(swin2d, layer, x, lambda out: (out[:, 1] * region).sum((1, 2)),
                               channels_last=True)
    assert expected.max() > 0
    np.testing.assert_allclose(result.maps, expected, rtol=1e-4, atol=1e-6 * expected.max())
    said = GradCAM(swin2d, layer, channels_last=True)(x, target=target)
    np.testing.assert_array_equal(said, result.maps)


def test_swin_stage_output_is_channels_first_and_stays_so(swin2d):
    x = torch.rand(1, 1, 64, 64, generator=torch.Generator().manual_seed(12))
    region = torch.zeros(64, 64, dtype=torch.bool)
    region[10:30, 10:30] = True
    target = SegmentationRegion(0, region.numpy())
    result = GradCAM(swin2d, "swinViT.layers1.0").explain(x, target=target)
    expected = gradcam_by_hand(swin2d, "swinViT.layers1.0", x,
                               lambda out: (out[:, 0] * region).sum((1, 2)))
    assert result.feature_shapes == [(24, 16, 16)]
    np.testing.assert_allclose(result.maps, expected, rtol=1e-4, atol=1e-6 * expected.max())


def test_swin_3d_channels_last_block():
    torch.manual_seed(13)
    model = monai_nets.SwinUNETR(in_channels=1, out_channels=2, feature_size=12,
                                 depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1), window_size=4,
                                 norm_name="batch", spatial_dims=3).eval()
    # batch norm (eval) takes the 1³ bottleneck of a 32³ input; instance norm would need 64³
    x = torch.rand(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(14))
    layer = "swinViT.layers2.0.blocks.0"  # (1, 8, 8, 8, 24)
    result = GradCAM(model, layer).explain(x, target=SegmentationRegion(1))
    expected = gradcam_by_hand(model, layer, x, lambda out: out[:, 1].sum((1, 2, 3)),
                               channels_last=True)
    assert result.feature_shapes == [(24, 8, 8, 8)]
    assert expected.max() > 0
    np.testing.assert_allclose(result.maps, expected, rtol=1e-4, atol=1e-6 * expected.max())


def test_vit_slice_by_slice_through_explain_volume():
    model = vit(2, 32, 8)
    volume = np.random.default_rng(15).random((3, 32, 32)).astype(np.float32)
    result = explain_volume(GradCAM(model, "blocks.0"), volume, mode="slices", batch_size=2,
                            target=1)
    for z in range(3):
        alone = GradCAM(model, "blocks.0")(volume[z][None, None], target=1)[0]
        np.testing.assert_allclose(result.maps[z], alone, rtol=1e-4, atol=1e-7)
    assert result.maps.max() > 0


class PatchTokenModel(nn.Module):
    """Tokens from patches cut by hand (no convolution, nothing to derive the grid from),
    then the mean over tokens and a linear head.

    dy_c/dA_tk = W_ck / T for every token, so Grad-CAM must equal ReLU(sum_k W_ck A_tk) / T
    on the patch grid, with A_t = E·patch_t: a closed form computed from patches cut out of
    the image by numpy, which fixes the token order (row-major over the grid).
    """

    def __init__(self, patch: tuple[int, int], channels: int = 5, classes: int = 2) -> None:
        super().__init__()
        self.patch = patch
        self.embed = nn.Linear(patch[0] * patch[1], channels)
        self.head = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        ph, pw = self.patch
        patches = x.reshape(n, h // ph, ph, w // pw, pw).permute(0, 1, 3, 2, 4)
        tokens = self.embed(patches.reshape(n, -1, ph * pw))
        return self.head(tokens.mean(1))


def test_hand_made_tokens_need_the_grid_from_the_user_and_then_match_the_closed_form():
    torch.manual_seed(16)
    model = PatchTokenModel(patch=(4, 2)).eval()
    x = torch.rand(2, 1, 24, 12, generator=torch.Generator().manual_seed(17))
    with pytest.raises(ValueError, match=r"outputs 36 tokens.*pass patch_grid"):
        GradCAM(model, "embed")(x, target=1)
    maps = GradCAM(model, "embed", patch_grid=(6, 6), upsample=False)(x, target=1)
    image = x[:, 0].numpy()
    weight, bias = model.embed.weight.detach().numpy(), model.embed.bias.detach().numpy()
    head = model.head.weight.detach().numpy()[1]
    expected = np.zeros((2, 6, 6), dtype=np.float32)
    for i in range(6):
        for j in range(6):
            patch = image[:, 4 * i:4 * i + 4, 2 * j:2 * j + 2].reshape(2, -1)
            activation = patch @ weight.T + bias  # (N, C)
            expected[:, i, j] = np.maximum(activation @ head, 0) / 36
    assert expected.max() > 0
    np.testing.assert_allclose(maps, expected, rtol=1e-5, atol=1e-7)


def test_view_is_the_same_for_activations_and_gradients_with_leading_axes():
    view = FeatureMapView("tokens", (2, 3), prefix_tokens=1)
    tokens = torch.arange(2 * 7 * 4, dtype=torch.float32).reshape(2, 7, 4)
    on_grid = view(tokens)
    assert on_grid.shape == (2, 4, 2, 3)
    # channel c of grid position (i, j) is token 1 + 3 i + j (row-major after the class token)
    assert on_grid[1, 2, 1, 0] == tokens[1, 1 + 3 * 1 + 0, 2]
    stacked = view(torch.stack([tokens, -tokens]))  # gradients carry a leading class axis
    torch.testing.assert_close(stacked[1], -on_grid)


def test_conv_layers_stay_channels_first_even_when_the_shape_looks_channels_last():
    conv = nn.Conv2d(1, 5, 3)  # a conv layer's output is channels-first whatever its shape
    view = feature_map_view("conv", (1, 8, 8, 5), (1, 1, 64, 64), conv, module=conv)
    assert view is not None and view.kind == "channels_first"
    norm = nn.LayerNorm(5)  # without convolutions, only the channels-last reading is a grid
    view = feature_map_view("norm", (1, 8, 8, 5), (1, 1, 64, 64), norm, module=norm)
    assert view is not None and view.kind == "channels_last" and view.grid == (8, 8)
    assert feature_map_view("pool", (1, 5), (1, 1, 64, 64), norm, module=norm) is None


def test_bad_layout_options_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="patch_grid must be positive integers"):
        TokenLayout((4, 0))
    with pytest.raises(TypeError, match="class_token must be True, False or None"):
        TokenLayout(class_token="yes")  # type: ignore[arg-type]
    assert TokenLayout.make([np.int64(4), 4]).patch_grid == (4, 4)


def test_grid_matches_input_tells_patch_grids_from_attention_matrices():
    from napari_gradcam.core.tokens import grid_matches_input

    assert grid_matches_input((4, 4), (32, 32))  # 8² patches
    assert grid_matches_input((17, 9), (33, 17))  # ceil: padded windows
    assert not grid_matches_input((17, 17), (32, 32))  # attention over 16 patches + class token
    assert not grid_matches_input((4, 4, 4), (32, 32))


def test_vit_all_classes_and_fusion_with_a_conv_layer_use_the_same_view():
    model = vit(2, 32, 8)
    x = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(18))
    everything = GradCAM(model, "blocks.0")(x, target="all")  # gradients (K, N, T, C)
    assert everything.shape == (2, 3, 32, 32)
    for cls in range(3):
        np.testing.assert_allclose(everything[:, cls], GradCAM(model, "blocks.0")(x, target=cls),
                                   rtol=1e-5, atol=1e-9)
    layers = ["patch_embedding.patch_embeddings", "blocks.0"]  # (N, 48, 4, 4) and tokens
    fused = GradCAM(model, layers).explain(x, target=1)
    assert fused.feature_shapes == [(48, 4, 4), (48, 4, 4)]
    parts = [GradCAM(model, layer)(x, target=1) for layer in layers]
    peaks = [p.reshape(2, -1).max(1).reshape(2, 1, 1) for p in parts]
    expected = np.mean([p / np.maximum(m, 1e-12) for p, m in zip(parts, peaks, strict=True)], 0)
    np.testing.assert_allclose(fused.maps, expected, rtol=1e-4, atol=1e-6)
