"""sd-scripts options that change what the base model is: --no_half_vae (every family), --fp8_base / --fp8_base_unet
(SD 1.x/2.x and SDXL as for FLUX), --base_weights / --base_weights_multiplier (SD, SDXL, FLUX).

In-process checks go through the families' own hooks (load_models, vae_dtype, place_models), which is what the
trainer calls; the end-to-end runs train the built-in tiny SD through train_network.py."""

from __future__ import annotations

import pytest
import torch
from conftest import launch_script, write_caption, write_image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from library.checkpoint_files import ModelLoadError
from library.family_flux import FluxFamily
from library.family_sd import SdFamily
from library.family_sdxl import SdxlFamily
from library.fp8_utils import FP8_DTYPES, quantize_fp8
from library.train_args import setup_network_parser

FAMILIES = {"sd": (SdFamily, "kiln-tiny-sd"), "sdxl": (SdxlFamily, "kiln-tiny-sdxl"), "flux": (FluxFamily, "kiln-tiny-flux")}


def family_and_args(kind: str, *flags):
    cls, model = FAMILIES[kind]
    family = cls()
    parser = setup_network_parser("test")
    family.add_arguments(parser)
    return family, parser.parse_args(["--pretrained_model_name_or_path", model, *map(str, flags)])


def linear_dtypes(model: torch.nn.Module) -> set[torch.dtype]:
    return {m.weight.dtype for m in model.modules() if isinstance(m, torch.nn.Linear)}


# ---------------------------------------------------------------------------------------------------------------------
# --no_half_vae


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_no_half_vae_keeps_the_vae_float32_under_bf16(kind):
    """As the trainer places and calls the VAE: float32 with --no_half_vae, bf16 without (SD 1.x/2.x had no flag)."""
    images = torch.rand(1, 3, 64, 64) * 2 - 1
    for flags, expected in (([], torch.bfloat16), (["--no_half_vae"], torch.float32)):
        family, args = family_and_args(kind, "--mixed_precision", "bf16", *flags)
        assert family.vae_dtype(args, torch.bfloat16) == expected
        models = family.load_models(args)
        models.vae.to("cpu", family.vae_dtype(args, torch.bfloat16))
        with torch.no_grad():
            mean, _ = family.encode_images(models, images)
        assert {p.dtype for p in models.vae.parameters()} == {expected} and mean.dtype == expected
    family, args = family_and_args(kind, "--mixed_precision", "fp16")
    assert family.vae_dtype(args, torch.float16) == torch.float32  # fp16 overflows in SD VAEs: float32 regardless


# ---------------------------------------------------------------------------------------------------------------------
# --fp8_base / --fp8_base_unet


@pytest.mark.parametrize("flag", ["--fp8_base", "--fp8_base_unet"])
@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_fp8_base_stores_every_frozen_unet_linear_in_float8(kind, flag):
    """What --help says: every frozen Linear of the U-Net is float8 (with --fp8_base the text encoders' too, as
    sd-scripts); Conv2d layers stay in the compute dtype; placing the models keeps the float8 weights."""
    family, args = family_and_args(kind, "--mixed_precision", "bf16", flag)
    family.check_args(args)
    models = family.load_models(args)
    unet = models.denoiser
    assert linear_dtypes(unet) == {torch.float8_e4m3fn}
    assert all(hasattr(m, "weight_scale") for m in unet.modules() if isinstance(m, torch.nn.Linear))
    assert {m.weight.dtype for m in unet.modules() if isinstance(m, torch.nn.Conv2d)} == {torch.bfloat16}
    assert not any(p.requires_grad for p in unet.parameters())
    te_dtype = torch.float8_e4m3fn if flag == "--fp8_base" else torch.float32
    assert [linear_dtypes(te) for te in models.text_encoders] == [{te_dtype}] * len(models.text_encoders)
    family.place_models(args, models, torch.device("cpu"), torch.bfloat16)
    assert linear_dtypes(unet) == {torch.float8_e4m3fn}
    assert [linear_dtypes(te) for te in models.text_encoders] == [{te_dtype if flag == "--fp8_base" else torch.bfloat16}] * len(
        models.text_encoders
    )

    family, args = family_and_args(kind, flag)  # float8 weights are computed in the mixed precision: none is an error
    with pytest.raises(ValueError, match="--fp8_base needs --mixed_precision"):
        family.check_args(args)


# ---------------------------------------------------------------------------------------------------------------------
# --base_weights / --base_weights_multiplier


def module_paths(models) -> dict[int, tuple[int, str]]:
    """id(module) -> (model index: text encoders, then the denoiser; path in it)."""
    out = {}
    for i, model in enumerate([*models.text_encoders, models.denoiser]):
        for path, module in model.named_modules():
            out[id(module)] = (i, path)
    return out


def module_at(models, where: tuple[int, str]) -> torch.nn.Module:
    i, path = where
    return [*models.text_encoders, models.denoiser][i].get_submodule(path)


def make_lora(kind: str, models, path, seed: int = 0) -> dict:
    """A LoRA of the family's own layout over every module it adapts (SD: LoCon 3x3 convs too), with non-zero up
    weights; saved to `path`. Returns {org module location: float32 delta at multiplier 1} computed from the file."""
    g = torch.Generator().manual_seed(seed)
    if kind == "flux":
        from networks.lora_flux import create_network

        network = create_network(1.0, 4, 2, models.text_encoders, models.denoiser)
    else:
        from networks.lora import create_network

        family = FAMILIES[kind][0]()
        extra = {"conv_dim": "2", "conv_alpha": "1"} if kind == "sd" else {}
        network = create_network(1.0, 4, 2, models.text_encoders, models.denoiser, **family.lora_options(models), **extra)
    with torch.no_grad():
        for m in network.loras:
            m.lora_up.weight.copy_(torch.randn(m.lora_up.weight.shape, generator=g) * 0.05)
    state = {k: v.detach().clone().contiguous() for k, v in network.state_dict().items()}
    save_file(state, str(path))
    where = module_paths(models)
    deltas = {}
    for m in network.loras:
        down = state[m.lora_name + ".lora_down.weight"].float()
        up = state[m.lora_name + ".lora_up.weight"].float()
        alpha, rank = state[m.lora_name + ".alpha"].item(), down.shape[0]
        delta = alpha / rank * (up.flatten(1) @ down.flatten(1))
        orgs = getattr(m, "org_modules", [m.org_module])  # a fused FLUX adapter: its Linears get their rows
        for org, rows in zip(orgs, torch.split(delta, [o.weight.shape[0] for o in orgs])):
            deltas[where[id(org)]] = rows.reshape(org.weight.shape)
    assert len(state) == 3 * len(network.loras) and deltas
    return deltas


@pytest.mark.parametrize("kind", ["sd", "sdxl", "flux"])
def test_base_weights_are_merged_at_their_multiplier(kind, tmp_path):
    """load_models (what the trainer calls) with --base_weights L --base_weights_multiplier 0.5: every weight a module
    of L adapts is W + 0.5 * alpha / rank * up @ down, everything else is untouched."""
    family, args = family_and_args(kind)
    original = family.load_models(args)
    deltas = make_lora(kind, original, tmp_path / "l.safetensors")
    family, args = family_and_args(kind, "--base_weights", tmp_path / "l.safetensors", "--base_weights_multiplier", 0.5)
    merged = family.load_models(args)
    for where, delta in deltas.items():
        w0, w1 = module_at(original, where).weight, module_at(merged, where).weight
        torch.testing.assert_close(w1, w0 + 0.5 * delta, rtol=0, atol=1e-6)
        assert not torch.equal(w1, w0)
    touched = {(i, path + ".weight") for i, path in deltas}
    for i, (a, b) in enumerate(zip([*original.text_encoders, original.denoiser], [*merged.text_encoders, merged.denoiser])):
        sd_b = b.state_dict()
        for name, tensor in a.state_dict().items():
            if (i, name) not in touched:
                assert torch.equal(tensor, sd_b[name]), name


def test_base_weights_default_multiplier_and_merge_before_fp8(tmp_path):
    """Without --base_weights_multiplier each file counts 1.0 (two files add up); with --fp8_base the float8 weights
    are the merged weights quantized (the merge happens first)."""
    family, args = family_and_args("sd")
    original = family.load_models(args)
    d1 = make_lora("sd", original, tmp_path / "a.safetensors", seed=1)
    d2 = make_lora("sd", original, tmp_path / "b.safetensors", seed=2)
    family, args = family_and_args("sd", "--base_weights", tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    merged = family.load_models(args)
    for where in d1:
        expected = module_at(original, where).weight + d1[where] + d2[where]
        torch.testing.assert_close(module_at(merged, where).weight, expected, rtol=0, atol=1e-6)
    # fewer multipliers than files: the rest count 1.0, as in sd-scripts
    family, args = family_and_args(
        "sd", "--base_weights", tmp_path / "a.safetensors", tmp_path / "b.safetensors", "--base_weights_multiplier", 0.5
    )
    partly = family.load_models(args)
    for where in d1:
        expected = module_at(original, where).weight + 0.5 * d1[where] + d2[where]
        torch.testing.assert_close(module_at(partly, where).weight, expected, rtol=0, atol=1e-6)
    family, args = family_and_args(
        "sd", "--base_weights", tmp_path / "a.safetensors", tmp_path / "b.safetensors", "--mixed_precision", "bf16", "--fp8_base"
    )
    fp8 = family.load_models(args)
    linears = [w for w in d1 if isinstance(module_at(original, w), torch.nn.Linear)]
    assert linears
    for where in linears:
        q, scale = quantize_fp8(module_at(merged, where).weight)
        stored = module_at(fp8, where)
        assert stored.weight.dtype in FP8_DTYPES
        assert torch.equal(stored.weight, q) and torch.equal(stored.weight_scale, scale)


def test_base_weights_errors_name_the_problem(tmp_path):
    family, args = family_and_args("sd")
    make_lora("sd", family.load_models(args), tmp_path / "l.safetensors")
    cases = [
        (["--base_weights", tmp_path / "missing.safetensors"], "missing.safetensors: no such file"),
        (["--base_weights", tmp_path / "l.safetensors", "--base_weights_multiplier", 0.5, 1.0], "2 values for 1 --base_weights"),
        (["--base_weights_multiplier", 0.5], "without --base_weights"),
    ]
    alien = {  # a module no SD 1.x model has (e.g. a LoRA of another architecture)
        "lora_unet_no_such_block_proj.lora_down.weight": torch.zeros(4, 8),
        "lora_unet_no_such_block_proj.lora_up.weight": torch.zeros(8, 4),
        "lora_unet_no_such_block_proj.alpha": torch.tensor(4.0),
    }
    save_file(alien, str(tmp_path / "alien.safetensors"))
    cases.append((["--base_weights", tmp_path / "alien.safetensors"], "lora_unet_no_such_block_proj"))
    loha = "lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_a"  # a LoHa module without its other factors
    save_file({loha: torch.zeros(2, 2)}, str(tmp_path / "loha.safetensors"))
    cases.append((["--base_weights", tmp_path / "loha.safetensors"], loha))
    for flags, message in cases:
        family, args = family_and_args("sd", *flags)
        with pytest.raises(ModelLoadError, match=message.replace(".", r"\.")):
            family.load_models(args)
    # the trainer refuses the same arguments before anything loads
    from library.trainer import TrainingError, check_args

    family, args = family_and_args("sd", "--output_dir", tmp_path / "o", "--base_weights", tmp_path / "missing.safetensors")
    with pytest.raises(TrainingError, match="missing.safetensors: no such file"):
        check_args(args, family)


# ---------------------------------------------------------------------------------------------------------------------
# End to end: train_network.py on the built-in tiny SD


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    for i, c in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]):
        write_caption(write_image(root / "img" / f"{i}.png", (64, 64), c), f"shape {i}, color{i}")
    config = root / "data.toml"
    config.write_text(f"""
[general]
caption_extension = ".txt"

[[datasets]]
resolution = 64
batch_size = 2

  [[datasets.subsets]]
  image_dir = '{root / "img"}'
  num_repeats = 1
""")
    return str(config)


BASE = [
    "--pretrained_model_name_or_path",
    "kiln-tiny-sd",
    "--network_module",
    "networks.lora",
    "--network_dim",
    "4",
    "--network_alpha",
    "2",
    "--learning_rate",
    "1e-3",
    "--max_data_loader_n_workers",
    "0",
    "--seed",
    "7",
    "--max_train_steps",
    "2",
    "--mixed_precision",
    "bf16",
]


@pytest.mark.slow
def test_fp8_base_and_base_weights_train_sd(dataset, tmp_path):
    """Three short bf16 runs of the tiny SD: plain, --fp8_base, and --base_weights L at 0.5. Each trains (finite
    weights, same keys); float8 base weights and a merged LoRA both change the trained LoRA; the metadata records
    --fp8_base (ss_fp8_base, as sd-scripts) and nothing sd-scripts does not write for --base_weights."""
    family, args = family_and_args("sd")
    make_lora("sd", family.load_models(args), tmp_path / "base.safetensors")
    runs, logs, metadata = {}, {}, {}
    for name, extra in {
        "bf16": [],
        "fp8": ["--fp8_base"],
        "base": ["--base_weights", tmp_path / "base.safetensors", "--base_weights_multiplier", "0.5"],
    }.items():
        res = launch_script("train_network.py", *BASE, "--dataset_config", dataset, "--output_dir", tmp_path / name, *extra)
        logs[name] = res.stdout + res.stderr
        path = str(tmp_path / name / "last.safetensors")
        runs[name] = load_file(path)
        with safe_open(path, framework="pt") as f:
            metadata[name] = f.metadata()
    for name in ("fp8", "base"):
        assert runs[name].keys() == runs["bf16"].keys()
        assert all(torch.isfinite(t).all() for t in runs[name].values())
        assert any(not torch.equal(runs[name][k], runs["bf16"][k]) for k in runs[name] if k.endswith("lora_up.weight"))
    unet_linears, te_linears = (sum(isinstance(m, torch.nn.Linear) for m in model.modules()) for model in _tiny_sd_models())
    assert [int(part.split()[0]) for part in logs["fp8"].split("fp8 base: ")[1:]] == [unet_linears, te_linears]
    assert "fp8 base: " not in logs["bf16"] and "fp8 base: " not in logs["base"]
    assert "merged " in logs["base"] and "base.safetensors into the base model at multiplier 0.5" in logs["base"]
    assert metadata["fp8"]["ss_fp8_base"] == "True" and metadata["bf16"]["ss_fp8_base"] == "False"
    assert not any("base_weights" in k for k in metadata["base"])


def _tiny_sd_models():
    from library.tiny_models import build_tiny_sd

    sd = build_tiny_sd()
    return sd["unet"], sd["text_encoder"]
