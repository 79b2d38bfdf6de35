"""SD3 / SD3.5 (Medium, 3.5 Medium, 3.5 Large) as a trainer family: flow matching with sd-scripts' x0 target, CLIP-L +
CLIP-G + T5 conditioning (cacheable, per-encoder dropout on live and cached outputs), SAI LoRA names, block swap and
fp8 base weights for the MMDiT, the 3.5 Medium position-embedding options.

Training maths (sd-scripts' sd3_train_network; reference section 1.4):
    t = floor(u' * (max - min) + min), u' = training_shift(u), u from the --weighting_scheme density
        (flow_matching.sample_discrete_timesteps), float32 whatever the mixed precision; sigma = t / 1000
    x_t = (1 - sigma) x0 + sigma eps;  the MMDiT gets x_t and the timestep t and predicts the velocity v
    x0_hat = v * (-sigma) + x_t;  loss = loss_type(x0_hat, x0) x weight(sigma) (sigma_sqrt: sigma^-2, cosmap, else 1),
        masked with --masked_loss, averaged per sample.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Sequence

import torch

from library import flow_matching as fm
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
from library.sample_prompts import SamplePrompt
from library.sampling import sample_with_pipeline
from library.strategy_sd3 import (
    DEFAULT_T5_MAX_LENGTH,
    TE_OUTPUT_KEYS,
    Sd3TextEncodingStrategy,
    Sd3TokenizeStrategy,
    join_encodings,
)
from library.transfer import to_device

logger = logging.getLogger(__name__)

SAMPLING_SHIFT = 3.0  # the flow shift of the SD3 / SD3.5 releases' schedulers, for previews without --fs
POS_EMBED_MAX_RATIO = 1.5  # --enable_scaled_pos_embed: a table 1.5 times the patch grid of each resolution
SCALED_POS_EMBED_BASE_SIZE = 16  # --enable_scaled_pos_embed: the grid's centre spans positions 0 .. 16


class Sd3Family(ModelFamily):
    script_name = "sd3_train_network.py"
    unused_shared_options = ("v2", "clip_skip", "weighted_captions", "max_token_length")
    arch = "sd3"
    bucket_reso_multiple = 16  # 8x autoencoder, then 2x2 patches
    default_resolution = 1024
    sample_defaults: dict = {}  # SamplePrompt's: 30 steps, cfg 7.5 (sd-scripts' SD3 defaults)
    sample_unsupported = {
        "sampler": "SD3 previews use flow-matching Euler; --ss / sample_sampler has no meaning for them",
        "guidance": "SD3 has no embedded guidance (--g / guidance_scale): use the cfg scale --l / scale",
        "controlnet_image": "a ControlNet image (--cn / controlnet_image) is used only when training a ControlNet",
    }
    caches_text_encoder_outputs = True
    text_output_keys = TE_OUTPUT_KEYS
    swap_block_lists = ("transformer_blocks",)

    def __init__(self) -> None:
        self.variant = "sd3-medium"
        self.vae_shift, self.vae_scale = 0.0609, 1.5305
        self.pos_embed: Sd3PosEmbed | None = None

    # --- arguments ---------------------------------------------------------------------------------------------------

    def add_arguments(self, parser) -> None:
        g = parser.add_argument_group("SD3 / SD3.5")
        g.add_argument("--clip_l", type=str, default=None, help="CLIP-L text encoder file (clip_l.safetensors)")
        g.add_argument("--clip_g", type=str, default=None, help="CLIP-G text encoder file (clip_g.safetensors)")
        g.add_argument("--t5xxl", type=str, default=None, help="T5-XXL text encoder file (fp16, bf16 or fp8)")
        g.add_argument(
            "--t5xxl_max_token_length", type=int, default=None, help=f"T5 tokens per caption (default {DEFAULT_T5_MAX_LENGTH})"
        )
        g.add_argument(
            "--apply_lg_attn_mask", action="store_true", help="CLIP-L and CLIP-G attend only to real tokens (not padding)"
        )
        g.add_argument("--apply_t5_attn_mask", action="store_true", help="T5 attends only to real tokens (not padding)")
        for name, what in (("clip_l", "CLIP-L"), ("clip_g", "CLIP-G"), ("t5", "T5")):
            g.add_argument(
                f"--{name}_dropout_rate",
                type=float,
                default=0.0,
                help=f"probability per sample that {what}'s outputs are replaced by zeros (works with cached outputs)",
            )
        g.add_argument(
            "--weighting_scheme",
            type=str,
            default="uniform",
            choices=list(fm.WEIGHTING_SCHEMES),
            help="timestep density (logit_normal, mode; uniform otherwise) and loss weight (sigma_sqrt, cosmap; 1 otherwise)",
        )
        g.add_argument("--logit_mean", type=float, default=0.0, help="logit_normal mean")
        g.add_argument("--logit_std", type=float, default=1.0, help="logit_normal standard deviation")
        g.add_argument("--mode_scale", type=float, default=1.29, help="mode density scale")
        g.add_argument(
            "--training_shift",
            type=float,
            default=1.0,
            help="shift of the timestep distribution, u -> s*u / (1 + (s-1)*u) (above 1: noisier timesteps)",
        )
        g.add_argument(
            "--pos_emb_random_crop_rate",
            type=float,
            default=0.0,
            help="probability per batch that the position embedding is cropped at a random place of its table instead "
            "of the centre (for SD3.5 Medium)",
        )
        g.add_argument(
            "--enable_scaled_pos_embed",
            action="store_true",
            help="SD3.5 Medium's scaled position embedding: a table per dataset resolution, 1.5 times its patch grid "
            "(also used by the previews; other programs sample with the model's own table)",
        )
        add_text_cache_arguments(g)
        g = parser.add_argument_group("SD3 memory")
        add_fp8_arguments(
            g,
            "store the frozen Linear weights of the MMDiT and T5 (CLIP-L and CLIP-G stay, as sd-scripts)",
            "store only the MMDiT's frozen Linear weights in float8",
        )
        add_block_swap_argument(g, "SD3 Medium and 3.5 Medium have 24 joint blocks, 3.5 Large 38")

    def check_args(self, args) -> None:
        fm.refuse_ddpm_only_options(args)
        if args.v2 or args.clip_skip:
            raise ValueError("--v2 and --clip_skip are for SD models, not SD3 (it always uses the CLIP penultimate layers)")
        if args.weighted_captions:
            raise ValueError("--weighted_captions is for SD 1.x/2.x and SDXL; SD3 has no prompt weighting")
        check_text_cache_args(args)
        check_block_swap_args(args)
        for flag in ("clip_l_dropout_rate", "clip_g_dropout_rate", "t5_dropout_rate", "pos_emb_random_crop_rate"):
            value = getattr(args, flag)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"--{flag} {value}: give a probability between 0 and 1")
        if args.training_shift <= 0:
            raise ValueError(f"--training_shift {args.training_shift}: the shift must be above 0 (1 leaves timesteps as drawn)")
        lo, hi = args.min_timestep or 0, 1000 if args.max_timestep is None else args.max_timestep
        if not 0 <= lo < hi <= 1000:
            raise ValueError(f"--min_timestep {lo} / --max_timestep {hi}: need 0 <= min < max <= 1000")
        if args.max_token_length:
            logger.warning("--max_token_length has no effect on SD3: CLIP takes 77 tokens, T5 --t5xxl_max_token_length")
        check_base_model_args(args)

    # --- models ------------------------------------------------------------------------------------------------------

    def load_models(self, args) -> TrainModels:
        from library.sd3_models import load_sd3_model

        m = load_sd3_model(
            args.pretrained_model_name_or_path,
            clip_l=args.clip_l,
            clip_g=args.clip_g,
            t5xxl=args.t5xxl,
            vae=args.vae,
            tokenizer_cache_dir=args.tokenizer_cache_dir,
            dtype=torch.float32,
        )
        self.variant = m.variant
        if args.t5xxl_max_token_length is None:
            args.t5xxl_max_token_length = DEFAULT_T5_MAX_LENGTH
        vae_config = m.vae.config
        self.vae_shift = vae_config.shift_factor if vae_config.shift_factor is not None else 0.0
        self.vae_scale = vae_config.scaling_factor
        transformer = mark_repeated_blocks(m.transformer)
        if args.pos_emb_random_crop_rate or args.enable_scaled_pos_embed:
            if self.variant != "sd3.5-medium":
                logger.warning(
                    "--pos_emb_random_crop_rate / --enable_scaled_pos_embed are meant for SD3.5 Medium; this model is "
                    f"{self.variant}"
                )
            sizes = patch_grid_sizes(args) if args.enable_scaled_pos_embed else None
            self.pos_embed = Sd3PosEmbed(transformer.pos_embed, sizes)
        models = TrainModels(
            [m.clip_l, m.clip_g, m.t5xxl], [m.clip_l_tokenizer, m.clip_g_tokenizer, m.t5_tokenizer], m.vae, transformer
        )
        return self.prepare_base_models(args, models)

    def fp8_text_encoders(self, models: TrainModels) -> list[torch.nn.Module]:
        return [models.text_encoders[2]]  # T5 only, as sd-scripts: the CLIPs are small and stay in the compute dtype

    def merge_lora(self, models, state_dict, multiplier):
        from networks.lora_sd3 import merge_into_transformer

        return merge_into_transformer(state_dict, multiplier, models.denoiser, models.text_encoders)

    def strategies(self, args, models: TrainModels):
        if not hasattr(self, "_tokenize"):
            self._tokenize = Sd3TokenizeStrategy(*models.tokenizers, args.t5xxl_max_token_length)
            self._encode = Sd3TextEncodingStrategy(
                args.apply_lg_attn_mask,
                args.apply_t5_attn_mask,
                args.clip_l_dropout_rate,
                args.clip_g_dropout_rate,
                args.t5_dropout_rate,
            )
        return self._tokenize, self._encode

    def scale_latents(self, latents):
        return (latents - self.vae_shift) * self.vae_scale

    def text_cache_identity(self, args, models: TrainModels) -> dict:
        _, encode = self.strategies(args, models)
        return {**super().text_cache_identity(args, models), **encode.cache_identity()}

    def validation_timesteps(self, args) -> list[int]:
        return sd_train_utils.validation_timesteps(
            args.min_timestep or 0, 1000 if args.max_timestep is None else args.max_timestep
        )

    # --- the loss ----------------------------------------------------------------------------------------------------

    def sample_losses(self, args, models, batch, latents, conds, generators, timesteps=None):
        device, dtype = latents.device, latents.dtype
        x0 = latents.detach().float()
        b, c, h, w = x0.shape
        noise = fm.sample_noise(x0, generators, device)
        if timesteps is None:
            timesteps = torch.cat(
                [
                    fm.sample_discrete_timesteps(
                        1,
                        g,
                        args.weighting_scheme,
                        args.logit_mean,
                        args.logit_std,
                        args.mode_scale,
                        args.training_shift,
                        args.min_timestep,
                        args.max_timestep,
                    )
                    for g in generators
                ]
            )
        host_t = timesteps.to(torch.float32)  # float32 whatever the mixed precision (integers up to 1000 are exact)
        host_sigmas = host_t / fm.NUM_TRAIN_TIMESTEPS
        sigmas = to_device(host_sigmas, device)
        noisy = fm.noisy_model_inputs(args, x0, noise, sigmas, generators)
        _, encode = self.strategies(args, models)
        context, pooled = encode.conditioning(conds, generators)
        crop = self.pos_embed.draw(args.pos_emb_random_crop_rate, generators[0]) if self.pos_embed else contextlib.nullcontext()
        with crop:
            velocity = models.denoiser(
                hidden_states=noisy.to(dtype),
                encoder_hidden_states=to_device(context, device, dtype),
                pooled_projections=to_device(pooled, device, dtype),
                timestep=to_device(host_t, device),
                return_dict=False,
            )[0]
        pred = fm.x0_from_velocity(velocity.float(), noisy, sigmas)
        c_huber = None
        if args.loss_type in ("huber", "smooth_l1"):
            c_huber = to_device(fm.huber_c(host_sigmas, args.huber_schedule, args.huber_c, args.huber_scale), device)
        loss = sd_train_utils.conditional_loss(pred, x0, args.loss_type, c_huber)
        loss = loss * fm.per_sample_view(fm.loss_weighting(args.weighting_scheme, sigmas), loss)
        if args.masked_loss and batch.get("alpha_masks") is not None:
            loss = sd_train_utils.masked_loss(loss, batch["alpha_masks"])
        return loss.mean(dim=[1, 2, 3])

    # --- files -------------------------------------------------------------------------------------------------------

    def lora_options(self, models):
        return {}

    def metadata(self, args) -> dict[str, str]:
        from library.sd3_models import SD3_MODELSPEC_ARCHITECTURE, SD3_SS_BASE_MODEL_VERSION

        md = {
            "ss_v2": "False",
            "ss_base_model_version": SD3_SS_BASE_MODEL_VERSION[self.variant],
            "modelspec.architecture": SD3_MODELSPEC_ARCHITECTURE[self.variant],
            "modelspec.implementation": "diffusers",
        }
        for key in ("apply_lg_attn_mask", "apply_t5_attn_mask", "weighting_scheme", "logit_mean", "logit_std", "mode_scale"):
            md[f"ss_{key}"] = str(getattr(args, key))
        return md

    def save_checkpoint(self, args, models, path, form, dtype, metadata, trained) -> list[str]:
        """SAI's single file (MMDiT + VAE) with side files for trained text encoders, or a StableDiffusion3Pipeline
        folder (sd3_models.sd3_checkpoint_spec)."""
        from library.model_checkpoint import save_model_checkpoint
        from library.sd3_models import sd3_checkpoint_spec

        files = {"vae": args.vae, "clip_l": args.clip_l, "clip_g": args.clip_g, "t5xxl": args.t5xxl}
        spec = sd3_checkpoint_spec(
            args.pretrained_model_name_or_path, files, models.text_encoders, models.tokenizers, models.vae, models.denoiser
        )
        return save_model_checkpoint(args, spec, path, form, dtype, metadata, trained, getattr(self, "swapper", None))

    # --- previews ----------------------------------------------------------------------------------------------------

    def sample_images(self, args, models: TrainModels, prompts, output_dir: str, output_name: str, step, epoch, device, dtype):
        def encode_prompts(texts: list[str]) -> dict:
            with torch.no_grad():
                context, pooled = join_encodings(self.encode_text(args, models, texts))  # no caption dropout
            return {"prompt_embeds": context, "pooled": pooled}

        with self.sampling_block_swap():
            return sample_sd3_images(
                models, prompts, encode_prompts, output_dir, output_name, step=step, epoch=epoch, device=device, dtype=dtype
            )


def mark_repeated_blocks(transformer: torch.nn.Module) -> torch.nn.Module:
    """Name the joint-block class as the transformer's repeated blocks (diffusers' SD3Transformer2DModel names none),
    so that --torch_compile compiles each joint block; returns the transformer."""
    transformer._repeated_blocks = [type(transformer.transformer_blocks[0]).__name__]
    return transformer


# ---------------------------------------------------------------------------------------------------------------------
# Position embedding (--pos_emb_random_crop_rate, --enable_scaled_pos_embed)
# ---------------------------------------------------------------------------------------------------------------------


def patch_grid_sizes(args) -> list[int]:
    """The patch-grid sides of the run's dataset resolutions, as sd-scripts' --enable_scaled_pos_embed counts them:
    round(sqrt(W * H)) // 8 latent pixels, halved by the 2x2 patches; sorted, without repeats."""
    from library.config_util import load_dataset_configs

    sides = {round(math.sqrt(cfg.resolution[0] * cfg.resolution[1])) // 8 // 2 for cfg in load_dataset_configs(args)}
    return sorted(sides)


def scaled_sincos_table(width: int, grid: int, base: int) -> torch.Tensor:
    """A (1, grid * grid, width) sin-cos position table whose central base x base patches span positions 0 .. 16
    (SD3.5 Medium's scaled embedding): position of row or column i = 16 / base * (i - (grid - base) / 2); a patch's
    vector is [sin/cos of its column position, sin/cos of its row position], each half with frequencies
    10000^(-k / (width / 4)), k < width / 4, as the MMDiT's own table."""
    step = torch.arange(grid, dtype=torch.float32) / grid
    scale = SCALED_POS_EMBED_BASE_SIZE * grid / base
    pos = step * scale - scale * (grid - base) / (2 * grid)
    quarter = width // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    angles = pos.double()[:, None] * omega[None]  # (grid, width / 4)
    one_d = torch.cat([angles.sin(), angles.cos()], dim=1)  # (grid, width / 2)
    rows = one_d[:, None, :].expand(grid, grid, -1)  # the row position of patch (i, j)
    cols = one_d[None, :, :].expand(grid, grid, -1)  # its column position
    return torch.cat([cols, rows], dim=-1).reshape(1, grid * grid, width).float()


class Sd3PosEmbed:
    """Replaces `cropped_pos_embed` of an SD3Transformer2DModel's PatchEmbed (an instance attribute; the module, its
    forward and its saved buffer stay as they are) to add sd-scripts' two SD3.5 Medium options:

    - random crop (`draw`, per batch): with probability `rate` the patch grid takes its positions from a random place
      of the table instead of the centre; the draws (one for the choice, two for the place) come from the batch's
      first sample generator;
    - scaled tables (`grid_sizes`, the patch-grid sides of the run's resolutions): one table per side s,
      POS_EMBED_MAX_RATIO x s patches wide (scaled_sincos_table); a grid of h x w patches takes the table of the
      first side whose area bound holds h * w (bounds at the midpoints of consecutive squared sides, the last at
      (1.5 s)^2; beyond it the largest), or a new table for max(h, w) when the grid is larger than the table.
    """

    def __init__(self, patch_embed: torch.nn.Module, grid_sizes: Sequence[int] | None = None) -> None:
        self.embed = patch_embed
        self.random: tuple[float, float] | None = None  # the crop place of this forward, as fractions
        self.width = patch_embed.pos_embed.shape[-1]
        self.tables: dict[int, torch.Tensor] = {}
        self.bounds: list[tuple[int, int]] = []  # (largest area, grid side)
        if grid_sizes:
            sides = sorted(set(grid_sizes))
            for prev, side in zip(sides, sides[1:]):
                self.bounds.append(((prev * prev + side * side) // 2, prev))
            self.bounds.append((int((sides[-1] * POS_EMBED_MAX_RATIO) ** 2), sides[-1]))
            for side in sides:
                self.tables[side] = scaled_sincos_table(self.width, int(side * POS_EMBED_MAX_RATIO), side)
        patch_embed.cropped_pos_embed = self.crop

    @contextlib.contextmanager
    def draw(self, rate: float, generator: torch.Generator):
        """Context manager for one forward: with probability `rate` (drawn from `generator`) a random crop place."""
        if rate > 0 and float(torch.rand((), generator=generator)) < rate:
            self.random = (float(torch.rand((), generator=generator)), float(torch.rand((), generator=generator)))
        try:
            yield
        finally:
            self.random = None

    def _table(self, h: int, w: int) -> tuple[torch.Tensor, int]:
        if not self.tables:
            return self.embed.pos_embed, self.embed.pos_embed_max_size
        side = next((s for bound, s in self.bounds if h * w <= bound), self.bounds[-1][1])
        grid = int(side * POS_EMBED_MAX_RATIO)
        if h > grid or w > grid:
            side = max(h, w)
            grid = int(side * POS_EMBED_MAX_RATIO)
            if side not in self.tables:
                logger.info(f"scaled position embedding: a new table for {h}x{w} patches")
                self.tables[side] = scaled_sincos_table(self.width, grid, side)
                self.bounds = sorted([*self.bounds, (grid * grid, side)])
        table = self.tables[side]
        device = self.embed.pos_embed.device
        if table.device != device:
            table = self.tables[side] = table.to(device)
        return table, grid

    def crop(self, height: int, width: int) -> torch.Tensor:
        """The (1, h * w, width) position embedding of a latent of height x width (PatchEmbed's contract)."""
        p = self.embed.patch_size
        h, w = height // p, width // p
        table, size = self._table(h, w)
        if h > size or w > size:
            raise ValueError(f"a {h}x{w}-patch latent is larger than the {size}x{size} position table of this model")
        if self.random is None:
            top, left = (size - h) // 2, (size - w) // 2
        else:
            top, left = int(self.random[0] * (size - h + 1)), int(self.random[1] * (size - w + 1))
        grid = table.reshape(1, size, size, -1)[:, top : top + h, left : left + w, :]
        return grid.reshape(1, h * w, -1)


# ---------------------------------------------------------------------------------------------------------------------
# Preview sampling
# ---------------------------------------------------------------------------------------------------------------------


def sample_sd3_images(
    models,
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
    """SD3 preview images through diffusers' StableDiffusion3Pipeline fed with kiln's prompt embeddings: flow-matching
    Euler with shift `--fs` (default 3, the releases' scheduler), classifier-free guidance `--l` (default 7.5; none
    at 1) with the negative prompt `--n`, 30 steps by default. `encode_prompts([prompt, negative])` returns
    {"prompt_embeds": the joined context (2, L, D), "pooled": (2, P)}. Returns the PNG paths in prompt order."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    te1, te2, te3 = models.text_encoders
    tok1, tok2, tok3 = models.tokenizers

    def make_pipe(scheduler):
        return StableDiffusion3Pipeline(
            transformer=models.denoiser,
            scheduler=scheduler,
            vae=models.vae,
            text_encoder=te1,
            tokenizer=tok1,
            text_encoder_2=te2,
            tokenizer_2=tok2,
            text_encoder_3=te3,
            tokenizer_3=tok3,
        )

    def embed_kwargs(prompt: SamplePrompt) -> dict:
        out = encode_prompts([prompt.prompt, prompt.negative_prompt])
        context, pooled = out["prompt_embeds"].to(device), out["pooled"].to(device)
        return {
            "prompt_embeds": context[:1],
            "negative_prompt_embeds": context[1:],
            "pooled_prompt_embeds": pooled[:1],
            "negative_pooled_prompt_embeds": pooled[1:],
        }

    def shift_of(prompt: SamplePrompt) -> float:
        return SAMPLING_SHIFT if prompt.flow_shift is None else prompt.flow_shift

    paths: dict[int, str] = {}
    for shift in sorted({shift_of(p) for p in prompts}):  # one scheduler per flow shift
        group = [p for p in prompts if shift_of(p) == shift]
        written = sample_with_pipeline(
            make_pipe,
            embed_kwargs,
            (models.denoiser, models.vae, te1, te2, te3),
            lambda name, s=shift: FlowMatchEulerDiscreteScheduler(num_train_timesteps=fm.NUM_TRAIN_TIMESTEPS, shift=s),
            group,
            output_dir,
            output_name,
            step,
            epoch,
            device,
            dtype,
            "euler",
            False,
        )
        paths.update({id(p): path for p, path in zip(group, written)})
    return [paths[id(p)] for p in prompts]
