"""OFT for FLUX.1, sd-scripts' `networks.oft_flux`: the maths of networks.oft, with sd-scripts' FLUX file layout.

A layer that BFL fuses (double blocks' `img_attn.qkv` / `txt_attn.qkv`: q, k, v; single blocks' `linear1`: q, k, v and
the MLP input) is rotated per part: one `oft_blocks.N` (k, part/k, part/k) per part, each constrained to
alpha x its own width. Every other layer has `oft_blocks.0` alone. Keys: `oft_unet_<BFL module name>.oft_blocks.N`
and `.alpha` (e.g. `oft_unet_double_blocks_0_img_attn_qkv.oft_blocks.2`). The parts are exactly the diffusers Linears
kiln trains (to_q, to_k, to_v, proj_mlp), so each is rotated without copying the others.

Targets: the double blocks' attention projections (`img_attn_qkv`, `img_attn_proj`, `txt_attn_qkv`, `txt_attn_proj`);
network_arg enable_all_linear=True: every Linear of the double and single blocks (modulations and MLPs included).
Text encoders, embedders and the final layer are not adapted. ComfyUI cannot read this layout (and clamps with
another constraint): tools/convert_network.py writes a file it applies.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from networks.adapter import AdapterType
from networks.oft import OFT, check_alpha, check_no_other_args, oft_maker

KILN_NETWORK = True  # kiln's network-module interface (not sd-scripts'): see library/method_adapter.py
ADAPTS_TEXT_ENCODERS = False  # OFT adapts the U-Net / transformer only (as sd-scripts)
LIMITS_WEIGHT_NORMS = False  # a rotation: --scale_weight_norms does not apply

ATTENTION_SUFFIXES = ("img_attn_qkv", "img_attn_proj", "txt_attn_qkv", "txt_attn_proj")


def part_widths(tensors: dict[str, torch.Tensor]) -> list[int]:
    """The output widths of a per-part OFT module's parts (`oft_blocks.N` of shape (k, b, b): k x b rows each)."""
    parts = sorted((int(s.rsplit(".", 1)[1]), t) for s, t in tensors.items() if s.startswith("oft_blocks."))
    return [t.shape[0] * t.shape[1] for _, t in parts]


OFT_FLUX = replace(
    OFT, module="networks.oft_flux", make=oft_maker(True), own_args=frozenset({"enable_all_linear"}), keys=("oft_blocks.",),
    file_splits=part_widths,
)  # fmt: skip


def flux_oft_names(transformer: nn.Module, options: dict) -> list[str]:
    """The OFT module names of a FLUX transformer: the double blocks' attention projections, or every block Linear."""
    from networks.lora_flux import _block_kind, transformer_candidates

    names = []
    for name, _paths in transformer_candidates(transformer):
        kind, _index, suffix = _block_kind(name[len("lora_unet_") :])
        if kind == "double" and suffix in ATTENTION_SUFFIXES or options.get("enable_all_linear") and kind in ("double", "single"):
            names.append(OFT_FLUX.unet_name(name))
    return names


def _flux_only(transformer: nn.Module) -> None:
    if type(transformer).__name__ != "FluxTransformer2DModel":
        raise ValueError("networks.oft_flux is for FLUX.1; SD 1.x/2.x, SDXL and SD3 use --network_module networks.oft")


def create_network(
    multiplier: float,
    network_dim: int | None,
    network_alpha: float | None,
    text_encoders,
    transformer: nn.Module,
    neuron_dropout: float | None = None,
    adapter: AdapterType | None = None,
    **kwargs,
) -> nn.Module:
    """sd-scripts' entry point (`--network_module networks.oft_flux`)."""
    from networks.lora_flux import FluxLoRANetwork

    _flux_only(transformer)
    adapter, rest = (adapter or OFT_FLUX).with_options(dict(kwargs))
    check_no_other_args(rest, adapter)
    if neuron_dropout:
        raise ValueError("--network_dropout: OFT has no dropout; leave it out")
    alpha, dim = check_alpha(network_alpha), network_dim or 4
    names = flux_oft_names(transformer, adapter.options)
    return FluxLoRANetwork(None, transformer, dict.fromkeys(names, dim), dict.fromkeys(names, alpha), multiplier, adapter=adapter)


def create_network_from_weights(
    multiplier: float,
    state_dict: dict[str, torch.Tensor],
    text_encoders,
    transformer: nn.Module,
    adapter: AdapterType | None = None,
    **kwargs,
) -> nn.Module:
    """A network shaped like a FLUX OFT file; loads nothing yet."""
    from networks.lora_flux import FluxLoRANetwork

    _flux_only(transformer)
    adapter, rest = (adapter or OFT_FLUX).with_options(dict(kwargs))
    check_no_other_args(rest, adapter)
    dims, alphas = adapter.dims_of_file(state_dict)
    return FluxLoRANetwork(None, transformer, dims, alphas, multiplier, adapter=adapter)
