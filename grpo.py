"""Flow-GRPO's math and rewards: group advantages, the PPO clip loss, the per-task reward (stage-1 teachers, the
GRPO-Mix baseline). The iteration that uses them is train.grpo_iteration (`train.py --algo grpo`); this module sits
below train.py and imports nothing from it.

Flow-GRPO (arXiv 2505.05470; docs/method.md section 6). Each prompt is rolled out G times (`--group_size`) with the Flow-SDE
(sde_sampler.py); the final states are decoded and scored by the reward r. For image i of group g(i), every
trained step j (j = 0 .. train_steps-1):

    A_i     = clip( (r_i - mean_{g(i)}(r)) / (std_batch(r) + 1e-4), -5, 5 )      the same A_i at every step j
    ratio_ij = exp(log pi_theta(x_{j+1} | x_j) - log pi_old(x_{j+1} | x_j))        (per-element-mean log-probs)
    L_ij    = max(-A_i ratio_ij, -A_i clip(ratio_ij, 1 - eps, 1 + eps)) + beta K_j(S, base)
    L       = mean_ij L_ij,      eps = --clip_range (1e-4),  beta = --beta
With --sampled_steps k each image trains k of the J steps, every step with probability k/J (Flow-GRPO's
`timestep_fraction`; drawn by systematic sampling from the image's seed, opd_loss.py), weight 1/k: an unbiased
estimate of the same L. The first optimizer step's ratios are exactly 1 (train.train_passes, train.ratio_terms).

- mean_g is over the G images of one prompt; std_batch is the (population) std over the WHOLE global batch,
  all ranks together, as Flow-GRPO does with its global std. A group always lies whole on one rank
  (train.local_batch, train.check_batch), so group means are local and only the batch moments are
  all-reduced (count, sum, sum of squares). A batch of equal rewards gives A = 0 (no NaN).
- K_j(S, base) is the per-step KL of opd_loss.step_kl (its --kl_weighting; `reference` is Flow-GRPO's KL)
  toward the reference policy: the base model (student adapter disabled), or the frozen `--anchor` LoRA when
  one is given. Its velocities are computed after the rollout with teachers.target_velocities, exactly as
  the OPD anchor term (mar.py).
- r_i = R_task(i)(x_i) + sum_k w_k r_k(x_i). `--reward` gives the weighted rewards that score every image
  (`--reward toy_ocr`, `--reward ocr=0.5,pickscore_reward=0.5`; rewards.make_weighted_reward, "name:label" to
  use one twice); `--task_rewards task=name,...` gives each image its own task's reward R_task(i) — the
  paper's GRPO-Mix scores GenEval prompts with GenEval and OCR prompts with OCR, plus DeQA on all at 0.2:
  `--task_rewards geneval=toy_geneval,ocr=toy_ocr --reward toy_quality=0.2` in the toy world.
- Tasks (prompt sets, sampled by --task_weights, logged per task) come from --prompts; in the toy world the
  default is the train prompts of the tasks of --task_rewards, else of the toy_<task> rewards in --reward.
  No --teachers.

- Rewards get each image's prompt metadata: a .jsonl prompt line's whole dict (None for .txt prompts) rides with
  its prompt (train.Prompt) through sampling, sharding and the rollout to reward(images, prompts, metadata), as
  Flow-GRPO's GenEval reward needs (`--task_rewards geneval=geneval_server --reward_options
  geneval_server.url=http://127.0.0.1:18085`; docs/rewards.md). A reward that needs metadata and would get none
  is refused at start-up (check_tasks). Remote rewards are trained on their training score (GenEval: the partial
  credit `scores`, sent with only_strict=true); evaluate.py reports the paper's numbers (rewards.py).

Deviations from Flow-GRPO's code: groups are positional (G consecutive images of one drawn prompt, whole on
one rank), not keyed on the prompt text across the gathered batch, so a prompt drawn twice forms two groups;
the reference velocities are computed once after the rollout instead of at each training pass (the base is
frozen: same values). The authors' Flow-GRPO and Flow-OPD scripts drop every sample whose advantage is zero at
all steps (the groups of equal rewards), then add back a few at random to keep the batch divisible, so those
samples also lose their KL term; we train on all samples (a zero-variance group still pulls toward the base).

Demo: torchrun --nproc_per_node=1 train.py --algo grpo --reward toy_ocr --out out/grpo_toy_ocr
"""
import torch
import torch.distributed as dist

from rewards import (REWARDS, check_metadata, check_reward_options, make_weighted_reward, parse_pairs,
                     parse_reward_options)
from rewards import make_reward as make_single_reward
from toy_tasks import TASKS as TOY_TASKS

ADVANTAGE_CLIP = 5.0


# ----------------------------------------------------------------------------------------- the math

def group_advantages(rewards, group_size: int, batch_std=None):
    """A_i = clip((r_i - mean_group(r)) / (std_batch(r) + 1e-4), -5, 5).  rewards: [N], N = groups x group_size
    (consecutive); batch_std: [] the std over the global batch (default: of `rewards`, a world of one) -> [N]"""
    r = rewards.double().view(-1, group_size)                                   # [N/G, G]
    std = r.std(unbiased=False) if batch_std is None else torch.as_tensor(batch_std).double()
    advantage = (r - r.mean(1, keepdim=True)) / (std + 1e-4)                    # (r_i - mean_g) / (std + 1e-4)
    return advantage.clamp(-ADVANTAGE_CLIP, ADVANTAGE_CLIP).flatten().float()   # [N]


def global_std(rewards):
    """Population std of the rewards of all ranks: one all-reduce of (count, sum, sum of squares).  [n] -> []"""
    r = rewards.double()
    moments = torch.stack([torch.tensor(float(r.numel()), dtype=torch.float64, device=r.device), r.sum(), r.pow(2).sum()])
    dist.all_reduce(moments)
    n, total, squares = moments
    return (squares / n - (total / n) ** 2).clamp(min=0).sqrt()                 # sqrt(E[r^2] - E[r]^2)


def grpo_loss(advantage, log_prob, log_prob_old, kl_base, beta: float, clip_range: float):
    """Per-sample L_i = max(-A_i ratio_i, -A_i clip(ratio_i, 1 - eps, 1 + eps)) + beta K_i(S, base); the batch loss
    is their mean.  all: [b] -> [b]"""
    ratio = torch.exp(log_prob - log_prob_old)                                  # pi_theta / pi_old      [b]
    clipped = torch.clamp(ratio, 1 - clip_range, 1 + clip_range)                # clip(ratio, 1 +- eps)  [b]
    policy = torch.maximum(-advantage * ratio, -advantage * clipped)           # PPO clip               [b]
    return policy + beta * kl_base                                              # + beta K_j(S, base)    [b]


# ----------------------------------------------------------------------------------------- the reward

def reward_weights(spec: str) -> dict[str, float]:
    """'toy_ocr' or 'ocr=0.5,pickscore_reward=0.5' -> {reward key: weight}; a bare key weighs 1."""
    if not spec:
        raise ValueError("--algo grpo needs --reward and/or --task_rewards (e.g. --reward toy_ocr, or "
                         "--task_rewards ocr=toy_ocr,geneval=toy_geneval --reward toy_quality=0.2)")
    weights = {}
    for item in spec.split(","):
        key, sep, weight = item.partition("=")
        if key.split(":")[0] not in REWARDS:
            raise ValueError(f"--reward: unknown reward {key!r}; known: {', '.join(REWARDS)}")
        try:
            weights[key] = float(weight) if sep else 1.0
        except ValueError:
            raise ValueError(f"--reward: weight of {key!r} is not a number: {weight!r}") from None
    return weights


def task_reward_names(task_spec: str) -> dict[str, str]:
    """'ocr=toy_ocr,geneval=toy_geneval' -> {task: reward name}."""
    names = parse_pairs(task_spec, "task_rewards")
    unknown = [name for name in names.values() if name.split(":")[0] not in REWARDS]
    if unknown:
        raise ValueError(f"--task_rewards: unknown reward {unknown[0]!r}; known: {', '.join(REWARDS)}")
    return names


def make_reward(spec: str, task_spec: str = "", options_spec: str = ""):
    """r_i = R_task(i)(x_i) + sum_k w_k r_k(x_i): the sample's own task's reward (--task_rewards; GRPO-Mix over
    tasks, as the paper scores GenEval prompts with GenEval and OCR prompts with OCR) plus the weighted rewards
    that score every sample (--reward), each built with its --reward_options.
    -> reward(images, prompts, tasks, metadata) -> (r [B], {part: r_part [B]}); metadata: one dict or None per image"""
    options, names = parse_reward_options(options_spec), task_reward_names(task_spec)
    weights = reward_weights(spec) if spec or not names else {}
    check_reward_options(options, [*names.values(), *weights])
    built = {name: make_single_reward(name, **options.get(name, {})) for name in dict.fromkeys(names.values())}
    routed = {task: built[name] for task, name in names.items()}
    shared = make_weighted_reward(weights, {k: v for k, v in options.items() if k in weights}) if weights else None

    def reward(images, prompts, tasks, metadata=None):
        metadata = metadata or [None] * len(prompts)
        total, parts = shared(images, prompts, metadata) if shared else (torch.zeros(len(prompts)), {})
        if not routed:
            return total, parts
        own, details = torch.zeros(len(prompts)), {}
        for task in dict.fromkeys(tasks):
            rows = [i for i, t in enumerate(tasks) if t == task]
            own[rows] = routed[task](images[rows], [prompts[i] for i in rows], [metadata[i] for i in rows])  # R_task(i)
            for name, value in routed[task].details.items():                   # e.g. a judge's unparseable answers
                details.setdefault(f"task_{name}", torch.zeros(len(prompts)))[rows] += value
        return total + own, {"task": own} | details | parts

    return reward


def toy_reward_tasks(spec: str, task_spec: str = "") -> list[str]:
    """The toy tasks of --task_rewards, else those whose reward `toy_<task>` is in --reward: their train prompt
    files are the default --prompts."""
    if task_spec:
        return [task for task in TOY_TASKS if task in task_reward_names(task_spec)]
    keys = {key.split(":")[0] for key in reward_weights(spec)}
    return [task for task in TOY_TASKS if f"toy_{task}" in keys]


def check_tasks(prompts: dict, task_spec: str, spec: str = "") -> None:
    """With --task_rewards, every task with prompts needs its reward; a reward that needs metadata (GenEval's) gets
    it for every prompt it scores (both refused before the base loads)."""
    names = task_reward_names(task_spec)
    missing = sorted(set(prompts) - set(names)) if task_spec else []
    if missing:
        raise ValueError(f"--task_rewards: no reward for task(s) {missing} that have prompts; add task=reward")
    shared = list(reward_weights(spec)) if spec else []
    for task, task_prompts in prompts.items():
        for key in ([names[task]] if task_spec else []) + shared:
            check_metadata(key, [getattr(p, "metadata", None) for p in task_prompts], f"task {task!r} (--prompts)")
