"""grpo.py: group advantages and the PPO clip against closed forms, the GRPO-Mix reward; train.grpo_iteration
(train.py --algo grpo) end to end on the toy base (1 process, and 2 gloo processes against 1)."""
import json
import math
import socket

import pytest
import torch
import torch.distributed as dist

import toy_tasks
from grpo import global_std, group_advantages, grpo_loss, make_reward
from conftest import in_world_of_one
from merge_lora import load_lora
from rewards import make_reward as make_single_reward
from test_train import run_train
import train
from train import parse_config, setup

# 10 SDE steps: at 4 the toy base draws nothing the OCR reward can read (every reward 0, every advantage 0).
# Rows per forward = images per rank (2): 1 and 2 processes then batch the same rows together, so the LoRAs agree to
# rounding (with larger chunks the batch layout depends on the world size, and so does the last bit)
GRPO = ["--algo", "grpo", "--reward", "toy_ocr", "--images_per_iteration", "4", "--group_size", "2",
        "--micro_batch", "2", "--target_batch", "2", "--train_batch", "2", "--steps", "10", "--train_steps", "2",
        "--eval_every", "0"]


# ----------------------------------------------------------------------------------------- advantages

def test_group_advantages_closed_form():
    rewards = torch.tensor([1.0, 2.0, 3.0, 6.0, 0.0, 4.0, 4.0, 4.0])            # two groups of 4
    std = math.sqrt(((rewards - rewards.mean()) ** 2).mean().item())          # population std of the whole batch
    expected = torch.tensor([-2.0, -1.0, 0.0, 3.0, -3.0, 1.0, 1.0, 1.0]) / (std + 1e-4)
    assert torch.allclose(group_advantages(rewards, 4), expected, atol=1e-6)
    # the batch std is an argument (the global one, from all ranks); the group means stay local
    assert torch.allclose(group_advantages(rewards, 4, torch.tensor(2.0)), expected * (std + 1e-4) / 2.0001, atol=1e-6)


def test_zero_variance_gives_zero_advantage_without_nan():
    flat = group_advantages(torch.full((6,), 0.1), 3)                         # the whole batch: std 0
    assert torch.isfinite(flat).all() and flat.abs().max() < 1e-6
    mixed = group_advantages(torch.tensor([0.7, 0.7, 0.0, 1.0]), 2)           # one zero-variance group
    assert mixed[:2].abs().max() < 1e-6 and mixed[2] < 0 < mixed[3]


def test_sign_and_scale():
    rewards = torch.tensor([0.2, 0.9, 0.5, 0.1, 0.4, 0.3])
    a = group_advantages(rewards, 3)
    groups = rewards.view(2, 3)
    assert torch.equal(a > 0, (groups > groups.mean(1, keepdim=True)).flatten())   # above its group's mean: A > 0
    # invariant to r -> c r + d (c > 0) up to the 1e-4 in the denominator; c < 0 flips the sign
    assert torch.allclose(group_advantages(1000 * rewards + 7, 3), a, atol=1e-3)
    assert torch.allclose(group_advantages(-1000 * rewards, 3), -a, atol=1e-3)
    # total variance = within-group + between-group means: mean(A^2) = 1 - var(group means) / var(r)
    between = groups.mean(1).var(unbiased=False) / rewards.var(unbiased=False)
    assert torch.allclose(a.pow(2).mean(), 1 - between, atol=1e-3)


def test_advantages_are_clipped_at_five():
    rewards = torch.zeros(200)
    rewards[0] = 1.0                                                           # batch std ~0.07: A_0 ~ +7, A_1 ~ -7
    a = group_advantages(rewards, 2)
    assert a[0].item() == 5.0 and a[1].item() == -5.0 and a[2:].abs().max() == 0


def test_global_std_in_a_world_of_one_is_the_population_std():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        rewards = torch.tensor([0.3, 0.9, 0.1, 0.5, 0.5])
        assert torch.allclose(global_std(rewards).float(), rewards.std(unbiased=False), atol=1e-7)
        assert global_std(torch.full((4,), 0.25)).item() == 0
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------- the PPO clip

def test_value_at_ratio_one_is_minus_advantage_plus_beta_kl():
    advantage, kl = torch.tensor([1.5, -0.5, 0.0]), torch.tensor([0.2, 0.0, 1.0])
    log_prob = torch.tensor([-1.3, 0.4, 2.0], requires_grad=True)
    loss = grpo_loss(advantage, log_prob, log_prob.detach(), kl, beta=0.04, clip_range=1e-4)
    assert torch.allclose(loss, -advantage + 0.04 * kl)
    grad, = torch.autograd.grad(loss.sum(), log_prob)                          # d(-A ratio)/d log pi = -A at ratio 1
    assert torch.allclose(grad, -advantage)


def test_clip_stops_the_ratio_gradient_on_the_clipped_side():
    eps = 1e-4
    advantage = torch.tensor([2.0, 2.0, -2.0, -2.0])
    log_prob = torch.tensor([0.01, -0.01, 0.01, -0.01], requires_grad=True)    # ratios e^{+-0.01}, outside 1 +- eps
    loss = grpo_loss(advantage, log_prob, torch.zeros(4), torch.zeros(4), beta=0.0, clip_range=eps)
    grad, = torch.autograd.grad(loss.sum(), log_prob)
    up, down = math.exp(0.01), math.exp(-0.01)
    # A > 0: a gain above 1 + eps is clipped (constant); below 1 - eps the unclipped -A r is the max and trains
    # A < 0: symmetric: above 1 + eps trains, below 1 - eps is clipped
    assert torch.allclose(loss, torch.tensor([-2 * (1 + eps), -2 * down, 2 * up, 2 * (1 - eps)]))
    assert torch.allclose(grad, torch.tensor([0.0, -2 * down, 2 * up, 0.0]))
    assert grad[0].item() == 0 and grad[3].item() == 0


def test_kl_term_carries_its_gradient_at_zero_advantage():
    kl = torch.tensor([0.3, 0.7], requires_grad=True)
    loss = grpo_loss(torch.zeros(2), torch.zeros(2), torch.zeros(2), kl, beta=0.04, clip_range=1e-4)
    grad, = torch.autograd.grad(loss.sum(), kl)
    assert torch.allclose(loss, 0.04 * kl) and torch.allclose(grad, torch.full((2,), 0.04))


# ----------------------------------------------------------------------------------------- rewards

def test_weighted_reward_is_the_weighted_sum_of_the_rewards():
    prompts = toy_tasks.prompt_split("ocr", "train")[:6]
    clean = torch.stack([toy_tasks.render("ocr", p, seed=i) for i, p in enumerate(prompts)])
    noisy = (clean + 0.3 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    images = torch.cat([clean[:3], noisy[3:]])                                 # rewards that differ
    ocr, quality = (make_single_reward(name)(images, prompts) for name in ("toy_ocr", "toy_quality"))
    total, parts = make_reward("toy_ocr=0.7,toy_quality=0.3")(images, prompts, ["ocr"] * 6)
    assert torch.allclose(total, 0.7 * ocr + 0.3 * quality) and len(set(total.tolist())) > 1
    assert torch.equal(parts["toy_ocr"], ocr) and torch.equal(parts["toy_quality"], quality)
    single, _ = make_reward("toy_ocr")(images, prompts, ["ocr"] * 6)           # a bare name weighs 1
    assert torch.equal(single, ocr)


def test_task_rewards_score_each_image_with_its_own_task_plus_the_shared_rewards():
    tasks = ["geneval", "ocr", "ocr", "geneval"]
    prompts = [toy_tasks.prompt_split(t, "train")[i] for i, t in enumerate(tasks)]
    images = torch.stack([toy_tasks.render(t, p, seed=i) for i, (t, p) in enumerate(zip(tasks, prompts))])
    images[1] = 1.0                                                            # a blank OCR image: own reward 0
    total, parts = make_reward("toy_quality=0.2", "geneval=toy_geneval,ocr=toy_ocr")(images, prompts, tasks)
    own = torch.stack([make_single_reward(f"toy_{t}")(images[i: i + 1], [p])[0] for i, (t, p) in enumerate(zip(tasks, prompts))])
    quality = make_single_reward("toy_quality")(images, prompts)
    assert torch.allclose(parts["task"], own) and torch.allclose(total, own + 0.2 * quality)
    assert own[1] < 0.5 < own[0]                                               # toy_ocr never saw a geneval prompt


@pytest.mark.parametrize("flags, message", [
    (["--algo", "grpo"], "--algo grpo needs --reward"),
    (["--algo", "grpo", "--reward", "toy_ocr=heavy"], "weight of 'toy_ocr' is not a number"),
    (["--algo", "grpo", "--reward", "pickscor"], "unknown reward 'pickscor'"),
    (["--algo", "grpo", "--reward", "toy_ocr", "--teachers", "toy/ocr.safetensors"], "takes no --teachers"),
    (["--algo", "grpo", "--reward", "brightness"], "--prompts is required"),
    (["--teachers", "toy/ocr.safetensors", "--reward", "toy_ocr"], "--reward and --task_rewards are for --algo grpo"),
    (["--algo", "grpo", "--task_rewards", "ocr=toy_ocr", "--prompts", "ocr=toy/ocr_train.txt,geneval=toy/geneval_train.jsonl"],
     r"no reward for task\(s\) \['geneval'\]"),
])
def test_bad_grpo_flags_are_refused_before_loading(flags, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        setup(parse_config([*flags, "--out", str(tmp_path / "out")]), 0, 1, torch.device("cpu"))
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------- end to end

def test_grpo_trains_on_the_toy_base(tmp_path):
    out = tmp_path / "run"
    in_world_of_one(train.main, [*GRPO, "--iterations", "2", "--out", out], threads=1)   # as run_train: 1 thread
    record = json.loads((out / "config.json").read_text())
    assert record["config"]["algo"] == "grpo" and record["config"]["reward"] == "toy_ocr"
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["iteration"] for m in metrics] == [1, 2]
    for m in metrics:
        assert 0 <= m["reward"] <= 1 and m["reward/ocr"] == m["reward"]
        assert {k for k in m if k.startswith("reward/")} == {"reward/ocr"}      # tasks: those named in --reward
        assert m["reward_std"] > 0 and m["advantage_abs"] > 0 and abs(m["advantage"]) < 1e-6  # group means: sum 0
        assert 0 <= m["clip_fraction"] <= 1 and m["kl_base"] >= 0 and m["grad_norm"] > 0
        assert all(m[f"seconds_{k}"] >= 0 for k in ("rollout", "reward", "targets", "train", "optimizer"))
    assert metrics[1]["kl_base"] > 0                                          # the student has left the base
    lora = load_lora(out / "lora.safetensors")                                 # B starts at 0: training moved it
    assert max(b.abs().max().item() for b in lora.B.values()) > 1e-4


def test_two_processes_give_the_same_lora_as_one(tmp_path):
    args = [*GRPO, "--iterations", "1", "--updates", "1"]
    in_world_of_one(train.main, [*args, "--out", tmp_path / "one"], threads=1)   # run_train's OMP_NUM_THREADS=1
    run_train([*args, "--out", tmp_path / "two"], nproc=2)                    # one group per rank
    one, two = load_lora(tmp_path / "one" / "lora.safetensors"), load_lora(tmp_path / "two" / "lora.safetensors")
    assert max(b.abs().max().item() for b in one.B.values()) > 1e-4
    for m in one.A:
        assert torch.allclose(one.A[m], two.A[m], atol=1e-6) and torch.allclose(one.B[m], two.B[m], atol=1e-6), m
    first, second = (json.loads((tmp_path / d / "metrics.jsonl").read_text()) for d in ("one", "two"))
    # the advantages use the std of the GLOBAL batch: a per-rank std would change these
    for key in ("reward", "reward_std", "advantage_abs", "grad_norm"):
        assert abs(first[key] - second[key]) < 1e-6 * max(1.0, abs(first[key])), key
