"""Where one batch of a window explanation spends its time, as torch's profiler sees it.

    python benchmarks/profile_explain.py --device cuda      # on a GPU
    python benchmarks/profile_explain.py --window 16        # a smoke run on the CPU

The windows benchmark (``bench_windows.py``) gives ratios; this says what is behind them: one
batch of Seg-Grad-CAM over the MONAI 3D U-Net and one of Grad-CAM over the 3D ResNet-like
classifier, each after a warm-up, profiled with ``torch.profiler`` (CPU and, on a GPU, CUDA
activity). Prints the wall time of the explanation against the forward pass alone and the
operators that took longest (device time on a GPU, CPU time otherwise), so a change to the
engine can be aimed at what costs.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from napari_gradcam import GradCAM
from napari_gradcam.core.architectures import ResNetLike
from napari_gradcam.core.targets import SegmentationRegion


def _timed(run, device: torch.device, repeats: int = 10) -> float:
    run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def profile_case(title: str, model: torch.nn.Module, layer: str, target: object,
                 x: torch.Tensor, device: torch.device, rows: int) -> None:
    model = model.eval().to(device)
    cam = GradCAM(model, layer, device=device)

    def forward() -> None:
        with torch.inference_mode():
            model(x)

    def explain() -> None:
        cam.explain(x, target)

    seconds_forward = _timed(forward, device)
    seconds_explain = _timed(explain, device)
    print(f"\n## {title}: batch {tuple(x.shape)} on {device}: forward {seconds_forward * 1e3:.2f} "
          f"ms, explain {seconds_explain * 1e3:.2f} ms ({seconds_explain / seconds_forward:.2f}×)")
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        for _ in range(3):
            explain()
        if device.type == "cuda":
            torch.cuda.synchronize()
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=48))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rows", type=int, default=20)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    x = torch.rand(args.batch, 1, *(args.window,) * 3, device=device)
    try:
        from monai.networks.nets import UNet
    except ImportError:
        print("MONAI is not installed: the segmentation case is skipped")
    else:
        unet = UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(8, 16, 32),
                    strides=(2, 2), num_res_units=1)
        profile_case("Seg-Grad-CAM at the bottleneck, MONAI 3D UNet", unet,
                     "model.1.submodule.1.submodule", SegmentationRegion(1), x, device,
                     args.rows)
    classifier = ResNetLike(3, 1, 3, widths=(4, 8, 16))
    profile_case("Grad-CAM features.1, 3D ResNet-like classifier", classifier, "features.1", 1,
                 x, device, args.rows)


if __name__ == "__main__":
    main()
