"""What to explain: turning the user's choice of target into one score per sample.

Grad-CAM differentiates a scalar score y^c per sample. For a classifier that is a class logit;
for a U-Net it is the sum of a class's logits inside a region (Seg-Grad-CAM, Vinogradova et
al. 2020); for a regression head (porosity, grain size, strength) it is the predicted value,
signed by what the user asks (:class:`RegressionTarget`); or whatever a callable returns.
Every target here maps the model output ``(N, K, ...)`` to a score tensor ``(N,)`` and reports
which class it used, so results can say what was explained.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

ScoreFunction = Callable[[torch.Tensor], torch.Tensor]


class Target:
    """Base class: ``score(output)`` returns one differentiable score per sample."""

    def class_indices(self, output: torch.Tensor) -> np.ndarray | None:
        """The class explained for each sample, or None when the target is not a class."""
        return None

    def score(self, output: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def describe(self) -> str:
        return type(self).__name__


def _require_class_axis(output: torch.Tensor) -> None:
    if output.ndim < 2:
        raise ValueError(
            f"the model returned an output of shape {tuple(output.shape)}; a class target needs "
            "(N, K) logits or (N, K, *spatial) maps. For a regression head use "
            "RegressionTarget(output_index=..., sign=+1 or -1)."
        )


def _reduce_to_per_sample(selected: torch.Tensor) -> torch.Tensor:
    """(N,) stays; (N, *spatial) is summed over space so a segmentation map gives one score."""
    return selected.reshape(selected.shape[0], -1).sum(dim=1)


@dataclass(frozen=True)
class ClassTarget(Target):
    """A fixed class index, or one index per sample."""

    index: int | tuple[int, ...]

    def class_indices(self, output: torch.Tensor) -> np.ndarray:
        _require_class_axis(output)
        n, k = output.shape[0], output.shape[1]
        if isinstance(self.index, tuple):
            if len(self.index) != n:
                raise ValueError(f"got {len(self.index)} target classes for a batch of {n} samples")
            indices = np.asarray(self.index, dtype=np.int64)
        else:
            indices = np.full(n, int(self.index), dtype=np.int64)
        if indices.min() < -k or indices.max() >= k:
            raise ValueError(f"target class {indices.tolist()} is out of range for {k} classes")
        return indices % k

    def score(self, output: torch.Tensor) -> torch.Tensor:
        indices = torch.as_tensor(self.class_indices(output), device=output.device)
        rows = torch.arange(output.shape[0], device=output.device)
        return _reduce_to_per_sample(output[rows, indices])

    def describe(self) -> str:
        return f"class {self.index}"


@dataclass(frozen=True)
class PredictedClass(Target):
    """The class the model predicts for each sample (argmax of the logits)."""

    def class_indices(self, output: torch.Tensor) -> np.ndarray:
        _require_class_axis(output)
        if output.ndim > 2:
            raise ValueError(
                "the model returns a map of class scores (a segmentation output), so there is no "
                "single predicted class per sample: pass SegmentationRegion(class_index, mask)."
            )
        return output.detach().argmax(dim=1).cpu().numpy()

    def score(self, output: torch.Tensor) -> torch.Tensor:
        indices = torch.as_tensor(self.class_indices(output), device=output.device)
        return output[torch.arange(output.shape[0], device=output.device), indices]

    def describe(self) -> str:
        return "predicted class"


@dataclass(frozen=True)
class AllClasses(Target):
    """Marker: explain every class (the engine runs one backward pass per class)."""

    def describe(self) -> str:
        return "all classes"


@dataclass(frozen=True)
class SegmentationRegion(Target):
    """Seg-Grad-CAM: the sum of ``class_index`` logits inside ``mask``.

    ``mask`` is a boolean array of the output's spatial shape (shared by every sample) or of
    shape ``(N, *spatial)``; ``None`` means the whole image. The mask is what the user painted
    (a crack Labels layer) or the pixels the model predicted as that class.
    """

    class_index: int
    mask: np.ndarray | torch.Tensor | None = None

    def class_indices(self, output: torch.Tensor) -> np.ndarray:
        return np.full(output.shape[0], self.class_index, dtype=np.int64)

    def score(self, output: torch.Tensor) -> torch.Tensor:
        if output.ndim < 3:
            raise ValueError(
                "SegmentationRegion needs a segmentation output (N, K, *spatial); this model "
                f"returned {tuple(output.shape)}. Use a class index for classifiers."
            )
        if not -output.shape[1] <= self.class_index < output.shape[1]:
            raise ValueError(
                f"class {self.class_index} is out of range for {output.shape[1]} output classes"
            )
        class_map = output[:, self.class_index]
        if self.mask is None:
            return _reduce_to_per_sample(class_map)
        mask = torch.as_tensor(np.asarray(self.mask), device=output.device).bool()
        spatial = tuple(class_map.shape[1:])
        if tuple(mask.shape) not in (spatial, tuple(class_map.shape)):
            raise ValueError(
                f"the region mask has shape {tuple(mask.shape)} but the model's output maps are "
                f"{spatial} (or {tuple(class_map.shape)} with the batch axis)"
            )
        if not bool(mask.any()):
            raise ValueError("the region mask is empty: select at least one pixel of the region")
        return _reduce_to_per_sample(class_map * mask.to(class_map.dtype))

    def describe(self) -> str:
        region = "whole image" if self.mask is None else f"{int(np.asarray(self.mask).sum())} px"
        return f"class {self.class_index} in region ({region})"


@dataclass(frozen=True)
class CallableTarget(Target):
    """Any ``output -> (N,)`` function: regression heads, custom scores, ratios of logits."""

    function: ScoreFunction

    def score(self, output: torch.Tensor) -> torch.Tensor:
        score = self.function(output)
        if not isinstance(score, torch.Tensor):
            raise TypeError(f"the target callable must return a tensor, got {type(score).__name__}")
        if score.ndim == 0:
            score = score.expand(output.shape[0]) if output.shape[0] == 1 else score
        if score.ndim != 1 or score.shape[0] != output.shape[0]:
            raise ValueError(
                f"the target callable must return one score per sample, shape ({output.shape[0]},)"
                f"; it returned {tuple(score.shape)}"
            )
        return score

    def describe(self) -> str:
        return f"callable {getattr(self.function, '__name__', repr(self.function))}"


@dataclass(frozen=True)
class RegressionTarget(Target):
    """A regression head's prediction: ``sign * output[:, output_index]``.

    Sign convention: ``sign=+1`` (the default) explains what *increases* the prediction (the
    regions that push predicted porosity, grain size or strength up), ``sign=-1`` what
    *decreases* it. Grad-CAM keeps only positive evidence (the ReLU), so the two are different
    maps, not one map and its negative: with ``sign=-1`` the channel weights change sign
    before the ReLU.

    ``output_index`` picks one of several predicted properties of an ``(N, P)`` output; it may
    stay ``None`` when the model predicts one value, shape ``(N,)`` or ``(N, 1)``.
    """

    output_index: int | None = None
    sign: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.sign, bool) or self.sign not in (1, -1):
            raise ValueError(f"sign must be +1 (explain what increases the prediction) or -1 "
                             f"(what decreases it), got {self.sign!r}")
        object.__setattr__(self, "sign", int(self.sign))
        index = self.output_index
        if index is not None and (isinstance(index, bool)
                                  or not isinstance(index, (int, np.integer))):
            raise TypeError(f"output_index must be an integer or None, got {index!r}")
        if index is not None:
            object.__setattr__(self, "output_index", int(index))

    def _values(self, output: torch.Tensor) -> torch.Tensor:
        if output.ndim == 1:
            if self.output_index not in (None, 0, -1):
                raise ValueError(f"output_index={self.output_index} is out of range: the model "
                                 f"predicts one value per sample (output shape "
                                 f"{tuple(output.shape)})")
            return output
        if output.ndim != 2:
            raise ValueError(
                f"RegressionTarget needs predictions (N,) or (N, P); this model returned "
                f"{tuple(output.shape)}. For a map output use SegmentationRegion (the sum "
                "inside a region) or a callable target."
            )
        count = output.shape[1]
        if self.output_index is None:
            if count != 1:
                raise ValueError(f"the model predicts {count} values per sample (output shape "
                                 f"{tuple(output.shape)}): choose one with output_index=0.."
                                 f"{count - 1}")
            return output[:, 0]
        if not -count <= self.output_index < count:
            raise ValueError(f"output_index={self.output_index} is out of range for "
                             f"{count} predicted value(s) (output shape {tuple(output.shape)})")
        return output[:, self.output_index]

    def score(self, output: torch.Tensor) -> torch.Tensor:
        return self.sign * self._values(output)

    def describe(self) -> str:
        which = "prediction" if self.output_index is None else f"output {self.output_index}"
        direction = "increases" if self.sign > 0 else "decreases"
        return f"regression {which} (sign {self.sign:+d}: what {direction} it)"


TargetSpec = None | int | str | Sequence[int] | Target | ScoreFunction


def resolve_target(spec: TargetSpec) -> Target:
    """Accept the friendly spellings (None, 3, [0, 2], "all", a callable) and return a Target."""
    if spec is None or (isinstance(spec, str) and spec == "predicted"):
        return PredictedClass()
    if isinstance(spec, str):
        if spec == "all":
            return AllClasses()
        raise ValueError(f"unknown target {spec!r}: use a class index, 'predicted' or 'all'")
    if isinstance(spec, Target):
        return spec
    if isinstance(spec, (bool, np.bool_)):
        raise TypeError("a boolean is not a target; pass a class index")
    if isinstance(spec, (int, np.integer)):
        return ClassTarget(int(spec))
    if isinstance(spec, (np.ndarray, torch.Tensor)):
        return ClassTarget(tuple(int(i) for i in np.asarray(spec).ravel()))
    if isinstance(spec, Sequence):
        return ClassTarget(tuple(int(i) for i in spec))
    if callable(spec):
        return CallableTarget(spec)
    raise TypeError(f"cannot use {type(spec).__name__} as a target")
