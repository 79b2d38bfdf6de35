"""train_network.py end to end through `accelerate launch`, on tiny SD models saved in real formats.

Oracles: diffusers' own LoRA loader (StableDiffusionPipeline.load_lora_weights) and its single-file loader, compared
with kiln's merge; resumed runs against uninterrupted ones; two processes against one with twice the batch.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, SCRIPT_ENV, launch_script, write_caption, write_image
from safetensors import safe_open
from safetensors.torch import load_file
from safetensors.torch import save as st_save

pytestmark = pytest.mark.slow

ENV = SCRIPT_ENV


def launch(*args, processes: int = 1, check: bool = True, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run train_network.py through accelerate launch (two CPU processes with processes=2)."""
    return launch_script("train_network.py", *args, processes=processes, check=check, timeout=timeout)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    colors = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]
    for i, c in enumerate(colors):
        p = write_image(root / "img" / f"{i}.png", (64, 64) if i % 2 else (64, 96), c)
        write_caption(p, f"shape {i}, color{i}, tiny")
    config = root / "data.toml"
    config.write_text(f"""
[general]
caption_extension = ".txt"
enable_bucket = true
min_bucket_reso = 64
max_bucket_reso = 128

[[datasets]]
resolution = 64
batch_size = 2

  [[datasets.subsets]]
  image_dir = '{root / "img"}'
  num_repeats = 2
""")
    return str(config)


BASE = [
    "--network_module",
    "networks.lora",
    "--network_dim",
    "4",
    "--network_alpha",
    "2",
    "--learning_rate",
    "1e-3",
    "--max_data_loader_n_workers",
    "0",
    "--seed",
    "7",
]


@pytest.fixture(scope="module")
def trained(tiny_sd, dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    launch(
        "--pretrained_model_name_or_path",
        tiny_sd,
        "--dataset_config",
        dataset,
        "--output_dir",
        out,
        "--output_name",
        "mylora",
        "--max_train_steps",
        4,
        "--network_args",
        "conv_dim=2",
        "conv_alpha=1",
        *BASE,
    )
    return str(out / "mylora.safetensors")


def test_saved_file_keys_shapes_and_metadata(trained):
    with safe_open(trained, framework="pt") as f:
        keys, md = list(f.keys()), f.metadata()
        down = f.get_tensor("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight")
        conv = f.get_tensor("lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight")
        alpha = f.get_tensor("lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha")
    assert all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in keys)
    assert down.shape[0] == 4 and tuple(conv.shape) == (2, 32, 3, 3) and alpha.item() == 2
    assert md["ss_network_module"] == "networks.lora" and md["ss_network_dim"] == "4" and md["ss_network_alpha"] == "2.0"
    assert md["ss_base_model_version"] == "sd_v1" and md["ss_v2"] == "False"
    assert md["modelspec.architecture"] == "stable-diffusion-v1/lora" and md["modelspec.sai_model_spec"] == "1.0.1"
    assert json.loads(md["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "1"}
    assert md["ss_steps"] == "4" and md["ss_num_train_images"] == "8"
    assert md["ss_epoch"] == "1"  # 4 batches an epoch: the 4 steps are the first epoch
    assert all(isinstance(v, str) for v in md.values())


def test_sshs_hashes_follow_the_additional_networks_algorithm(trained):
    tensors = load_file(trained)
    with safe_open(trained, framework="pt") as f:
        md = f.metadata()
    data = st_save(tensors, {k: v for k, v in md.items() if k.startswith("ss_")})
    n = int.from_bytes(data[:8], "little")
    assert md["sshs_model_hash"] == hashlib.sha256(data[8 + n :]).hexdigest()
    assert md["sshs_legacy_hash"] == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]


def test_diffusers_loads_every_key_and_matches_kiln_merge(trained, tiny_sd, tmp_path):
    """diffusers' load_lora_weights consumes the file, and the U-Net and text-encoder outputs with it loaded equal
    those of the checkpoint tools/merge_lora.py writes, read back by diffusers' single-file loader."""
    from diffusers import StableDiffusionPipeline

    merged = tmp_path / "merged.safetensors"
    res = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "tools", "merge_lora.py"),
            "--sd_model",
            tiny_sd,
            "--models",
            trained,
            "--save_to",
            str(merged),
        ],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None)
    pipe.load_lora_weights(trained)
    merged_pipe = StableDiffusionPipeline.from_single_file(str(merged), config=tiny_sd, safety_checker=None)
    torch.manual_seed(0)
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
    ctx = torch.randn(1, 77, pipe.unet.config.cross_attention_dim)
    ids = pipe.tokenizer(["a red shape"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        a, b = pipe.unet(x, t, ctx).sample, merged_pipe.unet(x, t, ctx).sample
        ta, tb = pipe.text_encoder(ids).last_hidden_state, merged_pipe.text_encoder(ids).last_hidden_state
        base = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None).unet(x, t, ctx).sample
    assert not torch.allclose(a, base, atol=1e-6)  # the LoRA changed the model
    assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
    assert torch.allclose(ta, tb, atol=1e-5), (ta - tb).abs().max()


def _losses(out_dir, name):
    with open(os.path.join(out_dir, f"{name}_losses.json")) as f:
        return json.load(f)


def test_resume_repeats_the_uninterrupted_run(tiny_sd, dataset, tmp_path):
    common = [
        "--pretrained_model_name_or_path",
        tiny_sd,
        "--dataset_config",
        dataset,
        "--output_name",
        "r",
        "--max_train_steps",
        6,
        "--lr_scheduler",
        "cosine",
        "--lr_warmup_steps",
        2,
        "--network_dropout",
        "0.1",
        "--shuffle_caption",
        "--flip_aug",
        *BASE,
    ]
    full, part = tmp_path / "full", tmp_path / "part"
    launch(*common, "--output_dir", full)
    launch(*common, "--output_dir", part, "--save_every_n_steps", 3, "--save_state")
    state = part / "r-step00000003-state"
    assert state.is_dir() and json.loads((state / "train_state.json").read_text())["current_step"] == 3
    resumed = tmp_path / "resumed"
    launch(*common, "--output_dir", resumed, "--resume", state)
    full_losses = _losses(full, "r")["losses"]
    history = _losses(resumed, "r")  # the state carries the losses of steps 1-3
    assert history["first_step"] == 1 and history["losses"] == full_losses and len(full_losses) == 6
    a, b = load_file(str(full / "r.safetensors")), load_file(str(resumed / "r.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_two_processes_equal_one_with_twice_the_batch(tiny_sd, tmp_path):
    root = tmp_path / "ddp"
    for i in range(5):
        write_caption(write_image(root / "img" / f"{i}.png", (64, 64), (40 * i, 90, 200 - 30 * i)), f"item {i}")

    def config(batch):
        path = root / f"b{batch}.toml"
        path.write_text(
            f"[general]\ncaption_extension = '.txt'\nresolution = 64\nbatch_size = {batch}\n"
            f"[[datasets]]\n  [[datasets.subsets]]\n  image_dir = '{root / 'img'}'\n  num_repeats = 1\n"
        )
        return path

    # plain SGD: Adam divides by tiny second moments and turns float summation-order noise into visible differences
    common = [
        "--pretrained_model_name_or_path",
        tiny_sd,
        "--output_name",
        "d",
        "--max_train_steps",
        3,
        *BASE,
        "--optimizer_type",
        "SGDNesterov",
        "--learning_rate",
        "0.5",
    ]
    launch(*common, "--dataset_config", config(1), "--output_dir", tmp_path / "two", processes=2)
    launch(*common, "--dataset_config", config(2), "--output_dir", tmp_path / "one")
    a, b = load_file(str(tmp_path / "two" / "d.safetensors")), load_file(str(tmp_path / "one" / "d.safetensors"))
    assert a.keys() == b.keys()
    changed = [k for k in a if k.endswith("lora_up.weight") and a[k].abs().max() > 0]
    assert changed  # training happened
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=1e-4), (k, (a[k] - b[k]).abs().max())
    # the logged loss of a step is the mean over both processes' samples, not the main process's share
    logged = [json.loads((tmp_path / run / "d_losses.json").read_text())["losses"] for run in ("two", "one")]
    assert logged[0] == pytest.approx(logged[1], rel=1e-5)


def _fail(*args):
    """Run a training that must fail; return its output, checked to hold no traceback from kiln's own code."""
    res = launch(*args, check=False)
    assert res.returncode != 0
    msg = res.stdout + res.stderr
    assert f'File "{ROOT}/library' not in msg and "error:" in msg, msg[-3000:]
    return msg


def test_bad_inputs_fail_early_with_clear_messages(tiny_sd, dataset, tmp_path):
    out = ["--output_dir", tmp_path / "o", "--dataset_config", dataset, *BASE]
    msg = _fail("--pretrained_model_name_or_path", tmp_path / "nope.safetensors", *out)
    assert "nope.safetensors" in msg
    msg = _fail("--pretrained_model_name_or_path", tiny_sd, *out, "--network_module", "networks.not_there")
    assert "networks.not_there" in msg
    msg = _fail("--pretrained_model_name_or_path", tiny_sd, *out, "--t5xxl", "t5.safetensors")
    assert "--t5xxl" in msg and "flux_train_network.py" in msg
    sdxl = tmp_path / "sdxl.safetensors"
    from safetensors.torch import save_file

    save_file(
        {
            "conditioner.embedders.1.model.ln_final.weight": torch.zeros(4),
            "model.diffusion_model.label_emb.0.0.weight": torch.zeros(4, 4),
        },
        str(sdxl),
    )
    msg = _fail("--pretrained_model_name_or_path", sdxl, *out)
    assert "sdxl_train_network.py" in msg
    prompts = tmp_path / "bad_prompts.txt"
    prompts.write_text("a cat --w abc\n")
    msg = _fail("--pretrained_model_name_or_path", tiny_sd, *out, "--sample_prompts", prompts, "--sample_every_n_steps", 1)
    assert "bad_prompts.txt" in msg and ":1" in msg and "steps:" not in msg  # refused before training started
    assert not (tmp_path / "o" / "last.safetensors").exists()


def test_nan_loss_stops_and_keeps_the_last_checkpoint(tiny_sd, dataset, tmp_path):
    out = tmp_path / "nan"
    msg = _fail(
        "--pretrained_model_name_or_path",
        tiny_sd,
        "--dataset_config",
        dataset,
        "--output_dir",
        out,
        "--output_name",
        "n",
        "--max_train_steps",
        6,
        "--save_every_n_steps",
        1,
        *BASE,
        "--optimizer_type",
        "SGDNesterov",
        "--learning_rate",
        "1e36",
        "--max_grad_norm",
        "0",
    )
    assert "at step" in msg
    step = int(msg.split("at step ")[1].split(";")[0])
    assert step >= 2
    kept = load_file(str(out / f"n-step{step - 1:08d}.safetensors"))
    assert kept and not (out / "n.safetensors").exists()


def test_failed_save_keeps_previous_files(tiny_sd, dataset, tmp_path):
    out = tmp_path / "fs"
    (out / "f.safetensors").mkdir(parents=True)  # the final file cannot be written where a folder is
    msg = _fail(
        "--pretrained_model_name_or_path",
        tiny_sd,
        "--dataset_config",
        dataset,
        "--output_dir",
        out,
        "--output_name",
        "f",
        "--max_train_steps",
        2,
        "--save_every_n_steps",
        1,
        *BASE,
    )
    assert "cannot write" in msg
    assert load_file(str(out / "f-step00000002.safetensors")) and load_file(str(out / "f-step00000001.safetensors"))
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]


def test_latent_cache_tool_and_cached_training_equal_uncached(tiny_sd, dataset, tmp_path):
    common = [
        "--pretrained_model_name_or_path",
        tiny_sd,
        "--dataset_config",
        dataset,
        "--output_name",
        "c",
        "--max_train_steps",
        3,
        *BASE,
    ]
    res = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "tools", "cache_latents.py"),
            "--pretrained_model_name_or_path",
            tiny_sd,
            "--dataset_config",
            dataset,
            "--vae_batch_size",
            "2",
        ],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    img_dir = os.path.dirname(open(dataset).read().split("image_dir = '")[1].split("'")[0] + "/x")
    caches = sorted(p for p in os.listdir(img_dir) if p.endswith("_sd.safetensors"))
    assert caches == [
        "0_0064x0064_sd.safetensors",
        "1_0064x0064_sd.safetensors",
        "2_0064x0064_sd.safetensors",
        "3_0064x0064_sd.safetensors",
    ]
    with safe_open(os.path.join(img_dir, caches[0]), framework="pt") as f:
        assert set(f.keys()) == {"mean", "std"} and f.get_tensor("mean").shape == (4, 8, 8)
        assert json.loads(f.metadata()["bucket"]) == [64, 64]
    mtimes = {p: os.path.getmtime(os.path.join(img_dir, p)) for p in caches}
    launch(*common, "--output_dir", tmp_path / "cached", "--cache_latents_to_disk")
    assert {p: os.path.getmtime(os.path.join(img_dir, p)) for p in caches} == mtimes  # valid caches reused, not rewritten
    launch(*common, "--output_dir", tmp_path / "plain")
    a, b = load_file(str(tmp_path / "cached" / "c.safetensors")), load_file(str(tmp_path / "plain" / "c.safetensors"))
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k
    # an edited image makes its cache stale: it is rebuilt
    from PIL import Image

    Image.new("RGB", (64, 64), (1, 2, 3)).save(os.path.join(img_dir, "1.png"))
    launch(*common, "--output_dir", tmp_path / "again", "--cache_latents_to_disk")
    assert os.path.getmtime(os.path.join(img_dir, "1_0064x0064_sd.safetensors")) > mtimes["1_0064x0064_sd.safetensors"]
    assert os.path.getmtime(os.path.join(img_dir, "0_0064x0064_sd.safetensors")) == mtimes["0_0064x0064_sd.safetensors"]


def test_samples_validation_logs_and_config_file(tiny_sd, dataset, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(
        "# comment\na red shape --w 64 --h 64 --s 2 --d 3\na green shape --n blurry --w 64 --h 128 --s 2 --ss euler_a\n"
    )
    out = tmp_path / "s"
    config = tmp_path / "args.toml"
    launch(
        "--pretrained_model_name_or_path",
        tiny_sd,
        "--dataset_config",
        dataset,
        "--output_dir",
        out,
        "--output_name",
        "s",
        "--max_train_steps",
        4,
        *BASE,
        "--sample_prompts",
        prompts,
        "--sample_every_n_steps",
        2,
        "--sample_at_first",
        "--validation_split",
        "0.5",
        "--validate_every_n_steps",
        2,
        "--logging_dir",
        out / "logs",
        "--log_prefix",
        "run_",
        "--config_file",
        config,
        "--output_config",
    )
    assert config.is_file() and not out.exists()  # --output_config writes the arguments and stops
    launch("--config_file", config)
    names = sorted(os.listdir(out / "sample"))
    assert len(names) == 6  # 2 prompts at steps 0, 2 and 4
    assert all(n.startswith("s_") and n.endswith(".png") for n in names)
    assert [n.split("_")[1] for n in names[::2]] == ["000000", "000002", "000004"]
    assert any(n.endswith("_3.png") for n in names)  # the seed of --d 3 is in the name
    from PIL import Image

    assert {Image.open(out / "sample" / n).size for n in names} == {(64, 64), (64, 128)}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (run,) = os.listdir(out / "logs")
    assert run.startswith("run_")
    events = EventAccumulator(str(out / "logs" / run / "network_train"))  # accelerate: one folder per tracker name
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {
        "loss/current",
        "loss/average",
        "lr/unet",
        "lr/textencoder",
        "loss/validation/step_average",
        "loss/validation/step_divergence",
    } <= tags
    assert [e.step for e in events.Scalars("loss/current")] == [1, 2, 3, 4]
    assert [e.step for e in events.Scalars("loss/validation/step_average")] == [2, 4]


def test_single_file_model_continue_from_weights_and_dim_from_weights(tiny_sd, dataset, trained, tmp_path):
    from library.sd_models import load_sd_model, save_sd_single_file
    from library.tiny_models import write_tiny_clip_tokenizer

    single = tmp_path / "tiny.safetensors"
    save_sd_single_file(str(single), load_sd_model(tiny_sd), v2=False)
    tokenizers = tmp_path / "tokenizers"
    write_tiny_clip_tokenizer(str(tokenizers / "openai_clip-vit-large-patch14"))
    out = tmp_path / "w"
    launch(
        "--pretrained_model_name_or_path",
        single,
        "--tokenizer_cache_dir",
        tokenizers,
        "--dataset_config",
        dataset,
        "--output_dir",
        out,
        "--output_name",
        "w",
        "--max_train_steps",
        1,
        *BASE,
        "--network_args",
        "conv_dim=2",
        "conv_alpha=1",
        "--network_weights",
        trained,
        "--max_grad_norm",
        "0",
    )
    start, after = load_file(trained), load_file(str(out / "w.safetensors"))
    assert start.keys() == after.keys()
    # one AdamW step of lr 1e-3 moves each weight by at most about 1e-3 (plus decay): training went on from the file
    assert all((start[k] - after[k]).abs().max() < 1.2e-3 for k in start if not k.endswith(".alpha"))
    assert any((start[k] - after[k]).abs().max() > 1e-4 for k in start)
    launch(
        "--pretrained_model_name_or_path",
        single,
        "--tokenizer_cache_dir",
        tokenizers,
        "--dataset_config",
        dataset,
        "--output_dir",
        out,
        "--output_name",
        "d",
        "--max_train_steps",
        1,
        *BASE,
        "--network_weights",
        trained,
        "--dim_from_weights",
        "--network_train_unet_only",
    )
    d = load_file(str(out / "d.safetensors"))
    assert d["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"].shape == (2, 32, 3, 3)
    assert not any(k.startswith("lora_te_") for k in d)


def test_merge_two_loras_into_one(trained, tmp_path):
    from networks.lora import lora_delta

    a = load_file(trained)
    b = {k: v * (1.5 if k.endswith("lora_up.weight") else 1.0) for k, v in a.items()}
    b_path = tmp_path / "b.safetensors"
    from safetensors.torch import save_file

    save_file(b, str(b_path))
    for extra, name in ((["--concat"], "cat.safetensors"), ([], "svd.safetensors")):
        res = subprocess.run(
            [
                sys.executable,
                os.path.join(ROOT, "tools", "merge_lora.py"),
                "--models",
                trained,
                str(b_path),
                "--ratios",
                "1",
                "0.5",
                "--save_to",
                str(tmp_path / name),
                *extra,
            ],
            capture_output=True,
            text=True,
            env=ENV,
        )
        assert res.returncode == 0, res.stderr
        m = load_file(str(tmp_path / name))
        for key in [k for k in a if k.endswith(".lora_down.weight")]:
            base = key[: -len(".lora_down.weight")]

            def d(sd, base=base):
                return lora_delta(
                    sd[base + ".lora_down.weight"].float(),
                    sd[base + ".lora_up.weight"].float(),
                    sd[base + ".alpha"].item() / sd[base + ".lora_down.weight"].shape[0],
                )

            assert torch.allclose(d(m), d(a) + 0.5 * d(b), atol=1e-6), (name, key)
    res = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "tools", "merge_lora.py"),
            "--models",
            trained,
            "--save_to",
            str(tmp_path / "cat.safetensors"),
        ],
        capture_output=True,
        text=True,
        env=ENV,
    )
    assert res.returncode != 0 and "already exists" in res.stderr


def third_party_lines(stderr: str) -> list[str]:
    """The lines of a run's stderr that kiln did not write: anything but kiln's log records (`LEVEL kiln: ...`,
    `LEVEL library.x: ...`, `LEVEL networks.x: ...`) and tqdm progress bars. accelerate's launcher notice about
    default values would count too: launch_script passes every value, so it does not appear."""
    text = re.sub(r"\](?=(DEBUG|INFO|WARNING|ERROR|CRITICAL) )", "]\n", stderr)  # a log line right after a bar
    own = re.compile(r"^((DEBUG|INFO|WARNING|ERROR|CRITICAL) (kiln|library(\.\w+)+|networks(\.\w+)+): |[\w ]+:\s+\d+%\|)")
    return [ln for ln in re.split(r"[\r\n]+", text) if ln.strip() and not own.match(ln)]


def test_readme_main_job_command(tmp_path):
    """The README's demo command, as written there (fewer steps), with the bundled dataset and built-in tiny model."""
    import shlex

    line = next(ln for ln in open(os.path.join(ROOT, "README.md")) if ln.startswith("accelerate launch train_network.py"))
    args = shlex.split(line)[3:]
    for flag, value in (
        ("--output_dir", tmp_path / "demo"),
        ("--logging_dir", tmp_path / "logs"),
        ("--max_train_steps", 4),
        ("--sample_every_n_steps", 2),
    ):
        args[args.index(flag) + 1] = str(value)
    # Python's default warning filter (DeprecationWarnings shown once per place), as a developer sees a run
    res = launch_script("train_network.py", *args, env={"PYTHONWARNINGS": "default"})
    assert third_party_lines(res.stderr) == []
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    lora_path = str(tmp_path / "demo" / "demo.safetensors")
    lora = load_file(lora_path)
    with safe_open(lora_path, framework="pt") as f:
        md = f.metadata()
    assert md["ss_steps"] == "4" and md["ss_network_dim"] == "8" and md["ss_network_alpha"] == "4.0"
    ups = [k for k in lora if k.endswith(".lora_up.weight")]
    assert any(k.startswith("lora_unet_") for k in ups) and any(k.startswith("lora_te_") for k in ups)
    assert all(lora[k.replace("lora_up", "lora_down")].shape[0] == 8 for k in ups)
    assert any(lora[k].abs().max() > 0 for k in ups)  # trained: up starts at zero
    # two prompts (256 x 256) at steps 2 and 4, sd-scripts' names
    samples = sorted(os.listdir(tmp_path / "demo" / "sample"))
    assert [n.split("_")[1:3] for n in samples] == [["000002", "00"], ["000002", "01"], ["000004", "00"], ["000004", "01"]]
    assert all(Image.open(tmp_path / "demo" / "sample" / n).size == (256, 256) for n in samples)
    (run_dir,) = os.listdir(tmp_path / "logs")
    events = EventAccumulator(str(tmp_path / "logs" / run_dir / "network_train"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss/current")] == [1, 2, 3, 4]


def test_sd2_v_prediction_bf16_checkpointing_accumulation_8bit_and_epochs(tmp_path):
    """SD 2.x v-prediction with most memory options at once, epoch checkpoints and pruning."""
    root = tmp_path / "d"
    for i in range(4):
        write_caption(write_image(root / f"2_thing/{i}.png", (64, 64), (60 * i, 50, 90)), f"thing {i}, (bright:1.2)")
    out = tmp_path / "o"
    launch(
        "--pretrained_model_name_or_path",
        "kiln-tiny-sd2",
        "--v2",
        "--v_parameterization",
        "--train_data_dir",
        root,
        "--resolution",
        "64",
        "--caption_extension",
        ".txt",
        "--output_dir",
        out,
        "--output_name",
        "v",
        "--max_train_epochs",
        3,
        "--save_every_n_epochs",
        1,
        "--save_last_n_epochs",
        1,
        "--mixed_precision",
        "bf16",
        "--gradient_checkpointing",
        "--gradient_accumulation_steps",
        2,
        "--optimizer_type",
        "AdamW8bit",
        "--weighted_captions",
        "--clip_skip",
        2,
        "--max_token_length",
        150,
        "--min_snr_gamma",
        5,
        "--noise_offset",
        "0.05",
        "--save_precision",
        "fp16",
        *BASE,
    )
    files = sorted(os.listdir(out))
    assert "v.safetensors" in files and "v-000002.safetensors" in files and "v-000001.safetensors" not in files
    sd = load_file(str(out / "v.safetensors"))
    assert all(v.dtype == torch.float16 for v in sd.values())
    with safe_open(str(out / "v.safetensors"), framework="pt") as f:
        md = f.metadata()
    assert md["ss_base_model_version"] == "sd_v2_v" and md["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"
    assert md["modelspec.prediction_type"] == "v" and md["ss_num_epochs"] == "3" and md["modelspec.encoder_layer"] == "2"
    # 8 samples / batch 1 = 8 batches per epoch, 2 per step: 4 steps per epoch
    assert md["ss_steps"] == "12" and md["ss_max_train_steps"] == "12"


def test_ckpt_format_step_pruning_workers_masked_loss_and_epoch_samples(tiny_sd, tmp_path):
    from PIL import Image

    root = tmp_path / "d"
    (root / "img").mkdir(parents=True)
    for i in range(4):
        rgba = Image.new("RGBA", (64, 64), (200, 40 * i, 90, 255))
        rgba.paste((0, 0, 0, 0), (0, 0, 32, 64))  # left half transparent
        rgba.save(root / "img" / f"{i}.png")
        write_caption(root / "img" / f"{i}.png", f"thing {i}")
    config = root / "d.toml"
    config.write_text(
        f"[general]\ncaption_extension = '.txt'\nresolution = 64\n[[datasets]]\n  [[datasets.subsets]]\n"
        f"  image_dir = '{root / 'img'}'\n  alpha_mask = true\n"
    )
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps([{"prompt": "a thing", "width": 64, "height": 64, "sample_steps": 2, "seed": 1}]))
    out = tmp_path / "o"
    base = list(BASE)
    base[base.index("--max_data_loader_n_workers") + 1] = "2"
    launch(
        "--pretrained_model_name_or_path",
        tiny_sd,
        "--dataset_config",
        config,
        "--output_dir",
        out,
        "--output_name",
        "k",
        "--max_train_epochs",
        2,
        "--save_every_n_steps",
        2,
        "--save_last_n_steps",
        2,
        "--save_model_as",
        "ckpt",
        "--masked_loss",
        "--sample_prompts",
        prompts,
        "--sample_every_n_epochs",
        1,
        "--network_train_text_encoder_only",
        "--log_config",
        "--logging_dir",
        out / "logs",
        *base,
    )
    files = sorted(os.listdir(out))
    # 4 steps per epoch, 8 in all: step checkpoints at 2, 4, 6, 8; with --save_last_n_steps 2 only 6 and 8 remain
    assert [f for f in files if f.startswith("k-step")] == ["k-step00000006.ckpt", "k-step00000008.ckpt"]
    sd = torch.load(out / "k.ckpt", weights_only=True)
    assert sd and all(k.startswith("lora_te_") for k in sd)
    samples = sorted(os.listdir(out / "sample"))
    # samples by epochs are named by the epoch, the last one's at the end of training too (sd-scripts' names)
    assert sorted(n.split("_")[1] for n in samples) == ["e000001", "e000002"]


def test_dataset_network_multiplier_scales_the_adapter(tiny_sd, dataset, tmp_path):
    """network_multiplier = -1 (dataset config): the first SGD step from up = 0 is exactly the negative of the step with
    multiplier 1 (gradient of up = multiplier x G; the forward is the same while up is 0), down unchanged."""
    text = open(dataset).read()
    runs = {}
    for m in (1.0, -1.0):
        config = tmp_path / f"m{m}.toml"
        config.write_text(text.replace("batch_size = 2", f"batch_size = 2\nnetwork_multiplier = {m}"))
        out = tmp_path / f"m{m}"
        launch("--pretrained_model_name_or_path", tiny_sd, "--dataset_config", config, "--output_dir", out, "--output_name", "m",
               "--max_train_steps", 1, *BASE, "--optimizer_type", "SGDNesterov", "--max_grad_norm", 0)
        runs[m] = load_file(str(out / "m.safetensors"))
    ups = [k for k in runs[1.0] if k.endswith("lora_up.weight")]
    assert ups and any(runs[1.0][k].abs().sum() > 0 for k in ups)
    for k, v in runs[1.0].items():
        expected = -v if k.endswith("lora_up.weight") else v
        assert torch.equal(runs[-1.0][k], expected), k


def test_activation_offload_changes_no_number_on_sd(tiny_sd, dataset, tmp_path):
    """--cpu_offload_checkpointing works for the U-Net too (sd-scripts crashes there): same LoRA as plain checkpointing."""
    runs = {}
    for name, extra in {"plain": [], "offload": ["--cpu_offload_checkpointing"]}.items():
        out = tmp_path / name
        launch("--pretrained_model_name_or_path", tiny_sd, "--dataset_config", dataset, "--output_dir", out, "--output_name", "c",
               "--max_train_steps", 2, "--gradient_checkpointing", *extra, *BASE)
        runs[name] = load_file(str(out / "c.safetensors"))
    assert runs["plain"].keys() == runs["offload"].keys()
    assert all(torch.equal(runs["plain"][k], runs["offload"][k]) for k in runs["plain"])
