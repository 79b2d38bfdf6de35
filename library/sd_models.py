"""Stable Diffusion 1.x / 2.x model files: loading and saving.

Reads the three inputs users have: kiln's built-in tiny models, diffusers folders, and original ("LDM") single files
(`.safetensors`, or `.ckpt`/`.pt` through `torch.load(weights_only=True)` only). LDM -> diffusers conversion uses
diffusers' own functions; model configs come from the state dict's shapes with the real models' conventions, so nothing
is fetched from a hub. Saving writes kiln's own diffusers -> LDM conversion (diffusers has none in that direction).

The diffusers <-> LDM name maps live in library/ldm_names.py, file reading in library/checkpoint_files.py, what every
family shares (VAE and CLIP text encoder configs, tokenizer lookup, building models, writing files) in
library/model_files.py.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import re
from collections.abc import Mapping
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
from library.model_files import (
    CLIP_L_HUB_ID,
    CLIP_L_TEXT_CONFIG,
    SD_VAE_COMMON,
    build_and_load,
    cast_model,
    check_tokenizer,
    folder_family,
    hf_cache_folder,
    hub_cache_folder,
    infer_clip_text_config,
    infer_vae_config,
    is_tokenizer_folder,
    key_indices,
    load_clip_tokenizer,
    load_vae,
    vae_from_state_dict,
    vae_to_diffusers_layout,
    vae_to_ldm_state_dict,  # noqa: F401  (re-exported)
    write_single_file,
)

logger = logging.getLogger(__name__)


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

SD15_VAE = {**SD_VAE_COMMON, "sample_size": 512}
SD2_BASE_VAE = {**SD_VAE_COMMON, "sample_size": 512}
SD2_V_VAE = {**SD_VAE_COMMON, "sample_size": 768}

SD15_TEXT_ENCODER = dict(CLIP_L_TEXT_CONFIG)  # CLIP ViT-L/14 text tower
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


def sd_scheduler_config(v2_v: bool = False) -> dict:
    """The DDPM schedule every SD 1.x/2.x model uses."""
    return {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "clip_sample": False,
        "steps_offset": 1,
        "prediction_type": "v_prediction" if v2_v else "epsilon",
    }


# ---------------------------------------------------------------------------------------------------------------------
# Config inference from state dict shapes
# ---------------------------------------------------------------------------------------------------------------------


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
        depth = len(key_indices(sd, f"{prefix}.transformer_blocks."))
        return {
            "depth": depth,
            "linear": len(sd[f"{prefix}.proj_in.weight"]) == 2,
            "context": sd[f"{prefix}.transformer_blocks.0.attn2.to_k.weight"][1],
        }

    levels: list[dict] = []
    current = {"layers": 0, "channels": None, "attn": None}
    for n in key_indices(sd, "input_blocks.")[1:]:
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

    output_ids = key_indices(sd, "output_blocks.")
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


def infer_text_encoder_config(diffusers_sd: Mapping[str, Any], v2: bool) -> dict:
    """A CLIPTextConfig dict for an SD1 (CLIP-L) or SD2 (OpenCLIP-H) text encoder from its transformers-layout shapes
    (see model_files.infer_clip_text_config): SD1 quick_gelu, SD2 gelu; pad is eos for SD1 and id 0 ("!") for SD2 as
    their tokenizers pad."""
    return infer_clip_text_config(diffusers_sd, reference_config("sd2-base" if v2 else "sd15", "text_encoder"), open_clip=v2)


# ---------------------------------------------------------------------------------------------------------------------
# LDM -> diffusers (diffusers' own conversion functions)
# ---------------------------------------------------------------------------------------------------------------------


def unet_from_ldm(checkpoint: Mapping[str, torch.Tensor], v2: bool, dtype=torch.float32, source: str = "checkpoint"):
    """A UNet2DConditionModel from an LDM checkpoint's `model.diffusion_model.*` weights."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    config = infer_unet_config(checkpoint, v2)
    if isinstance(config["layers_per_block"], list):
        raise ModelLoadError(f"{source}: U-Net levels with different numbers of layers are not supported")
    converted = convert_ldm_unet_checkpoint(dict(checkpoint), config)
    return build_and_load(lambda: UNet2DConditionModel(**config), converted, dtype, "U-Net", source)


def _text_encoder_to_diffusers_layout(checkpoint: Mapping[str, torch.Tensor], v2: bool, source: str) -> dict:
    """The text encoder of an LDM checkpoint in transformers CLIPTextModel names (flattened, no `text_model.`)."""
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint

    if v2:
        # SD2 conditions on the penultimate layer: the file's last resblock is never used, so diffusers' model has one
        # layer fewer (23 of OpenCLIP-H's 24). Drop the last one whatever the depth (tiny models included).
        layer_prefix = OPEN_CLIP_PREFIX + "transformer.resblocks."
        layers = key_indices(checkpoint, layer_prefix)
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
    return build_and_load(lambda: CLIPTextModel(config), converted, dtype, "text encoder", source)


def infer_single_file_configs(checkpoint: Mapping[str, Any], v2: bool) -> dict[str, dict]:
    """The diffusers/transformers configs kiln builds for an LDM checkpoint (shapes only: meta tensors are fine)."""
    configs = {"unet": infer_unet_config(checkpoint, v2)}
    if any(k.startswith(VAE_PREFIX) for k in checkpoint):
        configs["vae"] = infer_vae_config(
            vae_to_diffusers_layout(checkpoint, "checkpoint"), reference_config("sd2-base" if v2 else "sd15", "vae")
        )
    configs["text_encoder"] = infer_text_encoder_config(_text_encoder_to_diffusers_layout(checkpoint, v2, "checkpoint"), v2)
    return configs


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------------------------


def tokenizer_hub_id(v2: bool) -> tuple[str, str | None]:
    """(hub id, subfolder) of the tokenizer SD1 / SD2 single files use."""
    return (SD2_HUB_ID, "tokenizer") if v2 else (CLIP_L_HUB_ID, None)


def tokenizer_cache_folder(tokenizer_cache_dir: str, v2: bool) -> str:
    """Where kiln looks for a single file's tokenizer: `<cache dir>/<hub id with / replaced by _>`."""
    return hub_cache_folder(tokenizer_cache_dir, tokenizer_hub_id(v2)[0])


def _hf_cache_tokenizer_folder(v2: bool) -> str | None:
    """The folder of the SD1/SD2 tokenizer files in the local Hugging Face cache, or None."""
    return hf_cache_folder(*tokenizer_hub_id(v2))


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


# ---------------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------------


def _v2_mismatch(source: str, file_v2: bool) -> ModelLoadError:
    if file_v2:
        return ModelLoadError(f"{source} is an SD 2.x model (OpenCLIP text encoder), but --v2 is not set: add --v2")
    return ModelLoadError(f"{source} is an SD 1.x model (CLIP-L text encoder), but --v2 is set: remove --v2")


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

    family, folder_v2 = folder_family(path)
    if family not in ("sd1", "sd2"):
        raise _family_error(path, family)
    if folder_v2 != v2:
        raise _v2_mismatch(path, folder_v2)
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=dtype)
    text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", dtype=dtype)
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=dtype) if need_vae else None
    if is_tokenizer_folder(os.path.join(path, "tokenizer")):
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
        vae_sd = {k: v for k, v in checkpoint.items() if k.startswith(VAE_PREFIX)}
        vae = vae_from_state_dict(vae_sd, dtype, path, reference=reference_config("sd2-base" if v2 else "sd15", "vae"))
    del checkpoint
    tokenizer = load_tokenizer(v2, tokenizer_cache_dir, text_encoder.config.vocab_size)
    return text_encoder, tokenizer, vae, unet


def load_sd_model(
    name_or_path: str,
    v2: bool = False,
    vae: str | None = None,
    tokenizer_cache_dir: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> SDModel:
    """Load an SD 1.x/2.x model: a built-in name (kiln-tiny-sd, kiln-tiny-sd2), a diffusers folder, or an original single
    file (.safetensors; .ckpt/.pt only through weights_only). `vae` replaces the model's VAE (see
    model_files.load_vae; single files get SD's VAE config). Raises
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
    check_tokenizer(tokenizer, text_encoder, name_or_path)
    if vae is not None:
        model_vae = load_vae(os.fspath(vae), dtype, reference=reference_config("sd2-base" if v2 else "sd15", "vae"))
    parts = [cast_model(m, dtype).eval() for m in (text_encoder, model_vae, unet)]
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


def text_encoder_to_ldm_state_dict(text_encoder, v2: bool) -> dict[str, torch.Tensor]:
    """An SD text encoder's weights under their single-file names, prefix included: SD1 CLIP-L
    (`cond_stage_model.transformer.`, the model's own tensors), SD2 OpenCLIP (`cond_stage_model.model.`)."""
    if v2:
        return {OPEN_CLIP_PREFIX + key: value for key, value in _open_clip_state_dict(text_encoder).items()}
    te_state = text_encoder.state_dict()
    return {CLIP_L_PREFIX + ldm: te_state[key] for key, ldm in text_encoder_ldm_param_names(text_encoder, v2=False).items()}


def sd_to_ldm_state_dict(text_encoder, vae, unet, v2: bool) -> dict[str, torch.Tensor]:
    """The original single-file state dict of a diffusers SD model (tensors are the models' own, not copies)."""
    out = unet_to_ldm_state_dict(unet)
    out.update(vae_to_ldm_state_dict(vae))
    out.update(text_encoder_to_ldm_state_dict(text_encoder, v2))
    return out


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


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints of a trained model (ModelFamily.save_checkpoint; see library/model_checkpoint.py)
# ---------------------------------------------------------------------------------------------------------------------

TEXT_ENCODER_FILE_PREFIX = "cond_stage_model."  # everything of an SD file's text encoder (CLIP-L or OpenCLIP)


def ddpm_pipeline_scheduler(cls_name: str, config: Mapping[str, Any], v_prediction: bool, zero_terminal_snr: bool):
    """The scheduler a diffusers folder of a DDPM-trained model (SD 1.x/2.x, SDXL) ships: diffusers' `cls_name` with
    the release's `config`, the trained prediction type, and with --zero_terminal_snr the rescaled betas and
    "trailing" timesteps that schedule needs."""
    import diffusers

    config = {**config, "prediction_type": "v_prediction" if v_prediction else "epsilon"}
    if zero_terminal_snr:
        config.update({"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"})
    return getattr(diffusers, cls_name)(**config)


def ldm_vae_file_part(file, reference: dict):
    """The VAE of an LDM/SGM single file (`first_stage_model.`, the same in SD and SDXL files) as a checkpoint's
    PartSource: copied by key, or built with `reference`'s config."""
    from library.model_checkpoint import PartSource

    return PartSource(
        build=lambda: vae_from_state_dict(file.tensors(VAE_PREFIX), None, file.path, reference=reference),
        file=file,
        prefix=VAE_PREFIX,
    )


def ldm_unet_and_vae_parts(unet, vae_model, sources: dict) -> tuple:
    """The U-Net and VAE CheckpointParts of an LDM/SGM single file (the same names in SD and SDXL files)."""
    from library.model_checkpoint import CheckpointPart
    from library.model_files import tensor_sources

    return (
        CheckpointPart("denoiser", "unet", unet, sources["unet"], lambda m: tensor_sources(unet_to_ldm_state_dict(m)), UNET_PREFIX),
        CheckpointPart("vae", "vae", vae_model, sources["vae"], lambda m: tensor_sources(vae_to_ldm_state_dict(m)), VAE_PREFIX),
    )


def sd_checkpoint_spec(
    source: str,
    vae: str | None,
    v2: bool,
    text_encoder,
    tokenizer,
    vae_model,
    unet,
    v_prediction: bool = False,
    zero_terminal_snr: bool = False,
):
    """What an SD 1.x/2.x checkpoint holds (model_checkpoint.CheckpointSpec): the in-memory parts and, for the parts
    not trained, the user's weights: the LDM single file `source` (copied by key), its diffusers folder, or the
    built-in tiny model built again; `vae` (--vae) replaces the VAE. Diffusers folders are StableDiffusionPipelines
    with a DDIM scheduler (SD's schedule, the trained prediction type)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    from library.model_checkpoint import CheckpointPart, CheckpointSpec, PartSource, model_parts, vae_part
    from library.model_files import tensor_sources
    from library.tiny_models import build_tiny_sd

    reference = reference_config("sd2-base" if v2 else "sd15", "vae")

    def single_file(file) -> dict[str, PartSource]:
        return {
            "unet": PartSource(
                build=lambda: unet_from_ldm(file.tensors(UNET_PREFIX, strip=False), v2, None, file.path),
                file=file,
                prefix=UNET_PREFIX,
            ),
            "text_encoder": PartSource(
                build=lambda: text_encoder_from_ldm(file.tensors(TEXT_ENCODER_FILE_PREFIX, strip=False), v2, None, file.path),
                file=file,
                prefix=TEXT_ENCODER_FILE_PREFIX,
            ),
            "vae": ldm_vae_file_part(file, reference),
        }

    classes = {"unet": UNet2DConditionModel, "text_encoder": CLIPTextModel, "vae": AutoencoderKL}
    sources = model_parts(source, classes, lambda: build_tiny_sd(v2=v2), single_file)
    if vae is not None:
        sources["vae"] = vae_part(vae, reference)
    unet_part, vae_part_ = ldm_unet_and_vae_parts(unet, vae_model, sources)
    parts = [
        unet_part,
        CheckpointPart(
            "text_encoder_0",
            "text_encoder",
            text_encoder,
            sources["text_encoder"],
            lambda m: tensor_sources(text_encoder_to_ldm_state_dict(m, v2)),
            TEXT_ENCODER_FILE_PREFIX,
        ),
        vae_part_,
    ]
    scheduler = ddpm_pipeline_scheduler(
        "DDIMScheduler", {**sd_scheduler_config(), "set_alpha_to_one": False}, v_prediction, zero_terminal_snr
    )
    return CheckpointSpec("StableDiffusionPipeline", parts, {"tokenizer": tokenizer, "scheduler": scheduler})
