"""Count the operators one adapter training step dispatches at full model size, without a GPU and without weights.

    python benchmarks/count_step_ops.py --family sdxl|flux|sd3 [--no_checkpointing] [--top 12]
        [--network_module networks.oft] [--network_dim 4] [--network_alpha 1e-3] [--network_args enable_all_linear=True]

Builds the full-size SDXL U-Net, FLUX.1 dev transformer or, for sd3, the SD3.5 Large and SD3.5 Medium MMDiTs (77 CLIP
+ 256 T5 tokens; one count each) on PyTorch's meta device (shapes only, no memory, no arithmetic), runs one forward and
backward at 1024x1024 and counts the ATen operators that would launch work on a GPU (views and other metadata-only
operators are left out), with and without the adapter network. On a GPU each such operator is at least one kernel
launch plus PyTorch's dispatch overhead, so the count is a machine-independent measure of the per-step launch overhead
that compiled blocks (--torch_compile) and fewer adapter operators remove. Attention runs the meta device's math path
(a few operators more per attention than a fused flash kernel), the same with and without the adapter.

The adapter: --network_module, a kiln network module (KILN_NETWORK) built as training builds it,
`create_network(1.0, network_dim, network_alpha, text_encoders, denoiser, **options, **network_args)` then
`apply_to(False, True)` (the U-Net / transformer only; no text encoder is run), with SDXL's `unet_name_map` and
`te_prefixes` as library/family_sdxl.py's lora_options gives them. Left out, it is the family's LoRA module
(networks.lora for SDXL, networks.lora_flux, networks.lora_sd3) at LoRA dim 32 / alpha 16 (SDXL) or 16 / 16 (FLUX,
SD3); any other module gets its own create_network defaults unless --network_dim / --network_alpha are given (OFT:
network_dim = the number of blocks, default 4; network_alpha = the constraint factor, default 1e-3). Adapter types:
networks.lora / lora_flux / lora_sd3, networks.oft (SDXL, SD3) and networks.oft_flux (FLUX), networks.loha and
networks.lokr (every family). Model and adapter run in bf16, as with --full_bf16.

OFT's rotation (torch.linalg.solve, its backward linalg_lu_solve, and bmm) has meta kernels in PyTorch (2.13 here):
nothing is substituted, each is counted as the one ATen operator it is. On a GPU `_linalg_solve_ex` is an LU
factorisation plus a solve (cuSOLVER/MAGMA, several kernels), and linalg.solve's `_linalg_check_errors` reads the
factorisation's status back (a synchronisation); so for OFT the count is a lower bound of the launches: one solve per
adapted module and forward (two with checkpointing, which recomputes it) and one lu_solve in backward. (An operator
without a meta kernel would stop the count with PyTorch's NotImplementedError instead of being skipped silently.) The
network's parameters are made on the meta device too (FloatFactoriesOnMeta; OFT on every FLUX Linear would otherwise
allocate ~30 GB of float32 blocks on the CPU first); that changes no count.

Operators per step at kiln 75244a4 (torch 2.13, diffusers 0.42; modules = the network's adapter modules, one per file
module: a FLUX OFT module wraps the split q, k, v Linears; "added" = with the adapter minus without, /module per
adapter module), from `--family sdxl|flux [--network_module M --network_dim D --network_alpha A] [--network_args
enable_all_linear=True] [--no_checkpointing]`:

                                                                  with checkpointing (default)    --no_checkpointing
    model  --network_module dim / alpha [network_args]   modules   with  without  added  /module   with  without  added
    sdxl   networks.lora 32 / 16                             722  17964     9357   8607     11.9  13020     6418   6602
    sdxl   networks.oft 4 / 1e-3                             560  48911     9357  39554     70.6  35357     6418  28939
    sdxl   networks.oft 4 / 1e-3 enable_all_linear=True      722  59840     9357  50483     69.9  43626     6418  37208
    sdxl   networks.loha 32 / 16                             722  25118     9357  15761     21.8  18074     6418  11656
    sdxl   networks.lokr 32 / 16                             722  19596     9357  10239     14.2  14392     6418   7974
    flux   networks.lora_flux 16 / 16                        304  17805    13480   4325     14.2  12599     9376   3223
    flux   networks.oft_flux 4 / 1e-3                         76  20417    13480   6937     91.3  14413     9376   5037
    flux   networks.oft_flux 4 / 1e-3 enable_all_linear=True 304  41289    13480  27809     91.5  29775     9376  20399
    flux   networks.loha 16 / 16                             304  21149    13480   7669     25.2  15031     9376   5655
    flux   networks.lokr 16 / 16                             304  19629    13480   6149     20.2  14119     9376   4743
"""

from __future__ import annotations

import argparse
import collections
import functools
import importlib
import os
import sys
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

METADATA_ONLY = {
    "view", "_unsafe_view", "t", "transpose", "permute", "expand", "detach", "as_strided", "unsqueeze", "squeeze",
    "slice", "select", "split", "split_with_sizes", "alias", "reshape", "unbind", "chunk",
}  # fmt: skip


class OperatorCounter(TorchDispatchMode):
    """Counts the ATen operators dispatched inside it, by name, leaving out metadata-only ones."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in METADATA_ONLY:
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))


@dataclass(frozen=True)
class Network:
    """The adapter to count: a kiln network module's name, --network_dim / --network_alpha (None: the module's own
    default) and --network_args (strings, as training passes them)."""

    module: str
    dim: int | None = None
    alpha: float | None = None
    args: dict[str, str] = field(default_factory=dict)

    def label(self) -> str:
        """What the report line says about the adapter, e.g. `networks.oft dim 4, alpha 0.001, enable_all_linear=True`."""
        parts = [
            f"dim {self.dim if self.dim is not None else 'default'}",
            f"alpha {self.alpha if self.alpha is not None else 'default'}",
        ]
        return f"{self.module} " + ", ".join(parts + [f"{k}={v}" for k, v in self.args.items()])


def import_network_module(name: str):
    """A kiln network module (create_network with kiln's signature; a third-party sd-scripts module is not one)."""
    module = importlib.import_module(name)
    if not hasattr(module, "create_network") or not getattr(module, "KILN_NETWORK", False):
        raise SystemExit(f"--network_module {name}: not a kiln network module (KILN_NETWORK with create_network)")
    return module


SHAPED_FACTORIES = {torch.empty, torch.empty_strided, torch.zeros, torch.ones, torch.full, torch.rand, torch.randn, torch.eye}


class FloatFactoriesOnMeta(TorchFunctionMode):
    """Floating-point tensors made from a shape without a device (an adapter's parameters: nn.Linear's empty, OFT's
    zeros, LoHa's randn) are meta tensors; those made from Python data (torch.tensor: OFT's alpha buffer, which the
    module reads back with float()) or integer ones (arange: SD3's row orders, checked with tolist()) stay real."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (
            func in SHAPED_FACTORIES
            and kwargs.get("device") is None
            and (kwargs.get("dtype") or torch.get_default_dtype()).is_floating_point
        ):
            kwargs = {**kwargs, "device": "meta"}
        return func(*args, **kwargs)


def build_network(network: Network, text_encoders: list, denoiser: torch.nn.Module, options: dict) -> torch.nn.Module:
    """The adapter network on the meta-device model, as library/method_adapter.py's build_network makes it, its
    parameters on the meta device from the start (OFT on every FLUX Linear holds ~30 GB of float32 blocks)."""
    module = import_network_module(network.module)
    with FloatFactoriesOnMeta():
        return module.create_network(1.0, network.dim, network.alpha, text_encoders, denoiser, **options, **network.args)


def _sdxl(network: Network | None):
    from diffusers import UNet2DConditionModel

    from library.sdxl_models import reference_config, sdxl_unet_lora_name_map

    config = {k: v for k, v in reference_config("unet").items() if not k.startswith("_")}
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    adapters = None
    if network is not None:  # the options of library/family_sdxl.py's lora_options
        options = {"unet_name_map": sdxl_unet_lora_name_map(unet), "te_prefixes": ["lora_te1", "lora_te2"]}
        adapters = build_network(network, [], unet, options)
    pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]

    def inputs(dtype):
        return {
            "sample": torch.randn(1, 4, 128, 128, device="meta", dtype=dtype),
            "timestep": torch.tensor([500], device="meta"),
            "encoder_hidden_states": torch.randn(1, 77, config["cross_attention_dim"], device="meta", dtype=dtype),
            "added_cond_kwargs": {
                "text_embeds": torch.randn(1, pooled, device="meta", dtype=dtype),
                "time_ids": torch.randn(1, 6, device="meta", dtype=dtype),
            },
            "return_dict": False,
        }

    return unet, adapters, inputs, unet.conv_in.weight


def _flux(network: Network | None):
    from diffusers import FluxTransformer2DModel

    from benchmarks.gpu_train_step import FLUX_DEV_TRANSFORMER

    with torch.device("meta"):
        transformer = FluxTransformer2DModel(**FLUX_DEV_TRANSFORMER)
    adapters = build_network(network, [None, None], transformer, {}) if network is not None else None

    def inputs(dtype):
        return {
            "hidden_states": torch.randn(1, 4096, 64, device="meta", dtype=dtype),
            "encoder_hidden_states": torch.randn(1, 512, 4096, device="meta", dtype=dtype),
            "pooled_projections": torch.randn(1, 768, device="meta", dtype=dtype),
            "timestep": torch.tensor([0.5], device="meta", dtype=dtype),
            "img_ids": torch.zeros(4096, 3, device="meta"),
            "txt_ids": torch.zeros(512, 3, device="meta"),
            "guidance": torch.tensor([1.0], device="meta", dtype=dtype),
            "return_dict": False,
        }

    return transformer, adapters, inputs, transformer.x_embedder.weight


def _sd3(variant: str, network: Network | None):
    from diffusers import SD3Transformer2DModel

    from benchmarks.gpu_train_step import SD35_TRANSFORMERS
    from library.strategy_sd3 import CLIP_MAX_LENGTH, DEFAULT_T5_MAX_LENGTH

    config = SD35_TRANSFORMERS[variant]
    with torch.device("meta"):
        transformer = SD3Transformer2DModel(**config)
    adapters = build_network(network, [None, None, None], transformer, {}) if network is not None else None

    def inputs(dtype):
        return {
            "hidden_states": torch.randn(1, 16, 128, 128, device="meta", dtype=dtype),
            "encoder_hidden_states": torch.randn(
                1, CLIP_MAX_LENGTH + DEFAULT_T5_MAX_LENGTH, config["joint_attention_dim"], device="meta", dtype=dtype
            ),
            "pooled_projections": torch.randn(1, config["pooled_projection_dim"], device="meta", dtype=dtype),
            "timestep": torch.tensor([500.0], device="meta"),
            "return_dict": False,
        }

    return transformer, adapters, inputs, transformer.pos_embed.proj.weight


MODELS = {  # what --family counts: model name -> builder(network or None)
    "sdxl": {"sdxl": _sdxl},
    "flux": {"flux": _flux},
    "sd3": {variant: functools.partial(_sd3, variant) for variant in ("sd3.5-large", "sd3.5-medium")},
}
FAMILY_LORA = {  # --network_module left out: the family's LoRA module, its dim and alpha
    "sdxl": Network("networks.lora", 32, 16),
    "flux": Network("networks.lora_flux", 16, 16),
    "sd3": Network("networks.lora_sd3", 16, 16),
}


def count_step(build, network: Network | None, checkpointing: bool) -> tuple[collections.Counter, int]:
    """(operators of one forward + backward (bf16 model, bf16 adapters) of the full-size model on the meta device,
    the number of adapter modules); build: one of MODELS' builders, network None: without an adapter."""
    from networks.adapter import AdapterModule

    model, adapters, inputs, input_layer = build(network)
    dtype = torch.bfloat16
    model.to(dtype).requires_grad_(False)
    if checkpointing:
        model.enable_gradient_checkpointing()
    model.train()
    if adapters is None:
        trained, modules = [input_layer], 0  # the whole backward runs, as with adapters (whose operators are the difference)
    else:
        adapters.apply_to(False, True)
        adapters.to("meta", dtype)
        adapters.train()
        trained = list(adapters.parameters())
        modules = sum(isinstance(m, AdapterModule) for m in adapters.modules())
        if not trained:
            raise SystemExit(f"{network.label()}: the network has no parameters (no module of this model adapted)")
    for p in trained:
        p.requires_grad_(True)
    counter = OperatorCounter()
    with counter:
        out = model(**inputs(dtype))[0]
        out.float().square().mean().backward()
    return counter.counts, modules


def parse_network_args(pairs: list[str]) -> dict[str, str]:
    bad = [kv for kv in pairs if "=" not in kv]
    if bad:
        raise SystemExit(f"--network_args entries look like key=value, got {bad[0]!r}")
    return dict(kv.split("=", 1) for kv in pairs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=list(MODELS), default="sdxl")
    parser.add_argument("--no_checkpointing", action="store_true", help="without gradient checkpointing")
    parser.add_argument("--top", type=int, default=12, help="how many operator names to list")
    parser.add_argument(
        "--network_module", default=None,
        help="the adapter's kiln network module (networks.lora, networks.oft, networks.oft_flux, networks.loha, "
        "networks.lokr, ...); default: the family's LoRA module (networks.lora for SDXL, networks.lora_flux, "
        "networks.lora_sd3) at dim 32 / alpha 16 (SDXL) or 16 / 16",
    )  # fmt: skip
    parser.add_argument("--network_dim", type=int, default=None, help="the module's network_dim (OFT: the number of blocks)")
    parser.add_argument(
        "--network_alpha", type=float, default=None, help="the module's network_alpha (OFT: the constraint factor)"
    )
    parser.add_argument("--network_args", nargs="*", default=[], help="key=value network_args, passed through as strings")
    args = parser.parse_args()
    default = FAMILY_LORA[args.family]
    network = Network(
        args.network_module or default.module,
        args.network_dim if args.network_dim is not None or args.network_module else default.dim,
        args.network_alpha if args.network_alpha is not None or args.network_module else default.alpha,
        parse_network_args(args.network_args),
    )
    # kiln's adapters ask whether autocast is on for the input's device; the meta device has no autocast
    is_autocast_enabled = torch.is_autocast_enabled
    torch.is_autocast_enabled = lambda device=None: (
        False if device == "meta" else is_autocast_enabled(*([device] if device else []))
    )
    checkpointing = not args.no_checkpointing
    for name, build in MODELS[args.family].items():
        base, _ = count_step(build, None, checkpointing)
        adapted, modules = count_step(build, network, checkpointing)
        total, plain = sum(adapted.values()), sum(base.values())
        print(f"{name}, 1024x1024, batch 1, checkpointing {checkpointing}, {network.label()}: {total} operators per step "
              f"with the adapter ({modules} modules), {plain} without ({total - plain} for the adapter)")  # fmt: skip
        print("most frequent with the adapter: " + ", ".join(f"{k} {v}" for k, v in adapted.most_common(args.top)))
        added = adapted - base
        print("the adapter's: " + ", ".join(f"{k} +{v}" for k, v in added.most_common(args.top)))


if __name__ == "__main__":
    main()
