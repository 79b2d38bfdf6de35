"""FLUX.1 model files: built-in tiny model, diffusers folders, BFL single files, conversions, LoRA module names."""

from __future__ import annotations

import os

import pytest
import torch

from library.checkpoint_files import ModelLoadError
from library.flux_models import (
    flux_lora_targets,
    flux_transformer_from_bfl,
    flux_transformer_to_bfl,
    infer_flux_transformer_config,
    is_schnell_state_dict,
    load_flux_model,
    load_t5_tokenizer,
    save_flux_transformer_bfl,
)
from library.model_files import save_diffusers_folder
from library.tiny_models import (
    TINY_FLUX,
    build_tiny_flux,
    tiny_flux_transformer_config,
)

PROMPT = "a photo of a cat, masterpiece"


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_flux(seed=0)


def _assert_same_weights(a, b, what):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys(), what
    for k in sa:
        assert torch.equal(sa[k].float(), sb[k].float()), f"{what}: {k}"


def _write_parts(tiny, folder, t5_dtype=torch.float16):
    """ae.safetensors (BFL/LDM layout, no prefix), clip_l.safetensors (text_model.*), t5xxl (HF layout)."""
    from safetensors.torch import save_file

    from library.checkpoint_files import VAE_PREFIX
    from library.sd_models import vae_to_ldm_state_dict

    ae = {k[len(VAE_PREFIX) :]: v.contiguous() for k, v in vae_to_ldm_state_dict(tiny["vae"]).items()}
    assert not any("quant_conv" in k for k in ae)
    save_file(ae, os.path.join(folder, "ae.safetensors"))
    clip = {"text_model." + k: v.contiguous() for k, v in tiny["text_encoder"].state_dict().items()}
    save_file(clip, os.path.join(folder, "clip_l.safetensors"))
    t5 = {k: v.to(t5_dtype).contiguous() for k, v in tiny["text_encoder_2"].state_dict().items()}
    t5.pop("encoder.embed_tokens.weight", None)  # real t5xxl files may carry only shared.weight
    save_file(t5, os.path.join(folder, "t5xxl_fp16.safetensors"))
    return {name: os.path.join(folder, f) for name, f in
            (("ae", "ae.safetensors"), ("clip_l", "clip_l.safetensors"), ("t5xxl", "t5xxl_fp16.safetensors"))}


def test_builtin_tiny_flux(tiny):
    model = load_flux_model(TINY_FLUX, dtype=torch.float32)
    assert not model.is_schnell
    _assert_same_weights(model.transformer, tiny["transformer"], "transformer")
    assert model.tokenizer_2(PROMPT).input_ids == tiny["tokenizer_2"](PROMPT).input_ids
    assert model.tokenizer_2(PROMPT).input_ids[-1] == 1  # T5's </s>
    assert len(model.tokenizer_2) <= model.text_encoder_2.config.vocab_size
    assert model.vae.config.latent_channels == 16 and model.vae.config.shift_factor == pytest.approx(0.1159)
    assert load_flux_model(TINY_FLUX).transformer.dtype == torch.bfloat16  # default dtype


def test_diffusers_folder_round_trip(tiny, tmp_path):
    import json

    save_diffusers_folder(tiny, str(tmp_path / "pipe"))
    with open(tmp_path / "pipe" / "model_index.json") as f:
        assert json.load(f)["_class_name"] == "FluxPipeline"
    model = load_flux_model(str(tmp_path / "pipe"), dtype=torch.float32)
    assert not model.is_schnell
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        _assert_same_weights(getattr(model, name), tiny[name], name)
    assert model.tokenizer(PROMPT).input_ids == tiny["tokenizer"](PROMPT).input_ids
    assert model.tokenizer_2(PROMPT).input_ids == tiny["tokenizer_2"](PROMPT).input_ids

    # --clip_l / --t5xxl / --ae replace the folder's components
    other = build_tiny_flux(seed=1)
    paths = _write_parts(other, str(tmp_path), t5_dtype=torch.float32)
    model = load_flux_model(str(tmp_path / "pipe"), dtype=torch.float32, **paths)
    _assert_same_weights(model.transformer, tiny["transformer"], "transformer")
    for name in ("vae", "text_encoder", "text_encoder_2"):
        _assert_same_weights(getattr(model, name), other[name], name)


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_bfl_single_file_round_trip(tiny, tmp_path, prefix):
    from safetensors.torch import load_file, save_file

    path = str(tmp_path / "flux1-tiny.safetensors")
    save_flux_transformer_bfl(path, tiny["transformer"])
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    bfl = load_file(path)
    assert "double_blocks.0.img_attn.qkv.weight" in bfl and "guidance_in.in_layer.weight" in bfl
    assert "single_blocks.1.norm.query_norm.scale" in bfl and "final_layer.adaLN_modulation.1.weight" in bfl
    if prefix:
        save_file({prefix + k: v for k, v in bfl.items()}, path)
    config = infer_flux_transformer_config(load_file(path))
    assert config == tiny_flux_transformer_config()

    paths = _write_parts(tiny, str(tmp_path))
    model = load_flux_model(path, dtype=torch.float32, **paths)
    assert not model.is_schnell
    _assert_same_weights(model.transformer, tiny["transformer"], "transformer")
    _assert_same_weights(model.vae, tiny["vae"], "vae")
    _assert_same_weights(model.text_encoder, tiny["text_encoder"], "text_encoder")
    t5_ref = tiny["text_encoder_2"].state_dict()
    for k, v in model.text_encoder_2.state_dict().items():  # upcast from fp16
        assert torch.equal(v, t5_ref[k].half().float()), k
    # tiny vocabularies get the built-in tokenizers
    assert model.tokenizer(PROMPT).input_ids == tiny["tokenizer"](PROMPT).input_ids
    assert model.tokenizer_2(PROMPT).input_ids == tiny["tokenizer_2"](PROMPT).input_ids


def test_fp8_text_encoder_is_upcast(tiny, tmp_path):
    paths = _write_parts(tiny, str(tmp_path), t5_dtype=torch.float8_e4m3fn)
    path = str(tmp_path / "flux.safetensors")
    save_flux_transformer_bfl(path, tiny["transformer"], dtype=torch.bfloat16)
    model = load_flux_model(path, dtype=torch.bfloat16, **paths)
    ref = tiny["text_encoder_2"].state_dict()
    for k, v in model.text_encoder_2.state_dict().items():
        assert v.dtype == torch.bfloat16
        assert torch.equal(v, ref[k].to(torch.float8_e4m3fn).to(torch.bfloat16)), k
    ref = tiny["transformer"].state_dict()
    for k, v in model.transformer.state_dict().items():
        assert v.dtype == torch.bfloat16 and torch.equal(v, ref[k].to(torch.bfloat16)), k


def test_single_file_needs_the_other_parts(tiny, tmp_path):
    path = str(tmp_path / "flux.safetensors")
    save_flux_transformer_bfl(path, tiny["transformer"])
    with pytest.raises(ModelLoadError, match="--ae.*--clip_l.*--t5xxl"):
        load_flux_model(path)


def test_dev_and_schnell_detection(tmp_path):
    schnell = build_tiny_flux(seed=0, schnell=True)
    bfl = flux_transformer_to_bfl(schnell["transformer"].state_dict(), schnell["transformer"].config)
    assert not any(k.startswith("guidance_in.") for k in bfl)
    assert is_schnell_state_dict(bfl)
    assert infer_flux_transformer_config(bfl)["guidance_embeds"] is False
    dev = build_tiny_flux(seed=0)
    assert not is_schnell_state_dict(flux_transformer_to_bfl(dev["transformer"].state_dict(), dev["transformer"].config))

    save_diffusers_folder(schnell, str(tmp_path / "pipe"))
    assert load_flux_model(str(tmp_path / "pipe"), dtype=torch.float32).is_schnell
    path = str(tmp_path / "schnell.safetensors")
    save_flux_transformer_bfl(path, schnell["transformer"])
    paths = _write_parts(schnell, str(tmp_path))
    model = load_flux_model(path, dtype=torch.float32, **paths)
    assert model.is_schnell
    _assert_same_weights(model.transformer, schnell["transformer"], "transformer")


def test_other_families_are_refused(tmp_path):
    from safetensors.torch import save_file

    small = torch.zeros(2)
    cases = {
        "sdxl_train_network.py": {"conditioner.embedders.0.transformer.text_model.x": small},
        "sd3_train_network.py": {"model.diffusion_model.joint_blocks.0.x": small},
        "train_network.py": {"model.diffusion_model.input_blocks.0.0.weight": small, "cond_stage_model.transformer.x": small},
    }
    for script, sd in cases.items():
        path = str(tmp_path / f"{script}.safetensors")
        save_file({k: v.clone() for k, v in sd.items()}, path)
        with pytest.raises(ModelLoadError, match=script.replace(".", r"\.")):
            load_flux_model(path)
    with pytest.raises(ModelLoadError, match=r"sdxl_train_network\.py"):
        load_flux_model("kiln-tiny-sdxl")
    with pytest.raises(ModelLoadError, match=r"train_network\.py"):
        load_flux_model("kiln-tiny-sd")
    with pytest.raises(ModelLoadError, match="not found"):
        load_flux_model(str(tmp_path / "missing.safetensors"))


def test_t5_tokenizer_lookup(tmp_path, monkeypatch):
    import library.model_files as mf
    from library.tiny_models import write_tiny_t5_tokenizer

    monkeypatch.setattr(mf, "hf_cache_t5_folder", lambda: None)
    with pytest.raises(ModelLoadError, match="google_t5-v1_1-xxl"):
        load_t5_tokenizer(str(tmp_path), vocab_size=32128)
    write_tiny_t5_tokenizer(str(tmp_path / "google_t5-v1_1-xxl"))
    tokenizer = load_t5_tokenizer(str(tmp_path), vocab_size=32128)
    assert tokenizer(PROMPT).input_ids[-1] == tokenizer.eos_token_id == 1


def _meta_flux(**overrides):
    from diffusers import FluxTransformer2DModel

    config = dict(num_layers=19, num_single_layers=38, guidance_embeds=True)
    config.update(overrides)
    with torch.device("meta"):
        return FluxTransformer2DModel(**config)


def test_lora_targets_real_size():
    model = _meta_flux()
    targets = dict(flux_lora_targets(model))
    assert len(targets) == len(flux_lora_targets(model))

    def width(name):
        return sum(model.get_submodule(p).out_features for p in targets[name])

    assert targets["double_blocks_0_img_attn_qkv"] == [f"transformer_blocks.0.attn.to_{c}" for c in "qkv"]
    assert targets["double_blocks_0_txt_attn_qkv"] == [f"transformer_blocks.0.attn.add_{c}_proj" for c in "qkv"]
    assert targets["single_blocks_0_linear1"] == [
        "single_transformer_blocks.0.attn.to_q",
        "single_transformer_blocks.0.attn.to_k",
        "single_transformer_blocks.0.attn.to_v",
        "single_transformer_blocks.0.proj_mlp",
    ]
    assert targets["double_blocks_0_img_mod_lin"] == ["transformer_blocks.0.norm1.linear"]
    assert targets["single_blocks_37_linear2"] == ["single_transformer_blocks.37.proj_out"]
    assert targets["double_blocks_18_txt_mlp_2"] == ["transformer_blocks.18.ff_context.net.2"]
    assert width("single_blocks_0_linear1") == 21504 == 3 * 3072 + 12288
    assert width("double_blocks_0_img_attn_qkv") == 9216
    assert width("double_blocks_0_img_mod_lin") == 6 * 3072
    assert width("single_blocks_0_modulation_lin") == 3 * 3072
    assert "guidance_in_in_layer" in targets and "img_in" in targets and "final_layer_adaLN_modulation_1" in targets
    for paths in targets.values():
        for p in paths:
            assert isinstance(model.get_submodule(p), torch.nn.Linear), p
    assert sum(n.startswith("double_blocks_") for n in targets) == 19 * 10
    assert sum(n.startswith("single_blocks_") for n in targets) == 38 * 3
    assert "guidance_in_in_layer" not in dict(flux_lora_targets(_meta_flux(guidance_embeds=False)))


def test_bfl_conversion_matches_diffusers_converter():
    """kiln's diffusers -> BFL output, converted back by diffusers' own converter (which assumes width 3072), gives the
    original state dict exactly; kiln's BFL -> diffusers gives it too."""
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    model = _meta_flux(
        num_layers=1, num_single_layers=1, joint_attention_dim=64, pooled_projection_dim=64, in_channels=64
    )
    generator = torch.Generator().manual_seed(0)
    original = {
        k: torch.randn(v.shape, generator=generator, dtype=torch.bfloat16) for k, v in model.state_dict().items()
    }
    bfl = flux_transformer_to_bfl(original, model.config)
    assert bfl["single_blocks.0.linear1.weight"].shape == (21504, 3072)
    config = infer_flux_transformer_config(bfl)
    assert (config["num_attention_heads"], config["attention_head_dim"], config["axes_dims_rope"]) == (24, 128, [16, 56, 56])
    assert config["guidance_embeds"] and (config["joint_attention_dim"], config["pooled_projection_dim"]) == (64, 64)

    back = flux_transformer_from_bfl(bfl, config)
    assert back.keys() == original.keys()
    assert all(torch.equal(back[k], original[k]) for k in original)
    del back

    oracle = convert_flux_transformer_checkpoint_to_diffusers(dict(bfl))
    assert oracle.keys() == original.keys()
    for k in original:
        assert torch.equal(oracle[k], original[k]), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_transformer_from_bfl_owns_its_memory(tiny, dtype):
    """The model does not share memory with the caller's dict (renamed tensors and row slices of the fused qkv /
    linear1 weights used to be views of it): editing either afterwards leaves the other unchanged."""
    from library.flux_models import transformer_from_bfl

    source = tiny["transformer"]
    bfl = {k: v.to(dtype).clone() for k, v in flux_transformer_to_bfl(source.state_dict(), source.config).items()}
    bfl_before = {k: v.clone() for k, v in bfl.items()}
    model = transformer_from_bfl(bfl, dtype=dtype)
    model_before = {k: v.clone() for k, v in model.state_dict().items()}

    inputs = {v.untyped_storage().data_ptr() for v in bfl.values()}
    assert not [k for k, v in model.state_dict().items() if v.untyped_storage().data_ptr() in inputs]

    with torch.no_grad():
        for v in bfl.values():
            v.add_(1)
    for k, v in model.state_dict().items():
        assert torch.equal(v, model_before[k]), f"editing the dict changed the model's {k}"

    with torch.no_grad():
        for p in model.parameters():
            p.mul_(-3)
    for k, v in bfl.items():
        assert torch.equal(v, bfl_before[k] + 1), f"editing the model changed the dict's {k}"
