"""The windows loop's blending sums (``core.run.tiles.BlendSums``): the numbers of the
definition, every class at once, and an out-of-memory error that leaves them untouched."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_gradcam.core.run import tiles
from napari_gradcam.core.run.tiles import BlendSums, sums_device
from napari_gradcam.core.uncertainty import WeightedMoments


def random_windows(rng: np.random.Generator, count: int, classes: int
                   ) -> tuple[np.ndarray, slice, list[tuple[slice, ...]]]:
    maps = rng.random((count, classes, 6, 6, 6)).astype(np.float32)
    regions = [(slice(0, 4), slice(y, y + 6), slice(x, x + 6))
               for y, x in rng.integers(0, 14, (count, 2))]
    return maps, slice(1, 5), regions


def test_the_sums_of_every_class_equal_weighted_moments_bit_for_bit() -> None:
    """S_k / W with W shared by the classes: the float32 numbers WeightedMoments(variance=False)
    gives class by class, window by window (what the loop kept before the sums moved)."""
    rng = np.random.default_rng(1)
    weights = rng.random((6, 6, 6)).astype(np.float32) + 1e-3
    sums = BlendSums(weights, (4, 20, 20), 3, "cpu")
    moments = [WeightedMoments((4, 20, 20), np.float32, variance=False) for _ in range(3)]
    for _ in range(15):
        maps, depth_part, regions = random_windows(rng, 3, 3)
        sums.add_windows(maps[:, :, depth_part], depth_part, regions)
        for k, accumulated in enumerate(moments):
            for number, region in enumerate(regions):
                accumulated.add(maps[number, k, depth_part], weights[depth_part], index=region)
    index = (slice(0, 4), slice(2, 18), slice(0, 20))
    blended = np.stack(sums.mean(index))
    assert blended.shape == (3, 4, 16, 20)
    for k, accumulated in enumerate(moments):
        assert np.array_equal(blended[k], accumulated.mean(index))
    unreached = sums.weight[index].numpy() == 0  # voxels no window covered
    assert unreached.any() and (blended[:, unreached] == 0).all()


def test_dropping_planes_shifts_every_class_and_zeroes_the_end() -> None:
    sums = BlendSums(np.ones((4, 2, 2), np.float32), (4, 2, 2), 2, "cpu")
    sums.total[:] = torch.arange(4, dtype=torch.float32).reshape(1, 4, 1, 1)
    sums.weight[:] = 1
    sums.drop_leading(1)
    for k in range(2):
        assert sums.total[k, :, 0, 0].tolist() == [1.0, 2.0, 3.0, 0.0]
    assert sums.weight[:, 0, 0].tolist() == [1.0, 1.0, 1.0, 0.0]


def test_an_out_of_memory_error_while_adding_a_batch_leaves_the_sums_as_they_were(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The loop's back-off runs a failed batch again in halves: if part of it had been added,
    those windows would count twice. All allocation comes before the first addition."""
    rng = np.random.default_rng(2)
    sums = BlendSums(rng.random((6, 6, 6)).astype(np.float32), (4, 20, 20), 2, "cpu")
    maps, depth_part, regions = random_windows(rng, 3, 2)
    sums.add_windows(maps[:, :, depth_part], depth_part, regions)
    weight, total = sums.weight.clone(), sums.total.clone()

    def out_of_memory(*_args: object, **_kwargs: object) -> torch.Tensor:
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(tiles.torch, "as_tensor", out_of_memory)
    maps, depth_part, regions = random_windows(rng, 3, 2)
    with pytest.raises(torch.OutOfMemoryError):
        sums.add_windows(maps[:, :, depth_part], depth_part, regions)
    assert torch.equal(sums.weight, weight) and torch.equal(sums.total, total)


def test_the_sums_stay_on_a_gpu_only_while_they_fit_a_quarter_of_its_free_memory(
        monkeypatch: pytest.MonkeyPatch) -> None:
    cuda = torch.device("cuda")
    shape = (32, 1040, 1040)
    needed = (2 + 1) * int(np.prod(shape)) * 4 * 2  # two classes: W, S_0, S_1, and a flush
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda _device=None: (4 * needed, 8 * needed))
    assert sums_device(cuda, 2, shape) == cuda
    monkeypatch.setattr(torch.cuda, "mem_get_info",
                        lambda _device=None: (4 * needed - 1, 8 * needed))
    assert sums_device(cuda, 2, shape) == torch.device("cpu")
    assert sums_device(torch.device("cpu"), 2, shape) == torch.device("cpu")
