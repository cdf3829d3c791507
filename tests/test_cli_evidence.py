"""``napari-gradcam evidence`` on real files: a report folder on success, exit 2 on bad input,
and nothing written when the input is refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from tests.test_cli import SCALE, write_card

from napari_gradcam.cli import main
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
