"""On-policy distillation losses: the dense per-step KL from student to teacher, and the two objectives.

Student S and teacher T are evaluated at the SAME state x_j, sigma_j and prompt, with CFG. Their SDE
transition kernels (sde_sampler.py) are Gaussians with the same std_j, so

    mean_S - mean_T = c_j * dt_j * (v_S - v_T)                     (c_j: sde_sampler.velocity_coefficient)
    KL_j = ||mean_S - mean_T||^2 / (2 std_j^2), summed over D = C*H*W elements  (the exact KL)

Two per-step weightings, both returned as K_j = w_j * mean_elements((v_S - v_T)^2):
    reference: K_j = mean((mean_S - mean_T)^2) / (2 s_j^2) = KL_j |dt_j| / D,  w_j = c_j^2 dt_j^2 / (2 s_j^2)
               (what the authors' code computes, and what beta = 0.04 was tuned for; at SD3.5-M, T = 10,
               about 92% of the weight sits on the two lowest-noise trained steps)
    exact:     K_j = KL_j / D,                                     w_j = c_j^2 |dt_j| / (2 s_j^2)

Objectives (per sample i routed to teacher T_k(i), anchor A, trained step j; beta weighs MAR, mar.py):
    gkd (default):  L = mean_ij [ K_ij(S, T) + beta K_ij(S, A) ], gradient through v_S only.
    kl_only (the paper's framing, KL as a dense reward inside PPO):
        adv_ij = -min(K_ij(S, T), 5),  ratio_ij = exp(log pi_theta - log pi_old)
        L = mean_ij max(-adv_ij ratio_ij, -adv_ij clip(ratio_ij, 1 - eps, 1 + eps)) + beta mean_ij K_ij(S, A)
    As in the authors' code the advantage is NOT detached by default: its gradient is the pathwise
    distillation gradient; the ratio adds a score-function term of zero mean. `detach_advantage=True`
    gives the pure policy-gradient reading. With it, the method no longer improves, according to a public
    comment by the maintainer of Flow-Factory, an RL framework for flow-matching models (X-GenGroup/Flow-Factory
    issue 166, 2026-05-25); that comment is not by the Flow-OPD authors.
Deviation: the authors multiply a [B, 1] advantage by a [B] ratio (a [B, B] broadcast); we pair each
sample's advantage with its own ratio.

Sampled trained steps (`--sampled_steps k`; 0 = dense, the paper's recipe). Every objective above is a per-image
mean over the J trained steps, L_i = (1/J) sum_j l_ij (gkd: l_ij = K_ij(S, T) + beta K_ij(S, A); kl_only and
Flow-GRPO: their clipped terms). Instead of all J, each image trains a random set S_i of exactly k distinct steps:
    p_j   = (1 - lam) w_j / sum_l w_l + lam / J        (OPD: w = the KL weights; GRPO: p uniform)
    pi_j  = min(1, c p_j), c such that sum_j pi_j = k  (the probability that step j is in S_i; capped ones are
                                                        always trained: at k = 2, j = 8 of SD3.5-M)
    S_i   = systematic sampling: u_i ~ U[0, 1) from the image's seed; j is drawn iff one of u_i, u_i + 1, ...,
            u_i + k - 1 lies in [pi_0 + ... + pi_{j-1}, pi_0 + ... + pi_j)      (Madow's pi-ps design;
            pi and u on a 2^-40 grid, so the draw is exact in float64)
    L^_i  = sum_{j in S_i} l_ij / (J pi_j)            (Horvitz-Thompson: row weight 1 / (J pi_j))
    E[L^_i] = sum_j pi_j l_ij / (J pi_j) = L_i, and the same for the gradient (the weights do not depend on
    theta). k = J gives pi = 1, S_i = all steps, weights 1/J: the dense loss exactly. Only the drawn (i, j) rows
    need teacher/anchor velocities and a student forward+backward. kl_only: each drawn row keeps its own ratio
    against its own old log-prob.
    The floor lam = UNIFORM_FLOOR = 0.05 was chosen by measuring the estimator's variance (bench_sampled_steps.py,
    results/sampled_steps_cpu): on 16 rollouts of the shipped toy world (its schedule is SD3.5-M's: T = 10, shift 3,
    a = 0.7, so the same w_j), per-row losses l_ij and LoRA gradients g_ij, for two students (the merge of the toy
    teachers, and a fresh LoRA); for each lam in {0, .01, .02, .05, .1, .2, .3, .5, 1} and k = 1, 2, 3 the exact
    E||G^ - G||^2 over every draw. The best lam depends on k (about .5 at k = 1, .05-.1 at k = 2, 0 at k = 3:
    ||g_j|| falls off more slowly toward the noisy steps than w_j does); 0.05 has the smallest mean excess over
    the best lam of each (k, student), 1.22x, and is within 2 % of the best at k = 2. There the step draws add
    about 1.5x the gradient variance that drawing 16 images already has (k = 3: 0.3-0.5x, k = 1: 7-8x).

Demo: python -c "import opd_loss as o, sde_sampler as s; print(o.kl_weights(s.shifted_sigmas(10, 3.0), 0.7, 'reference'))"
"""
import math

import torch

from sde_sampler import sde_scale, velocity_coefficient

UNIFORM_FLOOR = 0.05  # lam: the uniform share of p (measured, see the module docstring)
GRID = 2.0**-40       # pi_j and u are multiples of GRID, so the sums of systematic sampling are exact in float64


def kl_weights(sigmas: torch.Tensor, noise_level: float, weighting: str) -> torch.Tensor:
    """w_j such that K_j = w_j * mean((v_S - v_T)^2), for j = 0..T-1.  [T]"""
    dt = sigmas[1:] - sigmas[:-1]
    c, s = velocity_coefficient(sigmas, noise_level), sde_scale(sigmas, noise_level)
    weights = {
        "reference": c**2 * dt**2 / (2 * s**2),                                 # mean(dmean^2) / (2 s^2)
        "exact": c**2 * dt.abs() / (2 * s**2),                                  # ||dmean||^2 / (2 std^2) / D
    }
    if weighting not in weights:
        raise ValueError(f"unknown --kl_weighting {weighting!r}: use one of {sorted(weights)}")
    return weights[weighting]


def step_kl(v_student, v_target, w):
    """K_j = w_j * mean over C*H*W of (v_S - v_T)^2, in float32.  v: [B, C, H, W]; w: [B] -> [B]"""
    return w * (v_student.float() - v_target.float()).pow(2).flatten(1).mean(1)


def gkd_loss(kl_teacher, kl_anchor, log_prob, log_prob_old, beta: float):
    """Per-sample L_i = K_i(S, T) + beta K_i(S, A); the batch loss is their mean.  all: [B] -> [B] (log-probs unused)"""
    return kl_teacher + beta * kl_anchor


def kl_only_loss(kl_teacher, kl_anchor, log_prob, log_prob_old, beta: float,
                 clip_range: float = 1e-4, detach_advantage: bool = False):
    """Per-sample L_i = max(-adv_i r_i, -adv_i clip(r_i)) + beta K_i(S, A), adv_i = -min(K_i(S, T), 5); the batch
    loss is their mean.  all: [B] -> [B]"""
    advantage = -torch.clamp(kl_teacher, max=5.0)                               # adv_ij = -min(K_ij, 5)
    if detach_advantage:
        advantage = advantage.detach()
    ratio = torch.exp(log_prob - log_prob_old)                                  # pi_theta / pi_old, per sample
    clipped = torch.clamp(ratio, 1 - clip_range, 1 + clip_range)
    policy = torch.maximum(-advantage * ratio, -advantage * clipped)           # PPO clip (a minimum of gains)
    return policy + beta * kl_anchor


LOSSES = {"gkd": gkd_loss, "kl_only": kl_only_loss}


# ----------------------------------------------------------------------------------------- sampled trained steps

def step_probabilities(kl_w, floor: float = UNIFORM_FLOOR):
    """p_j = (1 - lam) w_j / sum_l w_l + lam / J, in float64.  kl_w: [J] -> [J]"""
    w = kl_w.double().cpu()
    return (1 - floor) * w / w.sum() + floor / len(w)                           # p_j, sums to 1


def inclusion_probabilities(p, k: int):
    """pi_j = min(1, c p_j) with sum_j pi_j = k (the capped steps are always drawn; c is solved over the rest),
    rounded to multiples of GRID with the sum kept at exactly k, so that systematic_steps adds exactly.
    p: [J] > 0 -> float64 [J]; k = J gives exactly 1 everywhere (the dense loss)."""
    p = torch.as_tensor(p, dtype=torch.float64)
    if not 0 < k <= len(p) or (p <= 0).any():
        raise ValueError(f"need 0 < k <= J = {len(p)} and p > 0, got k = {k}")
    if k == len(p):
        return torch.ones_like(p)                                               # every step, exactly
    pi, capped = torch.zeros_like(p), torch.zeros_like(p, dtype=torch.bool)
    while True:
        free = ~capped
        pi[free] = (k - capped.sum()) * p[free] / p[free].sum()                # c p_j over the uncapped steps
        pi[capped] = 1.0
        if not (pi[free] > 1).any():
            break
        capped |= pi > 1
    units = torch.round(pi / GRID)                                              # integers, exact in float64
    middle = torch.argmax(torch.minimum(units, 1 / GRID - units))               # the step farthest from 0 and 1
    units[middle] += k / GRID - units.sum()                                     # sum exactly k (a few units)
    assert ((units > 0) & (units <= 1 / GRID)).all(), pi
    return units * GRID


def systematic_steps(pi, u: float) -> list[int]:
    """The steps drawn by systematic sampling: j such that one of u, u + 1, ..., u + k - 1 lies in
    [sum_{l<j} pi_l, sum_{l<=j} pi_l). Step j is drawn with probability pi_j (u ~ U[0, 1)), exactly k = sum pi
    distinct steps, in increasing order. pi (inclusion_probabilities) and u (uniform_on_grid) are multiples of
    GRID: every sum here is exact.  pi: [J] float64 -> k ints"""
    edges = torch.cumsum(torch.as_tensor(pi, dtype=torch.float64), 0)           # right edges, the last = k
    points = torch.arange(round(edges[-1].item()), dtype=torch.float64) + u     # u, u + 1, ..., u + k - 1
    return torch.searchsorted(edges, points, right=True).tolist()               # the interval of each point


def uniform_on_grid(rng) -> float:
    """u ~ U[0, 1) on the grid of GRID, from a random.Random."""
    return rng.getrandbits(40) * GRID


def systematic_designs(pi) -> list[tuple[float, float, list[int]]]:
    """Every draw of systematic_steps, its probability and a u that draws it: the drawn set is constant between
    the fractional parts of the cumulative sums of pi, so the u-intervals between them list all outcomes.
    -> [(probability, u, steps)]"""
    edges = torch.cumsum(torch.as_tensor(pi, dtype=torch.float64), 0)
    cuts = sorted({0.0, 1.0, *(e - math.floor(e) for e in edges.tolist())})
    return [(b - a, a, systematic_steps(pi, a)) for a, b in zip(cuts, cuts[1:]) if b > a]
