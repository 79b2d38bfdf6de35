"""The training scripts' command line: sd-scripts' flag names and defaults, `--config_file` and `--output_config`."""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import os
import shlex
import sys

import toml

from library.args import add_dataset_arguments

logger = logging.getLogger(__name__)

# --metadata_<name> options written as modelspec.<name> (strings as given)
METADATA_OPTIONS = (
    "title", "author", "description", "license", "tags", "usage_hint", "merged_from", "trigger_phrase", "preprocessor",
    "is_negative_embedding",
)


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model")
    g.add_argument(
        "--pretrained_model_name_or_path",
        type=str,
        default=None,
        help="base model: a single file (.safetensors; .ckpt read without unpickling), a diffusers folder, or the built-in "
        "tiny model kiln-tiny-sd for a dry run on CPU",
    )
    g.add_argument("--v2", action="store_true", help="the model is SD 2.x")
    g.add_argument("--v_parameterization", action="store_true", help="the model predicts v (SD 2.x 768-v models)")
    g.add_argument("--vae", type=str, default=None, help="replacement VAE: a single file or a diffusers folder")
    g.add_argument(
        "--tokenizer_cache_dir",
        type=str,
        default=None,
        help="folder with tokenizers saved per hub id (e.g. openai_clip-vit-large-patch14/) for single-file models offline",
    )
    g = parser.add_argument_group("model metadata (modelspec)")
    for name in METADATA_OPTIONS:
        g.add_argument(f"--metadata_{name}", type=str, default=None, help=f"modelspec.{name} of the saved file")
    g.add_argument(
        "--metadata_thumbnail", type=str, default=None, help="image file stored as a data URL in modelspec.thumbnail"
    )


def _add_output_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("output and checkpoints")
    g.add_argument("--output_dir", type=str, default=None, help="folder for the LoRA files, states and samples")
    g.add_argument("--output_name", type=str, default=None, help="file name without extension (default: last)")
    g.add_argument("--save_model_as", type=str, default="safetensors", choices=["safetensors", "ckpt", "pt"], help="file format")
    g.add_argument(
        "--save_precision", type=str, default=None, choices=["float", "fp16", "bf16"], help="dtype of the saved weights"
    )
    g.add_argument("--save_every_n_epochs", type=int, default=None, help="save a checkpoint every N epochs")
    g.add_argument("--save_every_n_steps", type=int, default=None, help="save a checkpoint every N steps")
    g.add_argument(
        "--save_n_epoch_ratio",
        type=int,
        default=None,
        help="save about N epoch checkpoints over the run: every floor(epochs / N) epochs (at least every epoch)",
    )
    g.add_argument("--save_last_n_epochs", type=int, default=None, help="keep only the last N epoch checkpoints")
    g.add_argument("--save_last_n_steps", type=int, default=None, help="keep only step checkpoints of the last N steps")
    g.add_argument("--save_last_n_epochs_state", type=int, default=None, help="keep only the last N epoch states")
    g.add_argument("--save_last_n_steps_state", type=int, default=None, help="keep only states of the last N steps")
    g.add_argument("--save_state", action="store_true", help="save the training state with every checkpoint (for --resume)")
    g.add_argument("--save_state_on_train_end", action="store_true", help="save the training state at the end")
    g.add_argument("--resume", type=str, default=None, help="continue from a state folder written by --save_state")
    g.add_argument(
        "--initial_step",
        type=int,
        default=None,
        help="start the run as if N steps were done (sd-scripts): with --skip_until_initial_step the step counter starts "
        "at N and the data of the first N steps is skipped; without it only the epoch counter moves to the epoch of "
        "step N. Weights come from --network_weights or --resume; the learning-rate schedule starts from the "
        "beginning unless --resume gives its state. Overrides the position of a --resume state",
    )
    g.add_argument(
        "--initial_epoch",
        type=int,
        default=None,
        help="like --initial_step (E-1) * steps per epoch: start at epoch E (1 = the first); --initial_step wins if both",
    )
    g.add_argument(
        "--skip_until_initial_step",
        action="store_true",
        help="with --initial_step/--initial_epoch: skip the batches of the steps before it and count steps from there",
    )


def _add_training_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("training")
    g.add_argument("--max_train_steps", type=int, default=1600, help="number of optimizer steps")
    g.add_argument("--max_train_epochs", type=int, default=None, help="number of epochs (overrides --max_train_steps)")
    g.add_argument(
        "--max_data_loader_n_workers", type=int, default=8, help="data-loader worker processes (at most the CPU count)"
    )
    g.add_argument("--persistent_data_loader_workers", action="store_true", help="keep workers alive between epochs")
    g.add_argument("--gradient_checkpointing", action="store_true", help="recompute activations in backward (less memory)")
    g.add_argument(
        "--cpu_offload_checkpointing",
        action="store_true",
        help="with --gradient_checkpointing: keep the inputs of each of the U-Net's / transformer's checkpointed blocks "
        "in host memory until backward (less GPU memory, a little slower; combines with --blocks_to_swap)",
    )
    g.add_argument("--gradient_accumulation_steps", type=int, default=1, help="batches per optimizer step")
    g.add_argument("--mixed_precision", type=str, default="no", choices=["no", "fp16", "bf16"], help="compute precision")
    g.add_argument("--full_fp16", action="store_true", help="keep the trained weights in fp16 too (less memory, less precise)")
    g.add_argument("--full_bf16", action="store_true", help="keep the trained weights in bf16 too (less memory, less precise)")
    g.add_argument(
        "--no_half_vae",
        action="store_true",
        help="keep the VAE in float32 under --mixed_precision bf16/fp16 (under fp16 it is float32 anyway: SD VAEs overflow there)",
    )
    g.add_argument(
        "--clip_skip", type=int, default=None, help="use the text encoder's N-th layer from the end (2 for many anime models)"
    )
    g.add_argument("--weighted_captions", action="store_true", help="read (tag:1.2) attention weights in captions")
    g.add_argument("--sdpa", action="store_true", help="scaled-dot-product attention (kiln always uses it)")
    g.add_argument(
        "--xformers", action="store_true", help="accepted for sd-scripts command lines; kiln uses PyTorch SDPA instead"
    )
    g.add_argument(
        "--mem_eff_attn", action="store_true", help="accepted for sd-scripts command lines; kiln uses PyTorch SDPA instead"
    )
    g.add_argument(
        "--torch_compile",
        action="store_true",
        help="compile the denoiser's repeated blocks (transformer blocks) with torch.compile: the first steps of each "
        "resolution are slow while compiling, the following ones faster; the adapters are compiled with the blocks",
    )
    g.add_argument(
        "--dynamo_backend",
        type=str,
        default="inductor",
        help="torch.compile backend for --torch_compile (inductor; eager and aot_eager only trace, for debugging)",
    )
    g.add_argument(
        "--cache_latents", action="store_true", help="encode every image once before training, keep the latents in memory"
    )
    g.add_argument(
        "--cache_latents_to_disk", action="store_true", help="keep latent caches next to the images (implies --cache_latents)"
    )
    g.add_argument("--vae_batch_size", type=int, default=1, help="images per VAE call when caching latents")
    g.add_argument("--skip_cache_check", action="store_true", help="trust existing cache files without checking what made them")
    g.add_argument("--masked_loss", action="store_true", help="weight the loss by the alpha mask (subsets with alpha_mask)")

    g = parser.add_argument_group("noise and loss")
    g.add_argument("--noise_offset", type=float, default=None, help="add this much per-channel offset noise (0.05-0.1 typical)")
    g.add_argument("--noise_offset_random_strength", action="store_true", help="offset strength uniform in [0, noise_offset)")
    g.add_argument("--adaptive_noise_scale", type=float, default=None, help="add |latent mean| x this to the noise offset")
    g.add_argument("--multires_noise_iterations", type=int, default=None, help="pyramid noise levels (6-10 typical)")
    g.add_argument("--multires_noise_discount", type=float, default=0.3, help="weight decay per pyramid level")
    g.add_argument("--ip_noise_gamma", type=float, default=None, help="input perturbation noise (0.1 typical)")
    g.add_argument("--ip_noise_gamma_random_strength", action="store_true", help="gamma uniform in [0, ip_noise_gamma)")
    g.add_argument("--zero_terminal_snr", action="store_true", help="rescale the noise schedule to zero terminal SNR")
    g.add_argument("--min_timestep", type=int, default=None, help="smallest timestep trained (default 0)")
    g.add_argument("--max_timestep", type=int, default=None, help="largest timestep trained, exclusive (default 1000)")
    g.add_argument("--min_snr_gamma", type=float, default=None, help="min-SNR loss weighting gamma (5 recommended)")
    g.add_argument("--scale_v_pred_loss_like_noise_pred", action="store_true", help="v-prediction loss scaled like epsilon loss")
    g.add_argument("--v_pred_like_loss", type=float, default=None, help="add a v-prediction-like loss with this weight")
    g.add_argument("--debiased_estimation_loss", action="store_true", help="debiased estimation loss weighting")
    g.add_argument("--loss_type", type=str, default="l2", choices=["l1", "l2", "huber", "smooth_l1"], help="loss function")
    g.add_argument(
        "--huber_schedule", type=str, default="snr", choices=["constant", "exponential", "snr"], help="huber c over timesteps"
    )
    g.add_argument("--huber_c", type=float, default=0.1, help="huber loss parameter c")
    g.add_argument("--huber_scale", type=float, default=1.0, help="huber loss scale")


def _add_base_weights_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("base model changes")
    g.add_argument(
        "--base_weights",
        type=str,
        default=None,
        nargs="*",
        help="LoRA files merged into the base model's weights before training starts (and before --fp8_base): "
        "training starts from the model with these LoRAs applied",
    )
    g.add_argument(
        "--base_weights_multiplier",
        type=float,
        default=None,
        nargs="*",
        help="multiplier of each --base_weights file, in order (files without one use 1.0, as sd-scripts)",
    )


def _add_sample_and_validation_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("sample images")
    g.add_argument("--sample_prompts", type=str, default=None, help="prompt file (.txt, .toml or .json) for preview images")
    g.add_argument("--sample_every_n_steps", type=int, default=None, help="make sample images every N steps")
    g.add_argument("--sample_every_n_epochs", type=int, default=None, help="make sample images every N epochs (wins over steps)")
    g.add_argument("--sample_at_first", action="store_true", help="make sample images before training")
    g.add_argument("--sample_sampler", type=str, default="ddim", help="sampler: ddim, euler, euler_a, dpmsolver++, ...")
    g = parser.add_argument_group("validation")
    g.add_argument("--validate_every_n_steps", type=int, default=None, help="validation loss every N steps")
    g.add_argument(
        "--validate_every_n_epochs", type=int, default=None, help="validation loss every N epochs (default: every epoch)"
    )
    g.add_argument("--max_validation_steps", type=int, default=None, help="at most this many validation batches")


def _add_logging_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("logging")
    g.add_argument("--logging_dir", type=str, default=None, help="TensorBoard log folder (a run folder is made inside)")
    g.add_argument("--log_with", type=str, default=None, choices=["tensorboard", "wandb", "all"], help="trackers")
    g.add_argument("--log_prefix", type=str, default=None, help="prefix of the run folder name")
    g.add_argument("--log_tracker_name", type=str, default=None, help="tracker project name (default network_train)")
    g.add_argument("--wandb_run_name", type=str, default=None, help="wandb run name")
    g.add_argument("--wandb_api_key", type=str, default=None, help="wandb API key (prefer the WANDB_API_KEY variable)")
    g.add_argument("--log_config", action="store_true", help="log the run's arguments (paths and keys removed)")
    g.add_argument(
        "--log_tracker_config", type=str, default=None, help="TOML file of tracker settings, a table per tracker (e.g. [wandb])"
    )
    g.add_argument(
        "--console_log_level",
        type=str,
        default=None,
        choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
        help="least important console messages shown (default INFO)",
    )
    g.add_argument("--console_log_file", type=str, default=None, help="write the log to this file instead of the console")
    g.add_argument("--console_log_simple", action="store_true", help="log messages without level and logger name")
    g.add_argument(
        "--ddp_timeout",
        type=int,
        default=None,
        help="minutes the processes of a multi-GPU run wait for each other before giving up (default: torch's)",
    )
    g = parser.add_argument_group("configuration")
    g.add_argument("--config_file", type=str, default=None, help="read arguments from this TOML file (command line wins)")
    g.add_argument("--output_config", action="store_true", help="write the non-default arguments to --config_file and exit")
    g.add_argument(
        "--debug_dataset",
        action="store_true",
        help="print the first epoch's batches (bucket, images, processed captions) and exit without loading a model",
    )


def setup_training_parser(description: str, method=None) -> argparse.ArgumentParser:
    """The parser of a training script: the shared flags and those of the training `method` (a
    library.method.TrainingMethod; adapter training by default). Family scripts add their own flags."""
    from library.method_adapter import AdapterMethod
    from library.optimizers import add_optimizer_arguments

    parser = TrainingArgumentParser(description=description)
    _add_model_arguments(parser)
    add_dataset_arguments(parser)
    _add_output_arguments(parser)
    _add_training_arguments(parser)
    add_optimizer_arguments(parser)
    parser.set_defaults(learning_rate=1e-4)  # sd-scripts' LoRA default; a method may set its own
    (method or AdapterMethod()).add_arguments(parser)
    _add_base_weights_arguments(parser)
    _add_sample_and_validation_arguments(parser)
    _add_logging_arguments(parser)
    return parser


def setup_network_parser(description: str) -> argparse.ArgumentParser:
    """The parser of a LoRA training script (setup_training_parser with adapter training)."""
    return setup_training_parser(description)


# Flags of sd-scripts' other scripts, so that a command line meant for another family gets a helpful message.
OTHER_FAMILY_FLAGS = {
    "--t5xxl": "flux_train_network.py or sd3_train_network.py",
    "--clip_l": "flux_train_network.py or sd3_train_network.py",
    "--ae": "flux_train_network.py",
    "--clip_g": "sd3_train_network.py",
    "--guidance_scale": "flux_train_network.py",
    "--timestep_sampling": "flux_train_network.py",
    "--model_prediction_type": "flux_train_network.py",
    "--discrete_flow_shift": "flux_train_network.py",
    "--blocks_to_swap": "flux_train_network.py or sd3_train_network.py",
    "--cache_text_encoder_outputs": "sdxl_train_network.py, sd3_train_network.py or flux_train_network.py",
    "--cache_text_encoder_outputs_to_disk": "sdxl_train_network.py, sd3_train_network.py or flux_train_network.py",
}


class TrainingArgumentParser(argparse.ArgumentParser):
    """argparse with a short error: one line naming the problem and where the options are listed, not the whole usage
    block (hundreds of lines for the training scripts). Exit status 2, as argparse."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\nsee `{self.prog} --help` for the options\n")


def _near_flag(parser: argparse.ArgumentParser, flag: str) -> str | None:
    flags = [s for a in parser._actions for s in a.option_strings if s.startswith("--") and a.help != argparse.SUPPRESS]
    near = difflib.get_close_matches(flag, flags, n=1, cutoff=0.8)
    return near[0] if near else None


def _parse(parser: argparse.ArgumentParser, argv: list[str] | None, namespace: argparse.Namespace | None = None) -> argparse.Namespace:
    args, unknown = parser.parse_known_args(argv, namespace)
    if unknown:
        for item in unknown:
            flag = item.split("=", 1)[0]
            if flag in OTHER_FAMILY_FLAGS:
                parser.error(f"{flag} belongs to another model family's script ({OTHER_FAMILY_FLAGS[flag]}), not {parser.prog}")
        near = next((n for n in (_near_flag(parser, u.split("=", 1)[0]) for u in unknown if u.startswith("--")) if n), None)
        parser.error(f"unrecognized arguments: {' '.join(unknown)}" + (f" (did you mean {near}?)" if near else ""))
    return args


# Keys that the kohya_ss GUI writes into the TOML files it saves and passes to sd-scripts, and that are not options of
# sd-scripts' LoRA scripts (the GUI's own settings: what it turns into network_args or accelerate options, LyCORIS and
# block-weight fields, its presets). sd-scripts ignores them; so does kiln, with one warning line. They are listed so
# that the near-miss rule of parse_args_with_config never mistakes one for a typo (noise_offset_type is close to
# noise_offset, lr_warmup to lr_warmup_steps).
GUI_ONLY_KEYS = frozenset(
    """
    LoRA_type LyCORIS_preset noise_offset_type epoch lr_warmup max_resolution optimizer additional_parameters model_list
    save_as_bool sdxl sdxl_cache_text_encoder_outputs sdxl_no_half_vae flux1_checkbox sd3_checkbox
    stop_text_encoder_training use_shell sample_every_n_epochs_checkbox

    gpu_ids main_process_port multi_gpu num_cpu_threads_per_process num_machines num_processes
    extra_accelerate_launch_args dynamo_mode dynamo_use_dynamic dynamo_use_fullgraph

    conv_dim conv_alpha conv_dims conv_alphas conv_block_dims conv_block_alphas block_dims block_alphas
    block_lr_zero_threshold down_lr_weight mid_lr_weight up_lr_weight unit factor use_cp use_tucker use_scalar
    rank_dropout rank_dropout_scale module_dropout constrain rescaled train_norm decompose_both dora_wd bypass_mode
    train_on_input enable_all_linear loraplus_lr_ratio loraplus_text_encoder_lr_ratio loraplus_unet_lr_ratio
    train_double_block_indices train_single_block_indices img_attn_dim img_mlp_dim img_mod_dim single_dim
    single_mod_dim txt_attn_dim txt_mlp_dim txt_mod_dim in_dims split_qkv train_t5xxl
    """.split()
)  # lines: GUI choices that become other options; accelerate launch settings; network_args fields (LoRA, LyCORIS,
# block weights, FLUX per-block ranks, LoRA+)

_NEAR_MISS_CUTOFF = 0.85  # difflib ratio, compared in lower case: learning_rat, network_dimm, Learning_Rate, netwrok_dim


def _flatten(table: dict) -> dict:
    """A config file's keys with sections (tables, at any depth) dissolved; a later key wins, as in sd-scripts."""
    out = {}
    for key, value in table.items():
        if isinstance(value, dict):
            out.update(_flatten(value))
        else:
            out[key] = value
    return out


def _config_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Config key -> action: each option's destination and each of its --names (caption_extention included)."""
    by_key: dict[str, argparse.Action] = {}
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction) or action.dest in ("config_file", "output_config"):
            continue
        for s in action.option_strings:
            if s.startswith("--"):
                by_key.setdefault(s[2:], action)
        by_key.setdefault(action.dest, action)
    return by_key


def _show(value) -> str:
    return f'"{value}"' if isinstance(value, str) else str(value).lower() if isinstance(value, bool) else repr(value)


def _scalar(action: argparse.Action, value):
    """One TOML value as argparse would turn the same text on the command line into it (strings go through the
    option's type; numbers of the right kind are taken as they are). Raises ValueError with the reason."""
    kind = action.type or str
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError("expects " + ("one value, not a list" if isinstance(value, list) else f"a {getattr(kind, '__name__', 'value')}"))
    try:
        if kind is int and isinstance(value, float):
            if not value.is_integer():
                raise ValueError
            value = int(value)
        elif kind is str or (kind in (int, float) and not isinstance(value, str)):
            value = kind(value)
        else:
            value = kind(value if isinstance(value, str) else str(value))
    except (TypeError, ValueError, argparse.ArgumentTypeError) as e:
        detail = f": {e}" if isinstance(e, argparse.ArgumentTypeError) else ""
        raise ValueError(f"invalid {getattr(kind, '__name__', 'value')} value {_show(value)}{detail}") from None
    if action.choices is not None and value not in action.choices:
        raise ValueError(f"invalid choice {_show(value)} (choose from {', '.join(map(str, action.choices))})")
    return value


def _config_value(action: argparse.Action, value):
    """A config value converted for `action`: flags take true/false; list options (nargs) take a TOML array, a single
    value, or a string split like a command line ("conv_dim=4 conv_alpha=1"); the others one value. An empty string
    for an option without a default means "not given" (None), as the kohya_ss GUI writes unset fields."""
    if value == "" and action.default is None:
        return None
    if action.nargs == 0:  # store_true / store_false / store_const
        if isinstance(value, str) and value.lower() in ("true", "false"):
            value = value.lower() == "true"
        if isinstance(action.const, bool) and isinstance(value, bool):
            return value
        if value in (action.const, action.default) and not isinstance(value, (list, dict)):
            return value
        raise ValueError("is a flag: expects true or false")
    if action.nargs in ("*", "+") or isinstance(action.nargs, int) or isinstance(action, argparse._AppendAction):
        items = shlex.split(value) if isinstance(value, str) else value if isinstance(value, list) else [value]
        if action.nargs == "+" and not items:
            raise ValueError("expects at least one value")
        if isinstance(action.nargs, int) and len(items) != action.nargs:
            raise ValueError(f"expects {action.nargs} values, not {len(items)}")
        return [_scalar(action, v) for v in items]
    return _scalar(action, value)


def read_config_file(parser: argparse.ArgumentParser, path: str) -> dict:
    """The options that `--config_file` sets, converted and checked. The rule for each key (after flattening sections):

    1. The name of an option of this script (its destination or a --name, e.g. `learning_rate`): used, its value
       converted as argparse would (a string "1e-4" for a float option, an integer for a float, a single value or a
       command-line string for a list option such as network_args); a value argparse would refuse is an error naming
       the key. An empty string leaves an option that has no default unset.
    2. A key listed in GUI_ONLY_KEYS (settings the kohya_ss GUI writes that sd-scripts ignores, e.g. epoch, LoRA_type,
       noise_offset_type, additional_parameters): ignored.
    3. A near-miss of an option: difflib's ratio of the lower-cased names is at least 0.85 (`learning_rat`,
       `network_dimm`, `Learning_Rate`): an error naming the option, since the value was surely meant for it and
       would otherwise be silently unused.
    4. Any other key: ignored, as sd-scripts ignores it.
    The keys ignored under 2 and 4 are named in one warning line. A file with a `datasets` array of tables is a
    dataset config: an error pointing to --dataset_config.
    """
    if not os.path.isfile(path):
        parser.error(f"--config_file {path} does not exist")
    try:
        table = toml.load(path)
    except (toml.TomlDecodeError, UnicodeDecodeError) as e:
        parser.error(f"--config_file {path} cannot be parsed: {e}")
    if isinstance(table.get("datasets"), list):
        parser.error(f"--config_file {path} is a dataset config ([[datasets]]): pass it with --dataset_config")
    actions = _config_actions(parser)
    lowered = {k.lower(): k for k in actions}
    values, ignored = {}, []
    for key, value in _flatten(table).items():
        action = actions.get(key)
        if action is None:
            near = difflib.get_close_matches(key.lower(), list(lowered), n=1, cutoff=_NEAR_MISS_CUTOFF)
            if near and key not in GUI_ONLY_KEYS:
                parser.error(f"--config_file {path}: unknown key '{key}'; did you mean '{lowered[near[0]]}'?")
            ignored.append(key)
            continue
        try:
            values[action.dest] = _config_value(action, value)
        except ValueError as e:
            parser.error(f"--config_file {path}: {key} = {_show(value)}: {e}")
    if ignored:
        logger.warning(
            f"--config_file {path}: ignoring {len(ignored)} key(s) that are not options of {parser.prog} "
            f"(sd-scripts ignores them too; the kohya_ss GUI writes some for itself): {', '.join(ignored)}"
        )
    return values


def parse_args_with_config(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line on top of `--config_file` (see read_config_file for what the file may hold); the
    command line wins. With --output_config, write the command line's non-default options to that file and exit."""
    args = _parse(parser, argv)
    if not args.config_file:
        return args
    path = args.config_file if os.path.splitext(args.config_file)[1] else args.config_file + ".toml"
    if args.output_config:
        write_config(parser, args, path)
        sys.exit(0)
    return _parse(parser, argv, argparse.Namespace(**read_config_file(parser, path)))


def write_config(parser: argparse.ArgumentParser, args: argparse.Namespace, path: str) -> None:
    """--output_config: the options that differ from the defaults, as TOML that --config_file reads back into the same
    arguments; never overwrites a file."""
    if os.path.exists(path):
        parser.error(f"--output_config: {path} already exists; choose another --config_file")
    defaults = vars(parser.parse_args([]))
    skip = {"config_file", "output_config", "wandb_api_key"}
    values = {k: v for k, v in vars(args).items() if k not in skip and v != defaults.get(k) and v is not None}
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(_toml_text(values))
    os.replace(tmp, path)
    print(f"wrote {path}")


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)  # the shortest text that reads back as the same number (inf and nan included)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    # a JSON string is a TOML basic string, but for DEL, which TOML wants escaped
    return json.dumps(str(value), ensure_ascii=False).replace("\x7f", "\\u007f")


def _toml_text(values: dict) -> str:
    """TOML for a flat table of strings, numbers, booleans and lists of them. (toml.dump writes Windows paths, whose
    backslashes it leaves unescaped, as text that no TOML reader accepts.)"""
    return "".join(f"{key} = {_toml_value(v)}\n" for key, v in values.items())
