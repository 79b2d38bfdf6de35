"""LoKr (low-rank Kronecker product, LyCORIS' `lokr`) for every kiln family: `--network_module networks.lokr`.

Maths. A wrapped weight W of shape (out, in, *k) (a Linear: k = (); a fused FLUX/SD3 qkv: out = the Linears' outs
added up, rows in the file's order) is changed by

    dW = kron(w1, w2) * scale,      w1: (a, c),  w2: (b, d, *k),  out = a * b,  in = c * d

(w1 broadcast over the kernel axes), where (a, b) = factorization(out, factor) and (c, d) = factorization(in,
factor) (LyCORIS' lycoris.functional.general.factorization: with a `factor` that divides the size, (factor,
size / factor) smaller first; otherwise the divisor pair nearest the square root whose smaller side is at most
`factor`; factor -1 = no bound; `unbalanced_factorization` swaps a and b). Each half is a full matrix or low-rank:

    w1 = lokr_w1 (a, c)                 or  lokr_w1_a (a, r) @ lokr_w1_b (r, c)   (decompose_both, when r < max(a, c) / 2)
    w2 = lokr_w2 (b, d, *k)             when full_matrix or r >= max(b, d) / 2
       = lokr_w2_a (b, r) @ lokr_w2_b (r, d * prod(k))   reshaped to (b, d, *k)
       = einsum("i j k l, j q, i p -> p q k l", lokr_t2 (r, r, *k), lokr_w2_b (r, d), lokr_w2_a (r, b))
                                        (use_tucker, convolutions larger than 1x1)

    scale = alpha / r when a half is low-rank, 1 when both are full matrices (then `alpha` holds r, as LyCORIS saves).

That is the contract of the consumers: ComfyUI (comfy/weight_adapter/lokr.py: alpha / dim with dim = lokr_w1_b's or
lokr_w2_b's row count, 1 without a low-rank half), A1111/Forge and the lycoris-lora package (its functional
`diff_weight` with gamma = alpha, which divides by the rank itself; its Tucker path reads the rank off lokr_w2_a's
second axis, which is b, not r). Keys `<name>.lokr_w1` (or `.lokr_w1_a`, `.lokr_w1_b`), `.lokr_w2` (or `.lokr_w2_a`,
`.lokr_w2_b`, `.lokr_t2`), `.alpha`, with kiln's (kohya's) module names `lora_unet_...`, `lora_te_...` / `lora_te1_...`.

Initialisation as LyCORIS: w1 (or w1_a and w1_b), w2_a and t2 Kaiming-uniform, lokr_w2 or lokr_w2_b zero, so that the
change starts at exactly zero.

network_args of the type: factor (default -1), decompose_both, full_matrix (both halves full: no rank, scale 1;
excludes decompose_both), use_tucker, unbalanced_factorization. The family's own (conv_dim / conv_alpha for SD, dropouts,
train_blocks, ...) are the family's. LoRA+ does not apply (a Kronecker product has no output-side factor), so the
loraplus_* args are refused. Layout of this file: factorization and the layout rule (`kron_shape`), `LoKrModule` (the
weight maths; networks.adapter.AdapterModule does the rest), reading a file's layout, the `LOKR` type and
sd-scripts' entry points.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from networks.adapter import AdapterModule, AdapterType, parse_flag, typed_entry_points
from networks.loha import check_layout_args, check_tucker_used, has_kernel, tucker_rebuild, weight_shape

KILN_NETWORK = True  # kiln's network-module interface (not sd-scripts'): see library/method_adapter.py

W2_MODES = ("full", "low_rank", "tucker")


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """(m, n) with m * n = dimension and m <= n, as LyCORIS splits a LoKr dimension: (factor, dimension / factor) when
    factor > 0 divides it; otherwise divisors are taken in increasing order while they are at most `factor` (no bound
    for -1), stopping at the first one whose square reaches `dimension`, and the last one taken gives the pair."""
    if factor > 0 and dimension % factor == 0:
        m, n = factor, dimension // factor
        return (m, n) if m <= n else (n, m)
    bound = dimension if factor < 0 else factor
    m = 1
    for d in range(2, dimension + 1):
        if dimension % d:
            continue
        if d > bound:
            break
        m = d
        if d * d >= dimension:
            break
    n = dimension // m
    return (m, n) if m <= n else (n, m)


@dataclass(frozen=True)
class KronShape:
    """The layout of one LoKr module: rank r (a full-matrix module's is only recorded in `alpha`), w1's shape (a, c),
    whether w1 is w1_a @ w1_b, and how w2 is stored ("full", "low_rank" or "tucker")."""

    rank: int
    w1: tuple[int, int]
    w1_low_rank: bool
    w2: str

    def describe(self) -> str:
        w1 = f"lokr_w1 {self.w1[0]}x{self.w1[1]}" + (" as lokr_w1_a @ lokr_w1_b" if self.w1_low_rank else "")
        w2 = {"full": "a full lokr_w2", "low_rank": "lokr_w2_a @ lokr_w2_b", "tucker": "a Tucker lokr_w2 (lokr_t2)"}
        return f"{w1} and {w2[self.w2]} (rank {self.rank})"


def kron_shape(out_dim: int, in_dim: int, kernel: tuple[int, ...], rank: int, options: dict) -> KronShape:
    """LyCORIS' layout of a LoKr module of `rank` on a weight (out_dim, in_dim, *kernel) with the type's options."""
    factor = options.get("factor", -1)
    a, b = factorization(out_dim, factor)
    if options.get("unbalanced_factorization"):
        a, b = b, a
    c, d = factorization(in_dim, factor)
    full = bool(options.get("full_matrix"))
    w1_low_rank = bool(options.get("decompose_both")) and not full and rank < max(a, c) / 2
    if full or rank >= max(b, d) / 2:
        w2 = "full"
    elif options.get("use_tucker") and has_kernel(kernel):
        w2 = "tucker"
    else:
        w2 = "low_rank"
    return KronShape(rank, (a, c), w1_low_rank, w2)


class LoKrModule(AdapterModule):
    """The LoKr adapter of one module (or of several Linears a file fuses): see the module docstring."""

    def __init__(
        self,
        name: str,
        org_modules: list[nn.Module],
        shape: KronShape,
        alpha: float | None,
        multiplier: float = 1.0,
        dropout: float | None = None,
        rank_dropout: float | None = None,
        module_dropout: float | None = None,
        row_order: torch.Tensor | None = None,
    ) -> None:
        super().__init__(name, org_modules, multiplier, dropout, rank_dropout, module_dropout, row_order)
        out_dim, in_dim, kernel = weight_shape(org_modules)
        (a, c), rank = shape.w1, int(shape.rank)
        if a < 1 or c < 1 or out_dim % a or in_dim % c:
            raise ValueError(f"{name}: a LoKr w1 of {a}x{c} does not divide the weight's {out_dim}x{in_dim}")
        if shape.w2 not in W2_MODES:
            raise ValueError(f"{name}: unknown LoKr w2 layout {shape.w2!r} (one of {', '.join(W2_MODES)})")
        if shape.w2 == "tucker" and not has_kernel(kernel):
            raise ValueError(f"{name}: a Tucker LoKr (lokr_t2) needs a convolution larger than 1x1")
        if rank < 1:
            raise ValueError(f"{name}: a LoKr rank must be at least 1, got {shape.rank}")
        b, d = out_dim // a, in_dim // c
        self.rank = rank
        self.w1_low_rank = shape.w1_low_rank
        self.w2_mode = shape.w2
        self.shape = (out_dim, in_dim, *kernel)
        self.w2_shape = (b, d, *kernel)
        if self.w1_low_rank:
            self.lokr_w1_a = nn.Parameter(torch.empty(a, rank))
            self.lokr_w1_b = nn.Parameter(torch.empty(rank, c))
            nn.init.kaiming_uniform_(self.lokr_w1_a, a=math.sqrt(5))
            nn.init.kaiming_uniform_(self.lokr_w1_b, a=math.sqrt(5))
        else:
            self.lokr_w1 = nn.Parameter(torch.empty(a, c))
            nn.init.kaiming_uniform_(self.lokr_w1, a=math.sqrt(5))
        if self.w2_mode == "full":
            self.lokr_w2 = nn.Parameter(torch.zeros(b, d, *kernel))  # the change starts at zero
        else:
            if self.w2_mode == "tucker":
                self.lokr_t2 = nn.Parameter(torch.empty(rank, rank, *kernel))
                self.lokr_w2_a = nn.Parameter(torch.empty(rank, b))
                self.lokr_w2_b = nn.Parameter(torch.zeros(rank, d))
                nn.init.kaiming_uniform_(self.lokr_t2, a=math.sqrt(5))
            else:
                self.lokr_w2_a = nn.Parameter(torch.empty(b, rank))
                self.lokr_w2_b = nn.Parameter(torch.zeros(rank, d * math.prod(kernel)))
            nn.init.kaiming_uniform_(self.lokr_w2_a, a=math.sqrt(5))
        self.low_rank = self.w1_low_rank or self.w2_mode != "full"
        if not self.low_rank or alpha is None or float(alpha) == 0:
            alpha = float(rank)  # full matrices take no scale; alpha records the rank (as LyCORIS writes it)
        self.register_buffer("alpha", torch.tensor(float(alpha)))
        self.alpha_loaded()

    def _w1(self) -> torch.Tensor:
        return self.lokr_w1_a @ self.lokr_w1_b if self.w1_low_rank else self.lokr_w1

    def _w2(self) -> torch.Tensor:
        if self.w2_mode == "full":
            return self.lokr_w2
        if self.w2_mode == "tucker":
            return tucker_rebuild(self.lokr_t2, self.lokr_w2_a, self.lokr_w2_b)
        return (self.lokr_w2_a @ self.lokr_w2_b).reshape(self.w2_shape)

    def delta_weight(self) -> torch.Tensor:
        """kron(w1, w2) * scale, shaped like the weight (w1 broadcast over a convolution's kernel axes)."""
        w1, w2 = self._w1(), self._w2()
        w1 = w1.reshape(*w1.shape, *[1] * (w2.dim() - 2))
        delta = torch.kron(w1.contiguous(), w2.contiguous())  # kron views its operands
        return delta * self.scale if self.scale != 1 else delta

    def norm_factors(self) -> tuple[list[torch.Tensor], float]:
        """Each stored factor appears once in the product: all scaled by s ** (1 / count)."""
        params = list(self.parameters())
        return params, 1.0 / len(params)

    def alpha_loaded(self) -> None:
        self.scale = self.alpha.item() / self.rank if self.low_rank else 1.0


# ---------------------------------------------------------------------------------------------------------------------
# The adapter type and sd-scripts' entry points
# ---------------------------------------------------------------------------------------------------------------------

LAYOUT_ARGS = frozenset({"factor", "decompose_both", "full_matrix", "use_tucker", "unbalanced_factorization"})


def _parse_options(args: dict) -> dict:
    raw = args.get("factor", -1)
    try:
        factor = int(str(raw).strip())
    except ValueError:
        raise ValueError(f"network_args factor must be an integer (-1: no bound), got {raw!r}") from None
    if factor == 0 or factor < -1:
        raise ValueError(f"network_args factor must be -1 (no bound) or at least 1, got {factor}")
    options = {"factor": factor, "given": frozenset(args)}
    for key in ("decompose_both", "full_matrix", "use_tucker", "unbalanced_factorization"):
        options[key] = parse_flag(args.get(key, False), key)
    if options["decompose_both"] and options["full_matrix"]:
        raise ValueError("network_args decompose_both and full_matrix exclude each other (full_matrix keeps both halves full)")
    return options


def _make(name: str, org_modules: list[nn.Module], dim, alpha: float | None, common: dict, options: dict) -> LoKrModule:
    """The module of one target: `dim` is a rank (network_dim / conv_dim) or a KronShape read from a file."""
    out_dim, in_dim, kernel = weight_shape(org_modules)
    if isinstance(dim, KronShape):
        wanted = kron_shape(out_dim, in_dim, kernel, dim.rank, options)
        check_layout_args(name, options, wanted, dim, KronShape.describe)
        shape = dim
    else:
        shape = kron_shape(out_dim, in_dim, kernel, int(dim), options)
    return LoKrModule(name, org_modules, shape, alpha, **common)


def lokr_file_dims(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, KronShape], dict[str, float | None]]:
    """(name -> KronShape, name -> alpha) of a LoKr file (alpha None where the file has none: scale 1, as ComfyUI). A
    full-matrix module's rank is its alpha (LyCORIS writes the rank there)."""
    dims, alphas = {}, {}
    names = sorted({k.rsplit(".", 1)[0] for k in state_dict if k.endswith((".lokr_w1", ".lokr_w1_a"))})
    for name in names:
        get = lambda suffix, name=name: state_dict.get(f"{name}.{suffix}")  # noqa: E731
        ranks = set()
        if get("lokr_w1") is not None:
            w1, w1_low_rank = tuple(get("lokr_w1").shape), False
        elif get("lokr_w1_b") is not None:
            w1, w1_low_rank = (get("lokr_w1_a").shape[0], get("lokr_w1_b").shape[1]), True
            ranks.add(get("lokr_w1_b").shape[0])
        else:
            raise ValueError(f"{name}: lokr_w1_a without lokr_w1_b")
        if get("lokr_w2") is not None:
            w2 = "full"
        elif get("lokr_w2_a") is not None and get("lokr_w2_b") is not None:
            w2 = "tucker" if get("lokr_t2") is not None else "low_rank"
            ranks.add(get("lokr_w2_b").shape[0])
        else:
            raise ValueError(f"{name}: a LoKr module needs lokr_w2 or lokr_w2_a and lokr_w2_b")
        if len(ranks) > 1:
            raise ValueError(f"{name}: lokr_w1_b and lokr_w2_b have different ranks {sorted(ranks)}")
        alpha = get("alpha")
        alphas[name] = None if alpha is None else float(alpha)
        rank = ranks.pop() if ranks else max(1, round(alphas[name] or 1))
        dims[name] = KronShape(int(rank), (int(w1[0]), int(w1[1])), w1_low_rank, w2)
    if not dims:
        raise ValueError("the weights hold no LoKr modules (no .lokr_w1 / .lokr_w1_a keys); is it another adapter type's file?")
    return dims, alphas


LOKR = AdapterType(
    "LoKr",
    "networks.lokr",
    _make,
    prefix="lora",
    text_encoders=True,
    own_args=LAYOUT_ARGS,
    parse_options=_parse_options,
    read_dims=lokr_file_dims,
    boosts=False,
    keys=("lokr_",),
)


create_network, create_network_from_weights = typed_entry_points(LOKR, check_tucker_used)
