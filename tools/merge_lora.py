"""Merge LoRA files into a base model, or into one LoRA.

    python tools/merge_lora.py --sd_model base.safetensors --models a.safetensors b.safetensors --ratios 1 0.5 --save_to merged.safetensors
    python tools/merge_lora.py --models a.safetensors b.safetensors --ratios 1 0.5 --save_to ab.safetensors [--concat]
    python tools/merge_lora.py --flux_model flux1-dev.safetensors --models f.safetensors --save_to merged.safetensors [--save_precision fp8]
    python tools/merge_lora.py --models f.safetensors [--flux_model flux1-dev.safetensors --save_to merged.safetensors]
        --clip_l clip_l.safetensors --clip_l_save_to clip_l_merged.safetensors --t5xxl t5xxl_fp16.safetensors --t5xxl_save_to t5xxl_merged.safetensors

Into a model: each LoRA's weight change times its ratio is added to the base weights; `--save_to` is a single file
(.safetensors or .ckpt, original layout) or, for any other name, a diffusers folder. A single file merged into a
single file, or a diffusers folder into a folder, is streamed tensor by tensor: the output holds every tensor of the
source whatever its name (position_ids, the DDPM schedule buffers, EMA weights, ...), the untouched ones bit-identical
in their dtype, the changed ones computed in --precision (default float32) and written back in their own dtype (or
all floating tensors in --save_precision); a folder keeps every other file (configs, tokenizers, scheduler). No
tokenizer is needed. A single file into a folder, a folder into a single file or a built-in model is converted through
the loaded models. LoRA, OFT (sd-scripts' networks.oft and oft_flux layouts), LoHa and LoKr files are merged, each
at its --ratios value (an OFT rotation R becomes ratio x (R - I) + I, as the multiplier does in training; a FLUX OFT
file rotates each part of a fused layer's rows); any other key (DoRA, GLoRA, ...) is an error naming it, and nothing
is written. Into one LoRA (plain LoRA files only): `--concat` puts the ranks side by side (exactly the weighted
sum); without it, each module's sum is fitted back to the largest input rank by SVD (exact when the ranks allow, else
the nearest; the largest relative error is printed).

FLUX (sd-scripts' flux_merge_lora flags): each part of a FLUX LoRA goes into its own single file, merged tensor by
tensor in float32 (the 12B model needs a few GB of RAM): `lora_unet_` modules into `--flux_model` (BFL transformer)
-> `--save_to`, `lora_te1_` into `--clip_l` (Hugging Face CLIP-L) -> `--clip_l_save_to`, `lora_te3_` into `--t5xxl`
(Hugging Face T5-XXL encoder) -> `--t5xxl_save_to`; any of the three pairs, at least one. LoRAs in the diffusers/PEFT
layout (ai-toolkit) are converted first. Modules of a part without its file are an error (nothing is dropped), and so
is a file of a part no LoRA adapts. `--save_precision` (fp8 included) applies to every file written; the source's
metadata is kept. Everything is checked before the first file is written.

SD3 / SD3.5 the same way: `lora_unet_` modules (sd-scripts' lora_sd3 names, or a diffusers/PEFT SD3 LoRA) into
`--sd3_model` (Stability AI's single file; an SD3 file given as --sd_model is taken as --sd3_model) -> `--save_to`,
and the text-encoder modules `lora_te1_`, `lora_te2_`, `lora_te3_` into the CLIP-L, CLIP-G and T5-XXL the SAI file
bundles (text_encoders.*, merged in place) and into `--clip_l`, `--clip_g`, `--t5xxl` files (Hugging Face layout)
-> `--clip_l_save_to`, `--clip_g_save_to`, `--t5xxl_save_to` (an encoder both bundled and given as a file gets them
in both). --precision (default float) and --save_precision (not fp8) as for --sd_model.

An existing output (--save_to, --clip_l_save_to, --clip_g_save_to, --t5xxl_save_to) is never overwritten: files are
written to a temporary name and published without replacing anything, so an output that appears meanwhile stays as it
is and the merge fails (exit status 1). Outputs get the usual file mode (0666 & ~umask).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from library import quiet  # noqa: E402
from library.saving import SAVE_DTYPES, SaveError, load_weights_file, save_weights  # noqa: E402
from networks.adapter import file_modules  # noqa: E402
from networks.merge import (  # noqa: E402
    FLUX_FILES,
    SD3_FILES,
    check_lora_keys,
    merge_into_models,
    merge_into_part_files,
    merge_into_sd_file,
    merge_into_sd_folder,
    merge_loras_concat,
    merge_loras_svd,
)


def load_base(path: str, v2: bool, dtype):
    """(model, its text encoders, LoRA naming options, model -> original single-file state dict) for an SD 1.x/2.x or
    SDXL base that is converted on the way (a folder into a single file, a single file into a folder, a built-in model)."""
    from library.train_script import detect_model_family

    family = detect_model_family(path)
    if family == "sdxl":
        from library.sdxl_models import load_sdxl_model, sdxl_to_sgm_state_dict, sdxl_unet_lora_name_map

        model = load_sdxl_model(path, dtype=dtype)
        options = {"unet_name_map": sdxl_unet_lora_name_map(model.unet), "te_prefixes": ["lora_te1", "lora_te2"]}
        return model, [model.text_encoder, model.text_encoder_2], options, lambda m: sdxl_to_sgm_state_dict(
            m.text_encoder, m.text_encoder_2, m.vae, m.unet
        )
    from library.sd_models import load_sd_model, sd_to_ldm_state_dict

    model = load_sd_model(path, v2=v2, dtype=dtype)
    return model, [model.text_encoder], {}, lambda m: sd_to_ldm_state_dict(m.text_encoder, m.vae, m.unet, m.v2)


def _save_single(path: str, state: dict, dtype) -> None:
    """A converted model's single-file state dict, never over an existing file."""
    from library.saving import save_tensors

    def out(t):
        return dtype if dtype is not None and t.is_floating_point() else t.dtype

    layout = [(k, tuple(v.shape), out(v)) for k, v in state.items()]
    save_tensors(path, layout, lambda k: state[k].detach().to("cpu", out(state[k])).contiguous(), overwrite=False)


def _save_folder(modules: dict, others: dict, dtype, folder: str) -> None:
    from diffusers import DDPMScheduler

    from library.model_files import save_diffusers_folder
    from library.saving import new_temp_folder, publish_folder
    from library.sd_models import sd_scheduler_config

    parts = {k: (v.to(dtype) if dtype is not None else v) for k, v in modules.items()}
    parts.update(others)
    parts["scheduler"] = DDPMScheduler(**sd_scheduler_config())
    tmp = new_temp_folder(folder)
    try:
        save_diffusers_folder(parts, tmp)
    except BaseException:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish_folder(tmp, folder)


ENCODER_PARTS = ("clip_l", "clip_g", "t5xxl")


def _lora_keys(path: str) -> list[str]:
    from library.checkpoint_files import read_key_shapes

    try:
        return list(read_key_shapes(path))
    except (OSError, ValueError):
        return []  # reported when the file is loaded


def _part_files(parser: argparse.ArgumentParser, args):
    """(PartFiles of the family, part -> (source, new file)) of a FLUX or SD3 merge from the flags, checked; (None, {})
    when none of their flags is given. Without --flux_model or --sd3_model the LoRAs tell the family (--clip_g: SD3)."""
    from networks.merge import reads_as_sd3_lora

    if args.flux_model and args.sd3_model:
        parser.error("--flux_model and --sd3_model cannot be merged together")
    for part in ENCODER_PARTS:
        src_flag, dst_flag = SD3_FILES.flags[part]
        if (getattr(args, part) is None) != (getattr(args, part + "_save_to") is None):
            parser.error(f"{src_flag} and {dst_flag} go together (the file to merge into and the new file to write)")
    model = args.flux_model or args.sd3_model
    if not model and not any(getattr(args, part) for part in ENCODER_PARTS):
        return None, {}
    sd3 = bool(args.sd3_model or args.clip_g) or (
        not args.flux_model and any(reads_as_sd3_lora(_lora_keys(path)) for path in args.models)
    )
    family = SD3_FILES if sd3 else FLUX_FILES
    if args.flux_model and args.clip_g:
        parser.error("--clip_g is SD3's CLIP-G: FLUX has no second CLIP")
    model_flag = family.flags["transformer"][0]
    if args.sd_model:
        parser.error(f"--sd_model cannot be merged together with {family.name} files ({model_flag}, --clip_l, ...)")
    if model and args.save_to is None:
        parser.error(f"{model_flag} needs --save_to (the merged {family.labels['transformer']} file)")
    if not model and args.save_to is not None:
        parser.error(f"--save_to is the merged {family.labels['transformer']}: give {model_flag} too, or leave --save_to out "
                     "to merge only into the text-encoder files (--clip_l, --t5xxl, ...)")
    precision = family is FLUX_FILES and args.precision not in (None, "float")
    for flag, given in (("--concat", args.concat), ("--new_rank", args.new_rank is not None), ("--v2", args.v2),
                        ("--no_metadata", args.no_metadata), ("--precision", precision)):
        if given:
            why = " (they compute in float32; the output dtype is --save_precision)" if family is FLUX_FILES else ""
            parser.error(f"{flag} does not apply to {family.name} merges into model files{why}")
    pairs = {p: (getattr(args, p), getattr(args, p + "_save_to")) for p in ENCODER_PARTS}
    pairs["transformer"] = (model, args.save_to)
    files = {part: pair for part, pair in pairs.items() if pair[0] is not None}
    for part, (src, dst) in files.items():
        src_flag, dst_flag = family.flags[part]
        if not dst.endswith(".safetensors"):
            parser.error(f"{dst_flag} must be a .safetensors file")
        if not os.path.isfile(src):
            parser.error(f"{src_flag} {src} does not exist")
    dsts = [os.path.abspath(dst) for _, dst in files.values()]
    if len(set(dsts)) != len(dsts):
        parser.error("--save_to, --clip_l_save_to, --clip_g_save_to and --t5xxl_save_to must be different files")
    return family, files


def _sd_model_as_sd3(parser: argparse.ArgumentParser, args) -> None:
    """An SD3 model given as --sd_model: a SAI single file is taken as --sd3_model; anything else SD3 is an error."""
    if not args.sd_model:
        return
    from library.train_script import detect_model_family

    if detect_model_family(args.sd_model) != "sd3":
        return
    if not os.path.isfile(args.sd_model):
        parser.error(f"{args.sd_model} is an SD3 model that is not a single file: kiln merges SD3 LoRAs into Stability AI's "
                     "single file (--sd3_model sd3.5_large.safetensors)")
    if args.sd3_model:
        parser.error("--sd_model and --sd3_model are both given")
    args.sd3_model, args.sd_model = args.sd_model, None


def main(argv: list[str] | None = None) -> int:
    quiet.install()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--sd_model", type=str, default=None, help="SD 1.x/2.x or SDXL base (single file or diffusers folder); none: merge LoRAs"
    )
    parser.add_argument(
        "--flux_model",
        type=str,
        default=None,
        help="FLUX.1 BFL transformer file (flux1-dev.safetensors): its lora_unet_ modules are merged into --save_to",
    )
    parser.add_argument(
        "--sd3_model",
        type=str,
        default=None,
        help="SD3/SD3.5 single file (Stability AI layout): lora_unet_ modules, and the text-encoder modules of the "
        "encoders it bundles, are merged into --save_to",
    )
    parser.add_argument(
        "--clip_l",
        type=str,
        default=None,
        help="FLUX/SD3 CLIP-L file (Hugging Face layout): lora_te1_ modules go into --clip_l_save_to",
    )
    parser.add_argument(
        "--clip_g",
        type=str,
        default=None,
        help="SD3 CLIP-G file (Hugging Face layout): lora_te2_ modules go into --clip_g_save_to",
    )
    parser.add_argument(
        "--t5xxl",
        type=str,
        default=None,
        help="FLUX/SD3 T5-XXL encoder file (Hugging Face layout): lora_te3_ modules go into --t5xxl_save_to",
    )
    parser.add_argument("--models", type=str, nargs="+", required=True, help="LoRA files to merge")
    parser.add_argument("--ratios", type=float, nargs="*", default=None, help="one weight per LoRA (default 1 each)")
    parser.add_argument(
        "--save_to",
        type=str,
        default=None,
        help="output file (.safetensors/.ckpt) or diffusers folder; with --flux_model/--sd3_model the merged model file "
        "(.safetensors). Not needed when only --clip_l/--clip_g/--t5xxl are merged",
    )
    parser.add_argument("--clip_l_save_to", type=str, default=None, help="new .safetensors file for the merged --clip_l")
    parser.add_argument("--clip_g_save_to", type=str, default=None, help="new .safetensors file for the merged --clip_g")
    parser.add_argument("--t5xxl_save_to", type=str, default=None, help="new .safetensors file for the merged --t5xxl")
    parser.add_argument(
        "--save_precision",
        type=str,
        default=None,
        choices=["float", "fp16", "bf16", "fp8"],
        help="dtype of the output(s); FLUX/SD3: of every file written (fp8 = float8_e4m3fn: FLUX only)",
    )
    parser.add_argument(
        "--precision",
        type=str,
        default=None,
        choices=["float", "fp16", "bf16"],
        help="dtype while merging into --sd_model or --sd3_model (default float)",
    )
    parser.add_argument("--v2", action="store_true", help="the base model is SD 2.x")
    parser.add_argument("--concat", action="store_true", help="LoRA merge: keep the ranks side by side (exact)")
    parser.add_argument("--new_rank", type=int, default=None, help="LoRA merge without --concat: rank of the result")
    parser.add_argument("--no_metadata", action="store_true", help="write no ss_* metadata to a merged LoRA")
    args = parser.parse_args(argv)

    ratios = args.ratios or [1.0] * len(args.models)
    if len(ratios) != len(args.models):
        parser.error(f"--ratios has {len(ratios)} values for {len(args.models)} --models")
    _sd_model_as_sd3(parser, args)
    family, part_files = _part_files(parser, args)
    if not part_files and args.save_to is None:
        parser.error("--save_to is required (or, for text encoders only, --clip_l/--clip_l_save_to, --clip_g/--clip_g_save_to, "
                     "--t5xxl/--t5xxl_save_to)")
    outputs = [dst for _, dst in part_files.values()] if part_files else [args.save_to]
    for path in outputs:
        if os.path.exists(path):
            parser.error(f"{path} already exists; kiln does not overwrite files, choose another name")
    try:
        loaded = [load_weights_file(path) for path in args.models]
    except (FileNotFoundError, ValueError) as e:
        parser.error(str(e))
    loras = [sd for sd, _ in loaded]
    save_dtype = {**SAVE_DTYPES, "fp8": torch.float8_e4m3fn}[args.save_precision] if args.save_precision else None
    if args.save_precision == "fp8" and family is not FLUX_FILES:
        parser.error("--save_precision fp8 is for FLUX merges (--flux_model, --clip_l, --t5xxl)")
    if part_files:
        merge_dtype = SAVE_DTYPES[args.precision or "float"]
        try:
            counts = merge_into_part_files(family, part_files, list(zip(loras, ratios)), save_dtype, merge_dtype, args.models)
        except (ValueError, FileNotFoundError) as e:
            parser.error(str(e))
        except SaveError as e:
            parser.exit(1, f"error: {e}\n")
        for part, n in counts.items():
            print(f"merged {n} weights; wrote {part_files[part][1]}")
        return 0

    for path, sd in zip(args.models, loras):
        try:
            check_lora_keys(sd) if args.sd_model is None else file_modules(sd)
        except ValueError as e:
            into = " (OFT, LoHa and LoKr files merge into a model: give --sd_model)" if args.sd_model is None else ""
            parser.error(f"{path}: {e}{into}")
    try:
        if args.sd_model is None:
            merge_into_lora(args, loras, ratios, save_dtype, [metadata for _, metadata in loaded])
        else:
            merge_into_model(parser, args, loras, ratios, save_dtype)
    except SaveError as e:
        parser.exit(1, f"error: {e}\n")
    print(f"wrote {args.save_to}")
    return 0


def _network_module(loras: list, metadata: list[dict[str, str]]) -> str:
    """The ss_network_module of a merged LoRA: the inputs' own when they agree, else the family their keys read as."""
    from library.checkpoint_files import detect_lora_family

    given = {m.get("ss_network_module") for m in metadata}
    if len(given) == 1 and None not in given:
        return given.pop()
    kinds = {detect_lora_family(sd) for sd in loras}
    return next((f"networks.lora_{k}" for k in ("sd3", "flux") if k in kinds), "networks.lora")


def merge_into_lora(args, loras: list, ratios: list[float], save_dtype, metadata: list[dict[str, str]]) -> None:
    if args.concat:
        merged = merge_loras_concat(loras, ratios)
    else:
        merged, error = merge_loras_svd(loras, ratios, args.new_rank)
        print(f"largest relative error of the rank-limited merge: {error:.2e}")
    metadata = (
        None
        if args.no_metadata
        else {
            "ss_network_module": _network_module(loras, metadata),
            "ss_merged_from": ", ".join(map(os.path.basename, args.models)),
        }
    )
    save_weights(args.save_to, merged, metadata, save_dtype, overwrite=False)


def merge_into_model(parser: argparse.ArgumentParser, args, loras: list, ratios: list[float], save_dtype) -> None:
    """Streamed when the layout stays (single file -> single file, folder -> folder), else through loaded models."""
    from library.train_script import detect_model_family

    single = args.save_to.lower().endswith((".safetensors", ".ckpt", ".pt"))
    merge_dtype = SAVE_DTYPES[args.precision or "float"]
    pairs = list(zip(loras, ratios))
    if os.path.isdir(args.sd_model) and detect_model_family(args.sd_model) == "flux":
        parser.error(f"{args.sd_model} is a FLUX model: merge into its transformer file with --flux_model")
    try:
        if os.path.isfile(args.sd_model) and single:
            n = merge_into_sd_file(args.sd_model, args.save_to, pairs, save_dtype, merge_dtype, v2=args.v2 or None)
            print(f"merged {len(args.models)} LoRA file(s) into {n} weights")
            return
        if os.path.isdir(args.sd_model) and not single:
            n = merge_into_sd_folder(args.sd_model, args.save_to, pairs, save_dtype, merge_dtype)
            print(f"merged {len(args.models)} LoRA file(s) into {n} weights")
            return
        model, text_encoders, options, to_single = load_base(args.sd_model, args.v2, merge_dtype)
    except ValueError as e:  # ModelLoadError included
        parser.error(str(e))
    for path, sd, ratio in zip(args.models, loras, ratios):
        try:
            n = merge_into_models(sd, ratio, text_encoders, model.unet, **options)
        except ValueError as e:
            parser.error(f"{path}: {e}")
        print(f"merged {path} x {ratio} ({n} modules)")
    if single:
        _save_single(args.save_to, to_single(model), save_dtype)
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


if __name__ == "__main__":
    sys.exit(main())
