"""bioimage.io model packages (``rdf.yaml``) read as model cards, under the same trust rules.

The bioimage.io model zoo shares PyTorch models as a folder: an ``rdf.yaml`` (also named
``bioimageio.yaml``) describing inputs and outputs, a state dict, and the Python file that
defines the network. Instead of a second loader, the description is translated into a
:class:`~napari_gradcam.core.model_card.ModelCard` whose architecture is that file
(``file.py:Class``) and whose weights are the state dict, both relative to the package folder;
:func:`napari_gradcam.core.models.load_model` then treats it like any card. So the
architecture file is code and runs only with ``trust=True`` (it is not even read as Python
without), it must lie in the package folder, and the weights are read with
``torch.load(weights_only=True)`` or safetensors and must lie there too.

Both description generations are understood (field names as in the bioimage.io spec):

* 0.4: ``weights.pytorch_state_dict.architecture: "unet2d.py:UNet2d"`` with
  ``architecture_sha256`` and ``kwargs``; tensor ``axes`` are strings such as ``"bcyx"`` and
  ``shape`` a list (or ``{min, step}``);
* 0.5: ``architecture: {source: unet2d.py, callable: UNet2d, kwargs: {...}, sha256: ...}`` (or
  ``{import_from: package.module, callable: ...}``); ``axes`` are objects with a ``type``
  (batch, channel, space...), channel axes list ``channel_names``.

Only what the card needs is read: the first (only) input's axes give ``spatial_dims``,
``in_channels`` and a fixed ``input_size``; the output's axes give the task (spatial axes:
segmentation) and its channel names the class names (else ``config.class_names``). Declared
SHA-256 sums of the weights and the architecture file are checked before either is used.
Preprocessing that napari-gradcam can reproduce exactly (fixed ``zero_mean_unit_variance``,
``scale_linear``) is translated; any other step is named in a warning, since maps of inputs the
model was not trained on can mislead.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from napari_gradcam.core.model_card import ModelCard, ModelCardError

#: File names a bioimage.io package's description goes by.
RDF_NAMES = ("rdf.yaml", "bioimageio.yaml")


class BioimageioError(ModelCardError):
    """A bioimage.io description cannot be used; the message names the file and the field."""


def find_rdf(path: str | Path) -> Path | None:
    """The description of the package at ``path`` (its folder or the file itself), or None."""
    path = Path(path).expanduser()
    if path.is_dir():
        for name in RDF_NAMES:
            if (path / name).is_file():
                return path / name
        found = sorted(path.glob("*.bioimageio.yaml"))
        return found[0] if found else None
    if path.is_file() and path.suffix.lower() in (".yaml", ".yml") and (
            path.name in RDF_NAMES or path.name.endswith(".bioimageio.yaml")
            or _looks_like_rdf(path)):
        return path
    return None


def _looks_like_rdf(path: Path) -> bool:
    """A YAML file with a bioimage.io model's top-level keys (``type: model`` and a
    ``format_version``); a model card has neither."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    return isinstance(data, Mapping) and data.get("type") == "model" and (
        "format_version" in data)


def card_from_rdf(path: str | Path) -> ModelCard:
    """Read a bioimage.io model description into a model card (no code runs; see module doc).

    The card's ``base_dir`` is the package folder, so the weights and the architecture file
    are confined to it when the card is loaded.
    """
    rdf = find_rdf(path)
    if rdf is None:
        raise BioimageioError(
            f"{Path(path).resolve()}: no bioimage.io description found (a folder with "
            f"{' or '.join(RDF_NAMES)}, or that file)"
        )
    rdf = rdf.resolve()
    try:
        data = yaml.safe_load(rdf.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise BioimageioError(f"bioimage.io description {rdf} is not valid YAML: {error}") from None
    if not isinstance(data, Mapping):
        raise BioimageioError(f"bioimage.io description {rdf} is not a mapping of fields")
    try:
        return _card(data, rdf)
    except ModelCardError as error:
        if str(rdf) in str(error):
            raise
        raise BioimageioError(f"bioimage.io description {rdf}: {error}") from None


def _card(data: Mapping[str, Any], rdf: Path) -> ModelCard:
    if data.get("type", "model") != "model":
        raise BioimageioError(f"describes a {data.get('type')!r}, not a model")
    folder = rdf.parent
    weights = _pytorch_state_dict(data)
    architecture, kwargs = _architecture(weights, folder)
    weights_source = _local_file(weights.get("source"), "weights.pytorch_state_dict.source",
                                 folder)
    _check_sha256(folder / weights_source, weights.get("sha256"),
                  "weights.pytorch_state_dict.sha256", folder)
    inputs, outputs = data.get("inputs"), data.get("outputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], Mapping):
        count = len(inputs) if isinstance(inputs, list) else 0
        raise BioimageioError(
            f"'inputs' lists {count} tensors; napari-gradcam explains models that take one "
            "image tensor"
        )
    if not isinstance(outputs, list) or not outputs or not isinstance(outputs[0], Mapping):
        raise BioimageioError("'outputs' must list the model's output tensor")
    spatial_dims, in_channels, input_size = _input_layout(inputs[0])
    task, class_names = _output_layout(outputs[0], data.get("config"))
    name = str(data.get("name") or data.get("id") or rdf.parent.name)
    description = str(data.get("description") or "").strip()
    version = data.get("format_version")
    return ModelCard(
        name=name,
        description=(description + " " if description else "")
        + f"(bioimage.io model, format {version}, from {rdf.name})",
        architecture=architecture,
        architecture_kwargs=kwargs,
        weights=weights_source,
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        task=task,
        class_names=class_names,
        input_size=input_size,
        preprocessing=_preprocessing(inputs[0], name),
        base_dir=folder,
    )


def _pytorch_state_dict(data: Mapping[str, Any]) -> Mapping[str, Any]:
    weights = data.get("weights")
    if not isinstance(weights, Mapping) or not isinstance(
            weights.get("pytorch_state_dict"), Mapping):
        formats = ", ".join(weights) if isinstance(weights, Mapping) else "none"
        raise BioimageioError(
            f"no 'weights.pytorch_state_dict' entry (this package has: {formats}). "
            "napari-gradcam needs the PyTorch state dict and its architecture: hooks cannot be "
            "attached to TorchScript or ONNX weights"
        )
    return weights["pytorch_state_dict"]


def _architecture(weights: Mapping[str, Any], folder: Path) -> tuple[str, dict[str, Any]]:
    """``("file.py:Class" or "package.module:Class", kwargs)`` from a 0.4 or 0.5 entry."""
    where = "weights.pytorch_state_dict.architecture"
    spec = weights.get("architecture")
    if isinstance(spec, str):  # 0.4: "file.py:Class" or "package.module:Class"
        source, _, callable_name = spec.rpartition(":")
        kwargs = weights.get("kwargs") or {}
        sha256 = weights.get("architecture_sha256")
        if not source or not callable_name:
            raise BioimageioError(f"{where} {spec!r}: expected 'file.py:Name' or 'module:Name'")
        if source.endswith(".py"):
            source = _local_file(source, where, folder)
    elif isinstance(spec, Mapping):  # 0.5: {source | import_from, callable, kwargs, sha256}
        callable_name = spec.get("callable")
        kwargs = spec.get("kwargs") or {}
        sha256 = spec.get("sha256")
        if spec.get("source") is not None:
            source = _local_file(spec.get("source"), f"{where}.source", folder)
        elif isinstance(spec.get("import_from"), str):
            source = spec["import_from"]
        else:
            raise BioimageioError(f"{where} needs 'source' (a .py file) or 'import_from'")
        if not isinstance(callable_name, str) or not callable_name:
            raise BioimageioError(f"{where}.callable must name the network's class")
    else:
        raise BioimageioError(f"{where} is missing: the state dict needs its network class")
    if not isinstance(kwargs, Mapping):
        raise BioimageioError(f"{where} kwargs must be a mapping, got {kwargs!r}")
    if source.endswith(".py"):
        _check_sha256(folder / source, sha256, f"{where} sha256", folder)
    return f"{source}:{callable_name}", dict(kwargs)


def _local_file(value: object, where: str, folder: Path) -> str:
    """A file named relative to the package folder (URLs are not downloaded)."""
    if not isinstance(value, str) or not value:
        raise BioimageioError(f"'{where}' must name a file in the package folder, got {value!r}")
    if "://" in value:
        raise BioimageioError(
            f"'{where}' is a URL ({value}); napari-gradcam does not download. Download the "
            "file into the package folder and name it there"
        )
    return value


def _check_sha256(path: Path, expected: object, where: str, folder: Path) -> None:
    """The package's own checksum: a mismatch means the file is not the one it describes.

    Only files inside the package folder are read here: a description naming
    ``../elsewhere`` must not make the tool read (and reveal the checksum of) a file outside it
    before the loader's confinement rule has refused it (without trust).
    """
    if expected is None or not path.is_file():
        return  # a missing file is reported, with its resolved path, when it is loaded
    if not path.resolve().is_relative_to(folder.resolve()):
        return  # outside the package: refused by the loader unless trusted, never read here
    actual = hashlib.sha256(path.read_bytes()).hexdigest()
    if str(expected).lower() != actual:
        raise BioimageioError(
            f"{path} does not match its checksum: '{where}' says {expected}, the file has "
            f"{actual}. It was changed or replaced after the package was made; it was not used"
        )


def _axes_letters(tensor: Mapping[str, Any], what: str) -> list[tuple[str, Any]]:
    """The axes as ``[(kind, size), ...]`` with kind one of b, c, s (space), t, i (index)."""
    axes = tensor.get("axes")
    if isinstance(axes, str):  # 0.4
        shape = tensor.get("shape")
        sizes: Sequence[Any]
        if isinstance(shape, list) and len(shape) == len(axes):
            sizes = shape
        elif isinstance(shape, Mapping) and isinstance(shape.get("min"), list) and (
                len(shape["min"]) == len(axes)):
            steps = shape.get("step") or [0] * len(axes)
            sizes = [m if s == 0 else None for m, s in zip(shape["min"], steps, strict=False)]
        else:
            sizes = [None] * len(axes)
        kinds = {"b": "b", "c": "c", "x": "s", "y": "s", "z": "s", "t": "t", "i": "i"}
        if any(letter not in kinds for letter in axes):
            raise BioimageioError(f"{what} axes {axes!r}: unknown axis letter")
        return [(kinds[letter], size) for letter, size in zip(axes, sizes, strict=True)]
    if isinstance(axes, list) and all(isinstance(axis, Mapping) for axis in axes):  # 0.5
        out = []
        for axis in axes:
            kind = {"batch": "b", "channel": "c", "space": "s", "time": "t",
                    "index": "i"}.get(str(axis.get("type")))
            if kind is None:
                raise BioimageioError(f"{what} axis {dict(axis)}: unknown axis type")
            size = len(axis["channel_names"]) if kind == "c" and isinstance(
                axis.get("channel_names"), list) else axis.get("size")
            out.append((kind, size if isinstance(size, int) else None))
        return out
    raise BioimageioError(f"{what} has no readable 'axes' (a string like 'bcyx' or a list)")


def _input_layout(tensor: Mapping[str, Any]) -> tuple[int, int, tuple[int, ...] | None]:
    axes = _axes_letters(tensor, "the input")
    kinds = "".join(kind for kind, _ in axes)
    spatial = kinds[2:]
    if not kinds.startswith("bc") or not spatial or set(spatial) != {"s"} or len(spatial) > 3:
        raise BioimageioError(
            f"the input's axes are {_axes_text(tensor)}; napari-gradcam feeds models a batch "
            "axis, a channel axis, then 1 to 3 spatial axes (b, c, z/y/x)"
        )
    channels = axes[1][1]
    if not isinstance(channels, int) or channels < 1:
        raise BioimageioError(
            f"the input's channel axis has no fixed size ({_axes_text(tensor)}); give the "
            "shape (0.4) or the channel_names (0.5)"
        )
    sizes = [size for _, size in axes[2:]]
    input_size = tuple(sizes) if all(isinstance(s, int) and s > 0 for s in sizes) else None
    return len(spatial), channels, input_size


def _output_layout(tensor: Mapping[str, Any], config: object) -> tuple[str, tuple[str, ...]]:
    axes = tensor.get("axes")
    task = "classification"
    names: tuple[str, ...] = ()
    if isinstance(axes, str):
        task = "segmentation" if set(axes) & set("xyz") else "classification"
    elif isinstance(axes, list):
        types = [axis.get("type") for axis in axes if isinstance(axis, Mapping)]
        task = "segmentation" if "space" in types else "classification"
        for axis in axes:
            if isinstance(axis, Mapping) and axis.get("type") == "channel" and isinstance(
                    axis.get("channel_names"), list):
                names = tuple(str(name) for name in axis["channel_names"])
    if not names and isinstance(config, Mapping):
        ours = config.get("napari_gradcam")
        listed = (ours.get("class_names") if isinstance(ours, Mapping) else None) or config.get(
            "class_names")
        if isinstance(listed, list):
            names = tuple(str(name) for name in listed)
    return task, names


def _axes_text(tensor: Mapping[str, Any]) -> str:
    axes = tensor.get("axes")
    if isinstance(axes, str):
        return repr(axes)
    return "[" + ", ".join(str(axis.get("type")) for axis in axes or [] if isinstance(
        axis, Mapping)) + "]"


def _preprocessing(tensor: Mapping[str, Any], name: str) -> list[dict[str, Any]]:
    """The input's preprocessing as card steps, where napari-gradcam computes the same thing
    (scalar parameters only; per-channel or per-sample steps are named in a warning)."""
    steps: list[dict[str, Any]] = []
    skipped: list[str] = []
    for step in tensor.get("preprocessing") or []:
        if not isinstance(step, Mapping):
            continue
        op = str(step.get("id") or step.get("name") or "")
        kwargs = step.get("kwargs") or {}
        if op == "ensure_dtype":
            continue  # napari-gradcam feeds float32 anyway
        # 0.4: zero_mean_unit_variance with mode: fixed; 0.5: fixed_zero_mean_unit_variance.
        # Both compute (x - mean) / (std + eps).
        fixed = op == "fixed_zero_mean_unit_variance" or (
            op == "zero_mean_unit_variance" and kwargs.get("mode") == "fixed")
        if fixed and _scalars(kwargs, "mean", "std"):
            eps = float(kwargs.get("eps", 1e-6))
            steps.append({"op": "normalize", "mean": float(kwargs["mean"]),
                          "std": float(kwargs["std"]) + eps})
        elif op == "scale_linear" and _scalars(kwargs, "gain", "offset") and float(
                kwargs["gain"]) != 0:
            # gain * x + offset == (x - (-offset / gain)) / (1 / gain)
            gain, offset = float(kwargs["gain"]), float(kwargs["offset"])
            steps.append({"op": "normalize", "mean": -offset / gain, "std": 1.0 / gain})
        else:
            mode = kwargs.get("mode")
            skipped.append(op + (f" ({mode})" if mode else ""))
    if skipped:
        warnings.warn(
            f"bioimage.io model {name!r}: its input preprocessing {', '.join(skipped)} is not "
            "reproduced by napari-gradcam; prepare the image the same way before explaining, "
            "or the maps show how the model treats inputs it was not trained on",
            UserWarning,
            stacklevel=4,
        )
    return steps


def _scalars(kwargs: Mapping[str, Any], *keys: str) -> bool:
    return all(isinstance(kwargs.get(key), (int, float)) and not isinstance(
        kwargs.get(key), bool) for key in keys)
