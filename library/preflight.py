"""Checks of a run's inputs that need no model: the output folder, learning rates that leave something to train, and
a --network_weights file of this model family. Each problem is one line naming the flag or file and what to do;
`check_args` in library/trainer.py reports them with its own."""

from __future__ import annotations

import os

from library.family import ModelFamily

ARCH_OF_LORA_FAMILY = {"sd1": "sd", "sdxl": "sdxl", "flux": "flux", "sd3": "sd3"}


def output_dir_problem(output_dir: str) -> str | None:
    """Why `output_dir` cannot hold the run's files (a file, under a file, not writable), or None. Creates nothing."""
    path = os.path.abspath(output_dir)
    if os.path.exists(path) and not os.path.isdir(path):
        return f"--output_dir {output_dir} is a file, not a folder: choose a folder (it is created if missing)"
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return f"--output_dir {output_dir} cannot be created: {existing} is a file, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "is not writable" if existing == path else f"cannot be created: {existing} is not writable"
        return f"--output_dir {output_dir} {what}; choose a folder you can write to"
    return None


def learning_rate_problem(args) -> str | None:
    """None when some trained part gets a learning rate above 0 (networks skip parameter groups with rate 0)."""
    default = args.learning_rate
    unet = default if args.unet_lr is None else args.unet_lr
    te_values = args.text_encoder_lr if isinstance(args.text_encoder_lr, list) else [args.text_encoder_lr]
    te = [default if v is None else v for v in (te_values or [None])]
    trains_unet = not args.network_train_text_encoder_only and unet != 0
    trains_te = not args.network_train_unet_only and any(v != 0 for v in te)
    if trains_unet or trains_te:
        return None
    given = [f"--learning_rate {default}"]
    if args.unet_lr is not None:
        given.append(f"--unet_lr {args.unet_lr}")
    if args.text_encoder_lr:
        given.append("--text_encoder_lr " + " ".join(str(v) for v in args.text_encoder_lr))
    return (
        f"nothing to train: every learning rate is 0 ({', '.join(given)}); give --learning_rate (or --unet_lr / "
        "--text_encoder_lr for the part to train) a value above 0"
    )


def network_weights_problem(path: str, family: ModelFamily) -> str | None:
    """A --network_weights file that is missing, unreadable, or an adapter for another model family."""
    from library.checkpoint_files import FAMILY_NAMES, FAMILY_SCRIPTS, ModelLoadError, detect_lora_family, read_key_shapes

    if not os.path.isfile(path):
        return f"--network_weights {path} does not exist"
    if not path.lower().endswith(".safetensors"):
        return None  # a pickle is only read (weights-only) when the network is built
    try:
        keys = read_key_shapes(path)
    except ModelLoadError as e:
        return f"--network_weights {e}"
    kind = detect_lora_family(keys)
    if kind == "unknown" or ARCH_OF_LORA_FAMILY[kind] == family.arch:
        return None
    example = next((k.split(".")[0] for k in sorted(keys) if detect_lora_family([k]) == kind), "")
    name = "SD 1.x/2.x" if kind == "sd1" else FAMILY_NAMES[kind]
    return (
        f"--network_weights {path}: this LoRA is for {name} (keys like {example}), "
        f"not for {family.script_name}; use {FAMILY_SCRIPTS[kind]}"
    )


def preflight_problems(args, family: ModelFamily) -> list[str]:
    problems = []
    if args.output_dir:
        problems.append(output_dir_problem(args.output_dir))
    problems.append(learning_rate_problem(args))
    if args.network_weights:
        problems.append(network_weights_problem(args.network_weights, family))
    return [p for p in problems if p]
