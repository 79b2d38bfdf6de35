"""SD3 / SD3.5 model files: SAI single-file layout <-> diffusers, config inference, variants, bundled parts, errors.

The independent oracle is diffusers' own single-file loader (`from_single_file` with a local config folder, offline):
it reads the files kiln writes into the same weights, and the same model outputs, as the models they came from.
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
    TINY_SD3_CLIP_G_WIDTH,
    TINY_SD3_CLIP_L_WIDTH,
    TINY_SD3_T5_WIDTH,
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

TINY_CLIP_VOCAB = 514  # kiln's tiny CLIP tokenizer's vocabulary
TINY_T5_VOCAB = 384


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
    """Tiny SD3-style VAE (16 channels, SD3 factors), CLIP-L, CLIP-G (another width) and T5 encoder."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    torch.manual_seed(seed)

    def clip(width: int, act: str, pad: int):
        return CLIPTextModelWithProjection(
            CLIPTextConfig(
                vocab_size=TINY_CLIP_VOCAB, hidden_size=width, intermediate_size=37, num_hidden_layers=2,
                num_attention_heads=width // 64, max_position_embeddings=77, projection_dim=width,
                bos_token_id=TINY_CLIP_VOCAB - 2, eos_token_id=TINY_CLIP_VOCAB - 1, pad_token_id=pad, hidden_act=act,
            )
        ).eval()

    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[32, 32, 64, 64], layers_per_block=1, latent_channels=16, norm_num_groups=32, sample_size=1024,
        scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False, force_upcast=True,
    ).eval()
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=TINY_T5_VOCAB, d_model=TINY_SD3_T5_WIDTH, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
            relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", dropout_rate=0.0, is_encoder_decoder=False,
            use_cache=False, tie_word_embeddings=False,
        )
    ).eval()
    return {
        "vae": vae,
        "clip_l": clip(TINY_SD3_CLIP_L_WIDTH, "quick_gelu", TINY_CLIP_VOCAB - 1),
        "clip_g": clip(TINY_SD3_CLIP_G_WIDTH, "gelu", 0),
        "t5xxl": t5,
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
    from library.sd3_models import clip_from_sai, t5_from_sai

    parts = _tiny_parts()
    clip_l = {k: v for k, v in parts["clip_l"].state_dict().items() if k != "text_projection.weight"}
    model = clip_from_sai(clip_l, "clip_l", torch.float32)
    assert torch.equal(model.text_projection.weight, torch.eye(TINY_SD3_CLIP_L_WIDTH))
    for drop in ("encoder.embed_tokens.weight", "shared.weight"):
        t5 = {k: v for k, v in parts["t5xxl"].state_dict().items() if k != drop}
        _assert_same_weights(t5_from_sai(t5, torch.float32).state_dict(), parts["t5xxl"].state_dict(), f"T5 without {drop}")


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
