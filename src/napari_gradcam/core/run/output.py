"""Maps written to disk while they are made: an OME-Zarr per map, filled chunk by chunk.

A job with ``ExplainRequest.output`` set writes each batch's maps straight into an OME-Zarr
(our layout: NGFF 0.4, zarr format 2, the provenance under :data:`~napari_gradcam.io.ATTRS_KEY`)
instead of a volume-sized array in memory, so a scan larger than RAM can be explained from the
widget. The store exists at its final path from the start and is readable while it fills (the
widget shows it as a lazy layer and refreshes it); chunks not yet written read as 0.

The multiscale pyramid is filled **as the job goes**: planes are finished in order along one
axis (the slice axis, or the first axis for windows, whose loop flushes planes in order), and
each coarser level is computed (2×2×2 mean) from the finer level's planes as soon as both planes
it depends on are done. So a partially written store shows the finished part at every level.

Honest state: the provenance record carries ``complete`` (false until the last plane and level
are written) and ``planes_done`` / ``planes_total`` along ``progress_axis``; a cancelled run
leaves the part done on disk and says so.
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from napari_gradcam.core.normalise import robust_limits
from napari_gradcam.io import (
    ATTRS_KEY,
    add_zarr_array,
    create_ome_zarr,
    jsonable,
    update_zarr_attrs,
)

MIN_PYRAMID_SIZE = 64
"""No pyramid level smaller than this along its longest axis (napari needs none that small)."""


def pyramid_shapes(shape: Sequence[int], smallest: int = MIN_PYRAMID_SIZE) -> list[tuple[int, ...]]:
    """Level 0 and every 2× coarser level (each axis halved, rounded up) while the longest
    axis of the next level stays at least ``smallest``."""
    shapes = [tuple(int(s) for s in shape)]
    while True:
        coarser = tuple(max(1, math.ceil(s / 2)) for s in shapes[-1])
        if coarser == shapes[-1] or max(coarser) < smallest:
            return shapes
        shapes.append(coarser)


def downsample_mean(block: np.ndarray) -> np.ndarray:
    """2×2×2 mean; an odd axis's last voxel is averaged with itself (edge padding)."""
    pads = [(0, s % 2) for s in block.shape]
    if any(after for _, after in pads):
        block = np.pad(block, pads, mode="edge")
    z, y, x = (s // 2 for s in block.shape)
    return block.reshape(z, 2, y, 2, x, 2).mean(axis=(1, 3, 5), dtype=np.float64).astype(
        np.float32)


class _StoredMap:
    """What every map written to a file shares: slice assignment with keys of the map's full
    shape (``shape``, the source's number of axes, length 1 along collapsed axes given as
    integers) or of its three stored axes (``shape3``), and the value range tracked while
    writing (no second pass over a map larger than memory)."""

    shape: tuple[int, ...]
    shape3: tuple[int, ...]
    ndim: int
    dtype: np.dtype
    low: float = np.inf
    high: float = -np.inf

    def _key3(self, key: Any) -> tuple[Any, ...]:
        parts = list(key) if isinstance(key, tuple) else [key]
        if len(parts) == self.ndim and self.ndim != 3:
            parts = [p for p in parts if not isinstance(p, (int, np.integer))]
        parts += [slice(None)] * (3 - len(parts))
        if len(parts) != 3:
            raise IndexError(f"cannot index a 3D on-disk map with {key!r}")
        return tuple(parts)

    def _write(self, array: Any, key: Any, value: Any) -> tuple[Any, ...]:
        """Write ``value`` at ``key`` into ``array`` (the stored three axes); the stored key."""
        key3 = self._key3(key)
        target = tuple(len(range(*part.indices(size))) for part, size
                       in zip(key3, self.shape3, strict=True) if isinstance(part, slice))
        value = np.asarray(value, dtype=np.float32).reshape(target)
        array[key3] = value
        if value.size:
            finite = value[np.isfinite(value)]
            if finite.size:
                self.low = min(self.low, float(finite.min()))
                self.high = max(self.high, float(finite.max()))
        return key3

    def reshape(self, shape: Sequence[int]) -> _StoredMap:
        """The same map seen with the stored three axes (the window loop's view)."""
        if tuple(shape) != self.shape3:
            raise ValueError(f"an on-disk map of shape {self.shape3} cannot take shape {shape}")
        return self

    @property
    def value_range(self) -> tuple[float, float]:
        """The lowest and highest value written, as the file holds them (rounded to its
        dtype)."""
        if self.low > self.high:
            return (0.0, 0.0)
        return (float(self.dtype.type(self.low)), float(self.dtype.type(self.high)))


class FileMap(_StoredMap):
    """One map written into a ``.tif`` or ``.npy`` output: an
    :func:`~napari_gradcam.io.open_output` volume (memory-mapped, its whole size reserved
    first, so a full disk stops the run at once); one level, no pyramid."""

    def __init__(self, volume: Any, full_shape: Sequence[int]) -> None:
        self.volume, self.path = volume, Path(volume.partial)
        self.shape = tuple(int(s) for s in full_shape)
        self.ndim = len(self.shape)
        self.shape3 = tuple(int(s) for s in volume.array.shape)
        self.dtype = np.dtype(volume.array.dtype)

    def __setitem__(self, key: Any, value: Any) -> None:
        self._write(self.volume.array, key, value)

    def finish(self, updates: Mapping[str, Any] | None = None) -> None:
        """Add to the record (a TIFF keeps the one it was created with: its header comes
        first)."""
        self.volume.update_attrs(dict(updates or {}))


class DiskMap(_StoredMap):
    """One map being written into an OME-Zarr at ``path``, with its pyramid.

    Takes slice assignment like the in-memory map it replaces: keys of the map's full shape
    (``full_shape``, the source's number of axes, length 1 along collapsed axes given as
    integers) or of its three stored axes. ``progress_axis`` (0..2, of the stored axes) is the
    axis along which planes are finished in order.
    """

    def __init__(self, path: str | Path, shape3: Sequence[int], full_shape: Sequence[int],
                 stored_axes: Sequence[int], progress_axis: int, *,
                 scale: Sequence[float], unit: str | None,
                 translation: Sequence[float] | None, attrs: Mapping[str, Any],
                 chunks: Sequence[int] | None = None, dtype: object = "float32") -> None:
        import zarr

        self.path = Path(path)
        self.shape3 = tuple(int(s) for s in shape3)
        self.shape = tuple(int(s) for s in full_shape)
        self.ndim = len(self.shape)
        self.dtype = np.dtype(dtype)  # float32, or float16 (half the file)
        if self.dtype not in (np.dtype(np.float32), np.dtype(np.float16)):
            raise ValueError(f"a map is stored as float32 or float16, not {self.dtype}")
        self.progress_axis = int(progress_axis)
        self.levels = pyramid_shapes(self.shape3)
        chunks = tuple(chunks or _chunks(self.shape3, self.progress_axis))
        self.stored_axes = [a for a, size in enumerate(self.shape) if a in stored_axes]
        record = {**dict(attrs), "complete": False, "planes_done": 0,
                  "map_shape": list(self.shape), "stored_axes": self.stored_axes,
                  "planes_total": self.shape3[self.progress_axis],
                  "progress_axis": self.progress_axis}
        create_ome_zarr(self.path, self.shape3, scale=scale, unit=unit, chunks=chunks,
                        dtype=self.dtype, attrs=record, name=str(attrs.get("target", "gradcam")))
        group = zarr.open_group(str(self.path), mode="r+")
        multiscales = group.attrs["multiscales"]
        datasets = []
        for level, level_shape in enumerate(self.levels):
            factor = [2 ** level] * 3
            if level:
                add_zarr_array(group, str(level), level_shape,
                               tuple(min(c, s) for c, s in zip(chunks, level_shape, strict=True)),
                               self.dtype)
            transforms: list[dict[str, Any]] = [{
                "type": "scale", "scale": [float(s) * f for s, f in zip(scale, factor,
                                                                        strict=True)]}]
            if translation is not None and any(translation):
                # a coarser voxel's centre sits half a fine voxel further in
                offset = [float(t) + (f - 1) * float(s) / 2.0
                          for t, s, f in zip(translation, scale, factor, strict=True)]
                transforms.append({"type": "translation", "translation": offset})
            elif level:
                transforms.append({"type": "translation", "translation": [
                    (f - 1) * float(s) / 2.0 for s, f in zip(scale, factor, strict=True)]})
            datasets.append({"path": str(level), "coordinateTransformations": transforms})
        multiscales[0]["datasets"] = datasets
        group.attrs["multiscales"] = multiscales
        self.arrays = [group[str(level)] for level in range(len(self.levels))]
        self._done = np.zeros(self.shape3[self.progress_axis], dtype=bool)
        self._upto = [0] * len(self.levels)  # planes finished per level (a prefix)
        self.low, self.high = np.inf, -np.inf

    # -- writing ---------------------------------------------------------------------------

    def __setitem__(self, key: Any, value: Any) -> None:
        key3 = self._write(self.arrays[0], key, value)
        planes = key3[self.progress_axis]
        start, stop, _ = planes.indices(self.shape3[self.progress_axis]) if isinstance(
            planes, slice) else (int(planes), int(planes) + 1, 1)
        self.mark_done(start, stop)

    def mark_done(self, start: int, stop: int) -> None:
        """Planes ``[start, stop)`` along the progress axis are written (by this map, or by
        dask workers writing level 0 directly): the coarser levels follow as far as they can."""
        self._done[start:stop] = True
        self._advance()

    def _advance(self, final: bool = False) -> None:
        done = int(np.argmin(self._done)) if not self._done.all() else len(self._done)
        if done == self._upto[0] and not final:
            return
        self._upto[0] = done
        axis = self.progress_axis
        for level in range(1, len(self.levels)):
            finer_done, finer_total = self._upto[level - 1], self.levels[level - 1][axis]
            complete = finer_done == finer_total
            target = math.ceil(finer_done / 2) if complete else finer_done // 2
            start = self._upto[level]
            if target <= start:
                continue
            finer = self.arrays[level - 1]
            read = [slice(None)] * 3
            read[axis] = slice(2 * start, min(2 * target, finer_total))
            block = np.moveaxis(np.asarray(finer[tuple(read)]), axis, 0)
            coarse = np.moveaxis(downsample_mean(block), 0, axis)
            write = [slice(None)] * 3
            write[axis] = slice(start, target)
            self.arrays[level][tuple(write)] = coarse
            self._upto[level] = target
        update_zarr_attrs(self.path, {"planes_done": self._upto[0]})

    def finish(self, updates: Mapping[str, Any] | None = None) -> None:
        """Complete the coarser levels and mark the store complete (with ``updates``)."""
        self._advance(final=True)
        if not self._done.all():
            raise RuntimeError(f"{self.path}: {int(self._done.sum())} of {len(self._done)} "
                               "planes were written; the map is incomplete")
        update_zarr_attrs(self.path, {**dict(updates or {}), "complete": True,
                                      "planes_done": len(self._done)})

    # -- reading ---------------------------------------------------------------------------

    def lazy(self) -> Any:
        """Level 0 as a lazy dask array of the map's full shape (never read whole)."""
        return map_layer_data(self.path)[0]


def lazy_level(path: str | Path, level: int = 0) -> Any:
    import dask.array as da
    import zarr

    return da.from_zarr(zarr.open_array(str(Path(path) / str(level)), mode="r"))


def _chunks(shape3: Sequence[int], progress_axis: int, depth: int = 16,
            plane: int = 256) -> tuple[int, ...]:
    return tuple(max(1, min(size, depth if axis == progress_axis else plane))
                 for axis, size in enumerate(shape3))


def store_state(path: str | Path) -> dict[str, Any]:
    """``complete``, ``planes_done``, ``planes_total`` of a map store (while it fills too)."""
    import zarr

    record = dict(zarr.open_group(str(path), mode="r").attrs.get(ATTRS_KEY, {}))
    return {key: record.get(key) for key in ("complete", "planes_done", "planes_total",
                                             "progress_axis")}


def map_layer_data(path: str | Path) -> list[Any]:
    """A map store as napari layer data: one lazy dask array per pyramid level, finest first
    (give napari ``multiscale=True`` when there is more than one), each with the source's
    number of axes (length 1 along the axes the map was not explained along, as the job's
    in-memory maps), so the layer takes the source's scale and the map's origin."""
    import zarr

    group = zarr.open_group(str(path), mode="r")
    record = dict(group.attrs.get(ATTRS_KEY, {}))
    datasets = group.attrs["multiscales"][0]["datasets"]
    levels = [lazy_level(path, int(d["path"])) for d in datasets]
    full, stored = record.get("map_shape"), record.get("stored_axes")
    if full and stored and len(full) != 3:
        key = tuple(slice(None) if axis in stored else None for axis in range(len(full)))
        levels = [level[key] for level in levels]
    return levels


class _PlainWriter:
    """A plain zarr array (the class map beside a map) taking the map's full-shape keys."""

    def __init__(self, array: Any, full_shape: Sequence[int]) -> None:
        self.array, self.shape, self.ndim = array, tuple(full_shape), len(full_shape)

    def __setitem__(self, key: Any, value: Any) -> None:
        parts = list(key) if isinstance(key, tuple) else [key]
        if len(parts) == self.ndim and self.ndim != 3:
            parts = [p for p in parts if not isinstance(p, (int, np.integer))]
        self.array[tuple(parts)] = value


def label_path(output: str | Path, label: str, several: bool) -> Path:
    """Where one label's map goes: ``output`` itself, or ``<stem>_<label>.zarr`` beside it
    when a run makes one map per class."""
    from napari_gradcam.io import split_suffix

    output = Path(output).expanduser()
    if not several:
        return output
    stem, suffix = split_suffix(output)
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in label)
    return output.with_name(f"{stem}_{safe}{suffix or '.zarr'}")


def store_placement(source: Any, plan: Any, stored: Sequence[int]
                    ) -> tuple[list[float], str | None, list[float]]:
    """Scale, unit and translation of a map store, so that re-opening it puts the map exactly
    where the map layer sat on its source: the source layer's voxel size in micrometres when
    it has one (and its translation converted alike), else the layer's own scale and
    translation in its own (non-length) units, else pixels at the map's origin."""
    origin = plan.origin(source.shape)
    voxel = getattr(source, "voxel_size", None)
    layer_scale = getattr(source, "scale", None)
    layer_translate = getattr(source, "translate", None)
    if voxel is not None:
        scale = [float(voxel[a]) for a in stored]
        unit: str | None = "micrometer"
        per_unit = [scale[i] / abs(float(layer_scale[a])) if layer_scale else 1.0
                    for i, a in enumerate(stored)]
    elif layer_scale is not None:
        scale = [abs(float(layer_scale[a])) for a in stored]
        unit, per_unit = None, [1.0] * len(stored)
    else:
        scale, unit, per_unit = [1.0] * len(stored), None, [1.0] * len(stored)
    shift = [float(layer_translate[a]) * per_unit[i] if layer_translate else 0.0
             for i, a in enumerate(stored)]
    translation = [shift[i] + origin[a] * scale[i] for i, a in enumerate(stored)]
    return scale, unit, translation


PREDICTIONS_KEPT = 10_000
"""Per-sample probabilities are stored in a map's provenance up to this many samples."""


def prediction_attrs(predictions: np.ndarray, positions: Sequence[Sequence[int]],
                     class_names: Sequence[str], regression: bool = False) -> dict[str, Any]:
    """What a map's record says about the model's predictions (every writer of a map file:
    the job's on-disk output and the dask runner): how many samples each class won, and the
    per-sample probabilities with their positions (up to :data:`PREDICTIONS_KEPT`). A
    regression head's predictions are values, not classes: only a note is kept, since counted
    as "predicted classes" they would read as class probabilities."""
    if regression:
        return {"predictions_note": "regression head: predicted values are not recorded"}
    predictions = np.asarray(predictions)
    counts = {}
    if predictions.size:
        winners = np.bincount(np.argmax(predictions, 1), minlength=len(class_names))
        counts = {name: int(n) for name, n in zip(class_names, winners, strict=False)}
    attrs: dict[str, Any] = {"predicted_counts": counts}
    if len(positions) <= PREDICTIONS_KEPT:
        attrs["predictions"] = {
            "positions": [[int(i) for i in p] for p in positions],
            "probabilities": np.round(predictions, 6).tolist(),
        }
    return attrs


class MemoryOutput:
    """The maps of a job held in memory (small images): zero-filled arrays of the map's shape,
    one per label (and per label's uncertainty), the class map of a segmentation model."""

    def __init__(self, shape: Sequence[int], labels: Sequence[str], uncertainty: bool,
                 class_map: bool) -> None:
        shape = tuple(int(s) for s in shape)
        self.maps = {label: np.zeros(shape, dtype=np.float32) for label in labels}
        self.spreads = ({label: np.zeros(shape, dtype=np.float32) for label in labels}
                        if uncertainty else {})
        self.class_map = np.zeros(shape, dtype=np.int16) if class_map else None

    def finish(self, provenance: Mapping[str, Any], predictions: Any, positions: Any, *,
               regression: bool = False, seconds: float | None = None
               ) -> tuple[dict[str, Any], dict[str, Any], Any, dict[str, tuple[float, float]]]:
        """The maps, spreads and class map, and each map's contrast limits."""
        limits = {label: robust_limits(array) for label, array in self.maps.items()}
        return self.maps, self.spreads, self.class_map, limits

    def abort(self) -> None:
        """Nothing to undo: the arrays go with the job."""


class DiskOutput:
    """Every on-disk array of one job: a :class:`DiskMap` per label (and per label's
    uncertainty), the class map of a segmentation model beside the first map.

    ``request.keep_partial`` False: each store is written under a temporary name
    (:func:`napari_gradcam.io.atomic_path`) and renamed to its path by :meth:`finish`;
    :meth:`abort` removes them (the command line's "a file that exists is a finished map").
    Such an output may also be a ``.tif`` or ``.npy`` file (:class:`FileMap`: one level, no
    class map), as the command line offers. ``notify`` hears about leftovers of killed runs
    that were cleaned up."""

    def __init__(self, request: Any, source: Any, plan: Any, labels: Sequence[str],
                 class_map: bool, record: Mapping[str, Any],
                 notify: Callable[[str], None] | None = None) -> None:
        from napari_gradcam.io import check_output_path, output_kind, uncertainty_path

        kind = output_kind(request.output)
        if kind != "zarr" and request.keep_partial:
            raise ValueError(f"the map is written as OME-Zarr: name the output *.zarr, not "
                             f"{Path(request.output).name!r}")
        full = plan.out_shape(source.shape)
        stored = [a for a in range(len(full)) if not plan.collapsed(a)]
        if len(stored) != 3:
            raise ValueError(f"on-disk output is for volumes (a 3D map); this run makes a "
                             f"{len(stored)}D map: leave the output empty")
        several = len(labels) > 1
        paths = {label: label_path(request.output, label, several) for label in labels}
        spread_paths = ({label: uncertainty_path(path) for label, path in paths.items()}
                        if request.uncertainty else {})
        inputs = [source.path] if getattr(source, "path", None) else []
        for path in [*paths.values(), *spread_paths.values()]:  # all refused before any is made
            check_output_path(path, request.overwrite, inputs=inputs)
        self.several, self.stored = several, stored
        self._publish = contextlib.ExitStack()
        self.final_paths: dict[Path, Path] = {}  # where each store is written -> its path
        try:
            open_map = self._opener(request, source, plan, kind, full, notify)
            self.maps = {label: open_map(path, _target_attrs(record, label, several))
                         for label, path in paths.items()}
            self.spreads = {label: open_map(path, {**_target_attrs(record, label, several),
                                                   "kind": "uncertainty"})
                            for label, path in spread_paths.items()}
            self.class_map = None
            if class_map and kind == "zarr":
                import zarr

                first = self.maps[labels[0]]
                group = zarr.open_group(str(first.path), mode="r+")
                array = add_zarr_array(group, "class_map", first.shape3,
                                       first.arrays[0].chunks, "int16")
                self.class_map = _PlainWriter(array, full)
        except BaseException:
            self.abort()  # what was already created under a temporary name goes
            raise

    def _opener(self, request: Any, source: Any, plan: Any, kind: str, full: Sequence[int],
                notify: Callable[[str], None] | None) -> Callable[..., _StoredMap]:
        """``open_map(path, attrs)``: one map file, in place or under a temporary name."""
        from napari_gradcam.io import atomic_path, open_output

        shape3 = tuple(full[a] for a in self.stored)
        progress = self.stored.index(plan.sample_axis) if plan.sample_axis in self.stored else 0
        scale, unit, translation = store_placement(source, plan, self.stored)
        inputs = [source.path] if getattr(source, "path", None) else []

        def open_map(path: Path, attrs: dict[str, Any]) -> _StoredMap:
            if kind != "zarr":  # a TIFF or .npy file: io's memory-mapped output
                volume = self._publish.enter_context(open_output(
                    path, shape3, scale=scale, unit=unit, dtype=request.dtype, attrs=attrs,
                    overwrite=request.overwrite, inputs=inputs, notify=notify))
                self.final_paths[volume.partial] = path
                return FileMap(volume, full)
            if request.keep_partial:
                if request.overwrite and path.exists():
                    import shutil

                    shutil.rmtree(path)
                where = path
            else:
                where = self._publish.enter_context(atomic_path(
                    path, overwrite=request.overwrite, inputs=inputs, notify=notify))
            self.final_paths[where] = path
            return DiskMap(where, shape3, full, stored_axes=self.stored,
                           progress_axis=progress, scale=scale, unit=unit,
                           translation=translation, attrs=attrs, chunks=request.chunks,
                           dtype=request.dtype)

        return open_map

    def finish(self, provenance: Mapping[str, Any], predictions: Any, positions: Any, *,
               regression: bool = False, seconds: float | None = None
               ) -> tuple[dict[str, Any], dict[str, Any], Any, dict[str, tuple[float, float]]]:
        """Complete every store (the record with the predictions, ``seconds`` the run took,
        each store's value range) and publish it; the lazy maps, spreads and class map, and
        contrast limits read from the coarsest level (never the whole map)."""
        from napari_gradcam.io import set_display_window

        summary = prediction_attrs(predictions, positions, provenance.get("class_names", ()),
                                   regression)
        if seconds is not None:
            summary["seconds"] = round(float(seconds), 3)
        uncertainty = dict(provenance.get("options", {})).get("uncertainty")
        limits = {}
        for label, store in [*self.maps.items(), *self.spreads.items()]:
            spread = store in self.spreads.values()
            low, high = store.value_range
            attrs = {**_target_attrs(provenance, label, self.several), **summary,
                     "value_range": [low, high]}
            if spread:
                attrs.pop("predictions", None)  # kept once, with the map
                attrs.update(kind="uncertainty", uncertainty=uncertainty)
            elif isinstance(store, DiskMap):
                attrs["class_map"] = "class_map" if self.class_map is not None else None
            store.finish(attrs)
            if isinstance(store, DiskMap):
                set_display_window(store.path, low, high)
                if not spread:
                    limits[label] = coarse_limits(store.path)
            elif not spread:
                limits[label] = (low, high)
        self._publish.close()  # temporary names -> the outputs' paths (keep_partial False)
        maps = {label: self._lazy(store) for label, store in self.maps.items()}
        spreads = {label: self._lazy(store) for label, store in self.spreads.items()}
        class_map = None
        if self.class_map is not None:
            import dask.array as da
            import zarr

            first = self.final_paths[next(iter(self.maps.values())).path]
            lazy = da.from_zarr(zarr.open_array(str(first / "class_map"), mode="r"))
            full = self.class_map.shape
            if len(full) != 3:
                lazy = lazy[tuple(slice(None) if a in self.stored else None
                                  for a in range(len(full)))]
            class_map = lazy
        return maps, spreads, class_map, limits

    def _lazy(self, store: _StoredMap) -> Any:
        """A finished map read lazily from where it now is (never read whole)."""
        path = self.final_paths[store.path]
        if isinstance(store, DiskMap):
            return map_layer_data(path)[0]
        import dask.array as da

        from napari_gradcam.io import read_volume

        array = da.asarray(read_volume(path, lazy=True)[0])
        return array[tuple(slice(None) if a in self.stored else None
                           for a in range(len(store.shape)))]

    def abort(self) -> None:
        """The run failed or stopped: stores written under temporary names are removed (their
        outputs never appear); stores written in place stay, marked incomplete."""
        self._publish.__exit__(*sys.exc_info())


def _target_attrs(record: Mapping[str, Any], label: str, several: bool) -> dict[str, Any]:
    return {**record, "target": label} if several else dict(record)


def job_output(request: Any, source: Any, plan: Any, labels: Sequence[str], class_map: bool,
               record: Mapping[str, Any], notify: Callable[[str], None] | None = None
               ) -> DiskOutput | MemoryOutput:
    """Where a job's maps go: on disk with ``request.output``, else in memory. Both take the
    loops' writes the same way and are completed by one ``finish`` call."""
    if request.output is not None:
        return DiskOutput(request, source, plan, labels, class_map, record, notify)
    return MemoryOutput(plan.out_shape(source.shape), labels, bool(request.uncertainty),
                        class_map)


def coarse_limits(path: str | Path) -> tuple[float, float]:
    """Contrast limits of a map store from its coarsest level: 0 (or the minimum) to the
    99.9th percentile, as the in-memory maps get them, at a tiny fraction of the reading."""
    import zarr

    group = zarr.open_group(str(path), mode="r")
    datasets = group.attrs["multiscales"][0]["datasets"]
    return robust_limits(np.asarray(group[datasets[-1]["path"]][...]))


__all__ = [
    "PREDICTIONS_KEPT",
    "DiskMap",
    "DiskOutput",
    "FileMap",
    "MemoryOutput",
    "coarse_limits",
    "downsample_mean",
    "job_output",
    "jsonable",
    "label_path",
    "lazy_level",
    "map_layer_data",
    "prediction_attrs",
    "pyramid_shapes",
    "store_state",
]
