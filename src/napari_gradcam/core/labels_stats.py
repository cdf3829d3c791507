"""Per-label statistics of a heat map inside a label image: does the CAM sit on the defects?

A user who has segmented the pores and cracks of a CT volume (a napari Labels layer) wants one
row per object: how hot the map is on it (mean and max CAM), what share of the map's positive
energy falls inside it (compare with ``area_share``, its chance level), and whether the map's
global maximum points at it (the pointing game of Zhang et al. 2016, per object).

The table is a plain ``dict`` of equally long NumPy columns, so it needs no pandas and goes
straight into a napari ``Labels.features`` table or a CSV file (:func:`write_csv`). Label names
("pore", "crack") come from the Labels layer's own ``features`` (:func:`label_names_from_features`)
so a row reads "3 crack", not just "3"; the CSV carries the map's provenance in ``#`` comment
lines, because a table of numbers without the model, layer and target that made them is not
evidence (:func:`write_csv`, :func:`suggest_csv_name`).
"""

from __future__ import annotations

import csv
import datetime as _dt
import itertools
import json
import math
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from napari_gradcam.core.metrics import energy_share_by_label, labels_near

LABEL_STAT_COLUMNS = (
    "label", "voxels", "mean_cam", "max_cam", "energy_share", "area_share", "pointing_hit",
    "name",
)
"""Columns of :func:`label_statistics`, in table order (``name`` last, so the numeric columns
keep the positions they had before names existed)."""


LABEL_TABLE_BYTES = 256 << 20
"""Working memory of :func:`label_statistics`: the map and the labels are read in blocks whose
float64/int64 copies and temporaries fit in this many bytes, so the table of a whole 1024³ scan
whose map lies on disk (a dask array over zarr chunks) costs this much, not several GB."""

_BYTES_PER_VOXEL = 40
"""What one voxel of a block costs while it is counted: the map as float64 (8) and its positive
part (8), the labels as int64 (8), the raw reads (up to 8 + 8) and a boolean mask."""


def _lazy(value: object) -> Any:
    """``value`` itself when it can be sliced without being read whole (NumPy, dask, zarr, a
    memory map: anything with ``shape``, a NumPy ``dtype`` and ``[...]``), else as a NumPy
    array (lists, tensors)."""
    if all(hasattr(value, name) for name in ("shape", "dtype", "__getitem__")):
        try:
            np.dtype(value.dtype)  # type: ignore[attr-defined]
        except TypeError:
            pass
        else:
            return value
    return np.asarray(value)


def _chunk_shape(array: Any) -> tuple[int, ...] | None:
    """The storage chunks of a dask (tuple of tuples) or zarr/h5py (tuple of ints) array, so
    that blocks are read whole chunks at a time; None for an in-memory array."""
    chunks = getattr(array, "chunks", None)
    if not isinstance(chunks, tuple) or len(chunks) != len(array.shape):
        return None
    try:
        return tuple(max(1, int(max(c) if isinstance(c, tuple) else c)) for c in chunks)
    except (TypeError, ValueError):
        return None


def _block_shape(shape: tuple[int, ...], chunks: tuple[int, ...] | None,
                 voxels: int) -> tuple[int, ...]:
    """A block of at most ``voxels`` voxels (unless one chunk is bigger), made of whole chunks.

    Grown from the last axis: whole rows, whole planes, then as many planes as fit, so an
    in-memory array is read in C-order slabs and a chunked one chunk by chunk (never a chunk
    twice). Chunks bigger than the budget are cut like an in-memory array.
    """
    unit = [min(c, s) for c, s in zip(chunks or (1,) * len(shape), shape, strict=True)]
    if math.prod(unit) > voxels:
        unit = [1] * len(shape)
    block = list(unit)
    for axis in reversed(range(len(shape))):
        others = math.prod(block) // block[axis]
        fits = max(1, voxels // others)
        if fits >= shape[axis]:
            block[axis] = shape[axis]
            continue
        block[axis] = max(unit[axis], fits // unit[axis] * unit[axis])
        break
    return tuple(block)


def _blocks(shape: tuple[int, ...], block: tuple[int, ...]) -> Iterator[tuple[slice, ...]]:
    starts = [range(0, size, step) for size, step in zip(shape, block, strict=True)]
    for corner in itertools.product(*starts):
        yield tuple(slice(c, min(c + step, size))
                    for c, step, size in zip(corner, block, shape, strict=True))


def _grown(total: np.ndarray, part: np.ndarray) -> np.ndarray:
    """``total + part`` for per-label sums of different lengths (labels seen so far)."""
    if len(part) > len(total):
        total = np.concatenate([total, np.zeros(len(part) - len(total), dtype=total.dtype)])
    total[: len(part)] += part
    return total


class _Accumulator:
    """Per-label sums over the blocks, in float64/int64: what :func:`label_statistics` needs,
    with the first-in-C-order maximum of :func:`~napari_gradcam.core.metrics.peak_position`."""

    def __init__(self) -> None:
        self.counts = np.zeros(0, dtype=np.int64)
        self.sums = np.zeros(0)
        self.positive = np.zeros(0)  # positive map mass per label, label 0 included
        self.maxima = np.zeros(0)
        self.low = np.inf
        self.high = -np.inf
        self.peak: tuple[int, ...] | None = None

    def add(self, where: tuple[slice, ...], cam: np.ndarray, labels: np.ndarray) -> None:
        flat_labels = labels.ravel()
        flat_cam = cam.ravel()
        counts = np.bincount(flat_labels)
        self.counts = _grown(self.counts, counts)
        self.sums = _grown(self.sums, np.bincount(flat_labels, weights=flat_cam))
        self.positive = _grown(self.positive, np.bincount(
            flat_labels, weights=np.clip(flat_cam, 0.0, None)))
        present = np.flatnonzero(counts)
        if len(self.maxima) < len(counts):
            self.maxima = np.concatenate([self.maxima,
                                          np.full(len(counts) - len(self.maxima), -np.inf)])
        self.maxima[present] = np.maximum(self.maxima[present], np.asarray(
            ndimage.maximum(cam, labels, index=present), dtype=np.float64))
        index = int(np.argmax(flat_cam))
        value = float(flat_cam[index])
        self.low = min(self.low, float(flat_cam.min()))
        position = tuple(int(s.start + i) for s, i in zip(
            where, np.unravel_index(index, cam.shape), strict=True))
        # the first maximum in C order, whatever order the blocks come in
        if value > self.high or (value == self.high and self.peak is not None
                                 and position < self.peak):
            self.high, self.peak = value, position

    def peak_position(self) -> tuple[int, ...] | None:
        """The map's first maximum, None for a flat map (it points nowhere)."""
        return None if self.high == self.low else self.peak


def _checked(cam: object, labels: object) -> tuple[Any, Any]:
    """Shapes and dtypes checked without reading the data (the values are checked per block)."""
    cam_arr, labels_arr = _lazy(cam), _lazy(labels)
    cam_shape, labels_shape = tuple(cam_arr.shape), tuple(labels_arr.shape)
    if cam_shape != labels_shape:
        raise ValueError(
            f"the CAM has shape {cam_shape} but the labels {labels_shape}; cut the labels "
            "to the part of the image the CAM covers (same slice or window) first"
        )
    if math.prod(cam_shape) == 0:
        raise ValueError("the CAM is empty (no pixels)")
    if np.dtype(labels_arr.dtype).kind not in "biu":
        raise TypeError(
            f"labels must be integers (a label image), got dtype {labels_arr.dtype}; convert a "
            "mask with mask.astype(int)"
        )
    if np.dtype(cam_arr.dtype).kind not in "biuf":
        raise TypeError(f"the CAM must hold real numbers, got dtype {cam_arr.dtype}")
    return cam_arr, labels_arr


def _read_block(cam: Any, labels: Any, where: tuple[slice, ...]) -> tuple[np.ndarray,
                                                                          np.ndarray]:
    cam_block = np.asarray(cam[where], dtype=np.float64)
    labels_block = np.asarray(labels[where])
    if labels_block.dtype.kind == "i" and labels_block.size and labels_block.min() < 0:
        raise ValueError("labels must be non-negative integers (0 is background)")
    if not np.isfinite(cam_block).all():
        raise ValueError("the CAM contains NaN or infinite values; recompute it from finite data")
    return cam_block, labels_block.astype(np.int64, copy=False)


def label_statistics(
    cam: object,
    labels: object,
    *,
    tolerance: float = 0.0,
    spacing: Sequence[float] | None = None,
    names: Mapping[int, str] | None = None,
    block_bytes: int = LABEL_TABLE_BYTES,
) -> dict[str, np.ndarray]:
    """One row per non-zero label of ``labels``: CAM statistics inside that object.

    ``cam`` and ``labels`` may be NumPy arrays or arrays on disk (dask, zarr, a memory map):
    they are read block by block (whole storage chunks where they have chunks), each block
    within ``block_bytes`` of working memory, and summed into float64 per-label totals, so a
    whole scan's table never holds the scan; the numbers equal those of the whole arrays to
    float rounding.

    Columns (see :data:`LABEL_STAT_COLUMNS`):

    ``label``, ``voxels``
        The label value and its pixel/voxel count.
    ``name``
        The label's name from ``names`` (label value -> name, e.g. read from the Labels
        layer's features with :func:`label_names_from_features`); an empty string where the
        label has none, so the column always exists and a CSV always has the same header.
    ``mean_cam``, ``max_cam``
        Mean and maximum of the map over the object.
    ``energy_share``
        Positive map mass inside the object / positive mass of the whole map
        (:func:`napari_gradcam.core.metrics.energy_share`: NaN when the map has no positive
        mass, since such a map says nothing about any object).
    ``area_share``
        The object's share of all pixels: what ``energy_share`` would be by chance.
    ``pointing_hit``
        True when the map's global maximum lies on the object (within ``tolerance``, measured
        in the units of ``spacing`` per axis, e.g. micrometres for an anisotropic CT): the
        pointing hit of :mod:`napari_gradcam.core.metrics`. A flat map points nowhere and hits
        nothing; several labels can be hit only with a tolerance.
    """
    cam_arr, labels_arr = _checked(cam, labels)
    shape = tuple(int(s) for s in cam_arr.shape)
    if tolerance < 0:
        raise ValueError(f"tolerance is a distance and must be >= 0, got {tolerance}")
    steps = tuple(float(s) for s in (spacing or (1.0,) * len(shape)))
    if len(steps) != len(shape) or min(steps) <= 0:
        raise ValueError(
            f"spacing needs one positive value per axis ({len(shape)}), got {spacing}"
        )
    if block_bytes <= 0:
        raise ValueError(f"block_bytes is a memory budget and must be > 0, got {block_bytes}")
    block = _block_shape(shape, _chunk_shape(cam_arr), max(1, block_bytes // _BYTES_PER_VOXEL))
    totals = _Accumulator()
    for where in _blocks(shape, block):
        totals.add(where, *_read_block(cam_arr, labels_arr, where))
    ids = np.flatnonzero(totals.counts)
    ids = ids[ids != 0].astype(np.int64)
    hit_labels: set[int] = set()
    peak = totals.peak_position()
    if peak is not None:
        hit_labels = ({int(np.asarray(labels_arr[peak]))} if tolerance == 0
                      else labels_near(labels_arr, peak, tolerance, steps))
    voxels = totals.counts[ids]
    # The energy share is additive over pixels, so the map collapsed to one value per label
    # (its positive mass; label 0 holds the rest) has the same shares as the map itself.
    every_label = np.arange(len(totals.positive))
    return {
        "label": ids,
        "voxels": voxels.astype(np.int64),
        "mean_cam": totals.sums[ids] / np.maximum(voxels, 1),
        "max_cam": totals.maxima[ids],
        "energy_share": energy_share_by_label(totals.positive, every_label, ids),
        "area_share": voxels / math.prod(shape),
        "pointing_hit": np.array([int(i) in hit_labels for i in ids], dtype=bool),
        "name": np.array([_name_of(int(i), names) for i in ids], dtype=str),
    }


def as_features(table: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The table as a napari ``Labels.features`` table: adds the ``index`` column napari uses
    to match rows to label values (so hovering a label shows its row in the status bar)."""
    return {"index": np.asarray(table["label"]), **{k: np.asarray(v) for k, v in table.items()}}


def write_csv(
    table: Mapping[str, Sequence[object]],
    path: str | os.PathLike[str],
    provenance: Mapping[str, Any] | None = None,
) -> Path:
    """Write a column table (dict of equally long columns) as CSV with a header row.

    ``provenance`` (the map's record: model, layer, target, method, ...) goes first as
    ``# key: value`` comment lines, one per key in the mapping's order, so the file says what
    produced its numbers; nested values (options, versions) are written as compact JSON and
    line breaks are escaped, so every comment stays one line. ``pandas.read_csv(path,
    comment="#")`` reads the table and skips them; :func:`read_csv_provenance` reads them back.
    """
    columns = list(table)
    if not columns:
        raise ValueError("the table has no columns; compute label statistics first")
    lengths = {len(table[c]) for c in columns}
    if len(lengths) != 1:
        raise ValueError(f"the table's columns differ in length: {sorted(lengths)}")
    path = Path(path)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        for key, value in (provenance or {}).items():
            handle.write(f"# {_one_line(str(key))}: {_comment_value(value)}\n")
        writer = csv.writer(handle)
        writer.writerow(columns)
        for row in zip(*(table[c] for c in columns), strict=True):
            writer.writerow([_cell(value) for value in row])
    return path


def read_csv_provenance(path: str | os.PathLike[str]) -> dict[str, str]:
    """The ``# key: value`` lines at the top of a CSV written by :func:`write_csv`, as text.

    Values come back as written (JSON text for nested values); only the leading comment block
    is read, so a ``#`` inside the table is never taken for provenance.
    """
    record: dict[str, str] = {}
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if not line.startswith("# "):
                break
            key, _, value = line[2:].rstrip("\n").partition(": ")
            record[key] = value
    return record


def _one_line(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\r", "\\r").replace("\n", "\\n")


def _comment_value(value: object) -> str:
    if isinstance(value, str):
        return _one_line(value)
    if value is None or isinstance(value, (bool, int, float)):
        return json.dumps(value)
    return json.dumps(value, default=str, separators=(",", ":"))


_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")


def _slug(value: object, limit: int = 40) -> str:
    """A file-name-safe piece: runs of other characters become one ``-``, cut to ``limit``."""
    return _UNSAFE.sub("-", str(value)).strip("-.")[:limit].strip("-.")


def suggest_csv_name(provenance: Mapping[str, Any] | None) -> str:
    """A default file name that tells label tables apart: image, model, target, method, time.

    Two tables of the same image with different models, targets or methods (or the same
    settings at different times) get different names, so a "Save" with the default never
    overwrites another run's numbers. The image is the provenance's ``source`` (its file stem
    when it is a path), the time its ``created`` stamp (now when missing), to the second.
    """
    record = dict(provenance or {})
    source = record.get("source") or record.get("image")
    image = Path(str(source)).name.split(".")[0] if source else ""
    created = record.get("created")
    try:
        stamp = _dt.datetime.fromisoformat(str(created)) if created else None
    except ValueError:
        stamp = None
    stamp = stamp or _dt.datetime.now(_dt.timezone.utc)
    layers = record.get("layers")
    layer = "+".join(str(x) for x in layers) if isinstance(layers, (list, tuple)) else layers
    parts = [image, record.get("model"), layer, record.get("target"), record.get("method"),
             stamp.strftime("%Y%m%d-%H%M%S")]
    pieces = [piece for piece in (_slug(p) for p in parts if p not in (None, "")) if piece]
    return "_".join(["cam-labels", *pieces]) + ".csv"


def _name_of(label: int, names: Mapping[int, str] | None) -> str:
    if not names:
        return ""
    name = names.get(label)
    return "" if name is None else str(name)


NAME_COLUMNS = ("name", "label_name", "class", "class_name")
"""Columns of a Labels layer's features that :func:`label_names_from_features` reads as the
label's name, in order of preference."""


def label_names_from_features(features: object) -> dict[int, str]:
    """Label value -> name from a napari Labels layer's ``features`` (or ``properties``).

    ``features`` is a table with columns: a pandas DataFrame, or a dict of equally long
    columns. The label value of each row is its ``index`` column (napari's own convention),
    else its ``label`` column, else the row number (napari's rule when there is no
    ``index``). The name is the first of :data:`NAME_COLUMNS` present. Rows whose name is
    missing (None, NaN, empty) are left out; no name column gives an empty dict. No napari
    import: the core stays Qt-free and the widget passes ``layer.features``.
    """
    if features is None:
        return {}
    columns = list(features.columns if hasattr(features, "columns") else features)  # type: ignore
    name_column = next((c for c in NAME_COLUMNS if c in columns), None)
    if name_column is None:
        return {}
    names = list(features[name_column])  # type: ignore[index]
    id_column = next((c for c in ("index", "label") if c in columns), None)
    ids = list(features[id_column]) if id_column else list(range(len(names)))  # type: ignore
    result: dict[int, str] = {}
    for value, name in zip(ids, names, strict=True):
        if name is None or (isinstance(name, float) and np.isnan(name)):
            continue
        try:
            label = int(value)
        except (TypeError, ValueError) as error:
            raise ValueError(
                f"the Labels features' {id_column!r} column holds {value!r}, not a label value"
            ) from error
        text = str(name).strip()
        if text:
            result[label] = text
    return result


def _cell(value: object) -> object:
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    return value
