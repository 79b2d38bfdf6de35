"""flux_train_network.py end to end on the tiny FLUX: the LoRA file, caches, block swap and fp8, bad options."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, SCRIPT_ENV, launch_script, write_caption, write_image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

pytestmark = pytest.mark.slow

ENV = SCRIPT_ENV
BASE = ["--network_module", "networks.lora_flux", "--network_dim", "4", "--network_alpha", "4", "--learning_rate", "1e-3",
        "--max_data_loader_n_workers", "0", "--seed", "5", "--pretrained_model_name_or_path", "kiln-tiny-flux",
        "--t5xxl_max_token_length", "16", "--timestep_sampling", "flux_shift", "--model_prediction_type", "raw", "--guidance_scale", "1.0"]


def launch(*args, check: bool = True) -> subprocess.CompletedProcess:
    return launch_script("flux_train_network.py", *args, check=check)


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


def test_block_swap_and_activation_offload_change_no_number(dataset, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red shape --w 64 --h 64 --s 2 --d 1\n")
    sampling = ["--sample_prompts", prompts, "--sample_every_n_steps", 1]
    runs, logs = {}, {}
    for name, extra in {
        "plain": [],
        "offload": ["--cpu_offload_checkpointing"],
        # previews in between change no training number
        "swap": ["--blocks_to_swap", 2, "--cpu_offload_checkpointing", *sampling],
        # compiled blocks (aot_eager traces forward and backward like inductor, without code generation) with swap hooks
        "compiled": ["--torch_compile", "--dynamo_backend", "aot_eager", "--blocks_to_swap", 2],
    }.items():
        out = tmp_path / name
        res = launch(*BASE, *dataset, "--output_dir", out, "--output_name", "b", "--max_train_steps", 2,
                     "--network_train_unet_only", "--gradient_checkpointing", *extra)
        runs[name], logs[name] = load_file(str(out / "b.safetensors")), res.stderr
    # the tiny model fits in memory: sampling streams no block
    assert "blocks compiled with aot_eager" in logs["compiled"]
    assert "0 streamed" in logs["swap"] and len(os.listdir(tmp_path / "swap" / "sample")) == 2
    ref = runs.pop("plain")
    for name, run in runs.items():
        assert run.keys() == ref.keys() and all(torch.equal(run[k], ref[k]) for k in ref), name


def refused(argv: list, capsys) -> str:
    """Run flux_train_network.py's main in this process with arguments it must refuse before anything loads; return
    its error output."""
    from library.family_flux import FluxFamily
    from library.train_script import run_network_training

    with pytest.raises(SystemExit) as e:
        run_network_training(FluxFamily(), "test", [str(a) for a in argv])
    assert e.value.code != 0
    return capsys.readouterr().err


def test_activation_offload_and_compile_flags_are_checked(dataset, tmp_path, capsys):
    out = ["--output_dir", tmp_path / "x"]
    assert "add --gradient_checkpointing" in refused([*BASE, *dataset, *out, "--cpu_offload_checkpointing"], capsys)
    err = refused([*BASE, *dataset, *out, "--torch_compile", "--dynamo_backend", "nope"], capsys)
    assert "--dynamo_backend nope is not a torch.compile backend" in err
    assert "add --torch_compile" in refused([*BASE, *dataset, *out, "--dynamo_backend", "eager"], capsys)


def test_t5_attention_mask_trains_with_cached_outputs(dataset, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red shape --w 64 --h 64 --s 2 --d 1 --l 2.0 --n dull\n")
    launch(*BASE, *dataset, "--output_dir", tmp_path / "m", "--max_train_steps", 2, "--network_train_unet_only", "--apply_t5_attn_mask",
           "--cache_text_encoder_outputs", "--sample_prompts", prompts, "--sample_every_n_steps", 2)
    with safe_open(str(tmp_path / "m" / "last.safetensors"), framework="pt") as f:
        assert f.metadata()["ss_apply_t5_attn_mask"] == "True"
    assert len(os.listdir(tmp_path / "m" / "sample")) == 1


@pytest.mark.parametrize("flag", ["--fp8_base", "--fp8_base_unet"])
def test_fp8_base_stores_every_frozen_linear_in_float8(flag):
    """What --help says: --fp8_base stores the frozen transformer and T5 Linear weights in float8, --fp8_base_unet the
    transformer's only; CLIP-L stays as it is."""
    from library.family_flux import FluxFamily
    from library.train_args import setup_network_parser

    family = FluxFamily()
    parser = setup_network_parser("test")
    family.add_arguments(parser)
    models = family.load_models(parser.parse_args(["--pretrained_model_name_or_path", "kiln-tiny-flux", "--mixed_precision", "bf16", flag]))
    clip, t5 = models.text_encoders

    def linear_dtypes(model):
        return {m.weight.dtype for m in model.modules() if isinstance(m, torch.nn.Linear)}

    assert linear_dtypes(models.denoiser) == {torch.float8_e4m3fn}
    # T5 keeps its feed-forward output `wo` in float32 (transformers' _keep_in_fp32_modules: T5 casts wo's input to it)
    t5_rest = [m for n, m in t5.named_modules() if isinstance(m, torch.nn.Linear) and not n.endswith(".wo")]
    assert linear_dtypes(torch.nn.ModuleList(t5_rest)) == ({torch.float8_e4m3fn} if flag == "--fp8_base" else {torch.float32})
    assert {m.weight.dtype for n, m in t5.named_modules() if n.endswith(".wo")} == {torch.float32}
    assert linear_dtypes(clip) == {torch.float32}
    assert not any(p.requires_grad for p in models.denoiser.parameters())


def test_fp8_base_trains_and_ddpm_options_are_refused(dataset, tmp_path, capsys):
    from library.tiny_models import build_tiny_flux

    # huber loss with sd-scripts' default schedule (snr), which crashes there for FLUX
    runs, logs = {}, {}
    for name, extra in {"f8": ["--fp8_base"], "bf16": []}.items():
        logs[name] = launch(*BASE, *dataset, "--output_dir", tmp_path / name, "--max_train_steps", 2, "--network_train_unet_only",
                            "--mixed_precision", "bf16", "--loss_type", "huber", *extra).stderr
        runs[name] = load_file(str(tmp_path / name / "last.safetensors"))
    tiny = build_tiny_flux()
    linears = [sum(isinstance(m, torch.nn.Linear) and not n.endswith(".wo") for n, m in tiny[part].named_modules())
               for part in ("transformer", "text_encoder_2")]
    assert [int(part.split()[0]) for part in logs["f8"].split("fp8 base: ")[1:]] == linears  # every Linear, transformer and T5
    assert "fp8 base: " not in logs["bf16"]
    assert runs["f8"].keys() == runs["bf16"].keys()
    assert any(not torch.equal(runs["f8"][k], runs["bf16"][k]) for k in runs["f8"])  # float8 weights change the numbers
    assert "--min_snr_gamma" in refused([*BASE, *dataset, "--output_dir", tmp_path / "x", "--min_snr_gamma", "5"], capsys)
    err = refused([*BASE, *dataset, "--output_dir", tmp_path / "x", "--blocks_to_swap", "-1", "--cache_latents_to_disk"], capsys)
    assert "--blocks_to_swap -1" in err
    assert not [n for n in os.listdir(tmp_path / "2_shapes") if n.endswith("_flux.safetensors")]  # refused before caching


def test_readme_flux_command_runs_on_the_tiny_model(dataset, tmp_path):
    """The README's FLUX command as written there, with kiln-tiny-flux instead of the model files: --blocks_to_swap 18
    is lowered to what the tiny transformer has, with a warning."""
    import shlex

    lines = open(os.path.join(ROOT, "README.md")).read().split("accelerate launch flux_train_network.py", 1)[1]
    args = shlex.split(lines.split("```", 1)[0].replace("\\\n", " "))
    for flag in ("--clip_l", "--t5xxl", "--ae", "--dataset_config"):
        del args[args.index(flag) : args.index(flag) + 2]
    args[args.index("--pretrained_model_name_or_path") + 1] = "kiln-tiny-flux"
    args[args.index("--output_dir") + 1] = str(tmp_path / "out")
    res = launch(*args, *dataset, "--max_train_steps", 2, "--t5xxl_max_token_length", 16, "--max_data_loader_n_workers", 0)
    assert "--blocks_to_swap 18: this transformer has 4 blocks, so 2 are swapped" in res.stderr
    with safe_open(str(tmp_path / "out" / "mylora.safetensors"), framework="pt") as f:
        md = f.metadata()
    assert md["ss_network_dim"] == "16" and md["ss_fp8_base"] == "True" and md["ss_steps"] == "2"


def test_merge_into_bfl_file_streaming(tmp_path):
    """tools/merge_lora.py --flux_model: the merged BFL file, read back, gives the transformer output of the LoRA applied."""
    from safetensors.torch import save_file

    from library.flux_models import save_flux_transformer_bfl, transformer_from_bfl
    from library.tiny_models import build_tiny_flux
    from networks.lora_flux import create_network

    transformer = build_tiny_flux()["transformer"]
    base = tmp_path / "flux.safetensors"
    save_flux_transformer_bfl(str(base), transformer)
    net = create_network(1.0, 4, 2, [None, None], transformer)
    torch.manual_seed(3)
    for m in net.loras:
        torch.nn.init.normal_(m.lora_up.weight, std=0.05)
    lora = tmp_path / "l.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(lora))
    out = tmp_path / "merged.safetensors"
    res = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "merge_lora.py"), "--flux_model", str(base), "--models", str(lora),
                          "--ratios", "0.7", "--save_to", str(out)], capture_output=True, text=True, env=ENV, timeout=300)
    assert res.returncode == 0, res.stderr
    merged = transformer_from_bfl(load_file(str(out)), dtype=torch.float32)
    net.set_multiplier(0.7)
    net.apply_to(False, True)
    torch.manual_seed(0)
    cfg = transformer.config
    h = w = 4
    inputs = dict(hidden_states=torch.randn(1, h * w, cfg.in_channels), encoder_hidden_states=torch.randn(1, 6, cfg.joint_attention_dim),
                  pooled_projections=torch.randn(1, cfg.pooled_projection_dim), timestep=torch.tensor([0.5]),
                  img_ids=torch.zeros(h * w, 3), txt_ids=torch.zeros(6, 3), guidance=torch.tensor([3.5]), return_dict=False)
    with torch.no_grad():
        a, b = transformer(**inputs)[0], merged(**inputs)[0]
    assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
    res = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "merge_lora.py"), "--flux_model", str(base), "--models", str(lora),
                          "--save_to", str(tmp_path / "m8.safetensors"), "--save_precision", "fp8"], capture_output=True, text=True, env=ENV)
    assert res.returncode == 0, res.stderr
    assert {v.dtype for v in load_file(str(tmp_path / "m8.safetensors")).values()} == {torch.float8_e4m3fn}


def run_tool(tool: str, *args) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, os.path.join(ROOT, "tools", tool), *map(str, args)], capture_output=True, text=True,
                         env=ENV, timeout=300)
    assert res.returncode == 0, res.stderr
    return res


def test_cache_tools_with_flux(dataset, tmp_path):
    common = ["--pretrained_model_name_or_path", "kiln-tiny-flux", "--t5xxl_max_token_length", "16", *map(str, dataset)]
    for tool in ("cache_text_encoder_outputs.py", "cache_latents.py"):
        run_tool(tool, "--flux", *common)
    names = os.listdir(tmp_path / "2_shapes")
    assert sum(n.endswith("_flux_te.safetensors") for n in names) == 4
    assert sum(n.endswith("_0064x0064_flux.safetensors") for n in names) == 4


def test_cache_tools_with_sd3_then_training_reuses_the_caches(dataset, tmp_path):
    """SD3 through the same tools (they sit here with FLUX's): kiln-tiny-sd3 as users have SD3.5, a SAI file with the
    MMDiT and the VAE plus --clip_l / --clip_g / --t5xxl files and a --tokenizer_cache_dir. The tools (SD3 detected
    from the file, or --sd3) write the caches of sd3_train_network.py with the same flags (bf16, both attention
    masks, 16 T5 tokens), and that run reuses every one: no file rewritten, nothing encoded."""
    from library.sd3_models import save_sd3_single_file
    from library.tiny_models import build_tiny_sd3, write_tiny_clip_tokenizer, write_tiny_t5_tokenizer

    parts = build_tiny_sd3("sd3-medium")
    model = tmp_path / "sd3.safetensors"
    save_sd3_single_file(str(model), parts["transformer"], vae=parts["vae"])
    files = {}
    for flag, name in (("--clip_l", "text_encoder"), ("--clip_g", "text_encoder_2"), ("--t5xxl", "text_encoder_3")):
        files[flag] = tmp_path / f"{flag[2:]}.safetensors"  # transformers' names; T5's tied embedding once
        save_file({k: v.clone() for k, v in parts[name].state_dict().items() if k != "encoder.embed_tokens.weight"}, files[flag])
    tok = tmp_path / "tok"
    write_tiny_clip_tokenizer(str(tok / "openai_clip-vit-large-patch14"))
    write_tiny_clip_tokenizer(str(tok / "laion_CLIP-ViT-bigG-14-laion2B-39B-b160k"), pad_token="!")
    write_tiny_t5_tokenizer(str(tok / "google_t5-v1_1-xxl"))
    common = ["--pretrained_model_name_or_path", model, *[x for kv in files.items() for x in kv], "--tokenizer_cache_dir", tok,
              "--t5xxl_max_token_length", 16, "--apply_lg_attn_mask", "--apply_t5_attn_mask", "--mixed_precision", "bf16", *dataset]
    run_tool("cache_text_encoder_outputs.py", *common)  # SD3 detected from the file
    run_tool("cache_latents.py", "--sd3", *common)
    img_dir = tmp_path / "2_shapes"
    caches = {n: os.stat(img_dir / n).st_mtime_ns for n in os.listdir(img_dir) if "_sd3" in n}
    assert sorted(caches) == sorted([f"{i}_sd3_te.safetensors" for i in range(4)] + [f"{i}_0064x0064_sd3.safetensors" for i in range(4)])
    with safe_open(str(img_dir / "0_sd3_te.safetensors"), framework="pt") as f:
        identity = json.loads(f.metadata()["identity"])
        assert f.get_tensor("v0.t5_out").dtype == torch.bfloat16  # encoded as training encodes: in bf16
    assert identity["apply_lg_attn_mask"] is identity["apply_t5_attn_mask"] is True and identity["tokens"]["t5_max_length"] == 16
    res = launch_script("sd3_train_network.py", *common, "--network_module", "networks.lora_sd3", "--network_dim", 4,
                        "--learning_rate", "1e-3", "--max_data_loader_n_workers", 0, "--seed", 5, "--network_train_unet_only",
                        "--cache_latents_to_disk", "--cache_text_encoder_outputs_to_disk", "--output_dir", tmp_path / "o",
                        "--output_name", "r", "--max_train_steps", 2)
    assert "caching" not in res.stderr  # no progress bar of an encoding pass
    assert {n: os.stat(img_dir / n).st_mtime_ns for n in caches} == caches
    assert load_file(str(tmp_path / "o" / "r.safetensors"))
