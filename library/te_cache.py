"""Text-encoder output caching for families whose text encoders are frozen (SDXL now; SD3 and FLUX later).

Each image's caption is encoded once, kept in memory or in a safetensors file next to the image, and served to the
data loader instead of running the text encoders every step.

What an entry holds
    An entry belongs to one image (keyed by its path) and holds one or more processed captions, "variants", with the
    encoder outputs of each. On disk it is `<image stem>_<arch>_te.safetensors`, next to the image, with tensors
    `v<k>.<name>` (name = a key of what `encode` returns, e.g. SDXL's `hidden_state1`, `hidden_state2`, `pool2`, without
    the batch dimension, in the encoder's output dtype: bf16 stays bf16) and string metadata:
      format_version  TE_CACHE_FORMAT_VERSION
      architecture    the family ("sdxl", ...)
      identity        JSON (sorted keys) of everything besides the caption that changes the outputs (text-encoder
                      fingerprints, tokenizer settings, max_token_length, clip_skip, weighted captions, family options)
      captions        JSON list: the processed caption text of each variant
      outputs         JSON list of the output names
    An entry is valid only if all of these equal what the current run expects and every `v<k>.<name>` tensor is there;
    anything else (an edited caption file, other caption options, another text encoder or tokenizer setting, more
    variants asked for, a damaged file) rebuilds it. Captions are compared as processed texts, so a change that does
    not change the texts (say, another caption_dropout_rate) keeps the cache. In memory (cache_to_disk=False) the
    entries are `CachedTexts` in `TextEncoderOutputCache.memory`, keyed by image path.

Caption augmentation with a cache (sd-scripts refuses caching when captions are random)
    For a subset whose caption pipeline is random (shuffle_caption, caption_tag_dropout_rate, enable_wildcard), an
    image gets `variants` processed captions, variant k drawn by captions.caption_variants with an rng seeded from the
    image's file name and k (so moving the dataset folder keeps its cache), with whole-caption dropout off. Each
    training step picks one variant uniformly with the sample's own rng (captions.draw_caption_variant). Variants that
    all come out equal are stored once; a subset whose captions are not random has one variant.
    Caption dropout (caption_dropout_rate and caption_dropout_every_n_epochs) is drawn per step, as without a cache: a
    dropped caption uses the outputs of the empty caption "", one shared entry: in memory under the key "" (EMPTY_KEY);
    on disk `_<arch>_te_empty_caption.safetensors` in each folder holding images of a subset with caption dropout (a
    name that no image's cache file can have). So a complete disk cache needs no encoding at all.
    Token warm-up (token_warmup_step > 0) depends on the training step and cannot be cached: fill() refuses it.
    Validation samples use variant 0 and never drop the caption.

Several processes
    Disk entries are shared out by index % num_processes over a list every process builds in the same order; each
    process writes its own files (atomically). Call a barrier after fill() before training reads the files. Memory
    caches are filled by every process for itself.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Callable
from dataclasses import dataclass

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes
from tqdm import tqdm

from library.captions import CaptionOptions, caption_variants, draw_caption_variant, has_caption_dropout, without_caption_dropout
from library.datasets import DatasetGroup, ImageInfo
from library.saving import atomic_write_bytes

logger = logging.getLogger(__name__)

TE_CACHE_FORMAT_VERSION = "1"
EMPTY_KEY = ""  # memory key of the shared empty-caption entry

# encode(captions) -> {output name: tensor with the captions along dim 0}
EncodeFn = Callable[[list[str]], dict[str, torch.Tensor]]


def te_cache_path(image_path: str, arch: str) -> str:
    return f"{os.path.splitext(image_path)[0]}_{arch}_te.safetensors"


def empty_caption_path(folder: str, arch: str) -> str:
    return os.path.join(folder, f"_{arch}_te_empty_caption.safetensors")


def _subset_name(group: DatasetGroup, d: int, n: int) -> str:
    ds = group.datasets[d]
    subset = ds.config.subsets[n]
    source = subset.image_dir or subset.metadata_file
    return f"{ds.config.name}.subsets[{n}]" + (f" ({source})" if source else "")


def check_cacheable(group: DatasetGroup) -> None:
    """Text-encoder outputs can be cached only for captions that do not depend on the training step."""
    for d, ds in enumerate(group.datasets):
        for n, subset in enumerate(ds.config.subsets):
            if subset.caption.token_warmup_step > 0:
                raise ValueError(
                    f"{_subset_name(group, d, n)}: token warm-up (token_warmup_step={subset.caption.token_warmup_step}) "
                    "changes the caption with the training step, so text-encoder outputs cannot be cached; "
                    "turn off token warm-up or text-encoder output caching"
                )


@dataclass
class CachedTexts:
    """One in-memory entry: the processed caption of each variant and its encoder outputs (no batch dimension)."""

    captions: list[str]
    outputs: list[dict[str, torch.Tensor]]


@dataclass
class _Job:
    key: str  # image path, or EMPTY_KEY
    path: str | None  # the cache file (disk caches)
    captions: list[str]
    what: str  # for messages


class TextEncoderOutputCache:
    """Cached text-encoder outputs of every image of a DatasetGroup; see the module docstring.

    arch: family name, part of the file names ("sdxl"). encode: captions -> dict of batched output tensors; called in
    batches of `batch_size` captions under torch.no_grad(). identity: JSON-serialisable description of everything
    besides the caption that changes the outputs. variants: captions cached per image of a subset with random captions.
    """

    def __init__(
        self,
        arch: str,
        encode: EncodeFn | None,
        identity: dict,
        cache_to_disk: bool,
        batch_size: int = 8,
        variants: int = 1,
    ) -> None:
        if batch_size < 1 or variants < 1:
            raise ValueError(f"batch_size and variants must be at least 1 (got {batch_size} and {variants})")
        try:
            self.identity_json = json.dumps(identity, sort_keys=True)
        except TypeError as e:
            raise TypeError(f"the text-encoder cache identity must be JSON-serialisable: {e}") from None
        self.arch = arch
        self.encode = encode
        self.identity = identity
        self.cache_to_disk = cache_to_disk
        self.batch_size = batch_size
        self.variants = variants
        self.memory: dict[str, CachedTexts] = {}
        self._empty_by_folder: dict[str, dict[str, torch.Tensor]] = {}  # disk: empty entries read so far

    def __getstate__(self) -> dict:
        # data-loader workers get the cache without the encoder (it may hold models and is not needed to read)
        return self.__dict__ | {"encode": None}

    # -----------------------------------------------------------------------------------------------------------------
    # What the run needs

    def _jobs(self, group: DatasetGroup) -> list[_Job]:
        """Every entry the run needs, in the same order in every process; an image used twice is one job."""
        jobs: dict[str, _Job] = {}
        empty_folders: dict[str, None] = {}
        thin_subsets = set()
        for d, ds in enumerate(group.datasets):
            for validation, infos in ((False, ds.train), (True, ds.validation)):
                for info in infos:
                    opts = ds.config.subsets[info.subset_index].caption
                    # validation uses variant 0 only, which does not depend on how many variants there are
                    n = 1 if validation else self.variants
                    captions = caption_variants(info.caption, opts, os.path.basename(info.key), n)
                    if not validation and has_caption_dropout(opts):
                        empty_folders[os.path.dirname(info.path)] = None
                    if not validation and self.variants == 1 and without_caption_dropout(opts).is_random():
                        if len(caption_variants(info.caption, opts, os.path.basename(info.key), 2)) > 1:
                            thin_subsets.add((d, info.subset_index))
                    job = jobs.get(info.path)
                    if job is None:
                        path = te_cache_path(info.path, self.arch) if self.cache_to_disk else None
                        jobs[info.path] = _Job(info.path, path, captions, info.path)
                    elif job.captions != captions:
                        if len(captions) == 1 and captions[0] == job.captions[0]:
                            continue  # a validation use of an image also trained on: variant 0 is there
                        if len(job.captions) == 1 and job.captions[0] == captions[0]:
                            job.captions = captions
                            continue
                        raise ValueError(
                            f"{info.path} is used by two subsets with different captions or caption options; its "
                            "text-encoder outputs cannot be cached for both (one cache file per image): make the "
                            "captions agree or turn off text-encoder output caching"
                        )
        for d, n in sorted(thin_subsets):
            logger.warning(
                f"{_subset_name(group, d, n)}: captions are random (shuffle, tag dropout or wildcards) but one caption "
                "variant per image is cached, so each image always gets the same processed caption; cache more variants"
            )
        out = list(jobs.values())
        if self.cache_to_disk:
            out += [_Job(EMPTY_KEY, empty_caption_path(f, self.arch), [""], "the empty caption") for f in empty_folders]
        elif empty_folders:
            out.append(_Job(EMPTY_KEY, None, [""], "the empty caption"))
        return out

    def _file_is_valid(self, path: str, captions: list[str]) -> bool:
        if not os.path.isfile(path):
            return False
        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                keys = set(f.keys())
            stored = json.loads(meta["captions"])
            names = json.loads(meta["outputs"])
        except Exception:
            return False
        return (
            meta.get("format_version") == TE_CACHE_FORMAT_VERSION
            and meta.get("architecture") == self.arch
            and meta.get("identity") == self.identity_json
            and stored == captions
            and bool(names)
            and keys == {f"v{k}.{name}" for k in range(len(captions)) for name in names}
        )

    def _is_valid(self, job: _Job) -> bool:
        if job.path is not None:
            return self._file_is_valid(job.path, job.captions)
        entry = self.memory.get(job.key)
        return entry is not None and entry.captions == job.captions

    # -----------------------------------------------------------------------------------------------------------------
    # Filling

    def fill(self, group: DatasetGroup, process_index: int = 0, num_processes: int = 1, show_progress: bool = True) -> int:
        """Encode every entry that is missing or stale; returns how many entries this process (re)built.

        Entries are images plus, where a subset uses caption dropout, the empty caption. Raises ValueError before
        encoding anything for token warm-up or for an image that two subsets caption differently.
        """
        check_cacheable(group)
        jobs = self._jobs(group)
        if self.cache_to_disk:
            jobs = [j for n, j in enumerate(jobs) if n % num_processes == process_index]
        todo = [j for j in jobs if not self._is_valid(j)]
        if todo and self.encode is None:
            raise RuntimeError(f"{len(todo)} text-encoder cache entries are missing or stale and this cache has no encoder")
        bar = tqdm(total=len(todo), desc="caching text-encoder outputs", disable=not show_progress or not todo)
        pending: list[_Job] = []
        texts: dict[str, None] = {}  # the distinct captions of the pending jobs, in order
        for job in todo:
            new = [t for t in dict.fromkeys(job.captions) if t not in texts]
            if pending and len(texts) + len(new) > self.batch_size:
                self._encode_and_store(pending, list(texts))
                bar.update(len(pending))
                pending, texts = [], {}
                new = list(dict.fromkeys(job.captions))
            pending.append(job)
            texts.update(dict.fromkeys(new))
        if pending:
            self._encode_and_store(pending, list(texts))
            bar.update(len(pending))
        bar.close()
        return len(todo)

    def _encode_and_store(self, jobs: list[_Job], texts: list[str]) -> None:
        rows: dict[str, tuple[dict[str, torch.Tensor], int]] = {}
        for start in range(0, len(texts), self.batch_size):
            chunk = texts[start : start + self.batch_size]
            with torch.no_grad():
                out = self.encode(chunk)
            if not isinstance(out, dict) or not out:
                raise TypeError("encode must return a non-empty dict of output name -> batched tensor")
            for name, t in out.items():
                if not isinstance(t, torch.Tensor) or t.dim() == 0 or t.shape[0] != len(chunk):
                    shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                    raise ValueError(f"encode output {name!r} is {shape}, not a tensor of {len(chunk)} rows")
            for i, text in enumerate(chunk):
                rows[text] = (out, i)
        for job in jobs:
            outputs = []
            for text in job.captions:
                out, i = rows[text]
                # a copy of the row: a view would keep the whole batch alive (and safetensors refuses shared storage)
                outputs.append({n: t[i].detach().to("cpu").clone(memory_format=torch.contiguous_format) for n, t in out.items()})
            if job.path is None:
                self.memory[job.key] = CachedTexts(list(job.captions), outputs)
                continue
            tensors = {f"v{k}.{n}": t for k, variant in enumerate(outputs) for n, t in variant.items()}
            meta = {
                "format_version": TE_CACHE_FORMAT_VERSION,
                "architecture": self.arch,
                "identity": self.identity_json,
                "captions": json.dumps(job.captions, ensure_ascii=False),
                "outputs": json.dumps(sorted(outputs[0])),
            }
            atomic_write_bytes(job.path, safetensors_bytes(tensors, meta))
            if job.key == EMPTY_KEY:
                self._empty_by_folder.pop(os.path.dirname(job.path), None)

    # -----------------------------------------------------------------------------------------------------------------
    # Reading

    def _missing(self, what: str, where: str) -> FileNotFoundError:
        return FileNotFoundError(
            f"text-encoder outputs of {what} are not cached ({where}): fill() has not run, or another process has "
            "not finished its share"
        )

    def _read_file(self, path: str, what: str, choose: Callable[[int], int | None]) -> tuple[int | None, str, dict]:
        """Open an entry's file, let `choose(number of variants)` pick a variant, read it: (variant, caption, outputs)."""
        try:
            f = safe_open(path, framework="pt")
        except FileNotFoundError:
            raise self._missing(what, path) from None
        with f:
            meta = f.metadata() or {}
            captions = json.loads(meta["captions"])
            names = json.loads(meta["outputs"])
            k = choose(len(captions))
            if k is None:
                return None, "", {}
            if not 0 <= k < len(captions):
                raise IndexError(f"{path} holds {len(captions)} caption variants, not variant {k}")
            return k, captions[k], {n: f.get_tensor(f"v{k}.{n}") for n in names}

    def variant_captions(self, info: ImageInfo) -> list[str]:
        """The processed caption of each cached variant of an image."""
        if not self.cache_to_disk:
            return list(self._memory_entry(info.path, info.path).captions)
        path = te_cache_path(info.path, self.arch)
        try:
            with safe_open(path, framework="pt") as f:
                return json.loads((f.metadata() or {})["captions"])
        except FileNotFoundError:
            raise self._missing(info.path, path) from None

    def _memory_entry(self, key: str, what: str) -> CachedTexts:
        entry = self.memory.get(key)
        if entry is None:
            raise self._missing(what, "not in memory")
        return entry

    def get(self, info: ImageInfo, variant: int = 0) -> dict[str, torch.Tensor]:
        """The outputs of one cached caption variant of an image (from memory, else from its file)."""
        if not self.cache_to_disk:
            return self._memory_entry(info.path, info.path).outputs[variant]
        return self._read_file(te_cache_path(info.path, self.arch), info.path, lambda n: variant)[2]

    def empty(self, info: ImageInfo) -> dict[str, torch.Tensor]:
        """The outputs of the empty caption (what caption dropout gives `info`)."""
        if not self.cache_to_disk:
            return self._memory_entry(EMPTY_KEY, "the empty caption").outputs[0]
        folder = os.path.dirname(info.path)
        entry = self._empty_by_folder.get(folder)
        if entry is None:
            entry = self._read_file(empty_caption_path(folder, self.arch), "the empty caption", lambda n: 0)[2]
            self._empty_by_folder[folder] = entry
        return entry

    def draw(
        self, info: ImageInfo, opts: CaptionOptions, rng: random.Random | None, epoch: int
    ) -> tuple[str, dict[str, torch.Tensor]]:
        """(caption, outputs) for one sample: caption dropout, else a uniformly drawn variant, both from `rng`.

        rng None (validation): variant 0, never dropped.
        """
        if rng is None:
            choose = lambda n: 0  # noqa: E731
        else:
            choose = lambda n: draw_caption_variant(opts, rng, epoch, n)  # noqa: E731
        if not self.cache_to_disk:
            entry = self._memory_entry(info.path, info.path)
            k = choose(len(entry.captions))
            if k is None:
                return "", self.empty(info)
            return entry.captions[k], entry.outputs[k]
        k, caption, outputs = self._read_file(te_cache_path(info.path, self.arch), info.path, choose)
        if k is None:
            return "", self.empty(info)
        return caption, outputs
