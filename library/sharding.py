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


def gather_whole(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors with every sharded one gathered whole into host memory (a collective per sharded tensor, in the
    dict's order: every process must call this with the same names); unsharded ones as they are (detached)."""
    return {n: t.detach().full_tensor().cpu() if is_sharded(t) else t.detach() for n, t in tensors.items()}


def shard_like(whole: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`whole` split the way `like` (a parameter or an EMA shard) is split, on its device; `whole` itself when `like`
    is not sharded."""
    if not is_sharded(like):
        return whole
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(whole.to(like.device, like.dtype), like.device_mesh, like.placements)


def _state_options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def whole_optimizer_state(modules: dict[str, nn.Module], optimizer) -> dict:
    """The optimizer state of sharded modules as one whole state (by parameter name, in host memory), gathered with
    torch.distributed.checkpoint: every process must call; a state saved by N processes resumes on any number."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(nn.ModuleDict(modules), optimizer, options=_state_options(cpu_offload=True))


def load_whole_optimizer_state(modules: dict[str, nn.Module], optimizer, state: dict) -> None:
    """Put a whole_optimizer_state() back into the sharded optimizer: each state tensor shaped like its parameter is
    split as the parameter is (every process takes its shards; a collective per tensor, in parameter order)."""
    names = {id(p): n for n, p in nn.ModuleDict(modules).named_parameters()}
    saved_groups = state["param_groups"]
    if len(saved_groups) != len(optimizer.param_groups):
        raise ValueError(f"the state has {len(saved_groups)} optimizer groups, this run {len(optimizer.param_groups)}")
    per_param, groups, index = {}, [], 0
    for group, saved in zip(optimizer.param_groups, saved_groups):
        ids = []
        for p in group["params"]:
            values = state["state"].get(names[id(p)])
            if values is not None:
                per_param[index] = {
                    k: shard_like(v, p) if torch.is_tensor(v) and v.shape == p.shape else v for k, v in values.items()
                }
            ids.append(index)
            index += 1
        groups.append({**{k: v for k, v in saved.items() if k != "params"}, "params": ids})
    optimizer.load_state_dict({"state": per_param, "param_groups": groups})
