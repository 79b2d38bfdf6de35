"""Noise, timesteps, targets and losses of the DDPM-family models (SD1/2 and SDXL).

Pure torch functions, no training-loop state. Every random draw takes an explicit ``generator`` so that a run can be
replayed exactly; with ``generator=None`` the global RNG of the tensor's device is used. A generator draws on its own
device (a CPU generator gives the same numbers whether the training runs on CPU or GPU) and the result is moved to the
device of the tensors it is combined with.

Notation: ``T`` = ``num_train_timesteps`` (1000), ``a_t`` = ``alphas_cumprod[t]`` ("alpha bar"),
``snr_t = a_t / (1 - a_t)``, ``x0`` = clean latents, ``eps`` = noise.

Semantics follow sd-scripts' flags (``--noise_offset``, ``--multires_noise_iterations``, ``--ip_noise_gamma``,
``--min_snr_gamma``, ``--debiased_estimation_loss``, ``--loss_type``/``--huber_schedule`` ...); each function documents
its formula. Where sd-scripts divides by an SNR that can be 0 (zero-terminal-SNR schedules), the SNR is floored at the
smallest positive SNR of the schedule, so the last timestep is weighted like its neighbour instead of giving inf/NaN.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from library.transfer import to_device

NUM_TRAIN_TIMESTEPS = 1000
BETA_START = 0.00085
BETA_END = 0.012
MAX_SNR_FOR_SCALING = 1000.0  # SNR cap of the v-pred scaling / v-pred-like / debiased weights (as sd-scripts)

LOSS_TYPES = ("l1", "l2", "huber", "smooth_l1")
HUBER_SCHEDULES = ("constant", "exponential", "snr")


# ---------------------------------------------------------------------------------------------------------------------
# schedule


def make_noise_scheduler(v_parameterization: bool, zero_terminal_snr: bool = False) -> DDPMScheduler:
    """SD's training schedule: DDPM, ``scaled_linear`` betas 0.00085..0.012 (``beta_t = linspace(sqrt(b0), sqrt(b1), T)_t^2``),
    1000 steps, ``clip_sample=False``; ``prediction_type`` is ``v_prediction`` or ``epsilon``.

    ``zero_terminal_snr`` rescales the betas (Lin et al. 2023, arXiv:2305.08891, Algorithm 1, diffusers'
    ``rescale_betas_zero_snr``): ``sqrt(a_t)`` is shifted so that its last value is 0 and scaled so that its first value is
    unchanged, i.e. ``sqrt(a'_t) = (sqrt(a_t) - sqrt(a_T)) * sqrt(a_0) / (sqrt(a_0) - sqrt(a_T))``; then ``a'_{T-1} == 0``.
    """
    return DDPMScheduler(
        num_train_timesteps=NUM_TRAIN_TIMESTEPS,
        beta_start=BETA_START,
        beta_end=BETA_END,
        beta_schedule="scaled_linear",
        clip_sample=False,
        prediction_type="v_prediction" if v_parameterization else "epsilon",
        rescale_betas_zero_snr=zero_terminal_snr,
    )


def all_snr(scheduler: DDPMScheduler) -> torch.Tensor:
    """SNR of every training timestep, ``snr_t = a_t / (1 - a_t)`` (float32 on CPU, computed in float64). 0 at the last
    timestep of a zero-terminal-SNR schedule."""
    ac = scheduler.alphas_cumprod.detach().cpu().double()
    return (ac / (1.0 - ac)).float()


def compute_snr(scheduler: DDPMScheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """``snr_t`` for each timestep of ``timesteps`` (float32, on ``timesteps``' device)."""
    return all_snr(scheduler).to(timesteps.device)[timesteps.long()]


# ---------------------------------------------------------------------------------------------------------------------
# random draws


def _draw_device(generator: torch.Generator | None, fallback: torch.device) -> torch.device:
    return generator.device if generator is not None else fallback


def _randn(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """float32 N(0, 1) of ``shape`` drawn with ``generator`` (on its device), returned on ``device``."""
    return to_device(torch.randn(shape, generator=generator, device=_draw_device(generator, device), dtype=torch.float32), device)


def _rand(generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """One float32 U[0, 1) draw as a 0-d tensor on ``device``."""
    return to_device(torch.rand((), generator=generator, device=_draw_device(generator, device), dtype=torch.float32), device)


def sample_noise(
    latents: torch.Tensor,
    generator: torch.Generator | None,
    noise_offset: float | None = None,
    noise_offset_random_strength: bool = False,
    adaptive_noise_scale: float | None = None,
    multires_noise_iterations: int | None = None,
    multires_noise_discount: float = 0.3,
) -> torch.Tensor:
    """The training noise for ``latents`` (B, C, H, W), same shape, dtype and device.

    1. ``eps ~ N(0, 1)``.
    2. Noise offset (when ``noise_offset`` is set and non-zero): ``eps += o * n`` with ``n ~ N(0, 1)`` of shape (B, C, 1, 1),
       i.e. one constant per (sample, channel) shifting the channel's mean. The strength ``o`` is ``noise_offset``, or with
       ``noise_offset_random_strength`` ``u * noise_offset`` with one ``u ~ U[0, 1)`` for the whole batch.
       ``adaptive_noise_scale`` (only together with a noise offset) makes it per (sample, channel):
       ``o = max(0, o + adaptive_noise_scale * |mean_{H,W}(latents)|)``.
    3. Multi-resolution ("pyramid") noise (when ``multires_noise_iterations`` > 0), as sd-scripts: for
       ``i = 0 .. iterations-1``, with ``r_i ~ U[2, 4)``, ``h_i = max(1, int(H / r_i^i))``, ``w_i = max(1, int(W / r_i^i))``:
       ``eps += bilinear_upsample(N(0, 1) of (B, C, h_i, w_i), (H, W)) * discount^i``, stopping after the level where
       ``h_i`` or ``w_i`` is 1. Level 0 is a second full-resolution white noise of weight 1 (``r^0 = 1``). Finally
       ``eps /= std(eps)`` over the whole batch, so the result has unit standard deviation.

    Draw order (what a ``generator`` replays): eps; [u]; offset noise; per pyramid level i >= 1: r_i then its noise
    (level 0 draws only its noise).
    """
    device = latents.device
    noise = _randn(tuple(latents.shape), generator, device)

    if noise_offset:
        offset: torch.Tensor | float = noise_offset
        if noise_offset_random_strength:
            offset = _rand(generator, device) * noise_offset
        spatial_dims = tuple(range(2, latents.ndim))
        channel_shape = tuple(latents.shape[:2]) + (1,) * len(spatial_dims)
        if adaptive_noise_scale is not None:
            latent_mean = latents.float().mean(dim=spatial_dims, keepdim=True).abs()
            offset = torch.clamp(offset + adaptive_noise_scale * latent_mean, min=0.0)
        noise = noise + offset * _randn(channel_shape, generator, device)

    if multires_noise_iterations:
        noise = _pyramid_noise(noise, generator, int(multires_noise_iterations), float(multires_noise_discount))

    return noise.to(latents.dtype)


def _pyramid_noise(noise: torch.Tensor, generator: torch.Generator | None, iterations: int, discount: float) -> torch.Tensor:
    if noise.ndim != 4:
        raise ValueError(f"multires noise needs (B, C, H, W) latents, got shape {tuple(noise.shape)}")
    b, c, h, w = noise.shape
    for i in range(iterations):
        if i == 0:
            hn, wn = h, w
        else:
            # r is a host number: draw it where the generator lives (CPU without one), no device sync
            u = torch.rand((), generator=generator, device=_draw_device(generator, torch.device("cpu"))).item()
            r = 2.0 + 2.0 * u
            hn, wn = max(1, int(h / r**i)), max(1, int(w / r**i))
        level = _randn((b, c, hn, wn), generator, noise.device)
        if (hn, wn) != (h, w):
            level = F.interpolate(level, size=(h, w), mode="bilinear", align_corners=False)
        noise = noise + level * discount**i
        if hn == 1 or wn == 1:
            break
    return noise / noise.std()


def sample_timesteps(
    batch: int,
    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
    min_timestep: int | None = None,
    max_timestep: int | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """``batch`` timesteps, long, uniform over the integers of ``[min_timestep, max_timestep)`` (defaults 0 and
    ``num_train_timesteps``); all equal to ``min_timestep`` when ``min_timestep == max_timestep`` (how a fixed
    validation timestep is requested). Drawn on the generator's device (CPU without one), returned on ``device``
    (default: where drawn)."""
    lo = 0 if min_timestep is None else int(min_timestep)
    hi = num_train_timesteps if max_timestep is None else int(max_timestep)
    if not (0 <= lo <= hi <= num_train_timesteps) or lo >= num_train_timesteps:
        raise ValueError(
            f"timestep range [{lo}, {hi}) is invalid: need 0 <= min_timestep <= max_timestep <= {num_train_timesteps}"
            f" and min_timestep < {num_train_timesteps}"
        )
    draw_device = _draw_device(generator, torch.device("cpu"))
    if lo < hi:
        t = torch.randint(lo, hi, (batch,), generator=generator, device=draw_device, dtype=torch.long)
    else:
        t = torch.full((batch,), lo, device=draw_device, dtype=torch.long)
    return t if device is None else to_device(t, device)


# ---------------------------------------------------------------------------------------------------------------------
# forward process and target


def noisy_latents(
    scheduler: DDPMScheduler,
    latents: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    ip_noise_gamma: float | None = None,
    ip_noise_gamma_random_strength: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The model input ``x_t = sqrt(a_t) * x0 + sqrt(1 - a_t) * n`` (diffusers' ``add_noise``).

    ``n = noise``, or with input perturbation (``ip_noise_gamma``, arXiv:2301.11706) ``n = noise + g * N(0, 1)``, where
    ``g = ip_noise_gamma`` or, with random strength, ``u * ip_noise_gamma`` with one ``u ~ U[0, 1)`` for the batch. The
    loss target is still computed from the unperturbed ``noise``. Draw order: [u]; perturbation noise.
    """
    input_noise = noise
    if ip_noise_gamma:
        strength: torch.Tensor | float = ip_noise_gamma
        if ip_noise_gamma_random_strength:
            strength = _rand(generator, latents.device) * ip_noise_gamma
        perturbation = _randn(tuple(latents.shape), generator, latents.device)
        input_noise = (noise + strength * perturbation).to(noise.dtype)
    return scheduler.add_noise(latents, input_noise, to_device(timesteps, latents.device))


def training_target(
    scheduler: DDPMScheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, v_parameterization: bool
) -> torch.Tensor:
    """What the model learns to predict: ``noise`` (epsilon), or with v-parameterization the velocity
    ``v = sqrt(a_t) * noise - sqrt(1 - a_t) * x0`` (diffusers' ``get_velocity``)."""
    if v_parameterization:
        return scheduler.get_velocity(latents, noise, to_device(timesteps, latents.device))
    return noise


# ---------------------------------------------------------------------------------------------------------------------
# loss


def conditional_loss(
    pred: torch.Tensor, target: torch.Tensor, loss_type: str = "l2", huber_c: torch.Tensor | float | None = None
) -> torch.Tensor:
    """Elementwise loss (no reduction), ``d = pred - target``:

    - ``l2``: ``d^2``;  ``l1``: ``|d|``;
    - ``huber`` (pseudo-Huber): ``2c (sqrt(d^2 + c^2) - c)`` -- about ``d^2`` for ``|d| << c``, ``2c|d|`` for ``|d| >> c``;
    - ``smooth_l1``: ``2 (sqrt(d^2 + c^2) - c)`` -- about ``d^2 / c`` for ``|d| << c``, ``2|d|`` for ``|d| >> c``.

    ``huber_c`` (needed by huber/smooth_l1) is a number or a per-sample tensor (B,) broadcast over the other dims.
    """
    if loss_type == "l2":
        return (pred - target) ** 2
    if loss_type == "l1":
        return (pred - target).abs()
    if loss_type in ("huber", "smooth_l1"):
        if huber_c is None:
            raise ValueError(f"loss_type {loss_type!r} needs huber_c (see huber_c())")
        c = _per_sample(huber_c, pred)
        root = torch.sqrt((pred - target) ** 2 + c**2) - c
        return 2 * c * root if loss_type == "huber" else 2 * root
    raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {', '.join(LOSS_TYPES)}")


def _per_sample(value: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor | float:
    """A number, a 0-d tensor, or a (B,) tensor reshaped to (B, 1, ..., 1) to broadcast against ``like``."""
    if not isinstance(value, torch.Tensor):
        return value
    value = to_device(value, like.device)
    if value.ndim == 0:
        return value
    return value.reshape(-1, *([1] * (like.ndim - 1)))


def huber_c(
    timesteps: torch.Tensor,
    scheduler: DDPMScheduler,
    schedule: str = "snr",
    huber_c: float = 0.1,
    huber_scale: float = 1.0,
) -> torch.Tensor:
    """The per-sample ``c`` of the huber / smooth_l1 losses (float32, shape (B,), on ``timesteps``' device), as sd-scripts'
    ``--huber_schedule``:

    - ``constant``: ``c = huber_c * huber_scale``;
    - ``exponential``: ``c = huber_scale * exp(-k t)`` with ``k = -ln(huber_c) / T``, i.e. ``huber_scale * huber_c^(t/T)``:
      ``huber_scale`` at t=0, ``huber_c * huber_scale`` at t=T;
    - ``snr``: ``sigma_t = sqrt((1 - a_t) / a_t)``, ``c = (1 - huber_c) / (1 + sigma_t)^2 + huber_c``: about 1 at t=0, tending
      to ``huber_c`` as the noise grows (exactly ``huber_c`` where ``a_t = 0``). As in sd-scripts, ``huber_scale`` is not
      applied to this schedule.
    """
    t = timesteps.long()
    if schedule == "constant":
        return torch.full(t.shape, huber_c * huber_scale, dtype=torch.float32, device=t.device)
    if schedule == "exponential":
        k = -math.log(huber_c) / scheduler.config.num_train_timesteps
        return torch.exp(-k * t.float()) * huber_scale
    if schedule == "snr":
        ac = _host_alphas_cumprod(scheduler)[t.cpu()]  # float64 on CPU (not every device has it)
        sigma = torch.sqrt((1.0 - ac) / ac)  # inf where a_t == 0, giving c = huber_c
        return ((1.0 - huber_c) / (1.0 + sigma) ** 2 + huber_c).float().to(t.device)
    raise ValueError(f"unknown huber schedule {schedule!r}; expected one of {', '.join(HUBER_SCHEDULES)}")


def _host_alphas_cumprod(scheduler: DDPMScheduler) -> torch.Tensor:
    """A float64 host copy of the schedule's alphas_cumprod, made once: diffusers' add_noise moves the scheduler's own
    table to the device, and reading it back every step would synchronise the host with the GPU."""
    table = getattr(scheduler, "_kiln_host_alphas_cumprod", None)
    if table is None:
        table = scheduler.alphas_cumprod.detach().cpu().double()
        scheduler._kiln_host_alphas_cumprod = table
    return table


def masked_loss(loss: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``loss`` (B, C, h, w) times ``mask`` (B, H, W) or (B, 1, H, W) in [0, 1], the mask first resized to (h, w) by area
    averaging (``interpolate(mode="area")``), broadcast over channels."""
    if mask.ndim == 3:
        mask = mask.unsqueeze(1)
    if mask.ndim != 4 or mask.shape[1] != 1:
        raise ValueError(f"mask must be (B, H, W) or (B, 1, H, W), got shape {tuple(mask.shape)}")
    mask = to_device(mask, loss.device, loss.dtype)
    if tuple(mask.shape[-2:]) != tuple(loss.shape[-2:]):
        mask = F.interpolate(mask, size=tuple(loss.shape[-2:]), mode="area")
    return loss * mask


# ---------------------------------------------------------------------------------------------------------------------
# loss weighting: ``loss`` is per sample (B,) (or (B, ...), the weight broadcast), ``all_snr`` the (T,) table of all_snr()


def _snr_at(
    timesteps: torch.Tensor, snr_table: torch.Tensor, device: torch.device, cap: float | None = None, floor: bool = False
) -> torch.Tensor:
    """float32 ``snr_t`` per sample on ``device``; optionally capped above and floored at the table's smallest positive SNR."""
    table = to_device(snr_table, device, torch.float32)
    snr = table[to_device(timesteps, device).long()]
    if cap is not None:
        snr = snr.clamp(max=cap)
    if floor:
        smallest = torch.where(table > 0, table, torch.full_like(table, math.inf)).amin()
        smallest = torch.where(torch.isfinite(smallest), smallest, torch.full_like(smallest, torch.finfo(torch.float32).tiny))
        snr = torch.maximum(snr, smallest)
    return snr


def _weighted(loss: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return loss * weight.reshape(-1, *([1] * (loss.ndim - 1)))


def apply_snr_weight(
    loss: torch.Tensor, timesteps: torch.Tensor, all_snr: torch.Tensor, gamma: float, v_prediction: bool = False
) -> torch.Tensor:
    """Min-SNR-gamma weighting (arXiv:2303.09556): ``loss * min(snr, gamma) / snr`` for epsilon prediction,
    ``loss * min(snr, gamma) / (snr + 1)`` for v prediction. (With snr = 0 the epsilon weight is its limit, 1.)"""
    if v_prediction:
        snr = _snr_at(timesteps, all_snr, loss.device)
        weight = torch.clamp(snr, max=gamma) / (snr + 1.0)
    else:
        snr = _snr_at(timesteps, all_snr, loss.device, floor=True)
        weight = torch.clamp(snr, max=gamma) / snr
    return _weighted(loss, weight)


def scale_v_prediction_loss_like_noise_prediction(
    loss: torch.Tensor, timesteps: torch.Tensor, all_snr: torch.Tensor
) -> torch.Tensor:
    """``loss * snr / (snr + 1)`` with snr capped at 1000 (a v-loss rescaled to the magnitude of an epsilon loss)."""
    snr = _snr_at(timesteps, all_snr, loss.device, cap=MAX_SNR_FOR_SCALING)
    return _weighted(loss, snr / (snr + 1.0))


def add_v_prediction_like_loss(
    loss: torch.Tensor, timesteps: torch.Tensor, all_snr: torch.Tensor, v_pred_like_loss: float
) -> torch.Tensor:
    """``loss + v_pred_like_loss * loss * (snr + 1) / snr`` (sd-scripts' ``loss + loss / scale * weight`` with
    ``scale = snr / (snr + 1)``): adds the v-prediction loss an epsilon prediction implies, since
    ``|v_hat - v|^2 = |eps_hat - eps|^2 / a_t = |eps_hat - eps|^2 (snr + 1) / snr``. snr capped at 1000 and floored."""
    snr = _snr_at(timesteps, all_snr, loss.device, cap=MAX_SNR_FOR_SCALING, floor=True)
    return loss + _weighted(loss, (snr + 1.0) / snr) * v_pred_like_loss


def apply_debiased_estimation(
    loss: torch.Tensor, timesteps: torch.Tensor, all_snr: torch.Tensor, v_prediction: bool = False
) -> torch.Tensor:
    """Debiased estimation (arXiv:2310.08442): ``loss / sqrt(snr)`` for epsilon prediction and, as sd-scripts,
    ``loss / (snr + 1)`` for v prediction; snr capped at 1000 (and floored for the division)."""
    if v_prediction:
        snr = _snr_at(timesteps, all_snr, loss.device, cap=MAX_SNR_FOR_SCALING)
        weight = 1.0 / (snr + 1.0)
    else:
        snr = _snr_at(timesteps, all_snr, loss.device, cap=MAX_SNR_FOR_SCALING, floor=True)
        weight = torch.rsqrt(snr)
    return _weighted(loss, weight)


# ---------------------------------------------------------------------------------------------------------------------
# validation


def validation_timesteps(
    min_timestep: int | None = 0, max_timestep: int | None = NUM_TRAIN_TIMESTEPS, count: int = 4
) -> list[int]:
    """The fixed timesteps of a validation pass: ``count`` evenly spaced points strictly inside [min, max],
    ``linspace(min, max, count + 2)[1:-1]`` truncated to ints -- 200, 400, 600, 800 by default. ``None`` means the
    default bound (0 or 1000)."""
    lo = 0 if min_timestep is None else min_timestep
    hi = NUM_TRAIN_TIMESTEPS if max_timestep is None else max_timestep
    return [int(x) for x in np.linspace(lo, hi, count + 2)[1:-1]]
