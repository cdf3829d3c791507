"""Loading models from real files: what loads, what is refused, and what the messages say."""

from __future__ import annotations

import hashlib
import re
import textwrap
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file
from torch import nn

from napari_gradcam.core.architectures import ResNetLike, UNet
from napari_gradcam.core.model_card import ModelCard, ModelCardError
from napari_gradcam.core.models import (
    LoadedModel,
    ModelLoadError,
    find_demo_card,
    list_demo_models,
    load_model,
    sniff_format,
)


def seeded(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights *and* BatchNorm statistics, so a round trip has something to lose."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.is_floating_point():
                tensor.copy_(torch.rand(tensor.shape, generator=generator) * 0.5 + 0.1)
    return model.eval()


def write_card(folder: Path, weights: str | None, **changes: Any) -> Path:
    data: dict[str, Any] = {
        "name": "test-classifier",
        "architecture": "resnet_like",
        "architecture_kwargs": {"spatial_dims": 2, "in_channels": 1, "num_classes": 3,
                                "widths": [8, 16]},
        "weights": weights,
        "spatial_dims": 2,
        "in_channels": 1,
        "task": "classification",
        "class_names": ["clean", "precipitates", "crack"],
        "preprocessing": [{"op": "window", "min": 0, "max": 255}],
    }
    data.update(changes)
    path = folder / "card.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def small_resnet() -> ResNetLike:
    return seeded(ResNetLike(spatial_dims=2, in_channels=1, num_classes=3, widths=(8, 16)))


@pytest.fixture
def x2d() -> torch.Tensor:
    return torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(1))


def assert_same_function(loaded: nn.Module, original: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), original(x))


# --------------------------------------------------------------------------------------------
# What loads


@pytest.mark.parametrize(
    ("architecture", "kwargs", "task", "shape", "default_layer"),
    [
        ("resnet_like", {"spatial_dims": 1, "in_channels": 2, "num_classes": 3,
                         "widths": [4, 8]}, "classification", (2, 2, 32), "features.2"),
        ("resnet_like", {"spatial_dims": 2, "in_channels": 1, "num_classes": 3,
                         "widths": [4, 8]}, "classification", (2, 1, 16, 16), "features.2"),
        ("resnet_like", {"spatial_dims": 3, "in_channels": 1, "num_classes": 3,
                         "widths": [4, 8]}, "classification", (1, 1, 8, 8, 8), "features.2"),
        ("unet", {"spatial_dims": 2, "in_channels": 1, "num_classes": 3, "widths": [4, 8]},
         "segmentation", (1, 1, 16, 16), "down1"),
    ],
)
def test_card_and_safetensors_round_trip(
    tmp_path: Path, architecture: str, kwargs: dict, task: str, shape: tuple,
    default_layer: str,
) -> None:
    constructor = {"resnet_like": ResNetLike, "unet": UNet}[architecture]
    original = seeded(constructor(**kwargs))
    save_file(original.state_dict(), tmp_path / "w.safetensors")
    card_path = write_card(
        tmp_path, "w.safetensors", architecture=architecture, architecture_kwargs=kwargs,
        spatial_dims=kwargs["spatial_dims"], in_channels=kwargs["in_channels"], task=task,
        input_size=list(shape[2:]),
    )
    loaded = load_model(card_path)
    assert isinstance(loaded, LoadedModel)
    assert not loaded.model.training
    assert loaded.card.task == task
    assert loaded.card.target_layer == default_layer  # filled in: the card named none
    assert loaded.class_names == ("clean", "precipitates", "crack")
    assert loaded.weights_sha256 == hashlib.sha256(
        (tmp_path / "w.safetensors").read_bytes()).hexdigest()
    assert loaded.source == str(card_path.resolve())
    assert default_layer in [layer.name for layer in loaded.feature_layers]
    x = torch.rand(shape, generator=torch.Generator().manual_seed(2))
    assert_same_function(loaded.model, original, x)
    # and the card's preprocessing comes with it: window 0..255 -> [0, 1]
    raw = np.full((1, *shape[1:]), 51.0)  # with its channel axis: the 1D model takes 2
    assert loaded.preprocess(raw).flatten()[0].item() == pytest.approx(0.2)


def test_pt_state_dict_and_training_checkpoint(tmp_path: Path, x2d: torch.Tensor) -> None:
    original = small_resnet()
    torch.save(original.state_dict(), tmp_path / "w.pt")
    loaded = load_model(write_card(tmp_path, "w.pt", target_layer="features.1"))
    assert loaded.card.target_layer == "features.1"
    assert_same_function(loaded.model, original, x2d)
    # the {"state_dict": ..., "epoch": ...} layout many training loops save
    torch.save({"epoch": 7, "state_dict": original.state_dict()}, tmp_path / "ckpt.pth")
    assert_same_function(load_model(write_card(tmp_path, "ckpt.pth")).model, original, x2d)


def test_user_architecture_class_from_an_installed_module(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, x2d: torch.Tensor
) -> None:
    (tmp_path / "my_lab_models.py").write_text(textwrap.dedent("""
        from torch import nn

        class TinyNet(nn.Module):
            def __init__(self, classes=2):
                super().__init__()
                self.body = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
                self.head = nn.Linear(4, classes)

            def forward(self, x):
                return self.head(self.body(x).mean(dim=(2, 3)))

        def make_tiny(classes=2):
            return TinyNet(classes)
    """), encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    import my_lab_models

    original = seeded(my_lab_models.TinyNet(classes=2))
    save_file(original.state_dict(), tmp_path / "tiny.safetensors")
    card = write_card(tmp_path, "tiny.safetensors", architecture="my_lab_models:TinyNet",
                      architecture_kwargs={"classes": 2}, class_names=["a", "b"],
                      preprocessing=[])
    # the user's own module is code: refused without trust (tests/test_model_safety.py checks
    # that it is not even imported), built with trust
    with pytest.raises(ModelLoadError, match=r"'my_lab_models:TinyNet' is not one of .*built-in"):
        load_model(card)
    loaded = load_model(card, trust=True)
    assert loaded.card.target_layer == "body.1"  # last feature map; "body" is a bare Sequential
    assert_same_function(loaded.model, original, x2d)

    # a factory *function* (any function, subprocess:run ...) likewise, only with trust
    card = write_card(tmp_path, "tiny.safetensors", architecture="my_lab_models:make_tiny",
                      architecture_kwargs={"classes": 2}, class_names=["a", "b"])
    with pytest.raises(ModelLoadError, match=r"'my_lab_models:make_tiny' is not one of .*"
                                             r"trust=True"):
        load_model(card)
    assert_same_function(load_model(card, trust=True).model, original, x2d)


def test_torch_export_program_is_unflattened_and_hooks_fire(
    tmp_path: Path, x2d: torch.Tensor
) -> None:
    original = small_resnet()
    batch = torch.export.Dim("batch")
    program = torch.export.export(original, (x2d,), dynamic_shapes=({0: batch},))
    torch.export.save(program, tmp_path / "model.pt2")

    loaded = load_model(tmp_path / "model.pt2")
    model = loaded.model
    assert loaded.card.spatial_dims == 2 and loaded.card.in_channels == 1
    assert loaded.card.input_size == (16, 16)
    assert loaded.card.task == "classification"
    assert loaded.card.target_layer == "features.2"  # the original class names were restored
    assert {layer.name: layer.type_name for layer in loaded.feature_layers}["features.2"] == (
        "ResidualBlock")
    assert loaded.weights_sha256 == hashlib.sha256(
        (tmp_path / "model.pt2").read_bytes()).hexdigest()

    # The hook sees the very activation of the original layer, for another batch size too,
    # and a replaced output (what the engine does to cut the graph) carries gradients.
    x = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(5))
    captured: dict[str, torch.Tensor] = {}

    def cut(_module: nn.Module, _inputs: object, output: torch.Tensor) -> torch.Tensor:
        leaf = output.detach().requires_grad_(True)
        captured["activation"] = leaf
        return leaf

    handle = model.get_submodule("features.2").register_forward_hook(cut)
    try:
        scores = model(x)
    finally:
        handle.remove()
    with torch.no_grad():
        torch.testing.assert_close(captured["activation"], original.features(x))
        torch.testing.assert_close(scores, original(x))
    (gradient,) = torch.autograd.grad(scores[:, 1].sum(), captured["activation"])
    # after the last stage: global average pool, then Linear -> d score / dA = W[1, k] / HW
    weight = original.classifier.weight[1].detach()
    expected = (weight / 64.0).reshape(1, -1, 1, 1).expand_as(gradient)  # 8x8 feature map
    torch.testing.assert_close(gradient, expected)


def test_gradcam_on_the_loaded_export_equals_gradcam_on_the_original(
    tmp_path: Path, x2d: torch.Tensor
) -> None:
    from napari_gradcam.core.methods import GradCAM

    original = small_resnet()
    program = torch.export.export(original, (x2d,),
                                  dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, tmp_path / "model.pt2")
    loaded = load_model(tmp_path / "model.pt2")
    x = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(8))
    expected = GradCAM(original, layer="features.2")(x, target=[0, 1, 2])
    maps = GradCAM(loaded.model, layer=loaded.card.target_layer)(x, target=[0, 1, 2])
    assert maps.shape == (3, 16, 16) and np.abs(expected).max() > 0
    np.testing.assert_allclose(maps, expected, rtol=1e-4, atol=1e-6)


def test_export_with_a_fixed_batch_size_warns(tmp_path: Path, x2d: torch.Tensor) -> None:
    torch.export.save(torch.export.export(small_resnet(), (x2d,)), tmp_path / "fixed.pt2")
    with pytest.warns(UserWarning, match="fixed batch size of 2"):
        loaded = load_model(tmp_path / "fixed.pt2")
    assert loaded.card.class_names == ("class 0", "class 1", "class 2")


def test_pickled_whole_model_is_refused_unless_trusted(tmp_path: Path, x2d: torch.Tensor) -> None:
    original = small_resnet()
    path = tmp_path / "whole_model.pt"
    torch.save(original, path)
    with pytest.raises(ModelLoadError) as caught:
        load_model(path)
    message = str(caught.value)
    assert str(path) in message
    assert "runs whatever code" in message and "trust=True" in message
    assert "napari_gradcam.core.architectures.ResNetLike" in message  # what it would import

    loaded = load_model(path, trust=True)
    assert_same_function(loaded.model, original, x2d)
    assert loaded.card.spatial_dims == 2 and loaded.card.in_channels == 1
    assert loaded.card.architecture == "napari_gradcam.core.architectures:ResNetLike"
    assert loaded.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_torchscript_is_refused_with_the_export_recipe(tmp_path: Path, x2d: torch.Tensor) -> None:
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.trace(small_resnet(), x2d), path)
    assert sniff_format(path) == "torchscript"
    for source, trust in ((path, False), (path, True)):
        with pytest.raises(ModelLoadError, match="TorchScript") as caught:
            load_model(source, trust=trust)
        assert "torch.export.export" in str(caught.value) and "hooks" in str(caught.value)
    # ... also when a card names it as its weights
    with pytest.raises(ModelLoadError, match="TorchScript"):
        load_model(write_card(tmp_path, "scripted.pt"))


def test_live_modules_get_an_inferred_card() -> None:
    loaded = load_model(seeded(ResNetLike(spatial_dims=1, in_channels=3, num_classes=5)))
    assert (loaded.card.spatial_dims, loaded.card.in_channels) == (1, 3)
    assert loaded.card.class_names == tuple(f"class {i}" for i in range(5))
    assert loaded.card.target_layer == "features.3"
    assert loaded.weights_sha256 is None and loaded.source == "<live ResNetLike>"
    segmenter = load_model(UNet(spatial_dims=3, widths=(4, 8)), device="cpu")
    assert segmenter.card.task == "segmentation" and segmenter.card.target_layer == "down1"
    assert segmenter.preprocess(np.zeros((2, 8, 8, 8))).shape == (2, 1, 8, 8, 8)


def test_demo_models_load_by_name() -> None:
    cards = list_demo_models()
    assert all(isinstance(card, ModelCard) for card in cards)
    with pytest.raises(FileNotFoundError, match="neither a file nor a demo model"):
        load_model("no-such-demo-model")
    assert cards, "the demo models shipped in napari_gradcam/zoo are missing"
    first = cards[0]
    assert find_demo_card(first.name) == first
    loaded = load_model(first.name)
    assert loaded.source == f"demo:{first.name}"
    assert loaded.card.class_names == first.class_names or not first.class_names
    assert loaded.weights_sha256 is not None


# --------------------------------------------------------------------------------------------
# What is refused, and how


def test_missing_weights_file_gives_the_resolved_path(tmp_path: Path) -> None:
    card = write_card(tmp_path, "sub/../missing.safetensors")
    with pytest.raises(FileNotFoundError, match="weights file not found") as caught:
        load_model(card)
    assert str(tmp_path.resolve() / "missing.safetensors") in str(caught.value)


def test_weights_that_do_not_fit_list_keys_and_shapes(tmp_path: Path) -> None:
    other = seeded(ResNetLike(spatial_dims=2, in_channels=1, num_classes=4, widths=(8, 16, 32)))
    save_file(other.state_dict(), tmp_path / "other.safetensors")
    with pytest.raises(ModelLoadError) as caught:
        load_model(write_card(tmp_path, "other.safetensors"))
    message = str(caught.value)
    assert "do not fit architecture 'resnet_like'" in message
    assert "unexpected keys (in the file, not in the model): features.3.bn1.bias" in message
    assert "classifier.weight: model expects (3, 16), file has (4, 32)" in message

    state = small_resnet().state_dict()
    del state["classifier.bias"]
    save_file(state, tmp_path / "partial.safetensors")
    with pytest.raises(ModelLoadError, match=r"missing keys \(in the model, not in the file\): "
                                             "classifier.bias"):
        load_model(write_card(tmp_path, "partial.safetensors"))


def test_card_that_disagrees_with_its_network(tmp_path: Path) -> None:
    save_file(small_resnet().state_dict(), tmp_path / "w.safetensors")
    with pytest.raises(ModelCardError, match=r"lists 2 class_names .* outputs 3 classes"):
        load_model(write_card(tmp_path, "w.safetensors", class_names=["a", "b"]))
    with pytest.raises(ModelCardError, match=r"says task: segmentation.*set task: classification"):
        load_model(write_card(tmp_path, "w.safetensors", task="segmentation"))
    with pytest.raises(ModelCardError, match=r"target_layer 'features.9'.*Close names: features"):
        load_model(write_card(tmp_path, "w.safetensors", target_layer="features.9"))
    with pytest.raises(ModelCardError, match=r"unknown architecture 'resnetlike' \(did you mean "
                                             r"'resnet_like'\?\)"):
        load_model(write_card(tmp_path, "w.safetensors", architecture="resnetlike"))
    with pytest.raises(ModelCardError, match=r"architecture_kwargs .* do not fit 'resnet_like'"):
        load_model(write_card(tmp_path, "w.safetensors",
                              architecture_kwargs={"spatial_dims": 2, "depth": 50}))
    with pytest.raises(ModelLoadError, match=r"cannot import module 'no_such_lab_package.models'"):
        load_model(write_card(tmp_path, "w.safetensors",
                              architecture="no_such_lab_package.models:Net"), trust=True)
    with pytest.raises(ModelLoadError, match=r"in_channels=3.*input_size"):
        load_model(write_card(tmp_path, "w.safetensors", in_channels=3,
                              architecture_kwargs={"widths": [8, 16]}))


def test_corrupt_and_truncated_files_name_the_file(tmp_path: Path, x2d: torch.Tensor) -> None:
    model = small_resnet()
    save_file(model.state_dict(), tmp_path / "full.safetensors")
    torch.save(model.state_dict(), tmp_path / "full.pt")
    torch.export.save(torch.export.export(model, (x2d,)), tmp_path / "full.pt2")
    for name in ("full.safetensors", "full.pt", "full.pt2"):
        data = (tmp_path / name).read_bytes()
        cut = tmp_path / f"cut_{name}"
        cut.write_bytes(data[: len(data) // 2])
        source = cut if name.endswith(".pt2") else write_card(tmp_path, cut.name)
        with pytest.raises(ModelLoadError) as caught:
            load_model(source)
        assert str(cut) in str(caught.value), name
        assert "corrupt" in str(caught.value) or "not a format" in str(caught.value), name
    garbage = tmp_path / "garbage.pt2"
    garbage.write_bytes(b"this is not a model at all")
    with pytest.raises(ModelLoadError, match=re.escape(str(garbage)) + ".* not a format"):
        load_model(garbage)


def test_weights_alone_are_not_a_model(tmp_path: Path) -> None:
    state = small_resnet().state_dict()
    save_file(state, tmp_path / "w.safetensors")
    torch.save(state, tmp_path / "w.pt")
    for name in ("w.safetensors", "w.pt"):
        with pytest.raises(ModelLoadError, match=f"weights only.*'weights: {name}'"):
            load_model(tmp_path / name)


def test_bad_sources(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"model file not found: .*absent.pt2"):
        load_model(tmp_path / "absent.pt2")
    with pytest.raises(ModelLoadError, match="is a folder"):
        load_model(tmp_path)
    with pytest.raises(TypeError, match="not int"):
        load_model(3)  # type: ignore[arg-type]


def test_loading_does_not_leak_warnings_for_safe_files(tmp_path: Path) -> None:
    save_file(small_resnet().state_dict(), tmp_path / "w.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_model(write_card(tmp_path, "w.safetensors"))


def test_a_live_module_is_left_in_the_mode_the_user_had():
    from napari_gradcam.core.architectures import ResNetLike

    model = ResNetLike(2, 1, 3, widths=(4, 8, 8))
    model.train()
    loaded = load_model(model)
    assert loaded.model is model and model.training
    assert all(module.training for module in model.modules())
