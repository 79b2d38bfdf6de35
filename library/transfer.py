"""Host -> device copies that do not stall the host.

PyTorch synchronises the CUDA stream after every blocking copy between host and device (`tensor.to("cuda")`): the
host then waits for all queued GPU work, and the GPU idles while the host launches the next kernels. A training step
draws its random numbers on CPU generators (the same numbers on every device), so it copies small tensors often;
`to_device` stages them in pinned memory and copies asynchronously, in stream order (PyTorch's pinned-memory
allocator keeps the staging buffer until the copy has run). Anywhere but host -> CUDA it is a plain `.to`.
`staged_copy` is that host -> CUDA path; its `pin` argument lets a CPU test drive it."""

from __future__ import annotations

from collections.abc import Callable

import torch


def is_staged(tensor: torch.Tensor, device: torch.device) -> bool:
    """Whether `to_device` copies `tensor` to `device` through pinned memory (host -> CUDA)."""
    return device.type == "cuda" and tensor.device.type == "cpu"


def to_device(tensor: torch.Tensor, device: torch.device | str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`tensor.to(device, dtype)` without a host synchronisation for host -> CUDA copies."""
    device = torch.device(device)
    if not is_staged(tensor, device):
        return tensor.to(device, dtype)
    return staged_copy(tensor, device, dtype)


def staged_copy(
    tensor: torch.Tensor,
    device: torch.device,
    dtype: torch.dtype | None = None,
    pin: Callable[[torch.Tensor], torch.Tensor] = torch.Tensor.pin_memory,
) -> torch.Tensor:
    """Narrow the dtype on the host (fewer bytes to copy), pin, copy with non_blocking=True, then cast on `device`."""
    if dtype is not None and tensor.dtype != dtype and tensor.element_size() > dtype.itemsize:
        tensor = tensor.to(dtype)
    out = pin(tensor).to(device, non_blocking=True)
    return out if dtype is None else out.to(dtype)
