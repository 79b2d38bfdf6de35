"""SDXL model files: diffusers folders, original (sgm) single files checked against diffusers' own loaders, pickles
through weights_only, other families refused, tokenizers, the sgm LoRA name map and config inference at real size."""

from __future__ import annotations

import os

import pytest
import torch

from library import model_files, sd_models, sdxl_models
from library.model_files import save_diffusers_folder
from library.sd_models import ModelLoadError, load_sd_model, save_sd_single_file
from library.sdxl_models import SDXLModel, load_sdxl_model, save_sdxl_single_file, sdxl_unet_lora_name_map
from library.tiny_models import (
    TINY_SD,
    TINY_SD2,
    TINY_SDXL,
    build_tiny_sd,
    build_tiny_sdxl,
    tiny_vae_config,
    write_tiny_clip_tokenizer,
)

PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")


def assert_same_params(a: torch.nn.Module, b: torch.nn.Module, what: str = "") -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys(), f"{what}: keys differ: {sorted(set(sa) ^ set(sb))[:5]}"
    for k in sa:
        assert sa[k].shape == sb[k].shape, f"{what}: {k} shape {sa[k].shape} != {sb[k].shape}"
        assert torch.equal(sa[k], sb[k]), f"{what}: {k} differs"


def assert_same_model(got, want: dict, what: str) -> None:
    for part in PARTS:
        assert_same_params(getattr(got, part), want[part], f"{what}: {part}")


class Tiny:
    """The tiny SDXL saved as a diffusers folder and as a kiln-written single file, with a tokenizer cache folder."""

    def __init__(self, root):
        self.parts = build_tiny_sdxl()
        self.folder = str(root / "diffusers")
        save_diffusers_folder(self.parts, self.folder)
        self.single = str(root / "model.safetensors")
        p = self.parts
        save_sdxl_single_file(
            self.single, (p["text_encoder"], p["text_encoder_2"], p["vae"], p["unet"]), metadata={"kiln.test": "1"}
        )
        # sd-scripts' --tokenizer_cache_dir layout; the bigG files pad with eos here: kiln must still pad with "!"
        self.tokenizers = str(root / "tokenizers")
        write_tiny_clip_tokenizer(model_files.hub_cache_folder(self.tokenizers, model_files.CLIP_L_HUB_ID))
        write_tiny_clip_tokenizer(model_files.hub_cache_folder(self.tokenizers, model_files.CLIP_BIGG_HUB_ID))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return Tiny(tmp_path_factory.mktemp("sdxl"))


@pytest.fixture(scope="module")
def loaded(tiny):
    return load_sdxl_model(tiny.single, tokenizer_cache_dir=tiny.tokenizers)


@torch.no_grad()
def outputs(model) -> dict[str, torch.Tensor]:
    """U-Net (with SDXL's added conditioning), both text encoders (penultimate states as SDXL uses them, last states,
    encoder 2's projected pooled output) and the VAE, on fixed inputs."""
    g = torch.Generator().manual_seed(0)
    unet, te1, te2, vae = model.unet, model.text_encoder, model.text_encoder_2, model.vae
    latents = torch.randn(2, unet.config.in_channels, 16, 16, generator=g)
    context = torch.randn(2, 7, unet.config.cross_attention_dim, generator=g)
    pooled = torch.randn(2, te2.config.projection_dim, generator=g)
    time_ids = torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0], [832.0, 1216.0, 16.0, 32.0, 896.0, 1152.0]])
    ids = torch.randint(0, te1.config.vocab_size, (2, 12), generator=g)
    ids[:, -1] = te1.config.eos_token_id
    image = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    out2 = te2(ids, output_hidden_states=True)
    return {
        "unet": unet(
            latents, torch.tensor([10, 500]), context, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}
        ).sample,
        "te1": te1(ids, output_hidden_states=True).hidden_states[-2],
        "te1_last": te1(ids).last_hidden_state,
        "te2": out2.hidden_states[-2],
        "te2_last": out2.last_hidden_state,
        "te2_text_embeds": out2.text_embeds,
        "vae_enc": vae.encode(image).latent_dist.mean,
        "vae_dec": vae.decode(latents[:1, :, :4, :4]).sample,
    }


@pytest.fixture(scope="module")
def want(tiny):
    return outputs(SDXLModel(source="", tokenizer=None, tokenizer_2=None, **{p: tiny.parts[p] for p in PARTS}))


# ---------------------------------------------------------------------------------------------------------------------
# the tiny model's conventions
# ---------------------------------------------------------------------------------------------------------------------


def test_tiny_sdxl_follows_real_conventions(tiny):
    unet, te1, te2 = tiny.parts["unet"].config, tiny.parts["text_encoder"].config, tiny.parts["text_encoder_2"].config
    assert unet.cross_attention_dim == te1.hidden_size + te2.hidden_size
    assert unet.projection_class_embeddings_input_dim == 6 * unet.addition_time_embed_dim + te2.projection_dim
    assert unet.addition_embed_type == "text_time" and unet.use_linear_projection
    for level, channels in enumerate(unet.block_out_channels):
        if "CrossAttn" in unet.down_block_types[level]:
            assert channels // unet.attention_head_dim[level] == 64  # 64-wide heads
    assert te1.hidden_size // te1.num_attention_heads == 64 and te2.hidden_size // te2.num_attention_heads == 64
    assert (te1.hidden_act, te2.hidden_act) == ("quick_gelu", "gelu")
    assert te1.hidden_size != te2.hidden_size  # lets diffusers' single-file loader tell the two encoders apart
    assert tiny.parts["tokenizer"].pad_token == "<|endoftext|>"
    assert tiny.parts["tokenizer_2"].pad_token == "!" and tiny.parts["tokenizer_2"].pad_token_id == 0 == te2.pad_token_id


# ---------------------------------------------------------------------------------------------------------------------
# diffusers folders and the built-in name
# ---------------------------------------------------------------------------------------------------------------------


def test_diffusers_folder_round_trip(tiny):
    import json

    with open(os.path.join(tiny.folder, "model_index.json")) as f:
        index = json.load(f)
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    assert index["tokenizer_2"] == ["transformers", "CLIPTokenizer"]

    model = load_sdxl_model(tiny.folder)
    assert isinstance(model, SDXLModel) and model.source == tiny.folder
    assert_same_model(model, tiny.parts, "folder")
    for name in ("tokenizer", "tokenizer_2"):
        assert getattr(model, name).get_vocab() == tiny.parts[name].get_vocab()
        assert getattr(model, name).pad_token == tiny.parts[name].pad_token


def test_diffusers_folder_read_by_diffusers(tiny):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny.folder, local_files_only=True)
    assert_same_params(pipe.text_encoder_2, tiny.parts["text_encoder_2"], "text encoder 2")
    assert pipe.tokenizer_2.pad_token == "!"


def test_builtin_name():
    model = load_sdxl_model(TINY_SDXL, dtype=torch.bfloat16)
    assert model.source == TINY_SDXL
    assert {p.dtype for part in PARTS for p in getattr(model, part).parameters()} == {torch.bfloat16}
    reference = build_tiny_sdxl()
    assert_same_params(model.text_encoder_2, reference["text_encoder_2"].to(torch.bfloat16), "text encoder 2")
    assert model.tokenizer_2.pad_token == "!"


# ---------------------------------------------------------------------------------------------------------------------
# single files: diffusers' own loaders as the oracle of kiln's writer
# ---------------------------------------------------------------------------------------------------------------------


def test_single_file_read_by_diffusers_pipeline(tiny):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_single_file(tiny.single, config=tiny.folder, local_files_only=True)
    for part in PARTS:
        assert_same_params(getattr(pipe, part), tiny.parts[part], f"{part} (diffusers from_single_file)")


def test_single_file_read_by_kiln(tiny, loaded, want):
    model = loaded
    assert model.source == tiny.single
    assert_same_model(model, tiny.parts, "single file")
    for part in ("unet", "text_encoder", "text_encoder_2"):
        got_config, want_config = getattr(model, part).config, tiny.parts[part].config
        keys = (
            sdxl_models._UNET_SHAPE_KEYS
            + ("addition_time_embed_dim", "projection_class_embeddings_input_dim", "addition_embed_type")
            if part == "unet"
            else (
                "hidden_size",
                "num_attention_heads",
                "num_hidden_layers",
                "hidden_act",
                "projection_dim",
                "pad_token_id",
                "eos_token_id",
            )
        )
        for key in keys:
            got, exp = getattr(got_config, key, None), getattr(want_config, key, None)
            assert (list(got) if isinstance(got, tuple) else got) == (list(exp) if isinstance(exp, tuple) else exp), (part, key)
    assert model.vae.config.scaling_factor == 0.13025
    for name in ("tokenizer", "tokenizer_2"):
        assert getattr(model, name).get_vocab() == tiny.parts[name].get_vocab()
    assert model.tokenizer.pad_token == "<|endoftext|>"
    assert model.tokenizer_2.pad_token == "!" and model.tokenizer_2.pad_token_id == 0

    got = outputs(model)
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_single_file_resave_is_identical(tiny, loaded, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    again = str(tmp_path / "again.safetensors")
    save_sdxl_single_file(again, loaded)
    a, b = load_file(tiny.single), load_file(again)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    with safe_open(tiny.single, "pt") as f:
        assert f.metadata() == {"kiln.test": "1"}
    assert os.listdir(tmp_path) == ["again.safetensors"]  # no temporary file left behind


def test_single_file_layout(tiny):
    from safetensors.torch import load_file

    state = load_file(tiny.single)
    assert sd_models.detect_family(sd_models.read_key_shapes(tiny.single)) == "sdxl"
    prefixes = {k.split(".")[0] for k in state}
    assert prefixes == {"model", "first_stage_model", "conditioner"}
    te1, te2 = tiny.parts["text_encoder"], tiny.parts["text_encoder_2"]
    h1, h2 = te1.config.hidden_size, te2.config.hidden_size
    u = sd_models.UNET_PREFIX
    assert state[u + "label_emb.0.0.weight"].shape[1] == tiny.parts["unet"].config.projection_class_embeddings_input_dim
    assert state[u + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"].shape == (64, h1 + h2)
    p1 = "conditioner.embedders.0.transformer.text_model."
    assert torch.equal(
        state[p1 + "encoder.layers.0.self_attn.q_proj.weight"], te1.state_dict()["encoder.layers.0.self_attn.q_proj.weight"]
    )
    p2 = "conditioner.embedders.1.model."
    layers = model_files.key_indices(state, p2 + "transformer.resblocks.")
    assert layers == list(range(te2.config.num_hidden_layers))  # all layers, no SD2-style extra one
    assert state[p2 + "transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * h2, h2)
    assert state[p2 + "positional_embedding"].shape == (77, h2)
    # OpenCLIP applies x @ text_projection: the transpose of transformers' Linear weight
    assert torch.equal(state[p2 + "text_projection"], te2.text_projection.weight.T)
    assert state[p2 + "logit_scale"].shape == ()
    names = sd_models.unet_ldm_param_names(tiny.parts["unet"])
    assert {u + v for v in names.values()} == {k for k in state if k.startswith(u)}


def test_save_dtype_and_ckpt(tiny, loaded, want, tmp_path):
    from safetensors.torch import load_file

    half = str(tmp_path / "half.safetensors")
    save_sdxl_single_file(half, loaded, dtype=torch.float16)
    assert {v.dtype for v in load_file(half).values()} == {torch.float16}
    model = load_sdxl_model(half, tokenizer_cache_dir=tiny.tokenizers, dtype=torch.bfloat16)
    assert {p.dtype for part in PARTS for p in getattr(model, part).parameters()} == {torch.bfloat16}

    ckpt = str(tmp_path / "model.ckpt")
    save_sdxl_single_file(ckpt, loaded)
    assert isinstance(torch.load(ckpt, weights_only=True)["state_dict"], dict)
    model = load_sdxl_model(ckpt, tokenizer_cache_dir=tiny.tokenizers)
    assert_same_model(model, tiny.parts, ".ckpt")

    with pytest.raises(ValueError, match="unsupported file type"):
        save_sdxl_single_file(str(tmp_path / "model.txt"), loaded)
    with pytest.raises(TypeError, match="strings"):
        save_sdxl_single_file(str(tmp_path / "m.safetensors"), loaded, metadata={"steps": 3})


def test_pickle_needing_unpickling_is_refused(tmp_path):
    path = str(tmp_path / "evil.ckpt")
    torch.save({"state_dict": {"model.diffusion_model.label_emb.0.0.weight": torch.zeros(1)}, "obj": object()}, path)
    with pytest.raises(ModelLoadError, match="unpickl"):
        load_sdxl_model(path)


# ---------------------------------------------------------------------------------------------------------------------
# other families, incomplete files, --vae
# ---------------------------------------------------------------------------------------------------------------------

FAMILY_KEYS = {
    "sd3": ["model.diffusion_model.joint_blocks.0.context_block.adaLN_modulation.1.bias"],
    "flux": ["double_blocks.0.img_attn.norm.key_norm.scale"],
}


def test_other_families_refused(tiny, tmp_path):
    from safetensors.torch import save_file

    for v2, script in ((False, r"use train_network\.py for"), (True, r"use train_network\.py --v2 for")):
        parts = build_tiny_sd(v2=v2)
        single = str(tmp_path / f"sd{2 if v2 else 1}.safetensors")
        save_sd_single_file(single, (parts["text_encoder"], parts["vae"], parts["unet"]), v2=v2)
        with pytest.raises(ModelLoadError, match=script) as err:
            load_sdxl_model(single)
        assert single in str(err.value)
        folder = str(tmp_path / f"sd{2 if v2 else 1}_folder")
        save_diffusers_folder(parts, folder)
        with pytest.raises(ModelLoadError, match=script):
            load_sdxl_model(folder)
    for name in (TINY_SD, TINY_SD2):
        with pytest.raises(ModelLoadError, match="train_network.py"):
            load_sdxl_model(name)
    for family, keys in FAMILY_KEYS.items():
        path = str(tmp_path / f"{family}.safetensors")
        save_file({k: torch.zeros(1) for k in keys}, path)
        with pytest.raises(ModelLoadError, match=f"{family}_train_network.py"):
            load_sdxl_model(path)
        pt = str(tmp_path / f"{family}.pt")
        torch.save({k: torch.zeros(1) for k in keys}, pt)
        with pytest.raises(ModelLoadError, match=f"{family}_train_network.py"):
            load_sdxl_model(pt)
    unknown = str(tmp_path / "unet.safetensors")
    save_file({"down_blocks.0.resnets.0.conv1.weight": torch.zeros(1)}, unknown)
    with pytest.raises(ModelLoadError, match="not an SDXL checkpoint"):
        load_sdxl_model(unknown)

    # and the SD loader sends SDXL to its script
    with pytest.raises(ModelLoadError, match="sdxl_train_network.py"):
        load_sd_model(tiny.single)
    with pytest.raises(ModelLoadError, match="sdxl_train_network.py"):
        load_sd_model(tiny.folder)
    with pytest.raises(ModelLoadError, match="sdxl_train_network.py"):
        load_sd_model(TINY_SDXL)


def test_missing_path(tmp_path):
    missing = str(tmp_path / "nowhere" / "model.safetensors")
    with pytest.raises(ModelLoadError, match="not found") as err:
        load_sdxl_model(missing)
    assert missing in str(err.value)
    with pytest.raises(ModelLoadError, match="VAE not found"):
        load_sdxl_model(TINY_SDXL, vae=missing)


def test_incomplete_files(tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    state = load_file(tiny.single)

    def write(name, keep):
        path = str(tmp_path / name)
        save_file({k: v for k, v in state.items() if keep(k)}, path)
        return path

    no_vae = write("novae.safetensors", lambda k: not k.startswith(sd_models.VAE_PREFIX))
    with pytest.raises(ModelLoadError, match="--vae"):
        load_sdxl_model(no_vae, tokenizer_cache_dir=tiny.tokenizers)
    no_te2 = write("note2.safetensors", lambda k: not k.startswith(sdxl_models.TE2_PREFIX))
    with pytest.raises(ModelLoadError, match="text encoder"):
        load_sdxl_model(no_te2, tokenizer_cache_dir=tiny.tokenizers)
    refiner = str(tmp_path / "refiner.safetensors")
    save_file(
        {
            **{k: v for k, v in state.items() if k.startswith(("model.", "first_stage_model."))},
            **{k.replace("embedders.1.", "embedders.0."): v for k, v in state.items() if k.startswith(sdxl_models.TE2_PREFIX)},
        },
        refiner,
    )
    with pytest.raises(ModelLoadError, match="refiner"):
        load_sdxl_model(refiner)
    unet_only = write("unet_only.safetensors", lambda k: k.startswith(sd_models.UNET_PREFIX))
    with pytest.raises(ModelLoadError, match="full SDXL checkpoint"):
        load_sdxl_model(unet_only)


def test_vae_override(tiny, tmp_path):
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file

    torch.manual_seed(123)
    other = AutoencoderKL(**tiny_vae_config())
    single = str(tmp_path / "sdxl_vae.safetensors")
    save_file({k: v.contiguous() for k, v in sd_models.vae_to_ldm_state_dict(other).items()}, single)
    model = load_sdxl_model(tiny.single, tokenizer_cache_dir=tiny.tokenizers, vae=single)
    assert_same_params(model.vae, other, "--vae single file")
    assert model.vae.config.scaling_factor == 0.13025  # SDXL's, not SD's 0.18215
    assert_same_params(model.unet, tiny.parts["unet"], "unet")
    folder = str(tmp_path / "vae_folder")
    other.save_pretrained(folder)
    model = load_sdxl_model(tiny.folder, vae=folder)
    assert_same_params(model.vae, other, "--vae folder")


# ---------------------------------------------------------------------------------------------------------------------
# tokenizers
# ---------------------------------------------------------------------------------------------------------------------


def test_tokenizer_sources(tmp_path, monkeypatch):
    # kiln's tiny vocabulary gets the built-in tokenizers when none is given; the second pads with "!"
    tok1, tok2 = sdxl_models.load_sdxl_tokenizers(None, 514, 514)
    assert tok1.pad_token == "<|endoftext|>" and tok2.pad_token == "!" and tok2.pad_token_id == 0
    # a tokenizer directly in --tokenizer_cache_dir serves both; the second still pads with "!"
    write_tiny_clip_tokenizer(str(tmp_path / "direct"))
    tok1, tok2 = sdxl_models.load_sdxl_tokenizers(str(tmp_path / "direct"), 49408, 49408)
    assert len(tok1) == len(tok2) == 514 and tok2.pad_token == "!"

    # a real-size model with no tokenizer anywhere: the error names the folder to fill
    monkeypatch.setattr(model_files, "hf_cache_folder", lambda hub_id, subfolder: None)
    empty = str(tmp_path / "empty")
    with pytest.raises(ModelLoadError) as err:
        sdxl_models.load_sdxl_tokenizers(empty, 49408, 49408)
    assert os.path.join(empty, "openai_clip-vit-large-patch14") in str(err.value)
    write_tiny_clip_tokenizer(os.path.join(empty, "openai_clip-vit-large-patch14"))
    with pytest.raises(ModelLoadError) as err:
        sdxl_models.load_sdxl_tokenizers(empty, 49408, 49408)
    assert os.path.join(empty, "laion_CLIP-ViT-bigG-14-laion2B-39B-b160k") in str(err.value)
    with pytest.raises(ModelLoadError, match="tokenizer_cache_dir"):
        sdxl_models.load_sdxl_tokenizers(None, 49408, 49408)


# ---------------------------------------------------------------------------------------------------------------------
# LoRA names: the real SDXL base U-Net (meta device, no weights) against hand-written sgm names
# ---------------------------------------------------------------------------------------------------------------------

SDXL_LORA_PAIRS = {
    "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": "input_blocks.4.1.transformer_blocks.0.attn1.to_q",
    "down_blocks.1.attentions.0.proj_in": "input_blocks.4.1.proj_in",
    "down_blocks.1.attentions.1.transformer_blocks.1.attn2.to_out.0": "input_blocks.5.1.transformer_blocks.1.attn2.to_out.0",
    "down_blocks.2.attentions.0.transformer_blocks.9.ff.net.0.proj": "input_blocks.7.1.transformer_blocks.9.ff.net.0.proj",
    "down_blocks.2.attentions.1.proj_out": "input_blocks.8.1.proj_out",
    "down_blocks.0.resnets.0.conv1": "input_blocks.1.0.in_layers.2",
    "down_blocks.1.resnets.0.conv_shortcut": "input_blocks.4.0.skip_connection",
    "down_blocks.1.downsamplers.0.conv": "input_blocks.6.0.op",
    "mid_block.attentions.0.proj_in": "middle_block.1.proj_in",
    "mid_block.attentions.0.transformer_blocks.0.attn1.to_k": "middle_block.1.transformer_blocks.0.attn1.to_k",
    "mid_block.resnets.1.time_emb_proj": "middle_block.2.emb_layers.1",
    "up_blocks.0.attentions.0.proj_in": "output_blocks.0.1.proj_in",
    "up_blocks.0.attentions.2.transformer_blocks.9.attn2.to_v": "output_blocks.2.1.transformer_blocks.9.attn2.to_v",
    "up_blocks.0.upsamplers.0.conv": "output_blocks.2.2.conv",
    "up_blocks.1.attentions.0.transformer_blocks.1.ff.net.2": "output_blocks.3.1.transformer_blocks.1.ff.net.2",
    "up_blocks.1.attentions.2.proj_out": "output_blocks.5.1.proj_out",
    "up_blocks.2.resnets.2.conv2": "output_blocks.8.0.out_layers.3",
    "add_embedding.linear_1": "label_emb.0.0",
    "time_embedding.linear_2": "time_embed.2",
}


@pytest.fixture(scope="module")
def real_unet():
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    with init_empty_weights():
        return UNet2DConditionModel(**sdxl_models.reference_config("unet"))


def test_lora_name_map_real_sdxl(real_unet):
    names = sdxl_unet_lora_name_map(real_unet)
    for diffusers_name, sgm in SDXL_LORA_PAIRS.items():
        assert names[diffusers_name] == sgm, diffusers_name
    kohya = {f"lora_unet_{names[n]}".replace(".", "_") for n in SDXL_LORA_PAIRS}
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in kohya
    assert "lora_unet_middle_block_1_proj_in" in kohya
    assert "lora_unet_output_blocks_0_1_proj_in" in kohya
    # every LoRA target (Linear / Conv2d of the U-Net) has exactly one sgm name
    targets = [n for n, m in real_unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    mapped = [names[n] for n in targets]
    assert len(set(mapped)) == len(mapped)
    assert sdxl_unet_lora_name_map(sdxl_models.reference_config("unet")) == names  # from the config alone


def test_lora_name_map_tiny_matches_real_numbering(tiny, real_unet):
    """The tiny SDXL has the real block numbering: its names are a subset of the real model's."""
    tiny_names = set(sdxl_unet_lora_name_map(tiny.parts["unet"]).values())
    real_names = set(sdxl_unet_lora_name_map(real_unet).values())
    assert "input_blocks.4.1.transformer_blocks.0.attn1.to_q" in tiny_names
    assert tiny_names <= real_names


def test_lora_names_read_by_diffusers(tiny):
    """diffusers' kohya-LoRA loader puts a file with kiln's sgm names on the modules they came from."""
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import save_file

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny.folder, local_files_only=True)
    names = sdxl_unet_lora_name_map(pipe.unet)
    modules = dict(pipe.unet.named_modules())
    targets = [
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
        "down_blocks.2.attentions.1.transformer_blocks.1.attn2.to_k",
        "mid_block.attentions.0.proj_in",
        "up_blocks.0.attentions.0.proj_in",
        "up_blocks.1.attentions.2.transformer_blocks.0.ff.net.2",
    ]
    g = torch.Generator().manual_seed(0)
    lora, expected = {}, {}
    rank, alpha = 2, 1.0
    for target in targets:
        weight = modules[target].weight
        down, up = torch.randn(rank, weight.shape[1], generator=g), torch.randn(weight.shape[0], rank, generator=g)
        key = f"lora_unet_{names[target]}".replace(".", "_")
        lora.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(alpha)})
        expected[target] = weight.detach() + alpha / rank * up @ down
    untouched = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k"
    before = modules[untouched].weight.detach().clone()
    path = os.path.join(os.path.dirname(tiny.single), "lora.safetensors")
    save_file(lora, path)
    pipe.load_lora_weights(path)
    pipe.fuse_lora()
    modules = dict(pipe.unet.named_modules())
    weight = lambda m: (m.base_layer if hasattr(m, "base_layer") else m).weight  # noqa: E731
    for target in targets:
        assert torch.allclose(weight(modules[target]), expected[target], atol=1e-6), target
    assert torch.equal(weight(modules[untouched]), before)


# ---------------------------------------------------------------------------------------------------------------------
# config inference at real size (no weights: meta tensors)
# ---------------------------------------------------------------------------------------------------------------------

NOT_FROM_SHAPES = {"sample_size", "bos_token_id", "eos_token_id", "pad_token_id"}


def test_real_configs_inferred_from_shapes(real_unet):
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    ref = {c: sdxl_models.reference_config(c) for c in PARTS}
    with init_empty_weights():
        vae = AutoencoderKL(**ref["vae"])
        te1 = CLIPTextModel(CLIPTextConfig(**ref["text_encoder"]))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**ref["text_encoder_2"]))
    state = sdxl_models.sdxl_to_sgm_state_dict(te1, te2, vae, real_unet)
    assert sd_models.detect_family(state) == "sdxl"
    assert model_files.key_indices(state, sdxl_models.TE2_PREFIX + "transformer.resblocks.") == list(range(32))
    assert state["model.diffusion_model.label_emb.0.0.weight"].shape == (1280, 2816)
    inferred = sdxl_models.infer_sdxl_single_file_configs(state)
    for component, config in ref.items():
        for key, value in config.items():
            if key not in NOT_FROM_SHAPES:
                assert inferred[component][key] == value, (component, key)
    assert inferred["text_encoder_2"]["pad_token_id"] == 0 and inferred["text_encoder_2"]["hidden_act"] == "gelu"

    # the full conversion path at real size, still without weights
    te2b = sdxl_models.text_encoder_2_from_sgm(state)
    rebuilt = {
        "unet": sdxl_models.unet_from_sgm(state, te2b.config.projection_dim),
        "text_encoder": sdxl_models.text_encoder_1_from_sgm(state),
        "text_encoder_2": te2b,
        "vae": model_files.vae_from_state_dict(state, reference=sdxl_models.SDXL_VAE),
    }
    for name, original in (("unet", real_unet), ("text_encoder", te1), ("text_encoder_2", te2), ("vae", vae)):
        sa, sb = original.state_dict(), rebuilt[name].state_dict()
        assert sa.keys() == sb.keys() and all(sa[k].shape == sb[k].shape for k in sa), name
