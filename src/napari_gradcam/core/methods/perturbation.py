"""Gradient-free CAMs that weigh channels by running the model again: Score-CAM, Ablation-CAM.

Both capture the layer's activations ``A`` (N, C, *s) in one forward pass, then evaluate the
model on ``N × C`` perturbed inputs, ``batch_size`` at a time, mixing samples and channels in a
batch so small models keep the device busy. Every row is scored against its own sample's
target: the class fixed on the clean input (:mod:`napari_gradcam.core.scoring`), so a class
that flips as the input is perturbed does not change what is explained. ``target="all"``
reads every class from the same perturbed outputs, at no extra cost.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from napari_gradcam.core.device import autocast_context
from napari_gradcam.core.engine import ForwardBackward, LayerSpec, preserved_model_state
from napari_gradcam.core.methods.base import (
    EPS,
    BaseCAM,
    check_positive_int,
    upsample,
    weighted_sum,
)
from napari_gradcam.core.outputs import select_output
from napari_gradcam.core.scoring import (
    ScoreKind,
    all_class_scores,
    batch_ranges,
    resolve_on_clean_output,
    target_scores,
)
from napari_gradcam.core.targets import AllClasses, Target

ScoreCAMWeights = Literal["softmax", "increase", "raw"]


class BatchMonitor(Protocol):
    """What a caller may pass to follow and stop the batches (``attribution.score_cam`` does)."""

    def start(self, total: int) -> None: ...

    def check(self) -> None: ...

    def advance(self, count: int) -> None: ...


class _RowScores:
    """The explained score(s) of every row of a perturbed batch: ``(K', B)``, K' = 1, or the
    number of classes for ``target="all"``."""

    def __init__(self, target: Target, x: torch.Tensor, clean_output: torch.Tensor,
                 kind: ScoreKind) -> None:
        self.all = isinstance(target, AllClasses)
        self.kind = kind
        self.resolved = None if self.all else resolve_on_clean_output(target, x, clean_output)

    def __call__(self, output: torch.Tensor, samples: np.ndarray) -> torch.Tensor:
        output = output.float()
        if self.resolved is None:
            return all_class_scores(output, self.kind).T
        return target_scores(output, samples, self.resolved, self.kind).unsqueeze(0)


class _PerturbationCAM(BaseCAM):
    """Options shared by the gradient-free, perturbation-based CAMs (besides BaseCAM's).

    ``batch_size``: perturbed inputs per forward pass (memory: that many copies of one input).
    ``score``: ``"logit"`` (the target logit; dense outputs summed over pixels) or
    ``"probability"`` (its softmax; averaged over pixels). ``monitor``: an object with
    ``start(total)``, ``check()`` and ``advance(count)`` called around the batches, to report
    progress and to stop (by raising from ``check``) between batches.
    """

    needs_gradients = False

    def __init__(self, model: nn.Module, layer: LayerSpec, *, batch_size: int = 32,
                 score: ScoreKind = "logit", monitor: BatchMonitor | None = None,
                 **options: object) -> None:
        super().__init__(model, layer, **options)  # type: ignore[arg-type]
        if score not in ("logit", "probability"):
            raise ValueError(f"score must be 'logit' or 'probability', got {score!r}")
        self.batch_size = check_positive_int(batch_size, "batch_size")
        self.score = score
        self.monitor = monitor

    def _run(self, inputs: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), autocast_context(self.device, self.amp):
            output = self.model(inputs)
        return select_output(output, self.output)  # a tuple or dict: the tensor asked for

    def _batches(self, total: int) -> list[tuple[int, int]]:
        return list(batch_ranges(total, self.batch_size))

    def _check(self) -> None:
        if self.monitor is not None:
            self.monitor.check()

    def _advance(self, count: int) -> None:
        if self.monitor is not None:
            self.monitor.advance(count)


class ScoreCAM(_PerturbationCAM):
    r"""Score-CAM (Wang et al. 2020): each channel weighted by the score of the input it reveals.

    For channel k of the layer, ``H_k`` is its activation upsampled to the input and min-max
    scaled to [0, 1]; the model scores the masked input ``x ⊙ H_k``: ``s_k = f(x ⊙ H_k)`` (the
    target logit by default, or its softmax probability with ``score="probability"``). The map
    is ``ReLU(Σ_k w_k A_k)`` at the layer's resolution, then upsampled like every CAM here.
    Three weightings are in use, and they are not the same method:

    * ``weights="softmax"`` (default; the paper's Algorithm 1, and pytorch-grad-cam):
      ``w_k = exp(s_k - s_b) / Σ_j exp(s_j - s_b) = softmax_k(s_k)``. The baseline score
      ``s_b = f(x_b)`` cancels in the softmax, so it is never computed. The weights are positive
      and sum to 1: after a ReLU layer the map is a convex combination of non-negative
      activations and never vanishes unless the layer is silent.
    * ``weights="increase"`` (the paper's "increase of confidence" as the weight):
      ``w_k = s_k - f(0)``, baseline the all-zero input. When most masked inputs score below
      the blank image the weighted sum is negative everywhere and the ReLU leaves nothing:
      with ``score="probability"`` (this package's former default) 8 of 24 maps were all
      zero on the small untrained nets of the tests (8 of 48 over six seeds).
    * ``weights="raw"`` (the authors' released code): ``w_k = s_k``, probabilities, no baseline,
      no channel softmax.

    Channels that are constant over space carry no spatial information and get weight 0 (the
    softmax runs over the others). ``score=None`` means "logit" for the softmax and
    "probability" for the other two, as their sources use. Gradient-free; costs ``N × C``
    forward passes (plus ``N`` for the baseline), ``batch_size`` masked copies at a time.
    """

    name = "scorecam"
    title = "Score-CAM"
    reference = "Wang et al. 2020"
    cost = "1 + C forward passes (C: channels of the layer)"

    def __init__(self, model: nn.Module, layer: LayerSpec, *,
                 weights: ScoreCAMWeights = "softmax", score: ScoreKind | None = None,
                 **options: object) -> None:
        if weights not in ("softmax", "increase", "raw"):
            raise ValueError(f"Score-CAM weights must be 'softmax', 'increase' or 'raw', got "
                             f"{weights!r}")
        if score is None:
            score = "logit" if weights == "softmax" else "probability"
        super().__init__(model, layer, score=score, **options)  # type: ignore[arg-type]
        self.weights = weights

    def layer_maps(self, tensor: torch.Tensor, target: Target,
                   passes: ForwardBackward) -> list[torch.Tensor]:
        x = tensor.to(self.device)
        scores = _RowScores(target, x, passes.outputs, self.score)
        count = x.shape[0]
        total = sum(count * layer.activations.shape[1] for layer in passes.layers)
        total += count if self.weights == "increase" else 0
        if self.monitor is not None:
            self.monitor.start(total)
        with preserved_model_state(self.model):
            baseline = self._baseline_scores(x, scores) if self.weights == "increase" else None
            return [self._layer_map(x, layer.activations, scores, baseline)
                    for layer in passes.layers]

    def _baseline_scores(self, x: torch.Tensor, scores: _RowScores) -> torch.Tensor:
        parts = []
        for start, stop in self._batches(x.shape[0]):
            self._check()
            output = self._run(torch.zeros_like(x[start:stop]))
            parts.append(scores(output, np.arange(start, stop)))
            self._advance(stop - start)
        return torch.cat(parts, dim=1)  # (K', N)

    def _layer_map(self, x: torch.Tensor, activations: torch.Tensor, scores: _RowScores,
                   baseline: torch.Tensor | None) -> torch.Tensor:
        count, channels = activations.shape[:2]
        spatial = tuple(x.shape[2:])
        flat = activations.flatten(2)
        low, high = flat.amin(dim=2), flat.amax(dim=2)
        informative = high > low  # (N, C)
        channel_scores: torch.Tensor | None = None
        shape = (-1,) + (1,) * (x.ndim - 1)
        for start, stop in self._batches(count * channels):
            self._check()
            items = np.arange(start, stop)
            samples, kept = items // channels, items % channels
            sample_index = torch.as_tensor(samples, device=x.device)
            channel_index = torch.as_tensor(kept, device=x.device)
            masks = upsample(activations[sample_index, channel_index].unsqueeze(1), spatial)
            span = (high - low)[sample_index, channel_index].clamp_min(EPS)
            masks = (masks - low[sample_index, channel_index].view(shape)) / span.view(shape)
            batch_scores = scores(self._run(x[sample_index] * masks.to(x.dtype)), samples)
            if channel_scores is None:
                channel_scores = torch.zeros((batch_scores.shape[0], count, channels),
                                             device=x.device)
            channel_scores[:, sample_index, channel_index] = batch_scores.float()
            self._advance(stop - start)
        assert channel_scores is not None
        if self.weights == "softmax":
            masked = channel_scores.masked_fill(~informative, float("-inf"))
            weights = torch.softmax(masked, dim=-1).nan_to_num(0.0)  # all constant: 0
        else:
            if baseline is not None:
                channel_scores = channel_scores - baseline.float().unsqueeze(-1)
            weights = channel_scores * informative
        return F.relu(weighted_sum(weights, activations))


class AblationCAM(_PerturbationCAM):
    r"""Ablation-CAM (Desai & Ramaswamy 2020): a channel's weight is the score lost without it.

    ``w_k = (y - y_k) / y``, with ``y`` the target score and ``y_k`` the score when channel k of
    the layer is set to zero (ablated) and the rest of the network runs on; the map is
    ``ReLU(Σ_k w_k A_k)``. Dividing by ``y`` makes the weights relative (a constant per sample,
    so it changes the scale of the map, not its shape, while ``y > 0``; for ``y < 0`` it flips
    every weight, as the paper's formula does). pytorch-grad-cam instead sets the channel to a
    large negative value so that a following ReLU zeroes it; here "ablated" means zero, as in
    the paper. Gradient-free; costs ``N × C`` forward passes, ``batch_size`` at a time.
    The layer must run exactly once per forward pass (a reused module would be ablated at
    every use).
    """

    name = "ablationcam"
    title = "Ablation-CAM"
    reference = "Desai & Ramaswamy 2020"
    cost = "1 + C forward passes (C: channels of the layer)"

    def layer_maps(self, tensor: torch.Tensor, target: Target,
                   passes: ForwardBackward) -> list[torch.Tensor]:
        x = tensor.to(self.device)
        scores = _RowScores(target, x, passes.outputs, self.score)
        clean = scores(passes.outputs, np.arange(x.shape[0])).float()  # (K', N)
        if self.monitor is not None:
            self.monitor.start(sum(x.shape[0] * layer.activations.shape[1]
                                   for layer in passes.layers))
        with preserved_model_state(self.model):
            return [self._layer_map(x, module, layer.activations, scores, clean)
                    for (_, module), layer in zip(self.layers, passes.layers, strict=True)]

    def _layer_map(self, x: torch.Tensor, module: nn.Module, activations: torch.Tensor,
                   scores: _RowScores, clean: torch.Tensor) -> torch.Tensor:
        count, channels = activations.shape[:2]
        ablated: torch.Tensor | None = None
        for start, stop in self._batches(count * channels):
            self._check()
            items = np.arange(start, stop)
            samples, kept = items // channels, items % channels
            sample_index = torch.as_tensor(samples, device=x.device)
            expected = (stop - start, *activations.shape[1:])
            handle = module.register_forward_hook(_ablation_hook(kept, module, expected))
            try:
                output = self._run(x[sample_index])
            finally:
                handle.remove()
            batch_scores = scores(output, samples).float()
            if ablated is None:
                ablated = torch.zeros((batch_scores.shape[0], count, channels), device=x.device)
            ablated[:, sample_index, torch.as_tensor(kept, device=x.device)] = batch_scores
            self._advance(stop - start)
        assert ablated is not None
        safe = torch.where(clean.abs() > EPS, clean, torch.full_like(clean, EPS))
        weights = (clean.unsqueeze(-1) - ablated) / safe.unsqueeze(-1)
        return F.relu(weighted_sum(weights, activations))


def _ablation_hook(channels: np.ndarray, module: nn.Module, expected: tuple[int, ...]
                   ) -> Callable[..., torch.Tensor]:
    """A forward hook that zeroes channel ``channels[i]`` of row i of the layer's output,
    which must be the channels-first feature map ``expected`` (B, C, *spatial)."""
    calls = 0

    def hook(_module: nn.Module, _inputs: object, output: object) -> torch.Tensor:
        nonlocal calls
        calls += 1
        if calls > 1:
            raise ValueError("Ablation-CAM needs a layer that runs exactly once per forward "
                             f"pass; {type(module).__name__} runs more often (a reused module)")
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"the layer returns a {type(output).__name__}, not a feature map")
        if tuple(output.shape) != tuple(expected):
            raise ValueError(f"Ablation-CAM zeroes channels of a feature map (N, C, *spatial); "
                             f"this layer outputs {tuple(output.shape)} (tokens or channels-"
                             "last?). Use Score-CAM or Grad-CAM for it")
        ablated = output.clone()
        rows = torch.arange(len(channels), device=output.device)
        ablated[rows, torch.as_tensor(channels, device=output.device)] = 0
        return ablated

    return hook
