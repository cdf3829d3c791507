"""Transformer activations as feature maps: tokens ``(N, T, C)`` and channels-last stages.

Every CAM method works on activations ``(N, C, *spatial)``. A vision transformer's blocks
output tokens ``(N, T, C)`` (ViT, UNETR's encoder: one token per patch, plus a class token
in front when the model classifies through one), and Swin blocks keep their feature maps
channels-last ``(N, *spatial, C)``. A :class:`FeatureMapView` turns such an output into
``(N, C, *grid)`` by dropping the leading class token(s), reshaping the patch tokens onto the
patch grid (row-major, as patch embeddings flatten them) and moving the channels to the front.

The view only selects, reshapes and permutes elements: it is linear, so the gradient with
respect to the viewed activation is the same view of the gradient with respect to the tokens.
The engine therefore differentiates with respect to the layer's own output and applies the
view to activations and gradients alike: Grad-CAM on the view *is* Grad-CAM on the tokens
(weights = mean over the patch tokens of dy/dA, map = ReLU(sum_c w_c A_c) on the grid).

The grid is taken from the user (``patch_grid``) or derived from the model: the input size
divided by the stride of its patch embedding (a convolution whose kernel equals its stride,
or MONAI's ``perceptron`` rearrangement), also for hierarchical stages that merge patches
(stride × 2^k). Whatever is left over in front of the grid's positions is the class token
(``class_token``); anything that does not add up is an error that says what to pass.
"""

from __future__ import annotations

import math
import operator
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_MERGE_LEVELS = 6  # hierarchical transformers halve the grid per stage: patch stride × 2^k


@dataclass(frozen=True)
class TokenLayout:
    """What the user says about the target layer's layout; ``None`` means "derive it".

    ``patch_grid``: the grid of patch tokens in the input's spatial axis order, e.g. ``(4, 4)``
    for a 64² image in 16² patches. ``class_token``: whether one class token precedes the
    patch tokens (it is dropped from the map). ``channels_last``: the layer outputs
    ``(N, *spatial, C)`` (Swin blocks), or tokens for a 1D model, whose ``(N, T, C)`` cannot
    be told apart from a conv layer's ``(N, C, L)`` by its shape.
    """

    patch_grid: tuple[int, ...] | None = None
    class_token: bool | None = None
    channels_last: bool | None = None

    def __post_init__(self) -> None:
        if self.patch_grid is not None:
            grid = tuple(self.patch_grid)
            if not grid or not all(isinstance(g, int) and not isinstance(g, bool) and g > 0
                                   for g in grid):
                raise ValueError(f"patch_grid must be positive integers, one per spatial axis, "
                                 f"e.g. (4, 4); got {self.patch_grid!r}")
            object.__setattr__(self, "patch_grid", grid)
        for option in ("class_token", "channels_last"):
            value = getattr(self, option)
            if value is not None and not isinstance(value, bool):
                raise TypeError(f"{option} must be True, False or None (derive it), "
                                f"got {value!r}")

    @classmethod
    def make(cls, patch_grid: Sequence[int] | None = None, class_token: bool | None = None,
             channels_last: bool | None = None) -> TokenLayout:
        """Build from the explainers' keyword options (a list is accepted for the grid)."""
        grid = None if patch_grid is None else tuple(_as_int(g) for g in patch_grid)
        return cls(grid, class_token, channels_last)


def _as_int(value: object) -> object:
    """NumPy integers become ints; anything else is left for validation to reject."""
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        return value


@dataclass(frozen=True)
class FeatureMapView:
    """How one layer's raw output is read as ``(N, C, *grid)``; applied to any leading axes.

    ``kind`` is ``"channels_first"`` (already a feature map, nothing changes),
    ``"channels_last"`` (``(N, *grid, C)``) or ``"tokens"`` (``(N, prefix + prod(grid), C)``).
    """

    kind: str
    grid: tuple[int, ...]
    prefix_tokens: int = 0

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        """``(..., N, *raw)`` → ``(..., N, C, *grid)``: activations, or gradients (K, N, ...)."""
        if self.kind == "channels_first":
            return tensor
        channel_axis = -(len(self.grid) + 1)
        if self.kind == "channels_last":
            return tensor.movedim(-1, channel_axis)
        patches = tensor[..., self.prefix_tokens:, :]
        on_grid = patches.reshape(*patches.shape[:-2], *self.grid, patches.shape[-1])
        return on_grid.movedim(-1, channel_axis)

    def describe(self) -> str:
        if self.kind == "tokens":
            prefix = f" after {self.prefix_tokens} class token(s)" if self.prefix_tokens else ""
            return f"tokens on a {'×'.join(map(str, self.grid))} patch grid{prefix}"
        return self.kind.replace("_", "-")

    def warn_if_only_class_token_reached(self, name: str, raw_gradients: torch.Tensor) -> None:
        """A classifier that reads the class token gets no gradient on the patch tokens of its
        last block (after the last attention, tokens no longer mix): say which layer to take."""
        if self.kind != "tokens" or not self.prefix_tokens:
            return
        patch_part = raw_gradients[..., self.prefix_tokens:, :]
        class_part = raw_gradients[..., :self.prefix_tokens, :]
        if bool((patch_part == 0).all()) and bool((class_part != 0).any()):
            warnings.warn(
                f"only the class token of layer {name!r} reaches the score, so the patch tokens "
                "get no gradient and the map is zero: after the last attention the patch tokens "
                "no longer mix into the class token. Explain a layer before it, e.g. the last "
                "block's first norm ('blocks.<last>.norm1') or the block before the last.",
                UserWarning, stacklevel=5)


def grid_matches_input(grid: Sequence[int], spatial: Sequence[int]) -> bool:
    """Whether ``grid`` is the input size divided by one integer stride (floor or ceil).

    Layer discovery can use it to tell feature maps from look-alikes such as a ViT's
    attention weights ``(N, heads, T, T)``, whose "grid" T×T is no division of the input.
    """
    if len(grid) != len(spatial) or min(grid) < 1:
        return False
    for stride in range(1, max(spatial) + 1):
        if all(g in (s // stride, -(-s // stride)) for g, s in zip(grid, spatial, strict=True)):
            return True
    return False


def _has_conv(module: nn.Module | None) -> bool:
    return module is not None and any(isinstance(m, _CONVS) for m in module.modules())


def patch_strides(model: nn.Module, spatial_dims: int) -> list[tuple[int, ...]]:
    """Patch sizes of the model's patch embeddings: convolutions with kernel = stride > 1,
    and MONAI's ``perceptron`` embedding (an einops rearrangement with lengths p1, p2, ...)."""
    strides: list[tuple[int, ...]] = []
    for module in model.modules():
        stride: tuple[int, ...] | None = None
        if isinstance(module, _CONVS):
            if (tuple(module.kernel_size) == tuple(module.stride) and max(module.stride) > 1
                    and len(module.stride) == spatial_dims):
                stride = tuple(module.stride)
        else:
            lengths = getattr(module, "axes_lengths", None)
            keys = [f"p{i + 1}" for i in range(spatial_dims)]
            if isinstance(lengths, dict) and all(k in lengths for k in keys):
                stride = tuple(int(lengths[k]) for k in keys)
        if stride is not None and stride not in strides:
            strides.append(stride)
    return strides


def _prefix_token_count(model: nn.Module) -> int:
    """Leading non-patch tokens the model adds: timm's ``num_prefix_tokens``, else one per
    class or distillation token parameter, else one (the usual class token)."""
    declared = getattr(model, "num_prefix_tokens", None)
    if isinstance(declared, int) and not isinstance(declared, bool) and declared > 0:
        return declared
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_parameters()}
    count = int(bool(names & {"cls_token", "class_token"})) + int("dist_token" in names)
    return count or 1


def _grid_candidates(model: nn.Module, spatial: tuple[int, ...]) -> list[tuple[int, ...]]:
    grids: list[tuple[int, ...]] = []
    for stride in patch_strides(model, len(spatial)):
        for level in range(_MERGE_LEVELS):
            for rounding in (math.floor, math.ceil):
                grid = tuple(int(rounding(s / (p * 2 ** level)))
                             for s, p in zip(spatial, stride, strict=True))
                if min(grid) >= 1 and grid not in grids:
                    grids.append(grid)
    return grids


def _isotropic_candidates(spatial: tuple[int, ...]) -> list[tuple[int, ...]]:
    grids: list[tuple[int, ...]] = []
    for stride in range(1, max(spatial) + 1):
        for rounding in (math.floor, math.ceil):
            grid = tuple(max(1, int(rounding(s / stride))) for s in spatial)
            if grid not in grids:
                grids.append(grid)
    return grids


def _token_view(name: str, shape: tuple[int, ...], spatial: tuple[int, ...], model: nn.Module,
                layout: TokenLayout) -> FeatureMapView:
    tokens = shape[1]
    if layout.class_token is not None:
        allowed = {int(layout.class_token)}
    else:
        allowed = {0, _prefix_token_count(model)}
    what = (f"layer {name!r} outputs {tokens} tokens of {shape[2]} channels (shape {shape}) "
            f"for an input of spatial size {spatial}")
    if layout.patch_grid is not None:
        grid = layout.patch_grid
        if len(grid) != len(spatial):
            raise ValueError(f"patch_grid {grid} has {len(grid)} axes but the input has "
                             f"{len(spatial)} spatial axes {spatial}")
        prefix = tokens - math.prod(grid)
        if prefix not in allowed:
            expected = " or ".join(str(math.prod(grid) + k) for k in sorted(allowed))
            raise ValueError(f"{what}; patch_grid {grid} needs {expected} tokens (with "
                             f"class_token={layout.class_token}): check patch_grid and "
                             "class_token")
        return FeatureMapView("tokens", grid, prefix)
    for candidates in (_grid_candidates(model, spatial), _isotropic_candidates(spatial)):
        matches = [(grid, tokens - math.prod(grid)) for grid in candidates
                   if tokens - math.prod(grid) in allowed]
        if len({grid for grid, _ in matches}) == 1:
            grid, prefix = matches[0]
            return FeatureMapView("tokens", grid, prefix)
        if len(matches) > 1:
            options = "; ".join(f"{'×'.join(map(str, g))} grid"
                                + (f" after {p} class token(s)" if p else "")
                                for g, p in matches)
            raise ValueError(f"{what}, which fits several layouts ({options}): pass "
                             "patch_grid=(...) and class_token=True/False")
    raise ValueError(f"{what}; cannot tell the patch grid from the model: pass "
                     "patch_grid=(...) (tokens per spatial axis, in the input's axis order) and "
                     "class_token=True/False")


def feature_map_view(name: str, shape: Sequence[int], input_shape: Sequence[int],
                     model: nn.Module, layout: TokenLayout | None = None,
                     module: nn.Module | None = None) -> FeatureMapView | None:
    """How to read layer ``name``'s output of ``shape`` as ``(N, C, *grid)`` for an input of
    ``input_shape`` ``(N, C, *spatial)``; ``None`` when it is no feature map in any layout.

    Channels-last is taken when the user says so, or, for a layer without convolutions, when
    the channels-first reading gives no grid of the input divided by one stride but the
    channels-last reading does (a Swin block's ``(N, 32, 32, 12)`` for a 64² input).
    """
    layout = layout or TokenLayout()
    shape, spatial = tuple(shape), tuple(input_shape[2:])
    dims = len(spatial)
    asked_for_tokens = (layout.channels_last or layout.patch_grid is not None
                        or layout.class_token is not None)
    if len(shape) == 3 and (dims >= 2 or asked_for_tokens):
        if layout.channels_last is False:
            raise ValueError(f"layer {name!r} outputs {shape}: tokens are read as (N, tokens, "
                             "channels); channels_last=False cannot apply to them")
        return _token_view(name, shape, spatial, model, layout)
    if len(shape) != dims + 2:
        return None
    if layout.channels_last:
        return FeatureMapView("channels_last", shape[1:-1])
    if (layout.channels_last is None and dims >= 2 and not _has_conv(module)
            and not grid_matches_input(shape[2:], spatial)
            and grid_matches_input(shape[1:-1], spatial)):
        return FeatureMapView("channels_last", shape[1:-1])
    return FeatureMapView("channels_first", shape[2:])
