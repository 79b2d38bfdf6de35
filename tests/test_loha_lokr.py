"""networks.loha and networks.lokr (LyCORIS LoHa / LoKr) on every kiln family: SD 1.x, SDXL, FLUX, SD3.

Oracles: the lycoris-lora package (4.1.3) — its LokrModule / LohaModule build the same keys and shapes for every layout
option, its `factorization` splits sizes the same way, and its functional `diff_weight` computes, from the SAVED file's
tensors, the weight change kiln's `delta_weight()` gives (Tucker LoKr by ComfyUI's formula instead: lycoris' functional
path reads that rank off the wrong axis). For the model: the output with the adapter applied at multiplier m equals the
output after kiln's `merge_to(m)`; for FLUX and SD3 also the output of a model whose original-layout (BFL / SAI)
checkpoint got the lycoris weight change added under the file's key names, as ComfyUI applies it (fused qkv rows, SAI's
(shift, scale) modulation order). Plus hand-written key/shape expectations, training, save/load, LoRA+, max-norm,
refused arguments and one train_network.py run.
"""

from __future__ import annotations

import copy
import types

import lycoris.functional.loha as ly_loha
import lycoris.functional.lokr as ly_lokr
import pytest
import torch
from conftest import launch_script, write_caption, write_image
from safetensors.torch import load as st_load
from safetensors.torch import load_file, save_file
from safetensors.torch import save as st_save
from torch import nn

import networks.loha as loha
import networks.lokr as lokr
import networks.lora as lora
from library.tiny_models import build_tiny_flux, build_tiny_sd

MULTIPLIER = 0.7

# name -> (network module, network_dim, network_alpha, type network_args)
VARIANTS = {
    "loha": (loha, 2, 1.0, {}),
    "loha_tucker": (loha, 2, 3.0, {"use_tucker": "True"}),
    "lokr": (lokr, 2, 1.0, {}),
    "lokr_tucker": (lokr, 2, 0.5, {"use_tucker": "True"}),
    "lokr_full": (lokr, 2, 1.0, {"full_matrix": "True"}),
    "lokr_both": (lokr, 1, 0.5, {"factor": "4", "decompose_both": "True"}),
}
SD_CONV = {"conv_dim": "2", "conv_alpha": "1.5"}


# ---------------------------------------------------------------------------------------------------------------------
# helpers


def modules_of(state: dict) -> list[str]:
    return sorted({k.split(".")[0] for k in state})


def shapes_of(state: dict, name: str) -> dict[str, tuple]:
    return {k.split(".", 1)[1]: tuple(v.shape) for k, v in state.items() if k.split(".")[0] == name}


def saved(network) -> dict[str, torch.Tensor]:
    """The network's state dict through a safetensors file (bytes), as consumers read it."""
    return st_load(st_save({k: v.detach().contiguous() for k, v in network.state_dict().items()}))


def lycoris_delta(state: dict, name: str) -> torch.Tensor:
    """The weight change of module `name` of a LoHa/LoKr file, in float64, as the lycoris-lora package computes it
    (functional path); Tucker LoKr as ComfyUI computes it."""
    get = lambda s: None if f"{name}.{s}" not in state else state[f"{name}.{s}"].double()  # noqa: E731
    alpha = float(state[f"{name}.alpha"])
    if get("hada_w1_a") is not None:
        w1a, w1b, w2a, w2b = get("hada_w1_a"), get("hada_w1_b"), get("hada_w2_a"), get("hada_w2_b")
        rank = w1b.shape[0]
        return ly_loha.diff_weight(w1b, w1a, w2b, w2a, get("hada_t1"), get("hada_t2"), gamma=alpha / rank, backend="torch")
    w1, w1a, w1b, w2, w2a, w2b, t2 = (
        get(s) for s in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
    )
    if t2 is None:
        return ly_lokr.diff_weight(w1, w1a, w1b, w2, w2a, w2b, None, gamma=alpha, backend="torch")
    # ComfyUI (comfy/weight_adapter/lokr.py): w2 = einsum(t2, w2_b, w2_a), scale alpha / w2_b's rows
    w1 = w1 if w1 is not None else w1a @ w1b
    half = torch.einsum("i j k l, j r, i p -> p r k l", t2, w2b, w2a)
    return torch.kron(w1[:, :, None, None].contiguous(), half.contiguous()) * (alpha / w2b.shape[0])


def check_deltas_match_lycoris(network, state: dict) -> None:
    """Every module's delta_weight() equals the lycoris weight change of its saved tensors."""
    for m in network.loras:
        ours = m.delta_weight().detach().double()
        theirs = lycoris_delta(state, m.lora_name).reshape(ours.shape)
        assert theirs.abs().max() > 0, m.lora_name
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7, msg=m.lora_name)


def randomize(network, seed: int = 0, std: float = 0.5) -> None:
    """Every factor random (a fresh network's change is zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in network.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def merged_outputs(network, run) -> tuple[torch.Tensor, torch.Tensor]:
    """(output with the network applied, output after kiln's merge_to(multiplier) of every module) of `run()`."""
    network.apply_to()
    network.eval()
    with torch.no_grad():
        applied = run()
    network.restore()
    for m in network.loras:
        m.merge_to(m.multiplier)
    with torch.no_grad():
        merged = run()
    return applied, merged


def make(variant: str, text_encoders, denoiser, multiplier: float = MULTIPLIER, **family_args):
    module, dim, alpha, args = VARIANTS[variant]
    return module.create_network(multiplier, dim, alpha, text_encoders, denoiser, **args, **family_args)


# ---------------------------------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def sd1():
    parts = build_tiny_sd()
    for m in (parts["unet"], parts["text_encoder"]):
        m.eval().requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    parts["inputs"] = (torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 500]), torch.randn(2, 7, 64, generator=g))
    parts["ids"] = torch.randint(0, 512, (2, 7), generator=g)
    return parts


@pytest.fixture(scope="module")
def sdxl():
    """The tiny SDXL U-Net and text encoders of library.tiny_models (without VAE and tokenizers)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from library import tiny_models as tm
    from library.sdxl_models import sdxl_unet_lora_name_map

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**tm.tiny_sdxl_unet_config()).eval().requires_grad_(False)
    te1 = CLIPTextModel(tm.tiny_clip_config(v2=False, hidden_size=tm.TINY_SDXL_TE1_WIDTH)).eval()
    te2 = CLIPTextModelWithProjection(tm.tiny_clip_config(v2=True, hidden_size=tm.TINY_SDXL_TE2_WIDTH)).eval()
    g = torch.Generator().manual_seed(1)
    width = tm.TINY_SDXL_TE1_WIDTH + tm.TINY_SDXL_TE2_WIDTH
    cond = {"text_embeds": torch.randn(1, tm.TINY_SDXL_TE2_WIDTH, generator=g), "time_ids": torch.rand(1, 6, generator=g)}
    inputs = (torch.randn(1, 4, 8, 8, generator=g), torch.tensor([400]), torch.randn(1, 5, width, generator=g))
    return {
        "unet": unet,
        "tes": [te1, te2],
        "options": {"unet_name_map": sdxl_unet_lora_name_map(unet), "te_prefixes": ["lora_te1", "lora_te2"]},
        "run": lambda u: u(*inputs, added_cond_kwargs=cond).sample,
    }


@pytest.fixture(scope="module")
def flux():
    parts = build_tiny_flux(seed=0)
    with torch.no_grad():  # perturb everything: zero-initialised modulations would hide misplaced rows
        g = torch.Generator().manual_seed(5)
        for p in parts["transformer"].parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    parts["transformer"].eval().requires_grad_(False)
    return parts


# ---------------------------------------------------------------------------------------------------------------------
# layout: factorization and every option against lycoris' own modules


def test_factorization_matches_lycoris():
    from lycoris.functional.general import factorization

    for dim in range(1, 300):
        for factor in (-1, 1, 2, 3, 4, 8, 16):
            assert lokr.factorization(dim, factor) == factorization(dim, factor), (dim, factor)
    assert lokr.factorization(3072 * 3) == (96, 96) and lokr.factorization(360, 16) == (15, 24)


def _targets() -> list[nn.Module]:
    return [nn.Linear(32, 96), nn.Linear(64, 64), nn.Conv2d(32, 64, 3), nn.Conv2d(16, 128, 2, 2), nn.Conv2d(32, 32, 1)]


def test_lokr_keys_shapes_and_alpha_match_lycoris_modules_for_every_option():
    from lycoris.modules.lokr import LokrModule

    options = [
        {},
        {"use_tucker": True},
        {"full_matrix": True},
        {"decompose_both": True},
        {"decompose_both": True, "use_tucker": True, "factor": 4},
        {"factor": 8},
        {"factor": 4, "unbalanced_factorization": True},
    ]
    for org in _targets():
        for rank in (1, 2, 4, 100):
            for opts in options:
                ours = lokr.LOKR.with_options(opts)[0].build("x", [org], rank, 2.0, {})
                theirs = LokrModule("x", org, 1.0, rank, 2.0, **opts)
                want = {k: tuple(v.shape) for k, v in theirs.custom_state_dict().items()}
                assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == want, (org, rank, opts)
                assert float(ours.alpha) == float(theirs.alpha), (org, rank, opts)  # full matrices: alpha = rank


def test_loha_keys_and_shapes_match_lycoris_modules():
    from lycoris.modules.loha import LohaModule

    for org in _targets():
        for tucker in (False, True):
            ours = loha.LOHA.with_options({"use_tucker": tucker})[0].build("x", [org], 3, 2.0, {})
            theirs = LohaModule("x", org, 1.0, 3, 2.0, use_tucker=tucker)
            want = {k: tuple(v.shape) for k, v in theirs.state_dict().items() if k != "scalar"}
            assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == want, (org, tucker)


def test_fresh_networks_change_nothing(sd1):
    for variant in VARIANTS:
        net = make(variant, [sd1["text_encoder"]], sd1["unet"], **SD_CONV)
        for m in net.loras:
            assert torch.count_nonzero(m.delta_weight()) == 0, (variant, m.lora_name)


# ---------------------------------------------------------------------------------------------------------------------
# SD 1.x: every variant


Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"  # Linear 32 -> 32
K2 = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"  # Linear 64 -> 32
PROJ = "lora_unet_down_blocks_0_attentions_0_proj_in"  # Conv2d 1x1, 32 -> 32
CONV = "lora_unet_down_blocks_0_resnets_0_conv1"  # Conv2d 3x3, 32 -> 32 (conv_dim)
TE_Q = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"  # Linear 64 -> 64

SD1_SHAPES = {  # hand-written from the LyCORIS layout rules (see the modules' docstrings)
    "loha": {
        Q: {"hada_w1_a": (32, 2), "hada_w1_b": (2, 32), "hada_w2_a": (32, 2), "hada_w2_b": (2, 32), "alpha": ()},
        PROJ: {"hada_w1_a": (32, 2), "hada_w1_b": (2, 32), "hada_w2_a": (32, 2), "hada_w2_b": (2, 32), "alpha": ()},
        CONV: {"hada_w1_a": (32, 2), "hada_w1_b": (2, 288), "hada_w2_a": (32, 2), "hada_w2_b": (2, 288), "alpha": ()},
    },
    "loha_tucker": {
        PROJ: {"hada_w1_a": (32, 2), "hada_w1_b": (2, 32), "hada_w2_a": (32, 2), "hada_w2_b": (2, 32), "alpha": ()},
        CONV: {
            "hada_t1": (2, 2, 3, 3),
            "hada_w1_a": (2, 32),
            "hada_w1_b": (2, 32),
            "hada_t2": (2, 2, 3, 3),
            "hada_w2_a": (2, 32),
            "hada_w2_b": (2, 32),
            "alpha": (),
        },
    },
    "lokr": {
        Q: {"lokr_w1": (4, 4), "lokr_w2_a": (8, 2), "lokr_w2_b": (2, 8), "alpha": ()},
        K2: {"lokr_w1": (4, 8), "lokr_w2_a": (8, 2), "lokr_w2_b": (2, 8), "alpha": ()},
        CONV: {"lokr_w1": (4, 4), "lokr_w2_a": (8, 2), "lokr_w2_b": (2, 72), "alpha": ()},
        TE_Q: {"lokr_w1": (8, 8), "lokr_w2_a": (8, 2), "lokr_w2_b": (2, 8), "alpha": ()},
    },
    "lokr_tucker": {
        PROJ: {"lokr_w1": (4, 4), "lokr_w2_a": (8, 2), "lokr_w2_b": (2, 8), "alpha": ()},
        CONV: {"lokr_w1": (4, 4), "lokr_t2": (2, 2, 3, 3), "lokr_w2_a": (2, 8), "lokr_w2_b": (2, 8), "alpha": ()},
    },
    "lokr_full": {
        Q: {"lokr_w1": (4, 4), "lokr_w2": (8, 8), "alpha": ()},
        PROJ: {"lokr_w1": (4, 4), "lokr_w2": (8, 8, 1, 1), "alpha": ()},
        CONV: {"lokr_w1": (4, 4), "lokr_w2": (8, 8, 3, 3), "alpha": ()},
    },
    "lokr_both": {  # factor 4: 32 = 4 x 8, 64 = 4 x 16; rank 1 < 4 / 2: w1 low-rank too
        Q: {"lokr_w1_a": (4, 1), "lokr_w1_b": (1, 4), "lokr_w2_a": (8, 1), "lokr_w2_b": (1, 8), "alpha": ()},
        TE_Q: {"lokr_w1_a": (4, 1), "lokr_w1_b": (1, 4), "lokr_w2_a": (16, 1), "lokr_w2_b": (1, 16), "alpha": ()},
    },
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_sd1_keys_lycoris_deltas_and_merge(sd1, variant):
    unet, te = copy.deepcopy(sd1["unet"]), copy.deepcopy(sd1["text_encoder"])
    net = make(variant, [te], unet, **SD_CONV)
    state = net.state_dict()
    for name, shapes in SD1_SHAPES[variant].items():
        assert shapes_of(state, name) == shapes, name
    conv_alpha = float(state[CONV + ".alpha"])
    assert conv_alpha == (2.0 if variant == "lokr_full" else 1.5)  # full matrices: alpha = rank (scale 1)
    # the targets and names of a LoRA (LoCon) with the same family arguments
    assert modules_of(state) == sorted(m.lora_name for m in lora.create_network(1.0, 2, 1, [te], unet, **SD_CONV).loras)

    randomize(net, std=0.3 if variant.startswith("loha") else 0.5)
    check_deltas_match_lycoris(net, saved(net))
    base = unet(*sd1["inputs"]).sample
    applied, merged = merged_outputs(net, lambda: torch.cat([unet(*sd1["inputs"]).sample.flatten(), te(sd1["ids"])[0].flatten()]))
    assert (applied[: base.numel()] - base.flatten()).abs().max() > 1e-3
    torch.testing.assert_close(applied, merged, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# SDXL


@pytest.mark.parametrize("variant", ["loha_tucker", "lokr_both"])
def test_sdxl_sgm_names_lycoris_deltas_and_merge(sdxl, variant):
    unet, tes = copy.deepcopy(sdxl["unet"]), copy.deepcopy(sdxl["tes"])
    net = make(variant, tes, unet, **SD_CONV, **sdxl["options"])
    state = net.state_dict()
    names = modules_of(state)
    assert {n.split("_text_model")[0] for n in names if n.startswith("lora_te")} == {"lora_te1", "lora_te2"}
    assert not any(n.startswith(("lora_unet_down_blocks", "lora_unet_up_blocks")) for n in names)  # sgm names only
    q = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"  # Linear 64 -> 64
    conv = "lora_unet_input_blocks_1_0_in_layers_2"  # the first ResBlock's 3x3 conv, 32 -> 32
    if variant == "loha_tucker":
        assert shapes_of(state, q) == {
            "hada_w1_a": (64, 2),
            "hada_w1_b": (2, 64),
            "hada_w2_a": (64, 2),
            "hada_w2_b": (2, 64),
            "alpha": (),
        }
        assert shapes_of(state, conv)["hada_t1"] == (2, 2, 3, 3) and shapes_of(state, conv)["hada_w1_b"] == (2, 32)
    else:  # factor 4: 64 = 4 x 16
        assert shapes_of(state, q) == {
            "lokr_w1_a": (4, 1),
            "lokr_w1_b": (1, 4),
            "lokr_w2_a": (16, 1),
            "lokr_w2_b": (1, 16),
            "alpha": (),
        }
        assert shapes_of(state, conv)["lokr_w2_b"] == (2, 8 * 9)  # conv_dim 2, not Tucker: the kernel flattened in

    randomize(net, std=0.3 if variant.startswith("loha") else 0.5)
    check_deltas_match_lycoris(net, saved(net))
    net.apply_to(False, True)  # the U-Net's output (the text encoders' adapters are dropped here)
    applied, merged = merged_outputs(net, lambda: sdxl["run"](unet))
    torch.testing.assert_close(applied, merged, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# FLUX: fused qkv / linear1 adapters, checked against the BFL checkpoint with the lycoris change added


@pytest.mark.parametrize("variant", ["loha", "lokr", "lokr_full"])
def test_flux_fused_adapters_equal_lycoris_change_in_bfl_weights(flux, variant):
    from test_lora_flux import _inputs

    from library.flux_models import flux_transformer_from_bfl, flux_transformer_to_bfl

    transformer = copy.deepcopy(flux["transformer"])
    config = transformer.config
    base_bfl = flux_transformer_to_bfl(transformer.state_dict(), config)
    net = make(variant, [flux["text_encoder"]], transformer)
    state = net.state_dict()
    qkv, linear1 = "lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_single_blocks_0_linear1"  # 96 x 32, 224 x 32
    assert any(n.startswith("lora_te1_text_model_") for n in modules_of(state))
    expected = {
        "loha": {qkv: {"hada_w1_a": (96, 2), "hada_w1_b": (2, 32), "hada_w2_a": (96, 2), "hada_w2_b": (2, 32), "alpha": ()}},
        "lokr": {
            qkv: {"lokr_w1": (8, 4), "lokr_w2_a": (12, 2), "lokr_w2_b": (2, 8), "alpha": ()},
            linear1: {"lokr_w1": (14, 4), "lokr_w2_a": (16, 2), "lokr_w2_b": (2, 8), "alpha": ()},
        },
        "lokr_full": {qkv: {"lokr_w1": (8, 4), "lokr_w2": (12, 8), "alpha": ()}},
    }[variant]
    for name, shapes in expected.items():
        assert shapes_of(state, name) == shapes, name

    randomize(net, std=0.3 if variant.startswith("loha") else 0.5)
    file = saved(net)
    check_deltas_match_lycoris(net, file)
    inputs = _inputs(config)
    net.apply_to(False, True)
    net.eval()
    with torch.no_grad():
        applied = transformer(**inputs)[0]
    net.restore()

    # ComfyUI's way: lora_unet_X adds its change to the BFL weight X.weight (fused qkv rows as the file has them)
    index = {"lora_unet_" + k[: -len(".weight")].replace(".", "_"): k for k in base_bfl if k.endswith(".weight")}
    bfl = dict(base_bfl)
    unet_modules = [n for n in modules_of(file) if n.startswith("lora_unet_")]
    assert qkv in unet_modules and linear1 in unet_modules
    for name in unet_modules:
        w = bfl[index[name]]
        bfl[index[name]] = (w.double() + lycoris_delta(file, name).reshape(w.shape) * MULTIPLIER).to(w.dtype)
    reference = copy.deepcopy(flux["transformer"])
    reference.load_state_dict(flux_transformer_from_bfl(bfl, config))
    with torch.no_grad():
        torch.testing.assert_close(applied, reference(**inputs)[0], rtol=1e-4, atol=1e-5)
        for m in net.unet_loras:  # and kiln's own merge
            m.merge_to(MULTIPLIER)
        torch.testing.assert_close(transformer(**inputs)[0], applied, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# SD3: fused qkv, SAI's (shift, scale) row order, the patch embedder's 2x2 conv (Tucker), against the SAI checkpoint


@pytest.mark.parametrize("variant", ["loha_tucker", "lokr_tucker"])
def test_sd3_adapters_equal_lycoris_change_in_sai_weights(variant):
    from test_lora_sd3 import _base_state, _inputs, _sai_index, _transformer

    from library.sd3_models import sd3_transformer_from_sai, sd3_transformer_to_sai

    name_variant = "sd3.5-medium"  # MMDiT-X attn2 and the pre-only last context block
    transformer = _transformer(name_variant)
    net = make(variant, [], transformer, emb_dims="[2,2,2,2,2,2]")
    state = net.state_dict()
    mod = "lora_unet_joint_blocks_2_context_block_adaLN_modulation_1"  # 256 x 128, SAI (shift, scale) rows
    ordered = {m.lora_name for m in net.loras if m.row_order is not None}
    assert mod in ordered and "lora_unet_final_layer_adaLN_modulation_1" in ordered
    embed = "lora_unet_x_embedder_proj"  # Conv2d 16 -> 128, 2x2
    if variant == "loha_tucker":
        assert shapes_of(state, embed)["hada_t1"] == (2, 2, 2, 2) and shapes_of(state, embed)["hada_w1_a"] == (2, 128)
        assert shapes_of(state, mod)["hada_w1_a"] == (256, 2)
    else:  # 128 = 8 x 16, 16 = 4 x 4, 256 = 16 x 16, 384 = 16 x 24
        assert shapes_of(state, embed) == {
            "lokr_w1": (8, 4),
            "lokr_t2": (2, 2, 2, 2),
            "lokr_w2_a": (2, 16),
            "lokr_w2_b": (2, 4),
            "alpha": (),
        }
        assert shapes_of(state, mod) == {"lokr_w1": (16, 8), "lokr_w2_a": (16, 2), "lokr_w2_b": (2, 16), "alpha": ()}
        assert shapes_of(state, "lora_unet_joint_blocks_0_x_block_attn2_qkv")["lokr_w1"] == (16, 8)

    randomize(net, std=0.3 if variant.startswith("loha") else 0.5)
    file = saved(net)
    check_deltas_match_lycoris(net, file)
    inputs = _inputs(name_variant)
    net.apply_to()
    net.eval()
    with torch.no_grad():
        applied = transformer(**inputs)[0]
    net.restore()

    sai = sd3_transformer_to_sai(_base_state(name_variant))
    index = _sai_index(sai)
    for name in modules_of(file):
        w = sai[index[name]]
        sai[index[name]] = (w.double() + lycoris_delta(file, name).reshape(w.shape) * MULTIPLIER).to(w.dtype)
    reference = _transformer(name_variant, sd3_transformer_from_sai(sai, strict=True))
    with torch.no_grad():
        torch.testing.assert_close(applied, reference(**inputs)[0], rtol=1e-4, atol=1e-5)
        for m in net.loras:
            m.merge_to(MULTIPLIER)
        torch.testing.assert_close(transformer(**inputs)[0], applied, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# training, save / load, LoRA+, max-norm, dropouts


@pytest.mark.parametrize("variant", ["loha_tucker", "lokr_tucker", "lokr_both"])
def test_training_moves_every_factor_and_files_round_trip(sd1, variant, tmp_path):
    module, dim, alpha, args = VARIANTS[variant]
    unet = copy.deepcopy(sd1["unet"])
    net = make(variant, [sd1["text_encoder"]], unet, multiplier=1.0, **SD_CONV)
    net.apply_to(False, True)
    net.train()
    start = {k: v.clone() for k, v in net.state_dict().items()}
    groups, _ = net.param_groups(None, None, 1e-2)
    optimizer = torch.optim.Adam(groups)
    for _ in range(3):
        loss = unet(*sd1["inputs"]).sample.square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = net.state_dict()
    # the first level's resnets have one channel per GroupNorm group: the norm after time_emb_proj removes its output
    blind = {m.lora_name for m in net.loras if m.lora_name.endswith("time_emb_proj") and m.org_module.out_features == 32}
    for key, value in after.items():
        if not key.endswith(".alpha") and key.split(".")[0] not in blind:
            assert not torch.equal(value, start[key]), key  # every factor learned (the zero-initialised ones first)
    net.eval()
    with torch.no_grad():
        trained_out = unet(*sd1["inputs"]).sample
    net.restore()

    path = str(tmp_path / "a.safetensors")
    save_file({k: v.contiguous() for k, v in after.items()}, path)
    file = load_file(path)
    # --network_weights: the same arguments, loaded exactly
    again = module.create_network(1.0, dim, alpha, [sd1["text_encoder"]], copy.deepcopy(sd1["unet"]), **args, **SD_CONV)
    again.apply_to(False, True)
    assert again.load_weights(file) == []
    assert all(torch.equal(v, file[k]) for k, v in again.state_dict().items())
    # --dim_from_weights: the file's layout and alphas, without and with the (agreeing) type arguments
    for type_args in ({}, args):
        base = copy.deepcopy(sd1["unet"])
        rebuilt = module.create_network_from_weights(1.0, file, [sd1["text_encoder"]], base, **type_args)
        assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in file.items()}
        assert rebuilt.load_weights(file) == []
        rebuilt.apply_to(False, True)
        rebuilt.eval()
        with torch.no_grad():
            torch.testing.assert_close(base(*sd1["inputs"]).sample, trained_out, rtol=0, atol=0)
        assert {m.lora_name: m.scale for m in rebuilt.loras} == {m.lora_name: m.scale for m in again.loras}


def test_from_weights_refuses_type_args_that_disagree_with_the_file(sd1):
    net = make("lokr_tucker", [sd1["text_encoder"]], sd1["unet"], **SD_CONV)
    file = saved(net)
    with pytest.raises(ValueError, match=r"network_args use_tucker ask for .*lokr_w2_a @ lokr_w2_b.*holds .*Tucker"):
        lokr.create_network_from_weights(1.0, file, [sd1["text_encoder"]], sd1["unet"], use_tucker="False")
    with pytest.raises(ValueError, match=r"network_args factor ask for lokr_w1 4x4.*holds lokr_w1 8x8"):
        lokr.create_network_from_weights(1.0, file, [sd1["text_encoder"]], sd1["unet"], factor="4")
    file = saved(make("loha", [sd1["text_encoder"]], sd1["unet"], **SD_CONV))
    with pytest.raises(ValueError, match="use_tucker ask for a Tucker LoHa, but the file holds a LoHa without Tucker"):
        loha.create_network_from_weights(1.0, file, [sd1["text_encoder"]], sd1["unet"], use_tucker="True")
    with pytest.raises(ValueError, match="no LoKr modules"):
        lokr.create_network_from_weights(1.0, file, [sd1["text_encoder"]], sd1["unet"])


def test_loraplus_boosts_loha_output_factors_and_is_refused_for_lokr(sd1):
    net = make("loha_tucker", [sd1["text_encoder"]], sd1["unet"], loraplus_lr_ratio="4", **SD_CONV)
    groups, names = net.param_groups(None, None, 1e-3)
    assert names == ["textencoder", "textencoder_plus", "unet", "unet_plus"]
    boosted = {id(p) for g in groups if g["lr"] == 4e-3 for p in g["params"]}
    for m in net.loras:
        for n, p in m.named_parameters():
            assert (id(p) in boosted) == (n in ("hada_w1_a", "hada_w2_a")), (m.lora_name, n)
    with pytest.raises(ValueError, match="LoRA\\+ does not apply to LoKr"):
        make("lokr", [sd1["text_encoder"]], sd1["unet"], loraplus_unet_lr_ratio="4")


@pytest.mark.parametrize("variant", ["loha_tucker", "lokr_tucker", "lokr_both", "lokr_full"])
def test_max_norm_scales_each_change_to_the_limit(sd1, variant):
    net = make(variant, [sd1["text_encoder"]], sd1["unet"], **SD_CONV)
    randomize(net, std=0.3)
    norms = torch.stack([m.delta_weight().detach().norm() for m in net.loras])
    middle = norms.sort().values[len(norms) // 2 - 1 : len(norms) // 2 + 1]
    limit = float(middle.mean())  # half of the modules above it, none at it
    scaled, _, top = net.apply_max_norm(limit)
    assert scaled == int((norms > limit).sum()) and top == pytest.approx(limit)
    after = torch.stack([m.delta_weight().detach().norm() for m in net.loras])
    torch.testing.assert_close(after, norms.clamp(max=limit), rtol=1e-4, atol=0)


def test_dropouts_reach_the_modules(sd1):
    net = make("lokr", [sd1["text_encoder"]], copy.deepcopy(sd1["unet"]), multiplier=1.0, neuron_dropout=0.1,
               rank_dropout="0.2", module_dropout="1.0")  # fmt: skip
    assert all((m.dropout, m.rank_dropout, m.module_dropout) == (0.1, 0.2, 1.0) for m in net.loras)
    randomize(net)
    linear = next(m.org_module for m in net.unet_loras if isinstance(m.org_module, nn.Linear))
    x = torch.randn(3, linear.in_features)
    net.apply_to()
    net.train()  # module dropout 1: every adapter skipped
    torch.testing.assert_close(linear(x), torch.nn.functional.linear(x, linear.weight, linear.bias))
    net.eval()  # no dropout: the adapter acts
    assert (linear(x) - torch.nn.functional.linear(x, linear.weight, linear.bias)).abs().max() > 1e-3
    net.restore()


# ---------------------------------------------------------------------------------------------------------------------
# refused arguments


def test_bad_arguments_are_errors(sd1, flux):
    te, unet, transformer = [sd1["text_encoder"]], sd1["unet"], flux["transformer"]
    with pytest.raises(ValueError, match="unknown --network_args for networks.loha: algo"):
        loha.create_network(1.0, 2, 1, te, unet, algo="loha")
    with pytest.raises(ValueError, match="use_tucker must be True or False"):
        loha.create_network(1.0, 2, 1, te, unet, use_tucker="maybe", conv_dim="2")
    with pytest.raises(ValueError, match="factor must be -1 .* or at least 1, got 0"):
        lokr.create_network(1.0, 2, 1, te, unet, factor="0")
    with pytest.raises(ValueError, match="factor must be an integer"):
        lokr.create_network(1.0, 2, 1, te, unet, factor="big")
    with pytest.raises(ValueError, match="decompose_both and full_matrix exclude each other"):
        lokr.create_network(1.0, 2, 1, te, unet, decompose_both="True", full_matrix="True")
    for module in (loha, lokr):  # Tucker with nothing larger than 1x1 to act on
        with pytest.raises(ValueError, match="use_tucker .* adapts none .*conv_dim"):
            module.create_network(1.0, 2, 1, te, unet, use_tucker="True")
        with pytest.raises(ValueError, match="use_tucker .* adapts none"):
            module.create_network(1.0, 2, 1, [], transformer, use_tucker="True")
    with pytest.raises(ValueError, match="split_qkv: only LoRA splits fused layers; LoHa"):
        loha.create_network(1.0, 2, 1, [], transformer, split_qkv="True")
    with pytest.raises(ValueError, match="conv_dim/conv_alpha are not supported for FLUX"):
        lokr.create_network(1.0, 2, 1, [], transformer, conv_dim="2")
    with pytest.raises(ValueError, match="unknown network_args for networks.lokr: train_blocks_typo"):
        lokr.create_network(1.0, 2, 1, [], transformer, train_blocks_typo="single")
    lora_file = {"lora_unet_x.lora_down.weight": torch.zeros(2, 4), "lora_unet_x.lora_up.weight": torch.zeros(4, 2)}
    with pytest.raises(ValueError, match="no LoHa modules"):
        loha.create_network_from_weights(1.0, lora_file, te, unet)


# ---------------------------------------------------------------------------------------------------------------------
# end to end: train_network.py --network_module networks.lokr


@pytest.mark.slow
def test_train_network_lokr_end_to_end(tiny_sd, sd1, tmp_path):
    from library.method_adapter import build_network

    for i, color in enumerate([(200, 30, 30), (30, 30, 200)]):
        write_caption(write_image(tmp_path / "img" / f"{i}.png", (64, 64), color), f"tiny thing {i}")
    config = tmp_path / "data.toml"
    config.write_text(f"[general]\ncaption_extension = '.txt'\n[[datasets]]\nresolution = 64\nbatch_size = 2\n"
                      f"  [[datasets.subsets]]\n  image_dir = '{tmp_path / 'img'}'\n")  # fmt: skip
    network_args = ["conv_dim=2", "conv_alpha=1", "use_tucker=True", "factor=4"]
    launch_script(
        "train_network.py", "--pretrained_model_name_or_path", tiny_sd, "--dataset_config", config, "--output_dir",
        tmp_path / "out", "--output_name", "k", "--max_train_steps", 2, "--network_module", "networks.lokr",
        "--network_dim", 2, "--network_alpha", 1, "--network_args", *network_args, "--learning_rate", "1e-2",
        "--max_data_loader_n_workers", 0, "--seed", 3,
    )  # fmt: skip
    path = str(tmp_path / "out" / "k.safetensors")
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        metadata = f.metadata()
    assert metadata["ss_network_module"] == "networks.lokr"
    file = load_file(path)
    assert shapes_of(file, CONV) == {
        "lokr_w1": (4, 4),
        "lokr_t2": (2, 2, 3, 3),
        "lokr_w2_a": (2, 8),
        "lokr_w2_b": (2, 8),
        "alpha": (),
    }
    assert shapes_of(file, TE_Q) == {"lokr_w1": (4, 4), "lokr_w2_a": (16, 2), "lokr_w2_b": (2, 16), "alpha": ()}
    assert all(file[k].abs().max() > 0 for k in file if k.endswith("lokr_w2_b"))  # trained away from their zero start

    models = types.SimpleNamespace(text_encoders=[sd1["text_encoder"]], denoiser=copy.deepcopy(sd1["unet"]))
    family = types.SimpleNamespace(lora_options=lambda models: {})
    for dim_from_weights in (False, True):  # --network_weights resume, with and without --dim_from_weights
        args = types.SimpleNamespace(
            network_module="networks.lokr", network_args=network_args, dim_from_weights=dim_from_weights,
            network_weights=path, network_dim=2, network_alpha=1.0, network_dropout=None,
        )  # fmt: skip
        network = build_network(args, family, models, True, True)
        assert network.state_dict().keys() == file.keys()
        assert all(torch.equal(v, file[k]) for k, v in network.state_dict().items())
        network.restore()


# ---------------------------------------------------------------------------------------------------------------------
# tools/merge_lora.py: LoHa / LoKr files merged into model files at their --ratios value


@pytest.mark.parametrize("variant", ["loha_tucker", "lokr_both"])
def test_merge_tool_into_sd_single_file_adds_the_lycoris_change(sd1, variant, tmp_path):
    """Every adapted weight of the merged SD single file is W + ratio x the lycoris change of the file's module (the
    text encoder's and the 3x3 convs' included); every other tensor is bit-identical."""
    from library.ldm_names import text_encoder_ldm_param_names, unet_ldm_module_names
    from library.sd_models import sd_to_ldm_state_dict
    from tools.merge_lora import main

    unet, te = sd1["unet"], sd1["text_encoder"]
    state = {k: v.detach().clone().contiguous() for k, v in sd_to_ldm_state_dict(te, sd1["vae"], unet, False).items()}
    save_file(state, str(tmp_path / "sd.safetensors"))
    net = make(variant, [te], unet, **SD_CONV)
    randomize(net, std=0.3)
    file = saved(net)
    save_file(file, str(tmp_path / "a.safetensors"))
    argv = ["--sd_model", tmp_path / "sd.safetensors", "--models", tmp_path / "a.safetensors", "--ratios", "0.4"]
    assert main([str(a) for a in argv + ["--save_to", tmp_path / "m.safetensors"]]) == 0
    merged = load_file(str(tmp_path / "m.safetensors"))
    ldm, te_names = unet_ldm_module_names(unet), text_encoder_ldm_param_names(te)
    changed = set()
    for m in net.loras:
        path = next(n for n, mod in (unet if "_unet_" in m.lora_name else te).named_modules() if mod is m.org_module)
        if "_unet_" in m.lora_name:
            key = f"model.diffusion_model.{ldm[path]}.weight"
        else:
            key = "cond_stage_model.transformer." + te_names[path + ".weight"]
        expected = state[key].double() + lycoris_delta(file, m.lora_name).reshape(state[key].shape) * 0.4
        torch.testing.assert_close(merged[key].double(), expected, rtol=1e-5, atol=1e-6, msg=key)
        changed.add(key)
    assert len(changed) == len(net.loras) and all(torch.equal(merged[k], v) for k, v in state.items() if k not in changed)
