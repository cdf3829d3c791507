"""A map that the job writes to an on-disk OME-Zarr, shown in the viewer while it is made.

A CT scan of 1000³–2000³ voxels has a float32 map of 4–32 GB: the widget cannot hold it, so the
job writes it chunk by chunk into an OME-Zarr pyramid (:mod:`napari_gradcam.core.run.output`)
and the viewer shows that store lazily, one napari multiscale layer whose chunks fill in as the
run goes on. This module is the viewer's half: add the layer once the store exists, re-read
it now and then (not on every batch: a refresh re-reads the visible chunks), and, when a run is
cancelled, say in the layer's name and metadata how much of it is there, so a partial map never
looks complete. Nothing here computes: the job writes, napari reads.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
from napari.layers import Image

from napari_gradcam._qt_common import LIVE_MAP_KEY
from napari_gradcam.jobs import map_layer_data, store_state

REFRESH_INTERVAL_S = 0.5
"""At most this often the viewer re-reads the store while it fills: each refresh reads the
visible chunks of the coarsest level that fits the view, so refreshing on every batch of a fast
model would spend the GUI thread on reading rather than on the user."""
MAP_STORE_KEY = LIVE_MAP_KEY
"""Key in a live layer's metadata: the store it shows (for the widget and for the user)."""


def incomplete_name(name: str, state: dict[str, Any]) -> str:
    """``name`` marked as a partial map: '<name> (incomplete: 40/384 planes)'."""
    done, total = state.get("planes_done"), state.get("planes_total")
    if isinstance(done, int) and isinstance(total, int):
        return f"{name} (incomplete: {done}/{total} planes)"
    return f"{name} (incomplete)"


def running_contrast_limits(levels: list[Any]) -> tuple[float, float] | None:
    """(0, max) of the coarsest pyramid level written so far, None while it is all zeros.

    The coarsest level is at most a few MB whatever the volume, so this is cheap enough to do
    at each refresh; the final limits come from the job's own percentiles when it ends.
    """
    coarse = np.asarray(levels[-1], dtype=np.float64)
    finite = coarse[np.isfinite(coarse)]
    if finite.size == 0:
        return None
    low, high = float(finite.min()), float(finite.max())
    if not math.isfinite(high) or high <= max(low, 0.0):
        return None
    return (min(low, 0.0), high)


class LiveMap:
    """The layer that shows one map store while the job writes it.

    ``viewer`` the napari viewer; ``path`` the store the job writes (``request.output``);
    ``name`` the layer's name while it runs; ``layer_kwargs`` the map's placement and display
    (scale, translate, colormap, blending, ...), the same as for an in-memory map, so the live
    layer sits exactly where the finished map will.
    """

    def __init__(self, viewer: Any, path: str | Path, name: str,
                 layer_kwargs: dict[str, Any],
                 refresh_interval: float = REFRESH_INTERVAL_S) -> None:
        self.viewer = viewer
        self.path = Path(path)
        self.name = name
        self.layer_kwargs = {k: v for k, v in layer_kwargs.items()
                             if k not in ("contrast_limits", "metadata")}
        self.refresh_interval = refresh_interval
        self.layer: Image | None = None
        self._levels: list[Any] = []
        self._last_refresh = -math.inf

    def update(self) -> Image | None:
        """After a batch: add the layer once the store exists, else refresh it (throttled)."""
        if self.layer is None:
            if not (self.path / "zarr.json").exists() and not (self.path / ".zattrs").exists():
                return None  # the job has not created the store yet
            try:
                self._levels = map_layer_data(self.path)
            except (KeyError, ValueError, OSError):
                return None  # created but its metadata not yet written: next batch
            multiscale = len(self._levels) > 1
            self.layer = self.viewer.add_image(
                self._levels if multiscale else self._levels[0], name=self.name,
                multiscale=multiscale,
                contrast_limits=(0.0, 1.0),
                metadata={MAP_STORE_KEY: str(self.path)}, **self.layer_kwargs)
            self._last_refresh = time.monotonic()
            return self.layer
        now = time.monotonic()
        if now - self._last_refresh >= self.refresh_interval:
            self._last_refresh = now
            self.refresh()
        return self.layer

    def refresh(self) -> None:
        """Re-read the store's visible chunks and widen the contrast to what is written."""
        if self.layer is None or self.layer not in self.viewer.layers:
            return
        limits = running_contrast_limits(self._levels)
        if limits is not None:
            self.layer.contrast_limits = limits
        self.layer.refresh()

    def finish(self) -> None:
        """The run ended: remove the live layer (the finished map takes its place)."""
        if self.layer is not None and self.layer in self.viewer.layers:
            self.viewer.layers.remove(self.layer)
        self.layer = None

    def abandon(self) -> Image | None:
        """The run was cancelled or failed: keep what is on disk, named and marked partial.

        The store itself already says ``complete: false`` (the job wrote it); the layer says
        so too, in its name and its metadata, so neither a screenshot nor a later look at the
        layer list can mistake the part for the whole.
        """
        if self.layer is None or self.layer not in self.viewer.layers:
            return None
        try:
            state = store_state(self.path)
        except (KeyError, ValueError, OSError):
            state = {}
        self.refresh()
        self.layer.name = incomplete_name(self.name, state)
        self.layer.metadata = {**self.layer.metadata, MAP_STORE_KEY: str(self.path),
                               "complete": False, **{k: v for k, v in state.items()
                                                     if v is not None}}
        return self.layer
