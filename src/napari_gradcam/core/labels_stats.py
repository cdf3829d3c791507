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
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from napari_gradcam.core.metrics import energy_share_by_label, labels_near, peak_position

LABEL_STAT_COLUMNS = (
    "label", "voxels", "mean_cam", "max_cam", "energy_share", "area_share", "pointing_hit",
    "name",
)
"""Columns of :func:`label_statistics`, in table order (``name`` last, so the numeric columns
keep the positions they had before names existed)."""


def _checked(cam: object, labels: object) -> tuple[np.ndarray, np.ndarray]:
    cam_arr = np.asarray(cam, dtype=np.float64)
    labels_arr = np.asarray(labels)
    if cam_arr.shape != labels_arr.shape:
        raise ValueError(
            f"the CAM has shape {cam_arr.shape} but the labels {labels_arr.shape}; cut the labels "
            "to the part of the image the CAM covers (same slice or window) first"
        )
    if cam_arr.size == 0:
        raise ValueError("the CAM is empty (no pixels)")
    if labels_arr.dtype.kind not in "biu":
        raise TypeError(
            f"labels must be integers (a label image), got dtype {labels_arr.dtype}; convert a "
            "mask with mask.astype(int)"
        )
    if labels_arr.dtype.kind == "i" and labels_arr.min() < 0:
        raise ValueError("labels must be non-negative integers (0 is background)")
    if not np.isfinite(cam_arr).all():
        raise ValueError("the CAM contains NaN or infinite values; recompute it from finite data")
    return cam_arr, labels_arr.astype(np.int64, copy=False)


def label_statistics(
    cam: object,
    labels: object,
    *,
    tolerance: float = 0.0,
    spacing: Sequence[float] | None = None,
    names: Mapping[int, str] | None = None,
) -> dict[str, np.ndarray]:
    """One row per non-zero label of ``labels``: CAM statistics inside that object.

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
    if tolerance < 0:
        raise ValueError(f"tolerance is a distance and must be >= 0, got {tolerance}")
    steps = tuple(float(s) for s in (spacing or (1.0,) * cam_arr.ndim))
    if len(steps) != cam_arr.ndim or min(steps) <= 0:
        raise ValueError(
            f"spacing needs one positive value per axis ({cam_arr.ndim}), got {spacing}"
        )
    ids = np.unique(labels_arr)
    ids = ids[ids != 0]
    flat_labels = labels_arr.ravel()
    counts = np.bincount(flat_labels)
    sums = np.bincount(flat_labels, weights=cam_arr.ravel())
    maxima = (np.asarray(ndimage.maximum(cam_arr, labels_arr, index=ids), dtype=np.float64)
              if len(ids) else np.zeros(0))
    hit_labels: set[int] = set()
    peak = peak_position(cam_arr)
    if peak is not None:
        hit_labels = ({int(labels_arr[peak])} if tolerance == 0
                      else labels_near(labels_arr, peak, tolerance, steps))
    voxels = counts[ids]
    return {
        "label": ids.astype(np.int64),
        "voxels": voxels.astype(np.int64),
        "mean_cam": sums[ids] / np.maximum(voxels, 1),
        "max_cam": maxima,
        "energy_share": energy_share_by_label(cam_arr, labels_arr, ids),
        "area_share": voxels / cam_arr.size,
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
