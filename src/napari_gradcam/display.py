"""How a Grad-CAM map is shown over its scan: one choice, shared by the reader and the widget.

Why a single-hue ``yellow`` (black → yellow) and not ``turbo``, ``inferno`` or ``magma``:

* **black at zero**: with additive blending a voxel adds its colour to the scan below, so a
  colormap whose zero is not black tints the whole scan (``turbo``'s dark blue does);
* **one hue, brightness = value**: over grey CT a single hue reads as "how much" at a glance,
  and every value keeps the same hue however bright the scan is underneath; a multi-hue map
  mixed additively with grey gives hues that no longer match its colour bar;
* **apart from napari's Labels**: the default label colours of the first labels (1 a dark
  orange-brown, 2 light cyan, 3 lavender, 4 purple, 5 indigo, 6 light green) collide with
  ``inferno``'s dark reds and oranges and ``magma``'s purples; yellow is none of them, so a
  painted crack or pore stays distinguishable from the map beside it.

No napari import here: the reader (imported by napari for every file it is offered) and the
headless code can use these names for free.
"""

from __future__ import annotations

#: napari colormap name of a Grad-CAM map layer (the reader and the widget's default).
MAP_COLORMAP = "yellow"
#: Blending of a map layer: added to the scan below, so zero CAM leaves the scan as it is.
MAP_BLENDING = "additive"
#: Opacity of a map layer (the widget's default).
MAP_OPACITY = 0.6
