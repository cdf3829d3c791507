"""Turn raw image data into exactly the tensor a model was trained on.

A Grad-CAM is only meaningful when the model sees its input the way it saw its training data:
the same intensity scaling, the same channel count, the same patch size. Those steps are
written once in the model card (``preprocessing:``) and applied here by one
:class:`Preprocessor`, which the napari widget, the Python API and the command line all call,
so the three can never disagree about what the model saw.

Ops (applied in the card's order, on float32 data ``(B, C, *spatial)``; grey data has ``C = 1``
until ``repeat_channels`` widens it):

``percentile_clip`` (``low=1.0``, ``high=99.0``)
    Clip each sample (and channel) to its own ``low``/``high`` percentiles and scale that range
    to [0, 1]. Per sample because micrographs from different sessions differ in brightness;
    a constant sample becomes all zeros rather than a division by zero.
``window`` (``min``, ``max``)
    A fixed intensity window mapped to [0, 1], values outside clipped. For calibrated data
    (CT grey values, counts) where the absolute scale carries meaning.
``normalize`` (``mean``, ``std``)
    ``(x - mean) / std``; a number, or one number per channel (after ``repeat_channels``).
``repeat_channels`` (``channels``)
    Replicate a grey channel ``channels`` times, e.g. for an RGB-pretrained backbone. Data that
    already has ``channels`` channels passes through unchanged.
``resize`` (``size``, ``mode="linear"``)
    Resample to ``size`` (one entry per spatial axis) with :func:`torch.nn.functional.interpolate`
    (``linear`` means linear/bilinear/trilinear by dimension; ``nearest`` and ``area`` too).
    The model then sees, and its heatmaps come out at, ``size`` rather than the data's shape;
    callers that overlay maps on the data must resample them back.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from napari_gradcam.core.model_card import ModelCard


class PreprocessingError(ValueError):
    """A preprocessing step in a model card is unknown or has bad parameters."""


# --------------------------------------------------------------------------------------------
# Parameter checking helpers: each raises PreprocessingError naming the step and the parameter.


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _number(where: str, params: Mapping[str, Any], key: str) -> float:
    value = params[key]
    if not _is_number(value) or not math.isfinite(value):
        raise PreprocessingError(f"{where}: {key!r} must be a finite number, got {value!r}")
    return float(value)


def _positive_int(where: str, params: Mapping[str, Any], key: str) -> int:
    value = params[key]
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise PreprocessingError(f"{where}: {key!r} must be a positive integer, got {value!r}")
    return value


def _number_or_numbers(where: str, params: Mapping[str, Any], key: str) -> float | tuple:
    value = params[key]
    if isinstance(value, (list, tuple)):
        if not value or not all(_is_number(v) and math.isfinite(v) for v in value):
            raise PreprocessingError(
                f"{where}: {key!r} must be a number or a non-empty list of numbers (one per "
                f"channel), got {value!r}"
            )
        return tuple(float(v) for v in value)
    return _number(where, params, key)


def _check_percentile_clip(where: str, params: dict[str, Any], spatial_dims: int) -> None:
    low, high = _number(where, params, "low"), _number(where, params, "high")
    if not 0.0 <= low < high <= 100.0:
        raise PreprocessingError(
            f"{where}: percentiles need 0 <= low < high <= 100, got low={low}, high={high}"
        )
    params.update(low=low, high=high)


def _check_window(where: str, params: dict[str, Any], spatial_dims: int) -> None:
    low, high = _number(where, params, "min"), _number(where, params, "max")
    if not low < high:
        raise PreprocessingError(f"{where}: the window needs min < max, got min={low}, max={high}")
    params.update(min=low, max=high)


def _check_normalize(where: str, params: dict[str, Any], spatial_dims: int) -> None:
    mean = _number_or_numbers(where, params, "mean")
    std = _number_or_numbers(where, params, "std")
    stds = std if isinstance(std, tuple) else (std,)
    if any(s <= 0 for s in stds):
        raise PreprocessingError(f"{where}: 'std' must be positive, got {params['std']!r}")
    if isinstance(mean, tuple) and isinstance(std, tuple) and len(mean) != len(std):
        raise PreprocessingError(
            f"{where}: per-channel 'mean' and 'std' differ in length ({len(mean)} vs {len(std)})"
        )
    params.update(mean=mean, std=std)


def _check_repeat_channels(where: str, params: dict[str, Any], spatial_dims: int) -> None:
    params["channels"] = _positive_int(where, params, "channels")


_RESIZE_MODES = ("linear", "nearest", "area")


def _check_resize(where: str, params: dict[str, Any], spatial_dims: int) -> None:
    size = params["size"]
    if isinstance(size, int) and not isinstance(size, bool):
        size = [size] * spatial_dims
    if (
        not isinstance(size, (list, tuple))
        or len(size) != spatial_dims
        or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in size)
    ):
        raise PreprocessingError(
            f"{where}: 'size' must be {spatial_dims} positive integer(s), one per spatial axis, "
            f"got {params['size']!r}"
        )
    if params["mode"] not in _RESIZE_MODES:
        raise PreprocessingError(
            f"{where}: 'mode' must be one of {', '.join(_RESIZE_MODES)}, got {params['mode']!r}"
        )
    params["size"] = tuple(size)


# --------------------------------------------------------------------------------------------
# The ops themselves, on float32 CPU tensors (B, C, *spatial).


def _apply_percentile_clip(x: torch.Tensor, params: Mapping[str, Any]) -> torch.Tensor:
    # numpy, not torch.quantile: torch.quantile refuses inputs above 2**24 elements (CT).
    flat = x.numpy().reshape(x.shape[0], x.shape[1], -1)
    low, high = np.percentile(flat, [params["low"], params["high"]], axis=2)
    shape = (x.shape[0], x.shape[1]) + (1,) * (x.ndim - 2)
    low_t = torch.from_numpy(low.astype(np.float32)).reshape(shape)
    high_t = torch.from_numpy(high.astype(np.float32)).reshape(shape)
    span = high_t - low_t
    scaled = (torch.minimum(torch.maximum(x, low_t), high_t) - low_t) / torch.where(
        span > 0, span, torch.ones_like(span)
    )
    return torch.where(span > 0, scaled, torch.zeros_like(scaled))


def _apply_window(x: torch.Tensor, params: Mapping[str, Any]) -> torch.Tensor:
    return ((x - params["min"]) / (params["max"] - params["min"])).clamp_(0.0, 1.0)


def _per_channel(value: float | tuple, x: torch.Tensor, what: str) -> torch.Tensor | float:
    if not isinstance(value, tuple):
        return value
    if len(value) != x.shape[1]:
        raise ValueError(
            f"normalize: {len(value)} per-channel {what} values but the data has {x.shape[1]} "
            "channel(s) at this step; put repeat_channels before normalize, or give one value"
        )
    return torch.tensor(value, dtype=x.dtype).reshape((1, -1) + (1,) * (x.ndim - 2))


def _apply_normalize(x: torch.Tensor, params: Mapping[str, Any]) -> torch.Tensor:
    mean = _per_channel(params["mean"], x, "mean")
    std = _per_channel(params["std"], x, "std")
    return (x - mean) / std


def _apply_repeat_channels(x: torch.Tensor, params: Mapping[str, Any]) -> torch.Tensor:
    channels = params["channels"]
    if x.shape[1] == channels:
        return x
    if x.shape[1] != 1:
        raise ValueError(
            f"repeat_channels: the data has {x.shape[1]} channels; only a single grey channel "
            f"can be repeated to {channels}"
        )
    return x.repeat((1, channels) + (1,) * (x.ndim - 2))


def _apply_resize(x: torch.Tensor, params: Mapping[str, Any]) -> torch.Tensor:
    size = tuple(params["size"])
    if tuple(x.shape[2:]) == size:
        return x
    mode = params["mode"]
    if mode == "linear":
        mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[x.ndim - 2]
        return F.interpolate(x, size=size, mode=mode, align_corners=False)
    return F.interpolate(x, size=size, mode=mode)


@dataclass(frozen=True)
class _Op:
    required: tuple[str, ...]
    defaults: Mapping[str, Any]
    check: Callable[[str, dict[str, Any], int], None]
    apply: Callable[[torch.Tensor, Mapping[str, Any]], torch.Tensor]


OPS: dict[str, _Op] = {
    "percentile_clip": _Op((), {"low": 1.0, "high": 99.0}, _check_percentile_clip,
                           _apply_percentile_clip),
    "window": _Op(("min", "max"), {}, _check_window, _apply_window),
    "normalize": _Op(("mean", "std"), {}, _check_normalize, _apply_normalize),
    "repeat_channels": _Op(("channels",), {}, _check_repeat_channels, _apply_repeat_channels),
    "resize": _Op(("size",), {"mode": "linear"}, _check_resize, _apply_resize),
}


def overflow_problem(values: object, dtype: torch.dtype | np.dtype | str,
                     where: str = "the input") -> str | None:
    """Why finite ``values`` become infinite in ``dtype`` (1e300 in float32), or None.

    Float64 data beyond float32's range (about 3.4e38) turns into ``inf`` when it meets a
    float32 model, and the check for NaN/inf that follows would blame the data for values it
    does not hold. Callers ask this only once the converted data is found non-finite, so good
    data pays nothing.
    """
    if isinstance(dtype, torch.dtype):
        name, largest_allowed = str(dtype).removeprefix("torch."), float(torch.finfo(dtype).max)
    else:
        name, largest_allowed = np.dtype(dtype).name, float(np.finfo(np.dtype(dtype)).max)
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().double().numpy()
    array = np.asarray(values)
    if array.dtype.kind not in "iuf":
        return None
    magnitude = np.abs(array.astype(np.float64, copy=False))
    finite = np.isfinite(magnitude)
    too_large = int((finite & (magnitude > largest_allowed)).sum())
    if not too_large:
        return None
    also = int((~finite).sum())
    return (
        f"{where} holds {too_large} value(s) too large for the model's dtype {name}: the largest "
        f"|value| is {float(magnitude[finite].max()):.3g}, but {name} ends at "
        f"{largest_allowed:.3g}, so converted to {name} they overflow to infinity"
        + (f" (and {also} value(s) are already NaN or infinite)" if also else "")
        + ". Rescale the data (e.g. divide it by its maximum, or convert to physical units) "
        "before explaining"
    )


def _did_you_mean(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def validate_preprocessing(
    steps: object, spatial_dims: int
) -> tuple[dict[str, Any], ...]:
    """Check a card's ``preprocessing`` list and return it with defaults filled in.

    Done when the card is read, so a typo in a step fails at load time with the step's index,
    not half-way through a volume.
    """
    if steps is None:
        return ()
    if not isinstance(steps, (list, tuple)):
        raise PreprocessingError(
            f"preprocessing must be a list of steps like {{op: window, min: 0, max: 1}}, got "
            f"{type(steps).__name__}"
        )
    checked = []
    for index, step in enumerate(steps):
        where = f"preprocessing[{index}]"
        if not isinstance(step, Mapping) or "op" not in step:
            raise PreprocessingError(
                f"{where}: each step is a mapping with an 'op' key, e.g. {{op: normalize, "
                f"mean: 0.5, std: 0.25}}; got {step!r}"
            )
        name = step["op"]
        if name not in OPS:
            raise PreprocessingError(
                f"{where}: unknown op {name!r}{_did_you_mean(str(name), list(OPS))}. "
                f"Known ops: {', '.join(OPS)}"
            )
        op = OPS[name]
        where = f"{where} ({name})"
        allowed = set(op.required) | set(op.defaults)
        for key in step:
            if key != "op" and key not in allowed:
                raise PreprocessingError(
                    f"{where}: unknown parameter {key!r}{_did_you_mean(str(key), sorted(allowed))}"
                    f". Parameters of {name}: {', '.join(sorted(allowed))}"
                )
        missing = [key for key in op.required if key not in step]
        if missing:
            raise PreprocessingError(f"{where}: missing parameter(s) {', '.join(missing)}")
        params = {**op.defaults, **{k: v for k, v in step.items() if k != "op"}}
        op.check(where, params, spatial_dims)
        checked.append({"op": name, **params})
    return tuple(checked)


class Preprocessor:
    """The model card's preprocessing, as one callable: raw batch in, model-ready tensor out.

    ``preprocessor(batch)`` takes ``(B, *spatial)`` data (numpy, dask, zarr or torch; any real
    dtype) and returns a float32 CPU tensor ``(B, in_channels, *spatial)``. Data that already
    has a channel axis, ``(B, C, *spatial)``, is recognised by its number of dimensions
    (channels first); for channels-last data such as napari RGB images pass
    ``channel_axis=-1`` (to the call, or once to the constructor).
    """

    def __init__(
        self,
        steps: Sequence[Mapping[str, Any]] = (),
        *,
        spatial_dims: int,
        in_channels: int,
        channel_axis: int | None = None,
    ) -> None:
        if spatial_dims not in (1, 2, 3):
            raise ValueError(f"spatial_dims must be 1, 2 or 3, got {spatial_dims!r}")
        if not isinstance(in_channels, int) or in_channels < 1:
            raise ValueError(f"in_channels must be a positive integer, got {in_channels!r}")
        self.steps = validate_preprocessing(list(steps), spatial_dims)
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.channel_axis = channel_axis

    @classmethod
    def from_card(cls, card: ModelCard, *, channel_axis: int | None = None) -> Preprocessor:
        """The preprocessing a model card asks for."""
        return cls(card.preprocessing, spatial_dims=card.spatial_dims,
                   in_channels=card.in_channels, channel_axis=channel_axis)

    def __repr__(self) -> str:
        ops = ", ".join(step["op"] for step in self.steps) or "identity"
        return (f"Preprocessor({ops}; spatial_dims={self.spatial_dims}, "
                f"in_channels={self.in_channels})")

    def __call__(self, batch: object, channel_axis: int | None = None) -> torch.Tensor:
        axis = self.channel_axis if channel_axis is None else channel_axis
        x = self._as_channels_first(self._as_float_tensor(batch), axis)
        for step in self.steps:
            x = OPS[step["op"]].apply(x, step)
        if x.shape[1] != self.in_channels:
            hint = (
                f" Add {{op: repeat_channels, channels: {self.in_channels}}} to the card's "
                "preprocessing." if x.shape[1] == 1 else ""
            )
            raise ValueError(
                f"after preprocessing the batch has {x.shape[1]} channel(s) but the model takes "
                f"{self.in_channels}.{hint}"
            )
        return x.contiguous()

    @staticmethod
    def _as_float_tensor(batch: object) -> torch.Tensor:
        # Always a private float32 copy: the ops must never alias (or write into) the caller's
        # image, and read-only buffers (zarr, memory maps) become writable.
        raw: object = batch
        if isinstance(batch, torch.Tensor):
            array = batch.detach().to("cpu", torch.float32).numpy().copy()
        else:
            raw = np.asarray(batch)  # computes dask arrays, reads zarr slices
            if raw.dtype.kind not in "biuf":
                raise TypeError(
                    f"expected a real-valued numeric array, got dtype {raw.dtype}; convert "
                    "complex or object data to real numbers first"
                )
            with np.errstate(over="ignore"):  # an overflow is named below, with its value
                array = np.array(raw, dtype=np.float32, order="C", copy=True)
        nan = int(np.isnan(array).sum())
        inf = int(np.isinf(array).sum())
        if nan or inf:
            overflow = overflow_problem(raw, np.float32)
            if overflow:
                raise ValueError(overflow)
            raise ValueError(
                f"the input contains {nan} NaN and {inf} infinite value(s) out of {array.size}; "
                "a CNN cannot explain them. Fill them (e.g. numpy.nan_to_num) or crop them away"
            )
        return torch.from_numpy(array)

    def _as_channels_first(self, x: torch.Tensor, channel_axis: int | None) -> torch.Tensor:
        dims = self.spatial_dims
        if channel_axis is not None:
            if x.ndim != dims + 2:
                raise ValueError(
                    f"channel_axis={channel_axis} needs data of shape (B, C, *spatial) with "
                    f"{dims} spatial axes ({dims + 2} dimensions), got {tuple(x.shape)}"
                )
            if not -x.ndim <= channel_axis < x.ndim or channel_axis in (0, -x.ndim):
                raise ValueError(
                    f"channel_axis={channel_axis} is not a channel axis of a batch with shape "
                    f"{tuple(x.shape)} (axis 0 is the batch)"
                )
            return torch.movedim(x, channel_axis, 1)
        if x.ndim == dims + 1:
            return x.unsqueeze(1)
        if x.ndim == dims + 2:
            return x
        raise ValueError(
            f"expected a batch (B, *spatial) or (B, C, *spatial) with {dims} spatial axes, got "
            f"shape {tuple(x.shape)}" + (
                "; add a batch axis (x[None]) for a single sample" if x.ndim == dims else ""
            )
        )

    def output_spatial_shape(self, spatial_shape: Sequence[int]) -> tuple[int, ...]:
        """The spatial shape the model sees for data of ``spatial_shape`` (changes with resize)."""
        shape = tuple(spatial_shape)
        for step in self.steps:
            if step["op"] == "resize":
                shape = tuple(step["size"])
        return shape
