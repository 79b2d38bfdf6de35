"""Fill the text-encoder output caches of a dataset ahead of training (what --cache_text_encoder_outputs_to_disk reads).

    python tools/cache_text_encoder_outputs.py --sdxl --pretrained_model_name_or_path MODEL --dataset_config data.toml
    python tools/cache_text_encoder_outputs.py --sd3 --pretrained_model_name_or_path sd3.5_large.safetensors \\
        --clip_l clip_l.safetensors --clip_g clip_g.safetensors --t5xxl t5xxl_fp16.safetensors --dataset_config data.toml

Takes the training script's model and dataset flags plus `--sdxl`, `--flux` or `--sd3` (also detected from the
model); give the text-encoding flags of the training run (--t5xxl_max_token_length, the attention-mask flags,
--mixed_precision ...), which the cache records. Cache files sit next to each image
(`<image stem>_sdxl_te.safetensors`, `_flux_te`, `_sd3_te`); valid ones are kept, stale ones (caption, tokenizer
settings or text encoders changed) are rebuilt. With caption shuffling, tag dropout or wildcards,
--text_encoder_cache_variants versions of each caption are encoded.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv: list[str] | None = None) -> int:
    from library import quiet

    quiet.install()  # before the imports below load bitsandbytes and diffusers
    from accelerate import Accelerator

    from library.train_script import load_tool_models, parse_tool_args, tool_errors
    from library.trainer import cache_all_text_outputs, load_datasets

    options = ("text_encoder_batch_size", "text_encoder_cache_variants", "max_token_length", "clip_skip", "weighted_captions",
               "t5xxl_max_token_length", "apply_lg_attn_mask", "apply_t5_attn_mask", "mixed_precision", "fp8_base")
    family, args = parse_tool_args(argv, __doc__, options)
    if not family.caches_text_encoder_outputs:
        print("error: SD 1.x/2.x has no text-encoder output cache; pass --sdxl, --flux or --sd3 with such a model", file=sys.stderr)
        return 1
    args.cache_text_encoder_outputs = args.cache_text_encoder_outputs_to_disk = True
    try:
        group = load_datasets(args, family, args.seed or 0, decode_check=False)  # no image is decoded here
        accelerator = Accelerator(mixed_precision=args.mixed_precision)
        models = load_tool_models(args, family, accelerator.device, "text_encoders")
        cache_all_text_outputs(args, family, models, group, accelerator)
    except tool_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
