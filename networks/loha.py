"""LoHa (low-rank Hadamard product, LyCORIS' `loha`) for every kiln family: `--network_module networks.loha`.

Maths. For a wrapped weight W of shape (out, in, *k) (a Linear: k = (); a fused FLUX/SD3 qkv: out = the Linears' outs
added up, rows in the file's order) with rank r:

    dW = ((w1_a @ w1_b) * (w2_a @ w2_b)) * alpha / r            (elementwise product, reshaped to W's shape)

with `hada_w1_a`, `hada_w2_a` (out, r) and `hada_w1_b`, `hada_w2_b` (r, in * prod(k)). Tucker form (network_arg
use_tucker, for convolutions whose kernel is larger than 1x1): `hada_t1`, `hada_t2` (r, r, *k), `hada_w*_a` (r, out),
`hada_w*_b` (r, in), each half rebuilt as einsum("i j k l, j q, i p -> p q k l", t, w_b, w_a). The scale is
alpha / r with r = hada_w1_b.shape[0], whatever the layout. This is what ComfyUI (comfy/weight_adapter/loha.py),
A1111/Forge and the lycoris-lora package (lycoris.functional.loha.diff_weight with gamma = alpha / r) compute from the
keys `<name>.hada_w1_a`, `.hada_w1_b`, `.hada_w2_a`, `.hada_w2_b` (`.hada_t1`, `.hada_t2`) and `.alpha`, with kiln's
(kohya's) module names `lora_unet_...`, `lora_te_...` / `lora_te1_...`.

Initialisation as LyCORIS: w1_a ~ N(0, 0.1), w1_b and w2_b ~ N(0, 1), t1 and t2 ~ N(0, 0.1), w2_a = 0, so that the
change starts at exactly zero. alpha None or 0 means alpha = r (scale 1).

Layout of this file: the shared helpers the LoKr module (networks.lokr) uses too (argument parsing, the wrapped
weight's shape, the Tucker rebuild, the check that use_tucker has a convolution to act on), `LoHaModule` (the weight
maths; networks.adapter.AdapterModule does the wrapping, fused splitting, row order, dropouts, forward, merge and
multiplier), the `LOHA` adapter type and sd-scripts' entry points. The family (networks.lora for SD 1.x/2.x and SDXL,
networks.lora_flux, networks.lora_sd3) picks the targets and names and checks its own network_args (conv_dim /
conv_alpha for SD, train_blocks for FLUX, dropouts, ...); LoHa's own network_arg is `use_tucker`. LoRA+ (loraplus_*
args) gives the output-side factors hada_w1_a and hada_w2_a the higher learning rate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from networks.adapter import AdapterModule, AdapterType, parse_flag, typed_entry_points

KILN_NETWORK = True  # kiln's network-module interface (not sd-scripts'): see library/method_adapter.py


# ---------------------------------------------------------------------------------------------------------------------
# Shared with networks.lokr
# ---------------------------------------------------------------------------------------------------------------------


def weight_shape(org_modules: list[nn.Module]) -> tuple[int, int, tuple[int, ...]]:
    """(out, in, kernel) of the weight an adapter changes: the (fused) rows of all wrapped modules, the input width per
    group, and a convolution's kernel size (() for a Linear)."""
    first = org_modules[0]
    shape = tuple(first.weight.shape)
    return sum(m.weight.shape[0] for m in org_modules), shape[1], tuple(shape[2:])


def has_kernel(kernel: tuple[int, ...]) -> bool:
    """Whether a Tucker core has anything to hold: a convolution kernel larger than 1x1."""
    return any(k != 1 for k in kernel)


def tucker_rebuild(core: torch.Tensor, w_a: torch.Tensor, w_b: torch.Tensor) -> torch.Tensor:
    """LyCORIS' Tucker rebuild: core (r, r, *k), w_a (r, out), w_b (r, in) -> (out, in, *k), i.e.
    sum_ij core[i, j] * w_a[i, p] * w_b[j, q]."""
    return torch.einsum("i j ..., i p, j q -> p q ...", core, w_a, w_b)


def check_tucker_used(network: nn.Module, module: str) -> None:
    """use_tucker=True on a network without any convolution larger than 1x1 is an error (the argument would do
    nothing): FLUX has none, SD3 only the patch embedder (emb_dims), SD U-Nets only with conv_dim."""
    if not network.adapter.options.get("use_tucker"):
        return
    if not any(has_kernel(weight_shape(m.org_modules)[2]) for m in network.loras):
        raise ValueError(
            f"network_args use_tucker ({module}): Tucker decomposition applies to convolutions with kernels larger than "
            "1x1, and this network adapts none (SD 1.x/2.x, SDXL: add conv_dim=...; SD3: only the patch embedder, "
            "through emb_dims; FLUX has none)"
        )


def check_layout_args(name: str, options: dict, wanted, found, describe) -> None:
    """A network built from a file takes the file's layout; network_args that the user gave (options["given"]) and
    that ask for another layout are an error, not ignored."""
    given = sorted(options.get("given", ()))
    if given and wanted != found:
        raise ValueError(
            f"{name}: network_args {', '.join(given)} ask for {describe(wanted)}, but the file holds {describe(found)}; "
            "leave them out to take the file's layout"
        )


# ---------------------------------------------------------------------------------------------------------------------
# LoHa
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoHaShape:
    """The layout of one LoHa module: rank r and whether its halves are Tucker-decomposed."""

    rank: int
    tucker: bool = False


class LoHaModule(AdapterModule):
    """The LoHa adapter of one module (or of several Linears a file fuses): see the module docstring."""

    def __init__(
        self,
        name: str,
        org_modules: list[nn.Module],
        shape: LoHaShape,
        alpha: float | None,
        multiplier: float = 1.0,
        dropout: float | None = None,
        rank_dropout: float | None = None,
        module_dropout: float | None = None,
        row_order: torch.Tensor | None = None,
    ) -> None:
        super().__init__(name, org_modules, multiplier, dropout, rank_dropout, module_dropout, row_order)
        out_dim, in_dim, kernel = weight_shape(org_modules)
        rank = int(shape.rank)
        if rank < 1:
            raise ValueError(f"{name}: a LoHa rank must be at least 1, got {shape.rank}")
        if shape.tucker and not has_kernel(kernel):
            raise ValueError(f"{name}: a Tucker LoHa (hada_t1/hada_t2) needs a convolution larger than 1x1")
        self.rank = rank
        self.tucker = shape.tucker
        self.shape = (out_dim, in_dim, *kernel)
        if self.tucker:
            self.hada_t1 = nn.Parameter(torch.empty(rank, rank, *kernel))
            self.hada_w1_a = nn.Parameter(torch.empty(rank, out_dim))
            self.hada_w1_b = nn.Parameter(torch.empty(rank, in_dim))
            self.hada_t2 = nn.Parameter(torch.empty(rank, rank, *kernel))
            self.hada_w2_a = nn.Parameter(torch.empty(rank, out_dim))
            self.hada_w2_b = nn.Parameter(torch.empty(rank, in_dim))
            nn.init.normal_(self.hada_t1, std=0.1)
            nn.init.normal_(self.hada_t2, std=0.1)
        else:
            flat_in = in_dim * math.prod(kernel)
            self.hada_w1_a = nn.Parameter(torch.empty(out_dim, rank))
            self.hada_w1_b = nn.Parameter(torch.empty(rank, flat_in))
            self.hada_w2_a = nn.Parameter(torch.empty(out_dim, rank))
            self.hada_w2_b = nn.Parameter(torch.empty(rank, flat_in))
        nn.init.normal_(self.hada_w1_a, std=0.1)
        nn.init.normal_(self.hada_w1_b, std=1.0)
        nn.init.zeros_(self.hada_w2_a)  # the change starts at zero
        nn.init.normal_(self.hada_w2_b, std=1.0)
        alpha = float(rank) if alpha is None or float(alpha) == 0 else float(alpha)
        self.register_buffer("alpha", torch.tensor(alpha))
        self.scale = alpha / rank

    def delta_weight(self) -> torch.Tensor:
        """(w1_a @ w1_b) * (w2_a @ w2_b) * alpha / r (Tucker: each half rebuilt from its core), shaped like the weight."""
        if self.tucker:
            half1 = tucker_rebuild(self.hada_t1, self.hada_w1_a, self.hada_w1_b)
            half2 = tucker_rebuild(self.hada_t2, self.hada_w2_a, self.hada_w2_b)
        else:
            half1 = self.hada_w1_a @ self.hada_w1_b
            half2 = self.hada_w2_a @ self.hada_w2_b
        return (half1 * half2 * self.scale).reshape(self.shape)

    def norm_factors(self) -> tuple[list[torch.Tensor], float]:
        """Each factor appears once in the product (4 of them, 6 with Tucker cores): all scaled by s ** (1 / count)."""
        params = list(self.parameters())
        return params, 1.0 / len(params)

    def boosted(self, parameter_name: str) -> bool:
        """LoRA+: the output-side factors hada_w1_a and hada_w2_a."""
        return parameter_name in ("hada_w1_a", "hada_w2_a")

    def alpha_loaded(self) -> None:
        self.scale = self.alpha.item() / self.rank


def _make(name: str, org_modules: list[nn.Module], dim, alpha: float | None, common: dict, options: dict) -> LoHaModule:
    """The module of one target: `dim` is a rank (network_dim / conv_dim) or a LoHaShape read from a file."""
    kernel = weight_shape(org_modules)[2]
    if isinstance(dim, LoHaShape):
        wanted = bool(options.get("use_tucker")) and has_kernel(kernel)
        check_layout_args(name, options, wanted, dim.tucker, lambda t: "a Tucker LoHa" if t else "a LoHa without Tucker")
        shape = dim
    else:
        shape = LoHaShape(int(dim), bool(options.get("use_tucker")) and has_kernel(kernel))
    return LoHaModule(name, org_modules, shape, alpha, **common)


def _parse_options(args: dict) -> dict:
    return {"use_tucker": parse_flag(args.get("use_tucker", False), "use_tucker"), "given": frozenset(args)}


def loha_file_dims(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, LoHaShape], dict[str, float | None]]:
    """(name -> LoHaShape, name -> alpha) of a LoHa file (alpha None where the file has none: scale 1, as ComfyUI)."""
    dims, alphas = {}, {}
    for key, value in state_dict.items():
        if not key.endswith(".hada_w1_b"):
            continue
        name = key[: -len(".hada_w1_b")]
        dims[name] = LoHaShape(value.shape[0], name + ".hada_t1" in state_dict)
        alpha = state_dict.get(name + ".alpha")
        alphas[name] = None if alpha is None else float(alpha)
    if not dims:
        raise ValueError("the weights hold no LoHa modules (no .hada_w1_b keys); is it another adapter type's file?")
    return dims, alphas


LOHA = AdapterType(
    "LoHa",
    "networks.loha",
    _make,
    prefix="lora",
    text_encoders=True,
    own_args=frozenset({"use_tucker"}),
    parse_options=_parse_options,
    read_dims=loha_file_dims,
    boosts=True,
    keys=("hada_",),
)


create_network, create_network_from_weights = typed_entry_points(LOHA, check_tucker_used)
