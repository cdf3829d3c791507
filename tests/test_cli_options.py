"""The command line's newer options on real files and real (tiny) models: every method of the
registry, uncertainty outputs, the out-of-domain check, multi-output, regression and
transformer models. Each map the command line writes is compared with the core API's
``explain_volume`` on the same explainer: the shells add nothing to the numbers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
import zarr
from tests.test_cli import write_card
from tests.test_distributed import write_model
from torch import nn

from napari_gradcam.cli import main
from napari_gradcam.core.domain import input_statistics
from napari_gradcam.core.methods import METHODS, explainer
from napari_gradcam.core.model_card import ModelCard
from napari_gradcam.core.models import load_model
from napari_gradcam.core.preprocess import Preprocessor
from napari_gradcam.core.targets import RegressionTarget
from napari_gradcam.core.uncertainty import MEANINGS, UncertaintyExplainer
from napari_gradcam.core.volume import explain_volume
from napari_gradcam.io import ATTRS_KEY, read_volume, uncertainty_path, write_tiff_volume

SCALE = (2.0, 0.65, 0.65)
BATCH = 4


# ----------------------------------------------------------------------------- tiny models


class TwoHeads(nn.Module):
    """A classifier with two heads on one feature map: returns ``(logits_a, logits_b)``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3, padding=1)
        self.act = nn.ReLU()
        self.a = nn.Linear(6, 3)
        self.b = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = self.act(self.conv(x)).mean((2, 3))
        return self.a(pooled), self.b(pooled)


class Regressor(nn.Module):
    """Two predicted properties per image: conv, ReLU, global average pool, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3, padding=1)
        self.act = nn.ReLU()
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.conv(x)).mean((2, 3)))


class Tokens(nn.Module):
    """A one-block vision transformer in miniature: 4×4 patches of a 16² slice become 16
    tokens, a class token goes in front, one token-wise block, mean over tokens, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(1, 8, 4, stride=4)
        self.cls = nn.Parameter(torch.randn(1, 1, 8))
        self.block = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls.expand(x.shape[0], -1, -1), tokens], 1)
        return self.head(torch.relu(self.block(tokens)).mean(1))


class Symmetric(nn.Module):
    """Mirror-symmetric 3×3 kernels, stride 1, zero padding, GAP, positive head: mirroring the
    input mirrors every feature map and leaves the pooled features unchanged, so its Grad-CAM
    map mirrors with the input (flip-equivariant, up to rounding)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.head = nn.Linear(4, 2)
        with torch.no_grad():
            w = self.conv.weight
            w.copy_((w + w.flip(2) + w.flip(3) + w.flip(2, 3)) / 4)
            self.head.weight.abs_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.conv(x)).mean((2, 3)))


def export(model: nn.Module, path: Path) -> Path:
    """Save as a torch.export program (.pt2): loads without running any code of ours."""
    torch.manual_seed(0)
    example = torch.rand(2, 1, 16, 16)
    program = torch.export.export(model.eval(), (example,),
                                  dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, path)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("cli_options")
    rng = np.random.default_rng(0)
    torch.manual_seed(1)
    return {
        "card": write_card(folder),
        "card3d": write_model(folder, 3, "tiny3d"),
        "scan": write_tiff_volume(folder / "scan.tif",
                                  (rng.random((10, 20, 24)) * 1000).astype(np.uint16),
                                  scale=SCALE),
        "scan16": write_tiff_volume(folder / "scan16.tif",
                                    (rng.random((6, 16, 16)) * 1000).astype(np.float32),
                                    scale=SCALE),
        "scan3d": write_tiff_volume(folder / "scan3d.tif",
                                    (rng.random((20, 18, 22)) * 1000).astype(np.uint16),
                                    scale=(1.0, 1.0, 1.0)),
        "two_heads": export(TwoHeads(), folder / "two_heads.pt2"),
        "regressor": export(Regressor(), folder / "regressor.pt2"),
        "tokens": export(Tokens(), folder / "tokens.pt2"),
        "symmetric": export(Symmetric(), folder / "symmetric.pt2"),
    }


def run(scan: Path, model: Path, out: Path, *extra: str, quiet: bool = True) -> int:
    return main(["explain", str(scan), "--model", str(model), "--out", str(out),
                 "--device", "cpu", "--batch-size", str(BATCH), *extra,
                 *(["--quiet"] if quiet else [])])


def core_maps(scan: Path, model: Path, method: str, layer: str, target=None,
              **options) -> np.ndarray:
    """The core API on the same file and model: what the widget and scripts compute."""
    volume, _ = read_volume(scan)
    loaded = load_model(model, device="cpu")
    cam = explainer(method, loaded.model, layer, **options)
    result = explain_volume(cam, np.asarray(volume), mode="slices", axis=0, batch_size=BATCH,
                            target=target, preprocess=loaded.preprocess)
    return np.asarray(result.maps)


def written(out: Path) -> tuple[np.ndarray, dict]:
    maps, info = read_volume(out)
    return np.asarray(maps), info.metadata


# ----------------------------------------------------------------------------- methods


@pytest.mark.parametrize("method", ["scorecam", "eigencam", "Score-CAM"])
def test_registry_methods_give_the_core_apis_map(files, tmp_path, method):
    out = tmp_path / "maps.zarr"
    assert run(files["scan"], files["card"], out, "--method", method,
               "--no-domain-check") == 0
    maps, attrs = written(out)
    expected = core_maps(files["scan"], files["card"], method, "features.2")
    assert maps.shape == (10, 20, 24) and np.abs(expected).max() > 0
    np.testing.assert_array_equal(maps, expected)
    assert attrs["method"] == method.lower().replace("-", "")  # the registry's spelling


def test_method_help_and_errors_list_the_registry(files, tmp_path, capsys):
    assert main(["explain", "--help"]) == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert all(name in help_text for name in METHODS)
    assert run(files["scan"], files["card"], tmp_path / "m.zarr", "--method", "gradcam+++") == 2
    err = capsys.readouterr().err
    assert "unknown method 'gradcam+++'" in err and ", ".join(METHODS) in err
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- domain check


def with_statistics(card_path: Path, count: int) -> Path:
    """A copy of a test card with training statistics of uniform 0..1000 patches of 16 voxels
    per axis, beside it (a card reads weights from its own folder only)."""
    card = yaml.safe_load(card_path.read_text(encoding="utf-8"))
    dims = int(card["spatial_dims"])
    patches = np.random.default_rng(5).random((count, *[16] * dims)) * 1000
    preprocess = Preprocessor.from_card(ModelCard.from_dict(card))
    card["training_statistics"] = input_statistics(patches, spatial_dims=dims,
                                                   preprocess=preprocess, sample=count)
    path = card_path.with_name(f"{card_path.stem}_with_stats.yaml")
    path.write_text(yaml.safe_dump(card), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def card_with_statistics(files) -> Path:
    return with_statistics(files["card"], 200)


def test_an_out_of_domain_input_is_warned_about_and_recorded(files, card_with_statistics,
                                                             tmp_path, capsys):
    bright = (np.random.default_rng(3).random((10, 20, 24)) * 200 + 800).astype(np.uint16)
    scan = write_tiff_volume(tmp_path / "bright.tif", bright, scale=SCALE)
    out = tmp_path / "maps.zarr"
    assert run(scan, card_with_statistics, out, quiet=False) == 0
    captured = capsys.readouterr()
    assert "domain check: The input looks unlike the model's training data" in captured.err
    assert "domain check: input unlike the training data (" in captured.out  # the summary
    report = written(out)[1]["domain_check"]
    assert report["checked"] and report["out_of_domain"]
    flagged = {f["check"] for f in report["findings"] if f["flagged"]}
    assert {"mean_shift", "noise"} <= flagged  # 0.8..1.0 after the window: brighter, quieter

    # the training-like scan passes silently; --no-domain-check records nothing
    assert run(files["scan"], card_with_statistics, tmp_path / "like.zarr") == 0
    assert "domain check" not in capsys.readouterr().err
    report = written(tmp_path / "like.zarr")[1]["domain_check"]
    assert report["checked"] and not report["out_of_domain"]
    assert run(scan, card_with_statistics, tmp_path / "off.zarr", "--no-domain-check") == 0
    assert "domain check" not in capsys.readouterr().err
    assert "domain_check" not in written(tmp_path / "off.zarr")[1]


def test_a_file_without_a_length_unit_is_not_compared_in_micrometres(files, tmp_path, capsys):
    """A .npy scan has no voxel size: its scale of 1 is pixels, so the voxel-size check must
    say it cannot tell, not flag 1 µm against the training range (as the widget does)."""
    card = yaml.safe_load(with_statistics(files["card"], 60).read_text(encoding="utf-8"))
    card["training_statistics"]["voxel_size_range"] = {"min": [0.6, 0.6], "max": [0.7, 0.7]}
    path = files["card"].with_name("card_with_voxels.yaml")
    path.write_text(yaml.safe_dump(card), encoding="utf-8")
    scan = tmp_path / "scan.npy"
    np.save(scan, (np.random.default_rng(7).random((6, 18, 22)) * 1000).astype(np.uint16))
    assert run(scan, path, tmp_path / "maps.zarr") == 0
    report = written(tmp_path / "maps.zarr")[1]["domain_check"]
    voxel = next(f for f in report["findings"] if f["check"] == "voxel_size")
    assert not voxel["flagged"] and voxel["value"] is None
    # the same scan as a TIFF in µm at 0.65 µm is compared, and passes
    tif = write_tiff_volume(tmp_path / "scan.tif", np.load(scan), scale=SCALE)
    assert run(tif, path, tmp_path / "tif.zarr") == 0
    voxel = next(f for f in written(tmp_path / "tif.zarr")[1]["domain_check"]["findings"]
                 if f["check"] == "voxel_size")
    assert voxel["value"] is not None and not voxel["flagged"]


@pytest.mark.parametrize("model, extra, seen", [
    ("card", ["--axis", "1"], [20, 22]),  # slices along y: items are (z, x) planes
    ("card3d", ["--mode", "volume", "--window", "12", "12", "12"], [12, 12, 12]),  # windows
])
def test_domain_check_sees_what_the_model_sees(files, tmp_path, capsys, model, extra, seen):
    card = with_statistics(files[model], 60)
    shape = (20, 18, 22)
    rng = np.random.default_rng(7)
    like = write_tiff_volume(tmp_path / "like.tif",
                             (rng.random(shape) * 1000).astype(np.uint16), scale=SCALE)
    bright = write_tiff_volume(tmp_path / "bright.tif",
                               (rng.random(shape) * 200 + 800).astype(np.uint16), scale=SCALE)
    assert run(like, card, tmp_path / "like.zarr", *extra) == 0
    assert "domain check" not in capsys.readouterr().err
    report = written(tmp_path / "like.zarr")[1]["domain_check"]
    assert report["checked"] and not report["out_of_domain"]
    sizes = report["findings"][[f["check"] for f in report["findings"]].index("input_size")]
    assert sizes["applicable"] and not sizes["flagged"]
    assert sizes["numbers"]["user"] == seen and sizes["numbers"]["train"] == [16] * len(seen)
    assert run(bright, card, tmp_path / "bright.zarr", *extra) == 0
    assert "domain check: The input looks unlike" in capsys.readouterr().err
    assert written(tmp_path / "bright.zarr")[1]["domain_check"]["out_of_domain"]


def test_a_card_without_statistics_says_it_cannot_be_checked(files, tmp_path, capsys):
    out = tmp_path / "maps.zarr"
    assert run(files["scan"], files["card"], out) == 0
    assert "domain check: No training statistics in the model card" in capsys.readouterr().err
    assert written(out)[1]["domain_check"]["checked"] is False


# ----------------------------------------------------------------------------- uncertainty


def test_flip_uncertainty_is_zero_for_a_flip_equivariant_model(files, tmp_path):
    out = tmp_path / "maps.zarr"
    assert run(files["scan16"], files["symmetric"], out, "--layer", "act",
               "--uncertainty", "flips", "--no-domain-check") == 0
    maps, _ = written(out)
    spread, attrs = written(uncertainty_path(out))
    assert spread.shape == maps.shape == (6, 16, 16)
    assert maps.max() > 0
    assert spread.max() <= 1e-5 * maps.max()  # only rounding differs between orientations
    assert attrs["uncertainty"]["sources"] == ["flips"]
    assert attrs["uncertainty"]["meaning"] == {"flips": MEANINGS["flips"]}
    # the main map is the plain map: the same as without --uncertainty
    np.testing.assert_array_equal(maps, core_maps(files["scan16"], files["symmetric"],
                                                  "gradcam", "act"))


def test_flip_and_shift_uncertainty_of_a_strided_model_equals_the_core(files, tmp_path):
    out = tmp_path / "maps.ome.zarr"
    assert run(files["scan"], files["card"], out, "--uncertainty", "flips,shifts",
               "--no-domain-check") == 0
    maps, _ = written(out)
    spread_path = tmp_path / "maps_uncertainty.ome.zarr"
    spread, attrs = written(spread_path)
    # a stride-2 ResNet is not mirror- or shift-equivariant: the spread is a sizeable part
    assert spread.max() > 0.05 * maps.max()
    volume, _ = read_volume(files["scan"])
    loaded = load_model(files["card"], device="cpu")
    wrapped = UncertaintyExplainer(explainer("gradcam", loaded.model, "features.2"),
                                   sources=("flips", "shifts"))
    expected = np.zeros(volume.shape, np.float32)
    result = explain_volume(wrapped, np.asarray(volume), mode="slices", batch_size=BATCH,
                            preprocess=loaded.preprocess, uncertainty_out=expected)
    np.testing.assert_array_equal(spread, expected)
    np.testing.assert_array_equal(maps, np.asarray(result.maps))
    assert attrs["value_range"] == pytest.approx([float(spread.min()), float(spread.max())])
    group = zarr.open_group(str(spread_path), mode="r")
    assert group.attrs[ATTRS_KEY]["kind"] == "uncertainty"


def test_window_disagreement_in_volume_mode(files, tmp_path):
    out = tmp_path / "maps.zarr"
    options = ["--mode", "volume", "--window", "12", "12", "12", "--overlap", "0.5",
               "--no-domain-check"]
    assert run(files["scan3d"], files["card3d"], out, "--uncertainty", "windows",
               *options) == 0
    maps, _ = written(out)
    spread, attrs = written(uncertainty_path(out))
    assert spread.shape == (20, 18, 22) and attrs["uncertainty"]["sources"] == ["windows"]
    volume, _ = read_volume(files["scan3d"])
    loaded = load_model(files["card3d"], device="cpu")
    expected = np.zeros(volume.shape, np.float32)
    cam = explainer("gradcam", loaded.model, "features.2")
    result = explain_volume(cam, np.asarray(volume), mode="windows", window=(12, 12, 12),
                            overlap=0.5, batch_size=BATCH, preprocess=loaded.preprocess,
                            uncertainty_out=expected)
    np.testing.assert_array_equal(spread, expected)
    np.testing.assert_array_equal(maps, np.asarray(result.maps))
    assert spread.max() > 0.01 * maps.max()  # overlapping windows disagree somewhere
    # the map is the blended map of a run without uncertainty (float64 sums, same terms)
    assert run(files["scan3d"], files["card3d"], tmp_path / "plain.zarr", *options) == 0
    np.testing.assert_allclose(maps, written(tmp_path / "plain.zarr")[0], rtol=1e-5,
                               atol=1e-6 * maps.max())


DROPOUT_NET = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(4)  # the same weights on every load
        self.conv = nn.Conv2d(1, 6, 3, padding=1)
        self.act = nn.ReLU()
        self.drop = nn.Dropout2d(0.5)
        self.head = nn.Linear(6, 2)
        with torch.no_grad():
            self.head.weight.abs_()

    def forward(self, x):
        return self.head(self.drop(self.act(self.conv(x))).mean((2, 3)))
"""


def test_dropout_uncertainty_of_a_trusted_model_with_dropout(files, tmp_path):
    (tmp_path / "drop_net.py").write_text(DROPOUT_NET, encoding="utf-8")
    card = tmp_path / "drop.yaml"
    card.write_text(yaml.safe_dump({
        "name": "drop", "architecture": "drop_net.py:Net", "spatial_dims": 2,
        "in_channels": 1, "task": "classification", "target_layer": "act"}), encoding="utf-8")
    out = tmp_path / "maps.zarr"
    assert run(files["scan16"], card, out, "--uncertainty", "dropout", "--n-dropout", "4",
               "--trust", "--no-domain-check") == 0
    spread, attrs = written(uncertainty_path(out))
    assert attrs["uncertainty"]["n_dropout"] == 4
    volume, _ = read_volume(files["scan16"])
    loaded = load_model(card, device="cpu", trust=True)
    wrapped = UncertaintyExplainer(explainer("gradcam", loaded.model, "act"),
                                   sources=("dropout",), n_dropout=4)
    expected = np.zeros(volume.shape, np.float32)
    result = explain_volume(wrapped, np.asarray(volume), mode="slices", batch_size=BATCH,
                            preprocess=loaded.preprocess, uncertainty_out=expected)
    np.testing.assert_array_equal(spread, expected)
    assert spread.max() > 0.05 * np.asarray(result.maps).max()  # dropped channels move it


@pytest.mark.parametrize("extra, message", [
    (["--uncertainty", "flips,bogus"], "unknown uncertainty source 'bogus'"),
    (["--uncertainty", "dropout"], "model 'tiny2d' has no dropout layers"),
    (["--uncertainty", "windows"], "'windows' (disagreement between overlapping windows) "
                                   "needs --mode volume"),
    (["--uncertainty", "dropout", "--n-dropout", "1"], "n_dropout must be an integer >= 2"),
    (["--sign", "-1"], "--sign only applies to --regression"),
])
def test_bad_new_options_exit_2_and_write_nothing(files, tmp_path, capsys, extra, message):
    assert run(files["scan"], files["card"], tmp_path / "m.zarr", *extra) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_an_existing_uncertainty_output_is_refused_before_any_work(files, tmp_path, capsys):
    out = tmp_path / "maps.zarr"
    uncertainty_path(out).mkdir()
    assert run(files["scan"], files["card"], out, "--uncertainty", "flips") == 2
    assert "maps_uncertainty.zarr already exists" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["maps_uncertainty.zarr"]
    # an uncertainty output that would replace the input is refused even with --overwrite
    victim = write_tiff_volume(tmp_path / "s_cam_uncertainty.tif",
                               np.ones((4, 16, 16), np.uint16))
    before = victim.read_bytes()
    assert main(["explain", str(victim), "--model", str(files["card"]), "--out",
                 str(tmp_path / "s_cam.tif"), "--uncertainty", "flips", "--overwrite",
                 "--quiet"]) == 2
    assert "never writes over its input" in capsys.readouterr().err
    assert victim.read_bytes() == before
    assert not (tmp_path / "s_cam.tif").exists()


# ----------------------------------------------------------------------------- model options


def test_output_picks_one_head_of_a_tuple_output(files, tmp_path, capsys):
    assert run(files["scan16"], files["two_heads"], tmp_path / "none.zarr", "--layer",
               "act", "--no-domain-check") == 2
    assert "say which one to explain, e.g. output=0" in capsys.readouterr().err
    maps = {}
    for index in (0, 1):
        out = tmp_path / f"head{index}.zarr"
        assert run(files["scan16"], files["two_heads"], out, "--layer", "act",
                   "--output", str(index), "--target", "2", "--no-domain-check") == 0
        maps[index], attrs = written(out)
        expected = core_maps(files["scan16"], files["two_heads"], "gradcam", "act", target=2,
                             output=index)
        np.testing.assert_array_equal(maps[index], expected)
        assert attrs["options"]["output"] == index
    assert not np.allclose(maps[0], maps[1])  # two heads, two explanations


@pytest.mark.parametrize("index, sign", [(1, -1), (0, 1)])
def test_regression_target_with_sign(files, tmp_path, capsys, index, sign):
    out = tmp_path / "maps.zarr"
    assert run(files["scan16"], files["regressor"], out, "--layer", "act", "--regression",
               str(index), "--sign", f"{sign:+d}", "--no-domain-check", quiet=False) == 0
    assert "predicted (slices): n/a for a regression head" in capsys.readouterr().out
    maps, attrs = written(out)
    expected = core_maps(files["scan16"], files["regressor"], "gradcam", "act",
                         target=RegressionTarget(output_index=index, sign=sign))
    np.testing.assert_array_equal(maps, expected)
    assert attrs["target"] == RegressionTarget(index, sign).describe()
    # no softmax "class probabilities" of a regression head are recorded as if they were
    assert "predictions" not in attrs and "predicted_counts" not in attrs
    # Grad-CAM of a GAP + linear head by hand: ReLU(sum_c sign * W[index, c] / HW * A_c)
    loaded = load_model(files["regressor"], device="cpu")
    volume = torch.from_numpy(np.asarray(read_volume(files["scan16"])[0]))
    with torch.no_grad():
        features = loaded.model.act(loaded.model.conv(loaded.preprocess(volume.numpy())))
        weights = sign * loaded.model.head.weight[index] / (16 * 16)
        by_hand = torch.relu(torch.einsum("c,nchw->nhw", weights, features)).numpy()
    np.testing.assert_allclose(maps, by_hand, rtol=1e-5, atol=1e-6 * by_hand.max())


def test_transformer_tokens_with_patch_grid_and_class_token(files, tmp_path, capsys):
    out = tmp_path / "maps.zarr"
    assert run(files["scan16"], files["tokens"], out, "--layer", "block", "--patch-grid",
               "4", "4", "--class-token", "--no-domain-check") == 0
    maps, attrs = written(out)
    expected = core_maps(files["scan16"], files["tokens"], "gradcam", "block",
                         patch_grid=(4, 4), class_token=True)
    assert np.abs(expected).max() > 0
    np.testing.assert_array_equal(maps, expected)
    assert attrs["options"]["patch_grid"] == [4, 4] and attrs["options"]["class_token"] is True
    # a layout that does not add up is refused with what the layer gave
    assert run(files["scan16"], files["tokens"], tmp_path / "bad.zarr", "--layer", "block",
               "--patch-grid", "4", "4", "--no-class-token", "--no-domain-check") == 2
    assert "17 tokens" in capsys.readouterr().err
    assert not (tmp_path / "bad.zarr").exists()


def test_a_tiff_uncertainty_map_records_what_it_holds(files, tmp_path):
    """A TIFF keeps only the record it was created with: the uncertainty map's sources and
    their meanings must be in it from the start, as in a .zarr."""
    from napari_gradcam.io import read_attrs

    out = tmp_path / "maps.tif"
    assert run(files["scan16"], files["symmetric"], out, "--layer", "act",
               "--uncertainty", "flips", "--no-domain-check") == 0
    for path in (out, uncertainty_path(out)):
        record = read_attrs(path)["options"]["uncertainty"]
        assert record["sources"] == ["flips"]
        assert record["meaning"] == {"flips": MEANINGS["flips"]}
