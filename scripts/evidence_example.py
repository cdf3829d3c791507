"""Is the crack heatmap evidence? The README example, written to ``docs/evidence/``.

    python scripts/evidence_example.py                       # CT demo model (or micrograph)
    python scripts/evidence_example.py --model micrograph-classifier --out /tmp/evidence

Takes a demo model (the 3D CT patch classifier, or the micrograph classifier when the CT model
is not installed), a generated sample with a crack that the model classifies as "crack" (from
held-out data: a seed the model never saw), and runs every evidence check with the crack's
true mask as the region: deletion and insertion against random pixel orders, the cascading
model-randomisation test, agreement with occlusion, saliency, SmoothGrad and Integrated
Gradients, and the region test (does filling the crack lower the crack score?). Writes the
figures, numbers and provenance (:meth:`EvidenceReport.export`) and a ``README.md`` that quotes
the numbers, and prints the summary. CPU only, seeded, about a minute.
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

import numpy as np
import torch

from napari_gradcam.core.models import LoadedModel, list_demo_models, load_model
from napari_gradcam.evidence_report import (
    DEFAULT_CHECKS,
    EvidenceReport,
    EvidenceSettings,
    format_value,
    run_evidence,
)

PREFERRED = ("ct-patch-classifier", "micrograph-classifier")
EVAL_SEED = 20240  # held-out data, as in napari_gradcam.samples.demo_models
OUT = Path(__file__).resolve().parents[1] / "docs" / "evidence"
REMOVAL = {"mean": "the image mean", "blur": "a blurred copy"}


def choose_model(name: str | None) -> LoadedModel:
    """The named model (a demo name or a card path), else the first preferred demo model."""
    if name:
        return load_model(name)
    installed = {card.name for card in list_demo_models()}
    for candidate in PREFERRED:
        if candidate in installed:
            return load_model(candidate)
    raise SystemExit(
        "neither demo model (ct-patch-classifier, micrograph-classifier) is installed in "
        "src/napari_gradcam/zoo; train them first: python scripts/train_demo_models.py, or "
        "pass --model path/to/card.yaml"
    )


def crack_sample(loaded: LoadedModel, seed: int) -> tuple[np.ndarray, np.ndarray, str]:
    """A held-out crack sample the model classifies as crack, its crack mask, a description."""
    from napari_gradcam.samples import make_ct_patches, make_micrograph_patches

    card = loaded.card
    if "crack" not in card.class_names:
        raise SystemExit(f"the model {card.name!r} has no 'crack' class ({card.class_names})")
    crack = card.class_names.index("crack")
    if card.spatial_dims == 3:
        size = int(card.input_size[0]) if card.input_size else 32
        patches = make_ct_patches(6, size=size, seed=seed)
        what = f"synthetic X-ray CT patch, {size}^3 voxels (make_ct_patches, seed {seed})"
    elif card.spatial_dims == 2:
        size = int(card.input_size[0]) if card.input_size else 64
        patches = make_micrograph_patches(6, size=size, seed=seed, dtype="uint8")
        what = f"synthetic steel micrograph patch, {size}x{size} px (seed {seed})"
    else:
        raise SystemExit(f"the example needs a 2D or 3D model; {card.name!r} is "
                         f"{card.spatial_dims}D")
    for number, (image, label, mask) in enumerate(
            zip(patches.images, patches.classes, patches.masks, strict=True)):
        if label != crack:
            continue
        with torch.no_grad():
            predicted = int(loaded.model(loaded.preprocess(image[None])).argmax(1)[0])
        if predicted == crack:
            return image, mask == 2, f"{what}, sample {number}"
    raise SystemExit(f"the model {card.name!r} misclassifies every generated crack sample")


def readme(report: EvidenceReport, sample: str, seconds: float, command: str,
           report_has_maps: bool) -> str:
    """The paragraph for the project README, with this run's numbers."""
    deletion, insertion = report.deletion, report.insertion
    randomisation = report.randomisation
    occlusion = report.agreements.get("occlusion")
    last = randomisation.steps[-1] if randomisation else None
    lines = [
        "# Evidence for a crack heatmap",
        "",
        f"Model `{report.model_name}`, {report.method} at `{report.layer}`, target "
        f"{report.target}; sample: {sample}, the first held-out crack sample the model "
        f"classifies as crack; the crack's true mask is the region. Made by `{command}` in "
        f"{seconds:.0f} s on a CPU.",
        "",
    ]
    if deletion is not None and insertion is not None:
        lines.append(
            f"* **Deletion** (pixels replaced by {REMOVAL.get(deletion.removal, deletion.removal)}"
            " in Grad-CAM order): AUC "
            f"{deletion.auc[0]:.3f} vs {deletion.random_auc[0]:.3f} for random orders "
            f"(lower is better). **Insertion**: AUC {insertion.auc[0]:.3f} vs "
            f"{insertion.random_auc[0]:.3f} (higher is better)."
        )
    if last is not None:
        lines.append(
            f"* **Model randomisation** (cascading, {len(randomisation.steps)} blocks): Spearman "
            f"correlation with the original map {format_value(last.spearman)}, SSIM "
            f"{format_value(last.ssim)} once every block is random; "
            f"{'FAILED: the map barely changes' if randomisation.barely_changes else 'passed'}."
        )
    if occlusion is not None:
        chance = occlusion.top_k / (2 - occlusion.top_k)
        agrees = occlusion.top_k_iou >= report.settings.agreement_factor * chance
        lines.append(
            f"* **Agreement with occlusion**: IoU of the top {occlusion.top_k:.0%} pixels "
            f"{occlusion.top_k_iou:.2f} (chance {chance:.2f}), Spearman "
            f"{format_value(occlusion.spearman)}: "
            + ("the two maps point at the same places." if agrees else
               "they do NOT agree on this sample. Occlusion measures what hiding one small "
               "patch at a time does; where the evidence is spread over a large object, each "
               "patch alone matters little (and a flat grey patch can itself look like a "
               "defect), which deletion and the region test, removing many pixels at once, "
               "do not suffer from.")
        )
    if report.region is not None and report.region.probability_before is not None:
        extent = "volume" if report.spatial_dims == 3 else "image"
        lines.append(
            f"* **Region test**: inpainting the crack drops the crack probability from "
            f"{report.region.probability_before[0]:.3f} to "
            f"{report.region.probability_after[0]:.3f}; "
            f"{report.region_energy:.0%} of the map lies on the crack, which covers "
            f"{report.region_area_share:.1%} of the {extent}."
        )
    lines += [
        "",
        "| check | measure | value | reference | verdict |",
        "|---|---|---|---|---|",
    ]
    for row in report.rows():
        reference = "" if row.reference is None else format_value(row.reference)
        lines.append(f"| {row.check} | {row.measure} | {format_value(row.value)} | {reference} "
                     f"| {row.verdict} |")
    lines += [
        "",
        "![deletion and insertion](figures/deletion_insertion.png)",
        "",
        "![randomisation](figures/randomisation.png)",
        "",
        "![maps](figures/maps.png)",
        "",
        "Numbers: `summary.csv`, `curves.csv`, `randomisation.csv`, `agreement.csv`, "
        "`report.json`; provenance (model, weights SHA-256, layer, target, preprocessing, "
        "settings, versions): `provenance.json`"
        + ("; maps: `maps.npz`." if report_has_maps else " (rerun with `--with-maps` for the "
           "maps as `maps.npz`)."),
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None,
                        help="demo model name or card path (default: the CT model, else the "
                             "micrograph model)")
    parser.add_argument("--out", type=Path, default=OUT, help=f"output folder (default {OUT})")
    parser.add_argument("--seed", type=int, default=EVAL_SEED, help="seed of the sample data")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--with-maps", action="store_true",
                        help="also write maps.npz (every map as float32; large for volumes)")
    parser.add_argument("--strict", action="store_true",
                        help="exit with status 1 when a check fails (default: 0 once written)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    loaded = choose_model(args.model)
    image, mask, sample = crack_sample(loaded, args.seed)
    print(f"{loaded.card.name}: {sample}")
    started = time.perf_counter()
    last_stage = [""]

    def progress(done: int, total: int, stage: str) -> None:
        if stage != last_stage[0]:
            last_stage[0] = stage
            print(f"  [{done:5d}/{total}] {stage}", flush=True)

    crack = loaded.card.class_names.index("crack")
    report = run_evidence(
        loaded, image, target=crack, checks=(*DEFAULT_CHECKS, "region"), region_mask=mask,
        settings=EvidenceSettings(), source=sample, progress=progress,
    )
    report.export(args.out, maps=args.with_maps, overwrite=True)
    seconds = time.perf_counter() - started
    command = " ".join(["python scripts/evidence_example.py",
                        *(sys.argv[1:] if argv is None else argv)])
    text = readme(report, sample, seconds, command.strip(), args.with_maps)
    (args.out / "README.md").write_text(text, encoding="utf-8")
    print(report.summary())
    print(f"wrote {args.out} in {seconds:.1f} s")
    return 1 if args.strict and not report.passed else 0


if __name__ == "__main__":
    raise SystemExit(main())
