"""Model cards: round trips, and a clear complaint for each kind of mistake."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from napari_gradcam.core.model_card import CARD_FIELDS, ModelCard, ModelCardError


def card_dict(**changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "name": "micrograph-classifier",
        "description": "Finds cracks.",
        "architecture": "resnet_like",
        "architecture_kwargs": {"spatial_dims": 2, "in_channels": 1, "num_classes": 3,
                                "widths": [16, 32, 64]},
        "weights": "weights.safetensors",
        "spatial_dims": 2,
        "in_channels": 1,
        "task": "classification",
        "class_names": ["clean", "precipitates", "crack"],
        "target_layer": "features.3",
        "input_size": [128, 128],
        "preprocessing": [{"op": "percentile_clip", "low": 1.0, "high": 99.0},
                          {"op": "normalize", "mean": 0.5, "std": 0.25}],
        "training": {"script": "scripts/train_demo_models.py", "seed": 0, "epochs": 8},
        "metrics": {"val_accuracy": 0.97},
        "training_statistics": {"intensity": {"mean": 0.42, "std": 0.11,
                                              "percentiles": [0.1, 0.4, 0.8]},
                                "n_samples": 1200},
    }
    data.update(changes)
    return {key: value for key, value in data.items() if value is not ...}


def write_card(folder: Path, data: dict[str, Any], name: str = "card.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def test_yaml_round_trip_keeps_every_field(tmp_path: Path) -> None:
    path = write_card(tmp_path, card_dict())
    card = ModelCard.from_yaml(path)
    assert card.class_names == ("clean", "precipitates", "crack")
    assert card.input_size == (128, 128)
    assert card.weights_path == tmp_path.resolve() / "weights.safetensors"
    assert card.training == {"script": "scripts/train_demo_models.py", "seed": 0, "epochs": 8}
    assert card.to_dict() == card_dict()
    assert list(card.to_dict()) == list(CARD_FIELDS)
    again = ModelCard.from_yaml(card.to_yaml(tmp_path / "again.yaml"))
    assert again == card
    assert len({card, again}) == 1  # hashable despite its dict fields (usable as a cache key)
    assert again.base_dir == tmp_path.resolve()


def test_training_statistics_pass_through_load_and_save_unchanged(tmp_path: Path) -> None:
    statistics = card_dict()["training_statistics"]
    card = ModelCard.from_yaml(write_card(tmp_path, card_dict()))
    assert card.training_statistics == statistics
    saved = yaml.safe_load(card.to_yaml(tmp_path / "saved.yaml").read_text(encoding="utf-8"))
    assert saved["training_statistics"] == statistics
    # a copy, not the caller's dict: changing the input later does not change the card
    data = card_dict()
    built = ModelCard.from_dict(data)
    data["training_statistics"]["intensity"]["mean"] = 99.0
    assert built.training_statistics["intensity"]["mean"] == 0.42
    # optional: a card without it has None and writes no such key
    without = ModelCard.from_dict(card_dict(training_statistics=...))
    assert without.training_statistics is None
    assert "training_statistics" not in without.to_dict()


def test_optional_fields_get_defaults_and_tuples_become_lists() -> None:
    minimal = {key: card_dict()[key] for key in
               ("name", "architecture", "spatial_dims", "in_channels", "task")}
    card = ModelCard.from_dict(minimal)
    assert card.weights is None and card.weights_path is None
    assert card.class_names == () and card.preprocessing == () and card.target_layer is None
    built = ModelCard(name="n", architecture="unet", spatial_dims=3, in_channels=1,
                      task="segmentation", architecture_kwargs={"widths": (8, 16)},
                      input_size=32)
    assert built.input_size == (32, 32, 32)
    assert yaml.safe_load(yaml.safe_dump(built.to_dict()))["architecture_kwargs"] == {
        "widths": [8, 16]
    }


def test_card_data_is_a_copy_of_the_input() -> None:
    data = card_dict()
    card = ModelCard.from_dict(data)
    data["architecture_kwargs"]["num_classes"] = 99
    assert card.architecture_kwargs["num_classes"] == 3


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"clas_names": ["a"]}, r"unknown field 'clas_names' \(did you mean 'class_names'\?\)"),
        ({"spatial_dims": 4}, r"'spatial_dims' must be 1 \(spectra\), 2 \(images\) or 3"),
        ({"spatial_dims": "2"}, "'spatial_dims' must be 1"),
        ({"in_channels": True}, "'in_channels' must be a positive integer"),
        ({"task": "detection"}, "'task' must be one of classification, segmentation"),
        ({"class_names": "clean, crack"}, "'class_names' must be a list of strings"),
        ({"class_names": ["a", "a", "b"]}, "'class_names' repeats a"),
        ({"input_size": [128]}, "'input_size' has 1 entries but spatial_dims is 2"),
        ({"input_size": [128, -1]}, "'input_size' must be a list of positive integers"),
        ({"name": ""}, "'name' must be a non-empty string"),
        ({"architecture_kwargs": [1, 2]}, "'architecture_kwargs' must be a mapping"),
        ({"architecture_kwargs": {"spatial_dims": 3}},
         "architecture_kwargs.spatial_dims is 3 but the card's spatial_dims is 2"),
        ({"weights": 5}, "'weights' must be a file path"),
        ({"training": "yes"}, "'training' must be a mapping"),
        ({"training_statistics": [0.4, 0.1]}, "'training_statistics' must be a mapping"),
        ({"training_statistics": {1: 0.4}}, "'training_statistics' must be a mapping with string"),
        ({"preprocessing": [{"op": "clip"}]}, r"field 'preprocessing': preprocessing\[0\]: "
                                               "unknown op 'clip'"),
        ({"preprocessing": [{"op": "window", "min": 2, "max": 1}]}, "min < max"),
        ({"task": ...}, r"missing required field\(s\): task"),
    ],
)
def test_each_bad_card_names_the_field_and_the_problem(
    tmp_path: Path, changes: dict[str, Any], message: str
) -> None:
    path = write_card(tmp_path, card_dict(**changes))
    with pytest.raises(ModelCardError, match=message) as caught:
        ModelCard.from_yaml(path)
    assert str(path.resolve()) in str(caught.value)  # and which file it is


def test_unreadable_or_missing_card_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"model card not found: .*nowhere.yaml"):
        ModelCard.from_yaml(tmp_path / "nowhere.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: [unclosed\n", encoding="utf-8")
    with pytest.raises(ModelCardError, match="is not valid YAML"):
        ModelCard.from_yaml(broken)
    listed = write_card(tmp_path, card_dict(), name="list.yaml")
    listed.write_text("- just\n- a list\n", encoding="utf-8")
    with pytest.raises(ModelCardError, match="a model card is a mapping of fields"):
        ModelCard.from_yaml(listed)


def test_yaml_tags_that_would_run_code_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.yaml"
    path.write_text("name: !!python/object/apply:os.system ['echo pwned']\n", encoding="utf-8")
    with pytest.raises(ModelCardError, match="not valid YAML"):
        ModelCard.from_yaml(path)


def test_a_regression_card_loads_with_its_property_names_and_explains_one(tmp_path: Path) -> None:
    """task: regression keeps an (N, P) head a regression model (its shape alone would say
    classifier): class_names name the properties, no class is 'predicted', and the job explains
    what increases one property with the predicted values, not a softmax, in its table."""
    import numpy as np
    import torch
    from safetensors.torch import save_file

    from napari_gradcam import load_model
    from napari_gradcam.core.architectures import build_architecture
    from napari_gradcam.jobs import ExplainRequest, ImageSource, TargetChoice, explain

    torch.manual_seed(0)
    model = build_architecture("resnet_like", spatial_dims=2, in_channels=1, num_classes=2,
                               widths=[4, 8])
    save_file(model.state_dict(), tmp_path / "props.safetensors")
    (tmp_path / "props.yaml").write_text(
        "name: props\narchitecture: resnet_like\n"
        "architecture_kwargs: {spatial_dims: 2, in_channels: 1, num_classes: 2, widths: [4, 8]}\n"
        "weights: props.safetensors\nspatial_dims: 2\nin_channels: 1\ntask: regression\n"
        "class_names: [porosity, grain size]\n", encoding="utf-8")
    loaded = load_model(tmp_path / "props.yaml")
    assert loaded.card.task == "regression"
    assert loaded.class_names == ("porosity", "grain size")
    image = np.random.default_rng(0).random((24, 20)).astype(np.float32)
    with pytest.raises(ValueError, match="predicts values"):
        explain(loaded, ImageSource("img", image), ExplainRequest(target=TargetChoice("predicted")))
    result = explain(loaded, ImageSource("img", image),
                     ExplainRequest(target=TargetChoice("regression", output_index=1, sign=1)))
    with torch.no_grad():
        expected = loaded.model(loaded.preprocess(image[None])).numpy()
    prediction = np.asarray(result.prediction_at((0, 0)))
    np.testing.assert_allclose(prediction.ravel(), expected.ravel(), rtol=1e-5, atol=1e-6)


def test_a_classifier_card_that_says_regression_for_a_segmentation_output_is_refused(
        tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    from napari_gradcam import load_model
    from napari_gradcam.core.architectures import build_architecture
    from napari_gradcam.core.models import ModelLoadError

    torch.manual_seed(0)
    model = build_architecture("unet", spatial_dims=2, in_channels=1, num_classes=2)
    save_file(model.state_dict(), tmp_path / "seg.safetensors")
    (tmp_path / "seg.yaml").write_text(
        "name: seg\narchitecture: unet\n"
        "architecture_kwargs: {spatial_dims: 2, in_channels: 1, num_classes: 2}\n"
        "weights: seg.safetensors\nspatial_dims: 2\nin_channels: 1\ntask: regression\n",
        encoding="utf-8")
    with pytest.raises((ModelCardError, ModelLoadError), match="segmentation"):
        load_model(tmp_path / "seg.yaml")
