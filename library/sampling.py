"""Preview images during training: sd-scripts' sampler names as diffusers schedulers, and SD1/2 sampling.

`sample_sd_images` runs diffusers' StableDiffusionPipeline on the models being trained, with prompt embeddings from
the trainer's own text encoding (so clip skip and long prompts match training). Sampling leaves the training run
exactly as it was: models in their train/eval modes and on their devices, and the random number generators (torch's
CPU and CUDA generators, Python's and NumPy's) in their previous states, so a run with sampling draws the same random
numbers as a run without.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import secrets
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from library.sample_prompts import SAMPLER_NAMES, SamplePrompt, sample_image_path

logger = logging.getLogger(__name__)

# sampler name -> (diffusers scheduler class, extra config). k_* names are sd-scripts' aliases of the plain ones.
SAMPLERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm_2": ("KDPM2DiscreteScheduler", {}),
    "dpm_2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    # diffusers allows the original DPM-Solver only with a final sigma of sigma_min (and marks it deprecated).
    "dpmsolver": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}),
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpmsingle": ("DPMSolverSinglestepScheduler", {"lower_order_final": True}),
}
SAMPLERS.update({f"k_{name}": SAMPLERS[name] for name in ("lms", "euler", "euler_a", "dpm_2", "dpm_2_a")})
assert set(SAMPLERS) == set(SAMPLER_NAMES), "library.sample_prompts.SAMPLER_NAMES and SAMPLERS disagree"

# Values of the released SD 1.x/2.x scheduler configs, used when the given config leaves them out (a DDPMScheduler
# config does): otherwise DDIM would set alpha to one at the last step and PNDM would run its PRK warm-up steps.
_SD_SCHEDULER_FALLBACKS = {"clip_sample": False, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1}


def make_scheduler(name: str, scheduler_config: Mapping[str, Any], v_prediction: bool):
    """A fresh diffusers scheduler for sampler `name` built from the model's noise-schedule config.

    `prediction_type` is "v_prediction" or "epsilon" as `v_prediction` says, whatever the config holds. Unknown names
    raise ValueError listing the valid ones.
    """
    import diffusers

    key = str(name).strip().lower()
    if key not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; valid samplers: {', '.join(SAMPLER_NAMES)}")
    class_name, extra = SAMPLERS[key]
    config = {k: v for k, v in dict(scheduler_config).items() if not k.startswith("_")}
    for k, v in _SD_SCHEDULER_FALLBACKS.items():
        config.setdefault(k, v)
    config.update(extra)
    config["prediction_type"] = "v_prediction" if v_prediction else "epsilon"
    with warnings.catch_warnings():
        # The deprecation notice of algorithm_type "dpmsolver" would otherwise repeat for every sample image.
        warnings.filterwarnings("ignore", message=r".*algorithm_type.* dpmsolver .*deprecated", category=FutureWarning)
        return getattr(diffusers, class_name).from_config(config)


# ---------------------------------------------------------------------------------------------------------------------
# Leave-no-trace helpers.


@contextlib.contextmanager
def preserved_rng_state() -> Iterator[None]:
    """Restore torch's CPU and CUDA generators, Python's `random` and NumPy's global generator on exit."""
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    py = random.getstate()
    npy = np.random.get_state()
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        random.setstate(py)
        np.random.set_state(npy)


@contextlib.contextmanager
def eval_mode(*models: torch.nn.Module | None) -> Iterator[None]:
    """Put the models in eval mode and restore each submodule's own training flag on exit."""
    saved = [(m, m.training) for model in models if model is not None for m in model.modules()]
    try:
        for model in models:
            if model is not None:
                model.eval()
        yield
    finally:
        for m, training in saved:
            m.training = training


@contextlib.contextmanager
def on_device(device: torch.device, *models: torch.nn.Module | None) -> Iterator[None]:
    """Move models that lie wholly on another device to `device`, and move them back on exit.

    Models spread over several devices (offloading, block swap) are left where they are.
    """
    moved = []
    try:
        for model in models:
            if model is None:
                continue
            devices = {p.device for p in model.parameters()} | {b.device for b in model.buffers()}
            if len(devices) == 1 and next(iter(devices)) != device:
                original = next(iter(devices))
                model.to(device)
                moved.append((model, original))
        yield
    finally:
        for model, original in moved:
            model.to(original)


def _save_png_atomic(image, path: str) -> None:
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        image.save(tmp, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


# ---------------------------------------------------------------------------------------------------------------------


def _check_sd_prompts(prompts: Sequence[SamplePrompt], default_sampler: str) -> None:
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

    return _sample_with_pipeline(
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
    )


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

    return _sample_with_pipeline(
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
    )


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
            from library.flux_train_utils import joint_attention_mask

            image_tokens = (prompt.height // 16) * (prompt.width // 16)
            kwargs["joint_attention_kwargs"] = joint_attention_mask(out["mask"].to(device), image_tokens)
        if prompt.scale > 1.0:
            kwargs.update(
                {
                    "negative_prompt_embeds": embeds[1:],
                    "negative_pooled_prompt_embeds": pooled[1:],
                    "true_cfg_scale": prompt.scale,
                }
            )
        return kwargs

    return _sample_with_pipeline(
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
        check_sd_prompts=False,
    )


def _sample_with_pipeline(
    make_pipe,
    embed_kwargs,
    modules,
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
    check_sd_prompts: bool = True,
) -> list[str]:
    """The loop shared by the families: one image per prompt, seeded, written atomically, RNG and modes restored."""
    device = torch.device(device)
    if epoch is None and step is None:
        raise ValueError("sampling needs the step or the epoch (for the image names)")
    if check_sd_prompts:
        _check_sd_prompts(prompts, default_sampler)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
    paths: list[str] = []
    with preserved_rng_state(), eval_mode(*modules), on_device(device, *modules), torch.no_grad():
        schedulers = (
            scheduler_config
            if callable(scheduler_config)
            else (lambda name: make_scheduler(name, scheduler_config, v_prediction))
        )
        pipe = make_pipe(schedulers(default_sampler))
        pipe.set_progress_bar_config(disable=True)
        for p in prompts:
            pipe.scheduler = schedulers(p.sampler or default_sampler)
            # secrets draws from the OS, not from any generator the training run uses.
            seed = p.seed if p.seed is not None else secrets.randbelow(2**32)
            generator = torch.Generator("cpu").manual_seed(seed)
            with autocast:
                kwargs = {"guidance_scale": p.scale, **embed_kwargs(p)}  # a family's embed_kwargs may set the guidance
                image = pipe(
                    **kwargs, height=p.height, width=p.width, num_inference_steps=p.steps, generator=generator, output_type="pil"
                ).images[0]
            path = sample_image_path(output_dir, output_name, step, epoch, index=p.index, seed=seed)
            _save_png_atomic(image, path)
            logger.info("sample image %d: %s", p.index, path)
            paths.append(path)
    return paths
