"""Merging kohya-format LoRA files: into one LoRA (exact concatenation or SVD), or into a model's weights, or (FLUX)
into single files streamed tensor by tensor: the BFL transformer, CLIP-L and T5-XXL (merge_into_flux_files)."""

from __future__ import annotations

import logging
import os

import torch

from networks.lora import LoRANetwork, dims_from_weights, lora_delta

logger = logging.getLogger(__name__)


def _modules(state_dict: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """name -> (down, up, alpha / rank) of every module of a LoRA file."""
    dims, alphas = dims_from_weights(state_dict)
    return {
        name: (state_dict[name + ".lora_down.weight"].float(), state_dict[name + ".lora_up.weight"].float(), alphas[name] / dims[name])
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


def merge_loras_svd(state_dicts: list[dict[str, torch.Tensor]], ratios: list[float], rank: int | None = None) -> tuple[dict[str, torch.Tensor], float]:
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
    """Add ratio x each module's delta to the model weights it adapts; returns the number of modules merged.

    Keys that match no module of these models are an error (a LoRA of another model family or architecture)."""
    dims, alphas = dims_from_weights(state_dict)
    network = LoRANetwork(text_encoders, unet, module_dims=dims, module_alphas=alphas, **network_options)
    parsed = _modules(state_dict)
    found = {m.lora_name: m for m in network.loras}
    missing = sorted(set(parsed) - set(found))
    if missing:
        raise ValueError(f"{len(missing)} LoRA modules match nothing in this model, e.g. {missing[0]}; is it a LoRA for another model?")
    with torch.no_grad():
        for name, (down, up, scale) in parsed.items():
            weight = found[name].org_module.weight
            weight += (lora_delta(down, up, scale) * ratio).to(weight.dtype).reshape(weight.shape)
    return len(parsed)


# ---------------------------------------------------------------------------------------------------------------------
# FLUX single files, streamed: one code path for the BFL transformer, CLIP-L and T5-XXL; only the file key <-> LoRA
# module name rule differs (flux_file_module_names).
# ---------------------------------------------------------------------------------------------------------------------

FLUX_PARTS = {"transformer": "lora_unet_", "clip_l": "lora_te1_", "t5xxl": "lora_te3_"}  # part -> LoRA name prefix
FLUX_PART_FLAGS = {  # part -> (input flag, output flag) of tools/merge_lora.py (sd-scripts' flux_merge_lora names)
    "transformer": ("--flux_model", "--save_to"),
    "clip_l": ("--clip_l", "--clip_l_save_to"),
    "t5xxl": ("--t5xxl", "--t5xxl_save_to"),
}
FLUX_PART_NAMES = {"transformer": "FLUX transformer", "clip_l": "CLIP-L", "t5xxl": "T5-XXL"}
BFL_PREFIX = "model.diffusion_model."
_LORA_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")

Modules = dict[str, tuple[torch.Tensor, torch.Tensor, float]]


def flux_file_module_names(part: str, keys: list[str]) -> tuple[dict[str, str], set[str]]:
    """(LoRA module name -> weight key, names more than one key maps to) for a FLUX `part` file's keys:

    transformer: BFL keys with or without `model.diffusion_model.` (`double_blocks.0.img_attn.qkv.weight` <->
    `lora_unet_double_blocks_0_img_attn_qkv`); clip_l: Hugging Face CLIP (`text_model.encoder.layers.0.self_attn.q_proj.weight`
    <-> `lora_te1_text_model_encoder_layers_0_self_attn_q_proj`; transformers 5's flattened names without `text_model.`
    too); t5xxl: Hugging Face T5 encoder (`encoder.block.0.layer.0.SelfAttention.q.weight` <->
    `lora_te3_encoder_block_0_layer_0_SelfAttention_q`)."""
    strip = add = ""
    if part == "transformer" and any(k.startswith(BFL_PREFIX) for k in keys):
        strip = BFL_PREFIX
    elif part == "clip_l" and not any(k.startswith("text_model.") for k in keys):
        add = "text_model."
    names: dict[str, str] = {}
    ambiguous: set[str] = set()
    for k in keys:
        if k.startswith(strip) and k.endswith(".weight"):
            name = FLUX_PARTS[part] + (add + k[len(strip) : -len(".weight")]).replace(".", "_")
            if name in names:
                ambiguous.add(name)
            names[name] = k
    return names, ambiguous


def _file_shapes(path: str) -> dict[str, tuple[int, ...]]:
    from library.checkpoint_files import read_key_shapes

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist")
    return read_key_shapes(path)


def _meta_flux_transformer(path: str):
    """A FluxTransformer2DModel on the meta device shaped like a BFL file (for converting diffusers/PEFT LoRA names)."""
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    from library.flux_models import infer_flux_transformer_config

    config = infer_flux_transformer_config(_file_shapes(path))
    with init_empty_weights():
        return FluxTransformer2DModel(**config)


def flux_lora_parts(state_dict: dict[str, torch.Tensor], transformer=None) -> dict[str, Modules]:
    """A FLUX LoRA's modules by part ("transformer", "clip_l", "t5xxl"): name -> (down, up, alpha / rank).

    kohya (sd-scripts) names, or the diffusers/PEFT layout (`transformer.*`, `text_encoder.*`, `text_encoder_2.*`
    `.lora_A/.lora_B`), converted by networks.lora_flux.peft_to_kohya: its transformer modules need `transformer` (a
    FluxTransformer2DModel, meta is fine); without one they are listed under "transformer" by their PEFT names (enough
    to say that a transformer file is needed). Keys of any other kind (LoHa, DoRA, other families) are an error."""
    from networks.lora_flux import is_peft_layout, peft_to_kohya

    peft_left: set[str] = set()
    if is_peft_layout(state_dict):
        state_dict = peft_to_kohya(state_dict, transformer)
        peft_left = {k[: -len(".lora_A.weight")] for k in state_dict if k.endswith(".lora_A.weight")}
        if peft_left and transformer is not None:
            raise ValueError(f"{len(peft_left)} LoRA modules match nothing in the FLUX transformer, e.g. {min(peft_left)}")
    downs = {k[: -len(".lora_down.weight")] for k in state_dict if k.endswith(".lora_down.weight")}
    lacking = sorted(n for n in downs if n + ".lora_up.weight" not in state_dict)
    if lacking:
        raise ValueError(f"LoRA module {lacking[0]} has a lora_down but no lora_up weight")
    modules = _modules(state_dict)
    known = {name + s for name in modules for s in _LORA_SUFFIXES}
    known |= {p + s for p in peft_left for s in (".lora_A.weight", ".lora_B.weight", ".alpha")}
    unknown = sorted(k for k in state_dict if k not in known)
    if unknown:
        raise ValueError(
            f"{len(unknown)} keys are not kohya LoRA (lora_down/lora_up/alpha) or PEFT (lora_A/lora_B) weights, e.g. "
            f"{unknown[0]}; only plain LoRA can be merged"
        )
    parts: dict[str, Modules] = {part: {} for part in FLUX_PARTS}
    for name, module in modules.items():
        part = next((p for p, prefix in FLUX_PARTS.items() if name.startswith(prefix)), None)
        if part is None:
            raise ValueError(f"{name} is not a FLUX.1 LoRA module (lora_unet_, lora_te1_ or lora_te3_); is it a LoRA for another model?")
        parts[part][name] = module
    for name in peft_left:
        parts["transformer"][name] = state_dict[name + ".lora_A.weight"], state_dict[name + ".lora_B.weight"], 1.0
    return {p: m for p, m in parts.items() if m}


def _plan_merge(src: str, part: str, loras: list[tuple[Modules, float]]) -> dict[str, str]:
    """Check that every module of `loras` has a weight of its shape in `src`; returns file key -> module name."""
    shapes = _file_shapes(src)
    names, ambiguous = flux_file_module_names(part, list(shapes))
    wanted = sorted({n for modules, _ in loras for n in modules})
    missing = [n for n in wanted if n not in names]
    if missing:
        raise ValueError(
            f"{len(missing)} LoRA modules match nothing in {src}, e.g. {missing[0]}; is it the {FLUX_PART_NAMES[part]} file "
            "(Hugging Face / BFL layout) this LoRA was trained on?"
        )
    both = [n for n in wanted if n in ambiguous]
    if both:
        raise ValueError(f"{both[0]} matches several weights of {src}; cannot tell which one to merge into")
    for modules, _ in loras:
        for name, (down, up, _scale) in modules.items():
            shape = shapes[names[name]]
            if down.dim() == 2:
                delta = (up.shape[0], down.shape[1])
            else:
                delta = (up.shape[0], *down.shape[1:])
            if up.shape[-1] != down.shape[0] or torch.Size(delta).numel() != torch.Size(shape).numel() or delta[0] != shape[0]:
                raise ValueError(
                    f"{name}: the LoRA changes a {list(delta)} weight but {names[name]} in {src} is {list(shape)}; "
                    "is it a LoRA for another model size?"
                )
    return {names[n]: n for n in wanted}


def merge_into_safetensors(src: str, dst: str, loras: list[tuple[Modules, float]], by_key: dict[str, str], save_dtype: torch.dtype | None = None) -> int:
    """Stream `src` into `dst` (atomic, same key order and metadata), adding ratio x the delta of module `by_key[key]`
    to each listed weight: one tensor in memory at a time. `save_dtype` casts floating tensors. Returns weights changed."""
    from safetensors import safe_open

    from library.saving import ST_DTYPES, stream_safetensors

    codes = {code: dtype for dtype, code in ST_DTYPES.items()}
    with safe_open(src, framework="pt") as f:
        layout = []
        for k in f.keys():
            sl = f.get_slice(k)
            dtype = codes[sl.get_dtype()]
            layout.append((k, tuple(sl.get_shape()), save_dtype if save_dtype is not None and dtype.is_floating_point else dtype))

        def produce(key: str) -> torch.Tensor:
            tensor = f.get_tensor(key)
            out_dtype = save_dtype if save_dtype is not None and tensor.is_floating_point() else tensor.dtype
            name = by_key.get(key)
            if name is not None:
                weight = tensor.float()
                for modules, ratio in loras:
                    if name in modules:
                        weight += lora_delta(*modules[name]).reshape(weight.shape) * ratio
                tensor = weight
            return tensor.to(out_dtype)

        stream_safetensors(dst, layout, produce, f.metadata())
    return len(by_key)


def merge_into_flux_files(
    files: dict[str, tuple[str, str]], loras: list[tuple[dict[str, torch.Tensor], float]], save_dtype: torch.dtype | None = None
) -> dict[str, int]:
    """Merge FLUX LoRAs into single files, streamed. `files`: part ("transformer", "clip_l", "t5xxl") -> (source file,
    new file). Everything is checked before the first file is written: a LoRA module of a part without a file, a file
    whose part no LoRA adapts, a module matching no weight of its file (or not its shape). Returns part -> weights changed."""
    unknown = sorted(set(files) - set(FLUX_PARTS))
    if unknown:
        raise ValueError(f"unknown FLUX parts {unknown}; valid: {', '.join(FLUX_PARTS)}")
    transformer = None
    if "transformer" in files and any(_has_peft_transformer_keys(sd) for sd, _ in loras):
        transformer = _meta_flux_transformer(files["transformer"][0])
    per_part: dict[str, list[tuple[Modules, float]]] = {}
    for sd, ratio in loras:
        for part, modules in flux_lora_parts(sd, transformer).items():
            per_part.setdefault(part, []).append((modules, ratio))
    lacking = [p for p in FLUX_PARTS if p in per_part and p not in files]
    if lacking:
        flags = " ".join(f"{FLUX_PART_FLAGS[p][0]} FILE {FLUX_PART_FLAGS[p][1]} OUT" for p in lacking)
        raise ValueError(
            f"the LoRA has {' and '.join(FLUX_PART_NAMES[p] for p in lacking)} modules but no file to merge them into; "
            f"add {flags} (kiln never drops modules)"
        )
    unused = [p for p in FLUX_PARTS if p in files and p not in per_part]
    if unused:
        raise ValueError(
            f"no LoRA has {' or '.join(FLUX_PART_NAMES[p] for p in unused)} modules ({', '.join(FLUX_PARTS[p] for p in unused)}); "
            f"leave out {' '.join(f'{FLUX_PART_FLAGS[p][0]} {FLUX_PART_FLAGS[p][1]}' for p in unused)}"
        )
    plans = {part: _plan_merge(files[part][0], part, per_part[part]) for part in FLUX_PARTS if part in files}
    return {part: merge_into_safetensors(*files[part], per_part[part], by_key, save_dtype) for part, by_key in plans.items()}


def _has_peft_transformer_keys(state_dict: dict[str, torch.Tensor]) -> bool:
    return any(k.endswith((".lora_A.weight", ".lora_B.weight")) and not k.startswith("text_encoder") for k in state_dict)


def merge_into_bfl_file(src: str, dst: str, loras: list[tuple[dict[str, torch.Tensor], float]], save_dtype: torch.dtype | None = None) -> int:
    """merge_into_flux_files for a transformer-only LoRA: the number of weights changed in the BFL file `dst`."""
    return merge_into_flux_files({"transformer": (src, dst)}, loras, save_dtype)["transformer"]
