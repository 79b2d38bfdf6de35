"""Every option of sd-scripts' LoRA scripts parses in kiln's (tests/data/sd-scripts-flags.tsv lists them all), and
each either works, logs what kiln does instead, or stops the run before anything loads."""

from __future__ import annotations

import base64
import csv
import logging
import os

import pytest
from conftest import ROOT, launch_script, write_caption, write_image
from safetensors import safe_open

SCRIPTS = {"train_network": "sd", "sdxl_train_network": "sdxl", "flux_train_network": "flux", "sd3_train_network": "sd3"}
# the whole-model scripts: family and the library.method_full script spec
FULL_SCRIPTS = {
    "train_db": ("sd", "DREAMBOOTH"),
    "fine_tune": ("sd", "FINE_TUNE"),
    "sdxl_train": ("sdxl", "SDXL"),
    "flux_train": ("flux", "FLUX"),
    "sd3_train": ("sd3", "SD3"),
}


def family_of(arch: str):
    from library.family_flux import FluxFamily
    from library.family_sd import SdFamily
    from library.family_sd3 import Sd3Family
    from library.family_sdxl import SdxlFamily

    return {"sd": SdFamily, "sdxl": SdxlFamily, "flux": FluxFamily, "sd3": Sd3Family}[arch]()


def sd_scripts_options(script: str) -> list[list[str]]:
    """The TSV's rows (flag, type, nargs, default, choices, scripts) of the options `script` has."""
    with open(os.path.join(ROOT, "tests", "data", "sd-scripts-flags.tsv"), newline="") as f:
        rows = [r for r in csv.reader(f, delimiter="\t") if r and not r[0].startswith("#") and r[0] != "flag"]
    return [r for r in rows if r[5] == "ALL" or script in r[5].split(",")]


@pytest.mark.parametrize("script", sorted(SCRIPTS) + sorted(FULL_SCRIPTS))
def test_every_sd_scripts_option_parses(script):
    from library import method_full
    from library.train_script import training_parser

    if script in FULL_SCRIPTS:
        arch, spec = FULL_SCRIPTS[script]
        parser = training_parser(family_of(arch), "test", method_full.FullMethod(getattr(method_full, spec)))
    else:
        parser = training_parser(family_of(SCRIPTS[script]), "test")
    actions = parser._option_string_actions
    rows = sd_scripts_options(script)
    assert len(rows) > 160
    if script in FULL_SCRIPTS:  # the TSV lists the LoRA scripts' choices for every script; sd-scripts' whole-model
        # scripts save with add_sd_saving_arguments (../shared/reference/sd-scripts-beyond-lora.md section 3)
        rows = [r[:4] + ["None,ckpt,safetensors,diffusers,diffusers_safetensors"] + r[5:] if r[0] == "--save_model_as" else r
                for r in rows]
    missing = [r[0] for r in rows if r[0] not in actions]
    assert not missing, f"{script} lacks {missing}"
    for flag, kind, nargs, _default, choices, _scripts in rows:
        action = actions[flag]
        assert (action.nargs == 0) == (kind == "flag"), flag
        if nargs:
            assert str(action.nargs) == nargs, flag
        if kind in ("int", "float"):
            assert action.type in (int, float), flag
        if choices and action.choices is not None:
            assert set(choices.split(",")) - {"None"} <= set(map(str, action.choices)), flag
        assert action.help, f"{flag} has no --help text"


def run_in_process(arch: str, argv: list[str], capsys) -> tuple[int, list[str]]:
    from library.train_script import run_network_training

    with pytest.raises(SystemExit) as e:
        run_network_training(family_of(arch), "test", argv)
    return e.value.code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize(
    "arch,flags,named",
    [
        ("sd", ["--deepspeed", "--zero_stage", "3"], "--deepspeed: kiln runs ZeRO stages 1 and 2"),
        ("sd", ["--huggingface_repo_id", "me/lora"], "--huggingface_repo_id: kiln does not upload"),
        ("sdxl", ["--dataset_class", "my.Dataset"], "--dataset_class: "),
        ("sd", ["--conditioning_data_dir", "masks"], "alpha channel"),
        ("flux", ["--model_type", "chroma"], "Chroma is not supported"),
    ],
)
def test_options_kiln_lacks_stop_before_anything_loads(arch, flags, named, tmp_path, capsys):
    argv = ["--pretrained_model_name_or_path", f"kiln-tiny-{arch}", "--output_dir", str(tmp_path / "o"), *flags]
    code, err = run_in_process(arch, argv, capsys)
    assert code == 1 and len(err) == 1 and err[0].startswith("error: ") and named in err[0], err
    assert not (tmp_path / "o").exists()  # stopped before the output folder (and any model) was made


def test_options_without_effect_say_what_kiln_does(caplog):
    from library.compat_args import check_compat_arguments
    from library.train_script import training_parser

    args = training_parser(family_of("flux"), "test").parse_args(["--lowram", "--ddp_static_graph", "--split_mode", "--model_type", "flux"])
    with caplog.at_level(logging.INFO, logger="kiln"):
        assert check_compat_arguments(args) == []
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3 and lines[0].startswith("--lowram: ") and "--blocks_to_swap" in lines[2]


def test_debug_dataset_shows_the_batches_without_a_model(tmp_path, capsys):
    from library.train_script import run_network_training

    for i in range(3):
        write_caption(write_image(tmp_path / "2_thing" / f"{i}.png", (64, 64), (60 * i, 90, 30)), f"thing {i}, red")
    argv = ["--pretrained_model_name_or_path", str(tmp_path / "missing.safetensors"), "--output_dir", str(tmp_path / "o"),
            "--train_data_dir", str(tmp_path), "--resolution", "64", "--caption_extension", ".txt", "--train_batch_size", "2",
            "--debug_dataset"]
    run_network_training(family_of("sd"), "test", argv)
    out = capsys.readouterr().out
    assert out.count("bucket 64x64") == 3 and out.count(": thing ") == 6  # 3 images x 2 repeats, batches of 2
    assert "3 batches per epoch" in out and not (tmp_path / "o").exists()


@pytest.mark.slow
def test_metadata_logging_and_checkpoint_options_work(tiny_sd, tmp_path):
    root = tmp_path / "d"
    for i in range(2):
        write_caption(write_image(root / "1_thing" / f"{i}.png", (64, 64), (90 * i, 60, 30)), f"thing {i}")
    thumb = write_image(tmp_path / "thumb.png", (8, 8), (1, 2, 3))
    trackers = tmp_path / "trackers.toml"
    trackers.write_text('[tensorboard]\nfilename_suffix = ".kiln"\n')
    log_file, out = tmp_path / "console.log", tmp_path / "o"
    res = launch_script(
        "train_network.py", "--pretrained_model_name_or_path", tiny_sd, "--train_data_dir", root, "--resolution", "64",
        "--caption_extension", ".txt", "--output_dir", out, "--output_name", "m", "--network_module", "networks.lora",
        "--max_data_loader_n_workers", "0", "--seed", "1", "--max_train_epochs", "4", "--save_n_epoch_ratio", "2",
        "--metadata_trigger_phrase", "sks thing", "--metadata_usage_hint", "weight 0.8", "--metadata_merged_from", "a, b",
        "--metadata_preprocessor", "none", "--metadata_is_negative_embedding", "False", "--metadata_thumbnail", thumb,
        "--console_log_file", log_file, "--console_log_simple", "--lowram", "--ddp_timeout", "30",
        "--logging_dir", out / "logs", "--log_tracker_config", trackers,
    )
    with safe_open(str(out / "m.safetensors"), framework="pt") as f:
        md = f.metadata()
    assert md["modelspec.trigger_phrase"] == "sks thing" and md["modelspec.usage_hint"] == "weight 0.8"
    assert md["modelspec.merged_from"] == "a, b" and md["modelspec.preprocessor"] == "none"
    assert md["modelspec.is_negative_embedding"] == "False"
    assert md["modelspec.thumbnail"] == "data:image/png;base64," + base64.b64encode(open(thumb, "rb").read()).decode()
    # 4 epochs, about 2 checkpoints: every 2 epochs (epoch 4 is the final file)
    assert sorted(n for n in os.listdir(out) if n.startswith("m-")) == ["m-000002.safetensors"]
    log = log_file.read_text().splitlines()
    assert "--lowram: kiln reads model files tensor by tensor already; --lowram changes nothing" in log  # simple format
    assert "--lowram" not in res.stderr  # the log went to the file
    (run,) = os.listdir(out / "logs")
    assert any(n.endswith(".kiln") for n in os.listdir(out / "logs" / run / "network_train"))  # tracker settings used
