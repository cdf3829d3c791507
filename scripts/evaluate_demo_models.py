"""Evaluate the shipped demo models on fresh held-out data and print a markdown table.

    python scripts/evaluate_demo_models.py                  # table for the README
    python scripts/evaluate_demo_models.py --write-cards    # also store the numbers in the cards

For every model: accuracy (per-class IoU for the U-Net) and Grad-CAM localisation of each
defect class at the card's ``target_layer``: the pointing game (share of samples whose map
maximum lies within 2 pixels, voxels or points of the true defect mask; for spectra, of the mask of
the dominant phase's peaks, which spans each peak +- one FWHM) and the mean share of the map's
positive energy inside the mask, next to the mask's share of the input (chance level). The
held-out data uses seed ``--seed`` (default 20240); training used seed 0.

A second table slides the CT patch classifier over whole generated 128^3 volumes in 32^3
windows (``--volumes``, default 4) and scores the blended volume map the same way (the energy
is measured inside the defect mask dilated by the 2-voxel tolerance).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    import napari_gradcam  # noqa: F401
except ImportError:  # running from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch
import yaml

from napari_gradcam.samples.demo_models import (
    EVAL_SEED,
    RECIPES,
    ZOO_DIR,
    evaluate_model,
    evaluate_volume_windows,
    write_card,
)


def markdown_table(results: dict[str, dict]) -> str:
    """One row per (model, defect class): the README's demo-model table."""
    lines = [
        "| model | held-out samples | accuracy / IoU | class explained | pointing game | "
        "CAM energy in mask | mask area (chance) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, result in results.items():
        if "accuracy" in result:
            quality = f"accuracy {result['accuracy']:.3f}"
        else:
            quality = "IoU " + ", ".join(f"{c} {v:.3f}" for c, v in result["iou"].items())
        for class_name, loc in result["localisation"].items():
            lines.append(
                f"| {name} (`{result['layer']}`) | {result['n']} | {quality} | {class_name} "
                f"(n={loc['n']}) | {loc['pointing_game']:.3f} | {loc['energy_share']:.3f} | "
                f"{loc['mask_area_share']:.3f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--zoo", type=Path, default=ZOO_DIR, help="folder of cards and weights")
    parser.add_argument("--seed", type=int, default=EVAL_SEED, help="held-out data seed")
    parser.add_argument("--per-class", type=int, default=None,
                        help="held-out samples per class (default: the recipe's)")
    parser.add_argument("--write-cards", action="store_true",
                        help="store the measured numbers under 'metrics' in each card")
    parser.add_argument("--volumes", type=int, default=4,
                        help="whole CT volumes for the windowed check (0: skip)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    results = {}
    for name in args.models:
        results[name] = evaluate_model(name, zoo_dir=args.zoo, per_class=args.per_class,
                                       seed=args.seed)
        if args.write_cards:
            card_path = args.zoo / f"{name}.yaml"
            card = yaml.safe_load(card_path.read_text(encoding="utf-8"))
            card["metrics"] = results[name]
            write_card(card_path, card)
    print(markdown_table(results))
    if args.volumes and "ct-patch-classifier" in args.models:
        volumes = evaluate_volume_windows(args.volumes, seed=args.seed, zoo_dir=args.zoo)
        print()
        print(volume_table(volumes))
    return 0


def volume_table(result: dict) -> str:
    """The whole-volume check as a markdown table."""
    lines = [
        f"Whole volumes ({result['n_volumes']} x {'x'.join(map(str, result['shape']))}, "
        f"windows at `{result['layer']}`):",
        "",
        "| class explained | volumes | pointing game | distance of the maximum to the defect "
        "(voxels) | CAM energy near defect | defect (+2 vox) volume share |",
        "|---|---|---|---|---|---|",
    ]
    for class_name, loc in result["localisation"].items():
        distances = ", ".join(f"{d:.1f}" for d in loc["peak_distance_vox"])
        lines.append(
            f"| {class_name} | {loc['n']} | {loc['pointing_game']:.3f} | {distances} | "
            f"{loc['energy_share']:.3f} | {loc['mask_area_share']:.4f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
