"""tools/convert_network.py: kohya OFT files (networks.oft / networks.oft_flux) <-> ComfyUI's OFT layout.

The oracle is ComfyUI's OFT written out here (comfy/weight_adapter/oft.py, OFTAdapter.calculate_weight), independent
of kiln's module: q = B - B^T over all blocks of the layer; alpha > 0 and |q| + 1e-8 > alpha: q <- q alpha / (|q| +
1e-8); r = (I + q)(I - q)^-1; W += s * einsum("k n m, k n ... -> k m ...", s r - s I, W viewed as (k, b, ...)). Applied
to the converted file on the base weights ComfyUI patches (the BFL / SAI fused weight of a fused layer), it must give
the weights kiln's trained module computes with (the live forward at multiplier 1), for SD 1.x (convs included, many
layers over kohya's constraint), SDXL, FLUX (fused qkv, proj) and SD3 (fused qkv, a reordered modulation)."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from library.saving import load_weights_file, save_weights
from networks import oft, oft_flux
from tools.convert_network import main as convert_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KOHYA_META = {"ss_network_module": "networks.oft", "ss_network_alpha": "0.001", "ss_network_dim": "4", "ss_output_name": "x"}


# -- the oracle: ComfyUI's OFT ---------------------------------------------------------------------------------------


def comfyui_weight(weight: torch.Tensor, blocks: torch.Tensor, alpha: float | None, strength: float = 1.0) -> torch.Tensor:
    """ComfyUI's OFTAdapter.calculate_weight (float32, no dora_scale, function = identity)."""
    weight = weight.clone().float()
    blocks = blocks.float()
    alpha = 0 if alpha is None else alpha
    block_num, block_size, *_ = blocks.shape
    eye = torch.eye(block_size)
    q = blocks - blocks.transpose(1, 2)
    normed_q = q
    if alpha > 0:
        q_norm = torch.norm(q) + 1e-8
        if q_norm > alpha:
            normed_q = q * alpha / q_norm
    r = (eye + normed_q) @ (eye - normed_q).float().inverse()
    _, *shape = weight.shape
    lora_diff = torch.einsum(
        "k n m, k n ... -> k m ...", (r * strength) - strength * eye, weight.view(block_num, block_size, *shape)
    ).view(-1, *shape)
    weight += strength * lora_diff
    return weight


def comfy_name(module) -> str:
    assert module.lora_name.startswith("oft_unet_")
    return "lora_unet_" + module.lora_name[len("oft_unet_") :]


def file_weight(module) -> torch.Tensor:
    """The weight ComfyUI patches for this layer: the wrapped weights joined in the file's row order (FLUX's BFL
    qkv / SD3's SAI qkv; one layer's own weight otherwise)."""
    return module.to_file_rows(torch.cat([o.weight.detach().float() for o in module.org_modules]))


def layer_output(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if isinstance(layer, nn.Conv2d):
        return nn.functional.conv2d(x, weight, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups)
    return nn.functional.linear(x, weight, layer.bias)


def assert_comfyui_matches_kiln(network, converted: dict[str, torch.Tensor], skip=(), atol=2e-5) -> int:
    """Every module of the applied `network` (multiplier 1): the live output of each wrapped layer equals that layer
    computed with ComfyUI's weight from the converted file. Returns the number of layers checked."""
    gen = torch.Generator().manual_seed(0)
    checked = 0
    for m in network.unet_loras:
        if m.lora_name in skip:
            continue
        name = comfy_name(m)
        alpha = converted.get(name + ".alpha")  # ComfyUI: no .alpha = None
        weight = comfyui_weight(file_weight(m), converted[name + ".oft_blocks"], None if alpha is None else alpha.item())
        rows = m.to_module_rows(weight).split(m.splits)
        first = m.org_modules[0]
        if isinstance(first, nn.Conv2d):
            x = torch.randn(1, first.in_channels, 6, 6, generator=gen)
        else:
            x = torch.randn(3, first.in_features, generator=gen)
        with torch.no_grad():
            for layer, w in zip(m.org_modules, rows):
                live = layer(x)  # routed through kiln's OFT module
                assert torch.allclose(live, layer_output(layer, x, w.reshape(layer.weight.shape)), atol=atol), name
        checked += 1
    return checked


def randomize_mixed(network: nn.Module, seed: int = 0) -> None:
    """Random blocks: every other tensor far over kohya's constraint (alpha 1e-3 x width), the others well under it."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for i, p in enumerate(p for name, p in network.named_parameters() if "oft_blocks" in name):
            std = 0.05 if i % 2 else 2e-4
            p.copy_(torch.randn(p.shape, generator=gen) * std)


def kohya_clamps(state: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(block tensors over kohya's constraint, tensors under it) of a kohya state dict."""
    over = under = 0
    for key, b in state.items():
        if ".oft_blocks" in key:
            alpha = state[key.split(".oft_blocks")[0] + ".alpha"].item()
            norm = (b - b.transpose(1, 2)).norm()
            over += int(norm > alpha * b.shape[0] * b.shape[1])
            under += int(norm < alpha * b.shape[0] * b.shape[1])
    return over, under


def convert(tmp_path, state, to: str, metadata=None, name="src") -> tuple[dict, dict]:
    src, dst = tmp_path / f"{name}.safetensors", tmp_path / f"{name}_{to}.safetensors"
    if not src.exists():
        save_weights(str(src), state, metadata or KOHYA_META, None)
    assert convert_main([str(src), str(dst), "--to", to]) == 0
    return load_weights_file(str(dst))


def fail(capsys, *args) -> str:
    with pytest.raises(SystemExit) as e:
        convert_main([str(a) for a in args])
    assert e.value.code == 2
    return capsys.readouterr().err


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The layers are tiny: OpenMP's threads only add synchronisation (20x slower on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- models ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd_unet():
    from diffusers import UNet2DConditionModel

    from library.tiny_models import tiny_unet_config

    torch.manual_seed(0)
    return UNet2DConditionModel(**tiny_unet_config()).eval()


@pytest.fixture(scope="module")
def flux_transformer():
    from diffusers import FluxTransformer2DModel

    from library.tiny_models import tiny_flux_transformer_config

    torch.manual_seed(0)
    return FluxTransformer2DModel(**tiny_flux_transformer_config()).eval()


def unet_output(unet) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, unet.config.in_channels, 16, 16, generator=gen)
    ctx = torch.randn(1, 8, unet.config.cross_attention_dim, generator=gen)
    with torch.no_grad():
        return unet(x, torch.tensor([50]), ctx).sample


def flux_output(transformer) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    cfg = transformer.config
    with torch.no_grad():
        return transformer(
            hidden_states=torch.randn(1, 16, cfg.in_channels, generator=gen),
            encoder_hidden_states=torch.randn(1, 8, cfg.joint_attention_dim, generator=gen),
            pooled_projections=torch.randn(1, cfg.pooled_projection_dim, generator=gen),
            timestep=torch.tensor([0.5]),
            img_ids=torch.zeros(16, 3),
            txt_ids=torch.zeros(8, 3),
            guidance=torch.tensor([3.5]),
        ).sample


# -- SD 1.x ------------------------------------------------------------------------------------------------------------


def test_sd1_comfyui_applies_the_trained_rotation_and_round_trips(sd_unet, tmp_path):
    unet = copy.deepcopy(sd_unet)
    net = oft.create_network(1.0, 4, 1e-3, None, unet, enable_all_linear=True, enable_conv=True)
    net.apply_to(True, True)
    randomize_mixed(net)
    state = net.state_dict()
    over, under = kohya_clamps(state)
    assert over > 10 and under > 10  # kohya's clamp acts on many layers and leaves many alone

    converted, meta = convert(tmp_path, state, "comfyui")
    # ComfyUI's key map (comfy/lora.py model_lora_keys_unet): SD 1.x U-Nets map lora_unet_<diffusers name> (through
    # unet_to_diffusers) to their ldm weights
    for name in (
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_out_0",
        "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_ff_net_0_proj",
        "lora_unet_down_blocks_0_resnets_0_conv1",
        "lora_unet_up_blocks_0_upsamplers_0_conv",
    ):
        assert converted[name + ".oft_blocks"].dim() == 3 and converted[name + ".alpha"].item() == 0
    assert len(converted) == len(state) and all(k.startswith("lora_unet_") for k in converted)
    assert assert_comfyui_matches_kiln(net, converted) == len(net.unet_loras)
    # the clamp matters: the kohya file merely renamed (its alpha read as the whole limit) is not the trained result
    renamed = {"lora_unet_" + k[len("oft_unet_") :]: v for k, v in state.items()}
    m = next(m for m in net.unet_loras if kohya_clamps({k: v for k, v in state.items() if k.startswith(m.lora_name + ".")})[0])
    naive = comfyui_weight(file_weight(m), renamed[comfy_name(m) + ".oft_blocks"], renamed[comfy_name(m) + ".alpha"].item())
    assert not torch.allclose(naive, m.merged_weight(file_weight(m), 1.0), atol=1e-4)
    assert meta["ss_network_module"] == "lycoris.kohya" and meta["ss_network_alpha"] == "0"
    note = json.loads(meta["kiln_converted_from"])
    assert note["file"] == "src.safetensors" and note["ss_network_module"] == "networks.oft" and note["to"] == "comfyui"
    assert meta["ss_output_name"] == "x" and "sshs_model_hash" in meta

    # and back: kiln loads the kohya file and computes what the original network computed
    back, back_meta = convert(tmp_path, converted, "kohya", name="src_comfyui")
    assert set(back) == set(state) and all(back[k].shape == state[k].shape for k in state)
    alpha = back["oft_unet_down_blocks_0_resnets_0_conv1.alpha"].item()
    assert all(back[k].item() == alpha for k in back if k.endswith(".alpha"))
    assert 1e-3 * 0.999 < alpha < 1e-3 * 1.01  # the clamped layers sit on the trained limit
    assert back_meta["ss_network_module"] == "networks.oft" and float(back_meta["ss_network_alpha"]) == pytest.approx(alpha)
    assert json.loads(back_meta["ss_network_args"]) == {"enable_all_linear": "True", "enable_conv": "True"}
    live = unet_output(unet)
    unet2 = copy.deepcopy(sd_unet)
    again = oft.create_network_from_weights(1.0, back, None, unet2)
    again.apply_to(True, True)
    assert again.load_weights(back, "back") == []
    assert torch.allclose(unet_output(unet2), live, atol=2e-5)
    assert not torch.allclose(unet_output(sd_unet), live, atol=1e-3)


def test_sdxl_names_are_comfyuis(tmp_path):
    from diffusers import UNet2DConditionModel

    from library.sdxl_models import sdxl_unet_lora_name_map
    from library.tiny_models import tiny_sdxl_unet_config

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**tiny_sdxl_unet_config()).eval()
    net = oft.create_network(1.0, 4, 1e-3, None, unet, unet_name_map=sdxl_unet_lora_name_map(unet))
    net.apply_to(True, True)
    randomize_mixed(net, seed=1)
    converted, _ = convert(tmp_path, net.state_dict(), "comfyui")
    # SDXL: lora_unet_<sgm name> is ComfyUI's own key (diffusion_model.<name>.weight with "." -> "_")
    for name in (
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k",
        "lora_unet_middle_block_1_transformer_blocks_1_attn1_to_out_0",
        "lora_unet_output_blocks_0_1_transformer_blocks_0_attn1_to_v",
    ):
        assert name + ".oft_blocks" in converted
    assert assert_comfyui_matches_kiln(net, converted) == len(net.unet_loras)


# -- FLUX --------------------------------------------------------------------------------------------------------------


def test_flux_fused_qkv_joins_its_parts_and_linear1_is_refused(flux_transformer, tmp_path, capsys):
    transformer = copy.deepcopy(flux_transformer)
    net = oft_flux.create_network(1.0, 4, 1e-3, None, transformer, enable_all_linear="True")
    net.apply_to(True, True)
    randomize_mixed(net, seed=2)
    state = net.state_dict()
    src = tmp_path / "flux_all.safetensors"
    save_weights(str(src), state, {**KOHYA_META, "ss_network_module": "networks.oft_flux"}, None)
    err = fail(capsys, src, tmp_path / "out.safetensors", "--to", "comfyui")
    assert "oft_unet_single_blocks_0_linear1 (parts of block sizes 8, 8, 8, 32)" in err
    assert "oft_unet_single_blocks_1_linear1" in err and "nothing was written" in err
    assert not (tmp_path / "out.safetensors").exists()

    # without the linear1 layers (zero blocks: R = I, so the network computes the same), every layer converts
    linear1 = {m.lora_name for m in net.unet_loras if m.lora_name.endswith("_linear1")}
    with torch.no_grad():
        for m in net.unet_loras:
            if m.lora_name in linear1:
                for p in m.oft_blocks:
                    p.zero_()
    state = {k: v for k, v in net.state_dict().items() if k.split(".")[0] not in linear1}
    over, under = kohya_clamps(state)
    assert over > 5 and under > 5
    converted, _ = convert(tmp_path, state, "comfyui", {"ss_network_module": "networks.oft_flux"}, name="flux")
    hidden = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    # ComfyUI's FLUX keys: lora_unet_<BFL name>, one (3k, b, b) tensor over the fused qkv weight
    qkv = converted["lora_unet_double_blocks_0_img_attn_qkv.oft_blocks"]
    assert qkv.shape == (12, hidden // 4, hidden // 4)
    assert converted["lora_unet_double_blocks_1_txt_attn_proj.oft_blocks"].shape == (4, hidden // 4, hidden // 4)
    assert "lora_unet_single_blocks_0_linear2.oft_blocks" in converted
    assert "lora_unet_double_blocks_0_img_mod_lin.oft_blocks" in converted
    assert not any(".oft_blocks." in k for k in converted)
    assert assert_comfyui_matches_kiln(net, converted, skip=linear1) == len(net.unet_loras) - len(linear1)

    back, meta = convert(tmp_path, converted, "kohya", name="flux_comfyui")
    assert set(back) == set(state)  # sd-scripts' per-part layout again: oft_blocks.0..2 for qkv, .0 elsewhere
    assert meta["ss_network_module"] == "networks.oft_flux"
    assert json.loads(meta["ss_network_args"]) == {"enable_all_linear": "True"}
    live = flux_output(transformer)
    transformer2 = copy.deepcopy(flux_transformer)
    again = oft_flux.create_network_from_weights(1.0, back, None, transformer2)
    again.apply_to(True, True)
    assert again.load_weights(back, "back") == []
    assert torch.allclose(flux_output(transformer2), live, atol=2e-5)
    assert not torch.allclose(flux_output(flux_transformer), live, atol=1e-4)


def test_comfyui_flux_file_with_its_own_alpha_to_kohya(flux_transformer, tmp_path):
    """A file in ComfyUI's layout (one block size per layer, alpha = ComfyUI's limit, here acting): --to kohya splits
    qkv into q, k, v and linear1 into q, k, v and the MLP input (whose 4x wider blocks hold 4 file blocks each), and
    kiln then computes exactly what ComfyUI computes; back --to comfyui gives the same rotation."""
    transformer = copy.deepcopy(flux_transformer)
    hidden = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    mlp = transformer.single_transformer_blocks[0].proj_mlp.out_features
    assert mlp == 4 * hidden
    b = hidden // 4
    gen = torch.Generator().manual_seed(3)
    comfy = {
        "lora_unet_double_blocks_0_img_attn_qkv.oft_blocks": torch.randn(12, b, b, generator=gen) * 0.05,
        "lora_unet_double_blocks_0_img_attn_qkv.alpha": torch.tensor(0.5),  # acts: |Q| is about 3
        "lora_unet_single_blocks_1_linear1.oft_blocks": torch.randn((3 * hidden + mlp) // b, b, b, generator=gen) * 0.01,
        "lora_unet_single_blocks_1_linear1.alpha": torch.tensor(0.0),
        "lora_unet_single_blocks_0_linear2.oft_blocks": torch.randn(2, hidden // 2, hidden // 2, generator=gen) * 0.05,
    }
    back, meta = convert(tmp_path, comfy, "kohya", {"ss_network_module": "lycoris.kohya"}, name="comfy")
    assert back["oft_unet_single_blocks_1_linear1.oft_blocks.3"].shape == (4, 4 * b, 4 * b)
    assert [back[f"oft_unet_double_blocks_0_img_attn_qkv.oft_blocks.{i}"].shape[0] for i in range(3)] == [4, 4, 4]
    assert back["oft_unet_single_blocks_0_linear2.oft_blocks.0"].shape == (2, hidden // 2, hidden // 2)
    assert "oft_unet_single_blocks_0_linear2.oft_blocks.1" not in back
    net = oft_flux.create_network_from_weights(1.0, back, None, transformer)
    net.apply_to(True, True)
    assert net.load_weights(back, "back") == []
    assert assert_comfyui_matches_kiln(net, comfy) == 3  # alpha 0.5 acting, alpha 0 and no alpha (both: no limit)
    again, _ = convert(tmp_path, back, "comfyui", name="comfy_kohya")
    q = comfy["lora_unet_double_blocks_0_img_attn_qkv.oft_blocks"]
    scale = 0.5 / ((q - q.transpose(1, 2)).norm() + 1e-8)  # ComfyUI's clamp, now stored in the blocks
    assert torch.allclose(again["lora_unet_double_blocks_0_img_attn_qkv.oft_blocks"], q * scale, atol=1e-7)
    assert torch.equal(
        again["lora_unet_single_blocks_1_linear1.oft_blocks"], comfy["lora_unet_single_blocks_1_linear1.oft_blocks"]
    )


# -- SD3 ---------------------------------------------------------------------------------------------------------------


def test_sd3_fused_qkv_stays_one_tensor(tmp_path):
    from diffusers import SD3Transformer2DModel

    from library.sd3_models import tiny_sd3_transformer_config

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(**tiny_sd3_transformer_config()).eval()
    net = oft.create_network(1.0, 4, 1e-3, None, transformer, enable_all_linear=True)
    net.apply_to(True, True)
    randomize_mixed(net, seed=4)
    state = net.state_dict()
    converted, _ = convert(tmp_path, state, "comfyui")
    hidden = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    # ComfyUI's SD3 keys: lora_unet_<SAI name>, the fused qkv one weight of 3 x hidden rows
    assert converted["lora_unet_joint_blocks_0_x_block_attn_qkv.oft_blocks"].shape == (4, 3 * hidden // 4, 3 * hidden // 4)
    assert "lora_unet_joint_blocks_0_context_block_attn_proj.oft_blocks" in converted
    assert any(m.row_order is not None for m in net.unet_loras)  # the pre-only context block's reordered modulation
    assert assert_comfyui_matches_kiln(net, converted) == len(net.unet_loras)
    back, meta = convert(tmp_path, converted, "kohya", name="src_comfyui")
    assert set(back) == set(state) and meta["ss_network_module"] == "networks.oft"
    again = oft.create_network_from_weights(1.0, back, None, copy.deepcopy(transformer))
    assert again.load_weights(back, "back") == []
    modules = dict(again.named_children())
    for m in net.unet_loras:  # the same rotation as the trained module
        other = modules[m.lora_name]
        assert torch.allclose(other.merged_weight(file_weight(m), 1.0), m.merged_weight(file_weight(m), 1.0), atol=2e-5)


# -- refusals ------------------------------------------------------------------------------------------------------------


def test_refusals(tmp_path, capsys):
    blocks = torch.randn(4, 8, 8) * 0.01
    name = "oft_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    kohya = {name + ".oft_blocks": blocks, name + ".alpha": torch.tensor(1e-3)}
    src = tmp_path / "oft.safetensors"
    save_weights(str(src), kohya, None, None)
    dst = tmp_path / "exists.safetensors"
    dst.write_bytes(b"keep")
    assert "already exists" in fail(capsys, src, dst, "--to", "comfyui")
    assert dst.read_bytes() == b"keep"

    lora = tmp_path / "lora.safetensors"
    save_weights(
        str(lora),
        {"lora_unet_x_to_q.lora_down.weight": torch.zeros(4, 8), "lora_unet_x_to_q.lora_up.weight": torch.zeros(8, 4)},
        None,
        None,
    )
    err = fail(capsys, lora, tmp_path / "a.safetensors", "--to", "comfyui")
    assert "'lora_unet_x_to_q.lora_down.weight' is a LoRA weight" in err and "nothing was written" in err
    assert "is a LoRA weight" in fail(capsys, lora, tmp_path / "a.safetensors", "--to", "kohya")
    mixed = tmp_path / "mixed.safetensors"
    save_weights(
        str(mixed), {**kohya, "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(8, 4)}, None, None
    )
    assert "text-encoder module" in fail(capsys, mixed, tmp_path / "a.safetensors", "--to", "comfyui")
    assert "in kohya's layout already (convert it with --to comfyui)" in fail(
        capsys, src, tmp_path / "a.safetensors", "--to", "kohya"
    )
    boft = tmp_path / "boft.safetensors"
    save_weights(str(boft), {"lora_unet_x.oft_blocks": torch.zeros(2, 4, 8, 8)}, None, None)
    assert "BOFT" in fail(capsys, boft, tmp_path / "a.safetensors", "--to", "kohya")
    assert not (tmp_path / "a.safetensors").exists()
    assert "does not exist" in fail(capsys, tmp_path / "missing.safetensors", tmp_path / "a.safetensors", "--to", "kohya")

    # the command line itself: exit status 2 on a refusal; in-process: 0 and a file on success, --help explains
    cmd = [sys.executable, os.path.join(ROOT, "tools", "convert_network.py")]
    res = subprocess.run(cmd + [str(lora), str(tmp_path / "b.safetensors"), "--to", "comfyui"], capture_output=True, text=True)
    assert res.returncode == 2 and "is a LoRA weight" in res.stderr
    assert convert_main([str(src), str(tmp_path / "b.safetensors"), "--to", "comfyui"]) == 0
    assert load_weights_file(str(tmp_path / "b.safetensors"))[0].keys() == {
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.oft_blocks",
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha",
    }
    with pytest.raises(SystemExit) as e:
        convert_main(["--help"])
    assert e.value.code == 0 and "alpha 0" in capsys.readouterr().out
