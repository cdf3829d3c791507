"""napari readers: CT stacks that keep their voxel size, and Grad-CAM maps that open as maps.

napari's built-in reader opens a TIFF stack at voxel size 1 and an OME-Zarr map as an opaque
grey image. These two readers give napari what the files say:

* **TIFF** (``*.tif``, ``*.tiff``, ``*.ome.tif``): the ImageJ (``spacing``, resolution,
  ``unit``, ``x/y/zorigin``) or OME (``PhysicalSize*``, ``Plane`` positions) voxel size and
  origin as the layer's ``scale`` and ``translate`` in micrometres, with ``units`` and
  ``axis_labels``. A file named ``*_labels.tif`` holding integers opens as a Labels layer (the
  ground truth ``napari-gradcam sample ct --labels`` writes, or a painted mask). A TIFF with
  napari-gradcam provenance (a map saved as TIFF) opens as a map.
* **OME-Zarr** (``*.zarr``, ``*.ome.zarr``): scale and ``translation`` from the NGFF
  ``coordinateTransformations`` (the level's own and the image's, multiplied out), all levels
  of a pyramid. A store napari-gradcam wrote (its provenance attribute is there) opens as a
  map: :data:`~napari_gradcam.display.MAP_COLORMAP`, additive blending, contrast limits from
  the recorded value range and the provenance in the layer metadata, as the dock widget would
  have made it. Other OME-Zarr images open as grey images with their scale; plain zarr arrays
  with scale 1.

Our TIFF reader takes every TIFF, also those without voxel size metadata, and does not step
aside for them: napari picks the readers to offer by file name alone (it never asks
``get_reader`` first), so declining would not keep napari's default; it would only turn the
user's choice of napari-gradcam in napari's "choose a reader" dialog into an error.

No Qt, napari or torch import: the readers return plain layer-data tuples, and the data stays
lazy where the format allows (a dask array over the zarr chunks, big TIFFs memory-mapped), so a
map volume larger than RAM opens at once.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from napari_gradcam.display import MAP_BLENDING, MAP_COLORMAP, MAP_OPACITY
from napari_gradcam.io import ATTRS_KEY, TIFF_SUFFIXES

LayerData = tuple[Any, dict[str, Any], str]
ReaderFunction = Callable[[Any], list[LayerData]]

#: Kept for code that imported the old names; the values live in :mod:`napari_gradcam.display`.
COLORMAP = MAP_COLORMAP
BLENDING = MAP_BLENDING
OPACITY = MAP_OPACITY
#: File name endings (before the suffix) that mark a scan's label image.
LABELS_STEMS = ("_labels", "-labels", "_label", "-label", ".labels")


def _single_path(path: str | os.PathLike | list | tuple) -> Path | None:
    if isinstance(path, (list, tuple)):
        if len(path) != 1:
            return None
        path = path[0]
    if not isinstance(path, (str, os.PathLike)):
        return None
    return Path(path).expanduser()


def _zarr_we_read(path: Path) -> bool:
    """An OME-Zarr image (ours or not) or a plain zarr array; other zarr groups (several
    arrays, no ``multiscales``) are left to other readers."""
    from napari_gradcam.placement import ome_zarr_attrs

    if not path.is_dir():
        return False
    if (ome_zarr_attrs(path) or {}).get("multiscales"):
        return True
    if (path / ".zarray").is_file():
        return True
    meta = path / "zarr.json"
    if meta.is_file():
        import json

        try:
            return json.loads(meta.read_text(encoding="utf-8")).get("node_type") == "array"
        except (OSError, ValueError, AttributeError):
            return False
    return False


def get_reader(path: str | os.PathLike | list | tuple) -> ReaderFunction | None:
    """napari's reader hook for zarr: our maps as maps, other OME-Zarr images with their scale
    and origin, plain zarr arrays; None for anything else (another reader's business)."""
    single = _single_path(path)
    if single is None or not _zarr_we_read(single):
        return None
    return read_zarr


def get_tiff_reader(path: str | os.PathLike | list | tuple) -> ReaderFunction | None:
    """napari's reader hook for TIFF files (one file at a time; see the module docstring for
    why it takes those without voxel size too)."""
    single = _single_path(path)
    if single is None or not single.name.lower().endswith(TIFF_SUFFIXES) or not single.is_file():
        return None
    return read_tiff


def read_zarr(path: str | os.PathLike | list | tuple) -> list[LayerData]:
    """Layer data for one OME-Zarr store or zarr array: ``[(dask array or pyramid, kwargs,
    "image")]``."""
    import dask.array as da

    from napari_gradcam.io import read_volume
    from napari_gradcam.placement import ngff_translation, ome_zarr_attrs

    single = _single_path(path)
    if single is None:
        raise ValueError(f"expected one .zarr path, got {path!r}")
    attrs = ome_zarr_attrs(single) or {}
    try:
        array, info = read_volume(single, ndim=None)
    except ValueError:
        # read_volume wants what a model can explain (one channel, one time point); napari
        # shows any OME-Zarr image, so one that is not ours opens whole instead.
        if ATTRS_KEY in attrs or not attrs.get("multiscales"):
            raise
        array, info = _whole_ome_zarr(single, attrs)
    data = array if hasattr(array, "compute") else da.from_zarr(array)
    ndim = data.ndim
    kwargs = _placement_kwargs(single, info.scale, ngff_translation(single, ndim)
                               if attrs.get("multiscales") else (0.0,) * ndim,
                               info.unit, info.axes,
                               spatial_axes=None if len(info.axes) <= 3 else "zyx")
    levels = _pyramid(single, data, attrs)
    if ATTRS_KEY in attrs:
        record = dict(info.metadata)
        kwargs.update(_map_kwargs(single, record, attrs))
    else:
        kwargs["name"] = _stem(single)
        kwargs["metadata"] = {"source_path": str(single)}
        window = _omero_window(attrs, single)
        if window is not None:
            kwargs["contrast_limits"] = window
    if len(levels) > 1:
        kwargs["multiscale"] = True
        return [(levels, kwargs, "image")]
    return [(data, kwargs, "image")]


#: The old name of :func:`read_zarr` (it only read our maps then).
read_gradcam_zarr = read_zarr


def read_tiff(path: str | os.PathLike | list | tuple) -> list[LayerData]:
    """Layer data for one TIFF: an image at its voxel size and origin, a Labels layer for a
    ``*_labels.tif`` of integers, or a map for a TIFF napari-gradcam wrote."""
    single = _single_path(path)
    if single is None:
        raise ValueError(f"expected one TIFF path, got {path!r}")
    return [_tiff_layer(single, lazy=None)]


def _tiff_layer(single: Path, lazy: bool | None) -> LayerData:
    """:func:`read_tiff`'s layer data; ``lazy=True`` maps the pixels instead of reading them
    (what :func:`declared_scale` needs: the placement, not the data)."""
    import numpy as np
    import tifffile

    from napari_gradcam.io import read_volume
    from napari_gradcam.placement import tiff_placement

    array, info = read_volume(single, ndim=None, lazy=lazy)
    with tifffile.TiffFile(single) as tif:
        letters = str(tif.series[0].axes).upper()
    zyx = (1.0, 1.0, 1.0, *info.scale)[-3:]
    origin_zyx, ome_record = tiff_placement(single, zyx)
    record = dict(info.metadata) or ome_record
    rgb = (len(letters) == array.ndim and letters.endswith("S")
           and array.shape[-1] in (3, 4))
    spatial = letters[:-1] if rgb else letters
    if len(spatial) != array.ndim - (1 if rgb else 0):  # tifffile squeezed differently
        spatial = "ZYX"[-(array.ndim - (1 if rgb else 0)):]
    stacks = [c for c in spatial if c not in "YX"]
    if len(stacks) == 1 and stacks[0] in "IQ":  # an anonymous stack of planes: a CT's depth
        spatial = spatial.replace(stacks[0], "Z")
    where = {"Z": 0, "Y": 1, "X": 2}
    scale = tuple(zyx[where[c]] if c in where else 1.0 for c in spatial)
    translate = tuple(origin_zyx[where[c]] if c in where else 0.0 for c in spatial)
    kwargs = _placement_kwargs(single, scale, translate, info.unit, spatial.lower(),
                               spatial_axes="zyx")
    if record:
        kwargs.update(_map_kwargs(single, record, {}, need_range=False))
        return array, kwargs, "image"
    kwargs["name"] = _stem(single)
    kwargs["metadata"] = {"source_path": str(single)}
    if not rgb and _stem(single).lower().endswith(LABELS_STEMS) and np.issubdtype(
            np.dtype(array.dtype), np.integer):
        return array, kwargs, "labels"
    if rgb:
        kwargs["rgb"] = True
    return array, kwargs, "image"


def declared_scale(path: str | os.PathLike) -> tuple[tuple[float, ...], tuple[str, ...]] | None:
    """The voxel size and units a TIFF (ImageJ or OME metadata) or OME-Zarr file declares:
    ``(scale, units)`` with one entry per axis of the layer napari's built-in reader makes from
    it, or None when the file declares neither a voxel size nor a length unit.

    Why: a stack opened the ordinary way (napari's built-in reader, which ignores the metadata)
    sits at scale 1 in pixels; the dock widget asks this to tell the user the file says
    otherwise and to offer the file's voxel size. The numbers are exactly those our readers give
    the layer (one code path: :func:`read_tiff`/:func:`read_zarr`), so lengths come in
    micrometres (``"micrometer"``; ``"pixel"`` on axes without a length, as napari's default).

    The built-in reader keeps every axis of an OME-Zarr's full-resolution array, while ours
    drops singleton time and channel axes: those get scale 1 in ``"pixel"`` in front. A path
    that is no TIFF or zarr store we read gives None; a TIFF or zarr whose metadata is damaged
    or contradictory raises :class:`ValueError` naming the file (what our reader would say).
    """
    single = _single_path(path)
    if single is None or not single.exists():
        return None
    if get_tiff_reader(single) is not None:
        data, kwargs, _ = _tiff_layer(single, lazy=True)
        builtin_ndim = len(kwargs["scale"])
    elif get_reader(single) is not None:
        data, kwargs, _ = read_zarr(single)[0]
        builtin_ndim = _full_resolution_ndim(single, data)
    else:
        return None
    scale = tuple(float(s) for s in kwargs["scale"])
    units = tuple(str(u) for u in kwargs.get("units") or ("pixel",) * len(scale))
    if all(s == 1.0 for s in scale) and all(u == "pixel" for u in units):
        return None
    missing = max(builtin_ndim - len(scale), 0)
    return (1.0,) * missing + scale, ("pixel",) * missing + units


def _full_resolution_ndim(path: Path, data: Any) -> int:
    """How many axes the full-resolution array of a zarr store has (all of them: napari's
    built-in reader squeezes nothing); ``data`` is what :func:`read_zarr` gave."""
    from napari_gradcam.placement import ome_zarr_attrs

    level0 = data[0] if isinstance(data, list) else data
    attrs = ome_zarr_attrs(path) or {}
    try:
        dataset = attrs["multiscales"][0]["datasets"][0]["path"]
    except (KeyError, IndexError, TypeError):
        return level0.ndim
    import zarr

    return max(level0.ndim, zarr.open_group(str(path), mode="r")[dataset].ndim)


def _whole_ome_zarr(path: Path, attrs: dict[str, Any]) -> tuple[Any, Any]:
    """Level 0 of any OME-Zarr image with all its axes (channels and time too), its scale
    (the level's times the image's) with lengths in micrometres on the space axes."""
    import dask.array as da
    import zarr

    from napari_gradcam.io import VoxelInfo, to_micrometers
    from napari_gradcam.placement import transform_values

    try:
        image = attrs["multiscales"][0]
        dataset = image["datasets"][0]
        data = da.from_zarr(zarr.open_group(str(path), mode="r")[dataset["path"]])
        ndim = data.ndim
        own = transform_values(dataset.get("coordinateTransformations", []), "scale", ndim, 1)
        top = transform_values(image.get("coordinateTransformations", []), "scale", ndim, 1)
        axes = image.get("axes") or [{"name": n} for n in "tczyx"[-ndim:]]
        names = "".join(str(a.get("name", "?"))[:1].lower() for a in axes)
        space = [i for i, a in enumerate(axes) if a.get("type") in (None, "space")]
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as error:
        raise ValueError(f"{path} has malformed OME-Zarr 'multiscales' metadata ({error!r})"
                         ) from None
    scale = [a * b for a, b in zip(own, top, strict=True)]
    lengths, unit = to_micrometers([scale[i] for i in space],
                                   [axes[i].get("unit") for i in space],
                                   "".join(names[i] for i in space), path)
    for position, index in enumerate(space):
        scale[index] = lengths[position]
    return data, VoxelInfo(tuple(scale), unit, names, {})


def _placement_kwargs(path: Path, scale: Sequence[float], translate: Sequence[float],
                      unit: str | None, axes: str, spatial_axes: str | None = None
                      ) -> dict[str, Any]:
    """scale, translate, axis labels and units of a layer (units only where a length is
    known: napari's default is pixels). ``spatial_axes`` names the axes that carry ``unit``
    (all when None)."""
    ndim = len(scale)
    labels = tuple(axes) if len(axes) == ndim else tuple("zyx"[-ndim:]) if ndim <= 3 else None
    kwargs: dict[str, Any] = {"scale": tuple(float(s) for s in scale),
                              "translate": tuple(float(t) for t in translate)}
    if labels is not None:
        kwargs["axis_labels"] = labels
    if unit:
        kwargs["units"] = tuple(unit if spatial_axes is None or (labels and labels[i] in
                                                                  spatial_axes) else "pixel"
                                for i in range(ndim))
    return kwargs


def _map_kwargs(path: Path, record: dict[str, Any], attrs: dict[str, Any],
                need_range: bool = True) -> dict[str, Any]:
    """How a Grad-CAM map is shown: the shared map colormap, additive over the scan, the
    recorded contrast limits and the provenance in the metadata."""
    kwargs: dict[str, Any] = {
        "name": _layer_name(path, record),
        "colormap": MAP_COLORMAP,
        "blending": MAP_BLENDING,
        "opacity": MAP_OPACITY,
        "metadata": {ATTRS_KEY: record, "source_path": str(path)},
    }
    if need_range or record.get("value_range") is not None:
        kwargs["contrast_limits"] = _contrast_limits(record, attrs, path)
    return kwargs


def _stem(path: Path) -> str:
    """The layer name a file gives: its name without the format suffix."""
    from napari_gradcam.io import split_suffix

    return split_suffix(path)[0]


def _pyramid(path: Path, level0: Any, attrs: dict[str, Any]) -> list[Any]:
    """All levels of an OME-Zarr pyramid as dask arrays (level 0 first); ``[level0]`` for a
    single level or when the levels do not shrink as napari needs."""
    import dask.array as da
    import zarr

    datasets = ((attrs.get("multiscales") or [{}])[0] or {}).get("datasets") or []
    if len(datasets) < 2:
        return [level0]
    try:
        group = zarr.open_group(str(path), mode="r")
        levels = [level0]
        for dataset in datasets[1:]:
            level = da.from_zarr(group[dataset["path"]])
            extra = level.ndim - level0.ndim
            levels.append(level[(0,) * extra] if extra > 0 else level)
    except (KeyError, TypeError, ValueError):
        return [level0]
    shapes = [tuple(level.shape) for level in levels]
    if any(len(s) != len(shapes[0]) or any(b > a for a, b in zip(p, s, strict=True))
           for p, s in itertools.pairwise(shapes)):
        return [level0]
    return levels


def _omero_window(attrs: dict[str, Any], path: Path) -> tuple[float, float] | None:
    channels = (attrs.get("omero") or {}).get("channels") or []
    window = channels[0].get("window") if channels and isinstance(channels[0], dict) else None
    if isinstance(window, dict) and "start" in window and "end" in window:
        low, high = _two_numbers([window["start"], window["end"]], path,
                                 "omero.channels[0].window start/end")
        if math.isfinite(low) and math.isfinite(high) and high > low:
            return low, high
    return None


def _layer_name(path: Path, record: dict[str, Any]) -> str:
    method = record.get("method")
    layers = ", ".join(record.get("layers", []))
    detail = f" ({method} {layers})" if method else ""
    return f"{_stem(path)}{detail}"


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
