"""napari writer: save an image layer (a Grad-CAM map, or any image) with where it sits.

File ▸ Save Selected Layer(s) with napari-gradcam (or ``layer.save(path,
plugin="napari-gradcam")``) writes, by the name's ending:

* ``.zarr`` / ``.ome.zarr``: OME-Zarr (NGFF 0.4, zarr format 2, chunked, written slab by slab
  so a dask-backed map larger than RAM saves too), with a ``scale`` and, for a shifted layer,
  a ``translation`` per axis, the length unit of the spatial axes, the display window as
  ``omero`` metadata and the provenance record under ``"napari_gradcam"``;
* ``.ome.tif`` / ``.ome.tiff``: OME-TIFF with ``PhysicalSize*`` (µm), the origin as ``Plane``
  positions and the provenance as JSON in the image ``Description``;
* ``.tif`` / ``.tiff``: an ImageJ hyperstack with ``spacing``, resolution, ``unit``,
  ``x/y/zorigin`` and the provenance as JSON in ``Info`` (ImageJ stores uint8, uint16 and
  float32: other types are saved as float32).

Lengths are converted to micrometres (the unit napari-gradcam reads everything in). The file
appears only when complete (written next to it first, then renamed), so a failed save never
leaves half a file, and an existing file is replaced only by a complete one. napari-gradcam's
reader gives back the same data, scale, translate, units and provenance (tested round trip).
No napari or Qt import: napari hands the writer the layer's data and state.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from napari_gradcam.io import (
    ATTRS_KEY,
    TIFF_SUFFIXES,
    ZARR_SUFFIXES,
    atomic_path,
    default_chunks,
    jsonable,
    normalize_unit,
    to_micrometers,
)

#: Axis names a written file may use, in the order OME (NGFF and OME-TIFF) wants them.
AXIS_ORDER = "tczyx"
SPATIAL_AXES = "zyx"
_IMAGEJ_DTYPES = (np.uint8, np.uint16, np.float32)


def write_image(path: str, data: Any, meta: Mapping[str, Any]) -> list[str]:
    """npe2 single-layer writer for image layers; returns the written path."""
    target = Path(path).expanduser()
    name = target.name.lower()
    geometry = _Geometry.of(data, meta, target)
    record = (meta.get("metadata") or {}).get(ATTRS_KEY)
    # Plain JSON whatever the layer's metadata holds (an odd object is kept as its text):
    # the provenance must not be what makes a save fail.
    record = (json.loads(json.dumps(jsonable(dict(record)), default=str))
              if isinstance(record, Mapping) else None)
    contrast = meta.get("contrast_limits")
    if name.endswith(ZARR_SUFFIXES):
        _write_ome_zarr(target, geometry, record, contrast)
    elif name.endswith((".ome.tif", ".ome.tiff")):
        _write_ome_tiff(target, geometry, record)
    elif name.endswith(TIFF_SUFFIXES):
        _write_imagej_tiff(target, geometry, record, contrast)
    else:
        raise ValueError(f"cannot tell the format from {target.name!r}: napari-gradcam saves "
                         ".zarr / .ome.zarr (OME-Zarr), .ome.tif (OME-TIFF) and .tif (ImageJ)")
    return [str(target)]


class _Geometry:
    """The level-0 array of a layer and where its voxels are, per axis, in micrometres."""

    def __init__(self, array: Any, axes: str, scale: tuple[float, ...],
                 translate: tuple[float, ...], unit: str | None, rgb: bool) -> None:
        self.array = array
        self.axes = axes
        self.scale = scale
        self.translate = translate
        self.unit = unit
        self.rgb = rgb

    @classmethod
    def of(cls, data: Any, meta: Mapping[str, Any], path: Path) -> _Geometry:
        array = data[0] if meta.get("multiscale") and isinstance(data, (list, tuple)) else data
        rgb = bool(meta.get("rgb"))
        ndim = len(array.shape) - (1 if rgb else 0)
        scale = [float(s) for s in (meta.get("scale") or (1.0,) * ndim)][-ndim:]
        translate = [float(t) for t in (meta.get("translate") or (0.0,) * ndim)][-ndim:]
        axes = _axis_names(meta.get("axis_labels"), ndim, path)
        units = [str(u) for u in (meta.get("units") or ())][-ndim:] or [None] * ndim
        spatial = [i for i, axis in enumerate(axes) if axis in SPATIAL_AXES]
        spatial_units = [units[i] if units[i] not in (None, "pixel") else None for i in spatial]
        spatial_axes = "".join(axes[i] for i in spatial)
        where = f"the layer saved as {path.name}"
        converted, unit = to_micrometers([scale[i] for i in spatial], spatial_units,
                                         spatial_axes, where)
        shifted, _ = to_micrometers([translate[i] for i in spatial], spatial_units,
                                    spatial_axes, where)
        for position, index in enumerate(spatial):
            scale[index], translate[index] = converted[position], shifted[position]
        if not all(s > 0 for s in scale):
            raise ValueError(f"{where}: the scale {tuple(scale)} has a size that is not "
                             "positive; OME files store positive voxel sizes")
        return cls(array, axes, tuple(scale), tuple(translate), unit if normalize_unit(unit)
                   else None, rgb)


def _axis_names(labels: Sequence[object] | None, ndim: int, path: Path) -> str:
    """OME axis names for the layer's axes: its own labels when they are OME's (t, c, z, y,
    x, each once, in that order), else z, y, x for the last three and t, c before them."""
    names = "".join(str(label).strip().lower() for label in (labels or ()))
    if len(names) == ndim and len(set(names)) == ndim and all(
            c in AXIS_ORDER for c in names) and names == "".join(
            c for c in AXIS_ORDER if c in names):
        return names
    if ndim > len(AXIS_ORDER):
        raise ValueError(f"{path.name}: a {ndim}D layer has more axes than OME files allow "
                         "(t, c, z, y, x)")
    return AXIS_ORDER[-ndim:]


def _slabs(array: Any, step: int) -> Any:
    """The array in slabs along its first axis (dask and zarr data never whole in memory)."""
    for start in range(0, int(array.shape[0]), step):
        yield start, np.asarray(array[start:start + step])


# ----------------------------------------------------------------------------- OME-Zarr


def _write_ome_zarr(path: Path, geometry: _Geometry, record: dict[str, Any] | None,
                    contrast: Sequence[float] | None) -> None:
    import zarr

    if geometry.rgb:
        raise ValueError(f"{path.name}: an RGB layer is saved as .tif; OME-Zarr here holds "
                         "grey images and maps")
    array = geometry.array
    shape = tuple(int(s) for s in array.shape)
    dtype = np.dtype(array.dtype)
    depth_axis = 0
    chunks = default_chunks(shape, depth_axis) if len(shape) >= 2 else shape
    axes = []
    for axis in geometry.axes:
        entry: dict[str, Any] = {"name": axis, "type": {"t": "time", "c": "channel"}.get(
            axis, "space")}
        if axis in SPATIAL_AXES and geometry.unit:
            entry["unit"] = geometry.unit
        axes.append(entry)
    transformations: list[dict[str, Any]] = [{"type": "scale", "scale": list(geometry.scale)}]
    if any(geometry.translate):
        transformations.append({"type": "translation", "translation": list(geometry.translate)})
    attrs: dict[str, Any] = {"multiscales": [{
        "version": "0.4", "name": _stem(path), "axes": axes,
        "datasets": [{"path": "0", "coordinateTransformations": transformations}],
    }]}
    if contrast is not None and len(contrast) == 2:
        low, high = float(contrast[0]), float(contrast[1])
        attrs["omero"] = {"channels": [{"label": _stem(path), "color": "FFFFFF",
                                        "active": True, "window": {"min": low, "max": high,
                                                                   "start": low, "end": high}}]}
    if record is not None:
        attrs[ATTRS_KEY] = jsonable(record)
    with atomic_path(path, overwrite=True) as partial:
        group = zarr.open_group(str(partial), mode="w-", zarr_format=2)
        target = group.create_array("0", shape=shape, chunks=chunks, dtype=dtype, fill_value=0,
                                    chunk_key_encoding={"name": "v2", "separator": "/"})
        for start, slab in _slabs(array, chunks[0]):
            target[start:start + len(slab)] = slab
        group.attrs.update(attrs)


def _stem(path: Path) -> str:
    """The layer name a file gives: its name without the format suffix."""
    from napari_gradcam.io import split_suffix

    return split_suffix(path)[0]


# ----------------------------------------------------------------------------- TIFF


def _spatial(geometry: _Geometry, values: Sequence[float], axis: str, default: float) -> float:
    return float(values[geometry.axes.index(axis)]) if axis in geometry.axes else default


def _write_ome_tiff(path: Path, geometry: _Geometry, record: dict[str, Any] | None) -> None:
    import tifffile

    data = np.asarray(geometry.array)
    axes = geometry.axes.upper() + ("S" if geometry.rgb else "")
    metadata: dict[str, Any] = {"axes": axes}
    unit = "µm" if geometry.unit else "pixel"
    for axis in "zyx":
        if axis in geometry.axes:
            metadata[f"PhysicalSize{axis.upper()}"] = _spatial(geometry, geometry.scale, axis, 1)
            metadata[f"PhysicalSize{axis.upper()}Unit"] = unit
    planes = int(np.prod([size for size, axis in zip(data.shape, geometry.axes, strict=False)
                          if axis not in "yx"], dtype=np.int64))
    if any(geometry.translate):
        z_index = geometry.axes.find("z")
        z0 = _spatial(geometry, geometry.translate, "z", 0.0)
        dz = _spatial(geometry, geometry.scale, "z", 1.0)
        # tifffile writes planes in the axes' order: the z of each plane is its z index's.
        z_positions = [z0 + dz * int(index[z_index]) for index in np.ndindex(
            *[s for s, a in zip(data.shape, geometry.axes, strict=False) if a not in "yx"])
            ] if z_index >= 0 else [z0] * planes
        metadata["Plane"] = {
            "PositionX": [_spatial(geometry, geometry.translate, "x", 0.0)] * planes,
            "PositionY": [_spatial(geometry, geometry.translate, "y", 0.0)] * planes,
            "PositionZ": z_positions,
            "PositionXUnit": [unit] * planes, "PositionYUnit": [unit] * planes,
            "PositionZUnit": [unit] * planes,
        }
    if record is not None:
        metadata["Description"] = json.dumps({ATTRS_KEY: jsonable(record)})
    with atomic_path(path, overwrite=True) as partial:
        tifffile.imwrite(partial, data, ome=True, metadata=metadata,
                         photometric="rgb" if geometry.rgb else "minisblack")


def _write_imagej_tiff(path: Path, geometry: _Geometry, record: dict[str, Any] | None,
                       contrast: Sequence[float] | None) -> None:
    import tifffile

    data = np.asarray(geometry.array)
    if data.dtype == bool:
        data = data.astype(np.uint8)
    elif data.dtype not in _IMAGEJ_DTYPES:
        data = data.astype(np.float32)
    order = [axis for axis in "tzcyx" if axis in geometry.axes]
    if list(geometry.axes) != order:
        # ImageJ hyperstacks are TZCYX; moving the layer's axes would give back a file whose
        # axes are not the layer's, so say where the layer's own order is kept instead
        raise ValueError(
            f"an ImageJ TIFF stores axes in the order {''.join(order).upper()}, but this layer's "
            f"axes are {geometry.axes.upper()}: save it as .ome.tif or .zarr, which keep the "
            "layer's axis order")
    axes = geometry.axes.upper() + ("S" if geometry.rgb else "")
    sx = _spatial(geometry, geometry.scale, "x", 1.0)
    sy = _spatial(geometry, geometry.scale, "y", 1.0)
    metadata: dict[str, Any] = {"axes": axes}
    if "z" in geometry.axes:
        metadata["spacing"] = _spatial(geometry, geometry.scale, "z", 1.0)
    if geometry.unit:
        metadata["unit"] = "micron"
    for axis, size in (("x", sx), ("y", sy), ("z", metadata.get("spacing", 1.0))):
        origin = _spatial(geometry, geometry.translate, axis, 0.0)
        if origin:  # ImageJ counts the origin in pixels, the other way round
            metadata[f"{axis}origin"] = -origin / size
    if contrast is not None and len(contrast) == 2 and not geometry.rgb:
        metadata["min"], metadata["max"] = float(contrast[0]), float(contrast[1])
    if record is not None:
        metadata["Info"] = json.dumps({ATTRS_KEY: jsonable(record)})
    with atomic_path(path, overwrite=True) as partial:
        tifffile.imwrite(partial, data, imagej=True, metadata=metadata,
                         resolution=(1.0 / sx, 1.0 / sy),
                         photometric="rgb" if geometry.rgb else "minisblack")
