"""Seconds per training step and peak GPU memory of kiln's training step at full model size (random weights): LoRA
training (--method lora, the default) and full fine-tuning (--method full).

    python benchmarks/gpu_train_step.py [--method lora|full] --family sdxl|flux|sd3 [sdxl|flux|sd3 ...] [--steps 20]
        [--resolution 1024] [--compile] [--sync_debug] [--profile DIR]

FLUX: the FLUX.1 dev transformer (random weights), 1024x1024, batch 1, LoRA dim 16 alpha 16, AdamW, gradient
checkpointing, cached latents and text outputs, in four configurations: bf16, --fp8_base, --blocks_to_swap 18,
--cpu_offload_checkpointing.

SD3: the SD3.5 Large and SD3.5 Medium MMDiTs (random weights), 1024x1024, batch 1, LoRA dim 16 alpha 16
(networks.lora_sd3's default targets), AdamW, gradient checkpointing, --weighting_scheme logit_normal, cached latents
and text outputs (CLIP-L + CLIP-G + 256 T5 tokens), each in three configurations: bf16, --fp8_base, --blocks_to_swap
(20 of Large's 38 joint blocks, 12 of Medium's 24).

SDXL: the real SDXL base U-Net (diffusers class, random weights) on the GPU, 1024x1024, batch 1, bf16 mixed precision,
LoRA dim 32 alpha 16 on the U-Net, AdamW, cached latents and text-encoder outputs (random tensors of the real
shapes), run through the trainer's own step (kiln.trainer.batch_loss: latent sampling, noise, the family's loss with
the U-Net call, backward, clipping, optimizer step) with and without gradient checkpointing. Prints the median seconds
per step over steps 6..N and the peak allocated memory. Needs a CUDA GPU.

The optimizer is kiln's (library.optimizers.make_optimizer: AdamW, fused on CUDA). --compile adds the same
configurations with --torch_compile (the denoiser's repeated blocks compiled with inductor; the first steps compile).
--sync_debug makes every host synchronisation inside the timed steps print a warning with its stack (there should be
one per step: reading the loss). --profile DIR writes a torch.profiler trace of steps 6..8 of each configuration and
prints the 25 most expensive operators (GPU time).

--method full: whole-model training through kiln's full fine-tuning method (library.method_full.FullMethod: its
parameter groups, its make_optimizer, i.e. ChunkedOptimizer stepping each weight inside backward with
--fused_backward_pass and rounding bf16 weights stochastically with --full_bf16; the models placed by the family in
the method's dtype) and the trainer's batch_loss; 1024x1024, batch 1, gradient checkpointing, cached latents and text
outputs. SDXL (the whole U-Net): AdamW8bit and Adafactor (relative_step=False, scale_parameter=False,
warmup_init=False), each with --fused_backward_pass --full_bf16 --mixed_precision bf16, and Adafactor with
--fused_backward_pass in float32 (--mixed_precision no), the setting of sd-scripts' published "about 17 GB" figure.
FLUX.1 dev (the whole transformer): Adafactor, --fused_backward_pass --full_bf16 --mixed_precision bf16 and
--blocks_to_swap 35 where kiln's full fine-tuning accepts block swap (until then without it, saying so). Each
configuration prints the sd-scripts flags it mirrors under its figures.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402


def training_args(family, method=None, **overrides) -> argparse.Namespace:
    """The training script's defaults (the parser of the script for `family` and `method`: LoRA training by default),
    as a user would get them, plus the benchmark's settings."""
    from library.train_script import training_parser

    args = training_parser(family, "benchmark", method).parse_args([])
    for k, v in overrides.items():
        setattr(args, k, v)
    return args


@dataclass
class Trained:
    """What a configuration trains and how the trainer steps it."""

    params: list  # the optimizer's parameters
    optimizer: torch.optim.Optimizer
    clip: bool  # the trainer clips them (globally) before the step; not when the optimizer clips inside backward


def _adapter_training(args, network) -> Trained:
    """The network's parameters under kiln's optimizer (library.optimizers.make_optimizer: AdamW, fused on CUDA)."""
    from library.optimizers import make_optimizer

    params = list(network.parameters())
    for p in params:
        p.requires_grad_(True)
    _, _, optimizer = make_optimizer(args, [{"params": params}])
    return Trained(params, optimizer, clip=True)


def bench_sdxl(steps: int, resolution: int, checkpointing: bool, smoke: bool = False, compiled: bool = False, **options) -> tuple[float, float]:
    """(median seconds per step over steps 6..N, peak allocated GiB). smoke: the tiny SDXL on CPU (tests this code)."""
    from library.family import TrainModels
    from library.family_sdxl import SdxlFamily
    from library.sdxl_models import sdxl_unet_lora_name_map
    from networks.lora import create_network

    family = SdxlFamily()
    args = training_args(family, mixed_precision="bf16", network_dim=32, network_alpha=16, network_train_unet_only=True,
                         gradient_checkpointing=checkpointing, learning_rate=1e-4, max_grad_norm=1.0)
    dtype = torch.float32 if smoke else torch.bfloat16  # bf16 matmuls are slow on most CPUs
    accelerator = _accelerator("no" if smoke else "bf16", smoke)
    device = accelerator.device
    unet, batch = _sdxl_unet_and_batch(args, family, smoke, resolution, device, dtype)
    models = TrainModels([], [], torch.nn.Identity(), unet)
    network = create_network(1.0, 32, 16, [], unet, unet_name_map=sdxl_unet_lora_name_map(unet), te_prefixes=[])
    network.apply_to(False, True)
    network.to(device, torch.float32)
    return _time_steps(args, family, models, _adapter_training(args, network), batch, accelerator, steps, dtype, compiled, **options)


def _sdxl_unet_and_batch(args, family, smoke: bool, resolution: int, device, dtype) -> tuple[torch.nn.Module, dict]:
    """The SDXL base U-Net (diffusers class, its own random initialisation; the tiny one with smoke) frozen on the
    device in `dtype`, gradient checkpointing as args say, and a batch of cached latents and text-encoder outputs
    (random tensors of the real shapes)."""
    from diffusers import UNet2DConditionModel

    from library.sdxl_models import reference_config
    from library.tiny_models import TINY_SDXL_TE2_WIDTH, tiny_sdxl_unet_config

    torch.manual_seed(0)
    config = tiny_sdxl_unet_config() if smoke else reference_config("unet")
    with torch.device(device):
        unet = UNet2DConditionModel(**{k: v for k, v in config.items() if not k.startswith("_")})
    unet.to(dtype).requires_grad_(False)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing(family.gradient_checkpointing_func(args))
    unet.train()
    te2_width = TINY_SDXL_TE2_WIDTH if smoke else 1280  # the second (bigG) encoder's; the first's is the rest
    te_widths = (config["cross_attention_dim"] - te2_width, te2_width)
    pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
    h = w = resolution // 8
    batch = _common_batch(resolution, 4, h, w)
    batch["text_outputs"] = {
        "hidden_state1": torch.randn(1, 77, te_widths[0], device=device, dtype=dtype),
        "hidden_state2": torch.randn(1, 77, te_widths[1], device=device, dtype=dtype),
        "pool2": torch.randn(1, pooled, device=device, dtype=dtype),
    }
    return unet, batch


# FLUX.1 dev's transformer (diffusers FluxTransformer2DModel config; facts about the published model)
FLUX_DEV_TRANSFORMER = {
    "patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128,
    "num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768, "guidance_embeds": True,
    "axes_dims_rope": (16, 56, 56),
}


def bench_flux(steps: int, resolution: int, mode: str, smoke: bool = False, compiled: bool = False, **options) -> tuple[float, float]:
    """FLUX.1 dev LoRA dim 16 alpha 16 on the transformer, gradient checkpointing; mode: bf16, fp8_base, blocks_to_swap
    or cpu_offload_checkpointing."""
    from library.family import TrainModels
    from library.family_flux import FluxFamily
    from networks.lora_flux import create_network

    family = FluxFamily()
    dtype = torch.float32 if smoke else torch.bfloat16
    args = training_args(family, mixed_precision="no" if smoke else "bf16", network_dim=16, network_alpha=16, network_train_unet_only=True,
                         gradient_checkpointing=True, learning_rate=1e-4, max_grad_norm=1.0, timestep_sampling="flux_shift",
                         model_prediction_type="raw", guidance_scale=1.0, fp8_base=mode == "fp8_base",
                         blocks_to_swap=(2 if smoke else 18) if mode == "blocks_to_swap" else None,
                         cpu_offload_checkpointing=mode == "cpu_offload_checkpointing")
    accelerator = _accelerator(args.mixed_precision, smoke)
    device = accelerator.device
    transformer, batch = _flux_transformer_and_batch(args, family, smoke, resolution, device, dtype)
    models = TrainModels([], [], torch.nn.Identity(), transformer)
    network = _lora_on(create_network, [None, None], family, args, models, device, dtype)
    return _time_steps(args, family, models, _adapter_training(args, network), batch, accelerator, steps, dtype, compiled, **options)


def _flux_transformer_and_batch(args, family, smoke: bool, resolution: int, device, dtype) -> tuple[torch.nn.Module, dict]:
    """The FLUX.1 dev transformer (the tiny one with smoke) as _random_transformer makes it, and a batch of cached
    latents and text outputs (CLIP-L pooled, 512 T5 tokens; 16 with smoke)."""
    from diffusers import FluxTransformer2DModel

    from library.tiny_models import tiny_flux_transformer_config

    config = tiny_flux_transformer_config() if smoke else FLUX_DEV_TRANSFORMER
    transformer = _random_transformer(FluxTransformer2DModel, config, family, args, device, dtype)
    h = w = resolution // 8
    t5_len = 16 if smoke else 512
    batch = _common_batch(resolution, 16, h, w)
    batch["text_outputs"] = {"l_pooled": torch.randn(1, config["pooled_projection_dim"], device=device, dtype=dtype),
                             "t5_out": torch.randn(1, t5_len, config["joint_attention_dim"], device=device, dtype=dtype),
                             "t5_attn_mask": torch.ones(1, t5_len, device=device, dtype=dtype)}
    return transformer, batch


# The SD3.5 MMDiTs (diffusers SD3Transformer2DModel configs of the published models: 64-wide heads, one per 64
# channels of width, qk RMS norm; 3.5 Medium's first 13 layers have the second "MMDiT-X" attention)
SD35_TRANSFORMERS = {
    "sd3.5-large": {
        "sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 38,
        "attention_head_dim": 64, "num_attention_heads": 38, "caption_projection_dim": 2432, "joint_attention_dim": 4096,
        "pooled_projection_dim": 2048, "pos_embed_max_size": 192, "dual_attention_layers": (), "qk_norm": "rms_norm",
    },
    "sd3.5-medium": {
        "sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 24,
        "attention_head_dim": 64, "num_attention_heads": 24, "caption_projection_dim": 1536, "joint_attention_dim": 4096,
        "pooled_projection_dim": 2048, "pos_embed_max_size": 384, "dual_attention_layers": tuple(range(13)),
        "qk_norm": "rms_norm",
    },
}  # fmt: skip
SD3_NAMES = {"sd3.5-large": "SD3.5 Large", "sd3.5-medium": "SD3.5 Medium"}
SD3_BLOCKS_TO_SWAP = {"sd3.5-large": 20, "sd3.5-medium": 12}  # of 38 and 24 joint blocks
SD3_CLIP_L_WIDTH = 768  # the pooled vector is CLIP-L's 768 + CLIP-G's 1280


def bench_sd3(steps: int, resolution: int, config: tuple[str, str], smoke: bool = False, compiled: bool = False, **options) -> tuple[float, float]:
    """SD3.5 (config: (variant, mode)) LoRA dim 16 alpha 16 on the MMDiT, gradient checkpointing, logit_normal
    timesteps; mode: bf16, fp8_base or blocks_to_swap. smoke: the tiny layout of the variant on CPU."""
    from diffusers import SD3Transformer2DModel

    from library.family import TrainModels
    from library.family_sd3 import Sd3Family, mark_repeated_blocks
    from library.sd3_models import TINY_SD3_CLIP_L_WIDTH, tiny_sd3_transformer_config
    from library.strategy_sd3 import CLIP_MAX_LENGTH, DEFAULT_T5_MAX_LENGTH
    from networks.lora_sd3 import create_network

    variant, mode = config
    family = Sd3Family()
    dtype = torch.float32 if smoke else torch.bfloat16
    swap = (1 if smoke else SD3_BLOCKS_TO_SWAP[variant]) if mode == "blocks_to_swap" else None  # the tiny layouts have 3 blocks
    t5_len = 16 if smoke else DEFAULT_T5_MAX_LENGTH
    args = training_args(family, mixed_precision="no" if smoke else "bf16", network_dim=16, network_alpha=16, network_train_unet_only=True,
                         gradient_checkpointing=True, learning_rate=1e-4, max_grad_norm=1.0, weighting_scheme="logit_normal",
                         t5xxl_max_token_length=t5_len, fp8_base=mode == "fp8_base", blocks_to_swap=swap)
    accelerator = _accelerator(args.mixed_precision, smoke)
    device = accelerator.device
    mmdit = tiny_sd3_transformer_config(variant) if smoke else SD35_TRANSFORMERS[variant]
    transformer = mark_repeated_blocks(_random_transformer(SD3Transformer2DModel, mmdit, family, args, device, dtype))
    models = TrainModels([], [None, None, None], torch.nn.Identity(), transformer)  # cached text: no tokenizer runs
    network = _lora_on(create_network, [None, None, None], family, args, models, device, dtype)
    h = w = resolution // 8
    l_width = TINY_SD3_CLIP_L_WIDTH if smoke else SD3_CLIP_L_WIDTH
    g_width, t5_width = mmdit["pooled_projection_dim"] - l_width, mmdit["joint_attention_dim"]
    batch = _common_batch(resolution, 16, h, w)

    def rand(*shape):
        return torch.randn(1, *shape, device=device, dtype=dtype)

    def ones(length):
        return torch.ones(1, length, device=device, dtype=dtype)

    batch["text_outputs"] = {
        "l_out": rand(CLIP_MAX_LENGTH, l_width), "g_out": rand(CLIP_MAX_LENGTH, g_width), "t5_out": rand(t5_len, t5_width),
        "l_pooled": rand(l_width), "g_pooled": rand(g_width),
        "l_attn_mask": ones(CLIP_MAX_LENGTH), "g_attn_mask": ones(CLIP_MAX_LENGTH), "t5_attn_mask": ones(t5_len),
    }  # fmt: skip
    return _time_steps(args, family, models, _adapter_training(args, network), batch, accelerator, steps, dtype, compiled, **options)


# --- full fine-tuning (--method full) --------------------------------------------------------------------------------

ADAFACTOR_FIXED_LR = ["relative_step=False", "scale_parameter=False", "warmup_init=False"]  # sd-scripts' fused Adafactor
FLUX_FULL_BLOCKS_TO_SWAP = 35  # of kiln's 57 FLUX blocks (counted one by one)


@dataclass(frozen=True)
class FullConfig:
    """A full fine-tuning configuration: the family ("sdxl" or "flux"), the training flags it sets besides the shared
    ones (1024x1024, batch 1, --gradient_checkpointing, cached latents and text outputs), and what it mirrors."""

    label: str
    family: str
    flags: dict
    mirrors: str
    notes: tuple[str, ...] = ()


def full_configs(family_name: str, smoke: bool) -> list[FullConfig]:
    """The full fine-tuning configurations of a family. FLUX gets --blocks_to_swap only where kiln's full fine-tuning
    accepts it (library/method_full.py refused it at first): otherwise it runs without, and says the figure is owed."""
    adafactor = {"optimizer_type": "AdaFactor", "optimizer_args": ADAFACTOR_FIXED_LR}
    bf16 = {"fused_backward_pass": True, "full_bf16": True, "mixed_precision": "bf16"}
    adafactor_flags = "--optimizer_type adafactor --optimizer_args " + " ".join(ADAFACTOR_FIXED_LR)
    bf16_flags = "--fused_backward_pass --full_bf16 --mixed_precision bf16 --gradient_checkpointing"
    if family_name == "sdxl":
        return [
            FullConfig("SDXL full, AdamW8bit, fused backward, full_bf16", "sdxl", {"optimizer_type": "AdamW8bit", **bf16},
                       f"sdxl_train.py --optimizer_type AdamW8bit {bf16_flags} (kiln only: sd-scripts' "
                       "--fused_backward_pass takes Adafactor alone)"),
            FullConfig("SDXL full, Adafactor, fused backward, full_bf16", "sdxl", {**adafactor, **bf16},
                       f"sdxl_train.py {adafactor_flags} {bf16_flags} (sd-scripts: --full_bf16 needs less than its "
                       "fp32 figure of about 17 GB)"),
            FullConfig("SDXL full, Adafactor, fused backward, fp32", "sdxl",
                       {**adafactor, "fused_backward_pass": True, "mixed_precision": "no"},
                       f"sdxl_train.py {adafactor_flags} --fused_backward_pass --mixed_precision no: sd-scripts' "
                       "published 'about 17GB with a batch size of 1 and fp32' (no --full_bf16; resolution and "
                       "checkpointing not stated there: here 1024x1024 and --gradient_checkpointing)"),
        ]  # fmt: skip
    if family_name == "flux":
        swap = 2 if smoke else FLUX_FULL_BLOCKS_TO_SWAP  # the tiny FLUX has 4 blocks
        flags = {**adafactor, **bf16, "max_grad_norm": 0.0, "timestep_sampling": "shift", "discrete_flow_shift": 3.1582,
                 "model_prediction_type": "raw", "guidance_scale": 1.0}  # fmt: skip
        mirrors = (
            f"flux_train.py {adafactor_flags} {bf16_flags} --max_grad_norm 0.0 --timestep_sampling shift "
            "--discrete_flow_shift 3.1582 --model_prediction_type raw --guidance_scale 1.0 (sd-scripts' README "
            "fine-tuning command, there with --blocks_to_swap 8 for 24 GB cards)"
        )
        label = "FLUX.1 dev full, Adafactor, fused backward, full_bf16"
        family, method, _ = _full_method("flux")
        problems = method.argument_problems(_full_args(family, method, {**flags, "blocks_to_swap": swap}), family)
        refusal = next((p for p in problems if "--blocks_to_swap" in p), None)
        if refusal is None:
            swapped = (f"; --blocks_to_swap {swap}: kiln's count, the last {swap} transformer blocks (FLUX.1 dev: 19 double, "
                       "then 38 single; sd-scripts' N swaps N//2 double and 2*(N - N//2) single blocks)")  # fmt: skip
            return [FullConfig(f"{label}, blocks_to_swap {swap}", "flux", {**flags, "blocks_to_swap": swap}, mirrors + swapped)]
        note = f"--blocks_to_swap {swap}: figure outstanding, kiln's full fine-tuning refuses it so far ({refusal})"
        return [FullConfig(f"{label}, no block swap", "flux", flags, mirrors, (note,))]
    raise ValueError(f"--method full has no {family_name} configurations (sdxl, flux)")


def bench_full(steps: int, resolution: int, config: FullConfig, smoke: bool = False, compiled: bool = False, **options) -> tuple[float, float]:
    """A full fine-tune of the whole SDXL U-Net or FLUX.1 dev transformer as the trainer sets it up: FullMethod builds,
    the family places the denoiser in the method's dtype (bf16 with --full_bf16), the method's parameter groups are made
    trainable and its make_optimizer builds the optimizer (ChunkedOptimizer with per-weight steps hooked into backward
    for --fused_backward_pass). smoke: the tiny model on CPU with the same flags (bf16 there too)."""
    from library.family import TrainModels, working_dtype

    family, method, build = _full_method(config.family)
    args = _full_args(family, method, config.flags)
    problems = method.argument_problems(args, family)
    if problems:
        raise ValueError(f"{config.label}: " + "; ".join(problems))
    accelerator = _accelerator(args.mixed_precision, smoke)
    device, dtype = accelerator.device, working_dtype(args.mixed_precision)
    denoiser, batch = build(args, family, smoke, resolution, device, dtype)
    models = TrainModels([], [], torch.nn.Identity(), denoiser)  # cached text: no tokenizer runs
    method.build(args, family, models)
    family.place_models(args, models, device, dtype, method.trained_modules(), method.trained_dtype(args))
    method.to_device(device, dtype)
    trained = _full_training(args, method)
    try:
        return _time_steps(args, family, models, trained, batch, accelerator, steps, dtype, compiled, **options)
    finally:
        # torch keeps a tensor's hooks from C++: the weights, their fused-step hooks and the ChunkedOptimizer form a
        # cycle Python's gc cannot see, which would keep this configuration's weights and states for the next one
        hooks = getattr(trained.optimizer, "_hooks", None)  # the FusedHooks of ChunkedOptimizer.fuse_into_backward
        if hooks is not None:
            hooks.remove()


def _full_method(family_name: str) -> tuple:
    """(the family, the FullMethod of its fine-tuning script, the builder of its denoiser and batch)."""
    from library.method_full import FLUX, SDXL, FullMethod

    if family_name == "sdxl":
        from library.family_sdxl import SdxlFamily

        return SdxlFamily(), FullMethod(SDXL), _sdxl_unet_and_batch
    from library.family_flux import FluxFamily

    return FluxFamily(), FullMethod(FLUX), _flux_transformer_and_batch


def _full_args(family, method, flags: dict) -> argparse.Namespace:
    """The script's defaults with --gradient_checkpointing, a learning rate (a fine-tune's; the speed does not depend
    on it) and the configuration's flags."""
    return training_args(family, method, gradient_checkpointing=True, learning_rate=1e-6, **flags)


def _full_training(args, method) -> Trained:
    """As the trainer sets up the optimizer: the method's groups trainable, its optimizer over its optimizer groups;
    no clipping by the trainer when the optimizer clips inside backward (fused steps)."""
    groups, _ = method.param_groups(args)
    for g in groups:
        for p in g["params"]:
            p.requires_grad_(True)
    optimizer_groups = method.optimizer_groups(groups)
    _, _, optimizer = method.make_optimizer(args, optimizer_groups)
    return Trained([p for g in optimizer_groups for p in g["params"]], optimizer, clip=not method.clips_in_backward)


def _random_transformer(cls, config: dict, family, args, device, dtype) -> torch.nn.Module:
    """A frozen diffusers transformer of `config` with random weights, as the trainer holds it: built on the meta
    device (no memory until placed), then materialised in `dtype` on the device (in host memory with
    --blocks_to_swap: the family places it, the swapped blocks stay there), gradient checkpointing
    (--cpu_offload_checkpointing's function when set), Linear weights in float8 with --fp8_base."""
    build_on = "cpu" if getattr(args, "blocks_to_swap", None) else device
    with torch.device("meta"):
        transformer = cls(**config)
    transformer = transformer.to(dtype).to_empty(device=build_on)  # no float32 copy of a 12B model first
    with torch.no_grad():
        for t in (*transformer.parameters(), *transformer.buffers()):  # to_empty leaves buffers uninitialised too
            if t.is_floating_point():
                t.normal_(0.0, 0.02)
    transformer.requires_grad_(False)
    transformer.enable_gradient_checkpointing(family.gradient_checkpointing_func(args))
    transformer.train()
    if getattr(args, "fp8_base", False):
        from library.fp8_utils import store_linear_weights_fp8

        store_linear_weights_fp8(transformer, compute_dtype=dtype)
    return transformer


def _lora_on(create_network, text_encoders: list, family, args, models, device, dtype):
    """The family's LoRA network (dim 16, alpha 16) applied to the denoiser only, the models placed by the family."""
    network = create_network(1.0, 16, 16, text_encoders, models.denoiser)
    network.apply_to(False, True)
    family.place_models(args, models, device, dtype)
    network.to(device, torch.float32)
    return network


def _accelerator(mixed_precision: str, cpu: bool):
    """A fresh Accelerator: accelerate keeps one state per process, and configurations of one run differ in precision."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()  # the device and process state (PartialState) stay
    return Accelerator(mixed_precision=mixed_precision, cpu=cpu)


def _common_batch(resolution: int, channels: int, h: int, w: int) -> dict:
    return {
        "latents_mean": torch.randn(1, channels, h, w),
        "latents_std": torch.full((1, channels, h, w), 0.01),
        "captions": ["benchmark"],
        "original_sizes_hw": torch.tensor([[resolution, resolution]]),
        "crop_top_lefts": torch.tensor([[0, 0]]),
        "target_sizes_hw": torch.tensor([[resolution, resolution]]),
        "loss_weights": torch.ones(1),
        "loss_scales": torch.ones(1),
        "positions": torch.zeros(1, dtype=torch.long),
        "alpha_masks": None,
    }


def _time_steps(
    args, family, models, trained: Trained, batch, accelerator, steps: int, dtype, compiled: bool = False,
    sync_debug: bool = False, profile_dir: str | None = None, label: str = "run",
) -> tuple[float, float]:
    """Run `steps` training steps through kiln's step function; (median s/step over steps 6..N, peak allocated GiB).
    A step is timed as the trainer runs it: forward and backward (with fused steps the optimizer steps each weight in
    there), clipping unless the optimizer clipped inside backward, the optimizer step, all queued without waiting,
    then the loss read (its one synchronisation). compiled: the denoiser's repeated blocks compiled with inductor
    first, as --torch_compile does."""
    from library.trainer import batch_loss, compile_repeated_blocks, tune_backends

    device = accelerator.device
    tune_backends(device)
    if compiled:
        compile_repeated_blocks(models.denoiser, "inductor")
    optimizer = accelerator.prepare(trained.optimizer)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    profiler = None
    for step in range(steps):
        batch["batch_number"] = step
        if step == 5 and cuda and sync_debug:
            torch.cuda.set_sync_debug_mode("warn")
        if step == 5 and profile_dir:
            profiler = torch.profiler.profile(record_shapes=False, with_stack=False)
            profiler.__enter__()
        t0 = time.perf_counter()
        loss, logged = batch_loss(args, family, models, batch, 0, device, dtype, False, accelerator)
        accelerator.backward(loss)
        if trained.clip and args.max_grad_norm:
            accelerator.clip_grad_norm_(trained.params, args.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        logged.tolist()  # the host reads the loss once a step, as the trainer does
        times.append(time.perf_counter() - t0)
        if profiler is not None and step == 7:
            profiler.__exit__(None, None, None)
            _report_profile(profiler, profile_dir, label, cuda)
            profiler = None
    if cuda:
        torch.cuda.set_sync_debug_mode("default")
    timed = times[5:] or times  # a smoke run of fewer steps times them all
    return statistics.median(timed), (torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0)


def _report_profile(profiler, profile_dir: str, label: str, cuda: bool) -> None:
    os.makedirs(profile_dir, exist_ok=True)
    name = "".join(c if c.isalnum() else "_" for c in label)
    profiler.export_chrome_trace(os.path.join(profile_dir, f"{name}.json"))
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    print(f"--- profile of {label} (steps 6..8), by {sort} ---")
    print(profiler.key_averages().table(sort_by=sort, row_limit=25))


def lora_configs(family_name: str) -> list[tuple]:
    """(label, bench function, its configuration) of the LoRA configurations of a family."""
    if family_name == "sdxl":
        return [(f"LoRA 32/16, checkpointing {c}", bench_sdxl, c) for c in (True, False)]
    if family_name == "flux":
        modes = ("bf16", "fp8_base", "blocks_to_swap", "cpu_offload_checkpointing")
        return [(f"LoRA 16/16, checkpointing, {m}", bench_flux, m) for m in modes]
    return [(f"{SD3_NAMES[v]}, LoRA 16/16, checkpointing, {m}", bench_sd3, (v, m))
            for v in SD35_TRANSFORMERS for m in ("bf16", "fp8_base", "blocks_to_swap")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", choices=["lora", "full"], default="lora", help="LoRA training or full fine-tuning")
    parser.add_argument("--family", choices=["sdxl", "flux", "sd3"], nargs="+", default=["sdxl"],
                        help="one or more families, run one after the other in this process")
    parser.add_argument(
        "--steps", type=int, default=None, help="steps per configuration (the median is over steps 6..N; default 20, 8 with --smoke)"
    )
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--compile", action="store_true", help="also run each configuration with --torch_compile (inductor)")
    parser.add_argument("--sync_debug", action="store_true", help="warn at every host synchronisation in steps 6..N")
    parser.add_argument("--profile", type=str, default=None, metavar="DIR", help="profile steps 6..8: trace files and a table")
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU: checks the benchmark code, measures nothing useful")
    args = parser.parse_args()
    families = list(dict.fromkeys(args.family))
    if args.method == "full" and "sd3" in families:
        parser.error("--method full has configurations for --family sdxl and flux only")
    if args.smoke:
        steps, resolution, smoke = args.steps or 8, 64, True
    elif not torch.cuda.is_available():
        sys.exit("this benchmark needs a CUDA GPU")
    else:
        steps, resolution, smoke = args.steps or 20, args.resolution, False
        what = "full fine-tuning, gradient checkpointing" if args.method == "full" else "LoRA, bf16, AdamW"
        print(f"GPU: {torch.cuda.get_device_name()}; {', '.join(families)}, {what}, {resolution}x{resolution}, batch 1, cached latents/text")
    configs = []
    for family_name in families:
        if args.method == "full":
            configs += [(c.label, bench_full, c) for c in full_configs(family_name, smoke)]
        else:
            configs += lora_configs(family_name)
    runs = [(label, fn, config, False) for label, fn, config in configs]
    if args.compile:
        runs += [(label + ", compiled", fn, config, True) for label, fn, config in configs]
    for label, fn, config, compiled in runs:
        label = ("smoke " if smoke else "") + label
        sec, mem = fn(steps, resolution, config, smoke=smoke, compiled=compiled, sync_debug=args.sync_debug,
                      profile_dir=args.profile, label=label)
        print(f"{label:60s} {sec:.3f} s/step  peak {mem:.2f} GiB")
        if isinstance(config, FullConfig):
            for line in (f"mirrors {config.mirrors}", *config.notes):
                print(f"    {line}")
        gc.collect()  # what reference cycles hold of this configuration goes before the next one measures its peak
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
