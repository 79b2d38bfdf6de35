"""Chunked optimizer steps for full fine-tuning: `--fused_backward_pass`, `--blockwise_fused_optimizers`, `--full_bf16`.

`ChunkedOptimizer` splits the trained parameters into chunks (one per parameter, one per transformer block, or one
for everything) and gives every chunk its own optimizer, built by a callable of the caller (any torch optimizer:
torch AdamW/SGD, transformers' Adafactor, bitsandbytes' 8-bit optimizers, ...). It is itself a
`torch.optim.Optimizer` whose `param_groups` are the caller's groups, so that LR schedulers and accelerate's
`AcceleratedOptimizer` drive it like a plain optimizer.

- Unfused: the trainer clips (globally) and calls `step()`, which steps every chunk; the same result as one optimizer
  over all parameters for optimizers whose update of a parameter depends only on that parameter (SGD, Adam(W),
  Lion, Adafactor, bitsandbytes' blockwise 8-bit optimizers). D-Adaptation and Prodigy estimate their step size from
  all the parameters they hold: chunked, each chunk has its own estimate.
- `fuse_into_backward(max_grad_norm)`: every chunk is stepped inside backward as soon as all of its parameters have
  their gradient, and its gradients are freed at once; `step()` afterwards only steps what backward did not (see
  `fuse_into_backward` for the rules, clipping included).
- `stochastic_bf16=True`: bf16 weights without float32 master copies; each chunk's optimizer steps float32 proxies
  and the result is written back to bf16 with stochastic rounding (`copy_stochastic_`), whose random numbers come
  from generators owned by the `ChunkedOptimizer` and saved in its `state_dict()`.

- `stream_with(swapper)`: the weights of a block swapper's swapped blocks (library/custom_offloading_utils.py
  BlockSwapper) are trained where they are: each chunk holding some is stepped inside `swapper.updating(...)` (its
  block is in its device slot, and is written back to host memory before the slot is reused), and the optimizer
  state of those weights lives in host memory between steps, moved in just before the chunk's step and out right
  after it (see `stream_with`).

`chunks_by_pattern` builds the blockwise chunking from parameter names.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

logger = logging.getLogger(__name__)

__all__ = ["ChunkedOptimizer", "FusedHooks", "chunks_by_pattern", "copy_stochastic_"]

_STATE_KIND = "kiln.ChunkedOptimizer"
_STATE_VERSION = 1
# Group keys that list one entry per parameter: sliced to each chunk's parameters, never pushed as hyperparameters.
_PER_PARAM_KEYS = ("param_names", "names")
_LOW_BITS = 1 << 16
_HIGH_MASK = -(1 << 16)  # 0xFFFF0000 as an int32


# ---------------------------------------------------------------------------------------------------------------------
# stochastic rounding


def copy_stochastic_(target: torch.Tensor, source: torch.Tensor, generator: torch.Generator | None = None) -> None:
    """Write float32 `source` into bf16 `target` with stochastic rounding; `source` is overwritten (used as scratch).

    Uniform random bits are added to the 16 low bits of the float32 bit pattern, which are then cut off: a value
    between two neighbouring bf16 numbers goes to the upper one (in magnitude) with probability equal to its distance
    from the lower one over their spacing, so E[result] = source. Values that bf16 holds exactly are unchanged;
    NaN stays NaN. The random numbers come from `generator`, which must be on `source`'s device."""
    if source.dtype != torch.float32:
        raise TypeError(f"copy_stochastic_: the source must be float32, got {source.dtype}")
    if target.dtype != torch.bfloat16:
        raise TypeError(f"copy_stochastic_: the target must be bfloat16, got {target.dtype}")
    if target.shape != source.shape:
        raise ValueError(f"copy_stochastic_: shapes differ ({tuple(target.shape)} and {tuple(source.shape)})")
    with torch.no_grad():
        nan = torch.isnan(source)
        bits = source.view(torch.int32)
        noise = torch.randint(0, _LOW_BITS, source.shape, dtype=torch.int32, device=source.device, generator=generator)
        bits.add_(noise).bitwise_and_(_HIGH_MASK)
        del noise
        source.masked_fill_(nan, float("nan"))
        target.copy_(source)  # exact: the low 16 bits are zero


# ---------------------------------------------------------------------------------------------------------------------
# chunking helpers


def chunks_by_pattern(named_params: Iterable[tuple[str, torch.Tensor]], pattern: str) -> list[list[torch.Tensor]]:
    """One chunk per distinct match of the regular expression `pattern` at the start of the parameter names, in the
    order of first appearance, plus one chunk of all the parameters that match nothing (last, if any). For example
    `r"(transformer_blocks|single_transformer_blocks)\\.\\d+\\."` gives one chunk per FLUX block and one for the rest."""
    regex = re.compile(pattern)
    blocks: dict[str, list[torch.Tensor]] = {}
    rest: list[torch.Tensor] = []
    for name, param in named_params:
        m = regex.match(name)
        if m is None:
            rest.append(param)
        else:
            blocks.setdefault(m.group(0), []).append(param)
    return list(blocks.values()) + ([rest] if rest else [])


def _same(a: Any, b: Any) -> bool:
    """Whether a group value is unchanged (tensors: the same object; a scheduler updates a tensor lr in place, and a
    shared object carries that along)."""
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor) or type(a) is not type(b):
        return False
    try:
        return bool(a == b)
    except Exception:  # values whose comparison is not a bool (tuples of tensors, ...)
        return False


class FusedHooks:
    """What `ChunkedOptimizer.fuse_into_backward` returns: `remove()` takes the hooks off again (back to unfused)."""

    def __init__(self, owner: ChunkedOptimizer, handles: list[Any]) -> None:
        self._owner, self._handles = owner, handles

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self._owner._hooks is self:
            self._owner._hooks = None
            self._owner._fused = False
            self._owner._fused_clip = None


# ---------------------------------------------------------------------------------------------------------------------
# the optimizer


class ChunkedOptimizer(torch.optim.Optimizer):
    """One optimizer per chunk of parameters behind one `torch.optim.Optimizer` (see the module docstring).

    - `param_groups`: the caller's groups (dicts with "params" and hyperparameters such as "lr"; "param_names" or
      "names" lists, one name per parameter, are allowed), or a list of parameters (one group).
    - `build(groups) -> torch.optim.Optimizer`: makes a chunk's optimizer from its groups, e.g.
      `lambda groups: make_optimizer(args, groups)[2]`. A chunk gets one group per caller group it has parameters
      of, with that group's settings, in the caller's order; the optimizer must keep them as given (one of its
      groups per group, same parameters).
    - `chunks`: a list of lists of parameters, each parameter of the groups in exactly one; or "parameter" (one chunk
      per parameter) or "all" (one chunk).
    - `stochastic_bf16`: bf16 parameters are stepped through float32 proxies and rounded back stochastically
      (other dtypes are stepped directly); `seed` seeds the rounding generators (one per device).

    `param_groups` is a facade, one entry per caller group: it starts with the caller's values, completed by the
    values the chunk optimizers filled in (their defaults). Before a chunk steps, every value of a facade group that
    changed since the chunk last took it (a scheduler's lr, momentum, ...) is copied into that chunk's groups; values
    an optimizer keeps in its own groups (D-Adaptation's d, ...) are left alone, and the facade does not follow them
    (`chunk_optimizers` has them). `state` is empty: the state is in the chunk optimizers (`param_state(p)`).
    Schedule-free optimizers are refused (their evaluation weights would have to be switched chunk by chunk).
    """

    def __init__(
        self,
        param_groups: Iterable[dict[str, Any]] | Iterable[torch.Tensor],
        build: Callable[[list[dict[str, Any]]], torch.optim.Optimizer],
        chunks: Sequence[Sequence[torch.Tensor]] | str = "parameter",
        *,
        stochastic_bf16: bool = False,
        seed: int = 0,
    ) -> None:
        groups = list(param_groups)
        if not groups:
            raise ValueError("ChunkedOptimizer: no parameters to optimize")
        if not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        self._initializing = True
        super().__init__([dict(g) for g in groups], {})
        self._initializing = False

        self.stochastic_bf16 = bool(stochastic_bf16)
        self.seed = int(seed)
        self._generators: dict[str, torch.Generator] = {}
        self._hooks: FusedHooks | None = None
        self._fused = False
        self._fused_clip: float | None = None
        self._streamer: Any = None  # a BlockSwapper (stream_with)
        self._streamed_chunks: set[int] = set()  # chunks holding streamed weights
        self._host_state: dict[int, dict[str, torch.Tensor]] = {}  # id(state key) -> its state tensors in host memory

        # where each parameter sits: (group index, index in its group)
        where: dict[int, tuple[int, int]] = {}
        for g, group in enumerate(self.param_groups):
            for i, p in enumerate(group["params"]):
                if id(p) in where:
                    raise ValueError(f"ChunkedOptimizer: parameter {self._name(g, i)} appears twice in the groups")
                where[id(p)] = (g, i)
                for key in _PER_PARAM_KEYS:
                    names = group.get(key)
                    if isinstance(names, (list, tuple)) and len(names) != len(group["params"]):
                        raise ValueError(
                            f"ChunkedOptimizer: group {g}'s {key!r} has {len(names)} entries for {len(group['params'])} parameters"
                        )

        layout = self._resolve_chunks(chunks, where)
        self._layout: list[list[tuple[int, int]]] = layout
        self._chunks: list[list[torch.Tensor]] = [[self.param_groups[g]["params"][i] for g, i in c] for c in layout]
        self._chunk_of: dict[int, int] = {id(p): c for c, ps in enumerate(self._chunks) for p in ps}
        self._proxies: list[list[torch.nn.Parameter | None]] = [[self._make_proxy(p) for p in ps] for ps in self._chunks]

        # one optimizer per chunk
        self._inner: list[torch.optim.Optimizer] = []
        self._inner_groups: list[list[tuple[int, dict[str, Any]]]] = []
        for c, members in enumerate(layout):
            given: list[dict[str, Any]] = []
            owners: list[int] = []
            stepped = [q if q is not None else p for p, q in zip(self._chunks[c], self._proxies[c])]
            for g in sorted({g for g, _ in members}):  # members are sorted: a group's parameters are contiguous
                pos = [n for n, (gg, _) in enumerate(members) if gg == g]
                group = self.param_groups[g]
                inner = {k: v for k, v in group.items() if k != "params"}
                for key in _PER_PARAM_KEYS:
                    if isinstance(group.get(key), (list, tuple)):
                        inner[key] = [group[key][members[n][1]] for n in pos]
                inner["params"] = [stepped[n] for n in pos]
                given.append(inner)
                owners.append(g)
            expected = [list(gr["params"]) for gr in given]
            optimizer = build(given)
            self._check_built(c, optimizer, expected)
            self._inner.append(optimizer)
            self._inner_groups.append(list(zip(owners, optimizer.param_groups)))

        # Each chunk group remembers the values it last took from the facade (its own, to begin with); the facade
        # takes the values of the first chunk group of its group (the caller's, completed by the optimizer's defaults).
        self._synced = [[self._values(ig) for _, ig in pairs] for pairs in self._inner_groups]
        for g, group in enumerate(self.param_groups):
            first = next((ig for pairs in self._inner_groups for gg, ig in pairs if gg == g), None)
            if first is not None:
                group.update(self._values(first))
        self.defaults = dict(self._inner[0].defaults) if self._inner else {}

        kind = type(self._inner[0]).__name__ if self._inner else "?"
        if kind.startswith("DAdapt") or kind.startswith("Prodigy"):
            logger.warning(
                f"{kind} estimates its step size from all the parameters it holds: chunked, every chunk "
                f"({len(self._inner)}) has its own estimate"
            )
        self._new_step()

    # -- construction helpers ------------------------------------------------------------------------------------------

    def _name(self, g: int, i: int) -> str:
        group = self.param_groups[g]
        for key in _PER_PARAM_KEYS:
            names = group.get(key)
            if isinstance(names, (list, tuple)) and i < len(names):
                return str(names[i])
        return f"{i} of group {g} (shape {tuple(group['params'][i].shape)})"

    def _resolve_chunks(self, chunks: Any, where: dict[int, tuple[int, int]]) -> list[list[tuple[int, int]]]:
        ordered = [(g, i) for g, group in enumerate(self.param_groups) for i in range(len(group["params"]))]
        if isinstance(chunks, str):
            if chunks == "parameter":
                return [[gi] for gi in ordered]
            if chunks == "all":
                return [ordered]
            raise ValueError(f"ChunkedOptimizer: unknown chunking {chunks!r} (use 'parameter', 'all' or lists of parameters)")
        layout: list[list[tuple[int, int]]] = []
        seen: set[tuple[int, int]] = set()
        for c, chunk in enumerate(chunks):
            members = []
            for p in chunk:
                if not isinstance(p, torch.Tensor):
                    raise TypeError(f"ChunkedOptimizer: chunk {c} holds {type(p).__name__}, not a parameter")
                gi = where.get(id(p))
                if gi is None:
                    raise ValueError(f"ChunkedOptimizer: chunk {c} holds a parameter (shape {tuple(p.shape)}) of no group")
                if gi in seen:
                    raise ValueError(f"ChunkedOptimizer: parameter {self._name(*gi)} is in more than one chunk")
                seen.add(gi)
                members.append(gi)
            if not members:
                raise ValueError(f"ChunkedOptimizer: chunk {c} is empty")
            layout.append(sorted(members))
        missing = [gi for gi in ordered if gi not in seen]
        if missing:
            raise ValueError(f"ChunkedOptimizer: {len(missing)} parameter(s) in no chunk, e.g. {self._name(*missing[0])}")
        return layout

    def _make_proxy(self, p: torch.Tensor) -> torch.nn.Parameter | None:
        if not self.stochastic_bf16 or p.dtype != torch.bfloat16:
            return None
        return torch.nn.Parameter(self._empty(p), requires_grad=False)

    @staticmethod
    def _empty(p: torch.Tensor) -> torch.Tensor:
        return torch.empty(0, dtype=torch.float32, device=p.device)

    def _check_built(self, c: int, optimizer: Any, expected: list[list[torch.Tensor]]) -> None:
        from library.optimizers import is_schedule_free

        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"ChunkedOptimizer: build() returned {type(optimizer).__name__}, not a torch.optim.Optimizer")
        if is_schedule_free(optimizer):
            raise ValueError(
                f"ChunkedOptimizer: {type(optimizer).__name__} is schedule-free; its evaluation weights cannot be "
                "switched chunk by chunk. Use another optimizer with fused or blockwise steps"
            )
        got = [list(gr["params"]) for gr in optimizer.param_groups]
        if len(got) != len(expected) or any(
            len(a) != len(b) or any(x is not y for x, y in zip(a, b)) for a, b in zip(got, expected)
        ):
            raise ValueError(
                f"ChunkedOptimizer: chunk {c}'s optimizer ({type(optimizer).__name__}) did not keep the groups it was "
                "given (one group per given group, the same parameters in the same order)"
            )

    @staticmethod
    def _values(group: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in group.items() if k != "params" and k not in _PER_PARAM_KEYS}

    # -- public views ----------------------------------------------------------------------------------------------------

    @property
    def chunk_optimizers(self) -> list[torch.optim.Optimizer]:
        """The optimizer of every chunk, in chunk order."""
        return list(self._inner)

    @property
    def chunk_params(self) -> list[list[torch.Tensor]]:
        """The parameters of every chunk (the caller's tensors), in chunk order."""
        return [list(c) for c in self._chunks]

    def param_state(self, p: torch.Tensor) -> dict[str, Any]:
        """The optimizer state of parameter `p` (that of its float32 proxy with stochastic bf16)."""
        c = self._chunk_of[id(p)]
        n = next(k for k, q in enumerate(self._chunks[c]) if q is p)
        key = self._proxies[c][n] if self._proxies[c][n] is not None else p
        return self._inner[c].state.get(key, {})

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not getattr(self, "_initializing", False):
            raise NotImplementedError("ChunkedOptimizer: groups cannot be added after construction")
        super().add_param_group(param_group)

    def __repr__(self) -> str:
        kinds = sorted({type(o).__name__ for o in self._inner})
        return (
            f"ChunkedOptimizer({len(self._inner)} chunks of {'/'.join(kinds)}, {len(self.param_groups)} groups, "
            f"fused={self._fused}, stochastic_bf16={self.stochastic_bf16})"
        )

    # -- stepping --------------------------------------------------------------------------------------------------------

    def _new_step(self) -> None:
        n = len(self._chunks)
        self._ready = [0] * n
        self._done = [False] * n
        self._arrived: set[int] = set()

    def _generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        gen = self._generators.get(key)
        if gen is None:
            gen = torch.Generator(device=device)
            gen.manual_seed(self.seed)
            self._generators[key] = gen
        return gen

    def _sync(self, c: int) -> None:
        """Copy into chunk c's groups the facade values that changed since the chunk last took them."""
        for (g, inner_group), synced in zip(self._inner_groups[c], self._synced[c]):
            for key, value in self.param_groups[g].items():
                if key == "params" or key in _PER_PARAM_KEYS or key not in inner_group:
                    continue
                if key in synced and _same(synced[key], value):
                    continue
                inner_group[key] = value
                synced[key] = value

    @staticmethod
    def _clip(grads: list[torch.Tensor], max_norm: float) -> None:
        """Scale `grads` so that their joint L2 norm is at most max_norm (the formula of clip_grad_norm_)."""
        if not grads:
            return
        device = grads[0].device
        norms = [torch.linalg.vector_norm(g, dtype=torch.float32).to(device) for g in grads]
        total = torch.linalg.vector_norm(torch.stack(norms)) if len(norms) > 1 else norms[0]
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for g in grads:
            g.mul_(coef.to(g.device))

    def _step_chunk(self, c: int, max_norm: float | None) -> bool:
        """Step chunk c on the gradients it has (clipped to max_norm over the chunk when given) and free them.
        Returns False, stepping nothing, when none of its parameters has a gradient."""
        params = self._chunks[c]
        if not any(p.grad is not None for p in params):
            return False
        with self._placed(c):
            self._step_placed_chunk(c, max_norm)
        self._done[c] = True
        return True

    def _step_placed_chunk(self, c: int, max_norm: float | None) -> None:
        params, proxies = self._chunks[c], self._proxies[c]
        grads: list[torch.Tensor] = []
        with torch.no_grad():
            for p, q in zip(params, proxies):
                if p.grad is None:
                    continue
                if q is None:
                    grads.append(p.grad)
                    continue
                q.data = p.detach().to(torch.float32, copy=True)
                q.grad = p.grad.detach().to(torch.float32)
                p.grad = None
                grads.append(q.grad)
            if max_norm:
                self._clip(grads, float(max_norm))
        self._sync(c)
        self._inner[c].step()
        with torch.no_grad():
            for p, q in zip(params, proxies):
                if q is None:
                    p.grad = None
                    continue
                if q.grad is None:
                    continue
                q.grad = None
                copy_stochastic_(p, q.data, self._generator(q.device))
                q.data = self._empty(p)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Step every chunk not stepped yet in this step (fused mode: those backward did not complete), each on the
        gradients it has: a chunk none of whose parameters has a gradient is skipped (as a plain optimizer skips
        parameters without gradients). The caller clips globally before, except in fused mode, where the chunks
        stepped here are clipped per chunk like those stepped in backward. Gradients are freed."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        clip = self._fused_clip if self._fused else None
        for c in range(len(self._chunks)):
            if not self._done[c]:
                self._step_chunk(c, clip)
        self._new_step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients of every parameter (and proxy); a new step begins for the fused bookkeeping."""
        for ps, qs in zip(self._chunks, self._proxies):
            for p, q in zip(ps, qs):
                if q is not None:
                    q.grad = None
                if p.grad is None:
                    continue
                if set_to_none:
                    p.grad = None
                else:
                    if p.grad.grad_fn is not None:
                        p.grad.detach_()
                    else:
                        p.grad.requires_grad_(False)
                    p.grad.zero_()
        self._new_step()

    # -- fused stepping --------------------------------------------------------------------------------------------------

    def fuse_into_backward(self, max_grad_norm: float | None = None) -> FusedHooks:
        """Step each chunk inside backward, as soon as every one of its parameters has its gradient, and free the
        chunk's gradients at once, so that the gradients of the whole model never exist together.

        Clipping: with `max_grad_norm` (None or 0: off) each chunk's gradients are clipped to that norm over the
        chunk alone, as nothing else exists yet when it steps: per tensor with chunks="parameter", per block with
        blockwise chunks; the trainer must not clip (or call a global clip) itself.

        The trainer still calls `step()` after backward: it steps only the chunks that backward did not complete,
        i.e. those where some parameters got no gradient this step (a frozen or unused parameter); such a chunk is
        stepped on the gradients it has, clipped per chunk; one without any gradient is skipped.

        Gradient accumulation is not supported: a parameter that gets a gradient a second time before `step()` (a
        second backward, or a parameter reached twice through reentrant checkpointing) raises RuntimeError. Neither
        are fp16 gradient scaling (GradScaler) and DDP, which need all the gradients before stepping.
        Returns a handle whose `remove()` takes the hooks off."""
        if self._hooks is not None:
            raise RuntimeError("ChunkedOptimizer: fuse_into_backward() was called already (remove() its handle first)")
        handles = []
        for ps in self._chunks:
            for p in ps:
                if not p.requires_grad:
                    raise ValueError(
                        f"ChunkedOptimizer: a parameter of shape {tuple(p.shape)} does not require grad; fused steps "
                        "need every parameter of the groups to be trainable"
                    )
        for ps in self._chunks:
            for p in ps:
                handles.append(p.register_post_accumulate_grad_hook(self._on_grad))
        self._fused = True
        self._fused_clip = float(max_grad_norm) if max_grad_norm else None
        self._hooks = FusedHooks(self, handles)
        return self._hooks

    def _on_grad(self, p: torch.Tensor) -> None:
        c = self._chunk_of[id(p)]
        if id(p) in self._arrived or self._done[c]:
            raise RuntimeError(
                "ChunkedOptimizer: a parameter got a second gradient before step() (gradient accumulation, a second "
                "backward, or a weight reached twice through checkpointing); fused steps need exactly one backward "
                "per optimizer step"
            )
        self._arrived.add(id(p))
        self._ready[c] += 1
        if self._ready[c] == len(self._chunks[c]):
            self._step_chunk(c, self._fused_clip)

    # -- streamed weights (block swap) ----------------------------------------------------------------------------------

    def stream_with(self, swapper: Any) -> None:
        """Train the weights that `swapper` (a BlockSwapper) streams, where they are.

        - Each chunk holding streamed weights (all of one swapped block: "parameter" or blockwise chunks; a chunk
          spanning two swapped blocks is refused) is stepped inside `swapper.updating(chunk)`: its block is in its
          device slot (loaded first when it is not), and the slot is written back to the block's host buffer before it
          is reused. With `fuse_into_backward` that is inside the block's own backward, right after its gradients are
          accumulated, so nothing extra is loaded and the gradients are freed at once.
        - The optimizer state of streamed weights lives in host memory (pinned on CUDA) between steps: the chunk's
          state tensors on the compute device are copied in just before its step and copied out right after it, on
          the swapper's copy stream (the copy in overlaps with the compute queued before the step), into host buffers
          kept from step to step; the device copies are freed at once (the copy stream keeps them until it has read
          them). State the optimizer keeps in host memory itself (torch AdamW's step counters on CUDA) stays where it
          is. Only one chunk's state is on the device at a time.
          The step runs on the device, where the weights and the gradient are: stepping in host memory would need the
          gradient copied out and a CPU pass of the optimizer over every swapped weight (far slower than moving the
          state, and bitsandbytes' optimizers run on CUDA only). The cost is the state's bytes twice per step over the
          host link: small for Adafactor's factored state (sd-scripts' recipe for FLUX), 16 bytes per weight for
          float32 AdamW.
        Call it once, after construction (a state loaded later is moved out as well)."""
        streamed: set[int] = set()
        for c, params in enumerate(self._chunks):
            blocks = {b for b in (swapper.streamed_block(p) for p in params) if b is not None}
            if len(blocks) > 1:
                raise ValueError(
                    f"ChunkedOptimizer: chunk {c} holds weights of {len(blocks)} swapped blocks (blocks {sorted(blocks)}); "
                    "with block swap a chunk may hold one swapped block's weights at most (use per-parameter or "
                    "per-block chunks)"
                )
            if blocks:
                streamed.add(c)
        self._streamer = swapper
        self._streamed_chunks = streamed
        swapper.register_updater()
        for c in streamed:
            self._state_out(c)

    def _keys(self, c: int) -> list[torch.Tensor]:
        """The tensors chunk c's optimizer keys its state by (the parameters, or their float32 proxies)."""
        return [q if q is not None else p for p, q in zip(self._chunks[c], self._proxies[c])]

    @contextlib.contextmanager
    def _placed(self, c: int):
        """Around chunk c's step: with streamed weights, their block in its slot and their state on the device."""
        if c not in self._streamed_chunks:
            yield
            return
        with self._streamer.updating(self._chunks[c]):
            self._state_in(c)
            yield
            self._state_out(c)

    def _state_in(self, c: int) -> None:
        for key in self._keys(c):
            host = self._host_state.get(id(key))
            if host:
                state = self._inner[c].state[key]
                for name, tensor in host.items():
                    state[name] = self._streamer.to_device(tensor)

    def _state_out(self, c: int) -> None:
        device = self._streamer.device
        for key in self._keys(c):
            state = self._inner[c].state.get(key)
            if not state:
                continue
            host = self._host_state.setdefault(id(key), {})
            for name, value in state.items():
                if isinstance(value, torch.Tensor) and value.device == device:
                    host[name] = self._streamer.to_host(value, host.get(name))
                    state[name] = host[name]

    def state_on_device(self, p: torch.Tensor) -> list[str]:
        """Names of parameter `p`'s state tensors that are on the compute device now (with `stream_with`, none of a
        streamed weight's between its steps); for tests and checks."""
        c = self._chunk_of[id(p)]
        key = self._keys(c)[next(k for k, q in enumerate(self._chunks[c]) if q is p)]
        host = self._host_state.get(id(key), {})
        state = self._inner[c].state.get(key, {})
        device = self._streamer.device if self._streamer is not None else p.device
        return [n for n, v in state.items() if isinstance(v, torch.Tensor) and v.device == device and v is not host.get(n)]

    # -- state -----------------------------------------------------------------------------------------------------------

    def _shapes(self) -> list[list[list[int]]]:
        return [[list(p.shape) for p in ps] for ps in self._chunks]

    def state_dict(self) -> dict[str, Any]:
        """Everything a resume needs, in one dict of plain data and tensors (loadable with weights_only=True): the
        chunking, the facade groups' values, every chunk optimizer's state_dict, what each chunk last took from the
        facade, and the stochastic-rounding generators' states."""
        if self._streamer is not None:
            self._streamer.synchronize()  # the host reads state tensors that copies wrote
        groups = []
        for group in self.param_groups:
            saved = {k: v for k, v in group.items() if k != "params"}
            saved["params"] = len(group["params"])
            groups.append(saved)
        return {
            "kind": _STATE_KIND,
            "version": _STATE_VERSION,
            "stochastic_bf16": self.stochastic_bf16,
            "layout": [[[g, i] for g, i in c] for c in self._layout],
            "shapes": self._shapes(),
            "optimizers": [type(o).__module__ + "." + type(o).__qualname__ for o in self._inner],
            "param_groups": groups,
            "chunks": [o.state_dict() for o in self._inner],
            "synced": [[dict(s) for s in synced] for synced in self._synced],
            "generators": {k: g.get_state() for k, g in self._generators.items()},
        }

    def _check_state(self, state: Any) -> None:
        def fail(why: str) -> None:
            raise ValueError(f"ChunkedOptimizer.load_state_dict: {why}")

        if not isinstance(state, dict) or state.get("kind") != _STATE_KIND:
            fail(
                "this is not a ChunkedOptimizer state (a plain optimizer's state? fused/blockwise steps must match the saved run)"
            )
        if state.get("version") != _STATE_VERSION:
            fail(f"state version {state.get('version')} is not {_STATE_VERSION}")
        if bool(state["stochastic_bf16"]) != self.stochastic_bf16:
            fail(
                f"the state was saved with stochastic_bf16={state['stochastic_bf16']}, this optimizer has {self.stochastic_bf16}"
            )
        saved_groups = state["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            fail(f"the state has {len(saved_groups)} parameter groups, this optimizer {len(self.param_groups)}")
        for g, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            if saved["params"] != len(group["params"]):
                fail(f"group {g} has {saved['params']} parameters in the state, {len(group['params'])} here")
        layout = [[tuple(x) for x in c] for c in state["layout"]]
        if len(layout) != len(self._layout):
            fail(f"a different chunking: the state has {len(layout)} chunks, this optimizer {len(self._layout)}")
        for c, (a, b) in enumerate(zip(layout, self._layout)):
            if a != b:
                fail(
                    f"a different chunking: chunk {c} holds {len(a)} parameter(s) starting with "
                    f"{self._name(*a[0]) if a else '-'} in the state, {len(b)} starting with {self._name(*b[0])} here"
                )
        for c, (a, b) in enumerate(zip(state["shapes"], self._shapes())):
            if [list(s) for s in a] != b:
                fail(f"chunk {c}'s parameter shapes differ from the state's (a different model?)")
        mine = [type(o).__module__ + "." + type(o).__qualname__ for o in self._inner]
        if list(state["optimizers"]) != mine:
            diff = next(c for c, (a, b) in enumerate(zip(state["optimizers"], mine)) if a != b)
            fail(f"chunk {diff} was saved by {state['optimizers'][diff]}, its optimizer here is {mine[diff]}")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a `state_dict()`; refuses (ValueError naming the reason) one of another chunking, model, optimizer
        class or stochastic_bf16 setting, before changing anything."""
        self._check_state(state_dict)
        for group, saved in zip(self.param_groups, state_dict["param_groups"]):
            for key, value in saved.items():
                if key != "params":
                    group[key] = value
        if self._streamer is not None:
            self._host_state = {}
        for c, (optimizer, saved) in enumerate(zip(self._inner, state_dict["chunks"])):
            optimizer.load_state_dict(saved)  # torch puts the state on its parameters' device
            if c in self._streamed_chunks:
                self._state_out(c)  # to host memory at once: one chunk's state on the device at a time
        self._inner_groups = [
            [(g, ig) for (g, _), ig in zip(pairs, optimizer.param_groups)]
            for pairs, optimizer in zip(self._inner_groups, self._inner)
        ]
        self._synced = [[dict(s) for s in synced] for synced in state_dict["synced"]]
        self._generators = {}
        for key, gen_state in state_dict["generators"].items():
            gen = torch.Generator(device=torch.device(key))
            gen.set_state(gen_state.detach().to("cpu", torch.uint8))
            self._generators[key] = gen
        self._new_step()
