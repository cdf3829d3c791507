"""Recipes for the shipped demo models: their data, card, training and evaluation.

One recipe per model keeps the three things that must agree in one place: the generator the
model learns from, the preprocessing written into its card, and the evaluation that measures
its accuracy and whether its Grad-CAM points at the defect. ``scripts/train_demo_models.py``
and ``scripts/evaluate_demo_models.py`` are thin command lines over :func:`train_model` and
:func:`evaluate_model`; the tests call the same functions.

Everything runs on the CPU with a fixed seed, so retraining reproduces the shipped weights up
to floating-point differences between machines.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from napari_gradcam.core.architectures import build_architecture
from napari_gradcam.core.preprocess import Preprocessor
from napari_gradcam.samples.ct_volume import (
    CT_CLASSES,
    CT_LABELS,
    CT_WINDOW,
    make_ct_patches,
    make_ct_slice_patches,
)
from napari_gradcam.samples.metrics import energy_share, iou_per_class, pointing_hits
from napari_gradcam.samples.micrographs import (
    MICROGRAPH_CLASSES,
    PatchSet,
    make_micrograph_patches,
)
from napari_gradcam.samples.spectra import SPECTRA_CLASSES, make_spectra_dataset

ZOO_DIR = Path(__file__).resolve().parents[1] / "zoo"
"""Where the shipped cards and weights live (``src/napari_gradcam/zoo``)."""

POINTING_TOLERANCE_PX = 2.0
"""Pointing-game tolerance in pixels, voxels or spectrum points (a hit is a map maximum at most
this far from the mask; for spectra the mask already spans each peak +- one FWHM)."""

EVAL_SEED = 20240
"""Seed of the held-out evaluation data (training uses ``seed``, default 0: disjoint data)."""


@dataclass(frozen=True)
class Recipe:
    """Everything needed to train, describe and evaluate one demo model.

    ``make_data(n, seed)`` returns a :class:`PatchSet` with about ``n`` samples per class (for
    the segmenter: ``n`` slices per kind). ``defect_labels`` maps a class id to the mask value
    that marks its object (pointing game and energy share are computed for those classes).
    ``flip_axes`` are the spatial axes on which a random flip is a valid augmentation.
    """

    name: str
    weights: str
    description: str
    architecture_kwargs: dict[str, Any]
    task: str
    class_names: tuple[str, ...]
    target_layer: str
    input_size: list[int] | None
    preprocessing: list[dict[str, Any]]
    make_data: Callable[[int, int], PatchSet]
    train_per_class: int
    eval_per_class: int
    steps: int
    batch_size: int
    lr: float
    defect_labels: dict[int, int]
    flip_axes: tuple[int, ...] = ()
    transpose: bool = False
    class_weights: tuple[float, ...] | None = None
    loss: str = "one_vs_rest"
    architecture: str = "resnet_like"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def spatial_dims(self) -> int:
        return int(self.architecture_kwargs["spatial_dims"])

    def preprocessor(self) -> Preprocessor:
        return Preprocessor(self.preprocessing, spatial_dims=self.spatial_dims, in_channels=1)


def _slice_data(n: int, seed: int) -> PatchSet:
    return make_ct_slice_patches(3 * n, size=64, seed=seed)


_CT_PREPROCESSING = [
    {"op": "window", "min": CT_WINDOW[0], "max": CT_WINDOW[1]},
    {"op": "normalize", "mean": 0.5, "std": 0.25},
]

RECIPES: dict[str, Recipe] = {
    recipe.name: recipe
    for recipe in (
        Recipe(
            name="micrograph-classifier",
            weights="micrograph_classifier.safetensors",
            description=(
                "Steel micrograph patches (64x64, grey): clean / precipitates / crack. Trained "
                "on synthetic ferrite-pearlite micrographs."
            ),
            architecture_kwargs={
                "spatial_dims": 2, "in_channels": 1, "num_classes": 3, "widths": [8, 16, 32]
            },
            task="classification",
            class_names=MICROGRAPH_CLASSES,
            target_layer="features.3",
            input_size=[64, 64],
            # a fixed window, not a per-patch percentile clip: with percentile clipping the
            # bright precipitates / dark crack shift the whole patch's grey levels, and the
            # network learned that global shift instead of the defect (Grad-CAM showed it,
            # pointing game 0.0 for precipitates)
            preprocessing=[
                {"op": "window", "min": 0.0, "max": 255.0},
                {"op": "normalize", "mean": 0.5, "std": 0.25},
            ],
            make_data=lambda n, seed: make_micrograph_patches(n, size=64, seed=seed,
                                                              dtype="uint8"),
            train_per_class=500,
            eval_per_class=100,
            steps=300,
            batch_size=32,
            lr=3e-3,
            defect_labels={1: 1, 2: 2},
            flip_axes=(0, 1),
            transpose=True,
        ),
        Recipe(
            name="ct-patch-classifier",
            weights="ct_patch_classifier.safetensors",
            description=(
                "X-ray CT patches (32^3 voxels, uint16 grey): none / pore / crack. Slide it over "
                "a volume in windows; trained on synthetic specimens with rings and cupping."
            ),
            # narrow on purpose: 3D convolutions at 32^3 dominate the CPU training time
            architecture_kwargs={
                "spatial_dims": 3, "in_channels": 1, "num_classes": 3, "widths": [4, 8, 16]
            },
            task="classification",
            class_names=CT_CLASSES,
            # features.1 (full 32^3 resolution) rather than a strided stage: a crack is only 2-3
            # voxels thick and the maxima of features.2 (16^3) and features.3 (8^3) land 2-3
            # voxels beside it (crack pointing game 0.75 / 0.77 there, 0.98 here)
            target_layer="features.1",
            input_size=[32, 32, 32],
            preprocessing=_CT_PREPROCESSING,
            make_data=lambda n, seed: make_ct_patches(n, size=32, seed=seed),
            train_per_class=300,
            eval_per_class=60,
            steps=300,
            batch_size=16,
            lr=3e-3,
            defect_labels={1: 1, 2: 2},
            flip_axes=(0, 1, 2),
            transpose=False,
        ),
        Recipe(
            name="ct-slice-unet",
            weights="ct_slice_unet.safetensors",
            description=(
                "U-Net segmenting pores and cracks in X-ray CT slices (any size divisible by 4): "
                "background / pore / crack. For Seg-Grad-CAM."
            ),
            architecture="unet",
            architecture_kwargs={
                "spatial_dims": 2, "in_channels": 1, "num_classes": 3, "widths": [8, 16, 32]
            },
            task="segmentation",
            class_names=tuple(CT_LABELS.values()),
            target_layer="dec1",
            input_size=None,
            preprocessing=_CT_PREPROCESSING,
            make_data=_slice_data,
            train_per_class=300,
            eval_per_class=60,
            steps=500,
            batch_size=16,
            lr=3e-3,
            defect_labels={1: 1, 2: 2},
            flip_axes=(0, 1),
            transpose=True,
            class_weights=(0.3, 1.0, 1.5),
            loss="cross_entropy",
        ),
        Recipe(
            name="xrd-phase-classifier",
            weights="xrd_phase_classifier.safetensors",
            description=(
                "XRD patterns (1024 points, 2-theta 20-100 deg, Cu K-alpha): dominant phase "
                "ferrite / austenite / magnetite."
            ),
            # six stages: a convolution with global pooling cannot see *where* on the 2-theta
            # axis a peak is, only the peak pattern around it; telling ferrite from austenite
            # needs a receptive field that spans neighbouring peaks (three stages: accuracy 0.70)
            architecture_kwargs={
                "spatial_dims": 1,
                "in_channels": 1,
                "num_classes": 3,
                "widths": [8, 16, 32, 32, 32, 32],
            },
            task="classification",
            class_names=SPECTRA_CLASSES,
            # the deep stages are 8-32 points coarse and their maxima fall between peaks; the
            # stride-2 stage keeps the peaks apart
            target_layer="features.2",
            input_size=[1024],
            preprocessing=[{"op": "percentile_clip", "low": 0.0, "high": 100.0}],
            make_data=lambda n, seed: make_spectra_dataset(n, seed=seed),
            train_per_class=300,
            eval_per_class=100,
            steps=600,
            batch_size=32,
            lr=3e-3,
            defect_labels={0: 1, 1: 1, 2: 1},
        ),
    )
}


def get_recipe(name: str) -> Recipe:
    """The recipe called ``name`` (a ValueError lists the known names)."""
    try:
        return RECIPES[name]
    except KeyError:
        raise ValueError(
            f"unknown demo model {name!r}; demo models: {', '.join(RECIPES)}"
        ) from None


def _augment(batch: torch.Tensor, recipe: Recipe, generator: torch.Generator) -> torch.Tensor:
    """Random flips (and a transpose for square 2D patches), per batch: cheap and label-safe."""
    for axis in recipe.flip_axes:
        if torch.rand((), generator=generator) < 0.5:
            batch = batch.flip(2 + axis)
    if recipe.transpose and torch.rand((), generator=generator) < 0.5:
        batch = batch.transpose(-1, -2)
    return batch


def _loss(
    outputs: torch.Tensor, target: torch.Tensor, kind: str, weight: torch.Tensor | None
) -> torch.Tensor:
    """Softmax cross-entropy, or one-vs-rest binary cross-entropy on each class logit.

    Why one-vs-rest for the classifiers: softmax only constrains *differences* of logits, so
    with three classes a network may signal "crack" by lowering the "clean" logit rather than by
    raising its own, and Grad-CAM of the crack logit then points at the background. A sigmoid
    per class makes each logit a detector of its own class, so its gradient comes from the
    evidence for that class (prediction is still the arg-max of the logits).
    """
    if kind == "cross_entropy":
        return F.cross_entropy(outputs, target, weight=weight)
    if kind == "one_vs_rest":
        one_hot = F.one_hot(target, outputs.shape[1]).to(outputs.dtype)
        return F.binary_cross_entropy_with_logits(outputs, one_hot)
    raise ValueError(f"unknown loss {kind!r}; use 'cross_entropy' or 'one_vs_rest'")


def card_dict(recipe: Recipe, *, seed: int, steps: int, metrics: dict | None = None) -> dict:
    """The model card of a recipe as plain data, in the agreed field order."""
    card: dict[str, Any] = {
        "name": recipe.name,
        "description": recipe.description,
        "architecture": recipe.architecture,
        "architecture_kwargs": dict(recipe.architecture_kwargs),
        "weights": recipe.weights,
        "spatial_dims": recipe.spatial_dims,
        "in_channels": 1,
        "task": recipe.task,
        "class_names": list(recipe.class_names),
        "target_layer": recipe.target_layer,
        "input_size": recipe.input_size,
        "preprocessing": [dict(step) for step in recipe.preprocessing],
        "training": {
            "script": "scripts/train_demo_models.py",
            "seed": seed,
            "steps": steps,
            "batch_size": recipe.batch_size,
            "train_samples_per_class": recipe.train_per_class,
            "optimizer": f"AdamW lr={recipe.lr} one-cycle",
            "loss": recipe.loss,
            "data": f"napari_gradcam.samples (generator seed {seed})",
        },
    }
    if metrics:
        card["metrics"] = metrics
    return card


def train_model(
    name: str,
    steps: int | None = None,
    seed: int = 0,
    out_dir: str | Path = ZOO_DIR,
    *,
    train_per_class: int | None = None,
    num_threads: int = 2,
    log: Callable[[str], None] | None = print,
) -> Path:
    """Train the demo model ``name`` and write ``<weights>.safetensors`` and ``<name>.yaml``.

    ``steps`` and ``train_per_class`` default to the recipe's (a test passes a few steps and a
    few samples to check the pipeline in seconds). Returns the card's path. The card carries no
    ``metrics`` yet: :func:`evaluate_model` measures them and ``scripts/evaluate_demo_models.py
    --write-cards`` adds them.
    """
    from safetensors.torch import save_file

    recipe = get_recipe(name)
    steps = recipe.steps if steps is None else int(steps)
    per_class = recipe.train_per_class if train_per_class is None else int(train_per_class)
    if steps < 1 or per_class < 1:
        raise ValueError(f"steps and train_per_class must be >= 1, got {steps}, {per_class}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(num_threads)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    started = time.perf_counter()

    data = recipe.make_data(per_class, seed)
    inputs = recipe.preprocessor()(data.images)
    targets = torch.from_numpy(data.masks.astype(np.int64) if recipe.task == "segmentation"
                               else data.classes)
    model = build_architecture(recipe.architecture, **recipe.architecture_kwargs)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=1e-4)
    # (at least 10 scheduler steps: OneCycle divides by its warm-up length, 0 for tiny runs)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=recipe.lr, total_steps=max(steps, 10), pct_start=0.2
    )
    weight = None if recipe.class_weights is None else torch.tensor(recipe.class_weights)
    model.train()
    batch_size = min(recipe.batch_size, len(inputs))
    running = math.nan
    for step in range(steps):
        index = torch.randint(len(inputs), (batch_size,), generator=generator)
        batch, target = inputs[index], targets[index]
        if recipe.task == "segmentation":
            # the same geometric augmentation for images and label maps
            stacked = _augment(torch.cat([batch, target[:, None].float()], 1), recipe, generator)
            batch, target = stacked[:, :1], stacked[:, 1].round().long()
        else:
            batch = _augment(batch, recipe, generator)
        loss = _loss(model(batch), target, recipe.loss, weight)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        running = loss.item() if math.isnan(running) else 0.95 * running + 0.05 * loss.item()
        if log is not None and (step + 1) % max(steps // 10, 1) == 0:
            log(f"{name}: step {step + 1}/{steps} loss {running:.4f}")
    model.eval()

    weights_path = out_dir / recipe.weights
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, weights_path)
    card_path = out_dir / f"{recipe.name}.yaml"
    write_card(card_path, card_dict(recipe, seed=seed, steps=steps))
    if log is not None:
        log(f"{name}: {time.perf_counter() - started:.1f} s, wrote {weights_path}")
    return card_path


def write_card(path: Path, card: dict) -> None:
    """Write a card as YAML with the fields in the agreed order."""
    text = yaml.safe_dump(card, sort_keys=False, allow_unicode=True, default_flow_style=None)
    Path(path).write_text(text, encoding="utf-8")


def load_demo_model(name: str, zoo_dir: str | Path = ZOO_DIR) -> tuple[nn.Module, dict]:
    """Build a demo model from its card and safetensors weights (eval mode) and return it with
    the card as a dict. Plain loading on purpose: no pickle, no code from the card."""
    from safetensors.torch import load_file

    recipe = get_recipe(name)
    card_path = Path(zoo_dir) / f"{recipe.name}.yaml"
    if not card_path.is_file():
        raise FileNotFoundError(
            f"model card {card_path} not found; train it with scripts/train_demo_models.py"
        )
    card = yaml.safe_load(card_path.read_text(encoding="utf-8"))
    weights = card_path.parent / card["weights"]
    if not weights.is_file():
        raise FileNotFoundError(f"weights {weights} named by {card_path} not found")
    model = build_architecture(card["architecture"], **card["architecture_kwargs"])
    model.load_state_dict(load_file(str(weights)))
    return model.eval(), card


def evaluate_model(
    name: str,
    model: nn.Module | None = None,
    *,
    zoo_dir: str | Path = ZOO_DIR,
    per_class: int | None = None,
    seed: int = EVAL_SEED,
    batch_size: int = 32,
) -> dict[str, Any]:
    """Accuracy (or IoU) and Grad-CAM localisation of a demo model on fresh held-out data.

    Classifiers: ``accuracy``; for each defect class, the pointing game (Grad-CAM of the true
    class at the card's layer; hit = maximum within :data:`POINTING_TOLERANCE_PX` of the
    class's mask) and the mean energy share inside the mask, next to the mask's mean area share
    (the chance level). Segmenter: ``iou`` per class, and Seg-Grad-CAM (target: the class's
    logits inside the predicted region of that class) on slices that contain the class.
    """
    from napari_gradcam import GradCAM, SegmentationRegion

    recipe = get_recipe(name)
    if model is None:
        model, _ = load_demo_model(name, zoo_dir)
    model.eval()
    data = recipe.make_data(recipe.eval_per_class if per_class is None else per_class, seed)
    inputs = recipe.preprocessor()(data.images)
    with torch.no_grad():
        outputs = torch.cat([model(inputs[i:i + batch_size])
                             for i in range(0, len(inputs), batch_size)])
    predictions = outputs.argmax(1).numpy()
    tolerance = POINTING_TOLERANCE_PX
    cam = GradCAM(model, layer=recipe.target_layer)
    result: dict[str, Any] = {"n": len(data), "seed": seed, "layer": recipe.target_layer,
                              "pointing_tolerance_px": tolerance}
    if recipe.task == "segmentation":
        iou = iou_per_class(predictions, data.masks, len(recipe.class_names))
        result["iou"] = {c: _round(v) for c, v in zip(recipe.class_names, iou, strict=True)}
    else:
        result["accuracy"] = _round(float(np.mean(predictions == data.classes)))
    localisation = {}
    for class_id, label in recipe.defect_labels.items():
        masks = data.masks == label
        if recipe.task == "segmentation":
            chosen = np.flatnonzero(masks.reshape(len(masks), -1).any(1))
        else:
            chosen = np.flatnonzero(data.classes == class_id)
        maps = []
        for start in range(0, len(chosen), batch_size):
            index = chosen[start:start + batch_size]
            if recipe.task == "segmentation":
                region = predictions[index] == class_id
                target: Any = SegmentationRegion(class_id, mask=region) if region.any() else None
                if target is None:
                    maps.append(np.zeros((len(index), *inputs.shape[2:]), np.float32))
                    continue
            else:
                target = class_id
            maps.append(cam(inputs[index], target=target))
        heat = np.concatenate(maps)
        hits = pointing_hits(heat, masks[chosen], tolerance)
        localisation[recipe.class_names[class_id]] = {
            "n": len(chosen),
            "pointing_game": _round(float(hits.mean())),
            "energy_share": _round(float(energy_share(heat, masks[chosen]).mean())),
            "mask_area_share": _round(float(masks[chosen].mean())),
        }
    result["localisation"] = localisation
    return result


def _round(value: float) -> float:
    return float("nan") if value != value else round(float(value), 4)


def evaluate_volume_windows(
    n_volumes: int = 4,
    *,
    shape: tuple[int, int, int] = (128, 128, 128),
    seed: int = EVAL_SEED,
    zoo_dir: str | Path = ZOO_DIR,
    overlap: float = 0.25,
) -> dict[str, Any]:
    """The CT patch classifier slid over whole generated volumes, as a user would run it.

    For each volume and defect class, Grad-CAM of that class in overlapping 32^3 windows
    (blended by :func:`napari_gradcam.explain_volume`); a hit is a volume maximum within
    :data:`POINTING_TOLERANCE_PX` voxels of the class's mask. The energy share is compared with
    the share of the volume that mask (dilated by the same tolerance) covers. The distance of
    each volume's maximum to the nearest defect voxel is reported too (0 = on the defect).
    """
    from scipy import ndimage

    from napari_gradcam import GradCAM, explain_volume
    from napari_gradcam.samples.ct_volume import make_ct_volume

    name = "ct-patch-classifier"
    recipe = get_recipe(name)
    model, card = load_demo_model(name, zoo_dir)
    cam = GradCAM(model, layer=card["target_layer"])
    preprocess = recipe.preprocessor()
    window = tuple(card["input_size"])
    per_class: dict[str, dict[str, list[float]]] = {}
    for index in range(n_volumes):
        sample = make_ct_volume(shape, seed=seed + index)
        for class_id, label in recipe.defect_labels.items():
            mask = sample.labels == label
            if not mask.any():
                continue
            result = explain_volume(cam, sample.volume, mode="windows", window=window,
                                    overlap=overlap, batch_size=8, target=class_id,
                                    preprocess=preprocess)
            maps = np.asarray(result.maps, dtype=np.float64)
            distance = ndimage.distance_transform_edt(~mask)
            near = distance <= POINTING_TOLERANCE_PX
            peak = np.unravel_index(int(np.argmax(maps)), maps.shape)
            positive = np.clip(maps, 0, None)
            scores = per_class.setdefault(recipe.class_names[class_id],
                                          {"hit": [], "energy": [], "area": [], "distance": []})
            scores["hit"].append(float(near[peak]))
            scores["distance"].append(float(distance[peak]))
            scores["energy"].append(float((positive * near).sum() / max(positive.sum(), 1e-12)))
            scores["area"].append(float(near.mean()))
    return {
        "n_volumes": n_volumes,
        "shape": list(shape),
        "seed": seed,
        "layer": card["target_layer"],
        "localisation": {
            class_name: {
                "n": len(scores["hit"]),
                "pointing_game": _round(float(np.mean(scores["hit"]))),
                "energy_share": _round(float(np.mean(scores["energy"]))),
                "mask_area_share": _round(float(np.mean(scores["area"]))),
                "peak_distance_vox": [_round(d) for d in scores["distance"]],
            }
            for class_name, scores in per_class.items()
        },
    }
