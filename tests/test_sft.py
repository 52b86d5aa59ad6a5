"""SFT cold start (train.py --algo sft): flow matching on teacher samples moves the student toward the teacher."""
from functools import partial

import torch

from conftest import in_world_of_one, random_lora, write_peft
from evaluate import generate
from merge_lora import load_lora
from models import load_base
from sde_sampler import initial_noise, sample_ode
from sft import flow_matching_loss
from teachers import BASE, add_adapter, use_adapter
import train

PROMPTS = ["a red cat", "two blue dogs", "a sign that says hello", "the dog on the left"]


def test_sft_lowers_the_flow_matching_loss_and_moves_samples_toward_the_teacher(sd3_folder, sd3_transformer, tmp_path):
    teacher = write_peft(random_lora(sd3_transformer, 21, std=0.4), tmp_path / "ocr")
    (tmp_path / "ocr.txt").write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "sft"
    in_world_of_one(train.main, ["--base", sd3_folder, "--algo", "sft", "--teachers", f"ocr={teacher}", "--prompts",
                                 f"ocr={tmp_path / 'ocr.txt'}", "--out", out, "--resolution", "16",
                                 "--sft_sample_steps", "4", "--images_per_iteration", "8", "--group_size", "2",
                                 "--micro_batch", "8", "--updates", "1", "--iterations", "15", "--lr", "1e-2",
                                 "--rank", "8", "--alpha", "8"], threads=1)              # run_train's OMP_NUM_THREADS=1
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 15
    base = load_base(str(sd3_folder), "cpu", torch.float32, 16)
    add_adapter(base.transformer, load_lora(teacher), "teacher")
    add_adapter(base.transformer, load_lora(out / "lora.safetensors"), "student")
    samples = {}
    for name in (BASE, "teacher", "student"):
        with use_adapter(base.transformer, name):
            samples[name] = generate(base, PROMPTS, [101, 102, 103, 104], steps=4, guidance=4.5, batch=4)
    before = (samples[BASE] - samples["teacher"]).pow(2).mean().item()
    after = (samples["student"] - samples["teacher"]).pow(2).mean().item()
    assert after < 0.7 * before, (before, after)

    # L_FM on fresh teacher samples (a sigma grid, one noise draw): lower for the student than for the base
    cond, (x0, _) = base.condition(PROMPTS), initial_noise([201, 202, 203, 204], base.latent_shape, 0, "cpu")
    with use_adapter(base.transformer, "teacher"):
        target = sample_ode(partial(base.velocity, guidance=4.5), cond, x0, base.sigmas(4))  # teacher latents, sigma 0
    noise = torch.randn(target.shape, generator=torch.Generator().manual_seed(9))
    fm = {}
    for name in (BASE, "student"):
        with use_adapter(base.transformer, name), torch.no_grad():
            fm[name] = sum(flow_matching_loss(partial(base.velocity, guidance=None), target, cond,
                                              torch.full((4,), sigma), noise).mean()
                           for sigma in (0.2, 0.5, 0.8)).item()
    assert fm["student"] < 0.9 * fm[BASE], fm
