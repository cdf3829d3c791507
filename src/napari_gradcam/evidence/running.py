"""Running the evidence checks: one job generator, drained by every shell.

:func:`evidence_job` validates everything when it is called (a clear :class:`EvidenceError`
before any worker starts) and returns a generator that yields ``(done, total, stage)``, in
forward-pass equivalents, after every batch of every check, and returns the
:class:`~napari_gradcam.evidence.report.EvidenceReport`. It is the explain job's protocol
(:mod:`napari_gradcam.core.volume`): the widget drains it in a napari generator worker, the
command line and :func:`run_evidence` with :func:`~napari_gradcam.core.volume.run_job`.

* **Cancel**: close the generator (``job.close()``; ``run_job`` does when ``should_stop()``
  turns true, the widget when its worker was aborted). The running check stops before its
  next batch, the model is restored, nothing is returned.
* **Out of memory**: a check that runs out of memory (``torch.OutOfMemoryError``, a
  RuntimeError saying "out of memory", a MemoryError) is run again with half the batch size,
  with a warning, down to a batch of one; later checks keep the smaller batch, and the report's
  settings (and provenance) record the batch size that was used.

Why a helper thread: the checks' batch loops live in :mod:`napari_gradcam.core.evidence` and
:mod:`napari_gradcam.core.attribution`, public functions that report through
``progress``/``should_stop`` hooks. Each check runs in a short-lived thread and the generator
turns its hook calls into yields, so the job yields per batch and stops within a check without
a second copy of every loop. The thread is joined before the generator moves on or ends, so
at most one check runs at a time and the model is never used by two threads.
"""

from __future__ import annotations

import inspect
import queue
import threading
import time
import warnings
from collections.abc import Callable, Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch
from torch import nn

from napari_gradcam.core.device import free_device_cache, is_out_of_memory
from napari_gradcam.core.engine import model_dtype_device, preserved_model_state
from napari_gradcam.core.evidence import agreement, check_forbidden_region, energy_in_region
from napari_gradcam.core.methods import METHODS, heatmaps, make_explainer
from napari_gradcam.core.metrics import class_probabilities
from napari_gradcam.core.provenance import make_provenance
from napari_gradcam.core.targets import SegmentationRegion, Target
from napari_gradcam.core.volume import Cancelled, run_job
from napari_gradcam.evidence.checks import (
    ATTRIBUTION_CHECKS,
    CHECK_TITLES,
    DEFAULT_CHECKS,
    REGISTRY,
    CheckContext,
    EvidenceError,
    EvidenceSettings,
    RegionKind,
    checked_checks,
)
from napari_gradcam.evidence.report import EvidenceReport

if TYPE_CHECKING:
    from napari_gradcam.core.models import LoadedModel

__all__ = [
    "Cancelled",
    "EvidenceEstimate",
    "Job",
    "estimate_evidence",
    "evidence_job",
    "run_evidence",
    "run_in_thread",
]

T = TypeVar("T")
Job = Generator[tuple[int, int, str], None, EvidenceReport]
MAP_COST = 2
"""The map under test: one forward and one backward pass."""


@dataclass
class _Subject:
    """Everything a run needs, checked before any computation."""

    model: nn.Module
    inputs: torch.Tensor
    image: np.ndarray
    layer: str
    model_name: str
    class_names: tuple[str, ...]
    weights_sha256: str | None
    preprocessing: list[Mapping[str, Any]]
    model_source: str
    method: str = "gradcam"


def _is_loaded_model(candidate: object) -> bool:
    from napari_gradcam.core.models import LoadedModel

    return isinstance(candidate, LoadedModel)


def _one_sample(loaded: LoadedModel, x: object) -> tuple[torch.Tensor, np.ndarray]:
    """Raw data of one sample → (1, C, *spatial) model input, and the display image."""
    card = loaded.card
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    array = np.asarray(x)
    dims = card.spatial_dims
    if array.ndim == dims:
        batch = array[None]
    elif array.ndim == dims + 1 and array.shape[0] == 1:
        batch = array
    elif array.ndim == dims + 1 and array.shape[0] == card.in_channels:
        batch = array[None]  # one channels-first sample
    elif array.ndim == dims + 2 and array.shape[0] == 1:
        batch = array
    else:
        raise EvidenceError(
            f"the evidence report explains one sample: give the model {card.name!r} data of "
            f"shape (*spatial) with {dims} spatial axes, (1, *spatial) or (1, C, *spatial); got "
            f"{array.shape}. Run once per image for a batch"
        )
    try:
        inputs = loaded.preprocess(batch)
    except (ValueError, TypeError) as error:
        raise EvidenceError(f"the data does not fit the model {card.name!r}: {error}") from None
    image = batch[0] if batch.ndim == dims + 1 else batch[0, 0]
    return inputs, np.asarray(image, dtype=np.float32)


def _prepare(model: object, x: object, layer: str | None, method: str) -> _Subject:
    if method not in METHODS:
        raise EvidenceError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if _is_loaded_model(model):
        loaded = model
        inputs, image = _one_sample(loaded, x)  # type: ignore[arg-type]
        card = loaded.card  # type: ignore[attr-defined]
        subject = _Subject(
            model=loaded.model,  # type: ignore[attr-defined]
            inputs=inputs, image=image,
            layer=layer or card.target_layer or "",
            model_name=card.name, class_names=tuple(card.class_names),
            weights_sha256=loaded.weights_sha256,  # type: ignore[attr-defined]
            preprocessing=list(card.preprocessing),
            model_source=str(loaded.source),  # type: ignore[attr-defined]
        )
    elif isinstance(model, nn.Module):
        tensor = torch.as_tensor(np.asarray(x)) if not isinstance(x, torch.Tensor) else x
        if tensor.ndim < 3 or tensor.shape[0] != 1:
            raise EvidenceError(
                "with a bare torch module, x is the model input of one sample, shape "
                f"(1, C, *spatial); got {tuple(tensor.shape)} (load a model card to feed raw "
                "data through its preprocessing)"
            )
        tensor = tensor.detach().float()
        if layer is None:
            from napari_gradcam.core.layer_discovery import default_target_layer

            layer = default_target_layer(model, tensor.ndim - 2, int(tensor.shape[1]),
                                         tuple(tensor.shape[2:]))
        subject = _Subject(
            model=model, inputs=tensor, image=tensor[0, 0].cpu().numpy().astype(np.float32),
            layer=layer, model_name=type(model).__name__, class_names=(),
            weights_sha256=None, preprocessing=[], model_source="<python module>",
        )
    else:
        raise TypeError(
            f"run_evidence takes a LoadedModel (load_model(...)) or a torch.nn.Module, not "
            f"{type(model).__name__}"
        )
    if not subject.layer or subject.layer not in dict(subject.model.named_modules()):
        raise EvidenceError(
            f"layer {subject.layer!r} is not in the model; choose one of its feature layers, "
            "e.g. 'features.3' (see discover_feature_layers)"
        )
    if not torch.isfinite(subject.inputs).all():
        raise EvidenceError("the input contains NaN or infinite values; fill them first")
    subject.method = method
    return subject


def _fixed_target(subject: _Subject, target: object) -> tuple[Any, int | None, str,
                                                                np.ndarray | None]:
    """Fix the target once: every check must explain the same class.

    Returns the target for the core functions, its class index (if a class), a label and the
    clean input's class probabilities.
    """
    model = subject.model
    with preserved_model_state(model), torch.no_grad():
        dtype, device = model_dtype_device(model)
        output = model(subject.inputs.to(device=device, dtype=dtype))
    if not isinstance(output, torch.Tensor):
        raise EvidenceError(f"the model returned {type(output).__name__}, not a tensor of "
                            "logits; wrap it so that it returns its logits")
    probabilities = class_probabilities(output)[0] if output.ndim >= 2 else None
    names = subject.class_names

    def label(index: int) -> str:
        return f"{names[index]} (class {index})" if 0 <= index < len(names) else f"class {index}"

    if isinstance(target, (list, tuple)) and len(target) == 1:
        target = target[0]
    if target is None or (isinstance(target, str) and target == "predicted"):
        if output.ndim != 2:
            raise EvidenceError(
                "the model returns a map of class scores (segmentation), so there is no single "
                "predicted class: choose a class as the target"
            )
        index = int(output[0].argmax())
        return index, index, f"predicted: {label(index)}", probabilities
    if isinstance(target, str):
        raise EvidenceError(f"target {target!r} is not supported: the evidence checks explain "
                            "one class at a time; use 'predicted' or a class index")
    if isinstance(target, (bool, np.bool_)):
        raise TypeError("a boolean is not a target; pass a class index")
    if isinstance(target, (int, np.integer)):
        classes = int(output.shape[1]) if output.ndim >= 2 else 0
        if not 0 <= int(target) < classes:
            raise EvidenceError(f"class {int(target)} is out of range: the model has {classes} "
                                "classes")
        return int(target), int(target), label(int(target)), probabilities
    if isinstance(target, SegmentationRegion):
        return target, int(target.class_index), f"{label(int(target.class_index))}, " \
            f"{target.describe()}", probabilities
    if isinstance(target, Target) or callable(target):
        name = target.describe() if isinstance(target, Target) else getattr(
            target, "__name__", "callable target")
        return target, None, str(name), probabilities
    raise TypeError(f"target must be None/'predicted', a class index, a SegmentationRegion or a "
                    f"callable, not {type(target).__name__}")


def _region_mask(region_mask: object, image_shape: tuple[int, ...]) -> np.ndarray | None:
    if region_mask is None:
        return None
    mask = np.asarray(region_mask)
    if mask.shape != image_shape:
        squeezed = np.squeeze(mask)
        if squeezed.shape != image_shape:
            raise EvidenceError(f"the region mask has shape {mask.shape} but the image has "
                                f"{image_shape}; they must match")
        mask = squeezed
    if mask.dtype != bool:
        if not np.issubdtype(mask.dtype, np.number):
            raise EvidenceError("the region mask must be boolean or a label image (non-zero = "
                                "inside)")
        mask = mask != 0
    if not mask.any():
        raise EvidenceError("the region mask is empty: paint or draw the region first (in the "
                            "current slice)")
    if mask.all():
        raise EvidenceError("the region mask covers the whole image; it must leave some pixels "
                            "outside")
    return mask


def _as_map(values: object) -> np.ndarray:
    array = np.asarray(values, dtype=np.float32)
    return array[0] if array.shape[0] == 1 else array


def run_in_thread(
    call: Callable[[Callable[[int, int], None], Callable[[], bool]], T],
) -> Generator[tuple[int, int], None, T]:
    """Run ``call(progress, should_stop)`` in a helper thread; yield each ``progress(done,
    total)`` it reports; return its result (or raise its exception).

    The check waits after each report until the consumer asks for the next one, so it is never
    more than one batch ahead of what was shown: a cancel stops it there, not many batches on.
    Closing the generator (cancel) makes ``should_stop()`` true, waits for ``call`` to notice
    (it polls before each batch) and lets the generator end; ``call``'s own
    :class:`Cancelled` is then discarded.
    """
    events: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
    stop = threading.Event()
    resume = threading.Semaphore(0)
    outcome: dict[str, Any] = {}

    def report(done: int, total: int) -> None:
        events.put(("progress", (done, total)))
        while not resume.acquire(timeout=0.05):  # the consumer took it, or a cancel came
            if stop.is_set():
                return

    def work() -> None:
        try:
            outcome["value"] = call(report, stop.is_set)
        except BaseException as error:  # re-raised in the generator's thread
            outcome["error"] = error
        finally:
            events.put(("end", None))

    thread = threading.Thread(target=work, name="napari-gradcam-evidence-check", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = events.get()
            if kind == "end":
                break
            yield value
            resume.release()
    finally:
        if thread.is_alive():  # closed early: ask the check to stop and wait for it
            stop.set()
        thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def with_oom_backoff(
    run: Callable[[EvidenceSettings], Generator[tuple[int, int], None, T]],
    settings: EvidenceSettings,
    what: str,
    device: torch.device,
) -> Generator[tuple[int, int], None, tuple[T, EvidenceSettings]]:
    """Drain ``run(settings)``; on out-of-memory halve ``settings.batch_size`` and run it again.

    Returns the result and the settings it finally ran with. Like the explain job's back-off
    (:func:`napari_gradcam.core.device.run_with_oom_backoff`): a warning per retry, and an
    error with advice when even a batch of one does not fit.
    """
    while True:
        try:
            result = yield from run(settings)
            return result, settings
        except Exception as error:
            if not is_out_of_memory(error):
                raise
            free_device_cache(device)
            if settings.batch_size <= 1:
                raise EvidenceError(
                    f"out of memory in {what} even for a batch of one; use a smaller image or "
                    "window, or the CPU") from error
            settings = replace(settings, batch_size=max(1, settings.batch_size // 2))
            warnings.warn(f"out of memory in {what}: retrying with batch size "
                          f"{settings.batch_size}", RuntimeWarning, stacklevel=2)


def evidence_job(
    model: LoadedModel | nn.Module,
    x: object,
    *,
    layer: str | None = None,
    target: object = None,
    checks: Iterable[str] | str = DEFAULT_CHECKS,
    region_mask: object = None,
    region_kind: RegionKind = "evidence",
    method: str = "gradcam",
    settings: EvidenceSettings | None = None,
    source: str | None = None,
) -> Job:  # returns a generator (validated eagerly)
    """Run the evidence checks on one sample; yield ``(done, total, stage)``, return the report.

    ``model`` is a :class:`~napari_gradcam.core.models.LoadedModel` (then ``x`` is raw data of
    one sample, ``(*spatial)``, ``(1, *spatial)`` or ``(1, C, *spatial)``, fed through the
    card's preprocessing) or a bare module (then ``x`` is its input ``(1, C, *spatial)``).
    ``layer`` defaults to the card's (or the discovered) target layer; ``target`` is
    ``None``/``"predicted"`` (fixed to the class predicted for the clean input), a class index,
    a :class:`~napari_gradcam.core.targets.SegmentationRegion` or a callable. ``checks``: any
    of :data:`~napari_gradcam.evidence.checks.CHECKS`; with ``region_mask`` (non-zero = inside,
    the image's shape) the region check runs too: for ``region_kind="evidence"`` (the crack)
    filling the region should lower the score and the map should concentrate there; for
    ``"forbidden"`` (a scale bar) the map should avoid it and filling it should not flip the
    prediction.

    Not itself a generator: everything is validated when it is called and the returned
    generator does the work (see the module docstring for progress, cancel and out-of-memory).
    ``done`` never goes backwards, the same item is never yielded twice in a row, and the last
    item is ``(total, total, "done")``. The model is left as found.
    """
    if region_kind not in ("evidence", "forbidden"):
        raise EvidenceError(f"region_kind must be 'evidence' or 'forbidden', got {region_kind!r}")
    settings = settings or EvidenceSettings()
    chosen = checked_checks(checks, region_mask)
    subject = _prepare(model, x, layer, method)
    mask = _region_mask(region_mask, tuple(subject.inputs.shape[2:]))
    fixed = _fixed_target(subject, target)
    return _stages(subject, fixed, chosen, mask, region_kind, method, settings, source)


def _context(subject: _Subject, target: Any, settings: EvidenceSettings,
             mask: np.ndarray | None, cam: np.ndarray | None) -> CheckContext:
    return CheckContext(model=subject.model, inputs=subject.inputs, layer=subject.layer,
                        target=target, settings=settings, mask=mask, cam=cam,
                        explain=_explainer_factory(subject.method, subject.layer))


def _stage_costs(chosen: Sequence[str], context: CheckContext) -> list[tuple[str, int]]:
    """(stage, cost) in forward-pass equivalents: the map first, then each chosen check."""
    return [("map", MAP_COST), *((name, int(REGISTRY[name].cost(context))) for name in chosen)]


def _stages(subject: _Subject, fixed: tuple[Any, int | None, str, np.ndarray | None],
            chosen: tuple[str, ...], mask: np.ndarray | None, region_kind: RegionKind,
            method: str, settings: EvidenceSettings, source: str | None) -> Job:
    """The generator behind :func:`evidence_job`: the map, then one stage per check."""
    target, target_index, target_label, probabilities = fixed
    _, device = model_dtype_device(subject.model)
    context = _context(subject, target, settings, mask, None)
    stages = _stage_costs(chosen, context)
    total = sum(cost for _, cost in stages)
    done = 0
    last: tuple[int, int, str] | None = None
    timings: dict[str, float] = {}
    results: dict[str, Any] = {}

    def item(value: int, stage: str) -> tuple[int, int, str] | None:
        """The next progress item, or None when it would repeat the last one."""
        nonlocal last
        value = max(value, last[0] if last is not None else 0)  # never backwards
        new = (min(value, total), total, stage)
        if new == last:
            return None
        last = new
        return new

    for stage, cost in stages:
        if (first := item(done, stage)) is not None:
            yield first
        title = CHECK_TITLES.get(stage, "the map")
        started = time.perf_counter()

        def attempt(current: EvidenceSettings, stage: str = stage,
                    base: CheckContext = context) -> Generator[tuple[int, int], None, Any]:
            run_context = replace(base, settings=current)
            if stage == "map":
                return run_in_thread(lambda progress, should_stop: _map_stage(
                    run_context, progress, should_stop))
            check = REGISTRY[stage]
            return run_in_thread(lambda progress, should_stop: check.run(
                run_context, progress, should_stop))

        steps = with_oom_backoff(attempt, context.settings, title, device)
        try:
            while True:
                try:
                    step, count = next(steps)
                except StopIteration as finished:
                    results[stage], used = finished.value
                    break
                if count > 0 and (update := item(
                        done + min(cost, round(cost * step / count)), stage)) is not None:
                    yield update
        except (Cancelled, EvidenceError):
            raise
        except (ValueError, TypeError) as error:
            raise EvidenceError(f"{CHECK_TITLES.get(stage, stage)}: {error}") from error
        except Exception as error:
            raise EvidenceError(f"{CHECK_TITLES.get(stage, stage)} failed: "
                                f"{type(error).__name__}: {error}") from error
        finally:
            steps.close()  # closed early (cancel): the check's thread is stopped and joined
        if stage == "map":
            context = replace(context, cam=results["map"])
        context = replace(context, settings=used)
        timings[stage] = time.perf_counter() - started
        done += cost
    if (end := item(total, "done")) is not None:
        yield end
    return _assemble(subject, method, target_index, target_label, probabilities,
                     context.settings, chosen, mask, region_kind, results, timings, source)


def _map_stage(context: CheckContext, progress: Callable[[int, int], None],
               should_stop: Callable[[], bool]) -> np.ndarray:
    if should_stop():
        raise Cancelled("evidence run stopped before the map")
    maps = context.explain(context.model, context.inputs, context.target)
    progress(1, 1)
    return maps


def _explainer_factory(method: str, layer: str) -> Callable[[nn.Module, torch.Tensor, Any],
                                                              np.ndarray]:
    def explain(model: nn.Module, inputs: torch.Tensor, target: Any) -> np.ndarray:
        return heatmaps(make_explainer(method, model, layer)(inputs, target=target), method)

    return explain


def _assemble(subject: _Subject, method: str, target_index: int | None,
              target_label: str, probabilities: np.ndarray | None, settings: EvidenceSettings,
              checks: tuple[str, ...], mask: np.ndarray | None, region_kind: RegionKind,
              results: dict[str, Any], timings: dict[str, float], source: str | None
              ) -> EvidenceReport:
    cam = _as_map(results["map"])
    maps = {method: cam}
    agreements = {}
    for name in ATTRIBUTION_CHECKS:  # the registry's map-comparing checks, in run order
        if name in results:
            maps[name] = _as_map(results[name])
            agreements[name] = agreement(cam, maps[name], top_k=settings.agreement_top_k)
    region_energy = forbidden = None
    if mask is not None:
        share = energy_in_region(cam, mask)
        region_energy = None if not np.isfinite(share) else float(share)
        if region_kind == "forbidden":
            forbidden = check_forbidden_region(cam, mask, settings.forbidden_threshold)
    provenance = make_provenance(
        method=method,
        layers=[subject.layer],
        target=target_label,
        model_name=subject.model_name,
        weights_sha256=subject.weights_sha256,
        preprocessing=subject.preprocessing,
        mode="evidence",
        source=source,
        options={
            "checks": list(checks),
            "settings": settings.to_dict(),
            "target_index": target_index,
            "class_names": list(subject.class_names),
            "input_shape": list(subject.inputs.shape),
            "model_source": subject.model_source,
            "region_kind": region_kind if mask is not None else None,
            "region_pixels": None if mask is None else int(mask.sum()),
        },
    )
    return EvidenceReport(
        method=method,
        layer=subject.layer,
        model_name=subject.model_name,
        target=target_label,
        target_index=target_index,
        class_names=subject.class_names,
        image=subject.image,
        probabilities=probabilities,
        maps=maps,
        settings=settings,
        provenance=provenance,
        checks=checks,
        deletion=results.get("deletion"),
        insertion=results.get("insertion"),
        randomisation=results.get("randomisation"),
        agreements=agreements,
        region_kind=region_kind,
        region_mask=mask,
        region=results.get("region"),
        region_energy=region_energy,
        forbidden=forbidden,
        timings=timings,
    )


@dataclass(frozen=True)
class EvidenceEstimate:
    """What an evidence run will cost, measured before it starts.

    ``per_check`` holds the forward-pass equivalents of each stage (a backward pass counts as
    one more; the same numbers the progress bar counts), ``forward_passes`` their sum for one
    sample, ``seconds_per_pass`` one timed forward pass of the sample (after a warm-up pass),
    and ``samples`` how many samples a whole-volume run repeats it for.
    """

    per_check: dict[str, int]
    seconds_per_pass: float
    samples: int = 1

    @property
    def forward_passes(self) -> int:
        return sum(self.per_check.values())

    @property
    def seconds(self) -> float:
        return self.forward_passes * self.seconds_per_pass * self.samples

    def describe(self) -> str:
        """One line for the terminal, before the run starts."""
        per_sample = f"{self.forward_passes} forward passes x {1000 * self.seconds_per_pass:.1f} ms"
        many = f"{self.samples} samples x " if self.samples != 1 else ""
        return (f"estimate: about {_duration(self.seconds)} ({many}{per_sample}; "
                + ", ".join(f"{name} {cost}" for name, cost in self.per_check.items()) + ")")


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _timed_forward(subject: _Subject, batch_size: int) -> float:
    """Seconds per sample of a forward pass of ``batch_size`` copies of the sample, as the
    checks batch them (the faster of two timings, after a warm-up pass)."""
    model = subject.model
    with preserved_model_state(model), torch.no_grad():
        dtype, device = model_dtype_device(model)
        inputs = subject.inputs.to(device=device, dtype=dtype)
        batch = inputs.expand(batch_size, *inputs.shape[1:]).contiguous()
        model(batch)
        timings = []
        for _ in range(2):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            started = time.perf_counter()
            model(batch)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            timings.append(time.perf_counter() - started)
        return min(timings) / batch_size


def estimate_evidence(
    model: LoadedModel | nn.Module,
    x: object,
    *,
    samples: int = 1,
    **job_options: Any,
) -> EvidenceEstimate:
    """How long :func:`run_evidence` with these arguments will take, from a timed forward pass.

    Takes :func:`evidence_job`'s arguments (``job_options``: the same names and defaults, a
    misspelt one refused) and validates them the same way, times one forward pass of a batch
    of ``settings.batch_size`` copies of ``x`` (the checks run in such batches; a lone sample
    is several times slower per sample on a CPU) and multiplies by the forward-pass
    equivalents of the chosen checks. ``samples`` multiplies it for a run over many slices or
    windows.
    """
    options = inspect.signature(evidence_job).bind(model, x, **job_options)
    options.apply_defaults()
    chosen_options = options.arguments
    settings = chosen_options["settings"] or EvidenceSettings()
    region_mask = chosen_options["region_mask"]
    chosen = checked_checks(chosen_options["checks"], region_mask)
    subject = _prepare(model, x, chosen_options["layer"], chosen_options["method"])
    mask = _region_mask(region_mask, tuple(subject.inputs.shape[2:]))
    per_check = dict(_stage_costs(chosen, _context(subject, None, settings, mask, None)))
    return EvidenceEstimate(per_check, _timed_forward(subject, settings.batch_size),
                            max(1, int(samples)))


def run_evidence(
    model: LoadedModel | nn.Module,
    x: object,
    *,
    export_folder: str | Path | None = None,
    overwrite: bool = False,
    progress: Callable[[int, int, str], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    **job_options: Any,
) -> EvidenceReport:
    """:func:`evidence_job`, drained (scripts, command line, tests).

    ``job_options`` are :func:`evidence_job`'s keyword arguments (``layer``, ``target``,
    ``checks``, ``region_mask``, ``region_kind``, ``method``, ``settings``, ``source``),
    passed on as they are so that the two never disagree on a name or a default; a misspelt
    one is refused by :func:`evidence_job` before anything runs. ``progress(done, total,
    stage)`` is called for every item the job yields; when ``should_stop()`` turns true the job
    is closed (the running check stops before its next batch) and :class:`Cancelled` is
    raised. With ``export_folder`` the report is written there (:meth:`EvidenceReport.export`)
    only when every check finished, so a cancelled or failed run writes nothing.
    """
    job = evidence_job(model, x, **job_options)
    report: EvidenceReport = run_job(job, progress, should_stop)
    if export_folder is not None:
        report.export(export_folder, overwrite=overwrite)
    return report
