"""Explaining volume files, in one process or chunk by chunk on dask workers.

Two entry points share every decision (model, layer, target, mode, window, output layout,
provenance), so a run on a cluster writes the same map store as a run on a laptop:

* :func:`explain_file`: one process; the options become the job's
  :class:`~napari_gradcam.core.run.request.ExplainRequest` and the run drains the widget's own
  job (:func:`~napari_gradcam.core.run.job.explain_job`), which streams slabs from the input
  and writes the maps straight into its on-disk OME-Zarr (with a pyramid), published when
  complete: the command line and the widget run one code path and write the same store.
* :func:`run_distributed`: the volume is cut into chunks along one axis; each dask task explains
  one chunk and writes its own region of the output zarr's level 0 (the job's
  :class:`~napari_gradcam.core.run.output.DiskMap`; the driver fills its pyramid a chunk at a
  time and marks it complete). Output chunks are aligned with the task chunks, so two tasks
  never write the same zarr chunk (no locks, and a retried task just rewrites its region).

Results are **identical** to the single-process engine, not just close:

* *slices*: a chunk is a whole number of engine batches (``chunk`` is a multiple of
  ``batch_size`` and chunks start at multiples of it), so every slice is explained in exactly
  the same batch as in one process.
* *windows*: a chunk ``[z0, z1)`` gathers every window of the global grid (the engine's
  :func:`~napari_gradcam.core.volume.window_starts` over the volume extended by its mirrored
  margins, :func:`~napari_gradcam.core.volume.edge_pads`) that touches it, in the engine's
  order and batches, adds their Gaussian-weighted maps restricted to the chunk and divides by
  the summed weights, so each voxel sees the same terms in the same order as in
  one process (the one window loop, :func:`~napari_gradcam.core.run.tiles.windows_loop`).
  Windows that straddle a chunk border are computed by
  both chunks (the "halo"); larger chunks waste less.

Memory per worker is bounded by the chunk, not the volume: a *slices* task holds its input slab
and its map slab (``chunk × Y × X`` each, float32) plus one batch of activations; a *windows*
task holds one window-deep input slab, two float32 accumulators ``chunk × Y × X`` and one batch
of windows' activations. Each worker process loads the model once and keeps it (a per-process
cache keyed by the model source), so only the first task on a worker pays for loading.

A worker that dies mid-run is survived: the scheduler re-runs its tasks elsewhere (or on the
restarted worker), and since each task overwrites exactly its own region the result is
unchanged.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from napari_gradcam.core.methods import canonical_name
from napari_gradcam.core.run.output import prediction_attrs
from napari_gradcam.core.run.plan import Plan, check_mode_fits_model
from napari_gradcam.core.targets import RegressionTarget, Target
from napari_gradcam.core.uncertainty import SOURCES as UNCERTAINTY_SOURCES
from napari_gradcam.core.uncertainty import dropout_modules
from napari_gradcam.io import ATTRS_KEY, default_chunks, read_volume

ProgressCallback = Callable[[int, int], None]

#: Modes as the command line spells them, mapped to the engine's names.
MODE_ALIASES = {"slices": "slices", "volume": "windows", "windows": "windows"}
DEFAULT_WINDOW = (64, 64, 64)


@dataclass(frozen=True)
class ExplainOptions:
    """How to explain a volume file; the command line's flags, as one value.

    ``mode`` ``None`` follows the model (2D model: slices, 3D model: windows); ``layer``
    ``None`` uses the card's layer; ``target`` is ``None``/``"predicted"``, a class index or a
    class name; ``window`` ``None`` uses the card's ``input_size`` (3D models) or 64³;
    ``chunk`` is the depth of one task and of the output's zarr chunks (``None``: a sensible
    default); ``torch_threads`` limits torch's threads per process (``None``: torch's default).

    Model options, passed to the method unchanged (see
    :class:`~napari_gradcam.core.methods.BaseCAM`): ``output`` picks the tensor of a model that
    returns a tuple or dict (an index or a key); ``patch_grid`` and ``class_token`` say how a
    transformer layer's tokens lie on the input (``None``: derived from the model). A
    regression head is explained by giving a
    :class:`~napari_gradcam.core.targets.RegressionTarget` as ``target``.

    ``uncertainty`` names the sources of a second output, the per-voxel standard deviation of
    the map (:mod:`napari_gradcam.core.uncertainty`): ``flips``, ``shifts``, ``dropout``
    (``n_dropout`` samples) and, in windows mode, ``windows``. ``domain_check`` compares the
    input with the card's training statistics (:func:`napari_gradcam.core.domain.check_domain`)
    before the run and records the report in the provenance.
    """

    method: str = "gradcam"
    layer: str | None = None
    target: str | int | Target | None = None
    mode: str | None = None
    axis: int = 0
    batch_size: int = 8
    window: tuple[int, ...] | None = None
    overlap: float = 0.25
    device: str | None = "auto"
    dtype: str = "float32"
    trust: bool = False
    chunk: int | None = None
    torch_threads: int | None = None
    output: int | str | None = None
    patch_grid: tuple[int, ...] | None = None
    class_token: bool | None = None
    uncertainty: tuple[str, ...] = ()
    n_dropout: int = 8
    domain_check: bool = True


#: What ``ExplainOptions.uncertainty`` accepts: the per-input sources, and windows mode's
#: disagreement between overlapping windows.
UNCERTAINTY_CHOICES = (*UNCERTAINTY_SOURCES, "windows")


@dataclass
class RunSummary:
    """What a run produced: where, what shape and scale, how long, what the model predicted."""

    output: Path
    shape: tuple[int, ...]
    scale: tuple[float, ...]
    unit: str | None
    seconds: float
    mode: str
    axis: int | None
    window: tuple[int, ...] | None
    class_names: tuple[str, ...]
    predictions: np.ndarray
    positions: list[tuple[int, ...]]
    value_range: tuple[float, float]
    provenance: dict[str, Any] = field(default_factory=dict)
    uncertainty_output: Path | None = None

    @property
    def voxels_per_second(self) -> float:
        return math.prod(self.shape) / max(self.seconds, 1e-9)

    def predicted_counts(self) -> dict[str, int]:
        """How many slices (or windows) the model assigned to each class (argmax)."""
        if self.predictions.size == 0:
            return {}
        winners = np.argmax(self.predictions, axis=1)
        counts = np.bincount(winners, minlength=len(self.class_names))
        return {name: int(n) for name, n in zip(self.class_names, counts, strict=False)}

    def describe(self) -> str:
        """A few lines for a terminal: output, geometry, speed, predictions overview."""
        unit = f" {self.unit}" if self.unit else " (pixels)"
        items = "slices" if self.mode == "slices" else "windows"
        how = (f"slices along axis {self.axis}" if self.mode == "slices"
               else f"windows of {'x'.join(map(str, self.window or ()))}")
        prov = self.provenance
        counts = ("n/a for a regression head" if "predictions_note" in prov else
                  ", ".join(f"{name} {n}" for name, n in self.predicted_counts().items() if n))
        lines = [
            f"wrote {self.output}",
            f"  shape {self.shape}, voxel size {tuple(round(s, 6) for s in self.scale)}{unit}",
            f"  {prov.get('method', '?')} on {', '.join(prov.get('layers', []))} of "
            f"{prov.get('model', '?')}, target: {prov.get('target', '?')}, {how}",
            f"  {len(self.positions)} {items} in {self.seconds:.1f} s "
            f"({self.voxels_per_second:,.0f} voxels/s)",
            f"  map values {self.value_range[0]:.4g} .. {self.value_range[1]:.4g}",
            f"  predicted ({items}): {counts or 'n/a'}",
        ]
        if self.uncertainty_output is not None:
            info = prov.get("uncertainty") or prov.get("options", {}).get("uncertainty") or {}
            sources = ", ".join(info.get("sources", []))
            lines.append(f"wrote {self.uncertainty_output} (uncertainty: {sources})")
        domain = prov.get("domain_check")
        if domain:
            flagged = [f["check"] for f in domain.get("findings", []) if f.get("flagged")]
            verdict = ("not checked (" + domain.get("reason", "") + ")"
                       if not domain.get("checked") else
                       f"input unlike the training data ({', '.join(flagged)}); the numbers "
                       "are in the provenance's domain_check" if flagged else
                       "the input resembles the training data")
            lines.append(f"  domain check: {verdict}")
        return "\n".join(lines)


# --------------------------------------------------------------------------- shared planning


def resolve_class_target(target: str | int | Target | None, class_names: Sequence[str]
                         ) -> int | Target | None:
    """``None``/``"predicted"`` → None (argmax per slice); an index or a class name → index;
    a :class:`~napari_gradcam.core.targets.Target` (a regression head's) is kept as it is."""
    if isinstance(target, Target):
        return target
    if target is None or (isinstance(target, str) and target.strip().lower() == "predicted"):
        return None
    count = len(class_names)
    if isinstance(target, str):
        text = target.strip()
        if text in class_names:
            return list(class_names).index(text)
        try:
            target = int(text)
        except ValueError:
            raise ValueError(
                f"target {text!r} is not a class of this model; choose 'predicted', an index "
                f"0..{count - 1} or one of: {', '.join(class_names)}"
            ) from None
    if isinstance(target, bool) or not isinstance(target, (int, np.integer)):
        raise TypeError(f"target must be 'predicted', a class index or a class name, got "
                        f"{type(target).__name__}")
    if not 0 <= int(target) < count:
        raise ValueError(f"target class {target} is out of range: the model has {count} classes "
                         f"({', '.join(class_names)})")
    return int(target)


def describe_target(index: int | Target | None, class_names: Sequence[str]) -> str:
    if isinstance(index, Target):
        return index.describe()
    return "predicted class" if index is None else f"class {index} ({class_names[index]})"


def make_plan(loaded: Any, shape: Sequence[int], options: ExplainOptions) -> Plan:
    """Check the options against the model and the volume; choose chunking and defaults.

    Returns the one :class:`~napari_gradcam.core.run.plan.Plan` (the widget's job uses it
    too): a 3D volume, slices along ``axis`` or windows, with the layer and target resolved
    and the chunking of the tasks and of the output store."""
    card = loaded.card
    shape = tuple(int(s) for s in shape)
    mode = options.mode or ("windows" if card.spatial_dims == 3 else "slices")
    if mode not in MODE_ALIASES:
        raise ValueError(f"mode must be 'slices' or 'volume', got {mode!r}")
    mode = MODE_ALIASES[mode]
    canonical_name(options.method)  # an unknown method is refused before any work
    _check_uncertainty(options, mode)
    if "dropout" in options.uncertainty and not dropout_modules(loaded.model):
        # refused rather than written as a map of zeros that reads "no uncertainty"
        raise ValueError(f"uncertainty source 'dropout': model {card.name!r} has no dropout "
                         "layers (torch.nn.Dropout*; a torch.export program keeps none), so "
                         "Monte-Carlo dropout would vary nothing; leave 'dropout' out")
    # a volume file is explained by planes of a 2D model (no rows of a 1D one), or windows
    check_mode_fits_model(card, mode, slices="--mode slices", windows="--mode volume",
                          whole="a 3D model", rows=False)
    if options.batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {options.batch_size}")
    if not -3 <= options.axis < 3:
        raise ValueError(f"axis must be 0, 1 or 2, got {options.axis}")
    axis = options.axis % 3 if mode == "slices" else 0
    target = resolve_class_target(options.target, card.class_names)
    if target is None and card.task == "segmentation":
        raise ValueError(f"model {card.name!r} segments (one class per pixel), so there is no "
                         "single predicted class per slice: choose the class to explain with "
                         f"--target ({', '.join(card.class_names)})")
    window = None
    if mode == "windows":
        from napari_gradcam.core.run.tiles import check_window

        window = check_window(options.window or card.input_size or DEFAULT_WINDOW,
                              options.overlap)
    length = shape[axis]
    if options.chunk is not None and options.chunk < 1:
        raise ValueError(f"chunk must be at least 1, got {options.chunk}")
    if mode == "slices":
        # Whole engine batches per chunk, so every slice is explained in the same batch as in
        # a single process (bitwise identical maps).
        wanted = options.chunk or max(32, options.batch_size)
        chunk = options.batch_size * max(1, round(wanted / options.batch_size))
    else:
        assert window is not None
        chunk = options.chunk or 2 * min(window[0], length)
    chunk = max(1, min(chunk, length))
    chunks = default_chunks(shape, depth_axis=axis, depth=chunk)
    layer = options.layer or card.target_layer
    if layer not in dict(loaded.model.named_modules()):
        known = ", ".join(info.name for info in loaded.feature_layers[-8:])
        raise ValueError(f"model {card.name!r} has no layer {layer!r}; feature-map layers "
                         f"include: {known} (see: napari-gradcam models {card.name})")
    others = tuple(a for a in range(3) if a != axis)
    return Plan(spatial_axes=others if mode == "slices" else (0, 1, 2),
                sample_axis=axis if mode == "slices" else None, fixed={}, box={}, mode=mode,
                window=window, layer=layer, target=target, chunk=chunk, chunks=chunks)


def _check_uncertainty(options: ExplainOptions, mode: str) -> None:
    from napari_gradcam.core.run.request import check_uncertainty

    check_uncertainty(options.uncertainty, mode == "windows", options.n_dropout,
                      windows_spelling="--mode volume (a 3D model over windows)")


def explainer_options(options: ExplainOptions | None) -> dict[str, Any]:
    """The method's keyword options taken from ``options``: only those set, so a method that
    does not take one (Guided Backpropagation has no token layout) is only refused when the
    user asked for it."""
    if options is None:
        return {}
    given = {"output": options.output, "patch_grid": options.patch_grid,
             "class_token": options.class_token}
    return {key: value for key, value in given.items() if value is not None}


def make_explainer_for(loaded: Any, plan: Plan, method: str,
                       options: ExplainOptions | None = None) -> Any:
    """The command line's options given to the one explainer builder
    (:func:`napari_gradcam.core.run.request.build_explainer`, the widget's job uses it too)."""
    from napari_gradcam.core.run.request import build_explainer

    options = options or ExplainOptions()
    return build_explainer(loaded, method, plan.layer, uncertainty=options.uncertainty,
                           n_dropout=options.n_dropout, model_options=explainer_options(options))


def uncertainty_sources(options: ExplainOptions, plan: Plan) -> list[str]:
    """The sources pooled in the uncertainty output: the ones asked for, plus ``windows`` in
    windows mode, where the engine always pools the overlapping windows' disagreement."""
    sources = list(dict.fromkeys(options.uncertainty))
    if plan.mode == "windows" and "windows" not in sources:
        sources.append("windows")
    return sources


def add_uncertainty_record(record: dict[str, Any], options: ExplainOptions, plan: Plan
                           ) -> dict[str, Any]:
    """Name in the map's record what its uncertainty map holds (the one record,
    :func:`~napari_gradcam.core.run.request.uncertainty_record`), as one process's map does,
    and return the uncertainty output's provenance: the map's, plus that record."""
    from napari_gradcam.core.run.request import uncertainty_record

    spread = uncertainty_record(uncertainty_sources(options, plan), options.n_dropout)
    record.setdefault("options", {})["uncertainty"] = spread
    return {**record, "kind": "uncertainty", "uncertainty": spread}


def file_run_options(plan: Plan, options: ExplainOptions, scale: Sequence[float],
                     unit: str | None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The options a volume file's map records (one process and dask workers alike)."""
    run_options: dict[str, Any] = {
        "batch_size": options.batch_size, "dtype": options.dtype, "device": options.device,
        "chunk": plan.chunk, "voxel_size": list(scale), "unit": unit,
    }
    run_options.update(explainer_options(options))
    if plan.mode == "slices":
        run_options["axis"] = plan.axis
    else:
        run_options.update(window=list(plan.window or ()), overlap=options.overlap,
                           blend="gaussian")
    run_options.update(extra or {})
    return run_options


def build_provenance(loaded: Any, plan: Plan, options: ExplainOptions, input_path: Path,
                     scale: Sequence[float], unit: str | None,
                     extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The dask runner's record (the one builder,
    :func:`~napari_gradcam.core.run.request.run_provenance`, with the file's options)."""
    from napari_gradcam.core.run.request import run_provenance

    return run_provenance(loaded, method=canonical_name(options.method), layer=plan.layer,
                          target=describe_target(plan.target, loaded.card.class_names),
                          mode=plan.mode, source=str(input_path),
                          options=file_run_options(plan, options, scale, unit, extra))


def _record_domain_check(record: dict[str, Any], volume: Any, loaded: Any, plan: Plan,
                         scale: Sequence[float] | None, options: ExplainOptions,
                         notify: Callable[[str], None] | None) -> None:
    """The driver's domain check (the job's own, :func:`~napari_gradcam.core.run.job.
    domain_report`, on the plan's slices or windows): kept in the provenance, and said when
    the input is out of domain or cannot be checked."""
    from napari_gradcam.core.run.job import domain_report
    from napari_gradcam.core.run.request import ImageSource

    if not options.domain_check:
        return
    report = domain_report(loaded, ImageSource("volume", volume, voxel_size=scale), plan)
    if report is None:
        return
    record["domain_check"] = report
    if notify is not None and (report["out_of_domain"] or not report["checked"]):
        notify(f"domain check: {report['message']}")


def _prediction_attrs(predictions: np.ndarray, positions: list[tuple[int, ...]],
                      class_names: Sequence[str], value_range: tuple[float, float],
                      seconds: float, target: int | Target | None = None) -> dict[str, Any]:
    """The run's summary in the record: the predictions (the one record,
    :func:`~napari_gradcam.core.run.output.prediction_attrs`), the value range and time."""
    attrs = prediction_attrs(predictions, positions, class_names,
                             isinstance(target, RegressionTarget))
    attrs.update(value_range=[float(value_range[0]), float(value_range[1])],
                 seconds=round(seconds, 3))
    return attrs


def _without_predictions(attrs: dict[str, Any]) -> dict[str, Any]:
    """The run's summary for the uncertainty output: the per-item probabilities stay with the
    map (no need to store them twice)."""
    return {key: value for key, value in attrs.items() if key != "predictions"}


def _finish_store(store: Any, summary_attrs: dict[str, Any]) -> None:
    """Complete a map store (its pyramid, ``complete``) with the run's summary, and give
    napari its display window."""
    from napari_gradcam.io import set_display_window

    store.finish(summary_attrs)
    low, high = summary_attrs["value_range"]
    set_display_window(store.path, low, high)


def _as_input_path(input_path: str | os.PathLike) -> Path:
    if not isinstance(input_path, (str, os.PathLike)):
        raise TypeError(
            "give the input as a file path (TIFF, zarr or .npy): it is read slab by slab, and "
            "on a cluster every worker opens it itself; save an in-memory array first with "
            "napari_gradcam.io.write_volume"
        )
    return Path(input_path).expanduser().resolve()


def _model_source(source: Any) -> Any:
    """A path-like source made absolute, so workers with another working folder find it."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source).expanduser()
        if path.exists():
            return str(path.resolve())
        return str(source)
    return source


# --------------------------------------------------------------------------- one process


def explain_file(
    input_path: str | os.PathLike,
    model_source: Any,
    out_path: str | os.PathLike,
    *,
    options: ExplainOptions | None = None,
    overwrite: bool = False,
    progress: ProgressCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
    notify: Callable[[str], None] | None = None,
) -> RunSummary:
    """Explain a volume file into an output file (``.zarr`` recommended) in this process.

    The command line's options become an :class:`~napari_gradcam.core.run.request.
    ExplainRequest` and the run drains the widget's job
    (:func:`~napari_gradcam.core.run.job.explain_job`): the same plan, loops, on-disk output
    (an OME-Zarr with its pyramid, :class:`~napari_gradcam.core.run.output.DiskOutput`; or a
    ``.tif``/``.npy`` file, memory-mapped), provenance and domain check, so the widget and the
    command line give the same file.
    ``progress(done, total)`` hears the job's :class:`~napari_gradcam.core.run.job.Progress`.

    ``model_source`` is anything :func:`napari_gradcam.core.models.load_model` takes (a demo
    name, a card path, a live module). The output appears only when the run has finished
    (it is written under a temporary name, removed if the run fails);
    :class:`napari_gradcam.Cancelled` is raised when ``should_stop()`` turns true. The output
    is never the input (refused even with ``overwrite``); ``notify(message)`` hears about the
    engine's retries and about leftovers of killed runs that were cleaned up, and the domain
    check's message when the input looks unlike the training data or cannot be checked.

    With ``options.uncertainty`` a second output, :func:`~napari_gradcam.io.uncertainty_path`
    of ``out_path`` (``maps.zarr`` → ``maps_uncertainty.zarr``), receives the standard
    deviation map under the same rules (never over the input, ``overwrite``, appears only
    when the run has finished).
    """
    from napari_gradcam.core.run.job import explain_job
    from napari_gradcam.core.volume import run_job
    from napari_gradcam.io import check_output_path, read_attrs, uncertainty_path

    options = options or ExplainOptions()
    input_path = _as_input_path(input_path)
    out_path = Path(out_path).expanduser()  # "~/maps.zarr" as a shell would have expanded it
    check_output_path(out_path, overwrite, inputs=[input_path])
    extra_path = uncertainty_path(out_path) if options.uncertainty else None
    if extra_path is not None:
        check_output_path(extra_path, overwrite, inputs=[input_path])
    volume, voxel = read_volume(input_path)
    loaded = get_model(_model_source(model_source), options.device, options.trust,
                       options.torch_threads)
    plan = make_plan(loaded, volume.shape, options)
    source = file_source(input_path, volume, voxel)
    request = file_request(loaded, plan, options, voxel.scale, voxel.unit,
                           {"scheduler": "single process"})
    request = replace(request, output=out_path, overwrite=overwrite)
    started = time.perf_counter()
    with _model_lock(loaded):
        result = run_job(explain_job(loaded, source, request, notify=notify), progress,
                         should_stop)
    record = read_attrs(out_path)
    # a TIFF keeps the record it was created with (its header comes first): its value range
    # is the job's, the limits a file map reports
    value_range = record.get("value_range") or result.contrast_limits[next(iter(result.maps))]
    seconds = time.perf_counter() - started
    positions = [(p[plan.axis],) if plan.mode == "slices" else tuple(p)
                 for p in result.positions]
    return RunSummary(out_path, tuple(volume.shape), voxel.scale, voxel.unit, seconds,
                      plan.mode,
                      plan.axis if plan.mode == "slices" else None, plan.window,
                      tuple(loaded.card.class_names), result.predictions, positions,
                      tuple(value_range), record,
                      None if extra_path is None else Path(extra_path).expanduser())


def file_source(input_path: Path, volume: Any, voxel: Any) -> Any:
    """A volume file as the job's :class:`~napari_gradcam.core.run.request.ImageSource`: its
    voxel size when the file gives a length unit (else its scale stays in pixels, never
    compared with micrometres), and its origin (a crop's map lands on the crop)."""
    from napari_gradcam.core.run.request import ImageSource
    from napari_gradcam.placement import input_origin

    return ImageSource(str(input_path), volume, path=str(input_path),
                       voxel_size=tuple(voxel.scale) if voxel.unit else None,
                       scale=tuple(voxel.scale), translate=input_origin(input_path, 3))


def file_request(loaded: Any, plan: Plan, options: ExplainOptions, scale: Sequence[float],
                 unit: str | None, extra: dict[str, Any] | None = None) -> Any:
    """The command line's options, checked and resolved by :func:`make_plan`, as the job's
    :class:`~napari_gradcam.core.run.request.ExplainRequest`: the map is published only when
    complete, and the record carries the file's options and the command line's wording of
    the target (as the dask runner's record)."""
    from napari_gradcam.core.run.request import ExplainRequest, TargetChoice

    target = plan.target
    if isinstance(target, RegressionTarget):
        choice = TargetChoice("regression", output_index=target.output_index, sign=target.sign)
    elif isinstance(target, Target):
        raise TypeError(f"a volume file is explained for a class or a regression head, not "
                        f"{type(target).__name__}")
    elif target is None:
        choice = TargetChoice("predicted")
    else:
        choice = TargetChoice("class", class_index=int(target))
    return ExplainRequest(
        method=canonical_name(options.method), layer=plan.layer, target=choice,
        mode=plan.mode, axis=plan.axis if plan.mode == "slices" else None, window=plan.window,
        overlap=options.overlap, batch_size=options.batch_size, device=options.device,
        uncertainty=tuple(uncertainty_sources(options, plan)) if options.uncertainty else (),
        n_dropout=options.n_dropout, domain_check=options.domain_check, keep_partial=False,
        dtype=options.dtype, chunks=plan.chunks, model_options=explainer_options(options),
        provenance={"target": describe_target(plan.target, loaded.card.class_names),
                    "options": file_run_options(plan, options, scale, unit, extra)})


# --------------------------------------------------------------------------- per-process cache

_MODELS: dict[tuple[Any, ...], Any] = {}
_LOCKS: dict[int, threading.Lock] = {}
_CACHE_LOCK = threading.Lock()


def get_model(source: Any, device: str | None = "auto", trust: bool = False,
              torch_threads: int | None = None, expected_sha256: str | None = None) -> Any:
    """The :class:`LoadedModel` for ``source``, loaded once per process and then reused.

    Strings and paths are cached by value; a live module by identity. ``expected_sha256`` (the
    weights the driver saw) makes a long-lived worker reload a card whose weights file has
    changed since it was cached, and refuse weights that differ from the driver's. Each cached
    model has a lock (:func:`_model_lock`): the engine's hooks are per model, so two threads of
    one worker must not explain with the same model at the same time.
    """
    from napari_gradcam.core.models import load_model

    if torch_threads:
        import torch

        if torch.get_num_threads() != torch_threads:
            torch.set_num_threads(torch_threads)
    key_source = source if isinstance(source, (str, os.PathLike)) else id(source)
    key = (str(key_source), device, trust)
    with _CACHE_LOCK:
        loaded = _MODELS.get(key)
        if loaded is None or (expected_sha256 and loaded.weights_sha256 != expected_sha256):
            loaded = load_model(source, trust=trust, device=device)
            _MODELS[key] = loaded
            _LOCKS[id(loaded)] = threading.Lock()
    if expected_sha256 and loaded.weights_sha256 != expected_sha256:
        raise ValueError(
            f"the weights of {source} changed during the run (sha256 {loaded.weights_sha256} "
            f"on this worker, {expected_sha256} when the run started); rerun when the file is "
            "stable, or share it read-only"
        )
    return loaded


def _model_lock(loaded: Any) -> threading.Lock:
    with _CACHE_LOCK:
        return _LOCKS.setdefault(id(loaded), threading.Lock())


def clear_model_cache() -> None:
    """Forget the models loaded in this process (tests, or to free memory)."""
    with _CACHE_LOCK:
        _MODELS.clear()
        _LOCKS.clear()


# --------------------------------------------------------------------------- one chunk


@dataclass(frozen=True)
class ChunkTask:
    """One task: explain ``[start, stop)`` along the plan's axis and write it to the output."""

    input_path: str
    model_source: Any
    out_array: str
    options: ExplainOptions
    plan: Plan
    start: int
    stop: int
    weights_sha256: str | None = None
    uncertainty_array: str | None = None


@dataclass
class ChunkResult:
    start: int
    stop: int
    predictions: np.ndarray
    positions: list[tuple[int, ...]]
    low: float
    high: float
    worker_pid: int
    uncertainty_range: tuple[float, float] | None = None


_VOLUMES: dict[tuple[str, int, int], Any] = {}


def _open_input(path: str) -> Any:
    """The input opened lazily, once per process (re-opened if the file was replaced)."""
    stat = os.stat(path)
    key = (path, stat.st_mtime_ns, stat.st_size)
    with _CACHE_LOCK:
        if key not in _VOLUMES:
            for old in [k for k in _VOLUMES if k[0] == path]:
                del _VOLUMES[old]
            _VOLUMES[key] = read_volume(path, lazy=True)[0]
        return _VOLUMES[key]


def explain_chunk(task: ChunkTask) -> ChunkResult:
    """Run one chunk (in a worker process): explain it and write its region of the output."""
    import dask
    import zarr

    volume = _open_input(task.input_path)
    options, plan = task.options, task.plan
    loaded = get_model(task.model_source, options.device, options.trust, options.torch_threads,
                       task.weights_sha256)
    explainer = make_explainer_for(loaded, plan, options.method, options)
    # A dask input (a 5D OME-Zarr) is read in this task's thread, never by scheduling more
    # tasks on the cluster from inside a task.
    with _model_lock(loaded), dask.config.set(scheduler="synchronous"):
        if plan.mode == "slices":
            maps, spread, predictions, positions = _slices_chunk(explainer, loaded, volume,
                                                                 task)
        else:
            maps, spread, predictions, positions = _windows_chunk(explainer, loaded, volume,
                                                                  task)
    region = [slice(None)] * 3
    region[plan.axis] = slice(task.start, task.stop)
    # mode="r+" fails if the run was cancelled and its partial output already removed.
    out = zarr.open_array(task.out_array, mode="r+")
    out[tuple(region)] = maps
    spread_range = None
    if task.uncertainty_array is not None and spread is not None:
        zarr.open_array(task.uncertainty_array, mode="r+")[tuple(region)] = spread
        spread_range = (float(spread.min()), float(spread.max()))
    return ChunkResult(task.start, task.stop, predictions, positions, float(maps.min()),
                       float(maps.max()), os.getpid(), spread_range)


def _slices_chunk(explainer: Any, loaded: Any, volume: Any, task: ChunkTask
                  ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, list[tuple[int, ...]]]:
    from napari_gradcam.core.volume import explain_volume

    plan = task.plan
    index = [slice(None)] * 3
    index[plan.axis] = slice(task.start, task.stop)
    slab = np.asarray(volume[tuple(index)])
    maps = np.zeros(slab.shape, dtype=np.float32)
    # Slices are explained independently (also their flips, shifts and dropout samples, whose
    # random stream restarts with every batch), so a chunk of whole batches gives the same
    # uncertainty as one process.
    spread = (np.zeros(slab.shape, dtype=np.float32) if task.uncertainty_array is not None
              else None)
    result = explain_volume(explainer, slab, mode="slices", axis=plan.axis,
                            batch_size=task.options.batch_size, target=plan.target,
                            preprocess=loaded.preprocess, out=maps, uncertainty_out=spread)
    positions = [(task.start + p[0],) for p in result.positions]
    return maps, spread, result.predictions, positions


def _windows_chunk(explainer: Any, loaded: Any, volume: Any, task: ChunkTask
                   ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, list[tuple[int, ...]]]:
    """The engine's window loop (:func:`~napari_gradcam.core.run.tiles.windows_loop`)
    restricted to planes ``[start, stop)``: the same mirrored margins, global window grid,
    order, batches and weights, so each voxel's sum has the same terms in the same order as in
    one process. Windows that straddle the chunk's border are explained by both chunks; each
    window's prediction is reported by the chunk holding its first real plane. With an
    uncertainty output the sums are float64 and the chunk keeps them float64 until the output's
    dtype rounds them, once, as in one process."""
    from napari_gradcam.core.run.tiles import windows_loop

    plan, options = task.plan, task.options
    shape = (task.stop - task.start, *tuple(volume.shape)[1:])
    with_variance = task.uncertainty_array is not None
    dtype = np.float64 if with_variance else np.float32
    maps = np.zeros(shape, dtype=dtype)
    spread = np.zeros(shape, dtype=dtype) if with_variance else None
    job = windows_loop(explainer, volume, [maps], window=plan.window, overlap=options.overlap,
                       batch_size=options.batch_size, target=plan.target,
                       preprocess=loaded.preprocess,
                       uncertainty_outs=None if spread is None else [spread],
                       planes=(task.start, task.stop))
    outcome = _drain(job)
    return maps, spread, outcome.predictions, outcome.positions


def _drain(job: Any) -> Any:
    """Run a loop to its end (a task has nobody to report progress to) and return its value."""
    try:
        while True:
            next(job)
    except StopIteration as finished:
        return finished.value


def plan_chunks(length: int, chunk: int) -> list[tuple[int, int]]:
    """``[start, stop)`` pairs of ``chunk`` planes covering ``length`` (the last may be short)."""
    return [(start, min(start + chunk, length)) for start in range(0, length, chunk)]


# --------------------------------------------------------------------------- the driver


def run_distributed(
    input_path: str | os.PathLike,
    model_source: Any,
    out_path: str | os.PathLike,
    *,
    options: ExplainOptions | None = None,
    overwrite: bool = False,
    client: Any = None,
    workers: int | None = None,
    scheduler_address: str | None = None,
    progress: ProgressCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
    notify: Callable[[str], None] | None = None,
) -> RunSummary:
    """Explain a volume file chunk by chunk on dask workers; write an OME-Zarr output.

    Give one of ``client`` (an existing ``distributed.Client``), ``scheduler_address`` (e.g.
    ``"tcp://head-node:8786"``) or ``workers`` (start a local cluster of that many worker
    processes with one thread each, closed again at the end). ``progress(done, total)`` counts
    finished chunks; ``notify(message)`` hears what was found and removed of earlier runs that
    were killed. The result equals :func:`explain_file`'s (see the module docstring), the
    uncertainty output and the domain check included.
    """
    options = options or ExplainOptions()
    input_path = _as_input_path(input_path)
    from napari_gradcam.io import check_output_path, output_kind, uncertainty_path

    check_output_path(out_path, overwrite, inputs=[input_path])
    extra_path = uncertainty_path(out_path) if options.uncertainty else None
    if extra_path is not None:
        check_output_path(extra_path, overwrite, inputs=[input_path])
    if output_kind(out_path) != "zarr":
        raise ValueError("distributed runs write OME-Zarr (workers write their chunks in "
                         f"parallel); name the output *.zarr, not {Path(out_path).name!r}")
    if sum(x is not None for x in (client, workers, scheduler_address)) > 1:
        raise ValueError("give only one of client, workers and scheduler_address")
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    volume, voxel = read_volume(input_path, lazy=True)
    shape = tuple(volume.shape)
    source = _model_source(model_source)
    # The driver loads the model once too: to check the options before any worker starts, and
    # for the provenance (weights hash, default layer, class names).
    loaded = get_model(source, options.device, options.trust, options.torch_threads)
    plan = make_plan(loaded, shape, options)
    explainer_check = make_explainer_for(loaded, plan, options.method, options)
    del explainer_check  # built once here so a bad model option fails before any worker
    if workers is not None and options.torch_threads is None:
        options = replace(options, torch_threads=max(1, (os.cpu_count() or 1) // workers))
    where = (f"scheduler {scheduler_address}" if scheduler_address else
             f"local cluster of {workers} processes" if workers else "dask client")
    record = build_provenance(loaded, plan, options, input_path, voxel.scale, voxel.unit,
                              {"scheduler": where})
    _record_domain_check(record, volume, loaded, plan,
                         voxel.scale if voxel.unit else None, options, notify)
    spread_record = (add_uncertainty_record(record, options, plan) if options.uncertainty
                     else None)
    del volume
    started = time.perf_counter()
    with contextlib.ExitStack() as outputs:
        def open_store(path: str | os.PathLike, attrs: dict[str, Any]) -> Any:
            """The job's on-disk map (OME-Zarr with its pyramid) under a temporary name, its
            level 0 chunked like the tasks: workers write level 0, the driver the rest."""
            from napari_gradcam.core.run.output import DiskMap
            from napari_gradcam.io import atomic_path
            from napari_gradcam.placement import input_origin

            partial = outputs.enter_context(atomic_path(path, overwrite=overwrite,
                                                        inputs=[input_path], notify=notify))
            return DiskMap(partial, shape, shape, (0, 1, 2), plan.axis, scale=voxel.scale,
                           unit=voxel.unit, translation=input_origin(input_path, 3),
                           attrs=attrs, chunks=plan.chunks, dtype=options.dtype)

        output = open_store(out_path, record)
        extra = (None if extra_path is None else
                 open_store(extra_path, spread_record))
        array_path = str(output.path / "0")
        extra_array = None if extra is None else str(extra.path / "0")
        tasks = [ChunkTask(str(input_path), source, array_path, options, plan, start, stop,
                           loaded.weights_sha256, extra_array)
                 for start, stop in plan_chunks(shape[plan.axis], plan.chunk)]
        # The cluster is closed (its workers stopped) before open_output removes a partial
        # output after an error, so no straggling task can write into a removed folder.
        with _connect(client, workers, scheduler_address) as dask_client:
            results = _run_tasks(dask_client, tasks, progress, should_stop)
        results.sort(key=lambda r: r.start)
        for result in results:  # the pyramid follows, a chunk at a time
            for store in (output, extra):
                if store is not None:
                    store.mark_done(result.start, result.stop)
        predictions = [r.predictions for r in results if len(r.positions)]
        stacked = (np.concatenate(predictions) if predictions
                   else np.zeros((0, len(loaded.card.class_names)), dtype=np.float32))
        positions = [p for r in results for p in r.positions]
        order = sorted(range(len(positions)), key=lambda i: positions[i])
        stacked = stacked[order] if len(order) else stacked
        positions = [positions[i] for i in order]
        value_range = (min(r.low for r in results), max(r.high for r in results))
        if np.dtype(options.dtype) == np.float16:  # what the file holds after rounding
            value_range = tuple(float(np.float16(v)) for v in value_range)
        seconds = time.perf_counter() - started
        # the record names each slice by its full index, as the job's record does
        recorded = [tuple(p[0] if a == plan.axis else 0 for a in range(3))
                    if plan.mode == "slices" else p for p in positions]
        attrs = _prediction_attrs(stacked, recorded, loaded.card.class_names, value_range,
                                  seconds, plan.target)
        attrs["workers_used"] = len({r.worker_pid for r in results})
        if extra is not None:
            spreads = [r.uncertainty_range for r in results if r.uncertainty_range]
            spread_range = (min(low for low, _ in spreads), max(high for _, high in spreads))
            if np.dtype(options.dtype) == np.float16:
                spread_range = tuple(float(np.float16(v)) for v in spread_range)
            _finish_store(extra, {**_without_predictions(attrs),
                                  "value_range": list(spread_range)})
        _finish_store(output, attrs)
    record.update(attrs)
    return RunSummary(Path(out_path).expanduser(), shape, voxel.scale, voxel.unit, seconds,
                      plan.mode, plan.axis if plan.mode == "slices" else None, plan.window,
                      tuple(loaded.card.class_names), stacked, positions, value_range, record,
                      None if extra_path is None else Path(extra_path).expanduser())


class _connect:
    """Context manager giving a dask client: the caller's, a remote one, or a local cluster."""

    def __init__(self, client: Any, workers: int | None, address: str | None) -> None:
        self.client, self.workers, self.address = client, workers, address
        self._owned: list[Any] = []

    def __enter__(self) -> Any:
        if self.client is not None:
            return self.client
        try:
            from distributed import Client, LocalCluster
        except ImportError:
            raise RuntimeError("running on dask workers needs the 'distributed' package: pip "
                               "install 'napari-gradcam[distributed]'") from None

        if self.address is not None:
            try:
                client = Client(self.address, timeout="20s")
            except OSError as error:
                raise ValueError(f"cannot reach the dask scheduler at {self.address} "
                                 f"({error}); check the address and that it is running"
                                 ) from None
            self._owned.append(client)
            return client
        cluster = LocalCluster(n_workers=self.workers or 2, threads_per_worker=1,
                               processes=True, dashboard_address=None)
        self._owned.append(cluster)
        client = Client(cluster)
        self._owned.insert(0, client)
        return client

    def __exit__(self, *exc: object) -> None:
        for owned in self._owned:
            owned.close()


def _run_tasks(client: Any, tasks: list[ChunkTask], progress: ProgressCallback | None,
               should_stop: Callable[[], bool] | None) -> list[ChunkResult]:
    from distributed import as_completed

    from napari_gradcam.core.volume import Cancelled

    futures = client.map(explain_chunk, tasks, pure=False)
    results: list[ChunkResult] = []
    try:
        for future in as_completed(futures):
            results.append(future.result())
            if progress is not None:
                progress(len(results), len(tasks))
            if should_stop is not None and should_stop() and len(results) < len(tasks):
                raise Cancelled(f"stopped by the user after {len(results)} of {len(tasks)} "
                                "chunks")
    except BaseException:
        client.cancel(futures)
        raise
    return results


__all__ = [
    "ATTRS_KEY",
    "ChunkResult",
    "ChunkTask",
    "ExplainOptions",
    "Plan",
    "RunSummary",
    "clear_model_cache",
    "describe_target",
    "explain_chunk",
    "explain_file",
    "file_request",
    "file_source",
    "get_model",
    "make_plan",
    "plan_chunks",
    "resolve_class_target",
    "run_distributed",
]
