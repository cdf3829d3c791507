"""What every CAM shares: the front end (inputs, targets, fusion, upsampling, normalisation),
the result type, and the declarations a method makes about itself.

A method is a subclass of :class:`BaseCAM` that says what it needs through class attributes
(:class:`MethodTraits`) and turns one layer's activations (and gradients) into maps. The shells
read the declarations through :func:`napari_gradcam.core.methods.method_info` instead of
hard-coding rules such as "CAM needs a classifier".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from napari_gradcam.core.device import resolve_device, to_numpy
from napari_gradcam.core.engine import (
    ForwardBackward,
    LayerGradients,
    LayerSpec,
    check_input,
    forward_backward,
    resolve_layers,
)
from napari_gradcam.core.metrics import class_probabilities
from napari_gradcam.core.outputs import OutputSpec
from napari_gradcam.core.targets import (
    AllClasses,
    CallableTarget,
    SegmentationRegion,
    Target,
    TargetSpec,
    resolve_target,
)
from napari_gradcam.core.tokens import TokenLayout


class MethodTraits:
    """Class attributes by which a method declares what it needs (read by :func:`method_info`).

    They are facts about the method, not options: a shell asks them before it offers a method
    for a model or a target, and the explainer itself enforces them with a clear error.
    """

    name: ClassVar[str] = "base"
    title: ClassVar[str] = ""
    reference: ClassVar[str] = ""
    #: backpropagates from the score to the target layer (False: forward passes only)
    needs_gradients: ClassVar[bool] = True
    #: the maps are input gradients (N, C, *spatial), one per input channel, not one per sample
    input_gradients: ClassVar[bool] = False
    #: explains a target layer (Guided Backpropagation does not)
    needs_layer: ClassVar[bool] = True
    #: reads the weights of a linear classifier after global average pooling (CAM)
    needs_linear_head: ClassVar[bool] = False
    #: needs class scores (N, K): no segmentation regions or callable targets
    classifier_only: ClassVar[bool] = False
    #: refuses target="all": one class (or region) per call
    one_target_at_a_time: ClassVar[bool] = False
    #: the map depends on the target class (EigenCAM's does not)
    class_specific: ClassVar[bool] = True
    #: model evaluations per sample, in words (for progress estimates and the README)
    cost: ClassVar[str] = "1 forward + 1 backward to the layer"


_INTERPOLATION = {1: "linear", 2: "bilinear", 3: "trilinear"}
EPS = 1e-12


@dataclass
class CAMResult:
    """Maps plus what is needed to say what they mean (predictions, the explained class)."""

    maps: np.ndarray
    outputs: np.ndarray
    target_indices: np.ndarray | None
    scores: np.ndarray | None
    method: str
    layers: list[str]
    feature_shapes: list[tuple[int, ...]]
    target: str
    extras: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def is_regression(self) -> bool:
        """Whether a :class:`~napari_gradcam.core.targets.RegressionTarget` was explained (its
        description, which every method stores in ``target``, begins with "regression")."""
        return self.target.startswith("regression ")

    @property
    def probabilities(self) -> np.ndarray:
        """The class probabilities of the outputs, by the core's one definition
        (:func:`~napari_gradcam.core.metrics.class_probabilities`, the numbers a map's
        provenance records): softmax over the classes, for a U-Net averaged over the pixels;
        for a regression target the outputs as they are (predicted values, not class scores:
        a softmax would turn a single predicted porosity into 1.0)."""
        if self.is_regression:
            return np.asarray(self.outputs)
        return class_probabilities(self.outputs)


def upsample(maps: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """(linear / bilinear / trilinear, align_corners=False) resize of maps (..., *spatial)."""
    spatial_dims = len(size)
    if tuple(maps.shape[-spatial_dims:]) == tuple(size):
        return maps
    lead = maps.shape[:-spatial_dims]
    flat = maps.reshape(-1, 1, *maps.shape[-spatial_dims:])
    resized = F.interpolate(flat, size=size, mode=_INTERPOLATION[spatial_dims],
                            align_corners=False)
    return resized.reshape(*lead, *size)


def normalize_maps(maps: torch.Tensor, how: str | None, spatial_dims: int) -> torch.Tensor:
    """Per-map scaling: ``None`` (raw), ``"minmax"`` to [0, 1], or ``"max"`` (divide by max)."""
    if how is None:
        return maps
    flat = maps.flatten(-spatial_dims)
    high = flat.amax(-1).reshape(*maps.shape[:-spatial_dims], *(1,) * spatial_dims)
    if how == "max":
        return maps / high.clamp_min(EPS)
    if how == "minmax":
        low = flat.amin(-1).reshape(high.shape)
        return (maps - low) / (high - low).clamp_min(EPS)
    raise ValueError(f"normalize must be None, 'minmax' or 'max', got {how!r}")


def spatial_axes(tensor: torch.Tensor, first: int) -> tuple[int, ...]:
    return tuple(range(first, tensor.ndim))


class BaseCAM(MethodTraits):
    """Shared front end: input checks, targets, fusion, upsampling, normalisation, results.

    Parameters
    ----------
    model:
        Any ``nn.Module`` taking ``(N, C, *spatial)``. It is left exactly as found: hooks are
        removed and train/eval mode and ``requires_grad`` restored after every call. Passing
        ``device`` moves it there once, like ``model.to(device)``.
    layer:
        A dotted module name (``"features.3"``), a module, or a list of them (fusion).
    device:
        ``None`` (where the model is), ``"auto"`` (cuda, then mps, then cpu) or a device name.
    amp:
        ``None``, ``"bf16"`` or ``"fp16"``: autocast for the forward pass on GPUs.
    upsample:
        Resize maps to the input's spatial size (default) or keep the feature-map size.
    normalize:
        ``None`` (raw maps, comparable across samples), ``"minmax"`` or ``"max"``.
    fusion:
        How several layers' maps are combined: ``"mean"``, ``"max"`` or ``"product"``.
    output:
        Which output to explain when the model returns a tuple or dict: an index or a key
        (MONAI's ViT returns ``(logits, hidden_states)``: ``output=0``). See :mod:`.outputs`.
    patch_grid, class_token, channels_last:
        How a transformer layer's tokens ``(N, T, C)`` or channels-last maps lie on the
        input; derived from the model when ``None``. See :mod:`napari_gradcam.core.tokens`.
    """

    def __init__(
        self,
        model: nn.Module,
        layer: LayerSpec,
        *,
        device: str | torch.device | None = None,
        amp: str | None = None,
        upsample: bool = True,
        normalize: str | None = None,
        fusion: str = "mean",
        output: OutputSpec = None,
        patch_grid: Sequence[int] | None = None,
        class_token: bool | None = None,
        channels_last: bool | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if fusion not in ("mean", "max", "product"):
            raise ValueError(f"fusion must be 'mean', 'max' or 'product', got {fusion!r}")
        normalize_maps(torch.zeros(1, 1), normalize, 1)  # reject a bad option now, not later
        self.model = model
        self.layers = resolve_layers(model, layer)
        self.device = resolve_device(device, model)
        if device is not None:
            model.to(self.device)
        self.amp = amp
        self.upsample = upsample
        self.normalize = normalize
        self.fusion = fusion
        self.output = output
        self.token_layout = TokenLayout.make(patch_grid, class_token, channels_last)

    @property
    def layer_names(self) -> list[str]:
        return [name for name, _ in self.layers]

    def __call__(self, x: torch.Tensor | np.ndarray, target: TargetSpec = None) -> np.ndarray:
        """Maps ``(N, *spatial)``, or ``(N, K, *spatial)`` for ``target="all"``."""
        return self.explain(x, target).maps

    def combine(self, layer: LayerGradients, passes: ForwardBackward) -> torch.Tensor:
        """Activations (N, C, *s) and gradients (K, N, C, *s) → maps (K, N, *s), after ReLU."""
        raise NotImplementedError

    def check_target(self, target: Target) -> None:
        """Refuse, with the reason, a target the method's declarations rule out."""
        label = self.title or self.name
        if self.one_target_at_a_time and isinstance(target, AllClasses):
            raise ValueError(f"{label} explains one target at a time; choose one class instead "
                             "of 'all' (or loop over the classes)")
        if self.classifier_only and isinstance(target, (CallableTarget, SegmentationRegion)):
            raise ValueError(f"{label} explains classes of a classifier (outputs (N, K)); for a "
                             "callable or segmentation target use GradCAM")

    def passes(self, tensor: torch.Tensor, target: Target) -> ForwardBackward:
        """The forward (and backward) passes the method combines; one of each by default."""
        return forward_backward(self.model, tensor, self.layers, target, device=self.device,
                                amp=self.amp, need_gradients=self.needs_gradients,
                                output=self.output, tokens=self.token_layout)

    def layer_maps(self, tensor: torch.Tensor, target: Target,
                   passes: ForwardBackward) -> list[torch.Tensor]:
        """One (K, N, *s) map per layer. Methods that need more model evaluations (Score-CAM,
        Ablation-CAM) override this; the others only write :meth:`combine`."""
        return [self.combine(layer, passes) for layer in passes.layers]

    def explain(self, x: torch.Tensor | np.ndarray, target: TargetSpec = None) -> CAMResult:
        """Run the method on a batch and return the maps with predictions and provenance."""
        tensor = check_input(x, self.model)
        resolved = resolve_target(target)
        self.check_target(resolved)
        passes = self.passes(tensor, resolved)
        input_size = tuple(tensor.shape[2:])
        spatial_dims = len(input_size)
        per_layer = self.layer_maps(tensor, resolved, passes)
        maps = self._fuse(per_layer, input_size, spatial_dims)
        maps = normalize_maps(maps, self.normalize, spatial_dims)
        maps = maps.transpose(0, 1) if isinstance(resolved, AllClasses) else maps[0]
        return CAMResult(
            maps=to_numpy(maps.float()),
            outputs=to_numpy(passes.outputs),
            target_indices=passes.class_indices,
            scores=None if passes.scores is None else to_numpy(passes.scores),
            method=self.name,
            layers=self.layer_names,
            feature_shapes=[tuple(layer.activations.shape[1:]) for layer in passes.layers],
            target=resolved.describe(),
        )

    def _fuse(self, per_layer: list[torch.Tensor], input_size: tuple[int, ...],
              spatial_dims: int) -> torch.Tensor:
        if len(per_layer) == 1:
            return upsample(per_layer[0], input_size) if self.upsample else per_layer[0]
        if self.upsample:
            size = input_size
        else:
            size = max((tuple(m.shape[-spatial_dims:]) for m in per_layer), key=np.prod)
        scaled = [normalize_maps(upsample(m, size), "max", spatial_dims) for m in per_layer]
        stacked = torch.stack(scaled)
        if self.fusion == "mean":
            return stacked.mean(0)
        if self.fusion == "max":
            return stacked.amax(0)
        return stacked.prod(0)


def weighted_sum(weights: torch.Tensor, activations: torch.Tensor) -> torch.Tensor:
    """sum_k w_k A_k with weights (K, N, C) and activations (N, C, *s) → (K, N, *s)."""
    spatial = activations.ndim - 2
    return (weights.reshape(*weights.shape, *(1,) * spatial) * activations.unsqueeze(0)).sum(2)


def check_positive_int(value: object, name: str) -> int:
    """``value`` as an int >= 1, or a ValueError naming the option."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)
