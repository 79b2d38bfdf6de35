"""Fill the latent caches of a dataset ahead of training (the files --cache_latents_to_disk reads).

    python tools/cache_latents.py --pretrained_model_name_or_path MODEL --dataset_config data.toml [--vae_batch_size 8]

Takes the training script's model and dataset flags, plus `--sdxl`, `--flux` or `--sd3` (also detected from the
model). A model file without its text encoders needs them as in training (--clip_l, --clip_g, --t5xxl). Give the
training run's --mixed_precision (and --no_half_vae): the VAE encodes in that precision, as in training. Valid caches
are kept; stale ones (image, VAE, bucket or flags changed) are rebuilt.
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
    from library.trainer import cache_all_latents, load_datasets

    family, args = parse_tool_args(argv, __doc__, ("vae_batch_size", "skip_cache_check", "mixed_precision", "no_half_vae"))
    args.cache_latents = args.cache_latents_to_disk = True
    try:
        group = load_datasets(args, family, args.seed or 0)
        accelerator = Accelerator()
        models = load_tool_models(args, family, accelerator.device, "vae")
        cache_all_latents(args, family, models, group, accelerator)
    except tool_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
