"""Evidence over a whole volume: the checks on every slice (2D model) or tile (3D model).

One evidence run tests one sample: the slice or window the user chose. Whether a map is
evidence *throughout* a scan is another question, and the obvious answer, the checks on the
whole volume as one input, needs the model's activations for the whole volume hundreds of
times (a 96 x 160² scan took 12-20 minutes and all its memory). Here the volume is cut
into the samples the model was made for (every slice along an axis for a 2D model, tiles
of the model's window for a 3D model), the checks run on one sample at a time and only the
numbers of each are kept: memory is one sample's run, whatever the volume's size, and the
volume is read slab by slab (dask, zarr and memory-mapped files stay on disk).

:func:`whole_volume_job` yields ``(done, total, stage)`` like
:func:`napari_gradcam.evidence.evidence_job` and writes, into a report folder,
``samples.csv`` (every verdict row of every sample, with its position), ``summary.json`` and
``summary.txt`` (per check and measure: how many samples passed, the median value) and
``provenance.json``. Nothing is written unless the whole run finishes.

No Qt and no napari here.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
import warnings
from collections.abc import Generator, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from napari_gradcam.core.provenance import make_provenance
from napari_gradcam.core.volume import window_starts
from napari_gradcam.evidence import (
    CHECKS,
    DEFAULT_CHECKS,
    EvidenceSettings,
    RegionKind,
    evidence_job,
)
from napari_gradcam.io import clean_stale_partials, temporary_name

__all__ = ["VolumeEvidence", "VolumeSample", "volume_samples", "whole_volume_job"]

Key = tuple[slice | int, ...]


@dataclass(frozen=True)
class VolumeSample:
    """One sample of the volume: its index into the volume and words for tables."""

    key: Key
    position: tuple[int, ...]
    where: str


def volume_samples(shape: Sequence[int], spatial_dims: int, *, window: Sequence[int] | None,
                   axis: int = 0) -> list[VolumeSample]:
    """The samples that cover the volume once: slices along ``axis`` (2D model) or tiles of
    ``window`` (3D model; the last tile of an axis moved flush to its end, so it may overlap
    its neighbour, and no voxel is left out)."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3:
        raise ValueError(f"whole-volume evidence needs a 3D volume, got shape {shape}")
    if spatial_dims == 2:
        axis %= 3
        samples = []
        for index in range(shape[axis]):
            key: list[slice | int] = [slice(None)] * 3
            key[axis] = index
            samples.append(VolumeSample(tuple(key), (index,),
                                        f"slice {index} along axis {axis}"))
        return samples
    if spatial_dims != 3:
        raise ValueError(f"whole-volume evidence is for 2D and 3D models, not {spatial_dims}D")
    size = tuple(int(w) for w in (window or shape))
    if len(size) != 3 or min(size) < 1:
        raise ValueError(f"the window must be three positive sizes, got {size}")
    if any(w > s for w, s in zip(size, shape, strict=True)):
        raise ValueError(f"the window {size} is larger than the volume {shape}")
    starts = [window_starts(s, w, step=w) for s, w in zip(shape, size, strict=True)]
    return [VolumeSample(tuple(slice(c, c + w) for c, w in zip(corner, size, strict=True)),
                         corner, f"window at {corner} of size {size}")
            for corner in _corners(starts)]


def _corners(starts: list[list[int]]) -> list[tuple[int, ...]]:
    return [(z, y, x) for z in starts[0] for y in starts[1] for x in starts[2]]


@dataclass
class _Tally:
    """The values and verdicts of one (check, measure) over the samples."""

    values: list[float] = field(default_factory=list)
    verdicts: list[bool | None] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        judged = [v for v in self.verdicts if v is not None]
        finite = [v for v in self.values if math.isfinite(v)]
        return {
            "samples": len(self.values),
            "judged": len(judged),
            "passed": sum(judged),
            "pass_rate": (sum(judged) / len(judged)) if judged else None,
            "median": float(np.median(finite)) if finite else None,
            "min": float(min(finite)) if finite else None,
            "max": float(max(finite)) if finite else None,
        }


@dataclass
class VolumeEvidence:
    """What a whole-volume run found: per (check, measure) pass counts and medians."""

    samples: int
    samples_with_region: int
    tallies: dict[tuple[str, str], dict[str, Any]]
    files: dict[str, Path]
    provenance: dict[str, Any]

    @property
    def passed(self) -> bool:
        """True when every judged row of every sample passed."""
        return all(t["passed"] == t["judged"] for t in self.tallies.values())

    def summary(self) -> str:
        lines = [f"{self.samples} samples ({self.samples_with_region} with a region)"]
        for (check, measure), tally in self.tallies.items():
            median = "undefined" if tally["median"] is None else f"{tally['median']:.3f}"
            verdict = ("info" if not tally["judged"]
                       else f"{tally['passed']}/{tally['judged']} pass")
            lines.append(f"  [{verdict}] {check}: {measure}, median {median}")
        return "\n".join(lines)


def whole_volume_job(
    model: Any,
    volume: Any,
    samples: Sequence[VolumeSample],
    folder: str | Path,
    *,
    layer: str | None = None,
    target: object = None,
    checks: Iterable[str] = DEFAULT_CHECKS,
    region: Any = None,
    region_kind: RegionKind = "evidence",
    method: str = "gradcam",
    settings: EvidenceSettings | None = None,
    source: str | None = None,
    overwrite: bool = False,
) -> Generator[tuple[int, int, str], None, VolumeEvidence]:
    """Run the evidence checks on each sample in turn; yield progress, return the tallies.

    ``model`` is a :class:`~napari_gradcam.core.models.LoadedModel` (each sample goes through
    its card's preprocessing) or a bare module (each sample becomes its ``(1, 1, *spatial)``
    input). ``region`` (the volume's shape, non-zero = inside) is cut like the volume; a
    sample where it is empty (or fills the sample) runs without the region check, and the
    table says so.
    Progress is in thousandths of a sample: ``done / total`` is the share of the run. The
    evidence job's protocol: cancel by closing the generator (``run_job`` does when its
    ``should_stop()`` turns true); the running sample's check stops before its next batch and
    nothing is written.
    """
    folder = Path(folder).expanduser()
    planned = [folder / name for name in ("samples.csv", "summary.json", "summary.txt",
                                          "provenance.json")]
    if any(path.exists() for path in planned) and not overwrite:
        raise FileExistsError(f"{folder} already holds a whole-volume evidence report; choose "
                              "another folder or pass --overwrite")
    if region is not None and tuple(region.shape) != tuple(volume.shape):
        raise ValueError(f"the region mask has shape {tuple(region.shape)}, the volume "
                         f"{tuple(volume.shape)}")
    chosen = [name for name in checks if name != "region"]
    unknown = [name for name in chosen if name not in CHECKS]
    if unknown:
        raise ValueError(f"unknown check(s) {unknown}; choose from {', '.join(CHECKS)}")
    settings = settings or EvidenceSettings()
    return _run(model, volume, list(samples), folder, planned, layer, target, chosen, region,
                region_kind, method, settings, source)


def _run(model, volume, samples, folder, planned, layer, target, chosen, region, region_kind,
         method, settings, source):
    scale = 1000
    total = scale * len(samples)
    tallies: dict[tuple[str, str], _Tally] = {}
    with_region = 0
    # the same naming as every output (io.atomic_path): host, process and a random part, so
    # two runs to one folder never share (or delete) each other's staging, and a later run
    # cleans up what a killed one left
    for message in clean_stale_partials(folder):
        warnings.warn(message, RuntimeWarning, stacklevel=2)
    staging = temporary_name(folder, "partial")
    staging.mkdir(parents=True)
    try:
        with open(staging / "samples.csv", "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(("sample", "where", "check", "measure", "value", "reference",
                             "verdict", "criterion"))
            for number, sample in enumerate(samples):
                data = np.asarray(volume[sample.key], dtype=np.float32)
                if isinstance(model, nn.Module):  # a bare module takes (1, C, *spatial)
                    data = data[None, None]
                mask = None
                if region is not None:
                    cut = np.asarray(region[sample.key]) != 0
                    if cut.any() and not cut.all():
                        mask, with_region = cut, with_region + 1
                job = evidence_job(model, data, layer=layer, target=target,
                                   checks=chosen + (["region"] if mask is not None else []),
                                   region_mask=mask, region_kind=region_kind, method=method,
                                   settings=settings, source=f"{source} ({sample.where})")
                base = number * scale
                try:
                    while True:
                        done, steps, stage = next(job)
                        yield (base + (scale * done // steps if steps else 0), total,
                               f"sample {number + 1}/{len(samples)}: {stage}")
                except StopIteration as finished:
                    report = finished.value
                finally:
                    job.close()  # closed early (cancel): the sample's running check stops
                for row in report.rows():
                    writer.writerow((number, sample.where, row.check, row.measure,
                                     f"{row.value:.6g}",
                                     "" if row.reference is None else f"{row.reference:.6g}",
                                     row.verdict, row.criterion))
                    tally = tallies.setdefault((row.check, row.measure), _Tally())
                    tally.values.append(float(row.value))
                    tally.verdicts.append(row.passed)
                if mask is None and region is not None:
                    writer.writerow((number, sample.where, "Region test", "no region in this "
                                     "sample", "", "", "info", "the region check did not run"))
                handle.flush()
                del report, data, mask  # one sample's run at a time: nothing accumulates
        provenance = make_provenance(
            method=method, layers=[layer] if layer else [], target=str(target),
            model_name=getattr(getattr(model, "card", None), "name", type(model).__name__),
            weights_sha256=getattr(model, "weights_sha256", None),
            preprocessing=list(getattr(getattr(model, "card", None), "preprocessing", [])),
            mode="evidence (whole volume)", source=source,
            options={"checks": chosen, "settings": settings.to_dict(),
                     "samples": len(samples), "samples_with_region": with_region,
                     "region_kind": region_kind if region is not None else None,
                     "volume_shape": list(volume.shape)},
        )
        result = VolumeEvidence(len(samples), with_region,
                                {key: tally.to_dict() for key, tally in tallies.items()},
                                {}, provenance)
        (staging / "summary.json").write_text(json.dumps({
            "samples": result.samples, "samples_with_region": with_region,
            "passed": result.passed,
            "checks": [{"check": check, "measure": measure, **tally}
                       for (check, measure), tally in result.tallies.items()],
        }, indent=2), encoding="utf-8")
        (staging / "summary.txt").write_text(result.summary() + "\n", encoding="utf-8")
        (staging / "provenance.json").write_text(json.dumps(provenance, indent=2, default=str),
                                                 encoding="utf-8")
        folder.mkdir(parents=True, exist_ok=True)
        for path in planned:
            (staging / path.name).replace(path)
        result.files = {path.stem + path.suffix.replace(".", "_"): path for path in planned}
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    yield total, total, "done"
    return result

