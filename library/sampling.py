"""Preview images during training: the machinery every family's sampler shares.

sd-scripts' sampler names as diffusers schedulers (`make_scheduler`), and `sample_with_pipeline`, the loop that runs a
diffusers pipeline on the models being trained, one image per prompt. Each family builds its own pipeline and prompt
embeddings (from the trainer's own text encoding, so clip skip and long prompts match training) in its family module's
`sample_images`. Sampling leaves the training run exactly as it was: models in their train/eval modes and on their
devices, and the random number generators (torch's CPU and CUDA generators, Python's and NumPy's) in their previous
states, so a run with sampling draws the same random numbers as a run without.
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

# Values of the released models' scheduler configs, used when the given config leaves them out (a DDPMScheduler config
# does): otherwise DDIM would set alpha to one at the last step and PNDM would run its PRK warm-up steps.
_SCHEDULER_FALLBACKS = {"clip_sample": False, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1}


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
    for k, v in _SCHEDULER_FALLBACKS.items():
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


def sample_with_pipeline(
    make_pipe: Callable[[Any], Any],
    embed_kwargs: Callable[[SamplePrompt], dict],
    modules: Sequence[torch.nn.Module | None],
    scheduler_config: Mapping[str, Any] | Callable[[str], Any],
    prompts: Sequence[SamplePrompt],
    output_dir: str,
    output_name: str | None,
    step: int | None,
    epoch: int | None,
    device: torch.device | str,
    dtype: torch.dtype,
    default_sampler: str,
    v_prediction: bool,
    check_prompts: Callable[[Sequence[SamplePrompt], str], None] | None = None,
) -> list[str]:
    """The loop shared by the families: one image per prompt, seeded, written atomically, RNG and modes restored.

    `make_pipe(scheduler)` builds the family's diffusers pipeline on the trained models; `embed_kwargs(prompt)` gives
    its prompt-embedding arguments (and may set `guidance_scale`, which defaults to the prompt's `--l` scale).
    `modules` are the models to put in eval mode on `device` meanwhile. `scheduler_config` is a noise-schedule config
    (each prompt gets `make_scheduler(--ss or default_sampler, scheduler_config, v_prediction)`) or a function of the
    sampler name returning a scheduler. `check_prompts(prompts, default_sampler)`, if given, raises before the first
    image for prompts the family cannot honour.

    Images are denoised under autocast in `dtype` (unless float32) on `device`; the initial noise comes from a CPU
    torch.Generator seeded with the prompt's seed (a fresh random one when None), so a seed gives the same image on any
    device. The seed used is in the file name (see `sample_image_path`). Returns the paths of the PNGs written.
    """
    device = torch.device(device)
    if epoch is None and step is None:
        raise ValueError("sampling needs the step or the epoch (for the image names)")
    if check_prompts is not None:
        check_prompts(prompts, default_sampler)
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
