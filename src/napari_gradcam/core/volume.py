"""Explaining whole 3D arrays: a 2D model slice by slice, or a 3D model over sliding windows.

The array-level API (:func:`explain_volume`, :func:`volume_job`, :func:`run_job`): a volume
in, a map of the same shape out (any array that takes slice assignment: NumPy, a memmap, a
zarr array, so the result can live on disk). The loops themselves live in
:mod:`napari_gradcam.core.run.tiles` (one slice loop, one window loop, the window grid, the
blending and the mirrored border, re-exported here under their old names); this module only
checks the array and drains them. The work is a generator that yields progress between
batches: the napari widget runs such a job in a thread worker that can stop at any yield, the
command line and :func:`explain_volume` drain it directly.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch

from napari_gradcam.core.run.tiles import (  # noqa: F401  (the public names of this module)
    Batch,
    BatchMaps,
    blending_weights,
    class_probabilities,
    edge_pads,
    mirrored_indices,
    padded_window,
    read_mirrored,
    slices_loop,
    window_grid,
    window_starts,
    windows_loop,
)
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

    def index_of(start: int, stop: int) -> tuple[slice, ...]:
        index = [slice(None)] * ndim
        index[axis] = slice(start, stop)
        return tuple(index)

    def read(start: int, stop: int) -> Batch:
        slab = np.moveaxis(np.asarray(volume[index_of(start, stop)], dtype=np.float32), axis, 0)
        return Batch(preprocess(slab), target)

    def write(batch: BatchMaps) -> None:
        index = index_of(batch.start, batch.stop)
        out[index] = np.moveaxis(batch.maps, 0, axis)
        if uncertainty_out is not None:
            if batch.spread is None:
                raise ValueError("an uncertainty map slice by slice needs an explainer that "
                                 "makes one: wrap it in core.uncertainty.UncertaintyExplainer")
            uncertainty_out[index] = np.moveaxis(batch.spread, 0, axis)

    outcome = yield from slices_loop(explainer, count, batch_size, read, write, spatial_dims=2,
                                     notify=notify)
    return VolumeResult(
        maps=out,
        predictions=outcome.predictions,
        positions=[(i,) for i in range(count)],
        mode="slices",
        axis=axis,
        target_indices=outcome.target_indices,
        uncertainty=uncertainty_out,
    )


def _windows_job(explainer, volume, out, window, overlap, batch_size, target, preprocess,
                 blend, edge_margin, notify, uncertainty_out=None):
    outcome = yield from windows_loop(
        explainer, volume, [out], window=window, overlap=overlap, batch_size=batch_size,
        target=target, preprocess=preprocess, blend=blend, edge_margin=edge_margin,
        notify=notify, uncertainty_outs=None if uncertainty_out is None else [uncertainty_out])
    return VolumeResult(maps=out, predictions=outcome.predictions, positions=outcome.positions,
                        mode="windows", window=outcome.window, uncertainty=uncertainty_out)
