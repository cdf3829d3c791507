"""Model cards: the YAML file that says what a set of weights is and how to feed it.

A state dict alone cannot be explained: Grad-CAM needs the architecture to build, the layer to
look at, the class names to label the maps and the preprocessing the model was trained with.
The card carries all of that next to the weights, in a plain, reviewable text file that is
read with ``yaml.safe_load`` (no code runs when a card is read).

Every field is checked when the card is read, and every complaint names the field, what is
wrong and, for typos, the field that was probably meant: a user who wrote ``clas_names`` should
hear about it at load time, not find the GUI showing "class 0".
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from napari_gradcam.core.preprocess import PreprocessingError, validate_preprocessing

TASKS = ("classification", "segmentation", "regression")
"""What a model predicts: class scores (N, K), per-pixel class scores (N, K, *spatial), or
values of material properties (N, P) or (N,) (porosity, grain size; ``class_names`` then name
the properties)."""

#: Card fields in the order the agreed format writes them (and :meth:`ModelCard.to_dict` does).
CARD_FIELDS = (
    "name", "description", "architecture", "architecture_kwargs", "weights", "spatial_dims",
    "in_channels", "task", "class_names", "target_layer", "input_size", "preprocessing",
    "training", "metrics", "training_statistics",
)
REQUIRED_FIELDS = ("name", "architecture", "spatial_dims", "in_channels", "task")


class ModelCardError(ValueError):
    """A model card is malformed; the message names the field and the problem."""


def _type_error(field_name: str, expected: str, value: object) -> ModelCardError:
    return ModelCardError(
        f"field {field_name!r} must be {expected}, got {type(value).__name__} {value!r}"
    )


def _plain(value: Any) -> Any:
    """A deep copy made of dicts, lists and scalars only, so YAML can write it back."""
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, Path):
        return str(value)
    return copy.deepcopy(value)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True, kw_only=True)
class ModelCard:
    """What a model is, how to build it, and how to feed it (see the module docstring).

    ``weights`` is kept as written in the card (relative paths are relative to the card's
    folder, ``base_dir``); :attr:`weights_path` is the resolved file. ``weights: null`` means the
    architecture initialises its own weights (a factory that loads a checkpoint itself).
    ``class_names`` may be empty; :func:`napari_gradcam.core.models.load_model` then fills in
    ``class 0``, ``class 1``... from the model's output size.
    """

    name: str
    architecture: str
    spatial_dims: int
    in_channels: int
    task: str
    description: str = ""
    architecture_kwargs: Mapping[str, Any] = field(default_factory=dict)
    weights: str | None = None
    class_names: tuple[str, ...] = ()
    target_layer: str | None = None
    input_size: tuple[int, ...] | None = None
    preprocessing: tuple[Mapping[str, Any], ...] = ()
    training: Mapping[str, Any] | None = None
    metrics: Mapping[str, Any] | None = None
    training_statistics: Mapping[str, Any] | None = None
    base_dir: Path | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        # Checked here (not only in from_dict) so that a card built in Python is just as safe.
        for name in ("name", "architecture"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise _type_error(name, "a non-empty string", value)
        if not isinstance(self.description, str):
            raise _type_error("description", "a string", self.description)
        if not _is_int(self.spatial_dims) or self.spatial_dims not in (1, 2, 3):
            raise ModelCardError(
                "field 'spatial_dims' must be 1 (spectra), 2 (images) or 3 (volumes), got "
                f"{self.spatial_dims!r}"
            )
        if not _is_int(self.in_channels) or self.in_channels < 1:
            raise _type_error("in_channels", "a positive integer", self.in_channels)
        if self.task not in TASKS:
            raise ModelCardError(
                f"field 'task' must be one of {', '.join(TASKS)}, got {self.task!r}"
            )
        self._set("architecture_kwargs", self._checked_kwargs())
        if self.weights is not None and not isinstance(self.weights, (str, Path)):
            raise _type_error("weights", "a file path (string) or null", self.weights)
        if isinstance(self.weights, Path):
            self._set("weights", str(self.weights))
        self._set("class_names", self._checked_class_names())
        if self.target_layer is not None and (
            not isinstance(self.target_layer, str) or not self.target_layer
        ):
            raise _type_error("target_layer", "a dotted layer name such as 'features.3' or null",
                              self.target_layer)
        self._set("input_size", self._checked_input_size())
        try:
            steps = validate_preprocessing(self.preprocessing, self.spatial_dims)
        except PreprocessingError as error:
            raise ModelCardError(f"field 'preprocessing': {error}") from None
        self._set("preprocessing", steps)
        for name in ("training", "metrics"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Mapping):
                raise _type_error(name, "a mapping (free-form key: value pairs) or null", value)
            if value is not None:
                self._set(name, _plain(value))
        self._set("training_statistics", self._checked_training_statistics())
        if self.base_dir is not None:
            self._set("base_dir", Path(self.base_dir))

    def __hash__(self) -> int:
        # The generated hash would fail on the dict fields; equal cards agree on these.
        return hash((self.name, self.architecture, self.weights, self.spatial_dims, self.task))

    def _set(self, name: str, value: object) -> None:
        object.__setattr__(self, name, value)

    def _checked_kwargs(self) -> dict[str, Any]:
        kwargs = self.architecture_kwargs
        if kwargs is None:
            return {}
        if not isinstance(kwargs, Mapping) or not all(isinstance(k, str) for k in kwargs):
            raise _type_error("architecture_kwargs", "a mapping of keyword arguments", kwargs)
        # A card that says spatial_dims: 2 but builds a 3D network would fail much later and
        # far more confusingly, so the two places that can say it must agree.
        for name in ("spatial_dims", "in_channels"):
            if name in kwargs and kwargs[name] != getattr(self, name):
                raise ModelCardError(
                    f"architecture_kwargs.{name} is {kwargs[name]!r} but the card's {name} is "
                    f"{getattr(self, name)!r}; make them agree"
                )
        return _plain(kwargs)

    def _checked_training_statistics(self) -> dict[str, Any] | None:
        # What the training inputs looked like (intensity statistics and the like), so that a
        # later check can tell whether the data being explained resembles them. Its content is
        # defined by napari_gradcam.core.domain; the card only keeps it, as plain YAML data.
        statistics = self.training_statistics
        if statistics is None:
            return None
        if not isinstance(statistics, Mapping) or not all(isinstance(k, str) for k in statistics):
            raise _type_error("training_statistics",
                              "a mapping with string keys (statistics of the training inputs)",
                              statistics)
        return _plain(statistics)

    def _checked_class_names(self) -> tuple[str, ...]:
        names = self.class_names
        if names is None:
            return ()
        if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
            raise _type_error("class_names", "a list of strings", names)
        if len(set(names)) != len(names):
            duplicates = sorted({n for n in names if list(names).count(n) > 1})
            raise ModelCardError(f"field 'class_names' repeats {', '.join(duplicates)}")
        return tuple(names)

    def _checked_input_size(self) -> tuple[int, ...] | None:
        size = self.input_size
        if size is None:
            return None
        if _is_int(size):
            size = [size] * self.spatial_dims
        if not isinstance(size, (list, tuple)) or not all(_is_int(s) and s >= 1 for s in size):
            raise _type_error("input_size", "a list of positive integers or null", size)
        if len(size) != self.spatial_dims:
            raise ModelCardError(
                f"field 'input_size' has {len(size)} entries but spatial_dims is "
                f"{self.spatial_dims}; give one size per spatial axis"
            )
        return tuple(size)

    @property
    def weights_path(self) -> Path | None:
        """The weights file, resolved against the card's folder (or the working directory)."""
        if self.weights is None:
            return None
        path = Path(self.weights).expanduser()
        if not path.is_absolute():
            path = (self.base_dir or Path.cwd()) / path
        return path.resolve()

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], base_dir: str | Path | None = None) -> ModelCard:
        """Validate a parsed card; ``base_dir`` is the folder relative weight paths start from."""
        if not isinstance(data, Mapping):
            raise ModelCardError(
                f"a model card is a mapping of fields (name: ..., architecture: ...), got "
                f"{type(data).__name__}"
            )
        for key in data:
            if key not in CARD_FIELDS:
                close = difflib.get_close_matches(str(key), CARD_FIELDS, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ModelCardError(
                    f"unknown field {key!r}{hint}. Card fields: {', '.join(CARD_FIELDS)}"
                )
        missing = [key for key in REQUIRED_FIELDS if key not in data]
        if missing:
            raise ModelCardError(f"missing required field(s): {', '.join(missing)}")
        values = {key: value for key, value in data.items() if value is not None}
        return cls(**values, base_dir=None if base_dir is None else Path(base_dir))

    @classmethod
    def from_yaml(cls, path: str | Path) -> ModelCard:
        """Read and validate a card file (safe YAML: reading a card never runs code)."""
        path = Path(path).expanduser().resolve()
        if not path.is_file():
            raise FileNotFoundError(f"model card not found: {path}")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as error:
            raise ModelCardError(f"model card {path} is not valid YAML: {error}") from None
        try:
            return cls.from_dict(data, base_dir=path.parent)
        except ModelCardError as error:
            raise ModelCardError(f"model card {path}: {error}") from None

    def to_dict(self) -> dict[str, Any]:
        """The card as plain YAML-ready data, in the agreed field order (optional ``None``s left
        out); ``from_dict(card.to_dict(), card.base_dir) == card``."""
        out: dict[str, Any] = {}
        for name in CARD_FIELDS:
            value = getattr(self, name)
            if value is None:
                continue
            out[name] = _plain(value)
        return out

    def to_yaml(self, path: str | Path) -> Path:
        """Write the card as YAML (e.g. from a training script, next to its weights)."""
        path = Path(path)
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False), encoding="utf-8")
        return path

