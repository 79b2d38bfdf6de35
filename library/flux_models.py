"""FLUX.1 model files: loading, the BFL <-> diffusers transformer conversion, saving, LoRA module names.

Reads kiln's built-in tiny FLUX (kiln-tiny-flux), diffusers FLUX folders (FluxPipeline layout) and the files users
have from Black Forest Labs' releases:

    flux1-dev.safetensors    transformer in BFL layout: double_blocks.N.img_attn.qkv.weight, single_blocks.N.linear1.*,
                             img_in, txt_in, time_in, vector_in, guidance_in (dev only), final_layer
                             (with or without the `model.diffusion_model.` prefix)
    ae.safetensors           autoencoder in the LDM layout (encoder.down.N..., decoder.up.N...), no quant convs
    clip_l.safetensors       CLIP ViT-L text encoder, Hugging Face names (text_model.*)
    t5xxl_*.safetensors      T5 v1.1 XXL encoder, Hugging Face names (encoder.block.N..., shared.weight)

fp16 / bf16 / fp8 (e4m3fn, e5m2) tensors are upcast to the requested dtype on load.

Config inference from shapes: widths come from the embedders (img_in, txt_in, vector_in), depths from the block
counts, the head size from the per-head RMSNorm scale (`*.norm.query_norm.scale` has head_dim entries: 128 in the
real models, 16 in kiln's tiny one), so heads = hidden / head_dim with no assumed convention. Rotary axes cannot be
read from weights: head size 128 gets the real (16, 56, 56); kiln's tiny head size 16 gets (4, 6, 6); any other head
size d gets (d - 2*a, a, a) with a = 7/16 d rounded to an even number. Dev and schnell are told apart by
`guidance_in.*` (schnell has no guidance embedding).

BFL -> diffusers and diffusers -> BFL use kiln's own converters (any width); diffusers' converter assumes width 3072
and serves as the test oracle.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from library.checkpoint_files import (
    FAMILY_NAMES,
    FAMILY_SCRIPTS,
    UNET_PREFIX,
    ModelLoadError,
    _shape,
    detect_family,
    read_key_shapes,
    read_state_dict,
)
from library.model_files import (
    CLIP_L_HUB_ID,
    SD_VAE_COMMON,
    build_and_load,
    cast_model,
    check_tokenizer,
    folder_family,
    infer_clip_text_config,
    is_t5_tokenizer_folder,
    is_tokenizer_folder,
    key_indices,
    load_clip_tokenizer,
    own_memory,
    t5_from_state_dict,
    upcast_fp8,
    vae_from_state_dict,
    write_single_file,
)
from library.model_files import load_t5_tokenizer as _load_t5_tokenizer

logger = logging.getLogger(__name__)

MLP_RATIO = 4  # FluxTransformer2DModel's fixed MLP width: 4 x hidden

FLUX_VAE = {  # ae.safetensors: SD's autoencoder layout with 16 latent channels and no quant convs
    **SD_VAE_COMMON,
    "latent_channels": 16,
    "sample_size": 1024,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}


@dataclass
class FluxModel:
    """The parts of a FLUX.1 model, in diffusers / transformers classes."""

    transformer: Any  # diffusers.FluxTransformer2DModel
    vae: Any  # diffusers.AutoencoderKL (16 channels)
    text_encoder: Any  # transformers.CLIPTextModel (CLIP ViT-L)
    text_encoder_2: Any  # transformers.T5EncoderModel
    tokenizer: Any  # transformers.CLIPTokenizer
    tokenizer_2: Any  # transformers.T5Tokenizer
    is_schnell: bool
    source: str


def _wrong_family(path: str, family: str) -> ModelLoadError:
    if family in FAMILY_SCRIPTS and family != "flux":
        return ModelLoadError(f"{path} is an {FAMILY_NAMES[family]} model, not FLUX.1: use {FAMILY_SCRIPTS[family]} for it")
    return ModelLoadError(
        f"{path} is not a FLUX.1 model kiln can load: expected a BFL transformer file (double_blocks.*, single_blocks.*, "
        "with or without model.diffusion_model.) or a diffusers FLUX folder (with model_index.json)"
    )


# ---------------------------------------------------------------------------------------------------------------------
# Config inference
# ---------------------------------------------------------------------------------------------------------------------


def _strip_prefix(state_dict: Mapping[str, Any]) -> dict:
    if any(k.startswith(UNET_PREFIX) for k in state_dict):
        return {k[len(UNET_PREFIX) :]: v for k, v in state_dict.items() if k.startswith(UNET_PREFIX)}
    return dict(state_dict)


def rope_axes(head_dim: int) -> list[int]:
    """Rotary axes for a head size (see the module docstring): 128 -> (16, 56, 56), 16 -> (4, 6, 6)."""
    if head_dim == 128:
        return [16, 56, 56]
    if head_dim == 16:
        return [4, 6, 6]
    a = max(2, round(head_dim * 7 / 32) * 2)
    if head_dim - 2 * a < 2 or head_dim % 2:
        raise ModelLoadError(f"no rotary axes for a FLUX head size of {head_dim}")
    return [head_dim - 2 * a, a, a]


def infer_flux_transformer_config(state_dict_bfl: Mapping[str, Any]) -> dict:
    """A FluxTransformer2DModel config from a BFL transformer's shapes (meta tensors or shapes are fine)."""
    sd = {k: _shape(v) for k, v in _strip_prefix(state_dict_bfl).items()}
    try:
        hidden, in_channels = sd["img_in.weight"]
        joint = sd["txt_in.weight"][1]
        pooled = sd["vector_in.in_layer.weight"][1]
        head_dim = sd["double_blocks.0.img_attn.norm.query_norm.scale"][0]
        out_channels = sd["final_layer.linear.weight"][0]
        mlp = sd["double_blocks.0.img_mlp.0.weight"][0]
    except KeyError as e:
        raise ModelLoadError(f"incomplete FLUX transformer: {e.args[0]} missing") from e
    if hidden % head_dim:
        raise ModelLoadError(f"FLUX hidden size {hidden} is not a multiple of the head size {head_dim}")
    if mlp != MLP_RATIO * hidden:
        raise ModelLoadError(f"FLUX MLP width {mlp} is not {MLP_RATIO} x hidden size {hidden}")
    return {
        "patch_size": 1,
        "in_channels": in_channels,
        "out_channels": out_channels,
        "num_layers": len(key_indices(sd, "double_blocks.")),
        "num_single_layers": len(key_indices(sd, "single_blocks.")),
        "attention_head_dim": head_dim,
        "num_attention_heads": hidden // head_dim,
        "joint_attention_dim": joint,
        "pooled_projection_dim": pooled,
        "guidance_embeds": "guidance_in.in_layer.weight" in sd,
        "axes_dims_rope": rope_axes(head_dim),
    }


def is_schnell_state_dict(state_dict_bfl: Mapping[str, Any]) -> bool:
    """True for FLUX.1 schnell (no guidance embedding), False for dev."""
    return not any(k.startswith(("guidance_in.", UNET_PREFIX + "guidance_in.")) for k in state_dict_bfl)


# ---------------------------------------------------------------------------------------------------------------------
# diffusers <-> BFL transformer names
# ---------------------------------------------------------------------------------------------------------------------


def _config_value(config, name):
    return config[name] if isinstance(config, Mapping) else getattr(config, name)


def _blocks(config) -> tuple[int, int, int]:
    hidden = _config_value(config, "num_attention_heads") * _config_value(config, "attention_head_dim")
    return _config_value(config, "num_layers"), _config_value(config, "num_single_layers"), hidden


# One-to-one renames (diffusers suffix, BFL suffix) per part.
_EMBEDDERS = [
    ("x_embedder", "img_in"),
    ("context_embedder", "txt_in"),
    ("time_text_embed.timestep_embedder.linear_1", "time_in.in_layer"),
    ("time_text_embed.timestep_embedder.linear_2", "time_in.out_layer"),
    ("time_text_embed.text_embedder.linear_1", "vector_in.in_layer"),
    ("time_text_embed.text_embedder.linear_2", "vector_in.out_layer"),
    ("proj_out", "final_layer.linear"),
]
_GUIDANCE = [
    ("time_text_embed.guidance_embedder.linear_1", "guidance_in.in_layer"),
    ("time_text_embed.guidance_embedder.linear_2", "guidance_in.out_layer"),
]
_DOUBLE = [
    ("norm1.linear", "img_mod.lin"),
    ("norm1_context.linear", "txt_mod.lin"),
    ("attn.to_out.0", "img_attn.proj"),
    ("attn.to_add_out", "txt_attn.proj"),
    ("ff.net.0.proj", "img_mlp.0"),
    ("ff.net.2", "img_mlp.2"),
    ("ff_context.net.0.proj", "txt_mlp.0"),
    ("ff_context.net.2", "txt_mlp.2"),
]
_DOUBLE_NORMS = [
    ("attn.norm_q.weight", "img_attn.norm.query_norm.scale"),
    ("attn.norm_k.weight", "img_attn.norm.key_norm.scale"),
    ("attn.norm_added_q.weight", "txt_attn.norm.query_norm.scale"),
    ("attn.norm_added_k.weight", "txt_attn.norm.key_norm.scale"),
]
_DOUBLE_FUSED = [
    (["attn.to_q", "attn.to_k", "attn.to_v"], "img_attn.qkv"),
    (["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"], "txt_attn.qkv"),
]
_SINGLE = [("norm.linear", "modulation.lin"), ("proj_out", "linear2")]
_SINGLE_NORMS = [("attn.norm_q.weight", "norm.query_norm.scale"), ("attn.norm_k.weight", "norm.key_norm.scale")]
_SINGLE_FUSED = (["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"], "linear1")


def _renames(config, guidance: bool) -> list[tuple[str, str]]:
    """(diffusers parameter, BFL parameter) pairs that are plain renames."""
    num_layers, num_single, _ = _blocks(config)
    pairs = []
    modules = list(_EMBEDDERS) + (list(_GUIDANCE) if guidance else [])
    for i in range(num_layers):
        modules += [(f"transformer_blocks.{i}.{d}", f"double_blocks.{i}.{b}") for d, b in _DOUBLE]
        pairs += [(f"transformer_blocks.{i}.{d}", f"double_blocks.{i}.{b}") for d, b in _DOUBLE_NORMS]
    for i in range(num_single):
        modules += [(f"single_transformer_blocks.{i}.{d}", f"single_blocks.{i}.{b}") for d, b in _SINGLE]
        pairs += [(f"single_transformer_blocks.{i}.{d}", f"single_blocks.{i}.{b}") for d, b in _SINGLE_NORMS]
    for d, b in modules:
        pairs += [(f"{d}.weight", f"{b}.weight"), (f"{d}.bias", f"{b}.bias")]
    return pairs


def _fusions(config) -> list[tuple[list[str], str]]:
    """([diffusers Linear modules, in order], BFL Linear module) for the fused projections."""
    num_layers, num_single, _ = _blocks(config)
    out = []
    for i in range(num_layers):
        out += [([f"transformer_blocks.{i}.{p}" for p in parts], f"double_blocks.{i}.{b}") for parts, b in _DOUBLE_FUSED]
    for i in range(num_single):
        parts, b = _SINGLE_FUSED
        out.append(([f"single_transformer_blocks.{i}.{p}" for p in parts], f"single_blocks.{i}.{b}"))
    return out


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    """diffusers' final AdaLayerNormContinuous emits (scale, shift); BFL's final layer (shift, scale)."""
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


_FINAL_NORM = ("norm_out.linear", "final_layer.adaLN_modulation.1")


def _has_guidance_diffusers(sd: Mapping[str, Any]) -> bool:
    return "time_text_embed.guidance_embedder.linear_1.weight" in sd


def flux_transformer_to_bfl(state_dict_diffusers: Mapping[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """A FluxTransformer2DModel state dict in BFL single-file names (no prefix). `config`: the model's config (mapping
    or object). Works at any width: fused qkv / linear1 rows are the diffusers projections concatenated in order."""
    sd = state_dict_diffusers
    out: dict[str, torch.Tensor] = {}
    try:
        for d, b in _renames(config, _has_guidance_diffusers(sd)):
            out[b] = sd[d]
        for parts, b in _fusions(config):
            for suffix in ("weight", "bias"):
                out[f"{b}.{suffix}"] = torch.cat([sd[f"{p}.{suffix}"] for p in parts], dim=0)
        for suffix in ("weight", "bias"):
            out[f"{_FINAL_NORM[1]}.{suffix}"] = _swap_halves(sd[f"{_FINAL_NORM[0]}.{suffix}"])
    except KeyError as e:
        raise ModelLoadError(f"the FLUX transformer state dict lacks {e.args[0]}") from e
    return out


def flux_transformer_from_bfl(state_dict_bfl: Mapping[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """A BFL transformer state dict (with or without `model.diffusion_model.`) in FluxTransformer2DModel names."""
    sd = _strip_prefix(state_dict_bfl)
    _, _, hidden = _blocks(config)
    out: dict[str, torch.Tensor] = {}
    try:
        for d, b in _renames(config, "guidance_in.in_layer.weight" in sd):
            out[d] = sd[b]
        for parts, b in _fusions(config):
            sizes = [hidden] * len(parts)
            if len(parts) == 4:  # single block linear1: q, k, v, proj_mlp
                sizes[-1] = sd[f"{b}.weight"].shape[0] - 3 * hidden
            for suffix in ("weight", "bias"):
                for p, t in zip(parts, torch.split(sd[f"{b}.{suffix}"], sizes, dim=0)):
                    out[f"{p}.{suffix}"] = t
        for suffix in ("weight", "bias"):
            out[f"{_FINAL_NORM[0]}.{suffix}"] = _swap_halves(sd[f"{_FINAL_NORM[1]}.{suffix}"])
    except KeyError as e:
        raise ModelLoadError(f"incomplete FLUX transformer: {e.args[0]} missing") from e
    return out


def flux_lora_targets(transformer) -> list[tuple[str, list[str]]]:
    """(kohya/sd-scripts LoRA name without `lora_unet_`, [diffusers Linear module paths fused into it, in order]) for
    every Linear a FLUX LoRA trains, e.g. ("double_blocks_0_img_attn_qkv", ["transformer_blocks.0.attn.to_q", ...k, ...v]),
    ("single_blocks_0_linear1", [to_q, to_k, to_v, proj_mlp]), ("double_blocks_0_img_mod_lin",
    ["transformer_blocks.0.norm1.linear"]). `transformer`: a FluxTransformer2DModel (meta device is fine) or its config."""
    config = getattr(transformer, "config", transformer)
    name = lambda b: b.replace(".", "_")  # noqa: E731
    out = [(name(b), parts) for parts, b in _fusions(config)]
    guidance = bool(_config_value(config, "guidance_embeds"))
    for d, b in _renames(config, guidance):
        if d.endswith(".weight") and b.endswith(".weight") and not b.endswith(".scale"):
            out.append((name(b[: -len(".weight")]), [d[: -len(".weight")]]))
    out.append((name(_FINAL_NORM[1]), [_FINAL_NORM[0]]))
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Building models from single files
# ---------------------------------------------------------------------------------------------------------------------


def transformer_from_bfl(
    state_dict_bfl: Mapping[str, torch.Tensor], dtype=torch.bfloat16, source="checkpoint", *, copy: bool = True
):
    """A FluxTransformer2DModel from BFL-layout weights.

    The model owns its memory: editing `state_dict_bfl` afterwards leaves the model unchanged and training the model
    leaves `state_dict_bfl` unchanged. `copy=False` skips the copies and lets the model's parameters be (views of)
    the dict's tensors: for a caller that owns the dict and drops it after the call (a file just read), so that a
    24 GB checkpoint does not need 48 GB while loading."""
    from diffusers import FluxTransformer2DModel

    config = infer_flux_transformer_config(state_dict_bfl)
    converted = flux_transformer_from_bfl(upcast_fp8(state_dict_bfl, dtype), config)
    if copy:
        converted = own_memory(converted, state_dict_bfl, dtype)
    return build_and_load(lambda: FluxTransformer2DModel(**config), converted, dtype, "transformer", source)


def clip_l_from_state_dict(state_dict: Mapping[str, torch.Tensor], dtype=torch.bfloat16, source="clip_l"):
    """A CLIPTextModel from Hugging Face-layout CLIP-L weights (`text_model.*` or transformers 5's flattened names)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    sd = {}
    for k, v in upcast_fp8(state_dict, dtype).items():
        k = k[len("text_model.") :] if k.startswith("text_model.") else k
        if k.endswith("position_ids") or k.startswith(("text_projection", "logit_scale")):
            continue
        sd[k] = v
    if "embeddings.token_embedding.weight" not in sd:
        raise ModelLoadError(f"{source} is not a CLIP text encoder in Hugging Face layout (text_model.embeddings.*)")
    config = CLIPTextConfig(**infer_clip_text_config(sd))
    return build_and_load(lambda: CLIPTextModel(config), sd, dtype, "CLIP-L text encoder", source)


def _read(path: str, what: str, option: str) -> dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise ModelLoadError(f"{what} not found: {path} ({option})")
    return read_state_dict(path)


def load_ae(path: str, dtype=torch.bfloat16):
    """The FLUX autoencoder from ae.safetensors (LDM layout, any prefix), diffusers-layout weights or a diffusers VAE
    folder."""
    from diffusers import AutoencoderKL

    if os.path.isdir(path):
        for folder in (path, os.path.join(path, "vae")):
            if os.path.isfile(os.path.join(folder, "config.json")):
                return AutoencoderKL.from_pretrained(folder, torch_dtype=dtype).eval()
        raise ModelLoadError(f"autoencoder folder {path} has no config.json (nor vae/config.json)")
    sd = upcast_fp8(_read(path, "autoencoder", "--ae"), dtype)
    return vae_from_state_dict(sd, dtype, source=path, reference=FLUX_VAE)


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------------------------------------------------


def load_t5_tokenizer(tokenizer_cache_dir: str | None = None, vocab_size: int | None = None):
    """The T5 tokenizer (google/t5-v1_1-xxl) for a FLUX.1 model, offline (see model_files.load_t5_tokenizer)."""
    return _load_t5_tokenizer(tokenizer_cache_dir, vocab_size, model_name="FLUX.1")


def _load_clip_tokenizer(tokenizer_cache_dir, vocab_size):
    return load_clip_tokenizer(CLIP_L_HUB_ID, None, tokenizer_cache_dir, vocab_size, model_name="FLUX.1 (CLIP-L)")


# ---------------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------------


def _load_builtin(name: str) -> dict:
    from library.tiny_models import BUILTIN_FAMILY, TINY_FLUX, build_tiny_flux

    if name != TINY_FLUX:
        raise _wrong_family(name, BUILTIN_FAMILY[name])
    return build_tiny_flux()


def _load_folder(path: str, tokenizer_cache_dir, dtype, skip: set[str]) -> dict:
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5Tokenizer

    try:
        family, _ = folder_family(path)
    except ModelLoadError:
        family = "unknown"
    if family != "flux":
        raise _wrong_family(path, family)
    for sub in {"transformer", "vae", "text_encoder", "text_encoder_2"} - skip:
        if not os.path.isfile(os.path.join(path, sub, "config.json")):
            raise ModelLoadError(f"{path} is not a complete diffusers FLUX folder: {sub}/config.json is missing")
    parts = {"transformer": FluxTransformer2DModel.from_pretrained(path, subfolder="transformer", torch_dtype=dtype)}
    if "vae" not in skip:
        parts["vae"] = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=dtype)
    if "text_encoder" not in skip:
        parts["text_encoder"] = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", dtype=dtype)
    if "text_encoder_2" not in skip:
        parts["text_encoder_2"] = T5EncoderModel.from_pretrained(path, subfolder="text_encoder_2", dtype=dtype)
    if is_tokenizer_folder(os.path.join(path, "tokenizer")):
        parts["tokenizer"] = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
    if is_t5_tokenizer_folder(os.path.join(path, "tokenizer_2")):
        parts["tokenizer_2"] = T5Tokenizer.from_pretrained(path, subfolder="tokenizer_2")
    return parts


def _load_transformer_file(path: str, dtype) -> Any:
    # Decide the family from the names first: a wrong-family file (maybe tens of GB) is refused before it is read.
    if path.lower().endswith(".safetensors"):
        family = detect_family(read_key_shapes(path))  # ModelLoadError: truncated / not safetensors
        if family != "flux":
            raise _wrong_family(path, family)
    checkpoint = read_state_dict(path)
    family = detect_family(checkpoint)
    if family != "flux":
        raise _wrong_family(path, family)
    return transformer_from_bfl(checkpoint, dtype, path, copy=False)  # the checkpoint is ours and dropped here


def load_flux_model(
    name_or_path: str,
    clip_l: str | None = None,
    t5xxl: str | None = None,
    ae: str | None = None,
    tokenizer_cache_dir: str | None = None,
    dtype: torch.dtype = torch.bfloat16,
) -> FluxModel:
    """Load a FLUX.1 model: the built-in kiln-tiny-flux, a diffusers FLUX folder (its components; `clip_l`, `t5xxl`,
    `ae` replace them), or a BFL transformer single file, which needs `ae`, `clip_l` and `t5xxl` files. Raises
    ModelLoadError for missing files, incomplete weights and other families (naming their script)."""
    from library.tiny_models import BUILTIN_MODELS

    name_or_path = os.fspath(name_or_path)
    overrides = {"vae": ae, "text_encoder": clip_l, "text_encoder_2": t5xxl}
    for option, value in (("--ae", ae), ("--clip_l", clip_l), ("--t5xxl", t5xxl)):
        if value is not None and not os.path.exists(value):
            raise ModelLoadError(f"{option} not found: {value}")
    skip = {k for k, v in overrides.items() if v is not None}

    if name_or_path in BUILTIN_MODELS:
        parts = _load_builtin(name_or_path)
    elif os.path.isdir(name_or_path):
        parts = _load_folder(name_or_path, tokenizer_cache_dir, dtype, skip)
    elif os.path.isfile(name_or_path):
        # the transformer file is read first, so that a wrong family gets its script's name
        parts = {"transformer": _load_transformer_file(name_or_path, dtype)}
        missing = [opt for what, opt in (("vae", "--ae"), ("text_encoder", "--clip_l"), ("text_encoder_2", "--t5xxl"))
                   if overrides[what] is None]
        if missing:
            raise ModelLoadError(
                f"{name_or_path} holds only the FLUX.1 transformer: give the other parts with {', '.join(missing)} "
                "(ae.safetensors, clip_l.safetensors, t5xxl_fp16.safetensors)"
            )
    else:
        raise ModelLoadError(
            f"model not found: {name_or_path} (expected a built-in name {', '.join(BUILTIN_MODELS)}, a diffusers FLUX "
            "folder or a BFL .safetensors file; kiln does not download models from a hub)"
        )

    if ae is not None:
        parts["vae"] = load_ae(ae, dtype)
    if clip_l is not None:
        parts["text_encoder"] = clip_l_from_state_dict(_read(clip_l, "CLIP-L", "--clip_l"), dtype, clip_l)
    if t5xxl is not None:
        parts["text_encoder_2"] = t5_from_state_dict(_read(t5xxl, "T5-XXL", "--t5xxl"), dtype, t5xxl)
    if parts.get("tokenizer") is None:
        parts["tokenizer"] = _load_clip_tokenizer(tokenizer_cache_dir, parts["text_encoder"].config.vocab_size)
    if parts.get("tokenizer_2") is None:
        parts["tokenizer_2"] = load_t5_tokenizer(tokenizer_cache_dir, parts["text_encoder_2"].config.vocab_size)
    check_tokenizer(parts["tokenizer"], parts["text_encoder"], name_or_path)
    check_tokenizer(parts["tokenizer_2"], parts["text_encoder_2"], name_or_path)

    models = {k: cast_model(parts[k], dtype).eval() for k in ("transformer", "vae", "text_encoder", "text_encoder_2")}
    return FluxModel(
        **models,
        tokenizer=parts["tokenizer"],
        tokenizer_2=parts["tokenizer_2"],
        is_schnell=not models["transformer"].config.guidance_embeds,
        source=name_or_path,
    )


# ---------------------------------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------------------------------


def save_flux_transformer_bfl(
    path: str, transformer, dtype: torch.dtype | None = None, metadata: dict[str, str] | None = None
) -> None:
    """Write a FluxTransformer2DModel as a BFL single file (flux1-dev.safetensors layout, no prefix), atomically.
    `dtype` casts floating tensors."""
    write_single_file(path, flux_transformer_to_bfl(transformer.state_dict(), transformer.config), dtype, metadata)


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints of a trained model (ModelFamily.save_checkpoint; see library/model_checkpoint.py)
# ---------------------------------------------------------------------------------------------------------------------


def flux_release_scheduler_config(schnell: bool) -> dict:
    """The FlowMatchEulerDiscreteScheduler config the FLUX.1 releases ship: dev shifts with the image size
    (resolution-dependent shift between 0.5 and 1.15 for 256..4096 tokens), schnell uses shift 1."""
    if schnell:
        return {"num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": False}
    return {
        "num_train_timesteps": 1000,
        "shift": 3.0,
        "use_dynamic_shifting": True,
        "base_image_seq_len": 256,
        "max_image_seq_len": 4096,
        "base_shift": 0.5,
        "max_shift": 1.15,
    }


def flux_transformer_bfl_sources(transformer) -> dict:
    """A FluxTransformer2DModel's tensors in BFL single-file names (model_files.TensorSource each; fused tensors are
    concatenated when the sources are made, renamed ones are the model's own)."""
    from library.model_files import tensor_sources

    return tensor_sources(flux_transformer_to_bfl(transformer.state_dict(), transformer.config))


def flux_checkpoint_spec(
    source: str,
    ae: str | None,
    clip_l: str | None,
    t5xxl: str | None,
    text_encoders: list,
    tokenizers: list,
    vae_model,
    transformer,
    schnell: bool,
):
    """What a FLUX.1 checkpoint holds (model_checkpoint.CheckpointSpec): the single file is the bare BFL transformer
    (no prefix, as flux1-dev.safetensors); a diffusers folder is a FluxPipeline with every component. Parts not
    trained come from the user's files: the BFL file `source` (with or without `model.diffusion_model.`), a diffusers
    folder or the built-in tiny model, and the --ae / --clip_l / --t5xxl files that replace its parts. The text
    encoders and the autoencoder are never trained."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5EncoderModel

    from library.model_checkpoint import CheckpointPart, CheckpointSpec, PartSource, model_parts, vae_part
    from library.tiny_models import build_tiny_flux

    def single_file(file) -> dict[str, PartSource]:
        prefix = UNET_PREFIX if file.keys(UNET_PREFIX) else ""
        build = lambda: transformer_from_bfl(file.tensors(prefix), None, file.path, copy=False)  # noqa: E731
        return {"transformer": PartSource(build=build, file=file, prefix=prefix)}

    classes = {
        "transformer": FluxTransformer2DModel,
        "text_encoder": CLIPTextModel,
        "text_encoder_2": T5EncoderModel,
        "vae": AutoencoderKL,
    }
    sources = model_parts(source, classes, build_tiny_flux, single_file)
    if ae is not None:
        sources["vae"] = vae_part(ae, FLUX_VAE)
    if clip_l is not None:
        sources["text_encoder"] = PartSource(build=lambda: clip_l_from_state_dict(read_state_dict(clip_l), None, clip_l))
    if t5xxl is not None:
        sources["text_encoder_2"] = PartSource(build=lambda: t5_from_state_dict(read_state_dict(t5xxl), None, t5xxl))
    missing = [c for c in classes if c not in sources]
    if missing:
        raise ModelLoadError(f"{source} holds only the FLUX.1 transformer: the {', '.join(missing)} files are needed")
    text_encoder, text_encoder_2 = text_encoders
    parts = [
        CheckpointPart("denoiser", "transformer", transformer, sources["transformer"], flux_transformer_bfl_sources),
        CheckpointPart("text_encoder_0", "text_encoder", text_encoder, sources["text_encoder"], trainable=False),
        CheckpointPart("text_encoder_1", "text_encoder_2", text_encoder_2, sources["text_encoder_2"], trainable=False),
        CheckpointPart("vae", "vae", vae_model, sources["vae"]),
    ]
    scheduler = FlowMatchEulerDiscreteScheduler(**flux_release_scheduler_config(schnell))
    components = {"tokenizer": tokenizers[0], "tokenizer_2": tokenizers[1], "scheduler": scheduler}
    return CheckpointSpec("FluxPipeline", parts, components)
