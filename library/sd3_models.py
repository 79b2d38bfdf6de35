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
import re
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
)

logger = logging.getLogger(__name__)

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
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 16,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 1.5305,
    "shift_factor": 0.0609,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "force_upcast": True,
}
CLIP_L = {  # openai/clip-vit-large-patch14 text tower
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-05,
    "projection_dim": 768,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 49407,
}
CLIP_G = {  # laion/CLIP-ViT-bigG-14-laion2B-39B-b160k text tower (its tokenizer pads with id 0)
    **CLIP_L,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "hidden_act": "gelu",
    "projection_dim": 1280,
    "pad_token_id": 0,
}
T5_XXL = {  # google/t5-v1_1-xxl encoder: what shapes cannot tell
    "feed_forward_proj": "gated-gelu",
    "relative_attention_max_distance": 128,
    "layer_norm_epsilon": 1e-6,
    "dropout_rate": 0.0,
    "is_encoder_decoder": False,
    "use_cache": False,
    "tie_word_embeddings": False,
}


def _wrong_family(path: str, family: str) -> ModelLoadError:
    if family in FAMILY_SCRIPTS and family != "sd3":
        return ModelLoadError(f"{path} is a {FAMILY_NAMES[family]} model, not SD3/SD3.5: use {FAMILY_SCRIPTS[family]} for it")
    return ModelLoadError(
        f"{path} is not an SD3/SD3.5 model kiln can load: expected Stability AI's single-file layout "
        f"({UNET_PREFIX}joint_blocks.*, optionally {VAE_PREFIX}* and text_encoders.*), or an MMDiT file without the "
        "prefix (joint_blocks.*, x_embedder.*)"
    )


def _indices(keys: Iterable[str], prefix: str) -> list[int]:
    """Sorted distinct integers N of keys `prefix` + "N." + ..."""
    found = set()
    for k in keys:
        if k.startswith(prefix):
            head = k[len(prefix) :].split(".", 1)[0]
            if head.isdigit():
                found.add(int(head))
    return sorted(found)


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
    layers = _indices(keys, "joint_blocks.")
    if not layers:
        raise ModelLoadError("no SD3 MMDiT blocks (joint_blocks.*) found")
    if layers != list(range(len(layers))):
        missing = sorted(set(range(layers[-1] + 1)) - set(layers))
        raise ModelLoadError(f"incomplete SD3 MMDiT: joint_blocks.{missing[0]}.* missing")
    dual = tuple(i for i in layers if f"joint_blocks.{i}.x_block.attn2.qkv.weight" in keys)
    return _Structure(len(layers), dual, "joint_blocks.0.x_block.attn.ln_q.weight" in keys)


def _diffusers_structure(keys: Iterable[str]) -> _Structure:
    keys = list(keys)
    layers = _indices(keys, "transformer_blocks.")
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


def split_sai_state_dict(state_dict: Mapping[str, torch.Tensor], source: str = "checkpoint") -> dict[str, dict[str, torch.Tensor]]:
    """The parts of a SAI single file, each without its prefix: {"transformer", "vae", "clip_l", "clip_g", "t5xxl"}
    (only those present). An MMDiT file without the prefix is all "transformer". Other `text_encoders.<name>.*` tensors
    (a CLIP's logit_scale) are dropped; any other key is logged and ignored."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    other: list[str] = []
    bare = not any(k.startswith(UNET_PREFIX) for k in state_dict) and any(k.startswith("joint_blocks.") for k in state_dict)
    for key, value in state_dict.items():
        for part, prefix in PART_PREFIXES.items():
            if key.startswith(prefix):
                parts.setdefault(part, {})[key[len(prefix) :]] = value
                break
        else:
            if bare and not key.startswith(("text_encoders.", VAE_PREFIX)):
                parts.setdefault("transformer", {})[key] = value
            elif not key.startswith("text_encoders."):
                other.append(key)
    if other:
        shown = ", ".join(other[:5]) + (f" and {len(other) - 5} more" if len(other) > 5 else "")
        logger.warning("%s: ignored %d tensors outside the SD3 parts: %s", source, len(other), shown)
    return parts


# ---------------------------------------------------------------------------------------------------------------------
# Building models
# ---------------------------------------------------------------------------------------------------------------------


def _build_and_load(factory: Callable[[], Any], state_dict: Mapping[str, torch.Tensor], dtype, what: str, source: str):
    """Instantiate without allocating weights, then load `state_dict` strictly (every key must match).
    (A local copy of sd_models' helper, to be replaced by the family-neutral one of library/model_files.py.)"""
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = factory()
    state_dict = {k: v.to(dtype).contiguous() if v.is_floating_point() else v.contiguous() for k, v in state_dict.items()}
    try:
        model.load_state_dict(state_dict, strict=True, assign=True)
    except RuntimeError as e:
        raise ModelLoadError(f"{source}: the {what} weights do not fit the inferred architecture: {e}") from e
    return model.eval()


def _upcast_fp8(state_dict: Mapping[str, torch.Tensor], dtype) -> dict[str, torch.Tensor]:
    """fp8 tensors -> `dtype` (bf16 if `dtype` is fp8 itself): the conversions concatenate, which fp8 cannot."""
    fp8 = {getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n)}
    target = torch.bfloat16 if dtype in fp8 else dtype
    return {k: (v.to(target) if v.dtype in fp8 else v) for k, v in state_dict.items()}


def _own_memory(converted: dict[str, torch.Tensor], inputs: Mapping[str, torch.Tensor], dtype) -> dict[str, torch.Tensor]:
    """`converted` cast to `dtype`, with every tensor still sharing memory with one of `inputs` copied."""
    storages = {v.untyped_storage().data_ptr() for v in inputs.values() if isinstance(v, torch.Tensor)}
    out = {}
    for k, v in converted.items():
        if v.is_floating_point():
            v = v.to(dtype)
        if v.untyped_storage().data_ptr() in storages:
            v = v.clone(memory_format=torch.contiguous_format)
        out[k] = v
    return out


def transformer_from_sai(
    state_dict_sai: Mapping[str, torch.Tensor], dtype=torch.bfloat16, source: str = "checkpoint", *, copy: bool = True
):
    """An SD3Transformer2DModel from SAI MMDiT weights (with or without `model.diffusion_model.`). copy=False lets the
    model's parameters be the dict's tensors (for a caller that drops the dict: a file just read)."""
    from diffusers import SD3Transformer2DModel

    sd = _strip_transformer_prefix(state_dict_sai)
    config = infer_sd3_transformer_config(sd)
    converted = sd3_transformer_from_sai(_upcast_fp8(sd, dtype), source=source)
    if copy:
        converted = _own_memory(converted, sd, dtype)
    return _build_and_load(lambda: SD3Transformer2DModel(**config), converted, dtype, "SD3 transformer", source)


def _vae_to_diffusers(state_dict: Mapping[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    if any(k.startswith("encoder.down_blocks.") for k in state_dict):  # already diffusers names
        return dict(state_dict)
    levels = _indices(state_dict, "encoder.down.")
    if not levels or "decoder.conv_in.weight" not in state_dict:
        raise ModelLoadError(f"{source}: no VAE weights ({VAE_PREFIX}encoder.down.*, decoder.*) found")
    n = len(levels)
    return convert_ldm_vae_checkpoint(
        dict(state_dict), {"down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n}
    )


def infer_sd3_vae_config(diffusers_sd: Mapping[str, Any]) -> dict:
    """An AutoencoderKL config from a diffusers-layout VAE's shapes, with SD3's scaling and shift factors."""
    sd = {k: _shape(v) for k, v in diffusers_sd.items()}
    levels = _indices(sd, "encoder.down_blocks.")
    try:
        config = dict(SD3_VAE)
        config.update(
            {
                "in_channels": sd["encoder.conv_in.weight"][1],
                "out_channels": sd["decoder.conv_out.weight"][0],
                "down_block_types": ["DownEncoderBlock2D"] * len(levels),
                "up_block_types": ["UpDecoderBlock2D"] * len(levels),
                "block_out_channels": [sd[f"encoder.down_blocks.{i}.resnets.0.conv2.weight"][0] for i in levels],
                "layers_per_block": len(_indices(sd, "encoder.down_blocks.0.resnets.")),
                "latent_channels": sd["decoder.conv_in.weight"][1],
                "norm_num_groups": min(SD3_VAE["norm_num_groups"], sd["encoder.conv_norm_out.weight"][0]),
                "use_quant_conv": "quant_conv.weight" in sd,
                "use_post_quant_conv": "post_quant_conv.weight" in sd,
                "mid_block_add_attention": "encoder.mid_block.attentions.0.to_q.weight" in sd,
            }
        )
    except KeyError as e:
        raise ModelLoadError(f"incomplete VAE: {e.args[0]} missing") from e
    return config


def vae_from_sai(state_dict: Mapping[str, torch.Tensor], dtype=torch.float32, source: str = "checkpoint"):
    """An AutoencoderKL (SD3 config: 16 channels, scaling 1.5305, shift 0.0609) from LDM-layout VAE weights without
    `first_stage_model.` (or diffusers-layout ones)."""
    from diffusers import AutoencoderKL

    converted = _vae_to_diffusers(_upcast_fp8(state_dict, dtype), source)
    config = infer_sd3_vae_config(converted)
    return _build_and_load(lambda: AutoencoderKL(**config), converted, dtype, "VAE", source)


def _clip_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIPTextModelWithProjection names (text_model.*, text_projection.weight) from either transformers layout."""
    out = {}
    for k, v in state_dict.items():
        if k.endswith("position_ids") or k in ("logit_scale", "text_model.logit_scale"):
            continue
        out[k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k] = v
    return out


def infer_sd3_clip_config(state_dict: Mapping[str, Any], which: str) -> dict:
    """A CLIPTextConfig dict for "clip_l" or "clip_g" from transformers-layout weights' shapes: 64-wide heads as both
    real towers, activation by role (L quick_gelu, G gelu), bos/eos the last two vocabulary entries, projection width
    from text_projection (the hidden size where it is absent)."""
    if which not in ("clip_l", "clip_g"):
        raise ValueError(f"which must be 'clip_l' or 'clip_g', not {which!r}")
    sd = {k: _shape(v) for k, v in _clip_keys(state_dict).items()}
    try:
        vocab, hidden = sd["text_model.embeddings.token_embedding.weight"]
        positions = sd["text_model.embeddings.position_embedding.weight"][0]
        intermediate = sd["text_model.encoder.layers.0.mlp.fc1.weight"][0]
    except KeyError as e:
        raise ModelLoadError(f"not a CLIP text encoder in transformers' layout: {e.args[0]} missing") from e
    heads = max(1, hidden // 64)
    config = dict(CLIP_L if which == "clip_l" else CLIP_G)
    config.update(
        {
            "vocab_size": vocab,
            "hidden_size": hidden,
            "intermediate_size": intermediate,
            "num_hidden_layers": len(_indices(sd, "text_model.encoder.layers.")),
            "num_attention_heads": heads if hidden % heads == 0 else 1,
            "max_position_embeddings": positions,
            "projection_dim": sd["text_projection.weight"][0] if "text_projection.weight" in sd else hidden,
            "bos_token_id": vocab - 2,
            "eos_token_id": vocab - 1,
            "pad_token_id": vocab - 1 if which == "clip_l" else 0,
        }
    )
    return config


def clip_from_sai(state_dict: Mapping[str, torch.Tensor], which: str, dtype=torch.bfloat16, source: str = "checkpoint"):
    """A CLIPTextModelWithProjection for "clip_l" or "clip_g" from transformers-layout weights (a SAI file's part
    without `text_encoders.<which>.transformer.`, or a separate clip_l/clip_g.safetensors). A file without
    text_projection.weight gets an identity projection (as sd-scripts does for CLIP-L)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    sd = _clip_keys(_upcast_fp8(state_dict, dtype))
    config = CLIPTextConfig(**infer_sd3_clip_config(sd, which))
    if "text_projection.weight" not in sd:
        sd["text_projection.weight"] = torch.eye(config.hidden_size)
    label = "CLIP-L" if which == "clip_l" else "CLIP-G"
    return _build_and_load(lambda: CLIPTextModelWithProjection(config), sd, dtype, f"{label} text encoder", source)


def infer_sd3_t5_config(state_dict: Mapping[str, Any]) -> dict:
    """A T5Config dict (encoder only) from transformers-layout T5 v1.1 weights' shapes."""
    sd = {k: _shape(v) for k, v in state_dict.items()}
    try:
        vocab, d_model = sd["shared.weight"] if "shared.weight" in sd else sd["encoder.embed_tokens.weight"]
        inner = sd["encoder.block.0.layer.0.SelfAttention.q.weight"][0]
        buckets, heads = sd["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
        d_ff = sd["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"][0]
    except KeyError as e:
        raise ModelLoadError(f"not a T5 v1.1 encoder in transformers' layout: {e.args[0]} missing") from e
    return {
        **T5_XXL,
        "vocab_size": vocab,
        "d_model": d_model,
        "d_kv": inner // heads,
        "d_ff": d_ff,
        "num_layers": len(_indices(sd, "encoder.block.")),
        "num_heads": heads,
        "relative_attention_num_buckets": buckets,
    }


def t5_from_sai(state_dict: Mapping[str, torch.Tensor], dtype=torch.bfloat16, source: str = "checkpoint"):
    """A T5EncoderModel from transformers-layout T5 v1.1 encoder weights (`shared.weight` and/or
    `encoder.embed_tokens.weight`, `encoder.block.N.*`; decoder tensors are ignored)."""
    from accelerate import init_empty_weights
    from transformers import T5Config, T5EncoderModel

    sd = {k: v for k, v in _upcast_fp8(state_dict, dtype).items() if k.startswith(("shared.", "encoder."))}
    if "shared.weight" not in sd and "encoder.embed_tokens.weight" in sd:
        sd["shared.weight"] = sd["encoder.embed_tokens.weight"]
    config = T5Config(**infer_sd3_t5_config(sd))
    with init_empty_weights():
        names = set(T5EncoderModel(config).state_dict())
    if "encoder.embed_tokens.weight" in names and "encoder.embed_tokens.weight" not in sd:
        sd["encoder.embed_tokens.weight"] = sd["shared.weight"]
    sd = {k: v for k, v in sd.items() if k in names}
    return _build_and_load(lambda: T5EncoderModel(config), sd, dtype, "T5 text encoder", source)


# ---------------------------------------------------------------------------------------------------------------------
# Loading a single file
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class SD3Checkpoint:
    """The parts of a SAI SD3/SD3.5 single file as diffusers / transformers models; None where the file lacks one."""

    transformer: Any  # diffusers.SD3Transformer2DModel
    vae: Any | None  # diffusers.AutoencoderKL (16 channels)
    clip_l: Any | None  # transformers.CLIPTextModelWithProjection
    clip_g: Any | None  # transformers.CLIPTextModelWithProjection
    t5xxl: Any | None  # transformers.T5EncoderModel
    variant: str  # one of SD3_VARIANTS
    source: str


def read_sd3_single_file(path: str) -> dict[str, dict[str, torch.Tensor]]:
    """The parts of a SAI single file (split_sai_state_dict). The family is checked from the names before the tensors
    are read: a truncated file, a file of another family (named with its script) or one without an MMDiT raises
    ModelLoadError naming `path`."""
    path = os.fspath(path)
    if path.lower().endswith(".safetensors"):
        family = detect_family(read_key_shapes(path))  # ModelLoadError: missing / truncated / not safetensors
        if family != "sd3":
            raise _wrong_family(path, family)
    checkpoint = read_state_dict(path)
    family = detect_family(checkpoint)
    if family != "sd3":
        raise _wrong_family(path, family)
    _check_scaled_fp8(checkpoint, path)
    parts = split_sai_state_dict(checkpoint, source=path)
    if "transformer" not in parts:
        raise _wrong_family(path, "unknown")
    return parts


def load_sd3_single_file(path: str, dtype: torch.dtype = torch.bfloat16, vae_dtype: torch.dtype | None = None) -> SD3Checkpoint:
    """Every part a SAI SD3/SD3.5 single file holds, built as diffusers / transformers models in `dtype` (the VAE in
    `vae_dtype`, default `dtype`). Raises ModelLoadError naming `path` for missing, truncated, incomplete or
    other-family files."""
    path = os.fspath(path)
    parts = read_sd3_single_file(path)
    mmdit = parts.pop("transformer")
    variant = detect_sd3_variant(mmdit)
    transformer = transformer_from_sai(mmdit, dtype, path, copy=False)  # the file's tensors are ours
    del mmdit
    vae = vae_from_sai(parts.pop("vae"), vae_dtype or dtype, path) if "vae" in parts else None
    clip_l = clip_from_sai(parts.pop("clip_l"), "clip_l", dtype, path) if "clip_l" in parts else None
    clip_g = clip_from_sai(parts.pop("clip_g"), "clip_g", dtype, path) if "clip_g" in parts else None
    t5xxl = t5_from_sai(parts.pop("t5xxl"), dtype, path) if "t5xxl" in parts else None
    return SD3Checkpoint(transformer, vae, clip_l, clip_g, t5xxl, variant, path)


# ---------------------------------------------------------------------------------------------------------------------
# Writing a single file
# ---------------------------------------------------------------------------------------------------------------------


_LDM_VAE_ATTN_WEIGHT = re.compile(r"\.mid\.attn_1\.(q|k|v|proj_out)\.weight$")


def _vae_sources(vae) -> dict[str, tuple[tuple[int, ...], torch.dtype, Callable]]:
    from library.ldm_names import vae_ldm_param_names

    state = vae.state_dict()
    out = {}
    for key, ldm in vae_ldm_param_names(vae).items():
        value = state[key]
        if _LDM_VAE_ATTN_WEIGHT.search(ldm) and value.ndim == 2:
            value = value.reshape(*value.shape, 1, 1)  # LDM's attention uses 1x1 convolutions
        out[ldm] = (tuple(value.shape), value.dtype, lambda t=value: t)
    return out


def _clip_sources(text_encoder) -> dict[str, tuple[tuple[int, ...], torch.dtype, Callable]]:
    state = _clip_keys(text_encoder.state_dict())
    return {k: (tuple(v.shape), v.dtype, lambda t=v: t) for k, v in state.items()}


def _t5_sources(text_encoder) -> dict[str, tuple[tuple[int, ...], torch.dtype, Callable]]:
    """T5 encoder tensors. The tied embedding is written twice, as `shared.weight` and `encoder.embed_tokens.weight`:
    SAI's bundled files carry both, and diffusers' single-file loader leaves the model's embed_tokens unset without
    the second."""
    state = text_encoder.state_dict()
    if "shared.weight" in state:
        state.setdefault("encoder.embed_tokens.weight", state["shared.weight"])
    return {k: (tuple(v.shape), v.dtype, lambda t=v: t) for k, v in state.items()}


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
        out.update({VAE_PREFIX + k: v for k, v in _vae_sources(vae).items()})
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
    from library.saving import save_tensors

    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise TypeError("safetensors metadata keys and values must all be strings")
    sources = sd3_single_file_sources(transformer, vae, clip_l, clip_g, t5xxl)

    def out_dtype(d: torch.dtype) -> torch.dtype:
        return dtype if dtype is not None and d.is_floating_point else d

    layout = [(name, shape, out_dtype(d)) for name, (shape, d, _) in sources.items()]

    def produce(name: str) -> torch.Tensor:
        _, d, make = sources[name]
        return make().detach().to("cpu", out_dtype(d)).contiguous()

    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_tensors(path, layout, produce, metadata, overwrite)


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
