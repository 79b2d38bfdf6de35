"""Merge LoRA files into a base model, or into one LoRA.

    python tools/merge_lora.py --sd_model base.safetensors --models a.safetensors b.safetensors --ratios 1 0.5 --save_to merged.safetensors
    python tools/merge_lora.py --models a.safetensors b.safetensors --ratios 1 0.5 --save_to ab.safetensors [--concat]
    python tools/merge_lora.py --flux_model flux1-dev.safetensors --models f.safetensors --save_to merged.safetensors [--save_precision fp8]

Into a model: each LoRA's weight change times its ratio is added to the base weights; `--save_to` is a single file
(.safetensors, original layout) or, for any other name, a diffusers folder. Into one LoRA: `--concat` puts the
ranks side by side (exactly the weighted sum); without it, each module's sum is fitted back to the largest input
rank by SVD (exact when the ranks allow, else the nearest; the largest relative error is printed).
FLUX (`--flux_model`, a BFL transformer file) is merged tensor by tensor, so the 12B model needs a few GB of RAM.
An existing --save_to is never overwritten.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from library.saving import SAVE_DTYPES, load_weights_file, save_weights  # noqa: E402
from networks.merge import merge_into_bfl_file, merge_into_models, merge_loras_concat, merge_loras_svd  # noqa: E402


def load_base(path: str, v2: bool, dtype):
    """(model, its text encoders, LoRA naming options, single-file writer) for an SD 1.x/2.x or SDXL base."""
    from library.train_script import detect_model_family

    family = detect_model_family(path)
    if family == "sdxl":
        from library.sdxl_models import load_sdxl_model, save_sdxl_single_file, sdxl_unet_lora_name_map

        model = load_sdxl_model(path, dtype=dtype)
        options = {"unet_name_map": sdxl_unet_lora_name_map(model.unet), "te_prefixes": ["lora_te1", "lora_te2"]}
        return model, [model.text_encoder, model.text_encoder_2], options, lambda p, m, d: save_sdxl_single_file(p, m, dtype=d)
    from library.sd_models import load_sd_model, save_sd_single_file

    model = load_sd_model(path, v2=v2, dtype=dtype)
    return model, [model.text_encoder], {}, lambda p, m, d: save_sd_single_file(p, m, v2=m.v2, dtype=d)


def _save_folder(modules: dict, others: dict, dtype, folder: str) -> None:
    from diffusers import DDPMScheduler

    from library.tiny_models import save_diffusers_folder, sd_scheduler_config

    parts = {k: (v.to(dtype) if dtype is not None else v) for k, v in modules.items()}
    parts.update(others)
    parts["scheduler"] = DDPMScheduler(**sd_scheduler_config())
    save_diffusers_folder(parts, folder)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--sd_model", type=str, default=None, help="SD 1.x/2.x or SDXL base (single file or diffusers folder); none: merge LoRAs"
    )
    parser.add_argument(
        "--flux_model",
        type=str,
        default=None,
        help="FLUX.1 BFL transformer file (flux1-dev.safetensors): merged tensor by tensor into --save_to",
    )
    parser.add_argument("--models", type=str, nargs="+", required=True, help="LoRA files to merge")
    parser.add_argument("--ratios", type=float, nargs="*", default=None, help="one weight per LoRA (default 1 each)")
    parser.add_argument("--save_to", type=str, required=True, help="output file (.safetensors/.ckpt) or diffusers folder")
    parser.add_argument(
        "--save_precision",
        type=str,
        default=None,
        choices=["float", "fp16", "bf16", "fp8"],
        help="dtype of the output (fp8: FLUX only)",
    )
    parser.add_argument("--precision", type=str, default="float", choices=["float", "fp16", "bf16"], help="dtype while merging")
    parser.add_argument("--v2", action="store_true", help="the base model is SD 2.x")
    parser.add_argument("--concat", action="store_true", help="LoRA merge: keep the ranks side by side (exact)")
    parser.add_argument("--new_rank", type=int, default=None, help="LoRA merge without --concat: rank of the result")
    parser.add_argument("--no_metadata", action="store_true", help="write no ss_* metadata to a merged LoRA")
    args = parser.parse_args(argv)

    ratios = args.ratios or [1.0] * len(args.models)
    if len(ratios) != len(args.models):
        parser.error(f"--ratios has {len(ratios)} values for {len(args.models)} --models")
    if os.path.exists(args.save_to):
        parser.error(f"--save_to {args.save_to} already exists; kiln does not overwrite files, choose another name")
    try:
        loras = [load_weights_file(path)[0] for path in args.models]
    except (FileNotFoundError, ValueError) as e:
        parser.error(str(e))
    save_dtype = {**SAVE_DTYPES, "fp8": torch.float8_e4m3fn}[args.save_precision] if args.save_precision else None
    if args.save_precision == "fp8" and not args.flux_model:
        parser.error("--save_precision fp8 is for --flux_model merges")
    if args.flux_model:
        if args.sd_model:
            parser.error("give --flux_model or --sd_model, not both")
        if not args.save_to.endswith(".safetensors"):
            parser.error("--save_to must be a .safetensors file for --flux_model")
        try:
            n = merge_into_bfl_file(args.flux_model, args.save_to, list(zip(loras, ratios)), save_dtype)
        except (ValueError, FileNotFoundError) as e:
            parser.error(str(e))
        print(f"merged {n} weights; wrote {args.save_to}")
        return 0

    if args.sd_model is None:
        if args.concat:
            merged = merge_loras_concat(loras, ratios)
        else:
            merged, error = merge_loras_svd(loras, ratios, args.new_rank)
            print(f"largest relative error of the rank-limited merge: {error:.2e}")
        metadata = (
            None
            if args.no_metadata
            else {"ss_network_module": "networks.lora", "ss_merged_from": ", ".join(map(os.path.basename, args.models))}
        )
        save_weights(args.save_to, merged, metadata, save_dtype)
        print(f"wrote {args.save_to}")
        return 0

    from library.checkpoint_files import ModelLoadError

    try:
        model, text_encoders, options, save_single = load_base(args.sd_model, args.v2, SAVE_DTYPES[args.precision])
    except ModelLoadError as e:
        parser.error(str(e))
    for path, sd, ratio in zip(args.models, loras, ratios):
        try:
            n = merge_into_models(sd, ratio, text_encoders, model.unet, **options)
        except ValueError as e:
            parser.error(f"{path}: {e}")
        print(f"merged {path} x {ratio} ({n} modules)")
    if args.save_to.endswith((".safetensors", ".ckpt", ".pt")):
        save_single(args.save_to, model, save_dtype)
    elif hasattr(model, "text_encoder_2"):
        parts = {"unet": model.unet, "vae": model.vae, "text_encoder": model.text_encoder, "text_encoder_2": model.text_encoder_2}
        _save_folder(parts, {"tokenizer": model.tokenizer, "tokenizer_2": model.tokenizer_2}, save_dtype, args.save_to)
    else:
        _save_folder(
            {"unet": model.unet, "vae": model.vae, "text_encoder": model.text_encoder},
            {"tokenizer": model.tokenizer},
            save_dtype,
            args.save_to,
        )
    print(f"wrote {args.save_to}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
