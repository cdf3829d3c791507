"""Gradient-weighted CAMs: one forward pass and one backward pass to the target layer.

They differ only in :meth:`~BaseCAM.combine`, which turns activations ``A`` (N, C, *s) and
gradients ``G = dy/dA`` (K, N, C, *s) into maps (K, N, *s):

- Grad-CAM (Selvaraju 2017):          ReLU(sum_k mean_s(G_k) A_k)
- Grad-CAM++ (Chattopadhay 2018):     ReLU(sum_k [sum_s a_k ReLU(G_k)] A_k),
                                      a = G^2 / (2 G^2 + sum_s(A) G^3)
- HiResCAM (Draelos 2020):            ReLU(sum_k G_k * A_k)
- XGrad-CAM (Fu 2020):                ReLU(sum_k [sum_s A_k G_k / sum_s A_k] A_k)
- LayerCAM (Jiang 2021):              ReLU(sum_k ReLU(G_k) * A_k)
- Grad-CAM element-wise:              ReLU(sum_k ReLU(G_k * A_k))
- Finer-CAM (Zhang 2025):             Grad-CAM of y_c - alpha * (the most similar classes)
- ShapleyCAM (Cai 2025):              ReLU(sum_k mean_s(G_k - H A / 2)_k A_k), H = d2y/dA2
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from napari_gradcam.core.device import autocast_context
from napari_gradcam.core.engine import (
    ActivationCapture,
    ForwardBackward,
    LayerGradients,
    LayerSpec,
    captured_activation,
    preserved_model_state,
)
from napari_gradcam.core.methods.base import (
    EPS,
    BaseCAM,
    CAMResult,
    check_positive_int,
    spatial_axes,
    weighted_sum,
)
from napari_gradcam.core.outputs import select_output
from napari_gradcam.core.targets import (
    AllClasses,
    ClassTarget,
    PredictedClass,
    Target,
    TargetSpec,
    resolve_target,
)


class GradCAM(BaseCAM):
    """Grad-CAM: channel weights are the spatial mean of the gradient (Selvaraju et al. 2017)."""

    name = "gradcam"
    title = "Grad-CAM"
    reference = "Selvaraju et al. 2017"

    def combine(self, layer: LayerGradients, passes: ForwardBackward) -> torch.Tensor:
        weights = layer.gradients.mean(dim=spatial_axes(layer.gradients, 3))
        return F.relu(weighted_sum(weights, layer.activations))


class GradCAMPlusPlus(BaseCAM):
    """Grad-CAM++: pixel-wise weights a = G²/(2G² + ΣA·G³) on positive gradients.

    Uses the closed form of Chattopadhay et al. (2018) for an exponential of the score, as
    their reference code does; positions where the denominator is zero get a = 0.
    """

    name = "gradcam++"
    title = "Grad-CAM++"
    reference = "Chattopadhay et al. 2018"

    def combine(self, layer: LayerGradients, passes: ForwardBackward) -> torch.Tensor:
        gradients, activations = layer.gradients, layer.activations
        axes = spatial_axes(activations, 2)
        activation_sums = activations.sum(dim=axes, keepdim=True).unsqueeze(0)
        g2 = gradients.pow(2)
        denominator = 2 * g2 + activation_sums * gradients.pow(3)
        alpha = torch.where(denominator != 0, g2 / torch.where(denominator != 0, denominator,
                                                                  torch.ones_like(denominator)),
                            torch.zeros_like(g2))
        weights = (alpha * F.relu(gradients)).sum(dim=spatial_axes(gradients, 3))
        return F.relu(weighted_sum(weights, activations))


class HiResCAM(BaseCAM):
    """HiResCAM: element-wise gradient × activation, summed over channels (Draelos & Carin 2020).

    Provably faithful to the score for a model whose head is linear in the activations; equals
    Grad-CAM exactly when the gradient is constant over space (a GAP + linear head).
    """

    name = "hirescam"
    title = "HiResCAM"
    reference = "Draelos & Carin 2020"

    def combine(self, layer: LayerGradients, passes: ForwardBackward) -> torch.Tensor:
        return F.relu((layer.gradients * layer.activations.unsqueeze(0)).sum(2))


class XGradCAM(BaseCAM):
    """XGradCAM: weights Σ_s A_k G_k / Σ_s A_k (Fu et al. 2020), axiom-derived."""

    name = "xgradcam"
    title = "XGrad-CAM"
    reference = "Fu et al. 2020"

    def combine(self, layer: LayerGradients, passes: ForwardBackward) -> torch.Tensor:
        activations = layer.activations.unsqueeze(0)
        axes = spatial_axes(layer.gradients, 3)
        sums = activations.sum(dim=axes)
        safe = torch.where(sums.abs() > EPS, sums, torch.full_like(sums, EPS))
        weights = (activations * layer.gradients).sum(dim=axes) / safe
        return F.relu(weighted_sum(weights, layer.activations))


class LayerCAM(BaseCAM):
    """LayerCAM: ReLU(Σ_k ReLU(G_k) ⊙ A_k) (Jiang et al. 2021); sharp on early layers too."""

    name = "layercam"
    title = "LayerCAM"
    reference = "Jiang et al. 2021"

    def combine(self, layer: LayerGradients, passes: ForwardBackward) -> torch.Tensor:
        return F.relu((F.relu(layer.gradients) * layer.activations.unsqueeze(0)).sum(2))


class GradCAMElementWise(BaseCAM):
    """Grad-CAM element-wise: ReLU(Σ_k ReLU(G_k ⊙ A_k)) (pytorch-grad-cam's GradCAMElementWise).

    HiResCAM with a ReLU on every channel's product before the sum: a position counts only the
    channels whose evidence for the class is positive there, so a channel cannot cancel
    another. (The outer ReLU is then a no-op; it is kept for the family's definition.)
    """

    name = "gradcam-elementwise"
    title = "Grad-CAM element-wise"
    reference = "Gildenblat et al., pytorch-grad-cam (2021)"

    def combine(self, layer: LayerGradients, passes: ForwardBackward) -> torch.Tensor:
        return F.relu(F.relu(layer.gradients * layer.activations.unsqueeze(0)).sum(2))


@dataclass(frozen=True)
class FinerTarget(Target):
    """Finer-CAM's score: the class logit minus ``alpha`` times its closest competitors.

    ``score = Σ_j p_j (y_c - alpha y_j) / Σ_j p_j`` over the ``compare`` classes j whose logits
    lie closest to y_c, weighted by their softmax probabilities p_j. The weights and the choice
    of j are taken from the output as constants (not differentiated), so the gradient is that
    of a weighted logit difference, which is what the method means.
    """

    base: Target
    alpha: float = 1.0
    compare: int = 1

    def class_indices(self, output: torch.Tensor) -> np.ndarray | None:
        return self.base.class_indices(output)

    def compared_classes(self, output: torch.Tensor) -> torch.Tensor:
        """(N, compare) indices of the classes whose logits are closest to the explained one."""
        classes = torch.as_tensor(self.base.class_indices(output), device=output.device)
        rows = torch.arange(output.shape[0], device=output.device)
        distance = (output.detach() - output.detach()[rows, classes][:, None]).abs()
        distance[rows, classes] = float("inf")
        return distance.topk(self.compare, dim=1, largest=False).indices

    def score(self, output: torch.Tensor) -> torch.Tensor:
        if output.ndim != 2 or output.shape[1] < 2:
            raise ValueError(
                f"Finer-CAM compares class logits: it needs a classifier output (N, K) with "
                f"K >= 2, got shape {tuple(output.shape)}"
            )
        if self.compare > output.shape[1] - 1:
            raise ValueError(f"Finer-CAM cannot compare with {self.compare} classes: the model "
                             f"has {output.shape[1]} classes")
        classes = torch.as_tensor(self.base.class_indices(output), device=output.device)
        rows = torch.arange(output.shape[0], device=output.device)
        others = self.compared_classes(output)
        weights = torch.softmax(output.detach(), dim=1).gather(1, others)
        differences = output[rows, classes][:, None] - self.alpha * output.gather(1, others)
        return (weights * differences).sum(1) / weights.sum(1).clamp_min(1e-12)

    def describe(self) -> str:
        return (f"{self.base.describe()} against its {self.compare} closest class(es), "
                f"alpha {self.alpha:g} (Finer-CAM)")


class FinerCAM(GradCAM):
    """Finer-CAM (Zhang et al. 2025): Grad-CAM of the difference to the most similar classes.

    Fine-grained classes (ferrite vs. bainite, two close XRD phases) share most of their
    evidence; Grad-CAM of one class lights up all of it. Finer-CAM explains
    ``y_c - alpha * y_d`` (see :class:`FinerTarget`), so what both classes share cancels and
    what tells them apart remains. ``alpha=0`` gives Grad-CAM back. ``result.extras
    ["compared_classes"]`` says which classes were compared.
    """

    name = "finercam"
    title = "Finer-CAM"
    reference = "Zhang et al. 2025"
    classifier_only = True
    one_target_at_a_time = True

    def __init__(self, model: nn.Module, layer: LayerSpec, *, alpha: float = 1.0,
                 compare: int = 1, **options: object) -> None:
        super().__init__(model, layer, **options)  # type: ignore[arg-type]
        self.alpha = float(alpha)
        self.compare = check_positive_int(compare, "compare")

    def explain(self, x: torch.Tensor | np.ndarray, target: TargetSpec = None) -> CAMResult:
        resolved = resolve_target(target)
        self.check_target(resolved)
        if not isinstance(resolved, (ClassTarget, PredictedClass)):
            raise ValueError("Finer-CAM explains a class index or the predicted class")
        finer = FinerTarget(resolved, self.alpha, self.compare)
        result = super().explain(x, finer)
        outputs = torch.from_numpy(result.outputs)
        result.extras["compared_classes"] = finer.compared_classes(outputs).numpy()
        return result


class ShapleyCAM(GradCAM):
    """ShapleyCAM (Cai et al. 2025): Grad-CAM weights from a second-order Shapley estimate.

    The channel weights are ``mean_s(G - ½ H A)``, with ``H A`` the Hessian-vector product of
    the score with respect to the activations, taken along the activations themselves: the
    second-order Taylor term of how the score changes when a channel is removed. For a head
    that is linear in the activations (GAP + linear) the Hessian is zero and ShapleyCAM equals
    Grad-CAM. Costs a second backward pass through the head (double backprop).
    """

    name = "shapleycam"
    title = "ShapleyCAM"
    reference = "Cai et al. 2025"
    cost = "1 forward + 2 backward passes to the layer (Hessian-vector product)"

    def passes(self, tensor: torch.Tensor, target: Target) -> ForwardBackward:
        """Like the engine's pass, but the gradients handed to ``combine`` are G - ½ H A."""
        x = tensor.to(self.device)
        model, layers = self.model, self.layers
        with (preserved_model_state(model), ActivationCapture(layers) as capture,
              torch.enable_grad()):
            with torch.no_grad(), autocast_context(self.device, self.amp):
                outputs = select_output(model(x), self.output)
            activations = [_captured(name, capture, x) for name, _ in layers]
            outputs_float = outputs.float()
            if not outputs_float.requires_grad:
                raise ValueError("the model's output does not depend on the target layer(s) "
                                 f"{[name for name, _ in layers]}")
            result = ForwardBackward(outputs=outputs_float.detach(), scores=None,
                                     class_indices=None)
            if isinstance(target, AllClasses):
                if outputs_float.ndim < 2:
                    raise ValueError("'all classes' needs an output with a class axis (N, K, ...)")
                scores = [outputs_float[:, k].reshape(len(outputs_float), -1).sum(1)
                          for k in range(outputs_float.shape[1])]
            else:
                scores = [target.score(outputs_float)]
                result.scores = scores[0].detach()
                result.class_indices = target.class_indices(outputs_float)
            effective = [[_gradient_minus_half_hvp(score, activations, i)
                          for i in range(len(activations))] for score in scores]
        result.layers = [
            LayerGradients(name, a.detach().float(),
                           torch.stack([per_score[i] for per_score in effective]).float())
            for i, ((name, _), a) in enumerate(zip(layers, activations, strict=True))
        ]
        return result


def _captured(name: str, capture: ActivationCapture, x: torch.Tensor) -> torch.Tensor:
    activation = captured_activation(name, capture)
    if activation.ndim != x.ndim:
        raise ValueError(f"layer {name!r} outputs shape {tuple(activation.shape)}, which is not "
                         f"a feature map (N, C, *spatial) like the input {tuple(x.shape)}; "
                         "ShapleyCAM explains convolutional layers (Grad-CAM also reads "
                         "transformer tokens)")
    return activation


def _gradient_minus_half_hvp(score: torch.Tensor, activations: list[torch.Tensor],
                             index: int) -> torch.Tensor:
    """G - ½ H A for one layer: the gradient keeps its graph so it can be differentiated again."""
    activation = activations[index]
    (gradient,) = torch.autograd.grad(score.sum(), activation, create_graph=True,
                                      allow_unused=True)
    if gradient is None:
        return torch.zeros_like(activation).detach()
    if not gradient.requires_grad:  # the head is linear in the activations: H = 0
        return gradient.detach()
    (hvp,) = torch.autograd.grad(gradient, activation, grad_outputs=activation.detach(),
                                 retain_graph=True, allow_unused=True)
    return (gradient if hvp is None else gradient - 0.5 * hvp).detach()
