"""``napari-gradcam evidence``: the evidence checks on what the user selected, headless.

A thin shell that drains the evidence job (:func:`napari_gradcam.evidence.run_evidence`): open
the input (and optionally a region mask) lazily with :mod:`napari_gradcam.io`, cut out *only*
what the model sees (the slice chosen with ``--slice``/``--axis`` for a 2D model, the window at
``--corner`` of ``--window`` or the card's input size for a 3D model; by default the slice or
window through the region, else the middle), print an estimate of the run time (a timed forward
pass times the forward passes the chosen checks need) before starting, run the checks with a
progress bar and write the report folder (figures, CSV/JSON, provenance).

The whole volume is never tested by accident: an option the chosen model does not use
(``--corner`` for a 2D model, ``--slice`` for a 3D one) is refused, not ignored, and the checks
over every slice or tile of a volume run only with ``--whole-volume``
(:mod:`napari_gradcam.evidence_volume`: one sample at a time, bounded memory, progress over
the samples). It registers itself with :func:`napari_gradcam.cli.register_command`.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from napari_gradcam.cli import EXIT_OK, ProgressBar, method_names, register_command


@register_command
def add_evidence(subparsers: Any) -> None:
    from napari_gradcam.evidence import CHECKS, DEFAULT_CHECKS

    parser = subparsers.add_parser(
        "evidence", help="test a heatmap: deletion/insertion, randomisation, cross-checks",
        description="Run the evidence checks on one sample (an image, one slice of a volume for "
        "a 2D model, or one window for a 3D model) and write a report folder with figures, "
        "numbers and provenance. An estimate of the run time is printed before it starts. "
        "With --whole-volume the checks run on every slice or window tile, one at a time.")
    parser.add_argument("input", help="image or volume: .tif/.tiff, .zarr/.ome.zarr or .npy")
    parser.add_argument("--model", required=True, metavar="NAME|CARD",
                        help="a demo model name or a model card .yaml")
    parser.add_argument("--layer", help="layer to explain (default: the card's target layer)")
    parser.add_argument("--method", default="gradcam",
                        help=f"CAM method (default gradcam): {', '.join(method_names())}")
    parser.add_argument("--target", default="predicted", metavar="predicted|INDEX|CLASS")
    parser.add_argument("--slice", type=int, metavar="INDEX",
                        help="2D model on a volume: the slice to test (default: the slice with "
                        "the most region voxels, else the middle)")
    parser.add_argument("--axis", type=int, default=0, help="slice axis (default 0)")
    parser.add_argument("--corner", type=int, nargs=3, metavar=("Z", "Y", "X"),
                        help="3D model on a larger volume: the window's first voxel (default: "
                        "centred on the region, else on the volume)")
    parser.add_argument("--window", type=int, nargs=3, metavar=("Z", "Y", "X"),
                        help="3D model: the window's size (default: the card's input size)")
    parser.add_argument("--whole-volume", action="store_true",
                        help="test every slice (2D model) or every window tile (3D model) of "
                        "the volume, one at a time in bounded memory; writes per-sample numbers "
                        "and pass counts instead of figures")
    parser.add_argument("--estimate-only", action="store_true",
                        help="print the estimate and stop")
    parser.add_argument("--region", metavar="MASK",
                        help="a mask file of the input's shape (non-zero = region), e.g. a crack "
                        "label or a scale bar")
    parser.add_argument("--region-kind", choices=("evidence", "forbidden"), default="evidence",
                        help="evidence: the model should use it (region test against random "
                        "regions of its shape); forbidden: it should not (energy share warning)")
    parser.add_argument("--checks", nargs="+", choices=CHECKS, default=list(DEFAULT_CHECKS))
    parser.add_argument("--out", required=True, metavar="FOLDER", help="report folder")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing report")
    parser.add_argument("--trust", action="store_true",
                        help="allow model files that run code or read outside their folder "
                        "(pickled models, custom architectures, bioimage.io network files, .pt2 "
                        "with pickled objects); only for files you trust")
    parser.add_argument("--quiet", action="store_true",
                        help="no estimate, progress bar or summary")
    parser.set_defaults(handler=run_evidence_command)


def _open(path: str) -> Any:
    """The file's array, not read into memory (a slab is read when it is indexed)."""
    from napari_gradcam.io import read_volume

    array, _ = read_volume(path, ndim=None, lazy=True)
    return array


@dataclass(frozen=True)
class Selection:
    """What the model sees: the index into the input and words for the report."""

    key: tuple[slice | int, ...]
    where: str


def region_profile(region: Any, slab: int = 16) -> list[np.ndarray]:
    """Region voxels (non-zero) per plane along each axis of a 3D mask, read ``slab`` planes at
    a time, so a mask on disk is never loaded whole."""
    shape = tuple(int(s) for s in region.shape)
    counts = [np.zeros(size, dtype=np.int64) for size in shape]
    for start in range(0, shape[0], slab):
        inside = np.asarray(region[start:start + slab]) != 0
        counts[0][start:start + inside.shape[0]] = inside.sum(axis=(1, 2))
        counts[1] += inside.sum(axis=(0, 2))
        counts[2] += inside.sum(axis=(0, 1))
    return counts


def cut_sample(shape: Sequence[int], spatial_dims: int, *, input_size: Sequence[int] | None,
               slice_index: int | None, axis: int, corner: Sequence[int] | None,
               window: Sequence[int] | None = None, region: Any = None) -> Selection:
    """The part of an input of ``shape`` the model is tested on, checked against the input.

    An option that the model does not use is refused with the reason (it used to be ignored,
    and a ``--corner`` given to the wrong model silently tested something else). Without a
    choice, the slice or window goes through the region's centre (the region is what the user
    asked about), or the input's middle.
    """
    shape = tuple(int(s) for s in shape)
    ndim = len(shape)
    # A 3D volume for a 3D model is one sample only when it is the model's size: the old
    # shortcut "as many axes as the model: the whole input" tested the whole scan and ignored
    # --corner. The window logic below handles 3D.
    if ndim == spatial_dims and spatial_dims != 3:
        for name, value in (("--slice", slice_index), ("--corner", corner),
                            ("--window", window)):
            if value is not None:
                raise ValueError(f"{name} chooses part of a volume, but the input (shape "
                                 f"{shape}) is already one sample for this {spatial_dims}D "
                                 "model; leave it out")
        return Selection(tuple(slice(None) for _ in shape), "whole input")
    if ndim != 3 or spatial_dims not in (2, 3):
        raise ValueError(f"a {spatial_dims}D model cannot be tested on an input of shape {shape}")
    if spatial_dims == 2:
        if corner is not None or window is not None:
            raise ValueError("--corner and --window choose a 3D window, but the model is 2D: "
                             "it is tested on one slice (choose it with --slice and --axis)")
        if not -3 <= axis < 3:
            raise ValueError(f"--axis must be 0, 1 or 2 for a volume, got {axis}")
        axis %= 3
        if slice_index is None:
            weights = region_profile(region)[axis] if region is not None else None
            index = (int(np.argmax(weights)) if weights is not None and weights.any()
                     else shape[axis] // 2)
        else:
            index = slice_index
        if not 0 <= index < shape[axis]:
            raise ValueError(f"--slice {index} is outside 0..{shape[axis] - 1}")
        key: list[slice | int] = [slice(None)] * 3
        key[axis] = index
        return Selection(tuple(key), f"slice {index} along axis {axis}")
    if slice_index is not None:
        raise ValueError("--slice chooses a plane for a 2D model, but the model is 3D: choose "
                         "its window with --corner (and --window)")
    if window is None and not input_size:
        whole = " ".join(str(s) for s in shape)
        raise ValueError("the model card gives no input size, so the window to test is not "
                         f"known: choose it with --window Z Y X (the whole input: --window "
                         f"{whole}; every tile of a window: --whole-volume --window Z Y X)")
    size = tuple(int(w) for w in (window or input_size))
    if len(size) != 3 or min(size) < 1:
        raise ValueError(f"--window must be three positive sizes, got {size}")
    if any(w > s for w, s in zip(size, shape, strict=True)):
        raise ValueError(f"the window {size} is larger than the volume {shape}; give a smaller "
                         "--window")
    if corner is None:
        centre = [s / 2 for s in shape]
        profile = region_profile(region) if region is not None else None
        if profile is not None and profile[0].any():  # the centre of the region's bounding box
            centre = [(np.flatnonzero(c)[0] + np.flatnonzero(c)[-1] + 1) / 2 for c in profile]
        corner = [int(min(max(round(c - w / 2), 0), s - w))
                  for c, w, s in zip(centre, size, shape, strict=True)]
    corner = [int(c) for c in corner]
    if len(corner) != 3:
        raise ValueError(f"--corner needs three numbers (Z Y X), got {corner}")
    bad = [f"{name} {c} (0..{s - w})" for name, c, w, s in zip("ZYX", corner, size, shape,
                                                               strict=True)
           if not 0 <= c <= s - w]
    if bad:
        raise ValueError(f"--corner puts the {size} window outside the volume {shape}: "
                         + ", ".join(bad))
    key3 = tuple(slice(c, c + w) for c, w in zip(corner, size, strict=True))
    if size == shape:
        return Selection(key3, "whole input")
    return Selection(key3, f"window at {tuple(corner)} of size {size}")


def run_evidence_command(args: argparse.Namespace) -> int:
    from napari_gradcam.core.models import load_model
    from napari_gradcam.distributed import resolve_class_target

    loaded = load_model(args.model, trust=args.trust)
    data = _open(args.input)
    region = None
    if args.region:
        region = _open(args.region)
        if tuple(region.shape) != tuple(data.shape):
            raise ValueError(f"the region mask has shape {tuple(region.shape)}, the input "
                             f"{tuple(data.shape)}")
    target = resolve_class_target(args.target, loaded.card.class_names)
    if args.whole_volume:
        return _whole_volume(args, loaded, data, region, target)
    selection = cut_sample(data.shape, loaded.card.spatial_dims,
                           input_size=loaded.card.input_size, slice_index=args.slice,
                           axis=args.axis, corner=args.corner, window=args.window, region=region)
    sample = np.asarray(data[selection.key])
    mask = None if region is None else np.asarray(region[selection.key]) != 0
    return _one_sample(args, loaded, sample, mask, target, selection.where)


def _say(args: argparse.Namespace, text: str) -> None:
    if not args.quiet:
        print(text, flush=True)


def _progress(args: argparse.Namespace, label: str) -> Any:
    if args.quiet:
        return None
    bar = ProgressBar(label)
    return lambda done, total, stage: bar(done, total)


def _one_sample(args: argparse.Namespace, loaded: Any, sample: np.ndarray,
                mask: np.ndarray | None, target: Any, where: str) -> int:
    from napari_gradcam.evidence import estimate_evidence, run_evidence

    _say(args, f"testing {where} of {args.input} (shape {sample.shape})")
    if mask is not None and not mask.any():
        raise ValueError(f"the region mask is empty in the {where}; choose the slice or "
                         "window through it (or leave --slice/--corner out to find it)")
    if not args.quiet or args.estimate_only:
        estimate = estimate_evidence(loaded, sample, layer=args.layer, checks=args.checks,
                                     region_mask=mask, method=args.method)
        print(estimate.describe(), flush=True)
        if args.estimate_only:
            return EXIT_OK
    report = run_evidence(
        loaded, sample, layer=args.layer, target=target, checks=args.checks, region_mask=mask,
        region_kind=args.region_kind, method=args.method, source=f"{args.input} ({where})",
        export_folder=args.out, overwrite=args.overwrite,
        progress=_progress(args, "evidence"), should_stop=getattr(args, "should_stop", None))
    _say(args, report.summary())
    _say(args, f"report written to {args.out}")
    return EXIT_OK


def _whole_volume(args: argparse.Namespace, loaded: Any, data: Any, region: Any,
                  target: Any) -> int:
    from napari_gradcam.core.volume import run_job
    from napari_gradcam.evidence import estimate_evidence
    from napari_gradcam.evidence_volume import volume_samples, whole_volume_job

    card = loaded.card
    if args.slice is not None or args.corner is not None:
        raise ValueError("--whole-volume tests every slice or window: leave --slice and "
                         "--corner out (or leave --whole-volume out to test one)")
    if len(data.shape) != 3:
        raise ValueError(f"--whole-volume needs a 3D volume; {args.input} has shape "
                         f"{tuple(data.shape)}")
    if card.spatial_dims == 2 and args.window is not None:
        raise ValueError("--window is for 3D models; a 2D model is tested slice by slice")
    if card.spatial_dims == 3 and args.window is None and not card.input_size:
        raise ValueError("the model card gives no input size: choose the tiles' size with "
                         "--window Z Y X")
    samples = volume_samples(data.shape, card.spatial_dims,
                             window=args.window or card.input_size, axis=args.axis)
    first = np.asarray(data[samples[len(samples) // 2].key])
    if not args.quiet or args.estimate_only:
        estimate = estimate_evidence(loaded, first, layer=args.layer, checks=[
            name for name in args.checks if name != "region"], method=args.method,
            samples=len(samples))
        print(f"whole volume: {len(samples)} samples ({samples[0].where}, ...)", flush=True)
        print(estimate.describe(), flush=True)
        if args.estimate_only:
            return EXIT_OK
    job = whole_volume_job(loaded, data, samples, args.out, layer=args.layer, target=target,
                           checks=args.checks, region=region, region_kind=args.region_kind,
                           method=args.method, source=args.input, overwrite=args.overwrite)
    result = run_job(job, _progress(args, "evidence (whole volume)"),
                     getattr(args, "should_stop", None))
    _say(args, result.summary())
    _say(args, f"report written to {args.out}")
    return EXIT_OK
