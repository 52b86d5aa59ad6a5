"""Evaluation: generate held-out prompts with the ODE sampler, score each task with its reward, one table.

Defaults are the paper's SD3.5-M evaluation settings (used as they are when `--base` is an SD3 folder):
40 Euler ODE steps, CFG g = 4.5 with the negative prompt "" (models.Base.condition), 512 px, T5 prompt
length 128 tokens, the folder's scheduler shift (3.0). The toy world ignores resolution and T5 length. A FLUX.1
folder (models.load_flux) takes its guidance embedding at 3.5 by default (Flow-GRPO's FLUX setting; one forward, no
negative prompt); Flow-GRPO evaluates FLUX.1-dev with 28 steps (--steps 28).

For each model row (the base, then each `--lora`), every task's test prompts are generated with the
deterministic sampler (sde_sampler.sample_ode: Euler steps of the CFG velocity, 40 steps and g = 4.5 for
SD3.5-M), one fixed seed per (prompt, image), sharded across torchrun ranks (rank r takes prompts r::N),
and scored by the task's reward (rewards.py) with each prompt's metadata (a .jsonl line's whole dict, None for .txt;
GenEval needs it). Rewards are built for evaluation: a remote GenEval or DeQA reward reports the paper's number,
not the training reward (rewards.py; docs/rewards.md), set up with `--reward_options reward.option=value,...`
(the spelling train.py uses). Rank 0 writes the table (markdown + JSON) and a PNG grid of the first prompts of
every row, captioned. results.json also holds a `breakdown` per row and task: the mean per metadata "tag" (GenEval's
six categories), their mean, and the means of a reward's side values (e.g. a judge's unparseable answers).
Generation, scoring and the grid are heldout.py's, shared with train.py's in-loop evaluation
(--eval_every), so the two give the same numbers for the same weights.

"average" = mean over tasks of the task means, with the paper's normalisation of PickScore (/26) and DeQA
(/5) for tasks of those names (the paper's "Average" of GenEval, OCR, DeQA/5, PickScore/26).

`--layout t2i_compbench` writes images for T2I-CompBench's own scorers instead (BLIP-VQA, UniDet, CLIP,
3-in-1; each reads `<category>/samples/`): one model per `--out` (the base, or `--skip_base` and one
`--lora`), `{out}/{task}/samples/{prompt}_{k:05d}.png` for k < images_per_prompt (the benchmark wants
`--images_per_prompt 10`), the task name being the category (color, shape, texture, spatial, non_spatial,
complex). The prompt is the file name as is, as the benchmark's scripts parse it back (`name.split("_")[0]`):
a prompt holding "/" or "_" or longer than 200 bytes is refused, not rewritten; a repeated prompt is
generated once. Seeds come from (--seed, prompt index, k), so a shard, a rerun or a larger
--images_per_prompt gives the same image for the same (prompt, k). Files that exist are skipped (resume);
rank 0 lists the missing ones and each rank generates its share, writing each PNG atomically (a temp file
next to samples/, then os.replace). `{out}/layout.json` records the settings; a rerun with other
generation settings (base, LoRA, steps, guidance, resolution, T5 length, seed) is refused. Without
`--rewards` there is no table; with them the written files are read back and scored as above.
On CPU the files come out byte-identical across sharding and resume (tests/test_evaluate.py, tiny SD3);
batched GPU kernels may round differently for another batch composition, so there a resumed run can
differ from an uninterrupted one by a pixel level here and there.

Demo (toy world, no flags needed): python evaluate.py --lora opd=out/opd/lora.safetensors
SD3.5-M: torchrun --nproc_per_node=8 evaluate.py --base sd3.5-medium --prompts ocr=ocr_test.txt \
             --rewards ocr=ocr --lora flow_opd=out/opd/lora.safetensors --out out/eval_opd
T2I-CompBench: torchrun --nproc_per_node=8 evaluate.py --base sd3.5-medium --layout t2i_compbench \
             --prompts color=color_val.txt,spatial=spatial_val.txt --images_per_prompt 10 \
             --skip_base --lora flow_opd=out/opd/lora.safetensors --out out/compbench_opd
"""
from dataclasses import dataclass, fields
import json
import os
from pathlib import Path
import sys
import time

import torch
import torch.distributed as dist
from PIL import Image

import checkpoint
import heldout
from heldout import average, generate, shard
from merge_lora import LoRAFileError, load_lora
from models import family_defaults, load_base
from rewards import (RewardError, check_metadata, check_reward_options, make_reward, parse_reward_options,
                     to_uint8)
from teachers import BASE, add_adapter, use_adapter
import toy_tasks
from train import (check_limits, check_out_folder, exit_with_error, parse_flags, parse_pairs, read_prompts, sample_seed,
                   setup_distributed)

LAYOUTS = ("", "t2i_compbench")
# numeric flags: their allowed range, checked at start and shown by --help
LIMITS = {"lora_alpha": ">= 0", "steps": ">= 1", "guidance": ">= 0", "resolution": ">= 1",
          "max_sequence_length": ">= 1", "images_per_prompt": ">= 1", "max_prompts": ">= 0", "batch": ">= 1",
          "seed": ">= 0", "grid": ">= 1"}
SAME_ON_RESUME = ("base", "lora", "lora_alpha", "skip_base", "steps", "guidance", "resolution", "max_sequence_length",
                  "seed")


@dataclass
class EvalConfig:
    base: str = ""                     # diffusers SD3 or FLUX.1 folder; "" = the toy world
    lora: str = ""                     # comma list name=path; each is one row after the base
    tasks: str = ""                    # comma list; "" = every task with prompts (toy: geneval,ocr,quality)
    prompts: str = ""                  # comma list task=file; "" = the toy test splits
    rewards: str = ""                  # comma list task=reward name (rewards.py); "" = toy_<task>
    reward_options: str = ""           # comma list reward.option=value (geneval_server.url=http://127.0.0.1:18085)
    lora_alpha: float = 0.0            # alpha for LoRA files that carry none
    steps: int = 40                    # ODE steps
    guidance: float = 4.5              # CFG scale g (a FLUX base: its guidance embedding, default 3.5)
    resolution: int = 512              # image side in pixels (the toy world ignores it)
    max_sequence_length: int = 128     # T5 prompt tokens (the toy world ignores it)
    images_per_prompt: int = 1         # images per prompt, each from its own seed (T2I-CompBench wants 10)
    max_prompts: int = 0               # the first prompts of each task only; 0 = all
    batch: int = 32                    # images per forward, per rank
    seed: int = 0                      # each image's noise is a function of it and the image's index
    grid: int = 8                      # grid columns: the first prompts of each task
    out: str = "out/eval"              # folder: table.md, results.json, grid.png (or the layout's files)
    skip_base: bool = False            # no base row: only the --lora rows
    layout: str = ""                   # "" = score and tabulate; t2i_compbench = image files for its scorers


def evaluate_row(base, adapter, jobs: dict, rewards: dict, cfg: EvalConfig, rank: int, world: int):
    """heldout.evaluate_row with this config (means, grids, extras); the layouts score the files write_layout wrote or kept."""
    files = ({task: layout_files(Path(cfg.out), task, prompts, cfg.images_per_prompt)
              for task, (prompts, _) in jobs.items()} if cfg.layout else None)
    return heldout.evaluate_row(base, adapter, jobs, rewards, rank, world, cfg.steps, cfg.guidance, cfg.batch,
                                cfg.grid, files)


def layout_files(out: Path, task: str, prompts: list[str], images_per_prompt: int) -> list[Path]:
    """The T2I-CompBench file of each image (prompts: one entry per image, k = i % images_per_prompt)."""
    return [out / task / "samples" / f"{p}_{i % images_per_prompt:05d}.png" for i, p in enumerate(prompts)]


def check_file_prompt(prompt: str, source: Path) -> None:
    """The prompt is the file name as is, and T2I-CompBench's scripts read it back with name.split("_")[0]."""
    if "/" in prompt or "_" in prompt or len(prompt.encode()) > 200:
        raise ValueError(f"{source}: prompt {prompt[:60]!r} cannot name a T2I-CompBench file "
                         "(it holds '/' or '_', or is longer than 200 bytes)")


def check_layout_record(cfg: EvalConfig) -> None:
    """A rerun into the same --out must make the same images as the files it keeps."""
    path = Path(cfg.out) / "layout.json"
    if path.is_file():
        before = json.loads(path.read_text())["config"]
        changed = [f"--{k}" for k in SAME_ON_RESUME if before.get(k) != getattr(cfg, k)]
        if changed:
            raise ValueError(f"{path} was written with another {', '.join(changed)}; choose another --out")


def save_png(pixels, path: Path, tmp: Path) -> None:
    """Atomic write: a killed run leaves whole PNGs or none (the temp file sits outside samples/)."""
    Image.fromarray(pixels).save(tmp, format="PNG")
    os.replace(tmp, path)


def write_layout(base, adapter, jobs: dict, cfg: EvalConfig, rank: int, world: int) -> tuple[int, int]:
    """Generate the missing T2I-CompBench files, rank r the missing images r::N.  -> (generated, total), all ranks"""
    generated = total = 0
    for task, (prompts, seeds) in jobs.items():
        files = layout_files(Path(cfg.out), task, prompts, cfg.images_per_prompt)
        missing = [None]
        if rank == 0:                                         # one listing, so every rank shards the same list
            files[0].parent.mkdir(parents=True, exist_ok=True)
            missing = [[i for i, f in enumerate(files) if not f.exists()]]
        dist.broadcast_object_list(missing, 0)
        mine = shard(missing[0], rank, world)
        for start in range(0, len(mine), cfg.batch):         # write each batch: a kill loses at most one
            chunk = mine[start: start + cfg.batch]
            with use_adapter(base.transformer, adapter):
                images = generate(base, [prompts[i] for i in chunk], [seeds[i] for i in chunk], cfg.steps,
                                  cfg.guidance, cfg.batch)
            for i, pixels in zip(chunk, to_uint8(images)):
                save_png(pixels, files[i], files[i].parent.parent / f".partial_rank{rank}.png")
        generated, total = generated + len(missing[0]), total + len(files)
    dist.barrier()                                            # every file is there before any is read back
    return generated, total


def markdown_table(table: dict) -> str:
    tasks = list(next(iter(table.values())))
    lines = ["| model | " + " | ".join(tasks) + " | average |", "|---" * (len(tasks) + 2) + "|"]
    for row, means in table.items():
        lines.append(f"| {row} | " + " | ".join(f"{means[t]:.3f}" for t in tasks) + f" | {average(means):.3f} |")
    return "\n".join(lines)


def resolve_jobs(cfg: EvalConfig) -> tuple[dict, dict]:
    """-> jobs {task: (prompts, seeds)}, one entry per image, and rewards {task: reward fn} ({}: no scores)."""
    if cfg.layout not in LAYOUTS:
        raise ValueError(f"--layout {cfg.layout!r}: expected one of {', '.join(map(repr, LAYOUTS))}")
    files = {t: Path(f) for t, f in parse_pairs(cfg.prompts, "prompts").items()}
    if not files:
        if cfg.base:
            raise ValueError("--prompts is required with --base (e.g. --prompts ocr=dataset/ocr/test.txt)")
        files = {task: toy_tasks.prompt_file(task, "test") for task in toy_tasks.TASKS}
    tasks = cfg.tasks.split(",") if cfg.tasks else list(files)
    given = parse_pairs(cfg.rewards, "rewards")
    scored = not cfg.layout or bool(given)                   # the t2i_compbench layout scores only with --rewards
    reward_names = {t: f"toy_{t}" for t in tasks} | given
    missing = [t for t in tasks if t not in files or (scored and (cfg.base or cfg.layout) and t not in given)]
    if missing:
        raise ValueError(f"tasks {missing} need a prompt file (--prompts) and a reward (--rewards task=name)")
    options = parse_reward_options(cfg.reward_options)
    check_reward_options(options, [reward_names[t] for t in tasks] if scored else [])
    jobs, n = {}, cfg.images_per_prompt
    for task in tasks:
        prompts = read_prompts(files[task])
        if scored:                                            # e.g. geneval_server without *_metadata.jsonl
            check_metadata(reward_names[task], [p.metadata for p in prompts], f"task {task!r} ({files[task]})")
        if cfg.layout:                                        # one file name per (prompt, k)
            prompts = list(dict.fromkeys(prompts))
            for prompt in prompts:
                check_file_prompt(prompt, files[task])
        prompts = prompts[: cfg.max_prompts or None]
        seeds = ([sample_seed(cfg.seed, p, k) for p in range(len(prompts)) for k in range(n)] if cfg.layout
                 else [sample_seed(cfg.seed, i) for i in range(len(prompts) * n)])
        jobs[task] = ([p for p in prompts for _ in range(n)], seeds)
    names = dict.fromkeys(reward_names[t] for t in tasks) if scored else {}
    built = {key: make_reward(key, evaluation=True, **options.get(key, {})) for key in names}   # once per reward
    return jobs, {t: built[reward_names[t]] for t in tasks} if scored else {}


def main(argv: list[str]) -> None:
    values, names = parse_flags(EvalConfig, argv), {f.name for f in fields(EvalConfig)}
    defaults = {k: v for k, v in family_defaults(values.get("base", "")).items() if k in names}   # FLUX: its guidance
    cfg = EvalConfig(**(defaults | values))
    check_limits(cfg, LIMITS)
    check_out_folder(Path(cfg.out), "table.md, results.json, grid.png")
    checkpoint.check_out(Path(cfg.out))
    loras = parse_pairs(cfg.lora, "lora")
    if "base" in loras:
        raise ValueError(f"--lora base={loras['base']}: 'base' names the base model's row; give the LoRA another name")
    jobs, rewards = resolve_jobs(cfg)
    rows = ({} if cfg.skip_base else {"base": BASE}) | {name: name for name in loras}
    if not rows:
        raise ValueError("--skip_base with no --lora leaves nothing to evaluate: give --lora name=path")
    if cfg.layout:
        if len(rows) != 1:
            raise ValueError(f"--layout {cfg.layout} writes one model per --out: the base alone, or --skip_base "
                             "and one --lora")
        check_layout_record(cfg)
    rank, world, device = setup_distributed()
    try:
        base = load_base(cfg.base, device, torch.bfloat16 if device.type == "cuda" else torch.float32,
                         cfg.resolution, cfg.max_sequence_length)
        for name, path in loras.items():
            add_adapter(base.transformer, load_lora(path, cfg.lora_alpha or None), name, path)
        t0 = time.perf_counter()
        if cfg.layout:
            if rank == 0:
                Path(cfg.out).mkdir(parents=True, exist_ok=True)
                record = {"config": cfg.__dict__, "world_size": world,
                          "images": {t: len(p) for t, (p, _) in jobs.items()}}
                (Path(cfg.out) / "layout.json").write_text(json.dumps(record, indent=2))
            generated, total = write_layout(base, next(iter(rows.values())), jobs, cfg, rank, world)
            if rank == 0:
                print(f"{cfg.layout}: {generated} images generated, {total - generated} kept, in {cfg.out}", flush=True)
        table, grids, extras = {}, {}, {}
        for label, adapter in rows.items() if rewards else ():
            table[label], grids[label], extras[label] = evaluate_row(base, adapter, jobs, rewards, cfg, rank, world)
            if rank == 0:
                tag_means = {t: f" (mean over tags {e['tag_mean']:.3f})" for t, e in extras[label].items()
                             if "tag_mean" in e}
                print(f"{label}: " + ", ".join(f"{t} {m:.3f}{tag_means.get(t, '')}" for t, m in table[label].items()),
                      flush=True)
        if rank == 0 and rewards:
            write_results(cfg, table, grids, jobs, time.perf_counter() - t0, world, extras)
    finally:
        dist.destroy_process_group()


def write_results(cfg: EvalConfig, table: dict, grids: dict, jobs: dict, seconds: float, world: int,
                  extras: dict | None = None) -> None:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    text = markdown_table(table)
    print(text)
    (out / "table.md").write_text(text + "\n")
    record = {"table": table, "average": {row: average(m) for row, m in table.items()},
              "prompts": {t: len(p) for t, (p, _) in jobs.items()}, "config": cfg.__dict__, "seconds": seconds,
              "world_size": world, "breakdown": extras or {}}
    (out / "results.json").write_text(json.dumps(record, indent=2))
    heldout.save_grid(grids, out / "grid.png")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ValueError, FileNotFoundError, KeyError, LoRAFileError, RewardError) as error:
        exit_with_error("evaluate.py", error, 2)
