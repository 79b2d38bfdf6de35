"""SDXL as a trainer family: two text encoders (outputs cacheable), size/crop conditioning, sgm LoRA names."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from library.family import DdpmFamily, TrainModels, add_fp8_arguments, add_text_cache_arguments, check_text_cache_args
from library.family_sd import check_sd_prompts
from library.sample_prompts import SD_UNSUPPORTED_OPTIONS, SamplePrompt
from library.sampling import sample_with_pipeline
from library.strategy_sdxl import TE_OUTPUT_KEYS, SdxlTextEncodingStrategy, SdxlTokenizeStrategy, size_conditioning
from library.transfer import to_device

logger = logging.getLogger(__name__)


class SdxlFamily(DdpmFamily):
    script_name = "sdxl_train_network.py"
    unused_shared_options = ("v2",)
    arch = "sdxl"
    vae_scale = 0.13025
    bucket_reso_multiple = 32
    default_resolution = 1024
    sample_unsupported = SD_UNSUPPORTED_OPTIONS
    caches_text_encoder_outputs = True
    text_output_keys = TE_OUTPUT_KEYS

    def add_arguments(self, parser) -> None:
        g = parser.add_argument_group("SDXL")
        add_text_cache_arguments(g)
        add_fp8_arguments(
            parser.add_argument_group("SDXL memory"),
            "store the frozen Linear weights of the U-Net and both text encoders",
            "store only the U-Net's frozen Linear weights in float8",
        )

    def check_args(self, args) -> None:
        super().check_args(args)
        check_text_cache_args(args)
        if args.v2:
            raise ValueError("--v2 is for SD 2.x; SDXL needs no model-version flag")
        if args.clip_skip:
            logger.warning("--clip_skip has no effect on SDXL: it uses the text encoders' penultimate layers by design")

    def load_models(self, args) -> TrainModels:
        from library.sdxl_models import load_sdxl_model

        m = load_sdxl_model(args.pretrained_model_name_or_path, vae=args.vae, tokenizer_cache_dir=args.tokenizer_cache_dir)
        models = TrainModels([m.text_encoder, m.text_encoder_2], [m.tokenizer, m.tokenizer_2], m.vae, m.unet)
        return self.prepare_base_models(args, models)

    def strategies(self, args, models: TrainModels):
        if not hasattr(self, "_tokenize"):
            self._tokenize = SdxlTokenizeStrategy(*models.tokenizers, args.max_token_length)
            self._encode = SdxlTextEncodingStrategy()
        return self._tokenize, self._encode

    def text_cache_identity(self, args, models: TrainModels) -> dict:
        return {**super().text_cache_identity(args, models), "weighted_captions": bool(args.weighted_captions)}

    def call_denoiser(self, args, models, noisy, timesteps, conds, batch):
        hidden1, hidden2, pool2 = conds
        context = torch.cat([hidden1, hidden2], dim=2).to(noisy.dtype)
        time_ids = to_device(
            size_conditioning(batch["original_sizes_hw"], batch["crop_top_lefts"], batch["target_sizes_hw"]), noisy.device
        )
        added = {"text_embeds": pool2.to(noisy.dtype), "time_ids": time_ids.to(noisy.dtype)}
        return models.denoiser(noisy, timesteps, context, added_cond_kwargs=added).sample

    def lora_options(self, models):
        from library.sdxl_models import sdxl_unet_lora_name_map

        return {"unet_name_map": sdxl_unet_lora_name_map(models.denoiser), "te_prefixes": ["lora_te1", "lora_te2"]}

    def metadata(self, args) -> dict[str, str]:
        return {
            "ss_v2": "False",
            "ss_base_model_version": "sdxl_base_v1-0" + ("_v" if args.v_parameterization else ""),
            "modelspec.architecture": "stable-diffusion-xl-v1-base",
            "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
            "modelspec.prediction_type": "v" if args.v_parameterization else "epsilon",
        }

    def save_checkpoint(self, args, models, path, form, dtype, metadata, trained) -> list[str]:
        """An original (sgm) single file or a StableDiffusionXLPipeline folder (sdxl_models.sdxl_checkpoint_spec)."""
        from library.model_checkpoint import save_model_checkpoint
        from library.sdxl_models import sdxl_checkpoint_spec

        spec = sdxl_checkpoint_spec(
            args.pretrained_model_name_or_path,
            args.vae,
            models.text_encoders,
            models.tokenizers,
            models.vae,
            models.denoiser,
            v_prediction=args.v_parameterization,
            zero_terminal_snr=args.zero_terminal_snr,
        )
        return save_model_checkpoint(args, spec, path, form, dtype, metadata, trained)

    def sample_images(self, args, models: TrainModels, prompts, output_dir: str, output_name: str, step, epoch, device, dtype):
        scheduler_config = self.sampling_scheduler_config(args)

        def encode_prompts(texts: list[str]) -> dict:
            with torch.no_grad():
                hidden1, hidden2, pool2 = self.encode_text(args, models, texts)
            return {"prompt_embeds": torch.cat([hidden1, hidden2], dim=2), "pooled": pool2}

        return sample_sdxl_images(
            models,
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


def sample_sdxl_images(
    models,
    scheduler_config: Mapping[str, Any],
    prompts: Sequence[SamplePrompt],
    encode_prompts: Callable[[list[str]], dict],
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
    """SDXL preview images; like sample_sd_images. `models` is the trainer's TrainModels (two text encoders);
    `encode_prompts([prompt, negative])` returns {"prompt_embeds": (2, tokens, width), "pooled": (2, width2)}."""
    from diffusers import StableDiffusionXLPipeline

    te1, te2 = models.text_encoders
    tok1, tok2 = models.tokenizers

    def make_pipe(scheduler):
        return StableDiffusionXLPipeline(
            vae=models.vae,
            text_encoder=te1,
            text_encoder_2=te2,
            tokenizer=tok1,
            tokenizer_2=tok2,
            unet=models.denoiser,
            scheduler=scheduler,
            force_zeros_for_empty_prompt=False,
        )

    def embed_kwargs(prompt: SamplePrompt) -> dict:
        out = encode_prompts([prompt.prompt, prompt.negative_prompt])
        embeds, pooled = out["prompt_embeds"].to(device), out["pooled"].to(device)
        return {
            "prompt_embeds": embeds[:1],
            "negative_prompt_embeds": embeds[1:],
            "pooled_prompt_embeds": pooled[:1],
            "negative_pooled_prompt_embeds": pooled[1:],
        }

    return sample_with_pipeline(
        make_pipe,
        embed_kwargs,
        (models.denoiser, models.vae, te1, te2),
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
