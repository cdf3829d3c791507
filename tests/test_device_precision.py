"""Where the maps are computed (``device``) and in which precision (``amp``).

What :mod:`napari_gradcam.core.device` promises, checked against the machine the tests run on
(no faked GPUs): ``"auto"`` takes the best device this machine has (CUDA, then MPS, then the
CPU), a device that is not there is refused with the list of those that are, and mixed
precision is a GPU feature: on the CPU ``amp`` warns that it does not apply and the maps are
exactly the float32 maps. On a machine with CUDA the bf16 maps are compared with float32
within the precision of bfloat16.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from napari_gradcam import GradCAM, explain_volume
from napari_gradcam.core.architectures import ResNetLike
from napari_gradcam.core.device import autocast_context, available_devices, resolve_device

HAS_CUDA = torch.cuda.is_available()
HAS_MPS = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


@pytest.fixture
def model3d() -> torch.nn.Module:
    torch.manual_seed(0)
    return ResNetLike(3, 1, 3, widths=(4, 8, 8)).eval()


@pytest.fixture
def windows() -> np.ndarray:
    return np.random.default_rng(0).random((2, 1, 8, 12, 12)).astype(np.float32)


# --- device ---------------------------------------------------------------------------------


def test_available_devices_list_what_torch_reports_best_first_and_end_with_the_cpu():
    devices = available_devices()
    assert devices[-1] == "cpu" and devices.count("cpu") == 1
    cuda = [d for d in devices if d.startswith("cuda")]
    assert len(cuda) == (torch.cuda.device_count() if HAS_CUDA else 0)
    assert ("mps" in devices) == HAS_MPS
    # best first: every CUDA device before MPS, MPS before the CPU
    order = {"cuda": 0, "mps": 1, "cpu": 2}
    ranks = [order[d.split(":")[0]] for d in devices]
    assert ranks == sorted(ranks)


def test_auto_picks_the_best_available_device_and_here_that_is_known():
    chosen = resolve_device("auto")
    assert chosen == torch.device(available_devices()[0])
    if HAS_CUDA:
        assert chosen.type == "cuda"
    elif HAS_MPS:
        assert chosen.type == "mps"
    else:  # this CPU-only machine (and the CI): the CPU
        assert chosen == torch.device("cpu")


def test_the_order_of_preference_when_a_machine_has_more_than_this_one(monkeypatch):
    """This machine may have no GPU, so which devices exist is the one thing set here (torch's
    own availability queries answer "two CUDA GPUs and MPS"); nothing runs on them, the test
    checks the order ``"auto"`` chooses from: CUDA first, then MPS, the CPU last."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert available_devices() == ["cuda", "cuda:1", "mps", "cpu"]
    assert resolve_device("auto") == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert available_devices() == ["mps", "cpu"]
    assert resolve_device("auto") == torch.device("mps")


def test_an_explainer_with_device_auto_runs_there_and_gives_the_maps_of_the_cpu(model3d,
                                                                               windows):
    reference = GradCAM(model3d, "features.2")(windows, 1)  # the model's own device: the CPU
    cam = GradCAM(model3d, "features.2", device="auto")
    assert cam.device == resolve_device("auto")
    assert next(model3d.parameters()).device.type == cam.device.type  # moved there once
    maps = cam(windows, 1)
    assert maps.shape == (2, 8, 12, 12) and maps.max() > 0
    if cam.device.type == "cpu":
        np.testing.assert_array_equal(maps, reference)
    else:  # cuDNN convolutions default to TF32 (10-bit mantissa): agreement to ~1e-3
        np.testing.assert_allclose(maps, reference, rtol=2e-2, atol=2e-3 * reference.max())


def test_none_means_wherever_the_model_already_is(model3d):
    assert resolve_device(None, model3d) == torch.device("cpu")
    assert resolve_device(None) == torch.device("cpu")  # no model: the CPU
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(HAS_CUDA, reason="this machine has CUDA")
def test_asking_for_cuda_without_a_gpu_is_refused_naming_the_devices_that_exist(model3d):
    with pytest.raises(ValueError, match=r"no usable CUDA GPU; available: .*cpu"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match="no usable CUDA GPU"):
        GradCAM(model3d, "features.2", device="cuda:0")
    assert next(model3d.parameters()).device.type == "cpu"  # the model was not touched


@pytest.mark.skipif(HAS_MPS, reason="this machine has Apple MPS")
def test_asking_for_mps_where_there_is_none_is_refused():
    with pytest.raises(ValueError, match="MPS is not available"):
        resolve_device("mps")


# --- mixed precision --------------------------------------------------------------------------


@pytest.mark.parametrize("amp", ["bf16", "bfloat16", "fp16", "float16"])
def test_amp_on_the_cpu_warns_that_it_does_not_apply_and_changes_nothing(model3d, windows,
                                                                         amp):
    cam = GradCAM(model3d, "features.2", device="cpu")
    reference = cam.explain(windows, 1)
    mixed = GradCAM(model3d, "features.2", device="cpu", amp=amp)
    with pytest.warns(UserWarning, match=rf"mixed precision \({amp}\) is only used on GPUs; "
                                         r"computing in float32 on cpu"):
        result = mixed.explain(windows, 1)
    # the same float32 computation, so the same numbers, bit for bit
    np.testing.assert_array_equal(result.maps, reference.maps)
    np.testing.assert_array_equal(result.outputs, reference.outputs)
    assert result.maps.dtype == np.float32 and reference.maps.max() > 0


def test_amp_on_the_cpu_over_a_volume_gives_the_float32_volume(model3d):
    volume = np.random.default_rng(1).random((10, 14, 14)).astype(np.float32)
    options = {"mode": "windows", "window": (8, 12, 12), "overlap": 0.25, "target": 1}
    reference = explain_volume(GradCAM(model3d, "features.2", device="cpu"), volume, **options)
    with pytest.warns(UserWarning, match="only used on GPUs"):
        mixed = explain_volume(GradCAM(model3d, "features.2", device="cpu", amp="bf16"), volume,
                               **options)
    np.testing.assert_array_equal(mixed.maps, reference.maps)
    assert reference.maps.max() > 0


def test_no_amp_means_no_autocast_and_no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with autocast_context(torch.device("cpu"), None):
            assert not torch.is_autocast_enabled("cpu")


def test_an_unknown_precision_is_refused_listing_the_choices(model3d, windows):
    with pytest.raises(ValueError, match=r"amp must be one of \['bf16', 'bfloat16', 'float16', "
                                         r"'fp16'\] or None, got 'int8'"):
        autocast_context(torch.device("cpu"), "int8")
    with pytest.raises(ValueError, match="amp must be one of"):
        GradCAM(model3d, "features.2", amp="int8").explain(windows, 1)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_bf16_on_cuda_autocasts_the_forward_and_stays_close_to_float32(model3d, windows):
    """bfloat16 keeps 8 bits of mantissa (relative rounding ≈ 4e-3 per operation), so the maps
    agree with float32 to a few percent of their maximum, not bit for bit; the same class is
    explained and the maps come back as float32."""
    cam = GradCAM(model3d, "features.2", device="cuda")
    reference = cam.explain(windows, 1)
    seen: list[torch.dtype] = []
    first_conv = model3d.features[0][0]  # a convolution: autocast runs it in bf16 on CUDA
    handle = first_conv.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no "does not apply" warning on a GPU
            mixed = GradCAM(model3d, "features.2", device="cuda", amp="bf16").explain(windows, 1)
    finally:
        handle.remove()
    assert seen == [torch.bfloat16]  # the forward really ran in bf16
    assert mixed.maps.dtype == np.float32
    np.testing.assert_array_equal(mixed.target_indices, reference.target_indices)
    scale = float(reference.maps.max())
    assert scale > 0
    np.testing.assert_allclose(mixed.maps, reference.maps, atol=0.05 * scale)


def test_results_come_to_the_host_as_arrays_equal_to_the_tensor():
    """to_numpy: what every explanation's maps, outputs and scores pass through. On the CPU a
    view of the tensor; on a CUDA GPU a page-locked copy (the test below, and
    benchmarks/gpu_check.py on a lent GPU)."""
    from napari_gradcam.core.device import to_numpy

    tensor = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
    array = to_numpy(tensor)
    assert isinstance(array, np.ndarray)
    assert array.dtype == np.float32
    np.testing.assert_array_equal(array, tensor.numpy())
    needs_grad = torch.ones(3, requires_grad=True) * 2  # a result still in the graph
    np.testing.assert_array_equal(to_numpy(needs_grad), [2.0, 2.0, 2.0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_results_from_a_gpu_are_staged_through_page_locked_memory_and_equal():
    from napari_gradcam.core.device import to_numpy

    tensor = torch.randn(4, 64, 64, device="cuda")
    array = to_numpy(tensor)
    np.testing.assert_array_equal(array, tensor.cpu().numpy())
    assert torch.from_numpy(array).is_pinned()
