"""LoRA / LoCon for SD 1.x/2.x (and SDXL) U-Nets and CLIP text encoders, in kohya's file format.

Each adapted `Linear` or `Conv2d` computes `org(x) + up(down(x)) * multiplier * alpha / rank`; `up` starts at zero.
Files hold `<name>.lora_down.weight`, `<name>.lora_up.weight` and `<name>.alpha` with names
`lora_unet_<module path with . -> _>` and `lora_te_text_model_<...>` (SD1/2; SDXL: `lora_te1_`/`lora_te2_` and sgm
U-Net names, given by the caller as a `unet_name_map`).

network_args (`--network_args k=v`): conv_dim, conv_alpha, dropout, rank_dropout, module_dropout, block_dims,
block_alphas, conv_block_dims, conv_block_alphas, loraplus_lr_ratio, loraplus_unet_lr_ratio,
loraplus_text_encoder_lr_ratio. Anything else is an error.
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn

from networks.adapter import AdapterModule, AdapterType, add_scaled

KILN_NETWORK = True  # kiln's network-module interface (not sd-scripts'): see library/method_adapter.py

UNET_TARGETS = ("Transformer2DModel",)
UNET_CONV_TARGETS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
TEXT_ENCODER_TARGETS = ("CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2", "CLIPMLP")
NUM_SD_BLOCKS = 25  # IN0..IN11, MID, OUT0..OUT11
NUM_SDXL_BLOCKS = 23  # base, IN1..IN9, MID0..MID2, OUT1..OUT9, out

KNOWN_ARGS = {
    "conv_dim",
    "conv_alpha",
    "dropout",
    "rank_dropout",
    "module_dropout",
    "block_dims",
    "block_alphas",
    "conv_block_dims",
    "conv_block_alphas",
    "loraplus_lr_ratio",
    "loraplus_unet_lr_ratio",
    "loraplus_text_encoder_lr_ratio",
}


class LoRAModule(AdapterModule):
    """The LoRA of one Linear/Conv2d (or, given a list, of Linears a file fuses: `lora_up` has their rows in turn).
    `apply()` routes the wrapped module's forward through it."""

    def __init__(
        self,
        name: str,
        org_module: nn.Module | list[nn.Module],
        rank: int,
        alpha: float | None,
        multiplier: float = 1.0,
        dropout: float | None = None,
        rank_dropout: float | None = None,
        module_dropout: float | None = None,
    ) -> None:
        org_modules = list(org_module) if isinstance(org_module, (list, tuple)) else [org_module]
        super().__init__(name, org_modules, multiplier, dropout, rank_dropout, module_dropout)
        self.rank = rank
        first = org_modules[0]
        if isinstance(first, nn.Conv2d):
            self.lora_down = nn.Conv2d(first.in_channels, rank, first.kernel_size, first.stride, first.padding, bias=False)
            self.lora_up = nn.Conv2d(rank, first.out_channels, 1, 1, bias=False)
        else:
            self.lora_down = nn.Linear(first.in_features, rank, bias=False)
            self.lora_up = nn.Linear(rank, sum(self.splits), bias=False)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)
        alpha = rank if alpha is None or alpha == 0 else float(alpha)
        self.register_buffer("alpha", torch.tensor(alpha))
        self.scale = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._org_forward(x)
        if self.multiplier == 0:
            return out
        if not self.training or not (self.dropout or self.rank_dropout or self.module_dropout):
            return add_scaled(out, self._plain_up_down(x), self.multiplier * self.scale)
        if self.module_dropout and torch.rand(()) < self.module_dropout:
            return out
        h = self.lora_down(x.to(self.lora_down.weight.dtype))
        if self.training and self.dropout:
            h = nn.functional.dropout(h, p=self.dropout)
        scale = self.scale
        if self.training and self.rank_dropout:
            h, factor = drop_ranks(h, self.rank, self.rank_dropout)
            scale = scale * factor
        return add_scaled(out, self.lora_up(h), self.multiplier * scale)

    def _plain_up_down(self, x: torch.Tensor) -> torch.Tensor:
        """up(down(x)) without dropouts: functional calls, no submodule dispatch (hot path)."""
        down, up = self.lora_down.weight, self.lora_up.weight
        if x.dtype != down.dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(down.dtype)
        if down.dim() == 2:
            y = nn.functional.linear(nn.functional.linear(x, down), up)
        else:
            conv = self.lora_down
            y = nn.functional.conv2d(nn.functional.conv2d(x, down, None, conv.stride, conv.padding), up)
        return y

    def delta_weight(self) -> torch.Tensor:
        """up @ down * alpha / rank, shaped like the wrapped weight."""
        return lora_delta(self.lora_down.weight.float(), self.lora_up.weight.float(), self.scale)

    def delta_norm_sq(self) -> torch.Tensor:
        """The squared Frobenius norm of `delta_weight()`, a 0-dim tensor on the adapter's device (not read)."""
        return lora_delta_norm_sq(self.lora_down.weight, self.lora_up.weight, self.scale)

    def norm_factors(self) -> tuple[list[torch.Tensor], float]:
        return list(self.parameters()), 0.5  # down and up (every part of a split adapter) by sqrt(s) each

    def boosted(self, parameter_name: str) -> bool:
        return "lora_up" in parameter_name

    def alpha_loaded(self) -> None:
        self.scale = self.alpha.item() / self.rank


LORA = AdapterType(
    "LoRA", "networks.lora", lambda name, orgs, dim, alpha, common, options: LoRAModule(name, orgs, dim, alpha, **common),
    keys=("lora_down.weight", "lora_up.weight"),
)  # fmt: skip


def drop_ranks(h: torch.Tensor, rank: int, p: float) -> tuple[torch.Tensor, float]:
    """Rank dropout: zero each of the `rank` channels of down(x) with probability p, per sample (h is (B, rank),
    (B, L, rank) or a conv's (B, rank, H, W)); returns (h, 1 / (1 - p), the factor that keeps the expected output)."""
    mask = (torch.rand(h.shape[0], rank, device=h.device) > p).to(h.dtype)
    if h.dim() == 4:
        mask = mask[:, :, None, None]
    elif h.dim() == 3:
        mask = mask[:, None, :]
    return h * mask, 1.0 / (1.0 - p)


def lora_delta(down: torch.Tensor, up: torch.Tensor, scale: float) -> torch.Tensor:
    """The weight change up @ down * scale, shaped like the adapted weight (conv: down k x k, up 1 x 1)."""
    if down.dim() == 2:
        return up @ down * scale
    return torch.einsum("or,rihw->oihw", up.flatten(1), down) * scale


def lora_delta_norm_sq(down: torch.Tensor, up: torch.Tensor, scale: float) -> torch.Tensor:
    """||lora_delta(down, up, scale)||_F^2 without forming the delta: with U = up (out x r) and D = down (r x in*k*k),
    ||U D||^2 = sum((U^T U) * (D D^T)), two r x r Gram matrices, O((out + in) r^2) instead of an out x in matrix. In
    float64 (float32 on devices without it), so that cancellation in the sum costs no accuracy that matters."""
    dtype = torch.float32 if down.device.type == "mps" else torch.float64
    u, d = up.flatten(1).to(dtype), down.flatten(1).to(dtype)
    return ((u.T @ u) * (d @ d.T)).sum().clamp_min(0) * (scale * scale)


def sd_block_index(lora_name: str) -> int:
    """sd-scripts' 25-block index of a U-Net LoRA name (diffusers-style SD1/2 names); -1 when none applies."""
    m = re.search(r"(up|down)_blocks_(\d+)_(resnets|upsamplers|downsamplers|attentions)_(\d+)_", lora_name)
    if m:
        level, kind, j = int(m.group(2)), m.group(3), int(m.group(4))
        idx = 3 * level + (2 if kind in ("upsamplers", "downsamplers") else j)
        return 1 + idx if m.group(1) == "down" else 13 + idx
    if "mid_block_" in lora_name:
        return 12
    return -1


def sdxl_block_index(lora_name: str) -> int:
    """sd-scripts' 23-block index of an SDXL U-Net LoRA name (sgm names): input_blocks 1-9, middle 10-12, output 13-21."""
    m = re.match(r"lora_unet_(input_blocks|middle_block|output_blocks)_(\d+)_", lora_name)
    if not m:
        return -1
    return {"input_blocks": 1, "middle_block": 10, "output_blocks": 13}[m.group(1)] + int(m.group(2))


def _parse_list(value, name: str, count: int, cast=float) -> list:
    if isinstance(value, str):
        value = [v for v in value.replace("[", "").replace("]", "").split(",") if v.strip()]
    values = [cast(v) for v in value]
    if len(values) != count:
        layout = "IN0-11, MID, OUT0-11" if count == NUM_SD_BLOCKS else "base, IN1-9, MID0-2, OUT1-9, out"
        raise ValueError(f"network_args {name} needs {count} values ({layout}), got {len(values)}")
    return values


def _float_arg(args: dict, key: str) -> float | None:
    return None if args.get(key) in (None, "None") else float(args[key])


class LoRANetwork(nn.Module):
    """All LoRA modules of a model; its state dict is the kohya file layout."""

    def __init__(
        self,
        text_encoders: list[nn.Module],
        unet: nn.Module | None,
        rank: int = 4,
        alpha: float | None = 1.0,
        multiplier: float = 1.0,
        dropout: float | None = None,
        rank_dropout: float | None = None,
        module_dropout: float | None = None,
        conv_dim: int | None = None,
        conv_alpha: float | None = None,
        block_dims: list[int] | None = None,
        block_alphas: list[float] | None = None,
        conv_block_dims: list[int] | None = None,
        conv_block_alphas: list[float] | None = None,
        module_dims: dict[str, int] | None = None,
        module_alphas: dict[str, float] | None = None,
        te_prefixes: list[str] | None = None,
        unet_name_map: dict[str, str] | None = None,
        loraplus_lr_ratio: float | None = None,
        loraplus_unet_lr_ratio: float | None = None,
        loraplus_text_encoder_lr_ratio: float | None = None,
        adapter: AdapterType | None = None,
    ) -> None:
        super().__init__()
        self.adapter = adapter = adapter or LORA
        self.multiplier = multiplier
        self.loraplus_unet = loraplus_unet_lr_ratio or loraplus_lr_ratio
        self.loraplus_te = loraplus_text_encoder_lr_ratio or loraplus_lr_ratio
        common = {"multiplier": multiplier, "dropout": dropout, "rank_dropout": rank_dropout, "module_dropout": module_dropout}
        block_index = sdxl_block_index if uses_sgm_names(unet_name_map) else sd_block_index

        def dims_for(name: str, is_unet: bool, small_kernel: bool, alias: str | None = None) -> tuple[int | None, float | None]:
            if module_dims is not None:
                key = alias if alias in module_dims and name not in module_dims else name
                return module_dims.get(key), (module_alphas or {}).get(key)
            if is_unet and block_dims is not None:
                idx = block_index(name)
                if small_kernel:
                    return block_dims[idx], block_alphas[idx] if block_alphas else alpha
                if conv_block_dims is not None:
                    return conv_block_dims[idx], conv_block_alphas[idx] if conv_block_alphas else conv_alpha
                return None, None
            if small_kernel:
                return rank, alpha
            return (conv_dim, conv_alpha) if conv_dim else (None, None)

        self.text_encoder_loras: list[LoRAModule] = []
        self.unet_loras: list[LoRAModule] = []
        te_prefixes = te_prefixes or (
            ["lora_te"] if len(text_encoders) == 1 else [f"lora_te{i + 1}" for i in range(len(text_encoders))]
        )
        for prefix, te in zip(te_prefixes, text_encoders if adapter.text_encoders else []):
            for path, module in _target_modules(te, TEXT_ENCODER_TARGETS):
                if not path.startswith("text_model."):
                    path = "text_model." + path  # transformers 5 flattens CLIPTextModel; kohya names keep text_model
                name = f"{prefix}_{path}".replace(".", "_")
                dim, a = dims_for(name, False, True)
                if dim:
                    self.text_encoder_loras.append(adapter.build(name, [module], dim, a, common))
        if unet is not None:
            targets = UNET_TARGETS + (UNET_CONV_TARGETS if conv_dim or conv_block_dims or module_dims else ())
            self.aliases: dict[str, str] = {}  # LoRA names in diffusers module names -> the names used here
            for name, alias, module in unet_adapter_names(unet, targets, unet_name_map, adapter):
                if alias != name:
                    self.aliases[alias] = name
                small = isinstance(module, nn.Linear) or module.kernel_size == (1, 1)
                dim, a = dims_for(name, True, small, alias)
                if dim:
                    self.unet_loras.append(adapter.build(name, [module], dim, a, common))
        names = [m.lora_name for m in self.text_encoder_loras + self.unet_loras]
        if len(set(names)) != len(names):
            raise RuntimeError("two adapted modules map to the same LoRA name")
        for m in self.text_encoder_loras + self.unet_loras:
            self.add_module(m.lora_name, m)

    @property
    def loras(self) -> list[LoRAModule]:
        return self.text_encoder_loras + self.unet_loras

    def apply_to(self, train_text_encoder: bool = True, train_unet: bool = True) -> None:
        """Route the wrapped modules through their adapters; adapters of a part that is not trained are dropped."""
        if not train_text_encoder:
            for m in self.text_encoder_loras:
                delattr(self, m.lora_name)
            self.text_encoder_loras = []
        if not train_unet:
            for m in self.unet_loras:
                delattr(self, m.lora_name)
            self.unet_loras = []
        for m in self.loras:
            m.apply_to()

    def restore(self) -> None:
        for m in self.loras:
            m.restore()

    def set_multiplier(self, multiplier: float) -> None:
        self.multiplier = multiplier
        for m in self.loras:
            m.multiplier = multiplier

    def param_groups(
        self, text_encoder_lr: float | list[float] | None, unet_lr: float | None, default_lr: float
    ) -> tuple[list[dict], list[str]]:
        """Optimizer groups (text encoder(s), U-Net; LoRA+ groups of the output-side weights (`lora_up`) with lr x ratio)
        and their log names.

        A group whose learning rate is 0 is left out (those weights stay as they are)."""
        groups, names = [], []

        def add(modules: list[LoRAModule], lr: float, ratio: float | None, label: str) -> None:
            if not modules or lr == 0:
                return
            if ratio:
                groups.append({"params": [p for m in modules for n, p in m.named_parameters() if not m.boosted(n)], "lr": lr})
                names.append(label)
                groups.append({"params": [p for m in modules for n, p in m.named_parameters() if m.boosted(n)], "lr": lr * ratio})
                names.append(label + "_plus")
            else:
                groups.append({"params": [p for m in modules for p in m.parameters()], "lr": lr})
                names.append(label)

        te_lrs = (text_encoder_lr or [None]) if isinstance(text_encoder_lr, list) else [text_encoder_lr]
        prefixes = sorted({self.te_group_prefix(m.lora_name) for m in self.text_encoder_loras})
        for i, prefix in enumerate(prefixes):
            lr = te_lrs[min(i, len(te_lrs) - 1)]
            lr = default_lr if lr is None else lr
            label = "textencoder" if len(prefixes) == 1 else f"textencoder{i + 1}"
            add([m for m in self.text_encoder_loras if m.lora_name.startswith(prefix + "_")], lr, self.loraplus_te, label)
        add(self.unet_loras, default_lr if unet_lr is None else unet_lr, self.loraplus_unet, "unet")
        return groups, names

    def te_group_prefix(self, lora_name: str) -> str:
        """The text-encoder prefix of an adapter name (`lora_te1` of `lora_te1_text_model_...`): one optimizer group each."""
        return lora_name.split("_text_model")[0]

    def apply_max_norm(self, max_norm: float) -> tuple[int, float, float]:
        """Scale down adapters whose delta-weight norm exceeds max_norm (LoRA: down and up each by sqrt(max_norm / norm);
        each type's `norm_factors`);
        returns (count scaled, mean norm, max norm) as Python numbers, counting a scaled adapter's norm as max_norm.

        Called every step with --scale_weight_norms, so it reads the device once: the norms come from small Gram
        matrices (`lora_delta_norm_sq`), stay on the device, every parameter is scaled by one batched multiply (by 1
        where nothing is scaled), and the three statistics are read with a single `.tolist()`."""
        loras = self.loras
        if not loras:
            return 0, 0.0, 0.0
        with torch.no_grad():
            sq = [m.delta_norm_sq() for m in loras]
            device = sq[0].device
            norms = torch.stack([n.to(device, torch.float64) for n in sq]).sqrt()
            over = norms > max_norm
            ratios = torch.where(over, max_norm / norms.clamp_min(1e-30), torch.ones_like(norms))
            factor_sets = [m.norm_factors() for m in loras]
            exponents = [e for _, e in factor_sets]
            if all(e == 0.5 for e in exponents):
                ratios = ratios.sqrt().float()
            else:
                ratios = ratios.pow(torch.tensor(exponents, dtype=ratios.dtype, device=device)).float()
            params, factors = [], []
            for i, (factor_params, _) in enumerate(factor_sets):
                ratio = ratios[i]
                for p in factor_params:
                    params.append(p)
                    factors.append(ratio if p.device == device else ratio.to(p.device))
            torch._foreach_mul_(params, factors)
            clipped = norms.clamp(max=max_norm)
            scaled, mean_norm, top = torch.stack([over.sum().to(torch.float64), clipped.mean(), clipped.max()]).tolist()
        return int(scaled), mean_norm, top

    def load_weights(self, state_dict: dict[str, torch.Tensor], source: str = "weights") -> list[str]:
        """Load a kohya-format state dict; shape mismatches are errors, keys without a module are returned.

        SDXL U-Net keys written with diffusers module names are read as the sgm names this network uses."""
        state_dict = rename_aliases(state_dict, getattr(self, "aliases", {}))
        own = self.state_dict()
        unexpected = [k for k in state_dict if k not in own]
        for key, value in state_dict.items():
            if key in own and own[key].shape != value.shape:
                raise ValueError(
                    f"{source}: {key} has shape {tuple(value.shape)}, this network needs {tuple(own[key].shape)} "
                    "(use --dim_from_weights to take the ranks from the file)"
                )
        missing = [k for k in own if k not in state_dict and not k.endswith(".alpha")]
        self.load_state_dict({k: v for k, v in state_dict.items() if k in own}, strict=False)
        for m in self.loras:  # alpha from the file changes the scale
            m.alpha_loaded()
        if missing:
            raise ValueError(f"{source}: no weights for {len(missing)} adapters, e.g. {missing[0]}")
        return unexpected


def unet_adapter_names(unet: nn.Module, targets: tuple[str, ...], unet_name_map: dict[str, str] | None, adapter: AdapterType):
    """(adapter name, the name in diffusers module names, module) of every Linear/Conv2d inside a U-Net module whose
    class is in `targets`: `<prefix>_unet_<path with . -> _>`, the path mapped by `unet_name_map` (SDXL: sgm names)."""
    for path, module in _target_modules(unet, targets):
        mapped = unet_name_map.get(path, path) if unet_name_map else path
        yield (
            adapter.unet_name(f"lora_unet_{mapped}".replace(".", "_")),
            adapter.unet_name(f"lora_unet_{path}".replace(".", "_")),
            module,
        )


def uses_sgm_names(unet_name_map: dict[str, str] | None) -> bool:
    """True for SDXL-style maps to sgm names (input_blocks / middle_block / output_blocks)."""
    return bool(unet_name_map) and any(
        v.startswith(("input_blocks", "middle_block", "output_blocks")) for v in unet_name_map.values()
    )


def rename_aliases(state_dict: dict[str, torch.Tensor], aliases: dict[str, str]) -> dict[str, torch.Tensor]:
    """Rename keys whose module name is an alias (e.g. a diffusers-named SDXL LoRA) to the network's own names."""
    if not aliases:
        return state_dict
    out = {}
    for key, value in state_dict.items():
        module, _, suffix = key.partition(".")
        out[f"{aliases.get(module, module)}.{suffix}"] = value
    return out


def _target_modules(root: nn.Module, target_classes: tuple[str, ...]):
    """(path, module) of every Linear/Conv2d inside a module whose class is one of target_classes."""
    seen = set()
    for name, module in root.named_modules():
        if module.__class__.__name__ not in target_classes:
            continue
        for child_name, child in module.named_modules():
            if isinstance(child, (nn.Linear, nn.Conv2d)) and id(child) not in seen:
                seen.add(id(child))
                yield f"{name}.{child_name}" if name else child_name, child


def parse_network_args(pairs: list[str] | None, module: str = "networks.lora") -> dict[str, str]:
    """`--network_args k=v ...` -> dict; unknown keys are an error naming the valid ones."""
    args = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ValueError(f"--network_args entries look like key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        args[key.strip()] = value.strip()
    unknown = sorted(set(args) - KNOWN_ARGS)
    if unknown:
        raise ValueError(f"unknown --network_args for {module}: {', '.join(unknown)}; valid: {', '.join(sorted(KNOWN_ARGS))}")
    return args


def create_network(
    multiplier: float,
    network_dim: int | None,
    network_alpha: float | None,
    text_encoders: list[nn.Module],
    unet: nn.Module,
    neuron_dropout: float | None = None,
    unet_name_map: dict[str, str] | None = None,
    te_prefixes: list[str] | None = None,
    adapter: AdapterType | None = None,
    **kwargs: str,
) -> LoRANetwork:
    """sd-scripts' entry point: build a network from --network_dim/--network_alpha and --network_args (of `adapter`'s
    type, LoRA by default)."""
    adapter, kwargs = (adapter or LORA).with_options(kwargs)
    args = parse_network_args([f"{k}={v}" for k, v in kwargs.items()], adapter.module)
    count = NUM_SDXL_BLOCKS if uses_sgm_names(unet_name_map) else NUM_SD_BLOCKS

    def blocks(key: str, cast=float) -> list | None:
        return _parse_list(args[key], key, count, cast) if key in args else None

    block_dims, conv_block_dims, conv_block_alphas = (
        blocks("block_dims", int),
        blocks("conv_block_dims", int),
        blocks("conv_block_alphas"),
    )
    conv_alpha = float(args["conv_alpha"]) if "conv_alpha" in args else 1.0  # sd-scripts' default conv alpha
    if block_dims is not None and conv_block_dims is None and "conv_dim" in args:
        conv_block_dims = [int(args["conv_dim"])] * count  # block dims with conv_dim: the same conv rank in every block
    if conv_block_dims is not None and conv_block_alphas is None:
        conv_block_alphas = [conv_alpha] * count
    return LoRANetwork(
        text_encoders,
        unet,
        rank=network_dim or 4,
        alpha=network_alpha,
        multiplier=multiplier,
        dropout=_float_arg(args, "dropout") if "dropout" in args else neuron_dropout,
        rank_dropout=_float_arg(args, "rank_dropout"),
        module_dropout=_float_arg(args, "module_dropout"),
        conv_dim=int(args["conv_dim"]) if "conv_dim" in args else None,
        conv_alpha=float(args.get("conv_alpha", 1.0)) if "conv_dim" in args else None,
        block_dims=block_dims,
        block_alphas=blocks("block_alphas"),
        conv_block_dims=conv_block_dims,
        conv_block_alphas=conv_block_alphas,
        te_prefixes=te_prefixes,
        unet_name_map=unet_name_map,
        loraplus_lr_ratio=_float_arg(args, "loraplus_lr_ratio"),
        loraplus_unet_lr_ratio=_float_arg(args, "loraplus_unet_lr_ratio"),
        loraplus_text_encoder_lr_ratio=_float_arg(args, "loraplus_text_encoder_lr_ratio"),
        adapter=adapter,
    )


def dims_from_weights(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, int], dict[str, float]]:
    """Per-module rank and alpha of a LoRA file (alpha defaults to the rank when the file has none)."""
    dims, alphas = {}, {}
    for key, value in state_dict.items():
        if key.endswith(".lora_down.weight"):
            name = key[: -len(".lora_down.weight")]
            dims[name] = value.shape[0]
            alpha = state_dict.get(name + ".alpha")
            alphas[name] = float(alpha) if alpha is not None else float(value.shape[0])
    return dims, alphas


def create_network_from_weights(
    multiplier: float,
    state_dict: dict[str, torch.Tensor],
    text_encoders: list[nn.Module],
    unet: nn.Module,
    unet_name_map: dict[str, str] | None = None,
    te_prefixes: list[str] | None = None,
    adapter: AdapterType | None = None,
    **kwargs: str,
) -> LoRANetwork:
    """A network shaped like the file (`--dim_from_weights`); loads nothing yet."""
    adapter, kwargs = (adapter or LORA).with_options(kwargs)
    args = parse_network_args([f"{k}={v}" for k, v in kwargs.items()], adapter.module)
    dims, alphas = adapter.dims_of_file(state_dict)
    return LoRANetwork(
        text_encoders,
        unet,
        multiplier=multiplier,
        module_dims=dims,
        module_alphas=alphas,
        dropout=_float_arg(args, "dropout"),
        rank_dropout=_float_arg(args, "rank_dropout"),
        module_dropout=_float_arg(args, "module_dropout"),
        te_prefixes=te_prefixes,
        unet_name_map=unet_name_map,
        loraplus_lr_ratio=_float_arg(args, "loraplus_lr_ratio"),
        loraplus_unet_lr_ratio=_float_arg(args, "loraplus_unet_lr_ratio"),
        loraplus_text_encoder_lr_ratio=_float_arg(args, "loraplus_text_encoder_lr_ratio"),
        adapter=adapter,
    )
