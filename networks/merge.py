"""Merging kohya-format LoRA files: into one LoRA (exact concatenation or SVD), or into a model's weights."""

from __future__ import annotations

import logging

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


def merge_into_bfl_file(src: str, dst: str, loras: list[tuple[dict[str, torch.Tensor], float]], save_dtype: torch.dtype | None = None) -> int:
    """Merge FLUX LoRAs (kohya BFL names) into a BFL single-file transformer, streaming: one tensor in memory at a time,
    so merging into the 12B model needs a few GB of RAM, not the model's size. Returns the number of weights changed.

    Only `lora_unet_*` modules are merged (a text-encoder LoRA is an error: merge it into clip_l/t5xxl separately)."""
    from safetensors import safe_open

    from library.saving import ST_DTYPES, stream_safetensors

    parsed = [(_modules(sd), ratio) for sd, ratio in loras]
    te = sorted(n for p, _ in parsed for n in p if not n.startswith("lora_unet_"))
    if te:
        raise ValueError(f"{te[0]} is a text-encoder LoRA module; this merge writes the transformer only (use a U-Net-only LoRA)")
    with safe_open(src, framework="pt") as f:
        keys = list(f.keys())
        prefix = "model.diffusion_model." if any(k.startswith("model.diffusion_model.") for k in keys) else ""
        targets = {f"lora_unet_{k[len(prefix):-len('.weight')].replace('.', '_')}": k for k in keys if k.endswith(".weight")}
        missing = sorted({n for p, _ in parsed for n in p} - set(targets))
        if missing:
            raise ValueError(f"{len(missing)} LoRA modules match nothing in {src}, e.g. {missing[0]}; is it a FLUX.1 LoRA?")
        by_key = {targets[n]: n for p, _ in parsed for n in p}
        codes = {code: dtype for dtype, code in ST_DTYPES.items()}
        layout = []
        for k in keys:
            sl = f.get_slice(k)
            dtype = codes[sl.get_dtype()]
            layout.append((k, tuple(sl.get_shape()), save_dtype if save_dtype is not None and dtype.is_floating_point else dtype))

        def produce(key: str) -> torch.Tensor:
            tensor = f.get_tensor(key)
            out_dtype = save_dtype if save_dtype is not None and tensor.is_floating_point() else tensor.dtype
            if key in by_key:
                name = by_key[key]
                weight = tensor.float()
                for p, ratio in parsed:
                    if name in p:
                        weight += lora_delta(*p[name]).reshape(weight.shape) * ratio
                tensor = weight
            return tensor.to(out_dtype)

        stream_safetensors(dst, layout, produce, f.metadata())
    return len(by_key)
