"""Held-out evaluation: ODE samples of test prompts, scored by each task's reward, sharded over ranks.

The generation and scoring shared by `evaluate.py` (the evaluation entry point) and train.py's in-loop
evaluation (--eval_every), so both give the same numbers for the same weights, prompts and seeds. One model
(an adapter on the shared base, or BASE) at a time: every task's prompts are generated with the deterministic
sampler (sde_sampler.sample_ode: Euler steps of the CFG velocity, negative prompt "", 40 steps and g = 4.5
for SD3.5-M), one fixed seed per image, rank r taking images r::N; each rank scores its shard, the scores are
gathered, and the task mean is the same on every rank. Sigma runs 1 -> 0 (dt < 0), as in sde_sampler.py.

"average" = mean over tasks of the task means, with the paper's normalisation of PickScore (/26) and DeQA
(/5) for tasks of those names (the paper's "Average" of GenEval, OCR, DeQA/5, PickScore/26).

Below both entry points (evaluate.py, train.py): it imports neither.
Demo: python evaluate.py --lora opd=out/opd/lora.safetensors   (toy world: its test prompts, 40 ODE steps)
"""
from functools import partial
from pathlib import Path
from statistics import fmean

from PIL import Image, ImageDraw
import torch
import torch.distributed as dist

from rewards import to_tensor
from sde_sampler import initial_noise, sample_ode
from teachers import use_adapter

NORMALISE = {"pickscore": 26.0, "deqa": 5.0}                   # the paper's Average divides these by their scale


def generate(base, prompts: list[str], seeds: list[int], steps: int, guidance: float, batch: int) -> torch.Tensor:
    """ODE samples for prompts[i] from seeds[i].  -> images [N, 3, H, W] in [0, 1], on the CPU"""
    images = []
    sigmas = base.sigmas(steps)
    for start in range(0, len(prompts), batch):
        cond = base.condition(prompts[start: start + batch])
        x0, _ = initial_noise(seeds[start: start + batch], base.latent_shape, 0, base.device)
        images.append(base.decode(sample_ode(partial(base.velocity, guidance=guidance), cond, x0, sigmas)).cpu())
    return torch.cat(images) if images else torch.empty(0)


def shard(items: list, rank: int, world: int) -> list:
    return items[rank::world]


def gather(values: list, world: int) -> list:
    """Concatenate every rank's list (rank order)."""
    parts = [None] * world
    dist.all_gather_object(parts, values)
    return [v for part in parts for v in part]


def evaluate_row(base, adapter, jobs: dict, rewards: dict, rank: int, world: int, steps: int, guidance: float,
                 batch: int, grid: int, files: dict | None = None):
    """Score one model: jobs {task: (prompts, seeds)}, one entry per image; rewards {task: reward(images, prompts,
    metadata)}, each image scored with its prompt's metadata (a .jsonl line's dict, or None).
    files {task: [path per image]}: score those image files instead of generating (evaluate.py's layouts).
    -> ({task: mean score}, {task: (rank 0's first images [k,3,H,W], their prompts)}, {task: extras}), extras
    (see breakdown) the per-tag means and the means of the reward's side values. Collective."""
    means, grids, extras = {}, {}, {}
    for task, (prompts, seeds) in jobs.items():
        mine_p, mine_s = shard(prompts, rank, world), shard(seeds, rank, world)
        if files:                                             # score the files the layout wrote or kept
            mine_f = shard(files[task], rank, world)
            images = to_tensor([Image.open(f) for f in mine_f]) if mine_f else torch.empty(0)
        else:
            with use_adapter(base.transformer, adapter):
                images = generate(base, mine_p, mine_s, steps, guidance, batch)
        metadata = [getattr(p, "metadata", None) for p in mine_p]            # each prompt's .jsonl line, or None
        scores = rewards[task](images, mine_p, metadata).tolist() if mine_p else []
        details = {name: value.tolist() for name, value in getattr(rewards[task], "details", {}).items()} if mine_p else {}
        tags = [m.get("tag") if isinstance(m, dict) else None for m in metadata]
        mine = [(s, tag, {name: v[i] for name, v in details.items()}) for i, (s, tag) in enumerate(zip(scores, tags))]
        rows = gather(mine, world)                            # (score, tag, details) of every image, all ranks
        means[task] = sum(s for s, _, _ in rows) / len(rows)
        extras[task] = breakdown(rows)
        k = max(1, grid // world)
        grids[task] = (images[:k], mine_p[:k])                # this rank's shard: prompts r, r + N, ...
    return means, grids, extras


def breakdown(rows: list) -> dict:
    """rows: (score, tag or None, {detail: value}) per image -> {"by_tag": {tag: mean score}, "tag_mean": mean of
    those (GenEval's overall score is the mean of its per-tag accuracies), "details": {detail: mean}}, where present."""
    extras = {}
    tags = sorted({tag for _, tag, _ in rows if tag is not None})
    if tags:
        extras["by_tag"] = {tag: fmean(s for s, t, _ in rows if t == tag) for tag in tags}
        extras["tag_mean"] = fmean(extras["by_tag"].values())
    names = sorted({name for _, _, d in rows for name in d})
    if names:
        extras["details"] = {name: fmean(d[name] for _, _, d in rows if name in d) for name in names}
    return extras


def average(means: dict) -> float:
    return sum(m / NORMALISE.get(task, 1.0) for task, m in means.items()) / len(means)


def save_grid(grids: dict, path: Path) -> None:
    """One row per (model, task): rank 0's first images, each captioned with its prompt (wrapped)."""
    rows = [(label, task, images, prompts) for label, by_task in grids.items()
            for task, (images, prompts) in by_task.items()]
    size = max(128, rows[0][2].shape[-1])
    cols = max(len(images) for _, _, images, _ in rows)
    caption = 36
    canvas = Image.new("RGB", (160 + cols * size, len(rows) * (size + caption)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (label, task, images, prompts) in enumerate(rows):
        y = r * (size + caption)
        draw.text((4, y + size // 2), f"{label}\n{task}", fill="black")
        for c, image in enumerate(images):
            pixels = (image.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
            canvas.paste(Image.fromarray(pixels).resize((size, size), Image.NEAREST), (160 + c * size, y))
            prompt = prompts[c]
            draw.text((160 + c * size + 2, y + size + 2), "\n".join([prompt[i: i + 24] for i in range(0, 48, 24)]),
                      fill="black")
    canvas.save(path)
