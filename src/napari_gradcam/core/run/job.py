"""The job every shell drains: explain an image layer's data, slice by slice or window by window.

Every shell runs the same job. :func:`explain_job` yields a :class:`Progress` (``done, total``
and the stage) after each batch and returns an :class:`ExplainResult` that carries the maps,
the model's predictions and the provenance record; the napari widget runs it in a thread
worker (which can stop at any ``yield``), the command line and the tests drain it with
:func:`run_job`.

No Qt and no napari here. What a napari layer contributes is captured, when a run starts, in an
:class:`ImageSource` (the data array, whether it is RGB, the current position), so switching
layers during a run cannot change what is explained. The job never copies the whole array:
each batch reads one slab (``np.asarray`` of a slice of a dask or zarr array), so a volume larger
than memory is explained slab by slab. The map is held in memory, or, with
``ExplainRequest.output``, written to an OME-Zarr as it is made (then nothing volume-sized is
held: memory is bounded by the batch or window).

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
    (:func:`~napari_gradcam.core.run.tiles.windows_loop`).

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

import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from napari_gradcam.core.domain import DomainReport, check_domain
from napari_gradcam.core.engine import preserved_model_state
from napari_gradcam.core.normalise import robust_limits
from napari_gradcam.core.run.output import job_output
from napari_gradcam.core.run.plan import Plan, model_window, plan_explanation
from napari_gradcam.core.run.request import (
    ExplainRequest,
    ImageSource,
    build_explainer,
    run_provenance,
    uncertainty_record,
)
from napari_gradcam.core.run.tiles import (
    Batch,
    BatchMaps,
    BlockView,
    check_finite,
    read_slab,
    slices_loop,
    to_model_input,
    windows_loop,
)
from napari_gradcam.core.targets import (
    AllClasses,
    ClassTarget,
    PredictedClass,
    SegmentationRegion,
)
from napari_gradcam.core.volume import Cancelled, run_job
from napari_gradcam.io import OutputError


class Progress(tuple):
    """One progress report of a job: ``done`` of ``total`` items (batches of slices, windows),
    and the ``stage`` they belong to (``"slices"``, ``"windows"``, ``"current"``).

    It unpacks as the pair ``done, total = item`` (what every consumer of a job did before
    stages existed: the widget's progress bar, :func:`~napari_gradcam.core.volume.run_job`'s
    ``progress(done, total)``), and carries the stage as ``item.stage``, so adding the stage
    broke no consumer. Out-of-memory back-off happens inside the tiles (the batch is halved
    and retried) and shows only as a slower count; :class:`Cancelled` is raised by the drainer.
    """

    stage: str

    def __new__(cls, done: int, total: int, stage: str = "") -> Progress:
        item = super().__new__(cls, (int(done), int(total)))
        item.stage = stage
        return item

    @property
    def done(self) -> int:
        return self[0]

    @property
    def total(self) -> int:
        return self[1]

    def __repr__(self) -> str:
        return f"Progress(done={self[0]}, total={self[1]}, stage={self.stage!r})"


Job = Generator[Progress, None, "ExplainResult"]


def _staged(inner: Generator, stage: str) -> Generator:
    """Relabel a loop's ``(done, total)`` items as :class:`Progress` of ``stage``."""
    try:
        while True:
            done, total = next(inner)
            yield Progress(done, total, stage)
    except StopIteration as finished:
        return finished.value


class JobError(Exception):
    """A job failed; the message says why in words a user can act on.

    Deliberately *not* a RuntimeError: Qt thread workers treat RuntimeErrors as "the worker was
    deleted" and swallow them, so a failing model would otherwise fail silently.
    """


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


# --------------------------------------------------------------------------------------------
# Reading batches


# --------------------------------------------------------------------------------------------
# The job


def explain_job(loaded: Any, source: ImageSource, request: ExplainRequest, *,
                notify: Callable[[str], None] | None = None) -> Job:
    """Explain ``source`` with ``loaded`` (a :class:`~napari_gradcam.core.models.LoadedModel`).

    Yields a :class:`Progress` (``done, total`` and its ``stage``) between batches and returns
    an :class:`ExplainResult`; with ``request.output`` the maps are written to disk as they are
    made (:mod:`napari_gradcam.core.run.output`) and the result's maps read them lazily. Any
    failure is raised as :class:`JobError` (out of memory, NaN in the data, a model that
    fails on the input), with the original exception chained; an output that cannot be
    written stays an :class:`~napari_gradcam.io.OutputError` (it names the file).
    ``notify(message)`` hears what a user should know while the run goes on: the domain
    check's finding when the input looks unlike the training data (or cannot be checked),
    out-of-memory retries with a smaller batch, leftovers of killed runs cleaned up.
    """
    plan = plan_explanation(loaded, source, request)
    try:
        return (yield from _explain(loaded, source, request, plan, notify))
    except (GeneratorExit, Cancelled, JobError, OutputError):
        raise
    except MemoryError as error:
        raise JobError(f"out of memory while explaining {source.name!r}: {error}. Use a "
                       "smaller batch size or window, or 'current' mode") from error
    except (ValueError, TypeError) as error:
        raise JobError(str(error)) from error
    except Exception as error:
        raise JobError(f"the model failed while explaining {source.name!r} "
                       f"({type(error).__name__}: {error})") from error


def _explain(loaded: Any, source: ImageSource, request: ExplainRequest, plan: Plan,
             notify: Callable[[str], None] | None) -> Job:
    started = time.perf_counter()
    card = loaded.card
    layer = request.layer or card.target_layer
    explainer = build_explainer(loaded, request.method, layer, device=request.device,
                                uncertainty=request.uncertainty, n_dropout=request.n_dropout,
                                model_options=request.model_options)
    domain = domain_report(loaded, source, plan) if request.domain_check else None
    if notify is not None and domain is not None and (domain["out_of_domain"]
                                                      or not domain["checked"]):
        notify(f"domain check: {domain['message']}")
    class_names = tuple(card.class_names)
    if request.target.kind == "all":
        labels = list(class_names)
    else:
        labels = [request.target.label(class_names)]
    origin = plan.origin(source.shape)
    # what the uncertainty map holds is known now (a TIFF keeps only the record it is made
    # with); whether each source applied is added when the run is done
    planned_uncertainty = (uncertainty_record(request.uncertainty, request.n_dropout)
                           if request.uncertainty else None)
    # the loops write into this output, on disk or in memory; one ``finish`` completes it
    output = job_output(request, source, plan, labels,
                        card.task == "segmentation" and plan.mode != "windows",
                        _provenance(loaded, source, request, plan, labels, layer,
                                    planned_uncertainty, domain),
                        notify)
    try:
        if plan.mode == "windows":
            result = yield from _staged(_windows(loaded, explainer, source, request, plan,
                                                 output.maps, labels, output.spreads, notify),
                                        "windows")
            predictions, positions, indices, class_map, window = result
        else:
            result = yield from _staged(_samples(loaded, explainer, source, request, plan,
                                                 output.maps, labels, output.spreads,
                                                 output.class_map, notify), plan.mode)
            predictions, positions, indices, class_map = result
            window = None
        uncertainty_info = None
        if planned_uncertainty is not None:
            uncertainty_info = dict(planned_uncertainty)  # the record given at the start stays
            last = getattr(explainer, "last_info", None)
            if last is not None:  # e.g. dropout not applicable: the model has no dropout layers
                uncertainty_info["applicable"] = {
                    name: {"applicable": info.applicable, "reason": info.reason}
                    for name, info in last.sources.items()}
        provenance = _provenance(loaded, source, request, plan, labels, layer,
                                 uncertainty_info, domain)
        regression = request.target.kind == "regression"
        maps, spreads, class_map, limits = output.finish(
            provenance, predictions, positions, regression=regression,
            seconds=time.perf_counter() - started)
    except BaseException:
        output.abort()  # a store that only appears when complete is removed
        raise
    return ExplainResult(
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
        messages=[],
        uncertainty=spreads,
        uncertainty_info=uncertainty_info,
        domain=domain,
        regression=regression,
    )


def _provenance(loaded: Any, source: ImageSource, request: ExplainRequest, plan: Plan,
                labels: list[str], layer: str, uncertainty_info: dict[str, Any] | None,
                domain: dict[str, Any] | None) -> dict[str, Any]:
    """The job's provenance record (the one builder, :func:`run_provenance`, with the
    job's options: where the map sits on its source, which axes, which window), and what the
    calling shell adds (``request.provenance``)."""
    card = loaded.card
    class_names = tuple(card.class_names)
    shape = source.shape
    origin = plan.origin(shape)
    window = plan.window if plan.mode == "windows" else None
    target_text = labels[0] if len(labels) == 1 else "all classes"
    provenance = run_provenance(
        loaded,
        method=request.method,
        layer=layer,
        target=target_text,
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
            "window": list(window) if window is not None else None,
            "overlap": request.overlap if plan.mode == "windows" else None,
            "batch_size": request.batch_size,
            "device": request.device,
            "rgb": source.rgb,
            "uncertainty": uncertainty_info,
        },
    )
    if domain is not None:  # top level, as every map file has it (absent: not checked)
        provenance["domain_check"] = domain
    if request.output is not None:
        provenance["options"]["map_store"] = str(request.output)  # "output" is a model head
    for key, value in dict(request.provenance).items():
        if key == "options":
            provenance["options"].update(value)
        else:
            provenance[key] = value
    return provenance


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


def domain_report(loaded: Any, source: ImageSource, plan: Plan) -> dict[str, Any] | None:
    """The out-of-domain report of what this run explains, as plain data: the one wrapper of
    :func:`~napari_gradcam.core.domain.check_domain` (the widget's job, the command line and
    the dask runner's driver all call it, so they record the same report).

    Reads a seeded sample of the planes or the plan's windows (bounded memory, see
    :mod:`napari_gradcam.core.domain`), as the model sees them; nothing is read when the card
    has no training statistics. RGB and multi-channel input are not checked (None): the
    statistics are of grey data. The voxel size is the source's, when it is known (a file
    without a length unit has none: its pixels are not compared with micrometres). A check
    that fails (odd data) says so in the report instead of stopping the run.
    """
    if source.rgb or plan.channel_axis is not None:
        return None
    voxel = None
    if source.voxel_size is not None:
        voxel = [float(source.voxel_size[a]) for a in plan.spatial_axes]
    try:
        if plan.mode == "windows":
            report = check_domain(BlockView(source, plan), loaded, voxel_size=voxel,
                                  input_size=plan.window)
        else:
            report = check_domain(_SampleView(source, plan), loaded, voxel_size=voxel)
    except (ValueError, TypeError) as error:
        report = DomainReport(checked=False, reason=f"the domain check failed: {error}")
    return report.to_dict()


contrast_limits = robust_limits
"""A map's display range when it is made: 0 to the 99.9th percentile (one definition, in
:func:`napari_gradcam.core.normalise.robust_limits`)."""


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


def _samples(loaded, explainer, source, request, plan, maps, labels, spreads, class_map,
             notify=None) -> Generator:
    """Current plane/window, every slice, or every row: batches along the sample axis, through
    the one slice loop (:func:`~napari_gradcam.core.run.tiles.slices_loop`)."""
    card = loaded.card
    count = 1 if plan.sample_axis is None else source.shape[plan.sample_axis]
    device = getattr(explainer, "device", torch.device("cpu"))
    where = "the image" if plan.sample_axis is None else "slices"

    def read(start: int, stop: int) -> Batch:
        raw = read_slab(source, plan, start, stop)
        slab = to_model_input(raw, source, card.in_channels)
        check_finite(slab, where if plan.sample_axis is None
                     else f"{where} {start}..{stop - 1} along axis {plan.sample_axis}", raw)
        tensor = loaded.preprocess(slab)
        target, mask = _batch_target(loaded, source, request, plan, tensor, start, stop, device)
        # no region pixel in these slices: nothing to explain, only predict
        return Batch(tensor, target, explain=mask is None or bool(mask.any()))

    def write(batch: BatchMaps) -> None:
        start, stop, batch_maps = batch.start, batch.stop, batch.maps
        std = batch.spread
        if std is None and spreads:
            std = np.zeros_like(batch_maps)
        if request.target.kind == "all" and batch_maps.ndim == card.spatial_dims + 2:
            for k, label in enumerate(labels):
                _write(plan, maps[label], start, stop, batch_maps[:, k])
                if spreads:
                    _write(plan, spreads[label], start, stop, std[:, k])
        else:
            for label in labels if request.target.kind == "all" else labels[:1]:
                _write(plan, maps[label], start, stop, batch_maps)
                if spreads:
                    _write(plan, spreads[label], start, stop, std)
        outputs = batch.outputs
        if class_map is not None and outputs.ndim == 2 + card.spatial_dims:
            _write(plan, class_map, start, stop, outputs.argmax(1).astype(np.int16))

    outcome = yield from slices_loop(
        explainer, count, request.batch_size, read, write, spatial_dims=card.spatial_dims,
        per_class=request.target.kind == "all",
        method=getattr(explainer, "name", request.method), notify=notify)
    sample_positions = [tuple(_position(plan, source, i)) for i in range(count)]
    return outcome.predictions, sample_positions, outcome.target_indices, class_map


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
    card = loaded.card
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


def _windows(loaded, explainer, source, request, plan, maps, labels, spreads,
             notify=None) -> Generator:
    """Windows mode through the one window loop. "All classes" is one forward pass per batch
    of windows (one backward per class from it), each class blended into its own map."""
    card = loaded.card
    view = BlockView(source, plan)
    window = model_window(card, request, view.shape)
    if request.target.kind == "all":
        target: Any = AllClasses()
    elif request.target.kind in ("class", "region"):  # a region here has no mask: the class
        target = int(request.target.class_index)
    elif request.target.kind == "regression":
        target = request.target.engine_target()
    else:
        target = None

    def checked(batch: np.ndarray) -> torch.Tensor:
        check_finite(batch, "a window of the volume")
        return loaded.preprocess(batch)

    outs = [maps[label].reshape(view.shape) for label in labels]
    spread_outs = [spreads[label].reshape(view.shape) for label in labels] if spreads else None
    outcome = yield from windows_loop(
        explainer, view, outs, window=window, overlap=request.overlap,
        batch_size=request.batch_size, target=target, preprocess=checked,
        uncertainty_outs=spread_outs, notify=notify)
    offset = [plan.fixed[a] for a in range(source.ndim - 3)]
    positions = [tuple(offset + list(corner)) for corner in outcome.positions]
    return outcome.predictions, positions, None, None, outcome.window


def explain(loaded: Any, source: ImageSource, request: ExplainRequest | None = None,
            **progress: Any) -> ExplainResult:
    """:func:`explain_job`, drained (scripts, command line, tests)."""
    return run_job(explain_job(loaded, source, request or ExplainRequest()), **progress)
