"""One prepared check of the GPU path: correctness on CUDA against the CPU, mixed precision,
results copied off the GPU, the windows loop's sums on the GPU, and peak device memory of a
volume run.

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


def _amp_cases() -> list[tuple[str, torch.nn.Module, str, torch.Tensor, object]]:
    """Trained models on the data they were made for: a random network's Grad-CAM is often
    zero everywhere (ReLU of tiny numbers), and a correlation with a zero map means nothing."""
    from napari_gradcam.core.models import load_model
    from napari_gradcam.samples.ct_volume import make_ct_volume
    from napari_gradcam.samples.micrographs import make_micrograph

    micro = load_model("micrograph-classifier")
    images = np.stack([make_micrograph((256, 256), seed=seed).image for seed in range(4)])
    ct = load_model("ct-slice-unet")
    scan = make_ct_volume((16, 192, 192), seed=1).volume[4:12]
    return [
        ("micrograph-classifier, predicted class", micro.model, micro.card.target_layer,
         micro.preprocess(images), None),
        ("ct-slice-unet, Seg-Grad-CAM of the crack class", ct.model, ct.card.target_layer,
         ct.preprocess(scan), SegmentationRegion(2)),
    ]


def check_mixed_precision(device: str, failures: list[str]) -> None:
    for title, model, layer, x, target in _amp_cases():
        model.eval()
        reference = np.asarray(make_explainer("gradcam", model.to(device), layer,
                                              device=device)(x.to(device), target))
        flat_reference = reference.reshape(len(x), -1)
        live = flat_reference.std(1) > 0
        if not live.any():
            print(f"BAD autocast: {title}: the float32 maps are constant; nothing to compare")
            failures.append(f"amp {title}")
            continue
        for amp in ("bf16", "fp16"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                mixed = np.asarray(make_explainer("gradcam", model, layer, device=device,
                                                  amp=amp)(x.to(device), target))
            flat_mixed = mixed.reshape(len(x), -1)
            correlation = min(float(np.corrcoef(a, b)[0, 1]) for a, b, ok in zip(
                flat_reference, flat_mixed, live, strict=True) if ok)
            scale = float(np.abs(reference).max())
            error = float(np.abs(mixed - reference).max()) / scale
            ok = bool(np.isfinite(mixed).all()) and correlation > 0.98
            print(f"{'ok ' if ok else 'BAD'} autocast {amp}, {title}: worst per-map correlation "
                  f"with float32 {correlation:.4f}, max error {error:.2e} of the map's maximum "
                  f"({int(live.sum())} of {len(x)} maps non-constant)")
            if not ok:
                failures.append(f"amp {amp} {title}")
        model.to("cpu")


def check_host_copies_and_window_sums(device: str, failures: list[str]) -> None:
    """Results staged through page-locked memory keep their values while the caching host
    allocator reuses its blocks, and the windows loop's blending sums on the GPU give the CPU's
    maps, for one target and for all classes at once."""
    from napari_gradcam.core.device import to_numpy
    from napari_gradcam.core.run.tiles import windows_loop
    from napari_gradcam.core.targets import AllClasses
    from napari_gradcam.core.volume import run_job

    tensor = torch.randn(4, 64, 64, device=device)
    expected = tensor.cpu().numpy().copy()
    kept = to_numpy(tensor)
    del tensor
    for _ in range(50):
        to_numpy(torch.randn(4, 64, 64, device=device))
    pinned = torch.from_numpy(kept).is_pinned() if device.startswith("cuda") else "n/a"
    ok = np.array_equal(kept, expected)
    print(f"{'ok ' if ok else 'BAD'} results from the device keep their values (pinned: {pinned})")
    if not ok:
        failures.append("to_numpy")
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv3d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv3d(8, 8, 3, padding=1),
        torch.nn.ReLU(), torch.nn.AdaptiveAvgPool3d(1), torch.nn.Flatten(),
        torch.nn.Linear(8, 3)).eval()
    volume = np.random.default_rng(0).random((40, 48, 48)).astype(np.float32)

    def blend(on: str, target: object, classes: int) -> list[np.ndarray]:
        explainer = GradCAM(model.to(on), "2", device=on)
        outs = [np.zeros(volume.shape, np.float32) for _ in range(classes)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run_job(windows_loop(explainer, volume, outs, window=(16, 16, 16), overlap=0.5,
                                 batch_size=8, target=target,
                                 preprocess=lambda x: torch.from_numpy(x[:, None])))
        return outs

    for target, classes in ((1, 1), (AllClasses(), 3)):
        reference, on_device = blend("cpu", target, classes), blend(device, target, classes)
        error = max(float(np.abs(a - b).max()) / max(float(np.abs(a).max()), 1e-12)
                    for a, b in zip(reference, on_device, strict=True))
        ok = error < 1e-3
        print(f"{'ok ' if ok else 'BAD'} windows, target {target!r}: blended on the device vs "
              f"the CPU, max rel. error {error:.2e}")
        if not ok:
            failures.append(f"windows {target!r}")
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
    parser.add_argument("--amp-on-cpu", action="store_true",
                        help="run the mixed-precision check on the CPU too (a smoke run: there "
                             "amp warns and computes in float32)")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA GPU here; use --device cpu for a smoke run", file=sys.stderr)
        return 2
    if args.device.startswith("cuda"):
        print(f"device: {torch.cuda.get_device_name(args.device)}, torch {torch.__version__}")
    failures: list[str] = []
    check_methods_match_cpu(args.device, failures)
    check_segmentation_region(args.device, failures)
    if args.device.startswith("cuda") or args.amp_on_cpu:
        check_mixed_precision(args.device, failures)
    check_host_copies_and_window_sums(args.device, failures)
    check_volume_memory(args.device, failures)
    print("FAILED: " + ", ".join(failures) if failures else "all GPU-path checks passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
