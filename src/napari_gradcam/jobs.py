"""Long jobs as generators: explain an image layer's data, slice by slice or window by window.

Every shell runs the same job. :func:`explain_job` yields ``(done, total)`` after each batch
and returns an :class:`ExplainResult` that carries the maps, the model's predictions and the
provenance record; the napari widget runs it in a thread worker (which can stop at any
``yield``), the command line and the tests drain it with :func:`run_job`.

No Qt and no napari here. What a napari layer contributes is captured, when a run starts, in an
:class:`ImageSource` (the data array, whether it is RGB, the current position), so switching
layers during a run cannot change what is explained. The job never copies the whole array:
each batch reads one slab (``np.asarray`` of a slice of a dask or zarr array), so a volume larger
than memory is explained slab by slab. Only the map itself is held in memory.

Which axes a model sees (``n`` = the data's number of non-channel axes, ``d`` = the model's
spatial dimensions):

``"current"``
    2D model: the displayed plane (the last two axes, or ``ExplainRequest.plane``), every other
    axis fixed at the current position. 1D model: every row of that plane (a stack of spectra).
    3D model: one window of ``window`` (default: the card's input size) centred on the
    current position.
``"slices"``
    2D model: every plane along ``axis``, spanned by the last two other axes; axes beyond
    those three stay at the current position (so a 4D stack is explained one 3D volume at a
    time). 1D model: every row along ``axis``.
``"windows"``
    3D model: overlapping, Gaussian-blended windows tile the last three axes
    (:func:`~napari_gradcam.core.volume.volume_job`).

Multi-channel data (``ExplainRequest.channel_axis``): one data axis holds the model's input
channels, e.g. C in a (Z, C, Y, X) stack for a 2-channel model. Its length must equal the
card's ``in_channels``; each batch feeds that whole axis as the model's channel dimension, and
every rule above applies to the remaining axes as if the channel axis were not there. Without
a channel axis (the default) every extra axis is fixed at the current position, so a
(T, Z, Y, X) series is explained at the current T.

Uncertainty and the out-of-domain check: ``ExplainRequest.uncertainty`` wraps the explainer in
an :class:`~napari_gradcam.core.uncertainty.UncertaintyExplainer` (flips, shifts, MC dropout of
every batch; in windows mode also the disagreement between overlapping windows), and the
result carries a standard-deviation map per label beside each map. Before the first batch the
job compares a seeded sample of what it will explain with the card's training statistics
(:func:`~napari_gradcam.core.domain.check_domain`); the report travels in the result and the
provenance, and the shells decide how to show it.

The result is a map with the source's number of axes: full length along the explained axes
and length 1 along the fixed ones and the channel axis (at the current position, so the map
shows where the user is looking), with ``origin`` the data index of its first pixel, so a
shell places it exactly on the source with the source's own scale and translate.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from napari_gradcam.core.device import run_with_oom_backoff
from napari_gradcam.core.domain import DomainReport, check_domain
from napari_gradcam.core.engine import preserved_model_state
from napari_gradcam.core.methods import heatmaps, make_explainer, method_info
from napari_gradcam.core.preprocess import overflow_problem
from napari_gradcam.core.provenance import make_provenance
from napari_gradcam.core.targets import (
    AllClasses,
    ClassTarget,
    PredictedClass,
    RegressionTarget,
    SegmentationRegion,
)
from napari_gradcam.core.uncertainty import MEANINGS, SOURCES, UncertaintyExplainer
from napari_gradcam.core.volume import Cancelled, class_probabilities, run_job, volume_job

MODES = ("current", "slices", "windows")
TARGET_KINDS = ("predicted", "class", "all", "region", "click", "regression")
UNCERTAINTY_SOURCES = (*SOURCES, "windows")
"""What an uncertainty map can measure: flips, shifts and MC dropout of each batch
(:mod:`napari_gradcam.core.uncertainty`), and in windows mode the disagreement between
overlapping windows."""
_RGB_TO_GREY = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R BT.601 luma

Job = Generator[tuple[int, int], None, "ExplainResult"]


class JobError(Exception):
    """A job failed; the message says why in words a user can act on.

    Deliberately *not* a RuntimeError: Qt thread workers treat RuntimeErrors as "the worker was
    deleted" and swallow them, so a failing model would otherwise fail silently.
    """


@dataclass(frozen=True)
class ImageSource:
    """The image to explain, captured when the run starts.

    ``data``: any array (NumPy, dask, zarr), never copied whole. ``rgb``: the last axis holds
    colour channels (RGB or RGBA). ``current_index``: data index of the current position, one
    per non-channel axis (``None``: the first position everywhere).
    """

    name: str
    data: Any
    rgb: bool = False
    current_index: tuple[int, ...] | None = None
    voxel_size: tuple[float, ...] | None = None  # micrometres per non-channel axis; None: unknown

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape without the colour axis."""
        shape = tuple(int(s) for s in self.data.shape)
        return shape[:-1] if self.rgb else shape

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def index(self) -> tuple[int, ...]:
        if self.current_index is None:
            return (0,) * self.ndim
        if len(self.current_index) != self.ndim:
            raise ValueError(f"current_index {self.current_index} has {len(self.current_index)} "
                             f"entries but the image has {self.ndim} axes")
        return tuple(int(min(max(i, 0), s - 1))
                     for i, s in zip(self.current_index, self.shape, strict=True))


@dataclass(frozen=True)
class TargetChoice:
    """What to explain.

    ``kind``: ``"predicted"`` (each sample's predicted class; classifiers), ``"class"``
    (``class_index``), ``"all"`` (one map per class), ``"region"`` (segmentation models:
    ``class_index`` summed inside ``mask``, an array of the source's non-channel shape whose
    non-zero pixels are the region; ``None``: the whole image), ``"click"`` (``point``, a data
    index: the class predicted at that pixel, inside its connected region, for segmentation
    models; the predicted class of the plane or window under it for classifiers),
    ``"regression"`` (regression heads: what increases (``sign=+1``) or decreases
    (``sign=-1``) predicted value ``output_index``, named ``property_name``; see
    :class:`~napari_gradcam.core.targets.RegressionTarget`).
    ``region_name``: how the region reads in the label (``"'defects' label 2"``), so maps of
    different regions get different layer names; ``None``: "region".
    """

    kind: str = "predicted"
    class_index: int | None = None
    mask: Any = None
    point: tuple[int, ...] | None = None
    region_name: str | None = None
    output_index: int | None = None
    sign: int = 1
    property_name: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in TARGET_KINDS:
            raise ValueError(f"target kind must be one of {', '.join(TARGET_KINDS)}, "
                             f"got {self.kind!r}")
        if self.kind in ("class", "region") and self.class_index is None:
            raise ValueError(f"a {self.kind!r} target needs a class_index")
        if self.kind == "click" and self.point is None:
            raise ValueError("a 'click' target needs the clicked point (a data index)")
        if self.kind == "regression":
            RegressionTarget(self.output_index, self.sign)  # the same checks, the same words

    def engine_target(self) -> RegressionTarget:
        """The engine's target of a ``"regression"`` choice."""
        return RegressionTarget(self.output_index, self.sign)

    def label(self, class_names: Sequence[str]) -> str:
        """How the target reads in a layer name."""
        if self.kind == "predicted":
            return "predicted"
        if self.kind == "all":
            return "all classes"
        if self.kind == "click":
            return "clicked"
        if self.kind == "regression":
            direction = "increases" if self.sign > 0 else "decreases"
            what = self.property_name or (
                "prediction" if self.output_index is None else f"output {self.output_index}")
            return f"{direction} {what}"
        name = _class_name(class_names, self.class_index)
        if self.kind == "region" and self.mask is not None:
            return f"{name} in {self.region_name or 'region'}"
        return name


@dataclass(frozen=True)
class ExplainRequest:
    """The user's choices for one run (see the module docstring for the modes)."""

    method: str = "gradcam"
    layer: str | None = None  # target layer; None: the card's
    target: TargetChoice = field(default_factory=TargetChoice)
    mode: str = "current"
    axis: int | None = None  # slices: the data axis to step along
    plane: tuple[int, ...] | None = None  # current mode, 2D models: the displayed axes
    window: tuple[int, ...] | None = None  # 3D models; None: the card's input size
    overlap: float = 0.25
    batch_size: int = 8
    device: str | None = None
    channel_axis: int | None = None  # data axis holding the model's input channels; None: none
    uncertainty: tuple[str, ...] = ()  # of UNCERTAINTY_SOURCES; () : no uncertainty map
    n_dropout: int = 8  # MC-dropout samples per batch ("dropout" source)
    domain_check: bool = True  # compare the input with the card's training statistics


@dataclass
class ExplainResult:
    """Maps, predictions and provenance of one run.

    ``maps`` maps a target label (``"predicted"``, a class name...) to an array with the
    source's number of axes; ``origin`` is the data index of its first element. Predictions are
    class probabilities, one row per explained sample (plane, row or window), whose data
    positions are ``positions`` (``sample_axis`` tells which axis they step along).
    ``class_map`` (segmentation models) is the predicted class of every pixel, same shape as
    the maps. With a regression target, ``predictions`` are the predicted values themselves.
    ``uncertainty`` maps the same labels to standard-deviation maps of the same shape and
    origin (only when the request asked for uncertainty; ``uncertainty_info`` says which
    sources and what they mean); ``domain`` is the out-of-domain report
    (:meth:`~napari_gradcam.core.domain.DomainReport.to_dict`), None when not checked.
    """

    source_name: str
    method: str
    maps: dict[str, np.ndarray]
    origin: tuple[int, ...]
    predictions: np.ndarray
    positions: list[tuple[int, ...]]
    sample_axis: int | None
    class_names: tuple[str, ...]
    target_indices: np.ndarray | None
    provenance: dict[str, Any]
    contrast_limits: dict[str, tuple[float, float]]
    class_map: np.ndarray | None = None
    mode: str = "current"
    window: tuple[int, ...] | None = None
    messages: list[str] = field(default_factory=list)
    uncertainty: dict[str, np.ndarray] = field(default_factory=dict)
    uncertainty_info: dict[str, Any] | None = None
    domain: dict[str, Any] | None = None
    regression: bool = False

    def prediction_at(self, index: Sequence[int]) -> np.ndarray | None:
        """The probabilities of the sample that covers the data ``index`` (None: not covered)."""
        index = tuple(int(i) for i in index)
        shape = next(iter(self.maps.values())).shape
        if not all(o <= i < o + s for i, o, s in zip(index, self.origin, shape, strict=True)):
            return None
        if self.sample_axis is not None and self.mode != "windows":
            row = index[self.sample_axis] - self.origin[self.sample_axis]
            return self.predictions[row] if 0 <= row < len(self.predictions) else None
        if self.mode == "windows" and self.positions:
            # the window whose centre is nearest
            corners = np.asarray(self.positions, dtype=np.float64)
            centres = corners[:, -3:] + np.asarray(self.window, dtype=np.float64) / 2.0
            spatial = np.asarray(index[-3:], dtype=np.float64)
            return self.predictions[int(np.argmin(((centres - spatial) ** 2).sum(1)))]
        return self.predictions[0]

    def windows_through_plane(self, z: int) -> tuple[np.ndarray, int] | None:
        """Windows mode: mean probabilities of the windows that cut plane ``z`` of the
        explained volume (its first axis), and how many there are (None: no window does)."""
        if self.mode != "windows" or not self.positions or self.window is None:
            return None
        starts = np.asarray(self.positions, dtype=np.int64)[:, -3]
        through = (starts <= z) & (z < starts + self.window[0])
        if not through.any():
            return None
        return self.predictions[through].mean(0), int(through.sum())


@dataclass(frozen=True)
class Plan:
    """Which axes are explained, which are fixed, and where the map goes."""

    spatial_axes: tuple[int, ...]
    sample_axis: int | None
    fixed: dict[int, int]
    box: dict[int, tuple[int, int]]  # spatial axis -> (start, stop) of the part explained
    mode: str
    channel_axis: int | None = None  # read whole, fed as the model's channels
    channel_position: int = 0  # where the map sits along the channel axis (length 1)

    def collapsed(self, axis: int) -> bool:
        """Whether the map has length 1 along ``axis`` (a fixed axis or the channel axis)."""
        return axis in self.fixed or axis == self.channel_axis

    def out_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        return tuple(self._extent(axis, size)[1] - self._extent(axis, size)[0]
                     for axis, size in enumerate(shape))

    def origin(self, shape: Sequence[int]) -> tuple[int, ...]:
        return tuple(self._extent(axis, size)[0] for axis, size in enumerate(shape))

    def _extent(self, axis: int, size: int) -> tuple[int, int]:
        if axis in self.fixed:
            return self.fixed[axis], self.fixed[axis] + 1
        if axis == self.channel_axis:
            return self.channel_position, self.channel_position + 1
        return self.box.get(axis, (0, size))


def _class_name(class_names: Sequence[str], index: int | None) -> str:
    if index is not None and 0 <= index < len(class_names):
        return str(class_names[index])
    return f"class {index}"


def _card(loaded: Any) -> Any:
    return loaded.card


# --------------------------------------------------------------------------------------------
# Planning: check everything that can be checked before any computation


def plan_explanation(loaded: Any, source: ImageSource, request: ExplainRequest) -> Plan:
    """Check that the model fits the data and the choices, and say which axes are explained.

    Raises ``ValueError`` (or ``TypeError``) with a sentence a user can act on; called by the
    shells before a worker starts, so a misfit is reported at once and nothing is changed.
    """
    card = _card(loaded)
    d, n = int(card.spatial_dims), source.ndim
    if request.mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {request.mode!r}")
    if request.batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {request.batch_size}")
    dtype = np.dtype(getattr(source.data, "dtype", np.float32))
    if dtype.kind not in "biuf":
        raise TypeError(f"the layer {source.name!r} holds {dtype} values; Grad-CAM needs numbers")
    if 0 in source.shape:
        raise ValueError(f"the layer {source.name!r} is empty (shape {source.shape})")
    if n < d:
        raise ValueError(
            f"the model {card.name!r} explains {d}D data but the layer {source.name!r} has only "
            f"{n} axes (shape {source.shape}); pick a {d}D (or larger) image or another model"
        )
    if source.rgb and card.in_channels not in (1, 3):
        raise ValueError(f"the layer {source.name!r} is RGB but the model {card.name!r} takes "
                         f"{card.in_channels} channels; RGB can feed 1 (as grey) or 3 channels")
    if source.rgb and d == 3:
        raise ValueError("3D models take grey volumes; convert the RGB stack to grey first")
    _check_target(card, request)
    if request.channel_axis is not None:
        plan = _plan_with_channels(card, source, request)
    else:
        plan = _plan_axes(card, source, request)
    _check_channels(loaded, source, plan)
    return plan


def _plan_axes(card: Any, source: ImageSource, request: ExplainRequest) -> Plan:
    d, index = int(card.spatial_dims), source.index()
    if d == 3:
        return _plan_3d(card, source, request, index)
    if request.mode == "windows":
        raise ValueError(f"'windows' mode is for 3D models; the model {card.name!r} is {d}D: "
                         "use 'current' or 'slices'")
    if d == 2:
        return _plan_2d(source, request, index)
    return _plan_1d(source, request, index)


def _plan_with_channels(card: Any, source: ImageSource, request: ExplainRequest) -> Plan:
    """Plan on the data without its channel axis, then put the channel axis back.

    The channel-free planning reuses every rule of the single-channel case; only the axis
    numbers are translated (full data axes <-> axes without the channel axis).
    """
    n, d, channel = source.ndim, int(card.spatial_dims), request.channel_axis
    if source.rgb:
        raise ValueError(f"the layer {source.name!r} is RGB: its colour axis already feeds the "
                         "model's channels; choose no channel axis")
    if not -n <= channel < n:
        raise ValueError(f"channel axis {channel} does not exist in the layer {source.name!r} "
                         f"with {n} axes (shape {source.shape})")
    channel %= n
    length = source.shape[channel]
    if length != card.in_channels:
        raise ValueError(
            f"the channel axis {channel} of {source.name!r} has length {length} but the model "
            f"{card.name!r} takes {card.in_channels} channel(s); choose an axis of length "
            f"{card.in_channels}, or no channel axis"
        )
    if n - 1 < d:
        raise ValueError(f"without its channel axis the layer {source.name!r} has {n - 1} axes; "
                         f"the model {card.name!r} needs {d}")
    keep = [a for a in range(n) if a != channel]
    reduced_of = {a: i for i, a in enumerate(keep)}

    def reduced(axis: int, what: str) -> int:
        if not -n <= axis < n:
            raise ValueError(f"axis {axis} does not exist in data with {n} axes")
        if axis % n == channel:
            raise ValueError(f"the channel axis {channel} cannot also be the {what}; choose "
                             "another axis or another channel axis")
        return reduced_of[axis % n]

    index = source.index()
    point = request.target.point
    target = replace(request.target, mask=None)  # the run reads the full-shape mask itself
    if point is not None:
        target = replace(target, point=tuple(p for a, p in enumerate(point) if a != channel))
    stand_in = ImageSource(  # the data's shape without the channel axis; no memory, never read
        source.name,
        np.broadcast_to(np.zeros((), dtype=np.dtype(getattr(source.data, "dtype", "f4"))),
                        tuple(source.shape[a] for a in keep)),
        current_index=tuple(index[a] for a in keep),
    )
    plane = request.plane
    if plane is not None and request.mode == "current" and d == 2:
        plane = tuple(reduced(a, "displayed plane") for a in plane)
    axis = request.axis
    if axis is not None and request.mode == "slices":
        axis = reduced(axis, "slice axis")
    if d == 3 and request.mode == "windows":
        raise ValueError("'windows' mode does not take a channel axis yet; use 'current' (one "
                         "window around the current position)")
    inner = _plan_axes(card, stand_in, replace(request, plane=plane, axis=axis, target=target,
                                               channel_axis=None))
    return Plan(
        spatial_axes=tuple(keep[a] for a in inner.spatial_axes),
        sample_axis=None if inner.sample_axis is None else keep[inner.sample_axis],
        fixed={keep[a]: i for a, i in inner.fixed.items()},
        box={keep[a]: extent for a, extent in inner.box.items()},
        mode=inner.mode,
        channel_axis=channel,
        channel_position=index[channel],
    )


def is_regression_card(card: Any) -> bool:
    """Whether the card says its outputs are predicted values (porosity, grain size), not
    class scores: ``task: regression``. Such outputs have no "predicted class"."""
    return getattr(card, "task", None) == "regression"


def _check_target(card: Any, request: ExplainRequest) -> None:
    """Refuse a target the model or the method cannot explain, naming why.

    The method's rules come from its own declarations (:func:`method_info`): a method that
    needs class scores refuses segmentation models, one that explains one target at a time
    refuses "all classes".
    """
    target, k = request.target, len(card.class_names)
    segmentation = card.task == "segmentation"
    info = method_info(request.method)
    if target.class_index is not None and not 0 <= target.class_index < max(k, 1):
        raise ValueError(f"class {target.class_index} is out of range: the model {card.name!r} "
                         f"has {k} classes ({', '.join(card.class_names)})")
    if is_regression_card(card) and target.kind != "regression":
        raise ValueError(
            f"the model {card.name!r} predicts values (a regression), not classes: there is no "
            f"{'predicted class' if target.kind in ('predicted', 'click') else 'class'} to "
            "explain. Choose what increases or decreases one predicted value")
    if target.kind == "regression" and segmentation:
        raise ValueError(f"the model {card.name!r} segments (a map of class scores per pixel); "
                         "a regression target needs predicted values (N,) or (N, P)")
    if segmentation and target.kind == "predicted":
        raise ValueError(
            f"the model {card.name!r} segments: there is no single predicted class per image. "
            "Choose a class (optionally inside a region from a Labels or Shapes layer)"
        )
    if not segmentation and target.kind == "region":
        raise ValueError(f"a region target needs a segmentation model; {card.name!r} is a "
                         "classifier: choose 'predicted' or a class")
    if info.classifier_only and segmentation:
        why = (" (global pooling + linear head)" if info.needs_linear_head else "")
        raise ValueError(f"{info.title or info.name} needs a classifier{why}, but the model "
                         f"{card.name!r} segments; choose gradcam or another method that "
                         "explains regions")
    if info.one_target_at_a_time and target.kind == "all":
        raise ValueError(f"{info.title or info.name} explains one class at a time; choose one "
                         "class")
    if target.kind == "region" and target.mask is not None and request.mode == "windows":
        raise ValueError("a region target works in 'current' and 'slices' modes, not windows")
    unknown = [s for s in request.uncertainty if s not in UNCERTAINTY_SOURCES]
    if unknown:
        raise ValueError(f"unknown uncertainty source(s) {', '.join(map(repr, unknown))}; "
                         f"choose from {', '.join(UNCERTAINTY_SOURCES)}")
    if "windows" in request.uncertainty and request.mode != "windows":
        raise ValueError("the 'windows' uncertainty is the disagreement between overlapping "
                         "3D windows: it needs 'windows' mode")
    if "dropout" in request.uncertainty and request.n_dropout < 2:
        raise ValueError(f"MC dropout needs at least 2 samples, got n_dropout={request.n_dropout}")


def _plan_2d(source: ImageSource, request: ExplainRequest, index: tuple[int, ...]) -> Plan:
    n = source.ndim
    if request.mode == "current":
        plane = tuple(sorted(request.plane)) if request.plane else (n - 2, n - 1)
        if len(plane) != 2 or len(set(plane)) != 2 or not all(0 <= a < n for a in plane):
            raise ValueError(f"the displayed plane must be two different axes of 0..{n - 1}, "
                             f"got {request.plane}")
        fixed = {a: index[a] for a in range(n) if a not in plane}
        return Plan(plane, None, fixed, {}, "current")
    if n < 3:
        raise ValueError(f"'every slice' needs a stack (3 or more axes); the layer "
                         f"{source.name!r} is a single {n}D image: use 'current'")
    axis = n - 3 if request.axis is None else request.axis
    if not -n <= axis < n:
        raise ValueError(f"axis {axis} does not exist in data with {n} axes")
    axis %= n
    others = [a for a in range(n) if a != axis][-2:]
    fixed = {a: index[a] for a in range(n) if a != axis and a not in others}
    return Plan(tuple(others), axis, fixed, {}, "slices")


def _plan_1d(source: ImageSource, request: ExplainRequest, index: tuple[int, ...]) -> Plan:
    n = source.ndim
    if n == 1:
        return Plan((0,), None, {}, {}, request.mode)
    default_axis = n - 2
    axis = default_axis if (request.axis is None or request.mode == "current") else request.axis
    if not -n <= axis < n:
        raise ValueError(f"axis {axis} does not exist in data with {n} axes")
    axis %= n
    spatial = n - 1 if axis != n - 1 else n - 2
    fixed = {a: index[a] for a in range(n) if a not in (axis, spatial)}
    return Plan((spatial,), axis, fixed, {}, request.mode)


def _plan_3d(card: Any, source: ImageSource, request: ExplainRequest,
             index: tuple[int, ...]) -> Plan:
    n = source.ndim
    spatial = (n - 3, n - 2, n - 1)
    fixed = {a: index[a] for a in range(n - 3)}
    window = _window(card, request, tuple(source.shape[a] for a in spatial))
    if request.mode == "slices":
        raise ValueError(f"the model {card.name!r} is 3D: use 'windows' (the whole volume) or "
                         "'current' (one window around the current position)")
    if request.mode == "windows":
        if not 0.0 <= request.overlap < 1.0:
            raise ValueError(f"overlap must be in [0, 1), got {request.overlap}")
        return Plan(spatial, None, fixed, {}, "windows")
    centre = request.target.point or index
    box = {}
    for axis, size in zip(spatial, window, strict=True):
        length = source.shape[axis]
        if size >= length:
            box[axis] = (0, length)
        else:
            start = min(max(int(centre[axis]) - size // 2, 0), length - size)
            box[axis] = (start, start + size)
    return Plan(spatial, None, fixed, box, "current")


def _window(card: Any, request: ExplainRequest, shape: tuple[int, ...]) -> tuple[int, ...]:
    window = request.window or card.input_size or shape
    window = tuple(int(w) for w in window)
    if len(window) != 3 or min(window) < 1:
        raise ValueError(f"window must be three positive sizes (z, y, x), got {window}")
    return window


def _check_channels(loaded: Any, source: ImageSource, plan: Plan) -> None:
    """Push a tiny dummy batch through the preprocessing: a channel misfit shows up now."""
    card = _card(loaded)
    probe = np.zeros((1, *(8,) * card.spatial_dims), dtype=np.float32)
    if plan.channel_axis is not None or (source.rgb and card.in_channels == 3):
        probe = np.zeros((1, card.in_channels, *(8,) * card.spatial_dims), dtype=np.float32)
    try:
        tensor = loaded.preprocess(probe)
    except ValueError as error:
        raise ValueError(f"the layer {source.name!r} does not fit the model {card.name!r}: "
                         f"{error}") from None
    if tensor.shape[1] != card.in_channels:
        raise ValueError(f"the preprocessing makes {tensor.shape[1]} channels but the model "
                         f"{card.name!r} takes {card.in_channels}")


# --------------------------------------------------------------------------------------------
# Reading batches


def read_slab(source: ImageSource, plan: Plan, start: int, stop: int, data: Any = None,
              channels: bool | None = None) -> np.ndarray:
    """One slab read from the source (a dask/zarr slab only): ``(B, *spatial[, C])``, or
    ``(B, C, *spatial)`` with a channel axis. ``start:stop`` runs along the sample axis; without
    one, B is 1. ``data`` (a region mask of the source's shape) is read the same way, at the
    map's position along the channel axis. Public so the shells cut a sample the job's way."""
    feed_channels = data is None and plan.channel_axis is not None
    data = source.data if data is None else data
    channels = source.rgb if channels is None else channels
    key: list[object] = []
    for axis in range(source.ndim):
        if axis in plan.fixed:
            key.append(plan.fixed[axis])
        elif axis == plan.channel_axis:
            key.append(slice(None) if feed_channels else plan.channel_position)
        elif axis == plan.sample_axis:
            key.append(slice(start, stop))
        else:
            begin, end = plan.box.get(axis, (0, source.shape[axis]))
            key.append(slice(begin, end))
    if channels:
        key.append(slice(None))
    slab = np.asarray(data[tuple(key)])
    kept = [a for a in range(source.ndim)
            if a not in plan.fixed and (feed_channels or a != plan.channel_axis)]
    if plan.sample_axis is None:
        slab = slab[None]
        kept = [-1, *kept]  # the batch axis
    sample = kept.index(plan.sample_axis if plan.sample_axis is not None else -1)
    if not feed_channels:
        return np.moveaxis(slab, sample, 0)
    return np.moveaxis(slab, (sample, kept.index(plan.channel_axis)), (0, 1))


def to_model_input(slab: np.ndarray, source: ImageSource, in_channels: int) -> np.ndarray:
    """RGB → grey (1-channel models) or channels-first RGB (3-channel models); float32.

    Values beyond float32 become inf silently: the finiteness check names the overflow."""
    with np.errstate(over="ignore"):
        slab = slab.astype(np.float32, copy=False)
    if not source.rgb:
        return slab
    rgb = slab[..., :3]
    if in_channels == 1:
        return rgb @ _RGB_TO_GREY
    return np.moveaxis(rgb, -1, 1)


def _check_finite(batch: np.ndarray, where: str, raw: np.ndarray | None = None) -> None:
    """Refuse NaN/inf in a float32 ``batch``; ``raw`` (the data before the float32 cast) tells
    finite values too large for float32 (1e300 in float64 data) from real NaN or inf."""
    if not np.isfinite(batch).all():
        overflow = None if raw is None else overflow_problem(raw, np.float32, where)
        if overflow:
            raise ValueError(overflow)
        raise ValueError(f"NaN or infinite values in {where}: the model cannot explain them. "
                         "Fill or mask them first (e.g. replace NaN by the background)")


# --------------------------------------------------------------------------------------------
# The job


def explain_job(loaded: Any, source: ImageSource, request: ExplainRequest) -> Job:
    """Explain ``source`` with ``loaded`` (a :class:`~napari_gradcam.core.models.LoadedModel`).

    Yields ``(done, total)`` between batches and returns an :class:`ExplainResult`. Any
    failure is raised as :class:`JobError` (out of memory, NaN in the data, a model that
    fails on the input), with the original exception chained.
    """
    plan = plan_explanation(loaded, source, request)
    try:
        return (yield from _explain(loaded, source, request, plan))
    except (GeneratorExit, Cancelled):
        raise
    except JobError:
        raise
    except MemoryError as error:
        raise JobError(f"out of memory while explaining {source.name!r}: {error}. Use a "
                       "smaller batch size or window, or 'current' mode") from error
    except (ValueError, TypeError) as error:
        raise JobError(str(error)) from error
    except Exception as error:
        raise JobError(f"the model failed while explaining {source.name!r} "
                       f"({type(error).__name__}: {error})") from error


def _explain(loaded: Any, source: ImageSource, request: ExplainRequest, plan: Plan) -> Job:
    card = _card(loaded)
    layer = request.layer or card.target_layer
    explainer = make_explainer(request.method, loaded.model, layer, device=request.device)
    cam_sources = tuple(s for s in request.uncertainty if s in SOURCES)
    if cam_sources:
        explainer = UncertaintyExplainer(explainer, sources=cam_sources,
                                         n_dropout=request.n_dropout)
    domain = domain_report(loaded, source, request, plan) if request.domain_check else None
    class_names = tuple(card.class_names)
    if request.target.kind == "all":
        labels = list(class_names)
    else:
        labels = [request.target.label(class_names)]
    shape = source.shape
    out_shape = plan.out_shape(shape)
    origin = plan.origin(shape)
    maps = {label: np.zeros(out_shape, dtype=np.float32) for label in labels}
    spreads = ({label: np.zeros(out_shape, dtype=np.float32) for label in labels}
               if request.uncertainty else {})
    messages: list[str] = []
    if plan.mode == "windows":
        result = yield from _windows(loaded, explainer, source, request, plan, maps, labels,
                                     spreads)
        predictions, positions, indices, class_map, window = result
    else:
        result = yield from _samples(loaded, explainer, source, request, plan, maps, labels,
                                     spreads)
        predictions, positions, indices, class_map = result
        window = None
    uncertainty_info = None
    if request.uncertainty:
        uncertainty_info = {
            "sources": list(request.uncertainty),
            "n_dropout": request.n_dropout if "dropout" in request.uncertainty else None,
            "meaning": {s: MEANINGS[s] for s in request.uncertainty},
        }
        last = getattr(explainer, "last_info", None)
        if last is not None:  # e.g. dropout not applicable: the model has no dropout layers
            uncertainty_info["applicable"] = {
                name: {"applicable": info.applicable, "reason": info.reason}
                for name, info in last.sources.items()}
    limits = {label: contrast_limits(array) for label, array in maps.items()}
    target_text = labels[0] if len(labels) == 1 else "all classes"
    provenance = make_provenance(
        method=request.method,
        layers=[layer],
        target=target_text,
        model_name=card.name,
        weights_sha256=loaded.weights_sha256,
        preprocessing=list(card.preprocessing),
        mode=plan.mode,
        source=source.name,
        options={
            "model_source": str(loaded.source),
            "class_names": list(class_names),
            "origin": list(origin),
            "source_shape": list(shape),
            "sample_axis": plan.sample_axis,
            "spatial_axes": list(plan.spatial_axes),
            "fixed": {str(k): v for k, v in plan.fixed.items()},
            "channel_axis": plan.channel_axis,
            "window": list(window) if plan.mode == "windows" else None,
            "overlap": request.overlap if plan.mode == "windows" else None,
            "batch_size": request.batch_size,
            "device": request.device,
            "rgb": source.rgb,
            "uncertainty": uncertainty_info,
            "domain_check": domain,
        },
    )
    explained = ExplainResult(
        source_name=source.name,
        method=request.method,
        maps=maps,
        origin=origin,
        predictions=predictions,
        positions=positions,
        sample_axis=plan.sample_axis,
        class_names=class_names,
        target_indices=indices,
        provenance=provenance,
        contrast_limits=limits,
        class_map=class_map,
        mode=plan.mode,
        window=window,
        messages=messages,
        uncertainty=spreads,
        uncertainty_info=uncertainty_info,
        domain=domain,
        regression=request.target.kind == "regression",
    )
    return explained


class _SampleView:
    """The samples a run explains as a lazy grey array ``(count, *spatial)``: item ``k`` is
    what the model sees at sample ``k`` (before preprocessing), read only when indexed."""

    def __init__(self, source: ImageSource, plan: Plan) -> None:
        self.source, self.plan = source, plan
        count = 1 if plan.sample_axis is None else source.shape[plan.sample_axis]
        out = plan.out_shape(source.shape)
        self.shape = (count, *(out[a] for a in plan.spatial_axes))
        self.dtype = np.dtype(getattr(source.data, "dtype", np.float32))
        self.ndim = len(self.shape)

    def __getitem__(self, key: tuple) -> np.ndarray:
        k, *block = key
        return read_slab(self.source, self.plan, int(k), int(k) + 1)[0][tuple(block)]


def domain_report(loaded: Any, source: ImageSource, request: ExplainRequest,
                  plan: Plan) -> dict[str, Any] | None:
    """The out-of-domain report of what this run explains, as plain data.

    Reads a seeded sample of the planes or windows (bounded memory, see
    :mod:`napari_gradcam.core.domain`); nothing is read when the card has no training
    statistics. RGB and multi-channel input are not checked (None): the statistics are of
    grey data. The voxel size is the source's, when it is known. A check that fails (odd
    data) says so in the report instead of stopping the run.
    """
    if source.rgb or plan.channel_axis is not None:
        return None
    voxel = None
    if source.voxel_size is not None:
        voxel = [float(source.voxel_size[a]) for a in plan.spatial_axes]
    try:
        if plan.mode == "windows":
            window = _window(_card(loaded), request, tuple(source.shape[a]
                                                          for a in plan.spatial_axes))
            report = check_domain(_BlockView(source, plan), loaded, voxel_size=voxel,
                                  input_size=window)
        else:
            report = check_domain(_SampleView(source, plan), loaded, voxel_size=voxel)
    except (ValueError, TypeError) as error:
        report = DomainReport(checked=False, reason=f"the domain check failed: {error}")
    return report.to_dict()


def contrast_limits(array: np.ndarray) -> tuple[float, float]:
    """0 to the 99.9th percentile (a few hot pixels should not wash the rest out)."""
    finite = array[np.isfinite(array)]
    if finite.size == 0:
        return 0.0, 1.0
    low = min(0.0, float(finite.min()))
    high = float(np.percentile(finite, 99.9))
    if high <= low:
        high = float(finite.max()) if finite.max() > low else low + 1.0
    return low, high


def _out_view(plan: Plan, array: np.ndarray, start: int, stop: int) -> tuple[object, ...]:
    """The index into a map array (out shape) for samples start:stop."""
    key: list[object] = []
    for axis in range(array.ndim):
        if plan.collapsed(axis):
            key.append(0)
        elif axis == plan.sample_axis:
            key.append(slice(start, stop))
        else:
            key.append(slice(None))
    return tuple(key)


def _write(plan: Plan, array: np.ndarray, start: int, stop: int, maps: np.ndarray) -> None:
    key = _out_view(plan, array, start, stop)
    if plan.sample_axis is None:
        array[key] = maps[0]
        return
    position = sum(1 for a in range(plan.sample_axis) if not plan.collapsed(a))
    array[key] = np.moveaxis(maps, 0, position)


def _samples(loaded, explainer, source, request, plan, maps, labels, spreads) -> Generator:
    """Current plane/window, every slice, or every row: batches along the sample axis."""
    card = _card(loaded)
    count = 1 if plan.sample_axis is None else source.shape[plan.sample_axis]
    predictions: list[np.ndarray] = [np.zeros(0)] * count
    indices: list[int] = [-1] * count
    segmentation = card.task == "segmentation"
    class_map = (np.zeros(next(iter(maps.values())).shape, dtype=np.int16)
                 if segmentation else None)
    device = getattr(explainer, "device", torch.device("cpu"))
    where = "the image" if plan.sample_axis is None else "slices"

    def work(chunk: range) -> None:
        start, stop = chunk.start, chunk.stop
        raw = read_slab(source, plan, start, stop)
        slab = to_model_input(raw, source, card.in_channels)
        _check_finite(slab, where if plan.sample_axis is None
                      else f"{where} {start}..{stop - 1} along axis {plan.sample_axis}", raw)
        tensor = loaded.preprocess(slab)
        target, mask = _batch_target(loaded, source, request, plan, tensor, start, stop, device)
        std = None
        if mask is not None and not mask.any():
            # no region pixel in these slices: nothing to explain, only predict
            outputs = _forward(loaded.model, tensor, device)
            batch_maps = np.zeros((len(tensor), *tensor.shape[2:]), dtype=np.float32)
            target_indices = None
        else:
            result = explainer.explain(tensor, target)
            outputs = result.outputs
            # an UncertaintyExplainer has reduced input gradients already: its name says so
            batch_maps = heatmaps(result.maps, getattr(explainer, "name", request.method))
            target_indices = result.target_indices
            std = result.extras.get("uncertainty")
        if std is None and spreads:
            std = np.zeros_like(batch_maps)
        if request.target.kind == "all":
            for k, label in enumerate(labels):
                _write(plan, maps[label], start, stop, batch_maps[:, k])
                if spreads:
                    _write(plan, spreads[label], start, stop, std[:, k])
        else:
            _write(plan, maps[labels[0]], start, stop, batch_maps)
            if spreads:
                _write(plan, spreads[labels[0]], start, stop, std)
        for offset, probs in enumerate(class_probabilities(outputs, target)):
            predictions[start + offset] = probs
            if target_indices is not None:
                indices[start + offset] = int(target_indices[offset])
        if class_map is not None and outputs.ndim == 2 + card.spatial_dims:
            _write(plan, class_map, start, stop, outputs.argmax(1).astype(np.int16))

    for done in run_with_oom_backoff(range(count), request.batch_size, work, device):
        yield done, count
    sample_positions = [tuple(_position(plan, source, i)) for i in range(count)]
    found = np.array(indices) if all(i >= 0 for i in indices) else None
    return np.stack(predictions), sample_positions, found, class_map


def _position(plan: Plan, source: ImageSource, sample: int) -> list[int]:
    origin = list(plan.origin(source.shape))
    if plan.sample_axis is not None:
        origin[plan.sample_axis] = sample
    return origin


def _forward(model: torch.nn.Module, tensor: torch.Tensor, device: torch.device) -> np.ndarray:
    with preserved_model_state(model), torch.no_grad():
        return model(tensor.to(device)).float().cpu().numpy()


def _batch_target(loaded, source, request, plan, tensor, start, stop, device):
    """The engine target for one batch, and the region mask it uses (None: no mask)."""
    choice = request.target
    card = _card(loaded)
    if choice.kind == "predicted":
        return PredictedClass(), None
    if choice.kind == "class":
        if card.task == "segmentation":
            return SegmentationRegion(int(choice.class_index)), None
        return ClassTarget(int(choice.class_index)), None
    if choice.kind == "all":
        return AllClasses(), None
    if choice.kind == "regression":
        return choice.engine_target(), None
    if choice.kind == "region":
        if choice.mask is None:
            return SegmentationRegion(int(choice.class_index)), None
        mask = read_slab(source, plan, start, stop, data=choice.mask, channels=False) != 0
        return SegmentationRegion(int(choice.class_index), mask), mask
    # click
    if card.task != "segmentation":
        return PredictedClass(), None
    outputs = _forward(loaded.model, tensor, device)
    predicted = outputs.argmax(1)[0]
    local = tuple(int(choice.point[a]) - plan.origin(source.shape)[a] for a in plan.spatial_axes)
    if not all(0 <= p < s for p, s in zip(local, predicted.shape, strict=True)):
        raise ValueError(f"the clicked point {choice.point} is outside the explained image")
    clicked_class = int(predicted[local])
    components, _ = ndimage.label(predicted == clicked_class)
    mask = (components == components[local])[None]
    return SegmentationRegion(clicked_class, mask), mask


class _BlockView:
    """The last three axes of the source at the fixed positions, as a 3D array for volume_job."""

    def __init__(self, source: ImageSource, plan: Plan) -> None:
        self.source, self.plan = source, plan
        self.shape = tuple(source.shape[a] for a in plan.spatial_axes)
        self.dtype = np.dtype(getattr(source.data, "dtype", np.float32))
        self.ndim = 3

    def __getitem__(self, key: object) -> np.ndarray:
        parts = list(key) if isinstance(key, tuple) else [key]
        parts += [slice(None)] * (3 - len(parts))
        full: list[object] = [self.plan.fixed[a] for a in range(self.source.ndim - 3)]
        raw = np.asarray(self.source.data[tuple(full + parts)])
        with np.errstate(over="ignore"):  # an overflow is named just below
            block = raw.astype(np.float32, copy=False)
        if raw.dtype.kind == "f" and raw.dtype.itemsize > 4 and not np.isfinite(block).all():
            overflow = overflow_problem(raw, np.float32, f"the volume {self.source.name!r}")
            if overflow:  # say so here: after the cast it would read as NaN/inf in the data
                raise ValueError(overflow)
        return block


def _windows(loaded, explainer, source, request, plan, maps, labels, spreads) -> Generator:
    card = _card(loaded)
    view = _BlockView(source, plan)
    window = _window(card, request, view.shape)
    if request.target.kind == "all":
        targets = list(range(len(labels)))
    elif request.target.kind in ("class", "region"):  # a region here has no mask: the class
        targets = [int(request.target.class_index)]
    elif request.target.kind == "regression":
        targets = [request.target.engine_target()]
    else:
        targets = [None]

    def checked(batch: np.ndarray) -> torch.Tensor:
        _check_finite(batch, "a window of the volume")
        return loaded.preprocess(batch)

    result = None
    for step, target in enumerate(targets):
        label = labels[step] if request.target.kind == "all" else labels[0]
        out = maps[label].reshape(view.shape)
        spread = spreads[label].reshape(view.shape) if spreads else None
        job = volume_job(explainer, view, mode="windows", window=window,
                         overlap=request.overlap, batch_size=request.batch_size,
                         target=target, preprocess=checked, out=out, uncertainty_out=spread)
        try:
            while True:
                done, total = next(job)
                yield step * total + done, total * len(targets)
        except StopIteration as finished:
            result = finished.value
    assert result is not None
    offset = [plan.fixed[a] for a in range(source.ndim - 3)]
    positions = [tuple(offset + list(corner)) for corner in result.positions]
    return result.predictions, positions, result.target_indices, None, result.window


def explain(loaded: Any, source: ImageSource, request: ExplainRequest | None = None,
            **progress: Any) -> ExplainResult:
    """:func:`explain_job`, drained (scripts, command line, tests)."""
    return run_job(explain_job(loaded, source, request or ExplainRequest()), **progress)
