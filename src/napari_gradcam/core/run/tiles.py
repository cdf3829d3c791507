"""Where tiling happens: the one slice loop, the one window loop, and how their pieces are cut.

Every path that explains more than one model input runs one of the two loops below: the
widget's job (:mod:`napari_gradcam.core.run.job`), :func:`napari_gradcam.explain_volume`, the
command line and each dask chunk (:mod:`napari_gradcam.distributed`). Nothing else slices a
volume, so a fix to batching, blending or the mirrored border lands once.

* :func:`slices_loop`: batches of samples along one axis (planes of a stack, rows of a
  spectrum image, the single current plane). The caller says how to read a batch and where to
  write its maps; the loop explains (or, for an empty region, only predicts), reduces input
  gradients to one map per sample, checks the maps' shape, collects the predictions and backs
  off on out-of-memory (:func:`~napari_gradcam.core.device.run_with_oom_backoff`).
* :func:`windows_loop`: windows of a 3D model's size tile the volume with overlap; each
  window's map is weighted by a Gaussian profile (:func:`blending_weights`) and the
  overlapping contributions averaged. Its accumulators are one window deep and flushed as soon
  as no later window can touch a plane. ``planes=(lo, hi)`` restricts it to those planes of the
  volume: a dask chunk runs the same loop over its planes and gets exactly the one-process
  numbers (each voxel sees the same windows in the same order, in the same batches).

Why the windows overhang the volume (:func:`edge_pads`): a convolution pads its input with
zeros, so every window's map carries the network's response to the window's own border (on the
shipped CT classifier the outermost voxel plane of a window is 5-20x its interior). Where a
window's border *is* the volume's border no other window covers it, and the map showed a hot
stripe along the faces. So the volume is extended by mirroring (``reflect``) by ``edge_margin``
voxels, tiled, and cropped again; the mirroring is virtual (:func:`read_mirrored` reads one slab
and mirrors it in memory), so memory stays bounded by the window.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from napari_gradcam.core.device import run_with_oom_backoff
from napari_gradcam.core.engine import preserved_model_state
from napari_gradcam.core.methods import heatmaps
from napari_gradcam.core.metrics import class_probabilities
from napari_gradcam.core.preprocess import overflow_problem
from napari_gradcam.core.uncertainty import WeightedMoments

Progress = Generator[tuple[int, int], None, Any]
_RGB_TO_GREY = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R BT.601 luma


# --------------------------------------------------------------------------------------------
# The slice loop


@dataclass
class Batch:
    """One batch as the slice loop's ``read`` gives it: the model input and the target.

    ``explain=False`` (e.g. a region target with no region pixel in these planes): the model
    only predicts, and the maps are zeros.
    """

    tensor: torch.Tensor
    target: Any = None
    explain: bool = True


@dataclass
class BatchMaps:
    """What the slice loop hands ``write`` for samples ``start:stop``."""

    start: int
    stop: int
    maps: np.ndarray  # (B, *spatial), or (B, K, *spatial) for one map per class
    spread: np.ndarray | None  # the uncertainty explainer's std maps, same shape; else None
    outputs: np.ndarray  # the model's outputs (B, ...)
    target_indices: np.ndarray | None
    target: Any


@dataclass
class SlicesOutcome:
    predictions: np.ndarray  # (count, K)
    target_indices: np.ndarray | None  # (count,) when every batch reported them


def slices_loop(
    explainer: Any,
    count: int,
    batch_size: int,
    read: Callable[[int, int], Batch],
    write: Callable[[BatchMaps], None],
    *,
    spatial_dims: int,
    per_class: bool = False,
    method: str | None = None,
    notify: Callable[[str], None] | None = None,
) -> Generator[tuple[int, int], None, SlicesOutcome]:
    """Explain ``count`` samples in batches; yield ``(done, count)`` after each batch.

    ``read(start, stop)`` gives the :class:`Batch`, ``write`` stores its maps (the caller knows
    the output's layout). The maps are the method's, with input gradients reduced to one map per
    sample (:func:`~napari_gradcam.core.methods.heatmaps`); they must be ``(B, *spatial)`` with
    ``spatial_dims`` axes (``(B, K, *spatial)`` with ``per_class``). On out-of-memory the batch
    is halved and retried.
    """
    model = getattr(explainer, "model", None)
    device = getattr(explainer, "device", torch.device("cpu"))
    name = method if method is not None else getattr(explainer, "name", "")
    predictions: list[list[float] | None] = [None] * count
    indices: list[int] = [-1] * count
    expected = spatial_dims + 1 + int(per_class)

    def work(chunk: range) -> None:
        start, stop = chunk.start, chunk.stop
        batch = read(start, stop)
        spread = None
        if batch.explain:
            result = explainer.explain(batch.tensor, batch.target)
            outputs, target_indices = result.outputs, result.target_indices
            maps = heatmaps(result.maps, name)
            spread = result.extras.get("uncertainty")
            if maps.ndim != expected:
                what = "one map per class" if per_class else "a single target"
                raise ValueError(f"slice-wise explanation needs one {spatial_dims}D map per slice"
                                 f"{' and class' if per_class else ''}; the method returned maps "
                                 f"of shape {maps.shape}. Use {what}.")
        else:
            with preserved_model_state(model), torch.no_grad():
                outputs = model(batch.tensor.to(device)).float().cpu().numpy()
            maps = np.zeros((len(batch.tensor), *batch.tensor.shape[2:]), dtype=np.float32)
            target_indices = None
        write(BatchMaps(start, stop, maps, spread, outputs, target_indices, batch.target))
        for offset, probs in enumerate(class_probabilities(outputs, batch.target).tolist()):
            predictions[start + offset] = probs  # plain floats, see windows_loop
            if target_indices is not None:
                indices[start + offset] = int(target_indices[offset])

    for done in run_with_oom_backoff(range(count), batch_size, work, device, notify):
        yield done, count
    stacked = np.array(predictions, dtype=np.float32) if count else np.zeros((0, 0), "f4")
    found = np.array(indices) if indices and all(i >= 0 for i in indices) else None
    return SlicesOutcome(stacked, found)


# --------------------------------------------------------------------------------------------
# The window grid


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


def check_window(window: Sequence[int] | None, overlap: float) -> tuple[int, ...]:
    """The one check of a window and its overlap (every shell and loop calls this)."""
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    sizes = tuple(int(w) for w in (window or (64, 64, 64)))
    if len(sizes) != 3 or min(sizes) < 1:
        raise ValueError(f"window must be three positive sizes (z, y, x), got {sizes}")
    return sizes


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


def padded_window(slab: np.ndarray, y0: int, x0: int, window: tuple[int, ...]) -> np.ndarray:
    """Cut one window out of a slab; pad by edge values where the slab is smaller.

    Kept for callers outside the package; the window loop reads mirrored blocks instead."""
    piece = slab[:, y0:y0 + window[1], x0:x0 + window[2]]
    missing = [(0, w - s) for s, w in zip(piece.shape, window, strict=True)]
    if any(after for _, after in missing):
        piece = np.pad(piece, missing, mode="edge")
    return piece


# --------------------------------------------------------------------------------------------
# The window loop


#: The blending sums stay on a GPU only while they take at most this share of its free memory;
#: wider scans keep them in host RAM (the same numbers) and leave the GPU to the batches.
DEVICE_SUMS_SHARE = 0.25


def sums_device(device: torch.device, classes: int, shape: Sequence[int]) -> torch.device:
    """Where :class:`BlendSums` of ``classes`` maps over ``shape`` should live: the explainer's
    GPU when they fit in :data:`DEVICE_SUMS_SHARE` of its free memory, else the CPU."""
    if device.type != "cuda":
        return torch.device("cpu")
    needed = (classes + 1) * int(np.prod(shape)) * 4 * 2  # W, S per class, and a flush's copy
    free, _total = torch.cuda.mem_get_info(device)
    return device if needed <= DEVICE_SUMS_SHARE * free else torch.device("cpu")


class BlendSums:
    """``W = Σw`` and ``S_k = Σw·cam_k`` of the windows loop (float32) for every class at once.

    The same sums as :class:`~napari_gradcam.core.uncertainty.WeightedMoments` with
    ``variance=False`` (each window's ``w·cam`` is rounded to float32 and added in window order,
    so the blended map is the same number wherever the sums live; ``W`` is shared by the
    classes). On a GPU (:func:`sums_device`) a batch is weighted by one multiplication and each
    window added by one in-place slice addition, instead of NumPy passes over every window on
    the host; only finished planes come back. :meth:`add_windows` allocates everything it needs
    before it changes a sum, so an out-of-memory error leaves the sums as they were and the
    loop's back-off can run the batch again at a smaller size without counting a window twice.
    """

    def __init__(self, weights: np.ndarray, shape: Sequence[int], classes: int,
                 device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.weight = torch.zeros(tuple(shape), dtype=torch.float32, device=self.device)
        self.total = torch.zeros((classes, *shape), dtype=torch.float32, device=self.device)
        # the window's blending profile w (``self.weight`` is the running sum W)
        self.profile = torch.from_numpy(np.asarray(weights, np.float32)).to(self.device)

    def add_windows(self, maps: np.ndarray, depth_part: slice,
                    regions: Sequence[tuple[slice, ...]]) -> None:
        """Add windows' maps ``(n, classes, d, h, w)``, the planes ``depth_part`` of each
        window, with those planes of the blending weights, at ``regions`` (one per window)."""
        weights = self.profile[depth_part]
        # a blocking upload (the maps' host buffer may be freed as soon as this returns), and
        # the only allocation: the additions below are in place
        weighted = torch.as_tensor(np.ascontiguousarray(maps, dtype=np.float32)).to(
            self.device) * weights
        for number, region in enumerate(regions):
            self.weight[region] += weights
            self.total[(slice(None), *region)] += weighted[number]

    def mean(self, index: tuple[slice, ...]) -> list[np.ndarray]:
        """``S_k / W`` at ``index`` for each class (0 where no window reached), on the host;
        one class at a time, so the temporaries are one class's planes, not all of them."""
        weight = self.weight[index]
        reached, divisor = weight > 0, weight.clamp_min(1e-30)
        zero = torch.zeros((), device=self.device)
        return [torch.where(reached, total[index] / divisor, zero).cpu().numpy()
                for total in self.total]

    def drop_leading(self, planes: int) -> None:
        """Shift the sums ``planes`` along the depth axis and zero the freed end, in place."""
        if planes <= 0:
            return
        for buffer in (self.weight, self.total.transpose(0, 1)):  # depth first for both
            kept = len(buffer) - planes
            if kept > 0:
                buffer[:kept] = buffer[planes:].clone()
            buffer[max(kept, 0):] = 0


@dataclass
class WindowsOutcome:
    predictions: np.ndarray  # (n_windows, K) of the windows this plane range reports
    positions: list[tuple[int, ...]]  # their corners, in the volume's coordinates
    window: tuple[int, ...]
    total: int  # windows explained (those a chunk shares with its neighbour included)


def windows_loop(
    explainer: Any,
    volume: Any,
    outs: Sequence[Any],
    *,
    window: Sequence[int] | None,
    overlap: float = 0.25,
    batch_size: int = 8,
    target: Any = None,
    preprocess: Callable[[np.ndarray], torch.Tensor],
    blend: str = "gaussian",
    edge_margin: int | Sequence[int] | None = None,
    notify: Callable[[str], None] | None = None,
    uncertainty_outs: Sequence[Any] | None = None,
    planes: tuple[int, int] | None = None,
    method: str | None = None,
) -> Generator[tuple[int, int], None, WindowsOutcome]:
    """Blend the maps of overlapping windows over planes ``planes`` (default: all) of a 3D
    ``volume``; yield ``(done, total)`` windows after each batch.

    ``outs``: one array per map the explainer gives per window, each ``(hi - lo, Y, X)`` for
    ``planes=(lo, hi)``: one for a single target, one per class for ``AllClasses`` (all the
    classes' maps come from one forward pass per batch of windows). ``uncertainty_outs``, the
    same shapes, receive the standard deviation between overlapping windows (plus each
    window's own variance from an uncertainty explainer); the sums are then float64.

    Predictions are reported for the windows whose first real plane lies in ``planes`` (so the
    chunks of a volume report each window once); a window is explained by every plane range
    it touches.
    """
    window = check_window(window, overlap)
    shape = tuple(int(s) for s in volume.shape)
    lo, hi = planes if planes is not None else (0, shape[0])
    if not 0 <= lo < hi <= shape[0]:
        raise ValueError(f"planes must be a range inside 0..{shape[0]}, got {planes}")
    classes = len(outs)
    with_variance = uncertainty_outs is not None
    if with_variance and len(uncertainty_outs) != classes:  # type: ignore[arg-type]
        raise ValueError("give one uncertainty output per map output")
    name = method if method is not None else getattr(explainer, "name", "")
    device = getattr(explainer, "device", None) or torch.device("cpu")
    pads = edge_pads(shape, window, edge_margin)
    padded = tuple(s + a + b for s, (a, b) in zip(shape, pads, strict=True))
    starts = [window_starts(s, w, overlap) for s, w in zip(padded, window, strict=True)]
    weights = blending_weights(window, blend)
    depth, height, width = window
    (z_pad, _), (y_pad, _), (x_pad, _) = pads
    first, last = lo + z_pad, hi + z_pad  # the planes this call writes, in padded coordinates
    rows = [z0 for z0 in starts[0] if max(z0, first) < min(z0 + depth, last)]
    corners = list(itertools.product(starts[1], starts[2]))
    total = len(rows) * len(corners)
    # W = Σw, S = Σw·cam per class (the blended map S/W) and, with an uncertainty output, also
    # Σw·cam² (the windows' disagreement) in float64 for an accurate variance. One window deep.
    # Without the variance the sums live on the explainer's device (BlendSums): on a GPU the
    # weighting and accumulation of a batch are a few kernels instead of NumPy passes over
    # every window on the host, and only finished planes come back.
    buffer_shape = (depth, padded[1], padded[2])
    moments = [WeightedMoments(buffer_shape, np.float64, variance=True)
               for _ in range(classes)] if with_variance else []
    sums = None if with_variance else BlendSums(
        weights, buffer_shape, classes, sums_device(device, classes, buffer_shape))
    crop = (slice(y_pad, y_pad + shape[1]), slice(x_pad, x_pad + shape[2]))
    buffer_start = first
    predictions: list[list[float]] = []
    positions: list[tuple[int, ...]] = []

    def flush(until: int) -> None:
        nonlocal buffer_start
        until = min(max(until, first), last)
        count = until - buffer_start
        if count <= 0:
            return
        index = (slice(0, count), *crop)
        where = slice(buffer_start - first, until - first)
        if sums is not None:
            for k, blended in enumerate(sums.mean(index)):
                outs[k][where] = blended
            sums.drop_leading(count)  # shift in place: no new volume-wide buffers
        for k, accumulated in enumerate(moments):
            outs[k][where] = accumulated.mean(index)
            uncertainty_outs[k][where] = accumulated.std(index)  # type: ignore[index]
            accumulated.drop_leading(count)
        buffer_start = until

    done = 0
    for z0 in rows:
        flush(z0)  # now buffer_start == max(z0, first): the window's first plane kept here
        low, high = max(z0, first), min(z0 + depth, last)
        slab = read_mirrored(volume, (z0 - z_pad, -y_pad, -x_pad), (depth, *padded[1:]))
        depth_part = slice(low - z0, high - z0)
        region_rows = slice(0, high - low)
        owner = min(max(z0 - z_pad, 0), shape[0] - 1)
        owned = lo <= owner < hi

        def work(chunk: list[tuple[int, int]], slab: np.ndarray = slab, z0: int = z0,
                 depth_part: slice = depth_part, region_rows: slice = region_rows,
                 owned: bool = owned) -> None:
            batch = np.stack([slab[:, y0:y0 + height, x0:x0 + width] for y0, x0 in chunk])
            result = explainer.explain(preprocess(batch), target)
            maps = heatmaps(result.maps, name)
            if classes == 1 and maps.ndim == 4:
                maps = maps[:, None]
            if maps.ndim != 5 or maps.shape[1] != classes:
                count = "one 3D map" if classes == 1 else f"{classes} 3D maps (one per class)"
                raise ValueError(f"window explanation needs {count} per window; got maps of "
                                 f"shape {maps.shape}. Use a 3D model and a single target.")
            variances = result.extras.get("variance") if with_variance else None
            if variances is not None and np.ndim(variances) == 4:
                variances = np.asarray(variances)[:, None]
            regions = [(region_rows, slice(y0, y0 + height), slice(x0, x0 + width))
                       for y0, x0 in chunk]
            if sums is not None:
                sums.add_windows(maps[:, :, depth_part], depth_part, regions)
            for k, accumulated in enumerate(moments):
                for number, region in enumerate(regions):
                    within = None if variances is None else variances[number, k, depth_part]
                    accumulated.add(maps[number, k, depth_part], weights[depth_part],
                                    index=region, within_variance=within)
            if owned:
                # plain floats: NumPy views of each batch's small arrays, kept per window,
                # fragment the heap between the large per-batch temporaries (RSS grew with
                # the number of windows under glibc's default allocator)
                predictions.extend(class_probabilities(result.outputs, target).tolist())
                # corners in the volume's coordinates: negative where a window overhangs it
                positions.extend((z0 - z_pad, y0 - y_pad, x0 - x_pad) for y0, x0 in chunk)

        for finished in run_with_oom_backoff(corners, batch_size, work, device, notify):
            yield done + finished, total
        done += len(corners)
    flush(last)
    stacked = (np.array(predictions, dtype=np.float32) if predictions
               else np.zeros((0, 0), dtype=np.float32))
    return WindowsOutcome(stacked, positions, window, total)


# --------------------------------------------------------------------------------------------
# Cutting a layer's samples (the widget's N-D sources)


def read_slab(source: Any, plan: Any, start: int, stop: int, data: Any = None,
              channels: bool | None = None) -> np.ndarray:
    """One slab read from the source (a dask/zarr slab only): ``(B, *spatial[, C])``, or
    ``(B, C, *spatial)`` with a channel axis. ``start:stop`` runs along the sample axis; without
    one, B is 1. ``data`` (a region mask of the source's shape) is read the same way, at the
    map's position along the channel axis. Public so the shells cut a sample the job's way."""
    feed_channels = data is None and plan.channel_axis is not None
    data = source.data if data is None else data
    channels = source.rgb if channels is None else channels
    key: list[object] = []
    for axis in range(source.ndim):
        if axis in plan.fixed:
            key.append(plan.fixed[axis])
        elif axis == plan.channel_axis:
            key.append(slice(None) if feed_channels else plan.channel_position)
        elif axis == plan.sample_axis:
            key.append(slice(start, stop))
        else:
            begin, end = plan.box.get(axis, (0, source.shape[axis]))
            key.append(slice(begin, end))
    if channels:
        key.append(slice(None))
    slab = np.asarray(data[tuple(key)])
    kept = [a for a in range(source.ndim)
            if a not in plan.fixed and (feed_channels or a != plan.channel_axis)]
    if plan.sample_axis is None:
        slab = slab[None]
        kept = [-1, *kept]  # the batch axis
    sample = kept.index(plan.sample_axis if plan.sample_axis is not None else -1)
    if not feed_channels:
        return np.moveaxis(slab, sample, 0)
    return np.moveaxis(slab, (sample, kept.index(plan.channel_axis)), (0, 1))


def to_model_input(slab: np.ndarray, source: Any, in_channels: int) -> np.ndarray:
    """RGB → grey (1-channel models) or channels-first RGB (3-channel models); float32.

    Values beyond float32 become inf silently: the finiteness check names the overflow."""
    with np.errstate(over="ignore"):
        slab = slab.astype(np.float32, copy=False)
    if not source.rgb:
        return slab
    rgb = slab[..., :3]
    if in_channels == 1:
        return rgb @ _RGB_TO_GREY
    return np.moveaxis(rgb, -1, 1)


def check_finite(batch: np.ndarray, where: str, raw: np.ndarray | None = None) -> None:
    """Refuse NaN/inf in a float32 ``batch``; ``raw`` (the data before the float32 cast) tells
    finite values too large for float32 (1e300 in float64 data) from real NaN or inf."""
    if not np.isfinite(batch).all():
        overflow = None if raw is None else overflow_problem(raw, np.float32, where)
        if overflow:
            raise ValueError(overflow)
        raise ValueError(f"NaN or infinite values in {where}: the model cannot explain them. "
                         "Fill or mask them first (e.g. replace NaN by the background)")


class BlockView:
    """The last three axes of an N-D source at the plan's fixed positions, as a 3D array the
    window loop reads slab by slab (float32; an overflow of float64 data is named)."""

    def __init__(self, source: Any, plan: Any) -> None:
        self.source, self.plan = source, plan
        self.shape = tuple(source.shape[a] for a in plan.spatial_axes)
        self.dtype = np.dtype(getattr(source.data, "dtype", np.float32))
        self.ndim = 3

    def __getitem__(self, key: object) -> np.ndarray:
        parts = list(key) if isinstance(key, tuple) else [key]
        parts += [slice(None)] * (3 - len(parts))
        full: list[object] = [self.plan.fixed[a] for a in range(self.source.ndim - 3)]
        raw = np.asarray(self.source.data[tuple(full + parts)])
        with np.errstate(over="ignore"):  # an overflow is named just below
            block = raw.astype(np.float32, copy=False)
        if raw.dtype.kind == "f" and raw.dtype.itemsize > 4 and not np.isfinite(block).all():
            overflow = overflow_problem(raw, np.float32, f"the volume {self.source.name!r}")
            if overflow:  # say so here: after the cast it would read as NaN/inf in the data
                raise ValueError(overflow)
        return block
