"""Flow-matching supervised fine-tuning: the SFT cold start of Flow-OPD, and the toy world's pre-training.

SFT cold start (Flow-OPD paper; absent from the authors' code): sample each teacher on its own task's
prompts with the ODE (the evaluation settings), then train the student LoRA with L_FM on those samples:
`train.py --algo sft` (train.sft_iteration: same config, data, routing, adapters, distributed loop and
checkpoints as Flow-OPD), whose lora.safetensors is then `--init_lora` of the OPD run.

Rectified-flow / SD3 objective (sigma runs 1 -> 0, x_sigma = (1 - sigma) x0 + sigma eps):
    L_FM = E_{x0, eps, sigma} || v_theta(x_sigma, sigma, c) - (eps - x0) ||^2
with sigma drawn logit-normal (SD3's default: sigma = sigmoid(n), n ~ N(0, 1)). v_theta(., c) is the conditional
velocity: on SD3 the conditional branch alone (no CFG pair; guidance None); on a guidance-distilled base (FLUX.1-dev),
which has no unconditional branch, its one forward with the guidance embedding at the sampling guidance
(models.Base.conditional_guidance), as FLUX.1-dev LoRA fine-tuning does. The SFT student then matches the teacher
samples at that guidance, the one its rollouts and the OPD/GRPO losses use.

Demo: python toyworld.py build   (pre-trains the toy base with this loss)
"""
import torch

from sde_sampler import Condition


def flow_matching_loss(velocity, x0, cond: Condition, sigma, noise) -> torch.Tensor:
    """|| v(x_sigma) - (eps - x0) ||^2 per sample, mean over elements; velocity(x, sigma, cond) -> float32 v is the
    conditional velocity, no CFG (models.Base.velocity at Base.conditional_guidance: SD3 None, FLUX.1-dev --guidance).
    x0, noise: [B,C,H,W]; sigma: [B] -> [B]"""
    s = sigma.view(-1, 1, 1, 1)
    x_sigma = (1 - s) * x0 + s * noise                                          # x_sigma = (1 - sigma) x0 + sigma eps
    v = velocity(x_sigma, sigma, cond)
    return (v - (noise - x0)).pow(2).flatten(1).mean(1)                         # target v = eps - x0


def train_flow_matching(velocity, encode, latents, prompts, optimizer, steps: int, batch_size: int, seed: int,
                        null_prompt_p: float = 0.1, scheduler=None, desc: str = "flow matching") -> float:
    """`steps` AdamW steps of L_FM on random minibatches of (latents [N,C,H,W] on the model's device, prompts); a
    prompt is replaced by "" with probability `null_prompt_p` (so CFG's unconditional branch is trained).
    velocity(x, sigma, cond) -> v: the conditional velocity (flow_matching_loss). Returns the mean loss."""
    from tqdm import tqdm
    device = latents.device
    generator = torch.Generator().manual_seed(seed)                            # batch rows and prompt dropout
    device_generator = torch.Generator(device).manual_seed(seed)               # sigma and noise
    params = [p for group in optimizer.param_groups for p in group["params"]]
    total = torch.zeros((), device=device)
    for _ in tqdm(range(steps), desc=desc, mininterval=10, disable=steps < 20):
        rows = torch.randint(len(prompts), (batch_size,), generator=generator)
        drop = torch.rand(batch_size, generator=generator) < null_prompt_p
        x0 = latents[rows.to(device)].float()
        embeds, pooled = encode(["" if d else prompts[r] for r, d in zip(rows.tolist(), drop.tolist())])
        sigma = torch.sigmoid(torch.randn(batch_size, generator=device_generator, device=device))
        noise = torch.randn(x0.shape, generator=device_generator, device=device)
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            loss = flow_matching_loss(velocity, x0, Condition(embeds, pooled, None, None), sigma, noise).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        total += loss.detach()
    return total.item() / max(steps, 1)
