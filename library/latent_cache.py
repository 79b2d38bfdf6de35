"""Latent caching: encode every image once (in memory or in safetensors files next to the images) and reuse it.

A cache entry holds the VAE posterior's mean and standard deviation, not one frozen sample: each training step draws a
fresh latent from them, exactly as encoding the image again would, at no VAE cost. With flip_aug the flipped image
is encoded too; with alpha_mask the cropped mask is kept. Entries record what made them (see
strategy_base.LatentsCachingStrategy) and are rebuilt when anything changed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from tqdm import tqdm

from library.config_util import SubsetConfig
from library.data_loader import fit_to_bucket
from library.datasets import DatasetGroup, ImageInfo
from library.image_util import load_image
from library.saving import atomic_write_bytes
from library.strategy_base import LatentsCachingStrategy

logger = logging.getLogger(__name__)

# encode(images (B, 3, H, W) in [-1, 1]) -> (mean, std), each (B, C, H/8, W/8)
EncodeFn = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def check_cacheable(group: DatasetGroup) -> None:
    """Latents can be cached only for images whose pixels do not change per step."""
    for ds in group.datasets:
        for n, subset in enumerate(ds.config.subsets):
            where = f"{ds.config.name}.subsets[{n}]"
            if subset.random_crop:
                raise ValueError(f"{where}: random_crop changes the crop every step, so latents cannot be cached; turn one off")
            if subset.color_aug:
                raise ValueError(f"{where}: color_aug changes the pixels every step, so latents cannot be cached; turn one off")
            if subset.face_crop_aug_range is not None:
                raise ValueError(f"{where}: face_crop_aug_range crops randomly, so latents cannot be cached; turn one off")


class LatentCache:
    """Latents of every image of a DatasetGroup, keyed by (image path, bucket)."""

    def __init__(self, strategy: LatentsCachingStrategy, vae_fingerprint: str) -> None:
        self.strategy = strategy
        self.vae_fingerprint = vae_fingerprint
        self.memory: dict[tuple[str, tuple[int, int]], dict[str, torch.Tensor]] = {}

    def _identity(self, info: ImageInfo, subset: SubsetConfig) -> dict:
        return {
            "vae": self.vae_fingerprint,
            "bucket": list(info.bucket),
            "resized_size": list(info.resized_size),
            "interpolation": subset.resize_interpolation,
            "flip": subset.flip_aug,
            "alpha_mask": subset.alpha_mask,
        }

    def _keys(self, subset: SubsetConfig) -> list[str]:
        keys = ["mean", "std"]
        if subset.flip_aug:
            keys += ["mean_flipped", "std_flipped"]
        if subset.alpha_mask:
            keys.append("alpha_mask")
        return keys

    def fill(
        self,
        group: DatasetGroup,
        encode: EncodeFn,
        device: torch.device,
        dtype: torch.dtype,
        process_index: int = 0,
        num_processes: int = 1,
        show_progress: bool = True,
    ) -> int:
        """Encode what is missing or stale; returns how many images were encoded by this process.

        With several processes each one encodes its share of the disk caches (index % num_processes); memory
        caches are filled by every process for itself.
        """
        todo: dict[tuple, list[tuple[ImageInfo, SubsetConfig]]] = {}
        seen = set()
        items = [(info, ds.config.subsets[info.subset_index]) for ds in group.datasets for info in ds.train + ds.validation]
        for n, (info, subset) in enumerate(items):
            key = (info.path, info.bucket)
            if key in seen:
                continue
            seen.add(key)
            if self.strategy.cache_to_disk:
                if n % num_processes != process_index:
                    continue
                path = self.strategy.cache_path(info.path, info.bucket)
                if self.strategy.is_valid(
                    path, self.strategy.expected_metadata(info.path, self._identity(info, subset)), self._keys(subset)
                ):
                    continue
            todo.setdefault((info.bucket, subset.flip_aug, subset.alpha_mask), []).append((info, subset))
        total = sum(len(v) for v in todo.values())
        bar = tqdm(total=total, desc="caching latents", disable=not show_progress or total == 0)
        for group_items in todo.values():
            for start in range(0, len(group_items), self.strategy.batch_size):
                chunk = group_items[start : start + self.strategy.batch_size]
                self._encode_chunk(chunk, encode, device, dtype)
                bar.update(len(chunk))
        bar.close()
        return total

    def _encode_chunk(self, chunk, encode: EncodeFn, device, dtype) -> None:
        images, masks = [], []
        for info, subset in chunk:
            img = load_image(info.path, keep_alpha=subset.alpha_mask)
            img, _ = fit_to_bucket(img, info, subset, None)
            if subset.alpha_mask:
                masks.append(torch.from_numpy(np.array(img.getchannel("A"), dtype=np.float32) / 255.0))
                img = img.convert("RGB")
            t = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).float() / 127.5 - 1.0
            images.append(t)
        batch = torch.stack(images).to(device, dtype)
        with torch.no_grad():
            mean, std = encode(batch)
            flip_needed = any(s.flip_aug for _, s in chunk)
            if flip_needed:
                mean_f, std_f = encode(torch.flip(batch, dims=[3]))
        for i, (info, subset) in enumerate(chunk):
            entry = {"mean": mean[i].float().cpu().contiguous(), "std": std[i].float().cpu().contiguous()}
            if subset.flip_aug:
                entry["mean_flipped"] = mean_f[i].float().cpu().contiguous()
                entry["std_flipped"] = std_f[i].float().cpu().contiguous()
            if subset.alpha_mask:
                entry["alpha_mask"] = masks[i].contiguous()
            if self.strategy.cache_to_disk:
                meta = self.strategy.expected_metadata(info.path, self._identity(info, subset))
                atomic_write_bytes(self.strategy.cache_path(info.path, info.bucket), safetensors_bytes(entry, meta))
            else:
                self.memory[(info.path, info.bucket)] = entry

    def get(self, info: ImageInfo) -> dict[str, torch.Tensor]:
        """The cache entry of an image (from memory, else from its file)."""
        entry = self.memory.get((info.path, info.bucket))
        if entry is None:
            entry = load_file(self.strategy.cache_path(info.path, info.bucket))
        return entry
