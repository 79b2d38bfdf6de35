"""Reading model files of any family: what family a checkpoint is, its tensors and shapes without unpickling."""

from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Iterable, Mapping
from typing import Any

import torch

logger = logging.getLogger(__name__)

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_L_PREFIX = "cond_stage_model.transformer."  # SD1: + text_model.* (transformers CLIPTextModel names)
OPEN_CLIP_PREFIX = "cond_stage_model.model."  # SD2: OpenCLIP ViT-H text tower names

FAMILY_SCRIPTS = {
    "sd1": "train_network.py",
    "sd2": "train_network.py --v2",
    "sdxl": "sdxl_train_network.py",
    "sd3": "sd3_train_network.py",
    "flux": "flux_train_network.py",
}
FAMILY_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL", "sd3": "SD3", "flux": "FLUX.1"}
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


class ModelLoadError(ValueError):
    """A model could not be loaded; the message says which file and what to do."""


# ---------------------------------------------------------------------------------------------------------------------
# Family detection
# ---------------------------------------------------------------------------------------------------------------------


def _shape(value) -> tuple[int, ...] | None:
    if value is None:
        return None
    if hasattr(value, "shape"):
        return tuple(value.shape)
    if isinstance(value, (tuple, list)):
        return tuple(value)
    return None


def detect_family(keys: Iterable[str] | Mapping[str, Any]) -> str:
    """Which model family a checkpoint's keys belong to: "sd1", "sd2", "sdxl", "sd3", "flux" or "unknown".

    `keys` may be a list of names or a mapping name -> tensor/shape. A file with only a U-Net (no text encoder) is told
    apart by its attention projections (SD2: linear, SD1: 1x1 conv) when shapes are given, else reported as "sd1".
    """
    names = list(keys.keys()) if isinstance(keys, Mapping) else list(keys)
    has = lambda prefix: any(k.startswith(prefix) for k in names)  # noqa: E731

    if has("double_blocks.") or has(UNET_PREFIX + "double_blocks."):
        return "flux"
    if has("joint_blocks.") or has(UNET_PREFIX + "joint_blocks."):
        return "sd3"
    if has("conditioner.embedders."):
        return "sdxl"
    if has(UNET_PREFIX + "label_emb."):
        # SDXL's U-Net has the size/crop embedding; SD2 variants with a class embedding (unCLIP, x4 upscaler) are not
        # supported by kiln, so they are "unknown" rather than silently loaded without it.
        return "unknown" if has("cond_stage_model.") else "sdxl"
    if has(OPEN_CLIP_PREFIX):
        return "sd2"
    if has(CLIP_L_PREFIX):
        return "sd1"
    if has(UNET_PREFIX + "input_blocks."):
        if isinstance(keys, Mapping):
            for k in names:
                if k.startswith(UNET_PREFIX) and k.endswith(".proj_in.weight"):
                    shape = _shape(keys[k])
                    if shape is not None:
                        return "sd2" if len(shape) == 2 else "sd1"
        return "sd1"
    return "unknown"


def detect_lora_family(keys: Iterable[str]) -> str:
    """Which model family a kohya-format adapter file (LoRA, LoCon, ...) is for, from its key names: "sd1" (SD 1.x/2.x),
    "sdxl", "sd3", "flux" or "unknown" (no family's mark: other formats, or U-Net-only diffusers names that SD and SDXL
    share)."""
    modules = {k.split(".", 1)[0] for k in keys}
    has = lambda *prefixes: any(m.startswith(prefixes) for m in modules)  # noqa: E731

    # SD3 first: its T5 modules are lora_te3_ too; CLIP-G (lora_te2_) with T5 is SD3's alone
    if has("lora_unet_joint_blocks_") or (has("lora_te2_") and has("lora_te3_")):
        return "sd3"
    if has("lora_unet_double_blocks_", "lora_unet_single_blocks_", "lora_te3_"):  # lora_te3_: sd-scripts' FLUX T5
        return "flux"
    # lora_te1_ alone is no mark: FLUX files name CLIP-L lora_te1_ too
    if has("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_", "lora_te2_"):
        return "sdxl"
    if any(m.startswith("lora_unet_") and "add_embedding" in m for m in modules):
        return "sdxl"
    # SD 1.x/2.x: one text encoder (lora_te_), or attention in the first down block (SDXL's first level has none)
    if has("lora_te_", "lora_unet_down_blocks_0_attentions_"):
        return "sd1"
    return "unknown"


def _family_error(path: str, family: str) -> ModelLoadError:
    if family in ("sdxl", "sd3", "flux"):
        return ModelLoadError(
            f"{path} is a {FAMILY_NAMES[family]} checkpoint, not SD 1.x/2.x: use {FAMILY_SCRIPTS[family]} for it"
        )
    return ModelLoadError(
        f"{path} is not an SD 1.x/2.x checkpoint kiln can load: expected the original single-file layout "
        f"({UNET_PREFIX}*, {VAE_PREFIX}*, cond_stage_model.*); SD 2.x variants with a class embedding (unCLIP, x4 "
        "upscaler) are not supported. A diffusers model is loaded from its folder (with model_index.json), not from one "
        "of its files."
    )


# ---------------------------------------------------------------------------------------------------------------------
# Reading files
# ---------------------------------------------------------------------------------------------------------------------


def _is_pickle_path(path: str) -> bool:
    return path.lower().endswith(PICKLE_SUFFIXES)


def safetensors_fault(path: str) -> str | None:
    """What is wrong with `path` as a safetensors file ("empty ...", "truncated ...", "not a safetensors file ..."),
    from its 8-byte header length, its JSON header and the data offsets it lists; None when it looks complete. Reads
    only the header."""
    import json

    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            header = f.read(min(max(n, 0), max(size - 8, 0)))
    except OSError as e:
        return f"unreadable ({e.strerror or e})"
    if size == 0:
        return "empty (0 bytes)"
    if n <= 0 or n > size - 8:
        if n > 0 and header[:1] == b"{":  # a real header that the file ends inside of
            return f"truncated (it ends inside its safetensors header, after {size} bytes)"
        return f"not a safetensors file (it starts with {head!r}: another format, or an HTML page saved under this name?)"
    try:
        entries = json.loads(header)
        ends = [int(v["data_offsets"][1]) for k, v in entries.items() if k != "__metadata__"]
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        return "not a safetensors file (its header is not safetensors JSON)"
    expected = 8 + n + max(ends, default=0)
    if size < expected:
        return f"truncated (it has {size} bytes, its header describes {expected})"
    return None


def safetensors_problem(path: str) -> str | None:
    """One line naming `path`, what is wrong with it as a safetensors file and what to do; None when it looks complete."""
    fault = safetensors_fault(path)
    return f"{path} is {fault}: download or copy it again" if fault else None


def unreadable_model(path: str, error: Exception) -> ModelLoadError:
    """The ModelLoadError for a model file that failed to load with `error`: truncated, not safetensors, or why not."""
    if path.lower().endswith(".safetensors"):
        problem = safetensors_problem(path)
        if problem:
            return ModelLoadError(problem)
        return ModelLoadError(f"cannot read {path} as safetensors: {error}")
    first = (str(error).strip().splitlines() or [type(error).__name__])[0].split(". ")[0]
    return ModelLoadError(
        f"{path} is truncated or not a torch checkpoint ({first}): download or copy it again, or use a .safetensors file"
    )


def read_key_shapes(path: str) -> dict[str, tuple[int, ...]]:
    """Names and shapes of a .safetensors file without reading the tensors. A truncated file or one that is not
    safetensors raises ModelLoadError saying so."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise ModelLoadError(f"model file not found: {path}")
    problem = safetensors_problem(path)
    if problem:
        raise ModelLoadError(problem)
    try:
        with safe_open(path, framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:
        raise unreadable_model(path, e) from e


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """All tensors of a .safetensors file, or of a .ckpt/.pt/.pth/.bin pickle loaded with weights_only=True.

    A pickle's "state_dict" entry (nested any depth) is unwrapped; non-tensor entries are dropped.
    """
    if not os.path.isfile(path):
        raise ModelLoadError(f"model file not found: {path}")
    if path.lower().endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except Exception as e:
            raise unreadable_model(path, e) from e
    if not _is_pickle_path(path):
        raise ModelLoadError(f"unsupported model file type: {path} (expected .safetensors, .ckpt, .pt, .pth or .bin)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ModelLoadError(
            f"{path} needs full unpickling (it stores Python objects besides tensors), and kiln does not unpickle model "
            "files because unpickling can run arbitrary code. Convert it to .safetensors with a tool you trust, or use "
            f"a .safetensors release of the model. (torch: {str(e).splitlines()[0]})"
        ) from e
    except Exception as e:
        raise unreadable_model(path, e) from e
    while isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise ModelLoadError(f"{path} does not contain a state dict")
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
