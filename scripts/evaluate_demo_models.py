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
is measured inside the defect mask and inside it dilated by the 2-voxel tolerance).

The held-out family (``--heldout-volumes``, default 8, seeds from 900000): whole volumes from an
independent generator the models never trained on (``napari_gradcam.samples.ct_heldout``: blob
pores, branched cracks of varying width, other ring/cupping/noise models, grey scales and voxel
sizes). The U-Net runs slice by slice (IoU over all voxels; Seg-Grad-CAM of the crack and pore
class over the predicted region, per slice with at least 10 true pixels of the class), the 3D
classifier in windows as above. Pointing hit and energy share are the definitions of
``napari_gradcam.samples.metrics``.

The micrograph classifier's held-out family (``--heldout-micrographs``, default 20 per class
and size, at 128 and 256 px, seeds from 700000): micrographs drawn by independent code
(``napari_gradcam.samples.micrograph_heldout``: stretched weighted grains, textured second
phase, zig-zag polyline cracks, elliptical particles, data bars, scratches, stains, Poisson
noise), and the shipped 256x256 sample (predicted class, probabilities, crack map's hit).
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
    evaluate_micrograph_heldout,
    evaluate_model,
    evaluate_unet_volumes,
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
    parser.add_argument("--heldout-volumes", type=int, default=8,
                        help="held-out-family volumes for the CT models (0: skip)")
    parser.add_argument("--heldout-seed", type=int, default=None,
                        help="first seed of the held-out volumes (default 900000)")
    parser.add_argument("--heldout-micrographs", type=int, default=20,
                        help="held-out micrographs per class and size (0: skip)")
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
        _store(args, "ct-patch-classifier", "volumes", volumes)
    if args.heldout_micrographs and "micrograph-classifier" in args.models:
        micrographs = evaluate_micrograph_heldout(args.heldout_micrographs, zoo_dir=args.zoo)
        print()
        print(micrograph_table(micrographs))
        _store(args, "micrograph-classifier", "heldout_micrographs", micrographs)
    if args.heldout_volumes:
        if "ct-slice-unet" in args.models:
            unet = evaluate_unet_volumes(args.heldout_volumes, seed=args.heldout_seed,
                                         zoo_dir=args.zoo)
            print()
            print(unet_table(unet))
            _store(args, "ct-slice-unet", "heldout_volumes", unet)
        if "ct-patch-classifier" in args.models:
            windows = evaluate_volume_windows(args.heldout_volumes, family="heldout",
                                              seed=args.heldout_seed, zoo_dir=args.zoo)
            print()
            print(volume_table(windows))
            _store(args, "ct-patch-classifier", "heldout_volumes", windows)
    return 0


def _store(args: argparse.Namespace, name: str, key: str, result: dict) -> None:
    """With --write-cards, keep a whole-volume result under the card's metrics[key]."""
    if not args.write_cards:
        return
    card_path = args.zoo / f"{name}.yaml"
    card = yaml.safe_load(card_path.read_text(encoding="utf-8"))
    card.setdefault("metrics", {})[key] = result
    write_card(card_path, card)


def micrograph_table(result: dict) -> str:
    """The micrograph classifier on the held-out family and the shipped sample (markdown)."""
    by_size = ", ".join(f"{size} px {acc:.3f}" for size, acc in result["accuracy_by_size"].items())
    sample = result["sample"]
    probabilities = ", ".join(f"{c} {p:.2f}" for c, p in sample["probabilities"].items())
    lines = [
        f"Micrograph classifier on {result['n']} held-out micrographs (sizes "
        f"{', '.join(map(str, result['sizes']))} px, seeds from {result['seed']}, Grad-CAM at "
        f"`{result['layer']}`): accuracy {result['accuracy']:.3f} ({by_size}); confusion "
        f"(rows true, columns predicted) {result['confusion']}",
        "",
        "| class explained | images | pointing game | CAM energy in mask | mask area (chance) |",
        "|---|---|---|---|---|",
    ]
    for class_name, loc in result["localisation"].items():
        lines.append(f"| {class_name} | {loc['n']} | {loc['pointing_game']:.3f} | "
                     f"{loc['energy_share']:.3f} | {loc['mask_area_share']:.4f} |")
    lines += ["", f"The shipped 256x256 sample: predicted {sample['predicted']} ({probabilities});"
              f" crack map's maximum on the crack: {sample['crack_pointing_hit']}, crack energy "
              f"{sample['crack_energy_share']:.3f}"]
    return "\n".join(lines)


def unet_table(result: dict) -> str:
    """The U-Net over whole volumes (slice by slice) as a markdown table."""
    iou = ", ".join(f"{c} {v:.3f}" for c, v in result["iou"].items())
    lines = [
        f"U-Net over whole {result['family']} volumes ({result['n_volumes']} x "
        f"{'x'.join(map(str, result['shape']))}, seeds from {result['seed']}, slice by slice, "
        f"Seg-Grad-CAM at `{result['layer']}` over the predicted region): IoU {iou}",
        "",
        "| class explained | slices | pointing game | CAM energy in true mask | CAM energy on "
        "the other defect | mask area (chance) |",
        "|---|---|---|---|---|---|",
    ]
    for class_name, loc in result["localisation"].items():
        lines.append(
            f"| {class_name} | {loc['n']} | {loc['pointing_game']:.3f} | "
            f"{loc['energy_share']:.3f} | {loc['energy_share_other_defect']:.3f} | "
            f"{loc['mask_area_share']:.4f} |"
        )
    return "\n".join(lines)


def volume_table(result: dict) -> str:
    """The whole-volume check as a markdown table."""
    lines = [
        f"Whole {result.get('family', 'training')} volumes ({result['n_volumes']} x "
        f"{'x'.join(map(str, result['shape']))}, seeds from {result['seed']}, windows at "
        f"`{result['layer']}`):",
        "",
        "| class explained | volumes | pointing game | distance of the maximum to the defect "
        "(voxels) | CAM energy in defect (volume share) | CAM energy near defect, +2 vox "
        "(volume share) |",
        "|---|---|---|---|---|---|",
    ]
    for class_name, loc in result["localisation"].items():
        distances = ", ".join(f"{d:.1f}" for d in loc["peak_distance_vox"])
        lines.append(
            f"| {class_name} | {loc['n']} | {loc['pointing_game']:.3f} | {distances} | "
            f"{loc['energy_share']:.3f} ({loc['mask_area_share']:.4f}) | "
            f"{loc['energy_share_near']:.3f} ({loc['near_area_share']:.4f}) |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
