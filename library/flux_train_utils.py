"""What FLUX's flow-matching training has of its own: latent packing and position ids, its ``--timestep_sampling``
methods, ``--model_prediction_type``, embedded guidance and the T5 attention mask. The family-neutral flow-matching
pieces (schedule, densities, noisy inputs, loss weights, huber c) are in ``library.flow_matching``.

Pure torch functions, no training-loop state. Every random draw takes an explicit ``generator`` so that a run can be
replayed exactly; with ``generator=None`` the global CPU RNG is used. Draws happen on the generator's device (CPU
without one) and results are moved to the device of the tensors they are combined with (or ``device``).

Notation: ``x0`` = clean latents, ``eps`` = noise, ``sigma`` in [0, 1] the noise level (0 = clean, 1 = pure noise),
``T`` = 1000 training timesteps, ``timestep = sigma * T``.

Forward process (rectified flow): ``x_t = (1 - sigma) * x0 + sigma * eps``; the velocity ``dx_t/dsigma = eps - x0`` is the
loss target. Semantics follow sd-scripts' FLUX flags (``--timestep_sampling``, ``--sigmoid_scale``,
``--discrete_flow_shift``, ``--weighting_scheme``/``--logit_mean``/``--logit_std``/``--mode_scale``,
``--model_prediction_type``, ``--guidance_scale``, ``--ip_noise_gamma``); each function documents its formula.
"""

from __future__ import annotations

import math

import torch

from library.flow_matching import (
    NUM_TRAIN_TIMESTEPS,
    _sigma_table,
    density_for_timestep_sampling,
    loss_weighting,
    per_sample_view,
    shift_sigmas,
    x0_from_velocity,
)
from library.transfer import to_device

TIMESTEP_SAMPLING_METHODS = ("sigma", "uniform", "sigmoid", "shift", "flux_shift")
MODEL_PREDICTION_TYPES = ("raw", "additive", "sigma_scaled")

# flux_shift: mu is the line through (BASE_SEQ_LEN, BASE_SHIFT) and (MAX_SEQ_LEN, MAX_SHIFT) (FLUX's dynamic shifting)
BASE_SEQ_LEN = 256
MAX_SEQ_LEN = 4096
BASE_SHIFT = 0.5
MAX_SHIFT = 1.15

# ---------------------------------------------------------------------------------------------------------------------
# latent packing and position ids


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) latents -> (B, (H/2)*(W/2), C*4) tokens of 2x2 patches, FLUX's layout (diffusers'
    ``FluxPipeline._pack_latents``): token ``i*(W/2) + j`` is the patch at patch row ``i``, patch column ``j`` (row-major),
    and its feature ``c*4 + ph*2 + pw`` is ``latents[b, c, 2i + ph, 2j + pw]`` -- channels outermost, then the 2x2
    positions row by row. H and W must be even."""
    if latents.ndim != 4:
        raise ValueError(f"pack_latents needs (B, C, H, W) latents, got shape {tuple(latents.shape)}")
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"latent height and width must be even to pack 2x2 patches, got {h}x{w}")
    x = latents.reshape(b, c, h // 2, 2, w // 2, 2)  # b c i ph j pw
    x = x.permute(0, 2, 4, 1, 3, 5)  # b i j c ph pw
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(packed: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`pack_latents`: (B, (H/2)*(W/2), C*4) -> (B, C, H, W), ``height``/``width`` being the latent H, W
    (not image pixels)."""
    if packed.ndim != 3:
        raise ValueError(f"unpack_latents needs (B, tokens, features) input, got shape {tuple(packed.shape)}")
    b, n, f = packed.shape
    if height % 2 or width % 2:
        raise ValueError(f"latent height and width must be even, got {height}x{width}")
    if n != (height // 2) * (width // 2) or f % 4:
        raise ValueError(f"packed shape {tuple(packed.shape)} does not match a {height}x{width} latent of 2x2 patches")
    x = packed.reshape(b, height // 2, width // 2, f // 4, 2, 2)  # b i j c ph pw
    x = x.permute(0, 3, 1, 4, 2, 5)  # b c i ph j pw
    return x.reshape(b, f // 4, height, width)


def image_position_ids(
    height: int, width: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Position ids of the packed image tokens of a ``height`` x ``width`` latent: shape ((H/2)*(W/2), 3), row
    ``i*(W/2) + j`` is ``(0, i, j)`` (patch row, patch column), in the token order of :func:`pack_latents`."""
    if height % 2 or width % 2:
        raise ValueError(f"latent height and width must be even, got {height}x{width}")
    hp, wp = height // 2, width // 2
    rows = torch.arange(hp, dtype=dtype, device=device).repeat_interleave(wp)
    cols = torch.arange(wp, dtype=dtype, device=device).repeat(hp)
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=1)


def text_position_ids(length: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Position ids of ``length`` text (T5) tokens: ``zeros(length, 3)``."""
    return torch.zeros(length, 3, dtype=dtype, device=device)


# ---------------------------------------------------------------------------------------------------------------------
# timestep sampling


def flux_shift_mu(image_seq_len: int | float) -> float:
    """FLUX's resolution-dependent shift: ``mu = m * seq_len + b``, the line through (256, 0.5) and (4096, 1.15), i.e.
    ``m = (1.15 - 0.5) / (4096 - 256)``, ``b = 0.5 - 256 m``. ``image_seq_len`` is the packed token count
    ``(H/2)*(W/2)`` of the latent (1024x1024 image -> 128x128 latent -> 4096)."""
    m = (MAX_SHIFT - BASE_SHIFT) / (MAX_SEQ_LEN - BASE_SEQ_LEN)
    b = BASE_SHIFT - m * BASE_SEQ_LEN
    return float(image_seq_len) * m + b


def time_shift(sigmas: torch.Tensor, mu: float) -> torch.Tensor:
    """``e^mu / (e^mu + (1/sigma - 1))``: the logit of sigma moved by ``mu`` (``logit(out) = logit(sigma) + mu``)."""
    return math.exp(mu) / (math.exp(mu) + (1.0 / sigmas - 1.0))


def sample_sigmas(
    batch: int,
    method: str = "sigma",
    generator: torch.Generator | None = None,
    sigmoid_scale: float = 1.0,
    discrete_flow_shift: float = 3.0,
    image_seq_len: int | None = None,
    weighting_scheme: str = "uniform",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """``batch`` noise levels sigma (float32, shape (B,)) per ``--timestep_sampling``; timesteps are ``sigma * 1000``
    (``flow_matching.timesteps_from_sigmas``). With ``n ~ N(0, 1)`` and ``s`` = ``discrete_flow_shift``:

    - ``uniform``: ``sigma ~ U[0, 1)``;
    - ``sigmoid``: ``sigma = sigmoid(sigmoid_scale * n)``;
    - ``shift``: ``t = sigmoid(sigmoid_scale * n)``, ``sigma = s*t / (1 + (s-1)*t)`` (``s = 1`` gives ``sigmoid``);
    - ``flux_shift``: ``t = sigmoid(sigmoid_scale * n)``, ``mu = flux_shift_mu(image_seq_len)`` (0.5 at 256 tokens, 1.15 at
      4096), ``sigma = e^mu / (e^mu + (1/t - 1))``; needs ``image_seq_len`` (packed tokens, ``(H/2)*(W/2)``);
    - ``sigma`` (sd-scripts' default): ``u`` from :func:`density_for_timestep_sampling` (``weighting_scheme``,
      ``logit_mean``, ``logit_std``, ``mode_scale``; in ``library.flow_matching``), then the discrete sigma ``sigmas[floor(u * 1000)]`` of
      ``flow_matching.make_noise_scheduler`` (``discrete_flow_shift``), i.e. ``shift_s((1000 - floor(1000 u)) / 1000)``. The index is
      clamped to [0, 999]: the ``mode`` density reaches u = 1 exactly when ``u0 = 0``, where sd-scripts would index past
      the end.

    ``sigmoid_scale`` applies to sigmoid, shift and flux_shift (as sd-scripts). Draws: one ``rand``/``randn`` of (B,) on
    the generator's device (CPU without one); the result is returned on ``device`` (default: where drawn).
    """
    if method not in TIMESTEP_SAMPLING_METHODS:
        raise ValueError(f"unknown timestep_sampling {method!r}; expected one of {', '.join(TIMESTEP_SAMPLING_METHODS)}")
    draw_device = generator.device if generator is not None else torch.device("cpu")

    if method == "uniform":
        sigmas = torch.rand((batch,), generator=generator, device=draw_device, dtype=torch.float32)
    elif method in ("sigmoid", "shift", "flux_shift"):
        if method == "flux_shift" and image_seq_len is None:
            raise ValueError("timestep_sampling 'flux_shift' needs image_seq_len (the packed latent token count)")
        n = torch.randn((batch,), generator=generator, device=draw_device, dtype=torch.float32)
        sigmas = torch.sigmoid(n * sigmoid_scale)
        if method == "shift":
            sigmas = shift_sigmas(sigmas, discrete_flow_shift)
        elif method == "flux_shift":
            sigmas = time_shift(sigmas, flux_shift_mu(image_seq_len))
    else:  # "sigma"
        u = density_for_timestep_sampling(weighting_scheme, batch, generator, logit_mean, logit_std, mode_scale)
        table = _sigma_table(float(discrete_flow_shift), u.device)
        indices = (u * NUM_TRAIN_TIMESTEPS).long().clamp(0, NUM_TRAIN_TIMESTEPS - 1)
        sigmas = table[indices]
    return sigmas if device is None else to_device(sigmas, device)


# ---------------------------------------------------------------------------------------------------------------------
# model prediction types


def apply_model_prediction_type(
    kind: str,
    model_pred: torch.Tensor,
    noisy_input: torch.Tensor,
    sigmas: torch.Tensor,
    weighting_scheme: str = "uniform",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``--model_prediction_type``: returns ``(prediction to compare with the target, loss weight or None)``. ``sigmas``
    (B,) are broadcast per sample; the weight is (B, 1, ..., 1) to multiply the elementwise loss.

    - ``raw``: ``model_pred`` unchanged, no weight (sd-scripts docs recommend this for FLUX);
    - ``additive``: ``model_pred + x_t``, no weight;
    - ``sigma_scaled`` (sd-scripts' default): ``model_pred * (-sigma) + x_t`` with weight
      ``loss_weighting(weighting_scheme, sigma)``.

    Note on ``sigma_scaled``: it is SD3's x0 preconditioning (``x_t - sigma * v`` is x0 when ``v = eps - x0``), but
    sd-scripts' FLUX trainer keeps the velocity target ``eps - x0`` with it (reference section 4: "sigma_scaled:
    pred=model*(-sigma)+x_t with weighting; target eps-x0"). kiln reproduces that pairing for compatibility; ``raw`` is
    the consistent choice for velocity training.
    """
    if kind == "raw":
        return model_pred, None
    if kind == "additive":
        return model_pred + noisy_input, None
    if kind == "sigma_scaled":
        weight = loss_weighting(weighting_scheme, per_sample_view(sigmas, model_pred))
        return x0_from_velocity(model_pred, noisy_input, sigmas), weight
    raise ValueError(f"unknown model_prediction_type {kind!r}; expected one of {', '.join(MODEL_PREDICTION_TYPES)}")


def joint_attention_mask(t5_mask: torch.Tensor, image_tokens: int) -> dict:
    """The transformer's attention mask for [text; image] tokens: T5 padding is never attended, image tokens always.
    Shape (B, 1, 1, L + N), broadcast over heads and queries (diffusers' Flux attention takes it as attention_mask)."""
    text = t5_mask.bool()
    image = torch.ones(text.shape[0], image_tokens, dtype=torch.bool, device=text.device)
    return {"attention_mask": torch.cat([text, image], dim=1)[:, None, None, :]}


def guidance_vector(
    batch: int, guidance_scale: float, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The embedded-guidance input of guidance-distilled FLUX (dev): ``guidance_scale`` repeated, shape (B,)."""
    return torch.full((batch,), float(guidance_scale), device=device, dtype=dtype)
