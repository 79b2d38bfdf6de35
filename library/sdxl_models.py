"""SDXL model files: loading and saving.

Reads kiln's built-in tiny SDXL, diffusers SDXL folders, and original single files in Stability's sgm layout
(`.safetensors`, or `.ckpt`/`.pt` through `torch.load(weights_only=True)` only):

    model.diffusion_model.*                         U-Net (with `label_emb.*`, the size/crop + pooled-text embedding)
    conditioner.embedders.0.transformer.text_model.* text encoder 1, CLIP ViT-L (transformers names)
    conditioner.embedders.1.model.*                  text encoder 2, OpenCLIP ViT-bigG (OpenCLIP names, `text_projection`)
    first_stage_model.*                              VAE (as SD)

sgm -> diffusers conversion uses diffusers' own functions, with configs inferred from the state dict's shapes and the
real SDXL base 1.0 configs for what shapes cannot tell (nothing is fetched from a hub). Saving uses kiln's
diffusers -> LDM name maps (library/ldm_names.py), shared with SD 1.x/2.x, and the SD single-file writer.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch

from library.checkpoint_files import (
    CLIP_L_PREFIX,
    FAMILY_NAMES,
    FAMILY_SCRIPTS,
    UNET_PREFIX,
    VAE_PREFIX,
    ModelLoadError,
    _shape,
    detect_family,
    read_key_shapes,
    read_state_dict,
)
from library.ldm_names import text_encoder_ldm_param_names, unet_ldm_module_names
from library.model_files import (
    CLIP_BIGG_HUB_ID,
    CLIP_L_HUB_ID,
    CLIP_L_TEXT_CONFIG,
    SD_VAE_COMMON,
    build_and_load,
    cast_model,
    check_tokenizer,
    folder_family,
    infer_vae_config,
    is_tokenizer_folder,
    load_clip_tokenizer,
    load_vae,
    vae_from_state_dict,
    vae_to_diffusers_layout,
    write_single_file,
)
from library.sd_models import (
    UNET_LDM_SETTINGS,
    _open_clip_state_dict,
    _text_encoder_to_diffusers_layout,
    infer_text_encoder_config,
    infer_unet_config,
    text_encoder_from_ldm,
    unet_to_ldm_state_dict,
    vae_to_ldm_state_dict,
)

logger = logging.getLogger(__name__)

TE1_PREFIX = "conditioner.embedders.0.transformer."  # + text_model.* (transformers CLIPTextModel names)
TE2_PREFIX = "conditioner.embedders.1.model."  # OpenCLIP ViT-bigG text tower names
TOKENIZER_2_PAD = "!"


@dataclass
class SDXLModel:
    """The parts of an SDXL model, in diffusers / transformers classes."""

    text_encoder: Any  # transformers.CLIPTextModel (CLIP ViT-L)
    text_encoder_2: Any  # transformers.CLIPTextModelWithProjection (OpenCLIP ViT-bigG)
    tokenizer: Any  # transformers.CLIPTokenizer
    tokenizer_2: Any  # transformers.CLIPTokenizer, pad "!"
    vae: Any  # diffusers.AutoencoderKL
    unet: Any  # diffusers.UNet2DConditionModel
    source: str


# ---------------------------------------------------------------------------------------------------------------------
# Reference configs of SDXL base 1.0 (diffusers / transformers layouts): defaults for what shapes cannot tell (sample
# size, VAE scaling factor, token ids) and the expected results of the shape inference at real size.
# ---------------------------------------------------------------------------------------------------------------------

SDXL_BASE_UNET = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [320, 640, 1280],
    "layers_per_block": 2,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "transformer_layers_per_block": [1, 2, 10],
    "attention_head_dim": [5, 10, 20],  # diffusers' name for the number of heads: 64-wide heads
    "use_linear_projection": True,
    "cross_attention_dim": 2048,  # 768 (CLIP-L) + 1280 (bigG) hidden states, concatenated
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,  # 6 size/crop numbers x 256 + 1280 pooled
    **UNET_LDM_SETTINGS,
}
SDXL_VAE = {**SD_VAE_COMMON, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True}
SDXL_TEXT_ENCODER = dict(CLIP_L_TEXT_CONFIG)  # CLIP ViT-L/14 text tower, as SD 1.x
SDXL_TEXT_ENCODER_2 = {  # OpenCLIP ViT-bigG/14 text tower, all 32 layers (SDXL reads the penultimate hidden states)
    **SDXL_TEXT_ENCODER,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "hidden_act": "gelu",
    "projection_dim": 1280,
}


def sdxl_scheduler_config() -> dict:
    """The Euler scheduler SDXL base 1.0 ships (same DDPM betas as SD)."""
    return {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "interpolation_type": "linear",
        "prediction_type": "epsilon",
        "steps_offset": 1,
        "timestep_spacing": "leading",
        "use_karras_sigmas": False,
    }


SDXL_SCHEDULER = sdxl_scheduler_config()
REFERENCE_CONFIGS = {
    "unet": SDXL_BASE_UNET,
    "vae": SDXL_VAE,
    "text_encoder": SDXL_TEXT_ENCODER,
    "text_encoder_2": SDXL_TEXT_ENCODER_2,
    "scheduler": SDXL_SCHEDULER,
}


def reference_config(component: str) -> dict:
    """A copy of an SDXL base 1.0 config: component in unet/vae/text_encoder/text_encoder_2/scheduler."""
    return copy.deepcopy(REFERENCE_CONFIGS[component])


# ---------------------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------------------


def _wrong_family(path: str, family: str) -> ModelLoadError:
    if family in FAMILY_SCRIPTS and family != "sdxl":
        return ModelLoadError(f"{path} is a {FAMILY_NAMES[family]} checkpoint, not SDXL: use {FAMILY_SCRIPTS[family]} for it")
    return ModelLoadError(
        f"{path} is not an SDXL checkpoint kiln can load: expected the original single-file layout ({UNET_PREFIX}* with "
        f"label_emb, {TE1_PREFIX}text_model.*, {TE2_PREFIX}*, {VAE_PREFIX}*) or a diffusers SDXL folder (with "
        "model_index.json). A diffusers model is loaded from its folder, not from one of its files."
    )


# ---------------------------------------------------------------------------------------------------------------------
# Config inference from state dict shapes
# ---------------------------------------------------------------------------------------------------------------------

_UNET_SHAPE_KEYS = (
    "in_channels",
    "out_channels",
    "block_out_channels",
    "layers_per_block",
    "down_block_types",
    "up_block_types",
    "mid_block_type",
    "cross_attention_dim",
    "use_linear_projection",
    "transformer_layers_per_block",
    "attention_head_dim",
)


def infer_sdxl_unet_config(checkpoint: Mapping[str, Any], pooled_dim: int | None = None) -> dict:
    """A UNet2DConditionModel config from an sgm U-Net's shapes (keys with or without `model.diffusion_model.`).

    Levels, layers, transformer depths and the context width come from the shapes, with SDXL's conventions: 64-wide
    heads, linear projections. `label_emb.0.0` takes 6 size/crop embeddings of addition_time_embed_dim each plus the
    pooled output of text encoder 2, whose width `pooled_dim` (its projection_dim) tells them apart; without it the
    real model's 1280 is assumed.
    """
    if any(k.startswith(UNET_PREFIX) for k in checkpoint):
        sd = {k[len(UNET_PREFIX) :]: _shape(v) for k, v in checkpoint.items() if k.startswith(UNET_PREFIX)}
    else:
        sd = {k: _shape(v) for k, v in checkpoint.items()}
    if "label_emb.0.0.weight" not in sd:
        raise ModelLoadError("the U-Net has no size/crop embedding (label_emb.0.0.*): not an SDXL U-Net")
    shaped = infer_unet_config(sd, v2=True)  # v2: 64-wide heads per level, as SDXL

    config = reference_config("unet")
    config.update({k: shaped[k] for k in _UNET_SHAPE_KEYS})
    time_dim, adm_in = sd["label_emb.0.0.weight"]
    if pooled_dim is None:
        pooled_dim = SDXL_BASE_UNET["projection_class_embeddings_input_dim"] - 6 * SDXL_BASE_UNET["addition_time_embed_dim"]
    rest = adm_in - pooled_dim
    if rest <= 0 or rest % 6:
        raise ModelLoadError(
            f"the U-Net's added embedding takes {adm_in} inputs, which is not 6 x addition_time_embed_dim + the pooled "
            f"text width {pooled_dim}"
        )
    config["addition_time_embed_dim"] = rest // 6
    config["projection_class_embeddings_input_dim"] = adm_in
    if time_dim != 4 * config["block_out_channels"][0]:
        config["time_embedding_dim"] = time_dim
    return config


def _text_encoder_1_view(checkpoint: Mapping[str, Any]) -> dict:
    """Text encoder 1's keys under SD 1.x's prefix (same CLIP-L names), so that SD's conversion reads them."""
    return {CLIP_L_PREFIX + k[len(TE1_PREFIX) :]: v for k, v in checkpoint.items() if k.startswith(TE1_PREFIX)}


def _text_encoder_2_to_diffusers_layout(checkpoint: Mapping[str, Any], source: str) -> dict:
    """Text encoder 2 in CLIPTextModelWithProjection names (`text_model.*`, `text_projection.weight`)."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    kept = {k: v for k, v in checkpoint.items() if k.startswith(TE2_PREFIX)}
    for needed in ("token_embedding.weight", "text_projection", "transformer.resblocks.0.attn.in_proj_weight"):
        if TE2_PREFIX + needed not in kept:
            raise ModelLoadError(f"{source}: incomplete OpenCLIP text encoder 2 ({TE2_PREFIX}{needed} missing)")
    hidden = _shape(kept[TE2_PREFIX + "token_embedding.weight"])[1]
    stub = SimpleNamespace(config=SimpleNamespace(hidden_size=hidden))  # read only when text_projection is absent
    converted = convert_open_clip_checkpoint(stub, kept, prefix=TE2_PREFIX)
    return {k: v for k, v in converted.items() if not k.endswith("position_ids")}


def infer_sdxl_text_encoder_2_config(diffusers_sd: Mapping[str, Any]) -> dict:
    """A CLIPTextConfig dict for text encoder 2 from its transformers-layout shapes: OpenCLIP conventions (64-wide
    heads, gelu, padding with id 0), projection width from `text_projection.weight`."""
    config = infer_text_encoder_config(diffusers_sd, v2=True)
    projection = _shape(diffusers_sd["text_projection.weight"])
    if projection is None or projection[1] != config["hidden_size"]:
        raise ModelLoadError(f"text encoder 2's text_projection has shape {projection}, not [*, hidden size]")
    config["projection_dim"] = projection[0]
    return config


def infer_sdxl_single_file_configs(checkpoint: Mapping[str, Any]) -> dict[str, dict]:
    """The diffusers/transformers configs kiln builds for an sgm checkpoint (shapes only: meta tensors are fine)."""
    te2 = infer_sdxl_text_encoder_2_config(_text_encoder_2_to_diffusers_layout(checkpoint, "checkpoint"))
    configs = {
        "unet": infer_sdxl_unet_config(checkpoint, te2["projection_dim"]),
        "text_encoder": infer_text_encoder_config(
            _text_encoder_to_diffusers_layout(_text_encoder_1_view(checkpoint), False, "checkpoint"), v2=False
        ),
        "text_encoder_2": te2,
    }
    if any(k.startswith(VAE_PREFIX) for k in checkpoint):
        configs["vae"] = infer_vae_config(vae_to_diffusers_layout(checkpoint, "checkpoint"), reference=SDXL_VAE)
    return configs


# ---------------------------------------------------------------------------------------------------------------------
# sgm -> diffusers (diffusers' own conversion functions)
# ---------------------------------------------------------------------------------------------------------------------


def unet_from_sgm(
    checkpoint: Mapping[str, torch.Tensor], pooled_dim: int | None = None, dtype=torch.float32, source="checkpoint"
):
    """A UNet2DConditionModel from an sgm checkpoint's `model.diffusion_model.*` weights."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    config = infer_sdxl_unet_config(checkpoint, pooled_dim)
    if isinstance(config["layers_per_block"], list):
        raise ModelLoadError(f"{source}: U-Net levels with different numbers of layers are not supported")
    converted = convert_ldm_unet_checkpoint(dict(checkpoint), config)
    return build_and_load(lambda: UNet2DConditionModel(**config), converted, dtype, "U-Net", source)


def text_encoder_1_from_sgm(checkpoint: Mapping[str, torch.Tensor], dtype=torch.float32, source="checkpoint"):
    """Text encoder 1 (CLIPTextModel, CLIP-L conventions) from `conditioner.embedders.0.transformer.*`."""
    if not any(k.startswith(TE1_PREFIX) for k in checkpoint):
        raise ModelLoadError(f"{source}: no CLIP text encoder 1 ({TE1_PREFIX}text_model.*) in the checkpoint")
    return text_encoder_from_ldm(_text_encoder_1_view(checkpoint), v2=False, dtype=dtype, source=source)


def text_encoder_2_from_sgm(checkpoint: Mapping[str, torch.Tensor], dtype=torch.float32, source="checkpoint"):
    """Text encoder 2 (CLIPTextModelWithProjection, OpenCLIP bigG conventions) from `conditioner.embedders.1.model.*`."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    converted = _text_encoder_2_to_diffusers_layout(checkpoint, source)
    config = CLIPTextConfig(**infer_sdxl_text_encoder_2_config(converted))
    return build_and_load(lambda: CLIPTextModelWithProjection(config), converted, dtype, "text encoder 2", source)


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------------------------------------------------


def load_sdxl_tokenizers(tokenizer_cache_dir: str | None = None, vocab_size: int | None = None, vocab_size_2: int | None = None):
    """(tokenizer, tokenizer_2) for an SDXL single file, offline: from `tokenizer_cache_dir/openai_clip-vit-large-patch14`
    and `tokenizer_cache_dir/laion_CLIP-ViT-bigG-14-laion2B-39B-b160k`, else the local Hugging Face cache, else kiln's
    tiny tokenizer for tiny vocabularies (see model_files.load_clip_tokenizer). The second pads with "!" (id 0), as
    OpenCLIP's tokenizer, whatever its files say."""
    tokenizer = load_clip_tokenizer(
        CLIP_L_HUB_ID, None, tokenizer_cache_dir, vocab_size, model_name="SDXL (text encoder 1, CLIP ViT-L)"
    )
    tokenizer_2 = load_clip_tokenizer(
        CLIP_BIGG_HUB_ID,
        None,
        tokenizer_cache_dir,
        vocab_size_2,
        model_name="SDXL (text encoder 2, OpenCLIP ViT-bigG)",
        pad_token=TOKENIZER_2_PAD,
        tiny_pad_token=TOKENIZER_2_PAD,
    )
    return tokenizer, tokenizer_2


# ---------------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------------


def _load_builtin(name: str) -> tuple:
    from library.tiny_models import BUILTIN_FAMILY, TINY_SDXL, build_tiny_sdxl

    if name != TINY_SDXL:
        raise _wrong_family(name, BUILTIN_FAMILY[name])
    p = build_tiny_sdxl()
    return p["text_encoder"], p["text_encoder_2"], p["tokenizer"], p["tokenizer_2"], p["vae"], p["unet"]


def _load_folder(path: str, tokenizer_cache_dir: str | None, dtype, need_vae: bool) -> tuple:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    family, _ = folder_family(path)
    if family != "sdxl":
        raise _wrong_family(path, family)
    for sub in ("unet", "text_encoder", "text_encoder_2") + (("vae",) if need_vae else ()):
        if not os.path.isfile(os.path.join(path, sub, "config.json")):
            raise ModelLoadError(f"{path} is not a complete diffusers SDXL folder: {sub}/config.json is missing")
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=dtype)
    text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", dtype=dtype)
    text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2", dtype=dtype)
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=dtype) if need_vae else None

    tokenizer = tokenizer_2 = None
    if is_tokenizer_folder(os.path.join(path, "tokenizer")):
        tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
    if is_tokenizer_folder(os.path.join(path, "tokenizer_2")):
        tokenizer_2 = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2")
        if tokenizer_2.pad_token != TOKENIZER_2_PAD:
            tokenizer_2.pad_token = TOKENIZER_2_PAD
    if tokenizer is None or tokenizer_2 is None:
        fallback = load_sdxl_tokenizers(tokenizer_cache_dir, text_encoder.config.vocab_size, text_encoder_2.config.vocab_size)
        tokenizer = tokenizer or fallback[0]
        tokenizer_2 = tokenizer_2 or fallback[1]
    return text_encoder, text_encoder_2, tokenizer, tokenizer_2, vae, unet


def _load_single_file(path: str, tokenizer_cache_dir: str | None, dtype, need_vae: bool) -> tuple:
    # Decide the family from the names first: a wrong-family file (maybe tens of GB) is refused before it is read.
    if path.lower().endswith(".safetensors"):
        shapes = read_key_shapes(path)  # ModelLoadError: truncated / not safetensors
        family = detect_family(shapes)
        if family != "sdxl":
            raise _wrong_family(path, family)
    checkpoint = read_state_dict(path)
    family = detect_family(checkpoint)
    if family != "sdxl":
        raise _wrong_family(path, family)
    keys = list(checkpoint)
    has = lambda prefix: any(k.startswith(prefix) for k in keys)  # noqa: E731
    if not has(UNET_PREFIX + "label_emb."):
        raise ModelLoadError(f"{path} has no SDXL U-Net ({UNET_PREFIX}* with label_emb); kiln needs a full SDXL checkpoint")
    if not has(TE1_PREFIX) and has("conditioner.embedders.0.model."):
        raise ModelLoadError(
            f"{path} looks like the SDXL refiner (one OpenCLIP text encoder, conditioner.embedders.0.model.*); kiln "
            "trains on SDXL base models (two text encoders)"
        )
    if not has(TE1_PREFIX) or not has(TE2_PREFIX):
        raise ModelLoadError(
            f"{path} lacks a text encoder ({TE1_PREFIX}* and {TE2_PREFIX}* are both needed); kiln needs a full SDXL checkpoint"
        )

    text_encoder_2 = text_encoder_2_from_sgm(checkpoint, dtype, path)
    text_encoder = text_encoder_1_from_sgm(checkpoint, dtype, path)
    unet = unet_from_sgm(checkpoint, text_encoder_2.config.projection_dim, dtype, path)
    vae = None
    if need_vae:
        if not has(VAE_PREFIX):
            raise ModelLoadError(f"{path} has no VAE ({VAE_PREFIX}*): give one with --vae")
        vae_sd = {k: v for k, v in checkpoint.items() if k.startswith(VAE_PREFIX)}
        vae = vae_from_state_dict(vae_sd, dtype, path, reference=SDXL_VAE)
    del checkpoint
    tokenizer, tokenizer_2 = load_sdxl_tokenizers(
        tokenizer_cache_dir, text_encoder.config.vocab_size, text_encoder_2.config.vocab_size
    )
    return text_encoder, text_encoder_2, tokenizer, tokenizer_2, vae, unet


def load_sdxl_model(
    name_or_path: str,
    vae: str | None = None,
    tokenizer_cache_dir: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> SDXLModel:
    """Load an SDXL model: the built-in name kiln-tiny-sdxl, a diffusers SDXL folder, or an original (sgm) single file
    (.safetensors; .ckpt/.pt only through weights_only). `vae` replaces the model's VAE (a diffusers VAE folder or a
    single file, as model_files.load_vae; single files get SDXL's scaling factor). Raises ModelLoadError for missing
    paths, incomplete files and other families (naming their script)."""
    from library.tiny_models import BUILTIN_MODELS

    name_or_path = os.fspath(name_or_path)
    if vae is not None and not os.path.exists(vae):
        raise ModelLoadError(f"VAE not found: {vae}")
    if name_or_path in BUILTIN_MODELS:
        parts = _load_builtin(name_or_path)
    elif os.path.isdir(name_or_path):
        parts = _load_folder(name_or_path, tokenizer_cache_dir, dtype, need_vae=vae is None)
    elif os.path.isfile(name_or_path):
        parts = _load_single_file(name_or_path, tokenizer_cache_dir, dtype, need_vae=vae is None)
    else:
        raise ModelLoadError(
            f"model not found: {name_or_path} (expected a built-in name {', '.join(BUILTIN_MODELS)}, a diffusers folder or "
            "a .safetensors/.ckpt file; kiln does not download models from a hub)"
        )
    text_encoder, text_encoder_2, tokenizer, tokenizer_2, model_vae, unet = parts
    check_tokenizer(tokenizer, text_encoder, name_or_path)
    check_tokenizer(tokenizer_2, text_encoder_2, name_or_path)
    if vae is not None:
        model_vae = load_vae(os.fspath(vae), dtype, reference=SDXL_VAE)
    text_encoder, text_encoder_2, model_vae, unet = (
        cast_model(m, dtype).eval() for m in (text_encoder, text_encoder_2, model_vae, unet)
    )
    return SDXLModel(
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        vae=model_vae,
        unet=unet,
        source=name_or_path,
    )


# ---------------------------------------------------------------------------------------------------------------------
# Saving: diffusers -> sgm single file
# ---------------------------------------------------------------------------------------------------------------------


def sdxl_to_sgm_state_dict(text_encoder, text_encoder_2, vae, unet) -> dict[str, torch.Tensor]:
    """The original (sgm) single-file state dict of a diffusers SDXL model (tensors are the models' own, or views)."""
    out = unet_to_ldm_state_dict(unet)
    out.update(vae_to_ldm_state_dict(vae))
    out.update(sdxl_text_encoder_1_to_sgm(text_encoder))
    out.update(sdxl_text_encoder_2_to_sgm(text_encoder_2))
    return out


def save_sdxl_single_file(
    path: str,
    model: SDXLModel | tuple,
    dtype: torch.dtype | None = None,
    metadata: dict[str, str] | None = None,
) -> None:
    """Write an original (sgm) SDXL single file: U-Net, VAE, CLIP-L and OpenCLIP bigG text encoders.

    `model` is an SDXLModel or (text_encoder, text_encoder_2, vae, unet). `dtype` casts floating tensors.
    `.safetensors` (with `metadata`, all values strings) or, for .ckpt/.pt, a {"state_dict": ...} pickle of tensors
    that loads with weights_only=True. Written to a temporary name in the same folder, then renamed over `path`.
    """
    if isinstance(model, SDXLModel):
        parts = (model.text_encoder, model.text_encoder_2, model.vae, model.unet)
    else:
        parts = tuple(model)
    write_single_file(path, sdxl_to_sgm_state_dict(*parts), dtype, metadata)


# ---------------------------------------------------------------------------------------------------------------------
# LoRA names
# ---------------------------------------------------------------------------------------------------------------------


def sdxl_unet_lora_name_map(unet) -> dict[str, str]:
    """diffusers U-Net module path -> sgm module path, for kohya's SDXL LoRA names (`lora_unet_` + sgm path with
    `.` -> `_`), e.g. `down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q` ->
    `input_blocks.4.1.transformer_blocks.0.attn1.to_q`. `unet` is a UNet2DConditionModel or its config."""
    return unet_ldm_module_names(unet)


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints of a trained model (ModelFamily.save_checkpoint; see library/model_checkpoint.py)
# ---------------------------------------------------------------------------------------------------------------------

TE1_FILE_PREFIX = "conditioner.embedders.0."  # everything of an sgm file's text encoder 1
TE2_FILE_PREFIX = "conditioner.embedders.1."  # ... and of text encoder 2 (logit_scale included)


def sdxl_text_encoder_1_to_sgm(text_encoder) -> dict[str, torch.Tensor]:
    """Text encoder 1 (CLIP-L) under its sgm single-file names, prefix included (the model's own tensors)."""
    te_state = text_encoder.state_dict()
    return {TE1_PREFIX + ldm: te_state[key] for key, ldm in text_encoder_ldm_param_names(text_encoder, v2=False).items()}


def sdxl_text_encoder_2_to_sgm(text_encoder_2) -> dict[str, torch.Tensor]:
    """Text encoder 2 (OpenCLIP bigG) under its sgm single-file names, prefix included."""
    return {TE2_PREFIX + key: value for key, value in _open_clip_state_dict(text_encoder_2, sd2=False).items()}


def sdxl_checkpoint_spec(
    source: str,
    vae: str | None,
    text_encoders: list,
    tokenizers: list,
    vae_model,
    unet,
    v_prediction: bool = False,
    zero_terminal_snr: bool = False,
):
    """What an SDXL checkpoint holds (model_checkpoint.CheckpointSpec): the in-memory parts and, for the parts not
    trained, the user's weights: the sgm single file `source` (copied by key), its diffusers folder, or the built-in
    tiny model built again; `vae` (--vae) replaces the VAE. Diffusers folders are StableDiffusionXLPipelines with
    SDXL base's Euler scheduler (the trained prediction type)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from library.model_checkpoint import CheckpointPart, CheckpointSpec, PartSource, model_parts, vae_part
    from library.model_files import tensor_sources
    from library.sd_models import ddpm_pipeline_scheduler, ldm_unet_and_vae_parts, ldm_vae_file_part
    from library.tiny_models import build_tiny_sdxl

    text_encoder, text_encoder_2 = text_encoders
    pooled_dim = text_encoder_2.config.projection_dim

    def single_file(file) -> dict[str, PartSource]:
        return {
            "unet": PartSource(
                build=lambda: unet_from_sgm(file.tensors(UNET_PREFIX, strip=False), pooled_dim, None, file.path),
                file=file,
                prefix=UNET_PREFIX,
            ),
            "text_encoder": PartSource(
                build=lambda: text_encoder_1_from_sgm(file.tensors(TE1_PREFIX, strip=False), None, file.path),
                file=file,
                prefix=TE1_FILE_PREFIX,
            ),
            "text_encoder_2": PartSource(
                build=lambda: text_encoder_2_from_sgm(file.tensors(TE2_PREFIX, strip=False), None, file.path),
                file=file,
                prefix=TE2_FILE_PREFIX,
            ),
            "vae": ldm_vae_file_part(file, SDXL_VAE),
        }

    classes = {
        "unet": UNet2DConditionModel,
        "text_encoder": CLIPTextModel,
        "text_encoder_2": CLIPTextModelWithProjection,
        "vae": AutoencoderKL,
    }
    sources = model_parts(source, classes, build_tiny_sdxl, single_file)
    if vae is not None:
        sources["vae"] = vae_part(vae, SDXL_VAE)
    unet_part, vae_part_ = ldm_unet_and_vae_parts(unet, vae_model, sources)
    parts = [
        unet_part,
        CheckpointPart(
            "text_encoder_0",
            "text_encoder",
            text_encoder,
            sources["text_encoder"],
            lambda m: tensor_sources(sdxl_text_encoder_1_to_sgm(m)),
            TE1_FILE_PREFIX,
        ),
        CheckpointPart(
            "text_encoder_1",
            "text_encoder_2",
            text_encoder_2,
            sources["text_encoder_2"],
            lambda m: tensor_sources(sdxl_text_encoder_2_to_sgm(m)),
            TE2_FILE_PREFIX,
        ),
        vae_part_,
    ]
    scheduler = ddpm_pipeline_scheduler("EulerDiscreteScheduler", sdxl_scheduler_config(), v_prediction, zero_terminal_snr)
    components = {"tokenizer": tokenizers[0], "tokenizer_2": tokenizers[1], "scheduler": scheduler}
    return CheckpointSpec("StableDiffusionXLPipeline", parts, components)
