"""What every adapter type (LoRA, LoHa, LoKr, OFT) shares: wrapping frozen modules, the multiplier, the dropouts, the
per-input cache of a fused adapter, merging and the max-norm hook. An adapter type adds only its own weight maths.

An `AdapterModule` wraps one frozen `Linear`/`Conv2d`, or several Linears that see the same input and that a model
file fuses into one weight (FLUX's qkv and single-block linear1, SD3's qkv): `splits` are their output widths, in the
file's row order. `apply_to()` routes each wrapped module's forward through `_part_forward(i, x)`.

Types that materialise their weight change (LoHa, LoKr) only implement `delta_weight()` (and `norm_factors()`); the
default forward adds `x` through that change to the wrapped output. LoRA keeps its low-rank path, OFT rotates the
frozen weight instead of adding to it (`merged_weight`).

`AdapterType` is how a network module tells the family networks (networks.lora for SD 1.x/2.x and SDXL,
networks.lora_flux, networks.lora_sd3) which modules to build: the families keep the targets, the names and the
network_args of their model, the type keeps its maths.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from torch import nn


def parse_flag(value, key: str) -> bool:
    """A network_arg switch given as a string ("True", "false", "1", ...) or a value; anything else is an error
    (sd-scripts reads "False" as true)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no", "none", ""):
        return False
    raise ValueError(f"network_args {key} must be True or False, got {value!r}")


def frozen_weight(module: nn.Module, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight of a wrapped module in `dtype` (an fp8-stored Linear's dequantised weight)."""
    dequantized = getattr(module, "dequantized_weight", None)
    return dequantized(dtype) if dequantized is not None else module.weight.to(dtype)


def add_scaled(out: torch.Tensor, y: torch.Tensor, scale: float) -> torch.Tensor:
    """out + y * scale as one kernel (torch.add's alpha), y first in out's dtype: an adapter's output joins the
    wrapped layer's without a separate multiply (one kernel less per adapter in forward, on the GPU's hot path)."""
    return torch.add(out, y if y.dtype == out.dtype else y.to(out.dtype), alpha=scale)


def apply_weight(module: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`module`'s operation (linear, or conv2d with its stride, padding, dilation and groups) with another weight."""
    if isinstance(module, nn.Conv2d):
        return nn.functional.conv2d(x, weight, bias, module.stride, module.padding, module.dilation, module.groups)
    return nn.functional.linear(x, weight, bias)


class AdapterModule(nn.Module):
    """The adapter of one module, or of several Linears a model file fuses into one weight (see the module docstring).

    multiplier: the adapter's strength (0 = off). dropout: on the adapter's output (neuron dropout), rank_dropout and
    module_dropout (skip the adapter for a forward) while training; each type says what a rank is."""

    def __init__(
        self,
        name: str,
        org_modules: list[nn.Module],
        multiplier: float = 1.0,
        dropout: float | None = None,
        rank_dropout: float | None = None,
        module_dropout: float | None = None,
        row_order: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if len(org_modules) > 1 and len({m.in_features for m in org_modules}) != 1:
            raise ValueError(f"{name}: fused Linears must share their input width")
        self.lora_name = name
        self.multiplier = multiplier
        self.dropout = dropout
        self.rank_dropout = rank_dropout
        self.module_dropout = module_dropout
        self._org = list(org_modules)  # a list: not submodules, so not in this module's state dict
        self.splits = [m.weight.shape[0] for m in org_modules]
        if row_order is not None and sorted(row_order.tolist()) != list(range(sum(self.splits))):
            raise ValueError(f"{name}: row_order is not a permutation of the {sum(self.splits)} rows")
        self.row_order = None if row_order is None else row_order.clone()  # file row i = wrapped row row_order[i]
        self._org_forwards: list[Callable] | None = None
        self._org_forward: Callable | None = None  # the first wrapped forward; set while applied
        self._cache: tuple | None = None  # (input tensor, shared result, parts served)

    @property
    def org_module(self) -> nn.Module:
        return self._org[0]

    @property
    def org_modules(self) -> list[nn.Module]:
        return self._org

    @property
    def drops(self) -> bool:
        """Whether a dropout applies to this forward."""
        return self.training and bool(self.dropout or self.rank_dropout or self.module_dropout)

    def apply_to(self) -> None:
        """Route the wrapped modules' forwards through this adapter (nn.Module.apply keeps its own meaning)."""
        if self._org_forwards is not None:
            return
        self._org_forwards = [m.forward for m in self._org]
        self._org_forward = self._org_forwards[0]
        if len(self._org) == 1:
            self._org[0].forward = self.forward
        else:
            for i, m in enumerate(self._org):
                m.forward = lambda x, i=i: self._part_forward(i, x)

    def restore(self) -> None:
        if self._org_forwards is not None:
            for m, f in zip(self._org, self._org_forwards):
                m.forward = f
            self._org_forwards = None
            self._org_forward = None
            self._cache = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The wrapped module's output with the adapter; several wrapped Linears: their outputs concatenated (the
        fused layer's output)."""
        if len(self._org) == 1:
            return self._part_forward(0, x)
        return torch.cat([self._part_forward(i, x) for i in range(len(self._org))], dim=-1)

    def _shared(self, i: int, x: torch.Tensor, compute: Callable[[torch.Tensor], object]):
        """compute(x), computed once for all wrapped modules that see the same input tensor `x` (one per part)."""
        if len(self._org) == 1:
            return compute(x)
        c = self._cache
        if c is not None and c[0] is x and i not in c[2]:
            c[2].add(i)
            if len(c[2]) == len(self._org):
                self._cache = None  # every part has used it: drop the references
            return c[1]
        res = compute(x)
        self._cache = (x, res, {i})
        return res

    def to_file_rows(self, weight: torch.Tensor) -> torch.Tensor:
        """The wrapped modules' rows (concatenated) in the file's order."""
        return weight if self.row_order is None else weight[self.row_order.to(weight.device)]

    def to_module_rows(self, weight: torch.Tensor) -> torch.Tensor:
        """Rows in the file's order -> the wrapped modules' order."""
        return weight if self.row_order is None else weight[torch.argsort(self.row_order).to(weight.device)]

    # -- the default path: a materialised weight change --------------------------------------------------------------

    def delta_weight(self) -> torch.Tensor:
        """The weight change at strength 1, in the parameters' dtype, shaped like the (fused) weight, rows in the
        file's order."""
        raise NotImplementedError(f"{type(self).__name__} has no weight change")

    def _training_delta(self) -> torch.Tensor:
        """delta_weight(), with rank dropout while training: each output row of the change dropped with probability
        p per forward, the others scaled by 1 / (1 - p)."""
        delta = self.delta_weight()
        if self.drops and self.rank_dropout:
            keep = (torch.rand(delta.shape[0], device=delta.device) > self.rank_dropout).to(delta.dtype)
            delta = delta * keep.view(-1, *([1] * (delta.dim() - 1))) * (1.0 / (1.0 - self.rank_dropout))
        return delta

    def _delta_outputs(self, x: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
        """Each wrapped module's share of the adapter's output for input x (None: module dropout skips it)."""
        if self.drops and self.module_dropout and torch.rand(()) < self.module_dropout:
            return None
        delta = self.to_module_rows(self._training_delta())
        if x.dtype != delta.dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(delta.dtype)
        y = apply_weight(self._org[0], x, delta)
        if self.drops and self.dropout:
            y = nn.functional.dropout(y, p=self.dropout)
        return y.split(self.splits, dim=-1) if len(self._org) > 1 else (y,)

    def _part_forward(self, i: int, x: torch.Tensor) -> torch.Tensor:
        out = self._org_forwards[i](x)
        if self.multiplier == 0:
            return out
        parts = self._shared(i, x, self._delta_outputs)
        return out if parts is None else add_scaled(out, parts[i], self.multiplier)

    # -- merging and max-norm ------------------------------------------------------------------------------------------

    def merge_into(self, weight: torch.Tensor, ratio: float) -> None:
        """Merge the adapter at strength `ratio` into `weight` in place (the fused weight's shape, rows in the file's
        order, any floating dtype: the change is added in that dtype)."""
        weight += (self.delta_weight().float().reshape(weight.shape) * ratio).to(weight.dtype)

    def merged_weight(self, weight: torch.Tensor, ratio: float) -> torch.Tensor:
        """The fused weight (float32, the file's rows) with this adapter merged at strength `ratio`."""
        return weight + self.delta_weight().float().reshape(weight.shape) * ratio

    def merge_to(self, ratio: float = 1.0) -> None:
        """Merge the adapter into the wrapped modules' weights (each Linear of a fused adapter gets its rows)."""
        with torch.no_grad():
            weight = self.to_file_rows(torch.cat([frozen_weight(m) for m in self._org]))
            merged = self.to_module_rows(self.merged_weight(weight, ratio))
            for m, rows in zip(self._org, merged.split(self.splits)):
                m.weight.copy_(rows.reshape(m.weight.shape).to(m.weight.dtype))

    def norm_factors(self) -> tuple[list[torch.Tensor], float]:
        """(parameters, exponent): multiplying each of them by s ** exponent scales delta_weight() by s (max-norm)."""
        raise NotImplementedError(f"{type(self).__name__} has no weight-change norm to limit")

    def delta_norm_sq(self) -> torch.Tensor:
        """||delta_weight()||_F^2 as a 0-dim tensor on the adapter's device (not read)."""
        return self.delta_weight().float().square().sum()

    def boosted(self, parameter_name: str) -> bool:
        """Whether LoRA+ gives this parameter (an output-side factor) the higher learning rate."""
        return False

    def alpha_loaded(self) -> None:
        """Called after load_state_dict: recompute what depends on the `alpha` buffer."""


@dataclass(frozen=True)
class AdapterType:
    """An adapter type as the family networks see it.

    make(name, org_modules, dim, alpha, common, options): the module of one target (`common`: multiplier, dropouts and
    row_order; `options`: the type's own). prefix: starts every module name (`lora` -> `lora_unet_...`,
    `lora_te1_...`). module: the network module, named in errors and metadata. text_encoders: whether it adapts them.
    parse_options(network_args) -> options: takes the type's own keys (`own_args`) out of the network_args; the
    family checks the rest. read_dims(state_dict) -> (name -> dim, name -> alpha) of a file; a dim may be anything
    `make` understands (e.g. a LoKr's factor shapes). boosts: whether LoRA+ applies (the type has output-side
    factors). keys: the tensor-name suffixes that make a file's module one of this type (a suffix ending in "." or
    "_" matches every suffix it starts). file_splits(tensors): the output widths of the wrapped Linears a file
    module's tensors imply (per-part layouts), else None."""

    name: str
    module: str
    make: Callable[..., AdapterModule]
    prefix: str = "lora"
    text_encoders: bool = True
    own_args: frozenset[str] = frozenset()
    parse_options: Callable[[dict], dict] | None = None
    read_dims: Callable[[dict], tuple[dict, dict]] | None = None
    boosts: bool = True
    options: dict = field(default_factory=dict)
    keys: tuple[str, ...] = ()
    file_splits: Callable[[dict], list[int] | None] | None = None

    @property
    def is_lora(self) -> bool:
        """Whether modules of this type are networks.lora's LoRA (whose families have extra layouts: split_qkv, PEFT)."""
        return self.prefix == "lora" and self.name == "LoRA"

    def build(self, name: str, org_modules: list[nn.Module], dim, alpha: float | None, common: dict) -> AdapterModule:
        return self.make(name, org_modules, dim, alpha, common, self.options)

    def unet_name(self, name: str, back: bool = False) -> str:
        """The module name of this type for a `lora_unet_...` name (`oft_unet_...` for OFT); back: the reverse."""
        old, new = ("lora", self.prefix) if not back else (self.prefix, "lora")
        return new + name[len(old) :] if name.startswith(old + "_") else name

    def with_options(self, network_args: dict) -> tuple[AdapterType, dict]:
        """(this type configured by its own network_args, the remaining network_args for the family)."""
        own = {k: network_args[k] for k in network_args if k in self.own_args}
        rest = {k: v for k, v in network_args.items() if k not in self.own_args}
        if not self.boosts:
            plus = sorted(k for k in rest if k.startswith("loraplus_") and rest[k] not in (None, "None"))
            if plus:
                raise ValueError(f"network_args {plus[0]}: LoRA+ does not apply to {self.name} ({self.module})")
        options = self.parse_options(own) if self.parse_options is not None else {}
        return replace(self, options=options), rest

    def dims_of_file(self, state_dict: dict[str, torch.Tensor]) -> tuple[dict, dict]:
        """(name -> dim, name -> alpha) of an adapter file of this type."""
        if self.read_dims is None:
            from networks.lora import dims_from_weights

            dims, alphas = dims_from_weights(state_dict)
            if not dims and state_dict:
                kinds = {m.kind.module for m in file_modules(state_dict).values()}
                raise ValueError(
                    f"the weights hold no LoRA modules (lora_down/lora_up) but {', '.join(sorted(kinds))} ones: use that --network_module"
                )
            return dims, alphas
        return self.read_dims(state_dict)


def family_network_module(denoiser: nn.Module):
    """The module that knows the targets, names and network_args of the model family `denoiser` belongs to:
    networks.lora_flux (FluxTransformer2DModel), networks.lora_sd3 (SD3Transformer2DModel) or networks.lora
    (SD 1.x/2.x and SDXL U-Nets)."""
    import importlib

    kind = type(denoiser).__name__
    name = {"FluxTransformer2DModel": "networks.lora_flux", "SD3Transformer2DModel": "networks.lora_sd3"}.get(
        kind, "networks.lora"
    )
    return importlib.import_module(name)


def create_typed_network(adapter: AdapterType, multiplier: float, network_dim, network_alpha, text_encoders, denoiser, **kwargs):
    """A network of `adapter` modules on any family's model: that family's create_network with the type."""
    return family_network_module(denoiser).create_network(
        multiplier, network_dim, network_alpha, text_encoders, denoiser, adapter=adapter, **kwargs
    )


def typed_entry_points(adapter: AdapterType, check: Callable[[nn.Module, str], None] | None = None):
    """(create_network, create_network_from_weights): sd-scripts' entry points of a network module whose type works
    on every family (create_typed_network / create_typed_network_from_weights), each network then passed to
    `check(network, module name)`."""

    def create_network(multiplier: float, network_dim, network_alpha, text_encoders, denoiser, neuron_dropout=None, **kwargs):
        """sd-scripts' entry point: a network of this type on any kiln family's model (its targets, names, network_args)."""
        network = create_typed_network(
            adapter, multiplier, network_dim, network_alpha, text_encoders, denoiser, neuron_dropout=neuron_dropout, **kwargs
        )
        if check is not None:
            check(network, adapter.module)
        return network

    def create_network_from_weights(multiplier: float, state_dict, text_encoders, denoiser, **kwargs):
        """A network of this type shaped like the file (its layout and alphas); loads nothing yet."""
        network = create_typed_network_from_weights(adapter, multiplier, state_dict, text_encoders, denoiser, **kwargs)
        if check is not None:
            check(network, adapter.module)
        return network

    return create_network, create_network_from_weights


def create_typed_network_from_weights(adapter: AdapterType, multiplier: float, state_dict, text_encoders, denoiser, **kwargs):
    """A network shaped like an adapter file of type `adapter`, on any family's model (loads nothing yet)."""
    module = family_network_module(denoiser)
    return module.create_network_from_weights(multiplier, state_dict, text_encoders, denoiser, adapter=adapter, **kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# Files: which type each module of an adapter file is, and the module rebuilt from its tensors (to merge it)
# ---------------------------------------------------------------------------------------------------------------------

TYPE_MODULES = ("networks.lora", "networks.oft", "networks.oft_flux", "networks.loha", "networks.lokr")
UNSUPPORTED_KINDS = {
    ".dora_scale": "DoRA",
    ".diff": "full-weight difference",
    ".w_norm": "GLoRA",
    ".a1.weight": "GLoRA",
    ".oft_diag": "LyCORIS diag-OFT",
}


def adapter_types() -> list[AdapterType]:
    """Every adapter type kiln reads (the types its network modules define)."""
    import importlib

    found = []
    for name in TYPE_MODULES:
        module = importlib.import_module(name)
        found += [v for v in vars(module).values() if isinstance(v, AdapterType) and v.module == name and v.keys]
    return found


def _claims(kind: AdapterType, suffix: str) -> bool:
    return any(suffix == k or (k[-1] in "._" and suffix.startswith(k)) for k in kind.keys)


@dataclass
class FileModule:
    """One module of an adapter file: its name there, its type and its tensors (suffix -> tensor, alpha included)."""

    name: str
    kind: AdapterType
    tensors: dict[str, torch.Tensor]
    _built: dict = field(default_factory=dict, repr=False)

    @property
    def target_name(self) -> str:
        """The name of the weight it adapts in kohya LoRA terms (`oft_unet_X` -> `lora_unet_X`)."""
        return self.kind.unet_name(self.name, back=True)

    def module_for(self, shape: tuple[int, ...]) -> AdapterModule:
        """The module rebuilt from the tensors for a weight of `shape` (the fused weight; rows in the file's order);
        ValueError when the tensors do not fit such a weight. Built once per shape."""
        if shape not in self._built:
            self._built[shape] = self._build(shape)
        return self._built[shape]

    def _build(self, shape: tuple[int, ...]) -> AdapterModule:
        out, rest = shape[0], shape[1:]
        splits = self.kind.file_splits(self.tensors) if self.kind.file_splits is not None else None
        splits = splits or [out]
        if sum(splits) != out:
            raise ValueError(f"{self.name}: the {self.kind.name} module changes {sum(splits)} rows, the weight has {out}")
        if len(rest) == 3:
            stand_ins = [nn.Conv2d(rest[0], out, tuple(rest[1:]), bias=False, device="meta")]
        else:
            stand_ins = [nn.Linear(rest[0], width, bias=False, device="meta") for width in splits]
        prefixed = {f"{self.name}.{s}": t for s, t in self.tensors.items()}
        try:
            dims, alphas = self.kind.dims_of_file(prefixed)
        except ValueError as e:
            raise ValueError(
                f"{self.name}.{min(s for s in self.tensors if s != 'alpha')}: an incomplete {self.kind.name} module ({e})"
            ) from None
        module = self.kind.build(self.name, stand_ins, dims[self.name], alphas.get(self.name), {})
        own = module.state_dict()
        for suffix, tensor in self.tensors.items():
            if suffix not in own or own[suffix].shape != tensor.shape:
                want = tuple(own[suffix].shape) if suffix in own else "no such tensor"
                raise ValueError(
                    f"{self.name}.{suffix} has shape {tuple(tensor.shape)}; a {self.kind.name} module of a {list(shape)} "
                    f"weight needs {want}"
                )
        missing = sorted(k for k in own if k not in self.tensors and k != "alpha")
        if missing:
            raise ValueError(f"{self.name}: the {self.kind.name} module has no {missing[0]}; the file is incomplete")
        module.load_state_dict(self.tensors, strict=False)
        module.alpha_loaded()
        return module


def file_modules(state_dict: dict[str, torch.Tensor], types: list[AdapterType] | None = None) -> dict[str, FileModule]:
    """The modules of an adapter file (kohya names: `<module>.<tensor>`), each of one type of `types` (default: all
    of kiln's). A key of no type, or a module mixing types, is a ValueError naming the key."""
    types = adapter_types() if types is None else types
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        name, _, suffix = key.partition(".")
        grouped.setdefault(name, {})[suffix] = value
    modules = {}
    for name, tensors in grouped.items():
        kinds = {id(t): t for s in tensors if s != "alpha" for t in types if _claims(t, s)}
        unknown = [s for s in tensors if s != "alpha" and not any(_claims(t, s) for t in types)]
        if unknown or len(kinds) != 1:
            key = f"{name}.{(unknown or sorted(tensors))[0]}"
            what = next((w for frag, w in UNSUPPORTED_KINDS.items() if frag in "." + key.split(".", 1)[1]), None)
            if unknown:
                raise ValueError(
                    f"{key} is not a tensor of a {', '.join(dict.fromkeys(t.name for t in types))} module"
                    + (f" (a {what} module)" if what else "")
                )
            if not kinds:
                raise ValueError(f"{key}: module {name} has no weights")
            found = [f"{name}.{next(s for s in sorted(tensors) if _claims(t, s))} (a {t.name} tensor)" for t in kinds.values()]
            raise ValueError(f"module {name} mixes adapter types: {' and '.join(found)}; a module is one type")
        modules[name] = FileModule(name, next(iter(kinds.values())), tensors)
    return modules


def merge_typed_file(state_dict: dict[str, torch.Tensor], ratio: float, text_encoders, denoiser: nn.Module) -> int | None:
    """Merge a file of one adapter type other than LoRA (OFT, LoHa, LoKr) into loaded models at strength `ratio`:
    its network is rebuilt from the file (its type's create_network_from_weights), loaded and merged module by
    module. Returns the number of modules merged, or None for a LoRA file (the family's LoRA merge handles those,
    diffusers/PEFT layouts included). Modules that match nothing in the models are an error."""
    import importlib

    if any(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in state_dict):
        return None
    modules = file_modules(state_dict)
    kinds = {m.kind.module: m.kind for m in modules.values()}
    if set(kinds) == {"networks.lora"}:
        return None
    if len(kinds) > 1:
        raise ValueError(f"the file mixes adapter types ({', '.join(k.name for k in kinds.values())}); merge one type per file")
    network = importlib.import_module(next(iter(kinds))).create_network_from_weights(1.0, state_dict, text_encoders, denoiser)
    missing = sorted(set(modules) - {m.lora_name for m in network.loras})
    if missing:
        raise ValueError(f"{len(missing)} modules match nothing in this model, e.g. {missing[0]}; is the file for another model?")
    network.load_weights(state_dict)
    for m in network.loras:
        m.merge_to(ratio)
    return len(network.loras)
