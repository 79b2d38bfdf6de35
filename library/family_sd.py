"""SD 1.x/2.x as a trainer family: loading, CLIP conditioning, the U-Net call, sampling, metadata."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from library.family import DdpmFamily, TrainModels, add_fp8_arguments
from library.sample_prompts import SAMPLER_NAMES, SD_UNSUPPORTED_OPTIONS, SamplePrompt
from library.sampling import SAMPLERS, sample_with_pipeline
from library.strategy_sd import SdTextEncodingStrategy, SdTokenizeStrategy


class SdFamily(DdpmFamily):
    script_name = "train_network.py"
    arch = "sd"
    vae_scale = 0.18215
    bucket_reso_multiple = 64
    default_resolution = 512
    sample_unsupported = SD_UNSUPPORTED_OPTIONS

    def add_arguments(self, parser) -> None:
        add_fp8_arguments(
            parser.add_argument_group("SD 1.x/2.x memory"),
            "store the frozen Linear weights of the U-Net and the text encoder",
            "store only the U-Net's frozen Linear weights in float8",
        )

    def load_models(self, args) -> TrainModels:
        from library.sd_models import load_sd_model

        model = load_sd_model(
            args.pretrained_model_name_or_path, v2=args.v2, vae=args.vae, tokenizer_cache_dir=args.tokenizer_cache_dir
        )
        self.v2 = model.v2
        return self.prepare_base_models(args, TrainModels([model.text_encoder], [model.tokenizer], model.vae, model.unet))

    def strategies(self, args, models: TrainModels):
        if not hasattr(self, "_tokenize"):
            self._tokenize = SdTokenizeStrategy(models.tokenizers[0], args.max_token_length)
            self._encode = SdTextEncodingStrategy(args.clip_skip)
        return self._tokenize, self._encode

    def call_denoiser(self, args, models, noisy, timesteps, conds, batch):
        return models.denoiser(noisy, timesteps, conds[0].to(noisy.dtype)).sample

    def lora_options(self, models):
        return {}

    def metadata(self, args) -> dict[str, str]:
        v2 = getattr(self, "v2", args.v2)
        version = ("sd_v2" if v2 else "sd_v1") + ("_v" if args.v_parameterization else "")
        if not v2:
            arch = "stable-diffusion-v1"
        else:
            arch = "stable-diffusion-v2-768-v" if args.v_parameterization else "stable-diffusion-v2-512"
        return {
            "ss_v2": str(bool(v2)),
            "ss_base_model_version": version,
            "modelspec.architecture": arch,
            "modelspec.implementation": "diffusers",
            "modelspec.prediction_type": "v" if args.v_parameterization else "epsilon",
        }

    def save_checkpoint(self, args, models, path, form, dtype, metadata, trained) -> list[str]:
        """An original (LDM) single file or a StableDiffusionPipeline folder (sd_models.sd_checkpoint_spec)."""
        from library.model_checkpoint import save_model_checkpoint
        from library.sd_models import sd_checkpoint_spec

        spec = sd_checkpoint_spec(
            args.pretrained_model_name_or_path,
            args.vae,
            getattr(self, "v2", args.v2),
            models.text_encoders[0],
            models.tokenizers[0],
            models.vae,
            models.denoiser,
            v_prediction=args.v_parameterization,
            zero_terminal_snr=args.zero_terminal_snr,
        )
        return save_model_checkpoint(args, spec, path, form, dtype, metadata, trained)

    def sample_images(self, args, models: TrainModels, prompts, output_dir: str, output_name: str, step, epoch, device, dtype):
        scheduler_config = self.sampling_scheduler_config(args)

        def encode_prompts(texts: list[str]) -> torch.Tensor:
            with torch.no_grad():
                return self.encode_text(args, models, texts)[0]

        return sample_sd_images(
            models.denoiser,
            models.vae,
            models.text_encoders[0],
            models.tokenizers[0],
            scheduler_config,
            prompts,
            encode_prompts,
            output_dir,
            output_name,
            step=step,
            epoch=epoch,
            device=device,
            dtype=dtype,
            default_sampler=args.sample_sampler,
            v_prediction=args.v_parameterization,
        )


# ---------------------------------------------------------------------------------------------------------------------
# Preview sampling
# ---------------------------------------------------------------------------------------------------------------------


def check_sd_prompts(prompts: Sequence[SamplePrompt], default_sampler: str) -> None:
    """Raise ValueError before the first image for a prompt SD / SDXL sampling cannot honour: an unknown sampler, a FLUX
    or ControlNet option, a size that is not a multiple of 8."""
    for p in prompts:
        name = p.sampler or default_sampler
        if str(name).strip().lower() not in SAMPLERS:  # fail before the first image, not in the middle
            raise ValueError(f"unknown sampler {name!r}; valid samplers: {', '.join(SAMPLER_NAMES)}")
        for name, option in (("guidance", "--g"), ("flow_shift", "--fs"), ("controlnet_image", "--cn")):
            if getattr(p, name) is not None:
                where = f" ({p.source})" if p.source else ""
                raise ValueError(
                    f"sample prompt {p.index}{where} sets {option}, which SD sampling cannot honour; load the prompts "
                    "with unsupported=SD_UNSUPPORTED_OPTIONS so such files are rejected at start-up"
                )
        if p.width % 8 or p.height % 8:
            raise ValueError(f"sample prompt {p.index}: width and height must be multiples of 8, got {p.width}x{p.height}")


def sample_sd_images(
    unet: torch.nn.Module,
    vae: torch.nn.Module,
    text_encoder: torch.nn.Module,
    tokenizer,
    scheduler_config: Mapping[str, Any],
    prompts: Sequence[SamplePrompt],
    encode_prompts: Callable[[list[str]], torch.Tensor],
    output_dir: str,
    output_name: str | None,
    step: int | None = None,
    epoch: int | None = None,
    *,
    device: torch.device | str,
    dtype: torch.dtype,
    default_sampler: str = "ddim",
    v_prediction: bool = False,
) -> list[str]:
    """Generate one preview image per prompt with SD1/2 models; return the paths of the PNGs written.

    `unet`, `vae`, `text_encoder` are the unwrapped models (not DDP wrappers). `encode_prompts(texts)` returns the
    text-encoder hidden states the U-Net is trained on, one row per text, all rows the same length; it is called with
    [prompt, negative prompt]. `scheduler_config` is the model's noise-schedule config (e.g. `scheduler.config`);
    each prompt gets a fresh scheduler for its sampler (`--ss`, else `default_sampler`).

    Images are denoised under autocast in `dtype` (unless float32) on `device`; the initial noise comes from a CPU
    torch.Generator seeded with the prompt's seed (a fresh random one when None), so a seed gives the same image on any
    device. The seed used is in the file name (see `sample_image_path`). Files are written atomically.

    Models are moved to `device` for sampling and back afterwards; their train/eval modes and every global random
    generator are restored, so sampling does not change the training run's random numbers.
    """
    from diffusers import StableDiffusionPipeline

    def make_pipe(scheduler):
        return StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )

    def embed_kwargs(prompt: SamplePrompt) -> dict:
        embeds = encode_prompts([prompt.prompt, prompt.negative_prompt])
        if not isinstance(embeds, torch.Tensor) or embeds.dim() != 3 or embeds.shape[0] != 2:
            shape = tuple(embeds.shape) if isinstance(embeds, torch.Tensor) else type(embeds).__name__
            raise ValueError(f"encode_prompts must return a (2, tokens, width) tensor for [prompt, negative], got {shape}")
        embeds = embeds.to(device)
        return {"prompt_embeds": embeds[:1], "negative_prompt_embeds": embeds[1:]}

    return sample_with_pipeline(
        make_pipe,
        embed_kwargs,
        (unet, vae, text_encoder),
        scheduler_config,
        prompts,
        output_dir,
        output_name,
        step,
        epoch,
        device,
        dtype,
        default_sampler,
        v_prediction,
        check_prompts=check_sd_prompts,
    )
