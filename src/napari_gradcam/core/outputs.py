"""Which of a model's outputs is explained, when it returns more than one tensor.

Many real models return a tuple or a dict: MONAI's ``ViT`` gives ``(logits, hidden_states)``,
deep-supervision U-Nets give a list of maps, Hugging Face models a ``ModelOutput`` (a dict with
``"logits"``). A CAM differentiates one score taken from one tensor, so the user names it with
``output=`` (an index for a tuple or list, a key for a dict or named tuple). When nothing is
named and exactly one tensor is there it is taken; when there are several the error lists the
candidates with their shapes, because guessing the wrong head silently explains the wrong thing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

OutputSpec = None | int | str
"""``None`` (the only tensor), an index into a tuple/list, or a key of a dict/named tuple."""


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor {tuple(value.shape)}"
    if isinstance(value, (list, tuple)):
        return f"{type(value).__name__} of {len(value)}"
    if isinstance(value, Mapping):
        return f"dict of {len(value)}"
    return type(value).__name__


def _entries(outputs: object) -> list[tuple[int | str, object]]:
    """(index or key, value) pairs of a tuple, list, named tuple or mapping."""
    if isinstance(outputs, Mapping):
        return [(str(key), value) for key, value in outputs.items()]
    fields = getattr(outputs, "_fields", None)
    if isinstance(outputs, tuple) and fields is not None:  # a named tuple: its names count too
        return list(zip(fields, outputs, strict=True))
    return list(enumerate(outputs))  # type: ignore[arg-type]


def output_candidates(outputs: object) -> str:
    """A readable list of what the model returned: ``0: tensor (2, 3), 1: list of 12``."""
    return ", ".join(f"{key!r}: {_describe(value)}" if isinstance(key, str)
                     else f"{key}: {_describe(value)}" for key, value in _entries(outputs))


def select_output(outputs: object, spec: OutputSpec = None) -> torch.Tensor:
    """The one tensor of the model's outputs that the target is scored on.

    ``spec`` is ``None`` (the output is a tensor, or the tuple/dict holds exactly one tensor),
    an ``int`` (index into a tuple or list; also the n-th entry of a dict or named tuple) or a
    ``str`` (key of a dict, field of a named tuple).
    """
    if isinstance(outputs, torch.Tensor):
        if spec is not None:
            raise ValueError(
                f"output={spec!r} picks one of several outputs, but the model returns a single "
                f"tensor of shape {tuple(outputs.shape)}; leave output unset (to explain one "
                "column of a regression head use RegressionTarget(output_index=...))"
            )
        return outputs
    if not isinstance(outputs, (Mapping, Sequence)) or isinstance(outputs, (str, bytes)):
        raise TypeError(f"the model returned a {type(outputs).__name__}; a CAM needs a tensor, "
                        "or a tuple/list/dict of tensors from which output= picks one")
    entries = _entries(outputs)
    if not entries:
        raise ValueError(f"the model returned an empty {type(outputs).__name__}")
    if spec is None:
        tensors = [(key, value) for key, value in entries if isinstance(value, torch.Tensor)]
        if len(tensors) == 1:
            return tensors[0][1]
        if not tensors:
            raise ValueError(f"the model returned a {type(outputs).__name__} without a tensor at "
                             f"the top level ({output_candidates(outputs)}); wrap the model so "
                             "that it returns the scores to explain")
        raise ValueError(
            f"the model returned a {type(outputs).__name__} of {len(tensors)} tensors "
            f"({output_candidates(outputs)}): say which one to explain, e.g. "
            f"output={tensors[0][0]!r}"
        )
    if isinstance(spec, bool) or not isinstance(spec, (int, str)):
        raise TypeError(f"output must be an index (int) or a key (str), not {spec!r}")
    chosen = _pick(outputs, entries, spec)
    if not isinstance(chosen, torch.Tensor):
        raise ValueError(f"output={spec!r} is a {_describe(chosen)}, not a tensor; the model "
                         f"returned {output_candidates(outputs)}")
    return chosen


def _pick(outputs: object, entries: list[tuple[int | str, object]], spec: int | str) -> object:
    if isinstance(spec, str):
        for key, value in entries:
            if key == spec:
                return value
        raise ValueError(f"the model's outputs have no {spec!r}; they are "
                         f"{output_candidates(outputs)}")
    if not -len(entries) <= spec < len(entries):
        raise ValueError(f"output={spec} is out of range: the model returned "
                         f"{len(entries)} outputs ({output_candidates(outputs)})")
    return entries[spec][1]
