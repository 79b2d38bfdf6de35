"""Datasets from resolved configs: finding images and captions, the validation split, regularisation balance,
bucket assignment and the per-epoch batch order. Scanning decodes no pixels, and torch is not imported:
`tools/check_dataset.py` uses this module as it is, and the trainers' data loader sits on top of it.

Every problem found (unreadable image, missing caption, missing conditioning image, ...) is collected as a `Problem`
naming its file, so a dataset can be checked completely before a model is loaded. Scanning reads image headers only;
`decode_problems` decodes images in threads to find truncated or corrupt files (tools/check_dataset.py, and the
trainers for the images they decode while training).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
from collections import Counter
from dataclasses import dataclass, field

from library.bucketing import BucketChoice, BucketSelector
from library.config_util import CONTROLNET, FINETUNING, DatasetConfig, SubsetConfig
from library.image_util import ImageReadError, image_extensions, list_images, load_image, read_image_size

logger = logging.getLogger(__name__)

METADATA_CACHE_NAME = "metadata_cache.json"


@dataclass
class Problem:
    file: str
    problem: str
    severity: str  # "error" or "warning"

    def __str__(self) -> str:
        return f"{self.severity}: {self.file}: {self.problem}"


class DatasetError(Exception):
    """The dataset has problems of severity "error"; the message lists them with their files."""


@dataclass
class ImageInfo:
    """One image of a dataset, with everything needed to load and crop it; no pixels."""

    key: str  # the image path, or the metadata key for fine-tuning datasets
    path: str
    size: tuple[int, int]  # (w, h), upright
    caption: str  # raw caption; several lines only with enable_wildcard
    subset_index: int
    is_reg: bool = False
    num_repeats: int = 1
    has_caption: bool = True
    conditioning_path: str | None = None
    face: tuple[int, int, int, int] | None = None  # (cx, cy, w, h) from a "_cx_cy_w_h" file name
    bucket: tuple[int, int] | None = None
    resized_size: tuple[int, int] | None = None
    ar_error: float = 0.0


@dataclass
class SubsetStats:
    images: int = 0  # all images found, before the validation split
    with_caption: int = 0
    validation: int = 0


# ---------------------------------------------------------------------------------------------------------------------
# Captions and sizes


def read_caption_file(image_path: str, extension: str, enable_wildcard: bool) -> str | None:
    """Caption for an image from `<stem><extension>` (or the stem without a `_cx_cy_w_h` face suffix).

    The first line only, unless wildcards are on: then all non-empty lines, joined by newlines. None if no file.
    """
    stem = os.path.splitext(image_path)[0]
    candidates = [stem + extension]
    parts = stem.split("_")
    if len(parts) >= 5:
        candidates.append("_".join(parts[:-4]) + extension)
    for path in candidates:
        if os.path.isfile(path):
            with open(path, encoding="utf-8-sig") as f:
                try:
                    lines = [line.strip() for line in f.read().splitlines()]
                except UnicodeDecodeError as e:
                    raise ValueError(f"caption file {path} is not UTF-8 text: {e}") from None
            lines = [line for line in lines if line]
            if enable_wildcard:
                return "\n".join(lines)
            return lines[0] if lines else ""
    return None


def face_from_name(path: str) -> tuple[int, int, int, int] | None:
    """(cx, cy, w, h) from a file name ending in _cx_cy_w_h (tools/detect_face_rotate.py's naming)."""
    parts = os.path.splitext(os.path.basename(path))[0].split("_")
    if len(parts) < 5:
        return None
    try:
        cx, cy, w, h = (int(p) for p in parts[-4:])
    except ValueError:
        return None
    return (cx, cy, w, h) if w > 0 and h > 0 else None


def _file_signature(path: str) -> list[int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


class MetadataCache:
    """`metadata_cache.json` of an image folder (sd-scripts' cache_info): {path: {caption, resolution}}.

    kiln adds the image's and caption's size and mtime to each entry and re-reads entries that do not match,
    so an edited image or caption is never served stale. Entries written by sd-scripts (without them) are re-read.
    """

    def __init__(self, folder: str) -> None:
        self.path = os.path.join(folder, METADATA_CACHE_NAME)
        self.entries: dict = {}
        self.dirty = False
        if os.path.isfile(self.path):
            try:
                with open(self.path, encoding="utf-8") as f:
                    self.entries = json.load(f)
            except (OSError, ValueError):
                logger.warning(f"{self.path} cannot be read; it will be rebuilt")

    def get(self, image_path: str, caption_path: str) -> dict | None:
        entry = self.entries.get(image_path)
        if not entry or "image_sig" not in entry:
            return None
        if entry["image_sig"] != _file_signature(image_path) or entry.get("caption_sig") != _file_signature(caption_path):
            return None
        return entry

    def put(self, image_path: str, caption_path: str, caption: str | None, size: tuple[int, int]) -> None:
        self.entries[image_path] = {
            "caption": caption,
            "resolution": list(size),
            "image_sig": _file_signature(image_path),
            "caption_sig": _file_signature(caption_path),
        }
        self.dirty = True

    def save(self) -> None:
        if not self.dirty:
            return
        tmp = self.path + ".tmp"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(self.entries, f, ensure_ascii=False)
            os.replace(tmp, self.path)
        except OSError as e:
            logger.warning(f"cannot write {self.path}: {e}")


# ---------------------------------------------------------------------------------------------------------------------
# Scanning subsets


def _scan_folder_subset(subset: SubsetConfig, index: int, problems: list[Problem]) -> list[ImageInfo]:
    """DreamBooth or ControlNet subset: every image in image_dir, with side-car captions."""
    if not subset.image_dir or not os.path.isdir(subset.image_dir):
        problems.append(Problem(str(subset.image_dir), "image_dir is not a folder", "error"))
        return []
    paths = list_images(subset.image_dir)
    if not paths:
        problems.append(Problem(subset.image_dir, "no images in this folder", "warning"))
    cache = MetadataCache(subset.image_dir) if subset.cache_info else None
    fallback = subset.class_tokens or ""
    infos = []
    for path in paths:
        caption_path = os.path.splitext(path)[0] + subset.caption_extension
        cached = cache.get(path, caption_path) if cache else None
        try:
            if cached:
                caption, size = cached["caption"], tuple(cached["resolution"])
            else:
                caption = read_caption_file(path, subset.caption_extension, subset.caption.enable_wildcard)
                size = read_image_size(path)
                if cache:
                    cache.put(path, caption_path, caption, size)
        except (ImageReadError, ValueError) as e:
            problems.append(Problem(path, str(e), "error"))
            continue
        if caption is None:
            what = f"the class tokens '{subset.class_tokens}'" if subset.class_tokens else "an empty caption"
            problems.append(Problem(path, f"no caption file {os.path.basename(caption_path)}; {what} is used", "warning"))
        info = ImageInfo(
            key=path,
            path=path,
            size=size,
            caption=fallback if caption is None else caption,
            subset_index=index,
            is_reg=subset.is_reg,
            num_repeats=subset.num_repeats,
            has_caption=caption is not None,
        )
        infos.append(info)
    if cache:
        cache.save()
    if subset.kind == CONTROLNET:
        _attach_conditioning_images(subset, infos, problems)
    return infos


def _attach_conditioning_images(subset: SubsetConfig, infos: list[ImageInfo], problems: list[Problem]) -> None:
    """Match each image with the conditioning image of the same file stem; a missing one is an error."""
    cdir = subset.conditioning_data_dir
    if not cdir or not os.path.isdir(cdir):
        problems.append(Problem(str(cdir), "conditioning_data_dir is not a folder", "error"))
        infos.clear()
        return
    by_stem = {os.path.splitext(os.path.basename(p))[0]: p for p in list_images(cdir)}
    used = set()
    kept = []
    for info in infos:
        stem = os.path.splitext(os.path.basename(info.path))[0]
        if stem not in by_stem:
            problems.append(Problem(info.path, f"no conditioning image named {stem}.* in {cdir}", "error"))
            continue
        info.conditioning_path = by_stem[stem]
        used.add(stem)
        kept.append(info)
    for stem in sorted(set(by_stem) - used):
        problems.append(Problem(by_stem[stem], "conditioning image without a training image of the same name; unused", "warning"))
    infos[:] = kept


def read_metadata_file(path: str) -> dict:
    """Fine-tuning metadata: JSON {key: {caption, tags, image_size}} or JSONL lines {image_path, caption, tags, image_size}."""
    with open(path, encoding="utf-8") as f:
        if path.lower().endswith(".jsonl"):
            out = {}
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    item = json.loads(line)
                except ValueError as e:
                    raise ValueError(f"line {n} is not JSON: {e}") from None
                if not isinstance(item, dict) or "image_path" not in item:
                    raise ValueError(f"line {n} has no image_path")
                out[item["image_path"]] = item
            return out
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError("the top level must be an object {image key: {caption, tags, image_size}}")
    return data


def _find_metadata_image(key: str, image_dir: str | None) -> str | None:
    if os.path.isfile(key):
        return key
    if image_dir:
        direct = os.path.join(image_dir, key)
        if os.path.isfile(direct) and os.path.splitext(key)[1].lower() in image_extensions():
            return direct
        for ext in sorted(image_extensions()):
            for candidate in (direct + ext, direct + ext.upper()):
                if os.path.isfile(candidate):
                    return candidate
    return None


def _scan_metadata_subset(subset: SubsetConfig, index: int, problems: list[Problem]) -> list[ImageInfo]:
    """Fine-tuning subset: images and captions from the metadata file."""
    try:
        metadata = read_metadata_file(subset.metadata_file)
    except (OSError, ValueError) as e:
        problems.append(Problem(subset.metadata_file, f"cannot read metadata: {e}", "error"))
        return []
    sep = subset.caption.caption_separator
    infos = []
    for key, md in metadata.items():
        path = _find_metadata_image(key, subset.image_dir)
        if path is None:
            where = f" or in {subset.image_dir}" if subset.image_dir else ""
            problems.append(Problem(key, f"image listed in {subset.metadata_file} not found as a file{where}", "error"))
            continue
        md = md if isinstance(md, dict) else {}
        caption, tags = md.get("caption"), md.get("tags")
        if caption is None:
            caption, tags = tags, None
        if subset.caption.enable_wildcard:
            if tags:
                tags = tags.replace("\n", sep)
            if caption is not None and tags:
                caption = "\n".join(f"{line}{sep}{tags}" for line in caption.split("\n") if line.strip())
        elif tags:
            caption = caption + sep + tags
        try:
            size = tuple(md["image_size"]) if md.get("image_size") else read_image_size(path)
        except ImageReadError as e:
            problems.append(Problem(path, str(e), "error"))
            continue
        if caption is None:
            problems.append(Problem(path, f"no caption or tags in {subset.metadata_file}; an empty caption is used", "warning"))
        infos.append(
            ImageInfo(
                key=key,
                path=path,
                size=(int(size[0]), int(size[1])),
                caption=caption or "",
                subset_index=index,
                num_repeats=subset.num_repeats,
                has_caption=caption is not None,
            )
        )
    return infos


# ---------------------------------------------------------------------------------------------------------------------
# Splitting, balancing, bucketing


def split_validation(infos: list[ImageInfo], fraction: float, seed: int) -> tuple[list[ImageInfo], list[ImageInfo]]:
    """Deterministic split of one subset: shuffle by `seed`, the last round(n * fraction) images validate.

    The two parts never overlap, and at least one image stays for training.
    """
    if fraction <= 0 or len(infos) < 2:
        return list(infos), []
    order = sorted(infos, key=lambda i: i.key)
    random.Random(seed).shuffle(order)
    n_val = min(len(order) - 1, int(len(order) * fraction + 0.5))
    return order[: len(order) - n_val], order[len(order) - n_val :]


def balance_regularisation(train: list[ImageInfo], reg: list[ImageInfo]) -> list[ImageInfo]:
    """Give the regularisation images repeats so that they count as many samples per epoch as the training images.

    Each reg image first counts its own num_repeats; then one repeat at a time is added round-robin until the
    total reaches the training count. Reg images beyond that count are left out (a warning says how many).
    """
    target = sum(i.num_repeats for i in train)
    if not reg or target == 0:
        return []
    used: list[ImageInfo] = []
    total = 0
    for info in reg:
        if total >= target:
            break
        used.append(info)
        total += info.num_repeats
    k = 0
    while total < target:
        used[k % len(used)].num_repeats += 1
        total += 1
        k += 1
    if len(used) < len(reg):
        logger.warning(f"{len(reg) - len(used)} regularisation images are more than the training images need and are not used")
    return used


@dataclass
class Dataset:
    """One [[datasets]] entry after scanning: its training and validation images, buckets and problems."""

    config: DatasetConfig
    train: list[ImageInfo] = field(default_factory=list)  # training and regularisation images
    validation: list[ImageInfo] = field(default_factory=list)
    subset_stats: list[SubsetStats] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    @property
    def num_train_images(self) -> int:
        """Training samples per epoch, repeats counted (regularisation excluded), as sd-scripts' ss_num_train_images."""
        return sum(i.num_repeats for i in self.train if not i.is_reg)

    @property
    def num_reg_images(self) -> int:
        return sum(i.num_repeats for i in self.train if i.is_reg)

    def bucket_images(self, include_reg: bool = False) -> dict[tuple[int, int], int]:
        """Distinct training images per bucket resolution (repeats not counted), sorted by resolution."""
        counts = Counter(i.bucket for i in self.train if include_reg or not i.is_reg)
        return dict(sorted(counts.items()))

    def bucket_info(self) -> dict:
        """sd-scripts' ss_bucket_info: samples per bucket (repeats counted) and the mean |aspect-ratio error|."""
        counts = Counter()
        for info in self.train:
            counts[info.bucket] += info.num_repeats
        buckets = {i: {"resolution": list(reso), "count": n} for i, (reso, n) in enumerate(sorted(counts.items()))}
        errors = [abs(i.ar_error) for i in self.train]
        return {"buckets": buckets, "mean_img_ar_error": sum(errors) / len(errors) if errors else 0.0}

    def epoch_batches(self, rng: random.Random, validation: bool = False, batch_multiplier: int = 1) -> list[list[int]]:
        """Batches of indices into `train` (or `validation`) for one epoch, never mixing buckets.

        A training image appears num_repeats times (a validation image once); each bucket is shuffled, then cut
        into batches of batch_size x batch_multiplier (the last one of a bucket may be smaller); several processes
        share each such batch (batch_multiplier = number of processes).
        """
        images = self.validation if validation else self.train
        by_bucket: dict[tuple[int, int], list[int]] = {}
        for idx, info in enumerate(images):
            by_bucket.setdefault(info.bucket, []).extend([idx] * (1 if validation else info.num_repeats))
        bs = self.config.batch_size * batch_multiplier
        batches = []
        for reso in sorted(by_bucket):
            members = by_bucket[reso]
            rng.shuffle(members)
            batches.extend(members[i : i + bs] for i in range(0, len(members), bs))
        return batches

    def num_batches(self, validation: bool = False, batch_multiplier: int = 1) -> int:
        counts = Counter()
        for info in self.validation if validation else self.train:
            counts[info.bucket] += 1 if validation else info.num_repeats
        return sum(math.ceil(n / (self.config.batch_size * batch_multiplier)) for n in counts.values())


def _assign_buckets(ds: Dataset, images: list[ImageInfo]) -> None:
    cfg = ds.config
    selector = BucketSelector(
        cfg.resolution, cfg.enable_bucket, cfg.bucket_no_upscale, cfg.min_bucket_reso, cfg.max_bucket_reso, cfg.bucket_reso_steps
    )
    kept = []
    for info in images:
        w, h = info.size
        subset = cfg.subsets[info.subset_index]
        try:
            if not cfg.enable_bucket and subset.random_crop and w >= cfg.resolution[0] and h >= cfg.resolution[1]:
                # sd-scripts without buckets: a larger image is randomly cropped at its own scale, not resized
                choice = BucketChoice(cfg.resolution, (w, h), 0.0)
            else:
                choice = selector.select(w, h)
        except ValueError as e:
            ds.problems.append(Problem(info.path, str(e), "error"))
            continue
        info.bucket, info.resized_size, info.ar_error = choice.bucket, choice.resized_size, choice.ar_error
        if choice.resized_size[0] > w or choice.resized_size[1] > h:
            ds.problems.append(
                Problem(
                    info.path,
                    f"{w}x{h} image is upscaled to {choice.resized_size[0]}x{choice.resized_size[1]} for its "
                    f"{choice.bucket[0]}x{choice.bucket[1]} bucket",
                    "warning",
                )
            )
        kept.append(info)
    images[:] = kept


def build_dataset(config: DatasetConfig, seed: int | None = None) -> Dataset:
    """Scan a dataset's subsets; split, balance and bucket its images; collect its problems (never raises for data)."""
    ds = Dataset(config)
    val_seed = config.validation_seed if config.validation_seed is not None else (seed if seed is not None else 0)
    train, reg = [], []
    for index, subset in enumerate(config.subsets):
        scan = _scan_metadata_subset if subset.kind == FINETUNING else _scan_folder_subset
        infos = scan(subset, index, ds.problems)
        if subset.face_crop_aug_range is not None:
            for info in infos:
                info.face = face_from_name(info.path)
        stats = SubsetStats(images=len(infos), with_caption=sum(i.has_caption for i in infos))
        if subset.is_reg:
            reg.extend(infos)
        else:
            kept, held_out = split_validation(infos, config.validation_split, val_seed)
            stats.validation = len(held_out)
            train.extend(kept)
            ds.validation.extend(held_out)
        ds.subset_stats.append(stats)
    ds.train = train + balance_regularisation(train, reg)
    _assign_buckets(ds, ds.train)
    _assign_buckets(ds, ds.validation)
    if not any(not i.is_reg for i in ds.train):
        ds.problems.append(Problem(config.name, "no training images", "error"))
    return ds


def build_datasets(configs: list[DatasetConfig], seed: int | None = None) -> list[Dataset]:
    return [build_dataset(c, seed) for c in configs]


def errors_of(datasets: list[Dataset]) -> list[Problem]:
    return [p for ds in datasets for p in ds.problems if p.severity == "error"]


def raise_on_errors(datasets: list[Dataset]) -> None:
    """Raise DatasetError listing every error-severity problem (for trainers, before the model loads)."""
    errors = errors_of(datasets)
    if errors:
        shown = "\n  ".join(str(p) for p in errors[:50])
        more = f"\n  ... and {len(errors) - 50} more" if len(errors) > 50 else ""
        raise DatasetError(
            f"the dataset has {len(errors)} error(s); run tools/check_dataset.py for a full report:\n  {shown}{more}"
        )


def image_paths(datasets: list[Dataset], images: bool = True, conditioning: bool = True) -> list[str]:
    """The distinct image files (training, regularisation, validation) and/or conditioning image files, sorted."""
    found = set()
    for ds in datasets:
        for info in ds.train + ds.validation:
            found.update(p for p in ((info.path if images else None), (info.conditioning_path if conditioning else None)) if p)
    return sorted(found)


def decode_problems(paths: list[str], workers: int) -> list[Problem]:
    """Decode every image of `paths` once, in `workers` threads, to find truncated or corrupt files."""
    from concurrent.futures import ThreadPoolExecutor

    def check(path: str) -> Problem | None:
        try:
            load_image(path)
        except ImageReadError as e:
            return Problem(path, str(e), "error")
        return None

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return [p for p in pool.map(check, paths) if p is not None]


def raise_on_undecodable(paths: list[str], workers: int) -> None:
    """Raise DatasetError (one line naming the files and what to do) if any image of `paths` cannot be decoded."""
    bad = decode_problems(paths, workers)
    if len(bad) == 1:
        raise DatasetError(bad[0].problem)
    if bad:
        shown = ", ".join(p.file for p in bad[:10]) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
        raise DatasetError(
            f"{len(bad)} images cannot be decoded (truncated or corrupt): {shown}; remove them or re-save them with an "
            "image editor (tools/check_dataset.py shows each one's error)"
        )


class DatasetGroup:
    """All datasets of a run and their shared per-epoch batch order, reproducible from (seed, epoch)."""

    def __init__(self, datasets: list[Dataset], seed: int = 0) -> None:
        self.datasets = datasets
        self.seed = seed

    def epoch_batches(self, epoch: int, validation: bool = False, batch_multiplier: int = 1) -> list[tuple[int, list[int]]]:
        """(dataset index, image indices) for every batch of `epoch` (1-based), in training order.

        Validation batches come in a fixed order, the same every epoch."""
        rng = random.Random(self.seed if validation else self.seed + epoch)
        batches = [(d, b) for d, ds in enumerate(self.datasets) for b in ds.epoch_batches(rng, validation, batch_multiplier)]
        if not validation:
            rng.shuffle(batches)
        return batches

    def num_batches_per_epoch(self, validation: bool = False, batch_multiplier: int = 1) -> int:
        return sum(ds.num_batches(validation, batch_multiplier) for ds in self.datasets)
