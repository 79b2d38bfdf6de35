"""Full-model checkpoints (ModelFamily.save_checkpoint) of every family, read back by independent oracles.

Each test loads a tiny model from a real on-disk format through the family's own load_models, changes the trained
parts' weights (as training would) and casts the frozen ones to bf16 (as the trainer places them), saves, and reads the
result with diffusers' own loaders: `from_single_file` with a local config folder (offline) for single files,
the pipeline's `from_pretrained` for diffusers folders, transformers for SD3's text-encoder side files. Trained parts
must give the in-memory model's weights and outputs; untouched parts must be the source model's tensors bit for bit,
in the source's dtype (never the bf16 copies in memory)."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from library.checkpoint_files import UNET_PREFIX, VAE_PREFIX
from library.model_files import save_diffusers_folder
from library.train_script import training_parser

METADATA = {"modelspec.architecture": "test-arch", "modelspec.title": "tiny", "kiln.number": "3"}


def parse(family, *argv: str):
    return training_parser(family, "test").parse_args(list(map(str, argv)))


def perturb(module: torch.nn.Module, seed: int) -> None:
    """What training does to a part: every floating weight changes."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.05)


def frozen_as_trainer_keeps(*modules: torch.nn.Module) -> None:
    """The trainer keeps frozen parts in the --mixed_precision dtype: what is in memory is not the user's model."""
    for m in modules:
        m.to(torch.bfloat16)


def assert_same_state(got: dict, want: dict, what: str, dtype: bool = True) -> None:
    assert set(got) == set(want), f"{what}: {sorted(set(got) ^ set(want))[:5]}"
    for k in want:
        assert not dtype or got[k].dtype == want[k].dtype, f"{what}: {k} is {got[k].dtype}, not {want[k].dtype}"
        assert torch.equal(got[k].to(want[k].dtype), want[k]), f"{what}: {k} differs"


def under(tensors: dict, prefix: str, new_prefix: str = "") -> dict:
    return {new_prefix + k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def file_metadata(path: str) -> dict:
    with safe_open(path, framework="pt") as f:
        return dict(f.metadata() or {})


def leftovers(folder) -> list[str]:
    return [n for n in os.listdir(folder) if n.endswith((".tmp", ".old"))]


def unet_output(unet, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, unet.config.in_channels, 16, 16, generator=g)
    context = torch.randn(2, 7, unet.config.cross_attention_dim, generator=g)
    kwargs = {}
    if unet.config.addition_embed_type == "text_time":
        pooled_dim = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0], [48.0, 80.0, 8.0, 0.0, 64.0, 64.0]])
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(2, pooled_dim, generator=g), "time_ids": time_ids}
    with torch.no_grad():
        return unet(latents, torch.tensor([10, 700]), context, **kwargs).sample


def text_output(text_encoder) -> torch.Tensor:
    ids = torch.arange(3, 15).reshape(1, 12)
    with torch.no_grad():
        return text_encoder(ids, output_hidden_states=True).hidden_states[-2]


def same_outputs(got: torch.Tensor, want: torch.Tensor) -> None:
    # the weights are equal (checked); the last bits of a matmul may depend on the tensors' memory alignment
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# SD 1.x: an fp16 LDM single file -> single files (safetensors, ckpt, bf16), replaced atomically
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd1_file(tmp_path_factory):
    """The tiny SD 1.x as an original single file in float16 (what users have)."""
    from library.sd_models import save_sd_single_file
    from library.tiny_models import build_tiny_sd

    p = build_tiny_sd()
    path = str(tmp_path_factory.mktemp("sd1") / "sd1-fp16.safetensors")
    save_sd_single_file(path, (p["text_encoder"], p["vae"], p["unet"]), v2=False, dtype=torch.float16)
    # as in real SD 1.x files: CLIP's position_ids, which no model holds as a weight (kiln's loader skips it)
    tensors = load_file(path)
    tensors["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77).unsqueeze(0)
    save_file(tensors, path, metadata={"kiln.test": "1"})
    return path


@pytest.fixture(scope="module")
def sd1_trained(sd1_file):
    from library.family_sd import SdFamily

    family = SdFamily()
    args = parse(family, "--pretrained_model_name_or_path", sd1_file)
    models = family.load_models(args)
    perturb(models.denoiser, 1)
    frozen_as_trainer_keeps(models.vae, *models.text_encoders)
    return family, args, models


def test_sd1_single_file(sd1_file, sd1_trained, tiny_sd, tmp_path):
    from diffusers import UNet2DConditionModel

    family, args, models = sd1_trained
    out = str(tmp_path / "run-step00000200")
    written = family.save_checkpoint(args, models, out, "safetensors", None, METADATA, frozenset({"denoiser"}))
    assert written == [out + ".safetensors"] and not leftovers(tmp_path)

    # the trained U-Net: diffusers' own loader gives the in-memory weights and outputs
    unet = UNet2DConditionModel.from_single_file(
        written[0], config=tiny_sd, subfolder="unet", local_files_only=True, torch_dtype=torch.float32
    )
    assert_same_state(unet.state_dict(), models.denoiser.state_dict(), "U-Net")
    same_outputs(unet_output(unet), unet_output(models.denoiser))

    # the text encoder and the VAE: the source file's tensors, float16, bit for bit (memory holds bf16 copies)
    saved, source = load_file(written[0]), load_file(sd1_file)
    for prefix in ("cond_stage_model.", VAE_PREFIX):
        assert_same_state(under(saved, prefix), under(source, prefix), prefix)
    assert set(saved) == set(source)
    assert file_metadata(written[0]) == METADATA


def test_sd1_ckpt_bf16_and_replacing(sd1_file, sd1_trained, tmp_path, monkeypatch):
    from library import model_checkpoint

    family, args, models = sd1_trained
    out = str(tmp_path / "run")
    (ckpt,) = family.save_checkpoint(args, models, out, "ckpt", None, None, frozenset({"denoiser"}))
    (st,) = family.save_checkpoint(args, models, out, "safetensors", None, None, frozenset({"denoiser"}))
    assert ckpt == out + ".ckpt"
    pickled = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert set(pickled) == {"state_dict"}
    assert_same_state(pickled["state_dict"], load_file(st), "ckpt vs safetensors")

    # --save_precision bf16: every floating tensor bf16, the trained ones rounded from memory, the others from the file
    family.save_checkpoint(args, models, out, "safetensors", torch.bfloat16, METADATA, frozenset({"denoiser"}))
    saved, source = load_file(st), load_file(sd1_file)
    assert {v.dtype for v in saved.values() if v.is_floating_point()} == {torch.bfloat16}
    unet_keys = under(source, UNET_PREFIX, UNET_PREFIX)
    changed = [k for k in unet_keys if not torch.equal(saved[k], source[k].to(torch.bfloat16))]
    assert len(changed) > len(unet_keys) // 2  # the trained U-Net, not the file's
    for k in set(source) - set(unet_keys):
        assert torch.equal(saved[k], source[k].to(torch.bfloat16)), k
    assert file_metadata(st) == METADATA

    # an existing file is replaced only by a complete one: a write that fails half-way leaves it as it was
    before = open(st, "rb").read()
    calls = {"n": 0}
    real_get = model_checkpoint.SourceFile.get

    def failing_get(self, key):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("disk gone")
        return real_get(self, key)

    monkeypatch.setattr(model_checkpoint.SourceFile, "get", failing_get)
    perturb(models.denoiser, 2)
    with pytest.raises(RuntimeError, match="disk gone"):
        family.save_checkpoint(args, models, out, "safetensors", None, METADATA, frozenset({"denoiser"}))
    assert open(st, "rb").read() == before and not leftovers(tmp_path)
    monkeypatch.undo()
    family.save_checkpoint(args, models, out, "safetensors", None, METADATA, frozenset({"denoiser"}))
    assert open(st, "rb").read() != before and not leftovers(tmp_path)


def test_ckpt_source(sd1_file, tmp_path):
    """A .ckpt source (read weights-only): its untouched tensors go into the new file as they are."""
    from library.family_sd import SdFamily

    source = str(tmp_path / "model.ckpt")
    torch.save({"state_dict": load_file(sd1_file), "global_step": 10}, source)
    family = SdFamily()
    args = parse(family, "--pretrained_model_name_or_path", source)
    models = family.load_models(args)
    perturb(models.denoiser, 13)
    frozen_as_trainer_keeps(models.vae, *models.text_encoders)
    (path,) = family.save_checkpoint(args, models, str(tmp_path / "out"), "safetensors", None, None, frozenset({"denoiser"}))
    saved, original = load_file(path), load_file(sd1_file)
    assert_same_state({k: v for k, v in saved.items() if not k.startswith(UNET_PREFIX)},
                      {k: v for k, v in original.items() if not k.startswith(UNET_PREFIX)}, "untouched parts")  # fmt: skip


def test_trained_names_are_checked(sd1_trained, tmp_path):
    family, args, models = sd1_trained
    with pytest.raises(ValueError, match="text_encoder_1"):
        family.save_checkpoint(args, models, str(tmp_path / "x"), "safetensors", None, None, frozenset({"text_encoder_1"}))
    with pytest.raises(ValueError, match="vae"):
        family.save_checkpoint(args, models, str(tmp_path / "x"), "safetensors", None, None, frozenset({"vae"}))
    with pytest.raises(ValueError, match="form"):
        family.save_checkpoint(args, models, str(tmp_path / "x"), "pt", None, None, frozenset({"denoiser"}))

    # a part stored in float8 in memory (--fp8_base) cannot be written from there
    from library.family import TrainModels
    from library.fp8_utils import store_linear_weights_fp8

    te = copy.deepcopy(models.text_encoders[0]).requires_grad_(False)
    store_linear_weights_fp8(te, compute_dtype=torch.bfloat16)
    fp8 = TrainModels([te], models.tokenizers, models.vae, models.denoiser)
    with pytest.raises(ValueError, match="float8"):
        family.save_checkpoint(args, fp8, str(tmp_path / "x"), "safetensors", None, None, frozenset({"text_encoder_0"}))
    assert not os.listdir(tmp_path)


def test_sd1_text_encoder_only_and_base_weights(sd1_file, sd1_trained, tmp_path, caplog):
    """An untrained U-Net comes from the file too; with --base_weights (LoRA files merged into the base model before
    training) every part but the VAE is written as it is in memory."""
    import copy

    from library.sd_models import text_encoder_to_ldm_state_dict

    family, args, models = sd1_trained
    out = str(tmp_path / "te")
    (path,) = family.save_checkpoint(args, models, out, "safetensors", None, None, frozenset({"text_encoder_0"}))
    saved, source = load_file(path), load_file(sd1_file)
    assert_same_state(under(saved, UNET_PREFIX), under(source, UNET_PREFIX), "U-Net (the file's)")
    memory_te = {k: v for k, v in text_encoder_to_ldm_state_dict(models.text_encoders[0], v2=False).items()}
    assert_same_state(under(saved, "cond_stage_model."), under(memory_te, "cond_stage_model."), "text encoder (memory)")

    merged = copy.copy(args)
    merged.base_weights = ["lora.safetensors"]
    family.save_checkpoint(merged, models, out, "safetensors", None, None, frozenset({"denoiser"}))
    saved = load_file(path)
    assert_same_state(under(saved, "cond_stage_model."), under(memory_te, "cond_stage_model."), "text encoder (memory)")
    assert_same_state(under(saved, VAE_PREFIX), under(source, VAE_PREFIX), "VAE (the file's)")
    assert "--base_weights" in caplog.text


@pytest.mark.parametrize("kind", ["folder", "sd_file", "diffusers_keys"])
def test_vae_option_sources(sd1_file, tiny_sd, tmp_path, kind):
    """--vae as a diffusers folder (float16), a whole LDM checkpoint (its first_stage_model.* copied by key) or a file
    of diffusers-layout keys: the saved single file holds that VAE, as diffusers' own loader reads it."""
    from diffusers import AutoencoderKL

    from library.family_sd import SdFamily
    from library.sd_models import save_sd_single_file
    from library.tiny_models import build_tiny_sd

    other = build_tiny_sd(seed=7)
    vae = other["vae"]
    if kind == "folder":
        vae.to(torch.float16)
        given = str(tmp_path / "vae")
        vae.save_pretrained(given)
    elif kind == "sd_file":
        given = str(tmp_path / "other.safetensors")
        save_sd_single_file(given, (other["text_encoder"], vae, other["unet"]), v2=False)
    else:
        given = str(tmp_path / "vae.safetensors")
        save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, given)
    from library.model_checkpoint import vae_part

    source = vae_part(given, {})  # where the saver takes it from: LDM keys by key, other layouts through a model
    assert (source.folder is not None, source.file is not None, source.prefix) == {
        "folder": (True, False, ""),
        "sd_file": (False, True, VAE_PREFIX),
        "diffusers_keys": (False, False, ""),
    }[kind]
    family = SdFamily()
    args = parse(family, "--pretrained_model_name_or_path", sd1_file, "--vae", given)
    models = family.load_models(args)
    frozen_as_trainer_keeps(models.vae)
    (path,) = family.save_checkpoint(args, models, str(tmp_path / "out"), "safetensors", None, None, frozenset({"denoiser"}))
    saved = load_file(path)
    want_dtype = torch.float16 if kind == "folder" else torch.float32
    assert {v.dtype for v in under(saved, VAE_PREFIX).values()} == {want_dtype}
    loaded = AutoencoderKL.from_single_file(path, config=tiny_sd, subfolder="vae", local_files_only=True, torch_dtype=want_dtype)
    assert_same_state(loaded.state_dict(), vae.state_dict(), "VAE")
    if kind == "sd_file":
        assert_same_state(under(saved, VAE_PREFIX), under(load_file(given), VAE_PREFIX), "VAE keys")


def test_failed_folder_write_keeps_the_old_folder(sd1_trained, tmp_path, monkeypatch):
    from library import model_checkpoint

    family, args, models = sd1_trained
    out = str(tmp_path / "folder")
    family.save_checkpoint(args, models, out, "diffusers", None, None, frozenset({"denoiser"}))
    unet_file = os.path.join(out, "unet", "diffusion_pytorch_model.safetensors")
    before = {name: sorted(files) for name, _, files in os.walk(out)}, open(unet_file, "rb").read()
    real = model_checkpoint._write_component
    calls = {"n": 0}

    def failing(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("no space left")
        return real(*a, **k)

    monkeypatch.setattr(model_checkpoint, "_write_component", failing)
    perturb(models.denoiser, 12)
    with pytest.raises(OSError, match="no space"):
        family.save_checkpoint(args, models, out, "diffusers", None, None, frozenset({"denoiser", "text_encoder_0"}))
    assert ({name: sorted(files) for name, _, files in os.walk(out)}, open(unet_file, "rb").read()) == before
    assert not leftovers(tmp_path)


# ---------------------------------------------------------------------------------------------------------------------
# SD 2.x: the built-in tiny model -> a diffusers folder (U-Net and text encoder trained, v-prediction)
# ---------------------------------------------------------------------------------------------------------------------


def test_sd2_builtin_to_diffusers_folder(tmp_path):
    from diffusers import StableDiffusionPipeline

    from library.family_sd import SdFamily
    from library.tiny_models import TINY_SD2, build_tiny_sd

    family = SdFamily()
    args = parse(family, "--pretrained_model_name_or_path", TINY_SD2, "--v2", "--v_parameterization", "--zero_terminal_snr")
    models = family.load_models(args)
    perturb(models.denoiser, 3)
    perturb(models.text_encoders[0], 4)
    frozen_as_trainer_keeps(models.vae)
    out = str(tmp_path / "sd2")
    os.makedirs(out)  # an older checkpoint folder of that name is replaced
    open(os.path.join(out, "stale.txt"), "w").close()
    trained = frozenset({"denoiser", "text_encoder_0"})
    assert family.save_checkpoint(args, models, out, "diffusers", None, METADATA, trained) == [out]
    assert not os.path.exists(os.path.join(out, "stale.txt")) and not leftovers(tmp_path)

    pipe = StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
    assert_same_state(pipe.unet.state_dict(), models.denoiser.state_dict(), "U-Net")
    same_outputs(unet_output(pipe.unet), unet_output(models.denoiser))
    assert_same_state(pipe.text_encoder.state_dict(), models.text_encoders[0].state_dict(), "text encoder")
    same_outputs(text_output(pipe.text_encoder), text_output(models.text_encoders[0]))
    assert_same_state(pipe.vae.state_dict(), build_tiny_sd(v2=True)["vae"].state_dict(), "VAE (the built-in's)")
    assert pipe.scheduler.config.prediction_type == "v_prediction" and pipe.scheduler.config.rescale_betas_zero_snr
    assert pipe.scheduler.config.timestep_spacing == "trailing"
    assert pipe.tokenizer("a cat").input_ids == models.tokenizers[0]("a cat").input_ids
    assert pipe.tokenizer.pad_token == "!"


# ---------------------------------------------------------------------------------------------------------------------
# SDXL: an fp16 diffusers folder with a --vae file -> an sgm single file (U-Net and text encoder 1 trained)
# ---------------------------------------------------------------------------------------------------------------------


def test_sdxl_folder_and_vae_file_to_single_file(tmp_path):
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline
    from transformers import CLIPTextModelWithProjection

    from library.family_sdxl import SdxlFamily
    from library.sd_models import vae_to_ldm_state_dict
    from library.tiny_models import build_tiny_sdxl

    parts = build_tiny_sdxl()
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        parts[name].to(torch.float16)
    folder = str(tmp_path / "sdxl-fp16")
    save_diffusers_folder(parts, folder)
    other_vae = build_tiny_sdxl(seed=5)["vae"]
    vae_file = str(tmp_path / "vae.safetensors")  # LDM names without first_stage_model., as sdxl_vae.safetensors
    save_file({k[len(VAE_PREFIX) :]: v.contiguous() for k, v in vae_to_ldm_state_dict(other_vae).items()}, vae_file)

    family = SdxlFamily()
    args = parse(family, "--pretrained_model_name_or_path", folder, "--vae", vae_file)
    models = family.load_models(args)
    perturb(models.denoiser, 6)
    perturb(models.text_encoders[0], 7)
    frozen_as_trainer_keeps(models.vae, models.text_encoders[1])
    out = str(tmp_path / "out" / "sdxl")
    (path,) = family.save_checkpoint(args, models, out, "safetensors", None, METADATA, frozenset({"denoiser", "text_encoder_0"}))

    pipe = StableDiffusionXLPipeline.from_single_file(path, config=folder, local_files_only=True, torch_dtype=torch.float32)
    assert_same_state(pipe.unet.state_dict(), models.denoiser.state_dict(), "U-Net")
    same_outputs(unet_output(pipe.unet), unet_output(models.denoiser))
    assert_same_state(pipe.text_encoder.state_dict(), models.text_encoders[0].state_dict(), "text encoder 1")
    same_outputs(text_output(pipe.text_encoder), text_output(models.text_encoders[0]))
    # text encoder 2 is the folder's float16 weights (upcast exactly by the loader), kept float16 in the file
    te2 = CLIPTextModelWithProjection.from_pretrained(folder, subfolder="text_encoder_2", dtype=torch.float16)
    assert_same_state(pipe.text_encoder_2.state_dict(), {k: v.float() for k, v in te2.state_dict().items()}, "TE2")
    saved = load_file(path)
    assert {v.dtype for v in under(saved, "conditioner.embedders.1.").values()} == {torch.float16}
    # the VAE: the --vae file's tensors, by key
    assert_same_state(under(saved, VAE_PREFIX), load_file(vae_file), "VAE")
    vae = AutoencoderKL.from_single_file(path, config=folder, subfolder="vae", local_files_only=True)
    assert_same_state(vae.state_dict(), other_vae.state_dict(), "VAE (diffusers' load)")
    assert file_metadata(path) == METADATA


# ---------------------------------------------------------------------------------------------------------------------
# FLUX.1: a BFL file with --ae / --clip_l / --t5xxl files -> the BFL transformer file, and a FluxPipeline folder
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    from library.family_flux import FluxFamily
    from library.flux_models import save_flux_transformer_bfl
    from library.sd_models import vae_to_ldm_state_dict
    from library.tiny_models import build_tiny_flux

    root = tmp_path_factory.mktemp("flux")
    tiny = build_tiny_flux()
    files = {name: str(root / f"{name}.safetensors") for name in ("flux1", "ae", "clip_l", "t5xxl")}
    save_flux_transformer_bfl(files["flux1"], tiny["transformer"], dtype=torch.bfloat16)
    save_file({k[len(VAE_PREFIX) :]: v.contiguous() for k, v in vae_to_ldm_state_dict(tiny["vae"]).items()}, files["ae"])
    save_file({"text_model." + k: v.contiguous() for k, v in tiny["text_encoder"].state_dict().items()}, files["clip_l"])
    t5 = {k: v.half().contiguous() for k, v in tiny["text_encoder_2"].state_dict().items()}
    t5.pop("encoder.embed_tokens.weight", None)  # t5xxl_fp16.safetensors carries shared.weight only
    save_file(t5, files["t5xxl"])

    family = FluxFamily()
    args = parse(
        family, "--pretrained_model_name_or_path", files["flux1"], "--ae", files["ae"], "--clip_l", files["clip_l"],
        "--t5xxl", files["t5xxl"],
    )  # fmt: skip
    models = family.load_models(args)
    perturb(models.denoiser, 8)
    frozen_as_trainer_keeps(models.vae, *models.text_encoders)
    return family, args, models, files


def transformer_output(transformer, seed: int = 0, flux: bool = True) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    c = transformer.config
    with torch.no_grad():
        if flux:
            return transformer(
                hidden_states=torch.randn(1, 16, c.in_channels, generator=g),
                encoder_hidden_states=torch.randn(1, 5, c.joint_attention_dim, generator=g),
                pooled_projections=torch.randn(1, c.pooled_projection_dim, generator=g),
                timestep=torch.tensor([0.4]),
                img_ids=torch.zeros(16, 3),
                txt_ids=torch.zeros(5, 3),
                guidance=torch.tensor([3.5]) if c.guidance_embeds else None,
            ).sample
        return transformer(
            hidden_states=torch.randn(2, c.in_channels, 8, 12, generator=g),
            encoder_hidden_states=torch.randn(2, 7, c.joint_attention_dim, generator=g),
            pooled_projections=torch.randn(2, c.pooled_projection_dim, generator=g),
            timestep=torch.tensor([120.0, 870.0]),
        ).sample


def test_flux_transformer_file(flux, tmp_path):
    """diffusers' FLUX single-file converter assumes the real width (3072), so the tiny file is read back by kiln's
    loader, whose BFL names test_flux_models checks against diffusers' converter at that width."""
    from library.flux_models import flux_transformer_to_bfl, load_flux_model

    family, args, models, files = flux
    out = str(tmp_path / "flux-000002")
    (path,) = family.save_checkpoint(args, models, out, "safetensors", None, METADATA, frozenset({"denoiser"}))
    saved = load_file(path)
    memory = models.denoiser
    assert_same_state(saved, flux_transformer_to_bfl(memory.state_dict(), memory.config), "BFL keys, no prefix")
    assert "double_blocks.0.img_attn.qkv.weight" in saved and "guidance_in.in_layer.weight" in saved
    parts = {k: files[k] for k in ("ae", "clip_l", "t5xxl")}
    loaded = load_flux_model(path, dtype=torch.float32, **parts).transformer
    assert_same_state(loaded.state_dict(), memory.state_dict(), "transformer")
    same_outputs(transformer_output(loaded), transformer_output(memory))
    assert file_metadata(path) == METADATA

    family.save_checkpoint(args, models, out, "safetensors", torch.bfloat16, METADATA, frozenset({"denoiser"}))
    assert {v.dtype for v in load_file(path).values()} == {torch.bfloat16}
    with pytest.raises(ValueError, match="never trains"):
        family.save_checkpoint(args, models, out, "safetensors", None, None, frozenset({"denoiser", "text_encoder_1"}))


def test_flux_transformer_file_under_block_swap(flux, tmp_path):
    """--blocks_to_swap: the swapped blocks' weights are views into shared device slots (holding the block that ran
    last); the saver reads each block's own weights (BlockSwapper.own_weights)."""
    from library.custom_offloading_utils import BlockSwapper
    from library.family import TrainModels
    from library.flux_models import flux_transformer_to_bfl

    family, args, models, files = flux
    memory = models.denoiser
    out = str(tmp_path / "flux")
    if not hasattr(BlockSwapper, "own_weights"):
        pytest.skip("BlockSwapper.own_weights (reading swapped blocks' own weights) is not there yet")
    swapped = type(family)()
    denoiser = copy.deepcopy(memory).requires_grad_(False)
    blocks = [b for name in swapped.swap_block_lists for b in getattr(denoiser, name)]
    swapped.swapper = BlockSwapper(blocks, 2, "cpu", num_slots=1)  # the last two blocks share one slot
    with torch.no_grad():
        transformer_output(denoiser)  # the slots hold the last blocks that ran
    swapped_models = TrainModels(models.text_encoders, models.tokenizers, models.vae, denoiser)
    (path,) = swapped.save_checkpoint(args, swapped_models, out, "safetensors", None, None, frozenset({"denoiser"}))
    assert_same_state(load_file(path), flux_transformer_to_bfl(memory.state_dict(), memory.config), "swapped")


def test_flux_diffusers_folder(flux, tmp_path):
    import json

    from diffusers import FluxPipeline

    from library.sd_models import vae_to_ldm_state_dict

    family, args, models, files = flux
    out = str(tmp_path / "flux")
    family.save_checkpoint(args, models, out, "diffusers", None, None, frozenset({"denoiser"}))
    pipe = FluxPipeline.from_pretrained(out, local_files_only=True, dtype=torch.float32)
    assert_same_state(pipe.transformer.state_dict(), models.denoiser.state_dict(), "transformer")
    same_outputs(transformer_output(pipe.transformer), transformer_output(models.denoiser))
    assert pipe.scheduler.config.use_dynamic_shifting  # FLUX.1 dev's scheduler
    assert pipe.tokenizer_2("a cat").input_ids == models.tokenizers[1]("a cat").input_ids

    # the untouched parts are the files' own tensors and dtypes (T5 float16, its embedding under both names)
    t5 = load_file(files["t5xxl"])
    written_t5 = load_file(os.path.join(out, "text_encoder_2", "model.safetensors"))
    assert_same_state(written_t5, {**t5, "encoder.embed_tokens.weight": t5["shared.weight"]}, "T5")
    with open(os.path.join(out, "text_encoder_2", "config.json")) as f:
        assert json.load(f)["dtype"] == "float16"
    clip = {
        "text_model." + k.removeprefix("text_model."): v
        for k, v in load_file(os.path.join(out, "text_encoder", "model.safetensors")).items()
    }
    assert_same_state(clip, load_file(files["clip_l"]), "CLIP-L")
    assert_same_state(under(vae_to_ldm_state_dict(pipe.vae), VAE_PREFIX), load_file(files["ae"]), "autoencoder")


# ---------------------------------------------------------------------------------------------------------------------
# SD3: a SAI file bundling every part -> main file + a side file for the trained CLIP-L; a diffusers folder -> a folder
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    """SD3.5 Medium as users have it: a SAI file bundling the MMDiT, the VAE and the CLIPs (float16) with a separate
    t5xxl_fp16.safetensors; loaded, its MMDiT and CLIP-L trained."""
    from library.family_sd3 import Sd3Family
    from library.sd3_models import save_sd3_single_file
    from library.tiny_models import build_tiny_sd3

    root = tmp_path_factory.mktemp("sd3")
    c = build_tiny_sd3("sd3.5-medium")
    files = {"source": str(root / "sd3.5m.safetensors"), "t5xxl": str(root / "t5xxl_fp16.safetensors")}
    save_sd3_single_file(files["source"], c["transformer"], c["vae"], c["text_encoder"], c["text_encoder_2"], dtype=torch.float16)
    t5 = {k: v.half().contiguous() for k, v in c["text_encoder_3"].state_dict().items()}
    t5.pop("encoder.embed_tokens.weight", None)
    save_file(t5, files["t5xxl"])
    family = Sd3Family()
    args = parse(family, "--pretrained_model_name_or_path", files["source"], "--t5xxl", files["t5xxl"])
    models = family.load_models(args)
    perturb(models.denoiser, 9)
    perturb(models.text_encoders[0], 10)
    frozen_as_trainer_keeps(models.vae, *models.text_encoders[1:])
    return family, args, models, files


def sd3_transformer_output(transformer) -> torch.Tensor:
    return transformer_output(transformer, flux=False)


def test_sd3_single_file_with_side_file(sd3, tmp_path):
    from diffusers import SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection

    family, args, models, files = sd3
    out = str(tmp_path / "out" / "sd3")
    written = family.save_checkpoint(args, models, out, "safetensors", None, METADATA, frozenset({"denoiser", "text_encoder_0"}))
    assert written == [out + ".safetensors", out + "_clip_l.safetensors"]
    assert sorted(os.listdir(tmp_path / "out")) == ["sd3.safetensors", "sd3_clip_l.safetensors"]

    main, src = load_file(written[0]), load_file(files["source"])
    assert {k.split(".")[0] for k in main} == {"model", "first_stage_model"}
    assert_same_state(under(main, VAE_PREFIX), under(src, VAE_PREFIX), "VAE (the file's float16)")
    config = str(tmp_path / "config")
    models.denoiser.save_config(os.path.join(config, "transformer"))
    oracle = SD3Transformer2DModel.from_single_file(
        written[0], config=config, subfolder="transformer", local_files_only=True, torch_dtype=torch.float32
    )
    assert_same_state(oracle.state_dict(), models.denoiser.state_dict(), "MMDiT")
    same_outputs(sd3_transformer_output(oracle), sd3_transformer_output(models.denoiser))
    assert file_metadata(written[0]) == METADATA

    # the side file: transformers names, read by transformers into the trained CLIP-L
    clip_l = CLIPTextModelWithProjection(models.text_encoders[0].config)
    clip_l.load_state_dict(load_file(written[1]), strict=True)
    assert_same_state(clip_l.state_dict(), models.text_encoders[0].state_dict(), "CLIP-L side file")
    same_outputs(text_output(clip_l), text_output(models.text_encoders[0]))


def test_sd3_file_to_diffusers_folder(sd3, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    from library.sd3_models import CLIP_G_PREFIX

    family, args, models, files = sd3
    out = str(tmp_path / "sd3")
    family.save_checkpoint(args, models, out, "diffusers", None, None, frozenset({"denoiser", "text_encoder_0"}))
    pipe = StableDiffusion3Pipeline.from_pretrained(out, local_files_only=True, dtype=torch.float32)
    assert_same_state(pipe.transformer.state_dict(), models.denoiser.state_dict(), "MMDiT")
    same_outputs(sd3_transformer_output(pipe.transformer), sd3_transformer_output(models.denoiser))
    assert_same_state(pipe.text_encoder.state_dict(), models.text_encoders[0].state_dict(), "CLIP-L (trained)")
    same_outputs(text_output(pipe.text_encoder), text_output(models.text_encoders[0]))
    # CLIP-G from the bundle, T5 from its file: their own float16 tensors
    clip_g = load_file(os.path.join(out, "text_encoder_2", "model.safetensors"))
    assert_same_state(clip_g, under(load_file(files["source"]), CLIP_G_PREFIX), "CLIP-G")
    t5 = load_file(files["t5xxl"])
    assert_same_state(
        load_file(os.path.join(out, "text_encoder_3", "model.safetensors")),
        {**t5, "encoder.embed_tokens.weight": t5["shared.weight"]},
        "T5",
    )
    assert pipe.tokenizer_2.pad_token == "!"


def test_sd3_folder_to_diffusers_folder(tmp_path):
    import json

    from diffusers import StableDiffusion3Pipeline
    from transformers import T5EncoderModel

    from library.family_sd3 import Sd3Family
    from library.model_checkpoint import module_from_folder
    from library.tiny_models import build_tiny_sd3

    parts = build_tiny_sd3("sd3-medium")
    parts["text_encoder_3"].to(torch.float16)
    folder = str(tmp_path / "sd3-folder")
    save_diffusers_folder(parts, folder)
    family = Sd3Family()
    args = parse(family, "--pretrained_model_name_or_path", folder)
    models = family.load_models(args)
    perturb(models.denoiser, 11)
    frozen_as_trainer_keeps(models.vae, *models.text_encoders)
    out = str(tmp_path / "sd3-out")
    family.save_checkpoint(args, models, out, "diffusers", None, None, frozenset({"denoiser"}))
    pipe = StableDiffusion3Pipeline.from_pretrained(out, local_files_only=True, dtype=torch.float32)
    assert_same_state(pipe.transformer.state_dict(), models.denoiser.state_dict(), "MMDiT")
    same_outputs(sd3_transformer_output(pipe.transformer), sd3_transformer_output(models.denoiser))
    components = {"vae": "diffusion_pytorch_model.safetensors", "text_encoder": "model.safetensors",
                  "text_encoder_2": "model.safetensors", "text_encoder_3": "model.safetensors"}  # fmt: skip
    for sub, weights in components.items():
        assert_same_state(load_file(os.path.join(out, sub, weights)), load_file(os.path.join(folder, sub, weights)), sub)
    # a folder's part as a model with its own tensors (the float16 T5, its embedding tied again)
    t5 = module_from_folder(os.path.join(folder, "text_encoder_3"), T5EncoderModel)
    assert_same_state(t5.state_dict(), parts["text_encoder_3"].state_dict(), "T5 from its folder")

    # --save_precision bf16: every tensor and the transformers configs say bf16; the pipeline still loads
    family.save_checkpoint(args, models, out, "diffusers", torch.bfloat16, None, frozenset({"denoiser"}))
    for sub, weights in {**components, "transformer": "diffusion_pytorch_model.safetensors"}.items():
        assert {v.dtype for v in load_file(os.path.join(out, sub, weights)).values()} == {torch.bfloat16}, sub
    with open(os.path.join(out, "text_encoder_3", "config.json")) as f:
        assert json.load(f)["dtype"] == "bfloat16"
    pipe = StableDiffusion3Pipeline.from_pretrained(out, local_files_only=True, dtype=torch.bfloat16)
    assert_same_state(pipe.transformer.state_dict(), {k: v.bfloat16() for k, v in models.denoiser.state_dict().items()}, "MMDiT")
    assert not leftovers(tmp_path)
