"""SD 1.x/2.x model files: diffusers folders, original single files (kiln's writer checked against diffusers' own
loaders), pickles through weights_only, family detection, the diffusers -> LDM name maps and config inference."""

from __future__ import annotations

import os

import pytest
import torch

from library import ldm_names, model_files, sd_models
from library.model_files import save_diffusers_folder
from library.sd_models import ModelLoadError, SDModel, load_sd_model, save_sd_single_file
from library.tiny_models import (
    TINY_SD,
    TINY_SD2,
    build_tiny_sd,
    tiny_vae_config,
    write_tiny_clip_tokenizer,
)


def assert_same_params(a: torch.nn.Module, b: torch.nn.Module, what: str = "") -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys(), f"{what}: keys differ: {sorted(set(sa) ^ set(sb))[:5]}"
    for k in sa:
        assert sa[k].shape == sb[k].shape, f"{what}: {k} shape {sa[k].shape} != {sb[k].shape}"
        assert torch.equal(sa[k], sb[k]), f"{what}: {k} differs"


class Tiny:
    """A tiny SD model saved as a diffusers folder and as a kiln-written single file."""

    def __init__(self, root, v2: bool):
        self.v2 = v2
        self.parts = build_tiny_sd(v2=v2)
        self.text_encoder, self.vae, self.unet = self.parts["text_encoder"], self.parts["vae"], self.parts["unet"]
        self.folder = str(root / "diffusers")
        save_diffusers_folder(self.parts, self.folder)
        self.single = str(root / "model.safetensors")
        save_sd_single_file(self.single, (self.text_encoder, self.vae, self.unet), v2=v2, metadata={"kiln.test": "1"})
        self.tokenizers = str(root / "tokenizers")
        tok_folder = sd_models.tokenizer_cache_folder(self.tokenizers, v2)
        write_tiny_clip_tokenizer(
            os.path.join(tok_folder, "tokenizer") if v2 else tok_folder, pad_token="!" if v2 else "<|endoftext|>"
        )


@pytest.fixture(scope="module", params=[False, True], ids=["sd1", "sd2"])
def tiny(request, tmp_path_factory):
    return Tiny(tmp_path_factory.mktemp("sd2" if request.param else "sd1"), request.param)


@pytest.fixture(scope="module")
def tiny1(tmp_path_factory):
    return Tiny(tmp_path_factory.mktemp("sd1only"), False)


def fixed_inputs(model_parts, seed=0):
    g = torch.Generator().manual_seed(seed)
    unet, te = model_parts
    latents = torch.randn(2, unet.config.in_channels, 16, 16, generator=g)
    context = torch.randn(2, 5, unet.config.cross_attention_dim, generator=g)
    ids = torch.randint(0, te.config.vocab_size, (2, 12), generator=g)
    image = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    return latents, context, ids, image


@torch.no_grad()
def outputs(text_encoder, vae, unet):
    latents, context, ids, image = fixed_inputs((unet, text_encoder))
    return {
        "unet": unet(latents, torch.tensor([10, 500]), context).sample,
        "te": text_encoder(ids, output_hidden_states=True).hidden_states[-2],
        "te_last": text_encoder(ids).last_hidden_state,
        "vae_enc": vae.encode(image).latent_dist.mean,
        "vae_dec": vae.decode(latents[:1, :, :4, :4]).sample,
    }


# ---------------------------------------------------------------------------------------------------------------------
# diffusers folders and built-in names
# ---------------------------------------------------------------------------------------------------------------------


def test_diffusers_folder_round_trip(tiny):
    model = load_sd_model(tiny.folder, v2=tiny.v2)
    assert isinstance(model, SDModel) and model.v2 == tiny.v2 and model.source == tiny.folder
    assert_same_params(model.unet, tiny.unet, "unet")
    assert_same_params(model.vae, tiny.vae, "vae")
    assert_same_params(model.text_encoder, tiny.text_encoder, "text encoder")
    assert model.tokenizer.get_vocab() == tiny.parts["tokenizer"].get_vocab()
    assert model.tokenizer.pad_token == tiny.parts["tokenizer"].pad_token


def test_builtin_names():
    model = load_sd_model(TINY_SD)
    reference = build_tiny_sd(v2=False)
    assert not model.v2 and model.source == TINY_SD
    assert_same_params(model.unet, reference["unet"], "unet")
    model2 = load_sd_model(TINY_SD2, v2=True, dtype=torch.bfloat16)
    assert model2.v2 and model2.unet.dtype == torch.bfloat16 and model2.text_encoder.dtype == torch.bfloat16
    assert model2.tokenizer.pad_token == "!"


# ---------------------------------------------------------------------------------------------------------------------
# single files: diffusers' own loaders as the oracle of kiln's writer
# ---------------------------------------------------------------------------------------------------------------------


def test_single_file_read_by_diffusers(tiny):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint
    from safetensors.torch import load_file

    unet = UNet2DConditionModel.from_single_file(tiny.single, config=tiny.folder, subfolder="unet", local_files_only=True)
    assert_same_params(unet, tiny.unet, "unet (diffusers from_single_file)")
    vae = AutoencoderKL.from_single_file(tiny.single, config=tiny.folder, subfolder="vae", local_files_only=True)
    assert_same_params(vae, tiny.vae, "vae (diffusers from_single_file)")

    checkpoint = load_file(tiny.single)
    expected = tiny.text_encoder.state_dict()
    if tiny.v2:
        converted = convert_open_clip_checkpoint(tiny.text_encoder, checkpoint, prefix=sd_models.OPEN_CLIP_PREFIX)
        # The file has one extra (identity) layer for SD2's penultimate convention; diffusers' model stops before it.
        extra_layer = f"text_model.encoder.layers.{tiny.text_encoder.config.num_hidden_layers}."
        assert any(k.startswith(extra_layer) for k in converted)
        converted = {k: v for k, v in converted.items() if not k.startswith(extra_layer)}
    else:
        converted = convert_ldm_clip_checkpoint(checkpoint)
    converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    assert converted.keys() == expected.keys()
    for k in expected:
        assert torch.equal(converted[k], expected[k]), k


def test_single_file_read_by_kiln(tiny):
    model = load_sd_model(tiny.single, v2=tiny.v2, tokenizer_cache_dir=tiny.tokenizers)
    assert model.v2 == tiny.v2 and model.source == tiny.single
    assert_same_params(model.unet, tiny.unet, "unet")
    assert_same_params(model.vae, tiny.vae, "vae")
    assert_same_params(model.text_encoder, tiny.text_encoder, "text encoder")
    assert model.unet.config.attention_head_dim == tiny.unet.config.attention_head_dim
    assert model.text_encoder.config.num_attention_heads == tiny.text_encoder.config.num_attention_heads
    assert model.tokenizer.get_vocab() == tiny.parts["tokenizer"].get_vocab()
    assert model.tokenizer.pad_token == tiny.parts["tokenizer"].pad_token

    got = outputs(model.text_encoder, model.vae, model.unet)
    want = outputs(tiny.text_encoder, tiny.vae, tiny.unet)
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_single_file_resave_is_identical(tiny, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    model = load_sd_model(tiny.single, v2=tiny.v2, tokenizer_cache_dir=tiny.tokenizers)
    again = str(tmp_path / "again.safetensors")
    save_sd_single_file(again, model, v2=tiny.v2)
    a, b = load_file(tiny.single), load_file(again)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    with safe_open(tiny.single, "pt") as f:
        assert f.metadata() == {"kiln.test": "1"}
    assert os.listdir(tmp_path) == ["again.safetensors"]  # no temporary file left behind


def test_single_file_layout_details(tiny):
    shapes = sd_models.read_key_shapes(tiny.single)
    assert sd_models.detect_family(shapes) == ("sd2" if tiny.v2 else "sd1")
    attn = [k for k in shapes if ".mid.attn_1." in k and k.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight"))]
    assert len(attn) == 8 and all(len(shapes[k]) == 4 and shapes[k][2:] == (1, 1) for k in attn)
    te = tiny.text_encoder.config
    if tiny.v2:
        p = sd_models.OPEN_CLIP_PREFIX
        assert shapes[p + "transformer.resblocks.0.attn.in_proj_weight"] == (3 * te.hidden_size, te.hidden_size)
        assert shapes[p + "transformer.resblocks.0.attn.in_proj_bias"] == (3 * te.hidden_size,)
        assert shapes[p + "text_projection"] == (te.hidden_size, te.hidden_size)
        assert shapes[p + "positional_embedding"] == (77, te.hidden_size)
        layers = model_files.key_indices(shapes, p + "transformer.resblocks.")
        assert layers == list(range(te.num_hidden_layers + 1))
        assert not any(k.startswith(sd_models.CLIP_L_PREFIX) for k in shapes)
    else:
        p = sd_models.CLIP_L_PREFIX + "text_model."
        assert shapes[p + "encoder.layers.0.self_attn.q_proj.weight"] == (te.hidden_size, te.hidden_size)
        assert shapes[p + "final_layer_norm.weight"] == (te.hidden_size,)


def test_sd2_extra_layer_is_identity(tmp_path):
    """Running all of the file's OpenCLIP layers gives the penultimate states diffusers' model returns as its last."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel

    parts = build_tiny_sd(v2=True)
    te = parts["text_encoder"]
    state = sd_models.sd_to_ldm_state_dict(te, parts["vae"], parts["unet"], v2=True)
    config = CLIPTextConfig(**{**te.config.to_dict(), "num_hidden_layers": te.config.num_hidden_layers + 1})
    full = CLIPTextModel(config)
    converted = convert_open_clip_checkpoint(full, state, prefix=sd_models.OPEN_CLIP_PREFIX)
    full.load_state_dict({k.removeprefix("text_model."): v for k, v in converted.items()})
    ids = torch.randint(0, te.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(full(ids).last_hidden_state, te(ids).last_hidden_state)


def test_single_file_with_extra_keys_and_old_clip_names(tiny1, tmp_path):
    """Released SD1 files carry schedule buffers, EMA bookkeeping, CLIP position_ids; some lack `text_model.`."""
    from safetensors.torch import load_file, save_file

    state = load_file(tiny1.single)
    prefix = sd_models.CLIP_L_PREFIX + "text_model."
    state = {(sd_models.CLIP_L_PREFIX + k[len(prefix) :] if k.startswith(prefix) else k): v for k, v in state.items()}
    state[sd_models.CLIP_L_PREFIX + "embeddings.position_ids"] = torch.arange(77)[None]
    state["alphas_cumprod"] = torch.linspace(1, 0, 1000)
    state["model_ema.decay"] = torch.tensor(0.9999)
    path = str(tmp_path / "released.safetensors")
    save_file(state, path)
    model = load_sd_model(path, tokenizer_cache_dir=tiny1.tokenizers)
    assert_same_params(model.text_encoder, tiny1.text_encoder, "text encoder")
    assert_same_params(model.unet, tiny1.unet, "unet")


def test_save_dtype_and_ckpt(tiny1, tmp_path):
    from safetensors.torch import load_file

    half = str(tmp_path / "half.safetensors")
    save_sd_single_file(half, (tiny1.text_encoder, tiny1.vae, tiny1.unet), v2=False, dtype=torch.float16)
    assert {v.dtype for v in load_file(half).values()} == {torch.float16}
    model = load_sd_model(half, tokenizer_cache_dir=tiny1.tokenizers, dtype=torch.bfloat16)
    assert {p.dtype for m in (model.unet, model.vae, model.text_encoder) for p in m.parameters()} == {torch.bfloat16}

    ckpt = str(tmp_path / "model.ckpt")
    save_sd_single_file(ckpt, (tiny1.text_encoder, tiny1.vae, tiny1.unet), v2=False)
    loaded = load_sd_model(ckpt, tokenizer_cache_dir=tiny1.tokenizers)
    assert_same_params(loaded.unet, tiny1.unet, "unet from .ckpt")
    with pytest.raises(ValueError, match="safetensors"):
        save_sd_single_file(str(tmp_path / "model.onnx"), (tiny1.text_encoder, tiny1.vae, tiny1.unet), v2=False)


# ---------------------------------------------------------------------------------------------------------------------
# pickles
# ---------------------------------------------------------------------------------------------------------------------


class NotATensor:
    """Any custom class makes a pickle need full unpickling."""

    def __init__(self):
        self.value = 1


def test_ckpt_weights_only(tiny1, tmp_path):
    from safetensors.torch import load_file

    state = load_file(tiny1.single)
    path = str(tmp_path / "model.ckpt")
    torch.save({"state_dict": state, "global_step": 10}, path)
    model = load_sd_model(path, tokenizer_cache_dir=tiny1.tokenizers)
    assert_same_params(model.unet, tiny1.unet, "unet")
    assert_same_params(model.vae, tiny1.vae, "vae")
    assert_same_params(model.text_encoder, tiny1.text_encoder, "text encoder")

    bad = str(tmp_path / "evil.ckpt")
    torch.save({"state_dict": state, "callback": NotATensor()}, bad)
    with pytest.raises(ModelLoadError, match="does not unpickle") as err:
        load_sd_model(bad, tokenizer_cache_dir=tiny1.tokenizers)
    assert "evil.ckpt" in str(err.value) and "safetensors" in str(err.value)


# ---------------------------------------------------------------------------------------------------------------------
# errors: other families, missing paths, --v2
# ---------------------------------------------------------------------------------------------------------------------

FAMILY_KEYS = {
    "sdxl": [
        "conditioner.embedders.1.model.transformer.resblocks.0.mlp.c_proj.bias",
        "model.diffusion_model.label_emb.0.0.weight",
        "model.diffusion_model.input_blocks.0.0.weight",
    ],
    "sdxl_unet_only": ["model.diffusion_model.label_emb.0.0.weight", "model.diffusion_model.input_blocks.0.0.weight"],
    "sd3": ["model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight", "first_stage_model.encoder.conv_in.weight"],
    "flux": ["double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight"],
    "flux_prefixed": ["model.diffusion_model.double_blocks.0.img_attn.qkv.weight"],
}
SCRIPTS = {"sdxl": "sdxl_train_network.py", "sd3": "sd3_train_network.py", "flux": "flux_train_network.py"}


@pytest.mark.parametrize("case", list(FAMILY_KEYS))
def test_other_family_refused(case, tmp_path):
    from safetensors.torch import save_file

    family = case.split("_")[0]
    assert sd_models.detect_family(FAMILY_KEYS[case]) == family
    path = str(tmp_path / f"{case}.safetensors")
    save_file({k: torch.zeros(2, 2) for k in FAMILY_KEYS[case]}, path)
    for v2 in (False, True):
        with pytest.raises(ModelLoadError, match=SCRIPTS[family]) as err:
            load_sd_model(path, v2=v2)
        assert path in str(err.value)


def test_other_family_in_pickle_and_unknown(tmp_path):
    path = str(tmp_path / "flux.pt")
    torch.save({k: torch.zeros(1) for k in FAMILY_KEYS["flux"]}, path)
    with pytest.raises(ModelLoadError, match="flux_train_network.py"):
        load_sd_model(path)
    from safetensors.torch import save_file

    unknown = str(tmp_path / "unet.safetensors")
    save_file({"down_blocks.0.resnets.0.conv1.weight": torch.zeros(1)}, unknown)
    with pytest.raises(ModelLoadError, match="not an SD 1.x/2.x checkpoint"):
        load_sd_model(unknown)


def test_detect_family():
    detect = sd_models.detect_family
    assert detect(["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"]) == "sd1"
    assert detect(["cond_stage_model.model.token_embedding.weight"]) == "sd2"
    assert detect(["foo"]) == "unknown"
    unet_only = "model.diffusion_model.input_blocks.1.1.proj_in.weight"
    assert detect({unet_only: (320, 320)}) == "sd2"
    assert detect({unet_only: (320, 320, 1, 1)}) == "sd1"
    assert detect(["cond_stage_model.model.token_embedding.weight", "model.diffusion_model.label_emb.0.0.weight"]) == "unknown"


def test_missing_path(tmp_path):
    missing = str(tmp_path / "nowhere" / "model.safetensors")
    with pytest.raises(ModelLoadError, match="not found") as err:
        load_sd_model(missing)
    assert missing in str(err.value)
    with pytest.raises(ModelLoadError, match="VAE not found"):
        load_sd_model(TINY_SD, vae=missing)


def test_v2_mismatch(tiny):
    with pytest.raises(ModelLoadError, match="remove --v2" if not tiny.v2 else "add --v2") as err:
        load_sd_model(tiny.single, v2=not tiny.v2, tokenizer_cache_dir=tiny.tokenizers)
    assert tiny.single in str(err.value)
    with pytest.raises(ModelLoadError, match="--v2") as err:
        load_sd_model(tiny.folder, v2=not tiny.v2)
    assert tiny.folder in str(err.value)
    with pytest.raises(ModelLoadError, match="--v2"):
        load_sd_model(TINY_SD2 if tiny.v2 else TINY_SD, v2=not tiny.v2)


def test_missing_vae_in_file(tiny1, tmp_path):
    from safetensors.torch import load_file, save_file

    state = {k: v for k, v in load_file(tiny1.single).items() if not k.startswith(sd_models.VAE_PREFIX)}
    path = str(tmp_path / "novae.safetensors")
    save_file(state, path)
    with pytest.raises(ModelLoadError, match="--vae"):
        load_sd_model(path, tokenizer_cache_dir=tiny1.tokenizers)
    model = load_sd_model(path, tokenizer_cache_dir=tiny1.tokenizers, vae=tiny1.single)
    assert_same_params(model.vae, tiny1.vae, "vae from --vae")


# ---------------------------------------------------------------------------------------------------------------------
# tokenizers
# ---------------------------------------------------------------------------------------------------------------------


def test_tokenizer_sources(tmp_path, monkeypatch):
    # tokenizer_cache_dir itself holding a tokenizer
    write_tiny_clip_tokenizer(str(tmp_path / "direct"))
    assert len(sd_models.load_tokenizer(False, str(tmp_path / "direct"))) == 514
    # kiln's tiny vocabulary gets the built-in tokenizer when none is given
    assert sd_models.load_tokenizer(True, None, vocab_size=514).pad_token == "!"

    # a real-size model with no tokenizer anywhere: the error names the folder to fill
    monkeypatch.setattr(sd_models, "_hf_cache_tokenizer_folder", lambda v2: None)
    empty = str(tmp_path / "empty")
    with pytest.raises(ModelLoadError) as err:
        sd_models.load_tokenizer(False, empty, vocab_size=49408)
    assert os.path.join(empty, "openai_clip-vit-large-patch14") in str(err.value)
    with pytest.raises(ModelLoadError) as err:
        sd_models.load_tokenizer(True, empty, vocab_size=49408)
    assert os.path.join(empty, "stabilityai_stable-diffusion-2") in str(err.value)
    with pytest.raises(ModelLoadError, match="tokenizer_cache_dir"):
        sd_models.load_tokenizer(True, None, vocab_size=49408)


# ---------------------------------------------------------------------------------------------------------------------
# --vae override
# ---------------------------------------------------------------------------------------------------------------------


def test_vae_override_formats(tiny1, tmp_path):
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file

    torch.manual_seed(123)
    other = AutoencoderKL(**tiny_vae_config())
    full = sd_models.sd_to_ldm_state_dict(tiny1.text_encoder, other, tiny1.unet, False)
    ldm = {k: v.contiguous() for k, v in full.items() if k.startswith(sd_models.VAE_PREFIX)}
    paths = {
        "folder": str(tmp_path / "vae_folder"),
        "ldm_prefixed": str(tmp_path / "ldm_prefixed.safetensors"),
        "ldm_bare": str(tmp_path / "ldm_bare.safetensors"),
        "ldm_bare_pt": str(tmp_path / "ldm_bare.pt"),
        "diffusers_layout": str(tmp_path / "diffusers_layout.safetensors"),
    }
    other.save_pretrained(paths["folder"])
    save_file(ldm, paths["ldm_prefixed"])
    bare = {k.removeprefix(sd_models.VAE_PREFIX): v for k, v in ldm.items()}
    save_file(bare, paths["ldm_bare"])
    torch.save({"state_dict": bare}, paths["ldm_bare_pt"])
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, paths["diffusers_layout"])
    for kind, path in paths.items():
        assert_same_params(model_files.load_vae(path, reference=sd_models.reference_config("sd15", "vae")), other, kind)
    model = load_sd_model(tiny1.single, tokenizer_cache_dir=tiny1.tokenizers, vae=paths["ldm_bare"])
    assert_same_params(model.vae, other, "load_sd_model(vae=...)")
    model = load_sd_model(tiny1.folder, vae=paths["folder"])
    assert_same_params(model.vae, other, "folder + vae folder")


# ---------------------------------------------------------------------------------------------------------------------
# name maps
# ---------------------------------------------------------------------------------------------------------------------

SD15_PAIRS = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "down_blocks.0.resnets.0.norm1": "input_blocks.1.0.in_layers.0",
    "down_blocks.0.resnets.0.conv1": "input_blocks.1.0.in_layers.2",
    "down_blocks.0.resnets.0.time_emb_proj": "input_blocks.1.0.emb_layers.1",
    "down_blocks.0.resnets.0.norm2": "input_blocks.1.0.out_layers.0",
    "down_blocks.0.resnets.0.conv2": "input_blocks.1.0.out_layers.3",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": "input_blocks.1.1.transformer_blocks.0.attn1.to_q",
    "down_blocks.0.attentions.1.proj_in": "input_blocks.2.1.proj_in",
    "down_blocks.0.downsamplers.0.conv": "input_blocks.3.0.op",
    "down_blocks.1.resnets.0.conv_shortcut": "input_blocks.4.0.skip_connection",
    "down_blocks.1.attentions.1.transformer_blocks.0.ff.net.0.proj": "input_blocks.5.1.transformer_blocks.0.ff.net.0.proj",
    "down_blocks.2.downsamplers.0.conv": "input_blocks.9.0.op",
    "down_blocks.3.resnets.1.conv2": "input_blocks.11.0.out_layers.3",
    "mid_block.resnets.0.conv1": "middle_block.0.in_layers.2",
    "mid_block.attentions.0.transformer_blocks.0.attn2.to_k": "middle_block.1.transformer_blocks.0.attn2.to_k",
    "mid_block.resnets.1.time_emb_proj": "middle_block.2.emb_layers.1",
    "up_blocks.0.resnets.0.conv_shortcut": "output_blocks.0.0.skip_connection",
    "up_blocks.0.resnets.2.conv1": "output_blocks.2.0.in_layers.2",
    "up_blocks.0.upsamplers.0.conv": "output_blocks.2.1.conv",
    "up_blocks.1.attentions.0.proj_out": "output_blocks.3.1.proj_out",
    "up_blocks.1.upsamplers.0.conv": "output_blocks.5.2.conv",
    "up_blocks.2.upsamplers.0.conv": "output_blocks.8.2.conv",
    "up_blocks.3.attentions.2.transformer_blocks.0.attn1.to_out.0": "output_blocks.11.1.transformer_blocks.0.attn1.to_out.0",
    "up_blocks.3.resnets.2.conv_shortcut": "output_blocks.11.0.skip_connection",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}

SDXL_UNET = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [320, 640, 1280],
    "layers_per_block": 2,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "transformer_layers_per_block": [1, 2, 10],
    "attention_head_dim": [5, 10, 20],
    "use_linear_projection": True,
    "cross_attention_dim": 2048,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}
SDXL_PAIRS = {
    "down_blocks.0.resnets.1.conv1": "input_blocks.2.0.in_layers.2",
    "down_blocks.0.downsamplers.0.conv": "input_blocks.3.0.op",
    "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k": "input_blocks.4.1.transformer_blocks.1.attn2.to_k",
    "down_blocks.2.attentions.1.transformer_blocks.9.ff.net.2": "input_blocks.8.1.transformer_blocks.9.ff.net.2",
    "mid_block.attentions.0.transformer_blocks.9.attn1.to_v": "middle_block.1.transformer_blocks.9.attn1.to_v",
    "up_blocks.0.attentions.2.proj_out": "output_blocks.2.1.proj_out",
    "up_blocks.0.upsamplers.0.conv": "output_blocks.2.2.conv",
    "up_blocks.1.upsamplers.0.conv": "output_blocks.5.2.conv",
    "up_blocks.2.resnets.2.conv_shortcut": "output_blocks.8.0.skip_connection",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
}


@pytest.mark.parametrize("config,pairs", [(sd_models.SD15_UNET, SD15_PAIRS), (SDXL_UNET, SDXL_PAIRS)], ids=["sd15", "sdxl"])
def test_unet_module_names_spot_checks(config, pairs):
    unet = ldm_names._unet_module(config)  # real size, no weights (meta)
    names = sd_models.unet_ldm_module_names(unet)
    for diffusers_name, ldm in pairs.items():
        assert names[diffusers_name] == ldm, diffusers_name
    owners = [n for n, m in unet.named_modules() if n and any(True for _ in m.parameters(recurse=False))]
    assert set(owners) <= set(names)
    owner_targets = [names[n] for n in owners]
    assert len(set(owner_targets)) == len(owner_targets)
    assert sd_models.unet_ldm_module_names(config) == names  # from the config alone


def test_unet_param_map_covers_written_file(tiny):
    params = sd_models.unet_ldm_param_names(tiny.unet)
    assert params.keys() == tiny.unet.state_dict().keys()
    assert len(set(params.values())) == len(params)  # exactly one LDM key per parameter
    written = {k for k in sd_models.read_key_shapes(tiny.single) if k.startswith(sd_models.UNET_PREFIX)}
    assert {sd_models.UNET_PREFIX + v for v in params.values()} == written
    vae_params = sd_models.vae_ldm_param_names(tiny.vae)
    written_vae = {k for k in sd_models.read_key_shapes(tiny.single) if k.startswith(sd_models.VAE_PREFIX)}
    assert {sd_models.VAE_PREFIX + v for v in vae_params.values()} == written_vae


def test_text_encoder_param_names(tiny1):
    from safetensors.torch import load_file

    te = tiny1.text_encoder
    names = sd_models.text_encoder_ldm_param_names(te)
    assert names["encoder.layers.0.self_attn.q_proj.weight"] == "text_model.encoder.layers.0.self_attn.q_proj.weight"
    state, file = te.state_dict(), load_file(tiny1.single)
    for key, ldm in names.items():
        assert torch.equal(file[sd_models.CLIP_L_PREFIX + ldm], state[key])

    te2 = build_tiny_sd(v2=True)["text_encoder"]
    names2 = sd_models.text_encoder_ldm_param_names(te2, v2=True)
    hidden = te2.config.hidden_size
    assert names2["encoder.layers.1.self_attn.k_proj.bias"] == "transformer.resblocks.1.attn.in_proj_bias"
    assert names2["encoder.layers.1.mlp.fc2.weight"] == "transformer.resblocks.1.mlp.c_proj.weight"
    assert names2["final_layer_norm.weight"] == "ln_final.weight"
    written = sd_models.sd_to_ldm_state_dict(te2, tiny1.vae, tiny1.unet, v2=True)
    for key, ldm in names2.items():
        rows = sd_models.open_clip_qkv_rows(key, hidden)
        value = written[sd_models.OPEN_CLIP_PREFIX + ldm]
        assert torch.equal(value if rows is None else value[rows], te2.state_dict()[key]), key


# ---------------------------------------------------------------------------------------------------------------------
# config inference at real size (no weights: meta tensors)
# ---------------------------------------------------------------------------------------------------------------------

NOT_FROM_SHAPES = {"sample_size", "bos_token_id", "eos_token_id", "pad_token_id"}


@pytest.mark.parametrize("name,v2", [("sd15", False), ("sd2-base", True), ("sd2-v", True)])
def test_real_configs_inferred_from_shapes(name, v2):
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    ref = {c: sd_models.reference_config(name, c) for c in ("unet", "vae", "text_encoder")}
    with init_empty_weights():
        unet = UNet2DConditionModel(**ref["unet"])
        vae = AutoencoderKL(**ref["vae"])
        te = CLIPTextModel(CLIPTextConfig(**ref["text_encoder"]))
    state = sd_models.sd_to_ldm_state_dict(te, vae, unet, v2)
    assert sd_models.detect_family(state) == ("sd2" if v2 else "sd1")
    if v2:  # 24 OpenCLIP layers in the file, as in the released SD2 checkpoints
        assert model_files.key_indices(state, sd_models.OPEN_CLIP_PREFIX + "transformer.resblocks.") == list(range(24))
    inferred = sd_models.infer_single_file_configs(state, v2)
    for component, config in ref.items():
        for key, value in config.items():
            if key not in NOT_FROM_SHAPES:
                assert inferred[component][key] == value, (component, key)

    # the full conversion path at real size, still without weights
    unet2 = sd_models.unet_from_ldm(state, v2)
    te2 = sd_models.text_encoder_from_ldm(state, v2)
    vae2 = model_files.vae_from_state_dict(state, reference=sd_models.reference_config("sd2-base" if v2 else "sd15", "vae"))
    for a, b in ((unet, unet2), (te, te2), (vae, vae2)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(sa[k].shape == sb[k].shape for k in sa)
