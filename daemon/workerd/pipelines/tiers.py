"""Moving a loaded pipeline between its device and host memory (the host tier).

Runs in: the GPU worker and the cluster's pipeline hosts.

A pipeline can say how, with `to_host(obj)` and `to_device(obj, device)` in its module; each
returns the object to keep (None: it moved `obj` in place). Without them, a torch.nn.Module or
a tensor is moved tensor by tensor, into pinned host memory where CUDA allows it, and any other
object with a `.to()` method is moved with `.to()`. Anything else cannot be parked: it is
dropped, as before the host tier existed.

Why not `module.to("cpu")` for an nn.Module: that copies into ordinary (pageable) memory, and
pinning afterwards is a second full copy. Copying each tensor straight into a pinned block is
one copy, and a wake from pinned memory is a DMA transfer at the bus's full speed.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

try:
    import torch
except ImportError:
    torch = None  # type: ignore[assignment]

HOST = "cpu"


def is_tensor_holder(obj: Any) -> bool:
    return torch is not None and isinstance(obj, torch.nn.Module | torch.Tensor)


def can_move(module: ModuleType, obj: Any) -> bool:
    """Whether a pipeline's object can be parked in host memory and woken from there."""
    if callable(getattr(module, "to_host", None)) and callable(getattr(module, "to_device", None)):
        return True
    return is_tensor_holder(obj) or callable(getattr(obj, "to", None))


def kept(result: Any, obj: Any) -> Any:
    return obj if result is None else result


def to_host(module: ModuleType, obj: Any, pin: bool) -> Any:
    """`obj` moved to host memory; the caller keeps what this returns."""
    hook = getattr(module, "to_host", None)
    if callable(hook):
        return kept(hook(obj), obj)
    if is_tensor_holder(obj):
        moved = move_tensors(obj, lambda tensor: host_copy(tensor, pin))
        if pin:
            torch.cuda.synchronize()  # the copies into pinned blocks were queued without waiting
        return moved
    return kept(obj.to(HOST), obj)


def to_device(module: ModuleType, obj: Any, device: str) -> Any:
    """`obj` moved back to `device`, synchronised (the wake's time is all of it)."""
    hook = getattr(module, "to_device", None)
    if callable(hook):
        result = kept(hook(obj, device), obj)
    elif is_tensor_holder(obj):
        # non_blocking: from pinned memory the copies queue up without a sync per tensor.
        result = move_tensors(obj, lambda tensor: tensor.to(device, non_blocking=True))
    else:
        result = kept(obj.to(device), obj)
    if torch is not None and device.startswith("cuda"):
        torch.cuda.synchronize(device)
    return result


def move_tensors(obj: Any, move: Any) -> Any:
    """A tensor moved, or every parameter and buffer of a module swapped in place for its move."""
    with torch.no_grad():
        if isinstance(obj, torch.Tensor):
            return move(obj)
        for tensor in [*obj.parameters(), *obj.buffers()]:
            tensor.data = move(tensor.data)
    return obj


def host_copy(tensor: Any, pin: bool) -> Any:
    if tensor.device.type == HOST:
        return tensor  # already there (a CPU device): nothing to move
    if pin:
        try:
            host = torch.empty_like(tensor, device=HOST, pin_memory=True)
        except RuntimeError:  # no page-locked memory left: pageable still works, slower
            host = torch.empty_like(tensor, device=HOST)
    else:
        host = torch.empty_like(tensor, device=HOST)
    host.copy_(tensor, non_blocking=host.is_pinned())
    return host
