"""Block swap: keep the weights of a transformer's last blocks in host memory and stream them in.

`BlockSwapper(blocks, blocks_to_swap, device)` takes a model's list of blocks (FLUX double/single blocks, SD3
joint blocks, ...). The first `len(blocks) - blocks_to_swap` blocks live on `device` for good. The parameters of
the last `blocks_to_swap` blocks that are frozen when the swapper is made (requires_grad=False; "streamed") live in
host memory (pinned on CUDA), one flat buffer per block, and are copied into a fixed set of `num_slots` (default 2)
preallocated device buffers just before the block runs. Block j always uses slot (j - first_swapped) % num_slots:
its parameters' `.data` are views into that slot for the swapper's life (except inside `swapping_fewer` and
`own_weights`, see below), so nothing is rebound or allocated per step and the device footprint is fixed at
(resident blocks + num_slots swapped blocks).

Adapter training (LoRA): the streamed weights never change, so evicting a block is free: nothing is copied back to
the host (sd-scripts copies every weight back on each swap).

Full fine-tuning (the streamed weights are trained): the optimizer steps a swapped block's weights through
`updating(params)` (library/full_optim.py ChunkedOptimizer.stream_with; kiln's trainer requires fused steps, one
parameter or one block at a time, so that this happens inside the block's own backward while it is in its slot):
the block is made resident if it is not, and its slot is marked dirty. A dirty slot is copied back into its block's host buffer before the slot is loaded with
another block: on CUDA the write-back is queued on the side stream after the slot's "free" event (recorded after the
step), and the load of the next block follows it on the same in-order stream; on CPU both are plain copies in that
order. `to_host`/`to_device` move other tensors (the optimizer state of streamed weights, which lives in host memory
between steps) through the same copy engine. Anything that reads or writes the weights of every block outside the
forward/backward (EMA, checkpoints, state saving and loading) does it inside `own_weights()`: dirty slots are copied
back, the host waits for every copy, and each swapped block's parameters are views into its own host buffer until the
block ends (`blocks_to_swap` reads 0 meanwhile: no block is streamed).

Mechanism (module hooks, no change to the model's code):
- forward pre-hook of block 0: `prepare_for_forward()` (prefetch the first swapped blocks while the resident
  blocks compute);
- forward pre-hook of a swapped block j: make sure j is in its slot (issue the copy if it is not there) and make
  the compute stream wait for the copy's event;
- forward hook of j: record "slot free" on the compute stream and prefetch block j + num_slots into it;
- full backward pre-hook of block i (backward visits blocks in reverse; it fires once the gradient of i's
  output, i.e. of block i+1's input, is complete): record "slot free" for block i+1, prefetch block
  i+1 - num_slots (after writing block i+1 back when it was updated), and, if i is swapped, make sure i is back in
  its slot.
Only forward pre/post hooks and full backward *pre* hooks are used: they work whether a block is called with
positional or keyword arguments (full backward post-hooks misfire when a block's inputs are keywords).
Copies go through a `CopyEngine` (below): on CUDA they run on a side stream that waits on the "slot free" event of
the previous occupant, so they overlap with the compute of other blocks; the compute stream waits on the copy's event
only when it needs the block. Tests pass a recording engine that checks this ordering on CPU.
Correctness never depends on the prefetch schedule: every use of a block goes through `_ensure(j)`, which loads
it when its slot holds another block. Autograd's saved tensors of block j alias its slot; they are only read
in j's backward, after `_ensure(j)` has brought j's weights back. Copies write the slot's raw byte buffer, so
parameter version counters are untouched.

Gradient checkpointing (torch.utils.checkpoint, use_reentrant=False, around each block) works: the recompute
of block j runs inside the autograd engine during j's backward, when j is resident; the hooks detect that they
run inside the engine and then only check residency (no prefetch, which would evict j).

Assumption: a block's weights are used only on gradient paths that lead to the block's inputs (true for
Linear/attention/MLP blocks), so "input gradient computed" means "weights no longer needed". For trained weights the
same holds for their gradients: the autograd engine runs the ready node with the highest sequence number first (and a
parameter's AccumulateGrad, where a fused step runs, as soon as it is ready), and every node of block i+1 was made
after the hook node on block i's outputs, so every gradient of block i+1 is accumulated, and its weights stepped,
before block i's backward pre-hook releases block i+1's slot. A step that comes later all the same (a chunk
completed only in `optimizer.step()`) loads the block again through `updating`: slower, never wrong.

`swapping_fewer(n)` (a context manager) streams only the last n blocks for a while: the others get their own
device copies (from their host buffers, after dirty slots are written back), freed on exit. Sampling uses it with
`blocks_to_swap_for_inference`, which counts how many blocks fit in the free device memory (inference keeps no
activations for backward, so more blocks fit than in training). Nothing may update the weights meanwhile.

On CPU (device.type == "cpu") the same code runs synchronously with plain copies (no streams, no pinning; host
buffers and slots are separate memory), so tests prove that swapping changes no number (at a fixed number of intra-op
threads: float32 results on CPU depend on the thread count, with or without swap). Parameters of the swapped blocks
that are trainable when the swapper is made (adapters that are submodules of a block) and buffers are moved to
`device` and stay resident; adapter modules that are not submodules of the blocks (kiln's LoRA network) are not
touched.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator
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

    def copy_to_new(self, src: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, Event]:
        """A new tensor on `device` (same shape, dtype and dense strides) that receives `src`'s values, and the copy's
        completion event: compute must `wait` for it before using the tensor."""
        out = torch.empty_like(src, device=device)
        return out, self.copy(out, src)

    def wait(self, event: Event) -> None:
        """Compute reads nothing written by the copy of `event` before that copy is complete."""

    def record(self) -> Event:
        """An event at the current point of the compute stream (e.g. "the slot's last use is queued")."""
        return None

    def wait_all(self) -> None:
        """Compute waits for every copy issued so far."""

    def synchronize(self) -> None:
        """The host waits for every copy issued so far and the compute queued before them (host code may then read and
        write the host buffers they used)."""


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

    def copy_to_new(self, src: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, Event]:
        """The new tensor is allocated on the side stream, so the copy need not wait for the compute queued so far
        (the allocator gives the side stream no memory the compute stream may still use); the compute stream's uses
        are recorded on it."""
        with torch.cuda.stream(self.stream), torch.no_grad():
            out = torch.empty_like(src, device=device)
            out.copy_(src, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        out.record_stream(self._compute())
        return out, done

    def wait(self, event: Event) -> None:
        self._compute().wait_event(event)

    def record(self) -> Event:
        event = torch.cuda.Event()
        event.record(self._compute())
        return event

    def wait_all(self) -> None:
        self._compute().wait_stream(self.stream)

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)


def copy_engine(device: torch.device) -> CopyEngine:
    """The engine for `device`: side-stream copies on CUDA, synchronous copies anywhere else."""
    return CudaCopyEngine(device) if device.type == "cuda" else CopyEngine()


def _empty_like_on_host(like: torch.Tensor, pin: bool) -> torch.Tensor:
    strides = torch.empty_like(like, device="meta").stride()  # dense tensors keep their layout (free on meta)
    return torch.empty_strided(like.shape, strides, dtype=like.dtype, pin_memory=pin)


class BlockSwapper:
    """Streams the weights of a model's last `blocks_to_swap` blocks through `num_slots` device slots (see the
    module docstring). Counters for tests and logs: `loads` (block copies host -> slot), `write_backs` (updated
    blocks copied slot -> host), `updates` (optimizer steps of streamed weights through `updating`)."""

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
        self._count = blocks_to_swap  # blocks streamed (blocks_to_swap reads 0 inside own_weights)
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:  # tensors report cuda:N: compare like with like
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.cuda = self.device.type == "cuda"
        self.engine = engine if engine is not None else copy_engine(self.device)
        self.first_swapped = n - blocks_to_swap
        self._base = self.first_swapped  # slot of block j: (j - _base) % num_slots, fixed for the swapper's life
        self.num_slots = min(num_slots, blocks_to_swap)
        self._handles: list = []
        self.loads = 0  # block transfers issued (host -> device)
        self.write_backs = 0  # updated blocks copied back (device -> host)
        self.updates = 0  # steps of streamed weights (updating)
        self.host_bytes = 0
        self.slot_bytes = 0
        self._own = False  # inside own_weights(): parameters are views into their host buffers
        self._updater = False  # an optimizer steps streamed weights through updating() (register_updater)
        self._block_of: dict[int, int] = {}  # id of a streamed parameter -> its block
        self._streamed: list[nn.Parameter] = []

        for block in blocks[: self.first_swapped]:
            block.to(self.device)
        if blocks_to_swap == 0:
            return

        # Per swapped block: its frozen parameters and their byte offsets in a flat layout.
        layouts: list[list[tuple[nn.Parameter, int, int]]] = []
        self._layouts = layouts
        sizes: list[int] = []
        for j, block in enumerate(blocks[self.first_swapped :], start=self.first_swapped):
            layout, off = [], 0
            for p in block.parameters():
                if p.requires_grad or id(p) in self._block_of:
                    continue
                self._block_of[id(p)] = j
                self._streamed.append(p)
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
        self._dirty = [False] * self.num_slots  # the slot holds updates its block's host buffer lacks
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

    @property
    def blocks_to_swap(self) -> int:
        """How many blocks are streamed now: 0 after `remove()` and inside `own_weights()` (every block's parameters
        then hold its own values)."""
        return 0 if self._own else self._count

    # --- slots -------------------------------------------------------------------------------------------
    def _slot(self, j: int) -> int:
        return (j - self._base) % self.num_slots

    def _load(self, j: int) -> None:
        """Issue the copy of block j's streamed weights into its slot (asynchronous on CUDA), after writing the
        slot's updated occupant back to its host buffer."""
        k = self._slot(j)
        host = self._host[j - self._base]
        dst = self._slots[k][: host.numel()]
        # after the previous occupant's recorded last use; if it was used since, after all work queued so far
        after = self._free[k] if self._released[k] else None
        if self._dirty[k]:
            self._write_back(k, after)  # first on the in-order side stream: the load below follows it
        self._loaded[k] = self.engine.copy(dst, host, after=after)
        self._slot_block[k] = j
        self.loads += 1

    def _write_back(self, k: int, after: Event) -> None:
        """Queue the copy of slot k's updated weights into its block's host buffer (after `after`, see _load)."""
        j = self._slot_block[k]
        host = self._host[j - self._base]
        # compute must not write the slot before this copy has read it: its next use waits on _loaded[k]
        self._loaded[k] = self.engine.copy(host, self._slots[k][: host.numel()], after=after)
        self._dirty[k] = False
        self.write_backs += 1

    def flush(self) -> None:
        """Queue the write-back of every updated block still in a slot (the slots keep their blocks)."""
        if self._count == 0:
            return
        for k in range(self.num_slots):
            if self._dirty[k]:
                self._write_back(k, self._free[k] if self._released[k] else None)

    def _ensure(self, j: int) -> None:
        """Block j's weights are in its slot, and the compute stream will see them."""
        if j < self.first_swapped:  # resident for now (see swapping_fewer)
            return
        if self._own:
            raise RuntimeError("BlockSwapper: a swapped block ran inside own_weights(); run the model after it")
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
        Numbers do not change. On exit the extra copies are freed and the blocks stream again. The weights must not
        be updated inside."""
        return _FewerSwapped(self, blocks_to_swap)

    def block_bytes(self, j: int) -> int:
        """Bytes of swapped block j's streamed weights (what making it resident costs on the device)."""
        return self._host[j - self._base].numel()

    # --- trained streamed weights ----------------------------------------------------------------------------
    def streamed_block(self, p: torch.Tensor) -> int | None:
        """The index of the swapped block whose streamed weights include `p`; None for any other tensor."""
        return self._block_of.get(id(p))

    def register_updater(self) -> None:
        """Declare that an optimizer steps the streamed weights through `updating` (ChunkedOptimizer.stream_with).
        Without it, a forward with a streamed weight that requires grad raises: a plain optimizer step after backward
        would write through slot views that hold other blocks' weights by then."""
        self._updater = True

    def _check_trained(self) -> None:
        if self._updater or not any(p.requires_grad for p in self._streamed):
            return
        raise RuntimeError(
            "BlockSwapper: weights of swapped blocks are trained, but no optimizer steps them in their slots: make a "
            "ChunkedOptimizer with fused steps and call its stream_with(swapper) (kiln: --fused_backward_pass or "
            "--blockwise_fused_optimizers)"
        )

    @contextlib.contextmanager
    def updating(self, params: Iterable[torch.Tensor]) -> Iterator[None]:
        """Around an optimizer step of `params`, whose streamed weights belong to at most one swapped block (other
        parameters pass through): inside, the block is in its slot (loaded when it is not) and compute waits for it;
        on exit its slot is marked updated, so that it is written back to the block's host buffer before the slot is
        reused. A block that no forward or backward is using is released again after the step."""
        blocks = {self._block_of[id(p)] for p in params if id(p) in self._block_of}
        if not blocks:
            yield
            return
        if len(blocks) > 1:
            raise ValueError(
                f"BlockSwapper.updating: the parameters belong to {len(blocks)} swapped blocks; step one block at a time"
            )
        if self._own or self.first_swapped != self._base:
            raise RuntimeError("BlockSwapper: streamed weights cannot be stepped inside own_weights() or swapping_fewer()")
        (j,) = blocks
        k = self._slot(j)
        idle = self._released[k] or self._slot_block[k] != j  # not in use by a forward or backward
        self._ensure(j)
        try:
            yield
        finally:
            self._dirty[k] = True
            self.updates += 1
            if idle:
                self._release_slot(k)

    @contextlib.contextmanager
    def own_weights(self, read_only: bool = False) -> Iterator[None]:
        """Inside, every swapped block's streamed parameters are views into its own host buffer and hold its current
        values: updated slots are written back first and the host waits for every copy. For code that reads or
        writes all the weights outside forward and backward (EMA, checkpoints, states); no block may run inside.
        On CUDA those parameters are host (pinned) tensors meanwhile. What is written inside reaches the host buffers,
        from which the slots are loaded again afterwards; `read_only=True` keeps the slots' blocks loaded (nothing
        may write then). Nested uses do nothing."""
        if self._count == 0 or self._own:
            yield
            return
        if self.first_swapped != self._base:
            raise RuntimeError("BlockSwapper.own_weights() cannot be used inside swapping_fewer()")
        self.flush()
        self.engine.synchronize()
        for host, layout in zip(self._host, self._layouts):
            _bind(layout, host)
        self._own = True
        try:
            yield
        finally:
            self._own = False
            for i, layout in enumerate(self._layouts):
                _bind(layout, self._slots[i % self.num_slots])
            if not read_only:  # the host buffers may have changed: the slots load them again when used
                self._slot_block = [None] * self.num_slots

    def to_host(self, tensor: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """A host copy of device tensor `tensor`, queued after the compute queued so far; `out` (a host tensor of
        the same shape and dtype, e.g. the previous copy) is reused when given. The device tensor may be dropped at
        once. The host may read the copy after `synchronize()`."""
        if out is None or out.shape != tensor.shape or out.dtype != tensor.dtype:
            out = self.engine.host_empty(tensor)
        self.engine.copy(out, tensor)
        return out

    def to_device(self, host: torch.Tensor) -> torch.Tensor:
        """A new device tensor holding `host`'s values (a `to_host` copy); compute waits for the copy. On CUDA the copy
        is queued on the side stream without waiting for the compute queued so far (CudaCopyEngine.copy_to_new): it
        overlaps with that compute, behind the side stream's block copies."""
        out, done = self.engine.copy_to_new(host, self.device)
        self.engine.wait(done)
        return out

    def synchronize(self) -> None:
        """The host waits for every copy issued so far (before it reads host buffers)."""
        self.engine.synchronize()

    # --- hooks ---------------------------------------------------------------------------------------------
    def _install_hooks(self) -> None:
        def first_pre(module, args):
            if not _in_autograd_engine():
                self._check_trained()
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
        if self._count == 0:
            return
        self.flush()
        self.engine.wait_all()
        for host, layout in zip(self._host, self._layouts):
            _bind(layout, host.to(self.device, copy=True))
        self._host.clear()
        self._slots.clear()
        self._block_of.clear()
        self._streamed = []
        self._count = 0


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
        sw.flush()  # updated blocks reach their host buffers, which the copies below read
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
