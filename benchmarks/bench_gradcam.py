"""How much does a Grad-CAM cost? Forward pass vs ours vs the usual ways, time and peak memory.

Run: ``.venv/bin/python benchmarks/bench_gradcam.py`` (add ``--device cuda`` on a GPU). Prints
one markdown table; the README quotes it.

Compared, on the same model, input and target layer:
* ``forward``   — plain batched inference (``torch.inference_mode``), the floor;
* ``ours``      — :class:`napari_gradcam.GradCAM` (graph cut at the layer, ``autograd.grad``);
* ``naive``     — hooks + ``loss.backward()`` through the whole network with parameter
  gradients, as pytorch-grad-cam and MONAI's CAMs do;
* ``captum``    — Captum's ``LayerGradCam`` + ``LayerAttribution.interpolate`` (if installed);
* ``volume``    — :func:`explain_volume` slice-wise over the stack vs plain batched inference;
* ``methods``   — every method of the registry (``napari_gradcam.METHODS``) on one smaller batch,
  each timed against a forward pass of that batch in the same run: gradient CAMs cost about
  one forward pass, Score-CAM and Ablation-CAM one forward pass per channel of the layer.

A smoke run that takes seconds: ``--slices 2 --size 32 --volume 16 --methods-batch 2
--methods-size 32 --repeats 1``.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated``; on the CPU the process's peak
resident set (VmHWM) above what it held before, reset between runs through
``/proc/self/clear_refs`` (Linux), in a child process whose glibc ``MALLOC_MMAP_THRESHOLD_`` is
fixed at 64 KiB so large buffers go back to the system when freed (otherwise a heap grown by an
earlier run would hide the next run's peak). Timings come from the parent, with the normal
allocator, the methods taking turns so that drift affects all of them alike.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from napari_gradcam import METHODS, GradCAM, explain_volume, explainer
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


def median_seconds(runs: dict[str, Callable[[], object]], device: torch.device,
                   repeats: int) -> dict[str, float]:
    """Median wall time of each run; the runs take turns so drift hits them all alike."""
    times: dict[str, list[float]] = {key: [] for key in runs}
    for run in runs.values():
        run()  # warm-up
    for _ in range(repeats):
        for key, run in runs.items():
            start = time.perf_counter()
            run()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[key].append(time.perf_counter() - start)
    return {key: statistics.median(values) for key, values in times.items()}


def peak_mib(runs: dict[str, Callable[[], object]], device: torch.device) -> dict[str, float]:
    """Peak memory of each run (after a warm-up run), in MiB above the level before it."""
    peaks = {}
    for key, run in runs.items():
        run()
        with PeakMemory(device) as peak:
            run()
        peaks[key] = peak.mib
    return peaks


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


def make_runs(args: argparse.Namespace, device: torch.device
              ) -> dict[tuple[str, str], Callable[[], object]]:
    """Every (case, method) of the table as a no-argument callable."""
    torch.manual_seed(0)
    model2d = ResNetLike(2, 1, 3, widths=(16, 32, 64)).to(device).eval()
    stack = np.random.default_rng(0).random((args.slices, args.size, args.size), np.float32)
    x2d = torch.from_numpy(stack[:, None]).to(device)
    model3d = ResNetLike(3, 1, 3, widths=(8, 16, 32)).to(device).eval()
    x3d = torch.rand(1, 1, args.volume, args.volume, args.volume, device=device)
    runs: dict[tuple[str, str], Callable[[], object]] = {}
    cases = [(f"2D: {args.slices}×{args.size}² ResNet-like", model2d, x2d, args.batch),
             (f"3D: {args.volume}³ ResNet-like", model3d, x3d, 1)]
    for case, model, x, batch in cases:
        layer = dict(model.named_modules())["features.3"]
        ours = GradCAM(model, "features.3")

        def in_batches(function: Callable[[torch.Tensor], object], x: torch.Tensor = x,
                       batch: int = batch) -> Callable[[], None]:
            def run() -> None:
                for start in range(0, len(x), batch):
                    function(x[start:start + batch])
            return run

        runs[case, "forward (inference)"] = partial(forward_only, model, x, batch)
        runs[case, "napari-gradcam"] = in_batches(ours)
        runs[case, "naive (hooks + backward)"] = in_batches(partial(naive_gradcam, model, layer))
        if captum_gradcam(model, layer, x[:1]) is not None:
            runs[case, "captum LayerGradCam"] = in_batches(partial(captum_gradcam, model, layer))
    volume_case = f"volume: {args.slices}×{args.size}² stack, slice-wise"
    volume_cam = GradCAM(model2d, "features.3")
    runs[volume_case, "plain batched inference"] = partial(forward_only, model2d, x2d,
                                                           args.batch)
    runs[volume_case, "explain_volume(mode='slices')"] = partial(
        explain_volume, volume_cam, stack, batch_size=args.batch)
    runs.update(method_runs(args, model2d, x2d, device))
    return runs


def method_runs(args: argparse.Namespace, model: torch.nn.Module, x: torch.Tensor,
                device: torch.device) -> dict[tuple[str, str], Callable[[], object]]:
    """Every registered method on one batch, after a forward pass of the same batch."""
    batch = torch.nn.functional.interpolate(x[:args.methods_batch], size=(args.methods_size,) * 2,
                                            mode="bilinear", align_corners=False)
    channels = dict(model.named_modules())["features.3"].conv2.out_channels
    case = (f"methods: {len(batch)}×{args.methods_size}² ResNet-like, features.3 "
            f"({channels} channels)")
    runs: dict[tuple[str, str], Callable[[], object]] = {
        (case, "forward (inference)"): partial(forward_only, model, batch, len(batch))}
    for name in METHODS:
        built = explainer(name, model, "features.3")
        runs[case, name] = partial(built, batch, None)
    return runs


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--slices", type=int, default=64)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--volume", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--methods-batch", type=int, default=4,
                        help="images in the every-method case (Score-CAM and Ablation-CAM run "
                             "one forward pass per channel and image)")
    parser.add_argument("--methods-size", type=int, default=128)
    parser.add_argument("--memory-only", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args()


def cpu_peaks_in_child() -> dict[str, float]:
    """Peak memory on the CPU, measured in a child whose allocator returns freed buffers."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    child = subprocess.run([sys.executable, *sys.argv, "--memory-only"], env=env, check=True,
                           capture_output=True, text=True)
    return json.loads(child.stdout.strip().splitlines()[-1])


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    runs = make_runs(args, device)
    keyed = {f"{case} | {method}": run for (case, method), run in runs.items()}
    if args.memory_only:
        print(json.dumps(peak_mib(keyed, device)))
        return
    seconds = median_seconds(keyed, device, args.repeats)
    peaks = cpu_peaks_in_child() if device.type == "cpu" else peak_mib(keyed, device)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {name}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"median of {args.repeats}\n")
    print("| case | method | time (s) | × first row of the case | peak memory (MiB) |")
    print("|---|---|---:|---:|---:|")
    baseline: dict[str, float] = {}
    for (case, method), key in zip(runs, keyed, strict=True):
        baseline.setdefault(case, seconds[key])
        print(f"| {case} | {method} | {seconds[key]:.3f} | {seconds[key] / baseline[case]:.2f} | "
              f"{peaks[key]:.0f} |")


if __name__ == "__main__":
    main()
