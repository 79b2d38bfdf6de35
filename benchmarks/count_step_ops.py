"""Count the operators one LoRA training step dispatches at full model size, without a GPU and without weights.

    python benchmarks/count_step_ops.py --family sdxl|flux|sd3 [--no_checkpointing] [--top 12]

Builds the full-size SDXL U-Net (LoRA dim 32 on the U-Net), FLUX.1 dev transformer (LoRA dim 16) or, for sd3, the
SD3.5 Large and SD3.5 Medium MMDiTs (LoRA dim 16, 77 CLIP + 256 T5 tokens; one count each) on PyTorch's
meta device (shapes only, no memory, no arithmetic), runs one forward and backward at 1024x1024 and counts the ATen
operators that would launch work on a GPU (views and other metadata-only operators are left out), with and without
the LoRA network. On a GPU each such operator is at least one kernel launch plus PyTorch's dispatch overhead, so the
count is a machine-independent measure of the per-step launch overhead that compiled blocks (--torch_compile) and
fewer adapter operators remove. Attention runs the meta device's math path (a few operators more per attention than
a fused flash kernel), the same with and without LoRA.
"""

from __future__ import annotations

import argparse
import collections
import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

METADATA_ONLY = {
    "view", "_unsafe_view", "t", "transpose", "permute", "expand", "detach", "as_strided", "unsqueeze", "squeeze",
    "slice", "select", "split", "split_with_sizes", "alias", "reshape", "unbind", "chunk",
}  # fmt: skip


class OperatorCounter(TorchDispatchMode):
    """Counts the ATen operators dispatched inside it, by name, leaving out metadata-only ones."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in METADATA_ONLY:
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))


def _sdxl(with_lora: bool):
    from diffusers import UNet2DConditionModel

    from library.sdxl_models import reference_config, sdxl_unet_lora_name_map
    from networks.lora import create_network

    config = {k: v for k, v in reference_config("unet").items() if not k.startswith("_")}
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    adapters = None
    if with_lora:
        adapters = create_network(1.0, 32, 16, [], unet, unet_name_map=sdxl_unet_lora_name_map(unet), te_prefixes=[])
    pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]

    def inputs(dtype):
        return {
            "sample": torch.randn(1, 4, 128, 128, device="meta", dtype=dtype),
            "timestep": torch.tensor([500], device="meta"),
            "encoder_hidden_states": torch.randn(1, 77, config["cross_attention_dim"], device="meta", dtype=dtype),
            "added_cond_kwargs": {
                "text_embeds": torch.randn(1, pooled, device="meta", dtype=dtype),
                "time_ids": torch.randn(1, 6, device="meta", dtype=dtype),
            },
            "return_dict": False,
        }

    return unet, adapters, inputs, unet.conv_in.weight


def _flux(with_lora: bool):
    from diffusers import FluxTransformer2DModel

    from benchmarks.gpu_train_step import FLUX_DEV_TRANSFORMER
    from networks.lora_flux import create_network

    with torch.device("meta"):
        transformer = FluxTransformer2DModel(**FLUX_DEV_TRANSFORMER)
    adapters = create_network(1.0, 16, 16, [None, None], transformer) if with_lora else None

    def inputs(dtype):
        return {
            "hidden_states": torch.randn(1, 4096, 64, device="meta", dtype=dtype),
            "encoder_hidden_states": torch.randn(1, 512, 4096, device="meta", dtype=dtype),
            "pooled_projections": torch.randn(1, 768, device="meta", dtype=dtype),
            "timestep": torch.tensor([0.5], device="meta", dtype=dtype),
            "img_ids": torch.zeros(4096, 3, device="meta"),
            "txt_ids": torch.zeros(512, 3, device="meta"),
            "guidance": torch.tensor([1.0], device="meta", dtype=dtype),
            "return_dict": False,
        }

    return transformer, adapters, inputs, transformer.x_embedder.weight


def _sd3(variant: str, with_lora: bool):
    from diffusers import SD3Transformer2DModel

    from benchmarks.gpu_train_step import SD35_TRANSFORMERS
    from library.strategy_sd3 import CLIP_MAX_LENGTH, DEFAULT_T5_MAX_LENGTH
    from networks.lora_sd3 import create_network

    config = SD35_TRANSFORMERS[variant]
    with torch.device("meta"):
        transformer = SD3Transformer2DModel(**config)
    adapters = create_network(1.0, 16, 16, [None, None, None], transformer) if with_lora else None

    def inputs(dtype):
        return {
            "hidden_states": torch.randn(1, 16, 128, 128, device="meta", dtype=dtype),
            "encoder_hidden_states": torch.randn(
                1, CLIP_MAX_LENGTH + DEFAULT_T5_MAX_LENGTH, config["joint_attention_dim"], device="meta", dtype=dtype
            ),
            "pooled_projections": torch.randn(1, config["pooled_projection_dim"], device="meta", dtype=dtype),
            "timestep": torch.tensor([500.0], device="meta"),
            "return_dict": False,
        }

    return transformer, adapters, inputs, transformer.pos_embed.proj.weight


MODELS = {  # what --family counts: model name -> builder(with_lora)
    "sdxl": {"sdxl": _sdxl},
    "flux": {"flux": _flux},
    "sd3": {variant: functools.partial(_sd3, variant) for variant in ("sd3.5-large", "sd3.5-medium")},
}


def count_step(build, with_lora: bool, checkpointing: bool) -> collections.Counter:
    """Operators of one forward + backward (bf16 model, bf16 adapters) of the full-size model on the meta device;
    build: one of MODELS' builders."""
    model, adapters, inputs, input_layer = build(with_lora)
    dtype = torch.bfloat16
    model.to(dtype).requires_grad_(False)
    if checkpointing:
        model.enable_gradient_checkpointing()
    model.train()
    if adapters is None:
        trained = [input_layer]  # the whole backward runs, as with adapters (whose own operators are the difference)
    else:
        adapters.apply_to(False, True)
        adapters.to("meta", dtype)
        trained = list(adapters.parameters())
    for p in trained:
        p.requires_grad_(True)
    counter = OperatorCounter()
    with counter:
        out = model(**inputs(dtype))[0]
        out.float().square().mean().backward()
    return counter.counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=list(MODELS), default="sdxl")
    parser.add_argument("--no_checkpointing", action="store_true", help="without gradient checkpointing")
    parser.add_argument("--top", type=int, default=12, help="how many operator names to list")
    args = parser.parse_args()
    # kiln's adapters ask whether autocast is on for the input's device; the meta device has no autocast
    is_autocast_enabled = torch.is_autocast_enabled
    torch.is_autocast_enabled = lambda device=None: False if device == "meta" else is_autocast_enabled(*([device] if device else []))
    checkpointing = not args.no_checkpointing
    for name, build in MODELS[args.family].items():
        base = count_step(build, False, checkpointing)
        with_lora = count_step(build, True, checkpointing)
        total, plain = sum(with_lora.values()), sum(base.values())
        print(f"{name}, 1024x1024, batch 1, checkpointing {checkpointing}: {total} operators per step with LoRA, "
              f"{plain} without ({total - plain} for the adapters)")
        print("most frequent with LoRA: " + ", ".join(f"{k} {v}" for k, v in with_lora.most_common(args.top)))


if __name__ == "__main__":
    main()
