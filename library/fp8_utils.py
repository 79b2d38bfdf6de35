"""`--fp8_base`: store frozen nn.Linear weights in float8 with a per-tensor scale, compute in the input's dtype.

`store_linear_weights_fp8(module, ...)` turns every frozen nn.Linear under `module` (not rejected by `skip`)
into an `Fp8Linear` in place: the class is swapped (same object, same name, same hooks), its weight becomes a
frozen float8 parameter holding w / scale, with scale = amax(|w|) / max(fp8) kept as a float32 buffer
`weight_scale`, so the values use the whole e4m3 range (sd-scripts casts without a scale). The forward upcasts
the weight to the input's dtype and multiplies the scale back. Biases, norms, embeddings and skipped Linears
(frozen floating parameters) are cast to `compute_dtype`; trainable parameters are left alone. Modules the model keeps
in float32 on purpose (transformers' `_keep_in_fp32_modules`, e.g. T5's feed-forward output `wo`, whose input T5 casts
to that weight's dtype) are left as they are.

LoRA: call this before the adapters are applied. kiln's LoRAModule captures `org_module.forward`, which then
resolves to Fp8Linear.forward, so the adapter sees the same input and the base path upcasts. A Linear whose
forward was already replaced on the instance is rejected (its captured forward would see an fp8 weight).

The state dict holds `weight` (float8) and `weight_scale`; it round-trips through safetensors exactly.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


class Fp8Linear(nn.Linear):
    """An nn.Linear whose frozen weight is stored as float8 (w / weight_scale)."""

    weight_scale: torch.Tensor

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.weight.to(dtype) * self.weight_scale.to(dtype)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        dtype = input.dtype if input.is_floating_point() else torch.float32
        weight = self.dequantized_weight(dtype)
        bias = self.bias.to(dtype) if self.bias is not None else None
        return F.linear(input, weight, bias)


def quantize_fp8(weight: torch.Tensor, dtype: torch.dtype = torch.float8_e4m3fn) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight / scale as `dtype`, float32 scale) with scale = amax / max representable value."""
    w = weight.detach().float()
    amax = w.abs().max()
    fmax = torch.finfo(dtype).max
    scale = (amax / fmax) if amax > 0 else torch.ones((), dtype=torch.float32, device=w.device)
    scale = scale.to(torch.float32).reshape(())
    q = (w / scale).clamp(-fmax, fmax).to(dtype)
    return q, scale


@dataclass
class Fp8Report:
    converted: int  # Linear layers stored in fp8
    bytes_before: int  # their weights before (in their original dtype)
    bytes_after: int  # their fp8 weights + scales

    @property
    def bytes_saved(self) -> int:
        return self.bytes_before - self.bytes_after


def store_linear_weights_fp8(
    module: nn.Module,
    dtype: torch.dtype = torch.float8_e4m3fn,
    compute_dtype: torch.dtype = torch.bfloat16,
    skip: Callable[[str, nn.Module], bool] | None = None,
) -> Fp8Report:
    """Convert the frozen nn.Linear layers of `module` to fp8 storage in place; see the module docstring.

    `skip(name, linear) -> True` keeps a Linear in `compute_dtype`. Returns what was converted and the bytes
    saved against the weights' original dtype (halved against bf16, quartered against fp32).
    """
    if dtype not in FP8_DTYPES:
        raise ValueError(f"dtype must be one of {FP8_DTYPES}, got {dtype}")
    keep = set(getattr(module, "_keep_in_fp32_modules", None) or ())
    kept = {id(p) for name, mod in module.named_modules() if name.rsplit(".", 1)[-1] in keep for p in mod.parameters()}
    converted, before, after = 0, 0, 0
    for name, mod in module.named_modules():
        if type(mod) is not nn.Linear or mod.weight.requires_grad or id(mod.weight) in kept:
            continue
        if skip is not None and skip(name, mod):
            continue
        if "forward" in mod.__dict__:
            raise ValueError(f"{name}: its forward is already wrapped (adapter applied?); store fp8 before applying adapters")
        before += mod.weight.numel() * mod.weight.element_size()
        q, scale = quantize_fp8(mod.weight, dtype)
        mod.weight = nn.Parameter(q, requires_grad=False)
        mod.register_buffer("weight_scale", scale)
        mod.__class__ = Fp8Linear
        after += q.numel() * q.element_size() + scale.numel() * scale.element_size()
        converted += 1
    # Everything else that is frozen and floating (biases, norms, embeddings, skipped Linears): compute dtype.
    for mod in module.modules():
        for _pname, p in mod._parameters.items():
            if p is None or p.requires_grad or not p.is_floating_point() or p.dtype in FP8_DTYPES or id(p) in kept:
                continue
            if p.dtype != compute_dtype:
                p.data = p.data.to(compute_dtype)
    report = Fp8Report(converted, before, after)
    logger.info(
        "fp8 base: %d Linear weights stored as %s, %.1f MiB -> %.1f MiB (saved %.1f MiB)",
        converted,
        dtype,
        before / 2**20,
        after / 2**20,
        report.bytes_saved / 2**20,
    )
    return report
