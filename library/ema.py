"""Exponential moving average of trained weights (full fine-tuning's `--ema`-style averaging; sd-scripts has none).

`EmaWeights(named_params, decay, update_every, on_cpu)` keeps a float32 copy of each weight and, after every
`update_every`-th optimizer step, moves it towards the weight: ema = decay * ema + (1 - decay) * weight. `applied()`
puts the averages into the model for previews and saving, and puts the trained weights back afterwards.

Weights are read through their tensors as they are at update time, each on whatever device it is on (a block swapper
may keep some in host memory): the named tensors must hold their current values when `after_step` and `applied`
run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch

__all__ = ["EmaWeights"]

# Elements per batched update: bounds the float32 temporaries (weights converted or copied to the EMA's device).
_BATCH_ELEMENTS = 1 << 26


class EmaWeights:
    """ema = decay * ema + (1 - decay) * weight, in float32, after every `update_every`-th optimizer step, starting
    from the weights before training; constant decay (no warm-up).

    `named_params`: the trained weights by name (e.g. `dict(model.named_parameters())` restricted to the trained
    ones); the EMA starts as their float32 copies, so build it before the first step (or load a state). `on_cpu`:
    the averages live in host memory (pinned when CUDA is available) and are updated there from the weights, which
    are copied over (non-blocking on CUDA, then waited for); otherwise each average lives on its weight's device at
    construction. Updates use `torch._foreach_lerp_` per device, in batches."""

    def __init__(
        self, named_params: Mapping[str, torch.Tensor], decay: float, update_every: int = 1, on_cpu: bool = False
    ) -> None:
        decay = float(decay)
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be between 0 and 1, got {decay}")
        if int(update_every) != update_every or update_every < 1:
            raise ValueError(f"EMA update_every must be a positive whole number, got {update_every}")
        self.decay = decay
        self.update_every = int(update_every)
        self.on_cpu = bool(on_cpu)
        self.params: dict[str, torch.Tensor] = dict(named_params)
        if not self.params:
            raise ValueError("EmaWeights: no weights to average")
        pin = self.on_cpu and torch.cuda.is_available()
        self.shadow: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for name, p in self.params.items():
                if not p.is_floating_point():
                    raise TypeError(f"EmaWeights: {name} is {p.dtype}, not a floating-point weight")
                if self.on_cpu:
                    t = torch.empty(p.shape, dtype=torch.float32, device="cpu", pin_memory=pin)
                    t.copy_(p.detach())
                else:
                    t = p.detach().to(torch.float32, copy=True)
                self.shadow[name] = t

    # -- updating ------------------------------------------------------------------------------------------------------

    def after_step(self, step: int) -> bool:
        """Call after every optimizer step with the number of steps done (1 after the first): updates when
        `step % update_every == 0`. Returns whether it updated."""
        if step % self.update_every != 0:
            return False
        self.update()
        return True

    def _batches(self) -> Iterator[tuple[torch.device, list[str]]]:
        by_device: dict[torch.device, list[str]] = {}
        for name, t in self.shadow.items():
            by_device.setdefault(t.device, []).append(name)
        for device, names in by_device.items():
            batch: list[str] = []
            size = 0
            for name in names:
                batch.append(name)
                size += self.shadow[name].numel()
                if size >= _BATCH_ELEMENTS:
                    yield device, batch
                    batch, size = [], 0
            if batch:
                yield device, batch

    @torch.no_grad()
    def update(self) -> None:
        """One EMA update from the current weights, whatever the step."""
        weight = 1.0 - self.decay
        for device, names in self._batches():
            staged: list[torch.Tensor] = []
            waits: set[torch.device] = set()
            for name in names:
                p = self.params[name].detach()
                if p.device != device:
                    non_blocking = p.device.type == "cuda" and device.type == "cpu"
                    if non_blocking:
                        waits.add(p.device)
                    p = p.to(device, non_blocking=non_blocking)
                staged.append(p)
            for d in waits:  # the host reads what non-blocking copies wrote
                torch.cuda.synchronize(d)
            sources = [s if s.dtype == torch.float32 else s.to(torch.float32) for s in staged]
            torch._foreach_lerp_([self.shadow[n] for n in names], sources, weight)

    # -- state ---------------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averages, float32, by name (the live tensors: save or clone them)."""
        return dict(self.shadow)

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore averages saved by `state_dict()`; the names must be the same (ValueError naming a missing or extra
        key), and so must the shapes."""
        missing = [n for n in self.shadow if n not in state]
        extra = [n for n in state if n not in self.shadow]
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"missing {', '.join(missing[:5])}" + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
            if extra:
                parts.append(f"extra {', '.join(extra[:5])}" + (f" and {len(extra) - 5} more" if len(extra) > 5 else ""))
            raise ValueError(f"EMA state does not match the trained weights: {'; '.join(parts)}")
        for name, t in self.shadow.items():
            if tuple(state[name].shape) != tuple(t.shape):
                raise ValueError(f"EMA state: {name} has shape {tuple(state[name].shape)}, the weight {tuple(t.shape)}")
        with torch.no_grad():
            for name, t in self.shadow.items():
                t.copy_(state[name])

    # -- using the averages --------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The model's parameters hold the EMA values (cast to their dtype, rounded to nearest) inside the block, and
        their own values again after it, bit for bit, also when the block raises. The trained values wait in host
        memory meanwhile."""
        backups: dict[str, torch.Tensor] = {}
        try:
            with torch.no_grad():
                for name, p in self.params.items():
                    backups[name] = p.detach().to("cpu", copy=True)
                    p.copy_(self.shadow[name])
            yield
        finally:
            with torch.no_grad():
                for name, b in backups.items():
                    self.params[name].copy_(b)
