"""napari reader: open the OME-Zarr heatmaps written by napari-gradcam as a ready overlay.

``napari maps.zarr`` (or drag and drop) gives an image layer at the scan's voxel size, in a
heat colormap with additive blending over the CT volume, with the contrast limits of the whole
map volume and the provenance record in the layer metadata, exactly as the dock widget would
have made it. Other zarr stores are left to other readers (``get_reader`` returns None).

No Qt and no napari import: the reader returns plain layer-data tuples, and the data stays
lazy (a dask array over the zarr chunks), so a map volume larger than RAM opens at once.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from napari_gradcam.io import ATTRS_KEY

LayerData = tuple[Any, dict[str, Any], str]
ReaderFunction = Callable[[Any], list[LayerData]]

COLORMAP = "turbo"
BLENDING = "additive"
OPACITY = 0.6


def _single_path(path: str | os.PathLike | list | tuple) -> Path | None:
    if isinstance(path, (list, tuple)):
        if len(path) != 1:
            return None
        path = path[0]
    if not isinstance(path, (str, os.PathLike)):
        return None
    return Path(path).expanduser()


def _our_attrs(path: Path) -> dict[str, Any] | None:
    """The group attributes if ``path`` is an OME-Zarr written by napari-gradcam, else None."""
    attrs_file = path / ".zattrs"
    if not path.is_dir() or not attrs_file.is_file():
        return None
    import json

    try:
        attrs = json.loads(attrs_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(attrs, dict) or ATTRS_KEY not in attrs or "multiscales" not in attrs:
        return None
    return attrs


def get_reader(path: str | os.PathLike | list | tuple) -> ReaderFunction | None:
    """napari's reader hook: a reader for our OME-Zarr outputs, None for anything else."""
    single = _single_path(path)
    if single is None or not single.name.lower().endswith(".zarr"):
        return None
    if _our_attrs(single) is None:
        return None
    return read_gradcam_zarr


def read_gradcam_zarr(path: str | os.PathLike | list | tuple) -> list[LayerData]:
    """Layer data for one napari-gradcam OME-Zarr: ``[(dask array, kwargs, "image")]``."""
    import dask.array as da

    from napari_gradcam.io import read_volume

    single = _single_path(path)
    if single is None:
        raise ValueError(f"expected one napari-gradcam .zarr path, got {path!r}")
    array, info = read_volume(single)
    attrs = _our_attrs(single) or {}
    record = dict(info.metadata)
    data = array if hasattr(array, "compute") else da.from_zarr(array)
    kwargs: dict[str, Any] = {
        "name": _layer_name(single, record),
        "scale": tuple(info.scale),
        "colormap": COLORMAP,
        "blending": BLENDING,
        "opacity": OPACITY,
        "contrast_limits": _contrast_limits(record, attrs, single),
        "metadata": {ATTRS_KEY: record, "source_path": str(single)},
        "axis_labels": tuple(info.axes),
    }
    if info.unit:
        kwargs["units"] = (info.unit,) * len(info.scale)
    return [(data, kwargs, "image")]


def _layer_name(path: Path, record: dict[str, Any]) -> str:
    method = record.get("method")
    layers = ", ".join(record.get("layers", []))
    detail = f" ({method} {layers})" if method else ""
    return f"{path.name.removesuffix('.zarr').removesuffix('.ome')}{detail}"


def _contrast_limits(record: dict[str, Any], attrs: dict[str, Any],
                     path: Path) -> tuple[float, float]:
    """The map volume's value range as recorded when it was written (reading the whole volume
    to find it would defeat lazy loading); [0, 1] when the file does not say.

    A record that is there but malformed (edited by hand, written by another tool) is an error
    that names the store and the field, not a bare float-parsing message."""
    low, high = 0.0, 1.0
    if record.get("value_range") is not None:
        low, high = _two_numbers(record["value_range"], path, f"{ATTRS_KEY}.value_range")
    else:
        channels = (attrs.get("omero") or {}).get("channels") or []
        window = channels[0].get("window") if channels and isinstance(channels[0], dict) \
            else None
        if isinstance(window, dict) and "start" in window and "end" in window:
            low, high = _two_numbers([window["start"], window["end"]], path,
                                     "omero.channels[0].window start/end")
    if not (math.isfinite(low) and math.isfinite(high)):  # an all-NaN map: any range will do
        low, high = 0.0, 1.0
    if not high > low:  # a constant map (e.g. all zero) still needs a valid range
        high = low + 1.0
    return low, high


def _two_numbers(value: Any, path: Path, field: str) -> tuple[float, float]:
    if isinstance(value, (list, tuple)) and len(value) == 2 and not any(
            isinstance(v, bool) for v in value):
        try:
            return float(value[0]), float(value[1])
        except (TypeError, ValueError):
            pass
    raise ValueError(f"{path}: the field {field!r} in its .zattrs is malformed ({value!r}); "
                     "expected two numbers [low, high] (rewrite the map with napari-gradcam "
                     "or fix the field)")
