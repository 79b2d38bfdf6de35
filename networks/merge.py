"""Merging kohya-format LoRA files: into one LoRA (exact concatenation or SVD), into loaded models' weights, or into
model files streamed tensor by tensor (merge_into_file: every tensor of the source is written,
the targeted ones with the LoRA deltas added, the others bit-identical): SD 1.x/2.x and SDXL single files and diffusers
folders (merge_into_sd_file, merge_into_sd_folder), FLUX's BFL transformer, CLIP-L and T5-XXL (merge_into_flux_files)
and SD3's SAI single file with its bundled encoders, CLIP-L, CLIP-G and T5-XXL (merge_into_sd3_files). Only one thing
differs per layout: which LoRA module changes which file key (and, for OpenCLIP's fused q/k/v, which rows of it)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from library.sd3_models import PART_PREFIXES as SD3_KEY_PREFIXES
from networks.adapter import FileModule, file_modules
from networks.lora import LORA, dims_from_weights, lora_delta

logger = logging.getLogger(__name__)


_LORA_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")
_OTHER_ADAPTERS = {  # key fragments of adapter types a LoRA merge cannot apply -> their names
    ".oft_blocks": "OFT",
    ".oft_diag": "OFT",
    ".hada_": "LoHa",
    ".lokr_": "LoKr",
    ".dora_scale": "DoRA",
    ".diff": "full-weight difference",
    ".w_norm": "GLoRA",
    ".a1.weight": "GLoRA",
}


def check_lora_keys(
    state_dict: dict[str, torch.Tensor], known: set[str] = frozenset(), layouts: str = "kohya LoRA (lora_down/lora_up/alpha)"
) -> None:
    """Every key of a LoRA file must be a kohya LoRA weight (or in `known`): anything else (OFT, LoHa, LoKr, DoRA, ...)
    cannot be merged and is an error naming the key, never dropped. A lora_down needs its lora_up and the reverse."""
    names = {k[: -len(s)] for k in state_dict for s in _LORA_SUFFIXES[:2] if k.endswith(s)}
    for name in sorted(names):
        for suffix in _LORA_SUFFIXES[:2]:
            if name + suffix not in state_dict:
                raise ValueError(f"LoRA module {name} has no {suffix[1:]}; the file is incomplete")
    lora_keys = {n + s for n in names for s in _LORA_SUFFIXES}
    unknown = sorted(k for k in state_dict if k not in lora_keys and k not in known)
    if unknown:
        kind = next((t for frag, t in _OTHER_ADAPTERS.items() if frag in unknown[0]), None)
        raise ValueError(
            f"{len(unknown)} keys are not {layouts} weights, e.g. {unknown[0]}"
            + (f" (a {kind} module)" if kind else "")
            + "; only plain LoRA can be merged (nothing was written)"
        )


def _modules(state_dict: dict[str, torch.Tensor], check: bool = True) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """name -> (down, up, alpha / rank) of every module of a LoRA file; keys of any other kind are an error (check)."""
    if check:
        check_lora_keys(state_dict)
    dims, alphas = dims_from_weights(state_dict)
    return {
        name: (
            state_dict[name + ".lora_down.weight"].float(),
            state_dict[name + ".lora_up.weight"].float(),
            alphas[name] / dims[name],
        )
        for name in dims
    }


def merge_loras_concat(state_dicts: list[dict[str, torch.Tensor]], ratios: list[float]) -> dict[str, torch.Tensor]:
    """One LoRA equal to the weighted sum of the inputs: ranks side by side, alpha = total rank (scale 1)."""
    parsed = [_modules(sd) for sd in state_dicts]
    names = sorted({n for p in parsed for n in p})
    out = {}
    for name in names:
        downs, ups = [], []
        for p, ratio in zip(parsed, ratios):
            if name in p:
                down, up, scale = p[name]
                downs.append(down)
                ups.append(up * (ratio * scale))
        down, up = torch.cat(downs, dim=0), torch.cat(ups, dim=1)
        out[name + ".lora_down.weight"] = down
        out[name + ".lora_up.weight"] = up
        out[name + ".alpha"] = torch.tensor(float(down.shape[0]))
    return out


def merge_loras_svd(
    state_dicts: list[dict[str, torch.Tensor]], ratios: list[float], rank: int | None = None
) -> tuple[dict[str, torch.Tensor], float]:
    """One LoRA of `rank` (default: the largest input rank) nearest to the weighted sum (truncated SVD per module).

    Returns the LoRA and the largest relative error ||approx - exact|| / ||exact|| over modules (0 when exact)."""
    parsed = [_modules(sd) for sd in state_dicts]
    names = sorted({n for p in parsed for n in p})
    rank = rank or max(d.shape[0] for p in parsed for d, _, _ in p.values())
    out, worst = {}, 0.0
    for name in names:
        total = sum(lora_delta(*p[name]) * ratio for p, ratio in zip(parsed, ratios) if name in p)
        shape = total.shape
        mat = total.flatten(1)
        u, s, vh = torch.linalg.svd(mat, full_matrices=False)
        r = min(rank, s.shape[0])
        up = u[:, :r] * s[:r].sqrt()
        down = s[:r].sqrt()[:, None] * vh[:r]
        approx = up @ down
        norm = mat.norm().item()
        if norm > 0:
            worst = max(worst, (approx - mat).norm().item() / norm)
        if len(shape) == 4:
            up = up.reshape(shape[0], r, 1, 1)
            down = down.reshape(r, shape[1], shape[2], shape[3])
        out[name + ".lora_down.weight"] = down.contiguous()
        out[name + ".lora_up.weight"] = up.contiguous()
        out[name + ".alpha"] = torch.tensor(float(r))
    return out, worst


def merge_into_models(state_dict: dict[str, torch.Tensor], ratio: float, text_encoders: list, unet, **network_options) -> int:
    """Merge an adapter file (LoRA, OFT, LoHa, LoKr) at strength `ratio` into the model weights it adapts; returns the
    number of modules merged. `network_options`: the family's naming (unet_name_map, te_prefixes).

    Keys that match no module of these models are an error (a file of another model family or architecture)."""
    modules = file_modules(state_dict)
    by_target = {m.target_name: m for m in modules.values()}
    paths = _lora_module_paths(
        set(by_target),
        text_encoders,
        unet,
        network_options.get("te_prefixes") or _te_prefixes(text_encoders),
        network_options.get("unet_name_map"),
    )
    with torch.no_grad():
        for name, m in by_target.items():
            i, path = paths[name]
            weight = (text_encoders[i] if i >= 0 else unet).get_submodule(path).weight
            m.module_for(tuple(weight.shape)).merge_into(weight.data, ratio)
    return len(modules)


def _te_prefixes(text_encoders: list) -> list[str]:
    return ["lora_te"] if len(text_encoders) == 1 else [f"lora_te{i + 1}" for i in range(len(text_encoders))]


# ---------------------------------------------------------------------------------------------------------------------
# FLUX and SD3 single files, streamed: one code path for a family's transformer file and its text-encoder files (FLUX:
# the BFL transformer, CLIP-L, T5-XXL; SD3: the SAI file, which may bundle its encoders, CLIP-L, CLIP-G, T5-XXL). A
# LoRA module `<part's LoRA prefix><path with . -> _>` changes the key `<part's key prefix><path>.weight` of a file
# holding that part; only the tables of PartFiles differ per family.
# ---------------------------------------------------------------------------------------------------------------------

FLUX_PARTS = {"transformer": "lora_unet_", "clip_l": "lora_te1_", "t5xxl": "lora_te3_"}  # part -> LoRA name prefix
FLUX_PART_FLAGS = {  # part -> (input flag, output flag) of tools/merge_lora.py (sd-scripts' flux_merge_lora names)
    "transformer": ("--flux_model", "--save_to"),
    "clip_l": ("--clip_l", "--clip_l_save_to"),
    "t5xxl": ("--t5xxl", "--t5xxl_save_to"),
}
FLUX_PART_NAMES = {"transformer": "FLUX transformer", "clip_l": "CLIP-L", "t5xxl": "T5-XXL"}
BFL_PREFIX = "model.diffusion_model."
SD3_PARTS = {"transformer": "lora_unet_", "clip_l": "lora_te1_", "clip_g": "lora_te2_", "t5xxl": "lora_te3_"}  # lora_sd3
SD3_PART_FLAGS = {
    "transformer": ("--sd3_model", "--save_to"),
    "clip_l": ("--clip_l", "--clip_l_save_to"),
    "clip_g": ("--clip_g", "--clip_g_save_to"),
    "t5xxl": ("--t5xxl", "--t5xxl_save_to"),
}
SD3_PART_NAMES = {"transformer": "SD3 MMDiT", "clip_l": "CLIP-L", "clip_g": "CLIP-G", "t5xxl": "T5-XXL"}
CLIP_PARTS = ("clip_l", "clip_g")  # kohya names of a CLIP keep `text_model.`
MODEL_FLAGS = {"sd1": "--sd_model", "sd2": "--sd_model", "sdxl": "--sd_model", "flux": "--flux_model", "sd3": "--sd3_model"}

Modules = dict[str, FileModule]  # the modules of an adapter file by the kohya LoRA name of the weight they change


def _meta_flux_transformer(shapes: dict[str, tuple[int, ...]]):
    """A FluxTransformer2DModel on the meta device shaped like a BFL file (for converting diffusers/PEFT LoRA names)."""
    from diffusers import FluxTransformer2DModel

    from library.flux_models import infer_flux_transformer_config

    return _meta(FluxTransformer2DModel, **infer_flux_transformer_config(shapes))


def _meta_sd3_transformer(shapes: dict[str, tuple[int, ...]]):
    """An SD3Transformer2DModel on the meta device shaped like a SAI file's MMDiT."""
    from diffusers import SD3Transformer2DModel

    from library.sd3_models import infer_sd3_transformer_config

    return _meta(SD3Transformer2DModel, **infer_sd3_transformer_config(shapes))


def _flux_peft_to_kohya(state_dict: dict[str, torch.Tensor], transformer) -> dict[str, torch.Tensor]:
    from networks.lora_flux import peft_to_kohya

    return peft_to_kohya(state_dict, transformer)


def _sd3_peft_to_kohya(state_dict: dict[str, torch.Tensor], transformer) -> dict[str, torch.Tensor]:
    from networks.lora_sd3 import sd3_peft_to_kohya

    return sd3_peft_to_kohya(state_dict, transformer)


@dataclass(frozen=True)
class PartFiles:
    """How a family's LoRA modules map onto its single files, one file given per part ("transformer", text encoders).

    key: detect_family's name of its transformer files; parts: part -> LoRA name prefix; flags: part -> (input, output)
    flag of tools/merge_lora.py; labels: part -> what it is; key_prefixes: part -> the prefix of its tensors in a single
    file (stripped where the file has it); bundles: a transformer file may also hold the text encoders under their key
    prefixes (merged in place); meta_transformer: a transformer file's shapes -> a diffusers transformer on the meta
    device; peft_to_kohya(state_dict, that transformer or None): diffusers/PEFT LoRA names in kohya ones."""

    key: str
    name: str
    parts: dict[str, str]
    flags: dict[str, tuple[str, str]]
    labels: dict[str, str]
    key_prefixes: dict[str, str]
    bundles: bool
    meta_transformer: Callable
    peft_to_kohya: Callable


FLUX_FILES = PartFiles(
    "flux", "FLUX.1", FLUX_PARTS, FLUX_PART_FLAGS, FLUX_PART_NAMES, {"transformer": BFL_PREFIX}, False,
    _meta_flux_transformer, _flux_peft_to_kohya,
)  # fmt: skip
SD3_FILES = PartFiles(
    "sd3", "SD3", SD3_PARTS, SD3_PART_FLAGS, SD3_PART_NAMES, {p: SD3_KEY_PREFIXES[p] for p in SD3_PARTS}, True,
    _meta_sd3_transformer, _sd3_peft_to_kohya,
)  # fmt: skip


def reads_as_sd3_lora(keys) -> bool:
    """Whether a LoRA's key names are SD3's rather than FLUX's (the two families whose text encoders are merged into
    files of their own): kohya `lora_unet_joint_blocks_` or `lora_te2_` (FLUX has one CLIP), diffusers/PEFT
    `text_encoder_3.` or a CLIP under `text_encoder_2.` (FLUX's second encoder is T5)."""
    return any(
        k.startswith(("lora_unet_joint_blocks_", "lora_te2_", "text_encoder_3.", "text_encoder_2.text_model.")) for k in keys
    )


def _file_shapes(path: str) -> dict[str, tuple[int, ...]]:
    from library.checkpoint_files import read_key_shapes

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist")
    return read_key_shapes(path)


def lora_parts(family: PartFiles, state_dict: dict[str, torch.Tensor], transformer=None) -> dict[str, Modules]:
    """A LoRA's modules by part of `family` (PartFiles): name -> (down, up, alpha / rank).

    kohya (sd-scripts) names, or the diffusers/PEFT layout (`transformer.*`, `text_encoder*.` `.lora_A/.lora_B`),
    converted by family.peft_to_kohya: its transformer modules need `transformer` (meta is fine); without one they are
    listed under "transformer" by their PEFT names (enough to say that a transformer file is needed). Keys of any other
    kind (LoHa, DoRA, modules of no part) are an error."""
    from networks.lora_flux import is_peft_layout

    peft_left: set[str] = set()
    if is_peft_layout(state_dict):
        state_dict = family.peft_to_kohya(state_dict, transformer)
        peft_left = {k[: -len(".lora_A.weight")] for k in state_dict if k.endswith(".lora_A.weight")}
        if peft_left and transformer is not None:
            raise ValueError(
                f"{len(peft_left)} LoRA modules match nothing in the {family.labels['transformer']}, e.g. {min(peft_left)}"
            )
    peft_keys = {p + s for p in peft_left for s in (".lora_A.weight", ".lora_B.weight", ".alpha")}
    modules = _file_modules({k: v for k, v in state_dict.items() if k not in peft_keys})
    parts: dict[str, Modules] = {part: {} for part in family.parts}
    for name, module in modules.items():
        part = next((p for p, prefix in family.parts.items() if name.startswith(prefix)), None)
        if part is None:
            raise ValueError(
                f"{name} is not a {family.name} LoRA module ({', '.join(family.parts.values())}); is it a LoRA for another model?"
            )
        parts[part][name] = module
    for name in peft_left:
        tensors = {"lora_down.weight": state_dict[name + ".lora_A.weight"], "lora_up.weight": state_dict[name + ".lora_B.weight"]}
        parts["transformer"][name] = FileModule(
            name, LORA, {**tensors, "alpha": torch.tensor(float(tensors["lora_down.weight"].shape[0]))}
        )
    return {p: m for p, m in parts.items() if m}


def flux_lora_parts(state_dict: dict[str, torch.Tensor], transformer=None) -> dict[str, Modules]:
    """A FLUX LoRA's modules by part ("transformer", "clip_l", "t5xxl"); see lora_parts."""
    return lora_parts(FLUX_FILES, state_dict, transformer)


def file_sections(family: PartFiles, part: str, keys: list[str]) -> dict[str, str]:
    """Part -> the prefix of its keys in a file given for `part`: the part itself first (under its key prefix where the
    file has it, else the keys as they are) and, in a transformer file of a family that bundles, each text encoder the
    file holds under its key prefix."""
    has = lambda prefix: any(k.startswith(prefix) for k in keys)  # noqa: E731
    own = family.key_prefixes.get(part, "")
    sections = {part: own if own and has(own) else ""}
    if family.bundles and part == "transformer":
        sections.update({p: family.key_prefixes[p] for p in family.parts if p != part and has(family.key_prefixes[p])})
    return sections


def file_module_names(family: PartFiles, sections: dict[str, str], keys: list[str]) -> tuple[dict[str, str], set[str]]:
    """(LoRA module name -> weight key, names more than one key maps to) of a file's keys, by file_sections: a key
    `<section prefix><path>.weight` is module `<the part's LoRA prefix><path with . -> _>`; a CLIP's module names keep
    `text_model.` (added to transformers 5's flattened names). E.g. FLUX `double_blocks.0.img_attn.qkv.weight` <->
    `lora_unet_double_blocks_0_img_attn_qkv`, SD3 `text_encoders.clip_g.transformer.text_model.encoder.layers.0.mlp.fc1
    .weight` <-> `lora_te2_text_model_encoder_layers_0_mlp_fc1`, T5 `encoder.block.0.layer.0.SelfAttention.q.weight`
    <-> `lora_te3_encoder_block_0_layer_0_SelfAttention_q`."""
    prefixed = [p for p in sections.values() if p]
    names: dict[str, str] = {}
    ambiguous: set[str] = set()
    for part, strip in sections.items():
        inside = [k for k in keys if k.startswith(strip) and (strip or not k.startswith(tuple(prefixed)))]
        add = "text_model." if part in CLIP_PARTS and not any(k[len(strip) :].startswith("text_model.") for k in inside) else ""
        for k in inside:
            if k.endswith(".weight"):
                name = family.parts[part] + (add + k[len(strip) : -len(".weight")]).replace(".", "_")
                if name in names:
                    ambiguous.add(name)
                names[name] = k
    return names, ambiguous


def _who(lora_names: list[str] | None, i: int) -> str:
    return f"{lora_names[i]}: " if lora_names else ""


Targets = dict[str, list[tuple[str, slice | None]]]  # file key -> [(LoRA module name, rows of the key it changes)]


def check_targets(
    src: str,
    shapes: dict[str, tuple[int, ...]],
    by_key: Targets,
    loras: list[tuple[Modules, float]],
    hint: str,
    lora_names: list[str] | None = None,
) -> None:
    """Every module's weight change must have the shape of what it changes: the whole tensor, or its rows. The error
    names the LoRA file when `lora_names` (one per LoRA) are given."""
    for key, mods in by_key.items():
        shape = shapes[key]
        for name, rows in mods:
            target = shape if rows is None else (len(range(*rows.indices(shape[0]))), *shape[1:])
            for i, (modules, _) in enumerate(loras):
                if name not in modules:
                    continue
                try:
                    modules[name].module_for(tuple(target))
                except ValueError as e:
                    where = key if rows is None else f"rows {rows.start}:{rows.stop} of {key}"
                    raise ValueError(f"{_who(lora_names, i)}{e}; {where} in {src} is {list(target)}; {hint}") from None


def _plan_file(
    family: PartFiles,
    src: str,
    shapes: dict[str, tuple[int, ...]],
    sections: dict[str, str],
    per_lora: list[tuple[dict[str, Modules], float]],
    lora_names: list[str] | None,
) -> tuple[Targets, list[tuple[Modules, float]]]:
    """(file key -> [(module name, None)], each LoRA's modules of the parts the file holds with its ratio), checked:
    every such module has a weight of its shape in `src`."""
    names, ambiguous = file_module_names(family, sections, list(shapes))
    loras = [({n: m for p in sections for n, m in parts.get(p, {}).items()}, ratio) for parts, ratio in per_lora]
    part = next(iter(sections))
    what = f"{family.name} single file" if part == "transformer" and family.bundles else f"{family.labels[part]} file"
    for i, (modules, _) in enumerate(loras):
        missing = sorted(n for n in modules if n not in names)
        if missing:
            raise ValueError(
                f"{_who(lora_names, i)}{len(missing)} LoRA modules match nothing in {src}, e.g. {missing[0]}; is it the "
                f"{what} this LoRA was trained on, or is the LoRA for another model?"
            )
        both = sorted(n for n in modules if n in ambiguous)
        if both:
            raise ValueError(f"{both[0]} matches several weights of {src}; cannot tell which one to merge into")
    by_key: Targets = {names[n]: [(n, None)] for n in sorted({n for modules, _ in loras for n in modules})}
    check_targets(src, shapes, by_key, loras, "is it a LoRA for another model size?", lora_names)
    return by_key, loras


def _check_transformer_file(family: PartFiles, src: str, shapes: dict[str, tuple[int, ...]]) -> None:
    from library.checkpoint_files import FAMILY_NAMES, detect_family

    found = detect_family(shapes)
    if found != family.key:
        what = f"a {FAMILY_NAMES[found]} model" if found in FAMILY_NAMES else f"not a {family.name} transformer file"
        hint = f"; merge into it with {MODEL_FLAGS[found]}" if found in MODEL_FLAGS else ""
        raise ValueError(f"{family.flags['transformer'][0]} {src} is {what}{hint}")


class _SourceFile:
    """The tensors of a model file, read one at a time: safetensors through safe_open (memory-mapped), a pickle
    (.ckpt/.pt/.bin) loaded whole with weights_only=True. `layout` lists (key, shape, dtype) in the file's order."""

    def __init__(self, path: str):
        self.path = path
        if path.lower().endswith(".safetensors"):
            from safetensors import safe_open

            from library.saving import ST_DTYPES

            codes = {code: dtype for dtype, code in ST_DTYPES.items()}
            self._file = safe_open(path, framework="pt")
            self._tensors = None
            self.metadata = self._file.metadata()
            self.layout = []
            for k in self._file.keys():
                sl = self._file.get_slice(k)
                self.layout.append((k, tuple(sl.get_shape()), codes[sl.get_dtype()]))
        else:
            from library.checkpoint_files import read_state_dict

            self._file = None
            self._tensors = read_state_dict(path)
            self.metadata = None
            self.layout = [(k, tuple(v.shape), v.dtype) for k, v in self._tensors.items()]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: shape for k, shape, _ in self.layout}

    def get(self, key: str) -> torch.Tensor:
        return self._file.get_tensor(key) if self._file is not None else self._tensors.pop(key)


def merge_into_file(
    src: str | _SourceFile,
    dst: str,
    loras: list[tuple[Modules, float]],
    by_key: Targets,
    save_dtype: torch.dtype | None = None,
    merge_dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
    pickle_key: str | None = "state_dict",
) -> int:
    """Stream `src` into the new file `dst` (atomic; never replaces an existing file unless `overwrite`): every tensor
    of the source in its order, with the source's metadata; to each listed key (or the listed rows of it) ratio x the
    delta of its modules is added, in `merge_dtype`, and the result is written back in the key's own dtype. Every other
    tensor is written bit-identical. `save_dtype` casts every floating tensor instead. `dst` is a .safetensors file or a
    pickle ({pickle_key: tensors}, or the plain tensors with pickle_key=None). Returns the number of keys changed."""
    from library.saving import save_tensors

    source = src if isinstance(src, _SourceFile) else _SourceFile(src)
    dtypes = {k: dtype for k, _, dtype in source.layout}
    absent = sorted(set(by_key) - set(dtypes))
    if absent:
        raise ValueError(f"{source.path} has no tensor {absent[0]}")

    def out_dtype(dtype: torch.dtype) -> torch.dtype:
        return save_dtype if save_dtype is not None and dtype.is_floating_point else dtype

    def produce(key: str) -> torch.Tensor:
        tensor = source.get(key)
        mods = by_key.get(key)
        if mods:
            weight = tensor.to(merge_dtype, copy=True)
            for name, rows in mods:
                view = weight if rows is None else weight[rows]
                for modules, ratio in loras:
                    if name in modules:
                        modules[name].module_for(tuple(view.shape)).merge_into(view, ratio)
            tensor = weight
        return tensor.to(out_dtype(dtypes[key]))

    layout = [(k, shape, out_dtype(dtype)) for k, shape, dtype in source.layout]
    save_tensors(dst, layout, produce, source.metadata, overwrite=overwrite, pickle_key=pickle_key)
    return len(by_key)


# ---------------------------------------------------------------------------------------------------------------------
# SD 1.x/2.x and SDXL: which LoRA module changes which key, for single files (LDM / sgm names) and diffusers folders.
# The adapted modules and their kohya names come from networks.lora.LoRANetwork built on weightless (meta) models of
# the file's architecture; their file keys from library.ldm_names (the same maps the single-file writers use).
# ---------------------------------------------------------------------------------------------------------------------


def _lora_module_paths(
    names: set[str], text_encoders: list, unet, te_prefixes: list[str], unet_name_map
) -> dict[str, tuple[int, str]]:
    """LoRA module name -> (model index: 0.. text encoders, -1 U-Net; module path in it) for the `names` wanted
    (SDXL U-Net modules by sgm or diffusers names). Names no module has are an error."""
    from networks.lora import LoRANetwork

    where: dict[int, tuple[int, str]] = {}
    for i, model in enumerate([*text_encoders, unet]):
        for path, module in model.named_modules():
            where[id(module)] = (i if i < len(text_encoders) else -1, path)
    network = LoRANetwork(
        text_encoders, unet, module_dims={n: 1 for n in names}, te_prefixes=te_prefixes, unet_name_map=unet_name_map
    )
    found = {m.lora_name: where[id(m.org_module)] for m in network.loras}
    for alias, name in getattr(network, "aliases", {}).items():
        if alias in names and name in found:
            found[alias] = found[name]
    missing = sorted(names - set(found))
    if missing:
        raise ValueError(
            f"{len(missing)} LoRA modules match nothing in this model, e.g. {missing[0]}; is it a LoRA for another model?"
        )
    return {n: found[n] for n in names}


def _meta(cls_or_factory, *args, **kwargs):
    from accelerate import init_empty_weights

    with init_empty_weights():
        return cls_or_factory(*args, **kwargs)


def sd_single_file_targets(shapes: dict[str, tuple[int, ...]], names: set[str], v2: bool | None = None) -> Targets:
    """File key -> [(LoRA module, rows)] of an SD 1.x/2.x or SDXL single file (its keys and shapes) for the LoRA
    modules `names`. U-Net modules: `model.diffusion_model.` + the LDM/sgm name; CLIP-L: `text_model.*` under the
    family's prefix; OpenCLIP (SD2, SDXL's second encoder): q/k/v are rows of the layer's fused `attn.in_proj_weight`.
    `v2` (--v2) must agree with the file when given."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from library.checkpoint_files import CLIP_L_PREFIX, OPEN_CLIP_PREFIX, UNET_PREFIX, detect_family
    from library.ldm_names import open_clip_qkv_rows, text_encoder_ldm_param_names, unet_ldm_module_names

    family = detect_family(shapes)
    if family not in ("sd1", "sd2", "sdxl"):
        raise ValueError(
            f"not an SD 1.x/2.x or SDXL single file (its keys read as {family}); FLUX merges take --flux_model, SD3 ones --sd3_model"
        )
    if v2 and family != "sd2":
        raise ValueError(f"--v2 is given but the file is {'SDXL' if family == 'sdxl' else 'SD 1.x'}")
    meta = {k: torch.empty(shape, device="meta") for k, shape in shapes.items()}
    if family == "sdxl":
        from library.sdxl_models import TE1_PREFIX, TE2_PREFIX, infer_sdxl_single_file_configs

        configs = infer_sdxl_single_file_configs(meta)
        tes = [
            (_meta(CLIPTextModel, CLIPTextConfig(**configs["text_encoder"])), TE1_PREFIX, False),
            (_meta(CLIPTextModelWithProjection, CLIPTextConfig(**configs["text_encoder_2"])), TE2_PREFIX, True),
        ]
        te_prefixes = ["lora_te1", "lora_te2"]
    else:
        from library.sd_models import infer_single_file_configs

        sd2 = family == "sd2"
        configs = infer_single_file_configs(meta, sd2)
        tes = [(_meta(CLIPTextModel, CLIPTextConfig(**configs["text_encoder"])), OPEN_CLIP_PREFIX if sd2 else CLIP_L_PREFIX, sd2)]
        te_prefixes = ["lora_te"]
    unet = _meta(UNet2DConditionModel, **configs["unet"])
    unet_ldm = unet_ldm_module_names(unet)
    paths = _lora_module_paths(names, [te for te, _, _ in tes], unet, te_prefixes, unet_ldm if family == "sdxl" else None)
    te_keys = [text_encoder_ldm_param_names(te, v2=open_clip) for te, _, open_clip in tes]
    by_key: Targets = {}
    for name, (i, path) in sorted(paths.items()):
        if i < 0:
            key, rows = UNET_PREFIX + unet_ldm[path] + ".weight", None
        else:
            te, prefix, open_clip = tes[i]
            hf_key = path + ".weight"
            key = prefix + te_keys[i][hf_key]
            rows = open_clip_qkv_rows(hf_key, te.config.hidden_size) if open_clip else None
        by_key.setdefault(key, []).append((name, rows))
    return by_key


def _folder_weight_files(folder: str) -> list[str]:
    names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    return [os.path.join(folder, n) for n in names if n.endswith((".safetensors", ".bin"))]


def sd_folder_targets(folder: str, names: set[str]) -> dict[str, Targets]:
    """Weight file -> (key -> [(LoRA module, None)]) of an SD 1.x/2.x or SDXL diffusers folder for the LoRA modules
    `names`: diffusers / transformers key names in unet/, text_encoder/ (and text_encoder_2/). Every weight file of a
    component (shards, variants such as .fp16, .bin) gets the change of the keys it holds; each module must be in one."""
    import json

    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from library.ldm_names import unet_ldm_module_names

    def config(component: str) -> dict:
        with open(os.path.join(folder, component, "config.json")) as f:
            return json.load(f)

    sdxl = os.path.isfile(os.path.join(folder, "text_encoder_2", "config.json"))
    components = ["text_encoder", "text_encoder_2"] if sdxl else ["text_encoder"]
    te_classes = [CLIPTextModel, CLIPTextModelWithProjection]
    tes = [_meta(cls, CLIPTextConfig.from_dict(config(c))) for cls, c in zip(te_classes, components)]
    unet = _meta(UNet2DConditionModel.from_config, config("unet"))
    te_prefixes = ["lora_te1", "lora_te2"] if sdxl else ["lora_te"]
    paths = _lora_module_paths(names, tes, unet, te_prefixes, unet_ldm_module_names(unet) if sdxl else None)
    files: dict[str, Targets] = {}
    placed: set[str] = set()
    for i, component in [*enumerate(components), (-1, "unet")]:
        wanted = {n: p for n, (j, p) in paths.items() if j == i}
        if not wanted:
            continue
        for path in _folder_weight_files(os.path.join(folder, component)):
            keys = set(_SourceFile(path).shapes())
            for name, module in wanted.items():
                for key in (
                    module + ".weight",
                    "text_model." + module + ".weight",
                    module.removeprefix("text_model.") + ".weight",
                ):
                    if key in keys:
                        files.setdefault(path, {}).setdefault(key, []).append((name, None))
                        placed.add(name)
                        break
    missing = sorted(names - placed)
    if missing:
        raise ValueError(f"{len(missing)} LoRA modules have no weight in the files of {folder}, e.g. {missing[0]}")
    return files


def _file_modules(state_dict: dict[str, torch.Tensor]) -> Modules:
    """An adapter file's modules by the kohya LoRA name of the weight each changes."""
    return {m.target_name: m for m in file_modules(state_dict).values()}


def _lora_modules_of(loras: list[tuple[dict[str, torch.Tensor], float]]) -> list[tuple[Modules, float]]:
    return [(_file_modules(sd), ratio) for sd, ratio in loras]


def merge_into_sd_file(
    src: str,
    dst: str,
    loras: list[tuple[dict[str, torch.Tensor], float]],
    save_dtype: torch.dtype | None = None,
    merge_dtype: torch.dtype = torch.float32,
    v2: bool | None = None,
) -> int:
    """Merge LoRA files (state dicts with ratios) into an SD 1.x/2.x or SDXL single file, streamed into the new file
    `dst` (.safetensors, or .ckpt/.pt): every tensor of `src` whatever its name (position_ids, the DDPM schedule buffers,
    EMA weights, ...) is written, untouched ones bit-identical in their dtype; no model is built and no tokenizer read.
    Everything is checked before anything is written; keys the merge cannot apply are errors. Returns keys changed."""
    parsed = _lora_modules_of(loras)
    source = _SourceFile(src)
    shapes = source.shapes()
    by_key = sd_single_file_targets(shapes, {n for modules, _ in parsed for n in modules}, v2)
    check_targets(src, shapes, by_key, parsed, "is it a LoRA for another model?")
    return merge_into_file(source, dst, parsed, by_key, save_dtype, merge_dtype)


def merge_into_sd_folder(
    src: str,
    dst: str,
    loras: list[tuple[dict[str, torch.Tensor], float]],
    save_dtype: torch.dtype | None = None,
    merge_dtype: torch.dtype = torch.float32,
) -> int:
    """Merge LoRA files into an SD 1.x/2.x or SDXL diffusers folder: a new folder `dst` with every file of `src` (configs,
    tokenizers, scheduler, other components) copied as it is and each weight file the LoRAs change streamed through
    merge_into_file. Written under a temporary name and renamed (never over an existing file or folder). Returns keys changed."""
    import shutil

    from library.saving import new_temp_folder, publish_folder

    parsed = _lora_modules_of(loras)
    plan = sd_folder_targets(src, {n for modules, _ in parsed for n in modules})
    for path, by_key in plan.items():
        check_targets(path, _SourceFile(path).shapes(), by_key, parsed, "is it a LoRA for another model?")
    tmp = new_temp_folder(dst)
    changed = 0
    try:
        for root, _dirs, files in os.walk(src, followlinks=True):
            rel = os.path.relpath(root, src)
            os.makedirs(os.path.join(tmp, rel), exist_ok=True)
            for name in files:
                path = os.path.join(root, name)
                out = os.path.normpath(os.path.join(tmp, rel, name))
                if path in plan or (save_dtype is not None and rel != "." and name.endswith((".safetensors", ".bin"))):
                    changed += merge_into_file(path, out, parsed, plan.get(path, {}), save_dtype, merge_dtype, pickle_key=None)
                else:
                    shutil.copyfile(path, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish_folder(tmp, dst)
    return changed


def merge_into_part_files(
    family: PartFiles,
    files: dict[str, tuple[str, str]],
    loras: list[tuple[dict[str, torch.Tensor], float]],
    save_dtype: torch.dtype | None = None,
    merge_dtype: torch.dtype = torch.float32,
    lora_names: list[str] | None = None,
) -> dict[str, int]:
    """Merge LoRAs (state dicts with ratios) into a family's single files, streamed (merge_into_file). `files`: part ->
    (source file, new file); a transformer file that bundles text encoders gets their modules too (and so does a file
    given for the encoder). `lora_names` (the LoRA files) are named in errors. Everything is checked before the first
    file is written: a transformer file of another family, a LoRA module of a part no file holds, a file holding no
    part the LoRAs adapt, a module matching no weight of its file (or not its shape). Returns part -> weights changed."""
    unknown = sorted(set(files) - set(family.parts))
    if unknown:
        raise ValueError(f"unknown {family.name} parts {unknown}; valid: {', '.join(family.parts)}")
    shapes = {part: _file_shapes(src) for part, (src, _) in files.items()}
    if "transformer" in files:
        _check_transformer_file(family, files["transformer"][0], shapes["transformer"])
    transformer = None
    if "transformer" in files and any(_has_peft_transformer_keys(sd) for sd, _ in loras):
        transformer = family.meta_transformer(shapes["transformer"])
    per_lora: list[tuple[dict[str, Modules], float]] = []
    for i, (sd, ratio) in enumerate(loras):
        try:
            per_lora.append((lora_parts(family, sd, transformer), ratio))
        except ValueError as e:
            raise ValueError(f"{_who(lora_names, i)}{e}") from None
    sections = {part: file_sections(family, part, list(shapes[part])) for part in files}
    adapted = {p for parts, _ in per_lora for p in parts}
    lacking = [p for p in family.parts if p in adapted and not any(p in s for s in sections.values())]
    if lacking:
        flags = " ".join(f"{family.flags[p][0]} FILE {family.flags[p][1]} OUT" for p in lacking)
        what = " and ".join(family.labels[p] for p in lacking)
        held = f" ({files['transformer'][0]} holds no {what})" if family.bundles and "transformer" in files else ""
        raise ValueError(
            f"the LoRA has {what} modules but no file to merge them into{held}; add {flags} (kiln never drops modules)"
        )
    unused = [p for p in family.parts if p in files and not adapted & set(sections[p])]
    if unused:
        held = [q for p in unused for q in sections[p]]
        raise ValueError(
            f"no LoRA has {' or '.join(family.labels[q] for q in held)} modules ({', '.join(family.parts[q] for q in held)}); "
            f"leave out {' '.join(f'{family.flags[p][0]} {family.flags[p][1]}' for p in unused)}"
        )
    plans = {
        part: _plan_file(family, files[part][0], shapes[part], sections[part], per_lora, lora_names)
        for part in family.parts
        if part in files
    }
    from library.saving import SaveError

    counts: dict[str, int] = {}
    for part, (by_key, part_loras) in plans.items():
        try:
            counts[part] = merge_into_file(*files[part], part_loras, by_key, save_dtype, merge_dtype)
        except SaveError as e:
            if counts:
                raise SaveError(f"{e}\nwritten before the error: {', '.join(files[p][1] for p in counts)}") from e
            raise
    return counts


def merge_into_flux_files(
    files: dict[str, tuple[str, str]],
    loras: list[tuple[dict[str, torch.Tensor], float]],
    save_dtype: torch.dtype | None = None,
    lora_names: list[str] | None = None,
) -> dict[str, int]:
    """Merge FLUX LoRAs into single files, streamed in float32. `files`: part ("transformer": the BFL file, "clip_l",
    "t5xxl") -> (source file, new file); see merge_into_part_files. Returns part -> weights changed."""
    return merge_into_part_files(FLUX_FILES, files, loras, save_dtype, lora_names=lora_names)


def merge_into_sd3_files(
    files: dict[str, tuple[str, str]],
    loras: list[tuple[dict[str, torch.Tensor], float]],
    save_dtype: torch.dtype | None = None,
    merge_dtype: torch.dtype = torch.float32,
    lora_names: list[str] | None = None,
) -> dict[str, int]:
    """Merge SD3 / SD3.5 LoRAs (sd-scripts' lora_sd3 names, or diffusers/PEFT) into single files, streamed. `files`:
    part ("transformer": a SAI single file, with or without `model.diffusion_model.` and bundled
    `text_encoders.{clip_l,clip_g,t5xxl}.transformer.*`; "clip_l", "clip_g", "t5xxl": transformers-layout encoder
    files) -> (source file, new file). A kohya file's lora_up is in SAI's row order (the final layer's and the pre-only
    context block's modulations included), so each weight gets ratio x alpha / rank x up @ down as it is; see
    merge_into_part_files. Returns part -> weights changed."""
    return merge_into_part_files(SD3_FILES, files, loras, save_dtype, merge_dtype, lora_names)


def _has_peft_transformer_keys(state_dict: dict[str, torch.Tensor]) -> bool:
    return any(k.endswith((".lora_A.weight", ".lora_B.weight")) and not k.startswith("text_encoder") for k in state_dict)


def merge_into_bfl_file(
    src: str, dst: str, loras: list[tuple[dict[str, torch.Tensor], float]], save_dtype: torch.dtype | None = None
) -> int:
    """merge_into_flux_files for a transformer-only LoRA: the number of weights changed in the BFL file `dst`."""
    return merge_into_flux_files({"transformer": (src, dst)}, loras, save_dtype)["transformer"]
