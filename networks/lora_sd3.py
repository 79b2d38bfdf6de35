"""LoRA for SD3 / SD3.5 (diffusers SD3Transformer2DModel) + CLIP-L, CLIP-G (+ optional T5), in sd-scripts' lora_sd3 format.

Adapters carry the names of Stability AI's checkpoint: `lora_unet_<SAI module path with . -> _>`, so that a key
`lora_unet_X` adapts `model.diffusion_model.<X with _ read as the original separator>.weight`, as ComfyUI maps it.
The map between diffusers and SAI names is library.sd3_models' (read through `sd3_transformer_to_sai`, see
`sd3_lora_targets`). Where SAI fuses q, k and v into one Linear (`attn.qkv`, the context side's, and 3.5 Medium's
`attn2.qkv`) and diffusers keeps to_q/to_k/to_v (add_q/k/v_proj), one adapter of networks.lora_flux wraps the three
Linears: `FusedLoRAModule` (lora_up (3H, r)), or `SplitLoRAModule` with split_qkv (saved fused: downs stacked, ups
block-diagonal, alpha 3 x alpha, so that a consumer's alpha / rank is the trained scale). The final layer's and the
pre-only last context block's modulations order their two row halves (shift, scale) in SAI's layout and (scale, shift)
in diffusers': `RowOrderLoRAModule` trains in diffusers' order and saves / loads lora_up in SAI's.

Targets (sd-scripts' SD3 network): every Linear of the joint blocks' x_block and context_block (attn.qkv, attn.proj,
attn2.qkv / attn2.proj on MMDiT-X layers, mlp.fc1, mlp.fc2, adaLN_modulation.1; the last context block is pre-only:
qkv and a 2H modulation); the embedders and the final layer only with emb_dims; text encoders `lora_te1_` (CLIP-L),
`lora_te2_` (CLIP-G) and `lora_te3_` (T5 only with train_t5xxl=True).

network_args (strings or values):
    context_attn_dim, context_mlp_dim, context_mod_dim, x_attn_dim, x_mlp_dim, x_mod_dim
        rank of that module type in every trained joint block (x_attn covers attn2); 0 = not trained, unset = network_dim
    emb_dims          "[context_embedder,t_embedder,x_embedder,y_embedder,final_mod,final_linear]": six ranks for
                      context_embedder, t_embedder.mlp.{0,2}, x_embedder.proj (the patch Conv2d), y_embedder.mlp.{0,2},
                      final_layer.adaLN_modulation.1, final_layer.linear; unset = none of them
    train_block_indices "all" | "none" | "0-5,10": the joint blocks trained (default all)
    split_qkv, train_t5xxl, verbose (True/False), dropout, rank_dropout, module_dropout,
    loraplus_lr_ratio, loraplus_unet_lr_ratio, loraplus_text_encoder_lr_ratio
conv_dim / conv_alpha are refused (the MMDiT has no 3x3 convolutions); anything else is an error.
Files in the diffusers/PEFT layout (`transformer.transformer_blocks.0.attn.to_q.lora_A.weight`, `text_encoder.` for
CLIP-L, `text_encoder_2.` for CLIP-G, as diffusers' SD3 pipeline saves them) are converted exactly on load.
"""

from __future__ import annotations

import functools
import json
import logging
import re
from dataclasses import dataclass

import torch
from torch import nn

from library.sd3_models import sd3_transformer_to_sai
from networks.adapter import AdapterModule, AdapterType, merge_typed_file, parse_flag
from networks.lora import LoRAModule, dims_from_weights
from networks.lora_flux import (
    KNOWN_ARGS as FLUX_KNOWN_ARGS,
)
from networks.lora_flux import (
    FluxLoRANetwork,
    _int_or_none,
    _network_kwargs,
    add_delta,
    check_network_args,
    is_peft_layout,
    parse_indices,
    parse_rank_list,
    peft_to_kohya,
    split_aware_dims,
    split_targets,
    te_candidates,
    typed_args,
)

KILN_NETWORK = True  # kiln's network-module interface (not sd-scripts'): see library/method_adapter.py

logger = logging.getLogger(__name__)

TE_PREFIXES = ("lora_te1", "lora_te2", "lora_te3")  # CLIP-L, CLIP-G, T5-XXL (sd-scripts' names)
PEFT_TE_PREFIXES = {"text_encoder.": "lora_te1_", "text_encoder_2.": "lora_te2_", "text_encoder_3.": "lora_te3_"}
TYPE_DIM_ARGS = ("context_attn_dim", "context_mlp_dim", "context_mod_dim", "x_attn_dim", "x_mlp_dim", "x_mod_dim")
EMB_DIM_NAMES = (  # emb_dims position -> the SAI modules it sizes (a module path or its parent)
    "context_embedder",
    "t_embedder",
    "x_embedder",
    "y_embedder",
    "final_layer.adaLN_modulation",
    "final_layer.linear",
)
_EMB_LABELS = ("context_embedder", "t_embedder", "x_embedder", "y_embedder", "final_mod", "final_linear")  # sd-scripts'
_BLOCK_PART_ARG = {"attn": "attn", "attn2": "attn", "mlp": "mlp", "adaLN_modulation": "mod"}
KNOWN_ARGS = {
    "context_attn_dim",
    "context_mlp_dim",
    "context_mod_dim",
    "x_attn_dim",
    "x_mlp_dim",
    "x_mod_dim",
    "emb_dims",
    "train_block_indices",
    "split_qkv",
    "train_t5xxl",
    "dropout",
    "rank_dropout",
    "module_dropout",
    "loraplus_lr_ratio",
    "loraplus_unet_lr_ratio",
    "loraplus_text_encoder_lr_ratio",
    "verbose",
}
_CONV = "conv_dim/conv_alpha are not supported for SD3 (its MMDiT has no 3x3 convolutions; emb_dims sizes the patch embedder)"
UNSUPPORTED_ARGS = {"conv_dim": _CONV, "conv_alpha": _CONV}
_FLUX_ONLY = sorted(FLUX_KNOWN_ARGS - KNOWN_ARGS)  # named in the error for a FLUX argument given to this module


# ---------------------------------------------------------------------------------------------------------------------
# Targets: diffusers modules <-> SAI names
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SD3LoRATarget:
    """One module an SD3 LoRA can adapt: its adapter name, SAI module path, the diffusers modules whose weights make
    the SAI weight (in its row order), and for a one-module target whose rows SAI orders differently, `row_order[i]` =
    the diffusers row of SAI row i (None where they agree)."""

    name: str
    sai: str
    paths: tuple[str, ...]
    row_order: torch.Tensor | None


_ROW_BITS = 24  # a traced value is (tensor index << 24) + row: exact in float64 for any SD3 size


def sd3_lora_targets(transformer) -> tuple[SD3LoRATarget, ...]:
    """Every Linear / Conv2d weight of an SD3Transformer2DModel (or its config) as SAI names it, in SAI order.

    The names come from library.sd3_models' own table, read through `sd3_transformer_to_sai`: each tensor of a meta
    model built from the config is replaced by a column of (tensor index, row) codes, and the SAI tensors it makes say
    which diffusers rows each SAI row is (fused q/k/v: three modules' rows in turn; SAI's (shift, scale) modulations:
    one module's halves swapped). Cached per config."""
    config = getattr(transformer, "config", transformer)
    key = json.dumps({k: v for k, v in dict(config).items() if not k.startswith("_")}, sort_keys=True, default=list)
    return _targets_of_config(key)


@functools.lru_cache(maxsize=8)
def _targets_of_config(config_json: str) -> tuple[SD3LoRATarget, ...]:
    from diffusers import SD3Transformer2DModel

    with torch.device("meta"):
        model = SD3Transformer2DModel(**json.loads(config_json))
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    keys = list(shapes)
    tracer = {
        k: (torch.arange(s[0] if len(s) else 1, dtype=torch.float64) + float(i << _ROW_BITS)).unsqueeze(1)
        for i, (k, s) in enumerate(shapes.items())
    }
    targets = []
    for sai_key, traced in sd3_transformer_to_sai(tracer, prefix="").items():
        if not sai_key.endswith(".weight"):
            continue
        codes = traced[:, 0].long()
        ids, rows = codes >> _ROW_BITS, codes & ((1 << _ROW_BITS) - 1)
        sources = torch.unique_consecutive(ids).tolist()
        paths = tuple(keys[i].removesuffix(".weight") for i in sources)
        if not all(keys[i].endswith(".weight") for i in sources) or not all(
            isinstance(model.get_submodule(p), (nn.Linear, nn.Conv2d)) for p in paths
        ):
            continue  # qk-norm scales and the like
        whole = torch.cat([torch.arange(shapes[keys[i]][0]) for i in sources])
        row_order = None
        if len(paths) > 1:
            if len(set(sources)) != len(sources) or not torch.equal(rows, whole):
                raise RuntimeError(f"{sai_key}: its diffusers rows are not whole modules in turn; kiln cannot adapt it")
        elif not torch.equal(rows, whole):
            row_order = rows
        sai = sai_key.removesuffix(".weight")
        targets.append(SD3LoRATarget("lora_unet_" + sai.replace(".", "_"), sai, paths, row_order))
    return tuple(targets)


def _candidates(transformer) -> list[tuple[str, list[str]]]:
    return [(t.name, list(t.paths)) for t in sd3_lora_targets(transformer)] if transformer is not None else []


def _row_orders(transformer) -> dict[str, torch.Tensor]:
    if transformer is None:
        return {}
    return {t.name: t.row_order for t in sd3_lora_targets(transformer) if t.row_order is not None}


def target_arg(sai: str) -> tuple[str, int]:
    """(the network_arg that sizes a SAI module, index): ("x_attn_dim", block) for a joint-block module (attn2 counts
    as attn), ("emb_dims", position in emb_dims) for an embedder or the final layer."""
    m = re.match(r"joint_blocks\.(\d+)\.(context|x)_block\.(attn2?|mlp|adaLN_modulation)\.", sai)
    if m:
        return f"{m.group(2)}_{_BLOCK_PART_ARG[m.group(3)]}_dim", int(m.group(1))
    for i, prefix in enumerate(EMB_DIM_NAMES):
        if sai == prefix or sai.startswith(prefix + "."):
            return "emb_dims", i
    raise ValueError(f"SD3 module {sai} belongs to no LoRA module type")


# ---------------------------------------------------------------------------------------------------------------------
# Adapters and network
# ---------------------------------------------------------------------------------------------------------------------


class RowOrderLoRAModule(LoRAModule):
    """The adapter of one Linear whose weight rows the file's layout orders otherwise (`row_order[i]` = the Linear's
    row of file row i): it trains in the Linear's order; its state dict holds lora_up in the file's order, and
    load_state_dict takes it in that order."""

    def __init__(self, name: str, org_module: nn.Module, rank: int, alpha: float | None, row_order: torch.Tensor, **kw) -> None:
        super().__init__(name, org_module, rank, alpha, **kw)
        if sorted(row_order.tolist()) != list(range(self.lora_up.weight.shape[0])):
            raise ValueError(f"{name}: row_order is not a permutation of the {self.lora_up.weight.shape[0]} rows")
        self.row_order = row_order.clone()  # a plain attribute: not saved, indices move to the weights' device on use
        self.register_state_dict_post_hook(_rows_to_file_hook)
        self.register_load_state_dict_pre_hook(_rows_from_file_hook)


def _rows_to_file_hook(module: RowOrderLoRAModule, state_dict: dict, prefix: str, local_metadata) -> None:
    key = prefix + "lora_up.weight"
    up = state_dict[key]
    state_dict[key] = up[module.row_order.to(up.device)]


def _rows_from_file_hook(module: RowOrderLoRAModule, state_dict: dict, prefix: str, *args) -> None:
    key = prefix + "lora_up.weight"
    up = state_dict.get(key)
    if up is None or up.shape[0] != len(module.row_order):
        return  # missing or misshapen: load_state_dict reports it
    own = torch.empty_like(up)
    own[module.row_order.to(up.device)] = up
    state_dict[key] = own


class SD3LoRANetwork(FluxLoRANetwork):
    """All LoRA modules of an SD3 transformer and its text encoders ([CLIP-L, CLIP-G, T5], any may be None);
    `module_dims` (adapter name -> rank) picks them. split_qkv: the fused qkv adapters are split, and their
    module_dims / module_alphas are per part (r, alpha)."""

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
        verbose: bool = False,
        adapter: AdapterType | None = None,
    ) -> None:
        super().__init__(
            text_encoders,
            transformer,
            module_dims,
            module_alphas,
            multiplier=multiplier,
            dropout=dropout,
            rank_dropout=rank_dropout,
            module_dropout=module_dropout,
            loraplus_lr_ratio=loraplus_lr_ratio,
            loraplus_unet_lr_ratio=loraplus_unet_lr_ratio,
            loraplus_text_encoder_lr_ratio=loraplus_text_encoder_lr_ratio,
            split_qkv=split_qkv,
            adapter=adapter,
        )
        logger.info("SD3 LoRA: %d text-encoder and %d MMDiT modules", len(self.text_encoder_loras), len(self.unet_loras))
        if verbose:
            for m in self.loras:
                logger.info("  %-60s rank %d, alpha %g", m.lora_name, m.rank, m.alpha.item())
            made = {m.lora_name for m in self.loras}
            skipped = [n for n, _ in self.te_candidates(text_encoders) + _candidates(transformer) if n not in made]
            if skipped:
                logger.info("rank 0, not trained: %d modules: %s", len(skipped), ", ".join(skipped))

    def te_candidates(self, text_encoders) -> list[tuple[str, nn.Module]]:
        return te_candidates(text_encoders, TE_PREFIXES)

    def transformer_candidates(self, transformer) -> list[tuple[str, list[str]]]:
        return [(self.adapter.unet_name(name), paths) for name, paths in _candidates(transformer)]

    def transformer_lora(
        self, name: str, modules: list[nn.Module], rank: int, alpha: float | None, common: dict
    ) -> AdapterModule:
        order = _row_orders(self._transformer[0]).get(self.adapter.unet_name(name, back=True))
        if order is not None and not self.adapter.is_lora:
            return self.adapter.build(name, modules, rank, alpha, {**common, "row_order": order})
        if order is not None:
            return RowOrderLoRAModule(name, modules[0], rank, alpha, order, **common)
        return super().transformer_lora(name, modules, rank, alpha, common)

    def to_kohya(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return sd3_peft_to_kohya(state_dict, self._transformer[0]) if is_peft_layout(state_dict) else state_dict


def sd3_peft_to_kohya(state_dict: dict[str, torch.Tensor], transformer) -> dict[str, torch.Tensor]:
    """A diffusers/PEFT-layout SD3 LoRA (`transformer.<diffusers path>.lora_A.weight` / `.lora_B.weight`, optional
    `.alpha`; `text_encoder.` CLIP-L, `text_encoder_2.` CLIP-G, `text_encoder_3.` T5) in kohya SD3 keys, exactly:
    q/k/v become one fused adapter (networks.lora_flux.peft_to_kohya), modulations get SAI's row order. Keys that
    match nothing are kept as they are."""
    return peft_to_kohya(state_dict, transformer, _candidates(transformer), PEFT_TE_PREFIXES, _row_orders(transformer))


# ---------------------------------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------------------------------


def _check_args(args: dict, module: str = "networks.lora_sd3") -> dict:
    try:
        return check_network_args(args, KNOWN_ARGS, UNSUPPORTED_ARGS, module)
    except ValueError as e:
        flux = [k for k in args if k in _FLUX_ONLY]
        if flux:
            raise ValueError(f"{e} ({', '.join(flux)}: FLUX arguments, for networks.lora_flux)") from None
        raise


def sd3_module_dims(text_encoders, transformer, network_dim: int, args: dict) -> dict[str, int]:
    """Adapter name -> rank for create_network's network_args (see the module docstring); rank-0 modules left out."""
    dims: dict[str, int] = {}
    train_t5 = parse_flag(args.get("train_t5xxl", False), "train_t5xxl")
    for name, _ in te_candidates(text_encoders, TE_PREFIXES):
        if not name.startswith("lora_te3_") or train_t5:
            dims[name] = network_dim
    if transformer is None:
        return dims
    config = getattr(transformer, "config", transformer)
    blocks = parse_indices(args.get("train_block_indices"), dict(config)["num_layers"], "train_block_indices")
    sized = {key: _int_or_none(args, key) for key in TYPE_DIM_ARGS}
    sized = {key: network_dim if dim is None else dim for key, dim in sized.items()}
    emb = args.get("emb_dims")
    sized["emb_dims"] = [0] * len(EMB_DIM_NAMES) if emb in (None, "None") else parse_rank_list(emb, "emb_dims", _EMB_LABELS)
    bad = [k for k in TYPE_DIM_ARGS if sized[k] < 0] + (["emb_dims"] if min(sized["emb_dims"]) < 0 else [])
    if bad:
        raise ValueError(f"network_args {bad[0]}: a rank cannot be negative (0 = not trained)")
    for t in sd3_lora_targets(transformer):
        key, index = target_arg(t.sai)
        if key == "emb_dims":
            dims[t.name] = sized[key][index]
        elif index in blocks:
            dims[t.name] = sized[key]
    return {k: v for k, v in dims.items() if v}


def _kwargs(args: dict, neuron_dropout: float | None = None) -> dict:
    return {**_network_kwargs(args, neuron_dropout), "verbose": parse_flag(args.get("verbose", False), "verbose")}


def create_network(
    multiplier: float,
    network_dim: int | None,
    network_alpha: float | None,
    text_encoders,
    transformer: nn.Module,
    neuron_dropout: float | None = None,
    adapter: AdapterType | None = None,
    **network_args,
) -> SD3LoRANetwork:
    """sd-scripts' entry point: text_encoders = [CLIP-L, CLIP-G, T5] (any may be None); network_args as strings or
    values (see the module docstring); `adapter`: the module type (LoRA by default)."""
    adapter, args = typed_args(adapter, network_args, _check_args)
    dims = sd3_module_dims(text_encoders, transformer, network_dim or 4, args)
    alphas = dict.fromkeys(dims, network_alpha)
    return SD3LoRANetwork(
        text_encoders, transformer, dims, alphas, multiplier=multiplier, adapter=adapter, **_kwargs(args, neuron_dropout)
    )


def create_network_from_weights(
    multiplier: float,
    state_dict: dict[str, torch.Tensor],
    text_encoders,
    transformer,
    adapter: AdapterType | None = None,
    **network_args,
) -> SD3LoRANetwork:
    """A network shaped like the file (kohya SD3 or diffusers/PEFT layout); loads nothing yet. With split_qkv, a
    block-diagonal fused qkv adapter of rank 3r gives parts of rank r, any other of rank R parts of rank R."""
    adapter, args = typed_args(adapter, network_args, _check_args)
    kwargs = _kwargs(args)
    if not adapter.is_lora:
        dims, alphas = adapter.dims_of_file(state_dict)
    else:
        if is_peft_layout(state_dict):
            state_dict = sd3_peft_to_kohya(state_dict, transformer)
        fused = split_targets(transformer, _candidates(transformer)) if kwargs["split_qkv"] else {}
        dims, alphas = split_aware_dims(state_dict, fused)
    return SD3LoRANetwork(text_encoders, transformer, dims, alphas, multiplier=multiplier, adapter=adapter, **kwargs)


def merge_into_transformer(state_dict: dict[str, torch.Tensor], ratio: float, transformer: nn.Module, text_encoders=None) -> int:
    """Add ratio x each adapter's weight change to the weights it adapts (kohya SD3 or diffusers/PEFT file); returns
    the number of adapters merged. Keys matching no module of these models are an error."""
    typed = merge_typed_file(state_dict, ratio, text_encoders, transformer)
    if typed is not None:
        return typed
    network = create_network_from_weights(1.0, state_dict, text_encoders, transformer)
    dims, _ = dims_from_weights(network.to_kohya(state_dict))
    missing = sorted(set(dims) - {m.lora_name for m in network.loras})
    if missing:
        raise ValueError(
            f"{len(missing)} LoRA modules match nothing in this model, e.g. {missing[0]}; is it a LoRA for another model?"
        )
    network.load_weights(state_dict)
    with torch.no_grad():
        for m in network.loras:
            add_delta(m, m.delta_weight() * ratio)
    return len(network.loras)
