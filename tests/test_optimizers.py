"""library/optimizers.py: optimizer construction and metadata, argument parsing, learning-rate schedules."""

from __future__ import annotations

import argparse
import logging
import math
import sys
import types

import pytest
import torch

from library.optimizers import (
    BUILTIN_OPTIMIZER_NAMES,
    add_optimizer_arguments,
    is_schedule_free,
    make_lr_scheduler,
    make_optimizer,
    optimizer_eval_mode,
    optimizer_metadata,
    parse_kv_args,
    parse_steps_or_ratio,
    resolve_steps,
    scheduler_names,
    scheduler_needs_metric,
)

LR = 2e-3

# torch warns about its own jit-scripted mkldnn module when bitsandbytes is first imported
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_optimizer_arguments(parser)
    return parser.parse_args(list(argv))


def param(shape=(64, 64), seed=0) -> torch.nn.Parameter:
    # 64 x 64 = 4096 elements: bitsandbytes keeps 8-bit state from min_8bit_size=4096 on, so the 8-bit paths run
    g = torch.Generator().manual_seed(seed)
    return torch.nn.Parameter(torch.randn(shape, generator=g))


# --------------------------------------------------------------------------------------------------------------------
# arguments


def test_defaults_match_sd_scripts():
    a = parse()
    assert a.optimizer_type == "AdamW"
    assert a.optimizer_args is None
    assert a.use_8bit_adam is False and a.use_lion_optimizer is False
    assert a.learning_rate == 2e-6
    assert a.max_grad_norm == 1.0
    assert a.lr_scheduler == "constant"
    assert a.lr_warmup_steps == 0 and a.lr_decay_steps == 0
    assert a.lr_scheduler_num_cycles == 1 and a.lr_scheduler_power == 1.0
    assert a.lr_scheduler_timescale is None and a.lr_scheduler_min_lr_ratio is None
    assert a.lr_scheduler_type == "" and a.lr_scheduler_args is None


def test_set_defaults_can_override_learning_rate():
    parser = argparse.ArgumentParser()
    add_optimizer_arguments(parser)
    parser.set_defaults(learning_rate=1e-4)
    assert parser.parse_args([]).learning_rate == 1e-4


@pytest.mark.parametrize(
    "text, expected",
    [("10", 10), ("0", 0), ("0.1", 0.1), ("10%", 0.1), ("2.5%", 0.025), ("100%", 1.0), ("10.0", 10), ("1", 1), ("1.0", 1)],
)
def test_warmup_forms_on_the_command_line(text, expected):
    value = parse("--lr_warmup_steps", text).lr_warmup_steps
    assert value == expected and type(value) is type(expected)
    assert parse("--lr_decay_steps", text).lr_decay_steps == expected


@pytest.mark.parametrize("text", ["1.5", "abc", "-1", "-5%", "150%", "x%", "nan"])
def test_bad_warmup_forms_are_rejected(text, capsys):
    with pytest.raises(SystemExit):
        parse("--lr_warmup_steps", text)
    assert "--lr_warmup_steps" in capsys.readouterr().err


def test_resolve_steps():
    assert resolve_steps(10, 100) == 10
    assert resolve_steps(0.1, 100) == 10
    assert resolve_steps("10%", 100) == 10
    assert resolve_steps("0.25", 100) == 25
    assert resolve_steps(0.15, 30) == 4  # floored, as sd-scripts
    assert resolve_steps(1.0, 80) == 80  # a float 1.0 (config file) is the whole run, as in sd-scripts
    assert resolve_steps(20.0, 80) == 20
    assert resolve_steps(None, 80) == 0
    for bad in (True, -1, 1.5, "abc", [1]):
        with pytest.raises(ValueError, match="--lr_warmup_steps"):
            resolve_steps(bad, 100)
    assert parse_steps_or_ratio("5%") == 0.05


def test_optimizer_args_parsing():
    parsed = parse_kv_args(
        [
            "weight_decay=0.01",
            "eps=1e-8",
            "steps=3",
            "decouple=True",
            "amsgrad=false",
            "betas=0.9,0.999",
            "betas2=(0.8, 0.9)",
            "sizes=[1, 2]",
            "decay_type=linear",
            "quoted='cosine'",
            "step_rules=1:10,0.1:20,0.01",
            "expr=a=b",
            "nothing=None",
            "empty=",
        ]
    )
    assert parsed == {
        "weight_decay": 0.01,
        "eps": 1e-8,
        "steps": 3,
        "decouple": True,
        "amsgrad": False,
        "betas": (0.9, 0.999),
        "betas2": (0.8, 0.9),
        "sizes": [1, 2],
        "decay_type": "linear",
        "quoted": "cosine",
        "step_rules": "1:10,0.1:20,0.01",
        "expr": "a=b",
        "nothing": None,
        "empty": "",
    }
    assert type(parsed["steps"]) is int
    assert parse_kv_args(None) == {}
    assert parse_kv_args([]) == {}
    assert parse_kv_args("weight_decay=0.1 betas=0.9,0.99") == {"weight_decay": 0.1, "betas": (0.9, 0.99)}
    assert parse_kv_args(["a=1", "a=2"]) == {"a": 2}
    with pytest.raises(ValueError, match="not key=value"):
        parse_kv_args(["weight_decay"])
    with pytest.raises(ValueError, match="not key=value"):
        parse_kv_args(["=3"])
    with pytest.raises(ValueError, match="not a valid argument name"):
        parse_kv_args(["weight decay=3"])


def test_optimizer_args_from_the_command_line():
    a = parse("--optimizer_args", "weight_decay=0.05", "betas=0.8,0.9", "--learning_rate", "1e-3")
    name, args_string, opt = make_optimizer(a, [param()])
    assert args_string == "weight_decay=0.05,betas=(0.8, 0.9)"
    assert opt.param_groups[0]["weight_decay"] == 0.05 and opt.param_groups[0]["betas"] == (0.8, 0.9)
    assert opt.param_groups[0]["lr"] == 1e-3


# --------------------------------------------------------------------------------------------------------------------
# optimizers

BUILTIN_CLASSES = {
    "AdamW": "torch.optim.adamw.AdamW",
    "AdamW8bit": "bitsandbytes.optim.adamw.AdamW8bit",
    "PagedAdamW": "bitsandbytes.optim.adamw.PagedAdamW",
    "PagedAdamW8bit": "bitsandbytes.optim.adamw.PagedAdamW8bit",
    "PagedAdamW32bit": "bitsandbytes.optim.adamw.PagedAdamW32bit",
    "Lion": "lion_pytorch.lion_pytorch.Lion",
    "Lion8bit": "bitsandbytes.optim.lion.Lion8bit",
    "PagedLion8bit": "bitsandbytes.optim.lion.PagedLion8bit",
    "SGDNesterov": "torch.optim.sgd.SGD",
    "SGDNesterov8bit": "bitsandbytes.optim.sgd.SGD8bit",
    "AdaFactor": "transformers.optimization.Adafactor",
}


@pytest.mark.filterwarnings("ignore:Paged optimizers are not supported on CPU")
@pytest.mark.parametrize("name", list(BUILTIN_CLASSES))
def test_every_builtin_optimizer_steps(name):
    a = parse("--optimizer_type", name, "--learning_rate", "1e-2")
    weight, bias = param(), param((64,), seed=1)
    target = torch.zeros(64, 64)
    full_name, _, opt = make_optimizer(a, [{"params": [weight]}, {"params": [bias], "lr": 5e-3}])
    assert full_name == BUILTIN_CLASSES[name]
    assert type(opt).__module__ + "." + type(opt).__name__ == full_name
    assert len(opt.param_groups) == 2

    def loss_fn():
        return ((weight - target) ** 2).mean() + (bias**2).mean()

    before = weight.detach().clone()
    first = loss_fn().item()
    for _ in range(5):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
    assert torch.isfinite(weight).all() and torch.isfinite(bias).all()
    assert not torch.equal(weight.detach(), before)
    assert loss_fn().item() < first
    if "8bit" in name:
        assert opt.state[weight]["state1"].dtype == torch.uint8  # the 8-bit path, not a 32-bit fallback


def test_builtin_names_are_case_insensitive():
    assert make_optimizer(parse("--optimizer_type", "adamw8BIT"), [param()])[0] == "bitsandbytes.optim.adamw.AdamW8bit"
    assert make_optimizer(parse("--optimizer_type", "sgdnesterov"), [param()])[0] == "torch.optim.sgd.SGD"
    assert make_optimizer(parse("--optimizer_type", ""), [param()])[0] == "torch.optim.adamw.AdamW"


def test_metadata_strings():
    name, args_string, _ = make_optimizer(parse(), [param()])
    assert (name, args_string) == ("torch.optim.adamw.AdamW", "")
    assert optimizer_metadata(name, args_string) == "torch.optim.adamw.AdamW"

    name, args_string, _ = make_optimizer(parse("--optimizer_args", "weight_decay=0.01"), [param()])
    assert optimizer_metadata(name, args_string) == "torch.optim.adamw.AdamW(weight_decay=0.01)"

    # SGDNesterov: momentum 0.9 is filled in and recorded; nesterov=True is implied by the name and not recorded
    name, args_string, opt = make_optimizer(parse("--optimizer_type", "SGDNesterov"), [param()])
    assert optimizer_metadata(name, args_string) == "torch.optim.sgd.SGD(momentum=0.9)"
    assert opt.param_groups[0]["nesterov"] is True and opt.param_groups[0]["momentum"] == 0.9
    _, args_string, opt = make_optimizer(parse("--optimizer_type", "SGDNesterov", "--optimizer_args", "momentum=0.5"), [param()])
    assert args_string == "momentum=0.5" and opt.param_groups[0]["momentum"] == 0.5

    a = parse("--optimizer_type", "SGDNesterov8bit")
    name, args_string, opt = make_optimizer(a, [param()])
    assert optimizer_metadata(name, args_string) == "bitsandbytes.optim.sgd.SGD8bit(momentum=0.9)"
    assert opt.defaults["betas"] == (0.9, 0)  # bitsandbytes keeps (momentum, dampening) there

    a = parse("--optimizer_type", "AdaFactor", "--learning_rate", "1e-4")
    assert optimizer_metadata(*make_optimizer(a, [param()])[:2]) == "transformers.optimization.Adafactor(relative_step=True)"


def test_sgd_nesterov_refuses_nesterov_false():
    with pytest.raises(ValueError, match="always uses nesterov=True"):
        make_optimizer(parse("--optimizer_type", "SGDNesterov", "--optimizer_args", "nesterov=False"), [param()])


def test_adafactor_relative_step_follows_sd_scripts():
    a = parse("--optimizer_type", "AdaFactor", "--learning_rate", "1e-4", "--lr_scheduler", "cosine")
    groups = [{"params": [param()], "lr": 1e-3}, {"params": [param((64,))], "lr": 5e-4}]
    _, args_string, opt = make_optimizer(a, groups)
    assert args_string == "relative_step=True"
    assert opt.defaults["relative_step"] is True and opt.defaults["scale_parameter"] is True
    assert opt.defaults["warmup_init"] is False  # transformers' default, as in sd-scripts
    assert opt.defaults["lr"] is None and all(g["lr"] is None for g in opt.param_groups)
    assert groups[0]["lr"] == 1e-3  # the caller's groups are not modified
    assert a.lr_scheduler == "adafactor:0.0001"  # the schedule is replaced, as sd-scripts does
    sched = make_lr_scheduler(a, opt, 100)
    assert type(sched).__name__ == "AdafactorSchedule"
    assert sched.get_last_lr() == [1e-4, 1e-4]


def test_adafactor_warmup_init_forces_relative_step():
    a = parse("--optimizer_type", "adafactor", "--optimizer_args", "relative_step=False", "warmup_init=True")
    _, args_string, opt = make_optimizer(a, [param()])
    assert opt.defaults["relative_step"] is True and opt.defaults["warmup_init"] is True
    assert args_string == "relative_step=True,warmup_init=True"


def test_adafactor_fixed_lr_keeps_schedule():
    a = parse(
        "--optimizer_type",
        "AdaFactor",
        "--optimizer_args",
        "relative_step=False",
        "scale_parameter=False",
        "--learning_rate",
        "1e-3",
        "--lr_scheduler",
        "constant_with_warmup",
        "--lr_warmup_steps",
        "10",
    )
    _, args_string, opt = make_optimizer(a, [param()])
    assert args_string == "relative_step=False,scale_parameter=False"
    assert opt.param_groups[0]["lr"] == 1e-3 and a.lr_scheduler == "constant_with_warmup"
    sched = make_lr_scheduler(a, opt, 100)
    assert sched.get_last_lr() == [0.0]


def test_legacy_flags():
    assert make_optimizer(parse("--use_8bit_adam"), [param()])[0] == "bitsandbytes.optim.adamw.AdamW8bit"
    assert make_optimizer(parse("--use_8bit_adam", "--optimizer_type", "AdamW8bit"), [param()])[0].endswith("AdamW8bit")
    assert make_optimizer(parse("--use_lion_optimizer"), [param()])[0] == "lion_pytorch.lion_pytorch.Lion"
    with pytest.raises(ValueError, match="cannot be combined with --optimizer_type Lion8bit"):
        make_optimizer(parse("--use_8bit_adam", "--optimizer_type", "Lion8bit"), [param()])
    with pytest.raises(ValueError, match="--use_lion_optimizer means"):
        make_optimizer(parse("--use_lion_optimizer", "--optimizer_type", "SGDNesterov"), [param()])
    with pytest.raises(ValueError, match="cannot be used together"):
        make_optimizer(parse("--use_8bit_adam", "--use_lion_optimizer"), [param()])


def test_dotted_path_and_bare_torch_names():
    name, _, opt = make_optimizer(parse("--optimizer_type", "torch.optim.RMSprop", "--optimizer_args", "alpha=0.9"), [param()])
    assert name == "torch.optim.rmsprop.RMSprop" and opt.param_groups[0]["alpha"] == 0.9
    assert make_optimizer(parse("--optimizer_type", "RMSprop"), [param()])[0] == "torch.optim.rmsprop.RMSprop"
    assert make_optimizer(parse("--optimizer_type", "rmsprop"), [param()])[0] == "torch.optim.rmsprop.RMSprop"
    assert make_optimizer(parse("--optimizer_type", "Adam"), [param()])[0] == "torch.optim.adam.Adam"

    p = param()
    name, _, opt = make_optimizer(parse("--optimizer_type", "bitsandbytes.optim.AdEMAMix8bit", "--learning_rate", "1e-2"), [p])
    assert name == "bitsandbytes.optim.ademamix.AdEMAMix8bit"
    before = p.detach().clone()
    (p**2).sum().backward()
    opt.step()
    assert not torch.equal(p.detach(), before)


def test_unknown_optimizers():
    with pytest.raises(ValueError) as e:
        make_optimizer(parse("--optimizer_type", "NoSuchOptimizer"), [param()])
    message = str(e.value)
    assert "NoSuchOptimizer" in message
    for builtin in BUILTIN_OPTIMIZER_NAMES:
        assert builtin in message
    with pytest.raises(ValueError, match="cannot import no_such_module"):
        make_optimizer(parse("--optimizer_type", "no_such_module.Opt"), [param()])
    with pytest.raises(ValueError, match="has no attribute NoSuch"):
        make_optimizer(parse("--optimizer_type", "torch.optim.NoSuch"), [param()])
    with pytest.raises(ValueError, match="not a torch.optim.Optimizer"):
        make_optimizer(parse("--optimizer_type", "torch.nn.Linear"), [param()])


def test_bad_optimizer_args():
    with pytest.raises(ValueError, match="rejected --optimizer_args"):
        make_optimizer(parse("--optimizer_args", "no_such_arg=1"), [param()])
    with pytest.raises(ValueError, match="--learning_rate"):
        make_optimizer(parse("--optimizer_args", "lr=1"), [param()])
    a = parse()
    a.learning_rate = None
    with pytest.raises(ValueError, match="needs --learning_rate"):
        make_optimizer(a, [param()])
    opt = make_optimizer(a, [{"params": [param()], "lr": 1e-3}, {"params": [param((3,))], "lr": 2e-3}])[2]
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 2e-3]


@pytest.mark.parametrize(
    "name, package",
    [
        ("DAdaptation", "dadaptation"),
        ("DAdaptAdam", "dadaptation"),
        ("DAdaptLion", "dadaptation"),
        ("Prodigy", "prodigyopt"),
        ("AdamWScheduleFree", "schedulefree"),
    ],
)
def test_missing_optional_packages_name_the_package(name, package, monkeypatch):
    monkeypatch.setitem(sys.modules, package, None)  # makes `import package` fail even where it is installed
    with pytest.raises(ImportError, match=f"pip install {package}"):
        make_optimizer(parse("--optimizer_type", name), [param()])


# The real packages (pinned in requirements.txt): the class each name builds, and --optimizer_args to pass through.
REAL_CLASSES = {
    "DAdaptation": ("dadaptation.experimental.dadapt_adam_preprint.DAdaptAdamPreprint", ["decouple=True", "weight_decay=0.01"]),
    "DAdaptAdamPreprint": ("dadaptation.experimental.dadapt_adam_preprint.DAdaptAdamPreprint", []),
    "DAdaptAdaGrad": ("dadaptation.dadapt_adagrad.DAdaptAdaGrad", ["momentum=0.5"]),
    "DAdaptAdam": ("dadaptation.dadapt_adam.DAdaptAdam", ["decouple=True", "weight_decay=0.01"]),
    "DAdaptAdan": ("dadaptation.dadapt_adan.DAdaptAdan", []),
    "DAdaptAdanIP": ("dadaptation.experimental.dadapt_adan_ip.DAdaptAdanIP", []),
    "DAdaptLion": ("dadaptation.dadapt_lion.DAdaptLion", []),
    "DAdaptSGD": ("dadaptation.dadapt_sgd.DAdaptSGD", ["momentum=0.9"]),
    "Prodigy": ("prodigyopt.prodigy.Prodigy", ["d_coef=2.0", "safeguard_warmup=True", "weight_decay=0.01"]),
    "AdamWScheduleFree": ("schedulefree.adamw_schedulefree.AdamWScheduleFree", ["warmup_steps=2", "weight_decay=0.01"]),
    "RAdamScheduleFree": ("schedulefree.radam_schedulefree.RAdamScheduleFree", []),
    "SGDScheduleFree": ("schedulefree.sgd_schedulefree.SGDScheduleFree", ["momentum=0.8"]),
}


def _real_class(path: str) -> type:
    import importlib

    module, _, attr = path.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def _two_steps(opt, weight, bias, steps=2):
    target = torch.linspace(-1, 1, weight.numel()).reshape(weight.shape)
    for _ in range(steps):
        opt.zero_grad()
        (((weight - target) ** 2).mean() + (bias**2).mean()).backward()
        opt.step()


@pytest.mark.parametrize("name", list(REAL_CLASSES))
def test_real_optional_optimizers_build_and_step_as_their_package(name):
    """Each name builds the real class of dadaptation / prodigyopt / schedulefree with --optimizer_args passed on,
    and kiln's optimizer takes exactly the steps of the class constructed by hand."""
    path, extra = REAL_CLASSES[name]
    lr = 1e-2 if "ScheduleFree" in name else 1.0
    a = parse("--optimizer_type", name, "--learning_rate", str(lr), *(["--optimizer_args", *extra] if extra else []))
    weight, bias = param(), param((64,), seed=1)
    full_name, args_string, opt = make_optimizer(a, [{"params": [weight]}, {"params": [bias]}])
    cls = _real_class(path)
    assert type(opt) is cls and full_name == path
    assert optimizer_metadata(full_name, args_string) == (f"{path}({','.join(extra)})" if extra else path)
    assert is_schedule_free(opt) == ("ScheduleFree" in name)

    ref_weight, ref_bias = param(), param((64,), seed=1)
    ref = cls([{"params": [ref_weight]}, {"params": [ref_bias]}], lr=lr, **parse_kv_args(extra))
    if "ScheduleFree" in name:
        ref.train()  # schedulefree refuses to step in eval mode; kiln returns its optimizer in train mode
    before = weight.detach().clone()
    steps = 6 if name == "RAdamScheduleFree" else 2  # RAdam's first steps change nothing (its rectification warmup)
    _two_steps(opt, weight, bias, steps)
    _two_steps(ref, ref_weight, ref_bias, steps)
    assert not torch.equal(weight.detach(), before)
    assert torch.equal(weight.detach(), ref_weight.detach()) and torch.equal(bias.detach(), ref_bias.detach())


@pytest.mark.parametrize("name", ["Prodigy", "DAdaptAdam", "DAdaptation", "DAdaptLion"])
def test_d_adaptation_warns_about_a_small_learning_rate(name, caplog):
    with caplog.at_level(logging.WARNING, logger="library.optimizers"):
        make_optimizer(parse("--optimizer_type", name, "--learning_rate", "1.0"), [param()])
    assert "around 1.0" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="library.optimizers"):
        make_optimizer(parse("--optimizer_type", name, "--learning_rate", "1e-4"), [param()])
    assert "around 1.0 (got 0.0001)" in caplog.text


def test_dadapt_adam_turns_group_lrs_into_layer_scales():
    """DAdaptAdam raises at the first step when group lrs differ (--unet_lr / --text_encoder_lr, LoRA+): kiln gives
    every group the first lr and the ratio as DAdaptAdam's layer_scale, which scales that group's step."""
    cls = _real_class(REAL_CLASSES["DAdaptAdam"][0])
    weight, bias, frozen = param(), param((64,), seed=1), param((8,), seed=2)
    groups = [{"params": [weight], "lr": 1.0}, {"params": [bias], "lr": 0.25}, {"params": [frozen], "lr": 0.0}]
    opt = make_optimizer(parse("--optimizer_type", "DAdaptAdam", "--learning_rate", "1.0"), groups)[2]
    assert [g["lr"] for g in opt.param_groups] == [1.0, 1.0, 0.0]
    assert [g["layer_scale"] for g in opt.param_groups] == [1.0, 0.25, 1.0]
    assert groups[1]["lr"] == 0.25 and "layer_scale" not in groups[1]  # the caller's dicts are untouched

    ref_weight, ref_bias = param(), param((64,), seed=1)
    ref = cls([{"params": [ref_weight]}, {"params": [ref_bias], "layer_scale": 0.25}], lr=1.0)
    before = frozen.detach().clone()
    frozen.grad = torch.ones_like(frozen)
    _two_steps(opt, weight, bias)
    _two_steps(ref, ref_weight, ref_bias)
    assert torch.equal(weight.detach(), ref_weight.detach()) and torch.equal(bias.detach(), ref_bias.detach())
    assert torch.equal(frozen.detach(), before)


@pytest.mark.parametrize("name", ["Prodigy", "DAdaptation", "DAdaptLion", "DAdaptSGD"])
def test_d_adaptation_with_several_group_lrs_uses_the_first(name, caplog):
    """The other D-Adaptation optimizers and Prodigy accept one lr only (0 aside): kiln uses the first, with a
    warning, instead of a RuntimeError at the first step."""
    weight, bias, frozen = param(), param((64,), seed=1), param((8,), seed=2)
    groups = [{"params": [frozen], "lr": 0.0}, {"params": [weight], "lr": 1.0}, {"params": [bias], "lr": 0.5}]
    with caplog.at_level(logging.WARNING, logger="library.optimizers"):
        opt = make_optimizer(parse("--optimizer_type", name, "--learning_rate", "1.0"), groups)[2]
    assert "all use the first, 1.0" in caplog.text
    assert [g["lr"] for g in opt.param_groups] == [0.0, 1.0, 1.0]
    before_frozen, before_bias = frozen.detach().clone(), bias.detach().clone()
    frozen.grad = torch.ones_like(frozen)
    _two_steps(opt, weight, bias)
    assert torch.equal(frozen.detach(), before_frozen) and not torch.equal(bias.detach(), before_bias)


def test_d_adapted_lrs_follow_the_real_d():
    """d * lr per group (sd-scripts logs it as lr/d*lr): d starts at d0 and Prodigy grows it while training."""
    from library.optimizers import d_adapted_lrs

    weight, bias = param(), param((64,), seed=1)
    opt = make_optimizer(parse("--optimizer_type", "Prodigy", "--learning_rate", "0.5"), [{"params": [weight]}, {"params": [bias]}])[2]
    assert d_adapted_lrs(opt) == [1e-6 * 0.5, 1e-6 * 0.5]  # Prodigy's d0
    _two_steps(opt, weight, bias, steps=5)
    d = opt.param_groups[0]["d"]
    assert isinstance(d, float) and d > 1e-6
    assert d_adapted_lrs(opt) == [d * 0.5, d * 0.5]
    assert d_adapted_lrs(types.SimpleNamespace(optimizer=opt)) == [d * 0.5, d * 0.5]  # accelerate's wrapper

    dadapt = make_optimizer(parse("--optimizer_type", "DAdaptAdam", "--learning_rate", "1.0"),
                            [{"params": [param()], "lr": 1.0}, {"params": [param((64,))], "lr": 0.5}])[2]
    assert d_adapted_lrs(dadapt) == [1e-6, 1e-6 * 0.5]  # layer_scale counts
    assert d_adapted_lrs(make_optimizer(parse("--learning_rate", "1e-3"), [param()])[2]) is None


@pytest.mark.parametrize("name", ["AdamWScheduleFree", "RAdamScheduleFree", "SGDScheduleFree"])
def test_evaluation_weights_switch_real_schedule_free_optimizers(name):
    """library.method.evaluation_weights shows the schedule-free evaluation weights (what the package's own eval()
    gives) inside the block, and restores the train weights and train mode after it."""
    from library.method import evaluation_weights

    a = parse("--optimizer_type", name, "--learning_rate", "1e-2")
    weight, bias = param(), param((64,), seed=1)
    opt = make_optimizer(a, [{"params": [weight]}, {"params": [bias]}])[2]
    ref_weight, ref_bias = param(), param((64,), seed=1)
    ref = type(opt)([{"params": [ref_weight]}, {"params": [ref_bias]}], lr=1e-2)
    ref.train()
    _two_steps(opt, weight, bias, steps=6)  # past RAdamScheduleFree's steps that change nothing
    _two_steps(ref, ref_weight, ref_bias, steps=6)
    train_weight = weight.detach().clone()

    ref.eval()
    for wrapped in (opt, types.SimpleNamespace(optimizer=opt)):  # plain, and accelerate's AcceleratedOptimizer shape
        with evaluation_weights(wrapped):
            assert torch.allclose(weight.detach(), ref_weight.detach(), rtol=0, atol=1e-6)  # eval<->train is a lerp
            assert not torch.allclose(weight.detach(), train_weight)
            with pytest.raises(Exception, match="not in train mode"):
                opt.step()
        assert torch.allclose(weight.detach(), train_weight, atol=1e-6)
    ref.train()
    _two_steps(opt, weight, bias)  # back in train mode: steps again
    _two_steps(ref, ref_weight, ref_bias)
    assert torch.allclose(weight.detach(), ref_weight.detach(), atol=1e-6)

    optimizer_eval_mode(opt)
    assert not opt.param_groups[0]["train_mode"]


def test_schedule_free_gets_a_constant_schedule_only():
    a = parse("--optimizer_type", "AdamWScheduleFree", "--learning_rate", "1e-3")
    opt = make_optimizer(a, [param()])[2]
    assert opt.param_groups[0]["train_mode"]  # returned ready for training steps
    sched = make_lr_scheduler(a, opt, 100)
    for _ in range(5):
        opt.step()
        sched.step()
    assert sched.get_last_lr() == [1e-3]
    for extra in (["--lr_scheduler", "cosine"], ["--lr_warmup_steps", "10"], ["--lr_scheduler_type", "StepLR"]):
        with pytest.raises(ValueError, match="schedule-free"):
            make_lr_scheduler(parse("--optimizer_type", "AdamWScheduleFree", *extra), opt, 100)


# --------------------------------------------------------------------------------------------------------------------
# learning-rate schedules


def schedule(*argv, steps=100, num_processes=1, optimizer=None):
    """(scheduler, lrs): lrs[s] is the lr the optimizer uses at scheduler step s."""
    opt = optimizer or torch.optim.SGD([param((2,))], lr=LR)
    sched = make_lr_scheduler(parse(*argv), opt, steps, num_processes)
    return sched, opt


def lrs(*argv, steps=100, num_processes=1, count=None):
    sched, opt = schedule(*argv, steps=steps, num_processes=num_processes)
    values = []
    for _ in range(count or steps * num_processes + 1):
        values.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return values


def close(values, expected: dict[int, float]):
    for step, factor in expected.items():
        assert values[step] == pytest.approx(LR * factor, rel=1e-9, abs=1e-15), f"step {step}"


def test_constant():
    close(lrs(), {0: 1, 50: 1, 100: 1})


def test_constant_with_warmup():
    close(lrs("--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", "10"), {0: 0, 5: 0.5, 10: 1, 99: 1})


def test_linear():
    close(lrs("--lr_scheduler", "linear", "--lr_warmup_steps", "10"), {0: 0, 5: 0.5, 10: 1, 55: 0.5, 91: 0.1, 100: 0})


def test_cosine():
    v = lrs("--lr_scheduler", "cosine", "--lr_warmup_steps", "10")
    close(v, {5: 0.5, 10: 1, 55: 0.5 * (1 + math.cos(math.pi * 0.5)), 25: 0.5 * (1 + math.cos(math.pi * 15 / 90)), 100: 0})


def test_cosine_with_restarts():
    v = lrs("--lr_scheduler", "cosine_with_restarts", "--lr_warmup_steps", "10", "--lr_scheduler_num_cycles", "2")
    # two cosine waves over the 90 steps after warmup, each starting again at the full lr
    close(
        v,
        {
            5: 0.5,
            10: 1,
            32: 0.5 * (1 + math.cos(math.pi * (2 * 22 / 90))),
            55: 1,
            77: 0.5 * (1 + math.cos(math.pi * 0.4888888888888889)),
        },
    )
    assert v[54] < 0.01 * LR


def test_polynomial():
    v = lrs("--lr_scheduler", "polynomial", "--lr_warmup_steps", "10", "--lr_scheduler_power", "2")
    end = 1e-7  # transformers' lr_end
    for step in (10, 55, 91):
        remaining = 1 - (step - 10) / 90
        assert v[step] == pytest.approx((LR - end) * remaining**2 + end, rel=1e-9)
    assert v[5] == pytest.approx(LR * 0.5)
    v = lrs("--lr_scheduler", "polynomial", "--lr_scheduler_args", "lr_end=1e-4")
    assert v[50] == pytest.approx((LR - 1e-4) * 0.5 + 1e-4)


def test_inverse_sqrt():
    # timescale defaults to the warmup steps: lr = 1 / sqrt(step / warmup) after warmup
    close(lrs("--lr_scheduler", "inverse_sqrt", "--lr_warmup_steps", "10"), {5: 0.5, 10: 1, 40: 0.5, 90: 1 / 3})
    v = lrs("--lr_scheduler", "inverse_sqrt", "--lr_warmup_steps", "10", "--lr_scheduler_timescale", "20")
    close(v, {10: 1, 40: 1 / math.sqrt(50 / 20)})


def test_cosine_with_min_lr():
    v = lrs("--lr_scheduler", "cosine_with_min_lr", "--lr_warmup_steps", "10", "--lr_scheduler_min_lr_ratio", "0.1")
    half_cos = 0.5 * (1 + math.cos(math.pi * 0.5))
    close(v, {5: 0.5, 10: 1, 55: half_cos * 0.9 + 0.1, 100: 0.1})
    # two cycles in sd-scripts' count are one full cosine wave: back at the top at the end
    v = lrs("--lr_scheduler", "cosine_with_min_lr", "--lr_scheduler_num_cycles", "2", "--lr_scheduler_min_lr_ratio", "0.1")
    close(v, {0: 1, 50: 0.1, 100: 1})
    with pytest.raises(ValueError, match="--lr_scheduler_min_lr_ratio"):
        lrs("--lr_scheduler", "cosine_with_min_lr")
    close(lrs("--lr_scheduler", "cosine_with_min_lr", "--lr_scheduler_args", "min_lr=1e-3"), {100: 0.5})


def test_warmup_stable_decay():
    v = lrs("--lr_scheduler", "warmup_stable_decay", "--lr_warmup_steps", "10", "--lr_decay_steps", "20")
    close(v, {5: 0.5, 10: 1, 50: 1, 79: 1, 80: 1, 90: 0.5, 100: 0})
    v = lrs(
        "--lr_scheduler",
        "warmup_stable_decay",
        "--lr_warmup_steps",
        "10",
        "--lr_decay_steps",
        "20%",
        "--lr_scheduler_min_lr_ratio",
        "0.2",
    )
    close(v, {0: 0.2, 5: 0.6, 50: 1, 90: 0.5 * 0.8 + 0.2, 100: 0.2})
    v = lrs("--lr_scheduler", "warmup_stable_decay", "--lr_decay_steps", "0.2", "--lr_scheduler_args", "decay_type=linear")
    close(v, {0: 1, 80: 1, 85: 0.75, 95: 0.25})
    with pytest.raises(ValueError, match="exceed"):
        lrs("--lr_scheduler", "warmup_stable_decay", "--lr_warmup_steps", "60", "--lr_decay_steps", "50")


def test_piecewise_constant():
    v = lrs("--lr_scheduler", "piecewise_constant", "--lr_scheduler_args", "step_rules=1:10,0.1:20,0.01")
    close(v, {0: 1, 9: 1, 10: 0.1, 19: 0.1, 20: 0.01, 100: 0.01})
    with pytest.raises(ValueError, match="step_rules"):
        lrs("--lr_scheduler", "piecewise_constant")
    with pytest.raises(ValueError, match="step_rules"):
        lrs("--lr_scheduler", "piecewise_constant", "--lr_scheduler_args", "step_rules=abc")


def test_reduce_lr_on_plateau():
    sched, opt = schedule("--lr_scheduler", "reduce_lr_on_plateau", "--lr_scheduler_args", "factor=0.5", "patience=0")
    assert scheduler_needs_metric(sched)
    sched.step(1.0)
    sched.step(2.0)  # worse: halve
    assert opt.param_groups[0]["lr"] == pytest.approx(LR * 0.5)
    assert not scheduler_needs_metric(schedule()[0])


def test_custom_scheduler_type():
    argv = ("--lr_scheduler_type", "torch.optim.lr_scheduler.StepLR", "--lr_scheduler_args", "step_size=10", "gamma=0.5")
    close(lrs(*argv), {0: 1, 9: 1, 10: 0.5, 25: 0.25})
    close(lrs("--lr_scheduler_type", "StepLR", "--lr_scheduler_args", "step_size=10", "gamma=0.5"), {15: 0.5})
    with pytest.raises(ValueError, match="does not use --lr_warmup_steps"):
        lrs(*argv, "--lr_warmup_steps", "5")
    with pytest.raises(ValueError, match="check --lr_scheduler_args"):
        lrs("--lr_scheduler_type", "StepLR")  # step_size missing
    with pytest.raises(ValueError, match="no such class"):
        lrs("--lr_scheduler_type", "NoSuchLR")


def test_adafactor_schedule_needs_adafactor():
    with pytest.raises(ValueError, match="only with --optimizer_type AdaFactor"):
        lrs("--lr_scheduler", "adafactor:1e-4")
    a = parse("--optimizer_type", "AdaFactor", "--learning_rate", "0")
    opt = make_optimizer(a, [param()])[2]
    a.lr_scheduler = "adafactor:abc"
    with pytest.raises(ValueError, match="adafactor:<initial lr>"):
        make_lr_scheduler(a, opt, 100)
    a.lr_scheduler = "adafactor"
    a.lr_warmup_steps = 10
    with pytest.raises(ValueError, match="warmup_init"):
        make_lr_scheduler(a, opt, 100)


def test_warmup_as_ratio_and_percent():
    linear = {5: 0.5, 10: 1, 55: 0.5}
    close(lrs("--lr_scheduler", "linear", "--lr_warmup_steps", "0.1"), linear)
    close(lrs("--lr_scheduler", "linear", "--lr_warmup_steps", "10%"), linear)


def test_num_processes_scales_the_schedule():
    # 50 optimizer steps on 2 processes: accelerate steps the scheduler twice per optimizer step, so the schedule
    # spans 100 scheduler steps. A ratio follows the product; an integer warmup stays in scheduler steps.
    expected = {5: 0.5, 10: 1, 55: 0.5 * (1 + math.cos(math.pi * 0.5)), 100: 0}
    close(lrs("--lr_scheduler", "cosine", "--lr_warmup_steps", "0.1", steps=50, num_processes=2), expected)
    close(lrs("--lr_scheduler", "cosine", "--lr_warmup_steps", "10", steps=50, num_processes=2), expected)
    close(lrs("--lr_scheduler", "linear", "--lr_warmup_steps", "10%", steps=25, num_processes=4), {5: 0.5, 55: 0.5})


def test_invalid_combinations_are_errors():
    cases = [
        (("--lr_warmup_steps", "10"), "--lr_scheduler constant does not use --lr_warmup_steps 10"),
        (("--lr_scheduler", "cosine", "--lr_decay_steps", "10"), "--lr_decay_steps"),
        (("--lr_scheduler", "cosine", "--lr_scheduler_num_cycles", "3"), "--lr_scheduler_num_cycles"),
        (("--lr_scheduler", "linear", "--lr_scheduler_power", "2"), "--lr_scheduler_power"),
        (("--lr_scheduler", "cosine", "--lr_scheduler_timescale", "5"), "--lr_scheduler_timescale"),
        (("--lr_scheduler", "linear", "--lr_scheduler_min_lr_ratio", "0.1"), "--lr_scheduler_min_lr_ratio"),
        (("--lr_scheduler", "reduce_lr_on_plateau", "--lr_warmup_steps", "5"), "--lr_warmup_steps"),
        (("--lr_scheduler", "piecewise_constant", "--lr_warmup_steps", "5"), "--lr_warmup_steps"),
        (("--lr_scheduler", "linear", "--lr_warmup_steps", "101"), "exceed"),
        (("--lr_scheduler", "no_such_schedule"), "unknown --lr_scheduler"),
        (("--lr_scheduler", "cosine", "--lr_scheduler_args", "no_such=1"), "check --lr_scheduler_args"),
    ]
    for argv, message in cases:
        with pytest.raises(ValueError, match=message.replace("(", r"\(")):
            lrs(*argv)
    with pytest.raises(ValueError, match="positive number of training steps"):
        lrs("--lr_scheduler", "cosine", steps=0)
    # the unknown-name message lists the supported schedules
    with pytest.raises(ValueError, match="piecewise_constant"):
        lrs("--lr_scheduler", "cosine_typo")


def test_scheduler_names_include_transformers_and_extras():
    names = scheduler_names()
    for name in ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup", "inverse_sqrt"):
        assert name in names
    assert "piecewise_constant" in names and "adafactor" in names


def test_every_listed_schedule_builds():
    extra = {
        "cosine_with_min_lr": ("--lr_scheduler_min_lr_ratio", "0.1"),
        "cosine_warmup_with_min_lr": ("--lr_scheduler_min_lr_ratio", "0.1"),
        "piecewise_constant": ("--lr_scheduler_args", "step_rules=1:10,0.5"),
    }
    for name in scheduler_names():
        if name == "adafactor":
            continue
        sched, opt = schedule("--lr_scheduler", name, *extra.get(name, ()))
        opt.step()
        if scheduler_needs_metric(sched):
            sched.step(1.0)
        else:
            sched.step()
        assert opt.param_groups[0]["lr"] <= LR


def test_adam_is_fused_only_for_cuda_parameters_without_a_chosen_implementation():
    from library.optimizers import _fused_on_cuda

    cuda_param = types.SimpleNamespace(is_cuda=True, is_floating_point=lambda: True)
    cpu_param = torch.nn.Parameter(torch.zeros(2))
    assert _fused_on_cuda(torch.optim.AdamW, {}, [{"params": [cuda_param]}]) == {"fused": True}
    assert _fused_on_cuda(torch.optim.Adam, {}, [cuda_param]) == {"fused": True}
    assert _fused_on_cuda(torch.optim.AdamW, {"foreach": False}, [{"params": [cuda_param]}]) == {}
    assert _fused_on_cuda(torch.optim.AdamW, {}, [{"params": [cuda_param, cpu_param]}]) == {}
    assert _fused_on_cuda(torch.optim.SGD, {}, [{"params": [cuda_param]}]) == {}
    assert _fused_on_cuda(torch.optim.AdamW, {}, []) == {}
