"""`--config_file` / `--output_config` and the training parser's errors, in process (parsing only).

The files are the ones sd-scripts and the kohya_ss GUI write: flat keys named as options, optional sections, numbers
written as strings, lists for list options, and keys of the GUI's own that sd-scripts ignores.
"""

from __future__ import annotations

import logging

import pytest

from library.family_sd import SdFamily
from library.train_args import GUI_ONLY_KEYS, parse_args_with_config, setup_network_parser


def parser():
    p = setup_network_parser("test")
    SdFamily().add_arguments(p)
    return p


def parse(*argv):
    return parse_args_with_config(parser(), [str(a) for a in argv])


def fail(capsys, *argv) -> str:
    """The error of a parse that must fail: exit status 2 as argparse, one short message, no usage block."""
    with pytest.raises(SystemExit) as e:
        parse(*argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert "usage:" not in err and len(lines) == 2 and lines[1].endswith(" --help` for the options"), err
    return err


GUI_CONFIG = """
# as the kohya_ss GUI writes it: flat, strings for some numbers, its own keys mixed in
LoRA_type = "Standard"
additional_parameters = ""
epoch = 10
noise_offset_type = "Original"
lr_warmup = 0
optimizer = "AdamW8bit"
sdxl_cache_text_encoder_outputs = false
dynamo_backend = "no"
learning_rate = "1e-4"
unet_lr = 0.0001
text_encoder_lr = 5e-5
network_dim = 8
network_alpha = "4"
network_args = "conv_dim=4 conv_alpha=1"
max_train_epochs = 2.0
resolution = 512
sample_every_n_epochs = 1
save_every_n_epochs = "1"
shuffle_caption = true
mixed_precision = "bf16"
caption_extention = ".txt"
optimizer_type = "AdamW8bit"
vae = ""
log_with = ""

[model_arguments]  # sd-scripts' own examples use sections
pretrained_model_name_or_path = "C:\\\\models\\\\v1-5.safetensors"
"""


def test_gui_config_values_sections_and_one_warning(tmp_path, caplog):
    path = tmp_path / "gui.toml"
    path.write_text(GUI_CONFIG)
    with caplog.at_level(logging.WARNING):
        args = parse("--config_file", path, "--network_dim", 16)  # the command line wins
    assert args.learning_rate == 1e-4 and isinstance(args.learning_rate, float)
    assert args.unet_lr == 1e-4 and args.text_encoder_lr == [5e-5]  # a single value for a list option
    assert args.network_dim == 16 and args.network_alpha == 4.0
    assert args.network_args == ["conv_dim=4", "conv_alpha=1"]  # a string splits as on a command line
    assert args.max_train_epochs == 2 and isinstance(args.max_train_epochs, int)
    assert args.resolution == "512" and args.save_every_n_epochs == 1 and args.sample_every_n_epochs == 1
    assert args.shuffle_caption is True and args.mixed_precision == "bf16" and args.dynamo_backend == "no"
    assert args.caption_extension == ".txt" and args.optimizer_type == "AdamW8bit"
    assert args.pretrained_model_name_or_path == "C:\\models\\v1-5.safetensors"
    assert args.vae is None and args.log_with is None  # empty fields: not given
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    ignored = warnings[0].split(": ")[-1].split(", ")
    assert ignored == [
        "LoRA_type",
        "additional_parameters",
        "epoch",
        "noise_offset_type",
        "lr_warmup",
        "optimizer",
        "sdxl_cache_text_encoder_outputs",
    ]


def test_unknown_keys_outside_the_gui_list_are_ignored_unless_near_an_option(tmp_path, caplog, capsys):
    path = tmp_path / "c.toml"
    path.write_text('some_future_setting = 3\nlearning_rate = 0.001\n')
    with caplog.at_level(logging.WARNING):
        assert parse("--config_file", path).learning_rate == 0.001
    assert "some_future_setting" in caplog.text
    for key, option in (("learning_rat", "learning_rate"), ("network_dimm", "network_dim"), ("Learning_Rate", "learning_rate")):
        path.write_text(f"{key} = 1\n")
        err = fail(capsys, "--config_file", path)
        assert f"unknown key '{key}'; did you mean '{option}'?" in err
    # the GUI's own keys are never taken for typos, though some are close to an option
    assert {"noise_offset_type", "lr_warmup", "sdxl_no_half_vae", "max_resolution"} <= GUI_ONLY_KEYS
    path.write_text('noise_offset_type = "Multires"\nmax_resolution = "512,512"\n')
    parse("--config_file", path)


@pytest.mark.parametrize(
    "line, words",
    [
        ('network_dim = "eight"', ["network_dim", "invalid int value"]),
        ("network_dim = 7.5", ["network_dim", "invalid int value"]),
        ('mixed_precision = "fp32"', ["mixed_precision", "invalid choice", "bf16"]),
        ("shuffle_caption = 3", ["shuffle_caption", "true or false"]),
        ("learning_rate = true", ["learning_rate", "expects a float"]),
        ("output_name = [1, 2]", ["output_name", "one value"]),
        ("[[datasets]]\nresolution = 512", ["dataset config", "--dataset_config"]),
        ("learning_rate = ", ["cannot be parsed"]),
    ],
)
def test_bad_values_name_the_key(tmp_path, capsys, line, words):
    path = tmp_path / "bad.toml"
    path.write_text(line + "\n")
    err = fail(capsys, "--config_file", path)
    assert all(w in err for w in words), err


def test_output_config_round_trip(tmp_path, capsys):
    argv = [
        "--pretrained_model_name_or_path", "C:\\models\\a b\\x.safetensors",
        "--output_dir", "/tmp/ü ñ",
        "--output_name", 'say "hi"',
        "--learning_rate", "3e-05",
        "--text_encoder_lr", "1e-5", "2e-5",
        "--network_dim", "8",
        "--network_alpha", "0.5",
        "--network_args", "conv_dim=4", "algo=lora",
        "--shuffle_caption",
        "--mixed_precision", "bf16",
        "--resolution", "512,768",
        "--noise_offset", "0.0357",
        "--training_comment", "line one\nline two\ttab",
    ]  # fmt: skip
    path = tmp_path / "out.toml"
    with pytest.raises(SystemExit) as e:
        parse(*argv, "--config_file", path, "--output_config")
    assert e.value.code == 0 and path.is_file()
    capsys.readouterr()
    expected = vars(parse(*argv))
    got = vars(parse("--config_file", path))
    assert {k: v for k, v in got.items() if k != "config_file"} == {k: v for k, v in expected.items() if k != "config_file"}
    assert got["config_file"] == str(path)
    fail(capsys, *argv, "--config_file", path, "--output_config")  # never overwrites


def test_bad_command_line_prints_one_line_not_the_usage(capsys):
    err = fail(capsys, "--network_dim", "x")
    assert "argument --network_dim: invalid int value: 'x'" in err
    err = fail(capsys, "--netwrok_dim", "8")
    assert "unrecognized arguments: --netwrok_dim 8 (did you mean --network_dim?)" in err
    err = fail(capsys, "--mixed_precision", "fp32")
    assert "invalid choice" in err


def test_dynamo_backend_no_means_no_compilation(tmp_path):
    from library.train_script import training_parser
    from library.trainer import TrainingError, check_args

    def problems(*argv):
        args = parse_args_with_config(
            training_parser(SdFamily(), "t"),
            ["--pretrained_model_name_or_path", "kiln-tiny-sd", "--output_dir", str(tmp_path / "o"), *argv],
        )
        try:
            check_args(args, SdFamily())
        except TrainingError as e:
            return str(e)
        return ""

    assert "dynamo_backend" not in problems("--dynamo_backend", "no")
    assert "dynamo_backend" not in problems("--dynamo_backend", "NO")
    assert "add --torch_compile" in problems("--dynamo_backend", "eager")
    assert "leave out one of them" in problems("--dynamo_backend", "no", "--torch_compile")
