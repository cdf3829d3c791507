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
from napari_gradcam.samples.ct_randomised import (
    CT_RANDOMISED_WINDOW,
    make_randomised_ct_patches,
    make_randomised_ct_slice_patches,
)
from napari_gradcam.samples.ct_volume import CT_CLASSES, CT_LABELS
from napari_gradcam.samples.metrics import energy_share, iou_per_class, pointing_hits
from napari_gradcam.samples.micrographs import (
    MICROGRAPH_CLASSES,
    MICROGRAPH_TRAINING_SIZES,
    PatchSet,
    make_randomised_micrograph_patches,
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
    the segmenter: ``n`` slices per kind). With ``train_sizes``, ``make_data(n, seed, size)``
    draws them at ``size`` (default: ``input_size``), and training and evaluation use one set
    per size: a model with global pooling that should classify any image size has to learn
    from several, or a small defect in a large image is averaged away. ``defect_labels`` maps a
    class id to the mask value that marks its object (pointing game and energy share are
    computed for those classes).
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
    make_data: Callable[..., PatchSet]
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
    voxel_size_range: dict[str, list[float]] | None = None
    data_description: str = "napari_gradcam.samples"
    train_sizes: tuple[int, ...] = ()
    small_first: float = 0.0
    """With ``train_sizes``: the share of the steps that use the smallest size only, before all
    sizes are drawn alike (a curriculum: on large images the defect is a small part of the
    picture, and from scratch the classifier did not learn from them at all, loss at chance
    after 200 steps, while on the smallest size it did)."""
    """Smallest and largest voxel size (um, per spatial axis) the training data was drawn with
    (``{"min": [...], "max": [...]}``); None when the data has no physical scale."""

    def per_class_at(self, size: int, per_class: int) -> int:
        """Training images per class at ``size`` with ``train_sizes``: ``per_class`` at
        ``input_size``, and as many pixels at every other size."""
        nominal = self.input_size[0] if self.input_size else size
        return max(1, round(per_class * (nominal / size) ** self.spatial_dims))

    def batch_for(self, size: int, batch_size: int) -> int:
        """The batch size for images of ``size`` pixels per side with ``train_sizes``: as many
        pixels per step as ``batch_size`` images of the smallest size (at least 2 images)."""
        smallest = min(self.train_sizes) if self.train_sizes else size
        return max(2, round(batch_size * (smallest / size) ** self.spatial_dims))

    @property
    def spatial_dims(self) -> int:
        return int(self.architecture_kwargs["spatial_dims"])

    def preprocessor(self) -> Preprocessor:
        return Preprocessor(self.preprocessing, spatial_dims=self.spatial_dims, in_channels=1)


SLICE_WORM_SHARE = 0.4
"""Share of the U-Net's training pores drawn as thin worm-like pores (beside the crack in mixed
slices): without them it called thin, lumpy held-out pores crack."""

SLICE_SURFACE_SHARE = 0.6
"""Share of the U-Net's crack training slices (crack only, and pores beside a crack) that hold
a crack opening at the specimen's surface: trained on inner cracks only, it missed the held-out
cracks' mouths."""

SLICE_SURFACE_KINDS = (2, 3)
"""The slice kinds whose crack may open at the surface (2 crack only, 3 pores and a crack)."""


def _slice_data(n: int, seed: int) -> PatchSet:
    return make_randomised_ct_slice_patches(4 * n, size=64, seed=seed,
                                            worm_share=SLICE_WORM_SHARE,
                                            surface_share=SLICE_SURFACE_SHARE,
                                            surface_kinds=SLICE_SURFACE_KINDS)


# a window wide enough for every grey scale the randomised training draws (air 500-15000,
# metal up to 55000): the models learn contrast *relative* to the drawn scale instead of one
# generator's grey values
_CT_PREPROCESSING = [
    {"op": "window", "min": CT_RANDOMISED_WINDOW[0], "max": CT_RANDOMISED_WINDOW[1]},
    {"op": "normalize", "mean": 0.4, "std": 0.25},
]

RECIPES: dict[str, Recipe] = {
    recipe.name: recipe
    for recipe in (
        Recipe(
            name="micrograph-classifier",
            weights="micrograph_classifier.safetensors",
            description=(
                "Steel micrographs (grey uint8, any size from 64x64 to 256x256): clean / "
                "precipitates / crack. Trained on domain-randomised synthetic ferrite-pearlite "
                "micrographs of 64-256 px (grain size, crack width and shape, contrast window, "
                "noise, blur, scale bars, scratches, specks); input_size is the middle of that "
                "range, so the out-of-domain check's 0.5-2x band spans exactly the sizes it "
                "trained on."
            ),
            # twice the first model's widths: [8, 16, 32] stayed near chance after 600 steps
            # on the randomised family (loss 0.56 against 0.64 for guessing)
            architecture_kwargs={
                "spatial_dims": 2, "in_channels": 1, "num_classes": 3, "widths": [16, 32, 64]
            },
            task="classification",
            class_names=MICROGRAPH_CLASSES,
            target_layer="features.3",
            input_size=[128, 128],
            # a fixed window, not a per-patch percentile clip: with percentile clipping the
            # bright precipitates / dark crack shift the whole patch's grey levels, and the
            # network learned that global shift instead of the defect (Grad-CAM showed it,
            # pointing game 0.0 for precipitates)
            preprocessing=[
                {"op": "window", "min": 0.0, "max": 255.0},
                {"op": "normalize", "mean": 0.5, "std": 0.25},
            ],
            # domain-randomised, at several sizes: trained on 64x64 patches of one look, the
            # first classifier called the 256x256 sample "clean" (0.70) with a plain crack
            make_data=lambda n, seed, size=128: make_randomised_micrograph_patches(
                n, size=size, seed=seed, dtype="uint8"),
            train_per_class=300,
            eval_per_class=100,
            steps=1600,
            batch_size=32,
            lr=3e-3,
            defect_labels={1: 1, 2: 2},
            flip_axes=(0, 1),
            transpose=True,
            data_description=(
                "napari_gradcam.samples.micrographs.make_randomised_micrograph_patches at "
                f"{', '.join(map(str, MICROGRAPH_TRAINING_SIZES))} px"),
            train_sizes=MICROGRAPH_TRAINING_SIZES,
            small_first=0.5,
        ),
        Recipe(
            name="ct-patch-classifier",
            weights="ct_patch_classifier.safetensors",
            description=(
                "X-ray CT patches (32^3 voxels, uint16 grey): none / pore / crack. Slide it over "
                "a volume in windows; trained on domain-randomised synthetic specimens (voxel "
                "size, grey scale, noise, rings, cupping, pore and crack shapes)."
            ),
            # narrow on purpose: 3D convolutions at 32^3 dominate the CPU training time
            architecture_kwargs={
                "spatial_dims": 3, "in_channels": 1, "num_classes": 3, "widths": [4, 8, 16]
            },
            task="classification",
            class_names=CT_CLASSES,
            # features.2 (16^3) on the held-out family: slid over whole volumes its crack
            # maximum lands on the crack (4 of 4 volumes) where features.1's lands on pores or
            # the volume's faces in half of them (the first, fixed-look model used features.1)
            target_layer="features.2",
            input_size=[32, 32, 32],
            preprocessing=_CT_PREPROCESSING,
            make_data=lambda n, seed: make_randomised_ct_patches(n, size=32, seed=seed),
            # fine-tuned: the shipped weights start from the first (fixed-look) model, git
            # 8e83fc9 (train_demo_models.py --init-from that file): 500 steps from scratch
            # on the randomised data left it at chance on the held-out family
            train_per_class=400,
            eval_per_class=60,
            steps=500,
            batch_size=8,
            lr=1e-3,
            defect_labels={1: 1, 2: 2},
            flip_axes=(0, 1, 2),
            transpose=False,
            voxel_size_range={"min": [0.5, 0.45, 0.45], "max": [1.3, 1.0, 1.0]},
            data_description="napari_gradcam.samples.ct_randomised.make_randomised_ct_patches",
        ),
        Recipe(
            name="ct-slice-unet",
            weights="ct_slice_unet.safetensors",
            description=(
                "U-Net segmenting pores and cracks in X-ray CT slices (any size divisible by 8): "
                "background / pore / crack. For Seg-Grad-CAM. Trained on domain-randomised "
                "synthetic slices (voxel size, grey scale, noise, rings, cupping, pore and "
                "crack shapes)."
            ),
            architecture="unet",
            architecture_kwargs={
                "spatial_dims": 2, "in_channels": 1, "num_classes": 3,
                "widths": [8, 16, 32, 64],
            },
            task="segmentation",
            class_names=tuple(CT_LABELS.values()),
            # dec0, the last decoder stage at full resolution: a crack is 2-3 pixels thin, and at
            # half resolution (dec1) the map spreads around it (held-out crack energy share
            # 0.36 at dec1, 0.74 at dec0; pointing game 0.90 / 0.99)
            target_layer="dec0",
            input_size=None,
            preprocessing=_CT_PREPROCESSING,
            make_data=_slice_data,
            train_per_class=600,
            eval_per_class=60,
            steps=1000,
            batch_size=16,
            lr=3e-3,
            defect_labels={1: 1, 2: 2},
            flip_axes=(0, 1),
            transpose=True,
            # mild weights: (0.3, 1.0, 1.5) made every crack a pixel too wide (held-out crack
            # IoU 0.58, most errors background predicted as crack along the crack's faces)
            class_weights=(0.5, 1.0, 1.0),
            loss="cross_entropy",
            voxel_size_range={"min": [0.45, 0.45], "max": [1.0, 1.0]},
            data_description=(
                "napari_gradcam.samples.ct_randomised.make_randomised_ct_slice_patches"
                f"(worm_share={SLICE_WORM_SHARE}, surface_share={SLICE_SURFACE_SHARE}, "
                f"surface_kinds={SLICE_SURFACE_KINDS})"
            ),
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


def soft_dice_loss(outputs: torch.Tensor, target: torch.Tensor, class_id: int) -> torch.Tensor:
    """1 - soft Dice of one class's softmax probability against its mask, over the whole batch.

    Why: a 2-3 pixel thin crack loses a third of its IoU to one pixel of disagreement on each
    face, yet cross-entropy barely notices those few pixels among thousands of background
    ones. Dice is an overlap score, so its gradient weighs exactly the face pixels that decide
    the IoU. Summed over the batch (not per patch) so patches without the class add only their
    false positives instead of an undefined 0/0.
    """
    probability = outputs.softmax(1)[:, class_id]
    truth = (target == class_id).to(probability.dtype)
    overlap = (probability * truth).sum()
    return 1.0 - (2.0 * overlap + 1.0) / (probability.sum() + truth.sum() + 1.0)


STATISTICS_SAMPLE = 300
"""Training items read for a card's ``training_statistics`` (enough to estimate the spread
between single items that :mod:`napari_gradcam.core.domain` widens its thresholds by)."""


def training_statistics(recipe: Recipe, seed: int = 0, per_class: int | None = None,
                        data: PatchSet | None = None) -> dict[str, Any]:
    """The statistics of a recipe's training inputs after the card's preprocessing.

    Computed by :func:`napari_gradcam.core.domain.input_statistics` (the function that also
    measures a user's data for the out-of-domain check, so the two are comparable): intensity
    histogram (32 bins, edges and normalised counts), mean, std, percentiles 1/50/99, the input
    size (patch shape), the noise level (robust sigma of the Laplacian) and the spread between
    single training items; plus ``voxel_size_range`` when the data has a physical scale. The
    training data is regenerated from its seed unless ``data`` is given, so this needs no
    training run.
    """
    from napari_gradcam.core.domain import input_statistics

    if data is None:
        data = recipe.make_data(recipe.train_per_class if per_class is None else per_class,
                                seed)
    stats = input_statistics(data.images, spatial_dims=recipe.spatial_dims,
                             preprocess=recipe.preprocessor(),
                             input_size=list(data.images.shape[1:]),
                             sample=STATISTICS_SAMPLE, seed=seed)
    if recipe.voxel_size_range is not None:
        stats["voxel_size_range"] = {k: list(v) for k, v in recipe.voxel_size_range.items()}
    return stats


def card_dict(recipe: Recipe, *, seed: int, steps: int, metrics: dict | None = None,
              statistics: dict | None = None) -> dict:
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
            "data": f"{recipe.data_description} (generator seed {seed})",
        },
    }
    if metrics:
        card["metrics"] = metrics
    if statistics:
        card["training_statistics"] = statistics
    return card


def train_model(
    name: str,
    steps: int | None = None,
    seed: int = 0,
    out_dir: str | Path = ZOO_DIR,
    *,
    train_per_class: int | None = None,
    num_threads: int = 2,
    init_from: str | Path | None = None,
    lr: float | None = None,
    batch_size: int | None = None,
    dice_weight: float = 0.0,
    dice_class: int | tuple[int, ...] | None = None,
    class_weights: tuple[float, ...] | None = None,
    device: str = "cpu",
    log: Callable[[str], None] | None = print,
) -> Path:
    """Train the demo model ``name`` and write ``<weights>.safetensors`` and ``<name>.yaml``.

    ``steps`` and ``train_per_class`` default to the recipe's (a test passes a few steps and a
    few samples to check the pipeline in seconds). ``dice_weight`` > 0 (segmentation) adds
    that multiple of :func:`soft_dice_loss` of ``dice_class`` (default: the last class, the
    crack; a tuple of classes adds their mean) to the loss. ``class_weights`` overrides the
    recipe's cross-entropy class weights. ``device`` ("cpu", "cuda") is where the steps run
    (the data is drawn on the CPU either way; the card records it, since GPU and CPU weights
    differ in the last bits). ``init_from`` continues from earlier weights; the
    card then keeps the earlier card's ``training`` section under ``training.init_training``,
    so both stages of the recipe stay on record. Returns the card's path. The card carries no
    ``metrics`` yet: :func:`evaluate_model` measures them and ``scripts/evaluate_demo_models.py
    --write-cards`` adds them.
    """
    from safetensors.torch import save_file

    recipe = get_recipe(name)
    steps = recipe.steps if steps is None else int(steps)
    per_class = recipe.train_per_class if train_per_class is None else int(train_per_class)
    if steps < 1 or per_class < 1:
        raise ValueError(f"steps and train_per_class must be >= 1, got {steps}, {per_class}")
    if dice_weight and recipe.task != "segmentation":
        raise ValueError(f"dice_weight needs a segmentation model; {name} is {recipe.task}")
    if dice_class is None:
        dice_classes: tuple[int, ...] = (len(recipe.class_names) - 1,)
    elif isinstance(dice_class, int):
        dice_classes = (int(dice_class),)
    else:
        dice_classes = tuple(int(c) for c in dice_class)
    if class_weights is not None and len(class_weights) != len(recipe.class_names):
        raise ValueError(f"class_weights needs one weight per class {recipe.class_names}, "
                         f"got {list(class_weights)}")
    init_training = None
    if init_from is not None:
        # read before training: the earlier card may be the one this run overwrites
        init_training = next(
            (card["training"] for card in (yaml.safe_load(c.read_text(encoding="utf-8"))
                                          for c in Path(init_from).parent.glob("*.yaml"))
             if card.get("weights") == Path(init_from).name), None)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(num_threads)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    started = time.perf_counter()

    data = recipe.make_data(per_class, seed)
    sizes = tuple(sorted(recipe.train_sizes)) or (None,)
    # with train_sizes: as many pixels per size as the input_size set has (more small images)
    sets = [data if size is None or [size] * recipe.spatial_dims == recipe.input_size
            else recipe.make_data(recipe.per_class_at(size, per_class), seed, size)
            for size in sizes]
    groups = [(recipe.preprocessor()(d.images),
               torch.from_numpy(d.masks.astype(np.int64) if recipe.task == "segmentation"
                                else d.classes)) for d in sets]
    model = build_architecture(recipe.architecture, **recipe.architecture_kwargs)
    if init_from is not None:
        warm_start(model, Path(init_from), recipe.preprocessing)
    model.to(device)
    groups = [(inputs.to(device), targets.to(device)) for inputs, targets in groups]
    lr_used = recipe.lr if lr is None else float(lr)
    batch_used = recipe.batch_size if batch_size is None else int(batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr_used, weight_decay=1e-4)
    # (at least 10 scheduler steps: OneCycle divides by its warm-up length, 0 for tiny runs)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=lr_used, total_steps=max(steps, 10), pct_start=0.2
    )
    weights_used = recipe.class_weights if class_weights is None else tuple(class_weights)
    weight = None if weights_used is None else torch.tensor(weights_used, dtype=torch.float32,
                                                            device=device)
    model.train()
    running = math.nan
    for step in range(steps):
        # one size per step (a batch must be one shape), drawn at random
        group = (int(torch.randint(len(groups), (), generator=generator))
                 if len(groups) > 1 and step >= recipe.small_first * steps else 0)
        inputs, targets = groups[group]
        batch_size = min(batch_used if sizes[group] is None
                         else recipe.batch_for(sizes[group], batch_used), len(inputs))
        index = torch.randint(len(inputs), (batch_size,), generator=generator).to(device)
        batch, target = inputs[index], targets[index]
        if recipe.task == "segmentation":
            # the same geometric augmentation for images and label maps
            stacked = _augment(torch.cat([batch, target[:, None].float()], 1), recipe, generator)
            batch, target = stacked[:, :1], stacked[:, 1].round().long()
        else:
            batch = _augment(batch, recipe, generator)
        outputs = model(batch)
        loss = _loss(outputs, target, recipe.loss, weight)
        if dice_weight:
            loss = loss + dice_weight * sum(
                soft_dice_loss(outputs, target, c) for c in dice_classes) / len(dice_classes)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        running = loss.item() if math.isnan(running) else 0.95 * running + 0.05 * loss.item()
        if log is not None and (step + 1) % max(steps // 10, 1) == 0:
            log(f"{name}: step {step + 1}/{steps} loss {running:.4f}")
    model.eval().cpu()

    weights_path = out_dir / recipe.weights
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, weights_path)
    card_path = out_dir / f"{recipe.name}.yaml"
    statistics = training_statistics(recipe, seed, data=data)
    card = card_dict(recipe, seed=seed, steps=steps, statistics=statistics)
    card["training"].update({"batch_size": batch_used, "train_samples_per_class": per_class,
                             "optimizer": f"AdamW lr={lr_used} one-cycle"})
    if recipe.train_sizes:
        card["training"]["train_sizes"] = list(recipe.train_sizes)
        card["training"]["smallest_size_only_for_steps"] = round(recipe.small_first * steps)
        card["training"]["train_samples_per_class_by_size"] = {
            int(size): recipe.per_class_at(size, per_class) for size in recipe.train_sizes}
        card["training"]["batch_size_by_size"] = {
            int(size): recipe.batch_for(size, batch_used) for size in recipe.train_sizes}
    if device != "cpu":
        card["training"]["device"] = str(device)
    if weights_used is not None and recipe.loss == "cross_entropy":
        card["training"]["class_weights"] = [float(w) for w in weights_used]
    if dice_weight:
        dice_names = ", ".join(recipe.class_names[c] for c in dice_classes)
        card["training"]["loss"] = (f"{recipe.loss} + {dice_weight} * soft Dice "
                                    f"({dice_names}{', mean' if len(dice_classes) > 1 else ''})")
    if init_from is not None:
        card["training"]["init_from"] = Path(init_from).name
        if init_training is not None:
            card["training"]["init_training"] = init_training
    write_card(card_path, card)
    if log is not None:
        log(f"{name}: {time.perf_counter() - started:.1f} s, wrote {weights_path}")
    return card_path


def warm_start(model: nn.Module, weights: Path, preprocessing: list[dict[str, Any]]) -> None:
    """Start from earlier weights (a fine-tuning run), re-expressed for ``preprocessing``.

    The earlier model's card (``<weights>`` next to a card naming it) may have used another
    window: both are ``window`` + ``normalize``, so the earlier input is ``a * x + b`` of the
    new one; the stem convolution (no bias) is scaled by ``a`` and its batch norm's running
    mean shifted by ``-b * sum(W)``, so the start model computes what the earlier one did.
    """
    from safetensors.torch import load_file

    state = load_file(str(weights))
    old_card = next((yaml.safe_load(c.read_text(encoding="utf-8"))
                     for c in weights.parent.glob("*.yaml")
                     if yaml.safe_load(c.read_text(encoding="utf-8")).get("weights")
                     == weights.name), None)
    if old_card is not None:
        a, b = _affine_between(old_card["preprocessing"], preprocessing)
        stem_weight = next(k for k in state if k.endswith("weight") and state[k].ndim >= 3)
        total = state[stem_weight].sum(dim=tuple(range(1, state[stem_weight].ndim)))
        state[stem_weight] = state[stem_weight] * a
        mean_key = stem_weight.rsplit(".", 2)[0] + ".1.running_mean"
        if mean_key in state:
            state[mean_key] = state[mean_key] - b * total
    model.load_state_dict(state)


def _affine_between(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> tuple[float, float]:
    """(a, b) with old_input = a * new_input + b for two window + normalize pipelines."""
    def coefficients(steps: list[dict[str, Any]]) -> tuple[float, float]:
        # input = (grey - lo) / (hi - lo) then (v - mean) / std: input = grey * s + o
        window = next(s for s in steps if s["op"] == "window")
        norm = next((s for s in steps if s["op"] == "normalize"), {"mean": 0.0, "std": 1.0})
        scale = 1.0 / (window["max"] - window["min"]) / norm["std"]
        return scale, (-window["min"] / (window["max"] - window["min"]) - norm["mean"]) / norm[
            "std"]

    s_old, o_old = coefficients(old)
    s_new, o_new = coefficients(new)
    a = s_old / s_new
    return a, o_old - a * o_new


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
    n_per_class = recipe.eval_per_class if per_class is None else per_class
    tolerance = POINTING_TOLERANCE_PX
    cam = GradCAM(model, layer=recipe.target_layer)
    result: dict[str, Any] = {"n": 0, "seed": seed, "layer": recipe.target_layer,
                              "pointing_tolerance_px": tolerance}
    # with train_sizes: the samples are split evenly over the sizes the model trained on
    sizes: tuple[int | None, ...] = recipe.train_sizes or (None,)
    per_size = max(1, math.ceil(n_per_class / len(sizes)))
    correct: list[np.ndarray] = []
    scores: dict[int, dict[str, list[np.ndarray]]] = {
        c: {"hit": [], "energy": [], "area": []} for c in recipe.defect_labels}
    for size in sizes:
        data = (recipe.make_data(n_per_class, seed) if size is None
                else recipe.make_data(per_size, seed, size))
        inputs = recipe.preprocessor()(data.images)
        with torch.no_grad():
            outputs = torch.cat([model(inputs[i:i + batch_size])
                                 for i in range(0, len(inputs), batch_size)])
        predictions = outputs.argmax(1).numpy()
        result["n"] += len(data)
        if recipe.task == "segmentation":  # (one size: the segmenter has no train_sizes)
            iou = iou_per_class(predictions, data.masks, len(recipe.class_names))
            result["iou"] = {c: _round(v) for c, v in zip(recipe.class_names, iou, strict=True)}
        else:
            correct.append(predictions == data.classes)
            if size is not None:
                result.setdefault("accuracy_by_size", {})[int(size)] = _round(
                    float(np.mean(correct[-1])))
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
                    target: Any = (SegmentationRegion(class_id, mask=region) if region.any()
                                   else None)
                    if target is None:
                        maps.append(np.zeros((len(index), *inputs.shape[2:]), np.float32))
                        continue
                else:
                    target = class_id
                maps.append(cam(inputs[index], target=target))
            if not maps:
                continue
            heat = np.concatenate(maps)
            scores[class_id]["hit"].append(pointing_hits(heat, masks[chosen], tolerance))
            scores[class_id]["energy"].append(energy_share(heat, masks[chosen]))
            scores[class_id]["area"].append(masks[chosen].reshape(len(chosen), -1).mean(1))
    if recipe.task != "segmentation":
        result["accuracy"] = _round(float(np.mean(np.concatenate(correct))))
    localisation = {}
    for class_id, values in scores.items():
        hits = np.concatenate(values["hit"])
        localisation[recipe.class_names[class_id]] = {
            "n": len(hits),
            "pointing_game": _round(float(hits.mean())),
            "energy_share": _round(float(np.concatenate(values["energy"]).mean())),
            "mask_area_share": _round(float(np.concatenate(values["area"]).mean())),
        }
    result["localisation"] = localisation
    return result


def _round(value: float) -> float:
    return float("nan") if value != value else round(float(value), 4)


def _ct_volumes(family: str, n_volumes: int, seed: int | None,
                shape: tuple[int, int, int] | None) -> tuple[list[Any], int, tuple[int, ...]]:
    """``n_volumes`` whole volumes of the training generator's family or the held-out one."""
    from napari_gradcam.samples.ct_heldout import HELDOUT_SEED_BASE, make_heldout_ct_volume
    from napari_gradcam.samples.ct_volume import make_ct_volume

    if family == "training":
        seed = EVAL_SEED if seed is None else seed
        shape = (128, 128, 128) if shape is None else tuple(shape)
        return [make_ct_volume(shape, seed=seed + i) for i in range(n_volumes)], seed, shape
    if family == "heldout":
        seed = HELDOUT_SEED_BASE if seed is None else seed
        shape = HELDOUT_SHAPE if shape is None else tuple(shape)
        return ([make_heldout_ct_volume(shape, seed=seed + i) for i in range(n_volumes)], seed,
                shape)
    raise ValueError(f"family must be 'training' or 'heldout', got {family!r}")


HELDOUT_SHAPE: tuple[int, int, int] = (96, 128, 128)
"""Shape of the held-out evaluation volumes (z, y, x)."""

MIN_CRACK_PIXELS = 10
"""A slice takes part in the U-Net's held-out Seg-Grad-CAM scores when it shows at least this
many true crack (or pore) pixels: a slice grazing the crack tip in 2-3 pixels says little."""


def evaluate_unet_volumes(
    n_volumes: int = 4,
    *,
    family: str = "heldout",
    seed: int | None = None,
    shape: tuple[int, int, int] | None = None,
    zoo_dir: str | Path = ZOO_DIR,
    model: nn.Module | None = None,
    layer: str | None = None,
    batch_size: int = 16,
) -> dict[str, Any]:
    """The CT slice U-Net run slice by slice over whole volumes, as a user would run it.

    ``family`` "heldout" draws the volumes from the independent generator
    (:mod:`napari_gradcam.samples.ct_heldout`), "training" from the training family's
    :func:`~napari_gradcam.samples.ct_volume.make_ct_volume`. Scores: IoU per class over all
    voxels; for pore and crack, Seg-Grad-CAM at the card's layer with the class's logits inside
    the *predicted* region of that slice as target, on every z slice with at least
    :data:`MIN_CRACK_PIXELS` true pixels of the class. Per slice: pointing hit
    (:func:`~napari_gradcam.samples.metrics.pointing_hits`, tolerance
    :data:`POINTING_TOLERANCE_PX` pixels) and energy share inside the true mask of the class
    (:func:`~napari_gradcam.samples.metrics.energy_share`), also inside the *other* defect
    class's mask (a crack map that lights up the pores shows there). A slice with no predicted
    pixel of the class has no target and counts as a miss with energy 0. ``layer`` overrides
    the card's target layer (to compare layers).
    """
    from napari_gradcam import GradCAM, SegmentationRegion

    name = "ct-slice-unet"
    recipe = get_recipe(name)
    preprocess = recipe.preprocessor()
    if model is None:
        model, card = load_demo_model(name, zoo_dir)
        layer = layer or card["target_layer"]
        # the card's preprocessing: an older card (another window) is scored as it shipped
        preprocess = Preprocessor(card["preprocessing"], spatial_dims=2, in_channels=1)
    else:
        layer = layer or recipe.target_layer
    model.eval()
    volumes, seed, shape = _ct_volumes(family, n_volumes, seed, shape)
    cam = GradCAM(model, layer=layer)
    n_classes = len(recipe.class_names)
    intersection = np.zeros(n_classes)
    union = np.zeros(n_classes)
    scores: dict[int, dict[str, list[float]]] = {
        c: {"hit": [], "energy": [], "other": [], "area": []} for c in recipe.defect_labels
    }
    for sample in volumes:
        inputs = preprocess(sample.volume.astype(np.float32))
        with torch.no_grad():
            predicted = torch.cat([model(inputs[i:i + batch_size]).argmax(1)
                                   for i in range(0, len(inputs), batch_size)]).numpy()
        for cls in range(n_classes):
            p, t = predicted == cls, sample.labels == cls
            intersection[cls] += np.count_nonzero(p & t)
            union[cls] += np.count_nonzero(p | t)
        for class_id, label in recipe.defect_labels.items():
            truth = sample.labels == label
            other = (sample.labels != label) & (sample.labels > 0)
            chosen = np.flatnonzero(truth.reshape(len(truth), -1).sum(1) >= MIN_CRACK_PIXELS)
            for start in range(0, len(chosen), batch_size):
                index = chosen[start:start + batch_size]
                region = predicted[index] == class_id
                heat = np.zeros(region.shape, dtype=np.float64)
                has_region = region.reshape(len(index), -1).any(1)
                if has_region.any():
                    heat[has_region] = cam(
                        inputs[index[has_region]],
                        target=SegmentationRegion(class_id, mask=region[has_region]),
                    )
                hits = pointing_hits(heat, truth[index], POINTING_TOLERANCE_PX)
                scores[class_id]["hit"].extend((hits & has_region).tolist())
                scores[class_id]["energy"].extend(energy_share(heat, truth[index]).tolist())
                scores[class_id]["other"].extend(energy_share(heat, other[index]).tolist())
                scores[class_id]["area"].extend(truth[index].mean(axis=(1, 2)).tolist())
    iou = np.divide(intersection, union, out=np.full(n_classes, np.nan), where=union > 0)
    return {
        "family": family,
        "n_volumes": n_volumes,
        "shape": list(shape),
        "seed": seed,
        "layer": layer,
        "pointing_tolerance_px": POINTING_TOLERANCE_PX,
        "iou": {c: _round(v) for c, v in zip(recipe.class_names, iou, strict=True)},
        "localisation": {
            recipe.class_names[class_id]: {
                "n": len(values["hit"]),
                "pointing_game": _round(float(np.mean(values["hit"]))),
                "energy_share": _round(float(np.mean(values["energy"]))),
                "energy_share_other_defect": _round(float(np.mean(values["other"]))),
                "mask_area_share": _round(float(np.mean(values["area"]))),
            }
            for class_id, values in scores.items() if values["hit"]
        },
    }


def evaluate_volume_windows(
    n_volumes: int = 4,
    *,
    family: str = "training",
    shape: tuple[int, int, int] | None = None,
    seed: int | None = None,
    zoo_dir: str | Path = ZOO_DIR,
    model: nn.Module | None = None,
    layer: str | None = None,
    overlap: float = 0.25,
) -> dict[str, Any]:
    """The CT patch classifier slid over whole volumes in windows, as a user would run it.

    ``family`` as in :func:`evaluate_unet_volumes` ("training": :func:`make_ct_volume`, 128^3,
    seed :data:`EVAL_SEED`; "heldout": the independent generator). For each volume and defect
    class, Grad-CAM of that class in overlapping 32^3 windows (blended by
    :func:`napari_gradcam.explain_volume`); pointing hit as in
    :func:`~napari_gradcam.samples.metrics.pointing_hits` (volume maximum within
    :data:`POINTING_TOLERANCE_PX` voxels of the class's mask). The energy share
    (:func:`~napari_gradcam.samples.metrics.energy_share`) is given inside the mask and inside
    the mask dilated by the same tolerance, each next to its share of the volume (chance). The
    distance of each volume's maximum to the nearest defect voxel is reported (0 = on it).
    ``layer`` overrides the card's target layer.
    """
    from scipy import ndimage

    from napari_gradcam import GradCAM, explain_volume

    name = "ct-patch-classifier"
    recipe = get_recipe(name)
    preprocess = recipe.preprocessor()
    if model is None:
        model, card = load_demo_model(name, zoo_dir)
        layer, window = layer or card["target_layer"], tuple(card["input_size"])
        preprocess = Preprocessor(card["preprocessing"], spatial_dims=3, in_channels=1)
    else:
        layer = layer or recipe.target_layer
        window = tuple(recipe.input_size or (32, 32, 32))
    model.eval()
    cam = GradCAM(model, layer=layer)
    volumes, seed, shape = _ct_volumes(family, n_volumes, seed, shape)
    per_class: dict[str, dict[str, list[float]]] = {}
    for sample in volumes:
        for class_id, label in recipe.defect_labels.items():
            mask = sample.labels == label
            if not mask.any():
                continue
            result = explain_volume(cam, sample.volume, mode="windows", window=window,
                                    overlap=overlap, batch_size=8, target=class_id,
                                    preprocess=preprocess)
            maps = np.asarray(result.maps, dtype=np.float64)[None]
            distance = ndimage.distance_transform_edt(~mask)
            near = distance <= POINTING_TOLERANCE_PX
            peak = np.unravel_index(int(np.argmax(maps[0])), mask.shape)
            scores = per_class.setdefault(
                recipe.class_names[class_id],
                {"hit": [], "energy": [], "energy_near": [], "area": [], "area_near": [],
                 "distance": []},
            )
            scores["hit"].append(float(pointing_hits(maps, mask[None], POINTING_TOLERANCE_PX)[0]))
            scores["distance"].append(float(distance[peak]))
            scores["energy"].append(float(energy_share(maps, mask[None])[0]))
            scores["energy_near"].append(float(energy_share(maps, near[None])[0]))
            scores["area"].append(float(mask.mean()))
            scores["area_near"].append(float(near.mean()))
    return {
        "family": family,
        "n_volumes": n_volumes,
        "shape": list(shape),
        "seed": seed,
        "layer": layer,
        "localisation": {
            class_name: {
                "n": len(scores["hit"]),
                "pointing_game": _round(float(np.mean(scores["hit"]))),
                "energy_share": _round(float(np.mean(scores["energy"]))),
                "mask_area_share": _round(float(np.mean(scores["area"]))),
                "energy_share_near": _round(float(np.mean(scores["energy_near"]))),
                "near_area_share": _round(float(np.mean(scores["area_near"]))),
                "peak_distance_vox": [_round(d) for d in scores["distance"]],
            }
            for class_name, scores in per_class.items()
        },
    }


MICROGRAPH_HELDOUT_SIZES: tuple[int, ...] = (128, 256)
"""Image sizes of the held-out micrograph evaluation (the shipped sample is 256x256)."""


def _softmax(logits: torch.Tensor) -> np.ndarray:
    return logits.softmax(-1).numpy()


def evaluate_micrograph_heldout(
    n_per_class: int = 20,
    *,
    sizes: tuple[int, ...] = MICROGRAPH_HELDOUT_SIZES,
    seed: int | None = None,
    zoo_dir: str | Path = ZOO_DIR,
    model: nn.Module | None = None,
    batch_size: int = 16,
) -> dict[str, Any]:
    """The micrograph classifier on the held-out family and on the shipped 256x256 sample.

    The held-out family (:mod:`napari_gradcam.samples.micrograph_heldout`) is drawn by code the
    model never trained on: ``n_per_class`` images per class at each of ``sizes``, seeds from
    ``seed`` (default :data:`~napari_gradcam.samples.micrograph_heldout.
    MICROGRAPH_HELDOUT_SEED_BASE`, each size its own block of seeds). Scores: accuracy (and per
    size), the confusion matrix (rows true, columns predicted), and for precipitates and crack
    Grad-CAM of the true class at the card's layer on the images of that class: pointing hit
    (maximum within :data:`POINTING_TOLERANCE_PX` pixels of the class's mask) and energy share
    in the mask (:mod:`napari_gradcam.samples.metrics`). ``sample``: the shipped sample
    (``make_micrograph((256, 256), seed=0, dtype="uint8")``, a crack and precipitates): the
    predicted class, the softmax probabilities, and the crack map's pointing hit and energy.
    """
    from napari_gradcam import GradCAM
    from napari_gradcam.samples.micrograph_heldout import (
        MICROGRAPH_HELDOUT_SEED_BASE,
        make_heldout_micrograph_set,
    )
    from napari_gradcam.samples.micrographs import make_micrograph

    name = "micrograph-classifier"
    recipe = get_recipe(name)
    preprocess = recipe.preprocessor()
    if model is None:
        model, card = load_demo_model(name, zoo_dir)
        layer = card["target_layer"]
        preprocess = Preprocessor(card["preprocessing"], spatial_dims=2, in_channels=1)
    else:
        layer = recipe.target_layer
    model.eval()
    seed = MICROGRAPH_HELDOUT_SEED_BASE if seed is None else int(seed)
    cam = GradCAM(model, layer=layer)
    n_classes = len(recipe.class_names)
    confusion = np.zeros((n_classes, n_classes), dtype=np.int64)
    by_size: dict[int, float] = {}
    scores: dict[int, dict[str, list[float]]] = {
        c: {"hit": [], "energy": [], "area": []} for c in recipe.defect_labels}
    for block, size in enumerate(sizes):
        data = make_heldout_micrograph_set(n_per_class, size, seed + 10_000 * block)
        inputs = preprocess(data.images)
        with torch.no_grad():
            logits = torch.cat([model(inputs[i:i + batch_size])
                                for i in range(0, len(inputs), batch_size)])
        predicted = logits.argmax(1).numpy()
        np.add.at(confusion, (data.classes, predicted), 1)
        by_size[int(size)] = _round(float(np.mean(predicted == data.classes)))
        for class_id, label in recipe.defect_labels.items():
            chosen = np.flatnonzero(data.classes == class_id)
            masks = data.masks[chosen] == label
            heat = np.concatenate([cam(inputs[chosen[i:i + batch_size]], target=class_id)
                                   for i in range(0, len(chosen), batch_size)])
            scores[class_id]["hit"].extend(
                pointing_hits(heat, masks, POINTING_TOLERANCE_PX).tolist())
            scores[class_id]["energy"].extend(energy_share(heat, masks).tolist())
            scores[class_id]["area"].extend(masks.reshape(len(masks), -1).mean(1).tolist())
    sample = make_micrograph((256, 256), seed=0, dtype="uint8")
    sample_input = preprocess(sample.image[None])
    with torch.no_grad():
        probabilities = _softmax(model(sample_input))[0]
    crack_id = recipe.class_names.index("crack")
    crack_mask = (sample.labels == 2)[None]
    sample_map = cam(sample_input, target=crack_id)
    return {
        "family": "heldout",
        "n": int(confusion.sum()),
        "sizes": [int(s) for s in sizes],
        "seed": seed,
        "layer": layer,
        "pointing_tolerance_px": POINTING_TOLERANCE_PX,
        "accuracy": _round(float(np.trace(confusion) / confusion.sum())),
        "accuracy_by_size": by_size,
        "confusion": confusion.tolist(),
        "localisation": {
            recipe.class_names[class_id]: {
                "n": len(values["hit"]),
                "pointing_game": _round(float(np.mean(values["hit"]))),
                "energy_share": _round(float(np.mean(values["energy"]))),
                "mask_area_share": _round(float(np.mean(values["area"]))),
            }
            for class_id, values in scores.items()
        },
        "sample": {
            "predicted": recipe.class_names[int(np.argmax(probabilities))],
            "probabilities": {c: _round(float(p))
                              for c, p in zip(recipe.class_names, probabilities, strict=True)},
            "crack_pointing_hit": bool(pointing_hits(sample_map, crack_mask,
                                                     POINTING_TOLERANCE_PX)[0]),
            "crack_energy_share": _round(float(energy_share(sample_map, crack_mask)[0])),
        },
    }
