"""Benchmark: what explaining a volume in windows costs on top of running the model on them.

    OMP_NUM_THREADS=1 python benchmarks/bench_windows.py                  # 96^3, 32^3 windows
    python benchmarks/bench_windows.py --size 128 --repeats 7 --device cuda
    python benchmarks/bench_windows.py --profile                          # + cProfile top 25

Two comparisons, each timed in one process with the two sides interleaved repeat by repeat
(the CPU may be shared with other work: ratios within one repeat are what is compared, and
the median, minimum and maximum of those ratios are reported, not one lucky run):

(a) **classifier**: :func:`napari_gradcam.explain_volume` in windows mode with Grad-CAM on a
    3D ResNet-like classifier (the shipped CT patch classifier's architecture, widths 4-8-16,
    layer ``features.1``, random weights: speed does not depend on what a network learned)
    versus *plain inference over exactly the engine's windows*: the same window grid (the
    engine's mirrored edge margin included, from :func:`~napari_gradcam.core.volume.
    window_grid`), cut from a mirrored copy of the volume and batched the way the engine
    batches them (per row of depth, ``--batch`` windows at a time; cut before the clock
    starts), run under ``torch.inference_mode``; nothing blended or written.
(b) **segmentation**: MONAI's ``sliding_window_inference`` (``mode="gaussian"``,
    ``sigma_scale=0.125``: σ = window/8 like ours, ``overlap`` the same fraction, and MONAI's
    interval ``int(window·(1−overlap))`` is our step) with a MONAI 3D ``UNet`` versus our
    Seg-Grad-CAM (Grad-CAM with a :class:`~napari_gradcam.core.targets.SegmentationRegion`
    target over the whole window, layer the bottleneck) over the same model, window, overlap
    and batch. MONAI has no edge margin, so it is given the volume already mirrored by our
    margin: both then run exactly the same windows (printed). MONAI blends the network's
    output (2 channels) and returns it; we blend one map and also backpropagate from the
    output through the decoder to the bottleneck, work MONAI does not do.

Reported per comparison: median seconds of each side, the ratio ours / reference (median,
min, max over the repeats), the same ratio for *one* full batch of windows (the explainer's
``explain`` against the model's forward pass on the same tensor: what the method itself costs,
mostly the backward pass from the output to the layer, a floor no windows loop can go
below), what the windows loop itself adds (``explain_volume`` against the explainer called
on the engine's batches, cut beforehand: reading and mirroring slabs, cutting windows,
blending and writing), and the process's peak resident memory (``VmHWM``) after each part.
The first call of each side is a warm-up and is not timed. ``--profile`` adds cProfile's top
functions for one run of ours. ``--clock cpu`` times with the process's CPU time instead of
the wall clock: on a CPU shared with other work (and ``OMP_NUM_THREADS=1``) it does not
count the time other processes held the core, so the ratios are much steadier.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))

import torch  # noqa: E402

from napari_gradcam import GradCAM, explain_volume  # noqa: E402
from napari_gradcam.core.architectures import ResNetLike  # noqa: E402
from napari_gradcam.core.targets import SegmentationRegion  # noqa: E402
from napari_gradcam.core.volume import edge_pads, window_grid  # noqa: E402


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (``VmHWM``), in MiB."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def engine_batches(volume: np.ndarray, window: tuple[int, int, int], overlap: float,
                   batch: int) -> list[np.ndarray]:
    """The engine's windows, cut from the mirrored volume, in the engine's batches.

    Corners come from :func:`window_grid` (volume coordinates, negative in the margin); the
    engine batches the windows of one row of depth at a time, so a row's last batch may be
    short: the reference does the same, so both sides run the same batch shapes.
    """
    pads = edge_pads(volume.shape, window)
    mirrored = np.pad(volume, pads, mode="reflect")
    grid = window_grid(volume.shape, window, overlap)
    (zp, _), (yp, _), (xp, _) = pads
    depth, height, width = window
    batches = []
    for z0 in grid[0]:
        corners = [(y0, x0) for y0 in grid[1] for x0 in grid[2]]
        for first in range(0, len(corners), batch):
            chunk = corners[first:first + batch]
            batches.append(np.stack([
                mirrored[z0 + zp:z0 + zp + depth, y0 + yp:y0 + yp + height,
                         x0 + xp:x0 + xp + width] for y0, x0 in chunk]))
    return batches


#: wall time, or this process's CPU time (``--clock cpu``): on a CPU shared with other work
#: and one torch thread, CPU time does not count the time other processes held the core
CLOCK: Callable[[], float] = time.perf_counter


def forward(model: torch.nn.Module, batch: torch.Tensor) -> object:
    with torch.inference_mode():
        return model(batch)


def time_pair(ours: Callable[[], object], reference: Callable[[], object], repeats: int
              ) -> tuple[list[float], list[float]]:
    """Warm both up once, then time them alternately ``repeats`` times."""
    ours()
    reference()
    ours_times, reference_times = [], []
    for _ in range(repeats):
        for run, times in ((reference, reference_times), (ours, ours_times)):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            start = CLOCK()
            run()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times.append(CLOCK() - start)
    return ours_times, reference_times


def ratio_text(ours: list[float], reference: list[float]) -> str:
    ratios = [o / r for o, r in zip(ours, reference, strict=True)]
    return f"{statistics.median(ratios):.2f}× ({min(ratios):.2f}–{max(ratios):.2f})"


def one_batch_floor(explain: Callable[[], object], forward: Callable[[], object],
                    repeats: int) -> str:
    """explain / forward on one full batch of windows: what the method itself costs (the
    backward pass to the layer), below which no windows loop can go."""
    ours, reference = time_pair(explain, forward, max(repeats, 5))
    return ratio_text(ours, reference)


def loop_overhead(ours: Callable[[], object], explain: Callable[[], object],
                  repeats: int) -> str:
    """explain_volume / the explainer called on the engine's batches (cut beforehand): what
    the windows loop itself adds (reading and mirroring slabs, cutting, blending, writing)."""
    ours_times, explain_times = time_pair(ours, explain, repeats)
    return ratio_text(ours_times, explain_times)


def summary(name: str, reference_name: str, windows: int, ours: list[float],
            reference: list[float], floor: str, loop: str, rss: float) -> str:
    return (f"| {name} | {windows} | {statistics.median(reference):.2f} ({reference_name}) | "
            f"{statistics.median(ours):.2f} | **{ratio_text(ours, reference)}** | {floor} | "
            f"{loop} | {rss:.0f} |")


def classifier_case(volume: np.ndarray, window: tuple[int, int, int], overlap: float,
                    batch: int, device: torch.device, repeats: int, layer: str
                    ) -> tuple[str, Callable[[], object]]:
    torch.manual_seed(0)
    model = ResNetLike(3, 1, 3, widths=(4, 8, 16)).eval().to(device)
    cam = GradCAM(model, layer, device=device)
    batches = engine_batches(volume, window, overlap, batch)
    windows = sum(len(b) for b in batches)

    def reference() -> None:
        with torch.inference_mode():
            for windows_batch in batches:
                model(torch.from_numpy(windows_batch).unsqueeze(1).to(device))

    def ours() -> object:
        return explain_volume(cam, volume, mode="windows", window=window, overlap=overlap,
                              batch_size=batch, target=1)

    ours_times, reference_times = time_pair(ours, reference, repeats)
    one = torch.from_numpy(batches[0]).unsqueeze(1).to(device)
    floor = one_batch_floor(lambda: cam.explain(one, 1), lambda: forward(model, one), repeats)
    tensors = [torch.from_numpy(b).unsqueeze(1).to(device) for b in batches]
    loop = loop_overhead(ours, lambda: [cam.explain(t, 1) for t in tensors], repeats)
    row = summary(f"(a) Grad-CAM `{layer}`, 3D ResNet-like classifier",
                  "inference, same windows", windows, ours_times, reference_times, floor, loop,
                  peak_rss_mib())
    return row, ours


def segmentation_case(volume: np.ndarray, window: tuple[int, int, int], overlap: float,
                      batch: int, device: torch.device, repeats: int
                      ) -> tuple[str, Callable[[], object]]:
    from monai.inferers import sliding_window_inference
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    model = UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(8, 16, 32),
                 strides=(2, 2), num_res_units=1).eval().to(device)
    cam = GradCAM(model, "model.1.submodule.1.submodule", device=device)
    target = SegmentationRegion(1)
    pads = edge_pads(volume.shape, window)
    mirrored = torch.from_numpy(np.pad(volume, pads, mode="reflect"))[None, None].to(device)
    windows = int(np.prod([len(axis) for axis in window_grid(volume.shape, window, overlap)]))

    def reference() -> object:
        with torch.inference_mode():
            return sliding_window_inference(mirrored, window, batch, model, overlap=overlap,
                                            mode="gaussian", sigma_scale=0.125)

    def ours() -> object:
        return explain_volume(cam, volume, mode="windows", window=window, overlap=overlap,
                              batch_size=batch, target=target)

    ours_times, reference_times = time_pair(ours, reference, repeats)
    one = mirrored[:, :, :window[0], :window[1], :window[2]].expand(batch, -1, -1, -1, -1)
    one = one.contiguous()
    floor = one_batch_floor(lambda: cam.explain(one, target), lambda: forward(model, one),
                            repeats)
    tensors = [torch.from_numpy(b).unsqueeze(1).to(device)
               for b in engine_batches(volume, window, overlap, batch)]
    loop = loop_overhead(ours, lambda: [cam.explain(t, target) for t in tensors], repeats)
    row = summary("(b) Seg-Grad-CAM `model.1.submodule.1.submodule` (bottleneck), MONAI 3D "
                  "UNet", "MONAI sliding_window_inference", windows, ours_times,
                  reference_times, floor, loop, peak_rss_mib())
    return row, ours


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=96, help="volume edge (voxels)")
    parser.add_argument("--window", type=int, default=32, help="window edge (voxels)")
    parser.add_argument("--overlap", type=float, default=0.25)
    parser.add_argument("--batch", type=int, default=8, help="windows per batch")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, mps or auto")
    parser.add_argument("--layer", default="features.1",
                        help="the classifier's layer (features.1: the CT card's layer)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall time, or the process's CPU time (steadier on a shared "
                             "machine with OMP_NUM_THREADS=1; not for GPUs)")
    parser.add_argument("--only", choices=("classifier", "segmentation"), default=None)
    parser.add_argument("--profile", action="store_true",
                        help="after timing, cProfile one run of ours and print the top 25")
    args = parser.parse_args()

    from napari_gradcam.core.device import resolve_device

    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    device = resolve_device(args.device)
    volume = np.random.default_rng(0).random((args.size,) * 3).astype(np.float32)
    window = (args.window,) * 3
    print(f"volume {args.size}³ float32, window {args.window}³, overlap {args.overlap}, "
          f"batch {args.batch}, device {device}, torch threads {torch.get_num_threads()}, "
          f"{args.clock} clock, "
          f"{args.repeats} repeats (median; ratio min–max over repeats)\n")
    print("| case | windows | reference s | ours s | ours / reference | one batch: explain / "
          "forward | windows loop: ours / explain of the same batches | peak RSS MiB |")
    print("|---|---|---|---|---|---|---|---|")
    runs = []
    cases = {"classifier": classifier_case, "segmentation": segmentation_case}
    for name, case in cases.items():
        if args.only not in (None, name):
            continue
        extra = (args.layer,) if name == "classifier" else ()
        row, ours = case(volume, window, args.overlap, args.batch, device, args.repeats, *extra)
        print(row, flush=True)
        runs.append((name, ours))
    if args.profile:
        for name, ours in runs:
            profiler = cProfile.Profile()
            profiler.runcall(ours)
            text = io.StringIO()
            pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(25)
            print(f"\n### profile: {name}\n```\n{text.getvalue()}```")


if __name__ == "__main__":
    main()
