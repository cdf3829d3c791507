"""``napari-gradcam evidence``: the evidence checks on one image, slice or window, headless.

A thin shell over :func:`napari_gradcam.evidence_report.run_evidence`: read the input (and
optionally a region mask) with :mod:`napari_gradcam.io`, cut out what the model sees (a
slice for a 2D model, a window of the card's input size for a 3D model), run the checks with
a progress bar, and write the report folder (figures, CSV/JSON, provenance). It registers
itself with :func:`napari_gradcam.cli.register_command`.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import numpy as np

from napari_gradcam.cli import EXIT_OK, ProgressBar, register_command


@register_command
def add_evidence(subparsers: Any) -> None:
    from napari_gradcam.evidence_report import CHECKS, DEFAULT_CHECKS

    parser = subparsers.add_parser(
        "evidence", help="test a heatmap: deletion/insertion, randomisation, cross-checks",
        description="Run the evidence checks on one sample (an image, one slice of a volume for "
        "a 2D model, or one window for a 3D model) and write a report folder with figures, "
        "numbers and provenance.")
    parser.add_argument("input", help="image or volume: .tif/.tiff, .zarr/.ome.zarr or .npy")
    parser.add_argument("--model", required=True, metavar="NAME|CARD",
                        help="a demo model name or a model card .yaml")
    parser.add_argument("--layer", help="layer to explain (default: the card's target layer)")
    parser.add_argument("--method", default="gradcam", help="CAM method (default gradcam)")
    parser.add_argument("--target", default="predicted", metavar="predicted|INDEX|CLASS")
    parser.add_argument("--slice", type=int, metavar="INDEX",
                        help="2D model on a volume: the slice to test (default: the middle)")
    parser.add_argument("--axis", type=int, default=0, help="slice axis (default 0)")
    parser.add_argument("--corner", type=int, nargs=3, metavar=("Z", "Y", "X"),
                        help="3D model on a larger volume: the window's first voxel "
                        "(default: centred)")
    parser.add_argument("--region", metavar="MASK",
                        help="a mask file of the input's shape (non-zero = region), e.g. a crack "
                        "label or a scale bar")
    parser.add_argument("--region-kind", choices=("evidence", "forbidden"), default="evidence",
                        help="evidence: the model should use it (region test); forbidden: it "
                        "should not (energy share warning)")
    parser.add_argument("--checks", nargs="+", choices=CHECKS, default=list(DEFAULT_CHECKS))
    parser.add_argument("--out", required=True, metavar="FOLDER", help="report folder")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing report")
    parser.add_argument("--trust", action="store_true",
                        help="allow model files that can run code (only files you trust)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    parser.set_defaults(handler=run_evidence_command)


def _read_any(path: str) -> np.ndarray:
    from napari_gradcam.io import read_volume

    array, _ = read_volume(path, ndim=None)
    return np.asarray(array)


def cut_sample(data: np.ndarray, spatial_dims: int, *, input_size: Sequence[int] | None,
               slice_index: int | None, axis: int, corner: Sequence[int] | None
               ) -> tuple[tuple[slice | int, ...], str]:
    """The index of the part of ``data`` the model sees, and words for the report."""
    if data.ndim == spatial_dims:
        return tuple(slice(None) for _ in range(data.ndim)), "whole input"
    if spatial_dims == 2 and data.ndim == 3:
        if not -3 <= axis < 3:
            raise ValueError(f"--axis must be 0, 1 or 2 for a volume, got {axis}")
        axis %= 3
        index = data.shape[axis] // 2 if slice_index is None else slice_index
        if not 0 <= index < data.shape[axis]:
            raise ValueError(f"--slice {index} is outside 0..{data.shape[axis] - 1}")
        key: list[slice | int] = [slice(None)] * 3
        key[axis] = index
        return tuple(key), f"slice {index} along axis {axis}"
    if spatial_dims == 3 and data.ndim == 3:
        size = tuple(input_size or data.shape)
        if corner is None:
            corner = [max(0, (s - w) // 2) for s, w in zip(data.shape, size, strict=True)]
        key = tuple(slice(c, c + w) for c, w in zip(corner, size, strict=True))
        return key, f"window at {tuple(corner)} of size {size}"
    raise ValueError(f"a {spatial_dims}D model cannot be tested on an input of shape "
                     f"{data.shape}")


def run_evidence_command(args: argparse.Namespace) -> int:
    from napari_gradcam.core.models import load_model
    from napari_gradcam.distributed import resolve_class_target
    from napari_gradcam.evidence_report import run_evidence

    loaded = load_model(args.model, trust=args.trust)
    data = _read_any(args.input)
    key, where = cut_sample(data, loaded.card.spatial_dims, input_size=loaded.card.input_size,
                            slice_index=args.slice, axis=args.axis, corner=args.corner)
    sample = data[key]
    region = None
    if args.region:
        mask = _read_any(args.region)
        if mask.shape != data.shape:
            raise ValueError(f"the region mask has shape {mask.shape}, the input {data.shape}")
        region = mask[key] != 0
    progress = None
    if not args.quiet:
        bar = ProgressBar("evidence")
        progress = lambda done, total, stage: bar(done, total)  # noqa: E731
    report = run_evidence(
        loaded, sample, layer=args.layer,
        target=resolve_class_target(args.target, loaded.card.class_names),
        checks=args.checks, region_mask=region, region_kind=args.region_kind,
        method=args.method, source=f"{args.input} ({where})", export_folder=args.out,
        overwrite=args.overwrite, progress=progress, should_stop=getattr(args, "should_stop",
                                                                          None))
    if not args.quiet:
        print(report.summary())
        print(f"report written to {args.out}")
    return EXIT_OK
