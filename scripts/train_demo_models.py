"""Train the demo models shipped in ``src/napari_gradcam/zoo`` (CPU, seeded, a few minutes).

    python scripts/train_demo_models.py                      # all four, into the zoo, + metrics
    python scripts/train_demo_models.py --models xrd-phase-classifier --quick --out /tmp/zoo
    python scripts/train_demo_models.py --statistics-only     # refresh training_statistics

The CT models learn from domain-randomised patches (``napari_gradcam.samples.ct_randomised``:
voxel size, grey scale, noise, rings, cupping, pore and crack shapes drawn per patch) and are
scored on an independent generator they never see (``scripts/evaluate_demo_models.py``). The
shipped CT weights were trained with ``--threads 1``.

``--init-from`` continues from earlier weights (the card keeps the earlier card's ``training``
under ``training.init_training``); ``--dice-weight`` adds a soft Dice term for the crack class
(or the mean over ``--dice-classes``) to the U-Net's cross-entropy; ``--class-weights``
overrides the recipe's cross-entropy class weights (recorded in the card). A crack-only Dice
fine-tune of the first randomised U-Net (1200 more steps, seed 1, lr 1e-3, Dice weight 1):
held-out crack IoU 0.707 -> 0.730, but pore IoU 0.824 -> 0.817, crack pointing game 0.929 ->
0.909 and more background called pore, so it was not shipped. The shipped U-Net is that first
model fine-tuned on slices with worm-like pores and surface cracks (the recipe's data now):
``--models ct-slice-unet --init-from <first weights> --seed 1 --lr 1e-3 --steps 1000
--class-weights 1 1 1 --dice-weight 0.5 --dice-classes 1 2`` (held-out crack IoU 0.707 ->
0.784, pore IoU 0.824 -> 0.835, every Seg-Grad-CAM figure up), fine-tuned once more on 6000
slices with more worm-like pores and surface cracks also beside pores: ``--init-from <those
weights, git acde121> --seed 2 --lr 5e-4 --steps 1000 --batch-size 16 --class-weights 1 1 1
--dice-weight 0.5 --dice-classes 1 2 --train-per-class 1500`` (held-out crack IoU 0.784 ->
0.806, pore IoU 0.835 -> 0.858). The micrograph classifier learns from domain-randomised
micrographs at 64-256 px (``--models micrograph-classifier``, the recipe's defaults; ``--device
cuda`` runs the steps on a GPU).

Each model learns from the synthetic generators in ``napari_gradcam.samples`` (seed ``--seed``)
and is written as ``<weights>.safetensors`` plus ``<name>.yaml`` (the model card). Unless
``--no-eval`` (implied by ``--quick``), the card's ``metrics`` are then measured on held-out data
with a different seed (see ``scripts/evaluate_demo_models.py``). The recipes (data, layer,
preprocessing, steps) live in ``napari_gradcam.samples.demo_models``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

try:
    import napari_gradcam  # noqa: F401
except ImportError:  # running from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import yaml

from napari_gradcam.samples.demo_models import (
    RECIPES,
    ZOO_DIR,
    evaluate_model,
    get_recipe,
    train_model,
    training_statistics,
    write_card,
)

QUICK_STEPS = 5
QUICK_PER_CLASS = 8


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(RECIPES), choices=list(RECIPES),
                        help="which demo models to train (default: all)")
    parser.add_argument("--out", type=Path, default=ZOO_DIR, help="output folder (default: zoo)")
    parser.add_argument("--seed", type=int, default=0, help="seed of data, init and batches")
    parser.add_argument("--steps", type=int, default=None, help="override the recipe's steps")
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK_STEPS} steps on {QUICK_PER_CLASS} samples per class, no "
                             "evaluation: checks the pipeline in seconds")
    parser.add_argument("--no-eval", action="store_true", help="do not write metrics to cards")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--train-per-class", type=int, default=None,
                        help="override the recipe's training samples per class (the U-Net: "
                             "slices per kind)")
    parser.add_argument("--device", default="cpu", help="where the steps run (cpu, cuda)")
    parser.add_argument("--init-from", type=Path, default=None,
                        help="start from these safetensors weights (fine-tuning; the card next "
                             "to them gives their preprocessing, re-expressed for the new one)")
    parser.add_argument("--lr", type=float, default=None, help="override the recipe's lr")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="override the recipe's batch size")
    parser.add_argument("--dice-weight", type=float, default=0.0,
                        help="segmentation: add this multiple of the crack class's soft Dice "
                             "loss to cross-entropy (an overlap loss for thin cracks)")
    parser.add_argument("--dice-classes", type=int, nargs="+", default=None,
                        help="segmentation: the classes whose soft Dice (mean) --dice-weight "
                             "adds (default: the last class, the crack)")
    parser.add_argument("--class-weights", type=float, nargs="+", default=None,
                        help="segmentation: cross-entropy class weights (default: the recipe's)")
    parser.add_argument("--statistics-only", action="store_true",
                        help="only (re)compute each card's training_statistics from the seeded "
                             "training data; weights and metrics stay as they are")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    if args.statistics_only:
        for name in args.models:
            card_path = args.out / f"{name}.yaml"
            card = yaml.safe_load(card_path.read_text(encoding="utf-8"))
            card["training_statistics"] = training_statistics(
                get_recipe(name), seed=int(card["training"]["seed"]))
            write_card(card_path, card)
            print(f"{name}: training_statistics written to {card_path}")
        return 0
    for name in args.models:
        card_path = train_model(
            name,
            steps=QUICK_STEPS if args.quick else args.steps,
            seed=args.seed,
            out_dir=args.out,
            train_per_class=QUICK_PER_CLASS if args.quick else args.train_per_class,
            num_threads=args.threads,
            init_from=args.init_from,
            lr=args.lr,
            batch_size=args.batch_size,
            dice_weight=args.dice_weight,
            dice_class=None if args.dice_classes is None else tuple(args.dice_classes),
            class_weights=None if args.class_weights is None else tuple(args.class_weights),
            device=args.device,
        )
        if not (args.quick or args.no_eval):
            metrics = evaluate_model(name, zoo_dir=args.out)
            card = yaml.safe_load(card_path.read_text(encoding="utf-8"))
            card["metrics"] = metrics
            write_card(card_path, card)
            print(f"{name}: {metrics}")
    print(f"total {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
