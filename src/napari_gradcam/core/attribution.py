"""Input-space attributions to set beside Grad-CAM: gradients, SmoothGrad, IG, occlusion, Score-CAM.

Grad-CAM answers "where in the last feature map"; these answer the same question in other ways,
and a map that several methods agree on is more believable than one method's map (see
``napari_gradcam.core.evidence.agreement``). All of them:

* take ``x`` as ``(N, C, *spatial)`` with 1, 2 or 3 spatial dims (spectra, micrographs, CT
  patches), as a torch tensor or a numpy array, and return float32 numpy arrays;
* take ``target`` as the engine does (:mod:`napari_gradcam.core.targets`): a class index, one
  index per sample, ``None``/``"predicted"`` (the arg-max class of each clean sample), a
  ``SegmentationRegion`` or a callable ``output -> (N,)`` score, so segmentation and
  regression models can be explained through any scalar of their output (``"all"`` is not
  supported: these methods explain one score at a time);
* leave the model exactly as found: train/eval mode of every submodule, ``requires_grad`` of
  every parameter, and no hooks, also when an exception is raised (everything runs inside
  :func:`~napari_gradcam.core.engine.preserved_model_state`, which warns once when a
  model in training mode is explained in eval mode);
* bound their cost: methods that need many forward passes run them in batches of
  ``batch_size``, report ``progress(done, total)`` after each batch and call ``should_stop()``
  before each batch, raising :class:`Cancelled` when it returns True.

The shared machinery (input checking, target scoring, the model guard, progress) lives here and
is reused by ``evidence``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn

from napari_gradcam.core.engine import (
    check_input,
    model_dtype_device,
    preserved_model_state,
    resolve_layers,
)
from napari_gradcam.core.methods import upsample
from napari_gradcam.core.targets import (
    AllClasses,
    ClassTarget,
    PredictedClass,
    SegmentationRegion,
    TargetSpec,
    resolve_target,
)
from napari_gradcam.core.volume import Cancelled, window_starts

__all__ = [
    "Cancelled",
    "completeness_residual",
    "integrated_gradients",
    "occlusion",
    "saliency",
    "score_cam",
    "smoothgrad",
]

ProgressCallback = Callable[[int, int], None]
StopCallback = Callable[[], bool]
ScoreKind = Literal["logit", "probability"]


# --------------------------------------------------------------------------------------------
# Shared machinery (also used by napari_gradcam.core.evidence)
# --------------------------------------------------------------------------------------------


def check_model(model: object) -> nn.Module:
    """Return ``model`` if it is a torch module, otherwise raise a TypeError that says so."""
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"model must be a torch.nn.Module, got {type(model).__name__}; load the network "
            "first (e.g. with a model card) and pass the module itself"
        )
    return model


def as_input_tensor(x: object, model: nn.Module) -> torch.Tensor:
    """The engine's input checks (shape, dims and channels against the model, finiteness),
    then a detached copy in the model's dtype on the model's device."""
    tensor = check_input(x, model).detach()
    dtype, device = model_dtype_device(model)
    return tensor.to(device=device, dtype=dtype)


def check_batch_size(batch_size: int) -> int:
    """``batch_size`` as an int >= 1: it bounds the memory of every batched method."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)):
        raise TypeError(f"batch_size must be a positive integer, got {batch_size!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    return int(batch_size)


class ProgressTracker:
    """Counts forward passes, reports them and honours a stop request between batches."""

    def __init__(
        self,
        total: int,
        progress: ProgressCallback | None = None,
        should_stop: StopCallback | None = None,
        what: str = "forward passes",
    ) -> None:
        self.total = int(total)
        self.done = 0
        self.progress = progress
        self.should_stop = should_stop
        self.what = what

    def check(self) -> None:
        """Raise :class:`Cancelled` if the caller asked to stop."""
        if self.should_stop is not None and self.should_stop():
            raise Cancelled(f"stopped on request after {self.done} of {self.total} {self.what}")

    def advance(self, count: int) -> None:
        """Record ``count`` more units of work done and tell the caller."""
        self.done += int(count)
        if self.progress is not None:
            self.progress(self.done, self.total)


def batch_ranges(total: int, batch_size: int) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` pairs that cover ``range(total)`` in chunks of ``batch_size``."""
    for start in range(0, total, batch_size):
        yield start, min(start + batch_size, total)


@dataclass(frozen=True)
class ResolvedTarget:
    """What to score: one class index per sample, or a function of the model output.

    ``indices`` is set for class targets (a fixed class, one per sample, or the predicted
    class of the clean input); ``function`` for everything else (``SegmentationRegion``, a
    callable, any custom :class:`~napari_gradcam.core.targets.Target`). Batches of perturbed
    copies mix rows of different samples, so scoring always goes through the sample index of
    each row (:meth:`rows`); a function target must therefore score each row on its own, and a
    ``SegmentationRegion`` with one mask per sample gets the masks of the batch's rows.
    """

    indices: np.ndarray | None
    function: Callable[[torch.Tensor], torch.Tensor] | None
    description: str = ""
    per_sample_region: SegmentationRegion | None = None

    def rows(self, sample_indices: np.ndarray | Sequence[int]) -> np.ndarray:
        """The sample index of each row of a batch (what :func:`target_scores` needs)."""
        return np.asarray(sample_indices, dtype=np.int64).reshape(-1)

    def function_for(self, samples: np.ndarray) -> Callable[[torch.Tensor], torch.Tensor]:
        """The score function for a batch whose rows come from ``samples``."""
        assert self.function is not None
        region = self.per_sample_region
        if region is None:
            return self.function
        mask = region.mask
        picked = mask[torch.as_tensor(samples)] if isinstance(mask, torch.Tensor) else np.asarray(
            mask
        )[samples]
        return SegmentationRegion(region.class_index, picked).score


def forward(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """``model(inputs)``, insisting on a tensor output (the scores are taken from it)."""
    output = model(inputs)
    if not isinstance(output, torch.Tensor):
        raise TypeError(
            f"the model returned {type(output).__name__}, expected a tensor; wrap the model so "
            "that it returns its logits (or pass a callable target that picks the score)"
        )
    return output


def forward_in_batches(model: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Model outputs for ``x`` (no gradients), computed ``batch_size`` samples at a time."""
    outputs = []
    with torch.no_grad():
        for start, stop in batch_ranges(x.shape[0], batch_size):
            outputs.append(forward(model, x[start:stop]))
    return torch.cat(outputs, dim=0)


def resolve_scorer(
    model: nn.Module, x: torch.Tensor, target: TargetSpec, batch_size: int = 16
) -> ResolvedTarget:
    """Turn the user's ``target`` into per-sample class indices or a score function.

    Accepts everything the engine accepts except ``"all"`` (perturbation methods explain one
    score at a time). Class targets are checked against one gradient-free forward pass of the
    clean input; for ``None``/``"predicted"`` that pass also fixes the class, so every later
    perturbation is scored against the class the model chose for the unperturbed sample, not
    against a class that changes as the input is destroyed.
    """
    spec = resolve_target(target)
    if isinstance(spec, AllClasses):
        raise ValueError(
            "target 'all' is not supported by attribution and evidence functions; call once "
            "per class with target=<class index>"
        )
    if isinstance(spec, (ClassTarget, PredictedClass)):
        indices = spec.class_indices(forward_in_batches(model, x, batch_size))
        return ResolvedTarget(np.asarray(indices, dtype=np.int64), None, spec.describe())
    per_sample = None
    # A mask (N, *spatial) holds one mask per sample; (*spatial) is shared by all.
    if isinstance(spec, SegmentationRegion) and np.ndim(spec.mask) == x.ndim - 1:
        if spec.mask.shape[0] != x.shape[0]:
            raise ValueError(
                f"the region has {spec.mask.shape[0]} masks but the input has {x.shape[0]} "
                "samples; give one mask per sample or one mask for all"
            )
        per_sample = spec
    return ResolvedTarget(None, spec.score, spec.describe(), per_sample)


def target_scores(
    output: torch.Tensor,
    rows: np.ndarray,
    target: ResolvedTarget,
    kind: ScoreKind = "logit",
) -> torch.Tensor:
    """One score per row of ``output``: the target logit or probability, or the function's value.

    ``rows`` holds the sample index of each row (from :meth:`ResolvedTarget.rows`).

    * classifier output ``(B, K)``: the logit of the row's class, or its softmax probability;
    * dense output ``(B, K, *spatial)`` (segmentation): the class logits summed over all pixels
      (as the engine does), or the class probability averaged over pixels;
    * a function target (``SegmentationRegion``, a callable): its value unchanged; ``kind``
      does not apply.
    """
    if kind not in ("logit", "probability"):
        raise ValueError(f"score must be 'logit' or 'probability', got {kind!r}")
    batch = output.shape[0]
    samples = target.rows(rows)
    if target.function is not None:
        scores = target.function_for(samples)(output)
        if not isinstance(scores, torch.Tensor) or tuple(scores.shape) != (batch,):
            shape = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores)
            raise ValueError(
                f"the target must give one score per sample, shape ({batch},), got {shape}"
            )
        return scores
    assert target.indices is not None and output.ndim >= 2  # checked on the clean output
    index = torch.as_tensor(target.indices[samples], device=output.device, dtype=torch.long)
    picked = output if kind == "logit" else torch.softmax(output, dim=1)
    picked = picked[torch.arange(batch, device=output.device), index]
    if picked.ndim == 1:
        return picked
    picked = picked.flatten(1)
    return picked.sum(dim=1) if kind == "logit" else picked.mean(dim=1)


def _input_gradients(
    model: nn.Module,
    inputs: torch.Tensor,
    rows: np.ndarray,
    target: ResolvedTarget,
    kind: ScoreKind,
) -> tuple[torch.Tensor, torch.Tensor]:
    """d score / d input for every row (rows are independent in eval mode), and the scores."""
    with torch.enable_grad():
        inputs = inputs.detach().requires_grad_(True)
        scores = target_scores(forward(model, inputs), rows, target, kind)
        if not scores.requires_grad:
            raise ValueError(
                "the target score does not depend on the input through autograd; check that "
                "the model (or the callable target) does not detach its output"
            )
        (gradient,) = torch.autograd.grad(scores.sum(), inputs)
    return gradient, scores.detach()


def _reduce(values: torch.Tensor, reduce_channels: bool, how: Literal["max", "sum"]) -> np.ndarray:
    if reduce_channels:
        values = values.amax(dim=1) if how == "max" else values.sum(dim=1)
    return values.detach().cpu().numpy().astype(np.float32, copy=False)


# --------------------------------------------------------------------------------------------
# Gradient methods
# --------------------------------------------------------------------------------------------


def saliency(
    model: nn.Module,
    x: torch.Tensor | np.ndarray,
    target: TargetSpec = None,
    *,
    reduce_channels: bool = True,
    absolute: bool = True,
    score: ScoreKind = "logit",
    batch_size: int = 16,
    progress: ProgressCallback | None = None,
    should_stop: StopCallback | None = None,
) -> np.ndarray:
    """Vanilla gradient saliency (Simonyan et al. 2014): ``|d score / d x|``.

    Returns ``(N, *spatial)``: the absolute gradient, maximum over input channels (a pixel is
    salient if any of its channels is), or ``(N, C, *spatial)`` with ``reduce_channels=False``.
    ``absolute=False`` keeps the sign (then reduce_channels sums the channels, so the map stays
    a linear first-order approximation of the score change).
    """
    model = check_model(model)
    batch_size = check_batch_size(batch_size)
    with preserved_model_state(model):
        inputs = as_input_tensor(x, model)
        resolved = resolve_scorer(model, inputs, target, batch_size)
        tracker = ProgressTracker(inputs.shape[0], progress, should_stop, "samples")
        maps = []
        for start, stop in batch_ranges(inputs.shape[0], batch_size):
            tracker.check()
            rows = resolved.rows(range(start, stop))
            gradient, _ = _input_gradients(model, inputs[start:stop], rows, resolved, score)
            if absolute:
                maps.append(_reduce(gradient.abs(), reduce_channels, "max"))
            else:
                maps.append(_reduce(gradient, reduce_channels, "sum"))
            tracker.advance(stop - start)
    return np.concatenate(maps, axis=0)


def _noise_generator(seed: int | None, generator: torch.Generator | None) -> torch.Generator:
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        return generator
    made = torch.Generator(device="cpu")
    if seed is None:
        made.seed()
    else:
        made.manual_seed(int(seed))
    return made


def smoothgrad(
    model: nn.Module,
    x: torch.Tensor | np.ndarray,
    target: TargetSpec = None,
    *,
    n_samples: int = 25,
    noise_level: float = 0.15,
    reduce_channels: bool = True,
    absolute: bool = True,
    score: ScoreKind = "logit",
    seed: int | None = 0,
    generator: torch.Generator | None = None,
    batch_size: int = 16,
    progress: ProgressCallback | None = None,
    should_stop: StopCallback | None = None,
) -> np.ndarray:
    """SmoothGrad (Smilkov et al. 2017): the saliency map averaged over noisy copies of x.

    Each sample gets ``n_samples`` copies with Gaussian noise of standard deviation
    ``noise_level * (max - min)`` of that sample, so the noise is relative to the data's own
    range (CT in Hounsfield units and normalised micrographs get the same treatment). The
    per-copy maps are computed as in :func:`saliency` and averaged. Noise is drawn on the CPU
    from ``generator`` (or a generator seeded with ``seed``), copy by copy, so the result does
    not depend on ``batch_size``. Costs ``N * n_samples`` forward and backward passes.
    """
    model = check_model(model)
    batch_size = check_batch_size(batch_size)
    if n_samples < 1:
        raise ValueError(f"n_samples must be at least 1, got {n_samples}")
    if noise_level < 0:
        raise ValueError(f"noise_level is a fraction of the data range and must be >= 0, got "
                         f"{noise_level}")
    noise_source = _noise_generator(seed, generator)
    with preserved_model_state(model):
        inputs = as_input_tensor(x, model)
        resolved = resolve_scorer(model, inputs, target, batch_size)
        count = inputs.shape[0]
        spans = (inputs.flatten(1).amax(dim=1) - inputs.flatten(1).amin(dim=1)).cpu()
        sums: torch.Tensor | None = None
        total = count * n_samples
        tracker = ProgressTracker(total, progress, should_stop)
        for start, stop in batch_ranges(total, batch_size):
            tracker.check()
            samples = np.arange(start, stop) // n_samples
            noise = torch.stack(
                [
                    torch.randn(inputs.shape[1:], generator=noise_source) * (noise_level * spans[s])
                    for s in samples
                ]
            ).to(device=inputs.device, dtype=inputs.dtype)
            noisy = inputs[torch.as_tensor(samples, device=inputs.device)] + noise
            gradient, _ = _input_gradients(model, noisy, resolved.rows(samples), resolved, score)
            per_copy = gradient.abs() if absolute else gradient
            if sums is None:
                sums = torch.zeros_like(inputs)
            sums.index_add_(0, torch.as_tensor(samples, device=inputs.device), per_copy)
            tracker.advance(stop - start)
        assert sums is not None
        mean = sums / n_samples
    return _reduce(mean, reduce_channels, "max" if absolute else "sum")


def _baseline_like(baseline: object, inputs: torch.Tensor) -> torch.Tensor:
    """A baseline tensor with the shape of ``inputs``: zeros, a constant, or a broadcast array."""
    if baseline is None:
        return torch.zeros_like(inputs)
    if isinstance(baseline, bool):
        raise TypeError("baseline must be None, a number or an array, not a bool")
    if isinstance(baseline, (int, float, np.floating, np.integer)):
        return torch.full_like(inputs, float(baseline))
    if isinstance(baseline, (np.ndarray, torch.Tensor)):
        tensor = (
            torch.from_numpy(np.asarray(baseline)) if isinstance(baseline, np.ndarray)
            else baseline.detach()
        ).to(device=inputs.device, dtype=inputs.dtype)
        try:
            return torch.broadcast_to(tensor, inputs.shape).clone()
        except RuntimeError:
            raise ValueError(
                f"baseline of shape {tuple(tensor.shape)} cannot be broadcast to the input "
                f"shape {tuple(inputs.shape)}; give (N, C, *spatial), (C, *spatial) or a number"
            ) from None
    raise TypeError(f"baseline must be None, a number or an array, got {type(baseline).__name__}")


def _trapezoid_weights(steps: int) -> np.ndarray:
    weights = np.full(steps + 1, 1.0 / steps)
    weights[0] = weights[-1] = 0.5 / steps
    return weights


def integrated_gradients(
    model: nn.Module,
    x: torch.Tensor | np.ndarray,
    target: TargetSpec = None,
    *,
    baseline: float | np.ndarray | torch.Tensor | None = None,
    steps: int = 32,
    reduce_channels: bool = True,
    score: ScoreKind = "logit",
    batch_size: int = 16,
    progress: ProgressCallback | None = None,
    should_stop: StopCallback | None = None,
) -> np.ndarray:
    """Integrated Gradients (Sundararajan et al. 2017) with the trapezoid rule.

    ``attribution = (x - baseline) * integral_0^1 d score(baseline + a (x - baseline)) / dx da``,
    the integral approximated on ``steps + 1`` equally spaced points with trapezoid weights.
    Attributions are signed; with ``reduce_channels`` they are summed over channels, which keeps
    completeness: the map sums to ``score(x) - score(baseline)`` up to the discretisation error
    (check it with :func:`completeness_residual`; for a linear model it is exact). ``baseline``
    is zeros by default, or a number, or an array broadcastable to ``x``.
    Costs ``N * (steps + 1)`` forward and backward passes.
    """
    model = check_model(model)
    batch_size = check_batch_size(batch_size)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    weights = _trapezoid_weights(steps)
    alphas = np.linspace(0.0, 1.0, steps + 1)
    with preserved_model_state(model):
        inputs = as_input_tensor(x, model)
        reference = _baseline_like(baseline, inputs)
        resolved = resolve_scorer(model, inputs, target, batch_size)
        difference = inputs - reference
        points = steps + 1
        total = inputs.shape[0] * points
        integral = torch.zeros_like(inputs)
        tracker = ProgressTracker(total, progress, should_stop)
        for start, stop in batch_ranges(total, batch_size):
            tracker.check()
            items = np.arange(start, stop)
            samples, positions = items // points, items % points
            sample_index = torch.as_tensor(samples, device=inputs.device)
            shape = (-1,) + (1,) * (inputs.ndim - 1)
            alpha = torch.as_tensor(alphas[positions], device=inputs.device, dtype=inputs.dtype)
            weight = torch.as_tensor(weights[positions], device=inputs.device, dtype=inputs.dtype)
            path = reference[sample_index] + alpha.view(shape) * difference[sample_index]
            gradient, _ = _input_gradients(model, path, resolved.rows(samples), resolved, score)
            integral.index_add_(0, sample_index, gradient * weight.view(shape))
            tracker.advance(stop - start)
        attributions = difference * integral
    return _reduce(attributions, reduce_channels, "sum")


def completeness_residual(
    model: nn.Module,
    x: torch.Tensor | np.ndarray,
    attributions: np.ndarray,
    target: TargetSpec = None,
    *,
    baseline: float | np.ndarray | torch.Tensor | None = None,
    score: ScoreKind = "logit",
) -> np.ndarray:
    """``sum(attributions) - (score(x) - score(baseline))`` per sample, shape ``(N,)``.

    Integrated Gradients satisfies completeness exactly in the limit of infinitely many steps,
    so this residual measures how good the step count was (and is a unit test of the method).
    ``attributions`` may be channel-summed ``(N, *spatial)`` or full ``(N, C, *spatial)``.
    """
    model = check_model(model)
    with preserved_model_state(model):
        inputs = as_input_tensor(x, model)
        reference = _baseline_like(baseline, inputs)
        resolved = resolve_scorer(model, inputs, target)
        with torch.no_grad():
            rows = resolved.rows(range(inputs.shape[0]))
            at_input = target_scores(forward(model, inputs), rows, resolved, score)
            at_baseline = target_scores(forward(model, reference), rows, resolved, score)
        gap = (at_input - at_baseline).double().cpu().numpy()
    values = np.asarray(attributions, dtype=np.float64)
    if values.shape[0] != inputs.shape[0]:
        raise ValueError(
            f"attributions hold {values.shape[0]} samples but x holds {inputs.shape[0]}"
        )
    return values.reshape(values.shape[0], -1).sum(axis=1) - gap


# --------------------------------------------------------------------------------------------
# Perturbation methods
# --------------------------------------------------------------------------------------------


def _per_dim(value: int | Sequence[int], spatial: tuple[int, ...], name: str) -> tuple[int, ...]:
    values = (value,) * len(spatial) if isinstance(value, (int, np.integer)) else tuple(value)
    if len(values) != len(spatial) or any(int(v) < 1 for v in values):
        raise ValueError(
            f"{name} must be a positive int or one positive int per spatial dim "
            f"({len(spatial)}), got {value!r}"
        )
    return tuple(min(int(v), size) for v, size in zip(values, spatial, strict=True))


def occlusion(
    model: nn.Module,
    x: torch.Tensor | np.ndarray,
    target: TargetSpec = None,
    *,
    patch: int | Sequence[int] = 8,
    stride: int | Sequence[int] | None = None,
    baseline: Literal["mean"] | float = "mean",
    score: ScoreKind = "logit",
    batch_size: int = 16,
    progress: ProgressCallback | None = None,
    should_stop: StopCallback | None = None,
) -> np.ndarray:
    """Occlusion sensitivity (Zeiler & Fergus 2014) for 1D, 2D and 3D inputs.

    A ``patch`` (all channels) slides over the input with ``stride`` (default: the patch size,
    i.e. no overlap) and is filled with ``baseline``: ``"mean"`` (each sample's per-channel
    mean, a neutral grey rather than an artificial black hole) or a number. Each element of the
    map is the score drop ``score(x) - score(x occluded)`` averaged over all patches that cover
    it; windows are added flush with the far edge so every element is covered. Returns
    ``(N, *spatial)``. Memory holds at most ``batch_size`` occluded copies of one sample; the
    cost is ``N * (1 + number of patches)`` forward passes, no gradients.
    """
    model = check_model(model)
    batch_size = check_batch_size(batch_size)
    if not (baseline == "mean" or isinstance(baseline, (int, float, np.number))) or isinstance(
        baseline, bool
    ):
        raise ValueError(f"baseline must be 'mean' or a number, got {baseline!r}")
    with preserved_model_state(model), torch.no_grad():
        inputs = as_input_tensor(x, model)
        spatial = tuple(inputs.shape[2:])
        patch_size = _per_dim(patch, spatial, "patch")
        step = patch_size if stride is None else _per_dim(stride, spatial, "stride")
        starts_per_dim = [
            window_starts(size, p, step=s)
            for size, p, s in zip(spatial, patch_size, step, strict=True)
        ]
        windows = [
            tuple(slice(s, s + p) for s, p in zip(corner, patch_size, strict=True))
            for corner in itertools.product(*starts_per_dim)
        ]
        coverage = torch.zeros(spatial, dtype=inputs.dtype, device=inputs.device)
        for window in windows:
            coverage[window] += 1
        resolved = resolve_scorer(model, inputs, target, batch_size)
        count = inputs.shape[0]
        tracker = ProgressTracker(count * (1 + len(windows)), progress, should_stop)
        maps = torch.zeros((count, *spatial), dtype=inputs.dtype, device=inputs.device)
        for sample in range(count):
            tracker.check()
            original = inputs[sample : sample + 1]
            # Shape (C, 1, ...) broadcasts over any window; a 0-d tensor over anything.
            fill = (
                original[0].flatten(1).mean(dim=1).view(-1, *([1] * len(spatial)))
                if baseline == "mean"
                else torch.tensor(float(baseline), dtype=inputs.dtype, device=inputs.device)
            )
            reference = target_scores(
                forward(model, original), resolved.rows([sample]), resolved, score
            )
            tracker.advance(1)
            for start, stop in batch_ranges(len(windows), batch_size):
                tracker.check()
                batch = original.repeat(stop - start, *([1] * (inputs.ndim - 1)))
                for row, window in enumerate(windows[start:stop]):
                    batch[(row, slice(None), *window)] = fill
                scores = target_scores(
                    forward(model, batch), resolved.rows([sample] * (stop - start)), resolved,
                    score,
                )
                drops = reference - scores
                for row, window in enumerate(windows[start:stop]):
                    maps[(sample, *window)] += drops[row]
                tracker.advance(stop - start)
        maps /= coverage
    return maps.cpu().numpy().astype(np.float32, copy=False)




def score_cam(
    model: nn.Module,
    layer: str | nn.Module,
    x: torch.Tensor | np.ndarray,
    target: TargetSpec = None,
    *,
    score: ScoreKind = "probability",
    subtract_baseline: bool = True,
    batch_size: int = 16,
    progress: ProgressCallback | None = None,
    should_stop: StopCallback | None = None,
) -> np.ndarray:
    """Score-CAM (Wang et al. 2020): weigh each channel by how much it alone explains the class.

    The layer's activations ``A_k`` are captured with a forward hook; each channel is upsampled
    to the input size and min-max normalised into a mask ``H_k`` in [0, 1]; the weight of the
    channel is the target score (softmax probability by default) of the masked input
    ``x * H_k`` minus, with ``subtract_baseline`` (as in the paper's equation), the score of the
    all-masked baseline ``x * 0``. The map is ``ReLU(sum_k w_k A_k)`` upsampled to the input
    size, shape ``(N, *spatial)``, not normalised. Constant channels carry no spatial
    information and get weight 0. Gradient-free; costs about ``N * (channels + 2)`` forward
    passes, ``batch_size`` masked copies at a time.
    """
    model = check_model(model)
    batch_size = check_batch_size(batch_size)
    if not isinstance(layer, (str, nn.Module)):
        raise TypeError(f"score_cam explains one layer: a dotted name or a module, not {layer!r}")
    ((layer_name, module),) = resolve_layers(model, layer)
    captured: list[torch.Tensor] = []

    def keep_activation(_module: nn.Module, _inputs: object, output: object) -> None:
        if not isinstance(output, torch.Tensor):
            raise TypeError(
                f"layer {layer_name!r} returns {type(output).__name__}, not a tensor; pick a "
                "layer whose output is a feature map"
            )
        captured.append(output.detach())

    with preserved_model_state(model), torch.no_grad():
        inputs = as_input_tensor(x, model)
        spatial = tuple(inputs.shape[2:])
        resolved = resolve_scorer(model, inputs, target, batch_size)
        handle = module.register_forward_hook(keep_activation)
        try:
            for number, (start, stop) in enumerate(batch_ranges(inputs.shape[0], batch_size)):
                forward(model, inputs[start:stop])
                if len(captured) != number + 1:
                    raise ValueError(
                        f"layer {layer_name!r} ran {len(captured) - number} times in one forward "
                        "pass (a reused module); Score-CAM needs a layer that runs exactly once"
                    )
        finally:
            handle.remove()
        activations = torch.cat(captured, dim=0)
        captured.clear()
        if activations.ndim != inputs.ndim:
            raise ValueError(
                f"layer {layer_name!r} outputs shape {tuple(activations.shape)}, not a feature "
                f"map (N, K, *spatial) with {len(spatial)} spatial dims; pick a convolutional layer"
            )
        count, channels = activations.shape[:2]
        flat = activations.flatten(2)
        low, high = flat.amin(dim=2), flat.amax(dim=2)
        informative = high > low
        total = count * channels + (count if subtract_baseline else 0)
        tracker = ProgressTracker(total, progress, should_stop)
        baseline_scores = torch.zeros(count, dtype=inputs.dtype, device=inputs.device)
        if subtract_baseline:
            for start, stop in batch_ranges(count, batch_size):
                tracker.check()
                rows = resolved.rows(range(start, stop))
                output = forward(model, torch.zeros_like(inputs[start:stop]))
                baseline_scores[start:stop] = target_scores(output, rows, resolved, score)
                tracker.advance(stop - start)
        weights = torch.zeros((count, channels), dtype=inputs.dtype, device=inputs.device)
        for start, stop in batch_ranges(count * channels, batch_size):
            tracker.check()
            items = np.arange(start, stop)
            samples, kept = items // channels, items % channels
            sample_index = torch.as_tensor(samples, device=inputs.device)
            channel_index = torch.as_tensor(kept, device=inputs.device)
            chosen = activations[sample_index, channel_index].unsqueeze(1)
            masks = upsample(chosen, spatial)
            span = (high - low)[sample_index, channel_index].clamp_min(1e-12)
            shape = (-1,) + (1,) * (inputs.ndim - 1)
            masks = (masks - low[sample_index, channel_index].view(shape)) / span.view(shape)
            masked = inputs[sample_index] * masks
            scores = target_scores(forward(model, masked), resolved.rows(samples), resolved, score)
            weights[sample_index, channel_index] = scores - baseline_scores[sample_index]
            tracker.advance(stop - start)
        weights = torch.where(informative, weights, torch.zeros_like(weights))
        shape = (count, channels) + (1,) * len(spatial)
        combined = torch.relu((weights.view(shape) * activations).sum(dim=1, keepdim=True))
        cam = upsample(combined, spatial)[:, 0]
    return cam.clamp_min(0).cpu().numpy().astype(np.float32, copy=False)
