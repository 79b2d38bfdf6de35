"""Host -> device copies that do not stall the host.

PyTorch synchronises the CUDA stream after every blocking copy between host and device (`tensor.to("cuda")`): the
host then waits for all queued GPU work, and the GPU idles while the host launches the next kernels. A training step
draws its random numbers on CPU generators (the same numbers on every device), so it copies small tensors often;
`to_device` stages them in pinned memory and copies asynchronously, in stream order (PyTorch's pinned-memory
allocator keeps the staging buffer until the copy has run). Anywhere but host -> CUDA it is a plain `.to`."""

from __future__ import annotations

import torch


def to_device(tensor: torch.Tensor, device: torch.device | str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`tensor.to(device, dtype)` without a host synchronisation for host -> CUDA copies."""
    device = torch.device(device)
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device, dtype)
    if dtype is not None and tensor.dtype != dtype and tensor.element_size() > dtype.itemsize:
        tensor = tensor.to(dtype)  # narrow on the host: fewer bytes to copy
    out = tensor.pin_memory().to(device, non_blocking=True)
    return out if dtype is None else out.to(dtype)
