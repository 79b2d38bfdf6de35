"""Model-file pieces that every family shares: building a diffusers / transformers model from a state dict (fp8 tensors
upcast, the model owning its memory), the autoencoder (VAE), CLIP and T5 text encoders (config inference, building),
offline tokenizer lookup, diffusers folders (which family one holds, writing one) and atomic single-file writing.

Family code (sd_models.py, sdxl_models.py, flux_models.py, ...) builds on these; nothing here knows a family's own
layouts. Reading files and telling families apart by their keys is library/checkpoint_files.py.
"""

from __future__ import annotations

import copy
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from library.checkpoint_files import VAE_PREFIX, ModelLoadError, _is_pickle_path, _shape, read_state_dict
from library.ldm_names import _strip_text_model

# ---------------------------------------------------------------------------------------------------------------------
# State dicts and models
# ---------------------------------------------------------------------------------------------------------------------


def key_indices(keys: Iterable[str], prefix: str) -> list[int]:
    """Sorted distinct N of keys `prefix` + `N.`..."""
    found = set()
    for k in keys:
        if k.startswith(prefix):
            head = k[len(prefix) :].split(".", 1)[0]
            if head.isdigit():
                found.add(int(head))
    return sorted(found)


def build_and_load(cls_or_factory: Callable[[], torch.nn.Module], state_dict: dict, dtype, what: str, source: str):
    """Instantiate without allocating weights, then load `state_dict` strictly (every key must match). Floating
    tensors are cast to `dtype`; dtype=None keeps each tensor's own dtype (and the tensor itself when contiguous)."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = cls_or_factory()
    state_dict = {
        k: v.to(dtype).contiguous() if dtype is not None and v.is_floating_point() else v.contiguous()
        for k, v in state_dict.items()
    }
    try:
        model.load_state_dict(state_dict, strict=True, assign=True)
    except RuntimeError as e:
        raise ModelLoadError(f"{source}: the {what} weights do not fit the inferred architecture: {e}") from e
    return model.eval()


FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))


def upcast_fp8(state_dict: Mapping[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """fp8 tensors -> `dtype` (bf16 if `dtype` is an fp8 type itself or None), other tensors unchanged: the layout
    conversions concatenate and split, which float8 tensors do not support. For fp8 files (t5xxl_fp8_e4m3fn.safetensors,
    ...)."""
    target = torch.bfloat16 if dtype is None or dtype in FP8_DTYPES else dtype
    return {k: (v.to(target) if v.dtype in FP8_DTYPES else v) for k, v in state_dict.items()}


def own_memory(converted: dict[str, torch.Tensor], inputs: Mapping[str, torch.Tensor], dtype) -> dict[str, torch.Tensor]:
    """`converted` (floating tensors cast to `dtype`) with every tensor that would still share memory with a tensor of
    `inputs` replaced by its own copy. Copies are made one tensor at a time, and only where needed (a renamed tensor,
    a row slice of a fused weight, in the load dtype already): a cast or concatenated tensor is new anyway, so nothing
    is copied twice. Peak memory is the caller's dict plus the model, the least possible while the caller keeps its
    dict. A caller that drops its dict after building the model (a file just read) skips this."""
    storages = {v.untyped_storage().data_ptr() for v in inputs.values() if isinstance(v, torch.Tensor)}
    out = {}
    for k, v in converted.items():
        if v.is_floating_point() and dtype is not None:  # None: each tensor keeps its dtype
            v = v.to(dtype)
        if v.untyped_storage().data_ptr() in storages:
            v = v.clone(memory_format=torch.contiguous_format)
        out[k] = v
    return out


def cast_model(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """model.to(dtype) only where a floating parameter differs (diffusers logs a warning on every .to(dtype))."""
    if any(p.is_floating_point() and p.dtype != dtype for p in model.parameters()):
        model = model.to(dtype)
    return model


# ---------------------------------------------------------------------------------------------------------------------
# CLIP text encoders: config inference from shapes
# ---------------------------------------------------------------------------------------------------------------------

CLIP_L_TEXT_CONFIG = {  # CLIP ViT-L/14 text tower (SD 1.x, SDXL's first text encoder, FLUX.1's CLIP-L)
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


def infer_clip_text_config(
    diffusers_sd: Mapping[str, Any], reference: Mapping[str, Any] | None = None, open_clip: bool = False
) -> dict:
    """A CLIPTextConfig dict from a transformers-layout CLIP text state dict's shapes (keys with or without `text_model.`).

    64-wide heads as CLIP-L and OpenCLIP-H; `open_clip`: OpenCLIP's gelu and padding with id 0 ("!"), else OpenAI
    CLIP's quick_gelu and padding with eos; bos/eos are the last two vocabulary entries (as in CLIP's tokenizer).
    `reference` (default CLIP_L_TEXT_CONFIG) gives what shapes cannot tell; its projection width is kept only for a
    text encoder of its hidden size (else projection = hidden).
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
    reference = CLIP_L_TEXT_CONFIG if reference is None else reference
    config = copy.deepcopy(dict(reference))
    config.update(
        {
            "vocab_size": vocab,
            "hidden_size": hidden,
            "intermediate_size": intermediate,
            "num_hidden_layers": len(key_indices(sd, "encoder.layers.")),
            "num_attention_heads": heads,
            "max_position_embeddings": positions,
            "hidden_act": "gelu" if open_clip else "quick_gelu",
            "bos_token_id": vocab - 2,
            "eos_token_id": vocab - 1,
            "pad_token_id": 0 if open_clip else vocab - 1,
        }
    )
    if hidden != reference["hidden_size"]:
        config["projection_dim"] = hidden  # not a real-size model: no reference projection width
    return config


# ---------------------------------------------------------------------------------------------------------------------
# T5 v1.1 encoders (FLUX.1's and SD3's t5xxl): config inference from shapes, building
# ---------------------------------------------------------------------------------------------------------------------

T5_XXL_CONFIG = {  # google/t5-v1_1-xxl encoder: what shapes cannot tell
    "feed_forward_proj": "gated-gelu",
    "relative_attention_max_distance": 128,
    "layer_norm_epsilon": 1e-6,
    "dropout_rate": 0.0,
    "is_encoder_decoder": False,
    "use_cache": False,
    "tie_word_embeddings": False,
}


def infer_t5_config(state_dict: Mapping[str, Any]) -> dict:
    """A T5Config dict (encoder only) from Hugging Face-layout T5 v1.1 weights' shapes (tensors, meta tensors or shapes)."""
    sd = {k: _shape(v) for k, v in state_dict.items()}
    try:
        vocab, d_model = sd["shared.weight"] if "shared.weight" in sd else sd["encoder.embed_tokens.weight"]
        inner = sd["encoder.block.0.layer.0.SelfAttention.q.weight"][0]
        buckets, heads = sd["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
        d_ff = sd["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"][0]
    except KeyError as e:
        raise ModelLoadError(f"not a T5 v1.1 encoder in Hugging Face layout: {e.args[0]} missing") from e
    return {
        **T5_XXL_CONFIG,
        "vocab_size": vocab,
        "d_model": d_model,
        "d_kv": inner // heads,
        "d_ff": d_ff,
        "num_layers": len(key_indices(sd, "encoder.block.")),
        "num_heads": heads,
        "relative_attention_num_buckets": buckets,
    }


def t5_from_state_dict(state_dict: Mapping[str, torch.Tensor], dtype=torch.bfloat16, source: str = "t5xxl"):
    """A T5EncoderModel from Hugging Face-layout T5 v1.1 encoder weights (`shared.weight` and/or
    `encoder.embed_tokens.weight`, `encoder.block.N.*`; decoder tensors are ignored; fp8 tensors upcast)."""
    from accelerate import init_empty_weights
    from transformers import T5Config, T5EncoderModel

    sd = {k: v for k, v in upcast_fp8(state_dict, dtype).items() if k.startswith(("shared.", "encoder."))}
    if "shared.weight" not in sd and "encoder.embed_tokens.weight" in sd:
        sd["shared.weight"] = sd["encoder.embed_tokens.weight"]
    config = T5Config(**infer_t5_config(sd))
    with init_empty_weights():
        names = set(T5EncoderModel(config).state_dict())
    if "encoder.embed_tokens.weight" in names and "encoder.embed_tokens.weight" not in sd:
        sd["encoder.embed_tokens.weight"] = sd["shared.weight"]
    sd = {k: v for k, v in sd.items() if k in names}
    return build_and_load(lambda: T5EncoderModel(config), sd, dtype, "T5 text encoder", source)


# ---------------------------------------------------------------------------------------------------------------------
# VAE (AutoencoderKL): LDM or diffusers layout, config from shapes
# ---------------------------------------------------------------------------------------------------------------------

SD_VAE_COMMON = {  # the autoencoder layout of SD 1.x/2.x, SDXL and (with other latent widths) later models
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


def infer_vae_config(diffusers_sd: Mapping[str, Any], reference: Mapping[str, Any]) -> dict:
    """An AutoencoderKL config from a diffusers-layout VAE state dict's shapes.

    `reference` gives what shapes cannot tell (scaling factor, sample size, ...): a real model's VAE config.
    """
    sd = {k: _shape(v) for k, v in diffusers_sd.items()}
    levels = key_indices(sd, "encoder.down_blocks.")
    if not levels or "decoder.conv_in.weight" not in sd:
        raise ModelLoadError("no VAE encoder/decoder weights found")
    config = copy.deepcopy(dict(reference))
    config.update(
        {
            "in_channels": sd["encoder.conv_in.weight"][1],
            "out_channels": sd["decoder.conv_out.weight"][0],
            "down_block_types": ["DownEncoderBlock2D"] * len(levels),
            "up_block_types": ["UpDecoderBlock2D"] * len(levels),
            "block_out_channels": [sd[f"encoder.down_blocks.{i}.resnets.0.conv2.weight"][0] for i in levels],
            "layers_per_block": len(key_indices(sd, "encoder.down_blocks.0.resnets.")),
            "latent_channels": sd["decoder.conv_in.weight"][1],
            "use_quant_conv": "quant_conv.weight" in sd,
            "use_post_quant_conv": "post_quant_conv.weight" in sd,
            "mid_block_add_attention": "encoder.mid_block.attentions.0.to_q.weight" in sd,
        }
    )
    return config


def vae_to_diffusers_layout(checkpoint: Mapping[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """A VAE state dict in diffusers layout from LDM keys (with or without `first_stage_model.`/`vae.`) or diffusers keys."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    keys = list(checkpoint.keys())
    for prefix in ("", VAE_PREFIX, "vae."):
        if any(k.startswith(prefix + "encoder.down_blocks.") for k in keys):
            return {k[len(prefix) :]: v for k, v in checkpoint.items() if k.startswith(prefix)}
    for prefix in (VAE_PREFIX, "vae.", ""):
        levels = key_indices(keys, prefix + "encoder.down.")
        if levels:
            sub = {k[len(prefix) :]: v for k, v in checkpoint.items() if k.startswith(prefix)}
            n = len(levels)
            return convert_ldm_vae_checkpoint(
                sub, {"down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n}
            )
    raise ModelLoadError(f"{source}: no VAE weights (first_stage_model.encoder.* or encoder.down_blocks.*) found")


def vae_to_ldm_state_dict(vae) -> dict[str, torch.Tensor]:
    """An AutoencoderKL's weights under their single-file (LDM) names, `first_stage_model.` included (SD, SDXL, SD3;
    the model's own tensors, the mid-block attention weights reshaped to LDM's 1x1 convolutions)."""
    from library.ldm_names import vae_ldm_param_names

    out: dict[str, torch.Tensor] = {}
    vae_state = vae.state_dict()
    for key, ldm in vae_ldm_param_names(vae).items():
        value = vae_state[key]
        if re.search(r"\.mid\.attn_1\.(q|k|v|proj_out)\.weight$", ldm) and value.ndim == 2:
            value = value.reshape(*value.shape, 1, 1)  # LDM's attention uses 1x1 convolutions
        out[VAE_PREFIX + ldm] = value
    return out


def vae_from_state_dict(
    checkpoint: Mapping[str, torch.Tensor],
    dtype=torch.float32,
    source: str = "checkpoint",
    *,
    reference: Mapping[str, Any],
):
    """An AutoencoderKL from LDM-layout (any prefix) or diffusers-layout VAE weights (`reference`: see infer_vae_config)."""
    from diffusers import AutoencoderKL

    converted = vae_to_diffusers_layout(checkpoint, source)
    config = infer_vae_config(converted, reference)
    return build_and_load(lambda: AutoencoderKL(**config), converted, dtype, "VAE", source)


def load_vae(path: str, dtype=torch.float32, *, reference: Mapping[str, Any]):
    """A VAE for `--vae`: a diffusers VAE folder (config.json, or a pipeline folder with vae/), or a single file with
    LDM keys (with or without `first_stage_model.`) or diffusers-layout keys. `reference`: the config defaults for a
    single file (see infer_vae_config: the family's real VAE config)."""
    from diffusers import AutoencoderKL

    if os.path.isdir(path):
        for folder in (path, os.path.join(path, "vae")):
            if os.path.isfile(os.path.join(folder, "config.json")):
                return AutoencoderKL.from_pretrained(folder, torch_dtype=dtype).eval()
        raise ModelLoadError(f"VAE folder {path} has no config.json (nor vae/config.json)")
    if not os.path.exists(path):
        raise ModelLoadError(f"VAE not found: {path}")
    return vae_from_state_dict(read_state_dict(path), dtype, source=path, reference=reference)


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizers (offline: a cache folder, the local Hugging Face cache, or kiln's tiny tokenizer)
# ---------------------------------------------------------------------------------------------------------------------

CLIP_L_HUB_ID = "openai/clip-vit-large-patch14"
CLIP_BIGG_HUB_ID = "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k"  # SDXL's text encoder 2, SD3's CLIP-G (pads with "!" = id 0)
T5_XXL_HUB_ID = "google/t5-v1_1-xxl"


def hub_cache_folder(tokenizer_cache_dir: str, hub_id: str) -> str:
    """`<cache dir>/<hub id with / replaced by _>`, as sd-scripts' --tokenizer_cache_dir."""
    return os.path.join(tokenizer_cache_dir, hub_id.replace("/", "_"))


def is_tokenizer_folder(folder: str) -> bool:
    """Whether `folder` holds a tokenizer's files (vocab.json or tokenizer.json)."""
    return os.path.isfile(os.path.join(folder, "vocab.json")) or os.path.isfile(os.path.join(folder, "tokenizer.json"))


def hf_cache_folder(hub_id: str, subfolder: str | None) -> str | None:
    """The folder of a CLIP tokenizer's files (vocab.json, merges.txt) in the local Hugging Face cache, or None.
    (transformers 5 returns an empty 2-token tokenizer for a hub id whose files are not cached, so the files are looked
    up here first.)"""
    from huggingface_hub import try_to_load_from_cache

    prefix = f"{subfolder}/" if subfolder else ""
    found = [try_to_load_from_cache(hub_id, prefix + name) for name in ("vocab.json", "merges.txt")]
    if all(isinstance(f, str) and os.path.isfile(f) for f in found) and os.path.dirname(found[0]) == os.path.dirname(found[1]):
        return os.path.dirname(found[0])
    return None


def load_clip_tokenizer(
    hub_id: str,
    subfolder: str | None,
    tokenizer_cache_dir: str | None,
    vocab_size: int | None,
    *,
    model_name: str,
    pad_token: str | None = None,
    tiny_pad_token: str = "<|endoftext|>",
    hf_cache_lookup: Callable[[], str | None] | None = None,
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
        if is_tokenizer_folder(candidate):
            return finish(CLIPTokenizer.from_pretrained(candidate))

    cached = hf_cache_lookup() if hf_cache_lookup is not None else hf_cache_folder(hub_id, subfolder)
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


def is_t5_tokenizer_folder(folder: str) -> bool:
    """Whether `folder` holds a T5 tokenizer's files (spiece.model or tokenizer.json)."""
    return os.path.isfile(os.path.join(folder, "spiece.model")) or os.path.isfile(os.path.join(folder, "tokenizer.json"))


def hf_cache_t5_folder() -> str | None:
    """The folder of google/t5-v1_1-xxl's tokenizer files in the local Hugging Face cache, or None."""
    from huggingface_hub import try_to_load_from_cache

    for name in ("tokenizer.json", "spiece.model"):
        found = try_to_load_from_cache(T5_XXL_HUB_ID, name)
        if isinstance(found, str) and os.path.isfile(found):
            return os.path.dirname(found)
    return None


def load_t5_tokenizer(tokenizer_cache_dir: str | None = None, vocab_size: int | None = None, *, model_name: str):
    """The T5 tokenizer (google/t5-v1_1-xxl), offline: `tokenizer_cache_dir/google_t5-v1_1-xxl` (or its `tokenizer/`
    subfolder), then the local Hugging Face cache; kiln's tiny T5 tokenizer for its tiny vocabulary; otherwise
    ModelLoadError naming the folder to provide (`model_name` says for which model)."""
    from transformers import T5Tokenizer

    candidates = []
    if tokenizer_cache_dir:
        folder = hub_cache_folder(tokenizer_cache_dir, T5_XXL_HUB_ID)
        candidates += [folder, os.path.join(folder, "tokenizer")]
    for candidate in candidates:
        if is_t5_tokenizer_folder(candidate):
            return T5Tokenizer.from_pretrained(candidate)
    cached = hf_cache_t5_folder()
    if cached is not None:
        return T5Tokenizer.from_pretrained(cached)

    from library.tiny_models import TINY_T5_VOCAB, tiny_t5_tokenizer

    if vocab_size == TINY_T5_VOCAB:
        return tiny_t5_tokenizer()
    where = (
        hub_cache_folder(tokenizer_cache_dir, T5_XXL_HUB_ID)
        if tokenizer_cache_dir
        else f"<--tokenizer_cache_dir>/{T5_XXL_HUB_ID.replace('/', '_')}"
    )
    raise ModelLoadError(
        f"no T5 tokenizer for this {model_name} model: kiln needs the files of {T5_XXL_HUB_ID} (spiece.model or "
        f"tokenizer.json) in the folder {where}, or in the local Hugging Face cache. kiln does not download at run time."
    )


def check_tokenizer(tokenizer, text_encoder, source: str) -> None:
    """ModelLoadError when the tokenizer has more tokens than the text encoder has embeddings (a wrong tokenizer)."""
    vocab = text_encoder.config.vocab_size
    if len(tokenizer) > vocab:
        raise ModelLoadError(
            f"{source}: the tokenizer has {len(tokenizer)} tokens but the text encoder only {vocab}; wrong tokenizer"
        )


# ---------------------------------------------------------------------------------------------------------------------
# Diffusers folders
# ---------------------------------------------------------------------------------------------------------------------


def folder_family(path: str) -> tuple[str, bool]:
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


PIPELINE_LIBRARIES = {  # diffusers pipeline component -> the library of its class (model_index.json)
    "unet": "diffusers",
    "transformer": "diffusers",
    "vae": "diffusers",
    "scheduler": "diffusers",
    "text_encoder": "transformers",
    "tokenizer": "transformers",
    "text_encoder_2": "transformers",
    "tokenizer_2": "transformers",
    "text_encoder_3": "transformers",
    "tokenizer_3": "transformers",
}


def pipeline_index(class_name: str, classes: Mapping[str, str]) -> dict:
    """The model_index.json of a diffusers pipeline `class_name` whose components (name -> class name) are `classes`:
    the optional components it lacks (safety checker, image encoder, feature extractor) as [null, null]."""
    import diffusers

    index: dict[str, Any] = {"_class_name": class_name, "_diffusers_version": diffusers.__version__}
    for name, cls in classes.items():
        index[name] = [PIPELINE_LIBRARIES[name], cls]
    if class_name == "StableDiffusionPipeline":
        index.update({"safety_checker": [None, None], "feature_extractor": [None, None], "requires_safety_checker": False})
    else:
        index.update({"image_encoder": [None, None], "feature_extractor": [None, None]})
        if class_name == "StableDiffusionXLPipeline":
            index["force_zeros_for_empty_prompt"] = True
    return index


def save_diffusers_folder(components: dict, folder: str) -> None:
    """Save components as a diffusers pipeline folder (model_index.json and one folder each): a
    StableDiffusion3Pipeline when they include `text_encoder_3` (build_tiny_sd3), a FluxPipeline when they include
    `transformer` (build_tiny_flux), a StableDiffusionXLPipeline when they include `text_encoder_2`, else a
    StableDiffusionPipeline."""
    os.makedirs(folder, exist_ok=True)
    sd3 = "text_encoder_3" in components
    flux = not sd3 and "transformer" in components
    sdxl = not sd3 and not flux and "text_encoder_2" in components
    class_name = (
        "StableDiffusion3Pipeline"
        if sd3
        else "FluxPipeline"
        if flux
        else "StableDiffusionXLPipeline"
        if sdxl
        else "StableDiffusionPipeline"
    )
    for name, obj in components.items():
        obj.save_pretrained(os.path.join(folder, name))
    index = pipeline_index(class_name, {name: type(obj).__name__ for name, obj in components.items()})
    with open(os.path.join(folder, "model_index.json"), "w") as f:
        json.dump(index, f, indent=1)


# ---------------------------------------------------------------------------------------------------------------------
# Single files
# ---------------------------------------------------------------------------------------------------------------------


def _atomic_write(path: str, write: Callable[[str], None]) -> None:
    from library.saving import atomic_write  # the one place that creates files: usual mode, temporary name, rename

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(path, write)


def write_single_file(
    path: str, state_dict: Mapping[str, torch.Tensor], dtype: torch.dtype | None = None, metadata: dict[str, str] | None = None
) -> None:
    """Write a single-file state dict atomically: `.safetensors` (with `metadata`, all values strings) or, for
    .ckpt/.pt, a plain {"state_dict": ...} pickle of tensors that loads with weights_only=True. `dtype` casts floating
    tensors. The file is written to a temporary name in the same folder, then renamed over `path`."""
    check_metadata(metadata)
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


# A tensor of a file being written, made only when its turn comes: (shape, dtype, function making the tensor).
TensorSource = tuple[tuple[int, ...], torch.dtype, Callable[[], torch.Tensor]]


def tensor_sources(state_dict: Mapping[str, torch.Tensor], prefix: str = "") -> dict[str, TensorSource]:
    """`prefix` + key -> TensorSource of existing tensors (a model's state dict, on any device)."""
    return {prefix + k: (tuple(v.shape), v.dtype, lambda t=v: t) for k, v in state_dict.items()}


def check_metadata(metadata: Mapping[str, str] | None) -> None:
    """TypeError unless every metadata key and value is a string (safetensors' rule)."""
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise TypeError("safetensors metadata keys and values must all be strings")


def write_tensor_sources(
    path: str,
    sources: Mapping[str, TensorSource],
    dtype: torch.dtype | None = None,
    metadata: dict[str, str] | None = None,
    overwrite: bool = True,
) -> None:
    """Write the tensors `sources` make as one model file, atomically (saving.save_tensors): `.safetensors` streamed
    one tensor at a time (each copied to host memory only when written: a model on a GPU or partly in host memory is
    neither moved nor copied whole), another suffix a weights-only-loadable {"state_dict": ...} pickle. `dtype` casts
    floating tensors (None: each keeps its own); `metadata` values must be strings."""
    from library.saving import save_tensors

    check_metadata(metadata)

    def out_dtype(d: torch.dtype) -> torch.dtype:
        return dtype if dtype is not None and d.is_floating_point else d

    layout = [(name, shape, out_dtype(d)) for name, (shape, d, _) in sources.items()]

    def produce(name: str) -> torch.Tensor:
        _, d, make = sources[name]
        return make().detach().to("cpu", out_dtype(d)).contiguous()

    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_tensors(path, layout, produce, metadata, overwrite)
