"""Seconds per training step and peak GPU memory of kiln's LoRA training step at full model size (random weights).

    python benchmarks/gpu_train_step.py --family sdxl [--steps 20] [--resolution 1024]

SDXL: the real SDXL base U-Net (diffusers class, random weights) on the GPU, 1024x1024, batch 1, bf16 mixed precision,
LoRA dim 32 alpha 16 on the U-Net, AdamW, cached latents and text-encoder outputs (random tensors of the real
shapes), run through the trainer's own step (kiln.trainer.batch_loss: latent sampling, noise, the family's loss with
the U-Net call, backward, clipping, optimizer step) with and without gradient checkpointing. Prints the median seconds
per step over steps 6..N and the peak allocated memory. Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402


def training_args(family, **overrides) -> argparse.Namespace:
    """The training scripts' defaults, as a user would get them, plus the benchmark's settings."""
    from library.train_args import setup_network_parser

    parser = setup_network_parser("benchmark")
    family.add_arguments(parser)
    args = parser.parse_args([])
    for k, v in overrides.items():
        setattr(args, k, v)
    return args


def bench_sdxl(steps: int, resolution: int, checkpointing: bool, smoke: bool = False) -> tuple[float, float]:
    """(median seconds per step over steps 6..N, peak allocated GiB). smoke: the tiny SDXL on CPU (tests this code)."""
    from accelerate import Accelerator
    from diffusers import UNet2DConditionModel

    from library.family import TrainModels
    from library.family_sdxl import SdxlFamily
    from library.sdxl_models import reference_config, sdxl_unet_lora_name_map
    from library.trainer import batch_loss
    from networks.lora import create_network

    family = SdxlFamily()
    args = training_args(family, mixed_precision="bf16", network_dim=32, network_alpha=16, network_train_unet_only=True,
                         gradient_checkpointing=checkpointing, learning_rate=1e-4, max_grad_norm=1.0)
    dtype = torch.float32 if smoke else torch.bfloat16  # bf16 matmuls are slow on most CPUs
    accelerator = Accelerator(mixed_precision="no" if smoke else "bf16", cpu=smoke)
    device = accelerator.device
    torch.manual_seed(0)
    if smoke:
        from library.tiny_models import build_tiny_sdxl

        config = dict(build_tiny_sdxl()["unet"].config)
    else:
        config = reference_config("unet")
    with torch.device(device):
        unet = UNet2DConditionModel(**{k: v for k, v in config.items() if not k.startswith("_")})
    te_widths = (config["cross_attention_dim"] - 1280, 1280) if not smoke else (64, config["cross_attention_dim"] - 64)
    pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
    unet.to(dtype).requires_grad_(False)
    if checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    models = TrainModels([], [], torch.nn.Identity(), unet)
    network = create_network(1.0, 32, 16, [], unet, unet_name_map=sdxl_unet_lora_name_map(unet), te_prefixes=[])
    network.apply_to(False, True)
    network.to(device, torch.float32)
    params = [p for p in network.parameters()]
    for p in params:
        p.requires_grad_(True)
    optimizer = accelerator.prepare(torch.optim.AdamW(params, lr=1e-4))

    h, w = resolution // 8, resolution // 8
    batch = {
        "latents_mean": torch.randn(1, 4, h, w),
        "latents_std": torch.full((1, 4, h, w), 0.01),
        "text_outputs": {
            "hidden_state1": torch.randn(1, 77, te_widths[0], device=device, dtype=dtype),
            "hidden_state2": torch.randn(1, 77, te_widths[1], device=device, dtype=dtype),
            "pool2": torch.randn(1, pooled, device=device, dtype=dtype),
        },
        "captions": ["benchmark"],
        "original_sizes_hw": torch.tensor([[resolution, resolution]]),
        "crop_top_lefts": torch.tensor([[0, 0]]),
        "target_sizes_hw": torch.tensor([[resolution, resolution]]),
        "loss_weights": torch.ones(1),
        "loss_scales": torch.ones(1),
        "positions": torch.zeros(1, dtype=torch.long),
        "alpha_masks": None,
    }
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(steps):
        batch["batch_number"] = step
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss, _ = batch_loss(args, family, models, batch, 0, device, dtype, False, accelerator)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[5:]), (torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=["sdxl"], default="sdxl")
    parser.add_argument("--steps", type=int, default=20, help="steps per configuration (the median is over steps 6..N)")
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU: checks the benchmark code, measures nothing useful")
    args = parser.parse_args()
    if args.smoke:
        sec, _ = bench_sdxl(7, 64, True, smoke=True)
        print(f"smoke run: {sec:.3f} s/step on CPU")
        return
    if not torch.cuda.is_available():
        sys.exit("this benchmark needs a CUDA GPU")
    print(f"GPU: {torch.cuda.get_device_name()}; {args.family}, {args.resolution}x{args.resolution}, batch 1, bf16, LoRA 32/16, AdamW")
    for checkpointing in (True, False):
        sec, mem = bench_sdxl(args.steps, args.resolution, checkpointing)
        label = "with gradient checkpointing" if checkpointing else "without gradient checkpointing"
        print(f"{label:32s} {sec:.3f} s/step  peak {mem:.2f} GiB")
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
