"""Fill the latent caches of a dataset ahead of training (the files --cache_latents_to_disk reads).

    python tools/cache_latents.py --pretrained_model_name_or_path MODEL --dataset_config data.toml [--vae_batch_size 8]

Takes the training script's model and dataset flags, plus `--sdxl` (also detected from the model). Valid caches
are kept; stale ones (image, VAE, bucket or flags changed) are rebuilt.
"""

from __future__ import annotations

import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv: list[str] | None = None) -> int:
    import torch

    from library.config_util import ConfigError
    from library.datasets import DatasetError
    from library.tool_family import tool_family
    from library.train_args import parse_args_with_config, setup_network_parser
    from library.trainer import TrainingError, cache_all_latents, load_datasets

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    family = tool_family(argv)
    parser = setup_network_parser(__doc__)
    family.add_arguments(parser)
    parser.add_argument("--sdxl", action="store_true", help="the model is SDXL (detected from the model when not given)")
    args = parse_args_with_config(parser, argv)
    args.cache_latents = args.cache_latents_to_disk = True
    try:
        from accelerate import Accelerator

        group = load_datasets(args, family, args.seed or 0)
        accelerator = Accelerator()
        models = family.load_models(args)
        models.vae.to(accelerator.device, torch.float32).requires_grad_(False).eval()  # caches are float32
        cache_all_latents(args, family, models, group, accelerator)
    except (ConfigError, DatasetError, TrainingError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
