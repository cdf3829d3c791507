"""Where a volume sits in the world: the origin (napari's ``translate``) of TIFF and OME-Zarr files.

:func:`napari_gradcam.io.read_volume` gives the voxel size; a cropped scan also has an origin,
and its Grad-CAM map only lands on the scan when the map keeps it. This module reads and writes
that origin in the places the formats keep it:

* **OME-Zarr** (NGFF 0.4): a ``translation`` after the ``scale`` in a dataset's
  ``coordinateTransformations`` (and optionally in the image's own, which applies on top);
* **OME-TIFF**: the first ``Plane``'s ``PositionX/Y/Z`` (with their units);
* **ImageJ TIFF**: the calibration's ``xorigin``/``yorigin``/``zorigin``, in pixels, counted
  the other way round (ImageJ's calibrated x is ``(pixel - xorigin) * pixelWidth``).

Translations come back in the unit :func:`~napari_gradcam.io.read_volume` gives the scale in
(micrometres when the file states lengths), one value per axis of the array it returns.
No napari, Qt or torch import: the reader hook uses this.
"""

from __future__ import annotations

import json
import math
import os
import xml.etree.ElementTree as ElementTree
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from napari_gradcam.io import ATTRS_KEY, to_micrometers


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def ome_zarr_attrs(path: str | os.PathLike) -> dict[str, Any] | None:
    """The group attributes of an OME-Zarr store (zarr v2 ``.zattrs`` or v3 ``zarr.json``
    ``attributes``, with a v0.5 ``ome`` wrapper flattened), or None when ``path`` is no zarr
    group with attributes. Read as JSON only: cheap enough for napari's reader hook."""
    path = Path(path)
    candidates = ((path / ".zattrs", None), (path / "zarr.json", "attributes"))
    for file, key in candidates:
        if not file.is_file():
            continue
        try:
            attrs = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if key is not None:
            attrs = attrs.get(key, {}) if isinstance(attrs, dict) else None
        if not isinstance(attrs, dict):
            return None
        if isinstance(attrs.get("ome"), dict):  # NGFF 0.5 keeps its metadata under "ome"
            attrs = {**attrs, **attrs["ome"]}
        return attrs
    return None


def transform_values(transformations: Sequence[Mapping[str, Any]], kind: str,
                      ndim: int, default: float) -> list[float]:
    for transformation in transformations or ():
        if isinstance(transformation, Mapping) and transformation.get("type") == kind:
            values = [float(v) for v in transformation[kind]]
            if len(values) != ndim:
                raise ValueError(f"{kind} {values} has {len(values)} entries for {ndim} axes")
            return values
    return [default] * ndim


def ngff_translation(path: str | os.PathLike, ndim: int, level: int = 0) -> tuple[float, ...]:
    """The origin of an OME-Zarr image's level ``level``, for its last ``ndim`` axes (those
    :func:`~napari_gradcam.io.read_volume` returns), converted like the scale.

    NGFF applies a dataset's transformations, then the image's own: the origin in the world
    is ``image_scale * dataset_translation + image_translation``. Zeros when none is given.
    """
    attrs = ome_zarr_attrs(path) or {}
    multiscales = attrs.get("multiscales")
    if not multiscales:
        return (0.0,) * ndim
    try:
        image = multiscales[0]
        axes = image.get("axes") or []
        total = len(axes) or ndim
        dataset = image["datasets"][level]
        own = dataset.get("coordinateTransformations", [])
        top = image.get("coordinateTransformations", [])
        dataset_shift = transform_values(own, "translation", total, 0.0)
        top_scale = transform_values(top, "scale", total, 1.0)
        top_shift = transform_values(top, "translation", total, 0.0)
        origin = [s * t + u for s, t, u in zip(top_scale, dataset_shift, top_shift, strict=True)]
        names = "".join(str(a.get("name", "?"))[:1] if isinstance(a, Mapping) else str(a)[:1]
                        for a in axes) or "zyx"[-total:]
        units = [a.get("unit") if isinstance(a, Mapping) and a.get("type") in (None, "space")
                 else None for a in axes] or [None] * total
    except (KeyError, IndexError, TypeError, ValueError) as error:
        raise ValueError(f"{path} has a malformed OME-Zarr translation ({error!r})") from None
    origin, names, units = origin[-ndim:], names[-ndim:], units[-ndim:]
    converted, _ = to_micrometers(origin, units, names, path)
    return tuple(converted)


def tiff_placement(path: str | os.PathLike,
                   scale_zyx: Sequence[float]) -> tuple[tuple[float, float, float],
                                                         dict[str, Any]]:
    """``(origin (z, y, x), provenance)`` of a TIFF: the origin from OME ``Plane`` positions or
    ImageJ's ``x/y/zorigin`` (pixels, turned into lengths with ``scale_zyx``, the voxel size
    :func:`~napari_gradcam.io.read_volume` found), zeros when the file states none; the
    provenance record napari-gradcam put into an OME-TIFF's image ``Description`` ({} if none;
    an ImageJ TIFF's record is already read by ``read_volume``)."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        if tif.is_ome and tif.ome_metadata:
            return _ome_placement(tif.ome_metadata, path)
        imagej = tif.imagej_metadata or {}
    origin = [0.0, 0.0, 0.0]
    for axis, key in ((0, "zorigin"), (1, "yorigin"), (2, "xorigin")):
        value = imagej.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value):
            origin[axis] = -float(value) * float(scale_zyx[axis])
    return (origin[0], origin[1], origin[2]), {}


def _ome_placement(xml: str, path: str | os.PathLike) -> tuple[tuple[float, float, float],
                                                                 dict[str, Any]]:
    try:
        root = ElementTree.fromstring(xml)
    except ElementTree.ParseError:
        return (0.0, 0.0, 0.0), {}
    image = next((el for el in root.iter() if _local(el.tag) == "Image"), None)
    if image is None:
        return (0.0, 0.0, 0.0), {}
    record: dict[str, Any] = {}
    description = next((el for el in image if _local(el.tag) == "Description"), None)
    if description is not None and (description.text or "").lstrip().startswith("{"):
        try:
            record = dict(json.loads(description.text).get(ATTRS_KEY, {}))
        except (ValueError, AttributeError, TypeError):
            record = {}
    plane = next((el for el in image.iter() if _local(el.tag) == "Plane"), None)
    origin, units = [0.0, 0.0, 0.0], [None, None, None]
    if plane is not None:
        for axis, name in ((0, "Z"), (1, "Y"), (2, "X")):
            value = plane.get(f"Position{name}")
            if value is not None:
                origin[axis] = float(value)
                units[axis] = plane.get(f"Position{name}Unit", "µm")
    converted, _ = to_micrometers(origin, units, "zyx", path)
    return (converted[0], converted[1], converted[2]), record


def set_ngff_translation(path: str | os.PathLike, translation: Sequence[float]) -> None:
    """Give every dataset of an OME-Zarr image written by napari-gradcam the origin
    ``translation`` (in the unit of its axes, one value per axis): a ``translation``
    transformation right after its ``scale``, replacing one that was there.

    For a multiscale pyramid NGFF wants each level's own translation; our outputs have one
    level, so the same origin is right for all of them."""
    import zarr

    group = zarr.open_group(str(path), mode="r+")
    multiscales = [dict(m) for m in group.attrs["multiscales"]]
    values = [float(v) for v in translation]
    for image in multiscales:
        datasets = []
        for dataset in image["datasets"]:
            dataset = dict(dataset)
            kept = [t for t in dataset.get("coordinateTransformations", [])
                    if t.get("type") != "translation"]
            if any(values):
                kept.append({"type": "translation", "translation": values})
            dataset["coordinateTransformations"] = kept
            datasets.append(dataset)
        image["datasets"] = datasets
    group.attrs["multiscales"] = multiscales



def input_origin(path: str | os.PathLike, ndim: int = 3) -> tuple[float, ...]:
    """The origin of any volume :func:`~napari_gradcam.io.read_volume` reads, for its last
    ``ndim`` axes, in the unit of its scale: the NGFF translation of an OME-Zarr, the OME or
    ImageJ origin of a TIFF, zeros for ``.npy`` files and plain zarr arrays (no place to keep
    one). What a map written for this input must carry to land on it."""
    from napari_gradcam.io import read_volume

    path = Path(path).expanduser()
    name = path.name.lower()
    if path.is_dir() and (ome_zarr_attrs(path) or {}).get("multiscales"):
        return ngff_translation(path, ndim)
    if name.endswith((".tif", ".tiff")):
        _, info = read_volume(path, ndim=None, lazy=True)
        origin, _ = tiff_placement(path, (1.0, 1.0, 1.0, *info.scale)[-3:])
        return ((0.0,) * max(0, ndim - 3) + origin)[-ndim:]
    return (0.0,) * ndim


def layer_transform(layer: Any, origin: Sequence[int] | None = None) -> dict[str, Any]:
    """Layer kwargs that put an array whose first element is data index ``origin`` (``None``:
    the first element of ``layer``) exactly on the image ``layer``: its scale, rotation, shear,
    affine, units and axis labels, with the translation moved by ``origin`` mapped through the
    layer's transform, so a map of a slice or window sits exactly on it. Values are copies:
    moving the layer later (or mid-run) does not move the map. The one placement rule, used by
    the docks and :func:`map_layer_placement`; napari is imported only when called.
    """
    import numpy as np
    from napari.utils.transforms import Affine

    ndim = int(layer.ndim)
    origin = (0,) * ndim if origin is None else tuple(origin)
    if len(origin) != ndim:
        raise ValueError(f"the map's origin {origin} has {len(origin)} entries but the layer "
                         f"{layer.name!r} has {ndim} axes")
    scale = tuple(float(s) for s in layer.scale)
    rotate = np.array(layer.rotate, dtype=float)
    shear = np.array(layer.shear, dtype=float)
    linear = Affine(scale=scale, translate=tuple(float(t) for t in layer.translate),
                    rotate=rotate, shear=shear)
    return {
        "scale": scale,
        "translate": tuple(float(t) for t in linear(np.asarray(origin, dtype=float))),
        "rotate": rotate,
        "shear": shear,
        "affine": np.array(layer.affine.affine_matrix, dtype=float),
        "units": tuple(str(u) for u in layer.units),
        "axis_labels": tuple(layer.axis_labels),
    }


def map_layer_placement(layer: Any, origin: Sequence[int] | None = None) -> dict[str, Any]:
    """:func:`layer_transform` with the map display's defaults (colormap, blending, opacity,
    3D rendering; :func:`display.map_layer_kwargs`). After ``viewer.add_image(map,
    **kwargs)``, call :func:`napari_gradcam.display.show_map` so the colour bar, scope and 3D
    style follow.
    """
    from napari_gradcam.display import map_layer_kwargs

    return {**map_layer_kwargs(), **layer_transform(layer, origin)}
