"""SD3 / SD3.5 model files: SAI single-file layout <-> diffusers, config inference, variants, bundled parts, errors.

The independent oracle is diffusers' own single-file loader (`from_single_file` with a local config folder, offline):
it reads the files kiln writes into the same weights, and the same model outputs, as the models they came from. For
diffusers folders it is StableDiffusion3Pipeline.from_pretrained: kiln's load_sd3_model gives the components (weights,
configs, tokenizers) it gives. Separate encoder / VAE files are checked against the models they were written from
(fp8 files: the fp8-rounded weights).
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from library.checkpoint_files import UNET_PREFIX, VAE_PREFIX, ModelLoadError, read_key_shapes, read_state_dict
from library.sd3_models import (
    CLIP_G_PREFIX,
    CLIP_L_PREFIX,
    SD3_SS_BASE_MODEL_VERSION,
    SD3_VARIANTS,
    T5XXL_PREFIX,
    TINY_SD3_CLIP_L_WIDTH,
    detect_sd3_variant,
    infer_sd3_transformer_config,
    load_sd3_single_file,
    read_sd3_single_file,
    save_sd3_single_file,
    sd3_to_sai_state_dict,
    sd3_transformer_from_sai,
    sd3_transformer_to_sai,
    sd3_variant_from_config,
    split_sai_state_dict,
    tiny_sd3_transformer_config,
    transformer_from_sai,
)
from library.tiny_models import tiny_sd3_clip_config, tiny_sd3_t5_config, tiny_sd3_vae_config


def _tiny_transformer(variant: str, seed: int = 0):
    """A tiny SD3Transformer2DModel with every parameter perturbed (zero-initialised modulations and norms with scale
    1 would hide a swapped or misplaced tensor)."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    model = SD3Transformer2DModel(**tiny_sd3_transformer_config(variant)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _tiny_parts(seed: int = 1) -> dict:
    """Tiny SD3-style VAE (16 channels, SD3 factors), CLIP-L, CLIP-G (another width) and T5 encoder (kiln's built-in
    configs), in sd-scripts' part names."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    torch.manual_seed(seed)
    return {
        "vae": AutoencoderKL(**tiny_sd3_vae_config()).eval(),
        "clip_l": CLIPTextModelWithProjection(tiny_sd3_clip_config("clip_l")).eval(),
        "clip_g": CLIPTextModelWithProjection(tiny_sd3_clip_config("clip_g")).eval(),
        "t5xxl": T5EncoderModel(tiny_sd3_t5_config()).eval(),
    }


def _inputs(config: dict, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, config["in_channels"], 8, 12, generator=g)  # not square: crops the pos_embed table
    context = torch.randn(2, 7, config["joint_attention_dim"], generator=g)
    pooled = torch.randn(2, config["pooled_projection_dim"], generator=g)
    return latents, context, pooled, torch.tensor([120.0, 870.0])


def _run(model, inputs) -> torch.Tensor:
    latents, context, pooled, t = inputs
    with torch.no_grad():
        return model(hidden_states=latents, encoder_hidden_states=context, pooled_projections=pooled, timestep=t).sample


def _assert_same_weights(a: dict, b: dict, what: str, skip: tuple[str, ...] = ()) -> None:
    assert set(a) == set(b), f"{what}: {sorted(set(a) ^ set(b))[:5]}"
    for k in a:
        if k not in skip:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), f"{what}: {k}"


def _config_folder(folder: str, transformer, parts: dict | None = None) -> str:
    """A local diffusers config folder for from_single_file(config=...): configs only, no weights."""
    transformer.save_config(os.path.join(folder, "transformer"))
    if parts is None:
        return folder
    from diffusers import FlowMatchEulerDiscreteScheduler

    from library.tiny_models import write_tiny_clip_tokenizer, write_tiny_t5_tokenizer

    parts["vae"].save_config(os.path.join(folder, "vae"))
    for sub, name in (("text_encoder", "clip_l"), ("text_encoder_2", "clip_g"), ("text_encoder_3", "t5xxl")):
        parts[name].config.save_pretrained(os.path.join(folder, sub))
    write_tiny_clip_tokenizer(os.path.join(folder, "tokenizer"))
    write_tiny_clip_tokenizer(os.path.join(folder, "tokenizer_2"))
    write_tiny_t5_tokenizer(os.path.join(folder, "tokenizer_3"))
    FlowMatchEulerDiscreteScheduler(shift=3.0).save_config(os.path.join(folder, "scheduler"))
    index = {
        "_class_name": "StableDiffusion3Pipeline",
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "text_encoder_3": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "tokenizer_3": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "SD3Transformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    with open(os.path.join(folder, "model_index.json"), "w") as f:
        json.dump(index, f)
    return folder


# ---------------------------------------------------------------------------------------------------------------------
# The MMDiT, per variant
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", SD3_VARIANTS)
def test_transformer_single_file_round_trip(tmp_path, variant):
    from diffusers import SD3Transformer2DModel

    model = _tiny_transformer(variant)
    config = tiny_sd3_transformer_config(variant)
    path = str(tmp_path / f"{variant}.safetensors")
    save_sd3_single_file(path, model)
    inputs = _inputs(config)
    expected = _run(model, inputs)

    # (a) diffusers' own converter reads kiln's file into the same weights and outputs
    folder = _config_folder(str(tmp_path / "config"), model)
    oracle = SD3Transformer2DModel.from_single_file(
        path, config=folder, subfolder="transformer", local_files_only=True, torch_dtype=torch.float32
    ).eval()
    _assert_same_weights(model.state_dict(), oracle.state_dict(), f"diffusers' load of {variant}")
    # same weights; the last bits of a matmul may differ with the tensors' memory alignment
    torch.testing.assert_close(_run(oracle, inputs), expected, rtol=1e-5, atol=1e-5)

    # (b) kiln's converter gives back the very tensors, and a model with the same outputs
    checkpoint = read_state_dict(path)
    assert all(k.startswith(UNET_PREFIX) for k in checkpoint)
    _assert_same_weights(sd3_transformer_from_sai(checkpoint, strict=True), model.state_dict(), f"kiln's load of {variant}")
    rebuilt = transformer_from_sai(checkpoint, torch.float32, path)
    assert torch.equal(_run(rebuilt, inputs), expected)

    # (c) the config and the variant from the file's shapes alone
    shapes = read_key_shapes(path)
    assert infer_sd3_transformer_config(shapes) == config
    assert detect_sd3_variant(shapes) == variant == sd3_variant_from_config(model.config)
    assert sd3_variant_from_config(rebuilt.config) == variant


@pytest.mark.parametrize("variant", SD3_VARIANTS)
def test_sai_names(variant):
    model = _tiny_transformer(variant)
    config = tiny_sd3_transformer_config(variant)
    sai = sd3_transformer_to_sai(model.state_dict(), prefix="")
    last = config["num_layers"] - 1
    hidden = config["num_attention_heads"] * config["attention_head_dim"]
    assert sai["pos_embed"].shape == (1, config["pos_embed_max_size"] ** 2, hidden)
    assert sai["x_embedder.proj.weight"].shape == (hidden, 16, 2, 2)
    assert sai["joint_blocks.0.x_block.attn.qkv.weight"].shape == (3 * hidden, hidden)
    assert sai["final_layer.linear.weight"].shape == (64, hidden)
    # the last context block is pre-only: qkv and a 2H shift/scale modulation, no proj, no MLP
    assert sai[f"joint_blocks.{last}.context_block.adaLN_modulation.1.weight"].shape == (2 * hidden, hidden)
    assert f"joint_blocks.{last}.context_block.attn.qkv.weight" in sai
    assert not any(k.startswith((f"joint_blocks.{last}.context_block.attn.proj", f"joint_blocks.{last}.context_block.mlp"))
                   for k in sai)
    assert f"joint_blocks.{last - 1}.context_block.mlp.fc2.bias" in sai
    qk = variant != "sd3-medium"
    assert ("joint_blocks.0.context_block.attn.ln_k.weight" in sai) == qk
    dual = {i for i in range(config["num_layers"]) if f"joint_blocks.{i}.x_block.attn2.qkv.weight" in sai}
    assert dual == set(config["dual_attention_layers"])
    for i in dual:
        assert sai[f"joint_blocks.{i}.x_block.adaLN_modulation.1.weight"].shape == (9 * hidden, hidden)
        assert (f"joint_blocks.{i}.x_block.attn2.ln_q.weight" in sai) == qk
    # SAI's modulations emit (shift, scale), diffusers' AdaLayerNormContinuous (scale, shift)
    final = model.state_dict()["norm_out.linear.weight"]
    assert torch.equal(sai["final_layer.adaLN_modulation.1.weight"], torch.cat(final.chunk(2)[::-1]))
    # a file without the prefix reads the same
    _assert_same_weights(sd3_transformer_from_sai(sai, strict=True), model.state_dict(), "bare MMDiT")
    assert detect_sd3_variant(sai) == variant


def test_real_sizes_config_and_variant():
    """The three releases' configs (diffusers' published ones) come back from their SAI shapes."""
    from diffusers import SD3Transformer2DModel

    common = {"sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16, "attention_head_dim": 64,
              "joint_attention_dim": 4096, "pooled_projection_dim": 2048}
    releases = {
        "sd3-medium": {**common, "num_layers": 24, "num_attention_heads": 24, "caption_projection_dim": 1536,
                       "pos_embed_max_size": 192, "dual_attention_layers": (), "qk_norm": None},
        "sd3.5-medium": {**common, "num_layers": 24, "num_attention_heads": 24, "caption_projection_dim": 1536,
                         "pos_embed_max_size": 384, "dual_attention_layers": tuple(range(13)), "qk_norm": "rms_norm"},
        "sd3.5-large": {**common, "num_layers": 38, "num_attention_heads": 38, "caption_projection_dim": 2432,
                        "pos_embed_max_size": 192, "dual_attention_layers": (), "qk_norm": "rms_norm"},
    }
    for variant, config in releases.items():
        with torch.device("meta"):  # shapes only, the sin-cos table included
            model = SD3Transformer2DModel(**config)
        sai = sd3_transformer_to_sai(model.state_dict())
        shapes = {k: tuple(v.shape) for k, v in sai.items()}
        assert infer_sd3_transformer_config(shapes) == config, variant
        assert detect_sd3_variant(shapes) == variant
    assert SD3_SS_BASE_MODEL_VERSION == {"sd3-medium": "medium", "sd3.5-medium": "5-medium", "sd3.5-large": "5-large"}


def test_dtype_and_pickle(tmp_path):
    model = _tiny_transformer("sd3.5-large")
    path = str(tmp_path / "bf16.safetensors")
    save_sd3_single_file(path, model, dtype=torch.bfloat16, metadata={"modelspec.architecture": "stable-diffusion-3-5-large"})
    with safe_open(path, framework="pt") as f:
        assert f.metadata() == {"modelspec.architecture": "stable-diffusion-3-5-large"}
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    loaded = load_sd3_single_file(path, dtype=torch.bfloat16)
    expected = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    _assert_same_weights(loaded.transformer.state_dict(), expected, "bf16 file")
    assert (loaded.variant, loaded.vae, loaded.clip_l, loaded.clip_g, loaded.t5xxl) == ("sd3.5-large", None, None, None, None)

    ckpt = str(tmp_path / "model.ckpt")
    save_sd3_single_file(ckpt, model)
    parts = read_sd3_single_file(ckpt)
    _assert_same_weights(sd3_transformer_from_sai(parts["transformer"], strict=True), model.state_dict(), ".ckpt")


# ---------------------------------------------------------------------------------------------------------------------
# A file with the text encoders and the VAE
# ---------------------------------------------------------------------------------------------------------------------


def test_bundled_file_splits_into_its_parts(tmp_path):
    from diffusers import StableDiffusion3Pipeline

    transformer = _tiny_transformer("sd3-medium")
    parts = _tiny_parts()
    path = str(tmp_path / "sd3_tiny_incl_clips_t5.safetensors")
    save_sd3_single_file(path, transformer, **parts)

    keys = list(read_key_shapes(path))
    prefixes = (UNET_PREFIX, VAE_PREFIX, CLIP_L_PREFIX, CLIP_G_PREFIX, T5XXL_PREFIX)
    assert all(k.startswith(prefixes) for k in keys)
    # the layouts users' files have: LDM VAE, transformers' CLIP names (CLIP-G too), T5 with both embedding names
    for key in (VAE_PREFIX + "encoder.down.0.block.0.conv1.weight", VAE_PREFIX + "decoder.up.3.upsample.conv.weight",
                VAE_PREFIX + "encoder.mid.attn_1.q.weight", CLIP_L_PREFIX + "text_model.embeddings.position_embedding.weight",
                CLIP_G_PREFIX + "text_model.encoder.layers.1.self_attn.q_proj.weight", CLIP_G_PREFIX + "text_projection.weight",
                T5XXL_PREFIX + "shared.weight", T5XXL_PREFIX + "encoder.embed_tokens.weight"):
        assert key in keys, key
    assert not any("quant_conv" in k for k in keys)
    assert read_key_shapes(path)[VAE_PREFIX + "encoder.mid.attn_1.q.weight"] == (64, 64, 1, 1)

    split = split_sai_state_dict(load_file(path))
    assert set(split) == {"transformer", "vae", "clip_l", "clip_g", "t5xxl"}
    assert "text_projection.weight" in split["clip_g"] and "encoder.down.0.block.0.conv1.weight" in split["vae"]

    loaded = load_sd3_single_file(path, dtype=torch.float32)
    assert loaded.variant == "sd3-medium" and loaded.source == path
    models = {"transformer": transformer, **parts}
    for name, model in models.items():
        _assert_same_weights(getattr(loaded, name).state_dict(), model.state_dict(), name)
    assert (loaded.vae.config.scaling_factor, loaded.vae.config.shift_factor, loaded.vae.config.latent_channels) == (1.5305, 0.0609, 16)
    assert loaded.clip_l.config.hidden_act == "quick_gelu" and loaded.clip_g.config.hidden_act == "gelu"
    assert loaded.clip_g.config.num_attention_heads == parts["clip_g"].config.num_attention_heads

    # every part in memory equals its written form
    in_memory = sd3_to_sai_state_dict(transformer, **parts)
    _assert_same_weights(in_memory, load_file(path), "sd3_to_sai_state_dict")

    # diffusers' single-file pipeline loader reads the same file into the same weights
    folder = _config_folder(str(tmp_path / "config"), transformer, parts)
    pipe = StableDiffusion3Pipeline.from_single_file(path, config=folder, local_files_only=True, torch_dtype=torch.float32)
    for ours, theirs in (("transformer", "transformer"), ("vae", "vae"), ("clip_l", "text_encoder"),
                         ("clip_g", "text_encoder_2"), ("t5xxl", "text_encoder_3")):
        # diffusers gives CLIP-L an identity projection whatever the file holds (SD3 pools CLIP-L unprojected)
        skip = ("text_projection.weight",) if ours == "clip_l" else ()
        _assert_same_weights(getattr(pipe, theirs).state_dict(), models[ours].state_dict(), f"diffusers' {theirs}", skip)


def test_clip_without_projection_and_t5_with_one_embedding_name():
    from library.model_files import t5_from_state_dict
    from library.sd3_models import clip_from_sai

    parts = _tiny_parts()
    clip_l = {k: v for k, v in parts["clip_l"].state_dict().items() if k != "text_projection.weight"}
    model = clip_from_sai(clip_l, "clip_l", torch.float32)
    assert torch.equal(model.text_projection.weight, torch.eye(TINY_SD3_CLIP_L_WIDTH))
    for drop in ("encoder.embed_tokens.weight", "shared.weight"):
        t5 = {k: v for k, v in parts["t5xxl"].state_dict().items() if k != drop}
        _assert_same_weights(t5_from_state_dict(t5, torch.float32).state_dict(), parts["t5xxl"].state_dict(), f"T5 without {drop}")


# ---------------------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------------------


def test_truncated_file(tmp_path):
    path = str(tmp_path / "sd3.safetensors")
    save_sd3_single_file(path, _tiny_transformer("sd3-medium"))
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(ModelLoadError, match="truncated") as e:
        load_sd3_single_file(path)
    assert path in str(e.value)


@pytest.mark.parametrize(
    "keys, script",
    [
        (["double_blocks.0.img_attn.qkv.weight", "img_in.weight"], "flux_train_network.py"),
        ([UNET_PREFIX + "label_emb.0.0.weight", "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight"],
         "sdxl_train_network.py"),
        ([UNET_PREFIX + "input_blocks.0.0.weight", "cond_stage_model.transformer.text_model.final_layer_norm.weight"],
         "train_network.py"),
        ([VAE_PREFIX + "encoder.conv_in.weight"], "SD3/SD3.5 model kiln can load"),
    ],
)
def test_other_families(tmp_path, keys, script):
    path = str(tmp_path / "other.safetensors")
    save_file({k: torch.zeros(2, 2) for k in keys}, path)
    with pytest.raises(ModelLoadError) as e:
        load_sd3_single_file(path)
    assert path in str(e.value) and script in str(e.value)


def test_missing_file_and_incomplete_mmdit(tmp_path):
    missing = str(tmp_path / "nope.safetensors")
    with pytest.raises(ModelLoadError, match="not found") as e:
        load_sd3_single_file(missing)
    assert missing in str(e.value)

    sai = sd3_transformer_to_sai(_tiny_transformer("sd3.5-medium").state_dict())
    del sai[UNET_PREFIX + "joint_blocks.1.x_block.attn2.proj.weight"]
    path = str(tmp_path / "incomplete.safetensors")
    save_file({k: v.contiguous() for k, v in sai.items()}, path)
    with pytest.raises(ModelLoadError, match=r"joint_blocks\.1\.x_block\.attn2\.proj\.weight missing") as e:
        load_sd3_single_file(path)
    assert path in str(e.value)

    sai = sd3_transformer_to_sai(_tiny_transformer("sd3-medium").state_dict())
    sai[UNET_PREFIX + "joint_blocks.0.x_block.attn.qkv.scale_weight"] = torch.ones(())
    path = str(tmp_path / "scaled.safetensors")
    save_file({k: v.contiguous() for k, v in sai.items()}, path)
    with pytest.raises(ModelLoadError, match="scaled fp8") as e:
        load_sd3_single_file(path)
    assert path in str(e.value)


# ---------------------------------------------------------------------------------------------------------------------
# load_sd3_model: single files, separate part files, diffusers folders, built-ins, tokenizers
# ---------------------------------------------------------------------------------------------------------------------

PROMPT = "a photo of a cat, masterpiece"
PARTS = ("transformer", "vae", "clip_l", "clip_g", "t5xxl")


def _write_part_files(parts: dict, folder, clip_g_dtype=None, t5_dtype=torch.float16) -> dict:
    """Separate files as users have them: vae.safetensors (LDM names, no prefix), clip_l.safetensors (text_model.*,
    no text_projection), clip_g.safetensors (with text_projection), t5xxl (shared.weight only)."""
    from library.sd_models import vae_to_ldm_state_dict

    def save(name, tensors, dtype=None):
        path = os.path.join(str(folder), name)
        save_file({k: (v.to(dtype) if dtype is not None else v).contiguous() for k, v in tensors.items()}, path)
        return path

    vae = {k[len(VAE_PREFIX) :]: v for k, v in vae_to_ldm_state_dict(parts["vae"]).items()}
    clip_l = {k: v for k, v in parts["clip_l"].state_dict().items() if k != "text_projection.weight"}
    t5 = {k: v for k, v in parts["t5xxl"].state_dict().items() if k != "encoder.embed_tokens.weight"}
    return {
        "vae": save("vae.safetensors", vae),
        "clip_l": save("clip_l.safetensors", clip_l),
        "clip_g": save("clip_g.safetensors", parts["clip_g"].state_dict(), clip_g_dtype),
        "t5xxl": save("t5xxl.safetensors", t5, t5_dtype),
    }


def _read_keys_recorder(monkeypatch) -> list[str]:
    """The keys kiln reads from .safetensors model files from now on."""
    import library.sd3_models as sm

    read: list[str] = []
    original = sm._read_tensors

    def recording(path, keys):
        read.extend(keys)
        return original(path, keys)

    monkeypatch.setattr(sm, "_read_tensors", recording)
    return read


def test_load_single_file_with_bundled_parts(tmp_path):
    from library.sd3_models import load_sd3_model

    transformer, parts = _tiny_transformer("sd3-medium"), _tiny_parts()
    path = str(tmp_path / "sd3_medium_incl_clips_t5.safetensors")
    save_sd3_single_file(path, transformer, **parts)
    model = load_sd3_model(path, dtype=torch.float32)
    assert (model.variant, model.source) == ("sd3-medium", path)
    for name, ref in {"transformer": transformer, **parts}.items():
        _assert_same_weights(getattr(model, name).state_dict(), ref.state_dict(), name)
    # tiny vocabularies get kiln's tiny tokenizers; CLIP-G pads with "!" (id 0) as sd-scripts
    assert model.clip_g_tokenizer.pad_token_id == 0 and model.clip_l_tokenizer.pad_token == "<|endoftext|>"
    assert model.t5_tokenizer(PROMPT).input_ids[-1] == model.t5_tokenizer.eos_token_id

    bf16 = load_sd3_model(path, vae_dtype=torch.float32)  # default dtype bf16
    assert {getattr(bf16, p).dtype for p in ("transformer", "clip_l", "clip_g", "t5xxl")} == {torch.bfloat16}
    assert bf16.vae.dtype == torch.float32


def test_transformer_only_file_and_part_files(tmp_path):
    """SD3.5 release layout (MMDiT only) with separate VAE / CLIP-L / fp8 CLIP-G / fp16 T5 files."""
    from library.sd3_models import load_sd3_model

    transformer, parts = _tiny_transformer("sd3.5-large"), _tiny_parts()
    path = str(tmp_path / "sd3.5_large.safetensors")
    save_sd3_single_file(path, transformer, dtype=torch.bfloat16)
    files = _write_part_files(parts, tmp_path, clip_g_dtype=torch.float8_e4m3fn)
    model = load_sd3_model(path, dtype=torch.bfloat16, vae_dtype=torch.float32, **files)
    assert model.variant == "sd3.5-large"
    as_bf16 = lambda sd: {k: v.to(torch.bfloat16) for k, v in sd.items()}  # noqa: E731
    _assert_same_weights(model.transformer.state_dict(), as_bf16(transformer.state_dict()), "transformer")
    _assert_same_weights(model.vae.state_dict(), parts["vae"].state_dict(), "vae")
    assert (model.vae.config.scaling_factor, model.vae.config.shift_factor) == (1.5305, 0.0609)
    clip_l = model.clip_l.state_dict()
    assert torch.equal(clip_l.pop("text_projection.weight"), torch.eye(TINY_SD3_CLIP_L_WIDTH, dtype=torch.bfloat16))
    expected = as_bf16(parts["clip_l"].state_dict())
    expected.pop("text_projection.weight")
    _assert_same_weights(clip_l, expected, "clip_l")
    # the fp8 file is upcast: its values are the fp8-rounded weights, in bf16
    fp8 = {k: v.to(torch.float8_e4m3fn).to(torch.bfloat16) for k, v in parts["clip_g"].state_dict().items()}
    _assert_same_weights(model.clip_g.state_dict(), fp8, "fp8 clip_g")
    t5 = {k: v.half().to(torch.bfloat16) for k, v in parts["t5xxl"].state_dict().items()}
    _assert_same_weights(model.t5xxl.state_dict(), t5, "fp16 t5xxl")
    assert model.clip_g.config.hidden_act == "gelu" and model.clip_l.config.hidden_act == "quick_gelu"

    # an fp8 T5 file too; a full SAI file given as --clip_g gives its CLIP-G
    os.makedirs(tmp_path / "fp8")
    files_fp8 = _write_part_files(parts, tmp_path / "fp8", t5_dtype=torch.float8_e5m2)
    bundled = str(tmp_path / "bundled.safetensors")
    save_sd3_single_file(bundled, transformer, **parts)
    model = load_sd3_model(path, dtype=torch.float32, **{**files_fp8, "clip_g": bundled})
    t5 = {k: v.to(torch.float8_e5m2).float() for k, v in parts["t5xxl"].state_dict().items()}
    _assert_same_weights(model.t5xxl.state_dict(), t5, "fp8 t5xxl")
    _assert_same_weights(model.clip_g.state_dict(), parts["clip_g"].state_dict(), "clip_g from a SAI file")

    # --vae may also be a diffusers VAE folder
    parts["vae"].save_pretrained(str(tmp_path / "vae"))
    model = load_sd3_model(path, dtype=torch.float32, **{**files, "vae": str(tmp_path / "vae")})
    _assert_same_weights(model.vae.state_dict(), parts["vae"].state_dict(), "--vae folder")


def test_given_file_replaces_the_bundled_part(tmp_path, caplog, monkeypatch):
    import logging

    from library.sd3_models import load_sd3_model

    transformer, parts = _tiny_transformer("sd3-medium"), _tiny_parts(seed=1)
    path = str(tmp_path / "bundled.safetensors")
    save_sd3_single_file(path, transformer, **parts)
    other = _tiny_parts(seed=2)
    files = _write_part_files(other, tmp_path, t5_dtype=torch.float32)
    read = _read_keys_recorder(monkeypatch)
    caplog.set_level(logging.INFO, logger="kiln")
    model = load_sd3_model(path, dtype=torch.float32, clip_g=files["clip_g"], t5xxl=files["t5xxl"])
    _assert_same_weights(model.clip_g.state_dict(), other["clip_g"].state_dict(), "--clip_g")
    _assert_same_weights(model.t5xxl.state_dict(), other["t5xxl"].state_dict(), "--t5xxl")
    _assert_same_weights(model.clip_l.state_dict(), parts["clip_l"].state_dict(), "bundled clip_l")
    # the replaced parts are never read from the checkpoint
    assert read and not any(k.startswith((CLIP_G_PREFIX, T5XXL_PREFIX)) for k in read)
    assert any(k.startswith(CLIP_L_PREFIX) for k in read)
    lines = [r for r in caplog.records if r.name == "kiln" and r.levelno == logging.INFO]
    assert len(lines) == 1, [r.getMessage() for r in lines]
    message = lines[0].getMessage()
    assert all(s in message for s in (path, "--clip_g", files["clip_g"], "--t5xxl", files["t5xxl"], "CLIP-G", "T5-XXL"))
    assert "--clip_l" not in message


def test_missing_parts_name_their_options(tmp_path, monkeypatch):
    from library.sd3_models import load_sd3_model

    transformer, parts = _tiny_transformer("sd3.5-medium"), _tiny_parts()
    files = _write_part_files(parts, tmp_path)
    release = str(tmp_path / "sd3.5_medium.safetensors")  # MMDiT and VAE, as the SD3.5 releases
    save_sd3_single_file(release, transformer, vae=parts["vae"])
    read = _read_keys_recorder(monkeypatch)
    with pytest.raises(ModelLoadError) as e:
        load_sd3_model(release, clip_l=files["clip_l"])
    message = str(e.value)
    assert release in message and "--clip_g" in message and "--t5xxl" in message
    assert "--clip_l" not in message and "--vae" not in message
    assert not read  # refused from the file's names, before any tensor is read

    bare = str(tmp_path / "mmdit.safetensors")
    save_sd3_single_file(bare, transformer)
    with pytest.raises(ModelLoadError, match="--vae") as e:
        load_sd3_model(bare, clip_l=files["clip_l"], clip_g=files["clip_g"], t5xxl=files["t5xxl"])
    assert "--t5xxl" not in str(e.value)
    with pytest.raises(ModelLoadError, match="--t5xxl not found"):
        load_sd3_model(bare, t5xxl=str(tmp_path / "nope.safetensors"))
    # a file of the wrong kind names the option and the file
    with pytest.raises(ModelLoadError) as e:
        load_sd3_model(release, clip_l=files["clip_l"], clip_g=files["t5xxl"], t5xxl=files["t5xxl"])
    assert "--clip_g" in str(e.value) and files["t5xxl"] in str(e.value)


def _config(model) -> dict:
    config = model.config
    config = dict(config) if isinstance(config, dict) else config.to_dict()
    return {k: v for k, v in config.items() if k != "_name_or_path"}


def _assert_same_pipeline_parts(model, pipe) -> None:
    for ours, theirs in (("transformer", "transformer"), ("vae", "vae"), ("clip_l", "text_encoder"),
                         ("clip_g", "text_encoder_2"), ("t5xxl", "text_encoder_3")):
        _assert_same_weights(getattr(model, ours).state_dict(), getattr(pipe, theirs).state_dict(), f"folder {theirs}")
        assert _config(getattr(model, ours)) == _config(getattr(pipe, theirs)), theirs
    for ours, theirs in (("clip_l_tokenizer", "tokenizer"), ("clip_g_tokenizer", "tokenizer_2"), ("t5_tokenizer", "tokenizer_3")):
        assert getattr(model, ours)(PROMPT).input_ids == getattr(pipe, theirs)(PROMPT).input_ids, theirs


def test_diffusers_folder(tmp_path, caplog):
    """A folder written by diffusers' own StableDiffusion3Pipeline.save_pretrained and one written by kiln's
    save_diffusers_folder: kiln loads each into the components diffusers' from_pretrained loads."""
    import logging

    from diffusers import StableDiffusion3Pipeline

    from library.model_files import folder_family, save_diffusers_folder
    from library.sd3_models import load_sd3_model
    from library.tiny_models import build_tiny_sd3

    components = build_tiny_sd3("sd3.5-medium", seed=3)
    by_diffusers, by_kiln = str(tmp_path / "diffusers"), str(tmp_path / "kiln")
    StableDiffusion3Pipeline(**components).save_pretrained(by_diffusers)
    save_diffusers_folder(components, by_kiln)
    for folder in (by_diffusers, by_kiln):
        assert folder_family(folder) == ("sd3", False)
        pipe = StableDiffusion3Pipeline.from_pretrained(folder, dtype=torch.float32, local_files_only=True)
        model = load_sd3_model(folder, dtype=torch.float32)
        assert (model.variant, model.source) == ("sd3.5-medium", folder)
        _assert_same_pipeline_parts(model, pipe)

    # a file given replaces the folder's component (logged); a folder without a T5 needs --t5xxl
    t5 = str(tmp_path / "t5.safetensors")
    save_file({k: v.clone() for k, v in components["text_encoder_3"].state_dict().items()}, t5)
    caplog.set_level(logging.INFO, logger="kiln")
    model = load_sd3_model(by_kiln, dtype=torch.float32, t5xxl=t5)
    _assert_same_weights(model.t5xxl.state_dict(), components["text_encoder_3"].state_dict(), "--t5xxl")
    assert [r.getMessage() for r in caplog.records if r.name == "kiln" and "--t5xxl" in r.getMessage()]
    import shutil

    shutil.rmtree(os.path.join(by_kiln, "text_encoder_3"))
    with pytest.raises(ModelLoadError, match="--t5xxl"):
        load_sd3_model(by_kiln)


def test_builtins(tmp_path):
    from library.flux_models import load_flux_model
    from library.sd3_models import load_sd3_model
    from library.sd_models import load_sd_model
    from library.sdxl_models import load_sdxl_model
    from library.tiny_models import BUILTIN_FAMILY, BUILTIN_MODELS, TINY_SD3_VARIANT

    assert set(TINY_SD3_VARIANT) == {"kiln-tiny-sd3", "kiln-tiny-sd3.5-medium", "kiln-tiny-sd3.5-large"}
    assert set(TINY_SD3_VARIANT.values()) == set(SD3_VARIANTS)
    for name, variant in TINY_SD3_VARIANT.items():
        assert name in BUILTIN_MODELS and BUILTIN_FAMILY[name] == "sd3"
        model = load_sd3_model(name, dtype=torch.float32)
        assert model.variant == variant and model.source == name
        assert model.transformer.config.pos_embed_max_size == tiny_sd3_transformer_config(variant)["pos_embed_max_size"]
        assert model.vae.config.latent_channels == 16 and model.vae.config.scaling_factor == 1.5305
        assert model.clip_l.config.hidden_size != model.clip_g.config.hidden_size
        # the variant comes back from the weights alone, and the single file loads into the same model
        path = str(tmp_path / f"{name}.safetensors")
        save_sd3_single_file(path, model.transformer, model.vae, model.clip_l, model.clip_g, model.t5xxl)
        assert detect_sd3_variant(read_key_shapes(path)) == variant
        again = load_sd3_model(path, dtype=torch.float32)
        for part in PARTS:
            _assert_same_weights(getattr(again, part).state_dict(), getattr(model, part).state_dict(), f"{name} {part}")
    # deterministic
    a, b = load_sd3_model("kiln-tiny-sd3"), load_sd3_model("kiln-tiny-sd3")
    _assert_same_weights(a.transformer.state_dict(), b.transformer.state_dict(), "seeded")

    for load in (load_sd_model, load_sdxl_model, load_flux_model):
        with pytest.raises(ModelLoadError, match=r"SD3.*sd3_train_network\.py"):
            load("kiln-tiny-sd3.5-large")
    for other, script in (("kiln-tiny-flux", "flux_train_network.py"), ("kiln-tiny-sdxl", "sdxl_train_network.py"),
                          ("kiln-tiny-sd", "train_network.py")):
        with pytest.raises(ModelLoadError, match=script):
            load_sd3_model(other)
    with pytest.raises(ModelLoadError, match="not found"):
        load_sd3_model(str(tmp_path / "missing.safetensors"))


def test_tokenizers_from_a_cache_dir(tmp_path, monkeypatch):
    import library.model_files as mf
    from library.sd3_models import load_sd3_model, load_sd3_tokenizers
    from library.tiny_models import write_tiny_clip_tokenizer, write_tiny_t5_tokenizer

    monkeypatch.setattr(mf, "hf_cache_folder", lambda hub_id, subfolder: None)  # whatever this machine has cached
    monkeypatch.setattr(mf, "hf_cache_t5_folder", lambda: None)
    cache = tmp_path / "tokenizers"
    folders = {
        "clip_l": str(cache / "openai_clip-vit-large-patch14"),
        "clip_g": str(cache / "laion_CLIP-ViT-bigG-14-laion2B-39B-b160k"),
        "t5": str(cache / "google_t5-v1_1-xxl"),
    }
    real_vocabs = (49408, 49408, 32128)  # not kiln's tiny vocabularies: no built-in fallback
    os.makedirs(cache)
    for wanted in folders.values():
        with pytest.raises(ModelLoadError) as e:
            load_sd3_tokenizers(str(cache), *real_vocabs)
        assert wanted in str(e.value) and "kiln does not download" in str(e.value)
        if "t5" in wanted:
            write_tiny_t5_tokenizer(wanted)
        else:
            write_tiny_clip_tokenizer(wanted)
    clip_l, clip_g, t5 = load_sd3_tokenizers(str(cache), *real_vocabs)
    assert (clip_l.name_or_path, clip_g.name_or_path, t5.name_or_path) == tuple(folders.values())
    assert clip_g.pad_token == "!" and clip_g.pad_token_id == 0 and clip_l.pad_token == "<|endoftext|>"

    # the loader takes a single file's tokenizers from the cache dir
    path = str(tmp_path / "sd3.safetensors")
    save_sd3_single_file(path, _tiny_transformer("sd3-medium"), **_tiny_parts())
    model = load_sd3_model(path, tokenizer_cache_dir=str(cache))
    names = (model.clip_l_tokenizer.name_or_path, model.clip_g_tokenizer.name_or_path, model.t5_tokenizer.name_or_path)
    assert names == tuple(folders.values())
    assert model.t5_tokenizer(PROMPT).input_ids == t5(PROMPT).input_ids
