"""explain_volume: slice-wise and windowed explanations of whole volumes, on arrays that may
live on disk (memmap, zarr) or be lazy (dask), with progress, cancelling and OOM back-off."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
import torch
import zarr

from napari_gradcam import Cancelled, GradCAM, GuidedGradCAM, explain_volume
from napari_gradcam.core.architectures import ResNetLike
from napari_gradcam.core.uncertainty import UncertaintyExplainer
from napari_gradcam.core.volume import (
    blending_weights,
    read_mirrored,
    window_grid,
    window_starts,
)

VOLUME_SHAPE = (6, 12, 10)


@pytest.fixture
def volume() -> np.ndarray:
    return np.random.default_rng(0).random(VOLUME_SHAPE).astype(np.float32)


@pytest.fixture
def cam2d(resnet2d):
    return GradCAM(resnet2d, "features.3")


def _slicewise_reference(cam, volume: np.ndarray, axis: int, target=None) -> np.ndarray:
    slices = np.moveaxis(volume, axis, 0)[:, None]  # (n, 1, h, w)
    return np.moveaxis(cam(slices, target), 0, axis)


# --- slices -------------------------------------------------------------------------------


@pytest.mark.parametrize("axis", [0, 1, 2, -1])
def test_slices_along_each_axis_equal_the_explainer_on_the_stacked_slices(cam2d, volume,
                                                                          axis):
    result = explain_volume(cam2d, volume, mode="slices", axis=axis, batch_size=4)
    expected = _slicewise_reference(cam2d, volume, axis)
    assert result.maps.shape == VOLUME_SHAPE and result.maps.dtype == np.float32
    assert expected.max() > 0
    np.testing.assert_allclose(result.maps, expected, rtol=1e-5, atol=1e-7)
    count = VOLUME_SHAPE[axis]
    assert result.predictions.shape == (count, 3)
    np.testing.assert_allclose(result.predictions.sum(1), 1.0, rtol=1e-5)
    assert result.positions == [(i,) for i in range(count)]
    assert result.axis == axis % 3


def test_batch_size_does_not_change_the_result(cam2d, volume):
    results = [explain_volume(cam2d, volume, batch_size=b).maps for b in (1, 4, 64)]
    for other in results[1:]:
        np.testing.assert_allclose(other, results[0], rtol=1e-5, atol=1e-7)


def test_slices_with_a_fixed_target_and_a_preprocess(cam2d, volume):
    def preprocess(batch: np.ndarray) -> torch.Tensor:
        return torch.from_numpy((batch - 0.5) / 0.25)[:, None]

    result = explain_volume(cam2d, volume, target=2, preprocess=preprocess)
    expected = cam2d((volume[:, None] - 0.5) / 0.25, 2)
    np.testing.assert_allclose(result.maps, expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(result.target_indices, np.full(VOLUME_SHAPE[0], 2))


def test_memmap_dask_and_zarr_inputs_and_zarr_output(cam2d, volume, tmp_path):
    expected = _slicewise_reference(cam2d, volume, 0)
    memmap = np.lib.format.open_memmap(tmp_path / "ct.npy", mode="w+", dtype=np.float32,
                                       shape=VOLUME_SHAPE)
    memmap[:] = volume
    memmap.flush()
    on_disk = np.load(tmp_path / "ct.npy", mmap_mode="r")
    lazy = da.from_array(volume, chunks=(2, 12, 10))
    stored = zarr.open_array(str(tmp_path / "ct.zarr"), mode="w", shape=VOLUME_SHAPE,
                             chunks=(2, 12, 10), dtype="f4")
    stored[:] = volume
    for source in (on_disk, lazy, stored):
        result = explain_volume(cam2d, source, batch_size=4)
        np.testing.assert_allclose(np.asarray(result.maps), expected, rtol=1e-5, atol=1e-7)
    out = zarr.open_array(str(tmp_path / "maps.zarr"), mode="w", shape=VOLUME_SHAPE,
                          chunks=(1, 12, 10), dtype="f4")
    result = explain_volume(cam2d, lazy, batch_size=4, out=out)
    assert result.maps is out
    reopened = zarr.open_array(str(tmp_path / "maps.zarr"), mode="r")
    np.testing.assert_allclose(reopened[:], expected, rtol=1e-5, atol=1e-7)


def test_out_of_the_wrong_shape_is_rejected(cam2d, volume):
    with pytest.raises(ValueError, match=r"out has shape \(6, 12, 9\), the volume \(6, 12, 10\)"):
        explain_volume(cam2d, volume, out=np.zeros((6, 12, 9), np.float32))


def test_integer_volume_is_accepted(cam2d, volume):
    grey = (volume * 1000).astype(np.uint16)
    result = explain_volume(cam2d, grey)
    np.testing.assert_allclose(result.maps, _slicewise_reference(cam2d, grey.astype(
        np.float32), 0), rtol=1e-5, atol=1e-7)


def test_progress_is_increasing_and_ends_at_the_total(cam2d, volume):
    calls = []
    explain_volume(cam2d, volume, batch_size=4, progress=lambda d, t: calls.append((d, t)))
    assert calls == [(4, 6), (6, 6)]
    calls.clear()
    explain_volume(cam2d, volume, axis=1, batch_size=5, progress=lambda d, t: calls.append((d, t)))
    assert calls == [(5, 12), (10, 12), (12, 12)]


def test_should_stop_cancels_after_the_first_batch(cam2d, volume):
    calls = []
    out = np.zeros(VOLUME_SHAPE, np.float32)
    with pytest.raises(Cancelled, match="after 2 of 6"):
        explain_volume(cam2d, volume, batch_size=2, out=out,
                       progress=lambda d, t: calls.append(d), should_stop=lambda: True)
    assert calls == [2]
    assert out[:2].any() and not out[2:].any()  # nothing was computed after the stop


def test_bad_volumes_and_options(cam2d, volume):
    with pytest.raises(ValueError, match=r"expected a 3D volume \(Z, Y, X\), got shape \(12, 10\)"):
        explain_volume(cam2d, volume[0])
    with pytest.raises(ValueError, match="expected a 3D volume"):
        explain_volume(cam2d, volume[None])
    with pytest.raises(ValueError, match="the volume is empty"):
        explain_volume(cam2d, np.zeros((0, 12, 10), np.float32))
    with pytest.raises(TypeError, match="dtype bool"):
        explain_volume(cam2d, volume > 0.5)
    with pytest.raises(ValueError, match="mode must be 'slices' or 'windows'"):
        explain_volume(cam2d, volume, mode="tiles")
    with pytest.raises(ValueError, match="axis must be 0, 1 or 2"):
        explain_volume(cam2d, volume, axis=3)
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        explain_volume(cam2d, volume, batch_size=0)
    with pytest.raises(ValueError, match=r"one 2D map per slice.*single target"):
        explain_volume(cam2d, volume, target="all")


# --- OOM back-off ---------------------------------------------------------------------------


class _OutOfMemoryAbove2(ResNetLike):
    """Raises the error CUDA raises when a batch does not fit (more than 2 slices here).

    A real CUDA out-of-memory cannot be produced on CPU CI; this is the same exception type
    and message the CUDA allocator raises, coming from inside the model's forward.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return super().forward(x)


def test_out_of_memory_backs_off_and_gives_the_same_result(resnet2d, volume):
    fragile = _OutOfMemoryAbove2(widths=(8, 16, 16)).eval()
    fragile.load_state_dict(resnet2d.state_dict())
    messages = []
    with pytest.warns(RuntimeWarning, match="retrying with batch size 4") as caught:
        result = explain_volume(GradCAM(fragile, "features.3"), volume, batch_size=8,
                                notify=messages.append)
    assert any("retrying with batch size 2" in str(w.message) for w in caught)
    assert messages == ["out of memory on cpu: retrying with batch size 4",
                        "out of memory on cpu: retrying with batch size 2"]
    expected = explain_volume(GradCAM(resnet2d, "features.3"), volume, batch_size=8).maps
    np.testing.assert_allclose(result.maps, expected, rtol=1e-5, atol=1e-7)
    assert all(not m._forward_hooks for m in fragile.modules())


class _AlwaysOutOfMemory(ResNetLike):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise torch.OutOfMemoryError("CUDA out of memory")


def test_out_of_memory_even_for_one_slice_gives_advice(volume):
    cam = GradCAM(_AlwaysOutOfMemory(widths=(4, 8, 8)).eval(), "features.3")
    with pytest.warns(RuntimeWarning), pytest.raises(
            MemoryError, match=r"even for a batch of one.*amp='bf16'"):
        explain_volume(cam, volume, batch_size=2)


# --- windows (3D models) --------------------------------------------------------------------


@pytest.fixture
def cam3d():
    torch.manual_seed(0)
    return GradCAM(ResNetLike(spatial_dims=3, widths=(4, 8, 8)).eval(), "features.3")


def test_one_window_as_big_as_the_volume_equals_a_direct_3d_call(cam3d):
    volume = np.random.default_rng(1).random((8, 12, 10)).astype(np.float32)
    result = explain_volume(cam3d, volume, mode="windows", window=(8, 12, 10), target=1)
    direct = cam3d(volume[None, None], 1)[0]
    assert direct.max() > 0
    np.testing.assert_allclose(result.maps, direct, rtol=1e-5, atol=1e-6 * direct.max())
    assert result.positions == [(0, 0, 0)] and result.predictions.shape == (1, 3)


@pytest.fixture
def pointwise3d(hand):
    """GAP + linear with a 1x1x1 conv and positive weights: the Grad-CAM of a voxel depends
    only on that voxel and on the window's size Z (the gradient is W/Z), so a windowed map
    must equal the direct map × Z_volume / Z_window everywhere, seams included."""
    model = hand.set_known_weights(hand.GapLinear(3, in_channels=1), seed=2, positive=True)
    return GradCAM(model.eval(), "relu")


@pytest.mark.parametrize(("overlap", "blend"), [(0.25, "gaussian"), (0.5, "gaussian"),
                                                (0.0, "constant"), (0.4, "constant")])
def test_overlapping_windows_blend_without_seams(pointwise3d, overlap, blend):
    shape, window = (13, 11, 17), (6, 5, 8)
    volume = np.random.default_rng(3).random(shape).astype(np.float32) + 0.1
    result = explain_volume(pointwise3d, volume, mode="windows", window=window,
                            overlap=overlap, target=0, batch_size=3, blend=blend)
    direct = pointwise3d(volume[None, None], 0)[0]
    assert (direct > 0).all()
    maps = np.asarray(result.maps)
    assert np.isfinite(maps).all() and (maps > 0).all()  # covered everywhere, no zero seams
    scale = np.prod(shape) / np.prod(window)
    np.testing.assert_allclose(maps, direct * scale, rtol=1e-4)
    starts = window_grid(shape, window, overlap)
    assert len(result.positions) == np.prod([len(s) for s in starts])
    assert result.positions[0] == tuple(s[0] for s in starts) == (-1, -1, -2)  # margins 1, 1, 2
    assert result.predictions.shape == (len(result.positions), 3)


def test_windows_on_a_resnet_are_finite_non_negative_and_cover_the_volume(cam3d, tmp_path):
    volume = np.random.default_rng(4).random((14, 12, 12)).astype(np.float32)
    lazy = da.from_array(volume, chunks=(4, 12, 12))
    out = zarr.open_array(str(tmp_path / "maps.zarr"), mode="w", shape=volume.shape,
                          chunks=(4, 12, 12), dtype="f4")
    calls = []
    result = explain_volume(cam3d, lazy, mode="windows", window=(8, 8, 8), overlap=0.25,
                            batch_size=2, out=out, progress=lambda d, t: calls.append((d, t)))
    maps = out[:]
    assert result.maps is out
    assert np.isfinite(maps).all() and (maps >= 0).all()
    assert all(maps[z].max() > 0 for z in range(volume.shape[0]))  # every plane was written
    done = [d for d, _ in calls]
    assert done == sorted(done) and calls[-1] == (len(result.positions),) * 2


def test_window_starts_cover_the_axis():
    assert window_starts(20, 8, 0.5) == [0, 4, 8, 12]
    assert window_starts(21, 8, 0.5) == [0, 4, 8, 12, 13]
    assert window_starts(5, 8, 0.5) == [0]
    for size, window, overlap in [(100, 32, 0.25), (33, 7, 0.0), (64, 64, 0.9)]:
        starts = window_starts(size, window, overlap)
        covered = np.zeros(size, bool)
        for start in starts:
            covered[start:start + window] = True
        assert covered.all() and starts[-1] + window == max(size, window)


def test_blending_weights_are_symmetric_positive_and_peak_in_the_middle():
    weights = blending_weights((7, 8, 5), "gaussian")
    for axis in range(3):
        np.testing.assert_allclose(weights, np.flip(weights, axis), rtol=1e-6)
    # each axis' profile is floored at 1e-3, so even a corner keeps a usable weight
    assert weights.min() >= 1e-9 * weights.max() > 0
    assert weights[3, 3:5, 2].min() == pytest.approx(weights.max())
    assert weights[0, 0, 0] < 0.2 * weights.max()
    np.testing.assert_array_equal(blending_weights((3, 4, 5), "constant"), 1.0)
    with pytest.raises(ValueError, match="blend must be"):
        blending_weights((3, 3, 3), "cosine")


def test_window_options_are_checked(cam3d):
    volume = np.zeros((8, 8, 8), np.float32)
    with pytest.raises(ValueError, match="overlap must be in"):
        explain_volume(cam3d, volume, mode="windows", window=(4, 4, 4), overlap=1.0)
    with pytest.raises(ValueError, match="window must be three positive sizes"):
        explain_volume(cam3d, volume, mode="windows", window=(4, 4))
    with pytest.raises(ValueError, match="one 3D map per window"):
        explain_volume(GradCAM(ResNetLike(widths=(4, 8, 8)).eval(), "features.3"), volume,
                       mode="windows", window=(4, 4, 4), preprocess=lambda b: torch.from_numpy(
                           b[:, :1]))


@pytest.mark.parametrize("mode", ["slices", "windows"])
def test_guided_gradcam_volume_is_max_abs_gradient_over_channels(mode):
    torch.manual_seed(0)
    dims = 2 if mode == "slices" else 3
    model = ResNetLike(dims, 1, 3, widths=(4, 8, 8)).eval()
    volume = np.random.default_rng(2).random((8, 16, 16)).astype(np.float32)
    explainer = GuidedGradCAM(model, "features.2")
    options = {"window": (8, 16, 16)} if mode == "windows" else {}
    maps = explain_volume(explainer, volume, mode=mode, target=1, **options).maps
    if mode == "slices":
        direct = np.abs(explainer(volume[:, None], 1)).max(axis=1)
        np.testing.assert_allclose(maps, direct, rtol=1e-5, atol=1e-9)
    assert maps.shape == volume.shape and (maps >= 0).all() and maps.max() > 0


# --- edges: no artefacts where the volume ends (issue 13) -----------------------------------


def test_blending_weights_follow_their_formula_worked_out_by_hand():
    """σ = size/8 per axis, a profile peaking at 1, floored at 1e-3, and the 3D weight the
    product of the three profiles: written out here, not taken from the module."""
    window = (16, 9, 5)

    def profile(size: int) -> np.ndarray:
        sigma = size / 8.0
        values = [np.exp(-0.5 * ((i - (size - 1) / 2.0) / sigma) ** 2) for i in range(size)]
        peak = max(values)
        return np.array([max(v / peak, 1e-3) for v in values])

    z, y, x = (profile(size) for size in window)
    expected = z[:, None, None] * y[None, :, None] * x[None, None, :]
    np.testing.assert_allclose(blending_weights(window, "gaussian"), expected, rtol=1e-6)
    # the numbers: 16 voxels, σ = 2, centre 7.5, peak (voxels 7, 8) e^-(0.5/2)²/2 = e^-1/32;
    # the edge voxel e^-(7.5/2)²/2 / peak = e^-7 = 9.1e-4 is floored to 1e-3; the next one is
    # e^-(6.5/2)²/2 / peak = e^-5.25 (σ = size/4 would give e^-1.3 and no floor)
    assert z[0] == 1e-3 and z[1] == pytest.approx(np.exp(-5.25), rel=1e-6)
    # a 9-voxel axis (σ = 9/8) peaks at its middle voxel: e^0 = 1
    assert y[4] == 1.0 and y[3] == pytest.approx(np.exp(-0.5 * (1 / 1.125) ** 2))


def _reflect_grid(size: int, window: int, overlap: float) -> list[int]:
    """The window grid over one axis, written out independently of window_starts."""
    if size <= window:
        return [0]
    step = max(1, int(window * (1.0 - overlap)))
    starts = list(range(0, size - window + 1, step))
    return starts if starts[-1] == size - window else [*starts, size - window]


def test_windowed_map_is_the_weighted_average_of_independent_window_maps(cam3d):
    """A spatially varying model (a residual net on noise): mirror the volume by the margin,
    explain every window on its own, average with the Gaussian weights, crop: the engine's
    result must be exactly that."""
    shape, window, overlap, margin = (13, 11, 17), (6, 5, 8), 0.25, 2
    volume = np.random.default_rng(5).random(shape).astype(np.float32)
    result = explain_volume(cam3d, volume, mode="windows", window=window, overlap=overlap,
                            target=1, batch_size=3, edge_margin=margin)
    padded = np.pad(volume, margin, mode="reflect")  # every axis is longer than the window
    sums = np.zeros(padded.shape, np.float64)
    weight_sums = np.zeros(padded.shape, np.float64)
    weights = blending_weights(window, "gaussian").astype(np.float64)
    corners = []
    for z0 in _reflect_grid(padded.shape[0], window[0], overlap):
        for y0 in _reflect_grid(padded.shape[1], window[1], overlap):
            for x0 in _reflect_grid(padded.shape[2], window[2], overlap):
                block = (slice(z0, z0 + window[0]), slice(y0, y0 + window[1]),
                         slice(x0, x0 + window[2]))
                cam = cam3d(padded[block][None, None], 1)[0]
                sums[block] += weights * cam
                weight_sums[block] += weights
                corners.append((z0 - margin, y0 - margin, x0 - margin))
    expected = (sums / weight_sums)[margin:-margin, margin:-margin, margin:-margin]
    assert expected.std() > 0.1 * expected.mean() > 0  # the map really varies in space
    np.testing.assert_allclose(result.maps, expected, rtol=1e-4, atol=1e-6 * expected.max())
    assert result.positions == corners  # corners in volume coordinates (negative: overhang)


class _ZeroPaddedConvNet(torch.nn.Module):
    """Two 3x3(x3) convolutions with zero padding, ReLU, global average pool, linear.

    Translation-equivariant away from its input's border; at the border the zero padding
    changes the activations, as in every CNN, so each window's map has a frame of its own."""

    def __init__(self, dims: int, seed: int = 0) -> None:
        super().__init__()
        conv = torch.nn.Conv3d if dims == 3 else torch.nn.Conv2d
        pool = torch.nn.AdaptiveAvgPool3d if dims == 3 else torch.nn.AdaptiveAvgPool2d
        torch.manual_seed(seed)
        self.body = torch.nn.Sequential(conv(1, 6, 3, padding=1), torch.nn.ReLU(),
                                        conv(6, 6, 3, padding=1), torch.nn.ReLU())
        self.head = torch.nn.Sequential(pool(1), torch.nn.Flatten(), torch.nn.Linear(6, 2))
        with torch.no_grad():  # positive class weights: a CAM that is positive wherever A is
            self.head[2].weight.abs_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def _face_ratios(maps: np.ndarray, inset: int = 4) -> np.ndarray:
    """Mean of each outermost plane (2 per axis) over the mean of the interior."""
    interior = maps[tuple(slice(inset, -inset) for _ in range(maps.ndim))].mean()
    ratios = []
    for axis in range(maps.ndim):
        for index in (0, -1):
            plane = np.take(maps, index, axis=axis)
            ratios.append(plane.mean() / interior)
    return np.array(ratios)


@pytest.mark.parametrize("field", ["uniform", "noise"])
def test_windows_leave_no_frame_at_the_volume_faces(field):
    """The demo's hot stripe, reproduced: a zero-padded net's window map is hot (or cold) at
    the window's border; the volume's faces must not inherit it (border / interior within
    10 %), which they did while the volume's faces were window borders (edge_margin=0)."""
    cam = GradCAM(_ZeroPaddedConvNet(3).eval(), "body.3")
    shape, window = (24, 26, 28), (12, 12, 12)
    rng = np.random.default_rng(7)
    volume = (np.full(shape, 0.5, np.float32) if field == "uniform"
              else rng.random(shape).astype(np.float32))
    one_window = cam(volume[None, None, :12, :12, :12], 0)[0]
    framed = _face_ratios(one_window, inset=3)
    assert np.abs(framed - 1).max() > 0.3  # the model really has a frame of its own
    maps = np.asarray(explain_volume(cam, volume, mode="windows", window=window, target=0,
                                     batch_size=8).maps)
    assert maps.min() >= 0 and maps.mean() > 0
    np.testing.assert_array_less(np.abs(_face_ratios(maps) - 1), 0.1)
    old = np.asarray(explain_volume(cam, volume, mode="windows", window=window, target=0,
                                    batch_size=8, edge_margin=0).maps)
    assert np.abs(_face_ratios(old) - 1).max() > 0.3  # what edge_margin removes


class _CircularConvNet(torch.nn.Module):
    """Convolutions with circular padding (one of them strided): exactly equivariant to shifts
    by multiples of the stride of a periodic image, with no border at all."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(1, 6, 3, padding=1, padding_mode="circular"), torch.nn.ReLU(),
            torch.nn.Conv2d(6, 6, 3, stride=2, padding=1, padding_mode="circular"),
            torch.nn.ReLU())
        self.head = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                        torch.nn.Linear(6, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def test_slices_of_a_shift_equivariant_model_have_no_excess_at_the_border():
    """Slice k is a periodic field rolled by 2k (the stride): the model's maps are rolled
    copies of each other, so averaged over the slices every pixel has seen every part of the
    field and the border must average like the interior. The upsampling of the stride-2 map
    (align_corners=False) only approximates a periodic interpolation in the outermost pixel;
    inside it the maps must be exact rolls."""
    cam = GradCAM(_CircularConvNet().eval(), "body.3")
    rng = np.random.default_rng(3)
    field = rng.random((16, 16)).astype(np.float32)
    volume = np.stack([np.roll(field, (2 * k, 2 * k), axis=(0, 1)) for k in range(8)])
    maps = np.asarray(explain_volume(cam, volume, mode="slices", target=0, batch_size=4).maps)
    inner = np.zeros((16, 16), bool)
    inner[1:-1, 1:-1] = True
    for k in range(8):
        rolled = np.roll(maps[0], (2 * k, 2 * k), axis=(0, 1))
        both = inner & np.roll(inner, (2 * k, 2 * k), axis=(0, 1))  # no clamped pixel involved
        np.testing.assert_allclose(maps[k][both], rolled[both], rtol=1e-4,
                                   atol=1e-5 * maps.max())
    average = maps.mean(axis=0)
    assert np.abs(_face_ratios(average, inset=2) - 1).max() < 0.1
    uniform = np.asarray(explain_volume(cam, np.full((2, 16, 16), 0.3, np.float32),
                                        target=0).maps)
    assert uniform.max() > 0 and uniform.max() <= 1.1 * uniform.min()


def test_window_disagreement_is_the_weighted_variance_of_independent_window_maps(cam3d):
    """As the weighted-average test above, with the weighted second moment: the uncertainty
    output is sqrt(sum w cam^2 / sum w - mean^2) over the windows covering each voxel."""
    shape, window, overlap, margin = (13, 11, 17), (6, 5, 8), 0.5, 2
    volume = np.random.default_rng(5).random(shape).astype(np.float32)
    spread = np.zeros(shape, np.float32)
    result = explain_volume(cam3d, volume, mode="windows", window=window, overlap=overlap,
                            target=1, batch_size=3, edge_margin=margin, uncertainty_out=spread)
    padded = np.pad(volume, margin, mode="reflect")
    sums, squares, weight_sums = (np.zeros(padded.shape, np.float64) for _ in range(3))
    weights = blending_weights(window, "gaussian").astype(np.float64)
    for z0 in _reflect_grid(padded.shape[0], window[0], overlap):
        for y0 in _reflect_grid(padded.shape[1], window[1], overlap):
            for x0 in _reflect_grid(padded.shape[2], window[2], overlap):
                block = (slice(z0, z0 + window[0]), slice(y0, y0 + window[1]),
                         slice(x0, x0 + window[2]))
                cam = cam3d(padded[block][None, None], 1)[0].astype(np.float64)
                sums[block] += weights * cam
                squares[block] += weights * cam**2
                weight_sums[block] += weights
    crop = (slice(margin, -margin),) * 3
    mean = (sums / weight_sums)[crop]
    expected = np.sqrt(np.maximum((squares / weight_sums)[crop] - mean**2, 0))
    assert result.uncertainty is spread
    assert expected.max() > 0.05 * mean.max()  # the windows really disagree somewhere
    np.testing.assert_allclose(result.maps, mean, rtol=1e-4, atol=1e-6 * mean.max())
    np.testing.assert_allclose(spread, expected, rtol=1e-3, atol=1e-4 * mean.max())


def test_uncertainty_slice_by_slice_is_the_wrappers_std_map(cam2d, volume):
    wrapper = UncertaintyExplainer(cam2d, sources=("flips", "shifts"))
    spread = np.zeros(volume.shape, np.float32)
    result = explain_volume(wrapper, volume, mode="slices", axis=1, batch_size=4,
                            uncertainty_out=spread)
    direct = wrapper.explain(np.moveaxis(volume, 1, 0)[:, None]).extras["uncertainty"]
    np.testing.assert_allclose(spread, np.moveaxis(direct, 0, 1), rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(result.maps, explain_volume(cam2d, volume, axis=1).maps)
    with pytest.raises(ValueError, match="UncertaintyExplainer"):
        explain_volume(cam2d, volume, uncertainty_out=np.zeros(volume.shape, np.float32))


# --- reading mirrored blocks (the windows loop's only read) --------------------------------


def _reflect(position: int, size: int) -> int:
    """Mirror one position into 0..size-1, face voxel not repeated (NumPy's 'reflect'),
    as often as needed: written out step by step, independent of the module's arithmetic."""
    if size == 1:
        return 0
    while not 0 <= position < size:
        position = -position if position < 0 else 2 * (size - 1) - position
    return position


@pytest.mark.parametrize("shape", [(13, 11, 17), (5, 7, 9), (1, 4, 6), (2, 3, 1)])
def test_read_mirrored_is_the_volume_reflected_at_its_faces_voxel_by_voxel(shape):
    """Blocks inside, overhanging one face, both faces, or by more than the axis is long
    (the slab fast path and the general gather must both give the definition)."""
    rng = np.random.default_rng(sum(shape))
    volume = (rng.random(shape) * 60000).astype(np.uint16)  # integers: read as float32
    margins = [min(2, s - 1) for s in shape]
    blocks = [((0, 0, 0), shape),  # the volume itself
              # the windows loop's slab: a margin mirrored on both sides of every axis
              ([-m for m in margins], [s + 2 * m for s, m in zip(shape, margins, strict=True)]),
              # one face only, each end
              ([-m for m in margins], shape), (margins, shape)]
    for draw in range(80):  # short overhangs (a few voxels) and long ones (beyond the axis)
        reach = [s - 1 for s in shape] if draw % 2 else [2 * s + 2 for s in shape]
        corner = [int(rng.integers(-r, s + 1)) for r, s in zip(reach, shape, strict=True)]
        size = [int(rng.integers(1, s + 2 * r + 2)) for r, s in zip(reach, shape, strict=True)]
        blocks.append((corner, size))
    for corner, size in blocks:
        block = read_mirrored(volume, corner, size)
        expected = np.empty(size, np.float32)
        for index in np.ndindex(*size):
            source = tuple(_reflect(c + i, s) for c, i, s in zip(corner, index, shape,
                                                                  strict=True))
            expected[index] = volume[source]
        assert block.dtype == np.float32
        np.testing.assert_array_equal(block, expected)
    floats = volume.astype(np.float32)
    inside = read_mirrored(floats, (0, 0, 0), shape)
    inside[...] = -1  # a copy: the caller can change it without touching the volume
    np.testing.assert_array_equal(floats, volume)
