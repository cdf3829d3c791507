"""Chunked execution equals the single-process engine exactly, on dask workers too, and
survives a worker that dies mid-run."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file

from napari_gradcam import explain_volume
from napari_gradcam.core.architectures import ResNetLike
from napari_gradcam.distributed import (
    ChunkTask,
    ExplainOptions,
    explain_chunk,
    explain_file,
    get_model,
    make_explainer_for,
    make_plan,
    plan_chunks,
    resolve_class_target,
    run_distributed,
)
from napari_gradcam.io import create_ome_zarr, read_volume, write_tiff_volume

CLASSES = ["none", "pore", "crack"]


def write_model(folder: Path, spatial_dims: int, name: str, widths=(4, 8, 8)) -> Path:
    """A small ResNetLike with non-trivial BatchNorm statistics and a positive linear head
    (so Grad-CAM maps are positive where features fire, not ReLU-ed to zero), saved with
    safetensors and a model card."""
    torch.manual_seed(spatial_dims)
    model = ResNetLike(spatial_dims=spatial_dims, in_channels=1, num_classes=3, widths=widths)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
        model.classifier.weight.abs_()
    save_file(model.state_dict(), str(folder / f"{name}.safetensors"))
    card = {
        "name": name, "architecture": "resnet_like",
        "architecture_kwargs": {"spatial_dims": spatial_dims, "in_channels": 1,
                                "num_classes": 3, "widths": list(widths)},
        "weights": f"{name}.safetensors", "spatial_dims": spatial_dims, "in_channels": 1,
        "task": "classification", "class_names": CLASSES, "target_layer": "features.2",
        "input_size": [16] * spatial_dims,
        "preprocessing": [{"op": "window", "min": 0.0, "max": 1000.0}],
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(card), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("models")
    return {"2d": write_model(folder, 2, "tiny2d"), "3d": write_model(folder, 3, "tiny3d")}


def make_volume(folder: Path, shape=(21, 24, 26), seed=0) -> Path:
    rng = np.random.default_rng(seed)
    volume = (rng.random(shape) * 1000).astype(np.uint16)
    return write_tiff_volume(folder / f"scan_{seed}.tif", volume, scale=(1.0, 0.65, 0.65))


def reference(card: Path, volume_path: Path, options: ExplainOptions):
    """The single-process engine on the whole volume, in memory."""
    volume, _ = read_volume(volume_path)
    loaded = get_model(str(card), options.device, False)
    plan = make_plan(loaded, volume.shape, options)
    explainer = make_explainer_for(loaded, plan, options.method)
    extra = ({"axis": plan.axis} if plan.mode == "slices"
             else {"window": plan.window, "overlap": options.overlap})
    return explain_volume(explainer, volume, mode=plan.mode, batch_size=options.batch_size,
                          target=plan.target, preprocess=loaded.preprocess, **extra)


def run_chunks_here(card: Path, volume_path: Path, options: ExplainOptions, folder: Path):
    """Every chunk task run in this process, in reverse order (order must not matter)."""
    volume, _ = read_volume(volume_path)
    loaded = get_model(str(card), options.device, False)
    plan = make_plan(loaded, volume.shape, options)
    out_path = folder / f"chunks_{plan.mode}_{plan.chunk}_{plan.axis}.zarr"
    out = create_ome_zarr(out_path, volume.shape, chunks=plan.chunks)
    tasks = [ChunkTask(str(volume_path), str(card), str(out_path / "0"), options, plan, a, b)
             for a, b in plan_chunks(volume.shape[plan.axis], plan.chunk)]
    results = [explain_chunk(task) for task in reversed(tasks)]
    return out[:], results


# ----------------------------------------------------------------------------- planning


def test_plan_chunks_cover_the_axis_once():
    assert plan_chunks(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert plan_chunks(3, 8) == [(0, 3)]


def test_slice_chunks_are_whole_batches(models):
    loaded = get_model(str(models["2d"]), "cpu")
    plan = make_plan(loaded, (50, 16, 16), ExplainOptions(batch_size=8, chunk=13))
    assert plan.chunk == 16 and plan.chunks[0] == 16
    plan = make_plan(loaded, (50, 16, 16), ExplainOptions(batch_size=8, axis=2, chunk=3))
    assert plan.axis == 2 and plan.chunk == 8 and plan.chunks[2] == 8


def test_plan_rejects_mismatched_mode_and_model(models):
    loaded2d, loaded3d = get_model(str(models["2d"]), "cpu"), get_model(str(models["3d"]), "cpu")
    with pytest.raises(ValueError, match="needs a 3D model"):
        make_plan(loaded2d, (8, 8, 8), ExplainOptions(mode="volume"))
    with pytest.raises(ValueError, match="needs a 2D model"):
        make_plan(loaded3d, (8, 8, 8), ExplainOptions(mode="slices"))
    with pytest.raises(ValueError, match=r"no layer 'features\.9'"):
        make_plan(loaded2d, (8, 8, 8), ExplainOptions(layer="features.9"))
    with pytest.raises(ValueError, match="overlap"):
        make_plan(loaded3d, (8, 8, 8), ExplainOptions(overlap=1.0))
    assert make_plan(loaded3d, (8, 8, 8), ExplainOptions()).window == (16, 16, 16)


def test_targets_by_name_index_or_predicted():
    assert resolve_class_target("predicted", CLASSES) is None
    assert resolve_class_target(None, CLASSES) is None
    assert resolve_class_target("crack", CLASSES) == 2
    assert resolve_class_target("1", CLASSES) == 1
    with pytest.raises(ValueError, match="one of: none, pore, crack"):
        resolve_class_target("cracks", CLASSES)
    with pytest.raises(ValueError, match="out of range"):
        resolve_class_target(3, CLASSES)


# ----------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("axis, chunk, batch", [(0, 4, 4), (0, 8, 3), (1, 8, 8), (2, 5, 5)])
def test_slice_chunks_equal_the_engine(models, tmp_path, axis, chunk, batch):
    volume = make_volume(tmp_path)
    options = ExplainOptions(batch_size=batch, axis=axis, chunk=chunk, device="cpu")
    expected = reference(models["2d"], volume, options)
    assert expected.maps.max() > 0  # not a vacuous comparison of zeros
    maps, results = run_chunks_here(models["2d"], volume, options, tmp_path)
    np.testing.assert_array_equal(maps, expected.maps)
    positions = sorted(p for r in results for p in r.positions)
    assert positions == list(expected.positions)


@pytest.mark.parametrize("window, chunk, shape", [
    ((8, 12, 12), 5, (21, 24, 26)),     # chunks smaller than a window: every chunk has halos
    ((8, 12, 12), 16, (21, 24, 26)),
    ((8, 8, 8), 7, (21, 24, 26)),
    ((32, 12, 12), 4, (21, 24, 26)),    # window deeper than the volume (edge padding)
])
def test_window_chunks_equal_the_engine(models, tmp_path, window, chunk, shape):
    volume = make_volume(tmp_path, shape)
    options = ExplainOptions(mode="volume", window=window, overlap=0.25, batch_size=3,
                             chunk=chunk, device="cpu")
    expected = reference(models["3d"], volume, options)
    assert expected.maps.max() > 0 and np.count_nonzero(expected.maps) > expected.maps.size / 4
    maps, results = run_chunks_here(models["3d"], volume, options, tmp_path)
    np.testing.assert_array_equal(maps, expected.maps)
    # each window's prediction is reported by exactly one chunk, and they match the engine's
    got = {p: probs for r in results for p, probs in zip(r.positions, r.predictions,
                                                         strict=True)}
    assert sorted(got) == sorted(expected.positions)
    for position, probs in zip(expected.positions, expected.predictions, strict=True):
        np.testing.assert_allclose(got[position], probs, rtol=1e-6)


def test_explain_file_equals_the_engine_and_records_provenance(models, tmp_path):
    volume = make_volume(tmp_path)
    options = ExplainOptions(batch_size=4, device="cpu", target="pore")
    expected = reference(models["2d"], volume, options)
    summary = explain_file(volume, models["2d"], tmp_path / "maps.zarr", options=options)
    maps, info = read_volume(tmp_path / "maps.zarr")
    np.testing.assert_array_equal(maps[:], expected.maps)
    assert info.scale == pytest.approx((1.0, 0.65, 0.65)) and info.unit == "micrometer"
    record = info.metadata
    assert record["method"] == "gradcam" and record["layers"] == ["features.2"]
    assert record["target"] == "class 1 (pore)"
    assert record["model"] == "tiny2d" and len(record["weights_sha256"]) == 64
    assert record["value_range"] == [float(expected.maps.min()), float(expected.maps.max())]
    np.testing.assert_allclose(record["predictions"]["probabilities"], expected.predictions,
                               atol=1e-6)
    assert sum(summary.predicted_counts().values()) == 21


# ----------------------------------------------------------------------------- uncertainty

UNCERTAINTY_CASES = [
    # slices: each chunk explains its slices under flips and shifts, as one process does
    ("2d", dict(batch_size=4, chunk=4, uncertainty=("flips", "shifts"))),
    # windows: the chunks' moments see the same windows, weights and order as the engine's
    ("3d", dict(mode="volume", window=(8, 12, 12), batch_size=3, chunk=5,
                uncertainty=("windows",))),
    # windows with a per-window source too: the windows' own variance is pooled
    ("3d", dict(mode="volume", window=(8, 12, 12), batch_size=3, chunk=7,
                uncertainty=("flips",))),
]


def uncertainty_by_chunks(card: Path, volume_path: Path, options: ExplainOptions,
                          folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """Every chunk task with an uncertainty array, run here in reverse order."""
    volume, _ = read_volume(volume_path)
    loaded = get_model(str(card), options.device, False)
    plan = make_plan(loaded, volume.shape, options)
    maps = create_ome_zarr(folder / "chunks.zarr", volume.shape, chunks=plan.chunks)
    spread = create_ome_zarr(folder / "chunks_spread.zarr", volume.shape, chunks=plan.chunks)
    tasks = [ChunkTask(str(volume_path), str(card), str(folder / "chunks.zarr" / "0"), options,
                       plan, a, b, None, str(folder / "chunks_spread.zarr" / "0"))
             for a, b in plan_chunks(volume.shape[plan.axis], plan.chunk)]
    for task in reversed(tasks):
        explain_chunk(task)
    return maps[:], spread[:]


@pytest.mark.parametrize("model, settings", UNCERTAINTY_CASES)
def test_uncertainty_chunks_equal_the_single_process_file(models, tmp_path, model, settings):
    volume = make_volume(tmp_path)
    options = ExplainOptions(device="cpu", domain_check=False, **settings)
    summary = explain_file(volume, models[model], tmp_path / "maps.zarr", options=options)
    assert summary.uncertainty_output == tmp_path / "maps_uncertainty.zarr"
    single, _ = read_volume(tmp_path / "maps.zarr")
    single_spread, info = read_volume(tmp_path / "maps_uncertainty.zarr")
    single_spread = np.asarray(single_spread)
    assert single_spread.max() > 0 and np.count_nonzero(single_spread) > single_spread.size / 4
    expected_sources = list(dict.fromkeys([*settings["uncertainty"],
                                           *(["windows"] if model == "3d" else [])]))
    assert info.metadata["uncertainty"]["sources"] == expected_sources
    maps, spread = uncertainty_by_chunks(models[model], volume, options, tmp_path)
    np.testing.assert_array_equal(maps, np.asarray(single))
    np.testing.assert_array_equal(spread, single_spread)


# ----------------------------------------------------------------------------- on a cluster


@pytest.fixture(scope="module")
def cluster_client():
    distributed = pytest.importorskip("distributed")
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                       dashboard_address=None)
    client = distributed.Client(cluster)
    client.wait_for_workers(2, timeout=60)
    yield client
    client.close()
    cluster.close()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["slices", "volume"])
def test_two_worker_processes_equal_the_single_process_run(models, tmp_path, cluster_client,
                                                           mode):
    volume = make_volume(tmp_path)
    if mode == "slices":
        options = ExplainOptions(batch_size=4, chunk=4, device="cpu", torch_threads=1)
        card = models["2d"]
    else:
        options = ExplainOptions(mode="volume", window=(8, 12, 12), batch_size=4, chunk=5,
                                 device="cpu", torch_threads=1)
        card = models["3d"]
    expected = reference(card, volume, options)
    summary = run_distributed(volume, card, tmp_path / "maps.zarr", options=options,
                              client=cluster_client)
    maps, info = read_volume(tmp_path / "maps.zarr")
    np.testing.assert_array_equal(maps[:], expected.maps)
    np.testing.assert_allclose(summary.predictions, expected.predictions, rtol=1e-6)
    assert summary.positions == list(expected.positions)
    assert summary.provenance["workers_used"] == 2  # both processes did work
    assert info.scale == pytest.approx((1.0, 0.65, 0.65))
    assert [p.name for p in tmp_path.iterdir() if "partial" in p.name] == []


@pytest.mark.slow
def test_workers_write_the_same_uncertainty_and_domain_report(models, tmp_path,
                                                              cluster_client):
    volume = make_volume(tmp_path)
    options = ExplainOptions(mode="volume", window=(8, 12, 12), batch_size=4, chunk=5,
                             device="cpu", torch_threads=1, uncertainty=("windows",))
    explain_file(volume, models["3d"], tmp_path / "single.zarr", options=options)
    summary = run_distributed(volume, models["3d"], tmp_path / "spread.zarr", options=options,
                              client=cluster_client)
    assert summary.uncertainty_output == tmp_path / "spread_uncertainty.zarr"
    for name in ("", "_uncertainty"):
        single, single_info = read_volume(tmp_path / f"single{name}.zarr")
        spread, spread_info = read_volume(tmp_path / f"spread{name}.zarr")
        np.testing.assert_array_equal(spread[:], single[:])
        assert spread_info.metadata["domain_check"] == single_info.metadata["domain_check"]
        # both maps name what the uncertainty map holds, and so does the summary
        assert spread_info.metadata["options"]["uncertainty"]["sources"] == ["windows"]
    assert "(uncertainty: windows)" in summary.describe()
    assert [p.name for p in tmp_path.iterdir() if "partial" in p.name] == []


@pytest.mark.slow
def test_a_worker_killed_mid_run_is_survived(models, tmp_path, cluster_client):
    volume = make_volume(tmp_path, shape=(48, 64, 64), seed=1)
    options = ExplainOptions(batch_size=2, chunk=2, device="cpu", torch_threads=1)
    expected = reference(models["2d"], volume, options)
    killed: list[tuple[str, int, int]] = []

    def kill_a_busy_worker(done: int, total: int) -> None:
        if killed or done >= total:
            return
        busy = {addr: keys for addr, keys in cluster_client.processing().items() if keys}
        if not busy:
            return
        address = next(iter(busy))
        pid = cluster_client.run(os.getpid, workers=[address])[address]
        os.kill(pid, signal.SIGKILL)  # a hard crash, not a clean shutdown
        killed.append((address, pid, len(busy[address])))

    run_distributed(volume, models["2d"], tmp_path / "maps.zarr", options=options,
                    client=cluster_client, progress=kill_a_busy_worker)
    assert killed and killed[0][2] >= 1  # a worker died while it had work in hand
    maps, _ = read_volume(tmp_path / "maps.zarr")
    np.testing.assert_array_equal(maps[:], expected.maps)
    cluster_client.wait_for_workers(2, timeout=60)  # the nanny brings a fresh process back


def test_distributed_input_and_output_checks(models, tmp_path):
    volume = make_volume(tmp_path)
    with pytest.raises(ValueError, match=r"name the output \*\.zarr"):
        run_distributed(volume, models["2d"], tmp_path / "maps.tif", workers=1)
    with pytest.raises(TypeError, match="file path"):
        run_distributed(np.zeros((4, 4, 4)), models["2d"], tmp_path / "m.zarr", workers=1)
    with pytest.raises(ValueError, match="only one of"):
        run_distributed(volume, models["2d"], tmp_path / "m.zarr", workers=1,
                        scheduler_address="tcp://localhost:1")
    assert sorted(p.name for p in tmp_path.iterdir()) == [volume.name]


def test_a_cached_model_is_reloaded_when_its_weights_change(tmp_path):
    from napari_gradcam.core.models import file_sha256
    from napari_gradcam.distributed import clear_model_cache

    card = write_model(tmp_path, 2, "changing")
    first = get_model(str(card), "cpu")
    assert get_model(str(card), "cpu") is first  # cached per process
    old_hash = first.weights_sha256
    state = {k: v + 1.0 if v.is_floating_point() else v
             for k, v in first.model.state_dict().items()}
    save_file(state, str(tmp_path / "changing.safetensors"))  # same card, other weights
    new_hash = file_sha256(tmp_path / "changing.safetensors")
    # A worker that still holds the weights the run started with keeps using them...
    assert get_model(str(card), "cpu", expected_sha256=old_hash) is first
    # ...one asked for the new weights reloads...
    second = get_model(str(card), "cpu", expected_sha256=new_hash)
    assert second is not first and second.weights_sha256 == new_hash
    # ...and a fresh worker that finds other weights than the driver saw refuses to go on.
    clear_model_cache()
    with pytest.raises(ValueError, match="changed during the run"):
        get_model(str(card), "cpu", expected_sha256=old_hash)


def test_chunks_of_a_5d_ome_zarr_input_equal_the_engine(models, tmp_path):
    import zarr

    scan = read_volume(make_volume(tmp_path))[0]
    group = zarr.open_group(str(tmp_path / "tczyx.zarr"), mode="w", zarr_format=2)
    array = group.create_array("0", shape=(1, 1, *scan.shape), dtype=scan.dtype,
                               chunks=(1, 1, 5, 24, 26))
    array[:] = scan[None, None]
    group.attrs["multiscales"] = [{"version": "0.4", "axes": [
        {"name": "t", "type": "time"}, {"name": "c", "type": "channel"},
        *({"name": n, "type": "space", "unit": "micrometer"} for n in "zyx")],
        "datasets": [{"path": "0", "coordinateTransformations": [
            {"type": "scale", "scale": [1, 1, 1.0, 0.65, 0.65]}]}]}]
    options = ExplainOptions(batch_size=4, chunk=8, device="cpu")
    expected = reference(models["2d"], tmp_path / "tczyx.zarr", options)
    maps, _ = run_chunks_here(models["2d"], tmp_path / "tczyx.zarr", options, tmp_path)
    np.testing.assert_array_equal(maps, expected.maps)
    assert expected.maps.shape == scan.shape and expected.maps.max() > 0
