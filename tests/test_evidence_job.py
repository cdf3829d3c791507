"""The evidence job's protocol: a generator of (done, total, stage), cancel by closing it, and
out-of-memory back-off, on small real models (no mocks: the "out of memory" comes from a real
module that raises torch.OutOfMemoryError for batches larger than it can take)."""

from __future__ import annotations

import itertools
import threading
import time
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from napari_gradcam.core.volume import Cancelled, run_job
from napari_gradcam.evidence import (
    CHECK_TITLES,
    CHECKS,
    DEFAULT_CHECKS,
    REGISTRY,
    EvidenceError,
    EvidenceSettings,
    evidence_job,
    run_evidence,
)
from napari_gradcam.evidence.running import run_in_thread

SETTINGS = EvidenceSettings(steps=10, n_random=2, smoothgrad_samples=4, ig_steps=4,
                            region_null_samples=4, batch_size=16)
THREAD = "napari-gradcam-evidence-check"


class SmallNet(nn.Module):
    """Two convolutions, global pooling and a linear head; counts its forward passes."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
        self.calls = 0
        self.largest_batch = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.largest_batch = max(self.largest_batch, int(x.shape[0]))
        return self.head(self.features(x))


class FitsOnly(SmallNet):
    """SmallNet on a device that holds at most ``limit`` samples at once: larger batches raise
    torch.OutOfMemoryError, exactly as a full GPU does."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.refused: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > self.limit:
            self.refused.append(int(x.shape[0]))
            raise torch.OutOfMemoryError(
                f"CUDA out of memory. Tried to allocate a batch of {x.shape[0]}")
        return super().forward(x)


def sample() -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(0).random((1, 1, 16, 16)).astype(np.float32))


def drain(job):
    items = []
    try:
        while True:
            items.append(next(job))
    except StopIteration as finished:
        return items, finished.value


def check_threads_alive() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == THREAD]


def test_the_registry_declares_title_and_cost_for_every_check() -> None:
    assert tuple(REGISTRY) == CHECKS and set(DEFAULT_CHECKS) < set(CHECKS)
    for name, check in REGISTRY.items():
        assert CHECK_TITLES[name] == check.title and check.title
    assert REGISTRY["region"].needs_region and not REGISTRY["region"].default
    assert not REGISTRY["score_cam"].default  # one forward pass per channel: opt-in


def test_progress_is_per_batch_monotone_and_reaches_the_total() -> None:
    model = SmallNet().eval()
    job = evidence_job(model, sample(), layer="features.2", target=1,
                       checks=("deletion", "randomisation", "saliency"), settings=SETTINGS)
    items, report = drain(job)
    dones = [done for done, _, _ in items]
    totals = {total for _, total, _ in items}
    assert len(totals) == 1
    total = totals.pop()
    assert dones == sorted(dones) and dones[0] == 0
    assert items[-1] == (total, total, "done")
    assert all(a != b for a, b in itertools.pairwise(items))  # never the same twice
    # the deletion curve: (1 + n_random) orders x (steps + 1) points = 33 forward passes in
    # batches of 16: several items inside the check, not one per check
    assert sum(1 for *_, stage in items if stage == "deletion") >= 3
    # the total is the registry's cost: the map (2) + each check's declared cost
    context = _context(model)
    assert total == 2 + 33 + sum(REGISTRY[name].cost(context)
                                 for name in ("randomisation", "saliency"))
    assert report.deletion is not None and not check_threads_alive()


def _context(model: nn.Module):
    from napari_gradcam.evidence.checks import CheckContext

    return CheckContext(model=model, inputs=sample(), layer="features.2", target=1,
                        settings=SETTINGS, mask=None, cam=None, explain=lambda *a: None)


def test_closing_the_job_stops_the_running_check_and_restores_the_model() -> None:
    model = SmallNet()
    model.train()  # a state the job must restore
    settings = EvidenceSettings(steps=200, n_random=10, batch_size=4)
    job = evidence_job(model, sample(), layer="features.2", target=1, checks=("deletion",),
                       settings=settings)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "the model is in training mode"
        seen = []
        for item in job:
            seen.append(item)
            if sum(1 for *_, stage in seen if stage == "deletion") > 3:
                break
        job.close()
    calls = model.calls
    assert not check_threads_alive()  # the check's thread was stopped and joined
    time.sleep(0.2)
    assert model.calls == calls  # nothing runs after the close
    full = (1 + 10) * (200 + 1)
    assert calls < full / 2  # stopped inside the deletion check, far from its end
    assert model.training and all(p.requires_grad for p in model.parameters())
    assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())


def test_run_job_cancels_through_should_stop() -> None:
    model = SmallNet().eval()
    seen: list[tuple[int, int, str]] = []
    job = evidence_job(model, sample(), layer="features.2", target=1, checks=("deletion",),
                       settings=EvidenceSettings(steps=100, n_random=5, batch_size=4))
    with pytest.raises(Cancelled):
        run_job(job, lambda *item: seen.append(item), lambda: len(seen) > 4)
    assert not check_threads_alive() and seen[-1][2] == "deletion"


def test_out_of_memory_halves_the_batch_and_gives_the_same_numbers() -> None:
    limited = FitsOnly(limit=4).eval()
    with pytest.warns(RuntimeWarning, match="retrying with batch size") as record:
        report = run_evidence(limited, sample(), layer="features.2", target=1,
                              checks=("deletion", "saliency"), settings=SETTINGS)
    retries = [str(w.message) for w in record if "retrying" in str(w.message)]
    assert any("batch size 8" in text for text in retries)
    assert any("batch size 4" in text for text in retries)
    assert 16 in limited.refused and 8 in limited.refused and limited.largest_batch <= 4
    assert report.settings.batch_size == 4  # later checks kept the batch that fits
    assert report.provenance["options"]["settings"]["batch_size"] == 4
    # the numbers do not depend on the batch: the same run where 4 was asked for
    plain = SmallNet().eval()
    plain.load_state_dict(limited.state_dict())
    direct = run_evidence(plain, sample(), layer="features.2", target=1,
                          checks=("deletion", "saliency"),
                          settings=EvidenceSettings(**{**SETTINGS.to_dict(), "batch_size": 4}))
    np.testing.assert_allclose(report.deletion.scores, direct.deletion.scores, rtol=1e-5)
    np.testing.assert_allclose(report.maps["saliency"], direct.maps["saliency"], rtol=1e-5)


def test_out_of_memory_for_a_batch_of_one_is_an_error_with_advice() -> None:
    from napari_gradcam.evidence.running import with_oom_backoff

    sizes: list[int] = []

    def never_fits(settings: EvidenceSettings):
        sizes.append(settings.batch_size)
        raise torch.OutOfMemoryError("CUDA out of memory")
        yield  # a generator, like a check

    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        with pytest.raises(EvidenceError, match="out of memory in Deletion even for a batch"):
            drain(with_oom_backoff(never_fits, SETTINGS, "Deletion", torch.device("cpu")))
    assert sizes == [16, 8, 4, 2, 1]

    def other_error(settings: EvidenceSettings):
        raise RuntimeError("shapes do not match")
        yield

    with pytest.raises(RuntimeError, match="shapes"):  # not memory: no retry
        drain(with_oom_backoff(other_error, SETTINGS, "Deletion", torch.device("cpu")))


def test_run_in_thread_returns_the_result_and_raises_the_error() -> None:
    def counts(progress, should_stop):
        for i in range(3):
            progress(i + 1, 3)
        return "result"

    items, value = drain(run_in_thread(counts))
    assert items == [(1, 3), (2, 3), (3, 3)] and value == "result"

    def fails(progress, should_stop):
        progress(1, 2)
        raise ValueError("bad input")

    job = run_in_thread(fails)
    assert next(job) == (1, 2)
    with pytest.raises(ValueError, match="bad input"):
        next(job)
    assert not check_threads_alive()


def test_a_region_null_too_small_to_reach_alpha_is_said() -> None:
    """With n random regions the smallest p-value is 1/(n+1): at alpha 0.05 a null of 10 can
    never let the region test pass, and the settings say so (a null of 19 can)."""
    from napari_gradcam.evidence import EvidenceSettings

    with pytest.warns(RuntimeWarning, match="can never pass.*at least 19"):
        EvidenceSettings(region_null_samples=10, region_alpha=0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        EvidenceSettings(region_null_samples=19, region_alpha=0.05)
        EvidenceSettings(region_null_samples=0)  # no null test at all: nothing to say
