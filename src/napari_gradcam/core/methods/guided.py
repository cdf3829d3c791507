"""Input-gradient methods: Guided Backpropagation and Guided Grad-CAM, maps (N, C, *spatial).

Their maps keep the input's channel axis: one map per input channel (a dual-energy CT pair,
stacked EDS element maps). :func:`napari_gradcam.core.methods.heatmaps` turns them into one
map per sample (max |gradient| over channels) or keeps the channels (``channels="per-channel"``).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import nn

from napari_gradcam.core.device import resolve_device
from napari_gradcam.core.engine import LayerSpec, check_input, preserved_model_state
from napari_gradcam.core.methods.base import CAMResult, MethodTraits
from napari_gradcam.core.methods.gradient import GradCAM
from napari_gradcam.core.outputs import OutputSpec, select_output
from napari_gradcam.core.targets import (
    AllClasses,
    ClassTarget,
    PredictedClass,
    TargetSpec,
    resolve_target,
)


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


class GuidedBackprop(MethodTraits):
    """Guided Backpropagation (Springenberg et al. 2015): input gradients through guided ReLUs.

    Every ``nn.ReLU`` module's output is recomputed by a guided ReLU through a forward hook
    (functional ``F.relu`` calls cannot be reached this way: the result then falls back to
    plain gradients there, and a warning says when no ReLU module was found). Returns
    ``(N, C, *spatial)``: fine-grained but not class-discriminative on its own.
    """

    name = "guided-backprop"
    title = "Guided Backpropagation"
    reference = "Springenberg et al. 2015"
    input_gradients = True
    needs_layer = False
    one_target_at_a_time = True
    cost = "1 forward + 1 backward pass to the input"

    def __init__(self, model: nn.Module, *, device: str | torch.device | None = None,
                 output: OutputSpec = None) -> None:
        self.model = model
        self.output = output  # which tensor of a tuple/dict output (see core.outputs)
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
                outputs = select_output(self.model(leaf), self.output).float()
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


class GuidedGradCAM(MethodTraits):
    """Guided Grad-CAM: Guided Backprop gradients × the upsampled Grad-CAM (Selvaraju 2017).

    Returns ``(N, C, *spatial)``; the CAM itself is in ``result.extras["cam"]``.
    """

    name = "guided-gradcam"
    title = "Guided Grad-CAM"
    reference = "Selvaraju et al. 2017"
    input_gradients = True
    one_target_at_a_time = True
    cost = "2 forward passes, 1 backward to the layer and 1 to the input"

    def __init__(self, model: nn.Module, layer: LayerSpec, *,
                 device: str | torch.device | None = None, amp: str | None = None,
                 output: OutputSpec = None, **token_layout: object) -> None:
        # token_layout: patch_grid, class_token, channels_last for a transformer layer
        self.gradcam = GradCAM(model, layer, device=device, amp=amp, output=output,
                               **token_layout)  # type: ignore[arg-type]
        self.guided = GuidedBackprop(model, output=output)
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
