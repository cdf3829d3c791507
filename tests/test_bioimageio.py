"""bioimage.io model packages: real packages written here (network source, torch.save state
dict, rdf.yaml in 0.4 and 0.5 style), loaded through the card machinery and its trust rules."""

from __future__ import annotations

import hashlib
import textwrap
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from napari_gradcam.cli import EXIT_OK, EXIT_USAGE, main
from napari_gradcam.core.bioimageio import BioimageioError, card_from_rdf, find_rdf
from napari_gradcam.core.models import ModelLoadError, load_model

# The package's network file. Executing it leaves a marker next to it, so a test can tell
# whether the loader ran it.
NETWORK_SOURCE = textwrap.dedent("""
    from pathlib import Path

    import torch
    from torch import nn

    Path(MARKER_FOLDER if "MARKER_FOLDER" in globals() else Path(__file__).parent).joinpath(
        "network_code_ran").write_text("yes")


    class TinySegmenter(nn.Module):
        def __init__(self, in_channels=1, n_classes=2, width=4):
            super().__init__()
            self.encoder = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU())
            self.head = nn.Conv2d(width, n_classes, 1)

        def forward(self, x):
            return self.head(self.encoder(x))


    class TinyClassifier(nn.Module):
        def __init__(self, in_channels=1, n_classes=3):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(in_channels, 4, 3, padding=1), nn.ReLU())
            self.fc = nn.Linear(4, n_classes)

        def forward(self, x):
            return self.fc(self.features(x).mean(dim=(2, 3)))
""")


def original_network(class_name: str, marker_folder: Path, **kwargs: Any) -> nn.Module:
    """The same network built from the same source, outside the package (the reference)."""
    namespace: dict[str, Any] = {"MARKER_FOLDER": str(marker_folder), "__name__": "reference"}
    exec(compile(NETWORK_SOURCE, "reference_network.py", "exec"), namespace)
    torch.manual_seed(0)
    model = namespace[class_name](**kwargs)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.rand(parameter.shape) * 0.1)
    return model.eval()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_package(folder: Path, *, style: str, task: str = "segmentation",
                  rdf_name: str = "rdf.yaml", **overrides: Any) -> tuple[Path, nn.Module]:
    """A bioimage.io package on disk: network.py, weights.pt (torch.save state dict), rdf."""
    folder.mkdir(parents=True, exist_ok=True)
    # one file per package: the loader reuses a module whose bytes it has executed before
    (folder / "network.py").write_text(NETWORK_SOURCE + f"# package {folder}\n",
                                       encoding="utf-8")
    class_name = "TinySegmenter" if task == "segmentation" else "TinyClassifier"
    kwargs = {"in_channels": 1, "n_classes": 2 if task == "segmentation" else 3}
    reference_markers = folder.parent / "reference_run"  # where the reference's marker goes
    reference_markers.mkdir(exist_ok=True)
    reference = original_network(class_name, reference_markers, **kwargs)
    torch.save(reference.state_dict(), folder / "weights.pt")
    weights: dict[str, Any] = {"source": "weights.pt", "sha256": sha256(folder / "weights.pt")}
    if style == "0.4":
        weights.update(architecture=f"network.py:{class_name}",
                       architecture_sha256=sha256(folder / "network.py"), kwargs=kwargs)
        inputs = [{"name": "raw", "axes": "bcyx", "data_type": "float32",
                   "shape": [1, 1, 16, 16],
                   "preprocessing": [{"name": "scale_linear",
                                      "kwargs": {"gain": 2.0, "offset": -1.0, "axes": "yx"}}]}]
        outputs = [{"name": "out", "axes": "bcyx" if task == "segmentation" else "bc",
                    "data_type": "float32"}]
        version = "0.4.10"
    else:
        weights["architecture"] = {"source": "network.py", "sha256": sha256(folder / "network.py"),
                                   "callable": class_name, "kwargs": kwargs}
        inputs = [{"id": "raw", "axes": [
            {"type": "batch"}, {"type": "channel", "channel_names": ["intensity"]},
            {"type": "space", "id": "y", "size": 16}, {"type": "space", "id": "x", "size": 16}],
            "preprocessing": [{"id": "ensure_dtype", "kwargs": {"dtype": "float32"}}]}]
        names = ["background", "pore"] if task == "segmentation" else ["a", "b", "c"]
        out_axes: list[dict[str, Any]] = [{"type": "batch"},
                                          {"type": "channel", "channel_names": names}]
        if task == "segmentation":
            out_axes += [{"type": "space", "id": "y", "size": {"tensor_id": "raw",
                                                                "axis_id": "y"}},
                         {"type": "space", "id": "x", "size": {"tensor_id": "raw",
                                                                "axis_id": "x"}}]
        outputs = [{"id": "out", "axes": out_axes}]
        version = "0.5.3"
    rdf: dict[str, Any] = {
        "format_version": version, "type": "model", "name": f"tiny-{task}-{style}",
        "description": "a tiny test network", "inputs": inputs, "outputs": outputs,
        "weights": {"pytorch_state_dict": weights},
    }
    rdf.update(overrides)
    (folder / rdf_name).write_text(yaml.safe_dump(rdf, sort_keys=False), encoding="utf-8")
    return folder / rdf_name, reference


@pytest.mark.parametrize("style", ["0.4", "0.5"])
def test_package_is_refused_without_trust_and_its_code_never_runs(
    tmp_path: Path, style: str, capsys: pytest.CaptureFixture[str]
) -> None:
    rdf, _ = write_package(tmp_path / "package", style=style)
    marker = tmp_path / "package" / "network_code_ran"
    for source in (rdf, rdf.parent):  # the rdf.yaml or its folder
        with pytest.raises(ModelLoadError) as caught:
            load_model(source)
        message = str(caught.value)
        assert "network.py:TinySegmenter" in message and str(rdf) in message
        assert "not executed" in message and "trust=True" in message
    assert main(["models", str(rdf.parent)]) == EXIT_USAGE
    assert "--trust" in capsys.readouterr().err
    assert not marker.exists(), "the package's network file ran without trust"


@pytest.mark.parametrize("style", ["0.4", "0.5"])
def test_trusted_package_loads_and_computes_what_the_original_does(
    tmp_path: Path, style: str
) -> None:
    rdf, reference = write_package(tmp_path / "package", style=style)
    loaded = load_model(rdf.parent, trust=True)
    assert (tmp_path / "package" / "network_code_ran").exists()
    card = loaded.card
    assert (card.spatial_dims, card.in_channels, card.task) == (2, 1, "segmentation")
    assert card.input_size == (16, 16)
    assert loaded.weights_sha256 == sha256(rdf.parent / "weights.pt")
    x = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), reference(x), rtol=0, atol=0)
    # provenance: the file that ran, with the hash of its bytes
    (record,) = loaded.trusted_code
    assert str((rdf.parent / "network.py").resolve()) in record
    assert sha256(rdf.parent / "network.py") in record and record in loaded.source
    if style == "0.5":
        assert card.class_names == ("background", "pore")  # the output's channel_names
        assert card.preprocessing == ()  # ensure_dtype needs no step
    else:
        # scale_linear gain 2, offset -1 becomes normalize: (x - 0.5) / 0.5 == 2x - 1
        assert card.preprocessing == ({"op": "normalize", "mean": 0.5, "std": 0.5},)
        raw = np.array([[[0.0, 0.25], [0.5, 1.0]]])
        np.testing.assert_allclose(loaded.preprocess(raw).numpy()[0, 0], 2 * raw[0] - 1)


def test_classifier_package_with_class_names_in_config(tmp_path: Path) -> None:
    rdf, reference = write_package(tmp_path / "package", style="0.4", task="classification",
                                   config={"class_names": ["ferrite", "austenite", "martensite"]})
    loaded = load_model(rdf, trust=True)
    assert loaded.card.task == "classification"
    assert loaded.class_names == ("ferrite", "austenite", "martensite")
    assert loaded.card.target_layer == "features.1"
    x = torch.rand(1, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), reference(x), rtol=0, atol=0)
    assert main(["models", str(rdf), "--trust"]) == EXIT_OK


def test_a_changed_network_file_is_refused_by_its_checksum(tmp_path: Path) -> None:
    rdf, _ = write_package(tmp_path / "package", style="0.5")
    network = rdf.parent / "network.py"
    network.write_text(NETWORK_SOURCE + "\nimport os  # added later\n", encoding="utf-8")
    with pytest.raises(BioimageioError, match="does not match its checksum") as caught:
        load_model(rdf, trust=True)
    assert str(network.resolve()) in str(caught.value)
    assert not (rdf.parent / "network_code_ran").exists()


def test_an_architecture_file_outside_the_package_is_refused_even_with_trust(
    tmp_path: Path
) -> None:
    rdf, _ = write_package(tmp_path / "package", style="0.4")
    (tmp_path / "elsewhere.py").write_text(NETWORK_SOURCE, encoding="utf-8")
    data = yaml.safe_load(rdf.read_text(encoding="utf-8"))
    state = data["weights"]["pytorch_state_dict"]
    state["architecture"] = "../elsewhere.py:TinySegmenter"
    del state["architecture_sha256"]
    rdf.write_text(yaml.safe_dump(data), encoding="utf-8")
    with pytest.raises(ModelLoadError, match="lies outside the card's folder"):
        load_model(rdf, trust=True)
    assert not (tmp_path / "network_code_ran").exists()


def test_built_in_architecture_package_needs_no_trust_but_its_weights_stay_inside(
    tmp_path: Path
) -> None:
    from napari_gradcam.core.architectures import UNet

    rdf, _ = write_package(tmp_path / "package", style="0.5")
    torch.manual_seed(1)
    reference = UNet(spatial_dims=2, in_channels=1, num_classes=2, widths=(4, 8)).eval()
    torch.save(reference.state_dict(), rdf.parent / "unet.pt")
    data = yaml.safe_load(rdf.read_text(encoding="utf-8"))
    data["weights"]["pytorch_state_dict"] = {
        "source": "unet.pt",
        "architecture": {"import_from": "napari_gradcam.core.architectures", "callable": "UNet",
                         "kwargs": {"spatial_dims": 2, "in_channels": 1, "num_classes": 2,
                                    "widths": [4, 8]}}}
    rdf.write_text(yaml.safe_dump(data), encoding="utf-8")
    loaded = load_model(rdf)  # napari-gradcam's own class: nothing foreign runs
    assert loaded.trusted_code == ()
    x = torch.rand(1, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), reference(x), rtol=0, atol=0)

    (rdf.parent / "unet.pt").rename(tmp_path / "unet.pt")
    data["weights"]["pytorch_state_dict"]["source"] = "../unet.pt"
    rdf.write_text(yaml.safe_dump(data), encoding="utf-8")
    with pytest.raises(ModelLoadError, match="outside the card's folder"):
        load_model(rdf)
    data["weights"]["pytorch_state_dict"]["source"] = "https://example.org/unet.pt"
    rdf.write_text(yaml.safe_dump(data), encoding="utf-8")
    with pytest.raises(BioimageioError, match="napari-gradcam does not download"):
        card_from_rdf(rdf)


@pytest.mark.parametrize(("change", "message"), [
    ({"weights": {"torchscript": {"source": "weights.pt"}}},
     r"no 'weights.pytorch_state_dict' entry \(this package has: torchscript\)"),
    ({"inputs": [{"name": "raw", "axes": "byxc", "shape": [1, 16, 16, 1]}]},
     r"the input's axes are 'byxc'; napari-gradcam feeds models a batch axis, a channel axis"),
    ({"inputs": []}, r"'inputs' lists 0 tensors"),
])
def test_descriptions_it_cannot_use_say_why(tmp_path: Path, change: dict, message: str) -> None:
    rdf, _ = write_package(tmp_path / "package", style="0.4", **change)
    with pytest.raises(BioimageioError, match=message) as caught:
        load_model(rdf, trust=True)
    assert str(rdf) in str(caught.value)


def test_preprocessing_it_cannot_reproduce_is_named_in_a_warning(tmp_path: Path) -> None:
    per_sample = [{"name": "zero_mean_unit_variance",
                   "kwargs": {"mode": "per_sample", "axes": "yx"}}]
    rdf, _ = write_package(tmp_path / "package", style="0.4", inputs=[
        {"name": "raw", "axes": "bcyx", "shape": [1, 1, 16, 16], "preprocessing": per_sample}])
    with pytest.warns(UserWarning, match=r"zero_mean_unit_variance \(per_sample\) is not "
                                         "reproduced"):
        card = card_from_rdf(rdf.parent)
    assert card.preprocessing == ()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        card_from_rdf(write_package(tmp_path / "other", style="0.5")[0])  # nothing to warn


def test_a_file_named_bioimageio_yaml_and_plain_cards_are_told_apart(tmp_path: Path) -> None:
    rdf, _ = write_package(tmp_path / "package", style="0.5", rdf_name="bioimageio.yaml")
    assert find_rdf(rdf.parent) == rdf
    assert card_from_rdf(rdf.parent).name == "tiny-segmentation-0.5"
    renamed = rdf.rename(rdf.with_name("described.yaml"))  # found by its content, too
    assert find_rdf(renamed) == renamed and find_rdf(rdf.parent) is None
    card = tmp_path / "card.yaml"
    card.write_text(yaml.safe_dump({
        "name": "plain", "architecture": "resnet_like", "spatial_dims": 2, "in_channels": 1,
        "task": "classification", "architecture_kwargs": {"widths": [4, 8]}}), encoding="utf-8")
    assert find_rdf(card) is None
    assert load_model(card).card.name == "plain"


def test_a_file_outside_the_package_is_never_read_to_check_its_checksum(tmp_path: Path) -> None:
    """A description naming '../secret' with a made-up sha256 must not make the tool read the
    file (the checksum error would reveal its hash); the folder rule refuses it first."""
    rdf, _ = write_package(tmp_path / "package", style="0.5")
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"not yours")
    data = yaml.safe_load(rdf.read_text(encoding="utf-8"))
    data["weights"]["pytorch_state_dict"].update(source="../secret.bin", sha256="0" * 64)
    rdf.write_text(yaml.safe_dump(data), encoding="utf-8")
    with pytest.raises((ModelLoadError, BioimageioError)) as refused:
        load_model(rdf)
    assert sha256(secret) not in str(refused.value)
    assert "outside" in str(refused.value)
