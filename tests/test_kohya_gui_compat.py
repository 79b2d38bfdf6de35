"""End to end: train_network.py trains from what the kohya_ss GUI hands it, through `accelerate launch` on the built-in
tiny SD 1.x: a long command line of sd-scripts options written as the GUI writes them (`--name=value`, flags alone,
values as strings), and the same settings as a GUI-style `--config_file` TOML (flat keys and sections, the GUI's own
keys, numbers as strings, empty strings for unset fields).

Every option on the command line and every option key of the file is checked against sd-scripts' own list
(tests/data/sd-scripts-flags.tsv), values against its choices, so these runs use nothing sd-scripts would refuse.
Tiny images (64 px) and 4 steps keep each run short."""

from __future__ import annotations

import csv
import os

import pytest
import torch
from conftest import ROOT, launch_script, write_caption, write_image
from safetensors import safe_open

from library.train_args import GUI_ONLY_KEYS

STEPS = 4  # 2 images x 1 repeat, batch 1: 2 steps per epoch, so 2 epochs


def sd_scripts_options(script: str) -> dict[str, list[str]]:
    """--flag -> its TSV row (flag, type, nargs, default, choices, scripts) for the options `script` has."""
    with open(os.path.join(ROOT, "tests", "data", "sd-scripts-flags.tsv"), newline="") as f:
        rows = [r for r in csv.reader(f, delimiter="\t") if r and not r[0].startswith("#") and r[0] != "flag"]
    return {r[0]: r for r in rows if r[5] == "ALL" or script in r[5].split(",")}


def options_of(argv: list[str]) -> dict[str, str | None]:
    """The options of a command line as {--flag: value or None}, for both `--name=value` and `--name value`."""
    out, i = {}, 0
    while i < len(argv):
        item = argv[i]
        assert item.startswith("--"), f"stray value {item!r}"
        if "=" in item:
            flag, value = item.split("=", 1)
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            flag, value = item, argv[i + 1]
            i += 1
        else:
            flag, value = item, None
        assert flag not in out, f"{flag} twice"
        out[flag] = value
        i += 1
    return out


def assert_real_sd_scripts_option(rows: dict, flag: str, value) -> None:
    assert flag in rows, f"{flag} is not an option of sd-scripts' train_network.py"
    kind, choices = rows[flag][1], rows[flag][4]
    if kind == "flag":
        assert value in (None, True, False), f"{flag} takes no value"
        return
    assert value is not None, f"{flag} needs a value"
    if choices:
        assert str(value) in choices.split(","), f"{flag} {value}: sd-scripts accepts only {choices}"


def gui_dataset(tmp_path):
    """A GUI-style image folder: train_data_dir/<repeats>_<class> with images and .txt captions (one image larger than
    the resolution, so it is scaled down into the bucket)."""
    root = tmp_path / "img"
    for i, size in enumerate([(64, 64), (96, 96)]):
        write_caption(write_image(root / "1_sks dog" / f"{i}.png", size, (60 * i + 40, 90, 30)), f"sks dog, photo {i}")
    return root


def gui_command_line(tiny_sd: str, data, out) -> list[str]:
    """What the kohya_ss GUI (LoRA tab, Standard) puts after train_network.py, option for option, in its own spelling."""
    return [
        "--enable_bucket",
        "--min_bucket_reso=64",  # the GUI's 256 needs a resolution of 256 at least, in sd-scripts as in kiln
        "--max_bucket_reso=2048",
        f"--pretrained_model_name_or_path={tiny_sd}",
        f"--train_data_dir={data}",
        "--resolution=64,64",
        f"--output_dir={out}",
        f"--logging_dir={out / 'log'}",
        "--network_alpha=1",
        "--save_model_as=safetensors",
        "--network_module=networks.lora",
        "--text_encoder_lr=5e-05",
        "--unet_lr=0.0001",
        "--network_dim=8",
        "--output_name=gui_lora",
        "--lr_scheduler_num_cycles=1",
        "--no_half_vae",
        "--learning_rate=0.0001",
        "--lr_scheduler=cosine",
        "--lr_warmup_steps=0",
        "--train_batch_size=1",
        f"--max_train_steps={STEPS}",
        "--save_every_n_epochs=1",
        "--mixed_precision=bf16",  # fp16 is refused on CPU; the GUI writes what is chosen
        "--save_precision=fp16",
        "--seed=1234",
        "--caption_extension=.txt",
        "--cache_latents",
        "--cache_latents_to_disk",
        "--optimizer_type=AdamW8bit",
        "--max_grad_norm=1",
        "--max_data_loader_n_workers=0",
        "--max_token_length=150",  # the GUI writes it only above 75; sd-scripts' choices are 150 and 225
        "--clip_skip=2",
        "--bucket_reso_steps=64",
        "--min_snr_gamma=5",
        "--xformers",
        "--bucket_no_upscale",
        "--noise_offset=0.05",
        "--multires_noise_discount=0.3",
        "--prior_loss_weight=1",
        "--gradient_accumulation_steps=1",
        "--huber_c=0.1",
        "--huber_schedule=snr",
        "--loss_type=l2",
        "--max_timestep=1000",
        "--min_timestep=0",
        "--lr_scheduler_power=1",
        "--log_with=tensorboard",
        "--lowram",
        "--training_comment=kohya_ss GUI run",
        "--metadata_title=GUI LoRA",
        "--metadata_author=kiln tests",
        "--metadata_description=trained from a kohya_ss GUI command line",
        "--metadata_license=CreativeML Open RAIL-M",
        "--metadata_tags=dog, test",
    ]


def check_lora(path, expect_clip_skip="2"):
    with safe_open(str(path), framework="pt") as f:
        md = f.metadata()
        dtypes = {f.get_tensor(k).dtype for k in f.keys()}
        keys = list(f.keys())
    assert dtypes == {torch.float16}  # --save_precision fp16
    assert any(k.startswith("lora_te_") for k in keys) and any(k.startswith("lora_unet_") for k in keys)  # TE trained
    assert md["ss_network_dim"] == "8" and float(md["ss_network_alpha"]) == 1.0
    assert md["ss_network_module"] == "networks.lora"
    assert md["ss_clip_skip"] == expect_clip_skip and md["ss_max_token_length"] == "150"
    assert md["ss_max_train_steps"] == str(STEPS) and md["ss_num_epochs"] == "2"
    assert "AdamW8bit" in md["ss_optimizer"] and md["ss_mixed_precision"] == "bf16"
    assert md["ss_lr_scheduler"] == "cosine" and float(md["ss_unet_lr"]) == 1e-4
    assert md["ss_seed"] == "1234" and md["ss_cache_latents"] == "True" and md["ss_loss_type"] == "l2"
    assert float(md["ss_noise_offset"]) == 0.05 and float(md["ss_min_snr_gamma"]) == 5.0
    assert md["ss_training_comment"] == "kohya_ss GUI run" and md["ss_num_train_images"] == "2"
    assert md["modelspec.title"] == "GUI LoRA" and md["modelspec.author"] == "kiln tests"
    return md


@pytest.mark.slow
def test_gui_command_line_of_sd_scripts_options_trains(tiny_sd, tmp_path):
    data, out = gui_dataset(tmp_path), tmp_path / "model"
    argv = gui_command_line(tiny_sd, data, out)
    options = options_of(argv)
    rows = sd_scripts_options("train_network")
    for flag, value in options.items():
        assert_real_sd_scripts_option(rows, flag, value)
    assert len(options) >= 41, len(options)

    res = launch_script("train_network.py", *argv)
    assert res.returncode == 0
    md = check_lora(out / "gui_lora.safetensors")
    assert md["ss_text_encoder_lr"] == "[5e-05]"  # a list option in sd-scripts (nargs *), written as sd-scripts does
    assert os.path.isfile(out / "gui_lora-000001.safetensors")  # --save_every_n_epochs 1 (epoch 2 is the final file)
    caches = [n for n in os.listdir(data / "1_sks dog") if n.endswith(".safetensors")]
    assert len(caches) == 2  # --cache_latents_to_disk: next to the images
    assert os.listdir(out / "log")  # --log_with tensorboard --logging_dir


GUI_TOML = """\
LoRA_type = "Standard"
LyCORIS_preset = "full"
additional_parameters = ""
adaptive_noise_scale = 0
bucket_no_upscale = true
bucket_reso_steps = 64
cache_latents = true
cache_latents_to_disk = true
caption_extension = ".txt"
clip_skip = "2"
epoch = 1
enable_bucket = true
gradient_accumulation_steps = 1
huber_c = 0.1
huber_schedule = "snr"
learning_rate = "0.0001"
log_with = ""
loss_type = "l2"
lr_scheduler = "cosine"
lr_scheduler_num_cycles = "1"
lr_scheduler_power = 1
lr_warmup = 0
lr_warmup_steps = 0
max_bucket_reso = 2048
max_data_loader_n_workers = "0"
max_grad_norm = 1
max_resolution = "64,64"
max_timestep = 1000
max_token_length = 150
max_train_steps = "{steps}"
min_bucket_reso = 64
min_snr_gamma = 5
min_timestep = 0
mixed_precision = "bf16"
multires_noise_discount = 0.3
multires_noise_iterations = 0
network_alpha = 1
network_dim = 8
network_module = "networks.lora"
noise_offset = 0.05
noise_offset_type = "Original"
optimizer = "AdamW8bit"
optimizer_args = ""
optimizer_type = "AdamW8bit"
prior_loss_weight = 1
resolution = "64,64"
sample_prompts = ""
save_every_n_epochs = 1
save_model_as = "safetensors"
save_precision = "fp16"
sdxl = false
seed = 1234
text_encoder_lr = 5e-05
train_batch_size = 1
training_comment = "kohya_ss GUI run"
unet_lr = 0.0001
vae = ""
xformers = true
lowram = true
metadata_title = "GUI LoRA"
metadata_author = "kiln tests"
metadata_description = ""
metadata_license = ""
metadata_tags = ""

[model]
pretrained_model_name_or_path = "{model}"
output_name = "gui_toml"

[folders]
train_data_dir = "{data}"
output_dir = "{out}"
logging_dir = ""
"""


@pytest.mark.slow
def test_gui_config_file_trains_with_one_warning_naming_the_gui_keys(tiny_sd, tmp_path):
    import toml

    data, out = gui_dataset(tmp_path), tmp_path / "model"
    text = GUI_TOML.format(steps=STEPS, model=tiny_sd, data=data, out=out).replace("\\", "\\\\")
    path = tmp_path / "config_lora.toml"
    path.write_text(text)

    def flat(table):
        return {k: w for k, v in table.items() for k, w in (flat(v).items() if isinstance(v, dict) else [(k, v)])}

    keys = flat(toml.load(path))
    gui_keys = [k for k in keys if k in GUI_ONLY_KEYS]
    assert gui_keys == ["LoRA_type", "LyCORIS_preset", "additional_parameters", "epoch", "lr_warmup", "max_resolution",
                        "noise_offset_type", "optimizer", "sdxl"]  # fmt: skip
    rows = sd_scripts_options("train_network")
    for key, value in keys.items():
        if key not in GUI_ONLY_KEYS and value != "":
            assert_real_sd_scripts_option(rows, "--" + key, value)

    res = launch_script("train_network.py", "--config_file", path)
    assert res.returncode == 0
    md = check_lora(out / "gui_toml.safetensors")
    assert md["ss_text_encoder_lr"] == "[5e-05]"
    assert os.path.isfile(out / "gui_toml-000001.safetensors")
    log = (res.stdout + res.stderr).splitlines()
    warnings = [line for line in log if "--config_file" in line and "ignoring" in line]
    assert len(warnings) == 1, warnings
    named = warnings[0].split("): ")[-1].split(", ")
    assert named == gui_keys
    assert not os.path.exists(out / "log")  # logging_dir = "": unset, no tracker
