"""opd_loss.py: per-step KL weights and both objectives, against closed forms and torch.distributions; the
sampled-steps estimator (inclusion probabilities, systematic sampling) by exact enumeration of its draws."""
import random

import pytest
import torch

from opd_loss import (GRID, gkd_loss, inclusion_probabilities, kl_only_loss, kl_weights, step_kl, step_probabilities,
                      systematic_designs, systematic_steps, uniform_on_grid)
from sde_sampler import gaussian_log_prob, sde_mean, sde_scale, shifted_sigmas, transition_std

SIGMAS = shifted_sigmas(10, 3.0)


def test_reference_weights_match_design():
    w = kl_weights(SIGMAS, 0.7, "reference")
    assert abs(w[0].item() - 6.5e-5) < 0.1e-5 and abs(w[8].item() - 0.30) < 0.005
    trained = w[:9]
    assert 0.91 < (trained[7:9].sum() / trained.sum()).item() < 0.93    # ~92% on the two lowest-noise trained steps


def _pair(seed: int, j: int):
    generator = torch.Generator().manual_seed(seed)
    x, v_s, v_t = (torch.randn(3, 4, 6, 6, generator=generator) for _ in range(3))
    args = (SIGMAS[j].expand(3), SIGMAS[j + 1].expand(3), sde_scale(SIGMAS, 0.7)[j].expand(3))
    return v_s, v_t, sde_mean(x, v_s, *args), sde_mean(x, v_t, *args)


def test_step_kl_reference_is_mean_squared_mean_difference_over_2s2():
    s = sde_scale(SIGMAS, 0.7)
    for j in range(10):
        v_s, v_t, mean_s, mean_t = _pair(j, j)
        expected = (mean_s - mean_t).pow(2).flatten(1).mean(1) / (2 * s[j] ** 2)
        got = step_kl(v_s, v_t, kl_weights(SIGMAS, 0.7, "reference")[j])
        assert torch.allclose(got, expected, rtol=1e-4, atol=1e-9)


def test_step_kl_exact_is_the_gaussian_kl_per_element():
    std = transition_std(SIGMAS, 0.7)
    for j in range(10):
        v_s, v_t, mean_s, mean_t = _pair(10 + j, j)
        kl = torch.distributions.kl_divergence(torch.distributions.Normal(mean_s.double(), std[j].double()),
                                               torch.distributions.Normal(mean_t.double(), std[j].double()))
        got = step_kl(v_s, v_t, kl_weights(SIGMAS, 0.7, "exact")[j])
        assert torch.allclose(got.double(), kl.flatten(1).mean(1), rtol=1e-4)  # KL_j / D


def _student_terms(j: int, v_teacher, noise_scale: float):
    """A student velocity leaf, its K_j to the teacher and log pi_theta of a next state drawn around mean_S."""
    generator = torch.Generator().manual_seed(j)
    x = torch.randn(3, 4, 6, 6, generator=generator)
    v_student = v_teacher.clone().requires_grad_(True) if noise_scale < 0 else \
        torch.randn(3, 4, 6, 6, generator=generator).requires_grad_(True)
    args = (SIGMAS[j].expand(3), SIGMAS[j + 1].expand(3), sde_scale(SIGMAS, 0.7)[j].expand(3))
    mean = sde_mean(x, v_student, *args)
    std = transition_std(SIGMAS, 0.7)[j].expand(3)
    x_next = mean.detach() + abs(noise_scale) * std.view(3, 1, 1, 1) * torch.randn(3, 4, 6, 6, generator=generator)
    log_prob = gaussian_log_prob(x_next, mean, std)
    kl = step_kl(v_student, v_teacher, kl_weights(SIGMAS, 0.7, "reference")[j])
    return v_student, kl, log_prob


def test_both_losses_are_zero_with_zero_gradient_when_student_equals_teacher():
    v_teacher = torch.randn(3, 4, 6, 6)
    for loss_fn in (gkd_loss, kl_only_loss):
        v_student, kl, log_prob = _student_terms(8, v_teacher, noise_scale=-1.0)
        loss = loss_fn(kl, torch.zeros(3), log_prob, log_prob.detach(), beta=0.04).mean()
        loss.backward()
        assert loss.item() == 0 and v_student.grad.abs().max().item() == 0


def test_kl_only_at_ratio_one_equals_gkd_value_and_gradient():
    v_teacher = torch.randn(3, 4, 6, 6)
    v_student, kl, log_prob = _student_terms(7, v_teacher, noise_scale=1.0)
    kl_anchor = kl.detach() * 0.5
    gkd = gkd_loss(kl, kl_anchor, log_prob, log_prob.detach(), beta=0.04).mean()
    grad_gkd, = torch.autograd.grad(gkd, v_student, retain_graph=True)
    ppo = kl_only_loss(kl, kl_anchor, log_prob, log_prob.detach(), beta=0.04).mean()
    grad_ppo, = torch.autograd.grad(ppo, v_student, retain_graph=True)
    assert torch.allclose(ppo, gkd)
    # the pathwise part equals gkd's gradient; the rest is the score-function term mean(K * d log pi)
    score, = torch.autograd.grad((kl.detach() * log_prob).mean(), v_student)
    assert torch.allclose(grad_ppo, grad_gkd + score, atol=1e-7)


def test_detached_advantage_leaves_no_gradient_toward_the_teacher():
    v_teacher = torch.randn(3, 4, 6, 6)
    v_student, kl, log_prob = _student_terms(6, v_teacher, noise_scale=0.0)  # x_next = mean: d log pi / d v = 0
    detached = kl_only_loss(kl, torch.zeros(3), log_prob, log_prob.detach(), beta=0.0, detach_advantage=True).mean()
    grad, = torch.autograd.grad(detached, v_student, retain_graph=True)
    assert detached.item() > 0 and grad.abs().max().item() == 0
    attached = kl_only_loss(kl, torch.zeros(3), log_prob, log_prob.detach(), beta=0.0).mean()
    grad_attached, = torch.autograd.grad(attached, v_student)
    assert grad_attached.abs().max().item() > 0


def test_kl_only_clip_stops_the_ratio_gradient_below_the_range():
    kl = torch.tensor([0.5, 0.5])
    log_prob_old = torch.zeros(2)
    log_prob = torch.tensor([0.01, -0.01], requires_grad=True)             # ratios e^{+-0.01}, outside 1 +- 1e-4
    loss = kl_only_loss(kl, torch.zeros(2), log_prob, log_prob_old, beta=0.0).mean()
    grad, = torch.autograd.grad(loss, log_prob)
    # above the range the unclipped term K * ratio is the max; below it the clipped constant K (1 - eps) wins
    assert torch.allclose(grad[0], 0.5 * torch.exp(torch.tensor(0.01)) / 2) and grad[1].item() == 0
    assert torch.allclose(loss, (0.5 * torch.exp(torch.tensor(0.01)) + 0.5 * (1 - 1e-4)) / 2)
    big = kl_only_loss(torch.tensor([9.0]), torch.zeros(1), torch.zeros(1), torch.zeros(1), beta=0.0)
    assert big.item() == 5.0                                                 # advantage clipped at -5


# ----------------------------------------------------------------------------------------- sampled trained steps

W = kl_weights(SIGMAS, 0.7, "reference")[:9]                                 # the 9 trained steps of SD3.5-M


def test_step_probabilities_mix_the_kl_weights_with_a_uniform_floor():
    p = step_probabilities(W, 0.1)
    assert torch.allclose(p, 0.9 * W.double() / W.sum() + 0.1 / 9) and abs(p.sum().item() - 1) < 1e-12
    assert torch.allclose(step_probabilities(W, 1.0), torch.full((9,), 1 / 9, dtype=torch.float64))


@pytest.mark.parametrize("k", range(1, 10))
def test_inclusion_probabilities_sum_to_k_cap_at_one_and_follow_p(k):
    p = step_probabilities(W, 0.1)
    pi = inclusion_probabilities(p, k)
    assert pi.sum().item() == k and (pi > 0).all() and (pi <= 1).all()
    assert torch.equal(pi, torch.round(pi / GRID) * GRID)                      # on the grid: exact sums
    free = pi < 1
    if free.any():                                                             # pi_j = c p_j below the cap,
        c = pi[free] / p[free]
        assert (c.max() - c.min()) / c.mean() < 1e-9                           # one c for every free step
        assert (pi[~free] == 1).all() and (c.mean() * p[~free] >= 1 - 1e-9).all()   # and the capped have c p_j >= 1
    if k == 9:
        assert torch.equal(pi, torch.ones(9, dtype=torch.float64))             # k = J: exactly 1 (the dense loss)


@pytest.mark.parametrize("k, floor", [(1, 0.1), (2, 0.1), (3, 0.0), (5, 0.3), (2, 1.0), (9, 1.0)])
def test_systematic_sampling_draws_k_distinct_steps_each_with_probability_pi(k, floor):
    pi = inclusion_probabilities(step_probabilities(W, floor), k)
    designs = systematic_designs(pi)                                           # every draw, with its probability
    included = torch.zeros(9, dtype=torch.float64)
    for probability, _, steps in designs:
        assert len(set(steps)) == k == len(steps) and steps == sorted(steps) and 0 <= steps[0] and steps[-1] < 9
        included[steps] += probability
    assert abs(sum(p for p, _, _ in designs) - 1) < 1e-15 and torch.allclose(included, pi, atol=1e-15, rtol=0)
    rng = random.Random(0)                                                     # the draws train.py makes agree
    for u in [0.0, 1 - GRID] + [uniform_on_grid(rng) for _ in range(50)]:
        assert any(systematic_steps(pi, u) == steps for _, _, steps in designs)


@pytest.mark.parametrize("k, floor", [(1, 0.1), (2, 0.1), (3, 0.05), (2, 1.0)])
def test_sampled_loss_and_gradient_are_unbiased_over_all_draws(k, floor):
    """E over every draw of sum_{j in S} l_j / (J pi_j) equals (1/J) sum_j l_j, and so does its gradient."""
    g = torch.Generator().manual_seed(k)
    theta = torch.randn(5, dtype=torch.float64, generator=g, requires_grad=True)
    targets = torch.randn(9, 5, dtype=torch.float64, generator=g)
    l = W.double() * (theta - targets).pow(2).sum(1) + (theta * targets).sum(1).sin()   # l_j(theta)  [9]
    dense = l.mean()
    pi = inclusion_probabilities(step_probabilities(W, floor), k)
    expected = sum(p * (l[steps] / (9 * pi[steps])).sum() for p, _, steps in systematic_designs(pi))
    grad_dense, = torch.autograd.grad(dense, theta, retain_graph=True)
    grad_expected, = torch.autograd.grad(expected, theta)
    assert torch.allclose(expected, dense, rtol=1e-12) and torch.allclose(grad_expected, grad_dense, rtol=1e-10)
