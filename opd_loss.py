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
    gives the pure policy-gradient reading (which, per a maintainer's public comment, loses the gains).
Deviation: the authors multiply a [B, 1] advantage by a [B] ratio (a [B, B] broadcast); we pair each
sample's advantage with its own ratio.

Demo: python -c "import opd_loss as o, sde_sampler as s; print(o.kl_weights(s.shifted_sigmas(10, 3.0), 0.7, 'reference'))"
"""
import torch

from sde_sampler import sde_scale, velocity_coefficient


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
