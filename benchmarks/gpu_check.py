"""One prepared check of the GPU path: correctness on CUDA against the CPU, mixed precision,
the out-of-memory back-off, and peak device memory of a volume run.

    python benchmarks/gpu_check.py            # on a machine with a CUDA GPU
    python benchmarks/gpu_check.py --device cpu   # a smoke run of the script itself

Then ``python benchmarks/bench_gradcam.py --device cuda`` gives the timing table. Prints one
line per check and exits non-zero if any check fails, so it can run unattended on a lent GPU.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings

import numpy as np
import torch

from napari_gradcam import METHODS, GradCAM, explain_volume, make_explainer
from napari_gradcam.core.architectures import ResNetLike, UNet
from napari_gradcam.core.targets import SegmentationRegion


def _maps(method: str, model: torch.nn.Module, x: torch.Tensor, device: str, target: object,
          **options: object) -> np.ndarray:
    explainer = make_explainer(method, model.to(device), "features.3", device=device, **options)
    return np.asarray(explainer(x.to(device), target))


def check_methods_match_cpu(device: str, failures: list[str]) -> None:
    # TF32 convolutions would differ from the CPU by ~1e-3 per layer: compare in true fp32.
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    for dims, size in ((1, 256), (2, 96), (3, 32)):
        torch.manual_seed(dims)
        model = ResNetLike(dims, 1, 3).eval()
        x = torch.rand((4, 1) + (size,) * dims)
        for method in METHODS:
            reference = _maps(method, model, x, "cpu", 1)
            on_device = _maps(method, model, x, device, 1)
            model.to("cpu")
            scale = max(float(np.abs(reference).max()), 1e-12)
            error = float(np.abs(on_device - reference).max()) / scale
            ok = error < 1e-3
            verdict = "ok " if ok else "BAD"
            print(f"{verdict} {dims}D {method:16s} max rel. error vs CPU {error:.2e}")
            if not ok:
                failures.append(f"{dims}D {method}")


def check_segmentation_region(device: str, failures: list[str]) -> None:
    torch.manual_seed(0)
    unet = UNet(2, 1, 3).eval()
    x = torch.rand(2, 1, 64, 64)
    mask = np.zeros((64, 64), bool)
    mask[20:40, 10:30] = True
    target = SegmentationRegion(2, mask)
    reference = GradCAM(unet, "down2")(x, target)
    on_device = GradCAM(unet.to(device), "down2", device=device)(x.to(device), target)
    unet.to("cpu")
    error = float(np.abs(on_device - reference).max() / max(np.abs(reference).max(), 1e-12))
    print(f"{'ok ' if error < 1e-3 else 'BAD'} Seg-Grad-CAM on a U-Net: rel. error {error:.2e}")
    if error >= 1e-3:
        failures.append("segmentation")


def check_mixed_precision(device: str, failures: list[str]) -> None:
    torch.manual_seed(0)
    model = ResNetLike(2, 1, 3).eval()
    x = torch.rand(8, 1, 128, 128)
    reference = _maps("gradcam", model, x, device, 0)
    for amp in ("bf16", "fp16"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mixed = _maps("gradcam", model, x, device, 0, amp=amp)
        flat_a, flat_b = reference.reshape(len(x), -1), mixed.reshape(len(x), -1)
        correlation = min(float(np.corrcoef(a, b)[0, 1]) for a, b in zip(flat_a, flat_b,
                                                                            strict=True))
        ok = np.isfinite(mixed).all() and correlation > 0.98
        print(f"{'ok ' if ok else 'BAD'} autocast {amp}: worst per-map correlation with fp32 "
              f"{correlation:.4f}")
        if not ok:
            failures.append(f"amp {amp}")
    model.to("cpu")


def check_volume_memory(device: str, failures: list[str]) -> None:
    torch.manual_seed(0)
    model = ResNetLike(2, 1, 3).eval().to(device)
    explainer = GradCAM(model, "features.3", device=device)
    size = 512 if device.startswith("cuda") else 128
    for depth in (32, 256) if device.startswith("cuda") else (8, 16):
        volume = np.random.default_rng(0).random((depth, size, size), np.float32)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        result = explain_volume(explainer, volume, batch_size=16)
        seconds = time.perf_counter() - start
        peak = (torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda")
                else float("nan"))
        print(f"ok  volume {depth}×{size}² slice-wise: {seconds:.2f} s "
              f"({depth / seconds:.0f} slices/s), peak device memory {peak:.0f} MiB, "
              f"finite {bool(np.isfinite(result.maps).all())}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA GPU here; use --device cpu for a smoke run", file=sys.stderr)
        return 2
    if args.device.startswith("cuda"):
        print(f"device: {torch.cuda.get_device_name(args.device)}, torch {torch.__version__}")
    failures: list[str] = []
    check_methods_match_cpu(args.device, failures)
    check_segmentation_region(args.device, failures)
    if args.device.startswith("cuda"):
        check_mixed_precision(args.device, failures)
    check_volume_memory(args.device, failures)
    print("FAILED: " + ", ".join(failures) if failures else "all GPU-path checks passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
