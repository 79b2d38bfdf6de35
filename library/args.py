"""Command-line arguments shared by the scripts, with sd-scripts' names and defaults (reference §4)."""

from __future__ import annotations

import argparse


def add_dataset_arguments(parser: argparse.ArgumentParser, training: bool = True) -> None:
    """Dataset flags. Each one is the command-line fallback of the dataset-config key of the same name.

    training=False leaves out the flags that only change how a model trains on the data (for tools that only
    read the dataset, such as tools/check_dataset.py).
    """
    g = parser.add_argument_group("dataset")
    g.add_argument("--dataset_config", type=str, default=None, help="dataset config file (.toml or .json), sd-scripts format")
    g.add_argument(
        "--train_data_dir",
        type=str,
        default=None,
        help="without --dataset_config: folder of image folders named <repeats>_<class tokens> (e.g. 10_sks dog); "
        "with --in_json: the folder the metadata keys are relative to",
    )
    g.add_argument("--reg_data_dir", type=str, default=None, help="regularisation image folders, named like --train_data_dir's")
    g.add_argument("--in_json", type=str, default=None, help="fine-tuning metadata file (.json or .jsonl) instead of folders")
    g.add_argument(
        "--dataset_repeats", type=int, default=1, help="repeats per epoch for fine-tuning metadata images (num_repeats)"
    )
    g.add_argument("--train_batch_size", type=int, default=1, help="batch size per device (batch_size in the config)")
    g.add_argument("--resolution", type=str, default=None, help='training resolution: "512" or "width,height"')
    g.add_argument("--enable_bucket", action="store_true", help="aspect-ratio buckets instead of one fixed resolution")
    g.add_argument("--min_bucket_reso", type=int, default=256, help="smallest bucket side (rounded down to bucket_reso_steps)")
    g.add_argument("--max_bucket_reso", type=int, default=1024, help="largest bucket side (rounded up to bucket_reso_steps)")
    g.add_argument("--bucket_reso_steps", type=int, default=64, help="bucket sides are multiples of this")
    g.add_argument(
        "--bucket_no_upscale",
        action="store_true",
        help="one bucket per image size, never enlarging an image (min/max_bucket_reso unused)",
    )
    g.add_argument(
        "--resize_interpolation",
        type=str,
        default=None,
        choices=["lanczos", "nearest", "bilinear", "linear", "bicubic", "cubic", "area", "box"],
        help="resize filter; default area when shrinking and lanczos when enlarging",
    )
    g.add_argument("--caption_extension", type=str, default=".caption", help="caption file extension (most datasets use .txt)")
    g.add_argument("--caption_extention", dest="caption_extension", type=str, help=argparse.SUPPRESS)  # sd-scripts' old spelling
    g.add_argument(
        "--cache_info", action="store_true", help="keep image sizes and captions in metadata_cache.json per image folder"
    )
    g.add_argument("--shuffle_caption", action="store_true", help="shuffle the comma-separated tags of each caption every step")
    g.add_argument("--caption_separator", type=str, default=",", help="tag separator for shuffling and dropout")
    g.add_argument("--keep_tokens", type=int, default=0, help="the first N tags are never shuffled or dropped")
    g.add_argument(
        "--keep_tokens_separator",
        type=str,
        default="",
        help='tags before this separator (e.g. "|||") stay fixed, and after a second one form a fixed suffix',
    )
    g.add_argument(
        "--secondary_separator",
        type=str,
        default=None,
        help="joins several tags into one unit for shuffling; replaced by caption_separator",
    )
    g.add_argument(
        "--enable_wildcard", action="store_true", help="{a|b} picks one option per step; multi-line captions pick one line"
    )
    g.add_argument("--caption_prefix", type=str, default=None, help="text put before every caption")
    g.add_argument("--caption_suffix", type=str, default=None, help="text put after every caption")
    g.add_argument("--color_aug", action="store_true", help="small random hue or gamma changes")
    g.add_argument("--flip_aug", action="store_true", help="random horizontal flips")
    g.add_argument(
        "--face_crop_aug_range",
        type=str,
        default=None,
        help='"min,max" face size relative to the crop, for images whose names end in _cx_cy_w_h',
    )
    g.add_argument("--random_crop", action="store_true", help="random instead of centred crop into the bucket")
    g.add_argument("--token_warmup_min", type=int, default=1, help="tags kept at the first step of token warm-up")
    g.add_argument(
        "--token_warmup_step",
        type=float,
        default=0,
        help="steps until all tags are used (a value below 1 is a fraction of the run)",
    )
    g.add_argument("--alpha_mask", action="store_true", help="weight the loss by each image's alpha channel")
    g.add_argument("--caption_dropout_rate", type=float, default=0.0, help="probability of training a step with an empty caption")
    g.add_argument("--caption_dropout_every_n_epochs", type=int, default=0, help="empty captions in every N-th epoch")
    g.add_argument("--caption_tag_dropout_rate", type=float, default=0.0, help="probability of dropping each flexible tag")
    g.add_argument(
        "--validation_split", type=float, default=0.0, help="fraction of each subset's images held out for validation loss"
    )
    g.add_argument("--validation_seed", type=int, default=None, help="seed of the validation split (default: --seed)")
    g.add_argument("--seed", type=int, default=None, help="random seed of the run (data order, augmentations, noise)")
    if training:
        g.add_argument("--prior_loss_weight", type=float, default=1.0, help="loss weight of regularisation images")
        g.add_argument(
            "--max_token_length", type=int, default=None, choices=[75, 150, 225], help="caption token length (75, 150 or 225)"
        )
