"""Class Activation Mapping: the linear head's weights, no gradients (Zhou et al. 2016)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from napari_gradcam.core.engine import (
    ForwardBackward,
    LayerGradients,
    LayerSpec,
    resolve_layers,
)
from napari_gradcam.core.methods.base import BaseCAM, weighted_sum


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
    title = "CAM"
    reference = "Zhou et al. 2016"
    needs_gradients = False
    needs_linear_head = True
    classifier_only = True
    cost = "1 forward pass"

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
        return F.relu(weighted_sum(weights, layer.activations))
