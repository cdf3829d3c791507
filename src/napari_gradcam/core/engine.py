"""The machinery under every CAM method: find the layer, run the model once, take the gradient.

Why it is fast: the model runs in ``no_grad`` mode with every parameter's ``requires_grad``
switched off, so nothing before the target layer records an autograd graph.
A forward hook switches grad mode on and swaps the target layer's output for a detached leaf
that requires grad; only the layers after it (usually just the head) record a graph, and
``torch.autograd.grad(score, activation)`` walks back exactly that far. No parameter
gradients are computed, nothing is kept for the layers before the target. A Grad-CAM costs
about one forward pass.

Why it is safe: :func:`preserved_model_state` restores every module's train/eval mode and every
parameter's ``requires_grad`` and removes the hooks, also when the model raises half-way.
"""

from __future__ import annotations

import contextlib
import difflib
import warnings
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from napari_gradcam.core.device import autocast_context
from napari_gradcam.core.outputs import OutputSpec, select_output
from napari_gradcam.core.preprocess import overflow_problem
from napari_gradcam.core.targets import AllClasses, Target
from napari_gradcam.core.tokens import FeatureMapView, TokenLayout, feature_map_view

LayerSpec = str | nn.Module | Sequence[str | nn.Module]

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
               nn.ConvTranspose3d)


class LayerNotFoundError(KeyError):
    """The requested layer is not in the model; the message lists the layers that are."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


def conv_layer_names(model: nn.Module) -> list[str]:
    """Names of the modules that make feature maps: convolutions and the blocks holding them."""
    names = []
    for name, module in model.named_modules():
        if name and any(isinstance(m, _CONV_TYPES) for m in module.modules()):
            names.append(name)
    return names


def _short_list(names: list[str], limit: int = 40, keep: Sequence[str] = ()) -> str:
    """At most about ``limit`` names; the names in ``keep`` (close matches) are never cut."""
    if len(names) <= limit:
        return ", ".join(names)
    kept = set(keep) & set(names)
    head = set(names[:max(limit - len(kept), 0)])
    shown = [name for name in names if name in head or name in kept]
    return ", ".join(shown) + f", ... ({len(names) - len(shown)} more)"


def _did_you_mean(name: str, choices: Sequence[str]) -> list[str]:
    """The names closest to a mistyped one (difflib), best first; at most three."""
    return difflib.get_close_matches(name, [c for c in choices if c], n=3, cutoff=0.6)


def resolve_layers(model: nn.Module, layer: LayerSpec) -> list[tuple[str, nn.Module]]:
    """Turn a dotted name, a module, or a list of either into ``(name, module)`` pairs."""
    specs = [layer] if isinstance(layer, (str, nn.Module)) else list(layer)
    if not specs:
        raise ValueError("no target layer given: name at least one layer, e.g. 'features.3'")
    modules = dict(model.named_modules())
    names_by_module = {id(m): n for n, m in modules.items()}
    resolved = []
    for spec in specs:
        if isinstance(spec, nn.Module):
            if id(spec) not in names_by_module:
                raise LayerNotFoundError("the given module is not part of this model")
            resolved.append((names_by_module[id(spec)] or "<model>", spec))
        elif isinstance(spec, str):
            if spec not in modules or spec == "":
                close = _did_you_mean(spec, list(modules))
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise LayerNotFoundError(
                    f"the model has no layer {spec!r}{hint}. Layers that make feature maps: "
                    f"{_short_list(conv_layer_names(model), keep=close)}"
                )
            resolved.append((spec, modules[spec]))
        else:
            raise TypeError(f"a layer is a dotted name or a module, not {type(spec).__name__}")
    return resolved


def first_conv(model: nn.Module) -> nn.Module | None:
    """The first convolution in registration order: it tells the input channels and dims."""
    return next((m for m in model.modules() if isinstance(m, _CONV_TYPES)), None)


@contextlib.contextmanager
def preserved_model_state(model: nn.Module) -> Iterator[None]:
    """Put the model in eval mode with frozen parameters; restore both exactly on exit."""
    training = {module: module.training for module in model.modules()}
    requires_grad = {param: param.requires_grad for param in model.parameters()}
    if model.training:
        warnings.warn(
            "the model was in training mode; it is explained in eval mode (BatchNorm and dropout "
            "would otherwise change the prediction) and put back in training mode afterwards",
            UserWarning,
            stacklevel=4,
        )
    try:
        model.eval()
        for param in requires_grad:
            param.requires_grad_(False)
        yield
    finally:
        for module, was_training in training.items():
            module.training = was_training
        for param, flag in requires_grad.items():
            param.requires_grad_(flag)


class ActivationCapture:
    """Forward hooks that record (and, where needed, cut the graph at) the target layers.

    A hooked output that does not require grad lies upstream of every other cut: it is
    replaced by a detached leaf that requires grad, which is where backpropagation will stop.
    A hooked output that already requires grad lies downstream of a cut and is recorded as it
    is, so several layers (multi-layer fusion) share one forward and one backward pass. The
    model downstream gets a clone, so in-place operations (``ReLU(inplace=True)``) cannot
    alter the recorded activation.
    """

    def __init__(self, layers: list[tuple[str, nn.Module]], cut_graph: bool = True) -> None:
        self.layers = layers
        self.cut_graph = cut_graph
        self.activations: dict[str, torch.Tensor] = {}
        self.calls: dict[str, int] = {name: 0 for name, _ in layers}
        self.problems: dict[str, str] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> ActivationCapture:
        for name, module in self.layers:
            self._handles.append(module.register_forward_hook(self._make_hook(name)))
        return self

    def __exit__(self, *exc_info: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _make_hook(self, name: str):
        def hook(module: nn.Module, inputs: tuple, output: object) -> object:
            self.calls[name] += 1
            if not isinstance(output, torch.Tensor):
                self.problems[name] = f"returns a {type(output).__name__}, not a tensor"
                return None
            if self.cut_graph and not output.requires_grad:
                # The layers before ran with grad mode off; from here on record the graph.
                torch.set_grad_enabled(True)
                output = output.detach().requires_grad_(True)
            self.activations[name] = output
            return output.clone() if output.requires_grad else None

        return hook


def model_dtype_device(model: nn.Module) -> tuple[torch.dtype, torch.device]:
    """The floating dtype and device of the model's first floating parameter or buffer.

    Inputs are moved to these rather than moving the model, so a model on the GPU stays there
    and a float64 model gets float64 inputs.
    """
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.is_floating_point():
            return tensor.dtype, tensor.device
    return torch.float32, torch.device("cpu")


def check_input(x: object, model: nn.Module) -> torch.Tensor:
    """Validate a batch ``(N, C, *spatial)`` and return it as a float tensor.

    Every rejection says what was expected and how to fix it, because "mat1 and mat2 shapes
    cannot be multiplied" from deep inside a model helps nobody.
    """
    if isinstance(x, torch.Tensor):
        tensor = x
    elif isinstance(x, np.ndarray) or hasattr(x, "__array__"):
        tensor = torch.from_numpy(np.ascontiguousarray(np.asarray(x)))
    else:
        raise TypeError(f"expected a torch tensor or an array, got {type(x).__name__}")
    if tensor.dtype == torch.bool or tensor.is_complex():
        raise TypeError(f"the input has dtype {tensor.dtype}; give real numbers (float32)")
    # float64 NumPy arrays and integer images meet a float32 model (or a float64 one)
    original, tensor = tensor, tensor.to(model_dtype_device(model)[0])
    if tensor.ndim not in (3, 4, 5):
        raise ValueError(
            f"expected a batch of shape (N, C, *spatial) with 1, 2 or 3 spatial dims, got shape "
            f"{tuple(tensor.shape)}; add the batch and channel axes (e.g. x[None, None]) or use "
            "explain_volume for a whole stack"
        )
    if tensor.numel() == 0:
        raise ValueError(f"the input is empty (shape {tuple(tensor.shape)})")
    finite = torch.isfinite(tensor)
    if not bool(finite.all()):
        overflow = overflow_problem(original, tensor.dtype)
        if overflow:  # finite data beyond the model's dtype, not NaN in the data
            raise ValueError(overflow)
        bad = int((~finite).sum())
        raise ValueError(
            f"the input holds {bad} NaN or infinite values; fill or mask them before explaining "
            "(a CAM of NaN is NaN everywhere)"
        )
    conv = first_conv(model)
    if conv is not None:
        dims = len(conv.kernel_size)
        if tensor.ndim - 2 != dims:
            raise ValueError(
                f"the model is a {dims}D network (its first layer is {type(conv).__name__}) but "
                f"the input has {tensor.ndim - 2} spatial dims, shape {tuple(tensor.shape)}"
                + ("; explain a volume with a 2D model slice by slice: explain_volume(mode="
                   "'slices')" if dims == 2 and tensor.ndim == 5 else "")
            )
        if tensor.shape[1] != conv.in_channels:
            raise ValueError(
                f"the model expects {conv.in_channels} input channel(s) but the input has "
                f"{tensor.shape[1]} (shape {tuple(tensor.shape)})"
                + ("; replicate grey to RGB with x.repeat(1, 3, ...) or the card's "
                   "repeat_channels step" if conv.in_channels == 3 and tensor.shape[1] == 1
                   else "")
            )
    return tensor


@dataclass
class LayerGradients:
    """Activations A and gradients dy/dA for one layer, float32, shape (N, C, *spatial)."""

    name: str
    activations: torch.Tensor
    gradients: torch.Tensor  # (N, C, *spatial), or (K, N, C, *spatial) for all classes


@dataclass
class ForwardBackward:
    """One forward and the backward passes of a CAM: what every method combines."""

    outputs: torch.Tensor
    scores: torch.Tensor | None
    class_indices: np.ndarray | None
    layers: list[LayerGradients] = field(default_factory=list)


def captured_activation(name: str, capture: ActivationCapture) -> torch.Tensor:
    """The output the hook recorded for layer ``name``, or a ValueError that says why there is
    none (the layer returned no tensor, or the forward pass never called it)."""
    if name in capture.problems:
        raise ValueError(f"layer {name!r} {capture.problems[name]}; pick a layer that returns a "
                         "feature map")
    if name not in capture.activations:
        raise ValueError(f"layer {name!r} was not used by the model's forward pass")
    return capture.activations[name]


def _validate_activation(name: str, capture: ActivationCapture, x: torch.Tensor,
                         model: nn.Module, tokens: TokenLayout | None = None,
                         module: nn.Module | None = None
                         ) -> tuple[torch.Tensor, FeatureMapView]:
    """The layer's raw output and how to read it as (N, C, *grid) (tokens, channels-last)."""
    activation = captured_activation(name, capture)
    view = feature_map_view(name, tuple(activation.shape), tuple(x.shape), model, tokens, module)
    if view is None:
        raise ValueError(
            f"layer {name!r} outputs shape {tuple(activation.shape)}, which is not a feature map "
            f"(N, C, *spatial) like the input {tuple(x.shape)}. Layers that make feature maps: "
            f"{_short_list(conv_layer_names(model))}"
        )
    if capture.calls[name] > 1:
        warnings.warn(f"layer {name!r} ran {capture.calls[name]} times in one forward pass; its "
                      "last call is explained", UserWarning, stacklevel=4)
    return activation, view


def _warn_if_probabilities(outputs: torch.Tensor) -> None:
    if outputs.ndim == 2 and outputs.shape[1] > 1:
        rows = outputs.detach().float()
        if bool((rows >= 0).all()) and torch.allclose(rows.sum(1), torch.ones(len(rows),
                                                      device=rows.device), atol=1e-4):
            warnings.warn(
                "the model's outputs look like probabilities (each row sums to 1). Gradients of "
                "a saturated softmax vanish; explain the logits (remove the final Softmax)",
                UserWarning, stacklevel=4)


def _warn_if_zero_gradient(layers: list[LayerGradients]) -> None:
    # any() is one pass without a temporary (abs().amax() made a copy of the gradients); a
    # sample whose gradient holds a NaN counts as non-zero, as it did
    all_zero = ~layers[0].gradients.flatten(2).any(-1)  # (K, N)
    if bool(all_zero.any()):
        warnings.warn(
            f"the gradient of the target with respect to layer {layers[0].name!r} is exactly zero"
            " for some samples, so their maps are zero. The score is saturated or does not depend"
            " on this layer: if the target is a probability (softmax/sigmoid output), explain the"
            " logit instead, or choose another layer.",
            UserWarning, stacklevel=4)


def _warn_if_one_by_one(model: nn.Module, x: torch.Tensor,
                        layers: list[LayerGradients]) -> None:
    """Warn when a target layer's feature map is 1×1(×1): its CAM is one value everywhere.

    A global pooling layer (``AdaptiveAvgPool2d(1)``) is a tempting name to type, and the
    result, a constant map, looks like a (dull) answer. The warning names the layer to use
    instead, found the way the default layer is chosen (a dry run at this input's size); it
    runs after the hooks and model state of the real pass are gone.
    """
    flat = [layer for layer in layers if layer.activations.ndim > 2
            and all(size == 1 for size in layer.activations.shape[2:])]
    if not flat or all(size == 1 for size in x.shape[2:]):
        return
    advice = _one_by_one_advice(model, tuple(x.shape[1:]))
    for layer in flat:
        shape = "×".join(str(s) for s in layer.activations.shape[1:])
        warnings.warn(
            f"layer {layer.name!r} outputs a feature map of one pixel (C×spatial = {shape}) for "
            f"an input of {'×'.join(str(s) for s in x.shape[2:])}, so its map is the same value "
            f"everywhere and shows nothing about where the model looks.{advice}",
            UserWarning, stacklevel=4)


_ADVICE: weakref.WeakKeyDictionary[nn.Module, dict[tuple[int, ...], str]] = (
    weakref.WeakKeyDictionary())
"""The 1×1 advice per model and input shape: found by a dry run, so a volume explained batch by
batch pays for that run once, not once per batch."""


def _one_by_one_advice(model: nn.Module, input_shape: tuple[int, ...]) -> str:
    known = _ADVICE.setdefault(model, {})
    if input_shape not in known:
        from napari_gradcam.core.layer_discovery import last_spatial_layer  # imports this module

        try:
            better = last_spatial_layer(model, input_shape)
        except (ValueError, RuntimeError, TypeError):  # the advice is optional, not the warning
            better = None
        known[input_shape] = (
            f" Explain the last layer with spatial extent instead: {better.name!r} (output "
            f"{'×'.join(str(s) for s in better.output_shape)})." if better is not None else
            " Choose a layer before the global pooling.")
    return known[input_shape]


def forward_backward(
    model: nn.Module,
    x: torch.Tensor,
    layers: list[tuple[str, nn.Module]],
    target: Target,
    *,
    device: torch.device,
    amp: str | None = None,
    need_gradients: bool = True,
    output: OutputSpec = None,
    tokens: TokenLayout | None = None,
) -> ForwardBackward:
    """Run the model once with the graph cut at the layers, then differentiate the target.

    ``AllClasses`` runs one cheap backward pass per class over the same graph (retained),
    giving gradients of shape ``(K, N, C, *spatial)``. Warns when a layer's map is 1×1.
    """
    result = _forward_backward(model, x, layers, target, device=device, amp=amp,
                               need_gradients=need_gradients, output=output, tokens=tokens)
    _warn_if_one_by_one(model, x, result.layers)
    return result


def _forward_backward(
    model: nn.Module,
    x: torch.Tensor,
    layers: list[tuple[str, nn.Module]],
    target: Target,
    *,
    device: torch.device,
    amp: str | None = None,
    need_gradients: bool = True,
    output: OutputSpec = None,
    tokens: TokenLayout | None = None,
) -> ForwardBackward:
    """:func:`forward_backward` without the check of the layers' map sizes."""
    x = x.to(device)
    # enable_grad: scoring and differentiation work even when the caller is inside no_grad.
    with preserved_model_state(model), ActivationCapture(layers) as capture, torch.enable_grad():
        # Grad mode is off until the first target layer's hook switches it on, so the body of
        # the network runs exactly like inference; the context restores the caller's mode.
        with torch.no_grad(), autocast_context(device, amp):
            try:
                outputs = model(x)
            except (RuntimeError, ValueError, TypeError) as error:
                if "out of memory" in str(error).lower():
                    raise
                raise RuntimeError(
                    f"the model failed on an input of shape {tuple(x.shape)}: {error}"
                ) from error
        outputs = select_output(outputs, output)  # a tuple or dict: the tensor asked for
        # Tokens (N, T, C) and channels-last maps are differentiated as the layer made them;
        # the views (linear, index-only) turn activations and gradients into (N, C, *grid).
        checked = [_validate_activation(name, capture, x, model, tokens, module)
                   for name, module in layers]
        activations = [activation for activation, _ in checked]
        views = [view for _, view in checked]
        outputs_float = outputs.float()
        _warn_if_probabilities(outputs_float)
        result = ForwardBackward(outputs=outputs_float.detach(), scores=None, class_indices=None)
        if not need_gradients:
            result.class_indices = (None if isinstance(target, AllClasses)
                                    else target.class_indices(outputs_float))
            result.layers = [LayerGradients(name, view(a.detach()).float(), torch.empty(0))
                             for (name, _), a, view in zip(layers, activations, views,
                                                           strict=True)]
            return result
        if not outputs_float.requires_grad:
            raise ValueError("the model's output does not depend on the target layer(s) "
                             f"{[name for name, _ in layers]}")
        if isinstance(target, AllClasses):
            if outputs_float.ndim < 2:
                raise ValueError("'all classes' needs an output with a class axis (N, K, ...)")
            per_class = []
            n_classes = outputs_float.shape[1]
            for k in range(n_classes):
                score = outputs_float[:, k].reshape(len(outputs_float), -1).sum(1)
                per_class.append(torch.autograd.grad(score.sum(), activations,
                                                     retain_graph=k < n_classes - 1,
                                                     allow_unused=True))
            gradients = [torch.stack([_zeros_if_none(g[i], activations[i]) for g in per_class])
                         for i in range(len(layers))]
            result.scores = None
        else:
            score = target.score(outputs_float)
            grads = torch.autograd.grad(score.sum(), activations, allow_unused=True)
            gradients = [_zeros_if_none(g, a).unsqueeze(0) for g, a in
                         zip(grads, activations, strict=True)]
            result.scores = score.detach()
            result.class_indices = target.class_indices(outputs_float)
        for (name, _), view, g in zip(layers, views, gradients, strict=True):
            view.warn_if_only_class_token_reached(name, g)
        result.layers = [
            LayerGradients(name, view(a.detach()).float(), view(g).float())
            for (name, _), a, g, view in zip(layers, activations, gradients, views, strict=True)
        ]
        _warn_if_zero_gradient(result.layers)
        return result


def _zeros_if_none(gradient: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like) if gradient is None else gradient

