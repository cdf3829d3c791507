"""The Qt-free jobs: what each mode explains, where the map goes, and how failures read.

Models are small built-in networks saved as real model cards + safetensors files in
``tmp_path`` and loaded with ``load_model``, exactly as users' models are. Every map is checked
against the engine called directly on the same slice, so the jobs' slicing, batching,
RGB handling and placement are what is under test.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import replace
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from scipy import ndimage
from torch import nn

from napari_gradcam.core.architectures import build_architecture
from napari_gradcam.core.domain import input_statistics
from napari_gradcam.core.methods import METHODS, GradCAM, heatmaps, make_explainer, method_info
from napari_gradcam.core.model_card import TASKS
from napari_gradcam.core.models import load_model
from napari_gradcam.core.targets import PredictedClass, RegressionTarget, SegmentationRegion
from napari_gradcam.core.uncertainty import explain_with_uncertainty
from napari_gradcam.core.volume import Cancelled, explain_volume
from napari_gradcam.jobs import (
    ExplainRequest,
    ImageSource,
    JobError,
    TargetChoice,
    explain,
    explain_job,
    plan_explanation,
    run_job,
)

CLASSES = ("clean", "precipitates", "crack")


def write_card(folder: Path, name: str, *, architecture: str = "resnet_like",
               spatial_dims: int = 2, in_channels: int = 1, task: str = "classification",
               widths: tuple[int, ...] = (4, 8, 8), preprocessing: str = "",
               input_size: str = "null", seed: int = 0) -> Path:
    """A real card + safetensors pair for a seeded built-in network."""
    torch.manual_seed(seed)
    model = build_architecture(architecture, spatial_dims=spatial_dims, in_channels=in_channels,
                               num_classes=3, widths=widths)
    save_file(model.state_dict(), folder / f"{name}.safetensors")
    card = folder / f"{name}.yaml"
    card.write_text(
        f"name: {name}\n"
        f"architecture: {architecture}\n"
        f"architecture_kwargs: {{spatial_dims: {spatial_dims}, in_channels: {in_channels}, "
        f"num_classes: 3, widths: {list(widths)}}}\n"
        f"weights: {name}.safetensors\n"
        f"spatial_dims: {spatial_dims}\n"
        f"in_channels: {in_channels}\n"
        f"task: {task}\n"
        f"class_names: [{', '.join(CLASSES)}]\n"
        f"input_size: {input_size}\n"
        + (f"preprocessing:\n{preprocessing}" if preprocessing else ""),
        encoding="utf-8",
    )
    return card


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    folder = tmp_path_factory.mktemp("cards")
    clip = "  - {op: percentile_clip, low: 1.0, high: 99.0}\n"
    return {
        "c2": load_model(write_card(folder, "c2", preprocessing=clip)),
        "c2rgb": load_model(write_card(folder, "c2rgb", in_channels=3)),
        "c1": load_model(write_card(folder, "c1", spatial_dims=1, widths=(4, 8))),
        "c3": load_model(write_card(folder, "c3", spatial_dims=3, widths=(2, 4),
                                    input_size="[8, 8, 8]")),
        "unet": load_model(write_card(folder, "unet", architecture="unet",
                                      task="segmentation", widths=(4, 8))),
        "two_channels": load_model(write_card(folder, "two_channels", in_channels=2)),
        "folder": folder,
    }


def direct(loaded, array: np.ndarray, target=None) -> tuple[np.ndarray, np.ndarray]:
    """The engine on one batch (B, *spatial): maps and softmax predictions."""
    cam = GradCAM(loaded.model, loaded.card.target_layer)
    result = cam.explain(loaded.preprocess(np.asarray(array, dtype=np.float32)), target)
    return result.maps, result.probabilities


def volume(shape=(5, 24, 20), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).random(shape).astype(np.float32)


def test_every_slice_equals_the_engine_per_slice(models) -> None:
    loaded, data = models["c2"], volume()
    result = explain(loaded, ImageSource("v", data),
                     ExplainRequest(mode="slices", axis=0, batch_size=2))
    maps, probabilities = direct(loaded, data)
    assert result.origin == (0, 0, 0) and result.sample_axis == 0
    np.testing.assert_allclose(result.maps["predicted"], maps, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(result.predictions, probabilities, rtol=1e-5, atol=1e-6)
    assert len(result.positions) == 5 and result.positions[3] == (3, 0, 0)
    assert result.target_indices.tolist() == probabilities.argmax(1).tolist()


def test_slices_along_the_last_axis(models) -> None:
    loaded, data = models["c2"], volume()
    result = explain(loaded, ImageSource("v", data), ExplainRequest(mode="slices", axis=2))
    maps, _ = direct(loaded, np.moveaxis(data, 2, 0))  # planes (z, y) at each x
    np.testing.assert_allclose(result.maps["predicted"], np.moveaxis(maps, 0, 2),
                               rtol=1e-4, atol=1e-7)
    assert result.predictions.shape == (20, 3)


def test_current_plane_of_a_4d_stack_is_placed_at_its_index(models) -> None:
    loaded = models["c2"]
    data = volume((2, 3, 16, 16))
    result = explain(loaded, ImageSource("t", data, current_index=(1, 2, 5, 5)))
    assert result.origin == (1, 2, 0, 0)
    assert result.maps["predicted"].shape == (1, 1, 16, 16)
    maps, _ = direct(loaded, data[1, 2][None])
    np.testing.assert_allclose(result.maps["predicted"][0, 0], maps[0], rtol=1e-4, atol=1e-7)
    # the viewer's displayed plane can be another pair of axes
    sideways = explain(loaded, ImageSource("t", data, current_index=(1, 2, 5, 5)),
                       ExplainRequest(plane=(1, 3)))
    assert sideways.origin == (1, 0, 5, 0) and sideways.maps["predicted"].shape == (1, 3, 1, 16)


def test_slices_of_a_4d_stack_keep_the_leading_axis_at_the_current_position(models) -> None:
    data = volume((3, 4, 16, 16))
    result = explain(models["c2"], ImageSource("t", data, current_index=(2, 0, 0, 0)),
                     ExplainRequest(mode="slices", axis=1))
    assert result.origin == (2, 0, 0, 0) and result.maps["predicted"].shape == (1, 4, 16, 16)
    maps, _ = direct(models["c2"], data[2])
    np.testing.assert_allclose(result.maps["predicted"][0], maps, rtol=1e-4, atol=1e-7)


class CountingArray:
    """An array-like that remembers the largest read, to prove slabs are read, not the lot."""

    def __init__(self, data: np.ndarray) -> None:
        self._data, self.shape, self.dtype, self.ndim = data, data.shape, data.dtype, data.ndim
        self.largest_read = 0

    def __getitem__(self, key: object) -> np.ndarray:
        part = self._data[key]
        self.largest_read = max(self.largest_read, part.size)
        return part


def test_lazy_arrays_are_read_batch_by_batch(models) -> None:
    data = volume((6, 24, 20))
    expected = explain(models["c2"], ImageSource("v", data),
                       ExplainRequest(mode="slices", axis=0, batch_size=2))
    lazy = explain(models["c2"], ImageSource("v", da.from_array(data, chunks=(1, 24, 20))),
                   ExplainRequest(mode="slices", axis=0, batch_size=2))
    np.testing.assert_allclose(lazy.maps["predicted"], expected.maps["predicted"], rtol=1e-6)
    counting = CountingArray(data)
    explain(models["c2"], ImageSource("v", counting),
            ExplainRequest(mode="slices", axis=0, batch_size=2))
    assert counting.largest_read == 2 * 24 * 20
    counting = CountingArray(data)
    explain(models["c2"], ImageSource("v", counting, current_index=(4, 0, 0)))
    assert counting.largest_read == 24 * 20


def test_rgb_becomes_grey_for_one_channel_models_and_channels_for_three(models) -> None:
    rgb = np.random.default_rng(1).integers(0, 255, (20, 24, 3)).astype(np.uint8)
    grey = rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    result = explain(models["c2"], ImageSource("rgb", rgb, rgb=True))
    maps, _ = direct(models["c2"], grey[None])
    np.testing.assert_allclose(result.maps["predicted"], maps[0], rtol=1e-4, atol=1e-7)
    result = explain(models["c2rgb"], ImageSource("rgb", rgb, rgb=True))
    maps, _ = direct(models["c2rgb"], np.moveaxis(rgb, -1, 0)[None])
    np.testing.assert_allclose(result.maps["predicted"], maps[0], rtol=1e-4, atol=1e-7)


def test_a_stack_of_spectra_is_explained_row_by_row(models) -> None:
    spectra = volume((6, 64))
    result = explain(models["c1"], ImageSource("xrd", spectra), ExplainRequest(batch_size=4))
    maps, probabilities = direct(models["c1"], spectra)
    assert result.maps["predicted"].shape == (6, 64) and result.sample_axis == 0
    np.testing.assert_allclose(result.maps["predicted"], maps, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(result.predictions, probabilities, rtol=1e-5, atol=1e-6)


def test_windows_use_the_volume_engine(models) -> None:
    loaded, data = models["c3"], volume((12, 16, 16))
    result = explain(loaded, ImageSource("ct", data),
                     ExplainRequest(mode="windows", window=(8, 8, 8), overlap=0.5, batch_size=4))
    cam = GradCAM(loaded.model, loaded.card.target_layer)
    expected = explain_volume(cam, data, mode="windows", window=(8, 8, 8), overlap=0.5,
                              batch_size=4, preprocess=loaded.preprocess)
    np.testing.assert_allclose(result.maps["predicted"], expected.maps, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(result.predictions, expected.predictions, rtol=1e-5)
    assert result.positions == expected.positions and result.window == (8, 8, 8)
    # the prediction under a point is that of the window whose centre is nearest
    nearest = result.prediction_at((11, 15, 15))
    np.testing.assert_allclose(nearest, expected.predictions[-1])
    # a plane is cut by the windows whose z range [start, start + 8) holds it (the grid may
    # start before the volume: windows overhang into a mirrored margin)
    starts = np.array([corner[0] for corner in expected.positions])
    for z in (0, 5, 11):
        cuts = (starts <= z) & (z < starts + 8)
        mean, count = result.windows_through_plane(z)
        assert count == int(cuts.sum()) > 0
        np.testing.assert_allclose(mean, expected.predictions[cuts].mean(0), rtol=1e-6)


def test_current_window_of_a_3d_model_is_centred_and_clipped(models) -> None:
    loaded, data = models["c3"], volume((12, 16, 16))
    result = explain(loaded, ImageSource("ct", data, current_index=(11, 8, 1)),
                     ExplainRequest(window=(8, 8, 8)))
    assert result.origin == (4, 4, 0) and result.maps["predicted"].shape == (8, 8, 8)
    maps, _ = direct(loaded, data[4:12, 4:12, 0:8][None])
    np.testing.assert_allclose(result.maps["predicted"], maps[0], rtol=1e-4, atol=1e-7)


def test_region_of_a_segmentation_model(models) -> None:
    loaded, data = models["unet"], volume((3, 16, 16))
    mask = np.zeros(data.shape, dtype=np.uint8)
    mask[1, 4:9, 4:9] = 2  # only slice 1 has region pixels
    result = explain(loaded, ImageSource("v", data),
                     ExplainRequest(mode="slices", axis=0,
                                    target=TargetChoice("region", class_index=2, mask=mask)))
    assert list(result.maps) == ["crack in region"]
    expected, _ = direct(loaded, data[1][None], SegmentationRegion(2, mask[1] > 0))
    np.testing.assert_allclose(result.maps["crack in region"][1], expected[0], rtol=1e-4,
                               atol=1e-7)
    assert not result.maps["crack in region"][[0, 2]].any()  # no region, nothing explained
    outputs = loaded.model(loaded.preprocess(data)).detach().numpy()
    assert (result.class_map == outputs.argmax(1)).all()


def test_click_on_a_segmentation_explains_the_predicted_object_there(models) -> None:
    loaded, image = models["unet"], volume((16, 16))
    point = (5, 7)
    result = explain(loaded, ImageSource("m", image),
                     ExplainRequest(target=TargetChoice("click", point=point)))
    predicted = loaded.model(loaded.preprocess(image[None])).detach().numpy().argmax(1)[0]
    clicked = int(predicted[point])
    components, _ = ndimage.label(predicted == clicked)
    expected, _ = direct(loaded, image[None],
                         SegmentationRegion(clicked, components == components[point]))
    np.testing.assert_allclose(result.maps["clicked"], expected[0], rtol=1e-4, atol=1e-7)
    assert result.target_indices.tolist() == [clicked]


def test_all_classes_gives_one_map_per_class(models) -> None:
    loaded, data = models["c2"], volume((2, 16, 16))
    result = explain(loaded, ImageSource("v", data),
                     ExplainRequest(mode="slices", axis=0, target=TargetChoice("all")))
    assert list(result.maps) == list(CLASSES)
    for index, name in enumerate(CLASSES):
        maps, _ = direct(loaded, data, index)
        np.testing.assert_allclose(result.maps[name], maps, rtol=1e-4, atol=1e-7)


def test_provenance_names_model_weights_and_choices(models) -> None:
    loaded = models["c2"]
    result = explain(loaded, ImageSource("img", volume((16, 16))),
                     ExplainRequest(method="layercam", target=TargetChoice("class", 2)))
    record = result.provenance
    weights = models["folder"] / "c2.safetensors"
    assert record["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert record["method"] == "layercam" and record["target"] == "crack"
    assert record["model"] == "c2" and record["layers"] == ["features.3"]
    assert record["preprocessing"][0]["op"] == "percentile_clip"
    assert record["source"] == "img" and record["options"]["source_shape"] == [16, 16]
    assert "torch" in record["versions"] and record["created"]
    assert list(result.maps) == ["crack"]
    low, high = result.contrast_limits["crack"]
    assert low == 0.0 < high <= float(result.maps["crack"].max())


def test_guided_backprop_gives_one_map_per_image(models) -> None:
    result = explain(models["c2rgb"], ImageSource("rgb", volume((16, 16, 3)), rgb=True),
                     ExplainRequest(method="guided-backprop"))
    assert result.maps["predicted"].shape == (16, 16)
    assert (result.maps["predicted"] >= 0).all() and result.maps["predicted"].max() > 0


def test_cancel_stops_between_batches(models) -> None:
    calls = []
    job = explain_job(models["c2"], ImageSource("v", volume((6, 16, 16))),
                      ExplainRequest(mode="slices", axis=0, batch_size=2))
    with pytest.raises(Cancelled, match="after 2 of 6"):
        run_job(job, progress=lambda done, total: calls.append((done, total)),
                should_stop=lambda: True)
    assert calls == [(2, 6)]


# ------------------------------------------------------------------------------------------
# Bad input: a clear message, raised before anything is computed where possible


@pytest.mark.parametrize(
    ("model", "data", "request_", "words"),
    [
        ("c3", volume((16, 16)), ExplainRequest(), "explains 3D data"),
        ("c2", volume((16, 16)), ExplainRequest(mode="slices"), "needs a stack"),
        ("c2", volume((4, 16, 16)), ExplainRequest(mode="windows"), "needs a 3D model"),
        ("c3", volume((12, 16, 16)), ExplainRequest(mode="slices"), "is 3D"),
        ("two_channels", volume((16, 16)), ExplainRequest(), "channel"),
        ("unet", volume((16, 16)), ExplainRequest(), "segments"),
        ("c2", volume((16, 16)), ExplainRequest(target=TargetChoice("region", 1)),
         "segmentation model"),
        ("c2", volume((16, 16)), ExplainRequest(target=TargetChoice("class", 7)),
         "out of range"),
        ("c2", volume((16, 16)), ExplainRequest(mode="sideways"), "mode must be"),
        ("c2", volume((16, 16)), ExplainRequest(batch_size=0), "batch size"),
        ("c2", volume((4, 16, 16)), ExplainRequest(mode="slices", axis=5), "axis 5"),
        ("c2", np.zeros((0, 16)), ExplainRequest(), "empty"),
    ],
)
def test_plans_that_cannot_work_are_refused(models, model, data, request_, words) -> None:
    with pytest.raises(ValueError, match=words):
        plan_explanation(models[model], ImageSource("layer", data), request_)


def test_unknown_target_kind_and_text_data_are_refused(models) -> None:
    with pytest.raises(ValueError, match="target kind"):
        TargetChoice("everything")
    with pytest.raises(TypeError, match="numbers"):
        plan_explanation(models["c2"], ImageSource("t", np.array([["a", "b"]] * 4)),
                         ExplainRequest())


def test_nan_in_a_slice_is_reported_with_its_position(models) -> None:
    data = volume((4, 16, 16))
    data[3, 2, 2] = np.nan
    with pytest.raises(JobError, match=r"NaN.*slices 2\.\.3 along axis 0"):
        explain(models["c2"], ImageSource("v", data),
                ExplainRequest(mode="slices", axis=0, batch_size=2))


class Picky(nn.Module):
    """A classifier that fails on inputs larger than 64 pixels, the way a real one can."""

    def __init__(self, error: type[BaseException]) -> None:
        super().__init__()
        self.error = error
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] > 64:
            raise self.error("boom: the input is too large")
        return self.head(torch.relu(self.conv(x)).mean((2, 3)))


def test_a_model_that_fails_is_reported(models) -> None:
    loaded = load_model(Picky(RuntimeError))
    with pytest.raises(JobError, match=r"the model failed.*boom"):
        explain(loaded, ImageSource("big", volume((80, 80))))


def test_out_of_memory_even_for_one_slice_is_reported(models) -> None:
    loaded = load_model(Picky(MemoryError))
    with (pytest.warns(RuntimeWarning, match="retrying with batch size"),
          pytest.raises(JobError, match="out of memory")):
        explain(loaded, ImageSource("big", volume((2, 80, 80))),
                ExplainRequest(mode="slices", axis=0, batch_size=2))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_chosen_device_gives_the_same_maps(models, tmp_path) -> None:
    loaded = load_model(write_card(tmp_path, "gpu", preprocessing=""))
    data = volume((4, 24, 20))
    on_cpu = explain(loaded, ImageSource("v", data),
                     ExplainRequest(mode="slices", axis=0, device="cpu"))
    on_gpu = explain(loaded, ImageSource("v", data),
                     ExplainRequest(mode="slices", axis=0, device="cuda"))
    np.testing.assert_allclose(on_gpu.maps["predicted"], on_cpu.maps["predicted"],
                               rtol=1e-3, atol=1e-6)
    assert on_gpu.provenance["options"]["device"] == "cuda"


# --------------------------------------------------------------------------------------------
# A data axis as the model's input channels


def test_channel_axis_feeds_every_slice_of_a_zcyx_stack(models) -> None:
    loaded, data = models["two_channels"], volume((3, 2, 16, 12), seed=4)
    result = explain(loaded, ImageSource("zcyx", data, current_index=(0, 1, 0, 0)),
                     ExplainRequest(mode="slices", axis=0, channel_axis=1, batch_size=2))
    # the map has length 1 along the channel axis, at the current channel
    assert result.maps["predicted"].shape == (3, 1, 16, 12) and result.origin == (0, 1, 0, 0)
    assert result.provenance["options"]["channel_axis"] == 1
    for z in range(3):
        cam = GradCAM(loaded.model, loaded.card.target_layer)
        expected = cam(torch.from_numpy(data[z][None]))
        np.testing.assert_allclose(result.maps["predicted"][z, 0], expected[0],
                                   rtol=1e-4, atol=1e-7)
    # the channel axis may come first too (C, Z, Y, X), 'current' mode: the current slice only
    czyx = np.ascontiguousarray(np.moveaxis(data, 1, 0))
    current = explain(loaded, ImageSource("czyx", czyx, current_index=(0, 2, 0, 0)),
                      ExplainRequest(channel_axis=0))
    assert current.origin == (0, 2, 0, 0) and current.maps["predicted"].shape == (1, 1, 16, 12)
    expected = GradCAM(loaded.model, loaded.card.target_layer)(torch.from_numpy(data[2][None]))
    np.testing.assert_allclose(current.maps["predicted"][0, 0], expected[0], rtol=1e-4, atol=1e-7)


def test_a_tzyx_series_without_channel_axis_is_explained_at_the_current_time(models) -> None:
    data = volume((3, 4, 16, 16), seed=5)
    result = explain(models["c2"], ImageSource("tzyx", data, current_index=(1, 0, 0, 0)),
                     ExplainRequest(mode="slices", axis=1))
    assert result.origin == (1, 0, 0, 0) and result.maps["predicted"].shape == (1, 4, 16, 16)
    maps, _ = direct(models["c2"], data[1])
    np.testing.assert_allclose(result.maps["predicted"][0], maps, rtol=1e-4, atol=1e-7)
    assert result.provenance["options"]["channel_axis"] is None


@pytest.mark.parametrize(("channel_axis", "request_options", "message"), [
    (2, {}, "has length 16 but the model 'two_channels' takes 2 channel"),
    (7, {}, "channel axis 7 does not exist"),
    (1, {"mode": "slices", "axis": 1}, "cannot also be the slice axis"),
    (1, {"plane": (1, 3)}, "cannot also be the displayed plane"),
])
def test_a_wrong_channel_axis_is_refused_before_any_work(models, channel_axis, request_options,
                                                         message) -> None:
    source = ImageSource("zcyx", volume((3, 2, 16, 12)))
    with pytest.raises(ValueError, match=message):
        plan_explanation(models["two_channels"], source,
                         ExplainRequest(channel_axis=channel_axis, **request_options))


def test_channel_axis_with_a_region_mask_reads_the_mask_at_the_current_channel(models) -> None:
    # a 1-channel segmentation model over (Z, C=1, Y, X) with a region mask of the same shape
    loaded, data = models["unet"], volume((2, 1, 16, 16), seed=6)
    mask = np.zeros(data.shape, dtype=np.int32)
    mask[:, 0, 4:10, 6:12] = 1
    result = explain(loaded, ImageSource("zcyx", data),
                     ExplainRequest(mode="slices", axis=0, channel_axis=1,
                                    target=TargetChoice("region", 1, mask=mask)))
    assert result.maps["precipitates in region"].shape == (2, 1, 16, 16)
    cam = GradCAM(loaded.model, loaded.card.target_layer)
    expected = cam(loaded.preprocess(data[:, 0]), SegmentationRegion(1, mask[:, 0] != 0))
    np.testing.assert_allclose(result.maps["precipitates in region"][:, 0], expected,
                               rtol=1e-4, atol=1e-7)


def test_3d_segmentation_model_in_windows_mode_explains_the_chosen_class():
    """The widget turns a class of a segmentation model into a region without a mask; the
    windows path must explain that class, not fall back to a (meaningless) predicted class."""
    torch.manual_seed(0)
    unet = build_architecture("unet", spatial_dims=3, in_channels=1, num_classes=3,
                              widths=(4, 8)).eval()
    loaded = load_model(unet)
    volume = np.random.default_rng(0).random((12, 16, 16)).astype(np.float32)
    request = ExplainRequest(mode="windows", window=(8, 8, 8), overlap=0.5, batch_size=4,
                             target=TargetChoice("region", class_index=2))
    result = explain(loaded, ImageSource("v", volume), request)
    (cam,) = result.maps.values()
    expected = explain_volume(GradCAM(unet, loaded.card.target_layer), volume, mode="windows",
                              window=(8, 8, 8), overlap=0.5, batch_size=4,
                              target=SegmentationRegion(2)).maps
    np.testing.assert_allclose(cam, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("method", ["guided-backprop", "guided-gradcam"])
def test_guided_methods_work_in_windows_mode(method):
    """Input-gradient methods give (N, C, *s) maps; volumes need one map per window."""
    torch.manual_seed(0)
    loaded = load_model(build_architecture("resnet_like", spatial_dims=3, in_channels=1,
                                           num_classes=3, widths=(4, 8, 8)).eval())
    volume = np.random.default_rng(1).random((10, 12, 12)).astype(np.float32)
    request = ExplainRequest(method=method, mode="windows", window=(8, 8, 8), overlap=0.25,
                             target=TargetChoice("class", class_index=1))
    (cam,) = explain(loaded, ImageSource("v", volume), request).maps.values()
    assert cam.shape == volume.shape
    assert np.isfinite(cam).all() and (cam >= 0).all() and cam.max() > 0


@pytest.mark.parametrize(("model", "request_"), [
    ("c2", ExplainRequest(mode="slices", axis=0, batch_size=2)),
    ("c3", ExplainRequest(mode="windows", window=(8, 8, 8))),
])
def test_float64_data_beyond_float32_is_reported_as_overflow_not_nan(models, model,
                                                                     request_) -> None:
    data = volume((4, 16, 16)).astype(np.float64)
    data[3, 2, 2] = 3e200
    with pytest.raises(JobError) as caught:
        explain(models[model], ImageSource("hot", data), request_)
    message = str(caught.value)
    assert "too large for the model's dtype float32" in message
    assert "largest |value| is 3e+200" in message and "NaN" not in message


def test_a_one_pixel_target_layer_warns_with_the_layer_to_use(models) -> None:
    with pytest.warns(UserWarning, match=r"'pool' outputs a feature map of one pixel.*"
                      r"instead: 'features\.3'"):
        result = explain(models["c2"], ImageSource("v", volume((2, 16, 16))),
                         ExplainRequest(mode="slices", axis=0, layer="pool"))
    flat = result.maps["predicted"].reshape(2, -1)
    assert np.ptp(flat, axis=1).max() == 0.0  # what the warning is about: constant maps


# --------------------------------------------------------------------------------------------
# Every registered method, method rules from the methods' declarations, regression targets,
# uncertainty maps and the out-of-domain report


@pytest.mark.parametrize("method", list(METHODS))
def test_every_registered_method_runs_on_a_2d_image_as_the_explainer_does(models,
                                                                           method) -> None:
    loaded, image = models["c2"], volume((24, 20), seed=3)
    result = explain(loaded, ImageSource("img", image), ExplainRequest(method=method))
    cam_map = result.maps["predicted"]
    assert cam_map.shape == (24, 20) and np.isfinite(cam_map).all()
    direct_result = make_explainer(method, loaded.model, loaded.card.target_layer).explain(
        loaded.preprocess(image[None]), PredictedClass())
    expected = heatmaps(direct_result.maps, method)[0]
    np.testing.assert_allclose(cam_map, expected, rtol=1e-5, atol=1e-7 * max(expected.max(), 1))
    np.testing.assert_allclose(result.predictions, direct_result.probabilities, rtol=1e-5)


@pytest.mark.parametrize("method", list(METHODS))
def test_which_targets_a_method_takes_follows_its_own_declarations(models, method) -> None:
    info = method_info(method)
    image = volume((24, 20))
    segment = ExplainRequest(method=method, target=TargetChoice("region", class_index=1))
    every_class = ExplainRequest(method=method, target=TargetChoice("all"))
    for loaded, request, refused in ((models["unet"], segment, info.classifier_only),
                                     (models["c2"], every_class, info.one_target_at_a_time)):
        if refused:
            with pytest.raises(ValueError, match=re.escape(info.title or info.name)):
                plan_explanation(loaded, ImageSource("img", image), request)
        else:
            plan_explanation(loaded, ImageSource("img", image), request)


def test_a_regression_target_explains_what_changes_one_predicted_value(models) -> None:
    loaded, data = models["c2"], volume((3, 24, 20), seed=5)
    choice = TargetChoice("regression", output_index=2, sign=-1, property_name="porosity")
    result = explain(loaded, ImageSource("v", data),
                     ExplainRequest(mode="slices", axis=0, target=choice))
    assert list(result.maps) == ["decreases porosity"] and result.regression
    cam = GradCAM(loaded.model, loaded.card.target_layer)
    expected = cam.explain(loaded.preprocess(data), RegressionTarget(2, sign=-1))
    np.testing.assert_allclose(result.maps["decreases porosity"], expected.maps, rtol=1e-5,
                               atol=1e-9)
    assert expected.maps.max() > 0
    # predictions are the predicted values themselves, not a softmax over them
    with torch.no_grad():
        outputs = loaded.model(loaded.preprocess(data)).numpy()
    np.testing.assert_allclose(result.predictions, outputs, rtol=1e-5, atol=1e-7)
    assert not np.allclose(result.predictions.sum(1), 1.0)
    increases = explain(loaded, ImageSource("v", data), ExplainRequest(
        mode="slices", axis=0, target=replace(choice, sign=1)))
    assert list(increases.maps) == ["increases porosity"]
    assert not np.allclose(increases.maps["increases porosity"], result.maps["decreases porosity"])


def test_a_regression_target_is_refused_for_segmentation_and_a_bad_sign_at_once(models) -> None:
    with pytest.raises(ValueError, match="regression target needs predicted values"):
        plan_explanation(models["unet"], ImageSource("img", volume((24, 20))),
                         ExplainRequest(target=TargetChoice("regression", output_index=0)))
    with pytest.raises(ValueError, match="sign must be"):
        TargetChoice("regression", output_index=0, sign=2)


@pytest.mark.skipif("regression" not in TASKS, reason="model cards do not take task: "
                    "regression yet")
def test_a_regression_card_has_no_predicted_class(models) -> None:
    card = replace(models["c2"].card, task="regression")
    loaded = replace(models["c2"], card=card)
    for kind in ("predicted", "all"):
        with pytest.raises(ValueError, match="predicts values"):
            plan_explanation(loaded, ImageSource("img", volume((24, 20))),
                             ExplainRequest(target=TargetChoice(kind)))


def test_uncertainty_of_every_slice_is_the_spread_under_flips_of_that_slice(models) -> None:
    loaded, data = models["c2"], volume((3, 24, 20), seed=6)
    result = explain(loaded, ImageSource("v", data),
                     ExplainRequest(mode="slices", axis=0, uncertainty=("flips",)))
    cam = GradCAM(loaded.model, loaded.card.target_layer)
    plain = cam.explain(loaded.preprocess(data), PredictedClass()).maps
    _mean, std, _info = explain_with_uncertainty(cam, loaded.preprocess(data), PredictedClass(),
                                                 sources=("flips",))
    # the map stays the plain one; the spread is beside it, same shape and origin
    np.testing.assert_allclose(result.maps["predicted"], plain, rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(result.uncertainty["predicted"], std, rtol=1e-4, atol=1e-9)
    assert std.max() > 0
    info = result.uncertainty_info
    assert info["sources"] == ["flips"] and "mirrored" in info["meaning"]["flips"]
    assert result.provenance["options"]["uncertainty"] == info


def test_dropout_uncertainty_says_when_the_model_has_no_dropout(models) -> None:
    result = explain(models["c2"], ImageSource("img", volume((24, 20))),
                     ExplainRequest(uncertainty=("dropout",), n_dropout=2))
    assert result.uncertainty_info["applicable"]["dropout"] == {
        "applicable": False, "reason": "the model has no dropout layers"}


def test_window_disagreement_is_the_volume_engines(models) -> None:
    loaded, data = models["c3"], volume((12, 16, 16), seed=7)
    result = explain(loaded, ImageSource("ct", data), ExplainRequest(
        mode="windows", window=(8, 8, 8), overlap=0.5, batch_size=4, uncertainty=("windows",)))
    cam = GradCAM(loaded.model, loaded.card.target_layer)
    spread = np.zeros(data.shape, np.float32)
    explain_volume(cam, data, mode="windows", window=(8, 8, 8), overlap=0.5, batch_size=4,
                   preprocess=loaded.preprocess, uncertainty_out=spread)
    np.testing.assert_allclose(result.uncertainty["predicted"], spread, rtol=1e-5, atol=1e-9)
    assert spread.max() > 0
    assert "overlapping windows" in result.uncertainty_info["meaning"]["windows"]


@pytest.mark.parametrize(("request_", "words"), [
    (ExplainRequest(mode="slices", uncertainty=("windows",)), "needs 'windows' mode"),
    (ExplainRequest(uncertainty=("rotations",)), "unknown uncertainty source"),
])
def test_uncertainty_that_cannot_be_made_is_refused_at_once(models, request_, words) -> None:
    with pytest.raises(ValueError, match=words):
        plan_explanation(models["c2"], ImageSource("v", volume()), request_)


def training_patches(count: int = 120, size: int = 64, seed: int = 0) -> np.ndarray:
    """Smooth grey texture with mild noise: the 'training data' of the domain tests."""
    rng = np.random.default_rng(seed)
    smooth = ndimage.gaussian_filter(rng.random((count, size, size)), (0, 3, 3))
    smooth = (smooth - smooth.mean()) / smooth.std()
    return (0.5 + 0.1 * smooth + 0.02 * rng.standard_normal(smooth.shape)).astype(np.float32)


def with_training_statistics(loaded):
    stats = input_statistics(training_patches(), spatial_dims=2, preprocess=loaded.preprocess,
                             sample=120, seed=0)
    return replace(loaded, card=replace(loaded.card, training_statistics=stats))


def test_domain_report_flags_a_large_image_and_passes_a_training_like_one(models) -> None:
    loaded = with_training_statistics(models["c2"])
    large = training_patches(1, 256, seed=9)[0]
    result = explain(loaded, ImageSource("big", large), ExplainRequest())
    assert result.domain["checked"] and result.domain["out_of_domain"]
    flagged = [f["check"] for f in result.domain["findings"] if f["flagged"]]
    assert flagged == ["input_size"]
    assert "256×256" in result.domain["message"]
    assert result.provenance["domain_check"] == result.domain
    alike = explain(loaded, ImageSource("patches", training_patches(4, 64, seed=11)),
                    ExplainRequest(mode="slices", axis=0))
    assert alike.domain["checked"] and not alike.domain["out_of_domain"]
    skipped = explain(loaded, ImageSource("big", large), ExplainRequest(domain_check=False))
    assert skipped.domain is None


def test_domain_report_uses_the_sources_voxel_size_and_the_window(models) -> None:
    loaded = models["c2"]
    stats = input_statistics(training_patches(), spatial_dims=2, preprocess=loaded.preprocess,
                             voxel_size=(0.5, 0.5), sample=120)
    loaded = replace(loaded, card=replace(loaded.card, training_statistics=stats))
    patch = training_patches(1, 64, seed=12)
    coarse = explain(loaded, ImageSource("p", patch, voxel_size=(1.0, 2.0, 2.0)),
                     ExplainRequest(mode="slices", axis=0))
    voxel = next(f for f in coarse.domain["findings"] if f["check"] == "voxel_size")
    assert voxel["flagged"] and voxel["numbers"]["user"] == [2.0, 2.0]
    unknown = explain(loaded, ImageSource("p", patch), ExplainRequest(mode="slices", axis=0))
    voxel = next(f for f in unknown.domain["findings"] if f["check"] == "voxel_size")
    assert not voxel["applicable"] and not unknown.domain["out_of_domain"]


def test_a_card_without_statistics_reports_that_it_cannot_check(models) -> None:
    result = explain(models["c2"], ImageSource("img", volume((24, 20))), ExplainRequest())
    assert result.domain["checked"] is False and not result.domain["out_of_domain"]
    assert "no training statistics" in result.domain["message"].lower()
