"""The metadata of saved adapter files: sd-scripts' ss_* keys and the ModelSpec (modelspec.*) keys, all strings."""

from __future__ import annotations

import base64
import json
import os
import random
import time

from library.datasets import DatasetGroup
from library.family import ModelFamily
from library.train_args import METADATA_OPTIONS

IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp", ".gif": "image/gif"}


def image_data_url(path: str) -> str:
    """An image file as a data URL (modelspec.thumbnail). Raises ValueError naming the file when it is not a PNG,
    JPEG, WebP or GIF file, or cannot be read."""
    kind = IMAGE_TYPES.get(os.path.splitext(path)[1].lower())
    if kind is None:
        raise ValueError(f"--metadata_thumbnail {path}: use a .png, .jpg, .webp or .gif image")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ValueError(f"--metadata_thumbnail {path} cannot be read: {e.strerror}") from None
    return f"data:{kind};base64,{base64.b64encode(data).decode()}"


def training_metadata(
    args,
    family: ModelFamily,
    group: DatasetGroup,
    seed: int,
    num_epochs: int,
    batches_per_epoch: int,
    optimizer_name: str,
    optimizer_args: str,
) -> dict[str, str]:
    """sd-scripts' ss_* keys and the modelspec.* keys (all strings)."""
    now = time.time()
    train_images = sum(ds.num_train_images for ds in group.datasets)
    md = {
        "ss_session_id": str(random.randint(0, 2**32)),
        "ss_training_started_at": str(now),
        "ss_output_name": args.output_name,
        "ss_learning_rate": str(args.learning_rate),
        "ss_text_encoder_lr": str(args.text_encoder_lr),
        "ss_unet_lr": str(args.unet_lr),
        "ss_num_train_images": str(train_images),
        "ss_num_validation_images": str(sum(len(ds.validation) for ds in group.datasets)),
        "ss_num_reg_images": str(sum(ds.num_reg_images for ds in group.datasets)),
        "ss_num_batches_per_epoch": str(batches_per_epoch),
        "ss_num_epochs": str(num_epochs),
        "ss_gradient_checkpointing": str(args.gradient_checkpointing),
        "ss_gradient_accumulation_steps": str(args.gradient_accumulation_steps),
        "ss_max_train_steps": str(args.max_train_steps),
        "ss_lr_warmup_steps": str(args.lr_warmup_steps),
        "ss_lr_scheduler": str(args.lr_scheduler),
        "ss_network_module": args.network_module or "networks.lora",
        "ss_network_dim": str(args.network_dim or 4),
        "ss_network_alpha": str(args.network_alpha),
        "ss_network_dropout": str(args.network_dropout),
        "ss_mixed_precision": args.mixed_precision,
        "ss_full_fp16": str(args.full_fp16),
        "ss_clip_skip": str(args.clip_skip),
        "ss_max_token_length": str(args.max_token_length),
        "ss_cache_latents": str(args.cache_latents),
        "ss_seed": str(seed),
        "ss_lowram": "False",
        "ss_noise_offset": str(args.noise_offset),
        "ss_multires_noise_iterations": str(args.multires_noise_iterations),
        "ss_multires_noise_discount": str(args.multires_noise_discount),
        "ss_adaptive_noise_scale": str(args.adaptive_noise_scale),
        "ss_zero_terminal_snr": str(args.zero_terminal_snr),
        "ss_training_comment": str(args.training_comment),
        "ss_sd_scripts_commit_hash": "kiln",
        "ss_optimizer": f"{optimizer_name}({optimizer_args})" if optimizer_args else optimizer_name,
        "ss_max_grad_norm": str(args.max_grad_norm),
        "ss_caption_dropout_rate": str(args.caption_dropout_rate),
        "ss_caption_dropout_every_n_epochs": str(args.caption_dropout_every_n_epochs),
        "ss_caption_tag_dropout_rate": str(args.caption_tag_dropout_rate),
        "ss_face_crop_aug_range": str(args.face_crop_aug_range),
        "ss_prior_loss_weight": str(args.prior_loss_weight),
        "ss_min_snr_gamma": str(args.min_snr_gamma),
        "ss_scale_weight_norms": str(args.scale_weight_norms),
        "ss_ip_noise_gamma": str(args.ip_noise_gamma),
        "ss_debiased_estimation": str(args.debiased_estimation_loss),
        "ss_noise_offset_random_strength": str(args.noise_offset_random_strength),
        "ss_ip_noise_gamma_random_strength": str(args.ip_noise_gamma_random_strength),
        "ss_loss_type": args.loss_type,
        "ss_huber_schedule": args.huber_schedule,
        "ss_huber_scale": str(args.huber_scale),
        "ss_huber_c": str(args.huber_c),
        "ss_fp8_base": str(bool(getattr(args, "fp8_base", False))),
        "ss_fp8_base_unet": str(bool(getattr(args, "fp8_base_unet", False))),
        "ss_validation_seed": str(args.validation_seed),
        "ss_validation_split": str(args.validation_split),
        "ss_max_validation_steps": str(args.max_validation_steps),
        "ss_validate_every_n_epochs": str(args.validate_every_n_epochs),
        "ss_validate_every_n_steps": str(args.validate_every_n_steps),
        "ss_resize_interpolation": str(args.resize_interpolation),
    }
    if args.network_args:
        md["ss_network_args"] = json.dumps(dict(kv.split("=", 1) for kv in args.network_args))
    md["ss_sd_model_name"] = os.path.basename(args.pretrained_model_name_or_path.rstrip("/"))
    tag_frequency, dataset_dirs, datasets_md = {}, {}, []
    for ds in group.datasets:
        subsets_md = []
        for n, subset in enumerate(ds.config.subsets):
            dirname = os.path.basename((subset.image_dir or subset.metadata_file or "").rstrip("/"))
            infos = [i for i in ds.train if i.subset_index == n]
            freq: dict[str, int] = {}
            for info in infos:
                for tag in info.caption.split(subset.caption.caption_separator):
                    if tag.strip():
                        freq[tag.strip()] = freq.get(tag.strip(), 0) + 1
            tag_frequency[dirname] = freq
            dataset_dirs[dirname] = {"n_repeats": subset.num_repeats, "img_count": len(infos)}
            subsets_md.append(
                {
                    "img_count": len(infos),
                    "num_repeats": subset.num_repeats,
                    "color_aug": subset.color_aug,
                    "flip_aug": subset.flip_aug,
                    "random_crop": subset.random_crop,
                    "shuffle_caption": subset.caption.shuffle_caption,
                    "keep_tokens": subset.caption.keep_tokens,
                    "image_dir": dirname,
                    "class_tokens": subset.class_tokens,
                    "is_reg": subset.is_reg,
                }
            )
        datasets_md.append(
            {
                "is_dreambooth": ds.config.kind == "dreambooth",
                "batch_size_per_device": ds.config.batch_size,
                "num_train_images": ds.num_train_images,
                "num_reg_images": ds.num_reg_images,
                "resolution": list(ds.config.resolution),
                "enable_bucket": ds.config.enable_bucket,
                "min_bucket_reso": ds.config.min_bucket_reso,
                "max_bucket_reso": ds.config.max_bucket_reso,
                "bucket_info": ds.bucket_info(),
                "subsets": subsets_md,
            }
        )
    md["ss_datasets"] = json.dumps(datasets_md)
    md["ss_tag_frequency"] = json.dumps(tag_frequency)
    md["ss_dataset_dirs"] = json.dumps(dataset_dirs)
    md["ss_bucket_info"] = json.dumps(group.datasets[0].bucket_info())
    md.update(modelspec_metadata(args, family, group, now))
    md["modelspec.architecture"] += "/lora"
    return md


def modelspec_metadata(args, family: ModelFamily, group: DatasetGroup, now: float | None = None) -> dict[str, str]:
    """The modelspec.* keys of a run's files (--metadata_* options included) and the family's keys (what a whole-model
    checkpoint carries; adapter files add sd-scripts' ss_* keys)."""
    now = time.time() if now is None else now
    md: dict[str, str] = {}
    res = group.datasets[0].config.resolution
    md.update(
        {
            "modelspec.sai_model_spec": "1.0.1",
            "modelspec.title": args.metadata_title or args.output_name,
            "modelspec.resolution": f"{res[0]}x{res[1]}",
            "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(now)),
        }
    )
    for name in METADATA_OPTIONS[1:]:  # the title is set above
        if getattr(args, f"metadata_{name}", None):
            md[f"modelspec.{name}"] = getattr(args, f"metadata_{name}")
    if getattr(args, "metadata_thumbnail", None):
        md["modelspec.thumbnail"] = image_data_url(args.metadata_thumbnail)
    if args.clip_skip:
        md["modelspec.encoder_layer"] = str(args.clip_skip)
    if args.min_timestep is not None or args.max_timestep is not None:
        md["modelspec.timestep_range"] = f"{args.min_timestep or 0},{args.max_timestep or 1000}"
    md.update(family.metadata(args))
    return md


ESSENTIAL_KEYS = ("ss_v2", "ss_base_model_version", "ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args")
