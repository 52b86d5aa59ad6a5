"""sde_sampler.py against diffusers' scheduler, torch.distributions and docs/method.md section 3's closed forms."""
import contextlib
from functools import partial

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from models import sd3_velocity
from sde_sampler import (Condition, gaussian_log_prob, initial_noise, ode_step, rollout, sample_ode,
                         sde_mean, sde_scale, shifted_sigmas, transition_std, velocity_coefficient)

SD35M_SIGMAS = [1, .9601, .9133, .8577, .7904, .7073, .6022, .4649, .2780, .0089, 0]
SD35M_STD = [0.700, .743, .536, .446, .392, .353, .319, .282, .225, .006]


def test_sd35m_schedule_and_transition_stds():
    sigmas = shifted_sigmas(10, 3.0)
    assert torch.allclose(sigmas, torch.tensor(SD35M_SIGMAS), atol=1e-4)
    assert torch.allclose(transition_std(sigmas, 0.7), torch.tensor(SD35M_STD), atol=1e-3)
    c = velocity_coefficient(sigmas, 0.7)
    assert c[0] == 1 and torch.allclose(c[1:], torch.full((9,), 1 + 0.7**2 / 2))   # c_j = 1 + a^2/2 for j >= 1


def test_noise_free_step_is_diffusers_euler_step():
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(10)
    sigmas = shifted_sigmas(10, 3.0)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=generator)
    ours, theirs = x.clone(), x.clone()
    for j, timestep in enumerate(scheduler.timesteps):
        v = torch.randn(2, 4, 8, 8, generator=generator)
        sigma, sigma_next = sigmas[j].expand(2), sigmas[j + 1].expand(2)
        euler = ode_step(ours, v, sigma, sigma_next)
        ours = sde_mean(ours, v, sigma, sigma_next, torch.zeros(2))              # a = 0: the SDE mean is the ODE
        theirs = scheduler.step(v, timestep, theirs).prev_sample
        assert torch.allclose(ours, theirs, atol=1e-5) and torch.allclose(euler, theirs, atol=1e-5)


def test_log_prob_is_elementwise_mean_of_normal_log_density():
    generator = torch.Generator().manual_seed(1)
    mean = torch.randn(3, 4, 5, 5, generator=generator)
    std = torch.tensor([0.7, 0.2, 0.05])
    x_next = mean + std.view(3, 1, 1, 1) * torch.randn(3, 4, 5, 5, generator=generator)
    reference = torch.distributions.Normal(mean, std.view(3, 1, 1, 1)).log_prob(x_next).flatten(1).mean(1)
    assert torch.allclose(gaussian_log_prob(x_next, mean, std), reference, atol=1e-5)


def test_mean_difference_is_linear_in_velocity_difference():
    sigmas = shifted_sigmas(10, 3.0)
    s, c, dt = sde_scale(sigmas, 0.7), velocity_coefficient(sigmas, 0.7), sigmas[1:] - sigmas[:-1]
    generator = torch.Generator().manual_seed(2)
    x, v_s, v_t = (torch.randn(2, 4, 8, 8, generator=generator) for _ in range(3))
    for j in range(10):
        args = (sigmas[j].expand(2), sigmas[j + 1].expand(2), s[j].expand(2))
        difference = sde_mean(x, v_s, *args) - sde_mean(x, v_t, *args)
        assert torch.allclose(difference, c[j] * dt[j] * (v_s - v_t), atol=1e-5)   # mean_S - mean_T = c dt (v_S - v_T)


def test_initial_noise_depends_only_on_each_samples_seed():
    x_all, noise_all = initial_noise([5, 6, 7], (4, 8, 8), 10, "cpu")
    x_one, noise_one = initial_noise([6], (4, 8, 8), 10, "cpu")
    assert x_all.shape == (3, 4, 8, 8) and noise_all.shape == (10, 3, 4, 8, 8)
    assert torch.equal(x_all[1], x_one[0]) and torch.equal(noise_all[:, 1], noise_one[:, 0])
    assert not torch.equal(x_all[0], x_all[1])


def _condition(sd3_transformer, batch: int, seed: int = 0) -> Condition:
    generator = torch.Generator().manual_seed(seed)
    dim, pooled = sd3_transformer.config.joint_attention_dim, sd3_transformer.config.pooled_projection_dim
    return Condition(torch.randn(batch, 7, dim, generator=generator), torch.randn(batch, pooled, generator=generator),
                     torch.randn(1, 7, dim, generator=generator), torch.randn(1, pooled, generator=generator))


def test_cfg_velocity_combines_separate_forwards(sd3_transformer):
    cond = _condition(sd3_transformer, 2)
    x, sigma = torch.randn(2, 4, 8, 8), torch.tensor([0.9, 0.3])

    def forward(embeds, pooled):
        return sd3_transformer(hidden_states=x, timestep=1000 * sigma, encoder_hidden_states=embeds,
                               pooled_projections=pooled, return_dict=False)[0]
    with torch.no_grad():
        v_cond = forward(cond.embeds, cond.pooled)
        v_uncond = forward(cond.neg_embeds.expand(2, -1, -1), cond.neg_pooled.expand(2, -1))
        v = sd3_velocity(sd3_transformer, x, sigma, cond, 4.5)
        conditional = sd3_velocity(sd3_transformer, x, sigma, cond, None)       # no CFG: the flow-matching loss's
    assert torch.allclose(v, v_uncond + 4.5 * (v_cond - v_uncond), atol=1e-5)
    assert torch.equal(conditional, v_cond)


def test_rollout_is_reproducible_and_its_log_probs_match(sd3_transformer):
    cond, sigmas = _condition(sd3_transformer, 2), shifted_sigmas(4, 3.0)
    x0, noise = initial_noise([0, 1], (4, 8, 8), 4, "cpu")
    velocity = partial(sd3_velocity, sd3_transformer, guidance=4.5)
    first = rollout(velocity, cond, x0, noise, sigmas, 0.7)
    again = rollout(velocity, cond, x0, noise, sigmas, 0.7)
    assert first.x.shape == (5, 2, 4, 8, 8) and first.log_prob.shape == (4, 2)
    assert torch.equal(first.x, again.x) and torch.equal(first.x[0], x0)
    std = transition_std(sigmas, 0.7)
    for j in range(4):   # x_{j+1} - mean_j = std_j * noise_j, so log pi = mean of log N(noise; 0, 1) - log std_j
        expected = torch.distributions.Normal(0.0, 1.0).log_prob(noise[j]).flatten(1).mean(1) - torch.log(std[j])
        assert torch.allclose(first.log_prob[j], expected, atol=1e-4)
    single = rollout(velocity, cond[[1]], x0[[1]], noise[:, [1]], sigmas, 0.7)
    assert torch.allclose(single.x[:, 0], first.x[:, 1], atol=1e-5)          # batch composition does not matter


def test_ode_sampling_is_a_zero_noise_rollout(sd3_transformer):
    cond, sigmas = _condition(sd3_transformer, 2), shifted_sigmas(3, 3.0)
    x0, _ = initial_noise([3, 4], (4, 8, 8), 3, "cpu")
    x = x0.clone()
    with torch.no_grad():
        for j in range(3):
            v = sd3_velocity(sd3_transformer, x, sigmas[j].expand(2), cond, 4.5)
            x = sde_mean(x, v, sigmas[j].expand(2), sigmas[j + 1].expand(2), torch.zeros(2))
    velocity = partial(sd3_velocity, sd3_transformer, guidance=4.5)
    assert torch.allclose(sample_ode(velocity, cond, x0, sigmas), x, atol=1e-5)


def test_autocast_of_an_fp32_base_leaves_a_callers_autocast_on(sd3_transformer):
    from models import autocast
    a = torch.randn(4, 4)
    with torch.autocast("cpu", torch.bfloat16), autocast(sd3_transformer):   # e.g. the toy build's bf16 pre-training
        assert (a @ a).dtype == torch.bfloat16
    with autocast(sd3_transformer):
        assert (a @ a).dtype == torch.float32


def _old_cfg_velocity(transformer, x, sigma, cond, guidance):
    """sde_sampler.cfg_velocity as it was before the model-family seam (issue 19), its autocast inlined."""
    n, weight = x.shape[0], transformer.pos_embed.proj.weight
    dtype = weight.dtype
    cast = contextlib.nullcontext() if dtype == torch.float32 else torch.autocast(weight.device.type, dtype=dtype)
    with cast:
        v_uncond, v_cond = transformer(
            hidden_states=torch.cat([x, x]).to(dtype),
            timestep=(1000 * sigma).repeat(2).to(dtype),
            encoder_hidden_states=torch.cat([cond.neg_embeds.expand(n, -1, -1), cond.embeds]).to(dtype),
            pooled_projections=torch.cat([cond.neg_pooled.expand(n, -1), cond.pooled]).to(dtype),
            return_dict=False,
        )[0].float().chunk(2)
    return v_uncond + guidance * (v_cond - v_uncond)


def _old_flow_matching_loss(transformer, x0, cond, sigma, noise):
    """sft.flow_matching_loss as it was before the seam (fp32 base: no autocast)."""
    s = sigma.view(-1, 1, 1, 1)
    x_sigma = (1 - s) * x0 + s * noise
    v = transformer(hidden_states=x_sigma, timestep=1000 * sigma, encoder_hidden_states=cond.embeds,
                    pooled_projections=cond.pooled, return_dict=False)[0]
    return (v.float() - (noise - x0)).pow(2).flatten(1).mean(1)


@pytest.mark.parametrize("kind", ["sd3", "toy", "toy-bf16"])
def test_rollout_through_the_base_is_bit_identical_to_the_old_sd3_forward(kind, request):
    """The seam moved the SD3 forward into models.Base.velocity: the same rollout, bit for bit."""
    from models import load_base, load_toy
    from sft import flow_matching_loss
    if kind == "sd3":
        base = load_base(str(request.getfixturevalue("sd3_folder")), "cpu", torch.float32, 16)
    else:
        base = load_toy("cpu", torch.bfloat16 if kind == "toy-bf16" else torch.float32)
    cond, sigmas = base.condition(["a red sign", "two blue circles"]), base.sigmas(3)
    x0, noise = initial_noise([5, 6], base.latent_shape, 3, "cpu")
    old = rollout(partial(_old_cfg_velocity, base.transformer, guidance=4.5), cond, x0, noise, sigmas, 0.7)
    new = rollout(partial(base.velocity, guidance=4.5), cond, x0, noise, sigmas, 0.7)
    assert torch.equal(new.x, old.x) and torch.equal(new.log_prob, old.log_prob)
    assert not torch.equal(new.x[-1], new.x[1])                                 # the transformer did run
    if kind != "toy-bf16":                                                      # L_FM: the conditional velocity
        sigma = torch.tensor([0.3, 0.8])
        with torch.no_grad():
            ours = flow_matching_loss(partial(base.velocity, guidance=None), old.x[-1], cond, sigma, noise[0])
            assert torch.equal(ours, _old_flow_matching_loss(base.transformer, old.x[-1], cond, sigma, noise[0]))
