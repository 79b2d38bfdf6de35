"""Whole-model training end to end: train_db.py, fine_tune.py, sdxl_train.py, flux_train.py, sd3_train.py on tiny
models. The saved checkpoints are read back as files (the savers' own oracles are in tests/test_checkpoints.py);
what is checked here is what the run did: which parts changed and which stayed bit for bit, when the text encoder
stopped, the EMA by hand, exact resume, and the refusals."""

from __future__ import annotations

import json
import types

import pytest
import torch
from conftest import launch_script, write_caption, write_image
from safetensors import safe_open
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

COMMON = ["--max_data_loader_n_workers", "0", "--seed", "1", "--resolution", "64", "--caption_extension", ".txt"]


def read(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def part(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k.startswith(prefix)}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def images(folder, n: int = 2, caption: str = "a shape") -> None:
    colors = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]
    for i in range(n):
        write_caption(write_image(folder / f"{i}.png", (64, 64), colors[i % 4]), f"{caption} {i}")


# ---------------------------------------------------------------------------------------------------------------------
# DreamBooth (SD 1.x): reg images, the text encoder stops, fused backward, EMA, exact resume


@pytest.fixture(scope="module")
def sd_file(tmp_path_factory):
    from library.sd_models import save_sd_single_file
    from library.tiny_models import build_tiny_sd

    path = tmp_path_factory.mktemp("models") / "tiny_sd1.safetensors"
    parts = build_tiny_sd()
    save_sd_single_file(str(path), (parts["text_encoder"], parts["vae"], parts["unet"]), v2=False)
    return path


@pytest.fixture(scope="module")
def dreambooth(sd_file, tmp_path_factory):
    root = tmp_path_factory.mktemp("db")
    images(root / "img" / "2_sks dog")
    images(root / "reg" / "1_dog", caption="a dog")
    args = [*COMMON, "--pretrained_model_name_or_path", sd_file, "--train_data_dir", root / "img", "--reg_data_dir",
            root / "reg", "--prior_loss_weight", "0.5", "--train_batch_size", "2", "--learning_rate", "1e-3",
            "--max_train_steps", "4", "--stop_text_encoder_training", "2", "--save_every_n_steps", "2", "--save_state",
            "--fused_backward_pass", "--ema_decay", "0.5", "--ema_update_every", "2", "--output_name", "db"]
    out = root / "out"
    launch_script("train_db.py", *args, "--output_dir", out)
    return args, out, root


def test_dreambooth_trains_unet_and_stops_the_text_encoder(sd_file, dreambooth):
    _, out, _ = dreambooth
    source, _ = read(sd_file)
    step2, _ = read(out / "db-step00000002.safetensors")
    final, md = read(out / "db.safetensors")
    assert final.keys() == source.keys()  # the original LDM layout, every tensor
    assert same(part(final, "first_stage_model."), part(source, "first_stage_model."))  # the VAE is copied bit for bit
    te, unet = "cond_stage_model.", "model.diffusion_model."
    assert not same(part(step2, te), part(source, te))  # trained for 2 steps
    assert same(part(final, te), part(step2, te))  # then stopped (--stop_text_encoder_training 2)
    assert not same(part(final, unet), part(step2, unet))
    assert md["modelspec.architecture"] == "stable-diffusion-v1" and md["ss_steps"] == "4"
    losses = json.loads((out / "db_losses.json").read_text())["losses"]
    assert len(losses) == 4


def test_ema_by_hand_is_saved_next_to_each_checkpoint(sd_file, dreambooth):
    """--ema_decay 0.5 --ema_update_every 2: ema2 = 0.5 w0 + 0.5 w2, ema4 = 0.5 ema2 + 0.5 w4 (float32 weights)."""
    _, out, _ = dreambooth
    w0, _ = read(sd_file)
    w2, _ = read(out / "db-step00000002.safetensors")
    w4, _ = read(out / "db.safetensors")
    ema2, _ = read(out / "db-step00000002-ema.safetensors")
    ema4, _ = read(out / "db-ema.safetensors")
    for prefix in ("model.diffusion_model.", "cond_stage_model."):
        for key in part(w0, prefix):
            expect2 = 0.5 * w0[key] + 0.5 * w2[key]
            torch.testing.assert_close(ema2[key], expect2, rtol=0, atol=1e-6)
            torch.testing.assert_close(ema4[key], 0.5 * expect2 + 0.5 * w4[key], rtol=0, atol=1e-6)
    assert same(part(ema4, "first_stage_model."), part(w0, "first_stage_model."))
    assert not same(part(ema4, "model.diffusion_model."), part(w4, "model.diffusion_model."))


def test_resume_continues_bit_for_bit_with_fused_steps_and_ema(dreambooth):
    args, out, root = dreambooth
    again = root / "again"
    launch_script("train_db.py", *args, "--output_dir", again, "--resume", out / "db-step00000002-state")
    for name in ("db.safetensors", "db-ema.safetensors"):
        assert same(read(again / name)[0], read(out / name)[0]), name
    first = json.loads((out / "db_losses.json").read_text())["losses"]
    assert json.loads((again / "db_losses.json").read_text())["losses"] == first


def test_prior_loss_weight_weights_the_regularisation_samples_by_hand():
    """The logged batch loss is the mean of the samples' losses, each times its weight (prior_loss_weight for
    regularisation images), computed here from the family's per-sample losses with the same random numbers."""
    from accelerate import Accelerator

    from library.family_sd import SdFamily
    from library.train_script import training_parser
    from library.trainer import batch_loss, sample_generators

    args = training_parser(SdFamily(), "t").parse_args(["--pretrained_model_name_or_path", "kiln-tiny-sd"])
    family = SdFamily()
    models = family.load_models(args)
    torch.manual_seed(0)
    batch = {
        "images": torch.rand(2, 3, 64, 64) * 2 - 1,
        "captions": ["a dog", "a sks dog"],
        "loss_weights": torch.tensor([0.25, 1.0]),  # the first is a regularisation image, prior_loss_weight 0.25
        "loss_scales": torch.ones(2),
        "batch_number": 3,
        "positions": torch.tensor([0, 1]),
    }
    loss, logged = batch_loss(args, family, models, batch, 7, torch.device("cpu"), torch.float32, False, Accelerator(cpu=True))
    from library.trainer import batch_latents

    generators = sample_generators(7, batch)
    latents = batch_latents(family, models, batch, generators, "cpu", torch.float32)
    with torch.no_grad():
        conds = family.text_conditioning(args, models, batch)
        per_sample = family.sample_losses(args, models, batch, latents, conds, generators)
    expected = 0.25 * per_sample[0] + 1.0 * per_sample[1]
    torch.testing.assert_close(logged[0], expected)
    torch.testing.assert_close(loss.detach(), expected)
    assert logged[1].item() == 2


# ---------------------------------------------------------------------------------------------------------------------
# fine_tune.py from metadata, sdxl_train.py, flux_train.py, sd3_train.py


def test_sdxl_block_lr_second_text_encoder_bf16_weights_as_diffusers_folder(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from library.sdxl_models import load_sdxl_model

    images(tmp_path / "2_shape")
    lrs = ["0"] * 23
    lrs[4] = lrs[22] = "1e-3"  # input_blocks.3 and the output layers
    out = tmp_path / "out"
    launch_script("sdxl_train.py", *COMMON, "--pretrained_model_name_or_path", "kiln-tiny-sdxl", "--train_data_dir", tmp_path,
                  "--output_dir", out, "--output_name", "xl", "--max_train_steps", "2", "--learning_rate", "1e-3",
                  "--block_lr", ",".join(lrs), "--train_text_encoder", "--learning_rate_te1", "0", "--learning_rate_te2",
                  "1e-3", "--mixed_precision", "bf16", "--full_bf16", "--save_model_as", "diffusers", "--optimizer_type",
                  "AdamW", "--max_grad_norm", "1")
    base = load_sdxl_model("kiln-tiny-sdxl")
    pipe = StableDiffusionXLPipeline.from_pretrained(str(out / "xl"))
    assert same(pipe.text_encoder.state_dict(), base.text_encoder.state_dict())  # te1: rate 0, frozen
    assert not same(pipe.text_encoder_2.state_dict(), {k: v.to(torch.bfloat16) for k, v in base.text_encoder_2.state_dict().items()})
    assert pipe.text_encoder_2.dtype == torch.bfloat16  # trained in bf16 (--full_bf16), saved as trained
    from library.ldm_names import unet_ldm_param_names

    sgm = unet_ldm_param_names(base.unet)
    trained, frozen = base.unet.state_dict(), pipe.unet.state_dict()
    for name, value in trained.items():
        moved = not torch.equal(frozen[name].float(), value.to(torch.bfloat16).float())
        expect = sgm[name].startswith(("input_blocks.3.", "out."))
        assert moved == expect, name


def test_flux_blockwise_adafactor_with_cached_text(tmp_path):
    from library.flux_models import flux_transformer_to_bfl, load_flux_model

    images(tmp_path / "2_shape")
    out = tmp_path / "out"
    res = launch_script("flux_train.py", *COMMON, "--pretrained_model_name_or_path", "kiln-tiny-flux", "--train_data_dir", tmp_path,
                  "--output_dir", out, "--output_name", "fx", "--max_train_steps", "2", "--learning_rate", "1e-3",
                  "--optimizer_type", "adafactor", "--optimizer_args", "relative_step=False", "scale_parameter=False",
                  "warmup_init=False", "--blockwise_fused_optimizers", "--cache_text_encoder_outputs", "--max_grad_norm", "1",
                  "--cache_latents", "--validation_split", "0.5", "--validate_every_n_steps", "1")
    assert res.stderr.count("validation loss (step") == 2  # validation as in the LoRA scripts
    state, md = read(out / "fx.safetensors")
    base = load_flux_model("kiln-tiny-flux", dtype=torch.float32).transformer
    source = flux_transformer_to_bfl(base.state_dict(), base.config)
    assert state.keys() == source.keys()  # the bare BFL layout
    assert all(not torch.equal(state[k], source[k]) for k in source if k.startswith("double_blocks.0.img_attn.qkv"))
    assert md["modelspec.architecture"] == "flux-1-dev"


def test_sd3_trains_clips_as_side_files_and_freezes_the_last_block(tmp_path):
    images(tmp_path / "2_shape")
    out = tmp_path / "out"
    launch_script("sd3_train.py", *COMMON, "--pretrained_model_name_or_path", "kiln-tiny-sd3", "--train_data_dir", tmp_path,
                  "--output_dir", out, "--output_name", "s3", "--max_train_steps", "2", "--learning_rate", "1e-3",
                  "--train_text_encoder", "--num_last_block_to_freeze", "1")
    names = sorted(p.name for p in out.iterdir() if p.suffix == ".safetensors")
    assert names == ["s3.safetensors", "s3_clip_g.safetensors", "s3_clip_l.safetensors"]  # T5 not trained, not written
    state, md = read(out / "s3.safetensors")
    assert {k.split(".")[0] for k in state} == {"model", "first_stage_model"}
    assert md["modelspec.architecture"] == "stable-diffusion-3-medium"
    from library.sd3_models import load_sd3_model, sd3_to_sai_state_dict

    base = load_sd3_model("kiln-tiny-sd3", dtype=torch.float32)
    source = sd3_to_sai_state_dict(base.transformer)
    last = f"model.diffusion_model.joint_blocks.{base.transformer.config.num_layers - 1}."
    assert all(torch.equal(state[k], source[k]) for k in source if k.startswith(last))  # frozen
    assert not all(torch.equal(state[k], source[k]) for k in source if k.startswith("model.diffusion_model.joint_blocks.0."))
    clip_l = load_file(str(out / "s3_clip_l.safetensors"))
    assert not same(clip_l, {k: v for k, v in base.clip_l.state_dict().items() if k in clip_l})


def test_pruning_removes_every_file_of_an_old_checkpoint(tmp_path):
    """--save_last_n_steps: a whole-model checkpoint's files (EMA copy, SD3 side files, diffusers folder) go together."""
    from library.method_full import CHECKPOINT_SUFFIXES
    from library.saving import prune_checkpoints

    old = ["m-step00000002.safetensors", "m-step00000002-ema.safetensors", "m-step00000002_clip_l.safetensors",
           "m-step00000002-ema_t5xxl.safetensors", "m-step00000002.ckpt"]
    kept = ["m-step00000004.safetensors", "m-step00000002-notes.txt", "m-step00000002-state", "other-step00000002.safetensors"]
    for name in old + kept:
        (tmp_path / name).mkdir() if name.endswith("-state") else (tmp_path / name).write_text("x")
    (tmp_path / "m-step00000002").mkdir()  # a diffusers folder
    (tmp_path / "m-step00000002" / "model_index.json").write_text("{}")
    removed = prune_checkpoints(str(tmp_path), "m", CHECKPOINT_SUFFIXES, "step", 4)
    assert sorted(p.split("/")[-1] for p in removed) == sorted(old + ["m-step00000002"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)


def test_previews_see_the_ema_and_the_weights_come_back():
    """--sample_with_ema: inside previewing() the model holds the EMA, afterwards its own weights, bit for bit."""
    from library.family_sd import SdFamily
    from library.method_full import DREAMBOOTH, FullMethod
    from library.train_script import training_parser

    family, method = SdFamily(), FullMethod(DREAMBOOTH)
    args = training_parser(family, "t", method).parse_args(
        ["--pretrained_model_name_or_path", "kiln-tiny-sd", "--ema_decay", "0.5", "--sample_with_ema"]
    )
    models = family.load_models(args)
    method.build(args, family, models)
    method.to_device(torch.device("cpu"), torch.float32)
    method.prepare(types.SimpleNamespace(num_processes=1))  # one process: the EMA starts here
    before = {k: v.clone() for k, v in models.denoiser.state_dict().items()}
    with torch.no_grad():
        for p in models.denoiser.parameters():
            p.add_(1.0)
    method.after_optimizer_step(1)  # ema = 0.5 before + 0.5 (before + 1)
    trained = {k: v.clone() for k, v in models.denoiser.state_dict().items()}
    with method.previewing():
        for k, v in models.denoiser.state_dict().items():
            torch.testing.assert_close(v, before[k] + 0.5, rtol=0, atol=1e-6)
        assert not models.denoiser.training
    assert same(models.denoiser.state_dict(), trained) and models.denoiser.training


@pytest.mark.parametrize("flags", [["--fused_backward_pass"], ["--blockwise_fused_optimizers"]])
def test_several_processes_refuse_fused_steps(flags, monkeypatch):
    from library.family_sd import SdFamily
    from library.method_full import FLUX, FullMethod
    from library.train_script import training_parser

    method = FullMethod(FLUX)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    method.args = training_parser(SdFamily(), "t", method).parse_args(["--pretrained_model_name_or_path", "kiln-tiny-sd", *flags])
    from library.sharding import take_fsdp_request

    take_fsdp_request()
    try:
        with pytest.raises(ValueError, match=f"{flags[0]} steps before the processes' gradients are averaged"):
            method.prepare(types.SimpleNamespace(num_processes=2, distributed_type="MULTI_CPU"))
    finally:
        monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
        take_fsdp_request()


def test_default_learning_rates_are_sd_scripts():
    from library.family_sd import SdFamily
    from library.method_full import DREAMBOOTH, FullMethod
    from library.train_script import training_parser

    assert training_parser(SdFamily(), "t", FullMethod(DREAMBOOTH)).parse_args([]).learning_rate == 2e-6
    assert training_parser(SdFamily(), "t").parse_args([]).learning_rate == 1e-4  # LoRA


@pytest.mark.parametrize("model,expected", [("kiln-tiny-sd", "safetensors"), ("{folder}", "diffusers")])
def test_default_checkpoint_format_follows_the_model(model, expected, tmp_path):
    from library.method_full import default_save_format

    assert default_save_format(model.format(folder=tmp_path)) == expected


def test_fine_tune_from_in_json_on_one_process_ddp_and_fsdp(sd_file, tmp_path):
    """fine_tune.py from --in_json metadata: the U-Net trains, the text encoder and VAE are the source file's bit for
    bit, previews and TensorBoard logs are written. 2 processes x batch 1 under DDP and under FSDP2
    (ACCELERATE_USE_FSDP=true, as `accelerate launch --use_fsdp` sets it) train as 1 process x batch 2 (SGD with
    momentum; float32 rounding apart); FSDP holds half the weights per process, its checkpoint is a normal single
    file, and its state resumes exactly."""
    import re

    images(tmp_path / "img", n=4)
    (tmp_path / "meta.json").write_text(json.dumps({f"{i}": {"caption": f"a shape {i}"} for i in range(4)}))
    (tmp_path / "p.txt").write_text("a shape --w 64 --h 64 --s 2 --d 1\n")
    args = [*COMMON, "--pretrained_model_name_or_path", sd_file, "--in_json", tmp_path / "meta.json", "--train_data_dir",
            tmp_path / "img", "--output_name", "ft", "--max_train_steps", "2", "--learning_rate", "0.5", "--optimizer_type", "SGD",
            "--optimizer_args", "momentum=0.9"]
    launch_script("fine_tune.py", *args, "--train_batch_size", "2", "--output_dir", tmp_path / "one", "--sample_prompts",
                  tmp_path / "p.txt", "--sample_every_n_steps", "2", "--logging_dir", tmp_path / "logs")
    assert len(list((tmp_path / "one" / "sample").iterdir())) == 1  # previews and TensorBoard logs as in the LoRA scripts
    assert list((tmp_path / "logs").rglob("events.out.tfevents.*"))
    source, _ = read(sd_file)
    one, _ = read(tmp_path / "one" / "ft.safetensors")
    for prefix in ("cond_stage_model.", "first_stage_model."):  # not trained (no --train_text_encoder)
        assert same(part(one, prefix), part(source, prefix)), prefix
    unet = "model.diffusion_model."
    assert sum(not torch.equal(source[k], one[k]) for k in part(source, unet)) > len(part(source, unet)) / 2

    launch_script("fine_tune.py", *args, "--train_batch_size", "1", "--output_dir", tmp_path / "ddp", processes=2)
    fsdp = {"ACCELERATE_USE_FSDP": "true"}
    res = launch_script("fine_tune.py", *args, "--train_batch_size", "1", "--output_dir", tmp_path / "fsdp", "--save_every_n_steps",
                        "1", "--save_state", "--ema_decay", "0.5", processes=2, env=fsdp)
    held = re.findall(r"FSDP2 \(fully_shard per block\) over 2 processes: process \d holds (\d+) of the (\d+)", res.stderr)
    assert len(held) == 2 and all(abs(int(local) - int(whole) / 2) < 0.01 * int(whole) for local, whole in held), held
    for run in ("ddp", "fsdp"):
        state, _ = read(tmp_path / run / "ft.safetensors")
        assert state.keys() == one.keys()
        for k in one:
            torch.testing.assert_close(state[k], one[k], rtol=0, atol=1e-6)
        losses = json.loads((tmp_path / run / "ft_losses.json").read_text())["losses"]
        assert losses == pytest.approx(json.loads((tmp_path / "one" / "ft_losses.json").read_text())["losses"], rel=1e-5)
    # a sharded state (weights, EMA and optimizer gathered whole) resumes exactly
    launch_script("fine_tune.py", *args, "--train_batch_size", "1", "--output_dir", tmp_path / "resumed", "--resume",
                  tmp_path / "fsdp" / "ft-step00000001-state", "--ema_decay", "0.5", processes=2, env=fsdp)
    for name in ("ft.safetensors", "ft-ema.safetensors"):
        assert same(read(tmp_path / "resumed" / name)[0], read(tmp_path / "fsdp" / name)[0]), name


# ---------------------------------------------------------------------------------------------------------------------
# refusals, before anything loads


@pytest.mark.parametrize(
    "script,flags,named",
    [
        ("train_db", ["--fp8_base"], "--fp8_base"),
        ("train_db", ["--full_fp16", "--mixed_precision", "fp16"], "--full_fp16"),
        ("train_db", ["--fused_backward_pass", "--gradient_accumulation_steps", "2"], "gradient_accumulation"),
        ("sdxl_train", ["--block_lr", "1,2"], "--block_lr"),
        ("sdxl_train", ["--fused_backward_pass", "--fused_optimizer_groups", "4"], "exclude each other"),
        ("flux_train", ["--blocks_to_swap", "4"], "--blocks_to_swap"),
        ("train_db", ["--sample_with_ema"], "--ema_decay"),
        ("train_db", ["--learning_rate", "0", "--stop_text_encoder_training", "-1"], "nothing to train"),
        ("sd3_train", ["--use_t5xxl_cache_only"], "--use_t5xxl_cache_only"),
    ],
)
def test_options_that_cannot_train_stop_before_the_model_loads(script, flags, named, tmp_path):
    from library.family_flux import FluxFamily
    from library.family_sd import SdFamily
    from library.family_sd3 import Sd3Family
    from library.family_sdxl import SdxlFamily
    from library.method_full import DREAMBOOTH, FLUX, SD3, SDXL, FullMethod
    from library.train_script import training_parser
    from library.trainer import TrainingError, check_args

    family, spec, model = {
        "train_db": (SdFamily(), DREAMBOOTH, "kiln-tiny-sd"),
        "sdxl_train": (SdxlFamily(), SDXL, "kiln-tiny-sdxl"),
        "flux_train": (FluxFamily(), FLUX, "kiln-tiny-flux"),
        "sd3_train": (Sd3Family(), SD3, "kiln-tiny-sd3"),
    }[script]
    method = FullMethod(spec)
    args = training_parser(family, "t", method).parse_args(
        ["--pretrained_model_name_or_path", model, "--output_dir", str(tmp_path), *flags]
    )
    with pytest.raises(TrainingError, match=named):
        check_args(args, family, method)
