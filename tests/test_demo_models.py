"""The shipped demo models: they load, they are as good as their cards say, and they can be
retrained by the training script."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from napari_gradcam.core.architectures import build_architecture
from napari_gradcam.samples.demo_models import (
    EVAL_SEED,
    RECIPES,
    ZOO_DIR,
    evaluate_model,
    get_recipe,
    load_demo_model,
    train_model,
)

REPO = Path(__file__).resolve().parents[1]
NAMES = list(RECIPES)

# held-out samples per class for the reproduction check: small enough to be fast, large enough
# that the tolerance below is about three standard errors of an accuracy near 0.9
SMALL_SET = {"micrograph-classifier": 40, "ct-patch-classifier": 20, "ct-slice-unet": 20,
             "xrd-phase-classifier": 40}
TOLERANCE = 0.12


def _card(name: str) -> dict:
    return yaml.safe_load((ZOO_DIR / f"{name}.yaml").read_text(encoding="utf-8"))


@pytest.mark.parametrize("name", NAMES)
def test_shipped_card_matches_its_recipe_and_weights_load(name: str) -> None:
    card = _card(name)
    recipe = get_recipe(name)
    assert card["name"] == name
    assert tuple(card["class_names"]) == recipe.class_names
    assert card["preprocessing"] == recipe.preprocessing
    weights = ZOO_DIR / card["weights"]
    assert weights.suffix == ".safetensors"
    assert weights.stat().st_size < 5 * 1024 * 1024
    model = build_architecture(card["architecture"], **card["architecture_kwargs"])
    model.load_state_dict(load_file(str(weights)), strict=True)
    assert card["target_layer"] in dict(model.named_modules())
    # the card records what was measured, and what it claims is a model worth shipping
    metrics = card["metrics"]
    if card["task"] == "classification":
        assert metrics["accuracy"] >= 0.85
    else:
        assert min(metrics["iou"]["pore"], metrics["iou"]["crack"]) >= 0.5


@pytest.mark.parametrize("name", NAMES)
def test_shipped_cards_pass_the_model_card_validator(name: str) -> None:
    model_card = pytest.importorskip("napari_gradcam.core.model_card")
    card = model_card.ModelCard.from_yaml(ZOO_DIR / f"{name}.yaml")
    assert card.weights_path == (ZOO_DIR / _card(name)["weights"]).resolve()
    assert card.weights_path.is_file()


@pytest.mark.parametrize("name", NAMES)
def test_shipped_model_reproduces_its_card_on_a_small_seeded_set(name: str) -> None:
    torch.set_num_threads(2)
    claimed = _card(name)["metrics"]
    measured = evaluate_model(name, per_class=SMALL_SET[name], seed=EVAL_SEED)
    if "accuracy" in claimed:
        assert measured["accuracy"] == pytest.approx(claimed["accuracy"], abs=TOLERANCE)
    else:
        for class_name in ("pore", "crack"):
            assert measured["iou"][class_name] == pytest.approx(
                claimed["iou"][class_name], abs=TOLERANCE
            )
    for class_name, loc in measured["localisation"].items():
        card_loc = claimed["localisation"][class_name]
        # fewer samples: allow a wider band, but the heat map must still find the defect
        assert loc["pointing_game"] >= card_loc["pointing_game"] - 0.2, class_name
        assert loc["energy_share"] > loc["mask_area_share"], class_name


@pytest.mark.parametrize("name", ["micrograph-classifier", "ct-patch-classifier"])
def test_card_pointing_game_meets_the_target_for_defect_classes(name: str) -> None:
    localisation = _card(name)["metrics"]["localisation"]
    defect_classes = [c for c in localisation if c in ("crack", "pore", "precipitates")]
    assert defect_classes
    for class_name in defect_classes:
        assert localisation[class_name]["pointing_game"] >= 0.8, class_name


def test_training_script_retrains_a_model_quickly(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    subprocess.run(
        [sys.executable, str(REPO / "scripts" / "train_demo_models.py"),
         "--models", "xrd-phase-classifier", "--quick", "--out", str(tmp_path)],
        check=True, capture_output=True, text=True, env=env, timeout=120,
    )
    card = yaml.safe_load((tmp_path / "xrd-phase-classifier.yaml").read_text())
    assert card["training"]["steps"] == 5 and "metrics" not in card
    trained = load_file(str(tmp_path / card["weights"]))
    torch.manual_seed(0)  # the script's initialisation before its first step
    initial = build_architecture(card["architecture"], **card["architecture_kwargs"]).state_dict()
    assert trained.keys() == initial.keys()
    changed = [k for k in trained if not torch.equal(trained[k], initial[k])]
    assert "classifier.weight" in changed


def test_segmenter_trains_and_evaluates_end_to_end(tmp_path: Path) -> None:
    card_path = train_model("ct-slice-unet", steps=3, out_dir=tmp_path, train_per_class=3,
                            log=None)
    model, card = load_demo_model("ct-slice-unet", tmp_path)
    assert card_path.name == "ct-slice-unet.yaml" and card["task"] == "segmentation"
    result = evaluate_model("ct-slice-unet", model, per_class=2, seed=1)
    assert set(result["iou"]) == {"background", "pore", "crack"}
    for loc in result["localisation"].values():
        assert 0.0 <= loc["pointing_game"] <= 1.0 and 0.0 <= loc["energy_share"] <= 1.0
        assert loc["n"] >= 1


def test_soft_dice_loss_is_one_minus_the_dice_of_the_class_probability() -> None:
    from napari_gradcam.samples.demo_models import soft_dice_loss

    # two pixels, three classes; logits 0 / log(2) / log(5) give softmax 1/8, 2/8, 5/8
    logits = torch.log(torch.tensor([1.0, 2.0, 5.0]))[None, :, None, None].expand(1, 3, 1, 2)
    target = torch.tensor([[[2, 0]]])  # the first pixel is crack, the second background
    # Dice = (2 * 5/8 + 1) / ((5/8 + 5/8) + 1 + 1), smoothed by 1 in numerator and denominator
    expected = 1.0 - (2 * 5 / 8 + 1) / (10 / 8 + 1 + 1)
    assert soft_dice_loss(logits, target, 2).item() == pytest.approx(expected)
    # a confident, right prediction scores (almost) 0, the same one for the wrong class ~1
    confident = torch.tensor([[0.0, 0.0, 30.0], [30.0, 0.0, 0.0]]).T.reshape(1, 3, 1, 2)
    assert soft_dice_loss(confident, target, 2).item() < 1e-6
    assert soft_dice_loss(confident, torch.tensor([[[0, 2]]]), 2).item() > 0.6


def test_fine_tuning_records_both_stages_and_the_dice_term(tmp_path: Path) -> None:
    first = train_model("ct-slice-unet", steps=2, out_dir=tmp_path / "a", train_per_class=2,
                        log=None)
    weights = first.parent / get_recipe("ct-slice-unet").weights
    card_path = train_model("ct-slice-unet", steps=2, out_dir=tmp_path / "b",
                            train_per_class=2, init_from=weights, dice_weight=0.5, lr=1e-4,
                            seed=1, log=None)
    training = yaml.safe_load(card_path.read_text(encoding="utf-8"))["training"]
    assert training["init_from"] == weights.name and training["seed"] == 1
    assert training["loss"] == "cross_entropy + 0.5 * soft Dice (crack)"
    assert training["init_training"]["steps"] == 2 and training["init_training"]["seed"] == 0
    with pytest.raises(ValueError, match="dice_weight needs a segmentation model"):
        train_model("xrd-phase-classifier", steps=1, out_dir=tmp_path / "c",
                    train_per_class=1, dice_weight=1.0, log=None)


def test_dice_over_several_classes_and_class_weights_are_recorded(tmp_path: Path) -> None:
    card_path = train_model("ct-slice-unet", steps=2, out_dir=tmp_path, train_per_class=2,
                            dice_weight=0.5, dice_class=(1, 2), class_weights=(1.0, 1.0, 1.0),
                            log=None)
    training = yaml.safe_load(card_path.read_text(encoding="utf-8"))["training"]
    assert training["loss"] == "cross_entropy + 0.5 * soft Dice (pore, crack, mean)"
    assert training["class_weights"] == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="one weight per class"):
        train_model("ct-slice-unet", steps=1, out_dir=tmp_path, train_per_class=1,
                    class_weights=(1.0, 2.0), log=None)


def test_demo_model_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown demo model 'resnet50'"):
        get_recipe("resnet50")
    with pytest.raises(FileNotFoundError, match="train it with"):
        load_demo_model("micrograph-classifier", tmp_path)
    with pytest.raises(ValueError, match="steps"):
        train_model("xrd-phase-classifier", steps=0, out_dir=tmp_path, log=None)
    assert np.isfinite(EVAL_SEED)


@pytest.mark.parametrize("name", NAMES)
def test_demo_model_loads_by_name_and_agrees_with_the_training_path(name: str) -> None:
    # the GUI/CLI path (card -> Preprocessor -> model) must see the data exactly as training did
    from napari_gradcam.core.models import load_model

    loaded = load_model(name)
    assert loaded.card.name == name and loaded.target_layer == _card(name)["target_layer"]
    recipe = get_recipe(name)
    data = recipe.make_data(2, 7)
    reference, _ = load_demo_model(name)
    with torch.no_grad():
        ours = reference(recipe.preprocessor()(data.images))
        theirs = loaded.model(loaded.preprocess(data.images))
    torch.testing.assert_close(theirs, ours)


def test_ct_classifier_finds_the_crack_in_a_whole_volume_by_windows() -> None:
    from napari_gradcam.samples.demo_models import evaluate_volume_windows

    torch.set_num_threads(2)
    result = evaluate_volume_windows(1, shape=(64, 64, 64), seed=1)
    crack = result["localisation"]["crack"]
    assert crack["n"] == 1 and result["layer"] == _card("ct-patch-classifier")["target_layer"]
    # the blended volume map peaks on (or right next to) the crack, and holds several times its
    # share of the volume near the crack
    assert crack["peak_distance_vox"][0] <= 3.0
    assert crack["energy_share"] > 3 * crack["mask_area_share"]


@pytest.mark.parametrize("name", NAMES)
def test_cards_record_the_training_inputs_statistics(name: str) -> None:
    # what the out-of-domain check compares a user's data with: the training inputs as the
    # model saw them (after the card's preprocessing), computed by core.domain's own function
    from napari_gradcam.core.domain import input_statistics

    stats = _card(name)["training_statistics"]
    recipe = get_recipe(name)
    histogram = stats["histogram"]
    assert len(histogram["edges"]) == 33 and len(histogram["counts"]) == 32
    assert sum(histogram["counts"]) == pytest.approx(1.0, abs=1e-6)
    assert stats["percentiles"]["p1"] <= stats["percentiles"]["p50"] <= stats["percentiles"]["p99"]
    assert stats["std"] > 0 and stats["noise_sigma"] > 0 and stats["preprocessed"]
    assert stats["spatial_dims"] == recipe.spatial_dims
    if recipe.input_size is not None:
        assert stats["input_size"] == recipe.input_size
    if name.startswith("ct-"):
        voxels = stats["voxel_size_range"]
        assert len(voxels["min"]) == len(voxels["max"]) == recipe.spatial_dims
        assert all(a < b for a, b in zip(voxels["min"], voxels["max"], strict=True))
    # the numbers describe the training data: a fresh draw of it lands on them
    fresh = recipe.make_data(4, 12345)
    again = input_statistics(fresh.images, spatial_dims=recipe.spatial_dims,
                             preprocess=recipe.preprocessor(), sample=12)
    assert abs(again["mean"] - stats["mean"]) < 0.5 * stats["std"]
    assert abs(again["percentiles"]["p50"] - stats["percentiles"]["p50"]) < stats["std"]


def test_ct_unet_generalises_to_the_heldout_family() -> None:
    # a volume from the independent generator (blob pores, branched cracks, other artefacts,
    # grey scale and voxel size) the U-Net never trained on; the README's figures come from
    # eight larger ones, this small one must land near them
    from napari_gradcam.samples.demo_models import evaluate_unet_volumes

    torch.set_num_threads(2)
    claimed = _card("ct-slice-unet")["metrics"]["heldout_volumes"]
    measured = evaluate_unet_volumes(1, shape=(48, 96, 96))
    assert measured["family"] == "heldout"
    assert measured["layer"] == _card("ct-slice-unet")["target_layer"]
    # one small volume's IoU spreads widely from seed to seed (pore 0.41-0.81 over the first
    # three seeds for the shipped weights), so it is held to a floor far above the shortcut
    # model's (pore 0.21, crack 0.02 on the eight volumes) rather than to the card's mean
    for class_name in ("pore", "crack"):
        assert measured["iou"][class_name] >= min(claimed["iou"][class_name] - 0.15, 0.6), (
            class_name)
    crack = measured["localisation"]["crack"]
    assert crack["n"] >= 5
    assert crack["pointing_game"] >= claimed["localisation"]["crack"]["pointing_game"] - 0.2
    assert crack["energy_share"] >= claimed["localisation"]["crack"]["energy_share"] - 0.15
    # the crack map sits on the crack, not on the pores (the shortcut of the first U-Net)
    assert crack["energy_share"] > 5 * crack["energy_share_other_defect"]


def test_ct_classifier_finds_the_crack_in_a_heldout_volume_by_windows() -> None:
    from napari_gradcam.samples.demo_models import evaluate_volume_windows

    torch.set_num_threads(2)
    result = evaluate_volume_windows(1, family="heldout", shape=(64, 96, 96))
    crack = result["localisation"]["crack"]
    assert crack["n"] == 1 and result["family"] == "heldout"
    assert crack["pointing_game"] == 1.0, crack["peak_distance_vox"]
    assert crack["energy_share_near"] > 3 * crack["near_area_share"]


def test_worm_pores_are_thin_connected_chains_and_lie_beside_the_crack() -> None:
    from scipy import ndimage

    from napari_gradcam.samples.ct_randomised import (
        make_randomised_ct_slice_patches,
        random_worm_pore,
    )

    rng = np.random.default_rng(5)
    for _ in range(20):
        parts = random_worm_pore(rng, np.zeros(3))
        centres = np.array([part.centre for part in parts])
        radii = np.array([part.radii[0] for part in parts])
        assert np.all((radii >= 0.6 * 0.7) & (radii <= 2.0 * 1.3))
        # neighbouring spheres overlap (one connected pore), and the path is 8-25 um long (less
        # the last step, at most half the largest lump, 1.3 um)
        steps = np.linalg.norm(np.diff(centres, axis=0), axis=1)
        assert np.all(steps < radii[:-1] + radii[1:])
        assert 8.0 - 1.3 <= steps.sum() < 25.0
    # the label contract holds with worms; in mixed patches, pore pixels lie near the crack
    slices = make_randomised_ct_slice_patches(n=24, size=48, seed=3, extent=96, worm_share=1.0)
    gaps = []
    for kind, mask in zip(slices.classes, slices.masks, strict=True):
        assert set(np.unique(mask)) - {0} == [set(), {1}, {2}, {1, 2}][kind]
        if kind == 3:
            gaps.append(ndimage.distance_transform_edt(mask != 2)[mask == 1].min())
    assert np.median(gaps) <= 8.0


def test_surface_cracks_open_at_the_specimen_surface() -> None:
    from napari_gradcam.samples.ct_randomised import (
        make_randomised_ct_slice_patches,
        random_specimen,
        surface_crack_object,
    )
    from napari_gradcam.samples.ct_volume import render_ct

    rng = np.random.default_rng(11)
    reach = []
    for _ in range(10):
        specimen, _, _ = random_specimen(rng, 96)
        phi = rng.uniform(0, 2 * np.pi)
        z_um = 40.0
        specimen.cracks.extend(surface_crack_object(rng, specimen, phi, z_um))
        z_index = round(z_um / specimen.voxel_um[0])
        shape = (1, 192, 192)  # the whole slice, the specimen's surface included
        origin = (z_index, int(specimen.axis_yx[0]) - 96, int(specimen.axis_yx[1]) - 96)
        _, labels = render_ct(specimen, origin, shape, rng, 0.0, 0.0)
        y, x = np.nonzero(labels[0] == 2)
        if len(y):
            r = np.hypot(y + origin[1] - specimen.axis_yx[0], x + origin[2] - specimen.axis_yx[1])
            reach.append(specimen.radius - r.max())
    # most slices through the crack's origin show it reaching the surface (its mouth)
    assert len(reach) >= 7 and np.mean(np.asarray(reach) <= 2.0) >= 0.7
    slices = make_randomised_ct_slice_patches(n=16, size=48, seed=2, extent=96,
                                              surface_share=1.0)
    for kind, mask in zip(slices.classes, slices.masks, strict=True):
        assert set(np.unique(mask)) - {0} == [set(), {1}, {2}, {1, 2}][kind]


def test_classifier_trains_on_several_sizes_with_equal_pixels_per_step(tmp_path: Path) -> None:
    # a classifier with global average pooling that should read any image size learns from
    # several sizes; each step holds about as many pixels as a batch of the smallest size
    recipe = get_recipe("micrograph-classifier")
    assert recipe.train_sizes and recipe.input_size == [128, 128]
    assert [recipe.batch_for(s, 32) for s in (64, 128, 256)] == [32, 8, 2]
    card_path = train_model("micrograph-classifier", steps=3, out_dir=tmp_path,
                            train_per_class=2, log=None)
    card = yaml.safe_load(card_path.read_text(encoding="utf-8"))
    assert card["training"]["train_sizes"] == list(recipe.train_sizes)
    assert card["training"]["batch_size_by_size"][256] == 2
    # the statistics the out-of-domain check reads are those of the input_size set
    assert card["training_statistics"]["input_size"] == recipe.input_size
    model, _ = load_demo_model("micrograph-classifier", tmp_path)
    with torch.no_grad():
        for size in recipe.train_sizes:
            assert model(torch.zeros(1, 1, size, size)).shape == (1, 3)


def test_micrograph_classifier_reads_the_sample_and_heldout_micrographs() -> None:
    # the case: the first classifier (64x64 patches of one look) called the 256x256
    # sample "clean" (0.70) with its crack in plain sight. The shipped one must call it crack
    # with its crack map on the crack, and do the same on micrographs of the independent
    # generator it never trained on (fresh seeds, not the card's)
    from napari_gradcam.samples import MICROGRAPH_HELDOUT_SEED_BASE
    from napari_gradcam.samples.demo_models import evaluate_micrograph_heldout

    torch.set_num_threads(2)
    claimed = _card("micrograph-classifier")["metrics"]["heldout_micrographs"]
    measured = evaluate_micrograph_heldout(4, sizes=(256,),
                                           seed=MICROGRAPH_HELDOUT_SEED_BASE + 50_000)
    sample = measured["sample"]
    assert sample["predicted"] == "crack", sample["probabilities"]
    assert sample["crack_pointing_hit"]
    assert measured["n"] == 12
    assert measured["accuracy"] >= claimed["accuracy"] - 0.25
    crack = measured["localisation"]["crack"]
    # (the first classifier: 0 of 4 here, 0.20 over the card's 40 held-out crack images)
    assert crack["n"] == 4 and crack["pointing_game"] >= 0.5
    assert crack["energy_share"] > 3 * crack["mask_area_share"]
