"""Broken inputs give one `error:` line naming the file or flag and what to do, and a non-zero exit, before any model
loads where possible: truncated or corrupt images, model files, --resume states; an unusable --output_dir; learning
rates that train nothing; a --network_weights file of another model family; the cache tools' --help."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import write_caption
from safetensors.torch import save_file

# ---------------------------------------------------------------------------------------------------------------------
# Helpers


def dataset(root, count: int = 2) -> str:
    """`count` 64 px images with noise (so that a cut file is missing pixel data) and captions; returns the config."""
    import numpy as np
    from PIL import Image

    folder = root / "img"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        pixels = np.random.default_rng(i).integers(0, 256, (64, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png")
        write_caption(folder / f"{i}.png", f"thing {i}")
    config = root / "data.toml"
    config.write_text(f"[general]\ncaption_extension = '.txt'\nresolution = 64\nbatch_size = 1\n"
                      f"[[datasets]]\n  [[datasets.subsets]]\n  image_dir = '{folder}'\n")
    return str(config)


def cut(path, keep: float = 0.5) -> str:
    """Truncate a file to `keep` of its length (a download or copy that stopped)."""
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: int(len(data) * keep)])
    return str(path)


def run_training(argv, capsys, family=None) -> str:
    """Run a LoRA training in this process; it must stop with exit status 1 and exactly one `error:` line (and no
    traceback). Returns that line."""
    import logging

    from library.family_sd import SdFamily
    from library.train_script import run_network_training

    for handler in list(logging.root.handlers):  # bound to an earlier test's captured stderr, now closed
        logging.root.removeHandler(handler)
    quiet, logging.raiseExceptions = logging.raiseExceptions, False  # so are diffusers' own handlers: no "Logging error"
    try:
        with pytest.raises(SystemExit) as e:
            run_network_training(family or SdFamily(), "test", [str(a) for a in argv])
    finally:
        logging.raiseExceptions = quiet
    assert e.value.code == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err[-3000:]
    return errors[0]


def no_model(tmp_path) -> list[str]:
    """Flags of a run whose model does not exist: an error that fires later than the one tested would name it."""
    return ["--pretrained_model_name_or_path", tmp_path / "missing-model.safetensors", "--output_dir", tmp_path / "out",
            "--network_module", "networks.lora", "--max_data_loader_n_workers", "0", "--seed", "1"]


# ---------------------------------------------------------------------------------------------------------------------
# (a) truncated or corrupt images


def test_a_truncated_image_stops_the_run_before_the_model_loads(tmp_path, capsys):
    config = dataset(tmp_path)
    bad = cut(tmp_path / "img" / "1.png")
    line = run_training([*no_model(tmp_path), "--dataset_config", config], capsys)
    assert bad in line and "re-save" in line and "missing-model" not in line, line


def test_several_broken_images_are_listed_in_one_line(tmp_path, capsys):
    config = dataset(tmp_path, 3)
    bad = [cut(tmp_path / "img" / "0.png"), cut(tmp_path / "img" / "2.png", 0.2)]
    line = run_training([*no_model(tmp_path), "--dataset_config", config], capsys)
    assert all(p in line for p in bad) and "2 images cannot be decoded" in line and "missing-model" not in line, line


def test_an_image_that_breaks_during_training_is_one_line(tmp_path, capsys, monkeypatch):
    """The image is fine when the run starts (here: the start-up check is skipped) and cannot be decoded when its
    batch comes, in a data-loader worker process."""
    import library.trainer

    config = dataset(tmp_path)
    bad = cut(tmp_path / "img" / "0.png")
    monkeypatch.setattr(library.trainer, "raise_on_undecodable", lambda paths, workers: None)
    argv = ["--pretrained_model_name_or_path", "kiln-tiny-sd", "--output_dir", tmp_path / "out", "--dataset_config", config,
            "--network_module", "networks.lora", "--network_dim", "2", "--max_train_steps", "2",
            "--max_data_loader_n_workers", "1", "--seed", "1"]
    line = run_training(argv, capsys)
    assert bad in line and "cannot decode" in line and "re-save" in line, line


def test_a_worker_error_is_cut_back_to_its_line():
    from library.image_util import ImageReadError

    worker = ("Caught ImageReadError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
              '  File "x.py", line 1, in f\n    load_image(p)\n'
              "library.image_util.ImageReadError: cannot decode image /d/1.png: image file is truncated\n")
    assert str(ImageReadError(worker)) == "cannot decode image /d/1.png: image file is truncated"


# ---------------------------------------------------------------------------------------------------------------------
# (b) truncated or non-safetensors model files


def model_file(path, keys=("model.diffusion_model.input_blocks.0.0.weight", "cond_stage_model.transformer.x")) -> str:
    save_file({k: torch.zeros(64, 64) for k in keys}, str(path))
    return str(path)


@pytest.mark.parametrize("damage,says", [("cut", "is truncated"), ("html", "is not a safetensors file"), ("empty", "is empty")])
def test_a_broken_model_file_is_one_line_before_anything_loads(damage, says, tmp_path, capsys):
    path = model_file(tmp_path / "model.safetensors")
    if damage == "cut":
        cut(path)
    elif damage == "html":
        (tmp_path / "model.safetensors").write_text("<!DOCTYPE html><html><body>Not found</body></html>")
    else:
        (tmp_path / "model.safetensors").write_bytes(b"")
    config = dataset(tmp_path)
    argv = ["--pretrained_model_name_or_path", path, "--output_dir", tmp_path / "out", "--dataset_config", config]
    line = run_training(argv, capsys)
    assert path in line and says in line and "download" in line, line


@pytest.mark.parametrize("family", ["sd", "sdxl", "flux"])
def test_every_loader_says_a_model_file_is_truncated(family, tmp_path):
    from library.checkpoint_files import ModelLoadError

    if family == "sd":
        from library.sd_models import load_sd_model as load
    elif family == "sdxl":
        from library.sdxl_models import load_sdxl_model as load
    else:
        from library.flux_models import load_flux_model as load
    path = model_file(tmp_path / "model.safetensors")
    whole = os.path.getsize(path)
    cut(path)
    with pytest.raises(ModelLoadError) as e:
        load(path)
    assert str(e.value) == f"{path} is truncated (it has {whole // 2} bytes, its header describes {whole}): download or copy it again"


def test_a_truncated_pickle_checkpoint_says_so(tmp_path):
    from library.checkpoint_files import ModelLoadError, read_state_dict

    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"a": torch.zeros(1000)}}, path)
    cut(path)
    with pytest.raises(ModelLoadError, match="model.ckpt is truncated or not a torch checkpoint .*download"):
        read_state_dict(str(path))


# ---------------------------------------------------------------------------------------------------------------------
# (c) --resume with a truncated, corrupt or missing file


def state_folder(root) -> str:
    folder = root / "last-state"
    folder.mkdir()
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(4, 64)}, str(folder / "network.safetensors"))
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(64, 64))])
    torch.save(opt.state_dict(), folder / "optimizer.pt")
    torch.save({"last_epoch": 3, "_step_count": 4}, folder / "lr_scheduler.pt")
    torch.save({"torch": torch.get_rng_state(), "extra": torch.zeros(4096)}, folder / "rng.pt")
    state = {"current_epoch": 1, "current_step": 3, "batches_done": 3, "seed": 1, "loss_history": [0.1, 0.2, 0.3]}
    (folder / "train_state.json").write_text(json.dumps(state))
    return str(folder)


@pytest.mark.parametrize(
    "name,damage",
    [("network.safetensors", "cut"), ("optimizer.pt", "cut"), ("rng.pt", "cut"), ("lr_scheduler.pt", "cut"),
     ("train_state.json", "cut"), ("train_state.json", "no_step"), ("optimizer.pt", "missing")],
)
def test_a_broken_resume_state_is_one_line_before_the_model_loads(name, damage, tmp_path, capsys):
    folder = state_folder(tmp_path)
    path = os.path.join(folder, name)
    if damage == "cut":
        cut(path, 0.6)
    elif damage == "no_step":
        with open(path, "w") as f:
            json.dump({"current_epoch": 1, "batches_done": 3, "seed": 1}, f)
    else:
        os.remove(path)
    line = run_training([*no_model(tmp_path), "--dataset_config", dataset(tmp_path), "--resume", folder], capsys)
    assert name in line and folder in line and "missing-model" not in line, line
    if damage != "missing":
        assert "cannot be used" in line and "without --resume" in line, line


# ---------------------------------------------------------------------------------------------------------------------
# (d) an output folder that cannot be used


@pytest.mark.parametrize("where", ["is_a_file", "under_a_file"])
def test_an_unusable_output_dir_is_refused_before_the_model_loads(where, tmp_path, capsys):
    (tmp_path / "taken").write_text("a file")
    out = tmp_path / "taken" if where == "is_a_file" else tmp_path / "taken" / "out"
    argv = [*no_model(tmp_path), "--dataset_config", dataset(tmp_path), "--output_dir", out]
    line = run_training(argv, capsys)
    assert f"--output_dir {out}" in line and "is a file" in line and "missing-model" not in line, line


def test_an_output_dir_without_write_permission_is_refused(tmp_path, monkeypatch):
    from library.preflight import output_dir_problem

    monkeypatch.setattr(os, "access", lambda path, mode: False)  # tests run as root, who may write anywhere
    assert output_dir_problem(str(tmp_path / "new" / "out")) == (
        f"--output_dir {tmp_path / 'new' / 'out'} cannot be created: {tmp_path} is not writable; choose a folder you can write to"
    )


# ---------------------------------------------------------------------------------------------------------------------
# (e) learning rates that leave nothing to train


@pytest.mark.parametrize(
    "flags",
    [
        ["--learning_rate", "0"],
        ["--learning_rate", "0", "--unet_lr", "0", "--text_encoder_lr", "0"],
        ["--unet_lr", "0", "--network_train_unet_only"],
        ["--text_encoder_lr", "0", "--network_train_text_encoder_only"],
    ],
)
def test_learning_rates_that_train_nothing_are_refused_before_any_cache(flags, tmp_path, capsys):
    config = dataset(tmp_path)
    line = run_training([*no_model(tmp_path), "--dataset_config", config, "--cache_latents_to_disk", *flags], capsys)
    assert "nothing to train" in line and "--learning_rate" in line and "missing-model" not in line, line
    assert not [n for n in os.listdir(tmp_path / "img") if n.endswith(".safetensors")]  # no latent cache was written


def test_a_zero_default_rate_with_a_unet_rate_trains(tmp_path, capsys):
    line = run_training([*no_model(tmp_path), "--dataset_config", dataset(tmp_path), "--learning_rate", "0",
                         "--unet_lr", "1e-4"], capsys)
    assert "nothing to train" not in line and "missing-model" in line, line


# ---------------------------------------------------------------------------------------------------------------------
# (f) --network_weights of another model family


def lora_file(path, keys) -> str:
    tensors = {}
    for name in keys:
        tensors[f"{name}.lora_down.weight"] = torch.zeros(2, 8)
        tensors[f"{name}.lora_up.weight"] = torch.zeros(8, 2)
        tensors[f"{name}.alpha"] = torch.tensor(2.0)
    save_file(tensors, str(path))
    return str(path)


FLUX_LORA = ["lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_single_blocks_0_linear1", "lora_te1_text_model_encoder_layers_0_mlp_fc1"]
SDXL_LORA = ["lora_unet_input_blocks_4_1_proj_in", "lora_te1_text_model_encoder_layers_0_mlp_fc1", "lora_te2_text_model_encoder_layers_0_mlp_fc1"]
SD3_LORA = ["lora_unet_joint_blocks_0_x_block_attn_qkv"]
SD1_LORA = ["lora_unet_down_blocks_0_attentions_0_proj_in", "lora_te_text_model_encoder_layers_0_mlp_fc1"]


@pytest.mark.parametrize(
    "keys,family,says",
    [
        (FLUX_LORA, "sd", "this LoRA is for FLUX.1 (keys like lora_unet_double_blocks_0_img_attn_qkv), not for train_network.py; use flux_train_network.py"),
        (SDXL_LORA, "sd", "this LoRA is for SDXL (keys like lora_te2_text_model_encoder_layers_0_mlp_fc1), not for train_network.py; use sdxl_train_network.py"),
        (SD3_LORA, "sd", "this LoRA is for SD3 (keys like lora_unet_joint_blocks_0_x_block_attn_qkv), not for train_network.py; use sd3_train_network.py"),
        (SD1_LORA, "sdxl", "this LoRA is for SD 1.x/2.x (keys like lora_te_text_model_encoder_layers_0_mlp_fc1), not for sdxl_train_network.py; use train_network.py"),
    ],
)
def test_network_weights_of_another_family_are_refused_before_the_model_loads(keys, family, says, tmp_path, capsys):
    from library.family_sd import SdFamily
    from library.family_sdxl import SdxlFamily

    weights = lora_file(tmp_path / "other.safetensors", keys)
    argv = [*no_model(tmp_path), "--dataset_config", dataset(tmp_path), "--network_weights", weights]
    if family == "sdxl":  # a built-in model's family is known without loading it
        argv[1] = "kiln-tiny-sdxl"
    line = run_training(argv, capsys, SdxlFamily() if family == "sdxl" else SdFamily())
    assert line == f"error: --network_weights {weights}: {says}", line


def test_lora_families_from_keys():
    from library.checkpoint_files import detect_lora_family

    assert detect_lora_family([k + ".alpha" for k in FLUX_LORA]) == "flux"
    assert detect_lora_family(["lora_te1_text_model_encoder_layers_0_mlp_fc1.alpha", "lora_te3_encoder_block_0_x.alpha"]) == "flux"
    assert detect_lora_family(["lora_te1_text_model_encoder_layers_0_mlp_fc1.alpha"]) == "unknown"  # SDXL or FLUX
    assert detect_lora_family(["lora_unet_add_embedding_linear_1.alpha", "lora_unet_down_blocks_1_attentions_0_proj_in.alpha"]) == "sdxl"
    assert detect_lora_family(["lora_unet_down_blocks_1_attentions_0_proj_in.alpha"]) == "unknown"  # SD or diffusers-named SDXL
    assert detect_lora_family([k + ".alpha" for k in SD1_LORA]) == "sd1"
    assert detect_lora_family([k + ".alpha" for k in SD3_LORA]) == "sd3"


def test_missing_or_truncated_network_weights_are_one_line(tmp_path, capsys):
    argv = [*no_model(tmp_path), "--dataset_config", dataset(tmp_path)]
    line = run_training([*argv, "--network_weights", tmp_path / "none.safetensors"], capsys)
    assert f"--network_weights {tmp_path / 'none.safetensors'} does not exist" in line, line
    weights = cut(lora_file(tmp_path / "cut.safetensors", SD1_LORA * 1))
    line = run_training([*argv, "--network_weights", weights], capsys)
    assert f"--network_weights {weights} is truncated" in line, line


# ---------------------------------------------------------------------------------------------------------------------
# (g) the cache tools' --help


# per family switch: flags its --help shows (model flags of that family) and flags it must not show (another family's
# model flags, the family's own training flags)
FAMILY_HELP = {
    "--sdxl": (["--sdxl"], ["--clip_g", "--t5xxl", "--ae", "--apply_t5_attn_mask", "--v2"]),
    "--flux": (["--flux", "--clip_l", "--t5xxl", "--ae"], ["--clip_g", "--timestep_sampling", "--guidance_scale", "--blocks_to_swap",
                                                           "--v2", "--clip_skip", "--weighted_captions", "--max_token_length"]),
    "--sd3": (["--sd3", "--clip_l", "--clip_g", "--t5xxl", "--tokenizer_cache_dir", "--vae"],
              ["--ae", "--weighting_scheme", "--training_shift", "--clip_l_dropout_rate", "--pos_emb_random_crop_rate",
               "--enable_scaled_pos_embed", "--blocks_to_swap", "--cpu_offload_checkpointing",
               "--v2", "--clip_skip", "--weighted_captions", "--max_token_length"]),
}
TOOL_HELP = {  # per tool: its own flags, shown for every family
    "cache_latents": ["--vae_batch_size", "--skip_cache_check", "--mixed_precision", "--no_half_vae"],
    "cache_text_encoder_outputs": ["--text_encoder_batch_size", "--text_encoder_cache_variants", "--mixed_precision"],
}
TEXT_FLAGS = {  # a family's text-encoding flags: shown by the text-encoder tool only
    "--sdxl": ["--max_token_length"],
    "--flux": ["--t5xxl_max_token_length", "--apply_t5_attn_mask"],
    "--sd3": ["--t5xxl_max_token_length", "--apply_lg_attn_mask", "--apply_t5_attn_mask", "--fp8_base"],
}


@pytest.mark.parametrize("switch", list(FAMILY_HELP))
@pytest.mark.parametrize("tool", list(TOOL_HELP))
def test_cache_tool_help_shows_only_what_the_tool_reads(tool, switch, capsys):
    import importlib
    import re

    main = importlib.import_module(f"tools.{tool}").main
    with pytest.raises(SystemExit) as e:
        main([switch, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    flags = set(re.findall(r"^  (--\w+)", out, re.M))  # the options listed (not the usage line)
    shown, hidden = FAMILY_HELP[switch]
    text = TEXT_FLAGS.get(switch, [])
    own = TOOL_HELP[tool] + (text if tool == "cache_text_encoder_outputs" else [])
    for flag in ["--pretrained_model_name_or_path", "--dataset_config", "--resolution", "--config_file", *shown, *own]:
        assert flag in flags, flag
    if tool == "cache_latents":
        hidden = hidden + [f for f in text if f not in shown]  # text-encoding flags change no latent
    for flag in ["--learning_rate", "--network_dim", "--optimizer_type", "--max_train_steps", "--output_dir", "--save_state",
                 "--sample_prompts", "--noise_offset", "--lr_scheduler", "--cache_text_encoder_outputs", *hidden]:
        assert flag not in flags, flag


def test_cache_tool_family_switches_and_detection():
    from library.family_sd3 import Sd3Family
    from library.family_sdxl import SdxlFamily
    from library.train_script import tool_family

    assert isinstance(tool_family(["--sd3", "--pretrained_model_name_or_path", "x.safetensors"]), Sd3Family)
    assert isinstance(tool_family(["--pretrained_model_name_or_path", "kiln-tiny-sd3.5-large"]), Sd3Family)
    assert isinstance(tool_family(["--pretrained_model_name_or_path", "kiln-tiny-sdxl"]), SdxlFamily)
    with pytest.raises(SystemExit) as e:
        tool_family(["--sdxl", "--sd3"])
    assert e.value.code == 2


def test_cache_tools_still_accept_a_training_command_line():
    from library.train_script import parse_tool_args

    _, args = parse_tool_args(["--pretrained_model_name_or_path", "kiln-tiny-sd", "--learning_rate", "1e-3",
                               "--network_dim", "8", "--vae_batch_size", "2"], "test", ("vae_batch_size",))
    assert args.learning_rate == 1e-3 and args.network_dim == 8 and args.vae_batch_size == 2
