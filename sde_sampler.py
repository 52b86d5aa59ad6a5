"""Flow-SDE sampling with log-probabilities (Flow-GRPO's sampler, the rollout of Flow-OPD).

Conventions (diffusers / SD3 flow matching):
    x_sigma = (1 - sigma) * x0 + sigma * eps,   velocity v = eps - x0,   sigma runs 1 -> 0,
    dt_j = sigma_{j+1} - sigma_j < 0.
The velocity is a callable `velocity(x, sigma, cond) -> float32 v` that the base provides, guidance included
(models.Base.velocity; SD3: CFG, v = v_uncond + g * (v_cond - v_uncond)): this module never calls a model.

The SDE step (Flow-GRPO eq. 9, noise level a = 0.7), for step j from sigma_j to sigma_{j+1}:
    s_j     = a * sqrt(sigma_j / (1 - sigma~_j)),   sigma~_j = sigmas[1] if sigma_j == 1 else sigma_j
    mean_j  = x_j * (1 + s_j^2 dt / (2 sigma_j)) + v * (1 + s_j^2 (1 - sigma_j) / (2 sigma_j)) * dt
    std_j   = s_j * sqrt(-dt)
    x_{j+1} = mean_j + std_j * noise
    log pi(x_{j+1} | x_j) = log N(x_{j+1}; mean_j, std_j^2 I), a per-element MEAN over C*H*W
With a = 0 the step is diffusers' Euler step x + dt * v. All SDE math runs in float32, whatever dtype
the model runs in. Noise is an argument (drawn from explicit per-sample seeds), so a rollout is a
function of its seeds alone: the same global batch gives the same trajectories on 1 or N processes.

Deviation from the authors' code: none in the math. The per-element mean of the log-density is kept
(their PPO clip range 1e-4 refers to that scale).

Demo: python -c "import sde_sampler as s, torch; print(s.transition_std(s.shifted_sigmas(10, 3.0), 0.7))"
"""
from dataclasses import dataclass
import math

import torch


@dataclass
class Condition:
    """Prompt embeddings for a batch, plus the negative prompt "" (one row, broadcast)."""
    embeds: torch.Tensor      # [B, L, D]
    pooled: torch.Tensor      # [B, P]
    neg_embeds: torch.Tensor  # [1, L, D]
    neg_pooled: torch.Tensor  # [1, P]

    def __getitem__(self, rows) -> "Condition":
        return Condition(self.embeds[rows], self.pooled[rows], self.neg_embeds, self.neg_pooled)

    def __len__(self) -> int:
        return self.embeds.shape[0]


@dataclass
class Trajectory:
    """A batch of SDE rollouts: states x_0..x_T (x_0 is noise at sigma = 1), and old log-probs."""
    x: torch.Tensor          # [T+1, B, C, H, W] float32
    log_prob: torch.Tensor   # [T, B] float32, log pi_old(x_{j+1} | x_j), per-element mean
    sigmas: torch.Tensor     # [T+1] float32, 1 -> 0


def shifted_sigmas(steps: int, shift: float) -> torch.Tensor:
    """sigmas of diffusers' FlowMatchEulerDiscreteScheduler(shift=shift).set_timesteps(steps), ending in 0.  [T+1]"""
    from diffusers import FlowMatchEulerDiscreteScheduler
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(steps)
    return scheduler.sigmas.float().cpu()


def sde_scale(sigmas: torch.Tensor, noise_level: float) -> torch.Tensor:
    """s_j = a * sqrt(sigma_j / (1 - sigma~_j)) for j = 0..T-1.  [T]"""
    sigma = sigmas[:-1]
    sigma_tilde = torch.where(sigma == 1, sigmas[1], sigma)                    # avoid 1/0 at sigma = 1
    return noise_level * torch.sqrt(sigma / (1 - sigma_tilde))


def transition_std(sigmas: torch.Tensor, noise_level: float) -> torch.Tensor:
    """std_j = s_j * sqrt(-dt_j).  [T]"""
    dt = sigmas[1:] - sigmas[:-1]
    return sde_scale(sigmas, noise_level) * torch.sqrt(-dt)


def velocity_coefficient(sigmas: torch.Tensor, noise_level: float) -> torch.Tensor:
    """c_j = 1 + s_j^2 (1 - sigma_j) / (2 sigma_j): mean_j depends on v through c_j * dt_j * v.  [T]"""
    sigma, s = sigmas[:-1], sde_scale(sigmas, noise_level)
    return 1 + s**2 * (1 - sigma) / (2 * sigma)


def sde_mean(x, v, sigma, sigma_next, s):
    """mean_j = x (1 + s^2 dt / (2 sigma)) + v (1 + s^2 (1 - sigma) / (2 sigma)) dt.  x, v: [B, ...]; sigma, sigma_next, s: [B]"""
    sigma, dt, s = (_bcast(t, x) for t in (sigma, sigma_next - sigma, s))
    return x * (1 + s**2 * dt / (2 * sigma)) + v * (1 + s**2 * (1 - sigma) / (2 * sigma)) * dt


def gaussian_log_prob(x_next, mean, std):
    """log N(x_next; mean, std^2 I), averaged over the C*H*W elements.  x_next, mean: [B, ...]; std: [B] -> [B]"""
    std = _bcast(std, x_next)
    log_density = -((x_next - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return log_density.flatten(1).mean(1)


def ode_step(x, v, sigma, sigma_next):
    """Euler step x_{j+1} = x_j + dt * v.  x, v: [B, ...]; sigma, sigma_next: [B]"""
    return x + _bcast(sigma_next - sigma, x) * v


def _bcast(t, like):
    """[B] -> [B, 1, 1, ...] to broadcast against `like` [B, ...]."""
    return t.reshape(-1, *([1] * (like.ndim - 1)))


def initial_noise(seeds: list[int], shape, steps: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample noise from per-sample seeds: x_0 [B, *shape] and the step noises [T, B, *shape], float32."""
    draws = []
    for seed in seeds:
        generator = torch.Generator(device).manual_seed(seed)
        draws.append(torch.randn(steps + 1, *shape, generator=generator, device=device))
    noise = torch.stack(draws, 1)                                               # [T+1, B, C, H, W]
    return noise[0], noise[1:]


@torch.no_grad()
def rollout(velocity, cond: Condition, x0, step_noise, sigmas, noise_level: float) -> Trajectory:
    """Sample the SDE from x_0 (sigma = 1) to x_T (sigma = 0), storing states and log pi_old.
    velocity(x, sigma, cond) -> v; x0: [B,C,H,W]; step_noise: [T,B,C,H,W]"""
    sigmas = sigmas.to(x0.device)
    s, std = sde_scale(sigmas, noise_level), transition_std(sigmas, noise_level)
    ones = torch.ones(x0.shape[0], device=x0.device)
    states, log_probs = [x0.float()], []
    for j in range(len(sigmas) - 1):
        x = states[-1]
        v = velocity(x, sigmas[j] * ones, cond)
        mean = sde_mean(x, v, sigmas[j] * ones, sigmas[j + 1] * ones, s[j] * ones)
        x_next = mean + std[j] * step_noise[j]                                  # x_{j+1} = mean_j + std_j * noise
        log_probs.append(gaussian_log_prob(x_next, mean, std[j] * ones))
        states.append(x_next)
    return Trajectory(torch.stack(states), torch.stack(log_probs), sigmas)


@torch.no_grad()
def sample_ode(velocity, cond: Condition, x0, sigmas) -> torch.Tensor:
    """Deterministic sampling (evaluation): Euler steps of the (guided) velocity.
    velocity(x, sigma, cond) -> v; x0: [B,C,H,W] -> x at sigma = 0"""
    sigmas = sigmas.to(x0.device)
    ones = torch.ones(x0.shape[0], device=x0.device)
    x = x0.float()
    for j in range(len(sigmas) - 1):
        v = velocity(x, sigmas[j] * ones, cond)
        x = ode_step(x, v, sigmas[j] * ones, sigmas[j + 1] * ones)
    return x
