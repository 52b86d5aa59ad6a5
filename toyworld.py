"""The toy world's command line: prompt files, reward sanity table, building the base, shipping teachers.

The toy world (docs/toy_world.md) is the tasks (toy_tasks.py: grammars, renderers, rewards, prompt splits) and
the toy base model (toy_model.py; models.load_toy wraps it as a Base). This entry point sits on top of them
and of the loop: it pre-trains the toy base with the flow-matching loss (sft.py), measures it with
evaluate.py's ODE sampler, and writes the shipped assets in toy/ (prompt files, base.safetensors, the
stage-1 teachers trained by runs/toy_paper_table.sh, build.json, SHA256SUMS).

Demo:  python toyworld.py prompts data/toy     (writes {task}_{train,test}.{txt,jsonl})
       python toyworld.py rewards              (mean reward on ground truth / noise / blank per task)
       python toyworld.py build                (regenerate the base and prompt files into toy/)
       python toyworld.py teachers out/toy_table/teacher   (ship the Flow-GRPO teachers of runs/toy_paper_table.sh)
       python toyworld.py table out/toy_table    (that script's table: mean +- standard error over seeds)
"""
import argparse
import json
import math
from functools import partial
from pathlib import Path
import re

import numpy as np
import torch

from checkpoint import file_sha256
from heldout import generate, save_grid
from models import toy_base
from sft import train_flow_matching
from toy_model import new_base_modules, to_latent, tokenize
from toy_tasks import IMAGE_SIZE, TASKS, TOY_DIR, prompt_split, render, score, write_prompt_files
from train import sample_seed

# ----------------------------------------------------------------------------------------------------
# Building the toy world: prompt files, the pre-trained base; shipping the Flow-GRPO teachers
# ----------------------------------------------------------------------------------------------------

def render_dataset(task: str, prompts: list[str], copies: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """`copies` ground-truth renders of every prompt.  -> latents [N, 3, S, S] float16, prompts [N]"""
    rng = np.random.default_rng(seed)
    prompts = [p for p in prompts for _ in range(copies)]
    return to_latent(torch.stack([render(task, p, rng) for p in prompts])).half(), prompts


def measure(base, prompts_by_task: dict[str, list[str]], steps: int = 40, guidance: float = 4.5):
    """Mean reward per task of ODE samples (seed i for prompt i), as evaluate.py computes it.
    -> ({task: mean}, {task: first 8 images})"""
    means, firsts = {}, {}
    for task, prompts in prompts_by_task.items():
        with torch.no_grad():
            images = generate(base, prompts, [sample_seed(0, i) for i in range(len(prompts))], steps, guidance, 256)
        means[task], firsts[task] = round(score(task, images, prompts).mean().item(), 4), images[:8]
    return means, firsts


def pretrain_base(data, probe, device, max_steps: int, every: int, target: float, batch: int, lr: float, log,
                  samples_png: Path) -> tuple:
    """Flow-matching pre-training of transformer + text encoder (AdamW, linear warm-up), stopped at the first
    check where every probed task (train prompts) reaches `target`: a deliberately under-trained base."""
    transformer, text = (m.to(device) for m in new_base_modules())
    params = [*transformer.parameters(), *text.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 200))
    latents, prompts = (torch.cat([d[0] for d in data]).to(device), [p for d in data for p in d[1]])
    encode = lambda ps: text(tokenize(ps).to(device))  # noqa: E731
    velocity = partial(toy_base(transformer, text, "toy").velocity, guidance=None)   # conditional: L_FM
    for step in range(every, max_steps + 1, every):
        loss = train_flow_matching(velocity, encode, latents, prompts, optimizer, every, batch, seed=step,
                                   scheduler=warmup, desc="base")
        scores, images = measure(toy_base(transformer, text, "toy"), probe)
        log({"stage": "base", "step": step, "loss": round(loss, 4), **scores})
        save_grid({f"step {step}": images}, {t: (p, None) for t, p in probe.items()}, samples_png)
        save_base(transformer, text, samples_png.parent / "base.safetensors")   # a kill keeps the latest check
        if min(scores.values()) >= target:
            break
    return transformer.requires_grad_(False).eval(), text.requires_grad_(False).eval()


def save_base(transformer, text, path: Path) -> None:
    from safetensors.torch import save_file
    state = {f"transformer.{k}": v.float().contiguous() for k, v in transformer.state_dict().items()}
    state |= {f"text.{k}": v.float().contiguous() for k, v in text.state_dict().items()}
    save_file(state, path)


def build(folder: Path, device, max_base_steps: int, target: float, batch: int, lr: float, probe_size: int,
          check_every: int, seed: int = 0) -> dict:
    """Regenerate the toy base and prompt files into `folder` (the teachers come from Flow-GRPO runs:
    `adopt_teachers`). Appends to build.json; rewrites SHA256SUMS."""
    folder, log, record = Path(folder), *build_log(folder)
    write_prompt_files(folder)
    copies = {"geneval": 16, "ocr": 12}
    data = [render_dataset(task, prompt_split(task, "train"), copies[task], seed) for task in copies]
    probe = {task: prompt_split(task, "train")[:probe_size] for task in copies}
    transformer, text = pretrain_base(data, probe, device, max_base_steps, check_every, target, batch, lr, log,
                                      folder / "base_samples.png")
    held_out = {task: prompt_split(task, "test") for task in TASKS}
    log({"stage": "base test", **measure(toy_base(transformer, text, "toy"), held_out)[0]})
    return write_record(folder, record)


def adopt_teachers(folder: Path, runs: Path) -> dict:
    """Ship the stage-1 Flow-GRPO teachers that `STAGE=teachers bash runs/toy_paper_table.sh` trained
    (runs/<task>/lora.safetensors) as folder/<task>.safetensors, logging each run's settings in build.json."""
    import shutil
    folder, runs = Path(folder), Path(runs)
    missing = [str(runs / task / "lora.safetensors") for task in TASKS if not (runs / task / "lora.safetensors").is_file()]
    if missing:
        raise FileNotFoundError(f"no teacher LoRA at {missing[0]}: run STAGE=teachers bash runs/toy_paper_table.sh first")
    log, record = build_log(folder)
    for task in TASKS:
        record_of_run = json.loads((runs / task / "config.json").read_text())
        config = record_of_run["config"] | {"git_sha": record_of_run["git_sha"]}
        iterations = sum(1 for _ in (runs / task / "metrics.jsonl").open())
        shutil.copyfile(runs / task / "lora.safetensors", folder / f"{task}.safetensors")
        log({"stage": f"teacher {task}", "from": str(runs / task), "iterations": iterations,
             **{k: config.get(k) for k in ("algo", "reward", "lr", "clip_range", "beta", "images_per_iteration",
                                           "group_size", "git_sha")}})
    return write_record(folder, record)


def build_log(folder: Path):
    """-> (log(entry): appends a timed entry to the build record and prints it, the record of folder/build.json)"""
    import time
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    record = json.loads((folder / "build.json").read_text()) if (folder / "build.json").is_file() else {"log": []}
    start = time.time()

    def log(entry):
        entry["seconds"] = round(time.time() - start, 1)
        record["log"].append(entry)
        print(json.dumps(entry), flush=True)
    return log, record


def write_record(folder: Path, record: dict) -> dict:
    """Write build.json and SHA256SUMS (every shipped weight and prompt file)."""
    names = sorted(p.name for p in folder.iterdir() if p.suffix in (".safetensors", ".txt", ".jsonl"))
    (folder / "SHA256SUMS").write_text("".join(f"{file_sha256(folder / n)}  {n}\n" for n in names))
    (folder / "build.json").write_text(json.dumps(record, indent=2))
    return record


# ====================================================================================================
# The paper table of runs/toy_paper_table.sh: mean +- standard error over seeds
# ====================================================================================================

def mean_se(values: list[float]) -> tuple[float, float | None]:
    """-> (mean, standard error of the mean: std(ddof=1) / sqrt(n); None for a single value)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    variance = sum((v - mean) ** 2 for v in values) / (len(values) - 1)  # unbiased sample variance
    return mean, math.sqrt(variance / len(values))


def paper_table(out: Path) -> str:
    """Markdown table of every out/eval/*/results.json (one per evaluate.py process, in name order: base, s0, s1,
    ...): rows <model>_s<seed> grouped by model, mean +- SE over the seeds' held-out means (no +- for a model
    trained once: the base and the teachers); the iterations column counts out/<run>/metrics.jsonl lines (fewer:
    stopped by the stage's LIMIT)."""
    out = Path(out)
    parts = sorted(out.glob("eval/*/results.json"))
    if not parts:
        raise FileNotFoundError(f"no {out}/eval/*/results.json: run STAGE=eval bash runs/toy_paper_table.sh first")
    table, average = {}, {}
    for part in parts:
        record = json.loads(part.read_text())
        table, average = table | record["table"], average | record["average"]
    models: dict[str, list[str]] = {}
    for row in table:
        models.setdefault(re.sub(r"_s\d+$", "", row), []).append(row)
    tasks = list(next(iter(table.values())))
    lines = [f"| model | seeds | iterations | {' | '.join(tasks)} | average |", "|---" * (len(tasks) + 4) + "|"]
    for model, rows in models.items():
        runs = [out / row.replace("teacher_", "teacher/") / "metrics.jsonl" for row in rows]
        its = sorted({sum(1 for _ in run.open()) for run in runs if run.is_file()})
        its_text = "-" if not its else str(its[0]) if len(its) == 1 else f"{its[0]}-{its[-1]}"
        cells = [mean_se([table[row][task] for row in rows]) for task in tasks] + [mean_se([average[r] for r in rows])]
        text = [f"{m:.3f}" + (f" ± {se:.3f}" if se is not None else "") for m, se in cells]
        lines.append(f"| {model} | {len(rows)} | {its_text} | {' | '.join(text)} |")
    return "\n".join(lines)


# ====================================================================================================
# Command line
# ====================================================================================================

def reward_table() -> dict[str, dict[str, float]]:
    """Mean reward per task over its test prompts on ground truth, uniform noise and blank white images."""
    torch.manual_seed(0)
    table = {}
    for task in TASKS:
        prompts, rng = prompt_split(task, "test"), np.random.default_rng(0)
        images = {"ground truth": torch.stack([render(task, p, rng) for p in prompts]),
                  "noise": torch.rand(len(prompts), 3, IMAGE_SIZE, IMAGE_SIZE),
                  "blank": torch.ones(len(prompts), 3, IMAGE_SIZE, IMAGE_SIZE)}
        table[task] = {kind: score(task, x, prompts).mean().item() for kind, x in images.items()}
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("prompts", help="write the prompt split files").add_argument("folder")
    commands.add_parser("rewards", help="print mean rewards on ground truth / noise / blank")
    build_cli = commands.add_parser("build", help="regenerate the toy base and prompt files")
    build_cli.add_argument("--out", default=str(TOY_DIR))
    build_cli.add_argument("--max_base_steps", type=int, default=8000)
    build_cli.add_argument("--target", type=float, default=0.2, help="stop pre-training once every task reaches this")
    build_cli.add_argument("--batch", type=int, default=512)
    build_cli.add_argument("--lr", type=float, default=1e-3)
    build_cli.add_argument("--probe_size", type=int, default=128, help="train prompts a task scored at each check")
    build_cli.add_argument("--check_every", type=int, default=500, help="pre-training steps between checks")
    teachers_cli = commands.add_parser("teachers", help="ship the Flow-GRPO teachers of runs/toy_paper_table.sh")
    teachers_cli.add_argument("runs", help="the teacher folder of that run, e.g. out/toy_table/teacher")
    teachers_cli.add_argument("--out", default=str(TOY_DIR))
    table_cli = commands.add_parser("table", help="the paper table of runs/toy_paper_table.sh, mean +- SE over seeds")
    table_cli.add_argument("out", help="that run's OUT, e.g. out/toy_table (writes OUT/table.md)")
    args = parser.parse_args()
    if args.command == "build":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        build(Path(args.out), device, args.max_base_steps, args.target, args.batch, args.lr, args.probe_size,
              args.check_every)
    if args.command == "teachers":
        adopt_teachers(Path(args.out), Path(args.runs))
    if args.command == "table":
        text = paper_table(Path(args.out))
        print(text)
        (Path(args.out) / "table.md").write_text(text + "\n")
    if args.command == "prompts":
        for path in write_prompt_files(args.folder):
            print(path, sum(1 for _ in path.open()))
    if args.command == "rewards":
        for task, row in reward_table().items():
            print(f"{task:8s} " + "  ".join(f"{kind} {value:.3f}" for kind, value in row.items()))


if __name__ == "__main__":
    main()
