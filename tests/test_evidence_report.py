"""The evidence report: checks on a trained model, progress and cancel, export, bad input.

The model under test is the shipped micrograph demo model on a generated crack patch when the
zoo holds it, and always a tiny network trained here in a few seconds to find a bright square
in noise (so the right answer is known: the square decides the class). Both must show what a
faithful heatmap shows: deleting pixels in Grad-CAM order destroys the score faster than a
random order, filling the deciding region lowers the prediction, randomising the weights
changes the map, and occlusion points at the same places.
"""

from __future__ import annotations

import csv
import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from napari_gradcam.core.architectures import ResNetLike, build_architecture
from napari_gradcam.core.models import list_demo_models, load_model
from napari_gradcam.core.targets import SegmentationRegion
from napari_gradcam.evidence_report import (
    DEFAULT_CHECKS,
    Cancelled,
    EvidenceError,
    EvidenceReport,
    EvidenceSettings,
    evidence_job,
    evidence_summary,
    run_evidence,
)

SIZE = 24
FAST = EvidenceSettings(steps=20, n_random=2, smoothgrad_samples=8, ig_steps=8)


def square_images(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Noise; class 1 adds a bright 5x5 square at a random place (its mask is returned)."""
    images = rng.normal(0.3, 0.08, (n, 1, SIZE, SIZE)).astype(np.float32)
    classes = rng.integers(0, 2, n)
    masks = np.zeros((n, SIZE, SIZE), dtype=bool)
    for i in np.flatnonzero(classes):
        row, col = rng.integers(2, SIZE - 7, 2)
        images[i, 0, row:row + 5, col:col + 5] += 0.6
        masks[i, row:row + 5, col:col + 5] = True
    return images, classes, masks


@dataclass
class Subject:
    """A trained model, one sample it classifies correctly, the deciding region and target."""

    name: str
    model: object  # LoadedModel or nn.Module
    module: torch.nn.Module
    x: np.ndarray
    mask: np.ndarray
    target: int
    layer: str


def tiny_subject() -> Subject:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = ResNetLike(spatial_dims=2, in_channels=1, num_classes=2, widths=(4, 8, 8))
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        images, classes, _ = square_images(32, rng)
        loss = torch.nn.functional.cross_entropy(model(torch.from_numpy(images)),
                                                 torch.from_numpy(classes))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval()
    images, classes, masks = square_images(64, np.random.default_rng(1))
    with torch.no_grad():
        predicted = model(torch.from_numpy(images)).argmax(1).numpy()
    assert (predicted == classes).mean() > 0.95, "the tiny model did not learn its task"
    index = int(np.flatnonzero((classes == 1) & (predicted == 1))[0])
    return Subject("tiny", model, model, images[index:index + 1], masks[index], 1, "features.3")


def demo_subject() -> Subject:
    from napari_gradcam.samples import make_micrograph_patches

    loaded = load_model("micrograph-classifier")
    crack = loaded.card.class_names.index("crack")
    patches = make_micrograph_patches(4, size=64, seed=20240, dtype="uint8")
    for image, label, mask in zip(patches.images, patches.classes, patches.masks, strict=True):
        if label != crack:
            continue
        with torch.no_grad():
            predicted = int(loaded.model(loaded.preprocess(image[None])).argmax(1)[0])
        if predicted == crack:
            return Subject("demo", loaded, loaded.model, image, mask == 2, crack,
                           loaded.card.target_layer)
    pytest.fail("the demo micrograph model misclassifies every generated crack patch")


def demo_available() -> bool:
    return any(card.name == "micrograph-classifier" for card in list_demo_models())


@pytest.fixture(scope="module")
def tiny() -> Subject:
    return tiny_subject()


@pytest.fixture(scope="module", params=["demo", "tiny"])
def subject(request: pytest.FixtureRequest) -> Subject:
    if request.param == "demo":
        assert demo_available(), "the shipped micrograph-classifier is missing from the zoo"
        return demo_subject()
    return request.getfixturevalue("tiny")


@pytest.fixture(scope="module")
def full_report(subject: Subject) -> EvidenceReport:
    return run_evidence(subject.model, subject.x, layer=subject.layer, target=subject.target,
                        checks=(*DEFAULT_CHECKS, "region"), region_mask=subject.mask,
                        settings=FAST, source="test sample")


# --------------------------------------------------------------------------------------------
# The checks on a trained model


def test_deleting_in_gradcam_order_drops_the_score_faster_than_random(
        full_report: EvidenceReport) -> None:
    deletion, insertion = full_report.deletion, full_report.insertion
    assert deletion is not None and insertion is not None
    assert deletion.auc[0] < 0.8 * deletion.random_auc[0]
    assert insertion.auc[0] > insertion.random_auc[0]
    # the curve starts at the clean score and ends with everything removed
    assert deletion.scores[0, 0] > 0.5
    assert deletion.scores[0, 0] > deletion.scores[0, -1]
    rows = {row.check: row for row in full_report.rows()}
    assert rows["Deletion"].passed and rows["Insertion"].passed


def test_filling_the_deciding_region_lowers_the_prediction(subject: Subject,
                                                           full_report: EvidenceReport) -> None:
    region = full_report.region
    assert region is not None
    assert region.score_drop[0] > 0
    assert region.probability_after[0] < region.probability_before[0]
    # the map concentrates on the region: more of its energy than the region's area share
    assert full_report.region_energy > full_report.region_area_share
    # control: a region of the same size where the map is weakest barely matters
    cam = full_report.cam
    weakest = np.zeros_like(subject.mask)
    order = np.argsort(cam.ravel())
    weakest.ravel()[order[: int(subject.mask.sum())]] = True
    control = run_evidence(subject.model, subject.x, layer=subject.layer, target=subject.target,
                           checks=(), region_mask=weakest, settings=FAST)
    assert control.region.score_drop[0] < region.score_drop[0]


def test_randomising_the_weights_changes_the_map(full_report: EvidenceReport) -> None:
    result = full_report.randomisation
    assert result is not None and len(result.steps) >= 2
    assert result.barely_changes is False
    last = result.steps[-1]
    assert not np.isfinite(last.spearman) or last.spearman < result.threshold
    assert last.ssim < 0.5
    # the cascade goes from the output towards the input
    assert result.steps[0].layer == "classifier"
    assert last.randomised_layers[-1].startswith("features.0")


def test_gradcam_agrees_with_occlusion(full_report: EvidenceReport) -> None:
    occlusion = full_report.agreements["occlusion"]
    chance = 0.1 / (2 - 0.1)
    assert occlusion.top_k_iou > 3 * chance
    assert set(full_report.maps) == {"gradcam", "occlusion", "saliency", "smoothgrad",
                                     "integrated_gradients"}
    for name, values in full_report.maps.items():
        assert values.shape == full_report.image.shape, name
        assert np.isfinite(values).all(), name


def test_report_provenance_names_model_method_layer_target(subject: Subject,
                                                           full_report: EvidenceReport) -> None:
    record = full_report.provenance
    assert record["method"] == "gradcam"
    assert record["layers"] == [subject.layer]
    assert record["mode"] == "evidence"
    assert record["source"] == "test sample"
    assert record["options"]["target_index"] == subject.target
    assert record["options"]["checks"] == [*DEFAULT_CHECKS, "region"]
    if subject.name == "demo":
        assert record["model"] == "micrograph-classifier"
        assert len(record["weights_sha256"]) == 64
    per_map = full_report.map_provenance("occlusion", origin=[0, 0])
    assert per_map["method"] == "occlusion" and per_map["layers"] == []
    assert per_map["options"]["evidence_of"] == "gradcam"
    assert per_map["options"]["origin"] == [0, 0]


def test_the_evidence_summary_travels_with_the_map(full_report: EvidenceReport,
                                                  tmp_path: Path) -> None:
    summary = evidence_summary(full_report)
    rows = full_report.rows()
    assert summary["passed"] == full_report.passed
    assert [row["check"] for row in summary["rows"]] == [row.check for row in rows]
    assert [row["verdict"] for row in summary["rows"]] == [row.verdict for row in rows]
    for mine, row in zip(summary["rows"], rows, strict=True):
        if np.isfinite(row.value):
            assert mine["value"] == pytest.approx(row.value)
    assert summary["failed"] == [f"{r.check}: {r.measure}" for r in rows if r.passed is False]
    assert summary["source"] == "test sample" and summary["method"] == "gradcam"
    # JSON-ready (no NaN), and in every map's provenance, so layers and OME-Zarr carry it
    assert json.loads(json.dumps(summary, allow_nan=False)) == summary
    for name in full_report.maps:
        assert full_report.map_provenance(name)["options"]["evidence"] == summary
    full_report.export(tmp_path / "report", figures=False, maps=False)
    written = json.loads((tmp_path / "report" / "provenance.json").read_text(encoding="utf-8"))
    assert written["options"]["evidence"] == summary


def test_region_row_is_judged_against_random_regions(subject: Subject,
                                                     full_report: EvidenceReport) -> None:
    region = full_report.region
    assert region.null_count == FAST.region_null_samples == 50
    rows = [row for row in full_report.rows() if row.check == "Region test"]
    verdict = rows[0]
    assert "p-value" in verdict.measure and verdict.reference == FAST.region_alpha
    assert verdict.value == pytest.approx(float(region.p_value[0]))
    assert verdict.passed == bool(region.score_drop[0] > 0 and region.p_value[0] < 0.05)
    assert verdict.passed  # the deciding square of a model that learnt it stands out
    effect = next(row for row in rows if row.measure.startswith("effect size"))
    assert effect.value == pytest.approx(float(region.effect_size[0])) and effect.value > 2
    numbers = full_report.to_dict()["region"]
    assert numbers["p_value"] == pytest.approx(float(region.p_value[0]))
    assert numbers["effect_size"] == pytest.approx(float(region.effect_size[0]))
    assert len(numbers["null_drops"]) == 50 and numbers["alpha"] == 0.05
    assert "p-value" in full_report.summary()


def test_a_region_that_does_not_stand_out_fails(tiny: Subject) -> None:
    """A square of background of the deciding square's size: filling it changes the score a
    little, as filling any square does; against random squares it must not pass."""
    rows_with_square = np.flatnonzero(tiny.mask.any(axis=1))
    background = np.zeros_like(tiny.mask)
    low = 0 if rows_with_square.min() >= 12 else SIZE - 5
    background[low:low + 5, 0:5] = True
    assert not (background & tiny.mask).any()
    report = run_evidence(tiny.model, tiny.x, layer=tiny.layer, target=tiny.target, checks=(),
                          region_mask=background, settings=FAST)
    verdict = next(row for row in report.rows() if row.check == "Region test")
    assert verdict.passed is False and not report.passed
    assert f"Region test: {verdict.measure}" in evidence_summary(report)["failed"]


# --------------------------------------------------------------------------------------------
# Export


def test_export_writes_figures_numbers_and_provenance(full_report: EvidenceReport,
                                                      tmp_path: Path) -> None:
    from matplotlib.image import imread

    folder = tmp_path / "supplement"
    files = full_report.export(folder)
    expected = {"summary.csv", "summary.txt", "report.json", "provenance.json", "maps.npz",
                "curves.csv", "randomisation.csv", "agreement.csv",
                "figures/deletion_insertion.png", "figures/randomisation.png",
                "figures/maps.png"}
    written = {path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file()}
    assert written == expected
    assert {path.relative_to(folder).as_posix() for path in files.values()} == expected
    for name in ("deletion_insertion", "randomisation", "maps"):
        pixels = imread(folder / "figures" / f"{name}.png")
        assert pixels.ndim == 3 and min(pixels.shape[:2]) > 100
        assert pixels.std() > 0.01  # something was drawn
    with open(folder / "curves.csv", encoding="utf-8") as handle:
        curves = list(csv.DictReader(handle))
    assert len(curves) == FAST.steps + 1
    assert float(curves[0]["fraction"]) == 0 and float(curves[-1]["fraction"]) == 1
    np.testing.assert_allclose([float(row["deletion"]) for row in curves],
                               full_report.deletion.scores[0], rtol=1e-5)
    with open(folder / "summary.csv", encoding="utf-8") as handle:
        summary = list(csv.DictReader(handle))
    assert [row["check"] for row in summary] == [row.check for row in full_report.rows()]
    assert {row["verdict"] for row in summary} <= {"pass", "FAIL", "info"}
    with open(folder / "randomisation.csv", encoding="utf-8") as handle:
        assert len(list(csv.DictReader(handle))) == len(full_report.randomisation.steps)
    numbers = json.loads((folder / "report.json").read_text(encoding="utf-8"))
    assert numbers["deletion"]["auc"] == pytest.approx(float(full_report.deletion.auc[0]))
    assert numbers["region"]["score_drop"] > 0
    assert numbers["passed"] == full_report.passed
    provenance = json.loads((folder / "provenance.json").read_text(encoding="utf-8"))
    assert provenance["method"] == "gradcam" and provenance["model"] == full_report.model_name
    assert provenance["layers"] == [full_report.layer]
    stored = np.load(folder / "maps.npz")
    np.testing.assert_array_equal(stored["map_gradcam"], full_report.cam)
    np.testing.assert_array_equal(stored["region_mask"], full_report.region_mask)
    # an existing report is not overwritten by accident
    with pytest.raises(FileExistsError, match="overwrite=True"):
        full_report.export(folder)
    assert full_report.export(folder, overwrite=True)["report_json"].is_file()


def test_export_numbers_only_and_bad_folder(tiny: Subject, tmp_path: Path) -> None:
    report = run_evidence(tiny.module, tiny.x, layer=tiny.layer, checks=("deletion",),
                          settings=FAST)
    files = report.export(tmp_path / "numbers", figures=False, maps=False)
    assert "maps_png" not in files and not (tmp_path / "numbers" / "figures").exists()
    assert set(files) == {"summary_csv", "summary_txt", "report_json", "provenance_json",
                          "curves_csv"}
    assert not (tmp_path / "numbers" / "maps.npz").exists()
    a_file = tmp_path / "file.txt"
    a_file.write_text("x", encoding="utf-8")
    with pytest.raises(NotADirectoryError, match="give a folder"):
        report.export(a_file)


# --------------------------------------------------------------------------------------------
# Progress, cancel, model state


def test_job_reports_every_stage_in_order(tiny: Subject) -> None:
    job = evidence_job(tiny.module, tiny.x, layer=tiny.layer, target=1,
                       checks=("insertion", "occlusion", "deletion"), settings=FAST)
    yielded = []
    try:
        while True:
            yielded.append(next(job))
    except StopIteration as finished:
        report = finished.value
    stages = list(dict.fromkeys(stage for _, _, stage in yielded))  # in order of first sight
    assert stages == ["map", "deletion", "insertion", "occlusion", "done"]
    # within a check the job yields per batch (the deletion curve: 21 points x 3 orders)
    assert sum(1 for *_, stage in yielded if stage == "deletion") > 3
    dones = [done for done, _, _ in yielded]
    totals = {total for _, total, _ in yielded}
    assert dones == sorted(dones) and len(totals) == 1 and dones[-1] == totals.pop()
    assert report.checks == ("deletion", "insertion", "occlusion")
    assert report.randomisation is None and set(report.maps) == {"gradcam", "occlusion"}


def test_cancel_midway_raises_cancelled_and_writes_nothing(tiny: Subject, tmp_path: Path) -> None:
    model = tiny.module
    model.train()  # a state the run must restore
    seen: list[tuple[int, int, str]] = []

    def stop() -> bool:  # stop inside the deletion check, after a few batches
        return sum(1 for *_, stage in seen if stage == "deletion") > 3

    folder = tmp_path / "never"
    with pytest.warns(UserWarning, match="training mode"), pytest.raises(Cancelled):
        run_evidence(model, tiny.x, layer=tiny.layer, target=1, settings=FAST,
                     export_folder=folder, progress=lambda *p: seen.append(p),
                     should_stop=stop)
    assert not folder.exists()
    assert {stage for *_, stage in seen} == {"map", "deletion"}
    assert model.training and all(p.requires_grad for p in model.parameters())
    assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())
    model.eval()


def test_progress_moves_forward_once_per_step_and_ends_at_the_total(tiny: Subject) -> None:
    seen: list[tuple[int, int, str]] = []
    run_evidence(tiny.module, tiny.x, layer=tiny.layer, target=1, settings=FAST,
                 checks=("deletion", "randomisation"), progress=lambda *p: seen.append(p))
    counts = [done for done, _, _ in seen]
    assert counts == sorted(counts)  # never backwards
    assert all(a != b for a, b in itertools.pairwise(seen))  # no report twice
    assert seen[-1] == (seen[-1][1], seen[-1][1], "done")


# --------------------------------------------------------------------------------------------
# A model card: raw data through the card's preprocessing, provenance from the card


def test_loaded_model_preprocesses_raw_data_like_the_bare_module(tiny: Subject,
                                                                 tmp_path: Path) -> None:
    save_file(tiny.module.state_dict(), tmp_path / "tiny.safetensors")
    card = tmp_path / "tiny.yaml"
    card.write_text(
        "name: tiny-squares\narchitecture: resnet_like\n"
        "architecture_kwargs: {spatial_dims: 2, in_channels: 1, num_classes: 2, "
        "widths: [4, 8, 8]}\nweights: tiny.safetensors\nspatial_dims: 2\nin_channels: 1\n"
        "task: classification\nclass_names: [noise, square]\ntarget_layer: features.3\n"
        "preprocessing:\n  - {op: normalize, mean: 2.0, std: 4.0}\n",
        encoding="utf-8",
    )
    loaded = load_model(card)
    raw = tiny.x[0, 0] * 4.0 + 2.0  # what the card's normalisation maps back to tiny.x
    checks = ("deletion", "saliency")
    from_card = run_evidence(loaded, raw, checks=checks, settings=FAST)
    from_module = run_evidence(tiny.module, tiny.x, layer="features.3", checks=checks,
                               settings=FAST)
    np.testing.assert_allclose(from_card.cam, from_module.cam, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(from_card.deletion.scores, from_module.deletion.scores,
                               rtol=1e-4, atol=1e-6)
    assert from_card.target == "predicted: square (class 1)"
    assert from_card.provenance["model"] == "tiny-squares"
    assert from_card.provenance["weights_sha256"] == loaded.weights_sha256
    assert from_card.provenance["preprocessing"] == [{"op": "normalize", "mean": 2.0, "std": 4.0}]
    np.testing.assert_array_equal(from_card.image, raw.astype(np.float32))


# --------------------------------------------------------------------------------------------
# Other dimensions and region kinds


@pytest.mark.parametrize("spatial_dims", [1, 3])
def test_one_and_three_dimensional_reports_export(spatial_dims: int, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_architecture("resnet_like", spatial_dims=spatial_dims, in_channels=1,
                               num_classes=3, widths=(2, 4)).eval()
    shape = (64,) if spatial_dims == 1 else (12, 12, 12)
    x = torch.rand(1, 1, *shape, generator=torch.Generator().manual_seed(2))
    mask = np.zeros(shape, dtype=bool)
    mask[(slice(2, 6),) * spatial_dims] = True
    report = run_evidence(model, x, checks=("deletion", "randomisation", "occlusion"),
                          region_mask=mask, settings=FAST)
    assert report.cam.shape == shape and report.maps["occlusion"].shape == shape
    files = report.export(tmp_path / f"{spatial_dims}d")
    assert files["maps_png"].stat().st_size > 1000
    assert files["randomisation_png"].stat().st_size > 1000


def test_forbidden_region_energy_is_judged_against_the_threshold(tiny: Subject) -> None:
    cam = run_evidence(tiny.module, tiny.x, layer=tiny.layer, target=1, checks=(),
                       settings=FAST).cam
    hot = cam > np.median(cam)  # where the map is: more than half of its energy
    cold = np.zeros_like(hot)
    cold.ravel()[np.argsort(cam.ravel())[: cam.size // 10]] = True
    over = run_evidence(tiny.module, tiny.x, layer=tiny.layer, target=1, checks=(),
                        region_mask=hot, region_kind="forbidden", settings=FAST)
    under = run_evidence(tiny.module, tiny.x, layer=tiny.layer, target=1, checks=(),
                         region_mask=cold, region_kind="forbidden", settings=FAST)
    assert over.forbidden.exceeded and over.region_energy > 0.5
    assert "forbidden region" in over.forbidden.message
    assert not under.forbidden.exceeded and under.region_energy < 0.2
    verdict = {row.check: row.passed for row in over.rows()}
    assert verdict["Forbidden region"] is False
    assert {row.check: row.passed for row in under.rows()}["Forbidden region"] is True
    assert not over.passed


def test_segmentation_model_with_a_region_target(tmp_path: Path) -> None:
    torch.manual_seed(0)
    unet = build_architecture("unet", spatial_dims=2, in_channels=1, num_classes=3,
                              widths=(4, 8)).eval()
    x = torch.rand(1, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    region = np.zeros((16, 16), dtype=bool)
    region[4:10, 4:10] = True
    report = run_evidence(unet, x, layer="down1", target=SegmentationRegion(2, region),
                          checks=("deletion", "saliency"), settings=FAST)
    assert report.target_index == 2 and "class 2" in report.target
    assert report.deletion.score_kind == "target function"
    with pytest.raises(EvidenceError, match="segmentation"):
        run_evidence(unet, x, layer="down1", checks=("deletion",))


# --------------------------------------------------------------------------------------------
# Bad input: a clear message, nothing computed


@pytest.mark.parametrize(("kwargs", "error", "message"), [
    ({"checks": ("deletion", "deletionn")}, EvidenceError, "unknown check"),
    ({"checks": ("region",)}, EvidenceError, "needs a region mask"),
    ({"target": "all"}, EvidenceError, "one class at a time"),
    ({"target": 7}, EvidenceError, "out of range"),
    ({"target": True}, TypeError, "boolean"),
    ({"layer": "features.9"}, EvidenceError, "not in the model"),
    ({"method": "gradcan"}, EvidenceError, "unknown method"),
    ({"region_mask": np.ones((5, 5), bool)}, EvidenceError, "must match"),
    ({"region_mask": np.zeros((SIZE, SIZE), bool)}, EvidenceError, "empty"),
    ({"region_mask": np.ones((SIZE, SIZE), bool)}, EvidenceError, "whole image"),
    ({"region_kind": "scale bar"}, EvidenceError, "region_kind"),
])
def test_bad_choices_are_refused_before_any_work(tiny: Subject, kwargs: dict, error: type,
                                                 message: str) -> None:
    options = {"layer": tiny.layer, **kwargs}
    with pytest.raises(error, match=message):
        evidence_job(tiny.module, tiny.x, **options)


def test_bad_inputs_are_refused(tiny: Subject) -> None:
    with pytest.raises(EvidenceError, match="one sample"):
        evidence_job(tiny.module, np.concatenate([tiny.x, tiny.x]), layer=tiny.layer)
    bad = tiny.x.copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(EvidenceError, match="NaN"):
        evidence_job(tiny.module, bad, layer=tiny.layer)
    with pytest.raises(TypeError, match="LoadedModel"):
        evidence_job("micrograph-classifier", tiny.x)
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        EvidenceSettings(steps=0)
