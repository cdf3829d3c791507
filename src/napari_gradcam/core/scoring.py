"""Scoring a model's output one row at a time: what every batched, perturbation-based method needs.

Perturbation methods (occlusion, Score-CAM, Ablation-CAM, the evidence checks) run batches that
mix perturbed copies of different samples. Each row must be scored against *its* sample's
target: the class fixed on the clean input (not a class that changes as the input is
destroyed), or the row's own mask of a per-sample segmentation region. This module holds that
bookkeeping, the input and batch-size checks, and batching helpers. It imports only the engine
and the targets, so both :mod:`napari_gradcam.core.methods` (Score-CAM, Ablation-CAM) and
:mod:`napari_gradcam.core.attribution` can use it without importing each other.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn

from napari_gradcam.core.engine import check_input, model_dtype_device
from napari_gradcam.core.targets import (
    AllClasses,
    ClassTarget,
    PredictedClass,
    SegmentationRegion,
    Target,
    TargetSpec,
    resolve_target,
)

ScoreKind = Literal["logit", "probability"]


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
    clean = None
    if isinstance(spec, (ClassTarget, PredictedClass)):
        clean = forward_in_batches(model, x, batch_size)
    return resolve_on_clean_output(spec, x, clean)


def resolve_on_clean_output(
    spec: Target, x: torch.Tensor, clean_output: torch.Tensor | None
) -> ResolvedTarget:
    """:func:`resolve_scorer` for a caller that has already run the clean input.

    ``clean_output`` is the model's output for ``x``; it is needed (and only used) for class
    targets, whose classes it fixes. Score-CAM and Ablation-CAM reuse the forward pass that
    captured the layer's activations instead of running the model once more.
    """
    if isinstance(spec, AllClasses):
        raise ValueError("target 'all' must be handled by the caller, one class at a time")
    if isinstance(spec, (ClassTarget, PredictedClass)):
        if clean_output is None:
            raise ValueError("a class target needs the model output of the clean input")
        indices = spec.class_indices(clean_output)
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



def all_class_scores(output: torch.Tensor, kind: ScoreKind = "logit") -> torch.Tensor:
    """Every class's score for every row, ``(B, K)``, reduced like :func:`target_scores`
    (dense outputs: logits summed, probabilities averaged over pixels), for ``target="all"``."""
    if kind not in ("logit", "probability"):
        raise ValueError(f"score must be 'logit' or 'probability', got {kind!r}")
    if output.ndim < 2:
        raise ValueError("'all classes' needs an output with a class axis (N, K, ...)")
    picked = output if kind == "logit" else torch.softmax(output, dim=1)
    if picked.ndim == 2:
        return picked
    flat = picked.flatten(2)
    return flat.sum(dim=2) if kind == "logit" else flat.mean(dim=2)
