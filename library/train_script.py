"""Entry points shared by the training scripts and the cache tools: picking the model family, parsing, and turning
known failures into one clear error line and a non-zero exit."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys

from library.family import ModelFamily


def training_parser(family: ModelFamily, description: str, method=None) -> argparse.ArgumentParser:
    """The parser of a training script: kiln's flags, the training method's (adapter training by default), the
    family's, and the sd-scripts options kiln handles otherwise (library/compat_args.py), so that every sd-scripts
    option of that script parses."""
    from library.compat_args import add_compat_arguments
    from library.deepspeed_run import add_deepspeed_arguments
    from library.train_args import setup_training_parser

    parser = setup_training_parser(description, method)
    family.add_arguments(parser)
    add_deepspeed_arguments(parser)
    add_compat_arguments(parser, family.arch, getattr(method, "script_kind", "network"))
    return parser


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record is emitted (not the stream of the moment it was made)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup_console_logging(args) -> None:
    """sd-scripts' console options: --console_log_level, --console_log_file (the log goes there instead of the
    console), --console_log_simple (messages without level and logger name)."""
    fmt = "%(message)s" if args.console_log_simple else "%(levelname)s %(name)s: %(message)s"
    handler = logging.FileHandler(args.console_log_file, encoding="utf-8") if args.console_log_file else _StderrHandler()
    handler.setFormatter(logging.Formatter(fmt))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, args.console_log_level or "INFO"))


def run_network_training(family: ModelFamily, description: str, argv: list[str] | None = None) -> None:
    """A LoRA training script's main."""
    run_training(family, description, None, argv)


def run_training(family: ModelFamily, description: str, method=None, argv: list[str] | None = None) -> None:
    """A training script's main: parse, train with `method` (a library.method.TrainingMethod; adapter training by
    default), and turn known failures into one error line and a non-zero exit."""
    from library.run_control import stop_with_launcher
    from library.saving import SaveError
    from library.train_args import parse_args_with_config
    from library.trainer import TrainingInterrupted, train

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args_with_config(training_parser(family, description, method), argv)
    setup_console_logging(args)
    stop_with_launcher()
    try:
        train(args, family, method)
    except TrainingInterrupted as e:
        print(f"stopped: {e}", file=sys.stderr)
        sys.exit(128 + e.signum)
    except KeyboardInterrupt as e:
        print(f"stopped at once ({e or 'interrupt'}); files under their final names are complete", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)
    except (*tool_errors(), SaveError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


def detect_model_family(path: str | None) -> str:
    """The trainer family ("sd", "sdxl", "flux" or "sd3") of a model path or built-in name: single files by their keys,
    folders by model_index.json. Anything else (unknown) reads as "sd"; the SD loader then names the right script."""
    from library.checkpoint_files import detect_family, read_key_shapes
    from library.tiny_models import BUILTIN_FAMILY

    kinds = {"sdxl": "sdxl", "flux": "flux", "sd3": "sd3"}
    if not path:
        return "sd"
    if path in BUILTIN_FAMILY:
        return kinds.get(BUILTIN_FAMILY[path], "sd")
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "model_index.json")):
        with open(os.path.join(path, "model_index.json")) as f:
            name = json.load(f).get("_class_name", "")
        return "sdxl" if "XL" in name else "flux" if "Flux" in name else "sd3" if "StableDiffusion3" in name else "sd"
    if os.path.isfile(path) and path.endswith(".safetensors"):
        return kinds.get(detect_family(read_key_shapes(path)), "sd")
    return "sd"


# The cache tools' family switches: flag name -> (the model it names, the family's module, its class). Without one the
# family is detected from --pretrained_model_name_or_path (detect_model_family); SD 1.x/2.x has no switch.
TOOL_FAMILIES = {
    "sdxl": ("SDXL", "library.family_sdxl", "SdxlFamily"),
    "flux": ("FLUX.1", "library.family_flux", "FluxFamily"),
    "sd3": ("SD3 / SD3.5", "library.family_sd3", "Sd3Family"),
}


def tool_family(argv: list[str] | None) -> ModelFamily:
    """The family a cache tool works for, from `--sdxl` / `--flux` / `--sd3` or the model given with
    --pretrained_model_name_or_path."""
    import importlib

    from library.checkpoint_files import ModelLoadError

    pre = argparse.ArgumentParser(add_help=False)
    for switch in TOOL_FAMILIES:
        pre.add_argument(f"--{switch}", action="store_true")
    pre.add_argument("--pretrained_model_name_or_path", default=None)
    known, _ = pre.parse_known_args(argv)
    switches = [switch for switch in TOOL_FAMILIES if getattr(known, switch)]
    if len(switches) > 1:
        pre.error(f"give at most one of --{', --'.join(TOOL_FAMILIES)} (got --{' and --'.join(switches)})")
    try:
        kind = switches[0] if switches else detect_model_family(known.pretrained_model_name_or_path)
    except ModelLoadError:  # a truncated or broken model file: the loader reports it as one error line
        kind = "sd"
    if kind in TOOL_FAMILIES:
        _, module, cls = TOOL_FAMILIES[kind]
        return getattr(importlib.import_module(module), cls)()
    from library.family_sd import SdFamily

    return SdFamily()


# What every cache tool reads besides the dataset flags: the model (the families' own model flags among them), the
# family switches and --config_file. A flag the family does not define is not in its parser, so not in its --help.
TOOL_MODEL_OPTIONS = (
    "pretrained_model_name_or_path", "v2", "vae", "tokenizer_cache_dir", "clip_l", "clip_g", "t5xxl", "ae", *TOOL_FAMILIES,
)  # fmt: skip


def parse_tool_args(argv: list[str] | None, description: str, options: tuple[str, ...] = ()):
    """(family, args) for a cache tool: the training script's flags of the detected family, plus the family switches.
    --help shows only the model and dataset flags, --config_file and the tool's own `options` (argument names); the
    other training flags are accepted and ignored, so a training command line or config file can be reused."""
    from library.args import add_dataset_arguments
    from library.train_args import parse_args_with_config, setup_network_parser

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    family = tool_family(argv)
    parser = setup_network_parser(description)
    family.add_arguments(parser)
    for switch, (name, _, _) in TOOL_FAMILIES.items():
        parser.add_argument(f"--{switch}", action="store_true", help=f"the model is {name} (detected from the model when not given)")
    dataset = argparse.ArgumentParser(add_help=False)
    add_dataset_arguments(dataset, training=False)
    shown = {"help", "config_file", *TOOL_MODEL_OPTIONS, *options, *(a.dest for a in dataset._actions)}
    for action in parser._actions:
        if action.dest not in shown or action.dest in family.unused_shared_options:
            action.help = argparse.SUPPRESS
    parser.formatter_class = argparse.RawDescriptionHelpFormatter  # the tool's docstring keeps its lines
    parser.epilog = "The training scripts' other options are accepted and ignored, so a training command line can be reused."
    return family, parse_args_with_config(parser, argv)


def load_tool_models(args, family: ModelFamily, device, part: str):
    """The family's models for a cache tool, with `part` ("vae" or "text_encoders") frozen and placed as the trainer
    places it before it fills the same caches: on `device`, in the --mixed_precision dtype (the VAE as
    family.vae_dtype says, e.g. float32 with --no_half_vae; float8-stored weights stay float8). The weights a cache
    was made with are part of its identity, so only then does a training run with the same flags reuse the tool's
    caches instead of rebuilding them."""
    from library.family import place_module, working_dtype

    models = family.load_models(args)
    dtype = working_dtype(args.mixed_precision)
    modules = [models.vae] if part == "vae" else list(models.text_encoders)
    for module in modules:
        module.requires_grad_(False).eval()
        if part == "vae":
            module.to(device, family.vae_dtype(args, dtype))
        else:
            place_module(module, device, dtype)
    return models


def tool_errors() -> tuple[type[Exception], ...]:
    """The failures a tool reports as one error line (bad config, dataset, model or arguments)."""
    from library.checkpoint_files import ModelLoadError
    from library.config_util import ConfigError
    from library.datasets import DatasetError
    from library.image_util import ImageReadError
    from library.saving import StateError
    from library.trainer import TrainingError

    return (ConfigError, DatasetError, TrainingError, ModelLoadError, StateError, ImageReadError, FileNotFoundError)
