"""Benchmark: a whole CT scan explained from the widget's job path, map written to disk.

    OMP_NUM_THREADS=1 python benchmarks/bench_widget_volume.py --size 256
    python benchmarks/bench_widget_volume.py                      # 1024^3: hours on 2 CPU cores
    python benchmarks/bench_widget_volume.py --size 384 --modes slices --device cuda

What a user does in napari: a uint16 scan of ``size``³ voxels stored as zarr is opened lazily
(a dask array, nothing read yet), and :func:`napari_gradcam.jobs.explain_job` (the widget's
job) explains it with ``ExplainRequest.output`` set, so the map is written chunk by chunk into
an OME-Zarr with its pyramid and never held in memory:

* **slices**: the shipped ``ct-slice-unet`` (2D, 3-level U-Net), Seg-Grad-CAM of the crack
  class on every slice along z, batch ``--batch`` (8);
* **windows**: the shipped ``ct-patch-classifier`` (3D, 32³ windows), Grad-CAM of the
  predicted class over overlapping Gaussian-blended windows (overlap 0.25), batch ``--batch``.

Each mode runs in a fresh interpreter (peak RSS is per process). It loads the model, runs one
small warm-up explanation (kernels, allocator pools: the model's own footprint), records that
resident memory as the baseline, resets the peak counter (``/proc/self/clear_refs``), runs the
job, and reports the wall time and the peak resident memory (``VmHWM``) *above the baseline*:
what explaining the volume costs in memory beyond having the model loaded. The scan is
synthetic (a grey cylinder with noise, a few dark pores) and made once per size in
``--workdir``; the map store is deleted after each run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"

_CHILD = r"""
import json, sys, time
import dask
import dask.array as da
import numpy as np
import torch

torch.set_num_threads(int(sys.argv[6]))
dask.config.set(scheduler="synchronous")
from napari_gradcam.core.models import load_model
from napari_gradcam.jobs import ExplainRequest, ImageSource, TargetChoice, explain_job

mode, scan, out, device = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[5]
batch = int(sys.argv[4])


def status_kib(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


volume = da.from_zarr(scan)
if mode == "slices":
    loaded = load_model("ct-slice-unet", device=device)
    target = TargetChoice("class", class_index=2)
    request = dict(mode="slices", axis=0, batch_size=batch, target=target, domain_check=False,
                   device=None if device == "cpu" else device)
    warm = volume[:batch]
else:
    loaded = load_model("ct-patch-classifier", device=device)
    request = dict(mode="windows", batch_size=batch, domain_check=False,
                   device=None if device == "cpu" else device)
    warm = volume[:48, :48, :48]
for _ in explain_job(loaded, ImageSource("warm-up", warm), ExplainRequest(**request)):
    pass
open("/proc/self/clear_refs", "w").write("5")  # peak RSS := current RSS
baseline = status_kib("VmRSS")
started = time.perf_counter()
job = explain_job(loaded, ImageSource("scan", volume), ExplainRequest(**request, output=out))
total = 0
try:
    while True:
        done, total = next(job)[:2]
except StopIteration as finished:
    result = finished.value
seconds = time.perf_counter() - started
label = next(iter(result.maps))
print(json.dumps({
    "mode": mode, "shape": list(volume.shape), "batch": batch, "items": total,
    "seconds": round(seconds, 1), "baseline_mib": round(baseline / 1024, 1),
    "peak_above_baseline_mib": round((status_kib("VmHWM") - baseline) / 1024, 1),
    "map_type": type(result.maps[label]).__module__.split(".")[0],
}))
"""


def make_scan(path: Path, size: int) -> None:
    """A synthetic uint16 CT scan (cylinder of material, noise, dark pores), chunk by chunk."""
    import numpy as np
    import zarr

    rng = np.random.default_rng(0)
    array = zarr.open_array(str(path), mode="w", shape=(size,) * 3, chunks=(16, size, size),
                            dtype="uint16")
    yy, xx = np.mgrid[:size, :size]
    inside = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (0.42 * size) ** 2
    pores = rng.uniform(0, size, (max(4, size // 16), 3))
    for z0 in range(0, size, 16):
        planes = np.where(inside, 30000.0, 8000.0)[None].repeat(min(16, size - z0), 0)
        planes += rng.normal(0, 1500, planes.shape)
        radius2 = (size / 64) ** 2
        for pz, py, px in pores:
            for k in range(planes.shape[0]):
                if (z0 + k - pz) ** 2 >= radius2:  # the pore does not reach this plane
                    continue
                d2 = (z0 + k - pz) ** 2 + (yy - py) ** 2 + (xx - px) ** 2
                planes[k][d2 < radius2] = 9000.0
        array[z0:z0 + planes.shape[0]] = np.clip(planes, 0, 65535).astype(np.uint16)


def run(mode: str, scan: Path, workdir: Path, batch: int, device: str, threads: int) -> dict:
    out = workdir / f"map_{mode}.zarr"
    if out.exists():
        shutil.rmtree(out)
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    started = time.perf_counter()
    completed = subprocess.run(
        [sys.executable, "-c", _CHILD, mode, str(scan), str(out), str(batch), device,
         str(threads)], capture_output=True, text=True, env=env, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"{mode} failed:\n{completed.stderr[-3000:]}")
    row = json.loads(completed.stdout.strip().splitlines()[-1])
    row["process_seconds"] = round(time.perf_counter() - started, 1)
    shutil.rmtree(out, ignore_errors=True)
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=1024, help="the scan is size^3 (1024)")
    parser.add_argument("--modes", default="slices,windows")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where the scan and maps go (a temporary folder)")
    args = parser.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_widget_volume_"))
    workdir.mkdir(parents=True, exist_ok=True)
    scan = workdir / f"scan_{args.size}.zarr"
    if not scan.exists():
        started = time.perf_counter()
        make_scan(scan, args.size)
        print(f"made {scan} in {time.perf_counter() - started:.0f} s", flush=True)
    print("| mode | scan | batch | items | wall (s) | model footprint (MiB) | "
          "peak RSS above it (MiB) | map |", flush=True)
    print("|---|---|---|---|---|---|---|---|", flush=True)
    for mode in args.modes.split(","):
        row = run(mode, scan, workdir, args.batch, args.device, args.threads)
        print(f"| {row['mode']} | {'x'.join(map(str, row['shape']))} uint16 | {row['batch']} | "
              f"{row['items']} | {row['seconds']} | {row['baseline_mib']} | "
              f"{row['peak_above_baseline_mib']} | {row['map_type']} on disk |", flush=True)


if __name__ == "__main__":
    main()
