"""Explaining whole volumes: a 2D model slice by slice, or a 3D model over sliding windows.

A CT stack can be larger than RAM, so nothing here holds the whole volume or its activations:

* **slices**: a batch of slices along the chosen axis is read (``np.asarray`` of a slab, so a
  dask or zarr array only loads that slab), explained, and written into ``out``.
* **windows**: windows of a 3D model's size tile the volume with overlap; each window's map is
  weighted by a smooth (Gaussian) window so seams vanish, and overlapping contributions are
  averaged. Windows are processed one row of depth at a time, with accumulators only
  ``window depth × height × width`` deep, flushed to ``out`` as soon as no later window can
  touch those planes.

Why the windows overhang the volume (``edge_margin``): a convolution pads its input with
zeros, so every window's map carries the network's response to the window's own border (on
the shipped CT classifier the outermost voxel plane of a window is 5–20× the window's
interior). Inside the volume the Gaussian weights hide it (a neighbouring window sees that
voxel near its centre), but where a window's border *is* the volume's border no other window
covers it, the weights normalise away, and the map showed a hot stripe along the volume's
faces (13× the interior on the demo). So the volume is extended by mirroring
(``reflect``) by ``edge_margin`` voxels on each side of every axis longer than the window,
tiled, and cropped again: each real voxel lies at least ``edge_margin`` voxels inside some
window, and no real voxel is a window border any more. The padding is virtual (each slab is
read from the volume and mirrored on the fly), so memory stays bounded.

``out`` can be any array that takes slice assignment (NumPy, a memmap, a zarr array), so the
result can live on disk. The work is a generator (:func:`volume_job`) that yields progress
between batches: the napari widget runs it in a thread worker that can stop at any yield, the
command line and :func:`explain_volume` drain it directly.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch

from napari_gradcam.core.device import run_with_oom_backoff
from napari_gradcam.core.methods import heatmaps
from napari_gradcam.core.targets import RegressionTarget, TargetSpec
from napari_gradcam.core.uncertainty import WeightedMoments

Preprocess = Callable[[np.ndarray], torch.Tensor]
ProgressCallback = Callable[[int, int], None]
T = TypeVar("T")


class Cancelled(RuntimeError):
    """The user stopped a long job; partial results are discarded by the caller."""


@dataclass
class VolumeResult:
    """The map volume plus the model's predictions for each slice or window."""

    maps: object  # an array of the volume's shape: numpy, memmap or zarr
    predictions: np.ndarray  # (n_slices or n_windows, K) class probabilities
    positions: list[tuple[int, ...]]  # the slice index, or the window's start corner
    mode: str
    axis: int | None = None
    window: tuple[int, ...] | None = None
    target_indices: np.ndarray | None = None
    messages: list[str] = field(default_factory=list)
    uncertainty: object | None = None  # the std map volume when uncertainty_out was given


def default_preprocess(batch: np.ndarray) -> torch.Tensor:
    """(B, *spatial) float32 → (B, 1, *spatial): a grey channel and nothing else."""
    return torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).unsqueeze(1)


def _check_volume(volume: object) -> tuple[int, ...]:
    shape = tuple(getattr(volume, "shape", ()))
    if len(shape) != 3:
        raise ValueError(
            f"expected a 3D volume (Z, Y, X), got shape {shape}; for a 2D image call the "
            "explainer directly, for 4D data choose the 3D part first"
        )
    if 0 in shape:
        raise ValueError(f"the volume is empty (shape {shape})")
    dtype = np.dtype(getattr(volume, "dtype", np.float32))
    if dtype.kind not in "uif":
        raise TypeError(f"the volume has dtype {dtype}; give numbers (grey values)")
    return shape


def _make_out(out: object | None, shape: tuple[int, ...]) -> object:
    if out is None:
        return np.zeros(shape, dtype=np.float32)
    if tuple(out.shape) != shape:  # type: ignore[attr-defined]
        raise ValueError(f"out has shape {tuple(out.shape)}, the volume {shape}")  # type: ignore
    return out


def class_probabilities(outputs: np.ndarray, target: object = None) -> np.ndarray:
    """(N, K) probabilities: softmax of logits; segmentation outputs averaged over pixels;
    outputs without a class axis, or any output explained with a :class:`RegressionTarget`
    (predicted properties, not class scores: a softmax would turn a single porosity into
    1.0), returned as they are, one row per sample."""
    logits = torch.from_numpy(np.asarray(outputs, dtype=np.float32))
    if isinstance(target, RegressionTarget):
        return logits.reshape(len(logits), -1).numpy()
    if logits.ndim > 2:  # segmentation: average the per-pixel probabilities
        return torch.softmax(logits, 1).flatten(2).mean(-1).numpy()
    if logits.ndim == 2:
        return torch.softmax(logits, 1).numpy()
    return logits.reshape(len(logits), -1).numpy()


def volume_job(
    explainer: object,
    volume: object,
    *,
    mode: str = "slices",
    axis: int = 0,
    batch_size: int = 8,
    window: Sequence[int] | None = None,
    overlap: float = 0.25,
    target: TargetSpec = None,
    preprocess: Preprocess | None = None,
    out: object | None = None,
    blend: str = "gaussian",
    edge_margin: int | Sequence[int] | None = None,
    notify: Callable[[str], None] | None = None,
    uncertainty_out: object | None = None,
) -> Generator[tuple[int, int], None, VolumeResult]:
    """Yield ``(done, total)`` after every batch; return the :class:`VolumeResult`.

    Windows mode: ``edge_margin`` voxels of mirrored volume around the volume (per axis, or
    one number for all; ``None``: a quarter of the window, see :func:`edge_pads`) keep the
    windows' own zero-padding borders off the volume's faces; ``0`` tiles the volume as it is.

    ``uncertainty_out`` (an array of the volume's shape, like ``out``) receives a standard
    deviation map (:mod:`napari_gradcam.core.uncertainty`). Slices mode needs an
    :class:`~napari_gradcam.core.uncertainty.UncertaintyExplainer` (its per-slice std map is
    written); windows mode writes the disagreement between overlapping windows, plus each
    window's own variance when the explainer is an ``UncertaintyExplainer``.
    """
    shape = _check_volume(volume)
    preprocess = preprocess or default_preprocess
    out = _make_out(out, shape)
    if uncertainty_out is not None:
        uncertainty_out = _make_out(uncertainty_out, shape)
    if mode == "slices":
        return (yield from _slices_job(explainer, volume, out, axis, batch_size, target,
                                       preprocess, notify, uncertainty_out))
    if mode == "windows":
        return (yield from _windows_job(explainer, volume, out, window, overlap, batch_size,
                                        target, preprocess, blend, edge_margin, notify,
                                        uncertainty_out))
    raise ValueError(f"mode must be 'slices' or 'windows', got {mode!r}")


def explain_volume(
    explainer: object,
    volume: object,
    *,
    progress: ProgressCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
    **options: object,
) -> VolumeResult:
    """Explain a 3D volume with bounded memory; see :func:`volume_job` for the options.

    ``progress(done, total)`` is called after each batch; when ``should_stop()`` turns true
    the job stops before the next batch and :class:`Cancelled` is raised.
    """
    job = volume_job(explainer, volume, **options)  # type: ignore[arg-type]
    return run_job(job, progress, should_stop)


def run_job(
    job: Generator[tuple[Any, ...], None, T],
    progress: Callable[..., None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> T:
    """Drain any job generator: report ``progress(*item)`` for each item it yields (``(done,
    total)``, or ``(done, total, stage)`` for the evidence job) and, when ``should_stop()``
    turns true, close the job and raise :class:`Cancelled`.

    The one place where "run to the end, or stop cleanly between batches" is decided, for
    every job of the package (volumes here, layer explanations in :mod:`napari_gradcam.jobs`).
    """
    try:
        while True:
            item = next(job)
            if progress is not None:
                progress(*item)
            if should_stop is not None and should_stop():
                job.close()
                raise Cancelled(f"stopped by the user after {item[0]} of {item[1]}")
    except StopIteration as finished:
        return finished.value


def _slices_job(explainer, volume, out, axis, batch_size, target, preprocess, notify,
                uncertainty_out=None):
    ndim = 3
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis must be 0, 1 or 2 for a volume, got {axis}")
    axis %= ndim
    count = volume.shape[axis]
    method = getattr(explainer, "name", "")
    predictions: dict[int, list[float]] = {}
    indices: dict[int, int] = {}
    device = getattr(explainer, "device", torch.device("cpu"))

    def work(chunk: range) -> None:
        index = [slice(None)] * ndim
        index[axis] = slice(chunk.start, chunk.stop)
        slab = np.moveaxis(np.asarray(volume[tuple(index)], dtype=np.float32), axis, 0)
        result = explainer.explain(preprocess(slab), target)
        maps = heatmaps(result.maps, method)
        if maps.ndim != 3:
            raise ValueError(f"slice-wise explanation needs one 2D map per slice; the method "
                             f"returned maps of shape {maps.shape}. Use a single target.")
        out[tuple(index)] = np.moveaxis(maps, 0, axis)
        if uncertainty_out is not None:
            if "uncertainty" not in result.extras:
                raise ValueError("an uncertainty map slice by slice needs an explainer that "
                                 "makes one: wrap it in core.uncertainty.UncertaintyExplainer")
            uncertainty_out[tuple(index)] = np.moveaxis(result.extras["uncertainty"], 0, axis)
        for offset, probs in enumerate(class_probabilities(result.outputs, target)):
            predictions[chunk.start + offset] = probs.tolist()
            if result.target_indices is not None:
                indices[chunk.start + offset] = int(result.target_indices[offset])

    for done in run_with_oom_backoff(range(count), batch_size, work, device, notify):
        yield done, count
    order = sorted(predictions)
    return VolumeResult(
        maps=out,
        predictions=np.array([predictions[i] for i in order], dtype=np.float32),
        positions=[(i,) for i in order],
        mode="slices",
        axis=axis,
        target_indices=np.array([indices[i] for i in order]) if indices else None,
        uncertainty=uncertainty_out,
    )


def window_starts(size: int, window: int, overlap: float = 0.0, *, step: int | None = None
                  ) -> list[int]:
    """Start positions so windows of ``window`` cover ``size``: every ``step`` (by default
    the step that leaves at least ``overlap``), the last one moved flush to the end."""
    if size <= window:
        return [0]
    step = step if step is not None else max(1, int(window * (1.0 - overlap)))
    starts = list(range(0, size - window + 1, step))
    if starts[-1] != size - window:
        starts.append(size - window)
    return starts


def blending_weights(window: Sequence[int], blend: str) -> np.ndarray:
    """Per-voxel weights of one window: Gaussian (σ = size/8, as nnU-Net) or constant.

    Per axis ``max(exp(-(i - (size - 1)/2)² / 2σ²), 1e-3)`` (the profile peaks at 1), and the
    3D weight is the product of the three profiles. The floor keeps a window's corner usable
    where no other window reaches (before :func:`edge_pads` that was the volume's faces).
    """
    if blend == "constant":
        return np.ones(tuple(window), dtype=np.float32)
    if blend != "gaussian":
        raise ValueError(f"blend must be 'gaussian' or 'constant', got {blend!r}")
    profiles = []
    for size in window:
        centre, sigma = (size - 1) / 2.0, size / 8.0
        profile = np.exp(-0.5 * ((np.arange(size) - centre) / sigma) ** 2)
        profiles.append(np.maximum(profile / profile.max(), 1e-3))
    weights = profiles[0][:, None, None] * profiles[1][None, :, None] * profiles[2][None, None, :]
    return weights.astype(np.float32)


def edge_pads(shape: Sequence[int], window: Sequence[int],
              edge_margin: int | Sequence[int] | None = None) -> tuple[tuple[int, int], ...]:
    """``(before, after)`` voxels of mirrored volume per axis for the window grid.

    An axis longer than the window gets ``edge_margin`` on both sides (``None``: a quarter of
    the window, at least 1: deep enough that a window's zero-padding border, a few voxels at
    the target layer plus the upsampling of a strided layer, stays outside the volume, while
    costing at most one more window per axis). An axis shorter than the window is mirrored on
    both sides up to the window's size, with the volume centred (it used to be padded at its
    end only, which left its first face on a window border). An axis exactly as long as the
    window is left alone: the window *is* the volume, the model sees what it was given.
    """
    dims = len(shape)
    if edge_margin is None:
        margins = [max(1, int(w) // 4) for w in window]
    elif isinstance(edge_margin, (int, np.integer)) and not isinstance(edge_margin, bool):
        margins = [int(edge_margin)] * dims
    else:
        margins = [int(m) for m in edge_margin]  # type: ignore[union-attr]
    if len(margins) != dims or min(margins) < 0:
        raise ValueError(f"edge_margin must be a non-negative number of voxels (one, or one per "
                         f"axis), got {edge_margin!r}")
    pads = []
    for size, win, margin in zip(shape, window, margins, strict=True):
        if size > win:
            pads.append((margin, margin))
        else:
            missing = win - size
            pads.append((missing // 2, missing - missing // 2))
    return tuple(pads)


def window_grid(shape: Sequence[int], window: Sequence[int], overlap: float = 0.25,
                edge_margin: int | Sequence[int] | None = None) -> list[list[int]]:
    """Per axis, the windows' first voxels in the volume's coordinates (negative where a
    window overhangs the volume into its mirrored margin, see :func:`edge_pads`)."""
    pads = edge_pads(shape, window, edge_margin)
    return [[start - before for start in window_starts(size + before + after, win, overlap)]
            for size, win, (before, after) in zip(shape, window, pads, strict=True)]


def mirrored_indices(start: int, stop: int, size: int) -> np.ndarray:
    """Volume indices of positions ``start..stop-1`` of an axis mirrored at both ends.

    NumPy's ``reflect`` (the face voxel is the mirror, not repeated), extended periodically so
    any overhang works, even one longer than the axis.
    """
    positions = np.arange(start, stop)
    if size == 1:
        return np.zeros_like(positions)
    period = 2 * (size - 1)
    folded = np.mod(positions, period)
    return np.where(folded < size, folded, period - folded)


def read_mirrored(volume: object, corner: Sequence[int], size: Sequence[int]) -> np.ndarray:
    """The block ``corner .. corner + size`` of the volume mirrored beyond its faces (float32).

    Reads one contiguous slab of the real volume (so dask or zarr load only that) and mirrors
    it in memory; a block inside the volume is read as it is.
    """
    shape = tuple(volume.shape)  # type: ignore[attr-defined]
    indices = [mirrored_indices(c, c + n, s) for c, n, s in zip(corner, size, shape,
                                                                 strict=True)]
    low = [int(i.min()) for i in indices]
    high = [int(i.max()) + 1 for i in indices]
    block = np.asarray(volume[tuple(slice(a, b) for a, b in zip(low, high, strict=True))],  # type: ignore[index]
                       dtype=np.float32)
    # The usual case, an overhang shorter than the part of the axis that was read, is NumPy's
    # reflect padding of that part: one contiguous copy instead of a gather over np.ix_
    # (the windows loop reads one slab per row of windows; the gather was 4x slower).
    pads = [(max(0, -c), max(0, c + n - s)) for c, n, s in zip(corner, size, shape,
                                                                strict=True)]
    inside = [min(c + n, s) - max(c, 0) for c, n, s in zip(corner, size, shape, strict=True)]
    if all(length >= 1 and before < length and after < length and (length > 1 or not before + after)
           for (before, after), length in zip(pads, inside, strict=True)):
        part = tuple(slice(max(c, 0) - a, min(c + n, s) - a)
                     for c, n, s, a in zip(corner, size, shape, low, strict=True))
        piece = block[part]
        if not any(before or after for before, after in pads):
            return np.array(piece, dtype=np.float32)  # a copy: callers may keep or change it
        return np.pad(piece, pads, mode="reflect")
    return block[np.ix_(*(i - a for i, a in zip(indices, low, strict=True)))]


def _windows_job(explainer, volume, out, window, overlap, batch_size, target, preprocess,
                 blend, edge_margin, notify, uncertainty_out=None):
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    shape = tuple(volume.shape)
    window = tuple(int(w) for w in (window or (64, 64, 64)))
    if len(window) != 3 or min(window) < 1:
        raise ValueError(f"window must be three positive sizes (z, y, x), got {window}")
    # Tile the mirrored volume (``padded`` in its own coordinates), crop when writing ``out``.
    pads = edge_pads(shape, window, edge_margin)
    padded = tuple(s + a + b for s, (a, b) in zip(shape, pads, strict=True))
    starts = [window_starts(s, w, overlap) for s, w in zip(padded, window, strict=True)]
    weights = blending_weights(window, blend)
    total = int(np.prod([len(s) for s in starts]))
    depth, height, width = window
    (z_pad, _), (y_pad, _), (x_pad, _) = pads
    device = getattr(explainer, "device", torch.device("cpu"))
    method = getattr(explainer, "name", "")
    # W = sum w, S = sum w*cam (the blended map S/W), and with an uncertainty output also
    # sum w*cam^2 (the windows' disagreement) in float64 for an accurate variance
    with_variance = uncertainty_out is not None
    moments = WeightedMoments((depth, padded[1], padded[2]),
                              np.float64 if with_variance else np.float32,
                              variance=with_variance)
    weighted = np.empty(window, dtype=np.float32)  # one window's w·cam, reused by every window
    buffer_start = 0
    predictions: list[list[float]] = []
    positions: list[tuple[int, ...]] = []
    done = 0

    def flush(until: int) -> None:
        nonlocal buffer_start
        planes = until - buffer_start
        if planes <= 0:
            return
        first, last = max(buffer_start, z_pad), min(until, z_pad + shape[0])
        if first < last:  # planes of the real volume: blend and crop the mirrored margins
            rows = slice(first - buffer_start, last - buffer_start)
            crop = (rows, slice(y_pad, y_pad + shape[1]), slice(x_pad, x_pad + shape[2]))
            out[first - z_pad:last - z_pad] = moments.mean(crop)
            if with_variance:
                uncertainty_out[first - z_pad:last - z_pad] = moments.std(crop)
        moments.drop_leading(planes)  # shift in place: no new volume-wide buffers
        buffer_start = until

    for z0 in starts[0]:
        flush(z0)
        slab = read_mirrored(volume, (z0 - z_pad, -y_pad, -x_pad), (depth, *padded[1:]))
        corners = list(itertools.product(starts[1], starts[2]))

        def work(chunk: list[tuple[int, int]], slab: np.ndarray = slab, z0: int = z0) -> None:
            batch = np.stack([slab[:, y0:y0 + height, x0:x0 + width] for y0, x0 in chunk])
            result = explainer.explain(preprocess(batch), target)
            maps = heatmaps(result.maps, method)
            if maps.ndim != 4:
                raise ValueError(f"window explanation needs one 3D map per window; got maps of "
                                 f"shape {maps.shape}. Use a 3D model and a single target.")
            variances = result.extras.get("variance") if with_variance else None
            for number, ((y0, x0), cam) in enumerate(zip(chunk, maps, strict=True)):
                # flush(z0) moved the buffer to start at z0: a window fills its whole depth
                region = (slice(0, depth), slice(y0, y0 + height), slice(x0, x0 + width))
                if with_variance:
                    moments.add(cam, weights, index=region,
                                within_variance=None if variances is None else variances[number])
                else:  # WeightedMoments.add's float32 sums, in place through one scratch buffer
                    moments.weight[region] += weights
                    np.multiply(weights, cam, out=weighted)
                    moments.total[region] += weighted
            predictions.extend(class_probabilities(result.outputs, target).tolist())
            # corners in the volume's coordinates: negative where a window overhangs the volume
            positions.extend((z0 - z_pad, y0 - y_pad, x0 - x_pad) for y0, x0 in chunk)

        for finished in run_with_oom_backoff(corners, batch_size, work, device, notify):
            yield done + finished, total
        done += len(corners)
    flush(padded[0])
    return VolumeResult(maps=out, predictions=np.array(predictions, dtype=np.float32),
                        positions=positions,
                        mode="windows", window=window, uncertainty=uncertainty_out)


def padded_window(slab: np.ndarray, y0: int, x0: int, window: tuple[int, ...]) -> np.ndarray:
    """Cut one window out of a slab; pad by edge values where the volume is smaller.

    Kept for :mod:`napari_gradcam.distributed`'s copy of the window grid; the engine itself now
    reads mirrored blocks (:func:`read_mirrored`) and never needs it.
    """
    piece = slab[:, y0:y0 + window[1], x0:x0 + window[2]]
    missing = [(0, w - s) for s, w in zip(piece.shape, window, strict=True)]
    if any(after for _, after in missing):
        piece = np.pad(piece, missing, mode="edge")
    return piece
