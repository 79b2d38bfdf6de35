"""Stable Diffusion 1.x / 2.x model files: loading and saving.

Reads the three inputs users have: kiln's built-in tiny models, diffusers folders, and original ("LDM") single files
(`.safetensors`, or `.ckpt`/`.pt` through `torch.load(weights_only=True)` only). LDM -> diffusers conversion uses
diffusers' own functions; model configs come from the state dict's shapes with the real models' conventions, so nothing
is fetched from a hub. Saving writes kiln's own diffusers -> LDM conversion (diffusers has none in that direction).

The diffusers <-> LDM name maps live in library/ldm_names.py, file reading in library/checkpoint_files.py.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import re
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch

from library.checkpoint_files import (  # noqa: F401  (re-exported for callers of this module)
    CLIP_L_PREFIX,
    FAMILY_NAMES,
    FAMILY_SCRIPTS,
    OPEN_CLIP_PREFIX,
    PICKLE_SUFFIXES,
    UNET_PREFIX,
    VAE_PREFIX,
    ModelLoadError,
    _family_error,
    _is_pickle_path,
    _shape,
    detect_family,
    read_key_shapes,
    read_state_dict,
)
from library.ldm_names import (  # noqa: F401
    OPEN_CLIP_QKV,
    _strip_text_model,
    open_clip_qkv_rows,
    text_encoder_ldm_param_names,
    unet_ldm_module_names,
    unet_ldm_param_names,
    vae_ldm_param_names,
)

logger = logging.getLogger(__name__)


CLIP_L_HUB_ID = "openai/clip-vit-large-patch14"
SD2_HUB_ID = "stabilityai/stable-diffusion-2"  # tokenizer in subfolder "tokenizer"


@dataclass
class SDModel:
    """The four parts of an SD 1.x/2.x model, in diffusers / transformers classes."""

    text_encoder: Any  # transformers.CLIPTextModel
    tokenizer: Any  # transformers.CLIPTokenizer
    vae: Any  # diffusers.AutoencoderKL
    unet: Any  # diffusers.UNet2DConditionModel
    v2: bool
    source: str


# ---------------------------------------------------------------------------------------------------------------------
# Reference configs of the real models (diffusers / transformers layouts). Facts about the published models; used as
# defaults for what shapes cannot tell (sample sizes, scaling factor, eps) and by the tests of the shape inference.
# ---------------------------------------------------------------------------------------------------------------------

UNET_LDM_SETTINGS = {  # what every original (LDM/sgm) U-Net of SD 1.x, 2.x and SDXL shares, in diffusers' terms
    "act_fn": "silu",
    "center_input_sample": False,
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
}
_SD_UNET_COMMON = {
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    **UNET_LDM_SETTINGS,
}
SD15_UNET = {**_SD_UNET_COMMON, "sample_size": 64, "cross_attention_dim": 768, "attention_head_dim": 8}
SD2_BASE_UNET = {
    **_SD_UNET_COMMON,
    "sample_size": 64,
    "cross_attention_dim": 1024,
    "attention_head_dim": [5, 10, 20, 20],
    "use_linear_projection": True,
}
SD2_V_UNET = {**SD2_BASE_UNET, "sample_size": 96}

SD_VAE_COMMON = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 4,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "scaling_factor": 0.18215,
}
SD15_VAE = {**SD_VAE_COMMON, "sample_size": 512}
SD2_BASE_VAE = {**SD_VAE_COMMON, "sample_size": 512}
SD2_V_VAE = {**SD_VAE_COMMON, "sample_size": 768}

SD15_TEXT_ENCODER = {  # CLIP ViT-L/14 text tower
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-05,
    "projection_dim": 768,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}
SD2_TEXT_ENCODER = {  # OpenCLIP ViT-H/14 text tower, last of its 24 layers dropped (SD2 uses the penultimate output)
    **SD15_TEXT_ENCODER,
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 23,
    "num_attention_heads": 16,
    "hidden_act": "gelu",
    "projection_dim": 512,
}

_SD_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
}

REFERENCE_CONFIGS = {
    "sd15": {
        "unet": SD15_UNET,
        "vae": SD15_VAE,
        "text_encoder": SD15_TEXT_ENCODER,
        "scheduler": {**_SD_SCHEDULER, "prediction_type": "epsilon"},
    },
    "sd2-base": {
        "unet": SD2_BASE_UNET,
        "vae": SD2_BASE_VAE,
        "text_encoder": SD2_TEXT_ENCODER,
        "scheduler": {**_SD_SCHEDULER, "prediction_type": "epsilon"},
    },
    "sd2-v": {
        "unet": SD2_V_UNET,
        "vae": SD2_V_VAE,
        "text_encoder": SD2_TEXT_ENCODER,
        "scheduler": {**_SD_SCHEDULER, "prediction_type": "v_prediction"},
    },
}


def reference_config(model: str, component: str) -> dict:
    """A copy of a real model's config: model in {"sd15", "sd2-base", "sd2-v"}, component in unet/vae/text_encoder/scheduler."""
    return copy.deepcopy(REFERENCE_CONFIGS[model][component])


# ---------------------------------------------------------------------------------------------------------------------
# Config inference from state dict shapes
# ---------------------------------------------------------------------------------------------------------------------


def _indices(keys: Iterable[str], prefix: str) -> list[int]:
    """Sorted distinct N of keys `prefix` + `N.`..."""
    found = set()
    for k in keys:
        if k.startswith(prefix):
            head = k[len(prefix) :].split(".", 1)[0]
            if head.isdigit():
                found.add(int(head))
    return sorted(found)


def infer_unet_config(checkpoint: Mapping[str, Any], v2: bool) -> dict:
    """A UNet2DConditionModel config from an LDM U-Net's shapes (keys with or without `model.diffusion_model.`).

    Head conventions of the real models: SD1 has 8 heads everywhere (`attention_head_dim=8` in diffusers' naming), SD2
    64-wide heads (`attention_head_dim=[channels // 64 per level]`).
    """
    if any(k.startswith(UNET_PREFIX) for k in checkpoint):
        sd = {k[len(UNET_PREFIX) :]: _shape(v) for k, v in checkpoint.items() if k.startswith(UNET_PREFIX)}
    else:
        sd = {k: _shape(v) for k, v in checkpoint.items()}
    if "input_blocks.0.0.weight" not in sd or "out.2.weight" not in sd:
        raise ModelLoadError("no U-Net (model.diffusion_model.input_blocks.* / out.*) in the checkpoint")

    def transformer_info(prefix: str):
        if f"{prefix}.proj_in.weight" not in sd:
            return None
        depth = len(_indices(sd, f"{prefix}.transformer_blocks."))
        return {
            "depth": depth,
            "linear": len(sd[f"{prefix}.proj_in.weight"]) == 2,
            "context": sd[f"{prefix}.transformer_blocks.0.attn2.to_k.weight"][1],
        }

    levels: list[dict] = []
    current = {"layers": 0, "channels": None, "attn": None}
    for n in _indices(sd, "input_blocks.")[1:]:
        if f"input_blocks.{n}.0.op.weight" in sd:  # a downsampler closes a level
            levels.append(current)
            current = {"layers": 0, "channels": None, "attn": None}
            continue
        current["layers"] += 1
        current["channels"] = sd[f"input_blocks.{n}.0.out_layers.3.weight"][0]
        info = transformer_info(f"input_blocks.{n}.1")
        if info is not None:
            current["attn"] = info
    levels.append(current)

    output_ids = _indices(sd, "output_blocks.")
    per_up_level = len(output_ids) // len(levels)
    up_attn = []
    for i in range(len(levels)):
        ids = output_ids[i * per_up_level : (i + 1) * per_up_level]
        up_attn.append(any(f"output_blocks.{n}.1.proj_in.weight" in sd for n in ids))

    mid = transformer_info("middle_block.1")
    attn_infos = [lv["attn"] for lv in levels if lv["attn"]] + ([mid] if mid else [])
    if not attn_infos:
        raise ModelLoadError("the U-Net has no cross-attention blocks; not an SD 1.x/2.x U-Net")

    channels = [int(lv["channels"]) for lv in levels]
    layers = [lv["layers"] for lv in levels]
    depths = [lv["attn"]["depth"] if lv["attn"] else 1 for lv in levels]
    if mid and not levels[-1]["attn"]:
        depths[-1] = mid["depth"]  # diffusers' mid block takes the last level's transformer depth
    config = reference_config("sd2-base" if v2 else "sd15", "unet")
    config.update(
        {
            "in_channels": sd["input_blocks.0.0.weight"][1],
            "out_channels": sd["out.2.weight"][0],
            "block_out_channels": channels,
            "layers_per_block": layers[0] if len(set(layers)) == 1 else layers,
            "down_block_types": ["CrossAttnDownBlock2D" if lv["attn"] else "DownBlock2D" for lv in levels],
            "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in up_attn],
            "mid_block_type": "UNetMidBlock2DCrossAttn" if mid else None,
            "cross_attention_dim": int(attn_infos[0]["context"]),
            "use_linear_projection": bool(attn_infos[0]["linear"]),
            "transformer_layers_per_block": depths[0] if len(set(depths)) == 1 else depths,
            "attention_head_dim": [max(1, c // 64) for c in channels] if v2 else 8,
        }
    )
    return config


def infer_vae_config(diffusers_sd: Mapping[str, Any], v2: bool = False, reference: Mapping[str, Any] | None = None) -> dict:
    """An AutoencoderKL config from a diffusers-layout VAE state dict's shapes.

    `reference` gives what shapes cannot tell (scaling factor, sample size, ...): a real model's VAE config; default
    the SD 1.x / 2.x one.
    """
    sd = {k: _shape(v) for k, v in diffusers_sd.items()}
    levels = _indices(sd, "encoder.down_blocks.")
    if not levels or "decoder.conv_in.weight" not in sd:
        raise ModelLoadError("no VAE encoder/decoder weights found")
    config = copy.deepcopy(dict(reference)) if reference is not None else reference_config("sd2-base" if v2 else "sd15", "vae")
    config.update(
        {
            "in_channels": sd["encoder.conv_in.weight"][1],
            "out_channels": sd["decoder.conv_out.weight"][0],
            "down_block_types": ["DownEncoderBlock2D"] * len(levels),
            "up_block_types": ["UpDecoderBlock2D"] * len(levels),
            "block_out_channels": [sd[f"encoder.down_blocks.{i}.resnets.0.conv2.weight"][0] for i in levels],
            "layers_per_block": len(_indices(sd, "encoder.down_blocks.0.resnets.")),
            "latent_channels": sd["decoder.conv_in.weight"][1],
            "use_quant_conv": "quant_conv.weight" in sd,
            "use_post_quant_conv": "post_quant_conv.weight" in sd,
            "mid_block_add_attention": "encoder.mid_block.attentions.0.to_q.weight" in sd,
        }
    )
    return config


def infer_text_encoder_config(diffusers_sd: Mapping[str, Any], v2: bool) -> dict:
    """A CLIPTextConfig dict from a transformers-layout CLIP text state dict's shapes (keys with or without `text_model.`).

    64-wide heads as CLIP-L and OpenCLIP-H; SD1 quick_gelu, SD2 gelu; bos/eos are the last two vocabulary entries (as
    in CLIP's tokenizer), pad is eos for SD1 and id 0 ("!") for SD2 as their tokenizers pad.
    """
    sd = {_strip_text_model(k): _shape(v) for k, v in diffusers_sd.items()}
    try:
        vocab, hidden = sd["embeddings.token_embedding.weight"]
        positions = sd["embeddings.position_embedding.weight"][0]
        intermediate = sd["encoder.layers.0.mlp.fc1.weight"][0]
    except KeyError as e:
        raise ModelLoadError(f"incomplete text encoder: {e.args[0]} missing") from e
    heads = max(1, hidden // 64)
    if hidden % heads:
        heads = 1
    config = reference_config("sd2-base" if v2 else "sd15", "text_encoder")
    config.update(
        {
            "vocab_size": vocab,
            "hidden_size": hidden,
            "intermediate_size": intermediate,
            "num_hidden_layers": len(_indices(sd, "encoder.layers.")),
            "num_attention_heads": heads,
            "max_position_embeddings": positions,
            "hidden_act": "gelu" if v2 else "quick_gelu",
            "bos_token_id": vocab - 2,
            "eos_token_id": vocab - 1,
            "pad_token_id": 0 if v2 else vocab - 1,
        }
    )
    if hidden != reference_config("sd2-base" if v2 else "sd15", "text_encoder")["hidden_size"]:
        config["projection_dim"] = hidden  # not a real-size model: no reference projection width
    return config


# ---------------------------------------------------------------------------------------------------------------------
# LDM -> diffusers (diffusers' own conversion functions)
# ---------------------------------------------------------------------------------------------------------------------


def _build_and_load(cls_or_factory, state_dict: dict, dtype, what: str, source: str):
    """Instantiate without allocating weights, then load `state_dict` strictly (every key must match)."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = cls_or_factory()
    state_dict = {k: v.to(dtype).contiguous() if v.is_floating_point() else v.contiguous() for k, v in state_dict.items()}
    try:
        model.load_state_dict(state_dict, strict=True, assign=True)
    except RuntimeError as e:
        raise ModelLoadError(f"{source}: the {what} weights do not fit the inferred architecture: {e}") from e
    return model.eval()


def unet_from_ldm(checkpoint: Mapping[str, torch.Tensor], v2: bool, dtype=torch.float32, source: str = "checkpoint"):
    """A UNet2DConditionModel from an LDM checkpoint's `model.diffusion_model.*` weights."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    config = infer_unet_config(checkpoint, v2)
    if isinstance(config["layers_per_block"], list):
        raise ModelLoadError(f"{source}: U-Net levels with different numbers of layers are not supported")
    converted = convert_ldm_unet_checkpoint(dict(checkpoint), config)
    return _build_and_load(lambda: UNet2DConditionModel(**config), converted, dtype, "U-Net", source)


def _vae_to_diffusers_layout(checkpoint: Mapping[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """A VAE state dict in diffusers layout from LDM keys (with or without `first_stage_model.`/`vae.`) or diffusers keys."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    keys = list(checkpoint.keys())
    for prefix in ("", VAE_PREFIX, "vae."):
        if any(k.startswith(prefix + "encoder.down_blocks.") for k in keys):
            return {k[len(prefix) :]: v for k, v in checkpoint.items() if k.startswith(prefix)}
    for prefix in (VAE_PREFIX, "vae.", ""):
        levels = _indices(keys, prefix + "encoder.down.")
        if levels:
            sub = {k[len(prefix) :]: v for k, v in checkpoint.items() if k.startswith(prefix)}
            n = len(levels)
            return convert_ldm_vae_checkpoint(
                sub, {"down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n}
            )
    raise ModelLoadError(f"{source}: no VAE weights (first_stage_model.encoder.* or encoder.down_blocks.*) found")


def vae_from_state_dict(
    checkpoint: Mapping[str, torch.Tensor],
    dtype=torch.float32,
    source: str = "checkpoint",
    v2=False,
    reference: Mapping[str, Any] | None = None,
):
    """An AutoencoderKL from LDM-layout (any prefix) or diffusers-layout VAE weights (`reference`: see infer_vae_config)."""
    from diffusers import AutoencoderKL

    converted = _vae_to_diffusers_layout(checkpoint, source)
    config = infer_vae_config(converted, v2, reference)
    return _build_and_load(lambda: AutoencoderKL(**config), converted, dtype, "VAE", source)


def _text_encoder_to_diffusers_layout(checkpoint: Mapping[str, torch.Tensor], v2: bool, source: str) -> dict:
    """The text encoder of an LDM checkpoint in transformers CLIPTextModel names (flattened, no `text_model.`)."""
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint

    if v2:
        # SD2 conditions on the penultimate layer: the file's last resblock is never used, so diffusers' model has one
        # layer fewer (23 of OpenCLIP-H's 24). Drop the last one whatever the depth (tiny models included).
        layer_prefix = OPEN_CLIP_PREFIX + "transformer.resblocks."
        layers = _indices(checkpoint, layer_prefix)
        if not layers or OPEN_CLIP_PREFIX + "token_embedding.weight" not in checkpoint:
            raise ModelLoadError(f"{source}: no OpenCLIP text encoder ({layer_prefix}*) in the checkpoint")
        last = f"{layer_prefix}{layers[-1]}."
        kept = {k: v for k, v in checkpoint.items() if k.startswith(OPEN_CLIP_PREFIX) and not k.startswith(last)}
        hidden = _shape(kept[OPEN_CLIP_PREFIX + "token_embedding.weight"])[1]
        stub = SimpleNamespace(config=SimpleNamespace(hidden_size=hidden))  # read only when text_projection is absent
        converted = convert_open_clip_checkpoint(stub, kept, prefix=OPEN_CLIP_PREFIX)
    else:
        kept = {k: v for k, v in checkpoint.items() if k.startswith(CLIP_L_PREFIX)}
        if not kept:
            raise ModelLoadError(f"{source}: no CLIP text encoder ({CLIP_L_PREFIX}*) in the checkpoint")
        converted = convert_ldm_clip_checkpoint(kept)
    converted = {_strip_text_model(k): v for k, v in converted.items() if not k.endswith("position_ids")}
    converted.pop("text_projection.weight", None)
    return converted


def text_encoder_from_ldm(checkpoint: Mapping[str, torch.Tensor], v2: bool, dtype=torch.float32, source: str = "checkpoint"):
    """A CLIPTextModel from an LDM checkpoint's text encoder (SD1: CLIP-L, SD2: OpenCLIP-H without its last layer)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    converted = _text_encoder_to_diffusers_layout(checkpoint, v2, source)
    config = CLIPTextConfig(**infer_text_encoder_config(converted, v2))
    return _build_and_load(lambda: CLIPTextModel(config), converted, dtype, "text encoder", source)


def infer_single_file_configs(checkpoint: Mapping[str, Any], v2: bool) -> dict[str, dict]:
    """The diffusers/transformers configs kiln builds for an LDM checkpoint (shapes only: meta tensors are fine)."""
    configs = {"unet": infer_unet_config(checkpoint, v2)}
    if any(k.startswith(VAE_PREFIX) for k in checkpoint):
        configs["vae"] = infer_vae_config(_vae_to_diffusers_layout(checkpoint, "checkpoint"), v2)
    configs["text_encoder"] = infer_text_encoder_config(_text_encoder_to_diffusers_layout(checkpoint, v2, "checkpoint"), v2)
    return configs


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------------------------


def tokenizer_hub_id(v2: bool) -> tuple[str, str | None]:
    """(hub id, subfolder) of the tokenizer SD1 / SD2 single files use."""
    return (SD2_HUB_ID, "tokenizer") if v2 else (CLIP_L_HUB_ID, None)


def hub_cache_folder(tokenizer_cache_dir: str, hub_id: str) -> str:
    """`<cache dir>/<hub id with / replaced by _>`, as sd-scripts' --tokenizer_cache_dir."""
    return os.path.join(tokenizer_cache_dir, hub_id.replace("/", "_"))


def tokenizer_cache_folder(tokenizer_cache_dir: str, v2: bool) -> str:
    """Where kiln looks for a single file's tokenizer: `<cache dir>/<hub id with / replaced by _>`."""
    return hub_cache_folder(tokenizer_cache_dir, tokenizer_hub_id(v2)[0])


def _is_tokenizer_folder(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, "vocab.json")) or os.path.isfile(os.path.join(folder, "tokenizer.json"))


def _hf_cache_folder(hub_id: str, subfolder: str | None) -> str | None:
    """The folder of a CLIP tokenizer's files (vocab.json, merges.txt) in the local Hugging Face cache, or None.
    (transformers 5 returns an empty 2-token tokenizer for a hub id whose files are not cached, so the files are looked
    up here first.)"""
    from huggingface_hub import try_to_load_from_cache

    prefix = f"{subfolder}/" if subfolder else ""
    found = [try_to_load_from_cache(hub_id, prefix + name) for name in ("vocab.json", "merges.txt")]
    if all(isinstance(f, str) and os.path.isfile(f) for f in found) and os.path.dirname(found[0]) == os.path.dirname(found[1]):
        return os.path.dirname(found[0])
    return None


def _hf_cache_tokenizer_folder(v2: bool) -> str | None:
    """The folder of the SD1/SD2 tokenizer files in the local Hugging Face cache, or None."""
    return _hf_cache_folder(*tokenizer_hub_id(v2))


def load_clip_tokenizer(
    hub_id: str,
    subfolder: str | None,
    tokenizer_cache_dir: str | None,
    vocab_size: int | None,
    *,
    model_name: str,
    pad_token: str | None = None,
    tiny_pad_token: str = "<|endoftext|>",
    hf_cache_lookup=None,
):
    """The CLIPTokenizer published as `hub_id` (in `subfolder`), offline.

    Looks in: `tokenizer_cache_dir/<hub id with / -> _>` (files directly there or in its `subfolder`, default
    `tokenizer/`), then
    `tokenizer_cache_dir` itself if it holds a tokenizer (e.g. one written by tiny_models.write_tiny_clip_tokenizer),
    then the local Hugging Face cache (`hf_cache_lookup()`, default: look `hub_id` up there). A text encoder with kiln's
    tiny vocabulary gets the built-in tiny tokenizer (padding with `tiny_pad_token`) when none is found. Otherwise
    ModelLoadError naming the folder to provide (`model_name` says for which model). `pad_token`, if given, replaces
    the found tokenizer's padding token (SDXL's second tokenizer pads with "!" whatever its files say).
    """
    from transformers import CLIPTokenizer

    def finish(tokenizer):
        if pad_token is not None and tokenizer.pad_token != pad_token:
            tokenizer.pad_token = pad_token
        return tokenizer

    candidates = []
    if tokenizer_cache_dir:
        folder = hub_cache_folder(tokenizer_cache_dir, hub_id)
        candidates += [folder, os.path.join(folder, subfolder or "tokenizer"), tokenizer_cache_dir]
    for candidate in candidates:
        if _is_tokenizer_folder(candidate):
            return finish(CLIPTokenizer.from_pretrained(candidate))

    cached = hf_cache_lookup() if hf_cache_lookup is not None else _hf_cache_folder(hub_id, subfolder)
    if cached is not None:
        return finish(CLIPTokenizer.from_pretrained(cached))

    from library.tiny_models import TINY_VOCAB, write_tiny_clip_tokenizer

    if vocab_size == TINY_VOCAB:
        with tempfile.TemporaryDirectory() as tmp:
            write_tiny_clip_tokenizer(tmp, pad_token=tiny_pad_token)
            return finish(CLIPTokenizer.from_pretrained(tmp))

    wanted = hub_id + (f" (subfolder {subfolder})" if subfolder else "")
    where = (
        hub_cache_folder(tokenizer_cache_dir, hub_id)
        if tokenizer_cache_dir
        else f"<--tokenizer_cache_dir>/{hub_id.replace('/', '_')}"
    )
    raise ModelLoadError(
        f"no tokenizer for this {model_name} model: kiln needs the files of {wanted} (vocab.json, "
        f"merges.txt, ...) in the folder {where}, or in the local Hugging Face cache. kiln does not download at run time."
    )


def load_tokenizer(v2: bool, tokenizer_cache_dir: str | None = None, vocab_size: int | None = None):
    """The CLIPTokenizer for an SD1/SD2 single file, offline (see load_clip_tokenizer; SD2's files are in the
    `tokenizer/` subfolder of stabilityai/stable-diffusion-2)."""
    hub_id, subfolder = tokenizer_hub_id(v2)
    return load_clip_tokenizer(
        hub_id,
        subfolder,
        tokenizer_cache_dir,
        vocab_size,
        model_name=f"SD {'2.x' if v2 else '1.x'}",
        tiny_pad_token="!" if v2 else "<|endoftext|>",
        hf_cache_lookup=lambda: _hf_cache_tokenizer_folder(v2),
    )


def _check_tokenizer(tokenizer, text_encoder, source: str) -> None:
    vocab = text_encoder.config.vocab_size
    if len(tokenizer) > vocab:
        raise ModelLoadError(
            f"{source}: the tokenizer has {len(tokenizer)} tokens but the text encoder only {vocab}; wrong tokenizer"
        )


# ---------------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------------


def _v2_mismatch(source: str, file_v2: bool) -> ModelLoadError:
    if file_v2:
        return ModelLoadError(f"{source} is an SD 2.x model (OpenCLIP text encoder), but --v2 is not set: add --v2")
    return ModelLoadError(f"{source} is an SD 1.x model (CLIP-L text encoder), but --v2 is set: remove --v2")


def load_vae(path: str, dtype=torch.float32, v2: bool = False, reference: Mapping[str, Any] | None = None):
    """A VAE for `--vae`: a diffusers VAE folder (config.json, or a pipeline folder with vae/), or a single file with
    LDM keys (with or without `first_stage_model.`) or diffusers-layout keys. `reference`: the config defaults for a
    single file (see infer_vae_config; SDXL passes its own scaling factor)."""
    from diffusers import AutoencoderKL

    if os.path.isdir(path):
        for folder in (path, os.path.join(path, "vae")):
            if os.path.isfile(os.path.join(folder, "config.json")):
                return AutoencoderKL.from_pretrained(folder, torch_dtype=dtype).eval()
        raise ModelLoadError(f"VAE folder {path} has no config.json (nor vae/config.json)")
    if not os.path.exists(path):
        raise ModelLoadError(f"VAE not found: {path}")
    return vae_from_state_dict(read_state_dict(path), dtype, source=path, v2=v2, reference=reference)


def _folder_family(path: str) -> tuple[str, bool]:
    """(family, v2) of a diffusers folder, from model_index.json and the component configs."""
    index_path = os.path.join(path, "model_index.json")
    if os.path.isfile(index_path):
        with open(index_path) as f:
            class_name = json.load(f).get("_class_name", "")
        if "XL" in class_name:
            return "sdxl", False
        if "StableDiffusion3" in class_name:
            return "sd3", False
        if "Flux" in class_name:
            return "flux", False
    unet_config = os.path.join(path, "unet", "config.json")
    te_config = os.path.join(path, "text_encoder", "config.json")
    if not os.path.isfile(unet_config) or not os.path.isfile(te_config):
        raise ModelLoadError(f"{path} is not a diffusers SD folder (needs model_index.json, unet/, vae/, text_encoder/)")
    with open(unet_config) as f:
        unet = json.load(f)
    if unet.get("addition_embed_type") == "text_time":
        return "sdxl", False
    with open(te_config) as f:
        te = json.load(f)
    return ("sd2" if te.get("hidden_act") == "gelu" else "sd1"), te.get("hidden_act") == "gelu"


def _load_builtin(name: str, v2: bool) -> tuple:
    from library.tiny_models import BUILTIN_FAMILY, TINY_SD, TINY_SD2, build_tiny_sd

    if name not in (TINY_SD, TINY_SD2):
        raise _family_error(name, BUILTIN_FAMILY[name])
    builtin_v2 = name == TINY_SD2
    if builtin_v2 != v2:
        raise _v2_mismatch(name, builtin_v2)
    parts = build_tiny_sd(v2=builtin_v2)
    return parts["text_encoder"], parts["tokenizer"], parts["vae"], parts["unet"]


def _load_folder(path: str, v2: bool, tokenizer_cache_dir: str | None, dtype, need_vae: bool) -> tuple:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    family, folder_v2 = _folder_family(path)
    if family not in ("sd1", "sd2"):
        raise _family_error(path, family)
    if folder_v2 != v2:
        raise _v2_mismatch(path, folder_v2)
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=dtype)
    text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", dtype=dtype)
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=dtype) if need_vae else None
    if _is_tokenizer_folder(os.path.join(path, "tokenizer")):
        tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
    else:
        tokenizer = load_tokenizer(v2, tokenizer_cache_dir, text_encoder.config.vocab_size)
    return text_encoder, tokenizer, vae, unet


def _load_single_file(path: str, v2: bool, tokenizer_cache_dir: str | None, dtype, need_vae: bool) -> tuple:
    # Decide the family from the names first: a wrong-family file (maybe tens of GB) is refused before it is read.
    if path.lower().endswith(".safetensors"):
        shapes = read_key_shapes(path)  # ModelLoadError: truncated / not safetensors
        family = detect_family(shapes)
        if family not in ("sd1", "sd2"):
            raise _family_error(path, family)
    checkpoint = read_state_dict(path)
    family = detect_family(checkpoint)
    if family not in ("sd1", "sd2"):
        raise _family_error(path, family)
    file_v2 = family == "sd2"
    if file_v2 != v2:
        raise _v2_mismatch(path, file_v2)
    if not any(k.startswith(("cond_stage_model.",)) for k in checkpoint):
        raise ModelLoadError(f"{path} has no text encoder (cond_stage_model.*); kiln needs a full SD checkpoint")

    unet = unet_from_ldm(checkpoint, v2, dtype, path)
    text_encoder = text_encoder_from_ldm(checkpoint, v2, dtype, path)
    vae = None
    if need_vae:
        if not any(k.startswith(VAE_PREFIX) for k in checkpoint):
            raise ModelLoadError(f"{path} has no VAE (first_stage_model.*): give one with --vae")
        vae = vae_from_state_dict({k: v for k, v in checkpoint.items() if k.startswith(VAE_PREFIX)}, dtype, path, v2)
    del checkpoint
    tokenizer = load_tokenizer(v2, tokenizer_cache_dir, text_encoder.config.vocab_size)
    return text_encoder, tokenizer, vae, unet


def _cast(model, dtype):
    """model.to(dtype) only where a floating parameter differs (diffusers logs a warning on every .to(dtype))."""
    if any(p.is_floating_point() and p.dtype != dtype for p in model.parameters()):
        model = model.to(dtype)
    return model


def load_sd_model(
    name_or_path: str,
    v2: bool = False,
    vae: str | None = None,
    tokenizer_cache_dir: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> SDModel:
    """Load an SD 1.x/2.x model: a built-in name (kiln-tiny-sd, kiln-tiny-sd2), a diffusers folder, or an original single
    file (.safetensors; .ckpt/.pt only through weights_only). `vae` replaces the model's VAE (see load_vae). Raises
    ModelLoadError for missing paths, other families (naming their script) and a --v2 that disagrees with the model."""
    from library.tiny_models import BUILTIN_MODELS

    name_or_path = os.fspath(name_or_path)
    if vae is not None and not os.path.exists(vae):
        raise ModelLoadError(f"VAE not found: {vae}")
    if name_or_path in BUILTIN_MODELS:
        text_encoder, tokenizer, model_vae, unet = _load_builtin(name_or_path, v2)
    elif os.path.isdir(name_or_path):
        text_encoder, tokenizer, model_vae, unet = _load_folder(
            name_or_path, v2, tokenizer_cache_dir, dtype, need_vae=vae is None
        )
    elif os.path.isfile(name_or_path):
        text_encoder, tokenizer, model_vae, unet = _load_single_file(
            name_or_path, v2, tokenizer_cache_dir, dtype, need_vae=vae is None
        )
    else:
        raise ModelLoadError(
            f"model not found: {name_or_path} (expected a built-in name {', '.join(BUILTIN_MODELS)}, a diffusers folder or "
            "a .safetensors/.ckpt file; kiln does not download models from a hub)"
        )
    _check_tokenizer(tokenizer, text_encoder, name_or_path)
    if vae is not None:
        model_vae = load_vae(os.fspath(vae), dtype, v2)
    parts = [_cast(m, dtype).eval() for m in (text_encoder, model_vae, unet)]
    return SDModel(text_encoder=parts[0], tokenizer=tokenizer, vae=parts[1], unet=parts[2], v2=v2, source=name_or_path)


# ---------------------------------------------------------------------------------------------------------------------
# Saving: diffusers -> LDM single file
# ---------------------------------------------------------------------------------------------------------------------

OPEN_CLIP_LOGIT_SCALE = math.log(100.0)  # OpenCLIP's trained logit scale (unused by SD2; present in its files)


def _open_clip_state_dict(text_encoder, sd2: bool = True) -> dict[str, torch.Tensor]:
    """A CLIPTextModel(WithProjection) in OpenCLIP names (without the file's prefix).

    sd2: SD 2.x conventions (one extra identity layer, identity text_projection, see below). A
    CLIPTextModelWithProjection's `text_projection.weight` (nn.Linear, [projection, hidden]) is written as OpenCLIP's
    `text_projection` matrix ([hidden, projection], applied as `x @ P`), its transpose.
    """
    state = {k: v for k, v in text_encoder.state_dict().items() if not k.endswith("position_ids")}
    names = text_encoder_ldm_param_names(text_encoder, v2=True)
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        ldm = names[key]
        m = re.search(r"self_attn\.(q_proj|k_proj|v_proj)\.", key)
        if m:
            qkv.setdefault(ldm, {})[m.group(1)] = value
        elif key == "text_projection.weight":
            out[ldm] = value.t()
        else:
            out[ldm] = value
    for ldm, parts in qkv.items():
        out[ldm] = torch.cat([parts[p] for p in OPEN_CLIP_QKV], dim=0)
    ref = out["token_embedding.weight"]
    if not sd2:
        out["logit_scale"] = torch.tensor(OPEN_CLIP_LOGIT_SCALE, dtype=ref.dtype, device=ref.device)
        return out

    # The file has one layer more than diffusers' model: SD2 conditions on the penultimate layer's output, so the last
    # layer is never used. kiln writes it as an exact identity (all zeros: both residual branches add 0), so a tool
    # that does read the last layer gets the same hidden states.
    layers = text_encoder.config.num_hidden_layers
    src = f"transformer.resblocks.{layers - 1}."
    for ldm in [k for k in out if k.startswith(src)]:
        out[f"transformer.resblocks.{layers}." + ldm[len(src) :]] = torch.zeros_like(out[ldm])
    hidden = text_encoder.config.hidden_size
    out["text_projection"] = torch.eye(hidden, dtype=ref.dtype, device=ref.device)
    out["logit_scale"] = torch.tensor(OPEN_CLIP_LOGIT_SCALE, dtype=ref.dtype, device=ref.device)
    return out


def unet_to_ldm_state_dict(unet) -> dict[str, torch.Tensor]:
    """A UNet2DConditionModel's weights under their single-file names, `model.diffusion_model.` included (SD and SDXL)."""
    unet_state = unet.state_dict()
    return {UNET_PREFIX + ldm: unet_state[key] for key, ldm in unet_ldm_param_names(unet).items()}


def vae_to_ldm_state_dict(vae) -> dict[str, torch.Tensor]:
    """An AutoencoderKL's weights under their single-file names, `first_stage_model.` included (SD and SDXL)."""
    out: dict[str, torch.Tensor] = {}
    vae_state = vae.state_dict()
    for key, ldm in vae_ldm_param_names(vae).items():
        value = vae_state[key]
        if re.search(r"\.mid\.attn_1\.(q|k|v|proj_out)\.weight$", ldm) and value.ndim == 2:
            value = value.reshape(*value.shape, 1, 1)  # LDM's attention uses 1x1 convolutions
        out[VAE_PREFIX + ldm] = value
    return out


def sd_to_ldm_state_dict(text_encoder, vae, unet, v2: bool) -> dict[str, torch.Tensor]:
    """The original single-file state dict of a diffusers SD model (tensors are the models' own, not copies)."""
    out = unet_to_ldm_state_dict(unet)
    out.update(vae_to_ldm_state_dict(vae))

    if v2:
        for key, value in _open_clip_state_dict(text_encoder).items():
            out[OPEN_CLIP_PREFIX + key] = value
    else:
        te_state = text_encoder.state_dict()
        for key, ldm in text_encoder_ldm_param_names(text_encoder, v2=False).items():
            out[CLIP_L_PREFIX + ldm] = te_state[key]
    return out


def _atomic_write(path: str, write) -> None:
    from library.saving import atomic_write  # the one place that creates files: usual mode, temporary name, rename

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(path, write)


def save_sd_single_file(
    path: str,
    model: SDModel | tuple,
    v2: bool,
    dtype: torch.dtype | None = None,
    metadata: dict[str, str] | None = None,
) -> None:
    """Write an original (LDM) single file: U-Net, VAE and text encoder (SD1 CLIP-L or SD2 OpenCLIP layout).

    `model` is an SDModel or (text_encoder, vae, unet). `dtype` casts floating tensors. `.safetensors` (with
    `metadata`, all values strings) or, for .ckpt/.pt, a plain {"state_dict": ...} pickle of tensors that loads with
    weights_only=True. The file is written to a temporary name in the same folder, then renamed over `path`.
    """
    if isinstance(model, SDModel):
        text_encoder, vae, unet = model.text_encoder, model.vae, model.unet
    else:
        text_encoder, vae, unet = model
    write_single_file(path, sd_to_ldm_state_dict(text_encoder, vae, unet, v2), dtype, metadata)


def write_single_file(
    path: str, state_dict: Mapping[str, torch.Tensor], dtype: torch.dtype | None = None, metadata: dict[str, str] | None = None
) -> None:
    """Write a single-file state dict atomically: `.safetensors` (with `metadata`, all values strings) or, for
    .ckpt/.pt, a plain {"state_dict": ...} pickle of tensors that loads with weights_only=True. `dtype` casts floating
    tensors. The file is written to a temporary name in the same folder, then renamed over `path`."""
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise TypeError("safetensors metadata keys and values must all be strings")

    state = {}
    for key, value in state_dict.items():
        value = value.detach()
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        state[key] = value.contiguous().cpu()

    path = os.fspath(path)
    if path.lower().endswith(".safetensors"):
        from safetensors.torch import save_file

        _atomic_write(path, lambda tmp: save_file(state, tmp, metadata=metadata))
    elif _is_pickle_path(path):
        _atomic_write(path, lambda tmp: torch.save({"state_dict": state}, tmp))
    else:
        raise ValueError(f"unsupported file type for a single-file model: {path} (use .safetensors)")
