"""Helpers the dock-widget tests share (the explainer's and the evidence widget's).

A plain module rather than ``conftest.py``: these are functions the tests call, not fixtures,
and importing them by name shows where they come from.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from napari_gradcam.core.architectures import build_architecture

CLASSES = ("clean", "precipitates", "crack")

# The explainer widget remembers its choices in the user's config folder; every widget test
# imports this module, so no test reads or overwrites a user's choices (tests that compare
# sessions point NAPARI_GRADCAM_CONFIG_DIR at their own tmp_path on top of this).
os.environ.setdefault("NAPARI_GRADCAM_CONFIG_DIR",
                      tempfile.mkdtemp(prefix="napari-gradcam-test-config-"))


def write_card(folder: Path, name: str, *, architecture: str = "resnet_like",
               spatial_dims: int = 2, task: str = "classification",
               widths: tuple[int, ...] = (4, 8, 8), target_layer: str | None = None) -> Path:
    """Save a small seeded built-in network as a real card + safetensors in ``folder``.

    Untrained on purpose: the widgets' mechanics (placement, cancel, errors) do not depend on
    what the model learned, and a tiny network keeps each GUI test fast.
    """
    torch.manual_seed(0)
    model = build_architecture(architecture, spatial_dims=spatial_dims, in_channels=1,
                               num_classes=3, widths=widths)
    save_file(model.state_dict(), folder / f"{name}.safetensors")
    card = folder / f"{name}.yaml"
    card.write_text(
        f"name: {name}\narchitecture: {architecture}\n"
        f"architecture_kwargs: {{spatial_dims: {spatial_dims}, in_channels: 1, num_classes: 3, "
        f"widths: {list(widths)}}}\nweights: {name}.safetensors\nspatial_dims: {spatial_dims}\n"
        f"in_channels: 1\ntask: {task}\nclass_names: [{', '.join(CLASSES)}]\n"
        + ("input_size: [8, 8, 8]\n" if spatial_dims == 3 else "")
        + (f"target_layer: {target_layer}\n" if target_layer else ""),
        encoding="utf-8",
    )
    return card


def finish(qtbot: Any, widget: Any, timeout: int = 30000) -> None:
    """Wait until the widget's thread worker is done (its ``worker`` is reset to None)."""
    qtbot.waitUntil(lambda: widget.worker is None, timeout=timeout)
