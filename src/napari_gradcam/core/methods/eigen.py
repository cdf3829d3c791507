"""Principal-component CAMs: the dominant pattern of a layer's activations (EigenCAM) or of its
gradient-weighted activations (EigenGradCAM).

For one sample, write the layer's output as a matrix ``M`` with one row per position s and one
column per channel k (S × C). Its first right singular vector ``v_1`` (the first principal
direction of the channel vectors, uncentred as in the paper) gives the map ``M v_1``: each
position's coordinate along the direction in which the channel vectors vary most.

Sign convention. A singular vector is defined only up to its sign, and an arbitrary sign makes
half of the maps negative (all zero after the ReLU; pytorch-grad-cam centres the matrix to
dodge this). Here the sign is chosen so that ``M v_1`` has a non-negative inner product with the
channel sum ``M 1`` — the map points the same way as the summed activations (EigenCAM) or as
HiResCAM's evidence Σ_k G_k A_k (EigenGradCAM). For non-negative activations (after a ReLU)
``v_1`` is then the Perron vector, all its components are >= 0 and so is the map.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from napari_gradcam.core.engine import ForwardBackward, LayerGradients, LayerSpec
from napari_gradcam.core.methods.base import BaseCAM


def first_component_projection(matrix: torch.Tensor, center: bool = False) -> torch.Tensor:
    """``M v_1`` for a batch of matrices ``(B, S, C)`` → ``(B, S)``, with the sign convention
    of this module; ``center`` subtracts each channel's mean over positions first."""
    values = matrix.double()
    if center:
        values = values - values.mean(dim=1, keepdim=True)
    _, _, right = torch.linalg.svd(values, full_matrices=False)
    direction = right[:, 0, :]  # (B, C)
    projection = (values @ direction.unsqueeze(-1)).squeeze(-1)
    agreement = (projection * values.sum(dim=-1)).sum(dim=-1)
    sign = torch.where(agreement < 0, -1.0, 1.0).to(projection.dtype)
    return (projection * sign.unsqueeze(-1)).to(matrix.dtype)


class EigenCAM(BaseCAM):
    """EigenCAM (Muhammad & Yeasin 2020): ReLU(A v_1), the activations projected on their first
    principal component. Gradient-free and class-agnostic: it shows what the layer responds to
    most, whatever the class, so it cannot say which class a region supports (compare with
    Grad-CAM for that). ``center=True`` centres the channels first, as pytorch-grad-cam does.
    """

    name = "eigencam"
    title = "EigenCAM"
    reference = "Muhammad & Yeasin 2020"
    needs_gradients = False
    class_specific = False
    one_target_at_a_time = True
    cost = "1 forward pass + one SVD (positions × channels) per sample"

    def __init__(self, model: nn.Module, layer: LayerSpec, *, center: bool = False,
                 **options: object) -> None:
        super().__init__(model, layer, **options)  # type: ignore[arg-type]
        self.center = bool(center)

    def combine(self, layer: LayerGradients, passes: ForwardBackward) -> torch.Tensor:
        activations = layer.activations  # (N, C, *s)
        count, channels = activations.shape[:2]
        spatial = activations.shape[2:]
        matrix = activations.reshape(count, channels, -1).transpose(1, 2)
        projection = first_component_projection(matrix, self.center)
        return F.relu(projection.reshape(1, count, *spatial))


class EigenGradCAM(BaseCAM):
    """EigenGradCAM (pytorch-grad-cam): ReLU((G ⊙ A) v_1), the first principal component of the
    gradient-weighted activations, class-specific like Grad-CAM and cleaner than it where a
    few directions dominate. Its only definition is pytorch-grad-cam's, which centres the
    channels first; so does ``center=True`` here (the default). Uncentred
    (``center=False``), the component follows the overall class evidence Σ_k G_k A_k, and where
    that evidence is negative almost everywhere (a class the model does not see) the map is
    zero; centred, the map is the above-average part of the dominant pattern.
    """

    name = "eigengradcam"
    title = "EigenGradCAM"
    reference = "Gildenblat et al., pytorch-grad-cam (2021)"
    cost = "1 forward + 1 backward to the layer + one SVD per sample and class"

    def __init__(self, model: nn.Module, layer: LayerSpec, *, center: bool = True,
                 **options: object) -> None:
        super().__init__(model, layer, **options)  # type: ignore[arg-type]
        self.center = bool(center)

    def combine(self, layer: LayerGradients, passes: ForwardBackward) -> torch.Tensor:
        weighted = layer.gradients * layer.activations.unsqueeze(0)  # (K, N, C, *s)
        targets, count, channels = weighted.shape[:3]
        spatial = weighted.shape[3:]
        matrix = weighted.reshape(targets * count, channels, -1).transpose(1, 2)
        projection = first_component_projection(matrix, self.center)
        return F.relu(projection.reshape(targets, count, *spatial))


KPCA_KERNELS = ("sigmoid", "rbf", "linear")
KPCA_MAX_POSITIONS = 16384
"""Kernel PCA builds a positions × positions matrix per sample: 16384² float64 is 2 GiB."""


def kernel_first_component(matrix: torch.Tensor, kernel: str = "sigmoid",
                           gamma: float | None = None, coef0: float = 1.0) -> torch.Tensor:
    """Scores of the positions ``(S,)`` on the first kernel principal component of ``(S, C)``.

    As scikit-learn's ``KernelPCA(n_components=1).fit_transform`` on the channel-centred
    matrix X: the kernel matrix K (``tanh(γ XXᵀ + coef0)``, ``exp(-γ |x_i - x_j|²)`` or
    ``XXᵀ``; γ = 1 / C by default), centred in feature space
    (``K - mean_rows - mean_cols + mean``), its top eigenvector α scaled by √λ. The sign follows
    this module's convention (agreement with the centred channel sum X 1).
    """
    values = matrix.double()
    values = values - values.mean(dim=0, keepdim=True)
    channels = values.shape[1]
    gamma = 1.0 / channels if gamma is None else float(gamma)
    gram = values @ values.T
    if kernel == "linear":
        k = gram
    elif kernel == "sigmoid":
        k = torch.tanh(gamma * gram + coef0)
    elif kernel == "rbf":
        squared = gram.diagonal()
        k = torch.exp(-gamma * (squared[:, None] + squared[None, :] - 2 * gram).clamp_min(0))
    else:
        raise ValueError(f"kernel must be one of {', '.join(KPCA_KERNELS)}, got {kernel!r}")
    centred = k - k.mean(dim=0, keepdim=True) - k.mean(dim=1, keepdim=True) + k.mean()
    eigenvalues, eigenvectors = torch.linalg.eigh(centred)  # ascending
    scores = eigenvectors[:, -1] * eigenvalues[-1].clamp_min(0).sqrt()
    if float(scores @ values.sum(dim=1)) < 0:
        scores = -scores
    return scores.to(matrix.dtype)


class KPCACAM(BaseCAM):
    """KPCA-CAM (Karmani et al. 2024): EigenCAM with kernel PCA, a non-linear principal pattern.

    The channel vectors of the layer's positions are centred and mapped through a kernel
    (``"sigmoid"`` by default, as pytorch-grad-cam; ``"rbf"``; ``"linear"``, which gives
    EigenCAM with ``center=True`` exactly); the map is ReLU of the positions' scores on the
    first kernel principal component (:func:`kernel_first_component`). Gradient-free and
    class-agnostic like EigenCAM. Memory grows with the square of the feature map's positions,
    so layers with more than 16384 positions per sample are refused.
    """

    name = "kpcacam"
    title = "KPCA-CAM"
    reference = "Karmani et al. 2024"
    needs_gradients = False
    class_specific = False
    one_target_at_a_time = True
    cost = "1 forward pass + one eigendecomposition (positions × positions) per sample"

    def __init__(self, model: nn.Module, layer: LayerSpec, *, kernel: str = "sigmoid",
                 gamma: float | None = None, coef0: float = 1.0, **options: object) -> None:
        if kernel not in KPCA_KERNELS:
            raise ValueError(f"kernel must be one of {', '.join(KPCA_KERNELS)}, got {kernel!r}")
        super().__init__(model, layer, **options)  # type: ignore[arg-type]
        self.kernel, self.gamma, self.coef0 = kernel, gamma, float(coef0)

    def combine(self, layer: LayerGradients, passes: ForwardBackward) -> torch.Tensor:
        activations = layer.activations
        count, channels = activations.shape[:2]
        spatial = activations.shape[2:]
        positions = int(np.prod(spatial))
        if positions > KPCA_MAX_POSITIONS:
            raise ValueError(
                f"KPCA-CAM needs a {positions} × {positions} kernel matrix per sample for layer "
                f"{layer.name!r} (feature map {tuple(spatial)}); that is more than "
                f"{KPCA_MAX_POSITIONS} positions. Choose a deeper layer or use EigenCAM")
        matrices = activations.reshape(count, channels, -1).transpose(1, 2)
        scores = torch.stack([kernel_first_component(m, self.kernel, self.gamma, self.coef0)
                              for m in matrices])
        return F.relu(scores.reshape(1, count, *spatial))
