"""Third-party network modules under kiln's trainer. A `--network_module` without kiln's mark (a module attribute
`KILN_NETWORK = True`) follows sd-scripts' network-module interface, e.g. LyCORIS' `lycoris.kohya` (LoHa, LoKr, ...).

sd-scripts builds such a network with `create_network(multiplier, dim, alpha, vae, text_encoder, unet,
neuron_dropout=..., **network_args)` (`text_encoder`: the model, or the list of SDXL's two) or, for
`--dim_from_weights`, `create_network_from_weights(multiplier, file, vae, text_encoder, unet, weights_sd=...,
**network_args)`, and then calls, in this order: prepare_network(args) (if present), apply_to, load_weights(path),
enable_gradient_checkpointing, prepare_optimizer_params, prepare_grad_etc, and during training on_epoch_start,
on_step_start (if present), set_multiplier and apply_max_norm_regularization. `ForeignNetwork` makes these calls at
the same points and shows the network to kiln's trainer like kiln's own networks (param_groups, multiplier,
set_multiplier, apply_max_norm, load_weights, state_dict). An exception inside the module becomes a ValueError that
names the module and the call.

File names. Such modules name adapters after the module paths they see (`lora_unet_` + path with `.` -> `_`) and pick
modules by class name. kiln gives them what gives the file keys of the same module under sd-scripts:
- SD 1.x/2.x: kiln's diffusers U-Net has the module paths and class names of sd-scripts' own U-Net (both keep the
  diffusers layout), so the keys are sd-scripts' as they are.
- SDXL: sd-scripts' U-Net has the original (sgm) paths, `input_blocks.4.1...`. The module sees diffusers paths, and
  the U-Net keys are renamed to sgm names for the file (and back when a file is loaded) with the family's name map,
  `family.lora_options(models)["unet_name_map"]`.
- Text encoders: transformers 5 flattens `CLIPTextModel` (no `text_model.` level); the module sees it under a
  `text_model` attribute (TextModelView), so the keys read `lora_te_text_model_...` (`lora_te1_...`, `lora_te2_...`
  for SDXL) as sd-scripts writes them.
- FLUX.1 and SD3 are refused (FAMILY_REFUSALS says why).
"""

from __future__ import annotations

import inspect
import logging
import os
import tempfile
import traceback
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

import torch
from torch import nn

from library import saving

logger = logging.getLogger("kiln")

KILN_MARK = "KILN_NETWORK"  # module attribute of kiln's own network modules
UNET_PREFIX = "lora_unet_"  # sd-scripts' prefix of U-Net adapter names

# the families whose denoiser a module written for sd-scripts cannot adapt under sd-scripts' names, and why
FAMILY_REFUSALS = {
    "flux": (
        "kiln's FLUX.1 transformer is diffusers' FluxTransformer2DModel, while modules written for sd-scripts target "
        "sd-scripts' own FLUX model (block classes DoubleStreamBlock/SingleStreamBlock, BFL names with fused qkv). "
        "Here such a module adapts other layers (LyCORIS: only the timestep embedders) under names no FLUX loader "
        "reads as sd-scripts' files; train FLUX adapters with networks.lora_flux"
    ),
    "sd3": (
        "kiln's SD3 transformer is diffusers' SD3Transformer2DModel, while modules written for sd-scripts target "
        "sd-scripts' own MMDiT (SAI names with fused qkv, lora_unet_joint_blocks_N_x_block_attn_qkv). Here such a "
        "module adapts diffusers' separate to_q/to_k/to_v under diffusers names, which sd-scripts' SD3 files do not "
        "use; train SD3 adapters with networks.lora_sd3"
    ),
}
SUPPORTED_FAMILIES = ("sd", "sdxl")


def is_foreign(module: ModuleType) -> bool:
    """Whether a network module follows sd-scripts' interface (it lacks kiln's KILN_NETWORK mark)."""
    return not getattr(module, KILN_MARK, False)


def family_problem(name: str, family) -> str | None:
    """Why third-party module `name` cannot train for this model family, or None."""
    if family.arch in SUPPORTED_FAMILIES:
        return None
    reason = FAMILY_REFUSALS.get(family.arch, f"kiln cannot give it sd-scripts' module names for {family.script_name}")
    return (
        f"--network_module {name} is a third-party network module (sd-scripts' interface); kiln trains those for "
        f"SD 1.x/2.x and SDXL only: {reason}"
    )


def call_module(name: str, what: str, fn: Callable, *args: Any, **kwargs: Any) -> Any:
    """`fn(*args, **kwargs)`, a function of third-party module `name`; an exception inside it becomes a ValueError
    naming the module, the call and where it was raised (the whole traceback is logged at DEBUG level)."""
    try:
        return fn(*args, **kwargs)
    except Exception as e:
        logger.debug(f"--network_module {name}: {what} failed", exc_info=True)
        frames = traceback.extract_tb(e.__traceback__)
        where = ""
        if frames:
            file = os.path.join(*os.path.normpath(frames[-1].filename).split(os.sep)[-2:])
            where = f", raised at {file}:{frames[-1].lineno}"
        text = f": {e}" if str(e) else ""
        raise ValueError(
            f"--network_module {name}: {what} failed ({type(e).__name__}{text}{where}); check the --network_args "
            "this module takes"
        ) from None


class TextModelView(nn.Module):
    """A transformers-5 CLIPTextModel (flattened: `encoder.layers...`) under a `text_model` attribute: a module walking
    its named_modules() sees the paths of transformers 4 (`text_model.encoder.layers...`), as under sd-scripts."""

    def __init__(self, text_encoder: nn.Module) -> None:
        super().__init__()
        self.text_model = text_encoder

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.text_model(*args, **kwargs)


def sd_scripts_text_encoder(text_encoder: nn.Module) -> nn.Module:
    """The text encoder as an sd-scripts module should see it (TextModelView for a flattened CLIPTextModel)."""
    from transformers import CLIPTextModel

    if isinstance(text_encoder, CLIPTextModel) and not hasattr(text_encoder, "text_model"):
        return TextModelView(text_encoder)
    return text_encoder


class ForeignNetwork(nn.Module):
    """A third-party network (sd-scripts' interface) with the interface of kiln's own networks. Its state_dict and
    named_parameters use the file's key names, which are the network's own names except SDXL's U-Net keys (sgm
    names in the file; see the module docstring)."""

    def __init__(self, name: str, network: nn.Module, text_encoder: Any, unet: nn.Module, unet_names: dict[str, str]) -> None:
        super().__init__()
        self.name = name
        self.net = network
        self.multiplier = 1.0
        self.models = (text_encoder, unet)  # as the module was given them (a tuple: not submodules of this one)
        self.to_file = unet_names  # adapter name in the network -> its name in files
        self.from_file = {v: k for k, v in unet_names.items()}
        self._groups: tuple[tuple, tuple[list[dict], list[str]]] | None = None

    # -- calls into the module ------------------------------------------------------------------------------------

    def hook(self, what: str) -> Callable | None:
        fn = getattr(self.net, what, None)
        return fn if callable(fn) else None

    def call(self, what: str, *args: Any) -> Any:
        fn = self.hook(what)
        if fn is None:
            raise ValueError(f"--network_module {self.name}: its network has no {what}(), which sd-scripts calls")
        return call_module(self.name, what + "()", fn, *args)

    def setup(self, args, train_te: bool, train_unet: bool) -> None:
        """What sd-scripts does between building the network and training, in its order: prepare_network, apply_to,
        load_weights (--network_weights), enable_gradient_checkpointing, prepare_optimizer_params (here, so that
        its errors stop the run before training; param_groups returns these groups), prepare_grad_etc."""
        if self.hook("prepare_network"):
            self.call("prepare_network", args)
        if args.scale_weight_norms and not self.hook("apply_max_norm_regularization"):
            raise ValueError(
                f"--scale_weight_norms: --network_module {self.name} has no apply_max_norm_regularization(); "
                "remove --scale_weight_norms"
            )
        self.call("apply_to", *self.models, train_te, train_unet)
        self.check_names()
        if args.network_weights:
            from library.method_adapter import load_network_weights  # it imports this module

            load_network_weights(self, args.network_weights)
        if args.gradient_checkpointing and self.hook("enable_gradient_checkpointing"):
            self.call("enable_gradient_checkpointing")
        self.param_groups(args.text_encoder_lr, args.unet_lr, args.learning_rate)
        if self.hook("prepare_grad_etc"):
            self.call("prepare_grad_etc", *self.models)

    def check_names(self) -> None:
        """Refuse a network that adapted nothing, or an SDXL U-Net adapter without an original (sgm) name."""
        keys = list(self.net.state_dict())
        if not any(True for _ in self.net.parameters()):
            raise ValueError(
                f"--network_module {self.name} adapted nothing in this model: its targets (module class names or "
                "paths) match none of kiln's modules, or the parts it adapts are not trained here; check its "
                "--network_args (e.g. LyCORIS' preset) and --network_train_unet_only/--network_train_text_encoder_only"
            )
        if self.to_file:
            unnamed = [k for k in keys if k.startswith(UNET_PREFIX) and k.split(".", 1)[0] not in self.to_file]
            if unnamed:
                raise ValueError(
                    f"--network_module {self.name} adapted {unnamed[0].split('.', 1)[0]}, a U-Net module without an "
                    "original (sgm) name: its file would not have sd-scripts' names; choose other targets"
                )

    # -- names ----------------------------------------------------------------------------------------------------

    def _file_key(self, key: str) -> str:
        return rename_key(key, self.to_file)

    def _net_key(self, key: str) -> str:
        return rename_key(key, self.from_file)

    def state_dict(self, destination=None, prefix: str = "", keep_vars: bool = False) -> dict[str, torch.Tensor]:
        """The file's tensors: the network's state_dict (what LyCORIS' and sd-scripts' save_weights write) under the
        file's names."""
        out = destination if destination is not None else {}
        for key, value in self.net.state_dict(keep_vars=keep_vars).items():
            out[prefix + self._file_key(key)] = value
        return out

    def named_parameters(
        self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
    ) -> Iterator[tuple[str, nn.Parameter]]:
        """The network's parameters under their state_dict (file) names."""
        for key, param in self.net.named_parameters(recurse=recurse, remove_duplicate=remove_duplicate):
            yield prefix + self._file_key(key), param

    # -- kiln's network interface -----------------------------------------------------------------------------------

    def load_weights(self, state_dict: dict[str, torch.Tensor], source: str = "weights") -> list[str]:
        """Load a file's tensors through the module's own load_weights, which reads a path: a temporary safetensors
        file holds them under the network's names. Shape mismatches and missing parameters are errors naming a key;
        returns the keys that match nothing here."""
        own = self.state_dict()
        for key, value in state_dict.items():
            if key in own and tuple(own[key].shape) != tuple(value.shape):
                raise ValueError(
                    f"{source}: {key} has shape {tuple(value.shape)}, this {self.name} network needs "
                    f"{tuple(own[key].shape)}; add --dim_from_weights to shape the network like the file"
                )
        params = [k for k, _ in self.named_parameters()]
        missing = [k for k in params if k not in state_dict]
        if missing:
            raise ValueError(
                f"{source}: no weights for {len(missing)} of the {len(params)} tensors of this {self.name} network, "
                f"e.g. {missing[0]} (a file of another module, algorithm or preset?); add --dim_from_weights to "
                "shape the network like the file"
            )
        from safetensors.torch import save_file

        tensors = {self._net_key(k): v.detach().cpu().contiguous() for k, v in state_dict.items()}
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "weights.safetensors")
            save_file(tensors, path)
            if self.hook("load_weights"):
                self.call("load_weights", path)
            else:  # what sd-scripts' modules' load_weights do with the file's tensors
                self.net.load_state_dict(tensors, strict=False)
        return [k for k in state_dict if k not in own]

    def param_groups(
        self, text_encoder_lr: float | list[float] | None, unet_lr: float | None, default_lr: float
    ) -> tuple[list[dict], list[str]]:
        """The module's prepare_optimizer_params groups (rate-0 groups left out; a group without a rate gets
        `default_lr`) and their names (the module's lr descriptions, else group0, group1...). The module is asked
        once per set of rates."""
        key = (repr(text_encoder_lr), unet_lr, default_lr)
        if self._groups is None or self._groups[0] != key:
            self._groups = (key, self._optimizer_groups(text_encoder_lr, unet_lr, default_lr))
        return self._groups[1]

    def _optimizer_groups(
        self, text_encoder_lr: float | list[float] | None, unet_lr: float | None, default_lr: float
    ) -> tuple[list[dict], list[str]]:
        what = "prepare_optimizer_params_with_multiple_te_lrs"
        if not self.hook(what):  # as sd-scripts: modules without it take one text-encoder rate
            what = "prepare_optimizer_params"
            if isinstance(text_encoder_lr, (list, tuple)):
                if len(text_encoder_lr) > 1:
                    raise ValueError(
                        f"--text_encoder_lr gives {len(text_encoder_lr)} rates but --network_module {self.name} "
                        f"takes one for all text encoders (it has no {what}_with_multiple_te_lrs); give one rate"
                    )
                text_encoder_lr = text_encoder_lr[0] if text_encoder_lr else None
        fn = self.hook(what)
        if fn is None:
            raise ValueError(f"--network_module {self.name}: its network has no {what}(), which sd-scripts calls")
        if _takes_three_arguments(fn):
            result = call_module(self.name, what + "()", fn, text_encoder_lr, unet_lr, default_lr)
        else:  # an early sd-scripts signature (text_encoder_lr, unet_lr): rates given, never None
            te_lr = default_lr if text_encoder_lr is None else text_encoder_lr
            result = call_module(self.name, what + "()", fn, te_lr, default_lr if unet_lr is None else unet_lr)
        groups, descriptions = result if isinstance(result, tuple) else (result, None)
        out, names = [], []
        for i, group in enumerate(groups):
            if not isinstance(group, dict) or "params" not in group:
                raise ValueError(f"--network_module {self.name}: {what}() gave {type(group).__name__}, not a parameter group")
            group = {**group, "params": list(group["params"])}
            group.setdefault("lr", default_lr)
            if group["lr"] == 0 or not group["params"]:
                continue
            name = descriptions[i] if descriptions and i < len(descriptions) and descriptions[i] else f"group{i}"
            out.append(group)
            names.append(name if name not in names else f"{name}{i}")
        return out, names

    def set_multiplier(self, multiplier: float) -> None:
        if self.hook("set_multiplier"):
            self.call("set_multiplier", multiplier)
        elif multiplier != 1.0:
            raise ValueError(
                f"--network_module {self.name} has no set_multiplier(): a dataset's network_multiplier {multiplier} "
                "cannot be applied; remove network_multiplier from the dataset config"
            )
        self.multiplier = multiplier

    def apply_max_norm(self, max_norm: float) -> tuple[int, float, float]:
        """The module's apply_max_norm_regularization: (adapters scaled, mean norm, max norm) as Python numbers."""
        param = next(self.parameters(), None)
        if param is None:
            return 0, 0.0, 0.0
        scaled, mean_norm, top = self.call("apply_max_norm_regularization", max_norm, param.device)
        return int(_number(scaled)), float(_number(mean_norm)), float(_number(top))

    def start_epoch(self) -> None:
        """sd-scripts' on_epoch_start (where its modules put themselves in training mode); train() without it."""
        if self.hook("on_epoch_start"):
            self.call("on_epoch_start", *self.models)
        else:
            self.train()

    def before_batch(self) -> None:
        """sd-scripts' on_step_start, before each training batch's forward; validation batches (run without
        gradients) skip it, as in sd-scripts."""
        if torch.is_grad_enabled() and self.hook("on_step_start"):
            self.call("on_step_start", *self.models)


def rename_key(key: str, names: dict[str, str]) -> str:
    """`key` (`<adapter name>.<tensor>`) with the adapter name renamed by `names` (unchanged when not in it)."""
    module, dot, rest = key.partition(".")
    return names.get(module, module) + dot + rest


def _takes_three_arguments(fn: Callable) -> bool:
    """Whether fn accepts (text_encoder_lr, unet_lr, default_lr) positionally."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return True
    if any(p.kind == p.VAR_POSITIONAL for p in params):
        return True
    return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params) >= 3


def _number(value: Any) -> float:
    return value.item() if isinstance(value, torch.Tensor) else float(value)


def build_foreign_network(
    name: str, module: ModuleType, args, family, models, net_kwargs: dict[str, str], train_te: bool, train_unet: bool
) -> ForeignNetwork:
    """Build third-party module `name`'s network the sd-scripts way on kiln's models, applied, with
    --network_weights loaded. Raises ValueError with a message for the user."""
    problem = family_problem(name, family)
    if problem:
        raise ValueError(problem)
    text_encoders = [sd_scripts_text_encoder(te) for te in models.text_encoders]
    text_encoder = text_encoders[0] if len(text_encoders) == 1 else text_encoders
    name_map = family.lora_options(models).get("unet_name_map") or {}
    unet_names = {
        UNET_PREFIX + path.replace(".", "_"): UNET_PREFIX + original.replace(".", "_")
        for path, original in name_map.items()
        if path != original
    }
    if args.dim_from_weights:
        if not callable(getattr(module, "create_network_from_weights", None)):
            raise ValueError(f"--dim_from_weights: --network_module {name} has no create_network_from_weights()")
        file_weights, _ = saving.load_weights_file(args.network_weights)
        from_file = {v: k for k, v in unet_names.items()}
        weights = {rename_key(k, from_file): v for k, v in file_weights.items()}
        result = call_module(
            name,
            "create_network_from_weights()",
            module.create_network_from_weights,
            1.0,
            args.network_weights,
            models.vae,
            text_encoder,
            models.denoiser,
            weights_sd=weights,
            **net_kwargs,
        )
        network = result[0] if isinstance(result, (tuple, list)) else result
    else:
        kwargs = dict(net_kwargs)
        kwargs.setdefault("dropout", args.network_dropout)  # as sd-scripts (LyCORIS reads --network_dropout there)
        network = call_module(
            name,
            "create_network()",
            module.create_network,
            1.0,
            args.network_dim,
            args.network_alpha,
            models.vae,
            text_encoder,
            models.denoiser,
            neuron_dropout=args.network_dropout,
            **kwargs,
        )
    if not isinstance(network, nn.Module):
        raise ValueError(f"--network_module {name}: its create_network gave {type(network).__name__}, not a network")
    foreign = ForeignNetwork(name, network, text_encoder, models.denoiser, unet_names)
    foreign.setup(args, train_te, train_unet)
    return foreign
