"""The CAM methods: how each one weighs the target layer's channels.

All gradient methods share one forward and one backward pass (:mod:`engine`) and differ only
in :meth:`BaseCAM.combine`, which turns activations ``A`` (N, C, *s) and gradients
``G = dy/dA`` (K, N, C, *s) into maps (K, N, *s). Adding a method means writing one
``combine``.

- Grad-CAM (Selvaraju 2017):       ReLU(sum_k mean_s(G_k) A_k)
- Grad-CAM++ (Chattopadhay 2018):  ReLU(sum_k [sum_s a_k ReLU(G_k)] A_k),
                                   a = G^2 / (2 G^2 + sum_s(A) G^3)
- HiResCAM (Draelos 2020):         ReLU(sum_k G_k * A_k)
- XGradCAM (Fu 2020):              ReLU(sum_k [sum_s A_k G_k / sum_s A_k] A_k)
- LayerCAM (Jiang 2021):           ReLU(sum_k ReLU(G_k) * A_k)
- CAM (Zhou 2016):                 ReLU(sum_k W_ck A_k), GAP + linear head, no gradients

With several layers (multi-layer fusion) each layer's map is upsampled to the common size,
divided by its per-sample maximum (layers differ in scale) and the maps are averaged
(``fusion="mean"``), or combined by ``"max"`` or ``"product"``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from napari_gradcam.core.device import resolve_device
from napari_gradcam.core.engine import (
    ForwardBackward,
    LayerGradients,
    LayerSpec,
    check_input,
    forward_backward,
    preserved_model_state,
    resolve_layers,
)
from napari_gradcam.core.targets import (
    AllClasses,
    CallableTarget,
    ClassTarget,
    PredictedClass,
    SegmentationRegion,
    TargetSpec,
    resolve_target,
)

_INTERPOLATION = {1: "linear", 2: "bilinear", 3: "trilinear"}
_EPS = 1e-12


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
    def probabilities(self) -> np.ndarray:
        """Softmax over the class axis of the model outputs (for classifiers and U-Nets)."""
        logits = torch.from_numpy(self.outputs)
        return torch.softmax(logits, dim=1).numpy() if logits.ndim >= 2 else self.outputs


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
        return maps / high.clamp_min(_EPS)
    if how == "minmax":
        low = flat.amin(-1).reshape(high.shape)
        return (maps - low) / (high - low).clamp_min(_EPS)
    raise ValueError(f"normalize must be None, 'minmax' or 'max', got {how!r}")


def _spatial_axes(tensor: torch.Tensor, first: int) -> tuple[int, ...]:
    return tuple(range(first, tensor.ndim))


class BaseCAM:
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
    """

    name = "base"
    needs_gradients = True

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

    @property
    def layer_names(self) -> list[str]:
        return [name for name, _ in self.layers]

    def __call__(self, x: torch.Tensor | np.ndarray, target: TargetSpec = None) -> np.ndarray:
        """Maps ``(N, *spatial)``, or ``(N, K, *spatial)`` for ``target="all"``."""
        return self.explain(x, target).maps

    def combine(self, layer: LayerGradients, passes: ForwardBackward) -> torch.Tensor:
        """Activations (N, C, *s) and gradients (K, N, C, *s) → maps (K, N, *s), after ReLU."""
        raise NotImplementedError

    def explain(self, x: torch.Tensor | np.ndarray, target: TargetSpec = None) -> CAMResult:
        """Run the method on a batch and return the maps with predictions and provenance."""
        tensor = check_input(x, self.model)
        resolved = resolve_target(target)
        passes = forward_backward(self.model, tensor, self.layers, resolved, device=self.device,
                                  amp=self.amp, need_gradients=self.needs_gradients)
        input_size = tuple(tensor.shape[2:])
        spatial_dims = len(input_size)
        per_layer = [self.combine(layer, passes) for layer in passes.layers]
        maps = self._fuse(per_layer, input_size, spatial_dims)
        maps = normalize_maps(maps, self.normalize, spatial_dims)
        maps = maps.transpose(0, 1) if isinstance(resolved, AllClasses) else maps[0]
        return CAMResult(
            maps=maps.detach().cpu().float().numpy(),
            outputs=passes.outputs.cpu().numpy(),
            target_indices=passes.class_indices,
            scores=None if passes.scores is None else passes.scores.cpu().numpy(),
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


def _weighted_sum(weights: torch.Tensor, activations: torch.Tensor) -> torch.Tensor:
    """sum_k w_k A_k with weights (K, N, C) and activations (N, C, *s) → (K, N, *s)."""
    spatial = activations.ndim - 2
    return (weights.reshape(*weights.shape, *(1,) * spatial) * activations.unsqueeze(0)).sum(2)


class GradCAM(BaseCAM):
    """Grad-CAM: channel weights are the spatial mean of the gradient (Selvaraju et al. 2017)."""

    name = "gradcam"

    def combine(self, layer: LayerGradients, passes: ForwardBackward) -> torch.Tensor:
        weights = layer.gradients.mean(dim=_spatial_axes(layer.gradients, 3))
        return F.relu(_weighted_sum(weights, layer.activations))


class GradCAMPlusPlus(BaseCAM):
    """Grad-CAM++: pixel-wise weights a = G²/(2G² + ΣA·G³) on positive gradients.

    Uses the closed form of Chattopadhay et al. (2018) for an exponential of the score, as
    their reference code does; positions where the denominator is zero get a = 0.
    """

    name = "gradcam++"

    def combine(self, layer: LayerGradients, passes: ForwardBackward) -> torch.Tensor:
        gradients, activations = layer.gradients, layer.activations
        spatial_axes = _spatial_axes(activations, 2)
        activation_sums = activations.sum(dim=spatial_axes, keepdim=True).unsqueeze(0)
        g2 = gradients.pow(2)
        denominator = 2 * g2 + activation_sums * gradients.pow(3)
        alpha = torch.where(denominator != 0, g2 / torch.where(denominator != 0, denominator,
                                                                  torch.ones_like(denominator)),
                            torch.zeros_like(g2))
        weights = (alpha * F.relu(gradients)).sum(dim=_spatial_axes(gradients, 3))
        return F.relu(_weighted_sum(weights, activations))


class HiResCAM(BaseCAM):
    """HiResCAM: element-wise gradient × activation, summed over channels (Draelos & Carin 2020).

    Provably faithful to the score for a model whose head is linear in the activations; equals
    Grad-CAM exactly when the gradient is constant over space (a GAP + linear head).
    """

    name = "hirescam"

    def combine(self, layer: LayerGradients, passes: ForwardBackward) -> torch.Tensor:
        return F.relu((layer.gradients * layer.activations.unsqueeze(0)).sum(2))


class XGradCAM(BaseCAM):
    """XGradCAM: weights Σ_s A_k G_k / Σ_s A_k (Fu et al. 2020), axiom-derived."""

    name = "xgradcam"

    def combine(self, layer: LayerGradients, passes: ForwardBackward) -> torch.Tensor:
        activations = layer.activations.unsqueeze(0)
        axes = _spatial_axes(layer.gradients, 3)
        sums = activations.sum(dim=axes)
        safe = torch.where(sums.abs() > _EPS, sums, torch.full_like(sums, _EPS))
        weights = (activations * layer.gradients).sum(dim=axes) / safe
        return F.relu(_weighted_sum(weights, layer.activations))


class LayerCAM(BaseCAM):
    """LayerCAM: ReLU(Σ_k ReLU(G_k) ⊙ A_k) (Jiang et al. 2021); sharp on early layers too."""

    name = "layercam"

    def combine(self, layer: LayerGradients, passes: ForwardBackward) -> torch.Tensor:
        return F.relu((F.relu(layer.gradients) * layer.activations.unsqueeze(0)).sum(2))


def _last_linear(model: nn.Module) -> tuple[str, nn.Linear]:
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("CAM needs a linear classifier after global average pooling; this model "
                         "has no nn.Linear. Use GradCAM, which works for any head.")
    return linears[-1]


class CAM(BaseCAM):
    """Class Activation Mapping (Zhou et al. 2016) for GAP + linear classifiers, no gradients.

    The map is ReLU(Σ_k W_ck A_k) with W the linear head's weights (bias excluded). For such
    models Grad-CAM equals this map divided by the number of feature-map positions, which
    the tests check. ``classifier`` names the head (default: the model's last ``nn.Linear``).
    """

    name = "cam"
    needs_gradients = False

    def __init__(self, model: nn.Module, layer: LayerSpec, *, classifier: str | None = None,
                 **options: object) -> None:
        super().__init__(model, layer, **options)  # type: ignore[arg-type]
        if classifier is None:
            self.classifier_name, self.classifier = _last_linear(model)
        else:
            (self.classifier_name, head), = resolve_layers(model, classifier)
            if not isinstance(head, nn.Linear):
                raise ValueError(f"CAM's classifier {classifier!r} must be an nn.Linear, it is "
                                 f"a {type(head).__name__}")
            self.classifier = head

    def explain(self, x: torch.Tensor | np.ndarray, target: TargetSpec = None) -> CAMResult:
        if isinstance(resolve_target(target), (CallableTarget, SegmentationRegion)):
            raise ValueError("CAM explains classes of a GAP + linear classifier; for a callable "
                             "or segmentation target use GradCAM")
        return super().explain(x, target)

    def combine(self, layer: LayerGradients, passes: ForwardBackward) -> torch.Tensor:
        weight = self.classifier.weight.detach().float().to(layer.activations.device)
        channels = layer.activations.shape[1]
        if weight.shape[1] != channels:
            raise ValueError(
                f"CAM needs the classifier {self.classifier_name!r} to read the layer "
                f"{layer.name!r} through global average pooling: it has {weight.shape[1]} inputs "
                f"but the layer has {channels} channels"
            )
        if passes.class_indices is None:  # all classes
            weights = weight.unsqueeze(1).expand(-1, layer.activations.shape[0], -1)
        else:
            index = torch.as_tensor(passes.class_indices, device=weight.device)
            weights = weight[index].unsqueeze(0)
        return F.relu(_weighted_sum(weights, layer.activations))


class _GuidedReLU(torch.autograd.Function):
    """ReLU whose backward passes only positive gradients at positive inputs."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return x.clamp_min(0)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return grad * (x > 0).to(grad.dtype) * (grad > 0).to(grad.dtype)


class GuidedBackprop:
    """Guided Backpropagation (Springenberg et al. 2015): input gradients through guided ReLUs.

    Every ``nn.ReLU`` module's output is recomputed by a guided ReLU through a forward hook
    (functional ``F.relu`` calls cannot be reached this way: the result then falls back to
    plain gradients there, and a warning says when no ReLU module was found). Returns
    ``(N, C, *spatial)``: fine-grained but not class-discriminative on its own.
    """

    name = "guided-backprop"

    def __init__(self, model: nn.Module, *, device: str | torch.device | None = None) -> None:
        self.model = model
        self.device = resolve_device(device, model)
        if device is not None:
            model.to(self.device)

    def __call__(self, x: torch.Tensor | np.ndarray, target: TargetSpec = None) -> np.ndarray:
        return self.explain(x, target).maps

    def explain(self, x: torch.Tensor | np.ndarray, target: TargetSpec = None) -> CAMResult:
        tensor = check_input(x, self.model).to(self.device)
        resolved = resolve_target(target)
        if isinstance(resolved, AllClasses):
            raise ValueError("Guided Backpropagation explains one target at a time; loop over "
                             "the classes")
        relus = [m for m in self.model.modules() if isinstance(m, nn.ReLU)]
        if not relus:
            warnings.warn("the model has no nn.ReLU modules, so Guided Backpropagation equals "
                          "the plain input gradient", UserWarning, stacklevel=2)
        handles = [m.register_forward_hook(_guided_relu_hook) for m in relus]
        try:
            with preserved_model_state(self.model), torch.enable_grad():
                leaf = tensor.detach().clone().requires_grad_(True)
                outputs = self.model(leaf).float()
                score = resolved.score(outputs)
                (gradient,) = torch.autograd.grad(score.sum(), leaf)
        finally:
            for handle in handles:
                handle.remove()
        return CAMResult(
            maps=gradient.detach().cpu().float().numpy(),
            outputs=outputs.detach().cpu().numpy(),
            target_indices=resolved.class_indices(outputs),
            scores=score.detach().cpu().numpy(),
            method=self.name,
            layers=[],
            feature_shapes=[],
            target=resolved.describe(),
        )


def _guided_relu_hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    return _GuidedReLU.apply(inputs[0])


class GuidedGradCAM:
    """Guided Grad-CAM: Guided Backprop gradients × the upsampled Grad-CAM (Selvaraju 2017).

    Returns ``(N, C, *spatial)``; the CAM itself is in ``result.extras["cam"]``.
    """

    name = "guided-gradcam"

    def __init__(self, model: nn.Module, layer: LayerSpec, *,
                 device: str | torch.device | None = None, amp: str | None = None) -> None:
        self.gradcam = GradCAM(model, layer, device=device, amp=amp)
        self.guided = GuidedBackprop(model)
        self.model = model

    def __call__(self, x: torch.Tensor | np.ndarray, target: TargetSpec = None) -> np.ndarray:
        return self.explain(x, target).maps

    def explain(self, x: torch.Tensor | np.ndarray, target: TargetSpec = None) -> CAMResult:
        cam = self.gradcam.explain(x, target)
        resolved = resolve_target(target)
        if isinstance(resolved, PredictedClass) and cam.target_indices is not None:
            # Both halves explain the class Grad-CAM explained (fixed, not re-predicted).
            resolved = ClassTarget(tuple(int(i) for i in cam.target_indices))
        guided = self.guided.explain(x, resolved)
        guided.maps = guided.maps * cam.maps[:, None]
        guided.method, guided.layers = self.name, cam.layers
        guided.feature_shapes = cam.feature_shapes
        guided.extras["cam"] = cam.maps
        return guided


METHODS: dict[str, Callable[..., object]] = {
    "gradcam": GradCAM,
    "gradcam++": GradCAMPlusPlus,
    "hirescam": HiResCAM,
    "xgradcam": XGradCAM,
    "layercam": LayerCAM,
    "cam": CAM,
    "guided-backprop": GuidedBackprop,
    "guided-gradcam": GuidedGradCAM,
}
"""Method names as the GUI, the command line and model cards spell them."""


INPUT_GRADIENT_METHODS = frozenset({GuidedBackprop.name, GuidedGradCAM.name})
"""Methods whose maps are input gradients (N, C, *spatial) rather than one map per sample."""


def heatmaps(maps: np.ndarray, method: str) -> np.ndarray:
    """One map per sample for display and volumes: input-gradient methods give
    (N, C, *spatial), shown as max |gradient| over channels (as Simonyan et al. 2014 do for
    saliency); every CAM is returned unchanged."""
    maps = np.asarray(maps, dtype=np.float32)
    return np.abs(maps).max(axis=1) if method in INPUT_GRADIENT_METHODS else maps


def make_explainer(method: str, model: nn.Module, layer: LayerSpec, **options: object) -> object:
    """Build an explainer by name; the single place the shells turn a method name into code."""
    try:
        factory = METHODS[method]
    except KeyError:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}") from None
    if factory is GuidedBackprop:
        return GuidedBackprop(model, device=options.get("device"))  # type: ignore[arg-type]
    return factory(model, layer, **options)
