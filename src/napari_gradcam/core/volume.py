"""Explaining whole volumes: a 2D model slice by slice, or a 3D model over sliding windows.

A CT stack can be larger than RAM, so nothing here holds the whole volume or its activations:

* **slices**: a batch of slices along the chosen axis is read (``np.asarray`` of a slab, so a
  dask or zarr array only loads that slab), explained, and written into ``out``.
* **windows**: windows of a 3D model's size tile the volume with overlap; each window's map is
  weighted by a smooth (Gaussian) window so seams vanish, and overlapping contributions are
  averaged. Windows are processed one row of depth at a time, with accumulators only
  ``window depth × height × width`` deep, flushed to ``out`` as soon as no later window can
  touch those planes.

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
from napari_gradcam.core.targets import TargetSpec

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


def class_probabilities(outputs: np.ndarray) -> np.ndarray:
    """(N, K) probabilities: softmax of logits; segmentation outputs averaged over pixels;
    outputs without a class axis (regression) returned as they are, one row per sample."""
    logits = torch.from_numpy(np.asarray(outputs, dtype=np.float32))
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
    notify: Callable[[str], None] | None = None,
) -> Generator[tuple[int, int], None, VolumeResult]:
    """Yield ``(done, total)`` after every batch; return the :class:`VolumeResult`."""
    shape = _check_volume(volume)
    preprocess = preprocess or default_preprocess
    out = _make_out(out, shape)
    if mode == "slices":
        return (yield from _slices_job(explainer, volume, out, axis, batch_size, target,
                                       preprocess, notify))
    if mode == "windows":
        return (yield from _windows_job(explainer, volume, out, window, overlap, batch_size,
                                        target, preprocess, blend, notify))
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


def _slices_job(explainer, volume, out, axis, batch_size, target, preprocess, notify):
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
        for offset, probs in enumerate(class_probabilities(result.outputs)):
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
    """Per-voxel weights of one window: Gaussian (σ = size/8, as nnU-Net) or constant."""
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


def _windows_job(explainer, volume, out, window, overlap, batch_size, target, preprocess,
                 blend, notify):
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    shape = tuple(volume.shape)
    window = tuple(int(w) for w in (window or (64, 64, 64)))
    if len(window) != 3 or min(window) < 1:
        raise ValueError(f"window must be three positive sizes (z, y, x), got {window}")
    starts = [window_starts(s, w, overlap) for s, w in zip(shape, window, strict=True)]
    effective = tuple(min(s, w) for s, w in zip(shape, window, strict=True))
    weights = blending_weights(effective, blend)
    total = int(np.prod([len(s) for s in starts]))
    depth, height, width = effective
    device = getattr(explainer, "device", torch.device("cpu"))
    method = getattr(explainer, "name", "")
    accumulated = np.zeros((depth, shape[1], shape[2]), dtype=np.float32)
    weight_sum = np.zeros_like(accumulated)
    buffer_start = 0
    predictions: list[list[float]] = []
    positions: list[tuple[int, ...]] = []
    done = 0

    def flush(until: int) -> None:
        nonlocal buffer_start
        planes = until - buffer_start
        if planes <= 0:
            return
        out[buffer_start:until] = accumulated[:planes] / np.maximum(weight_sum[:planes], 1e-12)
        for buffer in (accumulated, weight_sum):  # shift in place: no new volume-wide buffers
            buffer[:-planes] = buffer[planes:].copy()
            buffer[-planes:] = 0.0
        buffer_start = until

    for z0 in starts[0]:
        flush(z0)
        slab = np.asarray(volume[z0:z0 + depth], dtype=np.float32)
        corners = list(itertools.product(starts[1], starts[2]))

        def work(chunk: list[tuple[int, int]], slab: np.ndarray = slab, z0: int = z0) -> None:
            batch = np.stack([padded_window(slab, y0, x0, window) for y0, x0 in chunk])
            result = explainer.explain(preprocess(batch), target)
            maps = heatmaps(result.maps, method)
            if maps.ndim != 4:
                raise ValueError(f"window explanation needs one 3D map per window; got maps of "
                                 f"shape {maps.shape}. Use a 3D model and a single target.")
            for (y0, x0), cam in zip(chunk, maps, strict=True):
                cam = cam[:depth, :height, :width] * weights
                # flush(z0) moved the buffer to start at z0: a window fills its whole depth
                region = (slice(0, depth), slice(y0, y0 + height), slice(x0, x0 + width))
                accumulated[region] += cam
                weight_sum[region] += weights
            predictions.extend(class_probabilities(result.outputs).tolist())
            positions.extend((z0, y0, x0) for y0, x0 in chunk)

        for finished in run_with_oom_backoff(corners, batch_size, work, device, notify):
            yield done + finished, total
        done += len(corners)
    flush(shape[0])
    return VolumeResult(maps=out, predictions=np.array(predictions, dtype=np.float32),
                        positions=positions,
                        mode="windows", window=window)


def padded_window(slab: np.ndarray, y0: int, x0: int, window: tuple[int, ...]) -> np.ndarray:
    """Cut one window out of a slab; pad by edge values where the volume is smaller."""
    piece = slab[:, y0:y0 + window[1], x0:x0 + window[2]]
    missing = [(0, w - s) for s, w in zip(piece.shape, window, strict=True)]
    if any(after for _, after in missing):
        piece = np.pad(piece, missing, mode="edge")
    return piece
