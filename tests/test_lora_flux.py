"""networks.lora_flux: FLUX LoRA with fused (qkv / linear1) adapters in sd-scripts' key layout."""

from __future__ import annotations

import copy

import pytest
import torch

from library.tiny_models import build_tiny_flux
from networks import lora_flux as lf
from networks.lora import LoRAModule

HIDDEN = 32  # tiny FLUX width: 2 heads x 16


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_flux(seed=0)


def _inputs(config, seed=1, img_tokens=6, txt_tokens=4):
    g = torch.Generator().manual_seed(seed)
    return {
        "hidden_states": torch.randn(1, img_tokens, config.in_channels, generator=g),
        "encoder_hidden_states": torch.randn(1, txt_tokens, config.joint_attention_dim, generator=g),
        "pooled_projections": torch.randn(1, config.pooled_projection_dim, generator=g),
        "timestep": torch.tensor([0.7]),
        "img_ids": torch.randn(img_tokens, 3, generator=g),
        "txt_ids": torch.zeros(txt_tokens, 3),
        "guidance": torch.tensor([3.5]) if config.guidance_embeds else None,
        "return_dict": False,
    }


def _run(transformer, inputs):
    with torch.no_grad():
        return transformer(**inputs)[0]


def _randomize(network, seed=0, std=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in network.loras:
            m.lora_down.weight.copy_(torch.randn(m.lora_down.weight.shape, generator=g) * std)
            m.lora_up.weight.copy_(torch.randn(m.lora_up.weight.shape, generator=g) * std)
    return network


def _names(network):
    return {m.lora_name for m in network.loras}


# ------------------------------------------------------------------------------------------------------------- layout


def test_tiny_key_names_and_shapes(tiny):
    net = lf.create_network(1.0, 4, 2.0, [tiny["text_encoder"], tiny["text_encoder_2"]], tiny["transformer"])
    sd = net.state_dict()
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    assert shapes["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"] == (3 * HIDDEN, 4)
    assert shapes["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"] == (4, HIDDEN)
    assert shapes["lora_unet_double_blocks_1_txt_attn_qkv.lora_up.weight"] == (3 * HIDDEN, 4)
    assert shapes["lora_unet_single_blocks_0_linear1.lora_up.weight"] == (3 * HIDDEN + 4 * HIDDEN, 4)
    assert shapes["lora_unet_single_blocks_1_linear2.lora_down.weight"] == (4, HIDDEN + 4 * HIDDEN)
    assert shapes["lora_unet_double_blocks_0_img_mod_lin.lora_up.weight"] == (6 * HIDDEN, 4)
    assert shapes["lora_unet_single_blocks_0_modulation_lin.lora_up.weight"] == (3 * HIDDEN, 4)
    for suffix in ("img_attn_proj", "img_mlp_0", "img_mlp_2", "txt_attn_proj", "txt_mlp_0", "txt_mlp_2", "txt_mod_lin"):
        assert f"lora_unet_double_blocks_1_{suffix}.alpha" in sd
    assert sd["lora_unet_double_blocks_0_img_attn_qkv.alpha"].item() == 2.0
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in sd
    assert "lora_te1_text_model_encoder_layers_1_mlp_fc2.lora_up.weight" in sd
    assert not any(k.startswith("lora_te3_") for k in sd)  # T5 only with train_t5xxl
    assert not any("final_layer" in k or k.startswith(("lora_unet_img_in", "lora_unet_time_in", "lora_unet_txt_in")) for k in sd)
    # 2 double x 10 + 2 single x 3 adapters, each with down/up/alpha; CLIP: 6 per layer
    assert sum(k.startswith("lora_unet_") for k in sd) == (2 * 10 + 2 * 3) * 3
    assert sum(k.startswith("lora_te1_") for k in sd) == tiny["text_encoder"].config.num_hidden_layers * 6 * 3
    assert isinstance(net.lora_unet_double_blocks_0_img_attn_qkv, lf.FusedLoRAModule)
    assert type(net.lora_unet_double_blocks_0_img_attn_proj) is LoRAModule


def test_real_size_shapes_on_meta():
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        transformer = FluxTransformer2DModel(num_layers=19, num_single_layers=38, guidance_embeds=True)
    net = lf.create_network(1.0, 4, 1.0, None, transformer, in_dims="[4,4,4,4,4]")
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert shapes["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"] == (9216, 4)
    assert shapes["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"] == (4, 3072)
    assert shapes["lora_unet_double_blocks_18_txt_attn_qkv.lora_up.weight"] == (9216, 4)
    assert shapes["lora_unet_single_blocks_0_linear1.lora_up.weight"] == (21504, 4)
    assert shapes["lora_unet_single_blocks_37_linear2.lora_down.weight"] == (4, 15360)
    assert shapes["lora_unet_double_blocks_0_img_mod_lin.lora_up.weight"] == (18432, 4)
    assert shapes["lora_unet_double_blocks_0_img_mlp_0.lora_up.weight"] == (12288, 4)
    assert shapes["lora_unet_single_blocks_5_modulation_lin.lora_up.weight"] == (9216, 4)
    assert shapes["lora_unet_txt_in.lora_down.weight"] == (4, 4096)
    assert shapes["lora_unet_img_in.lora_down.weight"] == (4, 64)
    assert shapes["lora_unet_time_in_in_layer.lora_down.weight"] == (4, 256)
    assert shapes["lora_unet_guidance_in_out_layer.lora_up.weight"] == (3072, 4)
    assert shapes["lora_unet_vector_in_in_layer.lora_down.weight"] == (4, 768)
    assert len(net.unet_loras) == 19 * 10 + 38 * 3 + 8


# ---------------------------------------------------------------------------------------------------------- arithmetic


def test_fused_adapter_gives_org_plus_delta_rows(tiny):
    transformer = copy.deepcopy(tiny["transformer"])
    net = _randomize(lf.create_network(0.7, 4, 2.0, [], transformer))
    net.apply_to(False, True)
    for name, parts in [
        ("double_blocks_0_img_attn_qkv", [f"transformer_blocks.0.attn.to_{c}" for c in "qkv"]),
        ("double_blocks_1_txt_attn_qkv", [f"transformer_blocks.1.attn.add_{c}_proj" for c in "qkv"]),
        (
            "single_blocks_1_linear1",
            [f"single_transformer_blocks.1.attn.to_{c}" for c in "qkv"] + ["single_transformer_blocks.1.proj_mlp"],
        ),
    ]:
        m = getattr(net, f"lora_unet_{name}")
        delta = m.lora_up.weight @ m.lora_down.weight * (2.0 / 4) * 0.7
        x = torch.randn(2, 5, HIDDEN)
        row = 0
        for path in parts:
            linear = transformer.get_submodule(path)
            rows = delta[row : row + linear.out_features]
            row += linear.out_features
            expected = torch.nn.functional.linear(x, linear.weight + rows, linear.bias)
            torch.testing.assert_close(linear(x), expected, rtol=1e-5, atol=1e-6)
        assert row == m.lora_up.weight.shape[0]
        # the fused module's own forward is the BFL fused Linear with the adapter
        fused_w = torch.cat([transformer.get_submodule(p).weight for p in parts]) + delta
        fused_b = torch.cat([transformer.get_submodule(p).bias for p in parts])
        torch.testing.assert_close(m(x), torch.nn.functional.linear(x, fused_w, fused_b), rtol=1e-5, atol=1e-6)
    net.restore()
    x = torch.randn(3, HIDDEN)
    to_q = transformer.transformer_blocks[0].attn.to_q
    torch.testing.assert_close(to_q(x), torch.nn.functional.linear(x, to_q.weight, to_q.bias))


def test_down_is_computed_once_per_input(tiny):
    transformer = copy.deepcopy(tiny["transformer"])
    net = _randomize(lf.create_network(1.0, 4, 4.0, [], transformer, train_blocks="double"))
    net.apply_to(False, True)
    m = net.lora_unet_double_blocks_0_img_attn_qkv
    calls = []
    original = m._down
    m._down = lambda x: calls.append(1) or original(x)
    attn = transformer.transformer_blocks[0].attn
    x = torch.randn(1, 3, HIDDEN)
    attn.to_q(x), attn.to_k(x), attn.to_v(x)
    assert len(calls) == 1 and m._cache is None
    attn.to_k(x), attn.to_k(x.clone())  # another input tensor: computed again
    assert len(calls) == 3


def test_fresh_network_is_identity_and_gradients_reach_fused_adapters(tiny):
    transformer = copy.deepcopy(tiny["transformer"])
    inputs = _inputs(transformer.config)
    base = _run(transformer, inputs)
    net = lf.create_network(1.0, 4, 1.0, [], transformer, rank_dropout="0.1", module_dropout="0.0", dropout="0.1")
    net.apply_to(False, True)
    torch.testing.assert_close(_run(transformer, inputs), base)
    transformer.requires_grad_(False)
    net.train()
    out = transformer(**inputs)[0]
    out.square().mean().backward()
    m = net.lora_unet_single_blocks_0_linear1
    assert m.lora_up.weight.grad is not None and m.lora_up.weight.grad.abs().sum() > 0
    assert transformer.single_transformer_blocks[0].attn.to_q.weight.grad is None


# ----------------------------------------------------------------------------------------------------------- selection


def test_train_blocks_and_indices(tiny):
    tr = tiny["transformer"]
    single = _names(lf.create_network(1.0, 4, 1.0, [], tr, train_blocks="single"))
    assert single and all(n.startswith("lora_unet_single_blocks_") for n in single)
    double = _names(lf.create_network(1.0, 4, 1.0, [], tr, train_blocks="double"))
    assert len(double) == 20 and all(n.startswith("lora_unet_double_blocks_") for n in double)
    picked = _names(lf.create_network(1.0, 4, 1.0, [], tr, train_double_block_indices="1", train_single_block_indices="none"))
    assert {n.split("_")[4] for n in picked} == {"1"} and all("double" in n for n in picked)
    ranged = _names(lf.create_network(1.0, 4, 1.0, [], tr, train_double_block_indices="0-1", train_single_block_indices="0"))
    assert "lora_unet_single_blocks_0_linear1" in ranged and "lora_unet_single_blocks_1_linear1" not in ranged
    assert "lora_unet_double_blocks_1_img_mlp_0" in ranged
    assert lf.parse_indices("0-5,10", 19, "x") == {0, 1, 2, 3, 4, 5, 10}
    with pytest.raises(ValueError, match="out of range"):
        lf.create_network(1.0, 4, 1.0, [], tr, train_single_block_indices="0-2")
    with pytest.raises(ValueError, match="train_blocks"):
        lf.create_network(1.0, 4, 1.0, [], tr, train_blocks="middle")


def test_per_layer_dims_and_in_dims(tiny):
    net = lf.create_network(
        1.0,
        4,
        1.0,
        [],
        tiny["transformer"],
        img_attn_dim="8",
        txt_mod_dim="0",
        single_mod_dim="0",
        single_dim="2",
        in_dims="[3,0,2,0,5]",
    )
    ranks = {m.lora_name: m.rank for m in net.loras}
    assert ranks["lora_unet_double_blocks_0_img_attn_qkv"] == 8 and ranks["lora_unet_double_blocks_0_img_attn_proj"] == 8
    assert ranks["lora_unet_double_blocks_0_txt_attn_qkv"] == 4 and ranks["lora_unet_double_blocks_0_img_mod_lin"] == 4
    assert not any("txt_mod_lin" in n or "modulation_lin" in n for n in ranks)
    assert ranks["lora_unet_single_blocks_1_linear1"] == 2 and ranks["lora_unet_single_blocks_1_linear2"] == 2
    assert (
        ranks["lora_unet_img_in"] == 3
        and ranks["lora_unet_vector_in_in_layer"] == 2
        and ranks["lora_unet_vector_in_out_layer"] == 2
    )
    assert ranks["lora_unet_txt_in"] == 5
    assert not any(n.startswith(("lora_unet_time_in", "lora_unet_guidance_in")) for n in ranks)
    with pytest.raises(ValueError, match="5 values"):
        lf.create_network(1.0, 4, 1.0, [], tiny["transformer"], in_dims="[1,2]")


def test_train_t5xxl(tiny):
    tes = [tiny["text_encoder"], tiny["text_encoder_2"]]
    net = lf.create_network(1.0, 4, 1.0, tes, tiny["transformer"], train_t5xxl="True")
    names = _names(net)
    assert "lora_te3_encoder_block_0_layer_0_SelfAttention_q" in names
    assert "lora_te3_encoder_block_1_layer_1_DenseReluDense_wo" in names
    groups, labels = net.param_groups([1e-4, 2e-4], 1e-3, 1e-3)
    assert labels == ["textencoder1", "textencoder2", "unet"] and [g["lr"] for g in groups] == [1e-4, 2e-4, 1e-3]
    assert not any(
        n.startswith("lora_te3_") for n in _names(lf.create_network(1.0, 4, 1.0, tes, tiny["transformer"], train_t5xxl="false"))
    )


@pytest.mark.parametrize("key", ["ggpo_sigma", "ggpo_beta", "network_reg_dims", "network_reg_lrs"])
def test_unsupported_args_refused(tiny, key):
    with pytest.raises(ValueError, match="not supported yet"):
        lf.create_network(1.0, 4, 1.0, [], tiny["transformer"], **{key: "1"})


def test_unknown_args_refused(tiny):
    with pytest.raises(ValueError, match="unknown network_args.*block_dims.*valid:.*img_attn_dim"):
        lf.create_network(1.0, 4, 1.0, [], tiny["transformer"], block_dims="1,2")
    with pytest.raises(ValueError, match="unknown"):
        lf.create_network_from_weights(1.0, {}, [], tiny["transformer"], foo="1")


# ------------------------------------------------------------------------------------- network interface, load, merge


def test_param_groups_loraplus_and_max_norm(tiny):
    net = _randomize(
        lf.create_network(1.0, 4, 4.0, [tiny["text_encoder"]], tiny["transformer"], loraplus_unet_lr_ratio="16"), std=1.0
    )
    groups, labels = net.param_groups(None, 1e-4, 1e-3)
    assert labels == ["textencoder", "unet", "unet_plus"] and groups[2]["lr"] == pytest.approx(1.6e-3)
    ups = {id(p) for p in groups[2]["params"]}
    assert id(net.lora_unet_single_blocks_0_linear1.lora_up.weight) in ups
    scaled, _, biggest = net.apply_max_norm(1.0)
    assert scaled > 0 and biggest <= 1.0 + 1e-6
    for m in net.loras:
        assert m.delta_weight().norm() <= 1.0 + 1e-4


@pytest.mark.parametrize("split_qkv", [False, True])
def test_max_norm_of_fused_and_split_adapters(tiny, split_qkv, monkeypatch):
    """FLUX's fused qkv / linear1 adapters and their split_qkv parts: results equal the per-module reference (a
    split adapter's norm is that of its stacked delta, and all its parts scale together), with one device read."""
    from test_lora_network import DeviceReads, check_max_norm_against_reference, spread_norms

    kwargs = {"split_qkv": "True"} if split_qkv else {}
    net = spread_norms(lf.create_network(1.0, 4, 2.0, [tiny["text_encoder"]], tiny["transformer"], **kwargs))
    assert any(isinstance(m, lf.SplitLoRAModule) for m in net.loras) == split_qkv
    check_max_norm_against_reference(net, 1.5)
    reads = DeviceReads()
    reads.patch_tolist(monkeypatch)
    with reads:
        net.apply_max_norm(0.2)
    assert reads.count <= 1


def test_state_dict_round_trip_and_from_weights(tiny):
    tes = [tiny["text_encoder"]]
    transformer = copy.deepcopy(tiny["transformer"])
    inputs = _inputs(transformer.config)
    net = _randomize(lf.create_network(1.0, 4, 2.0, tes, transformer, img_attn_dim="6", in_dims="[2,2,2,2,2]"))
    sd = {k: v.clone() for k, v in net.state_dict().items()}
    sd["lora_unet_single_blocks_0_linear1.alpha"] = torch.tensor(1.0)  # a per-module alpha from the file
    net.load_weights(sd)
    net.apply_to(True, True)
    expected = _run(transformer, inputs)
    net.restore()

    other = lf.create_network_from_weights(1.0, sd, tes, transformer)
    assert {m.lora_name: m.rank for m in other.loras} == {m.lora_name: m.rank for m in net.loras}
    assert other.load_weights(sd) == []
    other.apply_to(True, True)
    torch.testing.assert_close(_run(transformer, inputs), expected)
    other.restore()
    fresh = lf.create_network(1.0, 4, 2.0, tes, transformer)
    with pytest.raises(ValueError, match="shape"):
        fresh.load_weights(sd)


def _kohya_to_peft_dense(sd, transformer):
    """ai-toolkit style copy of a kohya file: every projection of a fused adapter gets the full down and its up rows."""
    out = {}
    for name, paths in lf.transformer_candidates(transformer):
        if name + ".lora_down.weight" not in sd:
            continue
        down, up = sd[name + ".lora_down.weight"], sd[name + ".lora_up.weight"]
        scale = sd[name + ".alpha"].item() / down.shape[0]
        rows = torch.split(up, [transformer.get_submodule(p).out_features for p in paths])
        for p, r in zip(paths, rows):
            out[f"transformer.{p}.lora_A.weight"] = down.clone()
            out[f"transformer.{p}.lora_B.weight"] = r * scale
    return out


def test_peft_layout_loads_like_the_kohya_file(tiny):
    transformer = copy.deepcopy(tiny["transformer"])
    inputs = _inputs(transformer.config)
    net = _randomize(lf.create_network(1.0, 4, 2.0, [], transformer, in_dims="[2,2,2,2,2]"))
    kohya = net.state_dict()
    net.apply_to(False, True)
    expected = _run(transformer, inputs)
    net.restore()

    peft = _kohya_to_peft_dense(kohya, transformer)
    converted = lf.peft_to_kohya(peft, transformer)
    assert converted["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"].shape == (12, HIDDEN)
    assert converted["lora_unet_double_blocks_0_img_attn_qkv.alpha"].item() == 12.0
    assert converted["lora_unet_single_blocks_0_linear1.lora_up.weight"].shape == (7 * HIDDEN, 16)
    loaded = lf.create_network_from_weights(1.0, peft, [], transformer)
    assert loaded.load_weights(peft) == []
    loaded.apply_to(False, True)
    torch.testing.assert_close(_run(transformer, inputs), expected, rtol=1e-5, atol=1e-5)


def test_peft_layout_with_alphas_ranks_and_missing_parts(tiny):
    """Separate q/k/v of different ranks and alphas, no proj_mlp adapter: equals a hand merge of each B @ A."""
    transformer = copy.deepcopy(tiny["transformer"])
    text_encoder = copy.deepcopy(tiny["text_encoder"])
    inputs = _inputs(transformer.config)
    g = torch.Generator().manual_seed(3)
    peft, merged = {}, copy.deepcopy(transformer)
    paths = [f"single_transformer_blocks.0.attn.to_{c}" for c in "qkv"] + [
        "transformer_blocks.1.attn.to_k",
        "transformer_blocks.0.norm1.linear",
    ]
    for i, p in enumerate(paths):
        linear = transformer.get_submodule(p)
        rank, alpha = 2 + i, 1.0 + i
        a = torch.randn(rank, linear.in_features, generator=g) * 0.2
        b = torch.randn(linear.out_features, rank, generator=g) * 0.2
        peft[f"transformer.{p}.lora_A.weight"], peft[f"transformer.{p}.lora_B.weight"] = a, b
        peft[f"transformer.{p}.alpha"] = torch.tensor(alpha)
        with torch.no_grad():
            merged.get_submodule(p).weight += b @ a * (alpha / rank)
    te_path = "text_model.encoder.layers.0.self_attn.q_proj"
    te_width = text_encoder.config.hidden_size
    peft[f"text_encoder.{te_path}.lora_A.weight"] = torch.randn(2, te_width, generator=g)
    peft[f"text_encoder.{te_path}.lora_B.weight"] = torch.randn(te_width, 2, generator=g)
    peft["transformer.not_a_module.lora_A.weight"] = torch.zeros(1, 1)
    peft["transformer.not_a_module.lora_B.weight"] = torch.zeros(1, 1)

    net = lf.create_network_from_weights(1.0, peft, [text_encoder], transformer)
    assert net.lora_unet_single_blocks_0_linear1.lora_up.weight.shape == (7 * HIDDEN, 2 + 3 + 4)
    assert "lora_unet_double_blocks_1_txt_attn_qkv" not in _names(net)  # add_k_proj is txt; to_k is img
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj" in _names(net)
    assert net.load_weights(peft) == ["transformer.not_a_module.lora_A.weight", "transformer.not_a_module.lora_B.weight"]
    net.apply_to(True, True)
    torch.testing.assert_close(_run(transformer, inputs), _run(merged, inputs), rtol=1e-4, atol=1e-5)


def test_merge_into_transformer_equals_applied_network(tiny):
    transformer = copy.deepcopy(tiny["transformer"])
    clip = copy.deepcopy(tiny["text_encoder"])
    inputs = _inputs(transformer.config)
    ids = torch.tensor([[1, 5, 7, 2]])
    net = _randomize(lf.create_network(1.0, 4, 2.0, [clip], transformer, in_dims="[2,2,2,2,2]"))
    sd = net.state_dict()
    net.apply_to(True, True)
    net.set_multiplier(0.6)
    expected = _run(transformer, inputs)
    with torch.no_grad():
        expected_te = clip(ids).last_hidden_state
    net.restore()
    base = _run(transformer, inputs)
    assert (expected - base).abs().max() > 1e-2

    count = lf.merge_into_transformer(sd, 0.6, transformer, [clip])
    assert count == len(net.loras)
    torch.testing.assert_close(_run(transformer, inputs), expected, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(clip(ids).last_hidden_state, expected_te, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="match nothing"):
        lf.merge_into_transformer(
            {
                "lora_unet_double_blocks_9_img_mod_lin.lora_down.weight": torch.zeros(1, HIDDEN),
                "lora_unet_double_blocks_9_img_mod_lin.lora_up.weight": torch.zeros(6 * HIDDEN, 1),
            },
            1.0,
            transformer,
        )


# ------------------------------------------------------------------------------------------ the independent oracle


def _width_3072_flux(seed=0):
    """Real-width FLUX with 1 double and 1 single block, float32, weights ~N(0, 0.02) (norm scales 1, biases 0)."""
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        transformer = FluxTransformer2DModel(num_layers=1, num_single_layers=1, guidance_embeds=True)
    transformer = transformer.to_empty(device="cpu")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0 if "norm" in name and name.endswith("weight") else 0.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
    return transformer.eval()


def test_diffusers_loads_the_kohya_file_with_the_same_output():
    """diffusers' kohya-FLUX converter (which assumes width 3072) + PEFT loading gives kiln's output."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    transformer = _width_3072_flux()
    inputs = _inputs(transformer.config, img_tokens=4, txt_tokens=3)
    net = _randomize(lf.create_network(1.0, 4, 2.0, [], transformer), std=0.05)
    sd = {k: v.clone() for k, v in net.state_dict().items()}
    sd["lora_unet_double_blocks_0_img_attn_qkv.alpha"] = torch.tensor(8.0)  # scale 2 for one fused module
    sd["lora_unet_single_blocks_0_linear1.alpha"] = torch.tensor(1.0)
    net.load_weights(sd)
    assert net.lora_unet_single_blocks_0_linear1.lora_up.weight.shape == (21504, 4)

    base = _run(transformer, inputs)
    net.apply_to(False, True)
    kiln = _run(transformer, inputs)
    net.restore()
    assert (kiln - base).abs().max() > 100 * 1e-4

    converted = _convert_kohya_flux_lora_to_diffusers({k: v.clone() for k, v in sd.items()})
    assert all(k.startswith("transformer.") for k in converted)
    # the PEFT-layout (ai-toolkit) file diffusers made loads into kiln with the same output
    peft_net = lf.create_network_from_weights(1.0, converted, [], transformer)
    assert peft_net.load_weights(converted) == []
    peft_net.apply_to(False, True)
    torch.testing.assert_close(_run(transformer, inputs), kiln, rtol=1e-4, atol=1e-4)
    peft_net.restore()

    transformer.load_lora_adapter(converted, prefix="transformer", adapter_name="kohya")
    loaded_keys = {n for n, _ in transformer.named_modules() if n.endswith("lora_A.kohya")}
    assert len(loaded_keys) == 3 * 2 + 4 + 8 + 2  # q/k/v x 2 streams, single q/k/v/mlp, 8 other double, 2 other single
    diffusers_out = _run(transformer, inputs)
    torch.testing.assert_close(diffusers_out, kiln, rtol=1e-4, atol=1e-4)
