"""Flow matching (rectified flow) as SD3 and FLUX train it: the schedule, noise-level densities, noisy inputs, targets,
loss weights and huber ``c``, and the refusal of DDPM-only options. Family-neutral: FLUX's own pieces (latent packing,
its ``--timestep_sampling`` methods, model prediction types) are in ``library.flux_train_utils``, SD3's recipe in
``library.family_sd3``.

Pure torch functions, no training-loop state. Every random draw takes an explicit ``generator`` so that a run can be
replayed exactly; with ``generator=None`` the global CPU RNG is used. Draws happen on the generator's device (CPU
without one) and results are moved to the device of the tensors they are combined with (or ``device``).

Notation: ``x0`` = clean latents, ``eps`` = noise, ``sigma`` in [0, 1] the noise level (0 = clean, 1 = pure noise),
``T`` = 1000 training timesteps, ``timestep = sigma * T``.

Forward process: ``x_t = (1 - sigma) * x0 + sigma * eps``; the velocity ``dx_t/dsigma = eps - x0``. A model that
predicts the velocity ``v`` gives the x0 estimate ``x_t - sigma * v`` (SD3's target, see :func:`x0_from_velocity`).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from library.transfer import to_device

NUM_TRAIN_TIMESTEPS = 1000

WEIGHTING_SCHEMES = ("sigma_sqrt", "logit_normal", "mode", "cosmap", "none", "uniform")

# sd-scripts flags that only mean something for the DDPM (epsilon / v-prediction) families
DDPM_ONLY_OPTIONS = (
    "min_snr_gamma",
    "v_parameterization",
    "scale_v_pred_loss_like_noise_pred",
    "v_pred_like_loss",
    "debiased_estimation_loss",
    "zero_terminal_snr",
    "noise_offset",
    "multires_noise_iterations",
    "adaptive_noise_scale",
)


# ---------------------------------------------------------------------------------------------------------------------
# schedule


def make_noise_scheduler(shift: float = 3.0) -> FlowMatchEulerDiscreteScheduler:
    """The flow-matching schedule with shift ``s`` (FLUX's ``--discrete_flow_shift``; SD3's releases use 3): diffusers'
    ``FlowMatchEulerDiscreteScheduler`` with 1000 steps, whose discrete sigmas are ``sigma_i = s*t / (1 + (s-1)*t)``
    with ``t = (1000 - i) / 1000``, ``i = 0 .. 999`` (1 down to ``shift(0.001)``), and timesteps ``sigma_i * 1000``."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, shift=shift)


@functools.lru_cache(maxsize=16)
def _shared_scheduler(shift: float) -> FlowMatchEulerDiscreteScheduler:
    """One :func:`make_noise_scheduler` per shift for the per-step helpers (timestep sampling and huber_c run per sample
    per step). Shared, so read only here: nothing calls set_timesteps or step on it; whoever needs a scheduler to
    drive gets a fresh one from :func:`make_noise_scheduler`."""
    return make_noise_scheduler(shift)


@functools.lru_cache(maxsize=16)
def _sigma_table(shift: float, device: torch.device) -> torch.Tensor:
    """The discrete sigmas of :func:`make_noise_scheduler` (float32, on ``device``), built once per (shift, device).
    Shared, so read only: callers index it and never write to it (:func:`training_sigmas` hands out copies)."""
    return _shared_scheduler(shift).sigmas.to(device=device, dtype=torch.float32)


def training_sigmas(shift: float = 3.0) -> torch.Tensor:
    """The 1000 discrete training sigmas of :func:`make_noise_scheduler` (float32, CPU): a copy of the cached table."""
    return _sigma_table(float(shift), torch.device("cpu")).clone()


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """``s * sigma / (1 + (s - 1) * sigma)`` (identity for s = 1; s > 1 moves mass toward noise)."""
    return sigmas * shift / (1.0 + (shift - 1.0) * sigmas)


def timesteps_from_sigmas(sigmas: torch.Tensor) -> torch.Tensor:
    """The model's timestep input: ``sigma * 1000`` (float)."""
    return sigmas * NUM_TRAIN_TIMESTEPS


# ---------------------------------------------------------------------------------------------------------------------
# noise levels


def density_for_timestep_sampling(
    weighting_scheme: str,
    batch: int,
    generator: torch.Generator | None = None,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
) -> torch.Tensor:
    """``batch`` draws of ``u`` in [0, 1] (float32, on the generator's device) from the density of ``weighting_scheme``
    (SD3 paper, arXiv:2403.03206, section 3.1):

    - ``logit_normal``: ``u = sigmoid(n)``, ``n ~ N(logit_mean, logit_std^2)`` (drawn as ``logit_mean + logit_std * N(0,1)``);
    - ``mode``: ``u0 ~ U[0, 1)``, ``u = 1 - u0 - mode_scale * (cos(pi * u0 / 2)^2 - 1 + u0)``;
    - anything else (``uniform``, ``none``, ``sigma_sqrt``, ``cosmap``): ``u ~ U[0, 1)``.
    """
    draw_device = generator.device if generator is not None else torch.device("cpu")
    if weighting_scheme == "logit_normal":
        n = torch.randn((batch,), generator=generator, device=draw_device, dtype=torch.float32)
        return torch.sigmoid(n * logit_std + logit_mean)
    u = torch.rand((batch,), generator=generator, device=draw_device, dtype=torch.float32)
    if weighting_scheme == "mode":
        u = 1.0 - u - mode_scale * (torch.cos(math.pi * u / 2.0) ** 2 - 1.0 + u)
    return u


def sample_discrete_timesteps(
    batch: int,
    generator: torch.Generator | None = None,
    weighting_scheme: str = "uniform",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
    shift: float = 1.0,
    min_timestep: int | None = None,
    max_timestep: int | None = None,
) -> torch.Tensor:
    """SD3's training timesteps (sd-scripts' sd3_train_network: ``--weighting_scheme``, ``--training_shift``,
    ``--min_timestep``/``--max_timestep``): ``u`` from :func:`density_for_timestep_sampling`, shifted
    ``u' = s*u / (1 + (s-1)*u)`` (:func:`shift_sigmas`), then ``t = floor(u' * (max - min) + min)`` with min 0 and
    max 1000 by default. Returns float32 timesteps (B,) on the generator's device: integers 0 .. 1000, exactly
    representable in float32 (sd-scripts casts them to the weight dtype, which rounds those above 256 in bf16; kiln
    keeps float32). The noise level is ``t / 1000``."""
    lo = 0 if min_timestep is None else min_timestep
    hi = NUM_TRAIN_TIMESTEPS if max_timestep is None else max_timestep
    u = density_for_timestep_sampling(weighting_scheme, batch, generator, logit_mean, logit_std, mode_scale)
    u = shift_sigmas(u, shift)
    return torch.floor(u * (hi - lo) + lo).to(torch.float32)


# ---------------------------------------------------------------------------------------------------------------------
# forward process and targets


def per_sample_view(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) (or already broadcastable) ``values`` reshaped to (B, 1, ..., 1) on ``like``'s device, float32."""
    values = to_device(values, like.device, torch.float32)
    if values.ndim == 1:
        values = values.reshape(-1, *([1] * (like.ndim - 1)))
    return values


def noisy_model_input(
    latents: torch.Tensor,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    ip_noise_gamma: float | None = None,
    ip_noise_gamma_random_strength: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The model input ``x_t = (1 - sigma) * x0 + sigma * n`` (``sigmas`` (B,) broadcast per sample; computed in float32,
    returned in ``latents``' dtype).

    ``n = noise``, or with input perturbation (``ip_noise_gamma``, arXiv:2301.11706) ``n = noise + g * N(0, 1)``, where
    ``g = ip_noise_gamma`` or, with random strength, ``u * ip_noise_gamma`` with one ``u ~ U[0, 1)`` for the batch. The
    loss target still uses the unperturbed ``noise``. Draw order: [u]; perturbation noise (on the generator's device,
    CPU without one).
    """
    input_noise = noise.float()
    if ip_noise_gamma:
        draw_device = generator.device if generator is not None else torch.device("cpu")
        strength: torch.Tensor | float = ip_noise_gamma
        if ip_noise_gamma_random_strength:
            strength = to_device(torch.rand((), generator=generator, device=draw_device), latents.device) * ip_noise_gamma
        xi = torch.randn(tuple(latents.shape), generator=generator, device=draw_device, dtype=torch.float32)
        input_noise = input_noise + strength * to_device(xi, latents.device)
    s = per_sample_view(sigmas, latents)
    return ((1.0 - s) * latents.float() + s * input_noise).to(latents.dtype)


def sample_noise(x0: torch.Tensor, generators: list[torch.Generator], device) -> torch.Tensor:
    """Each sample's noise from its own generator (drawn on the host, then moved): independent of the batch."""
    shape = (1, *x0.shape[1:])
    return to_device(torch.cat([torch.randn(shape, generator=g) for g in generators]), device)


def noisy_model_inputs(args: Any, x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor, generators) -> torch.Tensor:
    """noisy_model_input per sample, each with its own generator (--ip_noise_gamma's draws)."""
    from library.family import per_sample

    return per_sample(
        noisy_model_input,
        generators,
        x0,
        noise,
        sigmas,
        ip_noise_gamma=args.ip_noise_gamma,
        ip_noise_gamma_random_strength=args.ip_noise_gamma_random_strength,
    )


def flow_matching_target(latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The flow velocity ``eps - x0`` (``noise - latents``): FLUX's loss target."""
    return noise - latents


def x0_from_velocity(velocity: torch.Tensor, noisy_input: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """The x0 estimate of a velocity prediction, ``x_t - sigma * v`` (sd-scripts writes ``v * (-sigma) + x_t``; SD3's
    model-output preconditioning), computed in float32 and returned in ``velocity``'s dtype; ``sigmas`` (B,) broadcast
    per sample. For the true velocity ``eps - x0`` it is x0 exactly (up to rounding)."""
    s = per_sample_view(sigmas, velocity)
    return (velocity.float() * (-s) + noisy_input.float()).to(velocity.dtype)


# ---------------------------------------------------------------------------------------------------------------------
# loss weights and huber c


def loss_weighting(weighting_scheme: str, sigmas: torch.Tensor) -> torch.Tensor:
    """Per-sample loss weight for ``--weighting_scheme`` (float32, same shape as ``sigmas``):

    - ``sigma_sqrt``: ``sigma^-2``, and 0 where ``sigma = 0`` (instead of a division by zero: SD3 draws t = 0 one
      time in a thousand, where its x0 residual is exactly zero since ``x_t = x0``, so the sample adds nothing either
      way, and the loss stays finite; sd-scripts gets inf * 0 = NaN there);
    - ``cosmap``: ``2 / (pi * (1 - 2 sigma + 2 sigma^2))``;
    - anything else (``uniform``, ``none``, ``logit_normal``, ``mode``): 1 (those schemes act through the sampling density).
    """
    sigmas = sigmas.float()
    if weighting_scheme == "sigma_sqrt":
        positive = sigmas > 0
        return torch.where(positive, 1.0 / torch.where(positive, sigmas, 1.0) ** 2, 0.0)
    if weighting_scheme == "cosmap":
        return 2.0 / (math.pi * (1.0 - 2.0 * sigmas + 2.0 * sigmas**2))
    return torch.ones_like(sigmas)


def huber_c(sigmas: torch.Tensor, schedule: str = "snr", huber_c: float = 0.1, huber_scale: float = 1.0) -> torch.Tensor:
    """The per-sample ``c`` of the huber / smooth_l1 losses for flow-matching noise levels ``sigmas`` (B,) (float32,
    on ``sigmas``' device):

    - ``constant`` and ``exponential``: as for DDPM (``library.sd_train_utils.huber_c``) at timestep ``sigma x 1000``;
    - ``snr``: the DDPM formula ``c = (1 - huber_c) / (1 + s)^2 + huber_c`` with ``s`` the noise-to-signal ratio of the
      noised sample. DDPM's ``s = sqrt((1 - a_t) / a_t)`` is the noise std over the signal scale; for
      ``x_t = (1 - sigma) x0 + sigma n`` it is ``sigma / (1 - sigma)``: about 1 at sigma = 0, ``huber_c`` at sigma = 1.
      (sd-scripts crashes on this, its default schedule, for FLUX.)
    """
    from library import sd_train_utils

    if schedule != "snr":
        timesteps = (sigmas * NUM_TRAIN_TIMESTEPS).long()
        return sd_train_utils.huber_c(timesteps, _shared_scheduler(3.0), schedule, huber_c, huber_scale)
    s = sigmas.double()
    ratio = s / (1.0 - s)  # inf at sigma = 1, giving c = huber_c
    return ((1.0 - huber_c) / (1.0 + ratio) ** 2 + huber_c).float()


# ---------------------------------------------------------------------------------------------------------------------
# argument checks


def refuse_ddpm_only_options(args: Any) -> None:
    """Raise ``ValueError`` naming every DDPM-only option that is set (truthy) on ``args`` (an argparse namespace or
    any object; missing attributes count as unset): ``--min_snr_gamma``, ``--v_parameterization``,
    ``--scale_v_pred_loss_like_noise_pred``, ``--v_pred_like_loss``, ``--debiased_estimation_loss``,
    ``--zero_terminal_snr``, ``--noise_offset``, ``--multires_noise_iterations``, ``--adaptive_noise_scale``. They rely on
    an SNR / alphas_cumprod schedule or epsilon noise tweaks that flow matching does not have; sd-scripts silently ignores
    them for SD3 and FLUX, kiln refuses them."""
    set_flags = [name for name in DDPM_ONLY_OPTIONS if getattr(args, name, None)]
    if set_flags:
        listed = ", ".join(f"--{name}" for name in set_flags)
        raise ValueError(
            f"{listed}: DDPM-only option(s) that mean nothing for flow-matching (SD3, FLUX) training; remove them"
            " (they would be silently ignored by sd-scripts)"
        )
