"""What to explain and how: the request every shell builds, and the checks made once.

:class:`ExplainRequest` is the one vocabulary of a run (method, layer, target, mode, window,
batch, uncertainty, output); :class:`ImageSource` is the data captured when a run starts, and
:class:`TargetChoice` what to explain in it. The command line's flags
(:class:`napari_gradcam.distributed.ExplainOptions`) are a thin alias that maps onto the same
checks: :func:`check_uncertainty` (one rule, each shell naming its own spelling of windows
mode), :func:`~napari_gradcam.core.run.tiles.check_window`, :func:`build_explainer` (the one
place a method name becomes an explainer) and :func:`run_provenance` (the one provenance
record, written by the widget's job and the command line alike).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from napari_gradcam.core.provenance import make_provenance
from napari_gradcam.core.targets import RegressionTarget
from napari_gradcam.core.uncertainty import SOURCES, UncertaintyExplainer

MODES = ("current", "slices", "windows")
TARGET_KINDS = ("predicted", "class", "all", "region", "click", "regression")
UNCERTAINTY_SOURCES = (*SOURCES, "windows")
"""What an uncertainty map can measure: flips, shifts and MC dropout of each batch
(:mod:`napari_gradcam.core.uncertainty`), and in windows mode the disagreement between
overlapping windows."""


def _class_name(class_names: Sequence[str], index: int | None) -> str:
    if index is not None and 0 <= index < len(class_names):
        return str(class_names[index])
    return f"class {index}"


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
    path: str | None = None  # the file the layer was read from (never written over); None: none
    # the layer's own placement (its units per axis, ``voxel_size`` aside): a map written to disk
    # carries it, so re-opening the store puts the map where the layer is; None: scale 1, at 0
    scale: tuple[float, ...] | None = None
    translate: tuple[float, ...] | None = None

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
    """The user's choices for one run: what to explain and how (the modes are described in
    :mod:`napari_gradcam.core.run.job`).

    ``output``: where the maps go. ``None`` keeps them in memory (small images); a ``.zarr``
    path writes them chunk by chunk into an OME-Zarr there, with a multiscale pyramid and the
    provenance, and the result's maps are lazy arrays reading it (a volume bigger than RAM).
    :func:`napari_gradcam.io.default_output_path` suggests a place next to the source.
    """

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
    output: str | Path | None = None  # an OME-Zarr path: the maps are written there, lazily
    overwrite: bool = False  # replace an existing output (never the input)
    # what the on-disk map is while it is written: True, a store at ``output`` from the start,
    # readable while it fills and kept (marked incomplete) when the run stops (the widget shows
    # it growing); False, written under a temporary name and renamed to ``output`` only when
    # complete, removed when the run fails or stops (the command line: a file that exists is a
    # finished map)
    keep_partial: bool = True
    dtype: str = "float32"  # precision of the on-disk map (float16 halves the file)
    chunks: tuple[int, ...] | None = None  # zarr chunks of the on-disk map; None: automatic
    # the method's model options (``output``, ``patch_grid``, ``class_token``; see
    # :func:`build_explainer`): only those set are passed
    model_options: Mapping[str, Any] = field(default_factory=dict)
    # what the calling shell adds to the provenance record: its own options (under
    # ``"options"``, merged with the job's) and top-level entries (e.g. the command line's
    # wording of the target), so a file says which shell wrote it and how
    provenance: Mapping[str, Any] = field(default_factory=dict)


def check_uncertainty(sources: Sequence[str], windows_mode: bool, n_dropout: object, *,
                      windows_spelling: str = "'windows' mode") -> None:
    """The one check of the uncertainty choices. ``windows_spelling``: how the calling shell
    names windows mode (the command line says ``--mode volume``)."""
    unknown = [s for s in sources if s not in UNCERTAINTY_SOURCES]
    if unknown:
        raise ValueError(f"unknown uncertainty source {unknown[0]!r}; choose from "
                         f"{', '.join(UNCERTAINTY_SOURCES)}")
    if "windows" in sources and not windows_mode:
        raise ValueError("uncertainty source 'windows' (disagreement between overlapping "
                         f"windows) needs {windows_spelling}; slices are explained once each")
    if "dropout" in sources and (isinstance(n_dropout, bool) or not isinstance(n_dropout, int)
                                 or n_dropout < 2):
        raise ValueError(f"n_dropout must be an integer >= 2 (MC-dropout samples), got "
                         f"{n_dropout!r}")


def build_explainer(loaded: Any, method: str, layer: Any, *, device: str | None = None,
                    uncertainty: Sequence[str] = (), n_dropout: int = 8,
                    model_options: Mapping[str, Any] | None = None) -> Any:
    """The explainer every path uses (the widget's job, one process, dask chunks): the method
    with the model options (``output``, ``patch_grid``, ``class_token``: only those set), wrapped
    in an :class:`~napari_gradcam.core.uncertainty.UncertaintyExplainer` when per-input
    uncertainty sources are asked for (its maps are the plain maps, so the main output is the
    same with or without uncertainty)."""
    from napari_gradcam.core.methods import explainer

    options = {key: value for key, value in dict(model_options or {}).items()
               if value is not None}
    if device is not None and device != "auto":
        options["device"] = device
    built = explainer(method, loaded.model, layer, **options)
    sources = tuple(s for s in uncertainty if s in SOURCES)
    if sources:
        built = UncertaintyExplainer(built, sources=sources, n_dropout=n_dropout)
    return built


def uncertainty_record(sources: Sequence[str], n_dropout: int) -> dict[str, Any]:
    """What an uncertainty map holds, as the provenance says it (the widget's job, one
    process and dask chunks alike): its sources, the MC-dropout samples, the statistic and
    what each source means."""
    from napari_gradcam.core.uncertainty import MEANINGS

    sources = list(dict.fromkeys(sources))
    return {"sources": sources, "n_dropout": n_dropout if "dropout" in sources else None,
            "statistic": "standard deviation of the map, in the map's units",
            "meaning": {s: MEANINGS[s] for s in sources}}


def run_provenance(loaded: Any, *, method: str, layer: str, target: str, mode: str,
                   source: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """The one provenance record of a run (the widget's job and the command line): how the map
    was made, which model (name, weights hash, preprocessing, where it was loaded from, its
    class names) and the run's options. Both shells add their own options; the keys above mean
    the same everywhere, so a reader needs no idea which shell wrote the file."""
    card = loaded.card
    record = make_provenance(
        method=method, layers=[layer], target=target, model_name=card.name,
        weights_sha256=loaded.weights_sha256, preprocessing=list(card.preprocessing),
        mode=mode, source=source, options=dict(options))
    record["class_names"] = list(card.class_names)
    record["model_source"] = str(loaded.source)
    return record
