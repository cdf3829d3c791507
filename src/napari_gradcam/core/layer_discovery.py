"""Which layers of a model make feature maps, and which one to explain by default.

Grad-CAM needs a layer whose output is a feature map ``(N, C, *spatial)``. Guessing from module
types fails on users' own networks (custom blocks, functional calls, exported graphs), so we
run the model once on a small dummy input and record what every module actually returned.
The shapes also tell the user how coarse each layer's heatmap will be.

Transformers: a block's tokens ``(N, T, C)`` and a Swin stage's channels-last ``(N, *grid, C)``
are feature maps too, read through :func:`napari_gradcam.core.tokens.feature_map_view` and
reported as ``(C, *grid)``. An output is kept only when its grid is the input divided by one
stride: a ViT's attention weights ``(N, heads, T, T)`` look like a 2D map but their T × T
"grid" is no division of the input. (In a plain CNN every 4D output is kept as before: an
unpadded convolution's 62 × 62 map of a 64² input is a feature map although no stride makes
it.) For a model that classifies through a class token, the patch tokens of the layers after
the last attention no longer reach the output, so their maps are zero; a short backward pass
on the dummy finds them, and the default layer is the last one whose patch tokens still
matter.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from napari_gradcam.core.engine import model_dtype_device
from napari_gradcam.core.tokens import FeatureMapView, feature_map_view, grid_matches_input

if TYPE_CHECKING:
    from napari_gradcam.core.model_card import ModelCard

DEFAULT_DUMMY_SIZE = 64
_PLAIN_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
_PLAIN_CONTAINER_PATHS = frozenset(
    f"{cls.__module__}.{cls.__qualname__}" for cls in _PLAIN_CONTAINERS
)

#: Attribute a model may carry: ``{layer name: "package.module.Class"}`` of the modules it was
#: built from. ``torch.export.unflatten`` turns every layer into an ``InterpreterModule``; the
#: loader records the original classes here so layer lists and the default choice read the same
#: as for the original network.
ORIGINAL_TYPES_ATTRIBUTE = "_napari_gradcam_original_types"


@dataclass(frozen=True)
class LayerInfo:
    """A module whose output is a feature map.

    ``output_shape`` is ``(C, *spatial)`` for the dummy input; ``calls`` counts how often the
    module ran in one forward pass (a module used twice, like a shared ReLU or pooling layer,
    has no single activation to explain and is never chosen by default).
    """

    name: str
    type_name: str
    output_shape: tuple[int, ...]
    calls: int = 1

    @property
    def has_spatial_extent(self) -> bool:
        return any(size > 1 for size in self.output_shape[1:])


@dataclass(frozen=True)
class ForwardProbe:
    """What one dry forward pass showed: the feature-map layers and the model's output shape.

    ``layers`` are in execution order (when each module's first call finished, so a block
    comes after its children). The private fields record which layers returned the very same
    tensor (a block and its last child) and which returned the model's output itself.
    """

    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...] | None
    layers: tuple[LayerInfo, ...]
    _same_tensor: dict[str, int] = field(default_factory=dict, repr=False, compare=False)
    _is_output: frozenset[str] = field(default_factory=frozenset, repr=False, compare=False)
    _plain_container: frozenset[str] = field(default_factory=frozenset, repr=False,
                                             compare=False)
    _class_token_only: frozenset[str] = field(default_factory=frozenset, repr=False,
                                              compare=False)

    @property
    def output_is_map(self) -> bool:
        """True when the model returns a spatial map (segmentation logits), not a vector."""
        return self.output_shape is not None and len(self.output_shape) == len(
            self.input_shape
        ) and any(size > 1 for size in self.output_shape[2:])


def _dummy_shape(spatial_dims: int, in_channels: int, input_size: Sequence[int] | int | None,
                 batch_size: int) -> tuple[int, ...]:
    if spatial_dims not in (1, 2, 3):
        raise ValueError(f"spatial_dims must be 1, 2 or 3, got {spatial_dims!r}")
    if input_size is None:
        size: tuple[int, ...] = (DEFAULT_DUMMY_SIZE,) * spatial_dims
    elif isinstance(input_size, int):
        size = (input_size,) * spatial_dims
    else:
        size = tuple(int(s) for s in input_size)
        if len(size) != spatial_dims:
            raise ValueError(
                f"input_size {tuple(input_size)} has {len(size)} entries but spatial_dims is "
                f"{spatial_dims}"
            )
    return (batch_size, in_channels, *size)


def _first_tensor(output: object) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (list, tuple)):
        for item in output:
            found = _first_tensor(item)
            if found is not None:
                return found
    return None


def probe_model(
    model: nn.Module,
    spatial_dims: int,
    in_channels: int,
    input_size: Sequence[int] | int | None = None,
    *,
    batch_size: int = 1,
) -> ForwardProbe:
    """Run ``model`` once on a dummy input and record every module that made a feature map.

    No gradients, eval mode; every module's train/eval flag is restored and every hook is
    removed afterwards, also when the forward pass fails.
    """
    shape = _dummy_shape(spatial_dims, in_channels, input_size, batch_size)
    dtype, device = model_dtype_device(model)
    generator = torch.Generator().manual_seed(0)
    dummy = torch.randn(shape, generator=generator).to(device=device, dtype=dtype)

    ndim = 2 + spatial_dims
    token_ndim = 3 if spatial_dims >= 2 else ndim  # (N, T, C); a 1D model's 3D output is a map
    modules: dict[str, nn.Module] = {}
    order: list[str] = []
    shapes: dict[str, tuple[int, ...]] = {}
    types: dict[str, str] = {}
    calls: dict[str, int] = {}
    tensor_ids: dict[str, int] = {}
    keep_alive: list[torch.Tensor] = []  # so that id() values stay unique during the pass
    plain: set[str] = set()
    original_types: dict[str, str] = getattr(model, ORIGINAL_TYPES_ATTRIBUTE, None) or {}

    def make_hook(name: str, module: nn.Module) -> Callable[..., None]:
        def hook(_module: nn.Module, _inputs: object, output: object) -> None:
            calls[name] = calls.get(name, 0) + 1
            if (calls[name] > 1 or not isinstance(output, torch.Tensor)
                    or output.ndim not in (ndim, token_ndim)):
                return
            order.append(name)
            modules[name] = module
            shapes[name] = tuple(output.shape)
            tensor_ids[name] = id(output)
            keep_alive.append(output)
            if name in original_types:
                types[name] = original_types[name].rsplit(".", 1)[-1]
                if original_types[name] in _PLAIN_CONTAINER_PATHS:
                    plain.add(name)
            else:
                types[name] = type(module).__name__
                if type(module) in _PLAIN_CONTAINERS:
                    plain.add(name)

        return hook

    training = {module: module.training for module in model.modules()}
    handles = []
    try:
        for name, module in model.named_modules():
            if name:
                handles.append(module.register_forward_hook(make_hook(name, module)))
        model.eval()
        with torch.no_grad():
            try:
                output = model(dummy)
            except Exception as error:
                raise ValueError(
                    f"running {type(model).__name__} on a dummy input of shape {shape} failed "
                    f"({type(error).__name__}: {error}). Check spatial_dims={spatial_dims} and "
                    f"in_channels={in_channels}; if the model needs a particular input size, "
                    "give input_size (in the model card, or as an argument)"
                ) from error
    finally:
        for handle in handles:
            handle.remove()
        for module, was_training in training.items():
            module.training = was_training

    output_tensor = _first_tensor(output)
    views = _feature_map_views(model, shape, order, shapes, modules)
    layers = tuple(
        LayerInfo(name, types[name], _viewed_shape(views[name], shapes[name]), calls[name])
        for name in order if name in views
    )
    with_class_token = {name: view.prefix_tokens for name, view in views.items()
                        if view.kind == "tokens" and view.prefix_tokens}
    return ForwardProbe(
        input_shape=shape,
        output_shape=None if output_tensor is None else tuple(output_tensor.shape),
        layers=layers,
        _same_tensor=tensor_ids,
        _is_output=frozenset(
            name for name, tid in tensor_ids.items()
            if output_tensor is not None and tid == id(output_tensor)
        ),
        _plain_container=frozenset(plain),
        _class_token_only=_class_token_only_layers(model, dummy, with_class_token),
    )


def _feature_map_views(model: nn.Module, input_shape: tuple[int, ...], order: list[str],
                       shapes: dict[str, tuple[int, ...]], modules: dict[str, nn.Module]
                       ) -> dict[str, FeatureMapView]:
    """How each recorded output reads as ``(N, C, *grid)``; outputs that are no feature map
    (attention weights, ambiguous token counts) are left out.

    Token and channels-last readings must give a grid that divides the input. Channels-first
    outputs are kept as they are in a model without token layers; in a transformer (some
    output read as tokens) a channels-first grid must divide the input too, which is what
    tells attention matrices ``(N, heads, T, T)`` from feature maps.
    """
    spatial = input_shape[2:]
    views: dict[str, FeatureMapView] = {}
    for name in order:
        try:
            view = feature_map_view(name, shapes[name], input_shape, model, None, modules[name])
        except ValueError:  # tokens that fit no single patch grid: not offered
            continue
        if view is not None:
            views[name] = view
    transformer = any(view.kind != "channels_first" for view in views.values())
    return {name: view for name, view in views.items()
            if grid_matches_input(view.grid, spatial)
            or (view.kind == "channels_first" and not transformer)}


def _viewed_shape(view: FeatureMapView, raw: tuple[int, ...]) -> tuple[int, ...]:
    """``(C, *grid)`` of a raw output shape ``(N, ...)`` read through ``view``."""
    return tuple(view(torch.empty(raw, device="meta")).shape[1:])


def _class_token_only_layers(model: nn.Module, dummy: torch.Tensor,
                             prefixes: dict[str, int]) -> frozenset[str]:
    """The token layers whose patch tokens get no gradient from the output (only their class
    token(s) reach it): Grad-CAM maps of them are zero, so they are never the default.

    One forward and backward pass on the dummy, gradients taken with respect to the layers'
    outputs only (no parameter's ``.grad`` is touched); train/eval flags restored, hooks
    removed. Best effort: a model that cannot be differentiated leaves every layer in.
    """
    if not prefixes:
        return frozenset()
    named = dict(model.named_modules())
    captured: dict[str, torch.Tensor] = {}

    def make_hook(name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, _inputs: object, output: object) -> None:
            if name not in captured and isinstance(output, torch.Tensor):
                captured[name] = output
        return hook

    training = {module: module.training for module in model.modules()}
    handles = [named[name].register_forward_hook(make_hook(name)) for name in prefixes]
    try:
        model.eval()
        with torch.enable_grad():
            output = _first_tensor(model(dummy.detach().clone().requires_grad_(True)))
            names = [name for name in prefixes if name in captured
                     and captured[name].requires_grad]
            if output is None or not output.requires_grad or not names:
                return frozenset()
            gradients = torch.autograd.grad(output.float().sum(),
                                            [captured[name] for name in names],
                                            allow_unused=True)
    except Exception:  # the default layer is a convenience; never fail loading over it
        return frozenset()
    finally:
        for handle in handles:
            handle.remove()
        for module, was_training in training.items():
            module.training = was_training
    return frozenset(
        name for name, gradient in zip(names, gradients, strict=True)
        if gradient is None or not bool(gradient[:, prefixes[name]:].any())
    )


def discover_feature_layers(
    model: nn.Module,
    spatial_dims: int,
    in_channels: int,
    input_size: Sequence[int] | int | None = None,
) -> list[LayerInfo]:
    """Every named module whose output is a feature map ``(N, C, *spatial)``, in execution
    order, with its output shape ``(C, *spatial)`` for a dummy input of ``input_size`` (64 per
    spatial axis when not given)."""
    return list(probe_model(model, spatial_dims, in_channels, input_size).layers)


def choose_target_layer(probe: ForwardProbe) -> str:
    """The default Grad-CAM layer for what a probe saw (see :func:`default_target_layer`)."""
    candidates = [
        layer for layer in probe.layers
        if layer.calls == 1 and layer.name not in probe._is_output
        and layer.name not in probe._class_token_only
    ]
    spatial = [layer for layer in candidates if layer.has_spatial_extent]
    pool = spatial or candidates
    silent = [layer for layer in probe.layers if layer.name in probe._class_token_only]
    if silent:
        # A class-token model: of the layers that still reach the output, those as wide as
        # the token stream (its last layer's width), so the default is the last block's
        # first norm ('blocks.<last>.norm1'), not the query-key-value projection after it.
        width = silent[-1].output_shape[0]
        pool = [layer for layer in pool if layer.output_shape[0] == width] or pool
    if not pool:
        raise ValueError(
            "no layer of this model returns a feature map (N, C, *spatial) that could be "
            "explained; name target_layer explicitly, or check spatial_dims"
        )
    if probe.output_is_map:
        # Segmentation: the deepest map (the U-Net bottleneck), not the head that makes the
        # full-resolution logits; the last of the deepest, so a whole block beats its parts.
        def volume(layer: LayerInfo) -> int:
            return math.prod(layer.output_shape[1:])

        smallest = min(volume(layer) for layer in pool)
        chosen = [layer for layer in pool if volume(layer) == smallest][-1]
    else:
        chosen = pool[-1]  # classification: the last map before pooling and the head
    # A block and its last child (or a Sequential and its last entry) return the same tensor;
    # prefer the outermost module that is a real block, not a bare Sequential: "features.3"
    # rather than "features", "down2" rather than "down2.5".
    group_id = probe._same_tensor.get(chosen.name)
    group = [layer.name for layer in pool if probe._same_tensor.get(layer.name) == group_id]
    for name in reversed(group):
        if name not in probe._plain_container:
            return name
    return group[-1]


def last_spatial_layer(model: nn.Module, sample_shape: Sequence[int]) -> LayerInfo | None:
    """The layer :func:`choose_target_layer` picks for inputs of ``sample_shape``
    ``(C, *spatial)``, when its map has spatial extent (None otherwise, or when no layer makes
    a feature map).

    What the engine suggests when the layer a user named makes a 1×1 map (a global pool): the
    probe runs at the user's own input size, where a fixed-size dummy could differ.
    """
    channels, *spatial = (int(s) for s in sample_shape)
    probe = probe_model(model, len(spatial), channels, tuple(spatial))
    try:
        name = choose_target_layer(probe)
    except ValueError:
        return None
    chosen = next(layer for layer in probe.layers if layer.name == name)
    return chosen if chosen.has_spatial_extent else None


def default_target_layer(
    model: nn.Module,
    spatial_dims: int,
    in_channels: int,
    input_size: Sequence[int] | int | None = None,
    *,
    card: ModelCard | None = None,
) -> str:
    """The layer to explain when the user has not picked one.

    The card's ``target_layer`` when it names one; otherwise, for a classifier, the last
    feature map with spatial extent in execution order (the last stage before global pooling,
    as in the Grad-CAM paper); for a model whose output is itself a map of class logits (a
    U-Net), the deepest feature map (the bottleneck) rather than the output head.
    """
    if card is not None and card.target_layer:
        names = dict(model.named_modules())
        if card.target_layer not in names:
            close = difflib.get_close_matches(card.target_layer, [n for n in names if n], n=1)
            raise ValueError(
                f"the model card names target_layer {card.target_layer!r} but the model has no "
                "such layer" + (f" (did you mean {close[0]!r}?)" if close else "")
            )
        return card.target_layer
    return choose_target_layer(probe_model(model, spatial_dims, in_channels, input_size))


#: Module classes that transform a feature map point by point (normalise, activate, drop,
#: pass through) or only resample it (pooling, upsampling): their maps repeat the block they
#: sit in, so the widget's short list leaves them out. Matched on the class name, so exported
#: models (whose original class names the loader records) read the same.
POINTWISE_TYPES = frozenset({
    "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm", "LazyBatchNorm1d",
    "LazyBatchNorm2d", "LazyBatchNorm3d", "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d",
    "GroupNorm", "LayerNorm", "LocalResponseNorm", "RMSNorm",
    "ReLU", "ReLU6", "LeakyReLU", "PReLU", "RReLU", "ELU", "SELU", "CELU", "GELU", "SiLU",
    "Mish", "Sigmoid", "Tanh", "Hardtanh", "Hardswish", "Hardsigmoid", "Softplus", "Softmax",
    "LogSoftmax", "Swish", "MemoryEfficientSwish", "Act",
    "Dropout", "Dropout1d", "Dropout2d", "Dropout3d", "AlphaDropout", "FeatureAlphaDropout",
    "DropPath", "Identity", "ADN",
    "MaxPool1d", "MaxPool2d", "MaxPool3d", "AvgPool1d", "AvgPool2d", "AvgPool3d",
    "AdaptiveAvgPool1d", "AdaptiveAvgPool2d", "AdaptiveAvgPool3d", "AdaptiveMaxPool1d",
    "AdaptiveMaxPool2d", "AdaptiveMaxPool3d", "Upsample", "UpSample",
})
_PLAIN_CONTAINER_NAMES = frozenset(cls.__name__ for cls in _PLAIN_CONTAINERS)


def feature_blocks(layers: Sequence[LayerInfo], keep: Sequence[str | None] = ()
                   ) -> list[LayerInfo]:
    """The layers a user picks from: the blocks that make feature maps, in the given order.

    Why: a probe lists every module with a map output, so a small U-Net offers each Conv,
    BatchNorm and ReLU of every block (a MONAI UNet 60 of them), and the stage the user
    wants is lost among them. A *block* is a module with children (a residual unit, a conv
    block, a transformer block, a ``Sequential`` of plain layers) whose listed descendants
    all have its own spatial extent: it stands for its inside, which is hidden. A module
    whose inside changes the grid (MONAI's ``SkipConnection`` around the deeper levels, a
    Swin stage with patch merging, a ``Sequential`` holding the whole encoder) is not one
    block: its inside stays listed, and a plain container (``Sequential``, ``ModuleList``)
    that is not a block is dropped, since its map is its last child's. Point-wise and
    resampling modules (:data:`POINTWISE_TYPES`: norms, activations, dropout, identity,
    pooling) are dropped. ``keep`` names layers shown whatever the rule says (the card's
    default, the current choice: a ViT's default ``blocks.<last>.norm1`` is inside a block).
    Nothing left (a model of point-wise layers only) gives the full list back.
    """
    names = [layer.name for layer in layers]
    by_name = {layer.name: layer for layer in layers}

    def descendants(name: str) -> list[LayerInfo]:
        return [by_name[other] for other in names if other.startswith(name + ".")]

    def is_block(layer: LayerInfo) -> bool:
        inside = descendants(layer.name)
        if not inside:
            return False
        if any(d.output_shape[1:] != layer.output_shape[1:] for d in inside):
            return False
        if layer.type_name in _PLAIN_CONTAINER_NAMES:
            return all(not descendants(d.name) for d in inside)  # plain layers only
        return True

    blocks = [layer.name for layer in layers if is_block(layer)]
    kept_names = {name for name in keep if name}
    chosen = []
    for layer in layers:
        if layer.name in kept_names:
            chosen.append(layer)
            continue
        if layer.type_name in POINTWISE_TYPES:
            continue
        if any(layer.name.startswith(block + ".") for block in blocks):
            continue
        if descendants(layer.name) and layer.name not in blocks and (
                layer.type_name in _PLAIN_CONTAINER_NAMES):
            continue
        chosen.append(layer)
    return chosen or list(layers)
