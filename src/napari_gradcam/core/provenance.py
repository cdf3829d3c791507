"""Provenance: what produced a map, written identically by every shell (napari, CLI, files).

A heatmap in a paper's supplement is only evidence if one can say which model, weights,
layer, method, target and preprocessing made it. Every shell stores this one dictionary
(layer metadata, OME-Zarr attributes, the evidence export), so they can never disagree.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import platform
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

_PACKAGES = ("napari-gradcam", "torch", "numpy", "napari", "dask", "zarr")


def package_versions() -> dict[str, str]:
    """Installed versions of the packages that decide the numbers (missing ones left out)."""
    versions = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def file_sha256(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """SHA-256 of a file, read in chunks (weights can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def make_provenance(
    *,
    method: str,
    layers: list[str],
    target: str,
    model_name: str,
    weights_sha256: str | None = None,
    preprocessing: list[Mapping[str, Any]] | None = None,
    mode: str = "image",
    source: str | None = None,
    options: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """One JSON-serialisable record of how a map was made."""
    return {
        "generator": "napari-gradcam",
        "method": method,
        "layers": list(layers),
        "target": target,
        "model": model_name,
        "weights_sha256": weights_sha256,
        "preprocessing": [dict(step) for step in (preprocessing or [])],
        "mode": mode,
        "source": source,
        "options": dict(options or {}),
        "versions": package_versions(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
