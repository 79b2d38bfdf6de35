"""Adapter training (LoRA; the --network_module's network): the base model stays frozen, an adapter network wraps its
layers, and checkpoints are the adapter's file (kohya format with ss_*/modelspec metadata)."""

from __future__ import annotations

import contextlib
import importlib
import logging

import torch

from library import foreign_network, saving
from library.family import ModelFamily, TrainModels
from library.method import TrainingMethod

logger = logging.getLogger("kiln")


def import_network_module(name: str):
    try:
        module = importlib.import_module(name)
    except ImportError as e:
        raise ValueError(
            f"--network_module {name} cannot be imported ({e}); kiln's own modules are networks.lora, "
            "networks.lora_flux, networks.lora_sd3, networks.oft, networks.oft_flux, networks.loha and networks.lokr, and "
            "a third-party module (e.g. lycoris.kohya of the "
            "lycoris-lora package) must be installed in this Python environment"
        ) from None
    if not hasattr(module, "create_network"):
        raise ValueError(f"--network_module {name} has no create_network(); it is not a network module")
    return module


def network_module_problem(args, family: ModelFamily) -> str | None:
    """A --network_module that cannot be imported, or a third-party one for a family kiln cannot train it on."""
    name = args.network_module or "networks.lora"
    try:
        module = import_network_module(name)
    except ValueError as e:
        return str(e)
    if foreign_network.is_foreign(module):
        return foreign_network.family_problem(name, family)
    if args.scale_weight_norms and not getattr(module, "LIMITS_WEIGHT_NORMS", True):
        return f"--scale_weight_norms: {name} adapters are not a weight change with a norm to limit (OFT rotates)"
    return None


def adapts_text_encoders(args) -> bool:
    """Whether --network_module can adapt text encoders at all (OFT never does: its modules' flag says so)."""
    try:
        module = import_network_module(args.network_module or "networks.lora")
    except ValueError:
        return True  # reported by network_module_problem
    return getattr(module, "ADAPTS_TEXT_ENCODERS", True)


def build_network(args, family: ModelFamily, models: TrainModels, train_te: bool, train_unet: bool):
    """The adapter network of --network_module on the models, applied to them, with --network_weights loaded (a
    third-party module, without kiln's KILN_NETWORK mark, through library/foreign_network.py). Raises ValueError with
    a message for the user."""
    name = args.network_module or "networks.lora"
    module = import_network_module(name)
    net_kwargs = dict(kv.split("=", 1) for kv in (args.network_args or []) if "=" in kv)
    bad = [kv for kv in (args.network_args or []) if "=" not in kv]
    if bad:
        raise ValueError(f"--network_args entries look like key=value, got {bad[0]!r}")
    if foreign_network.is_foreign(module):
        return foreign_network.build_foreign_network(name, module, args, family, models, net_kwargs, train_te, train_unet)
    options = family.lora_options(models)
    if args.dim_from_weights:
        weights, _ = saving.load_weights_file(args.network_weights)
        network = module.create_network_from_weights(1.0, weights, models.text_encoders, models.denoiser, **options, **net_kwargs)
    else:
        network = module.create_network(
            1.0,
            args.network_dim,
            args.network_alpha,
            models.text_encoders,
            models.denoiser,
            neuron_dropout=args.network_dropout,
            **options,
            **net_kwargs,
        )
    network.apply_to(train_te, train_unet)
    if args.network_weights:
        load_network_weights(network, args.network_weights)
    return network


def load_network_weights(network, path: str) -> None:
    """--network_weights into a built network (kiln's or a third-party one's wrapper); keys without a module are
    logged, shape mismatches are errors (raised by the network's load_weights)."""
    weights, _ = saving.load_weights_file(path)
    unexpected = network.load_weights(weights, path)
    if unexpected:
        logger.warning(f"{path}: {len(unexpected)} keys have no module here and are ignored, e.g. {unexpected[0]}")


class HalfPrecisionMasters:
    """--full_fp16/--full_bf16: the adapter weights are stored and computed in half precision, while the optimizer
    updates float32 copies (a half-precision Adam state underflows: fp16 cannot hold its epsilon)."""

    def __init__(self, network: torch.nn.Module, params: list[torch.Tensor]) -> None:
        self.params = params
        self.masters = [p.detach().float().clone().requires_grad_(True) for p in params]
        names = {id(p): n for n, p in network.named_parameters()}
        self.names = [names[id(p)] for p in params]

    def swap_groups(self, groups: list[dict]) -> list[dict]:
        by_id = {id(p): m for p, m in zip(self.params, self.masters)}
        return [{**g, "params": [by_id[id(p)] for p in g["params"]]} for g in groups]

    def grads_to_masters(self) -> None:
        for p, m in zip(self.params, self.masters):
            m.grad = p.grad.float() if p.grad is not None else torch.zeros_like(m)
            p.grad = None

    def masters_to_params(self) -> None:
        with torch.no_grad():
            for p, m in zip(self.params, self.masters):
                p.copy_(m)

    def params_to_masters(self) -> None:
        with torch.no_grad():
            for p, m in zip(self.params, self.masters):
                m.copy_(p)

    def named_masters(self) -> dict[str, torch.Tensor]:
        return {n: m.detach() for n, m in zip(self.names, self.masters)}

    def load(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for n, m in zip(self.names, self.masters):
                m.copy_(state[n])


def learning_rate_problem(args) -> str | None:
    """None when some trained part gets a learning rate above 0 (networks skip parameter groups with rate 0)."""
    default = args.learning_rate
    unet = default if args.unet_lr is None else args.unet_lr
    te_values = args.text_encoder_lr if isinstance(args.text_encoder_lr, list) else [args.text_encoder_lr]
    te = [default if v is None else v for v in (te_values or [None])]
    trains_unet = not args.network_train_text_encoder_only and unet != 0
    trains_te = not args.network_train_unet_only and any(v != 0 for v in te)
    if trains_unet or trains_te:
        return None
    given = [f"--learning_rate {default}"]
    if args.unet_lr is not None:
        given.append(f"--unet_lr {args.unet_lr}")
    if args.text_encoder_lr:
        given.append("--text_encoder_lr " + " ".join(str(v) for v in args.text_encoder_lr))
    return (
        f"nothing to train: every learning rate is 0 ({', '.join(given)}); give --learning_rate (or --unet_lr / "
        "--text_encoder_lr for the part to train) a value above 0"
    )


def add_network_arguments(parser) -> None:
    g = parser.add_argument_group("network (LoRA)")
    g.add_argument("--network_module", type=str, default=None, help="adapter module, e.g. networks.lora")
    g.add_argument("--network_dim", type=int, default=None, help="LoRA rank (default 4)")
    g.add_argument("--network_alpha", type=float, default=1, help="LoRA alpha: the update is scaled by alpha / rank")
    g.add_argument("--network_dropout", type=float, default=None, help="dropout on the LoRA down projection's output")
    g.add_argument("--network_args", type=str, default=None, nargs="*", help="module options key=value, e.g. conv_dim=4")
    g.add_argument("--network_weights", type=str, default=None, help="start from this LoRA file (kiln's or sd-scripts')")
    g.add_argument("--dim_from_weights", action="store_true", help="take ranks and alphas from --network_weights")
    g.add_argument("--network_train_unet_only", action="store_true", help="train the U-Net adapters only")
    g.add_argument("--network_train_text_encoder_only", action="store_true", help="train the text-encoder adapters only")
    g.add_argument("--unet_lr", type=float, default=None, help="learning rate of the U-Net adapters (default --learning_rate)")
    g.add_argument("--text_encoder_lr", type=float, default=None, nargs="*", help="learning rate(s) of the text-encoder adapters")
    g.add_argument("--scale_weight_norms", type=float, default=None, help="max norm of each adapter's weight delta (1 suggested)")
    g.add_argument(
        "--no_metadata", action="store_true", help="write only the essential ss_* metadata (and modelspec.*) into the file"
    )
    g.add_argument("--training_comment", type=str, default=None, help="free text stored as ss_training_comment")


class AdapterMethod(TrainingMethod):
    """Train an adapter network (--network_module, networks.lora by default) on the frozen model."""

    frozen_text_encoders_hint = "--network_train_unet_only"

    def add_arguments(self, parser) -> None:
        add_network_arguments(parser)

    def argument_problems(self, args, family: ModelFamily) -> list[str]:
        from library.preflight import network_weights_problem

        problems = []
        if args.network_train_unet_only and args.network_train_text_encoder_only:
            problems.append("--network_train_unet_only and --network_train_text_encoder_only exclude each other")
        if args.dim_from_weights and not args.network_weights:
            problems.append("--dim_from_weights needs --network_weights")
        if args.network_dim is not None and args.network_dim < 1 and not args.dim_from_weights:
            problems.append(f"--network_dim {args.network_dim}: the LoRA rank must be at least 1")
        for flag in ("unet_lr", "text_encoder_lr"):
            value = getattr(args, flag, None)
            for lr in value if isinstance(value, list) else [value]:
                if lr is not None and lr < 0:
                    problems.append(f"--{flag} {lr}: a learning rate cannot be negative")
        problems.append(learning_rate_problem(args))
        problems.append(network_module_problem(args, family))
        if args.network_train_text_encoder_only and not adapts_text_encoders(args):
            problems.append(f"--network_train_text_encoder_only: {args.network_module} adapts no text encoder")
        if args.network_weights:
            problems.append(network_weights_problem(args.network_weights, family))
        return [p for p in problems if p]

    def trains_text_encoders(self, args) -> bool:
        return not args.network_train_unet_only and adapts_text_encoders(args)

    # -- set-up ---------------------------------------------------------------------------------------------------

    def build(self, args, family: ModelFamily, models: TrainModels) -> None:
        self.args = args
        self.train_te = self.trains_text_encoders(args)
        self.train_unet = not args.network_train_text_encoder_only
        self.network = build_network(args, family, models, self.train_te, self.train_unet)
        self.masters = None

    def to_device(self, device: torch.device, dtype: torch.dtype) -> None:
        half = self.args.full_fp16 or self.args.full_bf16
        self.network.to(device, dtype if half else torch.float32)

    def param_groups(self, args) -> tuple[list[dict], list[str]]:
        return self.network.param_groups(args.text_encoder_lr, args.unet_lr, args.learning_rate)

    def optimizer_groups(self, groups: list[dict]) -> list[dict]:
        if not (self.args.full_fp16 or self.args.full_bf16):
            return groups
        self.masters = HalfPrecisionMasters(self.network, [p for g in groups for p in g["params"]])
        return self.masters.swap_groups(groups)

    @property
    def deepspeed_module(self) -> torch.nn.Module:
        return self.network

    # -- the loop -------------------------------------------------------------------------------------------------

    @property
    def text_encoder_training(self) -> bool:
        return self.train_te

    @property
    def trains_denoiser(self) -> bool:
        return self.train_unet

    def before_batch(self, batch: dict) -> None:
        """The adapter strength of the batch's dataset (`network_multiplier` in the dataset config; a batch never
        mixes datasets): e.g. -1 trains the LoRA away from a dataset. sd-scripts reads the key and ignores it."""
        multiplier = float(batch["network_multipliers"][0])
        if multiplier != self.network.multiplier:
            self.network.set_multiplier(multiplier)
        if isinstance(self.network, foreign_network.ForeignNetwork):
            self.network.before_batch()  # the module's on_step_start

    def before_optimizer_step(self) -> None:
        if self.masters:
            self.masters.grads_to_masters()

    def after_optimizer_step(self, step: int) -> dict[str, float]:
        if self.masters:
            self.masters.masters_to_params()
        if not self.args.scale_weight_norms:
            return {}
        scaled, mean_norm, max_norm = self.network.apply_max_norm(self.args.scale_weight_norms)
        if self.masters:
            self.masters.params_to_masters()
        return {"max_norm/keys_scaled": scaled, "max_norm/average_key_norm": mean_norm, "max_norm/max_key_norm": max_norm}

    def weights_changed(self) -> None:
        if self.masters:
            self.masters.masters_to_params()

    @contextlib.contextmanager
    def previewing(self):
        self.network.eval()
        self.network.set_multiplier(1.0)  # previews show the LoRA at full strength, whatever the last dataset's
        try:
            yield
        finally:
            self.network.train()

    def train_mode(self) -> None:
        if isinstance(self.network, foreign_network.ForeignNetwork):
            self.network.start_epoch()  # the module's on_epoch_start
        else:
            self.network.train()

    # -- checkpoints and states -----------------------------------------------------------------------------------

    def checkpoint_metadata(self, args, family: ModelFamily, run_info: dict) -> dict[str, str]:
        from library.lora_metadata import training_metadata

        return training_metadata(args, family, **run_info)

    def save_checkpoint(
        self, args, family: ModelFamily, models: TrainModels, stem: str, metadata: dict[str, str], is_main: bool
    ) -> str:
        from library.lora_metadata import ESSENTIAL_KEYS

        path = stem + "." + args.save_model_as
        if not is_main:  # every process holds the whole adapter: the main process writes it
            return path
        if args.no_metadata:
            metadata = {k: v for k, v in metadata.items() if k in ESSENTIAL_KEYS or k.startswith("modelspec.")}
        dtype = saving.SAVE_DTYPES.get(args.save_precision) if args.save_precision else None
        saving.save_weights(path, self.network.state_dict(), metadata if path.endswith(".safetensors") else None, dtype)
        return path

    def checkpoint_suffix_pattern(self, args) -> str:
        import re

        return re.escape("." + args.save_model_as)

    def state_weights(self) -> dict[str, torch.Tensor]:
        weights = self.network.state_dict()
        if self.masters:  # the float32 weights the optimizer updates, so that a resume is exact
            weights.update(self.masters.named_masters())
        return weights

    def load_state_weights(self, weights: dict[str, torch.Tensor], source: str) -> None:
        self.network.load_weights(weights, source)
        if self.masters:
            self.masters.load(weights)
