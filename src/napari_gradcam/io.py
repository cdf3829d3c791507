"""Volumes in and out: TIFF stacks, zarr / OME-Zarr and NumPy files, with voxel size and provenance.

A heatmap volume is only useful next to the CT scan it explains, so every writer here keeps the
voxel size (napari's ``scale``) and the provenance record, and every reader gives them back:

* **TIFF**: ImageJ hyperstacks (``spacing`` + X/YResolution) and OME-TIFF (``PhysicalSize*``);
  our own TIFFs carry the provenance as JSON in the ImageJ ``Info`` field.
* **OME-Zarr** (NGFF 0.4, zarr format 2): ``multiscales`` with ``z, y, x`` axes, their unit and a
  ``scale`` transformation; the provenance lives under the group attribute ``"napari_gradcam"``.
  Plain zarr arrays are read too (voxel size 1).
* **NumPy** ``.npy``: memory-mapped on reading (never unpickled); a ``<name>.npy.json`` sidecar
  keeps the voxel size and provenance of files we wrote.

Reading is lazy where the format allows it (zarr, memory maps, big TIFFs through
``tifffile``'s zarr store), so a stack larger than RAM can be explained slab by slab.

Writing is atomic: everything goes to ``<OUT>.partial-<random>`` next to the target and is renamed
at the very end, so an error, a crash or Ctrl-C never leaves a half-written file under the output
name, and an existing output is only replaced when asked (``overwrite=True``).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import math
import os
import re
import secrets
import shutil
import socket
import warnings
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

#: Group attribute under which our provenance record is stored (OME-Zarr, sidecars).
ATTRS_KEY = "napari_gradcam"
#: TIFFs above this size are opened lazily (memory map or tifffile's zarr store).
LAZY_TIFF_BYTES = 256 * 1024**2
ZARR_SUFFIXES = (".zarr",)
TIFF_SUFFIXES = (".tif", ".tiff")
NUMPY_SUFFIXES = (".npy",)
OUTPUT_DTYPES = ("float32", "float16")

_UNIT_ALIASES = {
    "micrometer": "micrometer", "micrometre": "micrometer", "micron": "micrometer",
    "microns": "micrometer", "um": "micrometer", "µm": "micrometer", "μm": "micrometer",
    "\\u00b5m": "micrometer",
    "nanometer": "nanometer", "nanometre": "nanometer", "nm": "nanometer",
    "millimeter": "millimeter", "millimetre": "millimeter", "mm": "millimeter",
    "centimeter": "centimeter", "centimetre": "centimeter", "cm": "centimeter",
    "meter": "meter", "metre": "meter", "m": "meter",
    "angstrom": "angstrom", "angstroms": "angstrom", "ångström": "angstrom", "å": "angstrom",
    "\\u00c5": "angstrom",
    "picometer": "picometer", "picometre": "picometer", "pm": "picometer",
}
#: Spellings that only mean a length in this exact case ("Mm" is a megametre, "Pm" a petametre).
_CASE_SENSITIVE_UNITS = frozenset({"Mm", "Pm"})
#: Micrometres per unit: every length read is converted to micrometres, so the axes of a file
#: whose Z is in µm and X/Y in nm end up in one unit (napari's scale has no unit per axis).
MICROMETERS_PER_UNIT = {"micrometer": 1.0, "nanometer": 1e-3, "millimeter": 1e3,
                        "centimeter": 1e4, "meter": 1e6, "angstrom": 1e-4, "picometer": 1e-6}
_PIXEL_UNITS = frozenset({"pixel", "pixels", "px", "pix"})
_IMAGEJ_UNITS = {"micrometer": "micron", "nanometer": "nm", "millimeter": "mm",
                 "centimeter": "cm", "meter": "m", "angstrom": "angstrom", "picometer": "pm"}


class TruncatedFileError(ValueError):
    """A file ends before the data its own header promises (an interrupted copy or download)."""


class UnitMismatchError(ValueError):
    """A file gives its axes' voxel sizes in units that have no common length unit."""


def normalize_unit(unit: object) -> str | None:
    """A unit as OME-NGFF spells it (``"micrometer"``), or None when it is unknown or pixels."""
    if unit is None:
        return None
    text = str(unit).strip()
    if text in _UNIT_ALIASES:
        return _UNIT_ALIASES[text]
    if text in _CASE_SENSITIVE_UNITS:
        return None
    return _UNIT_ALIASES.get(text.lower())


def to_micrometers(scale: Sequence[float], units: Sequence[object], axes: str,
                   source: object) -> tuple[tuple[float, ...], str | None]:
    """Voxel sizes given per axis in possibly different units → ``(scale, unit)`` in one unit.

    ``units[i]`` is the unit the file states for axis ``i``, or None where it states none (that
    axis then shares the unit of the others). Lengths are converted to micrometres; sizes in
    pixels (or without any unit) stay as they are, with unit None. A mix that has no common unit
    (a length on one axis, pixels or an unknown unit on another) is refused, naming the axes:
    guessing would put the map beside its scan off by the ratio of the units.
    """
    scale = tuple(float(s) for s in scale)
    stated = [(axis, str(unit).strip()) for axis, unit in zip(axes, units, strict=False)
              if unit is not None and str(unit).strip()]
    lengths = {axis: normalize_unit(unit) for axis, unit in stated}
    if stated and all(lengths.values()):
        # Axes without a stated unit take the first stated one (the file's common unit).
        common = lengths[stated[0][0]]
        factors = [MICROMETERS_PER_UNIT[lengths.get(axis) or common]
                   for axis in axes[:len(scale)]]
        return tuple(s * f for s, f in zip(scale, factors, strict=True)), "micrometer"
    other = {unit.lower() for axis, unit in stated if not lengths[axis]}
    if not any(lengths.values()) and (len(other) <= 1 or other <= _PIXEL_UNITS):
        return scale, None  # one unit that is not a length (pixels, or one we do not know)
    by_axis = dict(stated)
    described = ", ".join(f"{axis} {size:g} {by_axis.get(axis, '(no unit)')}"
                          for axis, size in zip(axes, scale, strict=False))
    raise UnitMismatchError(
        f"{source} gives the voxel size in units that cannot be converted to one ({described}); "
        f"napari-gradcam converts {', '.join(sorted(MICROMETERS_PER_UNIT))} to micrometres: "
        "fix the unit metadata of the file"
    )


@dataclass(frozen=True)
class VoxelInfo:
    """Where the voxels are: ``scale`` per axis (napari's ``scale``), its ``unit`` and axis names.

    ``unit`` is None when the file did not say (the scale is then in pixels). ``metadata`` is the
    provenance record of a file napari-gradcam wrote (empty for other files).
    """

    scale: tuple[float, ...] = (1.0, 1.0, 1.0)
    unit: str | None = None
    axes: str = "zyx"
    metadata: Mapping[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- reading


def read_volume(
    path: str | os.PathLike, *, ndim: int | None = 3, lazy: bool | None = None
) -> tuple[Any, VoxelInfo]:
    """Open a volume and its voxel size: ``(array, VoxelInfo)``.

    The array is a NumPy array, a read-only memory map, a zarr array or a dask array: anything
    that slices like NumPy. ``lazy=None`` decides by size (TIFFs above :data:`LAZY_TIFF_BYTES`,
    and every zarr and ``.npy`` file, are not read into memory). ``ndim`` is the number of
    dimensions required (None accepts any).
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"input not found: {path}")
    kind = _kind_of(path)
    if kind == "zarr":
        array, info = _read_zarr(path)
    elif kind == "tiff":
        array, info = _read_tiff(path, lazy)
    else:
        array, info = _read_npy(path)
    if ndim is not None and len(array.shape) != ndim:
        raise ValueError(
            f"{path} holds an array of shape {tuple(array.shape)} ({len(array.shape)}D) but a "
            f"{ndim}D volume (Z, Y, X) is needed; save a single 3D stack (one channel, one time "
            "point)"
        )
    if len(info.scale) != len(array.shape):
        info = VoxelInfo(_fit_scale(info.scale, len(array.shape)), info.unit,
                         info.axes[-len(array.shape):], info.metadata)
    return array, info


def read_attrs(path: str | os.PathLike) -> dict[str, Any]:
    """The napari-gradcam provenance stored with a file we wrote ({} for any other file)."""
    return dict(read_volume(path, ndim=None)[1].metadata)


def _kind_of(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(ZARR_SUFFIXES) or (path.is_dir() and _looks_like_zarr(path)):
        return "zarr"
    if name.endswith(TIFF_SUFFIXES):
        return "tiff"
    if name.endswith(NUMPY_SUFFIXES):
        return "npy"
    known = ", ".join(ZARR_SUFFIXES + TIFF_SUFFIXES + NUMPY_SUFFIXES)
    raise ValueError(f"unsupported file type: {path.name}; napari-gradcam reads {known} "
                     "(convert other formats to TIFF or zarr first)")


def _looks_like_zarr(path: Path) -> bool:
    return any((path / name).exists() for name in (".zgroup", ".zarray", "zarr.json"))


def _fit_scale(scale: Sequence[float], ndim: int) -> tuple[float, ...]:
    scale = tuple(float(s) for s in scale)
    return scale[-ndim:] if len(scale) >= ndim else (1.0,) * (ndim - len(scale)) + scale


def _read_npy(path: Path) -> tuple[Any, VoxelInfo]:
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as error:
        if "pickle" not in str(error).lower() and "object" not in str(error).lower():
            raise ValueError(f"{path} is not a readable .npy file ({error})") from None
        raise ValueError(f"{path} is not a plain numeric .npy array ({error}); object arrays "
                         "are refused because loading them would run pickled code") from None
    except (OSError, EOFError) as error:
        raise ValueError(f"{path} is not a readable .npy file ({error})") from None
    sidecar = _sidecar(path)
    if not sidecar.is_file():
        return array, VoxelInfo(scale=(1.0,) * array.ndim, axes="zyx"[-array.ndim:])
    try:
        meta = json.loads(sidecar.read_text(encoding="utf-8"))
        axes = str(meta.get("axes", "zyx"))
        scale = tuple(float(s) for s in meta["scale"])
        scale, unit = to_micrometers(scale, [meta.get("unit")] * len(scale), axes, sidecar)
        info = VoxelInfo(scale, unit, axes, dict(meta.get(ATTRS_KEY, {})))
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"the sidecar {sidecar} is not valid napari-gradcam metadata "
                         f"({error}); delete it to read the array with voxel size 1") from None
    return array, info


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def _read_tiff(path: Path, lazy: bool | None) -> tuple[Any, VoxelInfo]:
    import tifffile

    if path.is_dir():
        raise ValueError(f"{path} is a folder, not a TIFF file")
    if lazy is None:
        lazy = path.stat().st_size > LAZY_TIFF_BYTES
    with _tifffile_complaints() as complaints:
        try:
            with tifffile.TiffFile(path) as tif:
                shape = tuple(tif.series[0].shape)
                _check_tiff_complete(tif, path, complaints)
                info = _tiff_voxel_info(tif, path)
                array = None if lazy else tif.series[0].asarray()
                _check_tiff_complete(tif, path, complaints)
        except (tifffile.TiffFileError, OSError, ValueError, IndexError) as error:
            if isinstance(error, (TruncatedFileError, UnitMismatchError)):
                raise
            raise ValueError(f"{path} is not a readable TIFF file ({error})") from None
    if array is None:
        array = _lazy_tiff(path, shape)
    return array, info


@contextlib.contextmanager
def _tifffile_complaints() -> Iterator[list[str]]:
    """Collect what tifffile logs while reading instead of letting it print.

    tifffile reads a TIFF whose end is cut off without raising: it logs "invalid page offset"
    or "corrupted file" and returns the pages it could find, so a truncated 3D stack looks like
    a healthy 2D image. Its complaints are the evidence that the file is damaged.
    """
    import logging

    complaints: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            complaints.append(record.getMessage())

    logger = logging.getLogger("tifffile")
    handler, propagate = Collect(logging.WARNING), logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield complaints
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


#: What tifffile logs when a file ends early: an IFD or a tag value that points past its end.
#: (Not its "ImageJ series metadata invalid or corrupted file" alone: odd writers cause that in
#: files whose pages are all there; the page count check below catches truncated ones.)
_DAMAGE_WORDS = ("invalid page offset", "invalid value offset", "truncat", "failed to read",
                 "beyond end")


def _check_tiff_complete(tif: Any, path: Path, complaints: Sequence[str]) -> None:
    """Raise :class:`TruncatedFileError` when the TIFF is cut off or its structure is damaged:
    tifffile complained, the data of the first or last page lies beyond the end of the file,
    or an ImageJ stack has fewer pages than its header counts."""
    damage = [text for text in complaints if any(word in text.lower() for word in
                                                 _DAMAGE_WORDS)]
    size = path.stat().st_size
    try:
        pages = tif.pages
        ends = [offset + count for index in {0, len(pages) - 1}
                for offset, count in zip(pages[index].dataoffsets, pages[index].databytecounts,
                                         strict=False)]
        series = tif.series[0]
        if getattr(series, "dataoffset", None) is not None:  # contiguous: one block of data
            ends.append(int(series.dataoffset) + int(series.nbytes))
        if ends and max(ends) > size:
            damage.append(f"its image data needs {max(ends)} bytes, the file has {size}")
        images = int((tif.imagej_metadata or {}).get("images", 0))
        if images > len(pages) and len(pages) > 1:
            damage.append(f"its ImageJ header counts {images} images, the file holds "
                          f"{len(pages)}")
    except (AttributeError, TypeError, ValueError, IndexError):
        pass
    if damage:
        raise TruncatedFileError(
            f"{path} is truncated or corrupt ({'; '.join(dict.fromkeys(damage))}); copy it "
            "again from its source"
        )


def _lazy_tiff(path: Path, shape: tuple[int, ...]) -> Any:
    import tifffile

    try:  # uncompressed, contiguous stacks map straight from disk
        mapped = tifffile.memmap(path, mode="r")
        if tuple(mapped.shape) == shape:
            return mapped
    except (ValueError, OSError):
        pass
    import zarr

    store = tifffile.imread(path, aszarr=True)  # the store owns (and closes) the file
    opened = zarr.open(store, mode="r")
    if hasattr(opened, "shape"):
        return opened
    return opened[next(iter(opened.array_keys()))]  # a pyramid: its full-resolution level


def _tiff_voxel_info(tif: Any, path: Path) -> VoxelInfo:
    ndim = len(tif.series[0].shape)
    metadata: dict[str, Any] = {}
    if tif.is_ome and tif.ome_metadata:
        scale, units = _ome_tiff_scale(tif.ome_metadata)
    else:
        scale, units = [1.0, 1.0, 1.0], [None, None, None]
        imagej = tif.imagej_metadata or {}
        page = tif.pages[0]
        resolution_unit = int(getattr(page.tags.get("ResolutionUnit"), "value", 1))
        # ImageJ stores pixels per (its) unit; other TIFFs are only trusted in centimetres
        # (inch resolutions are nearly always a meaningless 72 dpi default).
        factor = 1.0 if imagej else (1e4 if resolution_unit == 3 else 0.0)
        if factor:
            for axis, tag in ((2, "XResolution"), (1, "YResolution")):
                resolution = page.tags.get(tag)
                if resolution is not None:
                    numerator, denominator = resolution.value
                    if numerator and denominator and numerator != denominator:
                        scale[axis] = factor * denominator / numerator  # unit per pixel
            if not imagej and any(s != 1.0 for s in scale):
                units = ["micrometer"] * 3
        if "spacing" in imagej:
            scale[0] = float(imagej["spacing"])
        if imagej.get("unit"):  # ImageJ's Calibration: x in unit, y in yunit, z in zunit
            unit = imagej["unit"]
            units = [imagej.get("zunit") or unit, imagej.get("yunit") or unit, unit]
        info_field = imagej.get("Info")
        if isinstance(info_field, str) and info_field.lstrip().startswith("{"):
            with contextlib.suppress(ValueError, AttributeError):
                metadata = dict(json.loads(info_field).get(ATTRS_KEY, {}))
    scale, unit = to_micrometers(scale, units, "zyx", path)
    return VoxelInfo(_fit_scale(scale, ndim), unit, "zyx"[-ndim:] if ndim <= 3 else "zyx",
                     metadata)


def _ome_tiff_scale(xml: str) -> tuple[list[float], list[str | None]]:
    """Voxel size (z, y, x) and the unit stated for each axis (None where no size is given)."""
    scale, units = [1.0, 1.0, 1.0], [None, None, None]
    try:
        root = ElementTree.fromstring(xml)
    except ElementTree.ParseError:
        return scale, units
    pixels = next((el for el in root.iter() if el.tag.rsplit("}", 1)[-1] == "Pixels"), None)
    if pixels is None:
        return scale, units
    for axis, name in ((0, "Z"), (1, "Y"), (2, "X")):
        value = pixels.get(f"PhysicalSize{name}")
        if value is not None:
            scale[axis] = float(value)
            # The OME schema's default unit is the micrometre.
            units[axis] = pixels.get(f"PhysicalSize{name}Unit", "µm")
    return scale, units


def _read_zarr(path: Path) -> tuple[Any, VoxelInfo]:
    import zarr

    try:
        node = zarr.open(str(path), mode="r")
    except Exception as error:  # zarr raises several types for missing or broken metadata
        raise ValueError(f"{path} is not a readable zarr store ({type(error).__name__}: "
                         f"{error})") from None
    if hasattr(node, "shape"):  # a plain array
        ours = dict(node.attrs.get(ATTRS_KEY, {}))
        return node, VoxelInfo((1.0,) * len(node.shape), None, "zyx"[-len(node.shape):], ours)
    attrs = dict(node.attrs)
    ours = dict(attrs.get(ATTRS_KEY, {}))
    multiscales = attrs.get("multiscales") or attrs.get("ome", {}).get("multiscales")
    if not multiscales:
        arrays = sorted(node.array_keys())
        if len(arrays) == 1:
            array = node[arrays[0]]
            return array, VoxelInfo((1.0,) * array.ndim, None, "zyx"[-array.ndim:], ours)
        raise ValueError(
            f"{path} is a zarr group without OME-Zarr 'multiscales' metadata and with "
            f"{len(arrays)} arrays ({', '.join(arrays) or 'none'}); open one array directly "
            f"(e.g. {path / (arrays[0] if arrays else 'name')})"
        )
    try:
        image = multiscales[0]
        dataset = image["datasets"][0]
        array = node[dataset["path"]]
        scale = _ngff_scale(dataset.get("coordinateTransformations", []), array.ndim)
        top = _ngff_scale(image.get("coordinateTransformations", []), array.ndim)
        scale = tuple(a * b for a, b in zip(scale, top, strict=True))
        axes = image.get("axes") or [{"name": n} for n in "tczyx"[-array.ndim:]]
        names = [a["name"] if isinstance(a, Mapping) else str(a) for a in axes]
        units = [a.get("unit") if isinstance(a, Mapping) and a.get("type") in (None, "space")
                 else None for a in axes]
        if len(names) != array.ndim:
            raise ValueError(f"{len(names)} axes for an array of {array.ndim} dimensions")
    except (KeyError, IndexError, TypeError, ValueError) as error:
        raise ValueError(f"{path} has malformed OME-Zarr 'multiscales' metadata ({error!r})"
                         ) from None
    # Drop leading singleton axes (t, c of a 5D OME-Zarr) lazily, keep the spatial ones.
    if array.ndim > 3:
        extra = array.ndim - 3
        if any(size != 1 for size in array.shape[:extra]):
            raise ValueError(
                f"{path} has axes {''.join(names)} with shape {tuple(array.shape)}; only a "
                "single channel and time point can be explained, choose one first"
            )
        import dask.array as da

        array = da.from_zarr(array)[(0,) * extra]
        scale, names, units = scale[extra:], names[extra:], units[extra:]
    scale, unit = to_micrometers(scale, units, "".join(names), path)
    return array, VoxelInfo(tuple(scale), unit, "".join(names), ours)


def _ngff_scale(transformations: Sequence[Mapping[str, Any]], ndim: int) -> tuple[float, ...]:
    for transformation in transformations:
        if transformation.get("type") == "scale":
            values = tuple(float(v) for v in transformation["scale"])
            if len(values) != ndim:
                raise ValueError(f"scale {values} has {len(values)} entries for {ndim} axes")
            return values
    return (1.0,) * ndim


# --------------------------------------------------------------------------- writing


def output_kind(path: str | os.PathLike) -> str:
    """``"zarr"``, ``"tiff"`` or ``"npy"`` from an output name; a clear error otherwise."""
    name = Path(path).name.lower()
    for kind, suffixes in (("zarr", ZARR_SUFFIXES), ("tiff", TIFF_SUFFIXES),
                           ("npy", NUMPY_SUFFIXES)):
        if name.endswith(suffixes):
            return kind
    raise ValueError(f"cannot tell the output format from {Path(path).name!r}; end the name in "
                     ".zarr (OME-Zarr, recommended), .tif or .npy")


def split_suffix(path: str | os.PathLike) -> tuple[str, str]:
    """``("scan", ".ome.zarr")``: a file's name and its whole format suffix (compound suffixes
    such as ``.ome.tif`` kept in one piece); ``(name, "")`` for a name we have no format for."""
    name = Path(path).name
    lower = name.lower()
    for suffix in (".ome.zarr", ".ome.tiff", ".ome.tif",
                   *sorted((*ZARR_SUFFIXES, *TIFF_SUFFIXES, *NUMPY_SUFFIXES), key=len,
                           reverse=True)):
        if lower.endswith(suffix):
            return name[: -len(suffix)], name[-len(suffix):]
    return name, ""


def uncertainty_path(out_path: str | os.PathLike) -> Path:
    """Where a run's uncertainty map goes, beside its map and in the same format:
    ``scan_cam.zarr`` → ``scan_cam_uncertainty.zarr``, ``x.ome.zarr`` →
    ``x_uncertainty.ome.zarr`` (the suffix is kept whole, so the reader still knows it)."""
    path = Path(out_path)
    output_kind(path)
    stem, suffix = split_suffix(path)
    return path.with_name(f"{stem}_uncertainty{suffix}")


class OutputError(OSError):
    """An output could not be written (disk full, folder not writable); the message names the
    user's output path, never the temporary ``*.partial-*`` file the data went to first."""


class OutputIsInputError(ValueError):
    """The output would replace (or be written inside, or contain) one of the run's inputs."""


def check_output_path(path: str | os.PathLike, overwrite: bool = False, *,
                      inputs: Sequence[str | os.PathLike] = ()) -> Path:
    """Refuse, before any work starts, an output that exists (unless ``overwrite``), has no
    folder to go into, sits in a folder that cannot be written, has an unknown format, or is
    one of ``inputs`` (the files the run reads: a scan is never replaced by its own map, not
    even with ``overwrite``)."""
    path = Path(path).expanduser()
    output_kind(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"the output folder {path.parent} does not exist; create it "
                                "first")
    refuse_output_over_input(path, inputs)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass --overwrite (overwrite=True) to "
                              "replace it")
    # os.access says False for root too when the file system is mounted read-only.
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write the output {path}: {_why_not_writable(path.parent)}"
                              "; choose another output folder")
    return path


def default_output_path(name: str, source_path: str | os.PathLike | None = None, *,
                        suffix: str = "_gradcam") -> Path:
    """A sensible place for the map of the layer ``name``: ``<source stem>_gradcam.zarr`` next to
    the source file when it has one in a writable folder, else the user's cache folder
    (``platformdirs.user_cache_dir("napari-gradcam")/maps``). Never the input itself, and never
    an existing path: ``_2``, ``_3``... are added until the name is free."""
    folder: Path | None = None
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(name)) or "map"
    if source_path is not None:
        source = Path(source_path).expanduser()
        if source.parent.is_dir() and os.access(source.parent, os.W_OK | os.X_OK):
            folder, stem = source.parent, split_suffix(source)[0]
    if folder is None:
        from platformdirs import user_cache_dir

        folder = Path(user_cache_dir("napari-gradcam")) / "maps"  # made when a run writes there
    candidate = folder / f"{stem}{suffix}.zarr"
    number = 2
    while candidate.exists() or (source_path is not None
                                 and candidate.resolve() == Path(source_path).resolve()):
        candidate = folder / f"{stem}{suffix}_{number}.zarr"
        number += 1
    return candidate


def _why_not_writable(folder: Path) -> str:
    with contextlib.suppress(OSError, AttributeError):
        if os.statvfs(folder).f_flag & os.ST_RDONLY:
            return f"the folder {folder} is not writable (a read-only file system)"
    return f"the folder {folder} is not writable (permission denied)"


def refuse_output_over_input(output: str | os.PathLike,
                             inputs: Sequence[str | os.PathLike]) -> None:
    """Raise :class:`OutputIsInputError` when ``output`` (a file or a folder, e.g. a report
    folder) is one of ``inputs`` (after resolving symbolic links, or the same file under
    another name: a hard link), lies inside one (an OME-Zarr folder) or contains one."""
    for source in inputs:
        _refuse_one(Path(output).expanduser(), Path(source).expanduser())


def _refuse_one(output: Path, source: Path) -> None:
    out_real, source_real = output.resolve(), source.resolve()
    how = ""
    if out_real == source_real:
        how = "the same file" + ("" if output.absolute() == out_real else f": {out_real}")
    elif output.exists() and source.exists() and os.path.samefile(output, source):
        how = "the same file under another name (a hard link)"
    elif source_real in out_real.parents:
        how = "inside the input"
    elif out_real in source_real.parents:
        how = "a folder that contains the input"
    if how:
        raise OutputIsInputError(
            f"the output {output} is the input {source} ({how}); napari-gradcam never writes "
            "over its input, also not with --overwrite: choose another output name"
        )


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():  # unlink fails on a read-only mount even for a
        with contextlib.suppress(FileNotFoundError):  # name that is not there
            path.unlink()


# --------------------------------------------------------------------------- partial outputs

_PARTIAL = re.compile(r"\.(?P<kind>partial|old)-(?P<host>[A-Za-z0-9_.]+)-(?P<pid>\d+)"
                      r"-[0-9a-f]{8}(?P<sidecar>\.json)?")
_LEGACY_PARTIAL = re.compile(r"\.(?:partial|old)-[0-9a-f]{8}(?:\.json)?")


def _host_tag() -> str:
    """This machine's name as it may appear in a file name (letters, digits, ``_`` and ``.``)."""
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname() or "host")[:40] or "host"


def temporary_name(path: Path, kind: str) -> Path:
    """``<name>.<kind>-<host>-<pid>-<random>``: who wrote it, so that a later run can tell a
    leftover of a killed run (removed) from the output of a run still going (kept)."""
    return path.with_name(f"{path.name}.{kind}-{_host_tag()}-{os.getpid()}-"
                          f"{secrets.token_hex(4)}")


def _process_start(pid: int) -> float | None:
    """When process ``pid`` started (seconds since the epoch; Linux), None if unknown."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        boot = next(float(line.split()[1]) for line in
                    Path("/proc/stat").read_text().splitlines() if line.startswith("btime"))
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError, StopIteration):
        return None


def _process_runs(pid: int, since: float) -> bool:
    """Whether ``pid`` is a running process that may have written a file dated ``since``: a
    zombie (killed, not yet reaped) is not running, and a process that started after the file
    was last written is another program that reuses the number."""
    if pid == os.getpid() or os.name == "nt":  # on Windows os.kill would end the process
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        pass
    with contextlib.suppress(OSError, IndexError):
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state in ("Z", "X"):
            return False
    started = _process_start(pid)
    # A minute of slack for clock ticks and mtime rounding: in doubt, the file is kept.
    return started is None or started <= since + 60.0


def clean_stale_partials(path: str | os.PathLike) -> list[str]:
    """Remove what killed runs left next to output ``path``; say what was found.

    A run writes ``<name>.partial-<host>-<pid>-<random>`` and renames it at the end; a run
    killed with SIGKILL (or by a power cut) cannot clean up. Removed here: such files of this
    output name whose process, on this machine, no longer runs, and an ``.old-*`` copy of a
    replaced output when the new output is in place. Kept (and reported): files of a run that
    still goes on, of another machine, of an older version without a process id, and an
    ``.old-*`` copy that is the only one left of the previous output. Returns one sentence per
    file found.
    """
    path = Path(path).expanduser()
    messages: list[str] = []
    try:
        candidates = sorted(p for p in path.parent.iterdir()
                            if p.name.startswith(path.name + "."))
    except OSError:
        return messages
    here = _host_tag()
    for candidate in candidates:
        tail = candidate.name[len(path.name):]
        match = _PARTIAL.fullmatch(tail)
        if match is None:
            if _LEGACY_PARTIAL.fullmatch(tail):
                messages.append(f"found {candidate}, left by an earlier run of unknown process; "
                                "not removed: delete it if no other run writes "
                                f"{path.name}")
            continue
        pid, host, kind = int(match["pid"]), match["host"], match["kind"]
        try:
            written = candidate.lstat().st_mtime
        except OSError:
            continue
        if host != here:
            messages.append(f"found {candidate}, written by process {pid} on {host}; not "
                            "removed (its run may still go on there): delete it once that run "
                            "has ended")
        elif _process_runs(pid, written):
            if pid != os.getpid():
                messages.append(f"{candidate} is being written by another run (process {pid}) "
                                f"to the same output {path.name}; left alone")
        elif kind == "old" and not match["sidecar"] and not path.exists():
            messages.append(f"found {candidate}: the previous {path.name}, kept by a run that "
                            f"was killed while replacing it; rename it back to {path.name} to "
                            "keep it")
        else:
            _remove(candidate)
            what = "partial output" if kind == "partial" else "copy of a replaced output"
            messages.append(f"removed {candidate}: the {what} of a run that was killed "
                            f"(process {pid} no longer runs)")
    return messages


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, overwrite: bool = False,
                inputs: Sequence[str | os.PathLike] = (),
                notify: Callable[[str], None] | None = None) -> Iterator[Path]:
    """Yield a temporary ``<path>.partial-<host>-<pid>-<random>`` to write into; rename it to
    ``path`` on success, delete it on any error or interrupt (``KeyboardInterrupt`` included).

    An existing ``path`` is refused unless ``overwrite``; it is replaced only once the new
    output is complete, so a failed run never destroys the previous result. ``inputs`` are
    never replaced (see :func:`check_output_path`). Leftovers of killed runs are cleaned up
    first (:func:`clean_stale_partials`); ``notify`` hears about them (default: a warning).
    A full disk or a folder that turns out not to be writable raises :class:`OutputError`
    naming ``path``.
    """
    path = check_output_path(path, overwrite, inputs=inputs)
    for message in clean_stale_partials(path):
        if notify is not None:
            notify(message)
        else:
            warnings.warn(message, RuntimeWarning, stacklevel=3)
    partial = temporary_name(path, "partial")
    try:
        yield partial
        if not partial.exists():
            raise RuntimeError(f"nothing was written to {partial}")
        _replace(partial, path, overwrite)
    except BaseException as error:
        with _signals_deferred():  # a second Ctrl-C must not stop the clean-up half way
            settle_zarr_writes()
            _remove(partial)
        clear = _output_error(error, path, partial)
        if clear is not None:
            raise clear from None
        raise


_DISK_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


def _output_error(error: BaseException, path: Path, partial: Path) -> OutputError | None:
    """The user's words for a failed write: which output, and why (disk full, not writable).

    Only errors about the output itself are reworded (an error that names another file, e.g.
    the input, is left as it is)."""
    if isinstance(error, OutputError) or not isinstance(error, OSError):
        return None
    named = str(error.filename or "")
    if named and not named.startswith((str(partial), str(path))):
        return None
    if error.errno in _DISK_FULL:
        clear = OutputError(f"not enough space to write the output {path}: the disk (or quota) "
                            f"holding {path.parent} is full; the partial output was removed; "
                            "free space or choose another output folder")
    elif error.errno in (errno.EROFS, errno.EACCES, errno.EPERM) and named:
        clear = OutputError(f"cannot write the output {path}: "
                            f"{_why_not_writable(path.parent)}; choose another output folder")
    else:
        return None
    clear.errno = error.errno
    return clear


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM until the block has run, then hand them to their handlers.

    Python runs signal handlers in the main thread whichever thread the signal hit, so
    blocking the signal mask is not enough: the handlers themselves are swapped for one that
    only takes note.
    """
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    numbers = (signal.SIGINT, signal.SIGTERM)
    received: list[int] = []
    previous = {number: signal.getsignal(number) for number in numbers}
    for number in numbers:
        signal.signal(number, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        for number in received:
            handler = previous[number]
            if callable(handler):
                handler(number, None)
            elif handler == signal.SIG_DFL and number == signal.SIGINT:
                raise KeyboardInterrupt
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), number)


def settle_zarr_writes(timeout: float = 30.0) -> None:
    """Wait until zarr's background IO loop has finished every write in flight.

    zarr 3 writes chunks on its own thread. When Ctrl-C interrupts the main thread while it
    waits for a write, that write still completes there, and it would recreate a partial
    output folder just removed. zarr 2 writes synchronously and needs nothing.
    """
    try:
        from zarr.core import sync as zarr_sync
    except ImportError:
        return
    loops = getattr(zarr_sync, "loop", None)
    loop = loops[0] if isinstance(loops, list) and loops else None
    if loop is None or loop.is_closed() or not loop.is_running():
        return

    async def others_done() -> None:
        current = asyncio.current_task()
        pending = [task for task in asyncio.all_tasks() if task is not current]
        if pending:
            await asyncio.wait(pending, timeout=timeout)

    with contextlib.suppress(Exception):
        asyncio.run_coroutine_threadsafe(others_done(), loop).result(timeout + 1.0)


def _replace(partial: Path, path: Path, overwrite: bool) -> None:
    if not path.exists():
        os.replace(partial, path)
        return
    if not overwrite:
        raise FileExistsError(f"{path} appeared while writing; the new result was discarded")
    old = temporary_name(path, "old")
    os.replace(path, old)
    try:
        os.replace(partial, path)
    except BaseException:
        os.replace(old, path)
        raise
    _remove(old)


def _check_dtype(dtype: object) -> np.dtype:
    resolved = np.dtype(dtype)  # type: ignore[arg-type]
    if resolved.name not in OUTPUT_DTYPES:
        raise ValueError(f"output dtype must be float32 or float16, got {resolved.name}")
    return resolved


def default_chunks(shape: Sequence[int], depth_axis: int = 0, depth: int = 16,
                   plane: int = 256) -> tuple[int, ...]:
    """Chunks that are ``depth`` deep along ``depth_axis`` and at most ``plane`` across."""
    return tuple(
        max(1, min(size, depth if axis == depth_axis else plane))
        for axis, size in enumerate(shape)
    )


def ngff_multiscales(scale: Sequence[float], unit: str | None, name: str,
                     axes: str = "zyx") -> list[dict[str, Any]]:
    """The OME-NGFF 0.4 ``multiscales`` entry of a single-resolution image."""
    axis_entries = []
    for axis_name in axes:
        entry: dict[str, Any] = {"name": axis_name, "type": "space"}
        if unit:
            entry["unit"] = unit
        axis_entries.append(entry)
    return [{
        "version": "0.4",
        "name": name,
        "axes": axis_entries,
        "datasets": [{
            "path": "0",
            "coordinateTransformations": [{"type": "scale",
                                           "scale": [float(s) for s in scale]}],
        }],
    }]


def create_ome_zarr(
    path: str | os.PathLike,
    shape: Sequence[int],
    *,
    scale: Sequence[float] = (1.0, 1.0, 1.0),
    unit: str | None = "micrometer",
    dtype: object = "float32",
    chunks: Sequence[int] | None = None,
    attrs: Mapping[str, Any] | None = None,
    name: str = "gradcam",
) -> Any:
    """Create an empty OME-Zarr image (NGFF 0.4, zarr format 2) and return its writable array.

    Pass the array as ``out=`` to :func:`napari_gradcam.explain_volume`. ``attrs`` (the
    provenance record) is stored under the group attribute :data:`ATTRS_KEY`. The store must
    not exist yet (wrap the call in :func:`atomic_path` for an atomic result).
    """
    import zarr

    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"an OME-Zarr volume needs three positive sizes (z, y, x), got {shape}")
    if len(scale) != 3 or not all(math.isfinite(s) and s > 0 for s in scale):
        raise ValueError(f"scale must be three positive voxel sizes (z, y, x), got {scale}")
    dtype = _check_dtype(dtype)
    chunks = tuple(int(c) for c in (chunks or default_chunks(shape)))
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} already exists")
    unit = normalize_unit(unit) if unit else None
    group = zarr.open_group(str(path), mode="w-", zarr_format=2)
    array = _create_array(group, "0", shape, chunks, dtype)
    group.attrs["multiscales"] = ngff_multiscales(scale, unit, name)
    group.attrs[ATTRS_KEY] = jsonable(dict(attrs or {}))
    return array


def _create_array(group: Any, key: str, shape: tuple[int, ...], chunks: tuple[int, ...],
                  dtype: np.dtype) -> Any:
    if hasattr(group, "create_array"):  # zarr 3
        return group.create_array(key, shape=shape, chunks=chunks, dtype=dtype, fill_value=0,
                                  chunk_key_encoding={"name": "v2", "separator": "/"})
    return group.create_dataset(key, shape=shape, chunks=chunks, dtype=dtype,  # zarr 2
                                fill_value=0, dimension_separator="/")


def add_zarr_array(group: Any, key: str, shape: Sequence[int], chunks: Sequence[int],
                   dtype: object = "float32") -> Any:
    """A zero-filled array in an open zarr group, in our layout ("/"-separated chunk keys, zarr
    format 2 under zarr 2 and 3): a pyramid level or a class map beside the map."""
    return _create_array(group, key, tuple(int(s) for s in shape),
                         tuple(int(c) for c in chunks), np.dtype(dtype))


def update_zarr_attrs(path: str | os.PathLike, updates: Mapping[str, Any]) -> None:
    """Merge ``updates`` into the provenance record of an OME-Zarr group (and re-save it)."""
    import zarr

    group = zarr.open_group(str(path), mode="r+")
    record = dict(group.attrs.get(ATTRS_KEY, {}))
    record.update(jsonable(dict(updates)))
    group.attrs[ATTRS_KEY] = record


def set_display_window(path: str | os.PathLike, low: float, high: float,
                       label: str = "Grad-CAM") -> None:
    """Store the display range as OME-NGFF ``omero`` metadata (other viewers read it too)."""
    import zarr

    group = zarr.open_group(str(path), mode="r+")
    group.attrs["omero"] = {"channels": [{
        "label": label, "color": "FFFFFF", "active": True,
        "window": {"min": float(low), "max": float(high), "start": float(low),
                   "end": float(high)},
    }]}


def jsonable(value: Any) -> Any:
    """Numpy scalars/arrays and tuples turned into plain JSON types."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return value


class OutputVolume:
    """A writable output volume being created at a temporary path (see :func:`open_output`).

    ``array`` takes slice assignment (zarr array or memory map); :meth:`update_attrs` adds to
    the provenance record before the file is committed.
    """

    def __init__(self, kind: str, partial: Path, array: Any, scale: tuple[float, ...],
                 unit: str | None, attrs: dict[str, Any]) -> None:
        self.kind = kind
        self.partial = partial
        self.array = array
        self.scale = scale
        self.unit = unit
        self.attrs = attrs

    def update_attrs(self, updates: Mapping[str, Any]) -> None:
        """Add to the provenance record. OME-Zarr attributes and the ``.npy`` sidecar store it;
        a TIFF keeps only the record it was created with (its header is written first)."""
        self.attrs.update(jsonable(dict(updates)))
        if self.kind == "zarr":
            update_zarr_attrs(self.partial, updates)

    def _finish(self) -> None:
        if self.kind in ("tiff", "npy"):
            self.array.flush()
            self.array = None  # release the memory map before the rename
        if self.kind == "npy":
            sidecar = {"scale": list(self.scale), "unit": self.unit, "axes": "zyx",
                       ATTRS_KEY: self.attrs}
            _sidecar(self.partial).write_text(json.dumps(sidecar, indent=1), encoding="utf-8")


@contextlib.contextmanager
def open_output(
    path: str | os.PathLike,
    shape: Sequence[int],
    *,
    scale: Sequence[float] = (1.0, 1.0, 1.0),
    unit: str | None = "micrometer",
    dtype: object = "float32",
    chunks: Sequence[int] | None = None,
    attrs: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    inputs: Sequence[str | os.PathLike] = (),
    notify: Callable[[str], None] | None = None,
) -> Iterator[OutputVolume]:
    """Create an output volume (format from the name: ``.zarr``, ``.tif``, ``.npy``) that is
    written in place on disk and appears under ``path`` only when the block finishes cleanly.

    ``.zarr`` is OME-Zarr (the recommended, chunked, lazily readable format); ``.tif`` an
    ImageJ float32 stack with the voxel size; ``.npy`` a NumPy memory map with a ``.json``
    sidecar for the voxel size and provenance. The memory-mapped formats get their whole
    size reserved on disk first, so a full disk is an :class:`OutputError` at the start and
    not a SIGBUS that kills the process half way. ``inputs`` and ``notify``: see
    :func:`atomic_path`.
    """
    kind = output_kind(path)
    shape = tuple(int(s) for s in shape)
    scale = tuple(float(s) for s in scale)
    unit = normalize_unit(unit) if unit else None
    dtype = _check_dtype(dtype)
    record = jsonable(dict(attrs or {}))
    partial_sidecar: Path | None = None
    try:
        with atomic_path(path, overwrite=overwrite, inputs=inputs, notify=notify) as partial:
            partial_sidecar = _sidecar(partial)
            if kind == "zarr":
                array = create_ome_zarr(partial, shape, scale=scale, unit=unit, dtype=dtype,
                                        chunks=chunks, attrs=record, name=Path(path).stem)
            else:
                if kind == "tiff":
                    array = _create_tiff(partial, shape, scale, unit, dtype, record)
                else:
                    array = np.lib.format.open_memmap(partial, mode="w+", dtype=dtype,
                                                      shape=shape)
                _reserve_disk_space(partial, int(array.offset))
            output = OutputVolume(kind, partial, array, scale, unit, record)
            yield output
            output._finish()
    except BaseException:
        if partial_sidecar is not None:
            _remove(partial_sidecar)
        raise
    if kind == "npy":  # only once the data is in place: move its sidecar next to it
        os.replace(partial_sidecar, _sidecar(Path(path).expanduser()))


def _reserve_disk_space(file: Path, data_offset: int) -> None:
    """Allocate every block of a freshly created (sparse) file before anything is written
    through its memory map.

    Writing through a memory map into a hole of a file on a full disk does not fail with an
    error: the kernel sends SIGBUS, which kills the process on the spot, without a message and
    without cleaning up. Reserving the space first turns a full disk into an ENOSPC here,
    before any work. Where ``posix_fallocate`` is missing, zeros are written instead.
    """
    size = file.stat().st_size
    try:
        if hasattr(os, "posix_fallocate"):
            descriptor = os.open(file, os.O_RDWR)
            try:
                os.posix_fallocate(descriptor, 0, size)
                return
            except OSError as error:
                if error.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                    raise
            finally:
                os.close(descriptor)
        with open(file, "r+b") as handle:  # no fallocate here: write the zeros themselves
            handle.seek(data_offset)
            block = bytes(16 * 1024**2)
            for start in range(data_offset, size, len(block)):
                handle.write(block[:min(len(block), size - start)])
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as error:
        error.filename = str(file)
        raise


def _create_tiff(partial: Path, shape: tuple[int, ...], scale: tuple[float, ...],
                 unit: str | None, dtype: np.dtype, record: dict[str, Any]) -> Any:
    import tifffile

    if dtype != np.float32:
        raise ValueError("ImageJ TIFF stores float32 only; use dtype float32 or a .zarr output")
    metadata = {"axes": "ZYX", "spacing": scale[0], "Info": json.dumps({ATTRS_KEY: record})}
    if unit:
        metadata["unit"] = _IMAGEJ_UNITS.get(unit, unit)
    return tifffile.memmap(partial, shape=shape, dtype=dtype, imagej=True,
                           resolution=(1.0 / scale[2], 1.0 / scale[1]), metadata=metadata)


def write_volume(
    path: str | os.PathLike,
    data: Any,
    *,
    scale: Sequence[float] = (1.0, 1.0, 1.0),
    unit: str | None = "micrometer",
    attrs: Mapping[str, Any] | None = None,
    dtype: object | None = None,
    chunks: Sequence[int] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a 3D array (NumPy, memmap, zarr or dask) atomically; the format comes from the
    name (see :func:`open_output`). Data is copied slab by slab, so dask and zarr inputs never
    have to fit in memory. Returns the output path."""
    shape = tuple(getattr(data, "shape", ()))
    if len(shape) != 3:
        raise ValueError(f"write_volume writes 3D volumes (Z, Y, X), got shape {shape}")
    if dtype is None:
        dtype = np.float16 if np.dtype(getattr(data, "dtype", np.float32)) == np.float16 \
            else np.float32
    with open_output(path, shape, scale=scale, unit=unit, dtype=dtype, chunks=chunks,
                     attrs=attrs, overwrite=overwrite) as output:
        step = chunks[0] if chunks else default_chunks(shape)[0]
        for start in range(0, shape[0], step):
            output.array[start:start + step] = np.asarray(data[start:start + step],
                                                          dtype=np.float32)
    return Path(path).expanduser()


def write_ome_zarr(
    path: str | os.PathLike,
    data: Any,
    *,
    scale: Sequence[float] = (1.0, 1.0, 1.0),
    unit: str | None = "micrometer",
    attrs: Mapping[str, Any] | None = None,
    dtype: object = "float32",
    chunks: Sequence[int] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``data`` as an OME-Zarr image atomically (``path`` must end in ``.zarr``)."""
    if output_kind(path) != "zarr":
        raise ValueError(f"write_ome_zarr writes .zarr stores, got {Path(path).name!r}")
    return write_volume(path, data, scale=scale, unit=unit, attrs=attrs, dtype=dtype,
                        chunks=chunks, overwrite=overwrite)


def write_tiff_volume(path: str | os.PathLike, data: Any, *,
                      scale: Sequence[float] = (1.0, 1.0, 1.0), unit: str | None = "micrometer",
                      overwrite: bool = False) -> Path:
    """Write a raw (e.g. uint16 CT) stack as an ImageJ TIFF with its voxel size, atomically.

    Unlike :func:`write_volume` the dtype is kept: this is for inputs, not for heatmaps.
    """
    import tifffile

    array = np.asarray(data)
    if array.ndim != 3:
        raise ValueError(f"expected a 3D stack (Z, Y, X), got shape {array.shape}")
    metadata: dict[str, Any] = {"axes": "ZYX", "spacing": float(scale[0])}
    unit = normalize_unit(unit) if unit else None
    if unit:
        metadata["unit"] = _IMAGEJ_UNITS.get(unit, unit)
    with atomic_path(path, overwrite=overwrite) as partial:
        tifffile.imwrite(partial, array, imagej=True, metadata=metadata,
                         resolution=(1.0 / float(scale[2]), 1.0 / float(scale[1])))
    return Path(path).expanduser()
