"""networks.lora_flux split_qkv: one LoRA per q/k/v (/proj_mlp), saved in the fused kohya layout with alpha = n x alpha."""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch
from test_lora_flux import _inputs

from networks import lora_flux as lf

HIDDEN = 32  # tiny FLUX width: 2 heads x 16
QKV = "lora_unet_double_blocks_0_img_attn_qkv"
LINEAR1 = "lora_unet_single_blocks_0_linear1"


@pytest.fixture(scope="module")
def transformer():
    from diffusers import FluxTransformer2DModel

    from library.tiny_models import tiny_flux_transformer_config

    torch.manual_seed(0)
    return FluxTransformer2DModel(**tiny_flux_transformer_config()).eval()


def _run(transformer, inputs, network=None):
    """The transformer's output, with `network` applied (and removed afterwards) when given."""
    if network is not None:
        network.apply_to(False, True)
    try:
        with torch.no_grad():
            return transformer(**inputs)[0]
    finally:
        if network is not None:
            network.restore()


def _randomize(network, seed=0, std=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in network.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return network


def _split(transformer, dim=4, alpha=2.0, **args):
    return lf.create_network(1.0, dim, alpha, [], transformer, split_qkv="True", **args)


def _clone(sd):
    return {k: v.clone() for k, v in sd.items()}


# ------------------------------------------------------------------------------------------------------ layout, args


def test_saved_layout_is_fused_with_n_times_alpha(transformer):
    net = _split(transformer, img_attn_dim="6")
    plain = lf.create_network(1.0, 4, 2.0, [], transformer, img_attn_dim="6")
    sd, plain_sd = net.state_dict(), plain.state_dict()
    assert list(sd) == list(plain_sd)  # the same keys, in the same order
    for name, n, r in ((QKV, 3, 6), ("lora_unet_double_blocks_1_txt_attn_qkv", 3, 4), (LINEAR1, 4, 4)):
        out = plain_sd[name + ".lora_up.weight"].shape[0]
        assert sd[name + ".lora_down.weight"].shape == (n * r, HIDDEN)
        assert sd[name + ".lora_up.weight"].shape == (out, n * r)
        assert sd[name + ".alpha"].item() == n * 2.0 and sd[name + ".alpha"].dtype == torch.float32
        m = getattr(net, name)
        assert isinstance(m, lf.SplitLoRAModule) and (m.rank, m.part_rank, len(m.splits)) == (n * r, r, n)
        assert m.scale == 2.0 / r
    split_names = {m.lora_name for m in net.loras if isinstance(m, lf.SplitLoRAModule)}
    assert len(split_names) == 2 * 2 + 2  # img/txt qkv of 2 double blocks, linear1 of 2 single blocks
    for key, value in sd.items():  # every other adapter is unchanged
        if key.split(".")[0] not in split_names:
            assert value.shape == plain_sd[key].shape and (not key.endswith(".alpha") or torch.equal(value, plain_sd[key]))

    # the fused up is block-diagonal, its blocks are the parts
    _randomize(net)
    sd = net.state_dict()
    m = net.lora_unet_single_blocks_0_linear1
    up, down = sd[LINEAR1 + ".lora_up.weight"], sd[LINEAR1 + ".lora_down.weight"]
    row = 0
    for i, out in enumerate(m.splits):
        block = up[row : row + out]
        assert torch.equal(block[:, 4 * i : 4 * i + 4], m.lora_up[i].weight)
        assert not torch.cat([block[:, : 4 * i], block[:, 4 * i + 4 :]], dim=1).any()
        assert torch.equal(down[4 * i : 4 * i + 4], m.lora_down[i].weight)
        row += out

    # no alpha: alpha = rank per part, saved as n x r (scale 1)
    assert _split(transformer, alpha=None).state_dict()[QKV + ".alpha"].item() == 12


def test_split_qkv_argument_values(transformer):
    assert isinstance(getattr(_split(transformer), QKV), lf.SplitLoRAModule)
    for value in (True, "true", "1"):
        assert isinstance(getattr(lf.create_network(1.0, 4, 1.0, [], transformer, split_qkv=value), QKV), lf.SplitLoRAModule)
    for value in (False, "False", "0"):
        m = getattr(lf.create_network(1.0, 4, 1.0, [], transformer, split_qkv=value), QKV)
        assert type(m) is lf.FusedLoRAModule
    with pytest.raises(ValueError, match="split_qkv must be True or False"):
        lf.create_network(1.0, 4, 1.0, [], transformer, split_qkv="maybe")


# -------------------------------------------------------------------------------------------------------- arithmetic


def test_split_output_equals_plain_network_from_its_file(transformer):
    """random parts: the transformer's output equals a plain (non-split) network loaded from the saved file."""
    tr = copy.deepcopy(transformer)
    inputs = _inputs(tr.config)
    net = _randomize(_split(tr, alpha=3.0, in_dims="[2,0,0,0,2]"))
    net.set_multiplier(0.8)
    split_out = _run(tr, inputs, net)
    assert (split_out - _run(tr, inputs)).abs().max() > 1e-2
    sd = _clone(net.state_dict())

    plain = lf.create_network_from_weights(0.8, sd, [], tr)
    assert type(getattr(plain, QKV)) is lf.FusedLoRAModule
    assert plain.load_weights(sd) == []
    torch.testing.assert_close(_run(tr, inputs, plain), split_out, rtol=1e-5, atol=1e-5)

    # each wrapped Linear: org + up_i @ down_i * multiplier * alpha / r
    net.apply_to(False, True)
    m, x = getattr(net, QKV), torch.randn(2, 5, HIDDEN)
    for i, linear in enumerate(m.org_modules):
        delta = m.lora_up[i].weight @ m.lora_down[i].weight * (0.8 * 3.0 / 4)
        torch.testing.assert_close(
            linear(x), torch.nn.functional.linear(x, linear.weight + delta, linear.bias), rtol=1e-5, atol=1e-6
        )
    net.restore()


def test_merge_into_transformer_with_the_split_file(transformer):
    tr = copy.deepcopy(transformer)
    inputs = _inputs(tr.config)
    net = _randomize(_split(tr))
    net.set_multiplier(0.6)
    expected = _run(tr, inputs, net)
    assert lf.merge_into_transformer(net.state_dict(), 0.6, tr) == len(net.loras)
    torch.testing.assert_close(_run(tr, inputs), expected, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------ the independent oracle


def _real_width_single_block_flux():
    """FLUX at the real width 3072 (diffusers' kohya converter splits linear1 3072/3072/3072/12288), one single block
    and no double block (180 M parameters), deterministic weights without a slow random fill."""
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        tr = FluxTransformer2DModel(
            num_layers=0,
            num_single_layers=1,
            in_channels=16,
            joint_attention_dim=32,
            pooled_projection_dim=32,
            guidance_embeds=False,
        )
    tr = tr.to_empty(device="cpu")
    period = 100_003
    pool = (torch.randn(period, generator=torch.Generator().manual_seed(0)) * 0.02).repeat(
        max(p.numel() for p in tr.parameters()) // period + 2
    )
    with torch.no_grad():
        for i, (name, p) in enumerate(tr.named_parameters()):
            if p.dim() == 1:
                p.fill_(1.0 if "norm" in name and name.endswith("weight") else 0.0)
            else:
                start = i * 7919 % period
                p.view(-1).copy_(pool[start : start + p.numel()])
    return tr.eval()


@pytest.mark.parametrize("blocks", ["double", "single"])
def test_diffusers_loads_the_split_file_with_the_same_output(transformer, blocks):
    """diffusers' FluxPipeline.load_lora_weights (kohya-FLUX conversion, then PEFT) on the saved file gives the output
    of kiln's split_qkv network: double blocks (qkv) on the tiny model, single blocks (linear1) at the real width."""
    from diffusers import FluxPipeline

    if blocks == "double":
        tr = copy.deepcopy(transformer)
        net = _randomize(_split(tr, alpha=3.0, train_blocks="double"))
        expected_modules = 2 * (3 * 2 + 8)  # per double block: q/k/v x 2 streams and 8 other Linears
    else:
        tr = _real_width_single_block_flux()
        net = _randomize(_split(tr, alpha=3.0, single_mod_dim="0"), std=0.05)
        expected_modules = 4 + 1  # q/k/v/proj_mlp, proj_out
    inputs = _inputs(tr.config, img_tokens=4, txt_tokens=3)
    sd = _clone(net.state_dict())
    base = _run(tr, inputs)
    kiln = _run(tr, inputs, net)
    assert (kiln - base).abs().max() > 1e-2

    pipe = FluxPipeline(
        scheduler=None, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=tr
    )
    pipe.load_lora_weights(sd, adapter_name="split")
    assert len([n for n, _ in tr.named_modules() if n.endswith("lora_A.split")]) == expected_modules
    torch.testing.assert_close(_run(tr, inputs), kiln, rtol=1e-5, atol=1e-5)
    # what sd-scripts writes (alpha not multiplied by n) would apply 1/n of the trained strength
    pipe.delete_adapters("split")
    weak = {
        k: (v / (4 if "linear1" in k else 3) if k.endswith("qkv.alpha") or k.endswith("linear1.alpha") else v)
        for k, v in sd.items()
    }
    pipe.load_lora_weights(weak, adapter_name="weak")
    assert (_run(tr, inputs) - kiln).abs().max() > 1e-3


# --------------------------------------------------------------------------------------------------- loading, resume


def test_save_load_save_round_trip_is_exact(transformer, tmp_path):
    """network -> file -> network (load_weights, create_network_from_weights) -> the same file, bit for bit."""
    from library import saving

    net = _randomize(_split(transformer, alpha=0.3, txt_attn_dim="2"))
    sd = _clone(net.state_dict())
    path = str(tmp_path / "split.safetensors")
    saving.save_weights(path, sd, {}, None)
    loaded, _ = saving.load_weights_file(path)

    other = _split(transformer, alpha=0.3, txt_attn_dim="2")
    assert other.load_weights(loaded) == []
    again = other.state_dict()
    assert list(again) == list(sd) and all(torch.equal(again[k], sd[k]) for k in sd)
    assert all(torch.equal(a, b) for a, b in zip(other.parameters(), net.parameters()))
    # the split adapters' scale comes from the stored alpha, so a loaded network computes exactly as the trained one
    assert all(a.scale == b.scale for a, b in zip(other.loras, net.loras) if isinstance(a, lf.SplitLoRAModule))

    from_file = lf.create_network_from_weights(1.0, loaded, [], transformer, split_qkv="True")
    assert {m.lora_name: (m.rank, getattr(m, "part_rank", None)) for m in from_file.loras} == {
        m.lora_name: (m.rank, getattr(m, "part_rank", None)) for m in net.loras
    }
    assert from_file.load_weights(loaded) == []
    third = from_file.state_dict()
    assert all(torch.equal(third[k], sd[k]) for k in sd)
    # load_state_dict itself reads the fused layout too
    fresh = _split(transformer, alpha=0.3, txt_attn_dim="2")
    fresh.load_state_dict(sd)
    assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), net.parameters()))


def test_resume_continues_bit_for_bit(transformer):
    """The trainer's resume: state = network.state_dict() + optimizer state; a new network loads both and continues."""
    tr = copy.deepcopy(transformer)
    tr.requires_grad_(False)

    def make(seed):
        torch.manual_seed(seed)
        net = _split(tr, alpha=1.0, loraplus_unet_lr_ratio="4")
        groups, _ = net.param_groups(None, 1e-2, 1e-2)
        return net, torch.optim.AdamW(groups)

    def step(net, opt, seed):
        net.apply_to(False, True)
        net.train()
        loss = tr(**_inputs(tr.config, seed=seed))[0].square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        net.restore()
        net.apply_max_norm(0.5)

    net, opt = make(0)
    for s in range(2):
        step(net, opt, s)
    state = {"network": _clone(net.state_dict()), "optimizer": copy.deepcopy(opt.state_dict())}
    for s in range(2, 4):
        step(net, opt, s)

    resumed, opt2 = make(1)
    resumed.load_weights(state["network"])
    opt2.load_state_dict(state["optimizer"])
    for s in range(2, 4):
        step(resumed, opt2, s)
    assert all(torch.equal(a, b) for a, b in zip(resumed.parameters(), net.parameters()))


def test_plain_fused_file_loads_into_split_network_exactly(transformer):
    """A fused file trained without split_qkv: every part gets the whole down (part rank = the file's rank), the
    output is unchanged and the saved file is block-diagonal (rank n x R, alpha n x alpha). A non-block-diagonal file of
    rank n x r does not fit parts of rank r: an error naming the module."""
    tr = copy.deepcopy(transformer)
    inputs = _inputs(tr.config)
    plain = _randomize(lf.create_network(1.0, 4, 2.0, [], tr))
    sd = _clone(plain.state_dict())
    expected = _run(tr, inputs, plain)

    net = _split(tr, dim=4, alpha=16.0)  # the file's alphas replace the network's
    assert net.load_weights(sd) == []
    torch.testing.assert_close(_run(tr, inputs, net), expected, rtol=1e-5, atol=1e-5)
    saved = net.state_dict()
    assert saved[QKV + ".lora_down.weight"].shape == (12, HIDDEN) and saved[QKV + ".alpha"].item() == 6.0
    assert torch.equal(saved[QKV + ".lora_down.weight"], sd[QKV + ".lora_down.weight"].repeat(3, 1))
    assert saved[LINEAR1 + ".alpha"].item() == 8.0
    back = lf.create_network_from_weights(1.0, saved, [], tr)
    back.load_weights(saved)
    torch.testing.assert_close(_run(tr, inputs, back), expected, rtol=1e-5, atol=1e-5)

    from_file = lf.create_network_from_weights(1.0, sd, [], tr, split_qkv=True)
    assert getattr(from_file, QKV).part_rank == 4 and getattr(from_file, LINEAR1).rank == 16
    assert from_file.load_weights(sd) == []
    torch.testing.assert_close(_run(tr, inputs, from_file), expected, rtol=1e-5, atol=1e-5)

    wide = _randomize(lf.create_network(1.0, 12, 2.0, [], tr, train_blocks="double"))
    with pytest.raises(ValueError, match=f"{QKV} is a fused adapter of rank 12 whose lora_up is not block-diagonal"):
        _split(tr, dim=4, train_blocks="double").load_weights(wide.state_dict())
    with pytest.raises(ValueError, match=f"{QKV}: lora_up is not block-diagonal"):
        _split(tr, dim=4, train_blocks="double").load_state_dict(wide.state_dict())
    assert getattr(lf.create_network_from_weights(1.0, wide.state_dict(), [], tr, split_qkv="True"), QKV).part_rank == 12


# ------------------------------------------------------------------------------------------- training features


def test_gradients_reach_every_part(transformer):
    """With neuron and rank dropout in training mode, every part's down and up gets a gradient."""
    tr = copy.deepcopy(transformer)
    tr.requires_grad_(False)
    net = _randomize(_split(tr, dropout="0.1", rank_dropout="0.25"))
    net.apply_to(False, True)
    net.train()
    tr(**_inputs(tr.config))[0].square().mean().backward()
    split = [m for m in net.unet_loras if isinstance(m, lf.SplitLoRAModule)]
    assert len(split) == 2 * 2 + 2  # img/txt qkv of 2 double blocks, linear1 of 2 single blocks
    for m in split:
        for name, p in m.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, (m.lora_name, name)
    assert tr.transformer_blocks[0].attn.to_q.weight.grad is None
    net.restore()


def test_loraplus_max_norm_multiplier_and_module_dropout(transformer):
    tr = copy.deepcopy(transformer)
    inputs = _inputs(tr.config)
    net = _randomize(_split(tr, loraplus_unet_lr_ratio="16"), std=1.0)
    groups, labels = net.param_groups(None, 1e-4, 1e-3)
    assert labels == ["unet", "unet_plus"] and groups[1]["lr"] == pytest.approx(1.6e-3)
    ups, downs = {id(p) for p in groups[1]["params"]}, {id(p) for p in groups[0]["params"]}
    m = getattr(net, QKV)
    assert all(id(u.weight) in ups for u in m.lora_up) and all(id(d.weight) in downs for d in m.lora_down)
    assert len(ups) + len(downs) == len(list(net.parameters()))

    before = m.delta_weight()
    assert before.shape == (3 * HIDDEN, HIDDEN)
    scaled, _, biggest = net.apply_max_norm(1.0)
    assert scaled > 0 and biggest <= 1.0 + 1e-6
    for module in net.loras:
        assert module.delta_weight().norm() <= 1.0 + 1e-4
    after = m.delta_weight()  # every part scaled by the same ratio
    torch.testing.assert_close(after, before * (after.norm() / before.norm()), rtol=1e-4, atol=1e-6)

    base = _run(tr, inputs)
    net.set_multiplier(0.0)
    torch.testing.assert_close(_run(tr, inputs, net), base)
    net.set_multiplier(0.5)
    plain = lf.create_network_from_weights(0.5, net.state_dict(), [], tr)
    plain.load_weights(net.state_dict())
    torch.testing.assert_close(_run(tr, inputs, net), _run(tr, inputs, plain), rtol=1e-5, atol=1e-5)

    # module dropout: one decision per input for all parts of a fused module
    drop = _randomize(_split(tr, module_dropout="0.5", train_blocks="double"))
    drop.apply_to(False, True)
    drop.train()
    m = getattr(drop, QKV)
    outcomes = set()
    for seed in range(12):
        torch.manual_seed(seed)
        x = torch.randn(1, 3, HIDDEN)
        kept = {not torch.equal(linear(x), m._org_forwards[i](x)) for i, linear in enumerate(m.org_modules)}
        assert len(kept) == 1
        outcomes |= kept
    assert outcomes == {True, False}
    drop.restore()


# ------------------------------------------------------------------------------------------------------ end to end


@pytest.mark.slow
def test_flux_train_network_with_split_qkv_resumes_exactly(transformer, tmp_path):
    """flux_train_network.py --network_args split_qkv=True (with dropouts, LoRA+ and max-norm) on the tiny model: a run
    resumed from its step-2 state ends with the same losses and file; the file is fused with alpha n x alpha and loads
    into a plain network (same output) and back into a split one (same tensors)."""
    import json

    from conftest import ROOT, write_caption, write_image
    from safetensors.torch import load_file

    for i, c in enumerate([(200, 30, 30), (30, 200, 30)]):
        write_caption(write_image(tmp_path / "1_shapes" / f"{i}.png", (64, 64), c), f"shape {i}")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--num_processes", "1"]
    launch += ["--mixed_precision", "no", "--dynamo_backend", "no", os.path.join(ROOT, "flux_train_network.py")]
    options = (
        "--network_module networks.lora_flux --network_dim 4 --network_alpha 2 --network_dropout 0.1 --scale_weight_norms 0.05 "
        "--network_args split_qkv=True rank_dropout=0.2 module_dropout=0.2 loraplus_lr_ratio=4 --learning_rate 1e-2 "
        "--max_data_loader_n_workers 0 --seed 5 --pretrained_model_name_or_path kiln-tiny-flux --t5xxl_max_token_length 16 "
        "--resolution 64 --train_batch_size 1 --caption_extension .txt --network_train_unet_only --max_train_steps 4 "
        "--output_name s"
    ).split()
    common = [*launch, *options, "--train_data_dir", str(tmp_path)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    for extra in (
        ["--output_dir", full, "--save_every_n_steps", "2", "--save_state"],
        ["--output_dir", resumed, "--resume", full / "s-step00000002-state"],
    ):
        res = subprocess.run([*common, *map(str, extra)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
        assert res.returncode == 0, res.stderr[-4000:]
    losses = [json.loads((d / "s_losses.json").read_text()) for d in (full, resumed)]
    assert losses[1] == losses[0] and len(losses[0]["losses"]) == 4  # the state carries the losses of steps 1-2
    sd, again = load_file(str(full / "s.safetensors")), load_file(str(resumed / "s.safetensors"))
    assert sd.keys() == again.keys() and all(torch.equal(sd[k], again[k]) for k in sd)

    assert sd[QKV + ".lora_down.weight"].shape == (12, HIDDEN) and sd[QKV + ".alpha"].item() == 6.0
    assert sd[LINEAR1 + ".lora_up.weight"].shape == (7 * HIDDEN, 16) and sd[LINEAR1 + ".alpha"].item() == 8.0
    assert sd[QKV + ".lora_up.weight"].any()  # trained
    tr = copy.deepcopy(transformer)
    inputs = _inputs(tr.config)
    plain = lf.create_network_from_weights(1.0, sd, [], tr)
    assert plain.load_weights(sd) == [] and type(getattr(plain, QKV)) is lf.FusedLoRAModule
    split = lf.create_network(1.0, 4, 2.0, [], tr, split_qkv="True")
    assert split.load_weights(sd) == []
    assert all(torch.equal(v, sd[k]) for k, v in split.state_dict().items())
    torch.testing.assert_close(_run(tr, inputs, split), _run(tr, inputs, plain), rtol=1e-5, atol=1e-5)
