"""SD 1.x/2.x as a trainer family: loading, CLIP conditioning, the U-Net call, sampling, metadata."""

from __future__ import annotations

import torch

from library.family import DdpmFamily, TrainModels, add_fp8_arguments
from library.sample_prompts import SD_UNSUPPORTED_OPTIONS
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
            "modelspec.architecture": arch + "/lora",
            "modelspec.implementation": "diffusers",
            "modelspec.prediction_type": "v" if args.v_parameterization else "epsilon",
        }

    def sample_images(self, args, models: TrainModels, prompts, output_dir: str, output_name: str, step, epoch, device, dtype):
        from library.sampling import sample_sd_images

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
