"""OFT (constrained orthogonal fine-tuning with the Cayley transform), sd-scripts' `networks.oft`, for SD 1.x/2.x,
SDXL and SD3. FLUX: networks.oft_flux (the same maths, sd-scripts' per-split file layout).

Each adapted weight W (out rows; a Conv2d's output channels) is split into `network_dim` = k diagonal blocks of
b = out / k rows. The trained `oft_blocks` B (k, b, b) starts at zero. Q = B - B^T is skew-symmetric; the Frobenius
norm of all of a module's Q together is limited to c = alpha * out (sd-scripts' "constraint"; the OFT paper uses
alpha * out^2): Q <- Q * (min(|Q|, c) + 1e-8) / (|Q| + 1e-8). R = (I + Q)(I - Q)^-1 per block (the Cayley transform;
orthogonal), weighted by the multiplier m: R_m = m (R - I) + I. The adapted layer computes with W'_j = R_m,j^T W_j for
each block j of rows; the bias stays.

Better than sd-scripts where exact: R comes from one batched `linalg.solve` over all blocks of a module ((I + Q) and
(I - Q)^-1 commute, so R = solve(I - Q, I + Q)), never an explicit inverse; the layer computes W + (R_m - I)^T W in the
weight's own dtype, so backward keeps a reference to the frozen weight instead of a float32 copy of it; without
gradients (previews) the rotations are cached until a block changes.

File (kohya, what A1111/Forge read): `oft_unet_<module name>.oft_blocks` (k, b, b) and `.alpha` (0-dim: the
constraint factor), module names as networks.lora's (SD 1.x/2.x diffusers names, SDXL sgm names, SD3 Stability AI
names, whose fused qkv is one module rotated as one weight of 3 x hidden rows). ComfyUI reads another prefix and
alpha convention: tools/convert_network.py converts.

Targets (network_args; "True"/"False", unlike sd-scripts, where any value enables):
    default            the attention projections (to_q, to_k, to_v, to_out.0 of attn1/attn2; SD3: attn.qkv, attn.proj,
                       attn2.* of every joint block)
    enable_all_linear  every Linear / 1x1 conv of the transformer blocks (SD: Transformer2DModel; SD3: joint blocks)
    enable_conv        also the ResnetBlock2D / Downsample2D / Upsample2D layers, 3x3 convs included (SD only)
Text encoders are never adapted. `--network_alpha` unset: 1e-3; >= 1 is warned about (sd-scripts' advice: 1e-3).
Dropouts, LoRA+ and --scale_weight_norms do not apply to OFT and are refused.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from networks.adapter import AdapterModule, AdapterType, apply_weight, family_network_module, frozen_weight, parse_flag

KILN_NETWORK = True  # kiln's network-module interface (not sd-scripts'): see library/method_adapter.py
ADAPTS_TEXT_ENCODERS = False  # OFT adapts the U-Net / transformer only (as sd-scripts)
LIMITS_WEIGHT_NORMS = False  # a rotation: --scale_weight_norms does not apply

logger = logging.getLogger(__name__)

DEFAULT_ALPHA = 1e-3
OWN_ARGS = frozenset({"enable_all_linear", "enable_conv"})
SD_ATTENTION_TARGETS = ("Attention",)  # diffusers' attention (sd-scripts' own U-Net calls it CrossAttention)
SD_ALL_LINEAR_TARGETS = ("Transformer2DModel",)
SD_CONV_TARGETS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")


class OFTModule(AdapterModule):
    """OFT of one weight (see the module docstring). per_split: one `oft_blocks` tensor per wrapped Linear, each
    constrained on its own (sd-scripts' oft_flux layout `oft_blocks.N`); otherwise one tensor over all rows of the
    (fused) weight, in the file's row order."""

    def __init__(
        self,
        name: str,
        org_modules: list[nn.Module],
        num_blocks: int,
        alpha: float | None,
        per_split: bool = False,
        multiplier: float = 1.0,
        row_order: torch.Tensor | None = None,
        **dropouts,
    ) -> None:
        given = sorted(k for k, v in dropouts.items() if v)
        if given:
            raise ValueError(f"{name}: OFT has no dropout ({given[0]}); leave out --network_dropout and the dropout network_args")
        super().__init__(name, org_modules, multiplier, row_order=row_order)
        self.num_blocks = num_blocks
        self.per_split = per_split
        widths = self.splits if per_split else [sum(self.splits)]
        for width in widths:
            if num_blocks < 1 or width % num_blocks:
                raise ValueError(
                    f"{name}: {width} output rows cannot be split into --network_dim {num_blocks} OFT blocks; "
                    "choose a network_dim that divides the width of every adapted layer (e.g. 4 or 8)"
                )
        self.widths = widths
        blocks = [nn.Parameter(torch.zeros(num_blocks, w // num_blocks, w // num_blocks)) for w in widths]
        self.oft_blocks = nn.ParameterList(blocks) if per_split else blocks[0]
        self.register_buffer("alpha", torch.tensor(DEFAULT_ALPHA if alpha is None else float(alpha)))
        self.alpha_loaded()
        self._cached: tuple | None = None  # (key, rotations) while no gradient is taken

    def alpha_loaded(self) -> None:
        self.limits = [float(self.alpha) * w for w in self.widths]  # the norm constraint of each block tensor

    def block_list(self) -> list[torch.Tensor]:
        return list(self.oft_blocks) if self.per_split else [self.oft_blocks]

    def rotation_deltas(self, multiplier: float) -> list[torch.Tensor]:
        """m (R - I) per block tensor (float32, one (k, b, b) per split, or one): blocks of equal size share one
        batched solve, each split keeps its own norm constraint."""
        blocks = self.block_list()
        key = (tuple(b._version for b in blocks), tuple(b.data_ptr() for b in blocks), multiplier, tuple(self.limits))
        if not torch.is_grad_enabled() and self._cached is not None and self._cached[0] == key:
            return self._cached[1]
        out: list[torch.Tensor | None] = [None] * len(blocks)
        sizes = sorted({b.shape[-1] for b in blocks})
        for size in sizes:
            index = [i for i, b in enumerate(blocks) if b.shape[-1] == size]
            b = torch.stack([blocks[i].float() for i in index])  # (n, k, b, b)
            q = b - b.transpose(-1, -2)
            norm = q.flatten(1).norm(dim=1)
            limits = [self.limits[i] for i in index]
            limit = limits[0] if len(set(limits)) == 1 else torch.tensor(limits, device=q.device)
            q = q * constraint_factor(norm, limit)[:, None, None, None]
            eye = torch.eye(size, device=q.device)
            r = torch.linalg.solve(eye - q, eye + q)
            for j, i in enumerate(index):
                out[i] = (r[j] - eye) * multiplier
        if not torch.is_grad_enabled():
            self._cached = (key, out)
        return out

    def rotated(self, weight: torch.Tensor, multiplier: float) -> torch.Tensor:
        """W + (R_m - I)^T W per block of rows, in `weight`'s dtype (rows in the file's order; the fused weight
        with per_split, or one split's when the module wraps one Linear)."""
        parts = weight.split(self.widths) if len(self.widths) > 1 else [weight]
        return torch.cat([_rotate(w, d) for w, d in zip(parts, self.rotation_deltas(multiplier))])

    def _rotated_parts(self, dtype: torch.dtype) -> list[torch.Tensor]:
        """Each wrapped module's rotated weight in `dtype`."""
        deltas = self.rotation_deltas(self.multiplier)
        if self.per_split:  # each wrapped Linear is one split: no copy of the frozen weights
            return [_rotate(frozen_weight(m, dtype), d) for m, d in zip(self._org, deltas)]
        weights = [frozen_weight(m, dtype) for m in self._org]
        whole = weights[0] if len(weights) == 1 and self.row_order is None else self.to_file_rows(torch.cat(weights))
        rotated = self.to_module_rows(_rotate(whole, deltas[0]))
        return list(rotated.split(self.splits)) if len(self._org) > 1 else [rotated]

    def _part_forward(self, i: int, x: torch.Tensor) -> torch.Tensor:
        if self.multiplier == 0:
            return self._org_forwards[i](x)
        org = self._org[i]
        dtype = x.dtype if not torch.is_autocast_enabled(x.device.type) else torch.get_autocast_dtype(x.device.type)
        stored = org.weight.dtype
        work = stored if stored.is_floating_point and stored.itemsize > 1 else dtype  # an fp8 weight: dequantised
        weights = self._shared(i, x, lambda _: self._rotated_parts(work))
        bias = org.bias.to(dtype) if org.bias is not None else None
        return apply_weight(org, x.to(dtype), weights[i].to(dtype), bias)

    def merged_weight(self, weight: torch.Tensor, ratio: float) -> torch.Tensor:
        return self.rotated(weight.float(), ratio)

    def merge_into(self, weight: torch.Tensor, ratio: float) -> None:
        weight.copy_(self.rotated(weight.float(), ratio).to(weight.dtype))

    def delta_weight(self) -> torch.Tensor:
        """The weight change at strength 1 (it depends on the frozen weight: W' - W)."""
        weight = self.to_file_rows(torch.cat([frozen_weight(m) for m in self._org]))
        return self.rotated(weight, 1.0) - weight

    def norm_factors(self) -> tuple[list[torch.Tensor], float]:
        raise ValueError("OFT's change is a rotation: --scale_weight_norms does not apply to it")


def constraint_factor(norm: torch.Tensor, limit) -> torch.Tensor:
    """sd-scripts' OFT constraint: the factor that scales Q to norm min(|Q|, limit) (exactly 1 below the limit)."""
    return (norm.clamp(max=limit) + 1e-8) / (norm + 1e-8)


def _rotate(weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """weight + delta_j^T @ weight_j for each block j of rows (delta: (k, b, b))."""
    k, b = delta.shape[0], delta.shape[1]
    blocks = weight.reshape(k, b, -1)
    turned = torch.bmm(delta.transpose(1, 2).to(weight.dtype), blocks)
    return weight + turned.reshape(weight.shape)


def _parse_options(args: dict) -> dict:
    return {k: parse_flag(args[k], k) for k in OWN_ARGS if k in args}


def read_oft_dims(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, int], dict[str, float]]:
    """(module -> number of blocks, module -> alpha) of an OFT file (`.oft_blocks` or `.oft_blocks.N`)."""
    dims, alphas = {}, {}
    for key, value in state_dict.items():
        name, sep, rest = key.partition(".oft_blocks")
        if sep and rest in ("", ".0"):
            dims[name] = value.shape[0]
            alpha = state_dict.get(name + ".alpha")
            alphas[name] = float(alpha) if alpha is not None else DEFAULT_ALPHA
    if not dims:
        raise ValueError("no OFT modules (<name>.oft_blocks) in the weights; is it an OFT file?")
    return dims, alphas


def oft_maker(per_split: bool):
    def make(name, org_modules, dim, alpha, common, options) -> OFTModule:
        return OFTModule(name, org_modules, dim, alpha, per_split=per_split, **common)

    return make


OFT = AdapterType(
    "OFT", "networks.oft", oft_maker(False), prefix="oft", text_encoders=False, own_args=OWN_ARGS,
    parse_options=_parse_options, read_dims=read_oft_dims, boosts=False, keys=("oft_blocks",),
)  # fmt: skip


def check_alpha(network_alpha: float | None) -> float:
    """--network_alpha as OFT's constraint factor (sd-scripts' default and advice)."""
    if network_alpha is None:
        logger.info("OFT: --network_alpha not set, constraint factor %g", DEFAULT_ALPHA)
        return DEFAULT_ALPHA
    if network_alpha >= 1:
        logger.warning(
            "OFT: --network_alpha %g is the constraint factor; values like 1e-3 are usual (>= 1 barely constrains)", network_alpha
        )
    return float(network_alpha)


def sd_oft_names(unet: nn.Module, unet_name_map: dict[str, str] | None, options: dict) -> list[str]:
    """The OFT module names of an SD 1.x/2.x or SDXL U-Net for enable_all_linear / enable_conv."""
    from networks.lora import unet_adapter_names

    targets = SD_ALL_LINEAR_TARGETS if options.get("enable_all_linear") else SD_ATTENTION_TARGETS
    names = []
    for name, _alias, module in unet_adapter_names(unet, targets, unet_name_map, OFT):
        if isinstance(module, nn.Linear) or module.kernel_size == (1, 1):
            names.append(name)
    if options.get("enable_conv"):
        names += [name for name, _alias, _module in unet_adapter_names(unet, SD_CONV_TARGETS, unet_name_map, OFT)]
    return names


def sd3_oft_names(transformer: nn.Module, options: dict) -> list[str]:
    """The OFT module names of an SD3 MMDiT: the joint blocks' attention projections, or all their Linears."""
    from networks.lora_sd3 import sd3_lora_targets

    if options.get("enable_conv"):
        raise ValueError("network_args enable_conv: SD3's MMDiT has no convolutions to adapt")
    names = []
    for t in sd3_lora_targets(transformer):
        if not t.sai.startswith("joint_blocks."):
            continue
        if options.get("enable_all_linear") or ".attn." in t.sai or ".attn2." in t.sai:
            names.append(OFT.unet_name(t.name))
    return names


def create_network(
    multiplier: float,
    network_dim: int | None,
    network_alpha: float | None,
    text_encoders,
    unet: nn.Module,
    neuron_dropout: float | None = None,
    adapter: AdapterType | None = None,
    **kwargs,
) -> nn.Module:
    """sd-scripts' entry point (`--network_module networks.oft`): an OFT network on an SD 1.x/2.x, SDXL or SD3 model."""
    adapter, rest = (adapter or OFT).with_options(dict(kwargs))
    family = family_network_module(unet)
    if family.__name__ == "networks.lora_flux":
        raise ValueError("networks.oft is for SD 1.x/2.x, SDXL and SD3; FLUX's OFT is --network_module networks.oft_flux")
    if neuron_dropout:
        raise ValueError("--network_dropout: OFT has no dropout; leave it out")
    alpha = check_alpha(network_alpha)
    dim = network_dim or 4
    unet_name_map = rest.pop("unet_name_map", None)
    rest.pop("te_prefixes", None)
    check_no_other_args(rest, adapter)
    if family.__name__ == "networks.lora_sd3":
        names = sd3_oft_names(unet, adapter.options)
        return family.SD3LoRANetwork(
            None, unet, dict.fromkeys(names, dim), dict.fromkeys(names, alpha), multiplier, adapter=adapter
        )
    names = sd_oft_names(unet, unet_name_map, adapter.options)
    logger.info("OFT: %d modules, %d blocks each, constraint factor %g", len(names), dim, alpha)
    return family.LoRANetwork(
        [], unet, multiplier=multiplier, module_dims=dict.fromkeys(names, dim), module_alphas=dict.fromkeys(names, alpha),
        unet_name_map=unet_name_map, adapter=adapter,
    )  # fmt: skip


def create_network_from_weights(
    multiplier: float,
    state_dict: dict[str, torch.Tensor],
    text_encoders,
    unet: nn.Module,
    adapter: AdapterType | None = None,
    **kwargs,
) -> nn.Module:
    """A network shaped like an OFT file (block counts and alphas per module); loads nothing yet."""
    adapter, rest = (adapter or OFT).with_options(dict(kwargs))
    family = family_network_module(unet)
    if family.__name__ == "networks.lora_flux":
        raise ValueError("networks.oft is for SD 1.x/2.x, SDXL and SD3; FLUX's OFT is --network_module networks.oft_flux")
    unet_name_map = rest.pop("unet_name_map", None)
    rest.pop("te_prefixes", None)
    check_no_other_args(rest, adapter)
    dims, alphas = adapter.dims_of_file(state_dict)
    if family.__name__ == "networks.lora_sd3":
        return family.SD3LoRANetwork(None, unet, dims, alphas, multiplier, adapter=adapter)
    return family.LoRANetwork(
        [], unet, multiplier=multiplier, module_dims=dims, module_alphas=alphas, unet_name_map=unet_name_map, adapter=adapter
    )


def check_no_other_args(args: dict, adapter: AdapterType) -> None:
    """OFT takes only its own network_args (sd-scripts' OFT has no block, rank or dropout arguments)."""
    if args:
        valid = ", ".join(sorted(adapter.own_args))
        raise ValueError(f"unknown network_args for {adapter.module}: {', '.join(sorted(args))}; valid: {valid}")
