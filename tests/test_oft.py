"""networks.oft / networks.oft_flux: sd-scripts' OFT layout and maths, checked against the formula written out here
(sd-scripts' forward: R = (I + Q)(I - Q)^-1 with an explicit inverse, W' = R^T W per block, in float64), on tiny SD1,
SDXL, FLUX and SD3 models."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from library.tiny_models import build_tiny_flux, build_tiny_sd, build_tiny_sd3, build_tiny_sdxl
from networks import oft, oft_flux


@pytest.fixture(scope="module")
def sd():
    return build_tiny_sd()


@pytest.fixture(scope="module")
def flux():
    return build_tiny_flux()


@pytest.fixture(scope="module")
def sd3():
    return build_tiny_sd3()


def reference_rotated(weight: torch.Tensor, blocks: torch.Tensor, alpha: float, multiplier: float = 1.0) -> torch.Tensor:
    """sd-scripts' OFT written out: constrain the norm of Q = B - B^T to alpha x rows, Cayley with an explicit
    inverse, R_m = m (R - I) + I, W'_j = R_m,j^T W_j per block of rows (float64)."""
    k, b, _ = blocks.shape
    q = (blocks - blocks.transpose(1, 2)).double()
    norm = q.norm()
    q = q * ((torch.clamp(norm, max=alpha * weight.shape[0]) + 1e-8) / (norm + 1e-8))
    eye = torch.eye(b, dtype=torch.float64).expand(k, b, b)
    r = (eye + q) @ torch.linalg.inv(eye - q)
    r = multiplier * (r - eye) + eye
    w = weight.double().reshape(k, b, -1)
    return torch.einsum("knm,knp->kmp", r, w).reshape(weight.shape)


def randomize(network: nn.Module, std: float = 0.05, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in network.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)


def unet_output(unet, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    cfg = unet.config
    x = torch.randn(1, cfg.in_channels, 16, 16, generator=gen)
    ctx = torch.randn(1, 8, cfg.cross_attention_dim, generator=gen)
    with torch.no_grad():
        return unet(x, torch.tensor([50]), ctx).sample


def test_sd_keys_targets_and_default_alpha(sd):
    net = oft.create_network(1.0, 4, None, [sd["text_encoder"]], sd["unet"])
    state = net.state_dict()
    name = "oft_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert state[name + ".oft_blocks"].shape == (4, 8, 8) and state[name + ".oft_blocks"].abs().sum() == 0
    assert state[name + ".alpha"].shape == () and state[name + ".alpha"].item() == pytest.approx(1e-3)
    modules = {k.rsplit(".", 1)[0] for k in state}
    assert all(m.rsplit("_", 1)[-1] in ("q", "k", "v", "0") and ("_attn1_" in m or "_attn2_" in m) for m in modules)
    assert len(modules) == 4 * 2 * sum(1 for n, _ in sd["unet"].named_modules() if n.endswith("transformer_blocks.0"))
    assert not net.text_encoder_loras  # text encoders are never adapted
    wide = oft.create_network(1.0, 4, 1e-3, None, sd["unet"], enable_all_linear="True", enable_conv="True")
    wide_modules = {k.rsplit(".", 1)[0] for k in wide.state_dict()}
    assert modules < wide_modules
    assert "oft_unet_up_blocks_1_resnets_0_conv1" in wide_modules  # a 3x3 conv
    assert "oft_unet_down_blocks_0_attentions_0_proj_in" in wide_modules
    assert "oft_unet_down_blocks_0_resnets_0_time_emb_proj" in wide_modules
    out = sd["unet"].get_submodule("up_blocks.1.resnets.0.conv1").out_channels
    assert wide.state_dict()["oft_unet_up_blocks_1_resnets_0_conv1.oft_blocks"].shape == (4, out // 4, out // 4)
    off = oft.create_network(1.0, 4, 1e-3, None, sd["unet"], enable_all_linear="False", enable_conv="False")
    assert {k.rsplit(".", 1)[0] for k in off.state_dict()} == modules  # "False" means false (sd-scripts: enabled)


def test_sd_output_equals_reference_rotation_and_merge(sd):
    unet = copy.deepcopy(sd["unet"])
    net = oft.create_network(0.7, 4, 2e-3, None, unet, enable_all_linear=True, enable_conv=True)
    net.apply_to(True, True)
    randomize(net)
    live = unet_output(unet)
    reference = copy.deepcopy(sd["unet"])
    state = net.state_dict()
    clamped = 0
    with torch.no_grad():
        for m in net.unet_loras:
            path = next(n for n, mod in unet.named_modules() if mod is m.org_module)
            target = reference.get_submodule(path)
            blocks = state[m.lora_name + ".oft_blocks"]
            q = blocks - blocks.transpose(1, 2)
            clamped += int(q.norm() > 2e-3 * target.weight.shape[0])
            target.weight.copy_(reference_rotated(target.weight, blocks, 2e-3, 0.7).float())
    assert clamped > 5  # the constraint matters for many modules
    assert torch.allclose(live, unet_output(reference), atol=2e-5)
    assert not torch.allclose(live, unet_output(sd["unet"]), atol=1e-3)
    for m in net.unet_loras:
        m.merge_to(0.7)
    net.restore()
    assert torch.allclose(unet_output(unet), live, atol=2e-5)


def test_sdxl_names_are_sgm_names():
    from library.sdxl_models import sdxl_unet_lora_name_map

    parts = build_tiny_sdxl()
    unet = parts["unet"]
    net = oft.create_network(
        1.0, 4, 1e-3, None, unet, unet_name_map=sdxl_unet_lora_name_map(unet), te_prefixes=["lora_te1", "lora_te2"]
    )
    names = {m.lora_name for m in net.unet_loras}
    assert "oft_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k" in names
    assert all(n.startswith(("oft_unet_input_blocks_", "oft_unet_middle_block_", "oft_unet_output_blocks_")) for n in names)


def test_file_round_trip_and_sd_scripts_file_loads(sd, tmp_path):
    from library.saving import load_weights_file, save_weights

    unet = copy.deepcopy(sd["unet"])
    net = oft.create_network(1.0, 4, 1e-3, None, unet, enable_conv=True)
    net.apply_to(True, True)
    randomize(net, seed=3)
    live = unet_output(unet)
    path = str(tmp_path / "oft.safetensors")
    save_weights(path, net.state_dict(), {"ss_network_module": "networks.oft"}, None)
    weights, _ = load_weights_file(path)
    # sd-scripts names every module oft_unet_<diffusers path with . -> _>; a file written that way loads here
    for m in net.unet_loras:
        path_ = next(n for n, mod in unet.named_modules() if mod is m.org_module)
        assert "oft_unet_" + path_.replace(".", "_") == m.lora_name
    net.restore()
    unet2 = copy.deepcopy(sd["unet"])
    again = oft.create_network_from_weights(1.0, weights, None, unet2)
    again.apply_to(True, True)
    assert again.load_weights(weights, path) == []
    assert torch.equal(unet_output(unet2), live)
    assert {k: tuple(v.shape) for k, v in again.state_dict().items()} == {k: tuple(v.shape) for k, v in weights.items()}


def test_training_moves_blocks_and_gradients_reach_them_only(sd):
    unet = copy.deepcopy(sd["unet"])
    unet.requires_grad_(False)
    net = oft.create_network(1.0, 4, 1e-2, None, unet)
    net.apply_to(True, True)
    groups, names = net.param_groups(None, 1e-3, 1e-4)
    assert names == ["unet"] and groups[0]["lr"] == 1e-3
    opt = torch.optim.AdamW(groups[0]["params"], lr=1e-3)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    for _ in range(2):
        unet_output_train = unet(
            torch.randn(1, 4, 16, 16), torch.tensor([10]), torch.randn(1, 8, unet.config.cross_attention_dim)
        ).sample
        unet_output_train.square().mean().backward()
        opt.step()
        opt.zero_grad()
    after = net.state_dict()
    moved = [k for k in after if k.endswith(".oft_blocks") and not torch.equal(after[k], before[k])]
    assert len(moved) == len(net.unet_loras)
    assert all(p.grad is None for p in unet.parameters())


def test_flux_per_part_layout_constraint_and_output(flux):
    transformer = copy.deepcopy(flux["transformer"])
    net = oft_flux.create_network(1.0, 4, 1e-3, None, transformer, enable_all_linear="True")
    net.apply_to(True, True)
    state = net.state_dict()
    hidden = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    mlp = transformer.single_transformer_blocks[0].proj_mlp.out_features
    qkv = "oft_unet_double_blocks_0_img_attn_qkv"
    assert [tuple(state[f"{qkv}.oft_blocks.{i}"].shape) for i in range(3)] == [(4, hidden // 4, hidden // 4)] * 3
    linear1 = "oft_unet_single_blocks_0_linear1"
    assert tuple(state[f"{linear1}.oft_blocks.3"].shape) == (4, mlp // 4, mlp // 4)
    assert tuple(state["oft_unet_double_blocks_0_img_attn_proj.oft_blocks.0"].shape) == (4, hidden // 4, hidden // 4)
    assert f"{linear1}.oft_blocks.4" not in state and "oft_unet_double_blocks_0_img_mod_lin.oft_blocks.0" in state
    attn_only = oft_flux.create_network(1.0, 4, 1e-3, None, flux["transformer"])
    suffixes = {m.lora_name.split("_", 5)[-1] for m in attn_only.unet_loras}
    assert suffixes == {"img_attn_qkv", "img_attn_proj", "txt_attn_qkv", "txt_attn_proj"}
    randomize(net, std=0.05, seed=1)
    # the reference: each part of a fused layer rotated and constrained (alpha x its own width) on its own
    for m in net.unet_loras:
        parts = [net.state_dict()[f"{m.lora_name}.oft_blocks.{i}"] for i in range(len(m.org_modules))]
        expected = torch.cat([reference_rotated(o.weight, b, 1e-3) for o, b in zip(m.org_modules, parts)]).float()
        assert torch.allclose(m.merged_weight(torch.cat([o.weight for o in m.org_modules]), 1.0), expected, atol=1e-6)
    inputs = flux_inputs(transformer)
    with torch.no_grad():
        live = transformer(**inputs).sample
        for m in net.unet_loras:
            m.merge_to(1.0)
        net.restore()
        merged = transformer(**inputs).sample
        base = flux["transformer"](**inputs).sample
    assert torch.allclose(live, merged, atol=2e-5) and not torch.allclose(live, base, atol=1e-4)


def test_sd3_fused_qkv_is_one_rotation(sd3):
    transformer = copy.deepcopy(sd3["transformer"])
    net = oft.create_network(1.0, 4, 1e-3, None, transformer, enable_all_linear=True)
    net.apply_to(True, True)
    randomize(net, seed=2)
    state = net.state_dict()
    hidden = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    name = "oft_unet_joint_blocks_0_x_block_attn_qkv"
    assert tuple(state[name + ".oft_blocks"].shape) == (4, 3 * hidden // 4, 3 * hidden // 4)
    assert all(".joint_blocks_" in n or n.startswith("oft_unet_joint_blocks_") for n in (m.lora_name for m in net.unet_loras))
    module = dict(net.named_children())[name]
    fused = torch.cat([o.weight for o in module.org_modules])
    assert torch.allclose(
        module.merged_weight(fused, 1.0), reference_rotated(fused, state[name + ".oft_blocks"], 1e-3).float(), atol=1e-6
    )
    ordered = [m for m in net.unet_loras if m.row_order is not None]  # the pre-only context block's modulation
    assert ordered
    m = ordered[0]
    file_rows = m.to_file_rows(m.org_module.weight.detach())
    expected = m.to_module_rows(reference_rotated(file_rows, state[m.lora_name + ".oft_blocks"], 1e-3).float())
    x = torch.randn(2, m.org_module.in_features)
    with torch.no_grad():
        assert torch.allclose(m.org_module(x), nn.functional.linear(x, expected, m.org_module.bias), atol=1e-5)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda p: oft.create_network(1.0, 5, 1e-3, None, p["unet"]), "cannot be split into --network_dim 5"),
        (lambda p: oft.create_network(1.0, 4, 1e-3, None, p["unet"], neuron_dropout=0.1), "OFT has no dropout"),
        (
            lambda p: oft.create_network(1.0, 4, 1e-3, None, p["unet"], rank_dropout="0.1"),
            "unknown network_args for networks.oft: rank_dropout",
        ),
        (lambda p: oft.create_network(1.0, 4, 1e-3, None, p["unet"], enable_conv="maybe"), "must be True or False"),
        (lambda p: oft_flux.create_network(1.0, 4, 1e-3, None, p["unet"]), "networks.oft_flux is for FLUX.1"),
        (lambda p: oft.create_network(1.0, 4, 1e-3, None, p["unet"], loraplus_lr_ratio="4"), r"LoRA\+ does not apply to OFT"),
    ],
)
def test_bad_arguments_are_errors(sd, call, message):
    with pytest.raises(ValueError, match=message):
        call(sd)


def test_oft_on_flux_and_sd3_arguments(flux, sd3):
    with pytest.raises(ValueError, match="networks.oft_flux"):
        oft.create_network(1.0, 4, 1e-3, None, flux["transformer"])
    with pytest.raises(ValueError, match="no convolutions"):
        oft.create_network(1.0, 4, 1e-3, None, sd3["transformer"], enable_conv=True)
    with pytest.raises(ValueError, match="unknown network_args for networks.oft_flux: enable_conv"):
        oft_flux.create_network(1.0, 4, 1e-3, None, flux["transformer"], enable_conv=True)


def flux_inputs(transformer) -> dict:
    gen = torch.Generator().manual_seed(0)
    cfg = transformer.config
    return {
        "hidden_states": torch.randn(1, 16, cfg.in_channels, generator=gen),
        "encoder_hidden_states": torch.randn(1, 8, cfg.joint_attention_dim, generator=gen),
        "pooled_projections": torch.randn(1, cfg.pooled_projection_dim, generator=gen),
        "timestep": torch.tensor([0.5]),
        "img_ids": torch.zeros(16, 3),
        "txt_ids": torch.zeros(8, 3),
        "guidance": torch.tensor([3.5]),
    }


def test_merge_tool_into_sd_single_file_honours_ratio(sd, tmp_path):
    """tools/merge_lora.py merges an OFT file into an SD single file at its --ratios value (sd-scripts ignores it):
    each adapted weight is the reference rotation at multiplier 0.5; every other tensor is untouched."""
    from safetensors.torch import load_file, save_file

    from library.ldm_names import unet_ldm_module_names
    from library.sd_models import sd_to_ldm_state_dict
    from tools.merge_lora import main

    src = tmp_path / "sd15.safetensors"
    state = {
        k: v.detach().clone().contiguous()
        for k, v in sd_to_ldm_state_dict(sd["text_encoder"], sd["vae"], sd["unet"], False).items()
    }
    save_file(state, str(src))
    unet = copy.deepcopy(sd["unet"])
    net = oft.create_network(1.0, 4, 2e-3, None, unet, enable_conv=True)
    net.apply_to(True, True)
    randomize(net, seed=4)
    oft_file = tmp_path / "oft.safetensors"
    save_file(net.state_dict(), str(oft_file))
    out = tmp_path / "merged.safetensors"
    assert main(["--sd_model", str(src), "--models", str(oft_file), "--ratios", "0.5", "--save_to", str(out)]) == 0
    merged = load_file(str(out))
    ldm = unet_ldm_module_names(unet)
    changed = set()
    for m in net.unet_loras:
        path = next(n for n, mod in unet.named_modules() if mod is m.org_module)
        key = f"model.diffusion_model.{ldm[path]}.weight"
        expected = reference_rotated(state[key], net.state_dict()[m.lora_name + ".oft_blocks"], 2e-3, 0.5).float()
        assert torch.allclose(merged[key], expected, atol=1e-6), key
        changed.add(key)
    assert all(torch.equal(merged[k], v) for k, v in state.items() if k not in changed)


def test_merge_tool_into_flux_file_rotates_each_part_and_equals_live(flux, tmp_path):
    """A FLUX OFT file merged into the BFL file: the fused qkv and linear1 rows are rotated part by part (sd-scripts
    concatenates the parts on the wrong axis); the merged model's output equals the live network's at the ratio."""
    from safetensors.torch import load_file, save_file

    from library.flux_models import save_flux_transformer_bfl, transformer_from_bfl
    from tools.merge_lora import main

    transformer = copy.deepcopy(flux["transformer"])
    src = tmp_path / "flux.safetensors"
    save_flux_transformer_bfl(str(src), transformer)
    net = oft_flux.create_network(1.0, 4, 1e-3, None, transformer, enable_all_linear=True)
    net.apply_to(True, True)
    randomize(net, seed=5)
    oft_file = tmp_path / "oft.safetensors"
    save_file(net.state_dict(), str(oft_file))
    out = tmp_path / "merged.safetensors"
    assert main(["--flux_model", str(src), "--models", str(oft_file), "--ratios", "0.7", "--save_to", str(out)]) == 0
    net.set_multiplier(0.7)
    inputs = flux_inputs(transformer)
    with torch.no_grad():
        live = transformer(**inputs).sample
        merged = transformer_from_bfl(load_file(str(out)), dtype=torch.float32)(**inputs).sample
        base = flux["transformer"](**inputs).sample
    assert torch.allclose(merged, live, atol=2e-5) and not torch.allclose(merged, base, atol=1e-4)


def test_base_weights_merge_in_memory(sd, flux):
    """--base_weights with an OFT file: the loaded models' weights become the live network's at the multiplier."""
    from networks.adapter import merge_typed_file
    from networks.merge import merge_into_models

    unet = copy.deepcopy(sd["unet"])
    net = oft.create_network(1.0, 4, 2e-3, None, unet)
    net.apply_to(True, True)
    randomize(net, seed=6)
    net.set_multiplier(0.3)
    live = unet_output(unet)
    target = copy.deepcopy(sd["unet"])
    assert merge_into_models(net.state_dict(), 0.3, [sd["text_encoder"]], target) == len(net.unet_loras)
    assert torch.allclose(unet_output(target), live, atol=2e-5)
    transformer = copy.deepcopy(flux["transformer"])
    fnet = oft_flux.create_network(1.0, 4, 1e-3, None, transformer)
    fnet.apply_to(True, True)
    randomize(fnet, seed=7)
    with torch.no_grad():
        flive = transformer(**flux_inputs(transformer)).sample
    ftarget = copy.deepcopy(flux["transformer"])
    assert merge_typed_file(fnet.state_dict(), 1.0, None, ftarget) == len(fnet.unet_loras)
    with torch.no_grad():
        assert torch.allclose(ftarget(**flux_inputs(ftarget)).sample, flive, atol=2e-5)


# ---------------------------------------------------------------------------------------------------------------------
# End to end: the real scripts
# ---------------------------------------------------------------------------------------------------------------------

E2E = ["--cache_latents", "--learning_rate", "1e-3", "--seed", "1", "--max_data_loader_n_workers", "0"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> list[str]:
    """Four small images with captions: the --dataset_config arguments."""
    from conftest import write_caption, write_image

    root = tmp_path_factory.mktemp("data")
    for i, color in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]):
        write_caption(write_image(root / "img" / f"{i}.png", (64, 64), color), f"shape {i}, color{i}")
    config = root / "data.toml"
    config.write_text(
        f"[[datasets]]\nresolution = 64\nbatch_size = 2\n\n  [[datasets.subsets]]\n  image_dir = '{root / 'img'}'\n"
    )
    return ["--dataset_config", str(config)]


def _file(path):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def test_train_network_oft_writes_sd_scripts_layout_and_resumes_exactly(dataset, tmp_path):
    """train_network.py --network_module networks.oft: kohya keys and metadata, the blocks move, and --resume from the
    step-2 state gives the uninterrupted run's file bit for bit."""
    from conftest import launch_script

    common = ["--pretrained_model_name_or_path", "kiln-tiny-sd", *dataset, *E2E, "--output_name", "o", "--max_train_steps", "4",
              "--network_module", "networks.oft", "--network_dim", "4", "--network_alpha", "1e-2",
              "--network_args", "enable_conv=True"]  # fmt: skip
    full = tmp_path / "full"
    launch_script("train_network.py", *common, "--output_dir", full, "--save_every_n_steps", "2", "--save_state")
    weights, metadata = _file(full / "o.safetensors")
    assert metadata["ss_network_module"] == "networks.oft" and metadata["ss_network_dim"] == "4"
    assert float(metadata["ss_network_alpha"]) == pytest.approx(1e-2)
    assert all(k.startswith("oft_unet_") and k.endswith((".oft_blocks", ".alpha")) for k in weights)
    assert "oft_unet_up_blocks_1_resnets_0_conv1.oft_blocks" in weights
    blocks = [v for k, v in weights.items() if k.endswith(".oft_blocks")]
    assert all(b.abs().sum() > 0 for b in blocks)  # every module trained
    resumed = tmp_path / "resumed"
    launch_script("train_network.py", *common, "--output_dir", resumed, "--resume", full / "o-step00000002-state")
    again, _ = _file(resumed / "o.safetensors")
    assert again.keys() == weights.keys() and all(torch.equal(again[k], weights[k]) for k in weights)


def test_flux_train_network_oft_flux_with_fp8_block_swap_and_checkpointing(dataset, tmp_path):
    """flux_train_network.py --network_module networks.oft_flux over an fp8 base with swapped blocks and gradient
    checkpointing: the per-part layout of every block Linear, all trained; the file loads back into a network."""
    from conftest import launch_script

    launch_script(
        "flux_train_network.py", "--pretrained_model_name_or_path", "kiln-tiny-flux", *dataset, *E2E, "--output_dir", tmp_path,
        "--output_name", "f", "--max_train_steps", "3", "--network_module", "networks.oft_flux", "--network_dim", "4",
        "--network_alpha", "1e-2", "--network_args", "enable_all_linear=True", "--network_train_unet_only",
        "--cache_text_encoder_outputs", "--fp8_base", "--mixed_precision", "bf16", "--blocks_to_swap", "2",
        "--gradient_checkpointing",
    )  # fmt: skip
    weights, metadata = _file(tmp_path / "f.safetensors")
    assert metadata["ss_network_module"] == "networks.oft_flux"
    assert {f"oft_unet_single_blocks_0_linear1.oft_blocks.{i}" for i in range(4)} <= set(weights)
    assert all(v.abs().sum() > 0 for k, v in weights.items() if ".oft_blocks." in k)
    net = oft_flux.create_network_from_weights(1.0, weights, None, build_tiny_flux()["transformer"])
    assert net.load_weights(weights) == []


def test_oft_runs_are_checked_as_unet_only():
    """OFT adapts no text encoder: text-encoder outputs can be cached without --network_train_unet_only, and the flags
    that cannot apply (--scale_weight_norms, --network_train_text_encoder_only) are refused before anything loads."""
    from library.family_sdxl import SdxlFamily
    from library.method_adapter import AdapterMethod
    from library.train_script import training_parser

    family, method = SdxlFamily(), AdapterMethod()
    parser = training_parser(family, "test")
    base = ["--pretrained_model_name_or_path", "kiln-tiny-sdxl", "--output_dir", "out", "--network_module"]
    args = parser.parse_args([*base, "networks.oft", "--cache_text_encoder_outputs"])
    assert method.argument_problems(args, family) == [] and not method.trains_text_encoders(args)
    assert method.trains_text_encoders(parser.parse_args([*base, "networks.lora"]))
    problems = method.argument_problems(parser.parse_args([*base, "networks.oft", "--scale_weight_norms", "1"]), family)
    assert len(problems) == 1 and "--scale_weight_norms" in problems[0]
    problems = method.argument_problems(parser.parse_args([*base, "networks.oft", "--network_train_text_encoder_only"]), family)
    assert any("adapts no text encoder" in p for p in problems)


def test_an_oft_file_given_to_networks_lora_names_its_module(sd):
    from networks import lora

    weights = oft.create_network(1.0, 4, 1e-3, None, sd["unet"]).state_dict()
    with pytest.raises(ValueError, match="networks.oft"):
        lora.create_network_from_weights(1.0, weights, [sd["text_encoder"]], sd["unet"])
