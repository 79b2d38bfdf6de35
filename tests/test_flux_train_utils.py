"""Packing, timesteps, noisy inputs, targets and loss weights of FLUX (library/flux_train_utils.py and the flow-matching
code it shares with SD3, library/flow_matching.py): hand-computed values."""

from __future__ import annotations

import argparse
import math

import pytest
import torch

from library import flow_matching as fm
from library import flux_train_utils as ftu


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def close(a, b, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(
        torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64), rtol=rtol, atol=atol
    )


# ---------------------------------------------------------------------------------------------------------------------
# packing and position ids


def test_pack_layout_by_hand():
    # x[c, h, w] = 8c + 4h + w, C=2, H=2, W=4 -> two patches (columns 0-1 and 2-3)
    x = torch.arange(16, dtype=torch.float32).reshape(1, 2, 2, 4)
    packed = ftu.pack_latents(x)
    assert packed.shape == (1, 2, 8)
    close(packed[0, 0], [0, 1, 4, 5, 8, 9, 12, 13])  # channel 0's 2x2, then channel 1's
    close(packed[0, 1], [2, 3, 6, 7, 10, 11, 14, 15])


def test_pack_matches_diffusers_and_round_trips():
    from diffusers import FluxPipeline

    x = torch.randn(2, 3, 6, 4, generator=gen(1))
    packed = ftu.pack_latents(x)
    assert torch.equal(packed, FluxPipeline._pack_latents(x, 2, 3, 6, 4))
    assert packed.shape == (2, 3 * 2, 12)
    assert torch.equal(ftu.unpack_latents(packed, 6, 4), x)
    # diffusers' unpack takes pixel sizes and the VAE factor 8
    assert torch.equal(FluxPipeline._unpack_latents(packed, 6 * 8, 4 * 8, 8), x)


def test_pack_rejects_odd_and_mismatched_shapes():
    with pytest.raises(ValueError, match="even"):
        ftu.pack_latents(torch.zeros(1, 4, 3, 4))
    with pytest.raises(ValueError, match="does not match"):
        ftu.unpack_latents(torch.zeros(1, 5, 16), 4, 4)


def test_position_ids():
    ids = ftu.image_position_ids(4, 6)
    close(ids, [[0, 0, 0], [0, 0, 1], [0, 0, 2], [0, 1, 0], [0, 1, 1], [0, 1, 2]])
    from diffusers import FluxPipeline

    assert torch.equal(ids, FluxPipeline._prepare_latent_image_ids(1, 2, 3, "cpu", torch.float32))
    txt = ftu.text_position_ids(7)
    assert txt.shape == (7, 3) and not txt.any()


# ---------------------------------------------------------------------------------------------------------------------
# timestep sampling

SAMPLING_CASES = [
    ("uniform", {}),
    ("sigmoid", {"sigmoid_scale": 2.0}),
    ("shift", {"discrete_flow_shift": 3.0}),
    ("flux_shift", {"image_seq_len": 1024}),
    ("sigma", {"weighting_scheme": "uniform"}),
    ("sigma", {"weighting_scheme": "logit_normal", "logit_mean": 0.5, "logit_std": 2.0}),
    ("sigma", {"weighting_scheme": "mode"}),
    ("sigma", {"weighting_scheme": "cosmap"}),
]


@pytest.mark.parametrize("method,kw", SAMPLING_CASES)
def test_sampling_range_shape_determinism(method, kw):
    a = ftu.sample_sigmas(4096, method, gen(3), **kw)
    assert a.shape == (4096,) and a.dtype == torch.float32
    assert bool(((a >= 0) & (a <= 1)).all())
    assert torch.equal(a, ftu.sample_sigmas(4096, method, gen(3), **kw))
    assert not torch.equal(a, ftu.sample_sigmas(4096, method, gen(4), **kw))
    assert a.std() > 0.05  # spread, not a constant


def test_uniform_and_sigmoid_formulas():
    close(ftu.sample_sigmas(5, "uniform", gen(0)), torch.rand(5, generator=gen(0)))
    n = torch.randn(5, generator=gen(0))
    close(ftu.sample_sigmas(5, "sigmoid", gen(0), sigmoid_scale=2.0), 1 / (1 + torch.exp(-2.0 * n)))


def test_shift_formula_and_s1_equals_sigmoid():
    n = torch.randn(6, generator=gen(5))
    t = torch.sigmoid(n)
    close(ftu.sample_sigmas(6, "shift", gen(5), discrete_flow_shift=3.0), 3 * t / (1 + 2 * t))
    assert torch.equal(ftu.sample_sigmas(6, "shift", gen(5), discrete_flow_shift=1.0), ftu.sample_sigmas(6, "sigmoid", gen(5)))
    close(fm.shift_sigmas(torch.tensor([0.5]), 3.0), [0.75])  # 1.5 / 2


def test_flux_shift_mu_and_formula():
    assert ftu.flux_shift_mu(256) == pytest.approx(0.5)
    assert ftu.flux_shift_mu(4096) == pytest.approx(1.15)
    assert ftu.flux_shift_mu(2176) == pytest.approx(0.825)  # midpoint
    # sigma = 0.5 -> e^mu / (e^mu + 1)
    close(ftu.time_shift(torch.tensor([0.5]), 0.5), [math.exp(0.5) / (math.exp(0.5) + 1)])
    t = torch.sigmoid(torch.randn(8, generator=gen(2)))
    for seq, mu in ((256, 0.5), (4096, 1.15)):
        s = ftu.sample_sigmas(8, "flux_shift", gen(2), image_seq_len=seq)
        close(s, math.exp(mu) / (math.exp(mu) + (1 / t - 1)))
    # more tokens -> more noise, sample by sample
    assert bool(
        (
            ftu.sample_sigmas(8, "flux_shift", gen(2), image_seq_len=4096)
            > ftu.sample_sigmas(8, "flux_shift", gen(2), image_seq_len=256)
        ).all()
    )
    with pytest.raises(ValueError, match="image_seq_len"):
        ftu.sample_sigmas(2, "flux_shift", gen(0))


def test_scheduler_sigmas_by_hand():
    sig = fm.make_noise_scheduler(3.0).sigmas
    assert sig.shape == (1000,)
    close(sig[0], 1.0)
    close(sig[999], 0.003 / 1.002)  # t = 0.001
    close(sig[500], 1.5 / 2.0)  # t = 0.5


def test_sigma_method_uniform_density():
    u = torch.rand(6, generator=gen(7))
    idx = (u * 1000).floor()
    t = (1000 - idx) / 1000
    close(ftu.sample_sigmas(6, "sigma", gen(7), discrete_flow_shift=3.0), 3 * t / (1 + 2 * t))
    # shift 1: sigma = (1000 - floor(1000 u)) / 1000
    close(ftu.sample_sigmas(6, "sigma", gen(7), discrete_flow_shift=1.0), t)


def test_sigma_method_logit_normal_and_mode_densities():
    u = torch.sigmoid(0.5 + 2.0 * torch.randn(6, generator=gen(8)))
    close(fm.density_for_timestep_sampling("logit_normal", 6, gen(8), logit_mean=0.5, logit_std=2.0), u)
    t = (1000 - (u * 1000).floor()) / 1000
    close(
        ftu.sample_sigmas(
            6, "sigma", gen(8), discrete_flow_shift=1.0, weighting_scheme="logit_normal", logit_mean=0.5, logit_std=2.0
        ),
        t,
    )
    u0 = torch.rand(6, generator=gen(9))
    close(
        fm.density_for_timestep_sampling("mode", 6, gen(9), mode_scale=1.29),
        1 - u0 - 1.29 * (torch.cos(math.pi * u0 / 2) ** 2 - 1 + u0),
    )
    close(fm.density_for_timestep_sampling("mode", 6, gen(9), mode_scale=0.0), 1 - u0)  # scale 0: mirrored uniform
    close(fm.density_for_timestep_sampling("none", 6, gen(9)), u0)


def test_sigma_method_clamps_u_equal_one(monkeypatch):
    # mode density gives u = 1 exactly at u0 = 0: the index is clamped to the last discrete sigma
    monkeypatch.setattr(ftu, "density_for_timestep_sampling", lambda *a, **k: torch.tensor([1.0, 0.0]))
    close(ftu.sample_sigmas(2, "sigma", None, discrete_flow_shift=3.0), [0.003 / 1.002, 1.0])


def test_timesteps_and_unknown_method():
    close(fm.timesteps_from_sigmas(torch.tensor([0.0, 0.25, 1.0])), [0.0, 250.0, 1000.0])
    with pytest.raises(ValueError, match="timestep_sampling"):
        ftu.sample_sigmas(2, "logsnr", gen(0))


# ---------------------------------------------------------------------------------------------------------------------
# noisy input and target


def test_noisy_input_and_target_by_hand():
    x0 = torch.full((3, 1, 2, 2), 2.0)
    eps = torch.full((3, 1, 2, 2), -1.0)
    xt = fm.noisy_model_input(x0, eps, torch.tensor([0.0, 0.25, 1.0]))
    close(xt[:, 0, 0, 0], [2.0, 1.25, -1.0])  # 0.75*2 + 0.25*(-1) = 1.25
    close(fm.flow_matching_target(x0, eps), torch.full((3, 1, 2, 2), -3.0))
    bf = fm.noisy_model_input(x0.bfloat16(), eps.bfloat16(), torch.tensor([0.0, 0.25, 1.0]))
    assert bf.dtype == torch.bfloat16


def test_ip_noise_gamma():
    x0 = torch.randn(2, 4, 4, 4, generator=gen(0))
    eps = torch.randn(2, 4, 4, 4, generator=gen(1))
    s = torch.tensor([0.3, 0.8])
    sb = s.view(2, 1, 1, 1)
    xi = torch.randn(2, 4, 4, 4, generator=gen(2))
    close(fm.noisy_model_input(x0, eps, s, ip_noise_gamma=0.1, generator=gen(2)), (1 - sb) * x0 + sb * (eps + 0.1 * xi))
    g = gen(2)
    u = torch.rand((), generator=g)
    xi = torch.randn(2, 4, 4, 4, generator=g)
    close(
        fm.noisy_model_input(x0, eps, s, ip_noise_gamma=0.1, ip_noise_gamma_random_strength=True, generator=gen(2)),
        (1 - sb) * x0 + sb * (eps + u * 0.1 * xi),
    )
    # off: no draw, plain formula
    close(fm.noisy_model_input(x0, eps, s, ip_noise_gamma=0.0, generator=gen(2)), (1 - sb) * x0 + sb * eps)


# ---------------------------------------------------------------------------------------------------------------------
# weighting and prediction types


def test_loss_weighting_by_hand():
    s = torch.tensor([0.5, 0.25, 0.0])
    close(fm.loss_weighting("sigma_sqrt", s[:2]), [4.0, 16.0])
    # 1 - 2s + 2s^2: 0.5 at s=0.5, 0.625 at s=0.25, 1 at s=0
    close(fm.loss_weighting("cosmap", s), [4 / math.pi, 2 / (math.pi * 0.625), 2 / math.pi])
    for scheme in ("uniform", "none", "logit_normal", "mode"):
        close(fm.loss_weighting(scheme, s), [1.0, 1.0, 1.0])


def test_model_prediction_types_by_hand():
    pred = torch.full((2, 1, 1, 2), 3.0)
    xt = torch.full((2, 1, 1, 2), 2.0)
    s = torch.tensor([0.5, 0.25])
    out, w = ftu.apply_model_prediction_type("raw", pred, xt, s, "sigma_sqrt")
    assert out is pred and w is None
    out, w = ftu.apply_model_prediction_type("additive", pred, xt, s, "sigma_sqrt")
    close(out, torch.full((2, 1, 1, 2), 5.0))
    assert w is None
    out, w = ftu.apply_model_prediction_type("sigma_scaled", pred, xt, s, "sigma_sqrt")
    close(out[:, 0, 0, 0], [0.5, 1.25])  # 3*(-0.5)+2, 3*(-0.25)+2
    assert w.shape == (2, 1, 1, 1)
    close(w.flatten(), [4.0, 16.0])
    _, w = ftu.apply_model_prediction_type("sigma_scaled", pred, xt, s, "uniform")
    close(w.flatten(), [1.0, 1.0])
    with pytest.raises(ValueError, match="model_prediction_type"):
        ftu.apply_model_prediction_type("eps", pred, xt, s)


def test_sigma_scaled_of_true_velocity_is_x0():
    x0 = torch.randn(2, 4, 4, 4, generator=gen(0))
    eps = torch.randn(2, 4, 4, 4, generator=gen(1))
    s = torch.tensor([0.2, 0.9])
    xt = fm.noisy_model_input(x0, eps, s)
    out, _ = ftu.apply_model_prediction_type("sigma_scaled", fm.flow_matching_target(x0, eps), xt, s)
    close(out, x0, atol=1e-5)


def test_guidance_vector():
    g = ftu.guidance_vector(3, 3.5)
    assert g.shape == (3,) and g.dtype == torch.float32
    close(g, [3.5, 3.5, 3.5])


# ---------------------------------------------------------------------------------------------------------------------
# refusal of DDPM-only options


def _defaults() -> argparse.Namespace:
    return argparse.Namespace(
        min_snr_gamma=None,
        v_parameterization=False,
        scale_v_pred_loss_like_noise_pred=False,
        v_pred_like_loss=None,
        debiased_estimation_loss=False,
        zero_terminal_snr=False,
        noise_offset=None,
        multires_noise_iterations=None,
        adaptive_noise_scale=None,
        learning_rate=1e-4,
    )


def test_refusal_names_each_set_flag():
    fm.refuse_ddpm_only_options(_defaults())  # nothing set: no error
    fm.refuse_ddpm_only_options(argparse.Namespace())  # missing attributes count as unset
    ns = _defaults()
    values = dict(
        min_snr_gamma=5.0,
        v_parameterization=True,
        scale_v_pred_loss_like_noise_pred=True,
        v_pred_like_loss=0.1,
        debiased_estimation_loss=True,
        zero_terminal_snr=True,
        noise_offset=0.05,
        multires_noise_iterations=6,
        adaptive_noise_scale=0.01,
    )
    for k, v in values.items():
        setattr(ns, k, v)
    with pytest.raises(ValueError) as e:
        fm.refuse_ddpm_only_options(ns)
    for name in fm.DDPM_ONLY_OPTIONS:
        assert f"--{name}" in str(e.value)
    for name in values:
        one = _defaults()
        setattr(one, name, values[name])
        with pytest.raises(ValueError) as e:
            fm.refuse_ddpm_only_options(one)
        assert str(e.value).split(":")[0] == f"--{name}"  # only the set flag is listed


def test_joint_attention_mask_hides_t5_padding_from_the_transformer():
    """With the mask, what T5 put at padding positions cannot change the transformer's output; without it, it does."""
    from library.flux_train_utils import joint_attention_mask
    from library.tiny_models import build_tiny_flux

    transformer = build_tiny_flux()["transformer"].eval()
    cfg = transformer.config
    torch.manual_seed(0)
    h = w = 4
    text = torch.randn(1, 6, cfg.joint_attention_dim)
    other = text.clone()
    other[:, 4:] = torch.randn(1, 2, cfg.joint_attention_dim)  # different content in the two padding slots
    mask = torch.tensor([[1.0, 1, 1, 1, 0, 0]])
    common = dict(hidden_states=torch.randn(1, h * w, cfg.in_channels), pooled_projections=torch.randn(1, cfg.pooled_projection_dim),
                  timestep=torch.tensor([0.4]), img_ids=torch.zeros(h * w, 3), txt_ids=torch.zeros(6, 3), guidance=torch.tensor([3.5]),
                  return_dict=False)
    with torch.no_grad():
        masked = [transformer(encoder_hidden_states=t, joint_attention_kwargs=joint_attention_mask(mask, h * w), **common)[0] for t in (text, other)]
        plain = [transformer(encoder_hidden_states=t, **common)[0] for t in (text, other)]
    assert torch.allclose(masked[0], masked[1], atol=1e-6)
    assert not torch.allclose(plain[0], plain[1], atol=1e-4)


def test_huber_c_for_flow_matching_noise_levels():
    sigmas = torch.tensor([0.0, 0.5, 0.75, 1.0])
    # snr: DDPM's noise-to-signal ratio for x_t = (1 - s) x0 + s n is s / (1 - s): 0, 1, 3, inf
    expected = torch.tensor([1.0, 0.9 / 4 + 0.1, 0.9 / 16 + 0.1, 0.1])
    assert torch.allclose(fm.huber_c(sigmas, "snr", 0.1), expected, atol=1e-7)
    assert torch.allclose(fm.huber_c(sigmas, "constant", 0.1, 2.0), torch.full((4,), 0.2))
    # exponential: huber_scale * huber_c ** (t / 1000) at t = sigma x 1000
    assert torch.allclose(fm.huber_c(sigmas, "exponential", 0.1, 1.0), 0.1 ** sigmas, atol=1e-6)


def test_schedule_is_built_once_and_values_are_unchanged(monkeypatch):
    """Timestep sampling and huber_c run per sample per step: the flow-matching scheduler behind them is built once
    per shift (it was built on every call), the values equal those of a freshly built scheduler, and the table the
    caller gets is a copy."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    fresh = {s: fm.make_noise_scheduler(s).sigmas.float() for s in (3.0, 1.0)}
    built = []

    class Counting(FlowMatchEulerDiscreteScheduler):
        def __init__(self, *args, **kwargs):
            built.append(kwargs.get("shift"))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(fm, "FlowMatchEulerDiscreteScheduler", Counting)
    fm._shared_scheduler.cache_clear()
    fm._sigma_table.cache_clear()
    try:
        for step in range(20):
            u = torch.rand(1, generator=gen(step))
            sigma = ftu.sample_sigmas(1, "sigma", gen(step), discrete_flow_shift=3.0)
            assert torch.equal(sigma, fresh[3.0][(u * 1000).long().clamp(0, 999)])
            s1 = ftu.sample_sigmas(1, "sigma", gen(step), discrete_flow_shift=1.0, weighting_scheme="logit_normal")
            u1 = torch.sigmoid(torch.randn(1, generator=gen(step)))
            assert torch.equal(s1, fresh[1.0][(u1 * 1000).long().clamp(0, 999)])
            for schedule in ("constant", "exponential"):
                fm.huber_c(sigma, schedule, 0.1, 2.0)
        assert sorted(built) == [1.0, 3.0]  # one scheduler per shift, for every call above

        table = fm.training_sigmas(3.0)
        assert torch.equal(table, fresh[3.0])
        table.fill_(0.5)  # the caller's copy: the cache is untouched
        assert torch.equal(fm.training_sigmas(3.0), fresh[3.0])
        assert torch.equal(ftu.sample_sigmas(1, "sigma", gen(0), discrete_flow_shift=3.0),
                           fresh[3.0][(torch.rand(1, generator=gen(0)) * 1000).long().clamp(0, 999)])
        assert sorted(built) == [1.0, 3.0]
    finally:
        fm._shared_scheduler.cache_clear()
        fm._sigma_table.cache_clear()
