"""sdxl_train_network.py end to end on a tiny SDXL (diffusers folder and sgm single file).

Oracle: diffusers' StableDiffusionXLPipeline.load_lora_weights consumes the file, and the U-Net and text-encoder outputs
with it loaded equal those of the checkpoint tools/merge_lora.py writes, read back by diffusers' single-file loader.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, SCRIPT_ENV, launch_script, write_caption, write_image
from safetensors import safe_open
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

ENV = SCRIPT_ENV
BASE = ["--network_module", "networks.lora", "--network_dim", "4", "--network_alpha", "2", "--learning_rate", "1e-3",
        "--max_data_loader_n_workers", "0", "--seed", "3"]


def launch(script: str, *args, check: bool = True) -> subprocess.CompletedProcess:
    return launch_script(script, *args, check=check)


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory):
    from library.model_files import save_diffusers_folder
    from library.tiny_models import build_tiny_sdxl

    folder = tmp_path_factory.mktemp("models") / "tiny_sdxl"
    save_diffusers_folder(build_tiny_sdxl(), str(folder))
    return str(folder)


@pytest.fixture()
def dataset(tmp_path):
    root = tmp_path / "data"
    for i, c in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]):
        write_caption(write_image(root / "img" / f"{i}.png", (64, 64) if i % 2 else (64, 96), c), f"shape {i}, color{i}, tiny, thing")
    config = root / "data.toml"
    config.write_text(f"""
[general]
caption_extension = ".txt"
enable_bucket = true
min_bucket_reso = 64
max_bucket_reso = 128
bucket_reso_steps = 32
shuffle_caption = true
keep_tokens = 1

[[datasets]]
resolution = 64
batch_size = 2

  [[datasets.subsets]]
  image_dir = '{root / "img"}'
  num_repeats = 2
""")
    return str(config), root / "img"


def merged_outputs(lora: str, base: str, tmp_path):
    """U-Net and text-encoder outputs of diffusers with the LoRA loaded, and of kiln's merged single file."""
    from diffusers import StableDiffusionXLPipeline

    merged = tmp_path / "merged.safetensors"
    res = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "merge_lora.py"), "--sd_model", base, "--models", lora,
                          "--save_to", str(merged)], capture_output=True, text=True, env=ENV, timeout=300)
    assert res.returncode == 0, res.stderr
    pipe = StableDiffusionXLPipeline.from_pretrained(base)
    pipe.load_lora_weights(lora)
    other = StableDiffusionXLPipeline.from_single_file(str(merged), config=base)
    torch.manual_seed(0)
    cfg = pipe.unet.config
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
    ctx = torch.randn(1, 77, cfg.cross_attention_dim)
    added = {"text_embeds": torch.randn(1, pipe.text_encoder_2.config.projection_dim), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    ids = pipe.tokenizer(["a red shape"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        return [
            (pipe.unet(x, t, ctx, added_cond_kwargs=added).sample, other.unet(x, t, ctx, added_cond_kwargs=added).sample),
            (pipe.text_encoder(ids).last_hidden_state, other.text_encoder(ids).last_hidden_state),
            (pipe.text_encoder_2(ids).text_embeds, other.text_encoder_2(ids).text_embeds),
        ]


def test_unet_lora_with_cached_text_outputs_matches_diffusers(tiny_sdxl, dataset, tmp_path):
    config, img_dir = dataset
    out = tmp_path / "o"
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red shape --w 64 --h 64 --s 2 --d 1 --n blurry\n")
    launch("sdxl_train_network.py", "--pretrained_model_name_or_path", tiny_sdxl, "--dataset_config", config, "--output_dir", out,
           "--output_name", "x", "--max_train_steps", 4, "--network_train_unet_only", "--cache_latents_to_disk",
           "--cache_text_encoder_outputs_to_disk", "--text_encoder_cache_variants", 3, "--sample_prompts", prompts,
           "--sample_every_n_steps", 4, "--validation_split", "0.25", *BASE)
    assert [n.split("_")[1] for n in os.listdir(out / "sample")] == ["000004"]
    lora = str(out / "x.safetensors")
    with safe_open(lora, framework="pt") as f:
        keys, md = list(f.keys()), f.metadata()
    # sgm names of the tiny SDXL's transformer blocks (the real SDXL's layout: input 4, 5, 7, 8, middle 1, output 0-5)
    blocks = [("input_blocks_4", 1), ("input_blocks_5", 1), ("input_blocks_7", 2), ("input_blocks_8", 2), ("middle_block", 2),
              ("output_blocks_0", 2), ("output_blocks_1", 2), ("output_blocks_2", 2), ("output_blocks_3", 1),
              ("output_blocks_4", 1), ("output_blocks_5", 1)]
    assert sorted(k for k in keys if "attn1_to_q." in k) == sorted(
        f"lora_unet_{b}_1_transformer_blocks_{t}_attn1_to_q.{s}" for b, n in blocks for t in range(n)
        for s in ("alpha", "lora_down.weight", "lora_up.weight"))
    assert any(k.startswith("lora_unet_middle_block_1_") for k in keys) and any(k.startswith("lora_unet_output_blocks_") for k in keys)
    assert not any(k.startswith(("lora_te", "lora_unet_down_blocks")) for k in keys)
    assert md["ss_base_model_version"] == "sdxl_base_v1-0" and md["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert sorted(p for p in os.listdir(img_dir) if p.endswith("_sdxl_te.safetensors")) == [f"{i}_sdxl_te.safetensors" for i in range(4)]
    for a, b in merged_outputs(lora, tiny_sdxl, tmp_path):
        assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()


def test_text_encoder_lora_single_file_and_cache_tools(tiny_sdxl, dataset, tmp_path):
    from library.sdxl_models import load_sdxl_model, save_sdxl_single_file
    from library.tiny_models import write_tiny_clip_tokenizer

    config, img_dir = dataset
    single = tmp_path / "tiny_sdxl.safetensors"
    save_sdxl_single_file(str(single), load_sdxl_model(tiny_sdxl))
    tok = tmp_path / "tok"
    write_tiny_clip_tokenizer(str(tok / "openai_clip-vit-large-patch14"))
    write_tiny_clip_tokenizer(str(tok / "laion_CLIP-ViT-bigG-14-laion2B-39B-b160k"), pad_token="!")
    common = ["--pretrained_model_name_or_path", single, "--tokenizer_cache_dir", tok, "--dataset_config", config]
    res = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "cache_text_encoder_outputs.py"), "--sdxl", *map(str, common),
                          "--text_encoder_cache_variants", "2"], capture_output=True, text=True, env=ENV, timeout=300)
    assert res.returncode == 0, res.stderr
    cache = img_dir / "0_sdxl_te.safetensors"
    with safe_open(str(cache), framework="pt") as f:
        assert {k.split(".", 1)[1] for k in f.keys()} >= {"hidden_state1", "hidden_state2", "pool2"}
    mtime = os.path.getmtime(cache)
    res = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "cache_latents.py"), *map(str, common)],
                         capture_output=True, text=True, env=ENV, timeout=300)
    assert res.returncode == 0, res.stderr
    assert any(p.endswith("_sdxl.safetensors") for p in os.listdir(img_dir))
    # training with the same settings reuses the caches
    out = tmp_path / "o"
    launch("sdxl_train_network.py", *common, "--output_dir", out, "--output_name", "u", "--max_train_steps", 2, "--network_train_unet_only",
           "--cache_text_encoder_outputs_to_disk", "--text_encoder_cache_variants", 2, "--cache_latents_to_disk", *BASE)
    assert os.path.getmtime(cache) == mtime  # (a changed caption rebuilds: tests/test_te_cache.py)
    # text-encoder LoRA (no output cache): lora_te1_/lora_te2_ keys that diffusers consumes
    launch("sdxl_train_network.py", *common, "--output_dir", out, "--output_name", "te", "--max_train_steps", 2, *BASE)
    lora = str(out / "te.safetensors")
    keys = load_file(lora).keys()
    assert any(k.startswith("lora_te1_text_model_encoder_layers_0_") for k in keys)
    assert any(k.startswith("lora_te2_text_model_encoder_layers_0_") for k in keys)
    for a, b in merged_outputs(lora, tiny_sdxl, tmp_path):
        assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()


def test_cached_text_outputs_need_unet_only_and_v2_is_refused(tiny_sdxl, dataset, tmp_path):
    config, _ = dataset
    res = launch("sdxl_train_network.py", "--pretrained_model_name_or_path", tiny_sdxl, "--dataset_config", config, "--output_dir",
                 tmp_path, "--cache_text_encoder_outputs", *BASE, check=False)
    assert res.returncode != 0 and "--network_train_unet_only" in res.stderr
    res = launch("train_network.py", "--pretrained_model_name_or_path", tiny_sdxl, "--train_data_dir", os.path.dirname(config),
                 "--resolution", 64, "--output_dir", tmp_path, *BASE, check=False)
    assert res.returncode != 0 and "sdxl_train_network.py" in res.stderr


def test_merge_into_diffusers_folder(tiny_sdxl, tmp_path):
    """merge_lora.py --save_to FOLDER writes a diffusers SDXL pipeline with the LoRA merged into the U-Net."""
    from diffusers import StableDiffusionXLPipeline

    from library.sdxl_models import sdxl_unet_lora_name_map
    from networks.lora import create_network

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    net = create_network(1.0, 4, 2, [pipe.text_encoder, pipe.text_encoder_2], pipe.unet,
                         unet_name_map=sdxl_unet_lora_name_map(pipe.unet), te_prefixes=["lora_te1", "lora_te2"])
    torch.manual_seed(2)
    for m in net.loras:
        torch.nn.init.normal_(m.lora_up.weight, std=0.02)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "l.safetensors"))
    folder = tmp_path / "merged"
    res = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "merge_lora.py"), "--sd_model", tiny_sdxl, "--models",
                          str(tmp_path / "l.safetensors"), "--save_to", str(folder)], capture_output=True, text=True, env=ENV, timeout=300)
    assert res.returncode == 0, res.stderr
    merged = StableDiffusionXLPipeline.from_pretrained(str(folder))
    net.apply_to()
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([300])
    ctx = torch.randn(1, 77, pipe.unet.config.cross_attention_dim)
    added = {"text_embeds": torch.randn(1, pipe.text_encoder_2.config.projection_dim), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    with torch.no_grad():
        a, b = pipe.unet(x, t, ctx, added_cond_kwargs=added).sample, merged.unet(x, t, ctx, added_cond_kwargs=added).sample
    assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
