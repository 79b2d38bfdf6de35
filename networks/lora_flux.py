"""LoRA for FLUX.1 (diffusers FluxTransformer2DModel) + CLIP-L (+ optional T5), in sd-scripts' lora_flux file format.

Adapters carry BFL names (`lora_unet_double_blocks_0_img_attn_qkv`, `lora_unet_single_blocks_0_linear1`, ...). Where BFL
fuses several projections into one Linear (qkv; single-block linear1 = q, k, v, proj_mlp) and diffusers keeps them apart,
one `FusedLoRAModule` holds the fused adapter (`lora_down` (r, in), `lora_up` (sum of outs, r)) and wraps every diffusers
Linear of the group: Linear i outputs `org_i(x) + up[rows of i] @ down @ x * multiplier * alpha / r`. Text encoders:
CLIP-L `lora_te1_text_model_...`, T5 `lora_te3_encoder_block_...` (only with train_t5xxl=True).

split_qkv=True (`SplitLoRAModule`): each of those n Linears gets its own LoRA (down_i (r, in), up_i (out_i, r), scale
alpha / r). The file keeps the fused layout every consumer reads: `lora_down` = the downs stacked (n*r, in), `lora_up` =
block-diagonal of the ups (sum of outs, n*r), `alpha` = n * alpha, so that alpha / rank computed on the fused module is the
trained alpha / r (sd-scripts writes alpha unchanged there, and consumers apply 1/n of the trained strength). Without
split_qkv such a file is a plain fused adapter of rank n*r with the same output. With split_qkv, a block-diagonal file is
split back exactly; a plain fused file of rank R (trained without split_qkv) is loaded exactly by giving every part the
whole down (part rank R, saved as rank n*R, alpha n*alpha); a non-block-diagonal file of rank n*r cannot fit parts of
rank r and is refused, naming the module (use --dim_from_weights).

network_args: see KNOWN_ARGS; unsupported sd-scripts arguments are refused (UNSUPPORTED_ARGS), anything else is an error.
Files in the diffusers/PEFT layout (ai-toolkit: `transformer.<diffusers path>.lora_A.weight` / `.lora_B.weight`) are
converted to the fused kohya layout exactly on load (`peft_to_kohya`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import torch
from torch import nn

from library.flux_models import flux_lora_targets
from networks.adapter import AdapterModule, AdapterType, merge_typed_file, parse_flag
from networks.lora import (
    LORA,
    TEXT_ENCODER_TARGETS,
    LoRAModule,
    LoRANetwork,
    _float_arg,
    _target_modules,
    add_scaled,
    dims_from_weights,
    drop_ranks,
    lora_delta,
    lora_delta_norm_sq,
)

T5_TARGETS = ("T5Attention", "T5DenseGatedActDense")
KILN_NETWORK = True  # kiln's network-module interface (not sd-scripts'): see library/method_adapter.py

TE_PREFIXES = ("lora_te1", "lora_te3")  # CLIP-L, T5-XXL (sd-scripts' names, "to make ComfyUI compatible")

TYPE_DIM_ARGS = {  # network_arg -> the BFL module suffixes it sizes
    "img_attn_dim": ("img_attn_qkv", "img_attn_proj"),
    "txt_attn_dim": ("txt_attn_qkv", "txt_attn_proj"),
    "img_mlp_dim": ("img_mlp_0", "img_mlp_2"),
    "txt_mlp_dim": ("txt_mlp_0", "txt_mlp_2"),
    "img_mod_dim": ("img_mod_lin",),
    "txt_mod_dim": ("txt_mod_lin",),
    "single_dim": ("linear1", "linear2"),
    "single_mod_dim": ("modulation_lin",),
}
IN_DIM_NAMES = {  # in_dims position -> embedder adapter names
    0: ("img_in",),
    1: ("time_in_in_layer", "time_in_out_layer"),
    2: ("vector_in_in_layer", "vector_in_out_layer"),
    3: ("guidance_in_in_layer", "guidance_in_out_layer"),
    4: ("txt_in",),
}
KNOWN_ARGS = {
    "train_blocks",
    "train_double_block_indices",
    "train_single_block_indices",
    "in_dims",
    "train_t5xxl",
    "dropout",
    "rank_dropout",
    "module_dropout",
    "loraplus_lr_ratio",
    "loraplus_unet_lr_ratio",
    "loraplus_text_encoder_lr_ratio",
    "split_qkv",
    *TYPE_DIM_ARGS,
}
UNSUPPORTED_ARGS = {
    "ggpo_sigma": "LoRA-GGPO (ggpo_sigma/ggpo_beta) is not supported yet",
    "ggpo_beta": "LoRA-GGPO (ggpo_sigma/ggpo_beta) is not supported yet",
    "network_reg_dims": "network_reg_dims is not supported yet",
    "network_reg_lrs": "network_reg_lrs is not supported yet",
    "conv_dim": "conv_dim/conv_alpha are not supported for FLUX (its transformer has no convolutions)",
    "conv_alpha": "conv_dim/conv_alpha are not supported for FLUX (its transformer has no convolutions)",
    "verbose": "verbose is not supported yet",
}


class FusedLoRAModule(LoRAModule):
    """One adapter over several Linears that see the same input (BFL's fused qkv / linear1).

    `lora_up` rows are split among the wrapped Linears in order; `up(down(x))` is computed once per input tensor (one
    matmul each, with the dropout masks) and each Linear adds its columns of the result: the fused BFL layer's LoRA,
    in two matmuls instead of one pair per Linear."""

    forward = AdapterModule.forward  # the concatenated outputs of the wrapped Linears (= the fused BFL Linear's)

    def _down(self, x: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], float] | None:
        """(each wrapped Linear's part of up(down(x)) with dropouts, scale to apply), or None when module dropout skips
        the adapter. One down and one up matmul serve all parts (backward: one concatenation of the parts' gradients)."""
        down, up = self.lora_down.weight, self.lora_up.weight
        if not self.training or not (self.dropout or self.rank_dropout or self.module_dropout):
            if x.dtype != down.dtype and not torch.is_autocast_enabled(x.device.type):
                x = x.to(down.dtype)
            y = nn.functional.linear(nn.functional.linear(x, down), up)
            return y.split(self.splits, dim=-1), self.scale
        if self.module_dropout and torch.rand(()) < self.module_dropout:
            return None
        h = self.lora_down(x.to(down.dtype))
        if self.dropout:
            h = nn.functional.dropout(h, p=self.dropout)
        scale = self.scale
        if self.rank_dropout:
            h, factor = drop_ranks(h, self.rank, self.rank_dropout)
            scale = scale * factor
        return nn.functional.linear(h, up).split(self.splits, dim=-1), scale

    def _part_forward(self, i: int, x: torch.Tensor) -> torch.Tensor:
        out = self._org_forwards[i](x)
        if self.multiplier == 0:
            return out
        res = self._shared(i, x, self._down)
        if res is None:
            return out
        parts, scale = res
        return add_scaled(out, parts[i], self.multiplier * scale)


class SplitLoRAModule(FusedLoRAModule):
    """split_qkv: one LoRA per wrapped Linear (`lora_down[i]` (r, in), `lora_up[i]` (out_i, r), scale alpha / r), seen
    from outside as the fused adapter it is saved as: `rank` = n*r, `alpha` = n*alpha (so alpha / rank is the trained
    scale), state dict `lora_down.weight` = the downs stacked, `lora_up.weight` = block-diagonal of the ups. Loading
    splits a block-diagonal fused adapter back into the parts (anything else is an error naming the module)."""

    def __init__(self, name: str, org_modules: list[nn.Linear], rank: int, alpha: float | None, **kw) -> None:
        super().__init__(name, org_modules, rank, alpha, **kw)
        n = len(org_modules)
        self.part_rank = rank
        self.rank = n * rank  # the saved (fused) rank
        # the parts replace the fused lora_down / lora_up that FusedLoRAModule built
        self.lora_down = nn.ModuleList(nn.Linear(org_modules[0].in_features, rank, bias=False) for _ in self.splits)
        self.lora_up = nn.ModuleList(nn.Linear(rank, out, bias=False) for out in self.splits)
        for down, up in zip(self.lora_down, self.lora_up):
            nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
            nn.init.zeros_(up.weight)
        self.alpha.fill_(n * (rank if alpha is None or alpha == 0 else float(alpha)))
        self.scale = self.alpha.item() / self.rank  # from the stored alpha, exactly as after load_weights
        self.register_state_dict_post_hook(_fuse_parts_hook)
        self.register_load_state_dict_pre_hook(_split_parts_hook)

    def _down(self, x: torch.Tensor) -> tuple | None:
        """The parts share only the module-dropout decision (one per input tensor, as the fused module's): None = skip."""
        return None if torch.rand(()) < self.module_dropout else ()

    def _part_forward(self, i: int, x: torch.Tensor) -> torch.Tensor:
        out = self._org_forwards[i](x)
        if self.multiplier == 0:
            return out
        down, up = self.lora_down[i].weight, self.lora_up[i].weight
        scale = self.scale
        if not self.training or not (self.dropout or self.rank_dropout or self.module_dropout):
            if x.dtype != down.dtype and not torch.is_autocast_enabled(x.device.type):
                x = x.to(down.dtype)
            y = nn.functional.linear(nn.functional.linear(x, down), up)
        else:
            if self.module_dropout and self._shared(i, x, self._down) is None:
                return out
            h = nn.functional.linear(x.to(down.dtype), down)
            if self.dropout:
                h = nn.functional.dropout(h, p=self.dropout)
            if self.rank_dropout:
                h, factor = drop_ranks(h, self.part_rank, self.rank_dropout)
                scale = scale * factor
            y = nn.functional.linear(h, up)
        return add_scaled(out, y, self.multiplier * scale)

    def delta_weight(self) -> torch.Tensor:
        """The fused weight change (sum of outs, in): each part's up_i @ down_i * scale, stacked."""
        return torch.cat(
            [lora_delta(d.weight.float(), u.weight.float(), self.scale) for d, u in zip(self.lora_down, self.lora_up)]
        )

    def delta_norm_sq(self) -> torch.Tensor:
        """||delta_weight()||^2 (the parts' rows are stacked, so their squared norms add up), not read from the device."""
        return sum(lora_delta_norm_sq(d.weight, u.weight, self.scale) for d, u in zip(self.lora_down, self.lora_up))


def _fuse_parts_hook(module: SplitLoRAModule, state_dict: dict, prefix: str, local_metadata) -> None:
    """state_dict post-hook: the parts' keys -> the fused kohya keys (downs stacked, ups block-diagonal)."""
    n = len(module.splits)
    downs = [state_dict.pop(f"{prefix}lora_down.{i}.weight").detach() for i in range(n)]
    ups = [state_dict.pop(f"{prefix}lora_up.{i}.weight").detach() for i in range(n)]
    state_dict[prefix + "lora_down.weight"] = torch.cat(downs)
    state_dict[prefix + "lora_up.weight"] = torch.block_diag(*ups)


def _split_parts_hook(module: SplitLoRAModule, state_dict: dict, prefix: str, *args) -> None:
    """load_state_dict pre-hook: the fused kohya keys -> the parts' keys (the fused up must be block-diagonal)."""
    key_down, key_up = prefix + "lora_down.weight", prefix + "lora_up.weight"
    if key_down not in state_dict or key_up not in state_dict:
        return
    down, up = state_dict[key_down], state_dict[key_up]
    want_down, want_up = (module.rank, module.org_modules[0].in_features), (sum(module.splits), module.rank)
    if tuple(down.shape) != want_down or tuple(up.shape) != want_up:
        raise ValueError(
            f"{module.lora_name}: lora_down {tuple(down.shape)} / lora_up {tuple(up.shape)} do not fit this split_qkv "
            f"adapter (lora_down ({module.rank}, in), lora_up {want_up})"
        )
    parts = block_diagonal_parts(down, up, module.splits, module.part_rank)
    if parts is None:
        raise ValueError(f"{module.lora_name}: lora_up is not block-diagonal, so it cannot be split into split_qkv parts")
    del state_dict[key_down], state_dict[key_up]
    for i, (d, u) in enumerate(parts):
        state_dict[f"{prefix}lora_down.{i}.weight"] = d
        state_dict[f"{prefix}lora_up.{i}.weight"] = u


def block_diagonal_parts(
    down: torch.Tensor, up: torch.Tensor, splits: list[int], part_rank: int
) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """[(down_i (r, in), up_i (out_i, r))] of a fused adapter (down (n*r, in), up (sum of outs, n*r)) whose up is
    block-diagonal, i.e. the same delta as n separate LoRAs; None when the shapes differ or an off-diagonal block of up
    is not all zero."""
    n = len(splits)
    if down.dim() != 2 or down.shape[0] != n * part_rank or tuple(up.shape) != (sum(splits), n * part_rank):
        return None
    parts = []
    for i, (d, rows) in enumerate(zip(down.split(part_rank), up.split(splits))):
        blocks = rows.split(part_rank, dim=1)
        if any(b.any() for j, b in enumerate(blocks) if j != i):
            return None
        parts.append((d, blocks[i]))
    return parts


def fit_split_qkv(
    state_dict: dict[str, torch.Tensor],
    fused: dict[str, list[int]],
    part_ranks: dict[str, int] | None = None,
    source: str = "weights",
) -> dict[str, torch.Tensor]:
    """The file with every fused adapter of `fused` (name -> its parts' output widths) in the block-diagonal layout
    split_qkv loads: a block-diagonal adapter of rank n*r stays; any other (a plain fused adapter of rank R) is expanded
    exactly (each part gets the whole down: down repeated n times, up block-diagonal, alpha n * alpha; same delta). With
    `part_ranks` (a network's part rank r per name), an adapter of rank n*r that is not block-diagonal is an error; other
    shape mismatches are left for load_weights to report."""
    out = dict(state_dict)
    for name, splits in fused.items():
        down, up = state_dict.get(name + ".lora_down.weight"), state_dict.get(name + ".lora_up.weight")
        if down is None or up is None or down.dim() != 2:
            continue
        n, rank = len(splits), down.shape[0]
        want = None if part_ranks is None else part_ranks.get(name)
        if rank % n == 0 and want in (None, rank // n) and block_diagonal_parts(down, up, splits, rank // n) is not None:
            continue
        if want is not None and want != rank:
            if want * n == rank:
                raise ValueError(
                    f"{source}: {name} is a fused adapter of rank {rank} whose lora_up is not block-diagonal (trained "
                    f"without split_qkv), so it does not fit split_qkv parts of rank {want}; with split_qkv it loads as "
                    f"parts of rank {rank} (--dim_from_weights, or network_dim {rank})"
                )
            continue
        if tuple(up.shape) != (sum(splits), rank):
            continue
        alpha = state_dict.get(name + ".alpha")
        alpha = float(rank) if alpha is None else float(alpha)
        out[name + ".lora_down.weight"] = down.repeat(n, 1)
        out[name + ".lora_up.weight"] = torch.block_diag(*up.split(splits))
        out[name + ".alpha"] = torch.tensor(n * alpha)
    return out


def split_targets(transformer, candidates: list[tuple[str, list[str]]] | None = None) -> dict[str, list[int]]:
    """Adapter name -> output widths of the diffusers Linears it fuses, for the adapters split_qkv splits.
    `candidates`: (adapter name, diffusers Linear paths) of another family's transformer (default: FLUX's)."""
    if transformer is None:
        return {}
    return {
        name: [transformer.get_submodule(p).out_features for p in paths]
        for name, paths in (transformer_candidates(transformer) if candidates is None else candidates)
        if len(paths) > 1
    }


def parse_indices(value, count: int, key: str) -> set[int]:
    """ "all" / "none" / "0-5,10" (or a list of ints) -> the selected block indices, each < count."""
    if value is None:
        return set(range(count))
    if isinstance(value, (list, tuple)):
        picked = {int(v) for v in value}
    else:
        text = str(value).strip().lower()
        if text == "all":
            return set(range(count))
        if text in ("none", ""):
            return set()
        picked = set()
        for part in text.replace("[", "").replace("]", "").split(","):
            part = part.strip()
            if not part:
                continue
            m = re.fullmatch(r"(\d+)\s*-\s*(\d+)", part)
            try:
                picked |= set(range(int(m.group(1)), int(m.group(2)) + 1)) if m else {int(part)}
            except ValueError:
                raise ValueError(f"network_args {key}: cannot read {part!r} (use all, none or e.g. 0-5,10)") from None
    bad = sorted(i for i in picked if i < 0 or i >= count)
    if bad:
        raise ValueError(f"network_args {key}: block index {bad[0]} out of range (the model has {count} such blocks)")
    return picked


def check_network_args(
    args: dict, known: set[str] = KNOWN_ARGS, unsupported: dict[str, str] = UNSUPPORTED_ARGS, module: str = "networks.lora_flux"
) -> dict:
    """Refuse unsupported and unknown network_args (kiln never ignores an argument); `known` / `unsupported` /
    `module` name another network module's arguments."""
    for key in args:
        if key in unsupported:
            raise ValueError(f"network_args {key}: {unsupported[key]}")
    unknown = sorted(set(args) - known)
    if unknown:
        raise ValueError(f"unknown network_args for {module}: {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
    return args


def _as_list(text_encoders) -> list:
    if text_encoders is None:
        return []
    if isinstance(text_encoders, nn.Module):
        return [text_encoders]
    return list(text_encoders)


def te_candidates(text_encoders, prefixes: tuple[str, ...] = TE_PREFIXES) -> list[tuple[str, nn.Module]]:
    """(adapter name, Linear) of the text encoders, one prefix each in order: FLUX's CLIP-L (`lora_te1_text_model_...`)
    and T5 (`lora_te3_encoder_block_...`) by default. `lora_te3` is a T5 encoder, every other prefix a CLIP."""
    out = []
    for prefix, te in zip(prefixes, _as_list(text_encoders)):
        if te is None:
            continue
        is_t5 = prefix == "lora_te3"
        for path, module in _target_modules(te, T5_TARGETS if is_t5 else TEXT_ENCODER_TARGETS):
            if not is_t5 and not path.startswith("text_model."):
                path = "text_model." + path  # transformers 5 flattens CLIPTextModel; kohya names keep text_model
            out.append((f"{prefix}_{path}".replace(".", "_"), module))
    return out


def _block_kind(bfl_name: str) -> tuple[str, int | None, str]:
    """("double"|"single"|"embedder"|"final", block index, suffix) of a BFL adapter name without lora_unet_."""
    m = re.match(r"(double|single)_blocks_(\d+)_(.+)", bfl_name)
    if m:
        return m.group(1), int(m.group(2)), m.group(3)
    return ("final" if bfl_name.startswith("final_layer") else "embedder"), None, bfl_name


def transformer_candidates(transformer) -> list[tuple[str, list[str]]]:
    """(adapter name `lora_unet_<bfl name>`, [diffusers Linear paths]) of everything a FLUX LoRA can adapt (the final
    layer is not adapted, as in sd-scripts)."""
    return [(f"lora_unet_{b}", paths) for b, paths in flux_lora_targets(transformer) if _block_kind(b)[0] != "final"]


class FluxLoRANetwork(LoRANetwork):
    """All LoRA modules of a FLUX transformer and its text encoders; `module_dims` (adapter name -> rank) picks them.

    split_qkv: fused adapters become `SplitLoRAModule`s; their module_dims / module_alphas are per part (r, alpha)."""

    def __init__(
        self,
        text_encoders,
        transformer: nn.Module | None,
        module_dims: dict[str, int],
        module_alphas: dict[str, float | None] | None = None,
        multiplier: float = 1.0,
        dropout: float | None = None,
        rank_dropout: float | None = None,
        module_dropout: float | None = None,
        loraplus_lr_ratio: float | None = None,
        loraplus_unet_lr_ratio: float | None = None,
        loraplus_text_encoder_lr_ratio: float | None = None,
        split_qkv: bool = False,
        adapter: AdapterType | None = None,
    ) -> None:
        nn.Module.__init__(self)
        self.adapter = adapter = adapter or LORA
        self.multiplier = multiplier
        self.split_qkv = split_qkv
        self.loraplus_unet = loraplus_unet_lr_ratio or loraplus_lr_ratio
        self.loraplus_te = loraplus_text_encoder_lr_ratio or loraplus_lr_ratio
        self.aliases: dict[str, str] = {}
        alphas = module_alphas or {}
        common = {"multiplier": multiplier, "dropout": dropout, "rank_dropout": rank_dropout, "module_dropout": module_dropout}
        self.text_encoder_loras: list[LoRAModule] = []
        self.unet_loras: list[LoRAModule] = []
        for name, module in self.te_candidates(text_encoders) if adapter.text_encoders else []:
            if module_dims.get(name):
                self.text_encoder_loras.append(adapter.build(name, [module], module_dims[name], alphas.get(name), common))
        self._transformer = [transformer]  # a list: not a submodule
        for name, paths in self.transformer_candidates(transformer) if transformer is not None else []:
            if not module_dims.get(name):
                continue
            modules = [transformer.get_submodule(p) for p in paths]
            self.unet_loras.append(self.transformer_lora(name, modules, module_dims[name], alphas.get(name), common))
        for m in self.loras:
            self.add_module(m.lora_name, m)

    # The family hooks: a network of another family with fused adapters (SD3) overrides these four.

    def te_candidates(self, text_encoders) -> list[tuple[str, nn.Module]]:
        """(adapter name, Linear) of everything the text encoders can adapt."""
        return te_candidates(text_encoders)

    def transformer_candidates(self, transformer) -> list[tuple[str, list[str]]]:
        """(adapter name, [diffusers Linear paths fused into it]) of everything the transformer can adapt."""
        return [(self.adapter.unet_name(name), paths) for name, paths in transformer_candidates(transformer)]

    def transformer_lora(
        self, name: str, modules: list[nn.Module], rank: int, alpha: float | None, common: dict
    ) -> AdapterModule:
        """The adapter of one candidate: plain for one module, fused (split with split_qkv) for several; another
        adapter type's module over all of them."""
        if not self.adapter.is_lora:
            return self.adapter.build(name, modules, rank, alpha, common)
        if len(modules) == 1:
            return LoRAModule(name, modules[0], rank, alpha, **common)
        cls = SplitLoRAModule if self.split_qkv else FusedLoRAModule
        return cls(name, modules, rank, alpha, **common)

    def to_kohya(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A diffusers/PEFT-layout file in this network's kohya keys (any other file as it is)."""
        return peft_to_kohya(state_dict, self._transformer[0]) if is_peft_layout(state_dict) else state_dict

    def te_group_prefix(self, lora_name: str) -> str:
        return "_".join(lora_name.split("_")[:2])  # lora_te1 / lora_te2 / lora_te3

    def load_weights(self, state_dict: dict[str, torch.Tensor], source: str = "weights") -> list[str]:
        """Load kohya keys, or a diffusers/PEFT-layout file (converted to the fused layout first). split_qkv
        adapters take a block-diagonal fused adapter of their rank, or a plain one of their part rank (see fit_split_qkv)."""
        state_dict = self.to_kohya(state_dict)
        split = [m for m in self.unet_loras if isinstance(m, SplitLoRAModule)]
        if split:
            fused = {m.lora_name: m.splits for m in split}
            state_dict = fit_split_qkv(state_dict, fused, {m.lora_name: m.part_rank for m in split}, source)
        return super().load_weights(state_dict, source)


# ---------------------------------------------------------------------------------------------------------------------
# diffusers / PEFT layout (ai-toolkit) -> kohya layout
# ---------------------------------------------------------------------------------------------------------------------

_PEFT_SUFFIXES = {".lora_A.weight": "A", ".lora_B.weight": "B", ".alpha": "alpha"}
_PEFT_TE_PREFIXES = {"text_encoder.": "lora_te1_", "text_encoder_2.": "lora_te3_"}
_PEFT_TRANSFORMER_PREFIXES = ("transformer.", "diffusion_model.", "base_model.model.")


def is_peft_layout(state_dict: dict) -> bool:
    return any(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in state_dict)


def peft_to_kohya(
    state_dict: dict[str, torch.Tensor],
    transformer,
    candidates: list[tuple[str, list[str]]] | None = None,
    te_prefixes: dict[str, str] | None = None,
    row_orders: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """A diffusers/PEFT-layout LoRA (`<prefix><module path>.lora_A.weight`, `.lora_B.weight`, optional `.alpha`) in kohya
    FLUX keys. Separate projections of one fused BFL Linear become one adapter exactly: down = cat of the A's (each
    scaled by its alpha / rank), up = block-diagonal of the B's (zero rows for a projection the file lacks), alpha = total
    rank (scale 1). `transformer`: the FluxTransformer2DModel (meta is fine). Keys matching no target are kept unchanged.

    Another family: `candidates` (kohya name, diffusers paths) of its transformer, `te_prefixes` (diffusers text
    encoder prefix -> kohya prefix; `lora_te3_` is T5, the others CLIP) and `row_orders` (kohya name -> for each row
    of its weight, the diffusers module's row it is, for a one-module adapter whose rows the original layout orders
    differently)."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    passthrough = {}
    for key, value in state_dict.items():
        suffix = next((s for s in _PEFT_SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            passthrough[key] = value
            continue
        modules.setdefault(key[: -len(suffix)], {})[_PEFT_SUFFIXES[suffix]] = value
    te_prefixes = _PEFT_TE_PREFIXES if te_prefixes is None else te_prefixes
    if candidates is None:
        candidates = transformer_candidates(transformer) if transformer is not None else []
    transformer_modules, out = {}, {}
    for path, parts in modules.items():
        if "A" not in parts or "B" not in parts:
            raise ValueError(f"LoRA module {path} lacks its lora_A or lora_B weight")
        te = next((p for p in te_prefixes if path.startswith(p)), None)
        if te is not None:
            inner = path[len(te) :]
            if te_prefixes[te] != "lora_te3_" and not inner.startswith("text_model."):
                inner = "text_model." + inner  # a CLIP: kohya names keep text_model
            name = te_prefixes[te] + inner.replace(".", "_")
            out[name + ".lora_down.weight"], out[name + ".lora_up.weight"] = parts["A"], parts["B"]
            out[name + ".alpha"] = parts.get("alpha", torch.tensor(float(parts["A"].shape[0])))
            continue
        inner = next((path[len(p) :] for p in _PEFT_TRANSFORMER_PREFIXES if path.startswith(p)), path)
        transformer_modules[inner] = (path, parts)
    for name, paths in candidates:
        present = [p for p in paths if p in transformer_modules]
        if not present:
            continue
        if len(paths) == 1:
            parts = transformer_modules.pop(paths[0])[1]
            up = parts["B"] if not row_orders or name not in row_orders else parts["B"][row_orders[name]]
            out[name + ".lora_down.weight"], out[name + ".lora_up.weight"] = parts["A"], up
            out[name + ".alpha"] = parts.get("alpha", torch.tensor(float(parts["A"].shape[0])))
            continue
        downs, blocks = [], []
        for p in paths:
            if p in transformer_modules:
                parts = transformer_modules.pop(p)[1]
                scale = float(parts["alpha"]) / parts["A"].shape[0] if "alpha" in parts else 1.0
                downs.append(parts["A"].float())
                dtype = parts["A"].dtype
                blocks.append(parts["B"].float() * scale)
            else:  # a projection the file does not adapt: zero rows
                blocks.append(torch.zeros(transformer.get_submodule(p).out_features, 0))
        down = torch.cat(downs, dim=0)
        up = torch.block_diag(*blocks)
        out[name + ".lora_down.weight"] = down.to(dtype)
        out[name + ".lora_up.weight"] = up.to(dtype)
        out[name + ".alpha"] = torch.tensor(float(down.shape[0]))
    for path, parts in transformer_modules.values():  # matches nothing: keep under its own name
        for short, suffix in (("A", ".lora_A.weight"), ("B", ".lora_B.weight"), ("alpha", ".alpha")):
            if short in parts:
                out[path + suffix] = parts[short]
    out.update(passthrough)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------------------------------


def _int_or_none(args: dict, key: str) -> int | None:
    return None if args.get(key) in (None, "None", "none") else int(args[key])


def parse_rank_list(value, key: str, names: tuple[str, ...]) -> list[int]:
    """ "[a,b,...]" (or a list) -> one rank per entry of `names` (0 = no adapter); another count is an error."""
    if isinstance(value, str):
        value = [v for v in value.replace("[", "").replace("]", "").split(",") if v.strip()]
    try:
        dims = [int(v) for v in value]
    except ValueError:
        raise ValueError(f"network_args {key}: cannot read {value!r} as integers [{','.join(names)}]") from None
    if len(dims) != len(names):
        raise ValueError(f"network_args {key} needs {len(names)} values [{','.join(names)}], got {len(dims)}")
    return dims


def parse_in_dims(value) -> list[int]:
    """ "[img,time,vector,guidance,txt]" -> five ranks (0 = no adapter)."""
    return parse_rank_list(value, "in_dims", ("img", "time", "vector", "guidance", "txt"))


def flux_module_dims(text_encoders, transformer, network_dim: int, args: dict) -> dict[str, int]:
    """Adapter name -> rank for create_network's network_args (see the module docstring)."""
    dims: dict[str, int] = {}
    train_t5 = parse_flag(args.get("train_t5xxl", False), "train_t5xxl")
    for name, _ in te_candidates(text_encoders):
        if name.startswith("lora_te1_") or train_t5:
            dims[name] = network_dim
    if transformer is None:
        return dims
    config = getattr(transformer, "config", transformer)
    train_blocks = str(args.get("train_blocks", "all")).strip().lower()
    if train_blocks not in ("all", "single", "double"):
        raise ValueError(f"network_args train_blocks must be all, single or double, got {args['train_blocks']!r}")
    blocks = {
        "double": parse_indices(args.get("train_double_block_indices"), config.num_layers, "train_double_block_indices")
        if train_blocks in ("all", "double")
        else set(),
        "single": parse_indices(args.get("train_single_block_indices"), config.num_single_layers, "train_single_block_indices")
        if train_blocks in ("all", "single")
        else set(),
    }
    type_dims = {}
    for key, suffixes in TYPE_DIM_ARGS.items():
        dim = _int_or_none(args, key)
        for suffix in suffixes:
            type_dims[suffix] = network_dim if dim is None else dim
    in_dims = parse_in_dims(args["in_dims"]) if args.get("in_dims") not in (None, "None") else [0] * 5
    embedder_dims = {n: in_dims[i] for i, names in IN_DIM_NAMES.items() for n in names}
    for name, _ in transformer_candidates(transformer):
        kind, index, suffix = _block_kind(name[len("lora_unet_") :])
        if kind == "embedder":
            dims[name] = embedder_dims.get(suffix, 0)
        elif index in blocks[kind]:
            dims[name] = type_dims[suffix]
    return {k: v for k, v in dims.items() if v}


def _network_kwargs(args: dict, neuron_dropout: float | None = None) -> dict:
    return {
        "dropout": _float_arg(args, "dropout") if "dropout" in args else neuron_dropout,
        "rank_dropout": _float_arg(args, "rank_dropout"),
        "module_dropout": _float_arg(args, "module_dropout"),
        "loraplus_lr_ratio": _float_arg(args, "loraplus_lr_ratio"),
        "loraplus_unet_lr_ratio": _float_arg(args, "loraplus_unet_lr_ratio"),
        "loraplus_text_encoder_lr_ratio": _float_arg(args, "loraplus_text_encoder_lr_ratio"),
        "split_qkv": parse_flag(args.get("split_qkv", False), "split_qkv"),
    }


def create_network(
    multiplier: float,
    network_dim: int | None,
    network_alpha: float | None,
    text_encoders,
    transformer: nn.Module,
    neuron_dropout: float | None = None,
    adapter: AdapterType | None = None,
    **network_args,
) -> FluxLoRANetwork:
    """sd-scripts' entry point: text_encoders = [CLIP-L, T5] (either may be None); network_args as strings or values;
    `adapter`: the module type (LoRA by default)."""
    adapter, args = typed_args(adapter, network_args)
    dim = network_dim or 4
    dims = flux_module_dims(text_encoders, transformer, dim, args)
    alphas = dict.fromkeys(dims, network_alpha)
    return FluxLoRANetwork(
        text_encoders, transformer, dims, alphas, multiplier=multiplier, adapter=adapter, **_network_kwargs(args, neuron_dropout)
    )


def create_network_from_weights(
    multiplier: float,
    state_dict: dict[str, torch.Tensor],
    text_encoders,
    transformer,
    adapter: AdapterType | None = None,
    **network_args,
) -> FluxLoRANetwork:
    """A network shaped like the file (kohya FLUX or diffusers/PEFT layout); loads nothing yet. With split_qkv, a
    block-diagonal fused adapter of rank n*r gives parts of rank r, any other fused adapter of rank R parts of rank R."""
    adapter, args = typed_args(adapter, network_args)
    kwargs = _network_kwargs(args)
    if not adapter.is_lora:
        dims, alphas = adapter.dims_of_file(state_dict)
    else:
        if is_peft_layout(state_dict):
            state_dict = peft_to_kohya(state_dict, transformer)
        dims, alphas = split_aware_dims(state_dict, split_targets(transformer) if kwargs["split_qkv"] else {})
    return FluxLoRANetwork(text_encoders, transformer, dims, alphas, multiplier=multiplier, adapter=adapter, **kwargs)


def typed_args(
    adapter: AdapterType | None, network_args: dict, check: Callable[..., dict] | None = None
) -> tuple[AdapterType, dict]:
    """(the adapter type with its own network_args, the family's network_args checked by `check` (FLUX's by
    default)); split_qkv is LoRA's alone."""
    adapter, args = (adapter or LORA).with_options(dict(network_args))
    args = (check or check_network_args)(args, module=adapter.module)
    if not adapter.is_lora and parse_flag(args.get("split_qkv", False), "split_qkv"):
        raise ValueError(f"network_args split_qkv: only LoRA splits fused layers; {adapter.name} adapts the fused weight")
    return adapter, args


def split_aware_dims(state_dict: dict[str, torch.Tensor], fused: dict[str, list[int]]) -> tuple[dict[str, int], dict[str, float]]:
    """Per-adapter rank and alpha of a kohya file for a network whose adapters in `fused` (name -> the parts' output
    widths; empty without split_qkv) are split: theirs are per part (see fit_split_qkv)."""
    dims, alphas = dims_from_weights(fit_split_qkv(state_dict, fused))
    for name, splits in fused.items():
        if name in dims:
            dims[name] //= len(splits)
            alphas[name] /= len(splits)
    return dims, alphas


def add_delta(module: LoRAModule, delta: torch.Tensor) -> None:
    """Add `delta` (shaped like the adapter's fused weight) to the weights `module` adapts: each Linear of a fused
    adapter gets its rows."""
    orgs = module.org_modules if isinstance(module, FusedLoRAModule) else [module.org_module]
    for org, rows in zip(orgs, torch.split(delta, [o.weight.shape[0] for o in orgs], dim=0)):
        org.weight += rows.to(org.weight.device, org.weight.dtype)


def merge_into_transformer(state_dict: dict[str, torch.Tensor], ratio: float, transformer: nn.Module, text_encoders=None) -> int:
    """Add ratio x each adapter's delta to the weights it adapts (a fused adapter: each Linear gets its rows); returns
    the number of adapters merged. Keys matching no module of these models are an error."""
    typed = merge_typed_file(state_dict, ratio, text_encoders, transformer)
    if typed is not None:
        return typed
    if is_peft_layout(state_dict):
        state_dict = peft_to_kohya(state_dict, transformer)
    dims, alphas = dims_from_weights(state_dict)
    network = FluxLoRANetwork(text_encoders, transformer, dims, alphas)
    found = {m.lora_name: m for m in network.loras}
    missing = sorted(set(dims) - set(found))
    if missing:
        raise ValueError(
            f"{len(missing)} LoRA modules match nothing in this model, e.g. {missing[0]}; is it a LoRA for another model?"
        )
    with torch.no_grad():
        for name, m in found.items():
            down = state_dict[name + ".lora_down.weight"].float()
            up = state_dict[name + ".lora_up.weight"].float()
            add_delta(m, lora_delta(down, up, alphas[name] / dims[name]) * ratio)
    return len(found)
