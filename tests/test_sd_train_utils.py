"""Noise, timesteps, targets and losses of SD1/2 and SDXL (library/sd_train_utils.py): hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler

from library import sd_train_utils as stu


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def close(a, b, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(
        torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64), rtol=rtol, atol=atol
    )


def sd_alphas_cumprod_by_hand() -> torch.Tensor:
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


# ---------------------------------------------------------------------------------------------------------------------
# schedule


@pytest.mark.parametrize("v", [False, True])
def test_scheduler_is_sd_schedule(v):
    s = stu.make_noise_scheduler(v)
    assert s.config.num_train_timesteps == 1000
    assert s.config.beta_schedule == "scaled_linear"
    assert s.config.clip_sample is False
    assert s.config.prediction_type == ("v_prediction" if v else "epsilon")
    ref = DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000, clip_sample=False
    )
    assert torch.equal(s.alphas_cumprod, ref.alphas_cumprod)
    by_hand = sd_alphas_cumprod_by_hand()
    close(s.alphas_cumprod, by_hand, rtol=1e-4, atol=1e-6)
    close(s.alphas_cumprod[0], 1 - 0.00085)
    close(s.alphas_cumprod[-1], 0.0046601, rtol=1e-4)


def test_zero_terminal_snr_schedule():
    plain = stu.make_noise_scheduler(True)
    z = stu.make_noise_scheduler(True, zero_terminal_snr=True)
    assert z.alphas_cumprod[-1].item() == 0.0
    close(z.alphas_cumprod[0], plain.alphas_cumprod[0], rtol=1e-6)
    # independent float64 rescale: shift sqrt(a) so the last is 0, scale so the first is unchanged
    root = sd_alphas_cumprod_by_hand().sqrt()
    root = (root - root[-1]) * root[0] / (root[0] - root[-1])
    close(z.alphas_cumprod, root**2, rtol=1e-4, atol=1e-6)
    snr = stu.all_snr(z)
    assert snr[-1].item() == 0.0 and torch.isfinite(snr).all()
    assert (snr[1:] <= snr[:-1]).all()


def test_snr_table_and_lookup():
    s = stu.make_noise_scheduler(False)
    snr = stu.all_snr(s)
    assert snr.shape == (1000,) and snr.dtype == torch.float32
    ac = sd_alphas_cumprod_by_hand()
    close(snr, ac / (1 - ac), rtol=1e-3)
    close(snr[0], 0.99915 / 0.00085, rtol=1e-4)  # 1175.47
    t = torch.tensor([0, 10, 999, 500])
    assert torch.equal(stu.compute_snr(s, t), snr[t])


# ---------------------------------------------------------------------------------------------------------------------
# noise


def test_plain_noise_is_gaussian_draw_and_replays():
    latents = torch.zeros(2, 4, 8, 8)
    a = stu.sample_noise(latents, gen(1))
    assert a.shape == latents.shape and a.dtype == latents.dtype
    assert torch.equal(a, torch.randn(2, 4, 8, 8, generator=gen(1)))
    assert torch.equal(a, stu.sample_noise(latents, gen(1)))
    assert not torch.equal(a, stu.sample_noise(latents, gen(2)))
    assert stu.sample_noise(latents.bfloat16(), gen(1)).dtype == torch.bfloat16


def test_global_rng_without_generator():
    latents = torch.zeros(1, 4, 8, 8)
    torch.manual_seed(3)
    a = stu.sample_noise(latents, None, noise_offset=0.1, multires_noise_iterations=3)
    torch.manual_seed(3)
    b = stu.sample_noise(latents, None, noise_offset=0.1, multires_noise_iterations=3)
    assert torch.equal(a, b)


def test_noise_offset_by_hand():
    latents = torch.zeros(2, 4, 8, 8)
    g = gen(5)
    eps = torch.randn(2, 4, 8, 8, generator=g)
    shift = torch.randn(2, 4, 1, 1, generator=g)
    out = stu.sample_noise(latents, gen(5), noise_offset=0.5)
    close(out, eps + 0.5 * shift)
    # zero / None offset: nothing added, adaptive scale alone does nothing
    assert torch.equal(stu.sample_noise(latents, gen(5), noise_offset=0.0, adaptive_noise_scale=1.0), eps)


def test_noise_offset_shifts_channel_means():
    latents = torch.zeros(4, 4, 64, 64)
    plain = stu.sample_noise(latents, gen(0))
    shifted = stu.sample_noise(latents, gen(0), noise_offset=3.0)
    delta = (shifted - plain).mean(dim=(2, 3))  # (B, C): one constant per sample and channel
    assert delta.std() > 1.0
    close(shifted - plain, delta[:, :, None, None].expand(-1, -1, 64, 64), atol=1e-5, rtol=0)
    assert plain.mean(dim=(2, 3)).abs().max() < 0.2


def test_noise_offset_random_strength_by_hand():
    latents = torch.zeros(2, 3, 4, 4)
    g = gen(7)
    eps = torch.randn(2, 3, 4, 4, generator=g)
    u = torch.rand((), generator=g)
    shift = torch.randn(2, 3, 1, 1, generator=g)
    out = stu.sample_noise(latents, gen(7), noise_offset=0.2, noise_offset_random_strength=True)
    close(out, eps + u * 0.2 * shift)


def test_adaptive_noise_scale_by_hand():
    latents = torch.zeros(1, 2, 4, 4)
    latents[0, 0] = -2.0  # channel means -2 and +1
    latents[0, 1] = 1.0
    g = gen(9)
    eps = torch.randn(1, 2, 4, 4, generator=g)
    shift = torch.randn(1, 2, 1, 1, generator=g)
    out = stu.sample_noise(latents, gen(9), noise_offset=0.1, adaptive_noise_scale=0.5)
    offset = torch.tensor([0.1 + 0.5 * 2.0, 0.1 + 0.5 * 1.0]).view(1, 2, 1, 1)
    close(out, eps + offset * shift)
    # a negative scale is clamped at offset 0
    out = stu.sample_noise(latents, gen(9), noise_offset=0.1, adaptive_noise_scale=-1.0)
    close(out, eps)


def test_multires_noise_by_hand():
    latents = torch.zeros(1, 2, 16, 12)
    g = gen(11)
    eps = torch.randn(1, 2, 16, 12, generator=g)
    level0 = torch.randn(1, 2, 16, 12, generator=g)
    r = 2 + 2 * torch.rand((), generator=g).item()
    level1 = torch.randn(1, 2, int(16 / r), int(12 / r), generator=g)
    up = torch.nn.functional.interpolate(level1, size=(16, 12), mode="bilinear", align_corners=False)
    expected = eps + level0 + 0.3 * up
    expected = expected / expected.std()
    out = stu.sample_noise(latents, gen(11), multires_noise_iterations=2, multires_noise_discount=0.3)
    close(out, expected)


def test_multires_noise_unit_std_shape_and_low_frequencies():
    latents = torch.zeros(4, 4, 64, 64, dtype=torch.float16)
    out = stu.sample_noise(latents, gen(0), multires_noise_iterations=10, multires_noise_discount=0.8)
    assert out.shape == latents.shape and out.dtype == torch.float16
    close(out.float().std(), 1.0, rtol=1e-3)
    assert torch.equal(out, stu.sample_noise(latents, gen(0), multires_noise_iterations=10, multires_noise_discount=0.8))

    def neighbour_corr(x):
        x = x.float()
        return torch.corrcoef(torch.stack([x[..., :, :-1].flatten(), x[..., :, 1:].flatten()]))[0, 1]

    white = stu.sample_noise(latents, gen(0))
    assert abs(neighbour_corr(white)) < 0.05
    assert neighbour_corr(out) > 0.1  # upsampled coarse levels correlate neighbouring pixels
    # tiny latents: the pyramid stops at 1 pixel
    assert stu.sample_noise(torch.zeros(1, 1, 2, 2), gen(0), multires_noise_iterations=8).shape == (1, 1, 2, 2)


# ---------------------------------------------------------------------------------------------------------------------
# timesteps


def test_sample_timesteps_range_and_replay():
    t = stu.sample_timesteps(5000, 1000, generator=gen(0))
    assert t.dtype == torch.long and t.shape == (5000,)
    assert t.min() >= 0 and t.max() <= 999
    assert torch.equal(t, stu.sample_timesteps(5000, 1000, generator=gen(0)))
    assert torch.equal(t, torch.randint(0, 1000, (5000,), generator=gen(0)))
    t = stu.sample_timesteps(2000, 1000, min_timestep=100, max_timestep=104, generator=gen(1))
    assert set(t.tolist()) == {100, 101, 102, 103}


def test_sample_timesteps_fixed_and_invalid():
    assert stu.sample_timesteps(3, 1000, 400, 400).tolist() == [400, 400, 400]
    assert stu.sample_timesteps(2, 1000, generator=gen(0), device="cpu").device.type == "cpu"
    for lo, hi in [(500, 400), (-1, 10), (0, 1001), (1000, 1000)]:
        with pytest.raises(ValueError):
            stu.sample_timesteps(2, 1000, lo, hi)


def test_validation_timesteps():
    assert stu.validation_timesteps() == [200, 400, 600, 800]
    assert stu.validation_timesteps(None, None) == [200, 400, 600, 800]
    assert stu.validation_timesteps(100, 900) == [260, 420, 580, 740]
    assert stu.validation_timesteps(0, 1000, count=1) == [500]
    assert stu.validation_timesteps(0, 999, count=2) == [333, 666]


# ---------------------------------------------------------------------------------------------------------------------
# forward process and target


def test_noisy_latents_by_hand():
    s = stu.make_noise_scheduler(False)
    x0 = torch.randn(2, 4, 4, 4, generator=gen(0))
    eps = torch.randn(2, 4, 4, 4, generator=gen(1))
    t = torch.tensor([0, 999])
    ac = s.alphas_cumprod[t].view(2, 1, 1, 1)
    close(stu.noisy_latents(s, x0, eps, t), ac.sqrt() * x0 + (1 - ac).sqrt() * eps)


def test_ip_noise_changes_input_not_target():
    s = stu.make_noise_scheduler(True)
    x0 = torch.randn(2, 4, 4, 4, generator=gen(0))
    eps = torch.randn(2, 4, 4, 4, generator=gen(1))
    t = torch.tensor([100, 700])
    plain = stu.noisy_latents(s, x0, eps, t)
    eps_before = eps.clone()
    perturbed = stu.noisy_latents(s, x0, eps, t, ip_noise_gamma=0.1, generator=gen(2))
    assert not torch.allclose(plain, perturbed)
    assert torch.equal(eps, eps_before)  # the noise the target is built from is untouched
    extra = torch.randn(2, 4, 4, 4, generator=gen(2))
    close(perturbed, s.add_noise(x0, eps + 0.1 * extra, t))
    # random strength: one u ~ U[0, 1) for the batch, drawn before the perturbation
    g = gen(3)
    u = torch.rand((), generator=g)
    extra = torch.randn(2, 4, 4, 4, generator=g)
    out = stu.noisy_latents(s, x0, eps, t, ip_noise_gamma=0.1, ip_noise_gamma_random_strength=True, generator=gen(3))
    close(out, s.add_noise(x0, eps + u * 0.1 * extra, t))
    # the target depends on the clean noise only
    close(stu.training_target(s, x0, eps, t, True), s.get_velocity(x0, eps_before, t))


def test_training_targets_by_hand():
    s = stu.make_noise_scheduler(True)
    x0 = torch.randn(3, 4, 2, 2, generator=gen(0))
    eps = torch.randn(3, 4, 2, 2, generator=gen(1))
    t = torch.tensor([0, 500, 999])
    assert stu.training_target(s, x0, eps, t, False) is eps
    ac = sd_alphas_cumprod_by_hand()[t].view(3, 1, 1, 1).float()
    close(stu.training_target(s, x0, eps, t, True), ac.sqrt() * eps - (1 - ac).sqrt() * x0, rtol=1e-4, atol=1e-5)
    # zero terminal SNR: at the last step v = -x0
    z = stu.make_noise_scheduler(True, zero_terminal_snr=True)
    close(stu.training_target(z, x0, eps, t, True)[2], -x0[2])


# ---------------------------------------------------------------------------------------------------------------------
# losses


def test_conditional_loss_values():
    pred = torch.tensor([1.0, -2.0, 0.5]).view(1, 3, 1, 1)
    target = torch.tensor([0.0, 1.0, 0.5]).view(1, 3, 1, 1)
    d = torch.tensor([1.0, -3.0, 0.0]).view(1, 3, 1, 1)
    close(stu.conditional_loss(pred, target, "l2"), d**2)
    close(stu.conditional_loss(pred, target, "l1"), d.abs())
    c = 0.5
    close(stu.conditional_loss(pred, target, "huber", c), 2 * c * (torch.sqrt(d**2 + c**2) - c))
    close(stu.conditional_loss(pred, target, "huber", c).flatten()[0], 2 * 0.5 * (math.sqrt(1.25) - 0.5))
    close(stu.conditional_loss(pred, target, "smooth_l1", c).flatten()[1], 2 * (math.sqrt(9.25) - 0.5))
    assert stu.conditional_loss(pred, target, "huber", c).flatten()[2] == 0


def test_conditional_loss_per_sample_c():
    pred = torch.ones(2, 2, 2, 2)
    target = torch.zeros(2, 2, 2, 2)
    c = torch.tensor([0.1, 1.0])
    out = stu.conditional_loss(pred, target, "huber", c)
    close(out[0], torch.full((2, 2, 2), 2 * 0.1 * (math.sqrt(1.01) - 0.1)))
    close(out[1], torch.full((2, 2, 2), 2 * (math.sqrt(2.0) - 1.0)))
    out = stu.conditional_loss(pred, target, "smooth_l1", c)
    close(out[1], torch.full((2, 2, 2), 2 * (math.sqrt(2.0) - 1.0)))
    close(stu.conditional_loss(pred, target, "huber", torch.tensor(0.5)), stu.conditional_loss(pred, target, "huber", 0.5))


def test_huber_limits():
    c = 0.5
    small = torch.tensor([1e-3, -2e-3], dtype=torch.float64)
    zero = torch.zeros_like(small)
    close(stu.conditional_loss(small, zero, "huber", c), small**2, rtol=1e-4)  # ~ l2 for |d| << c
    close(stu.conditional_loss(small, zero, "smooth_l1", c), small**2 / c, rtol=1e-4)  # ~ l2 / c
    big = torch.tensor([1e3, -5e3], dtype=torch.float64)
    close(stu.conditional_loss(big, zero, "huber", c), 2 * c * big.abs(), rtol=1e-3)  # ~ linear, slope 2c
    close(stu.conditional_loss(big, zero, "smooth_l1", c), 2 * big.abs(), rtol=1e-3)  # ~ linear, slope 2


def test_conditional_loss_errors():
    x = torch.zeros(1, 1, 1, 1)
    with pytest.raises(ValueError, match="huber_c"):
        stu.conditional_loss(x, x, "huber")
    with pytest.raises(ValueError, match="loss_type"):
        stu.conditional_loss(x, x, "l3")


def test_huber_c_schedules():
    s = stu.make_noise_scheduler(False)
    t = torch.tensor([0, 500, 1000])
    close(stu.huber_c(t, s, "constant", 0.1, 2.0), [0.2, 0.2, 0.2])
    close(stu.huber_c(t, s, "exponential", 0.1, 2.0), [2.0, 2.0 * math.sqrt(0.1), 0.2])  # scale * c^(t/T)
    t = torch.tensor([0, 999])
    ac = s.alphas_cumprod[t].double()
    sigma = ((1 - ac) / ac).sqrt()
    expected = 0.9 / (1 + sigma) ** 2 + 0.1
    out = stu.huber_c(t, s, "snr", 0.1)
    close(out, expected)
    assert out[0] > 0.9 and out[1] < 0.2
    assert out.dtype == torch.float32 and out.shape == (2,)
    close(stu.huber_c(t, s, "snr", 0.1, huber_scale=5.0), out)  # sd-scripts: no scale on the snr schedule
    z = stu.make_noise_scheduler(True, zero_terminal_snr=True)
    close(stu.huber_c(torch.tensor([999]), z, "snr", 0.1), [0.1])
    with pytest.raises(ValueError):
        stu.huber_c(t, s, "linear")


def test_masked_loss_half_mask():
    loss = torch.ones(2, 4, 8, 8)
    mask = torch.zeros(2, 64, 64)
    mask[:, :, :32] = 1.0  # left half
    out = stu.masked_loss(loss, mask)
    assert out.shape == loss.shape
    assert torch.equal(out[..., :4], torch.ones(2, 4, 8, 4))
    assert torch.equal(out[..., 4:], torch.zeros(2, 4, 8, 4))
    close(out.mean(), 0.5)
    # area resize: an 8x8 block with half its pixels set averages to 0.5; (B, 1, H, W) masks are accepted
    checker = (torch.arange(64)[:, None] + torch.arange(64)[None, :]) % 2
    out = stu.masked_loss(loss, checker.float().expand(2, 1, 64, 64))
    close(out, torch.full_like(loss, 0.5))
    with pytest.raises(ValueError):
        stu.masked_loss(loss, torch.ones(2, 3, 8, 8))


# ---------------------------------------------------------------------------------------------------------------------
# loss weighting, on a hand-made SNR table: index -> snr


SNR = torch.tensor([0.0, 0.5, 1.0, 4.0, 10.0, 2000.0])
T = torch.arange(6)
LOSS = torch.full((6,), 2.0)


def test_min_snr_gamma():
    out = stu.apply_snr_weight(LOSS, T, SNR, gamma=5.0, v_prediction=False)
    # min(snr, 5) / snr; snr 0 takes the limit 1
    close(out, 2.0 * torch.tensor([1.0, 1.0, 1.0, 1.0, 0.5, 5 / 2000]))
    out = stu.apply_snr_weight(LOSS, T, SNR, gamma=5.0, v_prediction=True)
    close(out, 2.0 * torch.tensor([0.0, 0.5 / 1.5, 0.5, 0.8, 5 / 11, 5 / 2001]))


def test_scale_v_pred_loss_like_noise_pred():
    out = stu.scale_v_prediction_loss_like_noise_prediction(LOSS, T, SNR)
    close(out, 2.0 * torch.tensor([0.0, 0.5 / 1.5, 0.5, 0.8, 10 / 11, 1000 / 1001]))  # snr capped at 1000


def test_v_pred_like_loss():
    out = stu.add_v_prediction_like_loss(LOSS, T, SNR, 0.1)
    # loss + 0.1 * loss * (snr + 1) / snr, snr capped at 1000, and snr 0 floored at the smallest positive (0.5)
    ratio = torch.tensor([3.0, 3.0, 2.0, 1.25, 1.1, 1.001])
    close(out, 2.0 + 0.1 * 2.0 * ratio)


def test_debiased_estimation():
    out = stu.apply_debiased_estimation(LOSS, T, SNR, v_prediction=False)
    close(out, 2.0 / torch.sqrt(torch.tensor([0.5, 0.5, 1.0, 4.0, 10.0, 1000.0])))
    out = stu.apply_debiased_estimation(LOSS, T, SNR, v_prediction=True)
    close(out, 2.0 / torch.tensor([1.0, 1.5, 2.0, 5.0, 11.0, 1001.0]))


def test_weighting_broadcasts_and_real_schedules_stay_finite():
    loss = torch.ones(2, 3)
    out = stu.apply_debiased_estimation(loss, torch.tensor([3, 4]), SNR)
    close(out, torch.tensor([[0.5] * 3, [10**-0.5] * 3]))
    for ztsnr in (False, True):
        s = stu.make_noise_scheduler(True, ztsnr)
        snr = stu.all_snr(s)
        t = torch.tensor([0, 1, 500, 998, 999])
        loss = torch.ones(5)
        outs = [
            stu.apply_snr_weight(loss, t, snr, 5.0, v_prediction=False),
            stu.apply_snr_weight(loss, t, snr, 5.0, v_prediction=True),
            stu.scale_v_prediction_loss_like_noise_prediction(loss, t, snr),
            stu.add_v_prediction_like_loss(loss, t, snr, 0.2),
            stu.apply_debiased_estimation(loss, t, snr, v_prediction=False),
            stu.apply_debiased_estimation(loss, t, snr, v_prediction=True),
        ]
        for out in outs:
            assert torch.isfinite(out).all()
        if ztsnr:  # the terminal step is weighted like its neighbour where the formula divides by snr
            assert outs[4][4] == outs[4][3] and outs[3][4] == outs[3][3]
            assert outs[0][4] == 1.0 and outs[1][4] == 0.0
