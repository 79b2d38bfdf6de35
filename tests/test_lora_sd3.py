"""networks.lora_sd3: SD3 / SD3.5 LoRA in sd-scripts' key layout (SAI module names, fused qkv).

Oracles: the SAI checkpoint that library.sd3_models.sd3_transformer_to_sai writes (every saved module names one of its
weights, with the shape up @ down needs, as ComfyUI maps `lora_unet_X` to `diffusion_model.X.weight`); merging
`up @ down * alpha / rank * multiplier` by hand into those SAI weights and converting back with sd3_transformer_from_sai
gives the model output the applied network gives; diffusers + PEFT running a diffusers-layout LoRA gives the output
kiln gives from the same file.
"""

from __future__ import annotations

import functools
import logging

import pytest
import torch
from safetensors.torch import load_file, save_file

from library.checkpoint_files import UNET_PREFIX
from library.sd3_models import (
    SD3_VARIANTS,
    TINY_SD3_CLIP_G_WIDTH,
    TINY_SD3_CLIP_L_WIDTH,
    sd3_transformer_from_sai,
    sd3_transformer_to_sai,
    tiny_sd3_transformer_config,
)
from networks import lora_sd3 as ls
from networks.lora_flux import FusedLoRAModule, SplitLoRAModule

HIDDEN = 128  # every tiny variant: 2 x 64 or 4 x 32 heads
ALL_EMB = "[2,3,4,5,6,7]"  # context, t, x, y, final_mod, final_linear: distinct ranks to tell them apart


# ------------------------------------------------------------------------------------------------------------ fixtures


@functools.cache
def _base_state(variant: str) -> dict[str, torch.Tensor]:
    """A tiny SD3Transformer2DModel's weights, every parameter perturbed (zero-initialised modulations would hide a
    swapped or misplaced row)."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    model = SD3Transformer2DModel(**tiny_sd3_transformer_config(variant))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return {k: v.clone() for k, v in model.state_dict().items()}


def _transformer(variant: str, state: dict | None = None):
    """A fresh tiny transformer (its own modules, so that adapters applied in one test stay there)."""
    from diffusers import SD3Transformer2DModel

    model = SD3Transformer2DModel(**tiny_sd3_transformer_config(variant)).eval()
    model.load_state_dict(state if state is not None else _base_state(variant))
    return model


def _clip(width: int, act: str, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=100, hidden_size=width, intermediate_size=48, num_hidden_layers=2, num_attention_heads=width // 64,
        max_position_embeddings=16, projection_dim=width, hidden_act=act, bos_token_id=98, eos_token_id=99, pad_token_id=99,
    )  # fmt: skip
    return CLIPTextModelWithProjection(config).eval()


def _t5(seed: int = 3):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=100, d_model=32, d_kv=8, d_ff=40, num_layers=1, num_heads=4, feed_forward_proj="gated-gelu",
        dropout_rate=0.0, is_encoder_decoder=False, use_cache=False,
    )  # fmt: skip
    return T5EncoderModel(config).eval()


def _encoders():
    return [_clip(TINY_SD3_CLIP_L_WIDTH, "quick_gelu", 1), _clip(TINY_SD3_CLIP_G_WIDTH, "gelu", 2), _t5()]


def _inputs(variant: str, seed: int = 1) -> dict:
    config = tiny_sd3_transformer_config(variant)
    g = torch.Generator().manual_seed(seed)
    return {
        "hidden_states": torch.randn(2, 16, 8, 8, generator=g),
        "encoder_hidden_states": torch.randn(2, 5, config["joint_attention_dim"], generator=g),
        "pooled_projections": torch.randn(2, config["pooled_projection_dim"], generator=g),
        "timestep": torch.tensor([300.0, 700.0]),
        "return_dict": False,
    }


def _run(transformer, variant: str) -> torch.Tensor:
    with torch.no_grad():
        return transformer(**_inputs(variant))[0]


def _randomize(network, seed: int = 0, std: float = 0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in network.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return network


def _modules(sd: dict) -> set[str]:
    return {k.split(".")[0] for k in sd}


def _sai_index(sai: dict[str, torch.Tensor], prefix: str = UNET_PREFIX) -> dict[str, str]:
    """ComfyUI's map: `lora_unet_` + X with "." -> "_" for every `diffusion_model.X.weight` of the checkpoint."""
    return {
        "lora_unet_" + k[len(prefix) : -len(".weight")].replace(".", "_"): k
        for k in sai
        if k.startswith(prefix) and k.endswith(".weight")
    }


def _delta(sd: dict, name: str, multiplier: float = 1.0) -> torch.Tensor:
    """ComfyUI's weight change of one kohya module: up @ down * alpha / rank * strength (conv: 1x1 up, k x k down)."""
    down, up = sd[name + ".lora_down.weight"].double(), sd[name + ".lora_up.weight"].double()
    scale = float(sd[name + ".alpha"]) / down.shape[0] * multiplier
    return (up.flatten(1) @ down.flatten(1)) * scale


# ------------------------------------------------------------------------------------------------ (a) names and shapes


@pytest.mark.parametrize("split_qkv", [False, True])
@pytest.mark.parametrize("variant", SD3_VARIANTS)
def test_every_saved_module_is_a_sai_weight_with_its_shape(variant, split_qkv):
    transformer = _transformer(variant)
    encoders = _encoders()
    net = ls.create_network(1.0, 4, 2.0, encoders, transformer, emb_dims=ALL_EMB, split_qkv=split_qkv, train_t5xxl=True)
    sd = net.state_dict()
    sai = sd3_transformer_to_sai(transformer.state_dict())
    index = _sai_index(sai)
    unet = {n for n in _modules(sd) if n.startswith("lora_unet_")}
    for name in unet:
        assert name in index, f"{name} names no weight of the SAI checkpoint"
        want = sai[index[name]].shape
        down, up = sd[name + ".lora_down.weight"], sd[name + ".lora_up.weight"]
        assert up.shape[1] == down.shape[0]
        assert (up.shape[0], *down.shape[1:]) == tuple(want), name
        assert sd[name + ".alpha"].dim() == 0
    # with every type and every embedder on, every Linear / Conv2d weight of the MMDiT is adapted (not qk-norm scales)
    assert unet == {n for n, k in index.items() if sai[k].dim() >= 2}
    # text encoders: HF module names under lora_te1_ (CLIP-L), lora_te2_ (CLIP-G), lora_te3_ (T5)
    for prefix, te in zip(("lora_te1_", "lora_te2_", "lora_te3_"), encoders):
        te_index = {prefix + k[: -len(".weight")].replace(".", "_"): k for k in te.state_dict() if k.endswith(".weight")}
        names = {n for n in _modules(sd) if n.startswith(prefix)}
        assert names and names <= set(te_index)
        for name in names:
            w = te.state_dict()[te_index[name]]
            assert (sd[name + ".lora_up.weight"].shape[0], sd[name + ".lora_down.weight"].shape[1]) == tuple(w.shape)
        assert not any("text_projection" in n or "embed" in n or "norm" in n for n in names)
    names_in_file = _modules(sd)
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj" in names_in_file
    assert "lora_te2_text_model_encoder_layers_1_mlp_fc2" in names_in_file
    assert "lora_te3_encoder_block_0_layer_0_SelfAttention_q" in names_in_file
    assert "lora_te3_encoder_block_0_layer_1_DenseReluDense_wi_0" in names_in_file


def test_real_size_shapes_on_meta():
    """The reference table's shapes (SD3.5 Large H = 2432; SD3.5 Medium's MMDiT-X layers 0-12) on meta models."""
    from diffusers import SD3Transformer2DModel

    common = {"sample_size": 128, "patch_size": 2, "in_channels": 16, "attention_head_dim": 64, "joint_attention_dim": 4096,
              "pooled_projection_dim": 2048, "out_channels": 16, "qk_norm": "rms_norm"}  # fmt: skip
    with torch.device("meta"):
        large = SD3Transformer2DModel(
            **common, num_layers=38, num_attention_heads=38, caption_projection_dim=2432, pos_embed_max_size=192
        )
        medium = SD3Transformer2DModel(
            **common, num_layers=24, num_attention_heads=24, caption_projection_dim=1536, pos_embed_max_size=384,
            dual_attention_layers=tuple(range(13)),
        )  # fmt: skip
    r, h = 4, 2432
    shapes = {
        k: tuple(v.shape) for k, v in ls.create_network(1.0, r, 1.0, [], large, emb_dims="[4,4,4,4,4,4]").state_dict().items()
    }
    assert shapes["lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight"] == (r, h)
    assert shapes["lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight"] == (3 * h, r)
    assert shapes["lora_unet_joint_blocks_0_context_block_attn_proj.lora_up.weight"] == (h, r)
    assert shapes["lora_unet_joint_blocks_5_x_block_mlp_fc1.lora_up.weight"] == (4 * h, r)
    assert shapes["lora_unet_joint_blocks_5_x_block_mlp_fc2.lora_down.weight"] == (r, 4 * h)
    assert shapes["lora_unet_joint_blocks_0_x_block_adaLN_modulation_1.lora_up.weight"] == (6 * h, r)
    assert shapes["lora_unet_joint_blocks_37_context_block_adaLN_modulation_1.lora_up.weight"] == (2 * h, r)
    assert "lora_unet_joint_blocks_37_context_block_attn_proj.alpha" not in shapes
    assert "lora_unet_joint_blocks_37_context_block_mlp_fc1.alpha" not in shapes
    assert shapes["lora_unet_x_embedder_proj.lora_down.weight"] == (r, 16, 2, 2)
    assert shapes["lora_unet_x_embedder_proj.lora_up.weight"] == (h, r, 1, 1)
    assert shapes["lora_unet_final_layer_linear.lora_up.weight"] == (64, r)
    assert shapes["lora_unet_context_embedder.lora_down.weight"] == (r, 4096)
    assert shapes["lora_unet_y_embedder_mlp_0.lora_down.weight"] == (r, 2048)
    assert shapes["lora_unet_t_embedder_mlp_0.lora_down.weight"] == (r, 256)
    h = 1536
    shapes = {k: tuple(v.shape) for k, v in ls.create_network(1.0, r, 1.0, [], medium).state_dict().items()}
    names = _modules(shapes)
    assert {n for n in names if "attn2" in n} == {
        f"lora_unet_joint_blocks_{i}_x_block_attn2_{p}" for i in range(13) for p in ("qkv", "proj")
    }
    assert shapes["lora_unet_joint_blocks_12_x_block_attn2_qkv.lora_up.weight"] == (3 * h, r)
    assert shapes["lora_unet_joint_blocks_12_x_block_adaLN_modulation_1.lora_up.weight"] == (9 * h, r)
    assert shapes["lora_unet_joint_blocks_13_x_block_adaLN_modulation_1.lora_up.weight"] == (6 * h, r)


# --------------------------------------------------------------------------- (b) applied network == merge by hand in SAI


@pytest.mark.parametrize("split_qkv", [False, True])
@pytest.mark.parametrize("variant", SD3_VARIANTS)
def test_applied_network_equals_merge_into_sai_weights(variant, split_qkv):
    multiplier = 0.7
    transformer = _transformer(variant)
    base_out = _run(transformer, variant)
    net = ls.create_network(multiplier, 4, 2.0, [], transformer, emb_dims=ALL_EMB, split_qkv=split_qkv)
    net.apply_to()
    _randomize(net).eval()
    out = _run(transformer, variant)
    assert (out - base_out).abs().max() > 1e-2  # the adapters do something

    sd = net.state_dict()
    sai = sd3_transformer_to_sai(_base_state(variant))
    index = _sai_index(sai)
    merged = dict(sai)
    for name in _modules(sd):
        w = sai[index[name]]
        merged[index[name]] = (w.double() + _delta(sd, name, multiplier).reshape(w.shape)).to(w.dtype)
    reference = _transformer(variant, sd3_transformer_from_sai(merged, strict=True))
    torch.testing.assert_close(out, _run(reference, variant), atol=1e-5, rtol=1e-5)


def test_text_encoder_adapters_equal_merge_into_hf_weights():
    encoders = _encoders()
    ids = torch.randint(0, 98, (2, 7), generator=torch.Generator().manual_seed(5))
    net = ls.create_network(0.5, 4, 3.0, encoders, None, train_t5xxl=True)
    net.apply_to(train_unet=False)
    _randomize(net).eval()
    sd = net.state_dict()
    for prefix, te in zip(("lora_te1_", "lora_te2_", "lora_te3_"), encoders):
        with torch.no_grad():
            out = te(input_ids=ids).last_hidden_state
        state = {k: v.clone() for k, v in te.state_dict().items()}
        for name in (n for n in _modules(sd) if n.startswith(prefix)):
            key = next(k for k in state if prefix + k[: -len(".weight")].replace(".", "_") == name)
            state[key] = (state[key].double() + _delta(sd, name, 0.5)).to(state[key].dtype)
        reference = type(te)(te.config).eval()
        reference.load_state_dict(state)
        with torch.no_grad():
            torch.testing.assert_close(out, reference(input_ids=ids).last_hidden_state, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------- (c) layout and round trip


def test_split_qkv_is_saved_fused_with_n_times_alpha():
    transformer = _transformer("sd3.5-medium")
    net = _randomize(ls.create_network(1.0, 4, 2.0, [], transformer, split_qkv="True"))
    assert isinstance(net.lora_unet_joint_blocks_0_x_block_attn2_qkv, SplitLoRAModule)
    assert isinstance(net.lora_unet_joint_blocks_2_context_block_attn_qkv, SplitLoRAModule)
    sd = net.state_dict()
    for name in ("joint_blocks_0_x_block_attn_qkv", "joint_blocks_1_context_block_attn_qkv", "joint_blocks_1_x_block_attn2_qkv"):
        down, up = sd[f"lora_unet_{name}.lora_down.weight"], sd[f"lora_unet_{name}.lora_up.weight"]
        assert down.shape == (12, HIDDEN) and up.shape == (3 * HIDDEN, 12)
        assert sd[f"lora_unet_{name}.alpha"].item() == 6.0  # alpha / rank = 6 / 12 = the trained 2 / 4
        for i in range(3):
            for j in range(3):
                block = up[i * HIDDEN : (i + 1) * HIDDEN, j * 4 : (j + 1) * 4]
                assert block.any() == (i == j)
    # other modules keep rank and alpha
    assert sd["lora_unet_joint_blocks_0_x_block_attn_proj.lora_down.weight"].shape == (4, HIDDEN)
    assert sd["lora_unet_joint_blocks_0_x_block_attn_proj.alpha"].item() == 2.0
    plain = ls.create_network(1.0, 4, 2.0, [], _transformer("sd3.5-medium"))
    assert isinstance(plain.lora_unet_joint_blocks_0_x_block_attn_qkv, FusedLoRAModule)
    assert not isinstance(plain.lora_unet_joint_blocks_0_x_block_attn_qkv, SplitLoRAModule)


@pytest.mark.parametrize("split_qkv", [False, True])
def test_save_load_round_trip(tmp_path, split_qkv):
    variant = "sd3.5-medium"
    encoders = _encoders()
    transformer = _transformer(variant)
    net = ls.create_network(0.8, 4, 2.0, encoders, transformer, emb_dims=ALL_EMB, split_qkv=split_qkv)
    net.apply_to()
    _randomize(net).eval()
    out = _run(transformer, variant)
    path = str(tmp_path / "lora.safetensors")
    save_file(net.state_dict(), path)
    file_sd = load_file(path)

    # the file holds the modulations in SAI's (shift, scale) order, the adapter diffusers' (scale, shift)
    up = net.lora_unet_final_layer_adaLN_modulation_1.lora_up.weight.detach()
    assert torch.equal(file_sd["lora_unet_final_layer_adaLN_modulation_1.lora_up.weight"], torch.cat(up.chunk(2)[::-1]))

    for make in ("create_network", "create_network_from_weights"):
        other = _transformer(variant)
        if make == "create_network":
            net2 = ls.create_network(0.8, 4, 2.0, _encoders(), other, emb_dims=ALL_EMB, split_qkv=split_qkv)
        else:
            net2 = ls.create_network_from_weights(0.8, file_sd, _encoders(), other, split_qkv=split_qkv)
        net2.apply_to()
        assert net2.load_weights(dict(file_sd), path) == []
        net2.eval()
        sd2 = net2.state_dict()
        assert set(sd2) == set(file_sd) and all(torch.equal(sd2[k], file_sd[k]) for k in sd2), make
        torch.testing.assert_close(_run(other, variant), out, atol=0, rtol=0)
    if split_qkv:  # a consumer without split_qkv reads the file as plain fused adapters with the same output
        other = _transformer(variant)
        plain = ls.create_network_from_weights(0.8, file_sd, [], other)
        plain.apply_to()
        plain.load_weights(file_sd)
        assert not isinstance(plain.lora_unet_joint_blocks_0_x_block_attn_qkv, SplitLoRAModule)
        torch.testing.assert_close(_run(other, variant), out, atol=1e-5, rtol=1e-5)


def _dims(net) -> dict[str, int]:
    return {m.lora_name: m.rank for m in net.unet_loras}


def test_type_dims_block_indices_and_emb_dims_select_the_documented_modules():
    transformer = _transformer("sd3.5-medium")  # 3 blocks, MMDiT-X in 0 and 1, block 2 pre-only on the context side
    args = {
        "context_attn_dim": "0",
        "x_mlp_dim": "2",
        "x_mod_dim": "0",
        "train_block_indices": "1-2",
        "emb_dims": "[0,3,0,0,5,0]",
    }
    net = ls.create_network(1.0, 4, 1.0, [], transformer, **args)
    want = {"lora_unet_t_embedder_mlp_0": 3, "lora_unet_t_embedder_mlp_2": 3, "lora_unet_final_layer_adaLN_modulation_1": 5}
    for b in (1, 2):
        want.update({f"lora_unet_joint_blocks_{b}_x_block_{p}": 4 for p in ("attn_qkv", "attn_proj")})
        want.update({f"lora_unet_joint_blocks_{b}_x_block_{p}": 2 for p in ("mlp_fc1", "mlp_fc2")})
        want[f"lora_unet_joint_blocks_{b}_context_block_adaLN_modulation_1"] = 4
    want.update({f"lora_unet_joint_blocks_1_x_block_{p}": 4 for p in ("attn2_qkv", "attn2_proj")})  # attn2 is x attn
    want.update({f"lora_unet_joint_blocks_1_context_block_{p}": 4 for p in ("mlp_fc1", "mlp_fc2")})  # block 2: no MLP
    assert _dims(net) == want

    # defaults: every type of every block at network_dim, no embedders
    names = set(_dims(ls.create_network(1.0, 4, 1.0, [], transformer)))
    assert not any(
        n.startswith(("lora_unet_t_", "lora_unet_x_embedder", "lora_unet_final", "lora_unet_context_emb")) for n in names
    )
    # x: qkv proj fc1 fc2 mod in 3 blocks + attn2 qkv/proj in 2; context: the same 5 in 2 blocks + qkv, mod in the last
    assert len(names) == 3 * 5 + 2 * 2 + 2 * 5 + 2
    # only the named type at 0; the rest at network_dim
    only = _dims(ls.create_network(1.0, 4, 1.0, [], transformer, x_attn_dim=0))
    assert not any("x_block_attn" in n for n in only) and len(only) == len(names) - 3 * 2 - 2 * 2
    none = _dims(ls.create_network(1.0, 4, 1.0, [], transformer, train_block_indices="none", emb_dims="[1,0,0,0,0,0]"))
    assert none == {"lora_unet_context_embedder": 1}


def test_sd35_medium_attn2_and_pre_only_last_context_block():
    sd = ls.create_network(1.0, 4, 1.0, [], _transformer("sd3.5-medium")).state_dict()
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    for b in (0, 1):  # the tiny config's MMDiT-X layers
        assert shapes[f"lora_unet_joint_blocks_{b}_x_block_attn2_qkv.lora_up.weight"] == (3 * HIDDEN, 4)
        assert shapes[f"lora_unet_joint_blocks_{b}_x_block_attn2_proj.lora_down.weight"] == (4, HIDDEN)
        assert shapes[f"lora_unet_joint_blocks_{b}_x_block_adaLN_modulation_1.lora_up.weight"] == (9 * HIDDEN, 4)
    assert not any("joint_blocks_2_x_block_attn2" in k for k in sd)
    assert shapes["lora_unet_joint_blocks_2_x_block_adaLN_modulation_1.lora_up.weight"] == (6 * HIDDEN, 4)
    last = {k.split(".")[0] for k in sd if k.startswith("lora_unet_joint_blocks_2_context_block")}
    assert last == {
        "lora_unet_joint_blocks_2_context_block_attn_qkv",
        "lora_unet_joint_blocks_2_context_block_adaLN_modulation_1",
    }
    assert shapes["lora_unet_joint_blocks_2_context_block_adaLN_modulation_1.lora_up.weight"] == (2 * HIDDEN, 4)
    assert shapes["lora_unet_joint_blocks_1_context_block_adaLN_modulation_1.lora_up.weight"] == (6 * HIDDEN, 4)
    for variant in ("sd3-medium", "sd3.5-large"):
        assert not any("attn2" in k for k in ls.create_network(1.0, 4, 1.0, [], _transformer(variant)).state_dict())


def test_train_t5xxl_and_text_encoder_prefixes():
    encoders = _encoders()
    names = _modules(ls.create_network(1.0, 4, 1.0, encoders, None).state_dict())
    assert {n[:9] for n in names} == {"lora_te1_", "lora_te2_"}
    names = _modules(ls.create_network(1.0, 4, 1.0, encoders, None, train_t5xxl="True").state_dict())
    assert {n[:9] for n in names} == {"lora_te1_", "lora_te2_", "lora_te3_"}
    assert "lora_te3_encoder_block_0_layer_1_DenseReluDense_wo" in names
    assert len(
        _modules(ls.create_network(1.0, 4, 1.0, [encoders[0], encoders[1], None], None, train_t5xxl=True).state_dict())
    ) == len({n for n in names if not n.startswith("lora_te3_")})


# ------------------------------------------------------------------------------------------------ diffusers / PEFT files


def test_diffusers_peft_lora_gives_diffusers_output():
    """A LoRA made by diffusers + PEFT on every Linear / Conv2d of the transformer, in the layout diffusers' SD3 pipeline
    saves: kiln's output with that file equals diffusers' own with the adapter loaded."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    variant = "sd3.5-medium"
    peft_model = _transformer(variant)
    targets = [n for n, m in peft_model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    peft_model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights=False))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    want = _run(peft_model, variant)
    file_sd = {"transformer." + k: v.clone() for k, v in get_peft_model_state_dict(peft_model).items()}
    assert "transformer.norm_out.linear.lora_B.weight" in file_sd and "transformer.pos_embed.proj.lora_A.weight" in file_sd

    for split_qkv in (False, True):
        transformer = _transformer(variant)
        net = ls.create_network_from_weights(1.0, file_sd, [], transformer, split_qkv=split_qkv)
        net.apply_to()
        assert net.load_weights(dict(file_sd)) == []
        net.eval()
        torch.testing.assert_close(_run(transformer, variant), want, atol=1e-5, rtol=1e-5)
        assert _modules(net.state_dict()) <= set(_sai_index(sd3_transformer_to_sai(_base_state(variant))))


def _kohya_to_peft(sd: dict, text_encoder_prefixes=("text_encoder.", "text_encoder_2.")) -> dict:
    """The diffusers/PEFT layout of a kohya SD3 file, written from the diffusers <-> SAI facts by hand: fused qkv ->
    to_q/to_k/to_v (add_*_proj on the context side) with the whole down each and their rows of up; the final layer's and
    the pre-only context block's modulations with their up halves swapped; alpha kept."""
    renames = {
        "x_embedder_proj": "pos_embed.proj", "context_embedder": "context_embedder",
        "t_embedder_mlp_0": "time_text_embed.timestep_embedder.linear_1", "t_embedder_mlp_2": "time_text_embed.timestep_embedder.linear_2",
        "y_embedder_mlp_0": "time_text_embed.text_embedder.linear_1", "y_embedder_mlp_2": "time_text_embed.text_embedder.linear_2",
        "final_layer_linear": "proj_out", "final_layer_adaLN_modulation_1": "norm_out.linear",
    }  # fmt: skip
    block = {
        "x_block_attn_proj": ["attn.to_out.0"], "x_block_mlp_fc1": ["ff.net.0.proj"], "x_block_mlp_fc2": ["ff.net.2"],
        "x_block_adaLN_modulation_1": ["norm1.linear"], "x_block_attn2_proj": ["attn2.to_out.0"],
        "context_block_attn_proj": ["attn.to_add_out"], "context_block_mlp_fc1": ["ff_context.net.0.proj"],
        "context_block_mlp_fc2": ["ff_context.net.2"], "context_block_adaLN_modulation_1": ["norm1_context.linear"],
        "x_block_attn_qkv": ["attn.to_q", "attn.to_k", "attn.to_v"], "x_block_attn2_qkv": ["attn2.to_q", "attn2.to_k", "attn2.to_v"],
        "context_block_attn_qkv": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
    }  # fmt: skip
    last = max(int(n.split("_")[4]) for n in _modules(sd) if n.startswith("lora_unet_joint_blocks_"))
    out = {}
    for name in _modules(sd):
        down, up, alpha = sd[name + ".lora_down.weight"], sd[name + ".lora_up.weight"], sd[name + ".alpha"]
        if name.startswith("lora_te"):
            prefix = text_encoder_prefixes[int(name[7]) - 1]
            path = prefix + name[len("lora_te1_") :].replace("_", ".")  # CLIP names: fine for these modules
            for a, b in (("self.attn", "self_attn"), ("q.proj", "q_proj"), ("k.proj", "k_proj"), ("v.proj", "v_proj"),
                         ("out.proj", "out_proj"), ("text.model", "text_model")):  # fmt: skip
                path = path.replace(a, b)
            paths, ups = [path], [up]
        else:
            inner = name[len("lora_unet_") :]
            if inner in renames:
                paths = ["transformer." + renames[inner]]
            else:
                b, rest = inner[len("joint_blocks_") :].split("_", 1)
                paths = [f"transformer.transformer_blocks.{b}.{p}" for p in block[rest]]
            ups = list(up.chunk(len(paths)))
            if inner == "final_layer_adaLN_modulation_1" or inner == f"joint_blocks_{last}_context_block_adaLN_modulation_1":
                ups = [torch.cat(up.chunk(2)[::-1])]
        for path, part in zip(paths, ups):
            out[path + ".lora_A.weight"], out[path + ".lora_B.weight"], out[path + ".alpha"] = down, part, alpha
    return out


def test_diffusers_layout_loads_onto_the_weights_of_the_kohya_file():
    variant = "sd3.5-medium"
    encoders = _encoders()
    net = _randomize(ls.create_network(1.0, 4, 2.0, encoders, _transformer(variant), emb_dims=ALL_EMB))
    kohya = net.state_dict()
    peft = _kohya_to_peft(kohya)
    assert "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight" in peft
    merged = []
    for sd in (kohya, peft):
        transformer, tes = _transformer(variant), _encoders()
        count = ls.merge_into_transformer(sd, 0.6, transformer, tes)
        assert count == len(_modules(kohya))
        merged.append({"t": transformer.state_dict(), **{f"te{i}": te.state_dict() for i, te in enumerate(tes)}})
    for part in merged[0]:
        for k, v in merged[0][part].items():
            torch.testing.assert_close(merged[1][part][k], v, atol=1e-6, rtol=1e-6, msg=f"{part} {k}")
    # and the merge is the applied network's output
    transformer = _transformer(variant)
    applied = ls.create_network_from_weights(0.6, peft, [], transformer)
    applied.apply_to()
    applied.load_weights(peft)
    applied.eval()
    torch.testing.assert_close(
        _run(transformer, variant), _run(_transformer(variant, merged[0]["t"]), variant), atol=1e-5, rtol=1e-5
    )


def test_merge_refuses_modules_of_another_model():
    sd = ls.create_network(1.0, 4, 1.0, [], _transformer("sd3.5-medium")).state_dict()
    with pytest.raises(ValueError, match="match nothing"):
        ls.merge_into_transformer(sd, 1.0, _transformer("sd3-medium"))  # attn2 modules do not exist there


# ------------------------------------------------------------------------------------------------ trainer-facing methods


def test_param_groups_loraplus_max_norm_multiplier_and_apply_to():
    encoders = _encoders()
    transformer = _transformer("sd3-medium")
    net = ls.create_network(
        1.0, 4, 4.0, encoders, transformer, train_t5xxl=True, loraplus_lr_ratio="4", loraplus_text_encoder_lr_ratio=2
    )
    groups, names = net.param_groups([1e-5, 2e-5], 1e-4, 1e-3)
    assert names == [
        "textencoder1",
        "textencoder1_plus",
        "textencoder2",
        "textencoder2_plus",
        "textencoder3",
        "textencoder3_plus",
        "unet",
        "unet_plus",
    ]
    assert [g["lr"] for g in groups] == pytest.approx([1e-5, 2e-5, 2e-5, 4e-5, 2e-5, 4e-5, 1e-4, 4e-4])
    assert sum(len(g["params"]) for g in groups) == len(list(net.parameters()))

    _randomize(net, std=1.0)
    scaled, _, top = net.apply_max_norm(0.5)
    assert scaled == len(net.loras) and top == pytest.approx(0.5)
    assert all(float(m.delta_weight().detach().norm()) == pytest.approx(0.5, rel=1e-4) for m in net.loras)

    net.apply_to(train_text_encoder=False)
    assert net.text_encoder_loras == [] and not any(k.startswith("lora_te") for k in net.state_dict())
    base = _run(_transformer("sd3-medium"), "sd3-medium")
    net.set_multiplier(0.0)
    torch.testing.assert_close(_run(transformer, "sd3-medium"), base, atol=0, rtol=0)
    net.set_multiplier(1.0)
    assert (_run(transformer, "sd3-medium") - base).abs().max() > 1e-3


def test_fresh_network_is_identity_and_gradients_reach_every_adapter():
    variant = "sd3.5-medium"
    transformer = _transformer(variant)
    base = _run(transformer, variant)
    net = ls.create_network(1.0, 4, 1.0, [], transformer, emb_dims=ALL_EMB, split_qkv=True, rank_dropout=0.1, module_dropout=0.0)
    net.apply_to()
    torch.testing.assert_close(_run(transformer, variant), base, atol=0, rtol=0)
    _randomize(net)
    net.train()
    transformer(**_inputs(variant))[0].square().mean().backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.any()]
    # the pre-only last block drops the context tokens' attention output, so their queries get no gradient (in SAI's
    # MMDiT as in diffusers'): the q part of that qkv adapter is the one part that cannot learn
    last_q = "lora_unet_joint_blocks_2_context_block_attn_qkv.lora_{}.0.weight"
    assert missing == [last_q.format("down"), last_q.format("up")]


def test_network_args_checks(caplog):
    transformer = _transformer("sd3-medium")
    with pytest.raises(ValueError, match="unknown network_args.*img_attn_dim.*networks.lora_flux"):
        ls.create_network(1.0, 4, 1.0, [], transformer, img_attn_dim=4)
    with pytest.raises(ValueError, match="conv_dim"):
        ls.create_network(1.0, 4, 1.0, [], transformer, conv_dim=4)
    with pytest.raises(ValueError, match="emb_dims needs 6 values"):
        ls.create_network(1.0, 4, 1.0, [], transformer, emb_dims="[1,2,3,4,5]")
    with pytest.raises(ValueError, match="train_block_indices"):
        ls.create_network(1.0, 4, 1.0, [], transformer, train_block_indices="0-5")
    with pytest.raises(ValueError, match="split_qkv"):
        ls.create_network(1.0, 4, 1.0, [], transformer, split_qkv="maybe")
    with caplog.at_level(logging.INFO, logger="networks.lora_sd3"):
        ls.create_network(1.0, 4, 1.0, [], transformer, verbose="True", x_mlp_dim=0)
    assert "lora_unet_joint_blocks_0_x_block_attn_qkv" in caplog.text and "not trained" in caplog.text
    assert "joint_blocks_0_x_block_mlp_fc1" in caplog.text.split("not trained")[1]
