"""Multi-teacher on-policy distillation (Flow-OPD) of a flow-matching text-to-image model. torchrun entry point.

One iteration, top to bottom (see `opd_iteration`):
  1. sample task-tagged prompts (the same global list on every rank; each rank takes its slice), encode them
  2. roll out the student's SDE (no grad), storing x_j, x_{j+1} and log pi_old          (sde_sampler.py)
  3. the training rows (image i, trained step j): all J steps of every image, or --sampled_steps k drawn per
     image with unbiased weights (opd_loss.py); at each row's state, the velocity of the image's routed
     teacher and of the anchor (no grad, one pass per adapter)                          (teachers.py, mar.py)
  4. micro-batches of rows (they may mix steps): student CFG forward with grad, K_j to teacher and anchor,
     the loss (gkd or kl_only), backward of the weighted sum                           (opd_loss.py)
  5. all-reduce the LoRA gradients, clip, AdamW step (skipped on every rank when the gradient is not
     finite); log; checkpoint (checkpoint.py: atomic, resumable with --resume)
Batch sizes are global and divided by the world size. Only rank 0 writes. One code path for 1..N
processes (NCCL on GPU, gloo on CPU); a plain `python train.py` runs as a world of one. SIGTERM or
SIGINT (Ctrl-C) writes the last finished iteration's snapshot at once, ends the current iteration, writes a
checkpoint and exits 0 (torchrun, when it gets the signal itself, passes it on to every worker but then
exits 1: docs/long_runs.md). An error ends the run with one line, printed by rank 0 and put in torchrun's
failure summary (`exit_with_error`). Long runs (docs/long_runs.md): --ema keeps the authors' EMA of the
student for evaluation and export (ema.py); --eval_every evaluates held-out prompts in the loop as
evaluate.py does (heldout.py); --log sends metrics.jsonl's lines to tensorboard/wandb (live_log.py).
Other --algo: sft (the SFT cold start, `sft_iteration`), grpo (Flow-GRPO with --reward, `grpo_iteration`; its
advantages, loss and rewards in grpo.py). This file reads top to bottom: config, data and setup;
`opd_iteration`, then what it calls, in call order; SFT; GRPO; `main`.

Run:  torchrun --nproc_per_node=8 train.py --base sd3.5-medium --teachers ocr=ocr_lora,geneval=geneval_lora \
          --prompts ocr=dataset/ocr/train.txt,geneval=dataset/geneval/train_metadata.jsonl --out out/opd_sd35m
FLUX.1: --base a FluxPipeline folder (e.g. FLUX.1-dev); its defaults are Flow-GRPO's FLUX LoRA targets (attention and
the double-stream MLPs, models.FLUX_TARGETS) and guidance 3.5 (the guidance embedding; no CFG pair).
"""
from dataclasses import asdict, dataclass, field, fields, replace
from functools import partial
import difflib
import inspect
import json
import os
from pathlib import Path
import math
import random
import signal
import socket
import subprocess
import sys
import time
import tokenize
import warnings

import torch
import torch.distributed as dist
from peft import LoraConfig
from tqdm import tqdm

import checkpoint
import ema
import grpo
import heldout
import live_log
from mar import load_anchor
from merge_lora import LoRAFileError, load_lora
from models import SD3_TARGETS, blocks, family_defaults, load_base
from opd_loss import (LOSSES, inclusion_probabilities, kl_weights, step_kl, step_probabilities, systematic_steps,
                      uniform_on_grid)
from rewards import RewardError, make_reward, parse_pairs
from sde_sampler import gaussian_log_prob, initial_noise, rollout, sde_mean, sde_scale, transition_std
from sft import flow_matching_loss
from teachers import add_adapter, load_teachers, parse_teachers, route, target_velocities, teacher_samples
import toy_model
import toy_tasks

@dataclass
class Config:
    # what to distil
    base: str = ""                     # diffusers SD3 or FLUX.1 folder; "" = the toy world
    teachers: str = ""                 # comma list: task=lora or a lora whose file stem is the task
    prompts: str = ""                  # comma list: task=file (.txt one prompt a line, .jsonl with "prompt")
    task_weights: str = ""             # comma list task=weight (prompt sampling mix); "" = equal
    anchor: str = ""                   # MAR anchor LoRA; "" = the base model
    init_lora: str = ""                # student start (e.g. merge_lora.py output), its own rank and alpha; "" = fresh
    lora_alpha: float = 0.0            # alpha for LoRA files that carry none (0: the file must carry it)
    # the objective
    algo: str = "opd"                  # opd | sft (cold start: flow matching on teacher samples) | grpo (grpo.py)
    reward: str = ""                   # grpo: a reward name or comma list name=weight, scoring every sample
    task_rewards: str = ""             # grpo: comma list task=reward, each sample's own task (GRPO-Mix)
    reward_options: str = ""           # grpo: comma list reward.option=value, e.g. geneval_server.url=http://HOST:PORT
    loss: str = "gkd"                  # gkd | kl_only
    kl_weighting: str = "reference"    # reference | exact
    beta: float = 0.04                 # MAR weight (grpo: weight of the KL to the base)
    clip_range: float = 1e-4           # kl_only, grpo: PPO clip
    detach_advantage: bool = False     # kl_only: pure policy-gradient reading
    # sampling (SD3.5-M reference values)
    resolution: int = 512              # image side in pixels
    steps: int = 10                    # T, SDE steps of a rollout
    train_steps: int = 9               # trained steps j = 0..train_steps-1 (the last, near-clean step skipped)
    noise_level: float = 0.7           # a, the SDE's noise level (0 = the ODE)
    guidance: float = 4.5              # CFG scale g (a FLUX base: its guidance embedding, default 3.5)
    max_sequence_length: int = 128     # T5 prompt tokens (longer prompts are truncated)
    sft_sample_steps: int = 40         # --algo sft: ODE steps of the teacher samples (the evaluation settings)
    # batch (global; divided by the world size)
    images_per_iteration: int = 256    # student rollouts per iteration, all ranks together
    group_size: int = 16               # images per prompt
    updates: int = 2                   # optimizer updates per iteration (each on an equal share of the images)
    micro_batch: int = 8               # images per forward, per rank (sft; the default of the two below)
    target_batch: int = 0              # (state, image) rows per no-grad forward (rollout, targets); 0 = micro_batch
    train_batch: int = 0               # (state, image) rows per student forward with grad (opd, grpo); 0 = micro_batch
    sampled_steps: int = 0             # k trained steps drawn per image, unbiased (opd_loss.py); 0 = all (dense)
    # student LoRA and optimiser
    rank: int = 32                     # LoRA rank r of a fresh student
    alpha: float = 64.0                # LoRA alpha of a fresh student (scale alpha / r)
    targets: str = SD3_TARGETS         # comma list of module-name suffixes a fresh student adapts (FLUX: + MLPs)
    lr: float = 1e-4                   # AdamW learning rate
    weight_decay: float = 1e-4         # AdamW weight decay
    grad_clip: float = 1.0             # clip the global gradient norm to this
    # speed (same math)
    grad_checkpointing: bool = False   # recompute activations in backward: far less memory, ~1.4x slower steps
    compile: bool = False              # torch.compile each transformer block (2x on SD3.5-M after ~1-3 min warm-up)
    # run
    iterations: int = 100              # iterations in all (a resumed run goes on to this number)
    seed: int = 0                      # prompts, noise and the fresh LoRA are functions of it
    out: str = "out/opd"               # run folder: config.json, metrics.jsonl, lora.safetensors, checkpoints/
    overwrite: bool = False            # start afresh in an --out that holds a run (its checkpoints are deleted)
    resume: bool = False               # go on from --out's newest checkpoint (an error if it has none)
    resume_or_start: bool = False      # like --resume, but start afresh when --out holds no checkpoint yet
    save_every: int = 10               # checkpoint every this many iterations (and at the end)
    keep: int = 3                      # checkpoints kept (0 = all)
    max_bad_steps: int = 3             # abort after this many non-finite optimizer updates in a row
    # long runs (docs/long_runs.md)
    ema: bool = False                  # EMA of the student (ema.py): evaluated and exported; rollouts stay live
    log: str = ""                      # live loggers beside metrics.jsonl: tensorboard, wandb or both (live_log.py)
    eval_every: int = 0                # held-out evaluation before iteration 1, every N and after the last; 0 = none
    eval_prompts: str = ""             # comma list task=file; "" = toy world: the test prompts of the run's tasks
    eval_rewards: str = ""             # comma list task=reward name (rewards.py); "" = toy world: toy_<task>
    eval_max_prompts: int = 0          # the first N prompts of each task; 0 = all
    eval_steps: int = 40               # ODE steps of the in-loop evaluation (evaluate.py --steps)

    def __post_init__(self):
        self.resume = self.resume or self.resume_or_start


# numeric flags: their allowed range, checked at start (check_limits) and shown by --help
LIMITS = {"lora_alpha": ">= 0", "beta": ">= 0", "clip_range": "> 0", "resolution": ">= 1", "steps": ">= 1",
          "train_steps": ">= 1", "noise_level": ">= 0", "guidance": ">= 0", "max_sequence_length": ">= 1",
          "sft_sample_steps": ">= 1", "images_per_iteration": ">= 1", "group_size": ">= 1", "updates": ">= 1",
          "micro_batch": ">= 1", "target_batch": ">= 0", "train_batch": ">= 0", "sampled_steps": ">= 0", "rank": ">= 1", "alpha": "> 0", "lr": "> 0",
          "weight_decay": ">= 0", "grad_clip": "> 0", "iterations": ">= 1", "seed": ">= 0", "save_every": ">= 1",
          "keep": ">= 0", "max_bad_steps": ">= 1",
          "eval_every": ">= 0", "eval_max_prompts": ">= 0", "eval_steps": ">= 1"}
# renamed flags: old spelling -> new; the old one still works, with a warning, until the next release
RENAMED = {"optimizer_steps": "updates"}
# --out names a folder: a name with one of these suffixes is a file name given by mistake
FILE_SUFFIXES = {".safetensors", ".pt", ".pth", ".bin", ".ckpt", ".json", ".jsonl", ".txt", ".md", ".png", ".jpg"}


def parse_config(argv: list[str]) -> Config:
    """Flags over the defaults; with no --base (the toy world) over toy_model.TRAIN_DEFAULTS, with a FLUX folder over
    its family's (models.family_defaults: LoRA targets, guidance), then the defaults."""
    values = parse_flags(Config, argv, toy_model.TRAIN_DEFAULTS)
    if not values.get("base"):
        values = toy_model.TRAIN_DEFAULTS | values
    return Config(**(family_defaults(values.get("base", "")) | values))


def parse_flags(cls, argv: list[str], toy_defaults: dict | None = None) -> dict:
    """`--field value` or `--field=value` for the fields of dataclass `cls` (a bool flag alone means true).
    -h/--help prints `usage` and exits 0; an unknown flag is an error naming the closest known one; a RENAMED
    flag is taken under its new name with a warning."""
    types = {f.name: f.type for f in fields(cls)}
    if "-h" in argv or "--help" in argv:
        print(usage(cls, toy_defaults or {}))
        raise SystemExit(0)
    values, i = {}, 0
    while i < len(argv):
        flag, inline, value = argv[i].partition("=")
        name = flag.removeprefix("--").replace("-", "_")
        if not flag.startswith("--"):
            raise ValueError(f"{argv[i]!r} is not a flag: give --name value or --name=value (lists are comma "
                             "lists, without spaces)")
        if RENAMED.get(name) in types:
            if os.environ.get("RANK", "0") == "0":
                print(f"{program(cls)}: warning: --{name} is now --{RENAMED[name]}; the old name goes in the next "
                      "release", file=sys.stderr, flush=True)
            name = RENAMED[name]
        if name not in types:
            close = difflib.get_close_matches(name, types, n=1)
            hint = f"did you mean --{close[0]}?" if close else f"{program(cls)} --help lists the flags"
            raise ValueError(f"unknown flag {flag!r}: {hint}")
        if inline:
            values[name], i = _convert(name, types[name], value), i + 1
        elif types[name] in (bool, "bool") and (i + 1 == len(argv) or argv[i + 1].startswith("--")):
            values[name], i = True, i + 1
        elif i + 1 == len(argv):
            raise ValueError(f"flag --{name} needs a value")
        else:
            values[name], i = _convert(name, types[name], argv[i + 1]), i + 2
    return values


def _convert(name: str, kind, text: str):
    kind = {"bool": bool, "int": int, "float": float, "str": str}.get(kind, kind)
    if kind is bool:
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"--{name} takes true or false, not {text!r}")
        return text.lower() in ("true", "1")
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"--{name} takes a {kind.__name__}, not {text!r}") from None


def program(cls) -> str:
    """The entry point that defines dataclass `cls` (train.py, evaluate.py)."""
    return Path(sys.modules[cls.__module__].__file__).name


def flag_help(cls) -> dict[str, tuple[str, str]]:
    """field -> (section, description), read from the source of dataclass `cls`: the `# comment` after the field
    is its description, a comment on a line of its own heads the fields below it."""
    lines = inspect.getsource(cls).splitlines(keepends=True)
    found, section, names = {}, "", {f.name for f in fields(cls)}
    for token in tokenize.generate_tokens(iter(lines).__next__):
        if token.type != tokenize.COMMENT:
            continue
        text = token.string.lstrip("#").strip()
        first = token.line.split(":")[0].strip()
        if token.line.strip().startswith("#"):
            section = text
        elif first in names:
            found[first] = (section, text)
    return {name: found.get(name, (section, "")) for name in names}


def usage(cls, toy_defaults: dict) -> str:
    """--help: every field of `cls` as a flag, with its default, description and allowed range, by section."""
    module = sys.modules[cls.__module__]
    limits = getattr(module, "LIMITS", {})
    lines = [f"usage: {program(cls)} [--flag value | --flag=value ...]   (a bool flag alone means true)",
             (module.__doc__ or "").strip().splitlines()[0]]
    if toy_defaults:
        lines.append("(toy X): the default without --base, in the toy world (toy_model.TRAIN_DEFAULTS)")
    helps, section = flag_help(cls), None
    for f in fields(cls):
        where, text = helps[f.name]
        if where != section:
            section = where
            lines += ["", f"{section or 'flags'}:"]
        default = '""' if f.default == "" else str(f.default)
        if toy_defaults.get(f.name, f.default) != f.default:
            default += f" (toy {toy_defaults[f.name]})"
        text += f" [{limits[f.name]}]" if f.name in limits else ""
        if len(default) <= 20:
            lines.append(f"  --{f.name:<21} {default:<20} {text}")
        else:
            lines += [f"  --{f.name:<21} {'(below)':<20} {text}", f"  {'':<23} default: {default}"]
    renamed = [f"--{old} is now --{new}" for old, new in getattr(module, "RENAMED", {}).items() if new in helps]
    if renamed:
        lines += ["", f"renamed (the old name works, with a warning, until the next release): {'; '.join(renamed)}"]
    return "\n".join(lines)


def check_limits(cfg, limits: dict[str, str]) -> None:
    """Every numeric field of `cfg` in its range ("> 0", ">= 1", ...): a finite number, else a one-line error."""
    for name, limit in limits.items():
        value, (op, bound) = getattr(cfg, name), limit.split()
        if not (math.isfinite(value) and (value > float(bound) if op == ">" else value >= float(bound))):
            raise ValueError(f"--{name} {value}: must be {limit}")


def check_out_folder(out: Path, inside: str) -> None:
    """--out names a folder: refuse an existing file, and a name that looks like a file's (out/student.safetensors)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; --out names a folder (it gets {inside}): choose another --out")
    if out.suffix.lower() in FILE_SUFFIXES and not out.is_dir():
        raise ValueError(f"--out {out} looks like a file name; --out names a folder (it gets {inside}): "
                         f"e.g. --out {out.with_suffix('')}")


# ----------------------------------------------------------------------------------------- data

class Prompt(str):
    """A prompt's text, carrying its .jsonl line's whole dict as `.metadata` (None for .txt prompts). Being a str, it
    goes wherever a prompt goes (sampling, sharding, the text encoder, the rollout) and its metadata with it, up to
    reward(images, prompts, metadata): GenEval's `*_metadata.jsonl` clauses (tag, include, exclude) reach the reward."""
    metadata: dict | None = None

    def __new__(cls, text: str, metadata: dict | None = None):
        prompt = super().__new__(cls, text)
        prompt.metadata = metadata
        return prompt

    def __reduce__(self):                                                      # pickled (all_gather_object) whole
        return Prompt, (str(self), self.metadata)


def read_prompts(path: Path) -> list[Prompt]:
    """A .txt file (one prompt a line; metadata None) or a .jsonl file (one JSON object a line with a "prompt"
    string; the whole object, every field kept, is the prompt's metadata). Blank lines are skipped."""
    if path.suffix not in (".txt", ".jsonl"):
        raise ValueError(f"prompt file {path}: expected a .txt (one prompt a line) or .jsonl (a \"prompt\" field a "
                         "line) file; rename it or convert it")
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path}")
    prompts = []
    for number, raw in enumerate(path.read_bytes().splitlines(), 1):
        try:
            line = raw.decode("utf-8").strip()
        except UnicodeDecodeError as error:
            raise ValueError(f"{path}:{number}: not UTF-8 ({error.reason} at byte {error.start}); save the file as "
                             "UTF-8") from None
        if line and path.suffix == ".txt":
            prompts.append(Prompt(line))
        elif line:
            prompts.append(jsonl_prompt(line, f"{path}:{number}"))
    if not prompts:
        raise ValueError(f"prompt file {path} holds no prompts")
    return prompts


def jsonl_prompt(line: str, where: str) -> Prompt:
    """One .jsonl line -> Prompt(line["prompt"], metadata=the whole object); errors name `where` (file:line)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"{where}: malformed JSON ({error.msg} at column {error.colno})") from None
    if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
        raise ValueError(f"{where}: expected a JSON object with a \"prompt\" string, got {line[:80]!r}")
    return Prompt(record["prompt"], record)


def task_weights(spec: str) -> dict[str, float]:
    """--task_weights 'a=1,b=3' -> {a: 1.0, b: 3.0}; every weight a finite number."""
    weights = {}
    for task, text in parse_pairs(spec, "task_weights").items():
        try:
            weights[task] = float(text)
        except ValueError:
            weights[task] = math.nan
        if not math.isfinite(weights[task]):
            raise ValueError(f"--task_weights {task}={text}: the weight must be a number, e.g. {task}=1")
    return weights


def sample_groups(prompts: dict[str, list[str]], weights: dict[str, float], n: int, seed: int) -> list[tuple[str, str]]:
    """n (task, prompt) groups: task by weight, then a prompt uniformly; a function of the seed alone."""
    rng = random.Random(seed)
    tasks = rng.choices(list(prompts), weights=[weights[t] for t in prompts], k=n)
    return [(task, rng.choice(prompts[task])) for task in tasks]


# ----------------------------------------------------------------------------------------- distributed

def setup_distributed() -> tuple[int, int, torch.device]:
    """torchrun's environment, or a world of one; NCCL on GPU, gloo on CPU."""
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=str(s.getsockname()[1]))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def all_reduce_mean(tensors: list[torch.Tensor]) -> None:
    """Average tensors over ranks in place (one flat all-reduce)."""
    flat = torch.cat([t.flatten() for t in tensors])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for t in tensors:
        t.copy_(flat[offset: offset + t.numel()].view_as(t))
        offset += t.numel()


def clock(device) -> float:
    """Seconds, after the device's queued work is done (phase timings on GPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def sample_seed(*parts: int) -> int:
    """A 63-bit seed from (seed, iteration[, image index]): identical on every rank and world size."""
    value = 0
    for part in parts:
        value = (value * 1_000_003 + part) % (2**63 - 1)
    return value


# ----------------------------------------------------------------------------------------- setup

@dataclass
class Run:
    """Everything built once, before the loop."""
    cfg: Config
    rank: int
    world: int
    device: torch.device
    base: object                        # models.Base
    routes: dict                        # task -> teacher adapter
    anchor: object                      # anchor adapter name, or None for the base
    prompts: dict                       # task -> list of prompts
    weights: dict                       # task -> sampling weight
    params: list                        # the student's LoRA parameters (fp32)
    optimizer: torch.optim.Optimizer
    kl_w: torch.Tensor                  # [T] per-step KL weights
    sigmas: torch.Tensor                # [T+1]
    local_images: int                   # images per rank per iteration
    identity: dict                      # what a checkpoint must match to continue this run (checkpoint.py)
    reward: object = None               # grpo: reward(images, prompts, tasks, metadata) -> (r [B], parts) (grpo.py)
    inclusion: torch.Tensor = None      # [J] pi_j, the probability that an image trains step j (all 1: dense)
    ratio: bool = False                 # the loss has a PPO ratio (kl_only, grpo): exact old log-probs (train_passes)
    bad_steps: int = 0                  # non-finite optimizer steps in a row
    ema: object = None                  # ema.EMA under --ema (its adapter ema.ADAPTER is evaluated and exported)
    evaluation: tuple | None = None     # in-loop evaluation: (jobs {task: (prompts, seeds)}, rewards {task: fn})


def check_batch(cfg: Config, world: int) -> int:
    """Assert and print the batch arithmetic; returns images per rank per iteration."""
    if cfg.images_per_iteration % (world * cfg.group_size):
        raise ValueError(f"--images_per_iteration {cfg.images_per_iteration} is not divisible by world size {world} "
                         f"x --group_size {cfg.group_size}")
    local = cfg.images_per_iteration // world
    if local % (cfg.updates * cfg.micro_batch):
        raise ValueError(f"{local} images per rank do not split into --updates {cfg.updates} "
                         f"x micro-batches of --micro_batch {cfg.micro_batch}")
    if not 0 < cfg.train_steps <= cfg.steps:
        raise ValueError(f"--train_steps {cfg.train_steps} must be in 1..--steps {cfg.steps}")
    if not 0 <= cfg.sampled_steps <= cfg.train_steps:
        raise ValueError(f"--sampled_steps {cfg.sampled_steps} must be in 0 (all)..--train_steps {cfg.train_steps}")
    return local


def resolve_data(cfg: Config) -> tuple[dict, dict, dict]:
    """-> teachers {task: path}, prompts {task: [str]}, weights {task: float}; every task needs both.
    --algo grpo has no teachers: its tasks are those of --prompts (toy world default: the train prompts of the
    toy tasks whose reward toy_<task> is named in --reward)."""
    if cfg.algo == "grpo" and cfg.teachers:
        raise ValueError("--algo grpo takes no --teachers (its training signal is --reward)")
    if cfg.algo != "grpo" and not cfg.teachers:
        raise ValueError("--teachers is required (e.g. --teachers ocr=ocr.safetensors,geneval=geneval.safetensors)")
    teachers = parse_teachers(cfg.teachers)
    prompt_files = {t: Path(f) for t, f in parse_pairs(cfg.prompts, "prompts").items()}
    if not prompt_files and not cfg.base:
        tasks = teachers
        if cfg.algo == "grpo":
            tasks = grpo.toy_reward_tasks(cfg.reward, cfg.task_rewards)
        prompt_files = {task: toy_tasks.prompt_file(task, "train") for task in tasks}
    if not prompt_files:
        raise ValueError("--prompts is required (e.g. --prompts ocr=ocr_train.txt)")
    if teachers and teachers.keys() != prompt_files.keys():
        raise ValueError(f"tasks with a teacher {sorted(teachers)} and tasks with prompts {sorted(prompt_files)} differ; "
                         "give --teachers and --prompts for the same tasks")
    weights = {task: 1.0 for task in prompt_files} | task_weights(cfg.task_weights)
    if weights.keys() != prompt_files.keys() or min(weights.values()) < 0 or max(weights.values()) == 0:
        raise ValueError(f"--task_weights {cfg.task_weights}: give weights >= 0, at least one > 0, for tasks "
                         f"{sorted(prompt_files)} only")
    for path in [*teachers.values(), *filter(None, [Path(cfg.anchor) if cfg.anchor else None,
                                                   Path(cfg.init_lora) if cfg.init_lora else None])]:
        if not path.exists():
            raise FileNotFoundError(f"LoRA not found: {path}")
    return teachers, {t: read_prompts(f) for t, f in prompt_files.items()}, weights


def add_student(transformer, cfg: Config) -> list[torch.nn.Parameter]:
    """The trainable adapter 'student': `--init_lora`, or a fresh LoRA (gaussian A, B = 0). fp32, made active."""
    if cfg.init_lora:
        add_adapter(transformer, load_lora(cfg.init_lora, cfg.lora_alpha or None), "student", cfg.init_lora)
    else:
        config = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, init_lora_weights="gaussian",
                            target_modules=cfg.targets.split(","))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            transformer.add_adapter(config, adapter_name="student")
    transformer.set_adapter("student")
    params = [p for n, p in transformer.named_parameters() if ".student." in n]
    for p in params:
        p.data = p.data.float()
        p.requires_grad_(True)
    for module in transformer.modules():                                       # fp32 LoRA on a bf16 base: autocast
        if hasattr(module, "cast_input_dtype_enabled"):                        # (models.autocast), not an fp32
            module.cast_input_dtype_enabled = False                            # copy of each LoRA input per layer
    return params


def setup(cfg: Config, rank: int, world: int, device: torch.device, base=None) -> Run:
    """Validate, load the base (or take `base`, e.g. bench.py's), teachers, anchor and student. Writes nothing:
    main writes the record (write_record) once --resume has loaded its checkpoint."""
    check_limits(cfg, LIMITS)
    out = Path(cfg.out)
    check_out_folder(out, "lora.safetensors, config.json, checkpoints/")
    local = check_batch(cfg, world)
    if cfg.algo not in ALGOS:
        raise ValueError(f"unknown --algo {cfg.algo!r}: use one of {sorted(ALGOS)}")
    if cfg.loss not in LOSSES:
        raise ValueError(f"unknown --loss {cfg.loss!r}: use one of {sorted(LOSSES)}")
    if (cfg.reward or cfg.task_rewards) and cfg.algo != "grpo":
        raise ValueError(f"--reward and --task_rewards are for --algo grpo, not --algo {cfg.algo}")
    if (out / "config.json").exists() and not (cfg.overwrite or cfg.resume):
        raise ValueError(f"--out {out} holds another run; choose another --out, or pass --resume or --overwrite")
    if cfg.resume and not cfg.resume_or_start and checkpoint.latest(out) is None:
        found = "a run stopped before its first checkpoint" if (out / "config.json").exists() else "no run"
        raise ValueError(f"--resume: {out} holds {found}; check --out, or pass --resume_or_start to start there")
    checkpoint.check_out(out)
    if cfg.reward_options and cfg.algo != "grpo":
        raise ValueError(f"--reward_options are for the rewards of --algo grpo, not --algo {cfg.algo}")
    reward = None
    if cfg.algo == "grpo":
        reward = grpo.make_reward(cfg.reward, cfg.task_rewards, cfg.reward_options)   # reward models load once, here
    teachers, prompts, weights = resolve_data(cfg)
    if cfg.algo == "grpo":
        grpo.check_tasks(prompts, cfg.task_rewards, cfg.reward)
    live_log.parse(cfg.log)                                                    # a missing package: refused here
    evaluation = resolve_evaluation(cfg, list(prompts))                        # reward models load once, here
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    base = base or load_base(cfg.base, device, dtype, cfg.resolution, cfg.max_sequence_length)
    alpha = cfg.lora_alpha or None
    routes = load_teachers(base.transformer, teachers, alpha)
    anchor = load_anchor(base.transformer, cfg.anchor, alpha)
    torch.manual_seed(cfg.seed)                                                # the same fresh LoRA on every rank
    params = add_student(base.transformer, cfg)
    if cfg.init_lora:                                # the student has the file's rank and alpha: record those
        student = base.transformer.peft_config["student"]
        if rank == 0 and (student.r, student.lora_alpha) != (cfg.rank, cfg.alpha):
            print(f"--init_lora {cfg.init_lora}: rank {student.r}, alpha {student.lora_alpha:g} (not --rank "
                  f"{cfg.rank}, --alpha {cfg.alpha:g}); recorded as such", flush=True)
        cfg = replace(cfg, rank=student.r, alpha=float(student.lora_alpha))
    ema_state = ema.add_ema(base.transformer, local // cfg.updates // cfg.micro_batch) if cfg.ema else None
    n_params = sum(p.numel() for p in params)
    checkpoint.check_out(out, need_bytes=(max(cfg.keep, 1) + 1) * 4 * (4 + cfg.ema) * n_params)  # fp32 LoRA, 2 moments,
                                                                                                 # export (+ EMA)
    speed_up(base.transformer, cfg)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sigmas = base.sigmas(cfg.steps).to(device)
    kl_w = kl_weights(sigmas, cfg.noise_level, cfg.kl_weighting)
    p = torch.ones(cfg.train_steps) if cfg.algo == "grpo" else step_probabilities(kl_w[:cfg.train_steps])
    inclusion = inclusion_probabilities(p, cfg.sampled_steps or cfg.train_steps)   # GRPO: uniform (timestep_fraction)
    if rank == 0:
        drawn = f" ({cfg.sampled_steps} drawn per image)" if cfg.sampled_steps else ""
        print(f"batch: {cfg.images_per_iteration} images/iteration = {world} ranks x {local} "
              f"({local // cfg.group_size} prompts x {cfg.group_size}); {cfg.updates} optimizer updates of "
              f"{local // cfg.updates} images/rank in micro-batches of {cfg.micro_batch}; "
              f"{cfg.train_steps}/{cfg.steps} steps trained{drawn}. student LoRA: {n_params / 1e6:.2f}M params; "
              f"teachers: {routes}; anchor: {anchor or 'base'}", flush=True)
        if ema_state or evaluation:
            tasks = ", ".join(f"{t} {len(p)}" for t, (p, _) in evaluation[0].items()) if evaluation else ""
            print(f"EMA of the student: {'on' if ema_state else 'off'}; in-loop evaluation: " +
                  (f"every {cfg.eval_every} iterations, {cfg.eval_steps} ODE steps, prompts {tasks}" if evaluation
                   else "off"), flush=True)
    return Run(cfg, rank, world, device, base, routes, anchor, prompts, weights, params, optimizer,
               kl_w, sigmas, local, checkpoint.identity(cfg, base.name, teachers, prompts), reward, inclusion,
               ratio=cfg.algo == "grpo" or cfg.loss == "kl_only", ema=ema_state, evaluation=evaluation)


def resolve_evaluation(cfg: Config, tasks: list[str]) -> tuple | None:
    """--eval_every: -> (jobs {task: (prompts, seeds)}, rewards {task: fn}), as evaluate.py builds them (one image
    per prompt, seed sample_seed(--seed, i)); None when off. Toy world default: the test prompts of the run's
    tasks, scored by toy_<task>."""
    if cfg.eval_every == 0:
        return None
    files = {t: Path(f) for t, f in parse_pairs(cfg.eval_prompts, "eval_prompts").items()}
    if not files:
        if cfg.base:
            raise ValueError("--eval_every needs --eval_prompts with --base (e.g. --eval_prompts ocr=ocr_test.txt)")
        files = {task: toy_tasks.prompt_file(task, "test") for task in tasks}
    names = ({} if cfg.base else {t: f"toy_{t}" for t in files}) | parse_pairs(cfg.eval_rewards, "eval_rewards")
    if names.keys() != files.keys():
        raise ValueError(f"--eval_rewards: give one reward for each task of --eval_prompts {sorted(files)} "
                         f"(got {sorted(names)}), e.g. --eval_rewards ocr=ocr")
    jobs = {}
    for task, path in files.items():
        prompts = read_prompts(path)[: cfg.eval_max_prompts or None]
        jobs[task] = (prompts, [sample_seed(cfg.seed, i) for i in range(len(prompts))])
    try:
        return jobs, {task: make_reward(name, evaluation=True) for task, name in names.items()}
    except KeyError as error:                                                  # an unknown reward name
        raise ValueError(f"--eval_rewards: {error.args[0]}") from None


def speed_up(transformer, cfg: Config) -> None:
    """Options that change speed and memory, never the math: gradient checkpointing (recompute each block's
    activations in the backward pass) and regional torch.compile of the transformer blocks."""
    if cfg.grad_checkpointing:
        transformer.enable_gradient_checkpointing()
    if cfg.compile:
        torch._dynamo.config.cache_size_limit = 64          # one graph per block kind x adapter x grad mode x shape
        for block in blocks(transformer):
            block.compile()


def write_record(cfg: Config, out: Path, base_name: str, world: int) -> None:
    """config.json (resolved config, git sha with "-dirty" when tracked files differ from it, world size); an
    empty metrics.jsonl (kept on --resume); --overwrite deletes the earlier run's checkpoints."""
    out.mkdir(parents=True, exist_ok=True)
    if cfg.overwrite and not cfg.resume:
        for old in (out / "checkpoints").glob("*"):
            old.unlink()
    try:
        sha = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=40"], capture_output=True, text=True,
                             cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except OSError:
        sha = "unknown"
    record = {"config": asdict(cfg), "git_sha": sha, "base": base_name, "world_size": world,
              "torch": torch.__version__}
    (out / "config.json").write_text(json.dumps(record, indent=2))
    if not (cfg.resume and (out / "metrics.jsonl").exists()):
        (out / "metrics.jsonl").write_text("")


# ----------------------------------------------------------------------------------------- one OPD iteration

@dataclass
class Rollouts:
    """This rank's images of one iteration, rolled out (no grad): states and the rollout's log-probs."""
    tasks: list                         # [N]
    prompts: list                       # [N]
    cond: object                        # sde_sampler.Condition, [N]
    x: torch.Tensor                     # [T+1, N, C, H, W] states
    log_prob: torch.Tensor              # [T, N] log pi_old(x_{j+1} | x_j) as the rollout computed it
    per_image: dict = field(default_factory=dict)   # grpo: "advantage", rewards -> [N]


@dataclass
class Rows:
    """Training rows: image i (an index into Rollouts) at trained step j, the estimator weight of the row, and
    the no-grad targets there. A micro-batch of rows may mix steps (the transformer takes one sigma per row)."""
    image: torch.Tensor                 # [R] long
    step: torch.Tensor                  # [R] long, j
    weight: torch.Tensor                # [R] 1 / (J pi_j): sum over an image's rows estimates (1/J) sum_j l_ij
    targets: dict = field(default_factory=dict)     # name -> [R, C, H, W] velocities (teacher, anchor, base)
    log_prob_old: torch.Tensor = None   # [R] old log-probs of the PPO ratio; None: the training forward's own

    def __getitem__(self, index) -> "Rows":
        return Rows(self.image[index], self.step[index], self.weight[index],
                    {name: v[index] for name, v in self.targets.items()},
                    None if self.log_prob_old is None else self.log_prob_old[index])

    def __len__(self) -> int:
        return len(self.image)

    def split(self, size: int) -> list["Rows"]:
        return [self[start: start + size] for start in range(0, len(self), size)]


def opd_iteration(run: Run, iteration: int) -> dict:
    """One Flow-OPD iteration (module docstring, steps 1-5)."""
    # 1. this rank's slice of the global batch
    mine, seeds = local_batch(run, iteration)
    timer = {"rollout": 0.0, "targets": 0.0, "train": 0.0, "optimizer": 0.0}

    # 2. student rollouts (no grad)
    t0 = clock(run.device)
    batch = student_rollout(run, mine, seeds)
    t1 = clock(run.device)

    # 3. the rows to train (every trained step, or --sampled_steps drawn per image); teacher and anchor there
    rows = draw_rows(run, seeds)
    tasks = [batch.tasks[i] for i in rows.image.tolist()]                      # each row's task
    rows.targets["teacher"] = velocities_at_rows(run, route(tasks, run.routes), batch, rows)
    rows.targets["anchor"] = velocities_at_rows(run, [run.anchor] * len(rows), batch, rows)
    timer["rollout"], timer["targets"] = t1 - t0, clock(run.device) - t1

    # 4-5. per optimizer update, its images' rows in micro-batches: student forward with grad, loss, backward; AdamW
    stats = Stats(list(run.prompts), run.device)
    train_passes(run, batch, rows, step_loss, stats, timer)
    return stats.summary() | {f"seconds_{k}": v for k, v in timer.items()}


def local_batch(run: Run, iteration: int) -> tuple[list[tuple[str, str]], list[int]]:
    """This rank's slice of the iteration's global batch: whole groups of (task, prompt), one seed per image."""
    cfg = run.cfg
    groups = sample_groups(run.prompts, run.weights, cfg.images_per_iteration // cfg.group_size,
                           sample_seed(cfg.seed, iteration))
    first = run.rank * run.local_images
    mine = [g for g in groups for _ in range(cfg.group_size)][first: first + run.local_images]
    return mine, [sample_seed(cfg.seed, iteration, first + i) for i in range(run.local_images)]


def student_rollout(run: Run, mine: list[tuple[str, str]], seeds: list[int]) -> Rollouts:
    """Encode the prompts and roll out the student's SDE from each seed's noise (no grad), --target_batch images
    per forward (the rollouts are per image: any split gives the same states).  mine: [N] (task, prompt)"""
    cfg, base = run.cfg, run.base
    tasks, prompts = zip(*mine)
    cond = base.condition(list(prompts))
    size = cfg.target_batch or cfg.micro_batch
    parts = []
    for start in range(0, len(seeds), size):
        x0, noise = initial_noise(seeds[start: start + size], base.latent_shape, cfg.steps, run.device)
        parts.append(rollout(partial(base.velocity, guidance=cfg.guidance), cond[start: start + size], x0, noise,
                             run.sigmas, cfg.noise_level))
    x, log_prob = torch.cat([t.x for t in parts], 1), torch.cat([t.log_prob for t in parts], 1)   # [T+1, N], [T, N]
    return Rollouts(list(tasks), list(prompts), cond, x, log_prob)


ROW_SALT = 0x57E95   # keeps the step draws apart from the image's noise stream


def draw_rows(run: Run, seeds: list[int]) -> Rows:
    """Each image's trained steps, drawn from its own seed (the same draws on 1 or N processes): systematic
    sampling with inclusion probabilities run.inclusion (opd_loss.systematic_steps; all ones = dense)."""
    us = [uniform_on_grid(random.Random(sample_seed(seed, ROW_SALT))) for seed in seeds]
    return rows_at(run.inclusion, us, run.device)


def rows_at(inclusion: torch.Tensor, us: list[float], device) -> Rows:
    """The rows of images drawn with uniforms `us` [N], weight 1 / (J pi_j), ordered by (step, image).
    inclusion: [J] pi_j"""
    steps = [systematic_steps(inclusion, u) for u in us]
    image = torch.tensor([i for i, s in enumerate(steps) for _ in s])
    step = torch.tensor([j for s in steps for j in s])
    order = torch.argsort(step * len(us) + image)
    weight = 1 / (len(inclusion) * inclusion.to(torch.float64))                 # Horvitz-Thompson: 1 / (J pi_j)
    return Rows(image[order].to(device), step[order].to(device), weight[step[order]].float().to(device))


def velocities_at_rows(run: Run, adapters: list, batch: Rollouts, rows: Rows) -> torch.Tensor:
    """No-grad CFG velocities of `adapters` (one per row) at the rows' states x_j of the rollouts, --target_batch
    rows per forward.  -> [R, C, H, W]"""
    cfg = run.cfg
    return target_velocities(run.base, adapters, batch.x[rows.step, rows.image], run.sigmas[rows.step],
                             batch.cond, rows.image, cfg.guidance, cfg.target_batch or cfg.micro_batch)


def train_passes(run: Run, batch: Rollouts, rows: Rows, step_fn, stats, timer: dict) -> None:
    """Steps 4-5 for any per-row loss (OPD's step_loss, GRPO's grpo_step_loss). The images split into --updates
    equal shares; for each share: its rows, --train_batch per micro-batch: loss with grad, backward of
    sum_r weight_r loss_r / (images in the share); then the guarded AdamW step.
    Old log-probs of the PPO ratio (kl_only, grpo): the first share's rows use the training forward's own
    (detached) log-prob, ratio exactly 1; the later shares' are recomputed first (recompute_old_log_probs).
    step_fn(run, batch, rows) -> (loss [r], {metric: [r]}, {metric: [r] whose maximum is logged})"""
    cfg = run.cfg
    images = run.local_images // cfg.updates
    shares = [rows[rows.image // images == k] for k in range(cfg.updates)]
    size = cfg.train_batch or cfg.micro_batch
    t0 = clock(run.device)
    recompute_old_log_probs(run, batch, shares[1:] if run.ratio else [], size)
    timer["train"] += clock(run.device) - t0
    for share in shares:
        t0, loss_sum = clock(run.device), torch.zeros((), device=run.device)
        for part in share.split(size):
            loss, logged, peaks = step_fn(run, batch, part)                      # [r], {name: [r]}, {name: [r]}
            ((part.weight * loss).sum() / images).backward()
            stats.add([batch.tasks[i] for i in part.image.tolist()], part.weight, loss=loss, **logged)
            stats.peak(**peaks)
            loss_sum += (part.weight * loss).detach().sum()
        t1 = clock(run.device)
        stats.norms.append(optimizer_step(run, loss_sum))
        timer["train"] += t1 - t0
        timer["optimizer"] += clock(run.device) - t1


def recompute_old_log_probs(run: Run, batch: Rollouts, shares: list, size: int) -> None:
    """log pi_old of the later optimizer steps' rows, before any step (the parameters are those of the rollout)
    by the training forward itself: the same micro-batches, grad mode on (under --compile, the training graph,
    whose rounding differs from the no-grad rollout's by up to 2.5e-4 at SD3.5-M, over the 1e-4 clip range),
    the output detached. Their ratios then hold the policy's change alone. Costs one forward per such row."""
    for share in shares:
        share.log_prob_old = torch.cat([student_step(run, batch, part)[1].detach() for part in share.split(size)])


def step_loss(run: Run, batch: Rollouts, rows: Rows):
    """The student's step (with grad) at the rows; K_j to teacher and anchor; the configured loss.
    -> loss [r], {"kl_teacher": [r], "kl_anchor": [r], kl_only: ratio metrics}, {maxima}"""
    v_student, log_prob = student_step(run, batch, rows)
    w = run.kl_w[rows.step]                                                    # w_j per row  [r]
    kl_teacher = step_kl(v_student, rows.targets["teacher"], w)                # K_j(S, T_k(i))  [r]
    kl_anchor = step_kl(v_student, rows.targets["anchor"], w)                  # K_j(S, A)       [r]
    log_prob_old, logged, peaks = ratio_terms(run, batch, rows, log_prob) if run.ratio else (None, {}, {})
    loss = configured_loss(run, kl_teacher, kl_anchor, log_prob, log_prob_old)
    return loss, {"kl_teacher": kl_teacher, "kl_anchor": kl_anchor} | logged, peaks


def student_step(run: Run, batch: Rollouts, rows: Rows):
    """Student CFG forward at the rows' (x_j, sigma_j) with grad, one sigma per row.
    -> v_student [r, C, H, W], log pi_theta(x_{j+1} | x_j) [r]"""
    cfg, sigmas, j = run.cfg, run.sigmas, rows.step
    x, x_next = batch.x[j, rows.image], batch.x[j + 1, rows.image]
    v_student = run.base.velocity(x, sigmas[j], batch.cond[rows.image], cfg.guidance)
    s, std = sde_scale(sigmas, cfg.noise_level)[j], transition_std(sigmas, cfg.noise_level)[j]
    mean = sde_mean(x, v_student, sigmas[j], sigmas[j + 1], s)
    return v_student, gaussian_log_prob(x_next, mean, std)                     # log pi_theta(x_{j+1} | x_j)


def ratio_terms(run: Run, batch: Rollouts, rows: Rows, log_prob):
    """The old log-prob of each row's PPO ratio, and the ratio's metrics. At the first optimizer step
    (rows.log_prob_old None) the forward's own detached log-prob: the ratio is exactly 1 there, and the rollout's
    log-prob only measures the rounding noise this removes.
    -> log_prob_old [r], {clip_fraction, first_step_noise_clip_fraction: [r]}, {maxima: [r]}"""
    eps = run.cfg.clip_range
    outside = lambda log_ratio: ((log_ratio.exp() - 1).abs() > eps).float()   # noqa: E731  ratio outside 1 +- eps
    if rows.log_prob_old is None:
        own = log_prob.detach()
        noise = own - batch.log_prob[rows.step, rows.image]                    # log pi_train - log pi_rollout
        logged = {"clip_fraction": outside(log_prob.detach() - own), "first_step_noise_clip_fraction": outside(noise)}
        return own, logged, {"first_step_ratio_noise": noise.abs()}
    log_ratio = log_prob.detach() - rows.log_prob_old
    return rows.log_prob_old, {"clip_fraction": outside(log_ratio)}, {"log_ratio_max": log_ratio.abs()}


def configured_loss(run: Run, kl_teacher, kl_anchor, log_prob, log_prob_old):
    """The --loss of opd_loss.LOSSES with its options from the config: gkd (beta), or kl_only (beta, --clip_range,
    --detach_advantage).  all: [r] -> [r]"""
    cfg = run.cfg
    options = {"clip_range": cfg.clip_range, "detach_advantage": cfg.detach_advantage} if cfg.loss == "kl_only" else {}
    return LOSSES[cfg.loss](kl_teacher, kl_anchor, log_prob, log_prob_old, beta=cfg.beta, **options)


def optimizer_step(run: Run, loss_sum: torch.Tensor) -> float:
    """All-reduce the LoRA gradients (mean over ranks), clip, AdamW step. -> grad norm before clipping.
    Guard: `loss_sum` (this step's summed losses, scalar) rides in the same all-reduce; a non-finite loss or
    gradient norm, identical on every rank after it, skips the step on all ranks together, and
    --max_bad_steps in a row abort."""
    for p in run.params:
        if p.grad is None:                                                     # e.g. the last block's add_q_proj
            p.grad = torch.zeros_like(p)
    all_reduce_mean([p.grad for p in run.params] + [loss_sum.view(1)])
    norm = float(torch.nn.utils.clip_grad_norm_(run.params, run.cfg.grad_clip))
    run.bad_steps = 0 if math.isfinite(norm) and math.isfinite(float(loss_sum)) else run.bad_steps + 1
    if run.bad_steps == 0:
        run.optimizer.step()
        if run.ema is not None:
            run.ema.after_optimizer_step(run.params)                          # Flow-GRPO's EMA (ema.py)
    run.optimizer.zero_grad(set_to_none=True)
    if run.bad_steps >= run.cfg.max_bad_steps:
        raise Diverged(f"{run.bad_steps} optimizer steps in a row had a non-finite loss or gradient; lower --lr "
                       f"(now {run.cfg.lr:g}) and go on from the last checkpoint with --resume")
    return norm


class Diverged(RuntimeError):
    """Too many non-finite steps in a row (train.py exits 1; the last checkpoint is left as it was)."""


class Stats:
    """Per-row metric sums, overall and per task, over one iteration; averaged over ranks at the end. Each row
    counts with its estimator weight (dense: 1/J each, so a metric is the mean over images and steps); `peak`
    keeps maxima instead (max over ranks)."""

    def __init__(self, tasks: list[str], device):
        self.tasks, self.device, self.norms = tasks, device, []
        self.sums: dict[str, torch.Tensor] = {}                                 # name -> [2, 1 + tasks]: weighted
        self.peaks: dict[str, torch.Tensor] = {}                                # sums and weights; all, per task

    def add(self, tasks, weight=None, **values):
        """values: name -> per-row tensor [r] for rows of `tasks` [r], each weighing `weight` [r] (default 1)."""
        column = torch.tensor([1 + self.tasks.index(t) for t in tasks], device=self.device)
        weight = torch.ones(len(tasks), device=self.device) if weight is None else weight
        weight = weight.detach().double()
        for name, value in values.items():
            sums = self.sums.setdefault(name, torch.zeros(2, 1 + len(self.tasks), dtype=torch.float64,
                                                          device=self.device))
            for row, v in ((0, weight * value.detach().double()), (1, weight)):
                sums[row, 0] += v.sum()
                sums[row].index_add_(0, column, v)

    def peak(self, **values):
        """values: name -> tensor; the iteration's maximum is logged."""
        for name, value in values.items():
            top = value.detach().double().max().view(1)
            self.peaks[name] = torch.maximum(self.peaks.get(name, top), top)

    def summary(self) -> dict:
        finite = [n for n in self.norms if math.isfinite(n)]
        out = {"grad_norm": sum(finite) / len(finite) if finite else None, "skipped_steps": len(self.norms) - len(finite)}
        names, peaks = list(self.sums), list(self.peaks)                       # the same on every rank
        if names:
            table = torch.stack([self.sums[n] for n in names])
            dist.all_reduce(table)
            for name, (sums, weights) in zip(names, table.tolist()):
                out[name] = sums[0] / weights[0]
                for i, task in enumerate(self.tasks):
                    out[f"{name}/{task}"] = sums[1 + i] / weights[1 + i] if weights[1 + i] else None   # None: task absent
        if peaks:
            top = torch.cat([self.peaks[n] for n in peaks])
            dist.all_reduce(top, op=dist.ReduceOp.MAX)
            out |= dict(zip(peaks, top.tolist()))
        return out


# ----------------------------------------------------------------------------------------- SFT (--algo sft)

def sft_iteration(run: Run, iteration: int) -> dict:
    """SFT cold start (paper sec. 3.2; not in the authors' code): each prompt's routed teacher samples it with
    the ODE (evaluation settings, --sft_sample_steps), then the student takes L_FM on those samples (sft.py) with
    its conditional velocity (SD3: no CFG; FLUX.1-dev: at --guidance, models.Base.conditional_guidance)."""
    cfg, base = run.cfg, run.base
    conditional = partial(base.velocity, guidance=base.conditional_guidance(cfg.guidance))
    mine, seeds = local_batch(run, iteration)
    sigmas = base.sigmas(cfg.sft_sample_steps)
    stats = Stats(list(run.prompts), run.device)
    micro_batches_per_update = run.local_images // cfg.updates // cfg.micro_batch
    images_per_update = micro_batches_per_update * cfg.micro_batch
    for k in range(cfg.updates):
        loss_sum = torch.zeros((), device=run.device)
        for start in range(k * images_per_update, (k + 1) * images_per_update, cfg.micro_batch):
            tasks, prompts = zip(*mine[start: start + cfg.micro_batch])
            cond = base.condition(list(prompts))
            noise, draws = initial_noise(seeds[start: start + cfg.micro_batch], base.latent_shape, 2, run.device)
            x0 = teacher_samples(base, route(tasks, run.routes), noise, sigmas, cond, cfg.guidance)
            sigma = torch.sigmoid(draws[1].flatten(1)[:, 0])                   # logit-normal sigma, per sample
            loss = flow_matching_loss(conditional, x0, cond, sigma, draws[0])                         # [b]
            (loss.mean() / micro_batches_per_update).backward()
            stats.add(tasks, loss=loss.detach())
            loss_sum += loss.detach().sum()
        stats.norms.append(optimizer_step(run, loss_sum))
    return stats.summary()


# ----------------------------------------------------------------------------------------- Flow-GRPO (--algo grpo)

def grpo_iteration(run, iteration: int) -> dict:
    """One Flow-GRPO iteration: rollouts (no grad), rewards, group advantages, the training rows (all trained steps,
    or --sampled_steps drawn uniformly per image) with the reference velocities there, then the PPO passes."""
    mine, seeds = local_batch(run, iteration)                                   # whole groups on this rank
    timer = {"rollout": 0.0, "reward": 0.0, "targets": 0.0, "train": 0.0, "optimizer": 0.0}
    t0 = clock(run.device)
    batch = student_rollout(run, mine, seeds)
    t1 = clock(run.device)
    batch.per_image = score(run, batch)                                         # "reward", "reward_<part>"  [N]
    std = grpo.global_std(batch.per_image["reward"])
    advantage = grpo.group_advantages(batch.per_image["reward"], run.cfg.group_size, std).to(run.device)
    batch.per_image |= {"advantage": advantage, "advantage_abs": advantage.abs()}
    t2 = clock(run.device)
    rows = draw_rows(run, seeds)
    rows.targets["base"] = velocities_at_rows(run, [run.anchor] * len(rows), batch, rows)
    timer |= {"rollout": t1 - t0, "reward": t2 - t1, "targets": clock(run.device) - t2}

    stats = Stats(list(run.prompts), run.device)
    train_passes(run, batch, rows, grpo_step_loss, stats, timer)               # steps 4-5, as OPD's
    return stats.summary() | {"reward_std": float(std)} | {f"seconds_{k}": v for k, v in timer.items()}


def score(run, batch) -> dict:
    """Rewards of the decoded final images, --micro_batch images per decode.  -> "reward" and, for a weighted
    sum, "reward_<key>" -> [N] on the run's device"""
    size, parts = run.cfg.micro_batch, []
    for start in range(0, len(batch.tasks), size):
        images = run.base.decode(batch.x[-1, start: start + size])              # x_T -> images
        cut = slice(start, start + size)
        metadata = [getattr(p, "metadata", None) for p in batch.prompts[cut]]  # each prompt's .jsonl line or None
        parts.append(run.reward(images, batch.prompts[cut], batch.tasks[cut], metadata))  # r_i, {part: r_i}
    reward = torch.cat([r for r, _ in parts])
    named = {f"reward_{k}": torch.cat([p[k] for _, p in parts]) for k in parts[0][1]} if len(parts[0][1]) > 1 else {}
    return {k: v.to(run.device) for k, v in ({"reward": reward} | named).items()}


def grpo_step_loss(run, batch, rows):
    """Student forward at the rows' (x_j, sigma_j) with grad; K_j to the reference; the PPO clip loss.
    -> loss [r], {kl_base, ratio metrics (ratio_terms), advantage, rewards: [r]}, {maxima}"""
    cfg = run.cfg
    v_student, log_prob = student_step(run, batch, rows)
    kl_base = step_kl(v_student, rows.targets["base"], run.kl_w[rows.step])    # K_j(S, base)  [r]
    log_prob_old, logged, peaks = ratio_terms(run, batch, rows, log_prob)
    per_image = {name: value[rows.image] for name, value in batch.per_image.items()}   # advantage, rewards  [r]
    loss = grpo.grpo_loss(per_image["advantage"], log_prob, log_prob_old, kl_base, cfg.beta, cfg.clip_range)
    return loss, {"kl_base": kl_base.detach()} | logged | per_image, peaks     # per-image values: their mean


ALGOS = {"opd": opd_iteration, "sft": sft_iteration, "grpo": grpo_iteration}


# ----------------------------------------------------------------------------------------- main

def resume(run: Run) -> int:
    """--resume: load --out's newest checkpoint (checkpoint.load; --resume_or_start: none yet = iteration 1) and
    drop metrics logged after it. -> first iteration"""
    out = Path(run.cfg.out)
    path = checkpoint.latest(out) if run.cfg.resume else None
    start = checkpoint.load(run, path, RENAMED) if path else 1
    if run.cfg.resume and run.rank == 0:
        if (out / "metrics.jsonl").exists():
            lines = (out / "metrics.jsonl").read_text().splitlines()
            kept = [line for line in lines if json.loads(line)["iteration"] < start] if start > 1 else []
            (out / "metrics.jsonl").write_text("".join(line + "\n" for line in kept))
        print(f"--resume: {path.name}, going on at iteration {start}" if path else
              f"--resume_or_start: no checkpoint in {out}/checkpoints, starting at iteration 1", flush=True)
    return start


def stop_requested(flag: dict, device) -> bool:
    """Whether any rank got SIGTERM/SIGINT (agreed by all ranks, so all checkpoint and stop together)."""
    signalled = torch.tensor([float(flag["signal"] is not None)], device=device)
    dist.all_reduce(signalled, op=dist.ReduceOp.MAX)
    return bool(signalled.item())


def on_signal(flag: dict, signum: int) -> None:
    """SIGTERM/SIGINT: the loop stops after this iteration on every rank (stop_requested) and checkpoints it. Rank 0
    also writes the last iteration's snapshot now (checkpoint.snapshot, no LoRA export), so a launcher that
    SIGKILLs before this iteration ends (torchrun: after its shutdown timeout) still leaves a checkpoint."""
    flag["signal"] = signum
    record, flag["pending"] = flag["pending"], None
    if record is None:
        return
    start = time.perf_counter()
    try:                                                                       # never raise into the interrupted code
        path = checkpoint.write(flag["run"], record, exports=False)
        message = f"signal {signum}: {path.name} written in {time.perf_counter() - start:.2f} s"
    except Exception as error:                                                 # noqa: BLE001 (reported, not raised)
        message = f"signal {signum}: writing the checkpoint of iteration {record['iteration']} failed: {error}"
    os.write(2, (message + "\n").encode())                                    # print() is not safe in a handler


def log_metrics(run: Run, live, line: dict) -> None:
    """Rank 0: append one line to metrics.jsonl (the source of truth), then send it to the live loggers."""
    with open(Path(run.cfg.out) / "metrics.jsonl", "a") as f:
        f.write(json.dumps(line) + "\n")
    live.metrics(line)


def evaluate_in_loop(run: Run, iteration: int) -> dict:
    """Held-out evaluation of the EMA weights under --ema (else the live ones) with heldout.py, as evaluate.py
    scores them; rank 0 saves the grid <out>/eval/grid_<iteration>.png.  -> metrics {"eval/<task>", "eval/average",
    "seconds_eval", "eval_weights"} (its seconds are not in the iteration's "seconds")"""
    cfg, (jobs, rewards) = run.cfg, run.evaluation
    weights = "ema" if run.ema is not None else "live"
    t0 = clock(run.device)
    means, grids, _ = heldout.evaluate_row(run.base, ema.ADAPTER if run.ema is not None else "student", jobs, rewards,
                                        run.rank, run.world, cfg.eval_steps, cfg.guidance,
                                        cfg.target_batch or cfg.micro_batch, EVAL_GRID)
    metrics = {f"eval/{task}": mean for task, mean in means.items()} | {"eval/average": heldout.average(means),
                                                                        "seconds_eval": clock(run.device) - t0,
                                                                        "eval_weights": weights}
    if run.rank == 0:
        (Path(cfg.out) / "eval").mkdir(exist_ok=True)
        heldout.save_grid({f"{weights}, iteration {iteration}": grids}, eval_grid(cfg, iteration))
        tqdm.write(f"held-out ({weights} weights, iteration {iteration}): " +
                   ", ".join(f"{t} {m:.3f}" for t, m in means.items()) + f" ({metrics['seconds_eval']:.1f} s)")
    return metrics


EVAL_GRID = 8                                                                  # grid columns: first prompts per task


def eval_grid(cfg: Config, iteration: int) -> Path:
    return Path(cfg.out) / "eval" / f"grid_{iteration:06d}.png"


def main(argv: list[str]) -> None:
    cfg = parse_config(argv)
    rank, world, device = setup_distributed()
    flag = {"signal": None, "pending": None, "run": None}                     # pending: last snapshot not on disk
    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, lambda signum, frame: on_signal(flag, signum))
    try:
        run = flag["run"] = setup(cfg, rank, world, device)
        start, iterate = resume(run), ALGOS[cfg.algo]
        if rank == 0:
            write_record(run.cfg, Path(cfg.out), run.base.name, world)
        live = live_log.LiveLog(live_log.parse(cfg.log), Path(cfg.out), asdict(run.cfg), start) if rank == 0 else \
            live_log.LiveLog()
        try:
            if run.evaluation and start == 1:                                  # held-out reward at the start
                metrics = {"iteration": 0} | evaluate_in_loop(run, 0)
                if rank == 0:
                    log_metrics(run, live, metrics)
                    live.image("eval/grid", eval_grid(cfg, 0), 0)
            train_loop(run, flag, live, start, iterate)
        finally:
            live.close()
    finally:
        dist.destroy_process_group()


def exit_with_error(program: str, error: Exception, code: int) -> None:
    """End the process with `error` as ONE line, also under torchrun: printed by rank 0 only (every rank meets
    the same error), and written to this rank's torchrun error file (TORCHELASTIC_ERROR_FILE, in the JSON
    layout of torch.distributed.elastic.multiprocessing.errors), so torchrun's failure summary, the last thing
    it prints, shows this line under "Root Cause" instead of a link."""
    line = f"{program}: error: {error}"
    if os.environ.get("RANK", "0") == "0":
        print(line, file=sys.stderr, flush=True)
    if os.environ.get("TORCHELASTIC_ERROR_FILE"):
        record = {"message": {"message": line, "extraInfo": {"timestamp": str(int(time.time()))}}}
        Path(os.environ["TORCHELASTIC_ERROR_FILE"]).write_text(json.dumps(record))
    sys.exit(code)


def train_loop(run: Run, flag: dict, live, start: int, iterate) -> None:
    """Iterations start..--iterations: train, evaluate when due, log, snapshot; checkpoint when due or stopped."""
    cfg, rank, device = run.cfg, run.rank, run.device
    progress = tqdm(range(start, cfg.iterations + 1), disable=rank != 0, desc=f"flow-{cfg.algo}",
                    dynamic_ncols=True, initial=start - 1, total=cfg.iterations)
    for iteration in progress:
        t0 = clock(device)
        metrics = iterate(run, iteration)
        seconds = clock(device) - t0
        metrics |= {"iteration": iteration, "seconds": seconds, "images_per_s": cfg.images_per_iteration / seconds}
        last, stop = iteration == cfg.iterations, stop_requested(flag, device)
        evaluating = run.evaluation is not None and (iteration % cfg.eval_every == 0 or last) and not stop
        if evaluating:                                   # before the snapshot, which is the next iteration's start
            metrics |= evaluate_in_loop(run, iteration)
            stop = stop_requested(flag, device)          # a signal during a long evaluation: stop now
        if rank == 0:
            log_metrics(run, live, metrics)
            if evaluating:
                live.image("eval/grid", eval_grid(cfg, iteration), iteration)
            progress.set_postfix(loss=f"{metrics['loss']:.3g}", img_s=f"{metrics['images_per_s']:.1f}")
        record = checkpoint.snapshot(run, iteration)
        saving = stop or iteration % cfg.save_every == 0 or last
        flag["pending"] = None if saving else record                            # on_signal writes it if one comes
        if saving and rank == 0:
            checkpoint.write(run, record)
        if stop:
            if rank == 0:
                print(f"stopped by signal {flag['signal'] or 'on another rank'} after iteration {iteration}; "
                      f"checkpoint written: go on with --resume", flush=True)
            break


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ValueError, FileNotFoundError, LoRAFileError, RewardError) as error:
        exit_with_error("train.py", error, 2)
    except Diverged as error:
        exit_with_error("train.py", error, 1)
