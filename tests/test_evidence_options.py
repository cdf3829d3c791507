"""The evidence job's options and costs: run_evidence passes the job's own arguments on, the
old import address re-exports the package's names, and Score-CAM's cost is the target layer's
channel count (small real models, counted forward passes)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import napari_gradcam.evidence as evidence
from napari_gradcam.evidence import (
    REGISTRY,
    EvidenceSettings,
    estimate_evidence,
    evidence_job,
    run_evidence,
)
from napari_gradcam.evidence.checks import CheckContext

SETTINGS = EvidenceSettings(steps=4, n_random=1, batch_size=8)


class CountingNet(nn.Module):
    """A small classifier whose target layer ``features.2`` has ``channels`` channels; counts
    the samples it is run on (a batch of 8 counts 8)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(3, channels, 3, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 2))
        self.samples = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.samples += int(x.shape[0])
        return self.head(self.features(x))


def sample() -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(0).random((1, 1, 12, 12)).astype(np.float32))


@pytest.mark.parametrize("channels", [5, 11])
def test_score_cam_costs_one_pass_per_channel_of_the_target_layer(channels: int) -> None:
    model = CountingNet(channels).eval()
    estimate = estimate_evidence(model, sample(), layer="features.2", checks=("score_cam",),
                                 settings=SETTINGS)
    assert estimate.per_check["score_cam"] == 1 + channels
    # and that is what the check really runs: one pass to record the layer, one per channel
    context = CheckContext(model=model, inputs=sample(), layer="features.2", target=1,
                           settings=SETTINGS, mask=None, cam=None, explain=lambda *a: None)
    model.samples = 0
    scores = REGISTRY["score_cam"].run(context, lambda done, total: None, lambda: False)
    assert model.samples == REGISTRY["score_cam"].cost(context) == 1 + channels
    assert np.asarray(scores).shape[-2:] == (12, 12)


def test_the_job_total_counts_score_cam_by_the_models_channels() -> None:
    totals = {}
    for channels in (5, 11):
        job = evidence_job(CountingNet(channels).eval(), sample(), layer="features.2",
                           target=0, checks=("saliency", "score_cam"), settings=SETTINGS)
        totals[channels] = next(job)[1]
        job.close()
    assert totals[11] - totals[5] == 11 - 5


def test_run_evidence_passes_the_jobs_options_on_and_refuses_a_misspelt_one(tmp_path) -> None:
    model = CountingNet(4).eval()
    seen: list[tuple[int, int, str]] = []
    report = run_evidence(model, sample(), layer="features.2", target=1, checks=("saliency",),
                          settings=SETTINGS, source="a test image", export_folder=tmp_path / "r",
                          progress=lambda *item: seen.append(item))
    assert report.layer == "features.2" and report.target_index == 1
    assert report.checks == ("saliency",) and report.settings == SETTINGS
    assert report.provenance["source"] == "a test image"
    assert seen[-1][2] == "done" and (tmp_path / "r").is_dir()
    with pytest.raises(TypeError, match="layr"):
        run_evidence(model, sample(), layr="features.2")
    # the estimate takes the very same options (those that do not change the cost included)
    options = {"layer": "features.2", "target": 1, "checks": ("saliency",),
               "settings": SETTINGS, "source": "a test image"}
    estimate = estimate_evidence(model, sample(), samples=3, **options)
    assert estimate.per_check == {"map": 2, "saliency": 2} and estimate.samples == 3
    with pytest.raises(TypeError, match="chekcs"):
        estimate_evidence(model, sample(), chekcs=("saliency",))


def test_the_old_evidence_report_address_still_exports_every_name() -> None:
    import napari_gradcam.evidence_report as old

    assert set(evidence.__all__) <= set(old.__all__)
    for name in old.__all__:
        assert hasattr(old, name), name
    for name in evidence.__all__:
        assert getattr(old, name) is getattr(evidence, name)
    from napari_gradcam.evidence_report import (  # the README's and scripts' spelling
        EvidenceReport,
        ProgressCallback,
    )
    from napari_gradcam.evidence_report import (
        run_evidence as old_run_evidence,
    )

    assert old_run_evidence is run_evidence and EvidenceReport is evidence.EvidenceReport
    assert ProgressCallback is not None
