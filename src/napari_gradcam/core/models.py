"""Loading a model to explain, from whatever the user has, without running untrusted code.

Users arrive with very different files. What each becomes:

* a **model card** (``.yaml``): the architecture is built and a state dict is loaded into it
  from a ``.safetensors`` file or a ``.pt``/``.pth`` file read with
  ``torch.load(weights_only=True)``. Nothing in either file can run code. This is the
  recommended way to share a model. The weights must lie in the card's folder (or below it).
* a **demo model name**: a card shipped in ``napari_gradcam/zoo/``.
* a **bioimage.io package** (a folder with ``rdf.yaml``, or that file): read into a card by
  :mod:`napari_gradcam.core.bioimageio`, whose architecture is the package's ``.py`` file.
* a **torch.export program** (``.pt2``): every pickled part of the archive is first checked
  with torch's weights-only unpickler, then the archive is loaded with ``torch.export.load`` and
  turned back into named submodules by ``torch.export.unflatten``, so forward hooks attach to
  ``features.3`` as on the original model.
* a live ``torch.nn.Module`` (Python API): used as it is.

What could run code is refused unless the user says they trust it (``trust=True``; the CLI's
``--trust``; the widget's trust checkbox), each with a message saying what to do instead:

* a card whose architecture is not one of napari-gradcam's built-ins (``package.module:Name``,
  or ``file.py:Name`` in the card's folder, as bioimage.io packages have): importing the module
  runs it, so it is not even imported without trust;
* a card whose weights lie outside its folder (``../``, absolute paths, symlinks leading out),
  so a card cannot make the tool read other files;
* a ``.pt2`` archive with a pickled part that names anything beyond tensors and plain data (torch
  itself would unpickle it with ``weights_only=False``), or with compiled native code;
* a **pickled whole model** (``torch.save(model)``): unpickling runs whatever code the file
  names.

A **TorchScript** archive is refused even with trust: a ScriptModule does not call Python
forward hooks, so Grad-CAM cannot see its layers. What ran because of trust is listed in
:attr:`LoadedModel.trusted_code` and appended to :attr:`LoadedModel.source`, which every
shell writes into the provenance as ``model_source``.

Every load ends with one dry forward pass that checks the card against the network (input
channels and dimensions, number of classes, task) and picks a default target layer, so a
mistake is reported when the model is opened, not in the middle of a volume.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import hashlib
import importlib
import importlib.resources
import io
import json
import logging
import os
import pickle
import pickletools
import re
import struct
import sys
import types
import warnings
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from napari_gradcam.core.architectures import ARCHITECTURES, build_architecture
from napari_gradcam.core.bioimageio import card_from_rdf, find_rdf
from napari_gradcam.core.device import resolve_device
from napari_gradcam.core.layer_discovery import (
    ORIGINAL_TYPES_ATTRIBUTE,
    ForwardProbe,
    LayerInfo,
    choose_target_layer,
    probe_model,
)
from napari_gradcam.core.model_card import ModelCard, ModelCardError
from napari_gradcam.core.preprocess import Preprocessor

CARD_SUFFIXES = (".yaml", ".yml")
_SHOWN_KEYS = 10

#: Where a card may name a class as ``module:Class`` without trust: napari-gradcam's own
#: architectures module (already imported, so naming it runs nothing new).
BUILTIN_ARCHITECTURE_MODULE = "napari_gradcam.core.architectures"

#: How to say "I trust this file", in each shell; every refusal ends with it.
TRUST_HINT = (
    "If you trust the file and the code it names, load it with load_model(..., trust=True) "
    "(command line: --trust; in napari: tick the widget's trust checkbox)"
)


class ModelLoadError(ValueError):
    """A model file cannot (or may not) be loaded; the message names the file and the fix."""


@dataclass
class LoadedModel:
    """A model ready to explain, with everything needed to feed it and label its maps.

    ``card`` is always complete: ``class_names`` and ``target_layer`` are filled in (from the
    model's output size and :func:`~napari_gradcam.core.layer_discovery.choose_target_layer`)
    when the card or file did not give them. ``feature_layers`` are the layers the dry forward
    pass found, for a layer picker. ``weights_sha256`` identifies the exact weights for
    provenance (``None`` for a live module). ``trusted_code`` lists what was allowed to run
    because of ``trust=True``; it is also appended to ``source``, which the shells record as the
    provenance's ``model_source``.
    """

    model: nn.Module
    card: ModelCard
    preprocess: Preprocessor
    weights_sha256: str | None
    source: str
    feature_layers: tuple[LayerInfo, ...] = ()
    #: What ran only because of ``trust=True`` (a card's architecture module with its file
    #: and SHA-256, a .pt2's pickled parts, a pickled model), for provenance; ``()`` otherwise.
    trusted_code: tuple[str, ...] = ()

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.card.class_names

    @property
    def target_layer(self) -> str:
        return self.card.target_layer or ""


# --------------------------------------------------------------------------------------------
# Public entry points


def load_model(
    source: str | os.PathLike[str] | nn.Module | ModelCard,
    *,
    trust: bool = False,
    device: str | torch.device | None = None,
) -> LoadedModel:
    """Load a model card, demo model name, ``.pt2`` export, or live module (see module doc).

    ``trust=True`` allows what can run code or read other files: pickled whole models, cards
    whose architecture is not built in or whose weights lie outside the card's folder, and
    ``.pt2`` archives with pickled objects or native code. ``device``: ``None`` keeps the model
    where it is (CPU for files), ``"auto"`` picks the best accelerator, or a torch device string.
    """
    if isinstance(source, nn.Module):
        return _load_live_module(source, device)
    if isinstance(source, ModelCard):
        return _load_card(source, trust=trust, device=device, source=f"<card {source.name}>")
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(
            "load_model takes a model card path (.yaml), a demo model name, a .pt2 export, a "
            f"pickled model file or a torch.nn.Module, not {type(source).__name__}"
        )
    path = Path(source).expanduser()
    if not path.exists():
        text = os.fspath(source)
        if not any(sep in text for sep in ("/", "\\")) and path.suffix.lower() not in (
            *CARD_SUFFIXES, ".pt", ".pth", ".pt2", ".safetensors", ".bin", ".ckpt"
        ):
            card = find_demo_card(text)
            return _load_card(card, trust=trust, device=device, source=f"demo:{card.name}")
        raise FileNotFoundError(f"model file not found: {path.resolve()}")
    rdf = find_rdf(path)
    if rdf is not None:  # a bioimage.io package (its folder or its rdf.yaml)
        card = card_from_rdf(rdf)
        return _load_card(card, trust=trust, device=device, source=str(rdf.resolve()))
    if path.is_dir():
        raise ModelLoadError(
            f"{path.resolve()} is a folder; give a model card (.yaml), a model file (.pt2) or "
            "a bioimage.io package (a folder with rdf.yaml)"
        )
    path = path.resolve()
    if path.suffix.lower() in CARD_SUFFIXES:
        card = ModelCard.from_yaml(path)
        return _load_card(card, trust=trust, device=device, source=str(path))
    return _load_model_file(path, trust=trust, device=device)


def list_demo_models() -> list[ModelCard]:
    """The model cards shipped in ``napari_gradcam/zoo/``, sorted by name."""
    folder = _zoo_folder()
    if folder is None:
        return []
    cards = [ModelCard.from_yaml(path) for path in sorted(folder.glob("*.yaml"))]
    return sorted(cards, key=lambda card: card.name)


def find_demo_card(name: str) -> ModelCard:
    """The shipped card called ``name``; a typo gets the closest demo name suggested."""
    cards = {card.name: card for card in list_demo_models()}
    if name in cards:
        return cards[name]
    close = difflib.get_close_matches(name, list(cards), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    known = ", ".join(cards) or "none are installed"
    raise FileNotFoundError(
        f"{name!r} is neither a file nor a demo model.{hint} Demo models: {known}"
    )


def file_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file, streamed (weights can be large), for provenance."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _zoo_folder() -> Path | None:
    root = importlib.resources.files("napari_gradcam") / "zoo"
    if not root.is_dir():
        return None
    # The package is installed as plain files (setuptools package-data), so this is a real
    # folder; the cards need one, as their weight paths are relative to it.
    return Path(str(root))


# --------------------------------------------------------------------------------------------
# Model cards


def _load_card(
    card: ModelCard, *, trust: bool, device: str | torch.device | None, source: str
) -> LoadedModel:
    model, trusted_code = _build_from_card(card, trust=trust, source=source)
    digest = None
    if card.weights is not None:
        weights = confined_weights_path(card, trust=trust, source=source)
        if not weights.is_file():
            raise FileNotFoundError(
                f"model card {card.name!r}: weights file not found: {weights} (the card says "
                f"weights: {card.weights!r}, relative to the card's folder)"
            )
        state, ran = _read_state_dict(weights, trust)
        trusted_code += ran
        load_weights_checked(model, state, weights, card)
        digest = file_sha256(weights)
    model.eval()
    model.to(resolve_device(device, model))
    return _finish(model, card, digest, source, input_batch=1, trusted_code=trusted_code)


def confined_weights_path(card: ModelCard, *, trust: bool = False, source: str = "") -> Path:
    """The card's weights file, refused (without trust) when it lies outside the card's folder.

    A card is a small text file that travels on its own; if it could name
    ``../other_project/secret.safetensors`` or ``/home/me/...`` (or a symlink leading there), a
    downloaded card would make the tool read, hash and report on files the user never chose.
    The check is on the fully resolved path (``..`` and symlinks followed). A card built in
    Python without a folder (``base_dir=None``) is the caller's own code and is not confined.
    """
    weights = card.weights_path
    assert weights is not None
    if trust or card.base_dir is None:
        return weights
    folder = card.base_dir.resolve()
    if not weights.is_relative_to(folder):
        where = source or str(folder)
        raise ModelLoadError(
            f"model card {card.name!r} ({where}): weights {card.weights!r} lie outside the "
            f"card's folder {folder} (they resolve to {weights}). A card may only read weights "
            "from its own folder or below it, so that a card from elsewhere cannot make "
            "napari-gradcam read other files; put the weights next to the card and write a "
            f"relative path. {TRUST_HINT}."
        )
    return weights


def is_custom_architecture(spec: str) -> bool:
    """True when a card's architecture is code outside napari-gradcam's built-ins.

    Built-in: a name from :data:`~napari_gradcam.core.architectures.ARCHITECTURES`, or
    ``napari_gradcam.core.architectures:Class``. Anything else (``somemodule:Net``) is a module
    that importing would run, so it needs trust.
    """
    if ":" not in spec:
        return False
    module_name, _, attribute = spec.partition(":")
    if module_name != BUILTIN_ARCHITECTURE_MODULE:
        return True
    from napari_gradcam.core import architectures

    found = getattr(architectures, attribute, None)
    return not (isinstance(found, type) and issubclass(found, nn.Module))


def _module_record(spec: str, module: Any) -> str:
    """``"architecture somemodule:Net from /path/somemodule.py (sha256 ...)"``, for provenance."""
    file = getattr(module, "__file__", None)
    digest = getattr(module, _SOURCE_SHA256_ATTRIBUTE, None)
    if not file or not Path(file).is_file():
        return f"architecture {spec} (module {module.__name__}, no source file)"
    path = Path(file).resolve()
    return f"architecture {spec} from {path} (sha256 {digest or file_sha256(path)})"


_SOURCE_SHA256_ATTRIBUTE = "__napari_gradcam_sha256__"


def _architecture_file(card: ModelCard, written: str, source: str) -> Path:
    """A card's ``file.py`` architecture, which must lie in the card's folder (even with trust:
    a package's code is the code that came with it, not whatever a path can reach)."""
    folder = (card.base_dir or Path.cwd()).resolve()
    path = (folder / Path(written).expanduser()).resolve()
    where = f"model card {card.name!r} ({source or folder})"
    if not path.is_relative_to(folder):
        raise ModelLoadError(
            f"{where}: architecture file {written!r} lies outside the card's folder {folder} "
            f"(it resolves to {path}); an architecture file must come with the card, in its "
            "folder"
        )
    if not path.is_file():
        raise ModelLoadError(f"{where}: architecture file not found: {path}")
    return path


def _module_from_file(path: Path) -> Any:
    """Execute a trusted architecture file as a module of its own (not on ``sys.path``).

    The bytes are read once: the SHA-256 recorded for provenance is that of the code that ran.
    """
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    stem = re.sub(r"\W", "_", path.stem)
    name = f"_napari_gradcam_architecture_{stem}_{digest[:16]}"
    if name in sys.modules:
        return sys.modules[name]
    module = types.ModuleType(name)
    module.__file__ = str(path)
    setattr(module, _SOURCE_SHA256_ATTRIBUTE, digest)
    sys.modules[name] = module  # dataclasses and pickling look classes up here
    try:
        exec(compile(data, str(path), "exec"), module.__dict__)  # reached only with trust
    except Exception as error:
        del sys.modules[name]
        raise ModelLoadError(
            f"architecture file {path} failed while it was executed ({type(error).__name__}: "
            f"{error})"
        ) from error
    return module


def _import_factory(spec: str, trust: bool, card: ModelCard, source: str = ""
                    ) -> tuple[Any, str | None]:
    """The callable a ``module:Name`` or ``file.py:Name`` architecture names, and (for code
    outside the built-ins) the record of what ran, for provenance."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ModelCardError(
            f"architecture {spec!r}: write a built-in name ({', '.join(ARCHITECTURES)}), "
            "'package.module:ClassName' or 'file.py:ClassName'"
        )
    custom = is_custom_architecture(spec)
    if not trust and custom:
        # Refused before importing: the import itself runs the module's code.
        where = f"model card {card.name!r}" + (f" ({source})" if source else "")
        doing, done = ("executing", "executed") if module_name.endswith(".py") else (
            "importing", "imported")
        raise ModelLoadError(
            f"{where}: architecture {spec!r} is not one of napari-gradcam's built-in "
            f"architectures ({', '.join(ARCHITECTURES)}); it is Python code, and {doing} "
            f"{module_name!r} would run it with your user's rights. It was not {done}. "
            f"{TRUST_HINT}."
        )
    if module_name.endswith(".py"):
        module = _module_from_file(_architecture_file(card, module_name, source))
    else:
        try:
            module = importlib.import_module(module_name)
        except ImportError as error:
            raise ModelLoadError(
                f"architecture {spec!r}: cannot import module {module_name!r} ({error}). "
                "Install the package that defines the network, or put its folder on PYTHONPATH"
            ) from error
    factory: Any = module
    for part in attribute.split("."):
        if not hasattr(factory, part):
            raise ModelLoadError(
                f"architecture {spec!r}: module {module_name!r} has no attribute {attribute!r}"
            )
        factory = getattr(factory, part)
    if not callable(factory):
        raise ModelLoadError(f"architecture {spec!r} is not callable")
    return factory, _module_record(spec, module) if custom else None


def build_from_card(card: ModelCard, *, trust: bool = False, source: str = "") -> nn.Module:
    """Instantiate the card's architecture with its ``architecture_kwargs`` (no weights).

    A built-in architecture needs no trust; any other (``module:Name`` or ``file.py:Name`` in
    the card's folder; a class or a factory function) is imported and called only with
    ``trust=True``. ``source`` (the card's file) only makes messages name it.
    """
    return _build_from_card(card, trust=trust, source=source)[0]


def _build_from_card(card: ModelCard, *, trust: bool, source: str
                     ) -> tuple[nn.Module, list[str]]:
    """:func:`build_from_card`, plus what ran because of trust (for provenance)."""
    kwargs = dict(card.architecture_kwargs)
    record = None
    if ":" not in card.architecture:
        if card.architecture not in ARCHITECTURES:
            close = difflib.get_close_matches(card.architecture, list(ARCHITECTURES), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ModelCardError(
                f"model card {card.name!r}: unknown architecture {card.architecture!r}{hint}. "
                f"Built-in: {', '.join(ARCHITECTURES)}; for your own network write "
                "'package.module:ClassName' or 'file.py:ClassName' (loaded only with trust)"
            )
        factory: Any = ARCHITECTURES[card.architecture]
    else:
        factory, record = _import_factory(card.architecture, trust, card, source)
    try:
        model = (
            build_architecture(card.architecture, **kwargs)
            if ":" not in card.architecture else factory(**kwargs)
        )
    except TypeError as error:
        raise ModelCardError(
            f"model card {card.name!r}: architecture_kwargs {kwargs} do not fit "
            f"{card.architecture!r} ({error})"
        ) from error
    if not isinstance(model, nn.Module):
        raise ModelLoadError(
            f"architecture {card.architecture!r} returned a {type(model).__name__}, not a "
            "torch.nn.Module"
        )
    return model, [record] if record else []


def _natural(name: str) -> list[Any]:
    """Sort key that puts features.2 before features.10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _short(names: list[str]) -> str:
    names = sorted(names, key=_natural)
    shown = ", ".join(names[:_SHOWN_KEYS])
    return shown + (f", ... ({len(names) - _SHOWN_KEYS} more)" if len(names) > _SHOWN_KEYS else "")


def load_weights_checked(
    model: nn.Module, state: Mapping[str, torch.Tensor], path: Path, card: ModelCard | None = None
) -> None:
    """``load_state_dict(strict=True)``, with a message that says exactly what does not fit."""
    expected = model.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    mismatched = [
        f"{key}: model expects {tuple(expected[key].shape)}, file has {tuple(state[key].shape)}"
        for key in expected
        if key in state and tuple(expected[key].shape) != tuple(state[key].shape)
    ]
    if missing or unexpected or mismatched:
        what = f"architecture {card.architecture!r} with {dict(card.architecture_kwargs)}" if (
            card is not None) else type(model).__name__
        lines = [f"the weights in {path} do not fit {what}:"]
        if missing:
            lines.append(f"  missing keys (in the model, not in the file): {_short(missing)}")
        if unexpected:
            lines.append(f"  unexpected keys (in the file, not in the model): {_short(unexpected)}")
        if mismatched:
            lines.append("  shape mismatches: " + "; ".join(mismatched[:_SHOWN_KEYS]))
        lines.append(
            "Check the card's architecture and architecture_kwargs (widths, num_classes, "
            "in_channels, spatial_dims) against the script that trained the weights."
        )
        raise ModelLoadError("\n".join(lines))
    model.load_state_dict(state, strict=True)


# --------------------------------------------------------------------------------------------
# Recognising and reading files


def sniff_format(path: Path) -> str:
    """What a model file is, from its contents (extensions lie): ``"torchscript"``,
    ``"export"`` (.pt2), ``"torch"`` (torch.save zip or legacy pickle), ``"safetensors"`` or
    ``"unknown"``."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
            parts = [name.split("/") for name in names]
            if any("code" in p[:-1] or p[-1] == "constants.pkl" for p in parts):
                return "torchscript"
            if any(p[-1] in ("archive_format", "serialized_exported_program.json")
                   or ("models" in p[:-1] and p[-1].endswith(".json")) for p in parts):
                return "export"
            if any(p[-1] == "data.pkl" for p in parts):
                return "torch"
            return "unknown"
        with open(path, "rb") as handle:
            head = handle.read(9)
    except (OSError, zipfile.BadZipFile) as error:
        raise ModelLoadError(f"cannot read {path}: {error}") from error
    if len(head) == 9 and head[8:9] == b"{":
        (header_length,) = struct.unpack("<Q", head[:8])
        if 0 < header_length < path.stat().st_size:
            return "safetensors"
    if head[:1] == b"\x80":  # pickle protocol marker: torch.save's legacy format
        return "torch"
    return "unknown"


def _torchscript_error(path: Path) -> ModelLoadError:
    return ModelLoadError(
        f"{path} is a TorchScript archive (torch.jit.save). Grad-CAM needs forward hooks on "
        "named layers, and hooks cannot be attached to the layers of a ScriptModule. Export "
        "the model instead: ep = torch.export.export(model.eval(), (example_input,)); "
        "torch.export.save(ep, 'model.pt2'), then load the .pt2; or save model.state_dict() "
        "and write a model card that names the architecture."
    )


def _corrupt_error(path: Path, error: BaseException) -> ModelLoadError:
    return ModelLoadError(
        f"cannot read {path}: it looks truncated or corrupt ({type(error).__name__}: "
        f"{str(error).splitlines()[0] if str(error) else ''}). Copy or save the file again."
    )


def _pickled_code_error(path: Path, error: BaseException) -> ModelLoadError:
    found = re.search(r"GLOBAL ([\w.]+)", str(error))
    names = f" (it refers to {found.group(1)})" if found else ""
    return ModelLoadError(
        f"{path} is a pickled Python object, e.g. a whole model saved with torch.save(model)"
        f"{names}. Unpickling runs whatever code the file names, so it can do anything your "
        "user account can; it is refused by default. If you trust where the file came from, "
        "load it with load_model(path, trust=True) (in the GUI: tick 'trust this file'). "
        "Safer to share: model.state_dict() plus a model card, or a torch.export .pt2."
    )


def _is_weights_only_refusal(error: BaseException) -> bool:
    return isinstance(error, pickle.UnpicklingError) and "weights only load failed" in str(
        error
    ).lower()


def _torch_load(path: Path, trust: bool) -> tuple[Any, bool]:
    """``torch.load`` safely, and unsafely only with ``trust``; errors say which happened.

    Returns the object and whether the full (code-running) unpickler was needed.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        try:
            return torch.load(path, map_location="cpu", weights_only=True), False
        except Exception as error:
            if not _is_weights_only_refusal(error):
                raise _corrupt_error(path, error) from error
            if not trust:
                raise _pickled_code_error(path, error) from None
        try:
            return torch.load(path, map_location="cpu", weights_only=False), True
        except (ImportError, AttributeError) as error:
            raise ModelLoadError(
                f"{path} is a pickled model whose code is not available here ({error}). "
                "Install or import the package that defines the model class, then try again"
            ) from error
        except Exception as error:
            raise _corrupt_error(path, error) from error


def _unwrap_checkpoint(obj: Any) -> Any:
    # Training loops often save {"state_dict": ..., "epoch": ..., "optimizer": ...}.
    if isinstance(obj, Mapping) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in ("state_dict", "model_state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                return obj[key]
    return obj


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def read_state_dict(path: Path, *, trust: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` or ``torch.save`` state-dict file (never runs code
    unless ``trust``)."""
    return _read_state_dict(path, trust)[0]


def _pickle_record(path: Path) -> str:
    return f"pickled objects in {path} (sha256 {file_sha256(path)}), unpickled in full"


def _read_state_dict(path: Path, trust: bool) -> tuple[dict[str, torch.Tensor], list[str]]:
    """:func:`read_state_dict`, plus what ran because of trust (for provenance)."""
    kind = sniff_format(path)
    if kind == "torchscript":
        raise _torchscript_error(path)
    if kind == "export":
        raise ModelLoadError(
            f"{path} is a torch.export program (.pt2), not a state dict; load it directly with "
            "load_model(path) rather than through a model card"
        )
    if kind == "safetensors" or path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path), device="cpu")), []
        except Exception as error:
            raise _corrupt_error(path, error) from error
    obj, ran_code = _torch_load(path, trust)
    trusted_code = [_pickle_record(path)] if ran_code else []
    if isinstance(obj, nn.Module):  # only reachable with trust=True
        return dict(obj.state_dict()), trusted_code
    obj = _unwrap_checkpoint(obj)
    if not _is_state_dict(obj):
        raise ModelLoadError(
            f"{path} holds a {type(obj).__name__}, not a state dict (a mapping of parameter "
            "names to tensors); save model.state_dict()"
        )
    return dict(obj), trusted_code


def _load_model_file(path: Path, *, trust: bool, device: str | torch.device | None
                     ) -> LoadedModel:
    kind = sniff_format(path)
    if kind == "torchscript":
        raise _torchscript_error(path)
    if kind == "export":
        return _load_export(path, device, trust)
    if kind == "safetensors":
        raise ModelLoadError(
            f"{path} holds weights only, not the network. Write a model card (.yaml) next to "
            f"it with 'weights: {path.name}' and the architecture, and load the card"
        )
    if kind == "unknown":
        raise ModelLoadError(
            f"{path} is not a format napari-gradcam can load (model card .yaml, torch.export "
            ".pt2, safetensors or torch.save file), or it is corrupt"
        )
    obj, ran_code = _torch_load(path, trust)
    if isinstance(obj, nn.Module):
        model = obj.eval()
        model.to(resolve_device(device, model))
        card = _inferred_card(model, name=path.stem, source=path, architecture=_class_path(model))
        return _finish(model, card, file_sha256(path), str(path), input_batch=1, inferred=True,
                       trusted_code=[_pickle_record(path)] if ran_code else [])
    if _is_state_dict(_unwrap_checkpoint(obj)):
        raise ModelLoadError(
            f"{path} holds a state dict (weights only), not the network. Write a model card "
            f"(.yaml) with 'weights: {path.name}' and the architecture that matches it, and "
            "load the card"
        )
    raise ModelLoadError(
        f"{path} holds a {type(obj).__name__}, not a torch.nn.Module or state dict"
    )


# --------------------------------------------------------------------------------------------
# torch.export programs


def _export_input(ep: Any, path: Path) -> tuple[tuple[int, ...], tuple[bool, ...]]:
    """The example input's shape and which of its axes the program fixed."""
    user_inputs = list(ep.graph_signature.user_inputs)
    if len(user_inputs) != 1:
        raise ModelLoadError(
            f"{path} takes {len(user_inputs)} inputs; napari-gradcam explains models that take "
            "one image tensor (N, C, *spatial)"
        )
    node = next(n for n in ep.graph.nodes if n.op == "placeholder" and n.name == user_inputs[0])
    symbolic = tuple(node.meta["val"].shape)
    static = tuple(isinstance(size, int) for size in symbolic)
    example = getattr(ep, "example_inputs", None)
    if example and example[0] and isinstance(example[0][0], torch.Tensor):
        shape = tuple(example[0][0].shape)
    else:
        shape = tuple(
            int(size) if is_static else 64 for size, is_static in zip(symbolic, static, strict=True)
        )
    if len(shape) not in (3, 4, 5) or not static[1]:
        raise ModelLoadError(
            f"{path} takes an input of shape {symbolic}; napari-gradcam needs (N, C, *spatial) "
            "with 1 to 3 spatial axes and a fixed channel count"
        )
    return shape, static


def _original_types(program: Any) -> dict[str, str]:
    """``{layer name: "package.module.Class"}`` as recorded by torch.export for each module."""
    types: dict[str, str] = {}
    for node in program.graph.nodes:
        for entry in (node.meta.get("nn_module_stack") or {}).values():
            name, type_path = entry[0], entry[1]
            if isinstance(type_path, type):
                type_path = f"{type_path.__module__}.{type_path.__qualname__}"
            types.setdefault(str(name), str(type_path))
    return types


_NATIVE_CODE_SUFFIXES = (".so", ".dll", ".dylib", ".pyd")
_ZIP_MAGIC = b"PK\x03\x04"


def _archive_part(name: str) -> str:
    """A record's name inside a .pt2 without the archive's own top folder (``model/...``)."""
    return name.split("/", 1)[1] if "/" in name else name


def _pickle_globals(blob: bytes) -> list[str]:
    """The ``module.name`` globals a pickle (or a ``torch.save`` zip's ``data.pkl``) imports,
    read with :mod:`pickletools` (which only parses, never executes), for messages."""
    if blob[:4] == _ZIP_MAGIC:
        try:
            with zipfile.ZipFile(io.BytesIO(blob)) as inner:
                name = next(n for n in inner.namelist() if n.endswith("data.pkl"))
                blob = inner.read(name)
        except (zipfile.BadZipFile, StopIteration):
            return []
    names: list[str] = []
    strings: list[str] = []  # recent string pushes: STACK_GLOBAL takes the last two
    try:
        for opcode, argument, _ in pickletools.genops(blob):
            if opcode.name == "GLOBAL" and isinstance(argument, str):
                names.append(".".join(argument.split(" ", 1)))
            elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                names.append(f"{strings[-2]}.{strings[-1]}")
            elif isinstance(argument, str) and "UNICODE" in opcode.name:
                strings.append(argument)
    except Exception:  # a damaged pickle: report what was found before the damage
        pass
    # protocol 2 writes Python 3's builtins under their Python 2 name
    names = [re.sub(r"^__builtin__\.", "builtins.", name) for name in names]
    return list(dict.fromkeys(names))


def _is_tensor_rebuild(name: str) -> bool:
    """The globals every tensor pickle names (left out of messages, which name the others)."""
    return name.startswith(("torch._utils._rebuild", "collections.OrderedDict")) or (
        name.startswith("torch.") and name.endswith("Storage"))


def _pickle_refusal(blob: bytes) -> str | None:
    """Why unpickling ``blob`` (a ``torch.save`` payload) could run code, or ``None`` if
    torch's weights-only unpickler reads it (tensors, containers, numbers, strings only).

    Anything the weights-only unpickler cannot read is refused, not only what it names as
    unsafe: torch.export falls back to the full unpickler on *any* failure.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    except Exception as error:
        named = [name for name in _pickle_globals(blob) if not _is_tensor_rebuild(name)]
        if named:
            return (f"is a pickle that names {', '.join(named)}, which unpickling would import "
                    "and call")
        first = str(error).splitlines()[0] if str(error) else ""
        return ("is not a plain tensor pickle (torch's weights-only unpickler refuses it: "
                f"{type(error).__name__}: {first}); torch would unpickle it in full")
    return None


def _export_config_parts(archive: zipfile.ZipFile) -> tuple[dict[str, str], set[str]]:
    """From the weights/constants configs: ``{part: why it is unsafe}`` for objects that torch
    unpickles with no safe mode at all, and the set of parts it unpickles with ``torch.load``."""
    unsafe: dict[str, str] = {}
    pickled: set[str] = set()
    for name in archive.namelist():
        part = _archive_part(name)
        folder, _, file = part.rpartition("/")
        if folder not in ("data/weights", "data/constants") or not file.endswith("config.json"):
            continue
        try:
            config = json.loads(archive.read(name)).get("config", {})
        except (ValueError, AttributeError):
            unsafe[part] = "is not a valid payload config (JSON)"
            continue
        for entry in config.values() if isinstance(config, dict) else ():
            entry = entry if isinstance(entry, dict) else {}
            target = f"{folder}/{entry.get('path_name', '')}"
            path_name = str(entry.get("path_name", ""))
            if path_name.startswith(("custom_obj", "opaque_obj")):
                # torchbind objects and arbitrary Python objects: read with the TorchScript
                # or the plain unpickler, neither of which has a safe mode
                unsafe[target] = "is a pickled Python object (not a tensor)"
            elif entry.get("use_pickle"):
                pickled.add(target)
    return unsafe, pickled


def export_archive_refusals(data: bytes) -> dict[str, str]:
    """The parts of a ``.pt2`` archive that ``torch.export.load`` would run code from.

    ``{part name: reason}``; empty when the archive holds only JSON, raw tensor bytes and
    pickles that torch's weights-only unpickler reads. torch itself unpickles the example
    inputs and pickled weights/constants with ``weights_only=False`` and loads AOTInductor
    libraries, so each of those is checked here first, together with any other record that
    is a ``torch.save`` payload or a pickle.
    """
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile as error:
        return {"(archive)": f"is not a readable zip archive ({error})"}
    with archive:
        refusals, pickled = _export_config_parts(archive)
        for name in archive.namelist():
            if name.endswith("/"):
                continue
            part = _archive_part(name)
            if part in refusals:
                named = _pickle_globals(archive.read(name))
                if named and "names" not in refusals[part]:
                    refusals[part] += f" that names {', '.join(named)}"
                continue
            if part.startswith("data/aotinductor/") or part.lower().endswith(
                    _NATIVE_CODE_SUFFIXES):
                refusals[part] = "is compiled native code (AOTInductor), which loading would run"
                continue
            blob = archive.read(name)
            # .pt records are torch.save payloads (example inputs, legacy weights); the rest
            # are checked when they look like one (a nested zip, or a pickle's protocol mark)
            if part in pickled or part.endswith(".pt") or blob[:4] == _ZIP_MAGIC or (
                    blob[:1] == b"\x80" and not _is_raw_tensor_part(part)):
                reason = _pickle_refusal(blob)
                if reason:
                    refusals[part] = reason
    return refusals


def _is_raw_tensor_part(part: str) -> bool:
    """Raw tensor bytes (``data/weights/weight_0`` listed without ``use_pickle``) can start with
    any byte, including a pickle's; torch reads them with ``torch.frombuffer``, not pickle."""
    folder, _, file = part.rpartition("/")
    if folder not in ("data/weights", "data/constants"):
        return False
    return not file.endswith((".json", ".pt", ".pkl"))


def _export_refusal_error(path: Path, refusals: dict[str, str]) -> ModelLoadError:
    lines = [f"{path} is a torch.export archive that would run code when loaded; it was not "
             "loaded:"]
    lines += [f"  part {part!r} {reason}" for part, reason in sorted(refusals.items())]
    lines.append(
        "torch.export.load would unpickle these parts in full (weights_only=False) or load "
        "their native code, which can do anything your user account can. Export plain tensor "
        "models (no custom objects), or share model.state_dict() with a model card. "
        f"{TRUST_HINT}."
    )
    return ModelLoadError("\n".join(lines))


@contextlib.contextmanager
def _quiet_export_fallback_log() -> Iterator[None]:
    """Silence torch.export's "fallback to weights_only=False" warning while a (trusted)
    archive loads: trusted_code records it, and torch's own log call has a format bug
    (two %s, one argument) that makes logging raise under handlers that re-raise errors."""
    logger = logging.getLogger("torch._export.serde.serialize")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _load_export(path: Path, device: str | torch.device | None, trust: bool = False
                 ) -> LoadedModel:
    # Read once: the bytes that were checked are the bytes that are loaded and hashed.
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ModelLoadError(f"cannot read {path}: {error}") from error
    refusals = export_archive_refusals(data)
    if refusals and not trust:
        raise _export_refusal_error(path, refusals)
    digest = hashlib.sha256(data).hexdigest()
    trusted_code = [f"{part} in {path} (sha256 {digest}): {reason}"
                    for part, reason in sorted(refusals.items())]
    try:
        with warnings.catch_warnings(), _quiet_export_fallback_log():
            warnings.simplefilter("ignore", FutureWarning)
            program = torch.export.load(io.BytesIO(data))
    except Exception as error:
        raise _corrupt_error(path, error) from error
    shape, static = _export_input(program, path)
    if static[0] and shape[0] != 1:
        warnings.warn(
            f"{path.name} was exported with a fixed batch size of {shape[0]}: only batches of "
            "exactly that size can be explained. Re-export with dynamic_shapes="
            "({0: torch.export.Dim('batch')},) to explain any number of slices at once",
            UserWarning,
            stacklevel=3,
        )
    # unflatten restores the module hierarchy (features.3 ...) that forward hooks attach to.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model = torch.export.unflatten(program)
    setattr(model, ORIGINAL_TYPES_ATTRIBUTE, _original_types(program))
    model.eval()
    model.to(resolve_device(device, model))
    spatial = shape[2:]
    card = _inferred_card(
        model,
        name=path.stem,
        source=path,
        architecture="torch.export program",
        spatial_dims=len(spatial),
        in_channels=shape[1],
        input_size=spatial if all(static[2:]) else None,
    )
    return _finish(model, card, digest, str(path), input_batch=shape[0],
                   probe_size=spatial, inferred=True, trusted_code=trusted_code)


# --------------------------------------------------------------------------------------------
# Live modules and cards inferred from a network


def _load_live_module(model: nn.Module, device: str | torch.device | None) -> LoadedModel:
    # No model.eval() here: a live module stays as the user left it; every explanation runs
    # in eval mode inside preserved_model_state and restores the mode afterwards.
    if device is not None:
        model.to(resolve_device(device, model))
    card = _inferred_card(model, name=type(model).__name__, source=None,
                          architecture=_class_path(model))
    return _finish(model, card, None, f"<live {type(model).__name__}>", input_batch=1,
                   inferred=True)


def _class_path(model: nn.Module) -> str:
    return f"{type(model).__module__}:{type(model).__qualname__}"


_CONV_DIMS = {
    nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3,
    nn.ConvTranspose1d: 1, nn.ConvTranspose2d: 2, nn.ConvTranspose3d: 3,
}


def infer_input_layout(model: nn.Module) -> tuple[int, int]:
    """``(spatial_dims, in_channels)`` from the first convolution: what the model expects."""
    for module in model.modules():
        for conv_type, dims in _CONV_DIMS.items():
            if type(module) is conv_type or isinstance(module, conv_type):
                return dims, int(module.in_channels)
    # No nn.ConvNd (e.g. an exported graph): a conv weight is (out, in / groups, *kernel).
    for name, param in model.named_parameters():
        if name.endswith("weight") and param.ndim in (3, 4, 5):
            return param.ndim - 2, int(param.shape[1])
    raise ModelLoadError(
        f"cannot tell what input {type(model).__name__} takes (no convolution found); write a "
        "model card with spatial_dims and in_channels"
    )


def _inferred_card(
    model: nn.Module,
    *,
    name: str,
    source: Path | None,
    architecture: str,
    spatial_dims: int | None = None,
    in_channels: int | None = None,
    input_size: tuple[int, ...] | None = None,
) -> ModelCard:
    if spatial_dims is None or in_channels is None:
        spatial_dims, in_channels = infer_input_layout(model)
    described = f"from {source.name}" if source is not None else "a live module"
    return ModelCard(
        name=name,
        description=f"{type(model).__name__} {described}, without a model card",
        architecture=architecture,
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        task="classification",  # provisional; _finish decides from the output shape
        weights=None if source is None else source.name,
        input_size=input_size,
        base_dir=None if source is None else source.parent,
    )


# --------------------------------------------------------------------------------------------
# The dry run that checks a card against its network


def _finish(
    model: nn.Module,
    card: ModelCard,
    digest: str | None,
    source: str,
    *,
    input_batch: int,
    probe_size: tuple[int, ...] | None = None,
    inferred: bool = False,
    trusted_code: list[str] | None = None,
) -> LoadedModel:
    """Dry-run the model, check the card against what it returned, and fill in its gaps.

    ``inferred`` cards (no card file: .pt2, pickled or live models) take their task from the
    output shape; a written card that disagrees with its network is an error. What ran
    because of trust (``trusted_code``) is appended to ``source``, so that the provenance the
    shells write (``model_source``) says so.
    """
    try:
        probe = probe_model(model, card.spatial_dims, card.in_channels,
                            probe_size or card.input_size, batch_size=input_batch)
    except ValueError as error:
        raise ModelLoadError(f"model {card.name!r} ({source}): {error}") from error
    card = _complete_card(card, probe, model, inferred=inferred)
    trusted = tuple(trusted_code or ())
    if trusted:
        source = f"{source} (trusted code: {'; '.join(trusted)})"
    return LoadedModel(
        model=model,
        card=card,
        preprocess=Preprocessor.from_card(card),
        weights_sha256=digest,
        source=source,
        feature_layers=probe.layers,
        trusted_code=trusted,
    )


def _complete_card(card: ModelCard, probe: ForwardProbe, model: nn.Module, inferred: bool
                   ) -> ModelCard:
    output = probe.output_shape
    spatial_dims = card.spatial_dims
    if output is None:
        raise ModelLoadError(f"model {card.name!r} returned no tensor on a dummy input")
    if card.task == "regression" and len(output) in (1, 2):
        task = "regression"  # a classifier's (N, K) shape: only the card can tell them apart
    elif len(output) == 2:
        task = "classification"
    elif len(output) == 2 + spatial_dims:
        task = "segmentation"
    else:
        raise ModelLoadError(
            f"model {card.name!r} returns shape {output}; napari-gradcam explains classifiers "
            f"(N, classes), segmenters (N, classes, *spatial) with {spatial_dims} spatial axes "
            "and regression models (N, properties) with task: regression"
        )
    if task != card.task:
        if not inferred:
            raise ModelCardError(
                f"model card {card.name!r} says task: {card.task}, but the model returns shape "
                f"{output}, which is {task} output; set task: {task}"
            )
        card = dataclasses.replace(card, task=task)
    classes = output[1] if len(output) > 1 else 1
    what = "values" if task == "regression" else "classes"
    if card.class_names and len(card.class_names) != classes:
        raise ModelCardError(
            f"model card {card.name!r} lists {len(card.class_names)} class_names "
            f"({', '.join(card.class_names)}) but the model outputs {classes} {what}"
        )
    if not card.class_names:
        stem = "output" if task == "regression" else "class"
        card = dataclasses.replace(card, class_names=tuple(f"{stem} {i}" for i in range(classes)))
    if card.target_layer:
        names = dict(model.named_modules())
        if card.target_layer not in names:
            close = difflib.get_close_matches(card.target_layer, [n for n in names if n], n=3)
            hint = f" Close names: {', '.join(close)}." if close else ""
            shown = ", ".join(layer.name for layer in probe.layers[-8:])
            raise ModelCardError(
                f"model card {card.name!r}: target_layer {card.target_layer!r} is not a layer of "
                f"the model.{hint} The last feature-map layers are: {shown}"
            )
    else:
        card = dataclasses.replace(card, target_layer=choose_target_layer(probe))
    return card

