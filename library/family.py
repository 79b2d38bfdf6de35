"""What a model family plugs into the shared trainer (DESIGN.md section 2): loading, text conditioning, the loss of
one batch, sampling and metadata. The DDPM families (SD 1.x/2.x, SDXL) share `DdpmFamily`'s noise and loss."""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch

from library import sd_train_utils as ddpm
from library.transfer import to_device

logger = logging.getLogger(__name__)


@dataclass
class TrainModels:
    """The models of one run. `denoiser` is the U-Net (or DiT); `text_encoders`/`tokenizers` in the family's order."""

    text_encoders: list[torch.nn.Module]
    tokenizers: list
    vae: torch.nn.Module
    denoiser: torch.nn.Module
    extra: dict = field(default_factory=dict)


class ModelFamily(ABC):
    """Per-family hooks of the trainer. Methods take the parsed arguments; none of them runs the training loop."""

    script_name: str = ""
    arch: str = ""  # latent-cache suffix
    bucket_reso_multiple: int = 64
    default_resolution: int = 512

    # shared model/text options this family refuses or ignores (its check_args says so): the cache tools' --help
    # leaves them out
    unused_shared_options: tuple[str, ...] = ()

    # sample-prompt defaults and the prompt options this family cannot honour (see library.sample_prompts)
    sample_defaults: dict = {}
    sample_unsupported: dict = {}

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Family-only flags."""

    def check_args(self, args: argparse.Namespace) -> None:
        """Raise ValueError for flags that mean nothing for this family."""

    @abstractmethod
    def load_models(self, args: argparse.Namespace) -> TrainModels: ...

    def encode_images(self, models: TrainModels, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixels in [-1, 1] -> the latent distribution's (mean, std), before any scaling (diffusers AutoencoderKL)."""
        dist = models.vae.encode(images.to(models.vae.dtype)).latent_dist
        return dist.mean, dist.std

    @abstractmethod
    def scale_latents(self, latents: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def strategies(self, args, models: TrainModels) -> tuple:
        """(tokenize strategy, text-encoding strategy) of this family, made once per run."""

    def encode_text(self, args, models: TrainModels, captions: list[str]) -> list[torch.Tensor]:
        """Captions -> conditioning tensors (gradients flow when a text encoder is trained)."""
        tokenize, encode = self.strategies(args, models)
        if args.weighted_captions:
            tokens, weights = tokenize.tokenize_with_weights(captions)
            return encode.encode_tokens_with_weights(models.text_encoders, tokens, weights)
        return encode.encode_tokens(models.text_encoders, tokenize.tokenize(captions))

    def text_conditioning(self, args, models: TrainModels, batch: dict) -> list[torch.Tensor]:
        """The batch's conditioning: from cached text-encoder outputs when the batch has them, else encoded now."""
        cached = batch.get("text_outputs")
        if cached is not None:
            return [to_device(cached[k], models.denoiser.device) for k in self.text_output_keys]
        return self.encode_text(args, models, batch["captions"])

    # the denoiser's ModuleLists whose blocks --blocks_to_swap streams, in the order they run (empty: no block swap)
    swap_block_lists: tuple[str, ...] = ()

    def place_models(
        self,
        args,
        models: TrainModels,
        device: torch.device,
        dtype: torch.dtype,
        trained: list[torch.nn.Module] = (),
        trained_dtype: torch.dtype = torch.float32,
    ) -> None:
        """Put the text encoders and the denoiser on the device in the working dtype; float8-stored weights stay
        float8 (place_module); the models in `trained` (trained in place by a full fine-tune) in `trained_dtype`.
        With --blocks_to_swap (families with swap_block_lists) the denoiser's last blocks stay in host memory and
        `self.swapper` streams them in (swap_denoiser_blocks)."""
        trained_ids = {id(m) for m in trained}

        def dtype_of(module: torch.nn.Module) -> torch.dtype:
            return trained_dtype if id(module) in trained_ids else dtype

        for m in models.text_encoders:
            place_module(m, device, dtype_of(m))
        denoiser_dtype = dtype_of(models.denoiser)
        if self.swap_block_lists and getattr(args, "blocks_to_swap", None):
            self.swapper = swap_denoiser_blocks(
                models.denoiser, self.swap_block_lists, args.blocks_to_swap, device, denoiser_dtype
            )
        else:
            place_module(models.denoiser, device, denoiser_dtype)

    def sampling_block_swap(self) -> contextlib.AbstractContextManager:
        """For preview sampling: with block swap, stream only the blocks that do not fit in free device memory
        (sampling keeps no activations for backward); otherwise nothing."""
        swapper = getattr(self, "swapper", None)
        if swapper is None:
            return contextlib.nullcontext()
        from library.custom_offloading_utils import blocks_to_swap_for_inference, free_memory_bytes

        return swapper.swapping_fewer(blocks_to_swap_for_inference(swapper, free_memory_bytes(swapper.device)))

    # --- the base model before any adapter: --base_weights merged in, then --fp8_base storage -------------------------

    def merge_lora(self, models: TrainModels, state_dict: dict[str, torch.Tensor], multiplier: float) -> int:
        """Merge an adapter file (LoRA, OFT, LoHa, LoKr) at `multiplier` into the base weights it adapts; returns the
        number of modules merged. Keys of another kind or matching no module are a ValueError naming one."""
        raise NotImplementedError(f"{type(self).__name__} cannot merge LoRA files into its base model")

    def fp8_modules(self, args, models: TrainModels) -> list[torch.nn.Module]:
        """The models --fp8_base / --fp8_base_unet store in float8: the denoiser, with --fp8_base (and not
        --fp8_base_unet, as sd-scripts) the text encoders too."""
        if not (getattr(args, "fp8_base", False) or getattr(args, "fp8_base_unet", False)):
            return []
        with_te = args.fp8_base and not args.fp8_base_unet
        return [models.denoiser, *(self.fp8_text_encoders(models) if with_te else [])]

    def fp8_text_encoders(self, models: TrainModels) -> list[torch.nn.Module]:
        return list(models.text_encoders)

    def prepare_base_models(self, args, models: TrainModels) -> TrainModels:
        """The end of every family's load_models: merge the --base_weights LoRA files into the base weights (at
        --base_weights_multiplier), then store the frozen Linear weights of fp8_modules in float8. Both happen before
        any adapter wraps a Linear (the adapters capture the forward of what they wrap)."""
        from library.checkpoint_files import ModelLoadError
        from library.saving import load_weights_file

        try:
            plan = base_weights_plan(args)
        except ValueError as e:
            raise ModelLoadError(str(e)) from None
        for path, multiplier in plan:
            state_dict, _ = load_weights_file(path)
            try:
                n = self.merge_lora(models, state_dict, multiplier)
            except ValueError as e:
                raise ModelLoadError(f"--base_weights {path}: {e}") from None
            if n == 0:
                raise ModelLoadError(f"--base_weights {path}: the file holds no LoRA weights")
            logger.info(f"merged {n} LoRA modules of {path} into the base model at multiplier {multiplier}")
        targets = self.fp8_modules(args, models)
        if targets:
            from library.fp8_utils import store_linear_weights_fp8

            dtype = torch.float16 if args.mixed_precision == "fp16" else torch.bfloat16
            for model in targets:
                model.requires_grad_(False)  # base weights are frozen (the converter leaves trainable ones alone)
                store_linear_weights_fp8(model, compute_dtype=dtype)
        return models

    def gradient_checkpointing_func(self, args):
        """The per-block checkpoint function for the denoiser's enable_gradient_checkpointing: with
        --cpu_offload_checkpointing one that keeps the blocks' saved inputs in host memory, else None (diffusers' own)."""
        if not args.cpu_offload_checkpointing:
            return None
        from library.custom_offloading_utils import HostActivationOffload

        return HostActivationOffload().checkpoint

    def vae_dtype(self, args, weight_dtype: torch.dtype) -> torch.dtype:
        """float32 with --no_half_vae or under fp16 (SD VAEs overflow there), else the working dtype."""
        return torch.float32 if getattr(args, "no_half_vae", False) or weight_dtype == torch.float16 else weight_dtype

    # families whose frozen text encoders' outputs can be cached (they then implement text_cache_identity)
    caches_text_encoder_outputs: bool = False
    text_output_keys: tuple[str, ...] = ()

    def text_cache_identity(self, args, models: TrainModels) -> dict:
        """Everything besides the caption that changes the text-encoder outputs (for the cache's validity): the
        encoders' weights and the tokenizer settings; families add their own encoding options."""
        from library.strategy_base import module_fingerprint

        if not self.caches_text_encoder_outputs:
            raise NotImplementedError(f"{type(self).__name__} does not cache text-encoder outputs")
        tokenize, _ = self.strategies(args, models)
        return {"text_encoders": [module_fingerprint(te) for te in models.text_encoders], "tokens": tokenize.settings()}

    @abstractmethod
    def sample_losses(
        self,
        args,
        models: TrainModels,
        batch: dict,
        latents: torch.Tensor,
        conds: list[torch.Tensor],
        generators: list[torch.Generator],
        timesteps: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Per-element loss (B, C, h, w) of one batch; `timesteps` fixed for validation, else drawn per sample."""

    @abstractmethod
    def lora_options(self, models: TrainModels) -> dict:
        """Keyword arguments for the network module's create_network (name maps, prefixes)."""

    @abstractmethod
    def metadata(self, args) -> dict[str, str]:
        """ss_base_model_version, ss_v2 and the modelspec.* keys of this family; modelspec.architecture names the
        whole model (a training method appends what its files hold, e.g. "/lora")."""

    def validation_timesteps(self, args) -> list[int]:
        return ddpm.validation_timesteps(args.min_timestep or 0, args.max_timestep or 1000)

    def save_checkpoint(
        self,
        args,
        models: TrainModels,
        path: str,
        form: str,
        dtype: torch.dtype | None,
        metadata: dict[str, str] | None,
        trained: frozenset[str],
    ) -> list[str]:
        """Write the model as a checkpoint. `path` is the output path WITHOUT extension (e.g. out/name-step00000200);
        form is "safetensors", "ckpt" (weights-only-loadable pickle {"state_dict": ...} of tensors) or "diffusers"
        (a folder at `path`). `dtype` casts floating tensors (--save_precision; None keeps each tensor's dtype).
        `trained` names the parts that were trained: "denoiser" and/or "text_encoder_0", "text_encoder_1", ... (index in
        models.text_encoders). Returns the written paths (file(s) or folder). Atomic: temp name then rename; an existing
        file of that name is replaced only when the new one is complete.

        Trained parts are written from `models` (wherever their tensors are, one tensor at a time; the models are not
        moved or cast); the others from the model the user gave (args.pretrained_model_name_or_path and the files that
        replace its parts), never from memory, where frozen parts are kept in the working dtype. See
        library/model_checkpoint.py."""
        raise NotImplementedError(f"{type(self).__name__} cannot save full checkpoints")


def per_sample(fn, generators: list[torch.Generator], *tensors: torch.Tensor, **kw) -> torch.Tensor:
    """Run fn on each sample with its own generator and stack: a sample's random numbers do not depend on the batch."""
    return torch.cat([fn(*(t[i : i + 1] for t in tensors), generator=g, **kw) for i, g in enumerate(generators)])


class DdpmFamily(ModelFamily):
    """Epsilon / v-prediction training on SD's DDPM schedule (SD 1.x/2.x, SDXL)."""

    vae_scale: float = 0.18215

    def scale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return latents * self.vae_scale

    def sampling_scheduler_config(self, args) -> dict:
        """The training schedule as a config for the samplers, with SD's inference convention (steps_offset 1)."""
        return {**ddpm.make_noise_scheduler(args.v_parameterization, args.zero_terminal_snr).config, "steps_offset": 1}

    def __init__(self) -> None:
        self._scheduler = None
        self._all_snr = None

    def noise_scheduler(self, args):
        if self._scheduler is None:
            self._scheduler = ddpm.make_noise_scheduler(args.v_parameterization, args.zero_terminal_snr)
            self._all_snr = ddpm.all_snr(self._scheduler)
        return self._scheduler

    def check_args(self, args) -> None:
        check_base_model_args(args)
        if args.scale_v_pred_loss_like_noise_pred and not args.v_parameterization:
            raise ValueError("--scale_v_pred_loss_like_noise_pred needs --v_parameterization")
        if args.v_pred_like_loss and args.v_parameterization:
            raise ValueError("--v_pred_like_loss is for epsilon models; the model already predicts v")
        for flag, needs in (
            ("adaptive_noise_scale", "noise_offset"),
            ("noise_offset_random_strength", "noise_offset"),
            ("ip_noise_gamma_random_strength", "ip_noise_gamma"),
        ):
            if getattr(args, flag) and not getattr(args, needs):
                raise ValueError(f"--{flag} works together with --{needs}, which is not set")
        if args.huber_scale != 1.0 and (args.loss_type not in ("huber", "smooth_l1") or args.huber_schedule == "snr"):
            raise ValueError(
                "--huber_scale applies to --loss_type huber/smooth_l1 with --huber_schedule constant or exponential only"
            )

    def merge_lora(self, models, state_dict, multiplier):
        from networks.merge import merge_into_models

        return merge_into_models(state_dict, multiplier, models.text_encoders, models.denoiser, **self.lora_options(models))

    @abstractmethod
    def call_denoiser(
        self, args, models: TrainModels, noisy: torch.Tensor, timesteps: torch.Tensor, conds: list[torch.Tensor], batch: dict
    ) -> torch.Tensor: ...

    def sample_losses(self, args, models, batch, latents, conds, generators, timesteps=None):
        sched = self.noise_scheduler(args)
        device = latents.device
        x0 = latents.detach().float()  # random draws happen on the CPU generators, the arithmetic where the latents are
        noise = per_sample(
            ddpm.sample_noise,
            generators,
            x0,
            noise_offset=args.noise_offset,
            noise_offset_random_strength=args.noise_offset_random_strength,
            adaptive_noise_scale=args.adaptive_noise_scale,
            multires_noise_iterations=args.multires_noise_iterations,
            multires_noise_discount=args.multires_noise_discount,
        )
        if timesteps is None:
            timesteps = torch.cat(
                [
                    ddpm.sample_timesteps(1, sched.config.num_train_timesteps, args.min_timestep, args.max_timestep, generator=g)
                    for g in generators
                ]
            )
        timesteps = timesteps.long()
        noisy = per_sample(
            functools.partial(ddpm.noisy_latents, sched),
            generators,
            x0,
            noise,
            timesteps,
            ip_noise_gamma=args.ip_noise_gamma,
            ip_noise_gamma_random_strength=args.ip_noise_gamma_random_strength,
        )
        target = ddpm.training_target(sched, x0, noise, timesteps, args.v_parameterization)
        noisy, t_dev = noisy.to(latents.dtype), to_device(timesteps, device)
        pred = self.call_denoiser(args, models, noisy, t_dev, conds, batch)
        c = to_device(ddpm.huber_c(timesteps, sched, args.huber_schedule, args.huber_c, args.huber_scale), device)
        loss = ddpm.conditional_loss(pred.float(), target.float(), args.loss_type, c)
        if args.masked_loss and batch.get("alpha_masks") is not None:
            loss = ddpm.masked_loss(loss, batch["alpha_masks"])
        loss = loss.mean(dim=[1, 2, 3])
        snr = self._all_snr
        if args.min_snr_gamma:
            loss = ddpm.apply_snr_weight(loss, timesteps, snr, args.min_snr_gamma, args.v_parameterization)
        if args.scale_v_pred_loss_like_noise_pred:
            loss = ddpm.scale_v_prediction_loss_like_noise_prediction(loss, timesteps, snr)
        if args.v_pred_like_loss:
            loss = ddpm.add_v_prediction_like_loss(loss, timesteps, snr, args.v_pred_like_loss)
        if args.debiased_estimation_loss:
            loss = ddpm.apply_debiased_estimation(loss, timesteps, snr, args.v_parameterization)
        return loss


def add_text_cache_arguments(group) -> None:
    """The text-encoder output cache flags of the families that have one (SDXL, FLUX)."""
    group.add_argument(
        "--cache_text_encoder_outputs",
        action="store_true",
        help="encode every caption once before training and keep the outputs in memory (needs --network_train_unet_only). "
        "With caption shuffling, tag dropout or wildcards, --text_encoder_cache_variants processed captions are encoded "
        "per image and one is drawn each step; caption dropout draws a cached empty caption",
    )
    group.add_argument(
        "--cache_text_encoder_outputs_to_disk",
        action="store_true",
        help="keep the text-encoder caches next to the images (implies --cache_text_encoder_outputs)",
    )
    group.add_argument(
        "--text_encoder_cache_variants",
        type=int,
        default=8,
        help="captions that change every step (shuffle, tag dropout, wildcards): how many versions to encode per image",
    )
    group.add_argument("--text_encoder_batch_size", type=int, default=None, help="captions per text-encoder call when caching")


def check_text_cache_args(args) -> None:
    """--cache_text_encoder_outputs_to_disk implies caching (the trainer checks that the text encoders are frozen:
    library/trainer.py check_args asks the training method)."""
    if args.cache_text_encoder_outputs_to_disk:
        args.cache_text_encoder_outputs = True


def working_dtype(mixed_precision: str | None) -> torch.dtype:
    """The dtype models compute in for --mixed_precision (no: float32)."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)


def place_module(module: torch.nn.Module, device, dtype: torch.dtype) -> None:
    """module.to(device, dtype), except that a module with float8-stored weights (--fp8_base) keeps them: its other
    frozen weights are in the compute dtype already, and what it keeps in float32 on purpose stays float32."""
    from library.fp8_utils import FP8_DTYPES

    if any(p.dtype in FP8_DTYPES for p in module.parameters()):
        module.to(device)
    else:
        module.to(device, dtype)


def add_fp8_arguments(group, base_help: str, unet_help: str) -> None:
    """--fp8_base / --fp8_base_unet with the family's wording of what they store in float8."""
    common = (
        " in float8 (e4m3, per-tensor scale; kiln's own addition: sd-scripts casts without a scale) and compute in the "
        "--mixed_precision dtype (bf16 or fp16 required); Conv2d layers, norms, embeddings and biases stay in that dtype"
    )
    group.add_argument("--fp8_base", action="store_true", help=base_help + common)
    group.add_argument("--fp8_base_unet", action="store_true", help=unet_help + " (wins over --fp8_base)")


def check_base_model_args(args) -> None:
    """--fp8_base needs mixed precision; --base_weights files must exist, at most one multiplier each (base_weights_plan)."""
    if (getattr(args, "fp8_base", False) or getattr(args, "fp8_base_unet", False)) and args.mixed_precision == "no":
        raise ValueError("--fp8_base needs --mixed_precision bf16 or fp16: float8 weights are computed in that precision")
    base_weights_plan(args)


def base_weights_plan(args) -> list[tuple[str, float]]:
    """(file, multiplier) of each --base_weights file: the --base_weights_multiplier values in order, 1.0 for files
    after the last one given (as sd-scripts). Missing files and more multipliers than files are a ValueError."""
    files = list(getattr(args, "base_weights", None) or [])
    multipliers = list(getattr(args, "base_weights_multiplier", None) or [])
    if multipliers and not files:
        raise ValueError("--base_weights_multiplier is given without --base_weights")
    if len(multipliers) > len(files):
        raise ValueError(
            f"--base_weights_multiplier has {len(multipliers)} values for {len(files)} --base_weights files: "
            "give at most one per file (files without one use 1.0)"
        )
    for path in files:
        if not os.path.isfile(path):
            raise ValueError(f"--base_weights {path}: no such file")
    return list(zip(files, multipliers + [1.0] * (len(files) - len(multipliers))))


def add_block_swap_argument(group, what: str) -> None:
    """--blocks_to_swap; `what` says what the family's blocks are and how many it has (for --help)."""
    group.add_argument(
        "--blocks_to_swap",
        type=int,
        default=None,
        help="keep the weights of this many transformer blocks in host memory and stream them in per block "
        f"(less GPU memory, slower; {what}: at most the block count minus 2; more is lowered to that, with a warning). "
        "Full fine-tuning (flux_train.py, sd3_train.py) trains the swapped blocks too, with their optimizer state in "
        "host memory; it needs --fused_backward_pass or --blockwise_fused_optimizers",
    )


def check_block_swap_args(args) -> None:
    """A negative --blocks_to_swap is refused (before any cache is written)."""
    if args.blocks_to_swap is not None and args.blocks_to_swap < 0:
        raise ValueError(f"--blocks_to_swap {args.blocks_to_swap}: give a number of blocks, 0 or more")


def swap_denoiser_blocks(model: torch.nn.Module, block_lists, blocks_to_swap: int, device, dtype: torch.dtype):
    """Block swap for a denoiser whose repeated blocks are the ModuleLists named in `block_lists` (in the order they
    run): the model in the working dtype (float8-stored weights stay float8), everything but those blocks on `device`,
    and a BlockSwapper that keeps the last `blocks_to_swap` blocks in host memory (lowered, with a warning, to the
    block count minus 2). Returns the swapper."""
    from library.custom_offloading_utils import BlockSwapper
    from library.fp8_utils import FP8_DTYPES

    blocks = [block for name in block_lists for block in getattr(model, name)]
    count = min(blocks_to_swap, len(blocks) - 2)
    if count < blocks_to_swap:
        logger.warning(
            f"--blocks_to_swap {blocks_to_swap}: this transformer has {len(blocks)} blocks, so "
            f"{count} are swapped (at most the block count minus 2)"
        )
    if not any(p.dtype in FP8_DTYPES for p in model.parameters()):
        model.to(dtype=dtype)
    for name, child in model.named_children():
        if name not in block_lists:
            child.to(device)
    return BlockSwapper(blocks, max(count, 0), device)
