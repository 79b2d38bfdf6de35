"""sd-scripts options that kiln accepts but handles differently, so that every sd-scripts command line parses.

Each option here is known to the parser (same name, value type and default as sd-scripts) and shown in --help. When a
run gives one, it either
- logs one line saying what kiln does instead (NOTES: options whose job kiln does anyway or that have no meaning in
  kiln's design), or
- stops the run before anything loads, saying why and what to do (REFUSED: features kiln does not have).
Options that kiln implements are defined with the rest of the training flags (library/train_args.py, library/args.py).
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass

logger = logging.getLogger("kiln")

NO_UPLOAD = "kiln does not upload to the Hugging Face Hub; upload the output folder afterwards (e.g. `hf upload`)"
NO_DDP_WRAPPER = "kiln averages the adapter gradients itself in one all-reduce per step (no DDP wrapper), so {flag} changes nothing"


@dataclass(frozen=True)
class CompatOption:
    flag: str
    kind: str  # "flag" (store_true), "str", "int"
    message: str  # what kiln does instead (note) or why it stops and what to do (refused)
    refused: bool = False
    choices: tuple[str, ...] | None = None
    default: object = None
    scripts: tuple[str, ...] = ()  # empty: every training script
    kinds: tuple[str, ...] = ("network", "full")  # the script kinds that have it


OPTIONS = [
    CompatOption("--lowram", "flag", "kiln reads model files tensor by tensor already; --lowram changes nothing"),
    CompatOption("--highvram", "flag", "kiln keeps models on the GPU unless an option moves them; --highvram changes nothing"),
    CompatOption(
        "--disable_mmap_load_safetensors",
        "flag",
        "kiln reads safetensors files without keeping a memory map open; --disable_mmap_load_safetensors changes nothing",
        scripts=("sdxl", "flux", "sd3"),
    ),
    CompatOption("--ddp_static_graph", "flag", NO_DDP_WRAPPER.format(flag="--ddp_static_graph")),
    CompatOption("--ddp_gradient_as_bucket_view", "flag", NO_DDP_WRAPPER.format(flag="--ddp_gradient_as_bucket_view")),
    CompatOption(
        "--fused_backward_pass",
        "flag",
        "sd-scripts fuses the optimizer step into backward only when fine-tuning whole models with Adafactor; a LoRA's "
        "gradients are small, so kiln steps after backward as usual",
        kinds=("network",),
    ),
    CompatOption(
        "--split_mode",
        "flag",
        "--split_mode is deprecated in sd-scripts (it meant --blocks_to_swap 18); kiln trains FLUX blocks whole: "
        "use --blocks_to_swap to save memory",
        scripts=("flux",),
    ),
    CompatOption(
        "--save_clip",
        "flag",
        "a LoRA run saves only the LoRA file; the CLIP weights are not written (they are not trained in place)",
        scripts=("sd3",),
        kinds=("network",),
    ),
    CompatOption(
        "--save_t5xxl",
        "flag",
        "a LoRA run saves only the LoRA file; the T5-XXL weights are not written (they are not trained in place)",
        scripts=("sd3",),
        kinds=("network",),
    ),
    CompatOption(
        "--save_clip",
        "flag",
        "kiln writes each trained CLIP next to the checkpoint (<name>_clip_l / _clip_g.safetensors), as sd-scripts; "
        "frozen ones are not written",
        scripts=("sd3",),
        kinds=("full",),
    ),
    CompatOption(
        "--save_t5xxl",
        "flag",
        "kiln writes a trained T5-XXL next to the checkpoint (<name>_t5xxl.safetensors), as sd-scripts; a frozen one "
        "is not written",
        scripts=("sd3",),
        kinds=("full",),
    ),
    CompatOption(
        "--use_t5xxl_cache_only",
        "flag",
        "kiln caches the outputs of all text encoders or of none: train the CLIPs without --cache_text_encoder_outputs",
        refused=True,
        scripts=("sd3",),
        kinds=("full",),
    ),
    CompatOption(
        "--mem_eff_save",
        "flag",
        "kiln writes checkpoints one tensor at a time already; --mem_eff_save changes nothing",
        scripts=("flux",),
        kinds=("full",),
    ),
    CompatOption(
        "--double_blocks_to_swap",
        "int",
        "deprecated in sd-scripts (it meant a part of --blocks_to_swap): give --blocks_to_swap N (kiln swaps the "
        "last N blocks) with --fused_backward_pass or --blockwise_fused_optimizers",
        refused=True,
        scripts=("flux",),
        kinds=("full",),
    ),
    CompatOption(
        "--single_blocks_to_swap",
        "int",
        "deprecated in sd-scripts (it meant a part of --blocks_to_swap): give --blocks_to_swap N (kiln swaps the "
        "last N blocks) with --fused_backward_pass or --blockwise_fused_optimizers",
        refused=True,
        scripts=("flux",),
        kinds=("full",),
    ),
    CompatOption(
        "--t5xxl_device",
        "str",
        "kiln keeps T5-XXL on the training device with the other text encoders (--cache_text_encoder_outputs frees it "
        "after caching when nothing samples); --t5xxl_device changes nothing",
        scripts=("sd3",),
    ),
    CompatOption(
        "--t5xxl_dtype",
        "str",
        "kiln runs T5-XXL in the --mixed_precision dtype (float8 weights with --fp8_base); --t5xxl_dtype changes nothing",
        scripts=("sd3",),
    ),
    CompatOption("--huggingface_repo_id", "str", NO_UPLOAD, refused=True),
    CompatOption("--huggingface_repo_type", "str", NO_UPLOAD, refused=True),
    CompatOption("--huggingface_path_in_repo", "str", NO_UPLOAD, refused=True),
    CompatOption("--huggingface_token", "str", NO_UPLOAD, refused=True),
    CompatOption("--huggingface_repo_visibility", "str", NO_UPLOAD, refused=True),
    CompatOption("--save_state_to_huggingface", "flag", NO_UPLOAD, refused=True),
    CompatOption("--async_upload", "flag", NO_UPLOAD, refused=True),
    CompatOption(
        "--resume_from_huggingface",
        "flag",
        "kiln resumes from local state folders only: download the state folder and pass it to --resume",
        refused=True,
    ),
    CompatOption(
        "--dataset_class",
        "str",
        "kiln builds its datasets from --dataset_config or image folders; a custom dataset class is not supported",
        refused=True,
    ),
    CompatOption(
        "--conditioning_data_dir",
        "str",
        "kiln's --masked_loss reads each mask from its image's alpha channel: put the mask there and set "
        "alpha_mask = true in the dataset config",
        refused=True,
    ),
    CompatOption(
        "--controlnet_model_name_or_path",
        "str",
        "training a LoRA alongside a FLUX ControlNet is not supported by kiln",
        refused=True,
        scripts=("flux",),
    ),
    CompatOption(
        "--model_type",
        "str",
        "kiln trains FLUX.1 (dev and schnell); Chroma is not supported",
        refused=True,
        choices=("flux", "chroma"),
        default="flux",
        scripts=("flux",),
    ),
]


def add_compat_arguments(parser: argparse.ArgumentParser, arch: str, script_kind: str = "network") -> None:
    """Add the options of OPTIONS that sd-scripts' script for `arch` ("sd", "sdxl", "flux", "sd3") and training
    kind (`script_kind` "network": adapter scripts, "full": fine-tuning scripts) has."""
    g = parser.add_argument_group(
        "sd-scripts options kiln handles differently (accepted so that sd-scripts command lines parse; "
        "each says what kiln does)"
    )
    for opt in OPTIONS:
        if (opt.scripts and arch not in opt.scripts) or script_kind not in opt.kinds:
            continue
        prefix = "not supported: " if opt.refused else "no effect: "
        help_text = (prefix + opt.message).replace("%", "%%")
        if opt.kind == "flag":
            g.add_argument(opt.flag, action="store_true", help=help_text)
        else:
            kind = int if opt.kind == "int" else str
            choices = [kind(c) for c in opt.choices] if opt.choices else None
            g.add_argument(opt.flag, type=kind, default=opt.default, choices=choices, help=help_text)


def check_compat_arguments(args: argparse.Namespace) -> list[str]:
    """Log a line for each given option of OPTIONS that kiln handles otherwise; return the problems of refused ones
    (the run must stop before anything loads)."""
    refused: dict[str, list[str]] = {}  # message -> the given options it answers (DeepSpeed's options share one)
    for opt in OPTIONS:
        value = getattr(args, opt.flag[2:], opt.default)
        if value == opt.default or (opt.kind == "flag" and not value):
            continue
        if opt.refused:
            refused.setdefault(opt.message, []).append(opt.flag)
        else:
            logger.info(f"{opt.flag}: {opt.message}")
    return [f"{', '.join(flags)}: {message}" for message, flags in refused.items()]
