"""Block swap: keep the frozen weights of a transformer's last blocks in host memory and stream them in.

`BlockSwapper(blocks, blocks_to_swap, device)` takes a model's list of blocks (FLUX double/single blocks, SD3
joint blocks, ...). The first `len(blocks) - blocks_to_swap` blocks live on `device` for good. The frozen
parameters (requires_grad=False) of the last `blocks_to_swap` blocks live in host memory (pinned on CUDA), one
flat buffer per block, and are copied into a fixed set of `num_slots` (default 2) preallocated device buffers
just before the block runs. Block j always uses slot (j - first_swapped) % num_slots: its parameters' `.data`
are views into that slot for the swapper's life (except inside `swapping_fewer`, see below), so nothing is rebound
or allocated per step and the device footprint is fixed at (resident blocks + num_slots swapped blocks). Frozen weights never change, so evicting a block is free:
nothing is copied back to the host (sd-scripts copies every weight back on each swap).

Mechanism (module hooks, no change to the model's code):
- forward pre-hook of block 0: `prepare_for_forward()` (prefetch the first swapped blocks while the resident
  blocks compute);
- forward pre-hook of a swapped block j: make sure j is in its slot (issue the copy if it is not there) and make
  the compute stream wait for the copy's event;
- forward hook of j: record "slot free" on the compute stream and prefetch block j + num_slots into it;
- full backward pre-hook of block i (backward visits blocks in reverse; it fires once the gradient of i's
  output, i.e. of block i+1's input, is complete): record "slot free" for block i+1, prefetch block
  i+1 - num_slots, and, if i is swapped, make sure i is back in its slot.
Only forward pre/post hooks and full backward *pre* hooks are used: they work whether a block is called with
positional or keyword arguments (full backward post-hooks misfire when a block's inputs are keywords).
Copies go through a `CopyEngine` (below): on CUDA they run on a side stream that waits on the "slot free" event of
the previous occupant, so they overlap with the compute of other blocks; the compute stream waits on the copy's event
only when it needs the block. Tests pass a recording engine that checks this ordering on CPU.
Correctness never depends on the prefetch schedule: every use of a block goes through `_ensure(j)`, which loads
it when its slot holds another block. Autograd's saved tensors of block j alias its slot; they are only read
in j's backward, after `_ensure(j)` has brought j's (unchanged) weights back. Copies write the slot's raw byte
buffer, so parameter version counters are untouched.

Gradient checkpointing (torch.utils.checkpoint, use_reentrant=False, around each block) works: the recompute
of block j runs inside the autograd engine during j's backward, when j is resident; the hooks detect that they
run inside the engine and then only check residency (no prefetch, which would evict j).

Assumption: a block's frozen weights are used only on gradient paths that lead to the block's inputs (true for
Linear/attention/MLP blocks with LoRA adapters), so "input gradient computed" means "weights no longer needed".

`swapping_fewer(n)` (a context manager) streams only the last n blocks for a while: the others get their own
device copies, freed on exit. Sampling uses it with `blocks_to_swap_for_inference`, which counts how many blocks
fit in the free device memory (inference keeps no activations for backward, so more blocks fit than in training).

On CPU (device.type == "cpu") the same code runs synchronously with plain copies (no streams, no pinning), so
tests prove that swapping changes no number (at a fixed number of intra-op threads: float32 results on CPU depend on
the thread count, with or without swap). Trainable parameters (adapters with requires_grad=True) and
buffers of the swapped blocks are moved to `device` and stay resident; adapter modules that are not submodules
of the blocks (kiln's LoRA network) are not touched.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

_ALIGN = 256  # bytes; keeps every parameter view aligned for any dtype and for fast copies


def _in_autograd_engine() -> bool:
    """True while the autograd engine runs a node (e.g. a non-reentrant checkpoint recompute)."""
    fn = getattr(torch._C, "_current_autograd_node", None)
    return fn is not None and fn() is not None


def _align(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def _bind(layout: list[tuple[nn.Parameter, int, int]], buffer: torch.Tensor) -> None:
    """Make each parameter of a block's flat layout a view into `buffer` (a slot, or a block's own copy)."""
    for p, off, nbytes in layout:
        p.data = buffer[off : off + nbytes].view(p.dtype).view(p.shape)


Event = Any  # what a CopyEngine returns for "this point in a stream" (a torch.cuda.Event on CUDA, None on CPU)


class CopyEngine:
    """How the block swapper and the activation offloader order copies against compute.

    This base class is the synchronous implementation (CPU and any non-CUDA device): a copy is done when `copy`
    returns, so every event is already complete. `CudaCopyEngine` queues copies on a side stream. The protocol, which
    a recording engine checks in the tests:
    - `copy(dst, src, after)` writes `dst` once `after` (an event from `record`) has happened on the compute stream,
      or once all compute queued so far has run when `after` is None, and returns the copy's completion event;
    - compute must `wait(event)` before it reads `dst`;
    - `wait_all()` makes compute wait for every copy issued so far.
    """

    def host_empty(self, like: torch.Tensor) -> torch.Tensor:
        """Uninitialised host memory for a copy of `like` (same shape, dtype and dense strides)."""
        return _empty_like_on_host(like, pin=False)

    def copy(self, dst: torch.Tensor, src: torch.Tensor, after: Event = None) -> Event:
        with torch.no_grad():
            dst.copy_(src)
        return None

    def wait(self, event: Event) -> None:
        """Compute reads nothing written by the copy of `event` before that copy is complete."""

    def record(self) -> Event:
        """An event at the current point of the compute stream (e.g. "the slot's last use is queued")."""
        return None

    def wait_all(self) -> None:
        """Compute waits for every copy issued so far."""


class CudaCopyEngine(CopyEngine):
    """Copies on a side CUDA stream (pinned host memory, non_blocking), ordered with the compute stream by events."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device=device)

    def host_empty(self, like: torch.Tensor) -> torch.Tensor:
        return _empty_like_on_host(like, pin=True)

    def _compute(self):
        return torch.cuda.current_stream(self.device)

    def copy(self, dst: torch.Tensor, src: torch.Tensor, after: Event = None) -> Event:
        if after is None:
            self.stream.wait_stream(self._compute())
        else:
            self.stream.wait_event(after)
        with torch.cuda.stream(self.stream), torch.no_grad():
            dst.copy_(src, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        for t in (dst, src):
            if t.is_cuda:  # the allocator keeps the device memory until the copy has run
                t.record_stream(self.stream)
        return done

    def wait(self, event: Event) -> None:
        self._compute().wait_event(event)

    def record(self) -> Event:
        event = torch.cuda.Event()
        event.record(self._compute())
        return event

    def wait_all(self) -> None:
        self._compute().wait_stream(self.stream)


def copy_engine(device: torch.device) -> CopyEngine:
    """The engine for `device`: side-stream copies on CUDA, synchronous copies anywhere else."""
    return CudaCopyEngine(device) if device.type == "cuda" else CopyEngine()


def _empty_like_on_host(like: torch.Tensor, pin: bool) -> torch.Tensor:
    strides = torch.empty_like(like, device="meta").stride()  # dense tensors keep their layout (free on meta)
    return torch.empty_strided(like.shape, strides, dtype=like.dtype, pin_memory=pin)


class BlockSwapper:
    def __init__(
        self,
        blocks: list[nn.Module] | nn.ModuleList,
        blocks_to_swap: int,
        device: torch.device | str,
        num_slots: int = 2,
        engine: CopyEngine | None = None,
    ):
        blocks = list(blocks)
        n = len(blocks)
        if blocks_to_swap < 0 or blocks_to_swap > n - 2:
            raise ValueError(f"blocks_to_swap must be between 0 and len(blocks) - 2 = {n - 2}, got {blocks_to_swap}")
        if num_slots < 1:
            raise ValueError("num_slots must be >= 1")
        self.blocks = blocks
        self.blocks_to_swap = blocks_to_swap
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.engine = engine if engine is not None else copy_engine(self.device)
        self.first_swapped = n - blocks_to_swap
        self._base = self.first_swapped  # slot of block j: (j - _base) % num_slots, fixed for the swapper's life
        self.num_slots = min(num_slots, blocks_to_swap)
        self._handles: list = []
        self.loads = 0  # block transfers issued (host -> device)
        self.host_bytes = 0
        self.slot_bytes = 0

        for block in blocks[: self.first_swapped]:
            block.to(self.device)
        if blocks_to_swap == 0:
            return

        # Per swapped block: its frozen parameters and their byte offsets in a flat layout.
        layouts: list[list[tuple[nn.Parameter, int, int]]] = []
        self._layouts = layouts
        sizes: list[int] = []
        for block in blocks[self.first_swapped :]:
            layout, off = [], 0
            seen: set[int] = set()
            for p in block.parameters():
                if p.requires_grad or id(p) in seen:
                    continue
                seen.add(id(p))
                nbytes = p.numel() * p.element_size()
                layout.append((p, off, nbytes))
                off = _align(off + nbytes)
            layouts.append(layout)
            sizes.append(max(off, _ALIGN))

        slot_sizes = [0] * self.num_slots
        for i, size in enumerate(sizes):
            slot_sizes[i % self.num_slots] = max(slot_sizes[i % self.num_slots], size)
        self._slots = [torch.empty(s, dtype=torch.uint8, device=self.device) for s in slot_sizes]
        self.slot_bytes = sum(slot_sizes)

        self._host: list[torch.Tensor] = []
        for i, (block, layout) in enumerate(zip(blocks[self.first_swapped :], layouts)):
            host = self.engine.host_empty(torch.empty(sizes[i], dtype=torch.uint8, device="meta"))
            slot = self._slots[i % self.num_slots]
            for p, off, nbytes in layout:
                src = p.detach().contiguous().cpu()
                host[off : off + nbytes].copy_(src.reshape(-1).view(torch.uint8))
            _bind(layout, slot)  # views into the slot for the swapper's life
            self._host.append(host)
            self.host_bytes += sizes[i]
            # everything else of the block (buffers, trainable parameters) lives on the device
            for mod in block.modules():
                for p in mod._parameters.values():
                    if p is not None and p.requires_grad and p.device != self.device:
                        p.data = p.data.to(self.device)
                for name, b in mod._buffers.items():
                    if b is not None and b.device != self.device:
                        mod._buffers[name] = b.to(self.device)

        self._slot_block: list[int | None] = [None] * self.num_slots  # which block each slot holds
        self._loaded: list[Event] = [None] * self.num_slots  # completion of each slot's latest copy
        self._free: list[Event] = [None] * self.num_slots  # each slot's last use by compute, once released
        self._released = [True] * self.num_slots  # the slot's occupant has had its last use recorded
        self._install_hooks()
        self.prepare_for_forward()
        logger.info(
            "block swap: %d of %d blocks in host memory (%.1f MiB), %d device slots (%.1f MiB)",
            blocks_to_swap,
            n,
            self.host_bytes / 2**20,
            self.num_slots,
            self.slot_bytes / 2**20,
        )

    # --- slots -------------------------------------------------------------------------------------------
    def _slot(self, j: int) -> int:
        return (j - self._base) % self.num_slots

    def _load(self, j: int) -> None:
        """Issue the copy of block j's frozen weights into its slot (asynchronous on CUDA)."""
        k = self._slot(j)
        host = self._host[j - self._base]
        dst = self._slots[k][: host.numel()]
        # after the previous occupant's recorded last use; if it was used since, after all work queued so far
        self._loaded[k] = self.engine.copy(dst, host, after=self._free[k] if self._released[k] else None)
        self._slot_block[k] = j
        self.loads += 1

    def _ensure(self, j: int) -> None:
        """Block j's weights are in its slot, and the compute stream will see them."""
        if j < self.first_swapped:  # resident for now (see swapping_fewer)
            return
        k = self._slot(j)
        if self._slot_block[k] != j:
            self._load(j)
        self._released[k] = False
        self.engine.wait(self._loaded[k])

    def _release(self, j: int) -> None:
        """The compute stream has queued its last use of block j (until it is loaded again)."""
        if j < self.first_swapped:
            return
        k = self._slot(j)
        if self._slot_block[k] == j:
            self._release_slot(k)

    def _release_slot(self, k: int) -> None:
        self._free[k] = self.engine.record()
        self._released[k] = True

    def _prefetch(self, j: int) -> None:
        if self.first_swapped <= j < len(self.blocks) and self._slot_block[self._slot(j)] != j:
            self._load(j)

    def prepare_for_forward(self) -> None:
        """Put the first swapped blocks in the slots (the layout a forward starts from).

        Called automatically when block 0 runs; call it yourself after a forward without backward (validation,
        sampling) to start the next transfers early. Never needed for correctness.
        """
        if self.blocks_to_swap == 0:
            return
        for j in range(self.first_swapped, self.first_swapped + self.num_slots):
            self._prefetch(j)

    def swapping_fewer(self, blocks_to_swap: int) -> _FewerSwapped:
        """Context manager: inside it only the last `blocks_to_swap` blocks are streamed; the others swapped so far
        get device copies of their weights (for sampling, whose activations leave memory free).
        Numbers do not change. On exit the extra copies are freed and the blocks stream again."""
        return _FewerSwapped(self, blocks_to_swap)

    def block_bytes(self, j: int) -> int:
        """Bytes of swapped block j's frozen weights (what making it resident costs on the device)."""
        return self._host[j - self._base].numel()

    # --- hooks ---------------------------------------------------------------------------------------------
    def _install_hooks(self) -> None:
        def first_pre(module, args):
            if not _in_autograd_engine():
                self.prepare_for_forward()

        self._handles.append(self.blocks[0].register_forward_pre_hook(first_pre))
        n = len(self.blocks)
        for j in range(self.first_swapped, n):
            block = self.blocks[j]

            def fwd_pre(module, args, j=j):
                self._ensure(j)

            def fwd_post(module, args, output, j=j):
                if _in_autograd_engine():  # checkpoint recompute inside j's backward: keep j resident
                    return
                self._release(j)
                self._prefetch(j + self.num_slots)

            self._handles.append(block.register_forward_pre_hook(fwd_pre))
            self._handles.append(block.register_forward_hook(fwd_post))
        for i in range(self.first_swapped - 1, n - 1):

            def bwd_pre(module, grad_output, i=i):
                self._release(i + 1)  # block i+1's backward has produced its input gradient: done with it
                self._prefetch(i + 1 - self.num_slots)
                if i >= self.first_swapped:
                    self._ensure(i)

            self._handles.append(self.blocks[i].register_full_backward_pre_hook(bwd_pre))

    def remove(self) -> None:
        """Remove the hooks and give every swapped block its own device copy of its weights again."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self.blocks_to_swap == 0:
            return
        self.engine.wait_all()
        for host, layout in zip(self._host, self._layouts):
            _bind(layout, host.to(self.device, copy=True))
        self._host.clear()
        self._slots.clear()
        self.blocks_to_swap = 0


INFERENCE_RESERVE_BYTES = 4 * 2**30  # left free for sampling activations and the autoencoder decode


def free_memory_bytes(device: torch.device) -> int:
    """Bytes a new allocation can use: free device memory plus what PyTorch's allocator holds unused (CUDA), or the
    available host memory (CPU)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    import psutil

    return psutil.virtual_memory().available


def blocks_to_swap_for_inference(swapper: BlockSwapper, free_bytes: int, reserve_bytes: int = INFERENCE_RESERVE_BYTES) -> int:
    """How many blocks still need streaming when the swapped blocks get device copies, first swapped first, while
    `free_bytes - reserve_bytes` allows."""
    budget = free_bytes - reserve_bytes
    first = swapper.first_swapped
    for j in range(first, len(swapper.blocks)):
        budget -= swapper.block_bytes(j)
        if budget < 0:
            return len(swapper.blocks) - j
    return 0


class _FewerSwapped:
    """BlockSwapper.swapping_fewer's context manager."""

    def __init__(self, swapper: BlockSwapper, blocks_to_swap: int) -> None:
        self.swapper = swapper
        self.target = max(0, blocks_to_swap)
        self.copies: list[int] = []

    def __enter__(self) -> BlockSwapper:
        sw = self.swapper
        new_first = len(sw.blocks) - self.target
        if sw.blocks_to_swap == 0 or new_first <= sw.first_swapped:
            return sw
        sw.engine.wait_all()  # pending slot copies finish before any slot is reassigned
        self.copies = list(range(sw.first_swapped, new_first))
        for j in self.copies:
            host = sw._host[j - sw._base]
            _bind(sw._layouts[j - sw._base], host.to(sw.device, non_blocking=sw.cuda, copy=True))
            k = sw._slot(j)
            if sw._slot_block[k] == j:  # the slot's copy of j is no longer what j reads
                sw._slot_block[k] = None
                sw._release_slot(k)
        self.previous_first = sw.first_swapped
        sw.first_swapped = new_first
        logger.info("block swap: %d blocks resident while sampling, %d streamed", new_first, self.target)
        sw.prepare_for_forward()
        return sw

    def __exit__(self, *exc) -> None:
        sw = self.swapper
        if not self.copies:
            return
        for j in self.copies:  # back to views into their slots (not holding j: loaded on use); the copies are freed
            _bind(sw._layouts[j - sw._base], sw._slots[sw._slot(j)])
        sw.first_swapped = self.previous_first
        self.copies = []
        sw.prepare_for_forward()


# --- activation offload (--cpu_offload_checkpointing) ------------------------------------------------------------


class HostActivationOffload:
    """Saved-tensor hooks that keep what autograd saves in host memory until backward needs it.

    Used around a non-reentrant `torch.utils.checkpoint` call, the only tensors autograd saves are the block's
    inputs (the recompute keeps its own tensors), so a checkpointed transformer keeps one block-input set per block
    in host memory instead of on the GPU. Every saved tensor is copied into its own host buffer through a
    `CopyEngine`: on CUDA the device -> host copy runs on a side stream into pinned memory (overlapping the next
    block's compute) and the host -> device copy is queued on the compute stream, after a wait for the first copy,
    when the recompute needs it; no host synchronisation. On CPU the copy is a plain synchronous copy into a separate
    buffer, so the tests exercise the same path. `engine` replaces the per-device default (tests); `packed` counts the
    tensors offloaded."""

    def __init__(self, engine: CopyEngine | None = None) -> None:
        self.packed = 0
        self._engine = engine
        self._engines: dict[torch.device, CopyEngine] = {}

    def _engine_for(self, device: torch.device) -> CopyEngine:
        if self._engine is not None:
            return self._engine
        if device not in self._engines:
            self._engines[device] = copy_engine(device)
        return self._engines[device]

    def pack(self, tensor: torch.Tensor) -> tuple[torch.device, torch.Tensor, Event]:
        self.packed += 1
        engine = self._engine_for(tensor.device)
        host = engine.host_empty(tensor)
        return tensor.device, host, engine.copy(host, tensor)

    def unpack(self, packed: tuple[torch.device, torch.Tensor, Event]) -> torch.Tensor:
        device, host, copied = packed
        self._engine_for(device).wait(copied)
        return host.to(device, non_blocking=True)

    def checkpoint(self, module: nn.Module, *args):
        """A `gradient_checkpointing_func` for diffusers' `enable_gradient_checkpointing`: checkpoint one block and
        keep its saved inputs in host memory."""
        with torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack):
            return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False)
