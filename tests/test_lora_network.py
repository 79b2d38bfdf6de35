"""networks.lora and networks.merge on the tiny SD1 models: which modules get adapters and their kohya names, the
adapter arithmetic (org(x) + up(down(x)) * multiplier * alpha / rank), dropouts, sd-scripts' 25-block index and
block_dims, optimizer groups and LoRA+, max-norm regularisation, loading state dicts, and merging LoRAs."""

from __future__ import annotations

import contextlib
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from library.tiny_models import build_tiny_sd
from networks import merge
from networks.lora import (
    KNOWN_ARGS,
    NUM_SD_BLOCKS,
    LoRAModule,
    LoRANetwork,
    create_network,
    create_network_from_weights,
    dims_from_weights,
    lora_delta,
    parse_network_args,
    sd_block_index,
)

SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")
ATTN_CHILDREN = [
    "proj_in",
    "proj_out",
    *[f"transformer_blocks_0_{a}_{p}" for a in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v", "to_out_0")],
    "transformer_blocks_0_ff_net_0_proj",
    "transformer_blocks_0_ff_net_2",
]
# the tiny SD1 U-Net's Transformer2DModels (two levels: CrossAttnDown, Down / Up, CrossAttnUp; layers_per_block 1)
ATTENTIONS = ["down_blocks_0_attentions_0", "mid_block_attentions_0", "up_blocks_1_attentions_0", "up_blocks_1_attentions_1"]
TE_CHILDREN = ["self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj", "mlp_fc1", "mlp_fc2"]


# ---------------------------------------------------------------------------------------------------------------------
# fixtures and helpers


@pytest.fixture(scope="module")
def sd():
    parts = build_tiny_sd()
    for m in (parts["unet"], parts["text_encoder"]):
        m.eval().requires_grad_(False)
    return parts


@pytest.fixture(scope="module")
def unet_inputs():
    g = torch.Generator().manual_seed(1)
    return (torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 500]), torch.randn(2, 77, 64, generator=g))


@pytest.fixture(scope="module")
def te_ids():
    g = torch.Generator().manual_seed(2)
    return torch.randint(0, 512, (2, 77), generator=g)


@pytest.fixture(scope="module")
def base_outputs(sd, unet_inputs, te_ids):
    return unet_out(sd["unet"], unet_inputs), te_out(sd["text_encoder"], te_ids)


def unet_out(unet, inputs):
    with torch.no_grad():
        return unet(*inputs).sample


def te_out(te, ids):
    with torch.no_grad():
        return te(ids).last_hidden_state


@contextlib.contextmanager
def applied(network, train_te=True, train_unet=True):
    network.apply_to(train_te, train_unet)
    try:
        yield network
    finally:
        network.restore()


def randomize(network, seed=0, std=0.1):
    """Give every adapter a non-zero up (and a fresh down) so that it changes the model."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in network.loras:
            m.lora_down.weight.copy_(torch.randn(m.lora_down.weight.shape, generator=g) * std)
            m.lora_up.weight.copy_(torch.randn(m.lora_up.weight.shape, generator=g) * std)
    return network


def net(sd, **kwargs):
    kwargs.setdefault("network_dim", 4)
    kwargs.setdefault("network_alpha", 1)
    dim, alpha = kwargs.pop("network_dim"), kwargs.pop("network_alpha")
    return create_network(1.0, dim, alpha, [sd["text_encoder"]], sd["unet"], **kwargs)


def inside(root: nn.Module, classes: tuple[str, ...]) -> dict[str, nn.Module]:
    """path -> module of every Linear/Conv2d below a module of one of `classes` (computed independently)."""
    out = {}
    for name, module in root.named_modules():
        if module.__class__.__name__ in classes:
            for child_name, child in module.named_modules():
                if isinstance(child, (nn.Linear, nn.Conv2d)):
                    out[f"{name}.{child_name}"] = child
    return out


# ---------------------------------------------------------------------------------------------------------------------
# targets and names


def test_unet_targets_transformer_linears_and_1x1_convs(sd):
    network = net(sd)
    names = {m.lora_name: m for m in network.unet_loras}
    expected = {f"lora_unet_{a}_{c}" for a in ATTENTIONS for c in ATTN_CHILDREN}
    assert set(names) == expected
    # every Linear / Conv2d inside a Transformer2DModel, and nothing else
    wanted = inside(sd["unet"], ("Transformer2DModel",))
    assert {id(m) for m in wanted.values()} == {id(m.org_module) for m in network.unet_loras}
    for name in [
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
        "lora_unet_down_blocks_0_attentions_0_proj_in",
        "lora_unet_up_blocks_1_attentions_1_transformer_blocks_0_ff_net_0_proj",
        "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_2",
        "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k",
    ]:
        assert name in names
    # SD1's proj_in / proj_out are 1x1 convs: conv adapters of the linear rank
    proj_in = names["lora_unet_down_blocks_0_attentions_0_proj_in"]
    assert isinstance(proj_in.org_module, nn.Conv2d) and proj_in.org_module.kernel_size == (1, 1)
    assert isinstance(proj_in.lora_down, nn.Conv2d) and proj_in.lora_down.weight.shape == (4, 32, 1, 1)
    assert proj_in.lora_up.weight.shape == (32, 4, 1, 1)
    assert all(m.rank == 4 for m in network.unet_loras)
    # the org module is resolved by its path: to_out.0 -> to_out_0, ff.net.0.proj -> ff_net_0_proj
    unet = sd["unet"]
    blk = unet.down_blocks[0].attentions[0].transformer_blocks[0]
    assert names["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0"].org_module is blk.attn1.to_out[0]
    assert names["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_0_proj"].org_module is blk.ff.net[0].proj
    assert names["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"].org_module is blk.attn2.to_k
    # cross attention: to_k / to_v read the 64-wide text states
    assert names["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"].lora_down.weight.shape == (4, 64)


def test_conv_dim_adds_resnet_and_sampler_convs(sd):
    network = net(sd, conv_dim="2", conv_alpha="0.5")
    names = {m.lora_name: m for m in network.unet_loras}
    conv_paths = inside(sd["unet"], ("ResnetBlock2D", "Downsample2D", "Upsample2D"))
    expected_conv = {"lora_unet_" + p.replace(".", "_") for p in conv_paths}
    expected_attn = {f"lora_unet_{a}_{c}" for a in ATTENTIONS for c in ATTN_CHILDREN}
    assert set(names) == expected_conv | expected_attn
    for path, module in conv_paths.items():
        m = names["lora_unet_" + path.replace(".", "_")]
        assert m.org_module is module
        if isinstance(module, nn.Conv2d) and module.kernel_size == (3, 3):
            assert (m.rank, m.alpha.item()) == (2, 0.5), path
            assert m.lora_down.weight.shape == (2, module.in_channels, 3, 3)
            assert m.lora_up.weight.shape == (module.out_channels, 2, 1, 1)
            assert m.lora_down.stride == module.stride and m.lora_down.padding == module.padding
        else:  # time_emb_proj (Linear), conv_shortcut (1x1): the linear rank and alpha
            assert (m.rank, m.alpha.item()) == (4, 1.0), path
    for name in [
        "lora_unet_down_blocks_0_resnets_0_conv1",
        "lora_unet_down_blocks_0_resnets_0_conv2",
        "lora_unet_down_blocks_0_resnets_0_time_emb_proj",
        "lora_unet_down_blocks_0_downsamplers_0_conv",
        "lora_unet_down_blocks_1_resnets_0_conv_shortcut",
        "lora_unet_up_blocks_0_upsamplers_0_conv",
        "lora_unet_mid_block_resnets_1_conv2",
    ]:
        assert name in names
    assert names["lora_unet_down_blocks_0_downsamplers_0_conv"].lora_down.stride == (2, 2)
    # outside the target blocks: nothing (conv_in, conv_out, time embedding)
    assert not any(n.startswith(("lora_unet_conv_in", "lora_unet_conv_out", "lora_unet_time_embedding")) for n in names)
    # conv_alpha defaults to 1
    assert {m.alpha.item() for m in net(sd, conv_dim="2").unet_loras if m.rank == 2} == {1.0}


def test_text_encoder_targets(sd):
    network = net(sd)
    te = sd["text_encoder"]
    names = {m.lora_name: m for m in network.text_encoder_loras}
    n_layers = te.config.num_hidden_layers
    assert set(names) == {f"lora_te_text_model_encoder_layers_{i}_{c}" for i in range(n_layers) for c in TE_CHILDREN}
    layer0 = te.encoder.layers[0] if not hasattr(te, "text_model") else te.text_model.encoder.layers[0]
    assert names["lora_te_text_model_encoder_layers_0_self_attn_q_proj"].org_module is layer0.self_attn.q_proj
    assert names["lora_te_text_model_encoder_layers_0_mlp_fc2"].org_module is layer0.mlp.fc2
    assert names["lora_te_text_model_encoder_layers_0_mlp_fc1"].lora_down.weight.shape == (4, 64)
    assert names["lora_te_text_model_encoder_layers_0_mlp_fc1"].lora_up.weight.shape == (37, 4)
    # embeddings / final norm are not adapted
    assert not any("embeddings" in n or "final_layer_norm" in n for n in names)


def test_two_text_encoders_get_numbered_prefixes(sd):
    te1 = sd["text_encoder"]
    te2 = copy.deepcopy(te1)
    network = LoRANetwork([te1, te2], None)
    prefixes = {m.lora_name.split("_text_model")[0] for m in network.text_encoder_loras}
    assert prefixes == {"lora_te1", "lora_te2"}
    assert network.unet_loras == []


def test_state_dict_layout(sd):
    network = net(sd, conv_dim="2")
    state = network.state_dict()
    expected = {m.lora_name + s for m in network.loras for s in SUFFIXES}
    assert set(state) == expected
    for m in network.loras:
        assert state[m.lora_name + ".alpha"].shape == ()
        assert state[m.lora_name + ".lora_down.weight"].shape[0] == m.rank
    # no weights of the wrapped model leak into the file
    assert not any(".org" in k or "_org" in k for k in state)


def test_apply_to_drops_untrained_parts(sd, unet_inputs, te_ids, base_outputs):
    network = randomize(net(sd))
    with applied(network, train_te=False, train_unet=True):
        assert network.text_encoder_loras == []
        assert all(k.startswith("lora_unet_") for k in network.state_dict())
        assert torch.equal(te_out(sd["text_encoder"], te_ids), base_outputs[1])
        assert not torch.allclose(unet_out(sd["unet"], unet_inputs), base_outputs[0])


# ---------------------------------------------------------------------------------------------------------------------
# mechanics


def test_fresh_network_is_identity(sd, unet_inputs, te_ids, base_outputs):
    network = net(sd, conv_dim="2")
    assert all(torch.count_nonzero(m.lora_up.weight) == 0 for m in network.loras)
    assert all(torch.count_nonzero(m.lora_down.weight) > 0 for m in network.loras)
    with applied(network):
        assert torch.equal(unet_out(sd["unet"], unet_inputs), base_outputs[0])
        assert torch.equal(te_out(sd["text_encoder"], te_ids), base_outputs[1])


def test_linear_adapter_arithmetic_and_restore(sd, unet_inputs, base_outputs):
    network = LoRANetwork([], sd["unet"], rank=4, alpha=2.0, multiplier=0.7)
    m = {x.lora_name: x for x in network.unet_loras}["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"]
    lin = m.org_module
    original_forward = lin.forward
    g = torch.Generator().manual_seed(3)
    down = torch.randn(4, lin.in_features, generator=g)
    up = torch.randn(lin.out_features, 4, generator=g)
    with torch.no_grad():
        m.lora_down.weight.copy_(down)
        m.lora_up.weight.copy_(up)
    x = torch.randn(2, 5, lin.in_features, generator=g)
    base = F.linear(x, lin.weight, lin.bias)
    expected = base + (x @ down.T @ up.T) * 0.7 * (2.0 / 4)
    with applied(network):
        assert lin.forward != original_forward
        with torch.no_grad():
            assert torch.allclose(lin(x), expected, atol=1e-5)
            # delta_weight / lora_delta: same change as a modified weight
            delta = m.delta_weight()
            assert torch.allclose(delta, up @ down * 0.5, atol=1e-6)
            assert torch.allclose(lin(x), F.linear(x, lin.weight + 0.7 * delta, lin.bias), atol=1e-5)
            assert not torch.allclose(unet_out(sd["unet"], unet_inputs), base_outputs[0])
            network.set_multiplier(0)
            assert torch.equal(lin(x), base)
            assert torch.equal(unet_out(sd["unet"], unet_inputs), base_outputs[0])
            network.set_multiplier(1.5)
            assert torch.allclose(lin(x), base + (x @ down.T @ up.T) * 1.5 * 0.5, atol=1e-5)
    # restore() puts the original forward back: base output even with non-zero up
    assert lin.forward == original_forward
    with torch.no_grad():
        assert torch.equal(lin(x), base)
    assert torch.equal(unet_out(sd["unet"], unet_inputs), base_outputs[0])
    # apply twice does not chain the adapter twice
    network.set_multiplier(1.0)
    m.apply_to()
    m.apply_to()
    try:
        with torch.no_grad():
            assert torch.allclose(lin(x), base + (x @ down.T @ up.T) * 0.5, atol=1e-5)
    finally:
        m.restore()
    assert lin.forward == original_forward


@pytest.mark.parametrize("alpha", [None, 0])
def test_alpha_none_or_zero_means_rank(sd, alpha):
    module = LoRAModule("x", nn.Linear(8, 6), rank=3, alpha=alpha)
    assert module.alpha.item() == 3 and module.scale == 1.0
    network = LoRANetwork([sd["text_encoder"]], None, rank=5, alpha=alpha)
    assert {m.alpha.item() for m in network.loras} == {5.0}
    assert {m.scale for m in network.loras} == {1.0}


def test_alpha_scale():
    module = LoRAModule("x", nn.Linear(8, 6), rank=4, alpha=1.0)
    assert module.scale == 0.25 and module.alpha.item() == 1.0
    assert module.alpha.dtype == torch.float32


def test_lora_delta_matches_3x3_conv_module(sd):
    network = net(sd, conv_dim="3", conv_alpha="1.5")
    mods = {m.lora_name: m for m in network.unet_loras}
    g = torch.Generator().manual_seed(4)
    for name, stride in [("lora_unet_down_blocks_0_resnets_0_conv1", 1), ("lora_unet_down_blocks_0_downsamplers_0_conv", 2)]:
        m = mods[name]
        conv = m.org_module
        assert conv.kernel_size == (3, 3) and conv.stride == (stride, stride)
        with torch.no_grad():
            m.lora_down.weight.copy_(torch.randn(m.lora_down.weight.shape, generator=g))
            m.lora_up.weight.copy_(torch.randn(m.lora_up.weight.shape, generator=g))
        m.multiplier = 0.8
        x = torch.randn(2, conv.in_channels, 8, 8, generator=g)
        delta = lora_delta(m.lora_down.weight, m.lora_up.weight, m.scale)
        assert delta.shape == conv.weight.shape
        assert m.scale == 0.5
        expected = F.conv2d(x, conv.weight + 0.8 * delta, conv.bias, conv.stride, conv.padding)
        m.apply_to()
        try:
            with torch.no_grad():
                got = conv(x)
        finally:
            m.restore()
        assert got.shape == expected.shape
        assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4)


def test_lora_delta_1x1_conv_and_linear():
    g = torch.Generator().manual_seed(5)
    down, up = torch.randn(3, 7, generator=g), torch.randn(5, 3, generator=g)
    assert torch.allclose(lora_delta(down, up, 0.5), 0.5 * up @ down)
    d4 = lora_delta(down[:, :, None, None], up[:, :, None, None], 0.5)
    assert d4.shape == (5, 7, 1, 1)
    assert torch.allclose(d4[:, :, 0, 0], 0.5 * up @ down)
    conv = nn.Conv2d(7, 5, 1)
    m = LoRAModule("c", conv, rank=3, alpha=1.5)
    with torch.no_grad():
        m.lora_down.weight.copy_(down[:, :, None, None])
        m.lora_up.weight.copy_(up[:, :, None, None])
    x = torch.randn(2, 7, 4, 4, generator=g)
    m.apply_to()
    with torch.no_grad():
        got = conv(x)
    m.restore()
    assert torch.allclose(got, F.conv2d(x, conv.weight + m.delta_weight(), conv.bias), atol=1e-5)


def test_half_precision_base_with_float_adapter():
    torch.manual_seed(0)
    lin = nn.Linear(6, 5).to(torch.bfloat16)
    m = LoRAModule("m", lin, rank=3, alpha=3)
    randomize_module(m)
    x = torch.randn(2, 6).to(torch.bfloat16)
    m.apply_to()
    with torch.no_grad():
        out = lin(x)
    m.restore()
    assert out.dtype == torch.bfloat16
    expected = F.linear(x.float(), lin.weight.float() + m.delta_weight(), lin.bias.float())
    assert torch.allclose(out.float(), expected, rtol=2e-2, atol=5e-2)


def test_gradients_reach_adapters_only():
    torch.manual_seed(0)
    lin = nn.Linear(6, 5).requires_grad_(False)
    m = LoRAModule("m", lin, rank=3, alpha=1)
    m.apply_to()
    lin(torch.randn(4, 6)).square().sum().backward()
    m.restore()
    assert lin.weight.grad is None
    assert m.lora_up.weight.grad.abs().sum() > 0
    assert torch.count_nonzero(m.lora_down.weight.grad) == 0  # up starts at zero
    assert not m.alpha.requires_grad


# ---------------------------------------------------------------------------------------------------------------------
# dropouts


def identity_adapter(org: nn.Module, rank: int, **kwargs) -> LoRAModule:
    """An adapter with down = up = identity on a zero org module: its output is the masked hidden state itself."""
    with torch.no_grad():
        org.weight.zero_()
        if org.bias is not None:
            org.bias.zero_()
    m = LoRAModule("m", org, rank=rank, alpha=rank, **kwargs)
    eye = torch.eye(rank)
    with torch.no_grad():
        m.lora_down.weight.copy_(eye.reshape(m.lora_down.weight.shape))
        m.lora_up.weight.copy_(eye.reshape(m.lora_up.weight.shape))
    m.apply_to()
    return m


def test_dropouts_do_nothing_in_eval():
    torch.manual_seed(0)
    lin = nn.Linear(6, 5)
    m = LoRAModule("m", lin, rank=3, alpha=3, dropout=0.5, rank_dropout=0.5, module_dropout=0.5)
    randomize_module(m)
    x = torch.randn(4, 6)
    expected = F.linear(x, lin.weight + m.delta_weight(), lin.bias)
    m.apply_to()
    m.eval()
    with torch.no_grad():
        outs = [lin(x) for _ in range(20)]
    m.restore()
    for out in outs:
        assert torch.allclose(out, expected, atol=1e-5)


def randomize_module(m: LoRAModule, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        m.lora_down.weight.copy_(torch.randn(m.lora_down.weight.shape, generator=g))
        m.lora_up.weight.copy_(torch.randn(m.lora_up.weight.shape, generator=g))


def test_module_dropout_one_gives_base_output():
    torch.manual_seed(0)
    lin = nn.Linear(6, 5)
    m = LoRAModule("m", lin, rank=3, alpha=3, module_dropout=1.0)
    randomize_module(m)
    x = torch.randn(4, 6)
    base = F.linear(x, lin.weight, lin.bias)
    m.apply_to()
    m.train()
    with torch.no_grad():
        assert all(torch.equal(lin(x), base) for _ in range(10))
        m.eval()
        assert not torch.allclose(lin(x), base)
    m.restore()


def test_module_dropout_network_wide(sd, unet_inputs, base_outputs):
    network = randomize(LoRANetwork([], sd["unet"], module_dropout=1.0))
    network.train()
    with applied(network):
        assert torch.equal(unet_out(sd["unet"], unet_inputs), base_outputs[0])


def test_rank_dropout_mask_shape_linear_tokens():
    torch.manual_seed(0)
    rank, p = 16, 0.5
    m = identity_adapter(nn.Linear(rank, rank), rank, rank_dropout=p)
    m.train()
    x = torch.ones(8, 5, rank)  # (B, L, C)
    with torch.no_grad():
        out = m.org_module(x)
    m.restore()
    # each value is 0 (dropped) or 1 / (1 - p) (kept and rescaled)
    kept = 1 / (1 - p)
    assert torch.all((out == 0) | torch.isclose(out, torch.tensor(kept)))
    # the mask is per (sample, rank channel): the same for every token of a sample
    assert torch.equal(out, out[:, :1, :].expand_as(out))
    # and not the same for every sample (probability of 8 equal random 16-bit masks is negligible)
    assert not all(torch.equal(out[0], out[b]) for b in range(1, 8))
    assert 0 < (out == 0).float().mean() < 1


def test_rank_dropout_mask_shape_linear_2d_and_conv():
    torch.manual_seed(1)
    rank, p = 16, 0.25
    m = identity_adapter(nn.Linear(rank, rank), rank, rank_dropout=p)
    m.train()
    with torch.no_grad():
        out = m.org_module(torch.ones(6, rank))  # (B, C), as time_emb_proj sees
    m.restore()
    assert out.shape == (6, rank)
    assert torch.all((out == 0) | torch.isclose(out, torch.tensor(1 / (1 - p))))

    conv = nn.Conv2d(rank, rank, 1)
    m = identity_adapter(conv, rank, rank_dropout=p)
    m.train()
    with torch.no_grad():
        out = conv(torch.ones(6, rank, 4, 3))  # (B, C, H, W)
    m.restore()
    assert out.shape == (6, rank, 4, 3)
    assert torch.all((out == 0) | torch.isclose(out, torch.tensor(1 / (1 - p))))
    # one mask value per (sample, channel), shared by every pixel
    assert torch.equal(out, out[:, :, :1, :1].expand_as(out))
    assert 0 < (out == 0).float().mean() < 1


def test_rank_dropout_keeps_expected_value():
    torch.manual_seed(2)
    lin = nn.Linear(6, 5)
    m = LoRAModule("m", lin, rank=8, alpha=4, rank_dropout=0.3)
    randomize_module(m)
    x = torch.randn(3, 4, 6)
    with torch.no_grad():
        expected = F.linear(x, lin.weight + m.delta_weight(), lin.bias)
        m.apply_to()
        m.train()
        mean = torch.stack([lin(x) for _ in range(3000)]).mean(0)
        m.restore()
    spread = (expected - F.linear(x, lin.weight, lin.bias)).abs().mean()
    assert (mean - expected).abs().mean() < 0.1 * spread


def test_neuron_dropout_in_train_mode():
    torch.manual_seed(3)
    rank = 32
    m = identity_adapter(nn.Linear(rank, rank), rank, dropout=0.5)
    m.train()
    with torch.no_grad():
        out = m.org_module(torch.ones(4, 10, rank))
    m.restore()
    # element-wise dropout on the down output (rescaled by 1 / (1 - p) by F.dropout)
    assert torch.all((out == 0) | torch.isclose(out, torch.tensor(2.0)))
    assert not torch.equal(out, out[:, :1, :].expand_as(out))


def test_create_network_dropout_args(sd):
    network = net(sd, neuron_dropout=0.1, rank_dropout="0.2", module_dropout="0.3")
    assert {(m.dropout, m.rank_dropout, m.module_dropout) for m in network.loras} == {(0.1, 0.2, 0.3)}
    network = net(sd, neuron_dropout=0.1, dropout="0.4")  # network_args dropout wins over --network_dropout
    assert {m.dropout for m in network.loras} == {0.4}


# ---------------------------------------------------------------------------------------------------------------------
# sd-scripts' 25 blocks


@pytest.mark.parametrize(
    "name, index",
    [
        ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", 1),
        ("lora_unet_down_blocks_0_resnets_0_conv1", 1),
        ("lora_unet_down_blocks_0_attentions_1_proj_in", 2),
        ("lora_unet_down_blocks_0_downsamplers_0_conv", 3),
        ("lora_unet_down_blocks_1_resnets_0_conv1", 4),
        ("lora_unet_down_blocks_1_attentions_1_proj_out", 5),
        ("lora_unet_down_blocks_2_downsamplers_0_conv", 9),
        ("lora_unet_down_blocks_3_resnets_1_conv2", 11),
        ("lora_unet_mid_block_attentions_0_proj_in", 12),
        ("lora_unet_mid_block_resnets_1_conv1", 12),
        ("lora_unet_up_blocks_0_resnets_0_conv1", 13),
        ("lora_unet_up_blocks_0_upsamplers_0_conv", 15),
        ("lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k", 16),
        ("lora_unet_up_blocks_2_resnets_2_conv_shortcut", 21),
        ("lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_ff_net_2", 24),
        ("lora_te_text_model_encoder_layers_0_mlp_fc1", -1),
        ("lora_unet_conv_in", -1),
    ],
)
def test_sd_block_index(name, index):
    assert sd_block_index(name) == index


def reference_block_index(name: str) -> int:
    """sd-scripts' get_block_index, written out: down i.j -> 1 + 3i + j, samplers j = 2, mid 12, up 13 + 3i + j."""
    for kind in ("down", "up"):
        if f"{kind}_blocks_" in name:
            i = int(name.split(f"{kind}_blocks_")[1].split("_")[0])
            rest = name.split(f"{kind}_blocks_{i}_")[1]
            sub, j = rest.split("_")[0], int(rest.split("_")[1])
            idx = 3 * i + (2 if sub in ("downsamplers", "upsamplers") else j)
            return (1 if kind == "down" else 13) + idx
    return 12 if "mid_block_" in name else -1


def test_sd_block_index_covers_tiny_unet(sd):
    network = net(sd, conv_dim="2")
    indices = {m.lora_name: sd_block_index(m.lora_name) for m in network.unet_loras}
    assert all(indices[n] == reference_block_index(n) for n in indices)
    assert set(indices.values()) == {1, 3, 4, 12, 13, 14, 15, 16, 17}


def block_list(**values):
    """25 block values, 0 unless given as b<index>=value."""
    out = [0] * NUM_SD_BLOCKS
    for k, v in values.items():
        out[int(k[1:])] = v
    return out


def test_block_dims_set_per_module_ranks(sd):
    dims = block_list(b1=2, b12=3, b16=0, b17=5)
    alphas = [float(i) / 2 + 0.5 for i in range(NUM_SD_BLOCKS)]
    network = net(
        sd, network_dim=6, network_alpha=2, block_dims=",".join(map(str, dims)), block_alphas=",".join(map(str, alphas))
    )
    ranks = {m.lora_name: (m.rank, m.alpha.item()) for m in network.unet_loras}
    assert set(ranks) == {f"lora_unet_{a}_{c}" for a in ATTENTIONS if a != "up_blocks_1_attentions_0" for c in ATTN_CHILDREN}
    for name, (rank, alpha) in ranks.items():
        idx = sd_block_index(name)
        assert (rank, alpha) == (dims[idx], alphas[idx]), name
    # text encoder: --network_dim / --network_alpha
    assert {(m.rank, m.alpha.item()) for m in network.text_encoder_loras} == {(6, 2.0)}
    # without block_alphas every block has --network_alpha; brackets are accepted
    network = net(sd, network_alpha=2, block_dims="[" + ",".join(map(str, dims)) + "]")
    assert {m.alpha.item() for m in network.unet_loras} == {2.0}
    assert {m.rank for m in network.unet_loras} == {2, 3, 5}


def test_conv_block_dims(sd):
    dims = block_list(b1=2, b12=3, b13=4, b16=1, b17=1)
    conv_dims = block_list(b1=1, b3=2, b4=0, b12=3, b15=4, b16=5)
    network = net(
        sd,
        block_dims=",".join(map(str, dims)),
        conv_block_dims=",".join(map(str, conv_dims)),
        conv_block_alphas=",".join(["0.5"] * NUM_SD_BLOCKS),
    )
    convs = {
        m.lora_name: m for m in network.unet_loras if isinstance(m.org_module, nn.Conv2d) and m.org_module.kernel_size == (3, 3)
    }
    smalls = {m.lora_name: m for m in network.unet_loras if m.lora_name not in convs}
    assert convs and smalls
    for name, m in convs.items():
        assert m.rank == conv_dims[sd_block_index(name)] and m.alpha.item() == 0.5
    for name, m in smalls.items():  # time_emb_proj / conv_shortcut follow block_dims
        assert m.rank == dims[sd_block_index(name)]
    # blocks with 0 have no conv adapters; all non-zero blocks present
    all_convs = {
        "lora_unet_" + p.replace(".", "_")
        for p, mod in inside(sd["unet"], ("ResnetBlock2D", "Downsample2D", "Upsample2D")).items()
        if getattr(mod, "kernel_size", None) == (3, 3)
    }
    assert set(convs) == {n for n in all_convs if conv_dims[sd_block_index(n)] > 0}


@pytest.mark.parametrize("key", ["block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas"])
def test_block_lists_need_25_values(sd, key):
    args = {"block_dims": ",".join(["2"] * 25)}
    args[key] = "1,2,3"
    with pytest.raises(ValueError, match="25"):
        net(sd, **args)
    args[key] = ",".join(["2"] * 26)
    with pytest.raises(ValueError, match="25"):
        net(sd, **args)


def test_block_dims_with_conv_dim_keeps_conv_adapters(sd):
    network = net(sd, block_dims=",".join(["2"] * 25), conv_dim="3")
    convs = [m for m in network.unet_loras if isinstance(m.org_module, nn.Conv2d) and m.org_module.kernel_size == (3, 3)]
    assert convs and {(m.rank, m.alpha.item()) for m in convs} == {(3, 1.0)}


def test_conv_block_dims_default_alpha_is_one(sd):
    network = net(sd, block_dims=",".join(["2"] * 25), conv_block_dims=",".join(["4"] * 25))
    convs = [m for m in network.unet_loras if isinstance(m.org_module, nn.Conv2d) and m.org_module.kernel_size == (3, 3)]
    assert convs and {m.alpha.item() for m in convs} == {1.0}


# ---------------------------------------------------------------------------------------------------------------------
# optimizer groups


def param_ids(params):
    return {id(p) for p in params}


def test_param_groups_te_and_unet(sd):
    network = net(sd)
    te_params = param_ids(p for m in network.text_encoder_loras for p in m.parameters())
    unet_params = param_ids(p for m in network.unet_loras for p in m.parameters())
    groups, names = network.param_groups(1e-5, 2e-4, 1e-3)
    assert names == ["textencoder", "unet"]
    assert [g["lr"] for g in groups] == [1e-5, 2e-4]
    assert param_ids(groups[0]["params"]) == te_params and param_ids(groups[1]["params"]) == unet_params
    assert len(groups[0]["params"]) == 2 * len(network.text_encoder_loras)  # down and up; alpha is a buffer

    groups, names = network.param_groups(None, None, 1e-3)
    assert [g["lr"] for g in groups] == [1e-3, 1e-3]
    groups, names = network.param_groups([3e-5], None, 1e-3)
    assert [g["lr"] for g in groups] == [3e-5, 1e-3]
    # lr 0 drops a group
    groups, names = network.param_groups(0, 2e-4, 1e-3)
    assert names == ["unet"] and [g["lr"] for g in groups] == [2e-4]
    groups, names = network.param_groups(1e-5, 0, 1e-3)
    assert names == ["textencoder"] and param_ids(groups[0]["params"]) == te_params
    assert network.param_groups(0, 0, 1e-3) == ([], [])


def test_param_groups_after_apply_to_unet_only(sd):
    network = net(sd)
    with applied(network, train_te=False):
        groups, names = network.param_groups(1e-5, 2e-4, 1e-3)
    assert names == ["unet"]


def test_param_groups_two_text_encoders(sd):
    te = sd["text_encoder"]
    network = LoRANetwork([te, copy.deepcopy(te)], None)
    groups, names = network.param_groups([1e-5, 2e-5], None, 1e-3)
    assert names == ["textencoder1", "textencoder2"] and [g["lr"] for g in groups] == [1e-5, 2e-5]
    for g, prefix in zip(groups, ["lora_te1_", "lora_te2_"]):
        assert param_ids(g["params"]) == param_ids(
            p for m in network.text_encoder_loras if m.lora_name.startswith(prefix) for p in m.parameters()
        )
    groups, names = network.param_groups([1e-5], None, 1e-3)  # one value for both
    assert [g["lr"] for g in groups] == [1e-5, 1e-5]


def test_param_groups_empty_text_encoder_lr_list(sd):
    groups, names = net(sd).param_groups([], 2e-4, 1e-3)
    assert names == ["textencoder", "unet"] and [g["lr"] for g in groups] == [1e-3, 2e-4]


@pytest.mark.parametrize(
    "args, te_ratio, unet_ratio",
    [
        ({"loraplus_lr_ratio": "16"}, 16, 16),
        ({"loraplus_lr_ratio": "16", "loraplus_unet_lr_ratio": "4"}, 16, 4),
        ({"loraplus_lr_ratio": "16", "loraplus_text_encoder_lr_ratio": "2"}, 2, 16),
        ({"loraplus_unet_lr_ratio": "4"}, None, 4),
        ({"loraplus_text_encoder_lr_ratio": "2"}, 2, None),
    ],
)
def test_param_groups_loraplus(sd, args, te_ratio, unet_ratio):
    network = net(sd, **args)
    groups, names = network.param_groups(1e-5, 2e-4, 1e-3)
    expected_names = (
        ["textencoder"] + (["textencoder_plus"] if te_ratio else []) + ["unet"] + (["unet_plus"] if unet_ratio else [])
    )
    assert names == expected_names
    by_name = dict(zip(names, groups))

    def ups(loras):
        return param_ids(m.lora_up.weight for m in loras)

    def downs(loras):
        return param_ids(m.lora_down.weight for m in loras)

    for label, loras, lr, ratio in [
        ("textencoder", network.text_encoder_loras, 1e-5, te_ratio),
        ("unet", network.unet_loras, 2e-4, unet_ratio),
    ]:
        if ratio:
            assert param_ids(by_name[label]["params"]) == downs(loras) and by_name[label]["lr"] == lr
            assert param_ids(by_name[label + "_plus"]["params"]) == ups(loras)
            assert by_name[label + "_plus"]["lr"] == pytest.approx(lr * ratio)
        else:
            assert param_ids(by_name[label]["params"]) == downs(loras) | ups(loras) and by_name[label]["lr"] == lr


# ---------------------------------------------------------------------------------------------------------------------
# max norm


def test_apply_max_norm(sd):
    network = randomize(LoRANetwork([sd["text_encoder"]], None, rank=4, alpha=2), std=0.3)
    with torch.no_grad():  # a spread of norms: some modules far below, some far above the limit
        for i, m in enumerate(network.loras):
            m.lora_up.weight.mul_(0.05 if i % 2 else 3.0)
    before = [m.delta_weight().norm().item() for m in network.loras]
    downs_before = [m.lora_down.weight.clone() for m in network.loras]
    ranked = sorted(before)
    max_norm = (ranked[len(before) // 2] + ranked[len(before) // 2 - 1]) / 2  # between two norms: no rounding coin flip
    expected_after = [min(n, max_norm) for n in before]
    scaled, mean_norm, top = network.apply_max_norm(max_norm)
    after = [m.delta_weight().norm().item() for m in network.loras]
    assert scaled == sum(n > max_norm for n in before) and 0 < scaled < len(before)
    for a, e in zip(after, expected_after):
        assert a == pytest.approx(e, rel=1e-4)
    assert mean_norm == pytest.approx(sum(expected_after) / len(before), rel=1e-4)
    assert top == pytest.approx(max(expected_after), rel=1e-4)
    for m, n, d in zip(network.loras, before, downs_before):
        if n <= max_norm:  # untouched
            assert torch.equal(m.lora_down.weight, d)
    # a second pass changes nothing
    scaled2, mean2, _ = network.apply_max_norm(max_norm * 1.0001)
    assert scaled2 == 0 and mean2 == pytest.approx(mean_norm, rel=1e-4)


def test_apply_max_norm_conv_modules(sd):
    network = randomize(LoRANetwork([], sd["unet"], rank=2, alpha=1, conv_dim=2, conv_alpha=1), std=0.5)
    before = [m.delta_weight().norm().item() for m in network.loras]
    scaled, mean_norm, top = network.apply_max_norm(1e-3)
    assert scaled == sum(n > 1e-3 for n in before)
    assert top == pytest.approx(1e-3, rel=1e-4)
    assert all(m.delta_weight().norm().item() == pytest.approx(min(n, 1e-3), rel=1e-4) for m, n in zip(network.loras, before))


def max_norm_reference(network, max_norm):
    """By hand, one module at a time: (scaled count, mean norm, max norm, {param: expected value after})."""
    norms, after = [], {}
    for m in network.loras:
        norm = m.delta_weight().double().norm().item()
        ratio = math.sqrt(max_norm / norm) if norm > max_norm else 1.0
        for p in m.parameters():
            after[p] = p.detach().double() * ratio
        norms.append(min(norm, max_norm))
    return sum(n >= max_norm for n in norms), sum(norms) / len(norms), max(norms), after


def spread_norms(network, seed=0):
    """Random adapters (every part of split ones) with norms a factor ~100 apart, some above and some below 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for i, m in enumerate(network.loras):
            for p in m.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * (0.05 if i % 2 else 0.6))
    return network


def check_max_norm_against_reference(network, max_norm):
    norms = sorted(m.delta_weight().norm().item() for m in network.loras)
    assert norms[0] < max_norm < norms[-1] and min(abs(n - max_norm) for n in norms) > 1e-3 * max_norm
    count, mean, top, after = max_norm_reference(network, max_norm)
    untouched = {p: p.detach().clone() for p, v in after.items() if torch.equal(v, p.detach().double())}
    scaled, mean_norm, biggest = network.apply_max_norm(max_norm)
    assert type(scaled) is int and type(mean_norm) is float and type(biggest) is float
    assert scaled == count and 0 < scaled < len(network.loras)
    assert mean_norm == pytest.approx(mean, rel=1e-6) and biggest == pytest.approx(top, rel=1e-6)
    for p, v in after.items():
        assert torch.allclose(p.detach().double(), v, rtol=1e-6, atol=0)
    assert untouched and all(torch.equal(p.detach(), v) for p, v in untouched.items())  # unscaled: bit for bit
    for m in network.loras:
        assert m.delta_weight().norm().item() <= max_norm * (1 + 1e-5)


class DeviceReads(TorchDispatchMode):
    """Counts reads of tensor values into Python (`.item()`, `float()`, `bool()`: each a host sync on a GPU) and,
    with `patch_tolist`, `.tolist()` / `.numpy()`."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))

    def patch_tolist(self, monkeypatch):
        for name in ("tolist", "numpy"):
            original = getattr(torch.Tensor, name)

            def counted(t, *a, _original=original, **k):
                self.count += 1
                return _original(t, *a, **k)

            monkeypatch.setattr(torch.Tensor, name, counted)


def test_apply_max_norm_matches_a_per_module_reference(sd):
    """Linear and 3x3-conv adapters: count, mean and max norm and every weight after, as computed by hand."""
    network = spread_norms(LoRANetwork([sd["text_encoder"]], sd["unet"], rank=4, alpha=2, conv_dim=2, conv_alpha=1))
    assert any(m.lora_down.weight.dim() == 4 for m in network.loras)
    check_max_norm_against_reference(network, 0.5)


def test_apply_max_norm_reads_the_device_once(sd, monkeypatch):
    """One read per call, whatever the number of modules (it used to be one .item() per module per step)."""
    network = spread_norms(LoRANetwork([sd["text_encoder"]], sd["unet"], rank=4, alpha=2))
    assert len(network.loras) > 50
    reads = DeviceReads()
    reads.patch_tolist(monkeypatch)
    with reads:
        scaled, _, _ = network.apply_max_norm(0.5)
    assert scaled > 0 and reads.count <= 1
    with reads:  # nothing to scale: still one read
        network.apply_max_norm(1e6)
    assert reads.count <= 2


# ---------------------------------------------------------------------------------------------------------------------
# loading


def outputs_with(network, sd, unet_inputs, te_ids):
    with applied(network):
        return unet_out(sd["unet"], unet_inputs), te_out(sd["text_encoder"], te_ids)


def test_load_weights_round_trip(sd, unet_inputs, te_ids, base_outputs):
    a = randomize(net(sd, network_alpha=2, conv_dim="2", conv_alpha="3"), seed=1)
    out_a = outputs_with(a, sd, unet_inputs, te_ids)
    assert not torch.allclose(out_a[0], base_outputs[0]) and not torch.allclose(out_a[1], base_outputs[1])
    state = {k: v.clone() for k, v in a.state_dict().items()}
    torch.manual_seed(123)
    b = net(sd, network_alpha=1, conv_dim="2", conv_alpha="1")  # same shapes, other alphas: the file's alphas win
    assert b.load_weights(state) == []
    assert all(mb.scale == ma.scale for ma, mb in zip(a.loras, b.loras))
    out_b = outputs_with(b, sd, unet_inputs, te_ids)
    assert torch.equal(out_a[0], out_b[0]) and torch.equal(out_a[1], out_b[1])
    # into an applied network (as the trainer does: apply_to, then load)
    c = net(sd, conv_dim="2")
    with applied(c):
        c.load_weights(state)
        assert torch.equal(unet_out(sd["unet"], unet_inputs), out_a[0])


def test_load_weights_shape_mismatch(sd):
    state = net(sd, network_dim=4).state_dict()
    with pytest.raises(ValueError, match="dim_from_weights") as e:
        net(sd, network_dim=2).load_weights(state, "file.safetensors")
    assert "file.safetensors" in str(e.value)


def test_load_weights_extra_and_missing_keys(sd):
    a = net(sd)
    state = dict(a.state_dict())
    extra = {
        "lora_unet_not_a_module.lora_down.weight": torch.zeros(4, 8),
        "lora_unet_not_a_module.lora_up.weight": torch.zeros(8, 4),
        "lora_unet_not_a_module.alpha": torch.tensor(1.0),
    }
    assert sorted(net(sd).load_weights({**state, **extra})) == sorted(extra)
    # a LoRA of only the U-Net into a network with text-encoder adapters: missing modules are an error
    unet_only = {k: v for k, v in state.items() if k.startswith("lora_unet_")}
    with pytest.raises(ValueError, match="no weights"):
        net(sd).load_weights(unet_only)
    missing_one = {k: v for k, v in state.items() if not k.startswith("lora_te_text_model_encoder_layers_1_mlp_fc1.")}
    with pytest.raises(ValueError, match="no weights"):
        net(sd).load_weights(missing_one)
    # ... but text-encoder keys into a U-Net-only network are just extras
    b = net(sd)
    b.apply_to(False, True)
    b.restore()
    unexpected = b.load_weights(state)
    assert set(unexpected) == {k for k in state if k.startswith("lora_te_")}


def test_load_weights_without_alpha_keys(sd):
    a = randomize(net(sd, network_alpha=2))
    state = {k: v for k, v in a.state_dict().items() if not k.endswith(".alpha")}
    b = net(sd, network_alpha=2)
    assert b.load_weights(state) == []
    assert all(torch.equal(ma.delta_weight(), mb.delta_weight()) for ma, mb in zip(a.loras, b.loras))


def test_load_weights_half_precision_file(sd):
    a = randomize(net(sd, network_alpha=2))
    state = {k: v.to(torch.bfloat16) for k, v in a.state_dict().items()}  # --save_precision bf16 (alpha too)
    b = net(sd, network_alpha=1)
    assert b.load_weights(state) == []
    for ma, mb in zip(a.loras, b.loras):
        assert mb.lora_up.weight.dtype == torch.float32 and mb.alpha.dtype == torch.float32
        assert torch.equal(mb.lora_up.weight, ma.lora_up.weight.bfloat16().float())
        assert mb.scale == ma.scale == 0.5


def mixed_rank_state(sd, seed=0):
    """A LoRA file with per-block ranks and alphas, conv adapters included."""
    dims = block_list(b1=2, b12=3, b16=1, b17=4)
    conv_dims = block_list(b1=3, b3=1, b4=2, b12=2, b13=1, b14=1, b15=2, b16=3, b17=1)
    torch.manual_seed(seed)
    network = net(
        sd,
        network_dim=5,
        network_alpha=3,
        block_dims=",".join(map(str, dims)),
        block_alphas=",".join(str(0.5 + i) for i in range(25)),
        conv_block_dims=",".join(map(str, conv_dims)),
        conv_block_alphas=",".join(str(0.25 + i) for i in range(25)),
    )
    return network, {k: v.clone() for k, v in randomize(network, seed).state_dict().items()}


def test_dims_from_weights(sd):
    network, state = mixed_rank_state(sd)
    dims, alphas = dims_from_weights(state)
    assert dims == {m.lora_name: m.rank for m in network.loras}
    assert alphas == {m.lora_name: m.alpha.item() for m in network.loras}
    assert len(set(dims.values())) > 2
    no_alpha = {k: v for k, v in state.items() if not k.endswith(".alpha")}
    dims2, alphas2 = dims_from_weights(no_alpha)
    assert dims2 == dims and alphas2 == {k: float(v) for k, v in dims.items()}


def test_create_network_from_weights(sd, unet_inputs, te_ids):
    original, state = mixed_rank_state(sd, seed=5)
    out_original = outputs_with(original, sd, unet_inputs, te_ids)
    network = create_network_from_weights(1.0, state, [sd["text_encoder"]], sd["unet"])
    assert {m.lora_name: (m.rank, m.alpha.item()) for m in network.loras} == {
        m.lora_name: (m.rank, m.alpha.item()) for m in original.loras
    }
    assert set(network.state_dict()) == set(state)
    assert network.load_weights(state) == []
    out = outputs_with(network, sd, unet_inputs, te_ids)
    assert torch.equal(out[0], out_original[0]) and torch.equal(out[1], out_original[1])
    # missing alpha -> alpha = rank
    no_alpha = {k: v for k, v in state.items() if not k.endswith(".alpha")}
    network = create_network_from_weights(1.0, no_alpha, [sd["text_encoder"]], sd["unet"])
    assert all(m.alpha.item() == m.rank and m.scale == 1.0 for m in network.loras)
    # a U-Net-only file makes a U-Net-only network; dropouts and LoRA+ from network_args
    unet_only = {k: v for k, v in state.items() if k.startswith("lora_unet_")}
    network = create_network_from_weights(
        0.5, unet_only, [sd["text_encoder"]], sd["unet"], rank_dropout="0.1", loraplus_lr_ratio="4"
    )
    assert network.text_encoder_loras == [] and len(network.unet_loras) == len(original.unet_loras)
    assert {(m.multiplier, m.rank_dropout) for m in network.loras} == {(0.5, 0.1)}
    assert network.param_groups(None, 1e-4, 1e-4)[1] == ["unet", "unet_plus"]
    with pytest.raises(ValueError, match="unknown"):
        create_network_from_weights(1.0, state, [sd["text_encoder"]], sd["unet"], bogus="1")


def test_parse_network_args():
    assert parse_network_args(None) == {}
    assert parse_network_args(["conv_dim=4", " conv_alpha = 1 ", "block_dims=1,2=3"]) == {
        "conv_dim": "4",
        "conv_alpha": "1",
        "block_dims": "1,2=3",
    }
    with pytest.raises(ValueError) as e:
        parse_network_args(["conv_dim=4", "down_lr_weight=1", "foo=2"])
    msg = str(e.value)
    assert "down_lr_weight" in msg and "foo" in msg
    valid = msg.split("valid:")[1]
    assert all(k in valid for k in KNOWN_ARGS)
    with pytest.raises(ValueError, match="key=value"):
        parse_network_args(["conv_dim"])


def test_create_network_rejects_unknown_args(sd):
    with pytest.raises(ValueError, match="unknown --network_args"):
        net(sd, conv_dims="4")


def test_create_network_defaults(sd):
    network = create_network(1.0, None, 1.0, [sd["text_encoder"]], sd["unet"])
    assert {m.rank for m in network.loras} == {4}
    assert {m.alpha.item() for m in network.loras} == {1.0}
    assert all(m.dropout is None and m.rank_dropout is None and m.module_dropout is None for m in network.loras)
    # no conv adapters without conv_dim
    assert not any(isinstance(m.org_module, nn.Conv2d) and m.org_module.kernel_size == (3, 3) for m in network.loras)


# ---------------------------------------------------------------------------------------------------------------------
# merging


def deltas(state):
    """name -> delta weight of every module of a LoRA state dict (independent of networks.merge)."""
    dims, alphas = dims_from_weights(state)
    return {
        n: lora_delta(state[n + ".lora_down.weight"].float(), state[n + ".lora_up.weight"].float(), alphas[n] / dims[n])
        for n in dims
    }


@pytest.fixture(scope="module")
def two_loras(sd):
    """Two LoRA files of the tiny model: A with conv adapters (rank 4/2), B without (rank 2), other alphas."""
    torch.manual_seed(10)
    a = randomize(net(sd, network_dim=4, network_alpha=2, conv_dim="2", conv_alpha="1"), seed=11)
    b = randomize(net(sd, network_dim=2, network_alpha=0.5), seed=12)
    return {k: v.clone() for k, v in a.state_dict().items()}, {k: v.clone() for k, v in b.state_dict().items()}


def weighted_sum(states, ratios):
    total = {}
    for state, ratio in zip(states, ratios):
        for n, d in deltas(state).items():
            total[n] = total.get(n, 0) + ratio * d
    return total


def test_merge_loras_concat(two_loras):
    a, b = two_loras
    merged = merge.merge_loras_concat([a, b], [0.7, -0.4])
    expected = weighted_sum([a, b], [0.7, -0.4])
    got = deltas(merged)
    assert set(got) == set(expected)
    assert any(d.dim() == 4 and d.shape[-1] == 3 for d in got.values())  # 3x3 conv modules present (only in A)
    for n in expected:
        assert got[n].shape == expected[n].shape
        assert torch.allclose(got[n], expected[n], atol=1e-6), n
    dims, alphas = dims_from_weights(merged)
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert dims[name] == 6 and alphas[name] == 6.0  # ranks side by side, scale 1
    assert dims["lora_unet_down_blocks_0_resnets_0_conv1"] == 2  # only in A
    assert set(merged) == {n + s for n in dims for s in SUFFIXES}


def test_merge_loras_svd_exact_when_rank_allows(two_loras):
    a, b = two_loras
    merged, worst = merge.merge_loras_svd([a, b], [0.7, -0.4], rank=6)
    assert worst < 1e-4
    expected = weighted_sum([a, b], [0.7, -0.4])
    got = deltas(merged)
    assert set(got) == set(expected)
    for n in expected:
        assert got[n].shape == expected[n].shape, n
        assert torch.allclose(got[n], expected[n], atol=1e-4, rtol=1e-3), n
    dims, alphas = dims_from_weights(merged)
    assert all(alphas[n] == dims[n] for n in dims)
    assert merged["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"].dim() == 4
    assert merged["lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight"].shape[2:] == (1, 1)


def test_merge_loras_svd_truncated_reports_error(two_loras):
    a, b = two_loras
    merged, worst = merge.merge_loras_svd([a, b], [1.0, 1.0])  # default rank: the largest input rank (4) < 6
    dims, _ = dims_from_weights(merged)
    assert max(dims.values()) == 4
    expected = weighted_sum([a, b], [1.0, 1.0])
    got = deltas(merged)
    rel = max((got[n] - expected[n]).norm().item() / expected[n].norm().item() for n in expected)
    assert worst == pytest.approx(rel, rel=1e-3, abs=1e-6)
    assert worst > 1e-3
    # the truncated SVD is the best rank-4 approximation of each module's sum
    n = "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj"
    s = torch.linalg.svdvals(expected[n])
    assert (got[n] - expected[n]).norm().item() == pytest.approx(s[4:].norm().item(), rel=1e-3)


def test_merge_into_models(sd, two_loras):
    a, _ = two_loras
    te, unet = copy.deepcopy(sd["text_encoder"]), copy.deepcopy(sd["unet"])
    before_te, before_unet = copy.deepcopy(te.state_dict()), copy.deepcopy(unet.state_dict())
    count = merge.merge_into_models(a, 0.6, [te], unet)
    d = deltas(a)
    assert count == len(d)
    after_te, after_unet = te.state_dict(), unet.state_dict()
    changed = set()
    for name, delta in d.items():
        if name.startswith("lora_unet_"):
            key = next(
                k for k in after_unet if k.endswith(".weight") and "lora_unet_" + k[: -len(".weight")].replace(".", "_") == name
            )
            before, after = before_unet[key], after_unet[key]
            changed.add(("unet", key))
        else:
            key = next(
                k
                for k in after_te
                if k.endswith(".weight")
                and "lora_te_text_model_" + k[: -len(".weight")].removeprefix("text_model.").replace(".", "_") == name
            )
            before, after = before_te[key], after_te[key]
            changed.add(("te", key))
        assert torch.allclose(after - before, 0.6 * delta.reshape(before.shape), atol=1e-6), name
    # nothing else changed
    for k in after_unet:
        if ("unet", k) not in changed:
            assert torch.equal(after_unet[k], before_unet[k]), k
    for k in after_te:
        if ("te", k) not in changed:
            assert torch.equal(after_te[k], before_te[k]), k
    # merged model == base model + applied LoRA at multiplier 0.6
    g = torch.Generator().manual_seed(7)
    inputs = (torch.randn(1, 4, 8, 8, generator=g), torch.tensor([100]), torch.randn(1, 77, 64, generator=g))
    network = create_network_from_weights(0.6, a, [sd["text_encoder"]], sd["unet"])
    network.load_weights(a)
    with applied(network):
        lora_out = unet_out(sd["unet"], inputs)
    assert torch.allclose(unet_out(unet, inputs), lora_out, atol=1e-4)


def test_merge_into_models_rejects_foreign_names(sd, two_loras):
    a, _ = two_loras
    te, unet = copy.deepcopy(sd["text_encoder"]), copy.deepcopy(sd["unet"])
    before = copy.deepcopy(unet.state_dict())
    bad = dict(a)
    bad["lora_unet_input_blocks_4_1_proj_in.lora_down.weight"] = torch.zeros(2, 32)
    bad["lora_unet_input_blocks_4_1_proj_in.lora_up.weight"] = torch.zeros(32, 2)
    with pytest.raises(ValueError, match="input_blocks_4_1_proj_in"):
        merge.merge_into_models(bad, 1.0, [te], unet)
    # nothing was merged before the error
    assert all(torch.equal(v, before[k]) for k, v in unet.state_dict().items())
    # a text-encoder LoRA into a model without text encoders is foreign too
    te_only = {k: v for k, v in a.items() if k.startswith("lora_te_")}
    with pytest.raises(ValueError, match="match nothing"):
        merge.merge_into_models(te_only, 1.0, [], unet)


def test_merge_concat_then_apply_equals_sum(sd, two_loras, unet_inputs, te_ids, base_outputs):
    """Applying the concatenated LoRA gives the same model as applying both inputs at their ratios (outputs)."""
    a, b = two_loras
    merged = merge.merge_loras_concat([a, b], [1.0, 1.0])
    net_m = create_network_from_weights(1.0, merged, [sd["text_encoder"]], sd["unet"])
    net_m.load_weights(merged)
    out_m = outputs_with(net_m, sd, unet_inputs, te_ids)
    net_a = create_network_from_weights(1.0, a, [sd["text_encoder"]], sd["unet"])
    net_a.load_weights(a)
    net_b = create_network_from_weights(1.0, b, [sd["text_encoder"]], sd["unet"])
    net_b.load_weights(b)
    # both at once: B's adapters wrap A's (restore in reverse order)
    net_a.apply_to()
    net_b.apply_to()
    try:
        out_ab = unet_out(sd["unet"], unet_inputs), te_out(sd["text_encoder"], te_ids)
    finally:
        net_b.restore()
        net_a.restore()
    assert torch.allclose(out_m[0], out_ab[0], atol=1e-4) and torch.allclose(out_m[1], out_ab[1], atol=1e-4)
    assert torch.equal(unet_out(sd["unet"], unet_inputs), base_outputs[0])


# ---------------------------------------------------------------------------------------------------------------------
# SDXL naming: sgm U-Net names, lora_te1_/lora_te2_, 23 blocks, diffusers-named files


@pytest.fixture(scope="module")
def tiny_sdxl():
    from library.tiny_models import build_tiny_sdxl

    return build_tiny_sdxl()


def _sdxl_network(m, **kwargs):
    from library.sdxl_models import sdxl_unet_lora_name_map

    return create_network(1.0, 4, 2, [m["text_encoder"], m["text_encoder_2"]], m["unet"],
                          unet_name_map=sdxl_unet_lora_name_map(m["unet"]), te_prefixes=["lora_te1", "lora_te2"], **kwargs)


def test_sdxl_names_and_23_block_dims(tiny_sdxl):
    from networks.lora import sdxl_block_index

    assert sdxl_block_index("lora_unet_input_blocks_4_1_proj_in") == 5
    assert sdxl_block_index("lora_unet_middle_block_1_proj_in") == 11
    assert sdxl_block_index("lora_unet_output_blocks_0_1_proj_in") == 13
    dims = [0] * 23
    dims[5], dims[11], dims[13] = 2, 3, 5  # IN4 (input_blocks_4), MID1, OUT0
    net = _sdxl_network(tiny_sdxl, block_dims=",".join(map(str, dims)))
    ranks = {m.lora_name: m.rank for m in net.unet_loras}
    assert ranks and all(n.startswith(("lora_unet_input_blocks_4_", "lora_unet_middle_block_1_", "lora_unet_output_blocks_0_")) for n in ranks)
    assert {r for n, r in ranks.items() if n.startswith("lora_unet_middle_block_1_")} == {3}
    with pytest.raises(ValueError, match="23 values"):
        _sdxl_network(tiny_sdxl, block_dims=",".join(["1"] * 25))
    names = {m.lora_name for m in _sdxl_network(tiny_sdxl).text_encoder_loras}
    assert any(n.startswith("lora_te1_text_model_encoder_layers_0_") for n in names)
    assert any(n.startswith("lora_te2_text_model_encoder_layers_0_") for n in names)


def test_sdxl_file_with_diffusers_unet_names_loads(tiny_sdxl):
    net = _sdxl_network(tiny_sdxl)
    torch.manual_seed(1)
    for m in net.unet_loras:
        torch.nn.init.normal_(m.lora_up.weight)
    sgm = net.state_dict()
    inverse = {v: k for k, v in net.aliases.items()}
    diffusers_named = {f"{inverse.get(k.split('.')[0], k.split('.')[0])}.{k.split('.', 1)[1]}": v for k, v in sgm.items()}
    assert any(k.startswith("lora_unet_down_blocks_1_attentions_0_") for k in diffusers_named)
    fresh = _sdxl_network(tiny_sdxl)
    assert fresh.load_weights(diffusers_named) == []
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in sgm.items())
