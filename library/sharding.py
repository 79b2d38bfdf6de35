"""Several processes for whole-model training, on torch's own engines: composable DDP (`replicate`: every process
holds the whole model and gradients are averaged during backward) or FSDP2 (`fully_shard`: each parameter is split
across the processes, gathered per block for forward and backward, gradients reduce-scattered).

Sharding is asked for the way accelerate is asked for it (`accelerate launch --use_fsdp`, which sets
ACCELERATE_USE_FSDP=true): kiln takes the request away from accelerate and applies `fully_shard` itself, per block,
so the same policy runs on GPUs and on CPU processes (gloo) in tests, where accelerate 1.15 would fall back to plain
DDP. A block is what the model's library names as
not to be split (`_no_split_modules`: transformer blocks, U-Net resnet/attention blocks, CLIP/T5 layers), sharded
innermost first, then the model itself.
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch import nn

_FSDP_REQUESTED = False


def take_fsdp_request() -> bool:
    """Before the Accelerator is made: whether the run was launched for FSDP (`accelerate launch --use_fsdp` sets
    ACCELERATE_USE_FSDP=true). The variable is removed, so that accelerate runs plain processes on every machine,
    GPU or CPU, and kiln applies its own sharding policy (the same code path the CPU tests run)."""
    global _FSDP_REQUESTED
    _FSDP_REQUESTED = os.environ.pop("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true", "yes")
    return _FSDP_REQUESTED


def sharding_requested(accelerator=None) -> bool:
    """Whether this run was launched for FSDP (see take_fsdp_request)."""
    return _FSDP_REQUESTED


def shard_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's blocks that get their own FSDP unit, innermost first (children before their parents)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    return [m for m in reversed(list(model.modules())) if m is not model and type(m).__name__ in names]


def distribute(modules: list[nn.Module], shard: bool) -> tuple[int, int]:
    """Put each trained module under DDP (replicate) or FSDP2 (fully_shard per block, then the whole module), in
    place: the modules keep their class and attributes, and their parameters change (DTensor shards under FSDP), so
    optimizers are built afterwards. Returns (parameter elements this process holds, elements of the whole
    modules)."""
    from torch.distributed._composable import replicate
    from torch.distributed.fsdp import fully_shard

    for module in modules:
        if shard:
            for block in shard_blocks(module):
                fully_shard(block)
            fully_shard(module)
        else:
            replicate(module)
    params = [p for m in modules for p in m.parameters()]
    local = sum((p.to_local() if is_sharded(p) else p).numel() for p in params)
    return local, sum(p.numel() for p in params)


def is_sharded(param: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(param, DTensor)


@contextlib.contextmanager
def whole_parameters(modules: list[nn.Module], keep: bool):
    """Inside the block, the modules' sharded parameters are replaced by whole host-memory copies (gathered from all
    processes: every process must enter) on the process with `keep`, so that state_dict() gives whole tensors to
    write; the sharded parameters are put back afterwards. Unsharded modules are left as they are."""
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    try:
        for module in modules:
            for owner in module.modules():
                for name, p in list(owner._parameters.items()):
                    if p is None or not is_sharded(p):
                        continue
                    whole = p.detach().full_tensor()  # a collective: every process gathers
                    if keep:
                        swapped.append((owner, name, p))
                        owner._parameters[name] = nn.Parameter(whole.cpu(), requires_grad=False)
        yield
    finally:
        for owner, name, p in swapped:
            owner._parameters[name] = p
