"""Fill the text-encoder output caches of a dataset ahead of training (what --cache_text_encoder_outputs_to_disk reads).

    python tools/cache_text_encoder_outputs.py --sdxl --pretrained_model_name_or_path MODEL --dataset_config data.toml

Takes the training script's model and dataset flags plus `--sdxl` (also detected from the model). Cache files sit
next to each image (`<image stem>_sdxl_te.safetensors`); valid ones are kept, stale ones (caption, tokenizer settings
or text encoders changed) are rebuilt. With caption shuffling, tag dropout or wildcards, --text_encoder_cache_variants
versions of each caption are encoded.
"""

from __future__ import annotations

import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv: list[str] | None = None) -> int:
    from accelerate import Accelerator

    from library.checkpoint_files import ModelLoadError
    from library.config_util import ConfigError
    from library.datasets import DatasetError
    from library.tool_family import tool_family
    from library.train_args import parse_args_with_config, setup_network_parser
    from library.trainer import TrainingError, cache_all_text_outputs, load_datasets

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    family = tool_family(argv)
    parser = setup_network_parser(__doc__)
    family.add_arguments(parser)
    parser.add_argument("--sdxl", action="store_true", help="the model is SDXL (detected from the model when not given)")
    args = parse_args_with_config(parser, argv)
    if not family.caches_text_encoder_outputs:
        print("error: SD 1.x/2.x has no text-encoder output cache; pass --sdxl with an SDXL model", file=sys.stderr)
        return 1
    args.cache_text_encoder_outputs = args.cache_text_encoder_outputs_to_disk = True
    try:
        group = load_datasets(args, family, args.seed or 0)
        accelerator = Accelerator(mixed_precision=args.mixed_precision)
        models = family.load_models(args)
        for te in models.text_encoders:
            te.to(accelerator.device).requires_grad_(False).eval()
        cache_all_text_outputs(args, family, models, group, accelerator)
    except (ConfigError, DatasetError, TrainingError, ModelLoadError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
