"""SD3 / SD3.5 model files: Stability AI's single-file layout <-> diffusers / transformers, config inference, variants.

The files users have (sd3_medium*.safetensors, sd3.5_medium.safetensors, sd3.5_large*.safetensors, and what
sd-scripts' sd3_train.py writes) hold, each under its own prefix:

    model.diffusion_model.     the MMDiT: x_embedder.proj (patch conv), pos_embed (1, N, H) sin-cos table,
                               t_embedder.mlp.{0,2}, y_embedder.mlp.{0,2} (pooled text), context_embedder,
                               joint_blocks.N.{x_block,context_block}.{attn.qkv, attn.proj, attn.ln_q/ln_k (3.5),
                               adaLN_modulation.1, mlp.fc1, mlp.fc2}, x_block.attn2.* (3.5 Medium's "MMDiT-X"
                               layers), final_layer.{linear, adaLN_modulation.1}. The last context block is
                               "pre-only": qkv (and qk-norms) and a 2H shift/scale modulation, no proj, no MLP.
    first_stage_model.         the 16-channel VAE in the LDM layout (encoder.down.N..., no quant convs)
    text_encoders.clip_l.transformer.   CLIP ViT-L/14 in transformers' CLIPTextModelWithProjection names
                                        (text_model.*, text_projection.weight)
    text_encoders.clip_g.transformer.   OpenCLIP bigG/14 text tower, also in transformers' names (not open_clip's)
    text_encoders.t5xxl.transformer.    T5 v1.1 XXL encoder in transformers' T5EncoderModel names

SD3.5 release files hold only the MMDiT and the VAE; SD3 Medium's "incl_clips" files hold all five parts. A file
holding only the MMDiT may also come without the `model.diffusion_model.` prefix.

diffusers' SD3Transformer2DModel splits every fused qkv into to_q/to_k/to_v (x side) and add_q/k/v_proj (context
side), and its AdaLayerNormContinuous layers (the final layer's and the pre-only context block's) emit
(scale, shift) where SAI's emit (shift, scale). One table (`_transformer_plan`) describes every tensor of the
MMDiT both ways.

Loading (`load_sd3_model`): a built-in tiny model (kiln-tiny-sd3, kiln-tiny-sd3.5-medium, kiln-tiny-sd3.5-large), a
diffusers SD3 folder (StableDiffusion3Pipeline layout: transformer/, vae/, text_encoder/ (CLIP-L), text_encoder_2/
(CLIP-G), text_encoder_3/ (T5), tokenizer/, tokenizer_2/, tokenizer_3/; sd-scripts reads none) or a single file, with
`--clip_l` / `--clip_g` / `--t5xxl` / `--vae` files for the parts it lacks. Unlike sd-scripts (whose bundled CLIP-G
and T5 silently win over the files given), a file given always replaces the bundled part, with one INFO line on the
"kiln" logger saying so, and the replaced part is not read.

Config inference: widths from the embedders, depth from the block count, patch size from the patch conv,
pos_embed_max_size from the pos_embed table (N = max^2), qk-norm from `ln_q` (RMSNorm over a head: its size is the
head size), MMDiT-X layers from `x_block.attn2`. Without qk-norm the head size cannot be read from the weights: SAI's
MMDiT uses 64-wide heads (hidden = 64 x depth), and so does kiln. `sample_size` is not in the weights either: every
release uses 128, and with pos_embed_max_size set it only shapes the initial sin-cos table, which the file replaces.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from library.checkpoint_files import (
    FAMILY_NAMES,
    FAMILY_SCRIPTS,
    UNET_PREFIX,
    VAE_PREFIX,
    ModelLoadError,
    _shape,
    detect_family,
    read_key_shapes,
    read_state_dict,
    unreadable_model,
)
from library.model_files import (
    CLIP_BIGG_HUB_ID,
    CLIP_L_HUB_ID,
    CLIP_L_TEXT_CONFIG,
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
    load_t5_tokenizer,
    load_vae,
    own_memory,
    t5_from_state_dict,
    tensor_sources,
    upcast_fp8,
    vae_from_state_dict,
    vae_to_ldm_state_dict,
    write_tensor_sources,
)

logger = logging.getLogger("kiln")

CLIP_L_PREFIX = "text_encoders.clip_l.transformer."
CLIP_G_PREFIX = "text_encoders.clip_g.transformer."
T5XXL_PREFIX = "text_encoders.t5xxl.transformer."
PART_PREFIXES = {  # part name -> its prefix in a SAI single file
    "transformer": UNET_PREFIX,
    "vae": VAE_PREFIX,
    "clip_l": CLIP_L_PREFIX,
    "clip_g": CLIP_G_PREFIX,
    "t5xxl": T5XXL_PREFIX,
}

SD3_VARIANTS = ("sd3-medium", "sd3.5-medium", "sd3.5-large")
SD3_SS_BASE_MODEL_VERSION = {  # what sd-scripts writes as ss_base_model_version (its model_type)
    "sd3-medium": "medium",
    "sd3.5-medium": "5-medium",
    "sd3.5-large": "5-large",
}
SD3_MODELSPEC_ARCHITECTURE = {  # modelspec.architecture of a full checkpoint; a LoRA appends "/lora"
    "sd3-medium": "stable-diffusion-3-medium",
    "sd3.5-medium": "stable-diffusion-3-5-medium",
    "sd3.5-large": "stable-diffusion-3-5-large",
}

SAI_HEAD_DIM = 64  # SAI's MMDiT: 64-wide heads, hidden = 64 x depth
SD3_SAMPLE_SIZE = 128  # every release's diffusers config; not stored in the weights

SD3_VAE = {  # the SD3 / SD3.5 autoencoder (identical in all three releases)
    **SD_VAE_COMMON,
    "latent_channels": 16,
    "sample_size": 1024,
    "scaling_factor": 1.5305,
    "shift_factor": 0.0609,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "force_upcast": True,
}
CLIP_G = {  # laion/CLIP-ViT-bigG-14-laion2B-39B-b160k text tower (its tokenizer pads with id 0)
    **CLIP_L_TEXT_CONFIG,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "hidden_act": "gelu",
    "projection_dim": 1280,
}
CLIP_G_PAD_TOKEN = "!"  # id 0 in CLIP's vocabulary: sd-scripts pads CLIP-G with it, as SD3's diffusers tokenizer_2
SD3_PARTS = {  # part -> (what it is, the option that gives it as a file, the file users have)
    "vae": ("VAE", "--vae", "the SD3 VAE, e.g. a diffusers vae/ folder"),
    "clip_l": ("CLIP-L text encoder", "--clip_l", "clip_l.safetensors"),
    "clip_g": ("CLIP-G text encoder", "--clip_g", "clip_g.safetensors"),
    "t5xxl": ("T5-XXL text encoder", "--t5xxl", "t5xxl_fp16.safetensors"),
}


def _wrong_family(path: str, family: str) -> ModelLoadError:
    if family in FAMILY_SCRIPTS and family != "sd3":
        return ModelLoadError(f"{path} is a {FAMILY_NAMES[family]} model, not SD3/SD3.5: use {FAMILY_SCRIPTS[family]} for it")
    return ModelLoadError(
        f"{path} is not an SD3/SD3.5 model kiln can load: expected Stability AI's single-file layout "
        f"({UNET_PREFIX}joint_blocks.*, optionally {VAE_PREFIX}* and text_encoders.*), an MMDiT file without the "
        "prefix (joint_blocks.*, x_embedder.*), or a diffusers SD3 folder (model_index.json of a StableDiffusion3Pipeline)"
    )


def _config_value(config, name: str):
    return config[name] if isinstance(config, Mapping) else getattr(config, name)


# ---------------------------------------------------------------------------------------------------------------------
# The MMDiT name table: SAI <-> diffusers
# ---------------------------------------------------------------------------------------------------------------------

# (SAI module, diffusers module) renamed as they are; each has .weight and .bias.
_EMBEDDERS = [
    ("x_embedder.proj", "pos_embed.proj"),
    ("t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_1"),
    ("t_embedder.mlp.2", "time_text_embed.timestep_embedder.linear_2"),
    ("y_embedder.mlp.0", "time_text_embed.text_embedder.linear_1"),
    ("y_embedder.mlp.2", "time_text_embed.text_embedder.linear_2"),
    ("context_embedder", "context_embedder"),
    ("final_layer.linear", "proj_out"),
]
_X_BLOCK = [
    ("x_block.attn.proj", "attn.to_out.0"),
    ("x_block.adaLN_modulation.1", "norm1.linear"),
    ("x_block.mlp.fc1", "ff.net.0.proj"),
    ("x_block.mlp.fc2", "ff.net.2"),
]
_CONTEXT_BLOCK = [  # all but the last (pre-only) block
    ("context_block.attn.proj", "attn.to_add_out"),
    ("context_block.adaLN_modulation.1", "norm1_context.linear"),
    ("context_block.mlp.fc1", "ff_context.net.0.proj"),
    ("context_block.mlp.fc2", "ff_context.net.2"),
]
_QKV = [  # (SAI fused module, diffusers q/k/v modules in row order)
    ("x_block.attn.qkv", ("attn.to_q", "attn.to_k", "attn.to_v")),
    ("context_block.attn.qkv", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")),
]
_QK_NORMS = [  # RMSNorm scales (weight only)
    ("x_block.attn.ln_q", "attn.norm_q"),
    ("x_block.attn.ln_k", "attn.norm_k"),
    ("context_block.attn.ln_q", "attn.norm_added_q"),
    ("context_block.attn.ln_k", "attn.norm_added_k"),
]
_ATTN2 = [("x_block.attn2.proj", "attn2.to_out.0")]
_ATTN2_QKV = ("x_block.attn2.qkv", ("attn2.to_q", "attn2.to_k", "attn2.to_v"))
_ATTN2_NORMS = [("x_block.attn2.ln_q", "attn2.norm_q"), ("x_block.attn2.ln_k", "attn2.norm_k")]
_PRE_ONLY_MODULATION = ("context_block.adaLN_modulation.1", "norm1_context.linear")  # (shift, scale) <-> (scale, shift)
_FINAL_MODULATION = ("final_layer.adaLN_modulation.1", "norm_out.linear")  # likewise

_SAME, _CAT, _SWAP = "same", "cat", "swap"


@dataclass(frozen=True)
class _Entry:
    """One SAI tensor and the diffusers tensor(s) it is made of: the same tensor renamed ("same"), the row-wise
    concatenation of q, k and v ("cat"), or the tensor with its two row halves swapped ("swap")."""

    sai: str
    diffusers: tuple[str, ...]
    op: str


@dataclass(frozen=True)
class _Structure:
    num_layers: int
    dual_attention_layers: tuple[int, ...]
    qk_norm: bool


def _transformer_plan(structure: _Structure) -> list[_Entry]:
    """Every tensor of an MMDiT of this structure, in SAI order, with its diffusers source(s)."""
    plan = [_Entry("pos_embed", ("pos_embed.pos_embed",), _SAME)]

    def modules(sai: str, diffusers: str, op: str = _SAME, suffixes=("weight", "bias")) -> None:
        plan.extend(_Entry(f"{sai}.{s}", (f"{diffusers}.{s}",), op) for s in suffixes)

    def fused(sai: str, parts: tuple[str, ...]) -> None:
        plan.extend(_Entry(f"{sai}.{s}", tuple(f"{p}.{s}" for p in parts), _CAT) for s in ("weight", "bias"))

    for sai, diffusers in _EMBEDDERS:
        modules(sai, diffusers)
    last = structure.num_layers - 1
    for i in range(structure.num_layers):
        s, d = f"joint_blocks.{i}.", f"transformer_blocks.{i}."
        for sai, parts in _QKV:
            fused(s + sai, tuple(d + p for p in parts))
        if structure.qk_norm:
            for sai, diffusers in _QK_NORMS:
                modules(s + sai, d + diffusers, suffixes=("weight",))
        for sai, diffusers in _X_BLOCK:
            modules(s + sai, d + diffusers)
        if i == last:
            modules(s + _PRE_ONLY_MODULATION[0], d + _PRE_ONLY_MODULATION[1], _SWAP)
        else:
            for sai, diffusers in _CONTEXT_BLOCK:
                modules(s + sai, d + diffusers)
        if i in structure.dual_attention_layers:
            fused(s + _ATTN2_QKV[0], tuple(d + p for p in _ATTN2_QKV[1]))
            for sai, diffusers in _ATTN2:
                modules(s + sai, d + diffusers)
            if structure.qk_norm:
                for sai, diffusers in _ATTN2_NORMS:
                    modules(s + sai, d + diffusers, suffixes=("weight",))
    modules(*_FINAL_MODULATION, op=_SWAP)
    return plan


def _strip_transformer_prefix(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The MMDiT part of a SAI state dict without `model.diffusion_model.` (a file without the prefix as it is)."""
    if any(k.startswith(UNET_PREFIX) for k in state_dict):
        return {k[len(UNET_PREFIX) :]: v for k, v in state_dict.items() if k.startswith(UNET_PREFIX)}
    return dict(state_dict)


def _sai_structure(keys: Iterable[str]) -> _Structure:
    keys = list(keys)
    layers = key_indices(keys, "joint_blocks.")
    if not layers:
        raise ModelLoadError("no SD3 MMDiT blocks (joint_blocks.*) found")
    if layers != list(range(len(layers))):
        missing = sorted(set(range(layers[-1] + 1)) - set(layers))
        raise ModelLoadError(f"incomplete SD3 MMDiT: joint_blocks.{missing[0]}.* missing")
    dual = tuple(i for i in layers if f"joint_blocks.{i}.x_block.attn2.qkv.weight" in keys)
    return _Structure(len(layers), dual, "joint_blocks.0.x_block.attn.ln_q.weight" in keys)


def _diffusers_structure(keys: Iterable[str]) -> _Structure:
    keys = list(keys)
    layers = key_indices(keys, "transformer_blocks.")
    if not layers or layers != list(range(len(layers))):
        raise ModelLoadError("not a complete SD3Transformer2DModel state dict (transformer_blocks.N.* missing)")
    dual = tuple(i for i in layers if f"transformer_blocks.{i}.attn2.to_q.weight" in keys)
    return _Structure(len(layers), dual, "transformer_blocks.0.attn.norm_q.weight" in keys)


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def _check_scaled_fp8(keys: Iterable[str], source: str) -> None:
    for k in keys:
        if k == "scaled_fp8" or k.endswith((".scale_weight", ".scale_input")):
            raise ModelLoadError(
                f"{source} is a 'scaled fp8' file (per-tensor scales such as {k}), which kiln does not read: use the "
                "fp16/bf16 release of the model (kiln's --fp8_base makes its own fp8 weights)"
            )


def _leftovers(keys: Iterable[str], used: set[str], what: str, source: str, strict: bool) -> None:
    extra = sorted(set(keys) - used)
    if not extra:
        return
    shown = ", ".join(extra[:5]) + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
    if strict:
        raise ModelLoadError(f"{source}: {what} has tensors that are not part of an SD3 MMDiT: {shown}")
    logger.warning("%s: ignored %d tensors that are not part of an SD3 MMDiT: %s", source, len(extra), shown)


def sd3_transformer_from_sai(
    state_dict: Mapping[str, torch.Tensor], *, strict: bool = False, source: str = "checkpoint"
) -> dict[str, torch.Tensor]:
    """A SAI MMDiT state dict (with or without `model.diffusion_model.`; other parts of a single file are ignored) in
    SD3Transformer2DModel names. Split q/k/v are tensors of their own; renamed tensors are the input's. A missing
    tensor raises ModelLoadError naming it; unknown MMDiT tensors are logged (strict: ModelLoadError)."""
    sd = _strip_transformer_prefix(state_dict)
    _check_scaled_fp8(sd, source)
    structure = _sai_structure(sd)
    out: dict[str, torch.Tensor] = {}
    try:
        for entry in _transformer_plan(structure):
            value = sd[entry.sai]
            if entry.op == _CAT:
                if value.shape[0] % 3:
                    raise ModelLoadError(f"{source}: {entry.sai} has {value.shape[0]} rows, not 3 x hidden size")
                for name, part in zip(entry.diffusers, value.chunk(3, dim=0)):
                    out[name] = part.clone()
            elif entry.op == _SWAP:
                out[entry.diffusers[0]] = _swap_halves(value)
            else:
                out[entry.diffusers[0]] = value
    except KeyError as e:
        raise ModelLoadError(f"{source}: incomplete SD3 MMDiT: {e.args[0]} missing") from e
    _leftovers(sd, {e.sai for e in _transformer_plan(structure)}, "the MMDiT", source, strict)
    return out


def _transformer_sources(state_dict: Mapping[str, torch.Tensor]) -> dict[str, tuple[tuple[int, ...], torch.dtype, Callable]]:
    """SAI MMDiT name (no prefix) -> (shape, dtype, function making the tensor) for a diffusers state dict: the fused
    tensors are made only when asked for (one at a time when streamed to a file)."""
    sd = state_dict
    structure = _diffusers_structure(sd)
    plan = _transformer_plan(structure)
    missing = [name for e in plan for name in e.diffusers if name not in sd]
    if missing:
        raise ModelLoadError(f"the SD3 transformer state dict lacks {missing[0]}")
    extra = sorted(set(sd) - {name for e in plan for name in e.diffusers})
    if extra:
        raise ModelLoadError(f"the SD3 transformer has tensors kiln cannot write in the SAI layout: {', '.join(extra[:5])}")
    out = {}
    for e in plan:
        first = sd[e.diffusers[0]]
        if e.op == _CAT:
            rows = sum(sd[n].shape[0] for n in e.diffusers)
            make = lambda names=e.diffusers: torch.cat([sd[n] for n in names], dim=0)  # noqa: E731
            out[e.sai] = ((rows, *first.shape[1:]), first.dtype, make)
        elif e.op == _SWAP:
            out[e.sai] = (tuple(first.shape), first.dtype, lambda t=first: _swap_halves(t))
        else:
            out[e.sai] = (tuple(first.shape), first.dtype, lambda t=first: t)
    return out


def sd3_transformer_to_sai(state_dict: Mapping[str, torch.Tensor], prefix: str = UNET_PREFIX) -> dict[str, torch.Tensor]:
    """An SD3Transformer2DModel state dict in SAI single-file names, `prefix` (default `model.diffusion_model.`)
    included. Renamed tensors are the input's own; fused qkv and swapped modulations are new tensors."""
    return {prefix + name: make() for name, (_, _, make) in _transformer_sources(state_dict).items()}


# ---------------------------------------------------------------------------------------------------------------------
# Config inference and variants
# ---------------------------------------------------------------------------------------------------------------------


def infer_sd3_transformer_config(state_dict_sai: Mapping[str, Any]) -> dict:
    """An SD3Transformer2DModel config from a SAI MMDiT's shapes (with or without `model.diffusion_model.`; tensors,
    meta tensors or shapes). See the module docstring for what the weights cannot tell."""
    sd = {k: _shape(v) for k, v in _strip_transformer_prefix(state_dict_sai).items()}
    structure = _sai_structure(sd)
    try:
        hidden, in_channels, patch, patch_w = sd["x_embedder.proj.weight"]
        positions = sd["pos_embed"][1]
        caption, joint = sd["context_embedder.weight"]
        pooled = sd["y_embedder.mlp.0.weight"][1]
        out_rows = sd["final_layer.linear.weight"][0]
    except KeyError as e:
        raise ModelLoadError(f"incomplete SD3 MMDiT: {e.args[0]} missing") from e
    if "joint_blocks.0.x_block.attn.ln_q.bias" in sd:
        raise ModelLoadError("this SD3 MMDiT uses LayerNorm qk-norm (ln_q.bias), which no SD3 release has: not supported")
    head_dim = sd["joint_blocks.0.x_block.attn.ln_q.weight"][0] if structure.qk_norm else SAI_HEAD_DIM
    max_size = math.isqrt(positions)
    if patch != patch_w or max_size * max_size != positions or hidden % head_dim or out_rows % (patch * patch):
        raise ModelLoadError(
            f"SD3 MMDiT shapes do not fit together: patch {patch}x{patch_w}, {positions} positions, hidden size "
            f"{hidden}, head size {head_dim}, final layer {out_rows} rows"
        )
    return {
        "sample_size": SD3_SAMPLE_SIZE,
        "patch_size": patch,
        "in_channels": in_channels,
        "num_layers": structure.num_layers,
        "attention_head_dim": head_dim,
        "num_attention_heads": hidden // head_dim,
        "joint_attention_dim": joint,
        "caption_projection_dim": caption,
        "pooled_projection_dim": pooled,
        "out_channels": out_rows // (patch * patch),
        "pos_embed_max_size": max_size,
        "dual_attention_layers": structure.dual_attention_layers,
        "qk_norm": "rms_norm" if structure.qk_norm else None,
    }


def _variant(qk_norm: bool, dual: bool) -> str:
    # sd-scripts' rule: no qk-norm -> SD3 Medium; qk-norm with MMDiT-X layers -> 3.5 Medium, without -> 3.5 Large
    if not qk_norm:
        return "sd3-medium"
    return "sd3.5-medium" if dual else "sd3.5-large"


def detect_sd3_variant(keys: Iterable[str] | Mapping[str, Any]) -> str:
    """"sd3-medium", "sd3.5-medium" or "sd3.5-large" from a SAI file's key names (with or without
    `model.diffusion_model.`). SD3.5 Large Turbo has Large's architecture. See SD3_SS_BASE_MODEL_VERSION for
    sd-scripts' names."""
    names = list(keys.keys()) if isinstance(keys, Mapping) else list(keys)
    structure = _sai_structure(_strip_transformer_prefix(dict.fromkeys(names)))
    return _variant(structure.qk_norm, bool(structure.dual_attention_layers))


def sd3_variant_from_config(config) -> str:
    """The variant of an SD3Transformer2DModel config (mapping or config object); see detect_sd3_variant."""
    return _variant(bool(_config_value(config, "qk_norm")), bool(_config_value(config, "dual_attention_layers")))


# ---------------------------------------------------------------------------------------------------------------------
# Splitting a single file
# ---------------------------------------------------------------------------------------------------------------------


def _split_keys(keys: Iterable[str]) -> tuple[dict[str, tuple[str, str]], list[str]]:
    """({key: (part, key within the part)}, [keys outside every part]) of a SAI single file's keys. An MMDiT file
    without the prefix is all "transformer"; `text_encoders.<name>.*` keys of no part (a CLIP's logit_scale) are in
    neither."""
    keys = list(keys)
    bare = not any(k.startswith(UNET_PREFIX) for k in keys) and any(k.startswith("joint_blocks.") for k in keys)
    where: dict[str, tuple[str, str]] = {}
    other: list[str] = []
    for key in keys:
        for part, prefix in PART_PREFIXES.items():
            if key.startswith(prefix):
                where[key] = (part, key[len(prefix) :])
                break
        else:
            if bare and not key.startswith(("text_encoders.", VAE_PREFIX)):
                where[key] = ("transformer", key)
            elif not key.startswith("text_encoders."):
                other.append(key)
    return where, other


def _warn_ignored(other: list[str], source: str) -> None:
    if other:
        shown = ", ".join(other[:5]) + (f" and {len(other) - 5} more" if len(other) > 5 else "")
        logger.warning("%s: ignored %d tensors outside the SD3 parts: %s", source, len(other), shown)


def split_sai_state_dict(state_dict: Mapping[str, torch.Tensor], source: str = "checkpoint") -> dict[str, dict[str, torch.Tensor]]:
    """The parts of a SAI single file, each without its prefix: {"transformer", "vae", "clip_l", "clip_g", "t5xxl"}
    (only those present). An MMDiT file without the prefix is all "transformer". Other `text_encoders.<name>.*` tensors
    (a CLIP's logit_scale) are dropped; any other key is logged and ignored."""
    where, other = _split_keys(state_dict)
    _warn_ignored(other, source)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, (part, name) in where.items():
        parts.setdefault(part, {})[name] = state_dict[key]
    return parts


# ---------------------------------------------------------------------------------------------------------------------
# Building models
# ---------------------------------------------------------------------------------------------------------------------


def transformer_from_sai(
    state_dict_sai: Mapping[str, torch.Tensor], dtype=torch.bfloat16, source: str = "checkpoint", *, copy: bool = True
):
    """An SD3Transformer2DModel from SAI MMDiT weights (with or without `model.diffusion_model.`). copy=False lets the
    model's parameters be the dict's tensors (for a caller that drops the dict: a file just read)."""
    from diffusers import SD3Transformer2DModel

    sd = _strip_transformer_prefix(state_dict_sai)
    config = infer_sd3_transformer_config(sd)
    converted = sd3_transformer_from_sai(upcast_fp8(sd, dtype), source=source)
    if copy:
        converted = own_memory(converted, sd, dtype)
    return build_and_load(lambda: SD3Transformer2DModel(**config), converted, dtype, "SD3 transformer", source)


def vae_from_sai(state_dict: Mapping[str, torch.Tensor], dtype=torch.float32, source: str = "checkpoint"):
    """An AutoencoderKL (SD3 config: 16 channels, scaling 1.5305, shift 0.0609) from LDM-layout VAE weights (with or
    without `first_stage_model.`) or diffusers-layout ones; fp8 tensors are upcast."""
    return vae_from_state_dict(upcast_fp8(state_dict, dtype), dtype, source, reference=SD3_VAE)


def _clip_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIPTextModelWithProjection names (text_model.*, text_projection.weight) from either transformers layout."""
    out = {}
    for k, v in state_dict.items():
        if k.endswith("position_ids") or k in ("logit_scale", "text_model.logit_scale"):
            continue
        out[k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k] = v
    return out


def infer_sd3_clip_config(state_dict: Mapping[str, Any], which: str) -> dict:
    """A CLIPTextConfig dict for "clip_l" or "clip_g" from transformers-layout weights' shapes (see
    model_files.infer_clip_text_config: 64-wide heads, bos/eos the last two vocabulary entries), activation and padding
    by role (L: quick_gelu, pads with eos; G: gelu, pads with id 0), projection width from text_projection (the hidden
    size where it is absent)."""
    if which not in ("clip_l", "clip_g"):
        raise ValueError(f"which must be 'clip_l' or 'clip_g', not {which!r}")
    sd = _clip_keys(state_dict)
    config = infer_clip_text_config(sd, CLIP_L_TEXT_CONFIG if which == "clip_l" else CLIP_G, open_clip=which == "clip_g")
    projection = _shape(sd.get("text_projection.weight"))
    config["projection_dim"] = projection[0] if projection else config["hidden_size"]
    return config


def clip_from_sai(state_dict: Mapping[str, torch.Tensor], which: str, dtype=torch.bfloat16, source: str = "checkpoint"):
    """A CLIPTextModelWithProjection for "clip_l" or "clip_g" from transformers-layout weights (a SAI file's part
    without `text_encoders.<which>.transformer.`, or a separate clip_l/clip_g.safetensors). A file without
    text_projection.weight gets an identity projection (as sd-scripts does for CLIP-L)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    sd = _clip_keys(upcast_fp8(state_dict, dtype))
    config = CLIPTextConfig(**infer_sd3_clip_config(sd, which))
    if "text_projection.weight" not in sd:
        sd["text_projection.weight"] = torch.eye(config.hidden_size)
    label = "CLIP-L" if which == "clip_l" else "CLIP-G"
    return build_and_load(lambda: CLIPTextModelWithProjection(config), sd, dtype, f"{label} text encoder", source)


# ---------------------------------------------------------------------------------------------------------------------
# Loading a single file
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class SD3Checkpoint:
    """The parts of a SAI SD3/SD3.5 single file as diffusers / transformers models; None where the file lacks one (or
    it was not asked for)."""

    transformer: Any  # diffusers.SD3Transformer2DModel
    vae: Any | None  # diffusers.AutoencoderKL (16 channels)
    clip_l: Any | None  # transformers.CLIPTextModelWithProjection
    clip_g: Any | None  # transformers.CLIPTextModelWithProjection
    t5xxl: Any | None  # transformers.T5EncoderModel
    variant: str  # one of SD3_VARIANTS
    source: str


def _read_tensors(path: str, keys: list[str]) -> dict[str, torch.Tensor]:
    """Only `keys` of a .safetensors file (a bundled encoder that another file replaces is never read)."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            return {k: f.get_tensor(k) for k in keys}
    except Exception as e:
        raise unreadable_model(path, e) from e


def _read_sai_file(
    path: str, wanted: Iterable[str], on_parts: Callable[[set[str]], None] | None = None
) -> dict[str, dict[str, torch.Tensor]]:
    """The `wanted` parts of a SAI single file, each without its prefix. Checks the family, scaled-fp8 files and the
    MMDiT's presence, then calls `on_parts` with the names of the parts the file holds (besides "transformer"), before
    any tensor of a .safetensors file is read."""
    path = os.fspath(path)
    wanted = set(wanted)
    if path.lower().endswith(".safetensors"):
        keys = read_key_shapes(path)  # ModelLoadError: missing / truncated / not safetensors
    else:
        keys = read_state_dict(path)  # a pickle is read whole
    family = detect_family(keys)
    if family != "sd3":
        raise _wrong_family(path, family)
    _check_scaled_fp8(keys, path)
    where, other = _split_keys(keys)
    present = {part for part, _ in where.values()}
    if "transformer" not in present:
        raise _wrong_family(path, "unknown")
    _warn_ignored(other, path)
    if on_parts is not None:
        on_parts(present - {"transformer"})
    chosen = [k for k, (part, _) in where.items() if part in wanted]
    tensors = _read_tensors(path, chosen) if path.lower().endswith(".safetensors") else {k: keys[k] for k in chosen}
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key in chosen:
        part, name = where[key]
        parts.setdefault(part, {})[name] = tensors[key]
    return parts


def read_sd3_single_file(path: str) -> dict[str, dict[str, torch.Tensor]]:
    """The parts of a SAI single file (split_sai_state_dict). The family is checked from the names before the tensors
    are read: a truncated file, a file of another family (named with its script) or one without an MMDiT raises
    ModelLoadError naming `path`."""
    return _read_sai_file(path, PART_PREFIXES)


def load_sd3_single_file(
    path: str,
    dtype: torch.dtype = torch.bfloat16,
    vae_dtype: torch.dtype | None = None,
    parts: Iterable[str] | None = None,
    on_parts: Callable[[set[str]], None] | None = None,
) -> SD3Checkpoint:
    """Every part a SAI SD3/SD3.5 single file holds (or only those of `parts` among "vae", "clip_l", "clip_g",
    "t5xxl"; the MMDiT always), built as diffusers / transformers models in `dtype` (the VAE in `vae_dtype`, default
    `dtype`); None for parts not built. `on_parts`: see _read_sai_file. Raises ModelLoadError naming `path` for
    missing, truncated, incomplete or other-family files."""
    path = os.fspath(path)
    wanted = set(PART_PREFIXES) if parts is None else {"transformer", *parts}
    read = _read_sai_file(path, wanted, on_parts)
    mmdit = read.pop("transformer")
    variant = detect_sd3_variant(mmdit)
    transformer = transformer_from_sai(mmdit, dtype, path, copy=False)  # the file's tensors are ours
    del mmdit
    vae = vae_from_sai(read.pop("vae"), vae_dtype or dtype, path) if "vae" in read else None
    clip_l = clip_from_sai(read.pop("clip_l"), "clip_l", dtype, path) if "clip_l" in read else None
    clip_g = clip_from_sai(read.pop("clip_g"), "clip_g", dtype, path) if "clip_g" in read else None
    t5xxl = t5_from_state_dict(read.pop("t5xxl"), dtype, path) if "t5xxl" in read else None
    return SD3Checkpoint(transformer, vae, clip_l, clip_g, t5xxl, variant, path)


# ---------------------------------------------------------------------------------------------------------------------
# Loading a model: built-in, diffusers folder or single file, with separate encoder / VAE files
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class SD3Model:
    """An SD3 / SD3.5 model's parts as diffusers / transformers objects, with its three tokenizers."""

    transformer: Any  # diffusers.SD3Transformer2DModel
    vae: Any  # diffusers.AutoencoderKL (16 channels, SD3's scaling and shift factors)
    clip_l: Any  # transformers.CLIPTextModelWithProjection (CLIP ViT-L/14)
    clip_g: Any  # transformers.CLIPTextModelWithProjection (OpenCLIP ViT-bigG/14)
    t5xxl: Any  # transformers.T5EncoderModel
    clip_l_tokenizer: Any  # transformers.CLIPTokenizer
    clip_g_tokenizer: Any  # transformers.CLIPTokenizer
    t5_tokenizer: Any  # transformers.T5Tokenizer
    variant: str  # one of SD3_VARIANTS, from the transformer's weights
    source: str


_FOLDER_MODELS = {"clip_l": "text_encoder", "clip_g": "text_encoder_2", "t5xxl": "text_encoder_3"}
_TOKENIZERS = ("clip_l_tokenizer", "clip_g_tokenizer", "t5_tokenizer")


def sd3_scheduler_config() -> dict:
    """The FlowMatchEulerDiscreteScheduler config of the SD3 / SD3.5 releases (shift 3)."""
    return {"num_train_timesteps": 1000, "shift": 3.0}


def _lookup_tokenizer(name: str, tokenizer_cache_dir: str | None, vocab_size: int | None):
    if name == "clip_l_tokenizer":
        return load_clip_tokenizer(CLIP_L_HUB_ID, None, tokenizer_cache_dir, vocab_size, model_name="SD3 (CLIP-L)")
    if name == "clip_g_tokenizer":
        return load_clip_tokenizer(
            CLIP_BIGG_HUB_ID,
            None,
            tokenizer_cache_dir,
            vocab_size,
            model_name="SD3 (CLIP-G)",
            pad_token=CLIP_G_PAD_TOKEN,
            tiny_pad_token=CLIP_G_PAD_TOKEN,
        )
    return load_t5_tokenizer(tokenizer_cache_dir, vocab_size, model_name="SD3 (T5-XXL)")


def load_sd3_tokenizers(
    tokenizer_cache_dir: str | None = None,
    clip_l_vocab: int | None = None,
    clip_g_vocab: int | None = None,
    t5_vocab: int | None = None,
) -> tuple:
    """(CLIP-L, CLIP-G, T5) tokenizers for an SD3 model without its own, offline: from `tokenizer_cache_dir`'s
    `openai_clip-vit-large-patch14/`, `laion_CLIP-ViT-bigG-14-laion2B-39B-b160k/` and `google_t5-v1_1-xxl/`, else the
    local Hugging Face cache, else kiln's tiny tokenizers for tiny vocabularies (see model_files.load_clip_tokenizer
    and load_t5_tokenizer); ModelLoadError naming the folder to provide otherwise. CLIP-G pads with "!" (id 0)."""
    vocabs = (clip_l_vocab, clip_g_vocab, t5_vocab)
    return tuple(_lookup_tokenizer(name, tokenizer_cache_dir, v) for name, v in zip(_TOKENIZERS, vocabs))


def _check_parts(source: str, bundled: set[str], files: Mapping[str, str]) -> None:
    """ModelLoadError naming the options for parts neither `source` holds nor `files` give; one INFO line for the
    parts a given file replaces."""
    missing = [p for p in SD3_PARTS if p not in bundled and p not in files]
    if missing:
        what = ", ".join(SD3_PARTS[p][0] for p in missing)
        how = ", ".join(f"{SD3_PARTS[p][1]} ({SD3_PARTS[p][2]})" for p in missing)
        raise ModelLoadError(f"{source} holds no {what}: give {'it' if len(missing) == 1 else 'them'} with {how}")
    replaced = [p for p in SD3_PARTS if p in bundled and p in files]
    if replaced:
        logger.info(
            "%s: using %s instead of the %s it holds",
            source,
            ", ".join(f"{SD3_PARTS[p][1]} {files[p]}" for p in replaced),
            ", ".join(SD3_PARTS[p][0] for p in replaced),
        )


def _load_builtin(name: str, files: Mapping[str, str]) -> dict:
    from library.tiny_models import BUILTIN_FAMILY, TINY_SD3_VARIANT, build_tiny_sd3

    if name not in TINY_SD3_VARIANT:
        raise _wrong_family(name, BUILTIN_FAMILY.get(name, "unknown"))
    _check_parts(name, set(SD3_PARTS), files)
    c = build_tiny_sd3(TINY_SD3_VARIANT[name])
    return {
        "transformer": c["transformer"],
        "vae": c["vae"],
        "clip_l": c["text_encoder"],
        "clip_g": c["text_encoder_2"],
        "t5xxl": c["text_encoder_3"],
        "clip_l_tokenizer": c["tokenizer"],
        "clip_g_tokenizer": c["tokenizer_2"],
        "t5_tokenizer": c["tokenizer_3"],
    }


def _load_folder(path: str, files: Mapping[str, str], dtype, vae_dtype) -> dict:
    """A diffusers SD3 folder's components (StableDiffusion3Pipeline layout), those `files` replace left out."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5Tokenizer

    try:
        family, _ = folder_family(path)
    except ModelLoadError:
        family = "unknown"
    if family != "sd3":
        raise _wrong_family(path, family)
    has = lambda sub: os.path.isfile(os.path.join(path, sub, "config.json"))  # noqa: E731
    if not has("transformer"):
        raise ModelLoadError(f"{path} is not a complete diffusers SD3 folder: transformer/config.json is missing")
    bundled = {p for p in SD3_PARTS if has(_FOLDER_MODELS.get(p, p))}
    _check_parts(path, bundled, files)
    parts = {"transformer": SD3Transformer2DModel.from_pretrained(path, subfolder="transformer", dtype=dtype)}
    if "vae" not in files:
        parts["vae"] = AutoencoderKL.from_pretrained(path, subfolder="vae", dtype=vae_dtype)
    for part in ("clip_l", "clip_g"):
        if part not in files:
            parts[part] = CLIPTextModelWithProjection.from_pretrained(path, subfolder=_FOLDER_MODELS[part], dtype=dtype)
    if "t5xxl" not in files:
        parts["t5xxl"] = T5EncoderModel.from_pretrained(path, subfolder="text_encoder_3", dtype=dtype)
    for name, sub in (("clip_l_tokenizer", "tokenizer"), ("clip_g_tokenizer", "tokenizer_2")):
        if is_tokenizer_folder(os.path.join(path, sub)):
            parts[name] = CLIPTokenizer.from_pretrained(path, subfolder=sub)
    if is_t5_tokenizer_folder(os.path.join(path, "tokenizer_3")):
        parts["t5_tokenizer"] = T5Tokenizer.from_pretrained(path, subfolder="tokenizer_3")
    return parts


def _load_file(path: str, files: Mapping[str, str], dtype, vae_dtype) -> dict:
    """A SAI single file's MMDiT and the bundled parts that `files` do not replace (those are never read)."""
    checkpoint = load_sd3_single_file(
        path, dtype, vae_dtype, parts=set(SD3_PARTS) - set(files), on_parts=lambda bundled: _check_parts(path, bundled, files)
    )
    return {p: getattr(checkpoint, p) for p in ("transformer", *SD3_PARTS) if getattr(checkpoint, p) is not None}


def _encoder_file(path: str, part: str) -> dict[str, torch.Tensor]:
    """The tensors of a --clip_l / --clip_g / --t5xxl file: transformers-layout names, or a SAI single file's part."""
    state_dict = read_state_dict(path)
    prefix = PART_PREFIXES[part]
    if any(k.startswith(prefix) for k in state_dict):
        return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    return state_dict


def _load_part_file(part: str, path: str, dtype, vae_dtype):
    """The model a --vae / --clip_l / --clip_g / --t5xxl file gives; ModelLoadError naming the option and the file."""
    option = SD3_PARTS[part][1]
    try:
        if part == "vae":
            if os.path.isdir(path):
                return load_vae(path, vae_dtype, reference=SD3_VAE)
            return vae_from_sai(read_state_dict(path), vae_dtype, path)
        if part == "t5xxl":
            return t5_from_state_dict(_encoder_file(path, part), dtype, path)
        return clip_from_sai(_encoder_file(path, part), part, dtype, path)
    except ModelLoadError as e:
        message = str(e)
        if message.startswith(path):
            raise ModelLoadError(f"{option} {message}") from e
        raise ModelLoadError(f"{option}: {message}" if path in message else f"{option} {path}: {message}") from e


def load_sd3_model(
    name_or_path: str,
    clip_l: str | None = None,
    clip_g: str | None = None,
    t5xxl: str | None = None,
    vae: str | None = None,
    tokenizer_cache_dir: str | None = None,
    dtype: torch.dtype = torch.bfloat16,
    vae_dtype: torch.dtype | None = None,
) -> SD3Model:
    """Load an SD3 / SD3.5 model (`--pretrained_model_name_or_path`): a built-in (kiln-tiny-sd3,
    kiln-tiny-sd3.5-medium, kiln-tiny-sd3.5-large), a diffusers SD3 folder, or a SAI single file with or without
    bundled VAE / text encoders. `clip_l`, `clip_g`, `t5xxl` (transformers-layout .safetensors, fp16/bf16/fp8; fp8 is
    upcast to `dtype`) and `vae` (a single file or a diffusers VAE folder) give parts the model lacks or replace the
    ones it holds (logged; a replaced bundled part is not read). Models in `dtype`, the VAE in `vae_dtype` (default
    `dtype`). Tokenizers from the folder, else from `tokenizer_cache_dir` or the local Hugging Face cache (see
    load_sd3_tokenizers). Raises ModelLoadError for missing files or parts (naming the option to pass), incomplete
    weights and other families (naming their script)."""
    from library.tiny_models import BUILTIN_MODELS

    name_or_path = os.fspath(name_or_path)
    given = {"vae": vae, "clip_l": clip_l, "clip_g": clip_g, "t5xxl": t5xxl}
    files = {part: os.fspath(p) for part, p in given.items() if p is not None}
    for part, path in files.items():
        if not os.path.exists(path):
            raise ModelLoadError(f"{SD3_PARTS[part][1]} not found: {path}")
    vae_dtype = vae_dtype or dtype

    if name_or_path in BUILTIN_MODELS:
        parts = _load_builtin(name_or_path, files)
    elif os.path.isdir(name_or_path):
        parts = _load_folder(name_or_path, files, dtype, vae_dtype)
    elif os.path.isfile(name_or_path):
        parts = _load_file(name_or_path, files, dtype, vae_dtype)
    else:
        raise ModelLoadError(
            f"model not found: {name_or_path} (expected a built-in name {', '.join(BUILTIN_MODELS)}, a diffusers SD3 "
            "folder or a SAI .safetensors file; kiln does not download models from a hub)"
        )
    for part, path in files.items():
        parts[part] = _load_part_file(part, path, dtype, vae_dtype)

    encoders = {"clip_l_tokenizer": "clip_l", "clip_g_tokenizer": "clip_g", "t5_tokenizer": "t5xxl"}
    for name, encoder in encoders.items():
        if parts.get(name) is None:
            parts[name] = _lookup_tokenizer(name, tokenizer_cache_dir, parts[encoder].config.vocab_size)
        check_tokenizer(parts[name], parts[encoder], name_or_path)

    models = {p: cast_model(parts[p], vae_dtype if p == "vae" else dtype).eval() for p in ("transformer", *SD3_PARTS)}
    return SD3Model(
        **models,
        **{name: parts[name] for name in _TOKENIZERS},
        variant=sd3_variant_from_config(models["transformer"].config),
        source=name_or_path,
    )


# ---------------------------------------------------------------------------------------------------------------------
# Writing a single file
# ---------------------------------------------------------------------------------------------------------------------


def _clip_sources(text_encoder) -> dict[str, tuple[tuple[int, ...], torch.dtype, Callable]]:
    return tensor_sources(_clip_keys(text_encoder.state_dict()))


def _t5_sources(text_encoder) -> dict[str, tuple[tuple[int, ...], torch.dtype, Callable]]:
    """T5 encoder tensors. The tied embedding is written twice, as `shared.weight` and `encoder.embed_tokens.weight`:
    SAI's bundled files carry both, and diffusers' single-file loader leaves the model's embed_tokens unset without
    the second."""
    state = text_encoder.state_dict()
    if "shared.weight" in state:
        state.setdefault("encoder.embed_tokens.weight", state["shared.weight"])
    return tensor_sources(state)


def sd3_single_file_sources(
    transformer=None, vae=None, clip_l=None, clip_g=None, t5xxl=None
) -> dict[str, tuple[tuple[int, ...], torch.dtype, Callable[[], torch.Tensor]]]:
    """Every tensor of a SAI single file holding the given parts: full key -> (shape, dtype, function making the
    tensor). `transformer` may be an SD3Transformer2DModel or its state dict; the others are models."""
    out = {}
    if transformer is not None:
        state = transformer if isinstance(transformer, Mapping) else transformer.state_dict()
        out.update({UNET_PREFIX + k: v for k, v in _transformer_sources(state).items()})
    if vae is not None:
        out.update(tensor_sources(vae_to_ldm_state_dict(vae)))
    for prefix, model in ((CLIP_L_PREFIX, clip_l), (CLIP_G_PREFIX, clip_g)):
        if model is not None:
            out.update({prefix + k: v for k, v in _clip_sources(model).items()})
    if t5xxl is not None:
        out.update({T5XXL_PREFIX + k: v for k, v in _t5_sources(t5xxl).items()})
    return out


def sd3_to_sai_state_dict(transformer=None, vae=None, clip_l=None, clip_g=None, t5xxl=None) -> dict[str, torch.Tensor]:
    """The SAI single-file state dict of the given parts (see sd3_single_file_sources), all tensors made at once."""
    return {k: make() for k, (_, _, make) in sd3_single_file_sources(transformer, vae, clip_l, clip_g, t5xxl).items()}


def save_sd3_single_file(
    path: str,
    transformer,
    vae=None,
    clip_l=None,
    clip_g=None,
    t5xxl=None,
    dtype: torch.dtype | None = None,
    metadata: dict[str, str] | None = None,
    overwrite: bool = True,
) -> None:
    """Write a SAI single file (model.diffusion_model.*, and first_stage_model.* / text_encoders.* for the parts
    given) atomically. `.safetensors` is streamed one tensor at a time (a fused qkv is made only when written);
    another suffix gives a weights-only-loadable {"state_dict": ...} pickle. `dtype` casts floating tensors;
    `metadata` values must be strings."""
    write_tensor_sources(path, sd3_single_file_sources(transformer, vae, clip_l, clip_g, t5xxl), dtype, metadata, overwrite)


# ---------------------------------------------------------------------------------------------------------------------
# Tiny models for tests
# ---------------------------------------------------------------------------------------------------------------------

TINY_SD3_CLIP_L_WIDTH = 64
TINY_SD3_CLIP_G_WIDTH = 128  # differs from CLIP-L's: diffusers tells the two towers of a single file apart by width
TINY_SD3_T5_WIDTH = 256  # >= CLIP-L + CLIP-G widths: the concatenated CLIP outputs are zero-padded to the T5 width


def tiny_sd3_transformer_config(variant: str = "sd3-medium") -> dict:
    """A small SD3Transformer2DModel config with the layout of `variant` (one of SD3_VARIANTS): SD3 Medium's (64-wide
    heads, no qk-norm), SD3.5 Medium's (qk-norm, MMDiT-X attention in the first layers, twice the pos_embed table) or
    SD3.5 Large's (qk-norm). Pooled width = tiny CLIP-L + CLIP-G widths, joint width = the tiny T5's; kiln's config
    inference rebuilds exactly this config from the SAI weights."""
    base = {
        "sample_size": SD3_SAMPLE_SIZE,
        "patch_size": 2,
        "in_channels": 16,
        "num_layers": 2,
        "attention_head_dim": SAI_HEAD_DIM,
        "num_attention_heads": 2,
        "joint_attention_dim": TINY_SD3_T5_WIDTH,
        "caption_projection_dim": 2 * SAI_HEAD_DIM,
        "pooled_projection_dim": TINY_SD3_CLIP_L_WIDTH + TINY_SD3_CLIP_G_WIDTH,
        "out_channels": 16,
        "pos_embed_max_size": 16,
        "dual_attention_layers": (),
        "qk_norm": None,
    }
    if variant == "sd3-medium":
        return base
    qk = {"attention_head_dim": 32, "num_attention_heads": 4, "qk_norm": "rms_norm"}  # head size read from ln_q
    if variant == "sd3.5-medium":
        return {**base, **qk, "num_layers": 3, "dual_attention_layers": (0, 1), "pos_embed_max_size": 32}
    if variant == "sd3.5-large":
        return {**base, **qk, "num_layers": 3}
    raise ValueError(f"unknown SD3 variant {variant!r}: expected one of {', '.join(SD3_VARIANTS)}")


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints of a trained model (ModelFamily.save_checkpoint; see library/model_checkpoint.py)
# ---------------------------------------------------------------------------------------------------------------------

SD3_SIDE_FILES = {"clip_l": "_clip_l", "clip_g": "_clip_g", "t5xxl": "_t5xxl"}  # sd-scripts' text-encoder file suffixes
_COMPONENTS = {"transformer": "transformer", "vae": "vae", **_FOLDER_MODELS}  # part -> diffusers pipeline component


def sd3_checkpoint_spec(
    source: str,
    files: Mapping[str, str | None],
    text_encoders: list,
    tokenizers: list,
    vae_model,
    transformer,
):
    """What an SD3 / SD3.5 checkpoint holds (model_checkpoint.CheckpointSpec), as sd-scripts' sd3_train.py writes it:
    the single file is SAI's layout with the MMDiT and the VAE (`model.diffusion_model.`, `first_stage_model.`); each
    trained text encoder goes to a side file `<name>_clip_l.safetensors`, `_clip_g`, `_t5xxl` (transformers names, T5's
    embedding under both of its names). A diffusers folder is a StableDiffusion3Pipeline with every component. Parts
    not trained come from the user's files: the SAI file `source` (parts it bundles copied by key), a diffusers folder
    or a built-in, and the `files` given for parts ("vae", "clip_l", "clip_g", "t5xxl" -> --vae / --clip_l / ...
    path or None), which replace them as in load_sd3_model. `text_encoders`: CLIP-L, CLIP-G, T5, as the family holds
    them."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    from library.model_checkpoint import CheckpointPart, CheckpointSpec, PartSource, model_parts, vae_part
    from library.tiny_models import TINY_SD3_VARIANT, build_tiny_sd3

    def single_file(file) -> dict[str, PartSource]:
        where, _ = _split_keys(file.keys())
        present = {part for part, _ in where.values()}
        out = {}
        for part in present:
            prefix, exclude = PART_PREFIXES[part], ()
            if part == "transformer" and not file.keys(UNET_PREFIX):  # an MMDiT without the prefix
                prefix, exclude = "", ("text_encoders.", VAE_PREFIX)
            builders = {
                "transformer": lambda p=prefix, e=exclude: transformer_from_sai(file.tensors(p, e), None, file.path, copy=False),
                "vae": lambda: vae_from_sai(file.tensors(VAE_PREFIX), None, file.path),
                "clip_l": lambda: clip_from_sai(file.tensors(CLIP_L_PREFIX), "clip_l", None, file.path),
                "clip_g": lambda: clip_from_sai(file.tensors(CLIP_G_PREFIX), "clip_g", None, file.path),
                "t5xxl": lambda: t5_from_state_dict(file.tensors(T5XXL_PREFIX), None, file.path),
            }
            out[_COMPONENTS[part]] = PartSource(build=builders[part], file=file, prefix=prefix, exclude=exclude)
        return out

    classes = {
        "transformer": SD3Transformer2DModel,
        "vae": AutoencoderKL,
        "text_encoder": CLIPTextModelWithProjection,
        "text_encoder_2": CLIPTextModelWithProjection,
        "text_encoder_3": T5EncoderModel,
    }
    sources = model_parts(source, classes, lambda: build_tiny_sd3(TINY_SD3_VARIANT[source]), single_file)
    for part, path in files.items():
        if path is None:
            continue
        if part == "vae":
            sources["vae"] = vae_part(path, SD3_VAE)
        else:
            sources[_COMPONENTS[part]] = PartSource(build=lambda part=part, path=path: _load_part_file(part, path, None, None))
    missing = [c for c in classes if c not in sources]
    if missing:
        raise ModelLoadError(f"{source} lacks the {', '.join(missing)} of the model, and no file gives them")

    def in_main_file(which: str):
        return lambda m: sd3_single_file_sources(**{which: m})

    clip_l, clip_g, t5xxl = text_encoders
    parts = [
        CheckpointPart("denoiser", "transformer", transformer, sources["transformer"], in_main_file("transformer"), UNET_PREFIX),
        CheckpointPart(
            "text_encoder_0", "text_encoder", clip_l, sources["text_encoder"], _clip_sources, side_file=SD3_SIDE_FILES["clip_l"]
        ),
        CheckpointPart(
            "text_encoder_1", "text_encoder_2", clip_g, sources["text_encoder_2"], _clip_sources, side_file=SD3_SIDE_FILES["clip_g"]
        ),
        CheckpointPart(
            "text_encoder_2", "text_encoder_3", t5xxl, sources["text_encoder_3"], _t5_sources, side_file=SD3_SIDE_FILES["t5xxl"]
        ),
        CheckpointPart("vae", "vae", vae_model, sources["vae"], in_main_file("vae"), VAE_PREFIX),
    ]
    components = {
        "tokenizer": tokenizers[0],
        "tokenizer_2": tokenizers[1],
        "tokenizer_3": tokenizers[2],
        "scheduler": FlowMatchEulerDiscreteScheduler(**sd3_scheduler_config()),
    }
    return CheckpointSpec("StableDiffusion3Pipeline", parts, components)
