"""Benchmark: one process versus dask worker processes on a generated CT volume.

    python benchmarks/bench_distributed.py                 # slices 256^3, volume 128^3
    python benchmarks/bench_distributed.py --size 256 --volume-size 256   # both at 256^3

For each mode the same volume file is explained twice into OME-Zarr:

* **1 process**: :func:`napari_gradcam.distributed.explain_file` in a fresh subprocess, torch
  using every core of the machine;
* **N workers**: :func:`napari_gradcam.distributed.run_distributed` on a ``LocalCluster`` of N
  worker processes with one thread each (cores / N torch threads per worker).

So both runs use the same cores; the table says what chunking buys (or costs) on one machine.
Reported: wall time of the explanation (cluster start-up listed separately), voxels per
second, and the peak resident memory (``ru_maxrss``) of every process involved, next to the
resident memory of a process that has only imported torch and loaded the model (the floor).
The two outputs are compared voxel for voxel. Models have random weights (speed does not
depend on what a network has learned): a 2D ResNet-like classifier (widths 8-16-32) slice by
slice, and a 3D one (widths 8-16-16) over 32^3 windows with 25 % overlap. Imports, the
worker processes' start and the first model load in the timed process are excluded (listed
as start-up); the workers' own model loading is included.

On a 2-core machine the volume mode defaults to 128^3 so that the whole benchmark stays
within about ten minutes; ``--volume-size 256`` runs it at full size.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))


def peak_rss_mib() -> float:
    """This process's peak resident set size so far, in MiB.

    ``VmHWM`` from /proc, not ``ru_maxrss``: Linux carries ``ru_maxrss`` over ``execve``, so a
    worker started by a big parent would report the parent's peak.
    """
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mib() -> float:
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return float("nan")


def write_model(folder: Path, spatial_dims: int, widths: tuple[int, ...]) -> Path:
    import torch
    import yaml
    from safetensors.torch import save_file

    from napari_gradcam.core.architectures import ResNetLike

    torch.manual_seed(0)
    model = ResNetLike(spatial_dims=spatial_dims, in_channels=1, num_classes=3, widths=widths)
    with torch.no_grad():
        model.classifier.weight.abs_()  # positive head: maps are not all zero
    name = f"bench{spatial_dims}d"
    save_file(model.state_dict(), str(folder / f"{name}.safetensors"))
    card = {
        "name": name, "architecture": "resnet_like",
        "architecture_kwargs": {"spatial_dims": spatial_dims, "in_channels": 1,
                                "num_classes": 3, "widths": list(widths)},
        "weights": f"{name}.safetensors", "spatial_dims": spatial_dims, "in_channels": 1,
        "task": "classification", "class_names": ["none", "pore", "crack"],
        "target_layer": "features.3", "input_size": [32] * spatial_dims,
        "preprocessing": [{"op": "window", "min": 4000.0, "max": 40000.0}],
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(card), encoding="utf-8")
    return path


def make_scan(folder: Path, size: int) -> Path:
    from napari_gradcam.io import write_tiff_volume

    try:
        from napari_gradcam.samples.ct_volume import make_ct_volume

        sample = make_ct_volume((size, size, size), seed=0)
        volume, scale = sample.volume, sample.scale
    except ImportError:  # samples not available: noise with the same grey range
        rng = np.random.default_rng(0)
        volume = rng.integers(8000, 32000, (size, size, size), dtype=np.uint16)
        scale = (1.0, 0.65, 0.65)
    return write_tiff_volume(folder / f"ct_{size}.tif", volume, scale=scale)


def options_for(mode: str, threads: int | None):
    from napari_gradcam.distributed import ExplainOptions

    if mode == "slices":
        return ExplainOptions(mode="slices", batch_size=8, chunk=32, device="cpu",
                              torch_threads=threads)
    return ExplainOptions(mode="volume", window=(32, 32, 32), overlap=0.25, batch_size=8,
                          chunk=64, device="cpu", torch_threads=threads)


def single_process(scan: str, card: str, out: str, mode: str) -> dict:
    """Run in a fresh subprocess: explain_file, with torch on every core."""
    import dask.array  # noqa: F401 - imported before the clock starts, as in a warm process
    import tifffile  # noqa: F401
    import torch
    import zarr  # noqa: F401

    from napari_gradcam.distributed import explain_file, get_model

    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    get_model(card, "cpu", False, threads)
    floor = current_rss_mib()
    started = time.perf_counter()
    summary = explain_file(scan, card, out, options=options_for(mode, threads))
    return {"seconds": time.perf_counter() - started, "peak_rss": peak_rss_mib(),
            "floor_rss": floor, "voxels_per_second": summary.voxels_per_second,
            "threads": threads}


def _warm_up() -> None:
    import dask.array  # noqa: F401
    import zarr  # noqa: F401

    import napari_gradcam.distributed  # noqa: F401 - torch and the engine


def _worker_memory() -> tuple[float, float]:
    return peak_rss_mib(), current_rss_mib()


def distributed_run(scan: Path, card: Path, out: Path, mode: str, workers: int) -> dict:
    from distributed import Client, LocalCluster

    from napari_gradcam.distributed import run_distributed

    started = time.perf_counter()
    cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                           dashboard_address=None)
    client = Client(cluster)
    client.wait_for_workers(workers)
    client.run(_warm_up)
    startup = time.perf_counter() - started
    try:
        threads = max(1, (os.cpu_count() or 1) // workers)
        started = time.perf_counter()
        summary = run_distributed(scan, card, out, options=options_for(mode, threads),
                                  client=client)
        seconds = time.perf_counter() - started
        memory = client.run(_worker_memory)
    finally:
        client.close()
        cluster.close()
    return {"seconds": seconds, "startup": startup, "threads": threads,
            "voxels_per_second": summary.voxels_per_second,
            "worker_peak_rss": sorted(round(m[0]) for m in memory.values()),
            "driver_peak_rss": peak_rss_mib(),
            "workers_used": summary.provenance.get("workers_used")}


def identical(first: Path, second: Path, slab: int = 16) -> bool:
    """Voxel-for-voxel equality, read slab by slab (the driver's memory stays small)."""
    from napari_gradcam.io import read_volume

    a, b = read_volume(first)[0], read_volume(second)[0]
    return a.shape == b.shape and all(
        np.array_equal(a[z:z + slab], b[z:z + slab]) for z in range(0, a.shape[0], slab))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=256,
                        help="edge of the cubic volume (slices mode)")
    parser.add_argument("--volume-size", type=int, default=128,
                        help="edge of the cubic volume (volume mode)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--modes", nargs="+", default=["slices", "volume"],
                        choices=("slices", "volume"))
    parser.add_argument("--single", nargs=4, metavar=("SCAN", "CARD", "OUT", "MODE"),
                        help=argparse.SUPPRESS)  # internal: the single-process child
    parser.add_argument("--generate", nargs=2, metavar=("FOLDER", "SIZE"),
                        help=argparse.SUPPRESS)  # internal: make a volume in a child
    args = parser.parse_args(argv)
    if args.single:
        print(json.dumps(single_process(*args.single)))
        return 0
    if args.generate:
        print(make_scan(Path(args.generate[0]), int(args.generate[1])))
        return 0

    with tempfile.TemporaryDirectory(prefix="bench-gradcam-") as tmp:
        folder = Path(tmp)
        sizes = {"slices": args.size, "volume": args.volume_size}
        scans = {}
        for size in sorted({sizes[mode] for mode in args.modes}):
            started = time.perf_counter()
            # In a child process, so that this driver's peak memory is its own.
            child = subprocess.run([sys.executable, __file__, "--generate", str(folder),
                                    str(size)], capture_output=True, text=True, check=True,
                                   env=dict(os.environ, PYTHONPATH=str(SRC)))
            scans[size] = Path(child.stdout.strip().splitlines()[-1])
            print(f"generated a {size}^3 CT volume in {time.perf_counter() - started:.1f} s",
                  file=sys.stderr)
        cards = {"slices": write_model(folder, 2, (8, 16, 32)),
                 "volume": write_model(folder, 3, (8, 16, 16))}
        rows = []
        for mode in args.modes:
            card, scan = cards[mode], scans[sizes[mode]]
            single_out, spread_out = folder / f"{mode}_1.zarr", folder / f"{mode}_n.zarr"
            env = dict(os.environ, PYTHONPATH=str(SRC))
            child = subprocess.run(
                [sys.executable, __file__, "--single", str(scan), str(card), str(single_out),
                 mode], capture_output=True, text=True, env=env, check=True)
            single = json.loads(child.stdout.strip().splitlines()[-1])
            print(f"{mode}: 1 process {single['seconds']:.1f} s", file=sys.stderr)
            spread = distributed_run(scan, card, spread_out, mode, args.workers)
            print(f"{mode}: {args.workers} workers {spread['seconds']:.1f} s", file=sys.stderr)
            same = identical(single_out, spread_out)
            rows.append((mode, single, spread, same))

    cores = os.cpu_count()
    what = {"slices": f"slices, {args.size}³: 2D ResNet 8-16-32, batches of 8 slices, "
                      "chunks of 32",
            "volume": f"volume, {args.volume_size}³: 3D ResNet 8-16-16, 32³ windows, 25 % "
                      "overlap, chunks of 64 planes"}
    print(f"\nGenerated uint16 CT volumes, {cores} CPU cores, CPU only, float32 OME-Zarr "
          "output.\n")
    print("| mode | run | time (s) | voxels/s | peak RSS per process (MiB) | identical |")
    print("|---|---|---:|---:|---|---|")
    for mode, single, spread, same in rows:
        print(f"| {what[mode]} | 1 process, {single['threads']} torch threads | "
              f"{single['seconds']:.1f} | {single['voxels_per_second']:,.0f} | "
              f"{single['peak_rss']:.0f} (floor {single['floor_rss']:.0f}) | reference |")
        workers = ", ".join(str(m) for m in spread["worker_peak_rss"])
        print(f"| | {args.workers} dask workers × {spread['threads']} thread "
              f"(+{spread['startup']:.1f} s start-up) | {spread['seconds']:.1f} | "
              f"{spread['voxels_per_second']:,.0f} | workers {workers}; driver "
              f"{spread['driver_peak_rss']:.0f} | {'yes' if same else 'NO'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
