"""Writing a trained model as a checkpoint that users load elsewhere: the family's original single-file layout (with
side files where the family has them) or a diffusers pipeline folder. Nothing here knows a family: a family describes
its parts (CheckpointSpec, built in its {family}_models.py) and save_model_checkpoint writes them.

Which weights are written. A part named in `trained` comes from memory: the model being trained, wherever its tensors
are (a GPU, host memory); each tensor is copied to host memory only when its turn comes, and the model is never moved
or cast. (Under --blocks_to_swap the weights of swapped blocks are views into shared device slots: the denoiser is
read inside the swapper's own_weights(), where they are views into each block's host buffer.) Every other part is written from the model the user
gave, never from memory: the trainer keeps frozen parts in the --mixed_precision dtype (or float8), so their in-memory
values are not the user's; only when --base_weights merged LoRA files into the base model are all parts but the VAE
written from memory (the model the run started from is not the user's file then). A part's PartSource says where the
user's weights are:

- a single file holding the part in the layout being written (the source checkpoint itself, a --vae file): its tensors
  are copied by key, one at a time, each as it is in the file (dtype, extra tensors such as position_ids included);
- a diffusers component folder: its config and its tensors by key (diffusers form), or a model built from them with
  their own dtypes (single-file form, through the family's layout conversion);
- otherwise a model built from the source with the source's own tensors and dtypes (a single file in the family's
  other layout, separate text-encoder files, a built-in tiny model built again from its seed). fp8 tensors are upcast
  to bf16 (exactly) where a model is built: diffusers and transformers models cannot compute in float8.

Every file is written to a temporary name and renamed into place (saving.atomic_write); a diffusers folder is written
as a temporary folder `<path>.diffusers.<pid>.<hex>.tmp` (a name saving.remove_unfinished cleans up after a crash)
and renamed to `path`, after an existing folder or file there has been moved aside (removed once the new one is in
place).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import logging
import os
import secrets
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from library.checkpoint_files import VAE_PREFIX, ModelLoadError, read_state_dict, safetensors_problem
from library.model_files import TensorSource, pipeline_index, tensor_sources, upcast_fp8, write_tensor_sources

logger = logging.getLogger(__name__)

FORMS = ("safetensors", "ckpt", "diffusers")
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
TRANSFORMERS_WEIGHTS = "model.safetensors"
_WEIGHT_NAMES = (DIFFUSERS_WEIGHTS, TRANSFORMERS_WEIGHTS, "diffusion_pytorch_model.bin", "pytorch_model.bin")
_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------------
# Reading the user's weights lazily
# ---------------------------------------------------------------------------------------------------------------------


class SourceFile:
    """A model file read lazily: names, shapes and dtypes from a .safetensors header, each tensor only when asked for
    (the file stays open, memory-mapped, until close()); a pickle (.ckpt) is read whole (weights_only) on first use."""

    def __init__(self, path: str) -> None:
        self.path = os.fspath(path)
        self._handle = None
        self._tensors: dict[str, torch.Tensor] | None = None
        self._info: dict[str, tuple[tuple[int, ...], torch.dtype]] | None = None

    @property
    def _is_safetensors(self) -> bool:
        return self.path.lower().endswith(".safetensors")

    def _open(self):
        if self._handle is None:
            from safetensors import safe_open

            if not os.path.isfile(self.path):
                raise ModelLoadError(f"{self.path}: the source model file is gone; it is needed to write the parts not trained")
            problem = safetensors_problem(self.path)
            if problem:
                raise ModelLoadError(problem)
            self._handle = safe_open(self.path, framework="pt")
        return self._handle

    def info(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """key -> (shape, dtype) of every tensor."""
        if self._info is None:
            if self._is_safetensors:
                handle = self._open()
                slices = {k: handle.get_slice(k) for k in handle.keys()}
                self._info = {k: (tuple(s.get_shape()), _ST_DTYPES[s.get_dtype()]) for k, s in slices.items()}
            else:
                self._tensors = read_state_dict(self.path)
                self._info = {k: (tuple(v.shape), v.dtype) for k, v in self._tensors.items()}
        return self._info

    def keys(self, prefix: str = "", exclude: tuple[str, ...] = ()) -> list[str]:
        """The keys under `prefix`, except those under any of `exclude`."""
        return [k for k in self.info() if k.startswith(prefix) and not k.startswith(exclude)]

    def get(self, key: str) -> torch.Tensor:
        if self._is_safetensors:
            return self._open().get_tensor(key)
        if self._tensors is None:
            self._tensors = read_state_dict(self.path)
        return self._tensors[key]

    def tensors(self, prefix: str = "", exclude: tuple[str, ...] = (), strip: bool = True) -> dict[str, torch.Tensor]:
        """The tensors under `prefix` (without it when `strip`), read now: for building a model from them."""
        return {(k[len(prefix) :] if strip else k): self.get(k) for k in self.keys(prefix, exclude)}

    def sources(self, prefix: str, out_prefix: str, exclude: tuple[str, ...] = ()) -> dict[str, TensorSource]:
        """The tensors under `prefix` renamed to `out_prefix` + the rest of their key, each read when written."""
        info = self.info()
        return {out_prefix + k[len(prefix) :]: (*info[k], functools.partial(self.get, k)) for k in self.keys(prefix, exclude)}

    def close(self) -> None:
        handle, self._handle, self._tensors = self._handle, None, None
        if handle is not None and hasattr(handle, "__exit__"):
            handle.__exit__(None, None, None)


def _folder_weight_files(folder: str) -> list[str]:
    """The weight files of a diffusers / transformers component folder: the shards its index names, else the one
    standard file (safetensors before .bin)."""
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors.index.json") or name.endswith(".bin.index.json"):
            with open(os.path.join(folder, name)) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            return [os.path.join(folder, s) for s in shards]
    for name in _WEIGHT_NAMES:
        if os.path.isfile(os.path.join(folder, name)):
            return [os.path.join(folder, name)]
    raise ModelLoadError(f"{folder} holds no model weights ({', '.join(_WEIGHT_NAMES)})")


def folder_sources(folder: str, stack: contextlib.ExitStack) -> dict[str, TensorSource]:
    """Every tensor of a component folder under its own key, each read when written (files closed with `stack`)."""
    out: dict[str, TensorSource] = {}
    for path in _folder_weight_files(folder):
        source = SourceFile(path)
        stack.callback(source.close)
        out.update(source.sources("", ""))
    return out


def _is_diffusers_model(cls_or_module) -> bool:
    from diffusers import ModelMixin

    cls = cls_or_module if isinstance(cls_or_module, type) else type(cls_or_module)
    return issubclass(cls, ModelMixin)


def module_from_folder(folder: str, cls: type) -> torch.nn.Module:
    """A `cls` model (diffusers or transformers) holding a component folder's own tensors, dtypes kept (from_pretrained
    would cast: diffusers to float32, transformers keeps some modules in float32). Tied weights a folder stores once
    (T5's embedding) are tied again."""
    from accelerate import init_empty_weights

    with contextlib.ExitStack() as stack:
        tensors = {k: make() for k, (_, _, make) in folder_sources(folder, stack).items()}
    with init_empty_weights():
        if _is_diffusers_model(cls):
            model = cls.from_config(cls.load_config(folder))
        else:
            model = cls(cls.config_class.from_pretrained(folder))
    result = model.load_state_dict(upcast_fp8(tensors, None), strict=False, assign=True)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    empty = [n for n, p in model.named_parameters() if p.is_meta]
    if empty or result.unexpected_keys:
        what = f"lacks {empty[0]}" if empty else f"has {result.unexpected_keys[0]}, which a {cls.__name__} does not"
        raise ModelLoadError(f"{folder}: the weights do not fit its config ({what})")
    return model.eval()


# ---------------------------------------------------------------------------------------------------------------------
# Where each part's untouched weights are
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class PartSource:
    """Where the user's own weights of one part are (see the module docstring). `build` makes the part as a model
    holding them (dtypes kept); `file`/`prefix`/`exclude`: a single file holding the part in the layout the family
    writes, under `prefix` (minus the keys under `exclude`), copied by key; `folder`: a diffusers component folder."""

    build: Callable[[], torch.nn.Module]
    file: SourceFile | None = None
    prefix: str = ""
    exclude: tuple[str, ...] = ()
    folder: str | None = None


def folder_part(folder: str, cls: type) -> PartSource:
    """A part stored as a diffusers component folder (config.json and weights)."""
    return PartSource(build=lambda: module_from_folder(folder, cls), folder=folder)


def builtin_parts(build: Callable[[], dict], components: Mapping[str, Any]) -> dict[str, PartSource]:
    """Parts of a built-in tiny model: `build()` (seeded: the same weights every time) made once, when first needed."""
    built = functools.cache(build)
    return {c: PartSource(build=lambda c=c: built()[c]) for c in components}


def model_parts(
    source: str,
    components: Mapping[str, type],
    builtin: Callable[[], dict],
    single_file: Callable[[SourceFile], dict[str, PartSource]],
) -> dict[str, PartSource]:
    """PartSource per pipeline component (name -> its class) of `--pretrained_model_name_or_path`: a built-in name
    (`builtin()` gives the components), a diffusers folder (its component folders) or a single file
    (`single_file(file)` says where each part the file holds is)."""
    from library.tiny_models import BUILTIN_MODELS

    if source in BUILTIN_MODELS:
        return builtin_parts(builtin, components)
    if os.path.isdir(source):
        return {c: folder_part(os.path.join(source, c), cls) for c, cls in components.items()}
    return single_file(SourceFile(source))


def vae_part(path: str, reference: Mapping[str, Any]) -> PartSource:
    """The part a --vae / --ae option gives: a diffusers VAE folder (or a pipeline folder with vae/), or a single file
    with LDM keys (with or without `first_stage_model.`, copied by key into a single file) or diffusers-layout keys.
    `reference`: the family's VAE config for what the weights cannot tell (model_files.infer_vae_config)."""
    from diffusers import AutoencoderKL

    from library.model_files import vae_from_state_dict

    path = os.fspath(path)
    if os.path.isdir(path):
        for folder in (path, os.path.join(path, "vae")):
            if os.path.isfile(os.path.join(folder, "config.json")):
                return folder_part(folder, AutoencoderKL)
        raise ModelLoadError(f"VAE folder {path} has no config.json (nor vae/config.json)")
    file = SourceFile(path)

    def build() -> torch.nn.Module:
        return vae_from_state_dict(upcast_fp8(file.tensors(), None), None, path, reference=reference)

    keys = file.keys()
    for prefix in (VAE_PREFIX, ""):
        if any(k.startswith(prefix + "encoder.down.") for k in keys):
            return PartSource(build=build, file=file, prefix=prefix)
    return PartSource(build=build)


# ---------------------------------------------------------------------------------------------------------------------
# What a family writes
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class CheckpointPart:
    """One part of a model as the checkpoint holds it.

    name: "denoiser", "text_encoder_N" (index in TrainModels.text_encoders) or "vae"; component: its diffusers pipeline
    component ("unet", "transformer", "text_encoder_2", ...); module: the in-memory model; source: the user's weights;
    layout: module -> its tensors in the single file, under their full keys (None: the single file does not hold the
    part); prefix: the part's prefix in the single file (where `source.file`'s tensors go); side_file: the suffix of a
    file of its own ("_clip_l": `{path}_clip_l.safetensors`), written only when the part was trained; trainable:
    False for parts the family never trains."""

    name: str
    component: str
    module: torch.nn.Module
    source: PartSource
    layout: Callable[[torch.nn.Module], Mapping[str, TensorSource]] | None = None
    prefix: str = ""
    side_file: str | None = None
    trainable: bool = True


@dataclass
class CheckpointSpec:
    """A family's checkpoint: its parts, the diffusers pipeline class, and the other pipeline components (tokenizers,
    scheduler: objects with save_pretrained), written as they are in diffusers folders."""

    pipeline: str
    parts: list[CheckpointPart]
    components: dict[str, Any] = field(default_factory=dict)


def _from_memory(spec: CheckpointSpec, trained: frozenset[str], base_weights: bool) -> set[str]:
    names = {p.name for p in spec.parts}
    unknown = sorted(set(trained) - (names - {"vae"}))
    if unknown:
        choices = ", ".join(sorted(names - {"vae"}))
        raise ValueError(f"trained parts {unknown} are not parts of this model that can be trained ({choices})")
    frozen = sorted(p.name for p in spec.parts if p.name in trained and not p.trainable)
    if frozen:
        raise ValueError(f"{', '.join(frozen)}: this family never trains these parts")
    memory = set(trained)
    if base_weights:
        # --base_weights merged LoRA files into the base model: the model the run started from is not the source file
        # any more, so every part a LoRA can change comes from memory (in the dtype it was kept in)
        extra = sorted(p.name for p in spec.parts if p.name != "vae" and p.name not in memory)
        if extra:
            logger.warning(
                f"--base_weights changed the base model: {', '.join(extra)} are written as they are in memory, "
                "not from the source model"
            )
        memory |= set(extra)
    from library.fp8_utils import FP8_DTYPES

    for part in spec.parts:
        if part.name in memory and any(t.dtype in FP8_DTYPES for t in part.module.state_dict().values()):
            raise ValueError(
                f"{part.name} is stored in float8 in memory (--fp8_base) and cannot be written from there; "
                "save without --fp8_base for it"
            )
    return memory


def _readable_weights(swapper) -> contextlib.AbstractContextManager:
    """A context in which the denoiser's parameters hold its own values. Under --blocks_to_swap the streamed weights
    of swapped blocks are views into shared device slots (holding whichever block ran last): the swapper's
    own_weights(read_only=True) makes them views into each block's host buffer for a while."""
    if swapper is None or not getattr(swapper, "blocks_to_swap", 0):
        return contextlib.nullcontext()
    own_weights = getattr(swapper, "own_weights", None)
    if own_weights is None:
        raise ValueError(
            "the denoiser cannot be written from memory while --blocks_to_swap streams its blocks: its swapped "
            "blocks' weights are views into shared device slots"
        )
    return own_weights(read_only=True)


def save_model_checkpoint(
    args,
    spec: CheckpointSpec,
    path: str,
    form: str,
    dtype: torch.dtype | None,
    metadata: dict[str, str] | None,
    trained: frozenset[str],
    swapper=None,
) -> list[str]:
    """Write `spec`'s model as a checkpoint (ModelFamily.save_checkpoint): `path` without extension; form
    "safetensors" / "ckpt" (the single-file layout: `path`.safetensors with `metadata`, or `path`.ckpt, a
    weights-only-loadable {"state_dict": ...} pickle; side files `path<suffix>.safetensors` of trained parts that
    have one) or "diffusers" (a pipeline folder at `path`). `dtype` casts floating tensors (None keeps each one's).
    Parts in `trained` come from memory, the others from their PartSource; when --base_weights (in `args`) changed the
    base model, every part but the VAE comes from memory. `swapper`: the family's BlockSwapper (--blocks_to_swap), if
    any. Returns the written paths."""
    if form not in FORMS:
        raise ValueError(f"unknown checkpoint form {form!r}: expected one of {', '.join(FORMS)}")
    memory = _from_memory(spec, frozenset(trained), bool(getattr(args, "base_weights", None)))
    path = os.fspath(path)
    with contextlib.ExitStack() as stack:
        if "denoiser" in memory:
            stack.enter_context(_readable_weights(swapper))
        for part in spec.parts:
            if part.source.file is not None:
                stack.callback(part.source.file.close)
        if form == "diffusers":
            return [_write_diffusers_folder(spec, path, dtype, memory, stack)]
        return _write_single_files(spec, path, form, dtype, metadata, memory)


# ---------------------------------------------------------------------------------------------------------------------
# Single files
# ---------------------------------------------------------------------------------------------------------------------


def _part_tensors(part: CheckpointPart, memory: set[str]) -> Mapping[str, TensorSource]:
    if part.name in memory:
        return part.layout(part.module)
    source = part.source
    if source.file is not None:
        return source.file.sources(source.prefix, part.prefix, source.exclude)
    return part.layout(source.build())


def _write_single_files(spec: CheckpointSpec, path: str, form: str, dtype, metadata, memory: set[str]) -> list[str]:
    files: dict[str, dict[str, TensorSource]] = {"": {}}
    for part in spec.parts:
        if part.layout is None or (part.side_file is not None and part.name not in memory):
            continue
        files.setdefault(part.side_file or "", {}).update(_part_tensors(part, memory))
    written = []
    for suffix, sources in files.items():
        if suffix:  # side files: safetensors with the part's own (transformers) names, as sd-scripts writes them
            out, meta = f"{path}{suffix}.safetensors", None
        else:
            out, meta = f"{path}.{form}", metadata
        write_tensor_sources(out, sources, dtype, meta)
        written.append(out)
    return written


# ---------------------------------------------------------------------------------------------------------------------
# Diffusers folders
# ---------------------------------------------------------------------------------------------------------------------


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _main_float_dtype(sources: Mapping[str, TensorSource], dtype: torch.dtype | None) -> torch.dtype | None:
    counts: dict[torch.dtype, int] = {}
    for shape, d, _ in sources.values():
        if d.is_floating_point:
            counts[d] = counts.get(d, 0) + torch.Size(shape).numel()
    if not counts:
        return None
    return dtype or max(counts, key=counts.get)


def _write_component(folder: str, module: torch.nn.Module, dtype: torch.dtype | None) -> str:
    """A model as a component folder: its config and its state dict (streamed, cast per tensor); returns its class
    name. The model itself is neither moved nor cast."""
    os.makedirs(folder)
    sources = tensor_sources(module.state_dict())
    if _is_diffusers_model(module):
        module.save_config(folder)
        weights = DIFFUSERS_WEIGHTS
    else:  # transformers
        config = copy.deepcopy(module.config)
        config.architectures = [type(module).__name__]
        main = _main_float_dtype(sources, dtype)
        if main is not None:
            config.dtype = main
        config.save_pretrained(folder)
        weights = TRANSFORMERS_WEIGHTS
    write_tensor_sources(os.path.join(folder, weights), sources, dtype, {"format": "pt"})
    return type(module).__name__


def _copy_component(source: str, folder: str, dtype: torch.dtype | None, stack: contextlib.ExitStack) -> None:
    """A component folder copied: its JSON files (config), and its tensors by key into one weights file (cast per
    tensor with `dtype`)."""
    os.makedirs(folder)
    files = _folder_weight_files(source)
    diffusers_names = os.path.basename(files[0]).startswith("diffusion_pytorch_model")
    for name in os.listdir(source):
        if name.endswith(".json") and not name.endswith(".index.json"):
            shutil.copyfile(os.path.join(source, name), os.path.join(folder, name))
    config_path = os.path.join(folder, "config.json")
    if dtype is not None and os.path.isfile(config_path):
        with open(config_path) as f:
            config = json.load(f)
        changed = {k: _dtype_name(dtype) for k in ("dtype", "torch_dtype") if k in config}
        if changed:
            with open(config_path, "w") as f:
                json.dump({**config, **changed}, f, indent=2, sort_keys=True)
    weights = DIFFUSERS_WEIGHTS if diffusers_names else TRANSFORMERS_WEIGHTS
    write_tensor_sources(os.path.join(folder, weights), folder_sources(source, stack), dtype, {"format": "pt"})


def replace_folder(tmp: str, path: str) -> None:
    """Put the complete folder `tmp` at `path`; an existing folder (or file) there is moved aside first and removed
    once the new one is in place (put back if the rename fails)."""
    from library.saving import publish_folder

    if not os.path.lexists(path):
        publish_folder(tmp, path)
        return
    old = f"{path}.diffusers.{os.getpid()}.{secrets.token_hex(4)}.old"
    os.rename(path, old)
    try:
        publish_folder(tmp, path)
    except BaseException:
        if not os.path.lexists(path):
            os.rename(old, path)
        raise
    if os.path.isdir(old) and not os.path.islink(old):
        shutil.rmtree(old)
    else:
        os.remove(old)


def _write_diffusers_folder(spec: CheckpointSpec, path: str, dtype, memory: set[str], stack: contextlib.ExitStack) -> str:
    from library.saving import new_temp_folder

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = new_temp_folder(path + ".diffusers")
    try:
        classes: dict[str, str] = {}
        for part in spec.parts:
            folder = os.path.join(tmp, part.component)
            if part.name in memory:
                _write_component(folder, part.module, dtype)
            elif part.source.folder is not None:
                _copy_component(part.source.folder, folder, dtype, stack)
            else:
                _write_component(folder, part.source.build(), dtype)  # one built part in memory at a time
            classes[part.component] = type(part.module).__name__
        for name, obj in spec.components.items():
            obj.save_pretrained(os.path.join(tmp, name))
            classes[name] = type(obj).__name__
        with open(os.path.join(tmp, "model_index.json"), "w") as f:
            json.dump(pipeline_index(spec.pipeline, classes), f, indent=1)
        replace_folder(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
