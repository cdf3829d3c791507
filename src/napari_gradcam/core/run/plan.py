"""One plan of a run: which axes are explained, which are fixed, where the map sits.

:func:`plan_explanation` checks everything that can be checked before any computation (the
model against the data, the target against the method's own declarations, the window, the
channels) and says which axes a run explains; every shell calls it before a worker starts, so
a misfit is reported at once. The job (:mod:`napari_gradcam.core.run.job`) then runs the tiles
(:mod:`napari_gradcam.core.run.tiles`) the plan names. The dask runner's chunking
(:func:`napari_gradcam.distributed.make_plan`) cuts the same kind of volume along one axis
and uses the same checks (:func:`check_mode_fits_model`,
:func:`~napari_gradcam.core.run.tiles.check_window`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from napari_gradcam.core.methods import method_info
from napari_gradcam.core.run.request import (
    MODES,
    ExplainRequest,
    ImageSource,
    check_uncertainty,
)
from napari_gradcam.core.run.tiles import check_window


@dataclass(frozen=True)
class Plan:
    """Which axes are explained, which are fixed, how they are tiled and chunked.

    The one plan of both shells: the widget's job fills the axes (an N-D layer, its current
    position, a channel axis) and, in windows mode, the window; the command line and the dask
    runner (:func:`napari_gradcam.distributed.make_plan`, a 3D volume file) fill the axes, the
    window, the layer and target it resolved, and the chunking of the tasks and the output.
    """

    spatial_axes: tuple[int, ...]
    sample_axis: int | None
    fixed: dict[int, int]
    box: dict[int, tuple[int, int]]  # spatial axis -> (start, stop) of the part explained
    mode: str
    channel_axis: int | None = None  # read whole, fed as the model's channels
    channel_position: int = 0  # where the map sits along the channel axis (length 1)
    window: tuple[int, ...] | None = None  # windows mode: the window size (z, y, x)
    layer: str | None = None  # the target layer, when the plan resolved it (the CLI's)
    target: Any = None  # the engine target, when the plan resolved it (the CLI's)
    chunk: int | None = None  # planes per dask task and per output chunk along ``axis``
    chunks: tuple[int, ...] | None = None  # the output store's zarr chunks

    @property
    def axis(self) -> int:
        """The axis chunks and slices step along: the sample axis, else the first axis."""
        return self.sample_axis if self.sample_axis is not None else 0

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
    if request.output is not None:
        _check_output(source, request, plan, _card(loaded).class_names)
    return plan


def output_stores(output: str | Path, target_kind: str,
                  class_names: Sequence[str]) -> list[Path]:
    """Every store a run with ``output`` writes: ``output`` itself, or one per class for "all
    classes" (:func:`~napari_gradcam.core.run.output.label_path`)."""
    from napari_gradcam.core.run.output import label_path

    if target_kind != "all":
        return [Path(output)]
    return [label_path(output, str(name), several=True) for name in class_names]


def _check_output(source: ImageSource, request: ExplainRequest, plan: Plan,
                  class_names: Sequence[str]) -> None:
    """An on-disk map is an OME-Zarr of a 3D map (volumes; a map published only when complete
    may also be a ``.tif`` or ``.npy`` file), never over the input, not over an existing store
    unless asked: refused here, before a worker starts."""
    from napari_gradcam.io import check_output_path, output_kind

    if output_kind(request.output) != "zarr" and request.keep_partial:
        raise ValueError(f"the map is written as OME-Zarr: name the output *.zarr, not "
                         f"{Path(request.output).name!r}")
    stored = [a for a in range(source.ndim) if not plan.collapsed(a)]
    if len(stored) != 3:
        raise ValueError(f"on-disk output is for volumes (a 3D map); this run makes a "
                         f"{len(stored)}D map of {source.name!r}: leave the output empty")
    from napari_gradcam.io import uncertainty_path

    for store in output_stores(request.output, request.target.kind, class_names):
        for path in [store, uncertainty_path(store)] if request.uncertainty else [store]:
            check_output_path(path, request.overwrite,
                              inputs=[source.path] if source.path else [])


def check_mode_fits_model(card: Any, mode: str, *, slices: str = "'slices' mode",
                          windows: str = "'windows' mode", whole: str = "the whole volume, or "
                          "'current' for one window around the current position",
                          rows: bool = True) -> None:
    """The one check that a mode fits the model's dimensions: slices need a 2D model (or a 1D
    one, explained row by row, when ``rows``), windows a 3D model. ``slices``/``windows``:
    how the calling shell names the modes (the command line says ``--mode volume``);
    ``whole``: what a 3D model's user should pick instead of slices."""
    d = int(card.spatial_dims)
    if mode == "slices" and not (d == 2 or (rows and d == 1)):
        raise ValueError(f"the model {card.name!r} is {d}D; {slices} (slice-wise explanation) "
                         f"needs a 2D model: use {windows} for {whole}")
    if mode == "windows" and d != 3:
        raise ValueError(f"the model {card.name!r} is {d}D; {windows} needs a 3D model: use "
                         f"{slices} for a {d}D model")


def _plan_axes(card: Any, source: ImageSource, request: ExplainRequest) -> Plan:
    d, index = int(card.spatial_dims), source.index()
    check_mode_fits_model(card, request.mode)
    if d == 3:
        return _plan_3d(card, source, request, index)
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
    check_uncertainty(request.uncertainty, request.mode == "windows", request.n_dropout)


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
    window = model_window(card, request, tuple(source.shape[a] for a in spatial))
    if request.mode == "windows":  # window and overlap checked by model_window above
        return Plan(spatial, None, fixed, {}, "windows", window=window)
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


def model_window(card: Any, request: ExplainRequest, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The window a 3D model is run on: the request's, else the card's input size, else the
    whole volume; checked once (:func:`~napari_gradcam.core.run.tiles.check_window`)."""
    overlap = request.overlap if request.mode == "windows" else 0.0  # used by windows only
    return check_window(request.window or card.input_size or shape, overlap)


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
