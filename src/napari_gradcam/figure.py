"""A figure of what the user sees: the canvas (2D slice with map and labels, or the 3D view)
with a scale bar in the layers' physical units, saved as PNG.

Why the canvas and not a re-plot: the figure must show exactly the layers, colours, contrast
and 3D style on screen, which napari's own renderer already draws; a re-plot would drift from
it. napari's scale bar takes its unit from the layers' ``units`` (µm for a CT with its voxel
size), so the figure's bar reads in micrometres when the scan has them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np


def export_figure(viewer: Any, path: str | os.PathLike, *, scale_bar: bool = True,
                  size: tuple[int, int] | None = None) -> Path:
    """Save the canvas of ``viewer`` as a PNG at ``path`` with napari's scale bar (``scale_bar``)
    and return the path. ``size`` (height, width) in pixels, ``None``: the canvas's size. The
    viewer's own scale-bar setting is put back afterwards: exporting does not change the view.
    """
    path = Path(path).expanduser()
    if path.suffix.lower() != ".png":
        raise ValueError(f"the figure {str(path)!r} must be a .png file")
    if not path.parent.is_dir():
        raise ValueError(f"cannot save the figure {str(path)!r}: the folder "
                         f"{str(path.parent)!r} does not exist")
    bar = canvas_overlay(viewer, "scale_bar")
    was_visible, had_ticks = bar.visible, bar.ticks
    try:
        bar.visible = scale_bar
        bar.ticks = True
        image = viewer.screenshot(canvas_only=True, size=size, flash=False)
    finally:
        bar.visible, bar.ticks = was_visible, had_ticks
    write_png(path, image)
    return path


def canvas_overlay(viewer: Any, name: str) -> Any:
    """The viewer's canvas overlay ``name`` (``"scale_bar"`` or ``"text"``): napari 0.9 keeps
    them in ``viewer.canvas.overlays`` (the old attributes warn), napari 0.7–0.8 as
    ``viewer.scale_bar`` / ``viewer.text_overlay``."""
    canvas = getattr(viewer, "canvas", None)
    overlays = getattr(canvas, "overlays", None)
    if overlays is not None and name in overlays:
        return overlays[name]
    return getattr(viewer, {"scale_bar": "scale_bar", "text": "text_overlay"}[name])


def write_png(path: str | os.PathLike, image: np.ndarray) -> None:
    """Write an (H, W, 3|4) uint8 image as PNG (imageio ships with napari)."""
    import imageio.v3 as iio

    iio.imwrite(str(path), np.asarray(image, dtype=np.uint8), extension=".png")
