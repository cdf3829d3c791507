"""How much does a Grad-CAM cost? Forward pass vs ours vs the usual ways, time and peak memory.

Run: ``.venv/bin/python benchmarks/bench_gradcam.py`` (add ``--device cuda`` on a GPU). Prints
one markdown table; the README quotes it.

Compared, on the same model, input and target layer:
* ``forward``   — plain batched inference (``torch.inference_mode``), the floor;
* ``ours``      — :class:`napari_gradcam.GradCAM` (graph cut at the layer, ``autograd.grad``);
* ``naive``     — hooks + ``loss.backward()`` through the whole network with parameter
  gradients, as pytorch-grad-cam and MONAI's CAMs do;
* ``captum``    — Captum's ``LayerGradCam`` + ``LayerAttribution.interpolate`` (if installed);
* ``volume``    — :func:`explain_volume` slice-wise over the stack vs plain batched inference.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated``; on the CPU the process's peak
resident set (VmHWM) above what it held before, reset between runs through
``/proc/self/clear_refs`` (Linux). The script re-executes itself once with glibc's
``MALLOC_MMAP_THRESHOLD_`` fixed at 64 KiB so large buffers are returned to the system when
freed, otherwise a heap grown by an earlier run would hide the next run's peak.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from napari_gradcam import GradCAM, explain_volume
from napari_gradcam.core.architectures import ResNetLike


def _vm_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


class PeakMemory:
    """Peak memory (MiB) used inside a ``with`` block, above the level at its start."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.mib = float("nan")

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._start = torch.cuda.memory_allocated()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
            self._start = _vm_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            peak = _vm_kib("VmHWM") * 1024
        self.mib = max(0.0, (peak - self._start) / 2**20)


def timed(run: Callable[[], object], device: torch.device, repeats: int) -> tuple[float, float]:
    """Median seconds over ``repeats`` runs after one warm-up, and the peak memory (MiB)."""
    run()
    times, peaks = [], []
    for _ in range(repeats):
        with PeakMemory(device) as peak:
            start = time.perf_counter()
            run()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        peaks.append(peak.mib)
    return statistics.median(times), max(peaks)


def naive_gradcam(model: torch.nn.Module, layer: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    """The textbook implementation: hooks, full ``backward()``, parameter gradients included."""
    stored: dict[str, torch.Tensor] = {}

    def forward_hook(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        stored["activation"] = output
        output.register_hook(lambda grad: stored.__setitem__("gradient", grad))

    handle = layer.register_forward_hook(forward_hook)
    try:
        model.zero_grad()
        output = model(x)
        classes = output.argmax(1)
        output[torch.arange(len(x)), classes].sum().backward()
    finally:
        handle.remove()
    activation, gradient = stored["activation"].detach(), stored["gradient"]
    weights = gradient.mean(dim=tuple(range(2, gradient.ndim)), keepdim=True)
    cam = F.relu((weights * activation).sum(1, keepdim=True))
    mode = {3: "linear", 4: "bilinear", 5: "trilinear"}[x.ndim]
    return F.interpolate(cam, size=x.shape[2:], mode=mode, align_corners=False).numpy(force=True)


def captum_gradcam(model: torch.nn.Module, layer: torch.nn.Module, x: torch.Tensor
                   ) -> np.ndarray | None:
    try:
        from captum.attr import LayerAttribution, LayerGradCam
    except ImportError:
        return None
    with torch.no_grad():
        classes = model(x).argmax(1)
    attribution = LayerGradCam(model, layer).attribute(x, target=classes, relu_attributions=True)
    return LayerAttribution.interpolate(attribution, tuple(x.shape[2:]),
                                        interpolate_mode={3: "linear", 4: "bilinear",
                                                          5: "trilinear"}[x.ndim]).numpy(force=True)


def forward_only(model: torch.nn.Module, x: torch.Tensor, batch: int) -> None:
    with torch.inference_mode():
        for start in range(0, len(x), batch):
            model(x[start:start + batch])


def bench_case(name: str, model: torch.nn.Module, x: torch.Tensor, layer_name: str,
               device: torch.device, repeats: int, batch: int) -> list[dict[str, object]]:
    layer = dict(model.named_modules())[layer_name]
    ours = GradCAM(model, layer_name)

    def in_batches(function: Callable[[torch.Tensor], object]) -> Callable[[], None]:
        def run() -> None:
            for start in range(0, len(x), batch):
                function(x[start:start + batch])
        return run

    rows = []
    base_time, base_mem = timed(lambda: forward_only(model, x, batch), device, repeats)
    rows.append(dict(case=name, method="forward (inference)", seconds=base_time, mib=base_mem))
    runs = {
        "napari-gradcam": in_batches(lambda b: ours(b)),
        "naive (hooks + backward)": in_batches(lambda b: naive_gradcam(model, layer, b)),
    }
    if captum_gradcam(model, layer, x[:1]) is not None:
        runs["captum LayerGradCam"] = in_batches(lambda b: captum_gradcam(model, layer, b))
    for method, run in runs.items():
        seconds, mib = timed(run, device, repeats)
        rows.append(dict(case=name, method=method, seconds=seconds, mib=mib))
    for row in rows:
        row["vs_forward"] = row["seconds"] / base_time  # type: ignore[operator]
    return rows


def bench_volume(model: torch.nn.Module, stack: np.ndarray, device: torch.device, repeats: int,
                 batch: int) -> list[dict[str, object]]:
    tensor = torch.from_numpy(stack[:, None]).to(device)
    explainer = GradCAM(model, "features.3")
    base, base_mem = timed(lambda: forward_only(model, tensor, batch), device, repeats)
    ours, ours_mem = timed(lambda: explain_volume(explainer, stack, batch_size=batch), device,
                           repeats)
    slices = len(stack)
    return [
        dict(case="volume, slice-wise", method="plain batched inference", seconds=base,
             mib=base_mem, vs_forward=1.0, throughput=slices / base),
        dict(case="volume, slice-wise", method="explain_volume(mode='slices')", seconds=ours,
             mib=ours_mem, vs_forward=ours / base, throughput=slices / ours),
    ]


def main() -> None:
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        os.execve(sys.executable, [sys.executable, *sys.argv],
                  {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--slices", type=int, default=64)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--volume", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)

    model2d = ResNetLike(2, 1, 3, widths=(16, 32, 64)).to(device).eval()
    stack = np.random.default_rng(0).random((args.slices, args.size, args.size), np.float32)
    x2d = torch.from_numpy(stack[:, None]).to(device)
    model3d = ResNetLike(3, 1, 3, widths=(8, 16, 32)).to(device).eval()
    x3d = torch.rand(1, 1, args.volume, args.volume, args.volume, device=device)

    rows = bench_case(f"2D: {args.slices}×{args.size}² ResNet-like", model2d, x2d, "features.3",
                      device, args.repeats, args.batch)
    rows += bench_case(f"3D: {args.volume}³ ResNet-like", model3d, x3d, "features.3", device,
                       args.repeats, 1)
    rows += bench_volume(model2d, stack, device, args.repeats, args.batch)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {name}, torch {torch.__version__}, threads {torch.get_num_threads()}\n")
    print("| case | method | time (s) | × forward | peak memory (MiB) |")
    print("|---|---|---:|---:|---:|")
    for row in rows:
        print(f"| {row['case']} | {row['method']} | {row['seconds']:.3f} | "
              f"{row['vs_forward']:.2f} | {row['mib']:.0f} |")


if __name__ == "__main__":
    main()
