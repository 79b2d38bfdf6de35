"""sd3_train_network.py: SD3's flow-matching maths by hand, the family's hooks in process (x0 loss, float32 timesteps,
per-encoder dropout on cached outputs, block swap, fp8, position embeddings, metadata), and end to end on the tiny
SD3 models (LoRA file, caches, previews, validation, resume)."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil

import pytest
import torch
from conftest import ROOT, launch_script, write_caption, write_image
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from library import flow_matching as fm


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def parse(*argv):
    """The parsed sd3_train_network.py command line (with kiln-tiny-sd3 unless given)."""
    from library.family_sd3 import Sd3Family
    from library.train_script import training_parser

    model = [] if "--pretrained_model_name_or_path" in argv else ["--pretrained_model_name_or_path", "kiln-tiny-sd3"]
    return training_parser(Sd3Family(), "test").parse_args([*model, *map(str, argv)])


# ---------------------------------------------------------------------------------------------------------------------
# flow matching: hand-computed values


def test_timesteps_by_hand_density_shift_and_range():
    u = torch.rand(5, generator=gen(1))
    t = fm.sample_discrete_timesteps(5, gen(1))  # uniform, no shift: floor(1000 u)
    assert t.dtype == torch.float32 and torch.equal(t, torch.floor(u * 1000))
    shifted = 3 * u / (1 + 2 * u)
    assert torch.equal(fm.sample_discrete_timesteps(5, gen(1), shift=3.0), torch.floor(shifted * 1000))
    # --min_timestep / --max_timestep: floor(u' * (max - min) + min)
    assert torch.equal(fm.sample_discrete_timesteps(5, gen(1), shift=3.0, min_timestep=100, max_timestep=500),
                       torch.floor(shifted * 400 + 100))
    n = torch.randn(5, generator=gen(2))
    logit = torch.sigmoid(n * 2.0 + 0.5)
    assert torch.equal(fm.sample_discrete_timesteps(5, gen(2), "logit_normal", logit_mean=0.5, logit_std=2.0),
                       torch.floor(logit * 1000))
    u0 = torch.rand(5, generator=gen(3))
    mode = 1 - u0 - 1.29 * (torch.cos(math.pi * u0 / 2) ** 2 - 1 + u0)
    assert torch.equal(fm.sample_discrete_timesteps(5, gen(3), "mode"), torch.floor(mode * 1000))
    for scheme in ("sigma_sqrt", "cosmap", "none"):  # these act through the loss weight only: uniform timesteps
        assert torch.equal(fm.sample_discrete_timesteps(5, gen(1), scheme), torch.floor(u * 1000))


def test_loss_weights_by_hand_and_sigma_sqrt_is_finite_at_zero():
    s = torch.tensor([0.0, 0.001, 0.25, 0.5])
    w = fm.loss_weighting("sigma_sqrt", s)
    assert torch.isfinite(w).all()
    torch.testing.assert_close(w, torch.tensor([0.0, 1e6, 16.0, 4.0]))
    # cosmap: 2 / (pi (1 - 2s + 2s^2))
    torch.testing.assert_close(fm.loss_weighting("cosmap", s), 2 / (math.pi * torch.tensor([1.0, 0.998002, 0.625, 0.5])))
    for scheme in ("uniform", "none", "logit_normal", "mode"):
        assert torch.equal(fm.loss_weighting(scheme, s), torch.ones(4))


def test_x0_estimate_by_hand():
    v = torch.full((2, 1, 1, 2), 3.0)
    xt = torch.full((2, 1, 1, 2), 2.0)
    out = fm.x0_from_velocity(v, xt, torch.tensor([0.5, 0.25]))
    torch.testing.assert_close(out[:, 0, 0, 0], torch.tensor([0.5, 1.25]))  # 3 * (-0.5) + 2, 3 * (-0.25) + 2
    x0, eps, s = torch.randn(2, 4, 2, 2, generator=gen(0)), torch.randn(2, 4, 2, 2, generator=gen(1)), torch.tensor([0.2, 0.9])
    torch.testing.assert_close(fm.x0_from_velocity(eps - x0, fm.noisy_model_input(x0, eps, s), s), x0)  # true velocity -> x0


# ---------------------------------------------------------------------------------------------------------------------
# the family's loss in process, with a recording denoiser


class Recorder(torch.nn.Module):
    """A denoiser that records what it is called with and predicts a fixed velocity."""

    def __init__(self, velocity: torch.Tensor) -> None:
        super().__init__()
        self.velocity = velocity
        self.calls: list[dict] = []

    def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, return_dict=False):
        self.calls.append({"x": hidden_states, "context": encoder_hidden_states, "pooled": pooled_projections, "t": timestep})
        return (self.velocity.to(hidden_states.dtype).expand_as(hidden_states),)


def text_outputs(batch: int, seed: int = 0) -> list[torch.Tensor]:
    """Per-encoder outputs (strategy_sd3.TE_OUTPUT_KEYS order) of small widths."""
    g = gen(seed)
    return [torch.randn(batch, 77, 4, generator=g), torch.randn(batch, 77, 4, generator=g), torch.randn(batch, 5, 16, generator=g),
            torch.randn(batch, 4, generator=g), torch.randn(batch, 4, generator=g), torch.ones(batch, 77), torch.ones(batch, 77),
            torch.ones(batch, 5)]


@pytest.mark.parametrize("scheme,dtype", [("sigma_sqrt", torch.bfloat16), ("cosmap", torch.float32), ("logit_normal", torch.float32)])
def test_sample_losses_x0_target_and_float32_timesteps(scheme, dtype):
    """The loss of sd-scripts' SD3 trainer, by hand: t = floor(1000 shift(u)) in float32 (also under bf16, where
    sd-scripts rounds it), x_t = (1 - s) x0 + s eps, x0_hat = v (-s) + x_t, loss = mean((x0_hat - x0)^2) x weight(s)."""
    from library.family import TrainModels
    from library.family_sd3 import Sd3Family

    family = Sd3Family()
    args = parse("--weighting_scheme", scheme, "--training_shift", 3.0, "--logit_mean", 0.3)
    velocity = torch.randn(1, 16, 4, 4, generator=gen(9))
    models = TrainModels([], [None] * 3, None, Recorder(velocity))
    x0 = torch.randn(2, 16, 4, 4, generator=gen(8)).to(dtype)
    conds = text_outputs(2)
    seeds = (11, 12)
    losses = family.sample_losses(args, models, {}, x0, conds, [gen(s) for s in seeds])

    (call,) = models.denoiser.calls
    x0 = x0.float()
    expected_t, expected = [], []
    for i, s in enumerate(seeds):
        g = gen(s)
        noise = torch.randn(1, 16, 4, 4, generator=g)
        u = torch.sigmoid(torch.randn(1, generator=g) + 0.3) if scheme == "logit_normal" else torch.rand(1, generator=g)
        t = torch.floor(3 * u / (1 + 2 * u) * 1000)
        sigma = t / 1000
        xt = (1 - sigma) * x0[i] + sigma * noise[0]
        weight = sigma**-2 if scheme == "sigma_sqrt" else 2 / (math.pi * (1 - 2 * sigma + 2 * sigma**2)) if scheme == "cosmap" else 1
        v = velocity[0].to(dtype).float()  # what the denoiser returned, in the working dtype
        expected.append((((v * -sigma + xt) - x0[i]) ** 2).mean() * weight)
        expected_t.append(t)
        torch.testing.assert_close(call["x"][i].float(), xt.to(dtype).float())
    expected_t = torch.cat(expected_t)
    assert call["t"].dtype == torch.float32 and torch.equal(call["t"], expected_t)
    if dtype == torch.bfloat16:
        assert call["x"].dtype == torch.bfloat16
        assert not torch.equal(expected_t.bfloat16().float(), expected_t)  # bf16 would have changed these timesteps
    torch.testing.assert_close(losses, torch.stack(expected).reshape(2), rtol=1e-5, atol=1e-6)
    # the context is CLIP-L + CLIP-G padded to T5's width, then T5 along the sequence; pooled the two pooled outputs
    assert call["context"].shape == (2, 77 + 5, 16) and call["pooled"].shape == (2, 8)


def test_per_encoder_dropout_on_cached_outputs_uses_the_sample_generators():
    """--t5_dropout_rate 1 zeros T5's part of the context for every sample; with --clip_l_dropout_rate 0.5 the samples
    that drop CLIP-L are the ones the strategy's draws from each sample's generator say, the same for live or cached
    outputs (sample_losses gets the outputs either way)."""
    from library.family import TrainModels
    from library.family_sd3 import Sd3Family
    from library.strategy_sd3 import draw_encoder_drops

    family = Sd3Family()
    args = parse("--t5_dropout_rate", 1.0, "--clip_l_dropout_rate", 0.5)
    models = TrainModels([], [None] * 3, None, Recorder(torch.zeros(1, 16, 4, 4)))
    seeds = range(20, 28)
    family.sample_losses(args, models, {}, torch.zeros(8, 16, 4, 4), text_outputs(8), [gen(s) for s in seeds])
    context = models.denoiser.calls[0]["context"]
    assert not context[:, 77:].any()  # T5 dropped everywhere
    # draws after the noise and the timestep of each sample's generator
    gens = [gen(s) for s in seeds]
    for g in gens:
        torch.randn(1, 16, 4, 4, generator=g)
        torch.rand(1, generator=g)
    drops = draw_encoder_drops(8, (0.5, 0.0, 1.0), gens)
    assert 0 < int(drops[:, 0].sum()) < 8  # the test sees both cases
    dropped_l = ~context[:, :77, :4].flatten(1).any(dim=1)
    assert torch.equal(dropped_l, drops[:, 0]) and context[:, :77, 4:8].flatten(1).any(dim=1).all()


# ---------------------------------------------------------------------------------------------------------------------
# argument checks


def run_in_process(argv: list[str], capsys) -> tuple[int, list[str]]:
    from library.family_sd3 import Sd3Family
    from library.train_script import run_network_training

    with pytest.raises(SystemExit) as e:
        run_network_training(Sd3Family(), "test", argv)
    return e.value.code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize(
    "flags,named",
    [
        (["--min_snr_gamma", "5"], "--min_snr_gamma: DDPM-only"),
        (["--v_parameterization", "--noise_offset", "0.1"], "--v_parameterization, --noise_offset: DDPM-only"),
        (["--debiased_estimation_loss"], "--debiased_estimation_loss: DDPM-only"),
        (["--clip_skip", "2"], "--clip_skip are for SD models"),
        (["--blocks_to_swap", "-1"], "--blocks_to_swap -1"),
        (["--t5_dropout_rate", "1.5"], "--t5_dropout_rate 1.5"),
        (["--training_shift", "0"], "--training_shift 0"),
        (["--cache_text_encoder_outputs"], "needs --network_train_unet_only"),
    ],
)
def test_meaningless_options_stop_before_anything_loads(flags, named, tmp_path, capsys):
    argv = ["--pretrained_model_name_or_path", "kiln-tiny-sd3", "--output_dir", str(tmp_path / "o"), *flags]
    code, err = run_in_process(argv, capsys)
    assert code == 1 and len(err) == 1 and err[0].startswith("error: ") and named in err[0], err
    assert not (tmp_path / "o").exists()


def test_sd3_lora_files_are_told_from_flux_ones():
    """SD3 LoRAs name T5 modules lora_te3_, as FLUX ones do: the joint blocks (or CLIP-G with T5) make them SD3's."""
    from library.checkpoint_files import detect_lora_family

    unet, clip_g = "lora_unet_joint_blocks_0_x_block_attn_qkv.alpha", "lora_te2_text_model_encoder_layers_0_mlp_fc1.alpha"
    t5 = "lora_te3_encoder_block_0_layer_0_SelfAttention_q.alpha"
    assert detect_lora_family([unet, t5]) == detect_lora_family([clip_g, t5]) == detect_lora_family([unet]) == "sd3"
    assert detect_lora_family(["lora_unet_double_blocks_0_img_attn_qkv.alpha", t5]) == "flux"


def test_other_families_models_are_named(tmp_path, capsys):
    code, err = run_in_process(["--pretrained_model_name_or_path", "kiln-tiny-flux", "--output_dir", str(tmp_path / "o")], capsys)
    assert code == 1 and "kiln-tiny-flux is a model for flux_train_network.py, not sd3_train_network.py" in err[0]


# ---------------------------------------------------------------------------------------------------------------------
# models: fp8, metadata per variant, position embeddings


def linear_dtypes(model: torch.nn.Module, skip: str = "\0") -> set[torch.dtype]:
    return {m.weight.dtype for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not n.endswith(skip)}


@pytest.mark.parametrize("flag", ["--fp8_base", "--fp8_base_unet"])
def test_fp8_base_stores_the_mmdit_and_t5_in_float8(flag):
    """As sd-scripts: --fp8_base stores the MMDiT and T5 in float8 (T5's feed-forward output `wo` stays float32, as
    transformers keeps it), the two CLIPs stay; --fp8_base_unet the MMDiT only."""
    from library.family_sd3 import Sd3Family

    models = Sd3Family().load_models(parse("--mixed_precision", "bf16", flag))
    clip_l, clip_g, t5 = models.text_encoders
    assert linear_dtypes(models.denoiser) == {torch.float8_e4m3fn}
    assert linear_dtypes(t5, ".wo") == ({torch.float8_e4m3fn} if flag == "--fp8_base" else {torch.float32})
    assert linear_dtypes(clip_l) == linear_dtypes(clip_g) == {torch.float32}


def test_metadata_of_each_variant():
    from library.family_sd3 import Sd3Family

    expected = {
        "kiln-tiny-sd3": ("medium", "stable-diffusion-3-medium"),
        "kiln-tiny-sd3.5-medium": ("5-medium", "stable-diffusion-3-5-medium"),
        "kiln-tiny-sd3.5-large": ("5-large", "stable-diffusion-3-5-large"),
    }
    for name, (version, architecture) in expected.items():
        family = Sd3Family()
        args = parse("--pretrained_model_name_or_path", name, "--weighting_scheme", "mode", "--mode_scale", 1.1, "--apply_lg_attn_mask")
        family.load_models(args)
        md = family.metadata(args)
        assert (md["ss_base_model_version"], md["modelspec.architecture"]) == (version, architecture), name
        assert md["modelspec.implementation"] == "diffusers"
        assert (md["ss_weighting_scheme"], md["ss_mode_scale"], md["ss_apply_lg_attn_mask"], md["ss_apply_t5_attn_mask"]) == (
            "mode", "1.1", "True", "False")
        assert (md["ss_logit_mean"], md["ss_logit_std"]) == ("0.0", "1.0")


def test_scaled_position_table_centre_is_the_models_own_table():
    """--enable_scaled_pos_embed's table for a 16-patch grid is 24 patches wide, and its central 16 x 16 patches are
    the plain sin-cos table of a 16 x 16 grid (diffusers' get_2d_sincos_pos_embed, the oracle)."""
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    from library.family_sd3 import scaled_sincos_table

    table = scaled_sincos_table(64, 24, 16).reshape(24, 24, 64)
    plain = get_2d_sincos_pos_embed(64, 16, base_size=16, output_type="pt").float().reshape(16, 16, 64)
    torch.testing.assert_close(table[4:20, 4:20], plain, atol=1e-5, rtol=1e-5)


def test_position_embedding_crops_and_tables():
    """Random crop takes the table at the place drawn from the generator; scaled tables are chosen by area bucket and
    a grid larger than its table gets a table of its own."""
    from diffusers.models.embeddings import PatchEmbed

    from library.family_sd3 import Sd3PosEmbed, scaled_sincos_table

    embed = PatchEmbed(height=32, width=32, patch_size=2, in_channels=16, embed_dim=64, pos_embed_max_size=16)
    crop = Sd3PosEmbed(embed)
    table = embed.pos_embed.reshape(16, 16, 64)
    centre = crop.crop(8, 8)  # a 4x4 patch grid
    torch.testing.assert_close(centre, table[6:10, 6:10].reshape(1, 16, 64))
    assert torch.equal(centre, PatchEmbed.cropped_pos_embed(embed, 8, 8))  # diffusers' own centre crop
    with crop.draw(1.0, gen(4)):
        moved = crop.crop(8, 12)
    g = gen(4)
    torch.rand((), generator=g)
    top, left = int(float(torch.rand((), generator=g)) * 13), int(float(torch.rand((), generator=g)) * 11)
    torch.testing.assert_close(moved, table[top : top + 4, left : left + 6].reshape(1, 24, 64))
    with crop.draw(0.0, gen(4)):
        assert torch.equal(crop.crop(8, 8), centre)

    scaled = Sd3PosEmbed(embed, [4, 8])  # area bounds: 40 -> the 4-grid's table (6 wide), 144 -> the 8-grid's (12)
    torch.testing.assert_close(scaled.crop(12, 12), scaled_sincos_table(64, 6, 4).reshape(6, 6, 64).reshape(1, 36, 64))
    torch.testing.assert_close(scaled.crop(14, 14), scaled_sincos_table(64, 12, 8).reshape(12, 12, 64)[2:9, 2:9].reshape(1, 49, 64))
    out = scaled.crop(26, 26)  # 13 x 13 patches: larger than every table
    torch.testing.assert_close(out, scaled_sincos_table(64, 19, 13).reshape(19, 19, 64)[3:16, 3:16].reshape(1, 169, 64))
    assert 13 in scaled.tables
    assert embed(torch.zeros(1, 16, 26, 26)).shape == (1, 169, 64)  # PatchEmbed's forward uses the replacement


# ---------------------------------------------------------------------------------------------------------------------
# block swap changes no number (in process, through the family's hooks)


def _swap_run(blocks_to_swap: int, checkpointing: bool, offload: bool, compiled: bool = False, steps: int = 3):
    from diffusers import SD3Transformer2DModel

    import networks.lora_sd3 as lora_sd3
    from library.family import TrainModels
    from library.family_sd3 import Sd3Family, mark_repeated_blocks
    from library.sd3_models import tiny_sd3_transformer_config

    flags = ["--blocks_to_swap", blocks_to_swap, "--weighting_scheme", "logit_normal"]
    if checkpointing:
        flags += ["--gradient_checkpointing"] + (["--cpu_offload_checkpointing"] if offload else [])
    args = parse(*flags)
    family = Sd3Family()
    torch.manual_seed(0)
    config = {**tiny_sd3_transformer_config("sd3.5-medium"), "num_layers": 4, "joint_attention_dim": 16, "pooled_projection_dim": 8}
    model = mark_repeated_blocks(SD3Transformer2DModel(**config).requires_grad_(False))
    network = lora_sd3.create_network(1.0, 4, 4.0, [None, None, None], model)
    network.apply_to(False, True)
    models = TrainModels([], [None] * 3, None, model)
    family.place_models(args, models, torch.device("cpu"), torch.float32)
    if checkpointing:
        model.enable_gradient_checkpointing(family.gradient_checkpointing_func(args))
    if compiled:  # as --torch_compile: aot_eager traces forward and backward like inductor, without code generation
        from library.trainer import compile_repeated_blocks

        assert compile_repeated_blocks(model, "aot_eager") == 4
    model.train()
    params = [p for p in network.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    grads = []
    for step in range(steps):
        latents = torch.randn(2, 16, 8, 8, generator=gen(step))
        loss = family.sample_losses(args, models, {}, latents, text_outputs(2, step), [gen(100 * step + i) for i in range(2)]).sum()
        loss.backward()
        grads.append([p.grad.clone() for p in params])
        opt.step()
        opt.zero_grad()
    return family, grads, [p.detach().clone() for p in params]


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_block_swap_and_activation_offload_are_bit_identical(caplog):
    """A 4-block SD3.5 Medium layout (MMDiT-X attention in blocks 0-1, the pre-only context block last) with kiln's SD3
    LoRA: two swapped blocks (the last of them the pre-only one, in two slots), with and without checkpointed
    activations kept in host memory, and with compiled blocks, give the gradients and weights of the run without
    swap, bit for bit."""
    _, ref_grads, ref_weights = _swap_run(0, False, False)
    with caplog.at_level(logging.WARNING):
        family, grads, weights = _swap_run(9, False, False)  # more than allowed: lowered to 4 - 2
    assert "--blocks_to_swap 9: this transformer has 4 blocks, so 2 are swapped" in caplog.text
    assert family.swapper.blocks_to_swap == 2 and family.swapper.loads > 0
    assert all(torch.equal(a, b) for step, ref in zip(grads, ref_grads) for a, b in zip(step, ref))
    assert all(torch.equal(a, b) for a, b in zip(weights, ref_weights))
    _, ref_grads, ref_weights = _swap_run(0, True, False)
    for compiled in (False, True):
        _, grads, weights = _swap_run(2, True, True, compiled)
        assert all(torch.equal(a, b) for step, ref in zip(grads, ref_grads) for a, b in zip(step, ref)), compiled
        assert all(torch.equal(a, b) for a, b in zip(weights, ref_weights)), compiled


# ---------------------------------------------------------------------------------------------------------------------
# end to end


COMMON = ["--network_module", "networks.lora_sd3", "--network_dim", "4", "--network_alpha", "2", "--learning_rate", "1e-3",
          "--max_data_loader_n_workers", "0", "--seed", "5", "--t5xxl_max_token_length", "16", "--resolution", "64",
          "--caption_extension", ".txt", "--train_batch_size", "2", "--network_train_unet_only"]
MAIN = ["--pretrained_model_name_or_path", "kiln-tiny-sd3", "--mixed_precision", "bf16", "--weighting_scheme", "logit_normal",
        "--training_shift", "3.0", "--clip_l_dropout_rate", "0.5", "--t5_dropout_rate", "0.3", "--cache_latents_to_disk",
        "--cache_text_encoder_outputs_to_disk", "--validation_split", "0.25", "--validate_every_n_steps", "2", "--max_train_steps", "4",
        "--save_every_n_steps", "2", "--save_state", "--output_name", "s"]


def cache_files(folder) -> dict[str, int]:
    return {n: os.stat(os.path.join(folder, n)).st_mtime_ns for n in sorted(os.listdir(folder)) if "_sd3" in n}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One run of the tiny SD3 Medium layout (bf16, cached latents and text-encoder outputs on disk, per-encoder
    dropout, validation, a preview with a negative prompt, states every 2 steps), then a run resumed from its step-2
    state."""
    root = tmp_path_factory.mktemp("sd3")
    data = root / "data" / "2_shapes"
    for i, c in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]):
        write_caption(write_image(data / f"{i}.png", (64, 64), c), f"shape {i}, color{i}")
    prompts = root / "p.txt"
    prompts.write_text("a red shape --w 64 --h 48 --s 3 --d 7 --l 4.0 --n dull\n")
    run = launch_script("sd3_train_network.py", *COMMON, *MAIN, "--train_data_dir", root / "data", "--output_dir", root / "a",
                        "--sample_prompts", prompts, "--sample_every_n_steps", 4)
    caches = cache_files(data)
    resumed = launch_script("sd3_train_network.py", *COMMON, *MAIN, "--train_data_dir", root / "data", "--output_dir", root / "b",
                            "--resume", root / "a" / "s-step00000002-state")
    return {"root": root, "data": data, "run": run, "resumed": resumed, "caches": caches}


@pytest.mark.slow
def test_lora_file_keys_and_metadata(trained):
    out = trained["root"] / "a"
    with safe_open(str(out / "s.safetensors"), framework="pt") as f:
        keys, md = set(f.keys()), f.metadata()
    modules = {k.split(".")[0] for k in keys}
    for part in ("attn_qkv", "attn_proj", "mlp_fc1", "mlp_fc2", "adaLN_modulation_1"):
        assert f"lora_unet_joint_blocks_0_x_block_{part}" in modules and f"lora_unet_joint_blocks_0_context_block_{part}" in modules
    # the last context block is pre-only: qkv and a 2H modulation, no proj, no MLP
    assert {m for m in modules if m.startswith("lora_unet_joint_blocks_1_context_block")} == {
        "lora_unet_joint_blocks_1_context_block_attn_qkv", "lora_unet_joint_blocks_1_context_block_adaLN_modulation_1"}
    assert len(keys) == 3 * len(modules) and not any(k.startswith("lora_te") for k in keys)  # --network_train_unet_only
    weights = load_file(str(out / "s.safetensors"))
    hidden = 128  # the tiny MMDiT's width
    assert weights["lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight"].shape == (3 * hidden, 4)
    assert weights["lora_unet_joint_blocks_1_context_block_adaLN_modulation_1.lora_up.weight"].shape == (2 * hidden, 4)
    assert float(weights["lora_unet_joint_blocks_0_x_block_attn_qkv.alpha"]) == 2.0
    assert md["ss_base_model_version"] == "medium" and md["modelspec.architecture"] == "stable-diffusion-3-medium/lora"
    assert md["modelspec.implementation"] == "diffusers" and md["ss_network_module"] == "networks.lora_sd3"
    assert (md["ss_weighting_scheme"], md["ss_logit_mean"], md["ss_logit_std"], md["ss_mode_scale"]) == ("logit_normal", "0.0", "1.0", "1.29")
    assert md["ss_apply_lg_attn_mask"] == md["ss_apply_t5_attn_mask"] == "False"
    assert md["ss_mixed_precision"] == "bf16" and md["ss_steps"] == "4"
    saved = sorted(n for n in os.listdir(out) if n.startswith("s"))
    assert saved == ["s-state", "s-step00000002-state", "s-step00000002.safetensors", "s-step00000004-state",
                     "s-step00000004.safetensors", "s.safetensors", "s_losses.json", "sample"]


@pytest.mark.slow
def test_caches_preview_and_validation(trained):
    data, run = trained["data"], trained["run"]
    names = os.listdir(data)
    assert sorted(n for n in names if n.endswith("_sd3_te.safetensors")) == [f"{i}_sd3_te.safetensors" for i in range(4)]
    assert sorted(n for n in names if n.endswith("_0064x0064_sd3.safetensors")) == [f"{i}_0064x0064_sd3.safetensors" for i in range(4)]
    with safe_open(str(data / "0_sd3_te.safetensors"), framework="pt") as f:
        md, keys = f.metadata(), set(f.keys())
        l_out = f.get_tensor("v0.l_out")
    assert md["architecture"] == "sd3" and keys == {f"v0.{k}" for k in
                                                    ("l_out", "g_out", "t5_out", "l_pooled", "g_pooled", "l_attn_mask", "g_attn_mask", "t5_attn_mask")}
    identity = json.loads(md["identity"])
    assert identity["apply_lg_attn_mask"] is False and identity["apply_t5_attn_mask"] is False
    assert identity["tokens"]["t5_max_length"] == 16 and l_out.shape == (77, 64)  # the tiny CLIP-L's width
    with safe_open(str(data / "0_0064x0064_sd3.safetensors"), framework="pt") as f:
        assert any(f.get_slice(k).get_shape()[0] == 16 for k in f.keys())  # 16 latent channels
    (png,) = os.listdir(trained["root"] / "a" / "sample")
    assert png.startswith("s_000004_00_") and png.endswith("_7.png")
    assert Image.open(trained["root"] / "a" / "sample" / png).size == (64, 48)
    values = [float(line.rsplit(": ", 1)[1]) for line in run.stderr.splitlines() if "validation loss (step" in line]
    assert len(values) == 2 and all(math.isfinite(v) for v in values)


@pytest.mark.slow
def test_resume_continues_exactly_and_reuses_the_caches(trained):
    root = trained["root"]
    a, b = load_file(str(root / "a" / "s.safetensors")), load_file(str(root / "b" / "s.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = [json.load(open(root / d / "s_losses.json")) for d in ("a", "b")]
    assert losses[0] == losses[1]
    # the latent caches are reused as they were. (The text-encoder caches of a built-in model are rebuilt by every run:
    # its tiny tokenizers are read from a new temporary folder each time, and the folder is part of the cache identity.)
    latents = {n: t for n, t in trained["caches"].items() if not n.endswith("_te.safetensors")}
    assert len(latents) == 4 and {n: t for n, t in cache_files(trained["data"]).items() if n in latents} == latents


@pytest.mark.slow
def test_readme_command_on_tiny_sd35_medium_with_offload_masks_and_position_options(trained, tmp_path):
    """The README's SD3 command as written there, on kiln-tiny-sd3.5-medium instead of the model files
    (--blocks_to_swap 20 lowered to what 3 blocks allow, fp8 base weights, bf16), plus checkpointed activations in host
    memory, both attention masks (part of the text-encoder cache identity), SD3.5 Medium's position-embedding options
    and previews, one with its own flow shift."""
    import shlex

    text = open(os.path.join(ROOT, "README.md")).read().split("accelerate launch sd3_train_network.py", 1)[1]
    args = shlex.split(text.split("```", 1)[0].replace("\\\n", " "))
    for flag in ("--clip_l", "--clip_g", "--t5xxl", "--dataset_config"):
        del args[args.index(flag) : args.index(flag) + 2]
    args[args.index("--pretrained_model_name_or_path") + 1] = "kiln-tiny-sd3.5-medium"
    args[args.index("--output_dir") + 1] = str(tmp_path / "o")
    data = tmp_path / "data" / "2_shapes"
    shutil.copytree(trained["data"], data)  # with the caches of the first run (file times kept)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a shape --w 64 --h 64 --s 2 --d 3 --fs 2.0\na shape --w 64 --h 64 --s 2 --d 4\n")
    res = launch_script(
        "sd3_train_network.py", *args, "--train_data_dir", tmp_path / "data", "--resolution", 64, "--caption_extension", ".txt",
        "--train_batch_size", 2, "--max_data_loader_n_workers", 0, "--t5xxl_max_token_length", 16, "--seed", 3,
        "--max_train_steps", 2, "--cpu_offload_checkpointing", "--apply_lg_attn_mask", "--apply_t5_attn_mask",
        "--pos_emb_random_crop_rate", 0.5, "--enable_scaled_pos_embed", "--sample_prompts", prompts, "--sample_every_n_steps", 2)
    assert "--blocks_to_swap 20: this transformer has 3 blocks, so 1 are swapped" in res.stderr
    with safe_open(str(tmp_path / "o" / "mylora.safetensors"), framework="pt") as f:
        md, modules = f.metadata(), {k.split(".")[0] for k in f.keys()}
    assert md["ss_base_model_version"] == "5-medium" and md["modelspec.architecture"] == "stable-diffusion-3-5-medium/lora"
    assert (md["ss_network_dim"], md["ss_fp8_base"], md["ss_weighting_scheme"], md["ss_mixed_precision"]) == ("16", "True", "logit_normal", "bf16")
    assert md["ss_apply_lg_attn_mask"] == md["ss_apply_t5_attn_mask"] == "True" and md["ss_gradient_checkpointing"] == "True"
    assert "lora_unet_joint_blocks_0_x_block_attn2_qkv" in modules and "lora_unet_joint_blocks_2_x_block_attn2_qkv" not in modules
    assert sorted(n.rsplit("_", 1)[1] for n in os.listdir(tmp_path / "o" / "sample")) == ["3.png", "4.png"]
    with safe_open(str(data / "0_sd3_te.safetensors"), framework="pt") as f:
        identity = json.loads(f.metadata()["identity"])
    assert identity["apply_lg_attn_mask"] is True and identity["apply_t5_attn_mask"] is True
    assert all(cache_files(data)[n] != t for n, t in trained["caches"].items())  # other encoders, VAE and masks: rebuilt
