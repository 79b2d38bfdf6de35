"""Name maps between diffusers / transformers module names and the original (LDM / sgm) single-file names.

One place for the maps every family's single-file writer and LoRA naming use: the U-Net map is built from a U-Net's
config, so it serves SD 1.x/2.x and SDXL (whose LoRA keys use these sgm names) alike.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

# ---------------------------------------------------------------------------------------------------------------------
# Name maps: diffusers / transformers names -> original (LDM) names
# ---------------------------------------------------------------------------------------------------------------------

_RESNET_TO_LDM = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}


def _as_list(value, n: int) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


def _unet_prefix_table(config: Mapping) -> dict[str, tuple[str, str]]:
    """diffusers module prefix -> (LDM module prefix, kind) for the blocks of a UNet2DConditionModel config.

    kind: "leaf" (a module without mapped children), "resnet" (ResnetBlock2D: children renamed), "same" (children keep
    their names: Transformer2DModel), "down" (Downsample2D: conv -> op), "up" (Upsample2D: conv -> conv).
    """
    down_types = list(config["down_block_types"])
    up_types = list(config["up_block_types"])
    levels = len(down_types)
    layers = _as_list(config["layers_per_block"], levels)
    table: dict[str, tuple[str, str]] = {
        "conv_in": ("input_blocks.0.0", "leaf"),
        "time_embedding.linear_1": ("time_embed.0", "leaf"),
        "time_embedding.linear_2": ("time_embed.2", "leaf"),
        "conv_norm_out": ("out.0", "leaf"),
        "conv_out": ("out.2", "leaf"),
    }
    if config.get("class_embed_type") in ("timestep", "projection"):
        table["class_embedding.linear_1"] = ("label_emb.0.0", "leaf")
        table["class_embedding.linear_2"] = ("label_emb.0.2", "leaf")
    if config.get("addition_embed_type") == "text_time":
        table["add_embedding.linear_1"] = ("label_emb.0.0", "leaf")
        table["add_embedding.linear_2"] = ("label_emb.0.2", "leaf")

    n = 1  # input_blocks.0 is conv_in
    for i, block_type in enumerate(down_types):
        for j in range(layers[i]):
            table[f"down_blocks.{i}.resnets.{j}"] = (f"input_blocks.{n}.0", "resnet")
            if "CrossAttn" in block_type:
                table[f"down_blocks.{i}.attentions.{j}"] = (f"input_blocks.{n}.1", "same")
            n += 1
        if i < levels - 1:
            table[f"down_blocks.{i}.downsamplers.0"] = (f"input_blocks.{n}.0", "down")
            n += 1

    mid_type = config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if mid_type == "UNetMidBlock2DCrossAttn":
        table["mid_block.resnets.0"] = ("middle_block.0", "resnet")
        table["mid_block.attentions.0"] = ("middle_block.1", "same")
        table["mid_block.resnets.1"] = ("middle_block.2", "resnet")
    elif mid_type is not None:
        raise ValueError(f"no original (LDM) layout known for mid_block_type {mid_type!r}")

    up_layers = list(reversed(layers))
    n = 0
    for i, block_type in enumerate(up_types):
        cross = "CrossAttn" in block_type
        for j in range(up_layers[i] + 1):
            table[f"up_blocks.{i}.resnets.{j}"] = (f"output_blocks.{n}.0", "resnet")
            if cross:
                table[f"up_blocks.{i}.attentions.{j}"] = (f"output_blocks.{n}.1", "same")
            if j == up_layers[i] and i < levels - 1:
                table[f"up_blocks.{i}.upsamplers.0"] = (f"output_blocks.{n}.{2 if cross else 1}", "up")
            n += 1
    return table


def _map_with_table(name: str, table: Mapping[str, tuple[str, str]]) -> str | None:
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        entry = table.get(".".join(parts[:cut]))
        if entry is None:
            continue
        ldm, kind = entry
        rest = parts[cut:]
        if not rest:
            return ldm
        if kind == "same":
            return ".".join([ldm, *rest])
        if kind == "resnet" and rest[0] in _RESNET_TO_LDM:
            return ".".join([ldm, _RESNET_TO_LDM[rest[0]], *rest[1:]])
        if kind == "down" and rest[0] == "conv":
            return ".".join([ldm, "op", *rest[1:]])
        if kind == "up" and rest[0] == "conv":
            return ".".join([ldm, "conv", *rest[1:]])
        return None
    return None


def _unet_module(unet_or_config):
    """A UNet2DConditionModel: the given one, or one built without weights from a config."""
    if isinstance(unet_or_config, torch.nn.Module):
        return unet_or_config
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    with init_empty_weights():
        return UNet2DConditionModel(**dict(unet_or_config))


def unet_ldm_module_names(unet) -> dict[str, str]:
    """Every diffusers U-Net module path -> its original (LDM/sgm) module path, without the `model.diffusion_model.` prefix.

    `unet` is a UNet2DConditionModel or its config. Covers every module that owns parameters and the block-level
    containers (resnets, transformers, samplers); modules with no original counterpart (activations, dropouts,
    `down_blocks.N` themselves) are left out. Works for any number of levels, layers and transformer depths (SD1/2, SDXL).
    Example: `down_blocks.0.resnets.0.conv1` -> `input_blocks.1.0.in_layers.2`.
    """
    module = _unet_module(unet)
    table = _unet_prefix_table(module.config)
    names = {}
    for name, _ in module.named_modules():
        if not name:
            continue
        ldm = _map_with_table(name, table)
        if ldm is not None:
            names[name] = ldm
    return names


def unet_ldm_param_names(unet) -> dict[str, str]:
    """Every U-Net state-dict key -> its LDM key (without `model.diffusion_model.`)."""
    module = _unet_module(unet)
    table = _unet_prefix_table(module.config)
    names = {}
    for key in module.state_dict().keys():
        ldm = _map_with_table(key.rsplit(".", 1)[0], table)
        if ldm is None:
            raise ValueError(f"U-Net parameter {key} has no original (LDM) name")
        names[key] = f"{ldm}.{key.rsplit('.', 1)[1]}"
    return names


_VAE_ATTN_TO_LDM = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_VAE_RESNET_TO_LDM = {"conv_shortcut": "nin_shortcut"}


def _vae_ldm_name(key: str, levels: int) -> str:
    side, _, rest = key.partition(".")
    if side not in ("encoder", "decoder"):
        return key  # quant_conv, post_quant_conv
    m = re.fullmatch(r"(down|up)_blocks\.(\d+)\.resnets\.(\d+)\.([a-z_0-9]+)\.(\w+)", rest)
    if m:
        kind, i, j, layer, leaf = m.groups()
        level = int(i) if kind == "down" else levels - 1 - int(i)  # the LDM decoder counts levels from the bottom
        return f"{side}.{kind}.{level}.block.{j}.{_VAE_RESNET_TO_LDM.get(layer, layer)}.{leaf}"
    m = re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(\w+)", rest)
    if m:
        return f"{side}.down.{m.group(1)}.downsample.conv.{m.group(2)}"
    m = re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(\w+)", rest)
    if m:
        return f"{side}.up.{levels - 1 - int(m.group(1))}.upsample.conv.{m.group(2)}"
    m = re.fullmatch(r"mid_block\.resnets\.(\d+)\.([a-z_0-9]+)\.(\w+)", rest)
    if m:
        layer = m.group(2)
        return f"{side}.mid.block_{int(m.group(1)) + 1}.{_VAE_RESNET_TO_LDM.get(layer, layer)}.{m.group(3)}"
    m = re.fullmatch(r"mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(\w+)", rest)
    if m:
        return f"{side}.mid.attn_1.{_VAE_ATTN_TO_LDM[m.group(1)]}.{m.group(2)}"
    m = re.fullmatch(r"conv_norm_out\.(\w+)", rest)
    if m:
        return f"{side}.norm_out.{m.group(1)}"
    if re.fullmatch(r"conv_(in|out)\.\w+", rest):
        return key
    raise ValueError(f"VAE parameter {key} has no original (LDM) name")


def vae_ldm_param_names(vae) -> dict[str, str]:
    """Every AutoencoderKL state-dict key -> its LDM key (without `first_stage_model.`).

    The LDM file stores the mid-block attention q/k/v/proj_out weights as 1x1 convolutions (shape [out, in, 1, 1]).
    """
    levels = len(vae.config.down_block_types)
    return {key: _vae_ldm_name(key, levels) for key in vae.state_dict().keys()}


_OPEN_CLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "self_attn.out_proj": "attn.out_proj",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
OPEN_CLIP_QKV = ("q_proj", "k_proj", "v_proj")  # order of the rows of OpenCLIP's in_proj_weight / in_proj_bias


def _strip_text_model(key: str) -> str:
    return key[len("text_model.") :] if key.startswith("text_model.") else key


def _open_clip_name(key: str) -> str:
    key = _strip_text_model(key)
    fixed = {
        "embeddings.token_embedding.weight": "token_embedding.weight",
        "embeddings.position_embedding.weight": "positional_embedding",
        "final_layer_norm.weight": "ln_final.weight",
        "final_layer_norm.bias": "ln_final.bias",
        "text_projection.weight": "text_projection",  # CLIPTextModelWithProjection; OpenCLIP stores the transpose
    }
    if key in fixed:
        return fixed[key]
    m = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", key)
    if m:
        layer, module, leaf = m.groups()
        if module.startswith("self_attn.") and module.split(".")[1] in OPEN_CLIP_QKV:
            return f"transformer.resblocks.{layer}.attn.in_proj_{leaf}"
        if module in _OPEN_CLIP_LAYER:
            return f"transformer.resblocks.{layer}.{_OPEN_CLIP_LAYER[module]}.{leaf}"
    raise ValueError(f"text encoder parameter {key} has no OpenCLIP name")


def text_encoder_ldm_param_names(text_encoder, v2: bool = False) -> dict[str, str]:
    """Every CLIPTextModel state-dict key -> its key in an original single file, relative to the text encoder prefix.

    SD1 (prefix `cond_stage_model.transformer.`): `text_model.` + the transformers name, e.g.
    `encoder.layers.0.self_attn.q_proj.weight` -> `text_model.encoder.layers.0.self_attn.q_proj.weight` (transformers 5
    flattens CLIPTextModel names; the file keeps `text_model.`). SD2 (prefix `cond_stage_model.model.`) and SDXL's
    second encoder (`conditioner.embedders.1.model.`, a CLIPTextModelWithProjection): OpenCLIP names; q_proj / k_proj /
    v_proj of a layer all map to the layer's `attn.in_proj_weight` (or `_bias`), whose rows hold q, k, v in that order
    (see `open_clip_qkv_rows`); `text_projection.weight` maps to `text_projection`, stored transposed.
    """
    keys = [k for k in text_encoder.state_dict().keys() if not k.endswith("position_ids")]
    if v2:
        return {k: _open_clip_name(k) for k in keys}
    return {k: "text_model." + _strip_text_model(k) for k in keys}


def open_clip_qkv_rows(key: str, hidden_size: int) -> slice | None:
    """For an SD2 q/k/v projection key, the rows of the OpenCLIP in_proj tensor that hold it; None for other keys."""
    m = re.search(r"self_attn\.(q_proj|k_proj|v_proj)\.", key)
    if not m:
        return None
    i = OPEN_CLIP_QKV.index(m.group(1))
    return slice(i * hidden_size, (i + 1) * hidden_size)
