"""``napari-gradcam evidence`` on real files: a report folder on success, exit 2 on bad input,
and nothing written when the input is refused."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import yaml
from safetensors.torch import save_file
from tests.test_cli import SCALE, write_card

from napari_gradcam.cli import main
from napari_gradcam.core.architectures import ResNetLike
from napari_gradcam.io import write_tiff_volume


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("cli_evidence")
    volume = (np.random.default_rng(1).random((6, 16, 16)) * 1000).astype(np.uint16)
    mask = np.zeros(volume.shape, dtype=np.uint8)
    mask[:, 4:10, 4:10] = 1
    tifffile.imwrite(folder / "mask.tif", mask)
    return {"card": write_card(folder),
            "scan": write_tiff_volume(folder / "scan.tif", volume, scale=SCALE),
            "mask": folder / "mask.tif"}


def evidence_args(files, out: Path, *extra: str) -> list[str]:
    return ["evidence", str(files["scan"]), "--model", str(files["card"]), "--out", str(out),
            "--checks", "deletion", "randomisation", "--quiet", *extra]


def test_evidence_writes_a_report_for_one_slice(files, tmp_path):
    out = tmp_path / "report"
    assert main(evidence_args(files, out, "--slice", "2")) == 0
    report = json.loads((out / "report.json").read_text())
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["model"] == "tiny2d"
    assert "slice 2 along axis 0" in provenance["source"]
    assert "deletion" in json.dumps(report)
    assert (out / "figures" / "deletion_insertion.png").stat().st_size > 1000


def test_region_mask_runs_the_region_test(files, tmp_path):
    out = tmp_path / "region"
    assert main(evidence_args(files, out, "--region", str(files["mask"]), "--checks",
                              "region")) == 0
    assert "region" in (out / "summary.csv").read_text()


@pytest.mark.parametrize(("extra", "message"), [
    (("--slice", "99"), "outside 0..5"),
    (("--axis", "5"), "--axis must be 0, 1 or 2"),
])
def test_bad_choices_exit_2_and_write_nothing(files, tmp_path, capsys, extra, message):
    out = tmp_path / "bad"
    assert main(evidence_args(files, out, *extra)) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_region_of_another_shape_is_refused(files, tmp_path, capsys):
    wrong = tmp_path / "wrong.tif"
    tifffile.imwrite(wrong, np.ones((3, 4, 4), np.uint8))
    out = tmp_path / "bad"
    assert main(evidence_args(files, out, "--region", str(wrong))) == 2
    assert "region mask has shape" in capsys.readouterr().err
    assert not out.exists()


# --- what the user selected, the estimate, and the whole volume (issue 13) ----------------


def write_card_3d(folder: Path, size: int | None = 8, name: str = "tiny3d") -> Path:
    """A small 3D classifier card with an input size smaller than the test volume (or none)."""
    torch.manual_seed(3)
    model = ResNetLike(spatial_dims=3, in_channels=1, num_classes=3, widths=(4, 8, 8))
    with torch.no_grad():
        model.classifier.weight.abs_()
    save_file(model.state_dict(), str(folder / "tiny3d.safetensors"))
    card = {
        "name": "tiny3d", "architecture": "resnet_like",
        "architecture_kwargs": {"spatial_dims": 3, "in_channels": 1, "num_classes": 3,
                                "widths": [4, 8, 8]},
        "weights": "tiny3d.safetensors", "spatial_dims": 3, "in_channels": 1,
        "task": "classification", "class_names": ["none", "pore", "crack"],
        "target_layer": "features.2",
        "preprocessing": [{"op": "window", "min": 0.0, "max": 1000.0}],
    }
    if size is not None:
        card["input_size"] = [size] * 3
    card["name"] = name
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(card), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def files3d(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("cli_evidence_3d")
    volume = (np.random.default_rng(2).random((12, 20, 24)) * 1000).astype(np.uint16)
    mask = np.zeros(volume.shape, dtype=np.uint8)
    mask[8:11, 13:17, 2:5] = 1  # off-centre: a default window must go to it
    tifffile.imwrite(folder / "mask.tif", mask)
    return {"card": write_card_3d(folder),
            "scan": write_tiff_volume(folder / "scan.tif", volume, scale=SCALE),
            "mask": folder / "mask.tif", "volume": volume}


def test_corner_chooses_the_window_of_a_3d_model(files3d, tmp_path):
    """A 3D model on a larger volume is tested on the window at --corner, not on the whole
    volume (the command used to take any 3D input as one sample for a 3D model)."""
    out = tmp_path / "window"
    assert main(["evidence", str(files3d["scan"]), "--model", str(files3d["card"]), "--out",
                 str(out), "--checks", "deletion", "--quiet", "--corner", "2", "5", "9"]) == 0
    provenance = json.loads((out / "provenance.json").read_text())
    assert "window at (2, 5, 9) of size (8, 8, 8)" in provenance["source"]
    stored = np.load(out / "maps.npz")
    np.testing.assert_array_equal(stored["image"], files3d["volume"][2:10, 5:13, 9:17])
    assert stored["map_gradcam"].shape == (8, 8, 8)


def test_default_window_is_centred_on_the_region(files3d, tmp_path):
    out = tmp_path / "region"
    assert main(["evidence", str(files3d["scan"]), "--model", str(files3d["card"]), "--out",
                 str(out), "--checks", "deletion", "--quiet", "--region",
                 str(files3d["mask"])]) == 0
    source = json.loads((out / "provenance.json").read_text())["source"]
    # region bounding box z 8..10, y 13..16, x 2..4: centres 9.5, 15, 3.5; minus half the
    # window: 5.5 → 6, clipped to the last possible corner 12 - 8 = 4; 11; -0.5 → 0
    assert "window at (4, 11, 0) of size (8, 8, 8)" in source
    region = json.loads((out / "report.json").read_text())["region"]
    assert region["pixels"] == 3 * 4 * 3 and region["p_value"] is not None


@pytest.mark.parametrize(("which", "extra", "message"), [
    ("2d", ("--corner", "0", "0", "0"), "the model is 2D"),
    ("2d", ("--window", "4", "4", "4"), "the model is 2D"),
    ("3d", ("--slice", "3"), "the model is 3D"),
    ("3d", ("--corner", "5", "0", "0"), r"outside the volume \(12, 20, 24\): Z 5 \(0..4\)"),
    ("3d", ("--window", "30", "8", "8"), "larger than the volume"),
])
def test_options_the_model_does_not_use_are_refused(files, files3d, tmp_path, capsys, which,
                                                    extra, message):
    source = files if which == "2d" else files3d
    out = tmp_path / "bad"
    args = ["evidence", str(source["scan"]), "--model", str(source["card"]), "--out", str(out),
            "--checks", "deletion", "--quiet", *extra]
    assert main(args) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not out.exists()


def test_estimate_is_printed_before_the_run_and_counts_the_checks_passes(files3d, tmp_path,
                                                                          capsys):
    out = tmp_path / "estimate"
    args = ["evidence", str(files3d["scan"]), "--model", str(files3d["card"]), "--out",
            str(out), "--checks", "deletion", "saliency"]
    assert main([*args, "--estimate-only"]) == 0
    printed = capsys.readouterr().out
    # by hand: the map (forward + backward) 2, deletion (1 + 3 random orders) x (50 + 1)
    # steps = 204, saliency 2
    assert re.search(r"estimate: about \d+ s \(208 forward passes x [\d.]+ ms; map 2, "
                     r"deletion 204, saliency 2\)", printed)
    assert not out.exists()  # an estimate writes nothing
    assert main(args) == 0
    captured = capsys.readouterr()
    assert captured.out.index("estimate:") < captured.out.index("report written")
    assert "evidence:" in captured.err  # the progress bar ran after the estimate was shown


def test_the_estimate_counts_the_forward_passes_the_run_makes(files3d):
    """Count the samples that really go through the model and compare with the estimate."""
    from napari_gradcam.core.models import load_model
    from napari_gradcam.evidence_report import EvidenceSettings, estimate_evidence, run_evidence

    loaded = load_model(str(files3d["card"]))
    sample = files3d["volume"][:8, :8, :8]
    settings = EvidenceSettings(steps=10, n_random=1, region_null_samples=20)
    mask = np.zeros((8, 8, 8), bool)
    mask[2:4, 2:4, 2:4] = True
    estimate = estimate_evidence(loaded, sample, checks=["deletion", "region"],
                                 region_mask=mask, settings=settings)
    assert estimate.per_check == {"map": 2, "deletion": 2 * 11, "region": 2 + 20}
    seen = []
    handle = loaded.model.register_forward_hook(lambda m, i, o: seen.append(len(i[0])))
    try:
        run_evidence(loaded, sample, checks=["deletion", "region"], region_mask=mask,
                     settings=settings)
    finally:
        handle.remove()
    # the map's one forward pass is estimated as 2 (its backward pass costs about as much);
    # the few clean passes that fix the target are not in the estimate: within 10 %
    counted = sum(seen)
    assert abs(counted - estimate.forward_passes) <= 0.1 * estimate.forward_passes
    assert estimate.seconds == pytest.approx(estimate.forward_passes
                                             * estimate.seconds_per_pass)


def test_whole_volume_is_an_explicit_option_with_progress(files, tmp_path, capsys):
    out = tmp_path / "whole"
    args = ["evidence", str(files["scan"]), "--model", str(files["card"]), "--out", str(out),
            "--checks", "deletion", "--whole-volume", "--region", str(files["mask"])]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "whole volume: 6 samples" in captured.out and "6 samples x" in captured.out
    assert "evidence (whole volume): 6000/6000" in captured.err
    with open(out / "samples.csv", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted({int(row["sample"]) for row in rows}) == list(range(6))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["samples"] == 6 and summary["samples_with_region"] == 6
    deletion = next(c for c in summary["checks"] if c["check"] == "Deletion")
    verdicts = [row["verdict"] for row in rows if row["check"] == "Deletion"]
    assert deletion["judged"] == 6 and deletion["passed"] == verdicts.count("pass")
    assert not list(tmp_path.glob(".*partial"))  # the staging folder is gone


def test_a_3d_card_without_input_size_needs_the_window_said(files3d, tmp_path, capsys):
    """No silent whole-volume run: the window must be given, the whole input included."""
    card = write_card_3d(tmp_path, size=None, name="nosize3d")
    args = ["evidence", str(files3d["scan"]), "--model", str(card), "--checks", "deletion",
            "--quiet"]
    assert main([*args, "--out", str(tmp_path / "refused")]) == 2
    assert "--window 12 20 24" in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()
    out = tmp_path / "whole"
    assert main([*args, "--out", str(out), "--window", "12", "20", "24"]) == 0
    assert "(whole input)" in json.loads((out / "provenance.json").read_text())["source"]
