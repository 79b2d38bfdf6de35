"""flux_train_network.py end to end on the tiny FLUX: the LoRA file, caches, block swap and fp8, bad options."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, write_caption, write_image
from safetensors import safe_open
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
BASE = ["--network_module", "networks.lora_flux", "--network_dim", "4", "--network_alpha", "4", "--learning_rate", "1e-3",
        "--max_data_loader_n_workers", "0", "--seed", "5", "--pretrained_model_name_or_path", "kiln-tiny-flux",
        "--t5xxl_max_token_length", "16", "--timestep_sampling", "flux_shift", "--model_prediction_type", "raw", "--guidance_scale", "1.0"]


def launch(*args, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--num_processes", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", os.path.join(ROOT, "flux_train_network.py"), *map(str, args)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=600)
    if check and res.returncode != 0:
        raise AssertionError(f"failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-6000:]}")
    return res


@pytest.fixture()
def dataset(tmp_path):
    for i, c in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]):
        write_caption(write_image(tmp_path / "2_shapes" / f"{i}.png", (64, 64), c), f"shape {i}, color{i}")
    return ["--train_data_dir", tmp_path, "--resolution", "64", "--caption_extension", ".txt", "--train_batch_size", "2"]


def test_flux_lora_file_caches_and_samples(dataset, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red shape --w 64 --h 64 --s 2 --d 1 --g 3.5\n")
    out = tmp_path / "o"
    launch(*BASE, *dataset, "--output_dir", out, "--output_name", "f", "--max_train_steps", 3, "--network_train_unet_only",
           "--cache_latents_to_disk", "--cache_text_encoder_outputs_to_disk", "--sample_prompts", prompts, "--sample_every_n_steps", 3)
    with safe_open(str(out / "f.safetensors"), framework="pt") as f:
        keys, md = list(f.keys()), f.metadata()
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight" in keys
    assert "lora_unet_single_blocks_0_linear1.lora_down.weight" in keys
    assert md["ss_base_model_version"] == "flux1" and md["modelspec.architecture"] == "flux-1-dev/lora"
    assert md["ss_timestep_sampling"] == "flux_shift" and md["ss_model_prediction_type"] == "raw"
    img_dir = tmp_path / "2_shapes"
    assert sorted(p for p in os.listdir(img_dir) if p.endswith("_flux_te.safetensors")) == [f"{i}_flux_te.safetensors" for i in range(4)]
    assert len(os.listdir(out / "sample")) == 1


def test_block_swap_changes_no_number(dataset, tmp_path):
    runs = {}
    for swap in (0, 2):
        out = tmp_path / f"s{swap}"
        extra = ["--blocks_to_swap", swap] if swap else []
        launch(*BASE, *dataset, "--output_dir", out, "--output_name", "b", "--max_train_steps", 2, "--network_train_unet_only",
               "--gradient_checkpointing", *extra)
        runs[swap] = load_file(str(out / "b.safetensors"))
    assert runs[0].keys() == runs[2].keys() and all(torch.equal(runs[0][k], runs[2][k]) for k in runs[0])


def test_fp8_base_trains_and_ddpm_options_are_refused(dataset, tmp_path):
    launch(*BASE, *dataset, "--output_dir", tmp_path / "f8", "--max_train_steps", 2, "--network_train_unet_only", "--fp8_base",
           "--mixed_precision", "bf16")
    assert load_file(str(tmp_path / "f8" / "last.safetensors"))
    res = launch(*BASE, *dataset, "--output_dir", tmp_path / "x", "--min_snr_gamma", "5", check=False)
    assert res.returncode != 0 and "--min_snr_gamma" in res.stderr
    res = launch(*BASE, *dataset, "--output_dir", tmp_path / "x", "--blocks_to_swap", "99", check=False)
    assert res.returncode != 0 and "blocks_to_swap" in res.stderr
