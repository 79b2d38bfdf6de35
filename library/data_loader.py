"""From scanned datasets to training batches: decoding, cropping into the bucket, augmentations, captions, collation.

The batch order comes from `DatasetGroup.epoch_batches(epoch)`; every random choice for a sample (crop, flip,
colour, caption) is drawn from a generator seeded by (seed, epoch, batch number, position in batch). A batch is
therefore a pure function of the run's seed and its place in the run: the same with any number of data-loader
workers, and the same again after a resume.

A batch is a dict:
  images               float tensor (B, 3, H, W) in [-1, 1], H x W = the bucket
  captions             list of B processed caption strings
  loss_weights         float tensor (B,): prior_loss_weight for regularisation images, else 1
  network_multipliers  float tensor (B,)
  original_sizes_hw    long tensor (B, 2): image size before resizing
  crop_top_lefts       long tensor (B, 2): top-left of the crop in the resized image (after a flip, mirrored)
  target_sizes_hw      long tensor (B, 2): the bucket
  alpha_masks          float tensor (B, H, W) in [0, 1], or None when no subset of the batch asks for alpha_mask
  conditioning_images  float tensor (B, 3, H, W) in [0, 1] for ControlNet datasets, else None
  flipped              bool tensor (B,)
  image_keys           list of B image keys
  text_outputs         with a text-encoder output cache: {output name: tensor (B, ...)}, the cached outputs of the
                       caption each sample used (the one in `captions`); else None

With a text-encoder output cache (library/te_cache.py) a training sample draws caption dropout and then one of its
image's cached caption variants from its rng; a validation sample uses variant 0 and is never dropped.
"""

from __future__ import annotations

import math
import random
import signal
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from library.captions import process_caption
from library.config_util import SubsetConfig
from library.datasets import DatasetGroup, ImageInfo
from library.image_util import ImageReadError, load_image, resize_image


@dataclass(frozen=True)
class SampleRequest:
    """What the sampler asks the dataset for: one image at one place in the run."""

    dataset: int
    image: int
    epoch: int
    batch_number: int  # batches since the start of training (for seeding)
    position: int  # place in its batch (in the batch shared by all processes)
    validation: bool = False
    loss_scale: float = 1.0  # this sample's share of the batch loss: num_processes / samples in the shared batch
    step: int = 0  # optimizer steps before the one this batch belongs to (token warm-up)


def accumulation_group(index: int, batches_per_epoch: int, batches_per_step: int) -> tuple[int, int]:
    """(optimizer step within the epoch, batches in that step) of the epoch's batch `index` (0-based). Gradient
    accumulation groups the batches of each epoch on their own: a step after every `batches_per_step` batches and
    after the epoch's last batch, so the last step of an epoch may hold fewer batches."""
    step = index // batches_per_step
    return step, min(batches_per_step, batches_per_epoch - step * batches_per_step)


@dataclass
class Crop:
    """How an image was fitted into its bucket."""

    original_size: tuple[int, int]  # (w, h)
    resized_width: int
    resized_height: int
    left: int
    top: int
    flipped: bool = False


def fit_to_bucket(img: Image.Image, info: ImageInfo, subset: SubsetConfig, rng: random.Random | None) -> tuple[Image.Image, Crop]:
    """Resize to cover the bucket, then crop (centred, or random with random_crop); face crop for face-named files."""
    bucket = info.bucket
    if info.face is not None and subset.face_crop_aug_range is not None:
        return face_crop(img, info, subset, rng or random.Random(0))
    resized = resize_image(img, info.resized_size, subset.resize_interpolation)
    slack_x, slack_y = resized.size[0] - bucket[0], resized.size[1] - bucket[1]
    if subset.random_crop and rng is not None:
        left, top = rng.randint(0, slack_x), rng.randint(0, slack_y)
    else:
        left, top = slack_x // 2, slack_y // 2
    cropped = resized.crop((left, top, left + bucket[0], top + bucket[1]))
    return cropped, Crop(img.size, resized.size[0], resized.size[1], left, top)


def face_crop(img: Image.Image, info: ImageInfo, subset: SubsetConfig, rng: random.Random) -> tuple[Image.Image, Crop]:
    """Scale so the face is between face_crop_aug_range of the crop's shorter side, then crop around the face.

    The scale is drawn from [the smallest that still covers the bucket, ...] as in sd-scripts; with random_crop the
    window also shifts randomly so that more background is seen.
    """
    bw, bh = info.bucket
    w, h = img.size
    cx, cy, fw, fh = info.face
    face_size = max(fw, fh)
    side = min(bw, bh)
    lo, hi = subset.face_crop_aug_range
    cover = max(bw / w, bh / h)
    min_scale = max(cover, min(1.0, max(cover, side / (face_size * hi))))
    max_scale = max(cover, min(1.0, max(min_scale, side / (face_size * lo))))
    scale = min_scale if min_scale >= max_scale else rng.uniform(min_scale, max_scale)
    nw, nh = max(bw, int(w * scale + 0.5)), max(bh, int(h * scale + 0.5))
    resized = resize_image(img, (nw, nh), subset.resize_interpolation)
    offsets = []
    for target, length, centre in ((bw, nw, int(cx * scale + 0.5)), (bh, nh, int(cy * scale + 0.5))):
        p = centre - target // 2
        if subset.random_crop:
            reach = max(length - centre, centre)
            p += rng.randint(0, reach) + rng.randint(0, reach) - reach
        elif lo != hi and face_size > side // 10 and face_size >= 40:
            p += rng.randint(-face_size // 20, face_size // 20)
        offsets.append(max(0, min(p, length - target)))
    left, top = offsets
    return resized.crop((left, top, left + bw, top + bh)), Crop(img.size, nw, nh, left, top)


def color_augment(img: Image.Image, rng: random.Random) -> Image.Image:
    """With probability 1/3: a hue shift of up to +-16 degrees, or a gamma in [0.95, 1.05] (sd-scripts' color_aug)."""
    if rng.random() > 1 / 3:
        return img
    arr = np.asarray(img, dtype=np.float32) / 255.0
    if rng.random() > 0.5:
        shift = rng.uniform(-16.0, 16.0) / 360.0
        hsv = np.asarray(img.convert("HSV"), dtype=np.float32)
        hsv[..., 0] = (hsv[..., 0] + shift * 256.0) % 256.0
        return Image.fromarray(hsv.astype(np.uint8), "HSV").convert("RGB")
    arr = np.power(arr, rng.uniform(0.95, 1.05))
    return Image.fromarray((arr * 255.0 + 0.5).astype(np.uint8), "RGB")


def _to_tensor(img: Image.Image, signed: bool) -> torch.Tensor:
    t = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).float() / 255.0
    return t * 2.0 - 1.0 if signed else t


class TrainDataset(torch.utils.data.Dataset):
    """Map-style dataset whose index is a SampleRequest; see the module docstring for the batch layout."""

    def __init__(self, group: DatasetGroup, max_train_steps: int = 0, latent_cache=None, te_cache=None) -> None:
        self.group = group
        self.max_train_steps = max_train_steps
        self.latent_cache = latent_cache  # library.latent_cache.LatentCache: serve cached latents instead of pixels
        self.te_cache = te_cache  # library.te_cache.TextEncoderOutputCache: serve cached text-encoder outputs

    def __len__(self) -> int:
        return sum(len(ds.train) for ds in self.group.datasets)

    def sample_rng(self, req: SampleRequest) -> random.Random:
        kind = "val" if req.validation else "train"
        return random.Random(f"{self.group.seed}-{kind}-{req.epoch}-{req.batch_number}-{req.position}")

    def __getitem__(self, req: SampleRequest) -> dict:
        ds = self.group.datasets[req.dataset]
        info = (ds.validation if req.validation else ds.train)[req.image]
        subset = ds.config.subsets[info.subset_index]
        # validation samples are fixed: no random crop, flip, colour or caption changes
        rng = None if req.validation else self.sample_rng(req)

        sample: dict = {}
        alpha = None
        if self.latent_cache is not None:
            (rw, rh), (bw, bh) = info.resized_size, info.bucket
            crop = Crop(info.size, rw, rh, (rw - bw) // 2, (rh - bh) // 2)
            crop.flipped = rng is not None and subset.flip_aug and rng.random() < 0.5
            entry = self.latent_cache.get(info)
            suffix = "_flipped" if crop.flipped else ""
            sample["latents_mean"], sample["latents_std"] = entry["mean" + suffix], entry["std" + suffix]
            if subset.alpha_mask:
                alpha = torch.flip(entry["alpha_mask"], dims=[1]) if crop.flipped else entry["alpha_mask"]
        else:
            img = load_image(info.path, keep_alpha=subset.alpha_mask)
            img, crop = fit_to_bucket(img, info, subset, rng)
            if rng is not None and subset.flip_aug and rng.random() < 0.5:
                img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
                crop.flipped = True
            if subset.alpha_mask:
                alpha = torch.from_numpy(np.array(img.getchannel("A"), dtype=np.float32) / 255.0)
                img = img.convert("RGB")
            if rng is not None and subset.color_aug:
                img = color_augment(img, rng)
            sample["image"] = _to_tensor(img, signed=True)

        cond = None
        if info.conditioning_path is not None:
            cimg = load_image(info.conditioning_path)
            cimg = resize_image(cimg, (crop.resized_width, crop.resized_height), subset.resize_interpolation)
            cimg = cimg.crop((crop.left, crop.top, crop.left + info.bucket[0], crop.top + info.bucket[1]))
            if crop.flipped:
                cimg = cimg.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            cond = _to_tensor(cimg, signed=False)

        if self.te_cache is not None:
            caption, sample["text_outputs"] = self.te_cache.draw(info, subset.caption, rng, req.epoch)
        elif rng is None:
            caption = process_caption(info.caption, _fixed(subset), random.Random(0), req.epoch, 0, 0)
        else:
            caption = process_caption(info.caption, subset.caption, rng, req.epoch, req.step, self.max_train_steps)
        return sample | {
            "caption": caption,
            "loss_weight": ds.config.prior_loss_weight if info.is_reg else 1.0,
            "network_multiplier": ds.config.network_multiplier,
            "original_size_hw": (crop.original_size[1], crop.original_size[0]),
            # after a flip the crop is seen from the other side: mirror its left edge
            "crop_top_left": (crop.top, crop.resized_width - crop.left - info.bucket[0] if crop.flipped else crop.left),
            "target_size_hw": (info.bucket[1], info.bucket[0]),
            "alpha_mask": alpha,
            "conditioning_image": cond,
            "flipped": crop.flipped,
            "image_key": info.key,
            "position": req.position,
            "batch_number": req.batch_number,
            "loss_scale": req.loss_scale,
        }


def _fixed(subset: SubsetConfig):
    """Caption options with every random step off (validation captions are the plain caption)."""
    from dataclasses import replace

    return replace(
        subset.caption,
        caption_dropout_rate=0.0,
        caption_dropout_every_n_epochs=0,
        caption_tag_dropout_rate=0.0,
        shuffle_caption=False,
        token_warmup_step=0,
    )


def collate(samples: list[dict]) -> dict:
    """Stack samples of one bucket into a batch (see the module docstring)."""
    masks = [s["alpha_mask"] for s in samples]
    conds = [s["conditioning_image"] for s in samples]
    if any(m is not None for m in masks):
        h, w = samples[0]["target_size_hw"]
        masks = [m if m is not None else torch.ones(h, w) for m in masks]
    text_outputs = None
    if "text_outputs" in samples[0]:
        text_outputs = {}
        for name in samples[0]["text_outputs"]:
            parts = [s["text_outputs"][name] for s in samples]
            if any(p.shape != parts[0].shape for p in parts):
                shapes = ", ".join(f"{s['image_key']}: {tuple(p.shape)}" for s, p in zip(samples, parts))
                raise ValueError(f"cached text-encoder output {name!r} differs in shape within a batch ({shapes})")
            text_outputs[name] = torch.stack(parts)
    if "image" in samples[0]:
        pixels = {"images": torch.stack([s["image"] for s in samples])}
    else:
        pixels = {
            "latents_mean": torch.stack([s["latents_mean"] for s in samples]),
            "latents_std": torch.stack([s["latents_std"] for s in samples]),
        }
    return pixels | {
        "captions": [s["caption"] for s in samples],
        "loss_weights": torch.tensor([s["loss_weight"] for s in samples], dtype=torch.float32),
        "network_multipliers": torch.tensor([s["network_multiplier"] for s in samples], dtype=torch.float32),
        "original_sizes_hw": torch.tensor([s["original_size_hw"] for s in samples], dtype=torch.long),
        "crop_top_lefts": torch.tensor([s["crop_top_left"] for s in samples], dtype=torch.long),
        "target_sizes_hw": torch.tensor([s["target_size_hw"] for s in samples], dtype=torch.long),
        "alpha_masks": torch.stack(masks) if masks[0] is not None else None,
        "conditioning_images": torch.stack(conds) if conds[0] is not None else None,
        "flipped": torch.tensor([s["flipped"] for s in samples], dtype=torch.bool),
        "image_keys": [s["image_key"] for s in samples],
        "positions": torch.tensor([s["position"] for s in samples], dtype=torch.long),
        "batch_number": samples[0]["batch_number"],
        "loss_scales": torch.tensor([s["loss_scale"] for s in samples], dtype=torch.float32),
        "text_outputs": text_outputs,
    }


class EpochBatchSampler:
    """Batch sampler over SampleRequests for one epoch at a time; `set_epoch` picks the epoch, `skip_batches` resumes.

    With several processes, every process walks the same batch order; each batch holds batch_size x num_processes
    images of one bucket and each process takes its contiguous share. loss_scale makes the processes' summed losses
    equal the mean over the shared batch, so N processes train exactly like one with N times the batch size. A process
    whose share of a short last batch is empty gets one copy of the first image with loss_scale 0.
    """

    def __init__(
        self,
        group: DatasetGroup,
        validation: bool = False,
        num_processes: int = 1,
        process_index: int = 0,
        batches_per_step: int = 1,
    ) -> None:
        self.group = group
        self.validation = validation
        self.num_processes = num_processes
        self.process_index = process_index
        self.batches_per_step = batches_per_step
        self.epoch = 1
        self.skip = 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch = epoch
        self.skip = skip_batches

    def __len__(self) -> int:
        return self.group.num_batches_per_epoch(self.validation, self.num_processes) - self.skip

    def __iter__(self):
        batches = self.group.epoch_batches(self.epoch, self.validation, self.num_processes)
        first = (self.epoch - 1) * len(batches)
        first_step = (self.epoch - 1) * math.ceil(len(batches) / self.batches_per_step)
        p, n_proc = self.process_index, self.num_processes
        for n, (d, images) in enumerate(batches):
            if n < self.skip:
                continue
            size = len(images)
            lo, hi = p * size // n_proc, (p + 1) * size // n_proc
            step = first_step + accumulation_group(n, len(batches), self.batches_per_step)[0]
            place = (self.epoch, first + n)
            share = [SampleRequest(d, images[i], *place, i, self.validation, n_proc / size, step) for i in range(lo, hi)]
            yield share or [SampleRequest(d, images[0], *place, 0, self.validation, 0.0, step)]


def leave_stop_signals_to_the_trainer(worker_id: int) -> None:
    """Data-loader workers ignore Ctrl-C and SIGTERM (sent to the whole process group): the training process stops at
    a step boundary, saves, and then ends its workers. A worker killed by the signal would fail the last steps."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class BatchLoader(torch.utils.data.DataLoader):
    """A DataLoader whose workers are ended as soon as a batch fails, so that the error can be reported and the process
    can exit (the workers ignore SIGTERM, and a failed iterator lives on in the error's traceback). An image that cannot
    be decoded arrives as one ImageReadError line naming the file, whichever process decoded it."""

    def __iter__(self):
        it = super().__iter__()
        try:
            yield from it
            return
        except ImageReadError as e:
            message = str(e)  # raised below, outside this handler: the new error holds no worker traceback
        except BaseException:
            _end_workers(it)
            raise
        _end_workers(it)
        del it
        raise ImageReadError(message)


def _end_workers(it) -> None:
    shutdown = getattr(it, "_shutdown_workers", None)  # multi-process iterators only
    if shutdown is not None:
        shutdown()


def make_data_loader(
    group: DatasetGroup,
    num_workers: int = 0,
    max_train_steps: int = 0,
    batches_per_step: int = 1,
    validation: bool = False,
    persistent_workers: bool = False,
    latent_cache=None,
    num_processes: int = 1,
    process_index: int = 0,
    te_cache=None,
    pin_memory: bool = False,
) -> torch.utils.data.DataLoader:
    """A DataLoader of whole bucket batches; call `loader.batch_sampler.set_epoch(e)` before each epoch. pin_memory
    (for a CUDA device): batches arrive in pinned memory, pinned by a background thread, so their copies to the device
    run asynchronously."""
    return BatchLoader(
        TrainDataset(group, max_train_steps, latent_cache, te_cache),
        batch_sampler=EpochBatchSampler(group, validation, num_processes, process_index, batches_per_step),
        collate_fn=collate,
        num_workers=num_workers,
        persistent_workers=persistent_workers and num_workers > 0,
        pin_memory=pin_memory,
        worker_init_fn=leave_stop_signals_to_the_trainer,
        generator=torch.Generator(),  # its own: creating an iterator must not draw from torch's global RNG (resume)
    )
