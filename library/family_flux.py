"""FLUX.1 as a trainer family: flow matching on packed latents, CLIP-L + T5 conditioning (cacheable), BFL LoRA names,
block swap and fp8 base weights for the transformer."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from library import flow_matching as fm
from library import flux_train_utils as flow
from library import sd_train_utils
from library.family import (
    ModelFamily,
    TrainModels,
    add_block_swap_argument,
    add_fp8_arguments,
    add_text_cache_arguments,
    check_base_model_args,
    check_block_swap_args,
    check_text_cache_args,
)
from library.sample_prompts import FLUX_DEFAULTS, SamplePrompt
from library.sampling import sample_with_pipeline
from library.strategy_flux import TE_OUTPUT_KEYS, FluxTextEncodingStrategy, FluxTokenizeStrategy
from library.transfer import to_device

logger = logging.getLogger(__name__)

AE_SCALE, AE_SHIFT = 0.3611, 0.1159


class FluxFamily(ModelFamily):
    script_name = "flux_train_network.py"
    unused_shared_options = ("v2", "clip_skip", "weighted_captions", "max_token_length")
    arch = "flux"
    bucket_reso_multiple = 16  # 8x autoencoder, then 2x2 packing
    default_resolution = 1024
    sample_defaults = FLUX_DEFAULTS
    sample_unsupported = {
        "sampler": "FLUX previews use flow-matching Euler; --ss / sample_sampler has no meaning for them",
        "flow_shift": "--fs is not supported yet for FLUX previews (the training --discrete_flow_shift is used)",
        "controlnet_image": "a ControlNet image (--cn / controlnet_image) is used only when training a ControlNet",
    }
    caches_text_encoder_outputs = True
    text_output_keys = TE_OUTPUT_KEYS
    swap_block_lists = ("transformer_blocks", "single_transformer_blocks")

    def add_arguments(self, parser) -> None:
        g = parser.add_argument_group("FLUX.1")
        g.add_argument("--clip_l", type=str, default=None, help="CLIP-L text encoder file (with a BFL single-file transformer)")
        g.add_argument("--t5xxl", type=str, default=None, help="T5-XXL text encoder file (fp16, bf16 or fp8)")
        g.add_argument("--ae", type=str, default=None, help="autoencoder file (ae.safetensors)")
        g.add_argument(
            "--t5xxl_max_token_length", type=int, default=None, help="T5 tokens (default 256 for schnell, 512 for dev)"
        )
        g.add_argument(
            "--guidance_scale", type=float, default=3.5, help="embedded guidance during training (1.0 is usual for dev LoRAs)"
        )
        g.add_argument(
            "--timestep_sampling",
            type=str,
            default="sigma",
            choices=["sigma", "uniform", "sigmoid", "shift", "flux_shift"],
            help="how noise levels are drawn (flux_shift recommended)",
        )
        g.add_argument("--sigmoid_scale", type=float, default=1.0, help="scale of the sigmoid/shift/flux_shift samplers")
        g.add_argument(
            "--model_prediction_type",
            type=str,
            default="sigma_scaled",
            choices=["raw", "additive", "sigma_scaled"],
            help="how the model output is read (raw recommended)",
        )
        g.add_argument("--discrete_flow_shift", type=float, default=3.0, help="shift of the flow-matching schedule")
        g.add_argument(
            "--weighting_scheme",
            type=str,
            default="uniform",
            choices=["sigma_sqrt", "logit_normal", "mode", "cosmap", "none", "uniform"],
            help="loss weighting / density",
        )
        g.add_argument("--logit_mean", type=float, default=0.0, help="logit_normal mean")
        g.add_argument("--logit_std", type=float, default=1.0, help="logit_normal standard deviation")
        g.add_argument("--mode_scale", type=float, default=1.29, help="mode weighting scale")
        g.add_argument(
            "--apply_t5_attn_mask",
            action="store_true",
            help="T5 attends only to real tokens and the transformer's attention ignores T5 padding",
        )
        add_text_cache_arguments(g)
        g = parser.add_argument_group("FLUX.1 memory")
        add_fp8_arguments(
            g,
            "store the frozen Linear weights of the transformer and T5 (CLIP-L stays; T5's feed-forward outputs stay "
            "float32 as T5 requires)",
            "store only the transformer's frozen Linear weights in float8",
        )
        add_block_swap_argument(g, "FLUX.1 has 57 blocks")

    def check_args(self, args) -> None:
        fm.refuse_ddpm_only_options(args)
        if args.v2 or args.clip_skip:
            raise ValueError("--v2 and --clip_skip are for SD models, not FLUX")
        check_text_cache_args(args)
        if args.weighted_captions:
            raise ValueError("--weighted_captions is for SD 1.x/2.x and SDXL")
        check_block_swap_args(args)
        check_base_model_args(args)

    def load_models(self, args) -> TrainModels:
        from library.flux_models import load_flux_model

        m = load_flux_model(
            args.pretrained_model_name_or_path,
            clip_l=args.clip_l,
            t5xxl=args.t5xxl,
            ae=args.ae,
            tokenizer_cache_dir=args.tokenizer_cache_dir,
            dtype=torch.float32,
        )
        self.is_schnell = m.is_schnell
        if args.t5xxl_max_token_length is None:
            args.t5xxl_max_token_length = 256 if m.is_schnell else 512
        models = TrainModels([m.text_encoder, m.text_encoder_2], [m.tokenizer, m.tokenizer_2], m.vae, m.transformer)
        return self.prepare_base_models(args, models)

    def fp8_text_encoders(self, models: TrainModels) -> list[torch.nn.Module]:
        return [models.text_encoders[1]]  # T5 only: CLIP-L is small and stays in the compute dtype

    def merge_lora(self, models, state_dict, multiplier):
        from networks.lora_flux import merge_into_transformer

        return merge_into_transformer(state_dict, multiplier, models.denoiser, models.text_encoders)

    def strategies(self, args, models: TrainModels):
        if not hasattr(self, "_tokenize"):
            self._tokenize = FluxTokenizeStrategy(*models.tokenizers, args.t5xxl_max_token_length)
            self._encode = FluxTextEncodingStrategy(args.apply_t5_attn_mask)
        return self._tokenize, self._encode

    def scale_latents(self, latents):
        return (latents - AE_SHIFT) * AE_SCALE

    def text_cache_identity(self, args, models: TrainModels) -> dict:
        return {**super().text_cache_identity(args, models), "apply_t5_attn_mask": bool(args.apply_t5_attn_mask)}

    def validation_timesteps(self, args) -> list[int]:
        return sd_train_utils.validation_timesteps(0, 1000)

    def sample_losses(self, args, models, batch, latents, conds, generators, timesteps=None):
        device, dtype = latents.device, latents.dtype
        x0 = latents.detach().float()
        b, c, h, w = x0.shape
        noise = fm.sample_noise(x0, generators, device)
        if timesteps is None:
            sigmas = torch.cat(
                [
                    flow.sample_sigmas(
                        1,
                        args.timestep_sampling,
                        g,
                        sigmoid_scale=args.sigmoid_scale,
                        discrete_flow_shift=args.discrete_flow_shift,
                        image_seq_len=h * w // 4,
                        weighting_scheme=args.weighting_scheme,
                        logit_mean=args.logit_mean,
                        logit_std=args.logit_std,
                        mode_scale=args.mode_scale,
                    )
                    for g in generators
                ]
            )
        else:
            sigmas = timesteps.float() / 1000.0
        host_sigmas, sigmas = sigmas, to_device(sigmas, device)
        noisy = fm.noisy_model_inputs(args, x0, noise, sigmas, generators)
        l_pooled, t5_out, t5_mask = conds
        transformer = models.denoiser
        guidance = (
            flow.guidance_vector(b, args.guidance_scale, device=device, dtype=dtype)
            if transformer.config.guidance_embeds
            else None
        )
        pred = transformer(
            hidden_states=flow.pack_latents(noisy.to(dtype)),
            encoder_hidden_states=to_device(t5_out, device, dtype),
            pooled_projections=to_device(l_pooled, device, dtype),
            timestep=sigmas.to(dtype),
            img_ids=flow.image_position_ids(h, w, device=device),
            txt_ids=flow.text_position_ids(t5_out.shape[1], device=device),
            guidance=guidance,
            joint_attention_kwargs=flow.joint_attention_mask(t5_mask, h * w // 4) if args.apply_t5_attn_mask else None,
            return_dict=False,
        )[0]
        pred, weighting = flow.apply_model_prediction_type(
            args.model_prediction_type, flow.unpack_latents(pred, h, w).float(), noisy, sigmas, args.weighting_scheme
        )
        c_huber = None
        if args.loss_type in ("huber", "smooth_l1"):
            c_huber = fm.huber_c(host_sigmas, args.huber_schedule, args.huber_c, args.huber_scale)
        loss = sd_train_utils.conditional_loss(pred, fm.flow_matching_target(x0, noise), args.loss_type, c_huber)
        if weighting is not None:
            loss = loss * weighting
        if args.masked_loss and batch.get("alpha_masks") is not None:
            loss = sd_train_utils.masked_loss(loss, batch["alpha_masks"])
        return loss.mean(dim=[1, 2, 3])

    def lora_options(self, models):
        return {}

    def metadata(self, args) -> dict[str, str]:
        schnell = getattr(self, "is_schnell", False)
        md = {
            "ss_v2": "False",
            "ss_base_model_version": "flux1",
            "modelspec.architecture": "flux-1-schnell" if schnell else "flux-1-dev",
            "modelspec.implementation": "https://github.com/black-forest-labs/flux",
            "ss_model_type": "flux",
            "ss_apply_t5_attn_mask": str(args.apply_t5_attn_mask),
        }
        for key in (
            "weighting_scheme",
            "logit_mean",
            "logit_std",
            "mode_scale",
            "guidance_scale",
            "timestep_sampling",
            "sigmoid_scale",
            "model_prediction_type",
            "discrete_flow_shift",
        ):
            md[f"ss_{key}"] = str(getattr(args, key))
        return md

    def save_checkpoint(self, args, models, path, form, dtype, metadata, trained) -> list[str]:
        """The bare BFL transformer file or a FluxPipeline folder (flux_models.flux_checkpoint_spec); the text encoders
        are never trained."""
        from library.flux_models import flux_checkpoint_spec
        from library.model_checkpoint import save_model_checkpoint

        spec = flux_checkpoint_spec(
            args.pretrained_model_name_or_path,
            args.ae,
            args.clip_l,
            args.t5xxl,
            models.text_encoders,
            models.tokenizers,
            models.vae,
            models.denoiser,
            schnell=not models.denoiser.config.guidance_embeds,
        )
        return save_model_checkpoint(args, spec, path, form, dtype, metadata, trained, getattr(self, "swapper", None))

    def sample_images(self, args, models: TrainModels, prompts, output_dir: str, output_name: str, step, epoch, device, dtype):
        def encode_prompts(texts: list[str]) -> dict:
            with torch.no_grad():
                l_pooled, t5_out, t5_mask = self.encode_text(args, models, texts)
            out = {"prompt_embeds": t5_out, "pooled": l_pooled}
            if args.apply_t5_attn_mask:  # one mask for both CFG passes: the tokens real in the prompt or the negative
                out["mask"] = t5_mask.amax(dim=0, keepdim=True)
            return out

        with self.sampling_block_swap():
            return sample_flux_images(
                models,
                fm.make_noise_scheduler(args.discrete_flow_shift).config,
                prompts,
                encode_prompts,
                output_dir,
                output_name,
                step=step,
                epoch=epoch,
                device=device,
                dtype=dtype,
            )


# ---------------------------------------------------------------------------------------------------------------------
# Preview sampling
# ---------------------------------------------------------------------------------------------------------------------


def sample_flux_images(
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
) -> list[str]:
    """FLUX.1 preview images: flow-matching Euler, embedded guidance from `--g` (default 3.5), true CFG with the negative
    prompt when `--l` is above 1. `encode_prompts([prompt, negative])` returns {"prompt_embeds": T5 states (2, L, D),
    "pooled": CLIP-L pooled (2, D2)}."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    te1, te2 = models.text_encoders
    tok1, tok2 = models.tokenizers

    def make_pipe(scheduler):
        return FluxPipeline(
            scheduler=scheduler,
            vae=models.vae,
            text_encoder=te1,
            tokenizer=tok1,
            text_encoder_2=te2,
            tokenizer_2=tok2,
            transformer=models.denoiser,
        )

    def embed_kwargs(prompt: SamplePrompt) -> dict:
        out = encode_prompts([prompt.prompt, prompt.negative_prompt])
        embeds, pooled = out["prompt_embeds"].to(device), out["pooled"].to(device)
        kwargs = {
            "prompt_embeds": embeds[:1],
            "pooled_prompt_embeds": pooled[:1],
            "guidance_scale": 3.5 if prompt.guidance is None else prompt.guidance,
        }
        if "mask" in out:
            image_tokens = (prompt.height // 16) * (prompt.width // 16)
            kwargs["joint_attention_kwargs"] = flow.joint_attention_mask(out["mask"].to(device), image_tokens)
        if prompt.scale > 1.0:
            kwargs.update(
                {
                    "negative_prompt_embeds": embeds[1:],
                    "negative_pooled_prompt_embeds": pooled[1:],
                    "true_cfg_scale": prompt.scale,
                }
            )
        return kwargs

    return sample_with_pipeline(
        make_pipe,
        embed_kwargs,
        (models.denoiser, models.vae, te1, te2),
        lambda name: FlowMatchEulerDiscreteScheduler.from_config(scheduler_config),
        prompts,
        output_dir,
        output_name,
        step,
        epoch,
        device,
        dtype,
        "euler",
        False,
    )
