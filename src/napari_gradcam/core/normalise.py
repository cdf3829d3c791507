"""How a map's values are scaled for display, never in its data.

A Grad-CAM map is kept *raw*: its values are the method's output, in the units of the model's
score times its activations, so two maps made with the same model and layer can be compared
value by value. Normalising a map in place (each slice to its own maximum, say) would destroy
exactly that, and silently: a slice where the model saw nothing would look as hot as the slice
with the crack. So normalisation here is a *display scope*, declared beside the map:

* ``"raw"`` (default): the colour range is the map's recorded raw range (0 to the 99.9th
  percentile of the whole map, as the map was made); values compare across maps and slices;
* ``"per volume"``: the colour range is the map's own minimum to maximum;
* ``"per slice"``: the colour range is the minimum to maximum of the slice on screen, so a weak
  slice is stretched (and says so);

and, for stacks of spectra, :func:`scaled_along` gives a lazy *derived* view in which every
row is divided by its own maximum (a separate display layer; the map's data stays raw).

Qt-free and napari-free: the dock widgets call these functions, and they are tested alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

#: The display scopes, the default first.
SCOPES: tuple[str, ...] = ("raw", "per volume", "per slice")
DEFAULT_SCOPE = "raw"

#: What each scope means, for the colour-bar caption and the layer's metadata.
SCOPE_MEANINGS: dict[str, str] = {
    "raw": "raw CAM values (comparable across maps and slices)",
    "per volume": "colour range = this map's min to max",
    "per slice": "colour range = the displayed slice's min to max (not comparable between "
                 "slices)",
}


def check_scope(scope: str) -> str:
    """``scope`` if it is one of :data:`SCOPES`, else a ``ValueError`` that lists them."""
    if scope not in SCOPES:
        raise ValueError(f"normalisation scope must be one of {', '.join(SCOPES)}, "
                         f"got {scope!r}")
    return scope


def robust_limits(array: Any) -> tuple[float, float]:
    """0 (or the minimum, when negative) to the 99.9th percentile of the finite values: the
    raw range a map is shown with when it is made, so a few hot pixels do not wash out the rest.
    """
    finite = _finite(array)
    if finite.size == 0:
        return 0.0, 1.0
    low = min(0.0, float(finite.min()))
    high = float(np.percentile(finite, 99.9))
    if high <= low:
        high = float(finite.max()) if finite.max() > low else low + 1.0
    return low, high


def full_limits(array: Any) -> tuple[float, float]:
    """Minimum to maximum of the finite values (a constant map gets a unit-wide range, since a
    colour range of zero width cannot be drawn)."""
    finite = _finite(array)
    if finite.size == 0:
        return 0.0, 1.0
    low, high = float(finite.min()), float(finite.max())
    if high <= low:
        high = low + 1.0
    return low, high


def scope_limits(data: Any, scope: str, *, raw: tuple[float, float] | None = None,
                 current: Sequence[int | None] | None = None) -> tuple[float, float]:
    """The contrast limits that show ``data`` in ``scope``.

    ``raw``: the map's recorded raw limits (``None``: :func:`robust_limits` of the data).
    ``current``: for ``"per slice"``, one entry per axis of ``data``: the index of the fixed
    (not displayed) axes, ``None`` for the displayed ones; ``None`` or no fixed axis (a 2D map
    on screen, or the 3D view) gives the whole map's range.
    """
    check_scope(scope)
    if scope == "raw":
        return tuple(raw) if raw is not None else robust_limits(data)  # type: ignore[return-value]
    if scope == "per slice" and current is not None and any(i is not None for i in current):
        if len(current) != np.ndim(data):
            raise ValueError(f"the slice index {tuple(current)} has {len(current)} entries "
                             f"but the map has {np.ndim(data)} axes")
        key = tuple(slice(None) if i is None else int(min(max(i, 0), s - 1))
                    for i, s in zip(current, np.shape(data), strict=True))
        return full_limits(data[key])
    return full_limits(data)


def scaled_along(data: Any, axis: int) -> Any:
    """A lazy view of ``data`` with every index along ``axis`` divided by its own maximum
    (rows of a spectra stack each shown from 0 to 1). Indices whose maximum is not positive
    stay 0. A dask array: nothing is computed until napari draws it, and ``data`` is not
    copied or changed."""
    import dask.array as da

    array = data if isinstance(data, da.Array) else da.from_array(np.asarray(data)
                                                                  if isinstance(data, list)
                                                                  else data)
    axis = int(axis) % array.ndim
    others = tuple(a for a in range(array.ndim) if a != axis)
    peak = da.nanmax(array, axis=others, keepdims=True)
    safe = da.where(peak > 0, peak, 1.0)
    return da.where(peak > 0, array / safe, 0.0).astype(np.float32)


def weak_rows(data: Any, axis: int, fraction: float = 0.1,
              limits: tuple[float, float] | None = None) -> int:
    """How many indices along ``axis`` have their maximum under ``fraction`` of the shared
    colour range's top (``limits``; ``None``: :func:`robust_limits`): rows that look empty on
    a shared scale although their CAM is not zero. Why the per-row option exists."""
    array = np.asarray(data, dtype=np.float64)
    top = (limits or robust_limits(array))[1]
    others = tuple(a for a in range(array.ndim) if a != int(axis) % array.ndim)
    peaks = np.nanmax(array, axis=others)
    return int(np.count_nonzero(peaks < fraction * top))


def top_percentile(data: Any, percentile: float = 95.0) -> float:
    """The ``percentile`` of the map's positive values: an iso-surface there wraps the places
    where the map is highest (Grad-CAM is zero over most of a volume, so a percentile over all
    voxels would be 0)."""
    finite = _finite(data)
    positive = finite[finite > 0]
    if positive.size == 0:
        return 0.0
    return float(np.percentile(positive, percentile))


def _finite(array: Any) -> np.ndarray:
    """The finite values, flat, in the map's own float dtype (a float32 map is not copied to
    float64 first: for a map of a few GB that copy would be the largest thing in memory)."""
    values = np.asarray(array)
    if values.dtype.kind != "f":
        values = values.astype(np.float64)
    values = values.ravel()
    return values[np.isfinite(values)]
