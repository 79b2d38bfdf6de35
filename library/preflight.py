"""Checks of a run's arguments and inputs that need no model (`argument_problems`): flags that contradict each other
or cannot train, sd-scripts options kiln handles otherwise, the output folder, the model file of this model family.
Each problem is one line naming the flag or file and what to do; `check_args` in library/trainer.py stops the run
with them (and the training method's own problems) before anything loads."""

from __future__ import annotations

import os

from library.compat_args import check_compat_arguments
from library.deepspeed_run import deepspeed_problems
from library.family import ModelFamily
from library.lora_metadata import image_data_url

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


def tracker_settings(path: str) -> dict:
    """--log_tracker_config: a TOML file with a table of settings per tracker ([wandb], [tensorboard]), passed to the
    trackers as they start. Raises ValueError naming the file when it cannot be read."""
    import toml

    try:
        settings = toml.load(path)
    except (OSError, toml.TomlDecodeError) as e:
        raise ValueError(f"--log_tracker_config {path} cannot be read: {e}") from None
    bad = [k for k, v in settings.items() if not isinstance(v, dict)]
    if bad:
        raise ValueError(f"--log_tracker_config {path}: '{bad[0]}' is not a table; write [tracker] tables, e.g. [wandb]")
    return settings


def argument_problems(args, family: ModelFamily) -> list[str]:
    """Every problem of the run's arguments that needs no model, one line each (empty: the run may start)."""
    problems = []
    if not args.pretrained_model_name_or_path:
        problems.append("--pretrained_model_name_or_path is required (try kiln-tiny-sd for a dry run)")
    if not args.output_dir:
        problems.append("--output_dir is required")
    if args.full_fp16 and args.full_bf16:
        problems.append("--full_fp16 and --full_bf16 exclude each other")
    if args.full_fp16 and args.mixed_precision != "fp16":
        problems.append("--full_fp16 needs --mixed_precision fp16")
    if args.full_bf16 and args.mixed_precision != "bf16":
        problems.append("--full_bf16 needs --mixed_precision bf16")
    if (args.sample_every_n_steps or args.sample_every_n_epochs or args.sample_at_first) and not args.sample_prompts:
        problems.append("sample images were asked for but --sample_prompts is not given")
    if args.cpu_offload_checkpointing and not args.gradient_checkpointing:
        problems.append("--cpu_offload_checkpointing offloads checkpointed activations: add --gradient_checkpointing")
    if args.gradient_accumulation_steps < 1:
        problems.append("--gradient_accumulation_steps must be at least 1")
    if args.initial_step is not None and args.initial_step < 0:
        problems.append(f"--initial_step {args.initial_step}: the first step must be 0 or more")
    if args.initial_epoch is not None and args.initial_epoch < 1:
        problems.append(f"--initial_epoch {args.initial_epoch}: epochs count from 1")
    if args.skip_until_initial_step and args.initial_step is None and args.initial_epoch is None:
        problems.append("--skip_until_initial_step skips to --initial_step or --initial_epoch: give one of them")
    if args.initial_step is not None and args.max_train_epochs is None and args.initial_step >= args.max_train_steps:
        problems.append(
            f"--initial_step {args.initial_step} leaves nothing to train: --max_train_steps ({args.max_train_steps}) "
            "counts from the first step, so it must be greater"
        )
    problems += check_compat_arguments(args)
    problems += deepspeed_problems(args)
    if args.save_n_epoch_ratio is not None and args.save_n_epoch_ratio < 1:
        problems.append(f"--save_n_epoch_ratio {args.save_n_epoch_ratio}: the number of checkpoints must be at least 1")
    if args.metadata_thumbnail:
        try:
            image_data_url(args.metadata_thumbnail)
        except ValueError as e:
            problems.append(str(e))
    if args.log_tracker_config:
        try:
            tracker_settings(args.log_tracker_config)
        except ValueError as e:
            problems.append(str(e))
    if args.max_train_epochs is not None and args.max_train_epochs < 1:
        problems.append(f"--max_train_epochs {args.max_train_epochs}: train for at least one epoch")
    elif args.max_train_epochs is None and args.max_train_steps < 1:
        problems.append(f"--max_train_steps {args.max_train_steps}: train for at least one step")
    if args.learning_rate is not None and args.learning_rate < 0:
        problems.append(f"--learning_rate {args.learning_rate}: a learning rate cannot be negative")
    if args.output_dir and output_dir_problem(args.output_dir):
        problems.append(output_dir_problem(args.output_dir))
    no_compile = str(args.dynamo_backend).lower() == "no"  # what accelerate and the kohya_ss GUI write for "off"
    if args.torch_compile and no_compile:
        problems.append("--torch_compile with --dynamo_backend no: leave out one of them (or name a backend, e.g. inductor)")
    elif args.torch_compile:
        import torch._dynamo

        backends = torch._dynamo.list_backends(exclude_tags=())
        if args.dynamo_backend not in backends:
            problems.append(f"--dynamo_backend {args.dynamo_backend} is not a torch.compile backend; one of: {', '.join(backends)}")
    elif args.dynamo_backend != "inductor" and not no_compile:
        problems.append("--dynamo_backend chooses the backend of --torch_compile: add --torch_compile")
    if args.log_with == "wandb":
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            problems.append("--log_with wandb needs the wandb package (pip install wandb); or use --log_with tensorboard")
    if args.pretrained_model_name_or_path:
        from library.train_script import detect_model_family

        kind = detect_model_family(args.pretrained_model_name_or_path)
        if kind != family.arch:
            other = {
                "sd": "train_network.py",
                "sdxl": "sdxl_train_network.py",
                "flux": "flux_train_network.py",
                "sd3": "sd3_train_network.py",
            }[kind]
            problems.append(f"{args.pretrained_model_name_or_path} is a model for {other}, not {family.script_name}")
    try:
        family.check_args(args)
    except ValueError as e:
        problems.append(str(e))
    return problems
