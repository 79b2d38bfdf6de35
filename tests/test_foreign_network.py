"""Third-party network modules (sd-scripts' --network_module interface) under kiln's trainer: LyCORIS' lycoris.kohya.

One train_network.py launch (LoKr on the tiny SD 1.x, started from --network_weights, text-encoder rate 0), checked
several ways: LyCORIS keys under sd-scripts' names (those of kiln's own SD LoRA with conv layers), metadata, the
loaded file's values, training moved the U-Net weights. In process: the wrapper against the module's own
save_weights and load_weights, optimizer groups, multiplier, max-norm, --dim_from_weights, SDXL's sgm names, and
the errors (a failing module, FLUX/SD3 refused, files that do not fit).
"""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import pytest
import torch
from conftest import launch_script, write_caption, write_image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

pytest.importorskip("lycoris")

LOKR_TENSORS = {"lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_t2", "alpha"}
# the blocks sd-scripts' LoRA with conv_dim adapts (LyCORIS' "full" preset without the time embedding and conv_in /
# conv_out names, whose TimestepEmbedding match makes lycoris-lora 4.1.3 build one adapter twice: see
# test_module_errors_name_the_module)
PRESET = """
enable_conv = true
unet_target_module = ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"]
unet_target_name = []
text_encoder_target_module = ["CLIPAttention", "CLIPMLP"]
text_encoder_target_name = []
"""
LR, STEPS = 1e-3, 2


def net_args(**overrides) -> SimpleNamespace:
    """The network flags build_network reads, as the parser gives them."""
    values = {
        "network_module": "lycoris.kohya",
        "network_args": ["algo=lokr", "preset=attn-mlp"],
        "network_dim": 4,
        "network_alpha": 2.0,
        "network_dropout": None,
        "network_weights": None,
        "dim_from_weights": False,
        "gradient_checkpointing": False,
        "scale_weight_norms": None,
        "text_encoder_lr": None,
        "unet_lr": None,
        "learning_rate": LR,
    }
    return SimpleNamespace(**{**values, **overrides})


def sd_models():
    """Fresh tiny SD 1.x models (a network patches their forwards, so each test gets its own)."""
    from library.family import TrainModels
    from library.tiny_models import build_tiny_sd

    m = build_tiny_sd()
    return TrainModels([m["text_encoder"]], [m["tokenizer"]], m["vae"], m["unet"])


def sdxl_models():
    from library.family import TrainModels
    from library.tiny_models import build_tiny_sdxl

    m = build_tiny_sdxl()
    return TrainModels([m["text_encoder"], m["text_encoder_2"]], [m["tokenizer"], m["tokenizer_2"]], m["vae"], m["unet"])


def build(models, family=None, train_te: bool = True, train_unet: bool = True, **overrides):
    from library.family_sd import SdFamily
    from library.method_adapter import build_network

    return build_network(net_args(**overrides), family or SdFamily(), models, train_te, train_unet)


def kiln_lora_names(models, family) -> set[str]:
    """Adapter names of kiln's own LoRA with conv layers on these models (sd-scripts' names, checked elsewhere
    against diffusers' loader)."""
    from networks.lora import create_network

    network = create_network(1.0, 4, 1.0, models.text_encoders, models.denoiser, conv_dim=2, **family.lora_options(models))
    return {k.split(".", 1)[0] for k in network.state_dict()}


def modules_of(keys) -> set[str]:
    return {k.split(".", 1)[0] for k in keys}


def unet_output(models, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, 32, 32, generator=g)
    context = torch.randn(1, 77, models.denoiser.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        return models.denoiser(x, torch.tensor([10]), context).sample


def write_dataset(root, count: int = 1) -> str:
    """`count` 64 px images with captions and a dataset config for them (batch size 1); returns the config's path."""
    for i, color in enumerate([(200, 30, 30), (30, 200, 30)][:count]):
        write_caption(write_image(root / "img" / f"{i}.png", (64, 64), color), f"thing {i}")
    config = root / "data.toml"
    config.write_text(
        f"[general]\ncaption_extension = '.txt'\nresolution = 64\nbatch_size = 1\n"
        f"[[datasets]]\n  [[datasets.subsets]]\n  image_dir = '{root / 'img'}'\n"
    )
    return str(config)


def randomize(network, scale: float = 0.05, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in network.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


# ---------------------------------------------------------------------------------------------------------------------
# End to end: one launch


@pytest.fixture(scope="module")
def run(tiny_sd, tmp_path_factory):
    """train_network.py with lycoris.kohya LoKr (conv and linear layers), from a --network_weights file of random
    values, text-encoder rate 0, a checkpoint after each of 2 steps."""
    from library.family_sd import SdFamily

    root = tmp_path_factory.mktemp("foreign")
    config = write_dataset(root, 2)
    preset = root / "preset.toml"
    preset.write_text(PRESET)
    network_args = ["algo=lokr", f"preset={preset}", "factor=4"]

    models = sd_models()  # the architecture of tiny_sd: the start file is made in process
    start = build(models, network_args=network_args)
    randomize(start)
    init = root / "init.safetensors"
    save_file({k: v.contiguous() for k, v in start.state_dict().items()}, str(init))
    out = root / "out"
    launch_script(
        "train_network.py",
        *("--pretrained_model_name_or_path", tiny_sd, "--dataset_config", config, "--output_dir", out),
        *("--output_name", "lokr", "--network_module", "lycoris.kohya", "--network_dim", 4, "--network_alpha", 2),
        *("--network_args", *network_args, "--network_weights", init, "--optimizer_type", "AdamW"),
        *("--learning_rate", LR, "--text_encoder_lr", 0, "--max_train_steps", STEPS, "--save_every_n_steps", 1),
        *("--gradient_checkpointing", "--max_data_loader_n_workers", 0, "--seed", 7),
    )
    return {
        "init": str(init),
        "step1": str(out / "lokr-step00000001.safetensors"),
        "final": str(out / "lokr.safetensors"),
        "expected_names": kiln_lora_names(sd_models(), SdFamily()),
    }


def test_file_holds_lokr_tensors_under_sd_scripts_names(run):
    keys = load_file(run["final"]).keys()
    assert {k.split(".", 1)[1] for k in keys} <= LOKR_TENSORS
    assert any(k.endswith((".lokr_w1", ".lokr_w1_a")) for k in keys) and any(k.endswith((".lokr_w2", ".lokr_w2_a")) for k in keys)
    assert modules_of(keys) == run["expected_names"]  # every attention, MLP and resnet/sampler conv, as sd-scripts names them
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in modules_of(keys)
    assert "lora_unet_down_blocks_0_resnets_0_conv1" in modules_of(keys)


def test_metadata_names_the_module_and_its_args(run):
    with safe_open(run["final"], framework="pt") as f:
        md = f.metadata()
    assert md["ss_network_module"] == "lycoris.kohya" and md["ss_network_dim"] == "4" and md["ss_network_alpha"] == "2.0"
    assert json.loads(md["ss_network_args"])["algo"] == "lokr"
    assert md["ss_steps"] == str(STEPS) and md["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert md["sshs_model_hash"]


def test_network_weights_are_loaded_and_training_moves_the_unet_part(run):
    """Text-encoder tensors (rate 0) equal the start file's; U-Net tensors moved from it by at most the Adam steps
    (a network not loaded from the file would be ~0.05 away), and between the two checkpoints."""
    init, step1, final = load_file(run["init"]), load_file(run["step1"]), load_file(run["final"])
    assert final.keys() == init.keys()
    for key in init:
        if key.startswith("lora_te_"):
            assert torch.equal(final[key], init[key]), key
    unet = [k for k in init if k.startswith("lora_unet_") and not k.endswith(".alpha")]
    moved = max((final[k] - init[k]).abs().max().item() for k in unet)
    assert 0 < moved <= 1.5 * STEPS * LR
    assert any(not torch.equal(final[k], step1[k]) for k in unet)


# ---------------------------------------------------------------------------------------------------------------------
# In process: the wrapper


def test_keys_and_values_equal_the_module_own_save_weights(tmp_path):
    network = build(sd_models())
    randomize(network)
    path = str(tmp_path / "own.safetensors")
    network.net.save_weights(path, None, {})
    own = load_file(path)
    ours = network.state_dict()
    assert own.keys() == ours.keys()
    assert all(torch.equal(own[k], ours[k]) for k in own)
    assert dict(network.named_parameters()).keys() <= ours.keys()  # optimizer copies match state keys


def test_load_weights_round_trip_and_mismatches(tmp_path):
    source = build(sd_models())
    randomize(source, seed=1)
    weights = {k: v.clone() for k, v in source.state_dict().items()}
    target = build(sd_models())
    assert target.load_weights({**weights, "lora_unet_nothing.lokr_w1": torch.zeros(1)}, "f") == ["lora_unet_nothing.lokr_w1"]
    assert all(torch.equal(target.state_dict()[k], v) for k, v in weights.items())
    key = next(k for k in weights if k.endswith(".lokr_w1"))
    with pytest.raises(ValueError, match=f"{key} has shape .*--dim_from_weights"):
        target.load_weights({**weights, key: torch.zeros(3, 3)}, "f")
    with pytest.raises(ValueError, match="no weights for 1 of the .* tensors"):
        target.load_weights({k: v for k, v in weights.items() if k != key}, "f")


def test_dim_from_weights_shapes_the_network_like_the_file(tmp_path):
    source = build(sd_models(), network_dim=8, network_args=["algo=lokr", "preset=attn-mlp", "factor=2"])
    randomize(source, seed=2)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    network = build(sd_models(), network_args=[], network_weights=str(path), dim_from_weights=True)
    assert all(torch.equal(network.state_dict()[k], v) for k, v in load_file(str(path)).items())


def test_optimizer_groups_multiplier_and_max_norm():
    models = sd_models()
    network = build(models, network_args=["algo=lora", "preset=attn-mlp", "loraplus_unet_lr_ratio=4"])  # LoRA+: lora_up
    groups, names = network.param_groups([5e-4], None, LR)
    assert names == ["textencoder", "unet", "unet plus"]
    assert [g["lr"] for g in groups] == [5e-4, LR, 4 * LR]
    assert sum(len(g["params"]) for g in groups) == len(list(network.parameters()))
    groups, names = network.param_groups(0, 2e-3, LR)  # a rate of 0 leaves the group out
    assert names == ["unet", "unet plus"] and groups[0]["lr"] == 2e-3
    with pytest.raises(ValueError, match="--text_encoder_lr gives 2 rates"):
        network.param_groups([1e-4, 2e-4], None, LR)

    base = unet_output(models)
    randomize(network)
    assert not torch.allclose(unet_output(models), base)
    network.set_multiplier(0.0)
    assert network.multiplier == 0.0 and torch.equal(unet_output(models), base)
    network.set_multiplier(1.0)

    scaled, mean_norm, top = network.apply_max_norm(1e-3)
    assert isinstance(scaled, int) and scaled > 0 and isinstance(mean_norm, float) and top == pytest.approx(1e-3, rel=1e-3)


def test_unet_only_leaves_the_text_encoder_alone():
    network = build(sd_models(), train_te=False)
    assert all(k.startswith("lora_unet_") for k in network.state_dict())


def test_sdxl_files_use_sgm_names_and_load_back():
    from library.family_sdxl import SdxlFamily

    family = SdxlFamily()
    network = build(sdxl_models(), family, network_args=["algo=lokr", "preset=attn-mlp"])
    names = modules_of(network.state_dict())
    expected = kiln_lora_names(sdxl_models(), family)
    # LyCORIS' presets list the class TimestepEmbedding, which diffusers' time and added embeddings are and sd-scripts'
    # SDXL U-Net (nn.Sequential there) is not: those four adapters are extra, under their sgm names
    extra = {"lora_unet_time_embed_0", "lora_unet_time_embed_2", "lora_unet_label_emb_0_0", "lora_unet_label_emb_0_2"}
    assert names - expected == extra
    assert any(n.startswith("lora_unet_input_blocks_4_1_transformer_blocks_0") for n in names)
    assert any(n.startswith("lora_te1_text_model_encoder_") for n in names)
    assert any(n.startswith("lora_te2_text_model_encoder_") for n in names)
    assert not any(n.startswith("lora_unet_down_blocks") for n in names)
    randomize(network, seed=3)
    weights = {k: v.clone() for k, v in network.state_dict().items()}
    other = build(sdxl_models(), family, network_args=["algo=lokr", "preset=attn-mlp"])
    assert other.load_weights(weights, "sdxl file") == []
    assert all(torch.equal(other.state_dict()[k], v) for k, v in weights.items())


# ---------------------------------------------------------------------------------------------------------------------
# Errors


def test_module_errors_name_the_module():
    with pytest.raises(ValueError, match=r"lycoris\.kohya: create_network\(\) failed \(KeyError: 'nosuch'"):
        build(sd_models(), network_args=["algo=nosuch"])
    # lycoris-lora 4.1.3's default preset adapts the U-Net's time embedding twice (class TimestepEmbedding and the
    # names time_embedding.linear_N): on sd-scripts' own SD U-Net too
    with pytest.raises(ValueError, match=r"create_network\(\) failed \(AssertionError: duplicated lora name.*kohya\.py"):
        build(sd_models(), network_args=["algo=lokr"])
    with pytest.raises(ValueError, match="adapted nothing"):
        build(sd_models(), train_te=False, network_args=["algo=lokr", "preset=attn-only"])  # no CrossAttention class here


def run_script(argv: list, capsys, family) -> str:
    """A training run in this process that must stop with exit status 1 and one `error:` line; returns stderr."""
    from library.train_script import run_network_training

    quiet, logging.raiseExceptions = logging.raiseExceptions, False
    try:
        with pytest.raises(SystemExit) as e:
            run_network_training(family, "test", [str(a) for a in argv])
    finally:
        logging.raiseExceptions = quiet
    err = capsys.readouterr().err
    assert e.value.code == 1 and len([x for x in err.splitlines() if x.startswith("error:")]) == 1, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    return err


def test_a_bad_network_arg_stops_the_run_with_one_line(tmp_path, capsys):
    from library.family_sd import SdFamily

    config = write_dataset(tmp_path)
    argv = [
        *("--pretrained_model_name_or_path", "kiln-tiny-sd", "--dataset_config", config),
        *("--output_dir", tmp_path / "out", "--network_module", "lycoris.kohya", "--network_args", "algo=lokr"),
        *("preset=attn-mlp", "factor=x", "--max_train_steps", 1, "--max_data_loader_n_workers", 0),
    ]
    err = run_script(argv, capsys, SdFamily())
    assert "--network_module lycoris.kohya: create_network() failed (ValueError: invalid literal for int()" in err


@pytest.mark.parametrize("family_name,own", [("flux", "networks.lora_flux"), ("sd3", "networks.lora_sd3")])
def test_flux_and_sd3_refuse_third_party_modules_before_loading(family_name, own, tmp_path, capsys):
    from library.family_flux import FluxFamily
    from library.family_sd3 import Sd3Family

    family = FluxFamily() if family_name == "flux" else Sd3Family()
    argv = [
        *("--pretrained_model_name_or_path", tmp_path / "missing.safetensors", "--output_dir", tmp_path / "out"),
        *("--train_data_dir", tmp_path, "--network_module", "lycoris.kohya", "--network_args", "algo=lokr"),
    ]
    err = run_script(argv, capsys, family)
    assert "lycoris.kohya is a third-party network module" in err and "SD 1.x/2.x and SDXL only" in err and own in err


def test_sdxl_trains_in_process(tmp_path):
    """sdxl_train_network.py's code path (two text encoders given as a list) in this process: the file has sgm U-Net
    names and lora_te1_/lora_te2_ keys, and training moved the weights."""
    from library.family_sdxl import SdxlFamily
    from library.train_script import run_network_training

    config = write_dataset(tmp_path)
    argv = [
        *("--pretrained_model_name_or_path", "kiln-tiny-sdxl", "--dataset_config", config, "--output_dir", tmp_path),
        *("--output_name", "x", "--network_module", "lycoris.kohya", "--network_args", "algo=lokr", "preset=attn-mlp"),
        *("--max_train_steps", 1, "--max_data_loader_n_workers", 0, "--seed", 1),
    ]
    run_network_training(SdxlFamily(), "test", [str(a) for a in argv])
    weights = load_file(str(tmp_path / "x.safetensors"))
    names = modules_of(weights)
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in names
    assert any(n.startswith("lora_te1_text_model_") for n in names) and any(n.startswith("lora_te2_text_model_") for n in names)
    assert any(k.endswith(".lokr_w2") and weights[k].abs().max() > 0 for k in weights)  # starts at zero
