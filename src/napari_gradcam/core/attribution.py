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
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import torch
from torch import nn

from napari_gradcam.core.engine import preserved_model_state
from napari_gradcam.core.methods.perturbation import ScoreCAM, ScoreCAMWeights
from napari_gradcam.core.scoring import (  # re-exported: evidence and older code import them here
    ResolvedTarget,
    ScoreKind,
    as_input_tensor,
    batch_ranges,
    check_batch_size,
    check_model,
    forward,
    forward_in_batches,  # noqa: F401 (re-exported)
    resolve_scorer,
    target_scores,
)
from napari_gradcam.core.targets import TargetSpec
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


# --------------------------------------------------------------------------------------------
# Shared machinery (also used by napari_gradcam.core.evidence); the row scoring lives in
# napari_gradcam.core.scoring
# --------------------------------------------------------------------------------------------


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
    noise: torch.Tensor | np.ndarray | None = None,
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
    not depend on ``batch_size``. ``noise`` gives the noise itself instead, shape
    ``(N, n_samples, C, *spatial)``, added as it is (``n_samples``, ``noise_level``, ``seed``
    and ``generator`` are then not used): to reproduce another tool's run with the same noise
    (Captum's ``NoiseTunnel``) or to share the noise between models. Costs ``N * n_samples``
    forward and backward passes.
    """
    model = check_model(model)
    batch_size = check_batch_size(batch_size)
    given_noise = None if noise is None else _given_noise(noise, x)
    if given_noise is not None:
        n_samples = given_noise.shape[1]
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
            items = np.arange(start, stop)
            samples = items // n_samples
            if given_noise is not None:
                drawn = given_noise[torch.as_tensor(samples), torch.as_tensor(items % n_samples)]
            else:
                drawn = torch.stack([
                    torch.randn(inputs.shape[1:], generator=noise_source) * (noise_level * spans[s])
                    for s in samples
                ])
            noise_batch = drawn.to(device=inputs.device, dtype=inputs.dtype)
            noisy = inputs[torch.as_tensor(samples, device=inputs.device)] + noise_batch
            gradient, _ = _input_gradients(model, noisy, resolved.rows(samples), resolved, score)
            per_copy = gradient.abs() if absolute else gradient
            if sums is None:
                sums = torch.zeros_like(inputs)
            sums.index_add_(0, torch.as_tensor(samples, device=inputs.device), per_copy)
            tracker.advance(stop - start)
        assert sums is not None
        mean = sums / n_samples
    return _reduce(mean, reduce_channels, "max" if absolute else "sum")


def _given_noise(noise: torch.Tensor | np.ndarray, x: object) -> torch.Tensor:
    """The caller's SmoothGrad noise as a CPU tensor, checked against x: (N, S, C, *spatial)."""
    tensor = torch.as_tensor(np.asarray(noise) if isinstance(noise, np.ndarray) else noise)
    shape = tuple(np.shape(x))
    if tensor.ndim != len(shape) + 1 or tensor.shape[0] != shape[0] or \
            tuple(tensor.shape[2:]) != shape[1:] or tensor.shape[1] < 1:
        raise ValueError(f"noise must have shape (N, n_samples, C, *spatial) = ({shape[0]}, "
                         f"n_samples, {', '.join(map(str, shape[1:]))}), got "
                         f"{tuple(tensor.shape)}")
    return tensor.detach().cpu()


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


Quadrature = Literal["riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid",
                     "trapezoid", "gausslegendre"]
QUADRATURES = ("riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid",
               "trapezoid", "gausslegendre")


def path_quadrature(steps: int, method: str = "trapezoid") -> tuple[np.ndarray, np.ndarray]:
    """Positions ``alpha`` in [0, 1] along the path and their weights, float64.

    ``steps`` counts sub-intervals of [0, 1]: the Riemann rules take one point in each
    (left end, right end or middle; ``steps`` points), the trapezoid rule both ends of each
    (``steps + 1`` points) and Gauss-Legendre ``steps`` nodes (exact for polynomials of degree
    ``2 steps - 1``). The positions and weights are Captum's (``IntegratedGradients(method=
    ...)``, whose ``n_steps`` is the number of points), including ``"riemann_trapezoid"``:
    Captum gives its ``n`` points the weight ``1/n`` (halved at the ends), which sums to
    ``(n - 1)/n``, not 1, so that rule underestimates the integral by ``1/n`` of it; it is
    here for parity with Captum. ``"trapezoid"`` (the default) is the true trapezoid rule
    (weights ``1/steps``, halved at the ends).
    """
    if method not in QUADRATURES:
        raise ValueError(f"method must be one of {', '.join(QUADRATURES)}, got {method!r}")
    if method == "trapezoid":
        weights = np.full(steps + 1, 1.0 / steps)
        weights[0] = weights[-1] = 0.5 / steps
        return np.linspace(0.0, 1.0, steps + 1), weights
    if method == "riemann_trapezoid":  # Captum's rule: weights 1/n, halved at both ends
        weights = np.full(steps + 1, 1.0 / (steps + 1))
        weights[0] = weights[-1] = 0.5 / (steps + 1)
        return np.linspace(0.0, 1.0, steps + 1), weights
    if method == "gausslegendre":
        nodes, node_weights = np.polynomial.legendre.leggauss(steps)
        return 0.5 * (nodes + 1.0), 0.5 * node_weights
    offset = {"riemann_left": 0.0, "riemann_middle": 0.5, "riemann_right": 1.0}[method]
    return (np.arange(steps) + offset) / steps, np.full(steps, 1.0 / steps)


def integrated_gradients(
    model: nn.Module,
    x: torch.Tensor | np.ndarray,
    target: TargetSpec = None,
    *,
    baseline: float | np.ndarray | torch.Tensor | None = None,
    steps: int = 32,
    method: Quadrature = "trapezoid",
    reduce_channels: bool = True,
    score: ScoreKind = "logit",
    return_convergence_delta: bool = False,
    batch_size: int = 16,
    progress: ProgressCallback | None = None,
    should_stop: StopCallback | None = None,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Integrated Gradients (Sundararajan et al. 2017).

    ``attribution = (x - baseline) * integral_0^1 d score(baseline + a (x - baseline)) / dx da``,
    the integral approximated by the quadrature ``method`` (:func:`path_quadrature`: the
    trapezoid rule on ``steps + 1`` equally spaced points by default, the left/right/middle
    Riemann sums or Gauss-Legendre on ``steps`` points, as Captum offers them).
    Attributions are signed; with ``reduce_channels`` they are summed over channels, which keeps
    completeness: the map sums to ``score(x) - score(baseline)`` up to the discretisation error.
    ``return_convergence_delta=True`` returns ``(attributions, delta)`` with that error per
    sample, ``delta = sum(attributions) - (score(x) - score(baseline))`` (Captum's convergence
    delta; it costs two more forward passes per sample). ``baseline`` is zeros by default, or a
    number, or an array broadcastable to ``x``. Costs one forward and backward pass per point
    and sample.
    """
    model = check_model(model)
    batch_size = check_batch_size(batch_size)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    alphas, weights = path_quadrature(steps, method)
    with preserved_model_state(model):
        inputs = as_input_tensor(x, model)
        reference = _baseline_like(baseline, inputs)
        resolved = resolve_scorer(model, inputs, target, batch_size)
        difference = inputs - reference
        points = len(alphas)
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
        if return_convergence_delta:
            gap = _score_gap(model, inputs, reference, resolved, score, batch_size)
            delta = attributions.flatten(1).double().sum(1).cpu().numpy() - gap
    reduced = _reduce(attributions, reduce_channels, "sum")
    return (reduced, delta) if return_convergence_delta else reduced


def _score_gap(model: nn.Module, inputs: torch.Tensor, reference: torch.Tensor,
               resolved: ResolvedTarget, score: ScoreKind, batch_size: int) -> np.ndarray:
    """``score(x) - score(baseline)`` per sample, float64, ``batch_size`` samples at a time."""
    gaps = []
    with torch.no_grad():
        for start, stop in batch_ranges(inputs.shape[0], batch_size):
            rows = resolved.rows(range(start, stop))
            at_input = target_scores(forward(model, inputs[start:stop]), rows, resolved, score)
            at_baseline = target_scores(forward(model, reference[start:stop]), rows, resolved,
                                        score)
            gaps.append((at_input - at_baseline).double().cpu().numpy())
    return np.concatenate(gaps)


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
    so this residual measures how good the step count was (and is a unit test of the method);
    ``integrated_gradients(..., return_convergence_delta=True)`` returns it with the map.
    ``attributions`` may be channel-summed ``(N, *spatial)`` or full ``(N, C, *spatial)``.
    """
    model = check_model(model)
    with preserved_model_state(model):
        inputs = as_input_tensor(x, model)
        reference = _baseline_like(baseline, inputs)
        resolved = resolve_scorer(model, inputs, target)
        gap = _score_gap(model, inputs, reference, resolved, score, 16)
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
        gaps = [dim for dim, (p, s) in enumerate(zip(patch_size, step, strict=True)) if s > p]
        if gaps:
            raise ValueError(
                f"occlusion stride {step} is larger than the patch {patch_size} along spatial "
                f"dim(s) {gaps}: the elements between windows would never be occluded and "
                "their attribution would be 0/0. Use a stride no larger than the patch"
            )
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
    weights: ScoreCAMWeights | None = None,
    score: ScoreKind | None = None,
    subtract_baseline: bool | None = None,
    batch_size: int = 16,
    progress: ProgressCallback | None = None,
    should_stop: StopCallback | None = None,
) -> np.ndarray:
    """Score-CAM (Wang et al. 2020) of one layer, upsampled to the input, not normalised.

    The function form of :class:`napari_gradcam.core.methods.ScoreCAM` (whose docstring gives
    the three weightings with their formulas), with progress and cancelling for the evidence
    checks. ``weights`` is ``"softmax"`` (default: the paper's Algorithm 1, a softmax over the
    channels' target logits; never all zero after a ReLU layer), ``"increase"`` (score of the
    masked input minus that of the all-zero baseline) or ``"raw"`` (the authors' code).
    ``subtract_baseline`` is the former spelling: True means "increase", False "raw" (both with
    probabilities unless ``score`` says otherwise). Returns ``(N, *spatial)`` float32.
    Gradient-free; costs about ``N * (channels + 1)`` forward passes, ``batch_size`` at a time.
    """
    model = check_model(model)
    batch_size = check_batch_size(batch_size)
    if not isinstance(layer, (str, nn.Module)):
        raise TypeError(f"score_cam explains one layer: a dotted name or a module, not {layer!r}")
    if weights is None:
        weights = "softmax" if subtract_baseline is None else (
            "increase" if subtract_baseline else "raw")
    elif subtract_baseline is not None:
        raise ValueError("give either weights or subtract_baseline (its former spelling), "
                         "not both")
    monitor = _LazyTracker(progress, should_stop)
    explainer = ScoreCAM(model, layer, weights=weights, score=score, batch_size=batch_size,
                         monitor=monitor)
    return explainer(as_input_tensor(x, model), target)


class _LazyTracker:
    """A :class:`ProgressTracker` that learns its total when the batches start."""

    def __init__(self, progress: ProgressCallback | None, should_stop: StopCallback | None
                 ) -> None:
        self.tracker = ProgressTracker(0, progress, should_stop)

    def start(self, total: int) -> None:
        self.tracker.total = int(total)

    def check(self) -> None:
        self.tracker.check()

    def advance(self, count: int) -> None:
        self.tracker.advance(count)
