"""Convert an OFT file between kohya's layout (sd-scripts' networks.oft / networks.oft_flux: what kiln writes, what
A1111/Forge read) and the layout ComfyUI reads, so that ComfyUI applies exactly the rotation that was trained.

    python tools/convert_network.py my_oft.safetensors my_oft_comfyui.safetensors --to comfyui
    python tools/convert_network.py my_oft_comfyui.safetensors my_oft_kohya.safetensors --to kohya

Why: ComfyUI skips kohya OFT files ("lora key not loaded"): its key map reads `lora_unet_<module>`, not
`oft_unet_<module>`; it reads one 3-D `<module>.oft_blocks` per layer, not FLUX's per-part `oft_blocks.N`; and it
takes `alpha` as the whole limit on the norm of Q = B - B^T, where kohya limits |Q| to alpha x the layer's output width
(x each part's width for FLUX): a merely renamed kohya file would be limited to 1/width of its trained limit (width =
320 to 18432) in ComfyUI.

--to comfyui: each layer's trained clamp (kohya's: |Q| <= alpha x width, per layer, or per part for FLUX) is applied to
its blocks and the clamped blocks are stored (B scaled by the clamp factor, so that B - B^T is the clamped Q), with
alpha 0: ComfyUI clamps only when alpha > 0 (A1111 and LyCORIS read 0 the same way: no limit), so it rotates by exactly
the trained R. Names become `lora_unet_<module>` (SD 1.x/2.x diffusers names, SDXL sgm names, FLUX BFL names, SD3
Stability AI names: all in ComfyUI's key map). The parts of a fused FLUX layer are joined along the block axis into one
(sum of k, b, b) tensor when they have the same block size (double blocks' qkv: q, k, v, each k blocks of hidden/k
rows = 3k blocks over the fused weight's rows, exactly the same rotation). Parts with different block sizes (single
blocks' linear1 trained with enable_all_linear: q, k, v and the 4x wider MLP input) cannot be written in ComfyUI's
one-block-size format (unless the wider blocks are block-diagonal in the narrow size, as a file converted --to kohya
from ComfyUI's layout has them): an error naming each such layer, and nothing is written.

--to kohya: the reverse, for a file in ComfyUI's layout (`lora_unet_<module>.oft_blocks` (k, b, b) and `.alpha`):
ComfyUI's clamp (alpha > 0: |Q| <= alpha over all blocks of the layer) is applied to the blocks, names become
`oft_unet_<module>`, and one alpha for the whole file (sd-scripts reads the first module's alpha for all) is chosen
0.1 % above the largest |Q| / width of any layer (or part), so that kohya's clamp leaves every layer as it is. A FLUX
file (BFL names: double_blocks_*, single_blocks_*) gets sd-scripts' per-part layout: a qkv's blocks are split into q,
k, v (`oft_blocks.0` .. `.2`); a linear1's into q, k, v and the MLP input (`.3`, whose blocks of 4b rows each hold 4 of
the file's blocks on their diagonal: the same rotation); every other layer gets `oft_blocks.0`. SD 1.x/2.x, SDXL and
SD3 layers keep one tensor (SD3's fused qkv is one rotation in both layouts).

Strength: ComfyUI applies its LoRA strength twice to OFT (W + s^2 (R - I)^T W): strength 1 is the trained result;
kiln's --network_multiplier m is ComfyUI's strength sqrt(m).

Only OFT keys are converted: any other key (LoRA, LoHa, LoKr, text-encoder modules, LyCORIS' rescale/dora_scale,
BOFT's 4-D blocks) is an error naming it, and nothing is written. Blocks keep their dtype (a clamped layer of an
fp16/bf16 file is rounded to it again). The source's metadata is kept, with ss_network_module, ss_network_alpha
and ss_network_args set for the new layout (--to comfyui: LyCORIS' diag-oft, whose layout ComfyUI reads) and
`kiln_converted_from` recording the source file and its values. DST is never overwritten: an existing DST is an error
(exit status 2, like every other refusal); one that appears while this writes stays as it is (exit status 1).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from library import quiet  # noqa: E402
from library.saving import SaveError, load_weights_file, save_weights  # noqa: E402
from networks.oft import constraint_factor  # noqa: E402

KOHYA_DEFAULT_ALPHA = 1e-3  # sd-scripts' (and networks.oft's) constraint factor of a module without `.alpha`
ALPHA_MARGIN = 1.001  # --to kohya: alpha this much above the largest |Q| / width, so float rounding never clamps
KOHYA_KEY = re.compile(r"^oft_unet_(?P<module>\w+?)\.(?:oft_blocks(?:\.(?P<part>\d+))?|(?P<alpha>alpha))$")
COMFY_KEY = re.compile(r"^lora_unet_(?P<module>\w+?)\.(?:oft_blocks|(?P<alpha>alpha))$")
FLUX_MODULE = re.compile(r"^(double_blocks|single_blocks)_\d+_")
# FLUX layers that BFL fuses, and their parts' widths in units (hidden): q, k, v (and FLUX.1's 4 x hidden MLP input)
FLUX_FUSED_PARTS = {
    re.compile(r"^double_blocks_\d+_(img|txt)_attn_qkv$"): (1, 1, 1),
    re.compile(r"^single_blocks_\d+_linear1$"): (1, 1, 1, 4),
}
FLUX_ATTENTION = re.compile(r"^double_blocks_\d+_(img|txt)_attn_(qkv|proj)$")
SD_ATTENTION = re.compile(r"_attn[12]_(to_q|to_k|to_v|to_out_0)$|_attn2?_(qkv|proj)$")
SD_CONV = re.compile(
    r"_resnets_\d+_|_(down|up)samplers_\d+_conv$|_(in|out|emb)_layers_\d+$|_skip_connection$|^input_blocks_\d+_0_op$"
    r"|^output_blocks_\d+_\d+_conv$"
)


class ConversionError(ValueError):
    """The file cannot be converted; the message names the key or layer and why."""


def _what_key(key: str, to: str) -> str:
    """Why `key` is not a key of the source layout of a conversion `--to to`."""
    if key.startswith("lora_unet_") and ".oft_blocks" in key and to == "comfyui":
        return "in ComfyUI's layout already (convert it with --to kohya)"
    if key.startswith("oft_unet_") and to == "kohya":
        return "in kohya's layout already (convert it with --to comfyui)"
    if key.startswith(("lora_te", "oft_te", "lora_prior_te")):
        return "a text-encoder module (kohya's OFT adapts only the U-Net / DiT)"
    if re.search(r"\.(lora_(up|down|mid)|lora_[AB])\.weight$", key):
        return "a LoRA weight"
    if re.search(r"\.(hada_|lokr_)", key):
        return "a LoHa/LoKr weight"
    if key.endswith((".rescale", ".dora_scale", ".oft_diag")):
        return "a LyCORIS OFT key that kohya's OFT has no equivalent for"
    return "not an OFT key"


def _expected(to: str) -> str:
    if to == "comfyui":
        return "expected kohya OFT keys: oft_unet_<module>.oft_blocks, .oft_blocks.<N> (FLUX) and .alpha"
    return "expected ComfyUI OFT keys: lora_unet_<module>.oft_blocks (3-D) and .alpha"


def _check_blocks(key: str, value: torch.Tensor, what: str = "OFT blocks") -> None:
    if not value.is_floating_point() or value.dim() != 3 or value.shape[1] != value.shape[2] or 0 in value.shape:
        raise ConversionError(
            f"{key}: {what} must be a floating (k, b, b) tensor, got {tuple(value.shape)} {value.dtype}"
            + (" (4-D blocks are LyCORIS' BOFT, which neither layout of this tool holds)" if value.dim() == 4 else "")
        )
    if not torch.isfinite(value).all():
        raise ConversionError(f"{key}: the blocks are not finite (NaN or inf); the file is broken")


def _alpha_value(key: str, value: torch.Tensor) -> float:
    if value.numel() != 1 or not torch.isfinite(value.float()).all():
        raise ConversionError(f"{key}: alpha must be one finite number, got shape {tuple(value.shape)}")
    return float(value.float().reshape(()))


def _parse(state_dict: dict[str, torch.Tensor], to: str) -> dict[str, dict]:
    """module -> {"parts": {index: blocks}, "whole": bool, "alpha": float | None} of the source layout (kohya for
    --to comfyui, ComfyUI for --to kohya); any other key is an error naming it."""
    pattern = KOHYA_KEY if to == "comfyui" else COMFY_KEY
    modules: dict[str, dict] = {}
    for key in sorted(state_dict):
        m = pattern.match(key)
        if m is None:
            raise ConversionError(f"key {key!r} is {_what_key(key, to)}; {_expected(to)}. Only OFT files are converted")
        info = modules.setdefault(m["module"], {"parts": {}, "whole": False, "alpha": None})
        value = state_dict[key]
        if m["alpha"]:
            info["alpha"] = _alpha_value(key, value)
            continue
        _check_blocks(key, value)
        part = m.groupdict().get("part")
        if part is None:
            info["whole"] = True
            info["parts"][0] = value
        else:
            info["parts"][int(part)] = value
    for name, info in modules.items():
        prefix = "oft_unet_" if to == "comfyui" else "lora_unet_"
        parts = info["parts"]
        if not parts:
            raise ConversionError(f"{prefix}{name}.alpha has no {prefix}{name}.oft_blocks")
        if info["whole"] and (len(parts) > 1 or f"{prefix}{name}.oft_blocks.0" in state_dict):
            raise ConversionError(f"{prefix}{name} has both .oft_blocks and .oft_blocks.<N>; a layer has one of the two")
        if sorted(parts) != list(range(len(parts))):
            raise ConversionError(f"{prefix}{name}: the parts are .oft_blocks.{sorted(parts)}, not numbered 0..{len(parts) - 1}")
    if not modules:
        raise ConversionError("the file holds no tensors")
    return modules


# ---------------------------------------------------------------------------------------------------------------------
# The two clamps (each written as its reader computes it, in float32)


def kohya_clamped(blocks: torch.Tensor, alpha: float) -> torch.Tensor:
    """`blocks` scaled so that B - B^T is kohya's clamped Q: |Q| limited to alpha x width (= k x b rows), Q <- Q (min(|Q|,
    c) + 1e-8) / (|Q| + 1e-8). Returned as given when the clamp does not act (bit for bit)."""
    b = blocks.float()
    norm = (b - b.transpose(1, 2)).norm()
    limit = alpha * blocks.shape[0] * blocks.shape[1]
    factor = constraint_factor(norm, limit)
    return blocks if factor == 1 else (b * factor).to(blocks.dtype)


def comfyui_clamped(blocks: torch.Tensor, alpha: float) -> torch.Tensor:
    """`blocks` scaled so that B - B^T is ComfyUI's clamped Q: with alpha > 0, |Q| + 1e-8 > alpha gives
    Q <- Q alpha / (|Q| + 1e-8); alpha <= 0 (or none) is no limit."""
    if alpha <= 0:
        return blocks
    b = blocks.float()
    norm = (b - b.transpose(1, 2)).norm() + 1e-8
    return (b * (alpha / norm)).to(blocks.dtype) if norm > alpha else blocks


def _q_norm(blocks: torch.Tensor) -> float:
    b = blocks.float()
    return float((b - b.transpose(1, 2)).norm())


def _diagonal_blocks(blocks: torch.Tensor, size: int) -> torch.Tensor | None:
    """The (k x n, size, size) diagonal sub-blocks of (k, n x size, n x size) blocks whose Q is block-diagonal in
    `size` (then the rotation is the same), else None."""
    k, b, _ = blocks.shape
    n = b // size
    if n * size != b:
        return None
    q = (blocks - blocks.transpose(1, 2)).reshape(k, n, size, n, size)
    off_diagonal = ~torch.eye(n, dtype=torch.bool)[None, :, None, :, None].expand_as(q)
    if q[off_diagonal].any():
        return None
    return torch.stack([blocks[:, i * size : (i + 1) * size, i * size : (i + 1) * size] for i in range(n)], 1).reshape(
        k * n, size, size
    )


# ---------------------------------------------------------------------------------------------------------------------
# Conversions


def to_comfyui(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict]:
    """A kohya OFT state dict in ComfyUI's layout: (tensors, {"modules", "clamped", "dim"})."""
    modules = _parse(state_dict, "comfyui")
    out: dict[str, torch.Tensor] = {}
    clamped, refused = 0, []
    for name, info in modules.items():
        alpha = KOHYA_DEFAULT_ALPHA if info["alpha"] is None else info["alpha"]
        parts = [info["parts"][i] for i in range(len(info["parts"]))]
        done = [kohya_clamped(p, alpha) for p in parts]
        clamped += any(d is not p for d, p in zip(done, parts))
        sizes = [p.shape[1] for p in done]
        if len(set(sizes)) > 1:
            narrow = min(sizes)
            split = [p if p.shape[1] == narrow else _diagonal_blocks(p, narrow) for p in done]
            if any(s is None for s in split):
                refused.append(f"oft_unet_{name} (parts of block sizes {', '.join(map(str, sizes))})")
                continue
            done = split
        dtype = done[0].dtype
        out[f"lora_unet_{name}.oft_blocks"] = torch.cat([d.to(dtype) for d in done]) if len(done) > 1 else done[0]
        out[f"lora_unet_{name}.alpha"] = torch.tensor(0.0)
    if refused:
        raise ConversionError(
            f"{len(refused)} layer(s) cannot be written in ComfyUI's OFT format: {'; '.join(refused[:6])}"
            + (f"; and {len(refused) - 6} more" if len(refused) > 6 else "")
            + ". Their parts are rotated in blocks of different sizes (FLUX single blocks' linear1 trained with "
            "enable_all_linear: q, k, v and the 4x wider MLP input), and ComfyUI's OFT has one block size per layer, "
            "so no ComfyUI file applies the trained rotation (train FLUX OFT for ComfyUI without enable_all_linear)"
        )
    dims = {info["parts"][0].shape[0] for info in modules.values()}
    return out, {"modules": len(modules), "clamped": clamped, "dim": dims.pop() if len(dims) == 1 else None}


def _flux_ratios(name: str) -> tuple[int, ...]:
    for pattern, ratios in FLUX_FUSED_PARTS.items():
        if pattern.match(name):
            return ratios
    return (1,)


def _flux_parts(name: str, blocks: torch.Tensor) -> list[torch.Tensor]:
    """sd-scripts' per-part blocks of a FLUX layer from its one (n, b, b) tensor: the parts of a fused layer get
    n / (sum of widths) blocks each; a part r times wider gets blocks of r x b rows holding r of the file's blocks on
    their diagonal (the same rotation)."""
    ratios = _flux_ratios(name)
    n, b, _ = blocks.shape
    units = sum(ratios)
    if n % units:
        what = "q, k, v" if len(ratios) == 3 else "q, k, v and the MLP input"
        raise ConversionError(
            f"lora_unet_{name}: its {n} blocks of {b} rows cannot be split into the parts of the fused layer ({what}, "
            f"widths {':'.join(map(str, ratios))}): a block would straddle two parts, which sd-scripts' per-part layout cannot hold"
        )
    k = n // units
    parts, start = [], 0
    for r in ratios:
        chunk = blocks[start : start + k * r]
        start += k * r
        if r == 1:
            parts.append(chunk)
        else:
            parts.append(torch.stack([torch.block_diag(*chunk[i * r : (i + 1) * r]) for i in range(k)]))
    return parts


def kohya_network_args(names: list[str], flux: bool) -> dict[str, str]:
    """networks.oft / oft_flux network_args that target the layers `names` (module names without the prefix)."""
    if flux:
        return {"enable_all_linear": "True"} if any(not FLUX_ATTENTION.match(n) for n in names) else {}
    conv = any(SD_CONV.search(n) for n in names)
    linear = any(not SD_ATTENTION.search(n) and not SD_CONV.search(n) for n in names)
    return {**({"enable_all_linear": "True"} if linear else {}), **({"enable_conv": "True"} if conv else {})}


def to_kohya(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict]:
    """A ComfyUI-layout OFT state dict in kohya's layout (FLUX: sd-scripts' per-part layout): (tensors, {"modules",
    "clamped", "alpha", "dim", "flux", "network_args"})."""
    modules = _parse(state_dict, "kohya")
    flux = any(FLUX_MODULE.match(name) for name in modules)
    layers: dict[str, list[torch.Tensor]] = {}
    clamped, need = 0, 0.0
    for name, info in modules.items():
        blocks = info["parts"][0]
        done = comfyui_clamped(blocks, info["alpha"] or 0.0)
        clamped += done is not blocks
        parts = _flux_parts(name, done) if flux else [done]
        for p in parts:
            need = max(need, _q_norm(p) / (p.shape[0] * p.shape[1]))
        layers[name] = parts
    alpha = need * ALPHA_MARGIN if need > 0 else KOHYA_DEFAULT_ALPHA
    out: dict[str, torch.Tensor] = {}
    for name, parts in layers.items():
        if flux:
            out.update({f"oft_unet_{name}.oft_blocks.{i}": p.contiguous() for i, p in enumerate(parts)})
        else:
            out[f"oft_unet_{name}.oft_blocks"] = parts[0]
        out[f"oft_unet_{name}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    dims = {parts[0].shape[0] for parts in layers.values()}
    info = {
        "modules": len(modules),
        "clamped": clamped,
        "alpha": alpha,
        "dim": dims.pop() if len(dims) == 1 else None,
        "flux": flux,
        "network_args": kohya_network_args(list(modules), flux),
    }
    return out, info


def converted_metadata(metadata: dict[str, str], to: str, source: str, info: dict) -> dict[str, str]:
    """The source's metadata for the converted file: the sshs_* hashes dropped (save_weights writes new ones), the
    network keys set for the new layout, the source's values kept in `kiln_converted_from`."""
    out = {k: v for k, v in metadata.items() if not k.startswith("sshs_") and k != "modelspec.hash_sha256"}
    note = {"file": os.path.basename(source), "to": to, "tool": "kiln tools/convert_network.py"}
    note.update({k: metadata[k] for k in ("ss_network_module", "ss_network_alpha", "ss_network_args") if k in metadata})
    out["kiln_converted_from"] = json.dumps(note)
    if to == "comfyui":
        out["ss_network_module"] = "lycoris.kohya"
        out["ss_network_args"] = json.dumps({"algo": "diag-oft"})
        out["ss_network_alpha"] = "0"
    else:
        out["ss_network_module"] = "networks.oft_flux" if info["flux"] else "networks.oft"
        out["ss_network_alpha"] = repr(info["alpha"])
        out["ss_network_args"] = json.dumps(info["network_args"])
        if info["dim"] is not None:
            out["ss_network_dim"] = str(info["dim"])
    return out


def convert(state_dict: dict[str, torch.Tensor], metadata: dict[str, str], to: str, source: str = "") -> tuple:
    """(tensors, metadata, info) of `state_dict` converted `to` "comfyui" or "kohya"; ConversionError names what
    cannot be converted."""
    tensors, info = to_comfyui(state_dict) if to == "comfyui" else to_kohya(state_dict)
    return tensors, converted_metadata(metadata, to, source, info), info


def main(argv: list[str] | None = None) -> int:
    quiet.install()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", metavar="SRC", help="the OFT file to convert (.safetensors, or a .ckpt/.pt state dict)")
    parser.add_argument("dst", metavar="DST", help="the new file (.safetensors, .ckpt or .pt); must not exist")
    parser.add_argument(
        "--to",
        required=True,
        choices=["comfyui", "kohya"],
        help="comfyui: from kohya's layout (networks.oft / networks.oft_flux files) to ComfyUI's; "
        "kohya: from ComfyUI's layout back to kohya's (sd-scripts, A1111/Forge, kiln --network_weights)",
    )
    args = parser.parse_args(argv)
    if not args.dst.lower().endswith((".safetensors", ".ckpt", ".pt")):
        parser.error(f"DST {args.dst} must be a .safetensors, .ckpt or .pt file")
    if os.path.lexists(args.dst):
        parser.error(f"{args.dst} already exists; kiln does not overwrite files, choose another name")
    try:
        state_dict, metadata = load_weights_file(args.src)
    except (FileNotFoundError, ValueError) as e:
        parser.error(str(e))
    try:
        tensors, new_metadata, info = convert(state_dict, metadata, args.to, args.src)
    except ConversionError as e:
        parser.error(f"{args.src}: {e}; nothing was written")
    try:
        save_weights(args.dst, tensors, new_metadata, None, overwrite=False)
    except SaveError as e:
        parser.exit(1, f"error: {e}\n")
    what = f"{info['modules']} OFT layers"
    if args.to == "comfyui":
        print(f"{what}, {info['clamped']} of them clamped by kohya's constraint; alpha 0 (ComfyUI: no further clamp)")
    else:
        print(
            f"{what}, {info['clamped']} of them clamped by ComfyUI's alpha; alpha {info['alpha']:.6g} (kohya: no further clamp)"
        )
    print(f"wrote {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
