"""Optimizers and learning-rate schedules, with sd-scripts' flags and semantics (reference §4, Optimizer and LR scheduler).

- `add_optimizer_arguments(parser)` adds the flags.
- `make_optimizer(args, param_groups)` returns `(name, args_string, optimizer)`; `optimizer_metadata(name, args_string)`
  joins the first two into the `ss_optimizer` value, e.g. "torch.optim.adamw.AdamW(weight_decay=0.01)".
- `make_lr_scheduler(args, optimizer, num_training_steps, num_processes)` returns the torch scheduler.

Step counts and `num_processes`: under accelerate, a prepared scheduler is stepped once per process for every
optimizer step (unless batches are split). As sd-scripts does, the schedule is therefore built for
`num_training_steps * num_processes` scheduler steps, so that it spans the run whatever the number of processes.
Ratios (`--lr_warmup_steps 0.1` or "10%") are taken of that product and so mean the same fraction of the run on any
number of processes. Integer step counts (`--lr_warmup_steps 100`, piecewise_constant's step_rules, inverse_sqrt's
timescale, a custom scheduler's arguments) are counted in scheduler steps, as in sd-scripts: with 2 processes,
`--lr_warmup_steps 100` is over after 50 optimizer steps.

Things sd-scripts ignores silently are errors here: a warmup, decay, cycle count, power, timescale or minimum-lr
ratio that the chosen schedule does not use, and a schedule given to a schedule-free optimizer.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import logging
import math
import shlex
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------------------------
# key=value arguments and step counts


def _literal(text: str) -> Any:
    """A Python literal, or the text itself when it is not one (so strings need no quotes)."""
    text = text.strip()
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        pass
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    return text


def parse_kv_args(values: Any, flag: str = "--optimizer_args") -> dict[str, Any]:
    """Parse `key=value` items (`--optimizer_args`, `--lr_scheduler_args`) into a dict.

    Values are Python literals read with `ast.literal_eval` ("0.01" -> 0.01, "True" -> True, "0.9,0.999" ->
    (0.9, 0.999), "[1, 2]" -> [1, 2], "None" -> None); "true"/"false"/"none" in any case are accepted too, and
    anything else stays a string, so `decay_type=linear` needs no quotes. Only the first "=" separates key and
    value. `values` may be None, a list of items, or one string of space-separated items (as a config file may
    give it). A later item with the same key wins.
    """
    if values is None:
        return {}
    if isinstance(values, str):
        values = shlex.split(values)
    result: dict[str, Any] = {}
    for item in values:
        if not isinstance(item, str):
            raise ValueError(f"{flag}: expected key=value strings, got {item!r}")
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"{flag}: {item!r} is not key=value (e.g. {flag} weight_decay=0.01 betas=0.9,0.999)")
        if not key.isidentifier():
            raise ValueError(f"{flag}: {key!r} is not a valid argument name")
        result[key] = _literal(value)
    return result


def parse_steps_or_ratio(value: Any) -> int | float:
    """A step count (int) or a fraction of the training steps (float in [0, 1]).

    Strings (the command line): "N%" is the ratio N/100 (0% to 100%); a number below 1 is a ratio ("0.1"); a whole
    number from 1 up is a step count ("10", "10.0"); anything else is an error. Numbers (a config file, Python): an
    int is a step count; a float from 0 to 1 is a ratio, as in sd-scripts; a whole-number float above 1 is a step
    count. None means 0.
    """
    if value is None:
        return 0
    if isinstance(value, bool):
        raise ValueError(f"expected a step count or a ratio, got {value!r}")
    if isinstance(value, str):
        text = value.strip()
        if text.endswith("%"):
            try:
                percent = float(text[:-1])
            except ValueError:
                raise ValueError(f"{value!r} is not a percentage such as 10%") from None
            if not 0 <= percent <= 100:
                raise ValueError(f"{value!r}: a percentage of the training steps must be from 0% to 100%")
            return percent / 100.0
        if text.isdigit():
            return int(text)
        try:
            number = float(text)
        except ValueError:
            raise ValueError(f"{value!r} is neither a step count nor a ratio (e.g. 100, 0.05 or 5%)") from None
        # Written on a command line, only a number below 1 is a ratio: "1" and "1.0" are one step.
        value = number if number < 1 else (int(number) if number.is_integer() else number)
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{value}: a step count cannot be negative")
        return value
    if isinstance(value, float):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{value}: expected a step count or a ratio from 0 to 1")
        if value <= 1.0:
            return value
        if value.is_integer():
            return int(value)
        raise ValueError(f"{value}: a ratio must be at most 1 (and a step count a whole number)")
    raise ValueError(f"expected a step count or a ratio, got {value!r}")


def resolve_steps(value: Any, num_training_steps: int, flag: str = "--lr_warmup_steps") -> int:
    """Turn a `parse_steps_or_ratio` value into a number of (scheduler) steps: ratios are floored, as in sd-scripts."""
    try:
        parsed = parse_steps_or_ratio(value)
    except ValueError as e:
        raise ValueError(f"{flag}: {e}") from None
    if isinstance(parsed, float):
        return int(parsed * num_training_steps)
    return parsed


def _steps_type(text: str) -> int | float:
    try:
        return parse_steps_or_ratio(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


# --------------------------------------------------------------------------------------------------------------------
# arguments

SCHEDULE_FREE_SUFFIX = "schedulefree"


@dataclass(frozen=True)
class _Builtin:
    name: str  # the spelling shown in messages
    module: str
    attr: str
    package: str  # what to pip install when the module is missing
    defaults: tuple[tuple[str, Any], ...] = ()  # set unless given; part of the metadata string (sd-scripts does so)
    fixed: tuple[tuple[str, Any], ...] = ()  # always passed; not part of the metadata string


_BUILTINS = [
    _Builtin("AdamW", "torch.optim", "AdamW", "torch"),
    _Builtin("AdamW8bit", "bitsandbytes.optim", "AdamW8bit", "bitsandbytes"),
    _Builtin("PagedAdamW", "bitsandbytes.optim", "PagedAdamW", "bitsandbytes"),
    _Builtin("PagedAdamW8bit", "bitsandbytes.optim", "PagedAdamW8bit", "bitsandbytes"),
    _Builtin("PagedAdamW32bit", "bitsandbytes.optim", "PagedAdamW32bit", "bitsandbytes"),
    _Builtin("Lion", "lion_pytorch", "Lion", "lion-pytorch"),
    _Builtin("Lion8bit", "bitsandbytes.optim", "Lion8bit", "bitsandbytes"),
    _Builtin("PagedLion8bit", "bitsandbytes.optim", "PagedLion8bit", "bitsandbytes"),
    _Builtin("SGDNesterov", "torch.optim", "SGD", "torch", defaults=(("momentum", 0.9),), fixed=(("nesterov", True),)),
    _Builtin(
        "SGDNesterov8bit",
        "bitsandbytes.optim",
        "SGD8bit",
        "bitsandbytes",
        defaults=(("momentum", 0.9),),
        fixed=(("nesterov", True),),
    ),
    _Builtin("DAdaptation", "dadaptation.experimental", "DAdaptAdamPreprint", "dadaptation"),
    _Builtin("DAdaptAdamPreprint", "dadaptation.experimental", "DAdaptAdamPreprint", "dadaptation"),
    _Builtin("DAdaptAdaGrad", "dadaptation", "DAdaptAdaGrad", "dadaptation"),
    _Builtin("DAdaptAdam", "dadaptation", "DAdaptAdam", "dadaptation"),
    _Builtin("DAdaptAdan", "dadaptation", "DAdaptAdan", "dadaptation"),
    _Builtin("DAdaptAdanIP", "dadaptation.experimental", "DAdaptAdanIP", "dadaptation"),
    _Builtin("DAdaptLion", "dadaptation", "DAdaptLion", "dadaptation"),
    _Builtin("DAdaptSGD", "dadaptation", "DAdaptSGD", "dadaptation"),
    _Builtin("Prodigy", "prodigyopt", "Prodigy", "prodigyopt"),
    _Builtin("AdaFactor", "transformers.optimization", "Adafactor", "transformers"),
    _Builtin("RAdamScheduleFree", "schedulefree", "RAdamScheduleFree", "schedulefree"),
    _Builtin("AdamWScheduleFree", "schedulefree", "AdamWScheduleFree", "schedulefree"),
    _Builtin("SGDScheduleFree", "schedulefree", "SGDScheduleFree", "schedulefree"),
]
BUILTIN_OPTIMIZERS: dict[str, _Builtin] = {b.name.lower(): b for b in _BUILTINS}
BUILTIN_OPTIMIZER_NAMES: tuple[str, ...] = tuple(b.name for b in _BUILTINS)


def _transformers_scheduler_names() -> tuple[str, ...]:
    from transformers import SchedulerType

    return tuple(s.value for s in SchedulerType)


def scheduler_names() -> tuple[str, ...]:
    """Every --lr_scheduler name this installation supports (plus the form "adafactor:<initial lr>")."""
    return _transformers_scheduler_names() + ("piecewise_constant", "adafactor")


def add_optimizer_arguments(parser: argparse.ArgumentParser) -> None:
    """Optimizer and learning-rate scheduler flags, with sd-scripts' names and defaults."""
    g = parser.add_argument_group("optimizer")
    g.add_argument(
        "--optimizer_type",
        type=str,
        default="AdamW",
        help="optimizer: " + ", ".join(BUILTIN_OPTIMIZER_NAMES) + " (case-insensitive); or a class by dotted path "
        "(e.g. bitsandbytes.optim.AdEMAMix8bit, torch.optim.RMSprop), or the name of a torch.optim class. "
        "DAdapt*, Prodigy and *ScheduleFree need their packages (dadaptation, prodigyopt, schedulefree)",
    )
    g.add_argument(
        "--optimizer_args",
        type=str,
        default=None,
        nargs="*",
        help='extra optimizer arguments as key=value, values read as Python literals, e.g. "weight_decay=0.01" '
        '"betas=0.9,0.999" "decouple=True"; unquoted text stays a string',
    )
    g.add_argument("--use_8bit_adam", action="store_true", help="legacy: same as --optimizer_type AdamW8bit")
    g.add_argument("--use_lion_optimizer", action="store_true", help="legacy: same as --optimizer_type Lion (lion-pytorch)")
    g.add_argument(
        "--learning_rate",
        type=float,
        default=2e-6,
        help="learning rate (with Adafactor's relative_step=True only the lr shown before the first step)",
    )
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="gradient clipping norm; 0 turns clipping off")

    s = parser.add_argument_group("learning-rate scheduler")
    s.add_argument(
        "--lr_scheduler",
        type=str,
        default="constant",
        help="schedule: linear, cosine, cosine_with_restarts, polynomial, constant, constant_with_warmup, inverse_sqrt, "
        "cosine_with_min_lr, warmup_stable_decay, reduce_lr_on_plateau (those of the installed transformers), "
        "piecewise_constant (step_rules in --lr_scheduler_args), adafactor or adafactor:<initial lr> (with AdaFactor)",
    )
    s.add_argument(
        "--lr_warmup_steps",
        type=_steps_type,
        default=0,
        help="warmup: a number of steps, or a ratio of the training steps (0.05 or 5%%); default 0",
    )
    s.add_argument(
        "--lr_decay_steps",
        type=_steps_type,
        default=0,
        help="decay steps of warmup_stable_decay: a number of steps, or a ratio of the training steps (0.2 or 20%%)",
    )
    s.add_argument(
        "--lr_scheduler_num_cycles",
        type=int,
        default=1,
        help="cycles of cosine_with_restarts; for cosine_with_min_lr and warmup_stable_decay's decay, the number of "
        "half cosine waves (1: one decay from the lr to the minimum)",
    )
    s.add_argument("--lr_scheduler_power", type=float, default=1.0, help="power of the polynomial schedule")
    s.add_argument(
        "--lr_scheduler_timescale",
        type=int,
        default=None,
        help="time scale of inverse_sqrt (default: the warmup steps, or 10000 without warmup)",
    )
    s.add_argument(
        "--lr_scheduler_min_lr_ratio",
        type=float,
        default=None,
        help="final lr as a ratio of the initial lr, for cosine_with_min_lr and warmup_stable_decay",
    )
    s.add_argument(
        "--lr_scheduler_type",
        type=str,
        default="",
        help="a scheduler class instead of --lr_scheduler: dotted path (e.g. torch.optim.lr_scheduler.StepLR) or "
        "torch.optim.lr_scheduler name; its arguments go in --lr_scheduler_args",
    )
    s.add_argument(
        "--lr_scheduler_args",
        type=str,
        default=None,
        nargs="*",
        help='extra scheduler arguments as key=value, e.g. "step_rules=1:100,0.1:200,0.01" for piecewise_constant, '
        '"T_max=100" for a --lr_scheduler_type class',
    )


# --------------------------------------------------------------------------------------------------------------------
# optimizers


def resolve_optimizer_type(args: Any) -> str:
    """--optimizer_type after the legacy --use_8bit_adam / --use_lion_optimizer flags (an empty type means AdamW)."""
    name = (getattr(args, "optimizer_type", None) or "AdamW").strip() or "AdamW"
    use_8bit = bool(getattr(args, "use_8bit_adam", False))
    use_lion = bool(getattr(args, "use_lion_optimizer", False))
    if use_8bit and use_lion:
        raise ValueError("--use_8bit_adam and --use_lion_optimizer cannot be used together")
    for flag, on, target in (("--use_8bit_adam", use_8bit, "AdamW8bit"), ("--use_lion_optimizer", use_lion, "Lion")):
        if on:
            if name.lower() not in ("adamw", target.lower()):
                raise ValueError(f"{flag} means --optimizer_type {target}; it cannot be combined with --optimizer_type {name}")
            return target
    return name


def _import_builtin(spec: _Builtin) -> type:
    try:
        module = importlib.import_module(spec.module)
    except ImportError as e:
        raise ImportError(
            f"--optimizer_type {spec.name} needs the {spec.package} package, which is not installed: pip install {spec.package}"
        ) from e
    cls = getattr(module, spec.attr, None)
    if cls is None:
        raise ImportError(f"--optimizer_type {spec.name}: {spec.module} has no {spec.attr}; is {spec.package} too old?")
    return cls


def _torch_optimizer_classes() -> dict[str, type]:
    found = {}
    for attr in dir(torch.optim):
        obj = getattr(torch.optim, attr)
        if isinstance(obj, type) and issubclass(obj, torch.optim.Optimizer) and obj is not torch.optim.Optimizer:
            found[attr] = obj
    return found


def _unknown_optimizer(name: str) -> ValueError:
    return ValueError(
        f"unknown --optimizer_type {name!r}. Built-in names (case-insensitive): {', '.join(BUILTIN_OPTIMIZER_NAMES)}; "
        f"or a torch.optim class ({', '.join(sorted(_torch_optimizer_classes()))}); or a dotted class path such as "
        "bitsandbytes.optim.AdEMAMix8bit"
    )


def _import_class(path: str, flag: str) -> type:
    """A class from a dotted path "package.module.Class"."""
    module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise ValueError(f"{flag} {path!r} is not a dotted class path")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"{flag} {path}: cannot import {module_name} ({e})") from e
    cls = getattr(module, attr, None)
    if cls is None:
        raise ValueError(f"{flag} {path}: {module_name} has no attribute {attr}")
    return cls


def _optimizer_class(name: str) -> tuple[type, _Builtin | None]:
    spec = BUILTIN_OPTIMIZERS.get(name.lower())
    if spec is not None:
        return _import_builtin(spec), spec
    if "." in name:
        cls = _import_class(name, "--optimizer_type")
    else:
        classes = _torch_optimizer_classes()
        cls = classes.get(name) or next((c for n, c in classes.items() if n.lower() == name.lower()), None)
        if cls is None:
            raise _unknown_optimizer(name)
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise ValueError(f"--optimizer_type {name}: {cls!r} is not a torch.optim.Optimizer class")
    return cls, None


def _is_schedule_free_name(name: str) -> bool:
    return name.lower().endswith(SCHEDULE_FREE_SUFFIX)


def is_schedule_free(optimizer: torch.optim.Optimizer) -> bool:
    """Schedule-free optimizers (schedulefree.*ScheduleFree, prodigyplus.ProdigyPlusScheduleFree, ...) keep their own
    schedule, and must be switched with `.train()` before training steps and `.eval()` before evaluating or saving."""
    return (
        _is_schedule_free_name(type(optimizer).__name__)
        and callable(getattr(optimizer, "train", None))
        and callable(getattr(optimizer, "eval", None))
    )


def optimizer_train_mode(optimizer: torch.optim.Optimizer) -> None:
    """Before training steps: puts a schedule-free optimizer in train mode; nothing for other optimizers."""
    if is_schedule_free(optimizer):
        optimizer.train()


def optimizer_eval_mode(optimizer: torch.optim.Optimizer) -> None:
    """Before sampling, validation or saving: puts a schedule-free optimizer's weights in eval mode; nothing otherwise."""
    if is_schedule_free(optimizer):
        optimizer.eval()


def _copy_groups(param_groups: Any) -> list:
    groups = list(param_groups)
    return [dict(g) if isinstance(g, dict) else g for g in groups]


def _group_lrs(groups: list, lr: float | None) -> list:
    return [g.get("lr", lr) if isinstance(g, dict) else lr for g in groups]


def _prepare_adafactor(args: Any, kwargs: dict[str, Any], groups: list, lr: float | None) -> float | None:
    """sd-scripts' Adafactor rules. relative_step defaults to True (transformers' defaults otherwise:
    scale_parameter=True, warmup_init=False); warmup_init=True forces relative_step=True. With relative_step the
    optimizer computes its own lr: lr and the per-group lrs are dropped and the schedule becomes
    "adafactor:<learning_rate>" (args.lr_scheduler is set to it, as sd-scripts does). Returns the lr to pass."""
    kwargs.setdefault("relative_step", True)
    if not kwargs["relative_step"] and kwargs.get("warmup_init", False):
        logger.info("AdaFactor: warmup_init=True needs relative_step=True, so relative_step is set to True")
        kwargs["relative_step"] = True
    if kwargs["relative_step"]:
        dropped = [g.pop("lr", None) for g in groups if isinstance(g, dict)]
        if any(x is not None for x in dropped):
            logger.warning(
                "AdaFactor with relative_step=True computes its own learning rate: the per-group learning rates "
                "(--unet_lr, --text_encoder_lr) are ignored"
            )
        initial_lr = lr if lr is not None else 0.0
        if lr:
            logger.info(f"AdaFactor with relative_step=True: --learning_rate {lr} is only the lr reported before the first step")
        current = str(getattr(args, "lr_scheduler", None) or "constant")
        if current.startswith("adafactor:"):
            return None
        if current not in ("constant", "adafactor"):
            logger.warning(
                f"AdaFactor with relative_step=True schedules its own learning rate: --lr_scheduler {current} is "
                "replaced by adafactor (pass relative_step=False in --optimizer_args to use a schedule)"
            )
        args.lr_scheduler = f"adafactor:{initial_lr}"
        return None
    if lr is None:
        raise ValueError("AdaFactor with relative_step=False needs --learning_rate")
    if getattr(args, "max_grad_norm", 0.0):
        logger.info("AdaFactor with a fixed lr: gradient clipping (--max_grad_norm) is on; sd-scripts suggests --max_grad_norm 0")
    if getattr(args, "lr_scheduler", "constant") != "constant_with_warmup":
        logger.info("AdaFactor with a fixed lr: sd-scripts suggests --lr_scheduler constant_with_warmup")
    if kwargs.get("clip_threshold", 1.0) != 1.0:
        logger.info("AdaFactor: clip_threshold=1.0 is the usual value")
    return lr


def _is_d_adapting(spec: _Builtin) -> bool:
    return spec.name.startswith("DAdapt") or spec.name == "Prodigy"


def _prepare_d_adaptation(spec: _Builtin, kwargs: dict[str, Any], groups: list, lr: float | None) -> None:
    """D-Adaptation and Prodigy estimate the step size d themselves and use d * lr: lr is a multiplier around 1.0.

    They accept only one non-zero lr across groups: DAdaptAdam, DAdaptAdamPreprint, DAdaptLion, DAdaptSGD and Prodigy
    raise at the first step when group lrs differ (other than 0, which freezes a group); DAdaptAdaGrad, DAdaptAdan and
    DAdaptAdanIP use the first group's lr for every group. So with several lrs (--unet_lr / --text_encoder_lr,
    LoRA+ groups), every non-zero group lr becomes the first non-zero one, with a warning, except for DAdaptAdam,
    whose per-group `layer_scale` multiplies the step: there a group's lr ratio to the first becomes its layer_scale
    and nothing is lost. The groups are modified in place (they are `make_optimizer`'s copies)."""
    lrs = _group_lrs(groups, lr) if groups else [lr]
    first = lrs[0]
    if first is not None and first <= 0.1:
        logger.warning(f"{spec.name} adapts the step size itself and expects --learning_rate around 1.0 (got {first})")
    nonzero = [x for x in lrs if x]
    if len(set(nonzero)) <= 1:
        return
    ref = nonzero[0]
    dict_groups = [g for g in groups if isinstance(g, dict)]
    if spec.attr == "DAdaptAdam":
        base = float(kwargs.get("layer_scale", 1.0))
        for g, x in zip(dict_groups, lrs):
            if x:
                g["lr"], g["layer_scale"] = ref, base * x / ref
        logger.info(f"{spec.name}: the group learning rates {lrs} become lr={ref} with layer_scale = lr / {ref}")
        return
    for g, x in zip(dict_groups, lrs):
        if x:
            g["lr"] = ref
    logger.warning(
        f"{spec.name} supports only one learning rate across parameter groups (besides 0): the groups' "
        f"{lrs} all use the first, {ref} (DAdaptAdam can scale groups apart)"
    )


def d_adapted_lrs(optimizer: Any) -> list[float] | None:
    """The step size each parameter group really takes under D-Adaptation or Prodigy, d * lr (* DAdaptAdam's
    layer_scale), which sd-scripts logs as `lr/d*lr`; None for an optimizer that does not adapt d. Accepts an
    accelerate-wrapped optimizer. Reads Python floats only (no device sync)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    groups = getattr(inner, "param_groups", None)
    if not groups or any("d" not in g for g in groups):
        return None
    return [float(g["d"]) * float(g["lr"]) * float(g.get("layer_scale", 1.0)) for g in groups]


def _fused_on_cuda(cls: type, kwargs: dict, groups: list) -> dict:
    """fused=True for torch's Adam/AdamW when every parameter is on a CUDA device and --optimizer_args chooses no
    implementation: one kernel updates every parameter (instead of several per tensor group). Not part of ss_optimizer:
    the update is the same."""
    if cls not in (torch.optim.Adam, torch.optim.AdamW) or "fused" in kwargs or "foreach" in kwargs:
        return {}
    params = [p for g in groups for p in (g["params"] if isinstance(g, dict) else [g])]
    return {"fused": True} if params and all(p.is_cuda and p.is_floating_point() for p in params) else {}


def make_optimizer(args: Any, param_groups: list) -> tuple[str, str, torch.optim.Optimizer]:
    """Build the optimizer of `--optimizer_type` for `param_groups` (dicts with "params" and optionally "lr", or
    plain parameters), with `--learning_rate` as the default lr and `--optimizer_args` as keyword arguments.

    Returns `(name, args_string, optimizer)`: name is "module.Class" of the optimizer class and args_string the
    keyword arguments as "k=v,k=v" (including defaults kiln sets, e.g. SGDNesterov's momentum=0.9); together they
    form `ss_optimizer` (see `optimizer_metadata`). The caller's group dicts are not modified.

    AdaFactor follows sd-scripts: see `_prepare_adafactor` (it may set args.lr_scheduler). Schedule-free optimizers
    are returned in train mode.
    """
    name = resolve_optimizer_type(args)
    kwargs = parse_kv_args(getattr(args, "optimizer_args", None), "--optimizer_args")
    if "lr" in kwargs:
        raise ValueError("--optimizer_args: give the learning rate with --learning_rate, not lr=")
    lr = getattr(args, "learning_rate", None)
    groups = _copy_groups(param_groups)
    cls, spec = _optimizer_class(name)

    fixed: dict[str, Any] = {}
    if spec is not None:
        fixed = dict(spec.fixed)
        for key, value in fixed.items():
            if key in kwargs and kwargs[key] != value:
                raise ValueError(
                    f"--optimizer_type {spec.name} always uses {key}={value}; for {key}={kwargs[key]} use "
                    f"--optimizer_type {cls.__module__}.{cls.__name__}"
                )
            kwargs.pop(key, None)
        for key, value in spec.defaults:
            if key not in kwargs:
                logger.info(f"{spec.name}: {key}={value} (set it in --optimizer_args to change it)")
                kwargs[key] = value
        if spec.name == "SGDNesterov8bit":
            logger.warning(
                "SGDNesterov8bit: bitsandbytes' SGD8bit ignores nesterov=True, so this is 8-bit SGD with plain momentum "
                "(as in sd-scripts); use SGDNesterov for Nesterov momentum"
            )
        if spec.name == "AdaFactor":
            lr = _prepare_adafactor(args, kwargs, groups, lr)
        elif _is_d_adapting(spec):
            _prepare_d_adaptation(spec, kwargs, groups, lr)

    if lr is None and not (spec is not None and spec.name == "AdaFactor"):
        group_lrs = _group_lrs(groups, None)
        if not group_lrs or any(x is None for x in group_lrs):
            raise ValueError(f"--optimizer_type {name} needs --learning_rate")
        lr = group_lrs[0]  # every group has its own lr; the default only has to be valid

    try:
        optimizer = cls(groups, lr=lr, **fixed, **kwargs, **_fused_on_cuda(cls, kwargs, groups))
    except TypeError as e:
        raise ValueError(
            f"--optimizer_type {name} ({cls.__module__}.{cls.__name__}) rejected --optimizer_args {kwargs}: {e}"
        ) from e

    if is_schedule_free(optimizer):
        optimizer.train()

    full_name = f"{cls.__module__}.{cls.__name__}"
    args_string = ",".join(f"{k}={v}" for k, v in kwargs.items())
    logger.info(f"optimizer: {optimizer_metadata(full_name, args_string)}")
    return full_name, args_string, optimizer


def optimizer_metadata(name: str, args_string: str) -> str:
    """The `ss_optimizer` metadata value: "torch.optim.adamw.AdamW" or "torch.optim.adamw.AdamW(weight_decay=0.01)"."""
    return f"{name}({args_string})" if args_string else name


# --------------------------------------------------------------------------------------------------------------------
# learning-rate schedulers

# Which of the shared scheduler flags each named schedule uses; any other one set to a non-default value is an error.
_SCHEDULE_USES: dict[str, frozenset[str]] = {
    "constant": frozenset(),
    "constant_with_warmup": frozenset({"warmup"}),
    "linear": frozenset({"warmup"}),
    "cosine": frozenset({"warmup"}),
    "cosine_with_restarts": frozenset({"warmup", "cycles"}),
    "polynomial": frozenset({"warmup", "power"}),
    "inverse_sqrt": frozenset({"warmup", "timescale"}),
    "cosine_with_min_lr": frozenset({"warmup", "cycles", "min_lr_ratio"}),
    "cosine_warmup_with_min_lr": frozenset({"warmup", "cycles", "min_lr_ratio"}),
    "warmup_stable_decay": frozenset({"warmup", "decay", "cycles", "min_lr_ratio"}),
    "reduce_lr_on_plateau": frozenset(),
    "greedy": frozenset(),
    "piecewise_constant": frozenset(),
    "adafactor": frozenset(),
}
# Schedules that divide by the training steps (and therefore need a positive count).
_NEEDS_TOTAL = {
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "cosine_with_min_lr",
    "cosine_warmup_with_min_lr",
    "warmup_stable_decay",
}
# Schedules driven by a metric: the training loop must call scheduler.step(metric).
METRIC_SCHEDULERS = frozenset({"reduce_lr_on_plateau", "greedy"})

_FLAG_HINTS = {
    "warmup": ("--lr_warmup_steps", "schedules with a warmup: constant_with_warmup, linear, cosine, ..."),
    "decay": ("--lr_decay_steps", "only warmup_stable_decay has decay steps"),
    "cycles": ("--lr_scheduler_num_cycles", "cycles are used by cosine_with_restarts, cosine_with_min_lr, warmup_stable_decay"),
    "power": ("--lr_scheduler_power", "only polynomial has a power"),
    "timescale": ("--lr_scheduler_timescale", "only inverse_sqrt has a time scale"),
    "min_lr_ratio": ("--lr_scheduler_min_lr_ratio", "used by cosine_with_min_lr and warmup_stable_decay"),
}


def scheduler_needs_metric(scheduler: Any) -> bool:
    """True when the scheduler must be stepped with a metric (ReduceLROnPlateau, GreedyLR): `scheduler.step(loss)`."""
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        return True
    return type(scheduler).__name__ == "GreedyLR"


def _check_unused(label: str, uses: frozenset[str], settings: dict[str, Any], hint: str = "") -> None:
    defaults = {"warmup": 0, "decay": 0, "cycles": 1, "power": 1.0, "timescale": None, "min_lr_ratio": None}
    problems = []
    for key, value in settings.items():
        if key not in uses and value != defaults[key]:
            flag, why = _FLAG_HINTS[key]
            problems.append(f"{flag} {value} ({why})")
    if problems:
        raise ValueError(
            f"{label} does not use "
            + "; ".join(problems)
            + (f". {hint}" if hint else "")
            + ". Remove the flag(s) or pick another schedule."
        )


def _call_scheduler(label: str, func: Any, optimizer: torch.optim.Optimizer, kwargs: dict[str, Any]) -> Any:
    try:
        return func(optimizer, **kwargs)
    except TypeError as e:
        raise ValueError(f"{label}: invalid arguments {kwargs} ({e}); check --lr_scheduler_args") from e


def make_lr_scheduler(args: Any, optimizer: torch.optim.Optimizer, num_training_steps: int, num_processes: int = 1) -> Any:
    """The scheduler of `--lr_scheduler` (or `--lr_scheduler_type`) for `optimizer`.

    `num_training_steps` is the number of optimizer steps of the run (max_train_steps) and `num_processes` the
    number of accelerate processes: the schedule spans `num_training_steps * num_processes` scheduler steps because
    accelerate steps a prepared scheduler once per process (see the module docstring for what that means for
    integer warmup counts).

    - transformers schedules: warmup from --lr_warmup_steps; cosine_with_restarts gets --lr_scheduler_num_cycles;
      polynomial --lr_scheduler_power; inverse_sqrt --lr_scheduler_timescale; cosine_with_min_lr and
      warmup_stable_decay get num_cycles/2 waves and --lr_scheduler_min_lr_ratio; warmup_stable_decay decays over
      --lr_decay_steps after a stable phase of the remaining steps. --lr_scheduler_args are passed on and win over
      the values from these flags (e.g. lr_end=1e-6 for polynomial, decay_type=linear for warmup_stable_decay).
      reduce_lr_on_plateau (and greedy) take only --lr_scheduler_args and are stepped with a metric
      (see `scheduler_needs_metric`).
    - piecewise_constant (diffusers): --lr_scheduler_args step_rules="1:10,0.1:20,0.01" (multiplier 1 before step
      10, 0.1 before step 20, then 0.01).
    - adafactor / adafactor:<initial lr>: transformers' AdafactorSchedule for a relative_step AdaFactor (set
      automatically by `make_optimizer`).
    - --lr_scheduler_type: any scheduler class, by dotted path or torch.optim.lr_scheduler name, constructed as
      cls(optimizer, **lr_scheduler_args).
    - a schedule-free optimizer gets a constant schedule, and any other schedule is an error.
    """
    num_processes = max(1, int(num_processes or 1))
    total = int(num_training_steps or 0) * num_processes
    name = str(getattr(args, "lr_scheduler", None) or "constant").strip()
    kwargs = parse_kv_args(getattr(args, "lr_scheduler_args", None), "--lr_scheduler_args")
    custom = (getattr(args, "lr_scheduler_type", None) or "").strip()
    cycles = getattr(args, "lr_scheduler_num_cycles", None)
    power = getattr(args, "lr_scheduler_power", None)
    settings = {
        "warmup": resolve_steps(getattr(args, "lr_warmup_steps", 0), total, "--lr_warmup_steps"),
        "decay": resolve_steps(getattr(args, "lr_decay_steps", 0), total, "--lr_decay_steps"),
        "cycles": 1 if cycles is None else cycles,
        "power": 1.0 if power is None else power,
        "timescale": getattr(args, "lr_scheduler_timescale", None),
        "min_lr_ratio": getattr(args, "lr_scheduler_min_lr_ratio", None),
    }
    warmup, decay = settings["warmup"], settings["decay"]

    if is_schedule_free(optimizer):
        if custom or name.lower() != "constant" or kwargs:
            raise ValueError(
                f"{type(optimizer).__name__} is schedule-free and keeps its own learning-rate schedule: use "
                "--lr_scheduler constant without --lr_scheduler_type/--lr_scheduler_args (its warmup is "
                "--optimizer_args warmup_steps=N)"
            )
        _check_unused(
            f"schedule-free {type(optimizer).__name__}", frozenset(), settings, "Its warmup is --optimizer_args warmup_steps=N"
        )
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)

    if custom:
        if name.lower() != "constant":
            logger.warning(f"--lr_scheduler_type {custom} is used; --lr_scheduler {name} is ignored")
        if "." in custom:
            cls = _import_class(custom, "--lr_scheduler_type")
        else:
            cls = getattr(torch.optim.lr_scheduler, custom, None)
            if not isinstance(cls, type):
                raise ValueError(f"--lr_scheduler_type {custom}: torch.optim.lr_scheduler has no such class; give a dotted path")
        _check_unused(
            f"--lr_scheduler_type {custom}", frozenset(), settings, "Give the class's own arguments in --lr_scheduler_args"
        )
        return _call_scheduler(f"--lr_scheduler_type {custom}", cls, optimizer, kwargs)

    key = name.lower()
    if key == "adafactor" or key.startswith("adafactor:"):
        from transformers.optimization import Adafactor, AdafactorSchedule

        if not isinstance(optimizer, Adafactor):
            raise ValueError(f"--lr_scheduler {name} works only with --optimizer_type AdaFactor (relative_step=True)")
        if key == "adafactor":
            initial_lr = float(getattr(args, "learning_rate", None) or 0.0)
        else:
            try:
                initial_lr = float(name.split(":", 1)[1])
            except ValueError:
                raise ValueError(f"--lr_scheduler {name}: expected adafactor:<initial lr>, e.g. adafactor:1e-4") from None
        _check_unused(
            "--lr_scheduler adafactor", frozenset(), settings, "AdaFactor warms up itself with --optimizer_args warmup_init=True"
        )
        if kwargs:
            raise ValueError(f"--lr_scheduler adafactor takes no --lr_scheduler_args (got {kwargs})")
        return AdafactorSchedule(optimizer, initial_lr)

    if key == "piecewise_constant":
        from diffusers.optimization import get_piecewise_constant_schedule

        _check_unused("--lr_scheduler piecewise_constant", frozenset(), settings, "Its steps are in step_rules")
        if "step_rules" not in kwargs:
            raise ValueError(
                'piecewise_constant needs --lr_scheduler_args step_rules="1:10,0.1:20,0.01" '
                "(lr multiplier 1 before step 10, 0.1 before step 20, then 0.01)"
            )
        kwargs["step_rules"] = str(kwargs["step_rules"])
        try:
            return _call_scheduler("piecewise_constant", get_piecewise_constant_schedule, optimizer, kwargs)
        except ValueError as e:
            if "check --lr_scheduler_args" in str(e):
                raise
            raise ValueError(f"piecewise_constant: bad step_rules {kwargs['step_rules']!r} ({e})") from e

    from transformers import SchedulerType
    from transformers.optimization import TYPE_TO_SCHEDULER_FUNCTION

    if key not in _transformers_scheduler_names():
        raise ValueError(
            f"unknown --lr_scheduler {name!r}; supported: {', '.join(scheduler_names())}, adafactor:<initial lr>; "
            "or a scheduler class with --lr_scheduler_type"
        )
    uses = _SCHEDULE_USES.get(key)
    if uses is None:  # a schedule added by a newer transformers: pass warmup and steps, and nothing else
        uses = frozenset({"warmup"})
    _check_unused(f"--lr_scheduler {key}", uses, settings)

    if key in _NEEDS_TOTAL and total <= 0:
        raise ValueError(f"--lr_scheduler {key} needs a positive number of training steps (got {total})")
    if "warmup" in uses and total > 0 and warmup + decay > total:
        raise ValueError(
            f"--lr_scheduler {key}: warmup ({warmup}) " + (f"+ decay ({decay}) " if decay else "") + f"steps exceed the {total} "
            f"scheduler steps of the run (max_train_steps x {num_processes} processes)"
        )

    call: dict[str, Any] = {}
    if key in ("reduce_lr_on_plateau", "greedy", "constant"):
        pass
    elif key in ("constant_with_warmup", "inverse_sqrt"):
        call["num_warmup_steps"] = warmup
        if key == "inverse_sqrt":
            call["timescale"] = settings["timescale"]
    elif key == "warmup_stable_decay":
        call.update(
            num_warmup_steps=warmup,
            num_decay_steps=decay,
            num_stable_steps=total - warmup - decay,
            num_cycles=settings["cycles"] / 2,
            min_lr_ratio=settings["min_lr_ratio"] if settings["min_lr_ratio"] is not None else 0.0,
        )
    else:
        call.update(num_warmup_steps=warmup, num_training_steps=total)
        if key == "cosine_with_restarts":
            call["num_cycles"] = settings["cycles"]
        elif key == "polynomial":
            call["power"] = settings["power"]
        elif key in ("cosine_with_min_lr", "cosine_warmup_with_min_lr"):
            call["num_cycles"] = settings["cycles"] / 2
            if settings["min_lr_ratio"] is not None:
                call["min_lr_rate"] = settings["min_lr_ratio"]
            elif "min_lr" not in kwargs and "min_lr_rate" not in kwargs:
                raise ValueError(f"--lr_scheduler {key} needs --lr_scheduler_min_lr_ratio (e.g. 0.1)")
    call.update(kwargs)
    return _call_scheduler(f"--lr_scheduler {key}", TYPE_TO_SCHEDULER_FUNCTION[SchedulerType(key)], optimizer, call)
