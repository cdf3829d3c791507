"""Opening a model never runs code from it unless the user says they trust it (issue 9).

Each hostile file here carries a payload that writes a marker file when it runs; the test
loads the file through the public surface (``load_model`` and ``napari-gradcam models``) and
checks that it was refused with a message naming the file, the part and the trust option, and
that the marker was never written. With trust, the same files load and say what ran.
"""

from __future__ import annotations

import builtins
import io
import json
import pickle
import textwrap
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import save_file
from torch import nn

from napari_gradcam.cli import EXIT_USAGE, main
from napari_gradcam.core.models import ModelLoadError, load_model


class MarkerPayload:
    """Unpickling this evaluates ``expression`` after writing ``marker``: a stand-in for any
    code a hostile pickle could run (``builtins.eval`` is looked up and called by the
    unpickler, exactly like ``os.system`` would be)."""

    def __init__(self, marker: Path, expression: str) -> None:
        self.marker = str(marker)
        self.expression = expression

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        code = (f"(__import__('pathlib').Path({self.marker!r}).write_text('ran'), "
                f"{self.expression})[1]")
        return (builtins.eval, (code,))


def tiny_classifier() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(4, 3),
    ).eval()


def saved_export(path: Path) -> Path:
    program = torch.export.export(tiny_classifier(), (torch.rand(1, 1, 8, 8),))
    torch.export.save(program, path)
    return path


def torch_saved(obj: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def rewrite_archive(source: Path, target: Path, replace: dict[str, bytes],
                    add: dict[str, bytes] | None = None) -> None:
    """Copy a .pt2 zip, replacing the records whose name ends with a key of ``replace``."""
    with zipfile.ZipFile(source) as original, zipfile.ZipFile(target, "w") as rewritten:
        root = original.namelist()[0].split("/")[0]
        for info in original.infolist():
            data = original.read(info.filename)
            for suffix, new in replace.items():
                if info.filename.endswith(suffix):
                    data = new
            rewritten.writestr(info, data)
        for name, data in (add or {}).items():
            rewritten.writestr(f"{root}/{name}", data)


def evil_sample_inputs(tmp_path: Path, marker: Path) -> Path:
    """A real export whose pickled example inputs run a payload (and still unpickle to a valid
    ``(args, kwargs)`` pair, so that an unguarded load succeeds and nobody notices)."""
    good = saved_export(tmp_path / "good.pt2")
    evil = tmp_path / "evil.pt2"
    payload = MarkerPayload(marker, "((__import__('torch').zeros(1, 1, 8, 8),), {})")
    rewrite_archive(good, evil, {"data/sample_inputs/model.pt": torch_saved(payload)})
    return evil


def evil_pickled_weight(tmp_path: Path, marker: Path) -> Path:
    """A real export whose weights config says a weight is pickled, and the pickle is hostile."""
    good = saved_export(tmp_path / "good.pt2")
    with zipfile.ZipFile(good) as archive:
        config_name = next(n for n in archive.namelist()
                           if n.endswith("data/weights/model_weights_config.json"))
        config = json.loads(archive.read(config_name))
    fqn, entry = next(iter(config["config"].items()))
    shape = list(dict(tiny_classifier().named_parameters())[fqn].shape)
    entry["use_pickle"] = True
    payload = MarkerPayload(marker, f"__import__('torch').zeros({shape})")
    evil = tmp_path / "evil_weight.pt2"
    rewrite_archive(good, evil, {
        "data/weights/model_weights_config.json": json.dumps(config).encode(),
        f"data/weights/{entry['path_name']}": torch_saved(payload),
    })
    return evil


def evil_opaque_constant(tmp_path: Path, marker: Path) -> Path:
    """A real export whose constants config lists an "opaque object", which torch reads with
    plain ``pickle.loads`` (no safe mode at all)."""
    good = saved_export(tmp_path / "good.pt2")
    with zipfile.ZipFile(good) as archive:
        config_name = next(n for n in archive.namelist()
                           if n.endswith("data/constants/model_constants_config.json"))
        config = json.loads(archive.read(config_name))
    config.setdefault("config", {})["smuggled"] = {
        "path_name": "opaque_obj_0", "is_param": False, "use_pickle": True, "tensor_meta": None}
    evil = tmp_path / "evil_constant.pt2"
    rewrite_archive(good, evil, {
        "data/constants/model_constants_config.json": json.dumps(config).encode(),
    }, add={"data/constants/opaque_obj_0": pickle.dumps(MarkerPayload(marker, "None"))})
    return evil


# --------------------------------------------------------------------------------------------
# .pt2 archives


@pytest.mark.parametrize(("build", "part"), [
    (evil_sample_inputs, "data/sample_inputs/model.pt"),
    (evil_pickled_weight, "data/weights/weight_"),
    (evil_opaque_constant, "data/constants/opaque_obj_0"),
])
def test_pt2_with_a_hostile_pickle_is_refused_before_anything_runs(
    tmp_path: Path, build: Any, part: str
) -> None:
    marker = tmp_path / "payload_ran"
    evil = build(tmp_path, marker)
    with pytest.raises(ModelLoadError) as caught:
        load_model(evil)
    message = str(caught.value)
    assert not marker.exists(), "the payload in the .pt2 ran while loading"
    assert str(evil) in message and part in message
    assert "builtins.eval" in message  # what it would have called
    assert "trust=True" in message and "--trust" in message


def test_pt2_hostile_pickle_is_refused_by_the_cli(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "payload_ran"
    evil = evil_sample_inputs(tmp_path, marker)
    assert main(["models", str(evil)]) == EXIT_USAGE
    error = capsys.readouterr().err
    assert not marker.exists()
    assert str(evil) in error and "data/sample_inputs/model.pt" in error and "--trust" in error


def test_pt2_with_hostile_pickle_loads_with_trust_and_says_what_ran(tmp_path: Path) -> None:
    marker = tmp_path / "payload_ran"
    evil = evil_sample_inputs(tmp_path, marker)
    loaded = load_model(evil, trust=True)
    assert marker.exists()  # trust means exactly this: the file's code ran
    assert any("data/sample_inputs/model.pt" in entry for entry in loaded.trusted_code)
    assert "trusted code" in loaded.source
    x = torch.rand(1, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), tiny_classifier()(x))


def test_pt2_with_compiled_native_code_is_refused(tmp_path: Path) -> None:
    good = saved_export(tmp_path / "good.pt2")
    evil = tmp_path / "native.pt2"
    rewrite_archive(good, evil, {}, add={"data/aotinductor/model/model.so": b"\x7fELF" + bytes(60)})
    with pytest.raises(ModelLoadError, match="compiled native code") as caught:
        load_model(evil)
    assert "data/aotinductor/model/model.so" in str(caught.value)


def test_a_plain_export_still_loads_without_trust_and_records_no_code(tmp_path: Path) -> None:
    loaded = load_model(saved_export(tmp_path / "plain.pt2"))
    assert loaded.trusted_code == ()
    x = torch.rand(1, 1, 8, 8)  # exported with a fixed batch of 1
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), tiny_classifier()(x))


# --------------------------------------------------------------------------------------------
# Cards that name code


CUSTOM_NET = textwrap.dedent("""
    from pathlib import Path

    from torch import nn

    Path(__file__).with_name("imported_marker").write_text("module code ran")


    class Net(nn.Module):
        def __init__(self, classes=3):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
            self.head = nn.Linear(4, classes)

        def forward(self, x):
            return self.head(self.body(x).mean(dim=(2, 3)))
""")


def card_with_custom_architecture(folder: Path, module_name: str) -> Path:
    (folder / f"{module_name}.py").write_text(CUSTOM_NET, encoding="utf-8")
    card = folder / "card.yaml"
    card.write_text(yaml.safe_dump({
        "name": "custom", "architecture": f"{module_name}:Net",
        "architecture_kwargs": {"classes": 3}, "spatial_dims": 2, "in_channels": 1,
        "task": "classification",
    }), encoding="utf-8")
    return card


def test_custom_architecture_is_not_imported_without_trust(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    card = card_with_custom_architecture(tmp_path, "untrusted_lab_net")
    monkeypatch.syspath_prepend(str(tmp_path))
    marker = tmp_path / "imported_marker"
    with pytest.raises(ModelLoadError) as caught:
        load_model(card)
    message = str(caught.value)
    assert not marker.exists(), "the card's module was imported before the trust check"
    assert "untrusted_lab_net:Net" in message and str(card) in message
    assert "trust=True" in message and "--trust" in message
    assert main(["models", str(card)]) == EXIT_USAGE
    assert not marker.exists()
    assert "untrusted_lab_net:Net" in capsys.readouterr().err


def test_custom_architecture_with_trust_is_imported_and_recorded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    card = card_with_custom_architecture(tmp_path, "trusted_lab_net")
    monkeypatch.syspath_prepend(str(tmp_path))
    loaded = load_model(card, trust=True)
    assert (tmp_path / "imported_marker").exists()
    (record,) = loaded.trusted_code
    module_file = str((tmp_path / "trusted_lab_net.py").resolve())
    assert "trusted_lab_net:Net" in record and module_file in record
    import hashlib

    assert hashlib.sha256((tmp_path / "trusted_lab_net.py").read_bytes()).hexdigest() in record
    # the provenance every shell writes takes model_source from loaded.source
    assert "trusted code: " + record in loaded.source


def test_card_architecture_file_beside_the_card_runs_only_with_trust(tmp_path: Path) -> None:
    (tmp_path / "lab_net.py").write_text(CUSTOM_NET, encoding="utf-8")
    card = tmp_path / "card.yaml"
    card.write_text(yaml.safe_dump({
        "name": "from-file", "architecture": "lab_net.py:Net",
        "architecture_kwargs": {"classes": 3}, "spatial_dims": 2, "in_channels": 1,
        "task": "classification"}), encoding="utf-8")
    marker = tmp_path / "imported_marker"
    with pytest.raises(ModelLoadError, match=r"'lab_net.py:Net' is not one of .*not executed"):
        load_model(card)
    assert not marker.exists()
    loaded = load_model(card, trust=True)
    assert marker.exists() and str((tmp_path / "lab_net.py").resolve()) in loaded.trusted_code[0]
    assert loaded.card.target_layer == "body.1"


def test_built_in_architectures_need_no_trust(tmp_path: Path) -> None:
    from napari_gradcam.core.architectures import ResNetLike

    model = ResNetLike(spatial_dims=2, in_channels=1, num_classes=3, widths=(4, 8))
    save_file(model.state_dict(), tmp_path / "w.safetensors")
    for architecture in ("resnet_like", "napari_gradcam.core.architectures:ResNetLike"):
        card = tmp_path / "card.yaml"
        card.write_text(yaml.safe_dump({
            "name": "builtin", "architecture": architecture,
            "architecture_kwargs": {"spatial_dims": 2, "in_channels": 1, "num_classes": 3,
                                    "widths": [4, 8]},
            "weights": "w.safetensors", "spatial_dims": 2, "in_channels": 1,
            "task": "classification"}), encoding="utf-8")
        loaded = load_model(card)
        assert loaded.trusted_code == () and loaded.source == str(card.resolve())


# --------------------------------------------------------------------------------------------
# Weights outside the card's folder


def outside_weights_setup(tmp_path: Path) -> tuple[Path, Path]:
    from napari_gradcam.core.architectures import ResNetLike

    project, other = tmp_path / "project", tmp_path / "other_project"
    project.mkdir()
    other.mkdir()
    model = ResNetLike(spatial_dims=2, in_channels=1, num_classes=3, widths=(4, 8))
    save_file(model.state_dict(), other / "secret.safetensors")
    return project, other / "secret.safetensors"


def card_for(folder: Path, weights: str) -> Path:
    card = folder / "card.yaml"
    card.write_text(yaml.safe_dump({
        "name": "escaping", "architecture": "resnet_like",
        "architecture_kwargs": {"spatial_dims": 2, "in_channels": 1, "num_classes": 3,
                                "widths": [4, 8]},
        "weights": weights, "spatial_dims": 2, "in_channels": 1,
        "task": "classification"}), encoding="utf-8")
    return card


def test_card_weights_outside_its_folder_are_refused_unless_trusted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    project, secret = outside_weights_setup(tmp_path)
    for weights in ("../other_project/secret.safetensors", str(secret)):
        card = card_for(project, weights)
        with pytest.raises(ModelLoadError, match="outside the card's folder") as caught:
            load_model(card)
        message = str(caught.value)
        assert weights in message and str(project.resolve()) in message
        assert "trust=True" in message
        assert main(["models", str(card)]) == EXIT_USAGE
        assert "outside the card's folder" in capsys.readouterr().err
        trusted = load_model(card, trust=True)
        assert trusted.weights_sha256 is not None


def test_a_symlink_out_of_the_card_folder_is_refused(tmp_path: Path) -> None:
    project, secret = outside_weights_setup(tmp_path)
    link = project / "w.safetensors"
    try:
        link.symlink_to(secret)
    except OSError:
        pytest.skip("symlinks are not available here")
    with pytest.raises(ModelLoadError, match="outside the card's folder"):
        load_model(card_for(project, "w.safetensors"))
    # a weights file in a subfolder of the card's folder is fine
    (project / "weights").mkdir()
    (project / "weights" / "w.safetensors").write_bytes(secret.read_bytes())
    assert load_model(card_for(project, "weights/w.safetensors")).weights_sha256 is not None
