"""Choosing where to compute, and running there safely (mixed precision, out-of-memory).

Users of napari ML plugins ask first for "use my GPU" (CUDA on the lab workstation, MPS on a
Mac) and second for "don't crash on a big volume": the helpers here answer both.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from typing import TypeVar

import numpy as np
import torch

T = TypeVar("T")

_AMP_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
               "float16": torch.float16}


def available_devices() -> list[str]:
    """The devices this machine can compute on, best first (what the GUI offers)."""
    devices = []
    if torch.cuda.is_available():
        devices += [f"cuda:{i}" if i else "cuda" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        devices.append("mps")
    devices.append("cpu")
    return devices


def resolve_device(device: str | torch.device | None, model: torch.nn.Module | None = None
                   ) -> torch.device:
    """``"auto"`` → cuda, then mps, then cpu; ``None`` → wherever the model's weights are."""
    if device is None:
        if model is not None:
            for tensor in [*model.parameters(), *model.buffers()]:
                return tensor.device
        return torch.device("cpu")
    if isinstance(device, str) and device == "auto":
        return torch.device(available_devices()[0])
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but this machine has no usable CUDA GPU; "
                         f"available: {', '.join(available_devices())}")
    if resolved.type == "mps" and "mps" not in available_devices():
        raise ValueError("device 'mps' was asked for but Apple MPS is not available here")
    return resolved


def autocast_context(device: torch.device, amp: str | None) -> contextlib.AbstractContextManager:
    """bf16/fp16 autocast on GPUs (the forward is where the time goes); a no-op otherwise.

    Gradients and the CAM arithmetic are taken in float32 afterwards, so the maps stay exact
    up to the precision of the activations themselves.
    """
    if amp is None:
        return contextlib.nullcontext()
    if amp not in _AMP_DTYPES:
        raise ValueError(f"amp must be one of {sorted(_AMP_DTYPES)} or None, got {amp!r}")
    if device.type not in ("cuda", "mps"):
        warnings.warn(f"mixed precision ({amp}) is only used on GPUs; computing in float32 on "
                      f"{device.type}", stacklevel=3)
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=_AMP_DTYPES[amp])


#: Largest result staged through page-locked memory on its way to the host (bytes). Above it
#: a plain copy: pinning gigabytes takes long and locks RAM that the rest of the machine needs.
PINNED_STAGING_LIMIT = 256 * 2**20


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """``tensor`` on the host as a NumPy array, copied fast when it lies on a CUDA GPU.

    Profiled on an H200 (``benchmarks/profile_explain.py``), copying a batch's maps and outputs
    into ordinary (pageable) host memory took 84 % of a Seg-Grad-CAM's time: 10 ms per 16 MiB,
    against 3 ms for the model's forward pass. A copy into page-locked memory runs at the bus's
    speed, and PyTorch's caching host allocator reuses those buffers from batch to batch. The
    array keeps its page-locked buffer (no second copy); results above
    :data:`PINNED_STAGING_LIMIT` take the plain path.
    """
    tensor = tensor.detach()
    if tensor.device.type != "cuda" or tensor.numel() * tensor.element_size() > (
            PINNED_STAGING_LIMIT):
        return tensor.cpu().numpy()
    staging = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    staging.copy_(tensor)  # synchronous: the array is complete when it is returned
    return staging.numpy()


def is_out_of_memory(error: BaseException) -> bool:
    """True for CUDA/MPS/CPU allocator failures, whichever exception type torch used."""
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    message = str(error).lower()
    return isinstance(error, RuntimeError) and (
        "out of memory" in message or "can't allocate memory" in message
        or "not enough memory" in message
    )


def free_device_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps" and hasattr(torch, "mps"):
        torch.mps.empty_cache()


def run_with_oom_backoff(
    items: list[T] | range,
    batch_size: int,
    work: Callable[[list[T] | range], None],
    device: torch.device,
    notify: Callable[[str], None] | None = None,
) -> Iterator[int]:
    """Call ``work`` on consecutive chunks of ``items``, halving the chunk on out-of-memory.

    Yields how many items are done after each chunk, so callers can report progress and stop
    between chunks. When even a chunk of one does not fit, the error is re-raised with advice.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    start, size = 0, batch_size
    while start < len(items):
        chunk = items[start:start + size]
        try:
            work(chunk)
        except Exception as error:
            if not is_out_of_memory(error):
                raise
            free_device_cache(device)
            if size == 1:
                raise MemoryError(
                    f"out of memory on {device} even for a batch of one; use a smaller window, "
                    "a lower resolution, mixed precision (amp='bf16') or the CPU"
                ) from error
            size = max(1, size // 2)
            message = f"out of memory on {device}: retrying with batch size {size}"
            warnings.warn(message, RuntimeWarning, stacklevel=2)
            if notify is not None:
                notify(message)
            continue
        start += len(chunk)
        yield start
